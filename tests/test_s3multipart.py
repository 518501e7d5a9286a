"""MultipartStore: staged parts on disk, their index, the concatenation and its ETag, abort,
expiry, and what a crash, a full disk or a large part leave behind."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from difs_p2p.s3errors import S3Error
from difs_p2p.s3multipart import MultipartStore, Part, multipart_etag, part_segment_size
from difs_p2p.store import SegmentStore
from tests.helpers import wait_for, wait_for_sync


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


async def chunks_of(data: bytes, size: int = 64 << 10) -> AsyncIterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def read_all(store: MultipartStore, upload_id: str, numbers: list[int]) -> bytes:
    with store.reader(upload_id, numbers) as fh:
        return fh.read()


def files_of(root: Path) -> list[str]:
    """Every file under ``root`` but the index, relative."""
    return sorted(
        str(p.relative_to(root))
        for p in root.rglob("*")
        if p.is_file() and not p.name.startswith("index.sqlite3")
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(tmp_path: Path, clock: Clock) -> Iterator[MultipartStore]:
    s = MultipartStore(tmp_path / "s3-uploads", expire_after=100.0, clock=clock)
    yield s
    s.close()


async def test_parts_read_back_as_their_concatenation(store: MultipartStore) -> None:
    """Parts put in any order are listed by number and read back concatenated in the
    order asked, each with its MD5 as ETag."""
    upload_id = store.create("a.com", "dir/izone.mp4", "AKID", {"content-type": "video/mp4"})
    data = {1: os.urandom(3 << 20), 2: os.urandom(5000), 3: b"tail"}
    for number in (3, 1, 2):
        part = await store.put_part(upload_id, number, chunks_of(data[number]))
        assert part.etag == hashlib.md5(data[number]).hexdigest()
        assert part.size == len(data[number])
    assert [(p.number, p.size) for p in store.parts(upload_id)] == [
        (n, len(data[n])) for n in (1, 2, 3)
    ]
    assert read_all(store, upload_id, [1, 2, 3]) == data[1] + data[2] + data[3]
    assert read_all(store, upload_id, [1, 3]) == data[1] + data[3]
    assert store.staged_bytes() == sum(map(len, data.values()))
    upload = store.get(upload_id)
    assert upload is not None
    assert (upload.bucket, upload.key, upload.access_key) == ("a.com", "dir/izone.mp4", "AKID")
    assert upload.meta == {"content-type": "video/mp4"}


async def test_memoryview_chunks_are_copied(store: MultipartStore) -> None:
    """A producer that reuses one buffer for every chunk still gets its bytes stored."""
    upload_id = store.create("a.com", "k", "AKID", {})
    buffer = bytearray(1000)

    async def reused() -> AsyncIterator[memoryview]:
        for fill in b"xyz":
            buffer[:] = bytes([fill]) * len(buffer)
            yield memoryview(buffer)

    await store.put_part(upload_id, 1, reused())
    assert read_all(store, upload_id, [1]) == b"x" * 1000 + b"y" * 1000 + b"z" * 1000


def test_multipart_etag_is_md5_of_the_part_digests() -> None:
    """``md5(concat of binary MD5s)-N``, computed independently and on a fixed example."""
    parts = [b"a" * 10, b"b" * 20, b""]
    digests = [hashlib.md5(p).digest() for p in parts]
    expected = hashlib.md5(b"".join(digests)).hexdigest() + "-3"
    assert multipart_etag(digests) == expected
    # golden: two parts "hello " and "world"
    assert (
        multipart_etag([hashlib.md5(b"hello ").digest(), hashlib.md5(b"world").digest()])
        == "e09e4fd6265b36115fe3db32df945d84-2"
    )


async def test_store_multipart_etag_uses_the_parts_asked(store: MultipartStore) -> None:
    """The store's ETag covers the listed parts in the listed order."""
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"one"))
    await store.put_part(upload_id, 2, chunks_of(b"two"))
    await store.put_part(upload_id, 5, chunks_of(b"five"))
    md5 = [hashlib.md5(b).digest() for b in (b"one", b"five")]
    assert store.multipart_etag(upload_id, [1, 5]) == (
        hashlib.md5(md5[0] + md5[1]).hexdigest() + "-2"
    )


async def test_reupload_replaces_a_part(store: MultipartStore, tmp_path: Path) -> None:
    """Putting a part number again replaces its bytes, ETag and count; one file stays."""
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"first version"))
    await store.put_part(upload_id, 2, chunks_of(b"other"))
    part = await store.put_part(upload_id, 1, chunks_of(b"second"))
    assert part == Part(1, hashlib.md5(b"second").hexdigest(), 6, part.modified)
    assert read_all(store, upload_id, [1, 2]) == b"secondother"
    assert store.staged_bytes() == 6 + 5
    assert len(files_of(tmp_path / "s3-uploads")) == 2


async def test_concurrent_parts(store: MultipartStore) -> None:
    """Parts written at the same time are all stored whole."""
    upload_id = store.create("a.com", "k", "AKID", {})
    data = {n: os.urandom((1 << 20) + n) for n in range(1, 9)}
    parts = await asyncio.gather(
        *(store.put_part(upload_id, n, chunks_of(d, 100_000)) for n, d in data.items())
    )
    assert [p.number for p in parts] == list(data)
    assert read_all(store, upload_id, list(data)) == b"".join(data.values())


@pytest.mark.parametrize(
    ("upload_id", "number", "code"),
    [
        ("known", 0, "InvalidArgument"),
        ("known", 10_001, "InvalidArgument"),
        ("known", -1, "InvalidArgument"),
        ("0" * 32, 1, "NoSuchUpload"),
        ("../../etc", 1, "NoSuchUpload"),
        ("", 1, "NoSuchUpload"),
    ],
)
async def test_bad_requests_are_refused(
    store: MultipartStore, upload_id: str, number: int, code: str
) -> None:
    """Part numbers outside 1-10,000 and unknown or malformed upload ids are refused."""
    known = store.create("a.com", "k", "AKID", {})
    with pytest.raises(S3Error) as err:
        await store.put_part(known if upload_id == "known" else upload_id, number, chunks_of(b"x"))
    assert err.value.code == code
    assert store.parts(known) == []


async def test_edges_of_the_part_numbers(store: MultipartStore) -> None:
    """Parts 1 and 10,000 are accepted."""
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"a"))
    await store.put_part(upload_id, 10_000, chunks_of(b"b"))
    assert [p.number for p in store.parts(upload_id)] == [1, 10_000]


async def test_a_part_too_large_leaves_nothing(tmp_path: Path) -> None:
    """A part past max_part_size is EntityTooLarge; no temporary stays, other parts do."""
    root = tmp_path / "up"
    store = MultipartStore(root, max_part_size=100_000)
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"k" * 100_000))
    with pytest.raises(S3Error) as err:
        await store.put_part(upload_id, 2, chunks_of(b"x" * 100_001, 1000))
    assert err.value.code == "EntityTooLarge"
    assert [p.number for p in store.parts(upload_id)] == [1]
    assert len(files_of(root)) == 1
    assert store.staged_bytes() == 100_000
    store.close()


async def test_staged_bytes_limit(tmp_path: Path) -> None:
    """A part that would take all staged bytes past max_staged is refused (503)."""
    store = MultipartStore(tmp_path / "up", max_staged=1000)
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"a" * 600))
    with pytest.raises(S3Error) as err:
        await store.put_part(upload_id, 2, chunks_of(b"b" * 600, 100))
    assert err.value.code == "ServiceUnavailable"
    assert store.staged_bytes() == 600
    assert read_all(store, upload_id, [1]) == b"a" * 600
    store.close()


async def test_reader_refuses_a_missing_part(store: MultipartStore) -> None:
    """Asking for a part that was never put is InvalidPart; an empty list MalformedXML."""
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"a"))
    for numbers, code in (([1, 2], "InvalidPart"), ([], "MalformedXML")):
        with pytest.raises(S3Error) as err:
            store.reader(upload_id, numbers)
        assert err.value.code == code
        with pytest.raises(S3Error):
            store.multipart_etag(upload_id, numbers)


async def test_uploads_listed_by_key_then_creation(store: MultipartStore, clock: Clock) -> None:
    """uploads() lists one bucket's uploads with the prefix, by key and then by creation."""
    made = []
    for key in ("b", "a/2", "a/1", "b", "c"):
        clock.now += 1
        made.append((key, store.create("a.com", key, "AKID", {})))
    store.create("other.com", "a/1", "AKID", {})
    listed = [(u.key, u.upload_id) for u in store.uploads("a.com")]
    assert listed == [made[2], made[1], made[0], made[3], made[4]]
    assert [u.key for u in store.uploads("a.com", "a/")] == ["a/1", "a/2"]
    assert store.uploads("none.com") == []


async def test_abort_removes_files(store: MultipartStore, tmp_path: Path) -> None:
    """remove() deletes the upload's files and rows; the upload is then unknown."""
    keep = store.create("a.com", "keep", "AKID", {})
    gone = store.create("a.com", "gone", "AKID", {})
    await store.put_part(keep, 1, chunks_of(b"kept"))
    await store.put_part(gone, 1, chunks_of(b"x" * 5000))
    await store.put_part(gone, 2, chunks_of(b"y"))
    store.remove(gone)
    assert store.get(gone) is None
    assert not (tmp_path / "s3-uploads" / gone).exists()
    await wait_for(lambda: not list(store.root.glob(".removed-*")), timeout=10)
    assert store.staged_bytes() == 4
    with pytest.raises(S3Error) as err:
        store.parts(gone)
    assert err.value.code == "NoSuchUpload"
    with pytest.raises(S3Error):
        store.remove(gone)
    assert read_all(store, keep, [1]) == b"kept"


async def test_a_reader_keeps_its_parts_after_remove(store: MultipartStore) -> None:
    """A stream opened before remove() reads the parts whole."""
    upload_id = store.create("a.com", "k", "AKID", {})
    await store.put_part(upload_id, 1, chunks_of(b"a" * 70_000))
    await store.put_part(upload_id, 2, chunks_of(b"b" * 10))
    with store.reader(upload_id, [1, 2]) as fh:
        store.remove(upload_id)
        assert fh.read() == b"a" * 70_000 + b"b" * 10


async def test_expire_after_the_grace_time_and_not_before(
    store: MultipartStore, clock: Clock, tmp_path: Path
) -> None:
    """An upload is expired expire_after its last activity (creation or newest part)."""
    old = store.create("a.com", "old", "AKID", {})
    clock.now += 50
    active = store.create("a.com", "active", "AKID", {})
    clock.now += 40
    await store.put_part(active, 1, chunks_of(b"z"))
    clock.now += 10  # old is 100 s old: not yet past the grace time
    assert await store.expire() == 0
    clock.now += 1
    assert await store.expire() == 1
    assert store.get(old) is None and not (tmp_path / "s3-uploads" / old).exists()
    assert store.get(active) is not None
    assert await store.expire(clock.now + 90) == 1
    assert store.get(active) is None
    assert store.staged_bytes() == 0


async def test_an_upload_removed_while_a_part_is_written(store: MultipartStore) -> None:
    """A part whose upload is removed before it is recorded is NoSuchUpload, and leaves
    no file behind."""
    upload_id = store.create("a.com", "k", "AKID", {})

    async def then_abort() -> AsyncIterator[bytes]:
        yield b"a" * (2 << 20)
        store.remove(upload_id)
        yield b"b"

    with pytest.raises(S3Error) as err:
        await store.put_part(upload_id, 1, then_abort())
    assert err.value.code == "NoSuchUpload"
    assert not (store.root / upload_id).exists()
    assert store.staged_bytes() == 0


async def test_expire_skips_an_upload_being_written(store: MultipartStore, clock: Clock) -> None:
    """An old upload with a part arriving is not expired under it."""
    upload_id = store.create("a.com", "k", "AKID", {})
    clock.now += 1000
    arrived = asyncio.Event()
    go_on = asyncio.Event()

    async def slow() -> AsyncIterator[bytes]:
        yield b"first"
        arrived.set()
        await go_on.wait()
        yield b"second"

    task = asyncio.create_task(store.put_part(upload_id, 1, slow()))
    await arrived.wait()
    assert await store.expire() == 0
    go_on.set()
    await task
    assert read_all(store, upload_id, [1]) == b"firstsecond"


def test_opening_removes_crash_leftovers(tmp_path: Path) -> None:
    """Opening deletes temporaries, files without a row, directories without an upload,
    and rows whose file is missing or shorter than recorded; the rest stays."""
    root = tmp_path / "up"
    store = MultipartStore(root)
    keep, damaged = store.create("a.com", "k", "AK", {}), store.create("a.com", "d", "AK", {})
    for upload_id in (keep, damaged):
        for number in (1, 2):
            asyncio.run(store.put_part(upload_id, number, chunks_of(b"%d" % number * 100)))
    store.close()
    (root / keep / ".tmp-3.0123456789abcdef").write_bytes(b"partial")
    (root / keep / "4.0123456789abcdef").write_bytes(b"renamed, never recorded")
    (root / ("f" * 32)).mkdir()
    (root / (".removed-" + "e" * 32)).mkdir()
    (root / (".removed-" + "e" * 32) / "1.0123456789abcdef").write_bytes(b"being deleted")
    (root / ("f" * 32) / "1.0123456789abcdef").write_bytes(b"no upload")
    one, two = sorted((root / damaged).iterdir())
    one.unlink()
    two.write_bytes(b"short")
    store = MultipartStore(root)
    assert [p.number for p in store.parts(keep)] == [1, 2]
    assert read_all(store, keep, [1, 2]) == b"1" * 100 + b"2" * 100
    assert store.parts(damaged) == []
    assert sorted(files_of(root)) == sorted(
        str(p.relative_to(root)) for p in (root / keep).iterdir()
    )
    assert len(files_of(root)) == 2
    assert store.staged_bytes() == 200
    store.close()


_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from difs_p2p.s3multipart import MultipartStore

    async def forever():
        yield b"x" * (3 << 20)
        yield b"y" * (1 << 20)
        print("writing", flush=True)
        await asyncio.Event().wait()

    store = MultipartStore(Path(sys.argv[1]))
    asyncio.run(store.put_part(sys.argv[2], 2, forever()))
    """
)


def test_kill_9_mid_part_leaves_other_parts_intact(tmp_path: Path) -> None:
    """A process killed while writing a part leaves a temporary, which the next open
    deletes; the parts stored before are intact."""
    root = tmp_path / "up"
    store = MultipartStore(root)
    upload_id = store.create("a.com", "k", "AK", {})
    first = os.urandom(300_000)
    asyncio.run(store.put_part(upload_id, 1, chunks_of(first)))
    store.close()
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(root), upload_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        assert [p.name for p in (root / upload_id).iterdir() if p.name.startswith(".tmp-")]
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    store = MultipartStore(root)
    assert [p.name for p in (root / upload_id).iterdir() if p.name.startswith(".")] == []
    assert [p.number for p in store.parts(upload_id)] == [1]
    assert read_all(store, upload_id, [1]) == first
    assert store.staged_bytes() == len(first)
    store.close()


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs (needs root and mount permission; skipped otherwise)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(disk)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


async def test_full_disk_mid_part(small_disk: Path) -> None:
    """ENOSPC while a part is written: ServiceUnavailable, its temporary deleted, the
    other parts and uploads intact, and a part that fits is accepted afterwards."""
    store = MultipartStore(small_disk / "up")
    upload_id = store.create("a.com", "k", "AK", {})
    other = store.create("a.com", "other", "AK", {})
    await store.put_part(upload_id, 1, chunks_of(b"1" * 200_000))
    await store.put_part(other, 1, chunks_of(b"o" * 1000))
    with pytest.raises(S3Error) as err:
        await store.put_part(upload_id, 2, chunks_of(b"2" * (4 << 20)))
    assert err.value.code == "ServiceUnavailable"
    assert "no space" in err.value.message
    assert [p.name for p in (small_disk / "up" / upload_id).iterdir() if "tmp" in p.name] == []
    assert read_all(store, upload_id, [1]) == b"1" * 200_000
    assert read_all(store, other, [1]) == b"o" * 1000
    assert store.staged_bytes() == 201_000
    await store.put_part(upload_id, 2, chunks_of(b"2" * 1000))
    assert read_all(store, upload_id, [1, 2]) == b"1" * 200_000 + b"2" * 1000
    store.close()


async def test_the_event_loop_runs_while_a_large_part_is_written(store: MultipartStore) -> None:
    """While a 64 MiB part is written, the loop keeps running other tasks between its
    chunks: the chunks come from a generator that never awaits, so a ticker task moves
    between them only because the writes go to a thread (each 1 MiB batch)."""
    upload_id = store.create("a.com", "big", "AK", {})
    block = os.urandom(256 << 10)
    ticks = 0
    seen: set[int] = set()
    stop = False

    async def ticker() -> None:
        nonlocal ticks
        while not stop:
            ticks += 1
            await asyncio.sleep(0)

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64 * 4):
            seen.add(ticks)
            yield block

    task = asyncio.create_task(ticker())
    part = await store.put_part(upload_id, 1, chunks())
    stop = True
    await task
    assert part.size == 64 << 20
    assert len(seen) >= 60, len(seen)


async def test_a_client_gone_mid_part_leaves_nothing(store: MultipartStore) -> None:
    """The source's own error (a connection reset) reaches the caller as it is, and the
    half-written part leaves no file and no bytes counted."""
    upload_id = store.create("a.com", "k", "AK", {})
    await store.put_part(upload_id, 1, chunks_of(b"kept"))

    async def cut() -> AsyncIterator[bytes]:
        yield b"x" * (3 << 20)
        raise ConnectionResetError("client went away")

    with pytest.raises(ConnectionResetError):
        await store.put_part(upload_id, 2, cut())
    assert len(list((store.root / upload_id).iterdir())) == 1
    assert store.staged_bytes() == 4


def test_text_that_is_not_utf8_is_refused(store: MultipartStore) -> None:
    """A key or metadata with a lone surrogate is InvalidArgument, not a database error."""
    for key, meta in (("bad\udc80", {}), ("k", {"x": "\ud800"})):
        with pytest.raises(S3Error) as err:
            store.create("a.com", key, "AK", meta)
        assert err.value.code == "InvalidArgument"
    assert store.uploads("a.com") == []
    assert store.uploads("a.com", "\udc80") == []


@pytest.mark.parametrize("checked_by", ["crc32c", "md5"])
@pytest.mark.parametrize("damage", ["flip", "truncate", "extend"])
async def test_a_part_damaged_on_disk_is_not_read(
    store: MultipartStore, tmp_path: Path, damage: str, checked_by: str
) -> None:
    """A part file changed since it was stored (a flipped byte, cut short, grown) makes
    the reader raise InvalidPart at that part; the part is dropped, the others stay. A
    part staged without a CRC32C (by an older version) is checked by its MD5."""
    upload_id = store.create("a.com", "k", "AK", {})
    await store.put_part(upload_id, 1, chunks_of(b"a" * 300_000))
    await store.put_part(upload_id, 2, chunks_of(b"b" * 300_000))
    if checked_by == "md5":
        with store.db.locked("test") as conn:
            conn.execute("UPDATE parts SET crc32c = NULL")
    (two,) = [p for p in (store.root / upload_id).iterdir() if p.name.startswith("2.")]
    body = bytearray(two.read_bytes())
    if damage == "flip":
        body[150_000] ^= 1
    elif damage == "truncate":
        del body[-1]
    else:
        body += b"b"
    two.write_bytes(bytes(body))
    with pytest.raises(S3Error) as err, store.reader(upload_id, [1, 2]) as fh:
        fh.read()
    assert err.value.code == "InvalidPart"
    assert err.value.extra["PartNumber"] == "2"
    assert [p.number for p in store.parts(upload_id)] == [1]
    assert not two.exists()
    assert store.staged_bytes() == 300_000
    assert read_all(store, upload_id, [1]) == b"a" * 300_000


async def test_an_index_without_crc32c_is_upgraded(tmp_path: Path, clock: Clock) -> None:
    """An index made before parts had a CRC32C opens with the column added; its parts
    read back (checked by their MD5) and new parts get a CRC32C."""
    root = tmp_path / "s3-uploads"
    store = MultipartStore(root, clock=clock)
    upload_id = store.create("a.com", "k", "AK", {})
    await store.put_part(upload_id, 1, chunks_of(b"old" * 1000))
    store.close()
    with sqlite3.connect(root / "index.sqlite3") as conn:
        conn.execute("ALTER TABLE parts DROP COLUMN crc32c")
    store = MultipartStore(root, clock=clock)
    try:
        await store.put_part(upload_id, 2, chunks_of(b"new"))
        with store.db.locked("test") as conn:
            crcs = conn.execute("SELECT number, crc32c FROM parts ORDER BY number").fetchall()
        assert crcs[0] == (1, None) and crcs[1][1] is not None
        assert read_all(store, upload_id, [1, 2]) == b"old" * 1000 + b"new"
    finally:
        store.close()


async def test_a_part_hashed_by_its_producer(store: MultipartStore) -> None:
    """A part whose producer gives its MD5 takes that as its ETag (not hashed again)."""
    upload_id = store.create("a.com", "k", "AK", {})
    part = await store.put_part(upload_id, 1, chunks_of(b"data"), md5=lambda: "ab" * 16)
    assert part.etag == "ab" * 16
    assert read_all(store, upload_id, [1]) == b"data"


async def test_an_empty_part(store: MultipartStore) -> None:
    """A part with no bytes is stored, with the MD5 of nothing, and reads as nothing."""
    upload_id = store.create("a.com", "k", "AK", {})
    part = await store.put_part(upload_id, 1, chunks_of(b""))
    await store.put_part(upload_id, 2, chunks_of(b"x"))
    assert (part.size, part.etag) == (0, hashlib.md5(b"").hexdigest())
    assert read_all(store, upload_id, [1, 2, 1]) == b"x"


async def test_the_same_part_twice_at_once(store: MultipartStore) -> None:
    """Two uploads of one part number at the same time leave one of them, whole, and one
    file; the staged bytes count it once."""
    upload_id = store.create("a.com", "k", "AK", {})
    one, two = b"1" * (3 << 20), b"2" * (2 << 20)
    await asyncio.gather(
        store.put_part(upload_id, 7, chunks_of(one)), store.put_part(upload_id, 7, chunks_of(two))
    )
    (part,) = store.parts(upload_id)
    assert read_all(store, upload_id, [7]) in (one, two)
    assert part.etag == hashlib.md5(read_all(store, upload_id, [7])).hexdigest()
    assert len(list((store.root / upload_id).iterdir())) == 1
    assert store.staged_bytes() == part.size


_SEGMENTS_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from difs_p2p.s3multipart import MultipartStore
    from difs_p2p.store import SegmentStore

    async def forever():
        yield b"x" * (5 << 20)
        yield b"y" * (3 << 20)
        print("writing", flush=True)
        await asyncio.Event().wait()

    segments = SegmentStore(Path(sys.argv[1]), 1 << 30)
    store = MultipartStore(Path(sys.argv[2]), segments=segments)
    asyncio.run(store.put_part(sys.argv[3], 2, forever()))
    """
)


def test_kill_9_mid_part_in_the_segment_store(tmp_path: Path) -> None:
    """Parts stored as segments: a process killed while storing one leaves segments that
    the next open releases; the part stored before stays whole until the upload expires,
    which leaves nothing in the segment store."""
    seg_root, root, clock = tmp_path / "store", tmp_path / "up", Clock()
    segments = SegmentStore(seg_root, 1 << 30)
    store = MultipartStore(root, segments=segments, expire_after=100.0, clock=clock)
    upload_id = store.create("a.com", "k", "AK", {})
    first = os.urandom(2 << 20)
    asyncio.run(store.put_part(upload_id, 1, chunks_of(first)))
    store.close()
    segments.close()
    child = subprocess.Popen(
        [sys.executable, "-c", _SEGMENTS_CHILD, str(seg_root), str(root), upload_id],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline().strip() == "writing"
        # the first batch of the part being written is stored
        wait_for_sync(lambda: len(files_of(seg_root / "segments")) > 2)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    segments = SegmentStore(seg_root, 1 << 30)
    assert segments.count > 2
    store = MultipartStore(root, segments=segments, expire_after=100.0, clock=clock)
    # a segment the kill left written but not indexed is an orphan: the peer's sweep
    # collects it after the grace time (here: now)
    segments.collect_orphans(time.time() + 1)
    assert segments.count == 2
    assert [p.number for p in store.parts(upload_id)] == [1]
    assert read_all(store, upload_id, [1]) == first
    clock.now += 101
    assert asyncio.run(store.expire()) == 1
    assert segments.count == 0 and segments.used == 0
    store.close()
    segments.close()


def test_segment_parts_stored_once_replaced_and_removed(tmp_path: Path) -> None:
    """Parts stored as segments: out of order and one uploaded again, they make one
    stored object (the replaced write freed); an unaligned middle part makes none but
    reads back; removing the upload frees every segment."""
    segments = SegmentStore(tmp_path / "store", 1 << 30)
    store = MultipartStore(tmp_path / "up", segments=segments, segment_size=1 << 20)
    upload_id = store.create("a.com", "k", "AK", {})
    data = {1: os.urandom(2 << 20), 2: os.urandom(1 << 20), 3: b"tail"}

    async def put_all() -> None:
        await store.put_part(upload_id, 1, chunks_of(os.urandom(3 << 20)))
        await asyncio.gather(*(store.put_part(upload_id, n, chunks_of(data[n])) for n in (3, 1, 2)))

    asyncio.run(put_all())
    assert segments.count == 4  # 2 + 1 + 1 segments, nothing of the replaced write
    stored = store.stored_object(upload_id, [1, 2, 3])
    assert stored is not None and stored.size == sum(map(len, data.values()))
    assert b"".join(segments.read(h) for h in stored.hashes) == data[1] + data[2] + data[3]
    assert store.stored_object(upload_id, [3, 1]) is None  # a 4-byte part in the middle
    assert read_all(store, upload_id, [3, 1]) == data[3] + data[1]
    asyncio.run(store.store_hash_list(upload_id, stored.hashes))
    assert segments.count == 5
    store.remove(upload_id)
    assert segments.count == 0
    store.close()
    segments.close()


@pytest.mark.parametrize(
    ("declared", "size"),
    [
        (None, 1 << 20),
        (0, 1 << 20),
        (8 << 20, 4 << 20),
        (64 << 20, 4 << 20),
        (6 << 20, 2 << 20),
        (5 << 20, 1 << 20),
        ((5 << 20) + 4099, 1 << 20),
        (1000, 1 << 20),
    ],
)
def test_part_segment_size(declared: int | None, size: int) -> None:
    """The first part's declared size chooses the largest power of two up to 4 MiB
    dividing it, 1 MiB when it divides nothing larger."""
    assert part_segment_size(declared) == size


def test_first_part_chooses_the_segment_size(tmp_path: Path) -> None:
    """The first part to arrive sets the upload's segment size; later parts keep it,
    whatever they declare."""
    segments = SegmentStore(tmp_path / "store", 1 << 30)
    store = MultipartStore(tmp_path / "up", segments=segments)
    upload_id = store.create("a.com", "k", "AK", {})
    one, two = os.urandom(8 << 20), os.urandom(5 << 20)
    asyncio.run(store.put_part(upload_id, 1, chunks_of(one), declared=len(one)))
    asyncio.run(store.put_part(upload_id, 2, chunks_of(two), declared=len(two)))
    assert segments.count == 2 + 2  # 4 MiB segments: 2 of part 1, 4 + 1 MiB of part 2
    stored = store.stored_object(upload_id, [1, 2])
    assert stored is not None and stored.segment_size == 4 << 20
    assert b"".join(segments.read(h) for h in stored.hashes) == one + two
    store.close()
    segments.close()
