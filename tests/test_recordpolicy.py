"""The DHT's record policy for manifests and holder entries: what may replace a stored record,
how records rank, and which entries are admitted."""

from __future__ import annotations

import pytest

from difs_p2p.names import name_key
from difs_p2p.recordpolicy import CLOCK_SKEW, RecordValidator
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.signed import KEY, STRANGER, V1, V2, holder, make, reencode, setter

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
