"""The build's clock. A release is built at one ``SOURCE_DATE_EPOCH``, chosen once (:func:`release_epoch`) and
handed down as an argument: to the programs that stamp times, in their own environment (:func:`tool_env`), and
to our own writers. It is never written into ``os.environ``, where it would outlive the build: a second release
built by the same process (a test session, the demo) would inherit the first one's clock.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path


def release_epoch(repo: Path) -> int:
    """``$SOURCE_DATE_EPOCH``, else the time of the last git commit of ``repo``, else now."""
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    if sde:
        return int(sde)
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=repo, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(time.time())


def given_or_environment(epoch: int | None) -> int | None:
    """``epoch``, else ``$SOURCE_DATE_EPOCH`` of this process when a caller set it (a library caller that did
    not pass one), else None (not reproducible: the clock)."""
    if epoch is not None:
        return epoch
    sde = os.environ.get("SOURCE_DATE_EPOCH")
    return int(sde) if sde else None


def tool_env(epoch: int | None) -> dict[str, str]:
    """What to add to a program's environment so that it stamps ``epoch`` (nothing for None)."""
    return {} if epoch is None else {"SOURCE_DATE_EPOCH": str(epoch)}


__all__ = ["given_or_environment", "release_epoch", "tool_env"]
