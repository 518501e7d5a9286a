"""The population of a run: every peer that ever joined, who is live, and partition sides.

A :class:`SimPeer` is what the simulator knows about one peer (its seeded identity, its
address, when it joined and left, how many segments it holds) and, once started, its DHT
node. The :class:`Population` keeps every peer in join order, the live peers and the
ready ones (bootstrapped, so the workload may use them as entry peers) as
:class:`LiveSet` s, and, while the network is split, which side (group) each peer is on.
It does no I/O: the :class:`sim.world.World` decides who joins and leaves, the run's mode
(:mod:`sim.mode`) starts and stops the peers.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from dataclasses import dataclass

from difs_p2p.dht import Dht
from difs_p2p.identity import Identity, NodeId
from sim.models import Address, pick_group

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
    def node_id(self) -> NodeId:
        return self.identity.node_id

    @property
    def dht(self) -> Dht:
        if self.node is None:
            raise RuntimeError(f"simulated peer {self.index} has not started")
        return self.node


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

    def __iter__(self) -> Iterator[SimPeer]:
        """A snapshot: the set may change while the caller iterates."""
        return iter(list(self._items))


class Population:
    """Every peer of a run, the live and ready ones, and each peer's side of a split."""

    def __init__(self) -> None:
        self.peers: list[SimPeer] = []
        self.by_id: dict[NodeId, SimPeer] = {}
        self.alive = LiveSet()
        self.ready = LiveSet()
        # Peer index -> group, while the network is split (empty when whole).
        self.groups: dict[int, int] = {}
        # Group shares of the current (or last) split: peers joining during it get a side.
        self.shares: tuple[float, ...] = (1.0,)

    def add(self, peer: SimPeer, *, split: bool, rng: random.Random) -> None:
        """A new peer (index ``len(peers)``); during a ``split`` it is put on a side."""
        self.peers.append(peer)
        self.by_id[peer.node_id] = peer
        if split:
            self.groups[peer.index] = pick_group(self.shares, rng)

    def seeds_for(self, peer: SimPeer, rng: random.Random) -> list[Address]:
        """Bootstrap contacts for ``peer``: a few ready peers on its side of any split."""
        group = self.groups.get(peer.index)
        candidates = list(self.ready.sample(rng, 4 * SEEDS_PER_JOIN))
        if group is not None:
            candidates = [p for p in candidates if self.groups.get(p.index) == group]
        return [p.address for p in candidates[:SEEDS_PER_JOIN]]

    def group_of(self, peer: SimPeer) -> int | None:
        """The side of ``peer`` while the network is split, else None."""
        return self.groups.get(peer.index)

    def depart(self, peer: SimPeer, now: float) -> None:
        """``peer`` leaves (or crashes) at ``now``: no longer live nor ready."""
        peer.alive = False
        peer.left = now
        self.alive.remove(peer)
        self.ready.remove(peer)

    def split(self, shares: tuple[float, ...], rng: random.Random) -> dict[Address, int]:
        """Put every live peer on a side drawn with ``shares``; the address -> group map."""
        self.shares = shares
        self.groups = {}
        assignment: dict[Address, int] = {}
        for peer in self.peers:
            if peer.alive:
                self.groups[peer.index] = pick_group(shares, rng)
                assignment[peer.address] = self.groups[peer.index]
        return assignment

    def heal(self) -> None:
        self.groups = {}

    def same_side(self, a: SimPeer, b: SimPeer) -> bool:
        """Whether ``a`` and ``b`` can reach each other (always, when not split)."""
        return not self.groups or self.groups.get(a.index) == self.groups.get(b.index)

    def live_segments(self) -> list[int]:
        """Segments held by each live peer, in join order."""
        return [p.segments for p in self.peers if p.alive]
