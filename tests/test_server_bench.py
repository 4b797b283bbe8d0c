"""bench/server.py in a tiny configuration: behaviour only (every poll answered, every status report stored),
never timing. Also the poll shortcut (FastPoll) against the route it stands in for: it must answer the idle
polls (counted in the ``ota_fast_polls_total`` metric), and give the route's answer every time."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client import REGISTRY

from .server_helpers import ADMIN_TOKEN, Device, Server, server_fixture  # noqa: F401 - fixture

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


@pytest.mark.slow
def test_bench_fleet_tiny(tmp_path: Path) -> None:
    """``--fleet``: two fleet sizes, every phase measured, the background load sent and answered, and the rollout
    under it counted exactly."""
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "server.py"), "--devices", "0", "--rollout-devices", "0",
         "--fleet", "40,80", "--fleet-poll-interval", "4", "--inventory-interval", "8", "--steady-seconds", "1",
         "--duration", "1", "--warmup", "0.5", "--gen-procs", "1", "--concurrency", "8", "--phase-wait", "1",
         "--poll-interval", "0.5", "--fail-rate", "0.05", "--json", str(out)],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "fleet statistics exact for every size: OK" in proc.stdout
    res = json.loads(out.read_text())
    assert res["fleet_ok"] is True
    for n in (40, 80):
        fleet = res["fleet"]["sizes"][str(n)]
        phases = fleet["phases"]
        assert list(phases) == ["provision", "auth", "inventory", "first poll", "idle polls", "steady", "rollout"]
        for name in ("auth", "inventory", "first poll"):
            assert phases[name]["requests"] == n and phases[name]["error_count"] == 0, phases[name]
        assert phases["provision"]["requests"] == 1  # one batch
        assert set(phases["idle polls"]["codes"]) == {"204"}
        # the steady load: n/4 polls/s and n/8 inventory updates/s, all answered
        steady = phases["steady"]
        assert steady["requests"] > 0 and steady["inventory"] > 0 and steady["error_count"] == 0
        assert set(steady["codes"]) == {"204"}
        roll = phases["rollout"]
        assert roll["ok"] is True
        failures = int(n * 0.05)
        assert roll["statistics"]["success"] == n - failures and roll["statistics"]["failure"] == failures
        assert sum(roll["statistics"].values()) == n
        assert roll["reports"] == 4 * n and roll["downloads"] == n
        assert roll["background_polls"] > 0 and set(roll["background_codes"]) <= {"200", "204"}
        for p in phases.values():
            assert p["server_cpu_s"] > 0
        assert fleet["memory"]["peak_max_mb"] > 0


def shortcut_answers(server: Server) -> float:
    """How many polls the server's shortcut answered so far (its ``/metrics``)."""
    with server.admin() as a:
        text = a.get("/metrics").text
    found = re.search(r"^ota_fast_polls_total ([0-9.e+]+)$", text, re.MULTILINE)
    assert found, "no ota_fast_polls_total in /metrics"
    return float(found.group(1))


def test_fast_poll_matches_the_route(server: Server) -> None:
    """Idle polls answered by the shortcut; anything else still gets the route's answer (first poll records
    the provides, bad bodies 400, a decommissioned device 401 at its very next poll)."""
    dev = Device(server)
    device_id = dev.accept()
    before = shortcut_answers(server)
    assert dev.next().status_code == 204  # records the provides (route)
    assert shortcut_answers(server) == before
    r = dev.next()  # the shortcut
    assert r.status_code == 204 and r.content == b""
    assert shortcut_answers(server) == before + 1
    assert dev.next(artifact_name="other").status_code == 204  # changed provides: route records them
    assert shortcut_answers(server) == before + 1
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
    assert shortcut_answers(server) == before + 1  # none of these was the shortcut's to answer



# ---------------------------------------------------------------------------------------------------------
# The shortcut against the route alone, case by case


NEXT_V2 = "/api/devices/v2/deployments/device/deployments/next"
NEXT_V1 = "/api/devices/v1/deployments/device/deployments/next"
DEPLOYMENTS = "/api/management/v1/deployments/deployments"
#: the image the devices run, and the source of the delta
SOURCE = "5ca1ab1e" * 8


class AnyDeploymentId:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and len(other) == 36

    def __hash__(self) -> int:
        return 0


def offered(artifact_id: str) -> dict[str, Any]:
    """The answer that hands out artifact ``artifact_id`` of ``rel-2`` (as :func:`seen` shows it)."""
    return {"id": AnyDeploymentId(), "allow_downgrade": False, "artifact": {
        "id": artifact_id, "artifact_name": "rel-2", "device_types_compatible": ["qemu-virt"],
        "source": f"http://testserver/api/devices/v1/download/{artifact_id}"}}


class InProcess:
    """An app in this process, as :class:`Device` talks to a server (``client()``, ``admin()``)."""

    def __init__(self, app: FastAPI, stack: ExitStack) -> None:
        self.app = app
        self.stack = stack

    def client(self) -> TestClient:
        return self.stack.enter_context(TestClient(self.app))

    def admin(self) -> TestClient:
        return TestClient(self.app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


@pytest.fixture(name="apps")
def apps_fixture(tmp_path: Path) -> Iterator[tuple[FastAPI, FastAPI]]:
    """The server's app, and the same app over the same database without the shortcut (the route alone)."""
    from ota_server.apitokens import hash_token
    from ota_server.app import create_app
    from ota_server.db import migrate
    from ota_server.fastpoll import FastPoll
    from ota_server.models import artifacts
    from ota_server.settings import Settings

    url = f"sqlite:///{tmp_path}/ota.db"
    migrate(url)
    settings = Settings(db_url=url, storage=tmp_path / "storage", admin_token_sha256=hash_token(ADMIN_TOKEN))
    server, route_only = create_app(settings), create_app(settings)
    route_only.user_middleware = [m for m in route_only.user_middleware if m.cls is not FastPoll]
    assert [m.cls for m in server.user_middleware].count(FastPoll) == 1
    assert len(route_only.user_middleware) == len(server.user_middleware) - 1
    full = {"updates": [{"type_info": {"type": "rootfs-image"}}]}
    delta = {"updates": [{"type_info": {"type": "rootfs-delta"}}], "artifact_depends": {"rootfs-image.checksum": SOURCE}}
    with server.state.ctx.db.write() as c:
        c.execute(artifacts.insert(), [
            {"id": name, "name": "rel-2", "description": "", "device_types": ["qemu-virt"], "size": 1,
             "sha256": "0" * 64, "signed": False, "signed_by": None, "info": info, "created": float(i)}
            for i, (name, info) in enumerate((("full-2", full), ("delta-2", delta)))])
    yield server, route_only
    for app in (server, route_only):
        app.state.ctx.db.dispose()


def shortcut_count() -> float:
    return REGISTRY.get_sample_value("ota_fast_polls_total") or 0.0


def seen(r: httpx.Response) -> tuple[int, Any]:
    """What a device learns from an answer; of a link, its path (the signature and expiry follow the clock)."""
    if r.status_code != 200:
        return r.status_code, r.content
    doc = r.json()
    doc["artifact"]["source"] = doc["artifact"]["source"]["uri"].split("?", 1)[0]
    return 200, doc


def test_the_shortcut_answers_as_the_route_would(apps: tuple[FastAPI, FastAPI]) -> None:
    """Each case asked twice in the same state: through the server (shortcut installed) and through the route
    alone. The answers are the same every time, and the shortcut gave exactly the idle ones: nothing deployed,
    a phase that has not started, a paused deployment — never a deployment to hand out (full or delta), one to
    record as already installed, new provides, or a bad body."""
    server, route_only = apps
    with ExitStack() as stack:
        host = InProcess(server, stack)
        direct = stack.enter_context(TestClient(route_only))
        admin = stack.enter_context(host.admin())
        names = ("idle", "phase", "paused", "failing", "full", "delta", "no-module", "installed")
        devices = {name: Device(host) for name in names}  # type: ignore[arg-type]
        ids = {name: d.accept() for name, d in devices.items()}
        provides = {name: {"device_type": "qemu-virt", "artifact_name": "rel-1", "rootfs-image.checksum": SOURCE}
                    for name in names}
        provides["installed"]["artifact_name"] = "rel-2"
        modules = [{"name": "update_modules", "value": ["rootfs-delta"]}]
        r = devices["delta"].http.put("/api/devices/v1/inventory/device/attributes", headers=devices["delta"].headers,
                                      json=modules)
        assert r.status_code == 200
        for name, dev in devices.items():  # the first poll records the provides: the route's
            assert dev.http.post(NEXT_V2, headers=dev.headers, json={"device_provides": provides[name]}).status_code == 204

        def deploy(**body: Any) -> str:
            r = admin.post(DEPLOYMENTS, json=body)
            assert r.status_code == 201, r.text
            return r.headers["Location"].rsplit("/", 1)[1]

        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        deploy(name="later", artifact_name="rel-2", devices=[ids["phase"]], phases=[{"start_ts": later}])
        stopped = deploy(name="stopped", artifact_name="rel-2", devices=[ids["paused"], ids["failing"]],
                         failure_threshold=0)
        now = deploy(name="now", artifact_name="rel-2", devices=[ids[n] for n in ("full", "delta", "no-module",
                                                                                   "installed")])
        failing = devices["failing"]
        got = failing.http.post(NEXT_V2, headers=failing.headers, json={"device_provides": provides["failing"]}).json()
        assert failing.status(got["id"], "failure").status_code == 204
        assert admin.get(f"{DEPLOYMENTS}/{stopped}").json()["status"] == "paused"  # 100% failed > 0%

        def ask(name: str, body: Any, path: str = NEXT_V2) -> tuple[tuple[int, Any], float]:
            """The answer (the same from both apps), and whether the shortcut gave it."""
            headers = devices[name].headers
            before = shortcut_count()
            first = devices[name].http.post(path, headers=headers, json=body)
            answered = shortcut_count() - before
            again = direct.post(path, headers=headers, json=body)
            assert shortcut_count() == before + answered  # the route alone never counts
            assert seen(first) == seen(again), (name, first.text, again.text)
            return seen(first), answered

        idle = (204, b"")
        assert ask("idle", {"device_provides": provides["idle"]}) == (idle, 1)
        assert ask("idle", provides["idle"], NEXT_V1) == (idle, 1)  # v1 POST, the flat provides map
        assert ask("phase", {"device_provides": provides["phase"], "update_control_map": True}) == (idle, 1)
        assert ask("paused", {"device_provides": provides["paused"]}) == (idle, 1)
        for name, artifact_id in (("full", "full-2"), ("delta", "delta-2"), ("no-module", "full-2")):
            (status, doc), answered = ask(name, {"device_provides": provides[name]})
            assert (status, answered) == (200, 0) and doc == offered(artifact_id), (name, doc)
        assert ask("installed", {"device_provides": provides["installed"]}) == (idle, 0)  # recorded: the route's
        assert admin.get(f"{DEPLOYMENTS}/{now}/statistics").json()["already-installed"] == 1
        changed = {**provides["idle"], "artifact_name": "rel-1b"}
        assert ask("idle", {"device_provides": changed}) == (idle, 0)  # recorded by the route, then nothing to do
        for body, path in (({"device_provides": {"device_type": "qemu-virt"}}, NEXT_V2),
                           ({**provides["idle"], "artifact_name": ""}, NEXT_V1),
                           ({"device_provides": {**provides["idle"], **{f"k{i}": "v" for i in range(200)}}}, NEXT_V2)):
            (status, error), answered = ask("idle", body, path)
            assert (status, answered) == (400, 0), error

