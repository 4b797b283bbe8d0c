"""What a fresh machine needs is installed by ``scripts/install.sh``, and the long jobs say what they do.

A machine where packages were once installed by hand hides a missing install step: CI stays green while a new
user's first command fails minutes in (``ipxe-qemu`` was that case). So the install contract is checked from
the code: every external program the code, the tests and the benchmarks start must be in the tool table of
``ota_common.tools`` with its Debian package, and every package of that table must be in ``install.sh``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from devkit import qemu
from ota_common.errors import ToolError
from ota_common.progress import Steps
from ota_common.tools import FILE_PACKAGES, REQUIRED_PACKAGES, TOOL_PACKAGES, missing_packages, package_for, run

REPO = Path(__file__).resolve().parent.parent
#: calls whose first argument names a program: run(["prog", ...]), Popen([...]), which("prog"), ...
PROGRAM_CALLS = {"run", "Popen", "check_output", "check_call", "call", "which", "require_tools", "_tool_version",
                 "_pg_tool", "find_program"}
#: argv lists assigned to these names are started too (``cmd = [...]; Popen(cmd)``)
ARGV_NAMES = {"cmd", "argv", "args", "command", "TOOLS"}
#: first words of such lists that are not programs
NOT_PROGRAMS = {
    "publish", "release", "server", "artifact",  # build.py subcommands run through a test helper
    "mkfs.nope", "no-such-tool", "bmaptool-missing",  # test_tools: the missing-program cases
    "ota_server.app:app_from_env",  # uvicorn's application factory
}


def apt_packages() -> set[str]:
    """The APT_PACKAGES array of scripts/install.sh, comments stripped."""
    text = (REPO / "scripts" / "install.sh").read_text()
    m = re.search(r"^APT_PACKAGES=\((.*?)^\)", text, re.S | re.M)
    assert m, "scripts/install.sh has no APT_PACKAGES=( ... ) array"
    words = " ".join(line.split("#", 1)[0] for line in m.group(1).splitlines()).split()
    return set(words)


def programs_in_code() -> dict[str, str]:
    """Program → one place that starts it, from the AST of every Python file of the repository."""
    found: dict[str, str] = {}

    def add(node: ast.expr, where: str) -> None:
        # an argument list that starts with an option ("--storage", ...) is the tail of a command, not a program
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and not node.value.startswith("-"):
            found.setdefault(node.value, where)

    files = [p for d in ("ota_common", "artifacts", "image", "device_hooks", "ota_server", "devkit", "cli", "tests",
                         "qemu_tests", "bench") for p in (REPO / d).rglob("*.py")] + [REPO / "build.py"]
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Call) and node.args:
                name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                first = node.args[0]
                if name not in PROGRAM_CALLS:
                    continue
                if isinstance(first, ast.List | ast.Tuple) and first.elts:
                    for elt in first.elts if name == "require_tools" else first.elts[:1]:
                        add(elt, where)
                elif name in {"which", "_tool_version", "_pg_tool", "find_program"}:
                    add(first, where)
            elif isinstance(node, ast.Assign) and isinstance(node.value, ast.List | ast.Tuple) and node.value.elts:
                names = {t.attr if isinstance(t, ast.Attribute) else getattr(t, "id", "") for t in node.targets}
                if names & ARGV_NAMES:
                    for elt in node.value.elts if "TOOLS" in names else node.value.elts[:1]:
                        add(elt, where)
    return {prog: where for prog, where in found.items() if prog not in NOT_PROGRAMS}


def test_every_program_the_code_starts_has_a_package_in_the_tool_table() -> None:
    programs = programs_in_code()
    # the scan sees what it should (a broken scan would pass vacuously)
    assert {"mmdebstrap", "qemu-system-aarch64", "mender-artifact", "ssh", "debugfs", "initdb"} <= set(programs)
    unknown = {prog: where for prog, where in programs.items() if package_for(prog) is None}
    assert not unknown, f"programs started by the code with no Debian package in ota_common.tools.TOOL_PACKAGES: {unknown}"


def test_install_sh_installs_every_package_of_the_tool_table() -> None:
    listed = apt_packages()
    needed = {pkg: what for what, pkg in [*TOOL_PACKAGES.items(), *FILE_PACKAGES.items()]}
    missing = {pkg: what for pkg, what in needed.items() if pkg not in listed and pkg not in REQUIRED_PACKAGES}
    assert not missing, f"packages of the tool table missing from APT_PACKAGES in scripts/install.sh: {missing}"
    assert "ipxe-qemu" in listed  # the QEMU NIC's ROM: not needed with romfile=, installed anyway


def test_this_machine_has_everything_install_sh_promises() -> None:
    """scripts/test.sh ran install.sh before the suite: anything still missing is a gap in install.sh."""
    assert missing_packages() == {}
    proc = subprocess.run([sys.executable, "-m", "ota_common.tools"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and "are installed" in proc.stdout, proc.stderr


def test_missing_package_report_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    import ota_common.tools as tools

    monkeypatch.setattr(tools, "FILE_PACKAGES", {"/nonexistent/efi-virtio.rom": "ipxe-qemu"})
    monkeypatch.setattr(tools, "TOOL_PACKAGES", {"qemu-nope-aarch64": "qemu-system-arm", "sh": "dash"})
    assert tools.missing_packages() == {"ipxe-qemu": ["/nonexistent/efi-virtio.rom"],
                                        "qemu-system-arm": ["qemu-nope-aarch64"]}
    assert tools.main() == 1


def test_qemu_preflight_starts_the_exact_device_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    real_run = subprocess.run

    def spy(argv: list[str], **kw: object) -> subprocess.CompletedProcess[bytes]:
        seen.append(list(argv))
        return real_run(argv, **kw)  # type: ignore[call-overload,no-any-return]

    monkeypatch.setattr(qemu.subprocess, "run", spy)
    qemu.preflight(tmp_path)
    (argv,) = seen
    device_line = qemu.virt_argv(tmp_path / "preflight.img")
    assert argv[:len(device_line)] == device_line  # every machine and device option of a real boot
    assert "virtio-net-pci,netdev=n0,romfile=" in device_line  # no option ROM: ipxe-qemu is not needed
    assert list(tmp_path.iterdir()) == []


def test_qemu_preflight_names_the_package_of_a_missing_rom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first user's failure, caught in a fraction of a second: a NIC whose ROM file is not installed."""
    real = qemu.virt_argv

    def without_rom(disk: Path, **kw: object) -> list[str]:
        argv = real(disk, **kw)  # type: ignore[arg-type]
        return [a.replace("romfile=", f"romfile={tmp_path}/absent/efi-virtio.rom") for a in argv]

    monkeypatch.setattr(qemu, "virt_argv", without_rom)
    with pytest.raises(ToolError, match=r'failed to find romfile ".*efi-virtio.rom".*apt-get install ipxe-qemu'):
        qemu.preflight(tmp_path)


def test_qemu_preflight_names_a_missing_program(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolError, match=r"qemu-system-aarch64, qemu-img.*apt-get install qemu-system-arm"):
        qemu.preflight(tmp_path)


def test_run_streams_stderr_lines_and_still_captures_them() -> None:
    lines: list[tuple[str, float]] = []
    script = "echo one >&2; echo out; sleep 0.5; echo two >&2"
    started = time.monotonic()
    proc = run(["sh", "-c", script], stage="t", on_stderr_line=lambda line: lines.append((line, time.monotonic())))
    assert [line for line, _ in lines] == ["one", "two"]
    assert lines[0][1] - started < lines[1][1] - started  # the first line arrived before the program ended
    assert proc.stdout == b"out\n" and proc.stderr == b"one\ntwo\n"
    with pytest.raises(ToolError, match="exit code 3"):
        run(["sh", "-c", "echo bad >&2; exit 3"], stage="t", on_stderr_line=lambda line: None)
    with pytest.raises(ToolError, match="timed out"):
        run(["sh", "-c", "sleep 30 & wait"], stage="t", timeout=0.3, on_stderr_line=lambda line: None)


def test_steps_say_start_notes_heartbeat_and_time() -> None:
    out: list[str] = []
    lock = threading.Lock()

    def emit(line: str) -> None:
        with lock:
            out.append(line)

    steps = Steps(emit, heartbeat=0.2)
    with steps.step("base rootfs") as note:
        note("mmdebstrap: downloading packages with apt...")
        time.sleep(0.8)
    assert out[0] == "base rootfs …"
    assert out[1].startswith("base rootfs: mmdebstrap: downloading packages with apt... (")
    assert any(line.startswith("base rootfs: still running (") and "last: mmdebstrap: downloading" in line
               for line in out[2:-1])
    assert re.fullmatch(r"base rootfs: \d+\.\d s", out[-1]) and "base rootfs" in steps.timings
    with pytest.raises(RuntimeError), steps.step("artifact"):
        raise RuntimeError("boom")
    assert out[-1].startswith("artifact: failed after") and "artifact" not in steps.timings
