"""Segment layout, segment hashes and the hash list (pure functions, no I/O).

An object of ``size`` bytes is cut into segments of ``segment_size`` bytes: segment ``i``
covers bytes ``[i * segment_size, min((i + 1) * segment_size, size))``. The last segment
may be short, an empty object has no segments, and a size that is an exact multiple of
the segment size has no empty trailing segment.

Integrity::

    segment id   SegmentId = BLAKE3(segment bytes)                    32 bytes
    hash list    id(0) || id(1) || ... || id(count - 1)               32 x count bytes
    root         IntegrityRoot = BLAKE3(hash list)                    32 bytes
                 (BLAKE3(b"") for 0 segments; the hash list's own SegmentId)

The signed manifest carries the root. A fetcher gets the hash list from any peer, checks
it against the root (:func:`verify_hash_list`), then checks each segment against its id
(:func:`verify_segment`) in whatever order segments arrive.

For placement, the segments are split into a few contiguous *stripes* (ranges) of
near-equal length (:func:`stripe_ranges`); each range is stored on its own set of peers.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NewType

import blake3

from difs_p2p.classgen import valueclass
from difs_p2p.errors import IntegrityError, UsageError, WireError

# BLAKE3's default output: 256 bits, collision resistance far beyond any object count.
HASH_SIZE = 32
# 1 MiB: per-segment costs (a request, a lookup, a hash-list entry) vanish next to the
# transfer time, while a 100 MiB object still has 100 segments to stripe and pipeline.
DEFAULT_SEGMENT_SIZE = 1 << 20
# The segment size of objects of LARGE_OBJECT bytes or more (default_segment_size): a
# fetch's Python work is per segment (a request, a receive loop, a verify and a write
# handed to a thread), so 4 MiB segments take a quarter of it. Measured: a 256 MiB fetch
# from one holder on loopback took 0.24-0.30 s to a file with 4 MiB segments against
# 0.31-0.35 s with 1 MiB, with the same time to first byte. Pipelines, windows and
# buffer pools are budgeted in bytes, so memory does not grow with the segment size.
LARGE_SEGMENT_SIZE = 4 << 20
# 64 MiB: 16 segments of 4 MiB, still enough to stripe and pipeline over a few holders.
LARGE_OBJECT = 64 << 20
# One page: smaller segments only add per-segment overhead and hash-list bytes.
MIN_SEGMENT_SIZE = 4096
# The largest segment one wire frame carries (wire.MAX_SEGMENT); a receiver buffers at most
# one segment per connection.
MAX_SEGMENT_SIZE = 16 << 20
# A hash list (32 bytes per segment) is at most 2^19 x 32 bytes = 16 MiB, so it travels
# and is stored like one segment of the largest size. With the default segment size this
# allows objects of 512 GiB.
MAX_SEGMENTS = 1 << 19

SegmentId = NewType("SegmentId", bytes)
"""BLAKE3 of a segment's bytes, 32 bytes."""

IntegrityRoot = NewType("IntegrityRoot", SegmentId)
"""BLAKE3 of an object's hash list, 32 bytes: the root a manifest signs.

It is a kind of :data:`SegmentId`: the hash list is uploaded, stored and fetched as one
segment under its root, so a root goes wherever a segment id may (``store.put(root, ...)``),
but a segment id is not accepted where a root is expected."""

# Buffers of at least 1 MiB are hashed with BLAKE3's multi-threaded mode (max_threads=AUTO).
# Measured on the 2-core test machine (blake3 1.0.11, medians of 9 rounds hashing 256 MiB,
# MB/s, low and high of two runs):
#
#     buffer   one hasher:  1 thread     AUTO     two hashers at once:  1 thread     AUTO
#     512 KiB              3,500-3,800  4,100-4,700                     4,600-4,900  4,000-4,600
#     1 MiB                3,700-3,800  5,100-5,500                     4,200-5,700  4,300-5,800
#     16 MiB               2,200-2,500  3,300-3,500
#
# At 1 MiB and above AUTO is about 1.4 times faster alone and no slower when both cores
# are busy; at 512 KiB it loses once two hashes run at once, as pipelined verification does.
_THREADED_HASH_MIN = 1 << 20


def _blake3(data: bytes | bytearray | memoryview) -> bytes:
    if isinstance(data, memoryview):
        data = data.cast("B")  # blake3 takes only byte buffers; len() is now in bytes
    if len(data) >= _THREADED_HASH_MIN:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).digest()
    return blake3.blake3(data).digest()


def segment_hash(data: bytes | bytearray | memoryview) -> SegmentId:
    """The id of a segment: BLAKE3 of its bytes (32 bytes)."""
    return SegmentId(_blake3(data))


def default_segment_size(size: int | None) -> int:
    """The segment size to publish an object of ``size`` bytes with when none is asked
    for: LARGE_SEGMENT_SIZE from LARGE_OBJECT bytes on, else DEFAULT_SEGMENT_SIZE (also for
    a stream of unknown size, ``None``). The size is in the manifest: objects published
    before keep theirs."""
    if size is not None and size >= LARGE_OBJECT:
        return LARGE_SEGMENT_SIZE
    return DEFAULT_SEGMENT_SIZE


def validate_segment_size(n: int) -> int:
    """``n`` if it is a usable segment size: a multiple of 4096 in [MIN, MAX]; else UsageError."""
    if (
        isinstance(n, bool)
        or not isinstance(n, int)
        or not MIN_SEGMENT_SIZE <= n <= MAX_SEGMENT_SIZE
        or n % 4096
    ):
        raise UsageError(
            f"segment size {n!r} must be a multiple of 4096 between {MIN_SEGMENT_SIZE} and "
            f"{MAX_SEGMENT_SIZE} bytes"
        )
    return n


@valueclass
class Layout:
    """How an object of ``size`` bytes is cut into segments of ``segment_size`` bytes.

    Any positive segment size is accepted here, because layouts are also built for
    manifests received from peers; :func:`validate_segment_size` is the policy applied
    when choosing a size to publish with. Raises UsageError for a negative size, a
    segment size below 1, or more than MAX_SEGMENTS segments.
    """

    size: int
    segment_size: int

    def __post_init__(self) -> None:
        if self.size < 0:
            raise UsageError(f"object size {self.size} is negative")
        if self.segment_size < 1:
            raise UsageError(f"segment size {self.segment_size} must be at least 1")
        if self.size > MAX_SEGMENTS * self.segment_size:
            raise UsageError(
                f"object of {self.size} bytes is too large: at most "
                f"{MAX_SEGMENTS * self.segment_size} bytes ({MAX_SEGMENTS} segments) "
                f"with {self.segment_size}-byte segments"
            )

    @property
    def count(self) -> int:
        """The number of segments: ceil(size / segment_size)."""
        return -(-self.size // self.segment_size)

    def bounds(self, i: int) -> tuple[int, int]:
        """The byte offset and length of segment ``i``; UsageError if there is no such segment."""
        count = self.count
        if not 0 <= i < count:
            raise UsageError(f"segment {i} is outside 0..{count - 1}")
        offset = i * self.segment_size
        return offset, min(self.segment_size, self.size - offset)

    def segments_for_bytes(self, start: int, end_inclusive: int) -> range:
        """The segments that hold bytes ``start..end_inclusive`` (both inside the object)."""
        if not 0 <= start <= end_inclusive < self.size:
            raise UsageError(
                f"byte range {start}-{end_inclusive} is not inside the object "
                f"(bytes 0-{self.size - 1})"
            )
        return range(start // self.segment_size, end_inclusive // self.segment_size + 1)


def stripe_ranges(count: int, stripes: int) -> list[tuple[int, int]]:
    """Split segments ``0..count-1`` into at most ``stripes`` contiguous ranges.

    Ranges are inclusive ``(start, end)`` pairs in order, their lengths differ by at most
    one and the longer ones come first; there are ``min(count, stripes)`` of them.
    ``count == 0`` gives ``[]``. UsageError for a negative count or fewer than one stripe.
    """
    if count < 0:
        raise UsageError(f"segment count {count} is negative")
    if count == 0:
        return []
    if stripes < 1:
        raise UsageError(f"cannot split {count} segments into {stripes} stripes")
    n = min(stripes, count)
    base, extra = divmod(count, n)
    ranges: list[tuple[int, int]] = []
    start = 0
    for i in range(n):
        length = base + 1 if i < extra else base
        ranges.append((start, start + length - 1))
        start += length
    return ranges


# A range is placed and fetched as a unit; below 8 segments its fixed costs (a DHT lookup,
# a hold record, one connection per holder) are no longer small next to its transfer.
_MIN_SEGMENTS_PER_STRIPE = 8
# Bounds the placement records and the lookups one publish makes.
_MAX_STRIPES = 64


def default_stripes(count: int) -> int:
    """How many ranges to stripe ``count`` segments into.

    ``count // 8`` clamped to 1..64: each range gets at least 8 segments when there are 8
    or more, no object has more than 64 ranges, and every object (even an empty one) has
    at least 1.
    """
    if count < 0:
        raise UsageError(f"segment count {count} is negative")
    return max(1, min(_MAX_STRIPES, count // _MIN_SEGMENTS_PER_STRIPE))


def encode_hash_list(hashes: Sequence[SegmentId]) -> bytes:
    """The hash list: the segment ids concatenated in order."""
    if len(hashes) > MAX_SEGMENTS:
        raise UsageError(f"{len(hashes)} segments is more than {MAX_SEGMENTS}")
    for i, h in enumerate(hashes):
        if len(h) != HASH_SIZE:
            raise UsageError(f"segment id {i} has {len(h)} bytes, not {HASH_SIZE}")
    return b"".join(hashes)


def decode_hash_list(data: bytes, expected_count: int) -> list[SegmentId]:
    """The segment ids in a hash list of ``expected_count`` segments.

    WireError unless ``0 <= expected_count <= MAX_SEGMENTS`` and ``data`` is exactly
    ``32 * expected_count`` bytes; the offset is where the data stops or overruns.
    """
    if not 0 <= expected_count <= MAX_SEGMENTS:
        raise WireError(
            f"segment count {expected_count} is outside 0..{MAX_SEGMENTS}",
            field="segment_count",
        )
    expected = expected_count * HASH_SIZE
    if len(data) != expected:
        problem = "truncated" if len(data) < expected else "has trailing bytes"
        raise WireError(
            f"hash list of {len(data)} bytes {problem}: {expected_count} segments need {expected}",
            field="hash_list",
            offset=min(len(data), expected),
        )
    return [SegmentId(bytes(data[i : i + HASH_SIZE])) for i in range(0, expected, HASH_SIZE)]


def hash_list_root(data: bytes) -> IntegrityRoot:
    """The integrity root: BLAKE3 of the hash list (``BLAKE3(b"")`` for no segments)."""
    return IntegrityRoot(SegmentId(_blake3(data)))


def verify_hash_list(data: bytes, root: IntegrityRoot, count: int) -> list[SegmentId]:
    """The segment ids of a hash list received from a peer, checked against ``root``.

    WireError if ``data`` cannot hold ``count`` ids (checked first, so no more than
    16 MiB is ever hashed); IntegrityError if its BLAKE3 is not ``root``.
    """
    ids = decode_hash_list(data, count)
    if _blake3(data) != root:
        raise IntegrityError(
            f"hash list does not match the integrity root {bytes(root).hex()[:16]}"
        )
    return ids


def verify_segment(expected: SegmentId, data: bytes | bytearray | memoryview) -> None:
    """IntegrityError unless BLAKE3 of ``data`` is ``expected``."""
    if _blake3(data) != expected:
        raise IntegrityError(f"segment {bytes(expected).hex()[:16]} does not match its hash")
