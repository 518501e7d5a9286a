"""The entry points of ``difs`` and ``difs-peer``: the common commands start without typer.

Importing typer (with click and pydantic) cost more than the rest of a small ``difs get``
together, so the commands people run most are recognised here with the standard library
alone, and everything else goes to the typer apps of cli.py unchanged:

* ``--version`` alone prints the version as cli.py does;
* ``--help`` and ``-h`` of any command are printed from ``cli_help``, the text typer
  renders, generated from the apps (``python -m difs_p2p.cli``; tests/test_cli_fast.py
  fails when it drifts), when the terminal is at least 80 columns wide (the width the
  text was rendered for);
* ``difs get`` and ``difs put`` in their plain forms run ``cli_content``, the same
  functions the typer commands call. Anything this parser is not sure of (an unknown or
  repeated option, a value that looks like an option, a number out of range, ``--``,
  ``--help`` in the middle, ``--meta``) goes to typer, which parses it or reports the
  usage error itself: the fast path never reports one.

The parse is a pure function of argv (``fast_command``), tested against the typer path by
running both as real processes.
"""

from __future__ import annotations

import os
import sys

# typing costs a --help a fifth of its time: imported for the type checker only (which
# takes any TYPE_CHECKING as true)
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any


class _Spec:
    """A command's plain form: its positional parameters, options that take a value
    (flag -> parameter), options that are bare flags, and integer options' bounds."""

    def __init__(
        self,
        positional: tuple[str, ...],
        values: dict[str, str],
        flags: dict[str, str],
        ints: dict[str, tuple[int, int | None]],
    ) -> None:
        self.positional = positional
        self.values = values
        self.flags = flags
        self.ints = ints


# The options of `difs get` and `difs put` (cli_client.get and put) this parser takes;
# tests/test_cli_fast.py checks every one is an option of the typer command.
SPECS: dict[str, _Spec] = {
    "get": _Spec(
        positional=("name",),
        values={
            "-o": "output",
            "--output": "output",
            "--version": "version",
            "--range": "byte_range",
            "--peer": "peer",
            "--trust": "trust",
        },
        flags={"--sync": "sync", "--json": "as_json"},
        ints={"version": (1, None)},
    ),
    "put": _Spec(
        positional=("file", "name"),
        values={
            "--segment-size": "segment_size",
            "--replicas": "replicas",
            "--delegation": "delegation",
            "--peer": "peer",
            "--key": "key",
            "--token-file": "token_file",
            "--content-type": "content_type",
        },
        flags={"--update": "update", "--json": "as_json"},
        ints={"replicas": (1, 16)},
    ),
}
# parameters that are paths (typer passes a Path)
PATHS = frozenset({"delegation", "key", "token_file"})


def fast_command(argv: list[str]) -> tuple[str, dict[str, Any]] | None:
    """``(command, keyword arguments of cli_content's function)`` when ``argv`` (without
    the program) is a plain form of ``difs get`` or ``difs put``; else None (typer's)."""
    if not argv or argv[0] not in SPECS:
        return None
    spec = SPECS[argv[0]]
    kwargs: dict[str, Any] = {}
    positional: list[str] = []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        i += 1
        flag, eq, inline = token.partition("=") if token.startswith("--") else (token, "", "")
        if flag in spec.values:
            if eq:
                value = inline
            elif i < len(rest):
                value = rest[i]
                i += 1
            else:
                return None
            if value.startswith("-") and value != "-":
                return None
            param = spec.values[flag]
            if param in kwargs:
                return None
            kwargs[param] = value
        elif flag in spec.flags and not eq:
            param = spec.flags[flag]
            if param in kwargs:
                return None
            kwargs[param] = True
        elif token.startswith("-") and token != "-":
            return None  # --help, --, unknown options, -o- and other forms: typer's
        else:
            positional.append(token)
    if len(positional) != len(spec.positional):
        return None
    for param, (low, high) in spec.ints.items():
        if param in kwargs:
            text = kwargs[param]
            if not (text.isascii() and text.isdigit()):
                return None
            n = int(text)
            if n < low or (high is not None and n > high):
                return None
            kwargs[param] = n
    for param in PATHS & kwargs.keys():
        from pathlib import Path

        kwargs[param] = Path(kwargs[param])
    kwargs.update(zip(spec.positional, positional, strict=True))
    return argv[0], kwargs


def terminal_columns() -> int:
    """The width click renders help for: shutil.get_terminal_size's columns (without
    importing shutil): $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns or 80


def help_text(prog: str, argv: list[str]) -> str | None:
    """The help ``prog argv`` prints when argv is a command path then ``--help`` or
    ``-h``, rendered at the width of this terminal; None when cli_help does not have it."""
    if not argv or argv[-1] not in ("--help", "-h"):
        return None
    from difs_p2p.cli_help import COLUMNS, HELP

    if terminal_columns() < COLUMNS:
        return None
    return HELP.get(prog, {}).get(tuple(argv[:-1]))


def _run(command: str, kwargs: dict[str, Any]) -> int:
    """Run the content command; its exit code."""
    from difs_p2p.cli_common import CommandExit

    content: Callable[..., None]
    if command == "get":
        from difs_p2p.cli_content import get_content as content
    else:
        from difs_p2p.cli_content import put_content as content
    try:
        content(**kwargs)
    except CommandExit as exc:  # reported already
        return exc.code
    except KeyboardInterrupt:  # before the command's event loop took over SIGINT
        return 130
    except BrokenPipeError:
        # the reader of stdout went away: exit 1, silently, as typer does (the stream
        # pointed at /dev/null so that the flush at exit does not complain again)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1
    return 0


def _help_or_none(prog: str) -> None:
    """Print the help (or, for ``--version`` alone, the version) and exit, if argv asks."""
    text = help_text(prog, sys.argv[1:])
    if sys.argv[1:] == ["--version"]:
        from importlib.metadata import version

        text = f"difs-p2p {version('difs-p2p')}\n"
    if text is not None:
        try:
            sys.stdout.write(text)
            sys.stdout.flush()
        except BrokenPipeError:
            pass
        sys.exit(0)


def client_main() -> None:
    """``difs``."""
    _help_or_none("difs")
    call = fast_command(sys.argv[1:])
    if call is None:
        from difs_p2p.cli import client_main as typer_main

        typer_main()
        return
    sys.exit(_run(*call))


def peer_main() -> None:
    """``difs-peer``."""
    _help_or_none("difs-peer")
    from difs_p2p.cli import peer_main as typer_main

    typer_main()
