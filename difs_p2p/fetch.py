"""The I/O of a fetch around its segment transfer: holder entries checked as they are
used, the hash list, the output, the holders told of bad copies; and the output file.

:class:`Fetch` owns one verified, parallel, fail-over fetch: it gets the hash list (asking
one more holder after each :func:`~difs_p2p.fetchplan.hedge_delay`), opens and syncs the
output, and hands the segments to :class:`~difs_p2p.fetchrun.SegmentRun` (the holder
connections, segments received straight into reusable buffers, verified and written out).
Every decision that is not I/O (which segment next from which holder, when a holder is
late, hedging, giving a holder up, when no holder is left) is
:class:`~difs_p2p.fetchplan.FetchPlan`'s. :func:`into_file` runs a fetch into a temporary
file beside the output path, renamed over it once every byte is verified;
:func:`probe_holds` asks a holder which ranges it still has (``stat``, ``versions``).
:meth:`difs_p2p.client.Client.get` resolves the name and starts both.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import math
import os
import stat
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import IO

from difs_p2p import segments, wire
from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import (
    DifsError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    PeerError,
    StorageError,
    UsageError,
    WireError,
)
from difs_p2p.fetchplan import FetchPlan, PlanConfig, hedge_delay
from difs_p2p.fetchrun import Chunks, Output, Progress, SegmentRun

__all__ = [
    "Fetch",
    "FetchResult",
    "Progress",
    "check_output",
    "choose_version",
    "fetch_into",
    "in_spans",
    "into_file",
    "is_alive",
    "merged_spans",
    "probe_holds",
]
from difs_p2p.holders import HolderEntry, verify_holder_entry
from difs_p2p.manifest import Manifest
from difs_p2p.net import Connector
from difs_p2p.ops import RangeRequest, RangesRequest, SuspectRequest
from difs_p2p.resolution import check_node, choose_version
from difs_p2p.segments import SegmentId
from difs_p2p.transfer import Connection

# Ending of the temporary file a fetch writes beside its output (".NAME.<hex>.part").
PARTIAL_SUFFIX = ".part"


@valueclass(frozen=False)
class FetchResult:
    manifest: Manifest
    bytes: int
    seconds: float
    first_byte: float
    sources: int
    retries: int
    # seconds of `seconds` spent resolving the name (before the first holder is asked)
    resolve: float = 0.0
    # segments also asked of another holder because the one asked first was late
    hedged: int = 0
    # holders that were late at least once (slow, stalled, or never answering)
    late: list[tuple[str, int]] = field(default_factory=list)
    # holders the fetch gave up on: failed or given up by the plan, or still late when the
    # other holders had delivered everything (what they owed was taken from others)
    gave_up: list[tuple[str, int]] = field(default_factory=list)


def gave_up(plan: FetchPlan) -> list[tuple[str, int]]:
    """The holders a finished fetch stopped waiting for (``FetchResult.gave_up``)."""
    return sorted(plan.dead | {h for h in plan.late_seen if plan.is_late(h)})


def merged_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges merged where they overlap or touch, in order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def in_spans(merged: list[tuple[int, int]], index: int) -> bool:
    """Whether ``index`` lies in one of the ``merged_spans``."""
    i = bisect.bisect_right(merged, (index, math.inf)) - 1
    return i >= 0 and merged[i][0] <= index <= merged[i][1]


def check_output(path: Path) -> None:
    """UsageError unless ``path`` can be a fetch's output: not a directory, in one."""
    if path.is_dir():
        raise UsageError(f"cannot write {path}: it is a directory")
    parent = Path(os.path.realpath(path)).parent
    if not parent.exists():
        raise UsageError(f"cannot write {path}: directory {path.parent} does not exist")
    if not parent.is_dir():
        raise UsageError(f"cannot write {path}: {path.parent} is not a directory")


def _output_target(path: Path) -> tuple[Path, int | None]:
    """(the real ``path``, the mode of the file there, None if there is none)."""
    real = Path(os.path.realpath(path))
    check_output(real)
    try:
        return real, stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        return real, None


def _create_temporary(path: Path, real: Path, mode: int | None) -> Path:
    """A new empty file beside ``real``, with ``mode`` (else the usual mode for a new
    file); left behind by nothing that fails here."""
    for _ in range(8):
        tmp = real.with_name(f".{real.name}.{os.urandom(4).hex()}{PARTIAL_SUFFIX}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as exc:
            raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
        try:
            if mode is not None:
                os.fchmod(fd, mode)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        finally:
            os.close(fd)
        return tmp
    raise StorageError(f"cannot create a temporary file beside {path}")  # pragma: no cover


def _writes_in_place(path: Path) -> bool:
    """Whether ``path`` is a device, FIFO or socket (written directly, never replaced)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not stat.S_ISREG(mode) and not stat.S_ISDIR(mode)


async def into_file(fetch: Fetch, path: Path, started: float, sync: bool) -> FetchResult:
    """Run ``fetch`` into a temporary file, renamed over ``path`` once complete."""
    if await asyncio.to_thread(_writes_in_place, path):
        return await fetch.run(path, started)
    real, mode = await asyncio.to_thread(_output_target, path)
    # Created on the loop (one open call): from a thread, a cancel could come between the
    # file's creation and the try that removes it.
    tmp = _create_temporary(path, real, mode)
    try:
        result = await fetch.run(tmp, started)
        await asyncio.to_thread(os.replace, tmp, real)
        if sync:
            await asyncio.to_thread(_fsync_directory, real.parent)
    except BaseException:
        # also on cancellation (Ctrl-C, SIGTERM): synchronous, so a second cancel cannot
        # skip it
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return result


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable."""
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


async def fetch_into(
    fetch: Fetch, out: Path | IO[bytes] | Chunks, started: float, sync: bool
) -> FetchResult:
    """Run ``fetch`` into a stream, an async reader's ``Chunks``, or a path through a
    temporary file (``into_file``).
    A fetch that fails without any holder having served a bad copy failed to reach or
    was refused by the holders: NetworkError, not IntegrityError."""
    try:
        if isinstance(out, Path):
            return await into_file(fetch, out, started, sync)
        return await fetch.run(out, started)
    except IntegrityError as exc:
        if fetch.suspects:
            raise
        raise NetworkError(str(exc)) from None


async def probe_holds(
    address: tuple[str, int], entries: list[HolderEntry], network: Connector
) -> list[HolderEntry]:
    """The entries whose holder at ``address`` says it holds their range (2 s limit)."""
    try:
        async with asyncio.timeout(2.0):
            conn = await Connection.open(
                address, io_timeout=2.0, connect_timeout=2.0, network=network
            )
            try:
                ranges = (RangeRequest(h.key, h.version, h.start, h.end) for h in entries[:1024])
                reply = await conn.request(RangesRequest(tuple(ranges)))
            finally:
                conn.close()
    except (DifsError, OSError, TimeoutError):
        return []
    return [h for h, ok in zip(entries, reply.holds, strict=False) if ok]


async def is_alive(address: tuple[str, int], network: Connector) -> bool:
    """Whether a peer answers a HELLO within 2 s."""
    try:
        conn = await Connection.open(address, io_timeout=2.0, connect_timeout=2.0, network=network)
    except DifsError:
        return False
    try:
        await conn.send(wire.Hello(request_id=0, peer=None))
        return isinstance(await conn.read_frame(), wire.Hello)
    except (DifsError, OSError):
        return False
    finally:
        conn.close()


# What asking one holder for the hash list gives: the holder, its connection, the list,
# and the figures the plan is seeded with.
_Answer = tuple[
    tuple[str, int], Connection, list[SegmentId], tuple[tuple[str, int], float, int, float]
]


class Fetch:
    """One verified, parallel, fail-over fetch into a file or a stream.

    It is given holder entries whose signatures are not checked yet, so that the first
    segment does not wait for hundreds of checks: an entry's signature is checked when
    the fetch first relies on it (before connecting to its holder, before asking that
    holder for a segment of its range); an entry that fails is never used.
    """

    def __init__(
        self,
        manifest: Manifest,
        holders: list[HolderEntry],
        byte_range: tuple[int, int] | None,
        progress: Progress | None,
        sync: bool = False,
        *,
        io_timeout: float,
        network: Connector,
        config: PlanConfig,
    ) -> None:
        self.io_timeout = io_timeout
        self.network = network
        self.config = config
        self.sync = sync
        self.manifest = manifest
        self.holders = holders
        # each holder's entries, and what checking an entry's signature gave (by raw bytes)
        self._by_address: dict[tuple[str, int], list[HolderEntry]] = {}
        for h in holders:
            self._by_address.setdefault((h.host, h.port), []).append(h)
        self._checked: dict[bytes, bool] = {}
        self.layout = segments.Layout(manifest.size, manifest.segment_size)
        if byte_range is None:
            self.first, self.last = 0, manifest.size - 1
        else:
            self.first, self.last = byte_range
            if not (0 <= self.first <= self.last < manifest.size):
                raise UsageError(
                    f"range {self.first}-{self.last} is outside the object (size {manifest.size})"
                )
        self.progress = progress
        self.hashes: list[SegmentId] = []
        self.first_byte = 0.0
        self.written = 0
        # (holder, segment) pairs that failed verification, reported after the fetch
        self.suspects: list[tuple[tuple[str, int], SegmentId]] = []
        # connections opened before the transfer, handed to the workers
        self._opened: dict[tuple[str, int], Connection] = {}
        # the hash list's exchange: (holder, first-byte delay, bytes, seconds receiving)
        self._seed: tuple[tuple[str, int], float, int, float] | None = None
        self.plan: FetchPlan | None = None
        # holders that served at least one verified segment
        self.served: set[tuple[str, int]] = set()
        # called once the hash list is verified (a holder answered): segments come next
        self.on_listed: Callable[[], None] | None = None

    def sources(self) -> list[tuple[str, int]]:
        return list(self._by_address)

    def _trusted(self, entry: HolderEntry) -> bool:
        """Whether the entry's signature is valid (checked once, on first use)."""
        ok = self._checked.get(entry.raw)
        if ok is None:
            try:
                verify_holder_entry(entry)
                ok = True
            except IntegrityError:
                ok = False
            self._checked[entry.raw] = ok
        return ok

    def check_node(self, address: tuple[str, int], hello: wire.Frame | None) -> None:
        """PeerError unless ``hello`` is the HELLO answer of a node whose key signed an
        entry for ``address``."""
        node = hello.peer if isinstance(hello, wire.Hello) else None
        check_node(address, node, self._by_address.get(address, ()))

    def usable(self, address: tuple[str, int]) -> bool:
        """Whether ``address`` has an entry with a valid signature (checked up to the first)."""
        return any(self._trusted(h) for h in self._by_address.get(address, ()))

    def serves(self, address: tuple[str, int], index: int) -> bool:
        """Whether a valid entry of ``address`` covers segment ``index``."""
        return any(
            h.start <= index <= h.end and self._trusted(h)
            for h in self._by_address.get(address, ())
        )

    def may_serve(self, address: tuple[str, int], index: int) -> bool:
        """Whether an entry of ``address`` covering ``index`` is valid or not yet checked."""
        return any(
            h.start <= index <= h.end and self._checked.get(h.raw, True)
            for h in self._by_address.get(address, ())
        )

    def may_cover(self, index: int) -> list[tuple[str, int]]:
        """Holders with an entry covering ``index`` that is valid or not yet checked."""
        return [
            address
            for address, entries in self._by_address.items()
            if any(h.start <= index <= h.end and self._checked.get(h.raw, True) for h in entries)
        ]

    async def _hash_list(self) -> list[SegmentId]:
        """The verified hash list (see :class:`_HashListAsk`); the connection it came on
        is kept for that holder's worker."""
        if self.manifest.segment_count == 0:
            return []
        ask = _HashListAsk(self)
        address, conn, hashes, seed = await ask.run()
        self._seed = seed
        # this holder's worker starts on the connection we already have
        self._opened[address] = conn
        return hashes

    async def run(self, out: Path | IO[bytes] | Chunks, started: float) -> FetchResult:
        try:
            return await self._run(out, started)
        finally:
            for conn in self._opened.values():
                conn.close()
            self._opened.clear()

    async def _run(self, out: Path | IO[bytes] | Chunks, started: float) -> FetchResult:
        self.hashes = await self._hash_list()
        if self.on_listed is not None:
            self.on_listed()
        if self.manifest.size == 0:
            if isinstance(out, Path):
                await asyncio.to_thread(out.write_bytes, b"")
            return FetchResult(self.manifest, 0, time.perf_counter() - started, 0.0, 0, 0)
        wanted = list(self.layout.segments_for_bytes(self.first, self.last))
        if isinstance(out, Path):
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                await self._fetch(wanted, fd, None, started)
                # A device such as /dev/null cannot be synced (EINVAL); only files are.
                if self.sync and stat.S_ISREG(os.fstat(fd).st_mode):
                    await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
        elif isinstance(out, Chunks):
            await self._fetch(wanted, None, None, started, out)
        else:
            await self._fetch(wanted, None, out, started)
        plan = self.plan
        return FetchResult(
            self.manifest,
            self.written,
            time.perf_counter() - started,
            self.first_byte,
            len(self.served),
            plan.retries if plan else 0,
            hedged=plan.hedged if plan else 0,
            late=list(plan.late_seen) if plan else [],
            gave_up=gave_up(plan) if plan else [],
        )

    def _slice(self, index: int) -> tuple[int, int, int]:
        """(offset in object, start within segment, length) of what we need of segment i."""
        offset, length = self.layout.bounds(index)
        lo = max(self.first, offset)
        hi = min(self.last, offset + length - 1)
        return lo, lo - offset, hi - lo + 1

    def possible(self, plan: FetchPlan) -> Callable[[int, set[tuple[str, int]]], bool]:
        """Whether some holder outside a set may still have a segment (for ``stuck``)."""
        dead = plan.dead
        # Segments no holder failed only need some entry not known to be bad: one look-up
        # in the merged ranges, not a pass over every entry per segment (1,024 segments x
        # 257 entries took 15 ms before the first request).
        spans = merged_spans(
            (h.start, h.end)
            for h in self.holders
            if self._checked.get(h.raw, True) and (h.host, h.port) not in dead
        )

        def possible(index: int, excluded: set[tuple[str, int]]) -> bool:
            if excluded <= dead:
                return in_spans(spans, index)
            return bool(set(self.may_cover(index)) - excluded)

        return possible

    async def _fetch(
        self,
        wanted: list[int],
        fd: int | None,
        stream: IO[bytes] | None,
        started: float,
        chunks: Chunks | None = None,
    ) -> None:
        plan = self.plan = FetchPlan(
            wanted,
            lambda i: self.layout.bounds(i)[1],
            self.config,
            segment_size=self.manifest.segment_size,
        )
        if self._seed is not None:
            plan.seed(*self._seed)
        if not self.sources():
            raise NotFoundError(f"no holder of {self.manifest.name} is known")
        run = SegmentRun(
            self.manifest.name,
            self.hashes,
            plan,
            self,
            self._slice,
            Output(fd, stream, self.first, chunks),
            wanted=wanted,
            opened=self._opened,
            segment_size=self.manifest.segment_size,
            io_timeout=self.io_timeout,
            network=self.network,
            progress=self.progress,
            started=started,
        )
        try:
            await run.run()
        finally:
            self.first_byte, self.written = run.first_byte, run.written
            self.served, self.suspects = run.served, run.suspects
        await self._report_suspects()

    async def _report_suspects(self) -> None:
        """Tell holders that served corrupt copies, so they check and heal them."""
        for address, seg_id in self.suspects[:16]:
            with contextlib.suppress(DifsError, OSError, TimeoutError):
                async with asyncio.timeout(5):
                    conn = await Connection.open(address, io_timeout=5, network=self.network)
                    try:
                        await conn.request(SuspectRequest(seg_id))
                    finally:
                        conn.close()


class _HashListAsk:
    """The hash list, asked of one holder; after each :func:`hedge_delay` without an
    answer, of as many more holders as are asked already (1, 2, 4...), and of one more at
    once when one fails. The first verified list wins; the other requests are dropped. N
    holders that accept connections and never answer cost the fetch about log2(N) such
    delays."""

    def __init__(self, fetch: Fetch) -> None:
        self.fetch = fetch
        self.root = fetch.manifest.integrity
        self.loop = asyncio.get_running_loop()
        self.errors: list[str] = []
        self.connects: list[float] = []
        self.unreachable = 0
        self.candidates = collections.deque(fetch.sources())
        self.pending: dict[asyncio.Task[_Answer], tuple[str, int]] = {}

    async def ask(self, address: tuple[str, int]) -> _Answer:
        """Ask ``address``: its connection, the verified list, and the exchange's figures
        (the plan's seed: holder, first-byte delay, bytes, seconds receiving)."""
        fetch, loop = self.fetch, self.loop
        t0 = loop.time()
        try:
            conn = await Connection.open(
                address, io_timeout=fetch.io_timeout, network=fetch.network
            )
        except DifsError:
            self.unreachable += 1
            raise
        sent = loop.time()
        self.connects.append(sent - t0)
        try:
            # HELLO first, pipelined with the request (no extra round trip): the node ID
            # it reports must be a signer of this address's entries, so that an address
            # that now reaches another node (a local peer on the same port, a restarted
            # host) is never taken for the holder
            await conn.send(wire.Hello(request_id=0, peer=None))
            await conn.send(wire.GetSeg(request_id=0, seg_id=self.root, offset=0, length=0))
            try:
                fetch.check_node(address, await conn.read_frame())
            except PeerError:
                self.unreachable += 1  # the holder is not at its address any more
                raise
            header = await conn.read_header()
            first = loop.time()
            if header is None:
                raise PeerError("connection closed")
            frame = wire.decode_payload(header, await conn.read_payload(header))
            if not isinstance(frame, wire.Data):
                raise NotFoundError(f"{address[0]}:{address[1]} has no hash list")
            count = fetch.manifest.segment_count
            hashes = segments.verify_hash_list(bytes(frame.data), self.root, count)
            seed = (address, first - sent, len(frame.data), loop.time() - first)
            return address, conn, hashes, seed
        except BaseException:
            conn.close()
            raise

    def launch(self, count: int = 1) -> None:
        """Ask ``count`` more holders (skipping those without a valid entry)."""
        while self.candidates and count > 0:
            address = self.candidates.popleft()
            if self.fetch.usable(address):
                self.pending[asyncio.create_task(self.ask(address))] = address
                count -= 1
            else:
                self.errors.append(f"{address[0]}:{address[1]}: no entry with a valid signature")

    async def run(self) -> _Answer:
        try:
            self.launch()
            while self.pending:
                finished, _ = await asyncio.wait(
                    self.pending,
                    timeout=hedge_delay(self.connects) if self.candidates else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not finished:
                    self.launch(len(self.pending))  # no answer within the hedge delay
                for task in finished:
                    address = self.pending.pop(task)
                    try:
                        return task.result()
                    except (DifsError, WireError, OSError) as exc:
                        self.errors.append(f"{address[0]}:{address[1]}: {exc}")
                        self.launch()
        finally:
            for task in self.pending:
                task.cancel()
            for outcome in await asyncio.gather(*self.pending, return_exceptions=True):
                if isinstance(outcome, tuple):
                    outcome[1].close()  # a second list that came in the same instant
        if not self.fetch.sources():
            # the object is there (its manifest verified) but its peers vouch for no
            # holder now (the last ones failed their proofs of holding): unavailable for
            # now, as an unreachable holder is, not missing
            raise NetworkError(
                f"no holder of {self.fetch.manifest.name} is known to be live: its holders "
                "stopped answering or proving that they hold it"
            )
        # every holder unreachable is a network failure, not a missing object
        errors = self.errors
        cls = (
            NetworkError if self.unreachable and self.unreachable == len(errors) else NotFoundError
        )
        raise cls(
            f"no holder of {self.fetch.manifest.name} answered with its hash list "
            f"({len(self.fetch.sources())} tried: {'; '.join(errors[:3])})"
        )
