"""The control plane: the permission table (and its copy in docs/PROTOCOL.md), role
proofs, the control token, and the upload byte budget."""

from __future__ import annotations

import asyncio
import json
import os
import re
import stat
from pathlib import Path

import pytest

from difs_p2p import ops, wire
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
from difs_p2p.errors import (
    BusyError,
    IntegrityError,
    NotFoundError,
    RemoteNotFoundError,
    RemotePermissionDeniedError,
    RemoteRejectedError,
    RemoteUnsupportedError,
    StorageError,
    UsageError,
    WireError,
)
from difs_p2p.identity import Identity
from difs_p2p.names import NameKey
from difs_p2p.peer import Peer
from difs_p2p.segments import IntegrityRoot, SegmentId, segment_hash
from difs_p2p.transfer import BudgetedPool, ByteBudget, Connection, remote_error
from tests.helpers import peer_config, raw_call, start_peers, stop_all, wait_for

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
        "prove_many",
        "children",
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


# -- typed control operations (ops.py) ------------------------------------------------------

KEY, INTEGRITY = NameKey(b"\x0a" * 20), IntegrityRoot(SegmentId(b"\x0b" * 32))
NONCE = b"\x0c" * 32
SAMPLES: dict[str, tuple[object, object]] = {
    "status": (ops.StatusRequest(), ops.StatusReply({"id": "ab", "contacts": 3})),
    "resolve": (ops.ResolveRequest(KEY), ops.ResolveReply(("{}",), ("{}", "{}"), ("ee",))),
    "place": (
        ops.PlaceRequest(KEY, 2, INTEGRITY, 9, 3, 3),
        ops.PlaceReply(("aa",), (ops.PlacedRange(0, 4, ("01", "02")),), ("w",)),
    ),
    "hold": (
        ops.HoldRequest(KEY, 2, INTEGRITY, 9, 0, 4, ops.HoldReason("repair", KEY, 2, 0, 4)),
        ops.HoldReply("abcd", ("ef01", "2345")),
    ),
    "chain": (ops.ChainRequest(KEY, 3, 40, 1 << 20, 5, 3), ops.ChainReply(5)),
    "relay": (
        ops.RelayRequest(
            (ops.RelayHop("127.0.0.1", 4001, b"\x02" * 20), ops.RelayHop("::1", 9, b"\x03" * 20)),
            8 << 20,
        ),
        ops.RelayReply(2),
    ),
    "publish": (ops.PublishRequest("{}", ("aa", "bb")), ops.PublishReply(2, "h", 3, 3)),
    "release": (ops.ReleaseRequest(KEY, "{}"), ops.ReleaseReply(4096)),
    "holds": (ops.RangeRequest(KEY, 1, 0, 7), ops.HoldsReply(True)),
    "holds_ranges": (
        ops.RangesRequest((ops.RangeRequest(KEY, 1, 0, 7), ops.RangeRequest(KEY, 2, 8, 9))),
        ops.HoldsRangesReply((True, False)),
    ),
    "prove": (ops.ProveRequest(KEY, 1, 0, 7, NONCE), ops.ProveReply(True, b"\x01" * 64)),
    "prove_many": (
        ops.ProveManyRequest(
            (ops.RangeRequest(KEY, 1, 0, 7), ops.RangeRequest(KEY, 2, 3, 3)), NONCE
        ),
        ops.ProveManyReply((True, False), b"\x01" * 64),
    ),
    "check": (
        ops.CheckRequest(True),
        ops.CheckReply(5, 4, ("aa",), (), 1, (2, 8192), (0, 0), 300.0),
    ),
    "suspect": (ops.SuspectRequest(INTEGRITY), ops.SuspectReply(True, 1)),
    "abandon": (ops.AbandonRequest(), ops.AbandonReply(0)),
    "drain": (
        ops.DrainRequest("start", True),
        ops.DrainReply("draining", 4, 1, 1, 0, 0, ("ab/v1/0..3: why",), 8192, 0, 0, 1.5),
    ),
    "children": (ops.ChildrenRequest(KEY, 3), ops.ChildrenReply(("02ab",), 7)),
    "add_children": (ops.AddChildrenRequest(KEY, ("02ab", "02cd")), ops.AddChildrenReply(5)),
}


def test_every_control_operation_has_a_typed_request_and_reply() -> None:
    """ops.OPS has a row for exactly the control operations of the permission table."""
    assert set(ops.OPS) == {op for op in CONTROL_TABLE if op.islower()} == set(SAMPLES)


@pytest.mark.parametrize("op", sorted(SAMPLES))
def test_requests_and_replies_round_trip_through_the_one_codec(op: str) -> None:
    """What the asking side encodes, the serving side's check reads back; replies alike."""
    request, reply = SAMPLES[op]
    name, args = ops.encode_request(request)  # type: ignore[arg-type]
    assert name == op
    assert CONTROL_TABLE[op].check(json.loads(json.dumps(args))) == request
    body = json.loads(json.dumps(ops.encode_reply(op, reply)))
    assert ops.decode_reply(op, body) == reply


@pytest.mark.parametrize(("keep", "sent"), [(False, None), (True, True)])
def test_place_keep_round_trips_and_is_sent_only_when_set(keep: bool, sent: object) -> None:
    """``place`` with ``keep`` round-trips; without it the field is not sent (as before)."""
    request = ops.PlaceRequest(KEY, 2, INTEGRITY, 9, 3, 3, keep=keep)
    name, args = ops.encode_request(request)
    assert args.get("keep") == sent
    assert CONTROL_TABLE[name].check(json.loads(json.dumps(args))) == request


@pytest.mark.parametrize("keep", [1, "true", None])
def test_place_keep_that_is_not_a_boolean_is_refused(keep: object) -> None:
    """A ``keep`` that is not true or false is a UsageError (BAD_REQUEST), not truthiness."""
    _, args = ops.encode_request(ops.PlaceRequest(KEY, 2, INTEGRITY, 9, 3, 3))
    with pytest.raises(UsageError, match="keep"):
        CONTROL_TABLE["place"].check({**args, "keep": keep})


def test_a_resolve_with_a_second_key_round_trips() -> None:
    """``resolve`` with ``also`` (a claim object's key) and its nested reply round-trip."""
    request = ops.ResolveRequest(KEY, also=NameKey(b"\x0d" * 20))
    reply = ops.ResolveReply(("{}",), (), (), also=ops.ResolveReply((), ("{}",), ("ee",)))
    name, args = ops.encode_request(request)
    assert CONTROL_TABLE[name].check(json.loads(json.dumps(args))) == request
    body = json.loads(json.dumps(ops.encode_reply(name, reply)))
    assert ops.decode_reply(name, body) == reply


# Each reply shape as the handlers built it by hand before they answered typed replies:
# the JSON on the wire (keys in this order) must not change, so that peers of both kinds
# understand each other.
SIG = b"\x01" * 64
WIRE_REPLIES: list[tuple[str, object, dict[str, object]]] = [
    ("chain", ops.ChainReply(4), {"ranges": 4}),
    ("relay", ops.RelayReply(1), {"ready": 1}),
    ("hold", ops.HoldReply("ab", ("cd",)), {"entry": "ab", "chain": ["cd"]}),
    ("status", ops.StatusReply({"node_id": "ab", "contacts": 3}), {"node_id": "ab", "contacts": 3}),
    (
        "resolve",
        ops.ResolveReply(("{}",), (), ("ee", "ff"), "thin", 2, 20),
        {
            "manifests": ["{}"],
            "history": [],
            "holders": ["ee", "ff"],
            "network": "thin",
            "knows": 2,
            "most_seen": 20,
        },
    ),
    (
        "resolve",
        ops.ResolveReply(("{}",), (), (), also=ops.ResolveReply((), (), ("ee",))),
        {
            "manifests": ["{}"],
            "history": [],
            "holders": [],
            "network": "ok",
            "knows": 0,
            "most_seen": 0,
            "also": {
                "manifests": [],
                "history": [],
                "holders": ["ee"],
                "network": "ok",
                "knows": 0,
                "most_seen": 0,
            },
        },
    ),
    (
        "place",
        ops.PlaceReply(("aa", "bb"), (ops.PlacedRange(0, 4, ("01", "02")),), ("w",)),
        {
            "entries": ["aa", "bb"],
            "ranges": [{"start": 0, "end": 4, "holders": ["01", "02"]}],
            "warnings": ["w"],
        },
    ),
    ("hold", ops.HoldReply("abcd"), {"entry": "abcd"}),
    (
        "publish",
        ops.PublishReply(2, None, 1, 3, 11),
        {"accepted": 2, "winner": None, "readable_paths": 1, "quorum": 3, "required": 11},
    ),
    ("release", ops.ReleaseReply(4096), {"freed": 4096}),
    ("abandon", ops.AbandonReply(0), {"freed": 0}),
    ("holds", ops.HoldsReply(False), {"holds": False}),
    ("holds_ranges", ops.HoldsRangesReply((True, False)), {"holds": [True, False]}),
    ("prove", ops.ProveReply(False), {"holds": False}),
    ("prove", ops.ProveReply(True, SIG), {"holds": True, "sig": SIG.hex()}),
    ("prove_many", ops.ProveManyReply((False, False)), {"holds": [False, False]}),
    (
        "prove_many",
        ops.ProveManyReply((True, False), SIG),
        {"holds": [True, False], "sig": SIG.hex()},
    ),
    (
        "check",
        ops.CheckReply(5, 4, ("aa",), (), 1, (2, 8192), (0, 0), 300.0),
        {
            "checked": 5,
            "ok": 4,
            "corrupt": ["aa"],
            "missing": [],
            "healed": 1,
            "uploading": {"segments": 2, "bytes": 8192},
            "orphans": {"segments": 0, "bytes": 0},
            "orphan_grace": 300.0,
        },
    ),
    ("suspect", ops.SuspectReply(True, 1), {"damaged": True, "healed": 1}),
    (
        "drain",
        ops.DrainReply("done", 2, 2, 1, 1, 0, (), 4096, 1, 3, 0.5),
        {
            "ranges": 2,
            "done": 2,
            "already_safe": 1,
            "handed_over": 1,
            "unpublished": 0,
            "bytes_moved": 4096,
            "copies_made": 1,
            "records": 3,
            "state": "done",
            "failed": [],
            "seconds": 0.5,
        },
    ),
    ("children", ops.ChildrenReply(("02ab",), 0), {"entries": ["02ab"], "next": 0}),
    ("add_children", ops.AddChildrenReply(3), {"stored": 3}),
]


@pytest.mark.parametrize(("op", "reply", "body"), WIRE_REPLIES)
def test_a_typed_reply_encodes_to_the_json_handlers_sent_before(
    op: str, reply: object, body: dict[str, object]
) -> None:
    """A handler's typed reply leaves as the same JSON text the dict-built reply did."""
    assert json.dumps(ops.encode_reply(op, reply)) == json.dumps(body)


def test_every_reply_shape_has_its_wire_form() -> None:
    """WIRE_REPLIES covers every control operation."""
    assert {op for op, _, _ in WIRE_REPLIES} == set(ops.OPS)


def test_the_documented_replies_cover_every_operation() -> None:
    """docs/PROTOCOL.md's control-operation table has a reply for each operation."""
    text = PROTOCOL.read_text()
    section = text[text.index("### Control operations (CALL)") :]
    rows = {}
    for line in section.splitlines()[4:]:  # the heading, a blank line, the head, ---
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[2]
    assert set(rows) == set(ops.OPS) and all(rows.values())


@pytest.mark.parametrize(
    ("op", "body", "field"),
    [
        ("resolve", {"manifests": "x"}, "resolve.manifests"),
        ("resolve", {"holders": [1]}, "resolve.holders"),
        ("resolve", {"network": "x" * 17}, "resolve.network"),
        ("resolve", {"network": 1}, "resolve.network"),
        ("resolve", {"knows": -1}, "resolve.knows"),
        ("resolve", {"also": "x"}, "resolve.also"),
        ("resolve", {"also": {"also": {}}}, "resolve.also"),
        ("publish", {"accepted": 1, "winner": None, "required": "2"}, "publish.required"),
        ("holds", {}, "holds.holds"),
        ("hold", {"entry": "not hex"}, "hold.entry"),
        ("holds_ranges", {"holds": [True, 1]}, "holds_ranges.holds"),
        ("prove", {"holds": True, "sig": "zz"}, "prove.sig"),
        ("prove", {"holds": "yes"}, "prove.holds"),
        ("place", {"ranges": [{"start": 0, "end": -1}]}, "place.end"),
        ("publish", {"accepted": 1, "winner": 7}, "publish.winner"),
        ("abandon", {"freed": True}, "abandon.freed"),
        ("check", {"checked": 1, "ok": 1, "uploading": []}, "check.uploading"),
        ("suspect", {"damaged": False}, "suspect.healed"),
        ("drain", {"state": 7}, "drain.state"),
        ("drain", {"state": "done", "bytes_moved": -1}, "drain.bytes_moved"),
        ("drain", {"state": "done", "failed": [1]}, "drain.failed"),
    ],
)
def test_a_malformed_reply_is_the_peers_fault(op: str, body: dict[str, object], field: str) -> None:
    """A reply that does not decode raises WireError naming the field, never KeyError."""
    with pytest.raises(WireError) as caught:
        ops.decode_reply(op, body)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "request_",
    [
        ops.ProveRequest(KEY, 1, 7, 0, NONCE),  # end before start
        ops.ResolveRequest(NameKey(b"short")),
        ops.PlaceRequest(KEY, 1, INTEGRITY, 1, 1, 1000),  # over MAX_REPLICAS
        ops.HoldRequest(KEY, 1, INTEGRITY, 9, 0, 4, ops.HoldReason("place", KEY, 1, 0, 3)),
        ops.RangesRequest((ops.RangeRequest(KEY, 1, 0, 0),) * 1025),
        ops.PublishRequest("{}", ("aa", "not hex")),
    ],
    ids=["prove-range", "short-key", "replicas", "reason-range", "too-many-ranges", "entries"],
)
def test_our_own_bad_request_is_a_usage_error_before_sending(request_: ops.Op[object]) -> None:
    """A request the peer's check would refuse is refused here (UsageError), unsent."""
    with pytest.raises(UsageError):
        ops.encode_request(request_)


async def test_remote_errors_name_the_peer_and_stay_apart_from_misuse(tmp_path: Path) -> None:
    """A peer's BAD_REQUEST is a RemoteRejectedError, an unknown op UNSUPPORTED, NOT_FOUND a
    RemoteNotFoundError; each names the peer; exit codes follow the local meaning."""
    from difs_p2p.cli_common import EXIT_CODES

    def exit_code(exc: Exception) -> int:
        return next(code for cls, code in EXIT_CODES if isinstance(exc, cls))

    peers = await start_peers(tmp_path, 1)
    try:
        conn = await Connection.open(peers[0].address, io_timeout=10)
        where = f"{peers[0].address[0]}:{peers[0].address[1]}"
        try:
            with pytest.raises(RemoteRejectedError) as rejected:
                await raw_call(conn, "holds", key="zz", version=1, start=0, end=0)
            assert not isinstance(rejected.value, UsageError)
            assert where in str(rejected.value) and "BAD_REQUEST" in str(rejected.value)
            with pytest.raises(RemoteUnsupportedError) as unknown:
                await raw_call(conn, "teleport")
            assert unknown.value.code == wire.ErrorCode.UNSUPPORTED
            with pytest.raises(RemotePermissionDeniedError):
                await conn.request(ops.StatusRequest())  # a stranger
            reply = await conn.request(ops.RangeRequest(KEY, 1, 0, 0))
            assert reply == ops.HoldsReply(False)
            await conn.send(
                wire.GetSeg(request_id=0, seg_id=SegmentId(INTEGRITY), offset=0, length=0)
            )
            frame = await conn.read_frame()
            assert isinstance(frame, wire.Error)
            missing = remote_error(frame, conn.peer_address)
            assert isinstance(missing, RemoteNotFoundError) and isinstance(missing, NotFoundError)
            assert exit_code(missing) == 3 and exit_code(rejected.value) == 12
            assert exit_code(unknown.value) == 12
        finally:
            conn.close()
    finally:
        await stop_all(peers)
