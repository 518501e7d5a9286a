"""What a reader decides from a resolve reply (resolution.py), without sockets."""

from __future__ import annotations

from pathlib import Path

import pytest

from difs_p2p.errors import PeerError, PermissionDeniedError
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest
from difs_p2p.opcodec import ResolveReply
from difs_p2p.pins import Pins
from difs_p2p.resolution import (
    check_node,
    decode_resolved,
    lineage,
    pinned_choice,
    version_entries,
)
from tests.signed import KEY, OWNER, STRANGER, V1, V2, WRITER, holder, make

# the same name signed by another key
OTHER = make(STRANGER)


def test_decode_resolved_keeps_what_verifies_for_the_key() -> None:
    """Manifests and history that parse for the key, entries that decode and name it;
    the rest is dropped without an error."""
    entry = holder()
    elsewhere = holder(key=type(KEY)(b"\x09" * 20))
    reply = ResolveReply(
        (V2.raw.decode(), "not json", V1.raw.decode()),
        (V1.raw.decode(), "{}"),
        (entry.raw.hex(), "zz", elsewhere.raw.hex(), "00"),
    )
    assert decode_resolved(KEY, reply) == ([V2, V1], [V1], [entry])


@pytest.mark.parametrize(
    ("pinned", "records", "history", "chosen"),
    [
        (None, [V2, OTHER], [], V2),  # nothing pinned: the entry peer's first, pinned now
        (OWNER, [OTHER, V2], [], V2),  # the pinned owner's record, not the first
        (OWNER, [OTHER], [V1], V1),  # else its newest history manifest
        (STRANGER, [V2, OTHER], [], OTHER),
    ],
)
def test_pinned_choice(
    tmp_path: Path,
    pinned: Identity | None,
    records: list[Manifest],
    history: list[Manifest],
    chosen: Manifest,
) -> None:
    """The pinned owner's newest record, or the entry peer's first choice when nothing is
    pinned (which pins its owner)."""
    pins = Pins(tmp_path / "pins.json")
    if pinned is not None:
        pins.pin(V1.name, pinned.public_key)
    assert pinned_choice(pins, V1.name, records, history) == chosen
    assert pins.pinned(V1.name) is not None


def test_pinned_owner_without_records_is_refused(tmp_path: Path) -> None:
    """A name pinned to a key that signed nothing found: PermissionDeniedError naming
    --trust."""
    pins = Pins(tmp_path / "pins.json")
    pins.pin(V1.name, WRITER.public_key)
    with pytest.raises(PermissionDeniedError, match="--trust"):
        pinned_choice(pins, V1.name, [V2], [V1])


@pytest.mark.parametrize(
    ("best", "manifests", "history", "versions"),
    [
        (V2, [V2], [V1], [V1, V2]),
        (V2, [V2, OTHER], [V1, OTHER], [V1, V2]),  # another owner's lineage: not ours
        (V1, [V2], [V1], [V1]),  # nothing newer than the chosen record
    ],
)
def test_lineage(
    best: Manifest, manifests: list[Manifest], history: list[Manifest], versions: list[Manifest]
) -> None:
    """The chosen record's own lineage, oldest first."""
    assert lineage(best, manifests, history) == versions


def test_version_entries_and_check_node() -> None:
    """Entries of the version's integrity root only; a HELLO must name their signer."""
    entry = holder()
    assert version_entries([entry], V2) == [entry] and version_entries([entry], V1) == []
    address = (entry.host, entry.port)
    check_node(address, entry.node_id.hex().upper(), [entry])
    for node, problem in [(None, "did not say"), ("ab" * 20, "not the holder")]:
        with pytest.raises(PeerError, match=problem):
            check_node(address, node, [entry])
