"""The TCP frame codec: layout, golden vectors, limits, and total decoding of peer bytes.

Golden vectors live in tests/data/wire/, one frame of each type. After a deliberate change
of the format, rewrite them with ``DIFS_REGEN_GOLDEN=1 pytest tests/test_wire.py`` and
review the diff of the .bin files.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from difs_p2p import wire
from difs_p2p.errors import UsageError, WireError
from difs_p2p.segments import SegmentId
from difs_p2p.wire import (
    HEADER,
    HEADER_SIZE,
    MAX_CONTROL_PAYLOAD,
    MAX_SEGMENT,
    MESSAGES,
    Ack,
    Auth,
    Call,
    Data,
    Error,
    ErrorCode,
    Frame,
    FrameDecoder,
    GetSeg,
    Header,
    Hello,
    MsgType,
    PutSeg,
    Reply,
    decode_payload,
    encode,
    encode_bytes,
    parse_header,
)

GOLDEN_DIR = Path(__file__).parent / "data" / "wire"
REGEN_GOLDEN = os.environ.get("DIFS_REGEN_GOLDEN") == "1"

SEG_ID = SegmentId(bytes(range(32)))

# One frame of each type, with values that exercise every byte of every field.
GOLDEN: dict[str, Frame] = {
    "hello": Hello(request_id=0x01020304, peer="00112233445566778899aabbccddeeff01234567"),
    "call": Call(
        request_id=0x00000002,
        op="find_value",
        args={"key": "ab" * 16, "limit": 20, "tags": ["α", None, True, 1.5]},
    ),
    "reply": Reply(request_id=0x00000002, body={"found": False, "nested": {"n": -7}, "é": ""}),
    "error": Error(request_id=0xFFFFFFFF, code=ErrorCode.NOT_FOUND, message="no such segment: é"),
    "put_seg": PutSeg(request_id=0x0A0B0C0D, seg_id=SEG_ID, data=b"segment bytes\x00\xff"),
    "get_seg": GetSeg(request_id=7, seg_id=SEG_ID, offset=0x0102030405060708, length=4096),
    "data": Data(request_id=7, data=b"\x00\x01\x02 raw bytes"),
    "ack": Ack(request_id=0x0A0B0C0D, seg_id=SEG_ID, stored=True),
}


# The HELLO exchange that proves a role (docs/PROTOCOL.md, "Authentication"): the peer's
# nonce, an operator's proof, a peer's proof, the role granted.
GOLDEN_AUTH: dict[str, Frame] = {
    "hello_nonce": Hello(
        request_id=5, peer="00112233445566778899aabbccddeeff01234567", nonce=bytes(range(32))
    ),
    "hello_operator": Hello(
        request_id=6, peer=None, auth=Auth(role="operator", key=None, proof=b"\xa5" * 32)
    ),
    "hello_peer": Hello(
        request_id=7,
        peer="ffeeddccbbaa99887766554433221100fedcba98",
        auth=Auth(role="peer", key=bytes(range(32, 64)), proof=bytes(range(64))),
    ),
    "hello_granted": Hello(
        request_id=6, peer="00112233445566778899aabbccddeeff01234567", role="operator"
    ),
}


def golden_bytes(name: str) -> bytes:
    path = GOLDEN_DIR / f"{name}.bin"
    if REGEN_GOLDEN:
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_bytes({**GOLDEN, **GOLDEN_AUTH}[name]))
    return path.read_bytes()


def decode_one(raw: bytes) -> Frame:
    """Decode a buffer holding exactly one frame, the way the fast path does."""
    header = parse_header(raw[:HEADER_SIZE])
    return decode_payload(header, raw[HEADER_SIZE:])


def decode_from_view(raw: bytes) -> Frame:
    """Decode one frame from a memoryview of a receive buffer, as the transport does."""
    buffer = bytearray(raw)
    header = parse_header(memoryview(buffer)[:HEADER_SIZE])
    return decode_payload(header, memoryview(buffer)[HEADER_SIZE:])


def frame_bytes(msg_type: int, payload: bytes, *, request_id: int = 1) -> bytes:
    """A frame with any payload, bypassing the encoder's checks."""
    return HEADER.pack(1, msg_type, 0, request_id, len(payload)) + payload


def nested_lists(depth: int) -> list[Any]:
    """``depth`` lists, each inside the next."""
    value: list[Any] = []
    for _ in range(depth - 1):
        value = [value]
    return value


def expect_wire_error(raw: bytes, field: str, offset: int | None = None) -> WireError:
    with pytest.raises(WireError) as info:
        decode_one(raw)
    assert info.value.field == field
    if offset is not None:
        assert info.value.offset == offset
    return info.value


ALL_GOLDEN = b"".join(encode_bytes(frame) for frame in GOLDEN.values())


# -- the format -----------------------------------------------------------------------------


def test_message_table_covers_every_type_within_the_global_limit() -> None:
    """Every MsgType has a row, and no type allows more than MAX_PAYLOAD."""
    assert set(MESSAGES) == set(MsgType)
    assert all(0 <= s.min_payload <= s.max_payload <= wire.MAX_PAYLOAD for s in MESSAGES.values())
    assert wire.MAX_PAYLOAD == MAX_SEGMENT + 64
    assert MESSAGES[MsgType.PUT_SEG].max_payload == 32 + MAX_SEGMENT


def test_type_and_error_code_numbers_are_fixed() -> None:
    """The numbers on the wire never change meaning."""
    assert {t.name: int(t) for t in MsgType} == {
        "HELLO": 1, "CALL": 2, "REPLY": 3, "ERROR": 4,
        "PUT_SEG": 5, "GET_SEG": 6, "DATA": 7, "ACK": 8,
    }  # fmt: skip
    assert [(c.name, int(c)) for c in ErrorCode] == [
        ("BAD_REQUEST", 1), ("NOT_FOUND", 2), ("INTEGRITY", 3), ("NO_SPACE", 4),
        ("FORBIDDEN", 5), ("EXISTS", 6), ("DELETED", 7), ("BUSY", 8), ("INTERNAL", 9),
        ("UNSUPPORTED", 10), ("TIMEOUT", 11),
    ]  # fmt: skip


def test_get_seg_layout_spelled_out() -> None:
    """GET_SEG is header, segment id, u64 offset, u32 length, all big-endian."""
    raw = encode_bytes(
        GetSeg(request_id=0x11223344, seg_id=SegmentId(b"\xaa" * 32), offset=5, length=6)
    )
    assert raw == (
        b"\x01\x06\x00\x00\x11\x22\x33\x44\x00\x00\x00\x2c"
        + b"\xaa" * 32
        + b"\x00\x00\x00\x00\x00\x00\x00\x05"
        + b"\x00\x00\x00\x06"
    )


def test_ack_and_error_layout_spelled_out() -> None:
    """ACK is segment id then a flags byte; ERROR is a u16 code then UTF-8 text."""
    ack = encode_bytes(Ack(request_id=1, seg_id=SegmentId(b"\x00" * 32), stored=False))
    assert ack == b"\x01\x08\x00\x00\x00\x00\x00\x01\x00\x00\x00\x21" + b"\x00" * 33
    err = encode_bytes(Error(request_id=2, code=ErrorCode.BUSY, message="é"))
    assert err == b"\x01\x04\x00\x00\x00\x00\x00\x02\x00\x00\x00\x04\x00\x08\xc3\xa9"


def test_json_is_canonical() -> None:
    """JSON payloads have sorted keys, no spaces and raw UTF-8."""
    raw = encode_bytes(Call(request_id=1, op="put", args={"b": [1, 2], "a": "ü"}))
    assert raw[HEADER_SIZE:] == '{"a":"ü","b":[1,2],"op":"put"}'.encode()
    hello = encode_bytes(Hello(request_id=1, peer=None))
    assert hello[HEADER_SIZE:] == b'{"peer":null,"v":1}'


# -- golden vectors and round trips ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_encodes_exactly(name: str) -> None:
    """Encoding the reference frame gives the checked-in bytes."""
    assert encode_bytes(GOLDEN[name]) == golden_bytes(name)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_vector_decodes_to_the_frame(name: str) -> None:
    """The checked-in bytes decode to the reference frame, alone and through FrameDecoder."""
    raw = golden_bytes(name)
    assert decode_one(raw) == GOLDEN[name]
    assert decode_from_view(raw) == GOLDEN[name]
    assert FrameDecoder().feed(raw) == [GOLDEN[name]]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_roundtrip_each_type(name: str) -> None:
    """decode(encode(frame)) == frame, with the header naming the right type and length."""
    frame = GOLDEN[name]
    raw = encode_bytes(frame)
    header = parse_header(raw[:HEADER_SIZE])
    assert header.type.name.lower() == name
    assert header.length == len(raw) - HEADER_SIZE
    assert header.request_id == frame.request_id
    assert decode_one(raw) == frame


def test_encode_leaves_segment_bytes_uncopied() -> None:
    """PUT_SEG and DATA send the caller's buffer as its own part."""
    segment = memoryview(bytearray(b"x" * 1000))
    put = encode(PutSeg(request_id=1, seg_id=SEG_ID, data=segment))
    assert len(put) == 2 and put[1] is segment
    assert put[0] == encode_bytes(PutSeg(request_id=1, seg_id=SEG_ID, data=b"x" * 1000))[:44]
    data = encode(Data(request_id=1, data=segment))
    assert len(data) == 2 and data[1] is segment
    assert encode(Data(request_id=1, data=b"")) == [encode_header_bytes(MsgType.DATA, 1, 0)]


def encode_header_bytes(msg_type: MsgType, request_id: int, length: int) -> bytes:
    return HEADER.pack(1, msg_type, 0, request_id, length)


def test_encode_header_matches_parse_header() -> None:
    """encode_header writes what parse_header reads."""
    raw = wire.encode_header(MsgType.DATA, 99, 1234)
    assert raw == encode_header_bytes(MsgType.DATA, 99, 1234)
    assert parse_header(raw) == Header(1, MsgType.DATA, 0, 99, 1234)


def test_decode_payload_keeps_a_view_of_the_segment() -> None:
    """The fast path's receive buffer is not copied: PUT_SEG data is a view into it."""
    raw = bytearray(encode_bytes(PutSeg(request_id=3, seg_id=SEG_ID, data=b"abc")))
    header = parse_header(raw[:HEADER_SIZE])
    frame = decode_payload(header, memoryview(raw)[HEADER_SIZE:])
    assert isinstance(frame, PutSeg)
    assert isinstance(frame.data, memoryview) and frame.data.obj is raw
    assert bytes(frame.data) == b"abc"


# -- FrameDecoder: chunking, truncation, garbage ---------------------------------------------


def test_decoder_fed_one_byte_at_a_time_gives_the_same_frames() -> None:
    """Chunking does not matter: byte-by-byte input yields every frame, in order."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for i in range(len(ALL_GOLDEN)):
        frames += decoder.feed(ALL_GOLDEN[i : i + 1])
    assert frames == list(GOLDEN.values())
    assert decoder.buffered == 0
    decoder.eof()


@given(st.lists(st.integers(0, len(ALL_GOLDEN)), max_size=20))
def test_decoder_any_chunking_gives_the_same_frames(cuts: list[int]) -> None:
    """Splitting the stream at arbitrary points yields the same frames."""
    points = [0, *sorted(cuts), len(ALL_GOLDEN)]
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for start, end in itertools.pairwise(points):
        frames += decoder.feed(ALL_GOLDEN[start:end])
    assert frames == list(GOLDEN.values())


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_every_truncation_waits_for_the_rest(name: str) -> None:
    """Any prefix of a frame yields nothing and no error; the remainder completes it."""
    raw = encode_bytes(GOLDEN[name])
    for cut in range(len(raw)):
        decoder = FrameDecoder()
        assert decoder.feed(raw[:cut]) == []
        assert not decoder.broken
        assert decoder.feed(raw[cut:]) == [GOLDEN[name]]


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_stream_ending_inside_a_frame_is_an_error_at_eof(name: str) -> None:
    """eof() after a strict, non-empty prefix raises WireError; after whole frames it is fine."""
    raw = encode_bytes(GOLDEN[name])
    for cut in range(1, len(raw)):
        decoder = FrameDecoder()
        decoder.feed(raw[:cut])
        with pytest.raises(WireError):
            decoder.eof()
        assert decoder.broken
    decoder = FrameDecoder()
    decoder.feed(raw)
    decoder.eof()


def test_trailing_garbage_fails_only_after_the_valid_frames() -> None:
    """Frames before garbage are returned; the garbage's error comes on the next call."""
    decoder = FrameDecoder()
    garbage = b"GET / HTTP/1.1\r\n\r\n"
    frames = decoder.feed(ALL_GOLDEN + garbage)
    assert frames == list(GOLDEN.values())
    assert decoder.broken
    with pytest.raises(WireError) as info:
        decoder.feed(b"")
    assert (info.value.field, info.value.offset) == ("version", 0)
    with pytest.raises(WireError):
        decoder.feed(encode_bytes(GOLDEN["ack"]))
    with pytest.raises(WireError):
        decoder.eof()


def test_garbage_in_its_own_chunk_fails_at_once_and_breaks_the_decoder() -> None:
    """A bad header with no frame before it raises immediately; later input is refused."""
    decoder = FrameDecoder()
    assert decoder.feed(encode_bytes(GOLDEN["hello"])) == [GOLDEN["hello"]]
    with pytest.raises(WireError) as info:
        decoder.feed(HEADER.pack(1, 99, 0, 1, 0))
    assert info.value.field == "type"
    assert decoder.broken and decoder.buffered == 0
    with pytest.raises(WireError):
        decoder.feed(encode_bytes(GOLDEN["hello"]))


def test_bad_payload_after_valid_frames_is_deferred_too() -> None:
    """A frame whose payload does not decode also breaks the decoder after earlier frames."""
    bad = frame_bytes(MsgType.REPLY, b"[1]")
    decoder = FrameDecoder()
    assert decoder.feed(encode_bytes(GOLDEN["data"]) + bad) == [GOLDEN["data"]]
    with pytest.raises(WireError) as info:
        decoder.feed(b"")
    assert info.value.field == "json"


def test_decoder_buffers_at_most_the_frame_being_received() -> None:
    """Fed a large frame in chunks, the buffer never exceeds that frame's declared length."""
    frame = Data(request_id=1, data=bytes(200_000))
    raw = encode_bytes(frame) + encode_bytes(GOLDEN["ack"])
    decoder = FrameDecoder()
    frames: list[Frame] = []
    for start in range(0, len(raw), 7_001):
        frames += decoder.feed(raw[start : start + 7_001])
        assert decoder.buffered <= HEADER_SIZE + 200_000
    assert frames == [frame, GOLDEN["ack"]]
    big = FrameDecoder()
    assert big.feed(raw * 3) == [frame, GOLDEN["ack"]] * 3
    assert big.buffered == 0


# -- limits ----------------------------------------------------------------------------------


def test_header_claiming_4_gib_is_refused_without_allocation() -> None:
    """A u32 length of 4 GiB - 1 is refused by the header check, allocating nothing big."""
    raw = HEADER.pack(1, MsgType.PUT_SEG, 0, 1, 0xFFFF_FFFF)
    tracemalloc.start()
    try:
        with pytest.raises(WireError) as info:
            parse_header(raw)
        with pytest.raises(WireError):
            FrameDecoder().feed(raw + b"\x00" * 100)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (info.value.field, info.value.offset) == ("length", 8)
    assert peak < 1 << 20


@pytest.mark.parametrize(
    ("msg_type", "length"),
    [
        (MsgType.HELLO, MAX_CONTROL_PAYLOAD + 1),
        (MsgType.CALL, MAX_CONTROL_PAYLOAD + 1),
        (MsgType.REPLY, MAX_CONTROL_PAYLOAD + 1),
        (MsgType.ERROR, 2 + 1024 + 1),
        (MsgType.PUT_SEG, 32 + MAX_SEGMENT + 1),
        (MsgType.GET_SEG, 45),
        (MsgType.GET_SEG, 43),
        (MsgType.DATA, MAX_SEGMENT + 1),
        (MsgType.ACK, 34),
        (MsgType.ACK, 32),
        (MsgType.PUT_SEG, 31),
        (MsgType.ERROR, 1),
    ],
)
def test_length_outside_the_types_bounds_is_refused(msg_type: MsgType, length: int) -> None:
    """Each type has its own payload bounds, checked in the header."""
    with pytest.raises(WireError) as info:
        parse_header(HEADER.pack(1, msg_type, 0, 1, length))
    assert (info.value.field, info.value.offset) == ("length", 8)


def test_largest_lengths_are_accepted() -> None:
    """A length exactly at each type's limit parses."""
    for msg_type, spec in MESSAGES.items():
        assert parse_header(HEADER.pack(1, msg_type, 0, 1, spec.max_payload)).length == (
            spec.max_payload
        )


@pytest.mark.parametrize(
    ("raw", "field", "offset"),
    [
        (HEADER.pack(2, 1, 0, 1, 10), "version", 0),
        (HEADER.pack(0, 1, 0, 1, 10), "version", 0),
        (HEADER.pack(1, 0, 0, 1, 10), "type", 1),
        (HEADER.pack(1, 9, 0, 1, 10), "type", 1),
        (HEADER.pack(1, 1, 0x8000, 1, 10), "flags", 2),
        (b"\x01\x01\x00", "header", 3),
        (HEADER.pack(1, 1, 0, 1, 10) + b"\x00", "header", 12),
    ],
)
def test_bad_header_names_field_and_offset(raw: bytes, field: str, offset: int) -> None:
    """Version, type, flags and the header size are checked, naming what is wrong."""
    with pytest.raises(WireError) as info:
        parse_header(raw)
    assert (info.value.field, info.value.offset) == (field, offset)


def test_payload_not_matching_the_header_is_refused() -> None:
    """decode_payload refuses a payload whose size differs from the header's length."""
    header = parse_header(HEADER.pack(1, MsgType.DATA, 0, 1, 10))
    with pytest.raises(WireError) as info:
        decode_payload(header, b"short")
    assert info.value.field == "payload"


# -- JSON payloads ---------------------------------------------------------------------------


def test_deeply_nested_json_is_a_wire_error() -> None:
    """100000 levels of nesting raise WireError, not RecursionError."""
    payload = b'{"x":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    expect_wire_error(frame_bytes(MsgType.REPLY, payload), "json")
    with pytest.raises(WireError):
        FrameDecoder().feed(frame_bytes(MsgType.CALL, payload))


def test_json_depth_limit_is_32() -> None:
    """An object holding 31 nested lists (depth 32) decodes; one more level is refused."""
    ok = b'{"x":' + b"[" * 31 + b"]" * 31 + b"}"
    assert isinstance(decode_one(frame_bytes(MsgType.REPLY, ok)), Reply)
    too_deep = b'{"x":' + b"[" * 32 + b"]" * 32 + b"}"
    expect_wire_error(frame_bytes(MsgType.REPLY, too_deep), "json")
    nested_objects = b'{"a":' * 33 + b"{}" + b"}" * 33
    expect_wire_error(frame_bytes(MsgType.REPLY, nested_objects), "json")


@pytest.mark.parametrize(
    ("payload", "offset"),
    [
        (b'{"a":"\xff"}', 12 + 6),
        (b'{"a":"\xed\xa0\x80"}', 12 + 6),
        (b'{"a":', None),
        (b'{"a":1} {}', 12 + 8),
        (b"[1,2]", 12),
        (b'"text"', 12),
        (b"null", 12),
        (b'{"a":NaN}', 12),
        (b'{"a":Infinity}', 12),
        (b'{"a":-Infinity}', 12),
        (b'{"a":1e999}', 12),
        (b'{"a":1,"a":2}', 12),
        (b'{"a":"\\ud800"}', 12),
        (b'{"a":"\\udc00x"}', 12),
        (b'\xef\xbb\xbf{"a":1}', 12),
        (b'{"a":' + b"9" * 5000 + b"}", 12),
        (b"  ", None),
        (b"{'a':1}", 13),
    ],
)
def test_bad_json_payloads_are_wire_errors(payload: bytes, offset: int | None) -> None:
    """Invalid UTF-8 or JSON, non-objects, NaN/Infinity, duplicate keys, lone surrogates."""
    for msg_type in (MsgType.HELLO, MsgType.CALL, MsgType.REPLY):
        expect_wire_error(frame_bytes(msg_type, payload), "json", offset)


def test_whitespace_and_escaped_pairs_are_valid_json() -> None:
    """Non-canonical but valid JSON decodes: spaces, escapes, surrogate pairs as escapes."""
    payload = b' { "b" : [ 1 ] , "a" : "\\ud83d\\ude00\\u00e9" } '
    frame = decode_one(frame_bytes(MsgType.REPLY, payload))
    assert frame == Reply(request_id=1, body={"a": "😀é", "b": [1]})


def test_call_strips_op_from_args() -> None:
    """CALL's "op" becomes Call.op; the other keys are its args."""
    frame = decode_one(frame_bytes(MsgType.CALL, b'{"op":"store","key":"k","n":3}'))
    assert frame == Call(request_id=1, op="store", args={"key": "k", "n": 3})


@pytest.mark.parametrize(
    "payload",
    [
        b"{}",
        b'{"op":""}',
        b'{"op":1}',
        b'{"op":null}',
        b'{"op":["x"]}',
        b'{"op":"%s"}' % (b"x" * 65),
    ],
)
def test_call_needs_a_short_string_op(payload: bytes) -> None:
    """A CALL without a non-empty op of at most 64 characters is refused."""
    expect_wire_error(frame_bytes(MsgType.CALL, payload), "op", 12)


def test_call_op_of_64_characters_is_accepted() -> None:
    """64 characters is the longest op name."""
    frame = decode_one(frame_bytes(MsgType.CALL, b'{"op":"%s"}' % (b"y" * 64)))
    assert isinstance(frame, Call) and frame.op == "y" * 64 and frame.args == {}


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"peer":null}', "v"),
        (b'{"peer":null,"v":2}', "v"),
        (b'{"peer":null,"v":true}', "v"),
        (b'{"peer":null,"v":1.0}', "v"),
        (b'{"v":1}', "peer"),
        (b'{"peer":"abc","v":1}', "peer"),
        (b'{"peer":"%s","v":1}' % (b"A" * 40), "peer"),
        (b'{"peer":7,"v":1}', "peer"),
    ],
)
def test_hello_needs_version_and_a_node_id(payload: bytes, field: str) -> None:
    """HELLO carries v == 1 and a 40-digit lowercase hex node id or null."""
    expect_wire_error(frame_bytes(MsgType.HELLO, payload), field, 12)


def test_hello_ignores_unknown_keys() -> None:
    """Keys added by later versions do not break HELLO."""
    frame = decode_one(frame_bytes(MsgType.HELLO, b'{"peer":null,"v":1,"caps":["x"]}'))
    assert frame == Hello(request_id=1, peer=None)


@pytest.mark.parametrize("name", sorted(GOLDEN_AUTH))
def test_golden_hello_authentication_vectors(name: str) -> None:
    """The authentication HELLOs encode to the checked-in bytes and decode back."""
    raw = golden_bytes(name)
    assert encode_bytes(GOLDEN_AUTH[name]) == raw
    assert decode_one(raw) == GOLDEN_AUTH[name]
    assert FrameDecoder().feed(raw) == [GOLDEN_AUTH[name]]


def test_plain_hello_bytes_are_unchanged_by_authentication() -> None:
    """A HELLO without nonce, proof or role is the version-1 HELLO, byte for byte."""
    raw = encode_bytes(Hello(request_id=1, peer=None, nonce=None, auth=None, role=None))
    assert raw[HEADER_SIZE:] == b'{"peer":null,"v":1}'


@pytest.mark.parametrize(
    ("payload", "field"),
    [
        (b'{"peer":null,"v":1,"nonce":"00"}', "nonce"),
        (b'{"peer":null,"v":1,"nonce":"%s"}' % (b"AB" * 32), "nonce"),
        (b'{"peer":null,"v":1,"nonce":7}', "nonce"),
        (b'{"peer":null,"v":1,"auth":"x"}', "auth"),
        (b'{"peer":null,"v":1,"auth":{"role":["operator"]}}', "auth"),
        (b'{"peer":null,"v":1,"auth":{"role":"root","proof":"00"}}', "auth"),
        (b'{"peer":null,"v":1,"auth":{"role":"operator","proof":"00"}}', "auth.proof"),
        (
            b'{"peer":null,"v":1,"auth":{"role":"operator","key":"%s","proof":"%s"}}'
            % (b"00" * 32, b"00" * 32),
            "auth.key",
        ),
        (b'{"peer":null,"v":1,"auth":{"role":"peer","proof":"%s"}}' % (b"00" * 64), "auth.key"),
        (
            b'{"peer":null,"v":1,"auth":{"role":"peer","key":"%s","proof":"%s"}}'
            % (b"00" * 32, b"00" * 32),
            "auth.proof",
        ),
        (b'{"peer":null,"v":1,"role":"admin"}', "role"),
        (b'{"peer":null,"v":1,"role":["operator"]}', "role"),
    ],
)
def test_hello_authentication_fields_are_checked(payload: bytes, field: str) -> None:
    """A HELLO nonce is 32 bytes, an operator proof 32, a peer's key 32 and signature 64,
    all as lowercase hex; roles are stranger, peer or operator."""
    expect_wire_error(frame_bytes(MsgType.HELLO, payload), field, 12)


@pytest.mark.parametrize(
    "frame",
    [
        Hello(request_id=1, peer=None, nonce=b"short"),
        Hello(request_id=1, peer=None, auth=Auth(role="operator", key=None, proof=b"x" * 31)),
        Hello(request_id=1, peer=None, auth=Auth(role="peer", key=None, proof=b"x" * 64)),
        Hello(request_id=1, peer=None, auth=Auth(role="admin", key=None, proof=b"x" * 32)),
        Hello(request_id=1, peer=None, role="admin"),
    ],
)
def test_encoder_refuses_hello_authentication_the_decoder_would_refuse(frame: Frame) -> None:
    """A peer never sends a HELLO with a malformed nonce, proof or role."""
    with pytest.raises(UsageError):
        encode(frame)


# -- binary payloads -------------------------------------------------------------------------


def test_unknown_error_code_decodes_as_int() -> None:
    """Codes from a newer peer survive as plain ints."""
    frame = decode_one(frame_bytes(MsgType.ERROR, b"\x01\x00boom"))
    assert frame == Error(request_id=1, code=256, message="boom")
    assert isinstance(frame, Error) and not isinstance(frame.code, ErrorCode)


def test_error_message_must_be_utf8() -> None:
    """An ERROR message that is not UTF-8 is refused at its offset."""
    expect_wire_error(frame_bytes(MsgType.ERROR, b"\x00\x01ok\xc3"), "message", 12 + 2 + 2)


def test_long_error_message_is_cut_at_a_character_boundary() -> None:
    """Encoding keeps at most 1024 bytes of message without splitting a character."""
    frame = Error(request_id=1, code=ErrorCode.INTERNAL, message="é" * 1000)
    decoded = decode_one(encode_bytes(frame))
    assert decoded == Error(request_id=1, code=ErrorCode.INTERNAL, message="é" * 512)
    odd = decode_one(encode_bytes(Error(request_id=1, code=1, message="x" + "é" * 600)))
    assert isinstance(odd, Error) and odd.message == "x" + "é" * 511


def test_unencodable_error_message_is_replaced_not_refused() -> None:
    """A surrogate-escaped file name in an error message still produces a frame."""
    decoded = decode_one(encode_bytes(Error(request_id=1, code=2, message="bad \udcff name")))
    assert isinstance(decoded, Error) and decoded.message == "bad ? name"


def test_ack_reserved_flag_bits_are_refused() -> None:
    """Only bit 0 of ACK's flags is defined in version 1."""
    expect_wire_error(frame_bytes(MsgType.ACK, SEG_ID + b"\x02"), "ack_flags", 12 + 32)
    frame = decode_one(frame_bytes(MsgType.ACK, SEG_ID + b"\x00"))
    assert frame == Ack(request_id=1, seg_id=SEG_ID, stored=False)


def test_empty_segments_are_frames_too() -> None:
    """PUT_SEG and DATA may carry zero bytes."""
    for frame in (PutSeg(request_id=1, seg_id=SEG_ID, data=b""), Data(request_id=2, data=b"")):
        assert decode_one(encode_bytes(frame)) == frame


# -- encoder refusals --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        Hello(request_id=-1, peer=None),
        Hello(request_id=1 << 32, peer=None),
        Hello(request_id=1, peer="ABCDEF"),
        Call(request_id=1, op="", args={}),
        Call(request_id=1, op="x" * 65, args={}),
        Call(request_id=1, op="put", args={"op": "get"}),
        Call(request_id=1, op="put", args={"x": float("nan")}),
        Call(request_id=1, op="put", args={"x": object()}),
        Call(request_id=1, op="put", args={"x": "\ud800"}),
        Reply(request_id=1, body={1: "int key"}),  # type: ignore[dict-item]
        Reply(request_id=1, body=["not", "an", "object"]),  # type: ignore[arg-type]
        Reply(request_id=1, body={"x": "y" * MAX_CONTROL_PAYLOAD}),
        Reply(request_id=1, body={"x": nested_lists(32)}),
        Error(request_id=1, code=70000, message=""),
        PutSeg(request_id=1, seg_id=SegmentId(b"short"), data=b""),
        PutSeg(request_id=1, seg_id=SEG_ID, data=memoryview(bytearray(MAX_SEGMENT + 1))),
        GetSeg(request_id=1, seg_id=SEG_ID, offset=-1, length=0),
        GetSeg(request_id=1, seg_id=SEG_ID, offset=0, length=1 << 32),
        Data(request_id=1, data=memoryview(bytearray(MAX_SEGMENT + 1))),
        Ack(request_id=1, seg_id=SegmentId(SEG_ID * 2), stored=True),
    ],
    ids=lambda frame: type(frame).__name__,
)
def test_encoder_refuses_frames_a_peer_would_refuse(frame: Frame) -> None:
    """Out-of-range fields and unsendable JSON are the caller's mistake: UsageError."""
    with pytest.raises(UsageError):
        encode(frame)


def test_encoder_accepts_the_largest_frames() -> None:
    """A full segment and JSON at depth 32 are within the limits."""
    segment = memoryview(bytearray(MAX_SEGMENT))
    parts = encode(PutSeg(request_id=1, seg_id=SEG_ID, data=segment))
    assert parse_header(bytes(parts[0][:HEADER_SIZE])).length == 32 + MAX_SEGMENT
    frame = Reply(request_id=1, body={"x": nested_lists(31)})
    assert decode_one(encode_bytes(frame)) == frame


# -- properties ------------------------------------------------------------------------------


def feed_only_wire_errors(*chunks: bytes) -> list[Frame]:
    """Feed chunks; WireError is the only exception allowed to escape."""
    decoder = FrameDecoder()
    frames: list[Frame] = []
    with contextlib.suppress(WireError):
        for chunk in chunks:
            frames += decoder.feed(chunk)
        decoder.eof()
    return frames


@given(st.binary(max_size=400))
def test_random_bytes_only_ever_raise_wire_error(data: bytes) -> None:
    """Arbitrary bytes decode or raise WireError; nothing else escapes."""
    feed_only_wire_errors(data)
    feed_only_wire_errors(*(data[i : i + 1] for i in range(len(data))))


@given(st.sampled_from(list(MsgType)), st.binary(max_size=300), st.integers(0, 2**32 - 1))
def test_random_payloads_behind_valid_headers_only_raise_wire_error(
    msg_type: MsgType, payload: bytes, request_id: int
) -> None:
    """Every payload decoder is total over payloads of an allowed length."""
    spec = MESSAGES[msg_type]
    assume(spec.min_payload <= len(payload) <= spec.max_payload)
    feed_only_wire_errors(frame_bytes(msg_type, payload, request_id=request_id))


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | st.sampled_from(["\ud800", "op", "peer", "v"]),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=5) | st.sampled_from(["op", "peer", "v"]), children)
    ),
    max_leaves=12,
)


@given(
    st.sampled_from([MsgType.HELLO, MsgType.CALL, MsgType.REPLY]),
    json_values,
    st.booleans(),
)
def test_arbitrary_json_texts_only_raise_wire_error(
    msg_type: MsgType, value: Any, ascii_only: bool
) -> None:
    """Any JSON text (NaN, surrogates, non-objects included) decodes or raises WireError."""
    payload = json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    assume(2 <= len(payload) <= MAX_CONTROL_PAYLOAD)
    feed_only_wire_errors(frame_bytes(msg_type, payload))


@given(
    st.sampled_from(sorted(GOLDEN)),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4),
)
def test_corrupted_frames_only_raise_wire_error(name: str, edits: list[tuple[int, int]]) -> None:
    """Valid frames with bytes overwritten decode or raise WireError."""
    raw = bytearray(encode_bytes(GOLDEN[name]))
    for position, value in edits:
        raw[position % len(raw)] = value
    feed_only_wire_errors(bytes(raw), bytes(raw))


def json_depth(value: object) -> int:
    if isinstance(value, dict):
        return 1 + max((json_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((json_depth(v) for v in value), default=0)
    return 0


finite_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**80), 2**80)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=16,
)
request_ids = st.integers(0, 2**32 - 1)
seg_ids = st.binary(min_size=32, max_size=32)
json_objects = st.dictionaries(st.text(max_size=6), finite_json, max_size=5)

any_frame: st.SearchStrategy[Frame] = st.one_of(
    st.builds(
        Hello,
        request_id=request_ids,
        peer=st.none() | st.binary(min_size=20, max_size=20).map(bytes.hex),
    ),
    st.builds(
        Call,
        request_id=request_ids,
        op=st.text(min_size=1, max_size=64),
        args=json_objects.filter(lambda args: "op" not in args),
    ),
    st.builds(Reply, request_id=request_ids, body=json_objects),
    st.builds(
        Error,
        request_id=request_ids,
        code=st.sampled_from(list(ErrorCode)) | st.integers(0, 0xFFFF),
        message=st.text(max_size=200),
    ),
    st.builds(PutSeg, request_id=request_ids, seg_id=seg_ids, data=st.binary(max_size=300)),
    st.builds(
        GetSeg,
        request_id=request_ids,
        seg_id=seg_ids,
        offset=st.integers(0, 2**64 - 1),
        length=st.integers(0, 2**32 - 1),
    ),
    st.builds(Data, request_id=request_ids, data=st.binary(max_size=300)),
    st.builds(Ack, request_id=request_ids, seg_id=seg_ids, stored=st.booleans()),
)


@settings(suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(st.lists(any_frame, max_size=5))
def test_any_frames_roundtrip_through_the_decoder(sent: list[Frame]) -> None:
    """Whatever frames are encoded, the decoder returns equal frames, alone or streamed."""
    for frame in sent:
        for value in (getattr(frame, "args", None), getattr(frame, "body", None)):
            assume(value is None or json_depth(value) <= wire.MAX_JSON_DEPTH)
    stream = b"".join(encode_bytes(frame) for frame in sent)
    assert [decode_one(encode_bytes(frame)) for frame in sent] == sent
    assert [decode_from_view(encode_bytes(frame)) for frame in sent] == sent
    assert FrameDecoder().feed(stream) == sent
