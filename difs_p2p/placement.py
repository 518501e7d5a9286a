"""Where the copies of a range go: pure placement decisions, no I/O.

Range ``i`` of an object lives on the peers closest to its *range key*,
``BLAKE3(integrity || i)[:20]`` (:func:`range_key`). Placing a range (the entry peer's
``place``, a holder's repair, the simulator) looks up the closest peers to that key
(``Dht.closest(rkey, r + 8)``: those that answered first, late ones after) and asks them in
that order for the copies still missing (:func:`choose_targets`): as many at once as copies
are missing, each peer at most once, never one that already holds the range; a peer that
refuses (no space) or fails is replaced by the next candidate. When the candidates run out
first, the network is too small for r copies (:func:`shortfall`: the warning ``place``
returns).

The entry peer is a candidate like any other: it keeps a copy only where it is among the
closest peers that accept.

A range key is a :data:`RangeKey`, its own id type: the DHT takes it as a plain ``bytes``
key like a name key or a node ID, but a name key is not accepted where a range key is.
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from typing import NewType, Protocol, TypeVar

from difs_p2p import segments
from difs_p2p.identity import NodeId

__all__ = ["Candidate", "RangeKey", "choose_targets", "range_key", "shortfall"]

RangeKey = NewType("RangeKey", bytes)
"""Where the copies of one range of an object go (20 bytes, :func:`range_key`)."""


class Candidate(Protocol):
    """A peer found by a lookup (``dht.Contact``; the simulator's contacts too)."""

    @property
    def node_id(self) -> NodeId: ...


C = TypeVar("C", bound=Candidate)


def range_key(integrity: segments.IntegrityRoot, index: int) -> RangeKey:
    """Where range ``index`` of an object lives: the peers closest to this key."""
    return RangeKey(bytes(segments.segment_hash(integrity + index.to_bytes(4, "big")))[:20])


def choose_targets(
    candidates: Sequence[C], missing: int, asked: Set[NodeId] = frozenset()
) -> list[C]:
    """The peers to ask now for ``missing`` more copies of a range.

    ``candidates`` come from a lookup of the range key, best first; ``asked`` are the
    node IDs not to ask (again): peers asked already (they made a copy, refused or failed),
    holders already present, peers known dead. The result is the first ``missing``
    candidates, in order, not in ``asked`` and without duplicates; empty when no copy is
    missing or no candidate is left (then :func:`shortfall` says so).
    """
    chosen: list[C] = []
    seen = set(asked)
    for c in candidates:
        if len(chosen) >= missing:
            break
        if c.node_id not in seen:
            seen.add(c.node_id)
            chosen.append(c)
    return chosen


def shortfall(start: int, end: int, copies: int, replicas: int, found: int) -> str | None:
    """The warning for a range that got fewer than ``replicas`` copies from the ``found``
    candidates of its lookup (the network is too small, or they refused), or None."""
    if copies >= replicas:
        return None
    return (
        f"range {start}..{end} has {copies} of {replicas} copies: only {found} peers could be asked"
    )
