"""The segment index's SQL on a real database file: rows, keepers, sessions, orphans."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p.diskcost import DiskCost
from difs_p2p.segindex import SegmentIndex

A, B, C, D = (bytes([i]) * 32 for i in range(1, 5))
OWNER, OTHER = b"owner-1", b"owner-2"
S1, S2 = b"session-1", b"session-2"


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SegmentIndex]:
    idx = SegmentIndex(tmp_path / "index.sqlite3")
    yield idx
    idx.close()


def test_rows_give_sizes_times_and_totals(index: SegmentIndex) -> None:
    """Inserted rows are read back by id; totals charge each size under the disk cost."""
    index.insert([(A, 100, 1.0), (B, 5000, 2.0)])
    assert index.sizes() == {A: 100, B: 5000}
    assert sorted(index.ids()) == [A, B]
    assert (index.size(A), index.stored_at(B)) == (100, 2.0)
    assert (index.size(C), index.stored_at(C)) == (None, None)
    assert index.totals(DiskCost()) == (5100, 2)
    assert index.totals(DiskCost(block=4096, per_file=10)) == (4096 + 8192 + 20, 2)
    index.delete([A])
    assert index.sizes() == {B: 5000}
    assert index.totals(DiskCost()) == (5000, 1)


def test_empty_index_totals_are_zero(index: SegmentIndex) -> None:
    """No rows: nothing charged, nothing unneeded, no orphans."""
    assert index.totals(DiskCost(block=4096, per_file=10)) == (0, 0)
    assert index.unneeded() == {}
    assert index.orphan_counts(DiskCost()) == (0, 0, 0, 0)


@pytest.mark.parametrize(
    ("owner", "session", "unneeded"),
    [
        (None, None, {A: 1.0, B: 2.0}),  # nothing keeps them
        (OWNER, None, {B: 2.0}),  # a ref keeps A
        (None, S1, {B: 2.0}),  # a pending upload keeps A
        (OWNER, S1, {B: 2.0}),  # both keep A
    ],
)
def test_a_segment_is_kept_by_a_ref_or_a_pending_row(
    index: SegmentIndex, owner: bytes | None, session: bytes | None, unneeded: dict[bytes, float]
) -> None:
    """A stored segment with neither a ref nor a pending row is unneeded."""
    index.insert([(A, 10, 1.0), (B, 20, 2.0)])
    index.keep([A], owner, session, now=5.0)
    assert index.unneeded() == unneeded
    assert index.is_unneeded(A) is (A in unneeded)
    assert index.is_unneeded(B)
    assert not index.is_unneeded(C)  # not stored at all
    assert index.referenced(A) is (owner is not None)


def test_refs_are_per_owner_and_dropped_by_owner(index: SegmentIndex) -> None:
    """Dropping one owner's refs names its ids and leaves the other owner's refs."""
    index.insert([(A, 10, 1.0), (B, 20, 2.0)])
    index.keep([A, B], OWNER, None, now=0.0)
    index.keep([A, A], OTHER, None, now=0.0)  # a repeated ref is one ref
    assert sorted(index.drop_refs(OWNER)) == [A, B]
    assert index.drop_refs(OWNER) == []
    assert index.referenced(A) and not index.referenced(B)
    assert index.unneeded() == {B: 2.0}
    assert index.drop_refs(OTHER) == [A]
    assert index.unneeded() == {A: 1.0, B: 2.0}


def test_forget_drops_refs_and_pending_rows_but_not_the_segment(index: SegmentIndex) -> None:
    """After forget, the segment is still indexed and nothing keeps it."""
    index.insert([(A, 10, 1.0)])
    index.keep([A], OWNER, S1, now=0.0)
    index.forget(A)
    assert index.sizes() == {A: 10}
    assert not index.referenced(A) and index.is_unneeded(A)
    assert index.end_session(S1, None) == []


def test_sessions_end_whole_in_part_by_age_or_all(index: SegmentIndex) -> None:
    """end_session drops a session's rows (or only the ids given); end_sessions_before
    drops old rows of sessions not live; end_all_sessions counts what it dropped."""
    index.insert([(A, 10, 0.0), (B, 20, 0.0), (C, 30, 0.0), (D, 40, 0.0)])
    index.keep([A, B], None, S1, now=1.0)
    index.keep([C], None, S2, now=1.0)
    index.keep([D], None, S2, now=9.0)
    assert index.end_session(S1, [A]) == [A]
    assert set(index.unneeded()) == {A}
    assert index.end_sessions_before(5.0, live=[S1, S2]) == []  # every session is live
    assert index.end_sessions_before(5.0, live=[S2]) == [B]  # S1 is not
    assert index.end_sessions_before(5.0, live=[]) == [C]  # D is too recent
    assert set(index.unneeded()) == {A, B, C}
    assert index.end_sessions_before(10.0, live=[]) == [D]
    assert set(index.unneeded()) == {A, B, C, D}
    index.keep([A], None, S1, now=20.0)
    index.keep([B], None, S2, now=20.0)
    assert index.end_all_sessions() == 2
    assert index.end_all_sessions() == 0
    assert set(index.unneeded()) == {A, B, C, D}


def test_orphan_counts_tell_pending_from_unneeded(index: SegmentIndex) -> None:
    """Unreferenced segments still pending count apart from those nothing keeps; a
    referenced segment counts in neither."""
    index.insert([(A, 100, 0.0), (B, 200, 0.0), (C, 300, 0.0)])
    index.keep([A], OWNER, S1, now=0.0)  # referenced: neither
    index.keep([B], None, S1, now=0.0)  # pending only
    # C: nothing keeps it
    assert index.orphan_counts(DiskCost()) == (1, 200, 1, 300)
    assert index.orphan_counts(DiskCost(block=256, per_file=1)) == (1, 257, 1, 513)


def test_rows_survive_a_reopen(tmp_path: Path) -> None:
    """What was committed is there after the index is closed and opened again."""
    path = tmp_path / "index.sqlite3"
    first = SegmentIndex(path)
    with first.db.transaction():
        first.insert([(A, 10, 1.0)])
        first.keep([A], OWNER, S1, now=1.0)
    first.close()
    again = SegmentIndex(path)
    try:
        assert again.sizes() == {A: 10}
        assert again.referenced(A) and again.end_session(S1, None) == [A]
    finally:
        again.close()
