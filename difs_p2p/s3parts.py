"""The files of staged multipart parts: the crash-safe writer and the verified reader.

:mod:`difs_p2p.s3multipart` keeps the index and decides; this module only does the disk
I/O of one part (in worker threads): :class:`PartWriter` writes a temporary beside the
part's final name with the MD5 as it goes (unless its caller hashed the bytes already),
fsyncs, renames and fsyncs the directory;
:class:`PartsReader` reads parts one after the other as one stream, each checked against
the size and CRC32C of its index row when it ends (the MD5 was checked as the part
arrived; a CRC32C costs a fraction of a second pass of MD5). File names are ``<number>.<16 hex>``
(random per write), temporaries ``.tmp-<number>.<16 hex>``; an upload removed is renamed to
``.removed-<upload id>`` while its files are deleted.

With the peer's segment store at hand, a part is not staged in a file: :class:`SegmentWriter`
cuts it into segments of the upload's segment size as it arrives and stores them in the
segment store (BLAKE3 once per segment, in the writing thread, the store taking that id
without hashing again; MD5 unless its caller hashed the bytes), kept by the
part's own owner tag (:func:`part_owner`: upload, number and a random generation), so that
releasing that tag frees exactly that write of the part. The upload's hash list, stored at
completion, is kept by :func:`list_owner`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import secrets
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Protocol

import blake3
import google_crc32c

from difs_p2p.classgen import valueclass
from difs_p2p.s3errors import invalid_part

__all__ = [
    "REMOVED_PREFIX",
    "TMP_PREFIX",
    "ChainReader",
    "PartRow",
    "PartWriter",
    "PartsReader",
    "SegmentWriter",
    "Segments",
    "file_size",
    "fsync_dir",
    "list_owner",
    "part_owner",
]

TMP_PREFIX = ".tmp-"
REMOVED_PREFIX = ".removed-"
# Owner tags of a part's segments and of an upload's hash list in the segment store.
PART_OWNER = b"s3-part:"
LIST_OWNER = b"s3-list:"


class Segments(Protocol):
    """What parts need of the peer's segment store (``store.SegmentStore``, a module of
    the same layer as the index's, which therefore does not import it)."""

    def put_many(
        self,
        items: Sequence[tuple[bytes, bytes | bytearray | memoryview]],
        owner: bytes | None = None,
        session: bytes | None = None,
        *,
        hashed: bool = False,
    ) -> int: ...

    def release(self, owner: bytes) -> int: ...

    def read(
        self, seg_id: bytes, offset: int = 0, length: int | None = None, verify: bool = True
    ) -> bytes: ...


def part_owner(upload_id: str, number: int, gen: str) -> bytes:
    """The owner tag of one write (generation ``gen``, 16 hex) of part ``number``."""
    return PART_OWNER + bytes.fromhex(upload_id) + number.to_bytes(2, "big") + bytes.fromhex(gen)


def list_owner(upload_id: str) -> bytes:
    """The owner tag of an upload's hash list (stored when it completes)."""
    return LIST_OWNER + bytes.fromhex(upload_id)


@valueclass
class PartRow:
    """A part's index row, as the reader needs it."""

    upload: str
    number: int
    file: str
    etag: str
    size: int
    # CRC32C of the file's bytes (None for a part staged by an older version: its MD5 is
    # checked instead)
    crc32c: int | None = None
    # a part stored as segments: their ids concatenated, and the segment size
    hashes: bytes | None = None
    segment_size: int = 0

    @property
    def segment_ids(self) -> list[bytes]:
        h = self.hashes or b""
        return [h[i : i + 32] for i in range(0, len(h), 32)]


def fsync_dir(path: Path) -> None:
    """fsync a directory (its entries: a rename in it is then durable)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class PartWriter:
    """One part being written: its temporary file, MD5 and size (used by worker threads).

    A lock orders writes and ``discard``: a write still running in a thread after its
    caller was cancelled finishes before the file is closed, never on a reused fd."""

    def __init__(self, directory: Path, number: int, md5: bool = True) -> None:
        """``md5``: compute the part's MD5 as it is written (not when the caller has it)."""
        self.directory = directory
        gen = secrets.token_hex(8)
        self.tmp = directory / f"{TMP_PREFIX}{number}.{gen}"
        self.final = f"{number}.{gen}"
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.crc32c = 0  # what the reader checks the file against (cheaper than the MD5)
        self.size = 0
        self.lock = threading.Lock()
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)

    def write(self, batch: list[bytes]) -> None:
        with self.lock:
            if self.fd < 0:
                return
            for chunk in batch:
                if self.md5 is not None:
                    self.md5.update(chunk)
                self.crc32c = google_crc32c.extend(self.crc32c, chunk)
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view) :]
                self.size += len(chunk)

    def finish(self, batch: list[bytes]) -> None:
        """Write the last batch, fsync, close and rename to the final name; fsync the
        directory."""
        self.write(batch)
        with self.lock:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = -1
            os.rename(self.tmp, self.directory / self.final)
        fsync_dir(self.directory)

    def discard(self) -> None:
        """Close and delete the temporary, and the renamed file if it got that far."""
        with self.lock:
            if self.fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(self.fd)
                self.fd = -1
            for path in (self.tmp, self.directory / self.final):
                with contextlib.suppress(OSError):
                    path.unlink()


class SegmentWriter:
    """One part stored as segments in the peer's segment store (used by worker threads):
    its segment ids in order, MD5 and size. Every segment is a full ``segment_size`` but
    the last; ``write`` takes whole segments only.

    A lock orders writes and ``discard``: a write still running in a thread after its
    caller was cancelled finishes before the part's segments are released, and a write
    after ``discard`` stores nothing."""

    def __init__(self, store: Segments, owner: bytes, segment_size: int, md5: bool = True) -> None:
        self.store = store
        self.owner = owner
        self.segment_size = segment_size
        self.md5 = hashlib.md5(usedforsecurity=False) if md5 else None
        self.hashes: list[bytes] = []
        self.size = 0
        self.lock = threading.Lock()
        self.discarded = False

    def write(self, batch: list[list[memoryview]]) -> None:
        """Join, hash and store ``batch`` (segments in order, each as its pieces) in one
        store call; CapacityError when the store is full (nothing of the batch stored).
        Each segment is hashed once: the store takes the ids computed here."""
        items: list[tuple[bytes, bytes]] = []
        for pieces in batch:
            segment = b"".join(pieces)  # here, not in the loop: a copy of the whole part
            if self.md5 is not None:
                self.md5.update(segment)
            # one thread per segment: parts arrive in parallel, so BLAKE3's own threads
            # would only contend for the same cores
            items.append((blake3.blake3(segment).digest(), segment))
        with self.lock:
            if self.discarded:
                return
            self.store.put_many(items, self.owner, hashed=True)
            self.hashes.extend(seg_id for seg_id, _ in items)
            self.size += sum(len(segment) for _, segment in items)

    def discard(self) -> None:
        """Release the part's segments (those nothing else keeps are deleted)."""
        with self.lock:
            self.discarded = True
            self.store.release(self.owner)


class PartsReader(io.RawIOBase):
    """The concatenation of open part files, read once in order, each checked against
    its recorded size and CRC32C (its MD5 if it has none) as it ends: a part damaged on
    disk since it was stored raises ``InvalidPart`` (after ``damaged(row)``) instead of
    being read."""

    def __init__(
        self,
        files: list[tuple[io.BufferedReader, PartRow]],
        damaged: Callable[[PartRow], None],
    ) -> None:
        self._files = files
        self._damaged = damaged
        self._at = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._crc32c = 0
        self._size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while self._at < len(self._files):
            fh, row = self._files[self._at]
            n = fh.readinto(buffer)
            if n:
                if row.crc32c is None:
                    self._md5.update(memoryview(buffer)[:n])
                else:
                    data = bytes(memoryview(buffer)[:n])  # the C function takes bytes
                    self._crc32c = google_crc32c.extend(self._crc32c, data)
                self._size += n
                if self._size <= row.size:
                    return n
            intact = (
                self._md5.hexdigest() == row.etag
                if row.crc32c is None
                else self._crc32c == row.crc32c
            )
            if self._size != row.size or not intact:
                self.close()
                self._damaged(row)
                raise invalid_part(row.number, row.etag)
            fh.close()
            self._at += 1
            self._md5 = hashlib.md5(usedforsecurity=False)
            self._crc32c = 0
            self._size = 0
        return 0

    def close(self) -> None:
        for fh, _ in self._files[self._at :]:
            fh.close()
        self._at = len(self._files)
        super().close()


class ChainReader(io.RawIOBase):
    """The bytes of ``pieces`` (an iterator of byte strings) as one stream, read once."""

    def __init__(self, pieces: Iterator[bytes]) -> None:
        self._pieces = pieces
        self._left = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        while not self._left:
            piece = next(self._pieces, None)
            if piece is None:
                return 0
            self._left = memoryview(piece)
        n = min(len(buffer), len(self._left))
        buffer[:n] = self._left[:n]
        self._left = self._left[n:]
        return n

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        if close is not None:
            close()
        super().close()


def file_size(path: Path) -> int:
    """The size of a regular file, -1 if there is none."""
    try:
        st = path.lstat()
    except OSError:
        return -1
    return st.st_size if stat.S_ISREG(st.st_mode) else -1
