"""Suite-wide: how ``pytest -n 2 --dist loadscope`` (scripts/test.sh) spreads the suite over its workers.

A worker runs whole units that share session or module fixtures, so the suite builds and boots each thing once
and the scenarios of a module keep their order:

- ``qemu``: every QEMU scenario module (``qemu_tests/``: one session's release series, built once) and every
  module that uses the session's default release (``release_dir``): the images are built on one worker only
  (builds take the build cache's lock; two workers building would wait for each other);
- otherwise the test's module, as ``--dist loadfile`` does: a module's server starts once.

pytest-xdist's own ``loadgroup`` mode reads ``xdist_group`` markers into node ids through an attribute that
pytest 9.2 no longer uses (the groups were silently ignored), so the unit is chosen here from the node id.
Without ``-n`` (a plain ``pytest tests/test_x.py``) nothing here applies.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent
#: a module that names one of these session fixtures builds or boots images: it runs with the QEMU scenarios
IMAGE_FIXTURES = ("release_dir",)


@functools.cache
def unit_of_module(module: str) -> str:
    """The scheduling unit of a test module (its path relative to the repository, as in node ids)."""
    path = ROOT / module
    if module.startswith("qemu_tests/"):
        return "qemu"
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return module
    return "qemu" if any(name in text for name in IMAGE_FIXTURES) else module


def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling  # type: ignore[import-untyped]

    class SuiteScheduling(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return unit_of_module(nodeid.split("::", 1)[0])

    return SuiteScheduling(config, log)
