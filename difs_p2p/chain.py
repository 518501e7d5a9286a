"""Chain replication of an upload: each range's segments flow from the entry peer through
the range's holders, every hop storing and forwarding while it receives.

A :class:`Link` is the downstream of one connection: the next hop's connection (proving
this peer's node key), PUT_SEG frames sent in order and their ACKs matched in order. The
entry peer opens one per range (to the range's first remote holder); a holder asked to
``relay`` opens one to the next hop. A hop acknowledges a segment upstream only when its
own copy is verified and durable and its downstream acknowledged it, so the entry peer's
ACK to the client means every copy of the chain is durable.

A :class:`ChainPlan` is the entry peer's plan of one upload announced with ``chain``: the
ranges, a lookup of each range's candidates started at once (the range key comes from the
name key, version and range index: :func:`placement.chain_key`), and each range's chain
set up when its first segment arrives (and the next range's then, ahead of its segments):
placement.choose_targets picks the hops, this peer first where picked; a hop that cannot
take part (no room, leaving, unreachable, an older peer without ``relay``) is replaced by
the next candidate before any segment flows. Chains wait, open, for ``place`` after the
whole upload; a ``relay`` again every third of the idle timeout keeps them alive. A hop
that fails once segments flow fails the upload: nothing is published and every hop's
pending copy goes with its connection (the client then uploads once more).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence

from difs_p2p import control, wire
from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import (
    BusyError,
    CapacityError,
    DifsError,
    IntegrityError,
    NetworkError,
    UsageError,
)
from difs_p2p.identity import Identity, NodeId
from difs_p2p.net import PeerNetwork
from difs_p2p.ops import ChainRequest, HoldReply, HoldRequest, RelayHop, RelayRequest
from difs_p2p.placement import Domain, chain_key, choose_targets, domain_of
from difs_p2p.routing import Contact
from difs_p2p.segments import SegmentId, stripe_ranges
from difs_p2p.transfer import Connection, remote_error

__all__ = ["ChainPlan", "ChainRange", "Link", "LinkOpener"]

log = logging.getLogger(__name__)


class Link:
    """The next hop of a chain: segments forwarded on one connection, ACKs in order."""

    def __init__(self, conn: Connection, hop: RelayHop) -> None:
        self.conn = conn
        self.hop = hop
        self._send = asyncio.Lock()
        self._read = asyncio.Lock()
        # one future per segment sent and not acknowledged yet, oldest first
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self.failed: BaseException | None = None

    @classmethod
    async def open(
        cls, hop: RelayHop, identity: Identity, network: PeerNetwork, io_timeout: float
    ) -> Link:
        """Connect to ``hop``, proving this peer's node key (and checking its own)."""
        conn = await Connection.open(
            (hop.host, hop.port),
            io_timeout=io_timeout,
            network=network,
            credential=control.PeerCredential(identity),
            expect_id=hop.node_id,
        )
        return cls(conn, hop)

    async def relay(self, to: Sequence[RelayHop], size: int) -> int:
        """Ask the hop to take ``size`` bytes and forward them along ``to``: how many hops
        of ``to`` it linked."""
        reply = await self.conn.request(RelayRequest(tuple(to), size))
        return min(reply.ready, len(to))

    async def forward(self, seg_id: SegmentId, data: bytes | memoryview) -> asyncio.Future[None]:
        """Send a segment on; the future is done when the hop acknowledges it (``ack``)."""
        async with self._send:
            if self.failed is not None:
                raise BusyError(
                    f"the chain to {self.hop.host}:{self.hop.port} failed: {self.failed}"
                )
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._waiting.append(done)
            with self._failing():
                await self.conn.send(wire.PutSeg(request_id=0, seg_id=seg_id, data=data))
        return done

    @contextlib.contextmanager
    def _failing(self) -> Iterator[None]:
        """Any failure of the connection fails the link; a lost next hop is raised as the
        error upstream sees (BUSY: the uploader may try again)."""
        try:
            yield
        except (DifsError, OSError) as exc:
            self._fail(exc)
            raise BusyError(f"the next hop {self.hop.host}:{self.hop.port} failed: {exc}") from exc
        except BaseException as exc:
            self._fail(exc)
            raise

    async def ack(self, done: asyncio.Future[None]) -> None:
        """Wait for the hop's ACK of a forwarded segment (reading ACKs in order)."""
        while not done.done():
            async with self._read:
                if done.done():
                    break
                with self._failing():
                    frame = await self.conn.read_frame()
                first = self._waiting.popleft() if self._waiting else None
                if isinstance(frame, wire.Ack) and first is not None:
                    first.set_result(None)
                    continue
                why: DifsError
                if isinstance(frame, wire.Error):
                    why = remote_error(frame, self.conn.peer_address)
                elif frame is None:
                    why = BusyError(f"the next hop {self.hop.host}:{self.hop.port} went away")
                else:
                    why = IntegrityError("expected an ACK from the next hop")
                if first is not None:
                    first.set_exception(why)
                self._fail(why)
        done.result()

    def _fail(self, exc: BaseException) -> None:
        """The chain cannot go on: every segment waiting fails, the connection closes."""
        if self.failed is None:
            self.failed = exc
        while self._waiting:
            waiting = self._waiting.popleft()
            if not waiting.done():
                waiting.set_exception(BusyError(f"the next hop of the chain failed: {exc}"))
                waiting.exception()  # retrieved: a waiter may be gone
        self.conn.close()

    async def keep_alive(self, to: Sequence[RelayHop], size: int) -> None:
        """Ask the hops again to relay along ``to`` (nothing changes): a request that
        keeps a chain whose segments are all sent from being closed as idle, or its
        pending copies collected, while the rest of the upload flows. Skipped while
        segments are in flight on it."""
        async with self._send:
            if self._waiting or self.failed is not None:
                return
            await self.conn.request(RelayRequest(tuple(to), size))

    async def hold(self, request: HoldRequest) -> HoldReply:
        """``hold`` on the hop (it asks its own downstream in turn)."""
        if self._waiting:
            raise UsageError("hold before every forwarded segment was acknowledged")
        return await self.conn.request(request)

    def close(self) -> None:
        self.conn.close()


# Opens a link to a hop (the peer's identity, network and deadline bound in).
LinkOpener = Callable[[RelayHop], Awaitable[Link]]


def hop_of(contact: Contact) -> RelayHop:
    host, port = contact.tcp_address
    return RelayHop(host, port, bytes(contact.node_id))


@valueclass(frozen=False)
class ChainRange:
    """One range of a chain upload: whether this peer holds it, and the link to its first
    remote hop (the chain's other hops, in order)."""

    start: int
    end: int
    mine: bool = False
    link: Link | None = None
    hops: list[Contact] = field(default_factory=list)
    # candidates the lookup found (for the shortfall warning)
    candidates: int = 0
    # why the hops asked could not take part (no room here included)
    refusals: list[DifsError] = field(default_factory=list)

    def nowhere(self) -> DifsError:
        """The error for a range no peer could take: no space when one said so."""
        why = "; ".join(dict.fromkeys(str(e) for e in self.refusals[:4]))
        where = f"segments {self.start}..{self.end}"
        if any(isinstance(e, CapacityError) for e in self.refusals):
            return CapacityError(f"no space on any peer asked for {where} ({why})")
        return NetworkError(f"no peer could take {where} ({why or 'none found'})")

    @property
    def copies(self) -> int:
        return int(self.mine) + len(self.hops)


class ChainPlan:
    """The entry peer's plan of one upload announced with ``chain`` (module docstring)."""

    def __init__(
        self,
        request: ChainRequest,
        me: NodeId,
        closest: Callable[[bytes, int], Awaitable[list[Contact]]],
        open_link: LinkOpener,
        room: Callable[[int], bool],
        keepalive: float = 10.0,
    ) -> None:
        self.request = request
        self.me = me
        self.closest = closest
        self.open_link = open_link
        # whether this peer has room for a range of so many bytes (and is not leaving)
        self.room = room
        layout = stripe_ranges(request.segment_count, request.stripes)
        self.ranges = [ChainRange(a, b) for a, b in layout]
        self._starts = [r.start for r in self.ranges]
        # segments received so far on the connection (the next one's index)
        self.received = 0
        # the hash list's id (the integrity root) and bytes, once received
        self.hash_list: tuple[SegmentId, bytes] | None = None
        self._lookups: list[asyncio.Task[list[Contact]]] = []
        self._setups: dict[int, asyncio.Task[ChainRange]] = {}
        # seconds between two keep-alives of the chains whose segments are all sent
        self.keepalive = keepalive
        self._keeper: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start every range's lookup (the chains are set up as segments arrive)."""
        want = self.request.replicas + 8
        key, version = self.request.key, self.request.version
        self._lookups = [
            asyncio.ensure_future(self.closest(chain_key(key, version, i), want))
            for i in range(len(self.ranges))
        ]
        if self.keepalive > 0:
            self._keeper = asyncio.ensure_future(self._keep_alive())

    async def _keep_alive(self) -> None:
        """Every ``keepalive`` seconds, ``Link.keep_alive`` on each chain set up (those
        whose segments are sent wait for ``place``, after the whole upload; the next
        range's waits for its first segment)."""
        while True:
            await asyncio.sleep(self.keepalive)
            for task in list(self._setups.values()):
                if not task.done() or task.cancelled() or task.exception():
                    continue
                r = task.result()
                if r.link is not None:
                    with contextlib.suppress(DifsError, OSError):
                        hops = [hop_of(c) for c in r.hops[1:]]
                        await r.link.keep_alive(hops, self.range_bytes(r))

    def next_index(self) -> int:
        """The index of the segment arriving now (called in arrival order)."""
        n = self.received
        self.received += 1
        return n

    def range_of(self, n: int) -> int:
        return bisect.bisect_right(self._starts, n) - 1

    def route(self, i: int) -> Awaitable[ChainRange]:
        """Range ``i``'s chain, set up once (the next range's setup starts too)."""
        for j in (i, i + 1):
            if j < len(self.ranges) and j not in self._setups:
                self._setups[j] = asyncio.ensure_future(self._set_up(j))
        return asyncio.shield(self._setups[i])

    async def all_routes(self) -> list[ChainRange]:
        return [await self.route(i) for i in range(len(self.ranges))]

    def range_bytes(self, r: ChainRange) -> int:
        return (r.end - r.start + 1) * self.request.segment_size

    async def _set_up(self, i: int) -> ChainRange:
        r = self.ranges[i]
        candidates = await self._lookups[i]
        r.candidates = len(candidates)
        size = self.range_bytes(r) + 32 * self.request.segment_count
        asked: set[NodeId] = set()
        here: list[Contact] = []  # this peer's contact, once it is a hop
        while r.copies < self.request.replicas:
            domains: list[Domain] = [domain_of(c.host, c.port, c.zone) for c in here + r.hops]
            batch = choose_targets(candidates, self.request.replicas - r.copies, asked, domains)
            if not batch:
                break
            asked.update(c.node_id for c in batch)
            fresh = []
            for c in batch:
                if c.node_id == self.me:
                    r.mine = self.room(size)
                    here = [c] if r.mine else []
                    if not r.mine:
                        r.refusals.append(CapacityError(f"no room here for {size} bytes"))
                else:
                    fresh.append(c)
            if fresh:
                # hops never tried (after one that failed) may be picked again
                untried = await self._extend(r, fresh, size)
                asked.difference_update(c.node_id for c in untried)
        return r

    async def _extend(self, r: ChainRange, fresh: list[Contact], size: int) -> list[Contact]:
        """Link ``fresh`` hops after the range's current ones; the hop that failed is left
        out, to be replaced; the hops of ``fresh`` never tried (after it) are returned."""
        if r.link is None:
            first, fresh = fresh[0], fresh[1:]
            try:
                r.link = await self.open_link(hop_of(first))
            except (DifsError, OSError) as exc:
                log.info("chain_skip peer=%s reason=%s", first.tcp_address, exc)
                r.refusals.append(exc if isinstance(exc, DifsError) else NetworkError(str(exc)))
                return fresh
            r.hops = [first]
        wanted = r.hops[1:] + fresh
        try:
            ready = await r.link.relay([hop_of(c) for c in wanted], size)
        except (DifsError, OSError) as exc:
            # the first hop refused: dropped if it was alone; else its chain stays as it
            # was and the fresh hops count as asked (asking again would fail the same way)
            log.info("chain_skip peer=%s reason=%s", r.hops[0].tcp_address, exc)
            r.refusals.append(exc if isinstance(exc, DifsError) else NetworkError(str(exc)))
            if len(r.hops) > 1:
                return []
            r.link.close()
            r.link, r.hops = None, []
            return wanted
        r.hops = r.hops[:1] + wanted[:ready]
        return wanted[ready + 1 :]

    def close(self) -> None:
        """Stop every lookup and setup, close every link (the hops drop what they got)."""
        if self._keeper is not None:
            self._keeper.cancel()
        for task in [*self._lookups, *self._setups.values()]:
            task.cancel()
        for task in self._setups.values():
            if task.done() and not task.cancelled() and task.exception() is None:
                with contextlib.suppress(DifsError, OSError):
                    link = task.result().link
                    if link is not None:
                        link.close()
        for r in self.ranges:
            if r.link is not None:
                r.link.close()
