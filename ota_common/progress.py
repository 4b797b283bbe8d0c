"""Progress of long jobs as plain lines: each step says when it starts, what it is doing, that it is still
running when it has been quiet for a while, and how long it took. Lines go to one ``emit`` callable (the CLI's
console, the demo's log, a list in tests), so they read the same on a terminal and in a CI log.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Emit = Callable[[str], None]


def elapsed(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``."""
    seconds = int(seconds)
    return f"{seconds} s" if seconds < 60 else f"{seconds // 60} min {seconds % 60:02d} s"


class Steps:
    """Timed steps of a job. ``heartbeat``: seconds of silence inside a step after which a "still running"
    line is emitted (None: never). Thread-safe: a step's notes may come from a tool's output reader."""

    def __init__(self, emit: Emit, *, heartbeat: float | None = 30.0) -> None:
        self.emit = emit
        self.heartbeat = heartbeat
        self.timings: dict[str, float] = {}
        self._lock = threading.Lock()
        self._last_line = 0.0

    def _say(self, line: str) -> None:
        with self._lock:
            self._last_line = time.monotonic()
        self.emit(line)

    @contextmanager
    def step(self, name: str) -> Iterator[Emit]:
        """Time the body as step ``name``; the body gets a ``note(msg)`` callable for what it is doing."""
        start = time.monotonic()
        last_note = [""]
        self._say(f"{name} …")

        def note(msg: str) -> None:
            last_note[0] = msg
            self._say(f"{name}: {msg} ({elapsed(time.monotonic() - start)})")

        stop = threading.Event()

        def beat() -> None:
            assert self.heartbeat is not None
            while not stop.wait(min(1.0, self.heartbeat / 4)):
                with self._lock:
                    quiet = time.monotonic() - self._last_line
                if quiet >= self.heartbeat:
                    doing = f"; last: {last_note[0]}" if last_note[0] else ""
                    self._say(f"{name}: still running ({elapsed(time.monotonic() - start)}){doing}")

        beater = threading.Thread(target=beat, daemon=True) if self.heartbeat else None
        if beater is not None:
            beater.start()
        try:
            yield note
        except BaseException:
            self._say(f"{name}: failed after {elapsed(time.monotonic() - start)}")
            raise
        finally:
            stop.set()
            if beater is not None:
                beater.join()
        self.timings[name] = time.monotonic() - start
        self._say(f"{name}: {self.timings[name]:.1f} s")


__all__ = ["Emit", "Steps", "elapsed"]
