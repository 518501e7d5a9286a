"""The fetch plan's decisions, replayed on exact timelines (no sockets, no clock)."""

from __future__ import annotations

import functools
from typing import Any

import pytest

from difs_p2p.errors import UsageError
from difs_p2p.fetchplan import (
    Estimate,
    FetchPlan,
    PlanConfig,
    PushPace,
    first_holders,
    hedge_delay,
)

A, B, C = ("10.0.0.1", 1), ("10.0.0.2", 2), ("10.0.0.3", 3)
MiB = 1 << 20
CONFIG = PlanConfig(
    pipeline=2, late_floor=0.1, initial_deadline=1.0, quiet_floor=10.0, give_up_floor=30.0
)


def everything(index: int) -> bool:
    return True


def make(n: int = 6, config: PlanConfig = CONFIG) -> FetchPlan:
    return FetchPlan(range(n), lambda i: MiB, config)


def any_left(holders: set[tuple[str, int]], index: int, excluded: set[tuple[str, int]]) -> bool:
    """Whether a holder of ``holders`` outside ``excluded`` remains (for ``stuck``)."""
    return bool(holders - excluded)


def run(plan: FetchPlan, steps: list[tuple[Any, ...]]) -> None:
    """Apply ``steps`` in order: (operation, arguments..., expected result)."""
    for number, (op, *args, expected) in enumerate(steps):
        if op == "next":
            holder, now, *rest = args
            serves = rest[0] if rest else everything
            limit = rest[1] if len(rest) > 1 else None
            got: Any = plan.next_for(holder, now, serves, limit)
        elif op == "fill":  # ask until the pipeline is full: the indexes given
            holder, now = args
            got = []
            while (index := plan.next_for(holder, now, everything)) is not None:
                got.append(index)
        elif op == "wait":
            plan.waiting(args[0], args[1])
            got = None
        elif op == "bytes":
            plan.received(args[0], args[1], args[2])
            got = None
        elif op == "arrive":  # a whole frame: first byte at args[1], complete at args[2]
            holder, first, done = args
            plan.received(holder, MiB, first)
            got = plan.arrived(holder, done, MiB)
        elif op == "tick":
            tick = plan.tick(args[0])
            got = (tick.late, tick.give_up)
        elif op == "verified":
            plan.verified(args[0])
            got = None
        elif op == "corrupt":
            plan.corrupt(args[0], args[1])
            got = None
        elif op == "refused":
            got = plan.refused(args[0], args[1])
        elif op == "lost":
            got = plan.lost(args[0])
        elif op == "remaining":
            got = plan.remaining
        elif op == "hedged":
            got = plan.hedged
        elif op == "queue":
            got = list(plan.queue)
        elif op == "late":
            got = plan.is_late(args[0])
        elif op == "header":  # a frame header arrived: (type name, payload length)
            got = plan.answer_problem(args[0], args[1], args[2])
        elif op == "stuck":  # the holders of every segment: those of args[0] not excluded
            got = plan.stuck(functools.partial(any_left, set(args[0])))
        else:  # pragma: no cover - a typo in a table
            raise AssertionError(op)
        assert got == expected, f"step {number} {op}{tuple(args)}: {got!r} != {expected!r}"


CASES: dict[str, list[tuple[Any, ...]]] = {
    "segments go out in order, a pipeline's worth per holder": [
        ("fill", A, 0.0, [0, 1]),
        ("fill", B, 0.0, [2, 3]),
        ("next", A, 0.0, None),
        ("queue", [4, 5]),
    ],
    "a holder is not asked for what it does not serve or beyond the window": [
        ("next", A, 0.0, lambda i: i >= 3, None, 3),
        ("next", A, 0.0, lambda i: i >= 3, 3, None),
        ("queue", [0, 1, 2, 4, 5]),
    ],
    "before any segment arrived, a silent holder is late after the initial deadline": [
        ("fill", A, 0.0, [0, 1]),
        ("wait", A, 0.0, None),
        ("tick", 0.9, ([], [])),
        ("tick", 1.01, ([A], [])),
        ("tick", 1.5, ([], [])),  # reported once
        ("late", A, True),
    ],
    "a holder with no record is judged by the others' figures": [
        ("fill", A, 0.0, [0, 1]),
        ("fill", B, 0.0, [2, 3]),
        ("wait", A, 0.0, None),
        ("arrive", B, 0.001, 0.002, (2, True)),
        # B: first byte in 1 ms, 1 MiB in 1 ms: B's and the fetch's deadline is the floor
        ("tick", 0.09, ([], [])),
        ("tick", 0.11, ([A], [])),
    ],
    "a late holder's segments are hedged to another holder; the first copy wins": [
        ("fill", A, 0.0, [0, 1]),
        ("fill", B, 0.0, [2, 3]),
        ("wait", A, 0.0, None),
        ("arrive", B, 0.001, 0.002, (2, True)),
        ("arrive", B, 0.002, 0.003, (3, True)),
        ("tick", 0.2, ([A], [])),
        ("next", A, 0.2, None),  # demoted: nothing new for A
        ("fill", B, 0.2, [0, 1]),  # what A owes comes before the queue
        ("hedged", 2),
        ("arrive", B, 0.201, 0.202, (0, True)),
        ("verified", 0, None),
        ("arrive", A, 0.3, 0.4, (0, False)),  # A's late copy is dropped
        ("late", A, False),  # A delivered: promoted again
        ("next", A, 0.4, 4),
    ],
    "a segment asked of a late holder and of a live one is not hedged a third time": [
        ("fill", A, 0.0, [0, 1]),
        ("wait", A, 0.0, None),
        ("tick", 1.1, ([A], [])),
        ("next", B, 1.1, 0),
        ("next", C, 1.1, 1),
        ("next", C, 1.1, 2),  # 0 is asked of B, who is not late: C takes the queue
        ("hedged", 2),
    ],
    "a holder that trickles bytes is late by its rate, then given up": [
        ("fill", B, 0.0, [0, 1]),
        ("arrive", B, 0.001, 0.002, (0, True)),
        ("fill", A, 0.002, [2, 3]),
        ("wait", A, 0.002, None),
        ("bytes", A, 1, 0.05, None),
        ("bytes", A, 1, 0.1, None),
        ("tick", 0.2, ([A], [])),
        ("bytes", A, 1, 29.0, None),
        ("tick", 29.5, ([], [])),
        ("tick", 30.1, ([], [A])),
    ],
    "a holder that sends nothing is given up after the quiet time": [
        ("fill", A, 0.0, [0, 1]),
        ("wait", A, 0.0, None),
        ("tick", 15.9, ([A], [])),  # 16 initial deadlines, more than the quiet floor
        ("tick", 16.1, ([], [A])),
        ("lost", A, [0, 1]),
        ("queue", [0, 1, 2, 3, 4, 5]),
        ("next", A, 16.1, None),
    ],
    "a slow but live holder is judged by its own record and stays in use": [
        ("fill", A, 0.0, [0, 1]),
        ("arrive", A, 0.5, 2.0, (0, True)),  # first byte 0.5 s, then 1 MiB in 1.5 s
        ("tick", 5.0, ([], [])),  # deadline about 0.5 + 4 * 0.25 + 2 * 1.5 = 4.5 s
        ("arrive", A, 2.5, 4.0, (1, True)),
        ("late", A, False),
        ("fill", A, 4.0, [2, 3]),
    ],
    "time the fetch spends not waiting for a holder does not count against it": [
        ("fill", B, 0.0, [0, 1]),
        ("arrive", B, 0.001, 0.002, (0, True)),
        ("tick", 5.0, ([], [])),  # B's next frame is not waited for yet
        ("wait", B, 5.0, None),
        ("tick", 5.05, ([], [])),
        ("tick", 5.2, ([B], [])),
    ],
    "a corrupt copy goes back to the front of the queue, never to the same holder": [
        ("fill", A, 0.0, [0, 1]),
        ("arrive", A, 0.001, 0.002, (0, True)),
        ("corrupt", A, 0, None),
        ("queue", [0, 2, 3, 4, 5]),
        ("next", A, 0.01, 2),
        ("next", B, 0.01, 0),
        ("remaining", 6),
    ],
    "an error answer sends the segment elsewhere": [
        ("fill", A, 0.0, [0, 1]),
        ("wait", A, 0.0, None),
        ("refused", A, 0.001, 0),
        ("next", A, 0.001, 2),
        ("next", B, 0.001, 0),
    ],
    "a holder that stalls after delivering is late by its record, then given up": [
        ("fill", A, 0.0, [0, 1]),
        ("wait", A, 0.0, None),
        ("arrive", A, 0.01, 0.02, (0, True)),
        ("verified", 0, None),
        ("wait", A, 0.02, None),
        ("tick", 0.1, ([], [])),  # its deadline: max(0.1, 0.01 + 4 * 0.005 + 2 * 0.01)
        ("tick", 0.2, ([A], [])),
        ("tick", 10.1, ([], [A])),  # nothing for the quiet floor (10 s)
        ("lost", A, [1]),
        ("queue", [1, 2, 3, 4, 5]),
        ("next", A, 10.2, None),
        ("next", B, 10.2, 1),
    ],
    "a holder that lies about a segment's size is refused before its payload": [
        ("fill", A, 0.0, [0, 1]),
        ("header", A, "DATA", MiB, None),
        ("header", A, "DATA", 16 * MiB, f"{16 * MiB} bytes of data for a segment of {MiB} bytes"),
        ("header", A, "ERROR", 40, None),
        ("header", A, "ACK", 33, "unexpected ACK frame"),
        ("header", B, "DATA", 5, "5 bytes of data for a segment of None bytes"),  # owes none
    ],
    "a holder that lies (corrupt copy) and then every holder gone: the segment is stuck": [
        ("fill", A, 0.0, [0, 1]),
        ("fill", B, 0.0, [2, 3]),
        ("arrive", A, 0.001, 0.002, (0, True)),
        ("corrupt", A, 0, None),
        ("stuck", [A, B], None),  # B may still have segment 0
        ("lost", B, [2, 3]),
        ("stuck", [A, B], 0),  # A failed it, B is gone
        ("queue", [2, 3, 0, 4, 5]),
        ("lost", A, [1]),
        ("stuck", [A, B], 1),
    ],
    "every segment verified: nothing remains": [
        ("fill", A, 0.0, [0, 1]),
        ("arrive", A, 0.001, 0.002, (0, True)),
        ("arrive", A, 0.002, 0.003, (1, True)),
        ("verified", 0, None),
        ("verified", 1, None),
        ("verified", 1, None),  # counted once
        ("remaining", 4),
    ],
}


@pytest.mark.parametrize("name", list(CASES))
def test_fetch_plan_timelines(name: str) -> None:
    """Each timeline of events gives exactly the decisions listed with it."""
    run(make(), CASES[name])


def test_a_segment_no_holder_can_serve_is_stuck() -> None:
    """A queued segment every possible holder failed is reported; others are not."""
    plan = make(3)
    assert plan.next_for(A, 0.0, everything) == 0
    plan.refused(A, 0.001)
    covers = {A, B}

    def possible(index: int, excluded: set[tuple[str, int]]) -> bool:
        return bool(covers - excluded) if index == 0 else True

    assert plan.stuck(possible) is None
    assert plan.next_for(B, 0.0, everything) == 0
    plan.lost(B)
    assert plan.stuck(possible) == 0


def test_unserved_segments_ask_for_a_new_holder() -> None:
    """A late holder's segments nobody running can take, and a queue the idle workers left,
    call for workers on other holders."""
    plan = make(4)
    assert [plan.next_for(A, 0.0, everything) for _ in range(2)] == [0, 1]
    plan.waiting(A, 0.0)
    assert plan.unserved([A], [], lambda h, i: True) == []
    plan.tick(1.5)
    assert plan.unserved([A], [], lambda h, i: True) == [0, 1, 2, 3]
    assert plan.unserved([A, B], [], lambda h, i: True) == []
    assert plan.unserved([A, B], [B], lambda h, i: h != B or i > 1) == [0, 1, 2, 3]
    assert plan.could_take(C, [0, 1], everything)
    assert not plan.could_take(A, [0, 1], everything)


@pytest.mark.parametrize(
    ("samples", "srtt", "rttvar"),
    [
        ([0.1], 0.1, 0.05),
        ([0.1, 0.1], 0.1, 0.0375),
        ([0.1, 0.9], 0.2, 0.2375),
    ],
)
def test_first_byte_estimate_follows_rfc6298(
    samples: list[float], srtt: float, rttvar: float
) -> None:
    """SRTT and RTTVAR move as RFC 6298 says (alpha 1/8, beta 1/4)."""
    estimate = Estimate()
    for sample in samples:
        estimate.first_byte(sample)
    assert estimate.srtt == pytest.approx(srtt)
    assert estimate.rttvar == pytest.approx(rttvar)


def test_deadline_grows_with_size_and_keeps_its_floor() -> None:
    """The deadline is srtt + 4 rttvar + twice the transfer time, at least the floor."""
    estimate = Estimate()
    assert estimate.deadline(MiB, CONFIG) == CONFIG.initial_deadline
    estimate.first_byte(0.01)
    estimate.transfer(MiB, 0.5)
    assert estimate.deadline(MiB, CONFIG) == pytest.approx(0.01 + 0.02 + 1.0)
    assert estimate.deadline(1, CONFIG) == CONFIG.late_floor


def test_plan_config_is_validated() -> None:
    """Nonsense settings are refused at the edge."""
    with pytest.raises(UsageError):
        PlanConfig(pipeline=0)
    with pytest.raises(UsageError):
        PlanConfig(late_floor=2.0, initial_deadline=1.0)
    with pytest.raises(UsageError):
        PlanConfig(quiet_floor=0)
    with pytest.raises(UsageError):
        PlanConfig(pipeline_bytes=0)


@pytest.mark.parametrize(
    ("pipeline", "budget", "segment_size", "depth"),
    [
        (8, 8 * MiB, 4096, 8),  # small segments: the request count bounds
        (8, 8 * MiB, MiB, 8),
        (8, 8 * MiB, 4 * MiB, 2),  # large segments: the byte budget bounds
        (8, 8 * MiB, 3 * MiB, 2),
        (8, 8 * MiB, 16 * MiB, 1),  # at least one request, however large
        (2, 64 * MiB, MiB, 2),
    ],
)
def test_pipeline_depth_is_budgeted_in_bytes(
    pipeline: int, budget: int, segment_size: int, depth: int
) -> None:
    """Requests in flight per holder: ``pipeline``, fewer if they would pass the byte budget."""
    config = PlanConfig(pipeline=pipeline, pipeline_bytes=budget)
    assert config.depth(segment_size) == depth
    plan = FetchPlan(range(10), lambda i: segment_size, config, segment_size=segment_size)
    asked = []
    while (index := plan.next_for(A, 0.0, everything)) is not None:
        asked.append(index)
    assert asked == list(range(depth))


@pytest.mark.parametrize(
    ("sources", "connected", "queued", "covers", "most", "expected"),
    [
        ([A, B, C], {B}, [0, 1, 2, 3], {}, 32, [B, A, C]),  # the connected holder leads
        ([A, B, C], set(), [0], {0: [C]}, 32, [C]),  # one segment: one holder that has it
        ([A, B, C], {A}, [0, 1], {0: [A, B], 1: [B]}, 32, [A, B]),
        ([A, B, C], set(), [0, 1], {}, 32, []),  # nobody may cover them
        ([A, B, C], set(), [0, 1, 2, 3, 4], {}, 2, [A, B]),  # at most ``most``
    ],
)
def test_first_holders_start_few_workers_for_small_objects(
    sources: list[tuple[str, int]],
    connected: set[tuple[str, int]],
    queued: list[int],
    covers: dict[int, list[tuple[str, int]]],
    most: int,
    expected: list[tuple[str, int]],
) -> None:
    """The connected holder leads; no more holders than segments, nor than allowed."""
    assert first_holders(sources, connected, queued, lambda i: covers.get(i, []), most) == expected


@pytest.mark.parametrize(
    ("connects", "delay"),
    [([], 0.05), ([0.001], 0.05), ([0.1, 0.02], 0.06), ([0.5], 1.5)],
)
def test_the_hash_list_is_hedged_after_three_fastest_connects(
    connects: list[float], delay: float
) -> None:
    """One more holder is asked after max(50 ms, 3 x the fastest connect seen)."""
    assert hedge_delay(connects) == pytest.approx(delay)


@pytest.mark.parametrize(
    ("acks", "limit"),
    [
        # nothing acknowledged yet: 16 initial deadlines (16 x 1 s)
        ([], 16.0),
        # one acknowledgement: its delay is the first-byte sample, no rate yet
        ([(0.01, MiB)], 16.0),
        # a fast link (1 MiB every 10 ms): the quiet floor
        ([(0.01, MiB), (0.02, MiB), (0.03, MiB), (0.04, MiB)], 10.0),
        # a slow link (1 MiB per 2 s): 16 deadlines of about 2 x 2 s, far past the floor
        ([(2.0, MiB), (4.0, MiB), (6.0, MiB), (8.0, MiB)], None),
    ],
)
def test_a_push_waits_for_acknowledgements_in_proportion_to_their_rate(
    acks: list[tuple[float, int]], limit: float | None
) -> None:
    """A silent receiver of a push is given up after 16 of its measured deadlines, at
    least the quiet floor: not a fixed I/O deadline."""
    pace = PushPace(CONFIG)
    pace.sent(0.0)
    for at, size in acks:
        pace.acked(size, at)
    if limit is not None:
        assert pace.limit(MiB) == pytest.approx(limit)
    else:
        assert pace.limit(MiB) > 3 * CONFIG.quiet_floor
        fast = PushPace(CONFIG)
        fast.sent(0.0)
        for i in range(1, 5):
            fast.acked(MiB, i * 0.01)
        assert pace.limit(MiB) > fast.limit(MiB)
