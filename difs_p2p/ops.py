"""Control operations (CALL frames): one typed request and one typed reply per operation,
and the one codec both sides use. No I/O.

A CALL carries ``{"op": name, ...args}`` and its REPLY a JSON object (docs/PROTOCOL.md,
"Control operations"). Each row of :data:`OPS` gives, for one operation, its request class,
its reply class, and four functions:

* ``check`` (args -> request): how the serving side reads the arguments; UsageError if
  they do not check (the peer answers BAD_REQUEST). ``control.CONTROL_TABLE`` pairs it
  with the operation's permission rule;
* ``encode_request`` (request -> args): what the asking side sends; the result is run
  through ``check`` before anything is sent, so our own bad arguments are a local
  UsageError and never reach the peer;
* ``encode_reply`` (reply -> body) and ``decode_reply`` (body -> reply): the answer; a
  body that does not decode is the peer's fault (:class:`~difs_p2p.errors.WireError`
  naming the field).

Unknown arguments and reply fields are ignored, for later versions. Requests name their
reply type (``Op[ReplyType]``), so ``transfer.Connection.request(req)`` is typed.

This module is longer than most (a codec table): every operation's request, reply and
codecs sit side by side, so that a change to one operation is made in one place.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Final, TypeGuard

from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError, WireError
from difs_p2p.names import NameKey
from difs_p2p.opcodec import (
    Op,
    ResolveReply,
    ResolveRequest,
)
from difs_p2p.opcodec import bad as _bad
from difs_p2p.opcodec import check_resolve as _resolve_request
from difs_p2p.opcodec import decode_resolve as _resolve_reply
from difs_p2p.opcodec import encode_resolve as _encode_key
from difs_p2p.opcodec import encode_resolve_reply as _encode_resolve_reply
from difs_p2p.opcodec import hex_arg as _hex_arg
from difs_p2p.opcodec import int_field as _int
from difs_p2p.opcodec import strings_field as _strings
from difs_p2p.segments import IntegrityRoot, SegmentId

__all__ = [
    "MAX_CHILDREN_BYTES",
    "MAX_CHILDREN_PER_CALL",
    "MAX_PROBE_RANGES",
    "MAX_REPLICAS",
    "OPS",
    "AbandonReply",
    "AbandonRequest",
    "AddChildrenReply",
    "AddChildrenRequest",
    "ChainReply",
    "ChainRequest",
    "CheckReply",
    "CheckRequest",
    "ChildrenReply",
    "ChildrenRequest",
    "DrainReply",
    "DrainRequest",
    "HoldReason",
    "HoldReply",
    "HoldRequest",
    "HoldsRangesReply",
    "HoldsReply",
    "NoArgs",
    "Op",
    "OpCodec",
    "PlaceReply",
    "PlaceRequest",
    "PlacedRange",
    "ProveManyReply",
    "ProveManyRequest",
    "ProveReply",
    "ProveRequest",
    "PublishReply",
    "PublishRequest",
    "RangeRequest",
    "RangesRequest",
    "RelayHop",
    "RelayReply",
    "RelayRequest",
    "ReleaseReply",
    "ReleaseRequest",
    "ResolveReply",
    "ResolveRequest",
    "StatusReply",
    "StatusRequest",
    "SuspectReply",
    "SuspectRequest",
    "codec_of",
    "decode_reply",
    "encode_reply",
    "encode_request",
    "no_args",
]

NONCE_SIZE: Final = 32
# Replicas one `place` may ask for: far above any sensible r (3 by default), far below
# "every known peer".
MAX_REPLICAS: Final = 64
# Ranges asked in one holds_ranges request: a probe of every range two peers share is
# split into requests of at most this many (replicator.probe_ranges).
MAX_PROBE_RANGES: Final = 1024
# claims one ``prove_many`` may ask about (holdproof.py gathers a holder's pending claims)
MAX_PROVE_ITEMS: Final = 64
# Child entries (listing.py) one add_children may carry: a shard's cap (2 x 128).
MAX_CHILDREN_PER_CALL: Final = 256
# Bytes of child entries in one children reply (twice that in hex), under the control
# payload limit (wire.MAX_CONTROL_PAYLOAD, 256 KiB); the rest follows from ``next``.
MAX_CHILDREN_BYTES: Final = 96 * 1024


# -- argument checks ----------------------------------------------------------------------


def _int_arg(args: dict[str, Any], name: str) -> int:
    """Argument ``name``: a non-negative integer below 2**62 (UsageError otherwise)."""
    value = args.get(name)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 62:
        raise UsageError(f"{name} must be a non-negative integer")
    return value


def _bool_arg(args: dict[str, Any], name: str) -> bool:
    """Optional argument ``name``: a boolean, False when absent (UsageError otherwise)."""
    value = args.get(name, False)
    if not isinstance(value, bool):
        raise UsageError(f"{name} must be true or false")
    return value


# -- reply field checks (the peer's fault when they fail) ---------------------------------


def _bool(body: dict[str, Any], op: str, name: str) -> bool:
    value = body.get(name)
    if not isinstance(value, bool):
        raise _bad(op, name, "true or false")
    return value


def _is_hex(value: object) -> TypeGuard[str]:
    """Whether ``value`` is a string of hex digits (any even length)."""
    if not isinstance(value, str):
        return False
    try:
        bytes.fromhex(value)
    except ValueError:
        return False
    return True


def _hex(value: object, op: str, name: str, size: int) -> bytes:
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise _bad(op, name, f"{size} bytes of hex")
    return raw


# -- frames and operations without arguments ----------------------------------------------


@valueclass
class NoArgs:
    """A frame checked by the wire codec (HELLO, GET_SEG, PUT_SEG): no arguments."""


def no_args(args: dict[str, Any]) -> NoArgs:
    return NoArgs()


@valueclass
class StatusReply:
    """``status``: the peer's view of itself (a report for people: its shape is free)."""

    report: dict[str, Any]


@valueclass
class StatusRequest(Op[StatusReply]):
    """``status``: no arguments."""


@valueclass
class AbandonReply:
    """``abandon``: the bytes of this connection's upload the peer dropped."""

    freed: int


@valueclass
class AbandonRequest(Op[AbandonReply]):
    """``abandon``: no arguments."""


# -- names ----------------------------------------------------------------------------------


@valueclass
class ReleaseReply:
    freed: int


@valueclass
class ReleaseRequest(Op[ReleaseReply]):
    """``release``: free what the owner-signed manifest ``proof`` (JSON text) supersedes."""

    key: NameKey
    proof: str


# -- probes and proofs ----------------------------------------------------------------------


@valueclass
class HoldsReply:
    holds: bool


@valueclass
class RangeRequest(Op[HoldsReply]):
    """``holds``: one range of one version."""

    key: NameKey
    version: int
    start: int
    end: int


@valueclass
class HoldsRangesReply:
    """``holds_ranges``: one answer per range, in order."""

    holds: tuple[bool, ...]


@valueclass
class RangesRequest(Op[HoldsRangesReply]):
    """``holds_ranges``: up to MAX_PROBE_RANGES ranges."""

    ranges: tuple[RangeRequest, ...]


@valueclass
class ProveReply:
    """``prove``: whether the peer holds the range, and then its node key's signature
    over the challenge (see holdproof.py)."""

    holds: bool
    sig: bytes | None = None


@valueclass
class ProveRequest(Op[ProveReply]):
    """``prove``: sign a challenge over one range of one version (see holdproof.py)."""

    key: NameKey
    version: int
    start: int
    end: int
    nonce: bytes


@valueclass
class ProveManyReply:
    """``prove_many``: per item, whether the peer holds its range; if it holds any, its
    node key's signature over the nonce, every item and every answer (see holdproof.py)."""

    holds: tuple[bool, ...]
    sig: bytes | None = None


@valueclass
class ProveManyRequest(Op[ProveManyReply]):
    """``prove_many``: one challenge over up to MAX_PROVE_ITEMS ranges (of any names and
    versions), one nonce, one signature in the reply."""

    items: tuple[RangeRequest, ...]
    nonce: bytes


@valueclass
class SuspectReply:
    damaged: bool
    healed: int


@valueclass
class SuspectRequest(Op[SuspectReply]):
    """``suspect``: a fetcher got a bad copy of this segment."""

    segment: SegmentId


# -- uploads ------------------------------------------------------------------------------


@valueclass
class HoldReason:
    """Why a peer asks another to hold a range: it places a new upload or repairs a range."""

    kind: str
    key: NameKey
    version: int
    start: int
    end: int


@valueclass
class HoldReply:
    """``hold``: the holder entry the peer signed (hex); ``chain``: on a connection that
    relays (``relay``), the entries its downstream hops signed, in chain order."""

    entry: str
    chain: tuple[str, ...] = ()


@valueclass
class HoldRequest(Op[HoldReply]):
    key: NameKey
    version: int
    integrity: IntegrityRoot
    segment_count: int
    start: int
    end: int
    reason: HoldReason | None


@valueclass
class PlacedRange:
    """One range of a ``place``: the node ids (hex) that hold a copy."""

    start: int
    end: int
    holders: tuple[str, ...]


@valueclass
class PlaceReply:
    """``place``: the holder entries signed (hex), the copies per range, warnings."""

    entries: tuple[str, ...]
    ranges: tuple[PlacedRange, ...]
    warnings: tuple[str, ...]


@valueclass
class PlaceRequest(Op[PlaceReply]):
    key: NameKey
    version: int
    integrity: IntegrityRoot
    segment_count: int
    stripes: int
    replicas: int
    # S3 multipart staging: the entry peer's stored copy is one of the r copies of every
    # range (it holds the whole object durably already); r - 1 are pushed
    keep: bool = False


@valueclass
class ChainReply:
    """``chain``: the ranges the upload announced is cut into."""

    ranges: int


@valueclass
class ChainRequest(Op[ChainReply]):
    """Announce an upload of ``segment_count`` segments (of at most ``segment_size``
    bytes) before sending it: the entry peer picks each range's holders now and forwards
    every segment along its range's chain as it arrives."""

    key: NameKey
    version: int
    segment_count: int
    segment_size: int
    stripes: int
    replicas: int


@valueclass
class RelayHop:
    """One hop of a chain: where it listens and the node id it must prove."""

    host: str
    port: int
    node_id: bytes


@valueclass
class RelayReply:
    """``relay``: how many hops of ``to`` are linked (a prefix; the next one failed)."""

    ready: int


@valueclass
class RelayRequest(Op[RelayReply]):
    """Forward every segment uploaded on this connection to ``to[0]`` (which forwards to
    the rest); the peer first checks it has room for ``size`` more bytes."""

    to: tuple[RelayHop, ...]
    size: int


@valueclass
class PublishReply:
    """``publish``: entries accepted, the record hash that won (None: none could be read
    back), and on how many of ``quorum`` lookup paths it was read back."""

    accepted: int
    winner: str | None
    readable_paths: int = 0
    quorum: int = 0
    # rejoin: the key/value peers (this one included) that had to take the record
    # (membership.publish_quorum); ``accepted`` below it: not published
    required: int = 0


@valueclass
class PublishRequest(Op[PublishReply]):
    manifest: str
    entries: tuple[str, ...]


@valueclass
class CheckReply:
    """``check``: segments checked and ok, corrupt and missing ids (hex), healed, and the
    segments no holding keeps ((segments, bytes) uploading and orphaned)."""

    checked: int
    ok: int
    corrupt: tuple[str, ...]
    missing: tuple[str, ...]
    healed: int
    uploading: tuple[int, int]
    orphans: tuple[int, int]
    orphan_grace: float


@valueclass
class CheckRequest(Op[CheckReply]):
    repair: bool


# -- requests: args -> typed (the serving side) -------------------------------------------


def _release_request(args: dict[str, Any]) -> ReleaseRequest:
    proof = args.get("proof")
    if not isinstance(proof, str):
        raise UsageError("release needs the owner's signed proof: a tombstone or newer manifest")
    return ReleaseRequest(NameKey(_hex_arg(args, "key", 20)), proof)


def _range_request(args: dict[str, Any]) -> RangeRequest:
    return RangeRequest(
        NameKey(_hex_arg(args, "key", 20)),
        _int_arg(args, "version"),
        _int_arg(args, "start"),
        _int_arg(args, "end"),
    )


def _prove_request(args: dict[str, Any]) -> ProveRequest:
    r = _range_request(args)
    if r.end < r.start:
        raise UsageError("end must not be before start")
    return ProveRequest(r.key, r.version, r.start, r.end, _hex_arg(args, "nonce", NONCE_SIZE))


def _prove_many_request(args: dict[str, Any]) -> ProveManyRequest:
    items = args.get("items")
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_PROVE_ITEMS:
        raise UsageError(f"items must be a list of 1 to {MAX_PROVE_ITEMS} ranges")
    ranges = []
    for item in items:
        if not isinstance(item, list) or len(item) != 4:
            raise UsageError("each item must be [key, version, start, end]")
        r = _range_request(dict(zip(("key", "version", "start", "end"), item, strict=True)))
        if r.end < r.start:
            raise UsageError("end must not be before start")
        ranges.append(r)
    return ProveManyRequest(tuple(ranges), _hex_arg(args, "nonce", NONCE_SIZE))


def _ranges_request(args: dict[str, Any]) -> RangesRequest:
    items = args.get("ranges")
    if not isinstance(items, list) or len(items) > MAX_PROBE_RANGES:
        raise UsageError(f"ranges must be a list of at most {MAX_PROBE_RANGES} ranges")
    ranges = []
    for item in items:
        if not isinstance(item, list) or len(item) != 4:
            raise UsageError("each range must be [key, version, start, end]")
        fields = dict(zip(("key", "version", "start", "end"), item, strict=True))
        ranges.append(_range_request(fields))
    return RangesRequest(tuple(ranges))


def _hold_reason(value: object) -> HoldReason | None:
    if value is None:
        return None
    if not isinstance(value, dict) or value.get("kind") not in ("place", "repair"):
        raise UsageError('reason must be {"kind": "place" or "repair", key, version, start, end}')
    r = _range_request(value)
    return HoldReason(str(value["kind"]), r.key, r.version, r.start, r.end)


def _hold_request(args: dict[str, Any]) -> HoldRequest:
    request = HoldRequest(
        NameKey(_hex_arg(args, "key", 20)),
        _int_arg(args, "version"),
        IntegrityRoot(SegmentId(_hex_arg(args, "integrity", 32))),
        _int_arg(args, "segment_count"),
        _int_arg(args, "start"),
        _int_arg(args, "end"),
        _hold_reason(args.get("reason")),
    )
    reason = request.reason
    if reason is not None and (reason.key, reason.version, reason.start, reason.end) != (
        request.key,
        request.version,
        request.start,
        request.end,
    ):
        raise UsageError("the reason is for another range than the one to hold")
    return request


def _place_request(args: dict[str, Any]) -> PlaceRequest:
    request = PlaceRequest(
        NameKey(_hex_arg(args, "key", 20)),
        _int_arg(args, "version"),
        IntegrityRoot(SegmentId(_hex_arg(args, "integrity", 32))),
        _int_arg(args, "segment_count"),
        _int_arg(args, "stripes"),
        _int_arg(args, "replicas"),
        _bool_arg(args, "keep"),
    )
    if request.replicas > MAX_REPLICAS:
        raise UsageError(f"replicas must be at most {MAX_REPLICAS}")
    return request


def _chain_request(args: dict[str, Any]) -> ChainRequest:
    request = ChainRequest(
        NameKey(_hex_arg(args, "key", 20)),
        _int_arg(args, "version"),
        _int_arg(args, "segment_count"),
        _int_arg(args, "segment_size"),
        _int_arg(args, "stripes"),
        _int_arg(args, "replicas"),
    )
    if not 1 <= request.replicas <= MAX_REPLICAS:
        raise UsageError(f"replicas must be between 1 and {MAX_REPLICAS}")
    if request.segment_count < 1 or request.stripes < 1 or request.segment_size < 1:
        raise UsageError("a chain upload has at least one segment and one stripe")
    return request


def _relay_request(args: dict[str, Any]) -> RelayRequest:
    hops = args.get("to")
    if not isinstance(hops, list) or len(hops) >= MAX_REPLICAS:
        raise UsageError(f"to must be a list of fewer than {MAX_REPLICAS} hops")
    to = []
    for hop in hops:
        if not isinstance(hop, list) or len(hop) != 3 or not isinstance(hop[0], str):
            raise UsageError("each hop must be [host, port, node id]")
        port = _int_arg({"port": hop[1]}, "port")
        if not 0 < port < 65536 or not hop[0]:
            raise UsageError("each hop needs a host and a port in 1..65535")
        to.append(RelayHop(hop[0], port, _hex_arg({"id": hop[2]}, "id", 20)))
    return RelayRequest(tuple(to), _int_arg(args, "size"))


def _encode_chain(request: ChainRequest) -> dict[str, Any]:
    return {
        "key": request.key.hex(),
        "version": request.version,
        "segment_count": request.segment_count,
        "segment_size": request.segment_size,
        "stripes": request.stripes,
        "replicas": request.replicas,
    }


def _encode_relay(request: RelayRequest) -> dict[str, Any]:
    return {
        "to": [[h.host, h.port, h.node_id.hex()] for h in request.to],
        "size": request.size,
    }


def _chain_reply(body: dict[str, Any]) -> ChainReply:
    return ChainReply(_int(body, "chain", "ranges"))


def _relay_reply(body: dict[str, Any]) -> RelayReply:
    return RelayReply(_int(body, "relay", "ready"))


def _publish_request(args: dict[str, Any]) -> PublishRequest:
    manifest, entries = args.get("manifest"), args.get("entries", [])
    if not isinstance(manifest, str):
        raise UsageError("manifest must be the manifest's JSON text")
    if not isinstance(entries, list) or not all(_is_hex(e) for e in entries):
        raise UsageError("entries must be a list of hex strings")
    return PublishRequest(manifest, tuple(entries))


def _check_request(args: dict[str, Any]) -> CheckRequest:
    repair = args.get("repair", False)
    if not isinstance(repair, bool):
        raise UsageError("repair must be true or false")
    return CheckRequest(repair)


def _suspect_request(args: dict[str, Any]) -> SuspectRequest:
    return SuspectRequest(SegmentId(_hex_arg(args, "segment", 32)))


# -- requests: typed -> args (the asking side) --------------------------------------------


def _range_args(r: RangeRequest | ProveRequest | HoldReason) -> dict[str, Any]:
    return {"key": r.key.hex(), "version": r.version, "start": r.start, "end": r.end}


def _encode_none(request: object) -> dict[str, Any]:
    return {}


def _encode_release(request: ReleaseRequest) -> dict[str, Any]:
    return {"key": request.key.hex(), "proof": request.proof}


def _encode_range(request: RangeRequest) -> dict[str, Any]:
    return _range_args(request)


def _encode_ranges(request: RangesRequest) -> dict[str, Any]:
    return {"ranges": [[r.key.hex(), r.version, r.start, r.end] for r in request.ranges]}


def _encode_prove(request: ProveRequest) -> dict[str, Any]:
    return {**_range_args(request), "nonce": request.nonce.hex()}


def _encode_prove_many(request: ProveManyRequest) -> dict[str, Any]:
    items = [[r.key.hex(), r.version, r.start, r.end] for r in request.items]
    return {"items": items, "nonce": request.nonce.hex()}


def _encode_suspect(request: SuspectRequest) -> dict[str, Any]:
    return {"segment": request.segment.hex()}


def _encode_hold(request: HoldRequest) -> dict[str, Any]:
    args: dict[str, Any] = {
        "key": request.key.hex(),
        "version": request.version,
        "integrity": request.integrity.hex(),
        "segment_count": request.segment_count,
        "start": request.start,
        "end": request.end,
    }
    if request.reason is not None:
        args["reason"] = {"kind": request.reason.kind, **_range_args(request.reason)}
    return args


def _encode_place(request: PlaceRequest) -> dict[str, Any]:
    return {
        "key": request.key.hex(),
        "version": request.version,
        "integrity": request.integrity.hex(),
        "segment_count": request.segment_count,
        "stripes": request.stripes,
        "replicas": request.replicas,
        **({"keep": True} if request.keep else {}),
    }


def _encode_publish(request: PublishRequest) -> dict[str, Any]:
    return {"manifest": request.manifest, "entries": list(request.entries)}


def _encode_check(request: CheckRequest) -> dict[str, Any]:
    return {"repair": request.repair}


# -- replies: typed <-> body ----------------------------------------------------------------


def _status_reply(body: dict[str, Any]) -> StatusReply:
    return StatusReply(dict(body))


def _freed_reply(op: str) -> Callable[[dict[str, Any]], Any]:
    cls = AbandonReply if op == "abandon" else ReleaseReply

    def decode(body: dict[str, Any]) -> Any:
        return cls(_int(body, op, "freed"))

    return decode


def _holds_reply(body: dict[str, Any]) -> HoldsReply:
    return HoldsReply(_bool(body, "holds", "holds"))


def _holds_ranges_reply(body: dict[str, Any]) -> HoldsRangesReply:
    holds = body.get("holds")
    if not isinstance(holds, list) or not all(isinstance(h, bool) for h in holds):
        raise _bad("holds_ranges", "holds", "a list of true or false")
    return HoldsRangesReply(tuple(holds))


def _prove_reply(body: dict[str, Any]) -> ProveReply:
    if not _bool(body, "prove", "holds"):
        return ProveReply(False)
    return ProveReply(True, _hex(body.get("sig"), "prove", "sig", 64))


def _prove_many_reply(body: dict[str, Any]) -> ProveManyReply:
    holds = body.get("holds")
    if not isinstance(holds, list) or not all(isinstance(h, bool) for h in holds):
        raise _bad("prove_many", "holds", "a list of true or false")
    if len(holds) > MAX_PROVE_ITEMS:
        raise _bad("prove_many", "holds", f"at most {MAX_PROVE_ITEMS} answers")
    if not any(holds):
        return ProveManyReply(tuple(holds))
    return ProveManyReply(tuple(holds), _hex(body.get("sig"), "prove_many", "sig", 64))


def _suspect_reply(body: dict[str, Any]) -> SuspectReply:
    return SuspectReply(_bool(body, "suspect", "damaged"), _int(body, "suspect", "healed"))


def _hold_reply(body: dict[str, Any]) -> HoldReply:
    entry = body.get("entry")
    if not _is_hex(entry):
        raise _bad("hold", "entry", "a hex string")
    chain = _strings(body, "hold", "chain") if "chain" in body else ()
    if not all(_is_hex(e) for e in chain):
        raise _bad("hold", "chain", "a list of hex strings")
    return HoldReply(entry, chain)


def _place_reply(body: dict[str, Any]) -> PlaceReply:
    items = body.get("ranges", [])
    if not isinstance(items, list) or not all(isinstance(r, dict) for r in items):
        raise _bad("place", "ranges", 'a list of {"start", "end", "holders"}')
    ranges = tuple(
        PlacedRange(
            _int(r, "place", "start"), _int(r, "place", "end"), _strings(r, "place", "holders")
        )
        for r in items
    )
    return PlaceReply(
        _strings(body, "place", "entries"), ranges, _strings(body, "place", "warnings")
    )


def _publish_reply(body: dict[str, Any]) -> PublishReply:
    winner = body.get("winner")
    if winner is not None and not isinstance(winner, str):
        raise _bad("publish", "winner", "a record hash or null")
    return PublishReply(
        _int(body, "publish", "accepted", 0),
        winner,
        _int(body, "publish", "readable_paths", 0),
        _int(body, "publish", "quorum", 0),
        _int(body, "publish", "required", 0),
    )


def _pair(body: dict[str, Any], name: str) -> tuple[int, int]:
    value = body.get(name, {})
    if not isinstance(value, dict):
        raise _bad("check", name, '{"segments", "bytes"}')
    pair = (value.get("segments", 0), value.get("bytes", 0))
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in pair):
        raise _bad("check", name, "counts of segments and bytes")
    return pair


def _check_reply(body: dict[str, Any]) -> CheckReply:
    grace = body.get("orphan_grace", 0)
    if not isinstance(grace, int | float) or isinstance(grace, bool):
        raise _bad("check", "orphan_grace", "a number of seconds")
    return CheckReply(
        _int(body, "check", "checked"),
        _int(body, "check", "ok"),
        _strings(body, "check", "corrupt"),
        _strings(body, "check", "missing"),
        _int(body, "check", "healed", 0),
        _pair(body, "uploading"),
        _pair(body, "orphans"),
        float(grace),
    )


def _encode_status_reply(reply: StatusReply) -> dict[str, Any]:
    return dict(reply.report)


def _encode_freed(reply: AbandonReply | ReleaseReply) -> dict[str, Any]:
    return {"freed": reply.freed}


def _encode_holds_reply(reply: HoldsReply | HoldsRangesReply) -> dict[str, Any]:
    return {"holds": reply.holds if isinstance(reply.holds, bool) else list(reply.holds)}


def _encode_prove_reply(reply: ProveReply) -> dict[str, Any]:
    if not reply.holds or reply.sig is None:
        return {"holds": False}
    return {"holds": True, "sig": reply.sig.hex()}


def _encode_prove_many_reply(reply: ProveManyReply) -> dict[str, Any]:
    if not any(reply.holds) or reply.sig is None:
        return {"holds": [False] * len(reply.holds)}
    return {"holds": list(reply.holds), "sig": reply.sig.hex()}


def _encode_suspect_reply(reply: SuspectReply) -> dict[str, Any]:
    return {"damaged": reply.damaged, "healed": reply.healed}


def _encode_hold_reply(reply: HoldReply) -> dict[str, Any]:
    if reply.chain:
        return {"entry": reply.entry, "chain": list(reply.chain)}
    return {"entry": reply.entry}


def _encode_place_reply(reply: PlaceReply) -> dict[str, Any]:
    return {
        "entries": list(reply.entries),
        "ranges": [
            {"start": r.start, "end": r.end, "holders": list(r.holders)} for r in reply.ranges
        ],
        "warnings": list(reply.warnings),
    }


def _encode_publish_reply(reply: PublishReply) -> dict[str, Any]:
    return {
        "accepted": reply.accepted,
        "winner": reply.winner,
        "readable_paths": reply.readable_paths,
        "quorum": reply.quorum,
        "required": reply.required,
    }


def _encode_check_reply(reply: CheckReply) -> dict[str, Any]:
    return {
        "checked": reply.checked,
        "ok": reply.ok,
        "corrupt": list(reply.corrupt),
        "missing": list(reply.missing),
        "healed": reply.healed,
        "uploading": {"segments": reply.uploading[0], "bytes": reply.uploading[1]},
        "orphans": {"segments": reply.orphans[0], "bytes": reply.orphans[1]},
        "orphan_grace": reply.orphan_grace,
    }


# -- leaving the network (drain) -------------------------------------------------------------

DRAIN_ACTIONS: Final = ("start", "status", "cancel")


@valueclass
class DrainReply:
    """``drain``: where the peer's drain stands (``state``: idle, draining, done,
    incomplete, cancelled) and its accounting (see drain.DrainProgress.summary)."""

    state: str
    ranges: int = 0
    done: int = 0
    already_safe: int = 0
    handed_over: int = 0
    unpublished: int = 0
    failed: tuple[str, ...] = ()
    bytes_moved: int = 0
    copies_made: int = 0
    records: int = 0
    seconds: float = 0.0


@valueclass
class DrainRequest(Op[DrainReply]):
    """``drain``: start leaving (``force``: stop even if some range cannot get its r
    copies elsewhere), ask how it goes, or cancel it."""

    action: str
    force: bool = False


def _drain_request(args: dict[str, Any]) -> DrainRequest:
    action, force = args.get("action"), args.get("force", False)
    if action not in DRAIN_ACTIONS:
        raise UsageError(f"action must be one of {', '.join(DRAIN_ACTIONS)}")
    if not isinstance(force, bool):
        raise UsageError("force must be true or false")
    return DrainRequest(str(action), force)


def _encode_drain(request: DrainRequest) -> dict[str, Any]:
    return {"action": request.action, "force": request.force}


_DRAIN_COUNTS: Final = (
    "ranges",
    "done",
    "already_safe",
    "handed_over",
    "unpublished",
    "bytes_moved",
    "copies_made",
    "records",
)


def _drain_reply(body: dict[str, Any]) -> DrainReply:
    state = body.get("state")
    if not isinstance(state, str) or len(state) > 32:
        raise _bad("drain", "state", "a short string")
    seconds = body.get("seconds", 0.0)
    if not isinstance(seconds, int | float) or isinstance(seconds, bool) or seconds < 0:
        raise _bad("drain", "seconds", "a number of seconds")
    counts = {name: _int(body, "drain", name, 0) for name in _DRAIN_COUNTS}
    return DrainReply(
        state, failed=_strings(body, "drain", "failed"), seconds=float(seconds), **counts
    )


def _encode_drain_reply(reply: DrainReply) -> dict[str, Any]:
    body: dict[str, Any] = {name: getattr(reply, name) for name in _DRAIN_COUNTS}
    return {**body, "state": reply.state, "failed": list(reply.failed), "seconds": reply.seconds}


# -- listing (child entries, listing.py) ----------------------------------------------------


@valueclass
class ChildrenReply:
    """``children``: child entries (hex, unverified: the asking side checks them) from
    offset on, and the offset of the rest (0: none left)."""

    entries: tuple[str, ...]
    next: int = 0


@valueclass
class ChildrenRequest(Op[ChildrenReply]):
    """``children``: the child entries the DHT holds at one shard key, from ``offset``."""

    key: bytes
    offset: int = 0


@valueclass
class AddChildrenReply:
    """``add_children``: acceptances summed over the key's peers (this one included)."""

    stored: int


@valueclass
class AddChildrenRequest(Op[AddChildrenReply]):
    """``add_children``: store signed child entries (hex) at one shard key."""

    key: bytes
    entries: tuple[str, ...]


def _children_request(args: dict[str, Any]) -> ChildrenRequest:
    return ChildrenRequest(_hex_arg(args, "key", 20), _int_arg(args, "offset"))


def _encode_children(request: ChildrenRequest) -> dict[str, Any]:
    return {"key": request.key.hex(), "offset": request.offset}


def _children_reply(body: dict[str, Any]) -> ChildrenReply:
    entries = _strings(body, "children", "entries")
    if not all(_is_hex(e) for e in entries):
        raise _bad("children", "entries", "a list of hex strings")
    return ChildrenReply(entries, _int(body, "children", "next", 0))


def _encode_children_reply(reply: ChildrenReply) -> dict[str, Any]:
    return {"entries": list(reply.entries), "next": reply.next}


def _add_children_request(args: dict[str, Any]) -> AddChildrenRequest:
    entries = args.get("entries")
    if (
        not isinstance(entries, list)
        or not 0 < len(entries) <= MAX_CHILDREN_PER_CALL
        or not all(_is_hex(e) and e for e in entries)
    ):
        raise UsageError(
            f"entries must be a list of 1 to {MAX_CHILDREN_PER_CALL} child entries in hex"
        )
    return AddChildrenRequest(_hex_arg(args, "key", 20), tuple(entries))


def _encode_add_children(request: AddChildrenRequest) -> dict[str, Any]:
    return {"key": request.key.hex(), "entries": list(request.entries)}


def _add_children_reply(body: dict[str, Any]) -> AddChildrenReply:
    return AddChildrenReply(_int(body, "add_children", "stored"))


def _encode_add_children_reply(reply: AddChildrenReply) -> dict[str, Any]:
    return {"stored": reply.stored}


# -- the table ------------------------------------------------------------------------------


@valueclass
class OpCodec:
    """One control operation: its typed request and reply, and their codecs."""

    request: type
    reply: type
    check: Callable[[dict[str, Any]], Any]
    encode_request: Callable[[Any], dict[str, Any]]
    decode_reply: Callable[[dict[str, Any]], Any]
    encode_reply: Callable[[Any], dict[str, Any]]


OPS: Final[dict[str, OpCodec]] = {
    "status": OpCodec(
        StatusRequest,
        StatusReply,
        lambda args: StatusRequest(),
        _encode_none,
        _status_reply,
        _encode_status_reply,
    ),
    "resolve": OpCodec(
        ResolveRequest,
        ResolveReply,
        _resolve_request,
        _encode_key,
        _resolve_reply,
        _encode_resolve_reply,
    ),
    "place": OpCodec(
        PlaceRequest, PlaceReply, _place_request, _encode_place, _place_reply, _encode_place_reply
    ),
    "hold": OpCodec(
        HoldRequest, HoldReply, _hold_request, _encode_hold, _hold_reply, _encode_hold_reply
    ),
    "publish": OpCodec(
        PublishRequest,
        PublishReply,
        _publish_request,
        _encode_publish,
        _publish_reply,
        _encode_publish_reply,
    ),
    "release": OpCodec(
        ReleaseRequest,
        ReleaseReply,
        _release_request,
        _encode_release,
        _freed_reply("release"),
        _encode_freed,
    ),
    "holds": OpCodec(
        RangeRequest, HoldsReply, _range_request, _encode_range, _holds_reply, _encode_holds_reply
    ),
    "holds_ranges": OpCodec(
        RangesRequest,
        HoldsRangesReply,
        _ranges_request,
        _encode_ranges,
        _holds_ranges_reply,
        _encode_holds_reply,
    ),
    "prove": OpCodec(
        ProveRequest, ProveReply, _prove_request, _encode_prove, _prove_reply, _encode_prove_reply
    ),
    "prove_many": OpCodec(
        ProveManyRequest,
        ProveManyReply,
        _prove_many_request,
        _encode_prove_many,
        _prove_many_reply,
        _encode_prove_many_reply,
    ),
    "check": OpCodec(
        CheckRequest, CheckReply, _check_request, _encode_check, _check_reply, _encode_check_reply
    ),
    "suspect": OpCodec(
        SuspectRequest,
        SuspectReply,
        _suspect_request,
        _encode_suspect,
        _suspect_reply,
        _encode_suspect_reply,
    ),
    "abandon": OpCodec(
        AbandonRequest,
        AbandonReply,
        lambda args: AbandonRequest(),
        _encode_none,
        _freed_reply("abandon"),
        _encode_freed,
    ),
    "drain": OpCodec(
        DrainRequest,
        DrainReply,
        _drain_request,
        _encode_drain,
        _drain_reply,
        _encode_drain_reply,
    ),
    "children": OpCodec(
        ChildrenRequest,
        ChildrenReply,
        _children_request,
        _encode_children,
        _children_reply,
        _encode_children_reply,
    ),
    "chain": OpCodec(
        ChainRequest,
        ChainReply,
        _chain_request,
        _encode_chain,
        _chain_reply,
        lambda reply: {"ranges": reply.ranges},
    ),
    "relay": OpCodec(
        RelayRequest,
        RelayReply,
        _relay_request,
        _encode_relay,
        _relay_reply,
        lambda reply: {"ready": reply.ready},
    ),
    "add_children": OpCodec(
        AddChildrenRequest,
        AddChildrenReply,
        _add_children_request,
        _encode_add_children,
        _add_children_reply,
        _encode_add_children_reply,
    ),
}
_BY_TYPE: Final[dict[type, str]] = {codec.request: op for op, codec in OPS.items()}
assert len(_BY_TYPE) == len(OPS)


def codec_of(request: Op[Any]) -> tuple[str, OpCodec]:
    """The operation name and codec of a typed request."""
    op = _BY_TYPE.get(type(request))
    if op is None:
        raise UsageError(f"not a control request: {type(request).__name__}")
    return op, OPS[op]


def encode_request(request: Op[Any]) -> tuple[str, dict[str, Any]]:
    """(op, CALL arguments) for ``request``, checked as the serving peer will check them:
    UsageError here, before anything is sent, if they would not pass."""
    op, codec = codec_of(request)
    args = codec.encode_request(request)
    codec.check(args)
    return op, args


def encode_reply(op: str, reply: object) -> dict[str, Any]:
    """The REPLY body for ``reply`` to ``op`` (the serving side)."""
    codec = OPS.get(op)
    if codec is None or not isinstance(reply, codec.reply):
        raise UsageError(f"not a reply to {op!r}: {type(reply).__name__}")
    return codec.encode_reply(reply)


def decode_reply(op: str, body: dict[str, Any]) -> Any:
    """The typed reply to ``op``; WireError (the peer's fault) if ``body`` does not decode."""
    codec = OPS.get(op)
    if codec is None:
        raise UsageError(f"unknown operation {op!r}")
    if not isinstance(body, dict):
        raise WireError(f"{op} reply must be a JSON object", field=op)
    return codec.decode_reply(body)
