"""``build.py fleet``: the fleet as a whole, through the server's management API.

- ``fleet import-ansible INVENTORY``: read an Ansible inventory (file or directory, with ``group_vars/`` and
  ``host_vars/``), decrypt its vaults here (``--vault-password-file``), and send the resolved form to
  ``POST /api/management/v1/inventory/import/ansible``;
- ``fleet accept``: bulk accept (``POST /api/management/v2/devauth/devices/accept``) by id, identity or group;
- ``fleet revoke-cert``: revoke a device certificate of the fleet enrolment CA
  (``POST /api/management/v2/devauth/certificates/revoked``).

The operator's commands (devices, groups, deployments, configuration) live in ``fleet_devices``, ``fleet_deploy``
and ``fleet_config``, which register themselves on :func:`fleet` when ``build.py`` imports them.

The server, the token (scope ``operate`` for changes, ``read`` for listings) and a private CA come from the options,
the environment or ``~/.config/vv-ota/cli.toml`` (:mod:`cli.fleet_conn` has the precedence). The HTTP calls go
through :class:`Management` (``call``, ``response``), so another transport can stand in for :class:`ClientManagement`.
"""

from __future__ import annotations

import json
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import click

from devkit.client import ManagementClient, Response, check_url
from ota_common.ansible_files import load_inventory
from ota_common.ansible_wire import to_json
from ota_common.errors import OTAError, UserError

from .fleet_conn import resolve
from .vault import vault_decrypt

IMPORT_PATH = "/api/management/v1/inventory/import/ansible"
ACCEPT_PATH = "/api/management/v2/devauth/devices/accept"
REVOKED_PATH = "/api/management/v2/devauth/certificates/revoked"
CA_ENV = "OTA_CA_FILE"


class ServerRefused(OTAError):
    """The server answered with an error (its message says why); ``status`` is the HTTP status and ``reason`` the
    server's own message, so a caller tells an unknown id (404) or refused input (400) from other refusals."""

    exit_code = 1

    def __init__(self, message: str, status: int = 0, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason or message


class Management(Protocol):
    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        """The JSON answer of a 2xx; raises ServerRefused (4xx/5xx), UserError (401), DownloadError (network)."""

    def response(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Response:
        """The whole answer of a 2xx (headers, a body that is not JSON); raises as :meth:`call` does."""


class ClientManagement:
    """:class:`Management` over :class:`devkit.client.ManagementClient` (the one management client)."""

    def __init__(self, url: str, token: str, ca_file: str | None = None, token_from: str = "$OTA_ADMIN_TOKEN") -> None:
        check_url(url)
        try:
            context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        except (OSError, ssl.SSLError) as e:
            raise UserError(f"cannot use the CA file {ca_file}: {e}") from None
        self.client = ManagementClient(url.rstrip("/"), token, context=context, timeout=600)
        self.token_from = token_from

    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        r = self.response(method, path, body, params)
        return r.json() if r.body else None

    def response(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Response:
        target = path + (f"?{urlencode(params)}" if params else "")
        r = self.client.request(method, target) if body is None else self.client.send_json(method, target, body)
        if r.status == 401:
            raise UserError(f"the update server at {self.client.url} refused the API token ({self.token_from})")
        if not 200 <= r.status < 300:
            raise ServerRefused(f"{method} {path}: HTTP {r.status}: {r.error()}", r.status, r.error())
        return r


#: where ``fleet --server`` is kept for the commands (in the root context's ``meta``)
SERVER_META = "vv-ota.fleet.server"


def management(server: str | None) -> Management:
    """The management API of ``server`` (a command's ``--server``), else of ``fleet --server``, $OTA_SERVER_URL or
    the configuration file. Raises UserError when no server or token is found."""
    ctx = click.get_current_context(silent=True)
    group_server = ctx.find_root().meta.get(SERVER_META) if ctx else None
    conn = resolve(server, group_server)
    return ClientManagement(conn.url, conn.token, conn.ca_file, conn.token_from)


SERVER_OPTION = click.option("--server", metavar="URL",
                             help="The update server (overrides fleet --server, $OTA_SERVER_URL and cli.toml).")


@click.group()
@click.option("--server", metavar="URL", help="The update server for every fleet command (see above).")
@click.pass_context
def fleet(ctx: click.Context, server: str | None) -> None:
    """The fleet through the update server's management API: devices, groups, deployments, configuration,
    Ansible inventory import, revoking device certificates.

    \b
    Server, API token and CA (first found wins):
      server  the command's --server, fleet --server, $OTA_SERVER_URL,
              server in cli.toml
      token   $OTA_ADMIN_TOKEN, token_file (or token) in cli.toml
      CA      $OTA_CA_FILE, ca_file in cli.toml
    cli.toml is $XDG_CONFIG_HOME/vv-ota/cli.toml (~/.config/vv-ota/cli.toml):
      server = "https://ota.lab:8443"
      token_file = "token"   # relative to cli.toml, mode 0600
      ca_file = "ca.pem"

    A token file (or a cli.toml holding a token) that other users can read is refused; the file's token is sent
    to the file's server only. Listings need a token with scope read, changes scope operate. Listings take
    --json for scripts. Errors are one line on stderr: exit 2 for input to fix, 1 when the server refused,
    4 when it cannot be reached."""
    ctx.find_root().meta[SERVER_META] = server


@fleet.command("import-ansible")
@click.argument("inventory", type=click.Path(exists=True, path_type=Path))
@click.option("--vault-password-file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Decrypt vault-encrypted values and files here (needs ansible-core); the server gets them as "
                   "secrets.")
@click.option("--dry-run", is_flag=True, help="Show what the server would change, change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@SERVER_OPTION
def import_ansible(inventory: Path, vault_password_file: Path | None, dry_run: bool, as_json: bool,
                   server: str | None) -> None:
    """Import groups and variables from an Ansible INVENTORY (INI or YAML file, or a directory) with its
    group_vars/ and host_vars/. Hosts without a device yet are staged on the server until one is accepted;
    ansible_* variables are never sent."""
    decrypt = vault_decrypt(vault_password_file) if vault_password_file else None
    resolved = load_inventory(inventory, decrypt).resolve()
    api = management(server)
    answer = api.call("POST", IMPORT_PATH, to_json(resolved), {"dry_run": "true"} if dry_run else None)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    for line in import_report(answer, resolved.dropped, resolved.warnings):
        click.echo(line)


def import_report(answer: dict[str, Any], dropped: dict[str, list[str]], warnings: Sequence[str]) -> list[str]:
    """The answer as lines: one per host, then the dropped names (never values) and the warnings."""
    lines = [f"matched  {m['host']} → {m['device_id']} (group {m['group']}; {len(m['variables'])} variable(s))"
             for m in answer.get("matched", [])]
    lines += [f"staged   {s['host']} (group {s['group']}; {len(s['variables'])} variable(s)): applied when its "
              "device is accepted" for s in answer.get("staged", [])]
    staged = {s["host"] for s in answer.get("staged", [])}
    lines += [f"skipped  {u['host']}: {u['reason']}" for u in answer.get("unmatched", []) if u["host"] not in staged]
    lines += [f"dropped  {owner}: {', '.join(names)} (Ansible connection variables are never imported)"
              for owner, names in sorted(dropped.items())]
    lines += [f"warning  {w}" for w in [*warnings, *answer.get("warnings", [])]]
    lines.append(f"{'would import' if answer.get('dry_run') else 'imported'}: {len(answer.get('matched', []))} "
                 f"matched, {len(staged)} staged, {len(answer.get('groups', {}))} group(s)")
    return lines


@fleet.command("accept")
@click.option("--all-pending", is_flag=True, help="Every pending device.")
@click.option("--id", "ids", multiple=True, metavar="ID", help="A device id (repeat for more).")
@click.option("--identity", "identity", multiple=True, metavar="NAME=VALUE",
              help="Pending devices whose identity has this attribute (repeat: all must match).")
@click.option("--group", help="Pending devices of this group.")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@SERVER_OPTION
def accept(all_pending: bool, ids: Sequence[str], identity: Sequence[str], group: str | None, as_json: bool,
           server: str | None) -> None:
    """Accept many devices at once: --all-pending, --id ID ..., or a filter (--identity NAME=VALUE, --group)."""
    api = management(server)
    answer = api.call("POST", ACCEPT_PATH, accept_body(all_pending, ids, identity, group))
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    for r in answer["results"]:
        click.echo(f"{r['id']}: {r['result']}" + (f" ({r['staged']})" if r.get("staged") else ""))
    click.echo(f"accepted {answer['accepted']} of {len(answer['results'])} device(s)")


def accept_body(all_pending: bool, ids: Sequence[str], identity: Sequence[str], group: str | None) -> dict[str, Any]:
    """The request body; raises UserError unless exactly one way of choosing devices is given."""
    ways = sum([all_pending, bool(ids), bool(identity or group)])
    if ways != 1:
        raise UserError("choose the devices one way: --all-pending, --id ID ..., or --identity NAME=VALUE/--group")
    if ids:
        return {"ids": list(ids)}
    filt: dict[str, Any] = {"status": "pending"}
    if identity:
        pairs = [i.partition("=") for i in identity]
        if any(not eq or not name for name, eq, _ in pairs):
            raise UserError("--identity takes NAME=VALUE")
        filt["identity"] = {name: value for name, _, value in pairs}
    if group:
        filt["group"] = group
    return {"filter": filt}


@fleet.command("revoke-cert")
@click.option("--cert", "cert_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The device certificate (PEM, e.g. a card's /data/ota/device-cert.pem): its key is revoked too.")
@click.option("--serial", metavar="HEX", help="The certificate's serial number in hex (colons allowed).")
@click.option("--reason", default="", help="Why (kept with the revocation and in the audit log).")
@click.option("--json", "as_json", is_flag=True, help="Print the server's answer as JSON.")
@SERVER_OPTION
def revoke_cert(cert_file: Path | None, serial: str | None, reason: str, as_json: bool, server: str | None) -> None:
    """Revoke a device certificate of the fleet CA (--cert FILE or --serial HEX): it never enrols a device again,
    and the devices accepted with its key lose their token at their next request. Idempotent."""
    if (cert_file is None) == (serial is None):
        raise UserError("give the certificate one way: --cert FILE or --serial HEX")
    body: dict[str, Any] = {"reason": reason}
    if cert_file is not None:
        try:
            body["certificate"] = cert_file.read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read the certificate {cert_file}: {e}") from None
    else:
        body["serial"] = serial
    answer = management(server).call("POST", REVOKED_PATH, body)
    if as_json:
        click.echo(json.dumps(answer, indent=2, sort_keys=True))
        return
    click.echo(f"revoked certificate {answer['serial']} ({answer['device_id'] or 'device id unknown'}) "
               f"by {answer['revoked_by']} at {answer['revoked_ts']}")
    for aset in answer["rejected"]:
        click.echo(f"rejected auth set {aset}")
