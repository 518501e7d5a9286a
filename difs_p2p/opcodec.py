"""The base of the control operations' codecs (ops.py), and the ``resolve`` operation's.
No I/O.

:mod:`difs_p2p.ops` defines 35 request and reply classes and their codecs; the quick path
of a small ``difs get`` (:mod:`difs_p2p.quickget`) needs one operation, ``resolve``. Its
request, reply and codecs live here, with the base class of typed requests (:class:`Op`)
and the argument and reply-field checks every codec uses; ops.py imports them into its
table (``OPS``), so both paths encode and check the very same way.
"""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError, WireError
from difs_p2p.names import NameKey

__all__ = [
    "Op",
    "ResolveReply",
    "ResolveRequest",
    "bad",
    "check_resolve",
    "decode_resolve",
    "encode_resolve",
    "encode_resolve_reply",
    "hex_arg",
    "int_field",
    "resolve_call",
    "resolve_reply",
    "state_field",
    "strings_field",
]

R = TypeVar("R")


class Op(Generic[R]):
    """Base of the typed requests; ``R`` is the type of the reply."""

    __slots__ = ()


# -- argument checks ----------------------------------------------------------------------


def hex_arg(args: dict[str, Any], name: str, size: int) -> bytes:
    """Argument ``name``: exactly ``size`` bytes, sent as hex (UsageError otherwise)."""
    value = args.get(name)
    try:
        raw = bytes.fromhex(value) if isinstance(value, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != size:
        raise UsageError(f"{name} must be {size} bytes of hex")
    return raw


# -- reply field checks (the peer's fault when they fail) ---------------------------------


def bad(op: str, name: str, what: str) -> WireError:
    return WireError(f"{op} reply: {name} must be {what}", field=f"{op}.{name}")


def int_field(body: dict[str, Any], op: str, name: str, default: int | None = None) -> int:
    value = body.get(name, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise bad(op, name, "a non-negative integer")
    return value


def state_field(body: dict[str, Any], op: str, name: str) -> str:
    """A short state word (unknown words are kept: a later version may add some)."""
    value = body.get(name, "ok")
    if not isinstance(value, str) or not 0 < len(value) <= 16 or not value.isalpha():
        raise bad(op, name, "a short word")
    return value


def strings_field(body: dict[str, Any], op: str, name: str) -> tuple[str, ...]:
    value = body.get(name, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise bad(op, name, "a list of strings")
    return tuple(value)


# -- resolve --------------------------------------------------------------------------------


@valueclass
class ResolveReply:
    """``resolve``: manifests (JSON text, best first), history manifests, holder entries
    (hex), all unverified: the asking side checks them."""

    manifests: tuple[str, ...]
    history: tuple[str, ...]
    holders: tuple[str, ...]
    # rejoin: whether the answering peer is part of the network ("ok", "thin" or
    # "isolated", membership.py), how many peers it knows now and the most it knew
    network: str = "ok"
    knows: int = 0
    most_seen: int = 0
    # the records of the request's ``also`` key, looked up at the same time (None when the
    # request named none, or the peer predates the field)
    also: ResolveReply | None = None


@valueclass
class ResolveRequest(Op[ResolveReply]):
    """``resolve``: the records of one name key, and optionally of a second one (``also``:
    a prefix's claim object, looked up beside the name in one round trip)."""

    key: NameKey
    also: NameKey | None = None


def check_resolve(args: dict[str, Any]) -> ResolveRequest:
    """The serving side's reading of a ``resolve`` CALL's arguments (UsageError)."""
    also = NameKey(hex_arg(args, "also", 20)) if args.get("also") is not None else None
    return ResolveRequest(NameKey(hex_arg(args, "key", 20)), also)


def encode_resolve(request: ResolveRequest) -> dict[str, Any]:
    if request.also is None:
        return {"key": request.key.hex()}
    return {"key": request.key.hex(), "also": request.also.hex()}


def decode_resolve(body: dict[str, Any], nested: bool = False) -> ResolveReply:
    also = body.get("also")
    if also is not None and (nested or not isinstance(also, dict)):
        raise bad("resolve", "also", "one reply object")
    return ResolveReply(
        strings_field(body, "resolve", "manifests"),
        strings_field(body, "resolve", "history"),
        strings_field(body, "resolve", "holders"),
        state_field(body, "resolve", "network"),
        int_field(body, "resolve", "knows", 0),
        int_field(body, "resolve", "most_seen", 0),
        decode_resolve(also, nested=True) if also is not None else None,
    )


def encode_resolve_reply(reply: ResolveReply) -> dict[str, Any]:
    return {
        "manifests": list(reply.manifests),
        "history": list(reply.history),
        "holders": list(reply.holders),
        "network": reply.network,
        "knows": reply.knows,
        "most_seen": reply.most_seen,
        **({"also": encode_resolve_reply(reply.also)} if reply.also is not None else {}),
    }


def resolve_call(request: ResolveRequest) -> tuple[str, dict[str, Any]]:
    """("resolve", CALL arguments), checked as the serving peer checks them: what
    ``ops.encode_request`` gives for ``request``."""
    args = encode_resolve(request)
    check_resolve(args)
    return "resolve", args


def resolve_reply(body: object) -> ResolveReply:
    """The typed reply of a ``resolve`` REPLY body: what ``ops.decode_reply`` gives
    (WireError, the peer's fault, when it does not decode)."""
    if not isinstance(body, dict):
        raise WireError("resolve reply must be a JSON object", field="resolve")
    return decode_resolve(body)
