"""The ``difs-peer`` commands: run a storage peer (join), show its configuration (config),
ask a running one for its status or to check its segments, and make one leave the network
for good (leave). The typer app that holds them is wired in cli.py.

Every option of join is also a key of the configuration file's ``[peer]`` table and an
environment variable (``DIFS_PEER_<OPTION>``): a flag beats the environment, which beats
the file, which beats the default. ``--config`` loads the file before the other options
are read (``_load_config``); the keys are derived from join's signature
(``join_settings``), so a new option is configurable and documented without more code."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from difs_p2p import conffile, errors, ops
from difs_p2p.addresses import check_listen, check_zone
from difs_p2p.cli_common import (
    CLIENT_ENV_PREFIX,
    CONTEXT,
    PEER_ENV_PREFIX,
    CommandExit,
    LogLevel,
    client_settings,
    config_file,
    config_values,
    difs_home,
    entry_peer,
    fail,
    peer_status,
    resolve_token,
    run,
    settings_of,
    setup_logging,
)
from difs_p2p.cli_options import JsonOpt, PeerOpt, TokenOpt
from difs_p2p.cli_output import check_lines, drain_line, drain_summary, print_json, print_status
from difs_p2p.config import (
    DhtConfig,
    PeerConfig,
    RepairConfig,
    parse_hostport,
    parse_http,
    parse_s3,
    parse_size,
)
from difs_p2p.transfer import Connection

# Where the HTTP gateway listens unless --http says otherwise: kubo's gateway address.
DEFAULT_HTTP = "127.0.0.1:8080"
# The context join runs in: its options read DIFS_PEER_<OPTION> from the environment.
JOIN_CONTEXT = {**CONTEXT, "auto_envvar_prefix": PEER_ENV_PREFIX}
# Value rules beyond the type that the file's values are checked against (so that a bad
# value names the file, line and key); the flags meet the same rules in join.
_VALUE_CHECKS: dict[str, Callable[[str], object]] = {
    "capacity": parse_size,
    "bootstrap": parse_hostport,
    "listen": check_listen,
    "advertise": lambda text: parse_hostport(text, default_port=0),
    "zone": check_zone,
    "http": parse_http,
    "s3": parse_s3,
}


def _load_config(ctx: typer.Context, value: Path | None) -> Path | None:
    """Read the configuration file (--config, $DIFS_CONFIG, else $DIFS_HOME/difs.toml if
    it exists) and make its [peer] table the defaults of the command's options: a flag or
    an environment variable still comes first. A bad file exits 2 before anything starts."""
    if ctx.resilient_parsing:
        return value
    try:
        conffile.check_env(os.environ, PEER_ENV_PREFIX, join_settings())
        path = config_file(value)
        if path is not None:
            values = config_values(path, "peer", config_tables())
            ctx.default_map = {**(ctx.default_map or {}), **values}
    except errors.DifsError as exc:
        raise fail(exc) from None
    return path


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        envvar="DIFS_CONFIG",
        allow_from_autoenv=False,  # DIFS_CONFIG only, not DIFS_PEER_CONFIG_PATH
        is_eager=True,
        callback=_load_config,
        help="configuration file (default: $DIFS_CONFIG, else $DIFS_HOME/difs.toml if it"
        " exists); flags and DIFS_PEER_<OPTION> variables override it",
    ),
]


def join(
    ctx: typer.Context,
    bootstrap: Annotated[
        list[str] | None,
        typer.Option(
            "--bootstrap",
            "-b",
            help="HOST:PORT or [IPv6]:PORT of a peer to join through (HOST may be a name);"
            " repeatable",
        ),
    ] = None,
    listen: Annotated[
        str,
        typer.Option(
            "--listen",
            help="address to listen on: IPv4, IPv6, 0.0.0.0 or :: (every address, IPv6 and IPv4)",
        ),
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option(help="UDP port, and TCP port unless --tcp-port (0 picks a free one)")
    ] = 0,
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
    advertise: Annotated[
        str | None,
        typer.Option(
            help="HOST[:PORT] others reach this peer's TCP service at (behind NAT, in a"
            " container; HOST may be a name, PORT defaults to the TCP port); default: the"
            " --listen address, or for 0.0.0.0/:: what two other peers observe"
        ),
    ] = None,
    tcp_port: Annotated[
        int, typer.Option(help="TCP port of the segment service (default: the UDP port)")
    ] = 0,
    zone: Annotated[
        str,
        typer.Option(help="where this peer runs (a rack, a site: <= 32 of A-Z a-z 0-9 . _ -)"),
    ] = "",
    host: Annotated[
        str | None, typer.Option("--host", hidden=True, help="deprecated: --listen")
    ] = None,
    max_contacts_per_ip: Annotated[
        int,
        typer.Option(
            help="DHT routing-table contacts per IPv4 address or IPv6 /64 (Sybil limit);"
            " peers beyond it may still hold copies"
        ),
    ] = 4,
    drain: Annotated[
        bool,
        typer.Option(
            "--drain",
            help="on SIGTERM/SIGINT hand every range and record over to other peers before"
            " stopping (a second signal stops at once)",
        ),
    ] = False,
    config_path: ConfigOpt = None,  # read before the other options, by _load_config
    http: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the read-only HTTP gateway (GET a name: browsers, players,"
            " curl), or off; the default address, if taken, leaves the peer without one"
        ),
    ] = DEFAULT_HTTP,
    s3: Annotated[
        str,
        typer.Option(
            help="HOST:PORT of the S3 API (boto3, the aws CLI, rclone...; access keys from"
            " `difs s3-key create`), or off"
        ),
    ] = "off",
    resolve_cache: Annotated[
        float,
        typer.Option(
            help="seconds a resolve is answered from this peer's own resolve of the name"
            " (hot names cost no lookup; readers through other peers see a new version"
            " within it, writers through this one at once); 0 turns it off"
        ),
    ] = 0.0,
    s3_upload_expiry: Annotated[
        float,
        typer.Option(
            help="seconds after its last part an unfinished S3 multipart upload is aborted"
            " and its parts freed"
        ),
    ] = 86400.0,
    s3_keepalive: Annotated[
        float,
        typer.Option(
            help="seconds a CompleteMultipartUpload works before the S3 API answers 200 and"
            " sends a space every this many seconds until its result (no client read timeout"
            " fires)"
        ),
    ] = 10.0,
    log_level: Annotated[LogLevel, typer.Option(help="how much to log on stderr")] = (
        LogLevel.warning
    ),
) -> None:
    """Start a peer: a new network without --bootstrap, else join through the given peers.

    Example: difs-peer join --bootstrap 127.0.0.1:4000 --data ./peer2 --capacity 5GiB

    Example: difs-peer join --listen :: --advertise 203.0.113.7:4100 --port 4100
    """
    setup_logging(log_level.value)
    if config_path is not None:
        logging.getLogger(__name__).info("configuration file=%s", config_path)
    try:
        data_dir = data or difs_home() / "peer"
        if data_dir.exists() and not data_dir.is_dir():
            raise errors.StorageError(f"data directory {data_dir} is not a directory")
        config = PeerConfig(
            data_dir=data_dir,
            host=host or listen,
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
            drain_on_signal=drain,
            dht=DhtConfig(max_contacts_per_ip=max_contacts_per_ip, resolve_cache=resolve_cache),
            advertise=parse_hostport(advertise, default_port=0) if advertise else None,
            tcp_port=tcp_port,
            zone=zone,
            http=parse_http(http),
            # the default address may be taken (another peer's gateway): run without one
            http_optional=getattr(ctx.get_parameter_source("http"), "name", "") == "DEFAULT",
            s3=parse_s3(s3),
            s3_upload_expiry=s3_upload_expiry,
            s3_keepalive=s3_keepalive,
        )
    except errors.DifsError as exc:
        raise fail(exc) from None
    created = missing_ancestor(config.data_dir)
    started: list[bool] = []
    try:
        run(lambda: _run_peer(config, started))
    except CommandExit as exc:
        # a peer that failed to start leaves no data directory it created behind
        if exc.code != 0 and created is not None and not started:
            shutil.rmtree(created, ignore_errors=True)
        raise


def join_settings() -> list[conffile.Setting]:
    """The options of join as the [peer] table's settings (all but --config and the hidden
    --host, an old name of --listen)."""
    return settings_of(join, _VALUE_CHECKS, skip=("config_path", "host"))


def config_tables() -> dict[str, list[conffile.Setting]]:
    """The tables of difs.toml and their settings."""
    return {"peer": join_settings(), "client": client_settings()}


_EXAMPLE_HEADER = """\
difs.toml: the configuration of a DIFS-P2P peer (difs-peer join) and of the difs command.
Generated by `difs-peer config --example`; every setting is shown commented out with its
default. Uncomment and change what you need.

Where it is read from: --config PATH, else $DIFS_CONFIG, else $DIFS_HOME/difs.toml if it
exists. Precedence: command-line flags, then environment variables, then this file, then
the defaults. Keys are the long options without the dashes; relative paths are taken from
this file's directory. A mistake (unknown key, wrong type, bad value) stops the command
with exit code 2 and a message naming the file, line and key.
"""


def example_config() -> str:
    """The complete commented difs.toml (deploy/difs.toml is this text)."""
    return conffile.example(
        _EXAMPLE_HEADER,
        [
            (
                "peer",
                "difs-peer join: each --option is also the variable DIFS_PEER_<OPTION>"
                " (dashes as underscores).",
                PEER_ENV_PREFIX,
                join_settings(),
            ),
            (
                "client",
                "difs and difs-peer status/check: which peer to talk to and with what"
                " credentials; each --option is also the variable DIFS_<OPTION>.",
                CLIENT_ENV_PREFIX,
                client_settings(),
            ),
        ],
    )


def config(
    ctx: typer.Context,
    example: Annotated[
        bool,
        typer.Option("--example", metavar="", help="print a complete commented difs.toml instead"),
    ] = False,
    config_path: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="configuration file to check (default: as join finds it)",
        ),
    ] = None,
) -> None:
    """Show the settings join would start with and where each comes from (environment,
    configuration file, default), checking the file; --example prints a commented
    difs.toml of every option.

    Example: difs-peer config --example > difs.toml
    """
    if example:
        typer.echo(example_config(), nl=False)
        return
    assert ctx.parent is not None
    command = ctx.parent.command.get_command(ctx.parent, "join")  # type: ignore[attr-defined]
    args = ["--config", str(config_path)] if config_path is not None else []
    with command.make_context("join", args, parent=ctx.parent) as join_ctx:
        typer.echo(f"# configuration file: {join_ctx.params.get('config_path') or 'none'}")
        for setting in join_settings():
            source = join_ctx.get_parameter_source(setting.name)
            origin = {
                "ENVIRONMENT": f"environment {conffile.env_name(PEER_ENV_PREFIX, setting)}",
                "DEFAULT_MAP": "file",
            }.get(getattr(source, "name", ""), "default")
            value = join_ctx.params.get(setting.name)
            if value is None:
                typer.echo(f"# {setting.key} is not set  # {origin}")
            else:
                typer.echo(f"{setting.key} = {conffile.toml_value(value)}  # {origin}")


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
    draining: list[asyncio.Task[Any]] = []

    def on_signal() -> None:
        if config.drain_on_signal and not draining and not stop.is_set():
            typer.echo(
                "draining: handing ranges and records to other peers before stopping "
                "(send the signal again to stop at once)",
                err=True,
            )
            draining.append(peer.spawn(peer.drain()))
        else:
            stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    try:
        status = peer.status()
        known = "" if status["address_known"] else " address_known=no"
        http = f" http={status['http']}" if status.get("http") else ""
        http += f" s3={status['s3']}" if status.get("s3") else ""
        typer.echo(
            f"peer ready address={status['address']} listen={status['listen']}{known}"
            f" id={status['node_id']} contacts={status['routing_table']}{http}",
        )
        sys.stdout.flush()
        # a signal, or a drain (leave, or a signal with --drain) that handed everything over
        waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(peer.left.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        if peer.left.is_set():
            typer.echo("peer left the network: its ranges are held elsewhere", err=True)
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


# `difs-peer leave` exits with this code when some range could not get its r copies on
# other peers (the peer stays, unless --force made it leave anyway).
EXIT_DRAIN_INCOMPLETE = 13
# How often `leave` asks the peer how its drain goes.
LEAVE_POLL = 0.5


def leave(
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            metavar="",
            help="leave even if some range cannot get its r copies on other peers",
        ),
    ] = False,
    peer: PeerOpt = None,
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a running peer leave the network for good: it takes no new copies, hands
    every range it holds to the next closest peers until each has its r live copies
    elsewhere, hands over its DHT records, then exits. It deletes nothing: run again, a
    drain skips the ranges already safe; Ctrl-C cancels it (the peer stays). Exit 13 if
    some range could not be handed over (the peer stays unless --force).

    Example: difs-peer leave --peer 127.0.0.1:4000
    """
    result = run(lambda: _leave(peer, force, token_file, as_json), as_json)
    if as_json:
        print_json(result)
    else:
        for line in drain_summary(result):
            typer.echo(line)
    if result["state"] != "done":
        raise typer.Exit(EXIT_DRAIN_INCOMPLETE)


async def _leave(
    peer: str | None, force: bool, token_file: Path | None, as_json: bool
) -> dict[str, Any]:
    """Start the peer's drain and follow it to its end; the final report. Cancelled
    (Ctrl-C), it cancels the drain: the peer stays a normal peer."""
    from difs_p2p.control import OperatorCredential

    address = await entry_peer(peer)
    token = resolve_token(peer, token_file, address)
    conn = await Connection.open(address, io_timeout=30.0, credential=OperatorCredential(token))
    ended = False
    try:
        reply = await conn.request(ops.DrainRequest("start", force))
        last = ""
        while reply.state == "draining":
            line = drain_line(ops.encode_reply("drain", reply))
            if not as_json and line != last:
                typer.echo(line)
                sys.stdout.flush()
                last = line
            await asyncio.sleep(LEAVE_POLL)
            reply = await conn.request(ops.DrainRequest("status"))
        ended = True
        return ops.encode_reply("drain", reply)
    finally:
        if not ended:
            with contextlib.suppress(errors.DifsError, TimeoutError, OSError):
                async with asyncio.timeout(3.0):
                    await conn.request(ops.DrainRequest("cancel"))
        conn.close()
