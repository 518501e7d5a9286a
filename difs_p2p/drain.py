"""The plan of a drain (a peer leaving for good hands its ranges over first). Pure.

A peer that leaves (``difs-peer leave``, or SIGTERM with ``--drain``) takes no new copies
and, for every range it holds, counts the *live* copies elsewhere: the other holders that
answered a probe that they hold the range (a silent holder, or one that says it does not
hold it, does not count). A range needs ``copies_needed`` more copies, pushed to the next
closest peers to its range key; it is handed over once it has its r copies elsewhere.
:class:`DrainProgress` does the accounting (ranges done, already safe, failed, bytes
moved) and says when the drain is over and whether the peer may exit
(:func:`may_exit`). The I/O shell is ``leaving.Drainer``.

Nothing is deleted by a drain: the peer's data directory stays as it was, so a drain that
is interrupted (Ctrl-C of ``leave``, a crash, kill -9) loses nothing, and one run again
skips the ranges that already have r copies elsewhere.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

from difs_p2p.classgen import field, valueclass

__all__ = [
    "LEAVING",
    "DrainProgress",
    "DrainState",
    "RangeRef",
    "alive_elsewhere",
    "copies_needed",
    "describe",
    "may_exit",
]

# The words of the refusal a leaving peer answers to new copies (hold, PUT_SEG, place),
# sent as BUSY: placement and repair move on to the next peer.
LEAVING = "this peer is leaving the network (draining): it takes no new copies"


class DrainState(enum.Enum):
    """Where a peer's drain stands (the ``state`` of the ``drain`` reply)."""

    IDLE = "idle"  # no drain asked in this run
    DRAINING = "draining"  # handing ranges and records over
    DONE = "done"  # every range has r live copies elsewhere: the peer exits
    INCOMPLETE = "incomplete"  # some range could not reach r copies: the peer stays
    CANCELLED = "cancelled"  # the operator stopped the drain: a normal peer again


# One range this peer holds: (name key hex, version, first segment, last segment).
RangeRef = tuple[str, int, int, int]


def copies_needed(replicas: int, alive_elsewhere: int) -> int:
    """Copies to make so that a range has ``replicas`` live copies on other peers."""
    return max(0, replicas - max(0, alive_elsewhere))


def describe(ref: RangeRef) -> str:
    """A range for people: ``key/v<version>/<start>..<end>`` (key shortened)."""
    key, version, start, end = ref
    return f"{key[:12]}/v{version}/{start}..{end}"


@valueclass(frozen=False)
class DrainProgress:
    """The accounting of one drain: started at ``started`` (seconds), ``total`` ranges."""

    started: float
    total: int = 0
    # ranges that had r live copies elsewhere before this drain touched them
    already: int = 0
    # ranges that got their missing copies from this drain
    handed: int = 0
    # ranges that could not reach r copies elsewhere, with why
    failed: dict[RangeRef, str] = field(default_factory=dict)
    # ranges held here that no published manifest covers (never published, or only
    # placed): nothing to hand over
    unpublished: int = 0
    bytes_moved: int = 0
    copies_made: int = 0
    records: int = 0
    finished_at: float | None = None

    def add_ranges(self, n: int) -> None:
        self.total += n

    def range_result(self, ref: RangeRef, replicas: int, alive: int, made: int) -> bool:
        """Count one range's outcome: ``alive`` live copies elsewhere before, ``made``
        copies this drain made. Whether the range is now handed over."""
        self.copies_made += made
        if alive >= replicas:
            self.already += 1
            return True
        if alive + made >= replicas:
            self.handed += 1
            return True
        self.failed[ref] = (
            f"{alive + made} of {replicas} live copies elsewhere "
            "(too few peers accept it: network too small, others full or leaving)"
        )
        return False

    def range_failed(self, ref: RangeRef, reason: str) -> None:
        self.failed[ref] = reason

    def range_unpublished(self) -> None:
        self.unpublished += 1

    def moved(self, n: int) -> None:
        self.bytes_moved += n

    @property
    def done(self) -> int:
        """Ranges dealt with, well or not."""
        return self.already + self.handed + len(self.failed) + self.unpublished

    @property
    def finished(self) -> bool:
        return self.finished_at is not None

    @property
    def complete(self) -> bool:
        """Finished with every range handed over (or safe already)."""
        return self.finished and not self.failed

    def finish(self, now: float) -> DrainState:
        self.finished_at = now
        return DrainState.DONE if not self.failed else DrainState.INCOMPLETE

    def seconds(self, now: float) -> float:
        end = self.finished_at if self.finished_at is not None else now
        return max(0.0, end - self.started)

    def summary(self, now: float) -> dict[str, Any]:
        return {
            "ranges": self.total,
            "done": self.done,
            "already_safe": self.already,
            "handed_over": self.handed,
            "unpublished": self.unpublished,
            "failed": sorted(f"{describe(r)}: {why}" for r, why in self.failed.items()),
            "bytes_moved": self.bytes_moved,
            "copies_made": self.copies_made,
            "records": self.records,
            "seconds": round(self.seconds(now), 3),
        }


def may_exit(state: DrainState, force: bool) -> bool:
    """Whether a peer whose drain ended in ``state`` stops: when every range is handed
    over, or with ``force`` also when some could not be."""
    return state is DrainState.DONE or (force and state is DrainState.INCOMPLETE)


def alive_elsewhere(
    holders: Sequence[bytes], answers: dict[bytes, bool | None], me: bytes
) -> list[bytes]:
    """The other holders of a range that answered a probe that they hold it: ``answers``
    maps a holder to True/False (its answer for this range) or None (silent). Holders
    not asked do not count, nor does ``me``."""
    return [h for h in dict.fromkeys(holders) if h != me and answers.get(h) is True]
