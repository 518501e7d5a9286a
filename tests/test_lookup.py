"""The lookup state machine, driven without sockets over synthetic networks."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

import pytest

from difs_p2p.identity import NodeId, distance
from difs_p2p.lookup import Lookup, LookupResult, RttEstimator, deal_paths, merge
from difs_p2p.routing import Contact

SILENT = object()  # the contact never answers
GONE = object()  # the request fails (the shell's rpc timeout)

Answer = Callable[[Contact], object]


def contact(rng: random.Random, i: int) -> Contact:
    return Contact(NodeId(rng.randbytes(20)), f"10.0.{i // 250}.{i % 250 + 1}", 4000)


def contacts_body(cs: list[Contact]) -> list[list[object]]:
    """A find_node reply body naming ``cs``, as the datagram decoder gives it."""
    return [[c.node_id, c.host, c.port] for c in cs]


@dataclass
class Network:
    """Peers that each know their own closest peers and a few random ones."""

    peers: list[Contact]
    known: dict[bytes, list[Contact]] = field(default_factory=dict)

    @classmethod
    def build(cls, seed: int, size: int, near: int = 16, per_bucket: int = 2) -> Network:
        """Each peer knows its ``near`` closest and up to ``per_bucket`` peers at each
        distance bit length (its k-buckets, thinned)."""
        rng = random.Random(seed)
        peers = [contact(rng, i) for i in range(size)]
        net = cls(peers)
        for p in peers:
            others = sorted(
                (q for q in peers if q != p), key=lambda q: distance(q.node_id, p.node_id)
            )
            buckets: dict[int, list[Contact]] = {}
            for q in others:
                buckets.setdefault(distance(q.node_id, p.node_id).bit_length(), []).append(q)
            spread = [q for b in buckets.values() for q in rng.sample(b, min(per_bucket, len(b)))]
            net.known[p.node_id] = list(dict.fromkeys(others[:near] + spread))
        return net

    def closest(self, target: bytes, k: int, among: list[Contact] | None = None) -> list[Contact]:
        return sorted(among or self.peers, key=lambda c: distance(c.node_id, target))[:k]

    def honest(self, target: bytes, count: int = 16) -> Answer:
        """Each peer answers with the ``count`` closest to ``target`` it knows (2 k,
        the most a reply may name)."""
        return lambda c: contacts_body(self.closest(target, count, self.known[c.node_id]))


def drive(machine: Lookup, answer: Answer) -> tuple[LookupResult, list[list[Contact]], float]:
    """Run ``machine`` to its end: requests are answered one at a time in the order
    sent; a silent contact is never answered, so time jumps to the next stall.
    Returns the result, what each ``ask`` returned, and the time it ended."""
    now, queue, batches = 0.0, [], []
    while True:
        batch = machine.ask(now)
        batches.append(batch)
        queue.extend(batch)
        if machine.done:
            return machine.result(), batches, now
        while queue:
            c = queue.pop(0)
            outcome = answer(c)
            if outcome is SILENT:
                continue
            if outcome is GONE:
                machine.timeout(c)
            else:
                machine.reply(c, outcome, now)
            break
        else:
            wake = machine.wake_at()
            assert wake is not None and wake > now
            now = wake


def new_lookup(target: bytes, start: list[Contact], **kw: object) -> Lookup:
    params: dict[str, object] = {"k": 8, "alpha": 3, "stall": 1.0, "me": b"\xff" * 20}
    params.update(kw)
    rpc = str(params.pop("rpc", "find_node"))
    return Lookup(target, rpc, start, **params)  # type: ignore[arg-type]


@pytest.mark.parametrize(("seed", "size", "starts"), [(1, 60, 1), (2, 200, 3), (3, 400, 3)])
def test_converges_to_the_k_closest(seed: int, size: int, starts: int) -> None:
    """On an honest network the lookup ends at the true k closest (brute-force XOR)."""
    net = Network.build(seed, size)
    rng = random.Random(seed)
    for _ in range(5):
        target = rng.randbytes(20)
        start = rng.sample(net.peers, starts)
        result, batches, _ = drive(new_lookup(target, start), net.honest(target))
        assert result.closest == net.closest(target, 8)
        assert result.stalled == 0
        assert result.rounds >= 1
        assert max(len(b) for b in batches) <= 8


def test_alpha_limit_then_the_last_round_asks_the_rest_at_once() -> None:
    """At most alpha requests are in flight until no candidate is closer than the best
    answer; then the remaining k closest are asked together."""
    rng = random.Random(7)
    peers = sorted((contact(rng, i) for i in range(8)), key=lambda c: c.node_id)
    target = peers[0].node_id
    machine = new_lookup(target, peers)
    first = machine.ask(0.0)
    assert first == sorted(peers, key=lambda c: distance(c.node_id, target))[:3]
    assert machine.ask(0.0) == []  # alpha requests in flight: nothing more
    machine.reply(first[0], [], 0.0)  # the closest answered, naming nobody
    last = machine.ask(0.0)
    assert len(last) == 5  # every remaining one of the k closest at once
    assert machine.result().peak_in_flight == 7


def test_a_contact_that_never_answers_frees_its_slot_at_the_stall() -> None:
    """A silent contact holds its slot only until the stall time; the lookup ends
    without it and counts it as stalled."""
    rng = random.Random(9)
    net = Network.build(9, 80)
    target = rng.randbytes(20)
    silent = net.closest(target, 1)[0]
    machine = new_lookup(target, [silent, *rng.sample(net.peers, 2)], alpha=1, stall=2.0)
    honest = net.honest(target)
    assert machine.ask(0.0) == [silent]
    assert machine.ask(1.9) == []  # still within its stall time
    assert machine.wake_at() == 2.0
    result, _, _ = drive(machine, lambda c: SILENT if c == silent else honest(c))
    assert silent not in result.closest
    assert result.stalled == 1
    # the silent contact still holds its place among the k closest: the 7 others are found
    truth = net.closest(target, 8, [p for p in net.peers if p != silent])
    assert result.closest[:7] == truth[:7]


def test_explicit_stall_event_frees_the_slot() -> None:
    """``stalled(contact)`` frees a slot as the passing of the stall time does."""
    rng = random.Random(4)
    peers = [contact(rng, i) for i in range(3)]
    machine = new_lookup(rng.randbytes(20), peers, alpha=1)
    (first,) = machine.ask(0.0)
    machine.stalled(first)
    assert len(machine.ask(0.0)) == 1
    assert machine.in_flight() == 2


LIARS = {
    "far contacts": "far",
    "malformed contact": "malformed",
    "host name": "hostname",
    "not a list": "garbage",
    "too many contacts": "many",
}


@pytest.mark.parametrize("lie", list(LIARS.values()), ids=list(LIARS))
def test_a_lying_contact_does_not_derail_the_lookup(lie: str) -> None:
    """Far-away contacts are never asked; a malformed reply counts as no answer and
    nothing it names is asked."""
    net = Network.build(11, 150)
    rng = random.Random(11)
    target = rng.randbytes(20)
    liar = net.closest(target, 1)[0]
    # made-up contacts in the half of the ID space away from the target
    top = int.from_bytes(target, "big") ^ (1 << 159)
    far = [
        Contact(
            NodeId(((top >> 150 << 150) | rng.getrandbits(150)).to_bytes(20, "big")),
            "10.9.9.9",
            i + 1,
        )
        for i in range(20)
    ]
    bodies: dict[str, object] = {
        "far": contacts_body(far[:16]),
        "malformed": [*contacts_body(far[:2]), [b"short", "10.0.0.1", 1]],
        "hostname": [*contacts_body(far[:2]), [far[3].node_id, "example.com", 1]],
        "garbage": {"nodes": 1},
        "many": contacts_body(far) * 2,
    }
    honest = net.honest(target)
    asked: list[Contact] = []

    def answer(c: Contact) -> object:
        asked.append(c)
        return bodies[lie] if c == liar else honest(c)

    # ten contacts in the target's half: the made-up ones are never among the k closest
    near_half = [p for p in net.peers if p != liar and distance(p.node_id, target) < 1 << 159]
    result, _, _ = drive(new_lookup(target, [liar, *rng.sample(near_half, 10)]), answer)
    assert not set(far) & set(asked)
    if lie == "far":
        assert result.closest == net.closest(target, 8)
    else:
        # the liar's reply counts as none; honest peers keep naming it, so it keeps its
        # place among the k closest (never asked again) and the other 7 are found
        assert liar not in result.closest
        truth = net.closest(target, 8, [p for p in net.peers if p != liar])
        assert result.closest[:7] == truth[:7]


@pytest.mark.parametrize("outcome", [GONE, SILENT], ids=["gone", "silent"])
def test_every_contact_gone_ends_with_what_it_has(outcome: object) -> None:
    """When no contact answers the lookup still ends, with no closest peers."""
    rng = random.Random(3)
    start = [contact(rng, i) for i in range(5)]
    result, _, _ = drive(new_lookup(rng.randbytes(20), start), lambda c: outcome)
    assert result.closest == []
    assert result.queried == 5
    assert result.stalled == (5 if outcome is SILENT else 0)


def test_no_start_contacts_is_done_at_once() -> None:
    """A lookup with nobody to ask is done before it sends anything."""
    machine = new_lookup(b"\x00" * 20, [])
    assert machine.ask(0.0) == []
    assert machine.done
    assert machine.result().closest == []


def test_the_asker_itself_is_never_asked() -> None:
    """The asking peer's own ID, in the start or in a reply, is skipped."""
    rng = random.Random(5)
    me = contact(rng, 0)
    other = contact(rng, 1)
    machine = new_lookup(rng.randbytes(20), [me, other], me=me.node_id)
    assert machine.ask(0.0) == [other]
    machine.reply(other, contacts_body([me]), 0.0)
    assert machine.ask(0.0) == []
    assert machine.done


def test_value_found_at_some_peers_but_not_others() -> None:
    """find_value collects the value of every one of the k closest that holds it, and
    lists the others among the closest as without it."""
    net = Network.build(13, 100)
    rng = random.Random(13)
    target = rng.randbytes(20)
    holders = set(net.closest(target, 8)[1:4])
    honest = net.honest(target)

    def answer(c: Contact) -> object:
        return {"value": b"v:" + c.node_id[:2]} if c in holders else honest(c)

    machine = new_lookup(target, rng.sample(net.peers, 3), rpc="find_value")
    result, _, _ = drive(machine, answer)
    assert {c for c, _ in result.values} == holders
    assert all(v == b"v:" + c.node_id[:2] for c, v in result.values)
    assert set(result.without_value) == set(result.closest) - holders
    assert result.closest == net.closest(target, 8)


def test_entries_lookup_collects_pages_values_and_unknowns() -> None:
    """find_entries with the value: entries of every peer, further pages noted, and
    peers that did not say whether they hold a record listed apart."""
    rng = random.Random(17)
    peers = [contact(rng, i) for i in range(3)]
    target = rng.randbytes(20)
    bodies: dict[Contact, object] = {
        peers[0]: {"entries": [b"a"], "next": 1, "nodes": [], "value": b"r", "digest": b"d" * 16},
        peers[1]: {"entries": [b"b"], "next": -1, "nodes": []},  # predates the flag
        peers[2]: {"entries": [b"c", 5], "next": -1, "nodes": [], "value": None},
    }
    machine = new_lookup(target, peers, rpc="find_entries", with_value=True)
    result, _, _ = drive(machine, lambda c: bodies[c])
    assert sorted(result.entries) == [b"a", b"b", b"c"]
    assert result.values == [(peers[0], b"r")]
    assert result.value_unknown == [peers[1]]
    assert [(m.contact, m.next, m.digest) for m in result.more_pages] == [(peers[0], 1, b"d" * 16)]
    assert result.without_value == [peers[2]]


def test_disjoint_paths_share_no_peer() -> None:
    """Paths that share a claimed set never ask the same peer, and each ends at its own
    k closest; merged, they keep every path's closest."""
    net = Network.build(21, 300)
    rng = random.Random(21)
    target = rng.randbytes(20)
    honest = net.honest(target)
    claimed: set[bytes] = set()
    known = net.closest(target, 16, rng.sample(net.peers, 40))
    machines = [new_lookup(target, s, claimed=claimed) for s in deal_paths(known, 2)]
    asked: list[set[Contact]] = [set(), set()]
    queues: list[list[Contact]] = [[], []]
    now = 0.0
    while not all(m.done for m in machines):
        for i, m in enumerate(machines):  # the paths take turns, as concurrent tasks do
            sent = m.ask(now)
            asked[i].update(sent)
            queues[i].extend(sent)
            if queues[i]:
                c = queues[i].pop(0)
                m.reply(c, honest(c), now)
    assert asked[0] and asked[1]
    assert not asked[0] & asked[1]
    results = [m.result() for m in machines]
    for r, mine in zip(results, asked, strict=True):
        assert set(r.closest) <= mine
    merged = merge(results, target)
    assert merged.paths == [r.closest for r in results]
    assert merged.closest == sorted(
        results[0].closest + results[1].closest, key=lambda c: distance(c.node_id, target)
    )


def test_deal_paths_round_robin() -> None:
    """The closest known contacts are dealt to the paths in turn; empty paths dropped."""
    rng = random.Random(1)
    cs = [contact(rng, i) for i in range(5)]
    assert deal_paths(cs, 2) == [[cs[0], cs[2], cs[4]], [cs[1], cs[3]]]
    assert deal_paths(cs[:1], 3) == [[cs[0]]]


def test_unknown_lookup_kind_is_refused() -> None:
    """Only find_node, find_value and find_entries are lookups."""
    with pytest.raises(ValueError, match="not a lookup"):
        new_lookup(b"\x00" * 20, [], rpc="store")


def test_reply_from_a_contact_not_asked_is_ignored() -> None:
    """A reply the machine did not ask for changes nothing."""
    rng = random.Random(2)
    a, b = contact(rng, 0), contact(rng, 1)
    machine = new_lookup(rng.randbytes(20), [a])
    machine.ask(0.0)
    machine.reply(b, contacts_body([]), 0.0)
    machine.reply(a, contacts_body([]), 0.0)
    machine.reply(a, contacts_body([b]), 0.0)  # a second answer is not taken
    assert machine.ask(0.0) == []
    assert machine.result().closest == [a]


def test_stall_time_follows_the_round_trip_within_bounds() -> None:
    """The stall time is the cap before any reply, then srtt + 4 rttvar, clamped."""
    rtt = RttEstimator()
    assert rtt.timeout(0.1, 0.5) == 0.5
    for _ in range(50):
        rtt.observe(0.001)  # a LAN
    assert rtt.timeout(0.1, 0.5) == 0.1
    for _ in range(50):
        rtt.observe(0.2)  # a slow path
    assert 0.2 <= rtt.timeout(0.1, 0.5) <= 0.5
    for sample in (0.05, 3.0, 0.05, 3.0):
        rtt.observe(sample)  # wild jitter hits the cap
    assert rtt.timeout(0.1, 0.5) == 0.5
