"""Delegation certificates: an owner's signed permission for a writer key to publish names
under a prefix (docs/PROTOCOL.md, "Manifest": the optional ``delegation`` field).

A certificate travels inside the manifests its writer signs; manifest.py checks that it
covers the manifest (writer, prefix, expiry) and takes the name's owner from it. Pure.
"""

from __future__ import annotations

from typing import Any

from difs_p2p.classgen import valueclass
from difs_p2p.errors import WireError
from difs_p2p.identity import Identity, verify_signature
from difs_p2p.names import normalize_name
from difs_p2p.records import canonical_json, is_hex, is_time

DELEGATION_DOMAIN = b"difs-delegation-v1\x00"
# Reserved last component of the object listing revoked writer keys under a prefix.
REVOCATIONS = "@revoked"


@valueclass
class Delegation:
    """An owner's signed permission for a writer key to publish names under a prefix.

    Canonical JSON ``{"expires", "owner", "prefix", "sig", "t": "difs-delegation",
    "writer"}``; the signature covers ``b"difs-delegation-v1\x00"`` + the canonical JSON
    without ``sig``. Revocation: certificates expire, and readers refuse writers listed in
    the owner's revocation list (the object ``<prefix>/@revoked``).
    """

    prefix: str
    owner: bytes
    writer: bytes
    expires: float
    sig: bytes

    def covers(self, name: str) -> bool:
        return name == self.prefix or name.startswith(self.prefix.rstrip("/") + "/")

    def unsigned(self) -> dict[str, Any]:
        return {
            "t": "difs-delegation",
            "prefix": self.prefix,
            "owner": self.owner.hex(),
            "writer": self.writer.hex(),
            "expires": self.expires,
        }

    def as_json(self) -> dict[str, Any]:
        return {**self.unsigned(), "sig": self.sig.hex()}


def build_delegation(owner: Identity, *, prefix: str, writer: bytes, expires: float) -> Delegation:
    """Sign a delegation of ``prefix`` to ``writer`` until ``expires`` (unix seconds)."""
    d = Delegation(normalize_name(prefix), owner.public_key, writer, round(expires, 3), b"")
    sig = owner.sign(DELEGATION_DOMAIN + canonical_json(d.unsigned()))
    return parse_delegation({**d.unsigned(), "sig": sig.hex()})


def parse_delegation(obj: object) -> Delegation:
    """Decode and verify a delegation certificate (WireError / IntegrityError)."""
    fields = {"t", "prefix", "owner", "writer", "expires", "sig"}
    if not isinstance(obj, dict) or set(obj) != fields or obj["t"] != "difs-delegation":
        raise WireError("malformed delegation", field="delegation")
    prefix, owner, writer, expires, sig = (
        obj["prefix"],
        obj["owner"],
        obj["writer"],
        obj["expires"],
        obj["sig"],
    )
    if not (is_hex(owner, 64) and is_hex(writer, 64) and is_hex(sig, 128)):
        raise WireError("malformed delegation keys", field="delegation")
    if not is_time(expires):
        raise WireError("malformed delegation expiry", field="delegation.expires")
    if not isinstance(prefix, str):
        raise WireError("malformed delegation prefix", field="delegation.prefix")
    try:
        norm = normalize_name(prefix)
    except Exception as exc:
        raise WireError(f"bad delegation prefix: {exc}", field="delegation.prefix") from None
    if norm != prefix:
        raise WireError("delegation prefix is not in normal form", field="delegation.prefix")
    d = Delegation(
        prefix, bytes.fromhex(owner), bytes.fromhex(writer), float(expires), bytes.fromhex(sig)
    )
    verify_signature(d.owner, d.sig, DELEGATION_DOMAIN + canonical_json(d.unsigned()))
    return d
