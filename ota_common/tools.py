"""One wrapper for every external program the pipeline runs.

:func:`run` logs the command, captures its output, and turns a failure into a :class:`ToolError` that names
the tool, the stage, the exit code and the tail of stderr; a missing program is told apart from a failing one
and comes with the Debian package that provides it. :func:`require_tools` checks a whole stage up front.
"""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from .errors import ToolError

log = logging.getLogger(__name__)

#: program → Debian package, for install hints
TOOL_PACKAGES: Mapping[str, str] = {
    "mmdebstrap": "mmdebstrap",
    "mkfs.ext4": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "sfdisk": "fdisk",
    "bmaptool": "bmap-tools",
    "mkimage": "u-boot-tools",
    "mkenvimage": "u-boot-tools",
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "mender-artifact": "mender-artifact",
    "fw_printenv": "libubootenv-tool",
    "fw_setenv": "libubootenv-tool",
    "xz": "xz-utils",
    "zstd": "zstd",
}

_TAIL_LINES = 15


def install_hint(tool: str) -> str:
    pkg = TOOL_PACKAGES.get(tool)
    return f"apt-get install {pkg}" if pkg else f"install {tool}"


def require_tools(tools: Iterable[str], stage: str) -> None:
    """Raise one :class:`ToolError` listing every missing program of ``stage``, with install hints."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hints = sorted({install_hint(t) for t in missing})
        raise ToolError(f"{stage} needs {', '.join(missing)}, not found on PATH; {'; '.join(hints)}")


def _tail(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return "\n".join(lines[-_TAIL_LINES:])


def run(
    args: Sequence[str | os.PathLike[str]],
    *,
    stage: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float | None = None,
    check: bool = True,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion, capturing stdout and stderr.

    Raises :class:`ToolError` when it is not installed, times out, or (with ``check``) exits non-zero."""
    argv = [os.fspath(a) for a in args]
    tool = Path(argv[0]).name
    log.info("[%s] $ %s", stage, shlex.join(argv))
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            argv, cwd=cwd, env=full_env, input=input, capture_output=True, timeout=timeout, check=False
        )
    except FileNotFoundError:
        raise ToolError(f"{tool} is not installed (needed for {stage}); {install_hint(tool)}") from None
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else ""
        raise ToolError(f"{tool} timed out after {timeout} s during {stage}\n{_tail(err)}") from None
    if check and proc.returncode != 0:
        err = proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace")
        raise ToolError(f"{tool} failed with exit code {proc.returncode} during {stage}:\n{_tail(err)}")
    return proc
