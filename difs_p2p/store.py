"""Content-addressed segment storage on disk.

Segments live in fan-out directories (``segments/ab/cd/<hex id>``), written to ``tmp/``,
fsynced and renamed into place, so a crash never leaves a partial segment visible; ``tmp/``
is emptied on open. An sqlite index records sizes and references (who needs a segment, for
garbage collection); capacity is enforced before any byte is written. ``check()`` rehashes
everything and moves damaged files to ``quarantine/``.

The API is synchronous and thread-safe; the peer calls it through ``asyncio.to_thread``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import blake3

from difs_p2p.errors import CapacityError, IntegrityError, NotFoundError, StorageError, UsageError

ID_SIZE = 32


def _blake3(data: bytes | bytearray | memoryview) -> bytes:
    return blake3.blake3(data).digest()


@dataclass(frozen=True, slots=True)
class CheckReport:
    checked: int
    ok: int
    corrupt: list[bytes] = field(default_factory=list)
    missing: list[bytes] = field(default_factory=list)


class SegmentStore:
    def __init__(self, root: Path, capacity: int) -> None:
        self.root = root
        self.capacity = capacity
        self._lock = threading.Lock()
        try:
            for sub in ("segments", "tmp", "quarantine"):
                (root / sub).mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(root / "index.sqlite3"), check_same_thread=False, isolation_level=None
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS segments(
                    id BLOB PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL);
                CREATE TABLE IF NOT EXISTS refs(
                    id BLOB NOT NULL, owner BLOB NOT NULL, PRIMARY KEY(id, owner));
                CREATE INDEX IF NOT EXISTS refs_owner ON refs(owner);
                """
            )
        except (OSError, sqlite3.Error) as exc:
            raise StorageError(f"cannot use storage directory {root}: {exc}") from None
        self._recover()
        (used,) = self._db.execute("SELECT COALESCE(SUM(size), 0) FROM segments").fetchone()
        self._used = int(used)
        self._reserved = 0

    def _path(self, seg_id: bytes) -> Path:
        if len(seg_id) != ID_SIZE:
            raise UsageError(f"segment id must be {ID_SIZE} bytes")
        h = seg_id.hex()
        return self.root / "segments" / h[:2] / h[2:4] / h

    def _recover(self) -> None:
        """Drop partial writes; reconcile the index with the files on disk."""
        for tmp in (self.root / "tmp").iterdir():
            tmp.unlink(missing_ok=True)
        indexed = {bytes(r[0]) for r in self._db.execute("SELECT id FROM segments")}
        on_disk: set[bytes] = set()
        for path in (self.root / "segments").glob("*/*/*"):
            try:
                seg_id = bytes.fromhex(path.name)
            except ValueError:
                continue
            if len(seg_id) != ID_SIZE:
                continue
            on_disk.add(seg_id)
            if seg_id not in indexed:
                data = path.read_bytes()
                if _blake3(data) == seg_id:
                    self._db.execute(
                        "INSERT OR REPLACE INTO segments VALUES(?,?,?)",
                        (seg_id, len(data), time.time()),
                    )
                else:
                    os.replace(path, self.root / "quarantine" / path.name)
        for seg_id in indexed - on_disk:
            self._db.execute("DELETE FROM segments WHERE id=?", (seg_id,))

    @property
    def used(self) -> int:
        return self._used

    @property
    def count(self) -> int:
        with self._lock:
            (n,) = self._db.execute("SELECT COUNT(*) FROM segments").fetchone()
        return int(n)

    def has(self, seg_id: bytes) -> bool:
        with self._lock:
            row = self._db.execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone()
        return row is not None

    def size_of(self, seg_id: bytes) -> int:
        with self._lock:
            row = self._db.execute("SELECT size FROM segments WHERE id=?", (seg_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"segment {seg_id.hex()[:16]} is not stored")
        return int(row[0])

    def path_of(self, seg_id: bytes) -> Path:
        self.size_of(seg_id)
        return self._path(seg_id)

    def locate(self, seg_id: bytes) -> tuple[Path, int]:
        """The file and size of a stored segment, without touching the index."""
        path = self._path(seg_id)
        try:
            return path, path.stat().st_size
        except FileNotFoundError:
            raise NotFoundError(f"segment {seg_id.hex()[:16]} is not stored here") from None

    def _write_file(self, tmp: Path, data: bytes | memoryview) -> None:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            os.fsync(fd)
        finally:
            os.close(fd)

    def put(self, seg_id: bytes, data: bytes | memoryview, owner: bytes | None = None) -> bool:
        """Store a segment after checking its hash; False if it was already stored."""
        path = self._path(seg_id)
        if _blake3(data) != seg_id:
            raise IntegrityError(f"segment {seg_id.hex()[:16]} does not match its hash")
        size = len(data)
        with self._lock:
            exists = self._db.execute("SELECT 1 FROM segments WHERE id=?", (seg_id,)).fetchone()
            if exists:
                if owner is not None:
                    self._db.execute("INSERT OR IGNORE INTO refs VALUES(?,?)", (seg_id, owner))
                return False
            if self._used + self._reserved + size > self.capacity:
                raise CapacityError(
                    f"no space: {self._used + self._reserved} of {self.capacity} bytes used, "
                    f"segment needs {size}"
                )
            self._reserved += size
        tmp = self.root / "tmp" / f"{seg_id.hex()}.{threading.get_ident()}.{time.monotonic_ns()}"
        try:
            self._write_file(tmp, data)
            path.parent.mkdir(parents=True, exist_ok=True)
            os.rename(tmp, path)
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            with self._lock:
                self._reserved -= size
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CapacityError(f"no space left on the disk for {self.root}") from None
            raise StorageError(f"cannot write segment: {exc.strerror or exc}") from None
        with self._lock:
            self._reserved -= size
            self._db.execute(
                "INSERT OR REPLACE INTO segments VALUES(?,?,?)", (seg_id, size, time.time())
            )
            if owner is not None:
                self._db.execute("INSERT OR IGNORE INTO refs VALUES(?,?)", (seg_id, owner))
            self._used += size
        return True

    def put_many(
        self, items: Sequence[tuple[bytes, bytes | memoryview]], owner: bytes | None = None
    ) -> int:
        return sum(self.put(seg_id, data, owner) for seg_id, data in items)

    def read(
        self, seg_id: bytes, offset: int = 0, length: int | None = None, verify: bool = True
    ) -> bytes:
        """Read a segment (or a part); a whole read with verify checks the hash."""
        path = self._path(seg_id)
        try:
            with path.open("rb") as fh:
                fh.seek(offset)
                data = fh.read() if length is None else fh.read(length)
        except FileNotFoundError:
            raise NotFoundError(f"segment {seg_id.hex()[:16]} is not stored") from None
        except OSError as exc:
            raise StorageError(f"cannot read segment: {exc.strerror or exc}") from None
        if verify and offset == 0 and length is None and _blake3(data) != seg_id:
            self._quarantine(seg_id)
            raise IntegrityError(f"stored segment {seg_id.hex()[:16]} is damaged")
        return data

    def _quarantine(self, seg_id: bytes) -> None:
        path = self._path(seg_id)
        with contextlib.suppress(OSError):
            os.replace(path, self.root / "quarantine" / path.name)
        with self._lock:
            row = self._db.execute("SELECT size FROM segments WHERE id=?", (seg_id,)).fetchone()
            if row is not None:
                self._db.execute("DELETE FROM segments WHERE id=?", (seg_id,))
                self._used -= int(row[0])

    def add_ref(self, seg_id: bytes, owner: bytes) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO refs VALUES(?,?)", (seg_id, owner))

    def drop_refs(self, owner: bytes) -> list[bytes]:
        with self._lock:
            ids = [
                bytes(r[0]) for r in self._db.execute("SELECT id FROM refs WHERE owner=?", (owner,))
            ]
            self._db.execute("DELETE FROM refs WHERE owner=?", (owner,))
            orphans = [
                i
                for i in ids
                if self._db.execute("SELECT 1 FROM refs WHERE id=?", (i,)).fetchone() is None
            ]
        return orphans

    def delete(self, seg_id: bytes) -> int:
        path = self._path(seg_id)
        with self._lock:
            row = self._db.execute("SELECT size FROM segments WHERE id=?", (seg_id,)).fetchone()
            if row is None:
                return 0
            self._db.execute("DELETE FROM segments WHERE id=?", (seg_id,))
            self._used -= int(row[0])
        path.unlink(missing_ok=True)
        return int(row[0])

    def check(self, fix: bool = False) -> CheckReport:
        with self._lock:
            ids = [bytes(r[0]) for r in self._db.execute("SELECT id FROM segments")]
        corrupt, missing, ok = [], [], 0
        for seg_id in ids:
            try:
                data = self._path(seg_id).read_bytes()
            except FileNotFoundError:
                missing.append(seg_id)
                continue
            if _blake3(data) == seg_id:
                ok += 1
            else:
                corrupt.append(seg_id)
                if fix:
                    self._quarantine(seg_id)
        return CheckReport(len(ids), ok, corrupt, missing)

    def close(self) -> None:
        with self._lock:
            self._db.close()
