"""bench/torrent.py: libtorrent's fetch that ``make bench`` compares ``difs get`` with."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.torrent import MiB, libtorrent_fetch


@pytest.mark.parametrize("tuned", [True, False])
def test_libtorrent_fetch_copies_the_file(tmp_path: Path, tuned: bool) -> None:
    """A 4 MiB file (and a tail shorter than a piece) seeded and fetched between two sessions."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(4 * MiB + 12345))
    result = libtorrent_fetch(src, tuned=tuned, timeout=60.0)
    assert result["identical"] is True
    assert result["bytes"] == src.stat().st_size
    assert result["tuned"] is tuned
    assert result["seconds"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]  # the copy is gone


def test_libtorrent_fetch_past_its_time_limit_raises_and_cleans_up(tmp_path: Path) -> None:
    """A run out of time raises TimeoutError and leaves no copy behind."""
    src = tmp_path / "src.bin"
    src.write_bytes(os.urandom(MiB))
    with pytest.raises(TimeoutError):
        libtorrent_fetch(src, tuned=True, timeout=0.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src.bin"]
