"""Boot a built ``qemu-virt`` disk image in ``qemu-system-aarch64`` (TCG), for the demo and the QEMU tests.

The line is the device contract's (``-M virt -cpu cortex-a72 -m 1024 -bios <u-boot> -drive if=virtio ...
-device i6300esb -watchdog-action reset``) plus user-mode networking, so the guest reaches a server on the
host's loopback at ``10.0.2.2``. The disk is a copy-on-write qcow2 overlay over the image (the image is never
written) unless ``writable`` is set. The serial console goes to a log file; callers wait for markers in it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from ota_common.errors import ToolError
from ota_common.tools import require_tools

UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")


class VmError(ToolError):
    """QEMU stopped, or what was awaited did not show up in time (the message has the console tail)."""


class Vm:
    def __init__(self, disk: Path, workdir: Path, *, name: str = "vm", writable: bool = False, smp: int = 2,
                 grow_bytes: int = 0, ssh_key: Path | None = None, ssh_port: int | None = None) -> None:
        require_tools(["qemu-system-aarch64", "qemu-img"], "booting images in QEMU")
        if not UBOOT.exists():
            raise ToolError(f"{UBOOT} is missing: apt-get install u-boot-qemu")
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
        fmt = "qcow2" if self.disk.suffix == ".qcow2" else "raw"
        self.cmd = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", str(smp), "-m", "1024",
                    "-nographic", "-bios", str(UBOOT), "-drive", f"if=virtio,format={fmt},file={self.disk}",
                    "-device", "i6300esb", "-watchdog-action", "reset",
                    "-netdev", "user,id=n0" + (f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""),
                    "-device", "virtio-net-pci,netdev=n0"]
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
