"""A peer leaving the network for good: the drain, I/O only (the plan is drain.py).

:class:`Drainer` is built by the peer from its replicator, holdings and DHT. A drain
(``start``) marks the peer as leaving (the service and ``hold``/``place`` then refuse new
copies with the "leaving" refusal, so placement and repair pick other peers), and then,
name by name:

1. reads the name from the DHT (``read_view``) and pairs each range held here with the
   other holders the view lists (``maintenance.range_checks``);
2. probes those holders (``Replicator.probe_ranges``, one request per holder, as
   maintenance does): only a holder that answers that it holds the range counts;
3. pushes the missing copies (``drain.copies_needed``) to the closest peers to the range
   key that do not hold it yet (``Replicator.make_copies`` over ``push_range``, the next
   peer on a refusal), and adds the holder entries they signed to the DHT.

Then it hands over the DHT records this peer stores (each record with its entry set, this
peer's own holder entries left out) to the k closest peers of each key, as a republish
does. Holder entries cannot be withdrawn (they carry no revocation; they expire after 48
hours), so fetchers that still try this peer's entries after it has gone move on to the
other holders. The drain deletes nothing here: a drain cut short by a crash, kill -9 or
the operator loses nothing, and one run again skips the ranges already safe elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

from difs_p2p.config import PeerConfig
from difs_p2p.dht import Dht
from difs_p2p.drain import (
    DrainProgress,
    DrainState,
    RangeRef,
    alive_elsewhere,
    copies_needed,
    describe,
    may_exit,
)
from difs_p2p.errors import DifsError
from difs_p2p.holders import HolderEntry, parse_holder_entry
from difs_p2p.holdings import Holding, Holdings, Query
from difs_p2p.maintenance import RangeCheck, probe_batches, range_checks, read_view
from difs_p2p.placement import domain_of
from difs_p2p.records import RecordKind, record_kind
from difs_p2p.replicator import Replicator
from difs_p2p.routing import Contact

__all__ = ["Drainer"]

log = logging.getLogger(__name__)

# Names drained at once (each pushes its ranges one after the other).
DRAIN_PARALLEL = 4
# The peer logs the drain's progress at most this often (seconds), besides its start and end.
PROGRESS_LOG_EVERY = 5.0
# DHT keys handed over at once (each a lookup and its stores).
RECORDS_PARALLEL = 8
# How long a finished drain waits for the ``leave`` command to collect its summary
# before the peer stops anyway (it polls every half second), and how long after the
# summary was answered (the reply is a few hundred bytes, written at once).
REPORT_WAIT = 5.0
REPORT_GRACE = 0.2


class Drainer:
    """The drain of one running peer (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        replicator: Replicator,
        holdings: Holdings,
        dht: Dht,
        clock: Callable[[], float],
        spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]],
    ) -> None:
        self.config = config
        self.replicator = replicator
        self.holdings = holdings
        self.dht = dht
        self.clock = clock
        self.spawn = spawn
        self.state = DrainState.IDLE
        self.progress: DrainProgress | None = None
        self.force = False
        # set once the drain says the peer may stop (the peer's run then ends)
        self.exit = asyncio.Event()
        # set when an operator's ``drain`` call was answered the final summary
        self.reported = asyncio.Event()
        # the drain ended and the peer stops (done, or incomplete with force)
        self.exiting = False
        self._task: asyncio.Task[Any] | None = None
        self._watched = False
        self._logged = 0.0

    @property
    def leaving(self) -> bool:
        """Whether the peer refuses new copies: while it drains, and once it is done."""
        return self.state is DrainState.DRAINING or self.exiting

    def start(self, force: bool, *, watched: bool) -> None:
        """Start draining (or, already draining, take the new ``force``). ``watched``: an
        operator's ``leave`` polls for the summary, so a finished drain waits for it."""
        if self.state is DrainState.DRAINING or self.exiting:
            self.force = self.force or force
            self._watched = self._watched or watched
            return
        self.force, self._watched = force, watched
        self.state = DrainState.DRAINING
        self.progress = DrainProgress(started=self.clock())
        self.reported.clear()
        self._task = self.spawn(self._run())

    def report(self) -> dict[str, Any]:
        """The state and accounting of the drain, for the operator; answering a finished
        drain's summary lets the peer stop."""
        if self.progress is None:
            return {"state": self.state.value}
        if self.exiting:
            self.reported.set()
        return {"state": self.state.value, **self.progress.summary(self.clock())}

    def cancel(self) -> None:
        """Stop a drain in progress: the peer is a normal peer again (copies made stay)."""
        if self.state is DrainState.DRAINING and self._task is not None:
            self._task.cancel()
            self.state = DrainState.CANCELLED
            log.warning("drain_cancelled")

    async def wait(self) -> DrainState:
        """Wait for the drain in progress to end; its final state."""
        if self._task is not None:
            await asyncio.wait([self._task])
        return self.state

    async def _run(self) -> None:
        progress = self.progress
        assert progress is not None
        try:
            await self._drain(progress)
        except Exception as exc:
            # never left half-leaving: a failed drain ends incomplete, the peer stays
            if not isinstance(exc, DifsError):
                log.exception("drain_failed")
            progress.range_failed(("", 0, 0, 0), f"the drain failed: {exc}")
        self.state = progress.finish(self.clock())
        s = progress.summary(self.clock())
        log.warning(
            "drain_%s ranges=%d handed_over=%d already_safe=%d failed=%d bytes=%d seconds=%.1f",
            self.state.value,
            s["ranges"],
            s["handed_over"],
            s["already_safe"],
            len(s["failed"]),
            s["bytes_moved"],
            s["seconds"],
        )
        for line in s["failed"]:
            log.warning("drain_range_failed %s", line)
        if not may_exit(self.state, self.force):
            log.warning(
                "drain_incomplete: the peer keeps running and takes copies again "
                "(--force leaves anyway; a second signal stops it)"
            )
            return
        self.exiting = True
        if self._watched:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(REPORT_WAIT):
                    await self.reported.wait()
                    await asyncio.sleep(REPORT_GRACE)
        self.exit.set()

    async def _drain(self, progress: DrainProgress) -> None:
        held = await asyncio.to_thread(self.holdings.all)
        by_key: dict[bytes, list[Holding]] = {}
        for h in held:
            by_key.setdefault(h.key, []).append(h)
        progress.add_ranges(len(held))
        log.warning("drain_started names=%d ranges=%d", len(by_key), len(held))
        slots = asyncio.Semaphore(DRAIN_PARALLEL)

        async def one(key: bytes, hs: list[Holding]) -> None:
            async with slots:
                await self._drain_name(progress, key, hs)

        await asyncio.gather(*(one(k, hs) for k, hs in by_key.items()))
        progress.records = await self._hand_over_records()

    async def _drain_name(self, progress: DrainProgress, key: bytes, held: list[Holding]) -> None:
        """Hand over every range of one name held here."""
        try:
            records, raw_entries = await self.dht.resolve(key)
        except DifsError as exc:
            for h in held:
                progress.range_failed(_ref(h), f"the name could not be read: {exc}")
            return
        view = read_view(key, records, raw_entries)
        me = self.replicator.node_id
        checks = range_checks(held, view, me)
        covered = {(c.holding.version, c.holding.start) for c in checks}
        # a holding counts as one range until it turns out to span several stripes
        progress.add_ranges(len(checks) - len(covered))
        for h in held:
            if (h.version, h.start) in covered:
                continue
            if h.lineage is None:
                progress.range_unpublished()
            else:
                progress.range_failed(_ref(h), "no manifest of this version was found in the DHT")
        answers = await self._probe(checks)
        for check in checks:
            await self._drain_range(progress, check, answers)

    async def _probe(self, checks: list[RangeCheck]) -> dict[bytes, dict[Query, bool] | None]:
        """Every other holder's answers about the ranges it shares with us (None: silent)."""
        batches = probe_batches(checks, {})
        limit = 2 * self.config.repair.slow_after
        nodes = list(batches)
        replies = await asyncio.gather(
            *(
                self.replicator.probe_ranges(batches[n].address, batches[n].queries, limit=limit)
                for n in nodes
            )
        )
        out: dict[bytes, dict[Query, bool] | None] = {}
        for node, reply in zip(nodes, replies, strict=True):
            queries = batches[node].queries
            out[node] = None if reply is None else dict(zip(queries, reply, strict=True))
        return out

    async def _drain_range(
        self,
        progress: DrainProgress,
        check: RangeCheck,
        answers: dict[bytes, dict[Query, bool] | None],
    ) -> None:
        """Give one range the copies it lacks elsewhere; count the outcome."""
        h, query = check.holding, check.query
        me = self.replicator.node_id
        said: dict[bytes, bool | None] = {}
        for e in check.others:
            known = answers.get(e.node_id)
            said[e.node_id] = None if known is None else known.get(query)
        alive = alive_elsewhere([e.node_id for e in check.others], said, me)
        replicas = check.manifest.replicas
        missing = copies_needed(replicas, len(alive))
        ref: RangeRef = (h.key.hex(), h.version, check.start, check.end)
        made: list[HolderEntry] = []
        if missing:
            candidates = await self.dht.closest(check.key, replicas + 8 + len(check.others))

            async def copy(contact: Contact) -> HolderEntry:
                return await self.replicator.push_range(
                    contact.tcp_address,
                    h.key,
                    h.version,
                    h.integrity,
                    check.start,
                    check.end,
                    self._count,
                )

            # the live copies elsewhere fix the failure domains already used (this peer's
            # own does not count: it is leaving)
            zones = {c.node_id: c.zone for c in candidates}
            used = [
                domain_of(e.host, e.port, zones.get(e.node_id, ""))
                for e in check.others
                if e.node_id in alive
            ]
            made = await self.replicator.make_copies(
                candidates,
                missing,
                copy,
                asked={me, *(e.node_id for e in check.others)},
                used=used,
                doing="drain",
            )
            if made:
                await self.dht.add_entries(h.key, [e.raw for e in made])
        ok = progress.range_result(ref, replicas, len(alive), len(made))
        now = self.clock()
        if now - self._logged >= PROGRESS_LOG_EVERY:
            self._logged = now
            log.warning(
                "drain_progress ranges=%d/%d bytes=%d", progress.done, progress.total,
                progress.bytes_moved,
            )  # fmt: skip
        log.info(
            "drain_range %s alive_elsewhere=%d copies=%d ok=%s progress=%d/%d bytes=%d",
            describe(ref),
            len(alive),
            len(made),
            ok,
            progress.done,
            progress.total,
            progress.bytes_moved,
        )

    async def _count(self, n: int) -> None:
        """Count the bytes a push sends (the drain is not paced: the operator asked)."""
        if self.progress is not None:
            self.progress.moved(n)

    async def _hand_over_records(self) -> int:
        """Store every record this peer keeps for the DHT, with its entries (this peer's
        own holder entries left out), on the k closest peers of its key; how many keys
        were handed over."""
        store, me = self.dht.store, self.replicator.node_id
        now = self.clock()
        slots = asyncio.Semaphore(RECORDS_PARALLEL)

        async def hand_over(key: bytes) -> bool:
            async with slots:
                value = await asyncio.to_thread(store.get, key, now)
                raw = await asyncio.to_thread(store.entries, key, now)
                entries = [e for e in raw if not _own_entry(e, me)]
                try:
                    if value is not None:
                        await self.dht.put_with_entries(key, value, entries)
                    elif entries:
                        await self.dht.add_entries(key, entries)
                    else:
                        return False
                except DifsError as exc:
                    log.info("drain_record_failed key=%s reason=%s", key.hex()[:12], exc)
                    return False
                return True

        keys = await asyncio.to_thread(store.keys, now)
        return sum(await asyncio.gather(*(hand_over(k) for k in keys)))


def _ref(h: Holding) -> RangeRef:
    return (h.key.hex(), h.version, h.start, h.end)


def _own_entry(raw: bytes, me: bytes) -> bool:
    """Whether a stored entry is this peer's own holder entry."""
    try:
        if record_kind(raw) is not RecordKind.HOLDER:
            return False
        return parse_holder_entry(raw).node_id == me
    except DifsError:
        return False
