"""What ``difs put`` and ``difs get`` do, without typer: the typer commands of cli_client
and the fast entry point (cli_fast) both call ``put_content`` and ``get_content``, so the
two paths cannot differ in what they do, print or exit with.

Nothing here imports typer, rich (unless progress bars are drawn) or the client before
the command runs: what ``difs get`` imports is the client's fetch path and no more.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difs_p2p import errors
from difs_p2p.cli_common import (
    CommandExit,
    difs_home,
    entry_peer,
    fail,
    load_publisher,
    report_error,
    resolve_peer,
    resolve_token,
    run,
)
from difs_p2p.cli_output import Bars, echo, fetched_line, plural, print_json, published_line
from difs_p2p.sizes import parse_size

if TYPE_CHECKING:
    from difs_p2p.delegation import Delegation
    from difs_p2p.manifest import ObjectMeta
    from difs_p2p.pins import Pins
    from difs_p2p.ranges import ByteRange


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


def put_content(
    file: str,
    name: str,
    segment_size: str | None = None,
    replicas: int = 3,
    update: bool = False,
    delegation: Path | None = None,
    peer: str | None = None,
    key: Path | None = None,
    token_file: Path | None = None,
    as_json: bool = False,
    content_type: str | None = None,
    meta: list[str] | None = None,
) -> None:
    """``difs put``: publish ``file`` (``-``: stdin) under ``name``, print the summary;
    CommandExit with the error's code when it fails."""
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
        echo(f"warning: {warning}", err=True)
    echo(
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


def get_content(
    name: str,
    output: str | None = None,
    version: int | None = None,
    byte_range: str | None = None,
    peer: str | None = None,
    trust: str | None = None,
    sync: bool = False,
    as_json: bool = False,
    *,
    quick: bool = True,
) -> None:
    """``difs get``: fetch ``name`` into ``output`` (``-``: stdout; default: the name's
    last component), print the summary; CommandExit with the error's code when it fails.
    The newest version of a small object is fetched without asyncio (quickget.py) when it
    can be, unless ``quick`` is False (tests compare the two); anything else, and what
    that path hands back, by the asyncio client."""
    to_stdout = output == "-"
    if quick and version is None and byte_range is None and not sync:
        done = quick_get_content(name, output, peer, trust, as_json)
        if done is not None:
            report_get(done, as_json, to_stdout)
            return

    from difs_p2p.client import Client
    from difs_p2p.names import name_components

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

    report_get(run(go, as_json), as_json, to_stdout)


# On a terminal, only objects up to this size are fetched without the progress bar of the
# asyncio client (beyond, the quick path hands them over once it knows the size).
QUICK_ON_TERMINAL = 1 << 20


def quick_get_content(
    name: str, output: str | None, peer: str | None, trust: str | None, as_json: bool
) -> Any | None:
    """``difs get`` of the newest version through ``quickget``: its result, or None when
    the asyncio client is to do the command (from the start: it reports the errors of
    the options and of the peer's address itself). CommandExit for a definitive error
    of the name (not found, deleted, refused)."""
    from difs_p2p.names import name_components
    from difs_p2p.quickget import MAX_BYTES, Fallback, quick_get

    try:
        stdout = output == "-"
        target: Any = sys.stdout.buffer if stdout else Path(output or name_components(name)[-1])
        pins, pin_trusted = pins_for(name, trust)
        address = resolve_peer(peer)
    except errors.DifsError:
        return None
    try:
        limit = QUICK_ON_TERMINAL if sys.stderr.isatty() else MAX_BYTES
        result = quick_get(address, name, target, pins, limit)
    except Fallback:
        return None
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    except KeyboardInterrupt:
        report_error("interrupted (SIGINT)", 130, as_json)
        raise CommandExit(130) from None
    pin_trusted()
    return result


def report_get(result: Any, as_json: bool, to_stdout: bool) -> None:
    """Print what ``difs get`` prints of a finished fetch (fetch.FetchResult or
    quickget.QuickResult)."""
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
        echo(json.dumps(summary, indent=2, sort_keys=True), err=to_stdout)
        return
    for host, port in result.gave_up:
        echo(
            f"warning: gave up on holder {host}:{port} (stalled or failed); "
            "what it owed came from other holders",
            err=True,
        )
    if not to_stdout:
        echo(
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
