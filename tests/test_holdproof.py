"""Proofs of holding: the challenger's decisions without I/O, and what a reply or a
segment proves."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

from difs_p2p import classgen, segments
from difs_p2p.client import Client
from difs_p2p.config import ProofConfig
from difs_p2p.holders import HolderEntry, build_holder_entry, decode_holder_entry
from difs_p2p.holdproof import HolderProver
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest, build_manifest
from difs_p2p.names import name_key
from difs_p2p.ops import ProveManyReply, RangeRequest
from difs_p2p.peer import Peer
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.helpers import client_for, peer_config, start_peers, stop_all, wait_for

SEG = 64 << 10


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


# -- batched challenges ----------------------------------------------------------------------

NONCE = bytes(range(32))
KEY_A, KEY_B = name_key("/a"), name_key("/b")


def _items() -> tuple[RangeRequest, ...]:
    return (RangeRequest(KEY_A, 1, 0, 3), RangeRequest(KEY_B, 2, 5, 5))


@pytest.mark.parametrize(
    ("holds", "signer", "signed_holds", "signed_nonce", "expected"),
    [
        ((True, True), "holder", (True, True), NONCE, ["", ""]),
        ((True, False), "holder", (True, False), NONCE, ["", "not held"]),
        ((False, False), None, None, None, ["not held", "not held"]),
        # a signature over other answers, another nonce or by another key proves nothing
        ((True, True), "holder", (True, False), NONCE, ["bad sig", "bad sig"]),
        ((True, True), "holder", (True, True), bytes(32), ["bad sig", "bad sig"]),
        ((True, True), "other", (True, True), NONCE, ["bad sig", "bad sig"]),
        ((True,), "holder", (True,), NONCE, ["short", "short"]),
    ],
)
def test_a_prove_many_reply_proves_each_item_under_one_signature(
    holds: tuple[bool, ...],
    signer: str | None,
    signed_holds: tuple[bool, ...] | None,
    signed_nonce: bytes | None,
    expected: list[str],
) -> None:
    """Each item is proven by its answer under the holder's one signature over the nonce,
    every item and every answer; a signature over anything else fails every item."""
    from difs_p2p.holdproof import NOT_HELD, check_prove_many_reply, prove_many_message

    holder, other = HOLDER, Identity.generate()
    items = _items()
    sig = None
    if signer is not None and signed_holds is not None and signed_nonce is not None:
        signed_items = items[: len(signed_holds)]
        key = holder if signer == "holder" else other
        sig = key.sign(prove_many_message(signed_nonce, signed_items, signed_holds))
    whys = check_prove_many_reply(holder.public_key, NONCE, items, ProveManyReply(holds, sig))
    names = {"": "", NOT_HELD: "not held"}
    got = [
        names.get(w, "bad sig" if "signature" in w else "short" if "every item" in w else w)
        for w in whys
    ]
    assert got == expected


HOLDER = Identity.generate()


def test_pending_bounds_count_per_key_and_signer_and_new_connections_are_paced() -> None:
    """want() refuses beyond the per-signer bound until claims settle or drop, and the
    connection budget lets a burst of ``rate`` through, then one per 1/rate seconds."""
    import random

    from difs_p2p.config import ProofConfig
    from difs_p2p.holdproof import Claim, ConnectBudget, ProofBook

    book = ProofBook(ProofConfig(max_pending_per_signer=2, max_pending_per_key=3))
    rng = random.Random(1)
    claims = [Claim(b"s" * 32, "127.0.0.1", 1, name_key(f"/{i}"), 1) for i in range(3)]
    for c in claims[:2]:
        assert book.want(c, 0.0) is True
        book.challenge(c, [(0, 0)], rng, bytes(32))
    assert book.want(claims[2], 0.0) is None, "two pending for this signer"
    book.drop(claims[0])
    assert book.want(claims[2], 0.0) is True
    book.settle(claims[1], True, 0.0)
    assert not book.pending and not book.per_signer and not book.per_key, "counts follow"
    assert book.want(claims[1], 1.0) is False, "proven"
    budget = ConnectBudget(rate=4.0)
    assert [budget.delay(0.0) for _ in range(4)] == [0.0] * 4
    assert budget.delay(0.0) == pytest.approx(0.25)
    assert budget.delay(0.0) == pytest.approx(0.5), "each one more waits its turn"
    assert budget.delay(10.0) == 0.0, "refilled, up to one second's worth"


async def _publish_one(peers: list[Peer], tmp_path: Path, name: str) -> tuple[Manifest, Peer]:
    """Publish a 3-segment object with one copy; its manifest and its holder."""
    src = tmp_path / name.strip("/")
    src.write_bytes(os.urandom(3 * SEG))
    async with client_for(peers[0], publisher=Identity.generate()) as client:
        await client.put(src, name, segment_size=SEG, replicas=1)
    m = (await Client(peers[1].address).resolve(name)).manifest
    return m, next(p for p in peers if p.replicator.holdings.of_key(m.key))


def _provers(peers: list[Peer]) -> list[HolderProver]:
    return [p.prover for p in peers if p.prover is not None]


async def _settled(peers: list[Peer]) -> None:
    await wait_for(lambda: all(not pr.book.pending for pr in _provers(peers)), 30)


def _listed(peer: Peer, key: bytes) -> list[HolderEntry]:
    assert peer.dht is not None
    return [
        decode_holder_entry(e) for e in peer.dht.store.entries(key, time.time()) if e[:1] != b"{"
    ]


async def test_a_false_claim_batched_with_true_ones_is_dropped(tmp_path: Path) -> None:
    """A holder's true claim and a false one (the same key and address, a name it does not
    hold) go in one prove_many: the false entry is dropped, the true one stays."""
    peers = await start_peers(tmp_path / "net", 4, proof=ProofConfig(gather=1.0))
    try:
        a, holder = await _publish_one(peers, tmp_path, "/a")
        for i in range(20):
            b, other = await _publish_one(peers, tmp_path, f"/b{i}")
            if other is not holder:
                break
        assert other is not holder
        sender = next(p for p in peers if p is not holder)
        listing = [p for p in peers if p is not holder and p is not sender]
        await _settled(peers)
        assert holder.identity is not None and sender.dht is not None
        true = next(e for e in _listed(sender, a.key) if e.public_key == holder.identity.public_key)
        false = build_holder_entry(
            holder.identity,
            key=b.key,
            version=b.version,
            integrity=b.integrity,
            start=0,
            end=b.segment_count - 1,
            host=true.host,
            port=true.port,
            issued=int(time.time()),
        )
        before = [(p.prover.stats.batches, p.prover.stats.challenges) for p in listing if p.prover]
        for pr in _provers(peers):
            pr.book.proven.clear()  # as if the proofs had aged out
        await sender.dht.add_entries(a.key, [true.raw])
        assert await sender.dht.add_entries(b.key, [false.raw]) >= len(listing), "admitted"
        key = holder.identity.public_key
        await wait_for(
            lambda: all(all(e.public_key != key for e in _listed(p, b.key)) for p in listing), 30
        )
        await _settled(peers)
        for p, (batches, challenges) in zip(listing, before, strict=True):
            assert p.prover is not None
            assert true.raw in [e.raw for e in _listed(p, a.key)], "the true claim stays"
            assert p.prover.stats.challenges - challenges == 2
            assert p.prover.stats.batches - batches == 1, "both claims in one prove_many"
    finally:
        await stop_all(peers)


async def test_a_holder_without_prove_many_is_asked_with_prove(tmp_path: Path) -> None:
    """Peers that answer "unknown operation" to prove_many (as older peers do) still prove
    their claims, with one prove each on the same connection, and are remembered as such."""
    peers = await start_peers(tmp_path / "net", 3)
    try:
        for p in peers:
            assert p.service is not None
            p.service.controls.pop("prove_many")
        await _publish_one(peers, tmp_path, "/old")
        await _settled(peers)
        provers = _provers(peers)
        assert sum(pr.stats.proven for pr in provers) >= 1
        assert sum(pr.stats.failed for pr in provers) == 0
        assert sum(pr.stats.batches for pr in provers) == 0
        assert any(pr.book.old_style for pr in provers)
    finally:
        await stop_all(peers)


async def test_a_kept_connection_survives_a_holder_restart(tmp_path: Path) -> None:
    """After the holder restarts on its address, the kept connection fails and one new
    connection proves the claim again: nothing counts as failed."""
    peers = await start_peers(tmp_path / "net", 4)
    try:
        m, holder = await _publish_one(peers, tmp_path, "/kept")
        await _settled(peers)
        sender = next(p for p in peers if p is not holder)
        listing = [p for p in peers if p is not holder and p is not sender]
        assert holder.identity is not None and sender.dht is not None
        entries = [
            e.raw for e in _listed(sender, m.key) if e.public_key == holder.identity.public_key
        ]
        assert entries
        i = peers.index(holder)
        await holder.stop()
        peers[i] = restarted = Peer(
            peer_config(holder.data_dir, port=holder.port, bootstrap=(sender.address,))
        )
        await restarted.start()
        stats = [classgen.replace(p.prover.stats) for p in listing if p.prover is not None]
        for pr in _provers(peers):
            pr.book.proven.clear()
        await sender.dht.add_entries(m.key, entries)
        await wait_for(
            lambda: all(
                p.prover is not None and p.prover.stats.proven > s.proven
                for p, s in zip(listing, stats, strict=True)
            ),
            30,
        )
        for p, s in zip(listing, stats, strict=True):
            assert p.prover is not None
            assert p.prover.stats.failed == s.failed
            assert p.prover.stats.reused > s.reused, "the kept connection was tried"
            assert p.prover.stats.connections > s.connections, "then a new one"
    finally:
        await stop_all(peers)


async def test_a_flood_of_claims_from_one_stranger_is_bounded(tmp_path: Path) -> None:
    """200 claims signed by one stranger's key for one address: 64 are challenged in one
    prove_many on one connection, the rest are skipped, and the failed signer is then
    refused at that address."""
    peers = await start_peers(tmp_path / "net", 2)
    try:
        prover = peers[1].prover
        assert prover is not None
        stranger = Identity.generate()
        host, port = peers[0].address
        entries = [
            build_holder_entry(
                stranger,
                key=name_key(f"/flood/{i}"),
                version=1,
                integrity=IntegrityRoot(SegmentId(bytes(32))),
                start=0,
                end=0,
                host=host,
                port=port,
                issued=int(time.time()),
            )
            for i in range(200)
        ]
        before = classgen.replace(prover.stats)
        for e in entries:
            prover.admitted(e.key, e.raw)
        cap = prover.book.config.max_pending_per_signer
        assert len(prover.book.pending) == cap
        assert prover.stats.skipped - before.skipped == len(entries) - cap
        await _settled(peers)
        assert prover.stats.connections - before.connections <= 1
        assert prover.stats.batches - before.batches == 1
        assert prover.stats.failed - before.failed == cap
        assert not prover.admit(entries[-1].key, entries[-1].raw), "refused from now on"
        assert peers[1].status()["proofs"]["batches"] == prover.stats.batches, "in status"
    finally:
        await stop_all(peers)


@pytest.mark.parametrize(
    ("items", "error"),
    [
        ([], "1 to 64"),
        ([["00" * 20, 1, 0, 0]] * 65, "1 to 64"),
        ([["00" * 20, 1, 5, 4]], "before start"),
        ([["00" * 20, 1, 0]], "[key, version, start, end]"),
        ("items", "1 to 64"),
    ],
)
def test_a_prove_many_request_is_checked_before_any_work(items: object, error: str) -> None:
    """A prove_many from a stranger with no items, too many, a backward range or a short
    item is refused by the request check (the serving peer does no lookup)."""
    from difs_p2p.errors import UsageError
    from difs_p2p.ops import OPS

    with pytest.raises(UsageError, match=re.escape(error)):
        OPS["prove_many"].check({"items": items, "nonce": "00" * 32})
