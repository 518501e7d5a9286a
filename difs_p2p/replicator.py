"""The outbound replication operations of a peer, and keeping a range here.

A :class:`Replicator` is built by the peer from its parts (identity, segment store,
holdings, DHT, config, clock, network) and used by the peer's ``place`` and ``check``, and
by the maintenance loop (repair.py): push a range to another peer (``push_range``), ask a
co-holder which ranges it still holds (``probe_ranges``), place the ranges of a new
upload (``place``: the I/O half of placement.py's decisions), fetch a good copy of a
damaged segment from another holder (``heal``), keep a range here and sign its holder
entry (``hold``), and free a holding (``free_holding``). It knows nothing of the peer
that built it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence, Set
from typing import BinaryIO

from difs_p2p import control, segments, wire
from difs_p2p.addresses import format_address, sendable_host
from difs_p2p.chain import ChainPlan, ChainRange
from difs_p2p.config import PeerConfig
from difs_p2p.dht import Dht
from difs_p2p.errors import (
    AlreadyExistsError,
    DifsError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    RemoteRejectedError,
    UsageError,
)
from difs_p2p.fetchplan import PushPace
from difs_p2p.holders import HolderEntry, build_holder_entry, parse_holder_entry
from difs_p2p.holdings import Holding, Holdings, Query, holding_owner
from difs_p2p.identity import Identity, NodeId
from difs_p2p.names import NameKey
from difs_p2p.net import PeerNetwork
from difs_p2p.ops import (
    MAX_PROBE_RANGES,
    HoldReason,
    HoldReply,
    HoldRequest,
    PlacedRange,
    PlaceReply,
    RangeRequest,
    RangesRequest,
)
from difs_p2p.placement import Domain, choose_targets, domain_of, range_key, shortfall
from difs_p2p.records import split_entries
from difs_p2p.routing import Contact
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.store import SegmentStore
from difs_p2p.transfer import Connection, remote_error

__all__ = ["PLACE_PARALLEL", "Replicator", "open_stored"]

log = logging.getLogger(__name__)

# Ranges placed at once by one ``place`` (each pushes to up to r peers in parallel).
PLACE_PARALLEL = 4

# Segments sent ahead of their acknowledgements when pushing a range, and at most
# PUSH_BYTES of them: a receiver holds what is unacknowledged in memory, so 4 MiB segments
# do not take four times the memory of 1 MiB ones.
PUSH_WINDOW = 8
PUSH_BYTES = 8 << 20

Pace = Callable[[int], Awaitable[None]]


def chain_entries(
    reply: HoldReply, r: ChainRange, key: NameKey, version: int, integrity: IntegrityRoot
) -> list[HolderEntry]:
    """The holder entries a chain's ``hold`` answered, each checked: signed by a hop of
    that chain (once), for that range and version; IntegrityError otherwise."""
    hops = {bytes(c.node_id) for c in r.hops}
    entries: list[HolderEntry] = []
    for raw in (reply.entry, *reply.chain):
        entry = parse_holder_entry(bytes.fromhex(raw))
        wanted = (key, version, integrity, r.start, r.end)
        if (entry.key, entry.version, entry.integrity, entry.start, entry.end) != wanted:
            raise IntegrityError("a hop signed a holder entry for something else")
        if bytes(entry.node_id) not in hops:
            raise IntegrityError("a holder entry came from a peer outside the chain")
        hops.discard(bytes(entry.node_id))
        entries.append(entry)
    return entries


def open_stored(store: SegmentStore, seg_id: bytes) -> tuple[BinaryIO, int]:
    """A stored segment's file, open for reading, and its size (NotFoundError if gone)."""
    path, size = store.locate(seg_id)
    try:
        return path.open("rb"), size
    except FileNotFoundError:
        raise NotFoundError(f"segment {seg_id.hex()[:16]} is not stored here") from None


async def _expect_ack(conn: Connection) -> None:
    frame = await conn.read_frame()
    if isinstance(frame, wire.Error):
        raise remote_error(frame, conn.peer_address)
    if not isinstance(frame, wire.Ack):
        raise IntegrityError("expected an ACK")


class Replicator:
    """Copies ranges between peers and keeps them here (see the module docstring)."""

    def __init__(
        self,
        *,
        identity: Identity,
        store: SegmentStore,
        holdings: Holdings,
        dht: Dht,
        config: PeerConfig,
        address: tuple[str, int],
        clock: Callable[[], float],
        network: PeerNetwork,
    ) -> None:
        self.identity = identity
        self.store = store
        self.holdings = holdings
        self.dht = dht
        self.config = config
        # where other peers reach this one (signed into its holder entries)
        self.address = address
        self.clock = clock
        self.network = network
        # metrics: verified segment bytes this peer fetched for itself (heal), and the
        # segments it received that failed verification
        self.fetched_bytes = 0
        self.verification_failures = 0

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    # -- keeping ranges here -----------------------------------------------------------------

    async def hash_list(self, integrity: bytes, count: int) -> list[bytes]:
        """The verified hash list ``integrity`` of ``count`` segments, stored here."""
        if not self.store.has(integrity):
            raise NotFoundError(f"hash list {integrity.hex()[:16]} is not stored here")
        data = await asyncio.to_thread(self.store.read, integrity)
        return list(segments.verify_hash_list(data, IntegrityRoot(SegmentId(integrity)), count))

    async def hold(
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
        free the old): AlreadyExistsError (two puts of one version raced; one keeps it).
        """
        if count and not start <= end < count:
            raise UsageError("range outside the object")
        self._reachable()
        existing = await asyncio.to_thread(self.holdings.get, NameKey(key), version, start)
        if existing is not None:
            if (existing.integrity, existing.end) != (integrity, end):
                raise AlreadyExistsError(
                    f"this peer holds other content for version {version} of that name"
                )
            return None, self.sign_entry(key, version, integrity, start, end)
        if hashes is None:
            hashes = await self.hash_list(integrity, count)
        owner = holding_owner(NameKey(key), version, start)
        wanted = [integrity, *hashes[start : end + 1]]
        await asyncio.to_thread(self.store.add_refs, wanted, owner)
        holding = Holding(
            NameKey(key),
            version,
            IntegrityRoot(SegmentId(integrity)),
            count,
            start,
            end,
            self.clock(),
        )
        await asyncio.to_thread(self.holdings.add, holding)
        return holding, self.sign_entry(key, version, integrity, start, end)

    def _reachable(self) -> tuple[str, int]:
        """Where others reach this peer; NetworkError while it does not know (a wildcard
        bind whose address no two peers have observed yet, docs/SECURITY.md)."""
        host, port = self.address
        if not sendable_host(host):
            raise NetworkError(
                f"this peer does not know the address others reach it at (it listens on"
                f" {format_address(host, port)}): start it with --advertise HOST:PORT"
            )
        return host, port

    def sign_entry(
        self, key: bytes, version: int, integrity: bytes, start: int, end: int
    ) -> HolderEntry:
        host, port = self._reachable()
        return build_holder_entry(
            self.identity,
            key=NameKey(key),
            version=version,
            integrity=IntegrityRoot(SegmentId(integrity)),
            start=start,
            end=end,
            host=host,
            port=port,
            issued=int(self.clock()),
        )

    def own_entries(self, key: bytes) -> list[HolderEntry]:
        """Freshly signed holder entries for everything this peer holds of ``key``."""
        return [
            self.sign_entry(h.key, h.version, h.integrity, h.start, h.end)
            for h in self.holdings.of_key(NameKey(key))
        ]

    async def free_holding(self, h: Holding) -> int:
        """Forget a holding and delete the segments nothing else here needs; bytes freed."""
        self.holdings.remove(h)
        return await asyncio.to_thread(self.store.release, h.owner)

    # -- copies to other peers ---------------------------------------------------------------

    async def push_range(
        self,
        address: tuple[str, int],
        key: NameKey,
        version: int,
        integrity: IntegrityRoot,
        start: int,
        end: int,
        pace: Pace | None = None,
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
        store = self.store
        if hashes is None:
            count = store.size_of(integrity) // segments.HASH_SIZE
            hashes = await self.hash_list(integrity, count)
        conn = await Connection.open(
            address,
            io_timeout=self.config.io_timeout,
            network=self.network,
            credential=control.PeerCredential(self.identity),
        )
        loop = asyncio.get_running_loop()
        # a receiver (or link) gone silent is given up at its measured rate (PushPace),
        # never later than the configured I/O deadline
        acks = PushPace()
        sizes: collections.deque[int] = collections.deque()

        async def ack() -> None:
            size = sizes.popleft()
            conn.io_timeout = min(self.config.io_timeout, acks.limit(size))
            await _expect_ack(conn)
            acks.acked(size, loop.time())

        try:
            ids = [integrity, *hashes[start : end + 1]]
            for seg_id in ids:
                # straight from the segment file with sendfile (the receiver verifies)
                fh, size = await asyncio.to_thread(open_stored, store, seg_id)
                try:
                    if pace is not None:
                        await pace(size)
                    acks.sent(loop.time())
                    conn.io_timeout = min(self.config.io_timeout, acks.limit(size))
                    await conn.send_file(
                        0, fh, 0, size, msg_type=wire.MsgType.PUT_SEG, prefix=seg_id
                    )
                finally:
                    fh.close()
                sizes.append(size)
                while len(sizes) >= PUSH_WINDOW or sum(sizes) >= PUSH_BYTES:
                    await ack()
            while sizes:
                await ack()
            # the receiver checks the whole range before it signs: the full deadline
            conn.io_timeout = self.config.io_timeout
            reason = HoldReason(kind, key, version, start, end)
            reply = await conn.request(
                HoldRequest(key, version, integrity, len(hashes), start, end, reason)
            )
        finally:
            conn.close()
        entry = parse_holder_entry(bytes.fromhex(reply.entry))
        if (entry.key, entry.version, entry.start, entry.end) != (key, version, start, end):
            raise IntegrityError("holder signed an entry for something else")
        return entry

    async def make_copies(
        self,
        candidates: Sequence[Contact],
        missing: int,
        copy: Callable[[Contact], Awaitable[HolderEntry]],
        *,
        asked: Set[NodeId] = frozenset(),
        used: Sequence[Domain] = (),
        parallel: bool = True,
        doing: str = "place",
    ) -> list[HolderEntry]:
        """Ask ``candidates`` in the order placement.choose_targets gives for ``missing``
        copies (all missing ones at once if ``parallel``, else one by one), the next one
        when a peer refuses or fails; the holder entries made. Peers in ``asked`` are not
        asked; ``used`` are the failure domains of the copies that exist already (each
        copy made here adds its own)."""
        made: list[HolderEntry] = []
        done = set(asked)
        domains = list(used)
        while len(made) < missing:
            batch = choose_targets(
                candidates, missing - len(made) if parallel else 1, done, domains
            )
            if not batch:
                break
            done.update(c.node_id for c in batch)
            outcomes = await asyncio.gather(*(copy(c) for c in batch), return_exceptions=True)
            for contact, outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, DifsError):
                    log.info("%s_skip peer=%s reason=%s", doing, contact.address, outcome)
                elif isinstance(outcome, BaseException):
                    raise outcome
                else:
                    made.append(outcome)
                    domains.append(domain_of(contact.host, contact.port, contact.zone))
        return made

    async def place(
        self,
        key: NameKey,
        version: int,
        integrity: IntegrityRoot,
        count: int,
        hashes: list[bytes],
        ranges: list[tuple[int, int]],
        replicas: int,
        mine: list[Holding],
        *,
        keep: bool = False,
    ) -> PlaceReply:
        """Make r copies of each range on the closest peers to its range key that accept
        it, this peer included where placement picks it (its new holdings are appended
        to ``mine``); the entries, holders per range and warnings ``place`` answers.
        ``keep``: this peer is every range's first candidate (it holds the whole object
        already, as an S3 multipart upload's serving peer does), so placement counts its
        copy and picks r - 1 others by its rules (failure domains apart from this one)."""
        entries: list[str] = []
        sem = asyncio.Semaphore(PLACE_PARALLEL)
        warnings: list[str] = []
        me = self.node_id

        async def place_range(i: int, start: int, end: int) -> PlacedRange:
            taken: list[AlreadyExistsError] = []

            async def copy(contact: Contact) -> HolderEntry:
                try:
                    return await copy_to(contact)
                except AlreadyExistsError as exc:
                    taken.append(exc)
                    raise

            async def copy_to(contact: Contact) -> HolderEntry:
                if contact.node_id == me:
                    holding, entry = await self.hold(
                        key, version, integrity, count, start, end, hashes
                    )
                    if holding is not None:
                        mine.append(holding)
                    return entry
                return await self.push_range(
                    contact.tcp_address,
                    key,
                    version,
                    integrity,
                    start,
                    end,
                    None,
                    hashes,
                    kind="place",
                )

            # the closest peers to the range key, this one included
            rkey = range_key(IntegrityRoot(SegmentId(integrity)), i)
            candidates = await self.dht.closest(rkey, replicas + 8)
            if keep:
                candidates = [self.dht.me, *(c for c in candidates if c.node_id != me)]
            async with sem:
                # the missing copies are made in parallel; a refusal moves on to the next
                made = await self.make_copies(candidates, replicas, copy)
            if not made and taken:
                # every peer asked holds this version's range as other content: another put
                # of the same version ran at the same time (or someone holds junk there)
                raise AlreadyExistsError(
                    f"every peer asked for segments {start}..{end} holds other content under "
                    f"version {version} of this name (another put of this version at the same "
                    "time, or junk held there): nothing was published"
                )
            entries.extend(e.raw.hex() for e in made)
            warning = shortfall(start, end, len(made), replicas, len(candidates))
            if warning is not None:
                warnings.append(warning)
            return PlacedRange(start, end, tuple(e.node_id.hex() for e in made))

        # every range's placement ends before a failure is raised, so that ``mine`` lists
        # every holding made here (the caller frees them) and no push outlives the call
        outcomes = await asyncio.gather(
            *(place_range(i, a, b) for i, (a, b) in enumerate(ranges)), return_exceptions=True
        )
        placed: list[PlacedRange] = []
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            placed.append(outcome)
        return PlaceReply(tuple(entries), tuple(placed), tuple(sorted(set(warnings))))

    async def place_chained(
        self, plan: ChainPlan, version: int, integrity: IntegrityRoot, mine: list[Holding]
    ) -> PlaceReply:
        """Finish a chain upload (chain.py): every hop of each range's chain checks it has
        the range and signs its holder entry (``hold`` down the chain), this peer too where
        it is a hop (its new holdings are appended to ``mine``); ``place``'s answer."""
        key = NameKey(plan.request.key)
        count = plan.request.segment_count
        routes = await plan.all_routes()

        async def finish(r: ChainRange) -> tuple[PlacedRange, list[HolderEntry], str | None]:
            made: list[HolderEntry] = []
            taken: list[AlreadyExistsError] = []
            if r.mine:
                try:
                    holding, entry = await self.hold(key, version, integrity, count, r.start, r.end)
                except AlreadyExistsError as exc:
                    taken.append(exc)
                except DifsError as exc:
                    log.info("place_skip peer=self reason=%s", exc)
                else:
                    if holding is not None:
                        mine.append(holding)
                    made.append(entry)
            if r.link is not None:
                reason = HoldReason("place", key, version, r.start, r.end)
                request = HoldRequest(key, version, integrity, count, r.start, r.end, reason)
                try:
                    reply = await r.link.hold(request)
                except AlreadyExistsError as exc:
                    taken.append(exc)
                except DifsError as exc:
                    log.info("place_skip peer=%s reason=%s", r.hops[0].tcp_address, exc)
                else:
                    made += chain_entries(reply, r, key, version, integrity)
            if not made and taken:
                raise AlreadyExistsError(
                    f"a peer asked for segments {r.start}..{r.end} holds other content under "
                    f"version {version} of this name (another put of this version at the same "
                    "time, or junk held there): nothing was published"
                )
            placed = PlacedRange(r.start, r.end, tuple(e.node_id.hex() for e in made))
            replicas = plan.request.replicas
            return placed, made, shortfall(r.start, r.end, len(made), replicas, r.candidates)

        outcomes = await asyncio.gather(*(finish(r) for r in routes), return_exceptions=True)
        entries: list[str] = []
        placed: list[PlacedRange] = []
        warnings: set[str] = set()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
            placed.append(outcome[0])
            entries += (e.raw.hex() for e in outcome[1])
            if outcome[2] is not None:
                warnings.add(outcome[2])
        return PlaceReply(tuple(entries), tuple(placed), tuple(sorted(warnings)))

    async def probe_ranges(
        self, address: tuple[str, int], queries: list[Query], *, limit: float
    ) -> list[bool] | None:
        """Ask a peer over one connection whether it holds each range (key, version, start,
        end): its answers in order, or None if it did not answer within ``limit`` seconds
        per request (or answered what does not decode). A peer without ``holds_ranges`` is
        asked range by range (``holds``)."""
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
                                reply = await conn.request(
                                    RangesRequest(tuple(RangeRequest(*q) for q in chunk))
                                )
                        except RemoteRejectedError:
                            batched = False  # an older peer: unknown operation
                        else:
                            if len(reply.holds) != len(chunk):
                                return None
                            answers += reply.holds
                            continue
                    for query in chunk:
                        async with asyncio.timeout(limit):
                            single = await conn.request(RangeRequest(*query))
                        answers.append(single.holds)
                return answers
            finally:
                conn.close()
        except (TimeoutError, DifsError, OSError):
            return None

    # -- healing -----------------------------------------------------------------------------

    async def heal(self, seg_id: bytes) -> int:
        """Fetch a good copy of a damaged or missing segment from another holder; 1 if
        healed, else 0."""
        for h in self.holdings.all():
            try:
                hashes = await self.hash_list(h.integrity, h.segment_count)
            except DifsError:
                hashes = []
            if seg_id != h.integrity and seg_id not in hashes[h.start : h.end + 1]:
                continue
            for raw in split_entries(await self.dht.get_entries(h.key)).holders:
                with contextlib.suppress(DifsError):
                    entry = parse_holder_entry(raw)
                    if entry.node_id == self.node_id or entry.version != h.version:
                        continue
                    data = await self.fetch_segment((entry.host, entry.port), seg_id)
                    await asyncio.to_thread(self.store.put, seg_id, data, h.owner)
                    log.info("healed segment=%s from=%s", seg_id.hex()[:12], entry.host)
                    return 1
        return 0

    async def fetch_segment(self, address: tuple[str, int], seg_id: bytes) -> bytes:
        """One segment from a holder, verified against its id."""
        conn = await Connection.open(
            address, io_timeout=self.config.io_timeout, network=self.network
        )
        try:
            await conn.send(wire.GetSeg(request_id=0, seg_id=SegmentId(seg_id), offset=0, length=0))
            frame = await conn.read_frame()
        finally:
            conn.close()
        if not isinstance(frame, wire.Data):
            raise NotFoundError("holder has no copy")
        data = bytes(frame.data)
        try:
            segments.verify_segment(SegmentId(seg_id), data)
        except IntegrityError:
            self.verification_failures += 1
            raise
        self.fetched_bytes += len(data)
        return data
