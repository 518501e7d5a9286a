"""An object read as an async iterator of verified chunks: whole, spans, versions,
backpressure, closing, holders failing and lying, on real peers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import os
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p import segments
from difs_p2p.client import Client
from difs_p2p.errors import DeletedError, IntegrityError, NetworkError, NotFoundError, UsageError
from difs_p2p.fetchrun import Chunks, closed_by_peer
from difs_p2p.identity import Identity
from difs_p2p.net import HOST_NETWORK
from difs_p2p.peer import Peer
from difs_p2p.stream import STREAM_BUFFER, ObjectStream, window_for
from tests.helpers import client_for, start_peers, stop_all, wait_for

SEG = 64 << 10


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 3)
    yield peers
    await stop_all(peers)


class _Recording:
    """The host's sockets, each one kept in a list (to see which are closed)."""

    def __init__(self) -> None:
        self.sockets: list[socket.socket] = []

    async def connect(self, address: tuple[str, int]) -> socket.socket:
        sock = await HOST_NETWORK.connect(address)
        self.sockets.append(sock)
        return sock

    def open(self) -> int:
        return sum(s.fileno() != -1 for s in self.sockets)

    def open_to(self) -> set[tuple[str, int]]:
        """The addresses of the sockets still open."""
        return {s.getpeername()[:2] for s in self.sockets if s.fileno() != -1}


async def _publish(
    peer: Peer,
    name: str,
    data: bytes,
    *,
    segment_size: int = SEG,
    replicas: int = 2,
    publisher: Identity | None = None,
    update: bool = False,
) -> dict[str, object]:
    """Publish ``data``; the placed ranges (with the holders' node IDs)."""
    async with client_for(peer, publisher=publisher or Identity.generate()) as client:
        result = await client.put(
            _source(peer, data), name, segment_size=segment_size, replicas=replicas, update=update
        )
    return {"ranges": result.ranges}


def _source(peer: Peer, data: bytes) -> Path:
    path = peer.data_dir.parent / f"src-{os.urandom(4).hex()}"
    path.write_bytes(data)
    return path


def _fetch_tasks() -> int:
    """Running tasks of the client's fetch path (the peers' tasks share the loop)."""
    ours = tuple(f"/difs_p2p/{m}.py" for m in ("fetch", "fetchrun", "stream"))
    names = [getattr(t.get_coro(), "cr_code", None) for t in asyncio.all_tasks()]
    return sum(code is not None and code.co_filename.endswith(ours) for code in names)


async def _read(stream: ObjectStream) -> bytes:
    return b"".join([bytes(chunk) async for chunk in stream])


def _holders(ranges: object, network: list[Peer]) -> list[Peer]:
    assert isinstance(ranges, list)
    ids = {h for r in ranges for h in r["holders"]}
    return [p for p in network if p.node_id.hex() in ids]


@pytest.mark.parametrize(
    ("segment_size", "window"),
    [
        (4096, 64),  # STREAM_WINDOW segments hold less than the byte bound
        (SEG, 64),
        (1 << 20, 16),  # 16 MiB of 1 MiB segments
        (STREAM_BUFFER, 1),
        (2 * STREAM_BUFFER, 1),  # at least one segment, however large
    ],
)
def test_window_for_bounds_segments_and_bytes(segment_size: int, window: int) -> None:
    """The stream window is the smaller of STREAM_WINDOW segments and 16 MiB, at least 1."""
    assert window_for(segment_size) == window


async def test_chunks_hand_pieces_over_in_order_and_move_the_window() -> None:
    """Pieces come out in the order put, read-only; each take moves the fetch's window."""
    chunks = Chunks(window=2)
    moves: list[int] = []
    chunks.moved = lambda: moves.append(chunks.taken)
    assert chunks.take() is None and chunks.first_at == 0.0
    for piece in (b"ab", b"cd", b"e"):
        chunks.put(memoryview(bytearray(piece)))
    assert chunks.changed.is_set() and chunks.first_at > 0
    taken = [chunks.take() for _ in range(4)]
    assert [bytes(t) for t in taken if t is not None] == [b"ab", b"cd", b"e"]
    assert taken[3] is None
    assert all(t.readonly for t in taken if t is not None)
    assert moves == [1, 2, 3]
    with pytest.raises(ValueError):
        Chunks(window=0)


def test_closed_by_peer_tells_a_closed_connection_from_an_idle_one() -> None:
    """Idle: no; bytes waiting: no (and they stay); the other end closed or reset: yes."""
    a, b = socket.socketpair()
    a.setblocking(False)
    try:
        assert not closed_by_peer(a)
        b.send(b"x")
        assert not closed_by_peer(a)
        assert a.recv(1) == b"x"
        b.close()
        assert closed_by_peer(a)
    finally:
        a.close()
    assert closed_by_peer(a)  # our own end closed


@pytest.mark.parametrize("size", [0, 1, SEG, 3 * SEG, 20 * SEG + 7])
async def test_a_stream_yields_the_published_bytes(network: list[Peer], size: int) -> None:
    """Empty, one short segment, one full, several, and a short last one: same bytes."""
    data = os.urandom(size)
    await _publish(network[0], "/s/whole", data)
    async with (
        Client(network[1].address) as client,
        await client.open_stream("/s/whole") as stream,
    ):
        assert (stream.first, stream.last, stream.length) == (0, size - 1, size)
        assert stream.manifest.size == size
        got = await _read(stream)
        assert got == data
        assert stream.first_byte > 0 or size == 0
        assert stream.result is not None and stream.result.bytes == size
    async with Client(network[2].address) as client:
        assert b"".join([bytes(c) async for c in client.stream("/s/whole")]) == data


@pytest.mark.parametrize(
    ("first", "last"),
    [
        (0, SEG - 1),  # the first segment only
        (SEG - 10, SEG + 9),  # across a segment boundary
        (5 * SEG + 99, 5 * SEG + 99),  # the last byte
        (7, 3 * SEG),  # inside the first, into the last
    ],
)
async def test_a_span_yields_exactly_its_bytes(network: list[Peer], first: int, last: int) -> None:
    """A span yields bytes first..last inclusive, nothing before or after, in chunks that
    hold no buffer much larger than themselves."""
    data = os.urandom(5 * SEG + 100)
    await _publish(network[0], "/s/span", data)
    async with (
        Client(network[2].address) as client,
        await client.open_stream("/s/span", span=(first, last)) as stream,
    ):
        assert stream.length == last - first + 1
        chunks = [chunk async for chunk in stream]
        assert b"".join(chunks) == data[first : last + 1]
        # a small piece of a segment is copied: a chunk never keeps a much larger buffer
        assert all(len(c.obj) <= 2 * len(c) for c in chunks)  # type: ignore[arg-type]


async def test_stream_takes_http_ranges_and_open_stream_checks_spans(
    network: list[Peer],
) -> None:
    """stream() trims an HTTP range; open_stream refuses a span outside the object."""
    data = os.urandom(2 * SEG + 5)
    await _publish(network[0], "/s/ranges", data)
    async with Client(network[1].address) as client:
        got = b"".join([bytes(c) async for c in client.stream("/s/ranges", (SEG, 10 * SEG))])
        assert got == data[SEG:]
        resolved = await client.resolve("/s/ranges")
        for span in [(5, 4), (-1, 3), (0, len(data)), (len(data), len(data))]:
            with pytest.raises(UsageError):
                await client.open_stream(resolved, span=span)
        with pytest.raises(UsageError):
            async for _ in client.stream("/s/ranges", (len(data), len(data) + 9)):
                pass


async def test_a_stream_reads_an_older_version_and_refuses_missing_names(
    network: list[Peer],
) -> None:
    """version=N streams that version; unknown and deleted names raise from open_stream."""
    owner = Identity.generate()
    old, new = os.urandom(3 * SEG), os.urandom(SEG + 1)
    await _publish(network[0], "/s/versions", old, publisher=owner)
    await _publish(network[0], "/s/versions", new, publisher=owner, update=True)
    async with Client(network[1].address) as client:
        stream = await client.open_stream("/s/versions", version=1)
        assert stream.manifest.version == 1
        assert await _read(stream) == old
        stream = await client.open_stream("/s/versions")
        assert (stream.manifest.version, await _read(stream)) == (2, new)
        with pytest.raises(NotFoundError):
            await client.open_stream("/s/nothing-here")
    async with client_for(network[0], publisher=owner) as publisher:
        await publisher.rm("/s/versions")
    async with Client(network[2].address) as client:
        with pytest.raises(DeletedError):
            await client.open_stream("/s/versions")


async def test_a_reader_that_stops_reading_stops_the_fetch(network: list[Peer]) -> None:
    """With one chunk read of 64 MiB, the fetch stops within its window; then all is read."""
    data = os.urandom(64 << 20)
    await _publish(network[0], "/s/big", data, segment_size=1 << 20, replicas=1)
    async with (
        Client(network[1].address) as client,
        await client.open_stream("/s/big") as stream,
    ):
        bound = (1 + stream.window) * ((1 << 20) + 64)  # what it may hold, with headers
        first = bytes(await anext(stream))
        seen: list[int] = []

        def idle() -> bool:
            seen.append(stream.received)
            return len(seen) > 10 and len(set(seen[-10:])) == 1

        await wait_for(idle, step=0.01)
        assert 0 < stream.received <= bound
        assert stream.received <= STREAM_BUFFER + 2 * (1 << 20)
        rest = await _read(stream)
        assert first + rest == data


async def test_aclose_mid_stream_frees_everything(network: list[Peer]) -> None:
    """Closing a stream midway closes its holder connections and ends its tasks; the
    peers serve the next reader."""
    data = os.urandom(48 * SEG)
    await _publish(network[0], "/s/close", data, replicas=3)
    recording = _Recording()
    async with Client(network[1].address, network=recording) as client:
        resolved = await client.resolve("/s/close")
        connections = recording.open()
        stream = await client.open_stream(resolved)
        assert bytes(await anext(stream)) == data[:SEG]
        assert recording.open() > connections
        assert _fetch_tasks() > 0
        await stream.aclose()
        assert recording.open() == connections
        assert _fetch_tasks() == 0
        with pytest.raises(UsageError, match="closed"):
            await anext(stream)
        await stream.aclose()  # again: nothing happens
        # breaking out of stream() closes it too
        chunks = client.stream(resolved)
        async for _ in chunks:
            break
        await chunks.aclose()  # type: ignore[attr-defined]
        assert recording.open() == connections
        assert _fetch_tasks() == 0
    async with Client(network[2].address) as other:
        assert await _read(await other.open_stream("/s/close")) == data


async def test_a_holder_lost_mid_stream_is_replaced_by_another_copy(network: list[Peer]) -> None:
    """A stream whose holder stops after the first chunk completes from the other copies."""
    data = os.urandom(400 * SEG)  # past the window: the rest is fetched after the stop
    placed = await _publish(network[0], "/s/failover", data, replicas=2)
    async with (
        Client(network[0].address) as client,
        await client.open_stream("/s/failover") as stream,
    ):
        got = [bytes(await anext(stream))]
        victim = next(p for p in _holders(placed["ranges"], network) if p is not network[0])
        await victim.stop()
        got.extend([bytes(c) async for c in stream])
        assert stream.result is not None and victim.address in stream.result.gave_up
    assert b"".join(got) == data


async def test_every_holder_lost_mid_stream_is_an_error_after_correct_chunks(
    network: list[Peer],
) -> None:
    """With every copy gone mid-stream, __anext__ raises; what came before is correct."""
    data = os.urandom(200 * SEG)
    placed = await _publish(network[0], "/s/lost", data, replicas=1)
    holders = _holders(placed["ranges"], network)
    got: list[bytes] = []
    async with (
        Client(network[0].address) as client,
        await client.open_stream("/s/lost") as stream,
    ):
        got.append(bytes(await anext(stream)))
        for peer in holders:
            await peer.stop()
        with pytest.raises(NetworkError, match="could not be fetched"):
            async for chunk in stream:
                got.append(bytes(chunk))
    received = b"".join(got)
    assert 0 < len(received) < len(data)
    assert received == data[: len(received)]


async def test_a_corrupt_segment_is_never_yielded(network: list[Peer]) -> None:
    """A segment damaged on its only holder ends the stream with an error before it."""
    data = os.urandom(12 * SEG)
    placed = await _publish(network[0], "/s/corrupt", data, replicas=1)
    damaged = 5
    digest = segments.segment_hash(data[damaged * SEG : (damaged + 1) * SEG]).hex()
    for peer in _holders(placed["ranges"], network):
        path = peer.data_dir / "store" / "segments" / digest[:2] / digest[2:4] / digest
        if path.exists():
            raw = bytearray(path.read_bytes())
            raw[100] ^= 0xFF
            path.write_bytes(bytes(raw))
            break
    else:
        raise AssertionError("no holder has the segment")
    got: list[bytes] = []
    async with (
        Client(network[1].address) as client,
        await client.open_stream("/s/corrupt") as stream,
    ):
        with pytest.raises((IntegrityError, NetworkError)):
            async for chunk in stream:
                got.append(bytes(chunk))
    assert b"".join(got) == data[: damaged * SEG]


def _closed_by_holder(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


async def test_a_reader_paused_past_the_holders_idle_time_still_gets_everything(
    tmp_path: Path,
) -> None:
    """Holders close the connections of a stream whose reader paused; the fetch connects
    again when the reader goes on."""
    peers = await start_peers(tmp_path / "net", 3, idle_timeout=0.3)
    try:
        data = os.urandom(100 * SEG)
        await _publish(peers[0], "/s/paused", data, replicas=2)
        recording = _Recording()
        async with Client(peers[1].address, network=recording) as client:
            resolved = await client.resolve("/s/paused")
            entry = recording.open()
            async with await client.open_stream(resolved) as stream:
                got = [bytes(await anext(stream))]
                holders = recording.sockets[entry:]
                await wait_for(
                    lambda: all(_closed_by_holder(s) for s in holders if s.fileno() != -1)
                )
                got.extend([bytes(c) async for c in stream])
        assert b"".join(got) == data
    finally:
        await stop_all(peers)


async def test_a_stream_dropped_without_closing_stops_its_fetch(network: list[Peer]) -> None:
    """A stream its reader drops unclosed cancels its fetch: connections and tasks end."""
    data = os.urandom(100 * SEG)
    await _publish(network[0], "/s/dropped", data, replicas=2)
    recording = _Recording()
    async with Client(network[1].address, network=recording) as client:
        resolved = await client.resolve("/s/dropped")
        entry = recording.open()
        stream = await client.open_stream(resolved)
        assert bytes(await anext(stream)) == data[:SEG]
        del stream
        gc.collect()
        await wait_for(lambda: recording.open() == entry and _fetch_tasks() == 0)


async def test_holders_unreachable_raise_from_open_stream(network: list[Peer]) -> None:
    """With every holder stopped, open_stream raises NetworkError and leaves nothing open."""
    placed = await _publish(network[0], "/s/unreachable", os.urandom(3 * SEG), replicas=1)
    holders = _holders(placed["ranges"], network)
    entry = next(p for p in network if p not in holders)
    for peer in holders:
        await peer.stop()
    recording = _Recording()
    async with Client(entry.address, network=recording) as client:
        with pytest.raises(NetworkError):
            await client.open_stream("/s/unreachable")
        # only the entry peer's connections (the resolve's and the claim lookup's)
        assert recording.open_to() == {entry.address}
        assert _fetch_tasks() == 0


async def test_corrupt_copies_are_replaced_by_good_ones_before_they_are_yielded(
    network: list[Peer],
) -> None:
    """Every copy on one holder of each range damaged: the stream yields the good bytes."""
    data = os.urandom(32 * SEG)
    placed = await _publish(network[0], "/s/tampered", data, replicas=2)
    ranges = placed["ranges"]
    assert isinstance(ranges, list)
    damaged = 0
    for placed_range in ranges:
        peer = next(p for p in network if p.node_id.hex() == placed_range["holders"][0])
        for i in range(placed_range["start"], placed_range["end"] + 1):
            digest = segments.segment_hash(data[i * SEG : (i + 1) * SEG]).hex()
            path = peer.data_dir / "store" / "segments" / digest[:2] / digest[2:4] / digest
            raw = bytearray(path.read_bytes())
            raw[100] ^= 0xFF
            path.write_bytes(bytes(raw))
            damaged += 1
    assert damaged == 32
    async with (
        Client(network[1].address) as client,
        await client.open_stream("/s/tampered") as stream,
    ):
        assert await _read(stream) == data
        assert stream.result is not None and stream.result.retries >= 1


async def test_a_resolve_after_the_entry_peer_closed_the_idle_connection_connects_again(
    tmp_path: Path,
) -> None:
    """The entry peer closes a client's idle connection (its idle time); the client's next
    resolve is sent again on a new connection instead of failing."""
    peers = await start_peers(tmp_path / "net", 2, idle_timeout=0.3)
    try:
        await _publish(peers[0], "/s/idle", os.urandom(3 * SEG), replicas=1)
        recording = _Recording()
        async with Client(peers[1].address, network=recording) as client:
            first = await client.resolve("/s/idle")
            entry = recording.sockets[0]
            await wait_for(lambda: _closed_by_holder(entry))
            again = await client.resolve("/s/idle")
        assert again.manifest.raw == first.manifest.raw
        assert len(recording.sockets) == 2
    finally:
        await stop_all(peers)
