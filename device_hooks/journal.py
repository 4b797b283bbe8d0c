"""Forensics: the journal of a failed trial boot, read back from ``/data`` after the rollback.

The image keeps the persistent journal on the data partition (``/var/log/journal`` is bound to
``/data/log/journal``), which both slots share, so after U-Boot or the health verdict switched back, the
entries of the boot(s) that failed are still there. Every boot since the slot was armed, other than the
current one, is what we report.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

MAX_LINES = 400


def failed_boot_excerpt(journal_dir: Path, since: float, current_boot: str, max_lines: int = MAX_LINES) -> str:
    """The last ``max_lines`` journal lines written since ``since`` (epoch seconds) by other boots."""
    if not journal_dir.is_dir() or shutil.which("journalctl") is None:
        return ""
    current = current_boot.replace("-", "").lower()
    try:
        proc = subprocess.run(
            ["journalctl", "-D", str(journal_dir), "--since", f"@{int(since)}", "-o", "json", "--no-pager",
             "--output-fields=_BOOT_ID,MESSAGE,SYSLOG_IDENTIFIER,_COMM,__REALTIME_TIMESTAMP"],
            capture_output=True, text=True, errors="replace", timeout=60, check=False)
    except (OSError, subprocess.SubprocessError):
        return ""
    lines: list[str] = []
    for raw in proc.stdout.splitlines():
        try:
            entry = json.loads(raw)
        except ValueError:
            continue
        if str(entry.get("_BOOT_ID", "")).lower() == current:
            continue
        msg = entry.get("MESSAGE", "")
        if isinstance(msg, list):  # non-UTF-8 messages come as byte arrays
            msg = bytes(int(b) for b in msg).decode("utf-8", "replace")
        who = entry.get("SYSLOG_IDENTIFIER") or entry.get("_COMM") or "?"
        boot = str(entry.get("_BOOT_ID", ""))[:8]
        lines.append(f"[{boot}] {who}: {msg}")
    return "\n".join(lines[-max_lines:])
