"""Multi-host benchmark: peers in network namespaces on a bridge (tests/netns.py).

``python -m bench.multihost [fetch|rejoin|drain|all]`` (``make bench`` runs all; needs
root and ``ip netns``, else it says why and does nothing):

* fetch: one peer on h1 holds an object (``DIFS_BENCH_MULTIHOST_MIB``, default 256 MiB,
  r = 1); the whole ``difs get`` command is timed from h2 (across the veth pair and the
  bridge) and from h1 (its loopback), to a file and to /dev/null; against the TCP limit of
  each path measured in the same run with a plain socket pair (``sendall`` -> ``recv_into``).
* rejoin: five peers; h5's link goes down until its routing table is empty, then comes
  back: seconds until it has contacts again (and how long emptying took).
* drain: six peers, objects published with r = 3 until one peer holds about
  ``DIFS_BENCH_DRAIN_MIB`` (default 1024 MiB); ``difs-peer leave`` on it: seconds until it
  exited, bytes its host sent meanwhile and bytes all hosts sent (veth counters), and
  whether every range then has r live copies.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers import write_results
from tests.netns import BIN, Host, Net, PeerProc, netns_missing

MiB = 1 << 20
PORT = 4000
TCP_PORT = 5001
FAST_MAINTENANCE = ("--repair-interval", "0.5", "--resolve-every", "1", "--dead-after", "2")


# -- the TCP limit of a path: a sink in one namespace, a sender in another ------------------


def tcp_sink(port: int) -> None:
    """Accept one connection, read until it closes, print the byte count."""
    server = socket.socket()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind(("0.0.0.0", port))
    server.listen()
    print("listening", flush=True)
    conn, _ = server.accept()
    buf = bytearray(MiB)
    view = memoryview(buf)
    got = 0
    while n := conn.recv_into(view):
        got += n
    print(got, flush=True)


def tcp_send(host: str, port: int, total: int) -> None:
    """Send ``total`` bytes in 1 MiB writes; print MB/s (until the sink has read them all)."""
    data = os.urandom(MiB)
    sock = socket.create_connection((host, port))
    t0 = time.perf_counter()
    for _ in range(total // MiB):
        sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)
    sock.recv(1)  # the sink closes once it has read everything
    print(total / (time.perf_counter() - t0) / 1e6, flush=True)


def tcp_limit(sink: Host, sender: Host, to: str, total: int) -> float:
    """MB/s of a plain socket pair from ``sender`` to ``to`` (an address of ``sink``)."""
    py = sys.executable
    server = sink.popen(py, "-m", "bench.multihost", "sink", str(TCP_PORT))
    assert server.stdout is not None
    server.stdout.readline()
    try:
        out = sender.run(py, "-m", "bench.multihost", "send", to, str(TCP_PORT), str(total))
        return float(out.stdout.strip())
    finally:
        server.wait(timeout=60)


# -- the parts -------------------------------------------------------------------------------


def timed_get(host: Host, entry: str, name: str, out: str, home: Path) -> dict[str, Any]:
    t0 = time.perf_counter()
    proc = host.run(
        str(BIN / "difs"),
        "get",
        name,
        "--peer",
        entry,
        "-o",
        out,
        "--json",
        env=host.env(home),
        timeout=600,
    )
    wall = time.perf_counter() - t0
    reported = json.loads(proc.stdout)
    return {
        "wall_s": round(wall, 3),
        "mb_per_s": round(reported["bytes"] / wall / 1e6, 1),
        "fetch_mb_per_s": reported["mb_per_s"],
    }


def part_fetch(root: Path, size: int) -> dict[str, Any]:
    with Net(root / "fetch", hosts=2) as net:
        h1, h2 = net.hosts
        peer = net.start_peers(
            (h1, ["--listen", h1.ipv4, "--port", str(PORT), "--capacity", "64GiB"])
        )[0]
        src = root / "src"
        with src.open("wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
        peer.difs("put", str(src), "/bench/multihost", "--replicas", "1", timeout=600)
        src.unlink()
        result: dict[str, Any] = {"object_bytes": size}
        for path, client in (("veth", h2), ("loopback", h1)):
            home = root / f"client-{path}"
            out = root / f"out-{path}"
            result[path] = {
                "file": timed_get(client, peer.address, "/bench/multihost", str(out), home),
                "devnull": timed_get(client, peer.address, "/bench/multihost", "/dev/null", home),
                "tcp_limit_mb_per_s": round(tcp_limit(h1, client, h1.ipv4, 2 * size), 1),
            }
            out.unlink()
            r = result[path]
            r["ratio_devnull_to_tcp"] = round(r["devnull"]["mb_per_s"] / r["tcp_limit_mb_per_s"], 3)
        return result


def wait(condition: Callable[[], bool], timeout: float) -> float | None:
    """Seconds until ``condition()`` held, None if it did not within ``timeout``."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout:
        if condition():
            return round(time.perf_counter() - t0, 2)
        time.sleep(0.1)
    return None


def network(net: Net, hosts: list[Host], *extra: str) -> list[PeerProc]:
    flag = "--listen"
    first = net.start_peers((hosts[0], [flag, hosts[0].ipv4, "--port", str(PORT), *extra]))[0]
    rest = net.start_peers(
        *(
            (h, [flag, h.ipv4, "--port", str(PORT), "--bootstrap", first.address, *extra])
            for h in hosts[1:]
        )
    )
    return [first, *rest]


def knows(peer: PeerProc, other: PeerProc) -> bool:
    """Whether ``other`` is among the contacts ``peer``'s status lists (its 10 nearest)."""
    return other.address in {c["address"] for c in peer.status()["contacts"]}


def part_rejoin(root: Path) -> dict[str, Any]:
    with Net(root / "rejoin", hosts=5) as net:
        peers = network(net, net.hosts, *FAST_MAINTENANCE)
        src = root / "small"
        src.write_bytes(os.urandom(64 << 10))
        # r = 5: h5 holds it, so its maintenance keeps asking the DHT (and losing requests)
        peers[0].difs("put", str(src), "/bench/rejoin", "--replicas", "5")
        isolated = peers[4]
        net["h5"].cut()
        emptied = wait(lambda: isolated.status()["routing_table"] == 0, 180)
        # and the others forget it: only its own rejoin brings it back
        forgotten = wait(lambda: not any(knows(p, isolated) for p in peers[:4]), 180)
        net["h5"].restore()
        rejoined = wait(lambda: isolated.status()["routing_table"] > 0, 180)
        return {
            "seconds_to_empty_table": emptied,
            "seconds_until_forgotten_by_all": forgotten,
            "seconds_to_rejoin": rejoined,
        }


def veth_tx(net: Net) -> dict[str, int]:
    """Bytes each host has sent so far (its veth's bridge side received them)."""
    return {
        h.name: int(Path(f"/sys/class/net/{h.veth}/statistics/rx_bytes").read_text())
        for h in net.hosts
    }


def part_drain(root: Path, target: int) -> dict[str, Any]:
    with Net(root / "drain", hosts=6) as net:
        peers = network(net, net.hosts, *FAST_MAINTENANCE, "--capacity", "64GiB")
        leaving = peers[3]
        chunk = 128 * MiB
        src = root / "chunk"
        n = 0
        while leaving.status()["storage"]["used"] < target and n < 64:
            with src.open("wb") as fh:
                for _ in range(chunk // MiB):
                    fh.write(os.urandom(MiB))
            peers[0].difs("put", str(src), f"/bench/drain/{n}", "--replicas", "3", timeout=600)
            n += 1
        src.unlink()
        held = leaving.status()["storage"]["used"]
        before = veth_tx(net)
        t0 = time.perf_counter()
        net["h4"].run(
            str(BIN / "difs-peer"),
            "leave",
            "--peer",
            leaving.address,
            env=net["h4"].env(leaving.home),
            timeout=3600,
        )
        leaving.proc.wait(timeout=600)
        seconds = time.perf_counter() - t0
        after = veth_tx(net)
        short = 0
        for i in range(n):
            st = json.loads(
                net["h1"].difs("stat", f"/bench/drain/{i}", "--peer", peers[0].address, "--json")
            )
            short += sum(1 for r in st["ranges"] if r["live"] < 3)
        return {
            "held_bytes": held,
            "seconds_to_exit": round(seconds, 2),
            "bytes_sent_by_leaving_host": after["h4"] - before["h4"],
            "bytes_sent_by_all_hosts": sum(after[h] - before[h] for h in after),
            "ranges_short_after": short,
        }


def main(argv: list[str]) -> int:
    if argv[:1] == ["sink"]:
        tcp_sink(int(argv[1]))
        return 0
    if argv[:1] == ["send"]:
        tcp_send(argv[1], int(argv[2]), int(argv[3]))
        return 0
    missing = netns_missing()
    if missing:
        print(f"multihost benchmark skipped: {missing}")
        return 0
    parts = argv[:1] or ["all"]
    size = int(os.environ.get("DIFS_BENCH_MULTIHOST_MIB", "256")) * MiB
    drain = int(os.environ.get("DIFS_BENCH_DRAIN_MIB", "1024")) * MiB
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="difs-multihost-") as tmp:
        root = Path(tmp)
        if parts[0] in ("fetch", "all"):
            result["fetch"] = part_fetch(root, size)
        if parts[0] in ("rejoin", "all"):
            result["rejoin"] = part_rejoin(root)
        if parts[0] in ("drain", "all"):
            result["drain"] = part_drain(root, drain)
    print(json.dumps(result, indent=2))
    write_results("multihost", result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
