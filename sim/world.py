"""One simulation run: a population of peers, churn, a workload and measurements.

The world is the part of a run that is the same in every mode. It decides *when* things
happen and *to whom*; the run's mode (:mod:`sim.mode`) carries each operation out on the
peers:

* **Timeline** (:mod:`sim.timeline`): the planned events (joins, partitions, ``[[crash]]``
  events, workload operations, samples, repair passes) and the ones churn adds (a
  departure at the end of each session, a replacement joining after it), run in time
  order, each long action as an owned task.
* **Population** (:mod:`sim.population`): who joined, who is live and ready, which side of
  a split each peer is on. A joining peer gets a seeded identity and a few ready peers as
  bootstrap contacts; a departing one crashes (no goodbye) or leaves gracefully.
* **Workload**: publishes (a new name, or an update of one of the user's names) and
  fetches through random ready peers, at most ``max_concurrent`` at a time; lookups of
  random keys, each compared with the true closest live peer on the same side.
* **Measurements** (:class:`sim.metrics.Recorder`): samples of the population, the live
  copies of every name's newest version (counted by the mode) and the record copies in
  the peers' DHT stores; at the end, whether every name still resolves (survival) and
  resolves from many peers (convergence).

One random stream per concern (churn, joins, identities, workload), so that runs which
differ in one respect (repair on or off) see the same joins, departures and workload.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Coroutine
from typing import Any

from difs_p2p.errors import DifsError
from difs_p2p.identity import distance
from difs_p2p.manifest import parse_manifest
from difs_p2p.names import name_key
from sim.catalog import StoredObject
from sim.mode import Mode, Run
from sim.models import Address
from sim.population import SimPeer
from sim.scenario import Crash
from sim.timeline import ChurnRule, Kind, Planned, plan


class World:
    """One run of a scenario with a given mode (see the module docstring).

    Call :meth:`run` once.
    """

    def __init__(self, run: Run, mode: Mode, progress: Callable[[str], None] | None = None) -> None:
        self.scenario = run.scenario
        self.spec = run.spec
        self.model = run.model
        self.users = run.users
        self.mode = mode
        self.progress = progress
        # One random stream per concern (see the module docstring).
        seed = run.seed
        self.rng_churn = random.Random(f"{seed}:churn")
        self.rng_join = random.Random(f"{seed}:join")
        self.rng_ids = random.Random(f"{seed}:ids")
        self.rng_work = random.Random(f"{seed}:workload")
        sc = run.scenario
        # When churn and workload start: after the join period and the warm-up.
        self.start = sc.join_period + sc.warmup
        self.churn = ChurnRule(sc.churn, self.start, sc.end, self.rng_churn)
        # The parts of the run this world drives; the mode is given the same ones.
        self.timeline = run.timeline
        self.population = run.population
        self.catalog = run.catalog
        self.rec = run.rec
        self._ops: asyncio.Semaphore | None = None

    def now(self) -> float:
        """Seconds since the start of the run."""
        return self.timeline.now()

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the scenario; return this run's metrics."""
        self.timeline.begin()
        self._ops = asyncio.Semaphore(self.scenario.max_concurrent)
        for event in plan(self.scenario, self.spec, self.rng_join, self.rng_work):
            self.timeline.at(event.at, self._action(event))
        try:
            await self.timeline.run()
            self.sample()
            await self._final_checks()
            self.mode.collect()
            live = self.population.live_segments()
            return self.rec.summary(self.spec, live, self.model.stats)
        finally:
            await self._teardown()

    def _action(self, event: Planned) -> Callable[[], None]:
        """What a planned event does when its time comes."""
        match event.kind:
            case Kind.JOIN:
                return self._join_action(initial=True)
            case Kind.SPLIT:
                return lambda: self._split(event.shares)
            case Kind.HEAL:
                return self._heal
            case Kind.CRASH:
                assert event.crash is not None
                crash = event.crash
                return lambda: self._crash_holders(crash)
            case Kind.PUBLISH:
                return self._publish_action
            case Kind.FETCH:
                return self._fetch_action
            case Kind.LOOKUP:
                return self._lookup_action
            case Kind.SAMPLE:
                return self.sample
            case Kind.REPAIR:
                return self.mode.repair_pass

    async def _teardown(self) -> None:
        """Stop every peer without goodbyes (closing first, so nothing more is sent)."""
        for peer in self.population.peers:
            if peer.alive and peer.node is not None:
                peer.alive = False
                await self.mode.stop(peer, crash=True)

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run a workload operation when fewer than ``max_concurrent`` are running."""
        assert self._ops is not None
        async with self._ops:
            await coro

    # -- membership ------------------------------------------------------------------------

    def _join_action(self, *, initial: bool) -> Callable[[], None]:
        def action() -> None:
            pop = self.population
            peer = self.mode.create_peer(len(pop.peers), self.rng_ids.randbytes(32))
            pop.add(peer, split=self.model.partitioned, rng=self.rng_join)
            seeds = pop.seeds_for(peer, self.rng_join)
            leave = self.churn.leave_at(self.now(), initial=initial)
            if leave is not None:
                self.timeline.at(leave, lambda: self._leave_action(peer))
            self.timeline.spawn(self._join(peer, seeds))

        return action

    async def _join(self, peer: SimPeer, seeds: list[Address]) -> None:
        if not peer.alive:
            return  # its session ended before it started
        if not await self.mode.start(peer, seeds):
            self.rec.failed_joins += 1
            peer.alive = False
            peer.left = self.now()
            return
        if not peer.alive:  # its session ended while it was starting
            await self.mode.stop(peer, crash=True)
            return
        group = self.population.group_of(peer)
        if group is not None:
            self.model.groups[peer.address] = group
        self.population.alive.add(peer)
        self.rec.joins += 1
        if not await self.mode.bootstrap(peer, seeds):
            self.rec.failed_joins += 1
        if peer.alive:
            self.population.ready.add(peer)

    def _leave_action(self, peer: SimPeer) -> None:
        if not peer.alive:
            return
        departure = self.churn.depart(self.now())
        if departure.rejoin_at is not None:
            self.timeline.at(departure.rejoin_at, self._join_action(initial=False))
        self._depart(peer, crash=departure.crash)

    def _crash_holders(self, crash: Crash) -> None:
        """A ``[[crash]]`` event: some live holders of one name crash (no replacement)."""
        names = self.catalog.names
        if crash.name >= len(names):
            self.rec.event(self.now(), f"no name {crash.name} to crash holders of")
            return
        obj = self.catalog.latest[names[crash.name]]
        holders = sorted(self.mode.holders_of(obj), key=lambda p: p.index)
        chosen = self.rng_churn.sample(holders, min(crash.holders, len(holders)))
        for peer in chosen:
            self._depart(peer, crash=True)
        self.rec.event(self.now(), f"{len(chosen)} holders of {obj.name} crashed")

    def _depart(self, peer: SimPeer, *, crash: bool) -> None:
        self.population.depart(peer, self.now())
        if crash:
            self.rec.crashes += 1
        else:
            self.rec.leaves += 1
        if peer.node is not None:
            self.timeline.spawn(self.mode.stop(peer, crash=crash))

    def _split(self, shares: tuple[float, ...]) -> None:
        assignment = self.population.split(shares, self.rng_join)
        self.model.split(assignment)
        self.rec.event(self.now(), f"split into {len(shares)} groups")

    def _heal(self) -> None:
        self.population.heal()
        self.model.heal()
        self.rec.event(self.now(), "healed")

    # -- workload --------------------------------------------------------------------------

    def _publish_action(self) -> None:
        w = self.scenario.workload
        entry = self.population.ready.choice(self.rng_work)
        user = self.rng_work.randrange(len(self.users))
        size = w.sizes.sample(self.rng_work)
        update = self.rng_work.random() < w.update_fraction
        if entry is None:
            self.rec.publish_failed("no live peer")
            return
        previous: StoredObject | None = None
        own = self.catalog.names_of.get(user, [])
        if update and own:
            previous = self.catalog.latest[own[self.rng_work.randrange(len(own))]]
            name = previous.name
        else:
            name = self.catalog.new_name(user)
        self.timeline.spawn(self._guarded(self._publish(entry, user, name, size, previous)))

    async def _publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> None:
        obj = await self.mode.publish(entry, user, name, size, previous)
        if obj is not None:
            self.catalog.add(obj, new_name=previous is None)
            self.rec.published(self.now() - obj.published)

    def _fetch_action(self) -> None:
        fetcher = self.population.ready.choice(self.rng_work)
        names = self.catalog.names
        if not names:
            return
        name = names[self.rng_work.randrange(len(names))]
        if fetcher is None:
            self.rec.fetch_failed("no live peer")
            return
        expected = self.catalog.latest[name].version
        self.timeline.spawn(self._guarded(self.mode.fetch(fetcher, name, expected)))

    def _lookup_action(self) -> None:
        peer = self.population.ready.choice(self.rng_work)
        target = self.rng_work.randbytes(20)
        if peer is not None:
            self.timeline.spawn(self._guarded(self._lookup(peer, target)))

    async def _lookup(self, peer: SimPeer, target: bytes) -> None:
        t0 = self.now()
        try:
            result = await peer.dht.lookup(target, "find_node")
        except Exception:
            if peer.alive:
                raise
            return
        elapsed = self.now() - t0
        pop = self.population
        best = min(
            (p for p in pop.alive if p is not peer and pop.same_side(p, peer)),
            key=lambda p: distance(p.node_id, target),
            default=None,
        )
        exact = bool(result.closest) and best is not None
        exact = exact and result.closest[0].node_id == best.node_id  # type: ignore[union-attr]
        self.rec.looked_up(result.rounds, elapsed, exact)

    # -- measurements ----------------------------------------------------------------------

    def sample(self) -> None:
        """Record the population and the live copies of every name's newest version."""
        self.mode.before_sample()
        pop, names = self.population, self.catalog.names
        per_range: list[int] = []
        available = 0
        for obj in self.catalog.newest():
            counts = self.mode.live_copies(obj)
            per_range.extend(counts)
            available += all(counts)
        copies: dict[bytes, int] = {}
        if names:
            now = self.mode.clock()
            for peer in pop.alive:
                for k in peer.dht.store.keys(now):
                    copies[k] = copies.get(k, 0) + 1
        records = [copies.get(obj.key, 0) for obj in self.catalog.newest()]
        self.rec.sampled(
            t=self.now(),
            peers=len(pop.alive),
            per_range=per_range,
            available=available,
            names=len(names),
            record_copies=records,
        )
        if self.progress is not None:
            self.progress(
                f"  [{self.spec.label}] t={self.now():.0f} s: {len(pop.alive)} peers, "
                f"{self.model.stats.sent} datagrams, {self.rec.publish_ok} publishes, "
                f"{self.rec.fetch_ok} fetches, {len(self.rec.hops)} lookups"
            )

    async def _final_checks(self) -> None:
        checks = self.scenario.checks
        if checks.settle > 0:
            await asyncio.sleep(checks.settle)
        pop, catalog = self.population, self.catalog
        async with self.timeline.tasks():
            if checks.survival:
                for name in catalog.names:
                    peer = pop.ready.choice(self.rng_work)
                    if peer is not None:
                        self.timeline.spawn(self._guarded(self._survives(peer, name)))
            if checks.convergence != "none":
                names = [
                    n
                    for n in catalog.names
                    if checks.convergence == "all" or catalog.objects[(n, 1)].during_split
                ]
                n = checks.convergence_peers or len(pop.ready)
                for peer in pop.ready.sample(self.rng_work, n):
                    for name in names:
                        self.timeline.spawn(self._guarded(self._converged(peer, name)))

    async def _resolves(self, peer: SimPeer, name: str) -> bool:
        key = name_key(name)
        for raw in await peer.dht.get(key):
            try:
                parse_manifest(raw, key)
            except DifsError:
                continue
            return True
        return False

    async def _survives(self, peer: SimPeer, name: str) -> None:
        self.rec.survival.append(await self._resolves(peer, name))

    async def _converged(self, peer: SimPeer, name: str) -> None:
        self.rec.convergence.append(await self._resolves(peer, name))
