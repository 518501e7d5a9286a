"""Signed manifests built, parsed, tampered with and forged, and the order of competing
records (the DHT policy's view is in test_recordpolicy.py, supersession and admission in
test_lineage.py)."""

from __future__ import annotations

import json

import blake3
import pytest

from difs_p2p.delegation import build_delegation
from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.identity import Identity
from difs_p2p.manifest import Lineage, build_manifest, choose_records, parse_manifest
from difs_p2p.names import name_key
from difs_p2p.records import canonical_json
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.signed import (
    DELETE,
    KEY,
    NAME,
    OWNER,
    STRANGER,
    V1,
    V2,
    WRITER,
    make,
    reencode,
    setter,
)


def test_a_remembered_parse_checks_the_key_and_the_bytes_each_time() -> None:
    """Parsing the same manifest again gives the same result; another key or a changed
    byte is refused even after the valid parse was remembered."""
    m = build_manifest(
        Identity.generate(),
        name="/a/b",
        version=1,
        parent=None,
        root=None,
        size=10,
        segment_size=4096,
        segment_count=1,
        stripes=1,
        replicas=3,
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        created=1.0,
    )
    key = name_key("/a/b")
    assert parse_manifest(m.raw, key) == parse_manifest(m.raw, key) == m
    assert parse_manifest(m.raw) == m
    for _ in range(2):
        with pytest.raises(IntegrityError, match="wrong key"):
            parse_manifest(m.raw, name_key("/a/c"))
        with pytest.raises(IntegrityError, match="bad signature"):
            parse_manifest(m.raw.replace(b'"size":10', b'"size":11'), key)
        with pytest.raises(WireError):
            parse_manifest(m.raw + b" ", key)


# -- signing and verifying ------------------------------------------------------------------------


def test_a_built_manifest_parses_to_itself() -> None:
    """Build signs canonical JSON; parsing it gives every field back and the record hash."""
    assert V2.raw == canonical_json(json.loads(V2.raw))
    assert parse_manifest(V2.raw, KEY) == V2
    assert (V2.name, V2.key, V2.version, V2.size, V2.segment_count) == (NAME, KEY, 2, 10_000, 3)
    assert (V2.parent, V2.root, V2.lineage_root) == (V1.hash, V1.hash, V1.hash)
    assert (V1.parent, V1.root, V1.lineage_root) == (None, None, V1.hash)
    assert V2.hash == blake3.blake3(V2.raw).hexdigest()
    assert V2.publisher == V2.owner == OWNER.public_key and V2.delegation is None
    assert V2.info()["integrity"] == "22" * 32
    assert V2.lineage == Lineage(OWNER.public_key, V1.hash, 2, V2.hash)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("info.version", 3),
        ("info.size", 12_000),
        ("info.replicas", 1),
        ("info.integrity", "99" * 32),
        ("info.created", 2.0),
        ("info.parent", "00" * 32),
        ("info.root", "00" * 32),
        ("publisher", STRANGER.public_key.hex()),
        ("sig", "00" * 64),
    ],
)
def test_any_tampered_field_breaks_the_signature(path: str, value: object) -> None:
    """A signed field changed after signing (the rest still well formed) is an IntegrityError."""
    with pytest.raises(IntegrityError, match="bad signature"):
        parse_manifest(reencode(V2.raw, setter(path, value)), KEY)


def test_a_renamed_manifest_is_refused() -> None:
    """Another name with the old key, or with its own key but the old signature, is refused."""
    with pytest.raises(IntegrityError, match="name and key do not match"):
        parse_manifest(reencode(V1.raw, setter("info.name", "/a.com/y")))
    renamed = reencode(
        reencode(V1.raw, setter("info.name", "/a.com/y")),
        setter("info.key", name_key("/a.com/y").hex()),
    )
    with pytest.raises(IntegrityError, match="bad signature"):
        parse_manifest(renamed, name_key("/a.com/y"))


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"not json", ""),
        (b'{"info": NaN}', ""),
        (b"[]", "t"),
        (reencode(V1.raw, setter("t", "difs-other")), "t"),
        (reencode(V1.raw, setter("v", 2)), "v"),
        (reencode(V1.raw, setter("info", [])), "info"),
        (reencode(V1.raw, setter("publisher", "00")), "publisher"),
        (reencode(V1.raw, setter("sig", "XY" * 64)), "publisher"),
        (reencode(V1.raw, setter("info.size", DELETE)), "info"),
        (reencode(V1.raw, setter("info.extra", 1)), "info"),
        (reencode(V1.raw, setter("extra", 1)), "info"),
        (reencode(V1.raw, setter("info.name", 7)), "info.name"),
        (reencode(V1.raw, setter("info.name", "no-slash")), "info.name"),
        (reencode(V1.raw, setter("info.size", -1)), "info.size"),
        (reencode(V1.raw, setter("info.replicas", True)), "info.replicas"),
        (reencode(V1.raw, setter("info.version", 0)), "info"),
        (reencode(V1.raw, setter("info.hash", "sha256")), "info"),
        (reencode(V1.raw, setter("info.deleted", 0)), "info"),
        (reencode(V2.raw, setter("info.parent", "zz" * 32)), "info.parent"),
        (reencode(V1.raw, setter("info.parent", "00" * 32)), "info"),
        (reencode(V2.raw, setter("info.root", None)), "info"),
        (reencode(V1.raw, setter("info.integrity", "00")), "info.integrity"),
        (reencode(V1.raw, setter("info.created", -1)), "info.created"),
        (reencode(V1.raw, setter("info.created", 1e12)), "info.created"),
        (reencode(V1.raw, setter("info.created", False)), "info.created"),
        (reencode(V1.raw, setter("info.segment_count", 2)), "info"),
        (reencode(V1.raw, setter("info.segment_size", 0)), "info"),
        (reencode(V1.raw, setter("info.stripes", 4)), "info"),
        (reencode(V1.raw, setter("info.deleted", True)), "info.deleted"),
        (V1.raw.replace(b'"v":1', b'"v": 1'), ""),
        (V1.raw + b" " * 4096, ""),
    ],
)
def test_malformed_manifests_are_wire_errors(raw: bytes, field: str) -> None:
    """Every shape rule refuses with a WireError naming the field, before any signature check."""
    with pytest.raises(WireError) as caught:
        parse_manifest(raw)
    assert caught.value.field == field


def test_choose_records_orders_forks_and_owners() -> None:
    """Within an owner, equal versions go by more peers then smaller bytes; owners follow
    one another, and repeated records add their votes."""
    fork_a = make(version=2, parent=V1, integrity=IntegrityRoot(SegmentId(b"\xaa" * 32)))
    fork_b = make(version=2, parent=V1, integrity=IntegrityRoot(SegmentId(b"\xbb" * 32)))
    small, large = sorted([fork_a, fork_b], key=lambda m: m.raw)
    assert choose_records([(large, 2), (small, 1)]) == [large, small]
    assert choose_records([(large, 1), (small, 1)]) == [small, large]
    assert choose_records([(small, 1), (large, 1), (small, 1)])[0] == small
    stranger = make(STRANGER, version=7, parent=V1)
    assert choose_records([(stranger, 1), (V1, 2), (V2, 1)]) == [V2, V1, stranger]
    assert choose_records([]) == []


# -- the /key/ namespace ------------------------------------------------------------------------


def test_key_namespace_names_belong_to_their_key() -> None:
    """Under /key/<fingerprint>/ only that key (or its delegate) may sign."""
    mine = f"/key/{OWNER.fingerprint}/photo.jpg"
    assert make(name=mine).owner == OWNER.public_key
    with pytest.raises(IntegrityError, match="belongs to key"):
        make(STRANGER, name=mine)
    grant = build_delegation(OWNER, prefix=mine, writer=WRITER.public_key, expires=100.0)
    assert make(WRITER, name=mine, delegation=grant).owner == OWNER.public_key
