"""``build.py fleet devices|device show|reject|decommission|groups|group set|group unset``: the devices and their
groups through the management API (devauth v2 and inventory v1).

Commands that change several devices look every id up first and change nothing when one is unknown, so a typo
in a long list never leaves the fleet half changed.
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Sequence
from typing import Any

import click

from ota_common.errors import UserError
from ota_common.varnames import is_group_name

from .fleet import SERVER_OPTION, Management, fleet, management
from .fleet_view import (
    CONFIG,
    DEVAUTH,
    INVENTORY,
    clean,
    console,
    device_record,
    display_name,
    get_or_unknown,
    inventory_parts,
    list_devices,
    name_values,
    print_json,
    row,
    section,
    seg,
    short_time,
    table,
)

STATUSES = ("pending", "accepted", "rejected", "preauthorized")
JSON_OPTION = click.option("--json", "as_json", is_flag=True, help="Print JSON (for scripts) instead of a table.")


def group_name(name: str) -> str:
    if not is_group_name(name):
        raise UserError(f"invalid group name {clean(name)!r}: use 1-64 characters A-Z a-z 0-9 _ -")
    return name


@fleet.command("devices")
@click.option("--status", type=click.Choice(STATUSES), help="Only devices with this status.")
@click.option("--group", metavar="G", help="Only devices of this group.")
@click.option("--filter", "filters", multiple=True, metavar="NAME=VALUE",
              help="Only devices whose identity or inventory attribute NAME is VALUE (repeat: all must match). "
                   "These attributes are what the devices report about themselves.")
@JSON_OPTION
@SERVER_OPTION
def devices_command(status: str | None, group: str | None, filters: Sequence[str], as_json: bool,
                    server: str | None) -> None:
    """List devices: id, status, group, name (from the identity), running artifact and device type."""
    wanted = name_values(filters, "--filter")
    found = list_devices(management(server), status, group_name(group) if group else None, wanted)
    if as_json:
        print_json(found)
        return
    t = table("ID", "STATUS", "GROUP", "NAME", "ARTIFACT", "TYPE", "UPDATED (UTC)")
    for d in found:
        row(t, d["id"], d["status"], d["group"], display_name(d["identity_data"]) or None,
            d["inventory"].get("artifact_name"), d["inventory"].get("device_type"), short_time(d["updated_ts"]))
    out = console()
    out.print(t)
    out.print(f"{len(found)} device(s)", highlight=False)


@fleet.group("device")
def device_group() -> None:
    """One device."""


def device_doc(api: Management, device_id: str) -> dict[str, Any]:
    """The device record with its configuration (secrets masked by the server). Raises UserError if unknown."""
    auth = get_or_unknown(api, f"{DEVAUTH}/{seg(device_id)}", f"device {clean(device_id)!r}")
    inv = get_or_unknown(api, f"{INVENTORY}/devices/{seg(device_id)}", f"device {clean(device_id)!r}")
    doc = device_record(auth, inv)
    doc["auth_sets"] = [{"id": s["id"], "status": s["status"], "ts": s.get("ts"), "pubkey": s.get("pubkey")}
                        for s in auth.get("auth_sets", [])]
    config = get_or_unknown(api, f"{CONFIG}/device/{seg(device_id)}", f"device {clean(device_id)!r}")
    doc["configuration"] = {k: config.get(k) for k in ("configured", "secrets", "effective", "effective_secrets")}
    return doc


@device_group.command("show")
@click.argument("device_id", metavar="ID")
@JSON_OPTION
@SERVER_OPTION
def device_show(device_id: str, as_json: bool, server: str | None) -> None:
    """Identity, status, group, inventory, configuration (secrets masked) and keys (auth sets) of device ID."""
    doc = device_doc(management(server), device_id)
    if as_json:
        print_json(doc)
        return
    out = console()
    head = table("", "", header=False)
    row(head, "status", doc["status"])
    row(head, "group", doc["group"])
    row(head, "created (UTC)", short_time(doc["created_ts"]))
    row(head, "updated (UTC)", short_time(doc["updated_ts"]))
    section(out, f"device {doc['id']}", head)
    for title, attrs in (("identity (what the device says it is)", doc["identity_data"]),
                         ("inventory (what the device reports)", doc["inventory"])):
        t = table("NAME", "VALUE")
        for k, v in sorted(attrs.items()):
            row(t, k, v)
        section(out, title, t)
    cfg = doc["configuration"]
    t = table("NAME", "VALUE", "FROM", "SECRET")
    own = cfg.get("configured") or {}
    for k, v in sorted((cfg.get("effective") or {}).items()):
        row(t, k, v, "device" if k in own else "group", "yes" if k in (cfg.get("effective_secrets") or []) else "")
    section(out, "configuration (what the device receives: its group's variables, overridden by its own)", t)
    t = table("AUTH SET", "STATUS", "SINCE (UTC)")
    for s in doc["auth_sets"]:
        row(t, s["id"], s["status"], short_time(s["ts"]))
    section(out, "keys (auth sets)", t)


@fleet.command("reject")
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@SERVER_OPTION
def reject(device_ids: Sequence[str], as_json: bool, server: str | None) -> None:
    """Reject devices: each one's pending and accepted keys are rejected, so it gets 401 at its next request
    (it stays listed as rejected; decommission removes it). Every ID is looked up first: nothing changes when
    one is unknown."""
    api = management(server)
    docs = [get_or_unknown(api, f"{DEVAUTH}/{seg(i)}", f"device {clean(i)!r}") for i in dict.fromkeys(device_ids)]
    results = []
    for d in docs:
        live = [s for s in d.get("auth_sets", []) if s["status"] in ("pending", "accepted", "preauthorized")]
        for s in live:
            api.call("PUT", f"{DEVAUTH}/{seg(d['id'])}/auth/{seg(s['id'])}/status", {"status": "rejected"})
        results.append({"id": d["id"], "result": f"rejected ({len(live)} key(s))" if live else "already rejected"})
    if as_json:
        print_json({"results": results, "rejected": sum(r["result"].startswith("rejected") for r in results)})
        return
    for r in results:
        click.echo(f"{r['id']}: {r['result']}")


@fleet.command("decommission")
@click.argument("device_id", metavar="ID")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation (needed when stdin is not a terminal).")
@SERVER_OPTION
def decommission(device_id: str, yes: bool, server: str | None) -> None:
    """Decommission device ID: its keys, inventory and variables are removed, its token stops working at once,
    its unfinished deployments count it as decommissioned. If it asks again it is a new pending device."""
    api = management(server)
    d = get_or_unknown(api, f"{DEVAUTH}/{seg(device_id)}", f"device {clean(device_id)!r}")
    if not yes:
        if not sys.stdin.isatty():
            raise UserError("decommissioning cannot be undone: give --yes when not running in a terminal")
        name = display_name(d.get("identity_data", {}))
        click.confirm(f"decommission {d['id']}{f' ({clean(name)})' if name else ''}, {d['status']}? "
                      "This cannot be undone", abort=True)
    api.call("DELETE", f"{DEVAUTH}/{seg(d['id'])}")
    click.echo(f"{d['id']}: decommissioned")


@fleet.command("groups")
@JSON_OPTION
@SERVER_OPTION
def groups(as_json: bool, server: str | None) -> None:
    """List groups with their number of devices (by status); a group with variables and no device shows 0."""
    api = management(server)
    names = api.call("GET", f"{INVENTORY}/groups")
    counts: dict[str, Counter[str]] = {n: Counter() for n in names}
    for d in list_devices(api):
        if d["group"] is not None:
            counts.setdefault(d["group"], Counter())[d["status"]] += 1
    doc: list[dict[str, Any]] = [{"group": g, "devices": sum(c.values()), "by_status": dict(sorted(c.items()))}
                                 for g, c in sorted(counts.items())]
    if as_json:
        print_json(doc)
        return
    t = table("GROUP", "DEVICES", *(s.upper() for s in STATUSES))
    for g in doc:
        row(t, g["group"], str(g["devices"]), *(str(g["by_status"].get(s, 0)) for s in STATUSES))
    console().print(t)


@fleet.group("group")
def group_cmd() -> None:
    """Put devices into a group, or take them out (a device is in one group at most)."""


def known_inventory(api: Management, device_ids: Sequence[str]) -> list[dict[str, Any]]:
    return [get_or_unknown(api, f"{INVENTORY}/devices/{seg(i)}", f"device {clean(i)!r}")
            for i in dict.fromkeys(device_ids)]


@group_cmd.command("set")
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
@click.option("--group", "group", metavar="G", required=True, help="The group (1-64 of A-Z a-z 0-9 _ -).")
@SERVER_OPTION
def group_set(device_ids: Sequence[str], group: str, server: str | None) -> None:
    """Move devices into GROUP (from whatever group they were in). Nothing changes when an ID is unknown."""
    group_name(group)
    api = management(server)
    for inv in known_inventory(api, device_ids):
        api.call("PUT", f"{INVENTORY}/devices/{seg(inv['id'])}/group", {"group": group})
        click.echo(f"{inv['id']}: group {group}")


@group_cmd.command("unset")
@click.argument("device_ids", metavar="ID...", nargs=-1, required=True)
@SERVER_OPTION
def group_unset(device_ids: Sequence[str], server: str | None) -> None:
    """Take devices out of their group. Nothing changes when an ID is unknown."""
    api = management(server)
    for inv in known_inventory(api, device_ids):
        current, _ = inventory_parts(inv)
        if current is None:
            click.echo(f"{inv['id']}: in no group")
            continue
        api.call("DELETE", f"{INVENTORY}/devices/{seg(inv['id'])}/group/{seg(current)}")
        click.echo(f"{inv['id']}: removed from group {clean(current)}")

