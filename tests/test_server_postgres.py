"""The update server on a real PostgreSQL (the session's throwaway cluster, tests/conftest.py): what only
PostgreSQL shows. The device, deployment, configuration and token tests run on both databases through the
``db_url`` fixture parameter; here: restarts on the same database, races between server processes under READ
COMMITTED, migrations from several processes at once, backup and restore, the log quota."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from .conftest import BUILD_PY, REPO, create_database
from .server_helpers import Device, Server, deploy, preauthorized_devices, write_artifact
from .test_server_deployments import release  # noqa: F401 - fixture (on this module's server)


@pytest.fixture(scope="module", name="server")
def pg_server(postgres: str, tmp_path_factory: pytest.TempPathFactory,
              keys: dict[str, tuple[Path, Path]]) -> Iterator[Server]:
    s = Server(tmp_path_factory.mktemp("server"), "--release-key", str(keys["ec"][1]),
               "--release-key", str(keys["rsa"][1]), db_url=create_database(postgres)).start()
    yield s
    s.stop()


def test_restart_on_postgres(server: Server) -> None:
    """Migrations at start are idempotent: a restart on the same database keeps the devices."""
    dev = Device(server)
    device_id = dev.accept()
    server.stop()
    server.start()
    assert dev.next().status_code == 204
    with server.admin() as a:
        assert a.get(f"/api/management/v2/devauth/devices/{device_id}").json()["status"] == "accepted"


# ---------------------------------------------------------------------------------------------------------
# Races: several server processes on one PostgreSQL (READ COMMITTED), clients hitting them at the same moment


def _sibling(server: Server, base: Path, *args: str, workers: int) -> Server:
    """Another server process on the same database and storage (secrets, artifacts), as behind a load balancer."""
    s = Server(base, *args, db_url=server.db_url, workers=workers)
    s.storage = server.storage
    return s.start()


def test_final_reports_at_the_same_moment_close_the_deployment(server: Server, release: str) -> None:  # noqa: F811
    """Two devices' final reports interleaved on two connections, the way two server processes run them under
    READ COMMITTED: the first has set its device final but not committed when the second does the same. The
    second must wait for the first (the deployment row lock) and then find nobody left: the deployment
    finishes. Without the lock each transaction sees the other device still active and it never finishes."""
    import sqlalchemy as sa

    from ota_server import deployments as rollout
    from ota_server.db import normalize_url

    (_, a_id), (_, b_id) = preauthorized_devices(server, 2)
    dep_id = deploy(server, name="pair", artifact_name=release, devices=[a_id, b_id])
    engine = sa.create_engine(normalize_url(server.db_url))
    try:
        with engine.connect() as c1, engine.connect() as c2:
            first = c1.begin()
            rollout.set_device_final(c1, dep_id, a_id, "success", None)

            def second() -> None:
                with c2.begin():
                    rollout.set_device_final(c2, dep_id, b_id, "failure", None)

            t = threading.Thread(target=second)
            t.start()
            t.join(1.0)
            waited = t.is_alive()
            first.commit()
            t.join(30)
    finally:
        engine.dispose()
    assert waited, "the second final report did not wait for the first one's transaction"
    assert server.query("SELECT status FROM deployments WHERE id = :d", d=dep_id) == [("finished",)]


def test_devices_joining_a_dynamic_deployment_at_the_same_moment(server: Server, release: str) -> None:  # noqa: F811
    """Devices join one dynamic deployment on two connections, the way two server processes run their polls
    under READ COMMITTED: the second join waits for the first (the deployment row lock). Two devices at once:
    both are in it, the counts exact. The same device twice at once (two polls on two workers): added once."""
    import sqlalchemy as sa

    from ota_server import deployments as rollout
    from ota_server.db import normalize_url

    devs = preauthorized_devices(server, 5)
    (a_id, b_id), joiners = [i for _, i in devs[:2]], devs[2:]
    with server.admin() as adm:
        for device_id in (a_id, b_id):
            assert adm.put(f"/api/management/v1/inventory/devices/{device_id}/group",
                           json={"group": "pg-dynamic"}).status_code == 204
    dep_id = deploy(server, name="dyn-race", artifact_name=release, group="pg-dynamic", dynamic=True)
    (c, c_id), (d, d_id), (e, e_id) = joiners
    engine = sa.create_engine(normalize_url(server.db_url))
    try:
        with engine.begin() as conn:  # into the group behind the API's back (as an inventory import does)
            conn.execute(sa.text("UPDATE devices SET group_name = 'pg-dynamic' WHERE id IN (:c, :d, :e)"),
                         {"c": c_id, "d": d_id, "e": e_id})
        for first_id, second_id, expected in ((c_id, d_id, (True, True)), (e_id, e_id, (True, False))):
            got: list[bool] = []
            with engine.connect() as c1, engine.connect() as c2:
                first = c1.begin()
                got.append(rollout.join(c1, dep_id, first_id))

                def second(device_id: str = second_id, got: list[bool] = got) -> None:
                    with c2.begin():
                        got.append(rollout.join(c2, dep_id, device_id))

                t = threading.Thread(target=second)
                t.start()
                t.join(1.0)
                waited = t.is_alive()
                first.commit()
                t.join(30)
            assert waited, "the second join did not wait for the first one's transaction"
            assert tuple(got) == expected
    finally:
        engine.dispose()
    rows = server.query("SELECT device_id FROM deployment_devices WHERE deployment_id = :d", d=dep_id)
    assert sorted(r[0] for r in rows) == sorted([a_id, b_id, c_id, d_id, e_id])
    with server.admin() as adm:
        doc = adm.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()
    assert doc["device_count"] == 5 and doc["phases"][0]["device_count"] == 5
    for dev in (c, d, e):
        assert dev.next().json()["id"] == dep_id
    with server.admin() as adm:
        assert adm.put(f"/api/management/v1/deployments/deployments/{dep_id}/status",
                       json={"status": "aborted"}).status_code == 204


def test_unique_index_behind_the_artifact_conflict(server: Server) -> None:
    """Two transactions insert the same (name, device type, source): the second waits for the first to commit,
    then fails with a unique violation (the upload turns it into 409)."""
    import sqlalchemy as sa

    from ota_server.db import normalize_url

    engine = sa.create_engine(normalize_url(server.db_url))
    art = "INSERT INTO artifacts (id, name, description, device_types, size, sha256, signed, info, created) " \
          "VALUES (:id, 'uq-1', '', '[\"qemu-virt\"]', 1, '', false, '{}', 0)"
    target = "INSERT INTO artifact_targets (name, device_type, source, artifact_id) VALUES ('uq-1', 'qemu-virt', '', :id)"
    errors: list[Exception] = []
    try:
        with engine.connect() as c1, engine.connect() as c2:
            first = c1.begin()
            c1.execute(sa.text(art), {"id": "uq-a"})
            c1.execute(sa.text(target), {"id": "uq-a"})

            def second() -> None:
                try:
                    with c2.begin():
                        c2.execute(sa.text(art), {"id": "uq-b"})
                        c2.execute(sa.text(target), {"id": "uq-b"})
                except sa.exc.IntegrityError as e:
                    errors.append(e)

            t = threading.Thread(target=second)
            t.start()
            t.join(1.0)
            waited = t.is_alive()
            first.commit()
            t.join(30)
        assert waited and len(errors) == 1
        assert server.query("SELECT id FROM artifacts WHERE name = 'uq-1'") == [("uq-a",)]
        with engine.begin() as c:
            c.execute(sa.text("DELETE FROM artifacts WHERE name = 'uq-1'"))
    finally:
        engine.dispose()



def test_200_devices_finish_one_deployment_at_the_same_moment(server: Server, release: str,  # noqa: F811
                                                              tmp_path: Path) -> None:
    """Two more server processes (three workers each) on the same database; 200 devices report their final
    status released by one barrier: the deployment closes exactly once with exact statistics."""
    extra = [_sibling(server, tmp_path / f"s{i}", workers=3) for i in range(2)]
    try:
        fleet = preauthorized_devices(server, 200)
        dep_id = deploy(server, name="stampede", artifact_name=release, devices=[i for _, i in fleet])
        for n, (dev, _) in enumerate(fleet):  # spread the devices over the three servers
            target = (server, *extra)[n % 3]
            dev.server = target
            dev.http = target.client()

        def start(item: tuple[Device, str]) -> None:
            dev, _ = item
            assert dev.next().status_code == 200
            for st in ("downloading", "installing", "rebooting"):
                assert dev.status(dep_id, st).status_code == 204

        with ThreadPoolExecutor(32) as pool:
            list(pool.map(start, fleet))
        barrier = threading.Barrier(len(fleet))

        def finish(n: int) -> int:
            dev, _ = fleet[n]
            final = "failure" if n % 4 == 0 else "success"
            barrier.wait()
            return dev.status(dep_id, final).status_code

        with ThreadPoolExecutor(len(fleet)) as pool:
            codes = list(pool.map(finish, range(len(fleet))))
        assert codes == [204] * len(fleet)
        with server.admin() as a:
            doc = a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()
            s = a.get(f"/api/management/v1/deployments/deployments/{dep_id}/statistics").json()
        assert doc["status"] == "finished" and doc["finished"], doc
        assert s["success"] == 150 and s["failure"] == 50 and sum(s.values()) == 200, s
        (active,) = server.query("SELECT count(*) FROM deployment_devices WHERE deployment_id = :d AND active",
                                 d=dep_id)[0]
        assert active == 0
    finally:
        for s in extra:
            s.stop()


def test_concurrent_uploads_of_one_artifact(server: Server, keys: dict[str, tuple[Path, Path]],
                                            tmp_path: Path, run_cli: Any) -> None:
    """The same artifact uploaded through two server processes at once: one 201, the others 409."""
    other = _sibling(server, tmp_path / "s2", "--release-key", str(keys["ec"][1]), workers=2)
    try:
        art = write_artifact(run_cli, tmp_path / "race.mender", "race-1", ("qemu-virt",), key=keys["ec"][0])
        targets = [server, other] * 3
        barrier = threading.Barrier(len(targets))

        def send(s: Server) -> int:
            body = art.read_bytes()
            with s.admin() as a:
                barrier.wait()
                return a.post("/api/management/v1/deployments/artifacts",
                              files={"artifact": ("race.mender", body)}).status_code

        with ThreadPoolExecutor(len(targets)) as pool:
            codes = sorted(pool.map(send, targets))
        assert codes == [201] + [409] * (len(targets) - 1), codes
        with server.admin() as a:
            assert [x["name"] for x in a.get("/api/management/v1/deployments/artifacts",
                                               params={"name": "race-1"}).json()] == ["race-1"]
    finally:
        other.stop()


# ---------------------------------------------------------------------------------------------------------
# Operations: migrations from several processes at once, backup and restore


def test_servers_starting_at_once_migrate_once(postgres: str, tmp_path: Path) -> None:
    """Four ``build.py server migrate`` on a new database at the same moment: one migrates, the others wait
    for its advisory lock and find nothing to do; none fails."""
    url = create_database(postgres, "ota_migrate")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, str(BUILD_PY), "server", "migrate", "--db", url], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    assert sorted("migrated from (empty)" in out for out, _ in outs) == [False] * 3 + [True], outs
    s = Server(tmp_path, db_url=url)
    from ota_server.db import head_revision

    assert s.query("SELECT version_num FROM alembic_version") == [(head_revision(),)]


def test_backup_and_restore_on_postgres(server: Server, postgres: str, tmp_path: Path,
                                        keys: dict[str, tuple[Path, Path]], run_cli: Any) -> None:
    """pg_dump of a running server (another process on the module's database, which is not stopped), restored
    with pg_restore into a new database: a new server on it serves the device."""
    from .test_server_ops import backup_and_restore

    src = _sibling(server, tmp_path / "src", "--release-key", str(keys["ec"][1]), workers=1)
    try:
        backup_and_restore(src, tmp_path, keys, run_cli, create_database(postgres, "ota_restored"))
    finally:
        src.stop()


def test_log_quota_and_non_finite_numbers_on_postgres(server: Server, release: str) -> None:  # noqa: F811
    """The log quota (the counting query, the row lock) and the refusal of NaN/Infinity, which PostgreSQL's
    JSON type does not store."""
    from .server_helpers import Device, deploy

    dev = Device(server)
    device_id = dev.accept()
    dep = deploy(server, name="pg-log", artifact_name=release, devices=[device_id])
    url = f"/api/devices/v1/deployments/device/deployments/{dep}/log"
    big = {"messages": [{"timestamp": f"t{i}", "level": "info", "message": f"line {i} " + "x" * 1000}
                        for i in range(1500)]}  # 1.5 MB: over the default 1 MiB
    assert dev.http.put(url, headers=dev.headers, json=big).status_code == 204
    assert dev.http.put(url, headers=dev.headers, json={"messages": [
        {"timestamp": "t", "level": "info", "message": "more"}]}).status_code == 413
    with server.admin() as a:
        text = a.get(f"/api/management/v1/deployments/deployments/{dep}/devices/{device_id}/log").text
        assert text.startswith("t0 info: line 0 ") and "line 1499 " in text.splitlines()[-1] and "log quota" in text
        assert a.get(f"/ui/deployments/{dep}/devices/{device_id}/log").status_code == 200
    r = dev.http.put("/api/devices/v1/inventory/device/attributes", headers={**dev.headers,
                     "Content-Type": "application/json"}, content=b'[{"name": "x", "value": Infinity}]')
    assert r.status_code == 400 and "finite" in r.json()["error"], r.text


def test_hot_reads_use_one_autocommit_connection_and_survive_a_lost_one(postgres: str) -> None:
    """``Database.fetch`` keeps one connection per thread in autocommit mode: each read sees what other
    connections committed since (no transaction held open between reads), and when that connection is lost
    (its backend terminated, as when the database restarts) the read is asked again on a new one."""
    import psycopg

    from ota_server.db import Database

    url = create_database(postgres)
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute("CREATE TABLE hot (n integer)")
        db = Database(url)
        try:
            assert db.fetch("SELECT count(*) FROM hot", ()) == [(0,)]
            (pid,), = db.fetch("SELECT pg_backend_pid()", ())
            admin.execute("INSERT INTO hot VALUES (1)")
            assert db.fetch("SELECT count(*) FROM hot", ()) == [(1,)]  # the commit of another connection
            assert db.fetch("SELECT pg_backend_pid()", ()) == [(pid,)]  # the same connection
            state = admin.execute("SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()
            assert state == ("idle",)  # not "idle in transaction": nothing held open between reads
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
            assert db.fetch("SELECT count(*) FROM hot WHERE n = ?", (1,)) == [(1,)]
            assert db.fetch("SELECT pg_backend_pid()", ()) != [(pid,)]
        finally:
            db.dispose()
