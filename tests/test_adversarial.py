"""A hostile peer inside a real network: each attack is refused, honest users lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p.client import Client
from difs_p2p.dht import Dht
from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest, canonical_json
from difs_p2p.names import name_key
from difs_p2p.peer import Peer
from difs_p2p.recordstore import AcceptAll
from tests.helpers import FAST_DHT, start_peers, stop_all

SEG = 64 << 10


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[tuple[list[Peer], Dht]]:
    """6 honest peers and one hostile DHT node (real key, stores anything, sends anything)."""
    peers = await start_peers(tmp_path / "net", 6)
    evil_key = Identity.generate()
    evil = Dht(evil_key.node_id, AcceptAll(), FAST_DHT, identity=evil_key)
    await evil.start("127.0.0.1", 0)
    await evil.bootstrap([peers[0].address])
    yield peers, evil
    await evil.stop()
    await stop_all(peers)


async def raw_store(evil: Dht, key: bytes, value: bytes) -> int:
    """Send STORE straight to the k closest peers; how many accepted (all 6 must answer)."""
    proto = evil.protocol
    assert proto is not None
    accepted = answered = 0
    for contact in await evil.closest(key, 20):
        if contact.node_id == evil.node_id:
            continue
        ok, reply = await proto.call(contact.address, "store", evil.node_id, key, value)
        answered += bool(ok)
        accepted += bool(ok and reply is True)
    assert answered == 6, "the hostile node must reach every honest peer"
    return accepted


async def publish(
    peers: list[Peer], tmp_path: Path, owner: Identity, name: str, update: bool = False
) -> bytes:
    src = tmp_path / f"src-{os.urandom(4).hex()}"
    src.write_bytes(os.urandom(3 * SEG))
    async with Client(peers[0].address, publisher=owner) as client:
        await client.put(src, name, segment_size=SEG, update=update)
    return src.read_bytes()


async def fetch(peers: list[Peer], tmp_path: Path, name: str) -> bytes:
    out = tmp_path / f"out-{os.urandom(4).hex()}"
    async with Client(peers[3].address) as client:
        await client.get(name, out)
    return out.read_bytes()


async def test_forged_signature_is_refused(world: tuple[list[Peer], Dht], tmp_path: Path) -> None:
    peers, evil = world
    owner = Identity.generate()
    data = await publish(peers, tmp_path, owner, "/bank/statement")
    real = (await peers[1].dht_node().get(name_key("/bank/statement")))[0]
    forged = json.loads(real)
    forged["info"]["version"] = 99
    forged["info"]["parent"] = forged["info"]["root"] = "0" * 64
    assert await raw_store(evil, name_key("/bank/statement"), canonical_json(forged)) == 0
    assert await fetch(peers, tmp_path, "/bank/statement") == data


async def test_other_key_cannot_overwrite_even_with_a_higher_version(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    peers, evil = world
    owner, attacker = Identity.generate(), Identity.generate()
    data = await publish(peers, tmp_path, owner, "/site/index.html")
    hijack = build_manifest(
        attacker,
        name="/site/index.html",
        version=50,
        parent="a" * 64,
        root="b" * 64,
        size=0,
        segment_size=4096,
        segment_count=0,
        stripes=0,
        replicas=0,
        integrity="c" * 64,
        deleted=True,
        created=0.0,
    )
    assert await raw_store(evil, name_key("/site/index.html"), hijack.raw) == 0
    assert await fetch(peers, tmp_path, "/site/index.html") == data


async def test_replay_of_an_old_version_is_refused(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    peers, evil = world
    owner = Identity.generate()
    await publish(peers, tmp_path, owner, "/news")
    key = name_key("/news")
    v1 = (await peers[1].dht_node().get(key))[0]
    v2_data = await publish(peers, tmp_path, owner, "/news", update=True)
    assert await raw_store(evil, key, v1) == 0
    assert await fetch(peers, tmp_path, "/news") == v2_data


async def test_oversized_and_garbage_values_are_refused(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    peers, evil = world
    key = name_key("/anything")
    assert await raw_store(evil, key, b"{" + b" " * 7000 + b"}") == 0
    assert await raw_store(evil, key, os.urandom(500)) == 0
    proto = evil.protocol
    assert proto is not None
    ok, reply = await proto.call(peers[0].address, "store", evil.node_id, key, b"x" * 8150)
    assert not (ok and reply is True)
    assert all(p.dht_node().store.counts()[0] == 0 for p in peers)


async def test_hostile_holder_entries_cannot_break_a_fetch(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Entries claiming holders that do not exist cost retries, not the fetch."""
    from difs_p2p.manifest import build_holder_entry

    peers, evil = world
    owner = Identity.generate()
    data = await publish(peers, tmp_path, owner, "/video")
    m = (await Client(peers[1].address).resolve("/video")).manifest
    liars = [
        build_holder_entry(
            Identity.generate(),
            key=m.key,
            version=1,
            integrity=bytes.fromhex(m.integrity),
            start=0,
            end=m.segment_count - 1,
            host="127.0.0.1",
            port=9 + i,
            issued=0,
        )
        for i in range(5)
    ]
    await evil.add_entries(m.key, [e.raw for e in liars])
    assert await fetch(peers, tmp_path, "/video") == data


# --- fetch ---


class FalseHolders:
    """Listeners behind false holder entries: ``silent`` ones accept and never answer;
    the ``trickle`` one answers one byte a second. Records who was sent a request."""

    def __init__(self) -> None:
        self.servers: list[asyncio.Server] = []
        self.tasks: set[asyncio.Task[None]] = set()
        self.asked: set[tuple[str, int]] = set()
        self.sent = 0

    async def start(self, silent: int) -> list[tuple[str, int]]:
        addresses = []
        for i in range(silent + 1):
            handler = self._trickle if i == silent else self._silent
            server = await asyncio.start_server(handler, "127.0.0.1", 0)
            self.servers.append(server)
            addresses.append(server.sockets[0].getsockname()[:2])
        return addresses

    def _own(self, writer: asyncio.StreamWriter) -> tuple[str, int]:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        return writer.get_extra_info("sockname")[:2]  # type: ignore[no-any-return]

    async def _silent(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = self._own(writer)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            while await reader.read(65536):
                self.asked.add(me)
        writer.close()

    async def _trickle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        me = self._own(writer)
        # a DATA frame header announcing 1 MiB, then its bytes, one a second
        frame = bytes([1, 7, 0, 0, 0, 0, 0, 0, 0, 16, 0, 0]) + bytes(1 << 20)
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await reader.read(65536)
            self.asked.add(me)
            for byte in frame:
                writer.write(bytes([byte]))
                await writer.drain()
                self.sent += 1
                await asyncio.sleep(1.0)
        writer.close()

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def test_false_holder_entries_do_not_hold_up_an_honest_fetch(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Holder entries signed by a stranger's key for listeners that never answer, or answer
    one byte a second, cost an honest fetch nothing: it returns the exact bytes although
    its I/O timeout is an hour, with what it asked of them asked of honest holders."""
    from difs_p2p.manifest import build_holder_entry

    peers, evil = world
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * SEG))
    async with Client(peers[0].address, publisher=Identity.generate()) as client:
        await client.put(src, "/film", segment_size=SEG, replicas=2)
    m = (await Client(peers[1].address).resolve("/film")).manifest
    liars = FalseHolders()
    addresses = await liars.start(silent=4)
    try:
        entries = [
            build_holder_entry(
                Identity.generate(),  # the stranger's keys, one per listener
                key=m.key,
                version=m.version,
                integrity=bytes.fromhex(m.integrity),
                start=0,
                end=m.segment_count - 1,
                host=host,
                port=port,
                issued=0,
            ).raw
            for host, port in addresses
        ]
        assert await evil.add_entries(m.key, entries) >= 1
        async with Client(peers[3].address, io_timeout=3600.0) as client:
            resolved = await client.resolve("/film")
            listed = {(h.host, h.port) for h in resolved.holders}
            assert set(addresses) <= listed, "the false entries reach the fetcher"
            out = tmp_path / "out"
            async with asyncio.timeout(120):  # a guard: waiting for a false holder never ends
                result = await client.get("/film", out)
        assert out.read_bytes() == src.read_bytes()
        assert liars.asked, "false holders were asked"
        assert set(result.late) & set(addresses)
        assert result.hedged >= 1
    finally:
        await liars.stop()
