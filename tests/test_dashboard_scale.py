"""The fleet dashboard's pages with 10,000 devices: the SQL each page runs does not grow with the fleet. The
server app runs in process (``create_app``) so that its SQL can be counted at the SQLite driver; the devices and
a 10,000-device deployment are written straight into its database (going through the API would only measure
the device API)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .test_dashboard import _count

ADMIN_TOKEN = "dashboard-test-admin-token-" + "x" * 40
FLEET_PAGES = ["/ui/", "/ui/?page=100", "/ui/?artifact=vv-app-1.0_INCONSISTENT", "/ui/?group=site-3&page=5",
               "/ui/deployments", "/ui/deployments/big", "/ui/deployments/big?failures_page=9",
               f"/ui/devices/{uuid.UUID(int=7)}"]  # device 6: a failure in both fleets


def _fleet_rows(n: int, t: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``n`` devices (every 50th pending, the others accepted, in 20 groups, three versions) and their rows in
    one deployment ("big": six successes, a failure, one downloading and two pending in every ten)."""
    rows, dd_rows = [], []
    statuses = ["success"] * 6 + ["failure", "downloading", "pending", "pending"]
    for i in range(n):
        ident = json.dumps({"hostname": f"cam-{i:05d}", "mac": f"02:00:00:{i >> 16:02x}:{(i >> 8) & 255:02x}:{i & 255:02x}"},
                           sort_keys=True, separators=(",", ":"))
        status = "accepted" if i % 50 else "pending"
        version = "vv-app-2.0" if i % 3 else ("vv-app-1.0" if i % 97 else "vv-app-1.0_INCONSISTENT")
        device_id = str(uuid.UUID(int=i + 1))
        rows.append({"id": device_id, "identity_json": ident, "identity_hash": uuid.uuid4().hex,
                     "status": status, "group_name": f"site-{i % 20}",
                     "inventory": {"artifact_name": version, "device_type": "raspberrypi4"} if status == "accepted" else {},
                     "device_type": "raspberrypi4", "created": t - n + i, "updated": t - n + i,
                     "inventory_updated": t - i})
        if status == "accepted":
            st = statuses[i % len(statuses)]
            dd_rows.append({"deployment_id": "big", "device_id": device_id, "status": st,
                            "substate": "health check failed" if st == "failure" else None,
                            "active": st in ("downloading", "pending"), "phase": 0, "not_before": t, "attempts": 1,
                            "created": t, "started": t, "finished": t if st in ("success", "failure") else None,
                            "has_log": False})
    return rows, dd_rows


@dataclass
class SqlMeter:
    """The SQL an in-process server runs, counted at the SQLite driver (so the hot-path reads that bypass
    SQLAlchemy count too): statements (transaction control and pragmas left out) and rows handed to Python."""

    statements: list[str] = field(default_factory=list)
    rows: int = 0

    def attach(self, engine: Any) -> None:
        import sqlalchemy as sa

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.set_trace_callback(self._statement)
            dbapi_conn.row_factory = self._row

        sa.event.listen(engine, "connect", on_connect)
        engine.dispose()  # connections opened before this point are not metered: drop them

    def _statement(self, sql: str) -> None:
        if sql.split(None, 1)[0].upper() in ("SELECT", "WITH", "INSERT", "UPDATE", "DELETE"):
            self.statements.append(sql)

    def _row(self, _cursor: Any, row: tuple[Any, ...]) -> tuple[Any, ...]:
        self.rows += 1
        return row

    def reset(self) -> None:
        self.statements.clear()
        self.rows = 0


@contextlib.contextmanager
def _fleet_server(workdir: Path, n: int, release_key: Path) -> Iterator[tuple[Any, SqlMeter]]:
    """The server app in process on a new SQLite database holding a fleet of ``n`` devices written straight
    into it (going through the API would only measure the device API), with its SQL metered."""
    import sqlalchemy as sa
    from fastapi.testclient import TestClient

    from ota_server.apitokens import hash_token
    from ota_server.app import create_app
    from ota_server.db import migrate
    from ota_server.models import deployment_devices, deployments, devices
    from ota_server.settings import Settings

    url = f"sqlite:///{workdir / 'ota.sqlite'}"
    migrate(url)
    t = time.time()
    rows, dd_rows = _fleet_rows(n, t)
    engine = sa.create_engine(url)
    with engine.begin() as c:
        c.execute(devices.insert(), rows)
        c.execute(deployments.insert().values(
            id="big", name="fleet-wide 2.0", artifact_name="vv-app-2.0", status="inprogress", created=t,
            finished=None, device_count=len(dd_rows), phases=[{"id": 1, "batch_size": 100, "start_ts": t,
                                                                "device_count": len(dd_rows)}],
            failure_threshold=20.0, allow_downgrade=False, retries=0, target={"all_devices": True}))
        c.execute(deployment_devices.insert(), dd_rows)
    engine.dispose()
    app = create_app(Settings(db_url=url, storage=workdir, admin_token_sha256=hash_token(ADMIN_TOKEN),
                              release_keys=[release_key]))
    meter = SqlMeter()
    meter.attach(app.state.ctx.db.engine)
    try:
        with TestClient(app, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as client:
            yield client, meter
    finally:
        app.state.ctx.db.dispose()


def test_pages_stay_cheap_with_10000_devices(tmp_path: Path, keys: dict[str, tuple[Path, Path]]) -> None:
    """Every page of a 10,000-device fleet (and a 10,000-device deployment) runs the same SQL statements as
    the same page of a 10-device fleet (nothing per device), and hands Python at most a page's worth of rows
    (counting happens in SQL; a page that counted in Python would fetch 10,000). Counted, not timed: a
    wall-clock bound means nothing on two shared cores."""
    measured: dict[int, dict[str, tuple[int, int]]] = {}
    for n in (10, 10_000):
        with _fleet_server(tmp_path / f"fleet-{n}", n, keys["ec"][1]) as (client, meter):
            measured[n] = {}
            for path in FLEET_PAGES:
                client.get(path)  # warm (caches, the first connection)
                meter.reset()
                r = client.get(path)
                assert r.status_code == 200, (n, path, r.text[:2000])
                measured[n][path] = (len(meter.statements), meter.rows)
                if path.startswith("/ui/?") or path == "/ui/":
                    assert _count(r.text, "count-total") == n and _count(r.text, "count-pending") == -(-n // 50)
            if n == 10_000:
                _check_big_fleet_pages(client)
    print("statements and rows per page:", measured)
    for path in FLEET_PAGES:
        (small_statements, _), (big_statements, big_rows) = measured[10][path], measured[10_000][path]
        assert big_statements == small_statements, (path, measured)
        assert big_statements <= 10, (path, measured)
        assert big_rows <= 200, (path, measured)  # a page shows 100 devices


def _check_big_fleet_pages(client: Any) -> None:
    """What the big fleet's pages show: a hundred devices per page, the last page, the failures' pages."""
    html = client.get("/ui/?page=100").text
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 100 and "page 100 of 100" in html
    assert "hostname=cam-09999" in html
    html = client.get("/ui/").text
    assert html[html.index('id="devices"'):].count('href="/ui/devices/') == 100
    html = client.get("/ui/deployments/big").text
    failures = sum(1 for i in range(10_000) if i % 50 and i % 10 == 6)
    assert f'Failures <span class="muted small">{failures}</span>' in html
    assert html[html.index('id="failures"'):].count('href="/ui/devices/') == 100
    assert f"page 1 of {-(-failures // 100)}" in html
