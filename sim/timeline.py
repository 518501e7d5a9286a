"""The timeline of a run: what happens when, and the sessions that drive the population.

* :func:`plan` turns a scenario into the run's initial events, in order: the initial
  joins, partitions and heals, ``[[crash]]`` events, the workload operations at random
  times within their windows, the samples, and the repair passes. Pure: the caller passes
  the seeded random streams.
* :class:`ChurnRule` decides, from the scenario's churn settings and its own random
  stream, when a joining peer will leave and, when it does, whether it crashes and when a
  replacement joins. Pure as well.
* :class:`Schedule` is a heap of timed actions, run in time order and, at equal times, in
  the order they were added; :class:`Timeline` runs one on the event loop, each long action
  as a task of one :class:`asyncio.TaskGroup`, and tells the time since the run began.

Memory mode runs on :class:`sim.vloop.VirtualEventLoop`, so the same seed gives the same
events at the same (virtual) times.
"""

from __future__ import annotations

import asyncio
import enum
import heapq
import random
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from sim.scenario import Churn, Crash, RunSpec, Scenario

Action = Callable[[], None]


class Kind(enum.Enum):
    """What a planned event does."""

    JOIN = "join"
    SPLIT = "split"
    HEAL = "heal"
    CRASH = "crash"
    PUBLISH = "publish"
    FETCH = "fetch"
    LOOKUP = "lookup"
    SAMPLE = "sample"
    REPAIR = "repair"


@dataclass(frozen=True, slots=True)
class Planned:
    """One initial event: its time, its kind, and the split's shares or the crash."""

    at: float
    kind: Kind
    shares: tuple[float, ...] = ()
    crash: Crash | None = None


def plan(
    scenario: Scenario, spec: RunSpec, rng_join: random.Random, rng_work: random.Random
) -> list[Planned]:
    """The initial events of a run, in the order they are scheduled.

    The first peer joins at 0, the others at uniform times within the join period;
    partitions, crashes and the workload windows count from the end of the warm-up; a
    sample every ``sample_interval`` from then until the end, and, with repair on, a
    repair pass every ``repair.interval`` after it.
    """
    sc, w = scenario, scenario.workload
    start = sc.join_period + sc.warmup
    events: list[Planned] = []
    times = sorted([0.0] + [rng_join.uniform(0, sc.join_period) for _ in range(spec.peers - 1)])
    events += [Planned(t, Kind.JOIN) for t in times]
    for p in sc.partitions:
        events.append(Planned(start + p.start, Kind.SPLIT, shares=p.groups))
        events.append(Planned(start + p.heal, Kind.HEAL))
    events += [Planned(start + c.at, Kind.CRASH, crash=c) for c in sc.crashes]

    def spread(n: int, window: tuple[float, float], kind: Kind) -> list[Planned]:
        lo, hi = (start + f * sc.duration for f in window)
        return [Planned(t, kind) for t in sorted(rng_work.uniform(lo, hi) for _ in range(n))]

    events += spread(w.publishes, w.publish_window, Kind.PUBLISH)
    events += spread(w.fetches, w.fetch_window, Kind.FETCH)
    events += spread(w.lookups, w.lookup_window, Kind.LOOKUP)
    t = start
    while t < sc.end:
        events.append(Planned(t, Kind.SAMPLE))
        t += sc.sample_interval
    if spec.repair.enabled:
        t = start + spec.repair.interval
        while t <= sc.end:
            events.append(Planned(t, Kind.REPAIR))
            t += spec.repair.interval
    return events


@dataclass(frozen=True, slots=True)
class Departure:
    """How a peer leaves: crashing (no goodbye) or not, and when its replacement joins."""

    crash: bool
    # None: the replacement would join after the end of the run, so none does.
    rejoin_at: float | None


class ChurnRule:
    """Session lengths and departures, drawn from one random stream (pure).

    ``start`` is when churn begins (the initial peers' sessions count from it), ``end``
    when the run ends: nothing is scheduled at or after it.
    """

    def __init__(self, churn: Churn, start: float, end: float, rng: random.Random) -> None:
        self.churn = churn
        self.start = start
        self.end = end
        self.rng = rng

    def leave_at(self, now: float, *, initial: bool) -> float | None:
        """When a peer joining at ``now`` leaves; None if never within the run."""
        if not self.churn.enabled:
            return None
        session = self.churn.sessions.sample(self.rng)
        leave = (self.start if initial else now) + session
        return leave if leave < self.end else None

    def depart(self, now: float) -> Departure:
        """A live peer's session ends at ``now``: does it crash, when does one rejoin."""
        crash = self.rng.random() < self.churn.crash_fraction
        delay = self.rng.expovariate(1.0 / max(self.churn.rejoin_delay, 1e-9))
        return Departure(crash, now + delay if now + delay < self.end else None)


class Schedule:
    """Timed actions in time order; at equal times, in the order they were added."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Action]] = []
        self._seq = 0

    def at(self, when: float, action: Action) -> None:
        heapq.heappush(self._heap, (when, self._seq, action))
        self._seq += 1

    def pop(self) -> tuple[float, Action]:
        """The next action and its time (the schedule must not be empty)."""
        when, _, action = heapq.heappop(self._heap)
        return when, action

    def __len__(self) -> int:
        return len(self._heap)


class Timeline:
    """Runs a :class:`Schedule` on the event loop; long actions run as owned tasks."""

    def __init__(self) -> None:
        self.schedule = Schedule()
        self._tg: asyncio.TaskGroup | None = None
        self._t0 = 0.0

    def begin(self) -> None:
        """Time 0 of the run is now."""
        self._t0 = asyncio.get_running_loop().time()

    def now(self) -> float:
        """Seconds since the start of the run."""
        return asyncio.get_running_loop().time() - self._t0

    def at(self, when: float, action: Action) -> None:
        self.schedule.at(when, action)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run ``coro`` as a task of the current group (inside :meth:`run` or :meth:`tasks`)."""
        assert self._tg is not None
        self._tg.create_task(coro)

    @asynccontextmanager
    async def tasks(self) -> AsyncIterator[None]:
        """A task group for :meth:`spawn`; leaving waits for every task spawned in it."""
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            yield
        self._tg = None

    async def run(self) -> None:
        """Run every action at its time, until the schedule is empty and every task done."""
        async with self.tasks():
            while self.schedule:
                when, action = self.schedule.pop()
                delay = when - self.now()
                if delay > 0:
                    await asyncio.sleep(delay)
                action()
