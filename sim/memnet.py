"""An in-memory datagram network for the DHT, on the virtual-time loop.

:class:`MemoryNetwork` implements :class:`difs_p2p.net.DatagramNetwork`: ``Dht.start(...,
network=...)`` gets a :class:`MemoryTransport` instead of a UDP socket. ``sendto`` asks the
:class:`~sim.models.NetworkModel` for the datagram's fate (lost, cut by a partition, or
delayed) and schedules the delivery with ``loop.call_at``; delivery calls the receiving
protocol's ``datagram_received`` with the sender's address, exactly as asyncio's UDP
transport does. A peer that closed its transport receives nothing (a crash looks like
this). There is no receive buffer to overflow: ``recv_buffer`` is accepted and ignored.
"""

from __future__ import annotations

import asyncio

from difs_p2p.errors import NetworkError
from difs_p2p.net import DatagramTransport
from sim.models import Address, NetworkModel


class MemoryTransport:
    """One peer's endpoint on a :class:`MemoryNetwork`."""

    __slots__ = ("_closed", "address", "network", "protocol")

    def __init__(
        self, network: MemoryNetwork, address: Address, protocol: asyncio.DatagramProtocol
    ) -> None:
        self.network = network
        self.address = address
        self.protocol = protocol
        self._closed = False

    def sendto(self, data: bytes, addr: Address) -> None:
        if not self._closed:
            self.network.send(self.address, (str(addr[0]), int(addr[1])), bytes(data))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.network.detach(self.address)

    def is_closing(self) -> bool:
        return self._closed


class MemoryNetwork:
    """Every endpoint of the simulation, by address (see the module docstring)."""

    def __init__(self, model: NetworkModel) -> None:
        self.model = model
        self.endpoints: dict[Address, MemoryTransport] = {}
        self._next_port = 40000

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, Address]:
        if port == 0:
            port = self._free_port(host)
        address = (host, port)
        if address in self.endpoints:
            raise NetworkError(f"address {host}:{port} is in use in the simulated network")
        transport = MemoryTransport(self, address, protocol)
        self.endpoints[address] = transport
        return transport, address

    def _free_port(self, host: str) -> int:
        while (host, self._next_port) in self.endpoints:
            self._next_port += 1
        return self._next_port

    def detach(self, address: Address) -> None:
        self.endpoints.pop(address, None)

    def send(self, src: Address, dst: Address, data: bytes) -> None:
        delay = self.model.fate(src, dst, len(data))
        if delay is None:
            return
        loop = asyncio.get_running_loop()
        loop.call_at(loop.time() + delay, self._deliver, src, dst, data)

    def _deliver(self, src: Address, dst: Address, data: bytes) -> None:
        endpoint = self.endpoints.get(dst)
        if endpoint is None:
            self.model.stats.unreachable += 1
            return
        endpoint.protocol.datagram_received(data, src)
