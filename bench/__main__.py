"""``make bench``: publish and fetch by name on 127.0.0.1, against limits measured in the run.

For each size (``DIFS_BENCH_MIB``, default ``256,1024``) a fresh network of 5 peer
processes; the object is published with r = 1, 3 and 5 (segments of
``DIFS_BENCH_SEGMENT``, default 1MiB) and fetched through another peer from 1, 3 and 5
holders, to a file and to /dev/null; the r = 3 object is fetched again with one of its
holders stopped (SIGSTOP) for the whole fetch, against the normal time. Prints a table and writes
``bench/results/latest.json``; every figure is also shown as a ratio to the limits measured
in the same run (loopback TCP, BLAKE3, disk + fsync: one large file, and 1 MiB segment
files written and fsynced in parallel as a peer stores them; "xdisk" is against the latter).
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import blake3

from bench.peers import cpu_seconds, peak_rss_mb, start_network, stop_processes, write_results
from difs_p2p.client import Client

MiB = 1 << 20


# DIFS_BENCH_PUBLISH_ONLY=1: only the publishes (and the limits they are compared with)
PUBLISH_ONLY = os.environ.get("DIFS_BENCH_PUBLISH_ONLY") == "1"


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


def limit_disk_segments(directory: Path, total: int = 256 * MiB, threads: int = 6) -> float:
    """MB/s of what a peer does per segment: 1 MiB file, write, fsync, rename, in parallel.

    ``threads`` matches the asyncio default executor on this machine (cores + 4).
    """
    data = os.urandom(MiB)
    work = directory / "segment-probe"
    work.mkdir()

    def one(i: int) -> None:
        tmp = work / f"{i}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, work / str(i))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, range(total // MiB)))
    fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(work)
    return total / seconds / 1e6


def file_hash(path: Path) -> bytes:
    """BLAKE3 of a file read in 1 MiB pieces.

    Never read whole files here: a child's peak RSS as ``wait4`` reports it starts from
    this process's peak at fork time (Linux keeps the pre-exec high-water mark).
    """
    h = blake3.blake3()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.digest()


def run_client(args: list[str], env: dict[str, str]) -> tuple[dict[str, Any], float, float]:
    """Run one ``difs ... --json`` command; its JSON, CPU seconds and peak RSS (MB)."""
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("difs")), *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"difs {args[0]} failed: {err.decode(errors='replace').strip()}")
    return json.loads(out), usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def holders_of(peer: tuple[str, int], name: str) -> set[tuple[str, int]]:
    """The addresses of the holders of ``name``'s newest version."""

    async def ask() -> set[tuple[str, int]]:
        async with Client(peer) as client:
            resolved = await client.resolve(name)
        return {(h.host, h.port) for h in resolved.holders_for(resolved.manifest)}

    return asyncio.run(ask())


def paused_fetch(
    procs: list[subprocess.Popen[str]],
    addresses: list[tuple[str, int]],
    name: str,
    out: Path,
    env: dict[str, str],
    normal: dict[str, Any],
) -> dict[str, Any]:
    """Fetch ``name`` through the last peer with one of its holders (neither the first
    peer nor the last) stopped for the whole fetch; the time against ``normal``'s."""
    holders = holders_of(addresses[-1], name)
    victim = next(i for i, a in enumerate(addresses[1:-1], 1) if a in holders)
    procs[victim].send_signal(signal.SIGSTOP)
    try:
        got, cpu, rss = run_client(
            ["get", name, "-o", str(out), "--peer", "{}:{}".format(*addresses[-1])], env
        )
    finally:
        procs[victim].send_signal(signal.SIGCONT)
    transfer = got["seconds"] - got["resolve_ms"] / 1000
    normal_transfer = normal["seconds"] - normal["resolve_ms"] / 1000
    return {
        "op": normal["op"].replace(" file", " paused"),
        "bytes": normal["bytes"],
        "seconds": got["seconds"],
        "mb_s": normal["bytes"] / got["seconds"] / 1e6,
        "first_byte_ms": got["first_byte_ms"],
        "resolve_ms": got["resolve_ms"],
        "client_cpu_s": cpu,
        "client_rss_mb": rss,
        "sources": got["sources"],
        "paused": "{}:{}".format(*addresses[victim]),
        "normal_seconds": normal["seconds"],
        "ratio": got["seconds"] / normal["seconds"],
        "transfer_ratio": transfer / normal_transfer,
    }


def content_bench(root: Path, size: int, peers_n: int = 5) -> list[dict[str, Any]]:
    """Publish ``size`` bytes with r = 1, 3, 5 and fetch each through another peer.

    Publisher and fetcher are ``difs`` processes (their CPU time and peak RSS come from
    ``wait4``); the serving peers' CPU time is read from /proc around each fetch.
    """
    procs, addresses = start_network(root, peers_n)
    entry, last = (f"{h}:{p}" for h, p in (addresses[0], addresses[-1]))
    src = root / "src.bin"
    with src.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))
    env = dict(os.environ, DIFS_HOME=str(root / "home"))
    env["DIFS_TOKEN_FILE"] = str(root / "p0" / "control.token")  # the entry peer's
    label = f"{size // MiB} MiB"
    rows: list[dict[str, Any]] = []
    try:
        for replicas in (1, 3, 5):
            name = f"/bench/{size}-{replicas}"
            before = [cpu_seconds(p.pid) for p in procs]
            put, cpu, rss = run_client(
                [
                    "put",
                    str(src),
                    name,
                    "--replicas",
                    str(replicas),
                    "--segment-size",
                    os.environ.get("DIFS_BENCH_SEGMENT", "1MiB"),
                    "--peer",
                    entry,
                ],
                env,
            )
            stored = sum(cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True))
            rows.append(
                {
                    "op": f"publish {label} r={replicas}",
                    "bytes": size,
                    "seconds": put["seconds"],
                    "mb_s": size / put["seconds"] / 1e6,
                    "client_cpu_s": cpu,
                    "client_rss_mb": rss,
                    "peers_cpu_s": stored,
                }
            )
            if PUBLISH_ONLY:
                continue
            out = root / "out.bin"
            for target, what in ((out, "file"), (Path(os.devnull), "null")):
                before = [cpu_seconds(p.pid) for p in procs]
                got, cpu, rss = run_client(["get", name, "-o", str(target), "--peer", last], env)
                served = sum(cpu_seconds(p.pid) - b for p, b in zip(procs, before, strict=True))
                rows.append(
                    {
                        "op": f"fetch {label} {replicas}h {what}",
                        "bytes": size,
                        "seconds": got["seconds"],
                        "mb_s": size / got["seconds"] / 1e6,
                        "first_byte_ms": got["first_byte_ms"],
                        "resolve_ms": got["resolve_ms"],
                        "client_cpu_s": cpu,
                        "client_rss_mb": rss,
                        "peers_cpu_s": served,
                        "sources": got["sources"],
                    }
                )
            if file_hash(out) != file_hash(src):
                raise SystemExit(f"fetched bytes of {name} differ from the source")
            out.unlink()
            if replicas == 3:
                normal = next(r for r in rows if r["op"] == f"fetch {label} 3h file")
                rows.append(paused_fetch(procs, addresses, name, out, env, normal))
                if file_hash(out) != file_hash(src):
                    raise SystemExit(f"fetched bytes of {name} differ with a holder paused")
                out.unlink()
        rows.append(
            {
                "op": f"peak RSS of peers {label}",
                "peers_rss_mb": [round(peak_rss_mb(p.pid), 1) for p in procs],
            }
        )
    finally:
        stop_processes(procs)
    return rows


def main() -> int:
    sizes = [int(s) * MiB for s in os.environ.get("DIFS_BENCH_MIB", "256,1024").split(",")]
    with tempfile.TemporaryDirectory(prefix="difs-bench-") as tmp:
        root = Path(tmp)
        limits = {"loopback_tcp_mb_s": limit_loopback_tcp()}
        if not PUBLISH_ONLY:
            limits["blake3_mb_s"] = limit_blake3()
            limits["disk_write_fsync_mb_s"] = limit_disk(root)
        limits["disk_segments_fsync_mb_s"] = limit_disk_segments(root)
        rows: list[dict[str, Any]] = []
        for size in sizes:
            rows += content_bench(root / str(size), size)
    print(f"{'limit':<26}{'MB/s':>8}")
    for name, value in limits.items():
        print(f"{name:<26}{value:>8.0f}")
    print()
    head = (
        "measure",
        "MB/s",
        "xTCP",
        "xdisk",
        "TTFB ms",
        "resolve",
        "cli CPU",
        "peers CPU",
        "cli RSS",
    )
    print(f"{head[0]:<26}" + "".join(f"{h:>10}" for h in head[1:]))
    for row in rows:
        if "mb_s" not in row:
            print(f"{row['op']:<26}{row['peers_rss_mb']} MB")
            continue
        tcp = row["mb_s"] / limits["loopback_tcp_mb_s"]
        disk = row["mb_s"] / limits["disk_segments_fsync_mb_s"]
        ttfb = f"{row['first_byte_ms']:.1f}" if "first_byte_ms" in row else ""
        resolve = f"{row['resolve_ms']:.1f}" if "resolve_ms" in row else ""
        peers = f"{row['peers_cpu_s']:.2f}" if "peers_cpu_s" in row else ""
        print(
            f"{row['op']:<26}{row['mb_s']:>10.0f}{tcp:>10.2f}{disk:>10.2f}{ttfb:>10}{resolve:>10}"
            f"{row['client_cpu_s']:>10.2f}{peers:>10}{row['client_rss_mb']:>10.0f}"
        )
    paused = [row for row in rows if "ratio" in row]
    if paused:
        print()
        print(
            f"{'one of 3 holders paused':<26}{'normal s':>10}{'paused s':>10}{'ratio':>10}"
            f"{'w/o resolve':>12}"
        )
        for row in paused:
            print(
                f"{row['op']:<26}{row['normal_seconds']:>10.3f}{row['seconds']:>10.3f}"
                f"{row['ratio']:>10.2f}{row['transfer_ratio']:>12.2f}"
            )
    write_results("latest", {"limits": limits, "rows": rows, "sizes": sizes})
    return 0


if __name__ == "__main__":
    sys.exit(main())
