from __future__ import annotations

import pytest

from ota_common.errors import ToolError
from ota_common.tools import require_tools, run


def test_run_returns_output() -> None:
    assert run(["echo", "hello"], stage="test").stdout == b"hello\n"


def test_failure_names_tool_stage_code_and_stderr_tail() -> None:
    with pytest.raises(ToolError) as exc:
        run(["sh", "-c", "for i in $(seq 40); do echo line$i >&2; done; exit 3"], stage="rootfs")
    msg = str(exc.value)
    assert msg.startswith("sh failed with exit code 3 during rootfs")
    assert "line40" in msg and "line1\n" not in msg  # only the tail
    # the same facts as fields, for callers that act on them (kas' CommandExecError)
    e = exc.value
    assert e.tool == "sh" and e.argv[:2] == ("sh", "-c") and e.returncode == 3
    assert e.stderr.splitlines() == [f"line{i}" for i in range(26, 41)]
    assert msg.endswith(e.stderr)


def test_missing_tool_is_told_apart_with_install_hint() -> None:
    with pytest.raises(ToolError, match=r"mkfs\.nope is not installed \(needed for image\)") as exc:
        run(["mkfs.nope", "-q"], stage="image")
    assert exc.value.argv == ("mkfs.nope", "-q") and exc.value.tool == "mkfs.nope"
    assert exc.value.returncode is None  # it never ran: not "failed"
    with pytest.raises(ToolError, match=r"disk needs no-such-tool, bmaptool-missing"):
        require_tools(["sh", "no-such-tool", "bmaptool-missing"], "disk")


def test_timeout_is_a_tool_error() -> None:
    with pytest.raises(ToolError, match="timed out") as exc:
        run(["sh", "-c", "echo started >&2; sleep 5"], stage="t", timeout=0.5)
    assert exc.value.tool == "sh" and exc.value.returncode is None
