"""Declarative layers (``layers/*.yaml``): validated on load, merged by rules written down once.

A layer may declare Debian packages, files and directory trees to copy (mode, owner), jinja2 templates,
systemd units to enable or mask, users and groups, variables, the configuration variables the update server may
set on a device (``config_variables``: names only, checked by :func:`device_hooks.envvars.name_problem`), and a
short list of commands run inside the rootfs. Every file is validated against the schema below *before* anything is merged; all problems of a file
are reported at once, each with the file and the key path (``layers/app.yaml: files[2].mode: ...``).

Merge rules (:func:`merge_layers`), in layer order:
- packages, units, users, groups, config_variables, required_config: union, first occurrence wins the
  position; a required variable must be a configuration variable, and its placeholder (the merged layers'
  value of it) one word;
- files, trees and templates: a later layer may replace an earlier entry with the same ``dest``;
- variables: later layers override earlier ones (the release and the device group override layers);
- commands: concatenated in layer order;
- a unit both enabled and masked is an error.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from device_hooks.envvars import name_problem
from ota_common.errors import UserError

_PACKAGE_RE = re.compile(r"^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?(=[A-Za-z0-9.+~:-]+)?$")
_UNIT_RE = re.compile(r"^[A-Za-z0-9@_.:\\-]+\.(service|socket|target|timer|mount|path|automount|swap)$")
_NAME_RE = re.compile(r"^[a-z_][a-z0-9_-]{0,31}$")
_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class LayerError(UserError):
    """A layer file is invalid; the message lists every problem with its file and key path."""


class Model(BaseModel):
    """Base of every configuration model: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)




def _abs_dest(v: str) -> str:
    p = PurePosixPath(v)
    if not p.is_absolute() or ".." in p.parts or v != str(p):
        raise ValueError(f"must be a normalised absolute path inside the rootfs, got {v!r}")
    return v


def _mode(v: str) -> str:
    if not re.fullmatch(r"0?[0-7]{3,4}", v):
        raise ValueError(f"must be an octal mode string such as '0644', got {v!r}")
    return v


def _owner(v: str) -> str:
    if not re.fullmatch(r"[a-z_][a-z0-9_-]*(:[a-z_][a-z0-9_-]*)?", v):
        raise ValueError(f"must be 'user' or 'user:group', got {v!r}")
    return v


def _config_variable(v: str) -> str:
    problem = name_problem(v)
    if problem:
        raise ValueError(f"{v!r}: {problem}")
    return v


RootfsPath = Annotated[str, AfterValidator(_abs_dest)]
Mode = Annotated[str, AfterValidator(_mode)]
Owner = Annotated[str, AfterValidator(_owner)]
#: a variable the update server may set in the device's environment file (device_hooks/envvars.py)
ConfigVariable = Annotated[str, AfterValidator(_config_variable)]


class FileEntry(Model):
    src: str
    dest: RootfsPath
    mode: Mode = "0644"
    owner: Owner = "root:root"


class TreeEntry(Model):
    src: str
    dest: RootfsPath
    owner: Owner = "root:root"


class Units(Model):
    enable: tuple[str, ...] = ()
    mask: tuple[str, ...] = ()

    @field_validator("enable", "mask")
    @classmethod
    def _units(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for u in v:
            if not _UNIT_RE.match(u):
                raise ValueError(f"not a systemd unit name: {u!r}")
        return v


def _account(v: str) -> str:
    if not _NAME_RE.match(v):
        raise ValueError(f"not a valid user or group name: {v!r}")
    return v


AccountName = Annotated[str, AfterValidator(_account)]


class User(Model):
    name: AccountName
    system: bool = True
    home: str | None = None
    shell: str = "/usr/sbin/nologin"
    groups: tuple[AccountName, ...] = ()


class Group(Model):
    name: AccountName
    system: bool = True


class LayerModel(Model):
    """The schema of one ``layers/<name>.yaml``."""

    description: str = ""
    packages: tuple[str, ...] = ()
    files: tuple[FileEntry, ...] = ()
    trees: tuple[TreeEntry, ...] = ()
    templates: tuple[FileEntry, ...] = ()
    units: Units = Units()
    users: tuple[User, ...] = ()
    groups: tuple[Group, ...] = ()
    variables: dict[str, Annotated[str, Field(max_length=4096)]] = Field(default_factory=dict)
    #: names the update server may set on a device (rendered into ota.conf; everything else it sends is refused)
    config_variables: tuple[ConfigVariable, ...] = ()
    #: configuration variables the application cannot run without: the health verdict fails a release whose
    #: device has one unset or still at its placeholder (this layer's ``variables`` value)
    required_config: tuple[ConfigVariable, ...] = ()
    commands: tuple[str, ...] = ()

    @field_validator("packages")
    @classmethod
    def _packages(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        for p in v:
            if not _PACKAGE_RE.match(p):
                raise ValueError(f"not a Debian package name: {p!r}")
        return v

    @field_validator("variables")
    @classmethod
    def _variables(cls, v: dict[str, str]) -> dict[str, str]:
        for k in v:
            if not _VAR_RE.match(k):
                raise ValueError(f"not a variable name: {k!r}")
        return v


#: what a tree never brings into the image: Python's bytecode caches. They appear in a source tree whenever its
#: modules are imported (the ``ota`` layer's trees are the repository's own packages, which the build and the tests
#: import), so they are no part of a release's content.
TREE_IGNORE = ("__pycache__", "*.pyc")


def tree_ignored(name: str) -> bool:
    """Whether a file or directory of this name is left out of a tree (:data:`TREE_IGNORE`)."""
    return any(fnmatch.fnmatch(name, pattern) for pattern in TREE_IGNORE)


def tree_files(src: Path) -> Iterator[Path]:
    """The files, directories and symlinks of a tree as the image gets them, sorted by path: everything under
    ``src`` but :data:`TREE_IGNORE` (and what is inside an ignored directory)."""
    for p in sorted(src.rglob("*")):
        if not any(tree_ignored(part) for part in p.relative_to(src).parts):
            yield p


@dataclass(frozen=True)
class Layer:
    """A validated layer with its source paths resolved."""

    name: str
    path: Path
    model: LayerModel

    def source(self, src: str) -> Path:
        """``src`` relative to the layer file itself (a symlinked layer file keeps its real neighbours)."""
        return (self.path.resolve().parent / src).resolve()


def _loc(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_errors(path: Path, e: ValidationError) -> str:
    lines = []
    for err in e.errors():
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{path}: {_loc(err['loc'])}: {msg}")
    return "\n".join(lines)


def load_yaml_mapping(path: Path, what: str, error: type[UserError] = UserError) -> dict[str, Any]:
    """A YAML file that must hold a mapping (an empty file is an empty mapping)."""
    try:
        raw: Any = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except yaml.YAMLError as e:
        raise error(f"{path}: not valid YAML: {e}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise error(f"{path}: {what} must be a mapping of keys")
    return raw


def load_layer(path: Path) -> Layer:
    """Load and validate one layer file, including that every referenced source exists.

    Raises :class:`LayerError` listing every problem."""
    raw = load_yaml_mapping(path, "layer file", LayerError)
    try:
        model = LayerModel.model_validate(raw)
    except ValidationError as e:
        raise LayerError(format_validation_errors(path, e)) from None
    layer = Layer(name=path.stem, path=path, model=model)
    problems = []
    sources: list[tuple[str, Sequence[FileEntry | TreeEntry]]] = [
        ("files", model.files), ("trees", model.trees), ("templates", model.templates)
    ]
    for key, entries in sources:
        for i, entry in enumerate(entries):
            src = layer.source(entry.src)
            ok = src.is_dir() if key == "trees" else src.is_file()
            if not ok:
                kind = "directory" if key == "trees" else "file"
                problems.append(f"{path}: {key}[{i}].src: {kind} not found: {src}")
    if problems:
        raise LayerError("\n".join(problems))
    return layer


def load_layers(paths: Iterable[Path]) -> list[Layer]:
    """Load every layer first and report all invalid files together."""
    layers, errors = [], []
    for p in paths:
        try:
            layers.append(load_layer(p))
        except LayerError as e:
            errors.append(str(e))
    if errors:
        raise LayerError("\n".join(errors))
    return layers


@dataclass(frozen=True)
class PlacedFile:
    source: Path
    dest: str
    mode: int
    owner: str
    layer: str
    template: bool = False


@dataclass(frozen=True)
class PlacedTree:
    source: Path
    dest: str
    owner: str
    layer: str


@dataclass(frozen=True)
class MergedLayers:
    """The result of merging layers in order; what the rootfs builder consumes."""

    layers: tuple[str, ...]
    packages: tuple[str, ...]
    files: tuple[PlacedFile, ...]
    trees: tuple[PlacedTree, ...]
    enable: tuple[str, ...]
    mask: tuple[str, ...]
    users: tuple[User, ...]
    groups: tuple[Group, ...]
    variables: dict[str, str]
    commands: tuple[tuple[str, str], ...]  # (layer, command)
    config_variables: tuple[str, ...] = ()
    required_config: tuple[str, ...] = ()
    #: name -> the value the image holds when nobody configured it (the layers' ``variables``)
    config_placeholders: dict[str, str] = field(default_factory=dict)


def _union(seqs: Iterable[Iterable[str]]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(x for s in seqs for x in s))


def merge_layers(layers: Sequence[Layer]) -> MergedLayers:
    """Merge validated layers by the rules in the module docstring. Raises :class:`LayerError`."""
    files: dict[str, PlacedFile] = {}
    trees: dict[str, PlacedTree] = {}
    users: dict[str, User] = {}
    groups: dict[str, Group] = {}
    variables: dict[str, str] = {}
    for layer in layers:
        m = layer.model
        for f in m.files:
            files[f.dest] = PlacedFile(layer.source(f.src), f.dest, int(f.mode, 8), f.owner, layer.name)
        for t in m.templates:
            files[t.dest] = PlacedFile(layer.source(t.src), t.dest, int(t.mode, 8), t.owner, layer.name, template=True)
        for tr in m.trees:
            trees[tr.dest] = PlacedTree(layer.source(tr.src), tr.dest, tr.owner, layer.name)
        for u in m.users:
            users.setdefault(u.name, u)
        for g in m.groups:
            groups.setdefault(g.name, g)
        variables.update(m.variables)
    enable = _union(layer.model.units.enable for layer in layers)
    mask = _union(layer.model.units.mask for layer in layers)
    both = sorted(set(enable) & set(mask))
    if both:
        raise LayerError(f"units both enabled and masked: {', '.join(both)}")
    config_variables = _union(layer.model.config_variables for layer in layers)
    required = _union(layer.model.required_config for layer in layers)
    problems = [f"required_config: {name} is not in any layer's config_variables (nothing could set it)"
                for name in required if name not in config_variables]
    # rendered into ota.conf as NAME=value words: a placeholder is one word
    problems += [f"variables: {name}: the placeholder of a required variable must not contain whitespace or "
                 f"commas, got {variables[name]!r}"
                 for name in required if name in variables and re.search(r"[\s,]", variables[name])]
    if problems:
        raise LayerError("\n".join(problems))
    return MergedLayers(
        layers=tuple(layer.name for layer in layers),
        packages=_union(layer.model.packages for layer in layers),
        files=tuple(files.values()),
        trees=tuple(trees.values()),
        enable=enable,
        mask=mask,
        users=tuple(users.values()),
        groups=tuple(groups.values()),
        variables=variables,
        commands=tuple((layer.name, c) for layer in layers for c in layer.model.commands),
        config_variables=config_variables,
        required_config=required,
        config_placeholders={name: variables[name] for name in required if name in variables},
    )
