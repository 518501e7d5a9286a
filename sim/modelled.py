"""The modelled mode (``memory`` and ``sockets``): real DHT peers, modelled segments.

Every peer is a real :class:`difs_p2p.dht.Dht` with the real
:class:`~difs_p2p.recordpolicy.RecordValidator` policy and a seeded identity
(:meth:`Identity.from_seed`); only its network (:mod:`sim.memnet` or :mod:`sim.relay`) and
its clock (the event loop's, plus a fixed epoch) come from the simulator. With the
scenario's ``identify`` (the default) the ``Dht`` has the peer's key and runs the identify
challenge, as in production; without, contacts enter routing tables unproven.

What this mode models around the peers:

* **Publish**: a real signed manifest (version 1, or n+1 with parent and root for an
  update) and real holder entries, each signed by its holder, stored together with the
  manifest (history) by ``Dht.put_with_entries``, as the peer's publish does. Placement
  (:meth:`ModelledMode._place_range`) follows the peer's ``place``: range i goes to the
  closest live peers to its range key (``Dht.closest``, the entry peer included) until r
  copies exist; the entry peer keeps a range only when it is one of them. Segment bytes
  are not materialized: the simulator records who holds which range, and a range exists
  only on peers that are alive and hold it. Transfers take time from the bandwidth model.
* **Fetch**: ``Dht.resolve`` of the name key (one lookup, as the peer's), the manifest
  verified by ``parse_manifest``, holder entries by ``parse_holder_entry``; the live
  holders of every range; time to first byte = resolve time + one round trip + the first
  segment's transfer.
* **Repair (the simulator's policy)**: every ``interval``, for each range of each name's
  newest version, holders that left count as suspects for ``detection_delay`` and as dead
  after; the decision is the peer's own pure ``difs_p2p.maintenance.plan_range`` (the live
  holder closest to the range key repairs a shortfall), and the leader places new copies
  on the closest live peers from ``Dht.closest``, whose signed entries it adds to the DHT.
  Failure detection by probing (``holds_ranges``) and the TCP pushes are modelled, not run
  here; :mod:`sim.fullpeers` (peers mode) runs whole peers, where nothing is modelled.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Collection

from difs_p2p import classgen
from difs_p2p.dht import Dht
from difs_p2p.errors import DifsError
from difs_p2p.holders import HolderEntry, build_holder_entry, parse_holder_entry
from difs_p2p.identity import Identity, distance
from difs_p2p.maintenance import Action, plan_range
from difs_p2p.manifest import build_manifest, parse_manifest
from difs_p2p.names import name_key
from difs_p2p.net import DatagramNetwork
from difs_p2p.placement import RangeKey, choose_targets, domain_of, spread
from difs_p2p.recordpolicy import RecordValidator
from difs_p2p.records import split_entries
from difs_p2p.segments import IntegrityRoot, default_stripes, segment_hash
from sim.catalog import StoredObject
from sim.mode import Run
from sim.models import Address, fetch_time, transfer_time
from sim.population import SimPeer

# Records carry wall-clock times: peers see this epoch plus the simulated seconds.
EPOCH = 1_700_000_000.0


class ModelledMode:
    """Real DHT nodes on a simulated network; publish, fetch and repair as modelled above."""

    def __init__(
        self, run: Run, network: DatagramNetwork, address_for: Callable[[int], Address]
    ) -> None:
        self.run = run
        self.network = network
        self.address_for = address_for
        self.policy = RecordValidator()

    def clock(self) -> float:
        """The wall clock the peers see."""
        return EPOCH + self.run.now()

    # -- membership ------------------------------------------------------------------------

    def create_peer(self, index: int, key_seed: bytes) -> SimPeer:
        run = self.run
        identity = Identity.from_seed(key_seed)
        dht = Dht(
            identity.node_id,
            self.policy,
            run.scenario.dht,
            clock=self.clock,
            rng=random.Random(f"{run.seed}:dht:{index}"),
            identity=identity if run.scenario.identify else None,
        )
        return SimPeer(index, identity, dht, ("0.0.0.0", 0), joined=run.now())

    async def start(self, peer: SimPeer, seeds: list[Address]) -> bool:
        host, port = self.address_for(peer.index)
        await peer.dht.start(host, port, network=self.network)
        peer.address = peer.dht.me.address
        return True

    async def bootstrap(self, peer: SimPeer, seeds: list[Address]) -> bool:
        if not seeds:
            return True
        return await peer.dht.bootstrap(seeds) != 0

    async def stop(self, peer: SimPeer, *, crash: bool) -> None:
        if crash and peer.dht.transport is not None:
            peer.dht.transport.close()
        await peer.dht.stop()

    # -- publish ---------------------------------------------------------------------------

    async def publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> StoredObject | None:
        run = self.run
        w = run.scenario.workload
        rec = run.rec
        t0 = run.now()
        split = run.model.partitioned
        version = previous.version + 1 if previous else 1
        # a stand-in root: the simulator moves no segment bytes
        integrity = IntegrityRoot(segment_hash(f"{run.seed}|{name}|{version}".encode()))
        count = -(-size // w.segment_size)
        stripes = default_stripes(count)
        manifest = build_manifest(
            run.users[user],
            name=name,
            version=version,
            parent=previous.manifest.hash if previous else None,
            root=previous.manifest.lineage_root if previous else None,
            size=size,
            segment_size=w.segment_size,
            segment_count=count,
            stripes=stripes,
            replicas=w.replicas,
            integrity=integrity,
            created=self.clock(),
        )
        obj = StoredObject.of(manifest, user, t0, split)
        try:
            places = await asyncio.gather(
                *(self._place_range(entry, k, w.replicas, w.replicas) for k in obj.range_keys)
            )
        except Exception:
            if entry.alive:
                raise
            rec.publish_failed("entry peer left")
            return None
        pushed = sum(
            n * sum(peer is not entry for peer in p)
            for n, p in zip(obj.range_bytes, places, strict=True)
        )
        bw = run.scenario.link.bandwidth
        await asyncio.sleep(transfer_time(pushed, bw, bw))
        if not entry.alive:
            rec.publish_failed("entry peer left")
            return None
        entries = [
            self._hold(peer, obj, *obj.ranges[i])
            for i, chosen in enumerate(places)
            for peer in chosen
            if peer.alive
        ]
        rec.publish_bytes += pushed
        if any(len(h) < w.replicas for h in obj.holders):
            rec.underreplicated += 1
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
            rec.publish_failed("no peer stored the manifest")
            return None
        return obj

    async def _place_range(
        self,
        asker: SimPeer,
        rkey: RangeKey,
        replicas: int,
        count: int,
        exclude: Collection[int] = (),
    ) -> list[SimPeer]:
        """Placement: up to ``count`` new holders for the range with key ``rkey`` (of an
        object with ``replicas`` copies), the closest live peers to it as ``asker`` finds
        them (itself included), leaving out the peer indexes in ``exclude`` (holders
        already). A publish asks for r holders; a repair for the missing ones."""
        by_id = self.run.population.by_id
        contacts = await asker.dht.closest(rkey, replicas + 8)
        # the contacts with the zones their peers were given (the scenario's `zones`)
        live = [
            classgen.replace(c, zone=self._zone(p))
            for c in contacts
            if (p := by_id.get(c.node_id)) is not None and p.alive
        ]
        held = [self.run.population.peers[i] for i in exclude]
        holders = {p.node_id for p in held}
        # the holders' failure domains count as used (addresses: memory_address)
        used = [domain_of(*p.address, self._zone(p)) for p in held]
        chosen = choose_targets(live, count, holders, used)
        self.run.rec.placed(
            spread([*used, *(domain_of(c.host, c.port, c.zone) for c in chosen)]),
            len(used) + len(chosen),
        )
        return [by_id[c.node_id] for c in chosen]

    def _zone(self, peer: SimPeer) -> str:
        """The zone label of ``peer`` (none unless the scenario sets ``zones``)."""
        zones = self.run.scenario.zones
        return f"z{peer.index % zones}" if zones else ""

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
            integrity=obj.manifest.integrity,
            start=start,
            end=end,
            host=peer.address[0],
            port=peer.address[1],
            issued=int(self.clock()),
        )

    # -- fetch -----------------------------------------------------------------------------

    async def fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        run = self.run
        rec = run.rec
        key = name_key(name)
        t0 = run.now()
        dht = fetcher.dht
        try:
            records, raw_entries = await dht.resolve(key)
        except Exception:
            if fetcher.alive:
                raise
            rec.fetch_failed("fetching peer left")
            return
        resolve = run.now() - t0
        if not records:
            rec.fetch_failed("name not resolved")
            return
        try:
            manifest = parse_manifest(records[0], key)
        except DifsError:
            rec.fetch_failed("invalid manifest")
            return
        obj = run.catalog.objects.get((name, manifest.version))
        if obj is None or obj.manifest.raw != manifest.raw:
            rec.fetch_failed("unknown manifest")
            return
        live = self._live_holders(obj, raw_entries)
        if not all(live):
            rec.fetch_failed("a range has no live holder")
            return
        bw = run.scenario.link.bandwidth
        rtt = run.model.round_trip()
        first = min(obj.manifest.size, obj.manifest.segment_size)
        ttfb = resolve + rtt + transfer_time(first, bw, bw)
        ups = [bw] * len(run.population.peers)
        total = resolve + rtt + fetch_time(obj.range_bytes, live, ups, bw)
        rec.fetched(resolve, ttfb, total, obj.manifest.size, manifest.version < expected)

    def _live_holders(self, obj: StoredObject, raw_entries: list[bytes]) -> list[list[int]]:
        """Per range, the peers named by valid entries that are alive and hold it."""
        entries: list[HolderEntry] = []
        integrity = obj.manifest.integrity
        for raw in split_entries(raw_entries).holders:
            try:
                e = parse_holder_entry(raw)
            except DifsError:
                continue
            if e.key == obj.key and e.version == obj.version and e.integrity == integrity:
                entries.append(e)
        by_id = self.run.population.by_id
        live: list[list[int]] = []
        for i, (a, b) in enumerate(obj.ranges):
            found: list[int] = []
            for e in entries:
                peer = by_id.get(e.node_id)
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

    # -- the simulator's repair policy -----------------------------------------------------

    def repair_pass(self) -> None:
        """Start a repair for every range of a newest version that lacks copies."""
        run = self.run
        now = run.now()
        delay = run.spec.repair.detection_delay
        peers = run.population.peers
        for obj in run.catalog.newest():
            r = obj.manifest.replicas
            for i, holders in enumerate(obj.holders):
                if obj.repairing[i]:
                    continue
                held = [peers[h] for h in holders]
                alive = [p for p in held if p.alive]
                if not alive:
                    continue
                suspect = [p.node_id for p in held if not p.alive and now - p.left < delay]
                rkey = obj.range_keys[i]
                leader = min(alive, key=lambda p: distance(p.node_id, rkey))
                action, missing = plan_range(
                    leader.node_id, rkey, [p.node_id for p in alive], r, suspect
                )
                if action is Action.REPAIR:
                    obj.repairing[i] = True
                    run.timeline.spawn(self._repair_range(obj, i, leader, missing))

    async def _repair_range(self, obj: StoredObject, i: int, leader: SimPeer, missing: int) -> None:
        rec = self.run.rec
        try:
            chosen = await self._place_range(
                leader, obj.range_keys[i], obj.manifest.replicas, missing, obj.holders[i]
            )
            nbytes = obj.range_bytes[i] * len(chosen)
            bw = self.run.scenario.link.bandwidth
            await asyncio.sleep(transfer_time(nbytes, bw, bw))
            if not leader.alive:
                return
            start, end = obj.ranges[i]
            entries = [self._hold(p, obj, start, end) for p in chosen if p.alive]
            rec.repair_bytes += obj.range_bytes[i] * len(entries)
            if entries:
                rec.repaired_ranges += 1
                await leader.dht.add_entries(obj.key, [e.raw for e in entries])
        except Exception:
            if leader.alive:
                raise
        finally:
            obj.repairing[i] = False

    # -- what the simulator counts ---------------------------------------------------------

    def holders_of(self, obj: StoredObject) -> list[SimPeer]:
        """The live peers holding some range of ``obj`` (ground truth)."""
        peers = self.run.population.peers
        held = {i for h in obj.holders for i in h}
        return [peers[i] for i in held if peers[i].alive]

    def live_copies(self, obj: StoredObject) -> list[int]:
        peers = self.run.population.peers
        return [sum(1 for i in h if peers[i].alive) for h in obj.holders]

    def before_sample(self) -> None:
        """Nothing: the simulator's own bookkeeping is the ground truth."""

    def collect(self) -> None:
        """Nothing: repair is the simulator's, counted as it happens."""
