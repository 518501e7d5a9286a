"""The Python API: publish, fetch, delete, stat and list versions by name.

A :class:`Client` talks to one peer (its *entry peer*) for DHT work, and fetches segments
straight from their holders. Concurrent tasks may share a Client: their exchanges with the
entry peer take turns on its one connection (``Connection.exchange``), and each fetch
opens its own holder connections. It never trusts what it is told: manifests and holder entries
are verified again here, the hash list against the signed integrity root, and every segment
against its hash before a byte of it is written out.

Example::

    async with Client(("127.0.0.1", 4000), publisher=Identity.generate()) as client:
        await client.put(Path("izone.mp4"), "/a.com/izone.mp4")
        await client.get("/a.com/izone.mp4", Path("copy.mp4"))
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import io
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from difs_p2p import segments, wire
from difs_p2p.errors import (
    AlreadyExistsError,
    DeletedError,
    DifsError,
    IntegrityError,
    NotFoundError,
    PeerError,
    PermissionDeniedError,
    UsageError,
    WireError,
)
from difs_p2p.identity import Identity
from difs_p2p.manifest import (
    REVOCATIONS,
    Delegation,
    HolderEntry,
    Manifest,
    build_manifest,
    decode_holder_entry,
    parse_manifest,
    verify_holder_entry,
)
from difs_p2p.names import name_key, normalize_name
from difs_p2p.net import HOST_NETWORK, Connector
from difs_p2p.pins import Pins
from difs_p2p.transfer import BufferPool, Connection, remote_error

# Requests in flight per connection: enough to keep a loopback link busy (measured: 8).
PIPELINE = 8
# Parallel holder connections per fetch.
MAX_SOURCES = 8
# Segments a stream fetch may run ahead of the next one it must write (bounds memory).
STREAM_WINDOW = 64
# Default replica count, as in Storj/Garage-style triple replication.
DEFAULT_REPLICAS = 3
# Buffers up to this size are hashed on the event loop: BLAKE3 takes about 10 us for
# 64 KiB here, less than a hop to a worker thread and back.
INLINE_HASH = 64 << 10
# How long the other holders wait for the lead holder's first segment before they start.
LEAD_HEAD_START = 0.05

Progress = Callable[[int], None]


@dataclass(frozen=True, slots=True)
class Resolved:
    """What the entry peer found for a name: manifests verified here; holder entries
    decoded and bound to the name, their signatures checked when first used."""

    manifest: Manifest
    history: list[Manifest]
    # holder entries with valid shape and the name's key, signatures not yet checked
    entries: list[HolderEntry]

    @property
    def holders(self) -> list[HolderEntry]:
        """Every holder entry whose signature is valid."""
        return _verified(self.entries)

    def entries_for(self, manifest: Manifest) -> list[HolderEntry]:
        """The holder entries of ``manifest``'s version, signatures not yet checked."""
        integrity = bytes.fromhex(manifest.integrity)
        return [
            h for h in self.entries if h.version == manifest.version and h.integrity == integrity
        ]

    def holders_for(self, manifest: Manifest) -> list[HolderEntry]:
        """The holder entries of ``manifest``'s version whose signatures are valid."""
        return _verified(self.entries_for(manifest))


def _verified(entries: list[HolderEntry]) -> list[HolderEntry]:
    good = []
    for entry in entries:
        with contextlib.suppress(IntegrityError):
            verify_holder_entry(entry)
            good.append(entry)
    return good


@dataclass(slots=True)
class PublishResult:
    manifest: Manifest
    accepted: int
    ranges: list[dict[str, Any]]
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(slots=True)
class FetchResult:
    manifest: Manifest
    bytes: int
    seconds: float
    first_byte: float
    sources: int
    retries: int
    # seconds of `seconds` spent resolving the name (before the first holder is asked)
    resolve: float = 0.0


def _decode_resolved(
    key: bytes, body: dict[str, Any]
) -> tuple[list[Manifest], list[Manifest], list[HolderEntry]]:
    """Manifests verified; holder entries only decoded (see ``Resolved``)."""
    manifests, history, holders = [], [], []
    for raw in body.get("manifests", []):
        with contextlib.suppress(DifsError, TypeError):
            manifests.append(parse_manifest(raw.encode(), key))
    for raw in body.get("history", []):
        with contextlib.suppress(DifsError, TypeError):
            history.append(parse_manifest(raw.encode(), key))
    for raw in body.get("holders", []):
        with contextlib.suppress(DifsError, TypeError, ValueError):
            entry = decode_holder_entry(bytes.fromhex(raw))
            if entry.key == key:
                holders.append(entry)
    return manifests, history, holders


def merged_spans(spans: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Inclusive ranges merged where they overlap or touch, in order."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1] + 1:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def in_spans(merged: list[tuple[int, int]], index: int) -> bool:
    """Whether ``index`` lies in one of the ``merged_spans``."""
    i = bisect.bisect_right(merged, (index, math.inf)) - 1
    return i >= 0 and merged[i][0] <= index <= merged[i][1]


def _read_and_hash(fh: IO[bytes], size: int) -> tuple[bytes, bytes]:
    """The next segment of ``fh`` and its id (in a worker thread: one hop for both)."""
    chunk = fh.read(size)
    return chunk, bytes(segments.segment_hash(chunk)) if chunk else b""


def _read_chunks(path: Path, size: int) -> Iterator[bytes]:
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


class Client:
    """A connection to an entry peer, plus direct connections to holders while fetching."""

    def __init__(
        self,
        peer: tuple[str, int],
        *,
        publisher: Identity | None = None,
        pins: Pins | None = None,
        io_timeout: float = 30.0,
        clock: Callable[[], float] = time.time,
        network: Connector = HOST_NETWORK,
    ) -> None:
        self.peer = peer
        # How connections are opened: the host's sockets, or the simulator's relay.
        self.network = network
        self.publisher = publisher
        self.pins = pins
        self.io_timeout = io_timeout
        self.clock = clock
        self._conn: Connection | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _call(self, op: str, **args: Any) -> dict[str, Any]:
        conn = await self._data_conn()
        try:
            return await conn.call(op, **args)
        except (PeerError, OSError):
            conn.close()
            raise

    # -- resolve ---------------------------------------------------------------------------

    async def resolve(self, name: str) -> Resolved:
        """The newest valid manifest of ``name``, its history and its holders."""
        norm = normalize_name(name)
        key = name_key(norm)
        body = await self._call("resolve", key=key.hex())
        manifests, history, holders = _decode_resolved(key, body)
        if not manifests:
            raise NotFoundError(f"{norm} is not published")
        best = max(manifests, key=lambda m: m.version)
        best = self._check_pin(norm, best, [*manifests, *history])
        if best.delegation is not None and not norm.endswith("/" + REVOCATIONS):
            await self._check_revocation(best)
        by_version = {m.version: m for m in [*history, *manifests] if m.owner == best.owner}
        return Resolved(best, sorted(by_version.values(), key=lambda m: m.version), holders)

    async def _check_revocation(self, m: Manifest) -> None:
        """Refuse a delegated manifest whose writer the owner has revoked since."""
        assert m.delegation is not None
        listing = m.delegation.prefix.rstrip("/") + "/" + REVOCATIONS
        try:
            resolved = await self.resolve(listing)
        except NotFoundError:
            return
        if resolved.manifest.publisher != m.owner or resolved.manifest.deleted:
            return  # only the owner's own list counts
        buf = io.BytesIO()
        await self.get(listing, buf)
        try:
            revoked = {bytes.fromhex(k) for k in json.loads(buf.getvalue())["revoked"]}
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"the revocation list {listing} is malformed") from None
        if m.publisher in revoked:
            raise PermissionDeniedError(
                f"{m.name} version {m.version} was written by key {m.publisher.hex()}, whose "
                f"delegation for {m.delegation.prefix} the owner revoked"
            )

    async def revoke(self, prefix: str, writer: bytes) -> Manifest:
        """As the owner of ``prefix``: add ``writer`` to the prefix's revocation list."""
        if self.publisher is None:
            raise UsageError("revoking needs the owner's key")
        listing = normalize_name(prefix).rstrip("/") + "/" + REVOCATIONS
        revoked: list[str] = []
        exists = True
        try:
            buf = io.BytesIO()
            await self.get(listing, buf)
            revoked = list(json.loads(buf.getvalue())["revoked"])
        except (NotFoundError, DeletedError):
            exists = False
        if writer.hex() not in revoked:
            revoked.append(writer.hex())
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "revoked.json"
            path.write_text(json.dumps({"revoked": sorted(revoked)}))
            result = await self.put(
                path, listing, segment_size=segments.MIN_SEGMENT_SIZE, update=exists
            )
        return result.manifest

    def _check_pin(self, name: str, best: Manifest, seen: list[Manifest]) -> Manifest:
        """Apply the pinned key of ``name`` (pinning it on first sight)."""
        if self.pins is None:
            return best
        pin = self.pins.pinned(name)
        if pin is None:
            self.pins.pin(name, best.owner)
            return best
        prefix, key = pin
        if best.owner == key:
            return best
        mine = [m for m in seen if m.owner == key]
        if mine:
            return max(mine, key=lambda m: m.version)
        raise PermissionDeniedError(
            f"{name} is now signed by key {best.owner.hex()}, but {prefix} is pinned to "
            f"{key.hex()}; pass --trust {best.owner.hex()} to accept the new key"
        )

    async def versions(self, name: str) -> list[Manifest]:
        """Every known version of ``name`` from the current publisher, oldest first."""
        return (await self.resolve(name)).history

    # -- publish ---------------------------------------------------------------------------

    async def put(
        self,
        source: Path,
        name: str,
        *,
        segment_size: int = segments.DEFAULT_SEGMENT_SIZE,
        replicas: int = DEFAULT_REPLICAS,
        update: bool = False,
        progress: Progress | None = None,
        delegation: Delegation | None = None,
    ) -> PublishResult:
        """Publish the file ``source`` under ``name`` (a new version with ``update``).

        A delegate of the name's owner passes its ``delegation``; the name stays the owner's.
        """
        if self.publisher is None:
            raise UsageError("publishing needs a publisher key")
        if replicas < 1:
            raise UsageError("replicas must be at least 1")
        norm = normalize_name(name)
        segment_size = segments.validate_segment_size(segment_size)
        started = time.perf_counter()
        try:
            size = (await asyncio.to_thread(source.stat)).st_size
        except OSError as exc:
            raise UsageError(f"cannot read {source}: {exc.strerror}") from None
        layout = segments.Layout(size, segment_size)
        try:
            previous: Manifest | None = (await self.resolve(norm)).manifest
        except NotFoundError:
            previous = None
        owner = delegation.owner if delegation is not None else self.publisher.public_key
        if delegation is not None and (
            delegation.writer != self.publisher.public_key or not delegation.covers(norm)
        ):
            raise UsageError(f"the delegation is not for this key or does not cover {norm}")
        if previous is not None:
            if previous.owner != owner:
                raise PermissionDeniedError(f"{norm} belongs to another publisher")
            if not update and not previous.deleted:
                raise AlreadyExistsError(
                    f"{norm} already exists (version {previous.version}); "
                    "use --update to publish a new version"
                )
        try:
            hashes, integrity = await self._upload(source, segment_size, progress)
            if len(hashes) != layout.count:
                raise UsageError(f"{source} changed while it was being published")
            version = previous.version + 1 if previous else 1
            stripes = segments.default_stripes(layout.count)
            placed = await self._call(
                "place",
                key=name_key(norm).hex(),
                version=version,
                integrity=integrity.hex(),
                segment_count=layout.count,
                stripes=stripes,
                replicas=replicas,
            )
            manifest = build_manifest(
                self.publisher,
                name=norm,
                version=version,
                parent=previous.hash if previous else None,
                root=previous.lineage_root if previous else None,
                size=size,
                segment_size=segment_size,
                segment_count=layout.count,
                stripes=stripes,
                replicas=replicas,
                integrity=integrity.hex(),
                created=self.clock(),
                delegation=delegation,
            )
            return await self._publish(manifest, placed, started)
        except BaseException as exc:
            await self._abandon(exc)
            raise

    async def _abandon(self, exc: BaseException) -> None:
        """After a failed publish, tell the entry peer to drop what this connection uploaded
        and placed (``abandon``). Interrupted, or if the peer does not answer, just close
        the connection: the peer then drops it on its own."""
        conn = self._conn
        if conn is None or conn.closed:
            return
        if not isinstance(exc, Exception):  # cancelled or interrupted: do not wait
            conn.close()
            return
        try:
            async with asyncio.timeout(min(self.io_timeout, 10.0)):
                await conn.call("abandon")
        except (DifsError, OSError, TimeoutError):
            conn.close()

    async def _publish(
        self, manifest: Manifest, placed: dict[str, Any], started: float
    ) -> PublishResult:
        result = await self._call(
            "publish", manifest=manifest.raw.decode(), entries=placed.get("entries", [])
        )
        if result.get("winner") != manifest.hash:
            raise AlreadyExistsError(
                f"{manifest.name} was published by another publisher at the same time"
            )
        if self.pins is not None and self.pins.pinned(manifest.name) is None:
            self.pins.pin(manifest.name, manifest.owner)
        return PublishResult(
            manifest=manifest,
            accepted=int(result.get("accepted", 0)),
            ranges=list(placed.get("ranges", [])),
            seconds=time.perf_counter() - started,
            warnings=list(placed.get("warnings", [])),
        )

    async def _data_conn(self) -> Connection:
        """The connection to the entry peer (a new one if the last was closed)."""
        if self._conn is None or self._conn.closed:
            self._conn = await Connection.open(
                self.peer, io_timeout=self.io_timeout, network=self.network
            )
        return self._conn

    async def _upload(
        self, source: Path, segment_size: int, progress: Progress | None
    ) -> tuple[list[bytes], bytes]:
        """Send every segment, then the hash list, to the entry peer with PIPELINE puts in
        flight; the segment hashes and the integrity root."""
        conn = await self._data_conn()
        hashes: list[bytes] = []
        pending: collections.deque[int] = collections.deque()

        async def take_ack() -> None:
            frame = await conn.read_frame()
            if isinstance(frame, wire.Error):
                raise remote_error(frame)
            if not isinstance(frame, wire.Ack):
                raise PeerError("expected an ACK")
            length = pending.popleft()
            if progress and length:
                progress(length)

        async def put(seg_id: bytes, data: bytes, progress_bytes: int) -> None:
            if len(pending) >= PIPELINE:
                await take_ack()
            await conn.send(wire.PutSeg(request_id=len(hashes), seg_id=seg_id, data=data))
            pending.append(progress_bytes)

        integrity = b""
        fh = await asyncio.to_thread(source.open, "rb")
        try:
            async with conn.exchange:  # the ACKs are ours alone
                complete = False
                try:
                    while True:
                        chunk, seg_id = await asyncio.to_thread(_read_and_hash, fh, segment_size)
                        if not chunk:
                            break
                        hashes.append(seg_id)
                        await put(seg_id, chunk, len(chunk))
                    # the hash list goes in the same pipeline (no round trip of its own)
                    hash_list = segments.encode_hash_list(hashes)
                    if len(hash_list) > INLINE_HASH:
                        root = await asyncio.to_thread(segments.hash_list_root, hash_list)
                    else:
                        root = segments.hash_list_root(hash_list)
                    integrity = bytes(root)
                    await put(integrity, hash_list, 0)
                    while pending:
                        await take_ack()
                    complete = True
                finally:
                    if not complete:
                        conn.close()  # ACKs may still be on their way
        finally:
            fh.close()
        return hashes, integrity

    async def rm(self, name: str) -> Manifest:
        """Delete ``name``: publish a signed tombstone; holders then free the segments."""
        if self.publisher is None:
            raise UsageError("deleting needs the publisher key")
        resolved = await self.resolve(name)
        current = resolved.manifest
        if current.owner != self.publisher.public_key:
            raise PermissionDeniedError(f"{current.name} belongs to another publisher")
        if current.deleted:
            raise DeletedError(f"{current.name} is already deleted")
        tombstone = build_manifest(
            self.publisher,
            name=current.name,
            version=current.version + 1,
            parent=current.hash,
            root=current.lineage_root,
            size=0,
            segment_size=current.segment_size,
            segment_count=0,
            stripes=0,
            replicas=0,
            integrity=segments.hash_list_root(b"").hex(),
            deleted=True,
            created=self.clock(),
        )
        await self._publish(tombstone, {}, time.perf_counter())
        return tombstone

    async def stat(self, name: str) -> dict[str, Any]:
        """The manifest in the seed's shape, with holders per range and who answers now."""
        resolved = await self.resolve(name)
        m = resolved.manifest
        holders = resolved.holders_for(m)
        addresses = list(dict.fromkeys((h.host, h.port) for h in holders))
        live = dict(
            zip(
                addresses,
                await asyncio.gather(*(_alive(a, self.network) for a in addresses)),
                strict=True,
            )
        )
        info = m.info()
        info["publisher"] = m.publisher.hex()
        info["owner"] = m.owner.hex()
        info["hash_of_manifest"] = m.hash
        storages = [
            {
                "storage": h.node_id.hex(),
                "address": f"{h.host}:{h.port}",
                "segment": {"start": h.start, "end": h.end},
                "live": live[(h.host, h.port)],
            }
            for h in sorted(holders, key=lambda h: (h.start, h.end, h.node_id))
        ]
        ranges = segments.stripe_ranges(m.segment_count, m.stripes)
        per_range = []
        for start, end in ranges:
            covering = [h for h in holders if h.start <= start and end <= h.end]
            alive = sum(1 for h in covering if live[(h.host, h.port)])
            per_range.append(
                {
                    "start": start,
                    "end": end,
                    "holders": len(covering),
                    "live": alive,
                    "margin": alive - 1,
                }
            )
        return {
            "info": info,
            "storages": storages,
            "ranges": per_range,
            "versions": [v.version for v in resolved.history],
        }

    # -- fetch -----------------------------------------------------------------------------

    async def get(
        self,
        name: str,
        out: Path | IO[bytes],
        *,
        version: int | None = None,
        byte_range: tuple[int, int] | None = None,
        progress: Progress | None = None,
        on_size: Progress | None = None,
        sync: bool = False,
    ) -> FetchResult:
        """Fetch ``name`` (or one version, or an inclusive byte range) into ``out``.

        ``on_size`` is called once with the number of bytes that will be written, before
        the first ``progress`` call. With ``sync`` a file ``out`` is fsynced before this
        returns; without, the bytes are in the page cache, as after ``cp`` or ``curl``
        (the network keeps its own durable copies).
        """
        started = time.perf_counter()
        resolved = await self.resolve(name)
        resolve = time.perf_counter() - started
        manifest = resolved.manifest
        if version is not None:
            match = [m for m in resolved.history if m.version == version]
            if not match:
                raise NotFoundError(f"{manifest.name} has no version {version}")
            manifest = match[0]
        if manifest.deleted:
            raise DeletedError(f"{manifest.name} was deleted (version {manifest.version})")
        # signatures are checked as the fetch comes to each entry (_Fetch._trusted)
        entries = resolved.entries_for(manifest)
        fetch = _Fetch(self, manifest, entries, byte_range, progress, sync)
        if on_size is not None:
            on_size(max(0, fetch.last - fetch.first + 1))
        result = await fetch.run(out, started)
        result.resolve = resolve
        return result


async def _alive(address: tuple[str, int], network: Connector) -> bool:
    """Whether a peer answers a HELLO within 2 s."""
    try:
        conn = await Connection.open(address, io_timeout=2.0, connect_timeout=2.0, network=network)
    except DifsError:
        return False
    try:
        await conn.send(wire.Hello(request_id=0, peer=None))
        return isinstance(await conn.read_frame(), wire.Hello)
    except (DifsError, OSError):
        return False
    finally:
        conn.close()


class _Fetch:
    """One verified, parallel, fail-over fetch into a file or a stream.

    It is given holder entries whose signatures are not checked yet, so that the first
    segment does not wait for hundreds of checks: an entry's signature is checked when
    the fetch first relies on it (before connecting to its holder, before asking that
    holder for a segment of its range); an entry that fails is never used.
    """

    def __init__(
        self,
        client: Client,
        manifest: Manifest,
        holders: list[HolderEntry],
        byte_range: tuple[int, int] | None,
        progress: Progress | None,
        sync: bool = False,
    ) -> None:
        self.client = client
        self.sync = sync
        self.manifest = manifest
        self.holders = holders
        # each holder's entries, and what checking an entry's signature gave (by raw bytes)
        self._by_address: dict[tuple[str, int], list[HolderEntry]] = {}
        for h in holders:
            self._by_address.setdefault((h.host, h.port), []).append(h)
        self._checked: dict[bytes, bool] = {}
        self.layout = segments.Layout(manifest.size, manifest.segment_size)
        if byte_range is None:
            self.first, self.last = 0, manifest.size - 1
        else:
            self.first, self.last = byte_range
            if not (0 <= self.first <= self.last < manifest.size):
                raise UsageError(
                    f"range {self.first}-{self.last} is outside the object (size {manifest.size})"
                )
        self.progress = progress
        self.hashes: list[bytes] = []
        self.retries = 0
        self.first_byte = 0.0
        self.written = 0
        # (holder, segment) pairs that failed verification, reported after the fetch
        self.suspects: list[tuple[tuple[str, int], bytes]] = []
        # connections opened before the transfer, handed to the workers
        self._opened: dict[tuple[str, int], Connection] = {}

    def _sources(self) -> list[tuple[str, int]]:
        return list(self._by_address)

    def _trusted(self, entry: HolderEntry) -> bool:
        """Whether the entry's signature is valid (checked once, on first use)."""
        ok = self._checked.get(entry.raw)
        if ok is None:
            try:
                verify_holder_entry(entry)
                ok = True
            except IntegrityError:
                ok = False
            self._checked[entry.raw] = ok
        return ok

    def _usable(self, address: tuple[str, int]) -> bool:
        """Whether ``address`` has an entry with a valid signature (checked up to the first)."""
        return any(self._trusted(h) for h in self._by_address.get(address, ()))

    def _serves(self, address: tuple[str, int], index: int) -> bool:
        """Whether a valid entry of ``address`` covers segment ``index``."""
        return any(
            h.start <= index <= h.end and self._trusted(h)
            for h in self._by_address.get(address, ())
        )

    def _may_cover(self, index: int) -> list[tuple[str, int]]:
        """Holders with an entry covering ``index`` that is valid or not yet checked."""
        return [
            address
            for address, entries in self._by_address.items()
            if any(h.start <= index <= h.end and self._checked.get(h.raw, True) for h in entries)
        ]

    async def _hash_list(self) -> list[bytes]:
        root = bytes.fromhex(self.manifest.integrity)
        if self.manifest.segment_count == 0:
            return []
        errors: list[str] = []
        for address in self._sources():
            if not self._usable(address):
                errors.append(f"{address[0]}:{address[1]}: no entry with a valid signature")
                continue
            try:
                conn = await Connection.open(
                    address, io_timeout=self.client.io_timeout, network=self.client.network
                )
            except DifsError as exc:
                errors.append(str(exc))
                continue
            try:
                await conn.send(wire.GetSeg(request_id=0, seg_id=root, offset=0, length=0))
                frame = await conn.read_frame()
                if isinstance(frame, wire.Data):
                    hashes: list[bytes] = list(
                        segments.verify_hash_list(
                            bytes(frame.data), root, self.manifest.segment_count
                        )
                    )
                    # this holder's worker starts on the connection we already have
                    self._opened[address] = conn
                    return hashes
                errors.append(f"{address[0]}:{address[1]} has no hash list")
            except (DifsError, WireError) as exc:
                errors.append(str(exc))
            conn.close()
        raise NotFoundError(
            f"no holder of {self.manifest.name} answered with its hash list "
            f"({len(self._sources())} tried: {'; '.join(errors[:3])})"
        )

    async def run(self, out: Path | IO[bytes], started: float) -> FetchResult:
        try:
            return await self._run(out, started)
        finally:
            for conn in self._opened.values():
                conn.close()
            self._opened.clear()

    async def _run(self, out: Path | IO[bytes], started: float) -> FetchResult:
        self.hashes = await self._hash_list()
        if self.manifest.size == 0:
            if isinstance(out, Path):
                await asyncio.to_thread(out.write_bytes, b"")
            return FetchResult(self.manifest, 0, time.perf_counter() - started, 0.0, 0, 0)
        wanted = list(self.layout.segments_for_bytes(self.first, self.last))
        if isinstance(out, Path):
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                await self._fetch(wanted, fd, None, started)
                # A device such as /dev/null cannot be synced (EINVAL); only files are.
                if self.sync and stat.S_ISREG(os.fstat(fd).st_mode):
                    await asyncio.to_thread(os.fsync, fd)
            finally:
                os.close(fd)
        else:
            await self._fetch(wanted, None, out, started)
        return FetchResult(
            self.manifest,
            self.written,
            time.perf_counter() - started,
            self.first_byte,
            len(self._sources()),
            self.retries,
        )

    def _slice(self, index: int) -> tuple[int, int, int]:
        """(offset in object, start within segment, length) of what we need of segment i."""
        offset, length = self.layout.bounds(index)
        lo = max(self.first, offset)
        hi = min(self.last, offset + length - 1)
        return lo, lo - offset, hi - lo + 1

    async def _fetch(
        self, wanted: list[int], fd: int | None, stream: IO[bytes] | None, started: float
    ) -> None:
        queue: collections.deque[int] = collections.deque(wanted)
        failed: dict[int, set[tuple[str, int]]] = collections.defaultdict(set)
        # in-order delivery for streams: index -> data (bounded by the pipelines' depth)
        ready: dict[int, bytes | memoryview] = {}
        order = collections.deque(wanted)
        done = asyncio.Event()
        remaining = {"n": len(wanted)}
        problems: list[str] = []
        sources = self._sources()
        if not sources:
            raise NotFoundError(f"no holder of {self.manifest.name} is known")

        # Receive buffers are reused: a fresh 1 MiB bytearray costs page faults every time.
        pool = BufferPool(2 * PIPELINE * MAX_SOURCES, minimum=self.manifest.segment_size)
        owners: dict[int, bytearray] = {}

        def deliver_stream() -> None:
            assert stream is not None
            while order and order[0] in ready:
                index = order.popleft()
                stream.write(ready.pop(index))
                pool.give(owners.pop(index))

        async def store(index: int, data: bytes | memoryview, buf: bytearray) -> None:
            pos, skip, length = self._slice(index)
            piece = data[skip : skip + length]
            if not self.first_byte:
                self.first_byte = time.perf_counter() - started
                first_out.set()
            if fd is not None:
                await asyncio.to_thread(os.pwrite, fd, piece, pos - self.first)
                pool.give(buf)
            else:
                ready[index] = piece  # a view of the receive buffer, written out in order
                owners[index] = buf
                deliver_stream()
            self.written += len(piece)
            if self.progress:
                self.progress(len(piece))
            remaining["n"] -= 1
            if remaining["n"] == 0:
                done.set()

        def next_for(address: tuple[str, int]) -> int | None:
            for _ in range(len(queue)):
                index = queue.popleft()
                too_far = stream is not None and order and index - order[0] > STREAM_WINDOW
                if not too_far and address not in failed[index] and self._serves(address, index):
                    return index
                queue.append(index)
            return None

        def give_up_check() -> None:
            # Segments no holder failed only need some entry not known to be bad: one
            # look-up in the merged ranges, not a pass over every entry per segment
            # (1,024 segments x 257 entries took 15 ms before the first request).
            spans = merged_spans(
                (h.start, h.end) for h in self.holders if self._checked.get(h.raw, True)
            )
            for index in list(queue):
                if failed.get(index):
                    possible = bool(set(self._may_cover(index)) - failed[index])
                else:
                    possible = in_spans(spans, index)
                if not possible:
                    raise IntegrityError(
                        f"segment {index} of {self.manifest.name} could not be fetched from "
                        f"any holder: {'; '.join(problems[-3:])}"
                    )

        slots = asyncio.Semaphore(2 * PIPELINE)
        # set once the first segment is out (or the lead holder gave up)
        first_out = asyncio.Event()

        async def process(
            address: tuple[str, int], index: int, data: memoryview | bytes, buf: bytearray
        ) -> None:
            try:
                # The first segment out is verified here, without a thread: a thread's
                # result waits for the loop, which is busy receiving the rest of the
                # pipeline (~4 ms of time to first byte for ~0.3 ms of hashing).
                if len(data) <= INLINE_HASH or not self.first_byte:
                    segments.verify_segment(self.hashes[index], data)
                else:
                    await asyncio.to_thread(segments.verify_segment, self.hashes[index], data)
            except IntegrityError as exc:
                pool.give(buf)
                self.suspects.append((address, self.hashes[index]))
                problems.append(f"{address[0]}:{address[1]}: {exc}")
                failed[index].add(address)
                self.retries += 1
                queue.appendleft(index)
                return
            finally:
                slots.release()
            await store(index, data, buf)

        processing: set[asyncio.Task[None]] = set()

        async def worker(address: tuple[str, int], lead: bool) -> None:
            if address not in self._opened and not self._usable(address):
                problems.append(f"{address[0]}:{address[1]}: no entry with a valid signature")
                for index in list(queue):
                    failed[index].add(address)
                if lead:
                    first_out.set()
                return
            try:
                conn = self._opened.pop(address, None) or await Connection.open(
                    address, io_timeout=self.client.io_timeout, network=self.client.network
                )
            except DifsError as exc:
                problems.append(str(exc))
                for index in list(queue):
                    failed[index].add(address)
                if lead:
                    first_out.set()
                return
            if not lead and not first_out.is_set():
                # The first segment comes alone from the lead holder (connected already):
                # started together, every holder's pipeline would compete with it.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(LEAD_HEAD_START):
                        await first_out.wait()
            inflight: collections.deque[int] = collections.deque()
            try:
                while True:
                    requests = []
                    while len(inflight) < PIPELINE:
                        picked = next_for(address)
                        if picked is None:
                            break
                        inflight.append(picked)  # before sending: a failed send requeues it
                        requests.append(
                            wire.GetSeg(
                                request_id=picked, seg_id=self.hashes[picked], offset=0, length=0
                            )
                        )
                    if requests:
                        await conn.send_many(requests)  # one syscall for the batch
                    if not inflight:
                        return
                    index = inflight[0]
                    header = await conn.read_header()
                    if header is None:
                        raise PeerError("connection closed")
                    buf = pool.take(header.length)
                    payload = await conn.read_payload(header, memoryview(buf))
                    frame = wire.decode_payload(header, payload)
                    inflight.popleft()
                    if isinstance(frame, wire.Data):
                        # verify and write while this connection receives the next segment
                        await slots.acquire()
                        task = asyncio.create_task(process(address, index, frame.data, buf))
                        processing.add(task)
                        task.add_done_callback(processing.discard)
                        # Let it start: while bytes keep arriving, sock_recv_into returns
                        # without suspending, and this loop would read the whole pipeline
                        # (8 MiB, ~15 ms) before the first segment is verified and written.
                        await asyncio.sleep(0)
                    else:
                        pool.give(buf)
                        message = frame.message if isinstance(frame, wire.Error) else "bad frame"
                        problems.append(f"{address[0]}:{address[1]}: {message}")
                        failed[index].add(address)
                        self.retries += 1
                        queue.appendleft(index)
            except (DifsError, OSError) as exc:
                problems.append(f"{address[0]}:{address[1]}: {exc}")
                for index in inflight:
                    failed[index].add(address)
                    queue.appendleft(index)
                    self.retries += 1
                for index in list(queue):
                    failed[index].add(address)
            finally:
                conn.close()
                if lead:
                    first_out.set()

        def pick_active() -> list[tuple[str, int]]:
            """Holders to run workers on: the one already connected first; with fewer
            segments queued than holders, only as many as there are segments (a 4 KiB
            object needs one connection, not one per holder)."""
            ordered = sorted(sources, key=lambda a: a not in self._opened)
            if len(queue) >= len(ordered):
                return ordered[: MAX_SOURCES * 4]
            able = [
                a
                for a in ordered
                if any(a not in failed[i] and a in self._may_cover(i) for i in queue)
            ]
            return able[: len(queue)]

        try:
            while remaining["n"] > 0:
                give_up_check()
                active = pick_active()
                workers = [asyncio.create_task(worker(a, i == 0)) for i, a in enumerate(active)]
                try:
                    await asyncio.gather(*workers)
                finally:
                    for task in workers:
                        task.cancel()
                await asyncio.gather(*list(processing))
                if remaining["n"] > 0 and not queue:
                    raise PeerError("fetch stalled")
        finally:
            for task in list(processing):
                task.cancel()
        if stream is not None:
            deliver_stream()
            stream.flush()
        await self._report_suspects()

    async def _report_suspects(self) -> None:
        """Tell holders that served corrupt copies, so they check and heal them."""
        for address, seg_id in self.suspects[:16]:
            with contextlib.suppress(DifsError, OSError, TimeoutError):
                async with asyncio.timeout(5):
                    conn = await Connection.open(address, io_timeout=5, network=self.client.network)
                    try:
                        await conn.call("suspect", segment=seg_id.hex())
                    finally:
                        conn.close()
