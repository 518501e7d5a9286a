"""TCP transport for frames (see docs/PROTOCOL.md): a connection, a server and a client.

Frames are decoded with the pure functions of :mod:`difs_p2p.wire` that its
``FrameDecoder`` (fuzzed) uses: ``parse_header`` on the 12 header bytes, ``decode_payload``
on the payload, ``truncated`` when the stream ends inside a frame; the connection only
receives and sends bytes. A peer's bad bytes raise WireError (a PeerError): the caller
closes the connection (the serving peer answers BAD_REQUEST first).

The bulk path avoids asyncio streams (about 3.5x slower than raw socket calls here): frames
are received with ``loop.sock_recv_into`` straight into preallocated buffers, and sent with
``loop.sock_sendall`` part by part, so a segment is never copied to build a frame.

Every receive runs under a deadline (``io_timeout``): a peer that stalls mid-frame is
dropped with :class:`~difs_p2p.errors.DifsTimeoutError`. Memory follows the bytes: a
payload is received in chunks as it arrives, so a header announcing 16 MiB costs nothing
until the bytes come (a caller may pass a buffer of its own once it decided to accept them).

A connection may prove a role in the HELLO exchange (:meth:`Connection.authenticate`, see
:mod:`difs_p2p.control`). The :class:`Server` bounds connections in all and per remote
address, and when it is full makes room by closing the idlest connection of the address
holding the most, so that every address gets a fair share of the slots.

The module is longer than most (about 650 lines): the connection, the server, the upload
budgets and the error codes share the connection's lifecycle and are read together.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import ipaddress
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar

import difs_p2p.wire as wire
from difs_p2p import ops
from difs_p2p.addresses import format_address, normalize_host
from difs_p2p.errors import (
    AlreadyExistsError,
    BusyError,
    CapacityError,
    ClosedBeforeReplyError,
    DeletedError,
    DifsError,
    DifsTimeoutError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    PeerError,
    PermissionDeniedError,
    RemoteAlreadyExistsError,
    RemoteBusyError,
    RemoteCapacityError,
    RemoteDeletedError,
    RemoteError,
    RemoteIntegrityError,
    RemoteNotFoundError,
    RemotePermissionDeniedError,
    RemoteRejectedError,
    RemoteTimeoutError,
    RemoteUnsupportedError,
    UnsupportedError,
    UsageError,
    WireError,
)
from difs_p2p.net import HOST_NETWORK, Connector

if TYPE_CHECKING:
    from difs_p2p.control import Credential

log = logging.getLogger(__name__)

R = TypeVar("R")

# Frames up to this size are sent with one syscall (header and payload joined); larger
# payloads go out as they are, without a copy.
_COALESCE = 64 << 10
# Payloads received without a caller's buffer grow by at most this much per receive, so
# memory follows the bytes that actually arrived.
_CHUNK = 64 << 10


class IdleTimeoutError(DifsTimeoutError):
    """No frame began within the idle time (nothing of the next frame was consumed)."""


class BufferPool:
    """Receive buffers reused from frame to frame on one connection.

    A fresh 1 MiB ``bytearray`` is zero-filled and page-faulted in while the GIL is held:
    about a third of a storing peer's Python time when an upload arrives. A buffer taken
    belongs to its frame until it is given back; at most ``keep`` are kept.
    """

    def __init__(self, keep: int, minimum: int = 0) -> None:
        self.keep = keep
        # new buffers are at least this large, so that one serves frames of any size up to it
        self.minimum = minimum
        self._free: list[bytearray] = []

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes (kept ones that are too small are dropped)."""
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                return buf
        return bytearray(max(size, self.minimum))

    def give(self, buf: bytearray) -> None:
        if len(self._free) < self.keep:
            self._free.append(buf)


# Error classes sent as codes, checked most specific first (an error a peer answered with
# and that is passed on keeps its code: see ``error_code``).
_CODES: list[tuple[type[DifsError], wire.ErrorCode]] = [
    (AlreadyExistsError, wire.ErrorCode.EXISTS),
    (DeletedError, wire.ErrorCode.DELETED),
    (NotFoundError, wire.ErrorCode.NOT_FOUND),
    (IntegrityError, wire.ErrorCode.INTEGRITY),
    (BusyError, wire.ErrorCode.BUSY),
    (CapacityError, wire.ErrorCode.NO_SPACE),
    (PermissionDeniedError, wire.ErrorCode.FORBIDDEN),
    (UnsupportedError, wire.ErrorCode.UNSUPPORTED),
    (UsageError, wire.ErrorCode.BAD_REQUEST),
    (WireError, wire.ErrorCode.BAD_REQUEST),
    (DifsTimeoutError, wire.ErrorCode.TIMEOUT),
]
# Codes received, and the error each becomes: always a RemoteError (the peer's verdict),
# also of the local class when the code carries a meaning the user needs.
_REMOTE: dict[int, type[RemoteError]] = {
    wire.ErrorCode.BAD_REQUEST: RemoteRejectedError,
    wire.ErrorCode.NOT_FOUND: RemoteNotFoundError,
    wire.ErrorCode.INTEGRITY: RemoteIntegrityError,
    wire.ErrorCode.NO_SPACE: RemoteCapacityError,
    wire.ErrorCode.FORBIDDEN: RemotePermissionDeniedError,
    wire.ErrorCode.EXISTS: RemoteAlreadyExistsError,
    wire.ErrorCode.DELETED: RemoteDeletedError,
    wire.ErrorCode.BUSY: RemoteBusyError,
    wire.ErrorCode.INTERNAL: RemoteError,
    wire.ErrorCode.UNSUPPORTED: RemoteUnsupportedError,
    wire.ErrorCode.TIMEOUT: RemoteTimeoutError,
}
assert set(_REMOTE) == set(wire.ErrorCode)


def error_code(exc: BaseException) -> wire.ErrorCode:
    """The wire code that reports ``exc`` to a remote caller (an error another peer
    answered with is passed on with its code)."""
    if isinstance(exc, RemoteError) and exc.code in _REMOTE:
        return wire.ErrorCode(exc.code)
    for cls, code in _CODES:
        if isinstance(exc, cls):
            return code
    return wire.ErrorCode.INTERNAL


def remote_error(frame: wire.Error, peer: tuple[str, int] | None = None) -> RemoteError:
    """The exception for an ERROR frame ``peer`` answered with (see errors.py)."""
    cls = _REMOTE.get(int(frame.code), RemoteError)
    name = frame.code.name if isinstance(frame.code, wire.ErrorCode) else ""
    where = f"{peer[0]}:{peer[1]}" if peer is not None else ""
    return cls(int(frame.code), frame.message, peer=where, code_name=name)


class Connection:
    """One TCP connection carrying frames, on a non-blocking socket."""

    def __init__(self, sock: socket.socket, io_timeout: float) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.io_timeout = io_timeout
        self.loop = asyncio.get_running_loop()
        self._header = bytearray(wire.HEADER_SIZE)
        self._send_lock = asyncio.Lock()
        # Held for a whole request/reply exchange (``request``, or a caller's pipelined
        # uploads), so that tasks sharing the connection take turns instead of reading
        # each other's replies. An exchange cut short (cancelled, failed) closes the
        # connection: its reply may still arrive, and nobody may read it as theirs.
        self.exchange = asyncio.Lock()
        self.closed = False
        # What the remote side proved (server side): a role name of control.Role, and the
        # node id of a peer; what the serving peer granted (client side).
        self.role = "stranger"
        self.remote_id: bytes | None = None
        # the nonce of the latest HELLO answer, consumed by the proof that follows it
        self.nonce: bytes | None = None
        # monotonic time of the last real request or reply (not HELLO): idle connections
        # are closed, and the idlest make room when the server is full
        self.last_work = time.monotonic()
        self.in_flight = 0
        try:
            name = sock.getpeername()
            # an IPv4 client of a dual-stack listener as plain IPv4 text
            self.peer_address: tuple[str, int] = (normalize_host(str(name[0])), int(name[1]))
        except OSError:
            self.peer_address = ("?", 0)

    @classmethod
    async def open(
        cls,
        address: tuple[str, int],
        *,
        io_timeout: float,
        connect_timeout: float = 5.0,
        network: Connector = HOST_NETWORK,
        credential: Credential | None = None,
        expect_id: bytes | None = None,
    ) -> Connection:
        """Connect to ``address``; with a ``credential``, prove it in the HELLO exchange
        (and refuse a peer that says its node id is not ``expect_id``, when given)."""
        try:
            async with asyncio.timeout(connect_timeout):
                sock = await network.connect(address)
        except TimeoutError:
            raise DifsTimeoutError(f"connect to {format_address(*address)} timed out") from None
        except OSError as exc:
            raise NetworkError(
                f"cannot connect to {format_address(*address)}: {exc.strerror or exc}"
            ) from None
        conn = cls(sock, io_timeout)
        if credential is not None:
            try:
                await conn.authenticate(credential, expect_id)
            except BaseException:
                conn.close()
                raise
        return conn

    async def authenticate(self, credential: Credential, expect_id: bytes | None = None) -> str:
        """Prove ``credential`` to the serving peer: HELLO, its nonce, the proof, its
        answer. The granted role; PermissionDeniedError if the peer refused the proof."""
        me = credential.node_id
        async with self.exchange:
            complete = False
            try:
                await self.send(wire.Hello(request_id=0, peer=me.hex() if me else None))
                challenge = await self.read_frame()
                if isinstance(challenge, wire.Error):
                    raise remote_error(challenge, self.peer_address)
                if not isinstance(challenge, wire.Hello) or challenge.nonce is None:
                    raise PeerError("the peer sent no HELLO nonce: it cannot authenticate")
                if challenge.peer is None:
                    raise PeerError("the peer did not say its node id")
                server_id = bytes.fromhex(challenge.peer)
                if expect_id is not None and server_id != expect_id:
                    raise PeerError(
                        f"{format_address(*self.peer_address)} is node "
                        f"{challenge.peer[:16]}, not {expect_id.hex()[:16]}"
                    )
                auth = credential.prove(challenge.nonce, server_id)
                await self.send(wire.Hello(request_id=0, peer=me.hex() if me else None, auth=auth))
                answer = await self.read_frame()
                complete = True
            finally:
                if not complete:
                    self.close()
        if isinstance(answer, wire.Error):
            self.close()
            raise remote_error(answer, self.peer_address)
        if not isinstance(answer, wire.Hello) or answer.role != auth.role:
            self.close()
            raise PeerError("the peer did not grant the role it was shown a proof of")
        self.role = answer.role
        return answer.role

    async def _recv_exactly(self, view: memoryview, *, in_payload: bool, before: int) -> None:
        """Fill ``view``; WireError if the stream ends first (``before`` bytes of the
        header or payload were received already)."""
        got, total = 0, len(view)
        while got < total:
            n = await self.loop.sock_recv_into(self.sock, view[got:])
            if n == 0:
                raise wire.truncated(in_payload, before + got)
            got += n

    async def read_header(self, idle: float | None = None) -> wire.Header | None:
        """The next frame header, or None on a clean close between frames.

        The first byte may take ``idle`` seconds (default: the I/O timeout), the rest of
        the header the I/O timeout; nothing is consumed if the first wait times out.
        """
        view = memoryview(self._header)
        try:
            async with asyncio.timeout(self.io_timeout if idle is None else idle):
                n = await self.loop.sock_recv_into(self.sock, view)
        except TimeoutError:
            raise IdleTimeoutError("peer stalled: no frame within the I/O timeout") from None
        except OSError as exc:
            raise PeerError(f"connection lost: {exc.strerror or exc}") from None
        if n == 0:
            return None
        try:
            if n < wire.HEADER_SIZE:
                async with asyncio.timeout(self.io_timeout):
                    await self._recv_exactly(view[n:], in_payload=False, before=n)
        except TimeoutError:
            raise DifsTimeoutError("peer stalled: no frame within the I/O timeout") from None
        except OSError as exc:
            raise PeerError(f"connection lost: {exc.strerror or exc}") from None
        return wire.parse_header(self._header)

    async def read_payload(self, header: wire.Header, into: memoryview | None = None) -> memoryview:
        """Receive the payload of ``header``, into ``into`` when given (must be large enough);
        else into a buffer that grows as the bytes arrive."""
        try:
            async with asyncio.timeout(self.io_timeout):
                if into is None:
                    return memoryview(await self._recv_growing(header.length))
                buf = into[: header.length]
                await self._recv_exactly(buf, in_payload=True, before=0)
        except TimeoutError:
            raise DifsTimeoutError("peer stalled mid-frame") from None
        except OSError as exc:
            raise PeerError(f"connection lost: {exc.strerror or exc}") from None
        return buf

    async def _recv_growing(self, total: int) -> bytearray:
        out = bytearray()
        while len(out) < total:
            chunk = await self.loop.sock_recv(self.sock, min(_CHUNK, total - len(out)))
            if not chunk:
                raise wire.truncated(True, len(out))
            out += chunk
        return out

    async def read_frame(self) -> wire.Frame | None:
        header = await self.read_header()
        if header is None:
            return None
        payload = await self.read_payload(header)
        return wire.decode_payload(header, payload)

    async def send(self, frame: wire.Frame) -> None:
        parts = wire.encode(frame)
        if len(parts) > 1 and sum(len(p) for p in parts) <= _COALESCE:
            parts = [b"".join(parts)]  # one syscall for a small frame
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.io_timeout):
                    for part in parts:
                        await self.loop.sock_sendall(self.sock, part)
            except TimeoutError:
                raise DifsTimeoutError("peer stopped reading") from None
            except OSError as exc:
                raise PeerError(f"connection lost: {exc.strerror or exc}") from None

    async def send_many(self, frames: Sequence[wire.Frame]) -> None:
        """Send small frames with one syscall (pipelined requests)."""
        data = b"".join(wire.encode_bytes(f) for f in frames)
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.io_timeout):
                    await self.loop.sock_sendall(self.sock, data)
            except TimeoutError:
                raise DifsTimeoutError("peer stopped reading") from None
            except OSError as exc:
                raise PeerError(f"connection lost: {exc.strerror or exc}") from None

    async def send_file(
        self,
        request_id: int,
        file: BinaryIO,
        offset: int,
        length: int,
        *,
        msg_type: wire.MsgType = wire.MsgType.DATA,
        prefix: bytes = b"",
    ) -> None:
        """Send a frame whose payload is ``prefix`` then ``length`` bytes of ``file`` from
        ``offset`` (a DATA frame, or a PUT_SEG with the segment id as prefix), the file's
        bytes with sendfile. A file that turns out shorter closes the connection."""
        header = wire.encode_header(msg_type, request_id, len(prefix) + length)
        async with self._send_lock:
            try:
                async with asyncio.timeout(self.io_timeout + length / 50e6):
                    await self.loop.sock_sendall(self.sock, header + prefix)
                    if length:
                        sent = await self.loop.sock_sendfile(self.sock, file, offset, length)
                        if sent != length:
                            self.close()  # the frame cannot be completed
                            raise PeerError(f"file ended after {sent} of {length} bytes")
            except TimeoutError:
                raise DifsTimeoutError("peer stopped reading") from None
            except OSError as exc:
                raise PeerError(f"connection lost: {exc.strerror or exc}") from None

    async def request(self, request: ops.Op[R]) -> R:
        """Send a typed control request and return its typed reply (see ops.py).

        UsageError before anything is sent if the request would not pass the peer's check;
        the remote error if the peer answers one; WireError if the reply does not decode.
        Safe to use from concurrent tasks: requests on one connection take turns.
        """
        op, args = ops.encode_request(request)
        body = await self._call(op, args)
        reply: R = ops.decode_reply(op, body)
        return reply

    async def _call(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        """Send a CALL and return its REPLY body (or raise the remote error)."""
        async with self.exchange:
            complete = False
            try:
                await self.send(wire.Call(request_id=0, op=op, args=args))
                frame = await self.read_frame()
                complete = True
            finally:
                if not complete:
                    self.close()
        if frame is None:
            raise ClosedBeforeReplyError("connection closed before the reply")
        if isinstance(frame, wire.Error):
            raise remote_error(frame, self.peer_address)
        if not isinstance(frame, wire.Reply):
            raise PeerError(f"unexpected {type(frame).__name__} frame in reply to {op}")
        return dict(frame.body)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


Handler = Callable[[Connection], Awaitable[None]]


class ByteBudget:
    """Bytes of uploads held in memory at once, across connections: a receiver takes a
    frame's size before it allocates a buffer, and gives it back when the frame is done.
    Waiters are served first come, first served."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: collections.deque[tuple[int, asyncio.Future[None]]] = collections.deque()

    async def take(self, n: int, within: float | None = None) -> None:
        """Take ``n`` bytes, waiting for room; BusyError after ``within`` seconds."""
        if n > self.limit:
            raise UsageError(f"{n} bytes exceed the whole budget of {self.limit}")
        if not self._waiters and self.used + n <= self.limit:
            self.used += n
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((n, waiter))
        try:
            async with asyncio.timeout(within):
                await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.give(n)  # granted just as it was cancelled
            raise
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                self.give(n)
            raise BusyError(f"no room for {n} bytes of uploads in {within} s: try later") from None

    def give(self, n: int) -> None:
        self.used -= n
        while self._waiters:
            size, waiter = self._waiters[0]
            if waiter.done():
                self._waiters.popleft()
                continue
            if self.used + size > self.limit:
                break
            self._waiters.popleft()
            self.used += size
            waiter.set_result(None)


class BudgetedPool:
    """A connection's upload buffers, counted against a shared :class:`ByteBudget` for as
    long as they exist (in use or kept for the next frame), so that uploads on every
    connection together never hold more than the budget. Buffers are kept only while the
    connection has an upload in flight: an idle connection holds none of the budget."""

    def __init__(self, budget: ByteBudget, keep: int, timeout: float | None = None) -> None:
        self.budget = budget
        self.keep = keep
        self.timeout = timeout
        self.in_use = 0
        self._free: list[bytearray] = []

    async def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes; BusyError if the budget has no room
        within ``timeout``."""
        while self._free:
            buf = self._free.pop()
            if len(buf) >= size:
                self.in_use += 1
                return buf
            self.budget.give(len(buf))
        await self.budget.take(size, self.timeout)
        self.in_use += 1
        return bytearray(size)

    def give(self, buf: bytearray) -> None:
        """A buffer whose frame is done: kept for the next one, or dropped."""
        self.in_use -= 1
        if self.in_use > 0 and len(self._free) < self.keep:
            self._free.append(buf)
        else:
            self.budget.give(len(buf))
            if self.in_use == 0:
                self.close()  # no upload in flight: keep nothing

    def drop(self, buf: bytearray) -> None:
        """A buffer that will not be reused (a worker thread may still read it)."""
        self.in_use -= 1
        self.budget.give(len(buf))
        if self.in_use == 0:
            self.close()

    def close(self) -> None:
        for buf in self._free:
            self.budget.give(len(buf))
        self._free.clear()


def _counted(host: str, limit_loopback: bool) -> bool:
    try:
        return limit_loopback or not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


class Server:
    """Accepts TCP connections and runs ``handler`` for each, as owned tasks.

    At most ``max_connections`` at once, and ``max_per_address`` from one remote IP
    address (loopback addresses too, unless ``limit_loopback`` is False). When all slots
    are taken, a newcomer from an address holding fewer connections than the address
    holding the most takes the slot of that address's idlest connection (one that is not
    being answered), so that no address keeps more than its share while others wait.
    """

    def __init__(
        self,
        sock: socket.socket,
        handler: Handler,
        *,
        max_connections: int,
        io_timeout: float,
        max_per_address: int | None = None,
        limit_loopback: bool = True,
    ) -> None:
        sock.setblocking(False)
        self.io_timeout = io_timeout
        self.sock = sock
        self.handler = handler
        self.max_connections = max_connections
        self.max_per_address = max_per_address or max_connections
        self.limit_loopback = limit_loopback
        self._tasks: dict[asyncio.Task[None], Connection] = {}
        # the address each connection is counted under, as accept gave it (getpeername
        # fails once the remote end has reset the connection)
        self._hosts: dict[asyncio.Task[None], str] = {}
        self._per_address: collections.Counter[str] = collections.Counter()
        # evicted connections, cancelled but maybe not done yet
        self._dying: set[asyncio.Task[None]] = set()
        self._accept_task: asyncio.Task[None] | None = None
        self.refused = 0
        self.evicted = 0

    def start(self) -> None:
        self._accept_task = asyncio.get_running_loop().create_task(self._accept_loop())

    async def _accept_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                client, address = await loop.sock_accept(self.sock)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    log.warning("accept_failed error=%s", exc.strerror)
                    await asyncio.sleep(0.1)
                    continue
                raise
            host = normalize_host(str(address[0]))
            if not self._admit(host):
                self.refused += 1
                client.close()
                continue
            try:
                conn = Connection(client, io_timeout=self.io_timeout)
            except OSError:
                client.close()
                continue
            task = loop.create_task(self._serve(conn, host))
            self._tasks[task] = conn
            self._hosts[task] = host
            self._per_address[host] += 1

    def _admit(self, host: str) -> bool:
        """Whether a connection from ``host`` may take a slot (making room if fair)."""
        mine = self._per_address[host]
        if mine >= self.max_per_address and _counted(host, self.limit_loopback):
            return False
        if len(self._tasks) < self.max_connections:
            return True
        busiest, most = self._per_address.most_common(1)[0]
        if most <= mine + 1:
            return False
        idle = [
            (conn.last_work, task)
            for task, conn in self._tasks.items()
            if self._hosts[task] == busiest and conn.in_flight == 0 and not task.done()
        ]
        if not idle:
            return False
        _, victim = min(idle, key=lambda pair: pair[0])
        victim.cancel()
        self.evicted += 1
        # its slot is given to the newcomer now; it ends at its next await
        self._forget(victim)
        self._dying.add(victim)
        victim.add_done_callback(self._dying.discard)
        return True

    def _forget(self, task: asyncio.Task[None]) -> None:
        if self._tasks.pop(task, None) is None:
            return
        host = self._hosts.pop(task)
        self._per_address[host] -= 1
        if self._per_address[host] <= 0:
            del self._per_address[host]

    async def _serve(self, conn: Connection, host: str) -> None:
        try:
            await self.handler(conn)
        except (PeerError, DifsTimeoutError) as exc:
            log.debug("connection_closed peer=%s reason=%s", conn.peer_address, exc)
        except Exception:
            log.exception("connection handler failed peer=%s", conn.peer_address)
        finally:
            conn.close()
            task = asyncio.current_task()
            if task is not None:
                self._forget(task)

    @property
    def connections(self) -> int:
        return len(self._tasks)

    def connections_from(self, host: str) -> int:
        return self._per_address.get(host, 0)

    async def stop(self) -> None:
        tasks = [t for t in (self._accept_task, *self._tasks, *self._dying) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(OSError):
            self.sock.close()
