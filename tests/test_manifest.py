"""Manifest parsing: remembered results never stand in for other bytes or another key."""

from __future__ import annotations

import pytest

from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest, parse_manifest
from difs_p2p.names import name_key


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
        integrity="00" * 32,
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
