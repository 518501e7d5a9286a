"""The ``difs`` commands about publisher keys and delegations: whoami, key new, delegate,
revoke; and the S3 API's credentials: s3-key create, list, delete. The typer apps that hold
them are wired in cli.py."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from difs_p2p import errors
from difs_p2p.cli_common import (
    default_key_file,
    difs_home,
    entry_peer,
    fail,
    load_publisher,
    read_key,
    resolve_token,
    run,
)
from difs_p2p.cli_options import JsonOpt, KeyOpt, PeerOpt, TokenOpt
from difs_p2p.cli_output import key_info, print_json, print_key_info

if TYPE_CHECKING:
    from difs_p2p.s3keys import S3Key


def delegation_expiry(days: float, now: float) -> float:
    """When a delegation valid for ``days`` from ``now`` expires; UsageError unless ``days``
    is a finite number more than 0."""
    if not days > 0 or days == float("inf"):
        raise errors.UsageError(f"--days must be more than 0, not {days:g}")
    return now + days * 86400


def delegate(
    prefix: Annotated[str, typer.Argument(help="name prefix to delegate, e.g. /a.com/blog")],
    writer: Annotated[str, typer.Argument(help="the writer's public key (64 hex)")],
    days: Annotated[float, typer.Option(help="validity in days (more than 0)")] = 30.0,
    key: KeyOpt = None,
) -> None:
    """As a name owner, let WRITER publish names under PREFIX; prints the delegation JSON.

    Example: difs delegate /a.com/blog 3b6a27...29 > blog.delegation
    """
    from difs_p2p.delegation import build_delegation
    from difs_p2p.pins import parse_key

    try:
        expires = delegation_expiry(days, time.time())
        cert = build_delegation(
            load_publisher(key), prefix=prefix, writer=parse_key(writer), expires=expires
        )
    except errors.DifsError as exc:
        raise fail(exc) from None
    print_json(cert.as_json())


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
        publisher = load_publisher(key)
        address = await entry_peer(peer)
        token = resolve_token(peer, token_file, address)
        async with Client(address, publisher=publisher, token=token) as client:
            return await client.revoke(prefix, writer_key)

    listing = run(go, as_json)
    if as_json:
        print_json(
            {"prefix": prefix, "writer": writer, "list": listing.name, "version": listing.version}
        )
        return
    typer.echo(f"revoked {writer[:16]}... under {prefix} ({listing.name} v{listing.version})")


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
        me = read_key(path)
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    print_key_info(key_info(me, path), as_json)


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
        raise fail(exc, as_json) from None
    print_key_info(key_info(me, target), as_json)


# -- difs s3-key: the S3 API's credentials ------------------------------------------------

DataOpt = Annotated[
    Path | None,
    typer.Option(help="the peer's data directory (default: $DIFS_HOME/peer)"),
]


def s3_key_store_path(data: Path | None) -> Path:
    """The S3 key store of the peer whose data directory is ``data`` (default: the local
    peer's, as ``difs-peer join`` uses)."""
    return (data or difs_home() / "peer") / "s3keys.sqlite3"


def s3_key_create(
    name: Annotated[str, typer.Option(help="a name for people (e.g. laptop-rclone)")] = "",
    identity: Annotated[
        Path | None,
        typer.Option(
            help="sign as this publisher key file (e.g. ~/.difs/publisher.key) instead of a new key"
        ),
    ] = None,
    data: DataOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an S3 access key and secret for the peer's S3 API (printed once).

    What is put through the S3 API with it is published under its publisher key: a new
    one, or --identity's.

    Example: difs s3-key create --name laptop-rclone
    """
    from difs_p2p.s3keys import KeyStore

    try:
        signer = read_key(identity) if identity is not None else None
        with KeyStore(s3_key_store_path(data)) as store:
            key = store.create(name, signer)
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    info = s3_key_info(key)
    if as_json:
        print_json({**info, "secret": key.secret})
        return
    typer.echo(f"access key: {key.access_key}")
    typer.echo(f"secret:     {key.secret}")
    typer.echo(f"publisher:  {info['publisher']}")
    typer.echo("the secret is not shown again; store it now")


def s3_key_list(data: DataOpt = None, as_json: JsonOpt = False) -> None:
    """List the S3 access keys of the peer (never their secrets).

    Example: difs s3-key list
    """
    from difs_p2p.s3keys import KeyStore

    try:
        with KeyStore(s3_key_store_path(data)) as store:
            keys = store.list()
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    rows = [s3_key_info(key) for key in keys]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        typer.echo(
            f"{row['access_key']}  {row['created']}  {row['publisher'][:16]}…  {row['name']}"
        )


def s3_key_delete(
    access_key: Annotated[str, typer.Argument(help="the access key to delete")],
    data: DataOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Delete an S3 access key: requests signed with it are refused from now on (what was
    published with it stays).

    Example: difs s3-key delete DIFSABCDEFGHIJKLMNOP
    """
    from difs_p2p.s3keys import KeyStore

    try:
        with KeyStore(s3_key_store_path(data)) as store:
            if not store.delete(access_key):
                raise errors.NotFoundError(f"no S3 key {access_key}")
    except errors.DifsError as exc:
        raise fail(exc, as_json) from None
    if as_json:
        print_json({"deleted": access_key})
        return
    typer.echo(f"deleted {access_key}")


def s3_key_info(key: S3Key) -> dict[str, str]:
    """What ``difs s3-key`` shows of a key (never the secret)."""
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(key.created))
    return {
        "access_key": key.access_key,
        "name": key.name,
        "publisher": key.publisher,
        "created": created,
    }
