"""Who may ask a peer for what: roles, the one permission table, proofs. No I/O.

A TCP connection starts as a **stranger**. In the HELLO exchange (docs/PROTOCOL.md) the
peer sends a fresh 32-byte nonce; the other side may then prove a role:

* **operator**: knows the peer's control token (DATA/control.token) and sends
  ``HMAC-SHA256(token, nonce || peer node id)``; the token itself never travels (traffic is
  not encrypted);
* **peer**: another storage peer sends its Ed25519 node key and its signature over
  ``b"difs-peer-auth-v1\\x00" || nonce || peer node id``; its node ID (SHA-256 of the key,
  see identity.py) is then known to the serving peer.

:data:`CONTROL_TABLE` is the one table of every request a connection can make: the frames
(HELLO, GET_SEG, PUT_SEG) and each control operation (CALL), with the role it needs and the
check that turns its arguments into a typed request (the request decoders of
:mod:`difs_p2p.ops`). docs/PROTOCOL.md shows the same table (a test compares them). A
request is refused with FORBIDDEN before any work when the connection's role is not enough,
and with BAD_REQUEST when its arguments do not check.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, Protocol

from difs_p2p import ops, wire
from difs_p2p.classgen import valueclass
from difs_p2p.errors import IntegrityError, StorageError, UsageError
from difs_p2p.identity import Identity, node_id_for, verify_signature
from difs_p2p.ops import OPS

__all__ = [
    "CONTROL_TABLE",
    "NONCE_SIZE",
    "TOKEN_SIZE",
    "Access",
    "Credential",
    "OpRule",
    "OperatorCredential",
    "PeerCredential",
    "Role",
    "check_proof",
    "load_or_create_token",
    "may_ask",
    "new_nonce",
    "permitted",
    "read_token_file",
]

NONCE_SIZE: Final = 32
TOKEN_SIZE: Final = 32
PEER_AUTH_LABEL: Final = b"difs-peer-auth-v1\x00"


class Role(enum.IntEnum):
    """What a connection proved, in increasing order of trust."""

    STRANGER = 0
    PEER = 1
    OPERATOR = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class Access(enum.Enum):
    """Who may make a request (the column of the permission table)."""

    ANYONE = "anyone"
    # anyone, but strangers share a small rate (see PeerConfig.open_work_rate)
    ANYONE_RATED = "anyone (rate-limited)"
    PEER = "peer"
    # a peer must give a reason ({kind: place|repair, key, version, start, end})
    PEER_WITH_REASON = "peer with reason"
    OPERATOR = "operator"


@valueclass
class OpRule:
    """One row of the table: who may make the request, and how its arguments are checked
    (the check raises UsageError; unknown arguments are ignored, for later versions)."""

    access: Access
    check: Callable[[dict[str, Any]], object]
    what: str


# Frames are named in capitals, control operations (CALL "op") in lower case.
# A control operation's check is its request decoder in ops.OPS (the asking side encodes
# with the same row).
CONTROL_TABLE: Final[dict[str, OpRule]] = {
    "HELLO": OpRule(Access.ANYONE, ops.no_args, "open a connection, prove a role"),
    "GET_SEG": OpRule(Access.ANYONE, ops.no_args, "read a segment"),
    "PUT_SEG": OpRule(Access.PEER, ops.no_args, "upload a segment"),
    "resolve": OpRule(Access.ANYONE, OPS["resolve"].check, "read a name's records"),
    "holds": OpRule(Access.ANYONE, OPS["holds"].check, "probe one range"),
    "holds_ranges": OpRule(Access.ANYONE, OPS["holds_ranges"].check, "probe many ranges"),
    "prove": OpRule(Access.ANYONE, OPS["prove"].check, "prove holding a range (signed nonce)"),
    "prove_many": OpRule(
        Access.ANYONE, OPS["prove_many"].check, "prove holding many ranges (one signature)"
    ),
    "release": OpRule(
        Access.ANYONE, OPS["release"].check, "free a deleted name (owner-signed proof)"
    ),
    "suspect": OpRule(Access.ANYONE_RATED, OPS["suspect"].check, "re-verify a segment"),
    "hold": OpRule(Access.PEER_WITH_REASON, OPS["hold"].check, "sign a holder entry"),
    "place": OpRule(Access.OPERATOR, OPS["place"].check, "place an upload's replicas"),
    "chain": OpRule(Access.OPERATOR, OPS["chain"].check, "announce an upload to chain"),
    "relay": OpRule(Access.PEER, OPS["relay"].check, "forward this connection's uploads"),
    "publish": OpRule(Access.OPERATOR, OPS["publish"].check, "store a manifest and entries"),
    "check": OpRule(Access.OPERATOR, OPS["check"].check, "verify every stored segment"),
    "status": OpRule(Access.OPERATOR, OPS["status"].check, "the peer's view of itself"),
    "abandon": OpRule(Access.PEER, OPS["abandon"].check, "drop what this connection uploaded"),
    "drain": OpRule(Access.OPERATOR, OPS["drain"].check, "leave the network: hand ranges over"),
    "children": OpRule(Access.ANYONE, OPS["children"].check, "read a folder's child entries"),
    "add_children": OpRule(
        Access.OPERATOR, OPS["add_children"].check, "store a folder's child entries"
    ),
}
assert {op for op in CONTROL_TABLE if op.islower()} == set(OPS)


def may_ask(role: Role, rule: OpRule) -> bool:
    """Whether ``role`` may make requests of this kind at all (checked before the
    arguments are even looked at; :func:`permitted` then decides on the request)."""
    match rule.access:
        case Access.ANYONE | Access.ANYONE_RATED:
            return True
        case Access.PEER | Access.PEER_WITH_REASON:
            return role >= Role.PEER
        case Access.OPERATOR:
            return role == Role.OPERATOR


def permitted(role: Role, rule: OpRule, request: object) -> bool:
    """Whether a connection with ``role`` may make ``request`` (checked by ``rule``)."""
    match rule.access:
        case Access.ANYONE | Access.ANYONE_RATED:
            return True
        case Access.PEER:
            return role >= Role.PEER
        case Access.PEER_WITH_REASON:
            if role == Role.OPERATOR:
                return True
            return role == Role.PEER and getattr(request, "reason", None) is not None
        case Access.OPERATOR:
            return role == Role.OPERATOR


# -- proofs -------------------------------------------------------------------------------


def new_nonce() -> bytes:
    return os.urandom(NONCE_SIZE)


def operator_mac(token: bytes, nonce: bytes, server_id: bytes) -> bytes:
    """The operator's proof: HMAC-SHA256(token, nonce || the serving peer's node id)."""
    return hmac.new(token, nonce + server_id, hashlib.sha256).digest()


def peer_auth_message(nonce: bytes, server_id: bytes) -> bytes:
    return PEER_AUTH_LABEL + nonce + server_id


class Credential(Protocol):
    """What a connecting side proves in the HELLO exchange."""

    @property
    def node_id(self) -> bytes | None: ...

    def prove(self, nonce: bytes, server_id: bytes) -> wire.Auth: ...


@valueclass
class OperatorCredential:
    """The local operator: holds the peer's control token."""

    token: bytes

    @property
    def node_id(self) -> bytes | None:
        return None

    def prove(self, nonce: bytes, server_id: bytes) -> wire.Auth:
        proof = operator_mac(self.token, nonce, server_id)
        return wire.Auth(role="operator", key=None, proof=proof)


@valueclass
class PeerCredential:
    """Another storage peer: proves its node key."""

    identity: Identity

    @property
    def node_id(self) -> bytes | None:
        return bytes(self.identity.node_id)

    def prove(self, nonce: bytes, server_id: bytes) -> wire.Auth:
        signature = self.identity.sign(peer_auth_message(nonce, server_id))
        return wire.Auth(role="peer", key=self.identity.public_key, proof=signature)


def check_proof(
    auth: wire.Auth, nonce: bytes, server_id: bytes, token: bytes
) -> tuple[Role, bytes | None]:
    """The role ``auth`` proves (and the node id of a peer), or IntegrityError."""
    if auth.role == "operator":
        if not hmac.compare_digest(auth.proof, operator_mac(token, nonce, server_id)):
            raise IntegrityError("wrong operator proof")
        return Role.OPERATOR, None
    if auth.role == "peer" and auth.key is not None:
        verify_signature(auth.key, auth.proof, peer_auth_message(nonce, server_id))
        return Role.PEER, bytes(node_id_for(auth.key))
    raise IntegrityError(f"unknown role {auth.role!r}")


# -- the token file -----------------------------------------------------------------------


def load_or_create_token(path: Path) -> bytes:
    """The peer's control token: read from ``path``, or created there once (0600)."""
    try:
        return read_token_file(path)
    except FileNotFoundError:
        pass
    except UsageError as exc:
        raise StorageError(str(exc)) from None
    token = os.urandom(TOKEN_SIZE)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(token.hex() + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        raise StorageError(f"cannot write {path}: {exc.strerror or exc}") from None
    return token


def read_token_file(path: Path) -> bytes:
    """A control token file's 32 bytes (FileNotFoundError if missing, else UsageError)."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise UsageError(f"cannot read token file {path}: {exc.strerror or exc}") from None
    try:
        token = bytes.fromhex(text)
    except ValueError:
        token = b""
    if len(token) != TOKEN_SIZE:
        raise UsageError(f"token file {path} is damaged (expected {2 * TOKEN_SIZE} hex digits)")
    return token
