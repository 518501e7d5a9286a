"""The host's network: a peer's TCP listener and UDP socket on one port, datagrams,
outgoing connections and the errors of ports in use or closed (127.0.0.1, port 0)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from difs_p2p.errors import NetworkError
from difs_p2p.net import HOST_NETWORK, DatagramTransport, UdpNetwork, bind_sockets

TIMEOUT = 10.0


class Inbox(asyncio.DatagramProtocol):
    """Collects the datagrams it receives in a queue."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[tuple[bytes, tuple[str, int]]] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait((data, addr))

    async def next(self) -> tuple[bytes, tuple[str, int]]:
        return await asyncio.wait_for(self.queue.get(), TIMEOUT)


class Endpoint:
    """A listener and the datagram transport of its port, as a peer opens them."""

    def __init__(
        self, tcp: socket.socket, udp: DatagramTransport, address: tuple[str, int], inbox: Inbox
    ) -> None:
        self.tcp, self.udp, self.address, self.inbox = tcp, udp, address, inbox

    def close(self) -> None:
        self.udp.close()
        self.tcp.close()


async def open_endpoint() -> Endpoint:
    tcp, datagrams = await HOST_NETWORK.listen("127.0.0.1", 0)
    inbox = Inbox()
    udp, address = await datagrams.open_datagram("127.0.0.1", 0, inbox, recv_buffer=1 << 20)
    return Endpoint(tcp, udp, address, inbox)


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Endpoint, Endpoint]]:
    a, b = await open_endpoint(), await open_endpoint()
    yield a, b
    a.close()
    b.close()


async def test_listen_binds_tcp_and_udp_on_one_port(pair: tuple[Endpoint, Endpoint]) -> None:
    """The datagram network of a listener reports the listener's own port."""
    for end in pair:
        host, port = end.tcp.getsockname()
        assert end.address == (host, port) == ("127.0.0.1", port)
        assert port != 0
    assert pair[0].address != pair[1].address


async def test_datagrams_go_both_ways(pair: tuple[Endpoint, Endpoint]) -> None:
    """A datagram sent to a peer's address arrives whole, from the sender's address."""
    a, b = pair
    a.udp.sendto(b"ping", b.address)
    assert await b.inbox.next() == (b"ping", a.address)
    big = bytes(range(256)) * 32
    b.udp.sendto(big, a.address)
    assert await a.inbox.next() == (big, b.address)


async def test_connect_reaches_the_listener(pair: tuple[Endpoint, Endpoint]) -> None:
    """connect gives a non-blocking socket connected to the listener; bytes flow both ways."""
    loop = asyncio.get_running_loop()
    listener = pair[0].tcp
    listener.setblocking(False)
    client = await asyncio.wait_for(HOST_NETWORK.connect(pair[0].address), TIMEOUT)
    server, _ = await asyncio.wait_for(loop.sock_accept(listener), TIMEOUT)
    try:
        assert client.getblocking() is False
        assert client.getpeername() == pair[0].address
        await loop.sock_sendall(client, b"hello")
        assert await asyncio.wait_for(loop.sock_recv(server, 5), TIMEOUT) == b"hello"
        await loop.sock_sendall(server, b"back")
        assert await asyncio.wait_for(loop.sock_recv(client, 4), TIMEOUT) == b"back"
    finally:
        client.close()
        server.close()


async def test_connect_to_a_closed_port_is_refused() -> None:
    """Connecting to a port nobody listens on raises ConnectionRefusedError."""
    tcp, udp = bind_sockets("127.0.0.1", 0)
    address = tcp.getsockname()
    tcp.close()
    udp.close()
    with pytest.raises(ConnectionRefusedError):
        await asyncio.wait_for(HOST_NETWORK.connect(address), TIMEOUT)


async def test_a_port_in_use_is_a_network_error() -> None:
    """Listening on a port another socket holds (TCP or UDP) is a NetworkError."""
    tcp, udp = bind_sockets("127.0.0.1", 0)
    port = tcp.getsockname()[1]
    try:
        with pytest.raises(NetworkError, match=f"port {port} is in use"):
            await HOST_NETWORK.listen("127.0.0.1", port)
        with pytest.raises(NetworkError, match=f"cannot listen on UDP 127.0.0.1:{port}"):
            await UdpNetwork().open_datagram("127.0.0.1", port, Inbox(), recv_buffer=1 << 16)
    finally:
        tcp.close()
        udp.close()


def _udp_port_free_for_tcp() -> tuple[socket.socket, int]:
    """A UDP socket bound to a port whose TCP number is free (another test's connection
    may have that number as its local port: then another port is taken)."""
    for _ in range(50):
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        udp.bind(("127.0.0.1", 0))
        port = udp.getsockname()[1]
        probe = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            probe.bind(("127.0.0.1", port))
            return udp, port
        except OSError:
            udp.close()
        finally:
            probe.close()
    raise AssertionError("no UDP port whose TCP number is free")


async def test_a_udp_port_in_use_is_a_network_error() -> None:
    """A port free for TCP but taken for UDP is refused, naming UDP."""
    taken, port = _udp_port_free_for_tcp()
    try:
        with pytest.raises(NetworkError, match=r"in use on 127.0.0.1 \(UDP\)"):
            bind_sockets("127.0.0.1", port)
    finally:
        taken.close()


async def test_an_address_not_of_this_host_is_a_network_error() -> None:
    """Binding an address the host does not have is a NetworkError, not an OSError."""
    with pytest.raises(NetworkError, match=r"cannot listen on 192\.0\.2\.1:0"):
        bind_sockets("192.0.2.1", 0)


async def test_udp_network_binds_its_own_socket() -> None:
    """Without a socket given, UdpNetwork binds one on any free port."""
    inbox, sender = Inbox(), Inbox()
    udp, address = await UdpNetwork().open_datagram("127.0.0.1", 0, inbox, recv_buffer=1 << 16)
    other, other_address = await UdpNetwork().open_datagram(
        "127.0.0.1", 0, sender, recv_buffer=1 << 16
    )
    try:
        assert address[1] != 0
        other.sendto(b"x", address)
        assert await inbox.next() == (b"x", other_address)
    finally:
        udp.close()
        other.close()


@pytest.mark.parametrize(
    ("host", "family", "v6only"),
    [("::1", socket.AF_INET6, 1), ("::", socket.AF_INET6, 0), ("0.0.0.0", socket.AF_INET, None)],
)
def test_sockets_take_the_family_of_their_address(
    host: str, family: socket.AddressFamily, v6only: int | None
) -> None:
    """IPv6 addresses bind IPv6 sockets on one port; :: is dual-stack, others v6-only."""
    tcp, udp = bind_sockets(host, 0)
    try:
        assert tcp.family == udp.family == family
        assert tcp.getsockname()[1] == udp.getsockname()[1]
        if v6only is not None:
            for sock in (tcp, udp):
                assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == v6only
    finally:
        tcp.close()
        udp.close()


def test_a_separate_tcp_port_binds_tcp_there() -> None:
    """With a TCP port given, TCP listens there and UDP on its own port."""
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    wanted = probe.getsockname()[1]
    probe.close()
    tcp, udp = bind_sockets("127.0.0.1", 0, tcp_port=wanted)
    try:
        assert tcp.getsockname()[1] == wanted
        assert udp.getsockname()[1] != 0
    finally:
        tcp.close()
        udp.close()
