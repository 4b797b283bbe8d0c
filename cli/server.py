"""``build.py server``: run the update server (see docs/server.md)."""

from __future__ import annotations

import ipaddress
import logging
import os
import shutil
import signal
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click

from ota_common.errors import UserError

#: uvicorn's own default: a reverse proxy on this machine may say which scheme and client it saw
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"

log = logging.getLogger("ota_server")


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


@click.command()
@click.option("--db", "db_url", default="sqlite:///./var/ota.db", show_default=True,
              help="Database URL: sqlite:///PATH or postgresql://user:pass@host/db.")
@click.option("--storage", type=click.Path(file_okay=False, path_type=Path), default=Path("var"), show_default=True,
              help="Artifacts, server secrets and the generated admin token live here.")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(1, 65535), default=8080, show_default=True)
@click.option("--release-key", "release_keys", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="Public key trusted for uploaded artifacts (PEM); repeatable. "
              "Also from OTA_RELEASE_KEYS (paths joined by ':').")
@click.option("--allow-unsigned", is_flag=True,
              help="Accept unsigned artifacts (without release keys, uploads are refused otherwise).")
@click.option("--admin-token-file", type=click.Path(dir_okay=False, path_type=Path),
              help="File holding the management API token (default: $OTA_ADMIN_TOKEN, else generated "
              "into STORAGE/admin-token).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Server processes.")
@click.option("--public-url", help="Base URL devices use to reach this server (for download links); default: "
              "the URL of each request.")
@click.option("--tls-cert", type=click.Path(dir_okay=False, path_type=Path),
              help="Serve HTTPS with this certificate (PEM: the server's certificate, then any intermediates); "
              "needs --tls-key.")
@click.option("--tls-key", type=click.Path(dir_okay=False, path_type=Path),
              help="The certificate's private key (PEM, unencrypted); needs --tls-cert.")
@click.option("--forwarded-allow-ips", default=DEFAULT_FORWARDED_ALLOW_IPS, show_default=True,
              help="Comma-separated addresses or networks of reverse proxies whose X-Forwarded-Proto and "
              "X-Forwarded-For are believed ('*': any, '': none).")
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
def server(db_url: str, storage: Path, host: str, port: int, release_keys: Sequence[Path], allow_unsigned: bool,
           admin_token_file: Path | None, workers: int, public_url: str | None, tls_cert: Path | None,
           tls_key: Path | None, forwarded_allow_ips: str, **limits: Any) -> None:
    """Run the update server: Mender-compatible device API, management API (OpenAPI at /docs)."""
    from ota_server.settings import SETTINGS_ENV, Settings, load_or_create_admin_token, load_or_create_secrets

    if (tls_cert is None) != (tls_key is None):
        raise UserError("--tls-cert and --tls-key go together: give both (HTTPS) or neither (HTTP)")
    if tls_cert is not None and tls_key is not None:
        from ota_common.tls import check_server_tls

        check_server_tls(tls_cert, tls_key)
    trusted_proxies = _trusted_proxies(forwarded_allow_ips)
    keys = list(release_keys)
    for p in filter(None, os.environ.get("OTA_RELEASE_KEYS", "").split(":")):
        if not Path(p).is_file():
            raise UserError(f"OTA_RELEASE_KEYS names {p}, which is not a file")
        keys.append(Path(p))
    from artifacts.keys import load_verifiers

    load_verifiers(keys)  # a bad key file is an error now, not at the first upload
    if public_url is not None and not public_url.startswith(("http://", "https://")):
        raise UserError(f"--public-url must start with http:// or https://, not {public_url!r}")
    storage = storage.resolve()
    try:
        storage.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the storage directory {storage}: {e.strerror}") from None

    if admin_token_file is not None:
        try:
            token = admin_token_file.read_text().strip()
        except OSError as e:
            raise UserError(f"cannot read --admin-token-file {admin_token_file}: {e.strerror}") from None
        if not token:
            raise UserError(f"--admin-token-file {admin_token_file} is empty")
    elif os.environ.get("OTA_ADMIN_TOKEN", "").strip():
        token = os.environ["OTA_ADMIN_TOKEN"].strip()
    else:
        token, path, created = load_or_create_admin_token(storage)
        click.echo(f"admin token {'written to' if created else 'read from'} {path}", err=True)

    if db_url.startswith("sqlite:///") and not db_url.startswith("sqlite:////"):
        db_url = "sqlite:///" + str(Path(db_url[len("sqlite:///"):]).resolve())  # workers agree on the file
    settings = Settings(db_url=db_url, storage=storage, admin_token=token, release_keys=tuple(keys),
                        allow_unsigned=allow_unsigned, public_url=public_url, **limits)
    load_or_create_secrets(storage)

    from ota_server.db import migrate

    migrate(db_url)
    _check_port(host, port)

    os.environ[SETTINGS_ENV] = settings.to_env()
    if workers > 1:
        metrics_dir = storage / "prometheus"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    import uvicorn

    scheme = "https" if tls_cert is not None else "http"
    click.echo(f"serving on {scheme}://{host}:{port} ({workers} worker{'s' if workers > 1 else ''}, "
               f"{'release keys: ' + str(len(keys)) if keys else 'no release keys'})", err=True)
    sys.stderr.flush()
    # uvicorn shuts down gracefully on SIGTERM/SIGINT, then re-raises the signal with the previous handlers
    # restored: make that a normal exit (status 0) instead of death by signal
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_cleanly)
    from ota_server.http_protocol import PROTOCOL

    uvicorn.run("ota_server.app:app_from_env", factory=True, host=host, port=port, workers=workers, http=PROTOCOL,
                log_level="warning", access_log=False, timeout_graceful_shutdown=10,
                timeout_keep_alive=settings.keep_alive_timeout,
                server_header=False, proxy_headers=bool(trusted_proxies), forwarded_allow_ips=trusted_proxies or None,
                ssl_certfile=tls_cert, ssl_keyfile=tls_key)


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
