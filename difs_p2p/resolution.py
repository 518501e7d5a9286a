"""What a reader decides from an entry peer's ``resolve`` reply, apart from the I/O that
brings it: which manifests and holder entries count, which record (pinned owner or the
entry peer's choice), the version's lineage, the version fetched, its holder entries, and
whether the node at a holder's address is the one that signed them. Pure.

The asyncio client (:mod:`difs_p2p.client`, :mod:`difs_p2p.fetch`) and the synchronous
quick path of a small ``difs get`` (:mod:`difs_p2p.quickget`) both call these, so the two
cannot decide differently.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from difs_p2p.errors import (
    DeletedError,
    DifsError,
    NotFoundError,
    PeerError,
    PermissionDeniedError,
    UsageError,
)
from difs_p2p.holders import HolderEntry, decode_holder_entry
from difs_p2p.manifest import Manifest, linked, parse_manifest
from difs_p2p.names import NameKey

if TYPE_CHECKING:
    from difs_p2p.opcodec import ResolveReply
    from difs_p2p.pins import Pins

__all__ = [
    "Found",
    "check_node",
    "choose_version",
    "decode_resolved",
    "lineage",
    "pinned_choice",
    "version_entries",
]

# manifests (verified, best first), history manifests (verified), holder entries (decoded,
# signatures not checked yet)
Found = tuple[list[Manifest], list[Manifest], list[HolderEntry]]


def decode_resolved(key: NameKey, reply: ResolveReply) -> Found:
    """The manifests and history of ``reply`` that parse and verify for ``key``; its
    holder entries that decode and name ``key`` (signatures checked when first used)."""
    manifests, history, holders = [], [], []
    for raw in reply.manifests:
        with contextlib.suppress(DifsError, TypeError):
            manifests.append(parse_manifest(raw.encode(), key))
    for raw in reply.history:
        with contextlib.suppress(DifsError, TypeError):
            history.append(parse_manifest(raw.encode(), key))
    for raw in reply.holders:
        with contextlib.suppress(DifsError, TypeError, ValueError):
            entry = decode_holder_entry(bytes.fromhex(raw))
            if entry.key == key:
                holders.append(entry)
    return manifests, history, holders


def pinned_choice(
    pins: Pins | None, name: str, records: list[Manifest], history: list[Manifest]
) -> Manifest:
    """The record to use: the entry peer's first choice, or the pinned owner's newest
    record (else its newest history manifest) when ``name`` is pinned; pins the owner on
    first sight (``pins`` saves it). PermissionDeniedError when the pinned owner has none."""
    best = records[0]
    if pins is None:
        return best
    pin = pins.pinned(name)
    if pin is None:
        pins.pin(name, best.owner)
        return best
    prefix, key = pin
    mine = [m for m in records if m.owner == key] or [m for m in history if m.owner == key]
    if mine:
        return max(mine, key=lambda m: m.version)
    raise PermissionDeniedError(
        f"{name} is now signed by key {best.owner.hex()}, but {prefix} is pinned to "
        f"{key.hex()}; pass --trust {best.owner.hex()} to accept the new key"
    )


def lineage(best: Manifest, manifests: list[Manifest], history: list[Manifest]) -> list[Manifest]:
    """``best`` and the versions of its owner's lineage among ``manifests`` and
    ``history`` (``manifest.linked``), oldest first, one per version number."""
    versions = {m.version: m for m in [*history, *manifests] if linked(m, best)}
    versions[best.version] = best
    return sorted(versions.values(), key=lambda m: m.version)


def choose_version(newest: Manifest, history: list[Manifest], version: int | None) -> Manifest:
    """The manifest a fetch reads: ``newest``, or ``version`` of the name's ``history``;
    UsageError, NotFoundError, or DeletedError if that version is a tombstone."""
    manifest = newest
    if version is not None:
        if version < 1:
            raise UsageError(f"version {version}: versions start at 1")
        match = [m for m in history if m.version == version]
        if not match:
            raise NotFoundError(f"{newest.name} has no version {version}")
        manifest = match[0]
    if manifest.deleted:
        raise DeletedError(f"{manifest.name} was deleted (version {manifest.version})")
    return manifest


def version_entries(entries: Iterable[HolderEntry], manifest: Manifest) -> list[HolderEntry]:
    """The holder entries of ``manifest``'s version (same version and integrity root)."""
    integrity = manifest.integrity
    return [h for h in entries if h.version == manifest.version and h.integrity == integrity]


def check_node(address: tuple[str, int], node: str | None, entries: Iterable[HolderEntry]) -> None:
    """PeerError unless ``node`` (the node id, hex, a HELLO answer from ``address`` says;
    None: it said none) is the signer of one of ``entries`` (that address's entries)."""
    where = f"{address[0]}:{address[1]}"
    if node is None:
        raise PeerError(f"{where} did not say its node id")
    if node.lower() not in {h.node_id.hex() for h in entries}:
        raise PeerError(f"{where} is node {node[:16]}, not the holder its entries name")
