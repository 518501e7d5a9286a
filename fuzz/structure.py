"""Structured inputs from fuzzer bytes: a byte source, valid samples and their mutations.

A target that wants well-formed input reads its choices from a :class:`ByteSource` over the
fuzzer's bytes, so that the fuzzer's coverage feedback steers the choices as it steers raw
bytes. Once the bytes run out every choice is 0, so any input gives some value.

Nothing here imports atheris: the same code runs under the fuzzer and under pytest.
"""

from __future__ import annotations

import functools
import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import umsgpack

from difs_p2p import dhtwire
from difs_p2p.holders import HOLDER_DOMAIN, build_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.manifest import MANIFEST_DOMAIN, build_manifest
from difs_p2p.records import canonical_json
from difs_p2p.segments import IntegrityRoot, SegmentId

T = TypeVar("T")

# The DHT's request names (sorted: a fuzz input picks the same one in every run), plus
# one it does not know.
RPC_NAMES: Final = (*sorted(dhtwire.RPCS), "bogus")
# Integers at the edges of the fields and limits that peers' numbers meet.
INTERESTING_INTS: Final = (
    0,
    1,
    -1,
    2,
    3,
    19,
    20,
    21,
    32,
    255,
    256,
    4096,
    7000,
    8000,
    65535,
    65536,
    2**31 - 1,
    2**32 - 1,
    2**32,
    2**63 - 1,
    2**64 - 1,
    -(2**63),
)
# JSON value texts, valid or not, for the fields of a manifest.
JSON_TOKENS: Final = (
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "-0.0",
    "0",
    "-1",
    "1",
    "2",
    "10",
    "4096",
    "1.5",
    "1e308",
    "9" * 400,
    str(2**63),
    str(2**64),
    "true",
    "false",
    "null",
    '""',
    "[]",
    "{}",
    '"blake3"',
    '"/a/b"',
    '"/a/b/"',
    '"/key/"',
    '"\\ud800"',
    '"' + "0" * 64 + '"',
    '"' + "f" * 64 + '"',
    '"' + "0" * 40 + '"',
    '"difs-manifest"',
)
MANIFEST_FIELDS: Final = (
    ("info", "name"),
    ("info", "key"),
    ("info", "version"),
    ("info", "parent"),
    ("info", "root"),
    ("info", "size"),
    ("info", "segment_size"),
    ("info", "segment_count"),
    ("info", "stripes"),
    ("info", "replicas"),
    ("info", "integrity"),
    ("info", "hash"),
    ("info", "deleted"),
    ("info", "created"),
    ("info",),
    ("publisher",),
    ("sig",),
    ("t",),
    ("v",),
)
# Offset and struct format of each field of a holder entry (see difs_p2p.manifest).
HOLDER_FIELDS: Final = (
    (0, "!B"),
    (1, "!20s"),
    (21, "!Q"),
    (29, "!32s"),
    (61, "!I"),
    (65, "!I"),
    (69, "!4s"),
    (73, "!H"),
    (75, "!Q"),
    (83, "!32s"),
)
HOLDER_BODY_SIZE: Final = 115
_PLACEHOLDER: Final = "@@fuzz-value@@"


class ByteSource:
    """Reads choices from the fuzzer's bytes; once they run out, every choice is 0."""

    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int) -> bytes:
        chunk = self._data[self._pos : self._pos + max(0, n)]
        self._pos += len(chunk)
        return chunk

    def exact(self, n: int) -> bytes:
        """``n`` bytes, padded with zeros when the input runs out."""
        return self.take(n).ljust(n, b"\x00")

    def uint(self, nbytes: int) -> int:
        return int.from_bytes(self.take(nbytes), "big")

    def below(self, n: int) -> int:
        """A number in ``0..n-1`` (0 when ``n`` is at most 1)."""
        if n <= 1:
            return 0
        nbytes = 1 if n <= 0x100 else 2 if n <= 0x10000 else 4
        return self.uint(nbytes) % n

    def flag(self) -> bool:
        return self.uint(1) & 1 == 1

    def choice(self, options: Sequence[T]) -> T:
        return options[self.below(len(options))]

    def length(self, limit: int) -> int:
        """A length in ``0..limit``, short ones far more likely."""
        if self.below(8) < 7:
            return min(self.below(33), limit)
        return self.below(limit + 1)

    def rest(self) -> bytes:
        return self.take(self.remaining)


@dataclass(frozen=True, slots=True)
class Samples:
    """Valid signed records, made once: the starting points of mutations."""

    identity: Identity
    manifests: tuple[bytes, ...]
    manifest_key: bytes
    holder: bytes
    holder_key: bytes


@functools.cache
def samples() -> Samples:
    identity = Identity.from_seed(bytes(32))
    common: dict[str, Any] = {
        "size": 10,
        "segment_size": 4096,
        "segment_count": 1,
        "stripes": 1,
        "replicas": 3,
        "integrity": bytes(32),
        "created": 0.0,
    }
    first = build_manifest(identity, name="/a/b", version=1, parent=None, root=None, **common)
    second = build_manifest(
        identity, name="/a/b", version=2, parent=first.hash, root=first.hash, **common
    )
    tombstone = build_manifest(
        identity,
        name="/a/b",
        version=3,
        parent=second.hash,
        root=first.hash,
        deleted=True,
        **{**common, "size": 0, "segment_count": 0},
    )
    owned = build_manifest(
        identity,
        name=f"/key/{identity.fingerprint}/c",
        version=1,
        parent=None,
        root=None,
        **common,
    )
    # for version 1 of /a/b: peers admit holder entries only for a version its owner signed
    holder = build_holder_entry(
        identity,
        key=first.key,
        version=1,
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        start=0,
        end=3,
        host="127.0.0.1",
        port=4000,
        issued=1,
    )
    return Samples(
        identity=identity,
        manifests=(first.raw, second.raw, tombstone.raw, owned.raw),
        manifest_key=first.key,
        holder=holder.raw,
        holder_key=first.key,
    )


# -- manifests ------------------------------------------------------------------------------


def resign_manifest(text: bytes, identity: Identity) -> bytes:
    """``text`` with its signature replaced by ``identity``'s, when it can be signed.

    The signature covers the canonical form of the parsed object, so a manifest with any
    field values (huge numbers, odd names) becomes one that passes the signature check.
    """
    try:
        obj = json.loads(text)
        if not isinstance(obj, dict):
            return text
        unsigned = {k: v for k, v in obj.items() if k != "sig"}
        obj["sig"] = identity.sign(MANIFEST_DOMAIN + canonical_json(unsigned)).hex()
        return json.dumps(obj, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except (ValueError, TypeError, RecursionError, UnicodeError):
        return text


def _json_token(src: ByteSource) -> str:
    kind = src.below(4)
    if kind == 0:
        return str(src.choice(INTERESTING_INTS) + src.below(3) - 1)
    if kind == 1:
        return json.dumps(src.take(src.length(64)).hex())
    if kind == 2:
        return json.dumps(src.take(src.length(300)).decode("utf-8", "replace"))
    return src.choice(JSON_TOKENS)


def _substitute(text: bytes, src: ByteSource) -> bytes:
    """``text`` with one manifest field replaced by a JSON token (valid JSON or not)."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return text
    path = src.choice(MANIFEST_FIELDS)
    node = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or not isinstance(node.get(part), dict):
            return text
        node = node[part]
    if not isinstance(node, dict):
        return text
    if src.below(8) == 0:
        node.pop(path[-1], None)
    else:
        node[path[-1]] = _PLACEHOLDER
    try:
        out = json.dumps(obj, sort_keys=src.flag(), separators=(",", ":"), ensure_ascii=False)
    except (ValueError, TypeError, RecursionError):
        return text
    token = _json_token(src)
    return out.replace(json.dumps(_PLACEHOLDER), token, 1).encode("utf-8", "surrogatepass")


def _byte_mutation(data: bytes, src: ByteSource) -> bytes:
    """One byte-level change: flip, overwrite, insert, delete, truncate or duplicate."""
    op = src.below(6)
    pos = src.below(len(data) + 1)
    if op == 0 and data:
        pos %= len(data)
        return data[:pos] + bytes([data[pos] ^ (1 << src.below(8))]) + data[pos + 1 :]
    if op == 1:
        chunk = src.take(src.length(16))
        return data[:pos] + chunk + data[pos + len(chunk) :]
    if op == 2:
        return data[:pos] + src.take(src.length(64)) + data[pos:]
    if op == 3:
        return data[:pos] + data[pos + 1 + src.length(64) :]
    if op == 4:
        return data[:pos]
    end = pos + src.length(len(data))
    return data[:end] + data[pos:end] + data[end:]


def mutate_manifest(src: ByteSource) -> bytes:
    """A valid sample manifest after a few field substitutions, re-signings and byte edits."""
    sample = samples()
    text = src.choice(sample.manifests)
    for _ in range(1 + src.below(3)):
        op = src.below(8)
        if op < 4:
            text = _substitute(text, src)
        elif op < 6:
            text = resign_manifest(_substitute(text, src), sample.identity)
        elif op == 6:
            text = resign_manifest(text, sample.identity)
        else:
            text = _byte_mutation(text, src)
    return text


# -- holder entries -------------------------------------------------------------------------


def _holder_value(src: ByteSource, fmt: str) -> bytes:
    size = struct.calcsize(fmt)
    if fmt.endswith("s"):
        return src.exact(size)
    limit = 1 << (8 * size)
    value = (src.choice(INTERESTING_INTS) + src.below(3) - 1) % limit
    if src.flag():
        value = src.uint(size)
    return value.to_bytes(size, "big")


def mutate_holder(src: ByteSource) -> bytes:
    """The valid sample holder entry after a few field changes, re-signings and byte edits."""
    sample = samples()
    data = sample.holder
    for _ in range(1 + src.below(3)):
        op = src.below(8)
        if op < 4:
            offset, fmt = src.choice(HOLDER_FIELDS)
            value = _holder_value(src, fmt)
            data = data[:offset] + value + data[offset + len(value) :]
        elif op < 6 and len(data) >= HOLDER_BODY_SIZE:
            body = data[:HOLDER_BODY_SIZE]
            data = body + sample.identity.sign(HOLDER_DOMAIN + body)
        else:
            data = _byte_mutation(data, src)
    return data


# -- DHT messages ---------------------------------------------------------------------------


def _node_id(src: ByteSource, known: Sequence[bytes]) -> object:
    kind = src.below(10)
    if kind < 5:
        return src.exact(20)
    if kind == 5 and known:
        return src.choice(known)
    if kind == 6:
        return bytes(20)
    if kind == 7:
        return src.exact(src.choice((0, 19, 21, 32)))
    if kind == 8:
        return src.exact(20).hex()
    return src.choice(INTERESTING_INTS)


def _record(src: ByteSource) -> bytes:
    """Bytes for a record or an entry: valid, mutated, or random."""
    sample = samples()
    kind = src.below(6)
    if kind == 0:
        return src.choice(sample.manifests)
    if kind == 1:
        return mutate_manifest(src)
    if kind == 2:
        return sample.holder
    if kind == 3:
        return mutate_holder(src)
    if kind == 4:
        return src.take(src.length(9000))
    return bytes(src.choice((8000, 8001, 9000)))


def _contact(src: ByteSource, known: Sequence[bytes]) -> object:
    if src.below(8) == 0:
        return msgpack_value(src, known, 2)
    host = src.choice(
        ("127.0.0.1", "10.0.0.1", "::1", "", "x" * 64, "x" * 65, "host.invalid", b"\x7f\0\0\1")
    )
    port = src.choice((1, 4000, 9999, 65535, 0, 65536, -1, "80"))
    return [_node_id(src, known), host, port]


def msgpack_value(src: ByteSource, known: Sequence[bytes], depth: int = 0) -> object:
    """Any value umsgpack can pack, with shapes the DHT expects more likely than others."""
    kind = src.below(12 if depth < 4 else 7)
    if kind == 0:
        return _node_id(src, known)
    if kind == 1:
        return src.take(src.length(300))
    if kind == 2:
        return src.choice(INTERESTING_INTS)
    if kind == 3:
        return src.take(src.length(40)).decode("utf-8", "replace")
    if kind == 4:
        return src.choice((None, True, False, 0.5, -0.0, float("inf"), float("nan")))
    if kind == 5:
        return _record(src)
    if kind == 6:
        return src.uint(8) - (1 << 63)
    if kind == 7:
        return [msgpack_value(src, known, depth + 1) for _ in range(src.length(40))]
    if kind == 8:
        keys: list[object] = ["value", "entries", "next", "nodes", "", 0, b"k"]
        return {
            src.choice(keys): msgpack_value(src, known, depth + 1) for _ in range(src.length(6))
        }
    if kind == 9:
        return [_contact(src, known) for _ in range(src.length(45))]
    if kind == 10:
        return [_record(src) for _ in range(src.length(20))]
    # Deep nesting, kept within what umsgpack can pack without hitting the recursion limit.
    value: object = msgpack_value(src, known, 4)
    for _ in range(src.length(100)):
        value = [value]
    return value


def dht_request(src: ByteSource, known: Sequence[bytes], keys: Sequence[bytes]) -> bytes:
    """A request datagram: ``b"\\x00"`` + message id + msgpack ``[name, args]``."""
    name = src.choice(RPC_NAMES)
    msg_id = src.exact(20)
    args: list[object] = []
    shape = src.below(8)
    if shape == 0:
        args = [msgpack_value(src, known) for _ in range(src.length(4))]
    else:
        args.append(_node_id(src, known))
        if shape > 1 and name == "identify":
            args.append(src.exact(src.choice((16, 16, 16, 0, 15, 17))))
        elif shape > 1:
            key = src.choice(keys) if src.below(4) else _node_id(src, known)
            args.append(key)
            if name == "store":
                args.append(_record(src))
            elif name == "add_entries":
                args.append([_record(src) for _ in range(src.length(40))])
            elif name == "find_entries":
                args.append(src.choice((0, 1, -1, 2, 600, 2**63 - 1, -(2**63), "0", None)))
        for _ in range(src.below(4) // 3):
            args.append(msgpack_value(src, known))
    body: object = [name, args]
    if src.below(16) == 0:
        body = [name, msgpack_value(src, known)]
    packed: bytes = umsgpack.packb(body)
    return b"\x00" + msg_id + packed


def dht_reply_body(src: ByteSource, known: Sequence[bytes], keys: Sequence[bytes]) -> object:
    """A reply: contacts, a value, an entry page, a node id, an identity proof, or anything."""
    shape = src.below(7)
    if shape == 6:
        public_key = samples().identity.public_key if src.flag() else src.exact(32)
        return [public_key, src.exact(src.choice((64, 64, 63, 0)))][: 1 + src.below(3)]
    if shape == 0:
        return [_contact(src, known) for _ in range(src.length(45))]
    if shape == 1:
        reply: dict[object, object] = {"value": _record(src)}
        if src.below(4) == 0:
            reply[src.choice(("entries", "x", 1))] = msgpack_value(src, known)
        return reply
    if shape == 2:
        return {
            "entries": [_record(src) for _ in range(src.length(20))],
            "next": src.choice((-1, 0, 1, 5, 2**63 - 1, "1", None)),
            "nodes": [_contact(src, known) for _ in range(src.length(45))],
        }
    if shape == 3:
        return src.choice(keys)
    return msgpack_value(src, known)
