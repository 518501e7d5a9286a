"""The rejoin decisions (membership.py): states, backoff, candidates, publish quorum."""

from __future__ import annotations

import random

import pytest

from difs_p2p.membership import (
    ISOLATED,
    OK,
    THIN,
    Membership,
    Transition,
    cut_off_error,
    network_state,
    publish_quorum,
)


@pytest.mark.parametrize(
    ("size", "most_seen", "ksize", "state"),
    [
        (0, 0, 20, OK),  # never saw another peer: a one-peer network
        (0, 1, 20, ISOLATED),
        (0, 40, 20, ISOLATED),
        (4, 20, 20, THIN),  # below 20 / 4
        (5, 20, 20, OK),
        (4, 100, 20, THIN),  # most_seen capped at k
        (5, 100, 20, OK),
        (1, 4, 20, OK),  # a 5-peer network: 4 / 4 = 1 contact is enough
        (1, 8, 20, THIN),
        (2, 8, 20, OK),
        (3, 3, 20, OK),
    ],
)
def test_network_state(size: int, most_seen: int, ksize: int, state: str) -> None:
    """The state follows the share of the most contacts (capped at k) still known."""
    assert network_state(size, most_seen, ksize, 0.25) == state


@pytest.mark.parametrize(
    ("most_seen", "ksize", "quorum"),
    [(0, 20, 1), (1, 20, 1), (2, 20, 1), (4, 20, 2), (19, 20, 5), (20, 20, 6), (500, 20, 6)],
)
def test_publish_quorum(most_seen: int, ksize: int, quorum: int) -> None:
    """A quarter of the key/value peers the network should have (this one included),
    rounded up."""
    assert publish_quorum(most_seen, ksize) == quorum


def test_transitions_and_retry_times() -> None:
    """Losing the network schedules an attempt at once; rejoining resets the backoff."""
    m = Membership(20, rng=random.Random(1))
    assert m.observe(20, 0.0) is None
    assert m.observe(3, 10.0) == Transition(OK, THIN, 3, 20)
    assert m.due(10.0)
    assert m.observe(0, 11.0) == Transition(THIN, ISOLATED, 0, 20)
    assert m.due(11.0)  # still the first attempt's time
    m.attempted(11.0)
    assert m.attempts == 1 and m.last_attempt == 11.0
    assert not m.due(11.0)
    assert m.observe(6, 12.0) == Transition(ISOLATED, OK, 6, 20)
    assert m.attempts == 0 and m.next_attempt is None and not m.due(1e9)


def test_backoff_doubles_with_jitter_up_to_the_cap() -> None:
    """Delays double from the minimum, each between half and all of it, and stop at the cap."""
    m = Membership(20, backoff_min=1.0, backoff_max=60.0, rng=random.Random(7))
    m.observe(5, 0.0)
    m.observe(0, 1.0)
    delays = [m.attempted(float(i)) for i in range(12)]
    for i, delay in enumerate(delays):
        full = min(60.0, 2.0**i)
        assert full / 2 <= delay <= full
    assert max(delays) <= 60.0
    assert m.due(11.0 + delays[-1])  # never gives up


def test_a_leave_lowers_most_seen_but_silence_does_not() -> None:
    """Peers that leave cleanly shrink the expected network; evicted ones do not."""
    m = Membership(20)
    m.observe(2, 0.0)
    m.evicted(("10.0.0.1", 1))
    m.observe(1, 1.0)
    assert m.most_seen == 2
    m.left(0)
    assert m.most_seen == 1
    m.observe(0, 2.0)
    m.left(0)
    assert m.most_seen == 0
    assert m.observe(0, 3.0) == Transition(ISOLATED, OK, 0, 0)


def test_leaves_in_a_row_count_with_the_table_size_at_each() -> None:
    """Two contacts that leave one after the other, with no observation between (the size
    last observed is still 2), leave a table that is ok, not cut off."""
    m = Membership(20)
    m.observe(2, 0.0)
    m.left(1)
    m.left(0)
    assert m.most_seen == 0
    assert m.observe(0, 1.0) is None and m.state == OK


@pytest.mark.parametrize(
    ("lost", "bootstrap", "saved", "known", "me", "limit", "expected"),
    [
        ([], [], [], [], None, 64, []),
        (["a", "b"], ["c"], ["d"], [], None, 64, ["b", "a", "c", "d"]),  # newest lost first
        (["a"], ["a", "c"], ["c", "d"], [], None, 64, ["a", "c", "d"]),  # each once
        (["a"], ["b"], ["c"], ["b"], "c", 64, ["a"]),  # not known, not me
        (["a", "b"], ["c"], ["d"], [], None, 2, ["b", "a"]),
    ],
)
def test_candidates(
    lost: list[str],
    bootstrap: list[str],
    saved: list[str],
    known: list[str],
    me: str | None,
    limit: int,
    expected: list[str],
) -> None:
    """Lost contacts, then --bootstrap, then saved ones; deduplicated and bounded."""

    def addr(name: str) -> tuple[str, int]:
        return ("10.0.0." + str(ord(name)), 4000)

    m = Membership(20)
    for name in lost:
        m.evicted(addr(name))
    got = m.candidates(
        [addr(n) for n in bootstrap],
        [addr(n) for n in saved],
        known=[addr(n) for n in known],
        me=addr(me) if me else None,
        limit=limit,
    )
    assert got == [addr(n) for n in expected]


def test_lost_memory_is_bounded_and_forgets_who_is_back() -> None:
    """Only the newest evicted addresses are kept; one that answers again is dropped."""
    m = Membership(20, remembered=3)
    for i in range(5):
        m.evicted(("10.0.0.1", 4000 + i))
    m.evicted(("10.0.0.1", 4002))  # evicted again: newest
    assert m.lost == [("10.0.0.1", p) for p in (4002, 4004, 4003)]
    m.back(("10.0.0.1", 4004))
    assert m.lost == [("10.0.0.1", 4002), ("10.0.0.1", 4003)]
    assert m.as_dict()["lost_remembered"] == 2


def test_a_peer_that_knows_nobody_keeps_asking_without_being_cut_off() -> None:
    """Alone (a restart while its network is out of reach), a peer is ok but asks again
    with backoff; with nobody to ask (a one-peer network) it only looks again later."""
    m = Membership(20, backoff_max=60.0, rng=random.Random(3))
    assert m.observe(0, 0.0) is None and m.state == OK
    assert m.due(0.0)
    m.nothing_to_ask(0.0)
    assert not m.due(59.0) and m.due(60.0)
    assert m.attempts == 0 and m.as_dict()["next_rejoin"] is None
    m.attempted(60.0)
    assert m.as_dict()["next_rejoin"] == m.next_attempt
    assert m.observe(1, 61.0) is None
    assert not m.due(1e9) and m.attempts == 0


@pytest.mark.parametrize(
    ("state", "message"),
    [
        ("ok", None),
        ("later", None),  # a state word a later version may add: not an error here
        (THIN, "knows 2 others (it knew 20): it is cut off from the network (thin)"),
        (ISOLATED, "knows 2 others (it knew 20): it is cut off from the network (isolated)"),
    ],
)
def test_cut_off_error(state: str, message: str | None) -> None:
    """A client fails with a network error naming the entry peer when it is cut off."""
    error = cut_off_error(("10.0.0.1", 4000), state, 2, 20)
    if message is None:
        assert error is None
    else:
        assert error is not None and message in str(error) and "10.0.0.1:4000" in str(error)
