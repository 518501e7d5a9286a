"""The entry peer's resolve cache (dhtrecords.ResolveCache): the pure rules, then real
peers on 127.0.0.1: a writer reads its write at once, a reader at another entry peer
within the bound."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p.classgen import replace
from difs_p2p.client import Client
from difs_p2p.config import PeerConfig
from difs_p2p.dhtrecords import ResolveCache
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from tests.helpers import FAST_DHT, client_for, stop_all, wait_for

A, B = b"a" * 20, b"b" * 20
ANSWER = ([b"record"], [b"entry"])


@pytest.mark.parametrize(
    ("steps", "now", "hit"),
    [
        # (what happens before the lookup at time 10.0, key) -> answer at `now`?
        (["begin", "keep"], 10.5, True),  # within the bound
        (["begin", "keep"], 11.0, True),  # at the bound
        (["begin", "keep"], 11.01, False),  # past it
        (["begin", "keep"], 9.0, False),  # the clock went back: not trusted
        (["begin", "keep", "write"], 10.5, False),  # a write drops the answer
        (["begin", "write", "keep"], 10.5, False),  # a write began during the lookup
        (["write", "begin", "keep"], 10.5, True),  # a write done before the lookup began
        (["begin", "write:other", "keep"], 10.5, True),  # a write to another key
    ],
)
def test_resolve_cache_rules(steps: list[str], now: float, hit: bool) -> None:
    """An answer is served for ``bound`` seconds after its lookup, unless a write to its
    key began before the lookup ended or after."""
    cache = ResolveCache(1.0)
    token = 0
    for step in steps:
        if step == "begin":
            token = cache.begin()
        elif step == "keep":
            cache.keep(A, token, 10.0, ANSWER)
        elif step == "write":
            cache.written(A)
        else:
            cache.written(B)
    assert (cache.get(A, now) == ANSWER) is hit


def test_resolve_cache_off_bounded_and_copies() -> None:
    """Bound 0 keeps nothing; the oldest key goes first beyond ``size`` or the byte
    budget, a large answer is not kept; a forgotten write makes older lookups unkeepable;
    callers get copies."""
    off = ResolveCache(0.0)
    assert not off.keep(A, off.begin(), 1.0, ANSWER)
    small = ResolveCache(5.0, size=1)
    small.keep(A, small.begin(), 1.0, ANSWER)
    small.keep(B, small.begin(), 1.0, ANSWER)
    assert small.get(A, 1.0) is None and small.get(B, 1.0) == ANSWER
    got = small.get(B, 1.0)
    assert got is not None
    got[0].append(b"mine")
    assert small.get(B, 1.0) == ANSWER
    weighed = ResolveCache(5.0, max_bytes=16 * 20)  # keeps answers of at most 20 bytes
    assert not weighed.keep(A, weighed.begin(), 1.0, ([b"r" * 15], [b"e" * 6]))
    for i in range(40):  # 11 bytes each: 440 in all
        assert weighed.keep(i.to_bytes(20, "big"), weighed.begin(), 1.0, ANSWER)
    assert weighed.bytes <= 16 * 20 and weighed.get((39).to_bytes(20, "big"), 1.0) == ANSWER
    assert weighed.get(bytes(20), 1.0) is None  # the oldest went first
    many = ResolveCache(5.0)
    old = many.begin()
    for i in range(5000):  # more writes than are remembered one by one
        many.written(i.to_bytes(20, "big"))
    assert not many.keep(A, old, 1.0, ANSWER)
    assert many.keep(A, many.begin(), 1.0, ANSWER)


BOUND = 1.0


async def start(root: Path, n: int, bound: float) -> list[Peer]:
    """``n`` peers whose resolve cache keeps answers ``bound`` seconds."""
    dht = replace(FAST_DHT, resolve_cache=bound)
    first = Peer(PeerConfig(data_dir=root / "p0", dht=dht))
    await first.start()
    peers = [first]
    for i in range(1, n):
        peer = Peer(PeerConfig(data_dir=root / f"p{i}", dht=dht, bootstrap=(first.address,)))
        await peer.start()
        peers.append(peer)
    return peers


@pytest.fixture
async def cached(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start(tmp_path / "net", 4, BOUND)
    yield peers
    await stop_all(peers)


async def content(client: Client, name: str) -> bytes:
    buf = io.BytesIO()
    await client.get(name, buf)
    return buf.getvalue()


async def test_writer_reads_its_write_at_once_others_within_the_bound(
    cached: list[Peer], tmp_path: Path
) -> None:
    """A reader through another entry peer, whose resolve of the old version is cached
    there, sees the new version within the bound; the writer sees it at once."""
    src = tmp_path / "src"
    name = "/bound.example/obj"
    src.write_bytes(b"version 1")
    writer = client_for(cached[0], publisher=Identity.generate())
    reader = Client(cached[2].address)
    try:
        await writer.put(src, name)
        assert await content(reader, name) == b"version 1"  # now cached at peer 2
        src.write_bytes(b"version 2")
        await writer.put(src, name, update=True)
        assert await content(writer, name) == b"version 2"

        async def reader_sees_it() -> bool:
            return await content(reader, name) == b"version 2"

        await wait_for(reader_sees_it, timeout=BOUND + 2.0)
    finally:
        await writer.close()
        await reader.close()


async def test_cached_resolve_sends_no_lookup_and_a_write_here_refreshes_it(
    tmp_path: Path,
) -> None:
    """Within the bound a second resolve at one entry peer costs no DHT lookup; a publish
    through that peer is read by its next resolve, bound or not."""
    peers = await start(tmp_path / "net", 4, 60.0)
    src = tmp_path / "src"
    name = "/bound.example/hot"
    src.write_bytes(b"one")
    entry = peers[1]
    assert entry.dht is not None
    writer = client_for(entry, publisher=Identity.generate())
    reader = Client(entry.address)
    try:
        await writer.put(src, name)
        assert (await reader.resolve(name)).manifest.version == 1
        lookups = entry.dht.stats["lookups"]
        assert (await reader.resolve(name)).manifest.version == 1
        assert entry.dht.stats["lookups"] == lookups
        src.write_bytes(b"two")
        await writer.put(src, name, update=True)
        assert (await reader.resolve(name)).manifest.version == 2
        assert await content(reader, name) == b"two"
    finally:
        await writer.close()
        await reader.close()
        await stop_all(peers)


async def test_concurrent_resolves_of_one_name_share_one_lookup(tmp_path: Path) -> None:
    """Eight readers resolving one name at once through one entry peer cost it one lookup
    of the name and one of its prefix's claim, not eight of each."""
    peers = await start(tmp_path / "net", 4, 60.0)
    src = tmp_path / "src"
    src.write_bytes(b"hot")
    name = "/bound.example/many"
    entry = peers[1]
    assert entry.dht is not None
    writer = client_for(peers[0], publisher=Identity.generate())
    readers = [Client(entry.address) for _ in range(8)]
    try:
        await writer.put(src, name)
        lookups = entry.dht.stats["lookups"]
        resolved = await asyncio.gather(*(r.resolve(name) for r in readers))
        assert {r.manifest.version for r in resolved} == {1}
        assert entry.dht.stats["lookups"] - lookups == 2
    finally:
        await writer.close()
        for r in readers:
            await r.close()
        await stop_all(peers)
