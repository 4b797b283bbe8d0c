"""Rollback forensics: the failed boot's journal, read back from real journal files (written by
systemd-journal-remote from journal export format, as journald on the device would have left them on /data)."""

from __future__ import annotations

import subprocess
import uuid
from pathlib import Path

import pytest

from device_hooks.journal import failed_boot_excerpt

REMOTE = Path("/lib/systemd/systemd-journal-remote")


def write_journal(directory: Path, entries: list[tuple[str, float, str, str]]) -> None:
    """entries: (boot id, epoch seconds, identifier, message)."""
    if not REMOTE.exists():
        pytest.fail("systemd-journal-remote is not installed: run scripts/install.sh")
    directory.mkdir(parents=True, exist_ok=True)
    export = b""
    for i, (boot, ts, ident, msg) in enumerate(entries):
        export += (f"__CURSOR=s=0;i={i}\n__REALTIME_TIMESTAMP={int(ts * 1e6)}\n__MONOTONIC_TIMESTAMP={i + 1}\n"
                   f"_BOOT_ID={boot.replace('-', '')}\nSYSLOG_IDENTIFIER={ident}\nMESSAGE={msg}\n\n").encode()
    proc = subprocess.run([str(REMOTE), "-o", str(directory / "remote.journal"), "-"], input=export,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr


def test_excerpt_has_the_failed_boot_and_not_the_current_one(tmp_path: Path) -> None:
    old, failed, current = (str(uuid.uuid4()) for _ in range(3))
    armed = 1_800_000_000.0
    write_journal(tmp_path / "journal", [
        (old, armed - 100, "vv-video-ai", "before the update"),
        (failed, armed + 50, "kernel", "booting slot B"),
        (failed, armed + 60, "vv-video-ai", "Traceback: cannot open /dev/video0"),
        (current, armed + 300, "ota-agent", "back on slot A"),
    ])
    text = failed_boot_excerpt(tmp_path / "journal", armed, current)
    assert "cannot open /dev/video0" in text and "booting slot B" in text
    assert "before the update" not in text, "entries from before the arming are not this failure"
    assert "back on slot A" not in text, "the current boot is not the failed one"
    assert text.index("booting slot B") < text.index("cannot open /dev/video0")


def test_excerpt_is_bounded_and_missing_journal_is_empty(tmp_path: Path) -> None:
    failed, current = str(uuid.uuid4()), str(uuid.uuid4())
    write_journal(tmp_path / "journal", [(failed, 1000.0 + i, "app", f"line {i}") for i in range(50)])
    text = failed_boot_excerpt(tmp_path / "journal", 0, current, max_lines=10)
    assert text.splitlines()[-1].endswith("line 49") and len(text.splitlines()) == 10
    assert failed_boot_excerpt(tmp_path / "nothing-here", 0, current) == ""
