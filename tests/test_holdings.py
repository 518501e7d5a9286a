"""The holdings index (holdings.py): what this peer holds, across restarts."""

from __future__ import annotations

from pathlib import Path

import pytest

from difs_p2p.errors import AlreadyExistsError, StorageError
from difs_p2p.holdings import Holding, Holdings, holding_owner
from difs_p2p.manifest import Lineage
from difs_p2p.names import NameKey
from difs_p2p.segments import IntegrityRoot, SegmentId

KEY = NameKey(b"\x01" * 20)
OTHER = NameKey(b"\x02" * 20)
ROOT = IntegrityRoot(SegmentId(b"\x11" * 32))
LINEAGE = Lineage(b"\x33" * 32, "r" * 64, 1, "m" * 64)


def held(key: NameKey = KEY, version: int = 1, start: int = 0, end: int = 7) -> Holding:
    return Holding(key, version, ROOT, 16, start, end, 5.0)


@pytest.fixture
def db(tmp_path: Path) -> Holdings:
    return Holdings(tmp_path / "holdings.sqlite3")


def test_holdings_survive_a_restart(tmp_path: Path) -> None:
    """Rows written before a close are read back by a new Holdings on the same file."""
    path = tmp_path / "holdings.sqlite3"
    first = Holdings(path)
    first.add(held(start=0, end=7))
    first.add(held(start=8, end=15))
    first.close()
    again = Holdings(path)
    assert again.all() == [held(start=0, end=7), held(start=8, end=15)]
    again.close()


@pytest.mark.parametrize(
    ("key", "version", "start", "end", "covered"),
    [
        (KEY, 1, 0, 7, True),
        (KEY, 1, 2, 5, True),
        (KEY, 1, 0, 8, False),  # past the held range
        (KEY, 2, 0, 7, False),  # another version
        (OTHER, 1, 0, 7, False),  # another name
    ],
)
def test_covers_answers_for_one_holding(
    db: Holdings, key: NameKey, version: int, start: int, end: int, covered: bool
) -> None:
    """covers is true only when one holding of that name and version spans the range."""
    db.add(held(start=0, end=7))
    assert db.covers(key, version, start, end) is covered


def test_lookups_by_key_and_by_range(db: Holdings) -> None:
    """of_key lists a name's holdings by version and start; get finds one range."""
    db.add(held(version=2, start=0))
    db.add(held(version=1, start=8, end=15))
    db.add(held(version=1, start=0))
    db.add(held(key=OTHER))
    assert [(h.version, h.start) for h in db.of_key(KEY)] == [(1, 0), (1, 8), (2, 0)]
    assert db.get(KEY, 1, 8) == held(version=1, start=8, end=15)
    assert db.get(KEY, 3, 0) is None


def test_remove_forgets_one_range(db: Holdings) -> None:
    """Removing a holding leaves the name's other ranges."""
    db.add(held(start=0, end=7))
    db.add(held(start=8, end=15))
    db.remove(held(start=0, end=7))
    assert db.all() == [held(start=8, end=15)]


def test_a_bound_lineage_is_kept_and_guards_its_range(db: Holdings) -> None:
    """Once bound, a re-hold keeps the lineage and other bytes under it are refused."""
    db.add(held())
    assert db.bind(KEY, 1, ROOT, LINEAGE) == 1
    db.add(held())
    (h,) = db.all()
    assert h.lineage == LINEAGE
    with pytest.raises(AlreadyExistsError):
        db.add(Holding(KEY, 1, IntegrityRoot(SegmentId(b"\x99" * 32)), 16, 0, 7, 6.0))


def test_owner_tag_names_the_range() -> None:
    """A holding's segment owner tag is key, version (8 bytes) and start (4 bytes)."""
    assert (
        held(start=8).owner
        == holding_owner(KEY, 1, 8)
        == KEY + (1).to_bytes(8, "big") + (8).to_bytes(4, "big")
    )


def test_an_unusable_file_is_a_storage_error(tmp_path: Path) -> None:
    """A path sqlite cannot open is reported as StorageError, not sqlite3.Error."""
    with pytest.raises(StorageError):
        Holdings(tmp_path / "missing-dir" / "holdings.sqlite3")
