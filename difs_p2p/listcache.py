"""The folders a client has read for a listing, kept for its next pages (pure).

A folder's shards are in hash order, so any page of it needs the whole folder: without
this cache every page of a paged listing (the S3 API's ListObjectsV2, the gateway's folder
pages) re-reads every shard. ``FolderCache`` keeps each folder's names as read (sorted,
signatures checked as they are used) for ``ttl`` seconds, at most ``max_entries`` entries
in all (about 1 KB each as decoded), the least recently used folder dropped first. A
continued page (one with a token) may use a folder read up to ``ttl`` seconds ago: that
is the listing's staleness bound for a paged reader. A first page (no token) always
reads again, and a writer's own put or rm drops the folders it wrote to, so a writer
reads its own writes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Generic, TypeVar

from difs_p2p.classgen import valueclass

T = TypeVar("T")

# (owner fingerprint, folder): a folder's names are the same for plain and recursive
# listings, which read the folders below it one by one.
FolderKey = tuple[bytes, str]

# How long a continued page may use a folder read before (seconds).
LIST_CACHE_TTL = 10.0
# Entries kept in all, about 100 MB as decoded (a folder of more is never kept).
LIST_CACHE_ENTRIES = 100_000


@valueclass
class _Kept(Generic[T]):
    names: Sequence[T]
    read_at: float
    weight: int


class FolderCache(Generic[T]):
    """Folders' names as read, for ``ttl`` seconds, at most ``max_entries`` in all."""

    def __init__(self, ttl: float = LIST_CACHE_TTL, max_entries: int = LIST_CACHE_ENTRIES) -> None:
        self.ttl = ttl
        self.max_entries = max_entries
        self._kept: OrderedDict[FolderKey, _Kept[T]] = OrderedDict()
        self._entries = 0
        # Counts writes (invalidate, clear): a read begun before one is not kept.
        self.generation = 0

    def __len__(self) -> int:
        return len(self._kept)

    @property
    def entries(self) -> int:
        """The entries kept in all."""
        return self._entries

    def get(self, key: FolderKey, now: float) -> Sequence[T] | None:
        """The folder's names if read less than ``ttl`` seconds before ``now`` (a clock
        gone backwards counts as expired), else None (and it is dropped)."""
        kept = self._kept.get(key)
        if kept is None:
            return None
        if not 0 <= now - kept.read_at < self.ttl:
            self._drop(key)
            return None
        self._kept.move_to_end(key)
        return kept.names

    def put(self, key: FolderKey, names: Sequence[T], now: float, since: int, entries: int) -> None:
        """Keep the folder's names (``entries`` entries as read) as read at ``now`` by a
        read begun at ``generation`` ``since``, dropping the least recently used folders
        past ``max_entries``. Not kept: a folder of more than ``max_entries``, or a read
        a write has overtaken (it may have missed that write)."""
        self._drop(key)
        if entries > self.max_entries or since != self.generation:
            return
        self._kept[key] = _Kept(names, now, entries)
        self._entries += entries
        while self._entries > self.max_entries:
            self._drop(next(iter(self._kept)))

    def invalidate(self, owner: bytes, folders: Sequence[str]) -> None:
        """Forget these folders of ``owner`` (a write to them)."""
        self.generation += 1
        for folder in folders:
            self._drop((owner, folder))

    def clear(self) -> None:
        """Forget every folder (a write whose folders are not known)."""
        self.generation += 1
        self._kept.clear()
        self._entries = 0

    def _drop(self, key: FolderKey) -> None:
        kept = self._kept.pop(key, None)
        if kept is not None:
            self._entries -= kept.weight
