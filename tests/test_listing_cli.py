"""``difs ls`` as a process, against real peer processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.helpers import start_peer_process

BIN = Path(sys.executable).parent


def difs(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "difs"), *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def test_ls_lists_pages_and_refuses_an_unowned_prefix(tmp_path: Path) -> None:
    """difs ls: names in byte order (text and --json), -r, --limit with the token to go
    on printed on stderr, --after, and a clear usage error for an unclaimed prefix."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env["DIFS_TOKEN_FILE"] = str(tmp_path / "a" / "control.token")
    proc, seed = start_peer_process(tmp_path / "a")
    try:
        assert difs("key", "new", env=env).returncode == 0
        fp = json.loads(difs("whoami", "--json", env=env).stdout)["fingerprint"]
        root = f"/key/{fp}"
        src = tmp_path / "in.bin"
        src.write_bytes(b"hello")
        for name in ("b.txt", "a/c.txt", "a-z"):
            out = difs(
                "put", str(src), f"{root}/{name}", "--peer", seed, "--replicas", "1", env=env
            )
            assert out.returncode == 0, out.stderr
        listed = json.loads(difs("ls", root + "/", "--peer", seed, "--json", env=env).stdout)
        assert [e["name"] for e in listed["entries"]] == [
            f"{root}/a-z",
            f"{root}/a/",
            f"{root}/b.txt",
        ]
        assert listed["next"] is None
        assert listed["entries"][2]["size"] == 5 and listed["entries"][1]["folder"] is True
        text = difs("ls", root, "-r", "--peer", seed, env=env)
        assert text.returncode == 0, text.stderr
        assert [line.split()[-1] for line in text.stdout.splitlines()] == [
            f"{root}/a-z", f"{root}/a/", f"{root}/a/c.txt", f"{root}/b.txt",
        ]  # fmt: skip
        first = difs("ls", root, "-r", "--limit", "2", "--peer", seed, env=env)
        assert len(first.stdout.splitlines()) == 2
        token = first.stderr.split("--after ")[1].split()[0]
        rest = difs("ls", root, "-r", "--after", token, "--peer", seed, "--json", env=env)
        assert [e["name"] for e in json.loads(rest.stdout)["entries"]] == [
            f"{root}/a/c.txt", f"{root}/b.txt",
        ]  # fmt: skip
        unowned = difs("ls", "/x.com/", "--peer", seed, env=env)
        assert unowned.returncode == 2
        assert "/x.com/ is not claimed, so it has no listing" in unowned.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
