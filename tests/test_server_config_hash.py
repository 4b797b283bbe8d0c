"""Update server: the configuration hash on every ``next`` answer (route and poll shortcut, 204 and 200), when
it changes (device, group, membership) and when not, and the device config GET's view of what the device
applied (``applied_hash``, ``in_sync``, a reported revert). On SQLite and PostgreSQL (tests/conftest.py)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ota_common.varnames import CONFIG_HASH_HEADER, is_config_hash
from ota_server.confighash import EMPTY_HASH

from .server_helpers import Device, Server, deploy, upload

CONFIG = "/api/management/v1/deviceconfig/configurations"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"
GROUP = "/api/management/v1/inventory/devices/{}/group"
INVENTORY = "/api/devices/v1/inventory/device/attributes"


def poll_hash(dev: Device) -> str:
    """The hash of the device's ``next`` answer (a 204 here)."""
    r = dev.next()
    assert r.status_code == 204, r.text
    value = r.headers.get(CONFIG_HASH_HEADER)
    assert is_config_hash(value), r.headers
    return str(value)


def shortcut_answers(server: Server) -> float:
    with server.admin() as a:
        text = a.get("/metrics").text
    found = re.search(r"^ota_fast_polls_total ([0-9.e+]+)$", text, re.MULTILINE)
    assert found
    return float(found.group(1))


def config_view(server: Server, device_id: str) -> dict[str, object]:
    with server.admin() as a:
        r = a.get(f"{CONFIG}/device/{device_id}")
    assert r.status_code == 200, r.text
    doc: dict[str, object] = r.json()
    return doc


def test_hash_follows_device_group_and_membership_changes_and_nothing_else(server: Server) -> None:
    dev, other = Device(server), Device(server)
    dev_id, other_id = dev.accept(), other.accept()
    assert poll_hash(dev) == EMPTY_HASH  # a new device: no variables, no group
    with server.admin() as a:
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1"}).status_code == 204
        h1 = poll_hash(dev)
        assert h1 != EMPTY_HASH and poll_hash(other) == EMPTY_HASH  # only this device's hash moved
        # the same values again: the same configuration, the same hash
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1"}).status_code == 204
        assert poll_hash(dev) == h1
        # a group without variables: the effective configuration is unchanged
        assert a.put(GROUP.format(dev_id), json={"group": "site-a"}).status_code == 204
        assert poll_hash(dev) == h1
        # the group gets a variable: its member's hash changes, the other device's does not
        assert a.put(f"{CONFIG}/group/site-a", json={"DVR_IP": "10.0.0.1"}).status_code == 204
        h2 = poll_hash(dev)
        assert h2 != h1 and poll_hash(other) == EMPTY_HASH
        # a variable of the group that the device overrides with the same value: unchanged effective config
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1", "DVR_IP": "10.0.0.1"}).status_code == 204
        assert poll_hash(dev) == h2
        # membership: another device joins the group and gets its variables; leaving takes them away
        assert a.put(GROUP.format(other_id), json={"group": "site-a"}).status_code == 204
        joined = poll_hash(other)
        assert joined != EMPTY_HASH
        assert a.delete(f"{GROUP.format(other_id)}/site-a").status_code == 204
        assert poll_hash(other) == EMPTY_HASH
        # a secret: changed by a new value, kept by writing the mask back
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1", "PW": "s3cret-1",
                                                        "_secrets": ["PW"]}).status_code == 204
        h3 = poll_hash(dev)
        assert h3 != h2
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1", "PW": "********",
                                                        "_secrets": ["PW"]}).status_code == 204
        assert poll_hash(dev) == h3
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-1", "PW": "s3cret-2",
                                                        "_secrets": ["PW"]}).status_code == 204
        assert poll_hash(dev) != h3
    # the device's own configuration GET carries the hash of what it returns, the one its polls announce
    r = dev.http.get(DEVICE_CONFIG, headers=dev.headers)
    assert r.status_code == 200 and r.headers[CONFIG_HASH_HEADER] == poll_hash(dev)
    assert r.json()["PW"] == "s3cret-2"
    # the secret is in the hash input, never in anything the hash is shown with
    assert "s3cret-2" not in str(config_view(server, dev_id))


def test_hash_on_the_poll_shortcut_and_on_the_route(server: Server) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    with server.admin() as a:
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-2"}).status_code == 204
    before = shortcut_answers(server)
    route = poll_hash(dev)  # the first poll records the provides: the route answers
    assert shortcut_answers(server) == before
    fast = poll_hash(dev)
    assert shortcut_answers(server) == before + 1, "the second poll is the shortcut's"
    assert route == fast
    with server.admin() as a:  # a change shows on the very next shortcut answer
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-3"}).status_code == 204
    assert poll_hash(dev) != fast and shortcut_answers(server) == before + 2


@pytest.fixture(scope="module")
def release(server: Server, tmp_path_factory: pytest.TempPathFactory, keys: dict[str, tuple[Path, Path]]) -> str:
    from .conftest import BUILD_PY, REPO, make_payload

    d = tmp_path_factory.mktemp("rel")
    payload = make_payload(d / "p.bin", 10_000)
    art = d / "a.mender"
    subprocess.run([sys.executable, str(BUILD_PY), "artifact", "write", "module-image", "-T", "vv-app", "-f",
                    str(payload), "-n", "cfg-2", "-t", "qemu-virt", "-k", str(keys["ec"][0]), "-o", str(art)],
                   check=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True)
    assert upload(server, art).status_code == 201
    return "cfg-2"


def test_hash_on_a_deployment_answer(server: Server, release: str) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    with server.admin() as a:
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-4"}).status_code == 204
    idle = poll_hash(dev)
    deploy(server, name="cfg", artifact_name=release, devices=[dev_id])
    r = dev.next()
    assert r.status_code == 200 and r.json()["artifact"]["artifact_name"] == release
    assert r.headers[CONFIG_HASH_HEADER] == idle


def test_in_sync_follows_the_inventory_and_a_revert_shows(server: Server) -> None:
    dev = Device(server)
    dev_id = dev.accept()
    with server.admin() as a:
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-5"}).status_code == 204
    h = poll_hash(dev)
    view = config_view(server, dev_id)
    assert view["config_hash"] == h and view["applied_hash"] is None and view["in_sync"] is False

    def report(**attrs: str) -> None:
        r = dev.http.put(INVENTORY, headers=dev.headers, json=[{"name": k, "value": v} for k, v in attrs.items()])
        assert r.status_code == 200, r.text

    report(config_hash=h, config_status="applied")
    view = config_view(server, dev_id)
    assert view["applied_hash"] == h and view["in_sync"] is True and view["config_status"] == "applied"
    with server.admin() as a:
        assert a.put(f"{CONFIG}/device/{dev_id}", json={"DEVICE_ID": "cam-6"}).status_code == 204
    bad = poll_hash(dev)
    assert config_view(server, dev_id)["in_sync"] is False
    reverts = _reverts(server)
    report(config_hash=h, config_status="reverted", config_refused="health after the change: application health "
           "http://127.0.0.1:1/health: refused", config_refused_hash=bad)
    view = config_view(server, dev_id)
    assert view["in_sync"] is False and view["config_status"] == "reverted" and view["refused_hash"] == bad
    assert "application health" in str(view["config_refused"])
    assert _reverts(server) == reverts + 1
    report(config_hash=h, config_status="reverted", config_refused="same", config_refused_hash=bad)
    assert _reverts(server) == reverts + 1, "the same revert reported again is not counted again"
    with server.admin() as a:  # the device page says it in one line
        page = a.get(f"/ui/devices/{dev_id}").text
    line = next(x for x in page.splitlines() if 'id="config-sync"' in x)
    assert "reverted" in line and bad[:12] in line
    # what the device reports is its word: a value of the wrong shape shows as None, not as a hash
    report(config_hash="not-a-hash", config_status="whatever", config_refused_hash="x" * 64)
    view = config_view(server, dev_id)
    assert view["applied_hash"] is None and view["config_status"] is None and view["refused_hash"] is None


def _reverts(server: Server) -> float:
    with server.admin() as a:
        text = a.get("/metrics").text
    found = re.search(r"^ota_config_reverts_total ([0-9.e+]+)$", text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def test_migration_0009_gives_existing_devices_their_hash(tmp_path: Path) -> None:
    """Devices of a database from before the column get the hash the server would compute (so they are not
    told of a change that is none)."""
    import sqlite3

    import sqlalchemy as sa

    from ota_server.confighash import refresh_all
    from ota_server.db import migrate

    path = tmp_path / "ota.db"
    url = f"sqlite:///{path}"
    migrate(url, "0008")
    with sqlite3.connect(path) as c:
        for dev_id, group in (("d-plain", None), ("d-group", "site"), ("d-both", "site"), ("d-none", None)):
            c.execute("INSERT INTO devices (id, identity_json, identity_hash, status, group_name, inventory, created, "
                      "updated, token_epoch) VALUES (?, '{}', ?, 'accepted', ?, '{}', 1, 1, 0)", (dev_id, dev_id, group))
        c.executemany("INSERT INTO config_values (scope, owner, name, value, secret, updated) VALUES (?, ?, ?, ?, ?, 1)", [
            ("device", "d-plain", "DEVICE_ID", "cam-1", 0), ("group", "site", "DVR_IP", "10.0.0.1", 0),
            ("group", "site", "PW", "gAAAAtoken", 1), ("device", "d-both", "DVR_IP", "10.0.0.9", 0)])
    migrate(url)
    with sqlite3.connect(path) as c:
        hashes = dict(c.execute("SELECT id, config_hash FROM devices"))
    assert hashes["d-none"] is None and len({hashes["d-plain"], hashes["d-group"], hashes["d-both"]}) == 3
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            assert refresh_all(conn) == 0, "the migration and the server compute the same hashes"
    finally:
        engine.dispose()
