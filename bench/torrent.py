"""libtorrent beside DIFS: the same file fetched between two libtorrent sessions on loopback.

``libtorrent_fetch`` makes a torrent of a file (4 MiB pieces, BitTorrent v1), seeds it
from one ``lt.session`` (the file checked before the clock starts) and downloads it into a
fresh directory with a second one, both on 127.0.0.1 with DHT, LSD, UPnP and NAT-PMP off
and the seed added to the downloader directly (``connect_peer``): MB/s and seconds from
adding the torrent to the downloader until every piece passed its hash check and
libtorrent's buffers are flushed to the file, and whether the copy is byte-identical
(BLAKE3 against the source). ``tuned`` applies what raises loopback throughput: the
``high_performance_seed`` preset on both sides, TCP only (uTP off), plaintext, larger send
buffers, socket buffers and disk queues, a faster tick, torrents that start at once rather
than on the auto-manager's next pass; otherwise libtorrent's stock settings and flags (the
fetcher then connects over uTP, about 1 s after the torrent is added).

``beside_libtorrent`` is what ``python -m bench`` runs after its fetches, on the source
file of its smallest size (256 MiB by default): our whole command (``difs get NAME -o
FILE``, the process's wall time including start-up and exit, the object published with
r = 1 on a network of two ``difs-peer`` processes), then libtorrent tuned and default on
the same source file, ``DIFS_BENCH_TORRENT_RUNS`` times alternated (default 1), and our
ratio to libtorrent's tuned figure (target >= 5).
``python -m bench.torrent`` does the same on a file of ``DIFS_BENCH_MIB`` MiB (default
256) and writes ``bench/results/torrent.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import blake3
import libtorrent as lt

from bench.peers import start_network, stop_processes, write_results

MiB = 1 << 20
PIECE_SIZE = 4 * MiB
# One run's limit: the seed's check and the download (stock settings fetched 256 MiB at
# 12-16 MB/s here on a loaded machine: 17-22 s).
TIMEOUT = 300.0
# Our ratio to libtorrent's tuned MB/s that the performance work aims at.
TARGET_RATIO = 5.0

# Both sessions: loopback only, nothing that looks for peers or opens ports on a router.
COMMON: lt.settings_pack = {
    "listen_interfaces": "127.0.0.1:0",
    "enable_dht": False,
    "enable_lsd": False,
    "enable_upnp": False,
    "enable_natpmp": False,
}

# What raises throughput between two sessions on one machine (libtorrent's settings_pack
# reference): TCP only, deep request queues, large send buffers and disk queues (bytes), a
# tick of 100 ms (connection attempts and unchoking run on it), no rate limits.
TUNED: lt.settings_pack = {
    "enable_incoming_utp": False,
    "enable_outgoing_utp": False,
    "upload_rate_limit": 0,
    "download_rate_limit": 0,
    "send_buffer_low_watermark": 4 * MiB,
    "send_buffer_watermark": 64 * MiB,
    "send_buffer_watermark_factor": 200,
    "send_socket_buffer_size": 4 * MiB,
    "recv_socket_buffer_size": 4 * MiB,
    "max_queued_disk_bytes": 64 * MiB,
    "max_out_request_queue": 4000,
    "max_allowed_in_request_queue": 4000,
    "request_queue_time": 10,
    "aio_threads": 4,
    "hashing_threads": 2,
    "tick_interval": 100,
    # plaintext: the stock policy negotiates an encrypted handshake and may pick RC4
    "out_enc_policy": int(lt.enc_policy.pe_disabled),
    "in_enc_policy": int(lt.enc_policy.pe_disabled),
    "allowed_enc_level": int(lt.enc_level.pe_plaintext),
}


def settings(*, tuned: bool) -> lt.settings_pack:
    """A session's settings: stock or tuned, always loopback-only (``COMMON``)."""
    pack = lt.high_performance_seed() if tuned else lt.default_settings()
    pack.update(COMMON)
    if tuned:
        pack.update(TUNED)
    pack["alert_mask"] = (
        lt.alert_category.error
        | lt.alert_category.status
        | lt.alert_category.storage
        | lt.alert_category.piece_progress
    )
    return pack


def file_hash(path: Path) -> bytes:
    """BLAKE3 of a file read in 1 MiB pieces."""
    h = blake3.blake3()
    with path.open("rb") as fh:
        while chunk := fh.read(MiB):
            h.update(chunk)
    return h.digest()


def make_torrent(path: Path) -> lt.torrent_info:
    """A v1 torrent of one file in 4 MiB pieces, its hashes read from ``path``."""
    ct = lt.create_torrent(lt.list_files(str(path)), PIECE_SIZE, lt.create_torrent.v1_only)
    lt.set_piece_hashes(ct, str(path.parent))
    return lt.torrent_info(ct.generate())


def add_params(info: lt.torrent_info, save_path: Path, *, tuned: bool) -> lt.add_torrent_params:
    """The torrent ``info`` stored in ``save_path``; tuned: started at once.

    Stock flags make the torrent auto-managed: it then waits for the queue's next pass
    (about 1 s here) before it starts or connects to anyone.
    """
    params = lt.add_torrent_params()
    params.ti = info
    params.save_path = str(save_path)
    if tuned:
        params.flags &= ~(lt.torrent_flags.auto_managed | lt.torrent_flags.paused)
    return params


def wait_alerts(
    ses: lt.session, kinds: tuple[type[lt.alert], ...], deadline: float, what: str
) -> list[lt.alert]:
    """Pop ``ses``'s alerts until one of ``kinds`` has arrived; all popped (whole batches).

    An error alert of the torrent or the deadline passing raises.
    """
    seen: list[lt.alert] = []
    while not any(isinstance(alert, kinds) for alert in seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"libtorrent: no {what} in time")
        ses.wait_for_alert(int(min(left, 1.0) * 1000))
        for alert in ses.pop_alerts():
            seen.append(alert)
            if isinstance(alert, lt.torrent_error_alert | lt.file_error_alert):
                raise RuntimeError(f"libtorrent: {alert.message()}")
    return seen


def libtorrent_fetch(path: Path, *, tuned: bool, timeout: float = TIMEOUT) -> dict[str, Any]:
    """Seed ``path`` from one libtorrent session and download it with another on loopback.

    Returns MB/s, seconds (the torrent added to the downloader until every piece passed
    its hash check and was flushed to the file), seconds to the first verified piece, and
    whether the copy is byte-identical; the copy is deleted. ``timeout`` bounds the whole
    run (TimeoutError). Whatever happens both sessions lose their torrents, are paused and
    stop listening; on success their destructors (which join libtorrent's threads) run
    before the copy is hashed.
    """
    deadline = time.monotonic() + timeout
    size = path.stat().st_size
    out = Path(tempfile.mkdtemp(prefix="libtorrent-", dir=path.parent))
    try:
        sessions = [lt.session(settings(tuned=tuned)) for _ in range(2)]
        try:
            seconds, first_piece = timed_fetch(sessions, path, out, tuned=tuned, deadline=deadline)
        finally:
            for ses in sessions:
                for handle in ses.get_torrents():
                    ses.remove_torrent(handle)
                ses.pause()
                ses.apply_settings({"listen_interfaces": ""})
            del ses
            sessions.clear()
        identical = file_hash(out / path.name) == file_hash(path)
    finally:
        shutil.rmtree(out)
    return {
        "op": f"libtorrent {size // MiB} MiB {'tuned' if tuned else 'default'}",
        "tuned": tuned,
        "bytes": size,
        "seconds": seconds,
        "mb_s": size / seconds / 1e6,
        "first_piece_s": first_piece,
        "identical": identical,
        "piece_size": PIECE_SIZE,
        "version": lt.__version__,
    }


def timed_fetch(
    sessions: list[lt.session], path: Path, out: Path, *, tuned: bool, deadline: float
) -> tuple[float, float]:
    """``sessions[0]`` seeds ``path``, ``sessions[1]`` fetches it into ``out``: the seconds
    until the copy is complete and flushed, and to its first verified piece."""
    info = make_torrent(path)
    seed, fetcher = sessions
    seeding = seed.add_torrent(add_params(info, path.parent, tuned=tuned))
    # the seed checks its file first (not timed): it then serves without hashing
    wait_alerts(seed, (lt.torrent_checked_alert,), deadline, "check of the seed's file")
    if not seeding.status().is_seeding:
        raise RuntimeError("libtorrent: the seed's file failed its check")
    params = add_params(lt.torrent_info(info), out, tuned=tuned)
    t0 = time.perf_counter()
    handle = fetcher.add_torrent(params)
    handle.connect_peer(("127.0.0.1", seed.listen_port()))
    first_piece = 0.0
    while True:
        alerts = wait_alerts(
            fetcher,
            (lt.torrent_finished_alert, lt.piece_finished_alert),
            deadline,
            "complete download",
        )
        if not first_piece and any(isinstance(a, lt.piece_finished_alert) for a in alerts):
            first_piece = time.perf_counter() - t0
        if any(isinstance(a, lt.torrent_finished_alert) for a in alerts):
            break
    handle.flush_cache()
    wait_alerts(fetcher, (lt.cache_flushed_alert,), deadline, "flush of the copy")
    return time.perf_counter() - t0, first_piece


def difs_get_wall(args: list[str], env: dict[str, str]) -> float:
    """Wall seconds of one ``difs`` command, start-up and exit included."""
    t0 = time.perf_counter()
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("difs")), *args],
        capture_output=True,
        env=env,
        check=False,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"difs {args[0]} failed: {proc.stderr.decode(errors='replace')}")
    return seconds


def beside_libtorrent(src: Path, runs: int = 1) -> dict[str, Any]:
    """Our whole ``difs get NAME -o FILE`` of ``src`` against libtorrent on the same file.

    ``src``'s object is published with r = 1 on two fresh ``difs-peer`` processes (in a
    directory next to ``src``) and fetched through the second; then libtorrent tuned and
    default; ``runs`` rounds alternated. Every copy must be byte-identical.
    """
    size = src.stat().st_size
    work = Path(tempfile.mkdtemp(prefix="beside-", dir=src.parent))
    rows: list[dict[str, Any]] = []
    try:
        procs, addresses = start_network(work, 2)
        try:
            env = dict(os.environ, DIFS_HOME=str(work / "home"))
            env["DIFS_TOKEN_FILE"] = str(work / "p0" / "control.token")
            entry, last = (f"{h}:{p}" for h, p in addresses)
            name = f"/bench/beside-{size}"
            difs_get_wall(["put", str(src), name, "--replicas", "1", "--peer", entry], env)
            out = work / "out.bin"
            for _ in range(runs):
                seconds = difs_get_wall(["get", name, "-o", str(out), "--peer", last], env)
                if file_hash(out) != file_hash(src):
                    raise SystemExit(f"fetched bytes of {name} differ from the source")
                out.unlink()
                rows.append(
                    {
                        "op": f"difs get {size // MiB} MiB -o FILE",
                        "bytes": size,
                        "seconds": seconds,
                        "mb_s": size / seconds / 1e6,
                    }
                )
                for tuned in (True, False):
                    row = libtorrent_fetch(src, tuned=tuned)
                    if not row["identical"]:
                        raise SystemExit("libtorrent's copy differs from the source")
                    rows.append(row)
        finally:
            stop_processes(procs)
    finally:
        shutil.rmtree(work)

    def best(op: str) -> float:
        return max(float(r["mb_s"]) for r in rows if r["op"].endswith(op))

    ours, tuned_mb_s = best("-o FILE"), best("tuned")
    # each round's rows: ours, tuned, default
    rounds = [rows[i : i + 3] for i in range(0, len(rows), 3)]
    return {
        "rows": rows,
        "ours_mb_s": ours,
        "libtorrent_tuned_mb_s": tuned_mb_s,
        "libtorrent_default_mb_s": best("default"),
        "ratio_to_tuned": ours / tuned_mb_s,
        "ratios_per_round": [r[0]["mb_s"] / r[1]["mb_s"] for r in rounds],
        "target_ratio": TARGET_RATIO,
    }


def print_beside(result: dict[str, Any]) -> None:
    """The rows of ``beside_libtorrent``'s result and our ratio to libtorrent tuned."""
    print(f"{'beside libtorrent':<32}{'MB/s':>8}{'seconds':>10}{'1st piece':>10}")
    for row in result["rows"]:
        first = f"{row['first_piece_s']:.3f}" if "first_piece_s" in row else ""
        print(f"{row['op']:<32}{row['mb_s']:>8.0f}{row['seconds']:>10.3f}{first:>10}")
    per_round = ", ".join(f"{r:.2f}" for r in result["ratios_per_round"])
    print(
        f"{'difs get / libtorrent tuned':<32}{result['ratio_to_tuned']:>8.2f}"
        f"   (best of each; per round {per_round}; target >= {result['target_ratio']:.0f})"
    )


def main() -> int:
    size = int(os.environ.get("DIFS_BENCH_MIB", "256").split(",")[0]) * MiB
    runs = int(os.environ.get("DIFS_BENCH_TORRENT_RUNS", "1"))
    with tempfile.TemporaryDirectory(prefix="difs-bench-torrent-") as tmp:
        src = Path(tmp) / "src.bin"
        with src.open("wb") as fh:
            for _ in range(size // MiB):
                fh.write(os.urandom(MiB))
        result = beside_libtorrent(src, runs)
    print_beside(result)
    path = write_results("torrent", result)
    print(json.dumps({"written": str(path)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
