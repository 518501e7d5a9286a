"""The DHT's routing table and contacts, without sockets (a full bucket asks its protocol
to ping its oldest contact; nothing else here leads to I/O).

:class:`ExactRoutingTable` is the ``kademlia`` package's k-buckets with an exact
``find_neighbors`` (the library's stops after two empty buckets and returns ``[]`` while
contacts exist) and two indexes; :class:`Contact` is a peer as the rest of DIFS-P2P sees
it; ``valid_host``/``valid_address`` are the one check of an address a peer names before
anything is sent there. Only this module, :mod:`difs_p2p.dhtproto` and :mod:`difs_p2p.dht`
import ``kademlia``.
"""

from __future__ import annotations

import bisect
import functools
from collections.abc import Callable
from typing import Any, TypeGuard

from kademlia.node import Node
from kademlia.routing import RoutingTable

from difs_p2p.addresses import address_group, sendable_host
from difs_p2p.classgen import valueclass
from difs_p2p.identity import NodeId

KEY_SIZE = 20


@valueclass
class Contact:
    """A peer as the DHT knows it: its UDP address, and what its signed identify info
    says (docs/PROTOCOL.md, "identify"): its TCP port (0: not known yet, taken to be the
    UDP port's number) and its zone label ("" when none or not known)."""

    node_id: NodeId
    host: str
    port: int
    # real networks: the TCP port and zone from the identify info block
    tcp_port: int = 0
    # The operator's failure-domain label (``--zone``); empty: unknown (placement.py).
    zone: str = ""

    @property
    def address(self) -> tuple[str, int]:
        """The UDP (DHT) address."""
        return (self.host, self.port)

    @property
    def tcp_address(self) -> tuple[str, int]:
        """The address of the peer's segment service (TCP)."""
        return (self.host, self.tcp_port or self.port)


def is_id(value: object) -> TypeGuard[bytes]:
    """Whether ``value`` is a 20-byte node ID or key."""
    return isinstance(value, bytes) and len(value) == KEY_SIZE


@functools.lru_cache(maxsize=4096)
def valid_host(host: object) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address in text form that a datagram may go to.

    Anything else from a peer is refused before it reaches a socket: a host name would
    be resolved (blocking the loop, and letting a peer steer our resolver), and a string
    the socket layer cannot encode (a NUL byte) raises an error that is not an
    ``OSError``, which closes an asyncio datagram transport for good. Unspecified,
    multicast and broadcast addresses are refused too (``addresses.sendable_host``).
    Remembered: every contact of every reply is checked, and the same few hundred
    addresses come back again and again.
    """
    return isinstance(host, str) and len(host) <= 45 and sendable_host(host)


def valid_address(addr: object) -> bool:
    """Whether ``addr`` is an ``(IP address, port 1-65535)`` pair (``valid_host``)."""
    if not (isinstance(addr, tuple) and len(addr) == 2):
        return False
    host, port = addr
    return type(port) is int and 0 < port < 65536 and isinstance(host, str) and valid_host(host)


@functools.lru_cache(maxsize=4096)
def contact_of(node: Node) -> Contact:
    """The :class:`Contact` of a library ``Node``."""
    return Contact(node_id=NodeId(bytes(node.id)), host=str(node.ip), port=int(node.port))


class ExactRoutingTable(RoutingTable):  # type: ignore[misc]
    """The library's k-buckets, with an exact ``find_neighbors`` and two indexes.

    Unlike the library's, ``find_neighbors`` also returns a contact whose ID equals the
    target, so that a lookup of a peer's ID finds that peer.

    Every change to the buckets' contacts goes through ``add_contact``, ``remove_contact``,
    ``split_bucket`` or ``flush``; each compares the buckets it touched before and after
    (at most k contacts each) and updates two indexes of the table's contacts: their IDs
    in sorted order (``find_neighbors`` then collects the k nearest subtree by subtree,
    see ``_nearest_ids``, instead of reading the whole table) and how many there are per
    IP address (the per-IP cap reads one counter; an IPv6 address counts as its /64,
    :func:`address_group`). Replacement-cache entries are not contacts: they count once
    promoted (by a removal or a split).

    **Overflow.** A verified peer refused a bucket slot only by the per-IP cap is kept in
    ``overflow`` (at most ``overflow_max``, the least recently seen dropped first): never
    in a bucket, so the cap still bounds what one address holds of the routing table, but
    :meth:`closest_known` returns it (find_node replies, placement candidates) when it is
    among the closest, so peers beyond the cap can still hold copies.
    """

    # Most contacts kept in the overflow (DhtConfig.overflow_contacts; set by the protocol).
    overflow_max: int = 0

    def flush(self) -> None:
        super().flush()
        # the upper bound of each bucket's range, in bucket order (for get_bucket_for)
        self._uppers: list[int] = [b.range[1] for b in self.buckets]
        # sorted distinct IDs (as integers) of the contacts, and the contacts with each ID
        self._ids: list[int] = []
        self._members: dict[int, list[Node]] = {}
        self._per_ip: dict[str | None, int] = {}
        # verified peers over the per-IP cap, by ID, least recently seen first
        self.overflow: dict[bytes, Node] = {}

    # -- the indexes -----------------------------------------------------------------------

    def _index(self, node: Node) -> None:
        members = self._members.get(node.long_id)
        if members is None:
            members = self._members[node.long_id] = []
            bisect.insort(self._ids, node.long_id)
        members.append(node)
        group = address_group(node.ip)
        self._per_ip[group] = self._per_ip.get(group, 0) + 1

    def _unindex(self, node: Node) -> None:
        members = self._members[node.long_id]
        members.remove(node)
        if not members:
            del self._members[node.long_id]
            del self._ids[bisect.bisect_left(self._ids, node.long_id)]
        group = address_group(node.ip)
        left = self._per_ip[group] - 1
        if left:
            self._per_ip[group] = left
        else:
            del self._per_ip[group]

    def _reindex(self, before: dict[bytes, Node], after: dict[bytes, Node]) -> None:
        """The contacts of some buckets went from ``before`` to ``after`` (by ID)."""
        for nid, node in before.items():
            if after.get(nid) is not node:
                self._unindex(node)
        for nid, node in after.items():
            if before.get(nid) is not node:
                self._index(node)

    def contacts_at(self, ip: str | None) -> int:
        """How many contacts of the table have this IP address (IPv6: this /64)."""
        return self._per_ip.get(address_group(ip), 0)

    # -- the overflow ----------------------------------------------------------------------

    def add_overflow(self, node: Node) -> None:
        """Keep (or refresh) a verified peer that the per-IP cap kept out of the buckets."""
        if self.overflow_max <= 0 or not self.is_new_node(node):
            return
        self.overflow.pop(node.id, None)
        self.overflow[node.id] = node
        while len(self.overflow) > self.overflow_max:
            del self.overflow[next(iter(self.overflow))]

    def closest_known(
        self,
        node: Node,
        k: int | None = None,
        exclude: Node | None = None,
        per_group: Callable[[str | None], int | None] = lambda ip: None,
    ) -> list[Node]:
        """The ``k`` contacts and overflow peers closest to ``node``, closest first, at
        most ``per_group(ip)`` of them (None: no limit) per address group, so that a
        reply names no more peers of one address than a table could hold."""
        k = k or self.ksize
        if not self.overflow:
            # the buckets alone hold no more of one address than the cap
            return self.find_neighbors(node, k, exclude)
        target = node.long_id
        home = None if exclude is None else (exclude.ip, exclude.port)
        spare = [n for n in self.overflow.values() if (n.ip, n.port) != home]
        want = k
        while True:
            found = self.find_neighbors(node, want, exclude)
            # overflow peers beyond the farthest of ``want`` contacts cannot be in (unless
            # these are all the contacts: then the next pass is not coming)
            more = len(found) >= want and want < len(self._ids)
            far = found[-1].long_id ^ target if more else None
            found += [n for n in spare if far is None or n.long_id ^ target < far]
            found.sort(key=lambda n: n.long_id ^ target)
            out: list[Node] = []
            counts: dict[str | None, int] = {}
            for n in found:
                group = address_group(n.ip)
                limit = per_group(n.ip)
                if limit is not None and counts.get(group, 0) >= limit:
                    continue
                counts[group] = counts.get(group, 0) + 1
                out.append(n)
                if len(out) >= k:
                    return out
            if want >= len(self._ids):
                return out
            want *= 2

    # -- the library's table, with the indexes kept ----------------------------------------

    def get_bucket_for(self, node: Node) -> int | None:
        """The first bucket whose range's upper bound is above the ID (as the library's)."""
        index = bisect.bisect_right(self._uppers, node.long_id)
        return index if index < len(self._uppers) else None

    def split_bucket(self, index: int) -> None:
        before = dict(self.buckets[index].nodes)
        super().split_bucket(index)
        self._uppers[index : index + 1] = [
            self.buckets[index].range[1],
            self.buckets[index + 1].range[1],
        ]
        self._reindex(before, {**self.buckets[index].nodes, **self.buckets[index + 1].nodes})

    def remove_contact(self, node: Node) -> None:
        """Remove the contact with ``node``'s ID only if it is at ``node``'s address: a
        claim to the ID from another address (a forged ``leave``, a stale contact) does
        not remove the peer that holds it."""
        spare = self.overflow.get(node.id)
        if spare is not None and (spare.ip, spare.port) == (node.ip, node.port):
            del self.overflow[node.id]
        index = self.get_bucket_for(node)
        if index is None:
            return
        bucket = self.buckets[index]
        current = bucket.nodes.get(node.id)
        if current is None:
            current = bucket.replacement_nodes.get(node.id)
        if current is None or (current.ip, current.port) != (node.ip, node.port):
            return
        before = dict(bucket.nodes)
        bucket.remove_node(node)
        self._reindex(before, bucket.nodes)

    def add_contact(self, node: Node) -> None:
        """As the library's, but the ping of a full bucket's head is an owned task."""
        index = self.get_bucket_for(node)
        if index is None:
            return
        bucket = self.buckets[index]
        before = dict(bucket.nodes)
        added = bucket.add_node(node)
        self._reindex(before, bucket.nodes)
        if added:
            self.overflow.pop(node.id, None)  # in a bucket now
            return
        if bucket.has_in_range(self.node) or self._depth(bucket) % 5 != 0:
            self.split_bucket(index)
            self.add_contact(node)
        else:
            self.protocol.dht.spawn(self.protocol.call_ping(bucket.head()))

    @staticmethod
    def _depth(bucket: Any) -> int:
        """The library's ``KBucket.depth`` (bits shared by all its IDs) on integers.

        The prefix every ID shares is the one the smallest and the largest share.
        """
        ids: list[int] = [n.long_id for n in bucket.nodes.values()]
        return KEY_SIZE * 8 - (min(ids) ^ max(ids)).bit_length()

    def find_neighbors(
        self, node: Node, k: int | None = None, exclude: Node | None = None
    ) -> list[Node]:
        """The ``k`` contacts closest to ``node`` by XOR, closest first (as a full scan)."""
        k = k or self.ksize
        index = self.get_bucket_for(node)
        if index is not None:
            self.buckets[index].touch_last_updated()
        target = node.long_id
        want = k if exclude is None else k + 1  # the excluded address is usually one contact
        while True:
            found = [n for i in self._nearest_ids(target, want) for n in self._members[i]]
            if exclude is not None:
                home = (exclude.ip, exclude.port)
                found = [n for n in found if (n.ip, n.port) != home]
            if len(found) >= k or want >= len(self._ids):
                break
            want += k
        found.sort(key=lambda n: n.long_id ^ target)
        return found[:k]

    def _nearest_ids(self, target: int, count: int) -> list[int]:
        """The ``count`` contact IDs closest to ``target`` (all if fewer), in no order.

        The IDs sharing the target's bits above bit ``s`` (its subtree at ``s``) are one
        slice of the sorted IDs, and all of them are closer than any other ID. Take the
        smallest subtree holding ``count`` IDs: the half of it that holds the target has
        fewer, and all of those are in the answer; the rest are the closest in the other
        half, which is the same question for the target with bit ``s - 1`` flipped
        (XOR distances within that half keep their order).
        """
        ids = self._ids
        if count >= len(ids):
            return list(ids)
        out: list[int] = []
        a, b, shift = 0, len(ids), KEY_SIZE * 8
        while count > 0:
            # smallest s <= shift whose subtree holds count IDs (the one at shift does)
            lo, hi = 0, shift
            while lo < hi:
                mid = (lo + hi) // 2
                first = (target >> mid) << mid
                n = bisect.bisect_left(ids, first + (1 << mid), a, b) - bisect.bisect_left(
                    ids, first, a, b
                )
                if n >= count:
                    hi = mid
                else:
                    lo = mid + 1
            first = (target >> lo) << lo
            a = bisect.bisect_left(ids, first, a, b)
            b = bisect.bisect_left(ids, first + (1 << lo), a, b)
            if b - a == count:
                out.extend(ids[a:b])
                break
            # the target's half (fewer than count IDs) is in; go on in the other half
            half = lo - 1
            first = (target >> half) << half
            inner_a = bisect.bisect_left(ids, first, a, b)
            inner_b = bisect.bisect_left(ids, first + (1 << half), inner_a, b)
            out.extend(ids[inner_a:inner_b])
            count -= inner_b - inner_a
            if inner_a == a:
                a = inner_b
            else:
                b = inner_a
            target ^= 1 << half
            shift = half
        return out

    def all_contacts(self) -> list[Node]:
        return [n for bucket in self.buckets for n in bucket.nodes.values()]
