"""The command line of the fuzzers: ``python -m fuzz TARGET|all [options] [-- LIBFUZZER_ARGS]``.

Each target runs under atheris (libFuzzer for Python) in a child process, since libFuzzer
ends its process when it is done. The child instruments ``difs_p2p`` and the libraries that
decode peer bytes for it, starts from the seed corpus in ``fuzz/corpus/<target>/`` and keeps
the inputs it finds interesting in ``fuzz/work/<target>/corpus/``.

By default a child does not stop at the first failing input: it saves the shortest input
seen for each distinct failure (exception type and the deepest frame in our code) to
``fuzz/work/<target>/crashes/<id>.bin``, with its traceback beside it in ``<id>.txt``, and
goes on, so that every target runs its full count of inputs. ``--stop-on-crash`` instead
hands the first failure to libFuzzer, which writes a ``crash-*`` file and stops.
A timeout, a memory limit hit (``-rss_limit_mb``) or a hard crash always stops the child.

Exit status: 0 when no target failed, 1 otherwise, 2 for a usage error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import logging
import re
import shutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

FUZZ_DIR: Final = Path(__file__).resolve().parent
REPO_ROOT: Final = FUZZ_DIR.parent
CORPUS_DIR: Final = FUZZ_DIR / "corpus"
DEFAULT_WORK_DIR: Final = FUZZ_DIR / "work"
# Our code and the libraries that decode peer bytes on its behalf (msgpack, the DHT library).
INSTRUMENTED: Final = ("difs_p2p", "kademlia", "rpcudp", "umsgpack")
DEFAULT_RUNS: Final = 100_000
# Above libFuzzer's default of 2048 MB only by mistake: an input that makes a decoder
# allocate by an unchecked length field shows up as an out-of-memory stop.
RSS_LIMIT_MB: Final = 2048
# Seconds for one input; the slowest legitimate input takes milliseconds.
INPUT_TIMEOUT: Final = 25


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m fuzz",
        description="Coverage-guided fuzzing of DIFS-P2P's decoders with atheris. "
        "Arguments after -- go to libFuzzer.",
        epilog="example: python -m fuzz all --runs 100000; "
        "python -m fuzz names --runs -1 -- -max_total_time=600",
    )
    parser.add_argument("target", help="a target name, 'all', or 'list' to print the names")
    parser.add_argument(
        "--runs", type=int, default=DEFAULT_RUNS, help="inputs per target (default: %(default)s)"
    )
    parser.add_argument("--max-len", type=int, default=None, help="default: per target")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=DEFAULT_WORK_DIR,
        help="where corpora, logs and crashes go (default: fuzz/work)",
    )
    parser.add_argument(
        "--stop-on-crash", action="store_true", help="stop at the first failing input"
    )
    parser.add_argument(
        "--reproduce",
        type=Path,
        nargs="+",
        metavar="FILE",
        help="run the target once on each FILE, without atheris, and show any failure",
    )
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything after "--" goes to libFuzzer as it is.
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = _parser().parse_args(argv[: len(argv) - len(extra) - (1 if "--" in argv else 0)])
    args.libfuzzer_args = extra
    if args.in_process:
        return _fuzz_in_process(args)
    # Imported here: the child must import difs_p2p for the first time under instrumentation.
    from fuzz.targets import TARGETS

    if args.target == "list":
        for name, target in TARGETS.items():
            print(f"{name}  (max_len {target.max_len})")
        return 0
    names = list(TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        print(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}", file=sys.stderr)
        return 2
    if args.reproduce:
        return _reproduce(TARGETS[names[0]].function, args.reproduce)
    try:
        importlib.import_module("atheris")
    except ImportError:
        print("atheris is not installed: pip install -e '.[fuzz]'", file=sys.stderr)
        return 2
    results = []
    for name in names:
        echo = len(names) == 1
        result = _run_child(name, args, echo=echo)
        results.append(result)
        if not echo:
            print(f"{name}: {result.outcome}", flush=True)
    print()
    print(_table(results))
    return 0 if all(r.ok for r in results) else 1


# -- the parent: one child per target -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    target: str
    inputs: int
    seconds: float
    crashes: list[Path]
    outcome: str
    ok: bool


def _run_child(name: str, args: argparse.Namespace, *, echo: bool) -> Result:
    work: Path = args.work_dir.resolve() / name
    crash_dir = work / "crashes"
    shutil.rmtree(crash_dir, ignore_errors=True)
    crash_dir.mkdir(parents=True)
    command = [sys.executable, "-m", "fuzz", name, "--in-process", "--runs", str(args.runs)]
    command += ["--work-dir", str(args.work_dir.resolve())]
    if args.max_len is not None:
        command += ["--max-len", str(args.max_len)]
    if args.stop_on_crash:
        command.append("--stop-on-crash")
    if args.libfuzzer_args:
        command += ["--", *args.libfuzzer_args]
    log_path = work / "fuzz.log"
    start = time.monotonic()
    with (
        log_path.open("w") as log,
        subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
        ) as child,
    ):
        assert child.stdout is not None
        for line in child.stdout:
            log.write(line)
            if echo or line.startswith("CRASH "):
                sys.stdout.write(line)
                sys.stdout.flush()
    seconds = time.monotonic() - start
    text = log_path.read_text(errors="replace")
    inputs = _executed(text)
    crashes = sorted(crash_dir.glob("*.bin"))
    if child.returncode != 0:
        outcome = f"stopped: {_stop_reason(text)} (exit {child.returncode}; see {log_path})"
        return Result(name, inputs, seconds, crashes, outcome, ok=False)
    if crashes:
        outcome = f"{len(crashes)} distinct failure(s) in {crash_dir}"
        return Result(name, inputs, seconds, crashes, outcome, ok=False)
    return Result(name, inputs, seconds, crashes, "ok", ok=True)


def _executed(log: str) -> int:
    """Inputs run, from libFuzzer's final stats (or its last status line if it stopped)."""
    found = re.findall(r"stat::number_of_executed_units: (\d+)", log)
    if found:
        return int(found[-1])
    status = re.findall(r"^#(\d+)\s", log, flags=re.MULTILINE)
    return int(status[-1]) if status else 0


def _stop_reason(log: str) -> str:
    match = re.search(r"ERROR: libFuzzer: ([\w-]+)", log)
    if "Uncaught Python exception" in log:
        return "uncaught exception"
    return match.group(1) if match else "unknown"


def _table(results: Sequence[Result]) -> str:
    header = ("target", "inputs", "seconds", "exec/s", "failures", "result")
    rows = [
        (
            r.target,
            f"{r.inputs:,}",
            f"{r.seconds:.1f}",
            f"{r.inputs / r.seconds:,.0f}" if r.seconds > 0 else "-",
            str(len(r.crashes)),
            "ok" if r.ok else r.outcome.split(" (")[0].split(" in ")[0],
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        cells = [
            cell.rjust(w) if 0 < i < 5 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        ]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def _reproduce(function: Callable[[bytes], None], paths: Sequence[Path]) -> int:
    failed = 0
    for path in paths:
        try:
            function(path.read_bytes())
        except Exception:
            failed += 1
            print(f"FAIL {path}", file=sys.stderr)
            traceback.print_exc()
        else:
            print(f"ok   {path}")
    return 1 if failed else 0


# -- the child: atheris in this process -----------------------------------------------------


def crash_signature(exc: BaseException) -> str:
    """The exception type and the deepest frame in our code: one per distinct failure."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename != __file__]
    ours = [f for f in frames if "/difs_p2p/" in f.filename or "/fuzz/" in f.filename]
    if not (ours or frames):
        return type(exc).__name__
    frame = (ours or frames)[-1]
    try:
        where = Path(frame.filename).resolve().relative_to(REPO_ROOT).as_posix()
    except ValueError:
        where = frame.filename
    return f"{type(exc).__name__} at {where}:{frame.lineno} in {frame.name}"


def keep_going(
    name: str, function: Callable[[bytes], None], crash_dir: Path
) -> Callable[[bytes], None]:
    """``function``, saving the shortest failing input per distinct failure instead of raising."""
    shortest: dict[str, int] = {}

    def run(data: bytes) -> None:
        try:
            function(data)
        except Exception as exc:
            signature = crash_signature(exc)
            seen = shortest.get(signature)
            if seen is not None and seen <= len(data):
                return
            shortest[signature] = len(data)
            stem = crash_dir / hashlib.sha256(signature.encode()).hexdigest()[:12]
            report = "".join(traceback.format_exception(exc))
            stem.with_suffix(".bin").write_bytes(data)
            stem.with_suffix(".txt").write_text(
                f"{signature}\ninput ({len(data)} bytes): {data.hex()}\n\n{report}"
            )
            if seen is None:
                print(f"CRASH {name}: {signature} -> {stem}.bin", flush=True)
                print(report, flush=True)

    return run


def _fuzz_in_process(args: argparse.Namespace) -> int:
    atheris: Any = importlib.import_module("atheris")
    with atheris.instrument_imports(include=list(INSTRUMENTED)):
        targets = importlib.import_module("fuzz.targets")
    # Peer warnings are expected by the thousand here; failures are reported by the targets.
    logging.getLogger("difs_p2p").propagate = False
    target = targets.TARGETS.get(args.target)
    if target is None:
        print(f"unknown target {args.target!r}", file=sys.stderr)
        return 2
    work: Path = args.work_dir / args.target
    corpus = work / "corpus"
    crash_dir = work / "crashes"
    corpus.mkdir(parents=True, exist_ok=True)
    crash_dir.mkdir(parents=True, exist_ok=True)
    function = target.function
    if not args.stop_on_crash:
        function = keep_going(args.target, function, crash_dir)
    max_len = args.max_len if args.max_len is not None else target.max_len
    libfuzzer_args = [
        f"-runs={args.runs}",
        f"-max_len={max_len}",
        f"-rss_limit_mb={RSS_LIMIT_MB}",
        f"-timeout={INPUT_TIMEOUT}",
        "-print_final_stats=1",
        f"-artifact_prefix={work}/",
        *args.libfuzzer_args,
        str(corpus),
        str(CORPUS_DIR / args.target),
    ]
    atheris.Setup([sys.argv[0], *libfuzzer_args], function)
    atheris.Fuzz()
    return 0
