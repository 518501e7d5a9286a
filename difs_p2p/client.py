"""The Python API: publish, fetch, delete, stat and list versions by name.

A :class:`Client` talks to one peer (its *entry peer*) for DHT work, and fetches segments
straight from their holders. Concurrent tasks may share a Client: their exchanges with the
entry peer take turns on its one connection (``Connection.exchange``), and each fetch
opens its own holder connections. It never trusts what it is told: manifests and holder entries
are verified again here, the hash list against the signed integrity root, and every segment
against its hash before a byte of it is written out.

The module is longer than most (about 1,100 lines): it is the whole Python API, and each
of put, get, open_stream, rm, stat, versions, revoke, claim and list is a short sequence of
requests to the entry peer and holders whose decisions are already pure elsewhere (publish,
fetch, fetchplan, claims, listing, manifest); splitting it would split one connection's
state.

Example::

    async with Client(("127.0.0.1", 4000), publisher=Identity.generate()) as client:
        await client.put(Path("izone.mp4"), "/a.com/izone.mp4")
        await client.get("/a.com/izone.mp4", Path("copy.mp4"))
        async for chunk in client.stream("/a.com/izone.mp4", byte_range=(0, 1023)):
            ...

"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import IO, Any, TypeVar

from difs_p2p import segments
from difs_p2p.claims import (
    ClaimCache,
    admit,
    claim_content,
    claim_prefix,
    claimed_scope,
    publish_key,
    refused,
)
from difs_p2p.classgen import field, valueclass
from difs_p2p.control import OperatorCredential
from difs_p2p.delegation import REVOCATIONS, Delegation
from difs_p2p.errors import (
    AlreadyExistsError,
    ClosedBeforeReplyError,
    DeletedError,
    DifsError,
    IntegrityError,
    NotFoundError,
    PeerError,
    PermissionDeniedError,
    RemoteBusyError,
    UsageError,
)
from difs_p2p.fetch import (
    Fetch,
    FetchResult,
    Progress,
    check_output,
    choose_version,
    fetch_into,
    is_alive,
    merged_spans,
    probe_holds,
)
from difs_p2p.fetchplan import PlanConfig
from difs_p2p.holders import HolderEntry, verify_holder_entry
from difs_p2p.identity import Identity, fingerprint
from difs_p2p.listcache import FolderCache
from difs_p2p.listing import (
    FOLDER,
    OBJECT,
    REMOVED,
    SPLIT,
    ChildEntry,
    Listed,
    ListEntry,
    ListPage,
    build_child,
    checked,
    decode_token,
    decoded_children,
    descend,
    encode_token,
    folder_ancestors,
    group_children,
    listing_root,
    next_issued,
    normalize_folder,
    object_etag,
    owner_fingerprint,
    path_bits,
    place_here,
    shard_key,
    split_below,
    sub_shards,
)
from difs_p2p.manifest import (
    Manifest,
    ObjectMeta,
    build_manifest,
    owned_key,
)
from difs_p2p.membership import cut_off_error
from difs_p2p.names import (
    NameKey,
    claim_name,
    is_claim,
    name_key,
    normalize_name,
    top_prefix,
)
from difs_p2p.net import HOST_NETWORK, Connector
from difs_p2p.ops import (
    MAX_CHILDREN_PER_CALL,
    AbandonRequest,
    AddChildrenRequest,
    ChainRequest,
    ChildrenRequest,
    Op,
    PlaceReply,
    PlaceRequest,
    PublishRequest,
    ResolveReply,
    ResolveRequest,
)
from difs_p2p.pins import Pins
from difs_p2p.placement import domain_of, spread
from difs_p2p.publish import (
    build_tombstone,
    check_placed,
    check_publish,
    check_published,
    source_size,
    upload,
)
from difs_p2p.ranges import ByteRange
from difs_p2p.resolution import (
    Found,
    decode_resolved,
    lineage,
    pinned_choice,
    version_entries,
)
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.stream import STREAM_BUFFER, ObjectStream
from difs_p2p.transfer import Connection

__all__ = [
    "DEFAULT_REPLICAS",
    "MAX_REPLICAS",
    "Client",
    "FetchResult",
    "ListEntry",
    "ListPage",
    "ObjectStream",
    "Phase",
    "Progress",
    "PublishResult",
    "Resolved",
]

# Default replica count, as in Storj/Garage-style triple replication.
DEFAULT_REPLICAS = 3
# Most copies one publish may ask for: each is a full upload by the entry peer, and a
# range's holders are looked up among the closest peers to it (k = 20).
MAX_REPLICAS = 16

R = TypeVar("R")

log = logging.getLogger(__name__)

# Shard reads of one listing in flight at once.
LIST_READS_IN_FLIGHT = 16
# A folder's entry is signed again when a name under it is published only if the one
# stored is older than this (it expires 48 h after its last store).
FOLDER_REFRESH = 12 * 3600.0

# Called with the name of each publish phase as it begins: "upload" (segments to the
# entry peer), "place" (the entry peer pushes replicas), "publish" (manifest to the DHT).
Phase = Callable[[str], None]


@valueclass
class Resolved:
    """What the entry peer found for a name: manifests verified here; holder entries
    decoded and bound to the name, their signatures checked when first used."""

    manifest: Manifest
    history: list[Manifest]
    # holder entries with valid shape and the name's key, signatures not yet checked
    entries: list[HolderEntry]
    # the highest version number the name's lineage has used, valid or not (a version by
    # a revoked writer is skipped by readers but its number is taken): the next is top + 1
    top: int = 0

    @property
    def holders(self) -> list[HolderEntry]:
        """Every holder entry whose signature is valid."""
        return _verified(self.entries)

    def entries_for(self, manifest: Manifest) -> list[HolderEntry]:
        """The holder entries of ``manifest``'s version, signatures not yet checked."""
        return version_entries(self.entries, manifest)

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


@valueclass(frozen=False)
class PublishResult:
    manifest: Manifest
    accepted: int
    ranges: list[dict[str, Any]]
    seconds: float
    warnings: list[str] = field(default_factory=list)
    # seconds of `seconds` spent sending the segments to the entry peer (the upload alone,
    # without resolving the name before it nor placing the replicas after it)
    upload_seconds: float = 0.0


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
        fetch_config: PlanConfig | None = None,
        token: bytes | None = None,
        folders: FolderCache[Listed] | None = None,
    ) -> None:
        """``token``: the entry peer's control token (DATA/control.token); with it the
        client proves itself the peer's operator, which publishing, deleting and ``status``
        need. Without it the client is a stranger: it can resolve and fetch. ``folders``:
        the folder cache of listings (listcache.py) to share with other clients of one
        writer, so that each reads what any of them wrote (default: its own)."""
        self.peer = peer
        self.token = token
        # How connections are opened: the host's sockets, or the simulator's relay.
        self.network = network
        self.publisher = publisher
        self.pins = pins
        self.io_timeout = io_timeout
        self.clock = clock
        # when a fetch counts a holder as late, and when it gives one up
        self.fetch_config = fetch_config or PlanConfig()
        self._conn: Connection | None = None
        # Prefix claims looked up (claims.py): an owner for 60 s, "not claimed" for 10 s.
        self._claims = ClaimCache()
        # Claim lookups under way, per prefix: concurrent readers of one prefix wait for one
        self._claim_lookups: dict[str, asyncio.Future[None]] = {}
        # -- listing pages -- Folders read for a listing, for its next pages (listcache.py):
        # 10 s, 100,000 entries in all; a first page reads again, a put or rm drops its folders.
        self.folders: FolderCache[Listed] = folders if folders is not None else FolderCache()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    async def _request(self, request: Op[R], *, read_only: bool = False) -> R:
        """A typed control request to the entry peer (ops.py) on the data connection.

        A ``read_only`` request on a connection kept from before that the peer closed
        meanwhile (its idle timeout: nothing answered, the socket at its end) is sent once
        more on a new connection; other requests fail, as the peer may have acted on them.
        """
        reused = self._conn is not None and not self._conn.closed
        conn = await self._data_conn()
        try:
            return await conn.request(request)
        except (PeerError, OSError) as exc:
            conn.close()
            if not (read_only and reused and _closed_by_peer(exc)):
                raise
        log.debug("request_retry op=%s reason=closed_while_idle", type(request).__name__)
        return await (await self._data_conn()).request(request)

    # -- resolve ---------------------------------------------------------------------------

    async def resolve(self, name: str) -> Resolved:
        """The newest valid manifest of ``name``, its history and its holders.

        Under a claimed prefix only the claim owner's manifests count, found at the name's
        owned key (claims.py); elsewhere the name key's. The record comes from the owner
        the entry peer's lookup chose (the one most of the k closest peers vouch for:
        ``manifest.choose_records``), or from the pinned owner when this client pinned one.
        Only that owner's lineage counts: history from other keys or other lineages is
        ignored, and versions written by a writer the owner has since revoked are skipped
        (the newest valid version is used).
        """
        norm = normalize_name(name)
        manifests, history, holders = await self._find(norm)
        best = self._check_pin(norm, manifests, history)
        valid = lineage(best, manifests, history)
        if not norm.endswith("/" + REVOCATIONS) and any(m.delegation for m in valid):
            revoked = await self._revoked_writers(valid)
            valid = [m for m in valid if not _revoked(m, revoked)]
            if not valid:
                raise PermissionDeniedError(
                    f"every version of {norm} was written by a key whose delegation the "
                    f"owner revoked (newest: version {best.version}, key {best.publisher.hex()})"
                )
        return Resolved(valid[-1], valid, holders, top=best.version)

    async def _revoked_writers(self, versions: list[Manifest]) -> dict[str, set[bytes]]:
        """The writer keys the owner revoked, per delegated prefix among ``versions``."""
        revoked: dict[str, set[bytes]] = {}
        for m in versions:
            if m.delegation is not None and m.delegation.prefix not in revoked:
                revoked[m.delegation.prefix] = await self._revocations(m)
        return revoked

    async def _revocations(self, m: Manifest) -> set[bytes]:
        """The writers listed in the owner's revocation list for ``m``'s delegation."""
        assert m.delegation is not None
        listing = m.delegation.prefix.rstrip("/") + "/" + REVOCATIONS
        try:
            resolved = await self.resolve(listing)
        except NotFoundError:
            return set()
        if resolved.manifest.publisher != m.owner or resolved.manifest.deleted:
            return set()  # only the owner's own list counts
        buf = io.BytesIO()
        await self.get(listing, buf)
        try:
            return {bytes.fromhex(k) for k in json.loads(buf.getvalue())["revoked"]}
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"the revocation list {listing} is malformed") from None

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
        import tempfile  # here: with shutil, a cost every `difs get` paid at start-up

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "revoked.json"
            path.write_text(json.dumps({"revoked": sorted(revoked)}))
            result = await self.put(
                path, listing, segment_size=segments.MIN_SEGMENT_SIZE, update=exists
            )
        return result.manifest

    def _check_pin(self, name: str, records: list[Manifest], history: list[Manifest]) -> Manifest:
        """The record to use (resolution.pinned_choice with this client's pins)."""
        return pinned_choice(self.pins, name, records, history)

    async def versions(self, name: str) -> list[Manifest]:
        """Every known valid version of ``name`` in its owner's lineage, oldest first."""
        return (await self.resolve(name)).history

    async def version_status(self, name: str) -> list[tuple[Manifest, bool]]:
        """Every known valid version of ``name``, oldest first, each with whether it is
        still retrievable: not deleted, and every range of it held by a holder that says
        so now (holders answer ``holds_ranges``; a collected version has none left,
        although its holder entries stay in the DHT until they expire)."""
        resolved = await self.resolve(name)
        probes: dict[tuple[str, int], list[HolderEntry]] = {}
        for m in resolved.history:
            if not m.deleted:
                for h in resolved.holders_for(m):
                    probes.setdefault((h.host, h.port), []).append(h)
        answers = await asyncio.gather(
            *(probe_holds(a, entries, self.network) for a, entries in probes.items())
        )
        held = [h for got in answers for h in got]
        out = []
        for m in resolved.history:
            integrity = m.integrity
            spans = merged_spans(
                (h.start, h.end)
                for h in held
                if h.version == m.version and h.integrity == integrity
            )
            ranges = segments.stripe_ranges(m.segment_count, m.stripes)
            ok = not m.deleted and all(
                any(a <= start and end <= b for a, b in spans) for start, end in ranges
            )
            out.append((m, ok))
        return out

    # -- publish ---------------------------------------------------------------------------

    async def put(
        self,
        source: Path | IO[bytes],
        name: str,
        *,
        segment_size: int | None = None,
        replicas: int = DEFAULT_REPLICAS,
        update: bool = False,
        progress: Progress | None = None,
        delegation: Delegation | None = None,
        on_phase: Phase | None = None,
        metadata: ObjectMeta | None = None,
        metadata_after: Callable[[], ObjectMeta | None] | None = None,
        fresh: bool = False,
    ) -> PublishResult:
        """Publish ``source`` under ``name`` (a new version with ``update``).

        ``source`` is a file path, or a binary stream (a pipe, stdin) read once, segment by
        segment: memory stays bounded by the upload pipeline whatever the size, which is
        known only at the end (the manifest is signed after the upload). A path to a FIFO
        or a character device is read as a stream. A delegate of the name's owner passes
        its ``delegation``; the name stays the owner's. ``metadata`` (content type, S3
        ETag, user pairs) is signed into this version's manifest; a version published
        without it has none (nothing is inherited from the previous version).
        ``metadata_after``, if given, is called once ``source`` is read whole and gives
        the metadata instead: what is known only then (the S3 API's ETag, the body's MD5).
        ``fresh``: look the name up again once ``source`` is read, so that a version
        published meanwhile (a long upload streamed from a client) is parent of this one.
        ``segment_size``: None for ``segments.default_segment_size`` of the file's size
        (4 MiB from 64 MiB on, else 1 MiB; 1 MiB for a stream).
        """
        if metadata is not None and not isinstance(metadata, ObjectMeta):
            raise UsageError("metadata must be an ObjectMeta")
        if self.publisher is None:
            raise UsageError("publishing needs a publisher key")
        if self.token is None:
            raise PermissionDeniedError(
                "permission denied: uploading needs the entry peer's control token "
                "(Client(token=...); difs: pass --token-file)"
            )
        if not 1 <= replicas <= MAX_REPLICAS:
            raise UsageError(f"replicas must be between 1 and {MAX_REPLICAS}, not {replicas}")
        norm = normalize_name(name)
        if segment_size is not None:
            segment_size = segments.validate_segment_size(segment_size)
        started = time.perf_counter()
        # the size of a regular file, checked against what is read; None for a stream
        expected = (
            await asyncio.to_thread(source_size, source) if isinstance(source, Path) else None
        )
        if segment_size is None:
            segment_size = segments.default_segment_size(expected)
        previous, top, key = await self._target(norm, delegation, update)
        try:
            if on_phase is not None:
                on_phase("upload")
            upload_started = time.perf_counter()
            hashes, integrity, size = await self._upload_announced(
                source, segment_size, progress, expected, key, previous, top, replicas
            )
            uploaded = time.perf_counter() - upload_started
            layout = segments.Layout(size, segment_size)
            if (expected is not None and size != expected) or len(hashes) != layout.count:
                raise UsageError(f"{source} changed while it was being published")
            if fresh:  # versions published while the source was read count
                previous, top, key = await self._target(norm, delegation, update)
            # above every version the lineage used, even one by a since-revoked writer (the
            # name's peers only take a higher version); parented on the newest valid one
            version = max(top, previous.version) + 1 if previous else 1
            stripes = segments.default_stripes(layout.count)
            if on_phase is not None:
                on_phase("place")
            placed = await self._request(
                PlaceRequest(
                    key=key,
                    version=version,
                    integrity=integrity,
                    segment_count=layout.count,
                    stripes=stripes,
                    replicas=replicas,
                )
            )
            check_placed(placed)
            if metadata_after is not None:
                metadata = metadata_after()
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
                integrity=integrity,
                created=self.clock(),
                delegation=delegation,
                key=key,
                meta=metadata,
            )
            if on_phase is not None:
                on_phase("publish")
            result = await self._publish(manifest, placed, started)
            result.upload_seconds = uploaded
        except BaseException as exc:
            await self._abandon(exc)
            raise
        warning = await self._list_name(manifest)
        if warning:
            result.warnings.append(warning)
        return result

    async def _target(
        self, norm: str, delegation: Delegation | None, update: bool
    ) -> tuple[Manifest | None, int, NameKey]:
        """The version ``norm`` has now, the highest its lineage used, and the key a new
        version is published under (checked: this publisher may)."""
        assert self.publisher is not None
        try:
            known = await self.resolve(norm)
            previous: Manifest | None = known.manifest
            top = known.top
        except NotFoundError:
            previous, top = None, 0
        claimed = await self.prefix_owner(norm) if claimed_scope(norm) else None
        # the name's key, and whether this key may publish under the prefix's claim
        key = publish_key(norm, claimed, self.publisher.public_key, delegation)
        check_publish(norm, previous, self.publisher.public_key, delegation, update, self.clock())
        if previous is not None:
            key = previous.key  # a name claimed after its version 1 keeps its key
        return previous, top, key

    async def _upload_announced(
        self,
        source: Path | IO[bytes],
        segment_size: int,
        progress: Progress | None,
        expected: int | None,
        key: NameKey,
        previous: Manifest | None,
        top: int,
        replicas: int,
    ) -> tuple[list[SegmentId], IntegrityRoot, int]:
        """Upload ``source``, announced with ``chain`` when its size is known (a regular,
        non-empty file) so that the entry peer sends each segment along its range's
        holders as it arrives (an entry peer without ``chain`` stores the upload and
        pushes the copies at ``place``). A chain that broke while segments flowed (a hop
        gone: BUSY) is given up (the connection closed: every hop drops what it got) and
        the file uploaded once more, on chains set up afresh that pass over that hop."""
        announce = None
        if expected and isinstance(source, Path):
            count = segments.Layout(expected, segment_size).count
            version = max(top, previous.version) + 1 if previous else 1
            stripes = segments.default_stripes(count)
            announce = ChainRequest(key, version, count, segment_size, stripes, replicas)
        for attempt in range(2):
            try:
                return await self._upload(source, segment_size, progress, announce)
            except RemoteBusyError as exc:
                if announce is None or attempt > 0:
                    raise
                log.info("chain_retry reason=%s", exc)
                if self._conn is not None:
                    self._conn.close()
        raise AssertionError("unreachable")

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
                await conn.request(AbandonRequest())
        except (DifsError, OSError, TimeoutError):
            conn.close()

    async def _publish(
        self, manifest: Manifest, placed: PlaceReply, started: float
    ) -> PublishResult:
        result = await self._request(PublishRequest(manifest.raw.decode(), placed.entries))
        check_published(manifest, result)
        if self.pins is not None and self.pins.pinned(manifest.name) is None:
            self.pins.pin(manifest.name, manifest.owner)
        return PublishResult(
            manifest=manifest,
            accepted=result.accepted,
            ranges=[
                {"start": r.start, "end": r.end, "holders": list(r.holders)} for r in placed.ranges
            ],
            seconds=time.perf_counter() - started,
            warnings=list(placed.warnings),
        )

    async def _data_conn(self) -> Connection:
        """The connection to the entry peer (a new one if the last was closed)."""
        if self._conn is None or self._conn.closed:
            self._conn = await Connection.open(
                self.peer,
                io_timeout=self.io_timeout,
                network=self.network,
                credential=OperatorCredential(self.token) if self.token is not None else None,
            )
        return self._conn

    async def _upload(
        self,
        source: Path | IO[bytes],
        segment_size: int,
        progress: Progress | None,
        announce: ChainRequest | None = None,
    ) -> tuple[list[SegmentId], IntegrityRoot, int]:
        """Send the object's segments and hash list to the entry peer (publish.upload)."""
        return await upload(await self._data_conn(), source, segment_size, progress, announce)

    async def rm(self, name: str) -> Manifest:
        """Delete ``name``: publish a signed tombstone; holders then free the segments."""
        if self.publisher is None:
            raise UsageError("deleting needs the publisher key")
        resolved = await self.resolve(name)
        tombstone = build_tombstone(self.publisher, resolved.manifest, resolved.top, self.clock())
        await self._publish(tombstone, PlaceReply((), (), ()), time.perf_counter())
        warning = await self._list_name(tombstone)
        if warning:
            log.warning("listing_not_updated name=%s reason=%s", tombstone.name, warning)
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
                await asyncio.gather(*(is_alive(a, self.network) for a in addresses)),
                strict=True,
            )
        )
        info = m.info()
        info["publisher"] = m.publisher.hex()
        info["owner"] = m.owner.hex()
        info["hash_of_manifest"] = m.hash
        info["meta"] = m.meta.as_json() if m.meta is not None else None
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
            # failure domains: fewer addresses than holders is a range under-spread
            hosts, networks, _ = spread(domain_of(h.host, h.port) for h in covering)
            per_range.append(
                {
                    "start": start,
                    "end": end,
                    "holders": len(covering),
                    "live": alive,
                    "margin": alive - 1,
                    "addresses": hosts,
                    "networks": networks,
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
        byte_range: tuple[int, int] | ByteRange | None = None,
        progress: Progress | None = None,
        on_size: Progress | None = None,
        sync: bool = False,
    ) -> FetchResult:
        """Fetch ``name`` (or one version, or a byte range) into ``out``.

        ``byte_range`` is a :class:`~difs_p2p.ranges.ByteRange` or an inclusive (first,
        last) pair, with HTTP Range semantics: an end past the object is trimmed, a start
        past it is a UsageError. A path ``out`` is written through a temporary file beside
        it, renamed over it only once every byte is verified: a fetch that fails or is
        cancelled leaves the path as it was (an existing file keeps its content). A device
        or FIFO path is written in place. ``on_size`` is called once with the number of
        bytes that will be written, before the first ``progress`` call. With ``sync`` a
        file ``out`` is fsynced before this returns; without, the bytes are in the page
        cache, as after ``cp`` or ``curl`` (the network keeps its own durable copies).
        """
        if isinstance(out, Path):
            await asyncio.to_thread(check_output, out)
        started = time.perf_counter()
        resolved = await self.resolve(name)
        resolve = time.perf_counter() - started
        manifest = choose_version(resolved.manifest, resolved.history, version)
        span: tuple[int, int] | None = None
        if byte_range is not None:
            if not isinstance(byte_range, ByteRange):
                byte_range = ByteRange(start=byte_range[0], end=byte_range[1])
            span = byte_range.resolve(manifest.size)
        # signatures are checked as the fetch comes to each entry (Fetch._trusted)
        entries = resolved.entries_for(manifest)
        fetch = Fetch(
            manifest,
            entries,
            span,
            progress,
            sync,
            io_timeout=self.io_timeout,
            network=self.network,
            config=self.fetch_config,
        )
        if on_size is not None:
            on_size(max(0, fetch.last - fetch.first + 1))
        result = await fetch_into(fetch, out, started, sync)
        result.resolve = resolve
        return result

    # -- stream ----------------------------------------------------------------------------

    async def open_stream(
        self,
        name: str | Resolved,
        *,
        version: int | None = None,
        span: tuple[int, int] | None = None,
        buffer: int = STREAM_BUFFER,
    ) -> ObjectStream:
        """``name`` (or one version, or the inclusive byte ``span`` of it) as an async
        iterator of verified chunks (:class:`~difs_p2p.stream.ObjectStream`; close it, or
        use ``async with``). ``name`` may be what :meth:`resolve` returned already. The
        span is checked as given: ``0 <= first <= last < size`` (else UsageError; trim an
        HTTP range first, as :meth:`stream` does). Errors of the name (not found,
        deleted) and of reaching its holders for the hash list are raised here, later
        ones by the iteration. ``buffer``: the most bytes of segments the fetch holds
        ahead of the reader (a server with many slow readers passes less)."""
        started = time.perf_counter()
        resolved = name if isinstance(name, Resolved) else await self.resolve(name)
        resolve = time.perf_counter() - started
        manifest = choose_version(resolved.manifest, resolved.history, version)
        if span is not None and (len(span) != 2 or not all(type(x) is int for x in span)):
            raise UsageError(f"span {span!r} is not a pair of byte offsets")
        fetch = Fetch(
            manifest,
            resolved.entries_for(manifest),
            span,
            None,
            io_timeout=self.io_timeout,
            network=self.network,
            config=self.fetch_config,
        )
        return await ObjectStream.open(fetch, started=started, resolve=resolve, buffer=buffer)

    async def stream(
        self,
        name: str | Resolved,
        byte_range: tuple[int, int] | ByteRange | None = None,
        version: int | None = None,
    ) -> AsyncIterator[memoryview]:
        """Verified chunks of ``name`` (or one version, or a byte range with ``get``'s
        HTTP semantics), over :meth:`open_stream`; closing the generator stops the fetch."""
        resolved = name if isinstance(name, Resolved) else await self.resolve(name)
        span: tuple[int, int] | None = None
        if byte_range is not None:
            if not isinstance(byte_range, ByteRange):
                byte_range = ByteRange(start=byte_range[0], end=byte_range[1])
            manifest = choose_version(resolved.manifest, resolved.history, version)
            span = byte_range.resolve(manifest.size)
        async with await self.open_stream(resolved, version=version, span=span) as chunks:
            async for chunk in chunks:
                yield chunk

    # -- prefix claims ---------------------------------------------------------------------

    async def prefix_owner(self, name: str) -> bytes | None:
        """The public key that claimed the first component of ``name`` (a name or a
        prefix: ``/t.com/x`` and ``/t.com/`` alike), None if it is not claimed or is a
        ``/key/<fp>/`` name (owned by its key). Answers are remembered: an owner for 60 s,
        "not claimed" for 10 s; concurrent calls for one prefix share one lookup."""
        prefix = top_prefix(normalize_name(name))
        if prefix is None:
            return None
        while True:
            known = self._claims.get(prefix, self.clock())
            if known is not None:
                return known.owner
            under_way = self._claim_lookups.get(prefix)
            if under_way is None:
                break
            # another task is looking it up: wait (without cancelling its lookup), then
            # read its answer, or look up ourselves if it failed
            await asyncio.wait([under_way])
        owner, _ = await self._claim_lookup(prefix, None)
        return owner

    async def _claim_lookup(
        self, prefix: str, beside: NameKey | None
    ) -> tuple[bytes | None, Found | None]:
        """Look up ``prefix``'s claim (concurrent callers wait for this one) and remember
        it; with ``beside``, that key's records in the same ``resolve`` request (``also``),
        so a name under an unclaimed prefix costs no extra round trip. An entry peer that
        predates ``also`` answers only the first key: the name is then looked up after."""
        done = self._claim_lookups[prefix] = asyncio.get_running_loop().create_future()
        try:
            claim = claim_name(prefix)
            found: Found | None = None
            if beside is None:
                manifests, history, _ = await self._lookup(name_key(claim))
            else:
                reply = await self._resolve_reply(ResolveRequest(beside, also=name_key(claim)))
                found = decode_resolved(beside, reply)
                if reply.also is not None:
                    manifests, history, _ = decode_resolved(name_key(claim), reply.also)
                else:
                    manifests, history, _ = await self._lookup(name_key(claim))
            owner = self._check_pin(claim, manifests, history).owner if manifests else None
            self._claims.put(prefix, owner, self.clock())
            return owner, found
        finally:
            del self._claim_lookups[prefix]
            done.set_result(None)

    async def claim(self, prefix: str) -> Manifest:
        """Claim the first component ``prefix`` (``/t.com/``) for this client's key: publish
        its claim object ``/t.com/@claim``. Claiming a prefix this key owns already
        returns its claim; one another key claimed is a PermissionDeniedError naming that
        key's fingerprint."""
        if self.publisher is None:
            raise UsageError("claiming needs a publisher key")
        scope = claim_prefix(prefix)
        self._claims.forget(scope)
        owner = await self.prefix_owner(scope)
        mine = self.publisher.public_key
        if owner is None:
            try:
                result = await self.put(
                    io.BytesIO(claim_content(scope)),
                    claim_name(scope),
                    segment_size=segments.MIN_SEGMENT_SIZE,
                )
            except AlreadyExistsError:  # another key claimed it at the same time
                self._claims.forget(scope)
                owner = await self.prefix_owner(scope)
            else:
                self._claims.put(scope, mine, self.clock())
                return result.manifest
        if owner != mine:
            shown = fingerprint(owner) if owner is not None else "another key"
            raise PermissionDeniedError(f"{scope} is claimed by {shown}")
        return (await self.resolve(claim_name(scope))).manifest

    async def _find(self, norm: str) -> tuple[list[Manifest], list[Manifest], list[HolderEntry]]:
        """The manifests (admitted by the prefix's claim: claims.admit), history and
        holder entries of the name ``norm``; NotFoundError or PermissionDeniedError when
        none is admitted.

        Under a claimed prefix, the owned key; if nothing of the owner is there, the
        plain key (the owner's names from before its claim). With no claim answer
        remembered, the claim is looked up in the plain key's request (``also``), so a
        name under an unclaimed prefix costs no extra round trip.
        """
        plain = name_key(norm)
        owner: bytes | None = None
        found: Found | None = None
        scope = claimed_scope(norm)
        if scope is not None:
            known = self._claims.get(scope, self.clock())
            if known is not None:
                owner = known.owner
            elif scope in self._claim_lookups:  # another task is looking it up
                owner = await self.prefix_owner(norm)
            else:
                owner, found = await self._claim_lookup(scope, plain)
            if owner is not None:
                at_owned = await self._lookup(owned_key(norm, owner))
                if admit(norm, owner, at_owned[0]):
                    found = at_owned
        if found is None:
            found = await self._lookup(plain)
        manifests, history, holders = found
        usable = admit(norm, owner, manifests)
        if not usable:
            raise refused(norm, owner, manifests)
        return usable, admit(norm, owner, history), holders

    async def _lookup(self, key: NameKey) -> Found:
        """The entry peer's ``resolve`` of ``key``: manifests verified, holder entries
        decoded (``resolution.decode_resolved``)."""
        return decode_resolved(key, await self._resolve_reply(ResolveRequest(key)))

    async def _resolve_reply(self, request: ResolveRequest) -> ResolveReply:
        """A ``resolve`` request's reply; a cut-off entry peer is an error
        (membership.cut_off_error)."""
        reply = await self._request(request, read_only=True)
        cut_off = cut_off_error(self.peer, reply.network, reply.knows, reply.most_seen)
        if cut_off is not None:
            raise cut_off
        return reply

    # -- listing ---------------------------------------------------------------------------

    async def _listing_owner(self, folder: str) -> tuple[str, bytes]:
        """(the owned root above ``folder``, its owner's fingerprint): only a folder with
        one owner has a listing: under ``/key/<fp>/`` (that key's) or under a claimed first
        component (the claim owner's, :meth:`prefix_owner`)."""
        root = listing_root(folder + "/x")
        if root is not None:
            return root
        top = folder.split("/")[1]
        owner = await self.prefix_owner(f"/{top}/")
        if owner is None:
            raise UsageError(
                f"/{top}/ is not claimed, so it has no listing; its owner can claim it with "
                f"`difs claim /{top}/`"
            )
        return f"/{top}", owner_fingerprint(owner)

    async def _shard(self, key: bytes) -> list[ChildEntry]:
        """The valid child entries at one shard key, read through the entry peer."""
        now = self.clock()
        return [e for e in await self._shard_decoded(key) if checked(e, now)]

    async def _shard_decoded(self, key: bytes) -> list[ChildEntry]:
        """The child entries at one shard key that decode and belong there, signatures not
        checked yet (a reader checks those it uses)."""
        raws: list[bytes] = []
        offset = 0
        for _ in range(64):
            reply = await self._request(ChildrenRequest(key, offset), read_only=True)
            for e in reply.entries:
                raws.append(bytes.fromhex(e))
            if reply.next <= offset:
                break
            offset = reply.next
        return decoded_children(raws, key)

    async def _folder(self, owner: bytes, folder: str) -> list[Listed]:
        """Every child of ``folder``, in byte order: its shard tree read level by level
        (into both halves of every split or full shard), grouped per name; signatures
        are checked as names are used."""
        slots = asyncio.Semaphore(LIST_READS_IN_FLIGHT)
        found: list[ChildEntry] = []

        async def read(level: int, bits: int) -> list[tuple[int, int]]:
            async with slots:
                shard = await self._shard_decoded(shard_key(owner, folder, level, bits))
            found.extend(shard)
            return sub_shards(level, bits) if split_below(shard, self.clock()) else []

        todo = [(0, 0)]
        while todo:
            below = await asyncio.gather(*(read(level, bits) for level, bits in todo))
            todo = [s for subs in below for s in subs]
        return group_children(found)

    async def _cached_folder(self, owner: bytes, folder: str, fresh: bool) -> Sequence[Listed]:
        """:meth:`_folder`, or the same folder read less than ``listcache.LIST_CACHE_TTL``
        ago for a continued page (``fresh`` False); a first page always reads it again."""
        key = (owner, folder)
        if not fresh:
            kept = self.folders.get(key, self.clock())
            if kept is not None:
                return kept
        since = self.folders.generation
        read = await self._folder(owner, folder)
        entries = sum(len(listed.candidates) for listed in read)
        self.folders.put(key, read, self.clock(), since, entries)
        return read

    async def list_page(
        self,
        prefix: str,
        *,
        recursive: bool = False,
        after: str | None = None,
        limit: int = 1000,
    ) -> ListPage:
        """One page of the names in folder ``prefix`` (its children; with ``recursive``
        everything below it, folders included), in UTF-8 byte order of the full names,
        after the continuation token ``after``. Deleted names are not listed. A page with a
        token may use folders this client read up to 10 s before (``listcache.py``); a
        first page reads them again."""
        return await self._page(prefix, recursive, after, limit, {})

    async def _page(
        self,
        prefix: str,
        recursive: bool,
        after: str | None,
        limit: int,
        cache: dict[str, Sequence[Listed]],
    ) -> ListPage:
        """A page of :meth:`list_page`; folders already read in ``cache`` are not read
        again (the shards of a folder are in hash order, so every page of a stateless
        listing reads its folders whole)."""
        if not isinstance(limit, int) or limit < 1:
            raise UsageError(f"limit must be a positive number, not {limit!r}")
        folder = normalize_folder(prefix)
        _, owner = await self._listing_owner(folder)
        after_name = decode_token(after) if after is not None else None
        for done in [f for f in cache if not descend(f + "/", after_name)]:
            del cache[done]  # nothing past the token is in it
        out: list[ListEntry] = []
        await self._walk(owner, folder, recursive, after_name, limit + 1, out, cache)
        page = out[:limit]
        more = len(out) > limit
        return ListPage(page, encode_token(page[-1].name) if more else None)

    async def _walk(
        self,
        owner: bytes,
        folder: str,
        recursive: bool,
        after: str | None,
        want: int,
        out: list[ListEntry],
        cache: dict[str, Sequence[Listed]],
    ) -> None:
        """Depth-first in byte order: a folder's entry ("x/") comes before its names,
        which come before the next sibling, so the whole walk is in byte order."""
        if folder not in cache:
            cache[folder] = await self._cached_folder(owner, folder, after is None)
        now = self.clock()
        for listed in cache[folder]:
            if len(out) >= want:
                return
            wanted = after is None or listed.name > after
            inside = recursive and listed.name.endswith("/") and descend(listed.name, after)
            if not (wanted or inside):
                continue  # before the token: its signatures are never checked
            entry = listed.entry(now)
            if entry is None:
                continue
            if wanted:
                out.append(entry)
            if inside and entry.folder:
                await self._walk(owner, entry.name[:-1], True, after, want, out, cache)

    async def add_children(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Store signed child entries (listing.build_child) at ``key`` through the entry
        peer (its operator only): their shard key, or the name key of a name they list.
        Returns the acceptances summed over the key's peers; each peer verifies each entry.
        For writers that lay a folder out at once (``listing.bulk_layout``)."""
        stored = 0
        for i in range(0, len(entries), MAX_CHILDREN_PER_CALL):
            batch = entries[i : i + MAX_CHILDREN_PER_CALL]
            reply = await self._request(AddChildrenRequest(key, tuple(e.hex() for e in batch)))
            stored += reply.stored
        return stored

    async def _list_name(self, manifest: Manifest) -> str:
        """Write the child entries of a just-published (or deleted) name: the object in
        its folder, each folder in the one above, up to the owned root. A name without a
        listing (no owner for its prefix) has none, nor has a claim object. Returns a
        warning, or ""."""
        if self.publisher is None or is_claim(manifest.name):
            return ""
        written: list[bytes] = []
        try:
            root = listing_root(manifest.name)
            if root is None:
                claimed = await self.prefix_owner(manifest.name)
                if claimed is None:
                    return ""
                root = ("/" + manifest.name.split("/")[1], owner_fingerprint(claimed))
            folder, owner = root
            if owner != owner_fingerprint(manifest.owner):
                return ""
            delegation = manifest.delegation
            levels = folder_ancestors(manifest.name, folder)
            try:
                for parent, child, is_folder in levels:
                    if delegation is not None and not delegation.covers(f"{parent}/{child}"):
                        break  # a delegate lists only below its prefix (the owner above it)
                    written.extend(await self._add_child(owner, manifest, parent, child, is_folder))
            finally:  # this writer's next pages read its write
                self.folders.invalidate(owner, [parent for parent, _, _ in levels])
            await self.add_children(manifest.key, written)
        except (DifsError, OSError) as exc:
            return f"the listing of {manifest.name} was not updated: {exc}"
        return ""

    async def _add_child(
        self, owner: bytes, manifest: Manifest, parent: str, child: str, is_folder: bool
    ) -> list[bytes]:
        """Walk ``child``'s shard path in ``parent`` and store its entry where
        ``listing.place_here`` says, marking full shards split on the way. Returns what
        was stored (nothing for a folder whose entry is fresh)."""
        assert self.publisher is not None
        flags = FOLDER if is_folder else OBJECT | (REMOVED if manifest.deleted else 0)
        level, bits = 0, 0
        stored: list[bytes] = []
        while True:
            key = shard_key(owner, parent, level, bits)
            shard = await self._shard(key)
            now = self.clock()
            identity = (owner, parent, child, is_folder)
            issued = next_issued(shard, identity, now)
            entry = build_child(
                self.publisher,
                owner=owner,
                parent=parent,
                child=child,
                flags=flags,
                level=level,
                issued=issued,
                version=0 if is_folder else manifest.version,
                size=0 if is_folder or manifest.deleted else manifest.size,
                created=now if is_folder else manifest.created,
                delegation=manifest.delegation,
                etag="" if is_folder or manifest.deleted else _etag(manifest),
            )
            if place_here(shard, entry):
                fresh = any(
                    e.identity == identity and e.issued > now - FOLDER_REFRESH for e in shard
                )
                if is_folder and fresh:
                    return stored
                await self.add_children(key, [entry.raw])
                return [*stored, entry.raw]
            if not any(e.marker for e in shard):
                marker = build_child(
                    self.publisher,
                    owner=owner,
                    parent=parent,
                    child="",
                    flags=SPLIT,
                    level=level,
                    bits=bits,
                    issued=int(now),
                    delegation=manifest.delegation,
                )
                await self.add_children(key, [marker.raw])
                stored.append(marker.raw)
            level += 1
            bits = path_bits(child, level)

    async def list(
        self,
        prefix: str,
        *,
        recursive: bool = False,
        after: str | None = None,
        page: int = 1000,
    ) -> AsyncIterator[ListEntry]:
        """Every name in folder ``prefix`` (see :meth:`list_page`), ``page`` at a time;
        each folder is read once for the whole iteration."""
        token = after
        cache: dict[str, Sequence[Listed]] = {}
        while True:
            got = await self._page(prefix, recursive, token, page, cache)
            for entry in got.entries:
                yield entry
            if got.next is None:
                return
            token = got.next


def _etag(m: Manifest) -> str:
    """The ETag a version's child entry carries (listing.object_etag)."""
    return object_etag(m.meta.etag if m.meta is not None else None, m.hash)


def _revoked(m: Manifest, revoked: dict[str, set[bytes]]) -> bool:
    """Whether ``m`` was written by a delegate its owner has revoked."""
    d = m.delegation
    return d is not None and m.publisher in revoked.get(d.prefix, set())


def _closed_by_peer(exc: BaseException) -> bool:
    """Whether a request failed because the peer had closed the connection before it
    answered (an end of stream, a reset or a broken pipe), not because it answered."""
    return isinstance(exc, ConnectionError | ClosedBeforeReplyError)
