"""What the operator commands of ``build.py fleet`` share: paged listings, the merged device record, filters,
``NAME=VALUE`` arguments, and output (``--json``, or rich tables).

Identity, inventory, substates and logs are written by devices: a device can put terminal escape sequences or
rich markup (``[link=...]``) in its hostname. Every such text goes through :func:`clean` (control characters
shown as ``\\xNN``) and into tables as :class:`rich.text.Text` (never parsed as markup), so what a device says is
shown, never executed by the operator's terminal.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from urllib.parse import quote

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ota_common.errors import UserError

from .fleet import Management, ServerRefused

MGMT = "/api/management"
DEVAUTH = f"{MGMT}/v2/devauth/devices"
INVENTORY = f"{MGMT}/v1/inventory"
CONFIG = f"{MGMT}/v1/deviceconfig/configurations"
DEPLOYMENTS = f"{MGMT}/v1/deployments/deployments"
PER_PAGE = 500
#: identity attributes that name a device for a person, in order of preference
NAME_KEYS = ("DEVICE_ID", "device_id", "hostname", "serial", "serial_number", "mac")
#: control characters (C0, DEL, C1) and the bidirectional overrides that reorder what a terminal shows
UNSAFE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")
UNSAFE_LINE = re.compile(r"[\x00-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def clean(value: Any, multiline: bool = False) -> str:
    """``value`` as text a terminal shows as it is: control characters as ``\\xNN`` (newlines and tabs kept
    only in ``multiline`` text such as a log)."""
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return (UNSAFE if multiline else UNSAFE_LINE).sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def seg(value: str) -> str:
    """One path segment of a URL (an id or a name the operator typed cannot add a path or a query)."""
    return quote(value, safe="")


def paged(api: Management, path: str, params: dict[str, str] | None = None) -> Iterator[dict[str, Any]]:
    """Every item of a paged list (``page``/``per_page``)."""
    page = 1
    while True:
        items = api.call("GET", path, params={**(params or {}), "page": str(page), "per_page": str(PER_PAGE)})
        if not isinstance(items, list):
            raise ServerRefused(f"GET {path}: the server answered a {type(items).__name__}, not a list")
        yield from items
        if len(items) < PER_PAGE:
            return
        page += 1


def get_or_unknown(api: Management, path: str, what: str) -> Any:
    """GET ``path``; a 404 is a UserError naming ``what`` (an id the operator typed)."""
    try:
        return api.call("GET", path)
    except ServerRefused as e:
        if e.status == 404:
            raise UserError(f"unknown {what}") from None
        raise


# ---------------------------------------------------------------------------------------------------------
# Devices: the auth record (status, identity, keys) merged with the inventory (group, reported attributes)


def inventory_parts(doc: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """(group, inventory attributes) of an inventory document. Only the server's ``system`` scope says the
    group: a device reporting an inventory attribute ``group`` does not move itself."""
    group = None
    inventory: dict[str, Any] = {}
    for a in doc.get("attributes", []):
        if a.get("scope") == "system" and a.get("name") == "group":
            group = a.get("value")
        elif a.get("scope") == "inventory":
            inventory[str(a.get("name"))] = a.get("value")
    return group, inventory


def device_record(auth: dict[str, Any], inv: dict[str, Any] | None) -> dict[str, Any]:
    group, inventory = inventory_parts(inv or {})
    return {
        "id": auth["id"], "status": auth["status"], "group": group, "identity_data": auth.get("identity_data", {}),
        "inventory": inventory,
        "auth_sets": [{"id": s["id"], "status": s["status"], "ts": s.get("ts")} for s in auth.get("auth_sets", [])],
        "created_ts": auth.get("created_ts"), "updated_ts": (inv or {}).get("updated_ts", auth.get("updated_ts")),
    }


def list_devices(api: Management, status: str | None = None, group: str | None = None,
                 filters: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    """Devices with the status, in the group, whose identity or inventory attributes match every filter."""
    auths = paged(api, DEVAUTH, {"status": status} if status else None)
    invs = {d["id"]: d for d in paged(api, f"{INVENTORY}/devices", {"group": group} if group else None)}
    records = [device_record(a, invs.get(a["id"])) for a in auths if group is None or a["id"] in invs]
    return [r for r in records if matches(r, filters)]


def matches(record: dict[str, Any], filters: Sequence[tuple[str, str]]) -> bool:
    """Every ``(name, value)`` equals an identity or inventory attribute (or one item of a list attribute)."""
    for name, want in filters:
        found = [src[name] for src in (record["identity_data"], record["inventory"]) if name in src]
        if not any(want in map(_text, v) if isinstance(v, list) else _text(v) == want for v in found):
            return False
    return True


def _text(v: Any) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def display_name(identity: dict[str, Any]) -> str:
    return next((_text(identity[k]) for k in NAME_KEYS if k in identity), "")


# ---------------------------------------------------------------------------------------------------------
# Arguments


def name_values(pairs: Iterable[str], what: str) -> list[tuple[str, str]]:
    """``NAME=VALUE`` arguments as pairs. Raises UserError (naming ``what``) for one without a name or ``=``."""
    out = []
    for p in pairs:
        name, eq, value = p.partition("=")
        if not eq or not name.strip():
            raise UserError(f"{what} takes NAME=VALUE, not {clean(p)!r}")
        out.append((name.strip(), value))
    return out


# ---------------------------------------------------------------------------------------------------------
# Output


def print_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, sort_keys=True))


def console() -> Console:
    """stdout; wide when it is not a terminal, so that ids are never cut in a log or a pipe."""
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False, soft_wrap=False)


def table(*columns: str, header: bool = True) -> Table:
    t = Table(box=None, header_style="bold", pad_edge=False, show_header=header)
    for c in columns:
        t.add_column(c, overflow="fold")
    return t


def section(out: Console, title: str, body: Table) -> None:
    """A bold heading line (never wrapped into the table's width), then the table."""
    out.print(Text(clean(title), style="bold"))
    out.print(body)
    out.print()


def row(t: Table, *cells: Any) -> None:
    """A row of untrusted text: cleaned, never read as markup."""
    t.add_row(*(Text(clean(c)) if c is not None else Text("-", style="dim") for c in cells))


def short_time(ts: str | None) -> str | None:
    """``2026-12-01T10:00:00Z`` → ``2026-12-01 10:00:00`` (UTC, as every time the server gives)."""
    return ts.replace("T", " ").rstrip("Z").split(".")[0] if isinstance(ts, str) else None
