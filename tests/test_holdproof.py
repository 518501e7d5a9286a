"""Proofs of holding: the challenger's decisions without I/O, and what a reply or a
segment proves."""

from __future__ import annotations

import os

from difs_p2p import segments
from difs_p2p.identity import Identity
from difs_p2p.manifest import build_manifest
from difs_p2p.names import name_key
from difs_p2p.segments import IntegrityRoot, SegmentId


def test_proof_decisions_what_to_challenge_sampling_and_what_a_reply_proves() -> None:
    """A new claim is challenged once (then remembered as proven or failed, in bounded
    caches), about segment_share of challenges read a segment, and only the entry key's
    signature over the nonce and range, or the right segment, proves anything."""
    import random

    from difs_p2p.config import ProofConfig
    from difs_p2p.holders import build_holder_entry
    from difs_p2p.holdproof import (
        NOT_HELD,
        Claim,
        ProofBook,
        check_prove_reply,
        check_segment,
        prove_message,
    )

    holder, other = Identity.generate(), Identity.generate()
    key = name_key("/proof")
    entry = build_holder_entry(
        holder,
        key=key,
        version=3,
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        start=0,
        end=9,
        host="127.0.0.1",
        port=4000,
        issued=0,
    )
    claim = Claim.of(entry)
    book = ProofBook(ProofConfig(segment_share=0.1, remembered=2, max_pending_per_key=2))
    rng = random.Random(7)
    assert book.want(claim, 0.0) is True
    c = book.challenge(claim, [(0, 9)], rng, bytes(32))
    assert book.want(claim, 0.0) is False, "one challenge per claim at a time"
    book.settle(claim, True, 0.0)
    assert book.want(claim, 1.0) is False, "a proven claim is not asked again"
    assert book.want(claim, 3601.0) is True, "until its proof is an hour old"
    assert not book.refused(entry, 1.0)
    book.settle(claim, False, 10.0)
    assert book.refused(entry, 11.0) and not book.refused(entry, 611.0)
    # bounds: pending per key, and caches of `remembered` claims
    others = [Claim(bytes([i]) * 32, "127.0.0.1", 5000 + i, key, 3) for i in range(3)]
    for o in others[:2]:
        assert book.want(o, 0.0) is True
        book.challenge(o, [(0, 0)], rng, bytes(32))
    assert book.want(others[2], 0.0) is None, "too many pending for this key"
    for o in others[:2]:
        book.settle(o, False, 0.0)
    assert len(book.failed) == 2
    # sampling: about a tenth of the challenges read a segment, inside the range
    picks = [book.challenge(claim, [(2, 5)], rng, bytes(32)).segment for _ in range(2000)]
    sampled = [s for s in picks if s is not None]
    assert 120 <= len(sampled) <= 280 and all(2 <= s <= 5 for s in sampled)
    # what a reply proves
    nonce = os.urandom(32)
    c = type(c)(claim, 0, 9, nonce, None)
    good = holder.sign(prove_message(nonce, key, 3, 0, 9)).hex()
    assert check_prove_reply(c, {"holds": True, "sig": good}) == ""
    assert check_prove_reply(c, {"holds": False}) == NOT_HELD
    # a holder that says it no longer holds one range (a stale entry of it was announced
    # again) is neither proven nor refused: only that range's entries go
    stale = Claim(b"s" * 32, "127.0.0.1", 6000, key, 3)
    book.challenge(stale, [(0, 0)], rng, bytes(32))
    book.settle_not_held(stale)
    assert stale not in book.pending and stale not in book.proven
    assert (stale.signer, stale.host, stale.port) not in book.failed
    assert check_prove_reply(c, {"holds": True, "sig": other.sign(b"x").hex()}) != ""
    wrong_range = holder.sign(prove_message(nonce, key, 3, 0, 8)).hex()
    assert check_prove_reply(c, {"holds": True, "sig": wrong_range}) != ""
    replayed = holder.sign(prove_message(bytes(32), key, 3, 0, 9)).hex()
    assert check_prove_reply(c, {"holds": True, "sig": replayed}) != ""
    assert check_prove_reply(c, ["holds"]) != "" and check_prove_reply(c, {"holds": 1}) != ""
    # a segment is checked against the hash list and the manifest's integrity root
    blocks = [os.urandom(100) for _ in range(3)]
    ids = [segments.segment_hash(b) for b in blocks]
    hash_list = segments.encode_hash_list(ids)
    manifest = build_manifest(
        holder,
        name="/proof",
        version=1,
        parent=None,
        root=None,
        size=300,
        segment_size=100,
        segment_count=3,
        stripes=1,
        replicas=1,
        integrity=segments.hash_list_root(hash_list),
        created=0.0,
    )
    assert check_segment(manifest, hash_list, 1, blocks[1]) == ""
    assert check_segment(manifest, hash_list, 1, blocks[2]) != ""
    assert check_segment(manifest, hash_list, 3, blocks[2]) != ""
    forged = segments.encode_hash_list([ids[0], ids[0], ids[0]])
    assert check_segment(manifest, forged, 0, blocks[0]) != ""
