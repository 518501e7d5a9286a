"""A fetch's verify-and-write of one segment in a worker thread (no sockets)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from difs_p2p.errors import IntegrityError
from difs_p2p.fetchrun import verify_and_write
from difs_p2p.segments import segment_hash

DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.mark.parametrize(
    ("skip", "length", "offset"),
    [
        (0, len(DATA), 0),  # a whole segment at the start of the file
        (0, len(DATA), 4096),  # at its offset
        (100, 50, 7),  # a span's piece of a segment
        (len(DATA) - 1, 1, 0),
    ],
)
def test_verify_and_write_writes_exactly_the_piece(
    tmp_path: Path, skip: int, length: int, offset: int
) -> None:
    """The piece ``skip``..``skip + length`` of a verified segment lands at ``offset``."""
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        verify_and_write(segment_hash(DATA), memoryview(DATA), skip, length, fd, offset)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(offset) + DATA[skip : skip + length]


def test_verify_and_write_writes_nothing_of_a_corrupt_segment(tmp_path: Path) -> None:
    """A segment that does not match its id raises IntegrityError and writes no byte."""
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    bad = bytearray(DATA)
    bad[5] ^= 1
    try:
        with pytest.raises(IntegrityError):
            verify_and_write(segment_hash(DATA), memoryview(bad), 0, len(bad), fd, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b""


def test_verify_and_write_without_an_id_only_writes(tmp_path: Path) -> None:
    """With no id (verified already, on the loop) the bytes are written as given."""
    path = tmp_path / "out"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        verify_and_write(None, b"abc", 1, 2, fd, 0)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"bc"
