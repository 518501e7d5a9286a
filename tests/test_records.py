"""What every record shares: the kind told by the first byte, entry sets split by kind,
canonical JSON and the field checks of JSON records."""

from __future__ import annotations

import math

import pytest

from difs_p2p.errors import WireError
from difs_p2p.holders import HOLDER_SIZE, build_holder_entry, parse_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest, parse_manifest
from difs_p2p.names import name_key
from difs_p2p.records import (
    MAX_CREATED,
    RecordKind,
    canonical_json,
    is_hex,
    is_time,
    is_uint,
    record_kind,
    split_entries,
)
from difs_p2p.segments import IntegrityRoot, SegmentId

SIGNER = Identity.generate()
MANIFEST = build_manifest(
    SIGNER,
    name="/a/b",
    version=1,
    parent=None,
    root=None,
    size=10,
    segment_size=4096,
    segment_count=1,
    stripes=1,
    replicas=3,
    integrity=IntegrityRoot(SegmentId(bytes(32))),
    created=1.0,
).raw
HOLDER = build_holder_entry(
    SIGNER,
    key=name_key("/a/b"),
    version=1,
    integrity=IntegrityRoot(SegmentId(b"\0" * 32)),
    start=0,
    end=0,
    host="127.0.0.1",
    port=9,
    issued=1,
).raw


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        (MANIFEST, RecordKind.MANIFEST),
        (HOLDER, RecordKind.HOLDER),
        (b"{", RecordKind.MANIFEST),  # the kind only; the decoder refuses the rest
        (b'{"t":"something else"}', RecordKind.MANIFEST),  # JSON, not a manifest
        (b"\x01", RecordKind.HOLDER),  # one byte: a (truncated) holder entry
        (HOLDER[:1] + b"\0" * (HOLDER_SIZE - 1), RecordKind.HOLDER),
    ],
)
def test_the_first_byte_tells_the_kind(raw: bytes, kind: RecordKind) -> None:
    """A value starting with "{" is a manifest, one starting with kind byte 1 a holder entry."""
    assert record_kind(raw) is kind


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"", "empty record"),
        (b"\x00", "unknown record kind 0x00"),
        (b"\x03" + HOLDER[1:], "unknown record kind 0x03"),  # a holder entry of another kind
        (b"[1,2]", "unknown record kind 0x5b"),  # JSON, but not an object
        (b" {}", "unknown record kind 0x20"),  # not canonical: leading space
        (b"\xff" * 179, "unknown record kind 0xff"),
    ],
)
def test_a_value_of_neither_kind_is_a_wire_error(raw: bytes, message: str) -> None:
    """Empty bytes and any other first byte raise WireError naming the kind field at 0."""
    with pytest.raises(WireError, match=message) as caught:
        record_kind(raw)
    assert (caught.value.field, caught.value.offset) == ("kind", 0)


def test_a_kind_picks_the_decoder_that_then_refuses_what_is_not_a_record() -> None:
    """A JSON object that is not a manifest and a one-byte holder entry are refused by
    their decoders, never by an IndexError."""
    with pytest.raises(WireError, match="not a manifest"):
        parse_manifest(b'{"t":"something else"}')
    with pytest.raises(WireError, match="holder entry of 1 bytes"):
        parse_holder_entry(b"\x01")


@pytest.mark.parametrize(
    ("raws", "history", "holders"),
    [
        ([], [], []),
        ([MANIFEST, HOLDER], [MANIFEST], [HOLDER]),
        ([HOLDER, MANIFEST, HOLDER], [MANIFEST], [HOLDER, HOLDER]),  # order kept per kind
        ([b"", b"\x00junk", HOLDER], [], [HOLDER]),  # neither kind: dropped
        ([b"{", b"\x01"], [b"{"], [b"\x01"]),  # split by kind only, not decoded
    ],
)
def test_an_entry_set_splits_into_history_and_holder_entries(
    raws: list[bytes], history: list[bytes], holders: list[bytes]
) -> None:
    """split_entries sorts values by kind without decoding them, dropping other values."""
    split = split_entries(raws)
    assert split.history == history
    assert split.holders == holders


def test_canonical_json_is_sorted_compact_utf8_and_refuses_nan() -> None:
    """One encoding per object: sorted keys, no spaces, UTF-8 as is; NaN refused."""
    assert canonical_json({"b": 1, "a": ["é", None]}) == '{"a":["é",null],"b":1}'.encode()
    with pytest.raises(ValueError):
        canonical_json({"a": math.nan})


@pytest.mark.parametrize(
    ("value", "length", "ok"),
    [
        ("ab" * 32, 64, True),
        ("AB" * 32, 64, False),  # uppercase is not the canonical form
        ("ab" * 31, 64, False),
        ("zz" * 32, 64, False),
        (b"ab" * 32, 64, False),
        (None, 64, False),
    ],
)
def test_is_hex(value: object, length: int, ok: bool) -> None:
    """Hex fields are lowercase strings of the exact length."""
    assert is_hex(value, length) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [(0, True), (2**63 - 1, True), (2**63, False), (-1, False), (True, False), (1.0, False)],
)
def test_is_uint(value: object, ok: bool) -> None:
    """Integer fields are ints (not bools, not floats) in [0, 2^63)."""
    assert is_uint(value) is ok


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        (0, True),
        (1.5, True),
        (MAX_CREATED - 1, True),
        (MAX_CREATED, False),
        (-0.001, False),
        (math.inf, False),
        (False, False),
        ("1", False),
    ],
)
def test_is_time(value: object, ok: bool) -> None:
    """Times are numbers (not bools) in [0, 10^12) unix seconds."""
    assert is_time(value) is ok
