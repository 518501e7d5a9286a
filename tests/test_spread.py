"""Copies on distinct failure domains and peers over the per-IP cap, with real peers on
127.0.0.1 (loopback counted as one address for the DHT's cap, as a host would be)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from difs_p2p.classgen import replace
from difs_p2p.config import PeerConfig
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from tests.helpers import FAST_DHT, client_for, stop_all, wait_for

SEG = 64 << 10

# Six peers on one address: at most 2 routing-table contacts of it, as on a host whose
# address holds more peers than the cap. Writes are not rate-limited (one address).
CAPPED = replace(
    FAST_DHT, max_contacts_per_ip=2, limit_loopback=True, write_rate=1e6, write_burst=1e6
)


async def start_capped(root: Path, n: int) -> list[Peer]:
    first = Peer(PeerConfig(data_dir=root / "p0", dht=CAPPED))
    await first.start()
    peers = [first]
    for i in range(1, n):
        peer = Peer(PeerConfig(data_dir=root / f"p{i}", dht=CAPPED, bootstrap=(first.address,)))
        await peer.start()
        peers.append(peer)
    return peers


async def test_peers_over_the_per_ip_cap_still_get_copies(tmp_path: Path) -> None:
    """With a cap of 2 contacts per address, an entry peer still places 4 copies of each
    range: peers its routing table has no room for hold some of them."""
    peers = await start_capped(tmp_path, 6)
    try:
        entry = peers[0]
        assert entry.dht is not None
        dht = entry.dht
        await wait_for(lambda: len(dht.overflow()) >= 3)
        src = tmp_path / "src"
        src.write_bytes(os.urandom(8 * SEG))
        async with client_for(entry, publisher=Identity.generate()) as client:
            result = await client.put(src, "/capped", segment_size=SEG, replicas=4)
            stat = await client.stat("/capped")
        in_table = {c.node_id.hex() for c in dht.contacts()}
        assert len(in_table) <= 2
        for r in result.ranges:
            holders = set(r["holders"])
            assert len(holders) == 4
            assert holders - in_table - {entry.node_id.hex()}, "no peer over the cap holds it"
        # on loopback each port is an address: four holders, four addresses per range
        assert [(r["holders"], r["addresses"]) for r in stat["ranges"]] == [(4, 4)] * len(
            result.ranges
        )
    finally:
        await stop_all(peers)


def test_the_per_ip_cap_is_a_peer_command_line_option(tmp_path: Path) -> None:
    """`difs-peer join --max-contacts-per-ip N` sets the cap; 0 is refused with exit 2."""
    peer = Path(sys.executable).with_name("difs-peer")
    bad = subprocess.run(
        [str(peer), "join", "--max-contacts-per-ip", "0", "--data", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--max-contacts-per-ip must be at least 1" in bad.stderr
    assert not (tmp_path / "p").exists()
