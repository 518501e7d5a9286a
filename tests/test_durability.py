"""Durability with real processes: kill -9 during fetches and publishes, disk damage, GC."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from difs_p2p.client import Client
from difs_p2p.errors import DifsError
from difs_p2p.identity import Identity
from tests.helpers import wait_for

BIN = Path(sys.executable).parent
SEG = 64 << 10
# Every peer and client here is 127.0.0.1, which stands for ten hosts: the per-address
# connection limit (tested on its own in test_adversarial.py) would count them as one.
FAST = [
    "--repair-interval",
    "0.5",
    "--dead-after",
    "2",
    "--capacity",
    "2GiB",
    "--no-limit-loopback",
]


class Net:
    """Real difs-peer processes on 127.0.0.1."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.procs: dict[str, subprocess.Popen[str]] = {}
        self.addresses: dict[str, tuple[str, int]] = {}
        self.seed = ""

    def start(self, name: str) -> tuple[str, int]:
        cmd = [str(BIN / "difs-peer"), "join", "--data", str(self.root / name), *FAST]
        if self.seed:
            cmd += ["--bootstrap", self.seed]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("peer ready"), line
        text = dict(p.split("=", 1) for p in line.split()[2:])["address"]
        host, port = text.rsplit(":", 1)
        self.seed = self.seed or text
        self.procs[name] = proc
        self.addresses[name] = (host, int(port))
        return self.addresses[name]

    def kill9(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)

    def stop_all(self) -> None:
        for proc in self.procs.values():
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()

    def name_of(self, node_hex: str) -> str:
        for name in self.procs:
            if (self.root / name / "peer.key").exists() and self._id(name) == node_hex:
                return name
        raise KeyError(node_hex)

    def token(self, name: str) -> bytes:
        """The control token of peer ``name`` (its operator's credential)."""
        from difs_p2p.control import read_token_file

        return read_token_file(self.root / name / "control.token")

    def token_file(self, name: str) -> str:
        return str(self.root / name / "control.token")

    def _id(self, name: str) -> str:
        from difs_p2p.identity import load_or_create

        return load_or_create(self.root / name / "peer.key").node_id.hex()


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    network = Net(tmp_path)
    yield network
    network.stop_all()


def peer_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "difs-peer"), *args], capture_output=True, text=True, timeout=120, check=False
    )


async def test_kill9_two_holders_during_fetches_then_repair(net: Net, tmp_path: Path) -> None:
    """10 peers, r=3, 20 objects: fetches survive two kill -9s and r is restored."""
    for i in range(10):
        net.start(f"p{i}")
    files = {}
    publisher = Identity.generate()
    async with Client(net.addresses["p0"], token=net.token("p0"), publisher=publisher) as client:
        for i in range(20):
            src = tmp_path / f"obj{i}"
            src.write_bytes(os.urandom(16 * SEG + i))
            await client.put(src, f"/dur/{i}", segment_size=SEG, replicas=3)
            files[f"/dur/{i}"] = src
    # Two peers holding something, other than the publisher's entry peer, the peer used
    # for stat and the one fetched through (placement depends on the random node IDs).
    victims: list[str] = []
    async with Client(net.addresses["p1"]) as client:
        for name in files:
            for s in (await client.stat(name))["storages"]:
                peer = net.name_of(s["storage"])
                if peer not in ("p0", "p1", "p2", *victims) and len(victims) < 2:
                    victims.append(peer)
    assert len(victims) == 2
    started = asyncio.Event()

    async def fetch(name: str, src: Path) -> bool:
        async with Client(net.addresses["p2"]) as client:
            out = tmp_path / (name.replace("/", "_") + ".out")
            await client.get(name, out, progress=lambda n: started.set())
            return await asyncio.to_thread(lambda: out.read_bytes() == src.read_bytes())

    fetches = [asyncio.create_task(fetch(n, s)) for n, s in files.items()]
    await started.wait()
    for victim in victims:
        net.kill9(victim)
    assert all(await asyncio.gather(*fetches))

    async def fully_replicated() -> bool:
        async with Client(net.addresses["p1"]) as client:
            for name in files:
                ranges = (await client.stat(name))["ranges"]
                if any(r["live"] < 3 for r in ranges):
                    return False
        return True

    await wait_for(fully_replicated, timeout=60, step=0.5)


async def test_corrupt_segment_on_disk_is_healed(net: Net, tmp_path: Path) -> None:
    """A segment damaged on disk is found by difs-peer check and fetched from a replica."""
    for i in range(4):
        net.start(f"p{i}")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    token = net.token("p0")
    async with Client(net.addresses["p0"], token=token, publisher=Identity.generate()) as client:
        await client.put(src, "/heal", segment_size=SEG, replicas=3)
    holder = next(
        p
        for p in sorted(net.addresses)
        if any(net.root.joinpath(p, "store", "segments").glob("*/*/*"))
    )
    victim = next(net.root.joinpath(holder, "store", "segments").glob("*/*/*"))
    raw = bytearray(victim.read_bytes())
    raw[0] ^= 1
    victim.write_bytes(bytes(raw))
    address = "{}:{}".format(*net.addresses[holder])
    token_file = net.token_file(holder)
    args = ["check", "--repair", "--peer", address, "--token-file", token_file, "--json"]
    report = json.loads(peer_cli(*args).stdout)
    assert len(report["corrupt"]) == 1 and report["healed"] == 1
    again = json.loads(
        peer_cli("check", "--peer", address, "--token-file", token_file, "--json").stdout
    )
    assert again["corrupt"] == [] and again["ok"] == again["checked"]


async def test_kill9_mid_publish_restarts_clean(net: Net, tmp_path: Path) -> None:
    """The entry peer dies mid-publish: the publish fails, the peer restarts clean."""
    for i in range(4):
        net.start(f"p{i}")
    src = tmp_path / "big"
    src.write_bytes(os.urandom(64 << 20))
    progressed = asyncio.Event()
    total = {"n": 0}

    def progress(n: int) -> None:
        total["n"] += n
        if total["n"] > 16 << 20:
            progressed.set()

    async def publish() -> None:
        me, token = Identity.generate(), net.token("p1")
        async with Client(net.addresses["p1"], token=token, publisher=me) as client:
            await client.put(src, "/crash", progress=progress)

    task = asyncio.create_task(publish())
    await progressed.wait()
    net.kill9("p1")
    with pytest.raises(DifsError):
        await task
    assert list((net.root / "p1" / "store" / "tmp").iterdir()) or True  # may hold a partial
    net.start("p1")
    assert not list((net.root / "p1" / "store" / "tmp").iterdir())
    address = "{}:{}".format(*net.addresses["p1"])
    report = json.loads(
        peer_cli("check", "--peer", address, "--token-file", net.token_file("p1"), "--json").stdout
    )
    assert report["corrupt"] == [] and report["missing"] == []
    async with Client(net.addresses["p2"]) as client:
        with pytest.raises(DifsError):
            await client.resolve("/crash")


async def test_holder_down_during_delete_frees_on_return(net: Net, tmp_path: Path) -> None:
    """A holder that was down during rm frees the deleted object's segments when back."""
    for i in range(4):
        net.start(f"p{i}")
    src = tmp_path / "src"
    src.write_bytes(os.urandom(8 * SEG))
    me = Identity.generate()
    async with Client(net.addresses["p0"], token=net.token("p0"), publisher=me) as client:
        result = await client.put(src, "/gone", segment_size=SEG, replicas=3)
    holder = next(net.name_of(h) for h in result.ranges[0]["holders"] if net.name_of(h) != "p0")
    net.kill9(holder)
    async with Client(net.addresses["p0"], token=net.token("p0"), publisher=me) as client:
        await client.rm("/gone")
    segment_files = list((net.root / holder / "store" / "segments").glob("*/*/*"))
    assert segment_files
    net.start(holder)
    await wait_for(
        lambda: not list((net.root / holder / "store" / "segments").glob("*/*/*")),
        timeout=30,
        step=0.2,
    )
