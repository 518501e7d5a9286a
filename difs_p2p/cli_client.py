"""The ``difs`` commands that move content: peers, put, get, rm, stat, versions, ls; and
who owns a prefix: claim, owner.

Each is a thin layer over :class:`difs_p2p.client.Client`: it resolves the entry peer,
the pins and the publisher key (cli_common), runs one client call under ``run`` and prints
the result (cli_output). The typer app that holds them is wired in cli.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from difs_p2p.cli_common import (
    entry_peer,
    load_publisher,
    peer_status,
    resolve_token,
    run,
)
from difs_p2p.cli_content import get_content, put_content

# re-exported: the parsers' tests import them from here
from difs_p2p.cli_content import parse_byte_range as parse_byte_range
from difs_p2p.cli_content import parse_metadata as parse_metadata
from difs_p2p.cli_content import parse_segment_size as parse_segment_size
from difs_p2p.cli_content import pins_for as pins_for
from difs_p2p.cli_options import JsonOpt, KeyOpt, PeerOpt, TokenOpt
from difs_p2p.cli_output import (
    print_json,
    print_stat,
    print_status,
    version_line,
    when,
)
from difs_p2p.config import format_size

if TYPE_CHECKING:
    from difs_p2p.listing import ListEntry, ListPage

TrustOpt = Annotated[
    str | None,
    typer.Option(
        "--trust", help="use this publisher key (64 hex) for the name; pinned once it succeeds"
    ),
]


def peers(peer: PeerOpt = None, token_file: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Show the network as a peer sees it (same as difs-peer status).

    Example: difs peers --peer 127.0.0.1:4000
    """
    result = run(lambda: peer_status(peer, token_file), as_json)
    print_json(result) if as_json else print_status(result)


def put(
    file: Annotated[str, typer.Argument(help="the file to publish, or - for stdin")],
    name: Annotated[str, typer.Argument(help="content name, e.g. /a.com/izone.mp4")],
    segment_size: Annotated[
        str | None,
        typer.Option(
            help="segment size: a multiple of 4KiB from 4KiB to 16MiB "
            "[default: 4MiB for a file of 64MiB or more, else 1MiB]"
        ),
    ] = None,
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
    content_type: Annotated[
        str | None,
        typer.Option(
            "--content-type",
            metavar="TYPE",
            help="media type signed into the manifest (else the extension's is served)",
        ),
    ] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option(
            "--meta",
            metavar="NAME=VALUE",
            help="user metadata signed into the manifest (x-amz-meta-NAME); repeatable",
        ),
    ] = None,
) -> None:
    """Publish FILE under NAME: segments go to storage peers, the signed manifest to the DHT.

    FILE may be - (stdin) or any pipe: it is read once, segment by segment. --content-type
    and --meta sign metadata into this version (a new version has only what it is given).

    Example: tar c photos | difs put - /backups/photos.tar --replicas 3
    """
    put_content(
        file,
        name,
        segment_size,
        replicas,
        update,
        delegation,
        peer,
        key,
        token_file,
        as_json,
        content_type,
        meta,
    )


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
    get_content(name, output, version, byte_range, peer, trust, sync, as_json)


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
        publisher = load_publisher(key)
        pins, _ = pins_for(name, None)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, pins=pins, token=token) as client:
            return await client.rm(name)

    tombstone = run(go, as_json)
    if as_json:
        print_json({"name": tombstone.name, "version": tombstone.version, "deleted": True})
        return
    typer.echo(f"deleted {tombstone.name} (tombstone version {tombstone.version})")


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
        pins, pin_trusted = pins_for(name, trust)
        async with Client(await entry_peer(peer), pins=pins) as client:
            result = await client.stat(name)
        pin_trusted()
        return result

    result = run(go, as_json)
    print_json(result) if as_json else print_stat(result)


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
        pins, _ = pins_for(name, None)
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
        print_json(rows)
        return
    for r in rows:
        typer.echo(version_line(r))


def claim(
    prefix: Annotated[str, typer.Argument(help="a first component to own, e.g. /t.com/")],
    peer: PeerOpt = None,
    key: KeyOpt = None,
    token_file: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Claim PREFIX for your publisher key: names under it are then yours and your delegates'.

    Publishes PREFIX/@claim; the first key to claim a prefix owns it for good (a claim by
    the same key again is a no-op). Only a first component is claimed: deeper prefixes are
    handed out with difs delegate; /key/<fingerprint>/ belongs to its key already.

    Example: difs claim /t.com/
    """
    from difs_p2p.client import Client

    async def go() -> Any:
        publisher = load_publisher(key)
        pins, _ = pins_for(prefix, None)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, pins=pins, token=token) as client:
            return await client.claim(prefix)

    manifest = run(go, as_json)
    print_ownership(manifest.name, manifest.owner, as_json)


def owner(
    name: Annotated[str, typer.Argument(help="a name or prefix, e.g. /t.com/x or /t.com/")],
    peer: PeerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show who owns NAME's prefix: claimed by a key, self-certifying, or unclaimed.

    Example: difs owner /t.com/index.html
    """
    from difs_p2p.client import Client
    from difs_p2p.names import top_prefix

    async def go() -> Any:
        if top_prefix(name) is None:
            return None  # /key/<fp>/: no lookup needed
        pins, _ = pins_for(name, None)
        async with Client(await entry_peer(peer), pins=pins) as client:
            return await client.prefix_owner(name)

    print_ownership(name, run(go, as_json), as_json)


def print_ownership(name: str, claim_owner: bytes | None, as_json: bool) -> None:
    """``difs claim`` and ``difs owner``'s output (claims.ownership)."""
    from difs_p2p.claims import ownership

    info = ownership(name, claim_owner)
    if as_json:
        print_json(info)
    elif info["state"] == "claimed":
        typer.echo(f"{info['prefix']} is claimed by {info['fingerprint']} (key {info['owner']})")
    elif info["state"] == "self-certifying":
        typer.echo(f"{info['prefix']} is self-certifying: it belongs to key {info['fingerprint']}")
    else:
        typer.echo(
            f"{info['prefix']} is not claimed: each name under it belongs to its first publisher"
        )


def ls(
    prefix: Annotated[str, typer.Argument(help="folder to list, e.g. /key/<fingerprint>/videos/")],
    recursive: Annotated[
        bool, typer.Option("--recursive", "-r", help="everything below PREFIX, folders too")
    ] = False,
    after: Annotated[
        str | None, typer.Option("--after", help="continue after this token (from --limit)")
    ] = None,
    limit: Annotated[
        int | None,
        typer.Option("--limit", min=1, help="at most N names, then the token to continue"),
    ] = None,
    peer: PeerOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List the names in folder PREFIX, in byte order (a folder ends with '/').

    Only a prefix with one owner has a listing: /key/<fingerprint>/ names, and names
    under a claimed first component (difs claim). Deleted names are not listed. With
    --limit, the last line (on stderr) gives the token to pass to --after for the next page.

    Example: difs ls /key/3f2a.../videos/ --recursive
    """
    from difs_p2p.client import Client

    async def go() -> ListPage:
        from difs_p2p.listing import ListPage

        async with Client(await entry_peer(peer)) as client:
            if limit is not None:
                return await client.list_page(prefix, recursive=recursive, after=after, limit=limit)
            entries = [e async for e in client.list(prefix, recursive=recursive, after=after)]
            return ListPage(entries, None)

    page = run(go, as_json)
    if as_json:
        print_json({"entries": [listed_json(e) for e in page.entries], "next": page.next})
        return
    for entry in page.entries:
        typer.echo(listed_line(entry))
    if page.next is not None:
        typer.echo(f"more: difs ls {prefix} --after {page.next}", err=True)


def listed_json(entry: ListEntry) -> dict[str, Any]:
    """One name of ``difs ls --json``."""
    return {
        "name": entry.name,
        "folder": entry.folder,
        "size": entry.size,
        "version": entry.version,
        "created": entry.created,
        "publisher": entry.publisher.hex(),
    }


def listed_line(entry: ListEntry) -> str:
    """One name of ``difs ls``: size, version and date of an object, then the name."""
    if entry.folder:
        return f"{'-':>12}  {'':>4}  {'':23}  {entry.name}"
    return (
        f"{format_size(entry.size):>12}  v{entry.version:<3}  {when(entry.created)}  {entry.name}"
    )
