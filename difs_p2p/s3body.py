"""S3 request bodies, without I/O: the aws-chunked framing and the payload's checksums.

Pure: bytes in, payload bytes and verdicts out. :class:`ChunkedDecoder` takes off the
``aws-chunked`` framing (``x-amz-content-sha256: STREAMING-...``) incrementally: each
chunk's signature verified (chained from the request's seed signature, ``ChunkSigner``) in
the signed modes, the trailers read (and their ``x-amz-trailer-signature`` verified in the
signed-trailer mode), memory bounded (one line at most, ``MAX_CHUNK_LINE``; chunks up to
``MAX_CHUNK_SIZE``), the decoded length checked. :class:`BodyChecks` checks
``Content-MD5``, ``x-amz-checksum-*`` (in the headers or the trailers) and a hex
``x-amz-content-sha256`` over the decoded payload, and always computes the MD5 (the ETag of
a single-part upload).

Payload bytes are handed out before the end of their chunk (and before the body's
checksums are known): a failure at any point fails the whole body, and the caller keeps
nothing of it. ``s3auth`` authenticates the request and builds the decoder
(``s3auth.body_decoder``).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
import zlib
from collections.abc import Callable, Iterable, Mapping
from typing import Protocol

import google_crc32c

from difs_p2p import s3errors
from difs_p2p.classgen import valueclass
from difs_p2p.s3errors import S3Error

MAX_CHUNK_SIZE = 16 * 1024 * 1024
"""The largest aws-chunked chunk accepted (clients send 8 KiB to 1 MiB; botocore 1 MiB)."""
MAX_CHUNK_LINE = 4096
"""The longest chunk header or trailer line (a signed chunk header is ~90 bytes)."""
MAX_TRAILER_BYTES = 16 * 1024
"""All trailer lines of one body together."""
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_PAYLOADS = frozenset(
    {STREAMING_UNSIGNED_TRAILER, STREAMING_SIGNED, STREAMING_SIGNED_TRAILER}
)
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()

_HEX64 = re.compile(r"[0-9a-f]{64}")


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(_utf8(a), _utf8(b))


def _utf8(text: str) -> bytes:
    """Never an exception for the surrogates aiohttp keeps undecodable bytes as."""
    return text.encode("utf-8", "surrogateescape")


@valueclass
class ChunkSigner:
    """What verifies the chunk signatures of a signed aws-chunked body: the request's
    signature (the seed), the signing key, the credential scope and the request's date."""

    seed_signature: str
    key: bytes
    scope: str
    date: str

    def chunk_signature(self, previous: str, data_sha256: str) -> str:
        """The signature of a chunk whose data hashes to ``data_sha256`` (hex), chained
        after the ``previous`` signature."""
        text = "\n".join(
            ["AWS4-HMAC-SHA256-PAYLOAD", self.date, self.scope, previous, EMPTY_SHA256, data_sha256]
        )
        return hmac.new(self.key, _utf8(text), hashlib.sha256).hexdigest()

    def trailer_signature(self, previous: str, canonical_trailers: bytes) -> str:
        """The signature of the trailers (``name:value\\n`` each, in order), chained after
        the final chunk's signature."""
        digest = hashlib.sha256(canonical_trailers).hexdigest()
        text = "\n".join(["AWS4-HMAC-SHA256-TRAILER", self.date, self.scope, previous, digest])
        return hmac.new(self.key, _utf8(text), hashlib.sha256).hexdigest()


# -- aws-chunked bodies --------------------------------------------------------------------

_CHUNK_HEADER = re.compile(rb"([0-9a-fA-F]{1,16})(?:;chunk-signature=([0-9a-f]{64}))?")
_TRAILER_LINE = re.compile(rb"([A-Za-z0-9-]{1,128}):[ \t]*([\x21-\x7e]{0,1024})[ \t]*")


def _framing(message: str) -> S3Error:
    return s3errors.invalid_request(f"malformed aws-chunked body: {message}")


class ChunkedDecoder:
    """The payload of an ``aws-chunked`` body, fed in pieces of any size.

    ``payload`` is the request's ``x-amz-content-sha256`` (one of ``STREAMING_PAYLOADS``);
    ``signer`` verifies the chunk and trailer signatures of the signed modes (required for
    them); ``decoded_length`` is ``x-amz-decoded-content-length`` when sent; ``trailers``
    the names ``x-amz-trailer`` announced (lower case). The framing::

        HEX-SIZE[;chunk-signature=SIG]\\r\\n DATA \\r\\n ... 0[;chunk-signature=SIG]\\r\\n
        [name:value\\r\\n ...] [x-amz-trailer-signature:SIG\\r\\n] \\r\\n

    Memory is bounded: at most one header or trailer line (``MAX_CHUNK_LINE``) is kept;
    data is handed out as slices of the input. Any flaw raises S3Error: malformed framing
    InvalidRequest, a bad signature SignatureDoesNotMatch, a body cut short IncompleteBody.
    """

    def __init__(
        self,
        payload: str,
        signer: ChunkSigner | None = None,
        decoded_length: int | None = None,
        trailers: Iterable[str] = (),
    ) -> None:
        if payload not in STREAMING_PAYLOADS:
            raise s3errors.not_implemented(f"x-amz-content-sha256 {payload!r} is not supported")
        self.signed = payload != STREAMING_UNSIGNED_TRAILER
        if self.signed and signer is None:
            raise s3errors.invalid_request("a signed aws-chunked body needs a header signature")
        self.signer = signer
        self.signed_trailer = payload == STREAMING_SIGNED_TRAILER
        self.decoded_length = decoded_length
        self.expected_trailers = frozenset(trailers)
        self.previous = signer.seed_signature if signer is not None else ""
        self.decoded = 0
        self._state = "header"  # header, data, data-crlf, trailer, done
        self._line = bytearray()
        self._left = 0  # data bytes left in the current chunk
        self._crlf = 0  # bytes of the CRLF after the data seen
        self._signature = ""
        self._hash = hashlib.sha256()
        self._trailers: dict[str, str] = {}
        self._trailer_bytes = 0
        self._canonical = bytearray()
        self._trailer_signature = ""

    def feed(self, data: bytes | bytearray | memoryview) -> list[bytes | memoryview]:
        """The payload bytes in ``data`` (slices of it, possibly none)."""
        view = memoryview(data).cast("B") if not isinstance(data, memoryview) else data.cast("B")
        out: list[bytes | memoryview] = []
        pos = 0
        end = len(view)
        while pos < end:
            state = self._state
            if state == "data":
                take = min(self._left, end - pos)
                piece = view[pos : pos + take]
                if self.signed:
                    self._hash.update(piece)
                out.append(piece)
                self._left -= take
                pos += take
                if self._left == 0:
                    self._state = "data-crlf"
            elif state == "data-crlf":
                want = b"\r\n"[self._crlf]
                if view[pos] != want:
                    raise _framing("chunk data not followed by CRLF")
                pos += 1
                self._crlf += 1
                if self._crlf == 2:
                    self._crlf = 0
                    self._end_chunk()
            elif state == "done":
                raise _framing("bytes after the end of the body")
            else:  # a header or trailer line
                room = MAX_CHUNK_LINE - len(self._line)
                window = bytes(view[pos : min(end, pos + room + 1)])
                newline = window.find(b"\n")
                if newline < 0:
                    if len(window) > room:
                        raise _framing("a chunk header or trailer line is too long")
                    self._line += window
                    break
                self._line += window[: newline + 1]
                pos += newline + 1
                if len(self._line) > MAX_CHUNK_LINE:
                    raise _framing("a chunk header or trailer line is too long")
                line = bytes(self._line)
                self._line.clear()
                if not line.endswith(b"\r\n"):
                    raise _framing("a line not ended by CRLF")
                if state == "header":
                    self._chunk_header(line[:-2])
                else:
                    self._trailer_line(line[:-2])
        return out

    def _chunk_header(self, line: bytes) -> None:
        match = _CHUNK_HEADER.fullmatch(line)
        if match is None:
            raise _framing(f"bad chunk header {line[:80]!r}")
        size = int(match.group(1), 16)
        if size > MAX_CHUNK_SIZE:
            raise _framing(f"a chunk of {size} bytes (at most {MAX_CHUNK_SIZE})")
        signature = match.group(2)
        if self.signed and signature is None:
            raise _framing("a chunk without its chunk-signature")
        if not self.signed and signature is not None:
            raise _framing("a chunk-signature in an unsigned body")
        self._signature = signature.decode() if signature is not None else ""
        self.decoded += size
        if self.decoded_length is not None and self.decoded > self.decoded_length:
            raise _framing(f"more than x-amz-decoded-content-length ({self.decoded_length}) bytes")
        self._hash = hashlib.sha256()
        if size:
            self._left = size
            self._state = "data"
        else:
            self._end_chunk()
            self._state = "trailer"

    def _end_chunk(self) -> None:
        if self.signer is not None:
            expected = self.signer.chunk_signature(self.previous, self._hash.hexdigest())
            if not _same(expected, self._signature):
                raise s3errors.signature_does_not_match()
            self.previous = self._signature
        if self._state == "data-crlf":
            self._state = "header"

    def _trailer_line(self, line: bytes) -> None:
        self._trailer_bytes += len(line) + 2
        if self._trailer_bytes > MAX_TRAILER_BYTES:
            raise _framing("the trailers are too long")
        if not line:
            self._end_trailers()
            return
        if self._trailer_signature:
            raise _framing("a trailer after x-amz-trailer-signature")
        match = _TRAILER_LINE.fullmatch(line)
        if match is None:
            raise _framing(f"bad trailer line {line[:80]!r}")
        name = match.group(1).decode().lower()
        value = match.group(2).decode()
        if name == "x-amz-trailer-signature":
            if not self.signed_trailer or not _HEX64.fullmatch(value):
                raise _framing("an unexpected or malformed x-amz-trailer-signature")
            self._trailer_signature = value
            return
        if name in self._trailers:
            raise _framing(f"trailer {name} sent twice")
        if name not in self.expected_trailers:
            raise _framing(f"trailer {name} was not announced in x-amz-trailer")
        self._trailers[name] = value
        self._canonical += f"{name}:{value}\n".encode()

    def _end_trailers(self) -> None:
        missing = self.expected_trailers - set(self._trailers)
        if missing:
            raise s3errors.incomplete_body(f"missing trailer {', '.join(sorted(missing))}")
        if self.signed_trailer:
            assert self.signer is not None
            if self._trailers or self._trailer_signature:
                expected = self.signer.trailer_signature(self.previous, bytes(self._canonical))
                if not _same(expected, self._trailer_signature):
                    raise s3errors.signature_does_not_match()
        self._state = "done"

    def finish(self) -> dict[str, str]:
        """The trailers (lower-case name -> value) once the body is complete; IncompleteBody
        if it was cut short or is not ``decoded_length`` bytes."""
        if self._state != "done":
            raise s3errors.incomplete_body("the aws-chunked body ended before its final chunk")
        if self.decoded_length is not None and self.decoded != self.decoded_length:
            raise s3errors.incomplete_body(
                f"{self.decoded} payload bytes, x-amz-decoded-content-length says "
                f"{self.decoded_length}"
            )
        return dict(self._trailers)


def trailer_names(headers: Mapping[str, str]) -> list[str]:
    """The trailers ``x-amz-trailer`` announces, lower case."""
    text = headers.get("x-amz-trailer", "")
    return [name.strip().lower() for name in text.split(",") if name.strip()]


# -- checksums -----------------------------------------------------------------------------


class _Crc:
    """A CRC as hashlib's interface: ``update``, ``digest`` (big-endian)."""

    def __init__(self, castagnoli: bool) -> None:
        self.castagnoli = castagnoli
        self.value = 0
        self.c = google_crc32c.Checksum() if castagnoli else None  # type: ignore[no-untyped-call]

    def update(self, data: bytes | memoryview) -> None:
        if self.c is not None:
            self.c.update(bytes(data))  # type: ignore[no-untyped-call]
        else:
            self.value = zlib.crc32(data, self.value)

    def digest(self) -> bytes:
        if self.c is not None:
            return bytes(self.c.digest())  # type: ignore[no-untyped-call]
        return self.value.to_bytes(4, "big")


class _Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...
    def digest(self) -> bytes: ...


# algorithm -> (digest size, a new hasher)
CHECKSUMS: dict[str, tuple[int, Callable[[], _Hasher]]] = {
    "crc32": (4, lambda: _Crc(False)),
    "crc32c": (4, lambda: _Crc(True)),
    "sha1": (20, hashlib.sha1),
    "sha256": (32, hashlib.sha256),
}
"""The ``x-amz-checksum-*`` algorithms verified (crc64nvme is not: NotImplemented)."""


# x-amz-checksum-* headers that are not a checksum value (GetObject's "mode: ENABLED"...)
_NOT_CHECKSUMS = frozenset(
    {"x-amz-checksum-mode", "x-amz-checksum-type", "x-amz-checksum-algorithm"}
)


def _b64(text: str, size: int) -> bytes | None:
    try:
        raw = base64.b64decode(text.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if len(raw) == size else None


class BodyChecks:
    """The checks of a request's (decoded) payload, from its headers and trailers.

    ``Content-MD5`` (InvalidDigest if it is not base64 of 16 bytes, BadDigest if wrong),
    one ``x-amz-checksum-ALG`` in the headers or announced by ``x-amz-trailer`` (InvalidRequest
    if malformed, BadDigest if wrong), and ``payload`` when it is a hex SHA-256 (the signed
    ``x-amz-content-sha256``: XAmzContentSHA256Mismatch). The MD5 is always computed:
    ``md5_hex`` is a single-part upload's ETag.
    """

    def __init__(self, headers: Mapping[str, str], payload: str = UNSIGNED_PAYLOAD) -> None:
        self.size = 0
        self._md5 = hashlib.md5(usedforsecurity=False)
        self._content_md5: bytes | None = None
        if "content-md5" in headers:
            self._content_md5 = _b64(headers["content-md5"], 16)
            if self._content_md5 is None:
                raise s3errors.invalid_digest(headers["content-md5"])
        self._sha256 = None
        self._claimed_sha256 = ""
        if re.fullmatch(r"[0-9a-fA-F]{64}", payload):
            self._sha256 = hashlib.sha256()
            self._claimed_sha256 = payload.lower()
        self._expected: dict[str, bytes | None] = {}  # None: in the trailers
        names = [
            name
            for name in [*headers, *trailer_names(headers)]
            if name.startswith("x-amz-checksum-") and name not in _NOT_CHECKSUMS
        ]
        if len(names) > 1:
            raise s3errors.invalid_request("Expecting a single x-amz-checksum- header")
        self._hashers: dict[str, _Hasher] = {}
        for name in names:
            algorithm = name.removeprefix("x-amz-checksum-")
            if algorithm not in CHECKSUMS:
                raise s3errors.not_implemented(f"checksum algorithm {algorithm} is not supported")
            size, new = CHECKSUMS[algorithm]
            if name in headers:
                value = _b64(headers[name], size)
                if value is None:
                    raise s3errors.invalid_request(f"Value for {name} header is invalid.")
                self._expected[algorithm] = value
            else:
                self._expected[algorithm] = None
            self._hashers[algorithm] = new()

    def update(self, data: bytes | memoryview) -> None:
        """Count ``data`` (the next payload bytes) into every check."""
        for lane in self.lanes:
            self.update_lane(lane, data)

    @property
    def lanes(self) -> list[int]:
        """The lanes of :meth:`update_lane` that have work: 0 (the size and MD5) always,
        1 (the SHA-256 and the checksums) when there is one."""
        return [0, 1] if self._sha256 is not None or self._hashers else [0]

    def update_lane(self, lane: int, data: bytes | memoryview) -> None:
        """``update`` for one lane: lanes are independent, so two threads may run them at
        once (hashlib and CRC release the GIL on large buffers: one body hashes on two
        cores), each lane's calls in payload order."""
        if lane == 0:
            self.size += len(data)
            self._md5.update(data)
            return
        if self._sha256 is not None:
            self._sha256.update(data)
        for hasher in self._hashers.values():
            hasher.update(data)

    @property
    def md5_hex(self) -> str:
        """The payload's MD5 so far, hex (the ETag of a single-part upload)."""
        return self._md5.hexdigest()

    def verify(self, trailers: Mapping[str, str] | None = None) -> dict[str, str]:
        """Check everything once the payload is complete (``trailers`` from
        ``ChunkedDecoder.finish``); the verified checksums (``x-amz-checksum-ALG`` -> base64)."""
        trailers = trailers or {}
        if self._content_md5 is not None and self._md5.digest() != self._content_md5:
            raise s3errors.bad_digest(
                base64.b64encode(self._content_md5).decode(),
                base64.b64encode(self._md5.digest()).decode(),
            )
        if self._sha256 is not None:
            computed = self._sha256.hexdigest()
            if computed != self._claimed_sha256:
                raise s3errors.content_sha256_mismatch(self._claimed_sha256, computed)
        verified = {}
        for algorithm, hasher in self._hashers.items():
            name = f"x-amz-checksum-{algorithm}"
            expected = self._expected[algorithm]
            if expected is None:
                size = CHECKSUMS[algorithm][0]
                expected = _b64(trailers.get(name, ""), size)
                if expected is None:
                    raise s3errors.invalid_request(f"Value for {name} trailing header is invalid.")
            digest = hasher.digest()
            if digest != expected:
                raise s3errors.bad_digest(
                    message=f"The {algorithm.upper()} you specified did not match the "
                    "calculated checksum."
                )
            verified[name] = base64.b64encode(digest).decode()
        return verified
