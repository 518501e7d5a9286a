"""Node-ID work: S/Kademlia's static crypto puzzle on the node ID.

A node ID is derived from its public key (``identity.node_id_for``), so it cannot be
chosen; it can be ground, though, by generating keys until one lands near a target key.
The puzzle makes every usable key cost work: an ID counts only if

    SHA-256(b"difs-work-v1\\x00" + node_id)

starts with ``bits`` zero bits (``DhtConfig.id_difficulty``). An honest peer pays
2^bits key generations once, at its first start; an attacker who wants an ID sharing
``b`` leading bits with a key pays 2^(b + bits). Pure functions, plus the key-file
loader that upgrades a key made before the puzzle existed.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from difs_p2p.errors import StorageError
from difs_p2p.identity import Identity, NodeId, load_or_create

log = logging.getLogger(__name__)

WORK_DOMAIN = b"difs-work-v1\x00"


def work_bits(node_id: NodeId) -> int:
    """The number of leading zero bits of the node ID's work hash (0-256)."""
    digest = int.from_bytes(hashlib.sha256(WORK_DOMAIN + node_id).digest(), "big")
    return 256 - digest.bit_length()


def has_work(node_id: NodeId, bits: int) -> bool:
    """Whether ``node_id`` satisfies the puzzle at difficulty ``bits``."""
    return bits <= 0 or work_bits(node_id) >= bits


def generate_with_work(bits: int) -> Identity:
    """A new identity whose node ID satisfies the puzzle (2^bits tries on average).

    CPU-bound: call it in a thread from async code.
    """
    while True:
        identity = Identity.generate()
        if has_work(identity.node_id, bits):
            return identity


def load_or_create_with_work(path: Path, bits: int) -> Identity:
    """The peer key at ``path``, created with the puzzle's work when missing.

    A key from before the puzzle (or made for a lower difficulty) would be refused by
    every contact, so it is kept aside as ``<path>.weak`` and a new key is made: the
    peer's holder entries are re-signed by maintenance, and no content is owned by a
    peer key.
    """
    identity = load_or_create(path, generate=lambda: generate_with_work(bits))
    if has_work(identity.node_id, bits):
        return identity
    aside = path.with_name(path.name + ".weak")
    try:
        path.replace(aside)
    except OSError as exc:
        raise StorageError(f"cannot move aside key file {path}: {exc.strerror or exc}") from None
    log.warning(
        "peer_key_replaced old=%s reason=node ID lacks %d bits of work kept_as=%s",
        identity.fingerprint,
        bits,
        aside,
    )
    return load_or_create(path, generate=lambda: generate_with_work(bits))
