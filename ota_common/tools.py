"""One wrapper for every external program the pipeline runs, and the table of what must be installed.

:func:`run` logs the command, captures its output, and turns a failure into a :class:`ToolError` that names
the tool, the stage, the exit code and the tail of stderr; a missing program is told apart from a failing one
and comes with the Debian package that provides it. :func:`require_tools` checks a whole stage up front.

:data:`TOOL_PACKAGES` (every program the code, the tests and the benchmarks run, with its Debian package) and
:data:`FILE_PACKAGES` (data files a program of ours needs: firmware, ROMs) are the install contract:
``scripts/install.sh`` must install every package named there (a test reads both and fails otherwise), and
``python -m ota_common.tools`` (run at the end of ``install.sh``) names the packages still missing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

from .errors import ToolError

log = logging.getLogger(__name__)

#: program → Debian package (bookworm), for install hints and the install contract
TOOL_PACKAGES: Mapping[str, str] = {
    # image builds
    "mmdebstrap": "mmdebstrap",
    "arch-test": "arch-test",
    "mkfs.ext4": "e2fsprogs",
    "mke2fs": "e2fsprogs",
    "e2fsck": "e2fsprogs",
    "debugfs": "e2fsprogs",
    "mkfs.vfat": "dosfstools",
    "mcopy": "mtools",
    "mmd": "mtools",
    "mtype": "mtools",
    "sfdisk": "fdisk",
    "bmaptool": "bmap-tools",
    "mkimage": "u-boot-tools",
    "mkenvimage": "u-boot-tools",
    "dpkg-deb": "dpkg",
    "apt-get": "apt",
    "systemctl": "systemd",
    "journalctl": "systemd",
    "chroot": "coreutils",
    "tar": "tar",
    "groupadd": "passwd",
    "useradd": "passwd",
    "git": "git",
    "xz": "xz-utils",
    "zstd": "zstd",
    # QEMU boots (devkit/qemu.py) and the commands the tests run in the guest
    "qemu-system-aarch64": "qemu-system-arm",
    "qemu-img": "qemu-utils",
    "ssh": "openssh-client",
    "ssh-keygen": "openssh-client",
    "openssl": "openssl",
    # artifacts and boot-state interop
    "mender-artifact": "mender-artifact",
    "fw_printenv": "libubootenv-tool",
    "fw_setenv": "libubootenv-tool",
    # tests and benchmarks
    "unshare": "util-linux",
    "runuser": "util-linux",
    "ip": "iproute2",
    "initdb": "postgresql",
    "pg_ctl": "postgresql",
    "psql": "postgresql-client",
    "pg_dump": "postgresql-client",
    "pg_restore": "postgresql-client",
    "systemd-analyze": "systemd",
    "chromium": "chromium",
    "nginx": "nginx",
    "xdelta3": "xdelta3",
    "/usr/bin/time": "time",
    "cp": "coreutils",
    "dd": "coreutils",
    "sh": "dash",
    "echo": "coreutils",
    "sleep": "coreutils",
}

#: data file → Debian package: files a program of ours opens (firmware given to QEMU, option ROMs)
FILE_PACKAGES: Mapping[str, str] = {
    "/usr/lib/u-boot/qemu_arm64/u-boot.bin": "u-boot-qemu",
    # virtio-net-pci's option ROM: our NICs pass romfile= (no network boot), the package stays installed anyway
    "/usr/lib/ipxe/qemu/efi-virtio.rom": "ipxe-qemu",
}

#: packages every Debian system has (Priority: required): never missing, so install.sh need not name them
REQUIRED_PACKAGES = frozenset({"coreutils", "dash", "bash", "tar", "dpkg", "apt", "passwd", "util-linux",
                               "debianutils", "findutils", "grep", "sed", "gzip", "mount", "login"})

_TAIL_LINES = 15


def package_for(name: str) -> str | None:
    """The Debian package of a program (by name or path) or of a data file (by path or file name)."""
    if name in TOOL_PACKAGES:
        return TOOL_PACKAGES[name]
    if Path(name).name in TOOL_PACKAGES:
        return TOOL_PACKAGES[Path(name).name]
    if name in FILE_PACKAGES:
        return FILE_PACKAGES[name]
    base = Path(name).name
    return next((pkg for path, pkg in FILE_PACKAGES.items() if Path(path).name == base), None)


def install_hint(tool: str) -> str:
    pkg = package_for(tool)
    return f"apt-get install {pkg}" if pkg else f"install {tool}"


def require_tools(tools: Iterable[str], stage: str) -> None:
    """Raise one :class:`ToolError` listing every missing program of ``stage``, with install hints."""
    missing = [t for t in tools if shutil.which(t) is None]
    if missing:
        hints = sorted({install_hint(t) for t in missing})
        raise ToolError(f"{stage} needs {', '.join(missing)}, not found on PATH; {'; '.join(hints)}")


def require_files(files: Iterable[str | os.PathLike[str]], stage: str) -> None:
    """Raise one :class:`ToolError` listing every missing data file of ``stage``, with install hints."""
    missing = [os.fspath(f) for f in files if not Path(f).exists()]
    if missing:
        hints = sorted({install_hint(f) for f in missing})
        raise ToolError(f"{stage} needs {', '.join(missing)}, not found; {'; '.join(hints)}")


def missing_packages() -> dict[str, list[str]]:
    """Package → the programs and files of the install contract it should provide that are not here."""
    missing: dict[str, list[str]] = {}
    for tool, pkg in TOOL_PACKAGES.items():
        if find_program(tool) is None:
            missing.setdefault(pkg, []).append(tool)
    for path, pkg in FILE_PACKAGES.items():
        if not Path(path).exists():
            missing.setdefault(pkg, []).append(path)
    return missing


def find_program(tool: str) -> Path | None:
    """The program on PATH, or PostgreSQL's server programs in their versioned directory (newest first)."""
    found = shutil.which(tool)
    if found:
        return Path(found)
    return next(iter(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{tool}"), reverse=True)), None)


def tail(text: str) -> str:
    """The last lines of a program's output that say anything (what a :class:`ToolError` quotes)."""
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
    on_stderr_line: Callable[[str], None] | None = None,
) -> subprocess.CompletedProcess[bytes]:
    """Run a program to completion, capturing stdout and stderr.

    ``on_stderr_line`` sees each line of stderr as the program writes it (progress of long steps); the whole
    stderr is still captured. Raises :class:`ToolError` (with ``argv``, and ``returncode`` and the ``stderr``
    tail where the program ran) when the program is not installed, times out, or (with ``check``) exits
    non-zero."""
    argv = [os.fspath(a) for a in args]
    tool = Path(argv[0]).name
    log.info("[%s] $ %s", stage, shlex.join(argv))
    full_env = None if env is None else {**os.environ, **env}
    try:
        if on_stderr_line is None:
            proc = subprocess.run(argv, cwd=cwd, env=full_env, input=input, capture_output=True, timeout=timeout,
                                  check=False)
        else:
            proc = _run_streaming(argv, cwd=cwd, env=full_env, input=input, timeout=timeout,
                                  on_line=on_stderr_line)
    except FileNotFoundError:
        raise ToolError(f"{tool} is not installed (needed for {stage}); {install_hint(tool)}", argv=argv) from None
    except subprocess.TimeoutExpired as e:
        said = tail(e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else "")
        raise ToolError(f"{tool} timed out after {timeout} s during {stage}\n{said}", argv=argv,
                        stderr=said) from None
    if check and proc.returncode != 0:
        said = tail(proc.stderr.decode(errors="replace") or proc.stdout.decode(errors="replace"))
        raise ToolError(f"{tool} failed with exit code {proc.returncode} during {stage}:\n{said}", argv=argv,
                        returncode=proc.returncode, stderr=said)
    return proc


def _run_streaming(argv: list[str], *, cwd: Path | None, env: Mapping[str, str] | None, input: bytes | None,
                   timeout: float | None, on_line: Callable[[str], None]) -> subprocess.CompletedProcess[bytes]:
    """:func:`subprocess.run` with stderr handed to ``on_line`` line by line. The program runs in a session of
    its own so that a time-out stops its children too (they would keep the pipes open)."""
    proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stderr is not None
    out: list[bytes] = []
    err: list[bytes] = []
    timed_out = threading.Event()

    def read_stdout() -> None:
        assert proc.stdout is not None
        out.append(proc.stdout.read())

    def feed() -> None:
        assert proc.stdin is not None
        try:
            proc.stdin.write(input or b"")
            proc.stdin.close()
        except BrokenPipeError:
            pass

    def expire() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    threads = [threading.Thread(target=read_stdout, daemon=True)]
    if input is not None:
        threads.append(threading.Thread(target=feed, daemon=True))
    timer = threading.Timer(timeout, expire) if timeout is not None else None
    for t in threads:
        t.start()
    if timer is not None:
        timer.start()
    try:
        for raw in proc.stderr:
            err.append(raw)
            line = raw.decode(errors="replace").rstrip()
            if line:
                on_line(line)
        proc.wait()
    except BaseException:
        expire()
        proc.wait()
        raise
    finally:
        if timer is not None:
            timer.cancel()
        for t in threads:
            t.join()
        proc.stdout.close()
        proc.stderr.close()
    if timed_out.is_set():
        raise subprocess.TimeoutExpired(argv, timeout or 0, output=b"".join(out), stderr=b"".join(err))
    return subprocess.CompletedProcess(argv, proc.returncode, b"".join(out), b"".join(err))


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ota_common.tools``: name the Debian packages whose programs or files are missing."""
    missing = missing_packages()
    if not missing:
        print(f"all {len(TOOL_PACKAGES)} programs and {len(FILE_PACKAGES)} data files are installed")
        return 0
    for pkg, what in sorted(missing.items()):
        print(f"missing: {', '.join(what)} (Debian package {pkg})", file=sys.stderr)
    print(f"error: install them: apt-get install {' '.join(sorted(missing))}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
