"""Replication, failure detection, repair, trimming and garbage collection."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import segments
from difs_p2p.client import Client
from difs_p2p.errors import UsageError
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest
from difs_p2p.peer import Peer
from difs_p2p.repair import (
    Action,
    FailureDetector,
    Health,
    TokenBucket,
    gc_due,
    keys_for_round,
    plan_range,
    round_phase,
)
from difs_p2p.transfer import Connection
from tests.helpers import start_peers, stop_all

SEG = 64 << 10


def ids(*values: int) -> list[bytes]:
    return [v.to_bytes(20, "big") for v in values]


def test_plan_range_leader_repairs_and_far_copies_trim() -> None:
    """Only the live holder closest to the key repairs; extra far copies trim themselves."""
    key = (0).to_bytes(20, "big")
    a, b, c, d = ids(1, 2, 3, 4)
    assert plan_range(a, key, [a, b], 3, True) == (Action.REPAIR, 1)
    assert plan_range(b, key, [a, b], 3, True) == (Action.NONE, 0)
    assert plan_range(d, key, [a, b, c, d], 3, True) == (Action.TRIM, 0)
    assert plan_range(d, key, [a, b, c, d], 3, False) == (Action.NONE, 0)
    assert plan_range(c, key, [a, b, c, d], 3, True) == (Action.NONE, 0)


def test_failure_detector_tells_suspect_from_dead() -> None:
    detector = FailureDetector(dead_after=3)
    peer = b"p" * 20
    assert detector.record(peer, False) is Health.SUSPECT
    assert detector.record(peer, False) is Health.SUSPECT
    assert detector.record(peer, True, 1.5) is Health.ALIVE  # slow, not dead
    for _ in range(3):
        state = detector.record(peer, False)
    assert state is Health.DEAD


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
            b"k" * 20,
            version,
            None,
            None,
            0,
            4096,
            0,
            0,
            0,
            "0" * 64,
            deleted,
            0.0,
            b"p" * 32,
            b"",
        )

    assert gc_due(1, manifest(2, True), keep=3)
    assert not gc_due(1, manifest(3, False), keep=3)
    assert gc_due(1, manifest(4, False), keep=3)
    assert not gc_due(1, None, keep=3)


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
        if p.holdings.covers_integrity(integrity, start, end):
            count += 1
    return count


async def rounds(peers: list[Peer], n: int) -> None:
    for _ in range(n):
        for p in peers:
            if p.server is not None and p.maintainer is not None:
                await p.maintainer.round()


async def test_repair_restores_r_copies_after_two_crashes(
    network: list[Peer], tmp_path: Path
) -> None:
    """Two holders crash; after dead_after rounds every range has r live copies again."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(40 * SEG))
    async with Client(network[0].address, publisher=Identity.generate()) as client:
        result = await client.put(src, "/durable", segment_size=SEG, replicas=3)
    integrity = bytes.fromhex(result.manifest.integrity)
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
    assert out.read_bytes() == src.read_bytes()


async def test_extra_copies_are_trimmed(network: list[Peer], tmp_path: Path) -> None:
    """A range copied to more than r peers goes back to r after a maintenance round."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    async with Client(network[0].address, publisher=Identity.generate()) as client:
        result = await client.put(src, "/trim", segment_size=SEG, replicas=2)
    integrity = bytes.fromhex(result.manifest.integrity)
    holders = set(result.ranges[0]["holders"])
    extra = next(p for p in network if p.node_id.hex() not in holders)
    entry = await network[0].push_range(
        extra.address, result.manifest.key, 1, integrity, 0, result.manifest.segment_count - 1
    )
    await network[0].dht_node().add_entries(result.manifest.key, [entry.raw])
    assert live_copies(network, integrity, 0, 7) == 3
    await rounds(network, 2)
    assert live_copies(network, integrity, 0, 7) == 2


async def test_holder_down_during_delete_frees_segments_on_return(
    network: list[Peer], tmp_path: Path
) -> None:
    """A holder offline during rm frees the deleted name's segments when it comes back."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    me = Identity.generate()
    async with Client(network[0].address, publisher=me) as client:
        result = await client.put(src, "/gc", segment_size=SEG, replicas=3)
    holder_id = next(h for h in result.ranges[0]["holders"] if h != network[0].node_id.hex())
    index = next(i for i, p in enumerate(network) if p.node_id.hex() == holder_id)
    away = network[index]
    used_before = away.store.used  # type: ignore[union-attr]
    assert used_before >= 8 * SEG
    await away.stop()
    async with Client(network[0].address, publisher=me) as client:
        await client.rm("/gc")
    back = Peer(away.config)
    await back.start()
    network[index] = back
    assert back.store is not None and back.store.used == used_before  # nothing lost offline
    await rounds([back], 1)
    assert back.store.used == 0


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


async def test_holds_ranges_answers_each_range_in_order(
    network: list[Peer], tmp_path: Path
) -> None:
    """The batched probe: one answer per range, in order; malformed ranges are refused."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    async with Client(network[0].address, publisher=Identity.generate()) as client:
        result = await client.put(src, "/probe", segment_size=SEG, replicas=3)
    key = result.manifest.key.hex()
    conn = await Connection.open(network[0].address, io_timeout=5)
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
            with pytest.raises(UsageError):
                await conn.call("holds_ranges", ranges=bad)
    finally:
        conn.close()


async def test_peers_without_holds_ranges_are_asked_range_by_range(
    network: list[Peer], tmp_path: Path
) -> None:
    """An older peer that does not know holds_ranges still answers every range (holds),
    on the same connection."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    async with Client(network[0].address, publisher=Identity.generate()) as client:
        result = await client.put(src, "/old", segment_size=SEG, replicas=3)
    old = network[0]
    del old._controls["holds_ranges"]
    seen = count_probe_connections([old])
    key = result.manifest.key
    answers = await network[1].probe_ranges(
        old.address, [(key, 1, 0, 7), (key, 2, 0, 7), (key, 1, 0, 3)], limit=5.0
    )
    assert answers == [True, False, True]
    assert len(seen[old.node_id]) == 1
    await crash(old)
    assert await network[1].probe_ranges(old.address, [(key, 1, 0, 7)], limit=5.0) is None
