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


# --- lineage ---


class _Carrier(AcceptAll):
    """A hostile node's store: keeps whatever it was given first, forever."""

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        return False


@pytest.fixture
async def lineage_world(tmp_path: Path) -> AsyncIterator[tuple[list[Peer], Dht]]:
    """6 honest peers that read every held name each maintenance round, and a hostile DHT
    node run by the stranger that carries whatever record it stores first."""
    from difs_p2p.repair import RepairConfig

    peers = await start_peers(tmp_path / "net", 6, repair=RepairConfig(resolve_every=1))
    evil_key = Identity.generate()
    evil = Dht(evil_key.node_id, _Carrier(), FAST_DHT, identity=evil_key)
    await evil.start("127.0.0.1", 0)
    await evil.bootstrap([peers[0].address])
    yield peers, evil
    await evil.stop()
    await stop_all(peers)


def _used(peers: list[Peer]) -> int:
    return sum(p.store.used for p in peers if p.store is not None)


async def _maintain(peers: list[Peer], n: int) -> None:
    for _ in range(n):
        for p in peers:
            assert p.maintainer is not None
            await p.maintainer.round()


def _strangers_tombstone(name: str, stranger: Identity, victim_v1: str) -> bytes:
    """A deleted version 1000 of ``name`` signed by the stranger, linked to the victim's
    version 1 as well as a stranger can (it copies the root hash)."""
    return build_manifest(
        stranger,
        name=name,
        version=1000,
        parent=victim_v1,
        root=victim_v1,
        size=0,
        segment_size=4096,
        segment_count=0,
        stripes=0,
        replicas=0,
        integrity="00" * 32,
        deleted=True,
        created=1.0,
    ).raw


async def _release_call(address: tuple[str, int], key: bytes, **args: str) -> dict[str, object]:
    """An unauthenticated ``release`` from a stranger's own connection."""
    from difs_p2p.errors import DifsError
    from difs_p2p.transfer import Connection

    conn = await Connection.open(address, io_timeout=5.0)
    try:
        return await conn.call("release", key=key.hex(), **args)
    except DifsError as exc:
        return {"error": str(exc)}
    finally:
        conn.close()


async def test_a_strangers_deleted_v1000_record_deletes_nothing(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Attack 1: a stranger's tombstone v1000, planted in one peer's record store and
    carried by the stranger's own node, loses to the owner's record at every reader;
    release calls and maintenance free nothing; the owner still reads, updates, deletes."""
    from difs_p2p.errors import DeletedError
    from difs_p2p.pins import Pins
    from tests.helpers import wait_for

    peers, evil = lineage_world
    owner, stranger = Identity.generate(), Identity.generate()
    name = "/bank.com/statement.pdf"
    key = name_key(name)
    data = await publish(peers, tmp_path, owner, name)
    v1 = (await peers[1].dht_node().get(key))[0]
    forged = _strangers_tombstone(name, stranger, blake3_hex(v1))
    # carried by the stranger's node, and planted in one honest peer's store (as if it
    # had arrived while that peer held no record for the key)
    evil.store._db.execute(
        "INSERT OR REPLACE INTO records(k, v, stored) VALUES(?,?,?)", (key, forged, evil.clock())
    )
    planted = peers[4].dht_node().store
    planted._db.execute("UPDATE records SET v=? WHERE k=?", (forged, key))
    assert planted.get(key, peers[4].clock()) == forged
    used = _used(peers)
    assert used >= 3 * 3 * SEG

    assert await fetch(peers, tmp_path, name) == data  # a first-time reader
    holders = {p.address for p in peers if p.holdings_db().of_key(key)}
    assert len(holders) >= 3
    for address in holders:
        no_proof = await _release_call(address, key)
        assert "error" in no_proof
        assert await _release_call(address, key, proof=forged.decode()) == {"freed": 0}
    await _maintain(peers, 3)
    assert _used(peers) == used, f"bytes freed: {used - _used(peers)}"
    assert sum(p.maintainer.stats.freed_bytes for p in peers if p.maintainer) == 0

    async with Client(peers[2].address, publisher=owner, pins=Pins(None)) as client:
        out = tmp_path / "owner-read"
        await client.get(name, out)
        assert out.read_bytes() == data
        new = tmp_path / "v2"
        new.write_bytes(os.urandom(2 * SEG))
        await client.put(new, name, segment_size=SEG, update=True)
        await client.get(name, out)
        assert out.read_bytes() == new.read_bytes()
        await client.rm(name)
    with pytest.raises(DeletedError):
        await fetch(peers, tmp_path, name)
    await wait_for(lambda: _used(peers) == 0)


def blake3_hex(raw: bytes) -> str:
    from difs_p2p.manifest import record_hash

    return record_hash(raw)


async def test_a_strangers_entries_and_history_for_a_victims_name_are_refused(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Attack 2: a stranger's bytes placed under the victim's name at version 1000 and
    published (holder entries signed by honest peers, and its own history manifest) are
    refused by every peer; readers get the victim's bytes; holders keep the victim's copy."""
    from difs_p2p import segments

    peers, evil = lineage_world
    victim, stranger = Identity.generate(), Identity.generate()
    name = "/victim.org/index.html"
    key = name_key(name)
    data = await publish(peers, tmp_path, victim, name)
    victim_v1 = (await peers[1].dht_node().get(key))[0]
    used = _used(peers)

    swap = tmp_path / "swap"
    swap.write_bytes(os.urandom(3 * SEG))
    async with Client(peers[0].address, publisher=stranger) as client:
        hashes, integrity = await client._upload(swap, SEG, None)
        placed = await client._call(
            "place",
            key=key.hex(),
            version=1000,
            integrity=integrity.hex(),
            segment_count=len(hashes),
            stripes=segments.default_stripes(len(hashes)),
            replicas=3,
        )
        assert placed["entries"], "honest peers signed holder entries for the stranger"
        fake = build_manifest(
            stranger,
            name=name,
            version=1000,
            parent=blake3_hex(victim_v1),
            root=blake3_hex(victim_v1),
            size=swap.stat().st_size,
            segment_size=SEG,
            segment_count=len(hashes),
            stripes=segments.default_stripes(len(hashes)),
            replicas=3,
            integrity=integrity.hex(),
            created=1.0,
        )
        await client._call("publish", manifest=fake.raw.decode(), entries=placed["entries"])
    # and straight from the stranger's node, to every peer
    await evil.add_entries(key, [fake.raw, *(bytes.fromhex(e) for e in placed["entries"])])

    for p in peers:
        stored = p.dht_node().store.entries(key, p.clock())
        assert fake.raw not in stored
        assert not [e for e in stored if e[:1] != b"{" and e[21:29] == (1000).to_bytes(8, "big")]
    assert await fetch(peers, tmp_path, name) == data
    async with Client(peers[5].address) as client:
        assert [m.version for m in await client.versions(name)] == [1]
    await _maintain(peers, 3)
    victim_holdings = [h for p in peers for h in p.holdings_db().of_key(key) if h.version == 1]
    assert len(victim_holdings) >= 3
    assert _used(peers) >= used  # the victim's copies stay (the stranger's upload is extra)
    assert await fetch(peers, tmp_path, name) == data


async def _junk_records(evil: Dht, target: Peer, n: int) -> int:
    """Store ``n`` valid records of the stranger's own names straight at ``target``."""
    proto = evil.protocol
    assert proto is not None
    stranger = Identity.generate()
    accepted = 0
    for i in range(n):
        m = build_manifest(
            stranger,
            name=f"/junk/{i}",
            version=1,
            parent=None,
            root=None,
            size=0,
            segment_size=4096,
            segment_count=0,
            stripes=1,
            replicas=1,
            integrity="00" * 32,
            created=1.0,
        )
        ok, reply = await proto.call(target.address, "store", evil.node_id, m.key, m.raw)
        accepted += bool(ok and reply is True)
    return accepted


async def test_one_source_cannot_fill_a_peers_record_store(tmp_path: Path) -> None:
    """Attack 8 (records): a stranger storing junk records from one address stops at its
    share of the record cap; honest names from other addresses are still stored."""
    import dataclasses

    from difs_p2p.config import PeerConfig

    small = dataclasses.replace(FAST_DHT, max_records=40)
    peers = [Peer(PeerConfig(data_dir=tmp_path / "p0", dht=small))]
    await peers[0].start()
    for i in range(1, 4):
        cfg = PeerConfig(data_dir=tmp_path / f"p{i}", dht=small, bootstrap=(peers[0].address,))
        peers.append(Peer(cfg))
        await peers[-1].start()
    evil_key = Identity.generate()
    evil = Dht(evil_key.node_id, AcceptAll(), FAST_DHT, identity=evil_key)
    try:
        await evil.start("127.0.0.1", 0)
        await evil.bootstrap([peers[0].address])
        target = peers[3]
        took = await _junk_records(evil, target, 40)
        assert took == 10, f"junk records stored: {took} of 40"
        owner = Identity.generate()
        names = [f"/honest/{i}" for i in range(5)]
        for n in names:
            await publish(peers, tmp_path, owner, n)
        stored = target.dht_node().store
        assert all(stored.get(name_key(n), target.clock()) is not None for n in names)
        assert await fetch(peers, tmp_path, names[-1])
    finally:
        await evil.stop()
        await stop_all(peers)


async def test_junk_entries_under_a_name_do_not_starve_the_owners_update(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Attack 7 (entries): 508 junk holder entries from one address under a name (for
    the owner's own version, the only kind peers admit now) leave room for the owner's
    update: it gets its holder entries and fetches work."""
    from difs_p2p.manifest import build_holder_entry

    peers, evil = lineage_world
    owner = Identity.generate()
    name = "/busy.net/feed"
    key = name_key(name)
    await publish(peers, tmp_path, owner, name)
    m = (await Client(peers[1].address).resolve(name)).manifest
    junk = [
        build_holder_entry(
            Identity.generate(),
            key=key,
            version=1,
            integrity=bytes.fromhex(m.integrity),
            start=0,
            end=m.segment_count - 1,
            host="127.0.0.1",
            port=9,
            issued=int(peers[0].clock()),
        ).raw
        for _ in range(508)
    ]
    for _ in range(2):  # twice, so that datagrams lost on the way do not leave room
        await evil.add_entries(key, junk)
    for p in peers:
        count = len(p.dht_node().store.entries(key, p.clock()))
        assert count <= 384 + 16, f"entries under the name at one peer: {count}"
    data = await publish(peers, tmp_path, owner, name, update=True)
    resolved = await Client(peers[2].address).resolve(name)
    assert resolved.manifest.version == 2
    assert len(resolved.holders_for(resolved.manifest)) >= 3
    assert await fetch(peers, tmp_path, name) == data
