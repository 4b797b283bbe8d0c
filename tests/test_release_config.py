"""Release configuration, boards and the boot script, without building anything."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from image.build import render_boot_script
from image.config import load_board, load_release
from image.disk import plan_layout
from image.release import DEFAULT_CONFIG
from ota_common.errors import UserError


def test_default_release_builds_both_boards() -> None:
    rel = load_release(DEFAULT_CONFIG)
    assert rel.boards == ("qemu-virt", "rpi4")
    assert rel.layers == ("base", "boot", "ota", "app")
    assert rel.mirror == ""  # the machine's apt configuration, no registry named here


def test_release_errors_name_file_and_key(tmp_path: Path) -> None:
    p = tmp_path / "release.yaml"
    p.write_text("version: 1.0\nslot_size_mib: 10\nboard: [rpi4]\n")
    with pytest.raises(UserError) as exc:
        load_release(p)
    msg = str(exc.value)
    assert f"{p}: version: Input should be a valid string" in msg
    assert f"{p}: slot_size_mib: Input should be greater than or equal to 64" in msg
    assert f"{p}: board: unknown key" in msg
    with pytest.raises(UserError, match="unknown board 'pi5' \\(known: qemu-virt, rpi4\\)"):
        load_board("pi5")


@pytest.mark.parametrize("board", ["qemu-virt", "rpi4"])
def test_boot_script_renders_and_compiles(tmp_path: Path, board: str) -> None:
    layout = plan_layout(slot_mib=1024, seed="t")
    scr = render_boot_script(tmp_path, board, load_board(board), layout)
    text = (tmp_path / "boot.cmd").read_text()
    assert 'echo "ota-boot: slot=${ota_slot} part=${ota_part} upgrade_available=${upgrade_available} bootcount=${bootcount}"' in text
    assert f"root=PARTUUID={layout.disk_id:08x}-0${{ota_part}}" in text and "panic=10" in text
    info = subprocess.run(["mkimage", "-l", str(scr)], capture_output=True, text=True, check=True).stdout
    assert "Script" in info


def test_second_build_on_one_cache_waits_for_the_first(tmp_path: Path) -> None:
    """Two builds on one cache would share its work tree (a fresh machine's setup run twice at once failed with
    mkfs.ext4 reading a tree the other build was unpacking): the second one waits and says so."""
    import threading

    from image.release import cache_lock

    said: list[str] = []
    entered = threading.Event()

    def second() -> None:
        with cache_lock(tmp_path, said.append):
            entered.set()

    with cache_lock(tmp_path):
        t = threading.Thread(target=second)
        t.start()
        assert not entered.wait(0.5)
        assert said == [f"waiting for another build that uses the build cache {tmp_path}"]
    t.join(10)
    assert entered.is_set()


WARNING = 'echo "ota-boot: WARNING: unsigned image: this device trusts no release key and refuses every update"'


@pytest.mark.parametrize("board", ["qemu-virt", "rpi4"])
def test_unsigned_image_boot_script_warns_before_the_kernel(tmp_path: Path, board: str) -> None:
    layout = plan_layout(slot_mib=1024, seed="t")
    unsigned, signed = tmp_path / "unsigned", tmp_path / "signed"
    unsigned.mkdir()
    signed.mkdir()
    scr = render_boot_script(unsigned, board, load_board(board), layout, signed=False)
    render_boot_script(signed, board, load_board(board), layout, signed=True)
    text = (unsigned / "boot.cmd").read_text()
    lines = text.splitlines()
    assert lines.count(WARNING) == 1
    # printed at every boot (outside any condition), after the slot line and before the kernel starts
    assert lines.index(WARNING) < next(i for i, line in enumerate(lines) if line.startswith("booti "))
    assert lines[lines.index(WARNING) - 1].startswith('echo "ota-boot: slot=')
    assert "WARNING" not in (signed / "boot.cmd").read_text()
    # otherwise the same script
    assert [line for line in lines if line != WARNING] == (signed / "boot.cmd").read_text().splitlines()
    info = subprocess.run(["mkimage", "-l", str(scr)], capture_output=True, text=True, check=True).stdout
    assert "Script" in info
