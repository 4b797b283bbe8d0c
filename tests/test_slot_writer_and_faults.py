"""The slot writer (zero ranges instead of zero writes) and the power-cut points the QEMU tests use."""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

from device_hooks.bootenv import INITIAL_STATE, BootEnv
from device_hooks.install import ZERO_BLOCK, SlotWriter

from .conftest import REPO


def _image(rng: random.Random) -> bytes:
    parts = []
    for _ in range(rng.randint(1, 40)):
        n = rng.choice([ZERO_BLOCK, 3 * ZERO_BLOCK, 5000, 1, 200_000])
        parts.append(bytes(n) if rng.random() < 0.6 else rng.randbytes(n))
    return b"".join(parts)


@pytest.mark.parametrize("ranges", [True, False], ids=["zero-ranges", "written-zeros"])
def test_slot_writer_reproduces_the_image_over_old_content(tmp_path: Path, ranges: bool) -> None:
    rng = random.Random(7)
    zeroed = 0
    for _ in range(25):
        data = _image(rng)
        slot = tmp_path / "slot"
        slot.write_bytes(rng.randbytes(len(data) + 70_000))  # the old slot content must not shine through
        fd = os.open(slot, os.O_WRONLY)
        try:
            writer = SlotWriter(fd)
            if not ranges:
                writer.zeroer.mode = None  # as after the kernel refused once: zeros are written
            i = 0
            while i < len(data):  # chunks of any size and alignment, as the decompressor yields them
                n = rng.randint(1, 300_000)
                writer.write(data[i : i + n])
                i += n
            assert writer.finish() == len(data)
            zeroed += writer.zeroed
        finally:
            os.close(fd)
        assert slot.read_bytes()[: len(data)] == data
    assert (zeroed > 0) == ranges  # the range path was really taken (or really not)


def _run(code: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                            stderr=subprocess.PIPE, text=True)


def test_stall_fault_announces_itself_and_fires_once(tmp_path: Path) -> None:
    once = tmp_path / "fired"
    env = {"OTA_AGENT_FAULT": "stall:after-arm", "OTA_AGENT_FAULT_ONCE": str(once)}
    code = "from device_hooks.faults import fault; fault('before-arm'); fault('after-arm'); print('past')"
    proc = _run(code, env)
    assert proc.stderr is not None
    assert proc.stderr.readline().strip() == "fault: stalled at after-arm"
    time.sleep(0.5)
    assert proc.poll() is None, "a stalled process must wait for the harness to cut the power"
    proc.kill()
    proc.wait()
    again = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env, "PYTHONPATH": str(REPO)},
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0 and again.stdout.strip() == "past", "a fault recorded as fired fires once"


def test_install_write_fault_fires_at_a_byte_count(tmp_path: Path) -> None:
    code = ("from device_hooks.faults import fault\n"
            "for n in range(0, 10_000, 1000):\n    fault('install-write', n)\nprint('past')")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO),
                                                              "OTA_AGENT_FAULT": "install-write@5000"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 99 and "fault injected at install-write" in proc.stderr and "past" not in proc.stdout


def test_torn_boot_state_write_leaves_the_previous_state(tmp_path: Path) -> None:
    copies = [tmp_path / "uboot.env.a", tmp_path / "uboot.env.b"]
    BootEnv(copies).create(INITIAL_STATE)
    BootEnv(copies).update({"bootcount": "0"})  # copies now differ in flags, as on a used device
    before = BootEnv(copies).read()
    code = (f"from pathlib import Path\nfrom device_hooks.bootenv import BootEnv\n"
            f"BootEnv([Path({str(copies[0])!r}), Path({str(copies[1])!r})]).update("
            "{'mender_boot_part': '3', 'upgrade_available': '1'}, fault_point='arm-write')")
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(REPO),
                                                              "OTA_AGENT_FAULT": "arm-write"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 99, proc.stderr
    assert BootEnv(copies).read() == before, "half a copy written must leave the older state in force"
    BootEnv(copies).update({"mender_boot_part": "3", "upgrade_available": "1"})
    assert BootEnv(copies).read()["mender_boot_part"] == "3"
