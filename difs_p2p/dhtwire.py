"""The DHT's UDP datagrams: a total codec, pure (docs/PROTOCOL.md, "DHT datagrams").

The format is rpcudp's, byte for byte, so that stock ``kademlia`` peers still talk to us:
``0x00 | 20-byte message id | msgpack([name, [args]] or [name, [args], token])`` for a
request, ``0x01 | 20-byte message id | msgpack(result)`` for a reply. msgpack is written
as rpcudp's u-msgpack writes it (bytes as bin, str as str).

Every decoder here takes what a peer sent and either returns a typed value or raises
:class:`~difs_p2p.errors.WireError` naming the field; nothing else escapes (msgpack's
own errors are translated). Some malformed *parts* are not errors, because peers have
always answered them rather than dropped them: a ``store`` with a value that is not
bytes is refused (``StoreArgs.value`` is None), entries that are not bytes are skipped,
an ``identify`` with a bad nonce is answered ``false``. Those rules are the decoders'
too, so the handler only decides.
"""

from __future__ import annotations

from typing import Final

import msgpack

from difs_p2p.addresses import MAX_ZONE, check_zone, normalize_host
from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError, WireError
from difs_p2p.identity import NodeId
from difs_p2p.routing import Contact, is_id, valid_address

REQUEST: Final = b"\x00"
REPLY: Final = b"\x01"
MSG_ID_SIZE: Final = 20
# The shortest datagram: kind, message id, one byte of msgpack.
MIN_DATAGRAM: Final = 1 + MSG_ID_SIZE + 1
# rpcudp refuses outgoing requests over 8,192 bytes of msgpack; so do we.
MAX_REQUEST_BODY: Final = 8192
# A record must fit in one request.
MAX_VALUE_SIZE: Final = 8000
# Entries per add_entries request and per find_entries reply page, under the same cap.
ENTRY_BATCH_BYTES: Final = 7000
NONCE_SIZE: Final = 16
# Padding of an identify request, so that the reply (key, signature, token: 140 bytes)
# is no larger than the request (147 bytes) even to a source that has not proved its
# address. A request may carry at most MAX_PAD bytes of padding.
IDENTIFY_PAD: Final = 80
MAX_PAD: Final = 256
# A request that asks for the signed info block (TCP port, zone) starts its padding with
# this marker (older peers ignore padding's content, and answer without the block); the
# padding is longer, so that the reply with the block still fits.
INFO_MARKER: Final = b"difs-info-v1"
INFO_PAD: Final = 128
# The info block: version 1, TCP port (u16), zone length (u8), zone (<= 32 bytes).
INFO_VERSION: Final = 1
TOKEN_SIZE: Final = 16
# Bytes of the entry-set digest in a find_entries reply.
ENTRY_DIGEST_SIZE: Final = 16

RPCS: Final = frozenset(
    {
        "ping",
        "store",
        "find_node",
        "find_value",
        "stun",
        "add_entries",
        "find_entries",
        "leave",
        "identify",
    }
)
WRITES: Final = frozenset({"store", "add_entries"})
LOOKUP_RPCS: Final = frozenset({"find_node", "find_value", "find_entries"})


def pack(obj: object) -> bytes:
    """msgpack as rpcudp writes it (u-msgpack: bytes as bin, str as str), byte for byte,
    with the C implementation (about 20x faster; pack and unpack were ~15% of a
    peer's CPU)."""
    data: bytes = msgpack.packb(obj, use_bin_type=True)
    return data


def unpack(data: bytes, field: str = "body", offset: int = 0) -> object:
    """Decode one msgpack value (str as str, bin as bytes); malformed input or trailing
    bytes raise ``WireError``. Lengths are bounded by ``data``."""
    try:
        return msgpack.unpackb(data, raw=False)
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError) as exc:
        # msgpack's errors (ExtraData, FormatError, StackError, UnpackValueError and
        # unhashable map keys) derive from these
        raise WireError(f"not msgpack: {type(exc).__name__}", field=field, offset=offset) from exc


# -- the envelope ----------------------------------------------------------------------------


@valueclass
class Request:
    """A request: its message id, RPC name, arguments (checked per RPC by
    :func:`decode_args`) and the token the sender holds for our address (None if it
    sent none, or one that cannot be a token)."""

    msg_id: bytes
    name: str
    args: list[object]
    token: bytes | None = None


@valueclass
class Reply:
    """A reply: the message id it answers and its body (checked by the caller, which
    knows what it asked)."""

    msg_id: bytes
    body: object


def encode_request(msg_id: bytes, name: str, args: list[object], token: bytes | None) -> bytes:
    """A request datagram; ``ValueError`` if its body exceeds ``MAX_REQUEST_BODY``."""
    body = pack([name, args] if token is None else [name, args, token])
    if len(body) > MAX_REQUEST_BODY:
        raise ValueError(f"request body of {len(body)} bytes exceeds {MAX_REQUEST_BODY}")
    return REQUEST + msg_id + body


def encode_reply(msg_id: bytes, result: object) -> bytes:
    return REPLY + msg_id + pack(result)


def decode_datagram(data: bytes, max_size: int = 65_507) -> Request | Reply:
    """A datagram's envelope; ``WireError`` if its size, kind, body or request shape is
    not one of the above."""
    if len(data) < MIN_DATAGRAM or len(data) > max_size:
        raise WireError(f"datagram of {len(data)} bytes", field="datagram")
    kind, msg_id = data[:1], bytes(data[1 : 1 + MSG_ID_SIZE])
    body = unpack(bytes(data[1 + MSG_ID_SIZE :]), offset=1 + MSG_ID_SIZE)
    if kind == REPLY:
        return Reply(msg_id, body)
    if kind != REQUEST:
        raise WireError(f"unknown datagram kind {data[0]}", field="kind", offset=0)
    if not (isinstance(body, list) and len(body) in (2, 3)):
        raise WireError("request is not [name, args] or [name, args, token]", field="request")
    name, args = body[0], body[1]
    if not (isinstance(name, str) and name in RPCS):
        raise WireError(f"unknown request {name!r}", field="name")
    if not isinstance(args, list):
        raise WireError("arguments are not a list", field="args")
    token = body[2] if len(body) == 3 else None
    if not (isinstance(token, bytes) and len(token) == TOKEN_SIZE):
        token = None
    return Request(msg_id, name, args, token)


# -- request arguments -----------------------------------------------------------------------


@valueclass
class PingArgs:
    sender: bytes


@valueclass
class StunArgs:
    """``stun`` takes no arguments (any are ignored)."""


@valueclass
class LeaveArgs:
    """``leave``: the sender's id, or None if it sent none (then nothing happens)."""

    sender: bytes | None


@valueclass
class IdentifyArgs:
    """``identify``: the challenge nonce, None if the challenge is malformed (answered
    ``false``), and whether it was padded (newer peers: the reply carries a token)."""

    sender: bytes
    nonce: bytes | None
    padded: bool = False
    # the padding asks for the signed info block (INFO_MARKER)
    info: bool = False


@valueclass
class FindArgs:
    """``find_node`` and ``find_value``."""

    sender: bytes
    key: bytes


@valueclass
class FindEntriesArgs:
    """``find_entries``: one page from ``offset`` (not an integer: 0), with the record
    if ``with_value`` (the fourth argument is ``true``)."""

    sender: bytes
    key: bytes
    offset: int = 0
    with_value: bool = False


@valueclass
class StoreArgs:
    """``store``: ``value`` None if the request is malformed (refused); ``entries``
    None if the request had none (the reply is then a bare bool)."""

    sender: bytes
    key: bytes
    value: bytes | None
    entries: tuple[bytes, ...] | None = None


@valueclass
class AddEntriesArgs:
    sender: bytes
    key: bytes
    entries: tuple[bytes, ...]


RequestArgs = (
    PingArgs
    | StunArgs
    | LeaveArgs
    | IdentifyArgs
    | FindArgs
    | FindEntriesArgs
    | StoreArgs
    | AddEntriesArgs
)


def _entries(items: object) -> tuple[bytes, ...]:
    """The entries of a request: not a list is none; items that are not bytes of at most
    ``MAX_VALUE_SIZE`` are skipped."""
    if not isinstance(items, list):
        return ()
    return tuple(e for e in items if isinstance(e, bytes) and len(e) <= MAX_VALUE_SIZE)


def decode_args(name: str, args: list[object]) -> RequestArgs:
    """The typed arguments of request ``name`` (``args`` as in :class:`Request`)."""
    if name == "stun":
        return StunArgs()
    if name == "leave":
        return LeaveArgs(bytes(args[0]) if args and is_id(args[0]) else None)
    if not args or not is_id(args[0]):
        raise WireError("sender id is not 20 bytes", field=f"{name}.sender")
    sender = bytes(args[0])
    rest = args[1:]
    if name == "ping":
        return PingArgs(sender)
    if name == "identify":
        nonce, padded, info = None, len(rest) == 2, False
        if len(rest) in (1, 2) and isinstance(rest[0], bytes) and len(rest[0]) == NONCE_SIZE:
            pad = rest[1] if padded else b""
            if isinstance(pad, bytes) and len(pad) <= MAX_PAD:
                nonce = bytes(rest[0])
                info = pad.startswith(INFO_MARKER)
        return IdentifyArgs(sender, nonce, padded, info)
    if not rest or not is_id(rest[0]):
        raise WireError("key is not 20 bytes", field=f"{name}.key")
    key = bytes(rest[0])
    if name in ("find_node", "find_value"):
        return FindArgs(sender, key)
    if name == "find_entries":
        offset = rest[1] if len(rest) > 1 and isinstance(rest[1], int) else 0
        return FindEntriesArgs(sender, key, int(offset), len(rest) > 2 and rest[2] is True)
    if name == "store":
        value = rest[1] if len(rest) in (2, 3) else None
        if not (isinstance(value, bytes) and len(value) <= MAX_VALUE_SIZE):
            return StoreArgs(sender, key, None)
        return StoreArgs(sender, key, value, _entries(rest[2]) if len(rest) == 3 else None)
    # add_entries
    return AddEntriesArgs(sender, key, _entries(rest[1]) if len(rest) == 2 else ())


def encode_args(args: RequestArgs) -> list[object]:
    """The argument list of a request (the inverse of :func:`decode_args` on well-formed
    requests)."""
    match args:
        case StunArgs():
            return []
        case LeaveArgs(sender):
            return [] if sender is None else [sender]
        case PingArgs(sender):
            return [sender]
        case IdentifyArgs(sender, nonce, padded, info):
            out: list[object] = [sender, nonce]
            if info:
                return [*out, INFO_MARKER.ljust(INFO_PAD, b"\x00")]
            return [*out, bytes(IDENTIFY_PAD)] if padded else out
        case FindArgs(sender, key):
            return [sender, key]
        case FindEntriesArgs(sender, key, offset, with_value):
            return [sender, key, offset, True] if with_value else [sender, key, offset]
        case StoreArgs(sender, key, value, entries):
            return [sender, key, value] + ([list(entries)] if entries is not None else [])
        case AddEntriesArgs(sender, key, entries):
            return [sender, key, list(entries)]
    raise TypeError(f"not request arguments: {args!r}")


# -- replies -----------------------------------------------------------------------------------


def encode_contacts(contacts: list[Contact]) -> list[list[object]]:
    return [[c.node_id, c.host, c.port] for c in contacts]


def decode_contacts(body: object, limit: int, field: str = "nodes") -> list[Contact]:
    """The contacts of a find_* reply: at most ``limit`` ``[id, ip, port]``, each a
    20-byte id and an IPv4 or IPv6 address (text, never a name) a datagram may go to
    (``valid_address``); an IPv4-mapped IPv6 address becomes the plain IPv4 text."""
    if not isinstance(body, list):
        raise WireError("contacts are not a list", field=field)
    if len(body) > limit:
        raise WireError(f"{len(body)} contacts, more than {limit}", field=field)
    out = []
    for i, item in enumerate(body):
        if not (isinstance(item, list) and len(item) == 3):
            raise WireError("contact is not [id, ip, port]", field=f"{field}[{i}]")
        nid, ip, port = item
        if not (is_id(nid) and valid_address((ip, port))):
            raise WireError("contact id or address is not valid", field=f"{field}[{i}]")
        if ":" in ip:
            ip = normalize_host(ip)
        out.append(Contact(NodeId(bytes(nid)), ip, port))
    return out


@valueclass
class ValueReply:
    """A find_value reply that holds the record."""

    value: bytes


def decode_find_value(body: object, limit: int) -> ValueReply | list[Contact]:
    """``{"value": bytes}`` or a contact list."""
    if isinstance(body, dict):
        value = body.get("value")
        if len(body) != 1 or not isinstance(value, bytes):
            raise WireError("not {value: bytes}", field="find_value.value")
        return ValueReply(value)
    return decode_contacts(body, limit)


def value_of(body: object) -> bytes | None:
    """The record in a find_value reply read for the record alone (a read-back, or a
    peer asked after a lookup): a map whose ``"value"`` is bytes; anything else, a
    contact list included, holds none."""
    value = body.get("value") if isinstance(body, dict) else None
    return value if isinstance(value, bytes) else None


@valueclass
class EntriesReply:
    """A find_entries reply: one page, where the next starts (-1: none), closer
    contacts, the entry-set digest (first page of several; None when absent or not 16
    bytes), and the record if asked: ``has_value`` False when the peer did not say
    (it predates the flag), else ``value`` (None: it holds none)."""

    entries: list[bytes]
    next: int
    nodes: list[Contact]
    digest: bytes | None = None
    has_value: bool = False
    value: bytes | None = None

    def encode(self) -> dict[str, object]:
        reply: dict[str, object] = {
            "entries": self.entries,
            "next": self.next,
            "nodes": encode_contacts(self.nodes),
        }
        if self.digest is not None:
            reply["digest"] = self.digest
        if self.has_value:
            reply["value"] = self.value
        return reply


def decode_find_entries(body: object, limit: int) -> EntriesReply:
    """A find_entries reply; entries that are not bytes and a ``next`` that is not an
    integer are ignored (as peers always have), a bad contact list or record is not."""
    if not isinstance(body, dict):
        raise WireError("find_entries reply is not a map", field="find_entries")
    entries = body.get("entries")
    if not isinstance(entries, list):
        raise WireError("entries are not a list", field="find_entries.entries")
    nodes = decode_contacts(body.get("nodes"), limit, "find_entries.nodes")
    has_value = "value" in body
    value = body.get("value")
    if value is not None and not isinstance(value, bytes):
        raise WireError("value is not bytes or nil", field="find_entries.value")
    nxt = body.get("next")
    digest = body.get("digest")
    if not (isinstance(digest, bytes) and len(digest) == ENTRY_DIGEST_SIZE):
        digest = None  # a peer that predates the digest, or a malformed one
    return EntriesReply(
        [e for e in entries if isinstance(e, bytes)],
        nxt if isinstance(nxt, int) else -1,
        nodes,
        digest,
        has_value,
        value if isinstance(value, bytes) else None,
    )


def decode_page(body: object) -> tuple[list[bytes], int]:
    """A further page of a find_entries reply, read for its entries alone: (entries that
    are bytes, where the next page starts or -1)."""
    if not isinstance(body, dict):
        raise WireError("find_entries reply is not a map", field="find_entries")
    entries, nxt = body.get("entries"), body.get("next")
    page = [e for e in entries if isinstance(e, bytes)] if isinstance(entries, list) else []
    return page, nxt if isinstance(nxt, int) else -1


def decode_lookup_reply(
    rpc: str, body: object, limit: int
) -> list[Contact] | ValueReply | EntriesReply:
    """The reply to a lookup request ``rpc`` (find_node, find_value, find_entries)."""
    if rpc == "find_node":
        return decode_contacts(body, limit)
    if rpc == "find_value":
        return decode_find_value(body, limit)
    if rpc == "find_entries":
        return decode_find_entries(body, limit)
    raise ValueError(f"not a lookup request: {rpc!r}")


@valueclass
class PeerInfo:
    """What a peer says about itself in its identify reply, under its signature: the
    TCP port of its segment service and its zone label ("" when none)."""

    tcp_port: int
    zone: str = ""

    def encode(self) -> bytes:
        zone = self.zone.encode("ascii")
        return bytes([INFO_VERSION]) + self.tcp_port.to_bytes(2, "big") + bytes([len(zone)]) + zone


def decode_info(raw: object) -> PeerInfo:
    """The info block of an identify reply (``WireError`` unless exactly well formed)."""
    if not isinstance(raw, bytes) or not 4 <= len(raw) <= 4 + MAX_ZONE:
        raise WireError("info block is not 4-36 bytes", field="identify.info")
    if raw[0] != INFO_VERSION:
        raise WireError(f"info block version {raw[0]}", field="identify.info", offset=0)
    port, size = int.from_bytes(raw[1:3], "big"), raw[3]
    if port == 0 or len(raw) != 4 + size:
        raise WireError("info block port 0 or zone length wrong", field="identify.info", offset=1)
    try:
        zone = check_zone(raw[4:].decode("ascii"))
    except (UnicodeDecodeError, UsageError):
        raise WireError("zone label is not valid", field="identify.info", offset=4) from None
    return PeerInfo(port, zone)


@valueclass
class IdentifyReply:
    """An identify proof: public key, signature, the token for our address (None if
    the peer sent none or one that is not 16 bytes), and the info block when asked for
    (its bytes, covered by the signature; None from a peer that sent none)."""

    public_key: bytes
    signature: bytes
    token: bytes | None = None
    info: bytes | None = None

    def encode(self) -> list[object]:
        out: list[object] = [self.public_key, self.signature]
        if self.info is not None:
            return [*out, self.token, self.info]
        return out if self.token is None else [*out, self.token]


def decode_identify(body: object) -> IdentifyReply:
    """``[key, signature]``, ``[key, signature, token]`` (older peers) or ``[key,
    signature, token or nil, info bytes]``."""
    if not (isinstance(body, list) and len(body) in (2, 3, 4)):
        raise WireError("identify reply is not [key, signature(, token(, info))]", field="identify")
    public_key, signature = body[0], body[1]
    if not (isinstance(public_key, bytes) and isinstance(signature, bytes)):
        raise WireError("key or signature is not bytes", field="identify.proof")
    token = body[2] if len(body) >= 3 else None
    if not (isinstance(token, bytes) and len(token) == TOKEN_SIZE):
        token = None
    info = body[3] if len(body) == 4 else None
    if info is not None and not (isinstance(info, bytes) and len(info) <= 4 + MAX_ZONE):
        raise WireError("info block is not bytes of at most 36", field="identify.info")
    return IdentifyReply(public_key, signature, token, info)


def token_reply(body: object) -> bytes | None:
    """The token of a reply that is only ``{"token": 16 bytes}`` (what a source that
    has not proved its address gets instead of a larger reply), else None."""
    if isinstance(body, dict) and len(body) == 1:
        token = body.get("token")
        if isinstance(token, bytes) and len(token) == TOKEN_SIZE:
            return token
    return None


@valueclass
class StoreReply:
    """A store reply: whether the record was taken, and the entries accepted (None: the
    request had no entries, the reply is a bare bool)."""

    stored: bool
    entries: int | None = None

    def encode(self) -> object:
        return self.stored if self.entries is None else [self.stored, self.entries]


def decode_store(body: object) -> StoreReply:
    if isinstance(body, bool):
        return StoreReply(body)
    if isinstance(body, list) and len(body) == 2:
        added = body[1]
        return StoreReply(body[0] is True, int(added) if isinstance(added, int) else 0)
    raise WireError("store reply is not a bool or [bool, count]", field="store")


def decode_count(body: object) -> int:
    """An add_entries reply: the entries accepted (anything else counts as none)."""
    return int(body) if isinstance(body, int) and body > 0 else 0
