"""The boot-state environment against the stock libubootenv tools, and power cuts at every byte."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from device_hooks.bootenv import ENV_SIZE, BootEnv, Copy, decode, encode, newer
from ota_common.errors import BootEnvError

INITIAL = {"mender_boot_part": "2", "upgrade_available": "0", "bootcount": "0", "bootlimit": "1"}


@pytest.fixture
def env(tmp_path: Path) -> tuple[BootEnv, Path]:
    if shutil.which("fw_printenv") is None:
        pytest.fail("fw_printenv is not installed: run scripts/install.sh (libubootenv-tool)")
    a, b = tmp_path / "uboot.env.a", tmp_path / "uboot.env.b"
    config = tmp_path / "fw_env.config"
    config.write_text(f"{a} 0x0 0x{ENV_SIZE:x}\n{b} 0x0 0x{ENV_SIZE:x}\n")
    e = BootEnv.from_fw_env_config(config)
    e.create(INITIAL)
    return e, config


def printenv(config: Path) -> dict[str, str]:
    out = subprocess.run(["fw_printenv", "-c", str(config)], capture_output=True, text=True, check=True).stdout
    return dict(line.split("=", 1) for line in out.splitlines())


def setenv(config: Path, *pairs: str) -> None:
    script = config.with_name("script")
    script.write_text("".join(f"{p}\n" for p in pairs))
    subprocess.run(["fw_setenv", "-c", str(config), "-s", str(script)], check=True, capture_output=True)


def test_same_bytes_as_mkenvimage(tmp_path: Path) -> None:
    src = tmp_path / "init.txt"
    src.write_text("".join(f"{k}={v}\n" for k, v in sorted(INITIAL.items())))
    out = tmp_path / "env"
    subprocess.run(["mkenvimage", "-r", "-s", hex(ENV_SIZE), "-o", str(out), str(src)], check=True)
    assert out.read_bytes() == encode(INITIAL, 1)


def test_both_directions_with_fw_printenv_and_fw_setenv(env: tuple[BootEnv, Path]) -> None:
    e, config = env
    assert printenv(config) == INITIAL
    e.update({"mender_boot_part": "3", "upgrade_available": "1"})
    assert printenv(config) == {**INITIAL, "mender_boot_part": "3", "upgrade_available": "1"}
    setenv(config, "bootcount=1")
    assert e.read()["bootcount"] == "1"
    for n in range(2, 300):  # through the flags wrap-around, alternating writers
        if n % 2:
            setenv(config, f"bootcount={n}")
        else:
            e.update({"bootcount": str(n)})
        assert printenv(config)["bootcount"] == str(n) == e.read()["bootcount"]
    e.update({"bootlimit": None})
    assert "bootlimit" not in printenv(config)


@pytest.mark.parametrize(("fa", "fb"), [(1, 1), (1, 2), (2, 1), (255, 0), (0, 255), (254, 255), (255, 1), (1, 255), (0, 0)])
def test_copy_selection_matches_libubootenv(env: tuple[BootEnv, Path], fa: int, fb: int) -> None:
    e, config = env
    e.copies[0].write_bytes(encode({"who": "a"}, fa))
    e.copies[1].write_bytes(encode({"who": "b"}, fb))
    assert printenv(config) == e.read()


def test_power_cut_at_every_byte_of_a_write_leaves_a_valid_state(env: tuple[BootEnv, Path]) -> None:
    e, config = env
    e.update({"bootcount": "1"})  # the copies now differ: A holds the initial state, B the newer one
    before = e.read()
    a, b = (p.read_bytes() for p in e.copies)
    target = 1 - newer(decode(a), decode(b))
    old = (a, b)[target]
    new = encode({**before, "mender_boot_part": "3", "upgrade_available": "1"}, decode((a, b)[1 - target]).flags + 1)
    seen_new = 0
    for k in range(ENV_SIZE + 1):
        for torn in (new[:k] + old[k:], new[:k]):  # a torn in-place write, and a truncated file
            copies = [a, b]
            copies[target] = torn
            state = dict((decode(copies[0]), decode(copies[1]))[newer(decode(copies[0]), decode(copies[1]))].variables)
            assert state in (before, decode(new).variables), k
            seen_new += state != before
    assert seen_new >= 1  # the complete write is read as the new state
    # and libubootenv reads the same state as we do from torn copies
    for k in (0, 1, 4, 5, 100, ENV_SIZE // 2, ENV_SIZE - 1, ENV_SIZE):
        e.copies[target].write_bytes(new[:k] + old[k:])
        assert printenv(config) == e.read()
        assert e.read() in (before, decode(new).variables)


def test_both_copies_invalid_is_an_error_and_bad_names_are_refused(env: tuple[BootEnv, Path]) -> None:
    e, _ = env
    for p in e.copies:
        p.write_bytes(b"\x00" * ENV_SIZE)
    with pytest.raises(BootEnvError, match="both copies"):
        e.read()
    with pytest.raises(BootEnvError):
        encode({"a=b": "1"}, 1)
    with pytest.raises(BootEnvError, match="holds"):
        encode({"big": "x" * ENV_SIZE}, 1)
    assert newer(Copy(False, 0, {}), Copy(True, 7, {})) == 1
