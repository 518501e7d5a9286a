"""Peer processes for the benchmarks: start a network, ask a peer's status, stop them all;
and where every benchmark writes its JSON."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difs_p2p.control import OperatorCredential, read_token_file
from difs_p2p.ops import StatusRequest
from difs_p2p.transfer import Connection

STOP_TIMEOUT = 30.0
# The control token of each peer started here, by address: the benchmarks are its operator.
TOKENS: dict[tuple[str, int], bytes] = {}


def parse_address(text: str) -> tuple[str, int]:
    host, port = text.rsplit(":", 1)
    return host, int(port)


def start_peer_process(
    data: Path, bootstrap: str | None, *extra: str
) -> tuple[subprocess.Popen[str], str]:
    """A real ``difs-peer join`` process (``extra`` options appended; without an HTTP
    gateway unless ``extra`` gives ``--http``); it and its address."""
    cmd = [
        str(Path(sys.executable).with_name("difs-peer")),
        "join",
        "--data",
        str(data),
        "--capacity",
        "64GiB",
        # every benchmark client connects from 127.0.0.1: no per-address limit for it
        "--no-limit-loopback",
        *extra,
    ]
    if "--http" not in extra:
        # no HTTP gateway unless the benchmark asks for one (each would try 127.0.0.1:8080)
        cmd += ["--http", "off"]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("peer ready"):
        proc.kill()
        raise SystemExit(f"peer did not start: {line!r}")
    address = dict(p.split("=", 1) for p in line.split()[2:])["address"]
    TOKENS[parse_address(address)] = read_token_file(data / "control.token")
    return proc, address


def token_of(address: tuple[str, int]) -> bytes:
    """The control token of the peer started at ``address``."""
    return TOKENS[address]


def start_network(
    root: Path, n: int, *extra: str
) -> tuple[list[subprocess.Popen[str]], list[tuple[str, int]]]:
    """``n`` peer processes in ``root``/p0.., all bootstrapped from the first.

    On a failure the ones already started are stopped.
    """
    procs: list[subprocess.Popen[str]] = []
    texts: list[str] = []
    try:
        for i in range(n):
            proc, address = start_peer_process(root / f"p{i}", texts[0] if texts else None, *extra)
            procs.append(proc)
            texts.append(address)
    except BaseException:
        stop_processes(procs)
        raise
    return procs, [parse_address(t) for t in texts]


def stop_processes(procs: Sequence[subprocess.Popen[str]]) -> None:
    """SIGTERM every peer, wait for each; kill one that ignores it."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            print(f"peer pid {proc.pid} ignored SIGTERM; killing it", file=sys.stderr)
            proc.kill()
            proc.wait()


async def peer_status(address: tuple[str, int]) -> dict[str, Any]:
    """A peer's ``status`` control operation (as its operator)."""
    conn = await Connection.open(
        address, io_timeout=10.0, credential=OperatorCredential(token_of(address))
    )
    try:
        return (await conn.request(StatusRequest())).report
    finally:
        conn.close()


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of a running process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a running process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_results(name: str, result: dict[str, Any]) -> Path:
    """Write ``result`` to ``bench/results/NAME.json``; return the path."""
    out = Path("bench/results")
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=2))
    return path
