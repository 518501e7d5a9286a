"""Persistent Ed25519 identities for peers and publishers.

A key file holds the raw 32-byte Ed25519 private key, hex-encoded, with mode 0600. A peer's
node ID is derived from its public key, so that an ID cannot be chosen freely:

    node_id = SHA-256(b"difs-node-v1\\x00" + public_key)[:20]
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import NewType

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from difs_p2p.classgen import valueclass
from difs_p2p.errors import IntegrityError, StorageError

NodeId = NewType("NodeId", bytes)
NODE_ID_SIZE = 20
PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64


def node_id_for(public_key: bytes) -> NodeId:
    """The 20-byte node ID that belongs to an Ed25519 public key."""
    return NodeId(hashlib.sha256(b"difs-node-v1\x00" + public_key).digest()[:NODE_ID_SIZE])


def distance(a: bytes, b: bytes) -> int:
    """Kademlia's XOR distance between two IDs (node IDs, name keys, range keys)."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def fingerprint(public_key: bytes) -> str:
    """A short, stable, printable form of a public key (hex of the node ID derivation)."""
    return hashlib.sha256(b"difs-key-v1\x00" + public_key).hexdigest()[:32]


def verify_signature(public_key: bytes, signature: bytes, message: bytes) -> None:
    """Raise IntegrityError unless ``signature`` is ``public_key``'s over ``message``.

    Results are remembered (see ``_signature_valid``): a peer sees the same manifest and
    holder entries again and again (a store and the history entry of one publish,
    every maintenance round, every resolve by a reader), and one Ed25519 verification
    costs about 100 us here.
    """
    if len(public_key) != PUBLIC_KEY_SIZE or len(signature) != SIGNATURE_SIZE:
        raise IntegrityError("malformed key or signature")
    if not _signature_valid(bytes(public_key), bytes(signature), bytes(message)):
        raise IntegrityError("bad signature")


# Verifications remembered (least recently used dropped first). Messages are manifests
# (at most 4 KiB, about 1 KiB in practice) and 115-byte holder entries: at most about
# 17 MB, about 4 MB in practice.
_VERIFIED_CACHE = 4096


@functools.lru_cache(maxsize=_VERIFIED_CACHE)
def _signature_valid(public_key: bytes, signature: bytes, message: bytes) -> bool:
    """Whether the signature verifies: a pure function of its arguments, so it is cached
    whole (key, signature and message bytes), never by a digest that could collide."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except (InvalidSignature, ValueError):
        return False
    return True


@valueclass
class Identity:
    """An Ed25519 key pair with its derived node ID."""

    private_key: Ed25519PrivateKey
    public_key: bytes
    node_id: NodeId

    @classmethod
    def from_private_key(cls, key: Ed25519PrivateKey) -> Identity:
        from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

        public = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        return cls(private_key=key, public_key=public, node_id=node_id_for(public))

    @classmethod
    def generate(cls) -> Identity:
        return cls.from_private_key(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Identity:
        """A deterministic identity from 32 seed bytes (simulations and tests)."""
        return cls.from_private_key(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        return self.private_key.sign(message)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.public_key)


def load_or_create(path: Path, *, generate: Callable[[], Identity] = Identity.generate) -> Identity:
    """Load the identity stored at ``path``, creating it (mode 0600) with ``generate``
    when missing."""
    try:
        text = path.read_text().strip()
    except FileNotFoundError:
        identity = generate()
        raw = identity.private_key.private_bytes_raw()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(raw.hex() + "\n")
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except OSError as exc:
            raise StorageError(f"cannot write key file {path}: {exc.strerror or exc}") from None
        return identity
    except OSError as exc:
        raise StorageError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    try:
        raw = bytes.fromhex(text)
        if len(raw) != 32:
            raise ValueError
    except ValueError:
        raise StorageError(f"key file {path} is damaged (expected 64 hex characters)") from None
    return Identity.from_seed(raw)
