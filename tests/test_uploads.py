"""Metered uploads: what a failed or interrupted publish leaves is collected, capacity
counts what segments cost on disk, and the entry peer keeps only what placement gives it."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import blake3
import pytest

from difs_p2p import segments, wire
from difs_p2p.client import Client
from difs_p2p.config import RepairConfig
from difs_p2p.control import PeerCredential
from difs_p2p.errors import AlreadyExistsError
from difs_p2p.identity import Identity
from difs_p2p.names import name_key
from difs_p2p.ops import AbandonRequest, PlaceReply, PlaceRequest
from difs_p2p.peer import Peer
from difs_p2p.placement import chain_key
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.transfer import Connection
from tests.helpers import (
    client_for,
    peer_config,
    start_peer_process,
    start_peers,
    stop_all,
    wait_for,
    wait_for_sync,
)

SEG = 64 << 10
# Uploads need a proof: any key pair makes a peer, which may upload (strangers may not).
UPLOADER = PeerCredential(Identity.generate())
BIN = Path(sys.executable).parent


def quick() -> RepairConfig:
    """Orphans collected a second after the fact; maintenance rounds every 0.2 s."""
    return RepairConfig(interval=0.2, orphan_grace=1.0, orphan_per_segment=0.0)


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 5, repair=quick())
    yield peers
    await stop_all(peers)


def used(peer: Peer) -> int:
    assert peer.store is not None
    return peer.store.used


def nothing_kept(peers: list[Peer]) -> bool:
    return all(used(p) == 0 and not p.replicator.holdings.all() for p in peers)


def random_file(tmp_path: Path, size: int) -> Path:
    path = tmp_path / f"src-{os.urandom(4).hex()}"
    path.write_bytes(os.urandom(size))
    return path


async def place(client: Client, name: str, integrity: IntegrityRoot, count: int) -> PlaceReply:
    """The ``place`` a put sends after its upload, for version 1 of ``name``."""
    stripes = segments.default_stripes(count)
    return await client._request(
        PlaceRequest(name_key(name), 1, integrity, count, stripes, replicas=3)
    )


async def interrupt(entry: Peer, src: Path, name: str, point: str) -> None:
    """Publish ``src`` through ``entry`` as a client would, and give up at ``point``."""
    client = client_for(entry, publisher=Identity.generate())
    try:
        if point == "some segments sent":
            data = await asyncio.to_thread(src.read_bytes)
            conn = await client._data_conn()
            for i in range(5):
                chunk = data[i * SEG : (i + 1) * SEG]
                seg_id = SegmentId(blake3.blake3(chunk).digest())
                await conn.send(wire.PutSeg(request_id=i, seg_id=seg_id, data=chunk))
                assert isinstance(await conn.read_frame(), wire.Ack)
            return
        hashes, integrity, _ = await client._upload(src, SEG, None)
        if point == "uploaded, not placed":
            return
        await place(client, name, integrity, len(hashes))
        if point == "placed, publish abandoned":
            await client._request(AbandonRequest())
    finally:
        await client.close()


@pytest.mark.parametrize(
    "point",
    [
        "some segments sent",
        "uploaded, not placed",
        "placed, not published",
        "placed, publish abandoned",
    ],
)
async def test_an_interrupted_publish_leaves_no_storage_after_the_grace_time(
    network: list[Peer], tmp_path: Path, point: str
) -> None:
    """A publish given up at any point leaves nothing stored at any peer, also after a
    restart, and the next publish works."""
    src = random_file(tmp_path, 16 * SEG)
    await interrupt(network[0], src, "/gave-up", point)
    if point.startswith("placed"):
        assert sum(len(p.replicator.holdings.all()) for p in network) >= 3
    await wait_for(lambda: nothing_kept(network), timeout=30)
    await network[0].stop()
    network[0] = Peer(network[0].config)
    await network[0].start()
    assert nothing_kept(network)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        await client.put(src, "/gave-up", segment_size=SEG)
    async with Client(network[1].address) as client:
        buf = io.BytesIO()
        await client.get("/gave-up", buf)
    assert buf.getvalue() == src.read_bytes()


async def test_the_entry_peer_frees_a_failed_upload_at_once(tmp_path: Path) -> None:
    """With the default grace time (minutes), the entry peer frees an upload whose
    connection closed, or that the client abandoned, within seconds."""
    peers = await start_peers(tmp_path / "net", 3)
    try:
        entry = peers[0]
        assert entry.config.repair.orphan_grace >= 60
        for point in ("some segments sent", "uploaded, not placed", "placed, not published"):
            await interrupt(entry, random_file(tmp_path, 16 * SEG), f"/p{len(point)}", point)
            await wait_for(lambda: used(entry) == 0 and not entry.replicator.holdings.all())
        await interrupt(
            entry, random_file(tmp_path, 16 * SEG), "/abandon", "placed, publish abandoned"
        )
        assert used(entry) == 0 and not entry.replicator.holdings.all()
    finally:
        await stop_all(peers)


async def test_a_put_cancelled_mid_upload_is_freed_at_once(tmp_path: Path) -> None:
    """A put task cancelled while it uploads (Ctrl-C) leaves nothing at the entry peer
    within seconds, with the default grace time."""
    peers = await start_peers(tmp_path / "net", 3)
    try:
        src = random_file(tmp_path, 64 * SEG)
        halfway = asyncio.Event()
        sent = 0

        def progress(n: int) -> None:
            nonlocal sent
            sent += n
            if sent >= 16 * SEG:
                halfway.set()

        async def put() -> None:
            async with client_for(peers[0], publisher=Identity.generate()) as client:
                await client.put(src, "/cancelled", segment_size=SEG, progress=progress)

        task = asyncio.create_task(put())
        await halfway.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_for(lambda: all(used(p) == 0 for p in peers))
    finally:
        await stop_all(peers)


async def test_a_put_whose_publish_loses_a_race_frees_its_upload_at_the_entry_peer(
    tmp_path: Path,
) -> None:
    """Two updates race for one version: the put that loses after its upload and place
    tells the entry peer to abandon, which keeps nothing of it."""
    peers = await start_peers(tmp_path / "net", 3)
    try:
        me = Identity.generate()
        async with client_for(peers[0], publisher=me) as client:
            await client.put(random_file(tmp_path, SEG), "/race", segment_size=SEG)
        sources = [random_file(tmp_path, 8 * SEG) for _ in range(2)]

        async def update(src: Path) -> object:
            async with client_for(peers[0], publisher=me) as client:
                return await client.put(src, "/race", segment_size=SEG, update=True)

        outcomes = await asyncio.gather(*(update(s) for s in sources), return_exceptions=True)
        lost = [s for s, o in zip(sources, outcomes, strict=True) if isinstance(o, Exception)]
        assert lost, outcomes
        assert all("at the same time" in str(o) for o in outcomes if isinstance(o, Exception))
        entry = peers[0].store
        assert entry is not None
        for src in lost:
            data = src.read_bytes()
            for i in range(8):
                assert not entry.has(segments.segment_hash(data[i * SEG : (i + 1) * SEG]))
    finally:
        await stop_all(peers)


async def test_an_upload_cut_by_a_peer_restart_is_collected_after_the_grace_time(
    tmp_path: Path,
) -> None:
    """Segments pending when the entry peer stopped (as after kill -9) are collected a
    grace time after its restart."""
    peers = await start_peers(tmp_path / "net", 2, repair=quick())
    try:
        entry = peers[0]
        conn = await Connection.open(entry.address, io_timeout=10, credential=UPLOADER)
        try:
            for i in range(8):
                chunk = os.urandom(SEG)
                seg_id = SegmentId(blake3.blake3(chunk).digest())
                await conn.send(wire.PutSeg(request_id=i, seg_id=seg_id, data=chunk))
                assert isinstance(await conn.read_frame(), wire.Ack)
            await entry.stop()  # with the upload's connection still open
        finally:
            conn.close()
        peers[0] = entry = Peer(entry.config)
        await entry.start()
        assert entry.store is not None and entry.store.count == 8
        await wait_for(lambda: used(entry) == 0, timeout=20)
    finally:
        await stop_all(peers)


async def test_an_idle_upload_connection_is_dropped_after_the_grace_time(
    network: list[Peer],
) -> None:
    """A connection that sent segments and then nothing is dropped after the grace time."""
    conn = await Connection.open(network[0].address, io_timeout=10, credential=UPLOADER)
    try:
        for i in range(4):
            chunk = os.urandom(SEG)
            await conn.send(
                wire.PutSeg(
                    request_id=i, seg_id=SegmentId(blake3.blake3(chunk).digest()), data=chunk
                )
            )
            assert isinstance(await conn.read_frame(), wire.Ack)
        assert used(network[0]) > 4 * SEG
        await wait_for(lambda: used(network[0]) == 0, timeout=20)
    finally:
        conn.close()


def charge_of_tiny(path: Path) -> int:
    """What an 8-byte segment costs on the file system of ``path``: a block and a file."""
    block = max(512, os.statvfs(path).f_frsize)
    return 2 * block


async def test_a_thousand_tiny_uploads_are_charged_their_disk_cost(tmp_path: Path) -> None:
    """Tiny segments count what they cost on disk: the capacity refuses them at that rate."""
    fits = 100
    capacity = fits * charge_of_tiny(tmp_path)
    peer = Peer(peer_config(tmp_path / "p", capacity=capacity))
    await peer.start()
    try:
        conn = await Connection.open(peer.address, io_timeout=10, credential=UPLOADER)
        try:
            answers = []
            for i in range(1000):
                data = i.to_bytes(8, "big")
                await conn.send(
                    wire.PutSeg(
                        request_id=i, seg_id=SegmentId(blake3.blake3(data).digest()), data=data
                    )
                )
                answers.append(await conn.read_frame())
            accepted = sum(isinstance(a, wire.Ack) for a in answers)
            refused = [a for a in answers if isinstance(a, wire.Error)]
            assert accepted == fits
            assert len(refused) == 1000 - fits
            assert all(a.code == wire.ErrorCode.NO_SPACE for a in refused)
            assert used(peer) == capacity
        finally:
            conn.close()
        await wait_for(lambda: used(peer) == 0)
    finally:
        await peer.stop()


async def test_the_entry_peer_keeps_no_copy_unless_placement_picks_it(tmp_path: Path) -> None:
    """With r = 1 through a peer placement does not pick, that peer keeps nothing and
    the object has exactly one copy."""
    network = await start_peers(tmp_path / "net", 5)
    try:
        await publish_through_a_peer_not_picked(network, tmp_path)
    finally:
        await stop_all(network)


async def publish_through_a_peer_not_picked(network: list[Peer], tmp_path: Path) -> None:
    entry = network[0]
    for _ in range(20):
        src = random_file(tmp_path, 16 * SEG)
        async with client_for(entry, publisher=Identity.generate()) as client:
            result = await client.put(src, f"/conduit/{src.name}", segment_size=SEG, replicas=1)
        holders = {h for r in result.ranges for h in r["holders"]}
        if entry.node_id.hex() not in holders:
            break
    else:
        pytest.fail("placement picked the entry peer 20 times in a row")
    assert [len(r["holders"]) for r in result.ranges] == [1] * len(result.ranges)
    assert entry.store is not None
    data = src.read_bytes()
    for i in range(16):
        assert not entry.store.has(segments.segment_hash(data[i * SEG : (i + 1) * SEG]))
    async with Client(network[3].address) as client:
        buf = io.BytesIO()
        await client.get(result.manifest.name, buf)
    assert buf.getvalue() == data


async def test_small_peers_take_two_mib_objects_with_one_replica_through_one_entry(
    tmp_path: Path,
) -> None:
    """On peers that fit one 2 MiB object, two are published with r = 1 through one
    entry peer (it forwards each upload along its chain and keeps neither)."""
    peers = await start_peers(tmp_path / "net", 4, capacity=(5 << 20) // 2)
    try:
        entry = peers[0]
        names: list[str] = []
        n = 0
        for name in (f"/small/{i}" for i in range(1000)):
            # a name whose (chain) range key the entry peer is the farthest peer from
            key = int.from_bytes(chain_key(name_key(name), 1, 0), "big")
            if max(peers, key=lambda p: int.from_bytes(p.node_id, "big") ^ key) is not entry:
                continue
            src = tmp_path / f"two-{n}"
            src.write_bytes(os.urandom(2 << 20))
            async with client_for(entry, publisher=Identity.generate()) as client:
                await client.put(src, name, replicas=1)
            assert used(entry) == 0
            names.append(name)
            n += 1
            if n == 2:
                break
        assert len(names) == 2
        async with Client(peers[1].address) as client:
            for n, name in enumerate(names):
                buf = io.BytesIO()
                await client.get(name, buf)
                assert buf.getvalue() == (tmp_path / f"two-{n}").read_bytes()
    finally:
        await stop_all(peers)


async def test_a_place_of_other_content_under_a_held_version_frees_nothing(
    network: list[Peer], tmp_path: Path
) -> None:
    """Someone uploads other bytes and places them under a published name and version
    (refused: every holder has that version), then goes away: every holder keeps the
    published copy (holding and segments)."""
    src = random_file(tmp_path, 8 * SEG)
    async with client_for(network[0], publisher=Identity.generate()) as client:
        published = await client.put(src, "/victim", segment_size=SEG, replicas=5)
    integrity = published.manifest.integrity
    other = random_file(tmp_path, 8 * SEG)
    with pytest.raises(AlreadyExistsError, match="holds other content"):
        await interrupt(network[0], other, "/victim", "placed, not published")
    for _ in range(3):  # maintenance rounds until past the grace time: nothing is collected
        for peer in network:
            assert peer.maintainer is not None
            await peer.maintainer.round()
        await asyncio.sleep(0.5)
    data = src.read_bytes()
    for peer in network:
        held = [(h.version, h.start, h.integrity) for h in peer.replicator.holdings.all()]
        assert held == [(1, 0, integrity)]
        assert peer.store is not None
        for i in range(8):
            assert peer.store.has(segments.segment_hash(data[i * SEG : (i + 1) * SEG]))
    async with Client(network[2].address) as client:
        buf = io.BytesIO()
        await client.get("/victim", buf)
    assert buf.getvalue() == data


def test_a_holding_is_orphaned_only_without_manifest_entries_or_newer_version() -> None:
    """A range whose version never appeared (no manifest, no holder entry, no newer version)
    is orphaned once the grace time and the per-segment allowance have passed."""
    from difs_p2p.holders import build_holder_entry
    from difs_p2p.holdings import Holding
    from difs_p2p.maintenance import NameView, orphaned
    from difs_p2p.manifest import Manifest
    from difs_p2p.names import NameKey
    from difs_p2p.segments import IntegrityRoot, SegmentId

    key, root = NameKey(b"k" * 20), IntegrityRoot(SegmentId(b"i" * 32))
    h = Holding(key, 2, root, 100, 0, 99, since=0.0)

    def manifest(version: int, integrity: IntegrityRoot = root) -> Manifest:
        return Manifest(
            "/x", key, version, None, None, 100 * 4096, 4096, 100, 2, 3, integrity,
            False, 0.0, b"p" * 32, b"",
        )  # fmt: skip

    v1, v2, v3 = manifest(1), manifest(2), manifest(3)
    other = manifest(2, IntegrityRoot(SegmentId(b"j" * 32)))  # the version another upload won
    entry = build_holder_entry(
        Identity.generate(), key=key, version=2, integrity=root, start=0, end=99,
        host="127.0.0.1", port=4000, issued=1,
    )  # fmt: skip
    never = NameView(None, {}, [])
    assert not orphaned(h, never, 10.0, grace=10.0, per_segment=0.1)  # 10 + 100 x 0.1
    assert orphaned(h, never, 20.5, grace=10.0, per_segment=0.1)
    assert orphaned(h, NameView(v1, {1: v1}, []), 11.0, 10.0)  # an update that failed
    assert orphaned(h, NameView(other, {2: other}, []), 11.0, 10.0)
    assert not orphaned(h, NameView(v2, {2: v2}, []), 1e9, 10.0)
    assert not orphaned(h, NameView(v3, {3: v3}, []), 1e9, 10.0)  # GC's to judge
    assert not orphaned(h, NameView(None, {}, [entry]), 1e9, 10.0)  # manifest hidden


# -- the commands, as processes ---------------------------------------------------------------


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_pending_uploads_of_a_killed_peer_are_collected_after_its_restart(
    tmp_path: Path,
) -> None:
    """kill -9 of a peer process with an upload open: after the restart, the segments it
    had received are collected within the grace time."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    proc, address = start_peer_process(tmp_path / "a", "--orphan-grace", "1")
    try:

        async def upload() -> None:
            host, port = address.rsplit(":", 1)
            # a peer (any key pair) may upload; a stranger may not
            conn = await Connection.open(
                (host, int(port)), io_timeout=10, credential=PeerCredential(Identity.generate())
            )
            try:
                for i in range(8):
                    chunk = os.urandom(SEG)
                    seg_id = SegmentId(blake3.blake3(chunk).digest())
                    await conn.send(wire.PutSeg(request_id=i, seg_id=seg_id, data=chunk))
                    assert isinstance(await conn.read_frame(), wire.Ack)
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=15)
            finally:
                conn.close()

        asyncio.run(upload())
        assert len(list((tmp_path / "a" / "store" / "segments").glob("*/*/*"))) == 8
        proc, address = start_peer_process(tmp_path / "a", "--orphan-grace", "1")

        def storage_used() -> int:
            token = str(tmp_path / "a" / "control.token")
            out = run_cli(
                "difs-peer", "status", "--peer", address, "--token-file", token, "--json", env=env
            )
            return int(json.loads(out.stdout)["storage"]["used"])

        wait_for_sync(lambda: storage_used() == 0)
        assert not list((tmp_path / "a" / "store" / "segments").glob("*/*/*"))
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def test_a_refused_put_on_small_peers_leaves_no_storage_used(tmp_path: Path) -> None:
    """A 10 MiB put refused for space on 3 MiB peers leaves nothing stored; the next put
    succeeds, and `difs-peer check` reports no orphans."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    procs: list[subprocess.Popen[str]] = []
    try:
        first, seed = start_peer_process(tmp_path / "a", "--capacity", "3MiB")
        procs.append(first)
        addresses = [seed]
        tokens = {seed: str(tmp_path / "a" / "control.token")}
        for name in ("b", "c"):
            proc, address = start_peer_process(
                tmp_path / name, "--capacity", "3MiB", "--bootstrap", seed
            )
            procs.append(proc)
            addresses.append(address)
            tokens[address] = str(tmp_path / name / "control.token")
        big = tmp_path / "big"
        big.write_bytes(os.urandom(10 << 20))
        seed_token = tokens[seed]
        refused = run_cli(
            "difs", "put", str(big), "/big", "--peer", seed, "--token-file", seed_token, env=env
        )
        assert refused.returncode == 8, refused.stderr

        def storage_used() -> list[int]:
            out = [
                run_cli(
                    "difs-peer", "status", "--peer", a, "--token-file", tokens[a], "--json", env=env
                )
                for a in addresses
            ]
            return [json.loads(o.stdout)["storage"]["used"] for o in out]

        wait_for_sync(lambda: storage_used() == [0, 0, 0])
        small = tmp_path / "small"
        small.write_bytes(os.urandom(1 << 20))
        ok = run_cli(
            "difs", "put", str(small), "/small", "--peer", seed, "--token-file", seed_token, env=env
        )
        assert ok.returncode == 0, ok.stderr
        check = run_cli(
            "difs-peer", "check", "--peer", seed, "--token-file", seed_token, "--json", env=env
        )
        assert check.returncode == 0, check.stderr
        assert json.loads(check.stdout)["orphans"] == {"segments": 0, "bytes": 0}
        text = run_cli("difs-peer", "check", "--peer", seed, "--token-file", seed_token, env=env)
        assert "0 orphaned" in text.stdout
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)
