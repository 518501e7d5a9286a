"""The real commands, started as processes."""

from __future__ import annotations

import contextlib
import json
import os
import pty
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import start_peer_process, wait_for_sync

BIN = Path(sys.executable).parent


def difs(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "difs"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def status(address: str, data: Path) -> dict[str, object]:
    out = difs("peers", "--peer", address, "--token-file", str(data / "control.token"), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_every_command_has_help() -> None:
    """Each command answers --help with a description and an example."""
    for binary, commands in (
        ("difs-peer", ["join", "status", "check", "leave"]),
        (
            "difs",
            ["peers", "put", "get", "rm", "stat", "versions", "ls", "whoami", "delegate", "revoke"],
        ),
        ("difs key", ["new"]),
    ):
        for command in commands:
            out = subprocess.run(
                [str(BIN / binary.split()[0]), *binary.split()[1:], command, "--help"],
                capture_output=True,
                text=True,
                check=False,
            )
            assert out.returncode == 0 and "Example" in out.stdout, (binary, command)


def test_three_processes_form_a_network_and_notice_a_leaver(tmp_path: Path) -> None:
    """3 difs-peer processes find each other; SIGTERM stops one cleanly and the others notice."""
    procs = []
    try:
        first, seed = start_peer_process(tmp_path / "a")
        procs.append(first)
        for name in ("b", "c"):
            procs.append(start_peer_process(tmp_path / name, "--bootstrap", seed)[0])
        addresses = [seed] + [(tmp_path / n / "address").read_text().strip() for n in ("b", "c")]
        dirs = dict(zip(addresses, (tmp_path / n for n in "abc"), strict=True))
        wait_for_sync(lambda: all(status(a, dirs[a])["routing_table"] == 2 for a in addresses))
        leaver = procs[2]
        leaver.send_signal(signal.SIGTERM)
        assert leaver.wait(timeout=15) == 0
        assert not (tmp_path / "c" / "address").exists()
        assert not list((tmp_path / "c").glob("*.tmp"))
        wait_for_sync(lambda: all(status(a, dirs[a])["routing_table"] == 1 for a in addresses[:2]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=15)
    assert all(p.returncode == 0 for p in procs)


def test_status_says_whether_the_peer_is_part_of_the_network(tmp_path: Path) -> None:
    """A lone peer (never saw another) is ok: status says so in text and in --json."""
    proc, address = start_peer_process(tmp_path / "a")
    try:
        token = str(tmp_path / "a" / "control.token")
        report = status(address, tmp_path / "a")
        assert (report["network"], report["most_seen"], report["next_rejoin"]) == ("ok", 0, None)
        out = subprocess.run(
            [str(BIN / "difs-peer"), "status", "--peer", address, "--token-file", token],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert out.returncode == 0, out.stderr
        assert "network: ok   knows 0 peers (most seen 0)" in out.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--bootstrap", "nonsense"], 2, "malformed address"),
        (["--bootstrap", "127.0.0.1:99999"], 2, "port must be"),
        (["--capacity", "lots"], 2, "not a size"),
    ],
)
def test_join_usage_errors(tmp_path: Path, args: list[str], code: int, message: str) -> None:
    """Bad options give one line on stderr and exit code 2."""
    out = subprocess.run(
        [str(BIN / "difs-peer"), "join", "--data", str(tmp_path / "p"), *args],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == code and message in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_join_port_in_use_and_unwritable_dir(tmp_path: Path) -> None:
    """A taken port exits 9, a data dir that cannot be made exits 11, each with one line."""
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = str(blocker.getsockname()[1])
    try:
        out = subprocess.run(
            [str(BIN / "difs-peer"), "join", "--data", str(tmp_path / "p"), "--port", port],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.returncode == 9 and "in use" in out.stderr, out.stderr
    finally:
        blocker.close()
    (tmp_path / "file").write_text("x")
    out = subprocess.run(
        [str(BIN / "difs-peer"), "join", "--data", str(tmp_path / "file" / "d")],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 11 and "not writable" in out.stderr, out.stderr


def test_unreachable_bootstrap_exits_with_what_was_tried(tmp_path: Path) -> None:
    """Bootstrap through a silent address gives up after its retries, exit 9."""
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))
    address = f"127.0.0.1:{dead.getsockname()[1]}"
    try:
        out = subprocess.run(
            [
                str(BIN / "difs-peer"),
                "join",
                "--data",
                str(tmp_path / "p"),
                "--bootstrap",
                address,
                "--retries",
                "2",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        dead.close()
    assert out.returncode == 9 and address in out.stderr, out.stderr


def test_no_local_peer_is_a_clear_error(tmp_path: Path) -> None:
    """Without --peer and with no local peer running, difs says how to start one."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path))
    env.pop("DIFS_PEER", None)
    out = difs("peers", env=env)
    assert out.returncode == 9 and "difs-peer join" in out.stderr


def test_put_get_stat_versions_rm_as_processes(tmp_path: Path) -> None:
    """The content commands end to end: put, get (file and stdout), stat, versions, rm."""
    procs = []
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env["DIFS_TOKEN_FILE"] = str(tmp_path / "a" / "control.token")  # the entry peer's
    try:
        first, seed = start_peer_process(tmp_path / "a")
        procs.append(first)
        procs.append(start_peer_process(tmp_path / "b", "--bootstrap", seed)[0])
        other = (tmp_path / "b" / "address").read_text().strip()
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(300_000))
        out = difs(
            "put",
            str(src),
            "/cli/x.bin",
            "--peer",
            seed,
            "--segment-size",
            "64KiB",
            "--json",
            env=env,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout)["version"] == 1
        again = difs("put", str(src), "/cli/x.bin", "--peer", seed, env=env)
        assert again.returncode == 7 and "already exists" in again.stderr
        bad = difs("put", str(src), "/cli//x", "--peer", seed, env=env)
        assert bad.returncode == 2 and "empty component" in bad.stderr
        got = difs(
            "get", "/cli/x.bin", "-o", str(tmp_path / "out.bin"), "--peer", other, "--sync", env=env
        )
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out.bin").read_bytes() == src.read_bytes()
        # A device is a valid output: /dev/null cannot be fsynced, and need not be.
        null = difs("get", "/cli/x.bin", "-o", os.devnull, "--peer", other, "--json", env=env)
        assert null.returncode == 0, null.stderr
        summary = json.loads(null.stdout)
        assert summary["bytes"] == 300_000
        assert 0 < summary["resolve_ms"] <= summary["first_byte_ms"]
        piped = subprocess.run(
            [
                str(BIN / "difs"),
                "get",
                "/cli/x.bin",
                "-o",
                "-",
                "--peer",
                other,
                "--range",
                "10-19",
            ],
            capture_output=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert piped.returncode == 0 and piped.stdout == src.read_bytes()[10:20]
        stat = json.loads(difs("stat", "/cli/x.bin", "--peer", other, "--json", env=env).stdout)
        assert stat["info"]["name"] == "/cli/x.bin" and stat["storages"]
        assert all(s["live"] for s in stat["storages"])
        assert difs("rm", "/cli/x.bin", "--peer", seed, env=env).returncode == 0
        versions = json.loads(
            difs("versions", "/cli/x.bin", "--peer", other, "--json", env=env).stdout
        )
        assert [v["deleted"] for v in versions] == [False, True]
        gone = difs("get", "/cli/x.bin", "-o", str(tmp_path / "o2"), "--peer", other, env=env)
        assert gone.returncode == 4 and "deleted" in gone.stderr
        missing = difs("get", "/cli/nothing", "--peer", other, env=env)
        assert missing.returncode == 3
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


# -- the everyday path: outputs, inputs, exit codes, messages -------------------------------

OLD = b"the file as it was before the get\n"


class Net:
    """Peer processes on 127.0.0.1 and the environment for difs commands."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.data: dict[str, Path] = {}
        self.env = dict(os.environ, DIFS_HOME=str(root / "home"))
        self.env.pop("DIFS_PEER", None)

    def env_for(self, args: tuple[str, ...]) -> dict[str, str]:
        """The environment of a difs command: the control token of the peer it names with
        ``--peer`` (this test suite operates its peers)."""
        env = dict(self.env)
        if "--peer" in args:
            address = args[args.index("--peer") + 1]
            if address in self.data:
                env["DIFS_TOKEN_FILE"] = str(self.data[address] / "control.token")
        return env

    def start(self, count: int) -> list[str]:
        seed = ""
        for i in range(count):
            proc, address = start_peer_process(
                self.root / f"p{i}", *(["--bootstrap", seed] if seed else [])
            )
            seed = seed or address
            self.procs[address] = proc
            self.data[address] = self.root / f"p{i}"
        return list(self.procs)

    def signal(self, sig: int, addresses: list[str] | None = None) -> None:
        for address in addresses if addresses is not None else list(self.procs):
            if self.procs[address].poll() is None:
                self.procs[address].send_signal(sig)

    def stop(self) -> None:
        self.signal(signal.SIGCONT)
        self.signal(signal.SIGTERM)
        for proc in self.procs.values():
            proc.wait(timeout=15)

    def difs(self, *args: str) -> subprocess.CompletedProcess[str]:
        return difs(*args, env=self.env_for(args))

    def popen(self, *args: str, **kwargs: Any) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [str(BIN / "difs"), *args],
            env=self.env_for(args),
            stdout=kwargs.pop("stdout", subprocess.PIPE),
            stderr=subprocess.PIPE,
            **kwargs,
        )


@pytest.fixture(scope="module")
def net(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Net]:
    network = Net(tmp_path_factory.mktemp("net"))
    try:
        network.start(3)
        yield network
    finally:
        network.stop()


@pytest.fixture(scope="module")
def big(net: Net) -> tuple[str, bytes]:
    """A 40 MiB object published on ``net`` (r = 3)."""
    data = os.urandom(40 << 20)
    src = net.root / "big.bin"
    src.write_bytes(data)
    seed = next(iter(net.procs))
    out = net.difs("put", str(src), "/everyday/big.bin", "--peer", seed)
    assert out.returncode == 0, out.stderr
    return "/everyday/big.bin", data


def _leftovers(directory: Path, keep: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p != keep)


def _has_socket(pid: int) -> bool:
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    return True
    return False


def _poll(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    """Wait (5 ms steps) until ``condition()``; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.005)


def _sizes(directory: Path, keep: Path) -> list[int]:
    """Sizes of the files in ``directory`` other than ``keep`` (vanishing ones skipped)."""
    sizes = []
    for p in directory.iterdir():
        if p != keep:
            with contextlib.suppress(OSError):
                sizes.append(p.stat().st_size)
    return sizes


def _interrupt_get(
    net: Net, name: str, out: Path, moment: str, sig: int
) -> tuple[bool, int | None, str]:
    """Start a get into ``out``, freeze the peers at ``moment`` and send ``sig``: (whether
    the get was still running when signalled, its exit code, its stderr)."""
    entry = list(net.procs)[1]
    directory = out.parent
    if moment == "connecting":
        net.signal(signal.SIGSTOP)  # the get stalls on its first exchange
    proc = net.popen("get", name, "-o", str(out), "--peer", entry)
    try:

        def reached() -> bool:
            if proc.poll() is not None:
                return True
            if moment == "connecting":
                return _has_socket(proc.pid)
            if moment == "output_opened":  # a temporary file, or (before) FILE truncated
                return bool(_sizes(directory, out)) or out.stat().st_size != len(OLD)
            return any(_sizes(directory, out)) or out.read_bytes() != OLD  # bytes written

        _poll(reached)
        net.signal(signal.SIGSTOP)  # freeze the transfer where it is
        interrupted = proc.poll() is None
        if interrupted:
            proc.send_signal(sig)
        rc = proc.wait(timeout=30)
    finally:
        net.signal(signal.SIGCONT)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return interrupted, rc, proc.stderr.read().decode() if proc.stderr else ""


@pytest.mark.parametrize(
    ("moment", "sig"),
    [
        ("connecting", signal.SIGINT),
        ("output_opened", signal.SIGINT),
        ("mid_transfer", signal.SIGINT),
        ("mid_transfer", signal.SIGTERM),
    ],
)
def test_interrupted_get_leaves_the_output_as_it_was(
    net: Net, big: tuple[str, bytes], tmp_path: Path, moment: str, sig: int
) -> None:
    """Ctrl-C or SIGTERM at any moment of a get leaves FILE unchanged and no temp file."""
    name, _ = big
    out = tmp_path / "out.bin"
    for _attempt in range(5):
        out.write_bytes(OLD)
        interrupted, rc, stderr = _interrupt_get(net, name, out, moment, sig)
        if interrupted:
            assert rc == 128 + sig, stderr
            assert "Traceback" not in stderr, stderr
            assert out.read_bytes() == OLD
            assert _leftovers(tmp_path, out) == []
            return
        assert rc == 0, stderr  # finished before the signal: try again
    pytest.fail("the get always finished before it could be interrupted")


def test_get_with_every_holder_of_a_range_stopped_keeps_the_file(tmp_path: Path) -> None:
    """A get that cannot reach any holder of some segments exits 9 and keeps FILE."""
    network = Net(tmp_path / "net")
    try:
        addresses = network.start(3)
        src = tmp_path / "src.bin"
        src.write_bytes(os.urandom(24 << 20))
        put = network.difs(
            "put",
            str(src),
            "/gone/x.bin",
            "--peer",
            addresses[0],
            "--replicas",
            "2",
            "--segment-size",
            "256KiB",
        )
        assert put.returncode == 0, put.stderr
        stat = json.loads(
            network.difs("stat", "/gone/x.bin", "--peer", addresses[0], "--json").stdout
        )
        first = {s["address"] for s in stat["storages"] if s["segment"]["start"] == 0}
        assert first and len(first) < len(addresses)
        network.signal(signal.SIGKILL, sorted(first))
        entry = next(a for a in addresses if a not in first)
        out = tmp_path / "out.bin"
        out.write_bytes(OLD)
        got = network.difs("get", "/gone/x.bin", "-o", str(out), "--peer", entry)
        assert got.returncode == 9, got.stderr
        assert "Traceback" not in got.stderr
        assert out.read_bytes() == OLD
        assert _leftovers(tmp_path, out) == ["net", "src.bin"]
    finally:
        network.stop()


def test_bad_outputs_and_inputs_are_usage_errors(net: Net, tmp_path: Path) -> None:
    """-o into a missing directory or onto a directory, and put of a directory: exit 2."""
    peer = next(iter(net.procs))
    src = tmp_path / "x.bin"
    src.write_bytes(b"x" * 5000)
    assert net.difs("put", str(src), "/everyday/x.bin", "--peer", peer).returncode == 0
    cases = [
        (
            ["get", "/everyday/x.bin", "-o", str(tmp_path / "nodir" / "sub" / "x.bin")],
            "does not exist",
        ),
        (["get", "/everyday/x.bin", "-o", str(tmp_path)], "is a directory"),
        (["put", str(tmp_path), "/everyday/adir"], "is a directory"),
        (["put", str(tmp_path / "missing"), "/everyday/missing"], "No such file"),
    ]
    for args, message in cases:
        out = net.difs(*args, "--peer", peer)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
        assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not (tmp_path / "nodir").exists()
    leader, follower = pty.openpty()  # stdin a terminal: nothing to publish
    try:
        typed = subprocess.run(
            [str(BIN / "difs"), "put", "-", "/everyday/tty", "--peer", peer],
            stdin=follower,
            capture_output=True,
            text=True,
            env=net.env_for(("--peer", peer)),
            timeout=30,
            check=False,
        )
    finally:
        os.close(leader)
        os.close(follower)
    assert typed.returncode == 2 and "pipe it in" in typed.stderr, typed.stderr


def test_json_summary_goes_to_stderr_when_stdout_carries_data(net: Net, tmp_path: Path) -> None:
    """get -o - --json: stdout is exactly the data, the summary is JSON on stderr."""
    peer = next(iter(net.procs))
    data = os.urandom(70_000)
    src = tmp_path / "d.bin"
    src.write_bytes(data)
    assert net.difs("put", str(src), "/everyday/d.bin", "--peer", peer).returncode == 0
    out = subprocess.run(
        [str(BIN / "difs"), "get", "/everyday/d.bin", "-o", "-", "--json", "--peer", peer],
        capture_output=True,
        env=net.env_for(("--peer", peer)),
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stdout == data
    assert json.loads(out.stderr)["bytes"] == len(data)


def test_exit_codes_follow_the_table(net: Net, tmp_path: Path) -> None:
    """Namespace, delegation, version and option errors give the README's exit codes."""
    peer = next(iter(net.procs))
    src = tmp_path / "s.bin"
    src.write_bytes(b"s" * 100)
    other = tmp_path / "other.key"
    assert net.difs("key", "new", str(other)).returncode == 0
    fp = json.loads(net.difs("whoami", "--key", str(other), "--json").stdout)["fingerprint"]
    taken = net.difs("put", str(src), f"/key/{fp}/x", "--peer", peer)
    assert taken.returncode == 6, taken.stderr
    bad = tmp_path / "bad.delegation"
    bad.write_text('{"t": "difs-delegation", "prefix": "/a"}')
    malformed = net.difs("put", str(src), "/del/x", "--delegation", str(bad), "--peer", peer)
    assert malformed.returncode == 2 and "delegation" in malformed.stderr, malformed.stderr
    writer = tmp_path / "writer.key"
    assert net.difs("key", "new", str(writer)).returncode == 0
    writer_pub = json.loads(net.difs("whoami", "--key", str(writer), "--json").stdout)
    cert = net.difs("delegate", "/del", writer_pub["public_key"], "--days", "0.00001")
    assert cert.returncode == 0, cert.stderr
    (tmp_path / "d.delegation").write_text(cert.stdout)
    expires = json.loads(cert.stdout)["expires"]
    wait_for_sync(lambda: time.time() > expires + 0.1)
    expired = net.difs(
        "put",
        str(src),
        "/del/x",
        "--delegation",
        str(tmp_path / "d.delegation"),
        "--key",
        str(writer),
        "--peer",
        peer,
    )
    assert expired.returncode == 6 and "expired" in expired.stderr, expired.stderr
    decimal = net.difs("put", str(src), "/r/x", "--segment-size", "1mb", "--peer", peer)
    assert decimal.returncode == 2 and "1,000,000 bytes" in decimal.stderr, decimal.stderr
    for args in (
        ["get", "/everyday/x", "--version", "0"],
        ["get", "/everyday/x", "--version", "-1"],
        ["put", str(src), "/r/x", "--replicas", "17"],
        ["put", str(src), "/r/x", "--replicas", "0"],
        ["delegate", "/del", writer_pub["public_key"], "--days", "0"],
        ["delegate", "/del", writer_pub["public_key"], "--days", "-1"],
    ):
        out = net.difs(*args, "--peer", peer) if args[0] != "delegate" else net.difs(*args)
        assert out.returncode == 2, (args, out.stderr)
        assert "Traceback" not in out.stderr
    loud = subprocess.run(
        [str(BIN / "difs-peer"), "join", "--data", str(tmp_path / "p"), "--log-level", "loud"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert loud.returncode == 2 and "loud" in loud.stderr
    assert not (tmp_path / "p").exists()


def _peak_rss(proc: subprocess.Popen[bytes]) -> int:
    """The peak resident memory (bytes) of ``proc`` until it exits, from /proc (VmHWM)."""
    peak = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        time.sleep(0.005)
    return peak


def test_put_reads_a_pipe_in_bounded_memory(net: Net, tmp_path: Path) -> None:
    """put - and put /dev/stdin publish a pipe, reading it segment by segment."""
    peer = next(iter(net.procs))
    size = 96 << 20
    producer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, random\nr = random.Random(7)\n"
            "for _ in range(96): sys.stdout.buffer.write(r.randbytes(1 << 20))",
        ],
        stdout=subprocess.PIPE,
    )
    assert producer.stdout is not None
    put = net.popen(
        "put", "-", "/everyday/pipe.bin", "--peer", peer, "--json", stdin=producer.stdout
    )
    producer.stdout.close()
    peak = _peak_rss(put)
    producer.wait(timeout=30)
    assert put.returncode == 0, put.stderr.read() if put.stderr else ""
    assert put.stdout is not None
    assert json.loads(put.stdout.read())["size"] == size
    assert 0 < peak < size  # never the whole input in memory
    r = __import__("random").Random(7)
    expected = b"".join(r.randbytes(1 << 20) for _ in range(96))
    got = subprocess.run(
        [str(BIN / "difs"), "get", "/everyday/pipe.bin", "-o", "-", "--peer", peer],
        capture_output=True,
        env=net.env_for(("--peer", peer)),
        timeout=60,
        check=False,
    )
    assert got.returncode == 0 and got.stdout == expected
    small = b"tar output, say\n" * 1000
    dev = subprocess.run(
        [str(BIN / "difs"), "put", "/dev/stdin", "/everyday/stdin.bin", "--peer", peer],
        input=small,
        capture_output=True,
        env=net.env_for(("--peer", peer)),
        timeout=60,
        check=False,
    )
    assert dev.returncode == 0, dev.stderr
    back = subprocess.run(
        [str(BIN / "difs"), "get", "/everyday/stdin.bin", "-o", "-", "--peer", peer],
        capture_output=True,
        env=net.env_for(("--peer", peer)),
        timeout=60,
        check=False,
    )
    assert back.stdout == small


@pytest.mark.parametrize(
    ("spec", "first", "last"),
    [
        ("10-19", 10, 19),
        ("69990-", 69990, 69999),
        ("-5", 69995, 69999),
        ("69995-80000", 69995, 69999),
        ("-100000", 0, 69999),
    ],
)
def test_get_ranges_use_http_semantics(
    net: Net, tmp_path: Path, spec: str, first: int, last: int
) -> None:
    """--range START-END, START- and -N, with an END past the object trimmed."""
    peer = next(iter(net.procs))
    data = __import__("random").Random(3).randbytes(70_000)
    src = tmp_path / "r.bin"
    src.write_bytes(data)
    put = net.difs("put", str(src), "/everyday/ranges.bin", "--peer", peer)
    assert put.returncode in (0, 7), put.stderr
    got = subprocess.run(
        [
            str(BIN / "difs"),
            "get",
            "/everyday/ranges.bin",
            "-o",
            "-",
            "--range",
            spec,
            "--peer",
            peer,
        ],
        capture_output=True,
        env=net.env_for(("--peer", peer)),
        timeout=60,
        check=False,
    )
    assert got.returncode == 0 and got.stdout == data[first : last + 1], got.stderr


def test_bad_ranges_say_what_is_wrong(net: Net, tmp_path: Path) -> None:
    """A reversed range or one starting past the end: exit 2 and the reason."""
    peer = next(iter(net.procs))
    src = tmp_path / "r.bin"
    src.write_bytes(b"r" * 1000)
    assert net.difs("put", str(src), "/everyday/r1000", "--peer", peer).returncode == 0
    for spec, message in (
        ("10-5", "the end (5) is before the start (10)"),
        ("1000-", "past the end of the object (1000 bytes"),
        ("abc", "expected START-END"),
    ):
        out = net.difs("get", "/everyday/r1000", "-o", "-", "--range", spec, "--peer", peer)
        assert out.returncode == 2 and message in out.stderr, (spec, out.stderr)


def test_stat_versions_json_errors_and_version(net: Net, tmp_path: Path) -> None:
    """stat --json and a table, versions with dates, JSON errors, --version, -h."""
    peer = next(iter(net.procs))
    src = tmp_path / "v.bin"
    src.write_bytes(b"v" * 5000)
    assert net.difs("put", str(src), "/everyday/v.bin", "--peer", peer).returncode == 0
    as_json = net.difs("stat", "/everyday/v.bin", "--peer", peer, "--json")
    assert as_json.returncode == 0 and json.loads(as_json.stdout)["info"]["size"] == 5000
    table = net.difs("stat", "/everyday/v.bin", "--peer", peer)
    assert table.returncode == 0 and "holders" in table.stdout
    assert not table.stdout.lstrip().startswith("{")
    listed = net.difs("versions", "/everyday/v.bin", "--peer", peer)
    assert time.strftime("%Y-%m-%d", time.gmtime()) in listed.stdout
    missing = net.difs("get", "/everyday/none", "--peer", peer, "--json")
    assert missing.returncode == 3
    assert json.loads(missing.stderr) == {
        "error": "/everyday/none is not published",
        "code": "not_found",
        "exit": 3,
    }
    usage = net.difs("put", str(src), "/x", "--replicas", "99", "--json")
    assert usage.returncode == 2 and json.loads(usage.stderr)["exit"] == 2
    for binary in ("difs", "difs-peer"):
        shown = subprocess.run(
            [str(BIN / binary), "--version"], capture_output=True, text=True, check=False
        )
        assert shown.returncode == 0 and shown.stdout.startswith("difs-p2p ")
        short = subprocess.run(
            [str(BIN / binary), "-h"], capture_output=True, text=True, check=False
        )
        assert short.returncode == 0 and "Usage" in short.stdout
    helped = net.difs("put", "-h")
    assert "--update " in helped.stdout and "<bool>" not in helped.stdout
    refused = net.difs("put", str(src), "/everyday/v.bin", "--update", "true", "--peer", peer)
    assert refused.returncode == 2


def test_keys_are_created_only_on_request(net: Net, tmp_path: Path) -> None:
    """--key of a missing file is an error (no new identity); difs key new creates one."""
    peer = next(iter(net.procs))
    src = tmp_path / "k.bin"
    src.write_bytes(b"k" * 100)
    typo = tmp_path / "typo.key"
    out = net.difs("put", str(src), "/everyday/k", "--key", str(typo), "--peer", peer)
    assert out.returncode == 2 and "difs key new" in out.stderr
    who = net.difs("whoami", "--key", str(typo))
    assert who.returncode == 2 and not typo.exists()
    made = net.difs("key", "new", str(typo), "--json")
    assert made.returncode == 0 and typo.exists()
    assert typo.stat().st_mode & 0o777 == 0o600
    again = net.difs("key", "new", str(typo))
    assert again.returncode == 7 and json.loads(made.stdout)["public_key"] in json.dumps(
        json.loads(net.difs("whoami", "--key", str(typo), "--json").stdout)
    )
    assert (
        net.difs("put", str(src), "/everyday/k", "--key", str(typo), "--peer", peer).returncode == 0
    )


def test_trust_is_pinned_only_after_a_successful_fetch(net: Net, tmp_path: Path) -> None:
    """A --trust typo on a failed get pins nothing; a later plain get still works."""
    peer = next(iter(net.procs))
    src = tmp_path / "t.bin"
    src.write_bytes(b"t" * 100)
    assert net.difs("put", str(src), "/trusty/t", "--peer", peer).returncode == 0
    pins = net.root / "home" / "pins.json"
    wrong = "ab" * 32
    failed = net.difs(
        "get", "/trusty/t", "-o", str(tmp_path / "o"), "--trust", wrong, "--peer", peer
    )
    assert failed.returncode == 6, failed.stderr
    assert wrong not in pins.read_text()
    ok = net.difs("get", "/trusty/t", "-o", str(tmp_path / "o"), "--peer", peer)
    assert ok.returncode == 0, ok.stderr


def test_summaries_count_serving_peers_and_use_plurals(net: Net, tmp_path: Path) -> None:
    """One segment from three holders: "1 segment, 1 range", fetched "from 1 peer"."""
    peer = next(iter(net.procs))
    src = tmp_path / "one.bin"
    src.write_bytes(b"1" * 1000)
    put = net.difs("put", str(src), "/everyday/one", "--peer", peer)
    assert put.returncode == 0 and "1 segment, 1 range on 3 peers" in put.stdout, put.stdout
    got = net.difs("get", "/everyday/one", "-o", str(tmp_path / "o"), "--peer", peer)
    assert "from 1 peer in" in got.stderr, got.stderr


def _on_terminal(net: Net, *args: str) -> tuple[int, str, str]:
    """Run difs with stderr on a pseudo-terminal: (exit code, stdout, what stderr showed)."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.run(
            [str(BIN / "difs"), *args],
            stdout=subprocess.PIPE,
            stderr=follower,
            env=dict(net.env_for(args), COLUMNS="150"),
            timeout=60,
            check=False,
        )
        os.close(follower)
        shown = b""
        with contextlib.suppress(OSError):
            while chunk := os.read(leader, 65536):
                shown += chunk
    finally:
        os.close(leader)
    return proc.returncode, proc.stdout.decode(), shown.decode(errors="replace")


def test_progress_shows_placement_and_binary_units(net: Net, tmp_path: Path) -> None:
    """On a terminal: an upload bar then a placement phase, a get bar sized from the
    start, all in binary units like the summaries."""
    peer = next(iter(net.procs))
    src = tmp_path / "p.bin"
    src.write_bytes(os.urandom(3 << 20))
    rc, summary, shown = _on_terminal(net, "put", str(src), "/everyday/progress", "--peer", peer)
    assert rc == 0
    assert "uploading" in shown and "placing 3 replicas" in shown, shown
    assert "MiB" in shown and " MB" not in shown, shown
    assert "MiB/s" in summary and "MB/s" not in summary
    # the upload bar ends on the rate the summary reports (placement is not in it)
    shown_rate = float(re.findall(r"uploading.*?([\d.]+) MiB/s", shown)[-1])
    summary_rate = float(re.findall(r"uploaded in [\d.]+ s \(([\d.]+) MiB/s\)", summary)[0])
    assert shown_rate == summary_rate, (shown, summary)
    out = str(tmp_path / "o.bin")
    rc, _, shown = _on_terminal(net, "get", "/everyday/progress", "-o", out, "--peer", peer)
    assert rc == 0
    assert "fetching" in shown and "0/0" not in shown and "/3.0 MiB" in shown, shown
    assert " MB" not in shown, shown


def test_not_a_difs_peer_fails_at_once(tmp_path: Path) -> None:
    """--peer at a socket that is not a DIFS peer: exit 9, "not a DIFS peer", no stall."""
    silent = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    address = f"127.0.0.1:{silent.getsockname()[1]}"
    env = dict(os.environ, DIFS_HOME=str(tmp_path))
    try:
        out = subprocess.run(
            [str(BIN / "difs"), "get", "/x", "--peer", address],
            capture_output=True,
            text=True,
            timeout=25,
            env=env,
            check=False,
        )
    finally:
        silent.close()
    assert out.returncode == 9 and "not a DIFS peer" in out.stderr, out.stderr


def test_data_that_is_a_file_and_failed_starts_leave_nothing(tmp_path: Path) -> None:
    """--data FILE says "not a directory"; a failed start removes the directory it made."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    out = subprocess.run(
        [str(BIN / "difs-peer"), "join", "--data", str(afile)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 11 and "is not a directory" in out.stderr, out.stderr
    blocker = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        failed = subprocess.run(
            [
                str(BIN / "difs-peer"),
                "join",
                "--data",
                str(tmp_path / "new" / "peer"),
                "--port",
                str(blocker.getsockname()[1]),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        blocker.close()
    assert failed.returncode == 9, failed.stderr
    assert not (tmp_path / "new").exists()
