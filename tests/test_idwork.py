"""Node-ID work: the puzzle's bits, keys ground to a difficulty, a weak stored key replaced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from difs_p2p.identity import Identity, NodeId
from difs_p2p.idwork import (
    WORK_DOMAIN,
    generate_with_work,
    has_work,
    load_or_create_with_work,
    work_bits,
)


def test_peer_key_is_ground_and_a_weak_key_replaced(tmp_path: Path) -> None:
    """A peer key is made with the node-ID work and kept; a key without it is moved
    aside to peer.key.weak and replaced by one with it."""
    path = tmp_path / "peer.key"
    first = load_or_create_with_work(path, 8)
    assert work_bits(first.node_id) >= 8
    assert load_or_create_with_work(path, 8).node_id == first.node_id
    weak = Identity.generate()
    while has_work(weak.node_id, 10):
        weak = Identity.generate()
    text = weak.private_key.private_bytes_raw().hex() + "\n"
    path.write_text(text)
    new = load_or_create_with_work(path, 10)
    assert has_work(new.node_id, 10) and new.node_id != weak.node_id
    assert path.with_name("peer.key.weak").read_text() == text


def test_work_bits_count_the_leading_zero_bits_of_the_domain_hash() -> None:
    """work_bits is the number of leading zero bits of SHA-256(domain || node id)."""
    for i in range(64):
        node_id = NodeId(bytes([i]) * 20)
        digest = hashlib.sha256(WORK_DOMAIN + node_id).digest()
        as_bits = "".join(f"{byte:08b}" for byte in digest)
        zeros = len(as_bits) - len(as_bits.lstrip("0"))
        assert work_bits(node_id) == zeros


@pytest.mark.parametrize(
    ("bits", "needed", "ok"),
    [
        (5, 0, True),  # no difficulty: every id
        (5, -3, True),
        (5, 5, True),  # exactly enough
        (5, 6, False),
        (0, 1, False),
    ],
)
def test_has_work_compares_the_bits_with_the_difficulty(bits: int, needed: int, ok: bool) -> None:
    """An id has the work at difficulty d if d <= 0 or its work bits reach d."""
    node_id = next(
        NodeId(bytes([a, b]) * 10)
        for a in range(256)
        for b in range(256)
        if work_bits(NodeId(bytes([a, b]) * 10)) == bits
    )
    assert has_work(node_id, needed) is ok


@pytest.mark.parametrize("bits", [0, 1, 4, 8])
def test_generated_keys_have_the_work_asked_for(bits: int) -> None:
    """generate_with_work returns a key whose node id reaches the difficulty."""
    assert work_bits(generate_with_work(bits).node_id) >= bits
