"""The folders a client keeps for a listing's next pages: the pure rules of
listcache.FolderCache (TTL, bound, invalidation), and real peers on 127.0.0.1 where
continued pages read nothing and a writer's put shows up on its next pages."""

from __future__ import annotations

import io
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import segments
from difs_p2p.client import Client
from difs_p2p.identity import Identity
from difs_p2p.listcache import FolderCache
from difs_p2p.listing import OBJECT, SPLIT, build_child, bulk_layout, owner_fingerprint, shard_key
from difs_p2p.peer import Peer
from tests.helpers import client_for, start_peers, stop_all

A = (b"owner-a", "/key/a")
B = (b"owner-a", "/key/a/sub")
C = (b"owner-c", "/key/a")

# (steps, the keys found at the end with their names); a step is
# ("put", key, names, now) | ("get", key, now) | ("invalidate", owner, folders) | ("clear",)
CASES: list[tuple[str, list[tuple[Any, ...]], dict[tuple[bytes, str], list[str] | None]]] = [
    ("kept within the ttl", [("put", A, ["x"], 100.0)], {A: ["x"]}),
    ("expired at the ttl", [("put", A, ["x"], 100.0), ("get", A, 110.0)], {A: None}),
    ("a clock gone backwards expires it", [("put", A, ["x"], 100.0), ("get", A, 99.0)], {A: None}),
    ("a new read replaces", [("put", A, ["x"], 100.0), ("put", A, ["y"], 101.0)], {A: ["y"]}),
    (
        "the least recently used folder goes past the bound",
        [("put", A, ["1", "2"], 100.0), ("put", B, ["3", "4"], 100.0), ("put", C, ["5"], 100.0)],
        {A: None, B: ["3", "4"], C: ["5"]},
    ),
    (
        "a get makes a folder recently used",
        [
            ("put", A, ["1", "2"], 100.0),
            ("put", B, ["3", "4"], 100.0),
            ("get", A, 101.0),
            ("put", C, ["5"], 101.0),
        ],
        {A: ["1", "2"], B: None, C: ["5"]},
    ),
    ("a folder over the bound is not kept", [("put", A, ["1"] * 5, 100.0)], {A: None}),
    (
        "invalidate drops only that owner's folders",
        [("put", A, ["x"], 100.0), ("put", C, ["z"], 100.0), ("invalidate", A[0], [A[1]])],
        {A: None, C: ["z"]},
    ),
    (
        "clear drops every folder",
        [("put", A, ["x"], 100.0), ("put", C, ["z"], 100.0), ("clear",)],
        {A: None, C: None},
    ),
]  # fmt: skip


@pytest.mark.parametrize(("case", "steps", "end"), CASES, ids=[c[0] for c in CASES])
def test_folder_cache_rules(
    case: str, steps: list[tuple[Any, ...]], end: dict[tuple[bytes, str], list[str] | None]
) -> None:
    """A folder is kept for ttl seconds, at most max_entries entries in all (LRU first out),
    and dropped by invalidate and clear."""
    cache: FolderCache[str] = FolderCache(ttl=10.0, max_entries=4)
    for step in steps:
        if step[0] == "put":
            cache.put(step[1], step[2], step[3], cache.generation, len(step[2]))
        elif step[0] == "get":
            cache.get(step[1], step[2])
        elif step[0] == "invalidate":
            cache.invalidate(step[1], step[2])
        else:
            cache.clear()
    for key, names in end.items():
        assert cache.get(key, 105.0) == names, key
    assert cache.entries == sum(len(n) for n in end.values() if n is not None)


def test_a_read_overtaken_by_a_write_is_not_kept() -> None:
    """A read begun before a write (invalidate or clear) may have missed it: not kept."""
    cache: FolderCache[str] = FolderCache(ttl=10.0, max_entries=4)
    since = cache.generation
    cache.invalidate(b"owner-a", ["/key/other"])
    cache.put(A, ["x"], 100.0, since, 1)
    assert cache.get(A, 100.0) is None
    cache.put(A, ["x"], 100.0, cache.generation, 1)
    assert cache.get(A, 100.0) == ["x"]


@pytest.fixture
async def network(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    peers = await start_peers(tmp_path / "net", 3)
    yield peers
    await stop_all(peers)


def count_children(peer: Peer) -> list[int]:
    """Counts the entry peer's ``children`` requests (the real handler still answers)."""
    calls = [0]
    handlers: dict[str, Callable[..., Awaitable[Any]]] = peer._operations.handlers  # type: ignore[union-attr]
    real = handlers["children"]

    async def counted(*args: Any) -> Any:
        calls[0] += 1
        return await real(*args)

    handlers["children"] = counted
    return calls


async def lay_out(client: Client, owner: Identity, root: str, children: list[str]) -> None:
    """Store ``children`` of ``root`` as signed child entries in split shards."""
    fp = owner_fingerprint(owner.public_key)
    now = int(time.time())
    for level, bits, mine, split in bulk_layout(children):
        raws = [
            build_child(
                owner, owner=fp, parent=root, child=c, flags=OBJECT, level=level,
                issued=now, version=1, size=1, created=now,
            ).raw
            for c in mine
        ]  # fmt: skip
        if split:
            raws.append(
                build_child(
                    owner, owner=fp, parent=root, child="", flags=SPLIT, level=level,
                    bits=bits, issued=now,
                ).raw
            )  # fmt: skip
        await client.add_children(shard_key(fp, root, level, bits), raws)


async def test_continued_pages_read_nothing_and_a_put_shows_up_on_them(
    network: list[Peer],
) -> None:
    """Pages 2..N (each its own list_page call with the token) send no children request;
    a first page reads again; a put through the same client shows up on its next page."""
    owner = Identity.generate()
    root = f"/key/{owner.fingerprint}"
    children = [f"key-{i:04d}" for i in range(300)]
    async with client_for(network[0], publisher=owner) as client:
        await lay_out(client, owner, root, children)
        calls = count_children(network[0])
        page = await client.list_page(root, limit=100)
        first = calls[0]
        assert first > 1  # level 0 and the shards below its split
        listed = [e.name for e in page.entries]
        while page.next is not None:
            page = await client.list_page(root, after=page.next, limit=100)
            listed += [e.name for e in page.entries]
        assert listed == [f"{root}/{c}" for c in children]
        assert calls[0] == first  # pages 2..3 read nothing

        page = await client.list_page(root, limit=100)
        assert calls[0] == 2 * first  # a first page reads the folder again
        await client.put(
            io.BytesIO(b"x"), f"{root}/zzz", segment_size=segments.MIN_SEGMENT_SIZE, replicas=1
        )
        rest: list[str] = []
        while page.next is not None:
            page = await client.list_page(root, after=page.next, limit=100)
            rest += [e.name for e in page.entries]
        assert rest[-1] == f"{root}/zzz"  # the writer's put dropped its folder


async def test_clients_sharing_a_folder_cache_read_each_others_writes(
    network: list[Peer],
) -> None:
    """Two clients of one writer (as the S3 server's per key) share a folder cache: a put
    through one shows up on the other's continued page, which reads nothing itself."""
    owner = Identity.generate()
    root = f"/key/{owner.fingerprint}"
    children = [f"key-{i:04d}" for i in range(150)]
    async with (
        client_for(network[0], publisher=owner) as reader,
        client_for(network[0], publisher=owner, folders=reader.folders) as writer,
    ):
        await lay_out(writer, owner, root, children)
        page = await reader.list_page(root, limit=100)
        assert page.next is not None
        await writer.put(
            io.BytesIO(b"x"), f"{root}/zzz", segment_size=segments.MIN_SEGMENT_SIZE, replicas=1
        )
        calls = count_children(network[0])
        rest = await reader.list_page(root, after=page.next, limit=100)
        assert [e.name for e in rest.entries][-1] == f"{root}/zzz"
        assert calls[0] > 0  # the writer's put dropped the shared folder: read again
        calls[0] = 0
        again = await writer.list_page(root, after=page.next, limit=100)
        assert again == rest
        assert calls[0] == 0  # and kept it for both
