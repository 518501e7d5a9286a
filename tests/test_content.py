"""Publish, fetch, update, delete by name across real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import io
import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import client as client_module
from difs_p2p import fetch as fetch_module
from difs_p2p import segments
from difs_p2p.classgen import replace
from difs_p2p.client import Client
from difs_p2p.errors import (
    AlreadyExistsError,
    DeletedError,
    DifsError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
)
from difs_p2p.holders import (
    HolderEntry,
    build_holder_entry,
    decode_holder_entry,
    verify_holder_entry,
)
from difs_p2p.identity import Identity
from difs_p2p.names import name_key
from difs_p2p.ops import Op, ResolveReply
from difs_p2p.peer import Peer
from difs_p2p.pins import Pins
from difs_p2p.placement import range_key
from tests.helpers import client_for, peer_config, start_peers, stop_all, wait_for

SEG = 64 << 10  # small segments keep multi-segment cases fast


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 6)
    yield peers
    await stop_all(peers)


def _used(peer: Peer) -> int:
    assert peer.store is not None
    return peer.store.used


def write(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"src-{size}"
    path.write_bytes(os.urandom(size))
    return path


@pytest.mark.parametrize("size", [0, 1, SEG, 2 * SEG, 3 * SEG, SEG + 1, 20 * SEG + 7])
async def test_fetch_from_every_peer_is_byte_identical(
    network: list[Peer], tmp_path: Path, size: int
) -> None:
    """Any size (empty, 1 B, exact multiples, +1 B) round-trips through every peer."""
    src = write(tmp_path, size)
    name = f"/a.com/file-{size}.bin"
    async with client_for(network[0], publisher=Identity.generate()) as client:
        result = await client.put(src, name, segment_size=SEG)
    assert result.manifest.size == size
    for i, peer in enumerate(network):
        out = tmp_path / f"out-{i}"
        async with Client(peer.address) as client:
            fetched = await client.get(name, out)
        assert out.read_bytes() == src.read_bytes()
        assert fetched.bytes == size


async def test_non_ascii_names_and_ranges(network: list[Peer], tmp_path: Path) -> None:
    """A non-ASCII name works; a byte range fetch returns exactly those bytes."""
    src = write(tmp_path, 5 * SEG + 100)
    name = "/日本/ファイル.mp4"
    async with client_for(network[1], publisher=Identity.generate()) as client:
        await client.put(src, name, segment_size=SEG)
    data = src.read_bytes()
    async with Client(network[4].address) as client:
        for lo, hi in [(0, 0), (SEG - 1, SEG), (3, 4 * SEG + 50), (len(data) - 1, len(data) - 1)]:
            buf = io.BytesIO()
            await client.get(name, buf, byte_range=(lo, hi))
            assert buf.getvalue() == data[lo : hi + 1]


async def test_replicas_are_striped_over_peers(network: list[Peer], tmp_path: Path) -> None:
    """r copies of each range exist, on more peers than r (striping)."""
    src = write(tmp_path, 64 * SEG)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        result = await client.put(src, "/striped", segment_size=SEG, replicas=3)
    assert len(result.ranges) == 8
    assert all(len(r["holders"]) == 3 for r in result.ranges)
    assert len({h for r in result.ranges for h in r["holders"]}) > 3


async def test_placement_passes_over_full_peers_to_make_r_copies(tmp_path: Path) -> None:
    """Peers without space refuse a range; the next closest take it: r copies in all."""
    first = Peer(peer_config(tmp_path / "p0"))
    await first.start()
    peers = [first]
    try:
        for i in range(1, 6):
            capacity = 0 if i <= 2 else 1 << 30
            peer = Peer(
                peer_config(tmp_path / f"p{i}", bootstrap=(first.address,), capacity=capacity)
            )
            await peer.start()
            peers.append(peer)
        full = {p.node_id for p in peers[1:3]}
        while True:  # content whose range key is closest to a full peer, so one refuses
            data = os.urandom(4096)
            hash_list = segments.encode_hash_list([segments.segment_hash(data)])
            key = int.from_bytes(range_key(segments.hash_list_root(hash_list), 0), "big")
            nearest = min(peers[1:], key=lambda p: int.from_bytes(p.node_id, "big") ^ key)
            if nearest.node_id in full:
                break
        src = tmp_path / "src"
        src.write_bytes(data)
        async with client_for(first, publisher=Identity.generate()) as client:
            result = await client.put(src, "/placed", replicas=3)
        holders = {bytes.fromhex(h) for h in result.ranges[0]["holders"]}
        assert len(holders) == 3
        assert not holders & full
        async with Client(peers[4].address) as client:
            buf = io.BytesIO()
            await client.get("/placed", buf)
        assert buf.getvalue() == data
    finally:
        await stop_all(peers)


async def test_update_versions_and_history(network: list[Peer], tmp_path: Path) -> None:
    """Publishing again needs --update; versions link by parent/root; old ones stay fetchable."""
    me = Identity.generate()
    v1, v2 = write(tmp_path, 1000), write(tmp_path, 3 * SEG)
    async with client_for(network[0], publisher=me) as client:
        m1 = (await client.put(v1, "/v", segment_size=SEG)).manifest
        with pytest.raises(AlreadyExistsError):
            await client.put(v2, "/v", segment_size=SEG)
        m2 = (await client.put(v2, "/v", segment_size=SEG, update=True)).manifest
    assert m2.version == 2 and m2.parent == m1.hash and m2.root == m1.hash
    async with Client(network[3].address) as client:
        assert [m.version for m in await client.versions("/v")] == [1, 2]
        out = tmp_path / "old"
        await client.get("/v", out, version=1)
        assert out.read_bytes() == v1.read_bytes()
        await client.get("/v", out)
        assert out.read_bytes() == v2.read_bytes()


async def test_other_publisher_cannot_take_a_name(network: list[Peer], tmp_path: Path) -> None:
    """The first publisher owns a name; another key is refused even with --update."""
    src = write(tmp_path, 100)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/owned", segment_size=SEG)
    async with client_for(network[2], publisher=Identity.generate()) as client:
        with pytest.raises(PermissionDeniedError):
            await client.put(src, "/owned", segment_size=SEG, update=True)


async def test_racing_publishers_one_wins(network: list[Peer], tmp_path: Path) -> None:
    """Two publishers racing on one name: exactly one succeeds, the other gets an error."""
    a, b = write(tmp_path, 2000), write(tmp_path, 3000)

    async def publish(peer: Peer, src: Path) -> object:
        async with client_for(peer, publisher=Identity.generate()) as client:
            return await client.put(src, "/race", segment_size=SEG)

    results = await asyncio.gather(
        publish(network[0], a), publish(network[5], b), return_exceptions=True
    )
    errors = [r for r in results if isinstance(r, Exception)]
    assert len(errors) == 1 and isinstance(errors[0], PermissionDeniedError), results


async def test_delete_then_fetch(network: list[Peer], tmp_path: Path) -> None:
    """After rm, a fetch says the name was deleted and holders free the segments."""
    src = write(tmp_path, 10 * SEG)
    me = Identity.generate()
    async with client_for(network[0], publisher=me) as client:
        await client.put(src, "/gone", segment_size=SEG)
        used = sum(_used(p) for p in network)
        assert used >= 3 * 10 * SEG
        await client.rm("/gone")
    async with Client(network[2].address) as client:
        with pytest.raises(DeletedError):
            await client.get("/gone", tmp_path / "x")
        with pytest.raises(NotFoundError):
            await client.get("/never-published", tmp_path / "x")
    from tests.helpers import wait_for

    await wait_for(lambda: sum(_used(p) for p in network) == 0)


async def test_tampered_segment_is_fetched_from_another_holder(
    network: list[Peer], tmp_path: Path
) -> None:
    """Corrupt copies are detected and each segment comes from its one good holder."""
    src = write(tmp_path, 32 * SEG)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        published = await client.put(src, "/tamper", segment_size=SEG, replicas=3)
    data = src.read_bytes()
    damaged = 0
    for placed in published.ranges:  # every copy but the first holder's of each range
        for holder in placed["holders"][1:]:
            peer = next(p for p in network if p.node_id.hex() == holder)
            for i in range(placed["start"], placed["end"] + 1):
                h = segments.segment_hash(data[i * SEG : (i + 1) * SEG]).hex()
                path = peer.data_dir / "store" / "segments" / h[:2] / h[2:4] / h
                raw = bytearray(path.read_bytes())
                raw[100] ^= 0xFF
                path.write_bytes(bytes(raw))
                damaged += 1
    assert damaged >= 32
    async with Client(network[3].address) as client:
        out = tmp_path / "out"
        result = await client.get("/tamper", out)
    assert out.read_bytes() == src.read_bytes()
    assert result.retries >= 1


async def test_small_object_fails_over_from_a_damaged_holder(
    network: list[Peer], tmp_path: Path
) -> None:
    """A one-segment object (one worker at a time) moves on from holder to holder while
    their copies are damaged."""
    src = write(tmp_path, 4096)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/small", replicas=3)
    async with Client(network[3].address) as client:
        holders = (await client.resolve("/small")).holders
        addresses = list(dict.fromkeys((h.host, h.port) for h in holders))
        assert len(addresses) == 3
        for peer in network:
            if peer.address in addresses[:-1]:  # all but the last holder asked
                for path in (peer.data_dir / "store" / "segments").glob("*/*/*"):
                    if path.stat().st_size == 4096:
                        raw = bytearray(path.read_bytes())
                        raw[7] ^= 0xFF
                        path.write_bytes(bytes(raw))
        buf = io.BytesIO()
        result = await client.get("/small", buf)
    assert buf.getvalue() == src.read_bytes()
    assert result.retries == 2


async def test_one_client_runs_operations_concurrently(network: list[Peer], tmp_path: Path) -> None:
    """Concurrent operations on one Client take turns on its entry connection; one that is
    cancelled midway leaves the client usable."""
    names = [f"/shared/{i}" for i in range(4)]
    sources = {name: write(tmp_path, 1000 + i) for i, name in enumerate(names)}
    async with client_for(network[2], publisher=Identity.generate()) as client:
        await asyncio.gather(*(client.put(sources[n], n) for n in names))
        resolved = await asyncio.gather(*(client.resolve(n) for n in names * 3))
        assert [r.manifest.name for r in resolved] == names * 3
        bufs = {n: io.BytesIO() for n in names}
        await asyncio.gather(*(client.get(n, bufs[n]) for n in names))
        assert all(bufs[n].getvalue() == sources[n].read_bytes() for n in names)

        task = asyncio.create_task(client.resolve(names[0]))
        # cancel it between its request and its reply
        await wait_for(lambda: client._conn is not None and client._conn.exchange.locked(), step=0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [(await client.resolve(n)).manifest.name for n in names] == names


async def test_concurrent_publishers_of_different_names(
    network: list[Peer], tmp_path: Path
) -> None:
    """Six publishers at once, one per peer, each name fetched back intact elsewhere."""
    files = [write(tmp_path, 3 * SEG + i) for i in range(len(network))]

    async def publish(i: int) -> None:
        async with client_for(network[i], publisher=Identity.generate()) as client:
            await client.put(files[i], f"/many/{i}", segment_size=SEG)

    await asyncio.gather(*(publish(i) for i in range(len(network))))
    for i in range(len(network)):
        async with Client(network[(i + 1) % len(network)].address) as client:
            out = tmp_path / f"many-{i}"
            await client.get(f"/many/{i}", out)
            assert out.read_bytes() == files[i].read_bytes()


async def test_fifty_mib_with_a_holder_killed_mid_fetch(
    network: list[Peer], tmp_path: Path
) -> None:
    """A 50 MiB fetch completes byte-identical when a holder dies halfway through."""
    src = write(tmp_path, 50 << 20)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        result = await client.put(src, "/big", replicas=3)
    victims = {h for r in result.ranges for h in r["holders"]} - {network[0].node_id.hex()}
    victim = next(p for p in network[1:] if p.node_id.hex() in victims)
    received = 0
    killed = asyncio.Event()

    def progress(n: int) -> None:
        nonlocal received
        received += n
        if received > 20 << 20 and not killed.is_set():
            killed.set()

    async def kill_when_halfway() -> None:
        await killed.wait()
        await victim.stop()

    fetcher = next(p for p in network if p is not victim and p is not network[0])
    killer = asyncio.create_task(kill_when_halfway())
    out = tmp_path / "big.out"
    async with Client(fetcher.address) as client:
        await client.get("/big", out, progress=progress)
    killed.set()
    await killer
    assert out.read_bytes() == src.read_bytes()


async def test_self_certifying_names_belong_to_their_key(
    network: list[Peer], tmp_path: Path
) -> None:
    """/key/<fingerprint>/... can only be published by that key, by anyone's peer."""
    owner, other = Identity.generate(), Identity.generate()
    src = write(tmp_path, 100)
    name = f"/key/{owner.fingerprint}/photo.jpg"
    async with client_for(network[1], publisher=other) as client:
        with pytest.raises(PermissionDeniedError):
            await client.put(src, name, segment_size=SEG)
    async with client_for(network[1], publisher=owner) as client:
        await client.put(src, name, segment_size=SEG)
    async with Client(network[2].address) as client:
        assert (await client.resolve(name)).manifest.publisher == owner.public_key


async def test_pinned_key_refuses_a_new_publisher(network: list[Peer], tmp_path: Path) -> None:
    """A client pins the first key it sees for a name and refuses another unless trusted."""
    first, second = Identity.generate(), Identity.generate()
    src = write(tmp_path, 100)
    pins = Pins(tmp_path / "pins.json")
    async with client_for(network[0], publisher=first) as client:
        await client.put(src, "/pinned", segment_size=SEG)
    async with Client(network[3].address, pins=pins) as client:
        await client.resolve("/pinned")
    assert pins.pinned("/pinned") == ("/pinned", first.public_key)
    # The name is taken over at the key/value peers (as Sybils next to its key could):
    # simulated by deleting the records and publishing from another key.
    key = name_key("/pinned")
    for peer in network:
        assert peer.dht is not None
        peer.dht.store._db.execute("DELETE FROM records WHERE k=?", (key,))
        peer.dht.store._db.execute("DELETE FROM entries WHERE k=?", (key,))
    async with client_for(network[0], publisher=second) as client:
        await client.put(src, "/pinned", segment_size=SEG)
    async with Client(network[3].address, pins=Pins(tmp_path / "pins.json")) as client:
        with pytest.raises(PermissionDeniedError, match="--trust"):
            await client.resolve("/pinned")
    trusted = Pins(tmp_path / "pins.json")
    trusted.pin("/pinned", second.public_key)
    async with Client(network[3].address, pins=trusted) as client:
        assert (await client.resolve("/pinned")).manifest.publisher == second.public_key


async def test_full_peer_is_a_clear_error_and_keeps_its_data(tmp_path: Path) -> None:
    """Publishing more than the entry peer can hold fails with "no space"; nothing is lost."""
    from difs_p2p.errors import CapacityError

    peers = await start_peers(tmp_path / "net", 3, capacity=6 * SEG)
    try:
        small = write(tmp_path, 2 * SEG)
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            await client.put(small, "/fits", segment_size=SEG)
            with pytest.raises(CapacityError, match="no space"):
                await client.put(write(tmp_path, 20 * SEG), "/too-big", segment_size=SEG)
        async with Client(peers[2].address) as client:
            out = tmp_path / "fits.out"
            await client.get("/fits", out)
        assert out.read_bytes() == small.read_bytes()
        assert peers[0].store is not None
        assert peers[0].store.check().corrupt == []
        assert not list((peers[0].data_dir / "store" / "tmp").iterdir())
    finally:
        await stop_all(peers)


async def test_delegated_writer_publishes_under_the_owners_prefix_until_revoked(
    network: list[Peer], tmp_path: Path
) -> None:
    """An owner lets a writer publish under a prefix, then revokes it; others stay out."""
    import time

    from difs_p2p.delegation import build_delegation

    owner, writer, stranger = Identity.generate(), Identity.generate(), Identity.generate()
    src = write(tmp_path, 100)
    prefix = f"/key/{owner.fingerprint}/blog"
    cert = build_delegation(
        owner, prefix=prefix, writer=writer.public_key, expires=time.time() + 3600
    )
    async with client_for(network[0], publisher=writer) as client:
        result = await client.put(src, f"{prefix}/post1", segment_size=SEG, delegation=cert)
    assert result.manifest.owner == owner.public_key
    assert result.manifest.publisher == writer.public_key
    async with client_for(network[0], publisher=stranger) as client:
        with pytest.raises(PermissionDeniedError):  # not the owner's namespace, no delegation
            await client.put(src, f"{prefix}/post2", segment_size=SEG)
        with pytest.raises(DifsError):  # someone else's delegation is of no use
            await client.put(src, f"{prefix}/post2", segment_size=SEG, delegation=cert)
    async with client_for(network[0], publisher=owner) as client:  # the owner may update
        await client.put(src, f"{prefix}/post1", segment_size=SEG, update=True)
    async with client_for(network[2], publisher=writer) as client:
        await client.put(src, f"{prefix}/post3", segment_size=SEG, delegation=cert)
    async with client_for(network[1], publisher=owner) as client:
        await client.revoke(prefix, writer.public_key)
    async with Client(network[3].address) as client:
        assert (await client.resolve(f"{prefix}/post1")).manifest.publisher == owner.public_key
        with pytest.raises(PermissionDeniedError, match="revoked"):
            await client.resolve(f"{prefix}/post3")


def _forged(entry: HolderEntry, port: int) -> str:
    """``entry`` moved to ``port`` on this host, its signature no longer valid (hex)."""
    forged = build_holder_entry(
        Identity.generate(),
        key=entry.key,
        version=entry.version,
        integrity=entry.integrity,
        start=0,
        end=entry.end,
        host="127.0.0.1",
        port=port,
        issued=entry.issued,
    )
    raw = bytearray(forged.raw)
    raw[-1] ^= 0x01
    return bytes(raw).hex()


@pytest.fixture
async def trap() -> AsyncIterator[tuple[int, list[int]]]:
    """A TCP port that counts the connections made to it (none may be)."""
    connections: list[int] = []

    def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        writer.close()

    server = await asyncio.start_server(accept, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1], connections
    server.close()
    await server.wait_closed()


async def test_a_fetch_checks_holder_signatures_as_it_uses_entries(
    network: list[Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Resolving checks no holder entry's signature; fetching the first segment checks
    only the entries it relies on, not every entry of the object."""
    src = write(tmp_path, 128 * segments.MIN_SEGMENT_SIZE)  # 16 stripes
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/lazy", segment_size=segments.MIN_SEGMENT_SIZE, replicas=3)
    checked: list[bytes] = []

    def counting(entry: HolderEntry) -> None:
        checked.append(entry.raw)
        verify_holder_entry(entry)

    for module in (client_module, fetch_module):
        monkeypatch.setattr(module, "verify_holder_entry", counting)
    async with Client(network[4].address) as client:
        resolved = await client.resolve("/lazy")
        assert len(resolved.entries) >= 20
        assert checked == []
        buf = io.BytesIO()
        await client.get("/lazy", buf, byte_range=(0, 99))
        assert buf.getvalue() == src.read_bytes()[:100]
        assert 1 <= len(set(checked)) <= 2
        buf = io.BytesIO()
        await client.get("/lazy", buf)
    assert buf.getvalue() == src.read_bytes()


async def test_holder_entries_with_bad_signatures_are_never_used(
    network: list[Peer], tmp_path: Path, trap: tuple[int, list[int]]
) -> None:
    """An entry peer that adds forged holder entries (first in its answer) cannot make the
    client connect to them; the fetch uses the valid entries, and fails if none is left."""
    port, connections = trap
    src = write(tmp_path, 5 * SEG)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/forged", segment_size=SEG, replicas=2)

    class Forging(Client):
        keep_valid = True

        async def _request(self, request: Op[Any], *, read_only: bool = False) -> Any:
            reply = await super()._request(request, read_only=read_only)
            if isinstance(reply, ResolveReply):
                valid = list(reply.holders)
                entry = decode_holder_entry(bytes.fromhex(valid[0]))
                holders = [_forged(entry, port)] + (valid if self.keep_valid else [])
                reply = replace(reply, holders=tuple(holders))
            return reply

    forging = Forging(network[4].address)
    async with forging:
        buf = io.BytesIO()
        await forging.get("/forged", buf)
        assert buf.getvalue() == src.read_bytes()
        assert port not in [h.port for h in (await forging.resolve("/forged")).holders]
        forging.keep_valid = False
        with pytest.raises(NotFoundError):
            await forging.get("/forged", io.BytesIO())
    assert connections == []


async def test_an_object_whose_peers_vouch_for_no_holder_is_unavailable_not_missing(
    network: list[Peer], tmp_path: Path
) -> None:
    """When the name's peers list no holder of the newest version (its holders stopped
    answering their proofs of holding), the fetch fails as a network error (the gateway's
    502, exit 9), not as a missing object: the manifest is there, its bytes are not now."""
    src = write(tmp_path, 3 * SEG)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/unvouched", segment_size=SEG, replicas=2)

    class NoHolders(Client):
        async def _request(self, request: Op[Any], *, read_only: bool = False) -> Any:
            reply = await super()._request(request, read_only=read_only)
            if isinstance(reply, ResolveReply):
                reply = replace(reply, holders=())
            return reply

    async with NoHolders(network[4].address) as client:
        assert (await client.resolve("/unvouched")).holders == []
        with pytest.raises(NetworkError, match="no holder of /unvouched is known to be live"):
            await client.get("/unvouched", io.BytesIO())


async def test_a_large_file_gets_large_segments_and_round_trips(
    network: list[Peer], tmp_path: Path
) -> None:
    """A file of LARGE_OBJECT bytes is cut into 4 MiB segments by default, and its bytes
    come back whole and in ranges across segment boundaries."""
    src = tmp_path / "large.bin"
    head, tail = os.urandom(5 << 20), os.urandom(4096)
    with src.open("wb") as fh:  # sparse in the middle: quick to write and to hash
        fh.write(head)
        fh.seek(segments.LARGE_OBJECT - len(tail))
        fh.write(tail)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        result = await client.put(src, "/a.com/large.bin", replicas=1)
    assert result.manifest.segment_size == segments.LARGE_SEGMENT_SIZE
    assert result.manifest.segment_count == segments.LARGE_OBJECT // segments.LARGE_SEGMENT_SIZE
    out = tmp_path / "out.bin"
    seg = segments.LARGE_SEGMENT_SIZE
    async with Client(network[3].address) as client:
        await client.get("/a.com/large.bin", out)
        span = io.BytesIO()
        await client.get("/a.com/large.bin", span, byte_range=(seg - 10, seg + 10))
    assert out.stat().st_size == segments.LARGE_OBJECT
    with out.open("rb") as fh:
        assert fh.read(len(head)) == head
        fh.seek(segments.LARGE_OBJECT - len(tail))
        assert fh.read() == tail
    assert span.getvalue() == head[seg - 10 : seg + 11]
