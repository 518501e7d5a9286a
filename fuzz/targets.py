"""Fuzz targets: one function per decoder of bytes that come from peers or from users.

Each target takes the fuzzer's input and returns normally unless it found a bug: an
exception the code under test may not raise (STYLE.md practice 3: decoders are total and
raise only our typed errors), or a broken invariant (an ``AssertionError``).

Targets whose input has a structure read the first byte as a switch: below 0x80 the whole
input is used as it is; from 0x80 up the rest of the input chooses a well-formed value
(a DHT request, a mutation of a valid signed record), so that the fuzzer also reaches the
code behind the first checks.

This module never imports atheris: ``python -m fuzz`` (:mod:`fuzz.runner`) runs these
functions under the fuzzer, and ``tests/test_fuzz_targets.py`` runs them under pytest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import umsgpack
from kademlia.node import Node

from difs_p2p import dhtwire, wire
from difs_p2p.config import DhtConfig
from difs_p2p.dht import Dht
from difs_p2p.dhtproto import DhtProtocol
from difs_p2p.errors import BadNameError, IntegrityError, UsageError, WireError
from difs_p2p.holders import HOLDER_SIZE, parse_holder_entry
from difs_p2p.identity import NodeId
from difs_p2p.manifest import parse_manifest
from difs_p2p.names import MAX_NAME_BYTES, key_namespace_owner, name_key, normalize_name
from difs_p2p.recordpolicy import RecordValidator
from difs_p2p.routing import KEY_SIZE
from difs_p2p.s3auth import (
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    ChunkedDecoder,
    ChunkSigner,
    SignedRequest,
    authenticate,
    signing_key,
)
from difs_p2p.s3errors import S3Error
from difs_p2p.segments import HASH_SIZE, decode_hash_list
from fuzz.structure import (
    ByteSource,
    dht_reply_body,
    dht_request,
    mutate_holder,
    mutate_manifest,
    samples,
)

# The largest payload of one UDP datagram over IPv4.
MAX_UDP_PAYLOAD: Final = 65_507
# Where raw datagrams come from. Structured ones pick one of SOURCE_HOSTS and a port in
# 9990..9999, so that find_* replies are not emptied by the rule that excludes the asker's
# own address, and so that the per-address limits, which exempt loopback, apply too.
# Nothing is sent anywhere: the transport only records.
DHT_ADDR: Final = ("127.0.0.1", 9999)
SOURCE_HOSTS: Final = ("127.0.0.1", "127.0.0.1", "192.0.2.1", "192.0.2.2")
# The address the node would have bound (start() sets it; this node has no socket).
OWN_ADDR: Final = ("127.0.0.1", 4000)
STRUCTURED: Final = 0x80

T = TypeVar("T")


def _source(src: ByteSource) -> tuple[str, int]:
    return src.choice(SOURCE_HOSTS), 9990 + src.below(10)


def _structured(data: bytes) -> bool:
    return len(data) > 0 and data[0] >= STRUCTURED


# -- 1. wire frames -------------------------------------------------------------------------


def _decode_stream(chunks: Sequence[bytes]) -> tuple[list[wire.Frame], bool]:
    """The frames a fresh decoder returns for ``chunks`` then EOF, and whether it broke."""
    decoder = wire.FrameDecoder()
    frames: list[wire.Frame] = []
    try:
        for chunk in chunks:
            frames.extend(decoder.feed(chunk))
            assert decoder.buffered <= wire.MAX_PAYLOAD, "decoder buffer over its limit"
        decoder.eof()
    except WireError:
        assert decoder.broken, "WireError raised but the decoder is not broken"
        return frames, True
    return frames, False


def wire_frames(data: bytes) -> None:
    """FrameDecoder and parse_header: only WireError; chunking never changes the result.

    The last two bytes choose where the stream is cut in two. Inputs of up to 512 bytes are
    also fed one byte at a time. Every decoded frame must re-encode to a frame that decodes
    to itself.
    """
    with contextlib.suppress(WireError):
        wire.parse_header(data[: wire.HEADER_SIZE])
    whole = _decode_stream([data])
    cut = int.from_bytes(data[-2:], "big") % (len(data) + 1)
    split = _decode_stream([data[:cut], data[cut:]])
    assert split == whole, f"cutting the stream at {cut} changed the result"
    if len(data) <= 512:
        by_byte = _decode_stream([data[i : i + 1] for i in range(len(data))])
        assert by_byte == whole, "feeding one byte at a time changed the result"
    for frame in whole[0]:
        try:
            again = wire.FrameDecoder().feed(wire.encode_bytes(frame))
        except UsageError as exc:
            raise AssertionError(f"a decoded frame cannot be re-encoded: {exc}") from None
        assert again == [frame], "a decoded frame does not survive re-encoding"


# -- 2. DHT datagrams -----------------------------------------------------------------------


class FakeTransport:
    """A datagram transport that records what is sent instead of sending it."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, tuple[str, int]]] = []

    def sendto(self, data: bytes, addr: tuple[str, int]) -> None:
        self.sent.append((bytes(data), addr))

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


class _FailureLog(logging.Handler):
    """Collects the exceptions of the DHT's background tasks, which it logs and drops."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.failures: list[BaseException] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "dht task failed: %r" and isinstance(record.args, tuple):
            self.failures.extend(a for a in record.args if isinstance(a, BaseException))


@dataclass(slots=True)
class _Node:
    dht: Dht
    protocol: DhtProtocol
    transport: FakeTransport


class DhtHarness:
    """One DHT node without a socket, fed datagrams inside one long-lived event loop.

    Each input is one datagram (raw, or a structured request), or a client operation
    (closest, get, get_entries, ping, verify) whose first request gets a structured reply.
    After each input, leftover tasks are cancelled and outstanding requests dropped, so
    memory stays bounded; the node itself is rebuilt every ``rebuild_every`` inputs.
    """

    def __init__(self, rebuild_every: int = 5000) -> None:
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(self._on_loop_error)
        self.rebuild_every = rebuild_every
        self.inputs = 0
        self.failures: list[BaseException | str] = []
        self.failure_log = _FailureLog()
        logging.getLogger("difs_p2p.dht").addHandler(self.failure_log)
        self.own_tasks: list[asyncio.Task[Any]] = []
        self.node = self._build()

    def _build(self) -> _Node:
        dht = Dht(node_id=NodeId(bytes(KEY_SIZE)), policy=RecordValidator(), config=DhtConfig())
        protocol = DhtProtocol(dht)
        transport = FakeTransport()
        protocol.transport = transport
        dht.protocol = protocol
        dht.transport = transport
        dht.node.ip, dht.node.port = OWN_ADDR
        # Something to find: a record and an entry, so that find_value and find_entries
        # answer with values, and newcomers are handed them.
        sample = samples()
        now = time.time()
        assert dht.store.put(sample.manifest_key, sample.manifests[0], now).accepted
        assert dht.store.add_entry(sample.holder_key, sample.holder, now).accepted
        return _Node(dht, protocol, transport)

    def _on_loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        self.failures.append(exc if isinstance(exc, BaseException) else str(context))

    def close(self) -> None:
        self._cleanup()
        self.node.dht.store.close()
        logging.getLogger("difs_p2p.dht").removeHandler(self.failure_log)
        self.loop.close()

    # -- one input -------------------------------------------------------------------------

    def run(self, data: bytes) -> None:
        self.inputs += 1
        if self.inputs % self.rebuild_every == 0:
            self._cleanup()
            self.node.dht.store.close()
            self.node = self._build()
        self.failures.clear()
        self.failure_log.failures.clear()
        node = self.node
        node.transport.sent.clear()
        try:
            if not _structured(data):
                self._deliver(data, DHT_ADDR)
            else:
                src = ByteSource(data[1:])
                known = [bytes(n.id) for n in node.protocol.router.all_contacts()[:16]]
                keys = [samples().manifest_key, samples().holder_key, bytes(KEY_SIZE)]
                if src.below(4) == 0:
                    self._client_operation(src, known, keys)
                else:
                    addr = _source(src)
                    self._deliver(dht_request(src, known, keys), addr)
        finally:
            self._cleanup()
        self._check()

    def _run(self, awaitable: Awaitable[T]) -> T:
        return self.loop.run_until_complete(awaitable)

    def _settle(self, rounds: int = 3) -> None:
        for _ in range(rounds):
            self._run(asyncio.sleep(0))

    async def _in_loop(self, function: Callable[[], object]) -> None:
        function()

    def _deliver(self, datagram: bytes, addr: tuple[str, int]) -> None:
        protocol = self.node.protocol
        self._run(self._in_loop(lambda: protocol.datagram_received(datagram, addr)))
        self._settle()

    def _client_operation(
        self, src: ByteSource, known: Sequence[bytes], keys: Sequence[bytes]
    ) -> None:
        """Start an operation, answer its first request with a structured reply, let it go on."""
        dht, protocol = self.node.dht, self.node.protocol
        key = src.choice(keys) if src.flag() else src.exact(KEY_SIZE)
        peer = Node(src.exact(KEY_SIZE), *_source(src))
        operations: tuple[Callable[[], Coroutine[Any, Any, object]], ...] = (
            lambda: dht.closest(key),
            lambda: dht.get(key),
            lambda: dht.get_entries(key),
            lambda: dht.ping((peer.ip, peer.port)),
            lambda: dht.verify(peer),
        )
        operation = src.choice(operations)
        if peer.id != dht.node_id:
            self._run(self._in_loop(lambda: protocol.router.add_contact(peer)))
        task = self.loop.create_task(operation())
        self.own_tasks.append(task)
        self._settle()
        requests = [(d, a) for d, a in self.node.transport.sent if d[:1] == b"\x00"]
        if requests:
            request, addr = requests[0]
            body = dht_reply_body(src, known, keys)
            self._deliver(b"\x01" + request[1:21] + umsgpack.packb(body), addr)
        if src.flag():
            # The other requests time out (each a failure towards eviction); otherwise the
            # operation is cancelled while they are outstanding.
            protocol.cancel_outstanding()
            self._settle()

    def _cleanup(self) -> None:
        """Cancel the tasks still running, then forget their outstanding requests.

        Cancelled requests count no failure against their peers, so the routing table
        grows with the senders of valid requests as a real node's does.
        """
        tasks = [t for t in [*self.node.dht._tasks, *self.own_tasks] if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            self._run(asyncio.gather(*tasks, return_exceptions=True))
            self._settle(1)
        self.node.protocol.cancel_outstanding()
        for task in self.own_tasks:
            if not task.cancelled() and task.exception() is not None:
                self.failures.append(task.exception() or "")
        self.own_tasks.clear()

    def _check(self) -> None:
        """Raise the first exception a task or the loop saw, then check the invariants."""
        failures = [*self.failures, *self.failure_log.failures]
        for failure in failures:
            if isinstance(failure, Exception):
                raise failure
        assert not failures, f"event loop error: {failures[0]}"
        for datagram, addr in self.node.transport.sent:
            assert len(datagram) <= MAX_UDP_PAYLOAD, (
                f"sent a {len(datagram)}-byte datagram to {addr}"
            )
        for contact in self.node.protocol.router.all_contacts():
            assert isinstance(contact.id, bytes) and len(contact.id) == KEY_SIZE, (
                f"routing table holds contact id {contact.id!r}"
            )


_dht_harness: DhtHarness | None = None


def dht_harness() -> DhtHarness:
    """The process's DHT harness, made on first use."""
    global _dht_harness
    if _dht_harness is None:
        _dht_harness = DhtHarness()
    return _dht_harness


def close_dht_harness() -> None:
    """Close the process's DHT harness (its loop, store and log handler), if there is one."""
    global _dht_harness
    if _dht_harness is not None:
        _dht_harness.close()
        _dht_harness = None


def dht_datagram(data: bytes) -> None:
    """No datagram or reply makes the DHT raise, send over 65,507 bytes, or keep a bad contact.

    ``datagram_received`` must never raise (it counts what it drops), nor may a background
    task or a client operation given a malformed reply; every contact in the routing table
    has a 20-byte id.
    """
    dht_harness().run(data)


def _check_reply_decoders(body: object) -> None:
    """Every reply decoder on ``body``: a typed value that re-encodes to itself, or
    WireError."""
    for rpc in ("find_node", "find_value", "find_entries"):
        try:
            reply = dhtwire.decode_lookup_reply(rpc, body, 2 * DhtConfig().ksize)
        except WireError:
            continue
        if isinstance(reply, dhtwire.EntriesReply):
            again = dhtwire.unpack(dhtwire.pack(reply.encode()))
            assert dhtwire.decode_find_entries(again, 2 * DhtConfig().ksize) == reply
    for decode in (dhtwire.decode_identify, dhtwire.decode_store, dhtwire.decode_page):
        with contextlib.suppress(WireError):
            decode(body)
    dhtwire.token_reply(body)
    dhtwire.decode_count(body)


def dht_codec(data: bytes) -> None:
    """The datagram codec alone: any bytes decode or raise WireError, and a request's
    typed arguments encode to a request that decodes to the same arguments.

    From 0x80 up, the rest chooses a well-formed request (or, after an odd second byte,
    a reply) as ``dht_datagram`` does.
    """
    if _structured(data):
        src = ByteSource(data[1:])
        known, keys = [bytes(range(1, 21))], [bytes(20)]
        if src.flag():
            body = dht_reply_body(src, known, keys)
            data = b"\x01" + bytes(20) + umsgpack.packb(body)
        else:
            data = dht_request(src, known, keys)
    try:
        message = dhtwire.decode_datagram(data)
    except WireError:
        return
    if isinstance(message, dhtwire.Reply):
        _check_reply_decoders(message.body)
        return
    try:
        args = dhtwire.decode_args(message.name, message.args)
    except WireError:
        return
    try:
        again = dhtwire.encode_request(
            message.msg_id, message.name, dhtwire.encode_args(args), message.token
        )
    except ValueError:
        return  # over the request size limit (a peer may send up to max_datagram)
    decoded = dhtwire.decode_datagram(again)
    assert isinstance(decoded, dhtwire.Request) and decoded.name == message.name
    assert dhtwire.decode_args(decoded.name, decoded.args) == args


# -- 3. manifests ---------------------------------------------------------------------------


def manifest_record(data: bytes) -> None:
    """parse_manifest raises only WireError or IntegrityError; the DHT policy never raises."""
    raw = mutate_manifest(ByteSource(data[1:])) if _structured(data) else data
    sample = samples()
    for key in (None, bytes(KEY_SIZE), sample.manifest_key):
        try:
            manifest = parse_manifest(raw, key)
        except (WireError, IntegrityError):
            continue
        assert manifest.raw == raw
        assert manifest.key == name_key(manifest.name)
        assert parse_manifest(raw, manifest.key) == manifest
    validator = RecordValidator()
    for key in (bytes(KEY_SIZE), sample.manifest_key):
        validator.record_rank(key, raw, 0.0)
        validator.entry_identity(key, raw, 0.0)
        validator.may_replace(key, raw, sample.manifests[0], 0.0)


# -- 4. holder entries ----------------------------------------------------------------------


def holder_entry(data: bytes) -> None:
    """parse_holder_entry raises only WireError or IntegrityError; the policy never raises."""
    raw = mutate_holder(ByteSource(data[1:])) if _structured(data) else data
    try:
        entry = parse_holder_entry(raw)
    except (WireError, IntegrityError):
        pass
    else:
        assert entry.raw == raw and len(raw) == HOLDER_SIZE
        assert entry.start <= entry.end and entry.port != 0 and entry.version != 0
    validator = RecordValidator()
    for key in (samples().holder_key, samples().manifest_key):
        validator.entry_identity(key, raw, 0.0)
        validator.entry_identity(key, raw, time.time())


# -- 5. names -------------------------------------------------------------------------------


def names(data: bytes) -> None:
    """normalize_name and name_key raise only BadNameError; the normal form is a fixpoint."""
    for errors in ("surrogatepass", "surrogateescape", "replace"):
        try:
            text = data.decode("utf-8", errors)
        except UnicodeDecodeError:
            continue
        try:
            norm = normalize_name(text)
        except BadNameError:
            continue
        assert normalize_name(norm) == norm, "the normal form is not normal"
        assert len(norm.encode("utf-8")) <= MAX_NAME_BYTES
        key = name_key(text)
        assert len(key) == 20 and key == name_key(norm)
        key_namespace_owner(norm)


# -- 6. hash lists --------------------------------------------------------------------------


def hash_list(data: bytes) -> None:
    """decode_hash_list raises only WireError, and returns the hashes it was given.

    The first byte chooses the expected count: below 0x80, the count the rest holds plus
    -2..+2; from 0x80 up, the next four bytes as a signed number.
    """
    if not data:
        return
    rest = data[1:]
    if data[0] < STRUCTURED:
        count = len(rest) // HASH_SIZE + data[0] % 5 - 2
    else:
        count = int.from_bytes(rest[:4], "big", signed=True)
        rest = rest[4:]
    try:
        hashes = decode_hash_list(rest, count)
    except WireError:
        return
    assert len(hashes) == count and b"".join(hashes) == rest
    assert all(len(h) == HASH_SIZE for h in hashes)


# -- 7. S3 request bodies (aws-chunked) -----------------------------------------------------

# The chunk signer of AWS's documented chunked upload (seed signature 4f232c...), so that
# the seeds' signed chunks verify and the fuzzer reaches the code behind them.
S3_SECRET: Final = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
S3_DATE: Final = "20130524T000000Z"
S3_SIGNER: Final = ChunkSigner(
    "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    signing_key(S3_SECRET, "20130524", "us-east-1"),
    "20130524/us-east-1/s3/aws4_request",
    S3_DATE,
)
S3_TRAILERS: Final = ("x-amz-checksum-crc32",)


def _chunked_result(data: bytes, signed: bool, step: int) -> tuple[bytes, dict[str, str]] | str:
    """What a fresh decoder makes of ``data`` fed ``step`` bytes at a time: the payload and
    trailers, or the code of the S3Error it raised."""
    mode = STREAMING_SIGNED_TRAILER if signed else STREAMING_UNSIGNED_TRAILER
    decoder = ChunkedDecoder(mode, S3_SIGNER if signed else None, None, S3_TRAILERS)
    out = bytearray()
    try:
        for start in range(0, len(data), step):
            for piece in decoder.feed(data[start : start + step]):
                out += piece
        return bytes(out), decoder.finish()
    except S3Error as exc:
        return exc.code


def aws_chunked(data: bytes) -> None:
    """ChunkedDecoder raises only S3Error, and how the body is split never changes the
    result. The first byte chooses the mode (bit 0: signed with trailers, else unsigned)
    and the size of the pieces fed (the other bits, 1 to 128 bytes)."""
    if not data:
        return
    signed = bool(data[0] & 1)
    body = data[1:]
    whole = _chunked_result(body, signed, max(len(body), 1))
    split = _chunked_result(body, signed, (data[0] >> 1) + 1)
    assert whole == split, (whole, split)


# -- 8. S3 request authentication ---------------------------------------------------------


def s3_request(data: bytes) -> None:
    """authenticate raises only S3Error on any request. The input is the request as text
    (UTF-8, undecodable bytes kept as surrogates, as aiohttp keeps them): the method and
    target on the first line, then ``name: value`` header lines."""
    text = data.decode("utf-8", "surrogateescape")
    first, _, rest = text.partition("\n")
    method, _, target = first.partition(" ")
    path, _, query_text = target.partition("?")
    query = [(k, v) for k, _, v in (p.partition("=") for p in query_text.split("&") if p)]
    headers: dict[str, str] = {}
    for line in rest.split("\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    req = SignedRequest(method, path, query, headers)
    for now in (1369353600.0, 1369353600.0 + 86400, 1175024202.0, 1175139620.0):
        with contextlib.suppress(S3Error):
            authenticate(req, lambda _: S3_SECRET, now)


# -- the table ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Target:
    function: Callable[[bytes], None]
    max_len: int


TARGETS: Final[dict[str, Target]] = {
    "wire_frames": Target(wire_frames, 70_000),
    "dht_datagram": Target(dht_datagram, 70_000),
    "dht_codec": Target(dht_codec, 70_000),
    "manifest_record": Target(manifest_record, 8192),
    "holder_entry": Target(holder_entry, 1024),
    "names": Target(names, 4096),
    "hash_list": Target(hash_list, 8192),
    "aws_chunked": Target(aws_chunked, 70_000),
    "s3_request": Target(s3_request, 4096),
}
