"""Listing benchmark: one folder of 100,000 children on a network of peer processes.

Run with ``python -m bench.listing``. ``DIFS_BENCH_LIST_N`` children (default 100,000)
of one ``/key/<fp>/`` folder are laid out in shards as the one-by-one writes would leave
them (``listing.bulk_layout``: shards of at most 128 entries, split markers above them),
signed here, and stored through the DHT by ``DIFS_BENCH_LIST_CLIENTS`` (default 8)
operator connections to the first of ``DIFS_BENCH_LIST_PEERS`` (default 3) peer processes
on 127.0.0.1 (every peer is among the k closest to every key, so each stores and verifies
every entry). Then a client of another peer lists the whole folder (``Client.list``,
pages of 1,000, each folder read once) and checks that every name came back once, in
byte order; the first page alone (``list_page``, limit 1,000) is timed too. For each
phase: seconds, and UDP datagrams sent and received by all peers together (DHT traffic:
the lookups and the entry pages of each shard). The peers' maintenance is held off
(``--repair-interval 3600``).

Prints the figures and writes ``bench/results/listing.json``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.peers import peer_status, start_network, stop_processes, token_of, write_results
from difs_p2p.client import Client
from difs_p2p.identity import Identity
from difs_p2p.listing import (
    OBJECT,
    SPLIT,
    build_child,
    bulk_layout,
    owner_fingerprint,
    shard_key,
)

SIZE = 4096


async def traffic(addresses: list[tuple[str, int]]) -> tuple[int, int]:
    """UDP datagrams sent and received so far by all peers."""
    reports = await asyncio.gather(*(peer_status(a) for a in addresses))
    return (sum(r["dht"]["sent"] for r in reports), sum(r["dht"]["received"] for r in reports))


def sign_layout(owner: Identity, root: str, children: list[str]) -> list[tuple[bytes, list[bytes]]]:
    """(shard key, signed entries) of every shard of the folder."""
    fp = owner_fingerprint(owner.public_key)
    now = int(time.time())
    shards = []
    for level, bits, mine, split in bulk_layout(children):
        raws = [
            build_child(
                owner,
                owner=fp,
                parent=root,
                child=c,
                flags=OBJECT,
                level=level,
                issued=now,
                version=1,
                size=SIZE,
                created=now,
            ).raw
            for c in mine
        ]
        if split:
            marker = build_child(
                owner, owner=fp, parent=root, child="", flags=SPLIT, level=level, bits=bits,
                issued=now,
            )  # fmt: skip
            raws.append(marker.raw)
        shards.append((shard_key(fp, root, level, bits), raws))
    return shards


async def run(n: int, peers: int, clients: int) -> dict[str, Any]:
    owner = Identity.generate()
    root = f"/key/{owner.fingerprint}"
    children = [f"file-{i:06d}.dat" for i in range(n)]
    started = time.perf_counter()
    shards = sign_layout(owner, root, children)
    signed_s = time.perf_counter() - started
    entries = sum(len(raws) for _, raws in shards)
    print(f"{n} children: {len(shards)} shards, {entries} entries signed in {signed_s:.1f} s")
    with tempfile.TemporaryDirectory(prefix="difs-bench-list-") as tmp:
        procs, addresses = start_network(Path(tmp), peers, "--repair-interval", "3600")
        try:
            await asyncio.sleep(2.0)  # the peers find each other
            writers = [Client(addresses[0], token=token_of(addresses[0])) for _ in range(clients)]
            queue: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()
            for shard in shards:
                queue.put_nowait(shard)
            stored = 0

            async def writer(client: Client) -> None:
                nonlocal stored
                while not queue.empty():
                    key, raws = queue.get_nowait()
                    got = await client.add_children(key, raws)
                    stored += got

            sent0, received0 = await traffic(addresses)
            started = time.perf_counter()
            await asyncio.gather(*(writer(c) for c in writers))
            store_s = time.perf_counter() - started
            sent1, received1 = await traffic(addresses)
            for c in writers:
                await c.close()
            held = [
                r["entries"] for r in await asyncio.gather(*(peer_status(a) for a in addresses))
            ]
            print(
                f"stored in {store_s:.1f} s ({entries / store_s:.0f} entries/s; "
                f"{stored} acceptances over {peers} peers), datagrams sent "
                f"{sent1 - sent0}, received {received1 - received0}; entries each peer "
                f"holds: {held}"
            )
            reader = addresses[1 % len(addresses)]
            async with Client(reader) as client:
                started = time.perf_counter()
                first = await client.list_page(root, limit=1000)
                page_s = time.perf_counter() - started
                sent2, received2 = await traffic(addresses)
                started = time.perf_counter()
                names = [e.name async for e in client.list(root, page=1000)]
                list_s = time.perf_counter() - started
                sent3, received3 = await traffic(addresses)
            want = [f"{root}/{c}" for c in sorted(children)]
            complete = names == want
            print(
                f"first page of 1,000 in {page_s:.2f} s; listed {len(names)} names "
                f"(complete and in order: {complete}) in {list_s:.2f} s "
                f"({len(names) / list_s:.0f} names/s), datagrams sent {sent3 - sent2}, "
                f"received {received3 - received2} ({(sent3 - sent2) / len(shards):.1f} sent "
                "per shard)"
            )
            assert first.entries and first.next is not None
        finally:
            stop_processes(procs)
    return {
        "children": n,
        "peers": peers,
        "shards": len(shards),
        "entries": entries,
        "sign_s": round(signed_s, 2),
        "store_s": round(store_s, 2),
        "store_datagrams_sent": sent1 - sent0,
        "store_datagrams_received": received1 - received0,
        "store_acceptances": stored,
        "entries_held_per_peer": held,
        "first_page_s": round(page_s, 3),
        "list_s": round(list_s, 2),
        "listed": len(names),
        "complete_in_order": complete,
        "list_datagrams_sent": sent3 - sent2,
        "list_datagrams_received": received3 - received2,
    }


def main() -> None:
    n = int(os.environ.get("DIFS_BENCH_LIST_N", "100000"))
    peers = int(os.environ.get("DIFS_BENCH_LIST_PEERS", "3"))
    clients = int(os.environ.get("DIFS_BENCH_LIST_CLIENTS", "8"))
    result = asyncio.run(run(n, peers, clients))
    print(f"wrote {write_results('listing', result)}")
    if not result["complete_in_order"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
