"""The DHT datagram codec: golden vectors, round trips, and total decoding of peer bytes.

Golden vectors live in tests/data/dhtwire/, one datagram of each kind, written with
u-msgpack (what stock rpcudp peers send). After a deliberate change of the format, rewrite
them with ``DIFS_REGEN_GOLDEN=1 pytest tests/test_dhtwire.py`` and review the diff.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

import pytest
import umsgpack
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p import dhtwire
from difs_p2p.dhtwire import (
    AddEntriesArgs,
    EntriesReply,
    FindArgs,
    FindEntriesArgs,
    IdentifyArgs,
    IdentifyReply,
    LeaveArgs,
    PingArgs,
    Reply,
    Request,
    StoreArgs,
    StoreReply,
    StunArgs,
    ValueReply,
)
from difs_p2p.errors import WireError
from difs_p2p.identity import NodeId
from difs_p2p.routing import Contact

GOLDEN_DIR = Path(__file__).parent / "data" / "dhtwire"
REGEN_GOLDEN = os.environ.get("DIFS_REGEN_GOLDEN") == "1"

MSG_ID = bytes(range(20))
ME = bytes(range(100, 120))
KEY = bytes(range(200, 220))
TOKEN = bytes(range(16))
NONCE = bytes(range(50, 66))
PEER = Contact(NodeId(bytes(range(30, 50))), "192.0.2.7", 4001)

# One request of each RPC: (body as stock rpcudp writes it, typed arguments)
REQUESTS: dict[str, tuple[list[Any], dhtwire.RequestArgs]] = {
    "ping": (["ping", [ME]], PingArgs(ME)),
    "stun": (["stun", []], StunArgs()),
    "leave": (["leave", [ME]], LeaveArgs(ME)),
    "identify": (["identify", [ME, NONCE, bytes(80)]], IdentifyArgs(ME, NONCE, padded=True)),
    "find_node": (["find_node", [ME, KEY]], FindArgs(ME, KEY)),
    "find_value": (["find_value", [ME, KEY], TOKEN], FindArgs(ME, KEY)),
    "find_entries": (
        ["find_entries", [ME, KEY, 0, True]],
        FindEntriesArgs(ME, KEY, 0, with_value=True),
    ),
    "store": (
        ["store", [ME, KEY, b"\x01v", [b"e1", b"e2"]]],
        StoreArgs(ME, KEY, b"\x01v", (b"e1", b"e2")),
    ),
    "add_entries": (["add_entries", [ME, KEY, [b"e1"]]], AddEntriesArgs(ME, KEY, (b"e1",))),
}

# One reply of each shape: (body as a stock peer writes it, its typed decoding)
CONTACTS = [[PEER.node_id, PEER.host, PEER.port]]
REPLIES: dict[str, tuple[object, object]] = {
    "ping_reply": (ME, ME),
    "stun_reply": (["192.0.2.7", 4001], ["192.0.2.7", 4001]),
    "find_node_reply": (CONTACTS, [PEER]),
    "find_value_reply": ({"value": b"\x01v"}, ValueReply(b"\x01v")),
    "find_entries_reply": (
        {"entries": [b"e1"], "next": 1, "nodes": CONTACTS, "digest": TOKEN, "value": None},
        EntriesReply([b"e1"], 1, [PEER], TOKEN, has_value=True, value=None),
    ),
    "identify_reply": ([b"k" * 32, b"s" * 64, TOKEN], IdentifyReply(b"k" * 32, b"s" * 64, TOKEN)),
    "store_reply": ([True, 2], StoreReply(True, 2)),
    "token_reply": ({"token": TOKEN}, TOKEN),
}


def _decode_reply(name: str, body: object) -> object:
    """The typed decoding of a golden reply body."""
    limit = 40
    if name == "find_node_reply":
        return dhtwire.decode_contacts(body, limit)
    if name == "find_value_reply":
        return dhtwire.decode_find_value(body, limit)
    if name == "find_entries_reply":
        return dhtwire.decode_find_entries(body, limit)
    if name == "identify_reply":
        return dhtwire.decode_identify(body)
    if name == "store_reply":
        return dhtwire.decode_store(body)
    if name == "token_reply":
        return dhtwire.token_reply(body)
    return body


def _golden(name: str, data: bytes) -> bytes:
    path = GOLDEN_DIR / f"{name}.bin"
    if REGEN_GOLDEN:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return path.read_bytes()


@pytest.mark.parametrize("name", list(REQUESTS))
def test_request_golden_vectors(name: str) -> None:
    """Each request is byte for byte what rpcudp sends, and decodes to its typed value."""
    body, typed = REQUESTS[name]
    stock = b"\x00" + MSG_ID + umsgpack.packb(body)
    data = _golden(name, stock)
    assert data == stock
    token = body[2] if len(body) == 3 else None
    assert dhtwire.encode_request(MSG_ID, body[0], dhtwire.encode_args(typed), token) == data
    message = dhtwire.decode_datagram(data)
    assert message == Request(MSG_ID, body[0], body[1], token)
    assert isinstance(message, Request)
    assert dhtwire.decode_args(message.name, message.args) == typed


@pytest.mark.parametrize("name", list(REPLIES))
def test_reply_golden_vectors(name: str) -> None:
    """Each reply is byte for byte what rpcudp sends, and decodes to its typed value."""
    body, typed = REPLIES[name]
    stock = b"\x01" + MSG_ID + umsgpack.packb(body)
    data = _golden(name, stock)
    assert data == stock
    assert dhtwire.encode_reply(MSG_ID, body) == data
    message = dhtwire.decode_datagram(data)
    assert message == Reply(MSG_ID, body)
    assert _decode_reply(name, body) == typed
    if hasattr(typed, "encode"):
        assert dhtwire.encode_reply(MSG_ID, typed.encode()) == data


@pytest.mark.parametrize(
    ("data", "field"),
    [
        (b"", "datagram"),
        (b"\x00" + MSG_ID, "datagram"),
        (b"\x02" + MSG_ID + umsgpack.packb(1), "kind"),
        (b"\x00" + MSG_ID + b"\xc1", "body"),
        (b"\x00" + MSG_ID + umsgpack.packb(1) + b"\x00", "body"),
        (b"\x00" + MSG_ID + umsgpack.packb({"x": 1}), "request"),
        (b"\x00" + MSG_ID + umsgpack.packb(["nope", []]), "name"),
        (b"\x00" + MSG_ID + umsgpack.packb(["ping", 5]), "args"),
        (b"\x00" + MSG_ID + umsgpack.packb([1, 2, 3, 4]), "request"),
    ],
)
def test_bad_envelopes_name_the_field(data: bytes, field: str) -> None:
    """A datagram that does not decode raises WireError naming the field."""
    with pytest.raises(WireError) as caught:
        dhtwire.decode_datagram(data)
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("name", "args", "outcome"),
    [
        ("ping", [b"short"], WireError),
        ("ping", [], WireError),
        ("find_node", [ME], WireError),
        ("find_node", [ME, b"x" * 19], WireError),
        ("leave", [], LeaveArgs(None)),
        ("leave", [5], LeaveArgs(None)),
        ("identify", [ME, b"short"], IdentifyArgs(ME, None)),
        ("identify", [ME, NONCE, bytes(257)], IdentifyArgs(ME, None, padded=True)),
        ("identify", [ME, NONCE], IdentifyArgs(ME, NONCE)),
        ("find_entries", [ME, KEY, "x"], FindEntriesArgs(ME, KEY, 0)),
        ("find_entries", [ME, KEY, 3, 1], FindEntriesArgs(ME, KEY, 3, with_value=False)),
        ("store", [ME, KEY, 1, 2], StoreArgs(ME, KEY, None)),
        ("store", [ME, KEY, b"x" * 8001], StoreArgs(ME, KEY, None)),
        ("store", [ME, KEY, b"v", 7], StoreArgs(ME, KEY, b"v", ())),
        ("store", [ME, KEY, b"v", [b"a", 1, b"x" * 8001]], StoreArgs(ME, KEY, b"v", (b"a",))),
        ("add_entries", [ME, KEY], AddEntriesArgs(ME, KEY, ())),
        ("add_entries", [ME, KEY, "x"], AddEntriesArgs(ME, KEY, ())),
    ],
)
def test_request_arguments(name: str, args: list[object], outcome: object) -> None:
    """Malformed ids drop the request; other malformed parts become refusals, as peers
    have always answered them."""
    if outcome is WireError:
        with pytest.raises(WireError):
            dhtwire.decode_args(name, args)
    else:
        assert dhtwire.decode_args(name, args) == outcome


def test_ipv6_contacts_decode_and_mapped_ones_become_ipv4() -> None:
    """IPv6 contacts are accepted; an IPv4-mapped one becomes plain IPv4 text."""
    body = [[PEER.node_id, "fd77::1", 4000], [PEER.node_id, "::ffff:10.77.0.2", 4001]]
    found = dhtwire.decode_contacts(body, 40)
    assert [c.address for c in found] == [("fd77::1", 4000), ("10.77.0.2", 4001)]


@pytest.mark.parametrize(
    "body",
    [
        [[PEER.node_id, "example.com", 1]],
        [[PEER.node_id, "192.0.2.1\x00", 1]],
        [[PEER.node_id, "::", 1]],
        [[PEER.node_id, "ff02::1", 1]],
        [[PEER.node_id, "fe80::1%eth0", 1]],
        [[PEER.node_id, "192.0.2.1", 0]],
        [[PEER.node_id, "192.0.2.1", 65536]],
        [[PEER.node_id, "255.255.255.255", 1]],
        [[b"x" * 19, "192.0.2.1", 1]],
        [[PEER.node_id, "192.0.2.1"]],
        "nodes",
        [[PEER.node_id, "192.0.2.1", 1]] * 41,
    ],
)
def test_bad_contact_lists_are_refused(body: object) -> None:
    """A contact list with any contact that is not a valid IP peer is refused whole."""
    with pytest.raises(WireError):
        dhtwire.decode_contacts(body, 40)


@pytest.mark.parametrize(
    "body",
    [
        {"value": 5},
        {"value": b"v", "x": 1},
        {"entries": "x", "nodes": []},
        {"entries": [], "nodes": 5},
        {"entries": [], "nodes": [], "value": 5},
        [1, 2],
    ],
)
def test_bad_lookup_replies_are_refused(body: object) -> None:
    """Replies of the wrong shape raise WireError whatever lookup asked."""
    rpc = "find_value" if isinstance(body, dict) and "entries" not in body else "find_entries"
    if isinstance(body, list):
        rpc = "find_node"
    with pytest.raises(WireError):
        dhtwire.decode_lookup_reply(rpc, body, 40)


def test_entries_reply_without_the_flag_or_digest() -> None:
    """A reply of an older peer (no value key, no digest) decodes with those unknown."""
    got = dhtwire.decode_find_entries({"entries": [b"a", 5], "next": "x", "nodes": []}, 4)
    assert got == EntriesReply([b"a"], -1, [], None, has_value=False, value=None)


@pytest.mark.parametrize(
    ("body", "value"),
    [({"value": b"r"}, b"r"), ({"value": b"r", "x": 1}, b"r"), ({"value": 5}, None), ([], None)],
)
def test_value_of_a_reply_read_for_the_record(body: object, value: bytes | None) -> None:
    """A record read on its own is any map with bytes under "value"; else there is none."""
    assert dhtwire.value_of(body) == value


def test_oversized_request_is_refused_by_the_encoder() -> None:
    """A request body over 8,192 bytes is never sent (rpcudp's limit)."""
    with pytest.raises(ValueError, match="exceeds"):
        dhtwire.encode_request(MSG_ID, "store", [ME, KEY, b"x" * 8200], None)


_IDS = st.binary(min_size=20, max_size=20)
_ENTRIES = st.lists(st.binary(max_size=40), max_size=5).map(tuple)
_ARGS = st.one_of(
    st.builds(PingArgs, _IDS),
    st.just(StunArgs()),
    st.builds(LeaveArgs, _IDS | st.none()),
    st.builds(IdentifyArgs, _IDS, st.binary(min_size=16, max_size=16), st.booleans()),
    st.builds(FindArgs, _IDS, _IDS),
    st.builds(FindEntriesArgs, _IDS, _IDS, st.integers(0, 2**32), st.booleans()),
    st.builds(StoreArgs, _IDS, _IDS, st.binary(max_size=100), _ENTRIES | st.none()),
    st.builds(AddEntriesArgs, _IDS, _IDS, _ENTRIES),
)
_NAMES = {
    PingArgs: "ping",
    StunArgs: "stun",
    LeaveArgs: "leave",
    IdentifyArgs: "identify",
    FindArgs: "find_node",
    FindEntriesArgs: "find_entries",
    StoreArgs: "store",
    AddEntriesArgs: "add_entries",
}


@given(_ARGS, st.binary(min_size=20, max_size=20), st.none() | st.binary(min_size=16, max_size=16))
def test_requests_round_trip(args: dhtwire.RequestArgs, msg_id: bytes, token: bytes | None) -> None:
    """Every well-formed request decodes to what was encoded."""
    name = _NAMES[type(args)]
    data = dhtwire.encode_request(msg_id, name, dhtwire.encode_args(args), token)
    message = dhtwire.decode_datagram(data)
    assert isinstance(message, Request)
    assert (message.msg_id, message.name, message.token) == (msg_id, name, token)
    assert dhtwire.decode_args(message.name, message.args) == args


_CONTACTS = st.lists(
    st.builds(
        Contact,
        _IDS,
        st.sampled_from(["192.0.2.1", "10.0.0.2", "127.0.0.1"]),
        st.integers(1, 65535),
    ),
    max_size=6,
)


@given(
    st.lists(st.binary(max_size=30), max_size=5),
    st.integers(-1, 2**20),
    _CONTACTS,
    st.none() | st.binary(min_size=16, max_size=16),
    st.booleans(),
    st.none() | st.binary(max_size=30),
)
def test_entries_replies_round_trip(
    entries: list[bytes],
    nxt: int,
    nodes: list[Contact],
    digest: bytes | None,
    has_value: bool,
    value: bytes | None,
) -> None:
    """A find_entries reply decodes to what was encoded (through msgpack)."""
    reply = EntriesReply(entries, nxt, nodes, digest, has_value, value if has_value else None)
    body = dhtwire.unpack(dhtwire.pack(reply.encode()))
    assert dhtwire.decode_find_entries(body, 6) == reply


@given(st.binary(max_size=300))
def test_random_bytes_raise_only_wire_error(data: bytes) -> None:
    """Random bytes either decode or raise WireError, through every decoder."""
    for kind in (b"\x00", b"\x01"):
        datagram = kind + MSG_ID + data
        try:
            message = dhtwire.decode_datagram(datagram)
        except WireError:
            continue
        body = message.body if isinstance(message, Reply) else message.args
        if isinstance(message, Request):
            with contextlib.suppress(WireError):
                dhtwire.decode_args(message.name, message.args)
        for rpc in ("find_node", "find_value", "find_entries"):
            with contextlib.suppress(WireError):
                dhtwire.decode_lookup_reply(rpc, body, 40)
        for decode in (dhtwire.decode_identify, dhtwire.decode_store, dhtwire.decode_page):
            with contextlib.suppress(WireError):
                decode(body)
        dhtwire.token_reply(body)
        dhtwire.decode_count(body)
        dhtwire.value_of(body)


_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=30)
    | st.sampled_from([ME, KEY, TOKEN, NONCE])
    | st.text(max_size=10)
    | st.sampled_from(["ping", "store", "find_entries", "value", "entries", "nodes", "next"]),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=20,
)


@given(st.sampled_from(sorted(dhtwire.RPCS)), st.lists(_VALUES, max_size=5), _VALUES)
def test_any_msgpack_value_raises_only_wire_error(
    name: str, args: list[object], body: object
) -> None:
    """Well-formed msgpack of any shape, as arguments or as a reply, either decodes or
    raises WireError."""
    for call in (
        lambda: dhtwire.decode_args(name, args),
        lambda: dhtwire.decode_args(name, [ME, *args]),
        lambda: dhtwire.decode_args(name, [ME, KEY, *args]),
        lambda: dhtwire.decode_lookup_reply("find_node", body, 40),
        lambda: dhtwire.decode_lookup_reply("find_value", body, 40),
        lambda: dhtwire.decode_lookup_reply("find_entries", body, 40),
        lambda: dhtwire.decode_identify(body),
        lambda: dhtwire.decode_store(body),
        lambda: dhtwire.decode_page(body),
    ):
        with contextlib.suppress(WireError):
            call()


_STOCK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.binary(max_size=300)
    | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=8) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=30,
)


@given(_STOCK_VALUES)
def test_datagram_codec_is_the_stock_encoding_byte_for_byte(value: object) -> None:
    """Our C msgpack codec writes exactly what u-msgpack (rpcudp's) writes, and reads it."""
    assert dhtwire.pack(value) == umsgpack.packb(value)
    assert dhtwire.unpack(umsgpack.packb(value)) == value


@pytest.mark.parametrize(
    ("info", "raw"),
    [
        (dhtwire.PeerInfo(4100), b"\x01\x10\x04\x00"),
        (dhtwire.PeerInfo(65535, "eu-west.rack_3"), b"\x01\xff\xff\x0eeu-west.rack_3"),
        (dhtwire.PeerInfo(1, "z" * 32), b"\x01\x00\x01\x20" + b"z" * 32),
    ],
)
def test_the_identify_info_block_round_trips(info: dhtwire.PeerInfo, raw: bytes) -> None:
    """The info block: version, TCP port, zone length, zone; decoded back exactly."""
    assert info.encode() == raw
    assert dhtwire.decode_info(raw) == info


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\x01\x10\x04",  # short
        b"\x02\x10\x04\x00",  # unknown version
        b"\x01\x00\x00\x00",  # port 0
        b"\x01\x10\x04\x02a",  # zone shorter than its length
        b"\x01\x10\x04\x01ab",  # trailing bytes
        b"\x01\x10\x04\x01 ",  # a space in the zone
        b"\x01\x10\x04\x01\xff",  # not ASCII
        b"\x01\x10\x04\x21" + b"z" * 33,  # zone over 32
        "text",
        None,
    ],
)
def test_malformed_info_blocks_are_wire_errors(raw: object) -> None:
    """Any info block that is not exactly well formed is a WireError."""
    with pytest.raises(WireError):
        dhtwire.decode_info(raw)


def test_identify_replies_old_and_new_decode() -> None:
    """Older peers' replies (no token, token) still decode; the new one carries info;
    the request that asks for info is padded so that the reply fits."""
    key, sig = b"k" * 32, b"s" * 64
    old = dhtwire.decode_identify([key, sig])
    assert (old.token, old.info) == (None, None)
    info = dhtwire.PeerInfo(4101, "rack-1").encode()
    new = dhtwire.decode_identify([key, sig, None, info])
    assert (new.token, new.info) == (None, info)
    assert dhtwire.decode_identify(dhtwire.IdentifyReply(key, sig, TOKEN, info).encode()) == (
        dhtwire.IdentifyReply(key, sig, TOKEN, info)
    )
    with pytest.raises(WireError):
        dhtwire.decode_identify([key, sig, TOKEN, b"x" * 37])
    ask = dhtwire.IdentifyArgs(b"i" * 20, b"n" * 16, padded=True, info=True)
    args = dhtwire.encode_args(ask)
    assert dhtwire.decode_args("identify", args) == ask
    request = dhtwire.encode_request(b"m" * 20, "identify", args, None)
    longest = dhtwire.IdentifyReply(key, sig, TOKEN, dhtwire.PeerInfo(65535, "z" * 32).encode())
    assert len(dhtwire.encode_reply(b"m" * 20, longest.encode())) <= len(request)
    plain = dhtwire.IdentifyArgs(b"i" * 20, b"n" * 16, padded=True)
    assert dhtwire.decode_args("identify", dhtwire.encode_args(plain)) == plain
