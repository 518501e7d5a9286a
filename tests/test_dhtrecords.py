"""The DHT's record helpers that decide without I/O: entry-set digests and the page plan."""

from __future__ import annotations

import random

from hypothesis import given
from hypothesis import strategies as st

from difs_p2p.dhtrecords import entry_set_digest, page_plan
from difs_p2p.lookup import MorePages
from difs_p2p.routing import Contact


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
        return MorePages(Contact(bytes([i]) * 20, "127.0.0.1", 1000 + i), 5, digest, [])

    ours, other, third = b"o" * 16, b"x" * 16, b"t" * 16
    peers = [more(0, other), more(1, None), more(2, ours), more(3, other), more(4, third)]
    whole, groups = page_plan(peers, ours)
    assert whole == [peers[1]]
    assert groups == [[peers[0], peers[3]], [peers[4]]]
