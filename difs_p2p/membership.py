"""Whether a peer is part of the network, and when and whom it asks to rejoin. No I/O.

A peer cut off from the others (a partition, a cable, a NAT that forgot it) sees its
contacts stop answering; the liveness pings evict them one by one, and its routing table
thins out or empties. :class:`Membership` keeps the decisions about that, fed the routing
table's size and the time by the DHT's rejoin loop (``dht.Dht._rejoin_loop``, the shell):

* the *state* (:func:`network_state`): ``ok``; ``thin`` when the table holds fewer than
  ``min(k, most_seen) * thin_share`` contacts (a quarter by default: 5 of k = 20); and
  ``isolated`` when it holds none. ``most_seen`` is the most contacts the table ever held
  at once, less the contacts that said they were leaving (a peer that shuts down cleanly
  sends ``leave``; a partition and a crash look alike: silence, which does not lower it).
  A peer that never saw another (a one-peer network) is ``ok``: it is cut off from nothing.
* when to try again: at once on becoming thin or isolated (or on knowing nobody at all,
  as after a restart during a partition: then it is not cut off from anything it knows
  of, so it stays ``ok``, but it keeps asking), then after a backoff that
  doubles from ``backoff_min`` up to ``backoff_max`` with jitter (half to all of it, so
  that the peers of a healed partition do not retry in step), and never gives up while the
  peer runs; ``ok`` with another peer known resets it.
* whom: the contacts recently evicted for not answering (exactly the ones a partition
  took away; the newest ``remembered`` are kept), then the ``--bootstrap`` peers, then
  the saved contacts (contacts.json), without duplicates or this peer's own address;
* how many key/value peers a publish must reach (:func:`publish_quorum`), and what a
  client makes of a cut-off entry peer's answer (:func:`cut_off_error`).
"""

from __future__ import annotations

import collections
from collections.abc import Iterable
from typing import TYPE_CHECKING

from difs_p2p.classgen import valueclass
from difs_p2p.errors import NetworkError

if TYPE_CHECKING:
    import random

__all__ = [
    "ISOLATED",
    "OK",
    "THIN",
    "Membership",
    "Transition",
    "cut_off_error",
    "network_state",
    "publish_quorum",
]

Address = tuple[str, int]

OK = "ok"
THIN = "thin"
ISOLATED = "isolated"


def network_state(size: int, most_seen: int, ksize: int, thin_share: float) -> str:
    """``ok``, ``thin`` or ``isolated`` for a routing table of ``size`` contacts that once
    held ``most_seen`` (see the module docstring)."""
    if most_seen <= 0:
        return OK
    if size <= 0:
        return ISOLATED
    if size < min(ksize, most_seen) * thin_share:
        return THIN
    return OK


def publish_quorum(most_seen: int, ksize: int) -> int:
    """How many of a name's key/value peers (this one included) a publish must reach for
    it to count: a quarter of those the network should have, rounded up, the share below
    which a routing table is thin. That is 6 where this peer once knew k = 20 others or
    more (the k closest and itself), fewer in a small network: the peers it has seen, not
    those it sees now, so a peer cut off from most of the network cannot publish alone
    before its table empties, and a one-peer network still can (1 of 1). Not a majority:
    under loss or load a write's lookup finds and reaches fewer than k peers, and a
    majority turned those publishes into failures."""
    expected = min(ksize, most_seen) + 1
    return (expected + 3) // 4


def cut_off_error(peer: Address, state: str, knows: int, most_seen: int) -> NetworkError | None:
    """What a client raises when its entry peer says it is cut off from the network
    (``thin`` or ``isolated`` in a ``resolve`` reply): what it found is not what the
    network holds (a newer version, the name itself, may be beyond the partition).
    None for ``ok`` (a peer that never saw another, a one-peer network, says ok)."""
    if state not in (THIN, ISOLATED):
        return None
    return NetworkError(
        f"the entry peer {peer[0]}:{peer[1]} knows {knows} others (it knew {most_seen}): "
        f"it is cut off from the network ({state}), so its answer may be stale; it keeps "
        "trying to rejoin (try again, or another peer)"
    )


@valueclass
class Transition:
    """The state changed from ``old`` to ``new`` with ``size`` contacts known."""

    old: str
    new: str
    size: int
    most_seen: int


class Membership:
    """The rejoin decisions of one peer (see the module docstring)."""

    def __init__(
        self,
        ksize: int,
        *,
        thin_share: float = 0.25,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        remembered: int = 64,
        rng: random.Random | None = None,
    ) -> None:
        self.ksize = ksize
        self.thin_share = thin_share
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.remembered = remembered
        if rng is None:
            import random  # here: a client that reads cut_off_error alone does not load it

            rng = random.Random()
        self.rng = rng
        self.size = 0
        self.most_seen = 0
        self.state = OK
        # rejoin attempts since the state left ok, and when the last and next one are
        self.attempts = 0
        self.last_attempt: float | None = None
        self.next_attempt: float | None = None
        # addresses of contacts evicted for not answering, oldest first (bounded)
        self._evicted: collections.OrderedDict[Address, None] = collections.OrderedDict()

    # -- events ----------------------------------------------------------------------------

    def observe(self, size: int, now: float) -> Transition | None:
        """The routing table holds ``size`` contacts at ``now``; the transition, if any."""
        self.size = size
        self.most_seen = max(self.most_seen, size)
        new = network_state(size, self.most_seen, self.ksize, self.thin_share)
        if new == self.state:
            self._schedule(now)
            return None
        old, self.state = self.state, new
        self._schedule(now)
        return Transition(old, new, size, self.most_seen)

    @property
    def seeking(self) -> bool:
        """Whether the peer looks for others: cut off, or knowing none at all (a peer
        that restarted while its network was out of reach keeps asking its saved
        contacts, though it is not cut off from anything it knows of)."""
        return self.state != OK or self.size == 0

    def _schedule(self, now: float) -> None:
        if not self.seeking:
            self.attempts = 0
            self.next_attempt = None
        elif self.next_attempt is None:
            self.next_attempt = now  # try at once

    def left(self, size: int) -> None:
        """A contact said it leaves the network: it no longer counts in ``most_seen``.
        ``size``: the contacts the table holds now that it is removed (the size last
        observed may be older: two leaves in a row would otherwise keep one counted)."""
        self.size = size
        self.most_seen = max(size, self.most_seen - 1)

    def evicted(self, address: Address) -> None:
        """A contact at ``address`` was evicted for not answering: remember it (newest)."""
        self._evicted.pop(address, None)
        self._evicted[address] = None
        while len(self._evicted) > self.remembered:
            self._evicted.popitem(last=False)

    def back(self, address: Address) -> None:
        """A contact at ``address`` answers again: it is no longer a lost one."""
        self._evicted.pop(address, None)

    def nothing_to_ask(self, now: float) -> None:
        """An attempt was due but nobody is known to ask (a one-peer network): look again
        after ``backoff_max``, without counting an attempt."""
        self.next_attempt = now + self.backoff_max

    def attempted(self, now: float) -> float:
        """A rejoin attempt started at ``now``; returns the delay before the next one."""
        self.attempts += 1
        self.last_attempt = now
        delay = min(self.backoff_max, self.backoff_min * 2.0 ** min(self.attempts - 1, 30))
        delay *= self.rng.uniform(0.5, 1.0)
        self.next_attempt = now + delay
        return delay

    # -- decisions -------------------------------------------------------------------------

    def due(self, now: float) -> bool:
        """Whether a rejoin attempt is due at ``now``."""
        return self.seeking and self.next_attempt is not None and now >= self.next_attempt

    @property
    def lost(self) -> list[Address]:
        """The remembered evicted addresses, newest first."""
        return list(reversed(self._evicted))

    def candidates(
        self,
        bootstrap: Iterable[Address],
        saved: Iterable[Address],
        *,
        known: Iterable[Address] = (),
        me: Address | None = None,
        limit: int = 64,
    ) -> list[Address]:
        """Whom to ask in a rejoin attempt: the lost contacts (newest first), then the
        ``bootstrap`` peers, then the ``saved`` contacts; not ``known`` ones (in the
        table) nor ``me``, each once, at most ``limit``."""
        skip = set(known)
        if me is not None:
            skip.add(me)
        out: list[Address] = []
        for address in [*self.lost, *bootstrap, *saved]:
            if address in skip:
                continue
            skip.add(address)
            out.append(address)
            if len(out) >= limit:
                break
        return out

    def as_dict(self) -> dict[str, object]:
        """The state for ``status``."""
        return {
            "network": self.state,
            "most_seen": self.most_seen,
            "rejoin_attempts": self.attempts,
            "last_rejoin": self.last_attempt,
            "next_rejoin": self.next_attempt if self.attempts or self.state != OK else None,
            "lost_remembered": len(self._evicted),
        }
