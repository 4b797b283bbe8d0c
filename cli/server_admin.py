"""``build.py server`` subcommands that operate a server: ``migrate``, ``backup``, ``restore`` and
``secrets new-key|rotate|check`` (docs/server.md, "Running it in production")."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from cli.server import DB_OPTION, SECRETS_KEY_OPTION, absolute_db_url, storage_option
from ota_common.errors import UserError

if TYPE_CHECKING:
    from ota_server.storage import S3Store

STORAGE_OPTION = click.option(
    "--storage", type=click.Path(file_okay=False, path_type=Path), default=Path("var"), show_default=True,
    help="The server's storage directory (artifacts, server-secrets.json).")


#: where a server keeps things, as ``build.py server`` takes it (backup and restore)
SERVER_STORAGE_OPTIONS = (
    click.option("--storage", default="var", show_default=True, metavar="DIR|s3://BUCKET[/PREFIX]",
                 help="The server's --storage: a directory (artifacts, server-secrets.json), or an S3 bucket "
                 "(artifacts; the rest in --work-dir). Credentials from the environment as boto3 reads them."),
    click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
                 help="With an s3:// --storage: the server's --work-dir [default: var]."),
    click.option("--s3-endpoint-url", envvar="OTA_S3_ENDPOINT_URL", help="As for the server."),
    click.option("--s3-region", envvar="OTA_S3_REGION", help="As for the server."),
)


def _server_storage(f: Any) -> Any:
    for option in reversed(SERVER_STORAGE_OPTIONS):
        f = option(f)
    return f


def _stores(storage: str, work_dir: Path | None, s3_endpoint_url: str | None,
            s3_region: str | None) -> tuple[Path, S3Store | None]:
    """The local directory and, with an s3:// --storage, the object store (checked: bucket reachable)."""
    from ota_server.storage import S3Store

    artifact_store, local = storage_option(storage, work_dir, s3_endpoint_url, s3_region)
    if not artifact_store:
        return local.resolve(), None
    store = S3Store(artifact_store, s3_endpoint_url, s3_region)
    store.check()
    return local.resolve(), store


@click.command("migrate")
@DB_OPTION
def migrate_command(db_url: str) -> None:
    """Bring the database schema up to date, once, before starting servers with --no-migrate.

    Safe to run from several places at once: PostgreSQL migrations run under an advisory lock, SQLite ones
    in one exclusive transaction; the second finds nothing left to do."""
    from ota_server.db import migrate

    before, after = migrate(absolute_db_url(db_url))
    if before == after:
        click.echo(f"database schema already at revision {after}")
    else:
        click.echo(f"database schema migrated from {before or '(empty)'} to revision {after}")


@click.command()
@DB_OPTION
@_server_storage
@SECRETS_KEY_OPTION
@click.option("--secrets-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The server's --secrets-file (or OTA_SERVER_SECRETS); default: those in the storage directory.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New directory to write the backup into.")
@click.option("--without-secrets-key", is_flag=True,
              help="Leave the secrets key out of the backup (you keep it elsewhere; restoring then needs it).")
def backup(db_url: str, storage: str, work_dir: Path | None, s3_endpoint_url: str | None, s3_region: str | None,
           secrets_key_file: Path | None, secrets_file: Path | None, out: Path, without_secrets_key: bool) -> None:
    """Back up a server, also while it runs: database, artifacts, server secrets and the secrets key. With an
    s3:// --storage: the database and the secrets only; the artifacts stay in the bucket."""
    from ota_server import backup as ops
    from ota_server import secretkeys
    from ota_server.settings import shared_secrets

    local, store = _stores(storage, work_dir, s3_endpoint_url, s3_region)
    keys = secretkeys.resolve(secrets_key_file, local, secrets_file)
    r = ops.backup(absolute_db_url(db_url), local, keys, out, include_key=not without_secrets_key, store=store,
                   shared=shared_secrets(secrets_file))
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    what = (f"{r.artifacts} artifacts" if r.artifact_store is None
            else f"no artifacts (they stay in {r.artifact_store}: keep them with the store's versioning/replication)")
    click.echo(f"backed up {r.database} database (schema {r.revision}), the server secrets, {what}"
               f"{', the secrets key' if r.secrets_key else ', without the secrets key'} into {r.path}")


@click.command()
@click.argument("backup_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@DB_OPTION
@_server_storage
@SECRETS_KEY_OPTION
def restore(backup_dir: Path, db_url: str, storage: str, work_dir: Path | None, s3_endpoint_url: str | None,
            s3_region: str | None, secrets_key_file: Path | None) -> None:
    """Restore BACKUP_DIR into a new database and an empty storage directory.

    The backup's secrets key is written to --secrets-key-file when that file does not exist yet (start the
    server with the same option); an existing file, or OTA_SECRETS_KEYS, must hold the key the secrets were
    encrypted with. The schema is migrated, artifacts are checked against their SHA-256, every secret must
    decrypt. A backup of a server with an s3:// --storage holds no artifacts: give the same --storage and each
    artifact's object is looked for in the bucket."""
    from ota_server import backup as ops

    local, store = _stores(storage, work_dir, s3_endpoint_url, s3_region)
    r = ops.restore(backup_dir, absolute_db_url(db_url), local, secrets_key_file, store=store)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    if r.artifact_store is not None:
        click.echo(f"restored {r.database} database (schema {r.revision}) and the server secrets into {local}; "
                   f"the artifacts are not in the backup: they are in {r.artifact_store}")
    else:
        click.echo(f"restored {r.database} database (schema {r.revision}) and {r.artifacts} artifacts into {local}")


@click.group()
def secrets() -> None:
    """Keys of secret configuration values: make one, rotate, check."""


@secrets.command("new-key")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Key file: created (mode 0600), or the new key is put first and the old keys stay after it.")
def new_key(out: Path | None) -> None:
    """Make a secrets key (printed, or put first in the key file --out)."""
    from ota_server import secretkeys

    if out is None:
        click.echo(secretkeys.generate_key())
        return
    _, count = secretkeys.add_new_key(out)
    if count == 1:
        click.echo(f"wrote a new secrets key to {out}; start the servers with --secrets-key-file {out}")
    else:
        click.echo(f"put a new secrets key first in {out} ({count} keys); restart every server, then run "
                   "`build.py server secrets rotate`")


@secrets.command("new-server-secrets")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="New file (mode 0600) to write the server secrets into.")
@click.option("--without-fernet-key", is_flag=True,
              help="No default secrets key in it (the servers get --secrets-key-file or OTA_SECRETS_KEYS).")
def new_server_secrets(out: Path, without_fernet_key: bool) -> None:
    """Make the server secrets (device token key, download link key, and a default secrets key) that several
    server processes share with --secrets-file OUT (or its JSON in OTA_SERVER_SECRETS)."""
    import json

    from ota_server.settings import new_secrets_doc, write_private

    if out.exists():
        raise UserError(f"{out} exists: the servers using it would lose their tokens and links; choose a new file")
    try:
        write_private(out, json.dumps(new_secrets_doc(not without_fernet_key)).encode(), replace=False)
    except OSError as e:
        raise UserError(f"cannot write {out}: {e.strerror}") from None
    click.echo(f"wrote server secrets to {out}; start every server with --secrets-file {out} (a copy, mode 0600)")


@secrets.command()
@DB_OPTION
@STORAGE_OPTION
@SECRETS_KEY_OPTION
@click.option("--prune", is_flag=True, help="Afterwards keep only the first key in --secrets-key-file.")
def rotate(db_url: str, storage: Path, secrets_key_file: Path | None, prune: bool) -> None:
    """Re-encrypt every secret with the first key (all or nothing). Run it after every server was restarted
    with the new key first; then the old keys can go (--prune)."""
    from ota_server import secretkeys

    storage = storage.resolve()
    keys = secretkeys.resolve(secrets_key_file, storage)
    if keys is None or keys.source == "default":
        raise UserError(f"give the keys, the new one first: {secretkeys.HOW}")
    count, removed = secretkeys.rotate(absolute_db_url(db_url), keys, storage)
    click.echo(f"re-encrypted {count} secrets with the first key from {keys.where}")
    if removed:
        click.echo(f"removed the old key from {storage / 'server-secrets.json'}")
    if prune:
        if keys.file is None:
            raise UserError(f"--prune needs {secretkeys.OPTION}")
        secretkeys.write_key_file(keys.file, keys.keys[:1])
        click.echo(f"{keys.file} now holds only the first key")


@secrets.command()
@DB_OPTION
@STORAGE_OPTION
@SECRETS_KEY_OPTION
def check(db_url: str, storage: Path, secrets_key_file: Path | None) -> None:
    """Check that every secret in the database decrypts with the keys (what the server checks at start)."""
    from ota_server import secretkeys

    keys = secretkeys.resolve(secrets_key_file, storage.resolve())
    count = secretkeys.check_database(absolute_db_url(db_url), keys)
    click.echo(f"{count} secrets decrypt with the keys from {keys.where if keys else '(none)'}")
