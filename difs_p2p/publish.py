"""The publish path's pieces below the API: the pure checks of a publish, and the upload
of an object's segments and hash list to the entry peer.

:meth:`difs_p2p.client.Client.put` runs a publish: it resolves the name, asks
:func:`check_publish` whether this key may publish it, sends the segments with
:func:`upload`, asks the entry peer to ``place`` the replicas (:func:`check_placed` refuses
a placement that left a range without a copy), signs the manifest, ``publish``-es it and
reads the entry peer's answer with :func:`check_published`.
"""

from __future__ import annotations

import asyncio
import collections
import stat
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO

from difs_p2p import ops, segments, wire
from difs_p2p.delegation import Delegation
from difs_p2p.errors import (
    AlreadyExistsError,
    CapacityError,
    DeletedError,
    NetworkError,
    PeerError,
    PermissionDeniedError,
    RemoteUnsupportedError,
    UsageError,
)
from difs_p2p.fetchrun import INLINE_HASH
from difs_p2p.identity import Identity, fingerprint
from difs_p2p.manifest import Manifest, build_manifest
from difs_p2p.names import key_namespace_owner
from difs_p2p.ops import ChainRequest, PlaceReply, PublishReply
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.transfer import Connection, remote_error

# Requests in flight per connection: enough to keep a loopback link busy (measured: 8).
PIPELINE = 8
# With chain replication an ACK waits for every hop's copy: more puts in flight keep the
# chain busy (the peers answer 16 requests per connection at once).
CHAIN_PIPELINE = 16

Progress = Callable[[int], None]


# -- decisions ------------------------------------------------------------------------------


def check_publish(
    name: str,
    previous: Manifest | None,
    publisher: bytes,
    delegation: Delegation | None,
    update: bool,
    now: float,
) -> bytes:
    """The owner ``name`` is published for, if ``publisher`` may publish it now (with its
    ``delegation`` from the owner, as a new version only with ``update``); else
    UsageError, PermissionDeniedError or AlreadyExistsError. ``name`` is normalized and
    ``previous`` is its newest valid version, if any."""
    owner = delegation.owner if delegation is not None else publisher
    if delegation is not None and (delegation.writer != publisher or not delegation.covers(name)):
        raise UsageError(f"the delegation is not for this key or does not cover {name}")
    if delegation is not None and delegation.expires < now:
        expired = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(delegation.expires))
        raise PermissionDeniedError(f"the delegation for {delegation.prefix} expired on {expired}")
    namespace = key_namespace_owner(name)
    if namespace is not None and namespace != fingerprint(owner):
        raise PermissionDeniedError(
            f"{name} is in the namespace of key {namespace}; this key's namespace is "
            f"/key/{fingerprint(owner)}/"
        )
    if previous is not None:
        if previous.owner != owner:
            raise PermissionDeniedError(f"{name} belongs to another publisher")
        if not update and not previous.deleted:
            raise AlreadyExistsError(
                f"{name} already exists (version {previous.version}); "
                "use --update to publish a new version"
            )
    return owner


def check_placed(placed: PlaceReply) -> None:
    """CapacityError if some range of an upload has no copy anywhere: publishing it would
    make a version nobody can fetch (and, once the peers keep only the newest versions,
    could retire the versions before it)."""
    for r in placed.ranges:
        if not r.holders:
            why = "; ".join(placed.warnings[:2])
            raise CapacityError(
                f"segments {r.start}..{r.end} could not be placed on any peer"
                f", so nothing was published ({why or 'no peer took them'})"
            )


def check_published(manifest: Manifest, reply: PublishReply) -> None:
    """Whether the entry peer's answer to ``publish`` means ``manifest`` is published:
    NetworkError if it could not be read back on enough lookup paths or reached fewer
    than the quorum of the name's key/value peers (``required``: the entry peer may be
    cut off from the network; it stores nothing then), AlreadyExistsError if another
    record won. Of a failed publish, the entry peer drops what the client uploaded and
    placed (``abandon``) and the other holders' copies are collected as orphans."""
    if reply.winner is None and reply.required and reply.accepted < reply.required:
        raise NetworkError(
            f"{manifest.name} reached fewer than the {reply.required} key/value peers a "
            f"publish needs ({reply.accepted} took it): it is not published (is the entry "
            "peer cut off from the network? see `difs-peer status`; try again)"
        )
    if reply.winner is None and reply.readable_paths < reply.quorum:
        raise NetworkError(
            f"{manifest.name} was stored but could be read back on only "
            f"{reply.readable_paths} of {reply.quorum} independent lookup paths: it is not "
            "published (try again)"
        )
    if reply.winner != manifest.hash:
        raise AlreadyExistsError(
            f"{manifest.name} was published by another publisher at the same time"
        )


def build_tombstone(publisher: Identity, current: Manifest, top: int, now: float) -> Manifest:
    """The signed tombstone that deletes ``current`` (the name's newest valid version; the
    lineage used versions up to ``top``): PermissionDeniedError if ``publisher`` is not its
    owner, DeletedError if it is a tombstone already."""
    if current.owner != publisher.public_key:
        raise PermissionDeniedError(f"{current.name} belongs to another publisher")
    if current.deleted:
        raise DeletedError(f"{current.name} is already deleted")
    return build_manifest(
        publisher,
        name=current.name,
        version=max(top, current.version) + 1,
        parent=current.hash,
        root=current.lineage_root,
        size=0,
        segment_size=current.segment_size,
        segment_count=0,
        stripes=0,
        replicas=0,
        integrity=segments.hash_list_root(b""),
        deleted=True,
        created=now,
        key=current.key,
    )


# -- the source -----------------------------------------------------------------------------


def read_and_hash(fh: IO[bytes], size: int) -> tuple[bytes, SegmentId]:
    """The next segment of ``fh`` and its id (in a worker thread: one hop for both); two
    empty values at the end of the input.

    A pipe returns what it has; reads go on until the segment is full or the input ends.
    """
    chunk = fh.read(size)
    if chunk and len(chunk) < size:
        parts = [chunk]
        got = len(chunk)
        while got < size and (more := fh.read(size - got)):
            parts.append(more)
            got += len(more)
        chunk = b"".join(parts)
    return chunk, segments.segment_hash(chunk) if chunk else SegmentId(b"")


def source_size(path: Path) -> int | None:
    """The size of the regular file ``path``, None for a FIFO or device (read as a
    stream); UsageError for a directory or a path that cannot be read."""
    try:
        st = path.stat()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"cannot publish {path}: it is a directory")
    return st.st_size if stat.S_ISREG(st.st_mode) else None


def open_source(path: Path) -> IO[bytes]:
    try:
        return path.open("rb")
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror or exc}") from None


# -- the upload -----------------------------------------------------------------------------


class _Pipeline:
    """PUT_SEG frames on one connection with up to ``window`` unacknowledged."""

    def __init__(self, conn: Connection, progress: Progress | None, window: int) -> None:
        self.conn = conn
        self.progress = progress
        self.window = window
        # progress bytes of each frame not acknowledged yet, oldest first
        self.pending: collections.deque[int] = collections.deque()

    async def take_ack(self) -> None:
        frame = await self.conn.read_frame()
        if isinstance(frame, wire.Error):
            raise remote_error(frame, self.conn.peer_address)
        if not isinstance(frame, wire.Ack):
            raise PeerError("expected an ACK")
        length = self.pending.popleft()
        if self.progress and length:
            self.progress(length)

    async def put(self, request_id: int, seg_id: SegmentId, data: bytes, progress: int) -> None:
        if len(self.pending) >= self.window:
            await self.take_ack()
        await self.conn.send(wire.PutSeg(request_id=request_id, seg_id=seg_id, data=data))
        self.pending.append(progress)

    async def drain(self) -> None:
        while self.pending:
            await self.take_ack()


async def _announce(conn: Connection, request: ChainRequest) -> bool:
    """``chain`` on ``conn`` (its exchange held by the caller): False from an entry peer
    that predates it (UNSUPPORTED)."""
    op, args = ops.encode_request(request)
    await conn.send(wire.Call(request_id=0, op=op, args=args))
    frame = await conn.read_frame()
    if isinstance(frame, wire.Error):
        error = remote_error(frame, conn.peer_address)
        if isinstance(error, RemoteUnsupportedError):
            return False
        raise error
    if not isinstance(frame, wire.Reply):
        raise PeerError(f"unexpected reply to {op}")
    ops.decode_reply(op, dict(frame.body))
    return True


async def upload(
    conn: Connection,
    source: Path | IO[bytes],
    segment_size: int,
    progress: Progress | None,
    announce: ChainRequest | None = None,
) -> tuple[list[SegmentId], IntegrityRoot, int]:
    """Send every segment, then the hash list, to the entry peer on ``conn`` with PIPELINE
    puts in flight; the segment hashes, the integrity root and the number of bytes sent.
    With ``announce``, the upload is first announced (``chain``, in the same exchange, so
    no other upload on ``conn`` comes between) and sent with CHAIN_PIPELINE in flight."""
    hashes: list[SegmentId] = []
    size = 0
    fh = await asyncio.to_thread(open_source, source) if isinstance(source, Path) else source
    try:
        async with conn.exchange:  # the ACKs are ours alone
            complete = False
            try:
                chained = announce is not None and await _announce(conn, announce)
                pipeline = _Pipeline(conn, progress, CHAIN_PIPELINE if chained else PIPELINE)
                while True:
                    chunk, seg_id = await asyncio.to_thread(read_and_hash, fh, segment_size)
                    if not chunk:
                        break
                    hashes.append(seg_id)
                    size += len(chunk)
                    await pipeline.put(len(hashes), seg_id, chunk, len(chunk))
                # the hash list goes in the same pipeline (no round trip of its own)
                hash_list = segments.encode_hash_list(hashes)
                if len(hash_list) > INLINE_HASH:
                    integrity = await asyncio.to_thread(segments.hash_list_root, hash_list)
                else:
                    integrity = segments.hash_list_root(hash_list)
                await pipeline.put(len(hashes), integrity, hash_list, 0)
                await pipeline.drain()
                complete = True
            finally:
                if not complete:
                    conn.close()  # ACKs may still be on their way
    finally:
        if fh is not source:
            fh.close()
    return hashes, integrity, size
