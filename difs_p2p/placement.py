"""Where the copies of a range go: pure placement decisions, no I/O.

Range ``i`` of an object lives on the peers closest to its *range key*,
``BLAKE3(integrity || i)[:20]`` (:func:`range_key`). Placing a range (the entry peer's
``place``, a holder's repair, the simulator) looks up the closest peers to that key
(``Dht.closest(rkey, r + 8)``: those that answered first, late ones after) and asks them
for the copies still missing (:func:`choose_targets`): as many at once as copies are
missing, each peer at most once, never one that already holds the range; a peer that
refuses (no space) or fails is replaced by the next candidate. When the candidates run out
first, the network is too small for r copies (:func:`shortfall`: the warning ``place``
returns).

**Failure domains first.** Every candidate has a :class:`Domain` (:func:`domain_of`): its
address (an IPv4 address, or an IPv6 /64: what one host or one attacker's machine
usually has), its network (the IPv4 /24 or IPv6 /48) and its zone (the ``--zone`` label
its operator gave it; empty is unknown and shares nothing). The copies of a range go to
distinct domains before any domain takes a second one: each pick is the candidate whose
address, then network, then zone holds the fewest copies already (existing holders and
earlier picks count), the closest of equal ones. So a second copy lands on an address
that has one only when no candidate on a new address is left. Addresses and networks
rank before zones because they are observed (a contact proved it receives at its
address), while a zone is the peer's own claim: peers on one address that claim many
zones still get one copy per range while other addresses exist.

Loopback addresses (127.0.0.0/8, ::1) are where local networks and tests run every peer
on one address: there each port is its own address and network.

The entry peer is a candidate like any other: it keeps a copy only where placement picks
it among the closest peers that accept.

A range key is a :data:`RangeKey`, its own id type: the DHT takes it as a plain ``bytes``
key like a name key or a node ID, but a name key is not accepted where a range key is.
"""

from __future__ import annotations

import ipaddress
from collections import Counter
from collections.abc import Iterable, Sequence, Set
from typing import NewType, Protocol, TypeVar

from difs_p2p import segments
from difs_p2p.classgen import valueclass
from difs_p2p.identity import NodeId

__all__ = [
    "Candidate",
    "Domain",
    "RangeKey",
    "chain_key",
    "choose_targets",
    "domain_of",
    "range_key",
    "shares_an_address",
    "shortfall",
    "spread",
]

RangeKey = NewType("RangeKey", bytes)
"""Where the copies of one range of an object go (20 bytes, :func:`range_key`)."""


class Candidate(Protocol):
    """A peer found by a lookup (``routing.Contact``; the simulator's contacts too)."""

    @property
    def node_id(self) -> NodeId: ...

    @property
    def host(self) -> str: ...

    @property
    def port(self) -> int: ...

    @property
    def zone(self) -> str: ...


C = TypeVar("C", bound=Candidate)


@valueclass
class Domain:
    """The failure domains of one peer: a copy on another peer of the same ``address``
    dies with the same host, of the same ``network`` with the same link, of the same
    ``zone`` (when not empty) with the same site."""

    address: str
    network: str
    zone: str = ""


def domain_of(host: str, port: int, zone: str = "") -> Domain:
    """The failure domains of a peer at ``host:port`` in ``zone``.

    An IPv4 address is its own address in its /24; an IPv6 address counts as its /64 in
    its /48 (an IPv4-mapped one as the IPv4 address). On loopback each port is its own
    address and network. A host that is not an IP address (never from the DHT, whose
    contacts are checked) is its own address and network.
    """
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return Domain(host, host, zone)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_loopback:
        here = f"{ip.compressed}:{port}"
        return Domain(here, here, zone)
    if isinstance(ip, ipaddress.IPv4Address):
        net = ipaddress.IPv4Network((int(ip) >> 8 << 8, 24))
        return Domain(str(ip), str(net), zone)
    return Domain(
        str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64))),
        str(ipaddress.IPv6Network((int(ip) >> 80 << 80, 48))),
        zone,
    )


def _domain(c: Candidate) -> Domain:
    return domain_of(c.host, c.port, c.zone)


def range_key(integrity: segments.IntegrityRoot, index: int) -> RangeKey:
    """Where range ``index`` of an object lives: the peers closest to this key."""
    return RangeKey(bytes(segments.segment_hash(integrity + index.to_bytes(4, "big")))[:20])


def chain_key(key: bytes, version: int, index: int) -> RangeKey:
    """Where range ``index`` of version ``version`` of the name key ``key`` is placed by a
    chain upload: known before the object's integrity root (nothing reads it back)."""
    tag = b"difs-chain-v1" + bytes(key) + version.to_bytes(8, "big") + index.to_bytes(4, "big")
    return RangeKey(bytes(segments.segment_hash(tag))[:20])


class _Used:
    """How many copies each address, network and zone holds."""

    def __init__(self, domains: Iterable[Domain]) -> None:
        self.addresses: Counter[str] = Counter()
        self.networks: Counter[str] = Counter()
        self.zones: Counter[str] = Counter()
        for d in domains:
            self.add(d)

    def add(self, d: Domain) -> None:
        self.addresses[d.address] += 1
        self.networks[d.network] += 1
        if d.zone:
            self.zones[d.zone] += 1

    def rank(self, d: Domain) -> tuple[int, int, int]:
        return (self.addresses[d.address], self.networks[d.network], self.zones[d.zone])


def choose_targets(
    candidates: Sequence[C],
    missing: int,
    asked: Set[NodeId] = frozenset(),
    used: Iterable[Domain] = (),
) -> list[C]:
    """The peers to ask now for ``missing`` more copies of a range.

    ``candidates`` come from a lookup of the range key, best first; ``asked`` are the
    node IDs not to ask (again): peers asked already (they made a copy, refused or failed),
    holders already present, peers known dead; ``used`` the domains of the copies that
    exist (holders present, copies made so far). Each pick is the candidate whose domains
    hold the fewest copies (address, then network, then zone; earlier picks count), the
    closest of equals (the module docstring). The result is at most ``missing``
    candidates, not in ``asked`` and without duplicates, in the order picked; empty when
    no copy is missing or no candidate is left (then :func:`shortfall` says so).
    """
    counts = _Used(used)
    left: list[tuple[C, Domain]] = []
    seen = set(asked)
    for c in candidates:
        if c.node_id not in seen:
            seen.add(c.node_id)
            left.append((c, _domain(c)))
    chosen: list[C] = []
    while len(chosen) < missing and left:
        best = min(range(len(left)), key=lambda i: (counts.rank(left[i][1]), i))
        c, d = left.pop(best)
        counts.add(d)
        chosen.append(c)
    return chosen


def spread(domains: Iterable[Domain]) -> tuple[int, int, int]:
    """How many distinct addresses, networks and (known) zones hold a range's copies."""
    ds = list(domains)
    return (
        len({d.address for d in ds}),
        len({d.network for d in ds}),
        len({d.zone for d in ds if d.zone}),
    )


def shares_an_address(addresses: Iterable[tuple[str, int]]) -> bool:
    """Whether some of the copies at these ``(host, port)`` addresses are on one address
    (:func:`domain_of`): the range is under-spread, one host failure loses two copies."""
    ds = [domain_of(host, port) for host, port in addresses]
    return spread(ds)[0] < len(ds)


def shortfall(start: int, end: int, copies: int, replicas: int, found: int) -> str | None:
    """The warning for a range that got fewer than ``replicas`` copies from the ``found``
    candidates of its lookup (the network is too small, or they refused), or None."""
    if copies >= replicas:
        return None
    return (
        f"range {start}..{end} has {copies} of {replicas} copies: only {found} peers could be asked"
    )
