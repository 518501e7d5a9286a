"""Datagram networks the DHT can run on: real UDP sockets, or another implementation.

The DHT only needs a transport with ``sendto``, ``close`` and ``is_closing`` that delivers
incoming datagrams to its protocol's ``datagram_received``. :class:`UdpNetwork` gives it a
real socket; the simulator (``sim/``) supplies an in-memory network with latency, loss and
partitions, so that the same DHT code runs in both.
"""

from __future__ import annotations

import asyncio
import contextlib
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
