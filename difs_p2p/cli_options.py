"""The typer options several commands share (--peer, --json, --token-file, --key), and
the [client] table's options of difs.toml as a signature (``cli_common.client_settings``).

Apart from ``cli_common`` so that what the fast commands (``cli_fast``) import never
imports typer.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PeerOpt = Annotated[
    str | None,
    typer.Option(
        "--peer",
        help="HOST:PORT or [IPv6]:PORT of the peer, HOST an address or a name (default:"
        " $DIFS_PEER, else [client] peer in difs.toml, else the local peer)",
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", metavar="", help="print JSON for scripts (errors too)")
]
TokenOpt = Annotated[
    Path | None,
    typer.Option(
        "--token-file",
        help="the peer's control token (default: $DIFS_TOKEN_FILE, else [client] token-file"
        " in difs.toml, else the local peer's)",
    ),
]
KeyOpt = Annotated[
    Path | None,
    typer.Option(
        "--key",
        help="publisher key file, which must exist (default: $DIFS_HOME/publisher.key,"
        " created on first use)",
    ),
]


def client_options(peer: PeerOpt = None, token_file: TokenOpt = None) -> None:
    """The options the [client] table of difs.toml sets (read for their keys and help)."""
