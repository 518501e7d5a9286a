"""The client's fetch helpers that decide without I/O: spans of segments and the version to read."""

from __future__ import annotations

import pytest

from difs_p2p.errors import DeletedError, NotFoundError, UsageError
from difs_p2p.fetch import choose_version, in_spans, merged_spans
from difs_p2p.manifest import Manifest
from difs_p2p.publish import build_tombstone
from tests.signed import OWNER, V1, V2


def test_merged_spans_and_membership() -> None:
    """Ranges merge where they overlap or touch; membership is exact at the edges."""
    merged = merged_spans([(10, 12), (0, 3), (4, 5), (11, 20), (30, 30)])
    assert merged == [(0, 5), (10, 20), (30, 30)]
    inside = {i for i in range(40) if in_spans(merged, i)}
    assert inside == set(range(6)) | set(range(10, 21)) | {30}
    assert not in_spans([], 0)


HISTORY = [V1, V2]
GONE = build_tombstone(OWNER, V2, 2, 50.0)


@pytest.mark.parametrize(
    ("newest", "version", "chosen"),
    [
        (V2, None, V2),  # no version asked: the newest
        (V2, 1, V1),
        (V2, 2, V2),
        (GONE, 1, V1),  # an old version of a deleted name is still read
    ],
)
def test_choose_version_reads_the_newest_or_the_version_asked(
    newest: Manifest, version: int | None, chosen: Manifest
) -> None:
    """Without a version the newest manifest is read, else that version of the history."""
    assert choose_version(newest, HISTORY, version) == chosen


@pytest.mark.parametrize(
    ("newest", "version", "error", "message"),
    [
        (V2, 0, UsageError, "versions start at 1"),
        (V2, -3, UsageError, "versions start at 1"),
        (V2, 7, NotFoundError, "has no version 7"),
        (GONE, None, DeletedError, "was deleted"),
        (GONE, 3, NotFoundError, "has no version 3"),  # the tombstone is not in the history
    ],
)
def test_choose_version_refuses_bad_missing_and_deleted_versions(
    newest: Manifest, version: int, error: type[Exception], message: str
) -> None:
    """Version 0 or less is a UsageError, one not in the history NotFoundError, and a
    tombstone DeletedError."""
    with pytest.raises(error, match=message):
        choose_version(newest, HISTORY, version)


@pytest.mark.parametrize(
    ("spans", "merged"),
    [
        ([], []),
        ([(5, 5)], [(5, 5)]),
        ([(0, 9), (2, 3)], [(0, 9)]),  # contained
        ([(0, 3), (5, 6)], [(0, 3), (5, 6)]),  # a gap of one index stays
        ([(5, 6), (0, 4)], [(0, 6)]),  # touching, given out of order
    ],
)
def test_merged_spans_table(spans: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    """Contained, touching and separated spans merge as inclusive ranges."""
    assert merged_spans(spans) == merged
