"""Every benchmark in ``bench/`` runs in its quick mode, so a benchmark broken by a refactoring fails CI instead of
rotting unseen (``bench/delta.py`` once failed on import for weeks). Behaviour only: the exit code and the table it
prints; never a time or a ratio (these machines are noisy; the numbers come from full runs, side by side).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BENCHES = sorted(p.name for p in (REPO / "bench").glob("*.py") if not p.name.startswith("_"))

#: what each quick run must print: the line of its result table that says the comparison ran
EXPECTED = {
    "artifacts.py": "write speed  mender/ours",
    "blockwrite.py": "bytes written before/after",
    "build.py": "warm build of qemu-virt",
    "delta.py": "Delta updates: ",
    "rollback.py": "rollback speed-up",
    "server.py": "polls/s / floor",
}


def test_every_benchmark_is_covered() -> None:
    """A new bench/ script must say here what its quick run prints."""
    assert sorted(EXPECTED) == BENCHES


@pytest.mark.slow
@pytest.mark.parametrize("bench", BENCHES)
def test_quick_mode(bench: str, tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(REPO / "bench" / bench), "--quick"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=1800)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert EXPECTED[bench] in out, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
