"""Phased rollouts in process: ``plan_phases`` (ota_server/deployments.py) splits the target devices into
phases with start times, and the deployment request's validation (``NewDeployment``) refuses the phase lists
it cannot plan. Tables of fleets, phases and the expected batches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from ota_server.deployments import plan_phases
from ota_server.releases import NewDeployment

T0 = 1_700_000_000.0  # the deployment's creation time


def ids(n: int) -> list[str]:
    return [f"d{i:03d}" for i in range(n)]


# (case, number of devices, phases, [(batch_size, start offset from T0, device_count) per phase])
PLANS: list[tuple[str, int, list[dict[str, Any]], list[tuple[int, float, int]]]] = [
    ("no phases: one phase of everything, now", 7, [], [(100, 0, 7)]),
    ("one phase", 7, [{"batch_size": 100}], [(100, 0, 7)]),
    ("10% then the rest", 20, [{"batch_size": 10}, {}], [(10, 0, 2), (90, 0, 18)]),
    ("the floor of the share", 19, [{"batch_size": 10}, {}], [(10, 0, 1), (90, 0, 18)]),
    ("at least one device while devices remain", 5, [{"batch_size": 1}, {}], [(1, 0, 1), (99, 0, 4)]),
    ("one device, two phases: the second is empty", 1, [{"batch_size": 50}, {}], [(50, 0, 1), (50, 0, 0)]),
    ("more phases than devices", 2, [{"batch_size": 10}, {"batch_size": 10}, {"batch_size": 10}, {}],
     [(10, 0, 1), (10, 0, 1), (10, 0, 0), (70, 0, 0)]),
    ("the last phase takes the rest of the percentages", 10, [{"batch_size": 30}, {"batch_size": 30}, {}],
     [(30, 0, 3), (30, 0, 3), (40, 0, 4)]),
    ("the last phase's own batch_size is ignored", 10, [{"batch_size": 30}, {"batch_size": 5}],
     [(30, 0, 3), (70, 0, 7)]),
    ("waits add up from the previous phase's start", 10,
     [{"batch_size": 20, "wait_s": 60}, {"batch_size": 30, "wait_s": 3600}, {"wait_s": 0}],
     [(20, 60, 2), (30, 3660, 3), (50, 3660, 5)]),
    ("a start time, then a wait after it", 10, [{"batch_size": 50, "start_ts": T0 + 900}, {"wait_s": 100}],
     [(50, 900, 5), (50, 1000, 5)]),
    ("a start time overrides the running clock", 4, [{"batch_size": 50, "wait_s": 500}, {"start_ts": T0 + 10}],
     [(50, 500, 2), (50, 10, 2)]),  # out of order: create_deployment refuses it ("phases must start in order")
    ("wait_s None counts as no wait", 4, [{"batch_size": 50, "wait_s": None, "start_ts": None}, {}],
     [(50, 0, 2), (50, 0, 2)]),
]


@pytest.mark.parametrize(("n", "phases", "expected"), [p[1:] for p in PLANS], ids=[p[0] for p in PLANS])
def test_plan(n: int, phases: list[dict[str, Any]], expected: list[tuple[int, float, int]]) -> None:
    devices = ids(n)
    planned, assignment = plan_phases(devices, phases, T0)
    assert [(p["batch_size"], p["start_ts"] - T0, p["device_count"]) for p in planned] == expected
    assert [p["id"] for p in planned] == list(range(1, len(expected) + 1))
    # every device exactly once, in the given order, in its phase, not before its phase's start
    assert [d for d, _, _ in assignment] == devices
    phase_of = [i for i, (_, _, count) in enumerate(expected) for _ in range(count)]
    assert [(ph, nb) for _, ph, nb in assignment] == [(ph, planned[ph]["start_ts"]) for ph in phase_of]


def test_the_batch_sizes_of_the_plan_add_up_to_100() -> None:
    planned, _ = plan_phases(ids(3), [{"batch_size": 15}, {"batch_size": 25}, {"batch_size": 35}, {}], T0)
    assert sum(p["batch_size"] for p in planned) == 100


BASE: dict[str, Any] = {"name": "rollout", "artifact_name": "vv-2.0.0", "all_devices": True}

# (case, phases as the management API receives them, a piece of the refusal)
REFUSED: list[tuple[str, list[dict[str, Any]], str]] = [
    ("an empty phase list", [], "at least 1 item"),
    ("a phase before the last without batch_size", [{}, {}], "phase 1 needs batch_size"),
    ("batch sizes before the last reaching 100", [{"batch_size": 60}, {"batch_size": 40}, {}],
     "must add up to less than 100"),
    ("a last phase that does not take the rest", [{"batch_size": 30}, {"batch_size": 50}],
     "the last phase takes the remaining 70%"),
    ("a batch size of 0", [{"batch_size": 0}, {}], "greater than or equal to 1"),
    ("a batch size over 100", [{"batch_size": 101}], "less than or equal to 100"),
    ("both a start time and a wait", [{"batch_size": 50, "wait_s": 1, "start_ts": "2030-01-01T00:00:00Z"}, {}],
     "give start_ts or wait_s, not both"),
    ("a negative wait", [{"batch_size": 50, "wait_s": -1}, {}], "greater than or equal to 0"),
    ("a wait over a year", [{"batch_size": 50, "wait_s": 367 * 86400}, {}], "less than or equal to"),
    ("a start time without a time zone", [{"start_ts": "2030-01-01T00:00:00"}], "timezone"),
    ("an unknown key", [{"batch_size": 50, "delay": 5}, {}], "Extra inputs are not permitted"),
    ("more than 100 phases", [{"batch_size": 1}] * 100 + [{}], "at most 100 items"),
]


@pytest.mark.parametrize(("phases", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED])
def test_refused_phases(phases: list[dict[str, Any]], message: str) -> None:
    with pytest.raises(ValidationError) as e:
        NewDeployment.model_validate({**BASE, "phases": phases})
    assert message in str(e.value)


ACCEPTED: list[tuple[str, list[dict[str, Any]]]] = [
    ("one phase without batch_size", [{}]),
    ("one phase of 100%", [{"batch_size": 100}]),
    ("the last phase naming exactly the rest", [{"batch_size": 30}, {"batch_size": 70}]),
    ("99% then 1%", [{"batch_size": 99}, {}]),
    ("a start time with a time zone", [{"batch_size": 50, "start_ts": "2030-01-01T00:00:00+02:00"}, {}]),
]


@pytest.mark.parametrize("phases", [a[1] for a in ACCEPTED], ids=[a[0] for a in ACCEPTED])
def test_accepted_phases_plan_every_device(phases: list[dict[str, Any]]) -> None:
    body = NewDeployment.model_validate({**BASE, "phases": phases})
    assert body.phases is not None
    as_planned = [{"batch_size": p.batch_size, "wait_s": p.wait_s,
                   "start_ts": p.start_ts.timestamp() if p.start_ts else None} for p in body.phases]
    planned, assignment = plan_phases(ids(50), as_planned, T0)
    assert sum(p["batch_size"] for p in planned) == 100 and len(assignment) == 50
    assert sum(p["device_count"] for p in planned) == 50
    if phases[0].get("start_ts"):
        assert planned[0]["start_ts"] == datetime(2029, 12, 31, 22, tzinfo=UTC).timestamp()
