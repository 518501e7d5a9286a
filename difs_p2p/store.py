"""Content-addressed segment storage on disk.

Layout of a store directory::

    ROOT/segments/ab/cd/abcd...   one file per segment, named by the hex of its 32-byte id
    ROOT/tmp/                     writes in progress (emptied on open)
    ROOT/quarantine/              files that failed verification, kept for inspection
    ROOT/index.sqlite3            segments(id, size, stored_at), refs(id, owner) and
                                  pending(id, session, since)
    ROOT/lock                     held (flock) while a store object has the directory open

Placement, index and verification are kept apart:

* **placement**: a segment's path is derived only from the hex form of its id, two
  fan-out levels deep so no directory grows past a few thousand entries;
* **writes** go to ``tmp/``, are fsynced, renamed into place, and the directory is fsynced
  before the index row is inserted. A crash therefore leaves either a partial file in
  ``tmp/`` (deleted on open) or a complete file without a row (rehashed and re-indexed on
  open), never a row for a partial file;
* **index**: sqlite in WAL mode. The in-memory ``used`` total is loaded from it on open;
  it is what the segments are charged (:class:`DiskCost`: a peer charges each segment its
  size rounded up to the file system's block, plus one block for its inode, directory
  entry, index rows and share of the fan-out directories), and capacity is checked against
  it, with the space reserved, before any byte is written;
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

The API is synchronous and thread-safe; the peer calls it through ``asyncio.to_thread``.
One lock guards the sqlite connection and the space accounting; hashing and file I/O run
outside it. Errors from the OS and sqlite are translated here: no space ->
``CapacityError``, anything else -> ``StorageError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import blake3

from difs_p2p.errors import CapacityError, IntegrityError, NotFoundError, StorageError, UsageError

log = logging.getLogger(__name__)

ID_SIZE = 32
# Files are hashed in chunks of this size so a check never holds a whole segment twice.
_HASH_CHUNK = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments(
    id BLOB PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refs(
    id BLOB NOT NULL, owner BLOB NOT NULL, PRIMARY KEY(id, owner));
CREATE INDEX IF NOT EXISTS refs_owner ON refs(owner);
CREATE TABLE IF NOT EXISTS pending(
    id BLOB NOT NULL, session BLOB NOT NULL, since REAL NOT NULL, PRIMARY KEY(id, session));
CREATE INDEX IF NOT EXISTS pending_session ON pending(session);
"""
# A segment nothing keeps: no ref and no pending upload.
_UNNEEDED = (
    "NOT EXISTS (SELECT 1 FROM refs r WHERE r.id = segments.id)"
    " AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.id = segments.id)"
)
# Orphans deleted per lock hold by collect_orphans, so that other calls get a turn.
_COLLECT_BATCH = 256


def _blake3(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def _short(seg_id: bytes) -> str:
    return seg_id.hex()[:16]


def _as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data``, so that ``len()`` counts bytes."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"segment data must be a contiguous bytes-like object: {exc}") from None


def _check_id(seg_id: bytes) -> bytes:
    if not isinstance(seg_id, bytes | bytearray | memoryview):
        raise UsageError(f"a segment id is bytes, not {type(seg_id).__name__}")
    seg_id = bytes(seg_id)
    if len(seg_id) != ID_SIZE:
        raise UsageError(f"a segment id is {ID_SIZE} bytes, got {len(seg_id)}")
    return seg_id


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _hash_fd(fd: int) -> bytes:
    hasher = blake3.blake3()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.digest()


def _os_error(exc: OSError, doing: str) -> CapacityError | StorageError:
    if exc.errno in _NO_SPACE:
        return CapacityError(f"no space left on the disk while {doing}")
    return StorageError(f"{doing} failed: {exc.strerror or exc}")


@dataclass(frozen=True, slots=True)
class DiskCost:
    """What a segment of ``size`` bytes is charged against a store's capacity.

    ``block`` rounds the size up (a file occupies whole blocks), and ``per_file`` is added
    for what each file costs besides its data. The default charges the bytes alone;
    :meth:`of_filesystem` charges what a segment really costs on the disk under a path.
    """

    block: int = 1
    per_file: int = 0

    def __post_init__(self) -> None:
        if self.block < 1 or self.per_file < 0:
            raise UsageError("a disk cost needs block >= 1 and per_file >= 0")

    def charge(self, size: int) -> int:
        return -(-size // self.block) * self.block + self.per_file

    @classmethod
    def of_filesystem(cls, path: str | Path) -> DiskCost:
        """The cost rule of the file system holding ``path``: sizes rounded up to its block
        (``statvfs`` fragment size, 4096 on ext4 and tmpfs), plus one block per file for
        the inode (256 B on ext4), the directory entry, the index rows and the file's
        share of the fan-out directories (one block each, up to 65,792 of them).

        Measured on ext4: 8-byte segments take 8.5 KiB each at 10,000 segments (13.5 KiB
        at 1,000, when most of them need a new directory); they are charged 8 KiB.
        """
        try:
            st = os.statvfs(path)
        except OSError as exc:
            raise StorageError(f"cannot measure the file system of {path}: {exc}") from exc
        block = max(512, int(st.f_frsize or st.f_bsize or 4096))
        return cls(block, block)


@dataclass(frozen=True, slots=True)
class Orphans:
    """Segments no ref keeps: still pending in an upload session, or orphaned (waiting to
    be collected). Bytes are as charged."""

    pending: int
    pending_bytes: int
    orphaned: int
    orphaned_bytes: int


@dataclass(frozen=True, slots=True)
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
        self._segments = self.root / "segments"
        self._tmp = self.root / "tmp"
        self._quarantine_dir = self.root / "quarantine"
        self._lock = threading.Lock()
        # Signalled when a write finishes, for puts waiting on the same id.
        self._written = threading.Condition(self._lock)
        self._writing: set[bytes] = set()
        self._reserved = 0
        self._closed = False
        self._lock_fd = self._open_root()
        try:
            self._db = self._open_index()
            try:
                self._recover()
                block, per_file = self._cost.block, self._cost.per_file
                with self._sql("loading the segment index"):
                    used, count = self._db.execute(
                        "SELECT COALESCE(SUM((size + ? - 1) / ? * ? + ?), 0), COUNT(*)"
                        " FROM segments",
                        (block, block, block, per_file),
                    ).fetchone()
                    # what nothing keeps now is collected a grace time after it was stored
                    self._candidates: dict[bytes, float] = {
                        bytes(i): float(t)
                        for i, t in self._db.execute(
                            f"SELECT id, stored_at FROM segments WHERE {_UNNEEDED}"
                        )
                    }
            except BaseException:
                self._db.close()
                raise
        except BaseException:
            os.close(self._lock_fd)
            raise
        self._used = int(used)
        self._count = int(count)
        log.info(
            "store opened root=%s segments=%d used=%d capacity=%d",
            self.root,
            self._count,
            self._used,
            capacity,
        )

    # -- opening and recovery -------------------------------------------------------------

    def _open_root(self) -> int:
        """Create the directories, prove they are writable and take the directory lock."""
        try:
            for sub in (self._segments, self._tmp, self._quarantine_dir):
                sub.mkdir(parents=True, exist_ok=True)
            probe = self._tmp / f".probe-{uuid.uuid4().hex}"
            probe.write_bytes(b"")
            probe.unlink()
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StorageError(
                f"cannot use {self.root} as a segment store (it must be a writable "
                f"directory): {exc.strerror or exc}"
            ) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StorageError(
                f"segment store {self.root} is already open (by another peer or process)"
            ) from exc
        return fd

    def _open_index(self) -> sqlite3.Connection:
        path = self.root / "index.sqlite3"
        try:
            db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the segment index {path}: {exc}") from exc
        try:
            db.execute("PRAGMA journal_mode=WAL")
            # NORMAL in WAL mode can lose the last commits on power loss, never corrupt the
            # index. A lost row is recovered by rehashing its file on open, and a lost ref
            # change only keeps a segment longer than needed.
            db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            db.close()
            raise StorageError(f"cannot use the segment index {path}: {exc}") from exc
        return db

    def _recover(self) -> None:
        """Drop partial writes and reconcile the index with the files on disk.

        Indexed files are only compared by size, not rehashed, so opening stays fast;
        ``check()`` is the full verification.
        """
        try:
            for entry in os.scandir(self._tmp):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        except OSError as exc:
            raise StorageError(f"cannot empty {self._tmp}: {exc.strerror or exc}") from exc
        with self._sql("reading the segment index"):
            indexed = {
                bytes(seg_id): int(size)
                for seg_id, size in self._db.execute("SELECT id, size FROM segments")
            }
        added: list[tuple[bytes, int, float]] = []
        dropped: list[bytes] = []
        try:
            for path, seg_id in self._scan_segments():
                if seg_id is None:
                    self._move_to_quarantine(path, "misplaced file in segments/")
                    continue
                size = path.stat(follow_symlinks=False).st_size
                known = indexed.pop(seg_id, None)
                if known is not None:
                    if size != known:
                        self._move_to_quarantine(path, f"size {size} but indexed as {known}")
                        dropped.append(seg_id)
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    digest = _hash_fd(fd)
                finally:
                    os.close(fd)
                if digest == seg_id:
                    added.append((seg_id, size, time.time()))
                else:
                    self._move_to_quarantine(path, "unindexed file does not match its hash")
        except OSError as exc:
            raise StorageError(f"cannot scan {self._segments}: {exc.strerror or exc}") from exc
        dropped.extend(indexed)  # rows whose file is gone
        with self._sql("repairing the segment index"), self._transaction():
            self._db.executemany("INSERT INTO segments VALUES(?,?,?)", added)
            self._db.executemany("DELETE FROM segments WHERE id=?", [(i,) for i in dropped])
            # Upload sessions end with the process that served them: what they left
            # unplaced is orphaned, and collected a grace time after it was stored.
            stale = self._db.execute("DELETE FROM pending").rowcount
        if stale > 0:
            log.info("store dropped pending uploads of a previous run rows=%d", stale)
        if added or dropped:
            log.warning(
                "store recovered root=%s reindexed=%d dropped=%d",
                self.root,
                len(added),
                len(dropped),
            )

    def _scan_segments(self) -> Iterator[tuple[Path, bytes | None]]:
        """Every file under ``segments/`` with its id, or None when it is not where its id
        says it should be."""
        for top in os.scandir(self._segments):
            if not top.is_dir(follow_symlinks=False):
                yield Path(top.path), None
                continue
            for mid in os.scandir(top.path):
                if not mid.is_dir(follow_symlinks=False):
                    yield Path(mid.path), None
                    continue
                for leaf in os.scandir(mid.path):
                    if leaf.is_dir(follow_symlinks=False):
                        log.warning("store ignores directory path=%s", leaf.path)
                        continue
                    path = Path(leaf.path)
                    seg_id = _id_from_name(leaf.name)
                    regular = leaf.is_file(follow_symlinks=False)
                    if seg_id is None or not regular or self._path(seg_id) != path:
                        yield path, None
                    else:
                        yield path, seg_id

    # -- helpers ----------------------------------------------------------------------------

    def _path(self, seg_id: bytes) -> Path:
        h = seg_id.hex()
        return self._segments / h[:2] / h[2:4] / h

    def _path_str(self, seg_id: bytes) -> str:
        h = seg_id.hex()
        return f"{self._segments}/{h[:2]}/{h[2:4]}/{h}"

    def _move_to_quarantine(self, path: Path, reason: str) -> None:
        target = self._quarantine_dir / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        log.warning("segment quarantined file=%s reason=%s", path.name, reason)

    @contextlib.contextmanager
    def _sql(self, doing: str) -> Iterator[None]:
        """Translate sqlite errors raised while ``doing`` something."""
        try:
            yield
        except sqlite3.Error as exc:
            if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
                raise CapacityError(f"no space left on the disk while {doing}") from exc
            raise StorageError(f"segment index failed while {doing}: {exc}") from exc

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
            raise

    def _check_open(self) -> None:
        if self._closed:
            raise UsageError(f"segment store {self.root} is closed")

    def _size_locked(self, seg_id: bytes) -> int | None:
        row = self._db.execute("SELECT size FROM segments WHERE id=?", (seg_id,)).fetchone()
        return None if row is None else int(row[0])

    def _drop_row_locked(self, seg_id: bytes) -> int:
        """Forget a segment's row (not its refs); the bytes it accounted for."""
        size = self._size_locked(seg_id)
        if size is None:
            return 0
        self._db.execute("DELETE FROM segments WHERE id=?", (seg_id,))
        charged = self._cost.charge(size)
        self._used -= charged
        self._count -= 1
        return charged

    def _quarantine(self, seg_id: bytes, inode: int | None, reason: str) -> None:
        """Move a damaged segment aside and drop its row.

        ``inode`` is the file that was found damaged: if the path now holds another file
        (a good copy written since), it is left alone.
        """
        path = self._path(seg_id)
        with self._lock, self._sql("dropping a damaged segment"):
            if self._closed:
                return
            try:
                if inode is not None and path.stat().st_ino != inode:
                    return
                self._move_to_quarantine(path, reason)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error(exc, f"quarantining segment {_short(seg_id)}") from exc
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

    def _write_file(self, tmp: str, data: memoryview) -> None:
        """Write ``data`` to a new file ``tmp`` and fsync it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            while data:
                n = os.write(fd, data)
                data = data[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _make_parent(self, path: str, touched: set[str]) -> None:
        """Create the fan-out directories of ``path``; note every directory to fsync.

        Paths are strings on the write path: building and formatting ``Path`` objects
        was a tenth of a storing peer's Python time.
        """
        leaf = os.path.dirname(path)
        touched.add(leaf)
        if os.path.isdir(leaf):
            return
        for directory in (os.path.dirname(leaf), leaf):
            try:
                os.mkdir(directory)
            except FileExistsError:
                continue
            touched.add(os.path.dirname(directory))

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
    ) -> int:
        """Store several segments at once; the number newly stored.

        All or nothing: every hash is checked and the space for all new segments reserved
        before the first write. Each touched directory is fsynced once and the index is
        updated in one transaction, which makes this the fast path for many small segments.
        """
        self._check_open()
        batch: dict[bytes, memoryview] = {}
        for i, (raw_id, data) in enumerate(items):
            seg_id = _check_id(raw_id)
            view = _as_bytes_view(data)
            if _blake3(view) != seg_id:
                where = f" (item {i})" if len(items) > 1 else ""
                raise IntegrityError(
                    f"segment {_short(seg_id)}{where} does not match its BLAKE3 hash"
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
            self._write_all(new, batch, placed)
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

    def _claim(
        self, batch: dict[bytes, memoryview], owner: bytes | None, session: bytes | None
    ) -> list[bytes]:
        """Reserve space for the segments of ``batch`` not stored yet, and claim their ids.

        Waits while another thread is writing one of them, so one segment is never written
        (or counted) twice. The segments already stored get ``owner``'s ref and
        ``session``'s pending row here, under the lock, so that no collection deletes
        them between this check and the caller's use of them.
        """
        with self._written, self._sql("looking up segments"):
            while self._writing.intersection(batch):
                self._written.wait()
            self._check_open()
            new = [i for i in batch if self._size_locked(i) is None]
            need = sum(self._cost.charge(len(batch[i])) for i in new)
            committed = self._used + self._reserved
            if committed + need > self._capacity:
                raise CapacityError(
                    f"no space: {need} more bytes would exceed the store's capacity "
                    f"({committed}/{self._capacity} bytes used)"
                )
            old = [i for i in batch if i not in new]
            if old and (owner is not None or session is not None):
                with self._transaction():
                    self._keep_locked(old, owner, session, time.time())
            self._reserved += need
            self._writing.update(new)
        return new

    def _keep_locked(
        self, ids: list[bytes], owner: bytes | None, session: bytes | None, now: float
    ) -> None:
        """Add ``owner``'s refs and ``session``'s pending rows for ``ids``."""
        if owner is not None:
            self._db.executemany(
                "INSERT OR IGNORE INTO refs VALUES(?,?)", [(i, owner) for i in ids]
            )
        if session is not None:
            self._db.executemany(
                "INSERT OR IGNORE INTO pending VALUES(?,?,?)", [(i, session, now) for i in ids]
            )

    def _write_all(
        self, new: list[bytes], batch: dict[bytes, memoryview], placed: list[str]
    ) -> None:
        """Write, fsync and rename every new segment, then fsync each touched directory."""
        touched: set[str] = set()
        for seg_id in new:
            path = self._path_str(seg_id)
            tmp = f"{self._tmp}/{seg_id.hex()}.{uuid.uuid4().hex}"
            try:
                self._make_parent(path, touched)
                self._write_file(tmp, batch[seg_id])
                os.rename(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise _os_error(exc, f"writing segment {_short(seg_id)}") from exc
            placed.append(path)
        try:
            for directory in sorted(touched, key=lambda p: p.count(os.sep), reverse=True):
                _fsync_dir(directory)
        except OSError as exc:
            raise _os_error(exc, "syncing segment directories") from exc

    def _index_batch(
        self,
        new: list[bytes],
        batch: dict[bytes, memoryview],
        owner: bytes | None,
        session: bytes | None,
        need: int,
    ) -> None:
        now = time.time()
        with self._written, self._sql("indexing segments"):
            self._check_open()
            with self._transaction():
                self._db.executemany(
                    "INSERT INTO segments VALUES(?,?,?)",
                    [(i, len(batch[i]), now) for i in new],
                )
                self._keep_locked(new, owner, session, now)
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
        seg_id = _check_id(seg_id)
        with self._lock, self._sql("looking up a segment"):
            self._check_open()
            return self._size_locked(seg_id) is not None

    def size_of(self, seg_id: bytes) -> int:
        """The size of a stored segment; NotFoundError if it is not stored."""
        seg_id = _check_id(seg_id)
        with self._lock, self._sql("looking up a segment"):
            self._check_open()
            size = self._size_locked(seg_id)
        if size is None:
            raise NotFoundError(f"segment {_short(seg_id)} is not stored here")
        return size

    def path_of(self, seg_id: bytes) -> Path:
        """The file of a stored segment, for ``os.pread`` or ``sendfile``.

        The file is not verified; whoever reads it checks the hash. NotFoundError if the
        segment is not stored.
        """
        self.size_of(seg_id)
        return self._path(_check_id(seg_id))

    def locate(self, seg_id: bytes) -> tuple[Path, int]:
        """The file and size of a segment from the file system alone (no index lookup).

        For the serving path, which must not wait on the index lock; the file is not
        verified. NotFoundError if there is no file.
        """
        self._check_open()
        path = self._path(_check_id(seg_id))
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"segment {_short(seg_id)} is not stored here") from None
        except OSError as exc:
            raise _os_error(exc, f"locating segment {_short(seg_id)}") from exc

    def read(
        self, seg_id: bytes, offset: int = 0, length: int | None = None, verify: bool = True
    ) -> bytes:
        """Read a segment, or ``length`` bytes of it from ``offset`` (None: to the end).

        When the whole segment is read and ``verify`` is set, its hash is checked: a
        damaged file is quarantined, its row dropped, and IntegrityError raised. A partial
        read cannot be verified here (the hash covers the whole segment); its reader must
        check it against the hash list.
        """
        seg_id = _check_id(seg_id)
        self._check_open()
        if offset < 0 or (length is not None and length < 0):
            raise UsageError(f"bad range: offset {offset}, length {length}")
        path = self._path(seg_id)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"segment {_short(seg_id)} is not stored here") from None
        except OSError as exc:
            raise _os_error(exc, f"opening segment {_short(seg_id)}") from exc
        try:
            st = os.fstat(fd)
            if offset > st.st_size:
                raise UsageError(
                    f"offset {offset} is past the end of segment {_short(seg_id)} "
                    f"({st.st_size} bytes)"
                )
            want = st.st_size - offset if length is None else min(length, st.st_size - offset)
            data = _pread_all(fd, want, offset)
        except OSError as exc:
            raise _os_error(exc, f"reading segment {_short(seg_id)}") from exc
        finally:
            os.close(fd)
        whole = offset == 0 and len(data) == st.st_size
        if verify and whole and _blake3(data) != seg_id:
            self._quarantine(seg_id, st.st_ino, "read found a hash mismatch")
            raise IntegrityError(f"stored segment {_short(seg_id)} is damaged (quarantined)")
        return data

    # -- references and deletion -----------------------------------------------------------

    def add_ref(self, seg_id: bytes, owner: bytes) -> None:
        """Record that ``owner`` needs a stored segment; NotFoundError if it is not stored."""
        self.add_refs([seg_id], owner)

    def add_refs(self, seg_ids: Sequence[bytes], owner: bytes) -> None:
        """Record that ``owner`` needs every one of ``seg_ids``, in one transaction: all or
        none (NotFoundError, and no ref added, if one of them is not stored)."""
        ids = [_check_id(i) for i in seg_ids]
        with self._lock, self._sql("adding refs"):
            self._check_open()
            missing = [i for i in ids if self._size_locked(i) is None]
            if missing:
                raise NotFoundError(
                    f"{len(missing)} segments are not stored here (first: {_short(missing[0])})"
                )
            with self._transaction():
                self._keep_locked(ids, bytes(owner), None, 0.0)

    def drop_refs(self, owner: bytes) -> list[bytes]:
        """Drop every ref of ``owner``; the ids it referenced that nobody else does.

        Those segments are not deleted here: the caller decides (``delete``, or use
        ``release``, which also spares segments an upload in progress has sent again).
        """
        with self._lock, self._sql("dropping refs"):
            self._check_open()
            with self._transaction():
                ids = self._drop_refs_locked(bytes(owner))
                unreferenced = [
                    i
                    for i in ids
                    if self._db.execute("SELECT 1 FROM refs WHERE id=?", (i,)).fetchone() is None
                ]
            # collected in time if the caller does not delete them
            self._note_candidates_locked(unreferenced)
            return unreferenced

    def release(self, owner: bytes) -> int:
        """Drop every ref of ``owner`` and delete the segments nothing keeps any more (no
        other ref, no pending upload), at once; the bytes freed (as charged)."""
        with self._lock, self._sql("releasing refs"):
            self._check_open()
            with self._transaction():
                ids = self._drop_refs_locked(bytes(owner))
            return self._delete_unneeded_locked(ids)[1]

    def _drop_refs_locked(self, owner: bytes) -> list[bytes]:
        """Delete ``owner``'s refs (in the caller's transaction); the ids they named."""
        ids = [bytes(r[0]) for r in self._db.execute("SELECT id FROM refs WHERE owner=?", (owner,))]
        self._db.execute("DELETE FROM refs WHERE owner=?", (owner,))
        return ids

    def end_session(self, session: bytes, seg_ids: Sequence[bytes] | None = None) -> int:
        """Forget ``session``'s pending uploads (only ``seg_ids`` of them, when given) and
        delete the segments nothing keeps any more, at once; the bytes freed (as charged).

        A session ends when its upload is placed (the segments placement gave this store
        have refs by then) or fails, is abandoned, or its connection closes.
        """
        session = bytes(session)
        with self._lock, self._sql("ending an upload session"):
            self._check_open()
            with self._transaction():
                if seg_ids is None:
                    ids = [
                        bytes(r[0])
                        for r in self._db.execute(
                            "SELECT id FROM pending WHERE session=?", (session,)
                        )
                    ]
                    self._db.execute("DELETE FROM pending WHERE session=?", (session,))
                else:
                    ids = [_check_id(i) for i in seg_ids]
                    self._db.executemany(
                        "DELETE FROM pending WHERE id=? AND session=?",
                        [(i, session) for i in ids],
                    )
            return self._delete_unneeded_locked(ids)[1]

    def collect_orphans(self, before: float, live: Collection[bytes] = ()) -> tuple[int, int]:
        """Delete the segments stored before ``before`` (a ``time.time()``) that nothing
        keeps: no ref, no pending upload; (segments, bytes as charged) freed.

        Pending rows from before ``before`` of sessions not in ``live`` are dropped first:
        a segment whose write finished after its session had ended.
        """
        live = [bytes(s) for s in live]
        with self._lock, self._sql("dropping pending rows of ended sessions"):
            self._check_open()
            marks = ",".join("?" * len(live))
            where = f"since < ? AND session NOT IN ({marks})"
            with self._transaction():
                dropped = [
                    bytes(r[0])
                    for r in self._db.execute(
                        f"SELECT id FROM pending WHERE {where}", (before, *live)
                    )
                ]
                self._db.execute(f"DELETE FROM pending WHERE {where}", (before, *live))
            self._note_candidates_locked(dropped)
            # Only candidates are looked at, not the whole index: segments nothing kept
            # when the store opened, stored without a keeper, or left by a dropped ref or
            # pending row that was not followed by a deletion.
            due = [i for i, t in self._candidates.items() if t < before]
            for seg_id in due:
                del self._candidates[seg_id]
        segments = freed = 0
        for first in range(0, len(due), _COLLECT_BATCH):
            with self._lock, self._sql("collecting orphans"):
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
            row = self._db.execute(
                "SELECT stored_at FROM segments WHERE id=?", (seg_id,)
            ).fetchone()
            if row is not None:
                self._candidates[seg_id] = float(row[0])

    def orphans(self) -> Orphans:
        """Segments no ref keeps: pending in an upload session, or orphaned."""
        block, per_file = self._cost.block, self._cost.per_file
        charged = "COALESCE(SUM((size + ? - 1) / ? * ? + ?), 0)"
        params = (block, block, block, per_file)
        no_ref = "NOT EXISTS (SELECT 1 FROM refs r WHERE r.id = segments.id)"
        in_pending = "EXISTS (SELECT 1 FROM pending p WHERE p.id = segments.id)"
        with self._lock, self._sql("counting orphans"):
            self._check_open()
            pending = self._db.execute(
                f"SELECT COUNT(*), {charged} FROM segments WHERE {no_ref} AND {in_pending}",
                params,
            ).fetchone()
            orphaned = self._db.execute(
                f"SELECT COUNT(*), {charged} FROM segments WHERE {_UNNEEDED}", params
            ).fetchone()
        return Orphans(int(pending[0]), int(pending[1]), int(orphaned[0]), int(orphaned[1]))

    def _delete_unneeded_locked(self, ids: Sequence[bytes]) -> tuple[int, int]:
        """Delete those of ``ids`` that are stored and that nothing keeps; (count, bytes)."""
        doomed: list[bytes] = []
        for seg_id in dict.fromkeys(ids):
            row = self._db.execute(
                f"SELECT 1 FROM segments WHERE id=? AND {_UNNEEDED}", (seg_id,)
            ).fetchone()
            if row is not None:
                doomed.append(seg_id)
        if not doomed:
            return 0, 0
        # Files first, as in delete: a crash in between leaves rows without files, which
        # the next open drops.
        for seg_id in doomed:
            try:
                self._path(seg_id).unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error(exc, f"deleting segment {_short(seg_id)}") from exc
        freed = 0
        with self._transaction():
            for seg_id in doomed:
                freed += self._drop_row_locked(seg_id)
        return len(doomed), freed

    def delete(self, seg_id: bytes) -> int:
        """Remove a segment, its file and all its refs; the bytes freed (0 if not stored)."""
        seg_id = _check_id(seg_id)
        path = self._path(seg_id)
        with self._lock, self._sql("deleting a segment"):
            self._check_open()
            if self._size_locked(seg_id) is None:
                return 0
            # The file goes first: a crash in between leaves a row without a file, which
            # the next open drops, rather than an unreferenced file it would re-index.
            try:
                path.unlink()
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _os_error(exc, f"deleting segment {_short(seg_id)}") from exc
            with self._transaction():
                freed = self._drop_row_locked(seg_id)
                self._db.execute("DELETE FROM refs WHERE id=?", (seg_id,))
                self._db.execute("DELETE FROM pending WHERE id=?", (seg_id,))
        return freed

    # -- verification -----------------------------------------------------------------------

    def check(self, fix: bool = False) -> CheckReport:
        """Rehash every stored segment.

        With ``fix``, corrupt files are quarantined and the rows of corrupt and missing
        segments dropped, so they can be stored again from a good copy.
        """
        with self._lock, self._sql("listing segments"):
            self._check_open()
            ids = [bytes(r[0]) for r in self._db.execute("SELECT id FROM segments")]
        corrupt: list[bytes] = []
        missing: list[bytes] = []
        ok = 0
        for seg_id in ids:
            try:
                fd = os.open(self._path(seg_id), os.O_RDONLY)
            except FileNotFoundError:
                if self.has(seg_id):  # else deleted while we were checking
                    missing.append(seg_id)
                continue
            except OSError as exc:
                raise _os_error(exc, f"checking segment {_short(seg_id)}") from exc
            try:
                inode = os.fstat(fd).st_ino
                digest = _hash_fd(fd)
            except OSError as exc:
                raise _os_error(exc, f"checking segment {_short(seg_id)}") from exc
            finally:
                os.close(fd)
            if digest == seg_id:
                ok += 1
                continue
            corrupt.append(seg_id)
            if fix:
                self._quarantine(seg_id, inode, "check found a hash mismatch")
        if fix and missing:
            with self._lock, self._sql("dropping missing segments"):
                self._check_open()
                with self._transaction():
                    for seg_id in missing:
                        if not self._path(seg_id).exists():
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
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._written.notify_all()
            self._db.close()
            os.close(self._lock_fd)

    def __enter__(self) -> SegmentStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _id_from_name(name: str) -> bytes | None:
    """The id a file name encodes (lowercase hex of 32 bytes), or None."""
    if len(name) != 2 * ID_SIZE or name != name.lower():
        return None
    try:
        return bytes.fromhex(name)
    except ValueError:
        return None


def _pread_all(fd: int, length: int, offset: int) -> bytes:
    """Exactly ``length`` bytes from ``offset``, fewer only if the file is shorter."""
    parts: list[bytes] = []
    while length > 0:
        chunk = os.pread(fd, length, offset)
        if not chunk:
            break
        parts.append(chunk)
        offset += len(chunk)
        length -= len(chunk)
    return parts[0] if len(parts) == 1 else b"".join(parts)
