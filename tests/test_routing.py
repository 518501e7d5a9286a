"""The routing table and the address checks, without sockets."""

from __future__ import annotations

import random
from collections.abc import Coroutine
from typing import Any

import pytest
from kademlia.node import Node

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
        ("::1", False),
        ("example.com", False),
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
    """Only dotted IPv4 addresses a datagram may go to are valid hosts."""
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
