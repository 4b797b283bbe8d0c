"""The harness's one "poll until done" loop, and what a wait that took too long reports."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from ota_common.errors import ToolError

T = TypeVar("T")


class WaitTimeout(ToolError):
    """What the harness waited for did not happen in time (the message says what, and what was seen)."""


def wait_until(predicate: Callable[[], T], timeout: float, poll: float, what: str,
               diagnostics: Callable[[], str] | None = None) -> T:
    """Call ``predicate`` every ``poll`` seconds until it returns something true, and return that.

    The predicate is called at least once, and once more after the deadline passed while it slept. It may
    raise to end the wait early (a process it watches exited).

    Raises :class:`WaitTimeout` naming ``what`` and ``timeout``, followed by ``diagnostics()`` when given."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            detail = f"\n{diagnostics()}" if diagnostics is not None else ""
            raise WaitTimeout(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(poll)


def disk_free(path: Path) -> str:
    """``free space in PATH: X of Y GB``: a full disk pauses QEMU or stalls a server, so every time-out says it."""
    try:
        usage = shutil.disk_usage(path)
    except OSError as e:
        return f"free space in {path}: unknown ({e.strerror})"
    return f"free space in {path}: {usage.free / 1e9:.1f} of {usage.total / 1e9:.1f} GB"


def log_tail(path: Path, lines: int = 80) -> str:
    """The last ``lines`` lines of a log file (``(no log at PATH)`` when there is none yet)."""
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])
