"""Peers on real sockets with the address options: IPv6, wildcard binds with an
advertised address, dual-stack, host names."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest
from kademlia.node import Node

from difs_p2p import dhtwire
from difs_p2p.cli_output import print_status
from difs_p2p.client import Client
from difs_p2p.dht import Dht
from difs_p2p.errors import NetworkError
from difs_p2p.holders import decode_holder_entry
from difs_p2p.identity import Identity
from difs_p2p.names import name_key
from difs_p2p.net import resolve
from difs_p2p.peer import Peer
from difs_p2p.recordstore import AcceptAll
from difs_p2p.routing import Contact
from difs_p2p.transfer import Connection
from tests.helpers import (
    BIN,
    FAST_DHT,
    new_dht,
    peer_config,
    start_peer_process,
    stop_all,
    wait_for,
)


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


def _free_tcp_port() -> int:
    """A TCP port free right now (for --tcp-port, which takes a number)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_separate_tcp_port_is_told_and_used(tmp_path: Path) -> None:
    """Peers whose TCP port differs from their UDP port tell it (and their zone) in the
    signed identify info: contacts carry it, placement pushes to it, holder entries
    name it, and a put and a get go through."""
    peers: list[Peer] = []
    try:
        for i in range(3):
            seed = () if not peers else (peers[0].dht_address,)
            p = Peer(
                peer_config(
                    tmp_path / f"p{i}", tcp_port=_free_tcp_port(), zone=f"z{i}", bootstrap=seed
                )
            )
            await p.start()
            peers.append(p)
        assert all(p.tcp_port != p.port for p in peers)
        assert peers[0].dht is not None
        told = {(c.node_id, c.tcp_port, c.zone) for c in peers[0].dht.contacts()}
        assert told == {(p.node_id, p.tcp_port, f"z{i}") for i, p in enumerate(peers) if i}
        described = await peers[0].dht.describe([peers[1].dht.me])  # type: ignore[union-attr]
        assert described[0].tcp_address == ("127.0.0.1", peers[1].tcp_port)
        data = b"t" * 90_000
        assert await _put_get(peers[1], peers[2], "/tcp/file", data) == data
        assert peers[0].dht is not None
        entries = await peers[0].dht.get_entries(name_key("/tcp/file"))
        ports = {decode_holder_entry(e).port for e in entries if e[:1] == b"\x01"}
        assert ports and ports <= {p.tcp_port for p in peers}
    finally:
        await stop_all(peers)


class _ForgingDht(Dht):
    """A peer that alters (or strips) its signed info block after signing it."""

    strip = False

    def prove_identity(self, request: dhtwire.IdentifyArgs, addr: tuple[str, int]) -> object:
        reply = super().prove_identity(request, addr)
        if isinstance(reply, list) and len(reply) == 4:
            if self.strip:
                return reply[:3]
            reply[3] = dhtwire.PeerInfo(9, "forged").encode()
        return reply


@pytest.mark.parametrize("strip", [False, True])
async def test_a_forged_or_stripped_info_block_fails_identify(strip: bool) -> None:
    """The info block is under the identify signature: changing it or removing it
    makes the proof fail, and the contact is not admitted or described."""
    honest = new_dht(AcceptAll())
    me = Identity.generate()
    liar = _ForgingDht(me.node_id, AcceptAll(), FAST_DHT, identity=me)
    liar.strip = strip
    liar.info = dhtwire.PeerInfo(4100, "real")
    try:
        await honest.start("127.0.0.1", 0)
        await liar.start("127.0.0.1", 0)
        node = Node(liar.node_id, "127.0.0.1", liar.me.port)
        assert not await honest.verify(node)
        assert honest.peer_info == {}
        bare = Contact(liar.node_id, "127.0.0.1", liar.me.port)
        assert (await honest.describe([bare]))[0].tcp_port == 0
    finally:
        await stop_all([honest, liar])


async def test_an_older_peer_without_info_is_still_verified() -> None:
    """A peer that sends no info block (older peers) passes identify; its contact
    keeps the defaults (TCP port = UDP port, no zone)."""
    a, b = new_dht(AcceptAll()), new_dht(AcceptAll())
    try:
        await a.start("127.0.0.1", 0)
        await b.start("127.0.0.1", 0)  # b.info is None: it answers as older peers do
        described = await a.describe([b.me])
        assert described[0].tcp_address == b.me.address and described[0].zone == ""
        assert a.is_verified(Node(b.node_id, "127.0.0.1", b.me.port))
    finally:
        await stop_all([a, b])


async def test_a_wildcard_peer_learns_its_address_from_two_observers(tmp_path: Path) -> None:
    """A peer on 0.0.0.0 without --advertise joins two peers, asks them what they
    observe, and adopts 127.0.0.1 (two observers agree); its entries may then be signed."""
    peers = [Peer(peer_config(tmp_path / "p0"))]
    try:
        await peers[0].start()
        seed = (("127.0.0.1", peers[0].port),)
        peers.append(Peer(peer_config(tmp_path / "p1", bootstrap=seed)))
        await peers[1].start()
        wild = Peer(peer_config(tmp_path / "wild", host="0.0.0.0", bootstrap=seed))
        peers.append(wild)
        await wild.start()
        status = wild.status()
        assert status["address_known"] is True
        assert status["address"] == f"127.0.0.1:{wild.port}"
        assert wild.replicator.sign_entry(b"k" * 20, 1, b"i" * 32, 0, 0).host == "127.0.0.1"
    finally:
        await stop_all(peers)


def test_cli_dual_stack_peer_with_advertise_serves_put_and_get(tmp_path: Path) -> None:
    """difs-peer join --listen :: --advertise [::1] (processes), a second peer joined
    through [::1]:P; difs put via --peer [::1]:P and get via --peer localhost:P."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env["DIFS_TOKEN_FILE"] = str(tmp_path / "a" / "control.token")
    procs = []
    try:
        first, seed = start_peer_process(tmp_path / "a", "--listen", "::", "--advertise", "[::1]")
        procs.append(first)
        assert seed.startswith("[::1]:")
        port = seed.rsplit(":", 1)[1]
        second, other = start_peer_process(
            tmp_path / "b", "--listen", "::1", "--bootstrap", f"[::1]:{port}"
        )
        procs.append(second)
        src = tmp_path / "in.bin"
        src.write_bytes(os.urandom(200_000))
        put = subprocess.run(
            [str(BIN / "difs"), "put", str(src), "/v6/cli.bin", "--peer", f"[::1]:{port}"],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert put.returncode == 0, put.stderr
        out = tmp_path / "out.bin"
        get = subprocess.run(
            [
                str(BIN / "difs"),
                "get",
                "/v6/cli.bin",
                "-o",
                str(out),
                "--peer",
                f"localhost:{port}",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert get.returncode == 0, get.stderr
        assert out.read_bytes() == src.read_bytes()
        assert other.startswith("[::1]:")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            proc.wait(timeout=20)


async def test_a_fetch_never_takes_another_node_at_a_holders_address(tmp_path: Path) -> None:
    """The only holder of an object is replaced by a fresh node on the same port: the
    fetch sees the HELLO's node ID is not the entry's signer, does not use it, and fails
    as a network error naming it (not "not found" from the wrong peer)."""
    peers = [Peer(peer_config(tmp_path / "p0"))]
    await peers[0].start()
    try:
        for i in (1, 2):
            p = Peer(peer_config(tmp_path / f"p{i}", bootstrap=(peers[0].address,)))
            await p.start()
            peers.append(p)
        me = Identity.generate()
        async with Client(peers[0].address, token=peers[0].control_token, publisher=me) as c:
            await c.put(io.BytesIO(b"only" * 10_000), "/one/copy", replicas=1)
        holder = next(p for p in peers if p.replicator.holdings.all())
        reader = next(p for p in peers if p is not holder)
        await holder.stop()
        peers.remove(holder)
        impostor = Peer(
            peer_config(tmp_path / "impostor", port=holder.port, bootstrap=(reader.address,))
        )
        await impostor.start()
        peers.append(impostor)
        async with Client(reader.address) as c:
            with pytest.raises(NetworkError, match="not the holder its entries name"):
                await c.get("/one/copy", io.BytesIO())
    finally:
        await stop_all(peers)


def test_status_says_when_the_address_is_not_known(capsys: pytest.CaptureFixture[str]) -> None:
    """difs-peer status shows the bound address and warns while the advertised one is
    not known (a wildcard bind without --advertise)."""
    status = {
        "node_id": "ab" * 20,
        "address": "127.0.0.1:4100",
        "listen": "0.0.0.0:4100",
        "address_known": False,
        "routing_table": 0,
        "records": 0,
        "entries": 0,
        "storage": {"used": 0, "capacity": 1, "segments": 0},
        "contacts": [],
    }
    print_status(status)
    out = capsys.readouterr().out
    assert "listening on 0.0.0.0:4100" in out
    assert "not known yet" in out
    print_status({**status, "listen": "127.0.0.1:4100", "address_known": True})
    out = capsys.readouterr().out
    assert "listening on" not in out and "not known" not in out


def test_cli_a_peer_name_that_does_not_resolve_is_a_network_error(tmp_path: Path) -> None:
    """difs with --peer (or $DIFS_PEER) naming a host that does not resolve fails with
    the network exit code and a message naming the host."""
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"), DIFS_PEER="no-such-host.invalid:4000")
    for extra in ([], ["--peer", "no-such-host.invalid:4000"]):
        out = subprocess.run(
            [str(BIN / "difs"), "stat", "/x", *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert out.returncode == 9, out.stderr
        assert "cannot resolve host name 'no-such-host.invalid'" in out.stderr
