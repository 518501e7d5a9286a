"""The quick path of ``difs get`` (quickget.py) and the asyncio client: the same bytes,
output and exit code for every case, run as real processes against real peers.

``quick`` runs ``difs get`` as installed (cli_fast, which takes the quick path when it
can); ``slow`` runs the same command with the quick path off (``cli_content.get_content``
with ``quick=False``), so every difference between the two is the quick path's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p import quickget
from tests.helpers import start_peer_process
from tests.test_cli_fast import masked

BIN = Path(sys.executable).parent
# `difs get` through cli_fast's exit handling, with the quick path off
SLOW = """
import sys
from difs_p2p.cli_common import CommandExit
from difs_p2p.cli_content import get_content
from difs_p2p.cli_fast import fast_command

call = fast_command(sys.argv[1:])
assert call is not None
try:
    get_content(**call[1], quick=False)
except CommandExit as exc:
    sys.exit(exc.code)
"""

Outcome = tuple[int, bytes, str, bytes | None]


def difs(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [str(BIN / "difs"), *argv], capture_output=True, timeout=60, env=env, check=False
    )


def get(
    name: str, out: Path | None, env: dict[str, str], *, quick: bool, extra: tuple[str, ...] = ()
) -> Outcome:
    """``difs get name -o out`` (None: stdout) with ``extra`` options: exit code, stdout,
    stderr with numbers masked, the bytes of ``out`` (None if there is none)."""
    argv = ["get", name, "-o", str(out) if out is not None else "-", *extra]
    cmd = [str(BIN / "difs")] if quick else [sys.executable, "-c", SLOW]
    done = subprocess.run([*cmd, *argv], capture_output=True, timeout=60, env=env, check=False)
    written = out.read_bytes() if out is not None and out.exists() else None
    stderr = masked(done.stderr.decode()).replace(str(out), "OUT")
    return done.returncode, done.stdout, stderr, written


def both(name: str, tmp: Path, env: dict[str, str]) -> tuple[list[Outcome], list[Outcome]]:
    """The outcomes of both paths, to a file and to stdout."""
    results: dict[bool, list[Outcome]] = {}
    for quick in (True, False):
        label = "quick" if quick else "slow"
        results[quick] = [
            get(name, tmp / f"{label}.out", env, quick=quick),
            get(name, None, env, quick=quick),
        ]
    return results[True], results[False]


def holder_of(name: str, env: dict[str, str]) -> str:
    """The address (HOST:PORT) of the one holder of ``name``."""
    done = difs(["stat", name, "--json"], env)
    assert done.returncode == 0, done.stderr
    (storage,) = {s["address"] for s in json.loads(done.stdout)["storages"]}
    return str(storage)


@pytest.mark.parametrize(
    ("host", "literal"),
    [("127.0.0.1", True), ("::1", True), ("fe80::1", True), ("localhost", False), ("a.b", False)],
)
def test_ip_literal(host: str, literal: bool) -> None:
    """Only an IP address is connected to directly; a name goes to the asyncio client."""
    assert quickget.ip_literal(host) is literal


def test_simple_output(tmp_path: Path) -> None:
    """A regular file or a new name in a directory is written here; a directory, a
    device, a FIFO or a missing directory is the asyncio client's (and its errors)."""
    (tmp_path / "file").write_bytes(b"x")
    os.mkfifo(tmp_path / "fifo")
    cases = {
        tmp_path / "file": True,
        tmp_path / "new": True,
        tmp_path: False,
        Path("/dev/null"): False,
        tmp_path / "fifo": False,
        tmp_path / "missing" / "new": False,
    }
    assert {path: quickget.simple_output(path) for path in cases} == cases


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, str], Path]]:
    """Two peer processes; the environment of difs commands using the first, and the root
    of their data directories (p0, p1)."""
    root = tmp_path_factory.mktemp("quick")
    procs = []
    try:
        p0, first = start_peer_process(root / "p0", "--http", "off")
        procs.append(p0)
        p1, _ = start_peer_process(root / "p1", "--http", "off", "--bootstrap", first)
        procs.append(p1)
        env = dict(
            os.environ,
            DIFS_HOME=str(root / "home"),
            DIFS_PEER=first,
            DIFS_TOKEN_FILE=str(root / "p0" / "control.token"),
            COLUMNS="80",
        )
        yield env, root
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=15)


def put(src: Path, name: str, env: dict[str, str], *extra: str) -> None:
    done = difs(["put", str(src), name, *extra], env)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("size", "segment_size"),
    [(6, None), (3 * 64 * 1024 + 5, "64KiB")],
    ids=["one segment", "four segments"],
)
def test_same_bytes(
    net: tuple[dict[str, str], Path], tmp_path: Path, size: int, segment_size: str | None
) -> None:
    """An object of one segment and of several: both paths write the same bytes to a
    file and to stdout, and print the same."""
    env, _ = net
    content = os.urandom(size)
    src = tmp_path / "src"
    src.write_bytes(content)
    name = f"/quick/same-{size}.bin"
    put(src, name, env, *(["--segment-size", segment_size] if segment_size else []))
    quick, slow = both(name, tmp_path, env)
    assert quick == slow
    assert quick[0][::3] == (0, content) and quick[1][:2] == (0, content)


def test_quick_path_taken_without_asyncio(net: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """A small ``difs get`` imports no asyncio (sys.modules at exit, in the process)."""
    env, _ = net
    src = tmp_path / "src"
    src.write_bytes(b"small\n")
    put(src, "/quick/modules.txt", env)
    probe = (
        "import atexit, sys; from difs_p2p.cli_fast import client_main; "
        "atexit.register(lambda: print(sorted(m for m in sys.modules if m in "
        "('asyncio', 'difs_p2p.client', 'difs_p2p.quickget')), file=sys.stderr)); "
        "sys.argv[0] = 'difs'; client_main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "get", "/quick/modules.txt", "-o", "-"],
        capture_output=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == b"small\n"
    assert done.stderr.decode().strip() == "['difs_p2p.quickget']"


def test_json_summary(net: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """``--json``: the same summary (numbers masked) and the same error object."""
    env, _ = net
    src = tmp_path / "src"
    src.write_bytes(b"json\n")
    put(src, "/quick/json.txt", env)
    for name in ("/quick/json.txt", "/quick/json-missing.txt"):
        outcomes = [
            get(name, tmp_path / f"{quick}.out", env, quick=quick, extra=("--json",))
            for quick in (True, False)
        ]
        shown = [(code, masked(out.decode()), err, written) for code, out, err, written in outcomes]
        assert shown[0] == shown[1]
        assert (shown[0][1] + shown[0][2]).startswith("{")


def test_missing_deleted_and_large(net: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """A missing name (3), a deleted one (4), and one too large for the quick path (it
    hands it to the asyncio client): the same through both paths."""
    env, _ = net
    src = tmp_path / "src"
    src.write_bytes(b"gone\n")
    put(src, "/quick/deleted.txt", env)
    done = difs(["rm", "/quick/deleted.txt"], env)
    assert done.returncode == 0, done.stderr
    big = tmp_path / "big"
    big.write_bytes(os.urandom(quickget.MAX_SEGMENTS * 64 * 1024 + 1))
    put(big, "/quick/large.bin", env, "--segment-size", "64KiB")
    codes = []
    for name in ("/quick/missing.txt", "/quick/deleted.txt", "/quick/large.bin"):
        quick, slow = both(name, tmp_path, env)
        assert quick == slow
        codes.append(quick[0][0])
    assert codes == [3, 4, 0]


def test_claimed_name(net: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """Under a claimed prefix: the owner's name is fetched, and a name the owner never
    published is not found (3), through both paths alike."""
    env, _ = net
    assert difs(["claim", "/qclaim.com/"], env).returncode == 0
    src = tmp_path / "src"
    src.write_bytes(b"owned\n")
    put(src, "/qclaim.com/a.txt", env)
    codes = []
    for name in ("/qclaim.com/a.txt", "/qclaim.com/none.txt"):
        quick, slow = both(name, tmp_path, env)
        assert quick == slow
        codes.append(quick[0][0])
    assert codes == [0, 3]


def test_corrupt_segment_never_written(net: tuple[dict[str, str], Path], tmp_path: Path) -> None:
    """A holder whose copy is damaged: nothing is written, and both paths exit alike
    (integrity, 5). Each path reads its own object (a reported copy is quarantined)."""
    env, root = net
    outcomes = []
    for quick in (True, False):
        content = os.urandom(1000)
        src = tmp_path / "src"
        src.write_bytes(content)
        name = f"/quick/corrupt-{quick}.bin"
        put(src, name, env, "--replicas", "1")
        holder = holder_of(name, env)
        damaged = 0
        for data in (root / "p0", root / "p1"):
            for path in data.rglob("*"):
                size = path.stat().st_size if path.is_file() else -1
                if size == len(content) and path.read_bytes() == content:
                    path.write_bytes(bytes([content[0] ^ 1]) + content[1:])
                    damaged += 1
        assert damaged == 1, holder
        out = tmp_path / f"{quick}.out"
        code, stdout, stderr, written = get(name, out, env, quick=quick)
        outcomes.append((code, stdout, stderr.replace(name, "NAME"), written))
        assert not list(tmp_path.glob(f".{quick}.out.*"))  # no temporary file left
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][0] == 5 and outcomes[0][3] is None


def test_dead_holder(tmp_path: Path) -> None:
    """The only holder of a name is gone (three peers: the entry peer still counts itself
    in the network): both paths fail alike (the quick path hands the fetch to the
    asyncio client)."""
    procs: list[subprocess.Popen[str]] = []
    addresses: list[str] = []
    try:
        for i in range(3):
            extra = ["--bootstrap", addresses[0]] if addresses else []
            proc, address = start_peer_process(tmp_path / f"p{i}", "--http", "off", *extra)
            procs.append(proc)
            addresses.append(address)
        env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"), DIFS_PEER=addresses[0])
        env["DIFS_TOKEN_FILE"] = str(tmp_path / "p0" / "control.token")
        src = tmp_path / "src"
        src.write_bytes(b"alone\n")
        put(src, "/quick/dead.txt", env, "--replicas", "1")
        victim = addresses.index(holder_of("/quick/dead.txt", env))
        procs[victim].send_signal(signal.SIGKILL)
        procs[victim].wait(timeout=15)
        env["DIFS_PEER"] = addresses[(victim + 1) % 3]
        quick, slow = both("/quick/dead.txt", tmp_path, env)
        assert quick == slow
        assert quick[0][0] == 9 and quick[0][3] is None
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
