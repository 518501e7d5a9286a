"""Content names: the naming rules, the normal form and the 20-byte name key.

A name is a '/'-separated path of Unicode components, as in NDN: ``/a.com/izone.mp4``.
Names never become file-system paths; they are looked up in the DHT by their name key.

Normal form (what :func:`normalize_name` returns, what manifests carry and what is hashed):

* the text is NFC-normalized, so ``"/caf\\u00e9"`` and ``"/cafe\\u0301"`` are one name;
* it starts with '/', and a single trailing '/' is dropped (``"/a/"`` is ``"/a"``);
* it has 1 to :data:`MAX_COMPONENTS` components, none empty, none ``.`` or ``..``;
* no character is a control character (category Cc, which includes DEL and C1 controls),
  U+2028 LINE SEPARATOR or U+2029 PARAGRAPH SEPARATOR, or a lone surrogate;
* each component is at most :data:`MAX_COMPONENT_BYTES` and the whole name at most
  :data:`MAX_NAME_BYTES` bytes of UTF-8.

Every refusal is a :class:`~difs_p2p.errors.BadNameError` whose message names the rule and
the offending component, e.g. ``bad name '/a//b': empty component at position 2``
(positions count components from 1). Normalizing is idempotent.

The name key is the DHT key of a name::

    name_key(name) = SHA-256(b"difs-name-v1\\x00" || UTF-8(normalize_name(name)))[0:20]

that is, the first 20 bytes of the SHA-256 digest of the 12-byte ASCII domain tag
``difs-name-v1`` followed by one zero byte, then the normal form encoded as UTF-8 (no
length prefix, no terminator).

**Claimed prefixes.** A first component (``/t.com/``) is claimed by publishing the reserved
object ``/t.com/@claim`` (its first publisher owns the prefix, see claims.py). A name under
a claimed first component lives at its *owned key*, derived from the name and the claim
owner's 16-byte key fingerprint, so that nobody else can store a record there::

    owned_name_key(name, fp) = SHA-256(b"difs-owned-name-v1\x00" || fp || UTF-8(normal form))[0:20]

``@claim`` is a reserved component: it may only be the second and last component of a
two-component name (:func:`reserved_problem`). ``/key/<fp>/`` names are owned by their key
and never claimed.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from typing import NewType

from difs_p2p.errors import BadNameError, UsageError

NameKey = NewType("NameKey", bytes)
"""The 20-byte DHT key of a name (see :func:`name_key`)."""

# Room for deep paths, while a signed manifest (at most 4,096 bytes, about 700 without the
# name, which it carries as raw UTF-8) always has space for the name. Counted in UTF-8 bytes
# of the normal form, the leading '/' and the separators included.
MAX_NAME_BYTES = 1024
# The common file-system limit for one path component (NAME_MAX on Linux), so a name can
# be mirrored into a directory tree by a tool without being refused there.
MAX_COMPONENT_BYTES = 255
# Deeper hierarchies are almost certainly mistakes; 64 levels of "/x" are only 128 bytes.
MAX_COMPONENTS = 64

NAME_KEY_SIZE = 20
# Domain separation: a name key can never equal a SHA-256 prefix computed for another use.
_NAME_KEY_DOMAIN = b"difs-name-v1\x00"

# A character's canonical decomposition is at most 4 characters (Unicode 14, checked over
# every code point by tests/test_names.py). NFC(x) composes NFD(x), each composed character
# standing for at most 4 of its characters, and len(x) <= len(NFD(x)); so
# len(x) <= 4 * len(NFC(x)), and text of more than 4 x MAX_NAME_BYTES characters cannot
# normalize to MAX_NAME_BYTES bytes. Such text is refused before NFC: CPython orders
# combining marks in quadratic time (100,000 marks took 14 s to normalize on our 2-core
# test machine; 4,096 take 0.05 s).
_MAX_DECOMPOSITION = 4
_MAX_RAW_CHARS = _MAX_DECOMPOSITION * MAX_NAME_BYTES

# Line and paragraph separators are not Cc, yet they break lines in logs and terminals.
_SEPARATORS = frozenset("\u2028\u2029")
# How much of a long name or component an error message shows.
_SHOWN_CHARS = 48
# Self-certifying names: /key/<fingerprint of the publisher key>/... (key_namespace_owner).
KEY_NAMESPACE = "key"
_FINGERPRINT = re.compile(r"[0-9a-f]{32}")
# The reserved last component of a prefix's claim object: /<first component>/@claim.
CLAIM = "@claim"
# Domain separation of owned name keys from plain name keys (and from any other hash).
_OWNED_KEY_DOMAIN = b"difs-owned-name-v1\x00"
# A key fingerprint (identity.fingerprint) as bytes: the first 16 bytes of its SHA-256.
FINGERPRINT_SIZE = 16


def _show(text: str) -> str:
    """``repr(text)``, cut to a readable length for error messages."""
    if len(text) <= _SHOWN_CHARS:
        return repr(text)
    return f"{text[:_SHOWN_CHARS]!r}... ({len(text)} characters)"


def _bad(name: str, rule: str) -> BadNameError:
    return BadNameError(f"bad name {_show(name)}: {rule}")


def normalize_name(name: str) -> str:
    """The normal form of ``name`` (see the module docstring for the rules).

    Raises BadNameError, naming the rule and the offending component, when a rule is broken.
    """
    if not isinstance(name, str):
        raise BadNameError(f"bad name {name!r}: not a string")
    if len(name) > _MAX_RAW_CHARS:
        raise _bad(name, f"over {MAX_NAME_BYTES} bytes")
    norm = unicodedata.normalize("NFC", name)
    if not norm.startswith("/"):
        raise _bad(name, "must start with '/'")
    if len(norm) > 1 and norm.endswith("/"):
        norm = norm[:-1]
    if norm == "/":
        raise _bad(name, "needs at least one component")
    parts = norm[1:].split("/")
    if len(parts) > MAX_COMPONENTS:
        raise _bad(name, f"more than {MAX_COMPONENTS} components ({len(parts)})")
    total = len(parts)  # the '/' before each component
    for position, part in enumerate(parts, start=1):
        total += _check_component(name, part, position)
    if total > MAX_NAME_BYTES:
        raise _bad(name, f"over {MAX_NAME_BYTES} bytes ({total} bytes of UTF-8)")
    if parts[0] == KEY_NAMESPACE and (len(parts) < 3 or not _FINGERPRINT.fullmatch(parts[1])):
        raise _bad(
            name,
            f"names under /{KEY_NAMESPACE}/ are /{KEY_NAMESPACE}/<32 hex key fingerprint>/<name>",
        )
    return norm


def key_namespace_owner(name: str) -> str | None:
    """The key fingerprint owning ``name`` if it is self-certifying (/key/<fp>/...), else None."""
    parts = normalize_name(name).split("/")
    return parts[2] if parts[1] == KEY_NAMESPACE else None


def _check_component(name: str, part: str, position: int) -> int:
    """Check one NFC component of ``name``; return its length in UTF-8 bytes."""
    if not part:
        raise _bad(name, f"empty component at position {position}")
    if part in (".", ".."):
        raise _bad(name, f"component {part!r} at position {position} is not allowed")
    for ch in part:
        category = unicodedata.category(ch)
        if category == "Cs":
            raise _bad(name, f"unencodable character {ch!r} in component {_show(part)}")
        if category == "Cc" or ch in _SEPARATORS:
            raise _bad(name, f"control character {ch!r} in component {_show(part)}")
    size = len(part.encode("utf-8"))
    if size > MAX_COMPONENT_BYTES:
        raise _bad(
            name,
            f"component {_show(part)} at position {position} is over "
            f"{MAX_COMPONENT_BYTES} bytes ({size} bytes of UTF-8)",
        )
    return size


def name_components(name: str) -> tuple[str, ...]:
    """The components of the normal form of ``name``: ``"/a.com/x/"`` -> ``("a.com", "x")``."""
    return tuple(normalize_name(name)[1:].split("/"))


def name_key(name: str) -> NameKey:
    """The 20-byte DHT key of ``name``.

    ``SHA-256(b"difs-name-v1\\x00" + normalize_name(name).encode("utf-8"))[:20]``: the
    first 20 bytes of SHA-256 over the ASCII tag ``difs-name-v1``, one zero byte and the
    UTF-8 of the normal form. Equivalent spellings of a name therefore share one key.
    """
    norm = normalize_name(name)
    digest = hashlib.sha256(_NAME_KEY_DOMAIN + norm.encode("utf-8")).digest()
    return NameKey(digest[:NAME_KEY_SIZE])


def owned_name_key(name: str, owner_fp: bytes) -> NameKey:
    """The 20-byte DHT key of ``name`` under a prefix claimed by the key whose 16-byte
    fingerprint is ``owner_fp``.

    ``SHA-256(b"difs-owned-name-v1\\x00" + owner_fp + normalize_name(name).encode("utf-8"))[:20]``.
    Only manifests whose owner has that fingerprint are valid there (manifest.py), so no
    other key can store a record under it. UsageError if ``owner_fp`` is not 16 bytes.
    """
    if len(owner_fp) != FINGERPRINT_SIZE:
        raise UsageError(f"an owner fingerprint is {FINGERPRINT_SIZE} bytes, not {len(owner_fp)}")
    norm = normalize_name(name)
    digest = hashlib.sha256(_OWNED_KEY_DOMAIN + bytes(owner_fp) + norm.encode("utf-8")).digest()
    return NameKey(digest[:NAME_KEY_SIZE])


def top_prefix(name: str) -> str | None:
    """The claimable prefix ``name`` is under: its first component as ``"/t.com/"``; None
    for self-certifying names (``/key/<fp>/...``), which their key owns."""
    first = name_components(name)[0]
    return None if first == KEY_NAMESPACE else f"/{first}/"


def claim_name(prefix: str) -> str:
    """The claim object of ``prefix``'s first component: ``"/t.com/"`` -> ``"/t.com/@claim"``."""
    return f"/{name_components(prefix)[0]}/{CLAIM}"


def is_claim(name: str) -> bool:
    """Whether ``name`` is a claim object (``/<first component>/@claim``)."""
    parts = name_components(name)
    return len(parts) == 2 and parts[1] == CLAIM and parts[0] not in (KEY_NAMESPACE, CLAIM)


def reserved_problem(name: str) -> str | None:
    """Why ``name`` may not be published, if it uses the reserved component ``@claim``
    anywhere but as a claim object (``/t.com/@claim``); else None."""
    parts = name_components(name)
    if CLAIM in parts and not is_claim(name):
        return (
            f"{CLAIM!r} is reserved: only /<first component>/{CLAIM} (a prefix's claim, "
            "made with `difs claim`) may use it"
        )
    return None
