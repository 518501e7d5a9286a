"""What the signed records share: their two encodings and the one rule that tells them
apart, the canonical JSON of the JSON records, and the record hash (docs/PROTOCOL.md,
"Records").

A value the DHT stores under a name key (the record, or a member of the entry set) is one
of two kinds, told apart by its first byte and by nothing else:

* a **manifest** (manifest.py; a delegation certificate travels inside one,
  delegation.py): canonical JSON of an object, so its first byte is ``{`` (0x7B);
* a **holder entry** (holders.py): binary, its first byte the kind byte 1;
* a **child entry** (listing.py, a folder listing's entry): binary, the kind byte 2.

Any other value (empty, another first byte) is neither: :func:`record_kind` raises
WireError. The kind only says which decoder to use; that decoder checks all the rest.
Pure.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable
from typing import Any, NamedTuple

import blake3

from difs_p2p.errors import WireError


class RecordKind(enum.Enum):
    """The encodings of a signed record."""

    MANIFEST = "manifest"  # canonical JSON, starts with "{"
    HOLDER = "holder"  # binary, starts with HOLDER_KIND
    CHILD = "child"  # binary, starts with CHILD_KIND


# The first byte of a manifest: the "{" of its canonical JSON object.
MANIFEST_START = b"{"
# The first byte of a holder entry (its struct's kind field, offset 0).
HOLDER_KIND = 1
# The first byte of a child entry (listing.py).
CHILD_KIND = 2
_KINDS = {
    MANIFEST_START[0]: RecordKind.MANIFEST,
    HOLDER_KIND: RecordKind.HOLDER,
    CHILD_KIND: RecordKind.CHILD,
}


def record_kind(raw: bytes) -> RecordKind:
    """The kind of a record or entry, from its first byte (WireError: neither kind)."""
    if not raw:
        raise WireError("empty record", field="kind", offset=0)
    kind = _KINDS.get(raw[0])
    if kind is None:
        raise WireError(f"unknown record kind 0x{raw[0]:02x}", field="kind", offset=0)
    return kind


class Entries(NamedTuple):
    """An entry set split by kind, each in its original order, not decoded."""

    history: list[bytes]  # manifests: the name's version history
    holders: list[bytes]  # holder entries


def split_entries(raws: Iterable[bytes]) -> Entries:
    """Split an entry set into history manifests and holder entries, by kind only (the
    caller still decodes and verifies what it uses). Values of other kinds (child
    entries, see :func:`child_entries`) are dropped."""
    history: list[bytes] = []
    holders: list[bytes] = []
    for raw in raws:
        kind = _KINDS.get(raw[0]) if raw else None
        if kind is RecordKind.MANIFEST:
            history.append(raw)
        elif kind is RecordKind.HOLDER:
            holders.append(raw)
    return Entries(history, holders)


def child_entries(raws: Iterable[bytes]) -> list[bytes]:
    """The child entries (kind CHILD_KIND) of an entry set, in order, not decoded."""
    return [raw for raw in raws if raw[:1] == bytes([CHILD_KIND])]


def record_hash(record: bytes) -> str:
    """The hash that names a signed record (parent/root links): BLAKE3, hex."""
    return blake3.blake3(record).hexdigest()


def canonical_json(obj: Any) -> bytes:
    """The one encoding of a JSON record: sorted keys, no spaces, UTF-8, no NaN."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


# Times in JSON records are unix seconds; anything beyond the year 33658 is malformed.
MAX_CREATED = 1e12
_HEX64 = frozenset("0123456789abcdef")


def is_hex(value: object, length: int) -> bool:
    """Whether a JSON field is lowercase hex of exactly ``length`` characters."""
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX64


def is_uint(value: object, limit: int = 1 << 63) -> bool:
    """Whether a JSON field is an integer (not a bool) in [0, limit)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


def is_time(value: object) -> bool:
    """Whether a JSON field is a time: a number (not a bool) in [0, MAX_CREATED)."""
    return (
        isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < MAX_CREATED
    )
