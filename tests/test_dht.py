"""The DHT adapter: lookups, records, and the fixes to the stock library's behaviour."""

from __future__ import annotations

import asyncio
import functools
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import umsgpack
from kademlia.node import Node

from difs_p2p import classgen, dhtwire
from difs_p2p.config import DhtConfig
from difs_p2p.dht import IDENTIFY_DOMAIN, Dht
from difs_p2p.dhtrecords import entry_set_digest
from difs_p2p.identity import Identity, NodeId
from difs_p2p.idwork import generate_with_work, has_work
from difs_p2p.lookup import LookupResult, MorePages
from difs_p2p.recordstore import AcceptAll
from tests.helpers import FAST_DHT, new_dht, start_dhts, stop_all, wait_for


class RefuseAll(AcceptAll):
    """A policy under which no record is valid."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        return None


# Silent peers cost a 0.1 s stall; waiting for their 30 s RPC timeout would overrun the
# tests' 10 s deadlines. No liveness pings evict them meanwhile.
SILENT_COSTS_STALL = DhtConfig(
    id_difficulty=0,
    rpc_timeout=30.0,
    lookup_stall=0.1,
    lookup_stall_min=0.1,
    liveness_interval=3600,
)


async def test_thirty_peers_find_each_other() -> None:
    """30 peers bootstrapped from one seed each find every other peer's ID by lookup."""
    nodes = await start_dhts(30)
    try:
        for node in nodes:
            for other in nodes:
                if other is node:
                    continue
                found = await node.lookup(other.node_id)
                assert found.closest and found.closest[0].node_id == other.node_id
    finally:
        await stop_all(nodes)


async def test_last_round_asks_the_remaining_closest_at_once() -> None:
    """Once nothing closer turns up, a lookup asks all remaining k closest in parallel.

    With alpha requests at a time to the end (the loop before), asking k peers took k/alpha
    round trips; the result must still be the exact k closest.
    """
    config = DhtConfig(
        id_difficulty=0,
        ksize=8,
        rpc_timeout=2.0,
        lookup_stall=2.0,
        lookup_stall_min=2.0,
        liveness_interval=3600,
    )
    nodes = await start_dhts(24, config=config)
    try:
        for node in nodes[:4]:
            key = os.urandom(20)
            found = await node.lookup(key)
            assert found.peak_in_flight > config.alpha
            truth = sorted(
                (n for n in nodes if n is not node),
                key=lambda n: int.from_bytes(n.node_id, "big") ^ int.from_bytes(key, "big"),
            )[: config.ksize]
            assert [c.node_id for c in found.closest] == [n.node_id for n in truth]
    finally:
        await stop_all(nodes)


async def test_put_and_get_from_every_node() -> None:
    """A record put through one node is got, by key, through every other."""
    nodes = await start_dhts(12)
    try:
        key = os.urandom(20)
        accepted = await nodes[3].put(key, b"\x01value")
        assert accepted >= 11
        for node in nodes:
            assert (await node.get(key))[0] == b"\x01value"
    finally:
        await stop_all(nodes)


async def test_get_returns_newest_and_repairs_stale_peers() -> None:
    """get() asks all k closest and prefers the best value, not the first or the local one."""
    nodes = await start_dhts(10)
    try:
        key = os.urandom(20)
        await nodes[0].put(key, b"\x01old")
        stale = nodes[5]
        await nodes[1].put(key, b"\x02new")
        stale.store._db.execute("UPDATE records SET v=? WHERE k=?", (b"\x01old", key))
        assert stale.store.get(key, stale.clock()) == b"\x01old"
        assert (await stale.get(key))[0] == b"\x02new"
        await wait_for(lambda: stale.store.get(key, stale.clock()) == b"\x02new")
    finally:
        await stop_all(nodes)


async def test_find_neighbors_returns_contacts_when_near_buckets_are_empty() -> None:
    """The stock traverser returns [] after two empty buckets; ours returns the contacts."""
    nodes = await start_dhts(2)
    try:
        a, b = nodes
        router = a.protocol.router  # type: ignore[union-attr]
        # Split until b sits alone in a far bucket and the target's buckets are empty.
        target = bytes(x ^ 0xFF for x in b.node_id)
        for _ in range(3):
            router.split_bucket(len(router.buckets) - 1)
        assert a.neighbors(target, 5)[0].node_id == b.node_id
    finally:
        await stop_all(nodes)


async def test_simultaneous_join_fills_far_buckets() -> None:
    """40 peers joining at once through one seed all learn both halves of the ID space."""
    nodes = await start_dhts(40, concurrent=True)
    try:
        for node in nodes:
            halves = {c.node_id[0] >> 7 for c in node.contacts()}
            others = {n.node_id[0] >> 7 for n in nodes if n is not node}
            assert halves == others, "a peer knows only its own half of the ID space"
        key_misses = 0
        for _ in range(20):
            key = os.urandom(20)
            await nodes[1].put(key, b"\x01v")
            got = await nodes[-1].get(key)
            key_misses += not got
        assert key_misses == 0
    finally:
        await stop_all(nodes)


async def test_one_lost_reply_does_not_evict() -> None:
    """A contact is evicted after evict_after_failures missed replies, not after one."""
    config = DhtConfig(
        id_difficulty=0, rpc_timeout=0.2, evict_after_failures=3, liveness_interval=3600
    )
    nodes = await start_dhts(3, config=config)
    try:
        a, b = nodes[0], nodes[1]
        proto = a.protocol
        assert proto is not None
        node_b = next(n for n in proto.router.all_contacts() if n.id == b.node_id)
        b.transport.close()  # type: ignore[union-attr]  # b goes silent, no goodbye
        for expected_present in (True, True, False):
            ok, _ = await proto.call_ping(node_b)
            assert not ok
            present = b.node_id in {c.node_id for c in a.contacts()}
            assert present is expected_present
    finally:
        await stop_all(nodes)


async def test_dead_contacts_cost_a_lookup_the_stall_time_not_the_rpc_timeout() -> None:
    """Unanswered requests free their slot after lookup_stall, and the lookup ends.

    The stock loop (and ours before) waited rpc_timeout for every dead contact among the
    k closest, so under churn most lookups took the full timeout.
    """
    nodes = await start_dhts(8, config=SILENT_COSTS_STALL)
    try:
        dead = nodes[5:]
        for node in dead:
            node.transport.close()  # type: ignore[union-attr]  # silent, no goodbye
        asker = nodes[0]
        assert {d.node_id for d in dead} <= {c.node_id for c in asker.contacts()}
        # A lookup that waited for any of the three would hit the 30 s test timeout.
        async with asyncio.timeout(10):
            found = await asyncio.gather(*(asker.lookup(d.node_id) for d in dead))
        for d, result in zip(dead, found, strict=True):
            assert result.stalled >= 1
            assert d.node_id not in {c.node_id for c in result.closest}
            assert {c.node_id for c in result.closest} == {n.node_id for n in nodes[1:5]}
        assert asker.stats["stalled"] >= 3
    finally:
        await stop_all(nodes)


async def test_a_dead_peer_among_the_closest_costs_a_write_the_stall_time() -> None:
    """put_with_entries to k closest of which some died since the lookup returns once the
    live ones answered and the stall time passed, counting the dead as refused; the live
    ones hold the record and the entries."""
    nodes = await start_dhts(8, config=SILENT_COSTS_STALL)
    try:
        writer, key = nodes[0], os.urandom(20)
        await writer.lookup(key, "find_node")  # remembered for the write (closest_reuse)
        dead = nodes[5:]
        for node in dead:
            node.transport.close()  # type: ignore[union-attr]  # silent, no goodbye
        # Waiting for the dead peers' replies would hit the 30 s RPC timeout.
        async with asyncio.timeout(10):
            stored = await writer.put_with_entries(key, b"\x01x", [b"\x02entry"])
        assert stored.refused == len(dead)
        live = nodes[1:5]
        assert stored.accepted >= len(live)
        for node in live:
            assert node.store.get(key, node.clock()) == b"\x01x"
            assert node.store.entries(key, node.clock()) == [b"\x02entry"]
    finally:
        await stop_all(nodes)


async def test_closest_fills_up_with_known_contacts_that_were_late() -> None:
    """closest() lists the peers that answered first, then known contacts that did not
    answer in time (a slow peer on a loaded machine is still worth a transfer attempt)."""
    nodes = await start_dhts(6, config=SILENT_COSTS_STALL)
    try:
        asker, silent = nodes[0], nodes[5]
        silent.transport.close()  # type: ignore[union-attr]
        key = os.urandom(20)
        async with asyncio.timeout(10):
            answered = (await asker.lookup(key, "find_node")).closest
            got = await asker.closest(key, len(nodes))
        assert silent.node_id not in {c.node_id for c in answered}
        ids = [c.node_id for c in got]
        assert ids[-1] == silent.node_id
        assert set(ids) == {n.node_id for n in nodes}
        assert len(await asker.closest(key, 3)) == 3
    finally:
        await stop_all(nodes)


async def test_put_counts_acceptances_not_answers() -> None:
    """put() returns 0 when every peer answered but refused (stock set() says True)."""
    nodes = await start_dhts(5, policy=RefuseAll())
    try:
        assert await nodes[2].put(os.urandom(20), b"\x01x") == 0
    finally:
        await stop_all(nodes)


async def test_put_with_dead_closest_peers_does_not_raise() -> None:
    """put() survives the closest peers dying during the lookup (stock raises ValueError)."""
    nodes = await start_dhts(6)
    try:
        for node in nodes[1:]:
            node.transport.close()  # type: ignore[union-attr]
        assert await nodes[0].put(os.urandom(20), b"\x01x") == 1  # only the local copy
    finally:
        await stop_all(nodes)


async def test_garbage_datagrams_do_not_hurt_a_peer() -> None:
    """Garbage, truncated, oversized and ill-typed datagrams are dropped; the peer serves on."""
    nodes = await start_dhts(4)
    try:
        victim = nodes[0]
        before = {c.node_id for c in victim.contacts()}
        good = b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [victim.node_id]])
        junk = [
            b"",
            b"\x00",
            os.urandom(10),
            os.urandom(200),
            b"\x00" + os.urandom(20) + b"\xc1",
            good[:-5],
            b"\x00" + os.urandom(20) + umsgpack.packb({"x": 1}),
            b"\x00" + os.urandom(20) + umsgpack.packb(["ping", [b"short"]]),
            b"\x00" + os.urandom(20) + umsgpack.packb(["ping", 5]),
            b"\x00" + os.urandom(20) + umsgpack.packb(["store", [os.urandom(20), 1, 2]]),
            b"\x00" + os.urandom(20) + b"\x91" * 8000,
            b"\x00" + os.urandom(20) + umsgpack.packb(["nope", []]),
            b"\x01" + os.urandom(20) + umsgpack.packb(["abc", 1]),
            b"\x00" + os.urandom(20) + os.urandom(60_000),
        ]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for datagram in junk * 20:
                sock.sendto(datagram, victim.me.address)
        finally:
            sock.close()
        await wait_for(lambda: victim.protocol.dropped >= len(junk) * 10)  # type: ignore[union-attr]
        assert await nodes[1].ping(victim.me.address) == victim.node_id
        assert {c.node_id for c in victim.contacts()} >= before
        assert (await victim.lookup(nodes[3].node_id)).closest[0].node_id == nodes[3].node_id
    finally:
        await stop_all(nodes)


async def test_malformed_replies_do_not_raise_on_the_caller() -> None:
    """A hostile peer answering every request with junk cannot make lookups or gets raise."""
    nodes = await start_dhts(5)
    evil = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    evil.bind(("127.0.0.1", 0))
    evil.setblocking(False)
    evil_key = Identity.generate()  # a hostile peer with a real key proves its ID...
    evil_id = evil_key.node_id
    stop = asyncio.Event()

    async def answer_with_junk() -> None:
        loop = asyncio.get_running_loop()
        replies = [
            ["abc", 1],
            {"x": 1},
            {"value": [1, 2]},
            42,
            [[b"x", "1.2.3.4", 1]],
            {"entries": [], "next": -1, "nodes": [], "value": 5},
        ]
        i = 0
        while not stop.is_set():
            try:
                data, addr = await asyncio.wait_for(loop.sock_recvfrom(evil, 9000), 0.1)
            except TimeoutError:
                continue
            if data[:1] == b"\x00":
                body = umsgpack.unpackb(data[21:])
                if body[0] == "identify":  # ...and then answers everything else with junk
                    nonce = body[1][1]
                    proof = evil_key.sign(IDENTIFY_DOMAIN + nonce + evil_id)
                    reply: object = [evil_key.public_key, proof]
                else:
                    reply = evil_id if body[0] == "ping" else replies[i % len(replies)]
                i += 1
                await loop.sock_sendto(evil, b"\x01" + data[1:21] + umsgpack.packb(reply), addr)

    task = asyncio.create_task(answer_with_junk())
    try:
        client = nodes[0]
        assert await client.ping(evil.getsockname()) == evil_id
        key = os.urandom(20)
        await nodes[1].put(key, b"\x01ok")
        for _ in range(6):
            assert (await client.get(key))[0] == b"\x01ok"
            assert (await client.resolve(key))[0][0] == b"\x01ok"
            await client.lookup(os.urandom(20))
        await client.bootstrap([evil.getsockname()])
    finally:
        stop.set()
        await task
        evil.close()
        await stop_all(nodes)


async def test_rpc_timeout_and_receive_buffer_come_from_config() -> None:
    """The RPC timeout is configurable (stock: 5 s) and the receive buffer is enlarged."""
    config = DhtConfig(id_difficulty=0, rpc_timeout=0.3)
    node = Dht(NodeId(os.urandom(20)), AcceptAll(), config)
    await node.start("127.0.0.1", 0)
    try:
        dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        dead.bind(("127.0.0.1", 0))
        async with asyncio.timeout(3):
            assert await node.ping(dead.getsockname()) is None
        dead.close()
        sock = node.transport.get_extra_info("socket")  # type: ignore[union-attr]
        rmem_max = int(await asyncio.to_thread(Path("/proc/sys/net/core/rmem_max").read_text))
        expected = min(config.recv_buffer, rmem_max)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) >= expected
    finally:
        await node.stop()


async def test_newcomer_closest_to_a_key_receives_the_record() -> None:
    """A peer that joins next to a key is handed the record (stock hashes the key twice)."""
    nodes = await start_dhts(8)
    newcomer = new_dht(AcceptAll())  # IDs come from keys, so pick the key next to the peer
    key = newcomer.node_id[:19] + bytes([newcomer.node_id[19] ^ 1])
    await nodes[2].put(key, b"\x01handed")
    await newcomer.start("127.0.0.1", 0)
    try:
        await newcomer.bootstrap([nodes[0].me.address])
        await wait_for(lambda: newcomer.store.get(key, newcomer.clock()) == b"\x01handed")
    finally:
        await stop_all([*nodes, newcomer])


async def test_entries_merge_and_page() -> None:
    """Entries from many adders under one key are merged and read back across pages."""
    nodes = await start_dhts(6)
    try:
        key = os.urandom(20)
        entries = [os.urandom(8) + os.urandom(300) for _ in range(60)]  # ~18 KB: 3+ pages
        for i, node in enumerate(nodes):
            await node.add_entries(key, entries[i * 10 : (i + 1) * 10])
        got = await nodes[0].get_entries(key)
        assert set(got) == set(entries)
    finally:
        await stop_all(nodes)


async def test_resolve_reads_records_and_entries_in_one_lookup() -> None:
    """resolve() = get() + get_entries() with one request to each of the k closest peers."""
    nodes = await start_dhts(8)
    try:
        key = os.urandom(20)
        entries = [os.urandom(8) + os.urandom(100) for _ in range(5)]
        await nodes[1].put(key, b"\x02newest")
        await nodes[2].add_entries(key, entries)
        reader = nodes[5]
        lookups, rpcs = reader.stats["lookups"], reader.stats["rpcs"]
        records, got = await reader.resolve(key)
        assert records[0] == b"\x02newest"
        assert set(got) == set(entries)
        assert reader.stats["lookups"] == lookups + 1
        assert reader.stats["rpcs"] - rpcs <= len(nodes) - 1
    finally:
        await stop_all(nodes)


async def test_resolve_pages_entries_after_a_large_record() -> None:
    """A record that fills the reply pushes the entries to further pages; none is lost."""
    nodes = await start_dhts(5)
    try:
        key = os.urandom(20)
        value = b"\x01" + os.urandom(7500)
        entries = [os.urandom(8) + os.urandom(300) for _ in range(40)]
        await nodes[0].put(key, value)
        await nodes[1].add_entries(key, entries)
        records, got = await nodes[3].resolve(key)
        assert records == [value]
        assert set(got) == set(entries)
    finally:
        await stop_all(nodes)


def _count_page_requests(node: Dht, counts: Counter[bytes]) -> None:
    """Count the find_entries requests for a further page (offset > 0) that ``node`` gets."""
    proto = node.protocol
    assert proto is not None
    plain = proto._dispatch

    def counting(name: str, sender: Node, args: list[object]) -> object:
        if name == "find_entries" and len(args) > 1 and args[1] != 0:
            counts[node.node_id] += 1
        return plain(name, sender, args)

    proto._dispatch = counting  # type: ignore[method-assign]


async def test_further_pages_come_from_one_peer_per_entry_set() -> None:
    """Peers holding the same entries are not all read page by page: a reader that holds
    the set reads no further pages, one that does not reads them from one peer."""
    nodes = await start_dhts(6)
    try:
        key = os.urandom(20)
        entries = [os.urandom(8) + os.urandom(300) for _ in range(60)]  # ~18 KB: 3+ pages
        await nodes[0].add_entries(key, entries)
        assert all(len(n.store.entries(key, n.clock())) == 60 for n in nodes)
        counts: Counter[bytes] = Counter()
        for node in nodes:
            _count_page_requests(node, counts)
        reader = nodes[5]
        _, got = await reader.resolve(key)
        assert set(got) == set(entries)
        assert sum(counts.values()) == 0  # every peer's set equals the reader's

        reader.store.remove_entries(key, [e[:8] for e in entries])
        _, got = await reader.resolve(key)
        assert set(got) == set(entries)
        assert len(counts) == 1  # one peer's further pages, not all five
        assert sum(counts.values()) >= 2
    finally:
        await stop_all(nodes)


async def test_a_peer_that_lies_about_its_entry_set_does_not_hide_entries() -> None:
    """A peer that announces another peer's digest but sends other pages is caught by
    the digest check, and the other peers of its group are read."""
    nodes = await start_dhts(4)
    try:
        key = os.urandom(20)
        entries = [os.urandom(8) + os.urandom(300) for _ in range(60)]
        await nodes[0].add_entries(key, entries)
        liar, honest, reader = nodes[1], nodes[2], nodes[3]
        liar.store.remove_entries(key, [e[:8] for e in entries[30:]])  # it hides half
        reader.store.remove_entries(key, [e[:8] for e in entries])
        digest = entry_set_digest(entries)

        def first_page(node: Dht) -> MorePages:
            page = node.store.entries(key, node.clock())[:5]
            return MorePages(node.me, 5, digest, page)

        # the liar answered first, claiming the honest peers' digest
        found = LookupResult(
            closest=[liar.me, honest.me],
            entries=[],
            more_pages=[first_page(liar), first_page(honest)],
        )
        got = await reader._all_entries(key, found)
        assert set(got) == set(entries)
    finally:
        await stop_all(nodes)


async def test_peers_without_the_digest_are_read_whole() -> None:
    """A peer that predates the entry-set digest is read page by page, as before."""
    nodes = await start_dhts(5)
    try:
        key = os.urandom(20)
        entries = [os.urandom(8) + os.urandom(300) for _ in range(60)]
        await nodes[0].add_entries(key, entries)
        counts: Counter[bytes] = Counter()
        for node in nodes[:4]:
            proto = node.protocol
            assert proto is not None
            plain = proto._dispatch

            def without_digest(
                name: str, sender: Node, args: list[object], plain: Any = plain
            ) -> object:
                reply = plain(name, sender, args)
                if name == "find_entries" and isinstance(reply, dict):
                    reply.pop("digest", None)
                return reply

            proto._dispatch = without_digest  # type: ignore[method-assign]
            _count_page_requests(node, counts)
        reader = nodes[4]
        reader.store.remove_entries(key, [e[:8] for e in entries])
        _, got = await reader.resolve(key)
        assert set(got) == set(entries)
        assert len(counts) == 4
    finally:
        await stop_all(nodes)


async def test_resolve_asks_peers_without_the_value_flag_with_find_value() -> None:
    """A peer that answers find_entries without the record (older code) is asked for it."""
    nodes = await start_dhts(6)
    try:
        key = os.urandom(20)
        await nodes[1].put(key, b"\x01old")
        newest = nodes[4]  # the only peer with the newest record predates the flag
        newest.store.put(key, b"\x02new", newest.clock())
        proto = newest.protocol
        assert proto is not None
        plain = proto._dispatch

        def without_value(name: str, sender: object, args: list[object]) -> object:
            reply = plain(name, sender, args)
            if name == "find_entries" and isinstance(reply, dict):
                reply.pop("value", None)
            return reply

        proto._dispatch = without_value  # type: ignore[method-assign]
        records, _ = await nodes[0].resolve(key)
        assert records[0] == b"\x02new"
    finally:
        await stop_all(nodes)


async def test_a_store_right_after_a_lookup_reuses_its_closest_peers() -> None:
    """put_with_entries() just after a lookup of the key stores without a second lookup."""
    nodes = await start_dhts(8)
    try:
        key = os.urandom(20)
        writer = nodes[2]
        await writer.resolve(key)
        lookups = writer.stats["lookups"]
        stored = await writer.put_with_entries(key, b"\x01v", [b"e" * 20])
        assert writer.stats["lookups"] == lookups
        assert stored.refused == 0
        assert stored.accepted == len(nodes)
        for node in nodes:
            assert node.store.get(key, node.clock()) == b"\x01v"
            assert node.store.entries(key, node.clock()) == [b"e" * 20]
    finally:
        await stop_all(nodes)


async def test_record_and_entries_go_in_one_request_per_peer() -> None:
    """put_with_entries sends the record and the first batch of entries together (one
    request per peer instead of two); entries beyond one datagram follow as add_entries."""
    nodes = await start_dhts(6)
    try:
        writer, key = nodes[1], os.urandom(20)
        await writer.lookup(key, "find_node")
        peers = len(nodes) - 1
        few = [os.urandom(179) for _ in range(3)]
        sent = writer._proto().sent
        stored = await writer.put_with_entries(key, b"\x01v", few)
        # plus one read-back request: the (single) path's closest peer serves the record
        assert writer._proto().sent - sent == peers + 1
        assert (stored.accepted, stored.refused) == (len(nodes), 0)
        assert stored.entries_accepted == len(few) * len(nodes)
        many = [os.urandom(179) for _ in range(60)]  # 10,740 bytes: two batches
        sent = writer._proto().sent
        stored = await writer.put_with_entries(key, b"\x01w", many)
        assert writer._proto().sent - sent == 2 * peers + 1
        assert stored.entries_accepted == len(many) * len(nodes)
        for node in nodes:
            assert node.store.get(key, node.clock()) == b"\x01w"
            assert set(node.store.entries(key, node.clock())) == set(few + many)
    finally:
        await stop_all(nodes)


async def test_a_peer_refusing_entries_in_a_store_is_asked_the_old_way() -> None:
    """A peer of the previous release answers a store carrying entries with a bare false;
    the writer then sends it store and add_entries separately, and it ends up with both.

    The previous release cannot run here, so one peer's request handler is wrapped to
    answer as it did (a store with other than two arguments is refused)."""
    nodes = await start_dhts(5)
    try:
        old = nodes[3]._proto()
        dispatch = old._dispatch

        def previous_release(name: str, sender: Any, args: list[Any]) -> object:
            if name == "store" and len(args) != 2:
                return False
            return dispatch(name, sender, args)

        old._dispatch = previous_release  # type: ignore[method-assign]
        writer, key = nodes[0], os.urandom(20)
        stored = await writer.put_with_entries(key, b"\x01v", [b"\x02e"])
        assert (stored.accepted, stored.refused) == (len(nodes), 0)
        assert stored.entries_accepted == len(nodes)
        assert nodes[3].store.get(key, nodes[3].clock()) == b"\x01v"
        assert nodes[3].store.entries(key, nodes[3].clock()) == [b"\x02e"]
    finally:
        await stop_all(nodes)


async def test_put_with_entries_counts_refusals() -> None:
    """Peers that refuse the record count as refused, so the caller knows to read back."""
    nodes = await start_dhts(5, policy=RefuseAll())
    try:
        stored = await nodes[0].put_with_entries(os.urandom(20), b"\x01x", [])
        assert stored.accepted == 0
        assert stored.refused == len(nodes)
    finally:
        await stop_all(nodes)


async def test_leave_is_noticed_at_once() -> None:
    """A peer that stops tells its contacts, which drop it without waiting for timeouts."""
    nodes = await start_dhts(4)
    try:
        leaving = nodes[2]
        await leaving.stop()

        def forgotten(node: Dht) -> bool:
            return leaving.node_id not in {c.node_id for c in node.contacts()}

        for node in (nodes[0], nodes[1], nodes[3]):
            await wait_for(functools.partial(forgotten, node))
    finally:
        await stop_all([nodes[0], nodes[1], nodes[3]])


async def test_unproven_node_ids_are_not_trusted() -> None:
    """A sender claiming an ID (here: any 20 bytes) it cannot prove never enters the table."""
    nodes = await start_dhts(3)
    liar = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    liar.bind(("127.0.0.1", 0))
    try:
        victim = nodes[0]
        claimed = os.urandom(20)
        for _ in range(5):
            ping = umsgpack.packb(["ping", [claimed]])
            liar.sendto(b"\x00" + os.urandom(20) + ping, victim.me.address)
        await victim.settle()
        await wait_for(lambda: not victim._verifying)
        assert claimed not in {c.node_id for c in victim.contacts()}
        assert len(victim.contacts()) == 2
    finally:
        liar.close()
        await stop_all(nodes)


async def test_contacts_per_ip_are_capped() -> None:
    """With the per-IP cap applied, one address cannot fill a routing table."""
    config = DhtConfig(
        id_difficulty=0,
        rpc_timeout=0.5,
        liveness_interval=3600,
        max_contacts_per_ip=2,
        limit_loopback=True,
    )
    nodes = await start_dhts(6, config=config)
    try:
        assert all(len(n.contacts()) <= 2 for n in nodes)
    finally:
        await stop_all(nodes)


async def test_peers_over_the_cap_are_named_in_replies_and_found_for_placement() -> None:
    """Six peers on one address with a cap of 2: peers kept out of a routing table by the
    cap are in its overflow, named in its find_node replies for keys they are closest to,
    and returned by closest."""
    config = classgen.replace(FAST_DHT, max_contacts_per_ip=2, limit_loopback=True)
    nodes = await start_dhts(6, config=config)
    try:
        seed = nodes[0]
        assert len(seed.contacts()) <= 2
        await wait_for(lambda: len(seed.overflow()) >= 3)
        for over in seed.overflow():
            asker = next(n for n in nodes[1:] if n.node_id != over.node_id)
            ok, reply = await asker.call_find(seed.me, "find_node", over.node_id)
            assert ok
            named = dhtwire.decode_contacts(reply, config.ksize)
            assert named[0].node_id == over.node_id
            assert len(named) <= 2  # no more of one address than the cap
            assert over.node_id in {c.node_id for c in await seed.closest(over.node_id, 3)}
    finally:
        await stop_all(nodes)


async def test_a_peer_over_the_cap_that_leaves_is_dropped_from_the_overflow() -> None:
    """A peer kept in the overflow that stops (and says so) is no longer named."""
    config = classgen.replace(FAST_DHT, max_contacts_per_ip=2, limit_loopback=True)
    nodes = await start_dhts(5, config=config)
    try:
        seed = nodes[0]
        await wait_for(lambda: len(seed.overflow()) >= 2)
        over = seed.overflow()[0]
        leaving = next(n for n in nodes if n.node_id == over.node_id)
        await leaving.stop()
        nodes.remove(leaving)
        await wait_for(lambda: over.node_id not in {c.node_id for c in seed.overflow()})
    finally:
        await stop_all(nodes)


async def test_store_flood_is_rate_limited() -> None:
    """One sender's flood of stores is cut to the per-sender rate; the peer keeps serving."""
    config = DhtConfig(
        id_difficulty=0,
        rpc_timeout=0.5,
        liveness_interval=3600,
        write_rate=10,
        write_burst=20,
        limit_loopback=True,
    )
    nodes = await start_dhts(2, config=config)
    flooder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        victim = nodes[0]
        for _ in range(500):
            request = umsgpack.packb(["store", [os.urandom(20), os.urandom(20), b"\x01" * 4000]])
            flooder.sendto(b"\x00" + os.urandom(20) + request, victim.me.address)
        # The ping is queued behind the flood on the victim's socket: its answer means the
        # whole flood was handled.
        assert await nodes[1].ping(victim.me.address) == victim.node_id
        records, _ = victim.store.counts()
        assert 1 <= records <= 40, records
    finally:
        flooder.close()
        await stop_all(nodes)


async def test_contact_without_node_id_work_is_not_added() -> None:
    """At the default difficulty, a peer whose node ID lacks the node-ID work is not
    added; one with it is."""
    bits = DhtConfig().id_difficulty
    config = classgen.replace(FAST_DHT, id_difficulty=bits)
    weak = Identity.generate()
    while has_work(weak.node_id, bits):
        weak = Identity.generate()
    keys = [generate_with_work(bits), weak, generate_with_work(bits)]
    nodes = [Dht(k.node_id, AcceptAll(), config, identity=k) for k in keys]
    try:
        for node in nodes:
            await node.start("127.0.0.1", 0)
        for node in nodes[1:]:
            await node.bootstrap([nodes[0].me.address])
        await nodes[0].settle()
        known = {c.node_id for c in nodes[0].contacts()}
        assert nodes[2].node_id in known
        assert nodes[1].node_id not in known
    finally:
        await stop_all(nodes)


class _Picky(AcceptAll):
    """Refuses records starting with 0x00 and entries starting with b"bad"."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        return None if value[:1] == b"\x00" else tuple(value[:8])

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        return None if entry.startswith(b"bad") else (entry[:8], 0)


async def test_hand_over_sends_only_what_validates() -> None:
    """Hand-over gives a newcomer only records that validate, with only valid entries,
    nothing for keys without a valid record, and at most handover_max_records."""
    config = classgen.replace(FAST_DHT, handover_max_records=2)
    old, new = new_dht(AcceptAll(), config), new_dht(AcceptAll(), config)
    try:
        await old.start("127.0.0.1", 0)
        await new.start("127.0.0.1", 0)
        now = old.clock()
        good = [os.urandom(20) for _ in range(3)]
        for key in good:
            old.store.put(key, b"\x01good", now)
            old.store.add_entry(key, b"entry-ok" + key, now)
            old.store.add_entry(key, b"bad-entry" + key, now)
        junk, entries_only = os.urandom(20), os.urandom(20)
        old.store.put(junk, b"\x00junk", now)
        old.store.add_entry(entries_only, b"entry-ok-alone", now)
        old.store.policy = _Picky()  # stored before the policy refused them
        await old._hand_over(Node(new.node_id, *new.me.address))
        got = [k for k in good if new.store.get(k, now) == b"\x01good"]
        assert len(got) == 2
        for key in got:
            assert new.store.entries(key, now) == [b"entry-ok" + key]
        assert new.store.get(junk, now) is None
        assert new.store.entries(entries_only, now) == []
    finally:
        await stop_all([old, new])
