"""Segment layout, striping and the hash list, as the specification."""

from __future__ import annotations

import random

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p.errors import IntegrityError, UsageError, WireError
from difs_p2p.segments import (
    DEFAULT_SEGMENT_SIZE,
    HASH_SIZE,
    LARGE_OBJECT,
    LARGE_SEGMENT_SIZE,
    MAX_SEGMENT_SIZE,
    MAX_SEGMENTS,
    MIN_SEGMENT_SIZE,
    IntegrityRoot,
    Layout,
    SegmentId,
    decode_hash_list,
    default_segment_size,
    default_stripes,
    encode_hash_list,
    hash_list_root,
    segment_hash,
    stripe_ranges,
    validate_segment_size,
    verify_hash_list,
    verify_segment,
)

MIB = 1 << 20


def _data(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def _sliced(data: bytes, segment_size: int) -> list[tuple[int, bytes]]:
    starts = range(0, len(data), segment_size)
    return [(i, data[s : s + segment_size]) for i, s in enumerate(starts)]


# -- constants and sizes -------------------------------------------------------------------


def test_limits_fit_together() -> None:
    """A full hash list is 16 MiB, the largest segment; the default size is a valid one."""
    assert MAX_SEGMENTS * HASH_SIZE == MAX_SEGMENT_SIZE == 16 * MIB
    assert validate_segment_size(DEFAULT_SEGMENT_SIZE) == MIB
    assert validate_segment_size(MIN_SEGMENT_SIZE) == 4096
    assert validate_segment_size(MAX_SEGMENT_SIZE) == 16 * MIB


@pytest.mark.parametrize(
    ("size", "segment_size"),
    [
        (None, DEFAULT_SEGMENT_SIZE),  # a stream: its size is known only at the end
        (0, DEFAULT_SEGMENT_SIZE),
        (LARGE_OBJECT - 1, DEFAULT_SEGMENT_SIZE),
        (LARGE_OBJECT, LARGE_SEGMENT_SIZE),
        (1 << 40, LARGE_SEGMENT_SIZE),
    ],
)
def test_default_segment_size_grows_for_large_objects(size: int | None, segment_size: int) -> None:
    """Objects from LARGE_OBJECT bytes on get LARGE_SEGMENT_SIZE segments, others 1 MiB."""
    assert default_segment_size(size) == segment_size
    assert validate_segment_size(segment_size) == segment_size


@pytest.mark.parametrize("n", [0, -4096, 4095, 4097, 6144, MAX_SEGMENT_SIZE + 4096, 1 << 30])
def test_bad_segment_sizes(n: int) -> None:
    """Segment sizes outside 4 KiB..16 MiB or not multiples of 4096 are refused."""
    with pytest.raises(UsageError, match="multiple of 4096"):
        validate_segment_size(n)


# -- layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("segment_size", [4096, DEFAULT_SEGMENT_SIZE])
@pytest.mark.parametrize(
    ("segments", "extra", "count"),
    [(0, 0, 0), (0, 1, 1), (1, 0, 1), (2, 0, 2), (3, 0, 3), (1, 1, 2), (0, -1, None)],
)
def test_layout_edges(segment_size: int, segments: int, extra: int, count: int | None) -> None:
    """Empty objects have no segments; exact multiples have no empty trailing segment."""
    size = segments * segment_size + extra
    if size < 0:
        with pytest.raises(UsageError, match="negative"):
            Layout(size, segment_size)
        return
    layout = Layout(size, segment_size)
    assert layout.count == count
    bounds = [layout.bounds(i) for i in range(layout.count)]
    assert [offset for offset, _ in bounds] == [i * segment_size for i in range(layout.count)]
    assert sum(length for _, length in bounds) == size
    assert all(length > 0 for _, length in bounds)
    assert [len(s) for _, s in _sliced(_data(size), segment_size)] == [
        length for _, length in bounds
    ]


def test_layout_bounds_out_of_range() -> None:
    """Asking for a segment that does not exist is a UsageError, never IndexError."""
    layout = Layout(10_000, 4096)
    assert layout.bounds(2) == (8192, 1808)
    for i in (-1, 3, 10**9):
        with pytest.raises(UsageError, match=f"segment {i} is outside 0..2"):
            layout.bounds(i)
    with pytest.raises(UsageError):
        Layout(0, 4096).bounds(0)


def test_layout_refuses_too_many_segments() -> None:
    """At most MAX_SEGMENTS segments; the message gives the largest object for that size."""
    assert Layout(MAX_SEGMENTS * 4096, 4096).count == MAX_SEGMENTS
    with pytest.raises(UsageError, match=f"at most {MAX_SEGMENTS * 4096} bytes"):
        Layout(MAX_SEGMENTS * 4096 + 1, 4096)
    with pytest.raises(UsageError, match="at most 549755813888 bytes"):
        Layout(1 << 50, DEFAULT_SEGMENT_SIZE)


def test_layout_refuses_bad_segment_size() -> None:
    """A segment size below 1 is refused; the layout is a frozen value."""
    with pytest.raises(UsageError, match="segment size 0"):
        Layout(10, 0)
    layout = Layout(10, 4)
    with pytest.raises(AttributeError):
        layout.size = 11  # type: ignore[misc]
    assert layout == Layout(10, 4)


@given(st.integers(1, 100_000), st.sampled_from([1, 7, 4096, 65536]), st.data())
def test_segments_for_bytes_matches_brute_force(
    size: int, segment_size: int, data: st.DataObject
) -> None:
    """The segments covering a byte range are exactly those whose bounds overlap it."""
    layout = Layout(size, segment_size)
    lo = data.draw(st.integers(0, size - 1))
    hi = data.draw(st.integers(lo, min(size - 1, lo + 50 * segment_size)))
    first, last = lo // segment_size, hi // segment_size
    window = range(max(0, first - 2), min(layout.count, last + 3))
    brute = [
        i
        for i in window
        if layout.bounds(i)[0] <= hi and lo < layout.bounds(i)[0] + layout.bounds(i)[1]
    ]
    assert list(layout.segments_for_bytes(lo, hi)) == brute


@pytest.mark.parametrize(("start", "end"), [(-1, 5), (0, 10_000), (5, 4), (10_000, 10_000)])
def test_segments_for_bytes_outside_the_object(start: int, end: int) -> None:
    """A byte range that is empty or reaches outside the object is a UsageError."""
    with pytest.raises(UsageError, match="not inside the object"):
        Layout(10_000, 4096).segments_for_bytes(start, end)
    with pytest.raises(UsageError):
        Layout(0, 4096).segments_for_bytes(0, 0)


# -- striping ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "stripes", "ranges"),
    [
        (0, 5, []),
        (0, 0, []),
        (1, 1, [(0, 0)]),
        (1, 64, [(0, 0)]),
        (2, 5, [(0, 0), (1, 1)]),
        (10, 3, [(0, 3), (4, 6), (7, 9)]),
        (9, 3, [(0, 2), (3, 5), (6, 8)]),
        (8, 1, [(0, 7)]),
    ],
)
def test_stripe_ranges_examples(count: int, stripes: int, ranges: list[tuple[int, int]]) -> None:
    """Ranges are contiguous and inclusive, the longer ones first."""
    assert stripe_ranges(count, stripes) == ranges


@pytest.mark.parametrize(("count", "stripes"), [(-1, 3), (5, 0), (5, -2)])
def test_stripe_ranges_refuses_nonsense(count: int, stripes: int) -> None:
    """A negative count, or fewer than one stripe for a nonempty object, is a UsageError."""
    with pytest.raises(UsageError):
        stripe_ranges(count, stripes)


@given(st.integers(0, 5000), st.integers(1, 100))
def test_stripes_cover_every_segment_once(count: int, stripes: int) -> None:
    """Stripes cover 0..count-1 once, contiguously, in at most `stripes` near-equal ranges."""
    ranges = stripe_ranges(count, stripes)
    covered = [i for a, b in ranges for i in range(a, b + 1)]
    assert covered == list(range(count))
    assert len(ranges) == min(count, stripes)
    lengths = [b - a + 1 for a, b in ranges]
    assert all(n >= 1 for n in lengths)
    if lengths:
        assert max(lengths) - min(lengths) <= 1
        assert lengths == sorted(lengths, reverse=True)


@pytest.mark.parametrize(
    ("count", "stripes"),
    [(0, 1), (1, 1), (7, 1), (15, 1), (16, 2), (17, 2), (512, 64), (513, 64), (10**6, 64)],
)
def test_default_stripes_examples(count: int, stripes: int) -> None:
    """count // 8, at least 1 and at most 64."""
    assert default_stripes(count) == stripes


@given(st.integers(0, MAX_SEGMENTS))
def test_default_stripes_gives_ranges_of_at_least_8(count: int) -> None:
    """Default striping gives 1..64 ranges, each of at least 8 segments when there are 8."""
    stripes = default_stripes(count)
    assert 1 <= stripes <= 64
    lengths = [b - a + 1 for a, b in stripe_ranges(count, stripes)]
    if count >= 8:
        assert min(lengths) >= 8


# -- hashing and the hash list -------------------------------------------------------------


def test_golden_root_of_abc() -> None:
    """b"abc" in 4096-byte segments: one segment, root = BLAKE3(BLAKE3(b"abc"))."""
    pieces = _sliced(b"abc", 4096)
    assert pieces == [(0, b"abc")]
    hash_list = encode_hash_list([segment_hash(s) for _, s in pieces])
    abc = blake3.blake3(b"abc").digest()
    assert abc.hex() == "6437b3ac38465133ffb63b75273a8db548c558465d79db03fd359c6cd5bd9d85"
    assert hash_list == abc
    root = hash_list_root(hash_list)
    assert root == blake3.blake3(abc).digest()
    assert root.hex() == "dc2f738d17b8a7ec03efdd0a95e8d3924b8e05965040ab6dcafd992994012bd4"
    assert verify_hash_list(hash_list, root, 1) == [abc]


def test_empty_object_root() -> None:
    """An object without segments has an empty hash list whose root is BLAKE3(b"")."""
    assert encode_hash_list([]) == b""
    assert hash_list_root(b"") == blake3.blake3(b"").digest()
    assert verify_hash_list(b"", IntegrityRoot(SegmentId(blake3.blake3(b"").digest())), 0) == []


@pytest.mark.parametrize("size", [0, 1, MIB - 1, MIB, 3 * MIB + 5])
def test_segment_hash_is_blake3_for_every_buffer_type(size: int) -> None:
    """Threaded or not, a segment id is plain BLAKE3 of the bytes, whatever the buffer type."""
    data = _data(size, seed=size)
    expected = blake3.blake3(data).digest()
    assert segment_hash(data) == expected
    assert segment_hash(bytearray(data)) == expected
    assert segment_hash(memoryview(data)) == expected
    assert hash_list_root(data) == expected
    verify_segment(SegmentId(expected), memoryview(data))


def test_segment_hash_of_wide_memoryview() -> None:
    """A memoryview of 4-byte items is hashed by its bytes, not its item count."""
    data = _data(MIB, seed=4)
    assert segment_hash(memoryview(data).cast("I")) == blake3.blake3(data).digest()


@given(st.lists(st.binary(max_size=64), max_size=20))
def test_hash_list_round_trip(segments: list[bytes]) -> None:
    """Encoding then decoding a hash list gives back the ids; the root verifies it."""
    ids = [segment_hash(s) for s in segments]
    data = encode_hash_list(ids)
    assert len(data) == HASH_SIZE * len(ids)
    assert decode_hash_list(data, len(ids)) == ids
    assert verify_hash_list(data, hash_list_root(data), len(ids)) == ids


def test_encode_hash_list_refuses_bad_ids() -> None:
    """Only 32-byte ids can be listed."""
    with pytest.raises(UsageError, match="segment id 1 has 31 bytes"):
        encode_hash_list([SegmentId(bytes(32)), SegmentId(bytes(31))])


@given(st.binary(max_size=400), st.integers(-3, 20))
def test_decode_hash_list_only_raises_wire_error(data: bytes, count: int) -> None:
    """Random bytes decode into `count` ids or raise WireError (never IndexError and the like)."""
    try:
        ids = decode_hash_list(data, count)
    except WireError:
        assert len(data) != count * HASH_SIZE or count < 0
        return
    assert len(ids) == count
    assert b"".join(ids) == data


@pytest.mark.parametrize(
    ("length", "count", "field", "offset"),
    [
        (63, 2, "hash_list", 63),
        (65, 2, "hash_list", 64),
        (0, 1, "hash_list", 0),
        (32, 0, "hash_list", 0),
        (0, -1, "segment_count", -1),
        (0, MAX_SEGMENTS + 1, "segment_count", -1),
    ],
)
def test_decode_hash_list_names_field_and_offset(
    length: int, count: int, field: str, offset: int
) -> None:
    """Truncation, trailing bytes and impossible counts name the field and the offset."""
    with pytest.raises(WireError) as info:
        decode_hash_list(bytes(length), count)
    assert info.value.field == field
    assert info.value.offset == offset


def test_decode_hash_list_byte_at_a_time() -> None:
    """Every prefix of a valid hash list is refused, only the whole list decodes."""
    data = encode_hash_list([segment_hash(bytes([i])) for i in range(3)])
    for n in range(len(data)):
        with pytest.raises(WireError, match="truncated"):
            decode_hash_list(data[:n], 3)
    assert len(decode_hash_list(data, 3)) == 3
    with pytest.raises(WireError, match="trailing"):
        decode_hash_list(data + b"\x00", 3)


@given(st.integers(1, 12), st.data())
def test_verify_hash_list_detects_any_flipped_bit(count: int, data: st.DataObject) -> None:
    """Flipping any one bit of the hash list or of the root is an IntegrityError."""
    hash_list = encode_hash_list([segment_hash(bytes([i]) * i) for i in range(count)])
    root = hash_list_root(hash_list)
    bit = data.draw(st.integers(0, 8 * len(hash_list) - 1))
    flipped = bytearray(hash_list)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError, match="does not match the integrity root"):
        verify_hash_list(bytes(flipped), root, count)
    bad_root = bytearray(root)
    bad_root[bit % len(root)] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError):
        verify_hash_list(hash_list, IntegrityRoot(SegmentId(bytes(bad_root))), count)


def test_verify_hash_list_every_bit_of_a_small_list() -> None:
    """Exhaustively: each of the 512 bits of a two-segment hash list is protected."""
    hash_list = encode_hash_list([segment_hash(b"abc"), segment_hash(b"def")])
    root = hash_list_root(hash_list)
    for bit in range(8 * len(hash_list)):
        flipped = bytearray(hash_list)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityError):
            verify_hash_list(bytes(flipped), root, 2)


def test_verify_hash_list_checks_the_length_first() -> None:
    """A hash list that cannot hold `count` ids is a WireError, even with its own root."""
    hash_list = encode_hash_list([segment_hash(b"abc")])
    with pytest.raises(WireError):
        verify_hash_list(hash_list, hash_list_root(hash_list), 2)


@given(st.binary(min_size=1, max_size=300), st.data())
def test_verify_segment_detects_any_flipped_bit(segment: bytes, data: st.DataObject) -> None:
    """A segment with one bit flipped fails, and the error names the expected hash."""
    expected = segment_hash(segment)
    verify_segment(expected, segment)
    bit = data.draw(st.integers(0, 8 * len(segment) - 1))
    flipped = bytearray(segment)
    flipped[bit // 8] ^= 1 << (bit % 8)
    with pytest.raises(IntegrityError, match=f"segment {expected.hex()[:16]} does not match"):
        verify_segment(expected, flipped)
