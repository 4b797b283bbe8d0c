"""The server's choice among the artifacts of one release name (``ota_server.deployments.choose_artifact``): a delta made
from the image the device runs, when the device installs deltas, else the full artifact; an artifact made for
another image is never handed out. A table of candidates, devices and expected choices, run in process against
a real (SQLite) database that holds the device's inventory."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy as sa

from ota_server.db import Database, migrate
from ota_server.deployments import choose_artifact
from ota_server.models import devices

RUNNING = "a" * 64  # rootfs-image.checksum of the image the device runs
OTHER = "b" * 64


@dataclass(frozen=True)
class Candidate:
    """An artifact row as the ``next`` route reads it (id, device types, the stored header info)."""

    id: str
    device_types: tuple[str, ...]
    info: dict[str, Any]


def full(artifact_id: str) -> Candidate:
    return Candidate(artifact_id, ("raspberrypi4",), {
        "artifact_provides": {"rootfs-image.version": "2.0.0"}, "artifact_depends": {},
        "updates": [{"type_info": {"type": "rootfs-image"}}]})


def delta(artifact_id: str, source: Any, payload: str = "rootfs-delta") -> Candidate:
    return Candidate(artifact_id, ("raspberrypi4",), {
        "artifact_provides": {"rootfs-image.version": "2.0.0"},
        "artifact_depends": {"rootfs-image.checksum": source},
        "updates": [{"type_info": {"type": payload}}]})


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Database]:
    url = f"sqlite:///{tmp_path_factory.mktemp('choose') / 'ota.db'}"
    migrate(url)
    database = Database(url)
    yield database
    database.dispose()


def device_with(db: Database, update_modules: Any) -> str:
    """An accepted device whose inventory reports ``update_modules`` (``None``: not reported at all)."""
    device_id = f"dev-{time.monotonic_ns()}"
    inventory = {"device_type": "raspberrypi4"} | ({} if update_modules is None else {"update_modules": update_modules})
    t = time.time()
    with db.write() as c:
        c.execute(devices.insert().values(id=device_id, identity_json=f'{{"mac":"{device_id}"}}',
                                          identity_hash=device_id, status="accepted", inventory=inventory,
                                          device_type="raspberrypi4", created=t, updated=t))
    return device_id


F, D, D2, FOREIGN = full("full"), delta("delta", RUNNING), delta("delta-2", RUNNING), delta("foreign", OTHER)

# (case, candidates in upload order, the device's update_modules, its running checksum, the expected choice)
CHOICES: list[tuple[str, list[Candidate], Any, str | None, str | None]] = [
    ("only a full artifact", [F], None, RUNNING, "full"),
    ("a delta from the running image, deltas installed", [F, D], ["rootfs-delta"], RUNNING, "delta"),
    ("the delta also when uploaded before the full one", [D, F], ["rootfs-delta"], RUNNING, "delta"),
    ("update_modules as a comma-separated string", [F, D], "rootfs-image, rootfs-delta", RUNNING, "delta"),
    ("update_modules as a space-separated string", [F, D], "rootfs-image rootfs-delta", RUNNING, "delta"),
    ("the first of two fitting deltas", [F, D, D2], ["rootfs-delta"], RUNNING, "delta"),
    ("a device that does not report update modules", [F, D], None, RUNNING, "full"),
    ("a device whose modules do not include deltas", [F, D], ["single-file"], RUNNING, "full"),
    ("update_modules of the wrong type", [F, D], {"rootfs-delta": True}, RUNNING, "full"),
    ("update_modules with non-string items", [F, D], [1, None], RUNNING, "full"),
    ("a delta from another image", [F, FOREIGN], ["rootfs-delta"], RUNNING, "full"),
    ("a device that does not say what it runs", [F, D], ["rootfs-delta"], None, "full"),
    ("an empty running checksum", [F, delta("empty-source", "")], ["rootfs-delta"], "", "full"),
    ("a delta with a payload the device does not install", [F, delta("odd", RUNNING, "custom-delta")],
     ["rootfs-delta"], RUNNING, "full"),
    ("a rootfs-image payload that depends on the running image", [F, delta("dep", RUNNING, "rootfs-image")],
     None, RUNNING, "dep"),
    ("a non-string depends value is no source", [F, delta("list-source", [RUNNING])], ["rootfs-delta"], RUNNING,
     "full"),
    # refusals: nothing the device can install
    ("only a delta from another image", [FOREIGN], ["rootfs-delta"], RUNNING, None),
    ("only a delta, device without delta support", [D], None, RUNNING, None),
    ("no candidates", [], ["rootfs-delta"], RUNNING, None),
]


@pytest.mark.parametrize(("candidates", "update_modules", "running", "expected"), [c[1:] for c in CHOICES],
                         ids=[c[0] for c in CHOICES])
def test_choice(db: Database, candidates: list[Candidate], update_modules: Any, running: str | None,
                expected: str | None) -> None:
    device = device_with(db, update_modules)
    provides = {"device_type": "raspberrypi4", "artifact_name": "vv-1.0.0"}
    if running is not None:
        provides["rootfs-image.checksum"] = running
    with db.read() as conn:
        chosen = choose_artifact(conn, device, provides, candidates)
    assert (chosen.id if chosen is not None else None) == expected


def test_the_inventory_is_read_only_when_a_delta_fits(db: Database) -> None:
    """The device's inventory is read only when a delta from its image exists: the common case (a full
    artifact, or deltas for other images) costs no query."""
    statements: list[str] = []

    def count(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        statements.append(statement)

    device = device_with(db, ["rootfs-delta"])
    provides = {"device_type": "raspberrypi4", "rootfs-image.checksum": RUNNING}
    sa.event.listen(db.engine, "before_cursor_execute", count)
    try:
        with db.read() as conn:
            assert choose_artifact(conn, device, provides, [F, FOREIGN]).id == "full"
            assert statements == []
            assert choose_artifact(conn, device, provides, [F, D]).id == "delta"
        assert len(statements) == 1 and "inventory" in statements[0], statements
    finally:
        sa.event.remove(db.engine, "before_cursor_execute", count)
