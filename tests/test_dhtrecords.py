"""The DHT's record helpers: entry-set digests, the page plan, entry batches and the union
of lookup paths (no I/O), and how long a write waits for its peers' replies."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p.config import DhtConfig
from difs_p2p.dhtrecords import Stored, entry_batches, entry_set_digest, page_plan, union
from difs_p2p.dhtwire import ENTRY_BATCH_BYTES
from difs_p2p.identity import NodeId
from difs_p2p.lookup import MorePages
from difs_p2p.routing import Contact
from tests.helpers import start_dhts, stop_all


@given(st.lists(st.binary(min_size=1, max_size=40), max_size=20), st.randoms())
def test_entry_set_digest_depends_on_the_set_not_its_order(
    entries: list[bytes], rng: random.Random
) -> None:
    """The digest of an entry set is the same in any order; another set has another."""
    shuffled = list(entries)
    rng.shuffle(shuffled)
    assert entry_set_digest(shuffled) == entry_set_digest(entries)
    assert entry_set_digest([*entries, b"\x00" * 41]) != entry_set_digest(entries)
    # lengths are part of the digest: moving a byte between entries changes it
    assert entry_set_digest([b"ab", b"c"]) != entry_set_digest([b"a", b"bc"])


def test_page_plan_reads_one_peer_per_entry_set() -> None:
    """Peers without a digest are read whole; one group per other digest; ours is skipped."""

    def more(i: int, digest: bytes | None) -> MorePages:
        return MorePages(Contact(NodeId(bytes([i]) * 20), "127.0.0.1", 1000 + i), 5, digest, [])

    ours, other, third = b"o" * 16, b"x" * 16, b"t" * 16
    peers = [more(0, other), more(1, None), more(2, ours), more(3, other), more(4, third)]
    whole, groups = page_plan(peers, ours)
    assert whole == [peers[1]]
    assert groups == [[peers[0], peers[3]], [peers[4]]]


B = ENTRY_BATCH_BYTES


@pytest.mark.parametrize(
    ("sizes", "first", "batches"),
    [
        ([], B, [[]]),
        ([10, 20], B, [[10, 20]]),
        ([B // 2, B // 2, 1], B, [[B // 2, B // 2], [1]]),  # a full batch, then the rest
        ([B + 5, 3], B, [[B + 5], [3]]),  # an entry larger than a batch goes alone
        ([10], 0, [[], [10]]),  # no room beside the record: the first batch is empty
        ([10, 10, 10], 15, [[10], [10, 10]]),  # the first batch holds at most `first`
    ],
)
def test_entry_batches_cut_entries_in_order_to_request_size(
    sizes: list[int], first: int, batches: list[list[int]]
) -> None:
    """Entries go into batches in order, the first within ``first`` bytes, the others
    within ENTRY_BATCH_BYTES (one oversized entry alone)."""
    entries = [bytes([i]) * size for i, size in enumerate(sizes)]
    got = entry_batches(entries, first)
    assert [[len(e) for e in batch] for batch in got] == batches
    assert [e for batch in got for e in batch] == entries


def test_union_lists_each_contact_once_closest_first() -> None:
    """Contacts found on several paths appear once, ordered by XOR distance to the key."""
    key = bytes(20)

    def contact(i: int, port: int = 1000) -> Contact:
        return Contact(NodeId(i.to_bytes(20, "big")), "127.0.0.1", port)

    paths = [[contact(5), contact(1)], [contact(3), contact(5, 2000)], []]
    assert union(paths, key) == [contact(1), contact(3), contact(5)]
    assert union([], key) == []


@pytest.mark.parametrize(
    ("readable_paths", "quorum", "readable"),
    [(2, 2, True), (3, 2, True), (1, 2, False), (0, 0, True)],
)
def test_a_write_is_readable_at_a_quorum_of_paths(
    readable_paths: int, quorum: int, readable: bool
) -> None:
    """Stored.readable holds when as many disjoint paths served it back as the quorum."""
    assert Stored(3, 0, 0, 3, readable_paths, quorum).readable is readable


# -- how long a write waits for its peers' replies (a started node, no peers needed) ----------


async def _reply_after(delay: float, ok: bool) -> tuple[bool, object]:
    """A request whose reply arrives after ``delay`` seconds (``ok``: it was answered)."""
    await asyncio.sleep(delay)
    return (ok, b"reply" if ok else None)


async def test_a_write_waits_for_the_first_reply_past_the_stall_time() -> None:
    """When every peer answers later than the stall time (a loaded machine), the replies
    are still counted: the stall cuts only stragglers after a first reply."""
    config = DhtConfig(id_difficulty=0, rpc_timeout=5.0, lookup_stall=0.05, lookup_stall_min=0.05)
    [node] = await start_dhts(1, config=config)
    try:
        replies = await node.records._answers([_reply_after(0.3, True) for _ in range(3)])
        assert replies == [(True, b"reply")] * 3
    finally:
        await stop_all([node])


async def test_a_write_cuts_stragglers_a_stall_time_after_a_reply() -> None:
    """After a first reply, a request unanswered a stall time later counts as unanswered
    (a dead peer costs a write the stall time, not the RPC timeout)."""
    config = DhtConfig(id_difficulty=0, rpc_timeout=5.0, lookup_stall=0.05, lookup_stall_min=0.05)
    [node] = await start_dhts(1, config=config)
    try:
        replies = await node.records._answers([_reply_after(0.01, True), _reply_after(3.0, True)])
        assert replies == [(True, b"reply"), (False, None)]
    finally:
        await stop_all([node])
