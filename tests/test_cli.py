"""The real commands, started as processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import wait_for_sync

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


def start_peer(data: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [str(BIN / "difs-peer"), "join", "--data", str(data), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("peer ready"), line + (proc.stderr.read() if proc.stderr else "")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    return proc, fields["address"]


def status(address: str, data: Path) -> dict[str, object]:
    out = difs("peers", "--peer", address, "--token-file", str(data / "control.token"), "--json")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def test_every_command_has_help() -> None:
    """Each command answers --help with a description and an example."""
    for binary, commands in (
        ("difs-peer", ["join", "status", "check"]),
        ("difs", ["peers", "put", "get", "rm", "stat", "versions", "whoami", "delegate", "revoke"]),
    ):
        for command in commands:
            out = subprocess.run(
                [str(BIN / binary), command, "--help"], capture_output=True, text=True, check=False
            )
            assert out.returncode == 0 and "Example" in out.stdout, (binary, command)


def test_three_processes_form_a_network_and_notice_a_leaver(tmp_path: Path) -> None:
    """3 difs-peer processes find each other; SIGTERM stops one cleanly and the others notice."""
    procs = []
    try:
        first, seed = start_peer(tmp_path / "a")
        procs.append(first)
        for name in ("b", "c"):
            procs.append(start_peer(tmp_path / name, "--bootstrap", seed)[0])
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
        first, seed = start_peer(tmp_path / "a")
        procs.append(first)
        procs.append(start_peer(tmp_path / "b", "--bootstrap", seed)[0])
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
        stat = json.loads(difs("stat", "/cli/x.bin", "--peer", other, env=env).stdout)
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
