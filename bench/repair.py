"""Repair benchmark: time to restore r after a kill -9, and repair traffic per lost GiB.

Run by ``make bench`` after the transfer benchmark (or alone: ``python -m bench.repair``).
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import peer_status, start_network, stop_processes, token_of, write_results
from difs_p2p.client import Client
from difs_p2p.identity import Identity

MiB = 1 << 20
INTERVAL = 1.0
DEAD_AFTER = 3


async def run(root: Path, size: int, peers: int = 10) -> dict[str, Any]:
    procs, addresses = start_network(
        root, peers, "--repair-interval", str(INTERVAL), "--dead-after", str(DEAD_AFTER)
    )
    try:
        src = root / "src"
        with src.open("wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
        token = token_of(addresses[0])
        async with Client(addresses[0], publisher=Identity.generate(), token=token) as client:
            await client.put(src, "/repair/bench", replicas=3)
        victim = 1  # a peer other than the publisher's entry peer
        lost = (await peer_status(addresses[victim]))["storage"]["used"]
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait()
        killed_at = time.perf_counter()
        restored = None
        while time.perf_counter() - killed_at < 300:
            async with Client(addresses[0]) as client:
                ranges = (await client.stat("/repair/bench"))["ranges"]
            if all(r["live"] >= 3 for r in ranges):
                restored = time.perf_counter() - killed_at
                break
            await asyncio.sleep(0.25)
        traffic = 0
        for i, address in enumerate(addresses):
            if i != victim:
                traffic += (await peer_status(address))["maintenance"]["repair_bytes"]
        return {
            "object_bytes": size,
            "lost_bytes": lost,
            "seconds_to_restore_r": restored,
            "detection_bound_s": INTERVAL * DEAD_AFTER,
            "repair_bytes": traffic,
            "repair_bytes_per_lost_gib": traffic / lost * (1 << 30) if lost else None,
        }
    finally:
        stop_processes(procs)


def main() -> int:
    size = int(os.environ.get("DIFS_BENCH_MIB", "256")) * MiB
    with tempfile.TemporaryDirectory(prefix="difs-repair-") as tmp:
        result = asyncio.run(run(Path(tmp), size))
    for name, value in result.items():
        print(f"{name:<28}{value}")
    write_results("repair", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
