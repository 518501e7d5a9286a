"""Where a get writes and what a put reads: all-or-nothing files, streams, byte ranges."""

from __future__ import annotations

import asyncio
import io
import os
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p import segments
from difs_p2p.client import Client
from difs_p2p.errors import IntegrityError, NetworkError, UsageError
from difs_p2p.fetchplan import PlanConfig
from difs_p2p.identity import Identity
from difs_p2p.net import HOST_NETWORK
from difs_p2p.peer import Peer
from difs_p2p.ranges import ByteRange
from tests.helpers import client_for, start_peers, stop_all, wait_for

SEG = 64 << 10
OLD = b"what the file held before\n"


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 3)
    yield peers
    await stop_all(peers)


async def _publish(network: list[Peer], src: Path, name: str) -> None:
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, name, segment_size=SEG)


async def test_a_failed_get_leaves_the_file_as_it_was(network: list[Peer], tmp_path: Path) -> None:
    """A get that fails midway leaves the path's old content and no temporary file."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(20 * SEG))
    await _publish(network, src, "/io/fail")
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    out.write_bytes(OLD)
    out.chmod(0o640)

    def explode(_: int) -> None:
        raise RuntimeError("disk on fire")

    async with Client(network[1].address) as client:
        with pytest.raises(RuntimeError, match="disk on fire"):
            await client.get("/io/fail", out, progress=explode)
        assert out.read_bytes() == OLD
        assert os.listdir(out.parent) == ["copy.bin"]
        await client.get("/io/fail", out)
    assert out.read_bytes() == src.read_bytes()
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file's mode is kept
    assert os.listdir(out.parent) == ["copy.bin"]


async def test_a_cancelled_get_leaves_the_file_as_it_was(
    network: list[Peer], tmp_path: Path
) -> None:
    """Cancelling a get (as Ctrl-C does) after its first bytes keeps the old file."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(40 * SEG))
    await _publish(network, src, "/io/cancel")
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    out.write_bytes(OLD)
    async with Client(network[2].address) as client:
        task: asyncio.Task[object] | None = None

        def cancel(_: int) -> None:
            assert task is not None
            task.cancel()

        task = asyncio.create_task(client.get("/io/cancel", out, progress=cancel))
        with pytest.raises(asyncio.CancelledError):
            await task
    assert out.read_bytes() == OLD
    assert os.listdir(out.parent) == ["copy.bin"]


async def test_a_get_cancelled_while_creating_its_temporary_file_leaves_none(
    network: list[Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get cancelled while its temporary file is being created leaves no such file."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(4 * SEG))
    await _publish(network, src, "/io/create")
    out = tmp_path / "out" / "copy.bin"
    out.parent.mkdir()
    out.write_bytes(OLD)
    loop = asyncio.get_running_loop()
    loop_thread = threading.current_thread()
    real_fchmod = os.fchmod
    release, done = threading.Event(), threading.Event()
    task: asyncio.Task[object] | None = None

    def fchmod(fd: int, mode: int) -> None:
        # the cancel comes while the file exists and is given the old file's mode
        assert task is not None
        loop.call_soon_threadsafe(task.cancel)
        if threading.current_thread() is not loop_thread:
            release.wait(timeout=10)
        real_fchmod(fd, mode)
        done.set()

    monkeypatch.setattr(os, "fchmod", fchmod)
    async with Client(network[1].address) as client:
        task = asyncio.create_task(client.get("/io/create", out))
        with pytest.raises(asyncio.CancelledError):
            await task
    release.set()
    await wait_for(done.is_set)
    assert out.read_bytes() == OLD
    assert os.listdir(out.parent) == ["copy.bin"]


async def test_a_cancelled_get_closes_its_file_only_after_its_writes(
    network: list[Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get cancelled while a segment is being written keeps its fd open until the write ends."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    await _publish(network, src, "/io/slow-disk")
    real_pwrite = os.pwrite
    started, fetch_over = threading.Event(), threading.Event()
    lock = threading.Lock()
    active: list[int] = []
    stale: list[int] = []

    def slow_pwrite(fd: int, data: bytes, offset: int) -> int:
        inode = os.fstat(fd).st_ino
        with lock:
            active.append(offset)
        started.set()
        try:
            fetch_over.wait(timeout=0.5)  # a slow disk: the fetch may end meanwhile
            try:
                same = os.fstat(fd).st_ino == inode
            except OSError:
                same = False
            if not same:
                stale.append(offset)
                return len(data)
            return real_pwrite(fd, data, offset)
        finally:
            with lock:
                active.remove(offset)

    monkeypatch.setattr(os, "pwrite", slow_pwrite)
    out = tmp_path / "out"
    async with Client(network[1].address) as client:
        task = asyncio.create_task(client.get("/io/slow-disk", out))
        await wait_for(started.is_set)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        fetch_over.set()
        await wait_for(lambda: not active)
    assert stale == []
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["net", "src"]


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


async def test_a_get_cancelled_in_the_lead_head_start_closes_every_connection(
    network: list[Peer], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A get cancelled while holders wait for the lead holder's first segment closes them all."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(16 * SEG))
    async with client_for(network[0], publisher=Identity.generate()) as publisher:
        await publisher.put(src, "/io/head-start", segment_size=SEG, replicas=3)
    checked: list[int] = []

    def corrupt(expected: bytes, data: object) -> None:
        checked.append(1)
        raise IntegrityError("no copy verifies")  # the first segment never comes out

    monkeypatch.setattr(segments, "verify_segment", corrupt)
    recording = _Recording()
    config = PlanConfig(lead_head_start=3600.0)
    async with Client(network[1].address, network=recording, fetch_config=config) as client:
        task = asyncio.create_task(client.get("/io/head-start", tmp_path / "out"))
        # the client's own connection, the lead holder's and the two waiting holders'
        await wait_for(lambda: bool(checked) and recording.open() >= 4)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert recording.open() == 0


async def test_unreachable_holders_are_a_network_error(network: list[Peer], tmp_path: Path) -> None:
    """With every holder stopped, a get raises NetworkError and keeps the file."""
    src = tmp_path / "src"
    src.write_bytes(os.urandom(3 * SEG))
    async with client_for(network[0], publisher=Identity.generate()) as client:
        result = await client.put(src, "/io/gone", segment_size=SEG, replicas=1)
    # the placed holders (node IDs; the entry peer keeps a copy only if it is one)
    holders = {h for r in result.ranges for h in r["holders"]}
    entry = next(p for p in network if p.node_id.hex() not in holders)
    for peer in network:
        if peer.node_id.hex() in holders:
            await peer.stop()
    out = tmp_path / "copy.bin"
    out.write_bytes(OLD)
    async with Client(entry.address) as client:
        with pytest.raises(NetworkError):
            await client.get("/io/gone", out)
    assert out.read_bytes() == OLD
    assert sorted(os.listdir(tmp_path)) == ["copy.bin", "net", "src"]


async def test_output_paths_that_cannot_work_are_usage_errors(
    network: list[Peer], tmp_path: Path
) -> None:
    """A get into a missing directory or onto a directory, or a put of one, is refused."""
    async with client_for(network[0], publisher=Identity.generate()) as client:
        with pytest.raises(UsageError, match="does not exist"):
            await client.get("/io/x", tmp_path / "no" / "x")
        with pytest.raises(UsageError, match="is a directory"):
            await client.get("/io/x", tmp_path)
        with pytest.raises(UsageError, match="is a directory"):
            await client.put(tmp_path, "/io/dir")


async def test_put_streams_and_pipes(network: list[Peer], tmp_path: Path) -> None:
    """put takes a binary stream or a pipe, of a size known only at its end."""
    data = os.urandom(5 * SEG + 123)
    read_fd, write_fd = os.pipe()

    def feed() -> None:
        with os.fdopen(write_fd, "wb") as w:
            for i in range(0, len(data), 1000):  # short writes: reads come back short
                w.write(data[i : i + 1000])
                w.flush()

    writer = threading.Thread(target=feed)
    writer.start()
    async with client_for(network[0], publisher=Identity.generate()) as client:
        with os.fdopen(read_fd, "rb", buffering=0) as pipe:
            piped = await client.put(pipe, "/io/pipe", segment_size=SEG)
        writer.join()
        streamed = await client.put(io.BytesIO(data), "/io/stream", segment_size=SEG)
        assert piped.manifest.size == streamed.manifest.size == len(data)
        assert piped.manifest.integrity == streamed.manifest.integrity
        for name in ("/io/pipe", "/io/stream"):
            buf = io.BytesIO()
            await client.get(name, buf)
            assert buf.getvalue() == data
        tail = io.BytesIO()
        await client.get("/io/pipe", tail, byte_range=ByteRange(suffix=100))
        assert tail.getvalue() == data[-100:]
        trimmed = io.BytesIO()
        await client.get("/io/pipe", trimmed, byte_range=(len(data) - 10, len(data) + 10))
        assert trimmed.getvalue() == data[-10:]
        with pytest.raises(UsageError, match="past the end"):
            await client.get("/io/pipe", io.BytesIO(), byte_range=(len(data), len(data) + 1))
