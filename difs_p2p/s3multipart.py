"""Staged S3 multipart uploads on a peer's disk (storage only; ``s3api`` serves them).

An S3 client uploads a large object as numbered parts (1-10,000) in any order, possibly in
parallel, then completes the upload with the list of parts it wants. Nothing is published
until then: the parts wait here, and the S3 server publishes their concatenation
(:meth:`MultipartStore.reader`) with ``Client.put`` and calls :meth:`MultipartStore.remove`.
The store never publishes and never touches what is published.

Given the peer's segment store (``segments``, as the peer does), a part is not staged in a
file but stored there as it arrives, cut into segments of the upload's segment size (which
the first part to arrive chooses from its declared size: ``part_segment_size``) and kept
by the part's own owner tag (``s3parts.part_owner``); its row records the segment ids.
When every part but the last is a multiple of that size, the parts make one object
already stored (:meth:`MultipartStore.stored_object`): the server stores its hash list
(:meth:`MultipartStore.store_hash_list`) and publishes it without reading a byte again;
otherwise the parts are read back (verified) and published as a stream. The ``writing``
table names the owner tags whose segments nothing records yet (a part being stored) or
any more (a part replaced, an upload removed): they are released at once, and on the
next open what a crash left there. Segments are charged to the store's capacity like any.

The module is longer than most (about 900 lines): the two ways of keeping parts (files, and
segments in the peer's store) share one index, its crash rules and its expiry, which would
be harder to keep consistent split apart.

Layout under the root (``DATA/s3-uploads/``)::

    index.sqlite3              uploads (id, bucket, key, access key, meta, created) and
                               parts (upload, number, etag, size, modified, file,
                               crc32c: what the reader checks the file against)
    <upload id>/               one directory per upload (the id is 32 hex digits)
    <upload id>/<n>.<gen>      part n; gen is random per write, the row names the file
    <upload id>/.tmp-...       a part being written
    .removed-<upload id>/      an upload removed, its files being deleted

A part is written to a temporary file beside its final one, its MD5 computed as it is
written, fsynced, renamed to a new name and the directory fsynced; only then the index row
is set to that file (a re-upload of a part number replaces the row in one transaction and
the old file is deleted after). A crash (kill -9) at any point leaves a temporary, or a
file no row names, or a row still naming the old complete file: opening the store deletes
temporaries, files without a row and directories without an upload, and drops rows whose
file is missing or not of the recorded size. So a part is the old one or the new one, whole.

Errors are ``s3errors.S3Error`` with the S3 code the client sees: an unknown upload id
(any string a client sends; checked against the id form before any path is built)
``NoSuchUpload``; a part number outside 1-10,000 ``InvalidArgument``; a part larger than
``max_part_size`` ``EntityTooLarge``; a part that would take the staged bytes past
``max_staged`` or a full disk ``ServiceUnavailable`` (503: clients retry later, when
expiry or completed uploads have freed space); a part list naming a part that is not
there ``InvalidPart``. A failed part leaves no temporary and the other parts as they were.

Abandoned uploads are freed by :meth:`MultipartStore.expire` (the S3 server runs it
periodically): an upload whose last activity (creation or its newest part) is older than
``expire_after`` and with no part being written is removed with its files.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

from difs_p2p.classgen import valueclass
from difs_p2p.errors import CapacityError, DifsError, StorageError
from difs_p2p.s3errors import (
    S3Error,
    entity_too_large,
    invalid_argument,
    invalid_part,
    malformed_xml,
    no_such_upload,
    service_unavailable,
)
from difs_p2p.s3parts import (
    REMOVED_PREFIX,
    ChainReader,
    PartRow,
    PartsReader,
    PartWriter,
    Segments,
    SegmentWriter,
    file_size,
    list_owner,
    part_owner,
)
from difs_p2p.segments import encode_hash_list, hash_list_root
from difs_p2p.sqlitedb import Database

__all__ = [
    "MAX_PART_NUMBER",
    "MultipartStore",
    "Part",
    "StoredObject",
    "Upload",
    "multipart_etag",
    "part_segment_size",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")

# S3's limits: part numbers 1-10,000 and at most 5 GiB a part (AWS "Amazon S3 multipart
# upload limits"); the 5 MiB minimum of all parts but the last is checked at completion.
MAX_PART_NUMBER = 10_000
DEFAULT_MAX_PART_SIZE = 5 << 30
# S3's lifecycle rules commonly abort incomplete uploads after a day; --s3-upload-expiry.
DEFAULT_EXPIRE_AFTER = 24 * 3600.0
# Chunks are gathered into batches of about this size for one write in a worker thread:
# large enough that the thread hop is cheap, small enough to bound memory per part.
_BATCH = 1 << 20
_ID = re.compile(r"[0-9a-f]{32}")
# The segment size of an object whose parts go to the segment store, unless its first part
# says otherwise (part_segment_size): every part whose size is a multiple of it (boto3's
# 8 MiB, the CLI's 5 MiB...) is published as it is stored.
PART_SEGMENT_SIZE = 1 << 20
# The largest segment size a part's size may choose (fewer files and fsyncs per part).
MAX_PART_SEGMENT_SIZE = 4 << 20
# Threads storing parts' segments at once (each mostly waits on fsync).
_WRITERS = 8
# Segments stored in one call of the segment store (one worker-thread hop, one transaction).
_SEGMENT_BATCH = 4
# The file column of a part stored as segments: this prefix and its generation.
_SEGMENTS = "seg."
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS uploads (
    id TEXT PRIMARY KEY,
    bucket TEXT NOT NULL,
    key TEXT NOT NULL,
    access_key TEXT NOT NULL,
    meta TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS uploads_by_key ON uploads (bucket, key, created);
CREATE TABLE IF NOT EXISTS parts (
    upload TEXT NOT NULL,
    number INTEGER NOT NULL,
    etag TEXT NOT NULL,
    size INTEGER NOT NULL,
    modified REAL NOT NULL,
    file TEXT NOT NULL,
    crc32c INTEGER,
    PRIMARY KEY (upload, number)
);
CREATE TABLE IF NOT EXISTS writing (
    upload TEXT NOT NULL,
    owner BLOB PRIMARY KEY
);
"""


@valueclass
class Part:
    """A stored part: its number, MD5 (hex, no quotes: its S3 ETag), size, and when."""

    number: int
    etag: str
    size: int
    modified: float


@valueclass
class Upload:
    """An upload in progress: where it will be published, by whom, with what metadata."""

    upload_id: str
    bucket: str
    key: str
    access_key: str
    meta: dict[str, str]
    created: float


@valueclass
class StoredObject:
    """The parts of an upload as one object already in the segment store: its segment
    ids in order, its size and segment size (every segment full but the last)."""

    hashes: list[bytes]
    size: int
    segment_size: int


def part_segment_size(declared: int | None, default: int = PART_SEGMENT_SIZE) -> int:
    """The segment size of an upload whose first part declares ``declared`` bytes: the
    largest power of two up to MAX_PART_SEGMENT_SIZE dividing it, at least ``default``
    (which an undeclared size, or one it does not divide, gets)."""
    if declared is None or declared <= 0 or declared % default:
        return default
    size = default
    while size * 2 <= MAX_PART_SEGMENT_SIZE and declared % (size * 2) == 0:
        size *= 2
    return size


def multipart_etag(digests: list[bytes]) -> str:
    """S3's ETag of a multipart object: MD5 of the parts' binary MD5s, then ``-N``."""
    joined = hashlib.md5(b"".join(digests), usedforsecurity=False)
    return f"{joined.hexdigest()}-{len(digests)}"


def _no_space(doing: str) -> S3Error:
    return service_unavailable(
        f"no space left on the peer for staged uploads while {doing}; retry later"
    )


def _check_number(number: int) -> None:
    is_int = isinstance(number, int) and not isinstance(number, bool)
    if not is_int or not 1 <= number <= MAX_PART_NUMBER:
        raise invalid_argument(
            f"Part number must be an integer between 1 and {MAX_PART_NUMBER}, inclusive",
            "partNumber",
            str(number),
        )


class MultipartStore:
    """Multipart uploads staged under ``root`` (see the module docstring).

    ``expire_after`` (seconds) is the grace time of an abandoned upload; ``max_part_size``
    refuses larger parts; ``max_staged`` (None: only the disk's size) caps the bytes of
    all staged parts together; ``clock`` gives the time of creations, parts and expiry.
    Synchronous methods do small sqlite work and are meant for the event loop; part data
    is written and uploads are deleted in worker threads by the async ones.
    """

    def __init__(
        self,
        root: Path,
        *,
        expire_after: float = DEFAULT_EXPIRE_AFTER,
        max_part_size: int = DEFAULT_MAX_PART_SIZE,
        clock: Callable[[], float] = time.time,
        max_staged: int | None = None,
        segments: Segments | None = None,
        segment_size: int = PART_SEGMENT_SIZE,
    ) -> None:
        self.root = Path(root)
        # the peer's segment store: parts go there as segments (None: staged in files)
        self.segments = segments
        self.segment_size = segment_size
        self.expire_after = expire_after
        self.max_part_size = max_part_size
        self.max_staged = max_staged
        self.clock = clock
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StorageError(f"cannot create {self.root}: {exc.strerror or exc}") from exc
        self.db = Database(self.root / "index.sqlite3", "the multipart upload index", _SCHEMA)
        # an index of an older version
        self.db.add_columns(
            "parts", {"crc32c": "INTEGER", "segments": "BLOB", "seg_size": "INTEGER"}
        )
        self.db.add_columns("uploads", {"seg_size": "INTEGER"})
        # bytes of committed parts, and of parts being written (reserved as they arrive)
        self._staged = 0
        self._writing = 0
        self._count = threading.Lock()  # a damaged part is dropped from a reader's thread
        # threads of their own for the segment store's writes (they wait on fsync): the
        # loop's few default workers stay free for the body checks' hashing
        self._writers = ThreadPoolExecutor(_WRITERS, thread_name_prefix="s3-parts")
        # uploads with a part being written: never expired meanwhile
        self._busy: dict[str, int] = {}
        # deletions of removed uploads' files under way in the loop's executor
        self._deleting: set[asyncio.Future[None]] = set()
        self._recover()

    # -- opening ----------------------------------------------------------------------------

    def _recover(self) -> None:
        """Delete what a crash left (temporaries, files without a row, directories without
        an upload) and the rows whose file is missing or not of the recorded size (with
        the file); count the staged bytes."""
        with self.db.locked("reading the multipart index") as conn:
            uploads = {row[0] for row in conn.execute("SELECT id FROM uploads")}
            rows = {
                (upload, file): size
                for upload, file, size in conn.execute("SELECT upload, file, size FROM parts")
            }
        for entry in os.scandir(self.root):
            if not entry.is_dir(follow_symlinks=False):
                continue
            if entry.name not in uploads:
                log.info("multipart.recover removed=%s reason=no-upload", entry.name)
                shutil.rmtree(entry.path, ignore_errors=True)
                continue
            for item in os.scandir(entry.path):
                if (entry.name, item.name) not in rows:
                    log.info("multipart.recover removed=%s/%s", entry.name, item.name)
                    with contextlib.suppress(OSError):
                        os.unlink(item.path)
        missing = [
            (upload, file)
            for (upload, file), size in rows.items()
            if not file.startswith(_SEGMENTS) and file_size(self.root / upload / file) != size
        ]
        for upload, file in missing:
            with contextlib.suppress(OSError):
                (self.root / upload / file).unlink()
        with self.db.locked("dropping parts whose file is missing") as conn:
            for upload in uploads:
                (self.root / upload).mkdir(exist_ok=True)
            if missing:
                log.warning("multipart.recover dropped_rows=%d reason=file-missing", len(missing))
                conn.executemany("DELETE FROM parts WHERE upload = ? AND file = ?", missing)
            self._staged = int(
                conn.execute("SELECT COALESCE(SUM(size), 0) FROM parts").fetchone()[0]
            )
            writing = [bytes(row[0]) for row in conn.execute("SELECT owner FROM writing")]
        if writing and self.segments is not None:
            # parts whose segments were being stored when the process died
            for owner in writing:
                self.segments.release(owner)
            with self.db.locked("forgetting parts being written") as conn:
                conn.executemany("DELETE FROM writing WHERE owner = ?", [(o,) for o in writing])
            log.info("multipart.recover released_writes=%d", len(writing))

    def close(self) -> None:
        self._writers.shutdown(wait=True)
        self.db.close()

    # -- uploads ----------------------------------------------------------------------------

    def create(self, bucket: str, key: str, access_key: str, meta: dict[str, str]) -> str:
        """Start an upload; its id (32 random hex digits: URL-safe, never starts with -)."""
        for text in (bucket, key, access_key, *meta, *meta.values()):
            if not isinstance(text, str) or not _utf8(text):
                raise invalid_argument("names and metadata must be valid UTF-8 text")
        upload_id = secrets.token_hex(16)
        try:
            (self.root / upload_id).mkdir()
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise _no_space("creating an upload") from exc
            raise StorageError(f"cannot create an upload in {self.root}: {exc}") from exc
        try:
            with self.db.locked("creating an upload") as conn:
                conn.execute(
                    "INSERT INTO uploads (id, bucket, key, access_key, meta, created)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (upload_id, bucket, key, access_key, json.dumps(meta), self.clock()),
                )
        except CapacityError as exc:
            shutil.rmtree(self.root / upload_id, ignore_errors=True)
            raise _no_space("creating an upload") from exc
        return upload_id

    def get(self, upload_id: str) -> Upload | None:
        """The upload, or None for an unknown (or malformed) id."""
        if not isinstance(upload_id, str) or not _ID.fullmatch(upload_id):
            return None
        with self.db.locked("reading an upload") as conn:
            row = conn.execute(
                "SELECT id, bucket, key, access_key, meta, created FROM uploads WHERE id = ?",
                (upload_id,),
            ).fetchone()
        return None if row is None else _upload(row)

    def uploads(self, bucket: str, prefix: str = "") -> list[Upload]:
        """The uploads in progress to ``bucket`` whose key starts with ``prefix``, by key
        (UTF-8 byte order, as S3 lists) and then by creation."""
        if not (_utf8(bucket) and _utf8(prefix)):
            return []  # nothing stored is named so (create refuses it)
        with self.db.locked("listing uploads") as conn:
            rows = conn.execute(
                "SELECT id, bucket, key, access_key, meta, created FROM uploads"
                " WHERE bucket = ? AND substr(key, 1, ?) = ? ORDER BY key, created, id",
                (bucket, len(prefix), prefix),
            ).fetchall()
        return [_upload(row) for row in rows]

    def parts(self, upload_id: str) -> list[Part]:
        """The upload's parts by number; NoSuchUpload for an unknown upload."""
        self._require(upload_id)
        with self.db.locked("listing parts") as conn:
            rows = conn.execute(
                "SELECT number, etag, size, modified FROM parts WHERE upload = ? ORDER BY number",
                (upload_id,),
            ).fetchall()
        return [Part(int(n), str(e), int(s), float(m)) for n, e, s, m in rows]

    def staged_bytes(self) -> int:
        """Bytes of all stored parts plus those being written (for the peer's status)."""
        return self._staged + self._writing

    def _add(self, *, staged: int = 0, writing: int = 0) -> None:
        with self._count:
            self._staged += staged
            self._writing += writing

    def _require(self, upload_id: str) -> Upload:
        upload = self.get(upload_id)
        if upload is None:
            raise no_such_upload(upload_id[:64] if isinstance(upload_id, str) else "")
        return upload

    # -- parts ------------------------------------------------------------------------------

    async def put_part(
        self,
        upload_id: str,
        number: int,
        chunks: AsyncIterator[bytes | memoryview],
        md5: Callable[[], str] | None = None,
        declared: int | None = None,
    ) -> Part:
        """Store part ``number`` of the upload from ``chunks`` (replacing an earlier one).

        ``declared``: the part's size as its request declares it (Content-Length), which
        chooses the upload's segment size if it is the first part to arrive.

        ``md5``, if given, gives the part's MD5 (hex) once ``chunks`` ended: the producer
        hashed the bytes on their way (an S3 body's checks), so they are not hashed again.

        Chunks are copied as they arrive (a producer may reuse its buffer) and written in
        batches of about 1 MiB by a worker thread while the next batch is read: the loop
        never waits on the disk. On any failure (too large, no space, the client gone, the
        upload removed meanwhile) the temporary is deleted and the upload's other parts
        stay as they were.
        """
        _check_number(number)
        self._require(upload_id)
        if self.segments is not None:
            size = self._segment_size(upload_id, declared)
            return await self._put_segments(upload_id, number, chunks, md5, self.segments, size)
        self._part_started(upload_id)
        counted = 0  # bytes of this part in self._writing
        writer: PartWriter | None = None
        recorded = False
        try:
            writer = await _disk(
                upload_id, number, PartWriter, self.root / upload_id, number, md5 is None
            )
            writes = _WriteAhead()
            batch: list[bytes] = []
            gathered = 0
            try:
                async for chunk in chunks:
                    data = bytes(chunk)
                    if not data:
                        continue
                    self._reserve(counted, len(data))
                    counted += len(data)
                    self._add(writing=len(data))
                    batch.append(data)
                    gathered += len(data)
                    if gathered >= _BATCH:
                        await writes.start(_disk, upload_id, number, writer.write, batch)
                        batch, gathered = [], 0
            finally:
                await writes.settle()
            writes.check()
            await _disk(upload_id, number, writer.finish, batch)
            etag = md5() if md5 is not None else None
            part, replaced = await _disk(
                upload_id, number, self._record, upload_id, number, writer, etag
            )
            recorded = True
            self._add(staged=part.size - replaced)
            return part
        finally:
            self._add(writing=-counted)
            if writer is not None and not recorded:
                await asyncio.to_thread(writer.discard)
            self._part_ended(upload_id)

    async def _put_segments(
        self,
        upload_id: str,
        number: int,
        chunks: AsyncIterator[bytes | memoryview],
        md5: Callable[[], str] | None,
        segments: Segments,
        size: int,
    ) -> Part:
        """``put_part`` into the segment store: the part cut into segments of the upload's
        segment size as it arrives, a batch stored (hashed, written, indexed) by a worker
        thread while the next is read. Its owner tag is recorded as being written first,
        so that a crash's leftovers are released on the next open; on any failure its
        segments are released at once."""
        self._part_started(upload_id)
        gen = secrets.token_hex(8)
        owner = part_owner(upload_id, number, gen)
        writer = SegmentWriter(segments, owner, size, md5 is None)
        counted = 0
        recorded = False
        try:
            with self.db.locked(f"starting part {number}") as conn:
                conn.execute(
                    "INSERT INTO writing (upload, owner) VALUES (?, ?)", (upload_id, owner)
                )
            writes = _WriteAhead()
            # segments as their pieces (views of immutable chunks), joined by the writer's
            # thread: the loop never copies a part
            batch: list[list[memoryview]] = []
            pieces: list[memoryview] = []
            held = 0
            try:
                async for chunk in chunks:
                    if not chunk:
                        continue
                    self._reserve(counted, len(chunk))
                    counted += len(chunk)
                    self._add(writing=len(chunk))
                    # a producer may reuse a buffer it lends: only bytes are kept as views
                    view = memoryview(chunk if isinstance(chunk, bytes) else bytes(chunk))
                    while view:
                        take = min(size - held, len(view))
                        pieces.append(view[:take])
                        held += take
                        view = view[take:]
                        if held == size:
                            batch.append(pieces)
                            pieces, held = [], 0
                    if len(batch) >= _SEGMENT_BATCH:
                        await writes.start(
                            _disk, upload_id, number, writer.write, batch, pool=self._writers
                        )
                        batch = []
            finally:
                await writes.settle()
            writes.check()
            if pieces:
                batch.append(pieces)
            if batch:
                await _disk(upload_id, number, writer.write, batch, pool=self._writers)
            etag = md5() if md5 is not None else None
            part, replaced = await _disk(
                upload_id, number, self._record_segments, upload_id, number, gen, writer, etag
            )
            recorded = True
            self._add(staged=part.size - replaced)
            return part
        finally:
            self._add(writing=-counted)
            if not recorded:
                await asyncio.to_thread(self._drop_write, writer)
            self._part_ended(upload_id)

    def _part_started(self, upload_id: str) -> None:
        """A part of ``upload_id`` is being received (expiry leaves the upload alone)."""
        self._busy[upload_id] = self._busy.get(upload_id, 0) + 1

    def _part_ended(self, upload_id: str) -> None:
        count = self._busy.pop(upload_id, 1) - 1
        if count:
            self._busy[upload_id] = count

    def _segment_size(self, upload_id: str, declared: int | None) -> int:
        """The upload's segment size: set by the first part to arrive (parts arrive at
        once, so the first to record it wins and the others read it)."""
        wanted = part_segment_size(declared, self.segment_size)
        with self.db.locked("choosing the segment size") as conn:
            conn.execute(
                "UPDATE uploads SET seg_size = ? WHERE id = ? AND seg_size IS NULL",
                (wanted, upload_id),
            )
            row = conn.execute("SELECT seg_size FROM uploads WHERE id = ?", (upload_id,)).fetchone()
        if row is None:
            raise no_such_upload(upload_id)
        return int(row[0])

    def _drop_write(self, writer: SegmentWriter) -> None:
        """Release a part's segments that were not recorded, and its row in ``writing``."""
        writer.discard()
        with self.db.locked("forgetting a part being written") as conn:
            conn.execute("DELETE FROM writing WHERE owner = ?", (writer.owner,))

    def _record_segments(
        self, upload_id: str, number: int, gen: str, writer: SegmentWriter, etag: str | None
    ) -> tuple[Part, int]:
        """``_record`` for a part stored as segments (worker thread): the row names its
        generation and segment ids, and the write's owner leaves ``writing``."""
        if etag is None:
            assert writer.md5 is not None
            etag = writer.md5.hexdigest()
        part = Part(number, etag, writer.size, self.clock())
        row = (_SEGMENTS + gen, None, b"".join(writer.hashes), writer.segment_size)
        return self._replace_part(upload_id, part, row, writer.owner)

    def _replace_part(
        self,
        upload_id: str,
        part: Part,
        row: tuple[str, int | None, bytes | None, int | None],
        done: bytes | None,
    ) -> tuple[Part, int]:
        """Write the part's row (file, crc32c, segments, seg_size) in place of the one it
        replaces, whichever way either was stored, and free what that one held: its file,
        or its segments (their owner recorded in ``writing`` in the same transaction, so a
        crash before the release leaves them to the next open). ``done``: the owner of the
        new write, which leaves ``writing``. The part and the size it replaced; NoSuchUpload
        if the upload is gone."""
        with self.db.locked(f"recording part {part.number}") as conn, self.db.transaction():
            if conn.execute("SELECT 1 FROM uploads WHERE id = ?", (upload_id,)).fetchone() is None:
                raise no_such_upload(upload_id)
            old = conn.execute(
                "SELECT file, size FROM parts WHERE upload = ? AND number = ?",
                (upload_id, part.number),
            ).fetchone()
            conn.execute(
                "INSERT OR REPLACE INTO parts"
                " (upload, number, etag, size, modified, file, crc32c, segments, seg_size)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (upload_id, part.number, part.etag, part.size, part.modified, *row),
            )
            if done is not None:
                conn.execute("DELETE FROM writing WHERE owner = ?", (done,))
            old_owner = None
            if old is not None and str(old[0]).startswith(_SEGMENTS):
                old_owner = part_owner(upload_id, part.number, str(old[0])[len(_SEGMENTS) :])
                conn.execute(
                    "INSERT OR IGNORE INTO writing (upload, owner) VALUES (?, ?)",
                    (upload_id, old_owner),
                )
        if old is None:
            return part, 0
        if old_owner is not None:
            self._release([old_owner])
        else:
            with contextlib.suppress(OSError):
                (self.root / upload_id / str(old[0])).unlink()
        return part, int(old[1])

    def _release(self, owners: list[bytes]) -> None:
        """Release segment owners recorded in ``writing`` and forget them (worker thread)."""
        if self.segments is None or not owners:
            return
        for owner in owners:
            self.segments.release(owner)
        with self.db.locked("forgetting released parts") as conn:
            conn.executemany("DELETE FROM writing WHERE owner = ?", [(o,) for o in owners])

    def _reserve(self, size: int, more: int) -> None:
        """Refuse ``more`` bytes of a part that has ``size`` when past a limit."""
        if size + more > self.max_part_size:
            raise entity_too_large(size + more, self.max_part_size)
        if self.max_staged is not None and self.staged_bytes() + more > self.max_staged:
            raise _no_space("staging a part")

    def _record(
        self, upload_id: str, number: int, writer: PartWriter, etag: str | None
    ) -> tuple[Part, int]:
        """Point the part's row at the new file (worker thread) and free what the row it
        replaces held; the part (``etag``: its MD5 when the writer did not hash it) and the
        size it replaced. NoSuchUpload if the upload is gone."""
        if etag is None:
            assert writer.md5 is not None
            etag = writer.md5.hexdigest()
        part = Part(number, etag, writer.size, self.clock())
        return self._replace_part(upload_id, part, (writer.final, writer.crc32c, None, None), None)

    def reader(self, upload_id: str, numbers: list[int]) -> BinaryIO:
        """One stream of the parts ``numbers`` in that order (InvalidPart if one is not
        there). The files are opened now: replacing or removing a part afterwards does
        not change what the stream reads. Each part is checked against its size and MD5
        as it is read; a damaged one is dropped and the read raises InvalidPart (the client
        uploads it again). Reads block: read it in a worker thread. The caller closes it."""
        rows = self._part_rows(upload_id, numbers)
        if any(row.hashes is not None for row in rows):
            return io.BufferedReader(ChainReader(self._pieces(rows)), _BATCH)
        opened: list[tuple[io.BufferedReader, PartRow]] = []
        try:
            for row in rows:
                opened.append((open(self.root / upload_id / row.file, "rb"), row))  # noqa: SIM115
        except OSError as exc:
            for fh, _ in opened:
                fh.close()
            raise S3Error("InvalidPart", f"a part cannot be read: {exc.strerror}") from exc
        return io.BufferedReader(PartsReader(opened, self._drop_damaged), _BATCH)

    def _pieces(self, rows: list[PartRow]) -> Iterator[bytes]:
        """The bytes of parts some of which are stored as segments (each read back
        verified from the segment store; a part of an older version read from its file and
        checked), for ``reader``."""
        for row in rows:
            if row.hashes is None:
                try:
                    fh = open(self.root / row.upload / row.file, "rb")  # noqa: SIM115
                except OSError as exc:
                    raise invalid_part(row.number, row.etag) from exc
                with io.BufferedReader(PartsReader([(fh, row)], self._drop_damaged)) as one:
                    while data := one.read(_BATCH):
                        yield data
                continue
            assert self.segments is not None
            for seg_id in row.segment_ids:
                try:
                    yield self.segments.read(seg_id)
                except DifsError as exc:
                    log.warning("multipart.damaged upload=%s part=%d", row.upload, row.number)
                    raise invalid_part(row.number, row.etag) from exc

    def stored_object(self, upload_id: str, numbers: list[int]) -> StoredObject | None:
        """The parts ``numbers`` as one object already in the segment store, if they make
        one: every part stored as segments of one size, every part but the last a multiple
        of it. None otherwise (the parts are then read back with ``reader``)."""
        rows = self._part_rows(upload_id, numbers)
        if any(row.hashes is None for row in rows):
            return None
        size = rows[0].segment_size
        if any(row.segment_size != size for row in rows):
            return None
        if any(row.size % size for row in rows[:-1]):
            return None
        hashes = [seg_id for row in rows for seg_id in row.segment_ids]
        return StoredObject(hashes, sum(row.size for row in rows), size)

    async def store_hash_list(self, upload_id: str, hashes: list[bytes]) -> bytes:
        """Store the hash list of ``hashes`` in the segment store, kept by the upload
        (freed when it is removed); its integrity root."""
        assert self.segments is not None
        segments = self.segments
        hash_list = encode_hash_list(hashes)  # type: ignore[arg-type]
        owner = list_owner(upload_id)

        def put() -> bytes:
            integrity = bytes(hash_list_root(hash_list))
            segments.put_many([(integrity, hash_list)], owner)
            return integrity

        return await _disk(upload_id, 0, put)

    def _drop_damaged(self, row: PartRow) -> None:
        """Forget a part found damaged (if its row still names that file) and delete it."""
        log.warning("multipart.damaged upload=%s part=%d", row.upload, row.number)
        with self.db.locked("dropping a damaged part") as conn:
            gone = conn.execute(
                "DELETE FROM parts WHERE upload = ? AND number = ? AND file = ?",
                (row.upload, row.number, row.file),
            ).rowcount
        if gone:
            self._add(staged=-row.size)
        with contextlib.suppress(OSError):
            (self.root / row.upload / row.file).unlink()

    def multipart_etag(self, upload_id: str, numbers: list[int]) -> str:
        """The ETag of the object the parts ``numbers`` make: ``md5(digests)-N``."""
        rows = self._part_rows(upload_id, numbers)
        return multipart_etag([bytes.fromhex(row.etag) for row in rows])

    def _part_rows(self, upload_id: str, numbers: list[int]) -> list[PartRow]:
        """The rows of ``numbers`` in that order; InvalidPart for a missing one."""
        self._require(upload_id)
        if not numbers:
            raise malformed_xml("a multipart upload needs at least one part")
        with self.db.locked("reading parts") as conn:
            found = {
                int(n): PartRow(
                    upload_id,
                    int(n),
                    str(f),
                    str(e),
                    int(z),
                    None if c is None else int(c),
                    None if h is None else bytes(h),
                    int(g or 0),
                )
                for n, f, e, z, c, h, g in conn.execute(
                    "SELECT number, file, etag, size, crc32c, segments, seg_size FROM parts"
                    " WHERE upload = ?",
                    (upload_id,),
                )
            }
        rows = []
        for number in numbers:
            if number not in found:
                raise invalid_part(number)
            rows.append(found[number])
        return rows

    # -- removal ----------------------------------------------------------------------------

    def remove(self, upload_id: str) -> None:
        """Forget the upload and delete its parts (after completion or on abort);
        NoSuchUpload for an unknown one. A part still being written is then refused.

        Called on the event loop, it only renames the upload's directory to a
        ``.removed-`` name: the files (up to 10,000 parts of 5 GiB) are deleted by a worker
        thread of the loop's executor, which the loop waits for when it shuts down; what a
        crash leaves there is deleted on the next open."""
        owners = self._forget(upload_id)
        gone = self._detach(upload_id)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._delete(gone, owners)
            return
        deleting = loop.run_in_executor(None, self._delete, gone, owners)
        self._deleting.add(deleting)
        deleting.add_done_callback(self._deleting.discard)

    def _delete(self, gone: Path | None, owners: list[bytes]) -> None:
        """Delete a removed upload's files and release its segments (worker thread)."""
        if gone is not None:
            shutil.rmtree(gone, ignore_errors=True)
        try:
            self._release(owners)
        except DifsError as exc:  # released at the next open
            log.warning("multipart.release_failed error=%s", exc)

    def _detach(self, upload_id: str) -> Path | None:
        """Rename a forgotten upload's directory out of the way; the new path."""
        gone = self.root / f"{REMOVED_PREFIX}{upload_id}"
        try:
            os.rename(self.root / upload_id, gone)
        except OSError:
            return None
        return gone

    def _forget(self, upload_id: str) -> list[bytes]:
        """Drop the upload's rows and its bytes from the count; NoSuchUpload if unknown.
        The owner tags of what it keeps in the segment store, for ``_release``."""
        self._require(upload_id)
        with self.db.locked("removing an upload") as conn, self.db.transaction():
            size = conn.execute(
                "SELECT COALESCE(SUM(size), 0) FROM parts WHERE upload = ?", (upload_id,)
            ).fetchone()[0]
            if self.segments is not None:
                # what the upload keeps in the segment store: released next, or at the
                # next open if the process dies first
                gens = conn.execute(
                    "SELECT number, file FROM parts WHERE upload = ? AND segments IS NOT NULL",
                    (upload_id,),
                ).fetchall()
                owners = [part_owner(upload_id, int(n), str(f)[len(_SEGMENTS) :]) for n, f in gens]
                conn.executemany(
                    "INSERT OR IGNORE INTO writing (upload, owner) VALUES (?, ?)",
                    [(upload_id, o) for o in [*owners, list_owner(upload_id)]],
                )
            else:
                owners = []
            conn.execute("DELETE FROM parts WHERE upload = ?", (upload_id,))
            conn.execute("DELETE FROM uploads WHERE id = ?", (upload_id,))
        self._add(staged=-int(size))
        return owners if self.segments is None else [*owners, list_owner(upload_id)]

    async def expire(self, now: float | None = None) -> int:
        """Remove the uploads whose last activity (creation, newest part) is older than
        ``expire_after`` and that have no part being written; how many."""
        cutoff = (self.clock() if now is None else now) - self.expire_after
        with self.db.locked("finding expired uploads") as conn:
            stale = [
                str(row[0])
                for row in conn.execute(
                    "SELECT u.id FROM uploads u LEFT JOIN parts p ON p.upload = u.id"
                    " GROUP BY u.id HAVING MAX(u.created, COALESCE(MAX(p.modified), 0)) < ?",
                    (cutoff,),
                )
            ]
        removed = 0
        for upload_id in stale:
            if upload_id in self._busy:
                continue
            try:
                owners = self._forget(upload_id)
            except S3Error:
                continue  # removed meanwhile
            gone = self._detach(upload_id)
            await asyncio.to_thread(self._delete, gone, owners)
            removed += 1
            log.info("multipart.expired upload=%s", upload_id)
        return removed


def _upload(row: tuple[object, ...]) -> Upload:
    upload_id, bucket, key, access_key, meta, created = row
    return Upload(
        str(upload_id),
        str(bucket),
        str(key),
        str(access_key),
        json.loads(str(meta)),
        float(str(created)),
    )


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


class _WriteAhead:
    """A part's disk writes one at a time, each running in a worker thread while the loop
    reads the next batch: :meth:`start` waits for the write under way, then starts the
    next; :meth:`settle` (in a ``finally``) waits for the last without raising, and
    :meth:`check` raises its error, if any."""

    def __init__(self) -> None:
        self._pending: asyncio.Future[Any] | None = None

    async def start(self, fn: Callable[..., Awaitable[Any]], *args: Any, **kwargs: Any) -> None:
        if self._pending is not None:
            await self._pending
        self._pending = asyncio.ensure_future(fn(*args, **kwargs))

    async def settle(self) -> None:
        if self._pending is not None and not self._pending.done():
            with contextlib.suppress(Exception):
                await self._pending  # its error, if any, is raised by check()

    def check(self) -> None:
        if self._pending is not None:
            self._pending.result()


async def _disk(
    upload_id: str,
    number: int,
    fn: Callable[..., _T],
    *args: object,
    pool: ThreadPoolExecutor | None = None,
) -> _T:
    """``fn(*args)`` in a worker thread, its disk errors translated: the upload's directory
    gone (removed meanwhile) NoSuchUpload, no space ServiceUnavailable, others
    StorageError. Errors of the part's source pass through untouched."""
    try:
        if pool is not None:
            return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        return await asyncio.to_thread(fn, *args)
    except FileNotFoundError as exc:
        raise no_such_upload(upload_id) from exc
    except OSError as exc:
        if exc.errno in _NO_SPACE:
            raise _no_space(f"writing part {number}") from exc
        raise StorageError(f"writing part {number} failed: {exc.strerror or exc}") from exc
    except CapacityError as exc:
        raise _no_space(f"recording part {number}") from exc
