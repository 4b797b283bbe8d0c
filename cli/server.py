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

import click

from ota_common.errors import UserError

#: uvicorn's own default: a reverse proxy on this machine may say which scheme and client it saw
DEFAULT_FORWARDED_ALLOW_IPS = "127.0.0.1,::1"

log = logging.getLogger("ota_server")

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_TOKEN_TTL = 365 * 86400


class Duration(click.ParamType):
    """Seconds, or a number with a unit: ``90s``, ``30m``, ``12h``, ``7d``."""

    name = "DURATION"

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower()
        unit = UNITS.get(text[-1:])
        number = text[:-1] if unit else text
        if not number.isdigit() or not 1 <= int(number) * (unit or 1) <= MAX_TOKEN_TTL:
            self.fail(f"{value!r} is not a duration from 1 s to 365 d (seconds, or e.g. 90s, 30m, 12h, 7d)",
                      param, ctx)
        return int(number) * (unit or 1)


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
@click.option("--device-token-ttl", type=Duration(), default="7d", show_default=True,
              help="Lifetime of a device token (seconds, or 30m, 12h, 7d); devices authenticate again when "
              "it ends.")
@click.option("--forwarded-allow-ips", default=DEFAULT_FORWARDED_ALLOW_IPS, show_default=True,
              help="Comma-separated addresses or networks of reverse proxies whose X-Forwarded-Proto and "
              "X-Forwarded-For are believed ('*': any, '': none).")
def server(db_url: str, storage: Path, host: str, port: int, release_keys: Sequence[Path], allow_unsigned: bool,
           admin_token_file: Path | None, workers: int, public_url: str | None, tls_cert: Path | None,
           tls_key: Path | None, forwarded_allow_ips: str, device_token_ttl: int) -> None:
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
                        allow_unsigned=allow_unsigned, public_url=public_url, device_token_ttl=device_token_ttl)
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
