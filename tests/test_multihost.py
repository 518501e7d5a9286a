"""Peers on several hosts: real ``difs-peer``/``difs`` processes in network namespaces.

Hosts h1..hN on one bridge (tests/netns.py): 10.77.0.i and fd77::i. Each test builds its
own network and removes it; peers start in parallel, objects are small, timings short.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import wait_for_sync
from tests.netns import (
    BIN,
    PREFIX,
    Host,
    Net,
    PeerProc,
    netns_missing,
    nft_missing,
    ready,
    sh,
    sweep_stale,
)

MISSING = netns_missing()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")

PORT = 4000
KiB = 1 << 10
MiB = 1 << 20


LISTEN = "--listen"
# Maintenance fast enough for a test: rounds every 0.5 s, each reading every held name.
FAST_MAINTENANCE = ("--repair-interval", "0.5", "--resolve-every", "1", "--dead-after", "2")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    """Six hosts on a bridge (h6 is left without a peer where a test wants a pure client)."""
    with Net(tmp_path, hosts=6) as n:
        yield n


def hostport(host: str, port: int = PORT) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def host_of(address: str) -> str:
    return address.rsplit(":", 1)[0].strip("[]")


def start(
    net: Net, hosts: list[Host], *extra: str, v6: bool = False, bind: dict[int, str] | None = None
) -> list[PeerProc]:
    """A peer on each of ``hosts`` (port 4000, listening on the host's own address or
    ``bind[index]``); the first starts the network, the others join through it at once."""

    def args(h: Host) -> list[str]:
        addr = (bind or {}).get(h.index) or (h.ipv6 if v6 else h.ipv4)
        return [LISTEN, addr, "--port", str(PORT), *extra]

    first = net.start_peers((hosts[0], args(hosts[0])))[0]
    seed = hostport(hosts[0].ipv6 if v6 else hosts[0].ipv4)
    rest = net.start_peers(*((h, [*args(h), "--bootstrap", seed]) for h in hosts[1:]))
    return [first, *rest]


def publish(peer: PeerProc, src: Path, name: str, *args: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(peer.difs("put", str(src), name, "--json", *args))
    return result


def stat(host: Host, entry: str, name: str) -> dict[str, Any]:
    """``difs stat --json`` run in ``host`` through the peer at ``entry``."""
    result: dict[str, Any] = json.loads(host.difs("stat", name, "--peer", entry, "--json"))
    return result


def knows(peer: PeerProc, other: PeerProc) -> bool:
    """Whether ``other`` is among the contacts ``peer``'s status lists (its 10 nearest)."""
    return other.address in {c["address"] for c in peer.status()["contacts"]}


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def fetch(host: Host, entry: str, name: str, out: Path) -> bytes:
    """``difs get`` in ``host`` through the peer at ``entry``; the bytes it wrote."""
    host.difs("get", name, "--peer", entry, "-o", str(out))
    return out.read_bytes()


def _ours(tag: str) -> list[str]:
    """Namespaces and links whose name starts with ``tag``."""
    names = [line.split()[0] for line in sh("ip", "netns", "list").splitlines() if line.strip()]
    for line in sh("ip", "-o", "link", "show").splitlines():
        names.append(line.split(":", 2)[1].strip().split("@", 1)[0])
    return [n for n in names if n.startswith(tag) and not n[len(tag)].isdigit()]


def test_harness_links_cuts_and_cleans_up(tmp_path: Path) -> None:
    """Hosts reach each other over IPv4 and IPv6; a cut (link down, or a drop rule) and its
    restore work; closing leaves no namespace or link behind; a dead run's are swept."""
    with Net(tmp_path, hosts=2) as net:
        h1, h2 = net.hosts
        assert h1.reaches(h2.ipv4) and h1.reaches(h2.ipv6)
        for drop in [False] + ([True] if nft_missing() is None else []):
            h2.cut(drop=drop)
            assert not h1.reaches(h2.ipv4)
            h2.restore()
            assert h1.reaches(h2.ipv4)
        tag = net.tag
        assert len(_ours(tag)) == 2 + 2 + 1  # two namespaces, two veths, the bridge
    assert _ours(tag) == []
    # what a killed run left: its pid is gone, the next run removes it
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{PREFIX}{dead.pid:x}-1"
    sh("ip", "netns", "add", f"{stale}h1")
    sh("ip", "link", "add", f"{stale}br", "type", "bridge")
    assert set(sweep_stale()) >= {f"{stale}h1", f"{stale}br"}
    assert _ours(stale) == []


def test_publish_on_h2_fetch_on_h5(net: Net, tmp_path: Path) -> None:
    """Five hosts: an object published from h2 with r = 3 is fetched from h5, identical."""
    peers = start(net, net.hosts[:5])
    src = random_file(tmp_path / "src", 3 * MiB + 123)
    put = publish(peers[1], src, "/mh/a", "--replicas", "3")
    assert put["ranges"] and all(len(r["holders"]) == 3 for r in put["ranges"])
    assert fetch(net["h5"], peers[4].address, "/mh/a", tmp_path / "out") == src.read_bytes()
    st = stat(net["h5"], peers[4].address, "/mh/a")
    assert {host_of(s["address"]) for s in st["storages"]} <= {h.ipv4 for h in net.hosts[:5]}


def test_fetch_fails_over_when_a_holder_is_killed(net: Net, tmp_path: Path) -> None:
    """kill -9 of a holder during a fetch from another host: the fetch completes from the
    other copies, bytes identical."""
    peers = start(net, net.hosts[:5])
    # 8 MiB in 64 KiB segments: more than a stream's window (64 segments), so the fetch
    # below cannot finish while its output is not read
    src = random_file(tmp_path / "src", 8 * MiB)
    publish(peers[1], src, "/mh/big", "--replicas", "3", "--segment-size", "64KiB")
    entry = peers[4].address
    st = stat(net["h6"], entry, "/mh/big")
    last = max(s["segment"]["end"] for s in st["storages"])
    victims = [
        s["address"]
        for s in st["storages"]
        if s["segment"]["end"] == last and s["address"] != entry
    ]
    victim = next(p for p in peers if p.address == victims[0])
    # the client runs in h6 (no peer there): every byte crosses the bridge
    get = net["h6"].popen(
        str(BIN / "difs"),
        "get",
        "/mh/big",
        "--peer",
        entry,
        "-o",
        "-",
        text=False,
        env=net["h6"].env(tmp_path / "client"),
        stderr=subprocess.PIPE,
    )
    assert get.stdout is not None
    head = get.stdout.read(256 * KiB)
    victim.kill()
    rest = get.stdout.read()
    assert get.wait(timeout=60) == 0, get.stderr.read() if get.stderr else ""
    assert head + rest == src.read_bytes()


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_listen_on_any_address_announces_a_reachable_one(
    net: Net, tmp_path: Path, family: str
) -> None:
    """A peer on 0.0.0.0 (or ::) is a holder other hosts reach: its entries carry the host's
    address, and a fetch from another host (over IPv6 for ::) works."""
    v6 = family == "ipv6"
    anywhere = "::" if v6 else "0.0.0.0"
    peers = start(net, net.hosts[:5], v6=v6, bind={3: anywhere})
    entry = hostport(net["h3"].ipv6 if v6 else net["h3"].ipv4)
    peers[2].local = entry  # its printed address may be the wildcard until it learns one
    h3 = net["h3"].ipv6 if v6 else net["h3"].ipv4
    # without --advertise it learns its address from what other peers observe
    wait_for_sync(lambda: host_of(peers[2].status()["address"]) == h3, timeout=15)
    src = random_file(tmp_path / "src", 2 * MiB)
    # r = 5: every peer, so the one on h3 holds every range
    publish(peers[2], src, "/mh/any", "--replicas", "5")
    st = stat(net["h6"], entry, "/mh/any")
    mine = [s for s in st["storages"] if host_of(s["address"]) == h3]
    assert mine and all(s["live"] for s in mine), st["storages"]
    assert not any(host_of(s["address"]) in ("0.0.0.0", "::") for s in st["storages"])
    assert fetch(net["h6"], entry, "/mh/any", tmp_path / "out") == src.read_bytes()


def test_peer_behind_nat_advertises_the_routers_address(net: Net, tmp_path: Path) -> None:
    """A peer behind a NAT router (DNAT + SNAT) with --advertise of the router's public
    address holds copies that other hosts fetch through the router."""
    if nft_missing():
        pytest.skip(nft_missing() or "")
    peers = start(net, net.hosts[:4])
    router, inner = net.nat_host(public_index=100, port=PORT)
    public = hostport(router.ipv4)
    behind = ready(
        inner.start_peer(
            LISTEN,
            inner.ipv4,
            "--port",
            str(PORT),
            "--advertise",
            public,
            "--bootstrap",
            peers[0].address,
        )
    )
    behind.local = hostport(inner.ipv4)
    src = random_file(tmp_path / "src", 2 * MiB)
    # r = 5 (every peer): the one behind the router holds every range
    publish(behind, src, "/mh/nat", "--replicas", "5")
    st = stat(net["h6"], peers[0].address, "/mh/nat")
    assert {s["address"] for s in st["storages"] if s["live"]} >= {public}, st["storages"]
    assert not any(host_of(s["address"]) == inner.ipv4 for s in st["storages"])
    # the others stopped: the only copy left is behind the router
    for p in peers[1:]:
        p.kill()
    assert fetch(net["h6"], peers[0].address, "/mh/nat", tmp_path / "out") == src.read_bytes()


def test_partitioned_host_rejoins_and_sees_what_was_published_meanwhile(
    net: Net, tmp_path: Path
) -> None:
    """A host cut off until its routing table is empty rejoins once its link is back, and
    `difs get` through it returns the version published during the cut."""
    peers = start(net, net.hosts[:5], *FAST_MAINTENANCE)
    v1 = random_file(tmp_path / "v1", 256 * KiB)
    # r = 5: h4 holds the name, so its maintenance keeps asking the DHT about it
    publish(peers[1], v1, "/mh/part", "--replicas", "5")
    cut = peers[3]
    net["h4"].cut()
    # every request of the isolated peer is lost: its contacts are evicted, and the others
    # forget it too (nobody would call it back once the link is up)
    wait_for_sync(lambda: cut.status()["routing_table"] == 0, timeout=60)
    wait_for_sync(lambda: not any(knows(p, cut) for p in peers if p is not cut), timeout=60)
    v2 = random_file(tmp_path / "v2", 256 * KiB)
    publish(peers[1], v2, "/mh/part", "--replicas", "3", "--update")
    net["h4"].restore()
    wait_for_sync(lambda: cut.status()["routing_table"] > 0, timeout=60)

    def sees_v2() -> bool:
        out = tmp_path / "out"
        net["h4"].difs("get", "/mh/part", "--peer", cut.address, "-o", str(out), check=False)
        return out.exists() and out.read_bytes() == v2.read_bytes()

    wait_for_sync(sees_v2, timeout=30)


def test_copies_of_a_range_go_to_distinct_addresses(net: Net, tmp_path: Path) -> None:
    """Three peers on each of h1..h3 and one on h4, h5 (11 peers, 5 addresses): the 3 copies
    of every range (32 ranges) are on 3 distinct addresses."""
    h1 = net["h1"]
    first = net.start_peers((h1, [LISTEN, h1.ipv4, "--port", str(PORT)]))[0]
    others = [(h, PORT) for h in net.hosts[1:5]]
    others += [(h, PORT + i) for i in (1, 2) for h in net.hosts[:3]]
    rest = net.start_peers(
        *((h, [LISTEN, h.ipv4, "--port", str(p), "--bootstrap", first.address]) for h, p in others)
    )
    entry = rest[-1]
    # 256 segments of 4 KiB: 32 ranges, each placed on its own
    src = random_file(tmp_path / "src", MiB)
    publish(entry, src, "/mh/distinct", "--replicas", "3", "--segment-size", "4KiB")
    st = stat(net["h6"], entry.address, "/mh/distinct")
    by_range: dict[int, list[str]] = {}
    for s in st["storages"]:
        by_range.setdefault(s["segment"]["start"], []).append(host_of(s["address"]))
    assert len(by_range) == 32, st["ranges"]
    assert all(len(set(ips)) == len(ips) == 3 for ips in by_range.values()), by_range


def test_drained_peer_leaves_no_range_short(net: Net, tmp_path: Path) -> None:
    """`difs-peer leave` on a holder: when it has exited, every range still has r live
    copies elsewhere, and the object is fetched intact."""
    peers = start(net, net.hosts[:5], *FAST_MAINTENANCE)
    srcs = [random_file(tmp_path / f"src{n}", 512 * KiB) for n in range(3)]
    for n, src in enumerate(srcs):
        publish(peers[0], src, f"/mh/drain/{n}", "--replicas", "3", "--segment-size", "64KiB")
    leaving = peers[2]
    net["h3"].run(
        str(BIN / "difs-peer"),
        "leave",
        "--peer",
        leaving.address,
        env=net["h3"].env(leaving.home),
        timeout=120,
    )
    assert leaving.proc.wait(timeout=60) == 0
    for n, src in enumerate(srcs):
        st = stat(net["h6"], peers[4].address, f"/mh/drain/{n}")
        assert all(r["live"] >= 3 for r in st["ranges"]), st["ranges"]
        assert not any(s["address"] == leaving.address for s in st["storages"] if s["live"])
        out = tmp_path / f"out{n}"
        assert fetch(net["h6"], peers[4].address, f"/mh/drain/{n}", out) == src.read_bytes()


def test_peers_over_the_per_address_cap_still_hold_copies(net: Net, tmp_path: Path) -> None:
    """Six peers on one address (over the per-address routing cap of 4) and one on h2: an
    object published with r = 7 has a copy on every one of them."""
    h1 = net["h1"]
    first = net.start_peers((h1, [LISTEN, h1.ipv4, "--port", str(PORT)]))[0]
    rest = net.start_peers(
        *(
            (h1, [LISTEN, h1.ipv4, "--port", str(PORT + i), "--bootstrap", first.address])
            for i in range(1, 6)
        ),
        (net["h2"], [LISTEN, net["h2"].ipv4, "--port", str(PORT), "--bootstrap", first.address]),
    )
    peers = [first, *rest]
    src = random_file(tmp_path / "src", 256 * KiB)
    publish(peers[-1], src, "/mh/cap", "--replicas", "7")
    st = stat(net["h6"], peers[-1].address, "/mh/cap")
    assert {s["address"] for s in st["storages"] if s["live"]} == {p.address for p in peers}
