"""Shared helpers for the test suite: waiting on conditions, starting local networks."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difs_p2p import wire
from difs_p2p.config import DhtConfig, PeerConfig
from difs_p2p.dht import Dht
from difs_p2p.identity import Identity
from difs_p2p.recordstore import AcceptAll, RecordPolicy
from difs_p2p.transfer import Connection, remote_error

if TYPE_CHECKING:
    from difs_p2p.client import Client
    from difs_p2p.peer import Peer

# A LAN-fast DHT for tests: short RPC timeout, quick liveness checks.
# Tens of in-process nodes share one event loop, so a reply's round trip includes the
# whole loop's backlog; these tests want exact lookups, so a request stalls only when it
# times out (test_dht covers the adaptive stall; peer processes and the simulator use it).
# Node-ID work is off (id_difficulty=0): tests create many identities; test_dht and
# test_adversarial cover the puzzle itself.
FAST_DHT = DhtConfig(
    rpc_timeout=0.5,
    lookup_stall=0.5,
    lookup_stall_min=0.5,
    liveness_interval=3600.0,
    id_difficulty=0,
)


async def wait_for(
    condition: Callable[[], bool | Awaitable[bool]], timeout: float = 10.0, step: float = 0.02
) -> None:
    """Wait until ``condition()`` is true, failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


async def raw_call(conn: Connection, op: str, **args: Any) -> dict[str, Any]:
    """A CALL with exactly these arguments, unchecked (what a peer does with requests our
    typed ones never send, or the JSON it answers): its REPLY body, or the remote error."""
    await conn.send(wire.Call(request_id=0, op=op, args=args))
    frame = await conn.read_frame()
    if isinstance(frame, wire.Error):
        raise remote_error(frame, conn.peer_address)
    assert isinstance(frame, wire.Reply), frame
    return dict(frame.body)


def wait_for_sync(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(0.05)


def new_dht(policy: RecordPolicy, config: DhtConfig = FAST_DHT) -> Dht:
    """A DHT node with its own key (contacts must prove their IDs)."""
    me = Identity.generate()
    return Dht(me.node_id, policy, config, identity=me)


async def start_dhts(
    n: int,
    *,
    policy: RecordPolicy | None = None,
    config: DhtConfig = FAST_DHT,
    concurrent: bool = False,
) -> list[Dht]:
    """``n`` DHT nodes on 127.0.0.1 (port 0), all bootstrapped from the first."""
    nodes = [new_dht(policy or AcceptAll(), config) for _ in range(n)]
    for node in nodes:
        await node.start("127.0.0.1", 0)
    seed = [nodes[0].me.address]
    if concurrent:
        await asyncio.gather(*(node.bootstrap(seed) for node in nodes[1:]))
    else:
        for node in nodes[1:]:
            await node.bootstrap(seed)
    return nodes


async def stop_all(nodes: list[Dht] | list[Peer]) -> None:
    await asyncio.gather(*(node.stop() for node in nodes))


def peer_config(data_dir: Path, **kwargs: object) -> PeerConfig:
    return PeerConfig(data_dir=data_dir, dht=FAST_DHT, **kwargs)  # type: ignore[arg-type]


async def start_peers(root: Path, n: int, **kwargs: object) -> list[Peer]:
    """``n`` real peers on 127.0.0.1, each with its own data dir under ``root``."""
    from difs_p2p.peer import Peer

    first = Peer(peer_config(root / "p0", **kwargs))
    await first.start()
    peers = [first]
    for i in range(1, n):
        peer = Peer(peer_config(root / f"p{i}", bootstrap=(first.address,), **kwargs))
        await peer.start()
        peers.append(peer)
    return peers


def client_for(peer: Peer, **kwargs: Any) -> Client:
    """A client of ``peer`` as its operator (with its control token): it may publish."""
    from difs_p2p.client import Client

    return Client(peer.address, token=peer.control_token, **kwargs)


# The console scripts of the Python running the tests (difs, difs-peer).
BIN = Path(sys.executable).parent


def start_peer_process(
    data: Path, *extra: str, stderr: int = subprocess.PIPE
) -> tuple[subprocess.Popen[str], str]:
    """A real ``difs-peer join`` process (data directory ``data``, more options in
    ``extra``), once it printed ``peer ready``; and the HOST:PORT it printed."""
    proc = subprocess.Popen(
        [str(BIN / "difs-peer"), "join", "--data", str(data), *extra],
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("peer ready"), line + (proc.stderr.read() if proc.stderr else "")
    return proc, dict(part.split("=", 1) for part in line.split()[2:])["address"]
