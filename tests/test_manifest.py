"""Signed records: manifests and holder entries built, parsed, tampered with and forged, and
the DHT policy's view of them (supersession and admission are in test_lineage.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import blake3
import pytest

from difs_p2p.delegation import Delegation, build_delegation, parse_delegation
from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.holders import (
    HOLDER_SIZE,
    HolderEntry,
    build_holder_entry,
    decode_holder_entry,
    parse_holder_entry,
    verify_holder_entry,
)
from difs_p2p.identity import Identity
from difs_p2p.manifest import Lineage, Manifest, build_manifest, choose_records, parse_manifest
from difs_p2p.names import NameKey, name_key
from difs_p2p.recordpolicy import CLOCK_SKEW, RecordValidator
from difs_p2p.records import canonical_json
from difs_p2p.segments import IntegrityRoot, SegmentId


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


# -- fixtures: deterministic keys and records -----------------------------------------------------

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


# -- records under the DHT's policy: stale and forged ---------------------------------------------


FORGED = make(STRANGER, version=5, parent=V2)  # a stranger's copy of the owner's links


@pytest.mark.parametrize(
    ("new", "current", "allowed"),
    [
        (V2.raw, V1.raw, True),  # the owner's next version
        (V1.raw, V2.raw, False),  # a stale version replayed
        (V2.raw, V2.raw, False),  # not newer
        (
            make(version=2, parent=V1, integrity=IntegrityRoot(SegmentId(b"\x99" * 32))).raw,
            V2.raw,
            False,
        ),  # a fork
        (FORGED.raw, V2.raw, False),  # forged by a stranger, whatever its version
        (V2.raw, b"damaged", True),  # a damaged stored record gives way
    ],
)
def test_what_may_replace_a_stored_record(new: bytes, current: bytes, allowed: bool) -> None:
    """Only the same owner's strictly newer version replaces a valid stored record."""
    assert RecordValidator().may_replace(KEY, new, current, 0.0) is allowed


@pytest.mark.parametrize(
    ("key", "value", "rank"),
    [
        (KEY, V2.raw, (2,)),
        (name_key("/a.com/y"), V2.raw, None),  # under another name's key
        (KEY, reencode(V2.raw, setter("info.replicas", 1)), None),  # a bad signature
        (KEY, b"junk", None),
    ],
)
def test_record_rank_is_the_version_of_a_valid_record(
    key: bytes, value: bytes, rank: tuple[int, ...] | None
) -> None:
    """A record ranks by its version only if it is a valid manifest of that key."""
    assert RecordValidator().record_rank(key, value, 0.0) == rank


def test_best_records_drops_invalid_values_and_counts_repeats() -> None:
    """Each answering peer's value counts once; invalid values are left out."""
    other = make(STRANGER, version=9, parent=V1)
    best = RecordValidator().best_records(
        KEY, [other.raw, V2.raw, b"junk", V2.raw, V1.raw, other.raw], 0.0
    )
    assert best == [V2.raw, V1.raw, other.raw]  # 3 votes for the owner, 2 for the stranger


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


# -- delegations and the /key/ namespace ----------------------------------------------------------


def test_a_delegate_publishes_for_the_owner_within_its_grant() -> None:
    """A writer with a valid delegation publishes as the owner; outside it, it is refused."""
    grant = build_delegation(OWNER, prefix="/a.com", writer=WRITER.public_key, expires=100.0)
    m = make(WRITER, version=3, parent=V2, delegation=grant, created=50.0)
    assert (m.owner, m.publisher, m.delegation) == (OWNER.public_key, WRITER.public_key, grant)
    assert grant.covers("/a.com") and grant.covers("/a.com/x") and not grant.covers("/a.company")
    with pytest.raises(IntegrityError, match="expired"):
        make(WRITER, version=3, parent=V2, delegation=grant, created=101.0)
    with pytest.raises(IntegrityError, match="does not cover"):
        make(WRITER, name="/b.com/x", delegation=grant)
    with pytest.raises(IntegrityError, match="another writer"):
        make(STRANGER, delegation=grant)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (setter("t", "other"), WireError),
        (setter("owner", "00"), WireError),
        (setter("expires", "soon"), WireError),
        (setter("expires", -1), WireError),
        (setter("expires", True), WireError),
        (setter("prefix", 7), WireError),
        (setter("prefix", "a.com"), WireError),
        (setter("prefix", "/a.com/"), WireError),
        (setter("extra", 1), WireError),
        (setter("prefix", "/b.com"), IntegrityError),
        (setter("expires", 1e9), IntegrityError),
        (setter("writer", STRANGER.public_key.hex()), IntegrityError),
    ],
)
def test_malformed_or_tampered_delegations_are_refused(
    change: Callable[[dict[str, Any]], None], error: type[Exception]
) -> None:
    """A delegation must be well formed (WireError) and signed by its owner (IntegrityError)."""
    grant = build_delegation(OWNER, prefix="/a.com", writer=WRITER.public_key, expires=100.0)
    obj = grant.as_json()
    change(obj)
    with pytest.raises(error):
        parse_delegation(obj)


def test_key_namespace_names_belong_to_their_key() -> None:
    """Under /key/<fingerprint>/ only that key (or its delegate) may sign."""
    mine = f"/key/{OWNER.fingerprint}/photo.jpg"
    assert make(name=mine).owner == OWNER.public_key
    with pytest.raises(IntegrityError, match="belongs to key"):
        make(STRANGER, name=mine)
    grant = build_delegation(OWNER, prefix=mine, writer=WRITER.public_key, expires=100.0)
    assert make(WRITER, name=mine, delegation=grant).owner == OWNER.public_key


# -- holder entries -------------------------------------------------------------------------------


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


def test_a_holder_entry_round_trips() -> None:
    """A built entry is 179 bytes and parses back to the same fields."""
    h = holder()
    assert len(h.raw) == HOLDER_SIZE == 179
    assert parse_holder_entry(h.raw) == h
    assert (h.key, h.version, h.start, h.end, h.host, h.port, h.issued) == (
        KEY,
        2,
        0,
        3,
        "10.0.0.7",
        4000,
        1000,
    )
    assert h.public_key == WRITER.public_key
    assert h.identity == holder(issued=2000).identity != holder(start=4).identity


@pytest.mark.parametrize(
    ("offset", "replacement", "field"),
    [
        (0, b"\x02", "kind"),  # not a holder entry
        (61, (9).to_bytes(4, "big"), "range"),  # start 9 > end 3
        (73, b"\x00\x00", "range"),  # port 0
        (21, bytes(8), "range"),  # version 0
    ],
)
def test_malformed_holder_entries_are_wire_errors(
    offset: int, replacement: bytes, field: str
) -> None:
    """Bad kind, range, port or version are WireErrors naming the field."""
    raw = bytearray(holder().raw)
    raw[offset : offset + len(replacement)] = replacement
    with pytest.raises(WireError) as caught:
        decode_holder_entry(bytes(raw))
    assert caught.value.field == field


@pytest.mark.parametrize("size", [0, HOLDER_SIZE - 1, HOLDER_SIZE + 1])
def test_a_holder_entry_of_the_wrong_size_is_a_wire_error(size: int) -> None:
    """An entry is exactly HOLDER_SIZE bytes."""
    with pytest.raises(WireError, match="holder entry of"):
        decode_holder_entry(holder().raw[:size].ljust(size, b"\x00"))


@pytest.mark.parametrize("offset", [1, 21, 29, 64, 69, 73, 75, 83, 115, 178])
def test_a_tampered_holder_entry_fails_verification(offset: int) -> None:
    """Decoding alone does not check the signature; verifying catches any changed byte."""
    raw = bytearray(holder().raw)
    raw[offset] ^= 0x01
    entry = decode_holder_entry(bytes(raw))  # still well formed
    with pytest.raises(IntegrityError):
        verify_holder_entry(entry)
    with pytest.raises(IntegrityError):
        parse_holder_entry(bytes(raw))


@pytest.mark.parametrize(
    ("entry", "key", "valid"),
    [
        (holder(issued=1000).raw, KEY, True),
        (holder(issued=1000 + int(CLOCK_SKEW)).raw, KEY, True),  # at the skew limit
        (holder(issued=1001 + int(CLOCK_SKEW)).raw, KEY, False),  # from the future
        (holder(key=name_key("/a.com/y")).raw, KEY, False),  # another name's entry
        (holder().raw[:-1] + b"\x00", KEY, False),  # a forged signature
        (V1.raw, KEY, True),  # history
        (V1.raw, name_key("/a.com/y"), False),
        (b"", KEY, False),  # neither kind
        (b"\x02" + holder().raw[1:], KEY, False),  # another kind byte
        (b'{"t":"difs-manifest"}', KEY, False),  # JSON, not a manifest
    ],
)
def test_entry_identity_refuses_future_foreign_and_forged_entries(
    entry: bytes, key: bytes, valid: bool
) -> None:
    """The policy gives an identity only to a valid entry of this key, not issued too late."""
    assert (RecordValidator().entry_identity(key, entry, 1000.0) is not None) is valid


@pytest.mark.parametrize(
    "entry",
    [b"", b"\x01", b"\x02" + holder().raw[1:], b'{"t":"difs-manifest"}', b"[]"],
)
def test_entry_admission_refuses_a_value_of_neither_kind_or_malformed(entry: bytes) -> None:
    """With a record stored, an entry that is no valid manifest or holder entry is refused."""
    assert RecordValidator().entry_admission(KEY, entry, V1.raw, [], 1000.0) == "invalid entry"
