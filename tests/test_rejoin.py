"""A peer cut off from the network notices, says so, and rejoins when the link is back."""

from __future__ import annotations

import asyncio
import dataclasses
import logging

import pytest

from difs_p2p.dht import Dht
from difs_p2p.membership import ISOLATED, OK
from difs_p2p.net import DatagramTransport, UdpNetwork
from difs_p2p.recordstore import AcceptAll
from tests.helpers import FAST_DHT, new_dht, stop_all, wait_for

# liveness pings every 0.1 s, one missed reply evicts: a cut is noticed in well under 1 s
PARTITION_DHT = dataclasses.replace(
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

    def __init__(self) -> None:
        self.cut = False

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        transport, address = await UdpNetwork().open_datagram(
            host, port, _Link(protocol, self), recv_buffer=recv_buffer
        )
        return _Transport(transport, self), address


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
    nodes = [new_dht(AcceptAll(), PARTITION_DHT) for _ in range(3)]
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
