"""``build.py provision``: from a release and a device list to personalised cards (:mod:`image.card`), one image per
device in ``--out`` or one card written to a block device (``--to``, checked by :mod:`image.target_disk`).

Everything that can be refused is refused before the first card is written: the release, the device list
(:mod:`image.fleet_devices`: ids, duplicates), each device's files (keys are made in memory, values checked),
existing outputs (kept unless ``force``), the target disk. Registration on the server is the caller's (the CLI has
the management client); :func:`image.card.registration_item` gives what it sends.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ota_common.errors import UserError
from ota_common.files import read_input
from ota_common.fleetca import FleetCA
from ota_common.tools import run

from .card import CardContent, CardSettings, Release, card_content, dump_data_tree, ssh_key_lines, write_card
from .disk import bmap
from .fleet_devices import DeviceSpec
from .target_disk import SystemView, check_target
from .trust import check_server_url, load_server_ca


@dataclass(frozen=True)
class ProvisionedCard:
    content: CardContent
    image: Path | None  # None: written to a block device
    bmap: Path | None
    seconds: float


def card_settings(release: Release, *, server_url: str | None, server_ca: Path | None,
                  ssh_keys: Sequence[Path] = (), fleet_ca: Path | None = None) -> tuple[CardSettings, list[str]]:
    """What every card gets, checked; and notes for the operator. Raises UserError."""
    notes: list[str] = []
    if server_ca is not None and not server_url:
        raise UserError("a server CA (--server-ca) goes with a server URL (--server)")
    if server_url:
        notes += check_server_url(server_url, insecure_http=release.manifest.trust.insecure_http,
                                  server_ca=server_ca is not None or release.manifest.trust.server_ca > 0,
                                  config=f"the release.yaml of release {release.manifest.version}")
    lines: list[str] = []
    for path in ssh_keys:
        lines += ssh_key_lines(read_input(path, "SSH key file").decode(errors="replace"), str(path))
    return CardSettings(release.declared, server_url or None,
                        load_server_ca(server_ca) if server_ca is not None else None, tuple(lines),
                        FleetCA(fleet_ca) if fleet_ca is not None else None), notes


def card_image(out: Path, device_id: str) -> Path:
    return out / f"{device_id}.img"


def check_outputs(out: Path, devices: Sequence[DeviceSpec], force: bool) -> None:
    """Raises UserError when a card image or bmap of these devices exists already (unless ``force``)."""
    if force:
        return
    existing = [p for d in devices for p in (card_image(out, d.device_id), out / f"{d.device_id}.img.bmap")
                if p.exists()]
    if existing:
        more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
        raise UserError(f"{existing[0]} exists{more}: give --force to overwrite (the cards made before stop working "
                        "once the new ones are registered)")


def provision_cards(release: Release, devices: Sequence[DeviceSpec], settings: CardSettings, out: Path, *,
                    force: bool = False, to: Path | None = None, system: SystemView | None = None,
                    progress: Callable[[str], None] = lambda _: None) -> list[ProvisionedCard]:
    """Write one card per device into ``out`` (``<DEVICE_ID>.img`` + ``.img.bmap``), or the one device's card onto
    the block device ``to`` with ``bmaptool copy`` (its image is made in a temporary directory and removed)."""
    if to is not None:
        if len(devices) != 1:
            raise UserError(f"--to writes one card: select exactly one device (with --limit); {len(devices)} are "
                            "selected")
        check_target(to, release.size, system)
    else:
        check_outputs(out, devices, force)
    contents = [card_content(d, settings) for d in devices]  # every value checked before a card is written
    out.mkdir(parents=True, exist_ok=True)
    done: list[ProvisionedCard] = []
    with tempfile.TemporaryDirectory(prefix=".provision-", dir=out) as tmp:
        work = Path(tmp)
        tree = dump_data_tree(release, work / "release-data")
        for n, content in enumerate(contents, 1):
            device_id = content.spec.device_id
            dest = work / f"{device_id}.img" if to is not None else card_image(out, device_id)
            started = time.monotonic()
            written = write_card(release, tree, content, dest, work)
            card_bmap = bmap(written.path)
            if to is not None:
                progress(f"writing {device_id}'s card to {to}")
                run(["bmaptool", "copy", "--bmap", card_bmap, written.path, to], stage=f"write the card to {to}")
                done.append(ProvisionedCard(content, None, None, time.monotonic() - started))
            else:
                done.append(ProvisionedCard(content, written.path, card_bmap, time.monotonic() - started))
            seconds = done[-1].seconds
            progress(f"card {n}/{len(contents)}: {device_id} ({seconds:.1f} s)")
    return done


__all__ = ["ProvisionedCard", "card_image", "card_settings", "check_outputs", "provision_cards"]
