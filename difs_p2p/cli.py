"""The command-line interface: ``difs-peer`` (run a storage peer) and ``difs`` (use one).

A thin typer layer over :mod:`difs_p2p.peer` and :mod:`difs_p2p.client`. Each error is one
line on stderr and its own exit code (``EXIT_CODES``); ``--json`` prints machine-readable
output on stdout.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from difs_p2p import errors
from difs_p2p.config import PeerConfig, format_size, parse_hostport, parse_size
from difs_p2p.repair import RepairConfig
from difs_p2p.transfer import Connection

T = TypeVar("T")

# Exit codes, most specific class first. 2 is also what typer uses for bad options.
EXIT_CODES: list[tuple[type[errors.DifsError], int]] = [
    (errors.BadNameError, 2),
    (errors.UsageError, 2),
    (errors.DeletedError, 4),
    (errors.NotFoundError, 3),
    (errors.IntegrityError, 5),
    (errors.AlreadyExistsError, 7),
    (errors.PermissionDeniedError, 6),
    (errors.CapacityError, 8),
    (errors.DifsTimeoutError, 10),
    (errors.NetworkError, 9),
    (errors.StorageError, 11),
    (errors.PeerError, 12),
]


def exit_code(exc: errors.DifsError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def difs_home() -> Path:
    """Where the CLI keeps its files: $DIFS_HOME, else ~/.difs."""
    return Path(os.environ.get("DIFS_HOME") or Path.home() / ".difs")


def _fail(exc: errors.DifsError) -> typer.Exit:
    typer.echo(f"error: {exc}", err=True)
    return typer.Exit(exit_code(exc))


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run an async command, turning our errors into one line and an exit code."""
    try:
        return asyncio.run(coro_fn())
    except errors.DifsError as exc:
        raise _fail(exc) from None


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # The library logs every lost reply at ERROR and values at INFO.
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def resolve_peer(peer: str | None) -> tuple[str, int]:
    """The peer to talk to: --peer, else $DIFS_PEER, else the local peer's address file."""
    text = peer or os.environ.get("DIFS_PEER")
    if text:
        return parse_hostport(text)
    address_file = difs_home() / "peer" / "address"
    try:
        return parse_hostport(address_file.read_text().strip())
    except OSError:
        raise errors.NetworkError(
            f"no local peer ({address_file} not found): start one with 'difs-peer join' "
            "or pass --peer HOST:PORT"
        ) from None


async def call_peer(address: tuple[str, int], op: str, **args: Any) -> dict[str, Any]:
    conn = await Connection.open(address, io_timeout=30.0)
    try:
        return await conn.call(op, **args)
    finally:
        conn.close()


def _print_json(obj: Any) -> None:
    typer.echo(json.dumps(obj, indent=2, sort_keys=True))


def _print_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    storage = status["storage"]
    console.print(f"[bold]peer[/] {status['node_id']}  {status['address']}")
    console.print(
        f"routing table: {status['routing_table']} contacts   records: {status['records']}"
        f"   holder entries: {status['entries']}"
    )
    console.print(
        f"storage: {format_size(storage['used'])} used of {format_size(storage['capacity'])}"
        f" ({storage['segments']} segments)"
    )
    table = Table("contact id", "address", title="closest contacts")
    for c in status["contacts"]:
        table.add_row(c["id"], c["address"])
    console.print(table)
    m = status.get("maintenance") or {}
    if m:
        console.print(
            f"holdings: {status.get('holdings', 0)}   maintenance rounds: {m['rounds']}   "
            f"repaired ranges: {m['repaired_ranges']} ({format_size(m['repair_bytes'])})   "
            f"trimmed: {m['trimmed_ranges']}   collected versions: {m['collected_versions']} "
            f"({format_size(m['freed_bytes'])})   healed segments: {m['healed_segments']}   "
            f"dead peers seen: {m['dead_peers']}"
        )


# -- difs-peer -----------------------------------------------------------------------------

peer_app = typer.Typer(
    help="Run a DIFS-P2P storage peer.", no_args_is_help=True, add_completion=False
)

PeerOpt = Annotated[
    str | None,
    typer.Option("--peer", help="HOST:PORT of the peer (default: $DIFS_PEER or the local peer)"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


@peer_app.command()
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
    retries: Annotated[
        int, typer.Option(help="bootstrap attempts before giving up (backoff 0.5 s, doubling)")
    ] = 5,
    orphan_grace: Annotated[
        float,
        typer.Option(
            help="seconds before what a failed publish left is collected: segments nothing"
            " keeps, idle uploads, ranges whose manifest never appeared"
        ),
    ] = 300.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error")] = "warning",
) -> None:
    """Start a peer: a new network without --bootstrap, else join through the given peers.

    Example: difs-peer join --bootstrap 127.0.0.1:4000 --data ./peer2 --capacity 5GiB
    """
    _setup_logging(log_level)
    try:
        config = PeerConfig(
            data_dir=data or difs_home() / "peer",
            host=host,
            port=port,
            bootstrap=tuple(parse_hostport(b) for b in bootstrap or ()),
            capacity=parse_size(capacity),
            bootstrap_attempts=max(1, retries),
            repair=RepairConfig(
                interval=repair_interval,
                dead_after=dead_after,
                resolve_every=resolve_every,
                orphan_grace=orphan_grace,
            ),
        )
    except errors.DifsError as exc:
        raise _fail(exc) from None
    run(lambda: _run_peer(config))


async def _run_peer(config: PeerConfig) -> None:
    from difs_p2p.peer import Peer

    peer = Peer(config)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await peer.start()
    except BaseException:
        await peer.stop()
        raise
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


@peer_app.command()
def status(peer: PeerOpt = None, as_json: JsonOpt = False) -> None:
    """Show a peer's view of the network: ID, address, contacts, storage.

    Example: difs-peer status --peer 127.0.0.1:4000
    """
    result = run(lambda: _status(peer))
    _print_json(result) if as_json else _print_status(result)


async def _status(peer: str | None) -> dict[str, Any]:
    return await call_peer(resolve_peer(peer), "status")


@peer_app.command()
def check(
    repair: Annotated[
        bool, typer.Option("--repair", help="quarantine damage and fetch good copies")
    ] = False,
    peer: PeerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Verify every segment a running peer stores against its hash, and report the
    orphaned segments (left by failed publishes) waiting to be collected.

    Example: difs-peer check --repair --peer 127.0.0.1:4000
    """
    result = run(lambda: _check(peer, repair))
    if as_json:
        _print_json(result)
        return
    typer.echo(
        f"checked {result['checked']} segments: {result['ok']} ok, "
        f"{len(result['corrupt'])} corrupt, {len(result['missing'])} missing, "
        f"{result['healed']} healed"
    )
    orphans, uploading = result.get("orphans"), result.get("uploading")
    if isinstance(orphans, dict) and isinstance(uploading, dict):
        typer.echo(
            f"{orphans['segments']} orphaned segments ({format_size(orphans['bytes'])}) to be "
            f"collected within {result.get('orphan_grace', '?')} s; "
            f"{uploading['segments']} segments ({format_size(uploading['bytes'])}) of uploads "
            "in progress"
        )
    if result["corrupt"] and not repair:
        raise typer.Exit(5)


async def _check(peer: str | None, repair: bool) -> dict[str, Any]:
    address = resolve_peer(peer)
    conn = await Connection.open(address, io_timeout=3600.0)
    try:
        return await conn.call("check", repair=repair)
    finally:
        conn.close()


# -- difs ----------------------------------------------------------------------------------

client_app = typer.Typer(
    help="Publish, fetch, delete and version content by name on a DIFS-P2P network.",
    no_args_is_help=True,
    add_completion=False,
)


@client_app.command()
def peers(peer: PeerOpt = None, as_json: JsonOpt = False) -> None:
    """Show the network as a peer sees it (same as difs-peer status).

    Example: difs peers --peer 127.0.0.1:4000
    """
    result = run(lambda: _status(peer))
    _print_json(result) if as_json else _print_status(result)


def _publisher(key_file: Path | None) -> Any:
    from difs_p2p.identity import load_or_create

    return load_or_create(key_file or difs_home() / "publisher.key")


TrustOpt = Annotated[
    str | None,
    typer.Option("--trust", help="pin this publisher key (64 hex) for the name, then use it"),
]


def _pins(name: str, trust: str | None) -> Any:
    """The client's pin file, with ``trust`` pinned for ``name`` first."""
    from difs_p2p.pins import Pins, parse_key

    pins = Pins(difs_home() / "pins.json")
    if trust is not None:
        pins.pin(name, parse_key(trust))
    return pins


KeyOpt = Annotated[
    Path | None,
    typer.Option("--key", help="publisher key file (default: $DIFS_HOME/publisher.key)"),
]


def _progress_bar(total: int, label: str) -> Any:
    """A rich progress bar on stderr when it is a terminal, else None."""
    if not sys.stderr.isatty():
        return None
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    progress = Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )
    task = progress.add_task(label, total=total)
    return progress, task


def _parse_range(text: str | None) -> tuple[int, int] | None:
    if text is None:
        return None
    start, sep, end = text.partition("-")
    if not sep or not start.isdigit() or not end.isdigit() or int(end) < int(start):
        raise errors.UsageError(f"bad range {text!r}: expected START-END, e.g. 0-1023")
    return int(start), int(end)


@client_app.command()
def put(
    file: Annotated[Path, typer.Argument(help="the file to publish")],
    name: Annotated[str, typer.Argument(help="content name, e.g. /a.com/izone.mp4")],
    segment_size: Annotated[str, typer.Option(help="segment size, e.g. 1MiB")] = "1MiB",
    replicas: Annotated[int, typer.Option(help="copies of every segment range")] = 3,
    update: Annotated[bool, typer.Option("--update", help="publish a new version")] = False,
    delegation: Annotated[
        Path | None,
        typer.Option(help="delegation file from the name's owner (difs delegate)"),
    ] = None,
    peer: PeerOpt = None,
    key: KeyOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish FILE under NAME: segments go to storage peers, the signed manifest to the DHT.

    Example: difs put izone.mp4 /a.com/izone.mp4 --replicas 3
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        seg = parse_size(segment_size)
        cert = _load_delegation(delegation) if delegation is not None else None
        size = file.stat().st_size if file.exists() else 0
        bar = _progress_bar(size, "publishing")
        async with Client(
            resolve_peer(peer), publisher=_publisher(key), pins=_pins(name, None)
        ) as client:
            if bar is None:
                return await client.put(
                    file, name, segment_size=seg, replicas=replicas, update=update, delegation=cert
                )
            progress, task = bar
            with progress:
                return await client.put(
                    file,
                    name,
                    segment_size=seg,
                    replicas=replicas,
                    update=update,
                    delegation=cert,
                    progress=lambda n: progress.advance(task, n),
                )

    result = run(go)
    m = result.manifest
    summary = {
        "name": m.name,
        "version": m.version,
        "size": m.size,
        "segments": m.segment_count,
        "key": m.key.hex(),
        "manifest": m.hash,
        "accepted_by": result.accepted,
        "ranges": result.ranges,
        "seconds": round(result.seconds, 3),
        "mb_per_s": round(m.size / result.seconds / 1e6, 1) if result.seconds else 0,
        "warnings": result.warnings,
    }
    if as_json:
        _print_json(summary)
        return
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    holders = {h for r in result.ranges for h in r["holders"]}
    typer.echo(
        f"published {m.name} version {m.version}: {format_size(m.size)} in "
        f"{m.segment_count} segments, {len(result.ranges)} ranges on {len(holders)} peers, "
        f"{summary['mb_per_s']} MB/s"
    )


@client_app.command()
def get(
    name: Annotated[str, typer.Argument(help="content name")],
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="file to write, '-' for stdout")
    ] = None,
    version: Annotated[int | None, typer.Option(help="fetch this older version")] = None,
    byte_range: Annotated[
        str | None, typer.Option("--range", help="inclusive byte range START-END")
    ] = None,
    peer: PeerOpt = None,
    trust: TrustOpt = None,
    sync: Annotated[
        bool, typer.Option("--sync", help="fsync the output file before exiting")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch NAME from its holders, verifying every byte (default output: the last component).

    Example: difs get /a.com/izone.mp4 -o izone.mp4
    """
    from difs_p2p.client import Client
    from difs_p2p.names import name_components

    async def go() -> Any:
        rng = _parse_range(byte_range)
        target: Any = (
            sys.stdout.buffer if output == "-" else Path(output or name_components(name)[-1])
        )
        async with Client(resolve_peer(peer), pins=_pins(name, trust)) as client:
            bar = _progress_bar(0, "fetching") if output != "-" else None
            if bar is None:
                return await client.get(name, target, version=version, byte_range=rng, sync=sync)
            progress, task = bar
            with progress:
                return await client.get(
                    name,
                    target,
                    version=version,
                    byte_range=rng,
                    progress=lambda n: progress.advance(task, n),
                    on_size=lambda n: progress.update(task, total=n),
                    sync=sync,
                )

    result = run(go)
    summary = {
        "name": result.manifest.name,
        "version": result.manifest.version,
        "bytes": result.bytes,
        "seconds": round(result.seconds, 3),
        "first_byte_ms": round(result.first_byte * 1000, 1),
        "resolve_ms": round(result.resolve * 1000, 1),
        "sources": result.sources,
        "retries": result.retries,
        "mb_per_s": round(result.bytes / result.seconds / 1e6, 1) if result.seconds else 0,
    }
    if as_json:
        _print_json(summary)
    elif output != "-":
        typer.echo(
            f"fetched {summary['name']} version {summary['version']}: "
            f"{format_size(result.bytes)} from {result.sources} peers, {summary['mb_per_s']} MB/s",
            err=True,
        )


@client_app.command()
def rm(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    key: KeyOpt = None,
) -> None:
    """Delete NAME: publish a signed tombstone; holders free its segments.

    Example: difs rm /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        async with Client(
            resolve_peer(peer), publisher=_publisher(key), pins=_pins(name, None)
        ) as client:
            return await client.rm(name)

    tombstone = run(go)
    typer.echo(f"deleted {tombstone.name} (tombstone version {tombstone.version})")


@client_app.command()
def stat(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    trust: TrustOpt = None,
) -> None:
    """Show NAME's manifest as JSON: info, storages per range and which answer now.

    Example: difs stat /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        async with Client(resolve_peer(peer), pins=_pins(name, trust)) as client:
            return await client.stat(name)

    _print_json(run(go))


@client_app.command()
def versions(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List NAME's versions, oldest first.

    Example: difs versions /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        async with Client(resolve_peer(peer), pins=_pins(name, None)) as client:
            return await client.versions(name)

    history = run(go)
    rows = [
        {
            "version": m.version,
            "size": m.size,
            "deleted": m.deleted,
            "created": m.created,
            "manifest": m.hash,
            "parent": m.parent,
        }
        for m in history
    ]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        state = "deleted" if r["deleted"] else format_size(r["size"])
        typer.echo(f"v{r['version']}  {state:>12}  {r['manifest'][:16]}")


def _load_delegation(path: Path) -> Any:
    from difs_p2p.manifest import parse_delegation

    try:
        return parse_delegation(json.loads(path.read_text()))
    except (OSError, ValueError) as exc:
        raise errors.UsageError(f"cannot read delegation {path}: {exc}") from None


@client_app.command()
def delegate(
    prefix: Annotated[str, typer.Argument(help="name prefix to delegate, e.g. /a.com/blog")],
    writer: Annotated[str, typer.Argument(help="the writer's public key (64 hex)")],
    days: Annotated[float, typer.Option(help="validity in days")] = 30.0,
    key: KeyOpt = None,
) -> None:
    """As a name owner, let WRITER publish names under PREFIX; prints the delegation JSON.

    Example: difs delegate /a.com/blog 3b6a27...29 > blog.delegation
    """
    import time

    from difs_p2p.manifest import build_delegation
    from difs_p2p.pins import parse_key

    try:
        cert = build_delegation(
            _publisher(key),
            prefix=prefix,
            writer=parse_key(writer),
            expires=time.time() + days * 86400,
        )
    except errors.DifsError as exc:
        raise _fail(exc) from None
    _print_json(cert.as_json())


@client_app.command()
def revoke(
    prefix: Annotated[str, typer.Argument(help="the delegated prefix")],
    writer: Annotated[str, typer.Argument(help="the writer's public key (64 hex)")],
    peer: PeerOpt = None,
    key: KeyOpt = None,
) -> None:
    """As a name owner, revoke WRITER's delegation for PREFIX (readers refuse its versions).

    Example: difs revoke /a.com/blog 3b6a27...29
    """
    from difs_p2p.client import Client
    from difs_p2p.pins import parse_key

    async def go() -> Any:
        async with Client(resolve_peer(peer), publisher=_publisher(key)) as client:
            return await client.revoke(prefix, parse_key(writer))

    listing = run(go)
    typer.echo(f"revoked {writer[:16]}... under {prefix} ({listing.name} v{listing.version})")


@client_app.command()
def whoami(key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show the publisher key, its fingerprint and its self-certifying namespace.

    Example: difs whoami
    """
    try:
        me = _publisher(key)
    except errors.DifsError as exc:
        raise _fail(exc) from None
    info = {
        "public_key": me.public_key.hex(),
        "fingerprint": me.fingerprint,
        "namespace": f"/key/{me.fingerprint}/",
    }
    if as_json:
        _print_json(info)
        return
    for k, v in info.items():
        typer.echo(f"{k}: {v}")


def peer_main() -> None:
    with contextlib.suppress(BrokenPipeError):
        peer_app()


def client_main() -> None:
    with contextlib.suppress(BrokenPipeError):
        client_app()
