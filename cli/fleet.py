"""``build.py fleet``: the fleet as a whole, through the server's management API.

- ``fleet import-ansible INVENTORY``: read an Ansible inventory (file or directory, with ``group_vars/`` and
  ``host_vars/``), decrypt its vaults here (``--vault-password-file``), and send the resolved form to
  ``POST /api/management/v1/inventory/import/ansible``;
- ``fleet accept``: bulk accept (``POST /api/management/v2/devauth/devices/accept``) by id, identity or group;
- ``fleet revoke-cert``: revoke a device certificate of the fleet enrolment CA
  (``POST /api/management/v2/devauth/certificates/revoked``).

The server comes from ``--server`` or ``$OTA_SERVER_URL``, the token from ``$OTA_ADMIN_TOKEN`` (scope ``operate``),
a private CA from ``$OTA_CA_FILE``. The HTTP calls go through :class:`Management` (one method), so another
transport can stand in for :class:`ClientManagement`.
"""

from __future__ import annotations

import json
import os
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlencode

import click

from devkit.client import ManagementClient, check_url
from ota_common.ansible_files import load_inventory
from ota_common.ansible_wire import to_json
from ota_common.errors import OTAError, UserError

from .publish import admin_token
from .vault import vault_decrypt

IMPORT_PATH = "/api/management/v1/inventory/import/ansible"
ACCEPT_PATH = "/api/management/v2/devauth/devices/accept"
REVOKED_PATH = "/api/management/v2/devauth/certificates/revoked"
CA_ENV = "OTA_CA_FILE"


class ServerRefused(OTAError):
    """The server answered with an error (its message says why)."""

    exit_code = 1


class Management(Protocol):
    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        """The JSON answer of a 2xx; raises ServerRefused (4xx/5xx), UserError (401), DownloadError (network)."""


class ClientManagement:
    """:class:`Management` over :class:`devkit.client.ManagementClient` (the one management client)."""

    def __init__(self, url: str, token: str, ca_file: str | None = None) -> None:
        check_url(url)
        context = ssl.create_default_context(cafile=ca_file) if ca_file else None
        self.client = ManagementClient(url.rstrip("/"), token, context=context, timeout=600)

    def call(self, method: str, path: str, body: Any = None, params: dict[str, str] | None = None) -> Any:
        target = path + (f"?{urlencode(params)}" if params else "")
        r = self.client.request(method, target) if body is None else self.client.send_json(method, target, body)
        if r.status == 401:
            raise UserError(f"the update server at {self.client.url} refused the admin token ($OTA_ADMIN_TOKEN)")
        if not 200 <= r.status < 300:
            raise ServerRefused(f"{method} {path}: HTTP {r.status}: {r.error()}")
        return r.json() if r.body else None


def management(server: str | None) -> Management:
    if not server:
        raise UserError("give the update server with --server URL or $OTA_SERVER_URL")
    return ClientManagement(server, admin_token(), os.environ.get(CA_ENV) or None)


SERVER_OPTION = click.option("--server", envvar="OTA_SERVER_URL", metavar="URL",
                             help="The update server (also $OTA_SERVER_URL); the token comes from $OTA_ADMIN_TOKEN.")


@click.group()
def fleet() -> None:
    """The fleet as a whole: Ansible inventory import, bulk accept, revoking device certificates."""


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
