"""What a segment is charged against a store's capacity (pure rule, and its SQL twin)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from difs_p2p.diskcost import DiskCost
from difs_p2p.errors import StorageError, UsageError

SIZES = [0, 1, 8, 511, 512, 4095, 4096, 4097, 8192, (1 << 20) + 1]


@pytest.mark.parametrize(
    ("cost", "charges"),
    [
        (DiskCost(), SIZES),  # the bytes alone
        (DiskCost(512, 0), [0, 512, 512, 512, 512, 4096, 4096, 4608, 8192, (1 << 20) + 512]),
        (
            DiskCost(4096, 4096),
            [4096, 8192, 8192, 8192, 8192, 8192, 8192, 12288, 12288, (1 << 20) + 8192],
        ),
        (DiskCost(1, 100), [s + 100 for s in SIZES]),
    ],
)
def test_a_segment_is_charged_whole_blocks_plus_one_per_file(
    cost: DiskCost, charges: list[int]
) -> None:
    """The size rounds up to the block, then per_file is added: 8 bytes cost 8 KiB on 4 KiB."""
    assert [cost.charge(size) for size in SIZES] == charges


@pytest.mark.parametrize("cost", [DiskCost(), DiskCost(512, 0), DiskCost(4096, 4096)])
def test_the_sql_sum_agrees_with_the_charges(cost: DiskCost) -> None:
    """What the index sums on open is what the store charged segment by segment."""
    db = sqlite3.connect(":memory:")
    db.execute("CREATE TABLE segments(size INTEGER)")
    expression, params = cost.sql_sum()
    assert db.execute(f"SELECT {expression} FROM segments", params).fetchone() == (0,)
    db.executemany("INSERT INTO segments VALUES(?)", [(s,) for s in SIZES])
    total = db.execute(f"SELECT {expression} FROM segments", params).fetchone()[0]
    assert total == sum(cost.charge(s) for s in SIZES)
    db.close()


@pytest.mark.parametrize(("block", "per_file"), [(0, 0), (-1, 0), (1, -1)])
def test_a_cost_needs_a_positive_block_and_no_negative_overhead(block: int, per_file: int) -> None:
    """A block under 1 or a negative per-file cost is a UsageError."""
    with pytest.raises(UsageError):
        DiskCost(block, per_file)


def test_the_file_systems_cost_is_its_block_twice(tmp_path: Path) -> None:
    """A real file system charges at least 512-byte blocks, plus one block per file."""
    measured = DiskCost.of_filesystem(tmp_path)
    assert measured.block >= 512 and measured.per_file == measured.block
    with pytest.raises(StorageError, match="cannot measure"):
        DiskCost.of_filesystem(tmp_path / "missing")
