"""``make bench``: publish and fetch by name on 127.0.0.1, against limits measured in the run.

Prints a table and writes ``bench/results/latest.json``. Every figure is also shown as a
ratio to the machine limit measured in the same run (loopback TCP, BLAKE3, disk + fsync).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import blake3

from difs_p2p.client import Client
from difs_p2p.identity import Identity

MiB = 1 << 20


def limit_loopback_tcp(total: int = 512 * MiB, chunk: int = MiB) -> float:
    """MB/s of sock_sendall -> sock_recv_into between two threads' event loops."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def sink() -> None:
        conn, _ = server.accept()
        buf = bytearray(chunk)
        view = memoryview(buf)
        got = 0
        while got < total:
            n = conn.recv_into(view)
            if not n:
                break
            got += n
        conn.close()

    thread = threading.Thread(target=sink)
    thread.start()

    async def send() -> float:
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        data = os.urandom(chunk)
        t0 = time.perf_counter()
        for _ in range(total // chunk):
            await loop.sock_sendall(sock, data)
        sock.close()
        thread.join()
        return time.perf_counter() - t0

    seconds = asyncio.run(send())
    server.close()
    return total / seconds / 1e6


def limit_blake3(total: int = 1024 * MiB) -> float:
    data = os.urandom(MiB)
    t0 = time.perf_counter()
    for _ in range(total // MiB):
        blake3.blake3(data).digest()
    return total / (time.perf_counter() - t0) / 1e6


def limit_disk(directory: Path, total: int = 512 * MiB) -> float:
    data = os.urandom(MiB)
    path = directory / "disk-probe"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    for _ in range(total // MiB):
        os.write(fd, data)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    path.unlink()
    return total / seconds / 1e6


def start_peer_process(data: Path, bootstrap: str | None) -> tuple[subprocess.Popen[str], str]:
    """A real ``difs-peer join`` process; returns it with its address."""
    cmd = [
        str(Path(sys.executable).with_name("difs-peer")),
        "join",
        "--data",
        str(data),
        "--capacity",
        "64GiB",
    ]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("peer ready"):
        proc.kill()
        raise SystemExit(f"peer did not start: {line!r}")
    return proc, dict(p.split("=", 1) for p in line.split()[2:])["address"]


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def content_bench(root: Path, size: int, peers_n: int = 5) -> list[dict[str, Any]]:
    """Publish and fetch ``size`` bytes between peer processes, with r = 1 and r = 3."""
    procs: list[subprocess.Popen[str]] = []
    first, seed = start_peer_process(root / "p0", None)
    procs.append(first)
    addresses = [seed]
    for i in range(1, peers_n):
        proc, address = start_peer_process(root / f"p{i}", seed)
        procs.append(proc)
        addresses.append(address)
    src = root / "src.bin"
    with src.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))
    host, port = addresses[0].split(":")
    entry = (host, int(port))
    last_host, last_port = addresses[-1].split(":")
    rows = []
    try:
        for replicas in (1, 3):
            name = f"/bench/{size}-{replicas}"
            async with Client(entry, publisher=Identity.generate()) as client:
                t0 = time.perf_counter()
                await client.put(src, name, replicas=replicas)
                seconds = time.perf_counter() - t0
            rows.append(
                {
                    "op": f"publish r={replicas}",
                    "bytes": size,
                    "seconds": seconds,
                    "mb_s": size / seconds / 1e6,
                }
            )
            out = root / "out.bin"
            cpu0 = time.process_time()
            async with Client((last_host, int(last_port))) as client:
                result = await client.get(name, out)
            rows.append(
                {
                    "op": f"fetch ({replicas} holders)",
                    "bytes": size,
                    "seconds": result.seconds,
                    "mb_s": size / result.seconds / 1e6,
                    "first_byte_ms": result.first_byte * 1000,
                    "fetcher_cpu_s": time.process_time() - cpu0,
                }
            )
            out.unlink()
            async with Client((last_host, int(last_port))) as client:
                with open(os.devnull, "wb") as sink:  # noqa: ASYNC230 (no I/O)
                    result = await client.get(name, sink)
            rows.append(
                {
                    "op": f"fetch to null ({replicas})",
                    "bytes": size,
                    "seconds": result.seconds,
                    "mb_s": size / result.seconds / 1e6,
                    "first_byte_ms": result.first_byte * 1000,
                }
            )
        rows.append(
            {"op": "peak RSS of peers (MB)", "peers": [round(peak_rss_mb(p.pid), 1) for p in procs]}
        )
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=30)
    return rows


def main() -> int:
    size = int(os.environ.get("DIFS_BENCH_MIB", "256")) * MiB
    with tempfile.TemporaryDirectory(prefix="difs-bench-") as tmp:
        root = Path(tmp)
        limits = {
            "loopback_tcp_mb_s": limit_loopback_tcp(),
            "blake3_mb_s": limit_blake3(),
            "disk_write_fsync_mb_s": limit_disk(root),
        }
        rows = asyncio.run(content_bench(root, size))
    print(f"{'measure':<24}{'MB/s':>10}{'x loopback':>12}{'TTFB ms':>10}")
    for name, value in limits.items():
        print(f"{name:<24}{value:>10.0f}")
    for row in rows:
        if "mb_s" not in row:
            print(f"{row['op']:<24}{row['peers']}")
            continue
        ratio = row["mb_s"] / limits["loopback_tcp_mb_s"]
        ttfb = f"{row['first_byte_ms']:.1f}" if "first_byte_ms" in row else ""
        print(f"{row['op']:<24}{row['mb_s']:>10.0f}{ratio:>12.2f}{ttfb:>10}")
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(
        json.dumps({"limits": limits, "rows": rows, "size": size}, indent=2)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
