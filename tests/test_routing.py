"""The routing table and the address checks, without sockets."""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Coroutine
from typing import Any

import pytest
from kademlia.node import Node
from kademlia.routing import KBucket, RoutingTable

from difs_p2p.addresses import address_group
from difs_p2p.identity import NodeId, distance
from difs_p2p.routing import (
    Contact,
    ExactRoutingTable,
    contact_of,
    is_id,
    valid_address,
    valid_host,
)


@pytest.mark.parametrize(
    ("host", "ok"),
    [
        ("192.0.2.1", True),
        ("127.0.0.1", True),
        ("10.255.255.254", True),
        ("0.0.0.0", False),
        ("255.255.255.255", False),
        ("224.0.0.1", False),
        ("::1", True),
        ("fd77::1", True),
        ("::ffff:10.0.0.1", True),
        ("::", False),
        ("ff02::1", False),
        ("fe80::1%eth0", False),
        ("[::1]", False),
        ("::1\x00", False),
        ("example.com", False),
        ("localhost", False),
        ("evil\x00host", False),
        ("a" * 64, False),
        ("192.0.2.1\x00", False),
        ("192.0.2.256", False),
        ("1.2.3.4.5", False),
        ("", False),
        (b"192.0.2.1", False),
        (None, False),
        (3232235521, False),
    ],
)
def test_valid_host(host: object, ok: bool) -> None:
    """Only IPv4 and IPv6 literals a datagram may go to are valid hosts (no names)."""
    assert valid_host(host) is ok


@pytest.mark.parametrize(
    ("addr", "ok"),
    [
        (("192.0.2.1", 1), True),
        (("192.0.2.1", 65535), True),
        (("192.0.2.1", 0), False),
        (("192.0.2.1", 65536), False),
        (("192.0.2.1", True), False),
        (("192.0.2.1", 1.0), False),
        (("192.0.2.1", "80"), False),
        (["192.0.2.1", 1], False),
        (("192.0.2.1",), False),
        (("example.com", 80), False),
        (("0.0.0.0", 4000), False),
        ((b"127.0.0.1", 80), False),
    ],
)
def test_valid_address(addr: object, ok: bool) -> None:
    """An address is an (IPv4 host, port 1-65535) tuple, nothing looser."""
    assert valid_address(addr) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [(b"x" * 20, True), (b"x" * 19, False), (b"x" * 21, False), ("x" * 20, False), (None, False)],
)
def test_is_id(value: object, ok: bool) -> None:
    """Node IDs and keys are exactly 20 bytes."""
    assert is_id(value) is ok


def test_contact_of_a_node() -> None:
    """A library Node becomes a Contact with the same id and address."""
    node = Node(b"i" * 20, "192.0.2.9", 7)
    assert contact_of(node) == Contact(NodeId(b"i" * 20), "192.0.2.9", 7)
    assert contact_of(node).address == ("192.0.2.9", 7)


class _NoPings:
    """Stands in for the protocol of a routing table: head pings are only counted."""

    def __init__(self) -> None:
        self.dht = self
        self.pings = 0

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        coro.close()
        self.pings += 1

    async def call_ping(self, node: Node) -> tuple[bool, Any]:
        return (False, None)


def _table(seed: int, size: int) -> tuple[ExactRoutingTable, list[Node], random.Random]:
    rng = random.Random(seed)
    table = ExactRoutingTable(_NoPings(), 8, Node(rng.randbytes(20)))
    nodes = [Node(rng.randbytes(20), f"192.0.2.{i % 200 + 1}", 1000 + i) for i in range(size)]
    for n in nodes:
        table.add_contact(n)
    return table, table.all_contacts(), rng


@pytest.mark.parametrize(("seed", "size"), [(1, 5), (2, 60), (3, 300)])
def test_find_neighbors_is_the_brute_force_xor_sort(seed: int, size: int) -> None:
    """find_neighbors returns the k closest contacts by XOR, as sorting them all does."""
    table, contacts, rng = _table(seed, size)
    for _ in range(20):
        target = rng.randbytes(20)
        truth = sorted(contacts, key=lambda n: distance(n.id, target))
        for k in (1, 8, 20):
            assert table.find_neighbors(Node(target), k) == truth[:k]


def test_find_neighbors_includes_a_contact_with_the_target_id() -> None:
    """A lookup of a peer's ID finds that peer (the library's table leaves it out)."""
    table, contacts, _ = _table(4, 40)
    peer = contacts[7]
    assert table.find_neighbors(Node(peer.id), 1) == [peer]


def test_remove_contact_only_at_its_address() -> None:
    """A claim to an ID from another address does not remove the contact."""
    table, contacts, _ = _table(5, 30)
    peer = contacts[3]
    table.remove_contact(Node(peer.id, "198.51.100.1", peer.port))
    assert peer in table.all_contacts()
    table.remove_contact(Node(peer.id, peer.ip, peer.port))
    assert peer not in table.all_contacts()


def test_contacts_per_ip_are_counted() -> None:
    """contacts_at counts the table's contacts at one IP address."""
    rng = random.Random(6)
    table = ExactRoutingTable(_NoPings(), 8, Node(rng.randbytes(20)))
    for port in (1, 2, 3):
        table.add_contact(Node(rng.randbytes(20), "192.0.2.50", port))
    table.add_contact(Node(rng.randbytes(20), "192.0.2.51", 1))
    assert table.contacts_at("192.0.2.50") == 3
    assert table.contacts_at("192.0.2.51") == 1
    assert table.contacts_at("192.0.2.52") == 0


@pytest.mark.parametrize(
    ("ip", "group"),
    [
        ("192.0.2.50", "192.0.2.50"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
        ("::ffff:192.0.2.50", "192.0.2.50"),
        ("not an address", "not an address"),
        (None, None),
    ],
)
def test_the_cap_counts_an_ipv4_address_or_an_ipv6_64(ip: str | None, group: str | None) -> None:
    """The per-IP cap counts IPv4 addresses, and IPv6 addresses by their /64."""
    assert address_group(ip) == group


def test_contacts_of_one_ipv6_64_count_together() -> None:
    """Two addresses in one IPv6 /64 count as one address for the cap."""
    rng = random.Random(7)
    table = ExactRoutingTable(_NoPings(), 8, Node(rng.randbytes(20)))
    table.add_contact(Node(rng.randbytes(20), "2001:db8:0:1::1", 1))
    table.add_contact(Node(rng.randbytes(20), "2001:db8:0:1::2", 1))
    assert table.contacts_at("2001:db8:0:1::3") == 2
    assert table.contacts_at("2001:db8:0:2::1") == 0


def _overflowing(size: int, overflow_max: int) -> tuple[ExactRoutingTable, list[Node]]:
    """A table with one contact per address and ``size`` peers of 198.51.100.7 offered to
    its overflow, in order."""
    rng = random.Random(8)
    table = ExactRoutingTable(_NoPings(), 8, Node(rng.randbytes(20)))
    table.overflow_max = overflow_max
    for i in range(6):
        table.add_contact(Node(rng.randbytes(20), f"192.0.2.{i + 1}", 1))
    extra = [Node(rng.randbytes(20), "198.51.100.7", 1000 + i) for i in range(size)]
    for n in extra:
        table.add_overflow(n)
    return table, extra


def test_the_overflow_is_bounded_and_drops_the_least_recently_seen() -> None:
    """The overflow keeps at most overflow_max peers; seeing one again keeps it longest."""
    table, extra = _overflowing(4, 3)
    assert list(table.overflow.values()) == extra[1:]
    table.add_overflow(extra[1])  # seen again
    table.add_overflow(extra[0])
    assert list(table.overflow.values()) == [extra[3], extra[1], extra[0]]
    assert table.contacts_at("198.51.100.7") == 0  # never in a bucket


def test_an_overflow_of_zero_keeps_nothing() -> None:
    """With overflow_max 0 no peer over the cap is kept."""
    table, _ = _overflowing(3, 0)
    assert table.overflow == {}


def test_overflow_peers_leave_on_removal_at_their_address_or_on_a_slot() -> None:
    """A removal at the peer's own address drops it from the overflow; a bucket slot
    taken moves it out of the overflow."""
    table, extra = _overflowing(3, 8)
    table.remove_contact(Node(extra[0].id, "192.0.2.99", extra[0].port))  # forged address
    assert extra[0].id in table.overflow
    table.remove_contact(extra[0])
    assert extra[0].id not in table.overflow
    table.add_contact(extra[1])
    assert extra[1].id not in table.overflow
    assert extra[1] in table.all_contacts()


@pytest.mark.parametrize(("limit", "most"), [(None, 3), (2, 2), (1, 1)])
def test_closest_known_adds_the_overflow_with_at_most_limit_per_address(
    limit: int | None, most: int
) -> None:
    """closest_known is the XOR sort of contacts and overflow, at most limit per address."""
    table, extra = _overflowing(3, 8)
    everyone = [*table.all_contacts(), *extra]
    rng = random.Random(9)
    for _ in range(20):
        target = rng.randbytes(20)
        got = table.closest_known(Node(target), 9, per_group=lambda ip: limit)
        kept = [n for n in got if n.ip == "198.51.100.7"]
        assert len(kept) == most
        truth = sorted(everyone, key=lambda n: distance(n.id, target))
        truth = [n for n in truth if n.ip != "198.51.100.7" or n in kept]
        assert got == truth[:9]
        # the ones kept are the closest of their address
        assert kept == sorted(extra, key=lambda n: distance(n.id, target))[:most]


def test_closest_known_fills_from_the_overflow_when_the_cap_drops_contacts() -> None:
    """When every contact is taken and the per-address limit dropped some, farther
    overflow peers fill the answer up to k."""
    table = ExactRoutingTable(_NoPings(), 8, Node(b"\xff" * 20))
    table.overflow_max = 8
    # four contacts of one address near the target (ID 0), four overflow peers farther
    crowd = [Node(bytes(19) + bytes([i]), "192.0.2.1", i) for i in range(1, 5)]
    for n in crowd:
        table.add_contact(n)
    spare = [Node(bytes([i]) + bytes(19), f"198.51.100.{i}", 1) for i in range(1, 5)]
    for n in spare:
        table.add_overflow(n)
    got = table.closest_known(Node(bytes(20)), 4, per_group=lambda ip: 1)
    assert got == [crowd[0], *spare[:3]]


def test_routing_table_indexes_follow_every_change() -> None:
    """Per-IP counts, bucket choice and k nearest agree with a scan of the table throughout.

    Small buckets (k = 4) and six addresses make adds fill buckets, split them and feed
    the replacement cache; removals (evictions) promote replacements; an ID comes back
    from another address; buckets are split by hand as well.
    """
    rng = random.Random(5)
    ips = [f"192.0.2.{i}" for i in range(6)]
    me = Node(rng.randbytes(20))
    protocol = _NoPings()
    table = ExactRoutingTable(protocol, 4, me)

    def new_node(node_id: bytes | None = None) -> Node:
        return Node(node_id or rng.randbytes(20), rng.choice(ips), rng.randrange(1, 65536))

    def near(node_id: bytes) -> bytes:
        """An ID sharing a long prefix with ``node_id`` (lands in deep buckets)."""
        cut = rng.randrange(1, 3)
        return node_id[:cut] + rng.randbytes(20 - cut)

    def check() -> None:
        contacts = table.all_contacts()
        per_ip = Counter(n.ip for n in contacts)
        for ip in [*ips, "198.51.100.1"]:
            assert table.contacts_at(ip) == per_ip[ip]
        for bucket in table.buckets:
            if len(bucket) == table.ksize:
                assert table._depth(bucket) == KBucket.depth(bucket)
        for _ in range(3):
            target = Node(rng.choice([rng.randbytes(20), near(me.id)]))
            if contacts and rng.random() < 0.3:
                target = Node(rng.choice(contacts).id)
            assert table.get_bucket_for(target) == RoutingTable.get_bucket_for(table, target)
            exclude = rng.choice(contacts) if contacts and rng.random() < 0.5 else None
            for k in (1, 4, 9, 50):
                allowed = [
                    n
                    for n in contacts
                    if exclude is None or (n.ip, n.port) != (exclude.ip, exclude.port)
                ]
                truth = heapq.nsmallest(k, allowed, key=lambda n: n.long_id ^ target.long_id)
                assert table.find_neighbors(target, k, exclude) == truth

    replaced = promoted = 0
    for _ in range(1500):
        op = rng.random()
        contacts = table.all_contacts()
        if op < 0.6 or not contacts:
            table.add_contact(new_node(near(me.id) if rng.random() < 0.5 else None))
        elif op < 0.7:
            # the same ID from another address replaces the contact
            table.add_contact(new_node(rng.choice(contacts).id))
            replaced += 1
        elif op < 0.9:
            victim = rng.choice(contacts)
            had_spare = bool(table.buckets[table.get_bucket_for(victim)].replacement_nodes)
            table.remove_contact(victim)
            promoted += had_spare
        elif op < 0.97:
            spares = [n for b in table.buckets for n in b.replacement_nodes.values()]
            table.remove_contact(rng.choice(spares) if spares else new_node())
        else:
            table.split_bucket(rng.randrange(len(table.buckets)))
        check()
    assert len(table.buckets) > 5 and replaced > 50 and promoted > 50 and protocol.pings > 0
    table.flush()
    assert table.all_contacts() == [] and all(table.contacts_at(ip) == 0 for ip in ips)
    assert table.find_neighbors(Node(rng.randbytes(20)), 4) == []
