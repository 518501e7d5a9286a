"""``make demo`` as a user runs it: the demo module as a process, with no terminal."""

from __future__ import annotations

import subprocess
import sys


def test_the_demo_publishes_fetches_and_serves_over_http() -> None:
    """The demo's network publishes, fetches byte-identically and answers over HTTP."""
    done = subprocess.run(
        [sys.executable, "-m", "difs_p2p.demo"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "byte-identical: True" in done.stdout
    assert "the folder /demo.local/ lists hello.bin" in done.stdout
    assert "a range request for the first KiB: 206, verified: True" in done.stdout
    # every peer stopped cleanly on SIGTERM
    assert done.stdout.count("exited with 0") == 5, done.stdout
