"""transfer.Connection and Server over real sockets on 127.0.0.1: frames round-trip, a
peer's bad bytes are a WireError and cost the connection, budgets and timeouts hold."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest

from difs_p2p import ops, wire
from difs_p2p.errors import (
    BusyError,
    DifsTimeoutError,
    RemoteNotFoundError,
    UsageError,
    WireError,
)
from difs_p2p.names import NameKey
from difs_p2p.segments import SegmentId
from difs_p2p.transfer import (
    BudgetedPool,
    ByteBudget,
    Connection,
    IdleTimeoutError,
    Server,
)

SEG_ID = SegmentId(b"\x05" * 32)


async def tcp_pair(io_timeout: float = 5.0) -> tuple[Connection, socket.socket]:
    """A Connection and the raw socket at its other end (a listener on 127.0.0.1:0)."""
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.setblocking(False)
    raw = socket.socket()
    raw.setblocking(False)
    try:
        accepting = asyncio.ensure_future(loop.sock_accept(listener))
        await loop.sock_connect(raw, listener.getsockname())
        served, _ = await accepting
    finally:
        listener.close()
    return Connection(served, io_timeout), raw


@pytest.fixture
async def pair() -> AsyncIterator[tuple[Connection, socket.socket]]:
    conn, raw = await tcp_pair()
    try:
        yield conn, raw
    finally:
        conn.close()
        raw.close()


FRAMES: list[wire.Frame] = [
    wire.Hello(request_id=0, peer="ab" * 20, nonce=b"\x01" * 32),
    wire.Call(request_id=3, op="holds", args={"key": "aa" * 20, "version": 1}),
    wire.Reply(request_id=3, body={"holds": True}),
    wire.Error(request_id=4, code=wire.ErrorCode.BUSY, message="try later"),
    wire.PutSeg(request_id=5, seg_id=SEG_ID, data=b"x" * 70_000),
    wire.GetSeg(request_id=6, seg_id=SEG_ID, offset=7, length=8),
    wire.Data(request_id=7, data=b"y" * 100),
    wire.Data(request_id=8, data=b""),
    wire.Ack(request_id=9, seg_id=SEG_ID, stored=True),
]


def same(a: wire.Frame, b: wire.Frame) -> bool:
    """Frames equal, with segment bytes compared as bytes (one side holds a view)."""
    if isinstance(a, wire.PutSeg | wire.Data) and isinstance(b, type(a)):
        return bytes(a.data) == bytes(b.data) and a.request_id == b.request_id
    return a == b


async def test_every_frame_type_round_trips_over_tcp(
    pair: tuple[Connection, socket.socket],
) -> None:
    """Each frame sent by a Connection is read back unchanged by another Connection."""
    conn, raw = pair
    other = Connection(raw, 5.0)
    for frame in FRAMES:
        await other.send(frame)
        got = await conn.read_frame()
        assert got is not None and same(got, frame), (frame, got)
    await other.send_many(FRAMES[1:4])
    for frame in FRAMES[1:4]:
        assert await conn.read_frame() == frame


async def test_a_payload_is_received_into_the_callers_buffer(
    pair: tuple[Connection, socket.socket],
) -> None:
    """read_payload with ``into`` fills the given buffer: the decoded segment is a view of it."""
    conn, raw = pair
    data = bytes(range(256)) * 1024
    raw.setblocking(True)
    raw.sendall(wire.encode_bytes(wire.Data(request_id=1, data=data)))
    header = await conn.read_header()
    assert header is not None and header.length == len(data)
    buf = bytearray(len(data) + 10)
    frame = wire.decode_payload(header, await conn.read_payload(header, memoryview(buf)))
    assert isinstance(frame, wire.Data) and isinstance(frame.data, memoryview)
    assert frame.data.obj is buf and bytes(frame.data) == data


@pytest.mark.parametrize(
    ("sent", "field"),
    [
        (b"\x02" + bytes(11), "version"),  # another protocol version
        (b"\x01\x63" + bytes(10), "type"),  # no such message type
        (wire.HEADER.pack(1, wire.MsgType.CALL, 0, 1, 17 << 20), "length"),  # oversized
        (wire.HEADER.pack(1, wire.MsgType.ACK, 0, 1, 2), "length"),  # below the minimum
        (wire.encode_header(wire.MsgType.CALL, 1, 4) + b"[1]x", "json"),  # not an object
        (wire.encode_bytes(wire.Data(request_id=1, data=b"abc"))[:14], "payload"),  # truncated
        (wire.encode_header(wire.MsgType.ACK, 1, 33)[:7], "header"),  # truncated header
    ],
    ids=["version", "type", "oversized", "undersized", "json", "cut-payload", "cut-header"],
)
async def test_a_peers_bad_bytes_are_a_wire_error(
    pair: tuple[Connection, socket.socket], sent: bytes, field: str
) -> None:
    """Garbage, a truncated frame or an oversized length raise WireError naming the field."""
    conn, raw = pair
    raw.setblocking(True)
    raw.sendall(sent)
    raw.shutdown(socket.SHUT_WR)
    with pytest.raises(WireError) as caught:
        await conn.read_frame()
    assert caught.value.field == field


async def test_the_server_closes_a_connection_that_sends_garbage() -> None:
    """A handler's WireError ends its connection: the sender sees the stream close."""
    seen: list[BaseException] = []

    async def handler(conn: Connection) -> None:
        try:
            while await conn.read_frame() is not None:
                pass
        except WireError as exc:
            seen.append(exc)
            raise

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    server = Server(listener, handler, max_connections=4, io_timeout=5.0)
    server.start()
    try:
        conn = await Connection.open(listener.getsockname()[:2], io_timeout=5.0)
        try:
            await conn.send(wire.Hello(request_id=0, peer=None))
            await asyncio.get_running_loop().sock_sendall(conn.sock, b"\xff" * 12)
            assert await conn.read_frame() is None  # closed by the server
        finally:
            conn.close()
        assert len(seen) == 1 and isinstance(seen[0], WireError)
    finally:
        await server.stop()


async def test_a_typed_request_gets_a_typed_reply_or_the_remote_error(
    pair: tuple[Connection, socket.socket],
) -> None:
    """Connection.request sends the op's CALL and decodes its REPLY; an ERROR is remote."""
    conn, raw = pair
    other = Connection(raw, 5.0)

    async def serve() -> None:
        call = await other.read_frame()
        assert isinstance(call, wire.Call) and call.op == "holds"
        assert call.args == {"key": "aa" * 20, "version": 1, "start": 0, "end": 3}
        await other.send(wire.Reply(request_id=0, body={"holds": True}))
        await other.read_frame()
        await other.send(wire.Error(request_id=0, code=wire.ErrorCode.NOT_FOUND, message="no"))
        await other.read_frame()
        await other.send(wire.Reply(request_id=0, body={"holds": "yes"}))

    server = asyncio.create_task(serve())
    request = ops.RangeRequest(NameKey(b"\xaa" * 20), 1, 0, 3)
    assert await conn.request(request) == ops.HoldsReply(True)
    with pytest.raises(RemoteNotFoundError, match="NOT_FOUND"):
        await conn.request(request)
    with pytest.raises(WireError, match="holds"):
        await conn.request(request)
    await server


async def test_a_bad_request_of_ours_is_refused_before_sending(
    pair: tuple[Connection, socket.socket],
) -> None:
    """A typed request that would not check is a UsageError; nothing reaches the peer."""
    conn, raw = pair
    with pytest.raises(UsageError):
        await conn.request(ops.ProveRequest(NameKey(b"\xaa" * 20), 1, 5, 2, b"\x00" * 32))
    raw.setblocking(False)
    with pytest.raises(BlockingIOError):
        raw.recv(1)


async def test_a_stalled_peer_times_out(pair: tuple[Connection, socket.socket]) -> None:
    """No frame within the I/O timeout is an IdleTimeoutError; a frame stalled midway a
    DifsTimeoutError."""
    conn, raw = pair
    conn.io_timeout = 0.05
    with pytest.raises(IdleTimeoutError):
        await conn.read_header()
    raw.setblocking(True)
    raw.sendall(wire.encode_bytes(wire.Data(request_id=1, data=b"z" * 100))[:40])
    with pytest.raises(DifsTimeoutError):
        await conn.read_frame()


async def test_budgets_refuse_payloads_they_cannot_hold() -> None:
    """A payload larger than the whole budget is refused at once; one that does not fit
    now is refused BUSY after the pool's wait."""
    budget = ByteBudget(1 << 20)
    pool = BudgetedPool(budget, keep=1, timeout=0.01)
    with pytest.raises(UsageError):
        await pool.take((1 << 20) + 1)
    held = await pool.take(1 << 19)
    with pytest.raises(BusyError):
        await pool.take((1 << 19) + 1)
    pool.give(held)
    assert budget.used == 0
