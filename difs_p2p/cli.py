"""The command-line interface: ``difs-peer`` (run a storage peer) and ``difs`` (use one).

A thin typer layer over :mod:`difs_p2p.peer` and :mod:`difs_p2p.client`. Each error is one
line on stderr and its own exit code (``EXIT_CODES``); ``--json`` prints machine-readable
output on stdout (on stderr when stdout carries the fetched data), and errors as one JSON
object on stderr. SIGINT and SIGTERM cancel a command cleanly (exit 130 and 143).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import typer

from difs_p2p import errors, wire
from difs_p2p.config import PeerConfig, RepairConfig, format_size, parse_hostport, parse_size
from difs_p2p.transfer import Connection

if TYPE_CHECKING:
    from difs_p2p.identity import Identity
    from difs_p2p.pins import Pins

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


# The short name of each exit code: the "code" of a --json error object.
EXIT_NAMES: dict[int, str] = {
    1: "unexpected",
    2: "usage",
    3: "not_found",
    4: "deleted",
    5: "integrity",
    6: "permission_denied",
    7: "already_exists",
    8: "no_space",
    9: "network",
    10: "timeout",
    11: "local_storage",
    12: "peer_misbehaved",
    130: "interrupted",
    143: "terminated",
}
# How long a peer may take to answer the HELLO that opens each command: a DIFS peer
# answers at once; anything else listening on the port is not one.
HELLO_TIMEOUT = 3.0
# Help on -h as well as --help, for every command.
CONTEXT = {"help_option_names": ["-h", "--help"]}


def exit_code(exc: errors.DifsError) -> int:
    for cls, code in EXIT_CODES:
        if isinstance(exc, cls):
            return code
    return 1


def difs_home() -> Path:
    """Where the CLI keeps its files: $DIFS_HOME, else ~/.difs."""
    return Path(os.environ.get("DIFS_HOME") or Path.home() / ".difs")


def _report_error(message: str, code: int, as_json: bool) -> None:
    """One line on stderr: plain text, or with ``as_json`` a JSON object."""
    if as_json:
        obj = {"error": message, "code": EXIT_NAMES.get(code, "unexpected"), "exit": code}
        typer.echo(json.dumps(obj, sort_keys=True), err=True)
    else:
        typer.echo(f"error: {message}", err=True)


def _fail(exc: errors.DifsError, as_json: bool = False) -> typer.Exit:
    code = exit_code(exc)
    _report_error(str(exc), code, as_json)
    return typer.Exit(code)


class _Interrupted(Exception):
    """The command was cancelled by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _cancellable(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``coro_fn()``; SIGINT or SIGTERM cancel it, so that its cleanup runs (a get
    removes its temporary file) before the process exits."""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    received: list[int] = []

    def on_signal(signum: int) -> None:
        received.append(signum)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        return await coro_fn()
    except asyncio.CancelledError:
        if received:
            raise _Interrupted(received[0]) from None
        raise
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)


def run(coro_fn: Callable[[], Coroutine[Any, Any, T]], as_json: bool = False) -> T:
    """Run an async command, turning our errors into one line and an exit code."""
    try:
        return asyncio.run(_cancellable(coro_fn))
    except errors.DifsError as exc:
        raise _fail(exc, as_json) from None
    except _Interrupted as exc:
        code = 128 + exc.signum
        _report_error(f"interrupted ({exc})", code, as_json)
        raise typer.Exit(code) from None


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


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


def resolve_token(peer: str | None, token_file: Path | None, address: tuple[str, int]) -> bytes:
    """The control token for ``address``: --token-file, else $DIFS_TOKEN_FILE, else the
    local peer's ($DIFS_HOME/peer/control.token) when ``address`` is the local peer's."""
    from difs_p2p.control import read_token_file

    text = str(token_file) if token_file else os.environ.get("DIFS_TOKEN_FILE")
    local = difs_home() / "peer"
    path: Path | None = None
    if text:
        path = Path(text)
    elif not (peer or os.environ.get("DIFS_PEER")) or _local_address(local) == address:
        path = local / "control.token"
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            return read_token_file(path)
    missing = f" ({path} not found)" if path is not None else ""
    raise errors.PermissionDeniedError(
        f"permission denied: this needs the control token of the peer at {address[0]}:"
        f"{address[1]} (its DATA/control.token){missing}; pass --token-file PATH or set "
        "DIFS_TOKEN_FILE"
    )


def _local_address(data: Path) -> tuple[str, int] | None:
    try:
        return parse_hostport((data / "address").read_text().strip())
    except (OSError, errors.UsageError):
        return None


TokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="the peer's control token (default: $DIFS_TOKEN_FILE, else the local peer's)",
    ),
]


async def check_peer(address: tuple[str, int]) -> None:
    """NetworkError unless a DIFS peer listens at ``address``: it must answer a HELLO
    within HELLO_TIMEOUT (anything else on the port fails here, not after a 30 s stall)."""
    where = f"{address[0]}:{address[1]}"
    conn = await Connection.open(address, io_timeout=HELLO_TIMEOUT, connect_timeout=HELLO_TIMEOUT)
    try:
        await conn.send(wire.Hello(request_id=0, peer=None))
        frame = await conn.read_frame()
    except errors.DifsTimeoutError:
        raise errors.NetworkError(
            f"{where} is not a DIFS peer (or it is stalled): no answer to HELLO within "
            f"{HELLO_TIMEOUT:g} s"
        ) from None
    except (errors.DifsError, OSError) as exc:
        raise errors.NetworkError(f"{where} is not a DIFS peer: {exc}") from None
    finally:
        conn.close()
    if not isinstance(frame, wire.Hello):
        got = "closed the connection" if frame is None else f"sent {type(frame).__name__}"
        raise errors.NetworkError(f"{where} is not a DIFS peer: it {got} in reply to HELLO")


async def entry_peer(peer: str | None) -> tuple[str, int]:
    """The peer to talk to (``resolve_peer``), checked to be a DIFS peer."""
    address = resolve_peer(peer)
    await check_peer(address)
    return address


async def call_peer(
    address: tuple[str, int], op: str, *, token: bytes | None = None, **args: Any
) -> dict[str, Any]:
    from difs_p2p.control import OperatorCredential

    await check_peer(address)
    credential = OperatorCredential(token) if token is not None else None
    conn = await Connection.open(address, io_timeout=30.0, credential=credential)
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
            f"collected versions: {m['collected_versions']} "
            f"({format_size(m['freed_bytes'])})   healed segments: {m['healed_segments']}   "
            f"dead peers seen: {m['dead_peers']}"
        )


# -- difs-peer -----------------------------------------------------------------------------


def _show_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"difs-p2p {version('difs-p2p')}")
        raise typer.Exit()


VersionOpt = Annotated[
    bool,
    typer.Option(
        "--version",
        callback=_show_version,
        is_eager=True,
        metavar="",
        help="print the version and exit",
    ),
]

peer_app = typer.Typer(
    help="Run a DIFS-P2P storage peer.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)


@peer_app.callback()
def _peer_options(show_version: VersionOpt = False) -> None:
    """Run a DIFS-P2P storage peer."""


PeerOpt = Annotated[
    str | None,
    typer.Option("--peer", help="HOST:PORT of the peer (default: $DIFS_PEER or the local peer)"),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", metavar="", help="print JSON for scripts (errors too)")
]


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
    _setup_logging(log_level.value)
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
        raise _fail(exc) from None
    created = _missing_ancestor(config.data_dir)
    started: list[bool] = []
    try:
        run(lambda: _run_peer(config, started))
    except typer.Exit as exc:
        # a peer that failed to start leaves no data directory it created behind
        if exc.exit_code != 0 and created is not None and not started:
            shutil.rmtree(created, ignore_errors=True)
        raise


def _missing_ancestor(path: Path) -> Path | None:
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


@peer_app.command()
def status(peer: PeerOpt = None, token_file: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show a peer's view of the network: ID, address, contacts, storage.

    Example: difs-peer status --peer 127.0.0.1:4000
    """
    result = run(lambda: _status(peer, token_file), as_json)
    _print_json(result) if as_json else _print_status(result)


async def _status(peer: str | None, token_file: Path | None) -> dict[str, Any]:
    address = resolve_peer(peer)
    return await call_peer(address, "status", token=resolve_token(peer, token_file, address))


@peer_app.command()
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


async def _check(peer: str | None, repair: bool, token_file: Path | None) -> dict[str, Any]:
    from difs_p2p.control import OperatorCredential

    address = await entry_peer(peer)
    token = resolve_token(peer, token_file, address)
    conn = await Connection.open(address, io_timeout=3600.0, credential=OperatorCredential(token))
    try:
        return await conn.call("check", repair=repair)
    finally:
        conn.close()


# -- difs ----------------------------------------------------------------------------------

client_app = typer.Typer(
    help="Publish, fetch, delete and version content by name on a DIFS-P2P network.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)


@client_app.callback()
def _client_options(show_version: VersionOpt = False) -> None:
    """Publish, fetch, delete and version content by name on a DIFS-P2P network."""


@client_app.command()
def peers(peer: PeerOpt = None, token_file: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show the network as a peer sees it (same as difs-peer status).

    Example: difs peers --peer 127.0.0.1:4000
    """
    result = run(lambda: _status(peer, token_file), as_json)
    _print_json(result) if as_json else _print_status(result)


def default_key_file() -> Path:
    return difs_home() / "publisher.key"


def _publisher(key_file: Path | None) -> Identity:
    """The publisher key: --key FILE, which must exist (``difs key new`` creates one), else
    the default key in $DIFS_HOME, created on first use."""
    from difs_p2p.identity import load_or_create

    if key_file is None:
        return load_or_create(default_key_file())
    return _read_key(key_file)


def _read_key(path: Path) -> Identity:
    """The identity in the key file ``path``; UsageError when there is none."""
    from difs_p2p.identity import load_or_create

    if path.is_dir():
        raise errors.UsageError(f"key file {path} is a directory")
    if not path.exists():
        raise errors.UsageError(
            f"key file {path} does not exist (create one with 'difs key new {path}')"
        )
    return load_or_create(path)  # exists: only read


TrustOpt = Annotated[
    str | None,
    typer.Option(
        "--trust", help="use this publisher key (64 hex) for the name; pinned once it succeeds"
    ),
]


def _pins(name: str, trust: str | None) -> tuple[Pins, Callable[[], None]]:
    """The pins to check ``name`` against, and what to call once the command succeeded:
    with ``trust``, the key is used for this command and pinned only then (a typo or a
    failed fetch pins nothing)."""
    from difs_p2p.names import normalize_name
    from difs_p2p.pins import Pins, parse_key

    pins = Pins(difs_home() / "pins.json")
    if trust is None:
        return pins, lambda: None
    key = parse_key(trust)
    # An in-memory copy (never saved): names first seen by this command, such as a
    # revocation list, are pinned again on their next use.
    trial = Pins(None)
    trial.pins = {**pins.pins, normalize_name(name): key}
    return trial, lambda: pins.pin(name, key)


KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="publisher key file, which must exist (default: $DIFS_HOME/publisher.key,"
        " created on first use)",
    ),
]


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _rate(nbytes: int, seconds: float) -> str:
    """A transfer rate in the bars' binary units."""
    return f"{format_size(nbytes / seconds)}/s" if seconds > 0 else "-"


class _Bars:
    """Progress bars on stderr when it is a terminal (else nothing): one task per phase,
    sizes and rates in binary units (KiB, MiB), as the summaries."""

    def __init__(self) -> None:
        self.progress: Any = None
        self.task: Any = None
        if not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            Task,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Amount(ProgressColumn):
            """Bytes done of the total for a transfer; the time taken for other phases."""

            sizes = DownloadColumn(binary_units=True)

            def render(self, task: Task) -> Text:
                if task.fields.get("transfer"):
                    return self.sizes.render(task)
                elapsed = task.finished_time if task.finished else task.elapsed
                return Text(f"{elapsed or 0:.1f} s", style="progress.elapsed")

        class Speed(ProgressColumn):
            """The recent rate while running; once the command is done, the rate its
            summary reports (``settle``)."""

            def render(self, task: Task) -> Text:
                speed = task.fields.get("rate") or task.speed
                shown = f"{format_size(speed)}/s" if speed and task.fields.get("transfer") else ""
                return Text(shown, style="progress.data.speed")

        class Remaining(TimeRemainingColumn):
            def render(self, task: Task) -> Text:
                return super().render(task) if task.fields.get("transfer") else Text("")

        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            Amount(),
            Speed(),
            Remaining(),
            console=Console(stderr=True),
        )

    def __enter__(self) -> _Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self._finish()
            self.progress.stop()

    def phase(self, label: str, total: int | None, transfer: bool = True) -> None:
        """Finish the current bar and start one for ``label``: a transfer of ``total``
        bytes (None: unknown), or a phase without bytes (``transfer`` false)."""
        if self.progress is None:
            return
        self._finish()
        self.task = self.progress.add_task(label, total=total, transfer=transfer)

    def _finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            done = task.completed if task.fields.get("transfer") else 1
            self.progress.update(self.task, total=done, completed=done)
            self.progress.stop_task(self.task)
            self.task = None

    def settle(self, index: int, nbytes: int, seconds: float) -> None:
        """Show on the ``index``-th bar the rate the summary reports: ``nbytes`` in
        ``seconds`` as the client measured them."""
        if self.progress is not None and seconds > 0 and index < len(self.progress.tasks):
            self.progress.update(self.progress.task_ids[index], rate=nbytes / seconds)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)


def _parse_range(text: str | None) -> Any:
    from difs_p2p.ranges import parse_range

    return None if text is None else parse_range(text)


@client_app.command()
def put(
    file: Annotated[str, typer.Argument(help="the file to publish, or - for stdin")],
    name: Annotated[str, typer.Argument(help="content name, e.g. /a.com/izone.mp4")],
    segment_size: Annotated[
        str, typer.Option(help="segment size: a multiple of 4KiB from 4KiB to 16MiB")
    ] = "1MiB",
    replicas: Annotated[
        int, typer.Option(min=1, max=16, help="copies of every segment range (1-16)")
    ] = 3,
    update: Annotated[
        bool, typer.Option("--update", metavar="", help="publish a new version")
    ] = False,
    delegation: Annotated[
        Path | None,
        typer.Option(help="delegation file from the name's owner (difs delegate)"),
    ] = None,
    peer: PeerOpt = None,
    key: KeyOpt = None,
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish FILE under NAME: segments go to storage peers, the signed manifest to the DHT.

    FILE may be - (stdin) or any pipe: it is read once, segment by segment.

    Example: tar c photos | difs put - /backups/photos.tar --replicas 3
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        seg = _segment_size(segment_size)
        cert = _load_delegation(delegation) if delegation is not None else None
        if file == "-" and sys.stdin.isatty():
            raise errors.UsageError("put - reads the content from stdin: pipe it in")
        source: Any = sys.stdin.buffer if file == "-" else Path(file)
        publisher = _publisher(key)
        pins, _ = _pins(name, None)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, pins=pins, token=token) as client:
            with _Bars() as bars:

                def on_phase(phase: str) -> None:
                    if phase == "upload":
                        size = source.stat().st_size if isinstance(source, Path) else None
                        bars.phase("uploading", size if size else None)
                    elif phase == "place":
                        bars.phase(f"placing {_plural(replicas, 'replica')}", None, False)
                    else:
                        bars.phase("publishing the manifest", None, False)

                result = await client.put(
                    source,
                    name,
                    segment_size=seg,
                    replicas=replicas,
                    update=update,
                    delegation=cert,
                    progress=bars.advance,
                    on_phase=on_phase,
                )
                bars.settle(0, result.manifest.size, result.upload_seconds)
                return result

    result = run(go, as_json)
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
        "upload_seconds": round(result.upload_seconds, 3),
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
        f"{_plural(m.segment_count, 'segment')}, {_plural(len(result.ranges), 'range')} on "
        f"{_plural(len(holders), 'peer')}; uploaded in {result.upload_seconds:.2f} s "
        f"({_rate(m.size, result.upload_seconds)}), placed and published in "
        f"{result.seconds - result.upload_seconds:.2f} s"
    )


def _segment_size(text: str) -> int:
    """--segment-size: a size that is a valid segment size, with a hint for decimal units."""
    from difs_p2p.segments import validate_segment_size

    n = parse_size(text)
    try:
        return validate_segment_size(n)
    except errors.UsageError as exc:
        if n % 4096 and n % 1000 == 0:
            raise errors.UsageError(
                f"{exc} ({text} is {n:,} bytes: decimal units are powers of 1000; "
                "did you mean KiB or MiB?)"
            ) from None
        raise


@client_app.command()
def get(
    name: Annotated[str, typer.Argument(help="content name")],
    output: Annotated[
        str | None, typer.Option("-o", "--output", help="file to write, '-' for stdout")
    ] = None,
    version: Annotated[int | None, typer.Option(min=1, help="fetch this older version")] = None,
    byte_range: Annotated[
        str | None,
        typer.Option(
            "--range",
            help="bytes to fetch, HTTP style: START-END (inclusive), START- or -N (last N)",
        ),
    ] = None,
    peer: PeerOpt = None,
    trust: TrustOpt = None,
    sync: Annotated[
        bool, typer.Option("--sync", metavar="", help="fsync the output file before exiting")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch NAME from its holders, verifying every byte (default output: the last component).

    The output file is replaced only once every byte is verified: a failed or interrupted
    fetch leaves it as it was. With -o - the data goes to stdout and summaries to stderr.

    Example: difs get /a.com/izone.mp4 -o izone.mp4
    """
    from difs_p2p.client import Client
    from difs_p2p.names import name_components

    to_stdout = output == "-"

    async def go() -> Any:
        rng = _parse_range(byte_range)
        target: Any = sys.stdout.buffer if to_stdout else Path(output or name_components(name)[-1])
        pins, pin_trusted = _pins(name, trust)
        async with Client(await entry_peer(peer), pins=pins) as client:
            with _Bars() as bars:
                result = await client.get(
                    name,
                    target,
                    version=version,
                    byte_range=rng,
                    progress=bars.advance,
                    on_size=lambda n: bars.phase("fetching", n),
                    sync=sync,
                )
                bars.settle(0, result.bytes, result.seconds - result.resolve)
        pin_trusted()
        return result

    result = run(go, as_json)
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
        # stdout carries the data with -o -
        typer.echo(json.dumps(summary, indent=2, sort_keys=True), err=to_stdout)
    elif not to_stdout:
        typer.echo(
            f"fetched {summary['name']} version {summary['version']}: "
            f"{format_size(result.bytes)} from {_plural(result.sources, 'peer')} in "
            f"{result.seconds:.2f} s: {result.resolve * 1000:.0f} ms to resolve the name, then "
            f"{_rate(result.bytes, result.seconds - result.resolve)}",
            err=True,
        )


@client_app.command()
def rm(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    key: KeyOpt = None,
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete NAME: publish a signed tombstone; holders free its segments.

    Example: difs rm /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        publisher = _publisher(key)
        pins, _ = _pins(name, None)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, pins=pins, token=token) as client:
            return await client.rm(name)

    tombstone = run(go, as_json)
    if as_json:
        _print_json({"name": tombstone.name, "version": tombstone.version, "deleted": True})
        return
    typer.echo(f"deleted {tombstone.name} (tombstone version {tombstone.version})")


@client_app.command()
def stat(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    trust: TrustOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show NAME's manifest, the holders of each range and which of them answer now.

    --json prints it in the seed's shape: info, storages, ranges, versions.

    Example: difs stat /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        pins, pin_trusted = _pins(name, trust)
        async with Client(await entry_peer(peer), pins=pins) as client:
            result = await client.stat(name)
        pin_trusted()
        return result

    result = run(go, as_json)
    _print_json(result) if as_json else _print_stat(result)


def _when(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


def _print_stat(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = result["info"]
    state = "deleted" if info.get("deleted") else format_size(info["size"])
    console.print(f"[bold]{info['name']}[/] version {info['version']}  {state}")
    console.print(f"created:   {_when(info['created'])}")
    console.print(
        f"segments:  {info['segment_count']} of {format_size(info['segment_size'])}, "
        f"{_plural(info['stripes'], 'range')}, {_plural(info['replicas'], 'replica')} asked"
    )
    console.print(f"owner:     {info['owner']}")
    if info["publisher"] != info["owner"]:
        console.print(f"publisher: {info['publisher']} (delegate)")
    console.print(f"manifest:  {info['hash_of_manifest']}")
    console.print(f"versions:  {', '.join(str(v) for v in result['versions'])}")
    ranges = Table("segments", "holders", "answering", title="ranges")
    for r in result["ranges"]:
        ranges.add_row(f"{r['start']}-{r['end']}", str(r["holders"]), str(r["live"]))
    console.print(ranges)
    holders = Table("storage", "address", "segments", "answers", title="holders")
    for h in result["storages"]:
        seg = h["segment"]
        holders.add_row(
            h["storage"][:16],
            h["address"],
            f"{seg['start']}-{seg['end']}",
            "yes" if h["live"] else "no",
        )
    console.print(holders)


@client_app.command()
def versions(
    name: Annotated[str, typer.Argument(help="content name")],
    peer: PeerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List NAME's versions, oldest first, with their dates and whether each is still retrievable.

    Peers keep the newest versions (3 by default, `difs-peer join --keep-versions`) and
    collect older ones.

    Example: difs versions /a.com/izone.mp4
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        pins, _ = _pins(name, None)
        async with Client(await entry_peer(peer), pins=pins) as client:
            return await client.version_status(name)

    history = run(go, as_json)
    rows = [
        {
            "version": m.version,
            "size": m.size,
            "deleted": m.deleted,
            "created": m.created,
            "manifest": m.hash,
            "parent": m.parent,
            "retrievable": ok,
        }
        for m, ok in history
    ]
    if as_json:
        _print_json(rows)
        return
    for r in rows:
        state = "deleted" if r["deleted"] else format_size(r["size"])
        kept = "retrievable" if r["retrievable"] else "collected"
        typer.echo(
            f"v{r['version']}  {_when(r['created'])}  {state:>12}  {kept:<11}  {r['manifest'][:16]}"
        )


def _load_delegation(path: Path) -> Any:
    from difs_p2p.manifest import parse_delegation

    try:
        return parse_delegation(json.loads(path.read_text()))
    except (OSError, ValueError, errors.WireError, errors.IntegrityError) as exc:
        raise errors.UsageError(f"cannot read delegation {path}: {exc}") from None


@client_app.command()
def delegate(
    prefix: Annotated[str, typer.Argument(help="name prefix to delegate, e.g. /a.com/blog")],
    writer: Annotated[str, typer.Argument(help="the writer's public key (64 hex)")],
    days: Annotated[float, typer.Option(help="validity in days (more than 0)")] = 30.0,
    key: KeyOpt = None,
) -> None:
    """As a name owner, let WRITER publish names under PREFIX; prints the delegation JSON.

    Example: difs delegate /a.com/blog 3b6a27...29 > blog.delegation
    """
    from difs_p2p.manifest import build_delegation
    from difs_p2p.pins import parse_key

    try:
        if not days > 0 or days == float("inf"):
            raise errors.UsageError(f"--days must be more than 0, not {days:g}")
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
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """As a name owner, revoke WRITER's delegation for PREFIX (readers refuse its versions).

    Example: difs revoke /a.com/blog 3b6a27...29
    """
    from difs_p2p.client import Client
    from difs_p2p.pins import parse_key

    async def go() -> Any:
        writer_key = parse_key(writer)
        publisher = _publisher(key)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, token=token) as client:
            return await client.revoke(prefix, writer_key)

    listing = run(go, as_json)
    if as_json:
        _print_json(
            {"prefix": prefix, "writer": writer, "list": listing.name, "version": listing.version}
        )
        return
    typer.echo(f"revoked {writer[:16]}... under {prefix} ({listing.name} v{listing.version})")


def _key_info(me: Identity, path: Path) -> dict[str, str]:
    return {
        "key_file": str(path),
        "public_key": me.public_key.hex(),
        "fingerprint": me.fingerprint,
        "namespace": f"/key/{me.fingerprint}/",
    }


def _print_key_info(info: dict[str, str], as_json: bool) -> None:
    if as_json:
        _print_json(info)
        return
    for k, v in info.items():
        typer.echo(f"{k}: {v}")


@client_app.command()
def whoami(key: KeyOpt = None, as_json: JsonOpt = False) -> None:
    """Show the publisher key, its fingerprint and its self-certifying namespace.

    Read only: it never creates a key (difs key new does; difs put creates the default one).

    Example: difs whoami
    """
    path = key or default_key_file()
    try:
        if key is None and not path.exists():
            raise errors.UsageError(
                f"no publisher key yet ({path}): it is created on first publish, "
                "or now with 'difs key new'"
            )
        me = _read_key(path)
    except errors.DifsError as exc:
        raise _fail(exc, as_json) from None
    _print_key_info(_key_info(me, path), as_json)


key_app = typer.Typer(
    help="Create publisher keys.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
client_app.add_typer(key_app, name="key")


@key_app.command("new")
def key_new(
    path: Annotated[
        Path | None,
        typer.Argument(help="key file to create (default: $DIFS_HOME/publisher.key)"),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a new publisher key file (mode 0600); an existing file is never overwritten.

    Example: difs key new ~/keys/blog.key
    """
    from difs_p2p.identity import load_or_create

    target = path or default_key_file()
    try:
        if target.exists() or target.is_symlink():
            raise errors.AlreadyExistsError(f"key file {target} already exists; not overwritten")
        me = load_or_create(target)
    except errors.DifsError as exc:
        raise _fail(exc, as_json) from None
    _print_key_info(_key_info(me, target), as_json)


def _main(app: typer.Typer) -> None:
    """Run ``app``: usage errors as one line (a JSON object with --json) and exit 2."""
    as_json = "--json" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # bad options and arguments
        if as_json:
            _report_error(exc.format_message(), exc.exit_code, True)
        else:
            exc.show()  # type: ignore[attr-defined]
        code = exc.exit_code
    except typer.Abort:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code if isinstance(code, int) else 0)


def peer_main() -> None:
    _main(peer_app)


def client_main() -> None:
    _main(client_app)
