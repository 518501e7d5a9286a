"""Real UDP sockets on 127.0.0.1 behind a relay that applies the network model.

Each peer gets two sockets: its own (bound to 127.0.0.1, port 0, the DHT reads and writes
it exactly as in production) and a *face*: a relay endpoint (an ``asyncio_dgram`` socket)
whose address is the one the peer advertises. A peer sends to another's face; the relay
receives the datagram there, asks the :class:`~sim.models.NetworkModel` for its fate, and,
after the delay, sends it from the sender's face to the receiver's own socket. Every peer
therefore sees every other peer at its face address, and every datagram crosses the
relay twice as far as the kernel is concerned, once as far as the model is.

Full peers (``mode = "peers"``) need TCP as well: :meth:`RelayNetwork.peer_network` gives
each one a :class:`difs_p2p.net.PeerNetwork` whose listener and DHT socket are the peer's
own (one port, as in production) and whose face also listens for TCP on the face's port
number. A connection accepted at a face is joined to the peer's own listener and its bytes
are pumped both ways, each direction delayed by one drawn one-way latency and paced by the
model's bandwidth, shared by everything one face sends and everything it receives. A
peer's outgoing connections are bound before they connect, so the relay knows which face
they come from (partitions apply to TCP too: a connection across a split is refused, and
one open when the network splits is cut at its next bytes).

The DHT runs on the real clock here, and the kernel schedules the sockets, so runs are
not bit-reproducible as in memory mode; they check that the same code works on real UDP.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import heapq
import logging
import socket
from typing import Any

import asyncio_dgram

from difs_p2p.net import DatagramNetwork, DatagramTransport, UdpNetwork, bind_sockets
from sim.models import Address, NetworkModel

# Bytes read from a relayed TCP connection at a time, and chunks queued per direction
# before the relay stops reading (back-pressure: at most 4 MiB in flight each way).
PUMP_CHUNK = 256 * 1024
PUMP_QUEUE = 16

log = logging.getLogger(__name__)


class _Face:
    """The relay endpoint that stands for one peer."""

    def __init__(self, stream: asyncio_dgram.DatagramServer, public: Address, inner: Address):
        self.stream = stream
        self.public = public
        self.inner = inner
        self.task: asyncio.Task[None] | None = None
        # Full peers: the face's TCP listener and its accept loop.
        self.listener: socket.socket | None = None
        self.accept_task: asyncio.Task[None] | None = None
        # When this face's upload and download are next free (bandwidth pacing).
        self.up_free = 0.0
        self.down_free = 0.0


class _FaceDatagrams:
    """The DHT's datagram network of one full peer: its own UDP socket, seen at its face."""

    def __init__(self, relay: RelayNetwork, udp: socket.socket, public: Address) -> None:
        self._relay = relay
        self._udp = udp
        self._public = public

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, Address]:
        inner, _ = await UdpNetwork(self._udp).open_datagram(
            host, port, protocol, recv_buffer=recv_buffer
        )
        return _RelayedTransport(inner, self._relay, self._public), self._public


class RelayedPeerNetwork:
    """A :class:`difs_p2p.net.PeerNetwork` for one full peer behind the relay."""

    def __init__(self, relay: RelayNetwork) -> None:
        self.relay = relay
        self.public: Address | None = None
        # The peer's own listener (where a client on the same host connects directly).
        self.inner: Address | None = None

    async def listen(
        self, host: str, port: int, tcp_port: int = 0
    ) -> tuple[socket.socket, DatagramNetwork]:
        tcp, udp = bind_sockets(self.relay.host, 0)
        inner = tcp.getsockname()
        self.inner = (str(inner[0]), int(inner[1]))
        try:
            self.public = await self.relay.add_face(self.inner)
        except BaseException:
            tcp.close()
            udp.close()
            raise
        return tcp, _FaceDatagrams(self.relay, udp, self.public)

    async def connect(self, address: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        source: Address | None = None
        try:
            if self.public is not None and self.relay.is_face(address):
                # bound first, so the relay knows whose connection it accepts
                sock.bind((self.relay.host, 0))
                name = sock.getsockname()
                source = (str(name[0]), int(name[1]))
                self.relay.stream_sources[source] = self.public
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            if source is not None:
                self.relay.stream_sources.pop(source, None)
            raise
        return sock


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
        # Full peers: the face each bound outgoing TCP socket belongs to, until accepted.
        self.stream_sources: dict[Address, Address] = {}
        self._pumps: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RelayNetwork:
        self._sender = asyncio.get_running_loop().create_task(self._send_loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        tasks = [t for f in self._faces.values() for t in (f.task, f.accept_task) if t is not None]
        tasks.extend(self._pumps)
        if self._sender is not None:
            tasks.append(self._sender)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for face in self._faces.values():
            face.stream.close()
            if face.listener is not None:
                face.listener.close()
        self._faces.clear()

    def peer_network(self) -> RelayedPeerNetwork:
        """A network for one full peer (see the module docstring)."""
        return RelayedPeerNetwork(self)

    def is_face(self, address: tuple[str, int]) -> bool:
        return (address[0], address[1]) in self._faces

    async def add_face(self, inner: Address) -> Address:
        """A face (UDP and TCP on one port) for the full peer whose own port is ``inner``."""
        loop = asyncio.get_running_loop()
        for _ in range(50):
            stream = await asyncio_dgram.bind((self.host, 0))
            host_port: Any = stream.sockname
            public = (str(host_port[0]), int(host_port[1]))
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                listener.bind(public)
            except OSError as exc:
                listener.close()
                stream.close()
                if exc.errno == errno.EADDRINUSE:
                    continue
                raise
            listener.listen(512)
            listener.setblocking(False)
            face = _Face(stream, public, inner)
            face.listener = listener
            self._faces[public] = face
            self._by_inner[inner] = public
            face.task = loop.create_task(self._receive_loop(face))
            face.accept_task = loop.create_task(self._accept_loop(face))
            return public
        raise OSError(errno.EADDRINUSE, "no port free for both UDP and TCP on the relay")

    async def _accept_loop(self, face: _Face) -> None:
        loop = asyncio.get_running_loop()
        assert face.listener is not None
        while True:
            try:
                client, addr = await loop.sock_accept(face.listener)
            except OSError:
                return
            sender = self.stream_sources.pop((str(addr[0]), int(addr[1])), None)
            task = loop.create_task(self._join(client, sender, face))
            self._pumps.add(task)
            task.add_done_callback(self._pumps.discard)

    async def _join(self, client: socket.socket, sender: Address | None, face: _Face) -> None:
        """Carry one accepted connection to ``face``'s peer, both ways, through the model."""
        loop = asyncio.get_running_loop()
        client.setblocking(False)
        delay = self.model.stream_delay(sender, face.public)
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setblocking(False)
        try:
            if delay is None:
                return  # across a partition: refused
            await asyncio.sleep(delay)  # the SYN's way
            await loop.sock_connect(server, face.inner)
            for sock in (client, server):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            src = self._faces.get(sender) if sender else None
            ends = (sender, face.public) if sender else None
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump(client, server, src, face, ends, delay))
                tg.create_task(self._pump(server, client, face, src, ends, delay))
        except* OSError:
            pass
        finally:
            client.close()
            server.close()

    async def _pump(
        self,
        src_sock: socket.socket,
        dst_sock: socket.socket,
        up: _Face | None,
        down: _Face | None,
        ends: tuple[Address, Address] | None,
        delay: float,
    ) -> None:
        """Move bytes from ``src_sock`` to ``dst_sock``: ``delay`` late, paced by bandwidth."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue(PUMP_QUEUE)

        async def write() -> None:
            while (item := await queue.get()) is not None:
                due, data = item
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                await loop.sock_sendall(dst_sock, data)
            with contextlib.suppress(OSError):
                dst_sock.shutdown(socket.SHUT_WR)

        writer = loop.create_task(write())
        try:
            while data := await loop.sock_recv(src_sock, PUMP_CHUNK):
                if ends is not None and not self.model.reachable(*ends):
                    raise ConnectionResetError("the network split")
                self.model.stats.stream_bytes += len(data)
                now = loop.time()
                start = max(now, up.up_free if up else now, down.down_free if down else now)
                done = start + len(data) / self.model.link.bandwidth
                if up is not None:
                    up.up_free = done
                if down is not None:
                    down.down_free = done
                await queue.put((done + delay, data))
            await queue.put(None)
            await writer
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await writer

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
        for task in (face.task, face.accept_task):
            if task is not None:
                task.cancel()
        face.stream.close()
        if face.listener is not None:
            face.listener.close()

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
