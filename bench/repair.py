"""Repair benchmark: time to restore r after a kill -9, and repair traffic per lost GiB.

Run by ``make bench`` after the transfer benchmark (or alone: ``python -m bench.repair``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from difs_p2p.client import Client
from difs_p2p.identity import Identity

MiB = 1 << 20
INTERVAL = 1.0
DEAD_AFTER = 3


def start(data: Path, seed: str | None) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    cmd = [
        str(Path(sys.executable).with_name("difs-peer")),
        "join",
        "--data",
        str(data),
        "--capacity",
        "64GiB",
        "--repair-interval",
        str(INTERVAL),
        "--dead-after",
        str(DEAD_AFTER),
    ]
    if seed:
        cmd += ["--bootstrap", seed]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    host, port = dict(p.split("=", 1) for p in line.split()[2:])["address"].split(":")
    return proc, (host, int(port))


async def status(address: tuple[str, int]) -> dict[str, Any]:
    from difs_p2p.transfer import Connection

    conn = await Connection.open(address, io_timeout=10)
    try:
        return await conn.call("status")
    finally:
        conn.close()


async def run(root: Path, size: int, peers: int = 10) -> dict[str, Any]:
    procs: list[subprocess.Popen[str]] = []
    addresses: list[tuple[str, int]] = []
    for i in range(peers):
        seed = f"{addresses[0][0]}:{addresses[0][1]}" if addresses else None
        proc, address = start(root / f"p{i}", seed)
        procs.append(proc)
        addresses.append(address)
    try:
        src = root / "src"
        with src.open("wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
        async with Client(addresses[0], publisher=Identity.generate()) as client:
            await client.put(src, "/repair/bench", replicas=3)
        victim = 1  # a peer other than the publisher's entry peer
        lost = (await status(addresses[victim]))["storage"]["used"]
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
                traffic += (await status(address))["maintenance"]["repair_bytes"]
        return {
            "object_bytes": size,
            "lost_bytes": lost,
            "seconds_to_restore_r": restored,
            "detection_bound_s": INTERVAL * DEAD_AFTER,
            "repair_bytes": traffic,
            "repair_bytes_per_lost_gib": traffic / lost * (1 << 30) if lost else None,
        }
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)


def main() -> int:
    size = int(os.environ.get("DIFS_BENCH_MIB", "256")) * MiB
    with tempfile.TemporaryDirectory(prefix="difs-repair-") as tmp:
        result = asyncio.run(run(Path(tmp), size))
    for name, value in result.items():
        print(f"{name:<28}{value}")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "repair.json").write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
