"""The control operations a peer answers (``status``, ``resolve``, ``place``, ``hold``,
``publish``, ``release``, ``holds``, ``holds_ranges``, ``prove``, ``check``, ``suspect``,
``abandon``, ``drain``, ``children``, ``add_children``), each with its row in the permission
table (control.CONTROL_TABLE), which service.py checks before a handler runs.

:class:`Operations` is built by the peer from its running parts. Each handler takes the
operation's typed request, decoded and checked by service.py with the operation's row of
ops.OPS, and answers its typed reply, which the service encodes with the same row: no
handler reads the CALL's arguments. See docs/ARCHITECTURE.md, "Publish" and "Fetch", for
how a client uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from difs_p2p import classgen, segments
from difs_p2p.chain import ChainPlan, Link
from difs_p2p.config import PeerConfig
from difs_p2p.control import CONTROL_TABLE
from difs_p2p.dht import Dht
from difs_p2p.drain import LEAVING
from difs_p2p.errors import (
    BusyError,
    CapacityError,
    DifsError,
    IntegrityError,
    PermissionDeniedError,
    UsageError,
    WireError,
)
from difs_p2p.holders import parse_holder_entry
from difs_p2p.holdings import Holding, Holdings
from difs_p2p.holdproof import prove_many_message, prove_message
from difs_p2p.identity import Identity
from difs_p2p.leaving import Drainer
from difs_p2p.listing import decode_child
from difs_p2p.maintenance import gc_due
from difs_p2p.manifest import Manifest, parse_manifest
from difs_p2p.membership import OK, publish_quorum
from difs_p2p.names import NameKey
from difs_p2p.net import PeerNetwork
from difs_p2p.ops import (
    MAX_CHILDREN_BYTES,
    AbandonReply,
    AbandonRequest,
    AddChildrenReply,
    AddChildrenRequest,
    ChainReply,
    ChainRequest,
    CheckReply,
    CheckRequest,
    ChildrenReply,
    ChildrenRequest,
    DrainReply,
    DrainRequest,
    HoldReply,
    HoldRequest,
    HoldsRangesReply,
    HoldsReply,
    PlaceReply,
    PlaceRequest,
    ProveManyReply,
    ProveManyRequest,
    ProveReply,
    ProveRequest,
    PublishReply,
    PublishRequest,
    RangeRequest,
    RangesRequest,
    RelayHop,
    RelayReply,
    RelayRequest,
    ReleaseReply,
    ReleaseRequest,
    ResolveReply,
    ResolveRequest,
    StatusReply,
    StatusRequest,
    SuspectReply,
    SuspectRequest,
)
from difs_p2p.records import child_entries, record_hash, split_entries
from difs_p2p.repair import Maintainer
from difs_p2p.replicator import Replicator
from difs_p2p.service import ControlHandler
from difs_p2p.store import SegmentStore
from difs_p2p.transfer import Connection
from difs_p2p.uploads import Uploads

__all__ = ["OPERATIONS", "Operations"]

log = logging.getLogger(__name__)

# The control operations, as named in the permission table.
OPERATIONS = frozenset(op for op in CONTROL_TABLE if op.islower())


def chain_hashes(plan: ChainPlan, request: PlaceRequest) -> list[bytes]:
    """The segment ids of a chain upload ``request`` places; UsageError unless it places
    the upload announced (same key, layout and copies; its hash list received whole)."""
    announced = plan.request
    if plan.hash_list is None or plan.received != announced.segment_count + 1:
        raise UsageError("place before the announced segments and hash list were sent")
    if (request.key, request.segment_count, request.stripes, request.replicas) != (
        announced.key,
        announced.segment_count,
        announced.stripes,
        announced.replicas,
    ) or plan.hash_list[0] != request.integrity:
        raise UsageError("place does not match the upload announced on this connection")
    data = plan.hash_list[1]
    return [data[i : i + segments.HASH_SIZE] for i in range(0, len(data), segments.HASH_SIZE)]


class Operations:
    """The control handlers of a running peer (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: Identity,
        store: SegmentStore,
        dht: Dht,
        holdings: Holdings,
        replicator: Replicator,
        maintainer: Maintainer,
        uploads: Uploads,
        network: PeerNetwork,
        status: Callable[[], dict[str, Any]],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        drainer: Drainer,
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.dht = dht
        self.holdings = holdings
        self.replicator = replicator
        self.maintainer = maintainer
        self.uploads = uploads
        self.network = network
        self.status = status
        self.spawn = spawn
        self.drainer = drainer
        self.handlers: dict[str, ControlHandler[Any, Any]] = {
            "status": self._op_status,
            "resolve": self._op_resolve,
            "place": self._op_place,
            "chain": self._op_chain,
            "relay": self._op_relay,
            "hold": self._op_hold,
            "publish": self._op_publish,
            "release": self._op_release,
            "holds": self._op_holds,
            "holds_ranges": self._op_holds_ranges,
            "prove": self._op_prove,
            "prove_many": self._op_prove_many,
            "check": self._op_check,
            "suspect": self._op_suspect,
            "abandon": self._op_abandon,
            "drain": self._op_drain,
            "children": self._op_children,
            "add_children": self._op_add_children,
        }
        # every control operation has its handler, and no handler is unlisted
        assert set(self.handlers) == OPERATIONS

    @property
    def address(self) -> tuple[str, int]:
        return self.replicator.address

    async def _op_status(self, conn: Connection, request: StatusRequest) -> StatusReply:
        return StatusReply(self.status())

    async def _op_resolve(self, conn: Connection, request: ResolveRequest) -> ResolveReply:
        """The valid manifests under a name key (best first), its history and holders; with
        ``also``, those of a second key (a claim object), looked up at the same time.
        Answered from a resolve of the last ``resolve_cache`` seconds if there is one
        (``Dht.resolve_cached``: the staleness bound for names written elsewhere)."""
        if request.also is None:
            return self._resolved(*await self.dht.resolve_cached(request.key))
        (records, entries), also = await asyncio.gather(
            self.dht.resolve_cached(request.key), self.dht.resolve_cached(request.also)
        )
        return classgen.replace(self._resolved(records, entries), also=self._resolved(*also))

    def _resolved(self, records: list[bytes], entries: list[bytes]) -> ResolveReply:
        split = split_entries(entries)
        # a peer cut off from the network says so: its answer is not the network's
        state = self.dht.network_state()
        return ResolveReply(
            tuple(r.decode() for r in records),
            tuple(e.decode() for e in split.history),
            tuple(e.hex() for e in split.holders),
            state.state,
            state.size,
            state.most_seen,
        )

    async def _op_place(self, conn: Connection, request: PlaceRequest) -> PlaceReply:
        """Place a just-uploaded object: r copies of each range, this peer included only
        where placement picks it.

        Range i goes to the closest live peers to BLAKE3(integrity || i) that accept it
        (a peer without space refuses and the next one is asked), r copies in all. This
        peer keeps the ranges it is among those peers for; the copies for the others are
        pushed from the uploaded segments, which are then dropped unless kept. The ranges
        kept are freed again unless ``publish`` on this connection stores the manifest.
        """
        key, version, integrity = request.key, request.version, request.integrity
        count, stripes = request.segment_count, request.stripes
        replicas = max(1, request.replicas)
        self._refuse_if_leaving()
        session = self.uploads.session(conn)
        plan = session.plans.pop(bytes(integrity), None)
        if plan is None and session.plan is not None:
            raise UsageError("place before the announced segments and hash list were sent")
        session.busy += 1
        mine: list[Holding] = []
        hashes: list[bytes] = []
        try:
            if plan is not None:
                # announced with ``chain``: the copies are made, each hop signs its entry
                hashes = chain_hashes(plan, request)
                placed = await self.replicator.place_chained(plan, version, integrity, mine)
            else:
                hashes = await self.replicator.hash_list(integrity, count)
                # an empty object is its hash list alone: one range of no segments
                ranges = segments.stripe_ranges(count, stripes) or [(0, 0)]
                placed = await self.replicator.place(
                    key,
                    version,
                    integrity,
                    count,
                    hashes,
                    ranges,
                    replicas,
                    mine,
                    keep=request.keep,
                )
        except BaseException:
            for h in mine:
                with contextlib.suppress(DifsError):
                    await self.replicator.free_holding(h)
            raise
        else:
            session.placed[(key, version, integrity)] = mine
        finally:
            if plan is not None:
                plan.close()  # every hop holds its ranges now (or failed)
            session.busy -= 1
            session.active = asyncio.get_running_loop().time()
            # what placement did not give this peer is not needed here any more
            await asyncio.to_thread(self.store.end_session, session.id, [integrity, *hashes])
        return placed

    async def _op_hold(self, conn: Connection, request: HoldRequest) -> HoldReply:
        """Check that segments start..end are stored here and sign a holder entry; on a
        connection that relays (``relay``), the next hop's entries follow."""
        key, version, start, end = request.key, request.version, request.start, request.end
        reason = request.reason
        self._refuse_if_leaving()
        if conn.role == "peer" and reason is not None and reason.kind == "repair":
            await self._check_co_holder(conn, key, version, start, end)
        _, entry = await self.replicator.hold(
            key, version, request.integrity, request.segment_count, start, end
        )
        link = self.uploads.session(conn).link
        if link is None:
            return HoldReply(entry.raw.hex())
        try:
            after = await link.hold(request)
        except DifsError as exc:
            # this copy stands; the hops after it are left out (the entry peer sees fewer)
            log.info("chain_hold_failed peer=%s reason=%s", link.hop.host, exc)
            return HoldReply(entry.raw.hex())
        return HoldReply(entry.raw.hex(), (after.entry, *after.chain))

    async def _op_chain(self, conn: Connection, request: ChainRequest) -> ChainReply:
        """Announce an upload on this connection: its ranges' holders are picked now and
        every segment goes along its range's chain as it arrives (chain.py)."""
        self._refuse_if_leaving()
        session = self.uploads.session(conn)
        if session.plan is not None:
            raise UsageError("an upload announced on this connection is still being sent")
        if request.segment_size > segments.MAX_SEGMENT_SIZE:
            raise UsageError(f"segments are at most {segments.MAX_SEGMENT_SIZE} bytes")
        plan = ChainPlan(
            request,
            self.identity.node_id,
            self.dht.closest,
            self._open_link,
            self._room,
            keepalive=self.config.idle_timeout / 3,
        )
        plan.start()
        session.plan = plan
        return ChainReply(len(plan.ranges))

    async def _op_relay(self, conn: Connection, request: RelayRequest) -> RelayReply:
        """Take part in a chain: room for ``size`` more bytes here, and every segment
        uploaded on this connection forwarded to ``to[0]`` (which forwards to the rest);
        how many hops of ``to`` are linked."""
        self._refuse_if_leaving()
        session = self.uploads.session(conn)
        # asked again (a keep-alive while the rest of the upload flows): still active
        session.active = asyncio.get_running_loop().time()
        if not session.relayed and not self._room(request.size):
            raise CapacityError(f"no room here for {request.size} more bytes")
        session.relayed = True
        if not request.to:
            return RelayReply(0)
        link = session.link
        if link is not None and link.hop != request.to[0]:
            raise UsageError("this connection relays to another peer")
        if link is None:
            try:
                link = await self._open_link(request.to[0])
            except (DifsError, OSError) as exc:
                log.info("chain_skip peer=%s reason=%s", request.to[0].host, exc)
                return RelayReply(0)
            session.link = link
        try:
            ready = await link.relay(request.to[1:], request.size)
        except (DifsError, OSError) as exc:
            log.info("chain_skip peer=%s reason=%s", request.to[0].host, exc)
            link.close()
            session.link = None
            return RelayReply(0)
        return RelayReply(1 + ready)

    async def _open_link(self, hop: RelayHop) -> Link:
        return await Link.open(hop, self.identity, self.network, self.config.io_timeout)

    def _room(self, size: int) -> bool:
        """Whether this peer takes ``size`` more bytes now (room, and not leaving)."""
        return not self.drainer.leaving and self.store.used + size <= self.store.capacity

    def _refuse_if_leaving(self) -> None:
        """A leaving peer takes no new copies: BUSY, so that placement and repair ask the
        next peer."""
        if self.drainer.leaving:
            raise BusyError(LEAVING)

    async def _check_co_holder(
        self, conn: Connection, key: bytes, version: int, start: int, end: int
    ) -> None:
        """A peer repairing a range must hold it: its own entry for that version, covering
        the range, is in the DHT (entries are signed, so it cannot borrow another's)."""
        for raw in split_entries(await self.dht.get_entries(key)).holders:
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

    async def _op_publish(self, conn: Connection, request: PublishRequest) -> PublishReply:
        """Store a signed manifest and its holder entries on the name's key/value peers.

        If every one of the k closest peers took the manifest, no other record can win
        there; otherwise (a racing publisher, a peer that did not answer) the name is read
        back to learn which record won. Peers admit entries only after the manifest they
        belong to (the record rides first in the same request); if some peer refused
        entries, they are sent again once the record is there.
        """
        raw = request.manifest.encode()
        manifest = parse_manifest(raw)
        dht = self.dht
        entries = [bytes.fromhex(e) for e in request.entries]
        items = [raw, *entries]
        state = dht.network_state()
        required = publish_quorum(state.most_seen, self.config.dht.ksize)
        if state.state != OK:
            # cut off: the few peers it sees would be the name's only copies; nothing
            # is stored (the client reports the publish failed, see check_published)
            log.warning(
                "publish_refused key=%s network=%s contacts=%d most_seen=%d",
                manifest.key.hex()[:12],
                state.state,
                state.size,
                state.most_seen,
            )
            return PublishReply(0, None, 0, 0, required)
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
        # the quorum is of the key/value peers the write reached (they answered, took the
        # record or refused it by policy): a partition, not a refusal, keeps it low
        reached = max(accepted, stored.reached)
        if winner == manifest.hash and reached < required:
            # a store answered after the stall time (a loaded peer) still lands: count
            # once more before calling the publish short (an identical record is only
            # refreshed where it is held already)
            again = await dht.put_with_entries(manifest.key, raw, items)
            accepted = max(accepted, again.accepted)
            reached = max(reached, again.accepted, again.reached)
        if winner == manifest.hash and reached < required:
            # fewer than a quorum of the name's key/value peers answered: not published
            # (the few that took it keep it; see docs/ARCHITECTURE.md, "Rejoin")
            log.warning(
                "publish_short key=%s accepted=%d reached=%d required=%d",
                manifest.key.hex()[:12],
                accepted,
                reached,
                required,
            )
            winner = None
        if winner == manifest.hash:
            self.uploads.published(conn, manifest.key, manifest.version, manifest.integrity)
        if winner == manifest.hash and not manifest.deleted:
            # this peer holds what it placed: it knows the lineage at once
            await asyncio.to_thread(
                self.holdings.bind,
                manifest.key,
                manifest.version,
                manifest.integrity,
                manifest.lineage,
            )
        if winner == manifest.hash and (
            manifest.deleted or manifest.version > self.config.repair.keep
        ):
            self.spawn(self._release_everywhere(manifest))
        return PublishReply(accepted, winner, stored.readable_paths, stored.quorum, required)

    async def _release_everywhere(self, proof: Manifest) -> None:
        """Show every known holder of the name the owner's new manifest (a tombstone, or
        a version that may retire old ones), so each frees what it proves superseded."""
        dht = self.dht
        key = proof.key
        addresses = set()
        for raw in split_entries(await dht.get_entries(key)).holders:
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
                    await conn.request(ReleaseRequest(key, proof.raw.decode()))
                finally:
                    conn.close()
            except DifsError as exc:
                log.info("release_failed peer=%s reason=%s", address, exc)

    async def _op_release(self, conn: Connection, request: ReleaseRequest) -> ReleaseReply:
        """Free what an owner-signed manifest (``proof``) supersedes; open to anyone, as
        the proof alone decides."""
        try:
            manifest = parse_manifest(request.proof.encode(), request.key)
        except WireError as exc:
            raise UsageError(f"malformed proof: {exc}") from None
        return ReleaseReply(await self._release(request.key, manifest))

    async def _release(self, key: NameKey, proof: Manifest) -> int:
        """Free the holdings of ``key`` that ``proof`` supersedes in their own lineage
        (``maintenance.gc_due``: same owner or delegate, same lineage root, a tombstone or
        ``keep`` versions newer). Holdings whose lineage is not known yet learn it first
        from the name's view, as maintenance does; the proof alone decides what goes."""
        held = self.holdings.of_key(key)
        unbound = [h for h in held if h.lineage is None and h.version < proof.version]
        if unbound:
            held = await self.maintainer.bind_from_dht(key, held)
        keep, now = self.config.repair.keep, time.time()
        freed = 0
        for h in held:
            if gc_due(h.lineage, proof, keep, now):
                freed += await self.replicator.free_holding(h)
        return freed

    async def _op_holds(self, conn: Connection, request: RangeRequest) -> HoldsReply:
        """Whether this peer holds a range (asked by other holders for failure detection)."""
        r = request
        return HoldsReply(self.holdings.covers(r.key, r.version, r.start, r.end))

    async def _op_holds_ranges(self, conn: Connection, request: RangesRequest) -> HoldsRangesReply:
        """Whether this peer holds each of up to ``ops.MAX_PROBE_RANGES`` ranges, in order
        (one request per co-holder and maintenance round)."""
        db = self.holdings

        def answer() -> tuple[bool, ...]:
            return tuple(db.covers(r.key, r.version, r.start, r.end) for r in request.ranges)

        return HoldsRangesReply(await asyncio.to_thread(answer))

    async def _op_prove(self, conn: Connection, request: ProveRequest) -> ProveReply:
        """Prove to a DHT peer listing our entry that we hold a range: our node key's
        signature over its nonce and the range (holdproof.prove_message), if we hold it."""
        key, version, start, end = request.key, request.version, request.start, request.end
        if not self.holdings.covers(NameKey(key), version, start, end):
            return ProveReply(False)
        message = prove_message(request.nonce, key, version, start, end)
        return ProveReply(True, self.identity.sign(message))

    async def _op_prove_many(self, conn: Connection, request: ProveManyRequest) -> ProveManyReply:
        """``prove`` for many ranges at once: which we hold, and one signature over the
        nonce, every item and every answer (holdproof.prove_many_message)."""
        holds = tuple(
            self.holdings.covers(NameKey(r.key), r.version, r.start, r.end) for r in request.items
        )
        if not any(holds):
            return ProveManyReply(holds)
        message = prove_many_message(request.nonce, request.items, holds)
        return ProveManyReply(holds, self.identity.sign(message))

    async def _op_check(self, conn: Connection, request: CheckRequest) -> CheckReply:
        """Verify every stored segment; with repair, quarantine damage and fetch good copies."""
        repair = request.repair
        report = await asyncio.to_thread(self.store.check, repair)
        healed = 0
        if repair:
            for seg_id in [*report.corrupt, *report.missing]:
                healed += await self._heal(seg_id)
        orphans = await asyncio.to_thread(self.store.orphans)
        return CheckReply(
            report.checked,
            report.ok,
            tuple(c.hex() for c in report.corrupt),
            tuple(m.hex() for m in report.missing),
            healed,
            # segments no holding keeps: sent by an upload in progress, or orphaned (left
            # by a failed one and collected within the grace time)
            (orphans.pending, orphans.pending_bytes),
            (orphans.orphaned, orphans.orphaned_bytes),
            self.config.repair.orphan_grace,
        )

    async def _op_suspect(self, conn: Connection, request: SuspectRequest) -> SuspectReply:
        """A fetcher got a bad copy of a segment from us: verify it, heal it if damaged."""
        seg_id = request.segment
        store = self.store
        if not store.has(seg_id):
            return SuspectReply(False, 0)
        try:
            await asyncio.to_thread(store.read, seg_id)
            return SuspectReply(False, 0)
        except IntegrityError:
            pass
        return SuspectReply(True, await self._heal(seg_id))

    async def _heal(self, seg_id: bytes) -> int:
        """Fetch a good copy of a damaged or missing segment from another holder."""
        healed = await self.replicator.heal(seg_id)
        self.maintainer.stats.healed_segments += healed
        return healed

    async def _op_abandon(self, conn: Connection, request: AbandonRequest) -> AbandonReply:
        """The client gives up a publish: drop what this connection uploaded and placed
        but did not publish."""
        return AbandonReply(await self.uploads.abandon(conn))

    async def _op_drain(self, conn: Connection, request: DrainRequest) -> DrainReply:
        """Leave the network (the operator's ``difs-peer leave``): start the drain, report
        how it goes, or cancel it (see leaving.py)."""
        drainer = self.drainer
        if request.action == "start":
            drainer.start(request.force, watched=True)
        elif request.action == "cancel":
            drainer.cancel()
        report = drainer.report()
        return DrainReply(
            report["state"],
            report.get("ranges", 0),
            report.get("done", 0),
            report.get("already_safe", 0),
            report.get("handed_over", 0),
            report.get("unpublished", 0),
            tuple(report.get("failed", ())),
            report.get("bytes_moved", 0),
            report.get("copies_made", 0),
            report.get("records", 0),
            report.get("seconds", 0.0),
        )

    async def _op_children(self, conn: Connection, request: ChildrenRequest) -> ChildrenReply:
        """The child entries the DHT holds at a shard key (unverified: the client checks
        them), in byte order from ``offset``, as many as fit in one reply."""
        found = sorted(child_entries(await self.dht.get_entries(request.key)))
        page: list[str] = []
        size, at = 0, request.offset
        while at < len(found) and (not page or size + len(found[at]) <= MAX_CHILDREN_BYTES):
            page.append(found[at].hex())
            size += len(found[at])
            at += 1
        return ChildrenReply(tuple(page), at if at < len(found) else 0)

    async def _op_add_children(
        self, conn: Connection, request: AddChildrenRequest
    ) -> AddChildrenReply:
        """Store child entries at a key (their shard key, or the entry set of a name they
        list): the key's peers verify and admit each (recordpolicy.child_admission)."""
        raws = [bytes.fromhex(e) for e in request.entries]
        for i, raw in enumerate(raws):
            try:
                decode_child(raw)
            except WireError as exc:
                raise UsageError(f"entry {i} is not a child entry: {exc}") from None
        return AddChildrenReply(await self.dht.add_entries(request.key, raws))
