"""Content-addressed segment storage on disk.

Layout of a store directory::

    ROOT/segments/ab/cd/abcd...   one file per segment, named by the hex of its 32-byte id
    ROOT/tmp/                     writes in progress (emptied on open)
    ROOT/quarantine/              files that failed verification, kept for inspection
    ROOT/index.sqlite3            segments(id, size, stored_at), refs(id, owner) and
                                  pending(id, session, since)
    ROOT/lock                     held (flock) while a store object has the directory open

Placement, index and verification are kept apart:

* **placement** and **writes**: :class:`~difs_p2p.segfiles.SegmentFiles` (a segment's
  path comes from its id alone; writes go to ``tmp/``, are fsynced, renamed into place and
  the directory fsynced before the index row is inserted, so a crash never leaves a row
  for a partial file);
* **index**: :class:`~difs_p2p.segindex.SegmentIndex`, sqlite in WAL mode. The in-memory
  ``used`` total is loaded from it on open; it is what the segments are charged
  (:class:`~difs_p2p.diskcost.DiskCost`), and capacity is checked against it, with the
  space reserved, before any byte is written;
* **verification**: a whole-segment ``read`` checks the hash, ``check()`` rehashes
  everything; a damaged file is moved to ``quarantine/`` and its row dropped, while its
  refs stay so the owner can still find that it needs a good copy.

``refs`` records who needs a segment (an opaque owner tag, e.g. name key + version), for
garbage collection: ``drop_refs(owner)`` returns the segments nobody needs any more, and
``release(owner)`` drops the refs and deletes those segments at once.

``pending`` records the upload sessions (an opaque session tag, e.g. one per connection)
that stored a segment and have not placed it yet. A segment is *kept* while it has a ref or
a pending row; one with neither is an *orphan*. ``end_session`` drops a session's pending
rows and deletes the segments that become orphans at once (a failed or abandoned upload);
``collect_orphans`` deletes orphans stored before a cut-off (a grace time), which catches
what a crash left: sessions do not survive a restart, so opening the store drops every
pending row, and files re-indexed on open have no row at all. A sweep looks only at
candidates kept in memory (what nothing kept at open, segments stored without a keeper,
ids left by ``drop_refs`` or by pending rows of ended sessions), never the whole index.

Uploads are stored with ``put_grouped``: a group commit, where the segments that threads
write at the same time share their directory fsyncs and one index transaction.

The module is longer than most (about 720 lines): the space accounting is guarded by one
lock and changed by plain writes, group commits, refs, upload sessions and the orphan
sweep alike, so they stay in one class beside it.

The API is synchronous and thread-safe; the peer calls it through ``asyncio.to_thread``.
One lock (the index database's) guards the sqlite connection and the space accounting;
hashing and file I/O run outside it. Errors from the OS and sqlite are translated: no
space -> ``CapacityError``, anything else -> ``StorageError``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from types import TracebackType

from difs_p2p.classgen import field, valueclass
from difs_p2p.diskcost import DiskCost
from difs_p2p.errors import CapacityError, IntegrityError, NotFoundError, UsageError
from difs_p2p.segfiles import SegmentFiles, as_bytes_view, blake3_digest, check_id, short
from difs_p2p.segindex import SegmentIndex

__all__ = ["CheckReport", "Orphans", "SegmentStore"]

log = logging.getLogger(__name__)

# Orphans deleted per lock hold by collect_orphans, so that other calls get a turn.
_COLLECT_BATCH = 256


@valueclass
class Orphans:
    """Segments no ref keeps: still pending in an upload session, or orphaned (waiting to
    be collected). Bytes are as charged."""

    pending: int
    pending_bytes: int
    orphaned: int
    orphaned_bytes: int


@valueclass(frozen=False)
class _Grouped:
    """A segment waiting for its group commit, and its result once the group is written."""

    seg_id: bytes
    view: memoryview
    owner: bytes | None
    session: bytes | None
    done: bool = False
    result: bool | BaseException = False


# Segments written as one group commit at most (the rest wait for the next group).
_GROUP_MAX = 64


@valueclass
class CheckReport:
    """What ``SegmentStore.check`` found: every indexed segment is ok, corrupt or missing."""

    checked: int
    ok: int
    corrupt: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)


class SegmentStore:
    """Segments on disk under ``root``, at most ``capacity`` bytes of them."""

    def __init__(self, root: Path, capacity: int, *, cost: DiskCost | None = None) -> None:
        if capacity < 0:
            raise UsageError(f"capacity must not be negative, got {capacity}")
        self.root = Path(root)
        self._capacity = capacity
        self._cost = cost or DiskCost()
        self._writing: set[bytes] = set()
        self._reserved = 0
        self._closed = False
        self._files = SegmentFiles(self.root)
        try:
            self._index = SegmentIndex(self.root / "index.sqlite3")
            try:
                self._recover()
                with self._index.db.sql("loading the segment index"):
                    self._used, self._count = self._index.totals(self._cost)
                    # what nothing keeps now is collected a grace time after it was stored
                    self._candidates: dict[bytes, float] = self._index.unneeded()
            except BaseException:
                self._index.close()
                raise
        except BaseException:
            self._files.close()
            raise
        self._db = self._index.db
        # Signalled when a write finishes, for puts waiting on the same id.
        self._written = threading.Condition(self._db.lock)
        # group commit (put_grouped): segments waiting, and whether a group is being written
        self._group = threading.Condition(threading.Lock())
        self._group_queue: list[_Grouped] = []
        self._group_busy = False
        log.info(
            "store opened root=%s segments=%d used=%d capacity=%d",
            self.root,
            self._count,
            self._used,
            capacity,
        )

    def _recover(self) -> None:
        """Reconcile the index with the files on disk (see ``SegmentFiles.recover``)."""
        index = self._index
        with index.db.sql("reading the segment index"):
            indexed = index.sizes()
        added, dropped = self._files.recover(indexed)
        now = time.time()
        with index.db.sql("repairing the segment index"), index.db.transaction():
            index.insert((seg_id, size, now) for seg_id, size in added)
            index.delete(dropped)
            # Upload sessions end with the process that served them: what they left
            # unplaced is orphaned, and collected a grace time after it was stored.
            stale = index.end_all_sessions()
        if stale > 0:
            log.info("store dropped pending uploads of a previous run rows=%d", stale)
        if added or dropped:
            log.warning(
                "store recovered root=%s reindexed=%d dropped=%d",
                self.root,
                len(added),
                len(dropped),
            )

    # -- helpers ----------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"segment store {self.root} is closed")

    def _drop_row_locked(self, seg_id: bytes) -> int:
        """Forget a segment's row (not its refs); the bytes it accounted for."""
        size = self._index.size(seg_id)
        if size is None:
            return 0
        self._index.delete([seg_id])
        charged = self._cost.charge(size)
        self._used -= charged
        self._count -= 1
        return charged

    def _quarantine(self, seg_id: bytes, inode: int | None, reason: str) -> None:
        """Move a damaged segment aside and drop its row.

        ``inode`` is the file that was found damaged: if the path now holds another file
        (a good copy written since), it is left alone.
        """
        with self._db.locked("dropping a damaged segment"):
            if self._closed:
                return
            if self._files.quarantine(seg_id, inode, reason):
                self._drop_row_locked(seg_id)

    # -- properties -------------------------------------------------------------------------

    @property
    def capacity(self) -> int:
        """The most segment bytes this store accepts."""
        return self._capacity

    @property
    def used(self) -> int:
        """What the stored segments are charged (as indexed; see :class:`DiskCost`)."""
        return self._used

    @property
    def cost(self) -> DiskCost:
        """How segments are charged against the capacity."""
        return self._cost

    def charge(self, size: int) -> int:
        """What a segment of ``size`` bytes is charged against the capacity."""
        return self._cost.charge(size)

    @property
    def count(self) -> int:
        """Number of stored segments."""
        return self._count

    # -- writing ----------------------------------------------------------------------------

    def put(
        self,
        seg_id: bytes,
        data: bytes | bytearray | memoryview,
        owner: bytes | None = None,
        session: bytes | None = None,
    ) -> bool:
        """Store a segment after checking that ``seg_id`` is the BLAKE3 of ``data``.

        Returns False if it was already stored (``owner``'s ref and ``session``'s pending
        row are added all the same). Raises IntegrityError on a hash mismatch and
        CapacityError when the capacity or the disk is full; in both cases nothing is
        written.
        """
        return self.put_many([(seg_id, data)], owner, session) == 1

    def put_many(
        self,
        items: Sequence[tuple[bytes, bytes | bytearray | memoryview]],
        owner: bytes | None = None,
        session: bytes | None = None,
        *,
        hashed: bool = False,
    ) -> int:
        """Store several segments at once; the number newly stored.

        All or nothing: every hash is checked and the space for all new segments reserved
        before the first write. Each touched directory is fsynced once and the index is
        updated in one transaction, which makes this the fast path for many small segments.
        ``hashed``: every id was computed in this process from these very bytes (never
        one from a peer or a client), so it is not computed again.
        """
        self._check_open()
        batch: dict[bytes, memoryview] = {}
        for i, (raw_id, data) in enumerate(items):
            seg_id = check_id(raw_id)
            view = as_bytes_view(data)
            if not hashed and blake3_digest(view) != seg_id:
                where = f" (item {i})" if len(items) > 1 else ""
                raise IntegrityError(
                    f"segment {short(seg_id)}{where} does not match its BLAKE3 hash"
                )
            batch.setdefault(seg_id, view)
        if owner is not None:
            owner = bytes(owner)
        if session is not None:
            session = bytes(session)

        new = self._claim(batch, owner, session)
        need = sum(self._cost.charge(len(batch[seg_id])) for seg_id in new)
        placed: list[str] = []
        try:
            self._files.write_all(new, batch, placed)
            self._index_batch(new, batch, owner, session, need)
        except BaseException:
            for path in placed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            with self._written:
                self._reserved -= need
                self._writing.difference_update(new)
                self._written.notify_all()
            raise
        if new:
            log.debug("segments stored count=%d bytes=%d", len(new), need)
        return len(new)

    def put_grouped(
        self,
        seg_id: bytes,
        data: bytes | bytearray | memoryview,
        owner: bytes | None = None,
        session: bytes | None = None,
    ) -> bool:
        """``put`` as part of a group commit (for callers in many threads at once, as the
        peer's uploads are): the hash is checked in the calling thread, then the first
        caller to find no group being written writes every segment waiting as one group
        (``SegmentFiles.write_group``: one fsync per directory for the group) and indexes
        them in one transaction; the others wait for the group that holds theirs. Returns
        and raises as ``put`` does, once this segment is durable and indexed."""
        self._check_open()
        seg_id = check_id(seg_id)
        view = as_bytes_view(data)
        if blake3_digest(view) != seg_id:
            raise IntegrityError(f"segment {short(seg_id)} does not match its BLAKE3 hash")
        item = _Grouped(
            seg_id,
            view,
            bytes(owner) if owner is not None else None,
            bytes(session) if session is not None else None,
        )
        with self._group:
            self._group_queue.append(item)
            while not item.done:
                if self._group_busy:
                    self._group.wait()
                    continue
                self._group_busy = True
                batch = self._group_queue[:_GROUP_MAX]
                del self._group_queue[:_GROUP_MAX]
                self._group.release()
                try:
                    results = self._commit_group(batch)
                except BaseException as exc:
                    results = [exc] * len(batch)
                finally:
                    self._group.acquire()
                for grouped, result in zip(batch, results, strict=True):
                    grouped.result, grouped.done = result, True
                self._group_busy = False
                self._group.notify_all()
        if isinstance(item.result, BaseException):
            raise item.result
        return bool(item.result)

    def _commit_group(self, items: list[_Grouped]) -> list[bool | BaseException]:
        """Store ``items`` (hashes checked) as one group; each one's result or error."""
        results: list[bool | BaseException] = [False] * len(items)
        first: set[bytes] = set()
        again: list[int] = []  # a second item of one id waits for the first one's write
        claimed: list[tuple[int, int]] = []  # (item, bytes charged)
        for i, item in enumerate(items):
            if item.seg_id in first:
                again.append(i)
                continue
            first.add(item.seg_id)
            try:
                new = self._claim({item.seg_id: item.view}, item.owner, item.session)
            except BaseException as exc:
                results[i] = exc
                continue
            if new:
                claimed.append((i, self._cost.charge(len(item.view))))
        placed: list[str] = []
        failed: dict[bytes, BaseException] = {}
        try:
            views = {items[i].seg_id: items[i].view for i, _ in claimed}
            failed.update(self._files.write_group(list(views), views, placed))
            done = [(i, need) for i, need in claimed if items[i].seg_id not in failed]
            self._index_group(items, done)
        except BaseException as exc:
            for path in placed:
                with contextlib.suppress(OSError):
                    os.unlink(path)
            failed.update((items[i].seg_id, exc) for i, _ in claimed)
        lost = [(i, need) for i, need in claimed if items[i].seg_id in failed]
        if lost:
            with self._written:
                for i, need in lost:
                    self._reserved -= need
                    self._writing.discard(items[i].seg_id)
                    results[i] = failed[items[i].seg_id]
                self._written.notify_all()
        for i, _ in claimed:
            if items[i].seg_id not in failed:
                results[i] = True
        for i in again:
            item = items[i]
            try:
                results[i] = self.put(item.seg_id, item.view, item.owner, item.session)
            except BaseException as exc:
                results[i] = exc
        return results

    def _index_group(self, items: list[_Grouped], done: list[tuple[int, int]]) -> None:
        """Index a group's new segments in one transaction (each with its own keeper)."""
        if not done:
            return
        now = time.time()
        with self._written, self._db.sql("indexing segments"):
            self._check_open()
            with self._db.transaction():
                self._index.insert([(items[i].seg_id, len(items[i].view), now) for i, _ in done])
                for i, _ in done:
                    self._index.keep([items[i].seg_id], items[i].owner, items[i].session, now)
            for i, need in done:
                item = items[i]
                if item.owner is None and item.session is None:
                    self._candidates[item.seg_id] = now
                self._reserved -= need
                self._used += need
                self._count += 1
                self._writing.discard(item.seg_id)
            self._written.notify_all()

    def _claim(
        self, batch: dict[bytes, memoryview], owner: bytes | None, session: bytes | None
    ) -> list[bytes]:
        """Reserve space for the segments of ``batch`` not stored yet, and claim their ids.

        Waits while another thread is writing one of them, so one segment is never written
        (or counted) twice. The segments already stored get ``owner``'s ref and
        ``session``'s pending row here, under the lock, so that no collection deletes
        them between this check and the caller's use of them.
        """
        with self._written, self._db.sql("looking up segments"):
            while self._writing.intersection(batch):
                self._written.wait()
            self._check_open()
            new = [i for i in batch if self._index.size(i) is None]
            need = sum(self._cost.charge(len(batch[i])) for i in new)
            committed = self._used + self._reserved
            if committed + need > self._capacity:
                raise CapacityError(
                    f"no space: {need} more bytes would exceed the store's capacity "
                    f"({committed}/{self._capacity} bytes used)"
                )
            old = [i for i in batch if i not in new]
            if old and (owner is not None or session is not None):
                with self._db.transaction():
                    self._index.keep(old, owner, session, time.time())
            self._reserved += need
            self._writing.update(new)
        return new

    def _index_batch(
        self,
        new: list[bytes],
        batch: dict[bytes, memoryview],
        owner: bytes | None,
        session: bytes | None,
        need: int,
    ) -> None:
        now = time.time()
        with self._written, self._db.sql("indexing segments"):
            self._check_open()
            with self._db.transaction():
                self._index.insert([(i, len(batch[i]), now) for i in new])
                self._index.keep(new, owner, session, now)
            if owner is None and session is None:
                self._candidates.update((i, now) for i in new)
            self._reserved -= need
            self._used += need
            self._count += len(new)
            self._writing.difference_update(new)
            self._written.notify_all()

    # -- reading ----------------------------------------------------------------------------

    def has(self, seg_id: bytes) -> bool:
        """Whether the segment is stored (indexed)."""
        seg_id = check_id(seg_id)
        with self._db.locked("looking up a segment"):
            self._check_open()
            return self._index.size(seg_id) is not None

    def size_of(self, seg_id: bytes) -> int:
        """The size of a stored segment; NotFoundError if it is not stored."""
        seg_id = check_id(seg_id)
        with self._db.locked("looking up a segment"):
            self._check_open()
            size = self._index.size(seg_id)
        if size is None:
            raise NotFoundError(f"segment {short(seg_id)} is not stored here")
        return size

    def path_of(self, seg_id: bytes) -> Path:
        """The file of a stored segment, for ``os.pread`` or ``sendfile``.

        The file is not verified; whoever reads it checks the hash. NotFoundError if the
        segment is not stored.
        """
        self.size_of(seg_id)
        return self._files.path(check_id(seg_id))

    def locate(self, seg_id: bytes) -> tuple[Path, int]:
        """The file and size of a segment from the file system alone (no index lookup).

        For the serving path, which must not wait on the index lock; the file is not
        verified. NotFoundError if there is no file.
        """
        self._check_open()
        return self._files.locate(check_id(seg_id))

    def read(
        self, seg_id: bytes, offset: int = 0, length: int | None = None, verify: bool = True
    ) -> bytes:
        """Read a segment, or ``length`` bytes of it from ``offset`` (None: to the end).

        When the whole segment is read and ``verify`` is set, its hash is checked: a
        damaged file is quarantined, its row dropped, and IntegrityError raised. A partial
        read cannot be verified here (the hash covers the whole segment); its reader must
        check it against the hash list.
        """
        seg_id = check_id(seg_id)
        self._check_open()
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"bad range: offset {offset}, length {length}")
        data, size, inode = self._files.read(seg_id, offset, length)
        whole = offset == 0 and len(data) == size
        if verify and whole and blake3_digest(data) != seg_id:
            self._quarantine(seg_id, inode, "read found a hash mismatch")
            raise IntegrityError(f"stored segment {short(seg_id)} is damaged (quarantined)")
        return data

    # -- references and deletion -----------------------------------------------------------

    def add_ref(self, seg_id: bytes, owner: bytes) -> None:
        """Record that ``owner`` needs a stored segment; NotFoundError if it is not stored."""
        self.add_refs([seg_id], owner)

    def add_refs(self, seg_ids: Sequence[bytes], owner: bytes) -> None:
        """Record that ``owner`` needs every one of ``seg_ids``, in one transaction: all or
        none (NotFoundError, and no ref added, if one of them is not stored)."""
        ids = [check_id(i) for i in seg_ids]
        with self._db.locked("adding refs"):
            self._check_open()
            missing = [i for i in ids if self._index.size(i) is None]
            if missing:
                raise NotFoundError(
                    f"{len(missing)} segments are not stored here (first: {short(missing[0])})"
                )
            with self._db.transaction():
                self._index.keep(ids, bytes(owner), None, 0.0)

    def drop_refs(self, owner: bytes) -> list[bytes]:
        """Drop every ref of ``owner``; the ids it referenced that nobody else does.

        Those segments are not deleted here: the caller decides (``delete``, or use
        ``release``, which also spares segments an upload in progress has sent again).
        """
        with self._db.locked("dropping refs"):
            self._check_open()
            with self._db.transaction():
                ids = self._index.drop_refs(bytes(owner))
                unreferenced = [i for i in ids if not self._index.referenced(i)]
            # collected in time if the caller does not delete them
            self._note_candidates_locked(unreferenced)
            return unreferenced

    def release(self, owner: bytes) -> int:
        """Drop every ref of ``owner`` and delete the segments nothing keeps any more (no
        other ref, no pending upload), at once; the bytes freed (as charged)."""
        with self._db.locked("releasing refs"):
            self._check_open()
            with self._db.transaction():
                ids = self._index.drop_refs(bytes(owner))
            return self._delete_unneeded_locked(ids)[1]

    def end_session(self, session: bytes, seg_ids: Sequence[bytes] | None = None) -> int:
        """Forget ``session``'s pending uploads (only ``seg_ids`` of them, when given) and
        delete the segments nothing keeps any more, at once; the bytes freed (as charged).

        A session ends when its upload is placed (the segments placement gave this store
        have refs by then) or fails, is abandoned, or its connection closes.
        """
        session = bytes(session)
        only = None if seg_ids is None else [check_id(i) for i in seg_ids]
        with self._db.locked("ending an upload session"):
            self._check_open()
            with self._db.transaction():
                ids = self._index.end_session(session, only)
            return self._delete_unneeded_locked(ids)[1]

    def collect_orphans(self, before: float, live: Collection[bytes] = ()) -> tuple[int, int]:
        """Delete the segments stored before ``before`` (a ``time.time()``) that nothing
        keeps: no ref, no pending upload; (segments, bytes as charged) freed.

        Pending rows from before ``before`` of sessions not in ``live`` are dropped first:
        a segment whose write finished after its session had ended.
        """
        live = [bytes(s) for s in live]
        with self._db.locked("dropping pending rows of ended sessions"):
            self._check_open()
            with self._db.transaction():
                dropped = self._index.end_sessions_before(before, live)
            self._note_candidates_locked(dropped)
            # Only candidates are looked at, not the whole index: segments nothing kept
            # when the store opened, stored without a keeper, or left by a dropped ref or
            # pending row that was not followed by a deletion.
            due = [i for i, t in self._candidates.items() if t < before]
            for seg_id in due:
                del self._candidates[seg_id]
        segments = freed = 0
        for first in range(0, len(due), _COLLECT_BATCH):
            with self._db.locked("collecting orphans"):
                self._check_open()
                n, b = self._delete_unneeded_locked(due[first : first + _COLLECT_BATCH])
            segments += n
            freed += b
        if segments:
            log.info("orphans collected segments=%d bytes=%d", segments, freed)
        return segments, freed

    def _note_candidates_locked(self, ids: Sequence[bytes]) -> None:
        """Remember those of ``ids`` that are stored as orphan candidates, with the time
        they were stored."""
        for seg_id in ids:
            stored_at = self._index.stored_at(seg_id)
            if stored_at is not None:
                self._candidates[seg_id] = stored_at

    def orphans(self) -> Orphans:
        """Segments no ref keeps: pending in an upload session, or orphaned."""
        with self._db.locked("counting orphans"):
            self._check_open()
            return Orphans(*self._index.orphan_counts(self._cost))

    def _delete_unneeded_locked(self, ids: Sequence[bytes]) -> tuple[int, int]:
        """Delete those of ``ids`` that are stored and that nothing keeps; (count, bytes)."""
        doomed = [i for i in dict.fromkeys(ids) if self._index.is_unneeded(i)]
        if not doomed:
            return 0, 0
        # Files first, as in delete: a crash in between leaves rows without files, which
        # the next open drops.
        for seg_id in doomed:
            self._files.unlink(seg_id)
        freed = 0
        with self._db.transaction():
            for seg_id in doomed:
                freed += self._drop_row_locked(seg_id)
        return len(doomed), freed

    def delete(self, seg_id: bytes) -> int:
        """Remove a segment, its file and all its refs; the bytes freed (0 if not stored)."""
        seg_id = check_id(seg_id)
        with self._db.locked("deleting a segment"):
            self._check_open()
            if self._index.size(seg_id) is None:
                return 0
            # The file goes first: a crash in between leaves a row without a file, which
            # the next open drops, rather than an unreferenced file it would re-index.
            self._files.unlink(seg_id)
            with self._db.transaction():
                freed = self._drop_row_locked(seg_id)
                self._index.forget(seg_id)
        return freed

    # -- verification -----------------------------------------------------------------------

    def check(self, fix: bool = False) -> CheckReport:
        """Rehash every stored segment.

        With ``fix``, corrupt files are quarantined and the rows of corrupt and missing
        segments dropped, so they can be stored again from a good copy.
        """
        with self._db.locked("listing segments"):
            self._check_open()
            ids = self._index.ids()
        corrupt: list[bytes] = []
        missing: list[bytes] = []
        ok = 0
        for seg_id in ids:
            found = self._files.hash_file(seg_id)
            if found is None:
                if self.has(seg_id):  # else deleted while we were checking
                    missing.append(seg_id)
                continue
            inode, digest = found
            if digest == seg_id:
                ok += 1
                continue
            corrupt.append(seg_id)
            if fix:
                self._quarantine(seg_id, inode, "check found a hash mismatch")
        if fix and missing:
            with self._db.locked("dropping missing segments"):
                self._check_open()
                with self._db.transaction():
                    for seg_id in missing:
                        if not self._files.path(seg_id).exists():
                            self._drop_row_locked(seg_id)
        report = CheckReport(ok + len(corrupt) + len(missing), ok, corrupt, missing)
        log.info(
            "store checked=%d ok=%d corrupt=%d missing=%d fix=%s",
            report.checked,
            ok,
            len(corrupt),
            len(missing),
            fix,
        )
        return report

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        """Close the index and release the directory; later calls raise UsageError."""
        with self._written:
            if self._closed:
                return
            self._closed = True
            self._written.notify_all()
            # the connection itself: Database.close would take the lock held here
            self._db.conn.close()
            self._files.close()

    def __enter__(self) -> SegmentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
