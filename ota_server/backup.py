"""Backup and restore of a whole update server: the database, the artifacts, the server secrets and the secrets
key, taken while the server runs and restored as one into a new server.

A backup is a directory (mode 0700), written under a temporary name and renamed when complete:

- ``manifest.json`` — format, time, database kind, schema revision, SHA-256 of the database copy;
- ``database.sqlite`` (SQLite's online backup API: a consistent copy while the server writes) or
  ``database.pgdump`` (``pg_dump --format=custom`` of an exported snapshot);
- ``artifacts/<id>.mender`` — the artifacts the database copy lists (read in the same snapshot);
- ``server-secrets.json``, ``admin-token`` (if the server generated one) — token and link keys: devices keep
  their tokens, links stay valid;
- ``secrets.key`` — the keys of secret configuration values (unless left out on purpose: then whoever restores
  must bring the key). Keep backups as safe as the key: whoever has both reads every secret.

With artifacts in an object store (``--storage s3://...``) a backup holds the database and the secrets only:
the objects stay in the bucket (the manifest names it as ``artifact_store``; keep them with the store's own
means: versioning, replication). Deleting an artifact deletes its object, so a database restored from an older
backup may list artifacts whose objects are gone: restore reports each one.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import time
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ota_common.errors import UserError
from ota_common.files import sha256_file
from ota_common.tools import find_program, install_hint, run

from . import secretkeys
from .db import make_engine, migrate, normalize_url, open_database
from .secretkeys import SecretKeys
from .settings import SECRETS_FILE, SharedSecrets
from .storage import ArtifactStore

FORMAT = 1
MANIFEST = "manifest.json"
KEY_FILE = "secrets.key"
ADMIN_TOKEN = "admin-token"
SQLITE_COPY = "database.sqlite"
PG_DUMP = "database.pgdump"


@dataclass
class Report:
    """What a backup or a restore did."""

    path: Path
    database: str
    revision: str | None
    artifacts: int
    secrets_key: bool
    warnings: list[str] = field(default_factory=list)
    #: the object store holding the artifacts (not in the backup), None: they are in the backup
    artifact_store: str | None = None


def _kind(db_url: str) -> str:
    name = sa.engine.make_url(normalize_url(db_url)).get_backend_name()
    if name not in ("sqlite", "postgresql"):
        raise UserError(f"unsupported database {name!r}: use sqlite:///PATH or postgresql://...")
    return name


def _sqlite_path(db_url: str) -> Path:
    db = sa.engine.make_url(db_url).database
    if not db or db == ":memory:":
        raise UserError("the SQLite database must be a file (sqlite:///PATH)")
    return Path(db)


def _pg_command(db_url: str) -> tuple[str, dict[str, str]]:
    """The libpq connection string for pg_dump/pg_restore/psql and the environment carrying the password (kept
    off the command line, which other users can read)."""
    url = sa.engine.make_url(normalize_url(db_url))
    env = {"PGPASSWORD": url.password} if url.password else {}
    return url.set(drivername="postgresql", password=None).render_as_string(hide_password=False), env


def _pg_tool(name: str) -> str:
    path = find_program(name)
    if path is None:
        raise UserError(f"{name} is needed for PostgreSQL backups: {install_hint(name)}")
    return str(path)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy(src: Path, dst: Path) -> None:
    shutil.copyfile(src, dst)
    _fsync(dst)


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _revision(conn: Any) -> str | None:
    try:
        row = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    except sqlite3.OperationalError:
        return None
    return None if row is None else str(row[0])


def _backup_sqlite(db_url: str, out: Path) -> tuple[list[str], str | None]:
    """Copy the database with SQLite's online backup API (a consistent snapshot, writers carry on). Returns the
    artifact ids and the schema revision of the copy."""
    path = _sqlite_path(db_url)
    if not path.is_file():
        raise UserError(f"no database at {path}")
    copy = out / SQLITE_COPY
    src = sqlite3.connect(path, timeout=30)
    dst = sqlite3.connect(copy)
    try:
        src.backup(dst)
        dst.execute("PRAGMA journal_mode=DELETE")  # one self-contained file
        ids = [r[0] for r in dst.execute("SELECT id FROM artifacts")]
        revision = _revision(dst)
    except sqlite3.Error as e:
        raise UserError(f"cannot back up {path}: {e}") from None
    finally:
        dst.close()
        src.close()
    _fsync(copy)
    return ids, revision


def _backup_postgres(db_url: str, out: Path) -> tuple[list[str], str | None]:
    """``pg_dump`` of a snapshot exported by a REPEATABLE READ transaction that also lists the artifacts, so the
    dump and the artifact files agree. Returns the artifact ids and the schema revision."""
    conninfo, env = _pg_command(db_url)
    with open_database(db_url) as engine:
        try:
            with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
                snapshot = conn.execute(sa.text("SELECT pg_export_snapshot()")).scalar_one()
                ids = [r[0] for r in conn.execute(sa.text("SELECT id FROM artifacts"))]
                revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
                run([_pg_tool("pg_dump"), "--format=custom", f"--snapshot={snapshot}", "--no-owner",
                     "--file", str(out / PG_DUMP), "--dbname", conninfo], stage="backup", env=env)
        except sa.exc.ProgrammingError as e:
            raise UserError(f"the database does not hold an update server's tables: {e.orig}") from None
    _fsync(out / PG_DUMP)
    return ids, revision


def backup(db_url: str, storage: Path, keys: SecretKeys | None, out: Path, include_key: bool = True,
           store: ArtifactStore | None = None, shared: SharedSecrets | None = None) -> Report:
    """Back up a (running) server into the new directory ``out``: the artifacts from ``storage/artifacts``, or
    none when they are in the object store ``store`` (None: a local store); the server secrets ``shared`` by every server, else those
    of ``storage``. Raises UserError when ``out`` exists and is not empty, the database cannot be read, or there
    are no server secrets; ToolError when pg_dump fails."""
    kind = _kind(db_url)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} exists and is not empty: back up into a new directory")
    secrets_file = storage / SECRETS_FILE
    if shared is None and not secrets_file.is_file():
        raise UserError(f"no {SECRETS_FILE} in {storage}: is --storage the server's storage directory?")
    where = store.where if store is not None else None
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(mode=0o700, parents=True)
    try:
        ids, revision = (_backup_sqlite if kind == "sqlite" else _backup_postgres)(db_url, tmp)
        report = Report(out, kind, revision, 0, False)
        (tmp / "artifacts").mkdir()
        for artifact_id in [] if store is not None else sorted(ids):
            src = storage / "artifacts" / f"{artifact_id}.mender"
            if src.is_file():
                _copy(src, tmp / "artifacts" / src.name)
                report.artifacts += 1
            else:  # deleted after the snapshot, or lost before
                report.warnings.append(f"artifact {artifact_id} is in the database but not in {src.parent}")
        doc = dict(shared.doc) if shared is not None else json.loads(secrets_file.read_text())
        if not include_key:
            doc.pop("fernet_key", None)
        _write(tmp / SECRETS_FILE, json.dumps(doc).encode())
        if (storage / ADMIN_TOKEN).is_file():
            _copy(storage / ADMIN_TOKEN, tmp / ADMIN_TOKEN)
        if include_key and keys is not None:
            secretkeys.write_key_file(tmp / KEY_FILE, keys.keys)
            report.secrets_key = True
        db_file = tmp / (SQLITE_COPY if kind == "sqlite" else PG_DUMP)
        manifest = {"format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "database": kind, "revision": revision, "database_file": db_file.name,
                    "database_sha256": sha256_file(db_file), "artifacts": report.artifacts,
                    "secrets_key": report.secrets_key, "warnings": report.warnings,
                    "artifact_store": where}
        report.artifact_store = where
        _write(tmp / MANIFEST, json.dumps(manifest, indent=2).encode() + b"\n")
        _fsync(tmp)
        os.rename(tmp, out)
        _fsync(out.parent)
        return report
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _read_manifest(src: Path) -> dict[str, Any]:
    try:
        manifest: dict[str, Any] = json.loads((src / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{src} is not a server backup ({MANIFEST}: {e})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{src}: backup format {manifest.get('format')!r} is not {FORMAT}")
    db_file = src / str(manifest.get("database_file"))
    if not db_file.is_file() or sha256_file(db_file) != manifest.get("database_sha256"):
        raise UserError(f"{db_file} is missing or damaged (its SHA-256 differs from the manifest's)")
    return manifest


def _restore_keys(src: Path, storage: Path, key_file: Path | None) -> tuple[SecretKeys | None, Path | None]:
    """Which keys the restored server will use; the key file to write from the backup, if any. Checked before
    anything is written. Raises UserError when the backup's key would have nowhere to go."""
    backup_keys = secretkeys.read_key_file(src / KEY_FILE) if (src / KEY_FILE).is_file() else None
    if key_file is not None:
        if key_file.exists():
            return SecretKeys(secretkeys.read_key_file(key_file), f"{secretkeys.OPTION} {key_file}", "file",
                              key_file), None
        if backup_keys is None:
            raise UserError(f"{secretkeys.OPTION} {key_file} does not exist and the backup holds no secrets key "
                            "to write there: give the file holding the key")
        return SecretKeys(backup_keys, f"{secretkeys.OPTION} {key_file}", "file", key_file), key_file
    if os.environ.get(secretkeys.KEYS_ENV, "").strip():
        return SecretKeys(secretkeys.parse_keys(os.environ[secretkeys.KEYS_ENV], secretkeys.KEYS_ENV),
                          secretkeys.KEYS_ENV, "env"), None
    legacy = json.loads((src / SECRETS_FILE).read_text()).get("fernet_key")
    if backup_keys is not None and set(backup_keys) - {legacy}:
        raise UserError(f"the backup's secrets key is kept apart from the database: give {secretkeys.OPTION} FILE "
                        "(a new file is written from the backup; the restored server must be started with it)")
    if legacy:
        return SecretKeys((legacy,), str(storage / SECRETS_FILE), "default", legacy=legacy), None
    return None, None


def _database_is_empty(db_url: str, kind: str) -> None:
    if kind == "sqlite":
        path = _sqlite_path(db_url)
        if path.exists() and path.stat().st_size > 0:
            raise UserError(f"{path} exists: restore into a new database")
        return
    with open_database(db_url) as engine, engine.connect() as conn:
        tables = conn.execute(sa.text("SELECT count(*) FROM information_schema.tables "
                                      "WHERE table_schema = current_schema()")).scalar_one()
    if tables:
        raise UserError("the target database is not empty: restore into a new database (createdb)")


def restore(src: Path, db_url: str, storage: Path, key_file: Path | None,
            store: ArtifactStore | None = None) -> Report:
    """Restore the backup ``src`` into a new database and an empty storage directory, write its secrets key to
    ``key_file`` when that does not exist yet, bring the schema up to date and check that every artifact is
    intact and every secret decrypts. Raises UserError when the backup is damaged, the targets are not empty,
    the database kinds differ (SQLite backups restore into SQLite, PostgreSQL into PostgreSQL), or the secrets
    key is missing or wrong; ToolError when pg_restore fails. A backup of a server with an object store holds
    no artifacts: with ``store`` (that object store) each artifact's object is looked for."""
    manifest = _read_manifest(src)
    kind = _kind(db_url)
    if manifest["database"] != kind:
        raise UserError(f"this is a {manifest['database']} backup; restore it into a {manifest['database']} "
                        f"database, not {kind}")
    if (storage / SECRETS_FILE).exists() or any((storage / "artifacts").glob("*.mender")):
        raise UserError(f"{storage} already holds a server: restore into a new, empty storage directory")
    keys, write_key = _restore_keys(src, storage, key_file)
    _database_is_empty(db_url, kind)

    db_file = src / manifest["database_file"]
    if kind == "sqlite":
        path = _sqlite_path(db_url)
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(sqlite3.connect(db_file)) as source, closing(sqlite3.connect(path)) as target:
            source.backup(target)
        _fsync(path)
    else:
        conninfo, env = _pg_command(db_url)
        run([_pg_tool("pg_restore"), "--no-owner", "--no-privileges", "--exit-on-error", "--single-transaction",
             "--dbname", conninfo, str(db_file)], stage="restore", env=env)

    (storage / "artifacts").mkdir(parents=True, exist_ok=True)
    count = 0
    for f in sorted((src / "artifacts").glob("*.mender")):
        _copy(f, storage / "artifacts" / f.name)
        count += 1
    _copy(src / SECRETS_FILE, storage / SECRETS_FILE)
    os.chmod(storage / SECRETS_FILE, 0o600)
    if (src / ADMIN_TOKEN).is_file() and not (storage / ADMIN_TOKEN).exists():
        _copy(src / ADMIN_TOKEN, storage / ADMIN_TOKEN)
        os.chmod(storage / ADMIN_TOKEN, 0o600)
    if write_key is not None and keys is not None:
        secretkeys.write_key_file(write_key, keys.keys)

    _, revision = migrate(db_url)
    report = Report(src, kind, revision, count, keys is not None, list(manifest.get("warnings", [])),
                    manifest.get("artifact_store"))
    engine = make_engine(db_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT id, sha256 FROM artifacts")).all()
    finally:
        engine.dispose()
    for artifact_id, sha in rows:
        f = storage / "artifacts" / f"{artifact_id}.mender"
        if report.artifact_store is not None:
            if store is not None and not store.exists(artifact_id):
                report.warnings.append(f"artifact {artifact_id} is in the database but not in {store.where}")
        elif not f.is_file():
            report.warnings.append(f"artifact {artifact_id} is in the database but not in the backup")
        elif sha256_file(f) != sha:
            raise UserError(f"artifact {artifact_id} in the backup is damaged (its SHA-256 differs)")
    secretkeys.check_database(db_url, keys)
    return report
