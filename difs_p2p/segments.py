"""Segment layout, segment hashes and the hash list (pure functions).

Content is cut into fixed-size segments (the last may be short; an empty object has none).
A segment's id is BLAKE3 of its bytes. The hash list is the concatenation of all segment
ids in order; the integrity root, signed in the manifest, is BLAKE3 of the hash list.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NewType

import blake3

from difs_p2p.errors import IntegrityError, UsageError, WireError

HASH_SIZE = 32
# 1 MiB: large enough that per-segment costs vanish, small enough to stripe and pipeline.
DEFAULT_SEGMENT_SIZE = 1 << 20
# One page: smaller segments only add per-segment overhead.
MIN_SEGMENT_SIZE = 4096
# The largest frame the wire allows for segment bytes.
MAX_SEGMENT_SIZE = 16 << 20
# Keeps a hash list within one 16 MiB frame (2^19 x 32 bytes).
MAX_SEGMENTS = 1 << 19

SegmentId = NewType("SegmentId", bytes)


def segment_hash(data: bytes | bytearray | memoryview) -> SegmentId:
    return SegmentId(blake3.blake3(data).digest())


def validate_segment_size(n: int) -> int:
    if not MIN_SEGMENT_SIZE <= n <= MAX_SEGMENT_SIZE or n % 4096:
        raise UsageError(
            f"segment size {n} must be a multiple of 4096 between {MIN_SEGMENT_SIZE} and "
            f"{MAX_SEGMENT_SIZE}"
        )
    return n


@dataclass(frozen=True, slots=True)
class Layout:
    size: int
    segment_size: int

    def __post_init__(self) -> None:
        if self.size < 0 or self.segment_size <= 0:
            raise UsageError("size must be >= 0 and segment size > 0")
        if self.count > MAX_SEGMENTS:
            raise UsageError(
                f"object too large: at most {MAX_SEGMENTS * self.segment_size} bytes with "
                f"{self.segment_size}-byte segments"
            )

    @property
    def count(self) -> int:
        return -(-self.size // self.segment_size)

    def bounds(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.count:
            raise UsageError(f"segment {i} is outside 0..{self.count - 1}")
        offset = i * self.segment_size
        return offset, min(self.segment_size, self.size - offset)

    def segments_for_bytes(self, start: int, end_inclusive: int) -> range:
        if not 0 <= start <= end_inclusive < self.size:
            raise UsageError(f"byte range {start}-{end_inclusive} is outside the object")
        return range(start // self.segment_size, end_inclusive // self.segment_size + 1)


def stripe_ranges(count: int, stripes: int) -> list[tuple[int, int]]:
    if count <= 0:
        return []
    stripes = max(1, min(stripes, count))
    base, extra = divmod(count, stripes)
    ranges, start = [], 0
    for i in range(stripes):
        length = base + (1 if i < extra else 0)
        ranges.append((start, start + length - 1))
        start += length
    return ranges


def default_stripes(count: int) -> int:
    """Ranges of at least 8 segments, at most 64 ranges, at least 1."""
    return max(1, min(64, count // 8))


def range_for_segment(ranges: Sequence[tuple[int, int]], i: int) -> int:
    starts = [r[0] for r in ranges]
    index = bisect.bisect_right(starts, i) - 1
    if index < 0 or not ranges[index][0] <= i <= ranges[index][1]:
        raise UsageError(f"segment {i} is in no range")
    return index


def encode_hash_list(hashes: Sequence[bytes]) -> bytes:
    return b"".join(hashes)


def decode_hash_list(data: bytes, expected_count: int) -> list[SegmentId]:
    if expected_count > MAX_SEGMENTS or len(data) != expected_count * HASH_SIZE:
        raise WireError(
            f"hash list of {len(data)} bytes does not hold {expected_count} hashes",
            field="hash_list",
        )
    return [SegmentId(data[i : i + HASH_SIZE]) for i in range(0, len(data), HASH_SIZE)]


def hash_list_root(data: bytes) -> bytes:
    return blake3.blake3(data).digest()


def verify_hash_list(data: bytes, root: bytes, count: int) -> list[SegmentId]:
    if hash_list_root(data) != root:
        raise IntegrityError("hash list does not match the signed integrity root")
    return decode_hash_list(data, count)


def verify_segment(expected: bytes, data: bytes | bytearray | memoryview) -> None:
    if blake3.blake3(data).digest() != expected:
        raise IntegrityError(f"segment {expected.hex()[:16]} does not match its hash")
