"""The datagram handlers: what a request that fails inside the record store does."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import umsgpack

from difs_p2p.errors import IntegrityError
from difs_p2p.recordstore import AcceptAll
from tests.helpers import start_dhts, stop_all


class RaisingPolicy(AcceptAll):
    """A policy that raises one of our errors on records starting with b"boom"."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        if value.startswith(b"boom"):
            raise IntegrityError("policy raised")
        return super().record_rank(key, value, now)


async def _ask(sock: socket.socket, addr: tuple[str, int], body: list[Any]) -> object | None:
    """Send one request from ``sock``; its reply body, or None after 1 s without one."""
    loop = asyncio.get_running_loop()
    msg_id = os.urandom(20)
    await loop.sock_sendto(sock, b"\x00" + msg_id + umsgpack.packb(body), addr)
    try:
        while True:
            data, _ = await asyncio.wait_for(loop.sock_recvfrom(sock, 9000), 1.0)
            if data[1:21] == msg_id:
                answer: object = umsgpack.unpackb(data[21:])
                return answer
    except TimeoutError:
        return None


async def test_an_error_from_the_policy_drops_the_request_and_nothing_else() -> None:
    """A store whose policy raises is dropped and counted; the error does not reach the
    event loop, and the node goes on answering."""
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    nodes = await start_dhts(2, policy=RaisingPolicy())
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    try:
        target = nodes[1]
        proto = target.protocol
        assert proto is not None
        me, key = os.urandom(20), os.urandom(20)
        dropped = proto.dropped
        reply = await _ask(sock, target.me.address, ["store", [me, key, b"boom"]])
        assert reply is None
        assert proto.dropped == dropped + 1
        assert await _ask(sock, target.me.address, ["store", [me, key, b"fine"]]) is True
        assert await _ask(sock, target.me.address, ["ping", [me]]) == target.node_id
        assert escaped == []
    finally:
        sock.close()
        await stop_all(nodes)
        loop.set_exception_handler(None)
