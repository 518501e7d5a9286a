"""Signatures: verification results are remembered without ever accepting a forgery."""

from __future__ import annotations

import pytest

from difs_p2p.errors import IntegrityError
from difs_p2p.identity import Identity, verify_signature


def test_a_remembered_verification_accepts_only_the_exact_bytes() -> None:
    """After a valid signature is verified (and remembered), any changed byte still fails."""
    signer, other = Identity.generate(), Identity.generate()
    message = b"difs-test\x00" + bytes(range(200))
    signature = signer.sign(message)
    for _ in range(3):  # the first call verifies, the others hit the cache
        verify_signature(signer.public_key, signature, message)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    forgeries = [
        (signer.public_key, signature, message + b"x"),
        (signer.public_key, signature, message[:-1] + b"\xff"),
        (signer.public_key, flipped, message),
        (other.public_key, signature, message),
    ]
    for public_key, sig, msg in forgeries * 2:
        with pytest.raises(IntegrityError, match="bad signature"):
            verify_signature(public_key, sig, msg)


def test_malformed_keys_and_signatures_are_refused() -> None:
    """Wrong lengths fail before any verification."""
    signer = Identity.generate()
    signature = signer.sign(b"m")
    with pytest.raises(IntegrityError, match="malformed"):
        verify_signature(signer.public_key[:31], signature, b"m")
    with pytest.raises(IntegrityError, match="malformed"):
        verify_signature(signer.public_key, signature + b"\x00", b"m")
