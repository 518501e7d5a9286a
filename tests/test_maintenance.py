"""The maintenance loop's pure decisions: planning, failure detection, rounds, views, GC."""

from __future__ import annotations

import os

import pytest

from difs_p2p import classgen
from difs_p2p.holders import HolderEntry, build_holder_entry
from difs_p2p.holdings import Holding, Query
from difs_p2p.identity import Identity, NodeId
from difs_p2p.maintenance import (
    Action,
    FailureDetector,
    Health,
    NameView,
    TokenBucket,
    collect_due,
    first_rounds,
    gc_due,
    keys_for_round,
    needs_fresh_view,
    plan_range,
    probe_batches,
    range_checks,
    range_health,
    read_view,
    republish_due,
    resolve_due,
    round_phase,
)
from difs_p2p.manifest import Lineage, Manifest
from difs_p2p.names import NameKey
from difs_p2p.placement import RangeKey
from difs_p2p.records import record_hash
from difs_p2p.segments import IntegrityRoot, SegmentId


def ids(*values: int) -> list[NodeId]:
    return [NodeId(v.to_bytes(20, "big")) for v in values]


def test_plan_range_leader_repairs_and_no_copy_is_dropped_for_claims() -> None:
    """Only the live holder closest to the key repairs; a far copy is kept however many
    nearer holders claim the range (claims are cheap to make)."""
    key = RangeKey((0).to_bytes(20, "big"))
    a, b, c, d = ids(1, 2, 3, 4)
    assert plan_range(a, key, [a, b], 3) == (Action.REPAIR, 1)
    assert plan_range(b, key, [a, b], 3) == (Action.NONE, 0)
    assert plan_range(d, key, [a, b, c, d], 3) == (Action.NONE, 0)
    assert plan_range(c, key, [a, b, c, d], 3) == (Action.NONE, 0)


def test_failure_detector_tells_suspect_from_dead() -> None:
    detector = FailureDetector(dead_after=3)
    peer = NodeId(b"p" * 20)
    assert detector.record(peer, False) is Health.SUSPECT
    assert detector.record(peer, False) is Health.SUSPECT
    assert detector.record(peer, True, 1.5) is Health.ALIVE  # slow, not dead
    for _ in range(3):
        state = detector.record(peer, False)
    assert state is Health.DEAD


def test_dead_peers_are_probed_less_and_less_often() -> None:
    """Alive and suspect peers are probed every round; a dead one after 1, 2, 4, 8...
    rounds, at least every dead_backoff rounds; an answer puts it back to every round."""
    detector = FailureDetector(dead_after=2, dead_backoff=4)
    peer = NodeId(b"p" * 20)
    probed = []
    for n in range(16):
        if detector.due(peer):
            probed.append(n)
            detector.record(peer, False)
    assert probed == [0, 1, 2, 4, 8, 12]
    assert detector.health(peer) is Health.DEAD
    while not detector.due(peer):
        pass
    detector.record(peer, True)
    assert detector.due(peer) and detector.due(peer)


def test_rounds_share_out_many_names_and_cover_each_once() -> None:
    """Up to max_keys_per_round names: every round takes all; more: each once per cycle."""
    few = [os.urandom(20) for _ in range(10)]
    assert keys_for_round(few, 0, 64) == few and keys_for_round(few, 7, 64) == few
    many = [os.urandom(20) for _ in range(1000)]
    cycle = [keys_for_round(many, n, 100) for n in range(10)]
    assert sorted(k for share in cycle for k in share) == sorted(many)
    assert all(40 <= len(share) <= 160 for share in cycle)
    assert keys_for_round(many, 10, 100) == cycle[0]
    assert keys_for_round([], 3, 100) == []


def test_round_phases_spread_peers_over_the_interval() -> None:
    """Peers' rounds fall at phases in [0, 1) spread over the interval, not all at once."""
    phases = [round_phase(Identity.generate().node_id) for _ in range(400)]
    assert all(0 <= p < 1 for p in phases)
    quarters = [sum(1 for p in phases if q / 4 <= p < (q + 1) / 4) for q in range(4)]
    assert min(quarters) > 50  # about 100 each
    node = Identity.generate().node_id
    assert round_phase(node) == round_phase(node)


def test_token_bucket_bounds_rate() -> None:
    bucket = TokenBucket(rate=1000.0)
    waits = [bucket.delay(500, now=0.0) for _ in range(4)]
    assert waits[0] > 0 and waits[-1] == pytest.approx(2.0)


def test_gc_policy() -> None:
    def manifest(version: int, deleted: bool) -> Manifest:
        return Manifest(
            "/x",
            NameKey(b"k" * 20),
            version,
            None,
            None,
            0,
            4096,
            0,
            0,
            0,
            IntegrityRoot(SegmentId(bytes(32))),
            deleted,
            0.0,
            b"p" * 32,
            b"",
        )

    held = Lineage(b"", record_hash(b""), 1)  # the lineage of these test manifests
    assert gc_due(held, manifest(2, True), keep=3, now=0.0)
    assert not gc_due(held, manifest(3, False), keep=3, now=0.0)
    assert gc_due(held, manifest(4, False), keep=3, now=0.0)
    assert not gc_due(held, None, keep=3, now=0.0)


def holding(
    key: bytes, version: int = 1, since: float = 0.0, start: int = 0, end: int = 15
) -> Holding:
    lineage = Lineage(b"", record_hash(b""), version)  # that of manifest_for's manifests
    return Holding(
        NameKey(key), version, IntegrityRoot(SegmentId(b"i" * 32)), 16, start, end, since, lineage
    )


def manifest_for(h: Holding, *, version: int | None = None, deleted: bool = False) -> Manifest:
    return Manifest(
        "/x",
        h.key,
        h.version if version is None else version,
        None,
        None,
        16 * 4096,
        4096,
        h.segment_count,
        2,
        3,
        h.integrity,
        deleted,
        0.0,
        b"p" * 32,
        b"",
    )


def entry_of(node: Identity, h: Holding, start: int = 0, end: int = 15) -> HolderEntry:
    return build_holder_entry(
        node,
        key=h.key,
        version=h.version,
        integrity=h.integrity,
        start=start,
        end=end,
        host="127.0.0.1",
        port=4000,
        issued=1,
    )


def view_of(h: Holding, entries: list[HolderEntry], rounds: int = 1) -> NameView:
    m = manifest_for(h)
    return NameView(m, {h.version: m}, entries, rounds)


def test_names_are_read_again_every_n_rounds_and_at_once_when_needed() -> None:
    """A view serves until resolve_every rounds used it; a new holding or a republish needs
    a fresh read, and a first view is read at once."""
    h = holding(b"k" * 20)
    assert resolve_due(None, [h], 10, False)
    assert not resolve_due(view_of(h, [], rounds=9), [h], 10, False)
    assert resolve_due(view_of(h, [], rounds=10), [h], 10, False)
    assert resolve_due(view_of(h, [], rounds=1), [h], 10, True)
    newer = holding(b"k" * 20, version=2)
    assert resolve_due(view_of(h, [], rounds=1), [h, newer], 10, False)
    other = Holding(
        h.key, 1, IntegrityRoot(SegmentId(b"j" * 32)), 16, 0, 15, 0.0
    )  # same version, other content
    assert resolve_due(view_of(h, [], rounds=1), [other], 10, False)
    assert resolve_due(view_of(h, [], rounds=1), [h], 1, False)  # every round, as before


def test_first_views_are_spread_over_the_resolve_period() -> None:
    """Names first read together at a start come up again on different rounds."""
    starts = [first_rounds(os.urandom(20), 10) for _ in range(1000)]
    assert all(1 <= s <= 10 for s in starts)
    assert min(starts.count(s) for s in range(1, 11)) > 50  # about 100 each
    assert first_rounds(b"k" * 20, 1) == 1


def test_republish_comes_an_hour_after_the_holding_began_then_hourly() -> None:
    """A new holding's records were just stored by its publish: no republish at once."""
    h = holding(b"k" * 20, since=1000.0)
    assert not republish_due(None, [h], 1000.0 + 10, 3600.0)
    assert republish_due(None, [h], 1000.0 + 3600, 3600.0)
    assert republish_due(None, [h, holding(b"k" * 20, 2, since=4000.0)], 4610.0, 3600.0)
    assert not republish_due(5000.0, [h], 5000.0 + 3599, 3600.0)
    assert republish_due(5000.0, [h], 5000.0 + 3600, 3600.0)
    assert not republish_due(None, [], 1e9, 3600.0)


def test_collect_due_frees_deleted_superseded_and_orphaned_versions() -> None:
    h1, h2 = holding(b"k" * 20, 1, since=0.0), holding(b"k" * 20, 2, since=0.0)
    newest = manifest_for(h1, version=4)
    view = NameView(newest, {4: newest}, [])
    assert collect_due([h1, h2], view, 10.0, keep=3, orphan_after=3600.0) == [h1]
    orphan = NameView(None, {}, [])
    unbound = classgen.replace(h1, lineage=None)  # placed, its manifest never seen
    assert collect_due([unbound], orphan, 10.0, 3, 3600.0) == []
    assert collect_due([unbound], orphan, 3601.0, 3, 3600.0) == [unbound]
    # a holding bound to its owner's lineage is freed only by the owner's proof, never
    # because its name cannot be read (records hidden by an eclipse, say)
    assert collect_due([h1], orphan, 1e9, 3, 3600.0) == []
    gone = manifest_for(h1, version=2, deleted=True)
    assert collect_due([h1], NameView(gone, {2: gone}, []), 0.0, 3, 3600.0) == [h1]


def test_probes_are_batched_per_co_holder_and_never_repeated_in_a_round() -> None:
    """All ranges a co-holder shares go in one batch; answered or silent holders are not
    asked again, except for ranges they were not asked about yet."""
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    h1, h2 = holding(b"1" * 20), holding(b"2" * 20)
    view1 = view_of(h1, [entry_of(a, h1), entry_of(b, h1, 0, 7), entry_of(me, h1)])
    view2 = view_of(h2, [entry_of(a, h2)])
    checks = range_checks([h1], view1, me.node_id) + range_checks([h2], view2, me.node_id)
    assert [(c.start, c.end) for c in checks] == [(0, 7), (8, 15), (0, 7), (8, 15)]
    assert [len(c.others) for c in checks] == [2, 1, 1, 1]  # b holds only 0..7 of h1
    batches = probe_batches(checks, {})
    assert set(batches) == {a.node_id, b.node_id}
    assert len(batches[a.node_id].queries) == 4 and len(batches[b.node_id].queries) == 1
    answered: dict[NodeId, dict[Query, bool] | None] = {
        a.node_id: {q: True for q in batches[a.node_id].queries},
        b.node_id: None,
    }
    assert probe_batches(checks, answered) == {}
    partly: dict[NodeId, dict[Query, bool] | None] = {a.node_id: {checks[0].query: True}}
    assert probe_batches(checks, partly)[a.node_id].queries == [c.query for c in checks[1:]]


def test_range_health_from_one_rounds_answers() -> None:
    """Answered yes: alive; silent: suspect until dead; answered no: gone for that range;
    not asked yet: suspect (neither repaired around nor trimmed for)."""
    me = Identity.generate()
    a, b, c, d = (Identity.generate() for _ in range(4))
    h = holding(b"k" * 20, end=7)
    view = view_of(h, [entry_of(x, h, 0, 7) for x in (a, b, c, d)])
    (check,) = range_checks([h], view, me.node_id)
    dead = {c.node_id}
    answers: dict[NodeId, dict[Query, bool] | None] = {
        a.node_id: {check.query: True},
        b.node_id: None,
        c.node_id: None,
        # d not asked
    }

    def health(node: NodeId) -> Health:
        return Health.DEAD if node in dead else Health.SUSPECT

    alive, suspect = range_health(check, answers, health)
    assert alive == [a.node_id] and suspect == [b.node_id, d.node_id]
    answers[a.node_id] = {check.query: False}
    assert range_health(check, answers, health) == ([], [b.node_id, d.node_id])


def test_a_fresh_view_is_needed_when_short_or_a_holder_turned() -> None:
    """Repair decisions are made on a fresh holder set: when a range looks short of copies
    or one of its holders turned suspect or dead this round."""
    me, a, b = Identity.generate(), Identity.generate(), Identity.generate()
    h = holding(b"k" * 20, end=7)
    (check,) = range_checks(
        [h], view_of(h, [entry_of(a, h, 0, 7), entry_of(b, h, 0, 7)]), me.node_id
    )
    assert not needs_fresh_view(check, [a.node_id, b.node_id], [], set())
    assert not needs_fresh_view(check, [a.node_id], [b.node_id], set())  # suspect counts
    assert needs_fresh_view(check, [a.node_id], [b.node_id], {b.node_id})  # ...once
    assert needs_fresh_view(check, [a.node_id], [], set())  # b dead or gone: short
    assert not needs_fresh_view(check, [a.node_id, b.node_id], [], {NodeId(os.urandom(20))})


def test_read_view_keeps_valid_items() -> None:
    """A resolve's manifests by version and its holder entries; garbage is skipped."""
    node = Identity.generate()
    h = holding(b"k" * 20)
    entry = entry_of(node, h)
    view = read_view(h.key, [b"not a manifest"], [entry.raw, b"\x01junk", b"{junk"])
    assert view.newest is None and view.manifests == {} and view.entries == [entry]
    assert view.rounds == 1
