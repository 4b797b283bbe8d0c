"""bench/server.py in a tiny configuration: behaviour only (every poll answered, every status report stored),
never timing. Also the poll shortcut (FastPoll) against the route it stands in for."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from .server_helpers import Device, Server, server_fixture  # noqa: F401 - fixture

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_tiny(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "server.py"), "--devices", "200", "--duration", "3", "--warmup", "1",
         "--workers", "1", "--concurrency", "16", "--rollout-devices", "500", "--phase-wait", "2",
         "--poll-interval", "1", "--fail-rate", "0.02", "--failure-threshold", "10", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    res = json.loads(out.read_text())
    for name in ("load", "floor"):
        r = res[name]["1"]
        assert r["error_count"] == 0, r["errors"]
        assert set(r["codes"]) == {"204"}, r["codes"]
        assert r["requests"] > 0
    roll = res["rollout"]
    stats = roll["statistics"]
    assert sum(stats.values()) == 500
    assert stats["failure"] == roll["expected_failures"] == 10
    assert stats["success"] == 490
    assert roll["error_count"] == 0, roll["errors"]
    assert roll["deployment_status"] == "finished"  # the failures stayed under the threshold: never paused
    assert roll["reports"] == 4 * 500
    assert roll["downloads"] == 500
    assert res["rollout_ok"] is True


def test_fast_poll_matches_the_route(server: Server) -> None:
    """Idle polls answered by the shortcut; anything else still gets the route's answer (first poll records
    the provides, bad bodies 400, a decommissioned device 401 at its very next poll)."""
    dev = Device(server)
    device_id = dev.accept()
    assert dev.next().status_code == 204  # records the provides (route)
    r = dev.next()  # the shortcut
    assert r.status_code == 204 and r.content == b""
    assert dev.next(artifact_name="other").status_code == 204  # changed provides: route records them
    with server.admin() as a:
        inv = a.get(f"/api/management/v1/inventory/devices/{device_id}").json()
    assert {x["name"]: x["value"] for x in inv["attributes"] if x["scope"] == "inventory"}["artifact_name"] == "other"
    path = "/api/devices/v2/deployments/device/deployments/next"
    bad = dev.http.post(path, headers=dev.headers, json={"device_provides": {"device_type": "qemu-virt"}})
    assert bad.status_code == 400 and "artifact_name" in bad.json()["error"]
    odd = dev.http.post(path, headers=dev.headers, json={"device_provides": {
        "device_type": "qemu-virt", "artifact_name": "other"}, "update_control_map": "false"})
    assert odd.status_code == 204  # pydantic's lax bool: the route answers
    assert dev.http.post(path, headers={"Authorization": "Bearer nope"}, json={}).status_code == 401
    with server.admin() as a:
        assert a.delete(f"/api/management/v2/devauth/devices/{device_id}").status_code == 204
    gone = dev.next(artifact_name="other")
    assert gone.status_code == 401 and "error" in gone.json()
