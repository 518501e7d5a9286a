"""Fetches around holders that stall: real ``difs-peer`` processes, one of them paused."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import wire
from difs_p2p.classgen import replace
from difs_p2p.client import Client
from difs_p2p.config import parse_hostport
from difs_p2p.control import read_token_file
from difs_p2p.errors import NetworkError
from difs_p2p.fetchplan import PlanConfig
from difs_p2p.holders import build_holder_entry, decode_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.ops import Op, ResolveReply
from difs_p2p.transfer import BufferPool
from tests.helpers import client_for, start_peer_process, start_peers, stop_all

BIN = Path(sys.executable).parent
SEG = 64 << 10
# An I/O timeout no fetch may rely on: a fetch that waits for a paused holder never ends.
FOREVER = 3600.0


def start_peer(data: Path, *extra: str) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc, address = start_peer_process(data, *extra, stderr=subprocess.DEVNULL)
    return proc, parse_hostport(address)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[str], tuple[str, int]]]]:
    """Four peer processes, all bootstrapped from the first; stopped (and resumed) after."""
    started: list[tuple[subprocess.Popen[str], tuple[str, int]]] = []
    try:
        started.append(start_peer(tmp_path / "p0"))
        seed = f"{started[0][1][0]}:{started[0][1][1]}"
        for i in range(1, 4):
            started.append(start_peer(tmp_path / f"p{i}", "--bootstrap", seed))
        yield started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc, _ in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_paused_holder_does_not_hold_up_a_fetch(
    processes: list[tuple[subprocess.Popen[str], tuple[str, int]]], tmp_path: Path
) -> None:
    """With one holder stopped (SIGSTOP) and two others of every range up, a fetch to a file
    and one to a stream return the exact bytes without waiting for it (what it owed was
    asked of the others) and report progress for every segment."""
    entry = processes[0][1]
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * SEG))
    token = read_token_file(tmp_path / "p0" / "control.token")
    async with Client(entry, publisher=Identity.generate(), token=token) as client:
        await client.put(src, "/stall/video", segment_size=SEG, replicas=3)
        resolved = await client.resolve("/stall/video")
    holders = {(h.host, h.port) for h in resolved.holders}
    proc, paused = next((p, a) for p, a in processes[1:] if a in holders)
    proc.send_signal(signal.SIGSTOP)
    out = tmp_path / "out"
    progressed: list[int] = []
    async with asyncio.timeout(120):  # only a guard: a fetch that waits never ends
        async with Client(entry, io_timeout=FOREVER) as client:
            result = await client.get("/stall/video", out, progress=progressed.append)
            stream = io.BytesIO()
            streamed = await client.get("/stall/video", stream)
    assert stopped(proc.pid), "the holder was paused during both fetches"
    assert out.read_bytes() == src.read_bytes()
    assert stream.getvalue() == src.read_bytes()
    assert sum(progressed) == len(src.read_bytes()) and len(progressed) == 256
    for fetched in (result, streamed):
        assert paused in fetched.late
        assert fetched.hedged >= 1


async def test_a_range_only_a_silent_holder_claims_fails_after_its_derived_give_up(
    tmp_path: Path,
) -> None:
    """When the only holder listed for a range accepts and never answers, the fetch gives it
    up after the plan's give-up time (not the connection's I/O timeout) and fails clearly."""
    peers = await start_peers(tmp_path / "net", 4)
    silent_conns: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent_conns.append(writer)
        with contextlib.suppress(OSError):
            while await reader.read(65536):
                pass

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(64 * SEG))
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            await client.put(src, "/stall/lonely", segment_size=SEG, replicas=2)
        first, last = 56, 63  # the last of 8 ranges of 8 segments

        class OnlySilentForTheEnd(Client):
            async def _request(self, request: Op[Any], *, read_only: bool = False) -> Any:
                reply = await super()._request(request, read_only=read_only)
                if isinstance(reply, ResolveReply):
                    kept = [
                        h for h in reply.holders if decode_holder_entry(bytes.fromhex(h)).end < last
                    ]
                    entry = decode_holder_entry(bytes.fromhex(kept[0]))
                    false = build_holder_entry(
                        Identity.generate(),
                        key=entry.key,
                        version=entry.version,
                        integrity=entry.integrity,
                        start=first,
                        end=last,
                        host=host,
                        port=port,
                        issued=0,
                    )
                    reply = replace(reply, holders=(*kept, false.raw.hex()))
                return reply

        quick = PlanConfig(initial_deadline=0.2, quiet_floor=0.5, give_up_floor=1.0)
        async with OnlySilentForTheEnd(
            peers[1].address, io_timeout=FOREVER, fetch_config=quick
        ) as client:
            async with asyncio.timeout(60):  # a guard: waiting for the listener never ends
                with pytest.raises(NetworkError, match="stalled"):
                    await client.get("/stall/lonely", tmp_path / "out")
        assert silent_conns, "the silent holder was asked"
    finally:
        server.close()
        for writer in silent_conns:
            writer.close()
        await stop_all(peers)


async def test_a_holder_announcing_more_data_than_a_segment_is_refused_before_allocating(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A false holder answering with a 16 MiB DATA header and stalling gets no buffer of that
    size; the fetch is done by the honest holders."""
    peers = await start_peers(tmp_path / "net", 3)
    conns: list[asyncio.StreamWriter] = []

    async def boastful(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conns.append(writer)
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            header = wire.parse_header(await reader.readexactly(wire.HEADER_SIZE))
            writer.write(wire.encode_header(wire.MsgType.DATA, header.request_id, wire.MAX_SEGMENT))
            while await reader.read(65536):  # and never the bytes announced
                pass

    server = await asyncio.start_server(boastful, "127.0.0.1", 0)
    host, port = server.sockets[0].getsockname()[:2]
    taken: list[int] = []
    real_take = BufferPool.take

    def take(pool: BufferPool, size: int) -> bytearray:
        taken.append(size)
        return real_take(pool, size)

    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(64 * SEG))
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            await client.put(src, "/stall/boast", segment_size=SEG, replicas=3)

        class WithABoastfulHolder(Client):
            async def _request(self, request: Op[Any], *, read_only: bool = False) -> Any:
                reply = await super()._request(request, read_only=read_only)
                if isinstance(reply, ResolveReply):
                    entry = decode_holder_entry(bytes.fromhex(reply.holders[0]))
                    false = build_holder_entry(
                        Identity.generate(),
                        key=entry.key,
                        version=entry.version,
                        integrity=entry.integrity,
                        start=0,
                        end=63,
                        host=host,
                        port=port,
                        issued=0,
                    )
                    reply = replace(reply, holders=(false.raw.hex(), *reply.holders))
                return reply

        monkeypatch.setattr(BufferPool, "take", take)
        async with WithABoastfulHolder(peers[1].address, io_timeout=FOREVER) as client:
            async with asyncio.timeout(60):  # a guard: waiting for the false holder never ends
                await client.get("/stall/boast", tmp_path / "out")
        assert (tmp_path / "out").read_bytes() == src.read_bytes()
        assert conns, "the false holder was asked"
        assert taken and max(taken) <= SEG
    finally:
        server.close()
        for writer in conns:
            writer.close()
        await stop_all(peers)


async def test_a_holder_paused_mid_fetch_is_given_up_and_the_fetch_completes(
    processes: list[tuple[subprocess.Popen[str], tuple[str, int]]], tmp_path: Path
) -> None:
    """Three holders of every range; one is stopped (SIGSTOP) once a quarter of the object
    came in: the fetch completes from the other two and reports the paused one given up."""
    entry = processes[0][1]
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * SEG))
    token = read_token_file(tmp_path / "p0" / "control.token")
    async with Client(entry, publisher=Identity.generate(), token=token) as client:
        await client.put(src, "/stall/mid", segment_size=SEG, replicas=3)
        resolved = await client.resolve("/stall/mid")
    holders = {(h.host, h.port) for h in resolved.holders}
    proc, paused = next((p, a) for p, a in processes[1:] if a in holders)
    got: list[int] = []

    def progress(n: int) -> None:
        got.append(n)
        if len(got) == 64:  # a quarter of the segments
            os.kill(proc.pid, signal.SIGSTOP)

    out = tmp_path / "out"
    try:
        async with asyncio.timeout(120):  # only a guard: a fetch that waits never ends
            async with Client(entry, io_timeout=FOREVER) as client:
                result = await client.get("/stall/mid", out, progress=progress)
        assert stopped(proc.pid), "the holder was paused until the fetch ended"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert out.read_bytes() == src.read_bytes()
    assert paused in result.gave_up
    assert paused in result.late and result.hedged >= 1
