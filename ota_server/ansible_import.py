"""Ansible inventory import (``POST /api/management/v1/inventory/import/ansible``) and the hosts it pre-stages.

The body is read by :mod:`ota_common.ansible_inventory` (no Ansible needed): an INI or YAML inventory, or the
resolved JSON form of :mod:`ota_common.ansible_wire` that ``build.py fleet import-ansible`` sends after reading
``group_vars/``/``host_vars/`` and decrypting vaults. Which one: the Content-Type (``application/json``;
``text/x-ini``, ``application/x-ini``, ``text/ini``; ``application/yaml``, ``application/x-yaml``, ``text/yaml``,
``text/x-yaml``), and for any other (or none) the first line that is neither blank nor a comment: ``[`` is INI,
anything else YAML.

A host matches a device when the host name, or its ``DEVICE_ID`` variable, equals the device id or one of its
identity attributes in ``MATCH_IDENTITY_KEYS``. A host that matches no device is **staged**: its group and
variables (secrets encrypted) wait in ``staged_hosts`` and are applied by :func:`apply_staged` when a device that
matches it is accepted (preauthorized, accepted by hand or in bulk); importing again updates them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from ota_common.ansible_inventory import (
    Inventory,
    InventoryError,
    Resolved,
    Values,
    parse_text,
    sniff_format,
)
from ota_common.ansible_wire import from_json

from . import confighash
from .audit import names
from .configvars import ConfigStore, parse_config_body
from .errors import APIError, bad_request
from .models import config_values as cv
from .models import devices, staged_hosts
from .timeutil import now

#: identity attributes a host name (or its DEVICE_ID variable) is compared with
MATCH_IDENTITY_KEYS = ("hostname", "device_id", "DEVICE_ID", "serial", "serial_number", "mac")
STAGED = "staged"  # the config_values scope of staged hosts
JSON_TYPES = ("application/json",)
INI_TYPES = ("text/x-ini", "application/x-ini", "text/ini")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def parse_body(raw: bytes, content_type: str | None) -> Resolved:
    """The body as a resolved inventory. Raises APIError 400 naming what is wrong (and where)."""
    try:
        text = raw.decode()
    except UnicodeDecodeError:
        raise bad_request("the inventory is not UTF-8 text") from None
    ctype = (content_type or "").split(";")[0].strip().lower()
    try:
        if ctype in JSON_TYPES:
            try:
                doc = json.loads(text)
            except (ValueError, RecursionError):
                raise bad_request("the body is not valid JSON") from None
            return from_json(doc)
        fmt = "ini" if ctype in INI_TYPES else "yaml" if ctype in YAML_TYPES else sniff_format(text)
        inv = Inventory()
        parse_text(text, "the inventory", inv, fmt)
        return inv.resolve()
    except InventoryError as e:
        raise bad_request(str(e)) from None


def _as_strings(values: Values, where: str) -> tuple[dict[str, str], set[str]]:
    try:
        strings, _ = parse_config_body(dict(values.values))
    except APIError as e:
        raise bad_request(f"{where}: {e.message}") from None
    return strings, set(values.secrets) & set(strings)


def device_keys(device_id: str, identity_json: str) -> set[str]:
    """What a host is compared with: the device id and its identity attributes in MATCH_IDENTITY_KEYS."""
    keys = {device_id}
    try:
        ident = json.loads(identity_json)
    except ValueError:
        ident = {}
    if isinstance(ident, dict):
        keys |= {str(ident[k]) for k in MATCH_IDENTITY_KEYS if isinstance(ident.get(k), str | int)}
    return keys


def _device_id_var(values: Mapping[str, Any]) -> str | None:
    v = values.get("DEVICE_ID")
    return str(v) if isinstance(v, str | int) and not isinstance(v, bool) else None


def match_hosts(conn: sa.Connection, host_names: Iterable[str], host_vars: Mapping[str, Mapping[str, Any]]
                ) -> tuple[dict[str, str], dict[str, str]]:
    """Map host → device id. Returns (matched, unmatched host → reason: ``none`` or ``ambiguous: ...``)."""
    index: dict[str, set[str]] = {}
    for r in conn.execute(sa.select(devices.c.id, devices.c.identity_json)):
        for k in device_keys(r.id, r.identity_json):
            index.setdefault(k, set()).add(r.id)
    matched: dict[str, str] = {}
    unmatched: dict[str, str] = {}
    for host in host_names:
        candidates = {host} | ({d} if (d := _device_id_var(host_vars.get(host, {}))) else set())
        found: set[str] = set().union(*(index.get(c, set()) for c in candidates))
        if len(found) == 1:
            matched[host] = found.pop()
        elif not found:
            unmatched[host] = "none"
        else:
            unmatched[host] = f"ambiguous: {len(found)} devices match"
    return matched, unmatched


@dataclass
class ImportPlan:
    """What an import does, checked before anything is written."""

    resolved: Resolved
    groups: dict[str, tuple[dict[str, str], set[str]]]
    hosts: dict[str, tuple[dict[str, str], set[str]]]

    @classmethod
    def of(cls, resolved: Resolved) -> ImportPlan:
        return cls(resolved, {g: _as_strings(v, f"group {g}") for g, v in resolved.groups.items()},
                   {h: _as_strings(r.vars, f"host {h}") for h, r in resolved.hosts.items()})


def import_inventory(c: sa.Connection, config: ConfigStore, plan: ImportPlan, write: bool = True
                     ) -> tuple[dict[str, Any], str]:
    """Apply the plan (or only report it: ``write=False``). Returns (the answer, the audit summary)."""
    res = plan.resolved
    matched, unmatched = match_hosts(c, list(res.hosts), {h: plan.hosts[h][0] for h in res.hosts})
    staged = sorted(h for h, why in unmatched.items() if why == "none")
    if write:
        for g, (values, secrets) in plan.groups.items():
            config.replace(c, "group", g, values, secrets, merge=True)
        for host, device_id in matched.items():
            values, secrets = plan.hosts[host]
            config.replace(c, "device", device_id, values, secrets, merge=True)
            if res.hosts[host].group is not None:
                c.execute(devices.update().where(devices.c.id == device_id)
                          .values(group_name=res.hosts[host].group, updated=now()))
                confighash.refresh(c, device_ids=[device_id])
            _unstage(c, host)
        for host in staged:
            _stage(c, config, host, res.hosts[host].group, *plan.hosts[host])
    reasons = {h: "no device has this id or identity yet: staged, applied when one is accepted" if h in staged
               else why for h, why in unmatched.items()}
    answer = {
        "matched": [{"host": h, "device_id": d, "group": res.hosts[h].group,
                     "variables": sorted(plan.hosts[h][0])} for h, d in sorted(matched.items())],
        "unmatched": [{"host": h, "reason": r} for h, r in sorted(reasons.items())],
        "staged": [{"host": h, "group": res.hosts[h].group, "variables": sorted(plan.hosts[h][0])} for h in staged],
        "groups": {g: sorted(v[0]) for g, v in sorted(plan.groups.items())},
        "dropped": [{"owner": k, "names": v} for k, v in sorted(res.dropped.items())],
        "warnings": res.warnings,
        "dry_run": not write,
    }
    summary = (f"imported an Ansible inventory: {len(matched)} host(s) matched, {len(staged)} staged, "
               f"{len(unmatched) - len(staged)} ambiguous; groups: {names(plan.groups)}")
    return answer, summary


def _stage(c: sa.Connection, config: ConfigStore, host: str, group: str | None, values: dict[str, str],
           secrets: set[str]) -> None:
    t = now()
    key = _device_id_var(values)
    row = {"device_key": key[:128] if key else None, "group_name": group, "updated": t}
    if c.execute(staged_hosts.update().where(staged_hosts.c.host == host).values(**row)).rowcount == 0:
        c.execute(staged_hosts.insert().values(host=host, created=t, **row))
    config.replace(c, STAGED, host, values, secrets, merge=True)


def _unstage(c: sa.Connection, host: str) -> None:
    c.execute(sa.delete(staged_hosts).where(staged_hosts.c.host == host))
    c.execute(sa.delete(cv).where(cv.c.scope == STAGED, cv.c.owner == host))


def apply_staged(c: sa.Connection, config: ConfigStore, device_id: str) -> str:
    """Give a device that is being accepted the staged host that matches it (its group and variables; the staged
    entry goes). Returns a note for the audit log and the answer ("" when nothing was staged for it); a device
    that several staged hosts match gets none of them (the note says which)."""
    row = c.execute(sa.select(devices.c.identity_json).where(devices.c.id == device_id)).first()
    if row is None:
        return ""
    keys = list(device_keys(device_id, row.identity_json))
    hosts = c.execute(sa.select(staged_hosts).where(staged_hosts.c.host.in_(keys) | staged_hosts.c.device_key
                                                    .in_(keys)).order_by(staged_hosts.c.host)).all()
    if len(hosts) > 1:
        return f"staged hosts {names(h.host for h in hosts)} all match it: none applied"
    if not hosts:
        return ""
    host = hosts[0]
    stored = config.load(c, STAGED, host.host)
    values = config.plain(stored, f"staged host {host.host}")
    config.replace(c, "device", device_id, values, stored.secrets & set(values), merge=True)
    if host.group_name is not None:
        c.execute(devices.update().where(devices.c.id == device_id).values(group_name=host.group_name,
                                                                           updated=now()))
        confighash.refresh(c, device_ids=[device_id])
    _unstage(c, host.host)
    return f"staged host {host.host} applied (group {host.group_name}; variables: {names(values)})"


def staged_list(c: sa.Connection) -> list[dict[str, Any]]:
    """The staged hosts (names of their variables, never values)."""
    variables: dict[str, list[str]] = {}
    for r in c.execute(sa.select(cv.c.owner, cv.c.name).where(cv.c.scope == STAGED).order_by(cv.c.name)):
        variables.setdefault(r.owner, []).append(r.name)
    return [{"host": r.host, "device_id_var": r.device_key, "group": r.group_name, "variables": variables.get(r.host, [])}
            for r in c.execute(sa.select(staged_hosts).order_by(staged_hosts.c.host))]
