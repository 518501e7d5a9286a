"""The control plane: the permission table (and its copy in docs/PROTOCOL.md), role
proofs, the control token, and the upload byte budget."""

from __future__ import annotations

import asyncio
import os
import re
import stat
from pathlib import Path

import pytest

from difs_p2p import wire
from difs_p2p.control import (
    CONTROL_TABLE,
    Access,
    OperatorCredential,
    PeerCredential,
    Role,
    check_proof,
    load_or_create_token,
    may_ask,
    permitted,
)
from difs_p2p.errors import BusyError, IntegrityError, StorageError, UsageError
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from difs_p2p.segments import segment_hash
from difs_p2p.transfer import BudgetedPool, ByteBudget, Connection
from tests.helpers import peer_config, start_peers, stop_all, wait_for

PROTOCOL = Path(__file__).parent.parent / "docs" / "PROTOCOL.md"


def documented_table() -> dict[str, str]:
    """The permissions table of docs/PROTOCOL.md: request -> who may."""
    text = PROTOCOL.read_text()
    start = text.index("<!-- permissions-table")
    rows: dict[str, str] = {}
    for line in text[start:].splitlines()[1:]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        match = re.fullmatch(r"`([A-Za-z_]+)`", cells[0])
        if match:
            rows[match.group(1)] = cells[1]
    return rows


def test_the_documented_permissions_are_the_code_table() -> None:
    """docs/PROTOCOL.md lists every request with the role the code requires, and no other."""
    assert documented_table() == {op: rule.access.value for op, rule in CONTROL_TABLE.items()}


def test_strangers_may_only_read_probe_resolve_release_and_report() -> None:
    """The stranger's part of the table is exactly the one the design allows."""
    open_to_strangers = {op for op, rule in CONTROL_TABLE.items() if may_ask(Role.STRANGER, rule)}
    assert open_to_strangers == {
        "HELLO", "GET_SEG", "holds", "holds_ranges", "resolve", "release", "suspect", "prove",
    }  # fmt: skip
    assert CONTROL_TABLE["suspect"].access is Access.ANYONE_RATED


def test_every_control_operation_of_a_peer_has_a_row() -> None:
    """A peer answers exactly the operations of the table (frames are named in capitals)."""
    peer = Peer(peer_config(Path("/nonexistent")))
    assert set(peer._controls) == {op for op in CONTROL_TABLE if op.islower()}


def test_a_peer_holds_only_with_a_reason_for_that_range() -> None:
    """hold from a peer needs a reason naming the same range; the operator needs none."""
    rule = CONTROL_TABLE["hold"]
    args = {
        "key": "ab" * 20,
        "version": 2,
        "integrity": "cd" * 32,
        "segment_count": 4,
        "start": 0,
        "end": 3,
    }
    bare = rule.check(args)
    assert not permitted(Role.PEER, rule, bare) and permitted(Role.OPERATOR, rule, bare)
    reason = {"kind": "place", "key": "ab" * 20, "version": 2, "start": 0, "end": 3}
    assert permitted(Role.PEER, rule, rule.check({**args, "reason": reason}))
    assert not permitted(Role.STRANGER, rule, rule.check({**args, "reason": reason}))
    for bad in ({**reason, "end": 2}, {**reason, "kind": "gift"}, "place"):
        with pytest.raises(UsageError):
            rule.check({**args, "reason": bad})


def test_place_cannot_ask_for_a_copy_on_every_peer() -> None:
    """replicas is bounded (64) even for the operator."""
    args = {
        "key": "ab" * 20,
        "version": 1,
        "integrity": "cd" * 32,
        "segment_count": 1,
        "stripes": 1,
    }
    CONTROL_TABLE["place"].check({**args, "replicas": 64})
    with pytest.raises(UsageError):
        CONTROL_TABLE["place"].check({**args, "replicas": 1000})


def test_proofs_bind_the_nonce_the_serving_peer_and_the_secret() -> None:
    """An operator proof needs the token, a peer proof the key, both for this nonce and
    this serving peer; a peer proof gives the prover's node id."""
    token, nonce, server = os.urandom(32), os.urandom(32), os.urandom(20)
    operator = OperatorCredential(token).prove(nonce, server)
    assert check_proof(operator, nonce, server, token) == (Role.OPERATOR, None)
    for n, s, t in ((os.urandom(32), server, token), (nonce, os.urandom(20), token)):
        with pytest.raises(IntegrityError):
            check_proof(operator, n, s, t)
    with pytest.raises(IntegrityError):
        check_proof(operator, nonce, server, os.urandom(32))
    me = Identity.generate()
    proof = PeerCredential(me).prove(nonce, server)
    assert check_proof(proof, nonce, server, token) == (Role.PEER, bytes(me.node_id))
    with pytest.raises(IntegrityError):
        check_proof(proof, os.urandom(32), server, token)
    forged = wire.Auth(role="peer", key=Identity.generate().public_key, proof=proof.proof)
    with pytest.raises(IntegrityError):
        check_proof(forged, nonce, server, token)


def test_the_token_file_is_created_once_private_and_kept(tmp_path: Path) -> None:
    """control.token is 32 random bytes as hex, mode 0600, the same on every load."""
    path = tmp_path / "control.token"
    token = load_or_create_token(path)
    assert len(token) == 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == token.hex()
    assert load_or_create_token(path) == token
    path.write_text("not hex\n")
    with pytest.raises(StorageError, match="damaged"):
        load_or_create_token(path)


async def test_a_peer_keeps_its_token_across_restarts(tmp_path: Path) -> None:
    """Peer.control_token is DATA/control.token, unchanged by a restart."""
    peer = Peer(peer_config(tmp_path / "p"))
    await peer.start()
    first = peer.control_token
    await peer.stop()
    again = Peer(peer_config(tmp_path / "p"))
    await again.start()
    try:
        assert again.control_token == first
        assert (tmp_path / "p" / "control.token").read_text().strip() == first.hex()
    finally:
        await again.stop()


async def test_the_upload_budget_bounds_bytes_held_across_connections() -> None:
    """Buffers in use or kept count against one budget; a taker waits for room, first
    come first served, and gets it when another gives back."""
    budget = ByteBudget(100)
    a, b = BudgetedPool(budget, keep=1), BudgetedPool(budget, keep=1)
    first, other = await a.take(30), await a.take(30)
    assert budget.used == 60
    waiting = asyncio.create_task(b.take(50))
    await asyncio.sleep(0)
    assert not waiting.done()
    a.give(first)  # kept by a while its other upload is in flight: still counted
    await asyncio.sleep(0)
    assert not waiting.done() and budget.used == 60
    a.give(other)  # a has no upload in flight: it keeps nothing
    second = await asyncio.wait_for(waiting, 1)
    assert len(second) == 50 and budget.used == 50
    b.drop(second)
    assert budget.used == 0
    with pytest.raises(UsageError):
        await budget.take(101)


async def test_a_wait_for_upload_budget_is_bounded() -> None:
    """A taker that finds no room within its time is refused BUSY and leaves no claim."""
    budget = ByteBudget(100)
    await budget.take(80)
    with pytest.raises(BusyError):
        await budget.take(40, within=0.05)
    budget.give(80)
    assert budget.used == 0
    await budget.take(100, within=0.05)


async def test_an_idle_connection_holds_none_of_the_upload_budget(tmp_path: Path) -> None:
    """Once its upload is answered, a connection's buffer goes back to the shared budget."""
    peers = await start_peers(tmp_path, 1, upload_budget=(16 << 20) + 64)
    try:
        first = await Connection.open(
            peers[0].address, io_timeout=10, credential=PeerCredential(Identity.generate())
        )
        second = await Connection.open(
            peers[0].address, io_timeout=10, credential=PeerCredential(Identity.generate())
        )
        try:
            data = os.urandom(16 << 20)
            await first.send(wire.PutSeg(request_id=1, seg_id=segment_hash(data), data=data))
            assert isinstance(await first.read_frame(), wire.Ack)
            # first stays open, idle; the whole budget is free for another upload
            small = b"y" * 1024
            await second.send(wire.PutSeg(request_id=2, seg_id=segment_hash(small), data=small))
            assert isinstance(await second.read_frame(), wire.Ack)
            await wait_for(lambda: peers[0]._uploads.used == 0)
        finally:
            first.close()
            second.close()
    finally:
        await stop_all(peers)
