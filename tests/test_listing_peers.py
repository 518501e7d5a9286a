"""Listing by prefix across real peers on 127.0.0.1: child entries written on publish and
rm, read back through the entry peer, split shards, and what storing peers refuse."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p import segments
from difs_p2p.client import Client
from difs_p2p.config import RepairConfig
from difs_p2p.dhtwire import MAX_VALUE_SIZE
from difs_p2p.errors import UsageError
from difs_p2p.identity import Identity
from difs_p2p.listing import (
    OBJECT,
    SHARD_ENTRIES,
    SPLIT,
    ListEntry,
    build_child,
    bulk_layout,
    decode_child,
    owner_fingerprint,
    shard_key,
)
from difs_p2p.ops import AddChildrenRequest
from difs_p2p.peer import Peer
from tests.helpers import client_for, start_peers, stop_all


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 4)
    yield peers
    await stop_all(peers)


async def put(client: Client, name: str, data: bytes, update: bool = False) -> None:
    await client.put(
        io.BytesIO(data), name, segment_size=segments.MIN_SEGMENT_SIZE, replicas=1, update=update
    )


def names(entries: list[ListEntry]) -> list[str]:
    return [e.name for e in entries]


async def test_published_names_list_in_byte_order_by_page_and_recursively(
    network: list[Peer],
) -> None:
    """ls shows a folder's children, recursive ls everything below in byte order ("x-y"
    before "x/"), pages joined by tokens are the whole listing, an update shows its new
    size and version, and an rm'd name is gone."""
    me = Identity.generate()
    root = f"/key/{me.fingerprint}"
    async with client_for(network[1], publisher=me) as client:
        for name, data in [("a.txt", b"1"), ("x-y", b"22"), ("x/b", b"333"), ("x/c/d", b"4")]:
            await put(client, f"{root}/{name}", data)
        page = await client.list_page(root + "/")
        assert names(page.entries) == [f"{root}/a.txt", f"{root}/x-y", f"{root}/x/"]
        assert page.next is None
        assert [(e.folder, e.size, e.version) for e in page.entries] == [
            (False, 1, 1),
            (False, 2, 1),
            (True, 0, 0),
        ]
        assert page.entries[0].publisher == me.public_key
        everything = [
            f"{root}/a.txt",
            f"{root}/x-y",
            f"{root}/x/",
            f"{root}/x/b",
            f"{root}/x/c/",
            f"{root}/x/c/d",
        ]
        assert names((await client.list_page(root, recursive=True)).entries) == everything
        joined: list[str] = []
        token = None
        while True:
            got = await client.list_page(root, recursive=True, after=token, limit=2)
            joined += names(got.entries)
            if got.next is None:
                break
            token = got.next
        assert joined == everything
        assert [e.name async for e in client.list(root, recursive=True, page=4)] == everything
        await put(client, f"{root}/a.txt", b"55555", update=True)
        await client.rm(f"{root}/x/b")
        page = await client.list_page(f"{root}/x")
        assert names(page.entries) == [f"{root}/x/c/"]  # the folder stays, b is gone
        first = (await client.list_page(root)).entries[0]
        assert (first.name, first.size, first.version) == (f"{root}/a.txt", 5, 2)


async def test_an_unclaimed_prefix_has_no_listing(network: list[Peer]) -> None:
    """Listing a prefix without one owner is a usage error that names the way out."""
    async with client_for(network[0]) as client:
        with pytest.raises(UsageError, match=r"/x\.com/ is not claimed, so it has no listing"):
            await client.list_page("/x.com/")


async def test_strangers_entries_are_refused_by_storing_peers(network: list[Peer]) -> None:
    """A child entry signed by another key than the folder's owner, or replayed at another
    folder's shard key, is stored by no peer."""
    owner, stranger = Identity.generate(), Identity.generate()
    fp = owner_fingerprint(owner.public_key)
    root = f"/key/{owner.fingerprint}"
    now = int(time.time())
    forged = build_child(
        stranger, owner=fp, parent=root, child="spam", flags=OBJECT, level=0, issued=now
    )
    genuine = build_child(
        owner, owner=fp, parent=root, child="a", flags=OBJECT, level=0, issued=now
    )
    async with client_for(network[2], publisher=owner) as client:
        stored = await client._request(AddChildrenRequest(forged.shard, (forged.raw.hex(),)))
        assert stored.stored == 0
        elsewhere = shard_key(fp, root + "/other", 0, 0)
        stored = await client._request(AddChildrenRequest(elsewhere, (genuine.raw.hex(),)))
        assert stored.stored == 0
        stored = await client._request(AddChildrenRequest(genuine.shard, (genuine.raw.hex(),)))
        assert stored.stored > 0
        assert names((await client.list_page(root)).entries) == [f"{root}/a"]


async def test_a_folder_of_600_children_splits_and_lists_completely(
    network: list[Peer],
) -> None:
    """600 children laid out in split shards (no shard over SHARD_ENTRIES, every entry
    within a DHT value) list completely and in order; a folder published into the split
    folder afterwards lists beside them."""
    owner = Identity.generate()
    fp = owner_fingerprint(owner.public_key)
    root = f"/key/{owner.fingerprint}"
    children = [f"item-{i:04d}.bin" for i in range(600)]
    now = int(time.time())
    async with client_for(network[3], publisher=owner) as client:
        layout = bulk_layout(children)
        assert any(split for *_, split in layout)
        for level, bits, mine, split in layout:
            assert len(mine) <= SHARD_ENTRIES
            raws = [
                build_child(
                    owner, owner=fp, parent=root, child=c, flags=OBJECT, level=level,
                    issued=now, version=1, size=i, created=now,
                ).raw
                for i, c in enumerate(mine)
            ]  # fmt: skip
            if split:
                raws.append(
                    build_child(
                        owner, owner=fp, parent=root, child="", flags=SPLIT, level=level,
                        bits=bits, issued=now,
                    ).raw
                )  # fmt: skip
            assert all(len(r) <= MAX_VALUE_SIZE for r in raws)
            key = shard_key(fp, root, level, bits)
            reply = await client._request(AddChildrenRequest(key, tuple(r.hex() for r in raws)))
            assert reply.stored >= len(raws)
        listed = [e.name async for e in client.list(root, page=250)]
        assert listed == [f"{root}/{c}" for c in sorted(children)]
        await put(client, f"{root}/late/one", b"x")
        got = await client.list_page(root, after=None, limit=1000)
        assert f"{root}/late/" in names(got.entries)
        assert len(got.entries) == 601


async def test_holders_restore_a_lost_child_entry_when_they_republish(tmp_path: Path) -> None:
    """The publisher leaves its child entries beside the name; a holder's republish puts
    them back at their shard keys once the shard peers lost them (records expire)."""
    peers = await start_peers(
        tmp_path / "net", 3, repair=RepairConfig(interval=3600.0, republish_every=0.0)
    )
    try:
        me = Identity.generate()
        fp = owner_fingerprint(me.public_key)
        root = f"/key/{me.fingerprint}"
        async with client_for(peers[0], publisher=me) as client:
            await put(client, f"{root}/a/b", b"data")
            assert names((await client.list_page(root + "/a")).entries) == [f"{root}/a/b"]
            key = shard_key(fp, root + "/a", 0, 0)
            for peer in peers:  # every copy of the shard is lost
                assert peer.dht is not None
                store = peer.dht.store
                idents = [decode_child(e).store_identity for e in store.entries(key, time.time())]
                store.remove_entries(key, idents)
            assert (await client.list_page(root + "/a")).entries == []
            for peer in peers:
                assert peer.maintainer is not None
                await peer.maintainer.round()
            assert names((await client.list_page(root + "/a")).entries) == [f"{root}/a/b"]
    finally:
        await stop_all(peers)
