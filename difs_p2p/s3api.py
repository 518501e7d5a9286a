"""The S3 API: ``difs-peer join --s3 HOST:PORT`` serves path-style S3 (aiohttp).

Bucket = a name's first component, key = the rest: ``s3://a.com/izone.mp4`` is
``/a.com/izone.mp4`` (keys that are not valid DIFS names are escaped or refused:
``s3xml``'s key mapping). One handler takes every request: it authenticates it
(``s3auth.authenticate`` over the path and query exactly as sent), finds the operation
from the method, the path and the sub-resource query (``?uploads``, ``?versions``...), and
answers S3's XML; anything else is 501 NotImplemented. Every answer carries an
``x-amz-request-id``; every error is S3's XML ``Error`` document with its status.

Each access key (``s3keys.KeyStore``) acts through clients of this peer
(:class:`~difs_p2p.client.Client`: up to ``CLIENTS_PER_KEY`` for requests at once, kept
for the server's life) with the key's publisher identity and the peer's control token
(publishing needs it). Buckets are prefix claims: CreateBucket claims ``/bucket/`` for
the key's identity; writes need the bucket to be the key's; reads work on
any claimed bucket (DIFS content is public: any gateway serves it). A bucket's claim is
permanent: DeleteBucket only forgets it in the key's bucket list, the name stays the key's.

An upload is published only whole and checked: the body (aws-chunked framing removed)
goes through the checks (Content-MD5, x-amz-checksum-*, the signed payload hash, chunk
signatures; hashed in worker threads) and only a body that passed them all is published,
its S3 metadata (the MD5 as ETag) signed into the manifest; a failed check publishes
nothing, and readers never see a partial object. A PutObject body over ``SMALL_BODY`` is
published while it arrives (:class:`BodyPipe`: ``Client.put`` reads it in worker
threads, up to ``PIPE_BYTES`` ahead of them), the pipe ending only once the checks passed
and any failure (a check, the client gone) stopping the publish before the manifest is
signed. Up to ``STREAMED_PUTS`` do so at once (each holds a worker thread waiting on its
client); other bodies are received whole first, into memory (up to ``SMALL_BODY``) or a
spool file (``DATA/s3-spool/``), then published. The parts of a multipart upload are
stored in the peer's segment store as they arrive (s3multipart); at completion, parts that
make one object there are published by a :class:`StoredClient` without being read again.

The module is longer than most (about 1,500 lines): it is the whole S3 surface, one small
handler per operation over the Client, whose decisions are pure elsewhere (s3xml, s3auth,
httprules, listing); splitting it would scatter the request context every handler shares.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import io
import logging
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator, Mapping
from pathlib import Path
from typing import IO, Any, TypeVar, cast
from urllib.parse import unquote

from aiohttp import web
from multidict import CIMultiDict

from difs_p2p import classgen, httprules, s3xml
from difs_p2p.classgen import valueclass
from difs_p2p.client import Client, Resolved
from difs_p2p.errors import (
    BadNameError,
    BusyError,
    DeletedError,
    DifsError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)
from difs_p2p.gateway import BODY_BUFFER, host_of, http_url, serve
from difs_p2p.identity import fingerprint
from difs_p2p.listing import decode_token, encode_token, object_etag
from difs_p2p.manifest import Manifest, ObjectMeta
from difs_p2p.names import claim_name
from difs_p2p.ops import ChainRequest, Op, PlaceRequest
from difs_p2p.publish import Progress
from difs_p2p.s3auth import Auth, SignedRequest, authenticate, body_decoder, split_target
from difs_p2p.s3body import BodyChecks
from difs_p2p.s3errors import S3Error, incomplete_body
from difs_p2p.s3keys import KeyStore, S3Key
from difs_p2p.s3multipart import MultipartStore, StoredObject, Upload
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.tasks import TaskSet

log = logging.getLogger(__name__)

R = TypeVar("R")
# How many completed multipart uploads' answers the S3 server keeps for a Complete sent
# again (in memory: a restart forgets them; that Complete then gets NoSuchUpload).
COMPLETED_KEPT = 1024

# The region S3 clients are told (GetBucketLocation answers "" for it, as S3 does).
REGION = "us-east-1"
# Clients one access key's requests use at once at most. Each holds a connection (two
# while it looks up a claim) to the peer from loopback, which counts against the peer's 32
# connections per address unless --no-limit-loopback.
CLIENTS_PER_KEY = 2
# Object bodies streamed at once (as the gateway's MAX_STREAMS); more GETs are answered
# 503 SlowDown, which S3 clients retry.
MAX_STREAMS = 16
# Every part of a multipart upload but the last is at least this large (S3's rule).
MIN_PART_SIZE = 5 << 20
# Seconds between sweeps of abandoned multipart uploads (their grace: the store's).
EXPIRE_EVERY = 3600.0
_REQUEST_ID = web.RequestKey("request_id", str)
# A placeholder S3 ETag as long as any: metadata is checked with it before the body.
_LONGEST_ETAG = "0" * 32 + "-10000"
# Bytes read from a body this server parses whole (Delete, CreateBucket, Complete...).
MAX_XML = s3xml.MAX_BODY
# Bytes read from a request body at once.
READ_CHUNK = 1 << 20
# Bytes of a body hashed by its checks at once (one worker-thread hop).
CHECK_BATCH = 1 << 20
# Bytes of a body written to its spool file at once (one worker-thread hop).
SPOOL_BATCH = 4 << 20
# Bodies up to this size are kept in memory, not spooled: a small object costs no disk
# round trip. (A request holds at most SPOOL_BATCH of its body in memory either way.)
SMALL_BODY = 1 << 20
# Bytes of a streamed PutObject body held between the request and the publish reading it.
PIPE_BYTES = 8 << 20
# PutObject bodies published while they arrive at once; more are spooled first. Each
# holds a worker thread waiting on its client (the default executor has few).
STREAMED_PUTS = 2
# Query parameters that name a sub-resource this server does not implement.
UNSUPPORTED = frozenset(
    {
        "acl",
        "policy",
        "cors",
        "lifecycle",
        "tagging",
        "website",
        "logging",
        "notification",
        "replication",
        "encryption",
        "object-lock",
        "retention",
        "legal-hold",
        "accelerate",
        "requestPayment",
        "inventory",
        "analytics",
        "metrics",
        "intelligent-tiering",
        "ownershipControls",
        "publicAccessBlock",
        "torrent",
        "restore",
        "select",
        "attributes",
    }
)


def s3_url(host: str, port: int) -> str:
    """The URL a local S3 client reaches a server bound to ``host``:``port`` at."""
    return http_url(host, port)


@valueclass
class Target:
    """What a request addresses: a bucket (or none: the service) and a key (or none)."""

    bucket: str
    key: str


def parse_target(raw_path: str) -> Target:
    """The bucket and key of a path-style request path as sent (percent-encoded)."""
    path = raw_path.split("?", 1)[0]
    try:
        text = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise S3Error("InvalidURI", "the path is not UTF-8", 400) from None
    if not text.startswith("/"):
        raise S3Error("InvalidURI", "the path must start with '/'", 400)
    bucket, _, key = text[1:].partition("/")
    return Target(bucket, key)


def signed_request(request: web.BaseRequest) -> SignedRequest:
    """What ``s3auth`` verifies: method, path and query exactly as sent, headers."""
    path, query = split_target(request.raw_path)
    headers: dict[str, str] = {}
    for name, value in request.headers.items():
        low = name.lower()
        headers[low] = f"{headers[low]},{value}" if low in headers else value
    return SignedRequest(request.method, path, query, headers)


def s3_etag(manifest: Manifest) -> str:
    """The ETag an S3 client is shown for a version, quoted: the S3 ETag signed in its
    metadata (the body's MD5, or the multipart ETag) when it has one, else the manifest
    hash (a version published by other means)."""
    meta_etag = manifest.meta.etag if manifest.meta is not None else None
    return f'"{object_etag(meta_etag, manifest.hash)}"'


def s3_content_type(manifest: Manifest, key: str) -> str:
    """The Content-Type of a version: from its metadata, else from the key's extension."""
    ctype = manifest.meta.content_type if manifest.meta is not None else None
    return ctype or httprules.content_type(key)


def user_meta(manifest: Manifest) -> dict[str, str]:
    """The ``x-amz-meta-*`` headers of a version (from its signed metadata)."""
    user = manifest.meta.user if manifest.meta is not None else {}
    return {f"x-amz-meta-{k}": v for k, v in user.items()}


def meta_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The metadata headers of a request kept with an object: Content-Type and the
    ``x-amz-meta-*`` pairs (names lower-case), as a multipart upload stores them."""
    out: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low == "content-type" or low.startswith("x-amz-meta-"):
            out[low] = value
    return out


def object_meta(stored: Mapping[str, str], etag: str | None) -> ObjectMeta:
    """The signed metadata of an object from its metadata headers and its S3 ETag;
    InvalidArgument or MetadataTooLarge when DIFS cannot sign it."""
    user = {k[len("x-amz-meta-") :]: v for k, v in stored.items() if k.startswith("x-amz-meta-")}
    ctype = stored.get("content-type") or None
    try:
        return ObjectMeta(content_type=ctype, etag=etag, user=user)
    except UsageError as exc:
        if "bytes" in str(exc):
            raise S3Error("MetadataTooLarge", str(exc), 400) from None
        raise S3Error("InvalidArgument", str(exc), 400) from None


def version_id(text: str | None) -> int | None:
    """A ``versionId`` as a DIFS version: None for none or ``null`` (the newest)."""
    if text is None or text == "null":
        return None
    if not (text.isascii() and text.isdigit()) or len(text) > 12 or int(text) < 1:
        raise S3Error("InvalidArgument", "Invalid version id specified", 400)
    return int(text)


def parse_copy_source(header: str) -> tuple[str, str, str | None]:
    """(bucket, key, versionId or None) of an ``x-amz-copy-source`` header:
    ``[/]bucket/key[?versionId=v]``, the bucket and key URL-encoded. The version is split
    off the raw text before decoding, and only a literal ``?versionId=`` is one (an encoded
    ``%3F`` and any other ``?`` belong to the key); InvalidArgument without a bucket and a
    key."""
    path, sep, version = header.rpartition("?versionId=")
    if not sep:
        path, version = header, ""
    try:
        text = unquote(path.removeprefix("/"), errors="strict")
    except UnicodeDecodeError:
        raise S3Error("InvalidArgument", "Copy Source is not URL-encoded UTF-8") from None
    src_bucket, _, src_key = text.partition("/")
    if not src_bucket or not src_key:
        raise S3Error("InvalidArgument", "Copy Source must mention the source bucket and key")
    return src_bucket, src_key, unquote(version) if sep else None


def _empty_dir(path: Path) -> None:
    """Create ``path``, or delete the files in it."""
    path.mkdir(parents=True, exist_ok=True)
    for entry in path.iterdir():
        entry.unlink(missing_ok=True)


def _check_lane(checks: BodyChecks, lane: int, batch: list[bytes]) -> None:
    for data in batch:
        checks.update_lane(lane, data)


async def _check_all(checks: BodyChecks, batch: list[bytes]) -> None:
    """Count ``batch`` into ``checks`` in worker threads, one per lane at once."""
    await asyncio.gather(*(asyncio.to_thread(_check_lane, checks, n, batch) for n in checks.lanes))


def _write_all(fh: IO[bytes], batch: list[bytes]) -> None:
    for data in batch:
        fh.write(data)


class KeepingClient(Client):
    """A Client of the S3 server's own peer whose ``place`` asks ``keep``: the peer's
    stored copy is one of the r copies of every range and r - 1 are pushed. The peer
    holds every segment of what the S3 server publishes already (a streamed body is
    never announced along chains, so the entry peer stores it whole; a multipart
    upload's parts are in its store); an upload announced along chains ignores it."""

    async def _request(self, request: Op[R], *, read_only: bool = False) -> R:
        if isinstance(request, PlaceRequest):
            request = cast(Op[R], classgen.replace(request, keep=True))
        return await super()._request(request, read_only=read_only)


class StoredClient(KeepingClient):
    """A Client whose ``put`` publishes an object already in its entry peer's segment
    store (a multipart upload's parts, stored as they arrived): the upload step only
    names the segments and the hash list stored there, so no byte crosses the connection
    and nothing is written or hashed again; resolving, placing (``keep``), signing and
    publishing are ``Client.put``'s own. Its source is never read."""

    def __init__(
        self, entry: tuple[str, int], stored: StoredObject, integrity: bytes, **kwargs: Any
    ) -> None:
        super().__init__(entry, **kwargs)
        self.stored = stored
        self.integrity = integrity

    async def _upload(
        self,
        source: Path | IO[bytes],
        segment_size: int,
        progress: Progress | None,
        announce: ChainRequest | None = None,
    ) -> tuple[list[SegmentId], IntegrityRoot, int]:
        if announce is not None:  # its source is a stream: never announced
            raise UsageError("a stored object is not uploaded along chains")
        if segment_size != self.stored.segment_size:
            raise UsageError("a stored object is published with its own segment size")
        hashes = [SegmentId(h) for h in self.stored.hashes]
        return hashes, IntegrityRoot(SegmentId(self.integrity)), self.stored.size


class _NoSource(io.RawIOBase):
    """The source of a StoredClient's put: reading it is a bug (nothing must publish it)."""

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        raise UsageError("a stored object's source is not read")


class BodyAborted(Exception):
    """The body a :class:`BodyPipe` was carrying failed (its feeder tells why)."""


class BodyPipe:
    """A request body handed from the event loop to the publish's worker threads while it
    arrives: the loop :meth:`put` s chunks (waiting while ``limit`` bytes are unread) and
    :meth:`close` s it only once the body passed every check; a thread :meth:`read` s it
    as a file. :meth:`fail` (a check failed, the client left) makes every read raise
    :class:`BodyAborted`, so the publish stops before signing anything."""

    def __init__(self, limit: int = PIPE_BYTES) -> None:
        self._loop = asyncio.get_running_loop()
        self._cond = threading.Condition()
        self._chunks: deque[bytes] = deque()
        self._held = 0
        self._limit = limit
        self._space = asyncio.Event()
        self.closed = False  # the whole body is in and checked
        self.failed = False

    async def put(self, data: bytes) -> None:
        while True:
            with self._cond:
                if self.failed:
                    raise BodyAborted("the publish stopped reading")
                if self._held < self._limit:
                    self._chunks.append(data)
                    self._held += len(data)
                    self._cond.notify()
                    return
                self._space.clear()
            await self._space.wait()

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._cond.notify_all()

    def fail(self) -> None:
        with self._cond:
            self.failed = True
            self._chunks.clear()
            self._held = 0
            self._cond.notify_all()
        self._loop.call_soon_threadsafe(self._space.set)

    def read(self, size: int = -1) -> bytes:
        """Up to ``size`` bytes (blocks until some are there); b"" at the checked end."""
        with self._cond:
            while not self._chunks and not self.closed and not self.failed:
                self._cond.wait()
            if self.failed:
                raise BodyAborted("the request body failed")
            out: list[bytes] = []
            got = 0
            while self._chunks and (size < 0 or got < size):
                data = self._chunks.popleft()
                if size >= 0 and got + len(data) > size:
                    self._chunks.appendleft(data[size - got :])
                    data = data[: size - got]
                out.append(data)
                got += len(data)
            self._held -= got
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._space.set)
        return b"".join(out)


class S3Server:
    """The S3 server. ``await s3.start(sock)``, then ``await s3.stop()``."""

    def __init__(
        self,
        entry: tuple[str, int],
        *,
        token: bytes,
        keys: KeyStore,
        uploads: MultipartStore,
        spool: Path,
        io_timeout: float = 30.0,
        keepalive: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``entry``: the peer's own TCP service; ``token``: its control token (the
        access keys' clients publish with it); ``keys``: the credential store;
        ``uploads``: where multipart uploads are staged (the server owns both);
        ``spool``: a directory of its own where bodies are written before they are
        published (emptied at start: what a crash left); ``keepalive``: seconds a slow
        answer (:meth:`_Ctx.answer_slowly`) waits before it starts, then between spaces."""
        self.entry = entry
        self.token = token
        self.keys = keys
        self.uploads = uploads
        self.spool = spool
        # bodies being streamed (GetObject), and how many may be at once
        self.streams = 0
        self.max_streams = MAX_STREAMS
        # PutObject bodies being published while they arrive, and how many may be at once
        # (the others are spooled first)
        self.streamed_puts = 0
        self.max_streamed_puts = STREAMED_PUTS
        self._tasks = TaskSet("s3")
        # CompleteMultipartUpload publishes under way, by upload id (s3api answers a
        # Complete sent again meanwhile with the same one)
        self.completing: dict[str, asyncio.Task[bytes]] = {}
        # the answers of the uploads completed last, by upload id, with who completed which
        # key (a Complete sent again after its answer was lost gets the same answer)
        self.completed: collections.OrderedDict[str, tuple[tuple[str, str, str], bytes]] = (
            collections.OrderedDict()
        )
        self.io_timeout = io_timeout
        self.keepalive = keepalive
        self.clock = clock
        # each access key's clients, and how many requests each serves now
        self._clients: dict[str, dict[Client, int]] = {}
        self._runner: web.AppRunner | None = None
        self.bound: tuple[str, int] = ("", 0)
        app = web.Application(client_max_size=MAX_XML)
        app.on_response_prepare.append(self._prepared)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self.app = app

    @property
    def url(self) -> str:
        return s3_url(*self.bound)

    async def start(self, sock: socket.socket) -> None:
        """Serve on ``sock`` (from ``gateway.listen``), which the server now owns."""
        self.bound = (host_of(sock), sock.getsockname()[1])
        try:
            await asyncio.to_thread(_empty_dir, self.spool)
        except BaseException:
            sock.close()
            await self.stop()
            raise
        try:
            self._runner = await serve(self.app, sock)
        except BaseException:
            await self.stop()
            raise
        self._tasks.spawn(self._expire_loop(), "s3-expire")
        log.info("s3_started url=%s", self.url)

    def remember_completed(
        self, upload_id: str, whose: tuple[str, str, str], document: bytes
    ) -> None:
        """Keep the answer of a completed upload (the last COMPLETED_KEPT of them)."""
        self.completed[upload_id] = (whose, document)
        while len(self.completed) > COMPLETED_KEPT:
            self.completed.popitem(last=False)

    def spawn(self, coro: Coroutine[Any, Any, R], name: str) -> asyncio.Task[R]:
        """Run ``coro`` as the server's own task (cancelled when it stops)."""
        return self._tasks.spawn(coro, name)

    async def _expire_loop(self) -> None:
        """Free abandoned multipart uploads (older than the store's grace) every hour."""
        while True:
            removed = await self.uploads.expire()
            if removed:
                log.info("s3_uploads_expired count=%d", removed)
            await asyncio.sleep(EXPIRE_EVERY)

    async def stop(self) -> None:
        """Stop serving: requests under way are cancelled, uploads abandoned."""
        await self._tasks.close()
        if self._runner is not None:
            runner, self._runner = self._runner, None
            await runner.cleanup()
        clients, self._clients = self._clients, {}
        for pool in clients.values():
            for client in pool:
                await client.close()
        self.uploads.close()
        self.keys.close()

    @contextlib.contextmanager
    def client_for(self, key: S3Key) -> Iterator[Client]:
        """A Client the access key acts through for one request: an idle one of its own,
        else a new one up to CLIENTS_PER_KEY, else the least busy (one Client's exchanges
        with the peer take turns on its connection, so requests at once use several)."""
        pool = self._clients.setdefault(key.access_key, {})
        client = min(pool, key=pool.__getitem__, default=None)
        if client is None or (pool[client] > 0 and len(pool) < CLIENTS_PER_KEY):
            first = next(iter(pool), None)  # the key's Clients share one folder cache
            client = KeepingClient(
                self.entry,
                publisher=key.identity,
                token=self.token,
                io_timeout=self.io_timeout,
                folders=first.folders if first is not None else None,
            )
            pool[client] = 0
        pool[client] += 1
        try:
            yield client
        finally:
            pool[client] -= 1

    # -- the one handler -------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        request_id = secrets.token_hex(8).upper()
        request[_REQUEST_ID] = request_id
        resource = request.path
        try:
            target = parse_target(request.raw_path)
            auth = await asyncio.to_thread(self._authenticate, request)
            key = self.keys.get(auth.access_key)
            if key is None:  # deleted since
                raise S3Error("InvalidAccessKeyId", extra={"AWSAccessKeyId": auth.access_key})
            with self.client_for(key) as client:
                response = await _Ctx(self, request, target, auth, key, client).run()
        except Exception as exc:
            err = self.s3_error(exc, request_id, resource)
            response = self._error(err, resource, request_id, request.method)
        return response

    def s3_error(self, exc: Exception, request_id: str, resource: str) -> S3Error:
        """The S3 error a request that raised ``exc`` is answered with."""
        if isinstance(exc, S3Error):
            return exc
        if isinstance(exc, TimeoutError):
            return S3Error("ServiceUnavailable", "the network did not answer in time")
        if isinstance(exc, DifsError):
            return s3_error_of(exc)
        if isinstance(exc, OSError):
            return S3Error("ServiceUnavailable", f"the network failed: {exc}")
        # a bug: answered as S3 does (clients retry), logged with its trace
        log.error("s3_request_failed request_id=%s path=%s", request_id, resource, exc_info=exc)
        return S3Error("InternalError")

    async def _prepared(self, request: web.Request, response: web.StreamResponse) -> None:
        """Each response as its status line goes out: its request id."""
        request_id = request.get(_REQUEST_ID)
        if request_id is not None:
            response.headers["x-amz-request-id"] = request_id

    def _authenticate(self, request: web.Request) -> Auth:
        def secret_of(access_key: str) -> str | None:
            key = self.keys.get(access_key)
            return key.secret if key is not None else None

        return authenticate(signed_request(request), secret_of, self.clock())

    def _error(
        self, exc: S3Error, resource: str, request_id: str, method: str
    ) -> web.StreamResponse:
        body = s3xml.error_xml(exc.code, exc.message, resource, request_id, exc.extra)
        headers = {"x-amz-request-id": request_id}
        if exc.status in (500, 503):
            headers["Retry-After"] = str(httprules.RETRY_AFTER)
        if method == "HEAD":  # no body, the code in a header (as S3: the SDKs read it)
            headers["x-amz-error-code"] = exc.code
            response = web.Response(status=exc.status, headers=headers)
            return response
        response = web.Response(status=exc.status, body=body, headers=headers)
        response.content_type = "application/xml"
        return response


def s3_error_of(exc: DifsError) -> S3Error:
    """The S3 error answering a DIFS error."""
    if isinstance(exc, NotFoundError):
        return S3Error("NoSuchKey", str(exc))
    if isinstance(exc, PermissionDeniedError):
        return S3Error("AccessDenied", str(exc))
    if isinstance(exc, BadNameError):
        return S3Error("InvalidArgument", str(exc))
    if isinstance(exc, UsageError):
        return S3Error("InvalidRequest", str(exc))
    if isinstance(exc, BusyError):
        return S3Error("SlowDown", str(exc))
    if isinstance(exc, NetworkError | IntegrityError):
        return S3Error("ServiceUnavailable", str(exc))
    return S3Error("InternalError", str(exc))


async def answer_slowly(
    request: web.Request,
    work: Coroutine[Any, Any, bytes],
    every: float,
    error_document: Callable[[Exception], bytes],
) -> web.StreamResponse:
    """Answer ``request`` with the XML document ``work`` makes. When it takes longer than
    ``every`` seconds, answer 200 and the XML declaration at once, then a space every
    ``every`` seconds, then the document, or the ``error_document`` of what ``work``
    raised (S3 does this for CompleteMultipartUpload; the SDKs read an Error in a 200
    answer as a failure and retry it). A client gone meanwhile is no longer written to,
    but ``work`` is done; it is cancelled only with the request (the server stopping).
    What ``work`` raises before the answer starts is raised here."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task}, timeout=every)
        if task.done():
            return _xml(task.result())
        response = web.StreamResponse(status=200)
        response.content_type = "application/xml"
        gone = not await _written(response.prepare(request))
        gone = gone or not await _written(response.write(s3xml.XML_DECLARATION))
        while not task.done():
            await asyncio.wait({task}, timeout=every)
            if not task.done() and not gone:
                gone = not await _written(response.write(b" "))
        try:
            body = task.result()
        except Exception as exc:
            body = error_document(exc)
        if not gone and await _written(response.write(s3xml.after_declaration(body))):
            await _written(response.write_eof())
        return response
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})


async def _joined(task: asyncio.Future[R]) -> R:
    """``task``'s result, without cancelling it when the one waiting is cancelled."""
    return await asyncio.shield(task)


async def _written(sending: Awaitable[object]) -> bool:
    """Whether ``sending`` (a slow answer's write) reached the client: False when it left."""
    try:
        await sending
    except ConnectionError:  # aiohttp's ClientConnectionResetError is one
        return False
    return True


def _xml(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    response = web.Response(status=status, body=body, headers=headers)
    response.content_type = "application/xml"
    return response


class _Ctx:
    """One request: who asks, what it addresses, and the operations."""

    def __init__(
        self,
        server: S3Server,
        request: web.Request,
        target: Target,
        auth: Auth,
        key: S3Key,
        client: Client,
    ) -> None:
        self.server = server
        self.request = request
        self.target = target
        self.auth = auth
        self.key = key
        self.client = client
        self.query = request.query
        self.owner = (fingerprint(key.identity.public_key), key.name or key.access_key)

    def _headers(self) -> dict[str, str]:
        """The request's headers by lower-case name (repeated ones joined with ",")."""
        return dict(signed_request(self.request).headers)

    async def run(self) -> web.StreamResponse:
        method, q = self.request.method, self.query
        for name in q:
            if name in UNSUPPORTED:
                raise S3Error("NotImplemented", f"?{name} is not supported by DIFS")
        bucket, key = self.target.bucket, self.target.key
        if not bucket:
            if method == "GET":
                return await self.list_buckets()
            raise S3Error("MethodNotAllowed", extra={"Method": method, "ResourceType": "SERVICE"})
        s3xml.check_bucket(bucket)
        if not key:
            return await self._bucket_op(method)
        return await self._object_op(method)

    async def _bucket_op(self, method: str) -> web.StreamResponse:
        q = self.query
        # x-id names the operation for the SDK's logs (boto3 adds it): not a sub-resource
        plain = not (set(q) - {"x-id"})
        if method == "PUT" and plain:
            return await self.create_bucket()
        if method == "HEAD" and plain:
            return await self.head_bucket()
        if method == "DELETE" and plain:
            return await self.delete_bucket()
        if method == "GET":
            if "location" in q:
                await self._bucket_owner()
                return _xml(s3xml.location("" if REGION == "us-east-1" else REGION))
            if "versioning" in q:
                await self._bucket_owner()
                return _xml(s3xml.versioning("Enabled"))
            if "versions" in q:
                return await self.list_versions()
            if "uploads" in q:
                return await self.list_uploads()
            if q.get("list-type") == "2":
                return await self.list_objects(v2=True)
            return await self.list_objects(v2=False)
        if method == "POST" and "delete" in q:
            return await self.delete_objects()
        shown = sorted(q)[:8]
        raise S3Error("NotImplemented", f"{method} on a bucket with {shown} is not supported")

    async def _object_op(self, method: str) -> web.StreamResponse:
        q = self.query
        if method == "POST" and "uploads" in q:
            return await self.create_upload()
        if "uploadId" in q:
            if method == "PUT" and "partNumber" in q:
                return await self.upload_part()
            if method == "POST":
                return await self.complete_upload()
            if method == "DELETE":
                return await self.abort_upload()
            if method == "GET":
                return await self.list_parts()
        if method in ("GET", "HEAD"):
            return await self.get_object(method)
        if method == "PUT":
            if "x-amz-copy-source" in self.request.headers:
                return await self.copy_object()
            return await self.put_object()
        if method == "DELETE":
            return await self.delete_object()
        raise S3Error("NotImplemented", f"{method} on an object is not supported")

    # -- buckets -----------------------------------------------------------------------------

    @property
    def mine(self) -> bytes:
        return self.key.identity.public_key

    async def _bucket_owner(self) -> bytes:
        """The bucket's owner; NoSuchBucket when it is not claimed."""
        bucket = self.target.bucket
        owner = await self.client.prefix_owner(f"/{bucket}/")
        if owner is None:
            raise S3Error("NoSuchBucket", extra={"BucketName": bucket})
        return owner

    async def _own_bucket(self) -> None:
        """NoSuchBucket, or AccessDenied when the bucket is another key's."""
        if await self._bucket_owner() != self.mine:
            raise S3Error("AccessDenied", f"bucket {self.target.bucket} is another key's")

    async def list_buckets(self) -> web.Response:
        out: list[tuple[str, float]] = []
        for bucket in self._my_buckets():
            # still this identity's (a claim is permanent; this checks the record), dated
            # by its claim
            try:
                claim = await self.client.resolve(claim_name(f"/{bucket}/"))
            except NotFoundError:
                continue
            if claim.manifest.owner == self.mine:
                out.append((bucket, claim.manifest.created))
        return _xml(s3xml.list_buckets(self.owner[0], self.owner[1], out))

    def _my_buckets(self) -> list[str]:
        """The buckets this key made through this peer."""
        return list(self.server.keys.buckets(self.key.access_key))

    async def create_bucket(self) -> web.Response:
        bucket = self.target.bucket
        await self._read_small()  # CreateBucketConfiguration: the region is ours anyway
        owner = await self.client.prefix_owner(f"/{bucket}/")
        if owner is None:
            try:
                await self.client.claim(f"/{bucket}/")
            except PermissionDeniedError:
                raise S3Error("BucketAlreadyExists", extra={"BucketName": bucket}) from None
        elif owner != self.mine:
            raise S3Error("BucketAlreadyExists", extra={"BucketName": bucket})
        elif bucket in self._my_buckets():
            raise S3Error("BucketAlreadyOwnedByYou", extra={"BucketName": bucket})
        self.server.keys.add_bucket(self.key.access_key, bucket)
        return web.Response(status=200, headers={"Location": f"/{bucket}"})

    async def head_bucket(self) -> web.Response:
        await self._bucket_owner()
        return web.Response(status=200, headers={"x-amz-bucket-region": REGION})

    async def delete_bucket(self) -> web.Response:
        await self._own_bucket()
        bucket = self.target.bucket
        page = await self.client.list_page(f"/{bucket}", limit=1)
        if page.entries:
            raise S3Error("BucketNotEmpty", extra={"BucketName": bucket})
        for upload in self.server.uploads.uploads(bucket):
            if upload.access_key == self.key.access_key:
                with contextlib.suppress(S3Error):  # NoSuchUpload: aborted meanwhile
                    self.server.uploads.remove(upload.upload_id)  # S3 aborts them too
        self.server.keys.remove_bucket(self.key.access_key, bucket)
        return web.Response(status=204)

    # -- listing -----------------------------------------------------------------------------

    def _list_query(self, v2: bool) -> s3xml.ListQuery:
        q = self.query
        text = q.get("max-keys", "1000")
        if not (text.isascii() and text.isdigit()) or len(text) > 9:
            raise S3Error("InvalidArgument", "max-keys must be a number", 400)
        encoding = q.get("encoding-type")
        if encoding not in (None, "url"):
            raise S3Error("InvalidArgument", "Invalid Encoding Method specified in Request")
        return s3xml.ListQuery(
            bucket=self.target.bucket,
            prefix=q.get("prefix", ""),
            delimiter=q.get("delimiter", ""),
            max_keys=min(int(text), 1000),
            url=encoding == "url",
            marker=q.get("start-after" if v2 else "marker", ""),
            token=q.get("continuation-token") if v2 else None,
        )

    def _after_name(self, lq: s3xml.ListQuery) -> str | None:
        """The DIFS name a listing continues after: the continuation token's, or the
        marker's (start-after)."""
        bucket = lq.bucket
        if lq.token is not None:
            try:
                name = decode_token(lq.token)
            except UsageError:
                raise S3Error(
                    "InvalidArgument", "The continuation token provided is incorrect"
                ) from None
            if not name.startswith(f"/{bucket}/"):
                raise S3Error("InvalidArgument", "The continuation token provided is incorrect")
            return name
        if lq.marker:
            try:
                return s3xml.object_name(bucket, lq.marker)
            except S3Error:
                return None
        return None

    async def _scan(
        self, lq: s3xml.ListQuery, after: str | None, skip: str | None
    ) -> s3xml.Listing:
        """Walk the bucket's listing from ``after`` and roll it up (``s3xml.Grouper``)."""
        bucket = lq.bucket
        folder = s3xml.prefix_folder(bucket, lq.prefix)
        recursive = lq.delimiter != "/"
        grouper = s3xml.Grouper(lq.prefix, lq.delimiter, lq.max_keys, skip)
        if lq.max_keys == 0:
            return grouper.out  # nothing to read
        token = encode_token(after) if after is not None else None
        try:
            entries = self.client.list(folder, recursive=recursive, after=token, page=1000)
            async for entry in entries:
                if entry.folder and recursive:
                    continue
                try:
                    key = s3xml.key_of(bucket, entry.name)
                except ValueError:
                    continue
                if lq.marker and key <= lq.marker:
                    continue
                etag = f'"{entry.etag}"' if entry.etag else None
                item = s3xml.Item(
                    key, entry.size, entry.created, etag=etag, version_id=str(entry.version)
                )
                if not grouper.add(item, entry.name):
                    break
        except UsageError:  # a prefix that is no DIFS folder: nothing is under it
            pass
        return grouper.out

    async def list_objects(self, *, v2: bool) -> web.Response:
        await self._bucket_owner()
        lq = self._list_query(v2)
        skip = None
        if lq.delimiter and lq.marker.startswith(lq.prefix) and lq.marker.endswith(lq.delimiter):
            skip = lq.marker  # a NextMarker that is a common prefix: past all of it
        found = await self._scan(lq, self._after_name(lq), skip)
        if v2:
            token = encode_token(found.resume) if found.truncated and found.resume else None
            owner = self.owner if self.query.get("fetch-owner") == "true" else None
            return _xml(s3xml.list_v2(lq, found, token, owner))
        return _xml(s3xml.list_v1(lq, found, self.owner))

    async def list_versions(self) -> web.Response:
        await self._bucket_owner()
        q = self.query
        lq = self._list_query(v2=False)
        lq = s3xml.ListQuery(
            lq.bucket, lq.prefix, lq.delimiter, lq.max_keys, lq.url, q.get("key-marker", "")
        )
        found = await self._scan(lq, self._after_name(lq), None)
        rows: list[s3xml.Item] = []
        for item in found.items:
            name = s3xml.object_name(lq.bucket, item.key)
            try:
                history = (await self.client.resolve(name)).history
            except NotFoundError:
                continue
            for i, m in enumerate(reversed(history)):
                rows.append(
                    s3xml.Item(
                        item.key,
                        0 if m.deleted else m.size,
                        m.created,
                        etag=None if m.deleted else s3_etag(m),
                        version_id=str(m.version),
                        latest=i == 0,
                        delete_marker=m.deleted,
                    )
                )
        found.items = rows
        next_key = found.last if found.truncated else None
        body = s3xml.list_versions(lq, found, next_key, None, "", self.owner)
        return _xml(body)

    # -- objects: read -----------------------------------------------------------------------

    def _name(self) -> str:
        return s3xml.object_name(self.target.bucket, self.target.key)

    async def _resolve(self, name: str) -> Resolved:
        try:
            return await self.client.resolve(name)
        except NotFoundError:
            await self._bucket_owner()
            raise S3Error("NoSuchKey", extra={"Key": self.target.key}) from None

    def _version(self, resolved: Resolved, text: str | None) -> Manifest:
        """The version a request names (``versionId``), or the newest; S3 errors."""
        wanted = version_id(text)
        if wanted is None:
            if resolved.manifest.deleted:
                raise S3Error("NoSuchKey", extra={"Key": self.target.key})
            return resolved.manifest
        match = [m for m in resolved.history if m.version == wanted]
        if not match:
            raise S3Error("NoSuchVersion", extra={"Key": self.target.key, "VersionId": text or ""})
        if match[0].deleted:
            raise S3Error(
                "MethodNotAllowed",
                "The specified method is not allowed against a delete marker",
                extra={"Method": self.request.method, "ResourceType": "DeleteMarker"},
            )
        return match[0]

    async def get_object(self, method: str) -> web.StreamResponse:
        name = self._name()
        resolved = await self._resolve(name)
        manifest = self._version(resolved, self.query.get("versionId"))
        pinned = version_id(self.query.get("versionId")) is not None
        res = httprules.Resource(
            manifest.name, manifest.size, s3_etag(manifest), manifest.created, pinned=pinned
        )
        headers = CIMultiDict(self.request.headers)
        if "partNumber" in self.query:
            raise S3Error("NotImplemented", "GetObject with partNumber is not supported")
        ans = httprules.answer(method, headers, res, secrets.token_hex(16))
        out = self._object_headers(manifest, ans.headers)
        if ans.status == 304:
            return web.Response(status=304, headers=out)
        if ans.status == 412:
            raise S3Error("PreconditionFailed", extra={"Condition": ans.reason})
        if ans.status == 416:
            raise S3Error(
                "InvalidRange",
                extra={
                    "ActualObjectSize": str(manifest.size),
                    "RangeRequested": self.request.headers.get("Range", ""),
                },
            )
        if ans.boundary:  # S3 serves one range: several get the whole object
            ans = httprules.answer(
                method, {k: v for k, v in headers.items() if k.lower() != "range"}, res, ""
            )
            out = self._object_headers(manifest, ans.headers)
        for param, header in (
            ("response-content-type", "Content-Type"),
            ("response-content-disposition", "Content-Disposition"),
            ("response-content-encoding", "Content-Encoding"),
            ("response-content-language", "Content-Language"),
            ("response-cache-control", "Cache-Control"),
            ("response-expires", "Expires"),
        ):
            if param in self.query:
                out[header] = self.query[param]
        response = web.StreamResponse(status=ans.status, headers=out)
        response.content_length = ans.length
        if method == "HEAD" or not ans.spans:
            await response.prepare(self.request)
            await response.write_eof()
            return response
        server = self.server
        if server.streams >= server.max_streams:
            raise S3Error("SlowDown", f"{server.streams} bodies are being sent: try later")
        server.streams += 1
        try:
            await self._send(response, resolved, manifest, ans.spans[0])
        finally:
            server.streams -= 1
        return response

    def _object_headers(self, manifest: Manifest, base: dict[str, str]) -> dict[str, str]:
        out = {
            k: v
            for k, v in base.items()
            if k not in ("Content-Disposition", "X-Content-Type-Options", "Cache-Control")
        }
        if "Content-Type" in out:
            out["Content-Type"] = s3_content_type(manifest, self.target.key)
        out["x-amz-version-id"] = str(manifest.version)
        out.update(user_meta(manifest))
        return out

    async def _send(
        self,
        response: web.StreamResponse,
        resolved: Resolved,
        manifest: Manifest,
        span: tuple[int, int],
    ) -> None:
        """Stream one span; the first chunk before the status line (so that a fetch that
        cannot start is an error status), a failure after it drops the connection."""
        stream = await self.client.open_stream(
            resolved, version=manifest.version, span=span, buffer=BODY_BUFFER
        )
        try:
            async for chunk in stream:
                if not response.prepared:
                    await response.prepare(self.request)
                await response.write(chunk)
        except (DifsError, OSError, TimeoutError) as exc:
            if not response.prepared:
                raise
            transport = self.request.transport
            if transport is not None:
                transport.abort()
            log.log(
                logging.DEBUG if isinstance(exc, ConnectionError) else logging.WARNING,
                "s3_body_failed name=%s error=%s",
                manifest.name,
                exc,
            )
            return
        finally:
            await stream.aclose()
        if not response.prepared:
            await response.prepare(self.request)
        await response.write_eof()

    # -- objects: write ----------------------------------------------------------------------

    async def _read_small(self) -> bytes:
        """A body parsed whole (XML), decoded when aws-chunked, bounded by MAX_XML."""
        parts: list[bytes] = []
        size = 0
        async for chunk in self._payload():
            size += len(chunk)
            if size > MAX_XML:
                raise S3Error("MalformedXML", f"the body is over {MAX_XML} bytes")
            parts.append(chunk)
        return b"".join(parts)

    async def _payload(self, checks: BodyChecks | None = None) -> AsyncIterator[bytes]:
        """The request's payload (aws-chunked framing removed), through ``checks``, which
        are verified before the end is reported: a failed check raises instead. The
        checks hash a batch (CHECK_BATCH bytes) in worker threads (the MD5 beside the
        SHA-256 and checksums) while the next one is read: the loop never hashes a large
        body."""
        decoder = body_decoder(self.auth, self._headers())
        content = self.request.content
        hashing: asyncio.Future[None] | None = None
        batch: list[bytes] = []
        gathered = 0
        while True:
            data = await content.read(READ_CHUNK)
            if not data:
                break
            pieces = decoder.feed(data) if decoder is not None else [data]
            for piece in pieces:
                piece = bytes(piece)
                if not piece:
                    continue
                if checks is not None:
                    batch.append(piece)
                    gathered += len(piece)
                    if gathered >= CHECK_BATCH:
                        if hashing is not None:
                            await hashing
                        hashing = asyncio.ensure_future(_check_all(checks, batch))
                        batch, gathered = [], 0
                yield piece
        trailers = decoder.finish() if decoder is not None else {}
        if checks is not None:
            if hashing is not None:
                await hashing
            if batch:
                await _check_all(checks, batch)
            checks.verify(trailers)

    async def _receive(self, chunks: AsyncIterator[bytes]) -> bytes | Path:
        """The whole of ``chunks``: in memory up to SMALL_BODY bytes, else in a new file
        of the spool directory (disk writes in a worker thread, a batch at a time); on any
        error (a failed check) the file is removed."""
        batch: list[bytes] = []
        size = 0
        path: Path | None = None
        fh: IO[bytes] | None = None
        try:
            async for chunk in chunks:
                batch.append(chunk)
                size += len(chunk)
                if fh is None and size > SMALL_BODY:
                    path = self.server.spool / secrets.token_hex(16)
                    fh = await asyncio.to_thread(path.open, "wb")
                if fh is not None and size >= SPOOL_BATCH:
                    await asyncio.to_thread(_write_all, fh, batch)
                    batch, size = [], 0
            if fh is None or path is None:
                return b"".join(batch)
            await asyncio.to_thread(_write_all, fh, batch)
            await asyncio.to_thread(fh.close)
            return path
        except BaseException:
            if fh is not None:
                fh.close()
            if path is not None:
                path.unlink(missing_ok=True)
            raise

    async def _publish(
        self,
        source: AsyncIterator[bytes] | IO[bytes],
        name: str,
        meta: Callable[[], ObjectMeta],
    ) -> Manifest:
        """Publish ``source`` as a new version of ``name`` with the metadata ``meta()``
        gives once the source is read. A body from the network is received whole and
        checked first (an error, such as a failed check, publishes nothing): the publish
        reads its source in worker threads, which must never wait on a client."""
        path: Path | None = None
        try:
            put_source: Path | IO[bytes]
            if isinstance(source, AsyncIterator):
                got = await self._receive(source)
                if isinstance(got, Path):
                    put_source = path = got
                else:
                    put_source = io.BytesIO(got)
            else:
                put_source = source
            result = await self.client.put(put_source, name, update=True, metadata_after=meta)
        finally:
            if path is not None:
                path.unlink(missing_ok=True)
        for warning in result.warnings:
            log.warning("s3_put_warning name=%s warning=%s", name, warning)
        return result.manifest

    def _declared_length(self) -> int | None:
        """The body's length as the request declares it (decoded, for aws-chunked)."""
        text = self.request.headers.get("x-amz-decoded-content-length")
        if text is None:
            text = self.request.headers.get("Content-Length")
        return int(text) if text is not None and text.isascii() and text.isdigit() else None

    def _streamable(self) -> bool:
        """Whether this PutObject's body is large enough to publish while it arrives (a
        small one is received whole: no worker thread waits on it)."""
        text = self.request.headers.get("x-amz-decoded-content-length")
        if text is None:
            text = self.request.headers.get("Content-Length")
        return text is None or not text.isdigit() or int(text) > SMALL_BODY

    async def _publish_streamed(
        self, chunks: AsyncIterator[bytes], name: str, meta: Callable[[], ObjectMeta]
    ) -> Manifest:
        """Publish ``chunks`` as they arrive, through a :class:`BodyPipe` the publish's
        worker threads read. The pipe ends only once every check passed (``chunks``
        raises otherwise), and ``meta`` is asked only then, before the manifest is
        signed; on a failed check, a client gone or any error the pipe fails, the publish
        stops and abandons what it uploaded: nothing is published."""
        pipe = BodyPipe()

        async def feed() -> None:
            try:
                async for chunk in chunks:
                    await pipe.put(chunk)
            except BaseException:
                pipe.fail()
                raise
            pipe.close()

        def checked_meta() -> ObjectMeta:
            if not pipe.closed or pipe.failed:
                raise BodyAborted("the body was not received whole")
            return meta()

        feeder = asyncio.ensure_future(feed())
        try:
            result = await self.client.put(
                cast(IO[bytes], pipe), name, update=True, metadata_after=checked_meta, fresh=True
            )
        except BaseException as exc:
            pipe.fail()
            feeder.cancel()
            await asyncio.wait([feeder])
            if not isinstance(exc, Exception):  # cancelled (the client left): stays so
                raise
            failure = None if feeder.cancelled() else feeder.exception()
            if failure is not None:
                raise failure from None  # why the body failed: a check, the client
            if isinstance(exc, BodyAborted):
                raise incomplete_body("the body stopped before its end") from None
            raise
        finally:
            if not feeder.done():
                feeder.cancel()
                await asyncio.wait([feeder])
        for warning in result.warnings:
            log.warning("s3_put_warning name=%s warning=%s", name, warning)
        return result.manifest

    def _stored_meta(self) -> dict[str, str]:
        """The request's metadata headers, checked (with the longest ETag) before any
        body is read."""
        stored = meta_headers(self.request.headers)
        object_meta(stored, _LONGEST_ETAG)
        return stored

    async def put_object(self) -> web.Response:
        name = self._name()
        await self._own_bucket()
        stored = self._stored_meta()
        checks = BodyChecks(self._headers(), self.auth.payload)
        payload = self._payload(checks)
        meta = lambda: object_meta(stored, checks.md5_hex)  # noqa: E731
        server = self.server
        if self._streamable() and server.streamed_puts < server.max_streamed_puts:
            server.streamed_puts += 1
            try:
                manifest = await self._publish_streamed(payload, name, meta)
            finally:
                server.streamed_puts -= 1
        else:
            manifest = await self._publish(payload, name, meta)
        etag = f'"{checks.md5_hex}"'
        return web.Response(
            status=200, headers={"ETag": etag, "x-amz-version-id": str(manifest.version)}
        )

    async def _copy_source(self) -> tuple[Resolved, Manifest, bool]:
        """The version ``x-amz-copy-source`` names (URL-encoded ``/bucket/key``, and
        ``?versionId=``), its copy conditions checked; and whether it names the newest."""
        src_bucket, src_key, src_version = parse_copy_source(
            self.request.headers["x-amz-copy-source"]
        )
        src_name = s3xml.object_name(src_bucket, src_key)
        try:
            resolved = await self.client.resolve(src_name)
        except NotFoundError:
            raise S3Error("NoSuchKey", extra={"Key": src_key}) from None
        source = self._version(resolved, src_version)
        self._copy_conditions(source)
        return resolved, source, version_id(src_version) is None

    async def copy_object(self) -> web.Response:
        name = self._name()
        await self._own_bucket()
        resolved, source, newest = await self._copy_source()
        src_name = resolved.manifest.name
        directive = self.request.headers.get("x-amz-metadata-directive", "COPY").upper()
        if directive not in ("COPY", "REPLACE"):
            raise S3Error("InvalidArgument", "Unknown metadata directive.")
        if src_name == name and directive == "COPY" and newest:
            raise S3Error(
                "InvalidRequest",
                "This copy request is illegal because it is trying to copy an object to "
                "itself without changing the object's metadata.",
            )
        md5 = hashlib.md5(usedforsecurity=False)

        async def chunks() -> AsyncIterator[bytes]:
            if source.size == 0:
                return
            async with await self.client.open_stream(resolved, version=source.version) as s:
                async for chunk in s:
                    data = bytes(chunk)
                    md5.update(data)
                    yield data

        if directive == "REPLACE":
            stored = self._stored_meta()
        else:
            stored = {}
            if source.meta is not None:
                stored = {f"x-amz-meta-{k}": v for k, v in source.meta.user.items()}
                if source.meta.content_type:
                    stored["content-type"] = source.meta.content_type
        manifest = await self._publish(chunks(), name, lambda: object_meta(stored, md5.hexdigest()))
        body = s3xml.copy_result("CopyObjectResult", f'"{md5.hexdigest()}"', manifest.created)
        headers = {
            "x-amz-version-id": str(manifest.version),
            "x-amz-copy-source-version-id": str(source.version),
        }
        return _xml(body, headers=headers)

    def _copy_conditions(self, source: Manifest) -> None:
        """x-amz-copy-source-if-*: PreconditionFailed when one does not hold."""
        h = self.request.headers
        etag = s3_etag(source)
        date = int(source.created)
        match = h.get("x-amz-copy-source-if-match")
        if match is not None and not httprules.strong_match(match, etag):
            raise S3Error("PreconditionFailed", extra={"Condition": "x-amz-copy-source-If-Match"})
        none = h.get("x-amz-copy-source-if-none-match")
        if none is not None and httprules.weak_match(none, etag):
            raise S3Error(
                "PreconditionFailed", extra={"Condition": "x-amz-copy-source-If-None-Match"}
            )
        since = h.get("x-amz-copy-source-if-unmodified-since")
        limit = httprules.parse_date(since) if since else None
        if match is None and limit is not None and date > limit:
            raise S3Error(
                "PreconditionFailed",
                extra={"Condition": "x-amz-copy-source-If-Unmodified-Since"},
            )
        since = h.get("x-amz-copy-source-if-modified-since")
        limit = httprules.parse_date(since) if since else None
        if none is None and limit is not None and date <= limit:
            raise S3Error(
                "PreconditionFailed", extra={"Condition": "x-amz-copy-source-If-Modified-Since"}
            )

    async def _delete(self, key: str, version: str | None) -> s3xml.Deleted:
        """Delete one key (a tombstone version; a missing key is deleted already)."""
        if version_id(version) is not None:
            return s3xml.Deleted(
                key, version, "NotImplemented", "DIFS keeps every version: only a key is deleted"
            )
        name = s3xml.object_name(self.target.bucket, key)
        try:
            tombstone = await self.client.rm(name)
        except (NotFoundError, DeletedError):
            return s3xml.Deleted(key, version)
        return s3xml.Deleted(key, str(tombstone.version), delete_marker=True)

    async def delete_object(self) -> web.Response:
        await self._own_bucket()
        got = await self._delete(self.target.key, self.query.get("versionId"))
        if got.code is not None:
            raise S3Error(got.code, got.message)
        headers = {}
        if got.delete_marker:
            headers = {"x-amz-delete-marker": "true", "x-amz-version-id": got.version_id or ""}
        return web.Response(status=204, headers=headers)

    async def delete_objects(self) -> web.Response:
        await self._own_bucket()
        checks = BodyChecks(self._headers(), self.auth.payload)
        parts = [c async for c in self._payload(checks)]
        quiet, keys = s3xml.parse_delete(b"".join(parts))
        results: list[s3xml.Deleted] = []
        for key, version in keys:
            try:
                results.append(await self._delete(key, version))
            except S3Error as exc:
                results.append(s3xml.Deleted(key, version, exc.code, exc.message))
            except DifsError as exc:
                err = s3_error_of(exc)
                results.append(s3xml.Deleted(key, version, err.code, err.message))
        return _xml(s3xml.delete_result(results, quiet))

    # -- multipart uploads -------------------------------------------------------------------

    def _upload(self) -> Upload:
        """The upload ``?uploadId=`` names, of this key and this bucket and key."""
        upload_id = self.query["uploadId"]
        upload = self.server.uploads.get(upload_id)
        if (
            upload is None
            or upload.access_key != self.key.access_key
            or (upload.bucket, upload.key) != (self.target.bucket, self.target.key)
        ):
            raise S3Error("NoSuchUpload", extra={"UploadId": upload_id[:64]})
        return upload

    async def create_upload(self) -> web.Response:
        self._name()
        await self._own_bucket()
        stored = self._stored_meta()
        bucket, key = self.target.bucket, self.target.key
        upload_id = self.server.uploads.create(bucket, key, self.key.access_key, stored)
        return _xml(s3xml.initiate_multipart(bucket, key, upload_id))

    def _part_number(self) -> int:
        text = self.query.get("partNumber", "")
        if not (text.isascii() and text.isdigit()) or not 1 <= int(text[:6]) <= 10000:
            raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000")
        return int(text)

    async def upload_part(self) -> web.Response:
        upload = self._upload()
        number = self._part_number()
        if "x-amz-copy-source" in self.request.headers:
            return await self._upload_part_copy(upload, number)
        checks = BodyChecks(self._headers(), self.auth.payload)
        part = await self.server.uploads.put_part(
            upload.upload_id,
            number,
            self._payload(checks),
            md5=lambda: checks.md5_hex,
            declared=self._declared_length(),
        )
        return web.Response(status=200, headers={"ETag": f'"{part.etag}"'})

    async def _upload_part_copy(self, upload: Upload, number: int) -> web.Response:
        resolved, source, _ = await self._copy_source()
        span: tuple[int, int] | None = None
        text = self.request.headers.get("x-amz-copy-source-range")
        if text is not None:
            span = _copy_range(text, source.size)

        async def chunks() -> AsyncIterator[bytes]:
            if source.size == 0:
                return
            async with await self.client.open_stream(
                resolved, version=source.version, span=span
            ) as stream:
                async for chunk in stream:
                    yield bytes(chunk)

        part = await self.server.uploads.put_part(upload.upload_id, number, chunks())
        body = s3xml.copy_result("CopyPartResult", f'"{part.etag}"', part.modified)
        return _xml(body, headers={"x-amz-copy-source-version-id": str(source.version)})

    async def complete_upload(self) -> web.StreamResponse:
        done = self.server.completed.get(self.query["uploadId"])
        if done is not None and done[0] == (
            self.key.access_key,
            self.target.bucket,
            self.target.key,
        ):  # sent again after it succeeded (its answer lost to a timeout): the same answer
            return _xml(done[1])
        upload = self._upload()
        name = self._name()
        await self._own_bucket()
        listed = s3xml.parse_complete(await self._read_small())
        numbers = [n for n, _ in listed]
        if numbers != sorted(set(numbers)):
            raise S3Error("InvalidPartOrder")
        have = {p.number: p for p in self.server.uploads.parts(upload.upload_id)}
        for i, (number, etag) in enumerate(listed):
            part = have.get(number)
            if part is None or part.etag != etag.lower():
                raise S3Error("InvalidPart", extra={"PartNumber": str(number), "ETag": etag})
            if i < len(listed) - 1 and part.size < MIN_PART_SIZE:
                raise S3Error(
                    "EntityTooSmall",
                    extra={"ProposedSize": str(part.size), "MinSizeAllowed": str(MIN_PART_SIZE)},
                )
        uploads = self.server.uploads
        etag = uploads.multipart_etag(upload.upload_id, numbers)
        meta = object_meta(upload.meta, etag)

        async def publish() -> bytes:
            stored = uploads.stored_object(upload.upload_id, numbers) if uploads.segments else None
            if stored is not None:
                await self._publish_stored(upload, stored, name, meta)
            else:
                reader = uploads.reader(upload.upload_id, numbers)
                try:
                    await self._publish(reader, name, lambda: meta)
                finally:
                    reader.close()
            uploads.remove(upload.upload_id)
            bucket, key = self.target.bucket, self.target.key
            document = s3xml.complete_multipart(f"/{bucket}/{key}", bucket, key, f'"{etag}"')
            whose = (upload.access_key, bucket, key)
            self.server.remember_completed(upload.upload_id, whose, document)
            return document

        # The parts are checked: from here on S3 may answer 200 before the result. The
        # publish is the server's, not this request's: a client that timed out and sent
        # the same Complete again (the SDKs retry) waits for the same publish and answer.
        completing = self.server.completing
        task = completing.get(upload.upload_id)
        if task is None:
            task = self.server.spawn(publish(), f"s3-complete-{upload.upload_id}")
            completing[upload.upload_id] = task
            task.add_done_callback(lambda _: completing.pop(upload.upload_id, None))
        return await self.answer_slowly(_joined(task))

    async def answer_slowly(self, work: Coroutine[Any, Any, bytes]) -> web.StreamResponse:
        """:func:`answer_slowly` with the server's keepalive and S3 Error documents."""
        request_id = str(self.request.get(_REQUEST_ID, ""))
        path = self.request.path

        def error_document(exc: Exception) -> bytes:
            err = self.server.s3_error(exc, request_id, path)
            log.warning("s3_slow_answer_failed path=%s code=%s", path, err.code)
            return s3xml.error_xml(err.code, err.message, path, request_id, err.extra)

        return await answer_slowly(self.request, work, self.server.keepalive, error_document)

    async def _publish_stored(
        self, upload: Upload, stored: StoredObject, name: str, meta: ObjectMeta
    ) -> None:
        """Publish the parts already in the peer's segment store as ``name``: their hash
        list stored (kept by the upload until it is removed), then placed and published
        by a :class:`StoredClient` without reading a byte of them again."""
        integrity = await self.server.uploads.store_hash_list(upload.upload_id, stored.hashes)
        client = StoredClient(
            self.server.entry,
            stored,
            integrity,
            publisher=self.key.identity,
            token=self.server.token,
            io_timeout=self.server.io_timeout,
            folders=self.client.folders,
        )
        try:
            result = await client.put(
                cast(IO[bytes], _NoSource()),
                name,
                update=True,
                segment_size=stored.segment_size,
                metadata=meta,
            )
        finally:
            await client.close()
        for warning in result.warnings:
            log.warning("s3_put_warning name=%s warning=%s", name, warning)

    async def abort_upload(self) -> web.Response:
        upload = self._upload()
        self.server.uploads.remove(upload.upload_id)
        return web.Response(status=204)

    async def list_parts(self) -> web.Response:
        upload = self._upload()
        q = self.query
        marker_text = q.get("part-number-marker", "0")
        max_text = q.get("max-parts", "1000")
        if not all(t.isascii() and t.isdigit() and len(t) <= 6 for t in (marker_text, max_text)):
            raise S3Error("InvalidArgument", "part-number-marker and max-parts are numbers")
        marker, max_parts = int(marker_text), min(int(max_text), 1000)
        parts = [p for p in self.server.uploads.parts(upload.upload_id) if p.number > marker]
        rows = [s3xml.PartRow(p.number, f'"{p.etag}"', p.size, p.modified) for p in parts]
        body = s3xml.list_parts(
            upload.bucket,
            upload.key,
            upload.upload_id,
            rows[:max_parts],
            marker,
            max_parts,
            len(rows) > max_parts,
            self.owner,
        )
        return _xml(body)

    async def list_uploads(self) -> web.Response:
        await self._bucket_owner()
        prefix = self.query.get("prefix", "")
        uploads = [
            s3xml.UploadRow(u.key, u.upload_id, u.created)
            for u in self.server.uploads.uploads(self.target.bucket, prefix)
            if u.access_key == self.key.access_key
        ]
        body = s3xml.list_uploads(self.target.bucket, prefix, uploads[:1000], 1000, self.owner)
        return _xml(body)


def _copy_range(text: str, size: int) -> tuple[int, int]:
    """``x-amz-copy-source-range: bytes=first-last`` as an inclusive span of ``size``."""
    unit, _, spec = text.strip().partition("=")
    first_text, _, last_text = spec.partition("-")
    ok = unit == "bytes" and all(t.isascii() and t.isdigit() for t in (first_text, last_text))
    if not ok:
        raise S3Error(
            "InvalidArgument",
            "The x-amz-copy-source-range value must be of the form bytes=first-last",
        )
    first, last = int(first_text), int(last_text)
    if first > last or last >= size:
        raise S3Error("InvalidRange", extra={"ActualObjectSize": str(size), "RangeRequested": text})
    return first, last
