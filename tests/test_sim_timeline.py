"""The simulator's timeline: the schedule, the planned events and the churn rule (no sockets)."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from sim.models import SessionConfig
from sim.scenario import Churn, Scenario, parse_scenario
from sim.timeline import ChurnRule, Departure, Kind, Planned, Schedule, Timeline, plan
from sim.vloop import run_virtual

BASE: dict[str, Any] = {
    "name": "t",
    "peers": 5,
    "join_period": 10.0,
    "warmup": 5.0,
    "duration": 60.0,
    "sample_interval": 20.0,
}


def _plan(changes: dict[str, Any], label: int = 0) -> tuple[Scenario, list[Planned]]:
    scenario = parse_scenario({**BASE, **changes})
    spec = list(scenario.runs())[label]
    return scenario, plan(scenario, spec, random.Random(1), random.Random(2))


def _kinds(events: list[Planned], kind: Kind) -> list[float]:
    return [e.at for e in events if e.kind is kind]


def test_schedule_orders_by_time_then_by_insertion() -> None:
    """Actions come out in time order; at equal times, in the order they were added."""
    schedule = Schedule()
    done: list[str] = []
    for when, tag in [(2.0, "c"), (1.0, "a"), (2.0, "d"), (1.0, "b"), (0.5, "first")]:
        schedule.at(when, lambda tag=tag: done.append(tag))  # type: ignore[misc]
    times = []
    while schedule:
        when, action = schedule.pop()
        times.append(when)
        action()
    assert done == ["first", "a", "b", "c", "d"]
    assert times == [0.5, 1.0, 1.0, 2.0, 2.0]
    assert len(schedule) == 0


@pytest.mark.parametrize(
    ("changes", "kind", "expected"),
    [
        # samples every sample_interval from the end of the warm-up (15 s) until the end (75 s)
        ({}, Kind.SAMPLE, [15.0, 35.0, 55.0]),
        # repair passes one interval after the start, up to and including the end
        ({"repair": {"enabled": True, "interval": 30.0}}, Kind.REPAIR, [45.0, 75.0]),
        ({"repair": {"enabled": False, "interval": 30.0}}, Kind.REPAIR, []),
        # partitions and crashes count from the end of the warm-up
        ({"partition": [{"start": 5.0, "heal": 25.0}]}, Kind.SPLIT, [20.0]),
        ({"partition": [{"start": 5.0, "heal": 25.0}]}, Kind.HEAL, [40.0]),
        ({"crash": [{"at": 30.0}, {"at": 1.0}]}, Kind.CRASH, [45.0, 16.0]),
        ({}, Kind.PUBLISH, []),
    ],
)
def test_plan_places_periodic_and_scenario_events(
    changes: dict[str, Any], kind: Kind, expected: list[float]
) -> None:
    """Samples, repair passes, partitions and crashes are planned at their scenario times."""
    _, events = _plan(changes)
    assert _kinds(events, kind) == pytest.approx(expected)


def test_plan_joins_first_peer_at_zero_and_the_rest_within_the_join_period() -> None:
    """One join per peer, the first at 0, all sorted and within the join period."""
    _, events = _plan({"peers": 50})
    joins = _kinds(events, Kind.JOIN)
    assert len(joins) == 50 and joins[0] == 0.0
    assert joins == sorted(joins) and max(joins) <= 10.0
    assert [e.kind for e in events[:50]] == [Kind.JOIN] * 50


def test_plan_spreads_the_workload_within_its_windows() -> None:
    """Each operation kind gets its count of sorted times inside its window."""
    workload = {
        "publishes": 7,
        "fetches": 9,
        "lookups": 4,
        "publish_window": [0.0, 0.5],
        "fetch_window": [0.5, 1.0],
    }
    _, events = _plan({"workload": workload})
    publishes, fetches = _kinds(events, Kind.PUBLISH), _kinds(events, Kind.FETCH)
    assert len(publishes) == 7 and publishes == sorted(publishes)
    assert all(15.0 <= t <= 45.0 for t in publishes)
    assert len(fetches) == 9 and all(45.0 <= t <= 75.0 for t in fetches)
    assert len(_kinds(events, Kind.LOOKUP)) == 4


def test_plan_is_the_same_for_the_same_streams_and_arms() -> None:
    """Repair off and on see the same joins and workload (one seed, two arms)."""
    changes = {"repair": {"enabled": [False, True]}, "workload": {"publishes": 5, "fetches": 5}}
    _, off = _plan(changes, 0)
    _, on = _plan(changes, 1)
    assert [e for e in off if e.kind is not Kind.REPAIR] == [
        e for e in on if e.kind is not Kind.REPAIR
    ]
    assert _kinds(off, Kind.REPAIR) == [] and _kinds(on, Kind.REPAIR)


class _Fixed(random.Random):
    """A random stream whose draws are given: random() and expovariate() return them."""

    def __init__(self, uniform: float, expo: float) -> None:
        super().__init__(0)
        self.uniform_draw = uniform
        self.expo_draw = expo

    def random(self) -> float:
        return self.uniform_draw

    def expovariate(self, lambd: float) -> float:
        return self.expo_draw


@pytest.mark.parametrize(
    ("crash_fraction", "uniform", "delay", "now", "expected"),
    [
        (0.5, 0.2, 10.0, 50.0, Departure(crash=True, rejoin_at=60.0)),
        (0.5, 0.7, 10.0, 50.0, Departure(crash=False, rejoin_at=60.0)),
        (0.0, 0.0, 10.0, 50.0, Departure(crash=False, rejoin_at=60.0)),
        (1.0, 0.99, 10.0, 50.0, Departure(crash=True, rejoin_at=60.0)),
        # the replacement would join at or after the end (100 s): none does
        (0.5, 0.7, 50.0, 50.0, Departure(crash=False, rejoin_at=None)),
        (0.5, 0.7, 60.0, 50.0, Departure(crash=False, rejoin_at=None)),
    ],
)
def test_churn_departure_decides_crash_and_rejoin(
    crash_fraction: float, uniform: float, delay: float, now: float, expected: Departure
) -> None:
    """A departure crashes with the crash fraction; a replacement joins only before the end."""
    rule = ChurnRule(
        Churn(enabled=True, crash_fraction=crash_fraction), 20.0, 100.0, _Fixed(uniform, delay)
    )
    assert rule.depart(now) == expected


@pytest.mark.parametrize(
    ("enabled", "initial", "now", "expected"),
    [
        (False, True, 0.0, None),
        # an initial peer's session counts from the start of churn (20 s), others from now
        (True, True, 3.0, 50.0),
        (True, False, 40.0, 70.0),
        (True, False, 69.5, 99.5),
        # a session that would end at or after the end of the run (100 s) never ends
        (True, False, 70.0, None),
        (True, False, 75.0, None),
    ],
)
def test_churn_session_end(
    enabled: bool, initial: bool, now: float, expected: float | None
) -> None:
    """A joining peer leaves after one session, counted from churn's start for initial peers."""
    sessions = SessionConfig(distribution="exponential", median=30.0)
    # every exponential draw is 30 s
    rule = ChurnRule(Churn(enabled=enabled, sessions=sessions), 20.0, 100.0, _Fixed(0.0, 30.0))
    assert rule.leave_at(now, initial=initial) == expected


def test_timeline_runs_actions_at_their_times_and_awaits_spawned_tasks() -> None:
    """Actions run at their (virtual) times; the run ends when every spawned task is done."""
    seen: list[tuple[str, float]] = []

    async def main() -> float:
        timeline = Timeline()
        timeline.begin()

        async def slow(tag: str) -> None:
            await asyncio.sleep(100.0)
            seen.append((tag, timeline.now()))

        timeline.at(5.0, lambda: seen.append(("five", timeline.now())))
        timeline.at(1.0, lambda: timeline.spawn(slow("task")))
        timeline.at(3.0, lambda: timeline.at(4.0, lambda: seen.append(("four", timeline.now()))))
        await timeline.run()
        return timeline.now()

    end = run_virtual(main())
    assert seen == [("four", 4.0), ("five", 5.0), ("task", 101.0)]
    assert end == 101.0
