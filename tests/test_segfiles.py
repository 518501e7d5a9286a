"""Segment files on a real directory: placement, crash-safe writes, reads, recovery of what
a crash leaves, quarantine and OS errors as package errors (the directory lock and bad
roots are tested through the store, in test_store.py)."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p.errors import CapacityError, NotFoundError, StorageError, UsageError
from difs_p2p.segfiles import SegmentFiles, blake3_digest, os_error


def seg(data: bytes) -> tuple[bytes, memoryview]:
    """A segment: its id (the BLAKE3 of its bytes) and its bytes."""
    return blake3_digest(data), memoryview(data)


@pytest.fixture
def files(tmp_path: Path) -> Iterator[SegmentFiles]:
    f = SegmentFiles(tmp_path / "store")
    yield f
    f.close()


def write(files: SegmentFiles, *blobs: bytes) -> list[bytes]:
    ids = [blake3_digest(b) for b in blobs]
    files.write_all(ids, {i: memoryview(b) for i, b in zip(ids, blobs, strict=True)}, [])
    return ids


def test_a_segment_lives_two_fan_out_levels_under_its_hex_id(files: SegmentFiles) -> None:
    """The path is segments/ab/cd/abcd... from the id alone."""
    seg_id = bytes.fromhex("abcd" + "00" * 30)
    assert files.path(seg_id) == files.segments / "ab" / "cd" / seg_id.hex()


def test_written_segments_are_in_place_and_tmp_is_empty(files: SegmentFiles) -> None:
    """write_all renames every file into place, lists each path placed, leaves no temp file."""
    (a, da), (b, db) = seg(b"alpha" * 100), seg(b"beta")
    placed: list[str] = []
    files.write_all([a, b], {a: da, b: db}, placed)
    assert placed == [str(files.path(a)), str(files.path(b))]
    assert files.path(a).read_bytes() == b"alpha" * 100
    assert files.locate(b) == (files.path(b), 4)
    assert list(files.tmp.iterdir()) == []


def test_a_failed_write_raises_storage_error_and_keeps_the_placed_list(
    files: SegmentFiles,
) -> None:
    """A segment that cannot be written is a StorageError; those written before it are in
    ``placed`` for the caller to remove, and no temporary file is left."""
    (a, da), (b, db) = seg(b"first"), seg(b"second")
    blocker = files.segments / b.hex()[:2]
    assert a.hex()[:2] != b.hex()[:2]  # the block hits b only
    blocker.write_bytes(b"a file where a directory belongs")
    placed: list[str] = []
    with pytest.raises(StorageError, match="writing segment"):
        files.write_all([a, b], {a: da, b: db}, placed)
    assert placed == [str(files.path(a))]
    assert list(files.tmp.iterdir()) == []


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        (0, None, b"0123456789"),
        (3, 4, b"3456"),
        (8, 100, b"89"),  # a length past the end is cut at the end
        (10, None, b""),  # at the end: nothing
        (10, 5, b""),
    ],
)
def test_reads_return_the_asked_part_size_and_inode(
    files: SegmentFiles, offset: int, length: int | None, expected: bytes
) -> None:
    """read gives the bytes from offset (up to length), the file's size and inode."""
    (seg_id,) = write(files, b"0123456789")
    data, size, inode = files.read(seg_id, offset, length)
    assert (data, size, inode) == (expected, 10, files.path(seg_id).stat().st_ino)


def test_reads_past_the_end_or_of_absent_segments_are_refused(files: SegmentFiles) -> None:
    """An offset past the end is a UsageError; a segment with no file is NotFoundError."""
    (seg_id,) = write(files, b"0123456789")
    with pytest.raises(UsageError, match="past the end"):
        files.read(seg_id, 11, None)
    absent = blake3_digest(b"absent")
    with pytest.raises(NotFoundError):
        files.read(absent, 0, None)
    with pytest.raises(NotFoundError):
        files.locate(absent)
    assert files.hash_file(absent) is None
    files.unlink(absent)  # nothing to delete is no error


def test_hash_file_gives_inode_and_blake3(files: SegmentFiles) -> None:
    """hash_file rehashes the file as it is on disk, damage included."""
    (seg_id,) = write(files, b"x" * 5000)
    assert files.hash_file(seg_id) == (files.path(seg_id).stat().st_ino, seg_id)
    files.path(seg_id).write_bytes(b"y" * 5000)
    _, digest = files.hash_file(seg_id) or (0, b"")
    assert digest == blake3_digest(b"y" * 5000) != seg_id
    files.unlink(seg_id)
    assert not files.path(seg_id).exists()


def test_recover_reconciles_files_with_the_index(files: SegmentFiles) -> None:
    """Partial writes are deleted; a complete unindexed file is returned to index; a wrong
    size, a file not matching its name or a misplaced file is quarantined; an indexed
    segment without a file is dropped; a good indexed file is left alone."""
    good, unindexed, short, forged, lost = (blake3_digest(bytes([i]) * 64) for i in range(5))
    write(files, bytes([0]) * 64, bytes([1]) * 64, bytes([2]) * 64)
    (files.tmp / "partial.123").write_bytes(b"half a segm")
    (files.tmp / "leftover-dir").mkdir()
    forged_path = files.path(forged)
    forged_path.parent.mkdir(parents=True, exist_ok=True)
    forged_path.write_bytes(b"not the bytes this name promises")
    stray = files.segments / "stray.txt"
    stray.write_bytes(b"?")
    indexed = {good: 64, short: 63, lost: 64}
    added, dropped = files.recover(indexed)
    assert added == [(unindexed, 64)]
    assert sorted(dropped) == sorted([short, lost])
    assert list(files.tmp.iterdir()) == []
    assert files.path(good).exists() and files.path(unindexed).exists()
    assert not files.path(short).exists() and not forged_path.exists() and not stray.exists()
    quarantined = sorted(p.name.split(".")[0] for p in files.quarantine_dir.iterdir())
    assert quarantined == sorted([short.hex(), forged.hex(), "stray"])


def test_quarantine_leaves_a_file_written_since_alone(files: SegmentFiles) -> None:
    """A file whose inode changed since it was found damaged is a new copy: kept."""
    (seg_id,) = write(files, b"payload")
    old_inode = files.path(seg_id).stat().st_ino
    write(files, b"payload")  # rewritten: a new file renamed over the old one
    assert files.path(seg_id).stat().st_ino != old_inode
    assert files.quarantine(seg_id, old_inode, "damaged") is False
    assert files.path(seg_id).exists()
    assert files.quarantine(seg_id, None, "damaged") is True
    assert not files.path(seg_id).exists()
    assert len(list(files.quarantine_dir.iterdir())) == 1
    assert files.quarantine(seg_id, None, "damaged again") is True  # already gone


@pytest.mark.parametrize(
    ("code", "error"),
    [
        (errno.ENOSPC, CapacityError),
        (errno.EDQUOT, CapacityError),
        (errno.EIO, StorageError),
        (errno.EACCES, StorageError),
    ],
)
def test_os_errors_become_capacity_or_storage_errors(code: int, error: type[Exception]) -> None:
    """No space (or quota) is a CapacityError; any other OS error a StorageError."""
    translated = os_error(OSError(code, os.strerror(code)), "doing a thing")
    assert type(translated) is error
    assert "doing a thing" in str(translated)
