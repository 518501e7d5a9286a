"""Placement decisions (placement.py): which peers are asked for a range's copies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pytest

from difs_p2p import segments
from difs_p2p.identity import NodeId
from difs_p2p.placement import (
    Domain,
    choose_targets,
    domain_of,
    range_key,
    shares_an_address,
    shortfall,
    spread,
)
from difs_p2p.segments import IntegrityRoot, SegmentId


@dataclass(frozen=True)
class Peer:
    node_id: NodeId
    host: str = "10.0.0.1"
    port: int = 4000
    zone: str = ""

    @property
    def domain(self) -> Domain:
        return domain_of(self.host, self.port, self.zone)


def peers(*names: str) -> list[Peer]:
    """Peers named by one letter each, each on its own address in its own /24."""
    return [Peer(NodeId(n.encode()), f"10.0.{ord(n[0])}.1") for n in names]


def at(spec: str) -> Peer:
    """``name@host[:port][/zone]``, e.g. ``a@10.0.0.4/z1``, ``b@127.0.0.1:2``."""
    name, where = spec.split("@")
    where, _, zone = where.partition("/")
    host, port = where.rsplit(":", 1) if where.count(":") == 1 else (where, "4000")
    return Peer(NodeId(name.encode()), host, int(port), zone)


def place(
    candidates: Sequence[Peer],
    replicas: int,
    answers: Callable[[Peer], bool],
    *,
    asked: set[NodeId] | None = None,
    used: Sequence[Domain] = (),
    parallel: bool = True,
) -> tuple[list[str], list[str]]:
    """Drive choose_targets as the peer and repair do: ask a batch, record the outcomes,
    ask again for what is still missing. Returns (holders made, every peer asked in order)."""
    made: list[str] = []
    order: list[str] = []
    done = set(asked or ())
    domains = list(used)
    while len(made) < replicas:
        batch = choose_targets(candidates, replicas - len(made) if parallel else 1, done, domains)
        if not batch:
            break
        done.update(p.node_id for p in batch)
        for p in batch:
            order.append(p.node_id.decode())
            if answers(p):
                made.append(p.node_id.decode())
                domains.append(p.domain)
    return made, order


def accept_all(p: Peer) -> bool:
    return True


def refuse(*names: str) -> Callable[[Peer], bool]:
    return lambda p: p.node_id.decode() not in names


# (case, candidates in lookup order, r, answers, already holding, made, asked in order)
CASES = [
    ("enough candidates", "abcdef", 3, accept_all, "", "abc", "abc"),
    ("one refuses: the next is asked", "abcdef", 3, refuse("b"), "", "acd", "abcd"),
    ("some fail: the next ones are asked", "abcdef", 3, refuse("a", "c", "d"), "", "bef", "abcdef"),
    ("too few candidates", "ab", 3, accept_all, "", "ab", "ab"),
    ("every candidate refuses", "abc", 2, refuse("a", "b", "c"), "", "", "abc"),
    ("holders present are not re-asked", "abcdef", 2, accept_all, "ab", "cd", "cd"),
    ("no copy missing asks no one", "abc", 0, accept_all, "", "", ""),
]


@pytest.mark.parametrize(
    ("candidates", "replicas", "answers", "holding", "made", "order"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_choose_targets_asks_the_closest_peers_that_accept(
    candidates: str,
    replicas: int,
    answers: Callable[[Peer], bool],
    holding: str,
    made: str,
    order: str,
) -> None:
    """The copies go to the first candidates that accept, each peer asked at most once."""
    got, asked = place(
        peers(*candidates), replicas, answers, asked={NodeId(h.encode()) for h in holding}
    )
    assert "".join(got) == made
    assert "".join(asked) == order


def test_one_by_one_asks_the_same_peers_as_in_parallel() -> None:
    """Repair asks one peer at a time; it reaches the same holders as a parallel place."""
    candidates = peers(*"abcdefg")
    answers = refuse("b", "e")
    assert place(candidates, 4, answers, parallel=False) == place(candidates, 4, answers)


@pytest.mark.parametrize(("position", "keeps"), [(0, True), (2, True), (3, False), (5, False)])
def test_the_entry_peer_keeps_a_copy_only_among_the_r_closest(position: int, keeps: bool) -> None:
    """The entry peer is a candidate like any other: a copy only if among the r closest."""
    others = peers(*"abcde")
    me = Peer(NodeId(b"me"))
    candidates = [*others[:position], me, *others[position:]]
    made, _ = place(candidates, 3, accept_all)
    assert ("me" in made) is keeps
    assert len(made) == 3


def test_the_entry_peer_replaces_a_refusal_when_next_in_line() -> None:
    """When a closer peer refuses, the next candidate, the entry peer too, is asked."""
    candidates = [*peers("a", "b", "c"), Peer(NodeId(b"me")), *peers("d")]
    made, _ = place(candidates, 3, refuse("b"))
    assert made == ["a", "c", "me"]


def test_duplicate_candidates_are_asked_once() -> None:
    """A lookup listing a peer twice does not make it two copies."""
    assert choose_targets(peers("a", "a", "b", "c"), 3) == peers("a", "b", "c")


# (case, candidates in lookup order, r, answers, domains of copies present, made, asked)
DOMAIN_CASES = [
    (
        "copies on distinct addresses first",
        "a@10.0.0.4 b@10.0.0.4 c@10.0.0.4 d@10.0.1.5 e@10.0.2.6",
        3,
        accept_all,
        "",
        "ade",
        "ade",
    ),
    (
        "a second copy on one address only when no new one is left, closest first",
        "a@10.0.0.4 b@10.0.0.4 c@10.0.0.4 d@10.0.1.5",
        3,
        accept_all,
        "",
        "adb",
        "adb",
    ),
    (
        "distinct /24 before one /24",
        "a@10.0.0.1 b@10.0.0.2 c@10.0.1.1",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "distinct IPv6 /48 before one /48",
        "a@2001:db8:1:1::1 b@2001:db8:1:2::1 c@2001:db8:2::1",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "one IPv6 /64 is one address",
        "a@2001:db8:1:1::1 b@2001:db8:1:1::2 c@2001:db8:1:2::1",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "an IPv4-mapped IPv6 address is the IPv4 address",
        "a@10.0.0.4 b@::ffff:10.0.0.4 c@10.0.1.5",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "distinct zones first",
        "a@10.0.0.1/z1 b@10.0.1.1/z1 c@10.0.2.1/z2",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "an unknown zone shares nothing",
        "a@10.0.0.1/z1 b@10.0.1.1 c@10.0.2.1/z1",
        2,
        accept_all,
        "",
        "ab",
        "ab",
    ),
    (
        "a zone claimed on a used address loses to a new address",
        "a@10.0.0.1/z1 b@10.0.0.1/z2 c@10.0.1.1/z1",
        2,
        accept_all,
        "",
        "ac",
        "ac",
    ),
    (
        "loopback ports are distinct addresses",
        "a@127.0.0.1:1 b@127.0.0.1:2 c@10.0.0.1",
        2,
        accept_all,
        "",
        "ab",
        "ab",
    ),
    (
        "a used loopback port is a used address",
        "a@127.0.0.1:1 b@127.0.0.1:2",
        1,
        accept_all,
        "127.0.0.1:1",
        "b",
        "b",
    ),
    (
        "existing holders' addresses count as used",
        "a@10.0.0.4 b@10.0.1.5 c@10.0.2.6",
        1,
        accept_all,
        "10.0.0.4",
        "b",
        "b",
    ),
    (
        "a refusal is replaced by the best one left; its domain stays free",
        "a@10.0.0.4 b@10.0.0.4 c@10.0.1.5 d@10.0.2.6",
        2,
        refuse("a"),
        "",
        "cb",
        "acb",
    ),
    (
        "too few domains and refusals: every candidate asked once",
        "a@10.0.0.4 b@10.0.0.4 c@10.0.0.4",
        3,
        refuse("b"),
        "",
        "ac",
        "abc",
    ),
]


@pytest.mark.parametrize(
    ("candidates", "replicas", "answers", "used", "made", "order"),
    [c[1:] for c in DOMAIN_CASES],
    ids=[c[0] for c in DOMAIN_CASES],
)
def test_copies_go_to_distinct_failure_domains_first(
    candidates: str,
    replicas: int,
    answers: Callable[[Peer], bool],
    used: str,
    made: str,
    order: str,
) -> None:
    """Addresses, then networks, then zones holding fewest copies first; closest of equals."""
    domains = [at(f"x@{u}").domain for u in used.split()]
    got, asked = place([at(c) for c in candidates.split()], replicas, answers, used=domains)
    assert "".join(got) == made
    assert "".join(asked) == order


@pytest.mark.parametrize(
    ("host", "port", "domain"),
    [
        ("10.77.0.4", 4000, Domain("10.77.0.4", "10.77.0.0/24")),
        ("2001:db8:1:2:3::4", 4000, Domain("2001:db8:1:2::/64", "2001:db8:1::/48")),
        ("::ffff:10.77.0.4", 1, Domain("10.77.0.4", "10.77.0.0/24")),
        ("127.0.0.5", 4001, Domain("127.0.0.5:4001", "127.0.0.5:4001")),
        ("::1", 4001, Domain("::1:4001", "::1:4001")),
        ("peer.example", 4001, Domain("peer.example", "peer.example")),
    ],
)
def test_domain_of_an_address(host: str, port: int, domain: Domain) -> None:
    """An IPv4 address in its /24, an IPv6 /64 in its /48, a loopback port on its own."""
    assert domain_of(host, port) == domain


def test_spread_counts_distinct_addresses_networks_and_known_zones() -> None:
    """Two copies on one address and one elsewhere in its /24: 2 addresses, 1 network."""
    ds = [at(s).domain for s in ("a@10.0.0.4/z1", "b@10.0.0.4", "c@10.0.0.5/z1")]
    assert spread(ds) == (2, 1, 1)


@pytest.mark.parametrize(
    ("addresses", "shared"),
    [
        ([("10.0.0.4", 1), ("10.0.0.5", 1), ("10.0.1.4", 1)], False),
        ([("10.0.0.4", 1), ("10.0.0.4", 2), ("10.0.1.4", 1)], True),
        ([("2001:db8:0:1::1", 1), ("2001:db8:0:1::2", 1)], True),
        ([("127.0.0.1", 1), ("127.0.0.1", 2)], False),
        ([("10.0.0.4", 1)], False),
        ([], False),
    ],
)
def test_copies_sharing_an_address_are_under_spread(
    addresses: list[tuple[str, int]], shared: bool
) -> None:
    """Two copies on one address (or IPv6 /64; loopback ports apart) share a host."""
    assert shares_an_address(addresses) is shared


@pytest.mark.parametrize(
    ("copies", "replicas", "found", "warning"),
    [
        (3, 3, 11, None),
        (4, 3, 11, None),
        (2, 3, 2, "range 0..9 has 2 of 3 copies: only 2 peers could be asked"),
        (0, 1, 0, "range 0..9 has 0 of 1 copies: only 0 peers could be asked"),
    ],
)
def test_shortfall_warns_when_the_network_is_too_small(
    copies: int, replicas: int, found: int, warning: str | None
) -> None:
    """A range short of copies gets the warning place returns; a full one none."""
    assert shortfall(0, 9, copies, replicas, found) == warning


def test_range_key_is_the_hash_of_the_root_and_index() -> None:
    """Range i lives at BLAKE3(integrity || i)[:20]; ranges of one object differ."""
    root = IntegrityRoot(SegmentId(bytes(range(32))))
    assert range_key(root, 1) == bytes(segments.segment_hash(root + b"\0\0\0\1"))[:20]
    assert len({range_key(root, i) for i in range(16)}) == 16
