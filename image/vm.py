"""Boot a built ``qemu-virt`` disk image in ``qemu-system-aarch64`` (TCG), for the demo and the QEMU tests.

The line is the device contract's (``-M virt -cpu cortex-a72 -m 1024 -bios <u-boot> -drive if=virtio ...
-device i6300esb -watchdog-action reset``) plus user-mode networking, so the guest reaches a server on the
host's loopback at ``10.0.2.2``. The disk is a copy-on-write qcow2 overlay over the image (the image is never
written) unless ``writable`` is set. The serial console goes to a log file; callers wait for markers in it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ota_common.errors import ToolError
from ota_common.tools import install_hint, require_files, require_tools

UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
TOOLS = ("qemu-system-aarch64", "qemu-img")


def virt_argv(disk: Path, *, smp: int = 2, ssh_port: int | None = None) -> list[str]:
    """The QEMU line of a ``qemu-virt`` device booting ``disk`` (qcow2 by its suffix, else raw): the device
    contract's machine, U-Boot, watchdog and a user-mode NIC. The NIC has no option ROM (``romfile=``): U-Boot
    never boots from the network, and the run does not depend on ``ipxe-qemu``'s ``efi-virtio.rom``."""
    fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
    return ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", str(smp), "-m", "1024",
            "-nographic", "-bios", str(UBOOT), "-drive", f"if=virtio,format={fmt},file={disk}",
            "-device", "i6300esb", "-watchdog-action", "reset",
            "-netdev", "user,id=n0" + (f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""),
            "-device", "virtio-net-pci,netdev=n0,romfile="]


def preflight(workdir: Path) -> None:
    """Check in well under a second that a device can be started here: the programs, U-Boot, and QEMU itself
    with the exact machine and device options of :func:`virt_argv` (started paused, then told to quit), so a
    missing ROM, firmware or device shows up before any build instead of minutes later.

    Raises :class:`ToolError` naming the Debian package to install."""
    require_tools(TOOLS, "booting images in QEMU")
    require_files([UBOOT], "booting images in QEMU")
    workdir.mkdir(parents=True, exist_ok=True)
    disk = workdir / "preflight.img"
    disk.write_bytes(bytes(1 << 20))
    try:
        argv = [*virt_argv(disk, ssh_port=None), "-S", "-serial", "null", "-monitor", "stdio"]
        try:
            proc = subprocess.run(argv, input=b"quit\n", capture_output=True, timeout=30)
        except subprocess.TimeoutExpired:
            raise ToolError("qemu-system-aarch64 did not start and quit within 30 s (preflight)") from None
    finally:
        disk.unlink(missing_ok=True)
    if proc.returncode != 0:
        err = proc.stderr.decode(errors="replace").strip()
        raise ToolError(f"qemu-system-aarch64 cannot start a qemu-virt device here: {err}{_missing_file_hint(err)}")


def _missing_file_hint(err: str) -> str:
    """'failed to find romfile "x"' / 'Could not open 'x'': the package that provides the file."""
    m = re.search(r'failed to find romfile "([^"]+)"|Could not open \'([^\']+)\'', err)
    if not m:
        return ""
    return f"; {install_hint(m.group(1) or m.group(2))}"


class VmError(ToolError):
    """QEMU stopped, or what was awaited did not show up in time (the message has the console tail)."""


class Vm:
    def __init__(self, disk: Path, workdir: Path, *, name: str = "vm", writable: bool = False, smp: int = 2,
                 grow_bytes: int = 0, ssh_key: Path | None = None, ssh_port: int | None = None) -> None:
        require_tools(TOOLS, "booting images in QEMU")
        require_files([UBOOT], "booting images in QEMU")
        workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = workdir / f"{name}-console.log"
        if writable:
            self.disk = disk
        else:
            self.disk = workdir / f"{name}.qcow2"
            self.disk.unlink(missing_ok=True)
            size = [str(disk.stat().st_size + grow_bytes)] if grow_bytes else []  # a bigger card than the image
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "raw",
                            str(self.disk), *size], check=True)
        self.cmd = virt_argv(self.disk, smp=smp, ssh_port=ssh_port)
        self.ssh_key, self.ssh_port = ssh_key, ssh_port
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    # -- life cycle
    def start(self) -> Vm:
        self._out = open(self.console_log, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=self._out,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        return self

    def kill(self) -> None:
        """Pull the plug: no shutdown, no flush (a power cut)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait()
        if self._out is not None:
            self._out.close()
            self._out = None

    stop = kill

    def __enter__(self) -> Vm:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.kill()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- commands in the guest
    def ssh(self, command: str, *, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run ``command`` as root in the guest over SSH (the port forwarded to the guest's port 22; the
        image must authorize ``ssh_key``)."""
        if self.ssh_key is None or self.ssh_port is None:
            raise VmError("this VM was started without an SSH key and port")
        cmd = ["ssh", "-q", "-i", str(self.ssh_key), "-p", str(self.ssh_port), "-o", "BatchMode=yes",
               "-o", "StrictHostKeyChecking=no", "-o", "UserKnownHostsFile=/dev/null", "-o", "ConnectTimeout=20",
               "root@127.0.0.1", command]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise VmError(f"in the guest, {command!r} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
        return proc

    def wait_for_ssh(self, timeout: float) -> None:
        def up() -> bool:
            try:
                return self.ssh("true", timeout=60, check=False).returncode == 0
            except subprocess.TimeoutExpired:
                return False

        up.__doc__ = "SSH in the guest"
        self.wait_for(up, timeout, poll=3)

    # -- console
    def console(self) -> str:
        try:
            return self.console_log.read_bytes().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def mark(self) -> int:
        """An offset into the console: :meth:`wait_for` with ``since`` looks only at what comes after it."""
        return len(self.console())

    def wait_for(self, what: str | Callable[[], bool], timeout: float, *, since: int = 0,
                 poll: float = 1.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if callable(what):
                if what():
                    return
            elif what in self.console()[since:]:
                return
            if not self.running:
                raise VmError(f"QEMU stopped while waiting for {_describe(what)}\n{self.tail()}")
            if time.monotonic() > deadline:
                raise VmError(f"not seen within {timeout:.0f} s: {_describe(what)}\n{self.tail()}")
            time.sleep(poll)

    def tail(self, chars: int = 3000) -> str:
        return "console tail:\n" + self.console()[-chars:]


def _describe(what: str | Callable[[], bool]) -> str:
    if isinstance(what, str):
        return repr(what)
    return str(what.__doc__ or getattr(what, "__name__", "a condition"))
