"""The quick path of ``difs get`` for a small object: blocking sockets, no asyncio.

A ``difs get NAME`` of a few segments spent most of its time starting up (the event loop,
the asyncio client and the fetch machinery imported) for two exchanges: a ``resolve`` with
the entry peer, the hash list and segments from one holder. :func:`quick_get` does that
same I/O over blocking sockets, and every decision with the functions the asyncio client
uses (:mod:`difs_p2p.resolution`, :mod:`difs_p2p.claims`, :mod:`difs_p2p.manifest`,
:mod:`difs_p2p.holders`, :mod:`difs_p2p.segments`), in the same order as
``Client.get``: the entry peer's HELLO, the name's records and its prefix's claim in one
``resolve`` (the owned key's in a second one when the prefix is claimed), the pinned
owner's record, its lineage, the version, then from the first holder whose signed entries
cover every segment: HELLO (its node id must be the entries' signer), the hash list
checked against the signed integrity root, each segment against its hash.

Only a definitive answer ends the command here: the name is not published, not admitted
by its prefix's claim, deleted, or signed by another key than the one pinned (the errors
the asyncio client raises from the same functions). Anything else raises
:class:`Fallback` and the caller runs the asyncio client from the start: more than
``MAX_SEGMENTS`` segments or ``MAX_BYTES`` bytes, a record written under a delegation
(revocations are looked up), no holder whose entries cover the object, a holder that
fails, is slow (``HOLDER_TIMEOUT``, ``HOLDER_RATE``), announces an answer larger than a
segment, or sends a bad hash list or segment, an entry peer
that is cut off or answers with an error, an output that is not a regular file in an
existing directory, a host name to resolve. Hostile by default: nothing is written out
before every segment is verified; a file output is written beside its path and renamed
over it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import time
from pathlib import Path
from typing import IO

from difs_p2p import segments, wire
from difs_p2p.claims import admit, claimed_scope, refused
from difs_p2p.errors import DifsError
from difs_p2p.holders import HolderEntry, verify_holder_entry
from difs_p2p.manifest import Manifest, owned_key
from difs_p2p.membership import cut_off_error
from difs_p2p.names import NameKey, claim_name, name_key, normalize_name
from difs_p2p.opcodec import ResolveReply, ResolveRequest, resolve_call, resolve_reply
from difs_p2p.pins import Pins
from difs_p2p.resolution import (
    Found,
    check_node,
    choose_version,
    decode_resolved,
    lineage,
    pinned_choice,
    version_entries,
)

__all__ = ["MAX_BYTES", "MAX_SEGMENTS", "Fallback", "QuickResult", "quick_get"]

# The largest object taken here (in memory until verified): beyond, the asyncio client's
# parallel, streaming fetch.
MAX_SEGMENTS = 4
MAX_BYTES = 16 << 20
# The entry peer: a HELLO answered within this (as cli_common.HELLO_TIMEOUT), a resolve
# within the asyncio client's I/O timeout.
HELLO_TIMEOUT = 3.0
RESOLVE_TIMEOUT = 30.0
# A holder that takes longer than this for a connect or an answer hands the fetch to the
# asyncio client (which hedges across holders).
HOLDER_TIMEOUT = 2.0
# ... or that sends the object slower than this (bytes per second).
HOLDER_RATE = 2e6
# Ending of the temporary file written beside the output (as fetch.PARTIAL_SUFFIX).
PARTIAL_SUFFIX = ".part"


class Fallback(Exception):
    """The quick path cannot finish this fetch: the asyncio client does it, from the start."""


class QuickResult:
    """What the command reports of a finished fetch (the fields of fetch.FetchResult it
    prints)."""

    def __init__(self, manifest: Manifest, seconds: float, resolve: float, first: float) -> None:
        self.manifest = manifest
        self.bytes = manifest.size
        self.seconds = seconds
        self.resolve = resolve
        self.first_byte = first
        self.sources = 1
        self.retries = 0
        self.gave_up: list[tuple[str, int]] = []


class _Conn:
    """One blocking connection carrying frames; any failure is a :class:`Fallback`."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        # an IP address (ip_literal; holder entries carry one): connected to directly, as
        # getaddrinfo (socket.create_connection) loads the IDNA codec, 3 ms of start-up
        family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            self.sock.settimeout(timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.connect(address)
        except OSError as exc:
            self.sock.close()
            raise Fallback(f"cannot connect to {address}: {exc}") from None
        self.header = bytearray(wire.HEADER_SIZE)

    def send(self, *frames: wire.Frame) -> None:
        try:
            self.sock.sendall(b"".join(wire.encode_bytes(f) for f in frames))
        except OSError as exc:
            raise Fallback(f"send failed: {exc}") from None

    def _fill(self, view: memoryview) -> None:
        got = 0
        while got < len(view):
            n = self.sock.recv_into(view[got:])
            if n == 0:
                raise Fallback("connection closed")
            got += n

    def read(self, timeout: float, deadline: float | None = None, limit: int = 0) -> wire.Frame:
        """The next frame, within ``timeout`` seconds per receive and, when given, by the
        ``deadline`` (time.monotonic); a DATA frame longer than ``limit`` is refused
        before its payload is received (0: the wire's own limit)."""
        try:
            if deadline is not None:
                timeout = min(timeout, deadline - time.monotonic())
                if timeout <= 0:
                    raise Fallback("the holder is slow")
            self.sock.settimeout(timeout)
            self._fill(memoryview(self.header))
            header = wire.parse_header(self.header)
            if limit and header.type is wire.MsgType.DATA and header.length > limit:
                raise Fallback(f"a DATA frame of {header.length} bytes, more than {limit}")
            payload = bytearray(header.length)
            self._fill(memoryview(payload))
            return wire.decode_payload(header, payload)
        except (OSError, DifsError) as exc:  # timeouts, resets, WireError
            raise Fallback(f"receive failed: {exc}") from None

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def ip_literal(host: str) -> bool:
    """Whether ``host`` is an IPv4 or IPv6 address (a name is left to the asyncio client)."""
    for family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError, ValueError):
            socket.inet_pton(family, host)
            return True
    return False


def simple_output(path: Path) -> bool:
    """Whether ``path`` is a regular file or nothing yet, in an existing directory: what
    this path writes (directories, devices, FIFOs and their errors: the asyncio client)."""
    real = os.path.realpath(path)
    try:
        mode = os.stat(real).st_mode
    except FileNotFoundError:
        return os.path.isdir(os.path.dirname(real))
    except OSError:
        return False
    return stat.S_ISREG(mode)


class _Entry:
    """The entry peer's side: ``resolve`` requests on one connection."""

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.conn = _Conn(address, HELLO_TIMEOUT)

    def hello(self) -> None:
        self.conn.send(wire.Hello(request_id=0, peer=None))
        if not isinstance(self.conn.read(HELLO_TIMEOUT), wire.Hello):
            raise Fallback("the entry peer did not answer HELLO")

    def resolve(self, request: ResolveRequest) -> ResolveReply:
        op, args = resolve_call(request)
        self.conn.send(wire.Call(request_id=0, op=op, args=args))
        frame = self.conn.read(RESOLVE_TIMEOUT)
        if not isinstance(frame, wire.Reply):
            raise Fallback(f"resolve answered with {type(frame).__name__}")
        try:
            reply = resolve_reply(dict(frame.body))
        except DifsError as exc:
            raise Fallback(str(exc)) from None
        if cut_off_error(self.address, reply.network, reply.knows, reply.most_seen):
            raise Fallback("the entry peer is cut off")
        return reply

    def lookup(self, key: NameKey) -> Found:
        return decode_resolved(key, self.resolve(ResolveRequest(key)))

    def find(self, norm: str, pins: Pins) -> Found:
        """Client._find for a client that remembers no claim: the name's key and its
        prefix's claim in one request, then the owned key when the prefix is claimed."""
        plain = name_key(norm)
        owner: bytes | None = None
        found: Found | None = None
        scope = claimed_scope(norm)
        if scope is not None:
            claim = claim_name(scope)
            reply = self.resolve(ResolveRequest(plain, also=name_key(claim)))
            found = decode_resolved(plain, reply)
            if reply.also is None:
                raise Fallback("the entry peer predates resolve's also")
            manifests, history, _ = decode_resolved(name_key(claim), reply.also)
            owner = pinned_choice(pins, claim, manifests, history).owner if manifests else None
            if owner is not None:
                at_owned = self.lookup(owned_key(norm, owner))
                if admit(norm, owner, at_owned[0]):
                    found = at_owned
        if found is None:
            found = self.lookup(plain)
        manifests, history, holders = found
        usable = admit(norm, owner, manifests)
        if not usable:
            raise refused(norm, owner, manifests)
        return usable, admit(norm, owner, history), holders


Holder = tuple[str, int]


def _holder(manifest: Manifest, entries: list[HolderEntry]) -> tuple[Holder, list[HolderEntry]]:
    """The first holder (in the entries' order) with signed entries covering every
    segment, and its entries."""
    by_address: dict[Holder, list[HolderEntry]] = {}
    for h in entries:
        by_address.setdefault((h.host, h.port), []).append(h)
    last = manifest.segment_count - 1
    for address, mine in by_address.items():
        for h in mine:
            if h.start <= 0 and h.end >= last:
                try:
                    verify_holder_entry(h)
                except DifsError:
                    continue
                return address, mine
    raise Fallback("no holder's entries cover the whole object")


def _fetch(manifest: Manifest, entries: list[HolderEntry]) -> list[bytes | memoryview]:
    """Every segment of ``manifest`` from one holder, each verified."""
    address, mine = _holder(manifest, entries)
    count = manifest.segment_count
    # at most what the largest answer may hold: a segment, or the hash list
    limit = max(manifest.segment_size, count * segments.HASH_SIZE)
    # a holder that trickles the bytes in is slow too
    deadline = time.monotonic() + HOLDER_TIMEOUT + manifest.size / HOLDER_RATE
    conn = _Conn(address, HOLDER_TIMEOUT)
    try:
        root = manifest.integrity
        conn.send(
            wire.Hello(request_id=0, peer=None),
            wire.GetSeg(request_id=0, seg_id=root, offset=0, length=0),
        )
        hello = conn.read(HOLDER_TIMEOUT, deadline)
        try:
            check_node(address, hello.peer if isinstance(hello, wire.Hello) else None, mine)
        except DifsError as exc:
            raise Fallback(str(exc)) from None
        frame = conn.read(HOLDER_TIMEOUT, deadline, limit)
        if not isinstance(frame, wire.Data):
            raise Fallback("no hash list")
        try:
            hashes = segments.verify_hash_list(bytes(frame.data), root, count)
        except DifsError as exc:
            raise Fallback(str(exc)) from None
        conn.send(
            *(wire.GetSeg(request_id=i, seg_id=hashes[i], offset=0, length=0) for i in range(count))
        )
        pieces: list[bytes | memoryview] = []
        for i in range(count):
            frame = conn.read(HOLDER_TIMEOUT, deadline, limit)
            if not isinstance(frame, wire.Data) or frame.request_id != i:
                raise Fallback(f"segment {i} not sent")
            try:
                segments.verify_segment(hashes[i], frame.data)
            except DifsError as exc:  # the asyncio client reports it and asks others
                raise Fallback(str(exc)) from None
            pieces.append(frame.data)
        return pieces
    finally:
        conn.close()


def _write_file(path: Path, pieces: list[bytes | memoryview]) -> None:
    """Write ``pieces`` to a new file beside ``path`` (the mode of the file there, if
    any), renamed over it; a failure leaves ``path`` as it was and is a Fallback."""
    real = Path(os.path.realpath(path))
    try:
        mode: int | None = stat.S_IMODE(os.stat(real).st_mode)
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise Fallback(str(exc)) from None
    tmp = real.with_name(f".{real.name}.{os.urandom(4).hex()}{PARTIAL_SUFFIX}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            if mode is not None:
                os.fchmod(fd, mode)
            for piece in pieces:
                view = memoryview(piece)
                while view:
                    view = view[os.write(fd, view) :]
        finally:
            os.close(fd)
        os.replace(tmp, real)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise Fallback(str(exc)) from None
        raise


def quick_get(
    address: tuple[str, int],
    name: str,
    out: Path | IO[bytes],
    pins: Pins,
    max_bytes: int = MAX_BYTES,
) -> QuickResult:
    """Fetch the newest version of ``name`` through the entry peer at ``address`` into
    ``out`` (a path, or a binary stream written once every byte is verified), if it is
    at most ``max_bytes`` (and ``MAX_BYTES``) long.

    The definitive errors of the name (NotFoundError, DeletedError,
    PermissionDeniedError, BadNameError) are raised as the asyncio client raises them;
    :class:`Fallback` when this path cannot finish (nothing written then).
    """
    started = time.perf_counter()
    norm = normalize_name(name)
    if isinstance(out, Path) and not simple_output(out):
        raise Fallback("not a regular file output")
    if not ip_literal(address[0]):
        raise Fallback("a host name")
    entry = _Entry(address)
    try:
        entry.hello()
        manifests, history, holders = entry.find(norm, pins)
    finally:
        entry.conn.close()
    best = pinned_choice(pins, norm, manifests, history)
    valid = lineage(best, manifests, history)
    if any(m.delegation for m in valid):
        raise Fallback("written under a delegation: revocations are looked up")
    manifest = choose_version(valid[-1], valid, None)
    resolve = time.perf_counter() - started
    if not 0 < manifest.segment_count <= MAX_SEGMENTS or manifest.size > min(max_bytes, MAX_BYTES):
        raise Fallback(f"{manifest.segment_count} segments, {manifest.size} bytes")
    pieces = _fetch(manifest, version_entries(holders, manifest))
    first = time.perf_counter() - started
    if isinstance(out, Path):
        _write_file(out, pieces)
    else:
        for piece in pieces:
            out.write(piece)
        out.flush()
    return QuickResult(manifest, time.perf_counter() - started, resolve, first)
