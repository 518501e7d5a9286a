"""The networks peers run on: real sockets by default, or another implementation.

The DHT only needs a transport with ``sendto``, ``close`` and ``is_closing`` that delivers
incoming datagrams to its protocol's ``datagram_received``. :class:`UdpNetwork` gives it a
real socket; the simulator (``sim/``) supplies an in-memory network with latency, loss and
partitions, so that the same DHT code runs in both.

A storage peer needs more: a TCP listener and a UDP socket (:meth:`listen`; one port
number for both unless ``--tcp-port`` says otherwise), and outgoing TCP connections
(:meth:`connect`). :class:`HostNetwork` does both with the
host's sockets; the simulator's relay network hands the peer the same kinds of sockets but
advertises relay addresses, so that the relay applies latency, bandwidth and partitions to
every datagram and every TCP byte while the peer's code stays the same.

IPv6: a socket takes the family of the address it binds; ``::`` is dual-stack (IPv6 and,
mapped, IPv4). Whatever the socket, the DHT sees IPv4 sources as plain IPv4 text and
sends to IPv4 destinations as given (a dual-stack socket maps them):
:class:`UdpNetwork` translates at the socket's edge (``addresses.normalize_host``,
``addresses.socket_address``).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from typing import Any, Protocol

from difs_p2p.addresses import format_address, ip_of, is_ipv6, normalize_host, socket_address
from difs_p2p.errors import NetworkError


def family_of(host: str) -> socket.AddressFamily:
    """The socket family that binds or reaches ``host`` (``::`` is IPv6, dual-stack)."""
    return socket.AF_INET6 if is_ipv6(host) else socket.AF_INET


def _new_socket(host: str, kind: socket.SocketKind) -> socket.socket:
    """A socket of ``host``'s family, to bind; bound to ``::`` it takes IPv4 too
    (dual-stack), bound to another IPv6 address only IPv6. NetworkError if the host has
    no such family."""
    try:
        sock = socket.socket(family_of(host), kind)
    except OSError as exc:  # no IPv6 on this host, say
        raise NetworkError(f"cannot listen on {host}: {exc.strerror or exc}") from None
    if sock.family == socket.AF_INET6:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if host == "::" else 1)
    return sock


class DatagramTransport(Protocol):
    def sendto(self, data: bytes, addr: tuple[str, int]) -> None: ...

    def close(self) -> None: ...

    def is_closing(self) -> bool: ...


class DatagramNetwork(Protocol):
    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        """Bind ``host:port`` (0: any free port) for ``protocol``; return transport, address."""


class _Datagrams6(asyncio.DatagramProtocol):
    """The protocol of an IPv6 socket: sources as ``(host, port)`` with IPv4-mapped
    addresses as plain IPv4 text (what the DHT sees from an IPv4 socket)."""

    def __init__(self, inner: asyncio.DatagramProtocol) -> None:
        self.inner = inner

    def connection_made(self, transport: Any) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.inner.datagram_received(data, (normalize_host(str(addr[0])), int(addr[1])))

    def error_received(self, exc: Exception) -> None:
        self.inner.error_received(exc)


class _Transport6:
    """The transport of an IPv6 socket: an IPv4 destination goes out mapped when the
    socket is dual-stack; a destination of the other family raises ``OSError`` (as a
    send the kernel refuses does), never anything else."""

    def __init__(self, inner: asyncio.DatagramTransport, bound: str) -> None:
        self.inner = inner
        self.bound = bound

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        if self.bound != "::" and not is_ipv6(addr[0]):
            raise OSError(errno.EAFNOSUPPORT, "IPv4 destination on an IPv6-only socket")
        self.inner.sendto(data, socket_address(self.bound, addr[0], addr[1]))

    def close(self) -> None:
        self.inner.close()

    def is_closing(self) -> bool:
        return self.inner.is_closing()


class UdpNetwork:
    """Real UDP sockets. ``sock`` may be a socket bound beforehand (same port as TCP)."""

    def __init__(self, sock: socket.socket | None = None) -> None:
        self.sock = sock

    async def open_datagram(
        self, host: str, port: int, protocol: asyncio.DatagramProtocol, *, recv_buffer: int
    ) -> tuple[DatagramTransport, tuple[str, int]]:
        sock = self.sock
        if sock is None:
            sock = _new_socket(host, socket.SOCK_DGRAM)
            try:
                sock.bind((host, port))
            except OSError as exc:
                sock.close()
                raise NetworkError(
                    f"cannot listen on UDP {format_address(host, port)}: {exc.strerror}"
                ) from None
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, recv_buffer)
        loop = asyncio.get_running_loop()
        address = sock.getsockname()
        bound = (normalize_host(str(address[0])), int(address[1]))
        if sock.family != socket.AF_INET6:
            transport, _ = await loop.create_datagram_endpoint(lambda: protocol, sock=sock)
            return transport, bound
        v6, _ = await loop.create_datagram_endpoint(lambda: _Datagrams6(protocol), sock=sock)
        return _Transport6(v6, str(address[0])), bound


class Connector(Protocol):
    async def connect(self, address: tuple[str, int]) -> socket.socket:
        """A connected non-blocking TCP socket to ``address`` (closed if cancelled)."""


class PeerNetwork(Connector, Protocol):
    async def listen(
        self, host: str, port: int, tcp_port: int = 0
    ) -> tuple[socket.socket, DatagramNetwork]:
        """A listening TCP socket and the datagram network of the same port (of
        ``tcp_port`` for TCP when it is not 0).

        The address others reach the peer at is the one the datagram network reports when
        the DHT opens it (the relay's, in the simulator).
        """


def bind_sockets(host: str, port: int, tcp_port: int = 0) -> tuple[socket.socket, socket.socket]:
    """Bind a TCP listener and a UDP socket on the same port number (or TCP on
    ``tcp_port`` when it is not 0), on ``host`` (IPv4, IPv6, ``0.0.0.0``, ``::``).

    With port 0 the kernel picks a free TCP port and we retry until UDP is free too.
    """
    where = format_address(host, port)
    if tcp_port:
        tcp = _bind_tcp(host, tcp_port)
        try:
            udp = _bind_udp(host, port)
        except BaseException:
            tcp.close()
            raise
        return tcp, udp
    for _ in range(50 if port == 0 else 1):
        tcp = _bind_tcp(host, port)
        actual = tcp.getsockname()[1]
        udp = _new_socket(host, socket.SOCK_DGRAM)
        try:
            udp.bind((host, actual))
        except OSError as exc:
            tcp.close()
            udp.close()
            if port == 0 and exc.errno == errno.EADDRINUSE:
                continue
            if exc.errno == errno.EADDRINUSE:
                raise NetworkError(f"port {port} is in use on {host} (UDP)") from None
            raise NetworkError(
                f"cannot listen on UDP {format_address(host, actual)}: {exc.strerror}"
            ) from None
        return tcp, udp
    raise NetworkError(f"no free port on {where} for both TCP and UDP")


def _bind_tcp(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port``."""
    tcp = _new_socket(host, socket.SOCK_STREAM)
    tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        tcp.bind((host, port))
        tcp.listen(512)
    except OSError as exc:
        tcp.close()
        if exc.errno == errno.EADDRINUSE:
            raise NetworkError(f"port {port} is in use on {host} (TCP)") from None
        raise NetworkError(
            f"cannot listen on {format_address(host, port)}: {exc.strerror}"
        ) from None
    return tcp


def _bind_udp(host: str, port: int) -> socket.socket:
    udp = _new_socket(host, socket.SOCK_DGRAM)
    try:
        udp.bind((host, port))
    except OSError as exc:
        udp.close()
        if exc.errno == errno.EADDRINUSE:
            raise NetworkError(f"port {port} is in use on {host} (UDP)") from None
        raise NetworkError(
            f"cannot listen on UDP {format_address(host, port)}: {exc.strerror}"
        ) from None
    return udp


class HostNetwork:
    """The host's own sockets: what every peer and client uses outside the simulator."""

    async def listen(
        self, host: str, port: int, tcp_port: int = 0
    ) -> tuple[socket.socket, DatagramNetwork]:
        tcp, udp = bind_sockets(host, port, tcp_port)
        return tcp, UdpNetwork(udp)

    async def connect(self, address: tuple[str, int]) -> socket.socket:
        """Connect to an IP address (IPv4 or IPv6; never a name: nothing is resolved)."""
        sock = socket.socket(family_of(address[0]), socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, address)
        except BaseException:
            sock.close()
            raise
        return sock


HOST_NETWORK = HostNetwork()


async def resolve(host: str, port: int) -> list[tuple[str, int]]:
    """The addresses an operator's ``host`` names (an IP literal: itself), IPv4 first
    as getaddrinfo orders them, without blocking the loop. Only for the operator's own
    input (--bootstrap, --peer, --advertise, $DIFS_PEER): names a peer sends are never
    resolved. ``NetworkError`` naming the host when it does not resolve."""
    if ip_of(host) is not None:
        return [(normalize_host(host), port)]
    loop = asyncio.get_running_loop()
    try:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_DGRAM)
    except (OSError, UnicodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise NetworkError(f"cannot resolve host name {host!r}: {reason}") from None
    found = [
        (normalize_host(str(info[4][0])), port)
        for info in infos
        if info[0] in (socket.AF_INET, socket.AF_INET6) and "%" not in str(info[4][0])
    ]
    if not found:
        raise NetworkError(f"cannot resolve host name {host!r}: no IPv4 or IPv6 address")
    return list(dict.fromkeys(found))
