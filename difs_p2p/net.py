"""The networks peers run on: real sockets by default, or another implementation.

The DHT only needs a transport with ``sendto``, ``close`` and ``is_closing`` that delivers
incoming datagrams to its protocol's ``datagram_received``. :class:`UdpNetwork` gives it a
real socket; the simulator (``sim/``) supplies an in-memory network with latency, loss and
partitions, so that the same DHT code runs in both.

A storage peer needs more: a TCP listener and a UDP socket on one port (:meth:`listen`),
and outgoing TCP connections (:meth:`connect`). :class:`HostNetwork` does both with the
host's sockets; the simulator's relay network hands the peer the same kinds of sockets but
advertises relay addresses, so that the relay applies latency, bandwidth and partitions to
every datagram and every TCP byte while the peer's code stays the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import Protocol

from difs_p2p.errors import NetworkError


class DatagramTransport(Protocol):
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...


class DatagramNetwork(Protocol):
    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        """Bind ``host:port`` (0: any free port) for ``protocol``; return transport, address."""


class UdpNetwork:
    """Real UDP sockets. ``sock`` may be a socket bound beforehand (same port as TCP)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        sock = self.sock
        if sock is None:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise NetworkError(f"cannot listen on UDP {host}:{port}: {exc.strerror}") from None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
        address = sock.getsockname()
        return transport, (str(address[0]), int(address[1]))


class Connector(Protocol):
    async def connect(self, address: tuple[str, int]) -> socket.socket:
        """A connected non-blocking TCP socket to ``address`` (closed if cancelled)."""


class PeerNetwork(Connector, Protocol):
    async def listen(self, host: str, port: int) -> tuple[socket.socket, DatagramNetwork]:
        """A listening TCP socket and the datagram network of the same port.

        The address others reach the peer at is the one the datagram network reports when
        the DHT opens it (the relay's, in the simulator).
        """


def bind_sockets(host: str, port: int) -> tuple[socket.socket, socket.socket]:
    """Bind a TCP listener and a UDP socket on the same port number.

    With port 0 the kernel picks a free TCP port and we retry until UDP is free too.
    """
    for _ in range(50 if port == 0 else 1):
        tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            tcp.bind((host, port))
        except OSError as exc:
            tcp.close()
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(f"port {port} is in use on {host} (TCP)") from None
            raise NetworkError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
        actual = tcp.getsockname()[1]
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            udp.bind((host, actual))
        except OSError as exc:
            tcp.close()
            udp.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(f"port {port} is in use on {host} (UDP)") from None
            raise NetworkError(f"cannot listen on UDP {host}:{actual}: {exc.strerror}") from None
        tcp.listen(512)
        return tcp, udp
    raise NetworkError(f"no free port on {host} for both TCP and UDP")


class HostNetwork:
    """The host's own sockets: what every peer and client uses outside the simulator."""

    async def listen(self, host: str, port: int) -> tuple[socket.socket, DatagramNetwork]:
        tcp, udp = bind_sockets(host, port)
        return tcp, UdpNetwork(udp)

    async def connect(self, address: tuple[str, int]) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock


HOST_NETWORK = HostNetwork()
