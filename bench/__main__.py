"""``make bench``: publish and fetch by name on 127.0.0.1, against limits measured in the run.

For each size (``DIFS_BENCH_MIB``, default ``256,1024``) a fresh network of 5 peer
processes; the object is published with r = 1, 3 and 5 (``DIFS_BENCH_REPLICAS``; segments
of ``DIFS_BENCH_SEGMENT``, default the size-dependent ``segments.default_segment_size``) and
fetched through another peer from 1, 3 and 5 holders, to a file and to /dev/null; the
r = 3 object is fetched again with one of its holders stopped (SIGSTOP) for the whole
fetch, against the normal time (``DIFS_BENCH_PAUSED=0`` skips it). In the first size's
network, the time to first byte of 20 fetches (``DIFS_BENCH_TTFB=0`` skips them): 4
objects of ``DIFS_BENCH_TTFB_MIB`` (default 64) published with r = 3, each fetched 5 times,
the first right after its publish. Prints a table and writes ``bench/results/latest.json``;
every figure is also shown as a ratio to the limits measured in the same run (loopback
TCP, BLAKE3, disk + fsync: one large file, and 1 MiB segment files written and fsynced in
parallel as a peer stores them; "xdisk" is against the latter).

A fetch has two speeds: "MB/s" is what the client reports (from the name's resolution to
the last byte written, inside the process), "cmd MB/s" the wall time of the whole
``difs get`` process as a user sees it (start-up, imports and exit included).
"""

from __future__ import annotations

import asyncio
import json
import math
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
from bench.torrent import beside_libtorrent, print_beside
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
    """Run one ``difs ... --json`` command; its JSON (with ``wall_s``, the whole process's
    wall time: start-up and exit included), CPU seconds and peak RSS (MB)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("difs")), *args, "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out, err = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"difs {args[0]} failed: {err.decode(errors='replace').strip()}")
    result: dict[str, Any] = json.loads(out)
    result["wall_s"] = wall
    return result, usage.ru_utime + usage.ru_stime, usage.ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    """The nearest-rank ``q`` percentile (0 < q <= 100) of ``values``."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(len(ordered) * q / 100) - 1)]


def segment_options() -> list[str]:
    """``--segment-size`` if ``DIFS_BENCH_SEGMENT`` asks for one (else the default)."""
    size = os.environ.get("DIFS_BENCH_SEGMENT")
    return ["--segment-size", size] if size else []


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
        "wall_s": got["wall_s"],
        "cmd_mb_s": normal["bytes"] / got["wall_s"] / 1e6,
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


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))


def ttfb_bench(root: Path, entry: str, last: str, env: dict[str, str]) -> dict[str, Any]:
    """Time to first byte of 20 ``difs get -o /dev/null`` through ``last``: 4 objects
    published through ``entry`` with r = 3, each fetched 5 times, the first right after
    its publish (what the client reports: resolution included, start-up not)."""
    size = int(os.environ.get("DIFS_BENCH_TTFB_MIB", "64")) * MiB
    src = root / "ttfb.bin"
    write_random(src, size)
    samples: list[dict[str, Any]] = []
    for i in range(4):
        name = f"/bench/ttfb-{i}"
        put = ["put", str(src), name, "--replicas", "3", *segment_options(), "--peer", entry]
        run_client(put, env)
        for k in range(5):
            got, _, _ = run_client(["get", name, "-o", os.devnull, "--peer", last], env)
            samples.append(
                {
                    "first_byte_ms": got["first_byte_ms"],
                    "resolve_ms": got["resolve_ms"],
                    "after_publish": k == 0,
                }
            )
    src.unlink()
    ttfb = [s["first_byte_ms"] for s in samples]
    return {
        "op": f"time to first byte {size // MiB} MiB",
        "bytes": size,
        "samples": samples,
        "p50_ms": percentile(ttfb, 50),
        "p99_ms": percentile(ttfb, 99),
        "after_publish_ms": [s["first_byte_ms"] for s in samples if s["after_publish"]],
    }


def content_bench(
    root: Path, size: int, peers_n: int = 5, ttfb: bool = False
) -> list[dict[str, Any]]:
    """Publish ``size`` bytes with r = 1, 3, 5 and fetch each through another peer; with
    ``ttfb`` also the time-to-first-byte series (``ttfb_bench``) in the same network.

    Publisher and fetcher are ``difs`` processes (their CPU time and peak RSS come from
    ``wait4``); the serving peers' CPU time is read from /proc around each fetch.
    """
    procs, addresses = start_network(root, peers_n)
    entry, last = (f"{h}:{p}" for h, p in (addresses[0], addresses[-1]))
    src = root / "src.bin"
    env = dict(os.environ, DIFS_HOME=str(root / "home"))
    env["DIFS_TOKEN_FILE"] = str(root / "p0" / "control.token")  # the entry peer's
    label = f"{size // MiB} MiB"
    rows: list[dict[str, Any]] = []
    replica_counts = [int(r) for r in os.environ.get("DIFS_BENCH_REPLICAS", "1,3,5").split(",")]
    paused = os.environ.get("DIFS_BENCH_PAUSED", "1") != "0"
    try:
        write_random(src, size)
        for replicas in replica_counts:
            name = f"/bench/{size}-{replicas}"
            before = [cpu_seconds(p.pid) for p in procs]
            put, cpu, rss = run_client(
                [
                    "put",
                    str(src),
                    name,
                    "--replicas",
                    str(replicas),
                    *segment_options(),
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
                        "wall_s": got["wall_s"],
                        "cmd_mb_s": size / got["wall_s"] / 1e6,
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
            if replicas == 3 and paused:
                normal = next(r for r in rows if r["op"] == f"fetch {label} 3h file")
                rows.append(paused_fetch(procs, addresses, name, out, env, normal))
                if file_hash(out) != file_hash(src):
                    raise SystemExit(f"fetched bytes of {name} differ with a holder paused")
                out.unlink()
        if ttfb and os.environ.get("DIFS_BENCH_TTFB", "1") != "0":
            rows.append(ttfb_bench(root, entry, last, env))
        fetches = [r for r in rows if r["op"].startswith("fetch")]
        rows.append(
            {
                "op": f"peak RSS {label}",
                "peers_rss_mb": [round(peak_rss_mb(p.pid), 1) for p in procs],
                "client_rss_mb": max((r["client_rss_mb"] for r in fetches), default=0.0),
            }
        )
    finally:
        stop_processes(procs)
    return rows


def print_report(limits: dict[str, float], rows: list[dict[str, Any]]) -> None:
    """The limits, then one line per measure; fetches also as whole commands."""
    tcp_limit = limits["loopback_tcp_mb_s"]
    print(f"{'limit':<26}{'MB/s':>8}")
    for name, value in limits.items():
        print(f"{name:<26}{value:>8.0f}")
    print()
    print("MB/s, xTCP: in the client; cmd MB/s, cmd xTCP: the whole `difs` process")
    head = ("measure", "MB/s", "xTCP", "cmd MB/s", "cmd xTCP", "xdisk", "TTFB ms", "resolve")
    head2 = ("cli CPU", "peer CPU", "cli RSS")
    print(f"{head[0]:<26}" + "".join(f"{h:>9}" for h in (*head[1:], *head2)))
    for row in rows:
        if "mb_s" not in row:
            continue
        tcp = row["mb_s"] / tcp_limit
        disk = row["mb_s"] / limits["disk_segments_fsync_mb_s"]
        cmd = f"{row['cmd_mb_s']:.0f}" if "cmd_mb_s" in row else ""
        cmd_tcp = f"{row['cmd_mb_s'] / tcp_limit:.2f}" if "cmd_mb_s" in row else ""
        ttfb = f"{row['first_byte_ms']:.1f}" if "first_byte_ms" in row else ""
        resolve = f"{row['resolve_ms']:.1f}" if "resolve_ms" in row else ""
        peers = f"{row['peers_cpu_s']:.2f}" if "peers_cpu_s" in row else ""
        print(
            f"{row['op']:<26}{row['mb_s']:>9.0f}{tcp:>9.2f}{cmd:>9}{cmd_tcp:>9}{disk:>9.2f}"
            f"{ttfb:>9}{resolve:>9}{row['client_cpu_s']:>9.2f}{peers:>9}"
            f"{row['client_rss_mb']:>9.0f}"
        )
    publish = {row["op"]: row["mb_s"] for row in rows if row["op"].startswith("publish ")}
    ones = [op for op in publish if op.endswith(" r=1")]
    if ones:
        print()
        print(f"{'publish, ratio to r = 1':<26}{'r=3':>9}{'r=5':>9}   (targets 0.6 and 0.4)")
        for op in ones:
            r3, r5 = (publish.get(op.replace("r=1", f"r={r}")) for r in (3, 5))
            cells = (f"{r / publish[op]:.2f}" if r else "" for r in (r3, r5))
            print(f"{op.removesuffix(' r=1'):<26}" + "".join(f"{c:>9}" for c in cells))
    by_op = {row["op"]: row for row in rows if "cmd_mb_s" in row}
    pairs = [(op, by_op[op.replace(" file", " null")]) for op in by_op if op.endswith(" file")]
    if pairs:
        print()
        print(f"{'to a file / to /dev/null':<26}{'cmd':>9}{'client':>9}   (target cmd >= 0.9)")
        for op, null in pairs:
            row = by_op[op]
            print(
                f"{op.removesuffix(' file'):<26}{row['cmd_mb_s'] / null['cmd_mb_s']:>9.2f}"
                f"{row['mb_s'] / null['mb_s']:>9.2f}"
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
    for row in rows:
        if "p99_ms" in row:
            print()
            after = ", ".join(f"{v:.1f}" for v in row["after_publish_ms"])
            print(
                f"{row['op']} (20 fetches): p50 {row['p50_ms']:.1f} ms, p99 {row['p99_ms']:.1f}"
                f" ms (targets 15 and 30); first after each publish: {after}"
            )
    print()
    for row in rows:
        if "peers_rss_mb" in row:
            print(
                f"{row['op']:<26} peers {row['peers_rss_mb']} MB, client {row['client_rss_mb']:.0f}"
                " MB (target <= 150)"
            )


def compile_package() -> None:
    """Write the package's bytecode before any ``difs`` is timed: an installed package has
    it (pip compiles at install), while a checkout run with PYTHONDONTWRITEBYTECODE set
    compiles every module at each start (measured: 65 ms of CPU per ``difs get``)."""
    import compileall

    import difs_p2p

    compileall.compile_dir(Path(difs_p2p.__file__).parent, quiet=1)


def main() -> int:
    sizes = [int(s) * MiB for s in os.environ.get("DIFS_BENCH_MIB", "256,1024").split(",")]
    compile_package()
    with tempfile.TemporaryDirectory(prefix="difs-bench-") as tmp:
        root = Path(tmp)
        limits = {"loopback_tcp_mb_s": limit_loopback_tcp()}
        if not PUBLISH_ONLY:
            limits["blake3_mb_s"] = limit_blake3()
            limits["disk_write_fsync_mb_s"] = limit_disk(root)
        limits["disk_segments_fsync_mb_s"] = limit_disk_segments(root)
        rows: list[dict[str, Any]] = []
        for i, size in enumerate(sizes):
            rows += content_bench(root / str(size), size, ttfb=i == 0 and not PUBLISH_ONLY)
        # libtorrent on the same file (the smallest size, 256 MiB by default), beside our
        # whole `difs get` (bench/torrent.py)
        beside = None if PUBLISH_ONLY else beside_libtorrent(root / str(min(sizes)) / "src.bin")
    print_report(limits, rows)
    if beside is not None:
        print()
        print_beside(beside)
    write_results("latest", {"limits": limits, "rows": rows, "sizes": sizes, "libtorrent": beside})
    return 0


if __name__ == "__main__":
    sys.exit(main())
