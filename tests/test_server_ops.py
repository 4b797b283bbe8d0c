"""Running the update server in production: the systemd units, migrations run once before the servers start,
backups restored into a new server that serves a device, the secrets key kept apart from the database (checked
at start, rotated), a secret that does not decrypt answered 503."""

from __future__ import annotations

import os
import re
import shlex
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.fernet import Fernet

from devkit.net import free_port

from .conftest import BUILD_PY, REPO
from .server_helpers import ADMIN_TOKEN, Device, Server, deploy, server_fixture, upload, write_artifact  # noqa: F401

UNITS = REPO / "ota_server" / "systemd"
CONFIG = "/api/management/v1/deviceconfig/configurations"
DEVICE_CONFIG = "/api/devices/v1/deviceconfig/configuration"


def cli(*args: str | Path, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    e = dict(os.environ, PYTHONPATH=str(REPO), OTA_ADMIN_TOKEN=ADMIN_TOKEN)
    for name in ("OTA_SECRETS_KEYS", "OTA_SECRETS_KEY_FILE", "OTA_DB_URL", "OTA_RELEASE_KEYS"):
        e.pop(name, None)
    e.update(env or {})
    return subprocess.run([sys.executable, str(BUILD_PY), *map(str, args)], capture_output=True, text=True, env=e,
                          cwd=REPO, timeout=timeout)


def error_line(p: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(lines) == 1 and "Traceback" not in p.stderr, (p.returncode, p.stderr)
    return p.stderr[p.stderr.index("error:"):]


def start_refused(s: Server, *args: str | Path) -> str:
    """Start ``build.py server`` on ``s``'s database and storage; it must refuse (exit 2): its error."""
    try:
        p = cli("server", "--db", s.db_url, "--storage", s.storage, "--port", free_port(), *args, timeout=60)
    except subprocess.TimeoutExpired:
        raise AssertionError("the server started instead of refusing") from None
    return error_line(p)


def set_config(s: Server, device_id: str, **values: Any) -> None:
    secrets = [k for k in values if k.startswith("SECRET")]
    with s.admin() as a:
        r = a.put(f"{CONFIG}/device/{device_id}", json={**values, "_secrets": secrets})
    assert r.status_code == 204, r.text


def device_config(dev: Device) -> httpx.Response:
    return dev.http.get(DEVICE_CONFIG, headers=dev.headers)


def new_key_file(path: Path) -> Path:
    p = cli("server", "secrets", "new-key", "--out", path)
    assert p.returncode == 0, p.stderr
    return path


# ---------------------------------------------------------------------------------------------------------
# systemd


def test_systemd_units_verify(tmp_path: Path) -> None:
    """``systemd-analyze verify`` accepts the units with no warning at all (it only warns about unknown or
    malformed settings, so any output fails), once pointed at this checkout instead of /opt/vv-ota."""
    text = (UNITS / "vv-ota-server.service").read_text()
    for setting in ("DynamicUser=yes", "StateDirectory=vv-ota", "ProtectSystem=strict", "NoNewPrivileges=yes",
                    "PrivateTmp=yes", "ProtectHome=yes", "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                    "SystemCallFilter=@system-service", "\nCapabilityBoundingSet=\n",
                    "EnvironmentFile=/etc/vv-ota/server.env"):
        assert setting in text, setting
    for unit in UNITS.iterdir():
        (tmp_path / unit.name).write_text(unit.read_text().replace("/opt/vv-ota/.venv/bin/python", sys.executable)
                                          .replace("/opt/vv-ota", str(REPO)))
    p = subprocess.run(["systemd-analyze", "verify", "--man=no", *sorted(u.name for u in UNITS.iterdir())],
                       capture_output=True, text=True, cwd=tmp_path)
    assert p.returncode == 0 and p.stdout == p.stderr == "", p.stdout + p.stderr


def test_the_units_command_line_serves(tmp_path: Path) -> None:
    """The server unit's ExecStart (its state directory and port moved into the test's) with an environment
    file like the one it documents: the server starts on the port and answers."""
    unit = (UNITS / "vv-ota-server.service").read_text()
    (exec_start,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    (environment,) = re.findall(r"^Environment=(.*)$", unit, re.M)
    state, port = tmp_path / "state", free_port()
    state.mkdir()
    key = Fernet.generate_key().decode()
    env_file = {"OTA_ADMIN_TOKEN": ADMIN_TOKEN, "OTA_SECRETS_KEYS": key, "OTA_SERVER_ARGS": "--workers 2"}
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_file)
    for item in shlex.split(environment):
        name, value = item.split("=", 1)
        env[name] = value.replace("/var/lib/vv-ota", str(state))
    argv = []
    for word in shlex.split(exec_start.replace("/opt/vv-ota/.venv/bin/python", sys.executable)
                            .replace("/opt/vv-ota", str(REPO)).replace("/var/lib/vv-ota", str(state))
                            .replace("--port 8080", f"--port {port}")):
        argv += env["OTA_SERVER_ARGS"].split() if word == "$OTA_SERVER_ARGS" else [word]
    proc = subprocess.Popen(argv, cwd=state, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        s = Server(tmp_path)
        s.url, s.db_url, s.storage, s.proc = f"http://127.0.0.1:{port}", env["OTA_DB_URL"], state, proc
        for _ in range(150):
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(s.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        dev = Device(s)
        dev_id = dev.accept()
        set_config(s, dev_id, SECRET_A="kept apart")
        assert device_config(dev).json() == {"SECRET_A": "kept apart"}
        assert (state / "ota.db").is_file() and "fernet_key" not in s.secrets()
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out


# ---------------------------------------------------------------------------------------------------------
# migrations


def test_migrate_once_then_start_without_migrating(tmp_path: Path) -> None:
    db = f"sqlite:///{tmp_path / 'ota.db'}"
    s = Server(tmp_path, "--no-migrate", db_url=db)
    assert "build.py server migrate" in start_refused(s, "--no-migrate")
    p = cli("server", "migrate", "--db", db)
    assert p.returncode == 0 and re.search(r"migrated from \(empty\) to revision \w+", p.stdout), p.stderr
    p = cli("server", "migrate", "--db", db)
    assert p.returncode == 0 and "already at revision" in p.stdout
    s.start()
    assert s.stop() == 0


def test_models_and_migrations_agree(tmp_path: Path) -> None:
    """The schema the migrations build is the one ota_server/models.py describes."""
    import sqlalchemy as sa
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    from ota_server.db import migrate
    from ota_server.models import Base

    url = f"sqlite:///{tmp_path / 'ota.db'}"
    migrate(url)
    engine = sa.create_engine(url)
    try:
        with engine.connect() as c:
            assert compare_metadata(MigrationContext.configure(c), Base.metadata) == []
    finally:
        engine.dispose()


def test_migration_0003_refuses_conflicting_artifacts(tmp_path: Path) -> None:
    """Artifacts that already conflict (two uploads raced before the unique index): the upgrade names them and
    changes nothing; once one is deleted it goes through."""
    from ota_server.db import migrate

    path = tmp_path / "ota.db"
    url = f"sqlite:///{path}"
    migrate(url, "0001")
    with sqlite3.connect(path) as c:
        for art_id, created in (("art-first", 1.0), ("art-second", 2.0)):
            c.execute("INSERT INTO artifacts (id, name, description, device_types, size, sha256, signed, info, "
                      "created) VALUES (?, 'app-1', '', '[\"rpi4\", \"qemu-virt\"]', 1, '', 0, '{}', ?)",
                      (art_id, created))
    p = cli("server", "migrate", "--db", url)
    err = error_line(p)
    assert "art-first and art-second" in err and "app-1 for device type" in err and "nothing was changed" in err
    with sqlite3.connect(path) as c:
        assert c.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]
        c.execute("DELETE FROM artifacts WHERE id = 'art-second'")
    p = cli("server", "migrate", "--db", url)
    assert p.returncode == 0, p.stderr
    with sqlite3.connect(path) as c:
        assert sorted(c.execute("SELECT name, device_type, source, artifact_id FROM artifact_targets")) == [
            ("app-1", "qemu-virt", "", "art-first"), ("app-1", "rpi4", "", "art-first")]


# ---------------------------------------------------------------------------------------------------------
# secrets key


def test_secrets_key_kept_apart_and_checked_at_start(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "etc" / "secrets.key")
    assert key_file.stat().st_mode & 0o777 == 0o600
    s = Server(tmp_path / "srv", "--secrets-key-file", str(key_file)).start()
    try:
        dev = Device(s)
        dev_id = dev.accept()
        set_config(s, dev_id, DVR_IP="10.0.0.5", SECRET_PASSWORD="hunter2")
        assert device_config(dev).json() == {"DVR_IP": "10.0.0.5", "SECRET_PASSWORD": "hunter2"}
    finally:
        s.stop()
    assert "fernet_key" not in s.secrets()  # nothing that decrypts them sits beside the database
    other = new_key_file(tmp_path / "other.key")
    for args in (("--secrets-key-file", other), ()):  # the wrong key; no key at all (a default one is made)
        err = start_refused(s, *args)
        assert "1 of 1 secret configuration values" in err and "cannot be decrypted" in err, err
        assert "--secrets-key-file FILE (or OTA_SECRETS_KEYS)" in err and "device " + dev_id in err
    p = cli("server", "secrets", "check", "--db", s.db_url, "--storage", s.storage, "--secrets-key-file", key_file)
    assert p.returncode == 0 and "1 secrets decrypt" in p.stdout, p.stderr
    s.env = {"OTA_SECRETS_KEYS": key_file.read_text().split("\n", 1)[1].strip()}  # the key in the environment
    s.args = []
    s.start()
    try:
        assert device_config(dev).json()["SECRET_PASSWORD"] == "hunter2"
    finally:
        s.stop()


def test_database_restored_without_its_secrets_file_is_refused(tmp_path: Path) -> None:
    """The default key lives in STORAGE/server-secrets.json: a database whose secrets no longer decrypt (that
    file lost, or another one) must not start and hand out configurations without the secrets."""
    s = Server(tmp_path / "srv").start()
    try:
        dev = Device(s)
        set_config(s, dev.accept(), SECRET_TOKEN="t0ken")
        assert device_config(dev).json() == {"SECRET_TOKEN": "t0ken"}
    finally:
        s.stop()
    (s.storage / "server-secrets.json").unlink()
    err = start_refused(s)
    assert "cannot be decrypted" in err and "--secrets-key-file" in err


def test_rotate_the_secrets_key(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "secrets.key")
    (first,) = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    s = Server(tmp_path / "srv", "--secrets-key-file", str(key_file)).start()
    dev = Device(s)
    dev_id = dev.accept()
    try:
        set_config(s, dev_id, SECRET_A="alpha", SECRET_B="beta")
        with s.admin() as a:
            assert a.put(f"{CONFIG}/group/site", json={"SECRET_G": "gamma", "_secrets": ["SECRET_G"]}).status_code == 204
    finally:
        s.stop()
    p = cli("server", "secrets", "new-key", "--out", key_file)
    assert p.returncode == 0 and "2 keys" in p.stdout and "secrets rotate" in p.stdout
    second = [line for line in key_file.read_text().splitlines() if not line.startswith("#")]
    assert len(second) == 2 and second[1] == first
    s.start()  # every server restarted with the new key first: they encrypt with it, decrypt with both
    try:
        assert device_config(dev).json() == {"SECRET_A": "alpha", "SECRET_B": "beta"}
        p = cli("server", "secrets", "rotate", "--db", s.db_url, "--storage", s.storage, "--secrets-key-file",
                key_file, "--prune")
        assert p.returncode == 0 and "re-encrypted 3 secrets" in p.stdout, p.stderr
        assert [line for line in key_file.read_text().splitlines() if not line.startswith("#")] == [second[0]]
        new = Fernet(second[0].encode())
        assert sorted(new.decrypt(v.encode()).decode() for (v,) in s.query(
            "SELECT value FROM config_values WHERE secret")) == ["alpha", "beta", "gamma"]
        assert device_config(dev).json() == {"SECRET_A": "alpha", "SECRET_B": "beta"}
    finally:
        s.stop()
    s.start()  # the new key alone is enough now
    try:
        assert device_config(dev).json() == {"SECRET_A": "alpha", "SECRET_B": "beta"}
    finally:
        s.stop()


def test_default_key_moves_into_a_key_file(tmp_path: Path) -> None:
    """A server that ran with the default key (in server-secrets.json) is given a key file: the old key still
    decrypts until ``secrets rotate`` re-encrypts everything and removes it from server-secrets.json."""
    s = Server(tmp_path / "srv").start()
    dev = Device(s)
    try:
        set_config(s, dev.accept(), SECRET_A="alpha")
    finally:
        s.stop()
    assert "fernet_key" in s.secrets()
    key_file = new_key_file(tmp_path / "secrets.key")
    s.args.extend(["--secrets-key-file", str(key_file)])
    s.start()
    try:
        assert device_config(dev).json() == {"SECRET_A": "alpha"}
        p = cli("server", "secrets", "rotate", "--db", s.db_url, "--storage", s.storage, "--secrets-key-file",
                key_file)
        assert p.returncode == 0 and "re-encrypted 1 secrets" in p.stdout and "removed the old key" in p.stdout
    finally:
        s.stop()
    assert "fernet_key" not in s.secrets()
    s.start()
    try:
        assert device_config(dev).json() == {"SECRET_A": "alpha"}
    finally:
        s.stop()


def test_secret_that_does_not_decrypt_is_a_503(server: Server) -> None:
    """The device never gets a configuration missing a secret: 503 with the reason (the agent keeps its last
    device.env on any error); other devices and the administrator's masked view are unaffected."""
    import sqlalchemy as sa

    from ota_server.db import normalize_url

    dev, other = Device(server), Device(server)
    dev_id = dev.accept()
    set_config(server, dev_id, PLAIN="1", SECRET_PW="pw")
    set_config(server, other.accept(), SECRET_PW="fine")
    assert device_config(dev).json() == {"PLAIN": "1", "SECRET_PW": "pw"}
    foreign = Fernet(Fernet.generate_key()).encrypt(b"pw").decode()
    engine = sa.create_engine(normalize_url(server.db_url))
    try:
        with engine.begin() as c:
            c.execute(sa.text("UPDATE config_values SET value = :v WHERE owner = :o AND name = 'SECRET_PW'"),
                      {"v": foreign, "o": dev_id})
    finally:
        engine.dispose()
    r = device_config(dev)
    assert r.status_code == 503 and "SECRET_PW cannot be decrypted" in r.json()["error"], r.text
    assert device_config(other).json() == {"SECRET_PW": "fine"}
    with server.admin() as a:
        doc = a.get(f"{CONFIG}/device/{dev_id}").json()
    assert doc["configured"] == {"PLAIN": "1", "SECRET_PW": "********"}


# ---------------------------------------------------------------------------------------------------------
# backup and restore


def backup_and_restore(src: Server, base: Path, keys: dict[str, tuple[Path, Path]], run_cli: Any, new_db: str,
                       src_key_args: tuple[str, ...] = ()) -> None:
    """A device with a deployment and configuration on ``src``; a backup taken while ``src`` runs; restored into
    ``new_db`` and a new storage directory (the secrets key written to a new key file); a new server on them
    serves the device: its token still works, it authenticates again, gets its deployment, downloads the
    artifact and gets its configuration with the secret."""
    art = write_artifact(run_cli, base / "bk.mender", f"bk-{base.name}", ("qemu-virt",), key=keys["ec"][0])
    assert upload(src, art).status_code == 201
    dev = Device(src)
    dev_id = dev.accept()
    set_config(src, dev_id, DVR_IP="10.9.9.9", SECRET_DVR="s3cret")
    dep_id = deploy(src, name="restored", artifact_name=f"bk-{base.name}", devices=[dev_id])
    out = base / "backup"
    p = cli("server", "backup", "--db", src.db_url, "--storage", src.storage, *src_key_args, "--out", out)
    assert p.returncode == 0 and re.search(r"\d+ artifacts, the secrets key", p.stdout), p.stderr
    assert out.stat().st_mode & 0o777 == 0o700 and (out / "secrets.key").stat().st_mode & 0o777 == 0o600
    assert "exists and is not empty" in error_line(cli("server", "backup", "--db", src.db_url, "--storage",
                                                       src.storage, *src_key_args, "--out", out))
    src.stop()

    storage, key_file = base / "new-storage", base / "restored.key"
    if src_key_args:  # the key lives apart: the restore must be told where to put it (checked before writing)
        assert "give --secrets-key-file FILE" in error_line(
            cli("server", "restore", out, "--db", new_db, "--storage", storage))
        p = cli("server", "restore", out, "--db", new_db, "--storage", storage, "--secrets-key-file", key_file)
        assert key_file.stat().st_mode & 0o777 == 0o600
    else:  # the default key comes back in server-secrets.json
        p = cli("server", "restore", out, "--db", new_db, "--storage", storage)
    assert p.returncode == 0 and re.search(r"and \d+ artifacts into", p.stdout), p.stderr
    assert "restore into a new" in error_line(
        cli("server", "restore", out, "--db", new_db, "--storage", base / "other", "--secrets-key-file", key_file))

    new = Server(base / "new", "--release-key", str(keys["ec"][1]), *(("--secrets-key-file", str(key_file))
                                                                       if key_file.exists() else ()), db_url=new_db)
    new.storage = storage
    new.start()
    try:
        dev.server, dev.http = new, new.client()
        r = dev.next()  # the token issued by the old server: the restored token key accepts it
        assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
        assert dev.auth().status_code == 200
        r = dev.next()
        assert r.status_code == 200 and r.json()["id"] == dep_id, r.text
        got = httpx.get(r.json()["artifact"]["source"]["uri"])
        assert got.status_code == 200 and got.content == art.read_bytes()
        assert device_config(dev).json() == {"DVR_IP": "10.9.9.9", "SECRET_DVR": "s3cret"}
        assert dev.status(dep_id, "success").status_code == 204
        with new.admin() as a:
            assert a.get(f"/api/management/v1/deployments/deployments/{dep_id}").json()["status"] == "finished"
    finally:
        new.stop()


def test_backup_and_restore_into_a_new_server(tmp_path: Path, keys: dict[str, tuple[Path, Path]],
                                              run_cli: Any) -> None:
    key_file = new_key_file(tmp_path / "secrets.key")
    src = Server(tmp_path / "src", "--release-key", str(keys["ec"][1]), "--secrets-key-file", str(key_file)).start()
    try:
        backup_and_restore(src, tmp_path, keys, run_cli, f"sqlite:///{tmp_path / 'new' / 'ota.db'}",
                           ("--secrets-key-file", str(key_file)))
    finally:
        src.stop()


def test_backup_without_the_key_needs_it_to_restore(tmp_path: Path) -> None:
    key_file = new_key_file(tmp_path / "secrets.key")
    src = Server(tmp_path / "src", "--secrets-key-file", str(key_file)).start()
    try:
        dev = Device(src)
        set_config(src, dev.accept(), SECRET_X="x")
        p = cli("server", "backup", "--db", src.db_url, "--storage", src.storage, "--secrets-key-file", key_file,
                "--without-secrets-key", "--out", tmp_path / "b")
        assert p.returncode == 0 and "without the secrets key" in p.stdout, p.stderr
    finally:
        src.stop()
    assert not (tmp_path / "b" / "secrets.key").exists()
    assert "fernet_key" not in (tmp_path / "b" / "server-secrets.json").read_text()
    new_db = f"sqlite:///{tmp_path / 'new.db'}"
    err = error_line(cli("server", "restore", tmp_path / "b", "--db", new_db, "--storage", tmp_path / "s1",
                         "--secrets-key-file", tmp_path / "missing.key"))
    assert "holds no secrets key" in err
    err = error_line(cli("server", "restore", tmp_path / "b", "--db", new_db, "--storage", tmp_path / "s2"))
    assert "cannot be decrypted" in err  # restored, but refused: the key is not there
    p = cli("server", "secrets", "check", "--db", new_db, "--storage", tmp_path / "s2", "--secrets-key-file", key_file)
    assert p.returncode == 0 and "1 secrets decrypt" in p.stdout, p.stderr


@pytest.mark.parametrize("damage", ["database", "manifest"])
def test_damaged_backup_is_refused(tmp_path: Path, damage: str) -> None:
    src = Server(tmp_path / "src").start()
    try:
        p = cli("server", "backup", "--db", src.db_url, "--storage", src.storage, "--out", tmp_path / "b")
        assert p.returncode == 0, p.stderr
    finally:
        src.stop()
    target = tmp_path / "b" / ("database.sqlite" if damage == "database" else "manifest.json")
    target.write_bytes(target.read_bytes()[:-10] + b"0123456789")
    err = error_line(cli("server", "restore", tmp_path / "b", "--db", f"sqlite:///{tmp_path / 'n.db'}",
                         "--storage", tmp_path / "s"))
    assert "damaged" in err or "not a server backup" in err
