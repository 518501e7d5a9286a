"""Chain replication on real peers: an upload announced with ``chain`` flows through each
range's holders as it arrives; a hop that dies or forwards bad bytes fails the publish
cleanly, with nothing half-published."""

from __future__ import annotations

import asyncio
import io
import os
import threading
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from difs_p2p import segments, transfer, wire
from difs_p2p.client import Client, PublishResult
from difs_p2p.control import PeerCredential
from difs_p2p.identity import Identity
from difs_p2p.names import name_key
from difs_p2p.ops import ChainRequest, PlaceRequest, RelayHop, RelayRequest, StatusRequest
from difs_p2p.peer import Peer
from difs_p2p.segments import SegmentId
from difs_p2p.transfer import Connection
from tests.helpers import client_for, peer_config, start_peers, stop_all, wait_for

SEG = 64 << 10


def random_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"src-{os.urandom(4).hex()}"
    path.write_bytes(os.urandom(size))
    return path


def seg_ids(data: bytes) -> list[bytes]:
    return [blake3.blake3(data[i : i + SEG]).digest() for i in range(0, len(data), SEG)]


def by_id(peers: list[Peer]) -> dict[str, Peer]:
    return {p.node_id.hex(): p for p in peers}


def used(peer: Peer) -> int:
    assert peer.store is not None
    return peer.store.used


async def test_a_chain_upload_with_three_replicas_lands_three_verified_copies(
    tmp_path: Path,
) -> None:
    """r = 3 through the chain: every range on three distinct peers that each store its
    segments, the entry peer stores nothing it does not hold, and the object reads back."""
    peers = await start_peers(tmp_path / "net", 5)
    try:
        entry = peers[0]
        src = random_file(tmp_path, 32 * SEG)
        async with client_for(entry, publisher=Identity.generate()) as client:
            result = await client.put(src, "/chain/three", segment_size=SEG, replicas=3)
        assert entry.service is not None and entry.service.uploads.chained == 33
        data = src.read_bytes()
        ids = seg_ids(data)
        held = set()
        for r in result.ranges:
            holders = r["holders"]
            assert len(set(holders)) == len(holders) == 3
            for node in holders:
                store = by_id(peers)[node].store
                assert store is not None
                assert all(store.has(i) for i in ids[r["start"] : r["end"] + 1])
            held.update(ids[r["start"] : r["end"] + 1] if entry.node_id.hex() in holders else [])
        assert entry.store is not None
        assert {i for i in ids if entry.store.has(i)} == held
        async with Client(peers[4].address) as reader:
            buf = io.BytesIO()
            await reader.get("/chain/three", buf)
        assert buf.getvalue() == data
    finally:
        await stop_all(peers)


async def test_a_middle_hop_killed_mid_transfer_is_replaced_and_the_publish_completes(
    tmp_path: Path,
) -> None:
    """A hop that forwards to another is stopped while segments flow: the broken chain
    is given up (every hop drops what it got) and the upload made again on chains that
    pass over the stopped peer, so every range ends with three live copies."""
    peers = await start_peers(tmp_path / "net", 5)
    entry = peers[0]
    assert entry.service is not None
    uploads = entry.service.uploads
    victim: list[Peer] = []
    try:
        src = random_file(tmp_path, 128 * SEG)
        started = asyncio.Event()

        def progress(n: int) -> None:
            started.set()

        async def put() -> PublishResult:
            async with client_for(entry, publisher=Identity.generate()) as client:
                return await client.put(
                    src, "/chain/cut", segment_size=SEG, replicas=3, progress=progress
                )

        task = asyncio.create_task(put())
        await started.wait()
        # a range whose chain has a remote hop that forwards to another remote hop
        plans = [s.plan for s in uploads._sessions.values() if s.plan is not None]
        assert plans
        middle = next(r.hops[0] for r in plans[0].ranges if len(r.hops) >= 2)
        victim.append(by_id(peers)[middle.node_id.hex()])
        await victim[0].stop()
        result = await task
        for r in result.ranges:
            assert len(set(r["holders"])) == 3
            assert victim[0].node_id.hex() not in r["holders"]
        async with Client(entry.address) as reader:
            buf = io.BytesIO()
            await reader.get("/chain/cut", buf)
        assert buf.getvalue() == src.read_bytes()
        # the broken chain's pending copies are gone from the peers that hold nothing
        for peer in peers:
            if peer is not victim[0] and not peer.replicator.holdings.all():
                await wait_for(lambda p=peer: used(p) == 0)  # type: ignore[misc]
    finally:
        await stop_all([p for p in peers if p not in victim])


async def test_a_hop_that_forwards_corrupted_bytes_is_caught_by_the_next(
    tmp_path: Path,
) -> None:
    """A hostile hop relays a segment whose bytes do not match its id: the next hop
    refuses it (INTEGRITY) and neither it nor the hop after it keeps the bytes; a good
    segment then flows through both."""
    peers = await start_peers(tmp_path / "net", 3)
    try:
        first, second = peers[1], peers[2]
        conn = await Connection.open(
            first.address, io_timeout=10.0, credential=PeerCredential(Identity.generate())
        )
        try:
            host, port = second.address
            relay = await conn.request(
                RelayRequest((RelayHop(host, port, bytes(second.node_id)),), 4 * SEG)
            )
            assert relay.ready == 1
            good = os.urandom(SEG)
            seg_id = SegmentId(blake3.blake3(good).digest())
            bad = bytes([good[0] ^ 1]) + good[1:]
            await conn.send(wire.PutSeg(request_id=1, seg_id=seg_id, data=bad))
            refused = await conn.read_frame()
            assert isinstance(refused, wire.Error) and refused.code == wire.ErrorCode.INTEGRITY
            for peer in (first, second):
                assert peer.store is not None and not peer.store.has(seg_id)
        finally:
            conn.close()
        # the chain that failed is gone; a fresh one carries a good segment through
        conn = await Connection.open(
            first.address, io_timeout=10.0, credential=PeerCredential(Identity.generate())
        )
        try:
            relay = await conn.request(
                RelayRequest((RelayHop(host, port, bytes(second.node_id)),), 4 * SEG)
            )
            await conn.send(wire.PutSeg(request_id=2, seg_id=seg_id, data=good))
            assert isinstance(await conn.read_frame(), wire.Ack)
            for peer in (first, second):
                assert peer.store is not None and peer.store.has(seg_id)
        finally:
            conn.close()
    finally:
        await stop_all(peers)


async def test_a_hop_without_room_is_replaced_before_segments_flow(tmp_path: Path) -> None:
    """r = 4 on five peers, one of them too small for a range: it refuses ``relay`` and
    every range gets its four copies on the others; the small peer stores nothing."""
    peers = await start_peers(tmp_path / "net", 4)
    small = Peer(peer_config(tmp_path / "small", bootstrap=(peers[0].address,), capacity=SEG))
    await small.start()
    try:
        dht = peers[0].dht
        assert dht is not None
        await wait_for(lambda: len(dht.contacts()) >= 4)
        src = random_file(tmp_path, 32 * SEG)
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            result = await client.put(src, "/chain/room", segment_size=SEG, replicas=4)
        assert all(len(set(r["holders"])) == 4 for r in result.ranges)
        assert small.node_id.hex() not in {h for r in result.ranges for h in r["holders"]}
        assert used(small) == 0
    finally:
        await stop_all([*peers, small])


async def test_an_entry_peer_without_chain_takes_the_upload_and_places_it(
    tmp_path: Path,
) -> None:
    """Against an entry peer that predates ``chain`` (UNSUPPORTED), the client uploads
    and places as before: r copies, nothing forwarded along a chain."""
    peers = await start_peers(tmp_path / "net", 4)
    try:
        entry = peers[0]
        assert entry.service is not None
        del entry.service.controls["chain"]
        src = random_file(tmp_path, 16 * SEG)
        async with client_for(entry, publisher=Identity.generate()) as client:
            result = await client.put(src, "/chain/old", segment_size=SEG, replicas=2)
        assert entry.service.uploads.chained == 0
        assert all(len(set(r["holders"])) == 2 for r in result.ranges)
    finally:
        await stop_all(peers)


async def test_a_peer_without_relay_is_passed_over(tmp_path: Path) -> None:
    """A peer that predates ``relay`` answers UNSUPPORTED when a chain is set up: it is
    replaced like a refusal and holds none of the copies."""
    peers = await start_peers(tmp_path / "net", 5)
    try:
        old = peers[3]
        assert old.service is not None
        del old.service.controls["relay"]
        src = random_file(tmp_path, 32 * SEG)
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            result = await client.put(src, "/chain/mixed", segment_size=SEG, replicas=3)
        assert all(len(set(r["holders"])) == 3 for r in result.ranges)
        assert old.node_id.hex() not in {h for r in result.ranges for h in r["holders"]}
        assert used(old) == 0
    finally:
        await stop_all(peers)


async def test_chains_waiting_for_the_rest_of_a_long_upload_are_kept_alive(
    tmp_path: Path,
) -> None:
    """Peers close connections idle for 1 s: the chains of ranges sent early are kept
    alive (a ``relay`` again) while the upload pauses for 3 s, so place still finds every
    copy."""
    peers = await start_peers(tmp_path / "net", 4, idle_timeout=1.0)
    try:
        entry = peers[0]
        data = os.urandom(32 * SEG)
        ids = [SegmentId(i) for i in seg_ids(data)]
        name = "/chain/slow"
        key = name_key(name)
        count, stripes = 32, segments.default_stripes(32)
        async with client_for(entry, publisher=Identity.generate()) as client:
            conn = await client._data_conn()
            await conn.request(ChainRequest(key, 1, count, SEG, stripes, 3))

            async def put(i: int, seg_id: SegmentId, chunk: bytes) -> None:
                await conn.send(wire.PutSeg(request_id=i, seg_id=seg_id, data=chunk))
                assert isinstance(await conn.read_frame(), wire.Ack)

            for i in range(8):  # the first range
                await put(i, ids[i], data[i * SEG : (i + 1) * SEG])
            for _ in range(10):  # a pause longer than the idle time; this link stays busy
                await conn.request(StatusRequest())
                await asyncio.sleep(0.3)
            for i in range(8, count):
                await put(i, ids[i], data[i * SEG : (i + 1) * SEG])
            hash_list = segments.encode_hash_list(ids)
            root = segments.hash_list_root(hash_list)
            await put(count, root, hash_list)
            placed = await conn.request(PlaceRequest(key, 1, root, count, stripes, 3))
        assert [len(set(r.holders)) for r in placed.ranges] == [3] * stripes
    finally:
        await stop_all(peers)


async def test_a_paused_downstream_hop_stops_the_upload_at_the_window(tmp_path: Path) -> None:
    """Every hop's writes are held back, so no segment is acknowledged: the entry peer
    reads no more of the client's pipeline than its upload window holds, no peer's
    connection ever holds more than the window, and the publish completes once released."""
    frame = SEG + 32  # a PUT_SEG payload: segment id and bytes
    window = 3 * frame + 100
    loop = asyncio.get_running_loop()
    loop.set_default_executor(ThreadPoolExecutor(32))  # held writes must not starve the rest
    peers = await start_peers(tmp_path / "net", 5, upload_window=window)
    entry = peers[0]
    assert entry.service is not None
    release = threading.Event()
    held: list[bytes] = []
    try:
        for peer in peers[1:]:
            store = peer.store
            assert store is not None

            def put_grouped(seg_id: bytes, *args: Any, _put: Any = store.put_grouped) -> bool:
                held.append(seg_id)
                release.wait()
                return bool(_put(seg_id, *args))

            store.put_grouped = put_grouped  # type: ignore[method-assign,assignment]
        src = random_file(tmp_path, 32 * SEG)

        async def put() -> PublishResult:
            async with client_for(entry, publisher=Identity.generate()) as client:
                return await client.put(src, "/chain/window", segment_size=SEG, replicas=3)

        task = asyncio.create_task(put())
        # the first hop holds the window's three segments, none of them acknowledged
        await wait_for(lambda: len(held) >= 3)
        assert entry.service.uploads.chained <= 3
        for peer in peers:
            assert peer.service is not None
            assert peer.service.window_peak <= window
        release.set()
        result = await task
        assert all(len(set(r["holders"])) == 3 for r in result.ranges)
        assert all(p.service is not None and p.service.window_peak <= window for p in peers)
    finally:
        release.set()
        await stop_all(peers)


async def test_a_connection_waiting_for_its_next_frame_keeps_no_segment_buffer(
    tmp_path: Path,
) -> None:
    """Once an upload is answered nothing keeps its receive buffer: a connection left open
    (as a chain waiting for ``place``) holds no segment in memory."""
    peers = await start_peers(tmp_path, 1)
    tracemalloc.start()
    try:
        conn = await Connection.open(
            peers[0].address, io_timeout=10, credential=PeerCredential(Identity.generate())
        )
        try:
            data = os.urandom(4 << 20)
            seg_id = SegmentId(blake3.blake3(data).digest())
            await conn.send(wire.PutSeg(request_id=1, seg_id=seg_id, data=data))
            assert isinstance(await conn.read_frame(), wire.Ack)
            only = [tracemalloc.Filter(True, transfer.__file__)]

            def buffers() -> int:
                traces = tracemalloc.take_snapshot().filter_traces(only).traces
                return sum(1 for t in traces if t.size >= len(data))

            await wait_for(lambda: buffers() == 0)
        finally:
            conn.close()
    finally:
        tracemalloc.stop()
        await stop_all(peers)
