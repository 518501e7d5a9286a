"""The client's view of a resolved name without sockets: which holder entries serve which
version, and which of them are signed (the client's calls run end to end in
test_content.py, test_client_io.py, test_repair.py and test_cli.py)."""

from __future__ import annotations

from difs_p2p.client import Resolved
from difs_p2p.holders import build_holder_entry, decode_holder_entry
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.signed import KEY, V1, V2, WRITER, holder


def test_resolved_entries_are_matched_to_a_version_and_checked_when_used() -> None:
    """entries_for keeps the entries of a manifest's version and content; holders and
    holders_for keep only those whose signature verifies."""
    good = holder()  # version 2 with V2's integrity
    later = holder(start=4)
    raw = bytearray(holder(start=8).raw)
    raw[-1] ^= 0x01  # the signature no longer verifies; the entry still decodes
    forged = decode_holder_entry(bytes(raw))
    other_content = build_holder_entry(
        WRITER,
        key=KEY,
        version=2,
        integrity=IntegrityRoot(SegmentId(b"\x33" * 32)),  # version 2, but not V2's content
        start=0,
        end=3,
        host="10.0.0.7",
        port=4000,
        issued=1000,
    )
    resolved = Resolved(V2, [V1, V2], [good, forged, later, other_content], top=2)
    assert resolved.entries_for(V2) == [good, forged, later]
    assert resolved.holders_for(V2) == [good, later]
    assert resolved.entries_for(V1) == []  # version 1: no entries
    assert resolved.holders == [good, later, other_content]
