"""Upload sessions and the orphan sweep of a peer.

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
import logging
import os
import time

from difs_p2p.chain import ChainPlan, Link
from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import DifsError, UsageError
from difs_p2p.holdings import Holding
from difs_p2p.replicator import Replicator
from difs_p2p.segments import SegmentId
from difs_p2p.store import SegmentStore
from difs_p2p.transfer import Connection

__all__ = ["UploadSession", "Uploads", "orphan_sweep_every", "store_pending"]

log = logging.getLogger(__name__)


@valueclass(frozen=False)
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
    # own pending row (see store_pending)
    ended: bool = False
    # chain replication: the entry peer's plan of an upload announced with ``chain``, or
    # (on a holder asked to ``relay``) the link every segment is forwarded on
    plan: ChainPlan | None = None
    link: Link | None = None
    # announced uploads received whole, waiting for their ``place``, by integrity root
    plans: dict[bytes, ChainPlan] = field(default_factory=dict)
    # whether this connection was asked to ``relay`` (its room checked once)
    relayed: bool = False


def store_pending(
    store: SegmentStore, session: UploadSession, seg_id: bytes, data: bytes | memoryview
) -> bool:
    """Store an uploaded segment as pending in ``session`` (in a worker thread). A write
    that finishes after the session ended (its answer was cancelled with the connection)
    drops its own pending row, so that nothing stays pending for a session that is gone."""
    stored = store.put_grouped(seg_id, data, None, session.id)
    if session.ended:
        store.end_session(session.id, [seg_id])
    return stored


def orphan_sweep_every(grace: float) -> float:
    """Seconds between two sweeps for orphans: a quarter of the grace time, between 0.1 s
    and 60 s, so an orphan is collected within 1.25 x grace (at most grace + 60 s)."""
    return min(60.0, max(0.1, grace / 4))


class Uploads:
    """The upload sessions of a peer's connections, and the sweep that expires idle ones
    and collects orphaned segments."""

    def __init__(self, store: SegmentStore, replicator: Replicator, orphan_grace: float) -> None:
        self.store = store
        self.replicator = replicator
        self.orphan_grace = orphan_grace
        self._sessions: dict[Connection, UploadSession] = {}
        # segments (and hash lists) received for uploads announced with ``chain``
        self.chained = 0

    def session(self, conn: Connection) -> UploadSession:
        """The upload session of a connection (a new one on its first upload)."""
        session = self._sessions.get(conn)
        if session is None:
            session = UploadSession(os.urandom(16), asyncio.get_running_loop().time(), {})
            self._sessions[conn] = session
        return session

    async def receive(self, conn: Connection, seg_id: bytes, data: bytes | memoryview) -> bool:
        """Store a segment uploaded on ``conn`` as pending in its session; whether it was
        new here."""
        session = self.session(conn)
        if session.plan is not None:
            stored = await self._receive_chained(session, session.plan, seg_id, data)
        else:
            stored = await self._hop(session, True, session.link, seg_id, data)
        session.active = asyncio.get_running_loop().time()
        return stored

    async def _hop(
        self,
        session: UploadSession,
        keep: bool,
        link: Link | None,
        seg_id: bytes,
        data: bytes | memoryview,
    ) -> bool:
        """One hop of a chain: forward the segment on ``link`` (if any) while storing it
        here (if ``keep``); done when both are durable (the store verifies the hash)."""
        if not keep:
            if link is None:
                return True
            await link.ack(await link.forward(SegmentId(seg_id), data))
            return True
        # the write starts first and runs while the segment is sent on
        storing = asyncio.ensure_future(
            asyncio.to_thread(store_pending, self.store, session, seg_id, data)
        )
        try:
            done = await link.forward(SegmentId(seg_id), data) if link is not None else None
        except BaseException:
            # the buffer stays ours until the write that reads it has ended
            await asyncio.gather(storing, return_exceptions=True)
            raise
        stored = await storing
        if link is not None and done is not None:
            await link.ack(done)
        return stored

    async def _receive_chained(
        self, session: UploadSession, plan: ChainPlan, seg_id: bytes, data: bytes | memoryview
    ) -> bool:
        """A segment of an upload announced with ``chain``: along its range's chain (the
        hash list, last, along every range's)."""
        n = plan.next_index()  # before any await: segments are numbered as they arrive
        self.chained += 1
        count = plan.request.segment_count
        if n < count:
            r = await plan.route(plan.range_of(n))
            if not r.copies:
                raise r.nowhere()
            return await self._hop(session, r.mine, r.link, seg_id, data)
        if n > count:
            raise UsageError(f"more than the {count} segments and hash list announced")
        # received whole: the next segments on this connection are another upload's
        plan.hash_list = (SegmentId(seg_id), bytes(data))
        session.plan = None
        replaced = session.plans.pop(bytes(seg_id), None)
        if replaced is not None:
            replaced.close()  # the same object announced twice: the newer one is placed
        session.plans[bytes(seg_id)] = plan
        routes = await plan.all_routes()
        sent = [(r.link, await r.link.forward(SegmentId(seg_id), data)) for r in routes if r.link]
        stored = True
        if any(r.mine for r in routes):
            stored = await asyncio.to_thread(store_pending, self.store, session, seg_id, data)
        for link, done in sent:
            await link.ack(done)
        return stored

    def forget(self, conn: Connection) -> UploadSession | None:
        """Stop tracking a connection's session (returned, if it had one)."""
        return self._sessions.pop(conn, None)

    async def closed(self, conn: Connection) -> None:
        """The connection closed: free what its uploads left unpublished."""
        session = self.forget(conn)
        if session is not None:
            await self.end(session, "connection closed")

    async def end(self, session: UploadSession, reason: str) -> int:
        """Free the ranges a session placed but did not publish, and the segments it sent
        that nothing else keeps; the bytes freed (as charged)."""
        freed = 0
        session.ended = True
        for plan in [session.plan, *session.plans.values()]:
            if plan is not None:
                plan.close()
        session.plan = None
        session.plans.clear()
        if session.link is not None:
            session.link.close()
            session.link = None
        try:
            for holdings in list(session.placed.values()):
                for h in holdings:
                    freed += await self.replicator.free_holding(h)
            session.placed.clear()
            freed += await asyncio.to_thread(self.store.end_session, session.id)
        except DifsError as exc:
            log.warning("upload_cleanup_failed reason=%s error=%s", reason, exc)
        if freed:
            log.info("upload_dropped reason=%s freed=%d", reason, freed)
        return freed

    async def abandon(self, conn: Connection) -> int:
        """The client gives up a publish: drop what this connection uploaded and placed
        but did not publish; the bytes freed."""
        session = self.forget(conn)
        return 0 if session is None else await self.end(session, "abandoned")

    def published(self, conn: Connection, key: bytes, version: int, integrity: bytes) -> None:
        """A manifest placed on this connection is published: its ranges here stay."""
        session = self._sessions.get(conn)
        if session is not None:
            session.placed.pop((key, version, integrity), None)

    async def collect_orphans(self) -> tuple[int, int]:
        """Expire upload sessions idle for the grace time and delete the segments nothing
        has kept for the grace time; (segments, bytes as charged) deleted."""
        grace = self.orphan_grace
        now = asyncio.get_running_loop().time()
        for conn, session in list(self._sessions.items()):
            if not session.busy and now - session.active > grace:
                if self._sessions.get(conn) is session:
                    del self._sessions[conn]
                await self.end(session, "idle")
        live = [s.id for s in self._sessions.values()]
        return await asyncio.to_thread(self.store.collect_orphans, time.time() - grace, live)

    async def sweep(self) -> None:
        """Collect orphans every ``orphan_sweep_every(grace)`` seconds, forever."""
        every = orphan_sweep_every(self.orphan_grace)
        while True:
            await asyncio.sleep(every)
            try:
                await self.collect_orphans()
            except DifsError as exc:
                log.warning("orphan_sweep_failed error=%s", exc)
