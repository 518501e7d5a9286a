"""A storage peer: identity, DHT node, segment store and TCP service in one process.

One port number serves both UDP (the DHT) and TCP (segments and control calls). The data
directory holds everything the peer must keep across restarts::

    DATA/peer.key         Ed25519 private key (hex, mode 0600); the node ID derives from it
    DATA/control.token    the operator's credential: 32 random bytes as hex, mode 0600,
                          created once (see control.py; the CLI reads it)
    DATA/contacts.json    known contacts, rewritten atomically, used to rejoin after a restart
    DATA/records.sqlite3  DHT records and holder entries this peer stores for the network
    DATA/store/           segments (see store.py)
    DATA/address          HOST:PORT while the peer runs (how the CLI finds its local peer)
    DATA/lock             held (flock) while a peer uses the directory

The peer owns every task it starts; :meth:`Peer.stop` cancels them, closes the sockets,
saves the contacts and removes the address file.

Uploads are metered: each connection that sends segments is an *upload session*
(:class:`UploadSession`). What it sends stays pending in the store until ``place`` gives
this peer the ranges placement picks for it (the rest is deleted once the copies are
pushed), and what it placed is freed again unless ``publish`` stored the manifest, when the
client says ``abandon``, when its connection closes, or after ``orphan_grace`` without a
segment sent. Segments nothing keeps (a crash's leftovers) are collected ``orphan_grace``
after they were stored; see docs/ARCHITECTURE.md, "Orphaned uploads".
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO

from difs_p2p import control, segments, wire
from difs_p2p.config import PeerConfig
from difs_p2p.control import CONTROL_TABLE, OpRule, Role, hex_arg, int_arg
from difs_p2p.dht import Contact, Dht
from difs_p2p.errors import (
    BusyError,
    DifsError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    RemoteRejectedError,
    StorageError,
    UnsupportedError,
    UsageError,
    WireError,
)
from difs_p2p.holdproof import HolderProver, prove_message
from difs_p2p.identity import Identity
from difs_p2p.idwork import load_or_create_with_work
from difs_p2p.manifest import (
    HolderEntry,
    Manifest,
    RecordValidator,
    build_holder_entry,
    parse_holder_entry,
    parse_manifest,
    record_hash,
)
from difs_p2p.net import HOST_NETWORK, PeerNetwork
from difs_p2p.repair import (
    Holding,
    Holdings,
    Maintainer,
    Query,
    gc_due,
    holding_owner,
    range_key,
)
from difs_p2p.store import DiskCost, SegmentStore
from difs_p2p.transfer import (
    BudgetedPool,
    ByteBudget,
    Connection,
    IdleTimeoutError,
    Server,
    error_code,
)

log = logging.getLogger(__name__)

CONTACTS_VERSION = 1
# How often the contact list is saved while running (it is also saved on stop).
CONTACTS_SAVE_INTERVAL = 60.0
# Contacts kept in contacts.json: enough to rejoin even if most of them are gone.
CONTACTS_SAVED = 64

# The frame types a peer answers; any other closes the connection unread.
REQUEST_TYPES = frozenset(
    {wire.MsgType.HELLO, wire.MsgType.CALL, wire.MsgType.GET_SEG, wire.MsgType.PUT_SEG}
)

# Requests answered concurrently per connection (replies still leave in order).
SERVE_PIPELINE = 16
# Ranges placed at once by one ``place`` (each pushes to up to r peers in parallel).
PLACE_PARALLEL = 4


@dataclass(slots=True)
class UploadSession:
    """What one connection uploaded and placed but has not published yet.

    ``id`` tags the connection's pending segments in the store; ``placed`` holds the
    ranges ``place`` kept here per (key, version, integrity), freed unless ``publish``
    stores that manifest; ``active`` is the loop time of the last segment or placement,
    and ``busy`` counts placements running (a busy session never expires).
    """

    id: bytes
    active: float
    placed: dict[tuple[bytes, int, bytes], list[Holding]]
    busy: int = 0
    # set before the store forgets the session; a write still in a thread then drops its
    # own pending row (see _store_pending)
    ended: bool = False


def _store_pending(
    store: SegmentStore, session: UploadSession, seg_id: bytes, data: bytes | memoryview
) -> bool:
    """Store an uploaded segment as pending in ``session`` (in a worker thread). A write
    that finishes after the session ended (its answer was cancelled with the connection)
    drops its own pending row, so that nothing stays pending for a session that is gone."""
    stored = store.put(seg_id, data, None, session.id)
    if session.ended:
        store.end_session(session.id, [seg_id])
    return stored


def orphan_sweep_every(grace: float) -> float:
    """Seconds between two sweeps for orphans: a quarter of the grace time, between 0.1 s
    and 60 s, so an orphan is collected within 1.25 x grace (at most grace + 60 s)."""
    return min(60.0, max(0.1, grace / 4))


# Ranges asked in one holds_ranges request: ~90 bytes of JSON each, well inside a CALL
# frame's 256 KiB; a holder sharing more is asked in several requests on one connection.
MAX_PROBE_RANGES = 1024


@dataclass(frozen=True, slots=True)
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


def _refusal(request_id: int, exc: DifsError) -> asyncio.Task[Reply]:
    return asyncio.create_task(
        _ready(wire.Error(request_id=request_id, code=error_code(exc), message=str(exc)))
    )


@dataclass(slots=True)
class _Bucket:
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


ControlHandler = Callable[[Connection, dict[str, Any]], Awaitable[dict[str, Any]]]


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_contacts(path: Path) -> list[tuple[str, int]]:
    """Saved contacts as addresses; a missing or damaged file gives an empty list."""
    try:
        data = json.loads(path.read_text())
        items = data["contacts"] if data.get("version") == CONTACTS_VERSION else []
        return [(str(c["host"]), int(c["port"])) for c in items][:CONTACTS_SAVED]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


class Peer:
    """A storage peer. ``await peer.start()``, then ``await peer.stop()``."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        clock: Callable[[], float] = time.time,
        network: PeerNetwork = HOST_NETWORK,
    ) -> None:
        self.config = config
        self.clock = clock
        # The host's sockets; the simulator passes its relay network.
        self.network = network
        # The address other peers reach us at (set when the DHT socket is open).
        self.host = config.host
        self.data_dir = config.data_dir
        self.identity: Identity | None = None
        self.dht: Dht | None = None
        self.store: SegmentStore | None = None
        self.server: Server | None = None
        self.port = 0
        self.started_at = 0.0
        self._lock_file: IO[bytes] | None = None
        self.holdings: Holdings | None = None
        self.maintainer: Maintainer | None = None
        # challenges the holder entries other peers send (holdproof.py)
        self.prover: HolderProver | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._token: bytes | None = None
        self._uploads = ByteBudget(config.upload_budget)
        self._open_work = _Bucket(
            config.open_work_rate, config.open_work_burst, config.open_work_burst, 0.0
        )
        self._controls: dict[str, ControlHandler] = {
            "status": self._op_status,
            "resolve": self._op_resolve,
            "place": self._op_place,
            "hold": self._op_hold,
            "publish": self._op_publish,
            "release": self._op_release,
            "holds": self._op_holds,
            "holds_ranges": self._op_holds_ranges,
            "prove": self._op_prove,
            "check": self._op_check,
            "suspect": self._op_suspect,
            "abandon": self._op_abandon,
        }
        # every control operation has its row in the permission table, and no row is unused
        assert set(self._controls) == {op for op in CONTROL_TABLE if op.islower()}
        self._sessions: dict[Connection, UploadSession] = {}

    # -- lifecycle -------------------------------------------------------------------------

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                f"data directory {self.data_dir} is not writable: {exc.strerror or exc}"
            ) from None
        lock = (self.data_dir / "lock").open("wb")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StorageError(
                f"data directory {self.data_dir} is in use by another peer"
            ) from None
        self._lock_file = lock

    async def start(self) -> None:
        """Open the data directory, bind the port, start serving and join the network."""
        cfg = self.config
        self._prepare_data_dir()
        try:
            # the node-ID puzzle costs ~0.2 s of CPU at the first start: off the loop
            self.identity = await asyncio.to_thread(
                load_or_create_with_work, self.data_dir / "peer.key", cfg.dht.id_difficulty
            )
            self._token = control.load_or_create_token(self.data_dir / "control.token")
            cost = await asyncio.to_thread(DiskCost.of_filesystem, self.data_dir)
            self.store = await asyncio.to_thread(
                functools.partial(SegmentStore, self.data_dir / "store", cfg.capacity, cost=cost)
            )
            tcp, datagrams = await self.network.listen(cfg.host, cfg.port)
            self.dht = Dht(
                self.identity.node_id,
                RecordValidator(),
                cfg.dht,
                db_path=self.data_dir / "records.sqlite3",
                clock=self.clock,
                identity=self.identity,
            )
            self.prover = HolderProver(
                lambda: self._dht().store,
                self.spawn,
                config=cfg.proof,
                network=self.network,
                wall_clock=self.clock,
                own_key=self.identity.public_key,
            )
            self.dht.entry_gate = self.prover
            self.port = await self.dht.start(cfg.host, cfg.port, network=datagrams)
            self.host = self.dht.me.host
            self.server = Server(
                tcp,
                self._serve_uploads,
                max_connections=cfg.max_connections,
                io_timeout=cfg.io_timeout,
                max_per_address=cfg.max_connections_per_address,
                limit_loopback=cfg.tcp_limit_loopback,
            )
            self.server.start()
            self.started_at = self.clock()
            self.holdings = Holdings(self.data_dir / "holdings.sqlite3")
            self.maintainer = Maintainer(self, cfg.repair)
            await self._join()
            _atomic_write(self.data_dir / "address", f"{self.host}:{self.port}\n".encode())
            self.spawn(self._save_contacts_loop())
            self.spawn(self.maintainer.run())
            self.spawn(self._orphan_loop())
        except BaseException:
            await self.stop()
            raise

    async def _join(self) -> None:
        """Bootstrap from --bootstrap addresses (retrying), else from saved contacts."""
        cfg = self.config
        dht = self._dht()
        if cfg.bootstrap:
            delay = cfg.bootstrap_backoff
            for attempt in range(1, cfg.bootstrap_attempts + 1):
                if await dht.bootstrap(list(cfg.bootstrap)) > 0:
                    return
                if attempt < cfg.bootstrap_attempts:
                    log.info("bootstrap_retry attempt=%d delay=%.1f", attempt, delay)
                    await asyncio.sleep(delay)
                    delay *= 2
            tried = ", ".join(f"{h}:{p}" for h, p in cfg.bootstrap)
            raise NetworkError(
                f"bootstrap failed: no answer from {tried} after {cfg.bootstrap_attempts} attempts"
            )
        saved = load_contacts(self.data_dir / "contacts.json")
        if saved:
            found = await dht.bootstrap(saved)
            log.info("rejoin saved=%d contacts=%d", len(saved), found)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by the peer (cancelled by stop)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _save_contacts_loop(self) -> None:
        while True:
            await asyncio.sleep(CONTACTS_SAVE_INTERVAL)
            self.save_contacts()

    def save_contacts(self) -> None:
        if self.dht is None or self.dht.protocol is None:
            return
        contacts = self.dht.neighbors(self.dht.node_id, CONTACTS_SAVED)
        if not contacts:
            return
        data = {
            "version": CONTACTS_VERSION,
            "contacts": [{"id": c.node_id.hex(), "host": c.host, "port": c.port} for c in contacts],
        }
        try:
            _atomic_write(self.data_dir / "contacts.json", json.dumps(data, indent=1).encode())
        except OSError as exc:
            log.warning("contacts_save_failed error=%s", exc)

    async def stop(self) -> None:
        """Stop serving, cancel every task, save contacts and release the data directory."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self.server is not None:
            await self.server.stop()
            self.server = None
        self.save_contacts()
        if self.dht is not None:
            await self.dht.stop()
            self.dht = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.holdings is not None:
            self.holdings.close()
            self.holdings = None
        with contextlib.suppress(OSError):
            (self.data_dir / "address").unlink()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- accessors -------------------------------------------------------------------------

    def _dht(self) -> Dht:
        if self.dht is None:
            raise NetworkError("the peer is not running")
        return self.dht

    def _store(self) -> SegmentStore:
        if self.store is None:
            raise NetworkError("the peer is not running")
        return self.store

    @property
    def node_id(self) -> bytes:
        if self.identity is None:
            raise NetworkError("the peer is not started")
        return bytes(self.identity.node_id)

    @property
    def control_token(self) -> bytes:
        """The operator's credential (DATA/control.token), for in-process callers."""
        if self._token is None:
            raise NetworkError("the peer is not started")
        return self._token

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, self.host, self.port)

    def status(self) -> dict[str, Any]:
        """A view of this peer and of the network as it sees it."""
        dht = self._dht()
        store = self._store()
        contacts = dht.contacts()
        records, entries = dht.store.counts()
        return {
            "node_id": self.node_id.hex(),
            "address": f"{self.host}:{self.port}",
            "uptime": round(self.clock() - self.started_at, 3),
            "routing_table": len(contacts),
            "contacts": [
                {"id": c.node_id.hex(), "address": f"{c.host}:{c.port}"}
                for c in dht.neighbors(self.node_id, 10)
            ],
            "records": records,
            "entries": entries,
            "storage": {
                "used": store.used,
                "capacity": store.capacity,
                "segments": store.count,
            },
            "connections": self.server.connections if self.server else 0,
            # refused at accept (per-address or total limit), closed to make room
            "connections_refused": self.server.refused if self.server else 0,
            "connections_evicted": self.server.evicted if self.server else 0,
            "holdings": len(self.holdings_db().all()),
            "maintenance": self.maintainer.stats.as_dict() if self.maintainer else {},
            "dht": dht.traffic(),
        }

    # -- upload sessions and orphans ---------------------------------------------------------

    def _session(self, conn: Connection) -> UploadSession:
        """The upload session of a connection (a new one on its first upload)."""
        session = self._sessions.get(conn)
        if session is None:
            session = UploadSession(os.urandom(16), asyncio.get_running_loop().time(), {})
            self._sessions[conn] = session
        return session

    async def _serve_uploads(self, conn: Connection) -> None:
        """Serve a connection; when it closes, free what its uploads left unpublished."""
        try:
            await self._serve(conn)
        except asyncio.CancelledError:
            # the peer is stopping: the next start drops the pending rows, and the
            # maintenance collects placed but unpublished ranges after the grace time
            self._sessions.pop(conn, None)
            raise
        finally:
            session = self._sessions.pop(conn, None)
            if session is not None:
                await self._end_session(session, "connection closed")

    async def _end_session(self, session: UploadSession, reason: str) -> int:
        """Free the ranges a session placed but did not publish, and the segments it sent
        that nothing else keeps; the bytes freed (as charged)."""
        freed = 0
        session.ended = True
        try:
            for holdings in list(session.placed.values()):
                for h in holdings:
                    freed += await self.free_holding(h)
            session.placed.clear()
            freed += await asyncio.to_thread(self._store().end_session, session.id)
        except DifsError as exc:
            log.warning("upload_cleanup_failed reason=%s error=%s", reason, exc)
        if freed:
            log.info("upload_dropped reason=%s freed=%d", reason, freed)
        return freed

    async def _op_abandon(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The client gives up a publish: drop what this connection uploaded and placed
        but did not publish."""
        session = self._sessions.pop(conn, None)
        freed = 0 if session is None else await self._end_session(session, "abandoned")
        return {"freed": freed}

    def _published(self, conn: Connection, key: bytes, version: int, integrity: str) -> None:
        """A manifest placed on this connection is published: its ranges here stay."""
        session = self._sessions.get(conn)
        if session is not None:
            with contextlib.suppress(ValueError):
                session.placed.pop((key, version, bytes.fromhex(integrity)), None)

    async def collect_orphans(self) -> tuple[int, int]:
        """Expire upload sessions idle for the grace time and delete the segments nothing
        has kept for the grace time; (segments, bytes as charged) deleted."""
        grace = self.config.repair.orphan_grace
        now = asyncio.get_running_loop().time()
        for conn, session in list(self._sessions.items()):
            if not session.busy and now - session.active > grace:
                if self._sessions.get(conn) is session:
                    del self._sessions[conn]
                await self._end_session(session, "idle")
        live = [s.id for s in self._sessions.values()]
        return await asyncio.to_thread(self._store().collect_orphans, time.time() - grace, live)

    async def _orphan_loop(self) -> None:
        every = orphan_sweep_every(self.config.repair.orphan_grace)
        while True:
            await asyncio.sleep(every)
            try:
                await self.collect_orphans()
            except DifsError as exc:
                log.warning("orphan_sweep_failed error=%s", exc)

    # -- TCP service -----------------------------------------------------------------------

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
        pool = BudgetedPool(self._uploads, SERVE_PIPELINE // 4, conn.io_timeout)
        try:
            while not writer.done():
                buf: bytearray | None = None
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
                        # the segment is a view of this buffer until its answer is done
                        try:
                            buf = await pool.take(header.length)
                        except BusyError as exc:
                            # the payload is left unread: the connection cannot go on
                            await _enqueue(replies, writer, _refusal(header.request_id, exc))
                            break
                    into = memoryview(buf) if buf is not None else None
                    try:
                        payload = await conn.read_payload(header, into)
                    except BaseException:
                        if buf is not None:
                            pool.drop(buf)
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
        me = self.node_id
        if frame.auth is None:
            conn.nonce = control.new_nonce()
            hello = wire.Hello(request_id=frame.request_id, peer=me.hex(), nonce=conn.nonce)
            return asyncio.create_task(_ready(hello)), True
        nonce, conn.nonce = conn.nonce, None
        try:
            if nonce is None:
                raise IntegrityError("a proof must follow the HELLO that sent its nonce")
            role, remote_id = control.check_proof(frame.auth, nonce, me, self.control_token)
        except IntegrityError as exc:
            log.info("auth_refused peer=%s reason=%s", conn.peer_address[0], exc)
            refused = PermissionDeniedError(f"authentication refused: {exc}")
            return _refusal(frame.request_id, refused), False
        conn.role, conn.remote_id = role.label, remote_id
        hello = wire.Hello(request_id=frame.request_id, peer=me.hex(), role=role.label)
        return asyncio.create_task(_ready(hello)), True

    def _dispatch(self, conn: Connection, frame: wire.Frame) -> asyncio.Task[Reply]:
        """Check a request against the permission table, then start answering it."""
        try:
            if isinstance(frame, wire.Call):
                rule = CONTROL_TABLE.get(frame.op)
                if rule is None or frame.op not in self._controls:
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
                    and not self._open_work.allow(time.monotonic())
                ):
                    raise BusyError(f"too many {frame.op} requests from strangers: try later")
        except DifsError as exc:
            return _refusal(frame.request_id, exc)
        return asyncio.create_task(self._answer(conn, frame))

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
                    finally:
                        reply.file.close()
                elif reply is not None:
                    await conn.send(reply)
            finally:
                if not isinstance(reply, wire.Hello):
                    conn.in_flight = max(0, conn.in_flight - 1)
                    conn.last_work = time.monotonic()

    async def _answer(self, conn: Connection, frame: wire.Frame) -> Reply:
        try:
            return await self._answer_frame(conn, frame)
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

    async def _answer_frame(self, conn: Connection, frame: wire.Frame) -> Reply:
        if isinstance(frame, wire.Call):
            handler = self._controls[frame.op]
            body = await handler(conn, frame.args)
            return wire.Reply(request_id=frame.request_id, body=body)
        if isinstance(frame, wire.PutSeg):
            session = self._session(conn)
            stored = await asyncio.to_thread(
                _store_pending, self._store(), session, frame.seg_id, frame.data
            )
            session.active = asyncio.get_running_loop().time()
            return wire.Ack(request_id=frame.request_id, seg_id=frame.seg_id, stored=stored)
        if isinstance(frame, wire.GetSeg):
            # In the loop, not a thread: a stat and an open, while the hop to a thread and
            # back cost a fetch 1-2 ms of time to first byte (sendfile reads the file from
            # the loop anyway).
            return self._open_segment(frame)
        raise UsageError(f"unexpected {type(frame).__name__} frame")

    def _open_segment(self, frame: wire.GetSeg) -> FileReply:
        """Open a stored segment for sending (the fetcher verifies what it receives)."""
        fh, size = _open_stored(self._store(), frame.seg_id)
        if frame.offset > size:
            fh.close()
            raise UsageError(f"offset {frame.offset} is past the segment's {size} bytes")
        length = size - frame.offset
        if frame.length:
            length = min(length, frame.length)
        return FileReply(frame.request_id, fh, frame.offset, length)

    async def _op_status(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    # -- content operations (see docs/ARCHITECTURE.md, "Publish" and "Fetch") -------------

    async def _op_resolve(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The valid manifests under a name key (best first), its history and holders."""
        key = _key_arg(args)
        dht = self._dht()
        records, entries = await dht.resolve(key)
        history = [e.decode() for e in entries if e[:1] == b"{"]
        holders = [e.hex() for e in entries if e[:1] != b"{"]
        return {"manifests": [r.decode() for r in records], "history": history, "holders": holders}

    async def _op_place(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Place a just-uploaded object: r copies of each range, this peer included only
        where placement picks it.

        Range i goes to the closest live peers to BLAKE3(integrity || i) that accept it
        (a peer without space refuses and the next one is asked), r copies in all. This
        peer keeps the ranges it is among those peers for; the copies for the others are
        pushed from the uploaded segments, which are then dropped unless kept. The ranges
        kept are freed again unless ``publish`` on this connection stores the manifest.
        """
        key, version, integrity = (
            _key_arg(args),
            int_arg(args, "version"),
            hex_arg(args, "integrity", 32),
        )
        count, stripes = int_arg(args, "segment_count"), int_arg(args, "stripes")
        replicas = max(1, int_arg(args, "replicas"))
        session = self._session(conn)
        session.busy += 1
        mine: list[Holding] = []
        hashes: list[bytes] = []
        try:
            hashes = await self._hash_list(integrity, count)
            # an empty object is its hash list alone: one range of no segments
            ranges = segments.stripe_ranges(count, stripes) or [(0, 0)]
            placed = await self._place_ranges(
                key, version, integrity, count, hashes, ranges, replicas, mine
            )
        except BaseException:
            for h in mine:
                with contextlib.suppress(DifsError):
                    await self.free_holding(h)
            raise
        else:
            session.placed[(key, version, integrity)] = mine
        finally:
            session.busy -= 1
            session.active = asyncio.get_running_loop().time()
            # what placement did not give this peer is not needed here any more
            await asyncio.to_thread(self._store().end_session, session.id, [integrity, *hashes])
        return placed

    async def _place_ranges(
        self,
        key: bytes,
        version: int,
        integrity: bytes,
        count: int,
        hashes: list[bytes],
        ranges: list[tuple[int, int]],
        replicas: int,
        mine: list[Holding],
    ) -> dict[str, Any]:
        entries: list[str] = []
        sem = asyncio.Semaphore(PLACE_PARALLEL)
        warnings: list[str] = []

        async def copy(contact: Contact, start: int, end: int) -> HolderEntry:
            if contact.node_id == self.node_id:
                holding, entry = await self._hold(
                    key, version, integrity, count, start, end, hashes
                )
                if holding is not None:
                    mine.append(holding)
                return entry
            return await self.push_range(
                contact.address, key, version, integrity, start, end, None, hashes, kind="place"
            )

        async def place_range(i: int, start: int, end: int) -> dict[str, Any]:
            # the closest peers to the range key, this one included
            candidates = await self._dht().closest(range_key(integrity, i), replicas + 8)
            holders: list[str] = []
            untried = list(candidates)
            async with sem:
                # the missing copies are made in parallel; a refusal moves on to the next
                while len(holders) < replicas and untried:
                    batch = untried[: replicas - len(holders)]
                    del untried[: len(batch)]
                    made = await asyncio.gather(
                        *(copy(c, start, end) for c in batch), return_exceptions=True
                    )
                    for contact, outcome in zip(batch, made, strict=True):
                        if isinstance(outcome, DifsError):
                            log.info("place_skip peer=%s reason=%s", contact.address, outcome)
                        elif isinstance(outcome, BaseException):
                            raise outcome
                        else:
                            entries.append(outcome.raw.hex())
                            holders.append(outcome.node_id.hex())
            if len(holders) < replicas:
                warnings.append(
                    f"range {start}..{end} has {len(holders)} of {replicas} copies: only "
                    f"{len(candidates)} peers could be asked"
                )
            return {"start": start, "end": end, "holders": holders}

        placed = await asyncio.gather(*(place_range(i, a, b) for i, (a, b) in enumerate(ranges)))
        return {"entries": entries, "ranges": list(placed), "warnings": sorted(set(warnings))}

    async def _hash_list(self, integrity: bytes, count: int) -> list[bytes]:
        store = self._store()
        if not store.has(integrity):
            raise NotFoundError(f"hash list {integrity.hex()[:16]} is not stored here")
        data = await asyncio.to_thread(store.read, integrity)
        return list(segments.verify_hash_list(data, integrity, count))

    async def push_range(
        self,
        address: tuple[str, int],
        key: bytes,
        version: int,
        integrity: bytes,
        start: int,
        end: int,
        pace: Callable[[int], Awaitable[None]] | None = None,
        hashes: list[bytes] | None = None,
        *,
        kind: str = "repair",
    ) -> HolderEntry:
        """Copy segments start..end (and the hash list) to a peer; return its holder entry.

        The connection proves this peer's node key (uploads and ``hold`` need a peer), and
        ``hold`` says why (``kind``: "place" for a new upload, "repair" for a co-holder's
        copy). The peer acknowledges each segment only once it is verified and durable,
        then checks it has the whole range and signs its own holder entry.
        """
        store = self._store()
        if hashes is None:
            count = store.size_of(integrity) // segments.HASH_SIZE
            hashes = await self._hash_list(integrity, count)
        conn = await Connection.open(
            address,
            io_timeout=self.config.io_timeout,
            network=self.network,
            credential=self._peer_credential(),
        )
        try:
            ids = [integrity, *hashes[start : end + 1]]
            pending = 0
            for seg_id in ids:
                # straight from the segment file with sendfile (the receiver verifies)
                fh, size = await asyncio.to_thread(_open_stored, store, seg_id)
                try:
                    if pace is not None:
                        await pace(size)
                    await conn.send_file(
                        0, fh, 0, size, msg_type=wire.MsgType.PUT_SEG, prefix=seg_id
                    )
                finally:
                    fh.close()
                pending += 1
                if pending >= 8:
                    await _expect_ack(conn)
                    pending -= 1
            for _ in range(pending):
                await _expect_ack(conn)
            reply = await conn.call(
                "hold",
                key=key.hex(),
                version=version,
                integrity=integrity.hex(),
                segment_count=len(hashes),
                start=start,
                end=end,
                reason={
                    "kind": kind,
                    "key": key.hex(),
                    "version": version,
                    "start": start,
                    "end": end,
                },
            )
        finally:
            conn.close()
        entry = parse_holder_entry(bytes.fromhex(str(reply.get("entry", ""))))
        if (entry.key, entry.version, entry.start, entry.end) != (key, version, start, end):
            raise IntegrityError("holder signed an entry for something else")
        return entry

    async def _op_hold(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Check that segments start..end are stored here and sign a holder entry."""
        key, version, integrity = (
            _key_arg(args),
            int_arg(args, "version"),
            hex_arg(args, "integrity", 32),
        )
        count = int_arg(args, "segment_count")
        start, end = int_arg(args, "start"), int_arg(args, "end")
        reason = args.get("reason")
        if conn.role == "peer" and isinstance(reason, dict) and reason.get("kind") == "repair":
            await self._check_co_holder(conn, key, version, start, end)
        _, entry = await self._hold(key, version, integrity, count, start, end)
        return {"entry": entry.raw.hex()}

    async def _check_co_holder(
        self, conn: Connection, key: bytes, version: int, start: int, end: int
    ) -> None:
        """A peer repairing a range must hold it: its own entry for that version, covering
        the range, is in the DHT (entries are signed, so it cannot borrow another's)."""
        for raw in await self._dht().get_entries(key):
            if raw[:1] == b"{":
                continue
            with contextlib.suppress(DifsError):
                entry = parse_holder_entry(raw)
                if (
                    entry.node_id == conn.remote_id
                    and entry.version == version
                    and entry.start <= start
                    and end <= entry.end
                ):
                    return
        raise PermissionDeniedError("a repair comes from a holder of the range; this peer is not")

    def _peer_credential(self) -> control.PeerCredential:
        if self.identity is None:
            raise NetworkError("the peer is not started")
        return control.PeerCredential(self.identity)

    async def _hold(
        self,
        key: bytes,
        version: int,
        integrity: bytes,
        count: int,
        start: int,
        end: int,
        hashes: list[bytes] | None = None,
    ) -> tuple[Holding | None, HolderEntry]:
        """Keep segments start..end (and the hash list) here: refs in the store, a
        holding, and a signed holder entry. NotFoundError if one of them is not stored.

        The holding is None when this peer already held that range (nothing new to free
        if the publish fails). A holding of the same version's range with other content
        is never replaced (its refs share the owner tag, so freeing the new one would
        free the old): UsageError.
        """
        if count and not start <= end < count:
            raise UsageError("range outside the object")
        existing = await asyncio.to_thread(self.holdings_db().get, key, version, start)
        if existing is not None:
            if (existing.integrity, existing.end) != (integrity, end):
                raise UsageError(
                    f"this peer holds other content for version {version} of that name"
                )
            return None, self._sign_entry(key, version, integrity, start, end)
        if hashes is None:
            hashes = await self._hash_list(integrity, count)
        store = self._store()
        owner = holding_owner(key, version, start)
        wanted = [integrity, *hashes[start : end + 1]]
        await asyncio.to_thread(store.add_refs, wanted, owner)
        holding = Holding(key, version, integrity, count, start, end, self.clock())
        await asyncio.to_thread(self.holdings_db().add, holding)
        return holding, self._sign_entry(key, version, integrity, start, end)

    def _sign_entry(
        self, key: bytes, version: int, integrity: bytes, start: int, end: int
    ) -> HolderEntry:
        assert self.identity is not None
        return build_holder_entry(
            self.identity,
            key=key,
            version=version,
            integrity=integrity,
            start=start,
            end=end,
            host=self.host,
            port=self.port,
            issued=int(self.clock()),
        )

    def own_entries(self, key: bytes) -> list[HolderEntry]:
        """Freshly signed holder entries for everything this peer holds of ``key``."""
        return [
            self._sign_entry(h.key, h.version, h.integrity, h.start, h.end)
            for h in self.holdings_db().of_key(key)
        ]

    async def free_holding(self, h: Holding) -> int:
        """Forget a holding and delete the segments nothing else here needs; bytes freed."""
        store = self._store()
        self.holdings_db().remove(h)
        return await asyncio.to_thread(store.release, h.owner)

    async def _op_publish(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Store a signed manifest and its holder entries on the name's key/value peers.

        If every one of the k closest peers took the manifest, no other record can win
        there; otherwise (a racing publisher, a peer that did not answer) the name is read
        back to learn which record won. Peers admit entries only after the manifest they
        belong to (the record rides first in the same request); if some peer refused
        entries, they are sent again once the record is there.
        """
        raw = str(args.get("manifest", "")).encode()
        manifest = parse_manifest(raw)
        dht = self._dht()
        entries = [bytes.fromhex(str(e)) for e in args.get("entries", []) if isinstance(e, str)]
        items = [raw, *entries]
        stored = await dht.put_with_entries(manifest.key, raw, items)
        accepted = stored.accepted
        if accepted and stored.entries_accepted < accepted * len(items):
            await dht.add_entries(manifest.key, items)
        if stored.readable and stored.refused == 0 and accepted > 0:
            winner: str | None = manifest.hash
        else:
            best = await dht.get(manifest.key)
            winner = record_hash(best[0]) if best else None
            if winner == manifest.hash and not stored.readable:
                # only this peer and peers off the read paths (Sybils near the key, say)
                # serve it: not published
                winner = None
        if winner == manifest.hash:
            self._published(conn, manifest.key, manifest.version, manifest.integrity)
        if winner == manifest.hash and not manifest.deleted:
            # this peer holds what it placed: it knows the lineage at once
            await asyncio.to_thread(
                self.holdings_db().bind,
                manifest.key,
                manifest.version,
                bytes.fromhex(manifest.integrity),
                manifest.lineage,
            )
        if winner == manifest.hash and (
            manifest.deleted or manifest.version > self.config.repair.keep
        ):
            self.spawn(self._release_everywhere(manifest))
        return {
            "accepted": accepted,
            "winner": winner,
            "readable_paths": stored.readable_paths,
            "quorum": stored.quorum,
        }

    async def _release_everywhere(self, proof: Manifest) -> None:
        """Show every known holder of the name the owner's new manifest (a tombstone, or
        a version that may retire old ones), so each frees what it proves superseded."""
        dht = self._dht()
        key = proof.key
        addresses = set()
        for raw in await dht.get_entries(key):
            if raw[:1] != b"{":
                with contextlib.suppress(DifsError):
                    entry = parse_holder_entry(raw)
                    if entry.version < proof.version:
                        addresses.add((entry.host, entry.port))
        for address in addresses:
            if address == self.address:
                await self._release(key, proof)
                continue
            try:
                conn = await Connection.open(
                    address, io_timeout=self.config.io_timeout, network=self.network
                )
                try:
                    await conn.call("release", key=key.hex(), proof=proof.raw.decode())
                finally:
                    conn.close()
            except DifsError as exc:
                log.info("release_failed peer=%s reason=%s", address, exc)

    async def _op_release(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Free what an owner-signed manifest (``proof``) supersedes; open to anyone, as
        the proof alone decides."""
        key = _key_arg(args)
        proof = args.get("proof")
        if not isinstance(proof, str):
            raise UsageError(
                "release needs the owner's signed proof: a tombstone or newer manifest"
            )
        try:
            manifest = parse_manifest(proof.encode(), key)
        except WireError as exc:
            raise UsageError(f"malformed proof: {exc}") from None
        return {"freed": await self._release(key, manifest)}

    async def _release(self, key: bytes, proof: Manifest) -> int:
        """Free the holdings of ``key`` that ``proof`` supersedes in their own lineage
        (``repair.gc_due``: same owner or delegate, same lineage root, a tombstone or
        ``keep`` versions newer). Holdings whose lineage is not known yet learn it first
        from the name's view, as maintenance does; the proof alone decides what goes."""
        held = self.holdings_db().of_key(key)
        unbound = [h for h in held if h.lineage is None and h.version < proof.version]
        if unbound and self.maintainer is not None:
            held = await self.maintainer.bind_from_dht(key, held)
        keep, now = self.config.repair.keep, time.time()
        freed = 0
        for h in held:
            if gc_due(h.lineage, proof, keep, now):
                freed += await self.free_holding(h)
        return freed

    async def _op_holds(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Whether this peer holds a range (asked by other holders for failure detection)."""
        key, version = _key_arg(args), int_arg(args, "version")
        start, end = int_arg(args, "start"), int_arg(args, "end")
        return {"holds": self.holdings_db().covers(key, version, start, end)}

    async def _op_holds_ranges(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Whether this peer holds each of up to ``MAX_PROBE_RANGES`` ranges, in order (one
        request per co-holder and maintenance round)."""
        queries = _ranges_arg(args)
        db = self.holdings_db()

        def answer() -> list[bool]:
            return [db.covers(key, version, start, end) for key, version, start, end in queries]

        return {"holds": await asyncio.to_thread(answer)}

    async def _op_prove(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Prove to a DHT peer listing our entry that we hold a range: our node key's
        signature over its nonce and the range (holdproof.prove_message), if we hold it."""
        request = CONTROL_TABLE["prove"].check(args)
        assert isinstance(request, control.ProveRequest)
        key, version, start, end = request.key, request.version, request.start, request.end
        if not self.holdings_db().covers(key, version, start, end):
            return {"holds": False}
        identity = self.identity
        if identity is None:
            raise NetworkError("the peer is not started")
        message = prove_message(request.nonce, key, version, start, end)
        return {"holds": True, "sig": identity.sign(message).hex()}

    async def probe_ranges(
        self, address: tuple[str, int], queries: list[Query], *, limit: float
    ) -> list[bool] | None:
        """Ask a peer over one connection whether it holds each range (key, version, start,
        end): its answers in order, or None if it did not answer within ``limit`` seconds
        per request. A peer without ``holds_ranges`` is asked range by range (``holds``)."""
        try:
            async with asyncio.timeout(limit):
                conn = await Connection.open(
                    address, io_timeout=limit, connect_timeout=limit, network=self.network
                )
            try:
                answers: list[bool] = []
                batched = True
                for first in range(0, len(queries), MAX_PROBE_RANGES):
                    chunk = queries[first : first + MAX_PROBE_RANGES]
                    if batched:
                        try:
                            async with asyncio.timeout(limit):
                                reply = await conn.call(
                                    "holds_ranges",
                                    ranges=[[k.hex(), v, a, b] for k, v, a, b in chunk],
                                )
                        except RemoteRejectedError:
                            batched = False  # an older peer: unknown operation
                        else:
                            holds = reply.get("holds")
                            if not isinstance(holds, list) or len(holds) != len(chunk):
                                return None
                            answers += [x is True for x in holds]
                            continue
                    for key, version, start, end in chunk:
                        async with asyncio.timeout(limit):
                            reply = await conn.call(
                                "holds", key=key.hex(), version=version, start=start, end=end
                            )
                        answers.append(reply.get("holds") is True)
                return answers
            finally:
                conn.close()
        except (TimeoutError, DifsError, OSError):
            return None

    async def _op_check(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Verify every stored segment; with repair, quarantine damage and fetch good copies."""
        repair = args.get("repair") is True
        report = await asyncio.to_thread(self._store().check, repair)
        healed = 0
        if repair:
            for seg_id in [*report.corrupt, *report.missing]:
                healed += await self.heal(seg_id)
        orphans = await asyncio.to_thread(self._store().orphans)
        return {
            "checked": report.checked,
            "ok": report.ok,
            "corrupt": [c.hex() for c in report.corrupt],
            "missing": [m.hex() for m in report.missing],
            "healed": healed,
            # segments no holding keeps: sent by an upload in progress, or orphaned (left
            # by a failed one and collected within the grace time)
            "uploading": {"segments": orphans.pending, "bytes": orphans.pending_bytes},
            "orphans": {"segments": orphans.orphaned, "bytes": orphans.orphaned_bytes},
            "orphan_grace": self.config.repair.orphan_grace,
        }

    async def _op_suspect(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """A fetcher got a bad copy of a segment from us: verify it, heal it if damaged."""
        seg_id = hex_arg(args, "segment", 32)
        store = self._store()
        if not store.has(seg_id):
            return {"damaged": False, "healed": 0}
        try:
            await asyncio.to_thread(store.read, seg_id)
            return {"damaged": False, "healed": 0}
        except IntegrityError:
            pass
        return {"damaged": True, "healed": await self.heal(seg_id)}

    async def heal(self, seg_id: bytes) -> int:
        """Fetch a good copy of a damaged or missing segment from another holder."""
        store = self._store()
        dht = self._dht()
        for h in self.holdings_db().all():
            try:
                hashes = await self._hash_list(h.integrity, h.segment_count)
            except DifsError:
                hashes = []
            if seg_id != h.integrity and seg_id not in hashes[h.start : h.end + 1]:
                continue
            for raw in await dht.get_entries(h.key):
                if raw[:1] == b"{":
                    continue
                with contextlib.suppress(DifsError):
                    entry = parse_holder_entry(raw)
                    if entry.node_id == self.node_id or entry.version != h.version:
                        continue
                    data = await self._fetch_segment((entry.host, entry.port), seg_id)
                    await asyncio.to_thread(store.put, seg_id, data, h.owner)
                    if self.maintainer is not None:
                        self.maintainer.stats.healed_segments += 1
                    log.info("healed segment=%s from=%s", seg_id.hex()[:12], entry.host)
                    return 1
        return 0

    async def _fetch_segment(self, address: tuple[str, int], seg_id: bytes) -> bytes:
        conn = await Connection.open(
            address, io_timeout=self.config.io_timeout, network=self.network
        )
        try:
            await conn.send(wire.GetSeg(request_id=0, seg_id=seg_id, offset=0, length=0))
            frame = await conn.read_frame()
        finally:
            conn.close()
        if not isinstance(frame, wire.Data):
            raise NotFoundError("holder has no copy")
        data = bytes(frame.data)
        segments.verify_segment(seg_id, data)
        return data

    def holdings_db(self) -> Holdings:
        if self.holdings is None:
            raise NetworkError("the peer is not running")
        return self.holdings

    def dht_node(self) -> Dht:
        return self._dht()


def _open_stored(store: SegmentStore, seg_id: bytes) -> tuple[BinaryIO, int]:
    """A stored segment's file, open for reading, and its size (NotFoundError if gone)."""
    path, size = store.locate(seg_id)
    try:
        return path.open("rb"), size
    except FileNotFoundError:
        raise NotFoundError(f"segment {seg_id.hex()[:16]} is not stored here") from None


async def _expect_ack(conn: Connection) -> None:
    frame = await conn.read_frame()
    if isinstance(frame, wire.Error):
        from difs_p2p.transfer import remote_error

        raise remote_error(frame)
    if not isinstance(frame, wire.Ack):
        raise IntegrityError("expected an ACK")


def _ranges_arg(args: dict[str, Any]) -> list[Query]:
    """The ``ranges`` argument of ``holds_ranges``: [[key hex, version, start, end], ...]."""
    items = args.get("ranges")
    if not isinstance(items, list) or len(items) > MAX_PROBE_RANGES:
        raise UsageError(f"ranges must be a list of at most {MAX_PROBE_RANGES} ranges")
    queries: list[Query] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 4:
            raise UsageError("each range must be [key, version, start, end]")
        fields = dict(zip(("key", "version", "start", "end"), item, strict=True))
        queries.append(
            (
                _key_arg(fields),
                int_arg(fields, "version"),
                int_arg(fields, "start"),
                int_arg(fields, "end"),
            )
        )
    return queries


def _key_arg(args: dict[str, Any]) -> bytes:
    return hex_arg(args, "key", 20)
