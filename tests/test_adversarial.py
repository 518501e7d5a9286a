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


# --- dht ---

from typing import Any  # noqa: E402

import msgpack  # noqa: E402

from difs_p2p.dht import IDENTIFY_DOMAIN  # noqa: E402
from tests.helpers import new_dht, start_dhts, wait_for  # noqa: E402


class _RawPeer(asyncio.DatagramProtocol):
    """A hostile DHT endpoint written from the wire format (rpcudp's msgpack datagrams):
    its own key, its own answers. It answers ping and identify honestly, so that peers
    add it; ``contacts`` is what it answers to find_node/find_value/find_entries, and
    with ``swallow`` it says it stored what it was sent and never serves it."""

    def __init__(self, identity: Identity) -> None:
        self.identity = identity
        self.transport: Any = None
        self.pending: dict[bytes, asyncio.Future[tuple[int, object]]] = {}
        self.tokens: dict[tuple[str, int], bytes] = {}
        self.contacts: list[list[object]] = []
        self.swallow = False
        self.asked: list[str] = []  # names of the requests received

    @classmethod
    async def open(cls, identity: Identity | None = None) -> _RawPeer:
        peer = cls(identity or Identity.generate())
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: peer, local_addr=("127.0.0.1", 0))
        return peer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    @property
    def address(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return (str(host), int(port))

    @property
    def node_id(self) -> bytes:
        return bytes(self.identity.node_id)

    def contact(self) -> list[object]:
        return [self.node_id, *self.address]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert self.transport is not None
        kind, msg_id, body = data[:1], data[1:21], msgpack.unpackb(data[21:], raw=False)
        if kind == b"\x01":
            future = self.pending.pop(msg_id, None)
            if future is not None and not future.done():
                future.set_result((len(data), body))
            return
        self.asked.append(body[0])
        reply = self.answer(body[0], body[1])
        if reply is not None:
            self.transport.sendto(b"\x01" + msg_id + msgpack.packb(reply, use_bin_type=True), addr)

    def answer(self, name: str, args: list[Any]) -> object:
        if name == "ping":
            return self.node_id
        if name == "identify":
            signed = self.identity.sign(IDENTIFY_DOMAIN + args[1] + self.node_id)
            return [self.identity.public_key, signed]
        if name == "store":
            return self.swallow
        if name == "add_entries":
            return len(args[2]) if self.swallow else 0
        if name == "find_entries":
            reply: dict[str, object] = {"entries": [], "next": -1, "nodes": self.contacts[:10]}
            if len(args) > 3 and args[3] is True:
                reply["value"] = None
            return reply
        if name in ("find_node", "find_value"):
            return self.contacts
        return None

    def send(self, addr: tuple[str, int], name: str, args: list[object]) -> int:
        """Send a request that needs no reply; its size."""
        assert self.transport is not None
        data = b"\x00" + os.urandom(20) + msgpack.packb([name, args], use_bin_type=True)
        self.transport.sendto(data, addr)
        return len(data)

    async def sized(
        self, addr: tuple[str, int], name: str, args: list[object], *, token: bool = True
    ) -> tuple[int, int, object]:
        """A request and its reply: (request bytes, reply bytes, reply)."""
        assert self.transport is not None
        msg_id = os.urandom(20)
        held = self.tokens.get(addr) if token else None
        body: list[object] = [name, args] if held is None else [name, args, held]
        data = b"\x00" + msg_id + msgpack.packb(body, use_bin_type=True)
        future: asyncio.Future[tuple[int, object]] = asyncio.get_running_loop().create_future()
        self.pending[msg_id] = future
        self.transport.sendto(data, addr)
        size, reply = await asyncio.wait_for(future, 5.0)
        return len(data), size, reply

    async def request(self, addr: tuple[str, int], name: str, args: list[object]) -> object:
        return (await self.sized(addr, name, args))[2]

    async def join(self, addr: tuple[str, int]) -> None:
        """Prove our ID to a peer as an honest peer does (identify, then a ping with the
        token it gave us, if any), so that it challenges us and adds us."""
        reply = await self.request(addr, "identify", [self.node_id, os.urandom(16), bytes(80)])
        if isinstance(reply, list) and len(reply) == 3:
            self.tokens[addr] = reply[2]
        await self.request(addr, "ping", [self.node_id])


def _knows(node: Dht, node_id: bytes, address: tuple[str, int] | None = None) -> bool:
    return any(
        c.node_id == node_id and (address is None or c.address == address) for c in node.contacts()
    )


async def test_dht_contact_that_is_no_ip_address_cannot_silence_peers() -> None:
    """A peer naming a contact whose address is no IP address in its replies leaves every
    peer answering UDP: newcomers join and a publish reaches every peer."""
    nodes = await start_dhts(6)
    evil = await _RawPeer.open()
    newcomer = new_dht(AcceptAll())
    try:
        evil.contacts = [[os.urandom(20), "evil\x00host", 4000]]
        for node in nodes:
            await evil.join(node.me.address)
        await wait_for(lambda: all(_knows(n, evil.node_id) for n in nodes), 30.0)
        for node in nodes:
            await node.lookup(os.urandom(20), "find_node")
        await newcomer.start("127.0.0.1", 0)
        for node in nodes:
            assert await newcomer.ping(node.me.address) == node.node_id
        assert await newcomer.bootstrap([nodes[0].me.address]) >= len(nodes)
        key = os.urandom(20)
        assert await newcomer.put(key, b"\x01record") >= len(nodes) + 1
        assert all(n.store.get(key, n.clock()) == b"\x01record" for n in nodes)
    finally:
        evil.close()
        await stop_all([*nodes, newcomer])


async def test_dht_forged_leave_datagrams_leave_routing_tables_intact() -> None:
    """leave datagrams naming other peers, sent from the attacker's own address, remove
    no contact (only a contact's own address may say it leaves)."""
    nodes = await start_dhts(6)
    evil = await _RawPeer.open()
    try:
        before = [len(n.contacts()) for n in nodes]
        sent = 0
        for node in nodes:
            for other in nodes:
                if other is not node and sent < 25:
                    evil.send(node.me.address, "leave", [other.node_id])
                    sent += 1
        for node in nodes:  # datagrams from one socket are handled in order
            await evil.request(node.me.address, "ping", [evil.node_id])
        assert [len(n.contacts()) for n in nodes] == before
    finally:
        evil.close()
        await stop_all(nodes)


async def test_dht_proven_id_does_not_follow_a_ping_from_another_address() -> None:
    """After a peer leaves, a ping carrying its ID from another address does not put that
    address in its place: an ID is proven only at the address that proved it."""
    nodes = await start_dhts(4)
    victim, observer = nodes[3], nodes[0]
    evil = await _RawPeer.open()
    try:
        assert _knows(observer, victim.node_id, victim.me.address)
        await victim.stop()
        await wait_for(lambda: not _knows(observer, victim.node_id))
        await evil.join(observer.me.address)
        await wait_for(lambda: _knows(observer, evil.node_id))
        await evil.request(observer.me.address, "ping", [victim.node_id])
        await observer.settle()
        assert not _knows(observer, victim.node_id, evil.address)
        assert not _knows(observer, victim.node_id)  # requests for it go nowhere wrong
    finally:
        evil.close()
        await stop_all(nodes[:3])


async def test_dht_replies_to_an_unproven_source_are_no_larger_than_its_request() -> None:
    """A source that never proved it receives at its address (as a spoofed one) gets no
    reply larger than its request, whatever it asks; a proven one gets full replies."""
    nodes = await start_dhts(6)
    stranger = await _RawPeer.open()
    try:
        key = os.urandom(20)
        await nodes[1].put(key, b"\x01" + os.urandom(1000))
        await nodes[1].add_entries(key, [os.urandom(8) + os.urandom(100) for _ in range(60)])
        target = nodes[0].me.address
        me = stranger.node_id
        asks: list[tuple[str, list[object]]] = [
            ("ping", [me]),
            ("identify", [me, os.urandom(16)]),
            ("identify", [me, os.urandom(16), bytes(80)]),
            ("find_node", [me, key]),
            ("find_value", [me, key]),
            ("find_entries", [me, key, 0]),
            ("find_entries", [me, key, 0, True]),
            ("store", [me, os.urandom(20), b"\x01small"]),
        ]
        for name, args in asks:
            request, reply, _ = await stranger.sized(target, name, args, token=False)
            assert reply <= request, (name, request, reply)
        # with the token it was given (it receives at its address), full replies
        await stranger.join(target)
        _, _, found = await stranger.sized(target, "find_node", [me, key])
        assert isinstance(found, list) and len(found) >= 3
    finally:
        stranger.close()
        await stop_all(nodes)


def _ground_near(key: bytes, bits: int, count: int) -> list[Identity]:
    """``count`` keys whose node IDs share ``bits`` leading bits with ``key`` (grinding)."""
    goal = int.from_bytes(key, "big")
    out: list[Identity] = []
    while len(out) < count:
        identity = Identity.generate()
        if 160 - (int.from_bytes(identity.node_id, "big") ^ goal).bit_length() >= bits:
            out.append(identity)
    return out


async def _sybils(key: bytes, count: int, join: list[Dht]) -> list[_RawPeer]:
    """``count`` ground IDs near ``key`` that route only to one another, say they store
    everything and serve nothing; each joins every peer of ``join``."""
    sybils = [await _RawPeer.open(i) for i in _ground_near(key, 9, count)]
    for s in sybils:
        s.swallow = True
        s.contacts = [o.contact() for o in sybils if o is not s][:20]
        for node in join:
            await s.join(node.me.address)
    await wait_for(lambda: all(_knows(n, s.node_id) for n in join for s in sybils), 30.0)
    return sybils


async def test_dht_sybils_near_a_key_cannot_hide_the_newest_record() -> None:
    """20 ground IDs nearer a key than any honest peer, answering "nothing" and
    swallowing writes, do not hide the owner's newest record from a reader (node-ID work
    is off in this test's config, id_difficulty=0, so that grinding stays fast)."""
    nodes = await start_dhts(6)
    key = os.urandom(20)
    while any(160 - _distance_bits(n.node_id, key) >= 9 for n in nodes):
        key = os.urandom(20)
    await nodes[1].put(key, b"\x01old")
    sybils = await _sybils(key, 20, nodes)
    try:
        stored = await nodes[2].put_with_entries(key, b"\x02new", [])
        records = await nodes[4].get(key)
        assert records and records[0] == b"\x02new"
        assert stored.readable
    finally:
        for s in sybils:
            s.close()
        await stop_all(nodes)


def _distance_bits(a: bytes, b: bytes) -> int:
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_length()


async def test_dht_write_no_path_can_read_back_is_not_reported_stored() -> None:
    """A write whose record no disjoint path serves back (every other peer a Sybil that
    says it stored it) reports only this peer's own copy as accepted."""
    writer = (await start_dhts(1))[0]
    key = os.urandom(20)
    sybils = await _sybils(key, 20, [writer])
    try:
        stored = await writer.put_with_entries(key, b"\x01record", [])
        assert stored.accepted <= 1
        assert stored.refused >= len(sybils)
    finally:
        for s in sybils:
            s.close()
        await writer.stop()


async def test_dht_contacts_named_in_replies_prove_their_ids_before_use() -> None:
    """A contact a hostile peer names in its replies (an ID it does not hold, at an
    address that answers) is not asked, listed among the closest or written to."""
    nodes = await start_dhts(4)
    evil, accomplice = await _RawPeer.open(), await _RawPeer.open()
    try:
        fake = os.urandom(20)
        evil.contacts = [[fake, *accomplice.address]]
        accomplice.swallow = True
        for node in nodes:
            await evil.join(node.me.address)
        await wait_for(lambda: all(_knows(n, evil.node_id) for n in nodes), 30.0)
        found = await nodes[1].lookup(fake, "find_node")
        assert fake not in {c.node_id for c in found.closest}
        await nodes[2].put_with_entries(fake, b"\x01record", [])
        # the accomplice was only challenged (identify), never asked or written to
        assert set(accomplice.asked) <= {"identify"}
    finally:
        evil.close()
        accomplice.close()
        await stop_all(nodes)


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
