"""HTTP gateway benchmark: curl through a peer's gateway against ``difs get``.

Run by ``make bench`` (or alone: ``python -m bench.gateway``). Two ``difs-peer`` processes
on 127.0.0.1: a holder, and a peer offering no storage with ``--http`` (the serving peer:
its content comes from the holder over TCP, as a gateway's does). One object of
``DIFS_BENCH_GATEWAY_MIB`` (default 256) MiB, 1 MiB segments, r = 1 on the holder.

- throughput: whole-command wall time of ``curl -o /dev/null URL`` against
  ``difs get NAME -o /dev/null --peer SERVING`` (a process each, ``DIFS_BENCH_GATEWAY_RUNS``
  runs each, default 5, alternated; medians), and their ratio (difs get's time over curl's:
  1.0 is as fast; target >= 0.9); also the ratio of the times each tool reports itself
  (curl's ``time_total``, ``difs get --json``'s ``seconds``), without process start-up;
- time to first byte: curl's ``%{time_starttransfer}`` of ``Range: bytes=0-0``, 20 requests,
  p50 and p99 (target <= 25 ms); each request resolves the name again;
- memory: 8 concurrent ``curl --limit-rate`` clients (``DIFS_BENCH_GATEWAY_RATE``, default
  1M, for ``DIFS_BENCH_GATEWAY_SLOW_S`` seconds, default 10) of the whole object; the
  serving peer's resident memory sampled meanwhile (its peak; target < 200 MB), against
  what it was just before them (the difference per client: about a stream's window,
  ``stream.STREAM_BUFFER``), and its peak over the whole run (VmHWM).

Prints a table and writes ``bench/results/gateway.json``. Each figure is a whole process'
wall time on a machine other work may share: run it on a quiet one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import (
    peak_rss_mb,
    start_peer_process,
    stop_processes,
    token_of,
    write_results,
)
from difs_p2p.client import Client
from difs_p2p.identity import Identity

MiB = 1 << 20
NAME = "/bench/gateway.bin"
TTFB_REQUESTS = 20
SLOW_CLIENTS = 8
TARGET_RATIO = 0.9
TARGET_TTFB_MS = 25.0
TARGET_RSS_MB = 200.0
SAMPLE_EVERY = 0.05


def rss_mb(pid: int) -> float:
    """Resident memory of a running process now (VmRSS), in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]


def wall(cmd: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Whole-command wall time of ``cmd`` (it must exit 0), and its stdout."""
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    return seconds, done.stdout


def throughput(
    curl: str, difs: str, url: str, serving: str, size: int, runs: int, env: dict[str, str]
) -> dict[str, Any]:
    """Median whole-command times of curl and difs get of the object, alternated."""
    curl_s: list[float] = []
    difs_s: list[float] = []
    # the transfer as each tool times it (curl's time_total, difs get's "seconds"): without
    # starting the process (for difs, a Python interpreter and its imports)
    curl_own: list[float] = []
    difs_own: list[float] = []
    for _ in range(runs):
        seconds, out = wall(
            [curl, "-s", "-o", os.devnull, "-w", "%{size_download} %{time_total}", url], env
        )
        got, total = out.split()
        if int(got) != size:
            raise SystemExit(f"curl read {got} bytes of {size}")
        curl_s.append(seconds)
        curl_own.append(float(total))
        seconds, out = wall([difs, "get", NAME, "-o", os.devnull, "--peer", serving, "--json"], env)
        difs_s.append(seconds)
        difs_own.append(float(json.loads(out)["seconds"]))
    curl_med, difs_med = statistics.median(curl_s), statistics.median(difs_s)
    return {
        "curl_seconds": curl_s,
        "difs_get_seconds": difs_s,
        "curl_median_s": curl_med,
        "difs_get_median_s": difs_med,
        "curl_mb_s": size / curl_med / 1e6,
        "difs_get_mb_s": size / difs_med / 1e6,
        "ratio": difs_med / curl_med,
        "curl_own_median_s": statistics.median(curl_own),
        "difs_get_own_median_s": statistics.median(difs_own),
        "ratio_own": statistics.median(difs_own) / statistics.median(curl_own),
    }


def first_byte(curl: str, url: str, env: dict[str, str]) -> dict[str, Any]:
    """curl's time to first byte of ``Range: bytes=0-0``, TTFB_REQUESTS times, in ms."""
    times: list[float] = []
    for _ in range(TTFB_REQUESTS):
        _, out = wall(
            [curl, "-s", "-o", os.devnull, "-H", "Range: bytes=0-0", "-w",
             "%{http_code} %{time_starttransfer}", url],
            env,
        )  # fmt: skip
        code, seconds = out.split()
        if code != "206":
            raise SystemExit(f"Range: bytes=0-0 answered {code}")
        times.append(float(seconds) * 1000)
    return {
        "ttfb_ms": times,
        "ttfb_p50_ms": percentile(times, 0.5),
        "ttfb_p99_ms": percentile(times, 0.99),
    }


def slow_clients(curl: str, url: str, pid: int, env: dict[str, str]) -> dict[str, Any]:
    """SLOW_CLIENTS rate-limited curls of the whole object at once; the serving peer's
    resident memory sampled while they read."""
    rate = os.environ.get("DIFS_BENCH_GATEWAY_RATE", "1M")
    seconds = float(os.environ.get("DIFS_BENCH_GATEWAY_SLOW_S", "10"))
    procs = [
        subprocess.Popen(
            [curl, "-s", "-o", os.devnull, "--limit-rate", rate, url],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(SLOW_CLIENTS)
    ]
    samples: list[float] = []
    before = rss_mb(pid)
    try:
        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            samples.append(rss_mb(pid))
            time.sleep(SAMPLE_EVERY)
        finished = [p.poll() for p in procs]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    if any(code is not None for code in finished):
        raise SystemExit(f"a slow client ended early ({finished}): lower the rate or time")
    return {
        "slow_clients": SLOW_CLIENTS,
        "slow_rate": rate,
        "slow_seconds": seconds,
        "serving_rss_mb_before_slow": before,
        "serving_rss_mb_peak_sampled": max(samples),
        "serving_rss_mb_samples": len(samples),
        # what each slow client holds in the serving peer (its stream's window ahead of it)
        "serving_rss_mb_per_slow_client": (max(samples) - before) / SLOW_CLIENTS,
    }


async def publish(holder: tuple[str, int], src: Path) -> None:
    token = token_of(holder)
    async with Client(holder, publisher=Identity.generate(), token=token) as client:
        await client.put(src, NAME, segment_size=MiB, replicas=1)


def bench(root: Path, size: int, runs: int) -> dict[str, Any]:
    curl = shutil.which("curl")
    if curl is None:
        raise SystemExit("bench.gateway needs curl (make sysdeps installs it)")
    difs = str(Path(sys.executable).with_name("difs"))
    env = dict(os.environ, DIFS_HOME=str(root / "home"))
    holder, seed = start_peer_process(root / "holder", None, "--http", "off")
    procs = [holder]
    try:
        serving, address = start_peer_process(
            root / "serving", seed, "--capacity", "0", "--http", "127.0.0.1:0"
        )
        procs.append(serving)
        url = (root / "serving" / "http").read_text().strip() + NAME.lstrip("/")
        src = root / "src.bin"
        with src.open("wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
        host, port = seed.rsplit(":", 1)
        asyncio.run(publish((host, int(port)), src))
        src.unlink()
        result: dict[str, Any] = {"bytes": size, "runs": runs}
        result |= throughput(curl, difs, url, address, size, runs, env)
        result |= first_byte(curl, url, env)
        result |= slow_clients(curl, url, serving.pid, env)
        result["serving_rss_mb_peak_run"] = peak_rss_mb(serving.pid)
        return result
    finally:
        stop_processes(procs)


def main() -> int:
    size = int(os.environ.get("DIFS_BENCH_GATEWAY_MIB", "256")) * MiB
    runs = int(os.environ.get("DIFS_BENCH_GATEWAY_RUNS", "5"))
    with tempfile.TemporaryDirectory(prefix="difs-bench-gw-") as tmp:
        r = bench(Path(tmp), size, runs)
    label = f"{size // MiB} MiB"
    rows = [
        (f"curl {label} (median s)", f"{r['curl_median_s']:.3f}", f"{r['curl_mb_s']:.0f} MB/s"),
        (
            f"difs get {label} (median s)",
            f"{r['difs_get_median_s']:.3f}",
            f"{r['difs_get_mb_s']:.0f} MB/s",
        ),
        ("curl vs difs get", f"{r['ratio']:.2f}", f">= {TARGET_RATIO}"),
        (
            "  as each tool times it",
            f"{r['ratio_own']:.2f}",
            f"{r['curl_own_median_s']:.3f} s vs {r['difs_get_own_median_s']:.3f} s",
        ),
        ("TTFB p50 ms (bytes=0-0)", f"{r['ttfb_p50_ms']:.1f}", f"<= {TARGET_TTFB_MS:.0f}"),
        ("TTFB p99 ms (bytes=0-0)", f"{r['ttfb_p99_ms']:.1f}", f"<= {TARGET_TTFB_MS:.0f}"),
        (
            f"RSS MB, {SLOW_CLIENTS} slow clients",
            f"{r['serving_rss_mb_peak_sampled']:.0f}",
            f"< {TARGET_RSS_MB:.0f}",
        ),
        ("RSS MB, before the slow clients", f"{r['serving_rss_mb_before_slow']:.0f}", ""),
        ("RSS MB per slow client", f"{r['serving_rss_mb_per_slow_client']:.1f}", ""),
        ("RSS MB, peak of the run", f"{r['serving_rss_mb_peak_run']:.0f}", ""),
    ]
    print(f"{'gateway':<34}{'value':>10}  target")
    for name, value, target in rows:
        print(f"{name:<34}{value:>10}  {target}")
    write_results("gateway", r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
