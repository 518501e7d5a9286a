"""The segment store: atomic writes, capacity, recovery on open, verification and refs."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import blake3
import pytest

from difs_p2p import segfiles
from difs_p2p import store as store_module
from difs_p2p.diskcost import DiskCost
from difs_p2p.errors import (
    CapacityError,
    IntegrityError,
    NotFoundError,
    StorageError,
    UsageError,
)
from difs_p2p.store import SegmentStore


def seg(tag: int, size: int = 1000) -> tuple[bytes, bytes]:
    """A deterministic segment ``(id, data)`` of ``size`` bytes, different for each tag."""
    data = (tag.to_bytes(4, "big") * (size // 4 + 1))[:size]
    return blake3.blake3(data).digest(), data


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


def flip_byte(path: Path, at: int = 0) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def store(root: Path) -> Iterator[SegmentStore]:
    s = SegmentStore(root, 1 << 20)
    yield s
    s.close()


def simulate_full_disk(monkeypatch: pytest.MonkeyPatch, s: SegmentStore) -> None:
    """Make the store's file writes fail with ENOSPC after writing part of the file."""

    def write_then_fail(tmp: str, data: memoryview) -> None:
        Path(tmp).write_bytes(bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(s._files, "write_file", write_then_fail)


# -- writing and reading ----------------------------------------------------------------------


def test_put_then_read_roundtrip(store: SegmentStore, root: Path) -> None:
    """A stored segment reads back byte for byte and is accounted for."""
    seg_id, data = seg(1)
    assert store.put(seg_id, data) is True
    assert store.read(seg_id) == data
    assert store.has(seg_id)
    assert store.size_of(seg_id) == len(data)
    h = seg_id.hex()
    assert store.path_of(seg_id) == root / "segments" / h[:2] / h[2:4] / h
    assert store.path_of(seg_id).read_bytes() == data
    assert (store.used, store.count) == (len(data), 1)


def test_put_accepts_memoryview(store: SegmentStore) -> None:
    """A memoryview is stored like bytes."""
    seg_id, data = seg(2)
    assert store.put(seg_id, memoryview(data)) is True
    assert store.read(seg_id) == data


def test_second_put_is_a_no_op(store: SegmentStore) -> None:
    """Storing a segment again returns False and counts its bytes once."""
    seg_id, data = seg(1)
    assert store.put(seg_id, data) is True
    assert store.put(seg_id, data) is False
    assert (store.used, store.count) == (len(data), 1)


def test_empty_segment(store: SegmentStore) -> None:
    """The empty segment is stored and read like any other."""
    seg_id, data = seg(0, size=0)
    assert store.put(seg_id, data) is True
    assert store.read(seg_id) == b""


def test_partial_reads(store: SegmentStore) -> None:
    """Ranges read the right bytes; a range running past the end is cut short."""
    seg_id, data = seg(3)
    store.put(seg_id, data)
    assert store.read(seg_id, 10, 20) == data[10:30]
    assert store.read(seg_id, 990, 100) == data[990:]
    assert store.read(seg_id, 500) == data[500:]
    assert store.read(seg_id, len(data)) == b""
    with pytest.raises(UsageError, match="past the end"):
        store.read(seg_id, len(data) + 1)
    with pytest.raises(UsageError):
        store.read(seg_id, -1)


def test_wrong_hash_refused_and_nothing_written(store: SegmentStore, root: Path) -> None:
    """Data that does not hash to the id is refused and leaves no file, not even in tmp/."""
    seg_id, _ = seg(1)
    _, other = seg(2)
    with pytest.raises(IntegrityError):
        store.put(seg_id, other)
    assert files_under(root / "segments") == []
    assert files_under(root / "tmp") == []
    assert not store.has(seg_id)
    assert (store.used, store.count) == (0, 0)


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_ids_must_be_32_bytes(store: SegmentStore, size: int) -> None:
    """Every method refuses an id that is not 32 bytes."""
    bad = b"\x01" * size
    calls: list[Callable[[], object]] = [
        lambda: store.put(bad, b""),
        lambda: store.has(bad),
        lambda: store.size_of(bad),
        lambda: store.path_of(bad),
        lambda: store.read(bad),
        lambda: store.add_ref(bad, b"o"),
        lambda: store.delete(bad),
    ]
    for call in calls:
        with pytest.raises(UsageError, match="32 bytes"):
            call()


def test_missing_segment_is_not_found(store: SegmentStore) -> None:
    """Lookups of a segment that is not stored raise NotFoundError; delete frees nothing."""
    seg_id, _ = seg(9)
    assert not store.has(seg_id)
    for call in (store.size_of, store.path_of, store.read, store.locate):
        with pytest.raises(NotFoundError):
            call(seg_id)
    assert store.delete(seg_id) == 0


# -- capacity ---------------------------------------------------------------------------------


def test_exact_fit_is_accepted(root: Path) -> None:
    """Segments that fill the capacity exactly are accepted."""
    a, b = seg(1, 600), seg(2, 400)
    with SegmentStore(root, 1000) as s:
        assert s.put(*a) and s.put(*b)
        assert s.used == s.capacity == 1000


def test_one_byte_over_is_refused(root: Path) -> None:
    """A segment one byte over the capacity is refused and ``used`` does not change."""
    a, b = seg(1, 600), seg(2, 401)
    with SegmentStore(root, 1000) as s:
        s.put(*a)
        with pytest.raises(CapacityError, match=r"no space: .*600/1000"):
            s.put(*b)
        assert (s.used, s.count) == (600, 1)
        assert not s.has(b[0])
        assert files_under(root / "tmp") == []
        assert len(files_under(root / "segments")) == 1


def test_negative_capacity_is_usage_error(root: Path) -> None:
    """A negative capacity is the caller's mistake."""
    with pytest.raises(UsageError):
        SegmentStore(root, -1)


def test_concurrent_puts_never_exceed_capacity(root: Path) -> None:
    """Eight threads racing to store 40 segments store exactly what fits, no more."""
    size, fits = 4096, 10
    segments = [seg(i, size) for i in range(40)]
    barrier = threading.Barrier(8)
    stored: list[bytes] = []
    refused: list[bytes] = []
    seen_used: list[int] = []
    record = threading.Lock()
    with SegmentStore(root, size * fits) as s:

        def worker(part: list[tuple[bytes, bytes]]) -> None:
            barrier.wait()
            for seg_id, data in part:
                try:
                    s.put(seg_id, data)
                    outcome = stored
                except CapacityError:
                    outcome = refused
                with record:
                    outcome.append(seg_id)
                    seen_used.append(s.used)

        threads = [threading.Thread(target=worker, args=(segments[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert (len(stored), len(refused)) == (fits, 40 - fits)
        assert max(seen_used) <= s.capacity
        assert s.used == s.capacity
        on_disk = files_under(root / "segments")
        assert sum(p.stat().st_size for p in on_disk) == s.used
        assert sorted(bytes.fromhex(p.name) for p in on_disk) == sorted(stored)


def test_concurrent_puts_of_one_segment_store_it_once(store: SegmentStore) -> None:
    """Eight threads storing the same segment: one stores it, the others see it stored."""
    seg_id, data = seg(5, 200_000)
    barrier = threading.Barrier(8)
    results: list[bool] = []

    def worker(n: int) -> None:
        barrier.wait()
        results.append(store.put(seg_id, data, owner=bytes([n])))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [False] * 7 + [True]
    assert (store.used, store.count) == (len(data), 1)
    for n in range(7):
        assert store.drop_refs(bytes([n])) == []
    assert store.drop_refs(bytes([7])) == [seg_id]


def test_full_disk_is_capacity_error(
    store: SegmentStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk (ENOSPC) is a CapacityError that leaves no tmp file and no change.

    The write is patched to fail: a really full disk cannot be made here without root mounts.
    """
    kept_id, kept = seg(1)
    store.put(kept_id, kept)
    simulate_full_disk(monkeypatch, store)
    seg_id, data = seg(2)
    with pytest.raises(CapacityError, match="no space left on the disk"):
        store.put(seg_id, data)
    assert files_under(root / "tmp") == []
    assert not store.has(seg_id)
    assert (store.used, store.count) == (len(kept), 1)
    assert store.read(kept_id) == kept
    monkeypatch.undo()
    assert store.put(seg_id, data) is True


def test_other_write_errors_are_storage_errors(
    store: SegmentStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An I/O error other than a full disk is a StorageError, cleaned up the same way."""

    def fail(tmp: str, data: memoryview) -> None:
        Path(tmp).write_bytes(b"x")
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(store._files, "write_file", fail)
    seg_id, data = seg(1)
    with pytest.raises(StorageError):
        store.put(seg_id, data)
    assert files_under(root / "tmp") == []
    assert store.used == 0


# -- put_many ---------------------------------------------------------------------------------


def test_put_many_stores_new_segments(store: SegmentStore) -> None:
    """put_many stores each new segment once and counts only the new ones."""
    first = seg(1)
    store.put(*first)
    batch = [first, seg(2), seg(3), seg(2)]
    assert store.put_many(batch, owner=b"owner") == 2
    assert store.count == 3
    assert store.used == 3000
    for seg_id, data in batch:
        assert store.read(seg_id) == data
    assert sorted(store.drop_refs(b"owner")) == sorted({first[0], seg(2)[0], seg(3)[0]})


def test_put_many_hashed_takes_the_callers_ids(
    store: SegmentStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """put_many(hashed=True) stores ids its caller computed without hashing again; a read
    still verifies them."""
    hashed: list[int] = []

    def counting(view: memoryview) -> bytes:
        hashed.append(len(view))
        return blake3.blake3(view).digest()

    monkeypatch.setattr(store_module, "blake3_digest", counting)
    batch = [seg(1), seg(2)]
    assert store.put_many(batch, owner=b"owner", hashed=True) == 2
    assert hashed == []
    assert store.put_many([seg(3)], owner=b"owner") == 1
    assert hashed == [1000]
    for seg_id, data in batch:
        assert store.read(seg_id) == data


def test_put_many_with_one_bad_hash_writes_nothing(store: SegmentStore, root: Path) -> None:
    """One item with a wrong hash refuses the whole batch before any write."""
    good = [seg(i) for i in range(5)]
    bad = (seg(99)[0], b"not it")
    with pytest.raises(IntegrityError, match="item 3"):
        store.put_many([*good[:3], bad, *good[3:]])
    assert files_under(root / "segments") == []
    assert (store.used, store.count) == (0, 0)


def test_put_many_over_capacity_writes_nothing(root: Path) -> None:
    """A batch that does not fit as a whole is refused before any write."""
    with SegmentStore(root, 2500) as s:
        with pytest.raises(CapacityError):
            s.put_many([seg(1), seg(2), seg(3)], owner=b"o")
        assert files_under(root / "segments") == []
        assert s.used == 0
        assert s.drop_refs(b"o") == []


def test_put_many_on_full_disk_leaves_nothing(
    store: SegmentStore, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch failing midway removes what it wrote (stand-in for a full disk, see above)."""
    calls = 0
    real_write = store._files.write_file

    def fail_third(tmp: str, data: memoryview) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_write(tmp, data)

    monkeypatch.setattr(store._files, "write_file", fail_third)
    with pytest.raises(CapacityError):
        store.put_many([seg(i) for i in range(5)])
    assert files_under(root / "segments") == []
    assert files_under(root / "tmp") == []
    assert (store.used, store.count) == (0, 0)


# -- recovery on open -------------------------------------------------------------------------


def test_reopen_keeps_segments_and_accounting(root: Path) -> None:
    """Segments, used and count survive closing and reopening."""
    segments = [seg(i) for i in range(4)]
    with SegmentStore(root, 10_000) as s:
        s.put_many(segments)
    with SegmentStore(root, 10_000) as s:
        assert (s.used, s.count) == (4000, 4)
        assert all(s.read(i) == d for i, d in segments)


def test_leftover_tmp_file_removed_on_reopen(root: Path) -> None:
    """A partial write left in tmp/ by a crash is deleted when the store opens."""
    SegmentStore(root, 10_000).close()
    (root / "tmp" / "partial").write_bytes(b"half a segment")
    (root / "tmp" / "dir").mkdir()
    with SegmentStore(root, 10_000) as s:
        assert list((root / "tmp").iterdir()) == []
        assert s.count == 0


def test_reopen_reindexes_file_without_row(root: Path) -> None:
    """A complete file whose row was lost (crash after rename) is rehashed and re-indexed."""
    seg_id, data = seg(1)
    with SegmentStore(root, 10_000) as s:
        s.put(seg_id, data)
        s._db.conn.execute("DELETE FROM segments")
    with SegmentStore(root, 10_000) as s:
        assert s.has(seg_id)
        assert (s.used, s.count) == (len(data), 1)
        assert s.read(seg_id) == data


def test_reopen_quarantines_unindexed_file_with_wrong_hash(root: Path) -> None:
    """A file without a row that does not match its name is quarantined, not indexed."""
    seg_id, _ = seg(1)
    h = seg_id.hex()
    SegmentStore(root, 10_000).close()
    (root / "segments" / h[:2] / h[2:4]).mkdir(parents=True)
    (root / "segments" / h[:2] / h[2:4] / h).write_bytes(b"garbage")
    with SegmentStore(root, 10_000) as s:
        assert not s.has(seg_id)
        assert s.used == 0
    assert files_under(root / "segments") == []
    assert [p.name.split(".")[0] for p in files_under(root / "quarantine")] == [h]


def test_reopen_quarantines_stray_files(root: Path) -> None:
    """Files that are not where a segment id would put them are moved to quarantine."""
    seg_id, data = seg(1)
    SegmentStore(root, 10_000).close()
    (root / "segments" / "stray").write_bytes(b"x")
    (root / "segments" / "00" / "00").mkdir(parents=True)
    (root / "segments" / "00" / "00" / seg_id.hex()).write_bytes(data)
    with SegmentStore(root, 10_000) as s:
        assert s.count == 0
    assert files_under(root / "segments") == []
    assert len(files_under(root / "quarantine")) == 2


def test_reopen_drops_row_without_file(root: Path) -> None:
    """A row whose file is gone is dropped on open, and the segment can be stored again."""
    gone, kept = seg(1), seg(2)
    with SegmentStore(root, 10_000) as s:
        s.put_many([gone, kept], owner=b"o")
        s.path_of(gone[0]).unlink()
    with SegmentStore(root, 10_000) as s:
        assert not s.has(gone[0])
        assert s.has(kept[0])
        assert (s.used, s.count) == (1000, 1)
        assert s.put(*gone) is True


def test_reopen_quarantines_indexed_file_of_wrong_size(root: Path) -> None:
    """An indexed file whose size changed (truncated) is quarantined on open."""
    seg_id, data = seg(1)
    with SegmentStore(root, 10_000) as s:
        s.put(seg_id, data)
        path = s.path_of(seg_id)
    path.write_bytes(data[:10])
    with SegmentStore(root, 10_000) as s:
        assert not s.has(seg_id)
        assert s.used == 0
    assert len(files_under(root / "quarantine")) == 1


def test_reopen_does_not_rehash_indexed_files(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a consistent store hashes nothing (it only lists and stats the files)."""
    with SegmentStore(root, 1 << 20) as s:
        s.put_many([seg(i) for i in range(20)])

    def no_hashing(fd: int) -> bytes:
        raise AssertionError("a file was rehashed on open")

    monkeypatch.setattr(segfiles, "hash_fd", no_hashing)
    with SegmentStore(root, 1 << 20) as s:
        assert s.count == 20


# -- verification -----------------------------------------------------------------------------


def test_read_detects_corruption_and_quarantines(store: SegmentStore, root: Path) -> None:
    """A flipped byte is caught by a whole read: quarantined, row dropped, others intact."""
    bad, good = seg(1), seg(2)
    store.put_many([bad, good])
    flip_byte(store.path_of(bad[0]), 500)
    assert store.read(bad[0], 0, 10) == bad[1][:10]  # a partial read cannot tell
    with pytest.raises(IntegrityError):
        store.read(bad[0])
    assert not store.has(bad[0])
    assert (store.used, store.count) == (1000, 1)
    assert store.read(good[0]) == good[1]
    assert len(files_under(root / "quarantine")) == 1
    assert store.put(*bad) is True
    assert store.read(bad[0]) == bad[1]


def test_read_without_verify_returns_damaged_bytes(store: SegmentStore) -> None:
    """verify=False returns the bytes as stored and leaves the segment in place."""
    seg_id, data = seg(1)
    store.put(seg_id, data)
    flip_byte(store.path_of(seg_id))
    assert store.read(seg_id, verify=False) != data
    assert store.has(seg_id)


def test_check_reports_corruption_without_fixing(store: SegmentStore) -> None:
    """check() rehashes everything and reports damage; without fix it changes nothing."""
    segments = [seg(i) for i in range(5)]
    store.put_many(segments)
    flip_byte(store.path_of(segments[2][0]))
    report = store.check()
    assert (report.checked, report.ok) == (5, 4)
    assert report.corrupt == [segments[2][0]]
    assert report.missing == []
    assert store.has(segments[2][0])


def test_check_fix_quarantines_corrupt_segments(store: SegmentStore, root: Path) -> None:
    """check(fix=True) quarantines damaged files and drops their rows; the rest survive."""
    segments = [seg(i) for i in range(5)]
    store.put_many(segments)
    flip_byte(store.path_of(segments[1][0]), 7)
    flip_byte(store.path_of(segments[3][0]), 999)
    report = store.check(fix=True)
    assert sorted(report.corrupt) == sorted([segments[1][0], segments[3][0]])
    assert (store.count, store.used) == (3, 3000)
    assert len(files_under(root / "quarantine")) == 2
    for i in (0, 2, 4):
        assert store.read(segments[i][0]) == segments[i][1]
    assert store.check() == store_module.CheckReport(3, 3, [], [])


def test_check_fix_drops_missing_segments(store: SegmentStore) -> None:
    """A file deleted behind the store's back is reported missing; fix forgets it."""
    seg_id, data = seg(1)
    store.put(seg_id, data)
    store.path_of(seg_id).unlink()
    assert store.check().missing == [seg_id]
    assert store.has(seg_id)
    assert store.check(fix=True).missing == [seg_id]
    assert not store.has(seg_id)
    assert store.used == 0
    assert store.put(seg_id, data) is True


# -- refs and deletion ------------------------------------------------------------------------


def test_drop_refs_returns_only_unreferenced_ids(store: SegmentStore) -> None:
    """drop_refs returns the owner's segments that no other owner references."""
    shared, only_a, only_b = seg(1), seg(2), seg(3)
    store.put_many([shared, only_a], owner=b"a")
    store.put(*only_b, owner=b"b")
    store.add_ref(shared[0], b"b")
    assert store.drop_refs(b"a") == [only_a[0]]
    assert store.drop_refs(b"a") == []
    assert sorted(store.drop_refs(b"b")) == sorted([shared[0], only_b[0]])
    assert store.count == 3  # dropping refs never deletes


def test_drop_refs_of_last_owner(store: SegmentStore) -> None:
    """When the last owner drops its refs every one of its segments is returned."""
    a, b = seg(1), seg(2)
    store.put_many([a, b], owner=b"x")
    store.add_ref(a[0], b"y")
    assert store.drop_refs(b"x") == [b[0]]
    assert store.drop_refs(b"y") == [a[0]]


def test_add_ref_needs_a_stored_segment(store: SegmentStore) -> None:
    """A ref can only be added to a segment that is stored."""
    with pytest.raises(NotFoundError):
        store.add_ref(seg(1)[0], b"o")


def test_delete_frees_bytes_and_refs(store: SegmentStore) -> None:
    """delete removes the file, the row and the refs, and returns the bytes freed."""
    a, b = seg(1, 700), seg(2, 300)
    store.put_many([a, b], owner=b"o")
    path = store.path_of(a[0])
    assert store.delete(a[0]) == 700
    assert not path.exists()
    assert not store.has(a[0])
    assert (store.used, store.count) == (300, 1)
    assert store.delete(a[0]) == 0
    assert store.drop_refs(b"o") == [b[0]]


# -- the directory ----------------------------------------------------------------------------


def test_layout_on_disk(store: SegmentStore, root: Path) -> None:
    """The store creates its directories and index under root."""
    for sub in ("segments", "tmp", "quarantine"):
        assert (root / sub).is_dir()
    assert (root / "index.sqlite3").is_file()


NOBODY = 65534  # the unprivileged user of Debian and most Linux systems


@contextlib.contextmanager
def _unprivileged(path: Path) -> Iterator[None]:
    """Run the block as an ordinary user that owns ``path``: as root (CI, containers)
    directory permissions would not apply. The effective uid is restored afterwards."""
    if os.geteuid() != 0:
        yield
        return
    os.chown(path, NOBODY, NOBODY)
    os.setegid(NOBODY)
    os.seteuid(NOBODY)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_unwritable_root_is_storage_error() -> None:
    """A directory the store cannot write to is refused with a StorageError (as root too:
    the store is opened as an ordinary user owning a read-only directory)."""
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)  # an ordinary user may reach the directory inside
        root = base / "ro"
        root.mkdir()
        root.chmod(0o500)
        with _unprivileged(root), pytest.raises(StorageError, match="writable directory"):
            SegmentStore(root, 1000)
        assert os.geteuid() == os.getuid()
        assert list(root.iterdir()) == []  # nothing was created in it
    finally:
        (base / "ro").chmod(0o700)
        shutil.rmtree(base)


def test_root_that_is_a_file_is_storage_error(tmp_path: Path) -> None:
    """A root path that is a regular file is refused with a StorageError."""
    root = tmp_path / "file"
    root.write_bytes(b"")
    with pytest.raises(StorageError, match="writable directory"):
        SegmentStore(root, 1000)


def test_second_open_of_one_directory_is_refused(store: SegmentStore, root: Path) -> None:
    """Only one store object may use a directory at a time (opening empties tmp/)."""
    with pytest.raises(StorageError, match="already open"):
        SegmentStore(root, 1000)
    store.close()
    SegmentStore(root, 1000).close()


def test_closed_store_refuses_calls(root: Path) -> None:
    """After close, calls raise UsageError; close itself may be repeated."""
    s = SegmentStore(root, 1000)
    seg_id, data = seg(1)
    s.close()
    s.close()
    with pytest.raises(UsageError, match="closed"):
        s.put(seg_id, data)
    with pytest.raises(UsageError, match="closed"):
        s.has(seg_id)


# -- disk cost, upload sessions and orphans ---------------------------------------------------


def test_tiny_segments_are_refused_at_their_disk_cost(root: Path) -> None:
    """Capacity counts what tiny segments cost on disk, not their bytes."""
    cost = DiskCost(4096, 4096)
    with SegmentStore(root, 10 * 8192, cost=cost) as s:
        for tag in range(10):
            s.put(*seg(tag, 8))
        assert (s.used, s.count) == (10 * 8192, 10)
        with pytest.raises(CapacityError):
            s.put(*seg(10, 8))
        assert s.delete(seg(0, 8)[0]) == 8192
    with SegmentStore(root, 10 * 8192, cost=cost) as s:
        assert (s.used, s.count) == (9 * 8192, 9)  # reloaded as charged


def test_ending_a_session_deletes_what_nothing_else_keeps(store: SegmentStore) -> None:
    """A session's segments go when it ends, except those a ref or another session keeps."""
    held, shared, alone = seg(1), seg(2), seg(3)
    for item in (held, shared, alone):
        store.put(*item, session=b"s1")
    store.put(*shared, session=b"s2")  # sent again by another upload
    store.add_refs([held[0]], b"holding")
    assert store.orphans() == store_module.Orphans(2, 2000, 0, 0)
    assert store.end_session(b"s1") == 1000
    assert [store.has(i[0]) for i in (held, shared, alone)] == [True, True, False]
    assert store.end_session(b"s2", [shared[0]]) == 1000
    assert not store.has(shared[0]) and store.has(held[0])
    assert store.orphans() == store_module.Orphans(0, 0, 0, 0)


def test_add_refs_is_all_or_nothing(store: SegmentStore) -> None:
    """Refs for a range are added only if every segment of it is stored."""
    a, b = seg(1), seg(2)
    store.put(*a, session=b"s")
    with pytest.raises(NotFoundError):
        store.add_refs([a[0], b[0]], b"o")
    store.end_session(b"s")
    assert not store.has(a[0])


def test_orphans_are_collected_after_the_grace_and_pending_rows_end_with_the_process(
    root: Path,
) -> None:
    """Unreferenced segments go once older than the cut-off; a reopen ends every session."""
    with SegmentStore(root, 1 << 20) as s:
        s.put(*seg(1), session=b"live")
        s.put(*seg(2), session=b"gone")
        s.put(*seg(3))
        s.put(*seg(4), owner=b"holding")
        assert s.collect_orphans(time.time() + 1, live=[b"live", b"gone"]) == (1, 1000)
        assert s.orphans() == store_module.Orphans(2, 2000, 0, 0)
        assert s.collect_orphans(0.0) == (0, 0)  # nothing stored before the cut-off
        assert s.collect_orphans(time.time() + 1, live=[b"live"]) == (1, 1000)
        assert s.has(seg(1)[0]) and not s.has(seg(2)[0])
    with SegmentStore(root, 1 << 20) as s:  # as after kill -9: no session survives
        assert s.orphans() == store_module.Orphans(0, 0, 1, 1000)
        assert s.collect_orphans(time.time() + 1, live=[b"live"]) == (1, 1000)
        assert (s.count, s.has(seg(4)[0])) == (1, True)


def test_release_spares_segments_an_upload_sent_again(store: SegmentStore) -> None:
    """Freeing a holding keeps a segment that an upload in progress has just sent again."""
    a, b = seg(1), seg(2)
    store.put(*a, owner=b"v1")
    store.put(*b, owner=b"v1")
    store.put(*a, session=b"upload")
    assert store.release(b"v1") == 1000
    assert store.has(a[0]) and not store.has(b[0])


# -- group commit ---------------------------------------------------------------------------


def test_grouped_puts_from_many_threads_are_written_in_groups(root: Path) -> None:
    """Eight threads storing 40 segments with put_grouped: every one stored and indexed
    with its session's pending row, and the ones that queued behind a group being written
    went to disk together (fewer groups than segments)."""
    segments = [seg(i, 4096) for i in range(40)]
    barrier = threading.Barrier(8)
    results: list[bool] = []
    queued = threading.Event()
    groups: list[int] = []

    class Watched(list[object]):
        def append(self, item: object) -> None:
            super().append(item)
            if len(self) >= 7:
                queued.set()

    with SegmentStore(root, 1 << 20) as s:
        real = s._commit_group

        def commit(items: list[store_module._Grouped]) -> list[bool | BaseException]:
            if not groups:
                queued.wait(5)  # the first group waits until the others queued
            groups.append(len(items))
            return real(items)

        s._group_queue = Watched()  # type: ignore[assignment]
        s._commit_group = commit  # type: ignore[method-assign]

        def worker(part: list[tuple[bytes, bytes]]) -> None:
            barrier.wait()
            for seg_id, data in part:
                results.append(s.put_grouped(seg_id, data, session=b"up"))

        threads = [threading.Thread(target=worker, args=(segments[i::8],)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert results == [True] * 40
        assert sum(groups) == 40 and len(groups) < 40
        assert (s.used, s.count) == (40 * 4096, 40)
        assert all(s.has(i) for i, _ in segments)
        assert s.orphans().pending == 40
        assert s.end_session(b"up") == 40 * 4096


@pytest.mark.parametrize(
    ("fail", "error"),
    [(errno.ENOSPC, CapacityError), (errno.EIO, StorageError)],
)
def test_a_grouped_put_that_fails_fails_alone(
    store: SegmentStore, root: Path, monkeypatch: pytest.MonkeyPatch, fail: int, error: type
) -> None:
    """In a group, a segment whose fdatasync fails gets its own error and leaves no file
    and no charge; a bad hash is refused before the group; the others are stored."""
    bad_id, bad = seg(7)
    real = os.fdatasync
    written: dict[int, str] = {}
    real_open = os.open

    def tracking_open(path: str, flags: int, mode: int = 0o777) -> int:
        fd = real_open(path, flags, mode)
        written[fd] = str(path)
        return fd

    def failing(fd: int) -> None:
        if written.get(fd, "").rsplit("/", 1)[-1].startswith(bad_id.hex()):
            raise OSError(fail, os.strerror(fail))
        real(fd)

    monkeypatch.setattr(os, "open", tracking_open)
    monkeypatch.setattr(os, "fdatasync", failing)
    good_id, good = seg(8)
    with pytest.raises(error):
        store.put_grouped(bad_id, bad)
    with pytest.raises(IntegrityError):
        store.put_grouped(good_id, bad)
    assert store.put_grouped(good_id, good) is True
    assert store.put_grouped(good_id, good) is False
    assert (store.used, store.count) == (len(good), 1)
    assert files_under(root / "tmp") == []
    assert [p.name for p in files_under(root / "segments")] == [good_id.hex()]
