"""The segment transfer of one fetch: a worker per holder connection, a supervisor, and
the verify-and-write of each segment. The I/O only: every decision is the
:class:`~difs_p2p.fetchplan.FetchPlan`'s, which :class:`SegmentRun` feeds with events.

Verified segments go to a file (``pwrite`` at their offset), a synchronous stream (in
order), or :class:`Chunks`, the bounded buffer an async reader
(:class:`~difs_p2p.stream.ObjectStream`) takes them from in order: the fetch asks for no
segment more than ``Chunks.window`` past the one the reader takes next, so a reader that
stops reading stops the fetch.

One worker per holder keeps up to ``pipeline`` GET_SEG requests in flight (asking the plan
which segment next), receives each answer straight into a reused buffer (telling the plan
as bytes come: there is no deadline on this path), and hands the segment to a task that
verifies it against its hash and writes it out, while the connection receives the next one.
The supervisor (:meth:`SegmentRun.run`) looks at the clock every ``SUPERVISE_TICK``: it
gives up holders the plan calls stalled, starts workers on further holders when the plan
has segments nobody running can take, and ends the fetch when a segment has no holder left.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import functools
import os
import socket
import time
from collections.abc import Callable
from typing import IO, Protocol

from difs_p2p import segments, wire
from difs_p2p.errors import DifsError, IntegrityError, PeerError
from difs_p2p.fetchplan import FetchPlan, Holder, first_holders
from difs_p2p.net import Connector
from difs_p2p.segments import SegmentId
from difs_p2p.transfer import BufferPool, Connection

# Parallel holder connections per fetch.
MAX_SOURCES = 8
# Segments a stream fetch may run ahead of the next one it must write (bounds memory),
# and at most STREAM_BYTES of them.
STREAM_WINDOW = 64
STREAM_BYTES = 64 << 20
# Bytes of free receive buffers a fetch keeps for reuse (48 of 1 MiB, 12 of 4 MiB).
POOL_BYTES = 48 << 20
# Buffers up to this size are hashed on the event loop: BLAKE3 takes about 10 us for
# 64 KiB here, less than a hop to a worker thread and back.
INLINE_HASH = 64 << 10
# How often a fetch looks at its holders' deadlines (late ones are hedged within this).
SUPERVISE_TICK = 0.02
# How often a stream's fetch looks while it waits for its reader with nothing asked of
# any holder (a worker that asks wakes it at once): a paused reader costs one look a
# second, not fifty.
REST_TICK = 1.0

Progress = Callable[[int], None]


class Holders(Protocol):
    """What the fetch knows of the holder entries (signatures checked on first use)."""

    def sources(self) -> list[Holder]: ...

    def usable(self, address: Holder) -> bool: ...

    def serves(self, address: Holder, index: int) -> bool: ...

    def may_serve(self, address: Holder, index: int) -> bool: ...

    def may_cover(self, index: int) -> list[Holder]: ...

    def possible(self, plan: FetchPlan) -> Callable[[int, set[Holder]], bool]: ...


class Chunks:
    """Verified pieces of an object in order, waiting for an async reader.

    The fetch puts each piece as soon as it and all before it are verified; the reader
    takes them. The fetch asks for no segment more than ``window - 1`` past the one the
    reader takes next, so at most ``window`` segments are in flight, received or waiting
    here at any time. A piece taken belongs to the reader (its receive buffer is never
    reused by the fetch).
    """

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError("a stream window holds at least one segment")
        self.window = window
        self.pieces: collections.deque[memoryview] = collections.deque()
        # pieces the reader has taken so far
        self.taken = 0
        # bytes received from holders for segments (frame headers and duplicate copies
        # a hedge dropped included; the hash list not)
        self.received = 0
        # perf_counter() when the first piece was put (0.0: none yet)
        self.first_at = 0.0
        # set whenever a piece is put or the fetch ends; the reader clears it
        self.changed = asyncio.Event()
        # called when the reader takes a piece (the fetch's window moved on)
        self.moved: Callable[[], None] = _nothing

    def put(self, piece: memoryview) -> None:
        if not self.first_at:
            self.first_at = time.perf_counter()
        self.pieces.append(piece.toreadonly())
        self.changed.set()

    def take(self) -> memoryview | None:
        """The next piece, None if none is waiting."""
        if not self.pieces:
            return None
        piece = self.pieces.popleft()
        self.taken += 1
        self.moved()
        return piece


def _nothing() -> None:
    return None


class Output:
    """Where verified segments go: ``pwrite`` into a file at their offset, or in order
    into a stream (holding at most the window's segments) or to an async reader."""

    def __init__(
        self, fd: int | None, stream: IO[bytes] | None, first: int, chunks: Chunks | None = None
    ) -> None:
        self.fd = fd
        self.stream = stream
        self.first = first
        self.chunks = chunks
        # writes to ``fd`` under way in threads
        self.writes: set[asyncio.Future[None]] = set()


class SegmentRun:
    """One fetch's segment transfer over its holders; the results are read after
    :meth:`run`: ``written``, ``first_byte``, ``served``, ``suspects``."""

    def __init__(
        self,
        name: str,
        hashes: list[SegmentId],
        plan: FetchPlan,
        holders: Holders,
        slice_of: Callable[[int], tuple[int, int, int]],
        output: Output,
        *,
        wanted: list[int],
        opened: dict[Holder, Connection],
        segment_size: int,
        io_timeout: float,
        network: Connector,
        progress: Progress | None,
        started: float,
    ) -> None:
        self.name = name
        self.hashes = hashes
        self.plan = plan
        self.holders = holders
        self.slice_of = slice_of
        self.output = output
        self.opened = opened
        self.io_timeout = io_timeout
        self.network = network
        self.progress = progress
        self.started = started
        self.loop = asyncio.get_running_loop()
        # results
        self.first_byte = 0.0
        self.written = 0
        self.served: set[Holder] = set()
        # (holder, segment) pairs that failed verification, reported after the fetch
        self.suspects: list[tuple[Holder, SegmentId]] = []
        # in-order delivery for streams: index -> data (bounded by the pipelines' depth)
        self.ready: dict[int, bytes | memoryview] = {}
        self.owners: dict[int, bytearray] = {}
        self.order = list(wanted)
        self.problems: list[str] = []
        pipeline = plan.depth
        # Receive buffers are reused: a fresh 1 MiB bytearray costs page faults every time.
        self.pool = BufferPool(max(2, POOL_BYTES // max(1, segment_size)), minimum=segment_size)
        # segments a synchronous stream may run ahead of the one it writes next
        self.stream_window = max(1, min(STREAM_WINDOW, STREAM_BYTES // max(1, segment_size)))
        # set when the supervisor should look again (a worker ended, the fetch is done)
        self.supervise = asyncio.Event()
        # idle workers wait on this; a new one replaces it each time the plan changes
        self.wake = asyncio.Event()
        self.idle: set[Holder] = set()
        # errors of verify-and-write tasks (a failed write ends the fetch)
        self.crashed: list[BaseException] = []
        self.slots = asyncio.Semaphore(2 * pipeline)
        # set once the first segment is out (or the lead holder gave up)
        self.first_out = asyncio.Event()
        self.processing: set[asyncio.Task[None]] = set()
        self.workers: dict[Holder, asyncio.Task[None]] = {}
        self._next_out = 0  # position in ``order`` of the next segment a stream writes
        # the supervisor waits for an event rather than the clock (``reader_behind``)
        self.resting = False
        if output.chunks is not None:
            output.chunks.moved = self.window_moved

    # -- the plan changed -----------------------------------------------------------------

    def kick(self) -> None:
        """Wake the idle workers: the plan may have something for them now."""
        if self.idle:
            old, self.wake = self.wake, asyncio.Event()
            old.set()

    def window_moved(self) -> None:
        """A stream's reader took a piece: segments past the window may be asked now (of
        the running workers, or of holders the supervisor starts)."""
        self.kick()
        if self.resting:
            self.supervise.set()

    def fail(self, address: Holder, reason: str, lead: bool) -> None:
        self.problems.append(reason)
        self.plan.lost(address)
        self.kick()
        self.supervise.set()
        if lead:
            self.first_out.set()

    def limit(self) -> int | None:
        """The last segment a stream may ask for now (its window), None for a file."""
        chunks = self.output.chunks
        if chunks is not None:
            # the reader's position, not the delivery's: a reader that does not read
            # holds the fetch within its window
            if chunks.taken >= len(self.order):
                return None
            return self.order[chunks.taken] + chunks.window - 1
        if self.output.stream is None or self._next_out >= len(self.order):
            return None
        return self.order[self._next_out] + self.stream_window

    # -- verified segments out --------------------------------------------------------------

    def deliver_stream(self) -> None:
        stream, chunks = self.output.stream, self.output.chunks
        moved = False
        while self._next_out < len(self.order) and self.order[self._next_out] in self.ready:
            index = self.order[self._next_out]
            self._next_out += 1
            piece = self.ready.pop(index)
            buf = self.owners.pop(index)
            if chunks is not None:
                if 2 * len(piece) < len(buf):
                    # a small part of its buffer (a span's first or last segment, a short
                    # last segment): copied, so that the reader does not hold the buffer
                    chunks.put(memoryview(bytes(piece)))
                    self.pool.give(buf)
                else:
                    # the reader owns the piece and its buffer from now on
                    chunks.put(memoryview(piece))
                continue  # the window moves when the reader takes it (``window_moved``)
            assert stream is not None
            stream.write(piece)
            self.pool.give(buf)
            moved = True
        if moved:
            self.kick()  # the window moved on

    async def write(
        self, fd: int, index: int, data: bytes | memoryview, expected: SegmentId | None
    ) -> None:
        """Write what is needed of segment ``index`` to the file in a thread; verified
        there first if ``expected`` is given (one hop to a thread for both)."""
        pos, skip, length = self.slice_of(index)
        # Shielded: a cancel cannot stop the thread, so the write is awaited (by the
        # fetch's finally) before the fd can be closed and its number reused.
        job = self.loop.run_in_executor(
            None, verify_and_write, expected, data, skip, length, fd, pos - self.output.first
        )
        self.output.writes.add(job)
        job.add_done_callback(self.output.writes.discard)
        await asyncio.shield(job)

    async def store(
        self, index: int, data: bytes | memoryview, buf: bytearray, written: bool = False
    ) -> None:
        """Send segment ``index`` (verified) to the output; ``written``: it is in the
        file already."""
        _, skip, length = self.slice_of(index)
        piece = data[skip : skip + length]
        if not self.first_byte:
            self.first_byte = time.perf_counter() - self.started
            self.first_out.set()
        fd = self.output.fd
        if fd is not None:
            if not written:
                await self.write(fd, index, data, None)
            self.pool.give(buf)
        else:
            self.ready[index] = piece  # a view of the receive buffer, written out in order
            self.owners[index] = buf
            self.deliver_stream()
        self.written += len(piece)
        self.plan.verified(index)
        if self.progress:
            self.progress(len(piece))
        if self.plan.remaining == 0:
            self.supervise.set()

    async def process(
        self, address: Holder, index: int, data: memoryview | bytes, buf: bytearray
    ) -> None:
        """Verify segment ``index`` as ``address`` sent it, then write it out."""
        fd = self.output.fd
        # The first segment out is verified here, without a thread: a thread's result
        # waits for the loop, which is busy receiving the rest of the pipeline (~4 ms
        # of time to first byte for ~0.3 ms of hashing).
        inline = len(data) <= INLINE_HASH or not self.first_byte
        try:
            if inline:
                segments.verify_segment(self.hashes[index], data)
            elif fd is None:
                await asyncio.to_thread(segments.verify_segment, self.hashes[index], data)
            else:
                await self.write(fd, index, data, self.hashes[index])
        except IntegrityError as exc:
            self.pool.give(buf)
            self.suspects.append((address, self.hashes[index]))
            self.problems.append(f"{address[0]}:{address[1]}: {exc}")
            self.plan.corrupt(address, index)
            self.kick()
            self.supervise.set()
            return
        finally:
            self.slots.release()
        self.served.add(address)
        await self.store(index, data, buf, written=not inline and fd is not None)

    def processed(self, task: asyncio.Task[None]) -> None:
        self.processing.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            self.crashed.append(exc)
            self.supervise.set()

    # -- one worker per holder ------------------------------------------------------------

    async def receive(self, conn: Connection, view: memoryview, address: Holder) -> None:
        """Fill ``view`` from ``conn``, telling the plan as bytes come (no deadline here:
        the supervisor decides when the holder is late or given up)."""
        got, total = 0, len(view)
        while got < total:
            n = await self.loop.sock_recv_into(conn.sock, view[got:])
            if n == 0:
                raise PeerError(f"connection closed by {address[0]}:{address[1]}")
            got += n
            if self.output.chunks is not None:
                self.output.chunks.received += n
            self.plan.received(address, n, self.loop.time())

    async def ask(self, conn: Connection, address: Holder) -> None:
        """Send the requests the plan has for ``address`` now, in one syscall."""
        serves = functools.partial(self.holders.serves, address)
        requests = []
        now = self.loop.time()
        while (picked := self.plan.next_for(address, now, serves, self.limit())) is not None:
            requests.append(
                wire.GetSeg(request_id=picked, seg_id=self.hashes[picked], offset=0, length=0)
            )
        if requests:
            if self.resting:
                self.supervise.set()  # deadlines run again
            await conn.send_many(requests)

    async def answer(self, conn: Connection, address: Holder, header_buf: bytearray) -> None:
        """Receive the answer to ``address``'s oldest request and hand it on."""
        plan = self.plan
        plan.waiting(address, self.loop.time())
        await self.receive(conn, memoryview(header_buf), address)
        header = wire.parse_header(header_buf)
        # checked before a buffer is taken: a holder that announces 16 MiB and stalls must
        # not make each worker hold that much
        problem = plan.answer_problem(address, header.type.name, header.length)
        if problem is not None:
            raise PeerError(problem)
        buf = self.pool.take(header.length)
        view = memoryview(buf)[: header.length]
        await self.receive(conn, view, address)
        frame = wire.decode_payload(header, view)
        if isinstance(frame, wire.Data):
            index, keep = plan.arrived(address, self.loop.time(), header.length)
            if not keep:
                self.pool.give(buf)  # another holder's copy came first
                return
            # verify and write while this connection receives the next segment
            await self.slots.acquire()
            task = asyncio.create_task(self.process(address, index, frame.data, buf))
            self.processing.add(task)
            task.add_done_callback(self.processed)
            # Let it start: while bytes keep arriving, sock_recv_into returns without
            # suspending, and this loop would read the whole pipeline (8 MiB, ~15 ms)
            # before the first segment is verified and written.
            await asyncio.sleep(0)
        else:
            self.pool.give(buf)
            plan.refused(address, self.loop.time())
            message = frame.message if isinstance(frame, wire.Error) else "bad frame"
            self.problems.append(f"{address[0]}:{address[1]}: {message}")
            self.kick()
            self.supervise.set()

    async def worker(self, address: Holder, lead: bool) -> None:
        if address not in self.opened and not self.holders.usable(address):
            self.fail(address, f"{address[0]}:{address[1]}: no entry with a valid signature", lead)
            return
        try:
            conn = self.opened.pop(address, None) or await Connection.open(
                address, io_timeout=self.io_timeout, network=self.network
            )
        except DifsError as exc:
            self.fail(address, str(exc), lead)
            return
        header_buf = bytearray(wire.HEADER_SIZE)
        plan = self.plan
        try:
            if not lead and not self.first_out.is_set():
                # The first segment comes alone from the lead holder (connected already):
                # started together, every holder's pipeline would compete.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(plan.config.lead_head_start):
                        await self.first_out.wait()
            while True:
                await self.ask(conn, address)
                if plan.owes(address):
                    await self.answer(conn, address, header_buf)
                    continue
                if plan.remaining == 0 or plan.is_dead(address):
                    return
                # nothing for this holder now: wait for a change (a requeue, a late
                # holder's segments to hedge, the stream window moving on)
                event = self.wake
                self.idle.add(address)
                try:
                    await event.wait()
                finally:
                    self.idle.discard(address)
                if closed_by_peer(conn.sock):
                    # A holder closes a connection idle for its idle time (a stream's
                    # reader that paused): connect again, it has done nothing wrong.
                    conn.close()
                    conn = await Connection.open(
                        address, io_timeout=self.io_timeout, network=self.network
                    )
        except (DifsError, OSError) as exc:
            self.fail(address, f"{address[0]}:{address[1]}: {exc}", lead)
        finally:
            conn.close()
            if lead:
                self.first_out.set()

    def start(self, address: Holder, lead: bool = False) -> None:
        self.workers[address] = asyncio.create_task(self.worker(address, lead))
        self.workers[address].add_done_callback(lambda _: self.supervise.set())

    def start_more(self) -> None:
        """Workers on further holders when the running ones cannot take what is queued
        or owed by late holders (a hedge needs a holder that is not late)."""
        plan = self.plan
        running = [a for a, t in self.workers.items() if not t.done()]
        need = plan.unserved(running, self.idle, self.holders.may_serve)
        if not need:
            return
        busy = sum(1 for a in running if not plan.is_late(a) and a not in self.idle)
        for address in self.holders.sources():
            if busy >= MAX_SOURCES * 4:
                return
            if address in self.workers or plan.is_dead(address):
                continue
            if plan.could_take(address, need, functools.partial(self.holders.may_serve, address)):
                self.start(address)
                busy += 1

    # -- the supervisor -------------------------------------------------------------------

    def reader_behind(self, running: list[Holder]) -> bool:
        """Whether a stream's fetch waits for its reader alone: every segment it may ask
        for is asked and in (no queued one inside the window, nothing owed by any
        running holder, nothing being verified), so no deadline can pass and no holder
        needs starting until the reader takes a piece."""
        if self.output.chunks is None or self.processing:
            return False
        limit, queue = self.limit(), self.plan.queue
        # a segment back in the queue was asked inside the window, and the window only
        # moves on: the front of the queue is the lowest segment inside it, if any is
        if limit is not None and queue and queue[0] <= limit:
            return False
        return all(a in self.idle and not self.plan.owes(a) for a in running)

    async def run(self) -> None:
        """Fetch every wanted segment, or raise why not."""
        plan = self.plan
        failures = -1
        try:
            first = first_holders(
                self.holders.sources(),
                set(self.opened),
                list(plan.queue),
                self.holders.may_cover,
                MAX_SOURCES * 4,
            )
            for i, address in enumerate(first):
                self.start(address, i == 0)
            looked = self.loop.time()
            while plan.remaining > 0:
                if self.crashed:
                    raise self.crashed[0]
                running = [a for a, t in self.workers.items() if not t.done()]
                now = self.loop.time()
                # While a stream waits for its reader, the looks over the whole queue
                # (no holder left for a segment, holders to start) are made once per
                # REST_TICK, not at each piece the reader takes: nothing is asked now.
                self.resting = self.reader_behind(running)
                full = not self.resting or now - looked >= REST_TICK
                if full:
                    looked = now
                if full and (plan.failures != failures or all(a in self.idle for a in running)):
                    failures = plan.failures
                    index = plan.stuck(self.holders.possible(plan))
                    if index is not None:
                        raise IntegrityError(
                            f"segment {index} of {self.name} could not be fetched "
                            f"from any holder: {'; '.join(self.problems[-3:])}"
                        )
                tick = plan.tick(self.loop.time())
                for address in tick.give_up:
                    self.problems.append(f"{address[0]}:{address[1]}: stalled")
                    plan.lost(address)
                    task = self.workers.get(address)
                    if task is not None:
                        task.cancel()
                if tick.late or tick.give_up:
                    self.kick()
                if full:
                    self.start_more()
                if not any(not t.done() for t in self.workers.values()) and not self.processing:
                    raise PeerError(
                        f"fetch of {self.name} stalled: {'; '.join(self.problems[-3:])}"
                    )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(REST_TICK if self.resting else SUPERVISE_TICK):
                        await self.supervise.wait()
                self.resting = False
                self.supervise.clear()
            await asyncio.gather(*list(self.processing))
            if self.crashed:  # a segment's processing failed as the last ones finished
                raise self.crashed[0]
        finally:
            try:
                tasks = [*self.workers.values(), *self.processing]
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            finally:
                await finish(self.output.writes)
        if self.output.stream is not None or self.output.chunks is not None:
            self.deliver_stream()
        if self.output.stream is not None:
            self.output.stream.flush()


def verify_and_write(
    expected: SegmentId | None,
    data: bytes | memoryview,
    skip: int,
    length: int,
    fd: int,
    offset: int,
) -> None:
    """Check ``data`` against ``expected`` (if given; IntegrityError, nothing written),
    then write its ``length`` bytes from ``skip`` at ``offset`` of ``fd``, all of them."""
    if expected is not None:
        segments.verify_segment(expected, data)
    piece = memoryview(data)[skip : skip + length]
    while piece:
        n = os.pwrite(fd, piece, offset)
        if n <= 0:
            raise OSError(errno.ENOSPC, "no byte written")
        piece, offset = piece[n:], offset + n


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the other end closed ``sock`` (or reset it), without waiting; bytes
    waiting to be read are left for the next frame."""
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


async def finish(futures: set[asyncio.Future[None]]) -> None:
    """Wait until every future in ``futures`` is done, even if cancelled meanwhile (the
    cancellation is raised once they are)."""
    cancelled = False
    while futures:
        try:
            await asyncio.wait(set(futures))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError
