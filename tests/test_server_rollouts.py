"""Update server: dynamic deployments, health-gated phases and the failure limit, end to end with simulated
devices, on SQLite and on PostgreSQL (the ``server`` fixture of tests/conftest.py). Every test uses groups of its
own: a dynamic deployment takes the devices of its group only."""

from __future__ import annotations

import time
import uuid
from typing import Any

from .server_helpers import Device, Server, deploy
from .test_server_deployments import DEPLOYMENTS, get, release, stats  # noqa: F401 - release: fixture

INVENTORY = "/api/management/v1/inventory"
IMPORT = INVENTORY + "/import/ansible"
#: what our agent reports after a trial boot that failed its health check (device_hooks/agent.py
#: finish_rollback): a ``failure`` with the reason in substate
ROLLBACK = "health check failed on slot B: app /health answered 500"


def group() -> str:
    return f"g-{uuid.uuid4().hex[:10]}"


def accepted(server: Server, group_name: str | None = None, hostname: str | None = None) -> tuple[Device, str]:
    dev = Device(server, identity={"hostname": hostname or f"h-{uuid.uuid4().hex[:10]}",
                                   "mac": f"02:00:{uuid.uuid4().hex[:8]}"})
    dev_id = dev.accept()
    if group_name is not None:
        move(server, dev_id, group_name)
    return dev, dev_id


def move(server: Server, dev_id: str, group_name: str) -> None:
    with server.admin() as a:
        assert a.put(f"{INVENTORY}/devices/{dev_id}/group", json={"group": group_name}).status_code == 204


def members(server: Server, dep_id: str) -> dict[str, dict[str, Any]]:
    with server.admin() as a:
        return {r["id"]: r for r in a.get(f"{DEPLOYMENTS}/{dep_id}/devices").json()}


def set_status(server: Server, dep_id: str, **body: Any) -> Any:
    with server.admin() as a:
        return a.put(f"{DEPLOYMENTS}/{dep_id}/status", json=body)


def import_hosts(server: Server, group_name: str, *hosts: str) -> dict[str, Any]:
    text = f"all:\n  children:\n    {group_name}:\n      hosts:\n" + "".join(f"        {h}: {{}}\n" for h in hosts)
    with server.admin() as a:
        r = a.post(IMPORT, content=text.encode(), headers={"Content-Type": "application/yaml"})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def install(dev: Device, dep_id: str, final: str = "success", substate: str | None = None) -> None:
    r = dev.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
    for st in ("downloading", "installing", "rebooting"):
        assert dev.status(dep_id, st).status_code == 204
    assert dev.status(dep_id, final, substate).status_code == 204


def test_dynamic_group_deployment_takes_devices_that_join(server: Server, release: str) -> None:  # noqa: F811
    g = group()
    first, first_id = accepted(server, g)
    dep_id = deploy(server, name="dyn", artifact_name=release, group=g, dynamic=True)
    doc = get(server, dep_id)
    assert doc["dynamic"] is True and doc["closed"] is None and doc["device_count"] == 1

    # accepted after the deployment started: its staged group comes with the acceptance, the poll adds it
    late_host = f"late-{uuid.uuid4().hex[:8]}"
    assert [u["host"] for u in import_hosts(server, g, late_host)["unmatched"]] == [late_host]
    late, late_id = accepted(server, hostname=late_host)
    assert late_id not in members(server, dep_id)
    r = late.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id
    assert members(server, dep_id)[late_id]["status"] == "pending"

    # moved into the group by an inventory import (no deployment logic there): taken at its next poll,
    # which the poll shortcut must not answer "nothing"
    host = f"imp-{uuid.uuid4().hex[:8]}"
    imported, imported_id = accepted(server, hostname=host)
    assert imported.next().status_code == 204
    assert import_hosts(server, g, host)["matched"][0]["device_id"] == imported_id
    assert imported.next().json()["id"] == dep_id

    # moved into the group through the API: it is in the deployment at once
    moved, moved_id = accepted(server)
    move(server, moved_id, g)
    assert moved_id in members(server, dep_id)
    assert moved.next().json()["id"] == dep_id
    assert get(server, dep_id)["device_count"] == 4 and stats(server, dep_id)["pending"] == 4

    # a device outside the group is not taken; one that finished is not taken again
    outsider, _ = accepted(server, group())
    assert outsider.next().status_code == 204
    for dev in (first, late, imported, moved):
        install(dev, dep_id)
    assert first.next().status_code == 204
    assert set(members(server, dep_id)) == {first_id, late_id, imported_id, moved_id}
    # every device done, but a dynamic deployment waits for joiners until it is closed
    assert get(server, dep_id)["status"] == "inprogress" and stats(server, dep_id)["success"] == 4

    assert set_status(server, dep_id, status="closed").status_code == 204
    doc = get(server, dep_id)
    assert doc["closed"] and doc["status"] == "finished" and doc["finished"]
    after, after_id = accepted(server, g)
    assert after.next().status_code == 204 and after_id not in members(server, dep_id)
    r = set_status(server, dep_id, status="closed")
    assert r.status_code == 409 and "closed already" in r.json()["error"]


def test_close_with_devices_left_and_on_an_empty_group(server: Server, release: str) -> None:  # noqa: F811
    """A dynamic deployment may start with nobody (devices come later); closed while a device is still at it,
    it finishes when that device does; a closed deployment takes no more joiners."""
    g = group()
    dep_id = deploy(server, name="empty", artifact_name=release, group=g, dynamic=True)
    assert get(server, dep_id)["device_count"] == 0 and get(server, dep_id)["status"] == "pending"
    dev, _ = accepted(server, g)
    assert dev.next().json()["id"] == dep_id
    assert dev.status(dep_id, "downloading").status_code == 204
    assert set_status(server, dep_id, status="closed").status_code == 204
    assert get(server, dep_id)["status"] == "inprogress"
    other, other_id = accepted(server, g)
    assert other.next().status_code == 204 and other_id not in members(server, dep_id)
    assert dev.status(dep_id, "success").status_code == 204
    assert get(server, dep_id)["status"] == "finished"
    # abort also ends the joining
    dep2 = deploy(server, name="abort-dyn", artifact_name=release, group=g, dynamic=True)
    assert set_status(server, dep2, status="aborted").status_code == 204
    third, third_id = accepted(server, g)
    assert third.next().status_code == 204 and third_id not in members(server, dep2)
    r = set_status(server, dep2, status="closed")
    assert r.status_code == 409 and "aborted" in r.json()["error"]


def test_non_dynamic_deployment_never_takes_joiners(server: Server, release: str) -> None:  # noqa: F811
    g = group()
    dev, dev_id = accepted(server, g)
    dep_id = deploy(server, name="static", artifact_name=release, group=g)
    assert get(server, dep_id)["dynamic"] is False
    joiner, joiner_id = accepted(server, g)
    assert joiner.next().status_code == 204
    host = f"imp-{uuid.uuid4().hex[:8]}"
    imported, imported_id = accepted(server, hostname=host)
    import_hosts(server, g, host)
    assert imported.next().status_code == 204
    assert set(members(server, dep_id)) == {dev_id}
    r = set_status(server, dep_id, status="closed")
    assert r.status_code == 409 and "not dynamic" in r.json()["error"]
    install(dev, dep_id)
    assert get(server, dep_id)["status"] == "finished"
    assert joiner_id not in members(server, dep_id) and imported_id not in members(server, dep_id)


def test_joiner_goes_to_the_latest_started_phase(server: Server, release: str) -> None:  # noqa: F811
    g = group()
    (a, _), (b, _) = accepted(server, g), accepted(server, g)
    dep_id = deploy(server, name="phased-dyn", artifact_name=release, group=g, dynamic=True,
                    phases=[{"batch_size": 50}, {"wait_s": 3600}])
    assert sorted([a.next().status_code, b.next().status_code]) == [200, 204]
    joiner, joiner_id = accepted(server, g)
    assert members(server, dep_id)[joiner_id]["phase"] == 1  # not the second phase, an hour away
    assert joiner.next().json()["id"] == dep_id
    assert [p["device_count"] for p in get(server, dep_id)["phases"]] == [2, 1]
    assert set_status(server, dep_id, status="aborted").status_code == 204


def test_gated_phase_waits_for_the_share_and_the_soak(server: Server, release: str) -> None:  # noqa: F811
    """Phase 2 needs 75 % of phase 1's devices to report success (committed after a passing health check),
    and the success that reached the share 2 s old. A failure (a rollback) does not count toward it."""
    g = group()
    devs = [accepted(server, g) for _ in range(5)]
    dep_id = deploy(server, name="gated", artifact_name=release, devices=None, group=g,
                    phases=[{"batch_size": 80}, {"gate": {"min_success_pct": 75, "soak_s": 2}}])
    doc = get(server, dep_id)
    assert doc["phases"][1]["gate"] == {"min_success_pct": 75, "soak_s": 2} and doc["phases"][1]["start_ts"] is None
    rows = members(server, dep_id)
    phase1 = [(d, i) for d, i in devs if rows[i]["phase"] == 1]
    (last, last_id), = [(d, i) for d, i in devs if rows[i]["phase"] == 2]
    assert len(phase1) == 4
    install(phase1[0][0], dep_id)
    install(phase1[1][0], dep_id, "failure", ROLLBACK)
    install(phase1[2][0], dep_id)
    assert last.next().status_code == 204  # 2 of 4: below the share
    assert get(server, dep_id)["phases"][1]["start_ts"] is None
    install(phase1[3][0], dep_id)  # 3 of 4 = 75 %: the share is reached now; the soak runs
    reached = time.time()
    doc = get(server, dep_id)
    assert doc["phases"][1]["start_ts"] is not None and doc["phases"][1]["gate_passed_ts"] == doc["phases"][1]["start_ts"]
    assert last.next().status_code == 204  # within the soak
    while time.time() < reached + 2.3:
        time.sleep(0.2)
    r = last.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id
    install_rest(last, dep_id)
    assert get(server, dep_id)["status"] == "finished" and members(server, dep_id)[last_id]["status"] == "success"


def install_rest(dev: Device, dep_id: str) -> None:
    for st in ("downloading", "installing", "rebooting", "success"):
        assert dev.status(dep_id, st).status_code == 204


def test_timer_phases_stay_the_default(server: Server, release: str) -> None:  # noqa: F811
    """Without a gate, phase 2 starts on its timer even while phase 1 is failing (as before)."""
    g = group()
    devs = [accepted(server, g) for _ in range(2)]
    dep_id = deploy(server, name="timer", artifact_name=release, group=g, phases=[{"batch_size": 50}, {"wait_s": 1}])
    rows = members(server, dep_id)
    (first, _), = [(d, i) for d, i in devs if rows[i]["phase"] == 1]
    (second, _), = [(d, i) for d, i in devs if rows[i]["phase"] == 2]
    install(first, dep_id, "failure", ROLLBACK)
    time.sleep(1.2)
    assert second.next().json()["id"] == dep_id


def test_failure_limit_counts_rollbacks_and_pauses(server: Server, release: str) -> None:  # noqa: F811
    """30 % of the devices handed out: a rolled-back trial counts, also when the device retries it."""
    g = group()
    devs = [accepted(server, g) for _ in range(5)]
    dep_id = deploy(server, name="limit", artifact_name=release, group=g, retries=1,
                    failure_limit={"max_failed_pct": 30})
    assert get(server, dep_id)["failure_limit"] == {"max_failed_pct": 30, "on_failure": "pause"}
    (a, _), (b, _), (c, _), (d, _), (e, _) = devs
    for dev in (a, b, c, d):
        assert dev.next().json()["id"] == dep_id
    install_rest(a, dep_id)
    assert d.status(dep_id, "downloading").status_code == 204
    assert b.status(dep_id, "failure", ROLLBACK).status_code == 204  # 1 of 4 handed out: 25 %, retried
    assert stats(server, dep_id)["pending"] == 3 and get(server, dep_id)["status"] == "inprogress"
    assert c.status(dep_id, "failure", ROLLBACK).status_code == 204  # 2 of 4: 50 % > 30 %
    doc = get(server, dep_id)
    assert doc["status"] == "paused" and "failure limit: 2 of 4" in doc["status_reason"], doc
    assert e.next().status_code == 204  # not started: waits while paused
    assert d.next().json()["id"] == dep_id  # started: carries on
    r = set_status(server, dep_id, status="inprogress", failure_limit={"max_failed_pct": 80})
    assert r.status_code == 204
    doc = get(server, dep_id)
    assert doc["status"] == "inprogress" and doc["status_reason"] is None
    assert doc["failure_limit"] == {"max_failed_pct": 80, "on_failure": "pause"}
    assert e.next().json()["id"] == dep_id


def test_failure_limit_aborts(server: Server, release: str) -> None:  # noqa: F811
    g = group()
    (a, _), (b, _), (c, _) = (accepted(server, g) for _ in range(3))
    dep_id = deploy(server, name="limit-abort", artifact_name=release, group=g,
                    failure_limit={"max_failed_pct": 40, "on_failure": "abort"})
    assert a.next().status_code == 200 and b.next().status_code == 200
    assert b.status(dep_id, "downloading").status_code == 204
    assert a.status(dep_id, "failure", ROLLBACK).status_code == 204  # 1 of 2 = 50 % > 40 %
    doc = get(server, dep_id)
    assert doc["status"] == "aborted" and "aborted" in doc["status_reason"], doc
    s = stats(server, dep_id)
    assert s["failure"] == 1 and s["aborted"] == 2
    assert b.status(dep_id, "installing").status_code == 409
    assert c.next().status_code == 204


# ---------------------------------------------------------------------------------------------------------
# Deployments to an inventory filter

ATTRIBUTES = "/api/devices/v1/inventory/device/attributes"


def inventory(dev: Device, method: str = "PATCH", **attrs: Any) -> None:
    r = dev.http.request(method, ATTRIBUTES, headers=dev.headers,
                         json=[{"name": n, "value": v} for n, v in attrs.items()])
    assert r.status_code == 200, r.text


def test_dynamic_filter_deployment_takes_devices_whose_inventory_comes_to_match(
        server: Server, release: str) -> None:  # noqa: F811
    hw = f"rev-{uuid.uuid4().hex[:8]}"
    first, first_id = accepted(server)
    inventory(first, "PUT", hw_rev=hw, site="lab")
    other, other_id = accepted(server)
    inventory(other, "PUT", hw_rev="rev-other", site="lab")
    dep_id = deploy(server, name="dyn-filter", artifact_name=release, filter={"hw_rev": hw, "site": "lab"},
                    dynamic=True)
    doc = get(server, dep_id)
    assert doc["target"] == {"filter": {"hw_rev": hw, "site": "lab"}} and doc["device_count"] == 1
    assert set(members(server, dep_id)) == {first_id}

    # its inventory comes to match: the inventory write adds it at once (one attribute is not enough)
    late, late_id = accepted(server)
    assert late.next().status_code == 204
    inventory(late, hw_rev=hw)
    assert late_id not in members(server, dep_id)
    inventory(late, site="lab")
    assert members(server, dep_id)[late_id]["status"] == "pending"
    inventory(late, site="lab")  # written again: added once
    assert get(server, dep_id)["device_count"] == 2
    assert late.next().json()["id"] == dep_id

    # the matching attributes come with the poll's provides (recorded into the inventory): the poll adds it
    polled, polled_id = accepted(server)
    assert polled.next().status_code == 204
    r = polled.next(hw_rev=hw, site="lab")
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text

    # never matching: never taken, by inventory writes nor polls (a number is not the string "lab")
    inventory(other, site="lab")
    inventory(other, "PUT", hw_rev=hw, site=7)
    assert other.next().status_code == 204 and other.next(site=8).status_code == 204
    assert set(members(server, dep_id)) == {first_id, late_id, polled_id}

    # closed: a device that comes to match is not taken any more
    assert set_status(server, dep_id, status="closed").status_code == 204
    after, after_id = accepted(server)
    inventory(after, hw_rev=hw, site="lab")
    assert after.next(hw_rev=hw, site="lab").status_code == 204 and after_id not in members(server, dep_id)
    assert get(server, dep_id)["device_count"] == 3


def test_group_and_filter_narrow_and_the_poll_shortcut_defers(server: Server, release: str) -> None:  # noqa: F811
    g, hw = group(), f"rev-{uuid.uuid4().hex[:8]}"
    inside, inside_id = accepted(server, g)
    inventory(inside, hw_rev=hw)
    unmatched, unmatched_id = accepted(server, g)
    inventory(unmatched, hw_rev="rev-other")
    outside, outside_id = accepted(server, group())
    inventory(outside, hw_rev=hw)
    dep_id = deploy(server, name="group-filter", artifact_name=release, group=g, filter={"hw_rev": hw},
                    dynamic=True)
    assert get(server, dep_id)["target"] == {"group": g, "filter": {"hw_rev": hw}}
    assert set(members(server, dep_id)) == {inside_id}
    inventory(outside, hw_rev=hw)  # matches, but not in the group
    assert outside.next().status_code == 204 and outside_id not in members(server, dep_id)

    # matching before it is moved into the group by an import (no deployment logic there): its polls are idle
    # ones the shortcut answers, until the group matches too; then the shortcut must not say "nothing"
    host, host2 = f"flt-{uuid.uuid4().hex[:8]}", f"flt-{uuid.uuid4().hex[:8]}"
    moved, moved_id = accepted(server, hostname=host)
    inventory(moved, "PUT", hw_rev=hw)
    stays, stays_id = accepted(server, hostname=host2)
    inventory(stays, "PUT", hw_rev="rev-other")
    for dev in (moved, stays):
        assert dev.next().status_code == 204 and dev.next().status_code == 204
    assert {m["device_id"] for m in import_hosts(server, g, host, host2)["matched"]} == {moved_id, stays_id}
    r = moved.next()
    assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
    assert stays.next().status_code == 204 and unmatched.next().status_code == 204
    assert set(members(server, dep_id)) == {inside_id, moved_id}
    assert set_status(server, dep_id, status="closed").status_code == 204


def test_filter_deployment_rules(server: Server, release: str) -> None:  # noqa: F811
    hw = f"rev-{uuid.uuid4().hex[:8]}"
    dev, dev_id = accepted(server)
    inventory(dev, hw_rev=hw)
    with server.admin() as a:
        for body in ({"filter": {}}, {"filter": {f"a{i}": "x" for i in range(9)}}, {"filter": {"": "x"}},
                     {"filter": {"hw_rev": 3}}, {"filter": {"hw_rev": hw}, "all_devices": True},
                     {"filter": {"hw_rev": hw}, "devices": [dev_id]}):
            r = a.post(DEPLOYMENTS, json={"name": "bad", "artifact_name": release, **body})
            assert r.status_code == 400, (body, r.text)
        r = a.post(DEPLOYMENTS, json={"name": "none", "artifact_name": release, "filter": {"hw_rev": "rev-nobody"}})
        assert r.status_code == 400 and "no accepted devices" in r.json()["error"]
    # not dynamic: resolved now, nobody joins later
    dep_id = deploy(server, name="static-filter", artifact_name=release, filter={"hw_rev": hw})
    assert set(members(server, dep_id)) == {dev_id} and get(server, dep_id)["dynamic"] is False
    late, late_id = accepted(server)
    inventory(late, hw_rev=hw)
    assert late.next().status_code == 204 and late_id not in members(server, dep_id)
