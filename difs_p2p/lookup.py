"""The iterative Kademlia lookup as a pure state machine: no sockets, no tasks, no clock.

:class:`Lookup` is built with the target, ``k``, ``alpha``, the starting contacts and
the kind of lookup (``find_node``, ``find_value`` or ``find_entries``). It is fed events
(:meth:`Lookup.reply`, :meth:`Lookup.timeout`, and the passing of time through
:meth:`Lookup.ask`) and answers which contacts to ask now, when it next needs waking
(a stall), whether it is done, and finally :meth:`Lookup.result`. The asyncio shell
(``Dht.lookup``) only sends the requests it is told to and feeds back what came.

The rules it decides:

* at most ``alpha`` requests in flight, and once no candidate is closer than the closest
  peer that answered, the remaining k closest are asked at once (the paper's last round);
* a request unanswered for the stall time frees its slot (it still counts if it answers
  later), and the lookup ends once only stalled requests are left: a dead contact costs
  the stall time, not the RPC timeout;
* a reply whose shape is wrong, or that names a contact that is not valid, counts as no
  answer (``dhtwire`` decides the shapes); contacts farther than the k closest are
  never asked;
* lookups over disjoint paths (S/Kademlia) share one ``claimed`` set: no peer is asked
  by two paths, and a path neither asks nor counts another path's peers.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

from difs_p2p.classgen import field, valueclass
from difs_p2p.dhtwire import (
    EntriesReply,
    ValueReply,
    decode_lookup_reply,
)
from difs_p2p.errors import WireError
from difs_p2p.identity import NodeId, distance
from difs_p2p.routing import Contact


@valueclass
class MorePages:
    """A find_entries reply that had further pages: who sent it, where the next page
    starts, the digest of the sender's whole entry set (None if it sent none) and the
    entries of the page it sent."""

    contact: Contact
    next: int
    digest: bytes | None
    first: list[bytes]


@valueclass(frozen=False)
class LookupResult:
    """What an iterative lookup found."""

    closest: list[Contact]
    values: list[tuple[Contact, bytes]] = field(default_factory=list)
    entries: list[bytes] = field(default_factory=list)
    rounds: int = 0
    queried: int = 0
    # requests that went unanswered for lookup_stall (the lookup went on without them)
    stalled: int = 0
    # most requests in flight at once (alpha, then up to k in the last round)
    peak_in_flight: int = 0
    # peers among the closest that answered without a value (read-repair targets)
    without_value: list[Contact] = field(default_factory=list)
    # find_entries replies that had more pages
    more_pages: list[MorePages] = field(default_factory=list)
    # peers asked for entries with the value that answered without a "value" key (peers
    # that predate the flag): whether they hold a record is unknown
    value_unknown: list[Contact] = field(default_factory=list)
    # the k closest of each disjoint path (lookup_paths), disjoint from one another
    paths: list[list[Contact]] = field(default_factory=list)


def merge(results: Sequence[LookupResult], key: bytes) -> LookupResult:
    """The lookups of the disjoint paths of one key as one result: ``closest`` the union
    of the paths' k closest, closest first; ``paths`` each path's."""
    merged = LookupResult(closest=[])
    for r in results:
        merged.closest.extend(r.closest)
        merged.values.extend(r.values)
        merged.entries.extend(r.entries)
        merged.without_value.extend(r.without_value)
        merged.more_pages.extend(r.more_pages)
        merged.value_unknown.extend(r.value_unknown)
        merged.queried += r.queried
        merged.stalled += r.stalled
        merged.peak_in_flight += r.peak_in_flight
        merged.rounds = max(merged.rounds, r.rounds)
    merged.closest.sort(key=lambda c: distance(c.node_id, key))
    merged.paths = [r.closest for r in results if r.closest]
    return merged


def deal_paths(known: Sequence[Contact], paths: int) -> list[list[Contact]]:
    """The starting contacts of each disjoint path: the known contacts (closest first)
    dealt round-robin; paths that get none are left out."""
    return [list(known[i::paths]) for i in range(paths) if known[i::paths]]


class RttEstimator:
    """Smoothed round trip and its deviation (Jacobson/Karels, as TCP's RFC 6298)."""

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0

    def observe(self, rtt: float) -> None:
        if self.srtt is None:
            self.srtt, self.rttvar = rtt, rtt / 2
        else:
            self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
            self.srtt = 0.875 * self.srtt + 0.125 * rtt

    def timeout(self, floor: float, cap: float) -> float:
        """srtt + 4 rttvar within [floor, cap]; ``cap`` before the first sample."""
        if self.srtt is None:
            return cap
        return min(cap, max(floor, self.srtt + 4 * self.rttvar))


class Lookup:
    """One iterative lookup (one path of a disjoint lookup). See the module docstring.

    ``me`` is the asking peer's ID (never asked); ``stall`` the time after which an
    unanswered request frees its slot; ``claimed`` the set shared by the paths of a
    disjoint lookup (None: a lone lookup); ``with_value`` asks find_entries for the
    record too; ``limit`` the most contacts a reply may name (2 k).
    """

    def __init__(
        self,
        target: bytes,
        rpc: str,
        start: Iterable[Contact],
        *,
        k: int,
        alpha: int,
        stall: float,
        me: NodeId,
        claimed: set[NodeId] | None = None,
        with_value: bool = False,
        limit: int | None = None,
    ) -> None:
        if rpc not in ("find_node", "find_value", "find_entries"):
            raise ValueError(f"not a lookup request: {rpc!r}")
        self.target, self.rpc, self.k, self.alpha = target, rpc, k, alpha
        self.stall, self.me, self.with_value = stall, me, with_value
        self.limit = 2 * k if limit is None else limit
        self._goal = int.from_bytes(target, "big")
        self._shortlist: dict[NodeId, Contact] = {}
        # (distance, id) of every shortlist entry, kept sorted (IDs differ, so distances do)
        self._order: list[tuple[int, NodeId]] = []
        for c in start:
            if c.node_id != me:
                if c.node_id not in self._shortlist:
                    bisect.insort(self._order, (self._dist(c), c.node_id))
                self._shortlist[c.node_id] = c
        self._contacted: set[NodeId] = set()
        self._lone = claimed is None
        self._taken = self._contacted if claimed is None else claimed
        self._responded: dict[NodeId, Contact] = {}
        # requests in flight: contact id -> when it stops holding a slot
        self._stalls_at: dict[NodeId, float] = {}
        self._late: set[NodeId] = set()
        # the distance of the closest peer that answered
        self._best: int | None = None
        self._depth: dict[NodeId, int] = dict.fromkeys(self._shortlist, 1)
        self._result = LookupResult(closest=[])
        self._done = False

    def _dist(self, c: Contact) -> int:
        return int.from_bytes(c.node_id, "big") ^ self._goal

    # -- what to do --------------------------------------------------------------------------

    def _active(self) -> list[NodeId]:
        return [i for i in self._stalls_at if i not in self._late]

    def _candidates(self) -> list[Contact]:
        """Not yet asked among the k closest of the shortlist that this path may use."""
        if self._lone:
            head = self._order[: self.k]
            return [self._shortlist[i] for _, i in head if i not in self._contacted]
        out: list[Contact] = []
        usable = 0
        for _, i in self._order:
            mine = i in self._contacted
            if i in self._taken and not mine:
                continue  # another path's
            if not mine:
                out.append(self._shortlist[i])
            usable += 1
            if usable >= self.k:
                break
        return out

    def ask(self, now: float) -> list[Contact]:
        """The contacts to send a request to now (each at most once per lookup).

        Requests whose stall time has passed free their slots first. When nothing is
        left to ask and only stalled requests remain, the lookup is done.
        """
        if self._done:
            return []
        for i, at in self._stalls_at.items():
            if now >= at:
                self._late.add(i)
        active = len(self._active())
        waiting = self._candidates()
        # The paper's last round: once no candidate is closer than the closest peer that
        # answered, ask all remaining k closest at once, not alpha.
        closing = self._best is not None and (not waiting or self._dist(waiting[0]) > self._best)
        width = self.k if closing else self.alpha
        send = waiting[: max(0, width - active)]
        for c in send:
            self._contacted.add(c.node_id)
            self._taken.add(c.node_id)
            self._stalls_at[c.node_id] = now + self.stall
            self._result.queried += 1
        active += len(send)
        self._result.peak_in_flight = max(self._result.peak_in_flight, active)
        if not active:
            self._done = True  # nothing left to ask but stalled requests: done without them
        return send

    @property
    def done(self) -> bool:
        return self._done

    def wake_at(self) -> float | None:
        """When the next request in flight stalls (None: none is in flight)."""
        times = [self._stalls_at[i] for i in self._active()]
        return min(times) if times else None

    def in_flight(self) -> int:
        """Requests sent and not yet answered or failed, stalled ones included."""
        return len(self._stalls_at)

    # -- events -------------------------------------------------------------------------------

    def stalled(self, contact: Contact) -> None:
        """The request to ``contact`` went unanswered for the stall time: its slot is
        free (``ask`` does this by itself when given a later ``now``)."""
        if contact.node_id in self._stalls_at:
            self._late.add(contact.node_id)

    def timeout(self, contact: Contact) -> None:
        """The request to ``contact`` failed (no answer, or it could not be sent): the
        contact leaves the shortlist (a later reply naming it adds it back, but it is
        never asked again)."""
        if self._stalls_at.pop(contact.node_id, None) is None:
            return
        if self._shortlist.pop(contact.node_id, None) is not None:
            i = bisect.bisect_left(self._order, (self._dist(contact), contact.node_id))
            del self._order[i]

    def reply(self, contact: Contact, body: object, now: float = 0.0) -> None:
        """``contact`` answered with ``body`` (as the datagram decoder gave it). A body
        of the wrong shape counts as no answer (``timeout``)."""
        del now  # the machine needs no time for a reply; the shell measures round trips
        if contact.node_id not in self._stalls_at:
            return  # not a request of this lookup, or already answered
        try:
            decoded = decode_lookup_reply(self.rpc, body, self.limit)
        except WireError:
            self.timeout(contact)
            return
        del self._stalls_at[contact.node_id]
        nodes = self._absorb(contact, decoded)
        self._responded[contact.node_id] = contact
        if self._best is None or self._dist(contact) < self._best:
            self._best = self._dist(contact)
        for n in nodes:
            if n.node_id != self.me and n.node_id not in self._shortlist:
                self._shortlist[n.node_id] = n
                bisect.insort(self._order, (self._dist(n), n.node_id))
                self._depth[n.node_id] = self._depth.get(contact.node_id, 1) + 1

    def _absorb(
        self, contact: Contact, reply: list[Contact] | ValueReply | EntriesReply
    ) -> list[Contact]:
        """Take one decoded reply into the result; the contacts it names."""
        result = self._result
        if isinstance(reply, ValueReply):
            result.values.append((contact, reply.value))
            return []
        if isinstance(reply, list):
            return reply
        if self.with_value and not reply.has_value:
            result.value_unknown.append(contact)
        elif self.with_value and reply.value is not None:
            result.values.append((contact, reply.value))
        result.entries.extend(reply.entries)
        nxt = reply.next
        if nxt > 0 or (nxt == 0 and self.with_value):
            result.more_pages.append(MorePages(contact, nxt, reply.digest, reply.entries))
        return reply.nodes

    # -- the answer ---------------------------------------------------------------------------

    def result(self) -> LookupResult:
        """What the lookup found: the k closest that answered, closest first, and what
        they held. Requests still in flight count as stalled."""
        result = self._result
        result.stalled = len(self._late)
        ordered = sorted(self._responded.values(), key=self._dist)[: self.k]
        result.rounds = max((self._depth.get(c.node_id, 1) for c in ordered[:1]), default=0)
        result.closest = ordered
        have = {c.node_id for c, _ in result.values}
        have.update(c.node_id for c in result.value_unknown)
        result.without_value = [c for c in result.closest if c.node_id not in have]
        return result
