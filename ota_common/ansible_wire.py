"""The resolved form of an Ansible inventory, as ``build.py fleet import-ansible`` sends it to the server (after
reading ``group_vars/``/``host_vars/`` and decrypting vaults on the operator's machine)::

    {"hosts": {name: {"groups": [...], "vars": {...}, "secrets": [...]}},
     "groups": {name: {"vars": {...}, "secrets": [...]}}}

``groups`` of a host: lowest precedence first, the server keeps the last; ``vars`` of a group: its effective
variables (inherited ones included); ``vars`` of a host: those it gets beyond its group's. The server checks it
as strictly as an inventory (names, values, sizes) and drops ``ansible_*`` variables here too.
"""

from __future__ import annotations

from typing import Any

from .ansible_inventory import (
    DROPPED_PREFIX,
    HOST_RE,
    MAX_GROUPS,
    MAX_HOSTS,
    InventoryError,
    Resolved,
    ResolvedHost,
    Values,
    check_variable,
)
from .varnames import MAX_VARS, is_group_name, is_var_name


def to_json(resolved: Resolved) -> dict[str, Any]:
    def values(v: Values) -> dict[str, Any]:
        return {"vars": dict(sorted(v.values.items())), "secrets": sorted(v.secrets)}

    return {"hosts": {h: {"groups": list(r.groups), **values(r.vars)} for h, r in sorted(resolved.hosts.items())},
            "groups": {g: values(v) for g, v in sorted(resolved.groups.items())}}


def _object(doc: Any, keys: set[str], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise InventoryError(f"{where} must be an object")
    unknown = sorted(str(k) for k in set(doc) - keys)
    if unknown:
        raise InventoryError(f"{where} has {', '.join(unknown)}: only {', '.join(sorted(keys))}")
    return doc


def _values(doc: Any, label: str, dropped: dict[str, list[str]]) -> Values:
    doc = _object(doc, {"vars", "secrets", "groups"}, label)
    raw = doc.get("vars", {})
    if not isinstance(raw, dict) or len(raw) > MAX_VARS:
        raise InventoryError(f"{label}: vars must be an object of at most {MAX_VARS} names")
    values: dict[str, str | int | float | bool] = {}
    for name, value in raw.items():
        if not is_var_name(name):
            raise InventoryError(f"{label}: invalid variable name {name!r}: letters, digits, _ . - (not starting "
                                 "with a digit)")
        if name.lower().startswith(DROPPED_PREFIX):
            dropped.setdefault(label, []).append(name)
            continue
        values[name] = check_variable(name, value, f"{label}: {name}")
    secrets = doc.get("secrets", [])
    if not isinstance(secrets, list) or not all(isinstance(s, str) for s in secrets):
        raise InventoryError(f"{label}: secrets must be a list of variable names")
    unknown = sorted(set(secrets) - set(values) - set(dropped.get(label, ())))
    if unknown:
        raise InventoryError(f"{label}: secrets names variables that are not set: {', '.join(unknown[:10])}")
    return Values(values, frozenset(secrets) & set(values))


def from_json(doc: Any) -> Resolved:
    """The resolved form, checked. Raises InventoryError."""
    doc = _object(doc, {"hosts", "groups"}, "the body")
    hosts, groups = doc.get("hosts", {}), doc.get("groups", {})
    if not isinstance(hosts, dict) or len(hosts) > MAX_HOSTS:
        raise InventoryError(f"hosts must be an object of at most {MAX_HOSTS} hosts")
    if not isinstance(groups, dict) or len(groups) > MAX_GROUPS:
        raise InventoryError(f"groups must be an object of at most {MAX_GROUPS} groups")
    dropped: dict[str, list[str]] = {}
    out_groups: dict[str, Values] = {}
    for name, g in groups.items():
        if not is_group_name(name) or name in ("all", "ungrouped"):
            raise InventoryError(f"invalid group name {name!r}: use 1-64 characters A-Z a-z 0-9 _ - (not all or "
                                 "ungrouped)")
        if isinstance(g, dict) and "groups" in g:
            raise InventoryError(f"group {name} has groups: only vars and secrets")
        out_groups[name] = _values(g, f"group {name}", dropped)
    out_hosts: dict[str, ResolvedHost] = {}
    for name, h in hosts.items():
        if not isinstance(name, str) or not HOST_RE.fullmatch(name):
            raise InventoryError(f"invalid host name {name!r}: use 1-64 characters A-Z a-z 0-9 _ . : -")
        member = h.get("groups", []) if isinstance(h, dict) else None
        if not isinstance(member, list) or not all(isinstance(g, str) and g in out_groups for g in member):
            raise InventoryError(f"host {name}: groups must be a list of groups that the body's groups define")
        out_hosts[name] = ResolvedHost(tuple(member), _values(h, f"host {name}", dropped))
    return Resolved(out_groups, out_hosts, dropped, [])
