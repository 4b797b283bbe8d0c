"""The status-report shortcut (:mod:`ota_server.fastreport`) against the route alone: the same requests, in the
same states, get the same answers and leave the same rows; the shortcut takes exactly the reports the route would
accept as they are (a good token, a body the route's model accepts), and never one it would refuse."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from .server_helpers import ADMIN_TOKEN, Device
from .test_server_bench import InProcess

DEPLOYMENTS = "/api/management/v1/deployments/deployments"
STATUS = "/api/devices/v1/deployments/device/deployments/{}/status"


@pytest.fixture(name="apps")
def apps_fixture(tmp_path: Path) -> Iterator[tuple[FastAPI, FastAPI]]:
    """The server's app, and an app over another database without the report shortcut (the route alone), each
    with the artifact ``rel-2`` for qemu-virt."""
    from ota_server.apitokens import hash_token
    from ota_server.app import create_app
    from ota_server.db import migrate
    from ota_server.fastreport import FastReport
    from ota_server.models import artifacts
    from ota_server.settings import Settings

    made = []
    for name in ("shortcut", "route"):
        url = f"sqlite:///{tmp_path}/{name}.db"
        migrate(url)
        app = create_app(Settings(db_url=url, storage=tmp_path / name, admin_token_sha256=hash_token(ADMIN_TOKEN)))
        with app.state.ctx.db.write() as c:
            c.execute(artifacts.insert().values(
                id="full-2", name="rel-2", description="", device_types=["qemu-virt"], size=1, sha256="0" * 64,
                signed=False, signed_by=None, info={"updates": [{"type_info": {"type": "rootfs-image"}}]}, created=1.0))
        made.append(app)
    server, route_only = made
    route_only.user_middleware = [m for m in route_only.user_middleware if m.cls is not FastReport]
    assert [m.cls for m in server.user_middleware].count(FastReport) == 1
    assert len(route_only.user_middleware) == len(server.user_middleware) - 1
    yield server, route_only
    for app in made:
        app.state.ctx.db.dispose()


def _rows(app: FastAPI, ids: dict[str, str]) -> dict[str, list[tuple[str, str | None]]]:
    import sqlalchemy as sa

    with app.state.ctx.db.read() as c:
        return {name: [tuple(r) for r in c.execute(sa.text(  # type: ignore[misc]
            "SELECT status, substate FROM deployment_devices WHERE device_id = :d ORDER BY created"), {"d": i})]
            for name, i in ids.items()}


def test_the_report_shortcut_answers_as_the_route_would(apps: tuple[FastAPI, FastAPI],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """One script of reports played on each app, each with its own devices and deployments in the same states:
    device A moves through its update (with repeats, an older status, extra members, the longest substate), then
    finishes and sends a different final status; B fails; C reports to its aborted deployment; A reports to a
    deployment that is not its own; and requests the route refuses (bad token, unknown status, too long or
    non-string substate, not JSON, not an object, no JSON content type, a wrong method). Answers (status, body,
    content type) and rows are the same on both; the shortcut stored exactly the reports the route accepts as
    they are — the refusals it gave (409, 404, 400) are the report's own, after its check of the token."""
    import ota_server.fastreport as fastreport

    taken: list[tuple[str, str]] = []
    store = fastreport.store_status

    async def spy(ctx: Any, deployment_id: str, device_id: str, status: str, substate: str | None) -> None:
        taken.append((device_id, status))
        await store(ctx, deployment_id, device_id, status, substate)

    monkeypatch.setattr(fastreport, "store_status", spy)
    server, route_only = apps
    answers: dict[str, list[tuple[int, Any, str | None]]] = {}
    rows = {}
    took = {}
    with ExitStack() as stack:
        for side, app in (("shortcut", server), ("route", route_only)):
            host = InProcess(app, stack)
            devs = {name: Device(host) for name in "ABC"}  # type: ignore[arg-type]
            ids = {name: d.accept() for name, d in devs.items()}
            admin = stack.enter_context(host.admin())

            def deploy(name: str, devices: list[str], admin: Any = admin) -> str:
                r = admin.post(DEPLOYMENTS, json={"name": name, "artifact_name": "rel-2", "devices": devices})
                assert r.status_code == 201, r.text
                return str(r.headers["Location"].rsplit("/", 1)[1])

            mine = deploy("mine", [ids["A"], ids["B"]])
            aborted = deploy("aborted", [ids["C"]])
            for d in devs.values():
                assert d.next().status_code == 200
            assert admin.put(f"{DEPLOYMENTS}/{aborted}/status", json={"status": "aborted"}).status_code == 204
            a, b, c = devs["A"], devs["B"], devs["C"]
            json_headers = {**a.headers, "Content-Type": "application/json"}

            def put(dev: Device, dep: str, body: Any = None, raw: bytes | None = None,
                    headers: dict[str, str] | None = None, method: str = "PUT") -> Any:
                return dev.http.request(method, STATUS.format(dep), headers=headers or dev.headers,
                                        **({"content": raw} if raw is not None else {"json": body}))

            before = len(taken)
            got = [  # played in order
                put(a, mine, {"status": "downloading", "substate": "one"}),
                put(a, mine, {"status": "installing", "substate": "two", "extra": [1, 2]}),
                put(a, mine, {"status": "downloading", "substate": "older"}),  # ignored
                put(a, mine, {"status": "installing", "substate": "x" * 4096}),  # a repeat: the substate
                put(a, mine, {"status": "rebooting", "substate": "x" * 4097}),
                put(a, mine, {"status": "bogus"}),
                put(a, mine, {"status": "rebooting", "substate": 5}),
                put(a, mine, raw=b"[1]", headers=json_headers),
                put(a, mine, raw=b"{not json", headers=json_headers),
                put(a, mine, raw=b'{"status": "rebooting"}', headers=a.headers),  # no content type
                put(a, mine, {"status": "rebooting"}, headers={"Authorization": "Bearer nope"}),
                put(a, mine, {"status": "rebooting"}, method="POST"),
                put(c, aborted, {"status": "downloading"}),  # 409
                put(a, aborted, {"status": "downloading"}),  # 404: not A's deployment
                put(a, mine, {"status": "rebooting", "substate": None}),
                put(a, mine, {"status": "success", "substate": "done"}),
                put(a, mine, {"status": "failure"}),  # 400: a different final status
                put(b, mine, {"status": "failure", "substate": "broken"}),
            ]
            answers[side] = [(r.status_code, r.json() if r.content else r.content, r.headers.get("content-type"))
                             for r in got]
            took[side] = [(next(n for n, i in ids.items() if i == dev), status) for dev, status in taken[before:]]
            rows[side] = _rows(app, ids)
            stats = admin.get(f"{DEPLOYMENTS}/{mine}/statistics").json()
            assert {k: v for k, v in stats.items() if v} == {"success": 1, "failure": 1}
            assert admin.get(f"{DEPLOYMENTS}/{mine}").json()["status"] == "finished"
    assert answers["shortcut"] == answers["route"]
    codes = [code for code, _, _ in answers["route"]]
    assert codes == [204, 204, 204, 204, 400, 400, 400, 400, 400, codes[9], 401, 405, 409, 404, 204, 204, 400, 204]
    assert answers["route"][12][1] == {"error": "the deployment was aborted"}
    assert took["route"] == []
    assert took["shortcut"] == [("A", "downloading"), ("A", "installing"), ("A", "downloading"), ("A", "installing"),
                                ("C", "downloading"), ("A", "downloading"), ("A", "rebooting"), ("A", "success"),
                                ("A", "failure"), ("B", "failure")]
    assert rows["shortcut"] == rows["route"] == {
        "A": [("success", "done")], "B": [("failure", "broken")], "C": [("aborted", None)]}
