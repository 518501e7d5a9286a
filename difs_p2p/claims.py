"""Prefix ownership: who may publish under a first component, and which manifests readers
accept there (docs/PROTOCOL.md, "Names"; docs/SECURITY.md, "Who may add what under a
prefix"). Pure.

A **claim** is the reserved object ``/<first component>/@claim`` (content: the canonical
JSON ``{"prefix": "/t.com/"}``, informational), published like any object at the plain name
key of that name: its first publisher owns the claim object there, and so owns the prefix.
A claim is permanent: a tombstone of the claim object still names its owner. Deeper
prefixes are not claimed; the owner hands them out with delegations (delegation.py).
``/key/<fp>/`` is owned by that key already and cannot be claimed.

Under a claimed prefix:

* a name lives at its **owned key** for the claim owner (manifest.owned_key); readers look
  there and accept only the claim owner's manifests (signed by it, or by a writer it
  delegated to). A stranger's manifest at the plain key is ignored, so squatting a name is
  useless; the owner's own names from before its claim stay readable at the plain key
  (:func:`admit`).
* a publisher that is neither the owner nor its delegate is refused before it uploads
  (:func:`publish_key`).

Under an unclaimed prefix, names keep the plain key and the first publisher of each name
owns it, as before; a delegated manifest is refused there (a delegation needs a claimed
prefix or ``/key/<fp>/``). Clients cache the claim lookups (:class:`ClaimCache`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from difs_p2p.classgen import valueclass
from difs_p2p.delegation import Delegation
from difs_p2p.errors import (
    BadNameError,
    DifsError,
    NotFoundError,
    PermissionDeniedError,
    UsageError,
)
from difs_p2p.identity import fingerprint
from difs_p2p.manifest import Manifest, owned_key
from difs_p2p.names import (
    KEY_NAMESPACE,
    NameKey,
    claim_name,
    is_claim,
    key_namespace_owner,
    name_components,
    name_key,
    normalize_name,
    reserved_problem,
    top_prefix,
)
from difs_p2p.records import canonical_json

# How long a client trusts a claim lookup: an owner, and "not claimed". A claim is
# permanent, so a known owner may be kept longer; a new claim should show soon.
CLAIM_TTL = 60.0
UNCLAIMED_TTL = 10.0
# Prefixes a client remembers (a gateway keeps one client for every request): about
# 100 bytes each.
CLAIM_CACHE_SIZE = 4096


def claim_prefix(text: str) -> str:
    """The prefix ``difs claim TEXT`` claims, as ``"/t.com/"``: one first component.

    UsageError for ``/key/...`` (owned by its key already) and for deeper prefixes (the
    owner delegates those); BadNameError for a bad name or the reserved ``@claim``.
    """
    if text.startswith("/") and text[1:].split("/")[0] == KEY_NAMESPACE:
        raise UsageError(f"/{KEY_NAMESPACE}/<fingerprint>/ belongs to its key and is not claimed")
    parts = name_components(text)
    if len(parts) != 1:
        raise UsageError(
            f"only a first component is claimed (/{parts[0]}/): deeper prefixes are handed "
            "out by its owner with `difs delegate`"
        )
    prefix = f"/{parts[0]}/"
    reserved = reserved_problem(claim_name(prefix))
    if reserved is not None:
        raise BadNameError(f"bad name {text!r}: {reserved}")
    return prefix


def claim_content(prefix: str) -> bytes:
    """What a claim object holds: ``{"prefix": "/t.com/"}`` in canonical JSON."""
    return canonical_json({"prefix": prefix})


def claimed_scope(name: str) -> str | None:
    """The prefix whose claim decides where ``name`` lives (``"/t.com/"``), or None: a
    ``/key/<fp>/`` name, and a claim object itself, are always at the plain key."""
    return None if is_claim(name) else top_prefix(name)


def publish_key(
    name: str, claim_owner: bytes | None, publisher: bytes, delegation: Delegation | None
) -> NameKey:
    """The key ``publisher`` publishes ``name`` under (with its ``delegation``, if any),
    given the owner of its prefix's claim (None: not claimed).

    PermissionDeniedError, before anything is uploaded, for a key that is neither the
    claim owner nor its delegate, and for a delegation under an unclaimed prefix;
    BadNameError for a name using the reserved ``@claim`` component elsewhere.
    """
    norm = normalize_name(name)
    reserved = reserved_problem(norm)
    if reserved is not None:
        raise BadNameError(f"bad name {norm!r}: {reserved}")
    scope = claimed_scope(norm)
    if scope is None:
        if delegation is not None and is_claim(norm):
            raise UsageError(f"the claim {norm} is made by the prefix owner's own key")
        return name_key(norm)
    if claim_owner is None:
        if delegation is not None:
            raise PermissionDeniedError(
                f"{scope} is not claimed, so a delegation under it counts for nothing: its "
                f"owner claims it first (difs claim {scope})"
            )
        return name_key(norm)
    owner = delegation.owner if delegation is not None else publisher
    if owner != claim_owner:
        raise PermissionDeniedError(
            f"{scope} is claimed by {fingerprint(claim_owner)}; ask its owner for a delegation"
        )
    return owned_key(norm, claim_owner)


def admit(name: str, claim_owner: bytes | None, found: Sequence[Manifest]) -> list[Manifest]:
    """The manifests of ``name`` a reader may use, of those ``found`` (in order).

    Claimed prefix: only the claim owner's (found at the owned key, or the owner's own
    names from before the claim at the plain key). Unclaimed: none carrying a delegation.
    ``/key/<fp>/`` names and claim objects: all (manifest.py checked their owner).
    """
    norm = normalize_name(name)
    if claimed_scope(norm) is None:
        return list(found)
    if claim_owner is not None:
        return [m for m in found if m.owner == claim_owner]
    return [m for m in found if m.delegation is None]


def refused(name: str, claim_owner: bytes | None, found: Sequence[Manifest]) -> DifsError:
    """The error for a name whose ``found`` manifests :func:`admit` all refused (or none)."""
    norm = normalize_name(name)
    scope = claimed_scope(norm)
    if scope is not None and claim_owner is not None:
        return NotFoundError(
            f"{norm} is not published by the owner of {scope} ({fingerprint(claim_owner)})"
        )
    if found and scope is not None:
        prefix = found[0].delegation.prefix if found[0].delegation else scope
        return PermissionDeniedError(
            f"{norm} was published under a delegation for {prefix}, but {scope} is not "
            "claimed: readers refuse it"
        )
    return NotFoundError(f"{norm} is not published")


def ownership(name: str, claim_owner: bytes | None) -> dict[str, Any]:
    """Who owns ``name``'s prefix, as ``difs owner`` prints it (``--json``)."""
    norm = normalize_name(name)
    namespace = key_namespace_owner(norm)
    if namespace is not None:
        return {
            "name": norm,
            "prefix": f"/{KEY_NAMESPACE}/{namespace}/",
            "state": "self-certifying",
            "owner": None,
            "fingerprint": namespace,
        }
    prefix = top_prefix(norm)
    return {
        "name": norm,
        "prefix": prefix,
        "state": "claimed" if claim_owner is not None else "unclaimed",
        "owner": claim_owner.hex() if claim_owner is not None else None,
        "fingerprint": fingerprint(claim_owner) if claim_owner is not None else None,
    }


@valueclass
class ClaimAnswer:
    """A remembered claim lookup: the owner's public key (None: not claimed), until when."""

    owner: bytes | None
    until: float


class ClaimCache:
    """Claim lookups a client remembers: an owner for ``ttl`` seconds, "not claimed" for
    ``unclaimed_ttl``; at most ``size`` prefixes (the oldest answer is dropped first)."""

    def __init__(
        self,
        ttl: float = CLAIM_TTL,
        unclaimed_ttl: float = UNCLAIMED_TTL,
        size: int = CLAIM_CACHE_SIZE,
    ) -> None:
        self.ttl = ttl
        self.unclaimed_ttl = unclaimed_ttl
        self.size = size
        self._answers: OrderedDict[str, ClaimAnswer] = OrderedDict()

    def get(self, prefix: str, now: float) -> ClaimAnswer | None:
        """The remembered answer for ``prefix``, if still fresh at ``now``."""
        answer = self._answers.get(prefix)
        if answer is None:
            return None
        if now >= answer.until:
            del self._answers[prefix]
            return None
        return answer

    def put(self, prefix: str, owner: bytes | None, now: float) -> None:
        """Remember the claim lookup of ``prefix`` made at ``now``."""
        ttl = self.ttl if owner is not None else self.unclaimed_ttl
        self._answers.pop(prefix, None)
        self._answers[prefix] = ClaimAnswer(owner, now + ttl)
        while len(self._answers) > self.size:
            self._answers.popitem(last=False)

    def forget(self, prefix: str) -> None:
        self._answers.pop(prefix, None)

    def __len__(self) -> int:
        return len(self._answers)
