"""Power-cut simulation for tests: ``OTA_AGENT_FAULT=<point>`` makes the process die at that point, as
abruptly as a power cut would stop it (``os._exit``: no cleanup, no flush beyond what was already fsynced).
Unset in production; checking it costs a dictionary lookup."""

from __future__ import annotations

import os

EXIT_CODE = 99


def fault(point: str) -> None:
    if os.environ.get("OTA_AGENT_FAULT") == point:
        os.write(2, f"fault injected at {point}\n".encode())
        os._exit(EXIT_CODE)
