"""``build.py server`` subcommands that operate a server: ``migrate``, ``backup``, ``restore`` and
``secrets new-key|rotate|check`` (docs/server.md, "Running it in production")."""

from __future__ import annotations

from pathlib import Path

import click

from cli.server import DB_OPTION, SECRETS_KEY_OPTION, absolute_db_url
from ota_common.errors import UserError

STORAGE_OPTION = click.option(
    "--storage", type=click.Path(file_okay=False, path_type=Path), default=Path("var"), show_default=True,
    help="The server's storage directory (artifacts, server-secrets.json).")


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
@STORAGE_OPTION
@SECRETS_KEY_OPTION
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="New directory to write the backup into.")
@click.option("--without-secrets-key", is_flag=True,
              help="Leave the secrets key out of the backup (you keep it elsewhere; restoring then needs it).")
def backup(db_url: str, storage: Path, secrets_key_file: Path | None, out: Path, without_secrets_key: bool) -> None:
    """Back up a server, also while it runs: database, artifacts, server secrets and the secrets key."""
    from ota_server import backup as ops
    from ota_server import secretkeys

    keys = secretkeys.resolve(secrets_key_file, storage.resolve())
    r = ops.backup(absolute_db_url(db_url), storage.resolve(), keys, out, include_key=not without_secrets_key)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"backed up {r.database} database (schema {r.revision}), {r.artifacts} artifacts"
               f"{', the secrets key' if r.secrets_key else ', without the secrets key'} into {r.path}")


@click.command()
@click.argument("backup_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@DB_OPTION
@STORAGE_OPTION
@SECRETS_KEY_OPTION
def restore(backup_dir: Path, db_url: str, storage: Path, secrets_key_file: Path | None) -> None:
    """Restore BACKUP_DIR into a new database and an empty storage directory.

    The backup's secrets key is written to --secrets-key-file when that file does not exist yet (start the
    server with the same option); an existing file, or OTA_SECRETS_KEYS, must hold the key the secrets were
    encrypted with. The schema is migrated, artifacts are checked against their SHA-256, every secret must
    decrypt."""
    from ota_server import backup as ops

    storage = storage.resolve()
    r = ops.restore(backup_dir, absolute_db_url(db_url), storage, secrets_key_file)
    for w in r.warnings:
        click.echo(f"warning: {w}", err=True)
    click.echo(f"restored {r.database} database (schema {r.revision}) and {r.artifacts} artifacts into {storage}")


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
