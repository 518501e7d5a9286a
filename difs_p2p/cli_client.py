"""The ``difs`` commands that move content: peers, put, get, rm, stat, versions, ls; and
who owns a prefix: claim, owner.

Each is a thin layer over :class:`difs_p2p.client.Client`: it resolves the entry peer,
the pins and the publisher key (cli_common), runs one client call under ``run`` and prints
the result (cli_output). The typer app that holds them is wired in cli.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from difs_p2p import errors
from difs_p2p.cli_common import (
    JsonOpt,
    KeyOpt,
    PeerOpt,
    TokenOpt,
    difs_home,
    entry_peer,
    load_publisher,
    peer_status,
    resolve_token,
    run,
)
from difs_p2p.cli_output import (
    Bars,
    fetched_line,
    plural,
    print_json,
    print_stat,
    print_status,
    published_line,
    version_line,
    when,
)
from difs_p2p.config import format_size, parse_size

if TYPE_CHECKING:
    from difs_p2p.delegation import Delegation
    from difs_p2p.listing import ListEntry, ListPage
    from difs_p2p.manifest import ObjectMeta
    from difs_p2p.pins import Pins
    from difs_p2p.ranges import ByteRange

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


def pins_for(name: str, trust: str | None) -> tuple[Pins, Callable[[], None]]:
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


def parse_segment_size(text: str) -> int:
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


def parse_metadata(content_type: str | None, pairs: list[str] | None) -> ObjectMeta | None:
    """--content-type and --meta NAME=VALUE (names lower-cased, as S3 does): the object's
    metadata, None without either; UsageError for a pair without '=', a name given
    twice, or what ObjectMeta refuses."""
    from difs_p2p.manifest import ObjectMeta

    user: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key = key.lower()
        if not sep:
            raise errors.UsageError(f"--meta {pair!r}: NAME=VALUE")
        if key in user:
            raise errors.UsageError(f"--meta {key} is given twice")
        user[key] = value
    if content_type is None and not user:
        return None
    return ObjectMeta(content_type=content_type, user=user)


def parse_byte_range(text: str | None) -> ByteRange | None:
    """--range: None (the whole content) when absent."""
    from difs_p2p.ranges import parse_range

    return None if text is None else parse_range(text)


def load_delegation(path: Path) -> Delegation:
    """--delegation: the delegation file an owner's ``difs delegate`` printed."""
    from difs_p2p.delegation import parse_delegation

    try:
        return parse_delegation(json.loads(path.read_text()))
    except (OSError, ValueError, errors.WireError, errors.IntegrityError) as exc:
        raise errors.UsageError(f"cannot read delegation {path}: {exc}") from None


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
    from difs_p2p.client import Client

    async def go() -> Any:
        seg = None if segment_size is None else parse_segment_size(segment_size)
        metadata = parse_metadata(content_type, meta)
        cert = load_delegation(delegation) if delegation is not None else None
        if file == "-" and sys.stdin.isatty():
            raise errors.UsageError("put - reads the content from stdin: pipe it in")
        source: Any = sys.stdin.buffer if file == "-" else Path(file)
        publisher = load_publisher(key)
        pins, _ = pins_for(name, None)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, pins=pins, token=token) as client:
            with Bars() as bars:

                def on_phase(phase: str) -> None:
                    if phase == "upload":
                        size = source.stat().st_size if isinstance(source, Path) else None
                        bars.phase("uploading", size if size else None)
                    elif phase == "place":
                        bars.phase(f"placing {plural(replicas, 'replica')}", None, False)
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
                    metadata=metadata,
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
        "meta": m.meta.as_json() if m.meta is not None else None,
    }
    if as_json:
        print_json(summary)
        return
    for warning in result.warnings:
        typer.echo(f"warning: {warning}", err=True)
    typer.echo(
        published_line(
            m.name,
            m.version,
            m.size,
            m.segment_count,
            result.ranges,
            result.seconds,
            result.upload_seconds,
        )
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
    from difs_p2p.client import Client
    from difs_p2p.names import name_components

    to_stdout = output == "-"

    async def go() -> Any:
        rng = parse_byte_range(byte_range)
        target: Any = sys.stdout.buffer if to_stdout else Path(output or name_components(name)[-1])
        pins, pin_trusted = pins_for(name, trust)
        async with Client(await entry_peer(peer), pins=pins) as client:
            with Bars() as bars:
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
        # holders given up (stalled or failed): what they owed came from others
        "gave_up": [f"{h}:{p}" for h, p in result.gave_up],
    }
    if as_json:
        # stdout carries the data with -o -
        typer.echo(json.dumps(summary, indent=2, sort_keys=True), err=to_stdout)
        return
    for host, port in result.gave_up:
        typer.echo(
            f"warning: gave up on holder {host}:{port} (stalled or failed); "
            "what it owed came from other holders",
            err=True,
        )
    if not to_stdout:
        typer.echo(
            fetched_line(
                summary["name"],
                summary["version"],
                result.bytes,
                result.sources,
                result.seconds,
                result.resolve,
            ),
            err=True,
        )


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
