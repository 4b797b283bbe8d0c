"""Suite-wide: how ``pytest -n 2 --dist loadgroup`` (scripts/test.sh) spreads the suite over its workers.

Every test gets an ``xdist_group``, so a worker runs whole units that share session or module fixtures and the
suite builds and boots each thing once:

- ``qemu``: every QEMU scenario module (``qemu_tests/``: one session's release series, built once) and the tests
  that boot the session's default release (``release_dir``): the images are built on one worker only;
- otherwise the test's module, as ``--dist loadfile`` would: a module's server (one per module and database)
  starts once.

Without xdist (a plain ``pytest tests/test_x.py``) the marker is inert.
"""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent
#: session fixtures that build or boot images: the tests using them share one worker with the QEMU scenarios
IMAGE_FIXTURES = frozenset({"release_dir", "fleet"})


def xdist_group_of(item: pytest.Item) -> str:
    path = Path(str(item.path)).resolve()
    if path.is_relative_to(ROOT / "qemu_tests") or IMAGE_FIXTURES & set(getattr(item, "fixturenames", ())):
        return "qemu"
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else str(path)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if not any(m.name == "xdist_group" for m in item.iter_markers()):
            item.add_marker(pytest.mark.xdist_group(xdist_group_of(item)))
