"""Node-ID work: keys ground to a difficulty, and a weak stored key replaced."""

from __future__ import annotations

from pathlib import Path

from difs_p2p.identity import Identity
from difs_p2p.idwork import has_work, load_or_create_with_work, work_bits


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
