"""What a segment is charged against a store's capacity: its disk cost (a pure rule; only
:meth:`DiskCost.of_filesystem` measures a file system, once, when a peer opens its store).

A peer charges each segment its size rounded up to the file system's block, plus one block
for its inode, directory entry, index rows and share of the fan-out directories, so that a
store full of tiny segments does not overrun the disk its capacity promises.
"""

from __future__ import annotations

import os
from pathlib import Path

from difs_p2p.classgen import valueclass
from difs_p2p.errors import StorageError, UsageError


@valueclass
class DiskCost:
    """What a segment of ``size`` bytes is charged against a store's capacity.

    ``block`` rounds the size up (a file occupies whole blocks), and ``per_file`` is added
    for what each file costs besides its data. The default charges the bytes alone;
    :meth:`of_filesystem` charges what a segment really costs on the disk under a path.
    """

    block: int = 1
    per_file: int = 0

    def __post_init__(self) -> None:
        if self.block < 1 or self.per_file < 0:
            raise UsageError("a disk cost needs block >= 1 and per_file >= 0")

    def charge(self, size: int) -> int:
        return -(-size // self.block) * self.block + self.per_file

    def sql_sum(self, column: str = "size") -> tuple[str, tuple[int, int, int, int]]:
        """The SQL expression (and its parameters) that sums :meth:`charge` over ``column``."""
        return (
            f"COALESCE(SUM(({column} + ? - 1) / ? * ? + ?), 0)",
            (self.block, self.block, self.block, self.per_file),
        )

    @classmethod
    def of_filesystem(cls, path: str | Path) -> DiskCost:
        """The cost rule of the file system holding ``path``: sizes rounded up to its block
        (``statvfs`` fragment size, 4096 on ext4 and tmpfs), plus one block per file for
        the inode (256 B on ext4), the directory entry, the index rows and the file's
        share of the fan-out directories (one block each, up to 65,792 of them).

        Measured on ext4: 8-byte segments take 8.5 KiB each at 10,000 segments (13.5 KiB
        at 1,000, when most of them need a new directory); they are charged 8 KiB.
        """
        try:
            st = os.statvfs(path)
        except OSError as exc:
            raise StorageError(f"cannot measure the file system of {path}: {exc}") from exc
        block = max(512, int(st.f_frsize or st.f_bsize or 4096))
        return cls(block, block)
