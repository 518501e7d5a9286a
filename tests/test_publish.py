"""The publish path's pure checks: who may publish a name, a placement that left a range
without a copy, what the entry peer's publish answer means, the tombstone, the source."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from difs_p2p.delegation import Delegation, build_delegation
from difs_p2p.errors import (
    AlreadyExistsError,
    CapacityError,
    DeletedError,
    NetworkError,
    PermissionDeniedError,
    UsageError,
)
from difs_p2p.manifest import Manifest, parse_manifest
from difs_p2p.ops import PlacedRange, PlaceReply, PublishReply
from difs_p2p.publish import (
    build_tombstone,
    check_placed,
    check_publish,
    check_published,
    read_and_hash,
    source_size,
)
from difs_p2p.segments import hash_list_root, segment_hash
from tests.signed import KEY, NAME, OWNER, STRANGER, V1, V2, WRITER, make

GRANT = build_delegation(OWNER, prefix="/a.com", writer=WRITER.public_key, expires=100.0)
TOMBSTONE = build_tombstone(OWNER, V2, 2, 50.0)
MINE = f"/key/{OWNER.fingerprint}/photo.jpg"


@pytest.mark.parametrize(
    ("name", "previous", "publisher", "delegation", "update", "now"),
    [
        (NAME, None, OWNER.public_key, None, False, 0.0),  # a new name
        (NAME, V2, OWNER.public_key, None, True, 0.0),  # a new version
        (NAME, TOMBSTONE, OWNER.public_key, None, False, 0.0),  # a deleted name, again
        (NAME, V2, WRITER.public_key, GRANT, True, 99.0),  # a delegate's new version
        (MINE, None, OWNER.public_key, None, False, 0.0),  # the owner's own namespace
    ],
)
def test_who_may_publish_a_name_publishes_it_for_its_owner(
    name: str,
    previous: Manifest | None,
    publisher: bytes,
    delegation: Delegation | None,
    update: bool,
    now: float,
) -> None:
    """An allowed publish returns the owner the name is published for."""
    owner = check_publish(name, previous, publisher, delegation, update, now)
    assert owner == OWNER.public_key


@pytest.mark.parametrize(
    ("name", "previous", "publisher", "delegation", "update", "now", "error", "message"),
    [
        (NAME, V2, OWNER.public_key, None, False, 0.0, AlreadyExistsError, "use --update"),
        (NAME, V2, STRANGER.public_key, None, True, 0.0, PermissionDeniedError, "another"),
        (NAME, V2, WRITER.public_key, GRANT, True, 101.0, PermissionDeniedError, "expired"),
        ("/b.com/x", None, WRITER.public_key, GRANT, False, 0.0, UsageError, "does not cover"),
        (NAME, None, STRANGER.public_key, GRANT, False, 0.0, UsageError, "not for this key"),
        (MINE, None, STRANGER.public_key, None, False, 0.0, PermissionDeniedError, "namespace"),
    ],
)
def test_a_publish_that_may_not_happen_says_why(
    name: str,
    previous: Manifest | None,
    publisher: bytes,
    delegation: Delegation | None,
    update: bool,
    now: float,
    error: type[Exception],
    message: str,
) -> None:
    """An existing name without update, another owner's name, an expired or foreign
    delegation and another key's namespace are refused with the matching error."""
    with pytest.raises(error, match=message):
        check_publish(name, previous, publisher, delegation, update, now)


def placed(*holders: tuple[str, ...], warnings: tuple[str, ...] = ()) -> PlaceReply:
    ranges = tuple(PlacedRange(4 * i, 4 * i + 3, h) for i, h in enumerate(holders))
    return PlaceReply((), ranges, warnings)


def test_a_placement_with_a_copy_of_every_range_passes() -> None:
    """Every range held somewhere (even once): no error."""
    check_placed(placed(("aa", "bb"), ("cc",)))
    check_placed(placed())


def test_a_range_without_any_copy_is_a_capacity_error() -> None:
    """A range no peer took fails the publish, naming the range and the peers' reasons."""
    with pytest.raises(CapacityError, match=r"segments 4\.\.7 .*disk full; busy"):
        check_placed(placed(("aa",), (), warnings=("disk full", "busy", "third")))
    with pytest.raises(CapacityError, match="no peer took them"):
        check_placed(placed((), ("aa",)))


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (PublishReply(3, V2.hash, 2, 2), None),  # read back on every path, ours won
        (PublishReply(3, V2.hash, 3, 2), None),
        (PublishReply(3, V2.hash, 0, 2), None),  # a winner read back is enough
        (PublishReply(3, None, 1, 2), NetworkError),  # not read back on enough paths
        (PublishReply(0, None, 0, 2), NetworkError),
        (PublishReply(3, V1.hash, 2, 2), AlreadyExistsError),  # another record won
        (PublishReply(3, None, 2, 2), AlreadyExistsError),  # read back, but no winner
    ],
)
def test_what_the_entry_peers_publish_answer_means(
    reply: PublishReply, error: type[Exception] | None
) -> None:
    """Published only if our record is the winner; too few readable paths is a
    NetworkError, another winner AlreadyExistsError."""
    if error is None:
        check_published(V2, reply)
    else:
        with pytest.raises(error):
            check_published(V2, reply)


def test_a_tombstone_is_the_owners_next_version_deleting_the_name() -> None:
    """The tombstone follows the highest version used, links to the current record, holds
    no segments, and parses as a valid manifest of the name."""
    tomb = build_tombstone(OWNER, V2, 5, 50.0)
    assert parse_manifest(tomb.raw, KEY) == tomb
    assert (tomb.deleted, tomb.version, tomb.parent, tomb.root) == (True, 6, V2.hash, V1.hash)
    assert (tomb.size, tomb.segment_count, tomb.created) == (0, 0, 50.0)
    assert tomb.integrity == hash_list_root(b"")
    assert build_tombstone(OWNER, V2, 1, 50.0).version == 3  # never below the current


def test_only_the_owner_deletes_and_only_once() -> None:
    """A stranger's delete is PermissionDenied; deleting a tombstone is DeletedError."""
    with pytest.raises(PermissionDeniedError):
        build_tombstone(STRANGER, V2, 2, 50.0)
    with pytest.raises(DeletedError):
        build_tombstone(OWNER, TOMBSTONE, 3, 60.0)
    delegated = make(WRITER, version=3, parent=V2, delegation=GRANT, created=50.0)
    with pytest.raises(PermissionDeniedError):
        build_tombstone(WRITER, delegated, 3, 60.0)  # the manifest's owner is OWNER


class Trickle(io.RawIOBase):
    """A pipe-like reader that returns at most 3 bytes per read."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        chunk, self.data = self.data[: min(size, 3)], self.data[min(size, 3) :]
        return chunk


def test_a_segment_is_read_whole_from_a_trickling_source() -> None:
    """Short reads go on until the segment is full or the input ends; each with its id."""
    source = Trickle(b"0123456789abc")
    assert read_and_hash(source, 8) == (b"01234567", bytes(segment_hash(b"01234567")))  # type: ignore[arg-type]
    assert read_and_hash(source, 8) == (b"89abc", bytes(segment_hash(b"89abc")))  # type: ignore[arg-type]
    assert read_and_hash(source, 8) == (b"", b"")  # type: ignore[arg-type]


def test_source_size_tells_files_from_streams_and_refuses_the_rest(tmp_path: Path) -> None:
    """A regular file has a size, a FIFO is a stream (None); a directory or a missing path
    is a UsageError."""
    regular = tmp_path / "f"
    regular.write_bytes(b"x" * 1234)
    assert source_size(regular) == 1234
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert source_size(fifo) is None
    with pytest.raises(UsageError, match="it is a directory"):
        source_size(tmp_path)
    with pytest.raises(UsageError, match="cannot read"):
        source_size(tmp_path / "missing")
