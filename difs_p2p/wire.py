"""Frames of the TCP protocol between peers: one header, one message table, pure codecs.

Every frame is a 12-byte header followed by its payload. All integers are big-endian::

    offset  size  field
         0  u8    version     PROTOCOL_VERSION (1)
         1  u8    type        a MsgType
         2  u16   flags       0 in version 1
         4  u32   request id  chosen by the sender of a request, echoed in its answer
         8  u32   length      bytes of payload that follow, bounded per type (MESSAGES)
        12  ...   payload

Payloads by type::

    1 HELLO    JSON  {"peer": hex node id or null, "v": 1, optional "nonce", "auth", "role"}
    2 CALL     JSON  {"op": name, ...args}           a control request
    3 REPLY    JSON  any object                       the successful answer to a CALL
    4 ERROR    u16 code, UTF-8 message (<= 1024 bytes)
    5 PUT_SEG  segment id (32 bytes), segment bytes (<= MAX_SEGMENT)
    6 GET_SEG  segment id (32 bytes), u64 offset, u32 length (0: to the end)
    7 DATA     segment bytes (<= MAX_SEGMENT)         the answer to GET_SEG
    8 ACK      segment id (32 bytes), u8 flags (bit 0: newly stored)   the answer to PUT_SEG

A JSON payload is a UTF-8 encoded object with string keys, nested at most MAX_JSON_DEPTH
deep, without NaN or infinities and without duplicate keys. It is written canonically:
sorted keys, no spaces, non-ASCII characters as UTF-8.

Nothing here does I/O. Decoders are total: bytes from a peer either decode or raise
:class:`~difs_p2p.errors.WireError` naming the field and its offset, counted from the first
byte of the frame's header; no length field is trusted before it is checked against the
limit of its type. Encoders refuse (with :class:`~difs_p2p.errors.UsageError`) any frame
that the decoder would refuse, so a peer never sends one.

:class:`FrameDecoder` turns a byte stream into frames for tests and fuzzing;
``transfer.Connection`` receives the same frames from a socket with the same functions
(:func:`parse_header`, :func:`decode_payload`, :func:`truncated`), so what is fuzzed is
what runs.

Segment bytes are never copied: :func:`encode` returns the header and the payload as
separate parts (for ``socket.sendmsg`` or ``writelines``), and :func:`decode_payload`
returns the segment bytes of PUT_SEG and DATA as a view of the buffer it was given, so
that buffer must stay unchanged while the frame is in use.

The module is longer than most (a codec table): the header, every message type's encoder
and decoder and their limits are one table, read and changed together (a new message type
touches each part once), and the golden vectors in tests/test_wire.py cover it as a whole.
"""

from __future__ import annotations

import enum
import json
import math
import re
import struct
from collections.abc import Callable
from itertools import chain
from typing import Any, Final, NamedTuple, TypeAlias, TypeGuard

from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError, WireError
from difs_p2p.identity import NODE_ID_SIZE
from difs_p2p.segments import SegmentId

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "HELLO_ROLES",
    "MAX_CONTROL_PAYLOAD",
    "MAX_ERROR_MESSAGE",
    "MAX_JSON_DEPTH",
    "MAX_OP_LENGTH",
    "MAX_PAYLOAD",
    "MAX_SEGMENT",
    "MESSAGES",
    "PROTOCOL_VERSION",
    "SEGMENT_ID_SIZE",
    "Ack",
    "Auth",
    "Call",
    "Data",
    "Error",
    "ErrorCode",
    "Frame",
    "FrameDecoder",
    "GetSeg",
    "Header",
    "Hello",
    "MessageSpec",
    "MsgType",
    "PayloadKind",
    "PutSeg",
    "Reply",
    "WireError",
    "decode_payload",
    "encode",
    "encode_bytes",
    "encode_header",
    "parse_header",
    "truncated",
]

Buffer: TypeAlias = bytes | bytearray | memoryview

PROTOCOL_VERSION: Final = 1

HEADER: Final = struct.Struct("!BBHII")
HEADER_SIZE: Final = 12

# The largest segment one frame carries. Segments are planned no larger than this, and a
# receiver preallocates at most one such buffer per connection.
MAX_SEGMENT: Final = 16 * 1024 * 1024
# The largest payload of any frame: a segment plus room for its fixed fields (PUT_SEG uses
# 32 of the 64 bytes). Receive buffers sized to this fit every frame.
MAX_PAYLOAD: Final = MAX_SEGMENT + 64
# JSON frames (HELLO, CALL, REPLY) carry control data; bulk data travels as segments.
# 256 KiB bounds the JSON parser's time and memory per frame (tens of milliseconds at worst).
MAX_CONTROL_PAYLOAD: Final = 256 * 1024
# Error messages are diagnostics for a human; longer ones are cut when encoding.
MAX_ERROR_MESSAGE: Final = 1024
# Control messages are shallow; 32 levels leave room, and code that recurses over a decoded
# object (json.dumps included) stays far from Python's recursion limit.
MAX_JSON_DEPTH: Final = 32
# Operation names are short identifiers ("find_value", "status").
MAX_OP_LENGTH: Final = 64
# Segment ids are BLAKE3/SHA-256-sized digests.
SEGMENT_ID_SIZE: Final = 32

_U16: Final = struct.Struct("!H")
_GET_SEG: Final = struct.Struct("!32sQI")
_ACK: Final = struct.Struct("!32sB")
_ACK_STORED: Final = 0x01
_NODE_ID_HEX = re.compile(rf"[0-9a-f]{{{2 * NODE_ID_SIZE}}}")
# Surrogate escapes in JSON text: "\ud83d\ude00" is one character; "\ud800" alone is not UTF-8.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_CONTAINERS: Final = (dict, list, tuple)
# HELLO authentication (see difs_p2p.control): a 32-byte nonce; an operator's proof is a
# 32-byte HMAC, a peer's a 32-byte Ed25519 key and a 64-byte signature.
NONCE_SIZE: Final = 32
HELLO_ROLES: Final = ("stranger", "peer", "operator")
_AUTH_SIZES: Final = {"operator": (0, 32), "peer": (32, 64)}


class MsgType(enum.IntEnum):
    """The type byte of a frame."""

    HELLO = 1
    CALL = 2
    REPLY = 3
    ERROR = 4
    PUT_SEG = 5
    GET_SEG = 6
    DATA = 7
    ACK = 8


class ErrorCode(enum.IntEnum):
    """The code carried by an ERROR frame. Unknown codes decode as plain ints."""

    BAD_REQUEST = 1
    NOT_FOUND = 2
    INTEGRITY = 3
    NO_SPACE = 4
    FORBIDDEN = 5
    EXISTS = 6
    DELETED = 7
    BUSY = 8
    INTERNAL = 9
    UNSUPPORTED = 10
    TIMEOUT = 11


class PayloadKind(enum.Enum):
    """How a payload is encoded."""

    JSON = "json"
    BINARY = "binary"


class MessageSpec(NamedTuple):
    """One row of the message table: the bounds a header's length must respect."""

    name: str
    min_payload: int
    max_payload: int
    kind: PayloadKind


MESSAGES: Final[dict[MsgType, MessageSpec]] = {
    MsgType.HELLO: MessageSpec("HELLO", 2, MAX_CONTROL_PAYLOAD, PayloadKind.JSON),
    MsgType.CALL: MessageSpec("CALL", 2, MAX_CONTROL_PAYLOAD, PayloadKind.JSON),
    MsgType.REPLY: MessageSpec("REPLY", 2, MAX_CONTROL_PAYLOAD, PayloadKind.JSON),
    MsgType.ERROR: MessageSpec("ERROR", 2, 2 + MAX_ERROR_MESSAGE, PayloadKind.BINARY),
    MsgType.PUT_SEG: MessageSpec(
        "PUT_SEG", SEGMENT_ID_SIZE, SEGMENT_ID_SIZE + MAX_SEGMENT, PayloadKind.BINARY
    ),
    MsgType.GET_SEG: MessageSpec("GET_SEG", _GET_SEG.size, _GET_SEG.size, PayloadKind.BINARY),
    MsgType.DATA: MessageSpec("DATA", 0, MAX_SEGMENT, PayloadKind.BINARY),
    MsgType.ACK: MessageSpec("ACK", _ACK.size, _ACK.size, PayloadKind.BINARY),
}
assert HEADER.size == HEADER_SIZE
assert set(MESSAGES) == set(MsgType)
assert all(spec.max_payload <= MAX_PAYLOAD for spec in MESSAGES.values())


@valueclass
class Header:
    """A parsed frame header; ``length`` is within the limits of ``type``."""

    version: int
    type: MsgType
    flags: int
    request_id: int
    length: int


@valueclass(kw_only=True)
class Auth:
    """A proof of a role in a HELLO: ``role`` "operator" (``proof``: 32-byte HMAC, no
    ``key``) or "peer" (``key``: 32-byte Ed25519 node key, ``proof``: 64-byte signature)."""

    role: str
    key: bytes | None
    proof: bytes


@valueclass(kw_only=True)
class Hello:
    """Opens a connection: who is speaking (``peer`` is a hex node id; None for clients).

    Authentication (all optional, absent in a plain HELLO): a peer answers a HELLO with a
    fresh ``nonce``; the other side sends a HELLO with ``auth``, a proof over that nonce;
    the peer answers with the ``role`` it granted.
    """

    request_id: int
    peer: str | None
    nonce: bytes | None = None
    auth: Auth | None = None
    role: str | None = None


@valueclass(kw_only=True)
class Call:
    """A control request: operation ``op`` with JSON arguments (which cannot be named "op")."""

    request_id: int
    op: str
    args: dict[str, Any]


@valueclass(kw_only=True)
class Reply:
    """The successful answer to a CALL."""

    request_id: int
    body: dict[str, Any]


@valueclass(kw_only=True)
class Error:
    """A failed request: an ErrorCode (or an unknown code as int) and a message."""

    request_id: int
    code: ErrorCode | int
    message: str


@valueclass(kw_only=True)
class PutSeg:
    """Store a segment under its id."""

    request_id: int
    seg_id: SegmentId
    data: bytes | memoryview


@valueclass(kw_only=True)
class GetSeg:
    """Read ``length`` bytes of a segment from ``offset`` (length 0: to the end)."""

    request_id: int
    seg_id: SegmentId
    offset: int
    length: int


@valueclass(kw_only=True)
class Data:
    """Segment bytes: the answer to GET_SEG."""

    request_id: int
    data: bytes | memoryview


@valueclass(kw_only=True)
class Ack:
    """The answer to PUT_SEG; ``stored`` is False when the segment was already there."""

    request_id: int
    seg_id: SegmentId
    stored: bool


Frame: TypeAlias = Hello | Call | Reply | Error | PutSeg | GetSeg | Data | Ack


# -- header ---------------------------------------------------------------------------------


def parse_header(buf: Buffer) -> Header:
    """Parse exactly HEADER_SIZE bytes; the length is checked against its type's limits."""
    if len(buf) != HEADER_SIZE:
        raise WireError(
            f"a header is {HEADER_SIZE} bytes, got {len(buf)}",
            field="header",
            offset=min(len(buf), HEADER_SIZE),
        )
    version, type_byte, flags, request_id, length = HEADER.unpack(buf)
    if version != PROTOCOL_VERSION:
        raise WireError(f"unsupported protocol version {version}", field="version", offset=0)
    try:
        msg_type = MsgType(type_byte)
    except ValueError:
        raise WireError(f"unknown message type {type_byte}", field="type", offset=1) from None
    if flags != 0:
        raise WireError(f"flags must be 0, got {flags:#06x}", field="flags", offset=2)
    _check_length(msg_type, length)
    return Header(version, msg_type, flags, request_id, length)


def _check_length(msg_type: MsgType, length: int) -> None:
    spec = MESSAGES[msg_type]
    if length > spec.max_payload:
        raise WireError(
            f"payload length {length} exceeds the {spec.max_payload}-byte limit of {spec.name}",
            field="length",
            offset=8,
        )
    if length < spec.min_payload:
        raise WireError(
            f"payload length {length} is below the {spec.min_payload}-byte minimum of {spec.name}",
            field="length",
            offset=8,
        )


def encode_header(msg_type: MsgType, request_id: int, length: int) -> bytes:
    """The 12 header bytes of a frame of ``msg_type`` with ``length`` bytes of payload."""
    spec = MESSAGES.get(msg_type)
    if spec is None:
        raise UsageError(f"unknown message type {msg_type!r}")
    if not 0 <= request_id <= 0xFFFF_FFFF:
        raise UsageError(f"request id {request_id} does not fit in 32 bits")
    if not spec.min_payload <= length <= spec.max_payload:
        raise UsageError(
            f"{spec.name} payload of {length} bytes is outside "
            f"{spec.min_payload}..{spec.max_payload}"
        )
    return HEADER.pack(PROTOCOL_VERSION, msg_type, 0, request_id, length)


# -- JSON payloads --------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise ValueError("duplicate key in object")
    return obj


_JSON_DECODER: Final = json.JSONDecoder(
    parse_float=_finite_float, parse_constant=_no_constant, object_pairs_hook=_unique_keys
)


def _json_problem(obj: object, *, check_keys: bool) -> str | None:
    """Why ``obj`` cannot travel in a JSON frame (too deep, a key not a string), or None.

    The walk goes one nesting level at a time: it never recurses, however deep ``obj`` is,
    and stops after MAX_JSON_DEPTH levels.
    """
    level: list[Any] = [obj]
    for _ in range(MAX_JSON_DEPTH):
        if check_keys:
            for node in level:
                if isinstance(node, dict) and not all(isinstance(key, str) for key in node):
                    return "an object key is not a string"
        children = chain.from_iterable(
            node.values() if isinstance(node, dict) else node for node in level
        )
        below = [child for child in children if isinstance(child, _CONTAINERS)]
        if not below:
            return None
        level = below
    return f"nested deeper than {MAX_JSON_DEPTH} levels"


def _has_lone_surrogate(obj: object) -> bool:
    """True if a string in ``obj`` holds half of a surrogate pair (it cannot be UTF-8)."""
    try:
        json.dumps(obj, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return True
    return False


def _encode_json(obj: dict[str, Any], what: str) -> bytes:
    if not isinstance(obj, dict):
        raise UsageError(f"{what} must be a JSON object, not {type(obj).__name__}")
    problem = _json_problem(obj, check_keys=True)
    if problem is not None:
        raise UsageError(f"{what} cannot be sent: {problem}")
    try:
        text = json.dumps(
            obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        payload = text.encode()
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{what} cannot be sent: {exc}") from None
    if len(payload) > MAX_CONTROL_PAYLOAD:
        raise UsageError(
            f"{what} is {len(payload)} bytes of JSON, over the {MAX_CONTROL_PAYLOAD}-byte limit"
        )
    return payload


def _decode_json(payload: Buffer) -> dict[str, Any]:
    try:
        text = str(payload, "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError("invalid UTF-8", field="json", offset=HEADER_SIZE + exc.start) from None
    try:
        obj = _JSON_DECODER.decode(text)
    except json.JSONDecodeError as exc:
        offset = HEADER_SIZE + len(text[: exc.pos].encode())
        raise WireError(f"invalid JSON: {exc.msg}", field="json", offset=offset) from None
    except ValueError as exc:
        # From _finite_float, _no_constant, _unique_keys, or int() beyond 4300 digits.
        message = str(exc)[:120]
        raise WireError(f"invalid JSON: {message}", field="json", offset=HEADER_SIZE) from None
    except RecursionError:
        raise WireError(
            f"JSON nested deeper than {MAX_JSON_DEPTH} levels", field="json", offset=HEADER_SIZE
        ) from None
    if not isinstance(obj, dict):
        raise WireError(
            f"JSON payload must be an object, not {type(obj).__name__}",
            field="json",
            offset=HEADER_SIZE,
        )
    # Cheap tests on the text spare most frames the walks: depth can only exceed the limit
    # with that many brackets, and a lone surrogate can only come from a "\udXXX" escape.
    if text.count("[") + text.count("{") > MAX_JSON_DEPTH:
        problem = _json_problem(obj, check_keys=False)
        if problem is not None:
            raise WireError(f"invalid JSON: {problem}", field="json", offset=HEADER_SIZE)
    if _SURROGATE_ESCAPE.search(text) and _has_lone_surrogate(obj):
        raise WireError(
            "invalid JSON: lone surrogate in a string", field="json", offset=HEADER_SIZE
        )
    return obj


# -- per-type payloads ----------------------------------------------------------------------


def _encode_hello(frame: Hello) -> bytes:
    if frame.peer is not None and not _NODE_ID_HEX.fullmatch(frame.peer):
        raise UsageError(f"HELLO peer must be {2 * NODE_ID_SIZE} lowercase hex digits or None")
    body: dict[str, Any] = {"peer": frame.peer, "v": PROTOCOL_VERSION}
    if frame.nonce is not None:
        if not isinstance(frame.nonce, bytes) or len(frame.nonce) != NONCE_SIZE:
            raise UsageError(f"HELLO nonce must be {NONCE_SIZE} bytes")
        body["nonce"] = frame.nonce.hex()
    if frame.auth is not None:
        auth = frame.auth
        sizes = _AUTH_SIZES.get(auth.role)
        key_size = len(auth.key) if auth.key is not None else 0
        if sizes is None or (key_size, len(auth.proof)) != sizes:
            raise UsageError(f"HELLO auth for role {auth.role!r} has the wrong sizes")
        body["auth"] = {"role": auth.role, "proof": auth.proof.hex()}
        if auth.key is not None:
            body["auth"]["key"] = auth.key.hex()
    if frame.role is not None:
        if frame.role not in HELLO_ROLES:
            raise UsageError(f"HELLO role must be one of {', '.join(HELLO_ROLES)}")
        body["role"] = frame.role
    return _encode_json(body, "HELLO")


def _hello_hex(value: object, size: int, field: str) -> bytes:
    raw = b""
    if isinstance(value, str) and len(value) == 2 * size and value == value.lower():
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            raw = b""
    if len(raw) != size:
        raise WireError(
            f"HELLO {field} must be {2 * size} lowercase hex digits",
            field=field,
            offset=HEADER_SIZE,
        )
    return raw


def _decode_auth(value: object) -> Auth:
    role = value.get("role") if isinstance(value, dict) else None
    if not isinstance(value, dict) or not isinstance(role, str) or role not in _AUTH_SIZES:
        raise WireError(
            'HELLO auth must be {"role": "operator" or "peer", ...}',
            field="auth",
            offset=HEADER_SIZE,
        )
    key_size, proof_size = _AUTH_SIZES[role]
    key = _hello_hex(value.get("key"), key_size, "auth.key") if key_size else None
    if not key_size and "key" in value:
        raise WireError("an operator proof has no key", field="auth.key", offset=HEADER_SIZE)
    return Auth(role=role, key=key, proof=_hello_hex(value.get("proof"), proof_size, "auth.proof"))


def _decode_hello(request_id: int, payload: Buffer) -> Hello:
    # Keys other than these are ignored: later versions may add some.
    body = _decode_json(payload)
    version = body.get("v")
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise WireError(f"HELLO v must be {PROTOCOL_VERSION}", field="v", offset=HEADER_SIZE)
    if "peer" not in body:
        raise WireError("HELLO without peer", field="peer", offset=HEADER_SIZE)
    peer = body["peer"]
    if peer is not None and not (isinstance(peer, str) and _NODE_ID_HEX.fullmatch(peer)):
        raise WireError(
            f"HELLO peer must be {2 * NODE_ID_SIZE} lowercase hex digits or null",
            field="peer",
            offset=HEADER_SIZE,
        )
    nonce = _hello_hex(body["nonce"], NONCE_SIZE, "nonce") if "nonce" in body else None
    auth = _decode_auth(body["auth"]) if "auth" in body else None
    role = body.get("role")
    if role is not None and role not in HELLO_ROLES:
        raise WireError(
            f"HELLO role must be one of {', '.join(HELLO_ROLES)}", field="role", offset=HEADER_SIZE
        )
    return Hello(request_id=request_id, peer=peer, nonce=nonce, auth=auth, role=role)


def _valid_op(op: object) -> TypeGuard[str]:
    return isinstance(op, str) and 0 < len(op) <= MAX_OP_LENGTH


def _encode_call(frame: Call) -> bytes:
    if not _valid_op(frame.op):
        raise UsageError(f"operation name must be 1 to {MAX_OP_LENGTH} characters")
    if "op" in frame.args:
        raise UsageError('CALL arguments cannot be named "op"')
    return _encode_json({**frame.args, "op": frame.op}, f"CALL {frame.op}")


def _decode_call(request_id: int, payload: Buffer) -> Call:
    args = _decode_json(payload)
    op = args.pop("op", None)
    if not _valid_op(op):
        raise WireError(
            f'CALL "op" must be a string of 1 to {MAX_OP_LENGTH} characters',
            field="op",
            offset=HEADER_SIZE,
        )
    return Call(request_id=request_id, op=op, args=args)


def _encode_reply(frame: Reply) -> bytes:
    return _encode_json(frame.body, "REPLY")


def _decode_reply(request_id: int, payload: Buffer) -> Reply:
    return Reply(request_id=request_id, body=_decode_json(payload))


def _encode_error(frame: Error) -> bytes:
    if not 0 <= frame.code <= 0xFFFF:
        raise UsageError(f"error code {frame.code} does not fit in 16 bits")
    # Unencodable characters (surrogate-escaped file names) are replaced, and a long
    # message is cut at a character boundary: the frame is sent whatever the message.
    message = frame.message.encode("utf-8", "replace")
    if len(message) > MAX_ERROR_MESSAGE:
        message = message[:MAX_ERROR_MESSAGE].decode("utf-8", "ignore").encode()
    return _U16.pack(frame.code) + message


def _decode_error(request_id: int, payload: Buffer) -> Error:
    (raw_code,) = _U16.unpack_from(payload)
    code: ErrorCode | int
    try:
        code = ErrorCode(raw_code)
    except ValueError:
        code = raw_code
    try:
        message = str(payload[2:], "utf-8")
    except UnicodeDecodeError as exc:
        raise WireError(
            "invalid UTF-8 in the error message",
            field="message",
            offset=HEADER_SIZE + 2 + exc.start,
        ) from None
    return Error(request_id=request_id, code=code, message=message)


def _check_seg_id(seg_id: object) -> None:
    if not isinstance(seg_id, bytes) or len(seg_id) != SEGMENT_ID_SIZE:
        raise UsageError(f"a segment id is {SEGMENT_ID_SIZE} bytes")


def _encode_get_seg(frame: GetSeg) -> bytes:
    _check_seg_id(frame.seg_id)
    if not 0 <= frame.offset <= 0xFFFF_FFFF_FFFF_FFFF:
        raise UsageError(f"offset {frame.offset} does not fit in 64 bits")
    if not 0 <= frame.length <= 0xFFFF_FFFF:
        raise UsageError(f"length {frame.length} does not fit in 32 bits")
    return _GET_SEG.pack(frame.seg_id, frame.offset, frame.length)


def _decode_get_seg(request_id: int, payload: Buffer) -> GetSeg:
    seg_id, offset, length = _GET_SEG.unpack(payload)
    return GetSeg(request_id=request_id, seg_id=SegmentId(seg_id), offset=offset, length=length)


def _encode_ack(frame: Ack) -> bytes:
    _check_seg_id(frame.seg_id)
    return _ACK.pack(frame.seg_id, _ACK_STORED if frame.stored else 0)


def _decode_ack(request_id: int, payload: Buffer) -> Ack:
    seg_id, flags = _ACK.unpack(payload)
    if flags & ~_ACK_STORED:
        raise WireError(
            f"unknown ACK flags {flags:#04x}",
            field="ack_flags",
            offset=HEADER_SIZE + SEGMENT_ID_SIZE,
        )
    return Ack(request_id=request_id, seg_id=SegmentId(seg_id), stored=bool(flags & _ACK_STORED))


def _check_segment(data: bytes | memoryview) -> None:
    if len(data) > MAX_SEGMENT:
        raise UsageError(f"a segment is at most {MAX_SEGMENT} bytes, got {len(data)}")


def _decode_put_seg(request_id: int, payload: Buffer) -> PutSeg:
    view = memoryview(payload)
    seg_id = SegmentId(bytes(view[:SEGMENT_ID_SIZE]))
    return PutSeg(request_id=request_id, seg_id=seg_id, data=view[SEGMENT_ID_SIZE:])


def _decode_data(request_id: int, payload: Buffer) -> Data:
    data = payload if isinstance(payload, bytes | memoryview) else memoryview(payload)
    return Data(request_id=request_id, data=data)


# Each decoder gets a payload whose length is already within its type's limits.
_DECODERS: Final[dict[MsgType, Callable[[int, Buffer], Frame]]] = {
    MsgType.HELLO: _decode_hello,
    MsgType.CALL: _decode_call,
    MsgType.REPLY: _decode_reply,
    MsgType.ERROR: _decode_error,
    MsgType.PUT_SEG: _decode_put_seg,
    MsgType.GET_SEG: _decode_get_seg,
    MsgType.DATA: _decode_data,
    MsgType.ACK: _decode_ack,
}
assert set(_DECODERS) == set(MsgType)


# -- frames ---------------------------------------------------------------------------------


def encode(frame: Frame) -> list[bytes | memoryview]:
    """The frame as parts to send in order: segment bytes are a part of their own, uncopied."""
    msg_type: MsgType
    bulk: bytes | memoryview | None = None
    match frame:
        case Hello():
            msg_type, payload = MsgType.HELLO, _encode_hello(frame)
        case Call():
            msg_type, payload = MsgType.CALL, _encode_call(frame)
        case Reply():
            msg_type, payload = MsgType.REPLY, _encode_reply(frame)
        case Error():
            msg_type, payload = MsgType.ERROR, _encode_error(frame)
        case PutSeg():
            _check_seg_id(frame.seg_id)
            _check_segment(frame.data)
            msg_type, payload, bulk = MsgType.PUT_SEG, frame.seg_id, frame.data
        case GetSeg():
            msg_type, payload = MsgType.GET_SEG, _encode_get_seg(frame)
        case Data():
            _check_segment(frame.data)
            msg_type, payload, bulk = MsgType.DATA, b"", frame.data
        case Ack():
            msg_type, payload = MsgType.ACK, _encode_ack(frame)
        case _:
            raise UsageError(f"not a frame: {type(frame).__name__}")
    length = len(payload) + (len(bulk) if bulk is not None else 0)
    head = encode_header(msg_type, frame.request_id, length) + payload
    if bulk is None or len(bulk) == 0:
        return [head]
    return [head, bulk]


def encode_bytes(frame: Frame) -> bytes:
    """The whole frame as one bytes object (copies segment bytes: for small frames)."""
    return b"".join(encode(frame))


def decode_payload(header: Header, payload: Buffer) -> Frame:
    """The frame that ``payload`` (exactly ``header.length`` bytes) carries.

    PUT_SEG and DATA keep a view of ``payload`` instead of copying the segment bytes.
    """
    decoder = _DECODERS.get(header.type)
    if decoder is None:
        raise WireError(f"unknown message type {header.type}", field="type", offset=1)
    if len(payload) != header.length:
        raise WireError(
            f"payload is {len(payload)} bytes, the header says {header.length}",
            field="payload",
            offset=HEADER_SIZE + min(len(payload), header.length),
        )
    _check_length(header.type, header.length)
    return decoder(header.request_id, payload)


def truncated(in_payload: bool, received: int) -> WireError:
    """The error for a stream that ended inside a frame, after ``received`` bytes of its
    header or (``in_payload``) of its payload."""
    if in_payload:
        return WireError(
            "stream ended inside a payload", field="payload", offset=HEADER_SIZE + received
        )
    return WireError("stream ended inside a header", field="header", offset=received)


class FrameDecoder:
    """Turns a byte stream into frames, whatever the chunking (no I/O of its own).

    It holds at most one header or one payload at a time, so its buffer never exceeds the
    declared (and checked) length of the frame being received. The first bad frame breaks
    it: frames completed before the bad bytes are returned first, and the error is raised
    by the next call to :meth:`feed` or :meth:`eof`, and again by any call after that.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._header: Header | None = None
        self._error: WireError | None = None

    @property
    def broken(self) -> bool:
        """True once bad bytes were seen; the decoder then refuses all input."""
        return self._error is not None

    @property
    def buffered(self) -> int:
        """Bytes held for a frame that is not complete yet."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Frame]:
        """Add received bytes; return the frames they complete, in order."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        frames: list[Frame] = []
        view = memoryview(data)
        pos, end = 0, len(view)
        try:
            while True:
                if self._header is None:
                    pos = self._fill(view, pos, HEADER_SIZE)
                    if len(self._buf) < HEADER_SIZE:
                        break
                    self._header = parse_header(self._buf)
                    self._buf.clear()
                header = self._header
                if not self._buf and end - pos >= header.length:
                    payload = bytes(view[pos : pos + header.length])
                    pos += header.length
                else:
                    pos = self._fill(view, pos, header.length)
                    if len(self._buf) < header.length:
                        break
                    payload = bytes(self._buf)
                    self._buf.clear()
                self._header = None
                frames.append(decode_payload(header, payload))
                if pos == end:
                    break
        except WireError as exc:
            self._fail(exc)
            if not frames:
                raise
        return frames

    def eof(self) -> None:
        """The stream ended: raise WireError if it stopped inside a frame or was broken."""
        if self._error is not None:
            raise self._error.with_traceback(None)
        if self._header is None and not self._buf:
            return
        error = truncated(self._header is not None, len(self._buf))
        self._fail(error)
        raise error

    def _fill(self, view: memoryview, pos: int, size: int) -> int:
        take = min(size - len(self._buf), len(view) - pos)
        if take > 0:
            self._buf += view[pos : pos + take]
            pos += take
        return pos

    def _fail(self, exc: WireError) -> None:
        self._error = exc
        self._buf = bytearray()
        self._header = None
