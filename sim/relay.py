"""Real UDP sockets on 127.0.0.1 behind a relay that applies the network model.

Each peer gets two sockets: its own (bound to 127.0.0.1, port 0, the DHT reads and writes
it exactly as in production) and a *face*: a relay endpoint (an ``asyncio_dgram`` socket)
whose address is the one the peer advertises. A peer sends to another's face; the relay
receives the datagram there, asks the :class:`~sim.models.NetworkModel` for its fate, and,
after the delay, sends it from the sender's face to the receiver's own socket. Every peer
therefore sees every other peer at its face address, and every datagram crosses the
relay twice as far as the kernel is concerned, once as far as the model is.

The DHT runs on the real clock here, and the kernel schedules the sockets, so runs are
not bit-reproducible as in memory mode; they check that the same code works on real UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
from typing import Any

import asyncio_dgram

from difs_p2p.net import DatagramTransport, UdpNetwork
from sim.models import Address, NetworkModel

log = logging.getLogger(__name__)


class _Face:
    """The relay endpoint that stands for one peer."""

    def __init__(self, stream: asyncio_dgram.DatagramServer, public: Address, inner: Address):
        self.stream = stream
        self.public = public
        self.inner = inner
        self.task: asyncio.Task[None] | None = None


class _RelayedTransport:
    """The peer's real UDP transport; closing it also retires the peer's face."""

    def __init__(self, inner: DatagramTransport, relay: RelayNetwork, public: Address) -> None:
        self._inner = inner
        self._relay = relay
        self._public = public

    def sendto(self, data: bytes, addr: Address) -> None:
        self._inner.sendto(data, addr)

    def close(self) -> None:
        self._inner.close()
        self._relay.retire(self._public)

    def is_closing(self) -> bool:
        return self._inner.is_closing()


class RelayNetwork:
    """A :class:`difs_p2p.net.DatagramNetwork` of real sockets and a latency relay.

    Use as an async context manager: leaving it stops the relay and closes every face.
    """

    def __init__(self, model: NetworkModel, host: str = "127.0.0.1") -> None:
        self.model = model
        self.host = host
        self._faces: dict[Address, _Face] = {}
        self._by_inner: dict[Address, Address] = {}
        self._queue: list[tuple[float, int, Address, Address, bytes]] = []
        self._seq = 0
        self._wake: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.forwarded = 0

    async def __aenter__(self) -> RelayNetwork:
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [f.task for f in self._faces.values() if f.task is not None]
        if self._sender is not None:
            tasks.append(self._sender)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for face in self._faces.values():
            face.stream.close()
        self._faces.clear()

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, Address]:
        inner, inner_addr = await UdpNetwork().open_datagram(
            self.host, 0, protocol, recv_buffer=recv_buffer
        )
        stream = await asyncio_dgram.bind((self.host, 0))
        host_port: Any = stream.sockname
        public = (str(host_port[0]), int(host_port[1]))
        face = _Face(stream, public, inner_addr)
        self._faces[public] = face
        self._by_inner[inner_addr] = public
        face.task = asyncio.get_running_loop().create_task(self._receive_loop(face))
        return _RelayedTransport(inner, self, public), public

    def retire(self, public: Address) -> None:
        """The peer at ``public`` closed its socket: stop relaying to and from it."""
        face = self._faces.pop(public, None)
        if face is None:
            return
        self._by_inner.pop(face.inner, None)
        if face.task is not None:
            face.task.cancel()
        face.stream.close()

    async def _receive_loop(self, face: _Face) -> None:
        """Datagrams sent to ``face``: from a peer's own socket, bound for face's peer."""
        while True:
            try:
                data, src_addr = await face.stream.recv()
            except asyncio_dgram.TransportClosed:
                return
            except OSError:
                continue  # an ICMP error for an earlier datagram; UDP goes on
            src: Any = src_addr
            sender = self._by_inner.get((str(src[0]), int(src[1])))
            if sender is None:
                self.model.stats.unreachable += 1
                continue
            delay = self.model.fate(sender, face.public, len(data))
            if delay is None:
                continue
            due = asyncio.get_running_loop().time() + delay
            heapq.heappush(self._queue, (due, self._seq, sender, face.public, data))
            self._seq += 1
            if self._wake is not None and not self._wake.done():
                self._wake.set_result(None)

    async def _send_loop(self) -> None:
        """Forward each queued datagram when its delay is over."""
        loop = asyncio.get_running_loop()
        while True:
            while self._queue and self._queue[0][0] <= loop.time():
                _, _, sender, receiver, data = heapq.heappop(self._queue)
                src, dst = self._faces.get(sender), self._faces.get(receiver)
                if src is None or dst is None:
                    self.model.stats.unreachable += 1
                    continue
                with contextlib.suppress(OSError, asyncio_dgram.TransportClosed):
                    await src.stream.send(data, dst.inner)
                    self.forwarded += 1
            self._wake = loop.create_future()
            timer = None
            if self._queue:
                timer = loop.call_at(self._queue[0][0], self._wake_up)
            try:
                await self._wake
            finally:
                if timer is not None:
                    timer.cancel()
                self._wake = None

    def _wake_up(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
