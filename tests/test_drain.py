"""Leaving the network: the drain's plan (pure), the drain on real peers, and the
``difs-peer leave`` command and ``join --drain`` as processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p import ops, segments
from difs_p2p.classgen import replace
from difs_p2p.client import PublishResult
from difs_p2p.control import OperatorCredential
from difs_p2p.drain import (
    DrainProgress,
    DrainState,
    alive_elsewhere,
    copies_needed,
    may_exit,
)
from difs_p2p.errors import BusyError
from difs_p2p.identity import Identity, load_or_create
from difs_p2p.peer import Peer
from difs_p2p.transfer import Connection
from tests.helpers import (
    BIN,
    client_for,
    peer_config,
    start_peer_process,
    start_peers,
    stop_all,
    wait_for,
)

SEG = 64 << 10
ME, A, B, C = b"m" * 20, b"a" * 20, b"b" * 20, b"c" * 20
REF = ("ab" * 10, 1, 0, 3)


# -- the plan (pure) -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("replicas", "alive", "needed"),
    [(2, 0, 2), (2, 1, 1), (2, 2, 0), (2, 5, 0), (3, 1, 2), (1, -1, 1)],
)
def test_copies_needed_counts_only_what_is_missing_elsewhere(
    replicas: int, alive: int, needed: int
) -> None:
    """A range needs r minus its live copies elsewhere, never less than none."""
    assert copies_needed(replicas, alive) == needed


@pytest.mark.parametrize(
    ("holders", "answers", "alive"),
    [
        ([A, B], {A: True, B: True}, [A, B]),
        ([A, B], {A: True, B: False}, [A]),  # says it does not hold it
        ([A, B], {A: True, B: None}, [A]),  # silent
        ([A, B], {A: True}, [A]),  # not asked
        ([A, ME], {A: True, ME: True}, [A]),  # this peer never counts
        ([A, A, B], {A: True, B: True}, [A, B]),  # one holder, two entries
    ],
)
def test_only_holders_that_answer_holding_the_range_count(
    holders: list[bytes], answers: dict[bytes, bool | None], alive: list[bytes]
) -> None:
    """Silent holders, holders that deny it, and this peer are not live copies elsewhere."""
    assert alive_elsewhere(holders, answers, ME) == alive


@pytest.mark.parametrize(
    ("replicas", "alive", "made", "handed", "already", "failed"),
    [
        (2, 2, 0, 0, 1, 0),
        (2, 1, 1, 1, 0, 0),
        (2, 0, 2, 1, 0, 0),
        (2, 0, 1, 0, 0, 1),
        (3, 1, 0, 0, 0, 1),
    ],
)
def test_progress_accounts_each_range_outcome(
    replicas: int, alive: int, made: int, handed: int, already: int, failed: int
) -> None:
    """A range is already safe, handed over, or failed, from its copies before and made."""
    progress = DrainProgress(started=10.0)
    progress.add_ranges(1)
    assert progress.range_result(REF, replicas, alive, made) == (failed == 0)
    assert (progress.handed, progress.already, len(progress.failed)) == (handed, already, failed)
    assert progress.done == 1 and progress.copies_made == made


def test_a_finished_drain_says_done_or_incomplete_and_sums_up() -> None:
    """finish() gives DONE without failed ranges, INCOMPLETE with; the summary has all."""
    ok = DrainProgress(started=10.0, total=2)
    ok.range_result(REF, 2, 2, 0)
    ok.range_unpublished()
    ok.moved(4096)
    assert not ok.finished and ok.seconds(12.5) == 2.5
    assert ok.finish(13.0) is DrainState.DONE and ok.complete
    summary = ok.summary(99.0)
    assert summary["ranges"] == 2 and summary["done"] == 2 and summary["unpublished"] == 1
    assert summary["bytes_moved"] == 4096 and summary["seconds"] == 3.0
    bad = DrainProgress(started=0.0, total=1)
    bad.range_result(REF, 2, 1, 0)
    assert bad.finish(1.0) is DrainState.INCOMPLETE and not bad.complete
    (line,) = bad.summary(1.0)["failed"]
    assert line.startswith("abababababab/v1/0..3: 1 of 2 live copies")


@pytest.mark.parametrize(
    ("state", "force", "leaves"),
    [
        (DrainState.DONE, False, True),
        (DrainState.DONE, True, True),
        (DrainState.INCOMPLETE, False, False),
        (DrainState.INCOMPLETE, True, True),
        (DrainState.CANCELLED, True, False),
        (DrainState.DRAINING, True, False),
    ],
)
def test_the_peer_exits_only_when_every_range_is_safe_or_forced(
    state: DrainState, force: bool, leaves: bool
) -> None:
    """may_exit: done, or incomplete with --force."""
    assert may_exit(state, force) is leaves


# -- real peers ---------------------------------------------------------------------------


@pytest.fixture
async def five(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 5)
    yield peers
    await stop_all(peers)


async def publish(entry: Peer, tmp_path: Path, name: str, count: int, r: int) -> PublishResult:
    src = tmp_path / f"src{name.replace('/', '_')}"
    src.write_bytes(os.urandom(count * SEG))
    async with client_for(entry, publisher=Identity.generate()) as client:
        return await client.put(src, name, segment_size=SEG, replicas=r)


def copies_on(peers: list[Peer], result: PublishResult) -> list[int]:
    """Per range of a published object, how many of ``peers`` hold it."""
    m = result.manifest
    counts = []
    for start, end in segments.stripe_ranges(m.segment_count, m.stripes):
        counts.append(
            sum(
                1
                for p in peers
                if p.holdings is not None
                and p.store is not None
                and p.holdings.covers(m.key, m.version, start, end)
                and p.store.has(m.integrity)
            )
        )
    return counts


async def drain_call(peer: Peer, action: str, force: bool = False) -> ops.DrainReply:
    conn = await Connection.open(
        peer.address, io_timeout=10.0, credential=OperatorCredential(peer.control_token)
    )
    try:
        return await conn.request(ops.DrainRequest(action, force))
    finally:
        conn.close()


def a_holder(peers: list[Peer], results: list[PublishResult], entry: Peer) -> Peer:
    """The peer other than ``entry`` holding the most ranges of ``results``."""
    held = {
        p.node_id.hex(): sum(
            1 for r in results for x in r.ranges if p.node_id.hex() in x["holders"]
        )
        for p in peers
        if p is not entry
    }
    best = max(held, key=lambda h: held[h])
    return next(p for p in peers if p.node_id.hex() == best)


async def test_leave_hands_every_range_over_and_fetches_work_without_the_peer(
    five: list[Peer], tmp_path: Path
) -> None:
    """5 peers, r=2, 3 objects: after one holder leaves, every range has 2 live copies
    on the others and each object reads back byte for byte with the peer stopped."""
    entry = five[0]
    results = [await publish(entry, tmp_path, f"/drain/{i}", 6 + 4 * i, 2) for i in range(3)]
    leaver = a_holder(five, results, entry)
    others = [p for p in five if p is not leaver]
    held_before = len(leaver.replicator.holdings.all())
    assert held_before > 0
    reply = await drain_call(leaver, "start")
    assert reply.state == "draining"
    # the peer refuses new copies while it leaves
    with pytest.raises(BusyError, match="leaving"):
        await drain_call_hold(leaver, others[0])
    await wait_for(lambda: leaver.drainer.exiting, timeout=30)
    final = await drain_call(leaver, "status")  # the summary answered: the peer may stop
    await wait_for(lambda: leaver.left.is_set(), timeout=10)
    assert final.state == "done" and final.failed == ()
    assert final.ranges == final.done == held_before and final.bytes_moved > 0
    assert final.records >= len(results)  # each name's record stored at the others
    # nothing of the leaver's own was deleted
    assert len(leaver.replicator.holdings.all()) == held_before
    await leaver.stop()
    for result in results:
        assert all(n >= 2 for n in copies_on(others, result)), result.manifest.name
    async with client_for(entry) as client:
        for i, result in enumerate(results):
            out = tmp_path / f"out{i}"
            await client.get(result.manifest.name, out)
            assert out.read_bytes() == (tmp_path / f"src_drain_{i}").read_bytes()


async def drain_call_hold(leaver: Peer, asker: Peer) -> None:
    """``asker`` asks ``leaver`` to hold a range (as placement would)."""
    from difs_p2p.control import PeerCredential
    from difs_p2p.names import NameKey
    from difs_p2p.segments import IntegrityRoot, SegmentId

    assert asker.identity is not None
    conn = await Connection.open(
        leaver.address, io_timeout=10.0, credential=PeerCredential(asker.identity)
    )
    try:
        key, integrity = NameKey(b"k" * 20), IntegrityRoot(SegmentId(b"i" * 32))
        reason = ops.HoldReason("place", key, 1, 0, 0)
        await conn.request(ops.HoldRequest(key, 1, integrity, 1, 0, 0, reason))
    finally:
        conn.close()


async def test_a_drain_that_cannot_complete_reports_and_the_peer_stays(tmp_path: Path) -> None:
    """2 peers, r=2: the other peer holds every range already and no third exists; the
    drain ends incomplete, names the ranges, and the peer keeps running and taking copies."""
    peers = await start_peers(tmp_path / "net", 2)
    try:
        result = await publish(peers[0], tmp_path, "/small", 4, 2)
        leaver = peers[1]
        report = await leaver.drain()
        assert report["state"] == "incomplete"
        assert len(report["failed"]) == len(result.ranges) and report["handed_over"] == 0
        assert "1 of 2 live copies" in report["failed"][0]
        assert not leaver.left.is_set() and not leaver.drainer.leaving
        # a normal peer again: it takes copies (this one fails later, for want of data)
        with pytest.raises(Exception, match="not stored") as caught:
            await drain_call_hold(leaver, peers[0])
        assert not isinstance(caught.value, BusyError)
    finally:
        await stop_all(peers)


async def test_a_drain_cut_short_loses_nothing_and_resumes(
    five: list[Peer], tmp_path: Path
) -> None:
    """A leaving peer stopped mid-drain keeps all it held; restarted and asked again, it
    skips what is already safe elsewhere and completes."""
    entry = five[0]
    results = [await publish(entry, tmp_path, f"/cut/{i}", 8, 2) for i in range(3)]
    leaver = a_holder(five, results, entry)
    held = sorted(leaver.replicator.holdings.all(), key=lambda h: (h.key, h.start))
    await drain_call(leaver, "start")
    await wait_for(
        lambda: leaver.drainer.progress is not None and leaver.drainer.progress.done >= 1,
        timeout=30,
    )
    first = leaver.drainer.report()
    data = leaver.data_dir
    await leaver.stop()  # cut short, as by a crash
    again = Peer(peer_config(data, bootstrap=(entry.address,)))
    five[five.index(leaver)] = again
    await again.start()
    # the same ranges held; a holding's lineage may have been learned meanwhile (the
    # maintenance binds each holding to its manifest when it sees one)
    kept = sorted(again.replicator.holdings.all(), key=lambda h: (h.key, h.start))
    assert [replace(h, lineage=None) for h in kept] == [replace(h, lineage=None) for h in held]
    report = await again.drain()
    assert report["state"] == "done" and report["failed"] == []
    assert report["already_safe"] >= first["handed_over"] + first["already_safe"]
    others = [p for p in five if p is not again]
    for result in results:
        assert all(n >= 2 for n in copies_on(others, result))


async def test_cancelling_a_drain_makes_a_normal_peer_again(
    five: list[Peer], tmp_path: Path
) -> None:
    """A cancelled drain (Ctrl-C of leave) leaves a normal peer that takes copies again and
    keeps all it held; a new drain then completes."""
    results = [await publish(five[0], tmp_path, f"/cancel/{i}", 8, 2) for i in range(2)]
    leaver = a_holder(five, results, five[0])
    held = leaver.replicator.holdings.all()
    leaver.drainer.start(False, watched=True)
    assert leaver.drainer.leaving
    leaver.drainer.cancel()
    assert await leaver.drainer.wait() is DrainState.CANCELLED
    assert not leaver.drainer.leaving and not leaver.left.is_set()
    assert leaver.replicator.holdings.all() == held
    with pytest.raises(Exception, match="not stored") as caught:
        await drain_call_hold(leaver, five[0])
    assert not isinstance(caught.value, BusyError)
    report = await leaver.drain()
    assert report["state"] == "done" and leaver.left.is_set()


async def test_only_the_operator_may_make_a_peer_leave(tmp_path: Path) -> None:
    """``drain`` from a stranger or another peer is FORBIDDEN and starts nothing."""
    from difs_p2p.control import PeerCredential
    from difs_p2p.errors import PermissionDeniedError

    peers = await start_peers(tmp_path / "net", 2)
    try:
        target, other = peers
        assert other.identity is not None
        for credential in (None, PeerCredential(other.identity)):
            conn = await Connection.open(target.address, io_timeout=10.0, credential=credential)
            try:
                with pytest.raises(PermissionDeniedError):
                    await conn.request(ops.DrainRequest("start", True))
            finally:
                conn.close()
        assert target.drainer.state is DrainState.IDLE and not target.drainer.leaving
    finally:
        await stop_all(peers)


# -- processes ------------------------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=90,
        env=env,
        check=False,
    )


def ranges_held(put_json: str, data: Path) -> int:
    """How many ranges of a ``difs put --json`` the peer with data directory ``data``
    holds (its node ID from its key file)."""
    node = load_or_create(data / "peer.key").node_id.hex()
    return sum(node in r["holders"] for r in json.loads(put_json)["ranges"])


def test_leave_and_sigterm_with_drain_as_processes(tmp_path: Path) -> None:
    """``difs-peer leave --peer`` makes a holder hand over and exit 0; another started
    with --drain does the same on SIGTERM; the object still reads back from the rest."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env.pop("DIFS_PEER", None)
    procs: dict[str, subprocess.Popen[str]] = {}
    data: dict[str, Path] = {}
    try:
        seed = ""
        for i in range(4):
            proc, address = start_peer_process(
                tmp_path / f"p{i}", "--drain", *(["--bootstrap", seed] if seed else [])
            )
            seed = seed or address
            procs[address], data[address] = proc, tmp_path / f"p{i}"
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(20 * SEG))
        put = run_cli(
            "difs",
            "put",
            str(src),
            "/leave/x",
            "--peer",
            seed,
            "--segment-size",
            "64KiB",
            "--replicas",
            "2",
            "--token-file",
            str(data[seed] / "control.token"),
            "--json",
            env=env,
        )
        assert put.returncode == 0, put.stderr
        held = {a: ranges_held(put.stdout, data[a]) for a in procs if a != seed}
        leaving, second = sorted(held, key=lambda a: -held[a])[:2]
        assert held[leaving] > 0
        out = run_cli(
            "difs-peer",
            "leave",
            "--peer",
            leaving,
            "--token-file",
            str(data[leaving] / "control.token"),
            "--json",
            env=env,
        )
        assert out.returncode == 0, out.stderr
        summary = json.loads(out.stdout)
        assert summary["state"] == "done" and summary["failed"] == []
        assert procs[leaving].wait(timeout=30) == 0
        assert (data[leaving] / "holdings.sqlite3").exists()  # its data directory stays
        procs[second].send_signal(signal.SIGTERM)
        assert procs[second].wait(timeout=60) == 0
        assert (data[second] / "store").is_dir()
        got = run_cli(
            "difs", "get", "/leave/x", "-o", str(tmp_path / "out"), "--peer", seed, env=env
        )
        assert got.returncode == 0, got.stderr
        assert (tmp_path / "out").read_bytes() == src.read_bytes()
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=15)


def test_leave_help_names_the_exit_code() -> None:
    """``difs-peer leave --help`` documents the incomplete-drain exit code."""
    out = run_cli("difs-peer", "leave", "--help", env=dict(os.environ))
    assert out.returncode == 0 and "Exit 13" in out.stdout


def test_an_incomplete_drain_keeps_the_peer_until_a_second_signal(tmp_path: Path) -> None:
    """2 peers, r=2: ``leave`` reports the ranges it cannot hand over and exits 13 with
    the peer still running; SIGTERM with --drain ends incomplete too and the peer stays;
    a second SIGTERM stops it at once, exit 0, its data directory intact."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env.pop("DIFS_PEER", None)
    seed_proc, seed = start_peer_process(tmp_path / "a")
    procs = [seed_proc]
    try:
        proc, address = start_peer_process(tmp_path / "b", "--drain", "--bootstrap", seed)
        procs.append(proc)
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(4 * SEG))
        token = str(tmp_path / "a" / "control.token")
        put = run_cli(
            "difs", "put", str(src), "/stay/x", "--peer", seed, "--segment-size", "64KiB",
            "--replicas", "2", "--token-file", token, env=env,
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        own = str(tmp_path / "b" / "control.token")
        out = run_cli("difs-peer", "leave", "--peer", address, "--token-file", own, env=env)
        assert out.returncode == 13, out.stderr
        assert "not handed over" in out.stdout and "1 of 2 live copies" in out.stdout
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.stderr is not None
        # the drain the signal started (not the one leave started: its lines come first)
        # ends incomplete; a second signal sent before the first is handled would merge
        # with it (signals of one kind do not queue)
        signalled = False
        for line in proc.stderr:
            signalled = signalled or line.startswith("draining:")
            if signalled and "drain_incomplete" in line:
                break
        assert signalled
        assert proc.poll() is None  # it stays
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=15) == 0
        assert (tmp_path / "b" / "holdings.sqlite3").exists()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=15)


def test_ctrl_c_of_leave_cancels_the_drain_and_leave_again_resumes(tmp_path: Path) -> None:
    """Ctrl-C of ``leave`` while the drain waits on silent peers (SIGSTOP) exits 130 and
    cancels the drain (the peer stays, a normal peer); ``leave`` again completes, exit 0."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env.pop("DIFS_PEER", None)
    procs: dict[str, subprocess.Popen[str]] = {}
    data: dict[str, Path] = {}
    try:
        seed = ""
        for i in range(3):
            proc, address = start_peer_process(
                tmp_path / f"p{i}", *(["--bootstrap", seed] if seed else [])
            )
            seed = seed or address
            procs[address], data[address] = proc, tmp_path / f"p{i}"
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(8 * SEG))
        put = run_cli(
            "difs", "put", str(src), "/ctrlc/x", "--peer", seed, "--segment-size", "64KiB",
            "--replicas", "2", "--token-file", str(data[seed] / "control.token"), "--json",
            env=env,
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        held = {a: ranges_held(put.stdout, data[a]) for a in procs if a != seed}
        leaving = max(held, key=lambda a: held[a])
        assert held[leaving] > 0
        others = [a for a in procs if a != leaving]
        token = str(data[leaving] / "control.token")
        for a in others:
            procs[a].send_signal(signal.SIGSTOP)
        leave = subprocess.Popen(
            [str(BIN / "difs-peer"), "leave", "--peer", leaving, "--token-file", token],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert leave.stdout is not None
        assert leave.stdout.readline().startswith("draining:")
        leave.send_signal(signal.SIGINT)
        assert leave.wait(timeout=30) == 130
        status = run_cli(
            "difs-peer", "status", "--peer", leaving, "--token-file", token, "--json", env=env
        )
        assert json.loads(status.stdout)["drain"]["state"] == "cancelled", status.stderr
        for a in others:
            procs[a].send_signal(signal.SIGCONT)
        assert procs[leaving].poll() is None
        again = run_cli(
            "difs-peer", "leave", "--peer", leaving, "--token-file", token, "--json", env=env
        )
        assert again.returncode == 0, again.stderr + again.stdout
        assert json.loads(again.stdout)["state"] == "done"
        assert procs[leaving].wait(timeout=30) == 0
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGCONT)
                proc.kill()
            proc.wait(timeout=15)
