"""Content names: rules, normal form and the 20-byte name key.

A name is a '/'-separated sequence of UTF-8 components, as in NDN: ``/a.com/izone.mp4``.
Its normal form is NFC-normalized, starts with '/', and has no trailing '/'. Components may
not be empty, '.' or '..', and no character may be a control character. Names never become
file-system paths.

The name key is ``SHA-256(b"difs-name-v1\\x00" + normal form as UTF-8)[:20]``.
"""

from __future__ import annotations

import hashlib
import unicodedata
from typing import NewType

from difs_p2p.errors import BadNameError, UsageError

NameKey = NewType("NameKey", bytes)

# Long enough for deep paths, short enough to keep a manifest well under 1 KB.
MAX_NAME_BYTES = 1024
# The usual file-system limit for one path component.
MAX_COMPONENT_BYTES = 255
MAX_COMPONENTS = 64
_FORBIDDEN = {"\u2028", "\u2029", "\x7f"}


def normalize_name(name: str) -> str:
    """The normal form of ``name``; BadNameError names the rule a bad name breaks."""
    if not isinstance(name, str):
        raise BadNameError(f"bad name {name!r}: not a string")
    try:
        norm = unicodedata.normalize("NFC", name)
        norm.encode("utf-8")
    except UnicodeError:
        raise BadNameError(f"bad name {name!r}: not valid Unicode text") from None
    if not norm.startswith("/"):
        raise BadNameError(f"bad name {name!r}: must start with '/'")
    if norm.endswith("/") and len(norm) > 1:
        norm = norm[:-1]
    parts = norm.split("/")[1:]
    if parts == [""]:
        raise BadNameError(f"bad name {name!r}: needs at least one component")
    if len(parts) > MAX_COMPONENTS:
        raise BadNameError(f"bad name {name!r}: more than {MAX_COMPONENTS} components")
    for i, part in enumerate(parts, start=1):
        if part == "":
            raise BadNameError(f"bad name {name!r}: empty component at position {i}")
        if part in (".", ".."):
            raise BadNameError(f"bad name {name!r}: component {part!r} is not allowed")
        for ch in part:
            if unicodedata.category(ch) in ("Cc", "Cs") or ch in _FORBIDDEN:
                raise BadNameError(
                    f"bad name {name!r}: control character {ch!r} in component {part!r}"
                )
        if len(part.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise BadNameError(
                f"bad name {name!r}: component {part[:20]!r}... is over {MAX_COMPONENT_BYTES} bytes"
            )
    if len(norm.encode("utf-8")) > MAX_NAME_BYTES:
        raise BadNameError(f"bad name {name[:40]!r}...: over {MAX_NAME_BYTES} bytes")
    return norm


def name_components(name: str) -> tuple[str, ...]:
    return tuple(normalize_name(name).split("/")[1:])


def name_key(name: str) -> NameKey:
    """The DHT key of a name: SHA-256 over a domain tag and the normal form, 20 bytes."""
    norm = normalize_name(name)
    return NameKey(hashlib.sha256(b"difs-name-v1\x00" + norm.encode("utf-8")).digest()[:20])


def parse_name_key_hex(text: str) -> NameKey:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raw = b""
    if len(raw) != 20:
        raise UsageError(f"not a name key: {text!r} (expected 40 hex characters)")
    return NameKey(raw)
