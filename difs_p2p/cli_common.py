"""What every CLI command shares: errors as exit codes, cancellation, options, resolution.

Each error is one line on stderr and its own exit code (``EXIT_CODES``); with ``--json``
the error is one JSON object on stderr. ``run`` runs an async command: SIGINT and SIGTERM
cancel it cleanly (its cleanup runs; exit 130 and 143). The peer to talk to, its control
token and the publisher key are found here from the options, the environment and
$DIFS_HOME, the same way for every command.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import signal
import sys
import types
import typing
from collections.abc import Callable, Coroutine, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

from difs_p2p import errors
from difs_p2p.addresses import format_address, parse_hostport
from difs_p2p.cli_output import echo

if TYPE_CHECKING:
    from difs_p2p import conffile, ops
    from difs_p2p.identity import Identity

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
    13: "drain_incomplete",
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


# -- the configuration file (difs.toml, rules in conffile.py) ------------------------------

# The variable naming the configuration file; without it, $DIFS_HOME/difs.toml if it exists.
CONFIG_ENV = "DIFS_CONFIG"
# The environment rule: option --some-option of `difs-peer join` is DIFS_PEER_SOME_OPTION
# (DIFS_PEER alone stays the client's peer address), option --some-option of the client
# commands ([client] table) is DIFS_SOME_OPTION (so DIFS_PEER and DIFS_TOKEN_FILE as before).
PEER_ENV_PREFIX = "DIFS_PEER"
CLIENT_ENV_PREFIX = "DIFS"


def config_file(explicit: Path | None) -> Path | None:
    """The configuration file: ``explicit`` (--config, else $DIFS_CONFIG), which must
    exist, else $DIFS_HOME/difs.toml if it exists, else None."""
    if explicit is None and os.environ.get(CONFIG_ENV):
        explicit = Path(os.environ[CONFIG_ENV])
    if explicit is not None:
        return explicit
    default = difs_home() / "difs.toml"
    return default if default.exists() else None


def read_config(path: Path) -> tuple[dict[str, Any], str]:
    """The TOML document in ``path`` and its text; UsageError (naming the file) if it
    cannot be read or is not TOML."""
    from difs_p2p import conffile

    try:
        with path.open("rb") as f:
            data = f.read(conffile.MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise errors.UsageError(
            f"{path}: cannot read the configuration file: {exc.strerror or exc}"
        ) from None
    if len(data) > conffile.MAX_FILE_BYTES:
        raise errors.UsageError(f"{path}: larger than 1 MiB, not a configuration file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.UsageError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    return conffile.parse(text, str(path)), text


def config_values(
    path: Path, table: str, tables: Mapping[str, list[conffile.Setting]]
) -> dict[str, Any]:
    """The values ``[table]`` of the configuration file ``path`` sets, checked against
    ``tables[table]`` (by parameter name); UsageError naming the file, line and key."""
    from difs_p2p import conffile

    doc, text = read_config(path)
    conffile.check_tables(doc, tables, str(path), text)
    return conffile.table_values(
        doc, table, tables[table], source=str(path), text=text, base=path.parent
    )


def _kind(annotation: Any) -> tuple[conffile.Kind, tuple[str, ...]]:
    """The file's kind of an option annotated ``annotation`` (``int``, ``Path | None``...)."""
    from difs_p2p import conffile

    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        (annotation,) = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return conffile.Kind.LIST, ()
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return conffile.Kind.CHOICE, tuple(str(m.value) for m in annotation)
    kinds = {
        bool: conffile.Kind.BOOL,
        int: conffile.Kind.INT,
        float: conffile.Kind.FLOAT,
        str: conffile.Kind.STR,
        Path: conffile.Kind.PATH,
    }
    # any other type is written as a string, which the command converts as it does a flag's
    return kinds.get(annotation, conffile.Kind.STR), ()


def settings_of(
    command: Callable[..., Any],
    checks: Mapping[str, Callable[[str], object]] | None = None,
    skip: tuple[str, ...] = (),
) -> list[conffile.Setting]:
    """The options of the typer command ``command`` (its signature: names, types,
    flags, help, defaults) as settings of the configuration file, in their order;
    ``checks`` adds a value rule per parameter name; ``skip`` leaves parameters out."""
    import inspect

    from typer.models import OptionInfo

    from difs_p2p import conffile

    hints = typing.get_type_hints(command, include_extras=True)
    settings = []
    for name, parameter in inspect.signature(command).parameters.items():
        hint = hints.get(name)
        if name in skip or typing.get_origin(hint) is not Annotated:
            continue
        base, *extras = typing.get_args(hint)
        info = next((e for e in extras if isinstance(e, OptionInfo)), None)
        if info is None:
            continue
        decls = [d.split("/")[0] for d in info.param_decls or () if d.startswith("--")]
        flag = decls[0] if decls else "--" + name.replace("_", "-")
        kind, choices = _kind(base)
        default = parameter.default
        settings.append(
            conffile.Setting(
                key=flag.removeprefix("--"),
                name=name,
                kind=kind,
                help=info.help or "",
                default=default.value if isinstance(default, enum.Enum) else default,
                choices=choices,
                check=(checks or {}).get(name),
            )
        )
    return settings


def report_error(message: str, code: int, as_json: bool) -> None:
    """One line on stderr: plain text, or with ``as_json`` a JSON object."""
    if as_json:
        obj = {"error": message, "code": EXIT_NAMES.get(code, "unexpected"), "exit": code}
        echo(json.dumps(obj, sort_keys=True), err=True)
    else:
        echo(f"error: {message}", err=True)


class CommandExit(Exception):
    """The command ends with exit code ``code``, its error (if any) already reported:
    ``cli._main`` and ``cli_fast`` exit with it (typer is not imported to raise it)."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def fail(exc: errors.DifsError, as_json: bool = False) -> CommandExit:
    """Report ``exc`` and return the exit that carries its code (for ``raise``)."""
    code = exit_code(exc)
    report_error(str(exc), code, as_json)
    return CommandExit(code)


class _Interrupted(Exception):
    """The command was cancelled by a signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


async def _cancellable(coro_fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run ``coro_fn()``; SIGINT or SIGTERM cancel it, so that its cleanup runs (a get
    removes its temporary file) before the process exits."""
    import asyncio

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
    """Run an async command, turning our errors into one line and an exit code.

    A Ctrl-C while the event loop is being made is held until the loop exists (raised in
    the middle of its construction, the half-made loop printed a traceback as it was
    collected), then counts as an interruption like any other."""
    import asyncio  # here: a small `difs get` runs without it (quickget.py)

    held: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        with asyncio.Runner() as runner:
            runner.get_loop()
            signal.signal(signal.SIGINT, previous)
            if held:
                raise _Interrupted(held[0])
            return runner.run(_cancellable(coro_fn))
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    except _Interrupted as exc:
        code = 128 + exc.signum
        report_error(f"interrupted ({exc})", code, as_json)
        raise CommandExit(code) from None
    finally:
        if signal.getsignal(signal.SIGINT) is not previous:
            signal.signal(signal.SIGINT, previous)


class LogLevel(enum.StrEnum):
    debug = "debug"
    info = "info"
    warning = "warning"
    error = "error"


def setup_logging(level: str) -> None:
    import logging

    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    # The library logs every lost reply at ERROR and values at INFO.
    for name in ("kademlia", "rpcudp"):
        logging.getLogger(name).setLevel(logging.CRITICAL)


def client_settings() -> list[conffile.Setting]:
    """The [client] table's settings: --peer and --token-file of the client commands."""
    from difs_p2p.cli_options import client_options

    return settings_of(client_options, {"peer": parse_hostport})


def client_config() -> dict[str, Any]:
    """What the configuration file's [client] table sets (by parameter name); {} without
    a file. A bad file is a UsageError naming it (the [peer] table is join's to check)."""
    path = config_file(None)
    if path is None:
        return {}
    return config_values(path, "client", {"client": client_settings(), "peer": []})


# -- the peer, its control token, the publisher key ----------------------------------------


def resolve_peer(peer: str | None) -> tuple[str, int]:
    """The peer to talk to: --peer, else $DIFS_PEER, else the configuration file's
    [client] peer, else the local peer's address file."""
    text = _chosen_peer(peer)
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


def _chosen_peer(peer: str | None) -> str | None:
    """The peer named by --peer, $DIFS_PEER or the file's [client] peer (None: the local one)."""
    return peer or os.environ.get("DIFS_PEER") or client_config().get("peer")


def resolve_token(peer: str | None, token_file: Path | None, address: tuple[str, int]) -> bytes:
    """The control token for ``address``: --token-file, else $DIFS_TOKEN_FILE, else the
    configuration file's [client] token-file, else the local peer's
    ($DIFS_HOME/peer/control.token) when ``address`` is the local peer's."""
    from difs_p2p.control import read_token_file

    text = (
        str(token_file)
        if token_file
        else os.environ.get("DIFS_TOKEN_FILE") or client_config().get("token_file")
    )
    local = difs_home() / "peer"
    path: Path | None = None
    if text:
        path = Path(text)
    elif not _chosen_peer(peer) or _local_address(local) == address:
        path = local / "control.token"
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            return read_token_file(path)
    missing = f" ({path} not found)" if path is not None else ""
    raise errors.PermissionDeniedError(
        f"permission denied: this needs the control token of the peer at"
        f" {format_address(*address)} (its DATA/control.token){missing}; pass --token-file"
        " PATH or set DIFS_TOKEN_FILE"
    )


def _local_address(data: Path) -> tuple[str, int] | None:
    try:
        return parse_hostport((data / "address").read_text().strip())
    except (OSError, errors.UsageError):
        return None


def default_key_file() -> Path:
    return difs_home() / "publisher.key"


def load_publisher(key_file: Path | None) -> Identity:
    """The publisher key: --key FILE, which must exist (``difs key new`` creates one), else
    the default key in $DIFS_HOME, created on first use."""
    from difs_p2p.identity import load_or_create

    if key_file is None:
        return load_or_create(default_key_file())
    return read_key(key_file)


def read_key(path: Path) -> Identity:
    """The identity in the key file ``path``; UsageError when there is none."""
    from difs_p2p.identity import load_or_create

    if path.is_dir():
        raise errors.UsageError(f"key file {path} is a directory")
    if not path.exists():
        raise errors.UsageError(
            f"key file {path} does not exist (create one with 'difs key new {path}')"
        )
    return load_or_create(path)  # exists: only read


# -- talking to a peer ---------------------------------------------------------------------


async def check_peer(address: tuple[str, int]) -> None:
    """NetworkError unless a DIFS peer listens at ``address``: it must answer a HELLO
    within HELLO_TIMEOUT (anything else on the port fails here, not after a 30 s stall)."""
    from difs_p2p import wire
    from difs_p2p.transfer import Connection

    where = format_address(*address)
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
    """The peer to talk to (``resolve_peer``), checked to be a DIFS peer. A host name
    is resolved without blocking, and its addresses tried in turn (``localhost`` may
    be 127.0.0.1 or ::1); the first that answers HELLO is the peer."""
    from difs_p2p.net import resolve

    host, port = resolve_peer(peer)
    failure: errors.DifsError | None = None
    for address in await resolve(host, port):
        try:
            await check_peer(address)
        except errors.DifsError as exc:
            failure = failure or exc
            continue
        return address
    assert failure is not None  # resolve returns at least one address
    raise failure


async def request_peer(
    address: tuple[str, int], request: ops.Op[T], *, token: bytes | None = None
) -> T:
    """One typed control request (ops.py) to the peer at ``address``, as its operator if
    ``token`` is given; its typed reply."""
    from difs_p2p.control import OperatorCredential
    from difs_p2p.transfer import Connection

    await check_peer(address)
    credential = OperatorCredential(token) if token is not None else None
    conn = await Connection.open(address, io_timeout=30.0, credential=credential)
    try:
        return await conn.request(request)
    finally:
        conn.close()


async def peer_status(peer: str | None, token_file: Path | None) -> dict[str, Any]:
    """The status of the peer (an operator operation: it needs the peer's token), as the
    JSON object it answered."""
    from difs_p2p import ops

    address = await entry_peer(peer)
    token = resolve_token(peer, token_file, address)
    reply = await request_peer(address, ops.StatusRequest(), token=token)
    return ops.encode_reply("status", reply)
