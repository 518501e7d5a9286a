"""Processes for the S3 client and conformance tests: a DIFS network serving the S3 API
(``difs-peer join --s3``), its access keys (``difs s3-key create``), and moto's S3 server."""

from __future__ import annotations

import asyncio
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from difs_p2p.client import Client
from difs_p2p.control import read_token_file
from difs_p2p.identity import Identity
from difs_p2p.listing import (
    FOLDER,
    OBJECT,
    SPLIT,
    build_child,
    bulk_layout,
    owner_fingerprint,
    shard_key,
)
from tests.helpers import wait_for_sync

BIN = Path(sys.executable).parent
STOP_TIMEOUT = 30.0


@functools.cache
def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (for servers without port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def stop_processes(procs: list[subprocess.Popen[str]]) -> None:
    """SIGTERM each process, wait for each; kill one that ignores it."""
    for proc in procs:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class S3Network:
    """Peer processes on 127.0.0.1; the first serves the S3 API at ``url``."""

    root: Path
    procs: list[subprocess.Popen[str]] = field(default_factory=list)
    url: str = ""
    address: str = ""  # the S3 peer's HOST:PORT

    @property
    def data(self) -> Path:
        """The data directory of the S3 peer (its key store)."""
        return self.root / "p0"

    def env(self) -> dict[str, str]:
        """Environment for ``difs`` commands: a home of their own."""
        return dict(os.environ, DIFS_HOME=str(self.root / "home"))

    def create_key(self, name: str, identity: Path | None = None) -> tuple[str, str]:
        """A new access key of the S3 peer (publishing as the key file ``identity``, else as
        a new publisher key): (access key id, secret)."""
        cmd = [str(BIN / "difs"), "s3-key", "create", "--data", str(self.data), "--name", name]
        if identity is not None:
            cmd += ["--identity", str(identity)]
        out = subprocess.run(
            [*cmd, "--json"],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env=self.env(),
        )
        assert out.returncode == 0, out.stderr
        made = json.loads(out.stdout)
        return str(made["access_key"]), str(made["secret"])

    def lay_out(self, owner: Identity, bucket: str, sizes: dict[str, int]) -> None:
        """List keys ``folder/name`` (key -> size) in ``bucket`` without uploading them: their
        child entries, signed by the bucket's owner, laid out at once as one-by-one puts
        would leave them (``listing.bulk_layout``), stored through the S3 peer. Each folder
        must be written only here; the bucket's own shard gets one entry per folder (it
        must stay unsplit: under ``listing.SHARD_ENTRIES`` entries)."""
        asyncio.run(self._lay_out(owner, bucket, sizes))

    async def _lay_out(self, owner: Identity, bucket: str, sizes: dict[str, int]) -> None:
        fp = owner_fingerprint(owner.public_key)
        now = int(time.time())
        folders: dict[str, list[str]] = {}
        for key in sizes:
            folder, name = key.split("/")
            folders.setdefault(folder, []).append(name)
        shards: list[tuple[bytes, list[bytes]]] = []
        root = f"/{bucket}"
        tops = [
            build_child(owner, owner=fp, parent=root, child=f, flags=FOLDER, level=0, issued=now,
                        created=now).raw
            for f in folders
        ]  # fmt: skip
        shards.append((shard_key(fp, root, 0, 0), tops))
        for folder, names in folders.items():
            parent = f"{root}/{folder}"
            for level, bits, mine, split in bulk_layout(sorted(names)):
                raws = [
                    build_child(owner, owner=fp, parent=parent, child=c, flags=OBJECT,
                                level=level, issued=now, version=1,
                                size=sizes[f"{folder}/{c}"], created=now).raw
                    for c in mine
                ]  # fmt: skip
                if split:
                    raws.append(
                        build_child(owner, owner=fp, parent=parent, child="", flags=SPLIT,
                                    level=level, bits=bits, issued=now).raw
                    )  # fmt: skip
                shards.append((shard_key(fp, parent, level, bits), raws))
        host, port = self.address.rsplit(":", 1)
        token = read_token_file(self.data / "control.token")
        async with Client((host, int(port)), token=token) as client:
            for shard, raws in shards:
                await client.add_children(shard, raws)

    def stop(self) -> None:
        stop_processes(self.procs)


def _start_peer(data: Path, *extra: str) -> tuple[subprocess.Popen[str], dict[str, str]]:
    proc = subprocess.Popen(
        [
            str(BIN / "difs-peer"),
            "join",
            "--data",
            str(data),
            "--http",
            "off",
            "--no-limit-loopback",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("peer ready"):
        proc.kill()
        proc.wait()
        raise AssertionError(f"peer did not start: {line!r}")
    return proc, dict(part.split("=", 1) for part in line.split()[2:])


def start_s3_network(root: Path, n: int = 3, *s3_options: str) -> S3Network:
    """``n`` peer processes in ``root``/p0..; p0 serves S3 on a free port of 127.0.0.1
    (with ``s3_options`` added to its command)."""
    net = S3Network(root)
    try:
        first, ready = _start_peer(root / "p0", "--s3", "127.0.0.1:0", *s3_options)
        net.procs.append(first)
        net.url = ready["s3"] if "://" in ready["s3"] else f"http://{ready['s3']}"
        net.address = ready["address"]
        for i in range(1, n):
            net.procs.append(_start_peer(root / f"p{i}", "--bootstrap", ready["address"])[0])
    except BaseException:
        net.stop()
        raise
    return net


@dataclass
class MotoServer:
    """moto's S3 server (``moto_server``) on 127.0.0.1: the reference the ratchet compares
    DIFS with."""

    proc: subprocess.Popen[str]
    url: str

    def stop(self) -> None:
        stop_processes([self.proc])


def start_moto() -> MotoServer:
    """``moto_server`` on a free port, once it answers."""
    port = free_port()
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"

    def answers() -> bool:
        assert proc.poll() is None, "moto_server exited"
        try:
            with urllib.request.urlopen(url + "/moto-api/", timeout=2):
                return True
        except urllib.error.HTTPError:
            return True  # an answer all the same
        except OSError:
            return False

    try:
        wait_for_sync(answers, timeout=60)
    except BaseException:
        stop_processes([proc])
        raise
    return MotoServer(proc, url)
