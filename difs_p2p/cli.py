"""The command-line interface: ``difs-peer`` (run a storage peer) and ``difs`` (use one).

A thin typer layer over :mod:`difs_p2p.peer` and :mod:`difs_p2p.client`. Each error is one
line on stderr and its own exit code (``cli_common.EXIT_CODES``); ``--json`` prints
machine-readable output on stdout (on stderr when stdout carries the fetched data), and
errors as one JSON object on stderr. SIGINT and SIGTERM cancel a command cleanly (exit 130
and 143).

This module only wires the typer apps (the entry points ``peer_main`` and ``client_main``)
to the commands, which live by family: ``cli_peer`` (difs-peer), ``cli_client`` (difs
commands that move content), ``cli_keys`` (publisher keys, delegations, S3 keys). What they
share is in ``cli_common`` (run and cancel, exit codes, options, finding the peer, its
token and the key) and ``cli_output`` (JSON, summaries, tables, progress bars). Commands
are listed in ``--help`` in the order they are registered here.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from difs_p2p import cli_client, cli_keys, cli_peer
from difs_p2p.cli_common import CONTEXT, CommandExit, report_error


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

# -- difs-peer -----------------------------------------------------------------------------

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


peer_app.command(context_settings=cli_peer.JOIN_CONTEXT)(cli_peer.join)
peer_app.command()(cli_peer.config)
peer_app.command()(cli_peer.status)
peer_app.command()(cli_peer.check)
peer_app.command()(cli_peer.leave)

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


client_app.command()(cli_client.peers)
client_app.command()(cli_client.put)
client_app.command()(cli_client.get)
client_app.command()(cli_client.rm)
client_app.command()(cli_client.stat)
client_app.command()(cli_client.versions)
client_app.command()(cli_client.ls)
client_app.command()(cli_client.claim)
client_app.command()(cli_client.owner)
client_app.command()(cli_keys.delegate)
client_app.command()(cli_keys.revoke)
client_app.command()(cli_keys.whoami)

key_app = typer.Typer(
    help="Create publisher keys.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
client_app.add_typer(key_app, name="key")
key_app.command("new")(cli_keys.key_new)

s3_key_app = typer.Typer(
    help="Create, list and delete the access keys of a peer's S3 API.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
    context_settings=CONTEXT,
)
client_app.add_typer(s3_key_app, name="s3-key")
s3_key_app.command("create")(cli_keys.s3_key_create)
s3_key_app.command("list")(cli_keys.s3_key_list)
s3_key_app.command("delete")(cli_keys.s3_key_delete)


def _main(app: typer.Typer) -> None:
    """Run ``app``: usage errors as one line (a JSON object with --json) and exit 2."""
    as_json = "--json" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
    except typer.TyperException as exc:  # bad options and arguments
        if as_json:
            report_error(exc.format_message(), exc.exit_code, True)
        else:
            exc.show()  # type: ignore[attr-defined]
        code = exc.exit_code
    except CommandExit as exc:  # reported already
        code = exc.code
    except typer.Abort:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code if isinstance(code, int) else 0)


def peer_main() -> None:
    _main(peer_app)


def client_main() -> None:
    _main(client_app)


# -- the help text of cli_help, which cli_fast prints without importing typer --------------

# The terminal width the help is rendered for: cli_fast prints it on a terminal at least this
# wide (click renders the same text for any width from 80 up).
HELP_COLUMNS = 80


def help_texts() -> dict[str, dict[tuple[str, ...], str]]:
    """What ``--help`` of every command prints (by program, then command path), rendered as
    click renders it for a terminal of HELP_COLUMNS columns."""
    texts: dict[str, dict[tuple[str, ...], str]] = {}

    def walk(cmd: Any, ctx: Any, path: tuple[str, ...], into: dict[tuple[str, ...], str]) -> None:
        # typer's own click: a command with subcommands has list_commands
        into[path] = ctx.get_help() + "\n"
        if hasattr(cmd, "list_commands"):
            for name in cmd.list_commands(ctx):
                sub = cmd.get_command(ctx, name)
                assert sub is not None
                with sub.make_context(name, [], parent=ctx, resilient_parsing=True) as subctx:
                    walk(sub, subctx, (*path, name), into)

    for prog, app in (("difs", client_app), ("difs-peer", peer_app)):
        cmd = typer.main.get_command(app)
        width = max(HELP_COLUMNS - 2, 50)  # click's width for a terminal that wide
        with cmd.make_context(prog, [], resilient_parsing=True, terminal_width=width) as ctx:
            walk(cmd, ctx, (), texts.setdefault(prog, {}))
    return texts


def write_help(path: Path) -> None:
    """Write cli_help (``python -m difs_p2p.cli``, after a change to a command)."""
    lines = [
        '"""What ``--help`` prints for every command of ``difs`` and ``difs-peer``, for',
        "cli_fast to print without importing typer. Generated by ``python -m difs_p2p.cli``",
        'from the typer apps (tests/test_cli_fast.py fails when it drifts): do not edit."""',
        "",
        "",
        "# the terminal width the text is for: cli_fast prints it on terminals at least as wide",
        f"COLUMNS = {HELP_COLUMNS}",
        "",
        "HELP: dict[str, dict[tuple[str, ...], str]] = {",
    ]
    for prog, texts in help_texts().items():
        lines.append(f"    {prog!r}: {{")
        for cmd_path, text in texts.items():
            lines.append(f"        {cmd_path!r}: (")
            lines.extend(f"            {line!r}" for line in text.splitlines(keepends=True))
            lines.append("        ),")
        lines.append("    },")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_help(Path(__file__).with_name("cli_help.py"))
