""""Last seen" written in batches, and the fleet gauges' cost, against the app in this process (so that a
SQLAlchemy event listener on the server's own engine counts the statements it sends), on SQLite and PostgreSQL.

The story of the batching: a fleet polls all the time, and a write per poll would make the hottest request a
write (an fsync on SQLite). Each request only notes the device; a flush writes the batch in one UPDATE."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from ota_server import metrics
from ota_server.apitokens import hash_token
from ota_server.app import create_app
from ota_server.db import Database, migrate
from ota_server.lastseen import LastSeen
from ota_server.models import devices
from ota_server.settings import Settings

from .server_helpers import ADMIN_TOKEN, Device

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(name="url")
def url_fixture(db_url: str | None, tmp_path: Path) -> str:
    """The module's PostgreSQL database, or a SQLite file of the test; migrated."""
    url = db_url or f"sqlite:///{tmp_path}/ota.db"
    migrate(url)
    return url


class InProcess:
    """What :class:`~tests.server_helpers.Device` needs of a server, served by the app in this process: the
    devices share the client that runs the app's lifespan (and so its flusher)."""

    def __init__(self, app: FastAPI, main: TestClient) -> None:
        self.app = app
        self.main = main

    def client(self) -> TestClient:
        return self.main

    def admin(self) -> contextlib.AbstractContextManager[TestClient]:
        return contextlib.nullcontext(TestClient(self.app, headers=ADMIN))  # not entered: no second lifespan


def make_app(url: str, storage: Path, **settings: Any) -> FastAPI:
    return create_app(Settings(db_url=url, storage=storage, admin_token_sha256=hash_token(ADMIN_TOKEN), **settings))


class Statements:
    """The statements the engine sends (SQLAlchemy's ``before_cursor_execute``), the UPDATEs apart."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.sent: list[str] = []
        sa.event.listen(engine, "before_cursor_execute", self._seen)

    def _seen(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.sent.append(" ".join(statement.split()))

    @property
    def updates(self) -> list[str]:
        return [s for s in self.sent if s.upper().startswith(("UPDATE", "WITH")) and " UPDATE " in f" {s.upper()}"]

    def close(self) -> None:
        sa.event.remove(self.engine, "before_cursor_execute", self._seen)


@contextlib.contextmanager
def counting(engine: sa.Engine) -> Iterator[Statements]:
    s = Statements(engine)
    try:
        yield s
    finally:
        s.close()


def last_seen(db: Database, ids: list[str]) -> dict[str, float | None]:
    with db.read() as c:
        return dict(c.execute(sa.select(devices.c.id, devices.c.last_seen).where(devices.c.id.in_(ids))).all())


def test_polls_are_written_in_batches(url: str, tmp_path: Path) -> None:
    """100 polls of 20 devices (most answered by the poll shortcut) cost a few UPDATEs, not 100, and every
    device's last_seen moves to the time of its polls once a flush interval has passed."""
    interval = 1.5
    app = make_app(url, tmp_path, last_seen_flush_seconds=interval)
    db: Database = app.state.ctx.db
    with TestClient(app) as main:
        server = InProcess(app, main)
        fleet = [Device(server, "ed25519") for _ in range(20)]  # type: ignore[arg-type]
        ids = [d.accept() for d in fleet]
        for d in fleet:
            assert d.next("vv-1.0").status_code == 204  # the first poll records the provides (a write of its own)
        time.sleep(interval + 0.5)
        before = last_seen(db, ids)
        assert all(t is not None for t in before.values()), before
        t0 = time.time()
        with counting(db.engine) as sql:
            for _ in range(5):
                for d in fleet:
                    assert d.next("vv-1.0").status_code == 204
            elapsed = time.time() - t0
            after = last_seen(db, ids)  # right after the polls: at most the flushes that came in between
            time.sleep(interval * 2 + 0.5)
        flushed = last_seen(db, ids)
    assert all(t is not None and t >= t0 for t in flushed.values()), (t0, flushed)
    assert all(t is not None and t <= time.time() for t in flushed.values())
    updates = sql.updates
    assert updates and all("last_seen" in u for u in updates), updates  # a poll itself writes nothing
    # one flush per interval that had something to write (plus the one running when the polls began)
    assert len(updates) <= elapsed / interval + 2, (len(updates), elapsed)
    assert len(updates) < 10
    assert sum(t is not None and t >= t0 for t in after.values()) <= sum(t >= t0 for t in flushed.values())  # type: ignore[operator]


def test_every_device_request_counts_and_shutdown_writes_the_rest(url: str, tmp_path: Path) -> None:
    """Configuration, inventory, a v1 poll, a log and a status report each note the device; with a flush
    interval longer than the test, only the flush at shutdown writes them."""
    app = make_app(url, tmp_path, last_seen_flush_seconds=3600)
    db: Database = app.state.ctx.db
    with TestClient(app) as main:
        server = InProcess(app, main)
        fleet = [Device(server, "ed25519") for _ in range(5)]  # type: ignore[arg-type]
        ids = [d.accept() for d in fleet]
        config, inventory, poll, log, status = fleet
        assert main.get("/api/devices/v1/deviceconfig/configuration", headers=config.headers).status_code == 200
        r = main.patch("/api/devices/v1/inventory/device/attributes", headers=inventory.headers,
                       json=[{"name": "ipv4", "value": "10.0.0.2"}])
        assert r.status_code == 200
        r = main.get("/api/devices/v1/deployments/device/deployments/next", headers=poll.headers,
                     params={"artifact_name": "vv-1.0", "device_type": "qemu-virt"})
        assert r.status_code == 204
        nowhere = str(uuid.uuid4())
        r = main.put(f"/api/devices/v1/deployments/device/deployments/{nowhere}/log", headers=log.headers,
                     json={"messages": [{"timestamp": "2024-05-01T12:00:00Z", "level": "info", "message": "hi"}]})
        assert r.status_code == 404  # not its deployment, but the device is alive
        assert status.status(nowhere, "downloading").status_code == 404
        assert set(last_seen(db, ids).values()) == {None}  # nothing written yet: the requests are only noted
        assert len(app.state.ctx.last_seen) == 5
    written = last_seen(db, ids)
    assert all(t is not None for t in written.values()), written


def test_an_auth_request_counts_only_when_signed_by_the_accepted_key(url: str, tmp_path: Path) -> None:
    """A device that re-authenticates (its token expired) is seen; a request for its identity signed by another
    key is not the device (anyone can send one) and must not hide that the device went silent."""
    app = make_app(url, tmp_path, last_seen_flush_seconds=3600)
    db: Database = app.state.ctx.db
    with TestClient(app) as main:
        server = InProcess(app, main)
        device = Device(server, "ed25519")  # type: ignore[arg-type]
        impostor = Device(server, "ed25519", identity=device.identity)  # type: ignore[arg-type]
        device_id = device.accept()
        seen = app.state.ctx.last_seen
        with seen._lock:
            seen._pending.clear()
        assert impostor.auth().status_code == 401  # a new key of that identity: pending
        assert len(seen) == 0
        assert device.auth().status_code == 200
        assert len(seen) == 1
    assert last_seen(db, [device_id])[device_id] is not None


def _insert_device(db: Database, status: str = "accepted", artifact: str | None = None,
                   updated: float | None = None) -> str:
    device_id = str(uuid.uuid4())
    t = updated if updated is not None else time.time()
    with db.write() as c:
        c.execute(devices.insert().values(
            id=device_id, identity_json=json.dumps({"mac": device_id}), identity_hash=uuid.uuid4().hex,
            status=status, inventory={"artifact_name": artifact} if artifact else {}, created=t, updated=t))
    return device_id


def test_last_seen_never_goes_back(url: str) -> None:
    """Two workers flush in either order, a slow one last: the newest time stays. A batch larger than one
    statement's share is split, and a device decommissioned meanwhile is simply not there."""
    db = Database(url)
    try:
        a, b = _insert_device(db), _insert_device(db)
        fast, slow = LastSeen(), LastSeen()
        fast.seen(a, 2000.0)
        slow.seen(a, 1000.0)
        slow.seen(b, 1500.0)
        slow.seen(str(uuid.uuid4()), 1500.0)  # gone
        assert fast.flush(db) == 1
        assert slow.flush(db) == 3
        assert last_seen(db, [a, b]) == {a: 2000.0, b: 1500.0}
        slow.seen(b, 1200.0)
        slow.flush(db)
        assert last_seen(db, [a, b]) == {a: 2000.0, b: 1500.0}
        assert slow.flush(db) == 0 and len(slow) == 0
    finally:
        db.dispose()


def test_a_failed_flush_keeps_its_entries(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    db = Database(url)
    try:
        a = _insert_device(db)
        ls = LastSeen()
        ls.seen(a, 3000.0)
        with monkeypatch.context() as m:
            m.setattr("ota_server.lastseen.forward_update", lambda items: sa.text("UPDATE no_such_table SET x = 1"))
            with pytest.raises(sa.exc.DatabaseError):
                ls.flush(db)
        assert len(ls) == 1
        ls.seen(a, 2500.0)  # an older note does not replace the kept newer one
        assert ls.flush(db) == 1
        assert last_seen(db, [a]) == {a: 3000.0}
    finally:
        db.dispose()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_fleet_gauges_cost_three_statements_and_are_cached(url: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The gauges of a scrape: three GROUP BY statements whatever the fleet size, none for a scrape within
    the cache time; the version gauge keeps the most common versions and adds the rest up under "other"
    (device-chosen names cannot blow up the label cardinality); stale devices are the silent accepted ones."""
    monkeypatch.setattr(metrics, "TOP_VERSIONS", 2)
    db = Database(url)
    try:
        with db.write() as c:  # the module's other tests left devices here: start from an empty fleet
            c.execute(sa.delete(devices))
        old = time.time() - 7200
        for artifact, n in (("vv-1.0", 4), ("vv-2.0", 3), ("vv-0.9", 1), ("x" * 300, 1)):
            for _ in range(n):
                _insert_device(db, artifact=artifact)
        silent = [_insert_device(db, artifact="vv-2.0", updated=old) for _ in range(2)]  # never seen, accepted long ago
        _insert_device(db, status="pending", updated=old)  # not expected to poll: never stale
        ls = LastSeen()
        ls.seen(silent[0], old + 10)  # seen, but long ago
        ls.flush(db)
        collector = metrics.configure(db, stale_after=3600, cache_seconds=60)
        with counting(db.engine) as sql:
            families = list(collector.collect())
            assert len(sql.sent) == 3, sql.sent
            assert list(collector.collect()) == families and len(sql.sent) == 3  # cached
        text, _ = metrics.render(db)
        samples = _samples(text.decode())
        assert samples[("ota_devices", (("status", "accepted"),))] == 11
        assert samples[("ota_devices", (("status", "pending"),))] == 1
        assert samples[("ota_devices_stale", ())] == 2
        versions = {dict(k[1])["artifact_name"]: v for k, v in samples.items() if k[0] == "ota_devices_by_version"}
        assert versions == {"vv-2.0": 5, "vv-1.0": 4, "other": 2}
        assert ("ota_deployment_device_outcomes_total", (("status", "already-installed"),)) in samples
    finally:
        db.dispose()
