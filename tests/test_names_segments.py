"""Name rules and segment layout: pure functions checked against brute force."""

from __future__ import annotations

import contextlib
import hashlib

import blake3
import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p import segments
from difs_p2p.errors import BadNameError, IntegrityError, WireError
from difs_p2p.names import name_key, normalize_name


@pytest.mark.parametrize(
    ("name", "rule"),
    [
        ("a.com/x", "must start with '/'"),
        ("/", "at least one component"),
        ("/a//b", "empty component"),
        ("/a/./b", "not allowed"),
        ("/a/../b", "not allowed"),
        ("/a/\x00b", "control character"),
        ("/a/b\nc", "control character"),
        ("/" + "x" * 256, "over 255 bytes"),
        ("/x" * 65, "more than 64 components"),
    ],
)
def test_bad_names_say_which_rule(name: str, rule: str) -> None:
    """Each bad name is refused with a message naming the rule it breaks."""
    with pytest.raises(BadNameError, match=rule.replace(".", r"\.").replace("(", r"\(")):
        normalize_name(name)


def test_normal_form_and_key() -> None:
    """NFC and a trailing slash do not change the key; the key is our SHA-256 derivation."""
    assert normalize_name("/a.com/izone.mp4/") == "/a.com/izone.mp4"
    assert name_key("/caf\u00e9") == name_key("/cafe\u0301")
    expected = hashlib.sha256(b"difs-name-v1\x00/a.com/izone.mp4").digest()[:20]
    assert name_key("/a.com/izone.mp4") == expected
    assert normalize_name("/日本/ファイル.mp4") == "/日本/ファイル.mp4"


@given(st.text(max_size=80))
def test_any_text_normalizes_or_is_a_bad_name(text: str) -> None:
    """Any text either normalizes (idempotently) or raises BadNameError, nothing else."""
    try:
        norm = normalize_name(text)
    except BadNameError:
        return
    assert normalize_name(norm) == norm


@pytest.mark.parametrize(
    ("size", "count"), [(0, 0), (1, 1), (4096, 1), (8192, 2), (12288, 3), (4097, 2)]
)
def test_layout_edges(size: int, count: int) -> None:
    """Empty objects have no segments; exact multiples have no empty trailing segment."""
    layout = segments.Layout(size, 4096)
    assert layout.count == count
    assert sum(layout.bounds(i)[1] for i in range(count)) == size


@given(st.integers(0, 5000), st.integers(1, 70))
def test_stripes_cover_every_segment_once(count: int, stripes: int) -> None:
    ranges = segments.stripe_ranges(count, stripes)
    covered = [i for a, b in ranges for i in range(a, b + 1)]
    assert covered == list(range(count))
    assert len(ranges) <= stripes
    if ranges:
        lengths = [b - a + 1 for a, b in ranges]
        assert max(lengths) - min(lengths) <= 1


@given(st.integers(1, 100_000), st.data())
def test_segments_for_bytes_matches_brute_force(size: int, data: st.DataObject) -> None:
    layout = segments.Layout(size, 4096)
    lo = data.draw(st.integers(0, size - 1))
    hi = data.draw(st.integers(lo, size - 1))
    brute = [
        i for i in range(layout.count) if layout.bounds(i)[0] <= hi and lo < sum(layout.bounds(i))
    ]
    assert list(layout.segments_for_bytes(lo, hi)) == brute


def test_hash_list_detects_any_flipped_bit() -> None:
    """The integrity root catches a change anywhere in the hash list or a segment."""
    data = [b"abc", b"def"]
    hashes = [segments.segment_hash(d) for d in data]
    hl = segments.encode_hash_list(hashes)
    root = segments.hash_list_root(hl)
    assert (
        root
        == blake3.blake3(blake3.blake3(b"abc").digest() + blake3.blake3(b"def").digest()).digest()
    )
    assert segments.verify_hash_list(hl, root, 2) == hashes
    for bit in range(len(hl) * 8):
        flipped = bytearray(hl)
        flipped[bit // 8] ^= 1 << (bit % 8)
        with pytest.raises(IntegrityError):
            segments.verify_hash_list(bytes(flipped), root, 2)
    with pytest.raises(IntegrityError):
        segments.verify_segment(hashes[0], b"abd")


@given(st.binary(max_size=200), st.integers(0, 10))
def test_decode_hash_list_only_raises_wire_error(data: bytes, count: int) -> None:
    """Random bytes decode or raise WireError (never IndexError and the like)."""
    with contextlib.suppress(WireError):
        assert len(segments.decode_hash_list(data, count)) == count


def test_key_namespace_names_need_a_fingerprint() -> None:
    """/key/<32 hex>/<name> is self-certifying; anything else under /key/ is refused."""
    from difs_p2p.names import key_namespace_owner

    fp = "0123456789abcdef" * 2
    assert key_namespace_owner(f"/key/{fp}/photo.jpg") == fp
    assert key_namespace_owner("/a.com/photo.jpg") is None
    for bad in ("/key/abc/x", f"/key/{fp}", f"/key/{fp.upper()}/x"):
        with pytest.raises(BadNameError, match="fingerprint"):
            normalize_name(bad)
