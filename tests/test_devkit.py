"""The harness (devkit) tells what went wrong: a CI run once stalled 25 minutes on a full disk with QEMU paused
and nothing said, and a server that did not start made ``build.py demo`` print "internal error"."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from cli.demo import Demo
from devkit.qemu import Vm, VmError, virt_argv, virtio_drive
from devkit.server import OtaServer, ServerStartError
from devkit.wait import WaitTimeout, wait_until
from ota_common.errors import ToolError

#: a stand-in for QEMU: prints a boot line, then runs until killed
BOOTING = [sys.executable, "-c", "import time; print('U-Boot 2023.01', flush=True); time.sleep(120)"]


def test_a_full_host_disk_is_an_io_error_in_the_guest_not_a_paused_vm() -> None:
    argv = virt_argv(Path("/images/disk.qcow2"), smp=1, ssh_port=2222, extra=["-drive", virtio_drive(Path("b.img"))])
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == ["if=virtio,format=qcow2,file=/images/disk.qcow2,werror=report,rerror=report",
                      "if=virtio,format=raw,file=b.img,werror=report,rerror=report"]
    assert argv[argv.index("-smp") + 1] == "1"
    assert "user,id=n0,hostfwd=tcp:127.0.0.1:2222-:22" in argv and "i6300esb" in argv
    bare = virt_argv(Path("disk.img"), network=False, watchdog=False)
    assert "-netdev" not in bare and "i6300esb" not in bare and "-bios" in bare


def test_a_throttled_disk_writes_like_an_sd_card_and_reads_unthrottled() -> None:
    argv = virt_argv(Path("disk.img"), throttle_write=(20 * 1024 * 1024, 500))
    drive = argv[argv.index("-drive") + 1]
    assert drive.endswith(",throttling.bps-write=20971520,throttling.iops-write=500"), drive
    assert "read" not in drive.split("werror=report,rerror=report")[1]
    assert "throttling" not in virtio_drive(Path("disk.img"))
    with pytest.raises(ValueError, match="positive"):
        virtio_drive(Path("disk.img"), throttle_write=(0, 500))


def test_wait_until_returns_what_it_waited_for_or_says_what_it_missed() -> None:
    calls: list[int] = []

    def third_time() -> str:
        calls.append(1)
        return "ready" if len(calls) == 3 else ""

    assert wait_until(third_time, 10, 0.01, "the third call") == "ready"
    with pytest.raises(WaitTimeout, match=r"timed out after 0 s waiting for nothing\nwhat was seen") as e:
        wait_until(lambda: None, 0.05, 0.01, "nothing", lambda: "what was seen")
    assert isinstance(e.value, ToolError)


def test_a_vm_wait_that_times_out_reports_console_disk_space_and_server_log(tmp_path: Path) -> None:
    server_log = tmp_path / "server.log"
    server_log.write_text("earlier line\nPOST /api/devices/v1/authentication/auth_requests 401\n")
    with Vm(BOOTING, tmp_path / "console.log", server_log=server_log) as vm:
        assert "U-Boot 2023.01" in vm.wait_for("U-Boot", 30, poll=0.05)
        with pytest.raises(WaitTimeout) as e:
            vm.wait_for("login:", 0.2, poll=0.05)
    said = str(e.value)
    assert said.startswith("timed out after 0 s waiting for 'login:'")
    assert "console tail:\nU-Boot 2023.01" in said
    assert f"free space in {tmp_path}: " in said and " GB" in said
    assert "auth_requests 401" in said


def test_a_vm_that_stops_ends_the_wait_at_once(tmp_path: Path) -> None:
    with Vm([sys.executable, "-c", "print('Kernel panic')"], tmp_path / "console.log") as vm, \
            pytest.raises(VmError, match=r"QEMU stopped while waiting for all of \['a', 'b'\]") as e:
        vm.wait_for_all(["a", "b"], 60, poll=0.05)
    assert "Kernel panic" in str(e.value)


def test_the_demo_waiting_too_long_is_a_tool_error_not_the_users(tmp_path: Path) -> None:
    """The device never asked for admission: the user did nothing wrong (exit 3, not 2)."""
    with Vm(BOOTING, tmp_path / "console.log") as vm, pytest.raises(ToolError) as e:
        Demo(tmp_path, None).wait("the device to ask for admission", lambda: None, 0.2, vm)
    assert e.value.exit_code == 3 and "waiting for the device to ask for admission" in str(e.value)


def test_a_server_that_does_not_start_says_why(tmp_path: Path) -> None:
    server = OtaServer(tmp_path / "server", None, "--no-such-option")
    with pytest.raises(ServerStartError, match=r"(?s)the server exited with 2 .*No such option '--no-such-option'"):
        server.start()
    assert server.proc is not None and server.proc.poll() is not None
