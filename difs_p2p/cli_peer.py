"""The ``difs-peer`` commands: run a storage peer (join), and ask a running one for its
status or to check its segments. The typer app that holds them is wired in cli.py."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from difs_p2p import errors, ops
from difs_p2p.cli_common import (
    JsonOpt,
    LogLevel,
    PeerOpt,
    TokenOpt,
    difs_home,
    entry_peer,
    fail,
    peer_status,
    resolve_token,
    run,
    setup_logging,
)
from difs_p2p.cli_output import check_lines, print_json, print_status
from difs_p2p.config import PeerConfig, RepairConfig, parse_hostport, parse_size
from difs_p2p.transfer import Connection


def join(
    bootstrap: Annotated[
        list[str] | None,
        typer.Option("--bootstrap", "-b", help="HOST:PORT of a peer to join through; repeatable"),
    ] = None,
    host: Annotated[str, typer.Option(help="IPv4 address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="UDP+TCP port (0 picks a free one)")] = 0,
    data: Annotated[
        Path | None, typer.Option(help="data directory (default: $DIFS_HOME/peer)")
    ] = None,
    capacity: Annotated[str, typer.Option(help="storage offered, e.g. 10GiB")] = "10GiB",
    repair_interval: Annotated[
        float, typer.Option(help="seconds between maintenance rounds (repair, GC, republish)")
    ] = 60.0,
    dead_after: Annotated[
        int, typer.Option(help="failed maintenance probes in a row before a holder is dead")
    ] = 3,
    resolve_every: Annotated[
        int,
        typer.Option(
            help="read each held name from the DHT one maintenance round in N (GC within N"
            " rounds); the rounds between only probe its holders"
        ),
    ] = 10,
    keep_versions: Annotated[
        int,
        typer.Option(help="versions of a name kept: older ones are collected once N newer exist"),
    ] = 3,
    retries: Annotated[
        int, typer.Option(help="bootstrap attempts before giving up (backoff 0.5 s, doubling)")
    ] = 5,
    limit_loopback: Annotated[
        bool,
        typer.Option(help="count 127.0.0.0/8 clients against the per-address TCP limit"),
    ] = True,
    orphan_grace: Annotated[
        float,
        typer.Option(
            help="seconds before what a failed publish left is collected: segments nothing"
            " keeps, idle uploads, ranges whose manifest never appeared"
        ),
    ] = 300.0,
    log_level: Annotated[LogLevel, typer.Option(help="how much to log on stderr")] = (
        LogLevel.warning
    ),
) -> None:
    """Start a peer: a new network without --bootstrap, else join through the given peers.

    Example: difs-peer join --bootstrap 127.0.0.1:4000 --data ./peer2 --capacity 5GiB
    """
    setup_logging(log_level.value)
    try:
        data_dir = data or difs_home() / "peer"
        if data_dir.exists() and not data_dir.is_dir():
            raise errors.StorageError(f"data directory {data_dir} is not a directory")
        config = PeerConfig(
            data_dir=data_dir,
            host=host,
            port=port,
            bootstrap=tuple(parse_hostport(b) for b in bootstrap or ()),
            capacity=parse_size(capacity),
            bootstrap_attempts=max(1, retries),
            repair=RepairConfig(
                interval=repair_interval,
                dead_after=dead_after,
                resolve_every=resolve_every,
                keep=keep_versions,
                orphan_grace=orphan_grace,
            ),
            tcp_limit_loopback=limit_loopback,
        )
    except errors.DifsError as exc:
        raise fail(exc) from None
    created = missing_ancestor(config.data_dir)
    started: list[bool] = []
    try:
        run(lambda: _run_peer(config, started))
    except typer.Exit as exc:
        # a peer that failed to start leaves no data directory it created behind
        if exc.exit_code != 0 and created is not None and not started:
            shutil.rmtree(created, ignore_errors=True)
        raise


def missing_ancestor(path: Path) -> Path | None:
    """The outermost directory of ``path`` that does not exist yet (None if it exists)."""
    missing = None
    for p in (path, *path.parents):
        if p.exists():
            break
        missing = p
    return missing


async def _run_peer(config: PeerConfig, started: list[bool]) -> None:
    from difs_p2p.peer import Peer

    peer = Peer(config)
    try:
        await peer.start()  # a signal meanwhile cancels the start (see run)
    except BaseException:
        await peer.stop()
        raise
    started.append(True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        status = peer.status()
        typer.echo(
            f"peer ready address={status['address']} id={status['node_id']} "
            f"contacts={status['routing_table']}",
        )
        sys.stdout.flush()
        await stop.wait()
    finally:
        await peer.stop()
        typer.echo("peer stopped", err=True)


def status(peer: PeerOpt = None, token_file: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a peer's view of the network: ID, address, contacts, storage, and whether it
    is part of the network (network: ok, thin or isolated, and its rejoin attempts).

    Example: difs-peer status --peer 127.0.0.1:4000
    """
    result = run(lambda: peer_status(peer, token_file), as_json)
    print_json(result) if as_json else print_status(result)


def check(
    repair: Annotated[
        bool, typer.Option("--repair", metavar="", help="quarantine damage and fetch good copies")
    ] = False,
    peer: PeerOpt = None,
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every segment a running peer stores against its hash, and report the
    orphaned segments (left by failed publishes) waiting to be collected.

    Example: difs-peer check --repair --peer 127.0.0.1:4000
    """
    result = run(lambda: _check(peer, repair, token_file), as_json)
    if as_json:
        print_json(result)
        return
    for line in check_lines(result):
        typer.echo(line)
    if result["corrupt"] and not repair:
        raise typer.Exit(5)


async def _check(peer: str | None, repair: bool, token_file: Path | None) -> dict[str, Any]:
    """The peer's ``check`` answer, as the JSON object it sent."""
    from difs_p2p.control import OperatorCredential

    address = await entry_peer(peer)
    token = resolve_token(peer, token_file, address)
    conn = await Connection.open(address, io_timeout=3600.0, credential=OperatorCredential(token))
    try:
        reply = await conn.request(ops.CheckRequest(repair))
        return ops.encode_reply("check", reply)
    finally:
        conn.close()
