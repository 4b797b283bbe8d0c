"""``build.py server``: run the update server (see docs/server.md); ``build.py server token ...``: its API tokens;
its operating subcommands (``migrate``, ``backup``, ``restore``, ``secrets ...``) are in :mod:`cli.server_admin`."""

from __future__ import annotations

import getpass
import ipaddress
import json
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from ota_common.errors import UserError

if TYPE_CHECKING:
    import sqlalchemy as sa

    from ota_server.db import Database

T = TypeVar("T")

#: uvicorn's own default: a reverse proxy on this machine may say which scheme and client it saw
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"

log = logging.getLogger("ota_server")

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TOKEN_TTL = 365 * 86400

#: the --db option of the server and of its subcommands
DB_OPTION = click.option("--db", "db_url", default="sqlite:///./var/ota.db", show_default=True, envvar="OTA_DB_URL",
                         help="Database URL: sqlite:///PATH or postgresql://user:pass@host/db (also OTA_DB_URL).")
#: the --secrets-key-file option of the server and of its subcommands
SECRETS_KEY_OPTION = click.option(
    "--secrets-key-file", type=click.Path(dir_okay=False, path_type=Path), envvar="OTA_SECRETS_KEY_FILE",
    help="Keys of secret configuration values, one per line, the first encrypts (also OTA_SECRETS_KEY_FILE; or "
    "the keys themselves in OTA_SECRETS_KEYS). Default: a key generated into STORAGE/server-secrets.json.")


def _duration(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """Seconds, or a number with a unit: ``90s``, ``30m``, ``12h``, ``7d`` (1 s to 365 d).

    Raises:
        click.BadParameter: anything else (exit status 2).
    """
    text = str(value).strip().lower()
    unit = UNITS.get(text[-1:])
    number = text[:-1] if unit else text
    if not number.isdigit() or not 1 <= int(number) * (unit or 1) <= MAX_TOKEN_TTL:
        raise click.BadParameter(f"{value!r} is not a duration from 1 s to 365 d (seconds, or e.g. 90s, 30m, 12h, 7d)")
    return int(number) * (unit or 1)


class _Size(click.ParamType):
    """Bytes: 65536, 64K, 64KiB, 16M, 8G."""

    name = "size"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        from ota_server.limits import parse_size

        try:
            return parse_size(str(value), f"--{param.name.replace('_', '-')}" if param and param.name else "size")
        except UserError as e:
            self.fail(str(e), param, ctx)


SIZE = _Size()


def _rate(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from ota_server.limits import parse_rate

    try:
        parse_rate(value, f"--{(param.name or '').replace('_', '-')}")
    except UserError as e:
        raise click.BadParameter(str(e)) from None
    return value


@click.group(invoke_without_command=True)
@DB_OPTION
@click.option("--storage", default="var", show_default=True, metavar="DIR|s3://BUCKET[/PREFIX]",
              help="Artifacts, server secrets and the generated admin token live in DIR; or artifacts in an "
              "S3-compatible bucket (credentials from the environment as boto3 reads them: AWS_ACCESS_KEY_ID, "
              "AWS_SECRET_ACCESS_KEY, AWS_PROFILE ...) and the rest in --work-dir.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path),
              help="With an s3:// --storage: upload temp files, a generated server-secrets.json and admin-token "
              "[default: var].")
@click.option("--s3-endpoint-url", envvar="OTA_S3_ENDPOINT_URL",
              help="URL of the S3-compatible service (MinIO, Ceph ...; default: AWS); devices download from it "
              "(also OTA_S3_ENDPOINT_URL).")
@click.option("--s3-region", envvar="OTA_S3_REGION",
              help="Region of the bucket (default: boto3's, e.g. AWS_DEFAULT_REGION; also OTA_S3_REGION).")
@click.option("--secrets-file", type=click.Path(dir_okay=False, path_type=Path),
              help="The server secrets (token, link and session keys; the JSON of server-secrets.json, mode 0600) "
              "shared by every server process; also the JSON itself in OTA_SERVER_SECRETS. Default: "
              "STORAGE/server-secrets.json, generated.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--release-key", "release_keys", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="Public key trusted for uploaded artifacts (PEM); repeatable. "
              "Also from OTA_RELEASE_KEYS (paths joined by ':').")
@click.option("--allow-unsigned", is_flag=True,
              help="Accept unsigned artifacts (without release keys, uploads are refused otherwise).")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the bootstrap admin token, at least 32 characters (default: $OTA_ADMIN_TOKEN, "
              "else generated into STORAGE/admin-token).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option("--public-url", help="Base URL devices use to reach this server (for download links); default: "
              "the URL of each request.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve HTTPS with this certificate (PEM: the server's certificate, then any intermediates); "
              "needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The certificate's private key (PEM, unencrypted); needs --tls-cert.")
@click.option("--device-token-ttl", callback=_duration, default="7d", show_default=True, metavar="DURATION",
              help="Lifetime of a device token (seconds, or 30m, 12h, 7d); devices authenticate again when "
              "it ends.")
@click.option("--forwarded-allow-ips", default=DEFAULT_FORWARDED_ALLOW_IPS, show_default=True,
              help="Comma-separated addresses or networks of reverse proxies whose X-Forwarded-Proto and "
              "X-Forwarded-For are believed ('*': any, '': none).")
@SECRETS_KEY_OPTION
@click.option("--migrate/--no-migrate", "run_migrations", default=True, show_default=True,
              help="Apply pending migrations before starting. With several servers on one database, run "
              "`build.py server migrate` once and start them with --no-migrate (they refuse an outdated schema).")
@click.option("--public-metrics", is_flag=True, help="Serve /metrics without a token (default: scope read).")
@click.option("--public-docs", is_flag=True,
              help="Serve /docs, /redoc and /openapi.json without a token (default: scope read).")
@click.option("--max-body", type=SIZE, default="16MiB", show_default=True,
              help="Largest JSON/YAML request body with valid credentials (artifact uploads: --max-artifact).")
@click.option("--max-artifact", type=SIZE, default="8GiB", show_default=True, help="Largest artifact upload.")
@click.option("--max-unauthenticated-body", type=SIZE, default="64KiB", show_default=True,
              help="Largest request body without valid credentials, and of every device auth request; refused "
              "(401 or 413) before it is read.")
@click.option("--max-pending-devices", type=click.IntRange(min=0), default=10_000, show_default=True,
              help="Devices waiting for an administrator; a new identity past it gets 429 (0: no cap).")
@click.option("--max-pending-auth-sets", type=click.IntRange(min=0), default=10, show_default=True,
              help="Pending keys of one device; a new key past it gets 429 (0: no cap).")
@click.option("--auth-rate-per-address", default="300/60s", show_default=True, callback=_rate,
              help="Device auth requests per client address, N/PERIOD (a burst of N, N per PERIOD); 'off'. "
              "Each worker process counts on its own.")
@click.option("--auth-rate-per-identity", default="30/60s", show_default=True, callback=_rate,
              help="Device auth requests per identity, N/PERIOD; 'off'. Each worker process counts on its own.")
@click.option("--log-max-bytes", type=SIZE, default="1MiB", show_default=True,
              help="Deployment log stored per device and deployment; the upload that passes it is truncated "
              "(marker message), later ones get 413 (0: no limit).")
@click.option("--log-max-uploads", type=click.IntRange(min=0), default=100, show_default=True,
              help="Log uploads per device and deployment; past it 413 (0: no limit).")
@click.option("--header-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds for a request's line and headers to arrive; then the connection is closed.")
@click.option("--max-header-size", type=SIZE, default="64KiB", show_default=True,
              help="Largest request line and headers (431 past it).")
@click.option("--body-timeout", type=click.FloatRange(min=0.1), default=20.0, show_default=True,
              help="Seconds for a request body to arrive, plus 1 s per --body-min-rate bytes received (408).")
@click.option("--body-min-rate", type=click.IntRange(min=1), default=500, show_default=True,
              help="Bytes per second that extend --body-timeout.")
@click.option("--keep-alive-timeout", type=click.IntRange(min=1), default=5, show_default=True,
              help="Seconds an idle keep-alive connection stays open.")
@click.option("--stale-after", "stale_after", metavar="DURATION", envvar="OTA_STALE_AFTER", default="3h",
              show_default=True, callback=lambda c, p, v: _duration(v, "--stale-after", 1, 365 * 86400),
              help="An accepted device not heard from for this long is stale (dashboard, API, metrics); a few of "
                   "its poll intervals. Also $OTA_STALE_AFTER.")
@click.option("--last-seen-flush", "last_seen_flush_seconds", metavar="DURATION", envvar="OTA_LAST_SEEN_FLUSH",
              default="10s", show_default=True, callback=lambda c, p, v: _duration(v, "--last-seen-flush", 0.05, 3600),
              help="How often each worker writes the 'last seen' times it collected (one UPDATE per batch). Also "
                   "$OTA_LAST_SEEN_FLUSH.")
@click.option("--fleet-ca", "fleet_ca_file", type=click.Path(dir_okay=False, path_type=Path), envvar="OTA_FLEET_CA",
              help="Fleet enrolment CA certificate(s), PEM (from `build.py keys fleet-ca`; also OTA_FLEET_CA): a "
              "device whose auth request carries a valid device certificate issued by one is accepted at once.")
@click.option("--access-log", is_flag=True,
              help="Log every request (client, method, path, status) to stderr, as uvicorn's access log. Download "
                   "paths carry their expiring link signatures.")
@click.pass_context
def server(ctx: click.Context, db_url: str, storage: str, work_dir: Path | None, s3_endpoint_url: str | None,
           s3_region: str | None, secrets_file: Path | None, host: str, port: int, release_keys: Sequence[Path],
           allow_unsigned: bool, admin_token_file: Path | None, workers: int, public_url: str | None,
           tls_cert: Path | None, tls_key: Path | None, forwarded_allow_ips: str, device_token_ttl: int,
           secrets_key_file: Path | None, run_migrations: bool, public_metrics: bool, public_docs: bool,
           fleet_ca_file: Path | None, access_log: bool, **limits: Any) -> None:
    """Run the update server: Mender-compatible device API, management API (OpenAPI at /docs).

    Without a subcommand it serves; `build.py server token create|list|revoke` manage its named API tokens, the
    other subcommands operate it (migrations, backups, secrets keys)."""
    if ctx.invoked_subcommand is not None:
        return  # a subcommand: the options above only lend their --db
    from ota_server.apitokens import hash_token
    from ota_server.settings import (
        SETTINGS_ENV,
        Settings,
        load_or_create_admin_token,
        load_or_create_secrets,
        shared_secrets,
    )

    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)")
    if tls_cert is not None and tls_key is not None:
        from ota_common.tls import check_server_tls

        check_server_tls(tls_cert, tls_key)
    trusted_proxies = _trusted_proxies(forwarded_allow_ips)
    fleet_cas = 0
    if fleet_ca_file is not None:
        from ota_common.fleetca import load_fleet_cas

        fleet_ca_file = fleet_ca_file.resolve()
        try:  # an unusable file is an error now, not in every worker
            fleet_cas = len(load_fleet_cas(fleet_ca_file))
        except UserError as e:
            raise UserError(f"--fleet-ca (or OTA_FLEET_CA): {e}") from None
    keys = list(release_keys)
    for p in filter(None, os.environ.get("OTA_RELEASE_KEYS", "").split(":")):
        if not Path(p).is_file():
            raise UserError(f"OTA_RELEASE_KEYS names {p}, which is not a file")
        keys.append(Path(p))
    from artifacts.keys import load_verifiers

    load_verifiers(keys)  # a bad key file is an error now, not at the first upload
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise UserError(f"--public-url must start with http:// or https://, not {public_url!r}")
    artifact_store, local = storage_option(storage, work_dir, s3_endpoint_url, s3_region)
    storage_dir = local.resolve()
    try:
        storage_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the storage directory {storage_dir}: {e.strerror}") from None
    if secrets_file is not None:
        secrets_file = secrets_file.resolve()
    shared = shared_secrets(secrets_file)  # a file others can read, or malformed secrets: an error now

    if admin_token_file is not None:
        try:
            token = admin_token_file.read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --admin-token-file {admin_token_file}: {e.strerror}") from None
        if not token:
            raise UserError(f"--admin-token-file {admin_token_file} is empty")
        token = _bootstrap(token, f"--admin-token-file {admin_token_file}")
    elif os.environ.get("OTA_ADMIN_TOKEN", "").strip():
        token = _bootstrap(os.environ["OTA_ADMIN_TOKEN"], "OTA_ADMIN_TOKEN")
    else:
        token, path, created = load_or_create_admin_token(storage_dir)
        token = _bootstrap(token, str(path))
        click.echo(f"admin token {'written to' if created else 'read from'} {path}", err=True)
    os.environ.pop("OTA_ADMIN_TOKEN", None)  # the workers inherit the environment: they get only the hash

    db_url = absolute_db_url(db_url)
    from ota_server import secretkeys
    from ota_server.db import check_schema, migrate

    # without a secrets key kept apart, the default one is generated beside the database (as before)
    apart = secrets_key_file is not None or bool(os.environ.get(secretkeys.KEYS_ENV, "").strip())
    if shared is None:
        load_or_create_secrets(storage_dir, with_fernet_key=not apart)
    elif not apart and not shared.doc.get("fernet_key"):
        raise UserError(f"{shared.where} holds no fernet_key and no secrets key is kept apart: give "
                        f"{secretkeys.HOW}, or make the shared secrets with `build.py server secrets "
                        "new-server-secrets`")
    secrets_keys = secretkeys.resolve(secrets_key_file, storage_dir, secrets_file)
    assert secrets_keys is not None  # a key file, the environment, or the default key just made
    settings = Settings(db_url=db_url, storage=storage_dir, admin_token_sha256=hash_token(token),
                        release_keys=tuple(keys), allow_unsigned=allow_unsigned, public_url=public_url,
                        device_token_ttl=device_token_ttl, public_metrics=public_metrics, public_docs=public_docs,
                        secrets_keys=secrets_keys.keys, fleet_ca_file=fleet_ca_file, artifact_store=artifact_store,
                        s3_endpoint_url=s3_endpoint_url, s3_region=s3_region, secrets_file=secrets_file, **limits)
    if artifact_store:
        from ota_server.storage import S3Store

        S3Store(artifact_store, s3_endpoint_url, s3_region).check()  # bucket reachable with these credentials

    if run_migrations:
        migrate(db_url)
    else:
        check_schema(db_url)
    count = secretkeys.check_database(db_url, secrets_keys)
    _check_port(host, port)
    click.echo(f"secrets key from {secrets_keys.where}" + (f" ({count} secrets decrypt)" if count else ""), err=True)

    os.environ[SETTINGS_ENV] = settings.to_env()
    if workers > 1:
        metrics_dir = storage_dir / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    import uvicorn

    scheme = "https" if tls_cert is not None else "http"
    click.echo(f"serving on {scheme}://{host}:{port} ({workers} worker{'s' if workers > 1 else ''}, "
               f"{'release keys: ' + str(len(keys)) if keys else 'no release keys'}"
               f"{f', fleet CAs: {fleet_cas}' if fleet_cas else ''}"
               f"{f', artifacts in {artifact_store}' if artifact_store else ''})", err=True)
    sys.stderr.flush()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the previous handlers
    # restored: make that a normal exit (status 0) instead of death by signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    from ota_server.http_protocol import PROTOCOL

    uvicorn.run("ota_server.app:app_from_env", factory=True, host=host, port=port, workers=workers, http=PROTOCOL,
                log_level=None, access_log=access_log, log_config=_log_config(access_log),
                timeout_graceful_shutdown=10,
                timeout_keep_alive=settings.keep_alive_timeout,
                server_header=False, proxy_headers=bool(trusted_proxies), forwarded_allow_ips=trusted_proxies or None,
                ssl_certfile=tls_cert, ssl_keyfile=tls_key)


def _log_config(access_log: bool) -> dict[str, Any]:
    """uvicorn's own logging configuration: its loggers at WARNING, the access log at INFO when asked (so
    ``uvicorn.run`` gets ``log_level=None``: a level there would apply to the access log too)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    for name in ("uvicorn", "uvicorn.error"):
        config["loggers"].setdefault(name, {})["level"] = "WARNING"
    config["loggers"]["uvicorn.access"]["level"] = "INFO" if access_log else "WARNING"
    config["handlers"]["access"]["stream"] = "ext://sys.stderr"  # with the server's other lines, unbuffered
    return config


def storage_option(storage: str, work_dir: Path | None, s3_endpoint_url: str | None = None,
                   s3_region: str | None = None) -> tuple[str, Path]:
    """``--storage`` (and the options that go with it) → (the artifact store URL, "" for the local directory;
    the local directory of secrets, admin token and upload temp files). Raises UserError for options that do
    not go together or a malformed ``s3://`` URL."""
    from ota_server.storage import is_s3, parse_s3_url

    if not is_s3(storage):
        given = [o for o, v in (("--work-dir", work_dir), ("--s3-endpoint-url", s3_endpoint_url),
                                ("--s3-region", s3_region)) if v]
        if given:
            raise UserError(f"{given[0]} needs an s3:// --storage (--storage {storage} is a directory)")
        return "", Path(storage)
    bucket, prefix = parse_s3_url(storage)
    if s3_endpoint_url is not None and not s3_endpoint_url.startswith(("http://", "https://")):
        raise UserError(f"--s3-endpoint-url must start with http:// or https://, not {s3_endpoint_url!r}")
    return f"s3://{bucket}/{prefix}".rstrip("/"), work_dir if work_dir is not None else Path("var")


def _bootstrap(token: str, source: str) -> str:
    from ota_server.apitokens import check_bootstrap_token

    try:
        return check_bootstrap_token(token, source)
    except ValueError as e:
        raise UserError(str(e)) from None


def absolute_db_url(db_url: str) -> str:
    """A relative SQLite path made absolute (the workers, the subcommands and the token commands agree on the
    file)."""
    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(db_url[len("sqlite:///"):]).resolve())
    return db_url


def _duration(value: str, what: str, low: float, high: float) -> float:
    from ota_server.timeutil import parse_duration

    try:
        return parse_duration(value, what, low, high)
    except UserError as e:
        raise click.BadParameter(str(e)) from None


def _trusted_proxies(value: str) -> list[str]:
    """The --forwarded-allow-ips entries, checked (uvicorn silently takes a mistyped address as a name)."""
    entries = [e.strip() for e in value.split(",") if e.strip()]
    if entries == ["*"]:
        return entries
    for e in entries:
        try:
            ipaddress.ip_network(e, strict=False)
        except ValueError:
            raise UserError(f"--forwarded-allow-ips: {e!r} is not an IP address or network (or a lone '*')") from None
    return entries


def _exit_cleanly(signum: int, _frame: object) -> None:
    click.echo(f"stopped ({signal.Signals(signum).name})", err=True)
    sys.exit(0)


def _check_port(host: str, port: int) -> None:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise UserError(f"cannot resolve --host {host}: {e.strerror}") from None
    family, _, _, _, addr = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror}") from None


# ---------------------------------------------------------------------------------------------------------
# build.py server token ...

DB_HELP = "Database URL (default: the server's --db, sqlite:///./var/ota.db)."


@server.group("token")
def token_group() -> None:
    """Named management API tokens with a scope: read (every GET, dashboard, /metrics, /docs), operate (devices,
    configuration, artifacts, deployments) or admin (tokens, audit log). Only their SHA-256 is stored."""


def _actor() -> str:
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no user name in the environment or the password database
        return f"cli:uid-{os.getuid()}"


def _token_db(ctx: click.Context, db_url: str | None) -> Database:
    """The server's database (migrated: a fresh one gets its schema), from --db here or on ``server``."""
    c: click.Context | None = ctx
    while db_url is None and c is not None:
        if c.command is server:
            db_url = c.params["db_url"]
        c = c.parent
    from ota_server.db import Database, migrate

    url = absolute_db_url(db_url or "sqlite:///./var/ota.db")
    migrate(url)
    return Database(url)


def _run(ctx: click.Context, db_url: str | None, action: str,
         change: Callable[[sa.Connection], tuple[T, str | None]]) -> T:
    """Run ``change(connection)`` (the result and the audit summary, None: nothing changed) in one write
    transaction with its audit entry.

    Raises:
        UserError: what the server's API would have answered with a 4xx (bad name, unknown token ...).
    """
    from ota_server import audit
    from ota_server.errors import APIError

    db = _token_db(ctx, db_url)
    try:
        with db.write() as c:
            result, summary = change(c)
            if summary:
                audit.record(c, _actor(), "CLI", f"server token {action}", summary)
        return result
    except APIError as e:
        raise UserError(e.message) from None
    finally:
        db.dispose()


@token_group.command("create")
@click.option("--name", required=True, help="Unique name: 1-64 of A-Z a-z 0-9 _ - (the audit log shows it).")
@click.option("--scope", type=click.Choice(["read", "operate", "admin"]), required=True)
@click.option("--db", "db_url", help=DB_HELP)
@click.pass_context
def token_create(ctx: click.Context, name: str, scope: str, db_url: str | None) -> None:
    """Create a token and print it on stdout (shown this once: only its hash is kept)."""
    from ota_server.apitokens import create_token

    token = _run(ctx, db_url, "create", lambda c: (
        create_token(c, name, scope, _actor()), f"created API token {name!r} with scope {scope}"))
    click.echo(token)
    click.echo(f"token {name!r} (scope {scope}) created; it is shown only this once", err=True)


@token_group.command("list")
@click.option("--db", "db_url", help=DB_HELP)
@click.option("--json", "as_json", is_flag=True, help="JSON instead of a table.")
@click.pass_context
def token_list(ctx: click.Context, db_url: str | None, as_json: bool) -> None:
    """List the tokens: name, scope, id (the token's public part), creation time and creator."""
    from ota_server.apitokens import list_tokens

    rows: list[dict[str, Any]] = _run(ctx, db_url, "list", lambda c: (list_tokens(c), None))
    if as_json:
        click.echo(json.dumps(rows, indent=1))
        return
    header = ("NAME", "SCOPE", "ID", "CREATED", "CREATED BY")
    table = [header] + [(r["name"], r["scope"], r["id"], r["created"], r["created_by"]) for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())


@token_group.command("revoke")
@click.argument("name")
@click.option("--db", "db_url", help=DB_HELP)
@click.pass_context
def token_revoke(ctx: click.Context, name: str, db_url: str | None) -> None:
    """Revoke a token: it stops working at its next request, on every worker (its dashboard sessions too)."""
    from ota_server.apitokens import revoke_token

    def change(c: sa.Connection) -> tuple[str, str]:
        scope = revoke_token(c, name)
        return scope, f"revoked API token {name!r} (scope {scope})"

    _run(ctx, db_url, "revoke", change)
    click.echo(f"token {name!r} revoked", err=True)


def _register_subcommands() -> None:
    from cli.server_admin import backup, migrate_command, restore, secrets

    for command in (migrate_command, backup, restore, secrets):
        server.add_command(command)


_register_subcommands()
