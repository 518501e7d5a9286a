"""Full peers: every simulated peer is a whole :class:`difs_p2p.peer.Peer` (``mode = "peers"``).

Where :class:`sim.world.World` runs only the DHT of each peer and models segment transfer
and failure detection, a run in this mode runs all of it, unchanged:

* each peer is a ``Peer`` with its own data directory (segment store, record and holdings
  databases, a seeded ``peer.key``), its TCP segment service and its
  :class:`~difs_p2p.repair.Maintainer` (``holds`` probes, repair, GC);
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
from collections.abc import Callable
from pathlib import Path
from typing import IO, cast

from difs_p2p.client import Client
from difs_p2p.config import PeerConfig, RepairConfig
from difs_p2p.errors import DifsError
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from sim.models import NetworkModel
from sim.relay import RelayedPeerNetwork, RelayNetwork
from sim.scenario import RunSpec, Scenario
from sim.world import SimPeer, StoredObject, World


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


class PeerWorld(World):
    """A run of a scenario with full peers on real sockets behind the relay."""

    def __init__(
        self,
        scenario: Scenario,
        spec: RunSpec,
        seed: int,
        relay: RelayNetwork,
        model: NetworkModel,
        root: Path,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        super().__init__(scenario, spec, seed, relay, model, lambda i: ("127.0.0.1", 0), progress)
        self.relay = relay
        self.root = root
        self.full: dict[int, Peer] = {}
        self.nets: dict[int, RelayedPeerNetwork] = {}
        # BLAKE2b of every published version's bytes, to check fetched bytes against.
        self.digests: dict[tuple[str, int], bytes] = {}
        self._sources = itertools.count()
        rep = spec.repair
        self.repair_config = RepairConfig(
            interval=rep.interval if rep.enabled else 1e9,
            dead_after=max(1, math.ceil(rep.detection_delay / rep.interval)),
        )

    def clock(self) -> float:
        return time.time()

    # -- membership ------------------------------------------------------------------------

    def _new_peer(self) -> SimPeer:
        index = len(self.peers)
        seed = self.rng_ids.randbytes(32)
        identity = Identity.from_seed(seed)
        data_dir = self.root / f"peer-{index}"
        data_dir.mkdir(parents=True)
        key = data_dir / "peer.key"
        key.write_text(seed.hex() + "\n")
        key.chmod(0o600)
        peer = SimPeer(index, identity, None, ("0.0.0.0", 0), joined=self.now())
        self.peers.append(peer)
        self.by_id[peer.node_id] = peer
        return peer

    async def _join(self, peer: SimPeer, seeds: list[tuple[str, int]]) -> None:
        if not peer.alive:
            return
        net = self.relay.peer_network()
        config = PeerConfig(
            data_dir=self.root / f"peer-{peer.index}",
            host="127.0.0.1",
            port=0,
            bootstrap=tuple(seeds),
            dht=self.scenario.dht,
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
            self.rec.failed_joins += 1
            peer.alive = False
            peer.left = self.now()
            return
        self.full[peer.index] = node
        self.nets[peer.index] = net
        peer.node = node.dht
        peer.address = node.address
        if not peer.alive:  # its session ended while it was starting
            await self._halt(peer, crash=True)
            return
        self.alive.add(peer)
        self.ready.add(peer)
        self.rec.joins += 1

    async def _halt(self, peer: SimPeer, *, crash: bool) -> None:
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

    async def _publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> None:
        w = self.scenario.workload
        t0 = self.now()
        split = self.model.partitioned
        version = previous.version + 1 if previous else 1
        data = random.Random(f"{self.seed}|{name}|{version}").randbytes(size)
        source = self.root / "objects" / f"{next(self._sources)}"
        source.parent.mkdir(exist_ok=True)
        await asyncio.to_thread(source.write_bytes, data)
        try:
            async with self._client(entry, self.users[user]) as client:
                result = await client.put(
                    source,
                    name,
                    segment_size=w.segment_size,
                    replicas=w.replicas,
                    update=previous is not None,
                )
        except DifsError as exc:
            self.rec.publish_failed(_reason(exc))
            return
        finally:
            source.unlink()
        obj = StoredObject.of(result.manifest, user, t0, split)
        self.digests[(name, version)] = hashlib.blake2b(data).digest()
        self.rec.publish_bytes += size * w.replicas
        if result.warnings:
            self.rec.underreplicated += 1
        self._published_ok(obj, new_name=previous is None)

    async def _fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        sink = _Digest()
        try:
            async with self._client(fetcher) as client:
                result = await client.get(name, cast(IO[bytes], sink))
        except DifsError as exc:
            if fetcher.alive:
                self.rec.fetch_failed(_reason(exc))
            else:
                self.rec.fetch_failed("fetching peer left")
            return
        version = result.manifest.version
        if sink.digest() != self.digests.get((name, version)):
            self.rec.fetch_failed("bytes differ from the published ones")
            return
        self.rec.fetch_bytes += sink.size
        self.rec.fetched(
            result.resolve, result.first_byte, result.seconds, sink.size, version < expected
        )

    def _repair_pass(self) -> None:
        """Nothing: full peers find and repair lost copies themselves."""

    # -- measurements ----------------------------------------------------------------------

    def _holders_of(self, obj: StoredObject) -> list[SimPeer]:
        held = []
        for peer in self.alive:
            holdings = self.full[peer.index].holdings
            if holdings is not None and holdings.of_key(obj.key):
                held.append(peer)
        return held

    def _live_copies(self, obj: StoredObject) -> list[int]:
        counts = [0] * len(obj.ranges)
        for peer in self.alive:
            holdings = self.full[peer.index].holdings
            if holdings is None:
                continue
            for i, (a, b) in enumerate(obj.ranges):
                counts[i] += holdings.covers(obj.key, obj.version, a, b)
        return counts

    def sample(self) -> None:
        for peer in self.alive:
            store = self.full[peer.index].store
            if store is not None:
                peer.segments = store.count
        super().sample()

    def _collect(self) -> None:
        for node in self.full.values():
            if node.maintainer is not None:
                stats = node.maintainer.stats
                self.rec.repair_bytes += stats.repair_bytes
                self.rec.repaired_ranges += stats.repaired_ranges
