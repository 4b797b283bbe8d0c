"""Ansible inventories (INI and YAML) read without Ansible, for the update server's import and ``build.py fleet``.

What is implemented, and how it maps onto the server (one group per device, group variables, device variables):

- INI: ``[group]`` host lines (``name [key=value ...]``, ranges ``pi[01:10]``, ``node-[a:c]``, ``x[0:10:2]``,
  ``name:port``), ``[group:vars]``, ``[group:children]``; hosts before any section are ``ungrouped``. Values, inline
  or in ``:vars``, are read as Ansible does for the simple literals: an integer, a float, ``True``/``False`` or a
  quoted string; anything else is the text as written.
- YAML: ``all: {vars, hosts, children: {group: {vars, hosts, children}}}`` (top-level groups without ``all:`` too),
  host names with the same ranges. ``!vault`` values are decrypted by a caller-given function (``build.py fleet
  import-ansible --vault-password-file``) or refused; the server never has one.
- ``_secrets: [names]`` in any ``vars`` (or vars file) marks those names secret there and wherever they are
  inherited; a vault-encrypted value or file is always secret.
- Precedence, as Ansible's: ``all`` < groups by depth (parents before children; equal depths by name) < the host;
  within one group or host, the inventory file's values < its ``group_vars/``/``host_vars/`` files (see
  :mod:`ota_common.ansible_files`). Ansible's ``ansible_group_priority`` is not implemented (it is dropped).
- Every ``ansible_*`` variable (connection settings, the port of ``name:port``) is dropped, never stored, and
  reported by name (never by value).
- :meth:`Inventory.resolve` gives what the server stores: each group's effective variables (its ancestors' and its
  own) and, per host, its groups (lowest precedence first; the server keeps the last) and the variables that
  differ from that group's (its own, and those of its other groups).

Untrusted input: sizes, host and group counts, nesting and YAML aliases (expanded size) are bounded; every error
is an :class:`InventoryError` naming the file and line (or the host or group).
"""

from __future__ import annotations

import math
import re
import shlex
import string
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import yaml

from . import sshkeys
from .errors import UserError
from .varnames import MAX_VALUE, MAX_VARS, SECRETS_KEY, is_group_name, is_var_name

MAX_TEXT = 8 << 20  # characters of one file
MAX_HOSTS = 100_000
MAX_GROUPS = 10_000
MAX_DEPTH = 20  # group nesting
MAX_YAML_NODES = 2_000_000  # YAML nodes, aliases expanded
MAX_YAML_NESTING = 64
#: a host name: what a device id, hostname or address looks like (it may become a device's or a row's key)
HOST_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,63}")
DROPPED_PREFIX = "ansible_"
SERVER_LESS_GROUPS = ("all", "ungrouped")  # Ansible's own groups: no group on the server
VAULT_HEADER = "$ANSIBLE_VAULT;"

#: vault text → plaintext; raises InventoryError (wrong password, damaged text)
Decrypt = Callable[[str], str]


class InventoryError(UserError):
    """The inventory cannot be imported: the message names the file and line, or the host or group."""


@dataclass(frozen=True)
class Var:
    value: str | int | float | bool
    secret: bool = False


@dataclass
class Owner:
    """A group's or a host's variables, and the names it marks secret (``_secrets``)."""

    vars: dict[str, Var] = field(default_factory=dict)
    marked: set[str] = field(default_factory=set)


@dataclass
class Group(Owner):
    children: set[str] = field(default_factory=set)
    parents: set[str] = field(default_factory=set)
    hosts: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Values:
    """Resolved variables of one group or host: plain values and the names of the secret ones."""

    values: dict[str, str | int | float | bool]
    secrets: frozenset[str]


@dataclass(frozen=True)
class ResolvedHost:
    groups: tuple[str, ...]  # the host's own groups, lowest precedence first (all and ungrouped left out)
    vars: Values

    @property
    def group(self) -> str | None:
        """The one group the server keeps: the host's group of highest precedence."""
        return self.groups[-1] if self.groups else None


@dataclass(frozen=True)
class Resolved:
    groups: dict[str, Values]
    hosts: dict[str, ResolvedHost]
    dropped: dict[str, list[str]]  # "host pi01" / "group north" → names
    warnings: list[str]


class Inventory:
    """Groups, hosts and their variables, filled by the parsers below (several files may add to one)."""

    def __init__(self) -> None:
        self.groups: dict[str, Group] = {"all": Group(), "ungrouped": Group()}
        self.hosts: dict[str, Owner] = {}
        self.dropped: dict[str, set[str]] = {}
        self.warnings: list[str] = []
        #: set while a vault-encrypted file is read: every value from it is secret
        self.secret_source = False

    def group(self, name: Any, where: str) -> Group:
        if not is_group_name(name):
            raise InventoryError(f"{where}: invalid group name {name!r}: use 1-64 characters A-Z a-z 0-9 _ -")
        if name not in self.groups:
            if len(self.groups) >= MAX_GROUPS:
                raise InventoryError(f"{where}: more than {MAX_GROUPS} groups")
            self.groups[name] = Group()
        return self.groups[name]

    def host(self, name: Any, group: str, where: str) -> Owner:
        if not isinstance(name, str) or not HOST_RE.fullmatch(name):
            raise InventoryError(f"{where}: invalid host name {name!r}: use 1-64 characters A-Z a-z 0-9 _ . : - "
                                 "(not starting with . : -)")
        if name not in self.hosts:
            if len(self.hosts) >= MAX_HOSTS:
                raise InventoryError(f"{where}: more than {MAX_HOSTS} hosts")
            self.hosts[name] = Owner()
        self.group(group, where).hosts.add(name)
        return self.hosts[name]

    def add_child(self, parent: str, child: str, where: str) -> None:
        if child == "all":
            raise InventoryError(f"{where}: the group all cannot be a child of {parent}")
        self.group(parent, where).children.add(child)
        self.group(child, where).parents.add(parent)

    def set_vars(self, owner: Owner, label: str, mapping: Any, where: str, lines: dict[str, int] | None = None,
                 decrypt: Decrypt | None = None, secret: bool = False, source: str = "") -> None:
        """Add ``mapping`` (name → scalar, maybe ``_secrets``) to ``owner``; ``ansible_*`` names are dropped.
        ``secret``: every value is (it came from a vault-encrypted file). Errors name ``where``, or
        ``source:line`` when ``lines`` has the name's line."""
        if mapping is None:
            return
        if not isinstance(mapping, dict):
            raise InventoryError(f"{where}: the variables of {label} must be a mapping, not {_kind(mapping)}")
        for name, value in mapping.items():
            at = f"{source}:{lines[name]}" if lines and source and name in lines else where
            if name == SECRETS_KEY:
                if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
                    raise InventoryError(f"{at}: {SECRETS_KEY} of {label} must be a list of variable names")
                owner.marked |= {s for s in value if not s.startswith(DROPPED_PREFIX)}
                continue
            if not is_var_name(name):
                raise InventoryError(f"{at}: invalid variable name {name!r} in {label}: letters, digits, _ . - "
                                     "(not starting with a digit)")
            if name.lower().startswith(DROPPED_PREFIX):
                self.dropped.setdefault(label, set()).add(name)
                continue
            vault = isinstance(value, Vaulted)
            if isinstance(value, Vaulted):
                value = value.reveal(decrypt, f"{at}: {name} of {label}")
            owner.vars[name] = Var(check_variable(name, value, f"{at}: {name} of {label}"),
                                   secret or vault or self.secret_source)
            if len(owner.vars) > MAX_VARS:
                raise InventoryError(f"{at}: {label} has more than {MAX_VARS} variables")

    # -------------------------------------------------------------------------------------------------------
    # precedence

    def _depths(self) -> dict[str, int]:
        """Ansible's group depth: ``all`` 0, a group one more than its deepest parent. Raises on a cycle."""
        depth: dict[str, int] = {}
        visiting: set[str] = set()

        def visit(name: str, trail: int) -> int:
            if name in depth:
                return depth[name]
            if name in visiting or trail > MAX_DEPTH:
                raise InventoryError(f"group {name}: its children lead back to it, or nest more than {MAX_DEPTH} "
                                     "levels deep")
            visiting.add(name)
            parents = self.groups[name].parents or ({"all"} if name != "all" else set())
            depth[name] = 0 if name == "all" else 1 + max(visit(p, trail + 1) for p in parents)
            visiting.discard(name)
            return depth[name]

        for name in self.groups:
            visit(name, 0)
        return depth

    def _ancestors(self, names: set[str]) -> set[str]:
        out = {"all"}
        todo = list(names)
        while todo:
            g = todo.pop()
            if g not in out:
                out.add(g)
                todo += self.groups[g].parents
        return out

    def resolve(self) -> Resolved:
        """What the server stores (see the module's docstring). Raises InventoryError on a cycle of groups."""
        depth = self._depths()

        def order(names: set[str]) -> list[str]:
            return sorted(names, key=lambda g: (depth[g], g))

        def merge(owners: list[Owner]) -> Values:
            merged: dict[str, Var] = {}
            marked: set[str] = set()
            for o in owners:
                merged.update(o.vars)
                marked |= o.marked
            return Values({k: v.value for k, v in merged.items()},
                          frozenset(k for k, v in merged.items() if v.secret or k in marked))

        groups = {g: merge([self.groups[a] for a in order(self._ancestors({g}))])
                  for g in self.groups if g not in SERVER_LESS_GROUPS}
        hosts: dict[str, ResolvedHost] = {}
        member: dict[str, set[str]] = {h: set() for h in self.hosts}
        for g, grp in self.groups.items():
            for h in grp.hosts:
                member[h].add(g)
        for h, owner in self.hosts.items():
            own = order({g for g in member[h] if g not in SERVER_LESS_GROUPS})
            full = merge([*(self.groups[a] for a in order(self._ancestors(member[h]))), owner])
            base = groups[own[-1]] if own else Values({}, frozenset())
            keep = {k: v for k, v in full.values.items()
                    if k in owner.vars or _typed(base.values.get(k, _MISSING)) != _typed(v)
                    or (k in full.secrets) != (k in base.secrets)}
            hosts[h] = ResolvedHost(tuple(own), Values(keep, frozenset(full.secrets & set(keep))))
            independent = [g for g in own if not any(g in self._ancestors({o}) for o in own if o != g)]
            if len(independent) > 1:
                self.warnings.append(f"host {h} is in groups {', '.join(independent)}; the server keeps it in "
                                     f"{own[-1]} (the variables it gets from the others are set on the device)")
        return Resolved(groups, hosts, {k: sorted(v) for k, v in sorted(self.dropped.items())}, self.warnings)


_MISSING = object()


def _typed(value: Any) -> tuple[type, Any]:
    return type(value), value  # True == 1, but not as a value of a variable


def _kind(value: Any) -> str:
    if isinstance(value, dict | list):
        return "a mapping" if isinstance(value, dict) else "a list"
    return "nothing" if value is None else type(value).__name__


def check_scalar(value: Any, where: str) -> str | int | float | bool:
    """A variable's value: a string (at most MAX_VALUE characters, valid Unicode), a finite number or a boolean."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise InventoryError(f"{where}: the value must be a finite number")
        return value
    if isinstance(value, str):
        if len(value) > MAX_VALUE:
            raise InventoryError(f"{where}: the value is longer than {MAX_VALUE} characters")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise InventoryError(f"{where}: the value is not valid Unicode text") from None
        return value
    raise InventoryError(f"{where}: the value must be a string, number or boolean, not {_kind(value)}")


def check_variable(name: str, value: Any, where: str) -> str | int | float | bool:
    """:func:`check_scalar`, and for ``SSH_AUTHORIZED_KEYS`` the key check the server and the device make
    (:mod:`.sshkeys`): a bad key is reported where it is written, not when the device refuses it."""
    scalar = check_scalar(value, where)
    if name == sshkeys.VARIABLE:
        why = sshkeys.check_value(scalar) if isinstance(scalar, str) else "must be text"
        if why:
            raise InventoryError(f"{where}: {sshkeys.VARIABLE}: {why}")
    return scalar


def check_text(text: str, where: str) -> None:
    if len(text) > MAX_TEXT:
        raise InventoryError(f"{where}: larger than {MAX_TEXT >> 20} MiB")


# ---------------------------------------------------------------------------------------------------------
# Host ranges


def expand_hosts(pattern: str, where: str) -> list[str]:
    """``pi[01:03]`` → pi01 pi02 pi03; ``n[a:c]``; ``x[0:10:5]``; several ranges multiply (at most MAX_HOSTS)."""
    if "[" not in pattern:
        return [pattern]
    m = re.fullmatch(r"([^\[\]]*)\[([^\[\]]*)\](.*)", pattern)
    if m is None:
        raise InventoryError(f"{where}: bad host range {pattern!r}")
    head, spec, tail = m.groups()
    bounds = spec.split(":")
    if len(bounds) not in (2, 3) or not bounds[1]:
        raise InventoryError(f"{where}: a host range is [begin:end] or [begin:end:step], not [{spec}]")
    beg, end = bounds[0] or "0", bounds[1]
    step_text = bounds[2] if len(bounds) == 3 else "1"
    if not step_text.isdigit() or int(step_text) < 1:
        raise InventoryError(f"{where}: the step of [{spec}] must be a positive integer")
    step = int(step_text)
    if beg.isdigit() and end.isdigit():
        if len(beg) > 1 and beg[0] == "0" and len(beg) != len(end):
            raise InventoryError(f"{where}: [{spec}]: a zero-padded range needs begin and end of equal length")
        width = len(beg) if beg[0] == "0" else 0
        if int(end) < int(beg) or (int(end) - int(beg)) // step >= MAX_HOSTS:
            raise InventoryError(f"{where}: [{spec}] is empty or longer than {MAX_HOSTS} hosts")
        items = [str(i).zfill(width) for i in range(int(beg), int(end) + 1, step)]
    elif len(beg) == 1 and len(end) == 1 and beg in string.ascii_letters and end in string.ascii_letters:
        i, j = string.ascii_letters.index(beg), string.ascii_letters.index(end)
        if i > j:
            raise InventoryError(f"{where}: [{spec}]: begin is after end")
        items = list(string.ascii_letters[i:j + 1:step])
    else:
        raise InventoryError(f"{where}: [{spec}] is neither a numeric nor a one-letter range")
    tails = expand_hosts(tail, where)
    if len(items) * len(tails) > MAX_HOSTS:
        raise InventoryError(f"{where}: {pattern!r} names more than {MAX_HOSTS} hosts")
    return [head + i + t for i in items for t in tails]


# ---------------------------------------------------------------------------------------------------------
# INI

_SECTION = re.compile(r"\[([^:\]\s]+)(?::(\w+))?\]\s*(?:[#;].*)?")
_CHILD = re.compile(r"([^:\]\s]+)\s*(?:[#;].*)?")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)")


def ini_value(text: str) -> str | int | float | bool:
    """The literals Ansible's ``ast.literal_eval`` turns into scalars; anything else stays text."""
    if _NUMBER.fullmatch(text):
        try:
            return int(text)
        except ValueError:
            return float(text)
    if text in ("True", "False"):
        return text == "True"
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"" and "\\" not in text and text[0] not in text[1:-1]:
        return text[1:-1]
    return text


def parse_ini(text: str, source: str, inv: Inventory) -> None:
    """Add an INI inventory to ``inv``. Raises InventoryError naming ``source`` and the line."""
    check_text(text, source)
    group, kind = "ungrouped", "hosts"
    for number, raw in enumerate(text.splitlines(), 1):
        where = f"{source}:{number}"
        line = raw.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            m = _SECTION.fullmatch(line)
            if m is None:
                raise InventoryError(f"{where}: bad section header {line[:80]!r}")
            group, kind = m.group(1), m.group(2) or "hosts"
            if kind not in ("hosts", "vars", "children"):
                raise InventoryError(f"{where}: unknown section kind :{kind} (hosts, vars or children)")
            inv.group(group, where)
        elif kind == "vars":
            name, eq, value = line.partition("=")
            if not eq:
                raise InventoryError(f"{where}: expected name=value in [{group}:vars]")
            name = name.strip()
            inv.set_vars(inv.group(group, where), f"group {group}", {name: ini_value(value.strip())}, where)
        elif kind == "children":
            m = _CHILD.fullmatch(line)
            if m is None:
                raise InventoryError(f"{where}: expected one group name in [{group}:children]")
            inv.add_child(group, m.group(1), where)
        else:
            _ini_host(line, group, where, inv)


def _ini_host(line: str, group: str, where: str, inv: Inventory) -> None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError as e:
        raise InventoryError(f"{where}: cannot read the host line: {e}") from None
    pattern, port = tokens[0], None
    m = re.fullmatch(r"([^:]+):(\d+)", pattern)
    if m is not None:
        pattern, port = m.group(1), m.group(2)
    values: dict[str, Any] = {}
    for token in tokens[1:]:
        name, eq, value = token.partition("=")
        if not eq:
            raise InventoryError(f"{where}: expected name=value after the host name, got {token[:80]!r}")
        values[name] = ini_value(value)
    if port is not None:
        values["ansible_port"] = int(port)
    for host in expand_hosts(pattern, where):
        inv.set_vars(inv.host(host, group, where), f"host {host}", values, where)


# ---------------------------------------------------------------------------------------------------------
# YAML


class Vaulted:
    """A ``!vault`` value, kept encrypted until :meth:`reveal` is given a decrypt function."""

    def __init__(self, text: str) -> None:
        self.text = text

    def reveal(self, decrypt: Decrypt | None, where: str) -> str:
        if decrypt is None:
            raise InventoryError(f"{where} is a vault-encrypted YAML value (!vault): decrypt it on your side with "
                                 "`build.py fleet import-ansible --vault-password-file FILE` (the server never "
                                 "holds a vault password)")
        return decrypt(self.text)


class LineDict(dict[Any, Any]):
    """A YAML mapping that remembers the line of each key."""

    lines: dict[str, int]


class _Loader(yaml.SafeLoader):
    pass


def _map(loader: _Loader, node: yaml.MappingNode) -> Iterator[LineDict]:
    data = LineDict()
    data.lines = {}
    yield data
    data.update(loader.construct_mapping(node))
    for key, _ in node.value:
        if isinstance(key, yaml.ScalarNode):
            data.lines.setdefault(key.value, key.start_mark.line + 1)


def _vault(loader: _Loader, node: yaml.Node) -> Vaulted:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, "!vault must tag a string", node.start_mark)
    return Vaulted(str(loader.construct_scalar(node)))


def _unsafe(loader: _Loader, node: yaml.Node) -> str:
    if not isinstance(node, yaml.ScalarNode):
        raise yaml.constructor.ConstructorError(None, None, "!unsafe must tag a string", node.start_mark)
    return str(loader.construct_scalar(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _map)
_Loader.add_constructor("!vault", _vault)
_Loader.add_constructor("!unsafe", _unsafe)


def _expanded_size(node: yaml.Node, seen: dict[int, int], source: str, depth: int = 0) -> int:
    """Nodes in the document with every alias expanded (a billion-laughs document is huge), each distinct node
    counted once (so the count itself is quick)."""
    if depth > MAX_YAML_NESTING:
        raise InventoryError(f"{source}: the YAML is nested more than {MAX_YAML_NESTING} levels deep")
    if id(node) in seen:
        return seen[id(node)]
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(n, seen, source, depth + 1) for n in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, seen, source, depth + 1) + _expanded_size(v, seen, source, depth + 1)
                    for k, v in node.value)
    seen[id(node)] = size = min(size, MAX_YAML_NODES + 1)
    return size


def load_yaml(text: str, source: str) -> Any:
    """One YAML document, ``!vault`` values as :class:`Vaulted`, mappings as :class:`LineDict`. Raises
    InventoryError (bad YAML, too large once aliases are expanded, nested too deeply)."""
    check_text(text, source)
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, {}, source) > MAX_YAML_NODES:
            raise InventoryError(f"{source}: the YAML has more than {MAX_YAML_NODES} nodes once its aliases are "
                                 "expanded")
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        raise InventoryError(f"{source}: not valid YAML: {str(e).splitlines()[0]}"
                             + (f" (line {mark.line + 1})" if mark is not None else "")) from None
    except RecursionError:
        raise InventoryError(f"{source}: the YAML is nested too deeply") from None
    except ValueError as e:  # an integer of more than 4300 digits
        raise InventoryError(f"{source}: not valid YAML: {str(e)[:200]}") from None
    finally:
        loader.dispose()


def _lines(doc: Any) -> dict[str, int]:
    return doc.lines if isinstance(doc, LineDict) else {}


def _at(source: str, parent: Any, key: str) -> str:
    line = _lines(parent).get(key)
    return f"{source}:{line}" if line else source


def parse_yaml(text: str, source: str, inv: Inventory, decrypt: Decrypt | None = None) -> None:
    """Add a YAML inventory to ``inv``. Raises InventoryError naming ``source`` and the line."""
    doc = load_yaml(text, source)
    if doc is None:
        return
    if not isinstance(doc, dict):
        raise InventoryError(f"{source}: the inventory must be a mapping of groups, not {_kind(doc)}")
    for name, node in doc.items():
        _yaml_group(str(name), node, source, _at(source, doc, name), inv, decrypt, 0)


def _yaml_group(name: str, node: Any, source: str, where: str, inv: Inventory, decrypt: Decrypt | None,
                depth: int) -> None:
    if depth > MAX_DEPTH:
        raise InventoryError(f"{where}: groups nest more than {MAX_DEPTH} levels deep")
    group = inv.group(name, where)
    if node is None:
        return
    if not isinstance(node, dict):
        raise InventoryError(f"{where}: group {name} must be a mapping (vars, hosts, children), not {_kind(node)}")
    unknown = sorted(str(k) for k in node if k not in ("vars", "hosts", "children"))
    if unknown:
        raise InventoryError(f"{where}: group {name} has {', '.join(unknown)}: only vars, hosts and children")
    inv.set_vars(group, f"group {name}", node.get("vars"), _at(source, node, "vars"), _lines(node.get("vars")),
                 decrypt, source=source)
    hosts = node.get("hosts") or {}
    if not isinstance(hosts, dict):
        raise InventoryError(f"{_at(source, node, 'hosts')}: the hosts of {name} must be a mapping")
    for pattern, hvars in hosts.items():
        at = _at(source, hosts, pattern)
        for host in expand_hosts(str(pattern), at):
            inv.set_vars(inv.host(host, name, at), f"host {host}", hvars, at, _lines(hvars), decrypt, source=source)
    children = node.get("children") or {}
    if not isinstance(children, dict):
        raise InventoryError(f"{_at(source, node, 'children')}: the children of {name} must be a mapping")
    for child, cnode in children.items():
        at = _at(source, children, child)
        inv.add_child(name, str(child), at)
        _yaml_group(str(child), cnode, source, at, inv, decrypt, depth + 1)


def parse_text(text: str, source: str, inv: Inventory, fmt: str, decrypt: Decrypt | None = None) -> None:
    """``fmt``: ``ini`` or ``yaml``."""
    if fmt == "ini":
        parse_ini(text, source, inv)
    else:
        parse_yaml(text, source, inv, decrypt)


def sniff_format(text: str) -> str:
    """``ini`` when the first line that is neither blank nor a comment starts with ``[``, else ``yaml``."""
    for line in text.splitlines():
        s = line.strip()
        if s and s[0] not in "#;":
            return "ini" if s.startswith("[") else "yaml"
    return "yaml"
