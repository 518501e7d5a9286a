"""One simulation run: a population of real DHT peers, churn, a workload and measurements.

Every peer is a real :class:`difs_p2p.dht.Dht` with the real
:class:`~difs_p2p.manifest.RecordValidator` policy and a seeded identity
(:meth:`Identity.from_seed`); only its network (:mod:`sim.memnet` or :mod:`sim.relay`) and
its clock (the event loop's, plus a fixed epoch) come from the simulator. With the
scenario's ``identify`` (the default) the ``Dht`` has the peer's key and runs the identify
challenge, as in production; without, contacts enter routing tables unproven.

What the simulator adds around the peers:

* **Timeline**: a heap of timed actions (joins, departures, partitions, workload
  operations, samples, repair passes), run in time order, each long action as a task of
  one :class:`asyncio.TaskGroup`.
* **Publish**: a real signed manifest (version 1, or n+1 with parent and root for an
  update) and real holder entries, each signed by its holder, stored together with the
  manifest (history) by ``Dht.put_with_entries``, as the peer's publish does. Placement follows
  the peer's ``place``: range i goes to the closest live peers to its range key
  (``Dht.closest``, the entry peer included) until r copies exist; the entry peer keeps a
  range only when it is one of them. Segment bytes
  are not materialized: the simulator records who holds which range, and a range exists
  only on peers that are alive and hold it. Transfers take time from the bandwidth model.
* **Fetch**: ``Dht.resolve`` of the name key (one lookup, as the peer's), the manifest verified by
  ``parse_manifest``, holder entries by ``parse_holder_entry``; the live holders of every
  range; time to first byte = resolve time + one round trip + the first segment's transfer.
* **Repair (the simulator's policy)**: every ``interval``, for each range of each name's
  newest version, holders that left count as suspects for ``detection_delay`` and as dead
  after; the decision is the peer's own pure ``difs_p2p.maintenance.plan_range`` (the live
  holder closest to the range key repairs a shortfall), and the leader places new copies
  on the closest live peers from ``Dht.closest``, whose signed entries it adds to the DHT.
  Failure detection by probing (``holds``) and the TCP pushes are modelled, not run
  here; :mod:`sim.peerworld` (peers mode) runs whole peers, where nothing is modelled.
"""

from __future__ import annotations

import asyncio
import functools
import heapq
import logging
import math
import random
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from difs_p2p.dht import Dht
from difs_p2p.errors import DifsError
from difs_p2p.identity import Identity, distance
from difs_p2p.maintenance import Action, plan_range
from difs_p2p.manifest import (
    HolderEntry,
    Manifest,
    RecordValidator,
    build_holder_entry,
    build_manifest,
    parse_holder_entry,
    parse_manifest,
)
from difs_p2p.names import name_key
from difs_p2p.net import DatagramNetwork
from difs_p2p.placement import choose_targets, range_key
from difs_p2p.segments import default_stripes, segment_hash, stripe_ranges
from sim.metrics import Recorder
from sim.models import Address, NetworkModel, fetch_time, pick_group, transfer_time
from sim.scenario import Crash, RunSpec, Scenario

log = logging.getLogger(__name__)

# Records carry wall-clock times: peers see this epoch plus the simulated seconds.
EPOCH = 1_700_000_000.0
# Bootstrap contacts given to a joining peer.
SEEDS_PER_JOIN = 3


@dataclass(slots=True)
class SimPeer:
    """A peer of the simulation: a real DHT node and what the simulator knows about it."""

    index: int
    identity: Identity
    # The peer's DHT node; None until it has started (full peers create their own).
    node: Dht | None
    address: Address
    joined: float
    alive: bool = True
    # Bootstrapped, so the workload may use it as an entry peer.
    ready: bool = False
    left: float = math.inf
    # Segments this peer holds (ground truth).
    segments: int = 0

    @property
    def node_id(self) -> bytes:
        return bytes(self.identity.node_id)

    @property
    def dht(self) -> Dht:
        if self.node is None:
            raise RuntimeError(f"simulated peer {self.index} has not started")
        return self.node


@dataclass(slots=True)
class StoredObject:
    """One published version of a name, and who holds each of its ranges."""

    manifest: Manifest
    user: int
    published: float
    during_split: bool
    # per range of the manifest's stripes: (first, last) segment, range key, bytes
    ranges: list[tuple[int, int]]
    range_keys: list[bytes]
    range_bytes: list[int]
    # per range: indexes of the peers holding it, and whether a repair is running
    holders: list[list[int]]
    repairing: list[bool]

    @classmethod
    def of(
        cls, manifest: Manifest, user: int, published: float, during_split: bool
    ) -> StoredObject:
        """The object ``manifest`` describes, with its ranges and nobody holding them yet."""
        m = manifest
        integrity = bytes.fromhex(m.integrity)
        ranges = stripe_ranges(m.segment_count, m.stripes)
        return cls(
            manifest=m,
            user=user,
            published=published,
            during_split=during_split,
            ranges=ranges,
            range_keys=[range_key(integrity, i) for i in range(len(ranges))],
            range_bytes=[
                min(m.size, (b + 1) * m.segment_size) - a * m.segment_size for a, b in ranges
            ],
            holders=[[] for _ in ranges],
            repairing=[False] * len(ranges),
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def key(self) -> bytes:
        return self.manifest.key

    @property
    def version(self) -> int:
        return self.manifest.version


class LiveSet:
    """Peers in a stable order with O(1) add, remove and seeded random choice."""

    def __init__(self) -> None:
        self._items: list[SimPeer] = []
        self._pos: dict[int, int] = {}

    def add(self, peer: SimPeer) -> None:
        if peer.index not in self._pos:
            self._pos[peer.index] = len(self._items)
            self._items.append(peer)

    def remove(self, peer: SimPeer) -> None:
        pos = self._pos.pop(peer.index, None)
        if pos is None:
            return
        last = self._items.pop()
        if last.index != peer.index:
            self._items[pos] = last
            self._pos[last.index] = pos

    def choice(self, rng: random.Random) -> SimPeer | None:
        return self._items[rng.randrange(len(self._items))] if self._items else None

    def sample(self, rng: random.Random, n: int) -> list[SimPeer]:
        return rng.sample(self._items, min(n, len(self._items)))

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Any:
        return iter(list(self._items))


class World:
    """One run of a scenario (see the module docstring). Call :meth:`run` once."""

    def __init__(
        self,
        scenario: Scenario,
        spec: RunSpec,
        seed: int,
        network: DatagramNetwork,
        model: NetworkModel,
        address_for: Callable[[int], Address],
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self.scenario = scenario
        self.spec = spec
        self.seed = seed
        self.network = network
        self.model = model
        self.address_for = address_for
        self.progress = progress
        # One random stream per concern, so that runs which differ in one respect (repair
        # on or off) see the same joins, departures and workload.
        self.rng_churn = random.Random(f"{seed}:churn")
        self.rng_join = random.Random(f"{seed}:join")
        self.rng_ids = random.Random(f"{seed}:ids")
        self.rng_work = random.Random(f"{seed}:workload")
        self.users = [
            Identity.from_seed(random.Random(f"{seed}:user:{u}").randbytes(32))
            for u in range(scenario.workload.users)
        ]
        self.policy = RecordValidator()
        self.peers: list[SimPeer] = []
        self.by_id: dict[bytes, SimPeer] = {}
        self.alive = LiveSet()
        self.ready = LiveSet()
        self.groups: dict[int, int] = {}
        self.objects: dict[tuple[str, int], StoredObject] = {}
        self.latest: dict[str, StoredObject] = {}
        self.names: list[str] = []
        self.names_of: dict[int, list[str]] = {}
        self.rec = Recorder()
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = 0
        self._tg: asyncio.TaskGroup | None = None
        self._ops: asyncio.Semaphore | None = None
        self._t0 = 0.0
        self._published = 0
        # Group shares of the current partition.
        self._shares: tuple[float, ...] = (1.0,)

    # -- time ------------------------------------------------------------------------------

    def now(self) -> float:
        """Seconds since the start of the run."""
        return asyncio.get_running_loop().time() - self._t0

    def clock(self) -> float:
        """The wall clock the peers see."""
        return EPOCH + self.now()

    @property
    def start(self) -> float:
        """When churn and workload start: after the join period and the warm-up."""
        return self.scenario.join_period + self.scenario.warmup

    def at(self, when: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (when, self._seq, action))
        self._seq += 1

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._tg is not None
        self._tg.create_task(coro)

    # -- the run ---------------------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        """Run the scenario; return this run's metrics."""
        self._t0 = asyncio.get_running_loop().time()
        self._ops = asyncio.Semaphore(self.scenario.max_concurrent)
        self._plan()
        try:
            async with asyncio.TaskGroup() as tg:
                self._tg = tg
                while self._events:
                    when, _, action = heapq.heappop(self._events)
                    delay = when - self.now()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    action()
            self._tg = None
            self.sample()
            await self._final_checks()
            self._collect()
            return self.rec.summary(self)
        finally:
            await self._teardown()

    def _plan(self) -> None:
        sc, w = self.scenario, self.scenario.workload
        times = sorted(
            [0.0] + [self.rng_join.uniform(0, sc.join_period) for _ in range(self.spec.peers - 1)]
        )
        for t in times:
            self.at(t, self._join_action(initial=True))
        for p in sc.partitions:
            self.at(self.start + p.start, functools.partial(self._split, p.groups))
            self.at(self.start + p.heal, self._heal)
        for c in sc.crashes:
            self.at(self.start + c.at, functools.partial(self._crash_holders, c))

        def spread(n: int, window: tuple[float, float]) -> list[float]:
            lo, hi = (self.start + f * sc.duration for f in window)
            return sorted(self.rng_work.uniform(lo, hi) for _ in range(n))

        for t in spread(w.publishes, w.publish_window):
            self.at(t, self._publish_action)
        for t in spread(w.fetches, w.fetch_window):
            self.at(t, self._fetch_action)
        for t in spread(w.lookups, w.lookup_window):
            self.at(t, self._lookup_action)
        t = self.start
        while t < sc.end:
            self.at(t, self.sample)
            t += sc.sample_interval
        if self.spec.repair.enabled:
            t = self.start + self.spec.repair.interval
            while t <= sc.end:
                self.at(t, self._repair_pass)
                t += self.spec.repair.interval

    async def _teardown(self) -> None:
        """Stop every peer without goodbyes (closing first, so nothing more is sent)."""
        for peer in self.peers:
            if peer.alive and peer.node is not None:
                peer.alive = False
                await self._halt(peer, crash=True)

    async def _halt(self, peer: SimPeer, *, crash: bool) -> None:
        """Stop a started peer: a crash closes its socket first, so no goodbye gets out."""
        if crash and peer.dht.transport is not None:
            peer.dht.transport.close()
        await peer.dht.stop()

    # -- membership ------------------------------------------------------------------------

    def _join_action(self, *, initial: bool) -> Callable[[], None]:
        def action() -> None:
            peer = self._new_peer()
            seeds = self._seeds_for(peer)
            churn = self.scenario.churn
            if churn.enabled:
                session = churn.sessions.sample(self.rng_churn)
                leave = (self.start if initial else self.now()) + session
                if leave < self.scenario.end:
                    self.at(leave, lambda: self._leave_action(peer))
            self.spawn(self._join(peer, seeds))

        return action

    def _new_peer(self) -> SimPeer:
        index = len(self.peers)
        identity = Identity.from_seed(self.rng_ids.randbytes(32))
        dht = Dht(
            bytes(identity.node_id),
            self.policy,
            self.scenario.dht,
            clock=self.clock,
            rng=random.Random(f"{self.seed}:dht:{index}"),
            identity=identity if self.scenario.identify else None,
        )
        peer = SimPeer(index, identity, dht, ("0.0.0.0", 0), joined=self.now())
        self.peers.append(peer)
        self.by_id[peer.node_id] = peer
        if self.model.partitioned:
            self.groups[index] = pick_group(self._shares, self.rng_join)
        return peer

    def _seeds_for(self, peer: SimPeer) -> list[Address]:
        group = self.groups.get(peer.index)
        candidates = [p for p in self.ready.sample(self.rng_join, 4 * SEEDS_PER_JOIN)]
        if group is not None:
            candidates = [p for p in candidates if self.groups.get(p.index) == group]
        return [p.address for p in candidates[:SEEDS_PER_JOIN]]

    async def _join(self, peer: SimPeer, seeds: list[Address]) -> None:
        if not peer.alive:
            return  # its session ended before it started
        host, port = self.address_for(peer.index)
        await peer.dht.start(host, port, network=self.network)
        peer.address = peer.dht.me.address
        if not peer.alive:
            if peer.dht.transport is not None:
                peer.dht.transport.close()
            await peer.dht.stop()
            return
        if peer.index in self.groups:
            self.model.groups[peer.address] = self.groups[peer.index]
        self.alive.add(peer)
        self.rec.joins += 1
        if seeds:
            contacts = await peer.dht.bootstrap(seeds)
            if contacts == 0:
                self.rec.failed_joins += 1
        if peer.alive:
            self.ready.add(peer)

    def _leave_action(self, peer: SimPeer) -> None:
        if not peer.alive:
            return
        crash = self.rng_churn.random() < self.scenario.churn.crash_fraction
        delay = self.rng_churn.expovariate(1.0 / max(self.scenario.churn.rejoin_delay, 1e-9))
        if self.now() + delay < self.scenario.end:
            self.at(self.now() + delay, self._join_action(initial=False))
        self._depart(peer, crash=crash)

    def _crash_holders(self, crash: Crash) -> None:
        """A ``[[crash]]`` event: some live holders of one name crash (no replacement)."""
        if crash.name >= len(self.names):
            self.rec.event(self.now(), f"no name {crash.name} to crash holders of")
            return
        obj = self.latest[self.names[crash.name]]
        holders = sorted(self._holders_of(obj), key=lambda p: p.index)
        chosen = self.rng_churn.sample(holders, min(crash.holders, len(holders)))
        for peer in chosen:
            self._depart(peer, crash=True)
        self.rec.event(self.now(), f"{len(chosen)} holders of {obj.name} crashed")

    def _holders_of(self, obj: StoredObject) -> list[SimPeer]:
        """The live peers holding some range of ``obj``."""
        held = {i for h in obj.holders for i in h}
        return [self.peers[i] for i in held if self.peers[i].alive]

    def _depart(self, peer: SimPeer, *, crash: bool) -> None:
        peer.alive = False
        peer.left = self.now()
        self.alive.remove(peer)
        self.ready.remove(peer)
        if crash:
            self.rec.crashes += 1
        else:
            self.rec.leaves += 1
        if peer.node is not None:
            self.spawn(self._halt(peer, crash=crash))

    def _split(self, shares: tuple[float, ...]) -> None:
        self._shares = shares
        self.groups = {}
        assignment: dict[Address, int] = {}
        for peer in self.peers:
            if peer.alive:
                self.groups[peer.index] = pick_group(shares, self.rng_join)
                assignment[peer.address] = self.groups[peer.index]
        self.model.split(assignment)
        self.rec.event(self.now(), f"split into {len(shares)} groups")

    def _heal(self) -> None:
        self.groups = {}
        self.model.heal()
        self.rec.event(self.now(), "healed")

    def _same_side(self, a: SimPeer, b: SimPeer) -> bool:
        return not self.groups or self.groups.get(a.index) == self.groups.get(b.index)

    # -- workload --------------------------------------------------------------------------

    def _publish_action(self) -> None:
        w = self.scenario.workload
        entry = self.ready.choice(self.rng_work)
        user = self.rng_work.randrange(len(self.users))
        size = w.sizes.sample(self.rng_work)
        update = self.rng_work.random() < w.update_fraction
        if entry is None:
            self.rec.publish_failed("no live peer")
            return
        previous: StoredObject | None = None
        own = self.names_of.get(user, [])
        if update and own:
            previous = self.latest[own[self.rng_work.randrange(len(own))]]
            name = previous.name
        else:
            self._published += 1
            name = f"/sim/u{user}/obj-{self._published}"
        self.spawn(self._guarded(self._publish(entry, user, name, size, previous)))

    async def _guarded(self, coro: Coroutine[Any, Any, None]) -> None:
        assert self._ops is not None
        async with self._ops:
            await coro

    async def _publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> None:
        w = self.scenario.workload
        t0 = self.now()
        split = self.model.partitioned
        version = previous.version + 1 if previous else 1
        integrity = bytes(segment_hash(f"{self.seed}|{name}|{version}".encode()))
        count = -(-size // w.segment_size)
        stripes = default_stripes(count)
        manifest = build_manifest(
            self.users[user],
            name=name,
            version=version,
            parent=previous.manifest.hash if previous else None,
            root=previous.manifest.lineage_root if previous else None,
            size=size,
            segment_size=w.segment_size,
            segment_count=count,
            stripes=stripes,
            replicas=w.replicas,
            integrity=integrity.hex(),
            created=self.clock(),
        )
        obj = StoredObject.of(manifest, user, t0, split)
        try:
            places = await asyncio.gather(
                *(self._place(entry, k, w.replicas) for k in obj.range_keys)
            )
        except Exception:
            if entry.alive:
                raise
            self.rec.publish_failed("entry peer left")
            return
        pushed = sum(
            n * sum(peer is not entry for peer in p)
            for n, p in zip(obj.range_bytes, places, strict=True)
        )
        bw = self.scenario.link.bandwidth
        await asyncio.sleep(transfer_time(pushed, bw, bw))
        if not entry.alive:
            self.rec.publish_failed("entry peer left")
            return
        entries = [
            self._hold(peer, obj, *obj.ranges[i])
            for i, chosen in enumerate(places)
            for peer in chosen
            if peer.alive
        ]
        self.rec.publish_bytes += pushed
        if any(len(h) < w.replicas for h in obj.holders):
            self.rec.underreplicated += 1
        try:
            result = await entry.dht.put_with_entries(
                obj.key, manifest.raw, [manifest.raw, *(e.raw for e in entries)]
            )
            stored = result.accepted
        except Exception:
            if entry.alive:
                raise
            stored = 0
        if stored == 0:
            self.rec.publish_failed("no peer stored the manifest")
            return
        self._published_ok(obj, new_name=previous is None)

    def _published_ok(self, obj: StoredObject, *, new_name: bool) -> None:
        """``obj`` is published: it becomes its name's newest version."""
        self.objects[(obj.name, obj.version)] = obj
        if new_name:
            self.names.append(obj.name)
            self.names_of.setdefault(obj.user, []).append(obj.name)
        self.latest[obj.name] = obj
        self.rec.published(self.now() - obj.published)

    async def _place(self, entry: SimPeer, rkey: bytes, replicas: int) -> list[SimPeer]:
        """The closest live peers to ``rkey`` as the entry peer finds them (itself
        included): r holders in all."""
        contacts = await entry.dht.closest(rkey, replicas + 8)
        live = [c for c in contacts if (p := self.by_id.get(c.node_id)) is not None and p.alive]
        return [self.by_id[c.node_id] for c in choose_targets(live, replicas)]

    def _hold(self, peer: SimPeer, obj: StoredObject, start: int, end: int) -> HolderEntry:
        """``peer`` now holds segments start..end of ``obj``: record it; its signed entry."""
        for i, (a, b) in enumerate(obj.ranges):
            if start <= a and b <= end and peer.index not in obj.holders[i]:
                obj.holders[i].append(peer.index)
                peer.segments += b - a + 1
        return build_holder_entry(
            peer.identity,
            key=obj.key,
            version=obj.version,
            integrity=bytes.fromhex(obj.manifest.integrity),
            start=start,
            end=end,
            host=peer.address[0],
            port=peer.address[1],
            issued=int(self.clock()),
        )

    def _fetch_action(self) -> None:
        fetcher = self.ready.choice(self.rng_work)
        if not self.names:
            return
        name = self.names[self.rng_work.randrange(len(self.names))]
        if fetcher is None:
            self.rec.fetch_failed("no live peer")
            return
        self.spawn(self._guarded(self._fetch(fetcher, name, self.latest[name].version)))

    async def _fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        key = name_key(name)
        t0 = self.now()
        dht = fetcher.dht
        try:
            records, raw_entries = await dht.resolve(key)
        except Exception:
            if fetcher.alive:
                raise
            self.rec.fetch_failed("fetching peer left")
            return
        resolve = self.now() - t0
        if not records:
            self.rec.fetch_failed("name not resolved")
            return
        try:
            manifest = parse_manifest(records[0], key)
        except DifsError:
            self.rec.fetch_failed("invalid manifest")
            return
        obj = self.objects.get((name, manifest.version))
        if obj is None or obj.manifest.raw != manifest.raw:
            self.rec.fetch_failed("unknown manifest")
            return
        live = self._live_holders(obj, raw_entries)
        if not all(live):
            self.rec.fetch_failed("a range has no live holder")
            return
        bw = self.scenario.link.bandwidth
        rtt = self.model.round_trip()
        first = min(obj.manifest.size, obj.manifest.segment_size)
        ttfb = resolve + rtt + transfer_time(first, bw, bw)
        ups = [bw] * len(self.peers)
        total = resolve + rtt + fetch_time(obj.range_bytes, live, ups, bw)
        self.rec.fetched(resolve, ttfb, total, obj.manifest.size, manifest.version < expected)

    def _live_holders(self, obj: StoredObject, raw_entries: list[bytes]) -> list[list[int]]:
        """Per range, the peers named by valid entries that are alive and hold it."""
        entries: list[HolderEntry] = []
        integrity = bytes.fromhex(obj.manifest.integrity)
        for raw in raw_entries:
            if raw[:1] == b"{":
                continue
            try:
                e = parse_holder_entry(raw)
            except DifsError:
                continue
            if e.key == obj.key and e.version == obj.version and e.integrity == integrity:
                entries.append(e)
        live: list[list[int]] = []
        for i, (a, b) in enumerate(obj.ranges):
            found: list[int] = []
            for e in entries:
                peer = self.by_id.get(e.node_id)
                if (
                    e.start <= a
                    and b <= e.end
                    and peer is not None
                    and peer.alive
                    and peer.index in obj.holders[i]
                    and peer.index not in found
                ):
                    found.append(peer.index)
            live.append(found)
        return live

    def _lookup_action(self) -> None:
        peer = self.ready.choice(self.rng_work)
        target = self.rng_work.randbytes(20)
        if peer is not None:
            self.spawn(self._guarded(self._lookup(peer, target)))

    async def _lookup(self, peer: SimPeer, target: bytes) -> None:
        t0 = self.now()
        try:
            result = await peer.dht.lookup(target, "find_node")
        except Exception:
            if peer.alive:
                raise
            return
        elapsed = self.now() - t0
        best = min(
            (p for p in self.alive if p is not peer and self._same_side(p, peer)),
            key=lambda p: distance(p.node_id, target),
            default=None,
        )
        exact = bool(result.closest) and best is not None
        exact = exact and result.closest[0].node_id == best.node_id  # type: ignore[union-attr]
        self.rec.looked_up(result.rounds, elapsed, exact)

    # -- measurements ----------------------------------------------------------------------

    def sample(self) -> None:
        """Record the population and the live copies of every name's newest version."""
        per_range: list[int] = []
        available = 0
        for name in self.names:
            obj = self.latest[name]
            counts = self._live_copies(obj)
            per_range.extend(counts)
            available += all(counts)
        copies: dict[bytes, int] = {}
        if self.names:
            now = self.clock()
            for peer in self.alive:
                for k in peer.dht.store.keys(now):
                    copies[k] = copies.get(k, 0) + 1
        records = [copies.get(self.latest[n].key, 0) for n in self.names]
        self.rec.sampled(
            t=self.now(),
            peers=len(self.alive),
            per_range=per_range,
            available=available,
            names=len(self.names),
            record_copies=records,
        )
        if self.progress is not None:
            self.progress(
                f"  [{self.spec.label}] t={self.now():.0f} s: {len(self.alive)} peers, "
                f"{self.model.stats.sent} datagrams, {self.rec.publish_ok} publishes, "
                f"{self.rec.fetch_ok} fetches, {len(self.rec.hops)} lookups"
            )

    def _collect(self) -> None:
        """Gather what the peers counted themselves into the recorder (full peers)."""

    def _live_copies(self, obj: StoredObject) -> list[int]:
        """Per range of ``obj``, how many live peers hold it."""
        return [sum(1 for i in h if self.peers[i].alive) for h in obj.holders]

    async def _final_checks(self) -> None:
        checks = self.scenario.checks
        if checks.settle > 0:
            await asyncio.sleep(checks.settle)
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            if checks.survival:
                for name in self.names:
                    peer = self.ready.choice(self.rng_work)
                    if peer is not None:
                        self.spawn(self._guarded(self._survives(peer, name)))
            if checks.convergence != "none":
                names = [
                    n
                    for n in self.names
                    if checks.convergence == "all" or self.objects[(n, 1)].during_split
                ]
                n = checks.convergence_peers or len(self.ready)
                for peer in self.ready.sample(self.rng_work, n):
                    for name in names:
                        self.spawn(self._guarded(self._converged(peer, name)))
        self._tg = None

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

    # -- the simulator's repair policy -------------------------------------------------------

    def _repair_pass(self) -> None:
        """Start a repair for every range of a newest version that lacks copies."""
        now = self.now()
        delay = self.spec.repair.detection_delay
        for name in self.names:
            obj = self.latest[name]
            r = obj.manifest.replicas
            for i, holders in enumerate(obj.holders):
                if obj.repairing[i]:
                    continue
                peers = [self.peers[h] for h in holders]
                alive = [p for p in peers if p.alive]
                if not alive:
                    continue
                suspect = [p.node_id for p in peers if not p.alive and now - p.left < delay]
                rkey = obj.range_keys[i]
                leader = min(alive, key=lambda p: distance(p.node_id, rkey))
                action, missing = plan_range(
                    leader.node_id, rkey, [p.node_id for p in alive], r, suspect
                )
                if action is Action.REPAIR:
                    obj.repairing[i] = True
                    self.spawn(self._repair_range(obj, i, leader, missing))

    async def _repair_range(self, obj: StoredObject, i: int, leader: SimPeer, missing: int) -> None:
        try:
            contacts = await leader.dht.closest(obj.range_keys[i], obj.manifest.replicas + 8)
            live = [c for c in contacts if (p := self.by_id.get(c.node_id)) is not None and p.alive]
            holders = {self.peers[h].node_id for h in obj.holders[i]}
            chosen = [self.by_id[c.node_id] for c in choose_targets(live, missing, holders)]
            nbytes = obj.range_bytes[i] * len(chosen)
            bw = self.scenario.link.bandwidth
            await asyncio.sleep(transfer_time(nbytes, bw, bw))
            if not leader.alive:
                return
            start, end = obj.ranges[i]
            entries = [self._hold(p, obj, start, end) for p in chosen if p.alive]
            self.rec.repair_bytes += obj.range_bytes[i] * len(entries)
            if entries:
                self.rec.repaired_ranges += 1
                await leader.dht.add_entries(obj.key, [e.raw for e in entries])
        except Exception:
            if leader.alive:
                raise
        finally:
            obj.repairing[i] = False
