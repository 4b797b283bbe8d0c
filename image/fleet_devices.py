"""The devices ``build.py provision`` writes cards for: from an Ansible inventory (read by
:mod:`ota_common.ansible_files`, never re-parsed here) or a CSV file, narrowed by an Ansible-style ``--limit``.

- A device's ``DEVICE_ID`` is its host's ``DEVICE_ID`` variable, else the host name; it must pass the grammar of
  :mod:`ota_common.deviceid`. Its variables are everything the host resolves to (group variables included: the
  card must work before anyone imports the groups on the server), as text, and the names of the secret ones.
- CSV: a header ``device_id,group,<VAR>...``; a column ``secret:<VAR>`` holds a secret. An empty cell leaves the
  variable unset for that device; an empty group is no group.
- ``--limit``: Ansible's host patterns: terms separated by ``,`` (or ``:`` when there is no comma), each a host or
  group name with ``*``/``?``/``[...]`` wildcards, ``~regex``, ``all``; ``!term`` excludes, ``&term`` intersects.

Every error names the host (or the CSV line) and is a :class:`UserError`; duplicate ids are found before
anything is written.
"""

from __future__ import annotations

import csv
import fnmatch
import io
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ota_common.ansible_files import load_inventory
from ota_common.ansible_inventory import Decrypt, Inventory
from ota_common.deviceid import hostname_for, is_device_id
from ota_common.errors import UserError
from ota_common.varnames import MAX_VALUE, MAX_VARS, is_group_name, is_var_name

ID_VAR = "DEVICE_ID"
SECRET_PREFIX = "secret:"
MAX_CSV = 8 << 20  # characters
ID_HINT = "1-63 characters A-Z a-z 0-9 . _ -, starting with a letter or digit"


@dataclass(frozen=True)
class DeviceSpec:
    """One device to provision."""

    host: str  # the inventory's host name, or the CSV's device_id
    device_id: str
    group: str | None
    values: dict[str, str]  # every variable, as text (DEVICE_ID included): what the card gets
    secrets: frozenset[str]
    #: what the server keeps as the device's own variables (None: all of ``values``); its group's variables are
    #: the group's on the server (:attr:`Fleet.groups`), so that a later change of the group reaches the device
    own: tuple[str, ...] | None = None

    @property
    def server_values(self) -> dict[str, str]:
        names = self.values if self.own is None else set(self.own) | {ID_VAR}
        return {k: v for k, v in self.values.items() if k in names}


@dataclass(frozen=True)
class Fleet:
    """The hosts a source holds (all of them, before ``--limit``) and which groups each belongs to, ancestors
    included (what a ``--limit`` group term matches)."""

    devices: tuple[DeviceSpec, ...]
    memberships: Mapping[str, frozenset[str]]  # host → its groups and their ancestors ("all" included)
    warnings: tuple[str, ...] = ()
    #: group → (variables as text, secret names): what the server keeps for each group (Ansible sources only)
    groups: Mapping[str, tuple[dict[str, str], frozenset[str]]] = field(default_factory=dict)


def as_text(name: str, value: object, where: str) -> str:
    """A variable's value as the server stores it (``true``/``false``, numbers as written)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise UserError(f"{where}: the value of {name} is not a finite number")
        return str(value)
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            raise UserError(f"{where}: the value of {name} is longer than {MAX_VALUE} characters")
        return value
    raise UserError(f"{where}: the value of {name} must be a string, number or boolean")


def _device(host: str, group: str | None, values: dict[str, str], secrets: Iterable[str], where: str,
            own: Iterable[str] | None = None) -> DeviceSpec:
    device_id = values.get(ID_VAR) or host
    if not is_device_id(device_id):
        source = f"its {ID_VAR} variable" if ID_VAR in values else "the host name"
        raise UserError(f"{where}: {device_id!r} ({source}) is not a valid DEVICE_ID: {ID_HINT}")
    values = {**values, ID_VAR: device_id}
    return DeviceSpec(host, device_id, group, values, frozenset(secrets) & set(values),
                      None if own is None else tuple(sorted(own)))


# ---------------------------------------------------------------------------------------------------------
# Sources


def from_inventory(path: Path, decrypt: Decrypt | None = None) -> Fleet:
    """Every host of an Ansible inventory (file or directory with ``group_vars/``/``host_vars/``)."""
    inv = load_inventory(path, decrypt)
    resolved = inv.resolve()
    devices = []
    for host in sorted(resolved.hosts):
        rh = resolved.hosts[host]
        where = f"host {host}"
        base = resolved.groups[rh.group] if rh.group else None
        merged = {**(base.values if base else {}), **rh.vars.values}
        secret = {k for k in merged if k in rh.vars.secrets or (k not in rh.vars.values and base is not None
                                                                  and k in base.secrets)}
        values = {k: as_text(k, v, where) for k, v in merged.items()}
        devices.append(_device(host, rh.group, values, secret, where, own=rh.vars.values))
    groups = {g: ({k: as_text(k, v, f"group {g}") for k, v in gv.values.items()}, gv.secrets)
              for g, gv in resolved.groups.items()}
    return Fleet(tuple(devices), _memberships(inv), tuple(resolved.warnings), groups)


def _memberships(inv: Inventory) -> dict[str, frozenset[str]]:
    out: dict[str, set[str]] = {h: {"all"} for h in inv.hosts}
    for name, group in inv.groups.items():
        for h in group.hosts:
            todo = [name]
            while todo:
                g = todo.pop()
                if g not in out[h]:
                    out[h].add(g)
                    todo += inv.groups[g].parents
    return {h: frozenset(gs) for h, gs in out.items()}


def from_csv(path: Path) -> Fleet:
    """Devices from a CSV file (see the module's docstring)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise UserError(f"{path}: cannot be read: {e.strerror}") from None
    if len(text) > MAX_CSV:
        raise UserError(f"{path}: larger than {MAX_CSV >> 20} MiB")
    rows = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(rows)
    except StopIteration:
        raise UserError(f"{path}: empty; the first line must be device_id,group,<VAR>...") from None
    except csv.Error as e:
        raise UserError(f"{path}:1: {e}") from None
    columns = _csv_columns(path, header)
    devices = []
    try:
        for row in rows:
            where = f"{path}:{rows.line_num}"
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise UserError(f"{where}: {len(row)} cells, the header has {len(header)}")
            host, group = row[0].strip(), row[1].strip() or None
            if group is not None and not is_group_name(group):
                raise UserError(f"{where}: invalid group name {group!r}: use 1-64 characters A-Z a-z 0-9 _ -")
            values = {name: cell for (name, _), cell in zip(columns, row[2:], strict=True) if cell != ""}
            secrets = {name for (name, secret), cell in zip(columns, row[2:], strict=True) if secret and cell != ""}
            devices.append(_device(host, group, values, secrets, f"{where} (device {host or '(empty)'})"))
    except csv.Error as e:
        raise UserError(f"{path}:{rows.line_num}: {e}") from None
    memberships = {d.host: frozenset({"all", *([d.group] if d.group else [])}) for d in devices}
    return Fleet(tuple(devices), memberships)


def _csv_columns(path: Path, header: list[str]) -> list[tuple[str, bool]]:
    """(variable name, secret) of each column after ``device_id,group``."""
    if [h.strip() for h in header[:2]] != ["device_id", "group"]:
        raise UserError(f"{path}:1: the header must start with device_id,group (then one column per variable)")
    columns: list[tuple[str, bool]] = []
    for cell in header[2:]:
        cell = cell.strip()
        secret = cell.startswith(SECRET_PREFIX)
        name = cell.removeprefix(SECRET_PREFIX) if secret else cell
        if not is_var_name(name):
            raise UserError(f"{path}:1: invalid variable name {name!r}: letters, digits, _ . - (not starting with a "
                            "digit)")
        if any(name == n for n, _ in columns):
            raise UserError(f"{path}:1: the variable {name} has two columns")
        columns.append((name, secret))
    if len(columns) > MAX_VARS:
        raise UserError(f"{path}:1: more than {MAX_VARS} variables")
    return columns


# ---------------------------------------------------------------------------------------------------------
# Selection


def _term_matches(term: str, host: str, groups: frozenset[str]) -> bool:
    if term in ("all", "*"):
        return True
    names = (host, *sorted(groups - {"all"}))  # "all" is matched by its name only, never by a wildcard
    if term.startswith("~"):
        try:
            rx = re.compile(term[1:])
        except re.error as e:
            raise UserError(f"--limit: bad regular expression {term[1:]!r}: {e}") from None
        return any(rx.match(n) for n in names)
    return any(fnmatch.fnmatchcase(n, term) for n in names)


def select(fleet: Fleet, limit: str | None) -> list[DeviceSpec]:
    """The devices ``limit`` selects (all without one), in host-name order; raises UserError when none is."""
    devices = list(fleet.devices)
    if limit is not None:
        terms = [t.strip() for t in re.split(r"," if "," in limit else r":", limit) if t.strip()]
        if not terms:
            raise UserError("--limit is empty")
        plain = [t for t in terms if not t.startswith(("!", "&"))]
        chosen = {d.host for d in devices if any(_term_matches(t, d.host, fleet.memberships[d.host]) for t in plain)} \
            if plain else {d.host for d in devices}
        for t in terms:
            if t.startswith("&"):
                chosen = {h for h in chosen if _term_matches(t[1:], h, fleet.memberships[h])}
            elif t.startswith("!"):
                chosen = {h for h in chosen if not _term_matches(t[1:], h, fleet.memberships[h])}
        devices = [d for d in devices if d.host in chosen]
        if not devices:
            raise UserError(f"--limit {limit} selects no host")
    if not devices:
        raise UserError("the device list has no device")
    check_unique(devices)
    return sorted(devices, key=lambda d: d.host)


def check_unique(devices: Iterable[DeviceSpec]) -> None:
    """Raises UserError naming both hosts when two devices have the same DEVICE_ID (or hostname: two ids that
    differ only in case or ``.``/``_``/``-`` would be the same host on the network)."""
    seen: dict[str, DeviceSpec] = {}
    for d in devices:
        for key in (d.device_id, "host:" + hostname_for(d.device_id)):
            other = seen.setdefault(key, d)
            if other is not d:
                what = "DEVICE_ID" if key == d.device_id else "hostname " + key.removeprefix("host:")
                raise UserError(f"hosts {other.host} and {d.host} have the same {what} ({d.device_id}): each card "
                                "needs its own")


__all__ = ["ID_VAR", "DeviceSpec", "Fleet", "as_text", "check_unique", "from_csv",
           "from_inventory", "select"]
