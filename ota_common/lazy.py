"""Lazy names of a package (PEP 562): each imported from its submodule on first use, so that importing the
package stays cheap (start-up time counts on a device; the build host's writer needs libraries the device
has not got). Standard library only."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str], namespace: dict[str, Any]) -> Callable[[str], Any]:
    """The module ``__getattr__`` of ``package``: a name in ``exports`` is imported from the submodule it maps
    to (relative to ``package``) and kept in ``namespace`` (the package's ``globals()``), so the next lookup
    does not come here. Raises AttributeError for any other name."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{module}", package), name)
        namespace[name] = value
        return value

    return __getattr__
