"""Profiles of what the user waits for: py-spy samples of the client command and of every
peer while it runs, summarized by where the CPU goes.

Run with ``python -m bench.profile`` (``make profile``); it needs py-spy (dev extra) and the
right to trace the processes (root, or ``ptrace_scope`` 0). ``DIFS_PROFILE`` picks the
scenarios (default ``put1,put3,get,small``); ``DIFS_PROFILE_MIB`` the size (default 256).

- ``put1``, ``put3``: ``difs put`` of the file with r = 1 and r = 3 into 3 peer processes.
- ``get``: ``difs get NAME -o FILE`` of the r = 1 object, from another entry peer than its
  holder, and the same to /dev/null.
- ``small``: ``python -m bench.small`` at 16 concurrent clients (20 peers, 4 KiB objects,
  ``DIFS_BENCH_SMALL_N`` 200 by default), the runner and every peer sampled together
  (``--subprocesses``; their start-up is in the samples too).

Each process is sampled at 250 Hz without stopping it (``--nonblocking``). The summary per
process: the samples taken (CPU time, not waiting), the functions with the most samples of
their own (where the CPU is spent, C calls included as the Python line that made them),
the project's functions with the most samples of their own or of anything they called
that is not the project's (which of our code spends it), and the task each sample was in.
Samples of a thread waiting (its innermost frame a selector, a lock or a work queue) are
counted apart; the others are time at work, CPU or a blocking system call such as fsync.
Printed, and written with the raw collapsed stacks to
``bench/results/profile-SCENARIO-PROCESS.txt``.
"""

from __future__ import annotations

import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from bench.peers import start_network, stop_processes

MiB = 1 << 20
BIN = Path(sys.executable).parent
RATE = 250
TOP = 12
# Innermost frames of a thread that waits (for a socket, a lock, work): in --nonblocking
# mode py-spy samples those too; the summary counts them apart.
IDLE = frozenset({"EpollSelector.select", "Condition.wait", "_worker", "Event.wait"})
# Where a library's or the standard library's path starts to name the module.
_LIBRARY = re.compile(r"^.*(?:site-packages/|lib/python3\.\d+/)")
# A frame in py-spy's collapsed output: "function (path/to/file.py:LINE)".
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def py_spy() -> str:
    found = shutil.which("py-spy", path=str(BIN)) or shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: pip install py-spy (the dev extra has it)")
    return found


def frame_key(frame: str) -> tuple[str, str]:
    """A frame's (function, short file): line numbers dropped so a function's lines add up."""
    m = _FRAME.match(frame.strip())
    if m is None:
        return frame.strip(), ""
    path = m.group("file")
    if "difs_p2p/" in path:
        path = "difs_p2p/" + path.rsplit("difs_p2p/", 1)[1]
    else:  # a library's or the standard library's: from its package on
        path = _LIBRARY.sub("", path)
    return m.group("func"), path


def parse_collapsed(lines: Iterable[str]) -> list[tuple[list[str], int]]:
    """py-spy's raw (collapsed) output: each stack's frames, outermost first, and samples."""
    stacks: list[tuple[list[str], int]] = []
    for line in lines:
        line = line.rstrip("\n")
        if not line:
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        stacks.append((stack.split(";"), int(count)))
    return stacks


def process_of(frames: Sequence[str]) -> str:
    """The innermost process frame of a ``--subprocesses`` stack: 'process PID:"COMMAND"'."""
    named = [f for f in frames if f.startswith("process ")]
    return named[-1] if named else ""


def task_of(keys: Sequence[tuple[str, str]]) -> tuple[str, str]:
    """What the event loop or a worker thread was running: the frame right under the last
    ``Handle._run`` (a task's coroutine or a callback) or ``_worker`` (a function sent to a
    thread); the outermost frame when there is neither."""
    for i in range(len(keys) - 1, -1, -1):
        if keys[i][0] in ("Handle._run", "_worker") and i + 1 < len(keys):
            inner = keys[i + 1 :]
            if inner[0][0] == "_WorkItem.run" and len(inner) > 1:  # the thread's function
                return inner[1]
            return inner[0]
    return keys[0]


def summarize(stacks: Sequence[tuple[list[str], int]], top: int = TOP, rate: int = RATE) -> str:
    """Samples in all; the top functions by own samples; our functions by the samples of
    their own plus of the non-project code under them; and by task (:func:`task_of`)."""
    total = waiting = 0
    own: collections.Counter[tuple[str, str]] = collections.Counter()
    ours: collections.Counter[tuple[str, str]] = collections.Counter()
    tasks: collections.Counter[tuple[str, str]] = collections.Counter()
    for frames, n in stacks:
        keys = [frame_key(f) for f in frames if not f.startswith(("process ", "thread "))]
        if not keys:
            continue
        if keys[-1][0] in IDLE:
            waiting += n
            continue
        total += n
        own[keys[-1]] += n
        project = [k for k in keys if k[1].startswith("difs_p2p/")]
        ours[project[-1] if project else ("(outside the project)", "")] += n
        tasks[task_of(keys)] += n
    out = [
        f"{total} samples at {rate} Hz ({total / rate:.2f} s) at work, {waiting} waiting "
        "(shares below: of the samples at work)"
    ]
    views = (
        ("own samples", own),
        ("project function (with what it calls)", ours),
        ("task (the coroutine, callback or thread function running)", tasks),
    )
    for title, counter in views:
        out.append(f"  top by {title}:")
        for (func, path), n in counter.most_common(top):
            out.append(f"    {100 * n / max(total, 1):5.1f}%  {func}  {path}")
    return "\n".join(out)


class Recorder:
    """py-spy attached to running processes until :meth:`stop`; their collapsed stacks."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.procs: list[tuple[str, Path, subprocess.Popen[bytes]]] = []

    def attach(self, label: str, pid: int) -> None:
        path = self.out / f"{label}.raw"
        cmd = [py_spy(), "record", "--pid", str(pid), "--rate", str(RATE), "--nonblocking"]
        cmd += ["--format", "raw", "--output", str(path)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.procs.append((label, path, proc))

    def stop(self) -> dict[str, list[tuple[list[str], int]]]:
        for _, _, proc in self.procs:
            proc.send_signal(signal.SIGINT)
        result = {}
        for label, path, proc in self.procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            text = path.read_text() if path.exists() else ""
            result[label] = parse_collapsed(text.splitlines())
        self.procs.clear()
        return result


def record_command(
    label: str, args: list[str], out: Path, env: dict[str, str]
) -> tuple[float, list[tuple[list[str], int]]]:
    """Run ``args`` under py-spy from its start; its wall time and collapsed stacks."""
    path = out / f"{label}.raw"
    cmd = [py_spy(), "record", "--rate", str(RATE), "--nonblocking", "--format", "raw"]
    cmd += ["--output", str(path), "--", *args]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args)} failed under py-spy: {done.stderr.strip()[-2000:]}")
    return wall, parse_collapsed(path.read_text().splitlines())


def report(
    scenario: str, profiles: dict[str, list[tuple[list[str], int]]], note: str, rate: int = RATE
) -> None:
    results = Path("bench/results")
    results.mkdir(parents=True, exist_ok=True)
    print(f"== {scenario}: {note}")
    for label, stacks in profiles.items():
        text = f"-- {label}: {summarize(stacks, rate=rate)}"
        print(text)
        raw = "\n".join(f"{';'.join(f)} {n}" for f, n in stacks)
        (results / f"profile-{scenario}-{label}.txt").write_text(f"{text}\n\n{raw}\n")


def difs_cmd(*args: str) -> list[str]:
    return [str(BIN / "difs"), *args]


def profiled(
    scenario: str, cmd: list[str], size: int, peers: dict[int, str], root: Path, env: dict[str, str]
) -> None:
    """Run the command ``cmd`` (moving ``size`` bytes) under py-spy with every peer of
    ``peers`` (pid: label) sampled meanwhile; report the profiles as ``scenario``."""
    rec = Recorder(root)
    for pid, label in peers.items():
        rec.attach(f"{scenario}-{label}", pid)
    time.sleep(0.5)  # py-spy attached before the first byte (it signals nothing to wait on)
    wall, client = record_command(f"{scenario}-client", cmd, root, env)
    sampled = rec.stop()
    profiles = {"client": client, **{k.split("-", 1)[1]: v for k, v in sampled.items()}}
    shown = " ".join([Path(cmd[0]).name, *cmd[1:]])
    note = f"{shown}: whole command {wall:.2f} s, {size / wall / 1e6:.0f} MB/s"
    report(scenario, profiles, note)


def content(root: Path, size_mib: int, wanted: set[str]) -> None:
    procs, addresses = start_network(root, 3)
    entry, other = (f"{h}:{p}" for h, p in (addresses[0], addresses[1]))
    env = dict(os.environ, DIFS_HOME=str(root / "home"))
    env["DIFS_TOKEN_FILE"] = str(root / "p0" / "control.token")
    src = root / "src.bin"
    with src.open("wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MiB))
    subprocess.run(difs_cmd("key", "new"), env=env, check=True, capture_output=True)
    peers = {p.pid: f"peer{i}" for i, p in enumerate(procs)}
    try:
        for r in (1, 3):
            # entering through peer0; the get below enters through peer1
            put = difs_cmd("put", str(src), f"/profile/r{r}.bin", "--replicas", str(r))
            put += ["--peer", entry]
            if f"put{r}" in wanted:
                profiled(f"put{r}", put, size_mib * MiB, peers, root, env)
            elif r == 1 and "get" in wanted:
                subprocess.run(put, env=env, check=True, capture_output=True)
        if "get" in wanted:
            out = root / "out.bin"
            for target, path in (("file", str(out)), ("null", os.devnull)):
                get = difs_cmd("get", "/profile/r1.bin", "-o", path, "--peer", other)
                profiled(f"get-{target}", get, size_mib * MiB, peers, root, env)
            out.unlink()
    finally:
        stop_processes(procs)


def small(root: Path) -> None:
    env = dict(os.environ, DIFS_BENCH_SMALL_C="16")
    rate = 100  # 21 processes sampled on the same cores: a lower rate disturbs them less
    env.setdefault("DIFS_BENCH_SMALL_N", "200")
    path = root / "small.raw"
    cmd = [py_spy(), "record", "--subprocesses", "--rate", str(rate), "--nonblocking"]
    cmd += ["--format", "raw", "--output", str(path), "--", sys.executable, "-m", "bench.small"]
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"bench.small failed under py-spy: {done.stderr.strip()[-2000:]}")
    by_kind: dict[str, list[tuple[list[str], int]]] = {"runner": [], "peers": []}
    for frames, n in parse_collapsed(path.read_text().splitlines()):
        kind = "peers" if "difs-peer" in process_of(frames) else "runner"
        by_kind[kind].append((frames, n))
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("op ", "publish", "fetch"))]
    note = f"bench.small C=16 under py-spy, {wall:.1f} s\n" + "\n".join(lines)
    report("small", by_kind, note, rate)


def main() -> None:
    wanted = set(os.environ.get("DIFS_PROFILE", "put1,put3,get,small").split(","))
    size = int(os.environ.get("DIFS_PROFILE_MIB", "256"))
    with tempfile.TemporaryDirectory(prefix="difs-profile-") as tmp:
        if wanted & {"put1", "put3", "get"}:
            content(Path(tmp) / "content", size, wanted)
        if "small" in wanted:
            small(Path(tmp))


if __name__ == "__main__":
    main()
