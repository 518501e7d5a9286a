"""Keeping data alive without the publisher: failure detection, repair, trimming, GC.

Every storage peer runs a :class:`Maintainer`. Each round (``RepairConfig.interval``) it
looks at every name version it holds:

* **views**: it reads a name's newest manifest, history and holder entries from the DHT
  (a resolve: one Kademlia lookup, about 40 datagrams) only on one round in
  ``resolve_every`` (10), and keeps what it read (a :class:`NameView`) for the rounds in
  between. It reads at once when it has no view (after a start; the first rereads are then
  spread over the period by key, :func:`first_rounds`), when it holds a version the view
  has no manifest for (a new holding), when republishing, and when the probes below find
  a range short of copies or a holder that turned suspect or dead (:func:`needs_fresh_view`):
  repair, and which holder leads it, are always decided on a fresh holder set;
* **GC** (on each read): if the name is deleted, or the held version is ``keep`` or more
  versions behind the newest, it frees the segments (so a holder that was offline during a
  delete frees them when it comes back: it starts without views). Superseded and deleted
  versions are thus collected within ``resolve_every`` rounds of the name;
* **failure detection**: it asks every other holder of its ranges whether it still holds
  them, **one request per holder and round** carrying every range the two share, over one
  connection (``holds_ranges``; range by range with ``holds`` for peers without it). A
  holder that does not answer becomes *suspect*; after ``dead_after`` failed rounds in a
  row it is *dead*; the failure detector counts one probe per holder and round, however
  many names and ranges it shares. A holder that answers late is slow, not dead; one that
  answers that it does not hold a range counts as gone for that range. A dead holder is
  tried again after 1, 2, 4... rounds, at least every ``dead_backoff`` (16) rounds, not
  every round: its entries stay in the DHT until they expire (48 h), and every co-holder
  would otherwise keep trying it; one that comes back counts again once it answers.
  Detection therefore
  takes at most ``dead_after x interval`` for a peer holding up to ``max_keys_per_round``
  names; one holding more looks after a share of them per round (:func:`keys_for_round`),
  which multiplies that bound by ``ceil(names / max_keys_per_round)`` and keeps its
  background traffic bounded;
* **repair**: for a range with fewer than r live copies, the live holder closest to the
  range key (the *leader*; every holder computes the same one) copies it to the closest live
  peers to the range key that do not hold it, which sign and announce their own holder
  entries. Repair traffic goes through a token bucket (``bandwidth``);
* **trim**: if two leaders repaired at once and a range has more than r live copies, the
  single-range holders farthest from the range key drop theirs, so extra copies do not stay
  (a holder that learns of the extra copy only at its next read trims then);
* **republish**: it re-announces its holder entries and re-stores the manifest and history
  (``republish_every`` after the holding began, or after the last time), so records
  outlive the peers that first stored them; and the child entries its publisher left in
  the name's entry set (listing.py), beside the name and at their shard keys, so the
  folders above a held name stay listed.

So an idle peer's round costs one TCP connection per co-holder and, per name, a resolve
one round in ``resolve_every``, instead of a resolve and a connection per range and name.

The decisions are pure functions in maintenance.py (``resolve_due``, ``collect_due``,
``range_checks``, ``probe_batches``, ``range_health``, ``needs_fresh_view``, ``plan_range``,
``gc_due``, ``republish_due``, :class:`FailureDetector`, :class:`TokenBucket`); whom a
repair asks is placement.py's ``choose_targets``. :class:`Maintainer` is the thin asyncio
shell around them: it reads the DHT, and copies, probes and frees through the peer's
``Replicator`` (replicator.py); it never sees the peer itself.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from difs_p2p import classgen
from difs_p2p.classgen import valueclass
from difs_p2p.config import RepairConfig
from difs_p2p.dht import Dht
from difs_p2p.errors import DifsError
from difs_p2p.holders import HolderEntry
from difs_p2p.holdings import Holding, Holdings, Query
from difs_p2p.identity import NodeId
from difs_p2p.listing import entries_by_shard
from difs_p2p.maintenance import (
    Action,
    FailureDetector,
    Health,
    NameView,
    ProbeBatch,
    RangeCheck,
    TokenBucket,
    bind_lineage,
    collect_due,
    first_rounds,
    keys_for_round,
    needs_fresh_view,
    plan_range,
    probe_batches,
    range_checks,
    range_health,
    read_view,
    republish_due,
    resolve_due,
    round_phase,
)
from difs_p2p.placement import RangeKey, domain_of, shares_an_address
from difs_p2p.records import child_entries, split_entries
from difs_p2p.replicator import Replicator
from difs_p2p.routing import Contact

log = logging.getLogger(__name__)


# -- the asyncio shell ----------------------------------------------------------------------


@valueclass(frozen=False)
class RepairStats:
    rounds: int = 0
    repaired_ranges: int = 0
    repair_bytes: int = 0
    collected_versions: int = 0
    freed_bytes: int = 0
    healed_segments: int = 0
    dead_peers: int = 0
    # DHT resolves of names, and holders probed (one connection each)
    resolves: int = 0
    probes: int = 0
    last_round: float = 0.0
    # ranges the last round checked whose live copies share an address (under-spread:
    # repair spreads new copies but never moves a held one)
    shared_ranges: int = 0
    # metrics: ranges the last round checked with fewer live copies than their replicas
    under_replicated: int = 0

    def as_dict(self) -> dict[str, Any]:
        return classgen.asdict(self)


# Co-holders probed at once: a round's probes all run in parallel (a silent holder takes
# up to 2 x slow_after), but a peer sharing names with hundreds of others does not open
# hundreds of connections at once.
PROBES_IN_FLIGHT = 32


class Maintainer:
    """Runs the maintenance rounds of one peer (see the module docstring)."""

    def __init__(
        self,
        config: RepairConfig,
        *,
        replicator: Replicator,
        holdings: Holdings,
        dht: Dht,
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.replicator = replicator
        self.holdings = holdings
        self.dht = dht
        self.clock = clock
        self.node_id = replicator.node_id
        self.detector = FailureDetector(config.dead_after, config.dead_backoff)
        self.bucket = TokenBucket(config.bandwidth)
        self.stats = RepairStats()
        # when this run last republished each name
        self._last_republish: dict[bytes, float] = {}
        self._lock = asyncio.Lock()
        # what the last resolve of each held name found
        self._views: dict[bytes, NameView] = {}
        # this round's answers per co-holder (None: it did not answer), and the holders
        # whose health got worse this round
        self._answers: dict[NodeId, dict[Query, bool] | None] = {}
        self._turned: set[NodeId] = set()
        # ranges of this round whose live copies share an address
        self._shared = 0
        self._short = 0

    async def run(self) -> None:
        # Peers started together would all run their rounds at once (with 20 peers and
        # 600 objects, ~3,000 datagrams/s for 25 s of every minute); each peer's rounds
        # start at its own phase of the interval, taken from its node ID.
        await asyncio.sleep(self.config.interval * round_phase(self.node_id))
        while True:
            try:
                await self.round()
            except DifsError as exc:
                log.warning("maintenance_round_failed reason=%s", exc)
            await asyncio.sleep(self.config.interval)

    async def round(self) -> None:
        """One pass over the names this round looks after (see the module docstring)."""
        async with self._lock:
            holdings = self.holdings.all()
            by_key: dict[bytes, list[Holding]] = {}
            for h in holdings:
                by_key.setdefault(h.key, []).append(h)
            self._views = {k: v for k, v in self._views.items() if k in by_key}
            self._answers = {}
            self._turned = set()
            chosen = keys_for_round(
                sorted(by_key), self.stats.rounds, self.config.max_keys_per_round
            )
            checks: dict[bytes, list[RangeCheck]] = {}
            fresh: set[bytes] = set()
            for key in chosen:
                view = self._views.get(key)
                try:
                    republish = republish_due(
                        self._last_republish.get(key),
                        by_key[key],
                        self.clock(),
                        self.config.republish_every,
                    )
                    if resolve_due(view, by_key[key], self.config.resolve_every, republish):
                        view, by_key[key] = await self._resolve(key, by_key[key])
                        fresh.add(key)
                    else:
                        assert view is not None
                        view.rounds += 1
                    checks[key] = range_checks(by_key[key], view, self.node_id)
                except DifsError as exc:
                    log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
                    if view is not None:  # the DHT failed us: probe whom we knew of
                        checks[key] = range_checks(by_key[key], view, self.node_id)
            await self._probe(checks)
            stale = [
                key
                for key, cs in checks.items()
                if key not in fresh
                and any(needs_fresh_view(c, *self._health_of(c), self._turned) for c in cs)
            ]
            for key in stale:
                try:
                    view, by_key[key] = await self._resolve(key, by_key[key])
                    checks[key] = range_checks(by_key[key], view, self.node_id)
                except DifsError as exc:
                    log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
            if stale:
                await self._probe({key: checks[key] for key in stale})
            self._shared = self._short = 0
            for key, cs in checks.items():
                for check in cs:
                    try:
                        await self._act(check)
                    except DifsError as exc:
                        log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
            self.stats.shared_ranges = self._shared
            self.stats.under_replicated = self._short
            self.stats.rounds += 1
            self.stats.last_round = self.clock()

    async def _resolve(self, key: bytes, held: list[Holding]) -> tuple[NameView, list[Holding]]:
        """Read a name from the DHT, free what it says to free, republish when due; the
        view and the holdings left."""
        now = self.clock()
        records, raw_entries = await self.dht.resolve(key)
        self.stats.resolves += 1
        view = read_view(key, records, raw_entries)
        if key not in self._views:
            view.rounds = first_rounds(key, self.config.resolve_every)
        self._views[key] = view
        held = await self._bind(held, view)
        collect = collect_due(
            held,
            view,
            now,
            self.config.keep,
            self.config.orphan_grace,
            self.config.orphan_per_segment,
        )
        for h in collect:
            await self._collect(h)
        left = [h for h in held if h not in collect]
        last = self._last_republish.get(key)
        if republish_due(last, left, now, self.config.republish_every):
            self._last_republish[key] = now
            await self._republish(key, records, raw_entries)
        return view, left

    async def bind_from_dht(self, key: bytes, held: list[Holding]) -> list[Holding]:
        """Read ``key`` from the DHT and record the lineage of ``held`` holdings that have
        none yet (a release can come before this peer's first maintenance read)."""
        records, raw_entries = await self.dht.resolve(key)
        return await self._bind(held, read_view(key, records, raw_entries))

    async def _bind(self, held: list[Holding], view: NameView) -> list[Holding]:
        """Record the lineage of holdings that have none yet from ``view``."""
        out = []
        for h in held:
            lineage = bind_lineage(h, view)
            if lineage is not None:
                db = self.holdings
                await asyncio.to_thread(db.bind, h.key, h.version, h.integrity, lineage)
                h = classgen.replace(h, lineage=lineage)
            out.append(h)
        return out

    async def _republish(self, key: bytes, records: list[bytes], raw: list[bytes]) -> None:
        dht = self.dht
        if records:
            await dht.put(key, records[0])
        mine = [e.raw for e in self.replicator.own_entries(key)]
        history = split_entries(raw).history
        if mine or history:
            # history first: peers admit a holder entry only once they have the manifest
            # of its version (the record, or a history manifest)
            await dht.add_entries(key, [*history, *mine])
        children = child_entries(raw)
        if children:
            # the storing peers verify each again (recordpolicy.child_admission)
            shards = entries_by_shard(children)
            await asyncio.gather(
                dht.add_entries(key, children),
                *(dht.add_entries(shard, batch) for shard, batch in shards.items()),
            )

    async def _collect(self, h: Holding) -> None:
        freed = await self.replicator.free_holding(h)
        self.stats.collected_versions += 1
        self.stats.freed_bytes += freed
        log.info("gc key=%s version=%d freed=%d", h.key.hex()[:12], h.version, freed)

    def _health_of(self, check: RangeCheck) -> tuple[list[NodeId], list[NodeId]]:
        return range_health(check, self._answers, self.detector.health)

    async def _probe(self, checks: Mapping[bytes, Sequence[RangeCheck]]) -> None:
        """Ask every co-holder of ``checks`` about all its ranges at once, all holders in
        parallel, and feed the failure detector once per holder and round."""
        batches = probe_batches([c for cs in checks.values() for c in cs], self._answers)
        for node in list(batches):
            if node not in self._answers and not self.detector.due(node):
                self._answers[node] = None  # dead and not due: counts as silent
                del batches[node]
        nodes = list(batches)
        slots = asyncio.Semaphore(PROBES_IN_FLIGHT)

        async def probe(batch: ProbeBatch) -> tuple[list[bool], float] | None:
            async with slots:
                return await self._probe_holder(batch)

        replies = await asyncio.gather(*(probe(batches[n]) for n in nodes))
        for node, batch, reply in zip(nodes, batches.values(), replies, strict=True):
            self.stats.probes += 1
            if node in self._answers:
                # asked again after a fresh resolve: its health was recorded this round
                known = self._answers[node]
                if known is not None and reply is not None:
                    known.update(zip(batch.queries, reply[0], strict=True))
                continue
            before = self.detector.health(node)
            health = self.detector.record(node, reply is not None, reply[1] if reply else 0.0)
            self._answers[node] = (
                None if reply is None else dict(zip(batch.queries, reply[0], strict=True))
            )
            if health is not Health.ALIVE and health is not before:
                self._turned.add(node)
            if health is Health.DEAD and before is not Health.DEAD:
                self.stats.dead_peers += 1
                log.info("holder_dead peer=%s:%d", *batch.address)

    async def _probe_holder(self, batch: ProbeBatch) -> tuple[list[bool], float] | None:
        """One holder's answers to a batch and how long they took, or None if silent."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await self.replicator.probe_ranges(
            batch.address, batch.queries, limit=2 * self.config.slow_after
        )
        return None if answer is None else (answer, loop.time() - t0)

    async def _act(self, check: RangeCheck) -> None:
        """Repair one range if ``plan_range`` says so, from this round's answers."""
        me = self.node_id
        h = check.holding
        others, suspect = self._health_of(check)
        alive = [me, *others]
        rkey = check.key
        action, missing = plan_range(me, rkey, alive, check.manifest.replicas, suspect)
        live = {*others}
        copies = [self.dht.me.address] + [
            (e.host, e.port) for e in check.others if e.node_id in live
        ]
        if shares_an_address(copies):
            self._shared += 1
        if len(set(alive)) < check.manifest.replicas:
            self._short += 1
        log.debug(
            "range key=%s range=%d..%d alive=%d suspect=%d action=%s",
            h.key.hex()[:12],
            check.start,
            check.end,
            len(alive),
            len(suspect),
            action.value,
        )
        if action is Action.REPAIR:
            avoid = {e.node_id for e in check.others}
            holding = {*others, *suspect}
            await self._repair(check, rkey, missing, avoid, holding)

    async def _repair(
        self,
        check: RangeCheck,
        rkey: RangeKey,
        missing: int,
        avoid: set[NodeId],
        holding: set[NodeId],
    ) -> None:
        """Copy a range short of copies to the closest live peers to its range key that do
        not hold it, on failure domains its copies do not use yet where possible (one at a
        time, paced by the bandwidth bound). ``holding``: the other holders that may still
        hold it (their domains count as used, with this peer's)."""
        h, manifest, start, end = check.holding, check.manifest, check.start, check.end
        candidates = await self.dht.closest(rkey, manifest.replicas + 8)
        dead = {c.node_id for c in candidates if self.detector.health(c.node_id) is Health.DEAD}
        zones = {c.node_id: c.zone for c in candidates}
        me = self.dht.me
        used = [domain_of(me.host, me.port, zones.get(me.node_id, me.zone))] + [
            domain_of(e.host, e.port, zones.get(e.node_id, ""))
            for e in check.others
            if e.node_id in holding
        ]

        async def copy(contact: Contact) -> HolderEntry:
            return await self.replicator.push_range(
                contact.tcp_address, h.key, h.version, h.integrity, start, end, self._pace
            )

        placed = await self.replicator.make_copies(
            candidates,
            missing,
            copy,
            asked={self.node_id, *avoid, *dead},
            used=used,
            parallel=False,
            doing="repair",
        )
        if placed:
            await self.dht.add_entries(h.key, [e.raw for e in placed])
            view = self._views.get(h.key)
            if view is not None:
                # the next rounds probe the new holders without reading the name again
                view.entries.extend(placed)
            self.stats.repaired_ranges += 1
            log.info(
                "repaired key=%s version=%d range=%d..%d copies=%d",
                h.key.hex()[:12],
                h.version,
                start,
                end,
                len(placed),
            )

    async def _pace(self, n: int) -> None:
        """Wait until ``n`` more bytes of repair traffic fit the bandwidth bound."""
        self.stats.repair_bytes += n
        delay = self.bucket.delay(n, asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)
