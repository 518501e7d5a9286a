"""bench/profile.py: py-spy's collapsed stacks read back and summarized by where the CPU
goes, on a real process sampled by py-spy and on stacks written out by hand."""

from __future__ import annotations

import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.profile import RATE, parse_collapsed, process_of, py_spy, summarize

STACKS = """\
thread (0x1);run (difs_p2p/cli_common.py:10);_blake3 (/x/difs_p2p/segments.py:77) 30
thread (0x1);run (difs_p2p/cli_common.py:10);Connection.send (/x/difs_p2p/transfer.py:5);\
sock_sendall (/usr/lib/python3.11/asyncio/selector_events.py:1) 10
thread (0x1);run_forever (/usr/lib/python3.11/asyncio/base_events.py:1);\
Handle._run (/usr/lib/python3.11/asyncio/events.py:80);\
dumps (/usr/lib/python3.11/json/__init__.py:1) 10
thread (0x2);_worker (/usr/lib/python3.11/concurrent/futures/thread.py:83) 5
thread (0x3);_worker (/usr/lib/python3.11/concurrent/futures/thread.py:83);\
_WorkItem.run (/usr/lib/python3.11/concurrent/futures/thread.py:58);\
verify_and_write (/x/difs_p2p/fetchrun.py:582) 50
not a stack line
"""


def test_collapsed_stacks_are_read_and_ranked() -> None:
    stacks = parse_collapsed(STACKS.splitlines())
    assert [n for _, n in stacks] == [30, 10, 10, 5, 50]  # the malformed line is skipped
    text = summarize(stacks)
    # the thread waiting for work (its innermost frame the work queue's) is counted apart
    assert text.startswith(f"100 samples at {RATE} Hz (0.40 s) at work, 5 waiting")
    own, rest = text.split("top by project function")
    ours, tasks = rest.split("top by task")
    # own samples: the innermost frame; the asyncio call is charged to itself
    assert own.index("_blake3") < own.index("sock_sendall")
    assert "30.0%  _blake3  difs_p2p/segments.py" in own
    assert "_worker" not in own
    # by project function: the standard library's sock_sendall is charged to its caller
    assert "10.0%  Connection.send  difs_p2p/transfer.py" in ours
    assert "10.0%  (outside the project)" in ours
    # by task: what the event loop ran (under Handle._run) or a worker thread (under
    # _WorkItem.run), else the outermost frame
    assert "50.0%  verify_and_write  difs_p2p/fetchrun.py" in tasks
    assert "10.0%  dumps  json/__init__.py" in tasks
    assert "40.0%  run  difs_p2p/cli_common.py" in tasks


def test_process_frames_name_the_process() -> None:
    frames = ['process 1:"python -m bench"', 'process 2:"difs-peer join"', "f (a.py:1)"]
    assert process_of(frames) == 'process 2:"difs-peer join"'
    assert process_of(["f (a.py:1)"]) == ""


@pytest.mark.skipif(
    shutil.which("py-spy", path=str(Path(sys.executable).parent)) is None
    and shutil.which("py-spy") is None,
    reason="py-spy is not installed",
)
def test_a_real_process_profile_names_its_busy_function(tmp_path: Path) -> None:
    script = tmp_path / "busy.py"
    script.write_text(
        textwrap.dedent(
            """
            import time

            def spin_here():
                end = time.monotonic() + 1.5
                n = 0
                while time.monotonic() < end:
                    n += 1
                return n

            spin_here()
            """
        )
    )
    out = tmp_path / "busy.raw"
    cmd = [py_spy(), "record", "--rate", str(RATE), "--format", "raw", "--output", str(out)]
    subprocess.run([*cmd, "--", sys.executable, str(script)], check=True, capture_output=True)
    stacks = parse_collapsed(out.read_text().splitlines())
    text = summarize(stacks)
    top_own = text.split("top by own samples:\n")[1].splitlines()[0]
    assert "spin_here" in top_own
    assert sum(n for _, n in stacks) > RATE // 2  # about 1.5 s at 250 Hz
