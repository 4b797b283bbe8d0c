"""The import order of docs/architecture.md, checked on the source: a package imports only the packages to
its left (``ota_common → artifacts → device_hooks, ota_server → image → devkit → cli``), so the device never
pulls in the server or the build side, and the harness stays out of the product."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

#: package -> the packages of ours it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "ota_common": set(),
    "artifacts": {"ota_common"},
    "device_hooks": {"ota_common", "artifacts"},
    "ota_server": {"ota_common", "artifacts"},
    "image": {"ota_common", "artifacts", "device_hooks", "ota_server"},
    "devkit": {"ota_common", "artifacts", "device_hooks", "ota_server", "image"},
    "cli": {"ota_common", "artifacts", "device_hooks", "ota_server", "image", "devkit"},
}


def imported_packages(path: Path) -> set[str]:
    """Our top-level packages that ``path`` imports (absolute imports, at any depth of the module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {n.split(".")[0] for n in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_imports_flow_one_way(package: str) -> None:
    wrong = {str(p.relative_to(REPO)): sorted(imported_packages(p) - ALLOWED[package] - {package})
             for p in sorted((REPO / package).rglob("*.py"))}
    assert not {k: v for k, v in wrong.items() if v}, f"{package} imports packages to its right"


def test_the_check_sees_an_import(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from ota_server.app import create_app\n    import cli.common\n")
    assert imported_packages(probe) == {"ota_server", "cli"}
