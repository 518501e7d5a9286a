"""Deterministic keys, manifests and holder entries shared by the record tests."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from difs_p2p.delegation import Delegation
from difs_p2p.holders import HolderEntry, build_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest, build_manifest
from difs_p2p.names import NameKey, name_key
from difs_p2p.records import canonical_json
from difs_p2p.segments import IntegrityRoot, SegmentId

OWNER = Identity.from_seed(b"\x01" * 32)
STRANGER = Identity.from_seed(b"\x02" * 32)
WRITER = Identity.from_seed(b"\x03" * 32)
NAME = "/a.com/x"
KEY = name_key(NAME)


ROOT = IntegrityRoot(SegmentId(b"\x11" * 32))


def make(
    signer: Identity = OWNER,
    *,
    name: str = NAME,
    version: int = 1,
    parent: Manifest | None = None,
    size: int = 10_000,
    integrity: IntegrityRoot = ROOT,
    delegation: Delegation | None = None,
    created: float = 1.0,
) -> Manifest:
    count = -(-size // 4096)
    return build_manifest(
        signer,
        name=name,
        version=version,
        parent=parent.hash if parent else None,
        root=parent.lineage_root if parent else None,
        size=size,
        segment_size=4096,
        segment_count=count,
        stripes=1 if count else 0,
        replicas=3,
        integrity=integrity,
        created=created,
        delegation=delegation,
    )


V1 = make()
V2 = make(version=2, parent=V1, integrity=IntegrityRoot(SegmentId(b"\x22" * 32)))


def reencode(raw: bytes, change: Callable[[dict[str, Any]], None]) -> bytes:
    """The canonical bytes of a manifest after ``change`` edited its JSON (signature kept)."""
    obj = json.loads(raw)
    change(obj)
    return canonical_json(obj)


def setter(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A change that sets ``obj[a][b]`` for path ``"a.b"`` (or deletes it for DELETE)."""

    def change(obj: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for part in parents:
            obj = obj[part]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value

    return change


DELETE = object()


def holder(
    signer: Identity = WRITER, *, key: NameKey = KEY, start: int = 0, issued: int = 1000
) -> HolderEntry:
    return build_holder_entry(
        signer,
        key=key,
        version=2,
        integrity=IntegrityRoot(SegmentId(b"\x22" * 32)),
        start=start,
        end=start + 3,
        host="10.0.0.7",
        port=4000,
        issued=issued,
    )
