"""``build.py provision``: personalised cards for a fleet, registered on the update server in one go (the library
is :mod:`image.provision`; registration is ``POST /api/management/v2/devauth/devices/provision``, in batches)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import click

from image.card import Release, registration_item, summary_row
from image.fleet_devices import DeviceSpec, Fleet, from_csv, from_inventory, select
from image.provision import ProvisionedCard, card_settings, provision_cards
from ota_common.errors import OTAError, UserError
from ota_common.varnames import SECRETS_KEY

from .common import progress_line
from .fleet import CA_ENV, ClientManagement, Management
from .publish import admin_token
from .vault import vault_decrypt

DEVICES_PATH = "/api/management/v2/devauth/devices"
GROUP_CONFIG_PATH = "/api/management/v1/deviceconfig/configurations/group/"
PROVISION_PATH = DEVICES_PATH + "/provision"
#: devices per registration call (the server takes at most 1,000)
BATCH = 1000
TABLE = ("device", "hostname", "group", "variables", "certificate", "file", "seconds")

PATH = click.Path(path_type=Path)
FILE = click.Path(exists=True, dir_okay=False, path_type=Path)
DIR = click.Path(exists=True, file_okay=False, path_type=Path)


def register(api: Management, cards: Sequence[ProvisionedCard], batch: int = BATCH) -> list[str]:
    """Register every card's device; returns the server's device ids. Raises what the server refuses."""
    ids: list[str] = []
    for start in range(0, len(cards), batch):
        chunk = cards[start:start + batch]
        answer = api.call("POST", PROVISION_PATH, {"devices": [registration_item(c.content) for c in chunk]})
        ids += answer["ids"]
    return ids


def set_groups(api: Management, fleet: Fleet, devices: Sequence[DeviceSpec]) -> list[str]:
    """Give the server the variables of the provisioned devices' groups (the inventory is the source of truth,
    as for ``fleet import-ansible``: each group's variables are replaced). Returns the groups set."""
    done = []
    for group in sorted({d.group for d in devices if d.group and d.group in fleet.groups}):
        values, secrets = fleet.groups[group]
        body: dict[str, object] = dict(values)
        if secrets:
            body[SECRETS_KEY] = sorted(secrets)
        api.call("PUT", GROUP_CONFIG_PATH + group, body)
        done.append(group)
    return done


def table(cards: Sequence[ProvisionedCard], to: Path | None) -> list[str]:
    rows = [{**summary_row(c.content), "file": str(c.image) if c.image else str(to), "seconds": f"{c.seconds:.1f}"}
            for c in cards]
    widths = {k: max(len(k), *(len(r[k]) for r in rows)) for k in TABLE}
    line = "  ".join(f"{{{k}:<{widths[k]}}}" for k in TABLE)
    return [line.format(**{k: k for k in TABLE}).rstrip(), *(line.format(**r).rstrip() for r in rows)]


@click.command("provision")
@click.option("--release", "release_dir", required=True, type=DIR, metavar="DIR",
              help="The release's board directory (out/<version>/<board>: disk.img and the release's manifest).")
@click.option("--inventory", type=click.Path(exists=True, path_type=Path), metavar="PATH",
              help="The devices from an Ansible inventory (file or directory, with group_vars/ and host_vars/).")
@click.option("--vault-password-file", type=FILE, help="Decrypt the inventory's vaults here (needs ansible-core).")
@click.option("--csv", "csv_file", type=FILE, metavar="FILE",
              help="The devices from a CSV file: header device_id,group,<VAR>...; a column secret:<VAR> is secret.")
@click.option("--limit", metavar="PATTERN",
              help="Only these hosts or groups, as Ansible's --limit: 'north,cam-0[1-3],!cam-02', '~regex', '&group'.")
@click.option("--fleet-ca", type=DIR, metavar="DIR",
              help="Issue each device a certificate from this fleet CA (build.py keys fleet-ca).")
@click.option("--server", metavar="URL",
              help="The update server: written to the card's ota.conf, and where the devices are registered "
                   "(token from $OTA_ADMIN_TOKEN, scope operate).")
@click.option("--register-url", metavar="URL", envvar="OTA_SERVER_URL",
              help="Where this machine reaches the server's management API to register the devices, when it is "
                   "not the --server URL the devices use (also $OTA_SERVER_URL; default: --server).")
@click.option("--server-ca", type=FILE, metavar="PEM",
              help="The server's CA certificates: onto the card, and trusted for the registration.")
@click.option("--no-register", is_flag=True, help="Write the cards only; register nothing on the server.")
@click.option("--ssh-key", "ssh_keys", type=FILE, multiple=True, metavar="FILE",
              help="Operator SSH public keys for the card's authorized_keys (repeatable; added to the host's "
                   "SSH_AUTHORIZED_KEYS variable).")
@click.option("--out", type=PATH, metavar="DIR", help="Where the cards go (default: <release>/cards).")
@click.option("--to", type=PATH, metavar="DEVICE",
              help="Write the one selected device's card to this block device (bmaptool copy) instead of --out. "
                   "Refused for a partition, a mounted or system disk, or one that is too small.")
@click.option("--force", is_flag=True, help="Overwrite existing card images in --out.")
def provision(release_dir: Path, inventory: Path | None, vault_password_file: Path | None, csv_file: Path | None,
              limit: str | None, fleet_ca: Path | None, server: str | None, register_url: str | None,
              server_ca: Path | None,
              no_register: bool, ssh_keys: Sequence[Path], out: Path | None, to: Path | None, force: bool) -> None:
    """Personalise one card per device from a release (--release) and a device list, and register the devices on the
    update server, so that each card's first boot ends accepted with its configuration.

    Each card is the release's disk.img with its data partition rebuilt: ota/device_id, a new ed25519 device key
    (only ever on the card), its fleet certificate, provisioned.env (DEVICE_ID and the variables the release
    declares; the others are kept on the server only), ota.conf, server-ca.pem, authorized_keys. Per device:
    <out>/<DEVICE_ID>.img (0600: it holds the key) and <DEVICE_ID>.img.bmap (write it with
    `bmaptool copy --bmap X.img.bmap X.img /dev/sdX`), or --to /dev/sdX for one device.

    DEVICE_ID is the host's DEVICE_ID variable, else its name. Provisioning a device again (a new card) retires
    its old card on the server, even an accepted one."""
    if (inventory is None) == (csv_file is None):
        raise UserError("give the devices with either --inventory PATH or --csv FILE")
    if vault_password_file is not None and inventory is None:
        raise UserError("--vault-password-file goes with --inventory")
    if not no_register and not server:
        raise UserError("give the update server with --server URL (or --no-register to write the cards only)")
    release = Release.load(release_dir)
    if inventory is not None:
        fleet = from_inventory(inventory, vault_decrypt(vault_password_file) if vault_password_file else None)
    else:
        assert csv_file is not None
        fleet = from_csv(csv_file)
    for w in fleet.warnings:
        click.echo(f"warning: {w}", err=True)
    devices = select(fleet, limit)
    settings, notes = card_settings(release, server_url=server, server_ca=server_ca, ssh_keys=ssh_keys,
                                    fleet_ca=fleet_ca)
    for note in notes:
        click.echo(f"note: {note}", err=True)
    api: Management | None = None
    if not no_register:
        assert server is not None
        ca = str(server_ca) if server_ca is not None else os.environ.get(CA_ENV) or None
        api = ClientManagement(register_url or server, admin_token(), ca)
        api.call("GET", DEVICES_PATH, params={"per_page": "1"})  # server and token checked before any card is written
    cards = provision_cards(release, devices, settings, out or release_dir / "cards", force=force, to=to,
                            progress=progress_line)
    for line in table(cards, to):
        click.echo(line)
    if api is None:
        click.echo(f"wrote {len(cards)} card(s); registered nothing (--no-register)")
        return
    try:
        ids = register(api, cards)
        groups = set_groups(api, fleet, devices)
    except OTAError:
        click.echo("the cards are written but their devices are not registered: run again with --force to make new "
                   "cards (the server takes their keys)", err=True)
        raise
    where = register_url or server
    click.echo(f"registered {len(ids)} devices on {where}" + (f"; variables of group(s) {', '.join(groups)} set"
                                                              if groups else ""))
