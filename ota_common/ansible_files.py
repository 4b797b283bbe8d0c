"""An Ansible inventory on disk: an inventory file, or a directory of them, with the ``group_vars/`` and
``host_vars/`` directories next to it (``build.py fleet import-ansible``; the server only receives the result).

- A directory: every file in it (not hidden, not in ``group_vars``/``host_vars``, not with one of Ansible's
  ignored extensions such as ``.md``, ``.txt``, ``.retry``), in name order. ``.yml``/``.yaml``/``.json`` files are
  YAML, any other is INI (as Ansible's yaml and ini plugins decide).
- ``group_vars/<group>`` and ``host_vars/<host>``: a file ``<name>``, ``<name>.yml``, ``.yaml`` or ``.json``, or a
  directory ``<name>/`` whose files (recursively, in name order) are read in turn. Files are found by listing the
  directories, never by joining a name from the inventory to a path; a file for a group or host that the
  inventory does not have is ignored with a warning.
- A vault-encrypted file (``$ANSIBLE_VAULT;...``, inventory or vars) is decrypted with the caller's function and
  all its values are secret; without one, it is refused.
- Nothing outside the inventory's directory is read: a symbolic link leading out of it is refused, and so is a
  file larger than MAX_TEXT.
"""

from __future__ import annotations

from pathlib import Path

from .ansible_inventory import (
    MAX_TEXT,
    VAULT_HEADER,
    Decrypt,
    Inventory,
    InventoryError,
    load_yaml,
    parse_text,
)

IGNORED_SUFFIXES = (".pyc", ".pyo", ".swp", ".bak", "~", ".rpm", ".md", ".txt", ".rst", ".orig", ".cfg", ".retry")
YAML_SUFFIXES = (".yml", ".yaml", ".json")
VARS_DIRS = ("group_vars", "host_vars")
MAX_FILES = 10_000
MAX_DIR_DEPTH = 8


def _read(path: Path, root: Path, decrypt: Decrypt | None) -> tuple[str, bool]:
    """The file's text and whether it was vault-encrypted."""
    shown = _shown(path, root)
    real = path.resolve()
    if not real.is_relative_to(root):
        raise InventoryError(f"{shown}: leads out of the inventory directory {root} (refused)")
    if real.stat().st_size > MAX_TEXT:
        raise InventoryError(f"{shown}: larger than {MAX_TEXT >> 20} MiB")
    try:
        text = real.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InventoryError(f"{shown}: not UTF-8 text") from None
    except OSError as e:
        raise InventoryError(f"{shown}: cannot be read: {e.strerror}") from None
    if not text.lstrip().startswith(VAULT_HEADER):
        return text, False
    if decrypt is None:
        raise InventoryError(f"{shown} is vault-encrypted: give the vault password with --vault-password-file")
    try:
        return decrypt(text), True
    except InventoryError as e:
        raise InventoryError(f"{shown}: {e}") from None


def _shown(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _files(directory: Path, root: Path, depth: int = 0) -> list[Path]:
    """Regular files under ``directory`` (recursively, name order), hidden and ignored ones left out."""
    if depth > MAX_DIR_DEPTH:
        raise InventoryError(f"{_shown(directory, root)}: directories nest more than {MAX_DIR_DEPTH} levels deep")
    out: list[Path] = []
    for p in sorted(directory.iterdir()):
        if p.name.startswith(".") or p.name.endswith(IGNORED_SUFFIXES):
            continue
        if not p.resolve().is_relative_to(root):
            raise InventoryError(f"{_shown(p, root)}: leads out of the inventory directory {root} (refused)")
        if p.is_dir():
            out += _files(p, root, depth + 1)
        elif p.is_file():
            out.append(p)
        if len(out) > MAX_FILES:
            raise InventoryError(f"{_shown(directory, root)}: more than {MAX_FILES} files")
    return out


def _fmt(path: Path) -> str:
    return "yaml" if path.suffix.lower() in YAML_SUFFIXES else "ini"


def load_inventory(path: Path, decrypt: Decrypt | None = None) -> Inventory:
    """Read an inventory file or directory with its ``group_vars/`` and ``host_vars/``. Raises InventoryError."""
    if not path.exists():
        raise InventoryError(f"{path}: no such inventory file or directory")
    root = (path if path.is_dir() else path.parent).resolve()
    inv = Inventory()
    if path.is_dir():
        sources = [p for p in _files_top(root) if p.name not in VARS_DIRS]
        if not sources:
            raise InventoryError(f"{path}: no inventory file in this directory")
    else:
        sources = [path]
    for source in sources:
        text, secret = _read(source, root, decrypt)
        inv.secret_source = secret
        parse_text(text, _shown(source, root), inv, _fmt(source), decrypt)
        inv.secret_source = False
    for kind in VARS_DIRS:
        if (root / kind).is_dir():
            _load_vars_dir(root / kind, root, kind, inv, decrypt)
    return inv


def _files_top(root: Path) -> list[Path]:
    return [p for p in sorted(root.iterdir()) if p.is_file() and not p.name.startswith(".")
            and not p.name.endswith(IGNORED_SUFFIXES)]


def _load_vars_dir(directory: Path, root: Path, kind: str, inv: Inventory, decrypt: Decrypt | None) -> None:
    known = inv.groups if kind == "group_vars" else inv.hosts
    for entry in sorted(directory.iterdir()):
        if entry.name.startswith(".") or entry.name.endswith(IGNORED_SUFFIXES):
            continue
        name = entry.name if entry.is_dir() else entry.name.removesuffix(entry.suffix) \
            if entry.suffix.lower() in YAML_SUFFIXES else entry.name
        if name not in known:
            inv.warnings.append(f"{_shown(entry, root)}: the inventory has no {kind.split('_')[0]} {name!r}: ignored")
            continue
        owner = inv.groups[name] if kind == "group_vars" else inv.hosts[name]
        label = f"{'group' if kind == 'group_vars' else 'host'} {name}"
        for f in _files(entry, root) if entry.is_dir() else [entry]:
            shown = _shown(f, root)
            text, secret = _read(f, root, decrypt)
            doc = load_yaml(text, shown)
            inv.set_vars(owner, label, doc, shown, getattr(doc, "lines", None), decrypt, secret, source=shown)
