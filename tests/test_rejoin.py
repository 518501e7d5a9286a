"""A peer cut off from the network notices, says so, and rejoins when the link is back."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from pathlib import Path

import pytest

from difs_p2p import classgen
from difs_p2p.config import PeerConfig
from difs_p2p.dht import Dht
from difs_p2p.errors import NetworkError
from difs_p2p.identity import Identity
from difs_p2p.membership import ISOLATED, OK
from difs_p2p.net import HOST_NETWORK, DatagramNetwork, DatagramTransport, UdpNetwork, bind_sockets
from difs_p2p.ops import PublishRequest, StatusRequest
from difs_p2p.peer import Peer
from difs_p2p.publish import check_published
from difs_p2p.recordstore import AcceptAll
from tests.helpers import FAST_DHT, client_for, new_dht, stop_all, wait_for
from tests.signed import make

# liveness pings every 0.1 s, one missed reply evicts: a cut is noticed in well under 1 s
PARTITION_DHT = classgen.replace(
    FAST_DHT,
    rpc_timeout=0.2,
    liveness_interval=0.1,
    evict_after_failures=1,
    rejoin_check=0.05,
    rejoin_min=0.05,
    rejoin_max=0.2,
)


class _Link(asyncio.DatagramProtocol):
    """Between a UDP socket and the DHT's protocol: drops what comes in while cut."""

    def __init__(self, inner: asyncio.DatagramProtocol, net: CutNetwork) -> None:
        self.inner = inner
        self.net = net

    def connection_made(self, transport: asyncio.DatagramTransport) -> None:  # type: ignore[override]
        self.inner.connection_made(transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.net.cut:
            self.inner.datagram_received(data, addr)

    def error_received(self, exc: Exception) -> None:
        self.inner.error_received(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)


class _Transport:
    """A UDP transport that drops what goes out while cut."""

    def __init__(self, inner: DatagramTransport, net: CutNetwork) -> None:
        self.inner = inner
        self.net = net

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if not self.net.cut:
            self.inner.sendto(data, addr)

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()


class CutNetwork:
    """Real UDP whose link can be cut both ways (a partition of one host)."""

    def __init__(self, udp: UdpNetwork | None = None) -> None:
        self.cut = False
        self.udp = udp or UdpNetwork()

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        transport, address = await self.udp.open_datagram(
            host, port, _Link(protocol, self), recv_buffer=recv_buffer
        )
        return _Transport(transport, self), address


class CutHost:
    """The host's sockets for a peer whose DHT link can be cut (TCP stays up, so that
    its operator can still ask it things)."""

    def __init__(self) -> None:
        self.udp: CutNetwork | None = None

    @property
    def cut(self) -> bool:
        return self.udp is not None and self.udp.cut

    @cut.setter
    def cut(self, value: bool) -> None:
        assert self.udp is not None
        self.udp.cut = value

    async def listen(
        self, host: str, port: int, tcp_port: int = 0
    ) -> tuple[socket.socket, DatagramNetwork]:
        tcp, udp = bind_sockets(host, port, tcp_port)
        self.udp = CutNetwork(UdpNetwork(udp))
        return tcp, self.udp

    async def connect(self, address: tuple[str, int]) -> socket.socket:
        return await HOST_NETWORK.connect(address)


async def _network(n: int) -> tuple[list[Dht], Dht, CutNetwork]:
    """``n`` DHT nodes and one more behind a link that can be cut, all joined."""
    nodes = [new_dht(AcceptAll(), PARTITION_DHT) for _ in range(n)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    for node in nodes[1:]:
        await node.bootstrap([nodes[0].me.address])
    net = CutNetwork()
    cut = new_dht(AcceptAll(), PARTITION_DHT)
    await cut.start("127.0.0.1", 0, network=net)
    await cut.bootstrap([nodes[0].me.address])
    return nodes, cut, net


async def test_an_isolated_peer_rejoins_when_the_link_is_back(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cut off, the routing table empties and a warning says so; once the link is back,
    the peer finds the others again (through the contacts it lost) without a restart."""
    nodes, cut, net = await _network(3)
    try:
        await wait_for(lambda: len(cut.contacts()) == 3)
        assert cut.network_state().state == OK
        caplog.set_level(logging.INFO, logger="difs_p2p.dht")
        net.cut = True
        await wait_for(lambda: cut.network_state().state == ISOLATED)
        assert cut.membership.most_seen == 3
        await wait_for(lambda: cut.membership.attempts >= 2)  # it keeps trying
        net.cut = False
        await wait_for(lambda: cut.network_state().state == OK and len(cut.contacts()) == 3)
        # the others know it again too (its pings reached them)
        await wait_for(lambda: all(cut.node_id in {c.node_id for c in n.contacts()} for n in nodes))
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(m.startswith("network_isolated") for m in warnings)
        assert any(m.startswith("network_rejoined") for m in warnings)
        assert cut.membership.attempts == 0 and cut.membership.next_attempt is None
    finally:
        await stop_all([*nodes, cut])


async def test_peers_that_leave_do_not_make_the_last_one_isolated() -> None:
    """A network that shrinks by clean shutdowns (``leave``) leaves its last peer ok."""
    # No liveness pings during the test: a ping that times out under load would evict a
    # contact as silent, and only the leaves are under test.
    config = classgen.replace(PARTITION_DHT, rpc_timeout=2.0, liveness_interval=60.0)
    nodes = [new_dht(AcceptAll(), config) for _ in range(3)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    for node in nodes[1:]:
        await node.bootstrap([nodes[0].me.address])
    try:
        await wait_for(lambda: len(nodes[0].contacts()) == 2)
        await stop_all(nodes[1:])
        await wait_for(lambda: not nodes[0].contacts())
        assert nodes[0].network_state().state == OK
        assert nodes[0].membership.most_seen == 0
    finally:
        await nodes[0].stop()


async def _peers(tmp_path: Path) -> tuple[list[Peer], Peer, CutHost]:
    """Two peers and a third whose DHT link can be cut, all joined."""
    first = Peer(PeerConfig(tmp_path / "p0", dht=PARTITION_DHT))
    await first.start()
    other = Peer(PeerConfig(tmp_path / "p1", dht=PARTITION_DHT, bootstrap=(first.address,)))
    await other.start()
    host = CutHost()
    cut = Peer(
        PeerConfig(tmp_path / "p2", dht=PARTITION_DHT, bootstrap=(first.address,)), network=host
    )
    await cut.start()
    return [first, other], cut, host


async def test_a_cut_off_peer_refuses_to_answer_for_the_network(tmp_path: Path) -> None:
    """Through an isolated peer, resolve, get and put fail with NetworkError (the name it
    holds may be stale) and a publish stores nothing; status says so; once back, it works."""
    peers, cut, host = await _peers(tmp_path)
    publisher = Identity.generate()
    source = tmp_path / "data"
    source.write_bytes(b"v1" * 1000)
    try:
        async with client_for(peers[0], publisher=publisher) as c:
            await c.put(source, "/a.com/f")
        dht = cut.dht
        assert dht is not None
        await wait_for(lambda: len(dht.contacts()) == 2)
        async with client_for(cut, publisher=publisher) as c:
            assert (await c.resolve("/a.com/f")).manifest.version == 1
            host.cut = True
            await wait_for(lambda: dht.network_state().state == ISOLATED)
            with pytest.raises(NetworkError, match=r"knows 0 others \(it knew 2\): it is cut off"):
                await c.resolve("/a.com/f")
            with pytest.raises(NetworkError, match="cut off"):
                await c.put(source, "/a.com/f", update=True)
            # the peer itself refuses to store a manifest while cut off
            v2 = make(publisher, name="/a.com/g")
            reply = await c._request(PublishRequest(v2.raw.decode(), ()))
            assert (reply.accepted, reply.winner, reply.required) == (0, None, 1)
            short = r"reached fewer than the 1 key/value peers a publish needs \(0 took it\)"
            with pytest.raises(NetworkError, match=short):
                check_published(v2, reply)
            assert dht.store.get(v2.key, time.time()) is None
            await wait_for(lambda: dht.membership.attempts >= 1)
            status = (await c._request(StatusRequest())).report
            assert (status["network"], status["routing_table"], status["most_seen"]) == (
                ISOLATED,
                0,
                2,
            )
            assert status["rejoin_attempts"] >= 1 and status["next_rejoin"] is not None
            host.cut = False
            await wait_for(lambda: dht.network_state().state == OK)
            assert (await c.resolve("/a.com/f")).manifest.version == 1
    finally:
        await stop_all([*peers, cut])


async def test_a_one_peer_network_reads_and_publishes(tmp_path: Path) -> None:
    """A peer that never saw another is not cut off: it publishes and reads alone."""
    peer = Peer(PeerConfig(tmp_path / "p0", dht=PARTITION_DHT))
    await peer.start()
    source = tmp_path / "data"
    source.write_bytes(b"x" * 5000)
    try:
        async with client_for(peer, publisher=Identity.generate()) as c:
            result = await c.put(source, "/a.com/f")
            assert result.accepted == 1
            await c.get("/a.com/f", tmp_path / "out")
            assert (tmp_path / "out").read_bytes() == source.read_bytes()
            status = (await c._request(StatusRequest())).report
            assert (status["network"], status["most_seen"]) == (OK, 0)
    finally:
        await peer.stop()


async def test_a_peer_alone_keeps_asking_its_seeds_until_one_answers() -> None:
    """A peer whose seeds were all down when it started (a restart during a partition)
    is not cut off from anything it knows, but it keeps asking them and joins once one
    is up."""
    gone = new_dht(AcceptAll(), PARTITION_DHT)
    port = await gone.start("127.0.0.1", 0)
    await gone.stop()
    alone = new_dht(AcceptAll(), PARTITION_DHT)
    await alone.start("127.0.0.1", 0)
    back = new_dht(AcceptAll(), PARTITION_DHT)
    try:
        assert await alone.bootstrap([("127.0.0.1", port)]) == 0
        assert alone.network_state().state == OK
        await wait_for(lambda: alone.membership.attempts >= 2)
        await back.start("127.0.0.1", port)
        await wait_for(lambda: [c.node_id for c in alone.contacts()] == [back.node_id])
        await wait_for(lambda: alone.membership.attempts == 0)  # reset once it has joined
    finally:
        await stop_all([alone, back])
