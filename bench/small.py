"""Small-object benchmark: 4 KiB publishes and fetches on a 20-peer network on 127.0.0.1.

Run with ``python -m bench.small``. For each concurrency level C (``1`` and ``16`` unless
``DIFS_BENCH_SMALL_C`` says otherwise, e.g. ``1,8,32``), C clients publish
``DIFS_BENCH_SMALL_N`` (default 500) distinct 4 KiB objects with r = 3, then C other
clients fetch them all back in a shuffled order and compare every byte with the source
(cold: each name once, so every resolve is a lookup), then fetch again, N fetches in all,
fetcher j one name over and over (hot: a resolve within the entry peer's resolve cache
bound, ``--resolve-cache``, 1 s here unless ``DIFS_BENCH_SMALL_CACHE`` says otherwise, is
answered from it). Client j enters the
network through peer j mod 20 (publish) or j + 10 mod 20 (fetch) and is reused for all
its operations, after one untimed warm-up operation. All clients run in this one
process. After the publishes, untimed, each publisher updates one of its names and reads
it back at once through its entry peer (read-after-write: it must see the new bytes;
failures are counted and shown).
The rows show ops/s against the targets (2,000 fetches/s, 300 publishes/s at C = 16).

The limit for each level is measured in the same run: 4 KiB request and 4 KiB reply round
trips at the same concurrency, between this process and a trivial echo server in another
process over loopback TCP, with the raw asyncio socket calls the transport uses. Every
figure is shown as a ratio to it. Where the time goes: CPU time per operation of this
(client) process and of all peer processes together (for the limit rows: of the echo
server), and UDP datagrams (DHT traffic, background maintenance included) sent by the
peers per operation. After each level the idle peers' own datagrams/s and CPU are
measured too: maintenance rounds read held names from the DHT (each one round in ten, and
every new one at its first round), so with hundreds of objects stored they weigh on every
phase. ``DIFS_BENCH_SMALL_REPAIR`` sets the peers'
``--repair-interval`` (e.g. 3600 to leave maintenance out of the per-operation figures).
``DIFS_BENCH_SMALL_IDLE=WAIT,WINDOW`` (default ``0,10``) waits WAIT seconds after a level
before measuring the idle traffic over WINDOW seconds: right after a level the peers are
still reading the names they were just given for the first time, so ``60,60`` (one whole
default interval, after each peer had a round) shows the settled background instead.

Prints a table and writes ``bench/results/small.json``.
"""

from __future__ import annotations

import asyncio
import io
import math
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

from bench.peers import (
    cpu_seconds,
    peak_rss_mb,
    peer_status,
    start_network,
    stop_processes,
    token_of,
    write_results,
)
from difs_p2p.client import Client
from difs_p2p.errors import DifsError, IntegrityError, NotFoundError
from difs_p2p.identity import Identity

OBJECT_SIZE = 4096
PEERS = 20
REPLICAS = 3
# A network of PEERS peers is formed when every peer has all the others in its routing
# table (ksize = 20 >= PEERS - 1, so nothing is left out); joining takes about a second.
FORM_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# Round trips timed for the limit (at least): it is cheap, and a short run is noisy.
LIMIT_OPS = 20_000
SEED = 1
# Idle time after each level in which the peers' own traffic (maintenance rounds read
# held names from the DHT) is measured: with hundreds of objects stored, it is part of every
# phase's per-operation figures. DIFS_BENCH_SMALL_REPAIR=3600 (--repair-interval of the
# peers) leaves it out of them.
BACKGROUND_WINDOW = 10.0
# The peers' resolve cache (seconds; difs-peer join --resolve-cache): the staleness bound of
# a reader through another entry peer than the writer's.
RESOLVE_CACHE = os.environ.get("DIFS_BENCH_SMALL_CACHE", "1")
# The targets (ops/s at 16 concurrent clients).
TARGETS = {"publish": 300.0, "fetch (cold)": 2000.0, "fetch (hot)": 2000.0}

Op = Callable[[int], Awaitable[None]]


@dataclass(slots=True)
class Phase:
    """What one timed phase measured."""

    ops: int
    seconds: float
    latencies: list[float]
    client_cpu: float
    peers_cpu: float
    datagrams: int
    lookups: int = 0
    errors: list[str] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)

    @property
    def ops_s(self) -> float:
        return len(self.latencies) / self.seconds if self.seconds > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """Nearest-rank percentile of the successful operations' latencies, in ms."""
        if not self.latencies:
            return math.nan
        ranked = sorted(self.latencies)
        return ranked[max(0, math.ceil(q * len(ranked)) - 1)] * 1000


async def dht_counts(addresses: Sequence[tuple[str, int]]) -> tuple[int, int]:
    """DHT datagrams the peers at ``addresses`` have sent so far, and the lookups they
    ran (maintenance's included), from their status.

    Counted by the peers rather than the host (/proc/net/snmp), so that other programs'
    UDP traffic on a shared machine does not show up as ours.
    """
    statuses = await asyncio.gather(*(peer_status(a) for a in addresses))
    return (
        sum(int(s["dht"]["sent"]) for s in statuses),
        sum(int(s["dht"]["lookups"]) for s in statuses),
    )


async def datagrams_sent(addresses: Sequence[tuple[str, int]]) -> int:
    """DHT datagrams the peers at ``addresses`` have sent so far (``dht_counts``)."""
    return (await dht_counts(addresses))[0]


async def _no_datagrams() -> tuple[int, int]:
    return 0, 0


async def timed(
    ops: Sequence[Op],
    items: Sequence[int],
    pids: Sequence[int],
    datagrams: Callable[[], Awaitable[tuple[int, int]]] = _no_datagrams,
) -> Phase:
    """Run ``items`` through the ``ops`` (each serving one at a time), all ops concurrently.

    A failed operation is counted, with its error, and left out of the latencies.
    """
    queue: Iterator[int] = iter(items)
    latencies: list[float] = []
    errors: list[str] = []
    failed: list[int] = []

    async def drive(op: Op) -> None:
        for item in queue:  # shared: each op takes the next item when it is free
            t0 = time.perf_counter()
            try:
                await op(item)
            except (DifsError, OSError) as exc:
                errors.append(f"{item}: {type(exc).__name__}: {exc}")
                failed.append(item)
                continue
            latencies.append(time.perf_counter() - t0)

    datagrams0, lookups0 = await datagrams()
    peers0 = sum(cpu_seconds(p) for p in pids)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    async with asyncio.TaskGroup() as tg:
        for op in ops:
            tg.create_task(drive(op))
    seconds = time.perf_counter() - t0
    client_cpu = time.process_time() - cpu0
    peers_cpu = sum(cpu_seconds(p) for p in pids) - peers0
    datagrams1, lookups1 = await datagrams()
    return Phase(
        ops=len(items),
        seconds=seconds,
        latencies=latencies,
        client_cpu=client_cpu,
        peers_cpu=peers_cpu,
        datagrams=datagrams1 - datagrams0,
        lookups=lookups1 - lookups0,
        errors=errors,
        failed=failed,
    )


# -- the limit: 4 KiB request/response over loopback TCP -------------------------------------


async def _recv_exactly(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, buf: bytearray
) -> bool:
    view, got = memoryview(buf), 0
    while got < len(buf):
        n = await loop.sock_recv_into(sock, view[got:])
        if n == 0:
            return False
        got += n
    return True


async def _echo_serve(pipe: Pipe) -> None:
    loop = asyncio.get_running_loop()
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    server.setblocking(False)
    pipe.send(server.getsockname()[1])
    tasks: set[asyncio.Task[None]] = set()

    async def echo(sock: socket.socket) -> None:
        buf = bytearray(OBJECT_SIZE)
        with sock:
            while await _recv_exactly(loop, sock, buf):
                await loop.sock_sendall(sock, buf)

    while True:
        sock, _ = await loop.sock_accept(server)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        task = loop.create_task(echo(sock))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


def echo_server_main(pipe: Pipe) -> None:
    """Child process: echo every 4 KiB request back until SIGTERM."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(_echo_serve(pipe))


class EchoClient:
    """One connection to the echo server; ``call`` is one 4 KiB round trip."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.request = os.urandom(OBJECT_SIZE)
        self.reply = bytearray(OBJECT_SIZE)

    @classmethod
    async def open(cls, port: int) -> EchoClient:
        sock = socket.socket()
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
        return cls(sock)

    async def call(self, _item: int) -> None:
        await self.loop.sock_sendall(self.sock, self.request)
        if not await _recv_exactly(self.loop, self.sock, self.reply):
            raise ConnectionResetError("echo server closed the connection")


async def measure_limit(port: int, concurrency: int, n: int, pid: int) -> Phase:
    clients = [await EchoClient.open(port) for _ in range(concurrency)]
    try:
        for c in clients:  # warm up: first round trip outside the timed part
            await c.call(0)
        return await timed([c.call for c in clients], range(n), [pid])
    finally:
        for c in clients:
            c.sock.close()


# -- the network ------------------------------------------------------------------------------


async def wait_formed(addresses: Sequence[tuple[str, int]]) -> list[int]:
    """Poll every peer's status until each knows all the others; their table sizes."""
    sizes: list[int] = []
    try:
        async with asyncio.timeout(FORM_TIMEOUT):
            while True:
                statuses = await asyncio.gather(*(peer_status(a) for a in addresses))
                sizes = [int(s["routing_table"]) for s in statuses]
                if min(sizes) >= len(addresses) - 1:
                    return sizes
                await asyncio.sleep(0.1)
    except TimeoutError:
        raise SystemExit(
            f"the network did not form within {FORM_TIMEOUT:.0f} s: routing tables {sizes}"
        ) from None


# -- the benchmark ----------------------------------------------------------------------------


def row(op: str, concurrency: int, phase: Phase, limit: Phase) -> dict[str, Any]:
    done = max(1, len(phase.latencies))
    return {
        "op": op,
        "concurrency": concurrency,
        "ops": phase.ops,
        "ok": len(phase.latencies),
        "errors": len(phase.errors),
        "first_errors": phase.errors[:5],
        "seconds": phase.seconds,
        "ops_s": phase.ops_s,
        "p50_ms": phase.percentile_ms(0.50),
        "p99_ms": phase.percentile_ms(0.99),
        "x_limit": phase.ops_s / limit.ops_s if limit.ops_s else math.nan,
        "client_cpu_ms_per_op": phase.client_cpu / done * 1000,
        "peers_cpu_ms_per_op": phase.peers_cpu / done * 1000,
        "udp_datagrams_per_op": phase.datagrams / done,
        "dht_lookups_per_op": phase.lookups / done,
        "target_ops_s": TARGETS.get(op),
        "x_target": phase.ops_s / TARGETS[op] if op in TARGETS else math.nan,
    }


def write_sources(directory: Path, indexes: Sequence[int]) -> dict[int, bytes]:
    """One file of OBJECT_SIZE random bytes per index; their contents."""
    data = {i: os.urandom(OBJECT_SIZE) for i in indexes}
    for i, blob in data.items():
        (directory / str(i)).write_bytes(blob)
    return data


def progress(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def object_name(i: int) -> str:
    return f"/bench/small/{i}"


async def bench_level(
    concurrency: int,
    indexes: Sequence[int],
    addresses: Sequence[tuple[str, int]],
    pids: Sequence[int],
    sources: Path,
) -> tuple[Phase, Phase, Phase, tuple[int, int]]:
    """Publish, then fetch (cold, then hot), ``indexes`` with ``concurrency`` clients;
    and the read-after-write checks (passed, made) of the publishers.

    The first ``concurrency`` indexes are warm-ups, one per client, outside the timings.
    """
    warmups, timed_indexes = indexes[:concurrency], indexes[concurrency:]
    data = await asyncio.to_thread(write_sources, sources, indexes)

    # Publish: client j enters through peer j.
    publishers = [
        Client(
            addresses[j % len(addresses)],
            publisher=Identity.generate(),
            token=token_of(addresses[j % len(addresses)]),
        )
        for j in range(concurrency)
    ]

    def publish_op(client: Client) -> Op:
        async def op(i: int) -> None:
            await client.put(sources / str(i), object_name(i), replicas=REPLICAS)

        return op

    async def phase(
        clients: Sequence[Client], make: Callable[[Client], Op], items: list[int]
    ) -> Phase:
        """One untimed warm-up per client, then ``items`` timed."""
        ops = [make(c) for c in clients]
        warm = await asyncio.gather(
            *(op(i) for op, i in zip(ops, warmups, strict=True)), return_exceptions=True
        )
        for outcome in warm:  # an untimed warm-up that failed is reported, not fatal
            if isinstance(outcome, BaseException) and not isinstance(outcome, DifsError):
                raise outcome
            if isinstance(outcome, DifsError):
                print(f"warm-up failed: {type(outcome).__name__}: {outcome}", flush=True)
        return await timed(ops, items, pids, lambda: dht_counts(addresses))

    async def read_after_write(j: int, client: Client) -> bool:
        """Publisher j updates its warm-up object and reads it back at once."""
        i = warmups[j]
        fresh = os.urandom(OBJECT_SIZE)
        path = sources / f"raw-{i}"
        await asyncio.to_thread(path.write_bytes, fresh)
        try:
            try:
                await client.put(path, object_name(i), replicas=REPLICAS, update=True)
            except NotFoundError:  # its warm-up publish failed: a first version then
                await client.put(path, object_name(i), replicas=REPLICAS)
            buf = io.BytesIO()
            await client.get(object_name(i), buf)
        except DifsError as exc:
            print(f"read-after-write {object_name(i)}: {type(exc).__name__}: {exc}", flush=True)
            return False
        data[i] = fresh
        return buf.getvalue() == fresh

    progress(f"publish C={concurrency}: {len(timed_indexes)} objects")
    try:
        published = await phase(publishers, publish_op, list(timed_indexes))
        checks = await asyncio.gather(*(read_after_write(j, c) for j, c in enumerate(publishers)))
    finally:
        for c in publishers:
            await c.close()
    raw = (sum(checks), len(checks))

    # Fetch through other entry peers than the publishers', in a shuffled order.
    fetchers = [
        Client(addresses[(j + len(addresses) // 2) % len(addresses)]) for j in range(concurrency)
    ]

    def fetch_op(client: Client) -> Op:
        async def op(i: int) -> None:
            buf = io.BytesIO()
            await client.get(object_name(i), buf)
            if buf.getvalue() != data[i]:  # comparing 4 KiB takes well under a microsecond
                raise IntegrityError(f"{object_name(i)}: fetched bytes differ from the source")

        return op

    order = sorted(set(timed_indexes) - set(published.failed))
    random.Random(SEED + concurrency).shuffle(order)
    progress(f"fetch C={concurrency}: {len(order)} objects, cold")
    try:
        cold = await phase(fetchers, fetch_op, order)
        # fetcher j reads name j of the last ones published, again and again (as the
        # readers of a hot name behind one entry peer do)
        hot_names = sorted(order)[-concurrency:]

        def hot_op(client: Client) -> Op:
            fetch = fetch_op(client)
            name = hot_names[fetchers.index(client) % len(hot_names)]

            async def op(_: int) -> None:
                await fetch(name)

            return op

        progress(f"fetch C={concurrency}: {len(order)} fetches, each fetcher one name, hot")
        hot = await phase(fetchers, hot_op, list(range(len(order))))
    finally:
        for c in fetchers:
            await c.close()
    return published, cold, hot, raw


async def background(
    addresses: Sequence[tuple[str, int]],
    pids: Sequence[int],
    wait: float = 0.0,
    window: float = BACKGROUND_WINDOW,
) -> dict[str, float]:
    """What the idle peers do by themselves (maintenance, liveness pings) over ``window``
    seconds from ``wait`` seconds on: datagrams per second and CPU seconds per second, all
    peers."""
    await asyncio.sleep(wait)
    datagrams0, cpu0 = await datagrams_sent(addresses), sum(cpu_seconds(p) for p in pids)
    await asyncio.sleep(window)
    return {
        "wait_s": wait,
        "window_s": window,
        "datagrams_s": (await datagrams_sent(addresses) - datagrams0) / window,
        "peers_cpu_s_per_s": (sum(cpu_seconds(p) for p in pids) - cpu0) / window,
    }


async def run(
    root: Path,
    n: int,
    levels: Sequence[int],
    echo_port: int,
    echo_pid: int,
    repair_interval: str | None = None,
    idle_window: tuple[float, float] = (0.0, BACKGROUND_WINDOW),
) -> dict[str, Any]:
    # SIGTERM cancels the run, so that the peers are still stopped (below) and waited for.
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    procs: list[subprocess.Popen[str]] = []
    try:
        extra = ("--repair-interval", repair_interval) if repair_interval else ()
        cache = ("--resolve-cache", RESOLVE_CACHE) if RESOLVE_CACHE else ()  # "": a peer without it
        procs, addresses = start_network(root, PEERS, *cache, *extra)
        t0 = time.perf_counter()
        tables = await wait_formed(addresses)
        formed = time.perf_counter() - t0
        pids = [p.pid for p in procs]
        sources = root / "sources"
        sources.mkdir()
        limits: list[dict[str, Any]] = []
        rows: list[dict[str, Any]] = []
        idle: list[dict[str, Any]] = []
        raws: list[dict[str, Any]] = []
        first = 0
        for c in levels:
            limit = await measure_limit(echo_port, c, max(n, LIMIT_OPS), echo_pid)
            limits.append(row("loopback 4 KiB round trip", c, limit, limit))
            published, cold, hot, (raw_ok, raw_made) = await bench_level(
                c, range(first, first + c + n), addresses, pids, sources
            )
            rows += [
                row("publish", c, published, limit),
                row("fetch (cold)", c, cold, limit),
                row("fetch (hot)", c, hot, limit),
            ]
            raws.append({"concurrency": c, "ok": raw_ok, "checked": raw_made})
            first += c + n
            quiet = await background(addresses, pids, *idle_window)
            idle.append({"concurrency": c, "stored": first, **quiet})
        return {
            "peers": PEERS,
            "formed_after_s": formed,
            "routing_tables": tables,
            "limits": limits,
            "rows": rows,
            "background": idle,
            "read_after_write": raws,
            "peers_peak_rss_mb": [round(peak_rss_mb(p), 1) for p in pids],
        }
    finally:
        stop_processes(procs)


def main() -> int:
    n = int(os.environ.get("DIFS_BENCH_SMALL_N", "500"))
    levels = [int(c) for c in os.environ.get("DIFS_BENCH_SMALL_C", "1,16").split(",")]
    repair = os.environ.get("DIFS_BENCH_SMALL_REPAIR")
    wait, window = (float(x) for x in os.environ.get("DIFS_BENCH_SMALL_IDLE", "0,10").split(","))
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe()
    echo = ctx.Process(target=echo_server_main, args=(child,), daemon=True)
    echo.start()
    try:
        echo_port = int(parent.recv())
        assert echo.pid is not None
        with tempfile.TemporaryDirectory(prefix="difs-bench-small-") as tmp:
            result = asyncio.run(
                run(Path(tmp), n, levels, echo_port, echo.pid, repair, (wait, window))
            )
    except asyncio.CancelledError:
        print("interrupted by SIGTERM; peers stopped", file=sys.stderr)
        return 128 + signal.SIGTERM
    finally:
        echo.terminate()
        echo.join(timeout=STOP_TIMEOUT)
    result.update(
        {
            "object_size": OBJECT_SIZE,
            "replicas": REPLICAS,
            "ops_per_phase": n,
            "concurrency": levels,
            "repair_interval": repair or "default",
            "resolve_cache_s": float(RESOLVE_CACHE or 0),
            "loadavg": os.getloadavg(),
            "cpus": os.cpu_count(),
        }
    )
    print(
        f"{'op':<28}{'C':>4}{'ops/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'x limit':>9}{'target':>8}"
        f"{'x target':>9}{'errors':>7}{'client CPU':>11}{'peers CPU':>10}{'UDP dgrams':>11}"
        f"{'lookups':>8}"
    )
    for r in [*result["limits"], *result["rows"]]:
        target = r.get("target_ops_s")
        print(
            f"{r['op']:<28}{r['concurrency']:>4}{r['ops_s']:>9.0f}{r['p50_ms']:>9.2f}"
            f"{r['p99_ms']:>9.2f}{r['x_limit']:>9.4f}{target or math.nan:>8.0f}"
            f"{r.get('x_target', math.nan):>9.3f}{r['errors']:>7}"
            f"{r['client_cpu_ms_per_op']:>11.2f}{r['peers_cpu_ms_per_op']:>10.2f}"
            f"{r['udp_datagrams_per_op']:>11.0f}{r['dht_lookups_per_op']:>8.1f}"
        )
    for check in result["read_after_write"]:
        print(
            f"read-after-write at C={check['concurrency']}: {check['ok']} of {check['checked']} "
            "writers read their update at once through their entry peer"
        )
    print(
        "CPU columns: ms per operation of this process and of all peers together; UDP: "
        "datagrams the peers sent per operation; lookups: DHT lookups the peers ran per "
        "operation (maintenance included; a hot fetch answered from the cache runs none). "
        f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}."
    )
    for b in result["background"]:
        print(
            f"idle after C={b['concurrency']} ({b['stored']} objects stored), "
            f"{b['window_s']:.0f} s from {b['wait_s']:.0f} s on: "
            f"{b['datagrams_s']:.0f} datagrams/s, peers {b['peers_cpu_s_per_s']:.2f} CPU s/s "
            "(maintenance; included in the rows above)"
        )
    write_results("small", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
