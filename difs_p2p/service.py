"""The TCP service of a peer: one loop per connection, answering its requests.

Requests are read as they arrive and answered concurrently, replies leave in request order;
segments go out with sendfile. Each request is checked against the permission table
(control.CONTROL_TABLE) before any work, and a CALL's arguments are decoded there into the
operation's typed request (ops.OPS); control operations go to the peer's handlers
(``controls``, see operations.py), which answer a typed reply that the same row of ops.OPS
encodes; uploaded segments go to the connection's upload session (uploads.py), and GET_SEG
is answered from the segment store.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, BinaryIO, TypeVar

from difs_p2p import control, ops, wire
from difs_p2p.classgen import valueclass
from difs_p2p.config import PeerConfig
from difs_p2p.control import CONTROL_TABLE, OpRule, Role
from difs_p2p.drain import LEAVING
from difs_p2p.errors import (
    BusyError,
    DifsError,
    IntegrityError,
    PermissionDeniedError,
    UnsupportedError,
    UsageError,
)
from difs_p2p.identity import Identity
from difs_p2p.replicator import open_stored
from difs_p2p.store import SegmentStore
from difs_p2p.transfer import BudgetedPool, ByteBudget, Connection, IdleTimeoutError, error_code
from difs_p2p.uploads import Uploads

__all__ = ["ControlHandler", "FileReply", "RateBucket", "Service"]

log = logging.getLogger(__name__)

# The frame types a peer answers; any other closes the connection unread.
REQUEST_TYPES = frozenset(
    {wire.MsgType.HELLO, wire.MsgType.CALL, wire.MsgType.GET_SEG, wire.MsgType.PUT_SEG}
)

# Requests answered concurrently per connection (replies still leave in order).
SERVE_PIPELINE = 16


@valueclass
class FileReply:
    """A DATA reply whose bytes come straight from a file (sent with sendfile)."""

    request_id: int
    file: BinaryIO
    offset: int
    length: int


Reply = wire.Frame | FileReply | None


async def _ready(frame: wire.Frame) -> Reply:
    return frame


def _give_back(pool: BudgetedPool, buf: bytearray, answer: asyncio.Task[Reply]) -> None:
    """Return a frame's receive buffer once its answer is done; a cancelled answer may
    have left a worker thread still reading it, so that buffer is not reused."""
    if answer.cancelled():
        pool.drop(buf)
    else:
        pool.give(buf)


def _release(window: ByteBudget, n: int, answer: asyncio.Task[Reply]) -> None:
    """An upload's answer is done: its bytes leave the connection's window."""
    window.give(n)


def _refusal(request_id: int, exc: DifsError) -> asyncio.Task[Reply]:
    return asyncio.create_task(
        _ready(wire.Error(request_id=request_id, code=error_code(exc), message=str(exc)))
    )


@valueclass(frozen=False)
class RateBucket:
    """Requests per second with a burst; a request over the rate is refused, not delayed."""

    rate: float
    burst: float
    tokens: float
    last: float

    def allow(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
        self.last = now
        if self.tokens < 1.0:
            return False
        self.tokens -= 1.0
        return True


def _close_file(task: asyncio.Task[Reply]) -> None:
    if not task.cancelled() and task.exception() is None:
        reply = task.result()
        if isinstance(reply, FileReply):
            reply.file.close()


def _discard(task: asyncio.Task[Reply]) -> None:
    """Cancel a reply that will not be sent, closing its file if it opened one."""
    task.cancel()
    task.add_done_callback(_close_file)


def _drain(replies: asyncio.Queue[asyncio.Task[Reply] | None]) -> None:
    """Cancel replies that will not be sent (the connection is gone)."""
    while not replies.empty():
        task = replies.get_nowait()
        if task is not None:
            _discard(task)


async def _enqueue(
    replies: asyncio.Queue[asyncio.Task[Reply] | None],
    writer: asyncio.Task[None],
    task: asyncio.Task[Reply] | None,
) -> bool:
    """Queue a reply for ``writer``, waiting for room; False (the reply discarded) if the
    writer has ended, as when a send failed: its queue will never drain."""
    if not writer.done():
        if not replies.full():
            replies.put_nowait(task)
            return True
        put = asyncio.ensure_future(replies.put(task))
        try:
            await asyncio.wait((put, writer), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not put.done():
                put.cancel()  # nothing is queued by a cancelled put
        if put.done() and not put.cancelled():
            return True
    if task is not None:
        _discard(task)
    return False


Req = TypeVar("Req", bound=ops.Op[Any])
Rep = TypeVar("Rep")

# A control operation's handler: (connection, typed request) -> typed reply, the request
# and reply classes of the operation's row in ops.OPS (the service decodes the one and
# encodes the other; a handler never sees the CALL's arguments).
ControlHandler = Callable[[Connection, Req], Awaitable[Rep]]


def _reply_body(op: str, reply: object) -> dict[str, Any]:
    """The REPLY body for a handler's typed reply to ``op``; TypeError (a bug here, answered
    as INTERNAL) if the handler answered anything but the operation's reply class."""
    codec = ops.OPS[op]
    if not isinstance(reply, codec.reply):
        raise TypeError(f"the {op} handler answered a {type(reply).__name__}")
    return codec.encode_reply(reply)


class Service:
    """Answers the TCP connections of a running peer (``serve`` is the server's handler)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: Identity,
        token: bytes,
        store: SegmentStore,
        uploads: Uploads,
        controls: dict[str, ControlHandler[Any, Any]],
        budget: ByteBudget,
        open_work: RateBucket,
        leaving: Callable[[], bool] = lambda: False,
    ) -> None:
        self.config = config
        self.identity = identity
        self.token = token
        self.store = store
        self.uploads = uploads
        # the peer's handlers by operation name (consulted per request)
        self.controls = controls
        # the peer's upload buffers, shared by all its connections
        self.budget = budget
        # the rate of open-to-strangers requests that cost work
        self.open_work = open_work
        # whether the peer is leaving the network (draining): it takes no new segments
        self.leaving = leaving
        # segment bytes sent (GET_SEG replies), for metrics.py
        self.served_bytes = 0
        # the most segment bytes one connection has had received and not answered
        # (never past config.upload_window)
        self.window_peak = 0

    async def serve(self, conn: Connection) -> None:
        """Serve a connection; when it closes, free what its uploads left unpublished."""
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            # the peer is stopping: the next start drops the pending rows, and the
            # maintenance collects placed but unpublished ranges after the grace time
            self.uploads.forget(conn)
            raise
        finally:
            await self.uploads.closed(conn)

    async def _serve(self, conn: Connection) -> None:
        """Answer frames on one connection until the peer closes it.

        Requests are read as they arrive and answered concurrently (up to
        ``SERVE_PIPELINE`` at once), but replies leave in request order, so clients can
        pipeline. Segment bytes go out with sendfile, without passing through Python.

        Each request is checked against the permission table (control.CONTROL_TABLE)
        in this loop, before any work: a stranger's upload is refused from its header,
        before its payload is read, and the connection closes. Upload buffers are taken
        from the peer's upload budget. A connection without a request for
        ``idle_timeout`` (HELLOs do not count) is closed.
        """
        replies: asyncio.Queue[asyncio.Task[Reply] | None] = asyncio.Queue(SERVE_PIPELINE)
        writer = asyncio.create_task(self._write_replies(conn, replies))
        pool = BudgetedPool(self.budget, SERVE_PIPELINE // 4, conn.io_timeout)
        # segment bytes received on this connection and not answered yet (upload_window)
        window = ByteBudget(self.config.upload_window)
        try:
            while not writer.done():
                buf: bytearray | None = None
                held = 0
                try:
                    header = await self._next_header(conn, writer)
                    if header is None:
                        break
                    if header.type not in REQUEST_TYPES:
                        # a reply, DATA or ACK is never a request: refused from the
                        # header, its payload never read
                        unexpected = wire.Error(
                            request_id=header.request_id,
                            code=wire.ErrorCode.BAD_REQUEST,
                            message=f"unexpected {header.type.name} frame",
                        )
                        await _enqueue(replies, writer, asyncio.create_task(_ready(unexpected)))
                        break
                    if header.type != wire.MsgType.HELLO:
                        conn.last_work = time.monotonic()  # a request is arriving
                    if header.type == wire.MsgType.PUT_SEG:
                        if not self._may(conn, CONTROL_TABLE["PUT_SEG"], None):
                            # refused from the header: the payload is never read
                            refused = PermissionDeniedError(
                                "uploads need a peer's or the operator's proof (HELLO)"
                            )
                            await _enqueue(replies, writer, _refusal(header.request_id, refused))
                            break
                        if self.leaving():
                            # refused from the header, as above: the sender moves on
                            busy = BusyError(LEAVING)
                            await _enqueue(replies, writer, _refusal(header.request_id, busy))
                            break
                        # past the window the payload waits unread (the sender's TCP
                        # stalls) until an answer of this connection is done
                        held = min(header.length, window.limit)
                        await window.take(held)
                        self.window_peak = max(self.window_peak, window.used)
                        # the segment is a view of this buffer until its answer is done
                        try:
                            buf = await pool.take(header.length)
                        except BusyError as exc:
                            window.give(held)
                            # the payload is left unread: the connection cannot go on
                            await _enqueue(replies, writer, _refusal(header.request_id, exc))
                            break
                    into = memoryview(buf) if buf is not None else None
                    try:
                        payload = await conn.read_payload(header, into)
                    except BaseException:
                        if buf is not None:
                            pool.drop(buf)
                        window.give(held)
                        raise
                    frame = wire.decode_payload(header, payload)
                except wire.WireError as exc:
                    bad = wire.Error(
                        request_id=0, code=wire.ErrorCode.BAD_REQUEST, message=str(exc)
                    )
                    await _enqueue(replies, writer, asyncio.create_task(_ready(bad)))
                    break
                if isinstance(frame, wire.Hello):
                    answer, keep_open = self._hello(conn, frame)
                    if not await _enqueue(replies, writer, answer) or not keep_open:
                        break
                    continue
                conn.last_work = time.monotonic()
                conn.in_flight += 1
                answer = self._dispatch(conn, frame)
                if buf is not None:
                    answer.add_done_callback(functools.partial(_give_back, pool, buf))
                if held:
                    answer.add_done_callback(functools.partial(_release, window, held))
                # only the answer keeps the segment's buffer alive: a connection waiting
                # for its next frame (a chain kept open until ``place``) holds none
                del frame, payload, into
                buf = None
                if not await _enqueue(replies, writer, answer):
                    break  # a send failed: nothing more will be answered
        finally:
            if not await _enqueue(replies, writer, None):
                _drain(replies)
            try:
                await writer
            finally:
                _drain(replies)
                pool.close()

    async def _next_header(
        self, conn: Connection, writer: asyncio.Task[None]
    ) -> wire.Header | None:
        """The next frame header; DifsTimeoutError once the connection has been idle (no
        request received or being answered) for ``idle_timeout``. Requests left unanswered
        when the reply writer ended (a send failed) do not count."""
        idle = self.config.idle_timeout
        while True:
            # while requests are being answered, their replies will renew the idle time
            left = idle if conn.in_flight > 0 else conn.last_work + idle - time.monotonic()
            try:
                return await conn.read_header(idle=max(left, 0.001))
            except IdleTimeoutError:
                answering = conn.in_flight > 0 and not writer.done()
                if answering or conn.last_work + idle > time.monotonic():
                    continue  # still answering, or a reply went out meanwhile
                raise

    def _may(self, conn: Connection, rule: OpRule, request: object) -> bool:
        return control.permitted(Role[conn.role.upper()], rule, request)

    def _hello(self, conn: Connection, frame: wire.Hello) -> tuple[asyncio.Task[Reply], bool]:
        """Answer a HELLO: a fresh nonce, or (with a proof over the last nonce) the role
        granted. A wrong proof is refused and closes the connection."""
        me = bytes(self.identity.node_id)
        if frame.auth is None:
            conn.nonce = control.new_nonce()
            hello = wire.Hello(request_id=frame.request_id, peer=me.hex(), nonce=conn.nonce)
            return asyncio.create_task(_ready(hello)), True
        nonce, conn.nonce = conn.nonce, None
        try:
            if nonce is None:
                raise IntegrityError("a proof must follow the HELLO that sent its nonce")
            role, remote_id = control.check_proof(frame.auth, nonce, me, self.token)
        except IntegrityError as exc:
            log.info("auth_refused peer=%s reason=%s", conn.peer_address[0], exc)
            refused = PermissionDeniedError(f"authentication refused: {exc}")
            return _refusal(frame.request_id, refused), False
        conn.role, conn.remote_id = role.label, remote_id
        hello = wire.Hello(request_id=frame.request_id, peer=me.hex(), role=role.label)
        return asyncio.create_task(_ready(hello)), True

    def _dispatch(self, conn: Connection, frame: wire.Frame) -> asyncio.Task[Reply]:
        """Check a request against the permission table, then start answering it (a CALL
        with the typed request its arguments decoded to)."""
        request: object = None
        try:
            if isinstance(frame, wire.Call):
                rule = CONTROL_TABLE.get(frame.op)
                if rule is None or frame.op not in self.controls:
                    raise UnsupportedError(f"unknown operation {frame.op!r}")
                role = Role[conn.role.upper()]
                forbidden = PermissionDeniedError(
                    f"{frame.op} needs the role {rule.access.value!r}; this connection is a "
                    f"{conn.role} (see the HELLO exchange in docs/PROTOCOL.md)"
                )
                if not control.may_ask(role, rule):
                    raise forbidden
                request = rule.check(frame.args)
                if not control.permitted(role, rule, request):
                    raise forbidden
                if (
                    rule.access == control.Access.ANYONE_RATED
                    and conn.role == "stranger"
                    and not self.open_work.allow(time.monotonic())
                ):
                    raise BusyError(f"too many {frame.op} requests from strangers: try later")
        except DifsError as exc:
            return _refusal(frame.request_id, exc)
        return asyncio.create_task(self._answer(conn, frame, request))

    async def _write_replies(
        self, conn: Connection, replies: asyncio.Queue[asyncio.Task[Reply] | None]
    ) -> None:
        while (task := await replies.get()) is not None:
            try:
                reply = await task
            except DifsError as exc:
                reply = wire.Error(request_id=0, code=error_code(exc), message=str(exc))
            try:
                if isinstance(reply, FileReply):
                    try:
                        await conn.send_file(
                            reply.request_id, reply.file, reply.offset, reply.length
                        )
                        self.served_bytes += reply.length
                    finally:
                        reply.file.close()
                elif reply is not None:
                    await conn.send(reply)
            finally:
                if not isinstance(reply, wire.Hello):
                    conn.in_flight = max(0, conn.in_flight - 1)
                    conn.last_work = time.monotonic()

    async def _answer(self, conn: Connection, frame: wire.Frame, request: object) -> Reply:
        try:
            return await self._answer_frame(conn, frame, request)
        except DifsError as exc:
            return wire.Error(request_id=frame.request_id, code=error_code(exc), message=str(exc))
        except Exception as exc:
            # A bug must not leave the caller waiting for a reply that never comes.
            log.exception("request_failed frame=%s", type(frame).__name__)
            return wire.Error(
                request_id=frame.request_id,
                code=wire.ErrorCode.INTERNAL,
                message=f"internal error in the peer ({type(exc).__name__})",
            )

    async def _answer_frame(self, conn: Connection, frame: wire.Frame, request: object) -> Reply:
        if isinstance(frame, wire.Call):
            handler = self.controls[frame.op]
            reply = await handler(conn, request)
            return wire.Reply(request_id=frame.request_id, body=_reply_body(frame.op, reply))
        if isinstance(frame, wire.PutSeg):
            stored = await self.uploads.receive(conn, frame.seg_id, frame.data)
            return wire.Ack(request_id=frame.request_id, seg_id=frame.seg_id, stored=stored)
        if isinstance(frame, wire.GetSeg):
            # In the loop, not a thread: a stat and an open, while the hop to a thread and
            # back cost a fetch 1-2 ms of time to first byte (sendfile reads the file from
            # the loop anyway).
            return self._open_segment(frame)
        raise UsageError(f"unexpected {type(frame).__name__} frame")

    def _open_segment(self, frame: wire.GetSeg) -> FileReply:
        """Open a stored segment for sending (the fetcher verifies what it receives)."""
        fh, size = open_stored(self.store, frame.seg_id)
        if frame.offset > size:
            fh.close()
            raise UsageError(f"offset {frame.offset} is past the segment's {size} bytes")
        length = size - frame.offset
        if frame.length:
            length = min(length, frame.length)
        return FileReply(frame.request_id, fh, frame.offset, length)
