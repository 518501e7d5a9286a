"""The client's fetch helpers that decide without I/O: spans of segments and the version to read."""

from __future__ import annotations

from difs_p2p.fetch import in_spans, merged_spans


def test_merged_spans_and_membership() -> None:
    """Ranges merge where they overlap or touch; membership is exact at the edges."""
    merged = merged_spans([(10, 12), (0, 3), (4, 5), (11, 20), (30, 30)])
    assert merged == [(0, 5), (10, 20), (30, 30)]
    inside = {i for i in range(40) if in_spans(merged, i)}
    assert inside == set(range(6)) | set(range(10, 21)) | {30}
    assert not in_spans([], 0)
