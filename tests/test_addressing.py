"""Peers on real sockets with the address options: IPv6, wildcard binds with an
advertised address, dual-stack, host names."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from difs_p2p.client import Client
from difs_p2p.errors import NetworkError
from difs_p2p.holders import decode_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.names import name_key
from difs_p2p.net import resolve
from difs_p2p.peer import Peer
from difs_p2p.transfer import Connection
from tests.helpers import peer_config, stop_all, wait_for


async def _holder_hosts(peer: Peer, name: str) -> set[str]:
    """The addresses the holder entries of ``name`` carry, as the DHT serves them."""
    assert peer.dht is not None
    entries = await peer.dht.get_entries(name_key(name))
    hosts = set()
    for raw in entries:
        if raw[:1] == b"\x01":
            hosts.add(decode_holder_entry(raw).host)
    return hosts


async def _put_get(entry: Peer, reader: Peer, name: str, data: bytes) -> bytes:
    me = Identity.generate()
    async with Client(entry.address, token=entry.control_token, publisher=me) as client:
        await client.put(io.BytesIO(data), name, replicas=2)
    out = io.BytesIO()
    async with Client(reader.address, token=reader.control_token) as client:
        await client.get(name, out)
    return out.getvalue()


async def test_peers_on_ipv6_loopback_publish_and_fetch(tmp_path: Path) -> None:
    """Three peers on ::1: a put through one and a get through another; holder entries
    carry the IPv6 address and status shows it in brackets."""
    first = Peer(peer_config(tmp_path / "p0", host="::1"))
    await first.start()
    peers = [first]
    try:
        for i in (1, 2):
            p = Peer(peer_config(tmp_path / f"p{i}", host="::1", bootstrap=(("::1", first.port),)))
            await p.start()
            peers.append(p)
        assert peers[1].status()["address"] == f"[::1]:{peers[1].port}"
        assert (tmp_path / "p1" / "address").read_text() == f"[::1]:{peers[1].port}\n"
        assert all(c.host == "::1" for c in peers[0].dht.contacts())  # type: ignore[union-attr]
        data = b"v6" * 50_000
        assert await _put_get(peers[0], peers[2], "/v6/file", data) == data
        assert await _holder_hosts(peers[1], "/v6/file") == {"::1"}
    finally:
        await stop_all(peers)


async def test_a_wildcard_peer_advertises_the_given_address(tmp_path: Path) -> None:
    """Peers bound to 0.0.0.0 with --advertise 127.0.0.1 sign holder entries carrying
    127.0.0.1, never 0.0.0.0, and their address file and status say so."""
    kwargs = {"host": "0.0.0.0", "advertise": ("127.0.0.1", 0)}
    first = Peer(peer_config(tmp_path / "p0", **kwargs))
    await first.start()
    peers = [first]
    try:
        for i in (1, 2):
            p = Peer(
                peer_config(tmp_path / f"p{i}", bootstrap=(("127.0.0.1", first.port),), **kwargs)
            )
            await p.start()
            peers.append(p)
        status = peers[1].status()
        assert status["address"] == f"127.0.0.1:{peers[1].port}"
        assert status["listen"] == f"0.0.0.0:{peers[1].port}"
        assert status["address_known"] is True
        assert (tmp_path / "p1" / "address").read_text() == f"127.0.0.1:{peers[1].port}\n"
        data = b"w" * 70_000
        assert await _put_get(peers[1], peers[2], "/wild/file", data) == data
        assert await _holder_hosts(peers[0], "/wild/file") == {"127.0.0.1"}
    finally:
        await stop_all(peers)


async def test_a_wildcard_peer_without_an_address_refuses_to_sign_entries(
    tmp_path: Path,
) -> None:
    """A peer on 0.0.0.0 that knows no reachable address says so, and signs no holder
    entry carrying 0.0.0.0 (a hold fails with a NetworkError naming --advertise)."""
    peer = Peer(peer_config(tmp_path / "p0", host="0.0.0.0"))
    await peer.start()
    try:
        status = peer.status()
        assert status["address_known"] is False
        assert status["address"] == f"127.0.0.1:{peer.port}"  # where a local client goes
        with pytest.raises(NetworkError, match="--advertise"):
            peer.replicator.sign_entry(b"k" * 20, 1, b"i" * 32, 0, 0)
    finally:
        await peer.stop()


async def test_a_dual_stack_peer_is_reachable_over_ipv4_and_ipv6(tmp_path: Path) -> None:
    """A peer on :: takes an IPv4 peer and an IPv6 peer as contacts, and answers TCP on
    both families; the IPv4 one is seen as plain IPv4 text, not IPv4-mapped."""
    dual = Peer(peer_config(tmp_path / "dual", host="::", advertise=("::1", 0)))
    await dual.start()
    v4 = Peer(peer_config(tmp_path / "v4", bootstrap=(("127.0.0.1", dual.port),)))
    v6 = Peer(peer_config(tmp_path / "v6", host="::1", bootstrap=(("::1", dual.port),)))
    peers = [dual, v4, v6]
    try:
        await v4.start()
        await v6.start()
        assert dual.dht is not None
        await wait_for(lambda: len(dual.dht.contacts()) == 2)  # type: ignore[union-attr]
        assert {c.host for c in dual.dht.contacts()} == {"127.0.0.1", "::1"}
        for address in (("127.0.0.1", dual.port), ("::1", dual.port)):
            conn = await Connection.open(address, io_timeout=5.0)
            conn.close()
    finally:
        await stop_all(peers)


async def test_host_names_resolve_and_failures_name_the_host() -> None:
    """localhost resolves without blocking; an IP literal is itself; a name that does
    not resolve is a NetworkError naming it."""
    assert ("127.0.0.1", 5) in await resolve("localhost", 5)
    assert await resolve("::ffff:10.0.0.1", 7) == [("10.0.0.1", 7)]
    with pytest.raises(NetworkError, match=r"no-such-host\.invalid"):
        await resolve("no-such-host.invalid", 4000)
