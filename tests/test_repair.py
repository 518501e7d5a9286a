"""Replication, failure detection, repair, trimming and garbage collection."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import segments
from difs_p2p.client import Client, PublishResult
from difs_p2p.config import RepairConfig
from difs_p2p.errors import RemoteRejectedError
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
from difs_p2p.peer import Peer
from difs_p2p.placement import RangeKey
from difs_p2p.records import record_hash
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.transfer import Connection
from tests.helpers import client_for, start_peers, stop_all

SEG = 64 << 10


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


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 8)
    yield peers
    await stop_all(peers)


async def crash(peer: Peer) -> None:
    """Stop answering at once, without telling anyone (as kill -9 would)."""
    assert peer.server is not None and peer.dht is not None and peer.dht.transport is not None
    peer.dht.transport.close()
    await peer.server.stop()
    peer.server = None


def live_copies(peers: list[Peer], integrity: bytes, start: int, end: int) -> int:
    """Peers up and serving that really store every segment of a range."""
    count = 0
    for p in peers:
        if p.server is None or p.store is None or p.holdings is None:
            continue
        if any(
            h.integrity == integrity and h.start <= start and end <= h.end for h in p.holdings.all()
        ):
            count += 1
    return count


async def publish_random(
    entry: Peer, tmp_path: Path, name: str, segment_count: int, replicas: int
) -> PublishResult:
    """Publish ``segment_count`` random segments under ``name`` through ``entry``."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(segment_count * SEG))
    async with client_for(entry, publisher=Identity.generate()) as client:
        return await client.put(src, name, segment_size=SEG, replicas=replicas)


async def rounds(peers: list[Peer], n: int) -> None:
    for _ in range(n):
        for p in peers:
            if p.server is not None and p.maintainer is not None:
                await p.maintainer.round()


async def test_repair_restores_r_copies_after_two_crashes(
    network: list[Peer], tmp_path: Path
) -> None:
    """Two holders crash; after dead_after rounds every range has r live copies again."""
    result = await publish_random(network[0], tmp_path, "/durable", 40, 3)
    integrity = result.manifest.integrity
    ranges = segments.stripe_ranges(result.manifest.segment_count, result.manifest.stripes)
    holders = {h for r in result.ranges for h in r["holders"]} - {network[0].node_id.hex()}
    victims = [p for p in network if p.node_id.hex() in holders][:2]
    for victim in victims:
        await crash(victim)
    assert min(live_copies(network, integrity, a, b) for a, b in ranges) < 3
    await rounds(network, 4)
    assert [live_copies(network, integrity, a, b) for a, b in ranges] == [3] * len(ranges)
    repaired = sum(p.maintainer.stats.repaired_ranges for p in network if p.maintainer)
    assert repaired >= 1
    async with Client(
        network[5].address if network[5] not in victims else network[6].address
    ) as client:
        out = tmp_path / "out"
        await client.get("/durable", out)
    assert out.read_bytes() == (tmp_path / "src").read_bytes()


async def test_extra_copies_are_kept(network: list[Peer], tmp_path: Path) -> None:
    """A range copied to more than r peers keeps every copy: no holder drops its own
    because others answer that they hold the range."""
    result = await publish_random(network[0], tmp_path, "/trim", 8, 2)
    integrity = result.manifest.integrity
    holders = set(result.ranges[0]["holders"])
    extra = next(p for p in network if p.node_id.hex() not in holders)
    holder = next(p for p in network if p.node_id.hex() in holders)
    entry = await holder.replicator.push_range(
        extra.address, result.manifest.key, 1, integrity, 0, result.manifest.segment_count - 1
    )
    await holder.replicator.dht.add_entries(result.manifest.key, [entry.raw])
    assert live_copies(network, integrity, 0, 7) == 3
    await rounds(network, 2)
    assert live_copies(network, integrity, 0, 7) == 3


async def test_holder_down_during_delete_frees_segments_on_return(
    network: list[Peer], tmp_path: Path
) -> None:
    """A holder offline during rm frees the deleted name's segments when it comes back."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    me = Identity.generate()
    async with client_for(network[0], publisher=me) as client:
        result = await client.put(src, "/gc", segment_size=SEG, replicas=3)
    holder_id = next(h for h in result.ranges[0]["holders"] if h != network[0].node_id.hex())
    index = next(i for i, p in enumerate(network) if p.node_id.hex() == holder_id)
    away = network[index]
    used_before = away.store.used  # type: ignore[union-attr]
    assert used_before >= 8 * SEG
    await away.stop()
    async with client_for(network[0], publisher=me) as client:
        await client.rm("/gc")
    back = Peer(away.config)
    await back.start()
    network[index] = back
    assert back.store is not None and back.store.used == used_before  # nothing lost offline
    await rounds([back], 1)
    assert back.store.used == 0


# -- maintenance traffic: views between resolves, one probe per co-holder -------------------


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
    unbound = dataclasses.replace(h1, lineage=None)  # placed, its manifest never seen
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


# -- maintenance traffic with real peers ----------------------------------------------------

QUIET = RepairConfig(interval=3600.0, resolve_every=10**6)  # rounds only when a test asks


def count_probe_connections(peers: list[Peer]) -> dict[bytes, list[object]]:
    """Record, per peer, every connection on which it was asked whether it holds a range."""
    seen: dict[bytes, list[object]] = {p.node_id: [] for p in peers}
    for p in peers:
        for op in ("holds", "holds_ranges"):
            handler = p._controls.get(op)
            if handler is None:
                continue

            async def counting(
                conn: Connection,
                args: dict[str, Any],
                handler: Any = handler,
                into: list[object] = seen[p.node_id],
            ) -> dict[str, Any]:
                if not any(c is conn for c in into):
                    into.append(conn)
                result: dict[str, Any] = await handler(conn, args)
                return result

            p._controls[op] = counting
    return seen


async def publish_many(peer: Peer, root: Path, names: int, segments_each: int) -> list[str]:
    out = []
    async with client_for(peer, publisher=Identity.generate()) as client:
        for i in range(names):
            src = root / f"src{i}"
            src.write_bytes(os.urandom(segments_each * SEG))
            await client.put(src, f"/many/{i}", segment_size=SEG, replicas=3)
            out.append(f"/many/{i}")
    return out


async def test_a_round_asks_each_co_holder_once_whatever_it_shares(tmp_path: Path) -> None:
    """One connection per co-holder per round, carrying every range the two share."""
    peers = await start_peers(tmp_path / "net", 4, repair=QUIET)
    try:
        await publish_many(peers[0], tmp_path, 3, 16)  # 2 ranges each: 6 ranges
        me = max(peers, key=lambda p: len(p.replicator.holdings.all()))
        assert me.holdings is not None and len(me.holdings.all()) >= 3
        seen = count_probe_connections(peers)
        await rounds([me], 1)
        asked = {node: len(conns) for node, conns in seen.items() if conns}
        assert asked and all(n == 1 for n in asked.values()), asked
        assert me.maintainer is not None and me.maintainer.stats.probes == len(asked)
    finally:
        await stop_all(peers)


async def test_rounds_between_resolves_send_no_datagrams(tmp_path: Path) -> None:
    """Between resolves a round only probes co-holders over TCP: no DHT traffic at all."""
    peers = await start_peers(tmp_path / "net", 4, repair=QUIET)
    try:
        await publish_many(peers[0], tmp_path, 3, 8)
        me = max(peers, key=lambda p: len(p.replicator.holdings.all()))
        assert me.dht is not None and me.maintainer is not None
        await rounds([me], 1)
        resolves = me.maintainer.stats.resolves
        assert resolves == len({h.key for h in me.replicator.holdings.all()}) >= 2
        sent = me.dht.traffic()["sent"]
        await rounds([me], 3)
        assert me.dht.traffic()["sent"] == sent
        assert me.maintainer.stats.resolves == resolves
        assert me.maintainer.stats.probes > 3
    finally:
        await stop_all(peers)


async def test_crashed_holders_are_repaired_without_waiting_for_a_periodic_resolve(
    tmp_path: Path,
) -> None:
    """With views cached, a holder turning suspect or dead makes the name be read again at
    once; repair restores r copies within dead_after + 1 rounds."""
    peers = await start_peers(tmp_path / "net", 8, repair=QUIET)
    try:
        result = await publish_random(peers[0], tmp_path, "/cached", 40, 3)
        integrity = result.manifest.integrity
        ranges = segments.stripe_ranges(result.manifest.segment_count, result.manifest.stripes)
        await rounds(peers, 1)  # every holder now has a view of the name
        holders = {h for r in result.ranges for h in r["holders"]} - {peers[0].node_id.hex()}
        victims = [p for p in peers if p.node_id.hex() in holders][:2]
        for victim in victims:
            await crash(victim)
        assert min(live_copies(peers, integrity, a, b) for a, b in ranges) < 3
        await rounds(peers, QUIET.dead_after + 1)
        assert [live_copies(peers, integrity, a, b) for a, b in ranges] == [3] * len(ranges)
    finally:
        await stop_all(peers)


async def test_superseded_versions_are_collected_within_resolve_every_rounds(
    tmp_path: Path,
) -> None:
    """A holder that read the name before three updates frees the old version within
    resolve_every rounds, though its view said nothing about them."""
    config = RepairConfig(interval=3600.0, resolve_every=3)
    peers = await start_peers(tmp_path / "net", 5, repair=config)
    try:
        me = Identity.generate()
        src = tmp_path / "src"
        async with client_for(peers[0], publisher=me) as client:
            src.write_bytes(os.urandom(4 * SEG))
            first = await client.put(src, "/gcv", segment_size=SEG, replicas=3)
        old = [p for p in peers if p.holdings is not None and p.holdings.of_key(first.manifest.key)]
        await rounds(old, 1)
        async with client_for(peers[0], publisher=me) as client:
            for _ in range(3):
                src.write_bytes(os.urandom(4 * SEG))
                await client.put(src, "/gcv", segment_size=SEG, replicas=3, update=True)
        await rounds(peers, config.resolve_every)
        for p in old:
            assert p.holdings is not None
            assert 1 not in {h.version for h in p.holdings.of_key(first.manifest.key)}
    finally:
        await stop_all(peers)


async def test_holds_ranges_answers_each_range_in_order(
    network: list[Peer], tmp_path: Path
) -> None:
    """The batched probe: one answer per range, in order; malformed ranges are refused."""
    result = await publish_random(network[0], tmp_path, "/probe", 8, 3)
    key = result.manifest.key.hex()
    holder = next(p for p in network if p.node_id.hex() in result.ranges[0]["holders"])
    conn = await Connection.open(holder.address, io_timeout=5)
    try:
        reply = await conn.call(
            "holds_ranges",
            ranges=[[key, 1, 0, 7], [key, 2, 0, 7], [key, 1, 0, 8], ["00" * 20, 1, 0, 0]],
        )
        assert reply == {"holds": [True, False, False, False]}
        for bad in (
            [[key, 1, 0]],
            [[key, -1, 0, 0]],
            [["zz", 1, 0, 0]],
            "x",
            [[key, 1, 0, 0]] * 1025,
        ):
            with pytest.raises(RemoteRejectedError):
                await conn.call("holds_ranges", ranges=bad)
    finally:
        conn.close()


async def test_peers_without_holds_ranges_are_asked_range_by_range(
    network: list[Peer], tmp_path: Path
) -> None:
    """An older peer that does not know holds_ranges still answers every range (holds),
    on the same connection."""
    result = await publish_random(network[0], tmp_path, "/old", 8, 3)
    old = next(p for p in network if p.node_id.hex() in result.ranges[0]["holders"])
    asker = next(p for p in network if p is not old)
    del old._controls["holds_ranges"]
    seen = count_probe_connections([old])
    key = result.manifest.key
    answers = await asker.replicator.probe_ranges(
        old.address, [(key, 1, 0, 7), (key, 2, 0, 7), (key, 1, 0, 3)], limit=5.0
    )
    assert answers == [True, False, True]
    assert len(seen[old.node_id]) == 1
    await crash(old)
    assert await asker.replicator.probe_ranges(old.address, [(key, 1, 0, 7)], limit=5.0) is None


async def test_a_dead_holder_is_not_tried_every_round(tmp_path: Path) -> None:
    """Once dead, a holder whose entries remain in the DHT is probed after 1, 2, 4...
    rounds, not on every round of every co-holder."""
    peers = await start_peers(tmp_path / "net", 5, repair=QUIET)
    try:
        await publish_many(peers[0], tmp_path, 1, 8)
        me = next(p for p in peers if p.replicator.holdings.all())
        asked: list[tuple[str, int]] = []
        probe = me.replicator.probe_ranges

        async def counting(
            address: tuple[str, int], queries: list[Query], *, limit: float
        ) -> list[bool] | None:
            asked.append(address)
            return await probe(address, queries, limit=limit)

        me.replicator.probe_ranges = counting  # type: ignore[method-assign]
        await rounds([me], 1)
        victim = next(p for p in peers if p is not me and p.address in asked)
        await crash(victim)
        asked.clear()
        await rounds([me], 10)
        # silent 3 times (dead), then after 1, 2 and 4 rounds: 0, 1, 2, 3, 5, 9
        assert asked.count(victim.address) == 6
    finally:
        await stop_all(peers)
