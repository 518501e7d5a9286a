"""Replication, failure detection, repair, trimming and garbage collection."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import segments
from difs_p2p.client import Client, PublishResult
from difs_p2p.config import RepairConfig
from difs_p2p.errors import RemoteRejectedError
from difs_p2p.holdings import Query
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from difs_p2p.transfer import Connection
from tests.helpers import client_for, raw_call, start_peers, stop_all

SEG = 64 << 10


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
                request: Any,
                handler: Any = handler,
                into: list[object] = seen[p.node_id],
            ) -> Any:
                if not any(c is conn for c in into):
                    into.append(conn)
                return await handler(conn, request)

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
        reply = await raw_call(
            conn,
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
                await raw_call(conn, "holds_ranges", ranges=bad)
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
