"""Update server: deployments end to end with simulated devices (next v2/v1, statuses, phases, failure
threshold, retries, abort, logs, statistics). The tests on the ``server`` fixture run on SQLite and on PostgreSQL
(tests/conftest.py)."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from .server_helpers import Device, Server, deploy, upload

DEPLOYMENTS = "/api/management/v1/deployments/deployments"


@pytest.fixture(scope="module")
def release(server: Server, keys: dict[str, tuple[Path, Path]], tmp_path_factory: pytest.TempPathFactory) -> str:
    """An artifact named ``app-2`` for qemu-virt and rpi4 is on the server."""
    import os
    import subprocess
    import sys

    from .conftest import BUILD_PY, REPO, make_payload

    d = tmp_path_factory.mktemp("rel")
    payload = make_payload(d / "p.bin", 20_000)
    art = d / "a.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "-T", "vv-app", "-f", str(payload),
                    "-n", "app-2", "-t", "qemu-virt", "-t", "rpi4", "-k", str(keys["ec"][0]), "-o", str(art)],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    r = upload(server, art)
    assert r.status_code == 201, r.text
    return "app-2"


def devices(server: Server, n: int) -> list[tuple[Device, str]]:
    out = []
    for _ in range(n):
        d = Device(server)
        out.append((d, d.accept()))
    return out


def stats(server: Server, dep_id: str) -> dict[str, int]:
    with server.admin() as a:
        s: dict[str, int] = a.get(f"{DEPLOYMENTS}/{dep_id}/statistics").json()
    return s


def get(server: Server, dep_id: str) -> dict[str, Any]:
    with server.admin() as a:
        doc: dict[str, Any] = a.get(f"{DEPLOYMENTS}/{dep_id}").json()
    return doc


def test_full_deployment_and_next_variants(server: Server, release: str) -> None:
    (dev, dev_id), = devices(server, 1)
    dep_id = deploy(server, name="rollout", artifact_name=release, devices=[dev_id], allow_downgrade=True)
    doc = get(server, dep_id)
    assert doc["status"] == "pending" and doc["device_count"] == 1 and doc["artifact_name"] == release
    assert {"id", "name", "created", "finished", "phases", "failure_threshold"} <= set(doc)

    r = dev.next("app-1")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == dep_id and body["allow_downgrade"] is True
    assert body["artifact"]["artifact_name"] == release
    assert sorted(body["artifact"]["device_types_compatible"]) == ["qemu-virt", "rpi4"]
    assert body["artifact"]["source"]["uri"].startswith(server.url + "/api/devices/v1/download/")
    assert body["artifact"]["source"]["expire"].endswith("Z")
    # the v1 variants answer the same
    r1 = dev.http.post("/api/devices/v1/deployments/device/deployments/next", headers=dev.headers,
                       json={"device_provides": {"device_type": "qemu-virt", "artifact_name": "app-1"}})
    assert r1.status_code == 200 and r1.json()["id"] == dep_id
    r2 = dev.http.get("/api/devices/v1/deployments/device/deployments/next", headers=dev.headers,
                      params={"artifact_name": "app-1", "device_type": "qemu-virt"})
    assert r2.status_code == 200 and r2.json()["id"] == dep_id
    assert dev.http.get("/api/devices/v1/deployments/device/deployments/next", headers=dev.headers,
                        params={"artifact_name": "app-1"}).status_code == 400
    r = dev.http.post("/api/devices/v2/deployments/device/deployments/next", headers=dev.headers,
                      json={"device_provides": {"artifact_name": "app-1"}})
    assert r.status_code == 400 and "device_type" in r.json()["error"]
    assert get(server, dep_id)["status"] == "inprogress"

    for st in ("downloading", "installing", "rebooting"):
        assert dev.status(dep_id, st, substate=f"{st} now").status_code == 204
        assert stats(server, dep_id)[st] == 1
    r = dev.status(dep_id, "exploded")
    assert r.status_code == 400 and "unknown status" in r.json()["error"]
    assert dev.status(dep_id, "success").status_code == 204
    s = stats(server, dep_id)
    assert s["success"] == 1 and all(isinstance(v, int) for v in s.values())
    assert set(s) >= {"pending", "downloading", "installing", "rebooting", "success", "failure", "already-installed",
                      "aborted", "noartifact", "pause_before_installing", "pause_before_rebooting",
                      "pause_before_committing", "decommissioned"}
    doc = get(server, dep_id)
    assert doc["status"] == "finished" and doc["finished"]
    # final means final: the same report again and an older status are acknowledged and ignored, a different
    # final status is refused
    assert dev.status(dep_id, "success").status_code == 204
    assert dev.status(dep_id, "downloading").status_code == 204
    r = dev.status(dep_id, "failure")
    assert r.status_code == 400 and "already finished" in r.json()["error"]
    assert stats(server, dep_id)["success"] == 1 and stats(server, dep_id)["downloading"] == 0
    assert dev.next("app-1").status_code == 204  # nothing left
    with server.admin() as a:
        (row,) = a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()
        assert row["id"] == dev_id and row["status"] == "success" and row["started"] and row["finished"]
        assert any(d["id"] == dep_id for d in a.get(DEPLOYMENTS, params={"status": "finished"}).json())
        assert all(d["id"] != dep_id for d in a.get(DEPLOYMENTS, params={"status": "inprogress"}).json())


def mender_chunks(doc: dict[str, Any]) -> Any:
    """A JSON body sent as the Mender client sends it: chunked (no Content-Length), in pieces."""
    body = json.dumps(doc).encode()
    return iter([body[:7], body[7:40], body[40:]])


def test_next_in_the_three_forms_mender_client_3_4_sends(server: Server, release: str) -> None:
    """mender-client 3.4 asks ``next`` as v2 POST ``{"device_provides": {...}, "update_control_map": true}``,
    on a 404 as v1 POST with the *flat* provides map as the body, on a 404 as v1 GET with query parameters
    (DESIGN.md §7). Each form gets the deployment; the flat one used to get 400 "device_provides: Field
    required"."""
    provides = {"artifact_name": "app-1", "device_type": "qemu-virt", "rootfs-image.version": "app-1",
                "rootfs-image.checksum": "4f1e" * 16}
    forms = {
        "v2 POST": ("POST", "/api/devices/v2/deployments/device/deployments/next",
                    {"device_provides": provides, "update_control_map": True}),
        "v1 POST (flat provides)": ("POST", "/api/devices/v1/deployments/device/deployments/next", provides),
        "v1 GET": ("GET", "/api/devices/v1/deployments/device/deployments/next", None),
    }
    for form, (method, path, body) in forms.items():
        (dev, dev_id), = devices(server, 1)

        def ask(extra: dict[str, Any] | None = None, dev: Device = dev, method: str = method, path: str = path,
                body: dict[str, Any] | None = body) -> Any:
            if body is None:
                return dev.http.get(path, headers=dev.headers, params={
                    "artifact_name": provides["artifact_name"], "device_type": provides["device_type"]})
            return dev.http.request(method, path, headers={**dev.headers, "Content-Type": "application/json"},
                                    content=mender_chunks({**body, **(extra or {})}))

        assert ask().status_code == 204, form  # nothing yet (the provides are recorded, then the idle poll)
        assert ask().status_code == 204, form
        dep_id = deploy(server, name=form, artifact_name=release, devices=[dev_id])
        r = ask()
        assert r.status_code == 200, (form, r.status_code, r.text)
        doc = r.json()
        assert doc["id"] == dep_id and doc["artifact"]["artifact_name"] == release, (form, doc)
        assert doc["artifact"]["source"]["uri"].startswith(server.url + "/api/devices/v1/download/"), form
        with server.admin() as a:
            attrs = {x["name"]: x["value"] for x in a.get(f"/api/management/v1/inventory/devices/{dev_id}").json()["attributes"]}
        assert attrs["device_type"] == "qemu-virt" and attrs["artifact_name"] == "app-1", (form, attrs)
        if body is not None:
            assert attrs["rootfs-image.version"] == "app-1", (form, attrs)
        assert dev.status(dep_id, "success").status_code == 204
        assert ask().status_code == 204, form
        # the device runs the release now: already installed (204) for a new deployment of it
        if body is not None:
            dep2 = deploy(server, name=form + " again", artifact_name=release, devices=[dev_id])
            r = ask({"artifact_name": release} if "device_provides" not in body else
                    {"device_provides": {**provides, "artifact_name": release}})
            assert r.status_code == 204, (form, r.text)
            with server.admin() as a:
                (row,) = a.get(f"{DEPLOYMENTS}/{dep2}/devices").json()
            assert row["status"] == "already-installed", (form, row)
    # malformed flat bodies on v1: 400 saying what is missing
    (dev, _), = devices(server, 1)
    v1 = "/api/devices/v1/deployments/device/deployments/next"
    for bad, word in (({"artifact_name": "a"}, "device_type"), ({"device_type": "qemu-virt"}, "artifact_name"),
                      ({"device_type": "", "artifact_name": "a"}, "device_type"),
                      ({"device_type": 1, "artifact_name": "a"}, "device_type"),
                      ({"device_provides": {"device_type": "qemu-virt"}}, "artifact_name"), ([], "")):
        r = dev.http.post(v1, headers=dev.headers, json=bad)
        assert r.status_code == 400 and word in r.json()["error"], (bad, r.text)
    # the flat form is v1's only: v2 still wants device_provides
    r = dev.http.post("/api/devices/v2/deployments/device/deployments/next", headers=dev.headers,
                      json={"device_type": "qemu-virt", "artifact_name": "a"})
    assert r.status_code == 400 and "device_provides" in r.json()["error"], r.text


def test_already_installed_and_incompatible(server: Server, release: str) -> None:
    (a, a_id), (b, b_id) = devices(server, 2)
    dep_id = deploy(server, name="x", artifact_name=release, devices=[a_id, b_id])
    assert a.next(release).status_code == 204
    assert b.next("app-1", device_type="beaglebone").status_code == 204
    with server.admin() as adm:
        rows = {r["id"]: r for r in adm.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}
    assert rows[a_id]["status"] == "already-installed"
    assert rows[b_id]["status"] == "noartifact" and "beaglebone" in rows[b_id]["substate"]
    assert get(server, dep_id)["status"] == "finished"


def test_devices_only_touch_their_own_deployments(server: Server, release: str) -> None:
    (a, a_id), (b, _) = devices(server, 2)
    dep_id = deploy(server, name="own", artifact_name=release, devices=[a_id])
    assert b.next().status_code == 204
    r = b.status(dep_id, "downloading")
    assert r.status_code == 404 and r.json()["error"]
    r = b.http.put(f"/api/devices/v1/deployments/device/deployments/{dep_id}/log", headers=b.headers,
                   json={"messages": [{"timestamp": "2024-01-01T00:00:00Z", "level": "info", "message": "hi"}]})
    assert r.status_code == 404
    assert b.status(str(uuid.uuid4()), "downloading").status_code == 404
    assert a.status(dep_id, "downloading").status_code == 204


def test_abort_gives_409(server: Server, release: str) -> None:
    (a, a_id), (b, b_id) = devices(server, 2)
    dep_id = deploy(server, name="abort", artifact_name=release, devices=[a_id, b_id])
    assert a.next().status_code == 200
    assert a.status(dep_id, "downloading").status_code == 204
    with server.admin() as adm:
        assert adm.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "aborted"}).status_code == 204
        assert adm.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "aborted"}).status_code == 409
        assert adm.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "finished"}).status_code == 400
    r = a.status(dep_id, "installing")
    assert r.status_code == 409 and "aborted" in r.json()["error"]
    assert b.next().status_code == 204
    assert get(server, dep_id)["status"] == "aborted"
    assert stats(server, dep_id)["aborted"] == 2


def test_phases_release_devices_in_batches(server: Server, release: str) -> None:
    devs = devices(server, 4)
    ids = [i for _, i in devs]
    dep_id = deploy(server, name="phased", artifact_name=release, devices=ids,
                    phases=[{"batch_size": 50}, {"wait_s": 3}])
    doc = get(server, dep_id)
    assert [p["device_count"] for p in doc["phases"]] == [2, 2]
    assert [p["batch_size"] for p in doc["phases"]] == [50, 50]
    t0 = time.time()
    got = [d.next().status_code for d, _ in devs]
    assert got == [200, 200, 204, 204]  # the listed order decides: the first two are the first batch
    while time.time() - t0 < 3.2:
        time.sleep(0.2)
    assert [d.next().status_code for d, _ in devs[2:]] == [200, 200]

    # start_ts: a phase in the future waits, one in the past has started
    devs2 = devices(server, 2)
    future = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    past = (datetime.now(UTC) - timedelta(minutes=1)).isoformat()
    dep2 = deploy(server, name="scheduled", artifact_name=release, devices=[i for _, i in devs2],
                  phases=[{"batch_size": 50, "start_ts": past}, {"start_ts": future}])
    assert [d.next().status_code for d, _ in devs2] == [200, 204]
    with server.admin() as a:
        rows = a.get(f"{DEPLOYMENTS}/{dep2}/devices").json()
    assert sorted(r["phase"] for r in rows) == [1, 2]


@pytest.mark.parametrize("body, message", [
    ({"phases": [{"batch_size": 50, "wait_s": 1, "start_ts": "2030-01-01T00:00:00Z"}, {}]}, "not both"),
    ({"phases": [{}, {"wait_s": 1}]}, "batch_size"),
    ({"phases": [{"batch_size": 60}, {"batch_size": 60}]}, "remaining"),
    ({"phases": [{"batch_size": 100}, {}]}, "less than 100"),
    ({"phases": [{"batch_size": 50, "start_ts": "2030-01-01T00:00:00"}, {}]}, "timezone"),
    ({"phases": [{"batch_size": 50, "start_ts": "2031-01-01T00:00:00Z"}, {"start_ts": "2030-01-01T00:00:00Z"}]}, "in order"),
    ({"failure_threshold": 150}, "failure_threshold"),
    ({"artifact_name": "no-such-thing"}, "no artifact"),
    ({"all_devices": True}, "exactly one target"),
    ({"devices": ["nope"]}, "unknown device"),
    ({"devices": []}, "devices"),
    ({"bogus": 1}, "bogus"),
])
def test_deployment_validation(server: Server, release: str, body: dict[str, Any], message: str) -> None:
    (_, dev_id), = devices(server, 1)
    req = {"name": "v", "artifact_name": release, "devices": [dev_id], **body}
    with server.admin() as a:
        r = a.post(DEPLOYMENTS, json=req)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.text


def test_failure_threshold_pauses_and_resume(server: Server, release: str) -> None:
    devs = devices(server, 4)
    (d1, _), (d2, _), (d3, _), (d4, _) = devs
    dep_id = deploy(server, name="canary", artifact_name=release, devices=[i for _, i in devs], failure_threshold=40)
    assert d1.next().status_code == 200 and d3.next().status_code == 200
    assert d3.status(dep_id, "downloading").status_code == 204
    assert d1.status(dep_id, "failure", substate="health check failed").status_code == 204
    assert get(server, dep_id)["status"] == "paused"
    assert d2.next().status_code == 204  # not started: waits
    assert d3.next().status_code == 200  # already started: carries on
    assert d3.status(dep_id, "success").status_code == 204
    assert get(server, dep_id)["status"] == "paused"
    with server.admin() as a:
        assert a.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "inprogress", "failure_threshold": 60}).status_code == 204
        assert a.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "inprogress"}).status_code == 409
    assert get(server, dep_id)["failure_threshold"] == 60
    assert d2.next().status_code == 200
    assert d2.status(dep_id, "success").status_code == 204
    assert d4.next().status_code == 200
    assert d4.status(dep_id, "failure").status_code == 204  # 2 of 4 = 50% <= 60%
    doc = get(server, dep_id)
    assert doc["status"] == "finished"
    assert stats(server, dep_id)["failure"] == 2 and stats(server, dep_id)["success"] == 2


def test_resumed_above_the_threshold_only_the_next_failure_pauses_again(server: Server, release: str) -> None:
    """As the resume documents: resumed without a new threshold while the failure ratio is still above it, the
    deployment goes on through successes (each lowers the ratio) and pauses again at its next failure while the
    ratio is still above."""
    devs = devices(server, 6)
    dep_id = deploy(server, name="resumed", artifact_name=release, devices=[i for _, i in devs], failure_threshold=30)
    (d1, _), (d2, _), (d3, _), (d4, _), (d5, _), (d6, _) = devs
    assert d1.next().status_code == 200
    assert d1.status(dep_id, "failure").status_code == 204  # 1 of 1
    assert get(server, dep_id)["status"] == "paused"
    with server.admin() as a:
        assert a.put(f"{DEPLOYMENTS}/{dep_id}/status", json={"status": "inprogress"}).status_code == 204
    for d in (d2, d3):
        assert d.next().status_code == 200
        assert d.status(dep_id, "success").status_code == 204  # 1 of 2, then 1 of 3: still above 30 %
        assert get(server, dep_id)["status"] == "inprogress"
    assert d4.next().status_code == 200
    assert d4.status(dep_id, "failure").status_code == 204  # 2 of 4
    assert get(server, dep_id)["status"] == "paused"
    counts = stats(server, dep_id)
    assert (counts["failure"], counts["success"], counts["pending"]) == (2, 2, 2)


def test_retries_and_logs(server: Server, release: str) -> None:
    (dev, dev_id), = devices(server, 1)
    dep_id = deploy(server, name="retry", artifact_name=release, devices=[dev_id], retries=1)
    assert dev.next().status_code == 200
    log = {"messages": [{"timestamp": "2024-05-01T10:00:00Z", "level": "info", "message": "writing slot B"},
                        {"timestamp": "2024-05-01T10:00:05Z", "level": "error", "message": "health check failed"}]}
    url = f"/api/devices/v1/deployments/device/deployments/{dep_id}/log"
    assert dev.http.put(url, headers=dev.headers, json=log).status_code == 204
    assert dev.http.put(url, headers=dev.headers, json={"messages": [{"level": "info"}]}).status_code == 400
    assert dev.status(dep_id, "failure").status_code == 204
    assert stats(server, dep_id)["pending"] == 1  # one retry left
    assert dev.next().json()["id"] == dep_id
    assert dev.status(dep_id, "failure").status_code == 204
    assert stats(server, dep_id)["failure"] == 1
    with server.admin() as a:
        (row,) = a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()
        assert row["log"] is True and row["attempts"] == 1
        r = a.get(f"{DEPLOYMENTS}/{dep_id}/devices/{dev_id}/log")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text == ("2024-05-01T10:00:00Z info: writing slot B\n"
                          "2024-05-01T10:00:05Z error: health check failed\n")
        assert a.get(f"{DEPLOYMENTS}/{dep_id}/devices/other/log").status_code == 404


def test_group_and_all_devices_targets(server: Server, release: str) -> None:
    devs = devices(server, 3)
    with server.admin() as a:
        for _, i in devs[:2]:
            assert a.put(f"/api/management/v1/inventory/devices/{i}/group", json={"group": "canary-1"}).status_code == 204
        r = a.put(f"/api/management/v1/inventory/devices/{devs[2][1]}/group", json={"group": "bad group!"})
        assert r.status_code == 400
        assert "canary-1" in a.get("/api/management/v1/inventory/groups").json()
        grouped = a.get("/api/management/v1/inventory/devices", params={"group": "canary-1"}).json()
        assert sorted(d["id"] for d in grouped) == sorted(i for _, i in devs[:2])
    dep_id = deploy(server, name="grp", artifact_name=release, group="canary-1")
    assert get(server, dep_id)["device_count"] == 2 and get(server, dep_id)["target"] == {"group": "canary-1"}
    assert devs[2][0].next().status_code == 204
    assert devs[0][0].next().status_code == 200
    all_id = deploy(server, name="all", artifact_name=release, all_devices=True)
    assert get(server, all_id)["device_count"] >= 3
    assert devs[2][0].next().json()["id"] == all_id
    with server.admin() as a:
        r = a.post(DEPLOYMENTS, json={"name": "g", "artifact_name": release, "group": "empty-group"})
        assert r.status_code == 400 and "no accepted devices" in r.json()["error"]


def test_decommissioned_device_counts_as_such(server: Server, release: str) -> None:
    (dev, dev_id), = devices(server, 1)
    dep_id = deploy(server, name="gone", artifact_name=release, devices=[dev_id])
    with server.admin() as a:
        assert a.delete(f"/api/management/v2/devauth/devices/{dev_id}").status_code == 204
    assert stats(server, dep_id)["decommissioned"] == 1
    assert get(server, dep_id)["status"] == "finished"
    assert dev.next().status_code == 401


def _row(server: Server, dep_id: str) -> dict[str, Any]:
    with server.admin() as a:
        (row,) = a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()
    return row  # type: ignore[no-any-return]


def test_statuses_only_move_forward(server: Server, release: str) -> None:
    """Mender's order: pending < downloading < pause_before_installing < installing < pause_before_rebooting <
    rebooting < pause_before_committing < a final status. An older report (a delayed or resent one) is
    acknowledged (204) and changes nothing; a repeat may update the substate."""
    (dev, dev_id), = devices(server, 1)
    dep_id = deploy(server, name="order", artifact_name=release, devices=[dev_id])
    assert dev.next().status_code == 200
    assert dev.status(dep_id, "installing", substate="writing").status_code == 204
    for older in ("downloading", "pause_before_installing"):
        assert dev.status(dep_id, older).status_code == 204
        assert _row(server, dep_id)["status"] == "installing"
    assert dev.status(dep_id, "installing", substate="90%").status_code == 204
    assert _row(server, dep_id)["substate"] == "90%"
    assert dev.status(dep_id, "pause_before_rebooting").status_code == 204
    assert dev.status(dep_id, "rebooting").status_code == 204
    assert dev.status(dep_id, "installing").status_code == 204
    s = stats(server, dep_id)
    assert s["rebooting"] == 1 and s["installing"] == s["downloading"] == s["pause_before_rebooting"] == 0
    assert dev.status(dep_id, "pause_before_committing").status_code == 204
    assert dev.status(dep_id, "success").status_code == 204
    for late in ("rebooting", "downloading", "pause_before_committing", "success"):
        assert dev.status(dep_id, late).status_code == 204
        assert _row(server, dep_id)["status"] == "success"
    r = dev.status(dep_id, "failure")
    assert r.status_code == 400 and "already finished" in r.json()["error"]
    assert stats(server, dep_id)["success"] == 1 and get(server, dep_id)["status"] == "finished"


def test_repeated_failure_uses_no_retry(server: Server, release: str) -> None:
    """A device resends its ``failure`` (the 204 was lost): the retry is used once. Reports about the failed
    attempt are ignored until ``next`` hands the device its new attempt."""
    (dev, dev_id), = devices(server, 1)
    dep_id = deploy(server, name="resend", artifact_name=release, devices=[dev_id], retries=2)
    assert dev.next().json()["id"] == dep_id
    assert dev.status(dep_id, "downloading").status_code == 204
    assert dev.status(dep_id, "failure", substate="first").status_code == 204
    assert dev.status(dep_id, "failure", substate="first").status_code == 204  # the same report again
    row = _row(server, dep_id)
    assert row["status"] == "pending" and row["attempts"] == 1, row
    assert dev.status(dep_id, "installing").status_code == 204  # late, from the failed attempt
    assert _row(server, dep_id)["status"] == "pending"
    assert dev.next().json()["id"] == dep_id  # the second attempt
    assert dev.status(dep_id, "failure", substate="second").status_code == 204
    assert dev.status(dep_id, "failure", substate="second").status_code == 204
    row = _row(server, dep_id)
    assert row["status"] == "pending" and row["attempts"] == 2, row
    assert dev.next().json()["id"] == dep_id  # the third and last attempt
    assert dev.status(dep_id, "downloading").status_code == 204
    assert dev.status(dep_id, "success").status_code == 204
    row = _row(server, dep_id)
    assert row["status"] == "success" and row["attempts"] == 2, row
    assert stats(server, dep_id)["success"] == 1 and get(server, dep_id)["status"] == "finished"
