"""A hostile peer inside a real network: each attack is refused, honest users lose nothing."""

from __future__ import annotations

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


# --- storage ---


async def test_a_strangers_unpublished_uploads_are_collected_and_honest_publishes_succeed(
    tmp_path: Path,
) -> None:
    """Segments a stranger uploads and never publishes (1,000 tiny ones, then large ones
    until refused, on connections kept alive) are collected; an honest publish then works."""
    import asyncio

    import blake3

    from difs_p2p import wire
    from difs_p2p.repair import RepairConfig
    from difs_p2p.transfer import Connection
    from tests.helpers import wait_for

    quick = RepairConfig(interval=0.2, orphan_grace=1.0)
    peers = await start_peers(tmp_path / "net", 4, capacity=4 << 20, repair=quick)
    target = peers[0]
    conns: list[Connection] = []

    async def keep_alive() -> None:
        while True:
            for conn in conns:
                await conn.send(wire.Hello(request_id=0, peer=None))
                await conn.read_frame()
            await asyncio.sleep(0.2)

    try:
        for size, count in ((8, 1000), (256 << 10, 64)):
            conn = await Connection.open(target.address, io_timeout=30)
            conns.append(conn)
            for i in range(count):
                data = os.urandom(size)
                put = wire.PutSeg(request_id=i, seg_id=blake3.blake3(data).digest(), data=data)
                await conn.send(put)
                if isinstance(await conn.read_frame(), wire.Error):
                    break  # no space (or refused outright)
        pinger = asyncio.create_task(keep_alive())
        try:
            assert target.store is not None
            await wait_for(lambda: target.store is not None and target.store.used == 0, 20)
            src = tmp_path / "honest"
            src.write_bytes(os.urandom(3 << 20))
            async with Client(target.address, publisher=Identity.generate()) as client:
                await client.put(src, "/honest", replicas=3)
            assert await fetch(peers, tmp_path, "/honest") == src.read_bytes()
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
    finally:
        for conn in conns:
            conn.close()
        await stop_all(peers)
