"""Prefix ownership, the pure rules: owned name keys, the manifest key rule, the reserved
``@claim`` component, who may publish under a prefix, what readers accept, the claim cache."""

from __future__ import annotations

import hashlib

import pytest

from difs_p2p.claims import (
    ClaimCache,
    admit,
    claim_content,
    claim_prefix,
    ownership,
    publish_key,
    refused,
)
from difs_p2p.delegation import Delegation, build_delegation
from difs_p2p.errors import (
    BadNameError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
    WireError,
)
from difs_p2p.identity import Identity
from difs_p2p.manifest import Manifest, build_manifest, owned_key, parse_manifest
from difs_p2p.names import (
    NameKey,
    claim_name,
    is_claim,
    name_key,
    owned_name_key,
    reserved_problem,
    top_prefix,
)
from difs_p2p.recordpolicy import RecordValidator
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.signed import OWNER, STRANGER, WRITER

GRANT = build_delegation(OWNER, prefix="/t.com/bob", writer=WRITER.public_key, expires=1e9)


def signed(
    signer: Identity,
    name: str,
    *,
    key: NameKey | None = None,
    delegation: Delegation | None = None,
) -> Manifest:
    """A one-segment version 1 of ``name`` stored under ``key`` (the name key if None)."""
    return build_manifest(
        signer,
        name=name,
        version=1,
        parent=None,
        root=None,
        size=100,
        segment_size=4096,
        segment_count=1,
        stripes=1,
        replicas=3,
        integrity=IntegrityRoot(SegmentId(b"\x11" * 32)),
        created=1.0,
        delegation=delegation,
        key=key,
    )


# -- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "fp", "expected"),
    [
        # computed with hashlib.sha256(b"difs-owned-name-v1\x00" + fp + utf8).hexdigest()[:40]
        ("/t.com/a", bytes(range(16)), "0fd9ec361fe97fedc61c4f256ccff55a09238fcb"),
        ("/cafe\u0301/x/", b"\xff" * 16, "b8bd0ee70f0a1c08883eb1267f3da095568f372e"),
    ],
)
def test_owned_name_key_vectors(name: str, fp: bytes, expected: str) -> None:
    """The owned key is SHA-256 over its domain, the 16-byte fingerprint and the normal form."""
    assert owned_name_key(name, fp).hex() == expected


def test_owned_name_key_depends_on_owner_and_name() -> None:
    """Another owner or another name gives another key, never the plain name key."""
    fp = bytes.fromhex(OWNER.fingerprint)
    mine = owned_name_key("/t.com/a", fp)
    assert mine == owned_key("/t.com/a", OWNER.public_key)
    assert mine != owned_name_key("/t.com/a", bytes.fromhex(STRANGER.fingerprint))
    assert mine != owned_name_key("/t.com/b", fp)
    assert mine != name_key("/t.com/a")
    plain = hashlib.sha256(b"difs-name-v1\x00/t.com/a").digest()[:20]
    assert name_key("/t.com/a") == plain
    with pytest.raises(UsageError, match="16 bytes"):
        owned_name_key("/t.com/a", OWNER.public_key)


@pytest.mark.parametrize(
    ("name", "prefix", "claim", "reserved"),
    [
        ("/t.com/a/b", "/t.com/", False, False),
        ("/t.com", "/t.com/", False, False),
        ("/t.com/@claim", "/t.com/", True, False),
        ("/t.com/a/@claim", "/t.com/", False, True),  # not at the first component
        ("/t.com/@claim/x", "/t.com/", False, True),  # not the last component
        ("/@claim", "/@claim/", False, True),
        ("/@claim/@claim", "/@claim/", False, True),
        ("/t.com/@claimed", "/t.com/", False, False),  # only the exact component
        (f"/key/{OWNER.fingerprint}/x", None, False, False),
        (f"/key/{OWNER.fingerprint}/@claim", None, False, True),
    ],
)
def test_claim_names_and_the_reserved_component(
    name: str, prefix: str | None, claim: bool, reserved: bool
) -> None:
    """A claim is /<first>/@claim; @claim anywhere else is reserved; /key/ is never claimed."""
    assert top_prefix(name) == prefix
    assert is_claim(name) is claim
    assert (reserved_problem(name) is not None) is reserved


@pytest.mark.parametrize(
    ("text", "prefix"),
    [("/t.com/", "/t.com/"), ("/t.com", "/t.com/"), ("/cafe\u0301", "/caf\u00e9/")],
)
def test_claim_prefix_takes_a_first_component(text: str, prefix: str) -> None:
    """`difs claim` takes one first component, written with or without its slash."""
    assert claim_prefix(text) == prefix
    assert claim_name(prefix) == prefix + "@claim"
    assert claim_content(prefix) == b'{"prefix":"' + prefix.encode() + b'"}'


@pytest.mark.parametrize(
    ("text", "error", "message"),
    [
        ("/t.com/blog", UsageError, "difs delegate"),
        (f"/key/{OWNER.fingerprint}/", UsageError, "belongs to its key"),
        ("/key", UsageError, "belongs to its key"),
        ("/@claim", BadNameError, "reserved"),
        ("t.com", BadNameError, "must start with"),
    ],
)
def test_claim_prefix_refuses_what_cannot_be_claimed(
    text: str, error: type[Exception], message: str
) -> None:
    """Deeper prefixes, /key/ and the reserved component are refused with the reason."""
    with pytest.raises(error, match=message):
        claim_prefix(text)


# -- the manifest key rule ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signer", "name", "key", "delegation"),
    [
        (OWNER, "/t.com/a", None, None),  # the plain key, as before
        (OWNER, "/t.com/a", owned_key("/t.com/a", OWNER.public_key), None),
        # a delegate's manifest takes the owner's owned key
        (WRITER, "/t.com/bob/x", owned_key("/t.com/bob/x", OWNER.public_key), GRANT),
        (OWNER, "/t.com/@claim", None, None),
    ],
)
def test_manifests_at_the_plain_or_the_owners_key_are_valid(
    signer: Identity, name: str, key: NameKey | None, delegation: Delegation | None
) -> None:
    """A manifest's key is its name key or the owned key of its owner; peers store either."""
    m = signed(signer, name, key=key, delegation=delegation)
    assert m.key == (key or name_key(name))
    assert parse_manifest(m.raw, m.key) == m
    assert RecordValidator().record_rank(m.key, m.raw, 0.0) == (1,)


@pytest.mark.parametrize(
    ("signer", "name", "key", "delegation", "error"),
    [
        # another owner's owned key: nobody stores a record under a key that is not theirs
        (STRANGER, "/t.com/a", owned_key("/t.com/a", OWNER.public_key), None, "do not match"),
        # the publisher's own owned key while the name is the delegating owner's
        (WRITER, "/t.com/bob/x", owned_key("/t.com/bob/x", WRITER.public_key), GRANT, "match"),
        (OWNER, "/t.com/a", name_key("/t.com/b"), None, "do not match"),  # neither form
        (OWNER, "/t.com/a", owned_key("/t.com/b", OWNER.public_key), None, "do not match"),
        # the claim object and /key/ names only at the plain key
        (OWNER, "/t.com/@claim", owned_key("/t.com/@claim", OWNER.public_key), None, "match"),
        (
            OWNER,
            f"/key/{OWNER.fingerprint}/x",
            owned_key(f"/key/{OWNER.fingerprint}/x", OWNER.public_key),
            None,
            "do not match",
        ),
    ],
)
def test_a_key_matching_neither_form_is_refused(
    signer: Identity, name: str, key: NameKey, delegation: Delegation | None, error: str
) -> None:
    """A manifest under any other key is refused when built, parsed or offered to a peer."""
    with pytest.raises(IntegrityError, match=error):
        signed(signer, name, key=key, delegation=delegation)


def test_peers_refuse_owned_keys_of_others_and_reserved_names() -> None:
    """The DHT's policy ranks none of: a record under another owner's key, a reserved name,
    a claim signed under a delegation."""
    good = signed(OWNER, "/t.com/a", key=owned_key("/t.com/a", OWNER.public_key))
    policy = RecordValidator()
    assert policy.record_rank(owned_key("/t.com/a", STRANGER.public_key), good.raw, 0.0) is None
    assert policy.record_rank(name_key("/t.com/a"), good.raw, 0.0) is None  # stored elsewhere
    with pytest.raises(WireError, match="reserved"):
        signed(OWNER, "/t.com/a/@claim")
    grant = build_delegation(OWNER, prefix="/t.com", writer=WRITER.public_key, expires=1e9)
    with pytest.raises(IntegrityError, match="own key"):
        signed(WRITER, "/t.com/@claim", delegation=grant)


# -- who may publish, what readers accept ---------------------------------------------------

ALICE, BOB = OWNER.public_key, WRITER.public_key


@pytest.mark.parametrize(
    ("name", "claim_owner", "publisher", "delegation", "key"),
    [
        ("/t.com/a", None, BOB, None, name_key("/t.com/a")),  # unclaimed: as before
        ("/t.com/a", ALICE, ALICE, None, owned_key("/t.com/a", ALICE)),
        ("/t.com/bob/x", ALICE, BOB, GRANT, owned_key("/t.com/bob/x", ALICE)),
        ("/t.com/@claim", ALICE, BOB, None, name_key("/t.com/@claim")),  # the claim: plain
        (f"/key/{OWNER.fingerprint}/x", None, ALICE, None, name_key(f"/key/{OWNER.fingerprint}/x")),
    ],
)
def test_publish_key_of_owners_and_delegates(
    name: str,
    claim_owner: bytes | None,
    publisher: bytes,
    delegation: Delegation | None,
    key: NameKey,
) -> None:
    """The claim owner and its delegates publish at the owned key; others as before."""
    assert publish_key(name, claim_owner, publisher, delegation) == key


@pytest.mark.parametrize(
    ("name", "claim_owner", "publisher", "delegation", "error", "message"),
    [
        ("/t.com/a", ALICE, BOB, None, PermissionDeniedError, f"claimed by {OWNER.fingerprint}"),
        # a delegation from someone who is not the claim owner is of no use
        (
            "/t.com/bob/x",
            STRANGER.public_key,
            BOB,
            GRANT,
            PermissionDeniedError,
            "ask its owner for a delegation",
        ),
        ("/t.com/bob/x", None, BOB, GRANT, PermissionDeniedError, "not claimed"),
        ("/t.com/@claim", None, BOB, GRANT, UsageError, "own key"),
        ("/t.com/a/@claim", ALICE, ALICE, None, BadNameError, "reserved"),
    ],
)
def test_publish_key_refuses_strangers_before_any_upload(
    name: str,
    claim_owner: bytes | None,
    publisher: bytes,
    delegation: Delegation | None,
    error: type[Exception],
    message: str,
) -> None:
    """Neither owner nor delegate, a delegation under an unclaimed prefix, or a reserved
    name: refused."""
    with pytest.raises(error, match=message):
        publish_key(name, claim_owner, publisher, delegation)


OWNERS = signed(OWNER, "/t.com/a")
STRANGERS = signed(STRANGER, "/t.com/a")
DELEGATED = signed(WRITER, "/t.com/bob/x", delegation=GRANT)


@pytest.mark.parametrize(
    ("name", "claim_owner", "found", "admitted"),
    [
        ("/t.com/a", ALICE, [STRANGERS, OWNERS], [OWNERS]),  # a squatter is ignored
        ("/t.com/a", None, [STRANGERS, OWNERS], [STRANGERS, OWNERS]),  # unclaimed: as before
        ("/t.com/bob/x", ALICE, [DELEGATED], [DELEGATED]),
        ("/t.com/bob/x", STRANGER.public_key, [DELEGATED], []),
        ("/t.com/bob/x", None, [DELEGATED], []),  # a delegation needs a claimed prefix
        ("/t.com/@claim", ALICE, [STRANGERS], [STRANGERS]),  # claims are not filtered
    ],
)
def test_readers_admit_only_the_claim_owners_manifests(
    name: str, claim_owner: bytes | None, found: list[Manifest], admitted: list[Manifest]
) -> None:
    """Under a claim only the owner's (and its delegates'); unclaimed, no delegated one."""
    assert admit(name, claim_owner, found) == admitted


def test_refusals_say_why() -> None:
    """A name with nothing admitted is not found (claimed) or refused (delegation)."""
    assert isinstance(refused("/t.com/a", ALICE, [STRANGERS]), NotFoundError)
    unclaimed = refused("/t.com/bob/x", None, [DELEGATED])
    assert isinstance(unclaimed, PermissionDeniedError)
    assert "/t.com/bob" in str(unclaimed) and "not claimed" in str(unclaimed)
    assert isinstance(refused("/t.com/a", None, []), NotFoundError)


@pytest.mark.parametrize(
    ("name", "claim_owner", "state", "fp"),
    [
        ("/t.com/x", ALICE, "claimed", OWNER.fingerprint),
        ("/t.com/", None, "unclaimed", None),
        (f"/key/{OWNER.fingerprint}/x", None, "self-certifying", OWNER.fingerprint),
    ],
)
def test_ownership_states(name: str, claim_owner: bytes | None, state: str, fp: str) -> None:
    """`difs owner` says claimed (by whom), self-certifying or unclaimed."""
    info = ownership(name, claim_owner)
    assert (info["state"], info["fingerprint"]) == (state, fp)


# -- the client's claim cache ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "asked_at", "known"),
    [
        (ALICE, 59.9, True),
        (ALICE, 60.0, False),  # an owner is trusted 60 s
        (None, 9.9, True),
        (None, 10.0, False),  # "not claimed" 10 s
    ],
)
def test_claim_cache_ttls(owner: bytes | None, asked_at: float, known: bool) -> None:
    """Claim answers are remembered for 60 s, answers of no claim for 10 s."""
    cache = ClaimCache()
    cache.put("/t.com/", owner, 0.0)
    answer = cache.get("/t.com/", asked_at)
    assert (answer is not None) is known
    if answer is not None:
        assert answer.owner == owner


def test_claim_cache_is_bounded() -> None:
    """The oldest answer makes room; forget drops one at once."""
    cache = ClaimCache(size=2)
    for i, prefix in enumerate(("/a/", "/b/", "/c/")):
        cache.put(prefix, ALICE, float(i))
    assert len(cache) == 2 and cache.get("/a/", 3.0) is None
    cache.forget("/b/")
    assert cache.get("/b/", 3.0) is None and cache.get("/c/", 3.0) is not None
