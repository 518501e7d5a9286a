"""``make bench``: how long the ``difs`` command takes as a whole, start-up included.

A network of 3 ``difs-peer`` processes and a 6-byte object published on it; then, 20
rounds (``DIFS_BENCH_STARTUP_RUNS``) that each run every command once, in turn, so that the
machine's other load falls on all of them alike: ``python -c pass`` (the limit: the
interpreter alone), ``difs --help``, ``difs get NAME -o FILE``, ``difs get NAME -o -``
(stdout), ``difs put`` of a 6-byte file under a new name, the same get through the
typer app (``cli.client_main``, the entry point before ``cli_fast``), and through the
asyncio client (``cli_content.get_content`` with the quick path of quickget.py off: what
``difs get`` of a small object cost before it). Wall time of each
process, median and p90, and each median as a ratio to ``python -c pass`` (target <= 3);
the 10 modules that take longest to import on the get path (``python -X importtime``,
self time). Writes ``bench/results/startup.json``.

Commands run from this checkout's virtualenv, as installed (``pip install -e``: an
editable install's path finder is loaded by every interpreter, ``python -c pass``
included), and, unless ``DIFS_BENCH_STARTUP_INSTALL=0``, again from a virtualenv with a
regular ``pip install .`` of the checkout (no finder; the dependencies from the first one).
Bytecode caching is on for the commands (``PYTHONDONTWRITEBYTECODE`` removed), and each
command runs once before the rounds, as an installed package has its ``.pyc`` files.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.peers import start_network, stop_processes, write_results

ROOT = Path(__file__).resolve().parent.parent
SMALL = b"hello\n"
# the typer app, as the `difs` script ran it before cli_fast
TYPER = "import sys; sys.argv[0] = 'difs'; from difs_p2p.cli import client_main; client_main()"
# `difs get NAME -o FILE` through the asyncio client (the quick path off)
ASYNCIO = (
    "import sys; from difs_p2p.cli_content import get_content; "
    "get_content(sys.argv[1], sys.argv[2], quick=False)"
)


def percentile(values: list[float], p: float) -> float:
    """The ``p`` quantile (0..1) of ``values``, nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(p * len(ordered)) - 1))]


def timed(cmd: list[str], env: dict[str, str]) -> float:
    """Wall seconds of ``cmd`` as a process; it must succeed."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.decode()}")
    return seconds


def commands(bin_dir: Path, work: Path, name: str) -> dict[str, Callable[[int], list[str]]]:
    """Each measured command, as a function of the round (put publishes a new name)."""
    python, difs = str(bin_dir / "python"), str(bin_dir / "difs")
    out = str(work / "out.txt")
    src = str(work / "small.txt")
    return {
        "python -c pass": lambda i: [python, "-c", "pass"],
        "difs --help": lambda i: [difs, "--help"],
        "difs get -o FILE": lambda i: [difs, "get", name, "-o", out],
        "difs get -o -": lambda i: [difs, "get", name, "-o", "-"],
        "difs put": lambda i: [difs, "put", src, f"{name}.{bin_dir.parent.name}.{i}"],
        "typer: difs get -o FILE": lambda i: [python, "-c", TYPER, "get", name, "-o", out],
        "asyncio: difs get -o FILE": lambda i: [python, "-c", ASYNCIO, name, out],
    }


def measure(bin_dir: Path, work: Path, name: str, env: dict[str, str], runs: int) -> dict[str, Any]:
    """Median and p90 wall time of every command over ``runs`` rounds, and ratios."""
    cmds = commands(bin_dir, work, name)
    for make in cmds.values():  # bytecode written, caches warm
        timed(make(-1), env)
    times: dict[str, list[float]] = {label: [] for label in cmds}
    for i in range(runs):
        for label, make in cmds.items():
            times[label].append(timed(make(i), env))
    base = statistics.median(times["python -c pass"])
    return {
        label: {
            "median_ms": round(statistics.median(t) * 1000, 1),
            "p90_ms": round(percentile(t, 0.9) * 1000, 1),
            "x_python": round(statistics.median(t) / base, 2),
        }
        for label, t in times.items()
    }


def import_top(bin_dir: Path, name: str, work: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    """The 10 modules with the most import self time in one ``difs get`` (-X importtime)."""
    get = [str(bin_dir / "difs"), "get", name, "-o", str(work / "out.txt")]
    done = subprocess.run(
        [str(bin_dir / "python"), "-X", "importtime", *get],
        env=env,
        capture_output=True,
        text=True,
    )
    rows: list[dict[str, Any]] = []
    for line in done.stderr.splitlines():
        if line.startswith("import time:") and "self [us]" not in line:
            own, total, module = line.removeprefix("import time:").split("|")
            rows.append(
                {"module": module.strip(), "self_ms": int(own) / 1000, "cum_ms": int(total) / 1000}
            )
    total_ms = sum(r["self_ms"] for r in rows)
    top = sorted(rows, key=lambda r: -r["self_ms"])[:10]
    return [{"all_imports_ms": round(total_ms, 1), "modules": len(rows)}, *top]


def editable_finder_ms(bin_dir: Path, env: dict[str, str]) -> float:
    """What the editable install's finder costs every interpreter (-X importtime)."""
    done = subprocess.run(
        [str(bin_dir / "python"), "-X", "importtime", "-c", "pass"],
        env=env,
        capture_output=True,
        text=True,
    )
    for line in done.stderr.splitlines():
        if "__editable__" in line and line.split("|")[-1].strip().startswith("__editable"):
            return int(line.split("|")[1]) / 1000
    return 0.0


def regular_install(root: Path) -> Path | None:
    """A virtualenv with ``pip install .`` of this checkout (the wheel built here, its
    dependencies those of the running one, through a .pth file); its bin directory, or
    None if pip failed."""
    venv = root / "regular"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    purelib = Path(sysconfig.get_path("purelib", vars={"base": str(venv), "platbase": str(venv)}))
    pip = [sys.executable, "-m", "pip", "--quiet"]
    wheels = root / "wheels"
    had_build = (ROOT / "build").exists()
    done = subprocess.run(
        [*pip, "wheel", "--no-deps", "-w", str(wheels), str(ROOT)],
        capture_output=True,
        text=True,
    )
    if done.returncode == 0:
        wheel = next(wheels.glob("difs_p2p-*.whl"))
        target = ["--python", str(venv / "bin" / "python"), "install", "--no-deps", str(wheel)]
        done = subprocess.run([*pip, *target], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"regular install failed, skipped: {done.stderr.strip()[-500:]}", file=sys.stderr)
        return None
    deps = Path(sysconfig.get_paths()["purelib"])
    (purelib / "zz_deps.pth").write_text(f"{deps}\n")
    if not had_build:  # the build directory setuptools leaves in the checkout
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    return venv / "bin"


def show(title: str, rows: dict[str, Any]) -> None:
    print(title)
    print(f"  {'command':<28}{'median ms':>10}{'p90 ms':>10}{'x python':>10}")
    for label, row in rows.items():
        print(f"  {label:<28}{row['median_ms']:>10}{row['p90_ms']:>10}{row['x_python']:>10}")


def main() -> int:
    runs = int(os.environ.get("DIFS_BENCH_STARTUP_RUNS", "20"))
    bin_dir = Path(sys.executable).parent
    with tempfile.TemporaryDirectory(prefix="difs-bench-startup-") as tmp:
        root = Path(tmp)
        work = root / "work"
        work.mkdir()
        (work / "small.txt").write_bytes(SMALL)
        procs, addresses = start_network(root / "net", 3, "--http", "off")
        try:
            host, port = addresses[0]
            env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
            env.update(
                DIFS_HOME=str(root / "home"),
                DIFS_PEER=f"{host}:{port}",
                DIFS_TOKEN_FILE=str(root / "net" / "p0" / "control.token"),
                COLUMNS="80",
            )
            name = "/bench/startup.txt"
            timed([str(bin_dir / "difs"), "put", str(work / "small.txt"), name], env)
            result: dict[str, Any] = {
                "runs": runs,
                "object_bytes": len(SMALL),
                "editable": measure(bin_dir, work, name, env, runs),
                "editable_finder_ms": editable_finder_ms(bin_dir, env),
                "get_imports_top10": import_top(bin_dir, name, work, env),
            }
            regular = (
                regular_install(root)
                if os.environ.get("DIFS_BENCH_STARTUP_INSTALL") != "0"
                else None
            )
            if regular is not None:
                result["regular"] = measure(regular, work, name, env, runs)
        finally:
            stop_processes(procs)
    show(
        f"start-up, {runs} rounds, editable install (finder {result['editable_finder_ms']} ms)",
        result["editable"],
    )
    if "regular" in result:
        show("regular install (pip install .)", result["regular"])
    summary, *top = result["get_imports_top10"]
    print(
        f"difs get imports: {summary['all_imports_ms']} ms self in {summary['modules']} modules;"
        " top 10:"
    )
    for row in top:
        print(f"  {row['self_ms']:7.1f} ms  {row['module']}")
    print(f"wrote {write_results('startup', result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
