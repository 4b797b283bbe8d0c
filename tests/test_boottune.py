"""Local boot tuning (extra kernel arguments, console, device-tree fix-ups): its strict grammar, and that neither
the agent nor the server can set it. boot.scr honouring it in U-Boot: tests/test_boot_script.py."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from device_hooks import boottune
from device_hooks.bootenv import ENV_SIZE, INITIAL_STATE, BootEnv
from device_hooks.envvars import name_problem
from device_hooks.install import arm
from ota_common.errors import BootEnvError

#: what QEMU's raspi4b needs of the real rpi4 image (issue 17's five fixes)
EMULATION = {
    boottune.BOOTARGS: "clk_ignore_unused modprobe.blacklist=bcm2835_wdt",
    boottune.CONSOLE: "ttyAMA0,115200",
    boottune.FDT_DISABLE: "/soc/hvs@7e400000 /soc/pcie@7d500000 /scb/ethernet@7d580000",
    boottune.FDT_DELPROP: "/emmc2bus/mmc@7e300000:mmc-pwrseq",
}


def test_the_emulation_values_are_valid() -> None:
    for name, value in EMULATION.items():
        boottune.check(name, value)


@pytest.mark.parametrize(("name", "value", "why"), [
    (boottune.BOOTARGS, "quiet;reset", "characters not allowed: ';'"),
    (boottune.BOOTARGS, "a $(reboot)", "characters not allowed"),
    (boottune.BOOTARGS, 'init="/bin/sh"', "characters not allowed"),
    (boottune.BOOTARGS, "quiet\nreset", "characters not allowed"),
    (boottune.BOOTARGS, "quiet  loglevel=3", "single spaces"),
    (boottune.BOOTARGS, "init=/bin/sh", "'init' is the image's own kernel argument"),
    (boottune.BOOTARGS, "root=/dev/sda1", "'root' is the image's own"),
    (boottune.BOOTARGS, "panic=0", "'panic' is the image's own"),
    (boottune.BOOTARGS, "ota.trial=0", "'ota.trial' is the image's own"),
    (boottune.BOOTARGS, "console=ttyAMA0", "use ota_console"),
    (boottune.BOOTARGS, "=x", "not a kernel argument"),
    (boottune.BOOTARGS, "x" * 1025, "at most 1024"),
    (boottune.CONSOLE, "ttyAMA0 quiet", "characters not allowed"),
    (boottune.CONSOLE, "/dev/ttyS0", "characters not allowed"),
    (boottune.CONSOLE, "serial0", "not a console"),
    (boottune.FDT_DISABLE, "soc/hvs", "not a device-tree node path"),
    (boottune.FDT_DISABLE, "/soc/hvs;reset", "characters not allowed"),
    (boottune.FDT_DELPROP, "/soc/mmc@7e300000", "not /node/path:property"),
    (boottune.FDT_DELPROP, "/soc/mmc@7e300000:", "not /node/path:property"),
    (boottune.FDT_DELPROP, "/soc/mmc@7e300000:compatible", "would break the node"),
    ("bootargs", "quiet", "not a boot tuning variable"),
])
def test_strict_grammar_refuses(name: str, value: str, why: str) -> None:
    with pytest.raises(BootEnvError, match=why.replace("(", "\\(").replace("$", "\\$")):
        boottune.check(name, value)


def test_boot_scr_character_sets_cover_the_grammar_and_nothing_that_u_boot_parses() -> None:
    for name, chars in boottune.BOOT_SCR_CHARS.items():
        assert not set(chars) & set(";$\"'\\`&|<>(){}[]*?!\n\t\r\0~^"), name
        boottune.check(name, "")
    assert " " in boottune.BOOT_SCR_CHARS[boottune.BOOTARGS]
    assert " " not in boottune.BOOT_SCR_CHARS[boottune.CONSOLE]


@pytest.fixture
def env(tmp_path: Path) -> tuple[BootEnv, Path]:
    if shutil.which("fw_setenv") is None:
        pytest.fail("fw_setenv is not installed: run scripts/install.sh (libubootenv-tool)")
    config = tmp_path / "fw_env.config"
    a, b = tmp_path / "uboot.env.a", tmp_path / "uboot.env.b"
    config.write_text(f"{a} 0x0 0x{ENV_SIZE:x}\n{b} 0x0 0x{ENV_SIZE:x}\n")
    e = BootEnv.from_fw_env_config(config)
    e.create(INITIAL_STATE)
    return e, config


def test_fw_setenv_script_sets_and_the_agent_keeps_the_tuning(env: tuple[BootEnv, Path], tmp_path: Path) -> None:
    e, config = env
    script = tmp_path / "tune"
    script.write_text(boottune.fw_setenv_script(EMULATION))
    subprocess.run(["fw_setenv", "-c", str(config), "-s", str(script)], check=True)
    assert e.read() == {**INITIAL_STATE, **EMULATION}
    # the agent arms a trial and commits: the tuning stays as the holder of the device set it
    arm(e, 3)
    e.update({"upgrade_available": "0", "bootcount": "0"})
    assert e.read() == {**INITIAL_STATE, "mender_boot_part": "3", **EMULATION}
    # an empty value clears
    script.write_text(boottune.fw_setenv_script({boottune.CONSOLE: ""}))
    subprocess.run(["fw_setenv", "-c", str(config), "-s", str(script)], check=True)
    assert boottune.CONSOLE not in e.read()


def test_fw_setenv_script_refuses_an_invalid_value_before_writing() -> None:
    with pytest.raises(BootEnvError, match="'init' is the image's own"):
        boottune.fw_setenv_script({boottune.CONSOLE: "ttyAMA0", boottune.BOOTARGS: "init=/bin/sh"})


@pytest.mark.parametrize("name", boottune.NAMES)
def test_the_agent_cannot_set_the_tuning(env: tuple[BootEnv, Path], name: str) -> None:
    """The agent's only writes to the boot state are its A/B transitions: a change of a tuning variable through
    it (a bug, or a server's value smuggled into a state write) is refused and nothing is written."""
    e, _ = env
    before = [p.read_bytes() for p in e.copies]
    with pytest.raises(BootEnvError, match="local boot tuning, set only with fw_setenv"):
        e.update({"upgrade_available": "0", name: "quiet"})
    assert [p.read_bytes() for p in e.copies] == before


@pytest.mark.parametrize("name", boottune.NAMES)
def test_the_server_cannot_name_the_tuning_as_a_configuration_variable(name: str) -> None:
    assert name_problem(name) is not None
