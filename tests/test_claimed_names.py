"""Prefix claims on real peers: the owner's names are found at its owned keys, squatters
and strangers are refused, delegates publish for the owner, a claim is permanent."""

from __future__ import annotations

import asyncio
import io
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from difs_p2p.client import Client
from difs_p2p.delegation import build_delegation
from difs_p2p.errors import NotFoundError, PermissionDeniedError
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest, build_manifest, owned_key
from difs_p2p.names import name_key
from difs_p2p.peer import Peer
from difs_p2p.segments import IntegrityRoot, SegmentId, segment_hash
from tests.helpers import client_for, start_peers, stop_all

SEG = 64 << 10


@pytest.fixture
async def peers(tmp_path: Path) -> AsyncIterator[list[Peer]]:
    """Four peers on 127.0.0.1."""
    net = await start_peers(tmp_path / "net", 4)
    yield net
    await stop_all(net)


def squat(signer: Identity, name: str, **kwargs: object) -> Manifest:
    """A stranger's version 1 of ``name`` at its plain key, built by hand (no content)."""
    return build_manifest(
        signer,
        name=name,
        version=1,
        parent=None,
        root=None,
        size=0,
        segment_size=SEG,
        segment_count=0,
        stripes=0,
        replicas=1,
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        created=time.time(),
        **kwargs,  # type: ignore[arg-type]
    )


async def get_bytes(peer: Peer, name: str) -> bytes:
    out = io.BytesIO()
    async with Client(peer.address) as reader:
        await reader.get(name, out)
    return out.getvalue()


async def test_a_claimed_prefix_keeps_squatters_and_strangers_out(peers: list[Peer]) -> None:
    """Mallory's /t.com/a at the plain key is ignored once Alice claimed /t.com/, and her
    /t.com/m from before the claim too (Alice may publish that name); Alice's own name from
    before the claim stays hers; Mallory can neither publish nor claim."""
    alice, mallory = Identity.generate(), Identity.generate()
    planted = squat(mallory, "/t.com/a")
    stored = await peers[1].replicator.dht.put_with_entries(name_key("/t.com/a"), planted.raw, [])
    assert stored.accepted > 0
    async with client_for(peers[2], publisher=mallory) as client:  # before the claim
        await client.put(io.BytesIO(b"m" * 100), "/t.com/m", segment_size=SEG)
    async with client_for(peers[0], publisher=alice) as client:
        await client.put(io.BytesIO(b"old" * 100), "/t.com/old", segment_size=SEG)
        claim = await client.claim("/t.com/")
        assert (claim.name, claim.owner, claim.key) == (
            "/t.com/@claim",
            alice.public_key,
            name_key("/t.com/@claim"),
        )
        assert await client.claim("/t.com") == claim  # the same key again: the same claim
        published = await client.put(io.BytesIO(b"a" * 1000), "/t.com/a", segment_size=SEG)
        assert published.manifest.key == owned_key("/t.com/a", alice.public_key)
        update = await client.put(
            io.BytesIO(b"new" * 100), "/t.com/old", segment_size=SEG, update=True
        )
        assert update.manifest.key == name_key("/t.com/old")  # keeps its version 1's key
    assert await get_bytes(peers[3], "/t.com/a") == b"a" * 1000
    assert await get_bytes(peers[3], "/t.com/old") == b"new" * 100
    async with Client(peers[3].address) as reader:
        assert await reader.prefix_owner("/t.com/anything") == alice.public_key
        with pytest.raises(NotFoundError, match="not published by the owner"):
            await reader.resolve("/t.com/m")  # Mallory's, from before the claim
    async with client_for(peers[0], publisher=alice) as client:  # the name is free for Alice
        await client.put(io.BytesIO(b"mine" * 100), "/t.com/m", segment_size=SEG)
    assert await get_bytes(peers[3], "/t.com/m") == b"mine" * 100
    async with client_for(peers[2], publisher=mallory) as client:
        with pytest.raises(PermissionDeniedError, match=f"claimed by {alice.fingerprint}"):
            await client.put(io.BytesIO(b"b" * 100), "/t.com/b", segment_size=SEG)
        with pytest.raises(PermissionDeniedError, match=f"claimed by {alice.fingerprint}"):
            await client.put(io.BytesIO(b"b" * 100), "/t.com/a", segment_size=SEG, update=True)
        with pytest.raises(PermissionDeniedError, match=alice.fingerprint):
            await client.claim("/t.com/")
    assert all(not p.store.has(segment_hash(b"b" * 100)) for p in peers if p.store)  # no upload


async def test_delegates_publish_only_under_a_claimed_prefix(peers: list[Peer]) -> None:
    """Bob publishes under /t.com/bob/ with Alice's delegation once Alice claimed /t.com/;
    a delegated manifest under an unclaimed prefix is refused by publishers and readers."""
    alice, bob = Identity.generate(), Identity.generate()
    expires = time.time() + 3600
    cert = build_delegation(alice, prefix="/t.com/bob", writer=bob.public_key, expires=expires)
    loose = build_delegation(alice, prefix="/u.com/bob", writer=bob.public_key, expires=expires)
    async with client_for(peers[0], publisher=alice) as client:
        await client.claim("/t.com/")
    async with client_for(peers[1], publisher=bob) as client:
        result = await client.put(
            io.BytesIO(b"x" * 500), "/t.com/bob/x", segment_size=SEG, delegation=cert
        )
        assert result.manifest.key == owned_key("/t.com/bob/x", alice.public_key)
        with pytest.raises(PermissionDeniedError, match="not claimed"):
            await client.put(
                io.BytesIO(b"y" * 100), "/u.com/bob/y", segment_size=SEG, delegation=loose
            )
    assert await get_bytes(peers[3], "/t.com/bob/x") == b"x" * 500
    planted = squat(bob, "/u.com/bob/y", delegation=loose)
    await peers[1].replicator.dht.put_with_entries(planted.key, planted.raw, [])
    async with Client(peers[3].address) as reader:
        assert (await reader.resolve("/t.com/bob/x")).manifest.owner == alice.public_key
        with pytest.raises(PermissionDeniedError, match=re.escape("/u.com/ is not claimed")):
            await reader.resolve("/u.com/bob/y")


async def test_a_released_claim_still_names_its_owner(peers: list[Peer]) -> None:
    """`rm /t.com/@claim` publishes a tombstone that still names the owner: the prefix stays
    claimed, and nobody else can claim it."""
    alice, mallory = Identity.generate(), Identity.generate()
    async with client_for(peers[0], publisher=alice) as client:
        await client.claim("/t.com/")
        tomb = await client.rm("/t.com/@claim")
        assert tomb.deleted and tomb.owner == alice.public_key
    async with client_for(peers[1], publisher=mallory) as client:
        assert await client.prefix_owner("/t.com/") == alice.public_key
        with pytest.raises(PermissionDeniedError, match=alice.fingerprint):
            await client.claim("/t.com/")
    async with Client(peers[2].address) as reader:
        assert await reader.prefix_owner(f"/key/{alice.fingerprint}/x") is None
        assert await reader.prefix_owner("/free.org/x") is None


async def test_reserved_names_are_refused_before_any_upload(
    peers: list[Peer], tmp_path: Path
) -> None:
    """@claim anywhere but /<first>/@claim is refused by the client, with the rule."""
    from difs_p2p.errors import BadNameError

    src = tmp_path / "s"
    src.write_bytes(os.urandom(100))
    async with client_for(peers[0], publisher=Identity.generate()) as client:
        with pytest.raises(BadNameError, match="reserved"):
            await client.put(src, "/t.com/a/@claim", segment_size=SEG)
    assert peers[0].store is not None
    assert not peers[0].store.has(segment_hash(src.read_bytes()))


async def test_concurrent_readers_of_a_prefix_share_one_claim_lookup(peers: list[Peer]) -> None:
    """Names of one prefix resolved at once by one client (a gateway's) cost one claim
    lookup at the entry peer, and every later one is answered from the client's memory."""
    async with client_for(peers[0], publisher=Identity.generate()) as client:
        await client.claim("/t.com/")
    dht = peers[1].replicator.dht
    async with Client(peers[1].address) as reader:
        before = dht.stats["lookups"]
        owners = await asyncio.gather(*(reader.prefix_owner(f"/t.com/{i}") for i in range(8)))
        assert len(set(owners)) == 1 and owners[0] is not None
        assert dht.stats["lookups"] - before == 1
        await reader.prefix_owner("/t.com/9")
        assert dht.stats["lookups"] - before == 1
