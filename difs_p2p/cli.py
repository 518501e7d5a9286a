"""The command-line interface: ``difs-peer`` (run a storage peer) and ``difs`` (use one).

A thin typer layer over :mod:`difs_p2p.peer` and :mod:`difs_p2p.client`. Each error is one
line on stderr and its own exit code (``cli_common.EXIT_CODES``); ``--json`` prints
machine-readable output on stdout (on stderr when stdout carries the fetched data), and
errors as one JSON object on stderr. SIGINT and SIGTERM cancel a command cleanly (exit 130
and 143).

This module only wires the typer apps (the entry points ``peer_main`` and ``client_main``)
to the commands, which live by family: ``cli_peer`` (difs-peer), ``cli_client`` (difs
commands that move content), ``cli_keys`` (publisher keys and delegations). What they
share is in ``cli_common`` (run and cancel, exit codes, options, finding the peer, its
token and the key) and ``cli_output`` (JSON, summaries, tables, progress bars). Commands
are listed in ``--help`` in the order they are registered here.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from difs_p2p import cli_client, cli_keys, cli_peer
from difs_p2p.cli_common import CONTEXT, report_error


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
    except typer.Abort:
        code = 130
    except BrokenPipeError:
        code = 0
    sys.exit(code if isinstance(code, int) else 0)


def peer_main() -> None:
    _main(peer_app)


def client_main() -> None:
    _main(client_app)
