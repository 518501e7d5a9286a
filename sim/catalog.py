"""What has been published in a run: the simulator's ground truth about names and versions.

Every version that a publish completed is a :class:`StoredObject`: its signed manifest,
who published it and when, its ranges (from the manifest's stripes) with their range keys
and sizes, and, in the modelled modes, which peers hold each range. The :class:`Catalog`
keeps them by (name, version), each name's newest version, the names in publish order
(a ``[[crash]]`` event names one by that order) and each user's names (updates pick one).
"""

from __future__ import annotations

from dataclasses import dataclass

from difs_p2p.manifest import Manifest
from difs_p2p.names import NameKey
from difs_p2p.placement import RangeKey, range_key
from difs_p2p.segments import stripe_ranges


@dataclass(slots=True)
class StoredObject:
    """One published version of a name, and who holds each of its ranges."""

    manifest: Manifest
    user: int
    published: float
    during_split: bool
    # per range of the manifest's stripes: (first, last) segment, range key, bytes
    ranges: list[tuple[int, int]]
    range_keys: list[RangeKey]
    range_bytes: list[int]
    # per range: indexes of the peers holding it, and whether a repair is running
    holders: list[list[int]]
    repairing: list[bool]

    @classmethod
    def of(
        cls, manifest: Manifest, user: int, published: float, during_split: bool
    ) -> StoredObject:
        """The object ``manifest`` describes, with its ranges and nobody holding them yet."""
        m = manifest
        integrity = m.integrity
        ranges = stripe_ranges(m.segment_count, m.stripes)
        return cls(
            manifest=m,
            user=user,
            published=published,
            during_split=during_split,
            ranges=ranges,
            range_keys=[range_key(integrity, i) for i in range(len(ranges))],
            range_bytes=[
                min(m.size, (b + 1) * m.segment_size) - a * m.segment_size for a, b in ranges
            ],
            holders=[[] for _ in ranges],
            repairing=[False] * len(ranges),
        )

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def key(self) -> NameKey:
        return self.manifest.key

    @property
    def version(self) -> int:
        return self.manifest.version


class Catalog:
    """Every published version, each name's newest, the names in order and per user."""

    def __init__(self) -> None:
        self.objects: dict[tuple[str, int], StoredObject] = {}
        self.latest: dict[str, StoredObject] = {}
        self.names: list[str] = []
        self.names_of: dict[int, list[str]] = {}
        self._created = 0

    def new_name(self, user: int) -> str:
        """A name never used before, for a first publish by ``user``."""
        self._created += 1
        return f"/sim/u{user}/obj-{self._created}"

    def add(self, obj: StoredObject, *, new_name: bool) -> None:
        """``obj`` is published: it becomes its name's newest version."""
        self.objects[(obj.name, obj.version)] = obj
        if new_name:
            self.names.append(obj.name)
            self.names_of.setdefault(obj.user, []).append(obj.name)
        self.latest[obj.name] = obj

    def newest(self) -> list[StoredObject]:
        """The newest version of every name, in publish order of the names."""
        return [self.latest[n] for n in self.names]
