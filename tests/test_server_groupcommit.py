"""Group commits of device reports (:mod:`ota_server.groupcommit`), on SQLite and PostgreSQL: many reports at
once are all acknowledged and all stored with exact statistics; a report that must fail inside a shared batch
fails alone; batches of two workers cannot deadlock; a report answered 204 survives the server being killed
with SIGKILL right after the answer."""

from __future__ import annotations

import asyncio
import os
import signal
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .server_helpers import Device, Server, deploy, preauthorized_devices
from .test_server_deployments import release  # noqa: F401 - fixture (on this module's server)

STEPS = ("downloading", "installing", "rebooting")
LAST: list[Any] = [None]



def _open_and_aborted(server: Server, artifact: str) -> tuple[list[tuple[Device, str]], str, str]:
    """Four devices: a, c, d in an open deployment (handed out; d already reported success), b in an aborted
    one. Returns (the devices, the open deployment, the aborted one)."""
    fleet = preauthorized_devices(server, 4)
    (_, a), (_, b), (_, c), (_, d) = fleet
    open_dep = deploy(server, name="open", artifact_name=artifact, devices=[a, c, d])
    aborted = deploy(server, name="aborted", artifact_name=artifact, devices=[b])
    _handed_out(server, [fleet[0], fleet[2], fleet[3]], open_dep)
    with server.admin() as adm:
        r = adm.put(f"/api/management/v1/deployments/deployments/{aborted}/status", json={"status": "aborted"})
        assert r.status_code == 204, r.text
    assert fleet[3][0].status(open_dep, "success").status_code == 204
    return fleet, open_dep, aborted


def _handed_out(server: Server, fleet: list[tuple[Device, str]], dep_id: str) -> None:
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda d: d[0].next(), fleet))
    assert [r.status_code for r in answers] == [200] * len(fleet)
    assert {r.json()["id"] for r in answers} == {dep_id}


def _statistics(server: Server, dep_id: str) -> dict[str, int]:
    with server.admin() as a:
        return {k: v for k, v in a.get(f"/api/management/v1/deployments/deployments/{dep_id}/statistics")
                .json().items() if v}


def test_many_concurrent_reports_are_all_acknowledged_and_stored(server: Server, release: str) -> None:  # noqa: F811
    """60 devices report their whole update at once from 24 threads: every report is answered 204, every one is
    in the database, the statistics count each device once and the deployment finishes."""
    fleet = preauthorized_devices(server, 60)
    dep_id = deploy(server, name="many reports", artifact_name=release, devices=[i for _, i in fleet])
    _handed_out(server, fleet, dep_id)
    failing = {i for _, i in fleet[:9]}

    def device(d: tuple[Device, str]) -> list[int]:
        dev, device_id = d
        final = "failure" if device_id in failing else "success"
        return [dev.status(dep_id, s, f"{s} of {device_id}").status_code for s in (*STEPS, final)]

    with ThreadPoolExecutor(24) as pool:
        codes = [c for answers in pool.map(device, fleet) for c in answers]
    assert codes == [204] * (4 * len(fleet))
    assert _statistics(server, dep_id) == {"success": 51, "failure": 9}
    rows = server.query("SELECT device_id, status, substate FROM deployment_devices WHERE deployment_id = :d",
                        d=dep_id)
    assert sorted(rows) == sorted((i, "failure" if i in failing else "success",
                                   f"{'failure' if i in failing else 'success'} of {i}") for _, i in fleet)
    with server.admin() as a:
        assert a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()["status"] == "finished"


def _run_batch(server: Server, ops: list[tuple[str, str, Callable[[Any], Any]]]) -> tuple[list[Any], int]:
    """Run ``ops`` ((deployment id, device id, fn)) through one in-process committer on the server's database,
    queued together so that they share one batch. Returns (each result or exception, batches committed); the
    committer is kept in ``LAST`` for the tests that look at it."""
    from ota_server.db import Database
    from ota_server.groupcommit import GroupCommitter

    db = Database(server.db_url)
    try:
        committer = LAST[0] = GroupCommitter(db)

        async def main() -> list[Any]:
            return await asyncio.gather(*(committer.run(d, dev, fn) for d, dev, fn in ops), return_exceptions=True)

        return asyncio.run(main()), committer.batches
    finally:
        db.dispose()


def test_a_report_that_must_fail_fails_alone_in_its_batch(server: Server, release: str) -> None:  # noqa: F811
    """In one shared transaction: a report to an aborted deployment (409), a different final status after a
    final one (400), a report of a deployment that is not the device's (404) and an operation that breaks
    (500) each get their own error and leave nothing behind — not even the outcome they counted — while the
    reports around them are stored and committed."""
    from ota_server import deployments as rollout
    from ota_server.db import after_commit
    from ota_server.errors import APIError

    fleet, open_dep, aborted = _open_and_aborted(server, release)
    (_, a), (_, b), (_, c), (_, d) = fleet
    counted: list[str] = []

    def report(dep: str, dev: str, status: str) -> tuple[str, str, Callable[[Any], Any]]:
        return dep, dev, lambda conn: rollout.report_status(conn, dep, dev, status, f"batch {status}")

    def breaks(conn: Any) -> None:
        rollout.report_status(conn, open_dep, c, "installing", "never stored")
        after_commit(conn, lambda: counted.append("broken"))
        raise RuntimeError("a bug in one operation")

    def counts(conn: Any) -> rollout.Report:
        after_commit(conn, lambda: counted.append("stored"))
        return rollout.report_status(conn, open_dep, a, "installing", "batch installing")

    results, batches = _run_batch(server, [
        report(open_dep, a, "downloading"), report(aborted, b, "downloading"), report(open_dep, d, "failure"),
        report(aborted, c, "downloading"), (open_dep, c, breaks), report(open_dep, c, "downloading"),
        (open_dep, a, counts)])
    assert batches == 1
    assert LAST[0].retried == 1  # run without savepoints first; the failures made it run again with them
    ok_a, conflict, refused, missing, broken, ok_c, ok_a2 = results
    assert (ok_a.outcome, ok_c.outcome, ok_a2.outcome) == ("stored", "stored", "stored")
    assert isinstance(conflict, APIError) and conflict.status == 409
    assert isinstance(refused, APIError) and refused.status == 400
    assert isinstance(missing, APIError) and missing.status == 404
    assert isinstance(broken, RuntimeError)
    assert counted == ["stored"]
    rows = dict((dev, (st, sub)) for dev, st, sub in server.query(
        "SELECT device_id, status, substate FROM deployment_devices WHERE deployment_id = :d", d=open_dep))
    assert rows[a] == ("installing", "batch installing")
    assert rows[c] == ("downloading", "batch downloading")
    assert rows[d][0] == "success"
    assert server.query("SELECT status FROM deployment_devices WHERE device_id = :d", d=b) == [("aborted",)]


def test_a_batch_without_failures_runs_once_without_savepoints(server: Server, release: str) -> None:  # noqa: F811
    """Progress reports of several devices in one batch: one try, one commit, each report stored."""
    from ota_server import deployments as rollout

    fleet = preauthorized_devices(server, 5)
    dep_id = deploy(server, name="clean batch", artifact_name=release, devices=[i for _, i in fleet])
    _handed_out(server, fleet, dep_id)
    results, batches = _run_batch(server, [
        (dep_id, i, lambda conn, i=i, s=s: rollout.report_status(conn, dep_id, i, s, f"{s} {i}"))
        for _, i in fleet for s in STEPS])
    assert [r.outcome for r in results] == ["stored"] * 15
    assert (batches, LAST[0].retried) == (1, 0)
    rows = server.query("SELECT device_id, status, substate FROM deployment_devices WHERE deployment_id = :d",
                        d=dep_id)
    assert sorted(rows) == sorted((i, "rebooting", f"rebooting {i}") for _, i in fleet)
    assert _statistics(server, dep_id) == {"rebooting": 5}


def _run_reports(server: Server, reports: list[tuple[str, str, str, str | None]]) -> tuple[list[Any], int]:
    """Status reports ((deployment id, device id, status, substate)) through one in-process committer's report
    path with set-based statements (:mod:`ota_server.reportbatch`; on SQLite too), queued together so that they
    share one batch: as :func:`_run_batch`."""
    from ota_server.db import Database
    from ota_server.groupcommit import GroupCommitter

    db = Database(server.db_url)
    try:
        committer = LAST[0] = GroupCommitter(db)
        committer.set_based = True

        async def main() -> list[Any]:
            return await asyncio.gather(*(committer.report(*r) for r in reports), return_exceptions=True)

        return asyncio.run(main()), committer.batches
    finally:
        db.dispose()


def test_a_batch_of_progress_reports_is_stored_with_a_few_statements(server: Server, release: str) -> None:  # noqa: F811
    """40 devices each report three steps, and a repeat with a new substate, in one batch: all 160 reports are
    stored as reports one by one would have left them, with three statements (one read that locks the rows,
    the deployment marked started once, one write), not two per report. (No device asked ``next`` first,
    which would have started the deployment.)"""
    fleet = preauthorized_devices(server, 40)
    dep_id = deploy(server, name="set-based batch", artifact_name=release, devices=[i for _, i in fleet])
    with server.admin() as a:
        assert a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()["status"] == "pending"
    reports = [(dep_id, i, s, f"{s} {i}") for _, i in fleet for s in STEPS]
    reports += [(dep_id, i, "rebooting", f"still rebooting {i}") for _, i in fleet]
    results, batches = _run_reports(server, reports)
    assert [r.outcome for r in results] == ["stored"] * 120 + ["ignored"] * 40
    assert (batches, LAST[0].retried, LAST[0].statements) == (1, 0, 3)
    rows = server.query("SELECT device_id, status, substate, started IS NOT NULL FROM deployment_devices "
                        "WHERE deployment_id = :d", d=dep_id)
    assert sorted(rows) == sorted((i, "rebooting", f"still rebooting {i}", True) for _, i in fleet)
    assert _statistics(server, dep_id) == {"rebooting": 40}
    with server.admin() as a:
        assert a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()["status"] == "inprogress"


def test_bad_reports_in_a_set_based_batch_fail_alone(server: Server, release: str) -> None:  # noqa: F811
    """One batch of good reports with bad ones among them: a report to an aborted deployment (409), a different
    final status after a final one (400), a deployment that is not the device's (404), each answered with its
    own error, without rolling back the batch (no second try); the good ones around them are stored, including
    a device that moves forward and then finishes in the same batch (its success counted once, the deployment's
    statistics exact)."""
    from ota_server.errors import APIError

    fleet, open_dep, aborted = _open_and_aborted(server, release)
    (_, a), (_, b), (_, c), (_, d) = fleet
    results, batches = _run_reports(server, [
        (open_dep, a, "downloading", "a downloading"), (aborted, b, "downloading", "never"),
        (open_dep, d, "failure", "never"), (aborted, c, "downloading", "never"),
        (open_dep, c, "downloading", "c downloading"), (open_dep, a, "installing", "a installing"),
        (open_dep, c, "installing", "c installing"), (open_dep, c, "success", "c done"),
        (open_dep, c, "rebooting", "late"), (open_dep, d, "success", "repeat")])
    assert (batches, LAST[0].retried) == (1, 0)
    a1, conflict, refused, missing, c1, a2, c2, c3, c_late, d_repeat = results
    assert [r.outcome for r in (a1, c1, a2, c2, c3, c_late, d_repeat)] == [
        "stored", "stored", "stored", "stored", "final", "ignored", "ignored"]
    assert isinstance(conflict, APIError) and conflict.status == 409
    assert isinstance(refused, APIError) and refused.status == 400
    assert isinstance(missing, APIError) and missing.status == 404
    rows = dict((dev, (st, sub)) for dev, st, sub in server.query(
        "SELECT device_id, status, substate FROM deployment_devices WHERE deployment_id = :d", d=open_dep))
    assert rows == {a: ("installing", "a installing"), c: ("success", "c done"), d: ("success", None)}
    assert server.query("SELECT status, substate FROM deployment_devices WHERE device_id = :d", d=b) == [
        ("aborted", None)]
    assert _statistics(server, open_dep) == {"installing": 1, "success": 2}


def test_batches_of_two_workers_cannot_deadlock(server: Server, release: str) -> None:  # noqa: F811
    """Two workers' batches at the same moment, each with final reports of one deployment: worker 1's batch has
    devices A and B (A's final report locks the deployment row), worker 2's only B. Were device rows locked
    report by report, worker 2 would hold B waiting for the deployment row while worker 1 holds the deployment
    row waiting for B: PostgreSQL's deadlock detector would fail one batch. Each batch locks all its device rows
    first, in (deployment, device) order, so worker 2 waits for worker 1's commit and both succeed."""
    import sqlalchemy as sa

    from ota_server import deployments as rollout
    from ota_server.models import deployment_devices as dd

    fleet = preauthorized_devices(server, 3)
    a, b, c = sorted(i for _, i in fleet)  # a batch runs its reports in device id order
    dep_id = deploy(server, name="two workers", artifact_name=release, devices=[a, b, c])
    _handed_out(server, fleet, dep_id)
    w0_has_deployment, w1_has_b = threading.Event(), threading.Event()

    def w0_first(conn: Any) -> Any:  # A's final report: A's row, then the deployment's row locked
        report = rollout.report_status(conn, dep_id, a, "success", "worker 0")
        w0_has_deployment.set()
        w1_has_b.wait(1.5)  # (with the batch's own lock first, worker 2 never gets B: go on after a while)
        return report

    def w1_first(conn: Any) -> Any:  # B's row, then (in after_final) the deployment's row
        w0_has_deployment.wait(1.5)
        conn.execute(sa.select(dd.c.device_id).where(dd.c.deployment_id == dep_id, dd.c.device_id == b)
                     .with_for_update())
        w1_has_b.set()
        return rollout.report_status(conn, dep_id, b, "success", "worker 1")

    def final(device_id: str) -> Callable[[Any], Any]:
        return lambda conn: rollout.report_status(conn, dep_id, device_id, "success", "worker 0")

    out: dict[int, tuple[list[Any], int]] = {}

    def worker(me: int, ops: list[tuple[str, str, Callable[[Any], Any]]]) -> None:
        out[me] = _run_batch(server, ops)

    threads = [threading.Thread(target=worker, args=(0, [(dep_id, a, w0_first), (dep_id, b, final(b))])),
               threading.Thread(target=worker, args=(1, [(dep_id, b, w1_first)]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [type(r).__name__ for r in out[0][0] + out[1][0]] == ["Report"] * 3, out
    assert (out[0][1], out[1][1]) == (1, 1)
    assert _statistics(server, dep_id) == {"success": 2, "pending": 1}


def test_an_acknowledged_report_survives_sigkill(server: Server, release: str) -> None:  # noqa: F811
    """Devices report at once; as soon as some of the reports were answered 204 the server process group is
    killed with SIGKILL (no shutdown, no flush). Every report answered 204 is in the database afterwards."""
    fleet = preauthorized_devices(server, 40)
    dep_id = deploy(server, name="crash", artifact_name=release, devices=[i for _, i in fleet])
    _handed_out(server, fleet, dep_id)
    acked: list[str] = []
    lock = threading.Lock()
    enough = threading.Event()

    def device(d: tuple[Device, str]) -> None:
        dev, device_id = d
        try:
            if dev.status(dep_id, "downloading", f"crash {device_id}").status_code == 204:
                with lock:
                    acked.append(device_id)
                    if len(acked) >= 10:
                        enough.set()
        except Exception:  # noqa: BLE001 - cut off by the kill: not acknowledged, nothing to check
            pass

    threads = [threading.Thread(target=device, args=(d,)) for d in fleet]
    for t in threads:
        t.start()
    assert enough.wait(60)
    assert server.proc is not None
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.proc.wait(10)
    with lock:
        answered = list(acked)
    for t in threads:
        t.join(30)
    try:
        rows = dict((dev, (st, sub)) for dev, st, sub in server.query(
            "SELECT device_id, status, substate FROM deployment_devices WHERE deployment_id = :d", d=dep_id))
        assert len(answered) >= 10
        for device_id in answered:
            assert rows[device_id] == ("downloading", f"crash {device_id}"), device_id
    finally:
        server.start()

