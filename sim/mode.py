"""The contract between a run's :class:`sim.world.World` and its mode.

The world decides *when* things happen (joins, departures, publishes, fetches, samples:
:mod:`sim.timeline`) and *who* takes part (:mod:`sim.population`); a **mode** decides *how*
each operation is carried out on the peers:

* :class:`sim.modelled.ModelledMode` (``memory`` and ``sockets``): each peer is only its
  real DHT node; segment transfers, placement bookkeeping, failure detection and repair
  are modelled.
* :class:`sim.fullpeers.FullPeerMode` (``peers``): each peer is a whole
  :class:`difs_p2p.peer.Peer` and the workload is the real :class:`difs_p2p.client.Client`.

Both are given the same :class:`Run` (what every part of one run shares) and provide the
operations of :class:`Mode`. A new mode is a new class with these operations, not a
subclass of the world.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Protocol

from difs_p2p.identity import Identity
from sim.catalog import Catalog, StoredObject
from sim.metrics import Recorder
from sim.models import Address, NetworkModel
from sim.population import Population, SimPeer
from sim.scenario import RunSpec, Scenario
from sim.timeline import Timeline


@dataclass(slots=True)
class Run:
    """What every part of one run shares: its inputs, time, peers, objects and measurements."""

    scenario: Scenario
    spec: RunSpec
    seed: int
    model: NetworkModel
    # The publishers' keys: publish i is signed by one of them.
    users: list[Identity]
    timeline: Timeline
    population: Population
    catalog: Catalog
    rec: Recorder

    @classmethod
    def new(cls, scenario: Scenario, spec: RunSpec, seed: int, model: NetworkModel) -> Run:
        """A run before its start: seeded users, nobody joined, nothing published."""
        users = [
            Identity.from_seed(random.Random(f"{seed}:user:{u}").randbytes(32))
            for u in range(scenario.workload.users)
        ]
        return cls(
            scenario, spec, seed, model, users, Timeline(), Population(), Catalog(), Recorder()
        )

    def now(self) -> float:
        """Seconds since the start of the run."""
        return self.timeline.now()


class Mode(Protocol):
    """The operations a mode provides to the world, for one run."""

    def clock(self) -> float:
        """The wall clock the peers see (records carry it)."""
        ...

    def create_peer(self, index: int, key_seed: bytes) -> SimPeer:
        """A new peer with the identity of ``key_seed`` (32 bytes); not started yet."""
        ...

    async def start(self, peer: SimPeer, seeds: list[Address]) -> bool:
        """Start ``peer`` (its sockets, and its address); False if it could not."""
        ...

    async def bootstrap(self, peer: SimPeer, seeds: list[Address]) -> bool:
        """Join a started, live ``peer`` to the network; False if no seed answered."""
        ...

    async def stop(self, peer: SimPeer, *, crash: bool) -> None:
        """Stop a started peer; a crash closes its sockets first (no goodbye)."""
        ...

    async def publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> StoredObject | None:
        """Publish ``size`` bytes as ``name`` through ``entry``, signed by user ``user``
        (an update of ``previous`` if given). The published version, or None after
        recording why it failed."""
        ...

    async def fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        """Fetch ``name`` (newest published version ``expected``) from ``fetcher``'s host;
        record the outcome."""
        ...

    def repair_pass(self) -> None:
        """A repair pass of the simulator's policy (a mode whose peers repair themselves
        does nothing)."""
        ...

    def holders_of(self, obj: StoredObject) -> list[SimPeer]:
        """The live peers holding some range of ``obj``."""
        ...

    def live_copies(self, obj: StoredObject) -> list[int]:
        """Per range of ``obj``, how many live peers hold it."""
        ...

    def before_sample(self) -> None:
        """Bring what the simulator knows of the peers up to date before a sample."""
        ...

    def collect(self) -> None:
        """At the end: gather what the peers counted themselves into the recorder."""
        ...
