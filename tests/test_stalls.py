"""Fetches around holders that stall: real ``difs-peer`` processes, one of them paused."""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p.client import Client
from difs_p2p.config import parse_hostport
from difs_p2p.identity import Identity

BIN = Path(sys.executable).parent
SEG = 64 << 10
# An I/O timeout no fetch may rely on: a fetch that waits for a paused holder never ends.
FOREVER = 3600.0


def start_peer(data: Path, *extra: str) -> tuple[subprocess.Popen[str], tuple[str, int]]:
    proc = subprocess.Popen(
        [str(BIN / "difs-peer"), "join", "--data", str(data), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("peer ready"), line
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return proc, parse_hostport(fields["address"])


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[tuple[subprocess.Popen[str], tuple[str, int]]]]:
    """Four peer processes, all bootstrapped from the first; stopped (and resumed) after."""
    started: list[tuple[subprocess.Popen[str], tuple[str, int]]] = []
    try:
        started.append(start_peer(tmp_path / "p0"))
        seed = f"{started[0][1][0]}:{started[0][1][1]}"
        for i in range(1, 4):
            started.append(start_peer(tmp_path / f"p{i}", "--bootstrap", seed))
        yield started
    finally:
        for proc, _ in started:
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        for proc, _ in started:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def stopped(pid: int) -> bool:
    """Whether the process is stopped by a signal (state T in /proc)."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"


async def test_a_paused_holder_does_not_hold_up_a_fetch(
    processes: list[tuple[subprocess.Popen[str], tuple[str, int]]], tmp_path: Path
) -> None:
    """With one holder stopped (SIGSTOP) and two others of every range up, a fetch to a file
    and one to a stream return the exact bytes without waiting for it (what it owed was
    asked of the others) and report progress for every segment."""
    entry = processes[0][1]
    src = tmp_path / "src"
    src.write_bytes(os.urandom(256 * SEG))
    async with Client(entry, publisher=Identity.generate()) as client:
        await client.put(src, "/stall/video", segment_size=SEG, replicas=3)
        resolved = await client.resolve("/stall/video")
    holders = {(h.host, h.port) for h in resolved.holders}
    proc, paused = next((p, a) for p, a in processes[1:] if a in holders)
    proc.send_signal(signal.SIGSTOP)
    out = tmp_path / "out"
    progressed: list[int] = []
    async with asyncio.timeout(120):  # only a guard: a fetch that waits never ends
        async with Client(entry, io_timeout=FOREVER) as client:
            result = await client.get("/stall/video", out, progress=progressed.append)
            stream = io.BytesIO()
            streamed = await client.get("/stall/video", stream)
    assert stopped(proc.pid), "the holder was paused during both fetches"
    assert out.read_bytes() == src.read_bytes()
    assert stream.getvalue() == src.read_bytes()
    assert sum(progressed) == len(src.read_bytes()) and len(progressed) == 256
    for fetched in (result, streamed):
        assert paused in fetched.late
        assert fetched.hedged >= 1
