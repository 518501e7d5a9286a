"""The files of a segment store: placement, crash-safe writes, reads, recovery and quarantine.

Layout under a store's root (see :mod:`difs_p2p.segindex` for the index beside it)::

    ROOT/segments/ab/cd/abcd...   one file per segment, named by the hex of its 32-byte id
    ROOT/tmp/                     writes in progress (emptied on open)
    ROOT/quarantine/              files that failed verification, kept for inspection
    ROOT/lock                     held (flock) while a store object has the directory open

* **placement**: a segment's path is derived only from the hex form of its id, two
  fan-out levels deep so no directory grows past a few thousand entries;
* **writes** go to ``tmp/``, are fsynced, renamed into place, and the directory is fsynced
  before the caller inserts the index row (``write_group``: a group commit of several
  segments, each fdatasync-ed, then one fsync per touched directory for the group). A
  crash therefore leaves either a partial file in ``tmp/`` (deleted on open) or a complete
  file without a row (rehashed and re-indexed on open), never a row for a partial file.

:class:`SegmentFiles` does the disk I/O and nothing else: it keeps no index, takes no lock
and decides nothing about capacity or references (the store does). OS errors are
translated here: no space -> ``CapacityError``, anything else -> ``StorageError``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import blake3

from difs_p2p.errors import CapacityError, NotFoundError, StorageError, UsageError

log = logging.getLogger(__name__)

ID_SIZE = 32
# Files are hashed in chunks of this size so a check never holds a whole segment twice.
_HASH_CHUNK = 1 << 20
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def blake3_digest(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


def short(seg_id: bytes) -> str:
    """The first 16 hex digits of an id, for messages and logs."""
    return seg_id.hex()[:16]


def as_bytes_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data``, so that ``len()`` counts bytes."""
    try:
        return memoryview(data).cast("B")
    except (TypeError, ValueError) as exc:
        raise UsageError(f"segment data must be a contiguous bytes-like object: {exc}") from None


def check_id(seg_id: bytes) -> bytes:
    """``seg_id`` as bytes; UsageError unless it is 32 bytes."""
    if not isinstance(seg_id, bytes | bytearray | memoryview):
        raise UsageError(f"a segment id is bytes, not {type(seg_id).__name__}")
    seg_id = bytes(seg_id)
    if len(seg_id) != ID_SIZE:
        raise UsageError(f"a segment id is {ID_SIZE} bytes, got {len(seg_id)}")
    return seg_id


def os_error(exc: OSError, doing: str) -> CapacityError | StorageError:
    """The package error for an OS error raised while ``doing`` something."""
    if exc.errno in _NO_SPACE:
        return CapacityError(f"no space left on the disk while {doing}")
    return StorageError(f"{doing} failed: {exc.strerror or exc}")


def hash_fd(fd: int) -> bytes:
    """The BLAKE3 of an open file, read in chunks."""
    hasher = blake3.blake3()
    offset = 0
    while chunk := os.pread(fd, _HASH_CHUNK, offset):
        hasher.update(chunk)
        offset += len(chunk)
    return hasher.digest()


def _write_all(fd: int, data: memoryview) -> None:
    """Write all of ``data`` to ``fd``."""
    while data:
        data = data[os.write(fd, data) :]


def _fsync_dirs(touched: set[str]) -> None:
    """fsync each directory a write touched, deepest first (StorageError if one fails)."""
    try:
        for directory in sorted(touched, key=lambda p: p.count(os.sep), reverse=True):
            _fsync_dir(directory)
    except OSError as exc:
        raise os_error(exc, "syncing segment directories") from exc


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class SegmentFiles:
    """The segment files under ``root``; holds the directory lock until :meth:`close`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.segments = self.root / "segments"
        self.tmp = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self._lock_fd = self._open_root()

    def _open_root(self) -> int:
        """Create the directories, prove they are writable and take the directory lock."""
        try:
            for sub in (self.segments, self.tmp, self.quarantine_dir):
                sub.mkdir(parents=True, exist_ok=True)
            probe = self.tmp / f".probe-{uuid.uuid4().hex}"
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

    def close(self) -> None:
        """Release the directory lock."""
        os.close(self._lock_fd)

    # -- placement --------------------------------------------------------------------------

    def path(self, seg_id: bytes) -> Path:
        h = seg_id.hex()
        return self.segments / h[:2] / h[2:4] / h

    def _path_str(self, seg_id: bytes) -> str:
        h = seg_id.hex()
        return f"{self.segments}/{h[:2]}/{h[2:4]}/{h}"

    # -- writing ----------------------------------------------------------------------------

    def write_file(self, tmp: str, data: memoryview) -> None:
        """Write ``data`` to a new file ``tmp`` and fsync it."""
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            _write_all(fd, data)
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

    def write_all(
        self, ids: Sequence[bytes], data: Mapping[bytes, memoryview], placed: list[str]
    ) -> None:
        """Write every segment of ``ids`` durably: each to a new file in ``tmp/``, fsynced
        and renamed into place, then each touched directory fsynced once.

        The path of every file renamed into place is appended to ``placed``, so that the
        caller can remove them if a later step fails.
        """
        touched: set[str] = set()
        for seg_id in ids:
            path = self._path_str(seg_id)
            tmp = f"{self.tmp}/{seg_id.hex()}.{uuid.uuid4().hex}"
            try:
                self._make_parent(path, touched)
                self.write_file(tmp, data[seg_id])
                os.rename(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise os_error(exc, f"writing segment {short(seg_id)}") from exc
            placed.append(path)
        _fsync_dirs(touched)

    def write_group(
        self, ids: Sequence[bytes], data: Mapping[bytes, memoryview], placed: list[str]
    ) -> dict[bytes, CapacityError | StorageError]:
        """Write segments as one group commit: every file written to ``tmp/`` first, then
        each fdatasync-ed (enough for a new file: its size is flushed with its data, and the
        disk flushes the group's writes together), renamed into place, and each touched
        directory fsynced once for the whole group.

        A segment whose write fails is left out and its error returned by id; a failed
        directory fsync fails the group (raised). Paths renamed into place are appended to
        ``placed`` for the caller to remove if a later step fails.
        """
        touched: set[str] = set()
        failed: dict[bytes, CapacityError | StorageError] = {}
        written: list[tuple[bytes, int, str, str]] = []
        for seg_id in ids:
            path = self._path_str(seg_id)
            tmp = f"{self.tmp}/{seg_id.hex()}.{uuid.uuid4().hex}"
            fd = -1
            try:
                self._make_parent(path, touched)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                _write_all(fd, data[seg_id])
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                failed[seg_id] = os_error(exc, f"writing segment {short(seg_id)}")
                continue
            written.append((seg_id, fd, tmp, path))
        for seg_id, fd, tmp, path in written:
            try:
                os.fdatasync(fd)
                os.rename(tmp, path)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                failed[seg_id] = os_error(exc, f"writing segment {short(seg_id)}")
                continue
            finally:
                os.close(fd)
            placed.append(path)
        _fsync_dirs(touched)
        return failed

    def unlink(self, seg_id: bytes) -> None:
        """Delete a segment's file (nothing if there is none)."""
        try:
            self.path(seg_id).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_error(exc, f"deleting segment {short(seg_id)}") from exc

    # -- reading ----------------------------------------------------------------------------

    def locate(self, seg_id: bytes) -> tuple[Path, int]:
        """The file and size of a segment; NotFoundError if there is no file."""
        path = self.path(seg_id)
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"segment {short(seg_id)} is not stored here") from None
        except OSError as exc:
            raise os_error(exc, f"locating segment {short(seg_id)}") from exc

    def read(self, seg_id: bytes, offset: int, length: int | None) -> tuple[bytes, int, int]:
        """``length`` bytes (None: to the end) of a segment's file from ``offset``, with the
        file's size and inode; NotFoundError if there is no file."""
        try:
            fd = os.open(self.path(seg_id), os.O_RDONLY)
        except FileNotFoundError:
            raise NotFoundError(f"segment {short(seg_id)} is not stored here") from None
        except OSError as exc:
            raise os_error(exc, f"opening segment {short(seg_id)}") from exc
        try:
            st = os.fstat(fd)
            if offset > st.st_size:
                raise UsageError(
                    f"offset {offset} is past the end of segment {short(seg_id)} "
                    f"({st.st_size} bytes)"
                )
            want = st.st_size - offset if length is None else min(length, st.st_size - offset)
            return _pread_all(fd, want, offset), st.st_size, st.st_ino
        except OSError as exc:
            raise os_error(exc, f"reading segment {short(seg_id)}") from exc
        finally:
            os.close(fd)

    def hash_file(self, seg_id: bytes) -> tuple[int, bytes] | None:
        """The inode and BLAKE3 of a segment's file, or None if there is no file."""
        try:
            fd = os.open(self.path(seg_id), os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise os_error(exc, f"checking segment {short(seg_id)}") from exc
        try:
            return os.fstat(fd).st_ino, hash_fd(fd)
        except OSError as exc:
            raise os_error(exc, f"checking segment {short(seg_id)}") from exc
        finally:
            os.close(fd)

    # -- recovery and quarantine -------------------------------------------------------------

    def recover(self, indexed: dict[bytes, int]) -> tuple[list[tuple[bytes, int]], list[bytes]]:
        """Drop partial writes and reconcile the files with the index's ``{id: size}``.

        Returns the files to index (complete files without a row, rehashed: ``(id, size)``)
        and the rows to drop (files of the wrong size, quarantined, and rows without a
        file). Indexed files are only compared by size, not rehashed, so opening stays
        fast; the store's ``check()`` is the full verification.
        """
        try:
            for entry in os.scandir(self.tmp):
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
        except OSError as exc:
            raise StorageError(f"cannot empty {self.tmp}: {exc.strerror or exc}") from exc
        unseen = dict(indexed)
        added: list[tuple[bytes, int]] = []
        dropped: list[bytes] = []
        try:
            for path, seg_id in self._scan():
                if seg_id is None:
                    self.move_to_quarantine(path, "misplaced file in segments/")
                    continue
                size = path.stat(follow_symlinks=False).st_size
                known = unseen.pop(seg_id, None)
                if known is not None:
                    if size != known:
                        self.move_to_quarantine(path, f"size {size} but indexed as {known}")
                        dropped.append(seg_id)
                    continue
                fd = os.open(path, os.O_RDONLY)
                try:
                    digest = hash_fd(fd)
                finally:
                    os.close(fd)
                if digest == seg_id:
                    added.append((seg_id, size))
                else:
                    self.move_to_quarantine(path, "unindexed file does not match its hash")
        except OSError as exc:
            raise StorageError(f"cannot scan {self.segments}: {exc.strerror or exc}") from exc
        dropped.extend(unseen)  # rows whose file is gone
        return added, dropped

    def _scan(self) -> Iterator[tuple[Path, bytes | None]]:
        """Every file under ``segments/`` with its id, or None when it is not where its id
        says it should be."""
        for top in os.scandir(self.segments):
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
                    if seg_id is None or not regular or self.path(seg_id) != path:
                        yield path, None
                    else:
                        yield path, seg_id

    def move_to_quarantine(self, path: Path, reason: str) -> None:
        target = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        os.replace(path, target)
        log.warning("segment quarantined file=%s reason=%s", path.name, reason)

    def quarantine(self, seg_id: bytes, inode: int | None, reason: str) -> bool:
        """Move a damaged segment's file aside; False if the path now holds another file
        than inode ``inode`` (a good copy written since), which is left alone."""
        path = self.path(seg_id)
        try:
            if inode is not None and path.stat().st_ino != inode:
                return False
            self.move_to_quarantine(path, reason)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise os_error(exc, f"quarantining segment {short(seg_id)}") from exc
        return True
