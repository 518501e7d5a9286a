"""A hostile peer inside a real network: each attack is refused, honest users lose nothing."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from difs_p2p import segments, wire
from difs_p2p.client import Client
from difs_p2p.config import parse_hostport
from difs_p2p.control import OperatorCredential, PeerCredential
from difs_p2p.dht import IDENTIFY_DOMAIN, Dht
from difs_p2p.errors import BusyError, PeerError, PermissionDeniedError
from difs_p2p.holders import parse_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest
from difs_p2p.membership import OK
from difs_p2p.names import name_key
from difs_p2p.ops import PlaceRequest, PublishRequest
from difs_p2p.peer import Peer
from difs_p2p.records import canonical_json
from difs_p2p.recordstore import AcceptAll
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.transfer import Connection
from tests.helpers import (
    FAST_DHT,
    client_for,
    new_dht,
    peer_config,
    raw_call,
    start_dhts,
    start_peer_process,
    start_peers,
    stop_all,
    wait_for,
)

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
    async with client_for(peers[0], publisher=owner) as client:
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
    real = (await peers[1].replicator.dht.get(name_key("/bank/statement")))[0]
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
        integrity=IntegrityRoot(SegmentId(b"\xcc" * 32)),
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
    v1 = (await peers[1].replicator.dht.get(key))[0]
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
    assert all(p.replicator.dht.store.counts()[0] == 0 for p in peers)


async def test_hostile_holder_entries_cannot_break_a_fetch(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Entries claiming holders that do not exist cost retries, not the fetch."""
    from difs_p2p.holders import build_holder_entry

    peers, evil = world
    owner = Identity.generate()
    data = await publish(peers, tmp_path, owner, "/video")
    m = (await Client(peers[1].address).resolve("/video")).manifest
    liars = [
        build_holder_entry(
            Identity.generate(),
            key=m.key,
            version=1,
            integrity=m.integrity,
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
    # no honest peer within 5 bits of the key: the routing-table bucket that holds the
    # Sybils (depth 5, where buckets far from a node stop splitting) then holds exactly
    # the 20 Sybils, and every peer can list them all
    while any(160 - _distance_bits(n.node_id, key) >= 5 for n in nodes):
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
    from difs_p2p.holders import build_holder_entry

    peers, evil = world
    src = tmp_path / "src"
    src.write_bytes(os.urandom(64 * SEG))
    async with client_for(peers[0], publisher=Identity.generate()) as client:
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
                integrity=m.integrity,
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


# --- control ---


async def _stranger(peer: Peer) -> Connection:
    return await Connection.open(peer.address, io_timeout=10)


async def _operator(peer: Peer) -> Connection:
    return await Connection.open(
        peer.address, io_timeout=10, credential=OperatorCredential(peer.control_token)
    )


async def _refused(conn: Connection, op: str, **args: object) -> None:
    with pytest.raises(PermissionDeniedError):
        await raw_call(conn, op, **args)


def _one_segment_object() -> tuple[bytes, SegmentId, bytes, IntegrityRoot]:
    """A one-segment object: its bytes, segment id, hash list and integrity root."""
    data = os.urandom(SEG)
    seg_id = segments.segment_hash(data)
    hash_list = segments.encode_hash_list([seg_id])
    return data, seg_id, hash_list, segments.hash_list_root(hash_list)


async def _upload(conn: Connection, seg_id: SegmentId, data: bytes) -> wire.Frame | None:
    await conn.send(wire.PutSeg(request_id=1, seg_id=seg_id, data=data))
    return await conn.read_frame()


async def _connect_from(source: str, address: tuple[str, int]) -> socket.socket:
    """A raw TCP connection to ``address`` from the loopback address ``source``."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    sock.bind((source, 0))
    try:
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


async def _closed_by_peer(sock: socket.socket) -> bool:
    """Read until the peer closes the connection (True) or nothing comes for 10 s."""
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(10):
            while await loop.sock_recv(sock, 65536):
                pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    """Three honest peers with default connection limits."""
    peers = await start_peers(tmp_path / "net", 3)
    yield peers
    await stop_all(peers)


async def test_a_strangers_control_requests_are_refused_before_any_work(
    trio: list[Peer], tmp_path: Path
) -> None:
    """hold, check, place, publish, status and uploads from a stranger are FORBIDDEN and
    change nothing: no entry signed, no segment stored, quarantined or pushed, no record."""
    peer = trio[0]
    data, seg_id, hash_list, root = _one_segment_object()
    key = name_key("/ctl/victim")
    stranger = await _stranger(peer)
    try:
        frame = await _upload(stranger, seg_id, data)
        assert isinstance(frame, wire.Error) and frame.code == wire.ErrorCode.FORBIDDEN
        with contextlib.suppress(PeerError):  # closed (reset: the payload was never read)
            assert await stranger.read_frame() is None
    finally:
        stranger.close()
    assert not peer._store().has(seg_id)
    # the operator's upload stays pending while its connection is open (closing it frees
    # the unpublished segments at once)
    operator = await _operator(peer)
    try:
        for sid, blob in ((seg_id, data), (root, hash_list)):
            assert isinstance(await _upload(operator, sid, blob), wire.Ack)
        stored = [p._store().count for p in trio]
        # damage the segment on disk: a check with repair would quarantine it
        path, _ = peer._store().locate(seg_id)
        path.write_bytes(b"\x00" + path.read_bytes()[1:])
        manifest = build_manifest(
            Identity.generate(),
            name="/ctl/victim",
            version=1,
            parent=None,
            root=None,
            size=SEG,
            segment_size=SEG,
            segment_count=1,
            stripes=1,
            replicas=3,
            integrity=root,
            created=0.0,
        )
        hold = {
            "key": key.hex(),
            "version": 1,
            "integrity": root.hex(),
            "segment_count": 1,
            "start": 0,
            "end": 0,
        }
        stranger = await _stranger(peer)
        try:
            await _refused(stranger, "hold", **hold)
            await _refused(stranger, "check", repair=True)
            await _refused(stranger, "place", **{**hold, "stripes": 1, "replicas": 1000})
            await _refused(stranger, "publish", manifest=manifest.raw.decode(), entries=[])
            await _refused(stranger, "status")
        finally:
            stranger.close()
        assert peer.replicator.holdings.of_key(key) == []
        assert [p._store().count for p in trio] == stored
        assert peer._store().has(seg_id)  # not quarantined: no check ran
        assert await trio[1].replicator.dht.get(key) == []
    finally:
        operator.close()


async def test_the_operator_with_the_token_may_do_everything(
    trio: list[Peer], tmp_path: Path
) -> None:
    """With the control token: upload, hold, place, publish, check, status, suspect."""
    peer = trio[0]
    token_file = peer.data_dir / "control.token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert bytes.fromhex(token_file.read_text().strip()) == peer.control_token
    data, seg_id, hash_list, root = _one_segment_object()
    key = name_key("/ctl/mine")
    operator = await _operator(peer)
    try:
        assert operator.role == "operator"
        for sid, blob in ((seg_id, data), (root, hash_list)):
            assert isinstance(await _upload(operator, sid, blob), wire.Ack)
        args = {"key": key.hex(), "version": 1, "integrity": root.hex(), "segment_count": 1}
        held = await raw_call(operator, "hold", **args, start=0, end=0)
        assert parse_holder_entry(bytes.fromhex(held["entry"])).key == key
        placed = await raw_call(operator, "place", **args, stripes=1, replicas=2)
        assert len(placed["entries"]) >= 2
        owner = Identity.generate()
        manifest = build_manifest(
            owner,
            name="/ctl/mine",
            version=1,
            parent=None,
            root=None,
            size=SEG,
            segment_size=SEG,
            segment_count=1,
            stripes=1,
            replicas=2,
            integrity=root,
            created=0.0,
        )
        published = await raw_call(
            operator, "publish", manifest=manifest.raw.decode(), entries=placed["entries"]
        )
        assert published["winner"] == manifest.hash
        assert (await raw_call(operator, "status"))["node_id"] == peer.node_id.hex()
        assert (await raw_call(operator, "check"))["ok"] >= 2
        assert (await raw_call(operator, "suspect", segment=seg_id.hex()))["damaged"] is False
    finally:
        operator.close()
    out = tmp_path / "out"
    async with Client(trio[2].address) as client:  # a stranger reads it
        await client.get("/ctl/mine", out)
    assert out.read_bytes() == data


async def test_a_wrong_operator_proof_is_refused(trio: list[Peer]) -> None:
    """An HMAC made with another token, or a proof without a nonce, is refused and the
    connection closed; a token never leaves the client."""
    peer = trio[0]
    with pytest.raises(PermissionDeniedError):
        await Connection.open(
            peer.address, io_timeout=5, credential=OperatorCredential(os.urandom(32))
        )
    conn = await _stranger(peer)
    try:
        proof = OperatorCredential(peer.control_token).prove(os.urandom(32), peer.node_id)
        await conn.send(wire.Hello(request_id=1, peer=None, auth=proof))  # no nonce asked
        frame = await conn.read_frame()
        assert isinstance(frame, wire.Error) and frame.code == wire.ErrorCode.FORBIDDEN
        assert await conn.read_frame() is None
    finally:
        conn.close()


async def test_a_peer_may_push_a_range_but_not_control_the_peer(trio: list[Peer]) -> None:
    """A proven node key may upload and ask for a hold with a reason; a repair needs its
    own entry for the range in the DHT; place and status stay the operator's."""
    peer = trio[0]
    other = Identity.generate()
    conn = await Connection.open(peer.address, io_timeout=10, credential=PeerCredential(other))
    try:
        assert conn.role == "peer"
        data, seg_id, hash_list, root = _one_segment_object()
        for sid, blob in ((seg_id, data), (root, hash_list)):
            assert isinstance(await _upload(conn, sid, blob), wire.Ack)
        key = name_key("/ctl/pushed")
        args = {
            "key": key.hex(),
            "version": 1,
            "integrity": root.hex(),
            "segment_count": 1,
            "start": 0,
            "end": 0,
        }
        reason = {"key": key.hex(), "version": 1, "start": 0, "end": 0}
        await _refused(conn, "hold", **args)
        await _refused(conn, "hold", **args, reason={**reason, "kind": "repair"})
        assert peer.replicator.holdings.of_key(key) == []
        held = await raw_call(conn, "hold", **args, reason={**reason, "kind": "place"})
        assert parse_holder_entry(bytes.fromhex(held["entry"])).node_id == peer.node_id
        await _refused(conn, "place", **args, stripes=1, replicas=3)
        await _refused(conn, "status")
        await _refused(conn, "check")
    finally:
        conn.close()


async def test_suspect_reports_from_strangers_are_rate_limited(trio: list[Peer]) -> None:
    """A fetcher (a stranger) may report a bad copy, but 100 reports at once re-verify at
    most the burst (8) and the rest are refused BUSY without work."""
    peer = trio[0]
    conn = await _stranger(peer)
    busy = 0
    try:
        for _ in range(100):
            try:
                await raw_call(conn, "suspect", segment=os.urandom(32).hex())
            except BusyError:
                busy += 1
    finally:
        conn.close()
    assert busy >= 100 - 8 - 2  # the burst, and what the rate refilled meanwhile


async def test_hello_keepalive_connections_from_one_address_do_not_block_a_fetch(
    trio: list[Peer], tmp_path: Path
) -> None:
    """256 connections from one address that only send HELLOs get 32 slots; an honest
    fetch through that peer completes."""
    owner = Identity.generate()
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    async with client_for(trio[0], publisher=owner) as client:
        await client.put(src, "/ctl/busy", segment_size=SEG)
    target = trio[2]

    async def honest_fetch() -> float:
        out = tmp_path / f"out-{os.urandom(4).hex()}"
        t0 = time.perf_counter()
        async with Client(target.address) as client:
            await client.get("/ctl/busy", out)
        assert out.read_bytes() == src.read_bytes()
        return time.perf_counter() - t0

    before = await honest_fetch()
    loop = asyncio.get_running_loop()
    hello = wire.encode_bytes(wire.Hello(request_id=0, peer=None))
    attackers: list[socket.socket] = []
    try:
        for _ in range(256):
            sock = await _connect_from("127.0.0.2", target.address)
            attackers.append(sock)
            with contextlib.suppress(OSError):
                await loop.sock_sendall(sock, hello)
        assert target.server is not None
        await wait_for(lambda: target.server is not None and target.server.refused >= 224)
        assert target.server.connections_from("127.0.0.2") <= 32
        during = await honest_fetch()
    finally:
        for sock in attackers:
            sock.close()
    print(
        f"\nhonest fetch before {before * 1000:.1f} ms, under 256 HELLO connections "
        f"{during * 1000:.1f} ms"
    )


async def test_an_idle_connection_sending_only_hellos_is_closed(tmp_path: Path) -> None:
    """HELLOs are not work: a connection that sends nothing else is closed after the idle
    time, however often it says HELLO."""
    peer = Peer(peer_config(tmp_path / "p", idle_timeout=0.5))
    await peer.start()
    loop = asyncio.get_running_loop()
    sock = await _connect_from("127.0.0.1", peer.address)
    hello = wire.encode_bytes(wire.Hello(request_id=0, peer=None))
    try:

        async def keepalive() -> None:
            with contextlib.suppress(OSError):
                while True:
                    await loop.sock_sendall(sock, hello)
                    await asyncio.sleep(0.05)

        pinger = asyncio.create_task(keepalive())
        try:
            assert await _closed_by_peer(sock)
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
    finally:
        sock.close()
        await peer.stop()


async def test_a_full_peer_makes_room_for_another_address(tmp_path: Path) -> None:
    """When one address holds every slot with idle connections, a newcomer from another
    address takes the slot of the idlest one and is served."""
    peer = Peer(peer_config(tmp_path / "p", max_connections=16, max_connections_per_address=16))
    await peer.start()
    hogs: list[socket.socket] = []
    try:
        for _ in range(16):
            hogs.append(await _connect_from("127.0.0.2", peer.address))
        assert peer.server is not None
        await wait_for(lambda: peer.server is not None and peer.server.connections == 16)
        conn = await _operator(peer)
        try:
            assert (await raw_call(conn, "status"))["node_id"] == peer.node_id.hex()
        finally:
            conn.close()
        assert peer.server.evicted >= 1
        assert await _closed_by_peer(hogs[0])  # the idlest one, the first to come
    finally:
        for sock in hogs:
            sock.close()
        await peer.stop()


def _peer_process(data: Path) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    """A real difs-peer process with default settings, and its address."""
    proc, address = start_peer_process(data, stderr=subprocess.DEVNULL)
    return proc, parse_hostport(address)


async def test_upload_headers_without_bytes_do_not_grow_a_peers_memory(tmp_path: Path) -> None:
    """256 connections that each send only a PUT_SEG header announcing 16 MiB: the peer
    (a real difs-peer process) allocates nothing for them and its RSS stays bounded."""
    proc, address = _peer_process(tmp_path / "peer")
    socks: list[socket.socket] = []
    try:
        before = _rss_mb(proc.pid)
        header = wire.HEADER.pack(1, wire.MsgType.PUT_SEG, 0, 1, 32 + wire.MAX_SEGMENT)
        loop = asyncio.get_running_loop()
        for i in range(256):
            # 8 addresses x 32: every connection is let in, so memory is what is tested
            sock = await _connect_from(f"127.0.0.{2 + i // 32}", address)
            socks.append(sock)
            await loop.sock_sendall(sock, header)
        answers = await asyncio.gather(*(_closed_by_peer(s) for s in socks))
        after = max(_rss_mb(proc.pid) for _ in range(5))
        print(f"\npeer RSS before {before:.0f} MB, after 256 upload headers {after:.0f} MB")
        assert all(answers)  # each refused (FORBIDDEN) and closed, never left waiting
        assert after < 300
    finally:
        for sock in socks:
            sock.close()
        proc.terminate()
        proc.wait(timeout=15)


def test_the_cli_finds_the_local_peers_token_and_explains_a_missing_one(
    tmp_path: Path,
) -> None:
    """difs finds the default local peer's token by itself; for another peer without
    --token-file it exits 6 saying how to pass one."""
    home = tmp_path / "home"
    env = dict(os.environ, DIFS_HOME=str(home))
    env.pop("DIFS_PEER", None)
    env.pop("DIFS_TOKEN_FILE", None)
    bin_dir = Path(sys.executable).parent
    procs = []
    try:
        for data in (home / "peer", tmp_path / "other"):
            proc = subprocess.Popen(
                [str(bin_dir / "difs-peer"), "join", "--data", str(data)],
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            procs.append(proc)
            assert proc.stdout is not None and proc.stdout.readline().startswith("peer ready")
        local = (home / "peer" / "address").read_text().strip()
        other = (tmp_path / "other" / "address").read_text().strip()

        def difs(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [str(bin_dir / "difs"), *args],
                capture_output=True,
                text=True,
                timeout=60,
                env=env,
                check=False,
            )

        assert difs("peers", "--json").returncode == 0
        assert difs("peers", "--peer", local, "--json").returncode == 0
        refused = difs("peers", "--peer", other, "--json")
        assert refused.returncode == 6 and "--token-file" in refused.stderr
        token = str(tmp_path / "other" / "control.token")
        assert difs("peers", "--peer", other, "--token-file", token).returncode == 0
        wrong = tmp_path / "wrong.token"
        wrong.write_text(os.urandom(32).hex())
        denied = difs("peers", "--peer", other, "--token-file", str(wrong))
        assert denied.returncode == 6 and "permission denied" in denied.stderr.lower()
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=15)


# --- lineage ---


class _Carrier(AcceptAll):
    """A hostile node's store: keeps whatever it was given first, forever."""

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        return False


@pytest.fixture
async def lineage_world(tmp_path: Path) -> AsyncIterator[tuple[list[Peer], Dht]]:
    """6 honest peers that read every held name each maintenance round, and a hostile DHT
    node run by the stranger that carries whatever record it stores first."""
    from difs_p2p.config import RepairConfig

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
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        deleted=True,
        created=1.0,
    ).raw


async def _release_call(address: tuple[str, int], key: bytes, **args: str) -> dict[str, object]:
    """An unauthenticated ``release`` from a stranger's own connection."""
    from difs_p2p.errors import DifsError
    from difs_p2p.transfer import Connection

    conn = await Connection.open(address, io_timeout=5.0)
    try:
        return await raw_call(conn, "release", key=key.hex(), **args)
    except DifsError as exc:
        return {"error": str(exc)}
    finally:
        conn.close()


async def test_a_strangers_deleted_v1000_record_deletes_nothing(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """A stranger's tombstone v1000, planted in one peer's record store and
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
    v1 = (await peers[1].replicator.dht.get(key))[0]
    forged = _strangers_tombstone(name, stranger, blake3_hex(v1))
    # carried by the stranger's node, and planted in one honest peer's store (as if it
    # had arrived while that peer held no record for the key)
    evil.store._db.execute(
        "INSERT OR REPLACE INTO records(k, v, stored) VALUES(?,?,?)", (key, forged, evil.clock())
    )
    planted = peers[4].replicator.dht.store
    planted._db.execute("UPDATE records SET v=? WHERE k=?", (forged, key))
    assert planted.get(key, peers[4].clock()) == forged
    used = _used(peers)
    assert used >= 3 * 3 * SEG

    assert await fetch(peers, tmp_path, name) == data  # a first-time reader
    holders = {p.address for p in peers if p.replicator.holdings.of_key(key)}
    assert len(holders) >= 3
    for address in holders:
        no_proof = await _release_call(address, key)
        assert "error" in no_proof
        assert await _release_call(address, key, proof=forged.decode()) == {"freed": 0}
    await _maintain(peers, 3)
    assert _used(peers) == used, f"bytes freed: {used - _used(peers)}"
    assert sum(p.maintainer.stats.freed_bytes for p in peers if p.maintainer) == 0

    async with client_for(peers[2], publisher=owner, pins=Pins(None)) as client:
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
    from difs_p2p.records import record_hash

    return record_hash(raw)


async def test_a_strangers_entries_and_history_for_a_victims_name_are_refused(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """A stranger's bytes placed under the victim's name at version 1000 and
    published (holder entries signed by honest peers, and its own history manifest) are
    refused by every peer; readers get the victim's bytes; holders keep the victim's copy."""
    from difs_p2p import segments

    peers, evil = lineage_world
    victim, stranger = Identity.generate(), Identity.generate()
    name = "/victim.org/index.html"
    key = name_key(name)
    data = await publish(peers, tmp_path, victim, name)
    victim_v1 = (await peers[1].replicator.dht.get(key))[0]
    used = _used(peers)

    swap = tmp_path / "swap"
    swap.write_bytes(os.urandom(3 * SEG))
    # the stranger operates a peer of its own (here peers[0]): the control plane does not
    # stop it, so the entry sets and holders must
    async with client_for(peers[0], publisher=stranger) as client:
        hashes, integrity, _ = await client._upload(swap, SEG, None)
        stripes = segments.default_stripes(len(hashes))
        placed = await client._request(
            PlaceRequest(key, 1000, integrity, len(hashes), stripes, replicas=3)
        )
        assert placed.entries, "honest peers signed holder entries for the stranger"
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
            integrity=integrity,
            created=1.0,
        )
        await client._request(PublishRequest(fake.raw.decode(), placed.entries))
    # and straight from the stranger's node, to every peer
    await evil.add_entries(key, [fake.raw, *(bytes.fromhex(e) for e in placed.entries)])

    for p in peers:
        stored = p.replicator.dht.store.entries(key, p.clock())
        assert fake.raw not in stored
        assert not [e for e in stored if e[:1] != b"{" and e[21:29] == (1000).to_bytes(8, "big")]
    assert await fetch(peers, tmp_path, name) == data
    async with Client(peers[5].address) as client:
        assert [m.version for m in await client.versions(name)] == [1]
    await _maintain(peers, 3)
    victim_holdings = [
        h for p in peers for h in p.replicator.holdings.of_key(key) if h.version == 1
    ]
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
            integrity=IntegrityRoot(SegmentId(bytes(32))),
            created=1.0,
        )
        ok, reply = await proto.call(target.address, "store", evil.node_id, m.key, m.raw)
        accepted += bool(ok and reply is True)
    return accepted


async def test_one_source_cannot_fill_a_peers_record_store(tmp_path: Path) -> None:
    """A stranger storing junk records from one address stops at its
    share of the record cap; honest names from other addresses are still stored."""
    from difs_p2p import classgen
    from difs_p2p.config import PeerConfig

    small = classgen.replace(FAST_DHT, max_records=40)
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
        stored = target.replicator.dht.store
        assert all(stored.get(name_key(n), target.clock()) is not None for n in names)
        assert await fetch(peers, tmp_path, names[-1])
    finally:
        await evil.stop()
        await stop_all(peers)


async def test_junk_entries_under_a_name_do_not_starve_the_owners_update(
    lineage_world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """508 junk holder entries from one address under a name (for
    the owner's own version, the only kind peers admit now) leave room for the owner's
    update: it gets its holder entries and fetches work."""
    from difs_p2p.holders import build_holder_entry

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
            integrity=m.integrity,
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
        count = len(p.replicator.dht.store.entries(key, p.clock()))
        assert count <= 384 + 16, f"entries under the name at one peer: {count}"
    # checking a thousand entries at once in one test process can make the fast test DHT's
    # pings time out: let any peer that evicted its contacts rejoin (what is under test is
    # the room left under the name, not liveness under this load)
    await wait_for(
        lambda: all(p.replicator.dht.network_state().state == OK for p in peers), timeout=30
    )
    data = await publish(peers, tmp_path, owner, name, update=True)
    resolved = await Client(peers[2].address).resolve(name)
    assert resolved.manifest.version == 2
    assert len(resolved.holders_for(resolved.manifest)) >= 3
    assert await fetch(peers, tmp_path, name) == data


# --- storage ---


async def test_a_strangers_unpublished_uploads_are_collected_and_honest_publishes_succeed(
    tmp_path: Path,
) -> None:
    """Segments a stranger uploads and never publishes (1,000 tiny ones, then large ones
    until refused, on connections kept alive) are collected; an honest publish then works.
    Strangers cannot upload at all; the stranger here proves a fresh node key (the peer
    role costs only a key pair), which lets it upload."""
    import asyncio

    import blake3

    from difs_p2p import wire
    from difs_p2p.config import RepairConfig
    from difs_p2p.control import PeerCredential
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
            conn = await Connection.open(
                target.address, io_timeout=30, credential=PeerCredential(Identity.generate())
            )
            conns.append(conn)
            for i in range(count):
                data = os.urandom(size)
                put = wire.PutSeg(
                    request_id=i, seg_id=SegmentId(blake3.blake3(data).digest()), data=data
                )
                await conn.send(put)
                if isinstance(await conn.read_frame(), wire.Error):
                    break  # no space (or refused outright)
        pinger = asyncio.create_task(keep_alive())
        try:
            assert target.store is not None
            await wait_for(lambda: target.store is not None and target.store.used == 0, 20)
            src = tmp_path / "honest"
            src.write_bytes(os.urandom(3 << 20))
            async with client_for(target, publisher=Identity.generate()) as client:
                await client.put(src, "/honest", replicas=3)
            assert await fetch(peers, tmp_path, "/honest") == src.read_bytes()
        finally:
            pinger.cancel()
            await asyncio.gather(pinger, return_exceptions=True)
    finally:
        for conn in conns:
            conn.close()
        await stop_all(peers)


# --- proof ---


def _signers_at(peer: Peer, key: bytes) -> set[bytes]:
    """The signer keys of the holder entries ``peer`` lists under ``key``."""
    assert peer.dht is not None
    return {
        parse_holder_entry(e).public_key
        for e in peer.dht.store.entries(key, time.time())
        if e[:1] != b"{"
    }


async def test_holder_entries_whose_holder_cannot_prove_them_are_dropped(
    world: tuple[list[Peer], Dht], tmp_path: Path
) -> None:
    """Entries signed by a stranger's keys for silent listeners, a 1 byte/s one and an
    honest peer's address are dropped by every listing peer once its challenge fails, and
    refused when sent again; honest entries all stay, and a publish is fetched at once."""
    from difs_p2p.holders import build_holder_entry

    peers, evil = world
    owner = Identity.generate()
    data = await publish(peers, tmp_path, owner, "/proved")
    m = (await Client(peers[1].address).resolve("/proved")).manifest
    honest = {p.node_id: _signers_at(p, m.key) for p in peers}
    assert all(honest.values()), "every peer lists the published entries"
    liars = FalseHolders()
    addresses = [*await liars.start(silent=2), peers[2].address]
    strangers = [Identity.generate() for _ in addresses]
    entries = [
        build_holder_entry(
            key_,
            key=m.key,
            version=m.version,
            integrity=m.integrity,
            start=0,
            end=m.segment_count - 1,
            host=host,
            port=port,
            issued=int(time.time()),
        ).raw
        for key_, (host, port) in zip(strangers, addresses, strict=True)
    ]
    false_keys = {s.public_key for s in strangers}
    try:
        assert await evil.add_entries(m.key, entries) > len(entries), "peers admit them"
        assert any(_signers_at(p, m.key) & false_keys for p in peers)

        def dropped() -> bool:
            return all(not _signers_at(p, m.key) & false_keys for p in peers)

        await wait_for(dropped, 60)
        for p in peers:
            assert honest[p.node_id] <= _signers_at(p, m.key), "honest entries stay"
        # the honest holders proved their claims to the peers they were sent to (the
        # entry peer stores its publish's entries itself)
        assert all(p.prover is not None and p.prover.stats.proven >= 1 for p in peers[1:])
        # sent again, they are refused outright: their holders failed a proof
        await evil.add_entries(m.key, entries)
        assert dropped()
        assert await fetch(peers, tmp_path, "/proved") == data
        # an update fetched at once, while its holders are being challenged
        data2 = await publish(peers, tmp_path, owner, "/proved", update=True)
        assert await fetch(peers, tmp_path, "/proved") == data2
    finally:
        await liars.stop()


async def test_a_holder_serving_a_bad_segment_fails_a_sampled_challenge(tmp_path: Path) -> None:
    """With every challenge sampled, honest holders pass the segment check, and a holder
    that still signs for its range but serves damaged segments loses its entries."""
    from difs_p2p.config import ProofConfig

    peers = await start_peers(tmp_path / "net", 4, proof=ProofConfig(segment_share=1.0))
    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * SEG))
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            await client.put(src, "/sampled", segment_size=SEG, replicas=2)
        m = (await Client(peers[1].address).resolve("/sampled")).manifest
        provers = [p.prover for p in peers if p.prover is not None]
        await wait_for(lambda: all(not pr.book.pending for pr in provers), 30)
        assert sum(pr.stats.segments for pr in provers) >= 1
        assert sum(pr.stats.failed for pr in provers) == 0, "honest holders pass"
        liar = next(p for p in peers[1:] if p.replicator.holdings.of_key(m.key))
        store = liar._store()
        ids = segments.verify_hash_list(store.read(m.integrity), m.integrity, m.segment_count)
        for h in liar.replicator.holdings.of_key(m.key):
            for seg_id in ids[h.start : h.end + 1]:
                path = store.path_of(seg_id)
                path.write_bytes(b"\x00" + path.read_bytes()[1:])
        sender = peers[0]
        assert liar.identity is not None
        liar_key = liar.identity.public_key
        assert sender.dht is not None
        its_entries = [
            e
            for e in sender.dht.store.entries(m.key, time.time())
            if e[:1] != b"{" and parse_holder_entry(e).public_key == liar_key
        ]
        assert its_entries
        for pr in provers:
            pr.book.proven.clear()  # as if its proofs had aged out
        await sender.dht.add_entries(m.key, its_entries)  # re-announced
        others = [p for p in peers if p is not sender and p is not liar]
        await wait_for(lambda: all(liar_key not in _signers_at(p, m.key) for p in others), 30)
        assert sum(pr.stats.failed for pr in provers) >= len(others)
    finally:
        await stop_all(peers)


# --- claimed copies ---


async def test_nearer_claimants_cannot_make_honest_holders_drop_their_copies(
    tmp_path: Path,
) -> None:
    """Peers whose keys were ground nearer a range key than any holder, holding the public
    data and answering probes, make no honest holder drop its copy; when they leave, every
    honest copy is still there and the object is fetched whole."""
    from difs_p2p.placement import range_key

    net = await start_peers(tmp_path / "net", 6)
    attackers: list[Peer] = []
    try:
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * SEG))
        async with client_for(net[0], publisher=Identity.generate()) as client:
            result = await client.put(src, "/victim/copies", segment_size=SEG, replicas=2)
        m = result.manifest
        integrity = m.integrity
        ranges = segments.stripe_ranges(m.segment_count, m.stripes)
        assert len(ranges) == 1
        first, last = ranges[0]
        rkey = range_key(integrity, 0)
        honest = [p for p in net if _holds(p, integrity, first, last)]
        assert len(honest) == 2
        nearest = min(_xor(p.node_id, rkey) for p in net)
        keys: list[Identity] = []
        while len(keys) < m.replicas:  # about 6 tries each in a 6-peer network
            candidate = Identity.generate()
            if _xor(candidate.node_id, rkey) < nearest:
                keys.append(candidate)
        for n, key in enumerate(keys):
            data = tmp_path / f"evil{n}"
            data.mkdir()
            (data / "peer.key").write_text(key.private_key.private_bytes_raw().hex() + "\n")
            os.chmod(data / "peer.key", 0o600)
            attacker = Peer(peer_config(data, bootstrap=(net[0].address,)))
            await attacker.start()
            attackers.append(attacker)
        for attacker in attackers:  # a copy of the public data, and its own signed entries
            entry = await honest[0].replicator.push_range(
                attacker.address, m.key, m.version, integrity, first, last
            )
            await attacker.replicator.dht.add_entries(m.key, [entry.raw])
        for _ in range(3):
            for peer in net:
                assert peer.maintainer is not None
                await peer.maintainer.round()
        for attacker in attackers:
            await attacker.stop()
        attackers.clear()
        kept = [p for p in net if _holds(p, integrity, first, last)]
        assert len(kept) == 2  # the attack freed every honest copy before
        assert await fetch(net, tmp_path, "/victim/copies") == src.read_bytes()
    finally:
        for attacker in attackers:
            await attacker.stop()
        await stop_all(net)


def _xor(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def _holds(peer: Peer, integrity: bytes, start: int, end: int) -> bool:
    """Whether one of the peer's holdings of object ``integrity`` covers start..end."""
    return any(
        h.integrity == integrity and h.start <= start and end <= h.end
        for h in peer.replicator.holdings.all()
    )


async def test_a_writer_whose_delegation_ran_out_cannot_delete_by_backdating(
    tmp_path: Path,
) -> None:
    """A writer whose delegation expired a month ago signs a tombstone for the owner's post
    with a ``created`` time from before the expiry and shows it to every holder in
    ``release``: nothing is freed, and the post is still fetched whole."""
    from difs_p2p.delegation import build_delegation

    net = await start_peers(tmp_path / "net", 5)
    try:
        owner, writer = Identity.generate(), Identity.generate()
        prefix = f"/key/{owner.fingerprint}/blog"
        expired = time.time() - 30 * 86400
        cert = build_delegation(owner, prefix=prefix, writer=writer.public_key, expires=expired)
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * SEG))
        async with client_for(net[0], publisher=owner) as client:
            m = (await client.put(src, f"{prefix}/post1", segment_size=SEG)).manifest
        tomb = build_manifest(
            writer,
            name=m.name,
            version=m.version + 1,
            parent=m.hash,
            root=m.lineage_root,
            size=0,
            segment_size=SEG,
            segment_count=0,
            stripes=0,
            replicas=3,
            integrity=IntegrityRoot(SegmentId(bytes(32))),
            deleted=True,
            created=expired - 60,
            delegation=cert,
        )
        freed = 0
        for peer in net:
            conn = await Connection.open(peer.address, io_timeout=5.0)  # a stranger
            try:
                reply = await raw_call(conn, "release", key=m.key.hex(), proof=tomb.raw.decode())
                freed += int(reply.get("freed", 0))
            finally:
                conn.close()
        assert freed == 0  # before: every copy (860,160 bytes) freed
        assert await fetch(net, tmp_path, m.name) == src.read_bytes()
    finally:
        await stop_all(net)


async def _squat(address: tuple[str, int], key: bytes, version: int, me: Identity) -> None:
    """As a peer (any key pair), make the peer at ``address`` hold one junk segment under
    ``key``'s ``version``, range 0 (a `hold` with a `place` reason)."""
    junk = os.urandom(100)
    seg_id = segments.segment_hash(junk)
    hash_list = segments.encode_hash_list([seg_id])
    root = segments.hash_list_root(hash_list)
    conn = await Connection.open(address, io_timeout=5, credential=PeerCredential(me))
    try:
        for i, (sid, data) in enumerate(((root, hash_list), (seg_id, junk))):
            await conn.send(wire.PutSeg(request_id=i + 1, seg_id=sid, data=data))
            assert isinstance(await conn.read_frame(), wire.Ack)
        reason = {"kind": "place", "key": key.hex(), "version": version, "start": 0, "end": 0}
        await raw_call(
            conn,
            "hold",
            key=key.hex(),
            version=version,
            integrity=root.hex(),
            segment_count=1,
            start=0,
            end=0,
            reason=reason,
        )
    finally:
        conn.close()


async def test_junk_held_under_the_next_version_cannot_retire_the_current_one(
    tmp_path: Path,
) -> None:
    """A peer that makes every peer hold junk under an owner's next version blocks that
    update (it fails as already existing: no range could be placed, nothing is published)
    but cannot turn it into a loss: with peers keeping one version, the current one stays
    whole."""
    from difs_p2p.config import RepairConfig
    from difs_p2p.errors import AlreadyExistsError

    net = await start_peers(tmp_path / "net", 5, repair=RepairConfig(keep=1))
    try:
        owner = Identity.generate()
        src = tmp_path / "src"
        src.write_bytes(os.urandom(4 * SEG))
        async with client_for(net[0], publisher=owner) as client:
            await client.put(src, "/upd", segment_size=SEG, replicas=2)
        for peer in net:
            await _squat(peer.address, name_key("/upd"), 2, Identity.generate())
        update = tmp_path / "update"
        update.write_bytes(os.urandom(4 * SEG))
        async with client_for(net[0], publisher=owner) as client:
            with pytest.raises(AlreadyExistsError, match="nothing was published"):
                await client.put(update, "/upd", segment_size=SEG, replicas=2, update=True)
        # before: the update was published with no holder, and version 1 was retired
        assert await fetch(net, tmp_path, "/upd") == src.read_bytes()
    finally:
        await stop_all(net)
