"""No test depends on the caller's environment: the session scrubs every variable the product reads
(tests/conftest.py), and a variable the product starts reading must join that list (or say why it is kept)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

from .conftest import KEPT, REPO, scrubbed

PRODUCT = ["artifacts", "ota_common", "image", "device_hooks", "ota_server", "cli", "build.py", "layers"]
# os.environ.get("X") / os.environ["X"] / "X" in os.environ / getenv("X") / envvar="X" / NAME_ENV = "X"
READS = re.compile(r"""environ(?:\.get|\.pop)?\(\s*["']([A-Z][A-Z0-9_]+)["']|environ\[\s*["']([A-Z][A-Z0-9_]+)["']"""
                   r"""|["']([A-Z][A-Z0-9_]+)["']\s+(?:not\s+)?in\s+os\.environ|getenv\(\s*["']([A-Z][A-Z0-9_]+)["']"""
                   r"""|envvar=["']([A-Z][A-Z0-9_]+)["']|^[A-Z_]*ENV\s*=\s*["']([A-Z][A-Z0-9_]+)["']""", re.M)


def product_variables() -> set[str]:
    names: set[str] = set()
    for top in PRODUCT:
        root = REPO / top
        for path in [root] if root.is_file() else sorted(root.rglob("*.py")):
            for match in READS.finditer(path.read_text()):
                names.add(next(g for g in match.groups() if g))
    return names


def test_every_variable_the_product_reads_is_scrubbed_or_kept_for_a_reason() -> None:
    names = product_variables()
    # the scan finds the variables we know about (a broken pattern would find nothing and pass)
    assert {"SOURCE_DATE_EPOCH", "OTA_ADMIN_TOKEN", "OTA_DB_URL", "OTA_SECRETS_KEYS", "OTA_SERVER_SETTINGS",
            "OTA_AGENT_FAULT", "PROMETHEUS_MULTIPROC_DIR", "XDG_CACHE_HOME"} <= names, names
    unhandled = sorted(n for n in names if not scrubbed(n) and n not in KEPT)
    assert unhandled == [], f"read by the product, neither scrubbed nor kept in tests/conftest.py: {unhandled}"


def test_the_session_and_its_subprocesses_run_without_them() -> None:
    leaked = sorted(n for n in os.environ if scrubbed(n))
    assert leaked == []
    child = subprocess.run([sys.executable, "-c", "import json, os; print(json.dumps(sorted(os.environ)))"],
                           capture_output=True, text=True, check=True)
    assert [n for n in json.loads(child.stdout) if scrubbed(n)] == []


def test_a_variable_set_by_one_test_does_not_reach_the_next_1() -> None:
    os.environ["SOURCE_DATE_EPOCH"] = "1"  # as build_release does in process, without monkeypatch


def test_a_variable_set_by_one_test_does_not_reach_the_next_2() -> None:
    assert "SOURCE_DATE_EPOCH" not in os.environ
