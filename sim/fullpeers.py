"""Full peers: every simulated peer is a whole :class:`difs_p2p.peer.Peer` (``mode = "peers"``).

Where :class:`sim.modelled.ModelledMode` runs only the DHT of each peer and models segment
transfer and failure detection, this mode runs all of it, unchanged, under the same
:class:`sim.world.World` (timeline, population, workload, measurements):

* each peer is a ``Peer`` with its own data directory (segment store, record and holdings
  databases, a seeded ``peer.key``), its TCP segment service and its
  :class:`~difs_p2p.repair.Maintainer` (``holds_ranges`` probes, repair, GC);
* it gets its sockets from :meth:`sim.relay.RelayNetwork.peer_network`, so every DHT
  datagram and every TCP byte between peers crosses the relay and its network model
  (latency, loss of datagrams, bandwidth, partitions);
* publishes and fetches are the real :class:`difs_p2p.client.Client` talking to its entry
  peer (directly, as a local client does) and to holders (through the relay); fetched
  bytes are compared with what was published;
* departures stop the peer (a crash closes its sockets first, so it says no goodbye);
  repair is the peers' own: the simulator only counts copies and reads the peers'
  repair statistics.

Live copies of a range are counted from the live peers' holdings indexes, the same ones
their maintenance rounds use. Runs are in real time on real sockets, so they are not
bit-reproducible; populations of tens to a few hundred peers fit this machine.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import math
import random
import time
from pathlib import Path
from typing import IO, cast

from difs_p2p.client import Client
from difs_p2p.config import PeerConfig, RepairConfig
from difs_p2p.errors import DifsError
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from sim.catalog import StoredObject
from sim.mode import Run
from sim.models import Address
from sim.population import SimPeer
from sim.relay import RelayedPeerNetwork, RelayNetwork


class _Digest:
    """A write-only stream that keeps the BLAKE2b digest and size of what it is given."""

    def __init__(self) -> None:
        self._hash = hashlib.blake2b()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def digest(self) -> bytes:
        return self._hash.digest()


def _reason(exc: BaseException) -> str:
    """A failure reason with few distinct values: the error's kind."""
    return type(exc).__name__


class FullPeerMode:
    """Whole peers on real sockets behind the relay; the workload is the real client."""

    def __init__(self, run: Run, relay: RelayNetwork, root: Path) -> None:
        self.run = run
        self.relay = relay
        self.root = root
        self.full: dict[int, Peer] = {}
        self.nets: dict[int, RelayedPeerNetwork] = {}
        # BLAKE2b of every published version's bytes, to check fetched bytes against.
        self.digests: dict[tuple[str, int], bytes] = {}
        self._sources = itertools.count()
        rep = run.spec.repair
        self.repair_config = RepairConfig(
            interval=rep.interval if rep.enabled else 1e9,
            dead_after=max(1, math.ceil(rep.detection_delay / rep.interval)),
        )

    def clock(self) -> float:
        return time.time()

    # -- membership ------------------------------------------------------------------------

    def create_peer(self, index: int, key_seed: bytes) -> SimPeer:
        """A peer with a data directory holding its seeded ``peer.key``."""
        identity = Identity.from_seed(key_seed)
        data_dir = self.root / f"peer-{index}"
        data_dir.mkdir(parents=True)
        key = data_dir / "peer.key"
        key.write_text(key_seed.hex() + "\n")
        key.chmod(0o600)
        return SimPeer(index, identity, None, ("0.0.0.0", 0), joined=self.run.now())

    async def start(self, peer: SimPeer, seeds: list[Address]) -> bool:
        """Start a whole peer; it bootstraps from ``seeds`` itself."""
        net = self.relay.peer_network()
        config = PeerConfig(
            data_dir=self.root / f"peer-{peer.index}",
            host="127.0.0.1",
            port=0,
            bootstrap=tuple(seeds),
            dht=self.run.scenario.dht,
            bootstrap_attempts=2,
            bootstrap_backoff=0.5,
            repair=self.repair_config,
            # every TCP connection reaches a peer through the relay on 127.0.0.1
            tcp_limit_loopback=False,
        )
        node = Peer(config, network=net)
        try:
            await node.start()
        except DifsError:
            return False
        self.full[peer.index] = node
        self.nets[peer.index] = net
        peer.node = node.dht
        peer.address = node.address
        return True

    async def bootstrap(self, peer: SimPeer, seeds: list[Address]) -> bool:
        """Nothing more: the peer bootstrapped as it started."""
        return True

    async def stop(self, peer: SimPeer, *, crash: bool) -> None:
        node = self.full.get(peer.index)
        if node is None:
            return
        if crash:
            if node.dht is not None and node.dht.transport is not None:
                node.dht.transport.close()
            if node.server is not None:
                node.server.sock.close()
        await node.stop()

    # -- workload --------------------------------------------------------------------------

    def _client(self, peer: SimPeer, publisher: Identity | None = None) -> Client:
        """A client on ``peer``'s host: its entry peer directly, holders through the relay."""
        net = self.nets[peer.index]
        node = self.full[peer.index]
        assert net.inner is not None
        return Client(net.inner, publisher=publisher, network=net, token=node.control_token)

    async def publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> StoredObject | None:
        run = self.run
        w = run.scenario.workload
        t0 = run.now()
        split = run.model.partitioned
        version = previous.version + 1 if previous else 1
        data = random.Random(f"{run.seed}|{name}|{version}").randbytes(size)
        source = self.root / "objects" / f"{next(self._sources)}"
        source.parent.mkdir(exist_ok=True)
        await asyncio.to_thread(source.write_bytes, data)
        try:
            async with self._client(entry, run.users[user]) as client:
                result = await client.put(
                    source,
                    name,
                    segment_size=w.segment_size,
                    replicas=w.replicas,
                    update=previous is not None,
                )
        except DifsError as exc:
            run.rec.publish_failed(_reason(exc))
            return None
        finally:
            source.unlink()
        obj = StoredObject.of(result.manifest, user, t0, split)
        self.digests[(name, version)] = hashlib.blake2b(data).digest()
        run.rec.publish_bytes += size * w.replicas
        if result.warnings:
            run.rec.underreplicated += 1
        return obj

    async def fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        rec = self.run.rec
        sink = _Digest()
        try:
            async with self._client(fetcher) as client:
                result = await client.get(name, cast(IO[bytes], sink))
        except DifsError as exc:
            if fetcher.alive:
                rec.fetch_failed(_reason(exc))
            else:
                rec.fetch_failed("fetching peer left")
            return
        version = result.manifest.version
        if sink.digest() != self.digests.get((name, version)):
            rec.fetch_failed("bytes differ from the published ones")
            return
        rec.fetch_bytes += sink.size
        rec.fetched(
            result.resolve, result.first_byte, result.seconds, sink.size, version < expected
        )

    def repair_pass(self) -> None:
        """Nothing: full peers find and repair lost copies themselves."""

    # -- what the simulator counts ---------------------------------------------------------

    def holders_of(self, obj: StoredObject) -> list[SimPeer]:
        """The live peers whose holdings index has some range of ``obj``."""
        held = []
        for peer in self.run.population.alive:
            holdings = self.full[peer.index].holdings
            if holdings is not None and holdings.of_key(obj.key):
                held.append(peer)
        return held

    def live_copies(self, obj: StoredObject) -> list[int]:
        """Per range, the live peers whose holdings index covers it."""
        counts = [0] * len(obj.ranges)
        for peer in self.run.population.alive:
            holdings = self.full[peer.index].holdings
            if holdings is None:
                continue
            for i, (a, b) in enumerate(obj.ranges):
                counts[i] += holdings.covers(obj.key, obj.version, a, b)
        return counts

    def before_sample(self) -> None:
        """Each live peer's segment count, from its store."""
        for peer in self.run.population.alive:
            store = self.full[peer.index].store
            if store is not None:
                peer.segments = store.count

    def collect(self) -> None:
        """The peers' own repair statistics."""
        rec = self.run.rec
        for node in self.full.values():
            if node.maintainer is not None:
                stats = node.maintainer.stats
                rec.repair_bytes += stats.repair_bytes
                rec.repaired_ranges += stats.repaired_ranges
