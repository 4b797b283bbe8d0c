"""Rollout gates in process (ota_server/gates.py): when a health-gated phase opens (share of successes, soak),
when phases start once a gate opened, the failure limit's test, the phase a joining device goes to, and the
deployment request's validation of gates, limits and dynamic targets. The clock is an argument: no sleeping."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ota_server.deployments import plan_phases
from ota_server.gates import GATED, current_phase, gate_open, gate_opens_at, over_limit, phase_starts
from ota_server.releases import NewDeployment

T0 = 1_700_000_000.0


# (case, min_success_pct, soak_s, success times (offsets from T0), devices counted, opening offset or None)
GATES: list[tuple[str, float, float, list[float], int, float | None]] = [
    ("no success yet", 50, 0, [], 4, None),
    ("below the share", 75, 0, [10, 20], 4, None),
    ("the share reached: the success that reached it plus the soak", 50, 60, [10, 20], 4, 80),
    ("later successes do not move the opening", 50, 60, [10, 20, 30, 40], 4, 80),
    ("order of the reports does not matter", 50, 60, [40, 20, 10, 30], 4, 80),
    ("a share that is not a whole device rounds up", 50, 0, [5, 6], 3, 6),
    ("100 % needs every device", 100, 5, [1, 2, 3], 4, None),
    ("100 % of 4 with 4 successes", 100, 5, [1, 2, 3, 9], 4, 14),
    ("a float share that is exactly whole (30 % of 10)", 30, 0, [1, 2, 3], 10, 3),
    ("no device counted: no evidence, the gate stays shut", 10, 0, [], 0, None),
    ("1 % of one device needs that device", 1, 0, [7], 1, 7),
]


@pytest.mark.parametrize(("pct", "soak", "times", "counted", "expected"), [g[1:] for g in GATES],
                         ids=[g[0] for g in GATES])
def test_gate_opens_at(pct: float, soak: float, times: list[float], counted: int, expected: float | None) -> None:
    at = gate_opens_at(pct, soak, [T0 + x for x in times], counted)
    assert at == (None if expected is None else T0 + expected)


def test_gate_open_with_a_fake_clock() -> None:
    """The phase does not start while the previous phases are below their share, nor within the soak; it
    starts at the end of the soak."""
    successes: list[float] = []
    clock = T0
    assert not gate_open(50, 30, successes, 4, clock)
    successes.append(T0 + 1)
    clock = T0 + 1000  # long after: one of four is still below 50 %
    assert not gate_open(50, 30, successes, 4, clock)
    successes.append(T0 + 1001)  # the share is reached now
    assert not gate_open(50, 30, successes, 4, T0 + 1001)
    assert not gate_open(50, 30, successes, 4, T0 + 1030.9)  # within the soak
    assert gate_open(50, 30, successes, 4, T0 + 1031)
    # a device joins the previous phases: the share is below again
    assert not gate_open(50, 30, successes, 5, T0 + 5000)


def test_phase_starts() -> None:
    spec: list[dict[str, Any]] = [{"wait_s": 10}, {"gate": {"min_success_pct": 50, "soak_s": 0}, "wait_s": 100},
                                  {"wait_s": 60}, {"gate": {"min_success_pct": 90, "soak_s": 0}}, {"wait_s": 5}]
    # nothing opened: the first phase has its timer, everything from the first gate on waits
    assert phase_starts(spec, T0, {}) == [T0 + 10, None, None, None, None]
    # the gate opens before its timer: the timer wins; the next phase counts from the actual start
    assert phase_starts(spec, T0, {1: T0 + 50}) == [T0 + 10, T0 + 110, T0 + 170, None, None]
    # the gate opens after its timer
    assert phase_starts(spec, T0, {1: T0 + 500}) == [T0 + 10, T0 + 500, T0 + 560, None, None]
    assert phase_starts(spec, T0, {1: T0 + 500, 3: T0 + 900}) == [T0 + 10, T0 + 500, T0 + 560, T0 + 900, T0 + 905]
    # an absolute start before the gate's opening: never before the phase before it
    spec2: list[dict[str, Any]] = [{}, {"gate": {"min_success_pct": 50, "soak_s": 0}}, {"start_at": T0 + 20}]
    assert phase_starts(spec2, T0, {1: T0 + 300}) == [T0, T0 + 300, T0 + 300]


def test_gated_plan_keeps_the_timers_and_waits() -> None:
    gate = {"min_success_pct": 80, "soak_s": 600}
    planned, assignment = plan_phases([f"d{i}" for i in range(10)],
                                      [{"batch_size": 20, "wait_s": 5}, {"batch_size": 30, "gate": gate}, {}], T0)
    assert [(p["device_count"], p["start_ts"]) for p in planned] == [(2, T0 + 5), (3, None), (5, None)]
    assert planned[1]["gate"] == gate and "gate" not in planned[0] and "gate" not in planned[2]
    assert [nb for _, _, nb in assignment] == [T0 + 5] * 2 + [GATED] * 8
    # without a gate the plan is the one of before: no extra keys
    planned, _ = plan_phases(["a", "b"], [{"batch_size": 50}, {"wait_s": 5}], T0)
    assert planned == [{"id": 1, "batch_size": 50, "start_ts": T0, "device_count": 1},
                       {"id": 2, "batch_size": 50, "start_ts": T0 + 5, "device_count": 1}]


@pytest.mark.parametrize(("failed", "handed_out", "limit", "over"), [
    (0, 0, 0, False), (1, 0, 0, False), (0, 10, 0, False), (1, 10, 0, True), (1, 10, 10, False),
    (2, 10, 10, True), (3, 10, 30, False), (4, 10, 30, True), (10, 10, 100, False),
])
def test_over_limit(failed: int, handed_out: int, limit: float, over: bool) -> None:
    assert over_limit(failed, handed_out, limit) is over


def test_current_phase_is_the_latest_started() -> None:
    phases = [{"start_ts": T0}, {"start_ts": T0 + 100}, {"start_ts": None}, {"start_ts": None}]
    assert current_phase(phases, T0 - 1) == 0  # nothing started: the first phase (its devices wait for it)
    assert current_phase(phases, T0 + 50) == 0
    assert current_phase(phases, T0 + 100) == 1
    assert current_phase(phases, T0 + 10**6) == 1  # a phase waiting for its gate is not started


def _body(**extra: Any) -> dict[str, Any]:
    return {"name": "n", "artifact_name": "a", "group": "g", **extra}


@pytest.mark.parametrize(("body", "message"), [
    (_body(dynamic=True, group=None, devices=["x"]), "not a device list"),
    (_body(phases=[{"batch_size": 50, "gate": {"min_success_pct": 50}}, {}]), "first phase cannot have a gate"),
    (_body(phases=[{"batch_size": 50}, {"gate": {"min_success_pct": 0}}]), "min_success_pct"),
    (_body(phases=[{"batch_size": 50}, {"gate": {"min_success_pct": 50, "soak_s": -1}}]), "soak_s"),
    (_body(phases=[{"batch_size": 50}, {"gate": {"soak_s": 5}}]), "min_success_pct"),
    (_body(phases=[{"batch_size": 50}, {"gate": {"min_success_pct": 50, "soak": 5}}]), "soak"),
    (_body(failure_limit={"max_failed_pct": 10, "on_failure": "explode"}), "on_failure"),
    (_body(failure_limit={"max_failed_pct": 101}), "max_failed_pct"),
])
def test_validation(body: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        NewDeployment.model_validate(body)


def test_valid_requests() -> None:
    d = NewDeployment.model_validate(_body(dynamic=True, failure_limit={"max_failed_pct": 5},
                                           phases=[{"batch_size": 10}, {"gate": {"min_success_pct": 90}}]))
    assert d.dynamic and d.failure_limit is not None and d.failure_limit.on_failure == "pause"
    assert d.phases is not None and d.phases[1].gate is not None and d.phases[1].gate.soak_s == 0
    assert NewDeployment.model_validate(_body(all_devices=True, group=None, dynamic=True)).dynamic
