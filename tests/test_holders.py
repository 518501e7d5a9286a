"""Holder entries: the fixed binary format, its shape rules and its signature."""

from __future__ import annotations

import pytest

from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.holders import (
    HOLDER6_SIZE,
    HOLDER_SIZE,
    HolderEntry,
    build_holder_entry,
    decode_holder_entry,
    parse_holder_entry,
    verify_holder_entry,
)
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.signed import KEY, WRITER, holder


def test_a_holder_entry_round_trips() -> None:
    """A built entry is 179 bytes and parses back to the same fields."""
    h = holder()
    assert len(h.raw) == HOLDER_SIZE == 179
    assert parse_holder_entry(h.raw) == h
    assert (h.key, h.version, h.start, h.end, h.host, h.port, h.issued) == (
        KEY,
        2,
        0,
        3,
        "10.0.0.7",
        4000,
        1000,
    )
    assert h.public_key == WRITER.public_key
    assert h.identity == holder(issued=2000).identity != holder(start=4).identity


@pytest.mark.parametrize(
    ("offset", "replacement", "field"),
    [
        (0, b"\x02", "kind"),  # not a holder entry
        (61, (9).to_bytes(4, "big"), "range"),  # start 9 > end 3
        (73, b"\x00\x00", "range"),  # port 0
        (21, bytes(8), "range"),  # version 0
    ],
)
def test_malformed_holder_entries_are_wire_errors(
    offset: int, replacement: bytes, field: str
) -> None:
    """Bad kind, range, port or version are WireErrors naming the field."""
    raw = bytearray(holder().raw)
    raw[offset : offset + len(replacement)] = replacement
    with pytest.raises(WireError) as caught:
        decode_holder_entry(bytes(raw))
    assert caught.value.field == field


@pytest.mark.parametrize(
    "size", [0, HOLDER_SIZE - 1, HOLDER_SIZE + 1, HOLDER6_SIZE - 1, HOLDER6_SIZE + 1]
)
def test_a_holder_entry_of_the_wrong_size_is_a_wire_error(size: int) -> None:
    """An entry is exactly HOLDER_SIZE bytes (HOLDER6_SIZE with an IPv6 address)."""
    with pytest.raises(WireError, match="holder entry of"):
        decode_holder_entry(holder().raw[:size].ljust(size, b"\x00"))


@pytest.mark.parametrize("offset", [1, 21, 29, 64, 69, 73, 75, 83, 115, 178])
def test_a_tampered_holder_entry_fails_verification(offset: int) -> None:
    """Decoding alone does not check the signature; verifying catches any changed byte."""
    raw = bytearray(holder().raw)
    raw[offset] ^= 0x01
    entry = decode_holder_entry(bytes(raw))  # still well formed
    with pytest.raises(IntegrityError):
        verify_holder_entry(entry)
    with pytest.raises(IntegrityError):
        parse_holder_entry(bytes(raw))


def _holder_at(host: str) -> HolderEntry:
    return build_holder_entry(
        WRITER,
        key=KEY,
        version=2,
        integrity=IntegrityRoot(SegmentId(b"\x22" * 32)),
        start=0,
        end=3,
        host=host,
        port=4000,
        issued=1000,
    )


@pytest.mark.parametrize(
    ("host", "size", "text"),
    [
        ("fd77::1", HOLDER6_SIZE, "fd77::1"),
        ("10.77.0.1", HOLDER_SIZE, "10.77.0.1"),
        ("::ffff:10.77.0.1", HOLDER_SIZE, "10.77.0.1"),
    ],
)
def test_an_ipv6_holder_entry_round_trips(host: str, size: int, text: str) -> None:
    """An IPv6 holder signs a 191-byte entry with a 16-byte address; mapped IPv4 is
    the 4-byte form; both parse back and any changed byte fails verification."""
    h = _holder_at(host)
    assert len(h.raw) == size and h.host == text
    assert parse_holder_entry(h.raw) == h
    raw = bytearray(h.raw)
    raw[75] ^= 1
    with pytest.raises(IntegrityError):
        parse_holder_entry(bytes(raw))


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "224.0.0.1", "ff02::1", "seed.example"])
def test_a_holder_entry_never_carries_an_unreachable_address(host: str) -> None:
    """Wildcards, multicast and names are refused when signing an entry."""
    with pytest.raises(ValueError, match="cannot carry"):
        _holder_at(host)


@pytest.mark.parametrize(
    ("size", "offset", "address"),
    [
        (HOLDER_SIZE, 69, bytes(4)),  # 0.0.0.0
        (HOLDER6_SIZE, 69, bytes(16)),  # ::
        (HOLDER6_SIZE, 69, bytes(10) + b"\xff\xff" + bytes([10, 0, 0, 1])),  # mapped
    ],
)
def test_a_received_entry_with_an_unreachable_address_is_a_wire_error(
    size: int, offset: int, address: bytes
) -> None:
    """A peer's entry naming a wildcard (or a mapped IPv4 in the IPv6 form) is refused."""
    raw = bytearray(_holder_at("fd77::1" if size == HOLDER6_SIZE else "10.0.0.7").raw)
    raw[offset : offset + len(address)] = address
    with pytest.raises(WireError) as caught:
        decode_holder_entry(bytes(raw))
    assert caught.value.field == "address"
