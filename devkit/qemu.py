"""Boot disk images in ``qemu-system-aarch64`` (TCG), for the demo and the tests.

The QEMU line of a board is a pure function (:func:`virt_argv`; ``qemu-virt`` is today's only emulated board):
the device contract's ``-M virt -cpu cortex-a72 -m 1024 -bios <u-boot> -drive if=virtio ... -device i6300esb
-watchdog-action reset`` plus user-mode networking, so the guest reaches a server on the host's loopback at
``10.0.2.2``. Drives report I/O errors to the guest (``werror=report,rerror=report``): with QEMU's default a
full host disk pauses the VM without a word, and a run waits for a console line that never comes.

:class:`Vm` runs any such line with the serial console in a log file; callers wait for markers in it. A
device made with :meth:`Vm.device` boots a copy-on-write qcow2 overlay of the image (the image is never
written) unless ``writable`` is set. Every wait that takes too long reports the console's tail, the free space
of the work directory and, when the VM has a server, the tail of the server's log.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, TypeVar, overload

from devkit.wait import disk_free, log_tail, wait_until
from ota_common.errors import ToolError
from ota_common.tools import install_hint, require_files, require_tools, run

UBOOT = Path("/usr/lib/u-boot/qemu_arm64/u-boot.bin")
TOOLS = ("qemu-system-aarch64", "qemu-img")
T = TypeVar("T")


def virtio_drive(disk: Path, *, throttle_write: tuple[int, int] | None = None) -> str:
    """The ``-drive`` value of a virtio disk (qcow2 by its suffix, else raw) whose host I/O errors reach the
    guest as I/O errors instead of pausing the VM. ``throttle_write``: (bytes/s, write requests/s) the guest may
    write at most, like an SD card (QEMU's ``throttling.bps-write`` and ``throttling.iops-write``; reads are not
    throttled)."""
    fmt = "qcow2" if disk.suffix == ".qcow2" else "raw"
    drive = f"if=virtio,format={fmt},file={disk},werror=report,rerror=report"
    if throttle_write is not None:
        bps, iops = throttle_write
        if bps <= 0 or iops <= 0:
            raise ValueError(f"write throttling needs positive limits, got {bps} bytes/s and {iops} writes/s")
        drive += f",throttling.bps-write={int(bps)},throttling.iops-write={int(iops)}"
    return drive


def virt_argv(disk: Path, *, smp: int = 2, ssh_port: int | None = None, network: bool = True,
              watchdog: bool = True, extra: Sequence[str] = (),
              throttle_write: tuple[int, int] | None = None) -> list[str]:
    """The QEMU line of a ``qemu-virt`` device booting ``disk``: the device contract's machine, U-Boot, drive and
    watchdog, and a user-mode NIC (``ssh_port`` on the host's loopback forwarded to the guest's port 22).

    The NIC has no option ROM (``romfile=``): U-Boot never boots from the network, and the run does not depend
    on ``ipxe-qemu``'s ``efi-virtio.rom``. ``network`` and ``watchdog`` leave those devices out (a test of
    U-Boot alone); ``extra`` is appended (a second drive: ``["-drive", virtio_drive(path)]``, a kernel).
    ``throttle_write``: the disk writes like an SD card (:func:`virtio_drive`)."""
    argv = ["qemu-system-aarch64", "-M", "virt", "-cpu", "cortex-a72", "-smp", str(smp), "-m", "1024",
            "-nographic", "-bios", str(UBOOT), "-drive", virtio_drive(disk, throttle_write=throttle_write)]
    if watchdog:
        argv += ["-device", "i6300esb", "-watchdog-action", "reset"]
    if network:
        argv += ["-netdev", "user,id=n0" + (f",hostfwd=tcp:127.0.0.1:{ssh_port}-:22" if ssh_port else ""),
                 "-device", "virtio-net-pci,netdev=n0,romfile="]
    return [*argv, *extra]


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
    """QEMU stopped while something was awaited, or a command in the guest failed (the message has the
    console's tail)."""


class Vm:
    """QEMU started from ``argv`` with its serial console appended to ``console_log``.

    ``ssh_key``/``ssh_port``: how :meth:`ssh` reaches the guest (the port the line forwards to its port 22).
    ``server_log``: the log of the server the guest talks to, whose tail a failed wait reports."""

    def __init__(self, argv: Sequence[str], console_log: Path, *, ssh_key: Path | None = None,
                 ssh_port: int | None = None, server_log: Path | None = None) -> None:
        self.cmd = list(argv)
        self.console_log = console_log
        self.workdir = console_log.parent
        self.ssh_key, self.ssh_port = ssh_key, ssh_port
        self.server_log = server_log
        self.proc: subprocess.Popen[bytes] | None = None
        self._out: IO[bytes] | None = None

    @classmethod
    def device(cls, disk: Path, workdir: Path, *, name: str = "vm", writable: bool = False, smp: int = 2,
               grow_bytes: int = 0, ssh_key: Path | None = None, ssh_port: int | None = None,
               network: bool = True, server_log: Path | None = None) -> Vm:
        """A ``qemu-virt`` device booting ``disk`` (:func:`virt_argv`): through a qcow2 overlay in ``workdir``
        (``grow_bytes``: a card that much bigger than the image) unless ``writable``. Console in
        ``workdir/<name>-console.log``.

        Raises :class:`ToolError` when QEMU, qemu-img or U-Boot is not installed."""
        require_tools(TOOLS, "booting images in QEMU")
        require_files([UBOOT], "booting images in QEMU")
        workdir.mkdir(parents=True, exist_ok=True)
        if not writable:
            overlay = workdir / f"{name}.qcow2"
            overlay.unlink(missing_ok=True)
            size = [str(disk.stat().st_size + grow_bytes)] if grow_bytes else []
            run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", disk, "-F", "raw", overlay, *size],
                stage="disk overlay")
            disk = overlay
        return cls(virt_argv(disk, smp=smp, ssh_port=ssh_port, network=network), workdir / f"{name}-console.log", ssh_key=ssh_key,
                   ssh_port=ssh_port, server_log=server_log)

    # -- life cycle
    def start(self) -> Vm:
        self.console_log.parent.mkdir(parents=True, exist_ok=True)
        self._out = open(self.console_log, "ab")  # noqa: SIM115 - closed in kill()
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

    @overload
    def wait_for(self, what: str, timeout: float, *, since: int = 0, poll: float = 1.0) -> str: ...

    @overload
    def wait_for(self, what: Callable[[], T], timeout: float, *, since: int = 0, poll: float = 1.0) -> T: ...

    def wait_for(self, what: str | Callable[[], T], timeout: float, *, since: int = 0,
                 poll: float = 1.0) -> str | T:
        """Wait until the console (after ``since``) shows ``what`` — then return the console from ``since`` —
        or until the callable ``what`` returns something true — then return that.

        Raises :class:`VmError` when QEMU stops first, :class:`~devkit.wait.WaitTimeout` after ``timeout``."""
        if callable(what):
            return self._wait(what, _describe(what), timeout, poll)
        return self.wait_for_all([what], timeout, since=since, poll=poll)

    def wait_for_all(self, markers: Sequence[str], timeout: float, *, since: int = 0, poll: float = 1.0) -> str:
        """Wait until every marker is on the console (after ``since``); returns the console from ``since``."""
        def seen() -> str:
            text = self.console()[since:]
            return text if all(m in text for m in markers) else ""

        described = repr(markers[0]) if len(markers) == 1 else f"all of {list(markers)!r}"
        return self._wait(seen, described, timeout, poll)

    def _wait(self, check: Callable[[], T], described: str, timeout: float, poll: float) -> T:
        def checked() -> T:
            value = check()
            if not value and not self.running:
                raise VmError(f"QEMU stopped while waiting for {described}\n{self.report()}")
            return value

        return wait_until(checked, timeout, poll, described, self.report)

    def tail(self, chars: int = 3000) -> str:
        return "console tail:\n" + self.console()[-chars:]

    def report(self) -> str:
        """What a failed wait shows: the console's tail, the work directory's free space, the server log's tail."""
        lines = [self.tail(), disk_free(self.workdir)]
        if self.server_log is not None:
            lines.append(f"server log tail ({self.server_log}):\n{log_tail(self.server_log, 40)}")
        return "\n".join(lines)


def _describe(what: Callable[[], object]) -> str:
    return str(what.__doc__ or getattr(what, "__name__", "a condition"))


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m devkit.qemu DISK [--ssh-port N]``: print the QEMU line a ``qemu-virt`` device boots ``DISK``
    with (the demo's and the tests' line), ready to paste into a shell."""
    import argparse
    import shlex

    ap = argparse.ArgumentParser(prog="python -m devkit.qemu", description=main.__doc__)
    ap.add_argument("disk", type=Path, help="a built disk image (out/<version>/qemu-virt/disk.img) or a qcow2 overlay")
    ap.add_argument("--ssh-port", type=int, default=None, help="forward this loopback port to the guest's SSH")
    args = ap.parse_args(argv)
    print(shlex.join(virt_argv(args.disk, ssh_port=args.ssh_port)))


if __name__ == "__main__":
    main()
