"""The simulator's population and catalog: live sets, sides of a split, published names."""

from __future__ import annotations

import random

import pytest

from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest
from difs_p2p.segments import IntegrityRoot, SegmentId, default_stripes
from sim.catalog import Catalog, StoredObject
from sim.population import SEEDS_PER_JOIN, LiveSet, Population, SimPeer


def _peer(index: int) -> SimPeer:
    identity = Identity.from_seed(bytes([index]) * 32)
    return SimPeer(index, identity, None, ("10.0.0.1", 4000 + index), joined=0.0)


def _population(n: int, *, ready: bool = True) -> Population:
    pop = Population()
    for i in range(n):
        peer = _peer(i)
        pop.add(peer, split=False, rng=random.Random(0))
        pop.alive.add(peer)
        if ready:
            pop.ready.add(peer)
    return pop


def test_live_set_add_remove_and_order() -> None:
    """Adding twice keeps one copy; removing moves the last peer into the hole."""
    peers = [_peer(i) for i in range(4)]
    live = LiveSet()
    for p in [*peers, peers[1]]:
        live.add(p)
    assert [p.index for p in live] == [0, 1, 2, 3]
    live.remove(peers[1])
    live.remove(peers[1])  # absent: nothing happens
    assert [p.index for p in live] == [0, 3, 2]
    live.remove(peers[2])  # the last one
    assert [p.index for p in live] == [0, 3] and len(live) == 2


def test_live_set_choice_and_sample_are_seeded() -> None:
    """The same seed picks the same peers; an empty set picks nobody."""
    live = LiveSet()
    assert live.choice(random.Random(1)) is None
    assert live.sample(random.Random(1), 3) == []
    for i in range(10):
        live.add(_peer(i))
    assert live.choice(random.Random(5)) is live.choice(random.Random(5))
    assert live.sample(random.Random(5), 4) == live.sample(random.Random(5), 4)
    assert len(live.sample(random.Random(5), 40)) == 10


def test_live_set_iteration_is_a_snapshot() -> None:
    """Removing peers while iterating does not skip any."""
    live = LiveSet()
    for i in range(5):
        live.add(_peer(i))
    seen = []
    for p in live:
        seen.append(p.index)
        live.remove(p)
    assert seen == [0, 1, 2, 3, 4] and len(live) == 0


def test_seeds_are_a_few_ready_peers() -> None:
    """A joining peer gets at most SEEDS_PER_JOIN ready peers' addresses, never unready ones."""
    pop = _population(20)
    newcomer = _peer(20)
    pop.add(newcomer, split=False, rng=random.Random(0))
    seeds = pop.seeds_for(newcomer, random.Random(3))
    assert len(seeds) == SEEDS_PER_JOIN
    assert newcomer.address not in seeds
    assert pop.seeds_for(newcomer, random.Random(3)) == seeds
    assert _population(5, ready=False).seeds_for(newcomer, random.Random(3)) == []


def test_split_puts_live_peers_on_sides_and_seeds_stay_on_one_side() -> None:
    """A split assigns every live peer (only those) a side; seeds come from the same side."""
    pop = _population(30)
    gone = pop.peers[7]
    pop.depart(gone, 5.0)
    assignment = pop.split((0.5, 0.5), random.Random(2))
    assert gone.address not in assignment and len(assignment) == 29
    assert set(assignment.values()) == {0, 1}
    newcomer = _peer(30)
    pop.add(newcomer, split=True, rng=random.Random(4))
    side = pop.group_of(newcomer)
    assert side in (0, 1)
    for address in pop.seeds_for(newcomer, random.Random(3)):
        assert assignment[address] == side
    a, b = [p for p in pop.peers if p.alive and pop.group_of(p) != side][:2]
    assert pop.same_side(a, b) and not pop.same_side(a, newcomer)
    pop.heal()
    assert pop.group_of(newcomer) is None and pop.same_side(a, newcomer)


def test_depart_removes_from_live_and_ready() -> None:
    """A departed peer is dead since ``now`` and no longer live or ready."""
    pop = _population(3)
    peer = pop.peers[1]
    pop.depart(peer, 42.0)
    assert not peer.alive and peer.left == 42.0
    assert peer not in list(pop.alive) and peer not in list(pop.ready)
    assert pop.live_segments() == [0, 0]


def _object(name: str, version: int, size: int, user: int = 0) -> StoredObject:
    count = -(-size // 1000)
    link = None if version == 1 else (b"\x02" * 32).hex()
    manifest = build_manifest(
        Identity.from_seed(bytes([user]) * 32),
        name=name,
        version=version,
        parent=link,
        root=link,
        size=size,
        segment_size=1000,
        segment_count=count,
        stripes=default_stripes(count),
        replicas=3,
        integrity=IntegrityRoot(SegmentId(b"\x01" * 32)),
        created=1.0,
    )
    return StoredObject.of(manifest, user, 0.0, during_split=False)


@pytest.mark.parametrize("size", [1, 1000, 1001, 7500])
def test_stored_object_ranges_cover_every_byte(size: int) -> None:
    """The ranges' byte counts add up to the object's size, one key per range."""
    obj = _object("/sim/u0/obj-1", 1, size)
    assert sum(obj.range_bytes) == size
    assert len(obj.range_keys) == len(set(obj.range_keys)) == len(obj.ranges)
    assert obj.holders == [[] for _ in obj.ranges] and not any(obj.repairing)


def test_catalog_names_and_versions() -> None:
    """New names are numbered in order; an update replaces the newest version only."""
    catalog = Catalog()
    first, second = catalog.new_name(2), catalog.new_name(0)
    assert (first, second) == ("/sim/u2/obj-1", "/sim/u0/obj-2")
    v1 = _object(first, 1, 10, user=2)
    catalog.add(v1, new_name=True)
    catalog.add(_object(second, 1, 10), new_name=True)
    catalog.add(v2 := _object(first, 2, 20, user=2), new_name=False)
    assert catalog.names == [first, second]
    assert catalog.names_of == {2: [first], 0: [second]}
    assert catalog.latest[first] is v2 and catalog.objects[(first, 1)] is v1
    assert [o.version for o in catalog.newest()] == [2, 1]
