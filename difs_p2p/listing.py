"""Child entries: the owner-signed records that make a folder listable, their shard keys,
and the pure rules of writing and reading a listing (docs/PROTOCOL.md, "Child entry" and
"Listing a folder").

The DHT maps a whole name to its record; nothing in it lists the names under ``/a.com/``.
So each name also gets, for every folder on its path below the owned root, a **child
entry**: "``c`` is an object (or a folder) in ``/t.com/a/b``", signed by the prefix's
owner (or a delegate of it). Binary, record kind 2 (records.CHILD_KIND)::

    0   u8   kind = 2
    1   u8   flags: 1 object, 2 folder, 4 removed (objects only), 8 split marker
    2   16B  owner fingerprint (identity.fingerprint of the owner's key)
    18  u8   level of the shard it is stored in (0..MAX_DEPTH)
    19  u32  path bits: the shard's first ``level`` bits (the child's own, but a marker's)
    23  u64  issued (unix seconds)
    31  u64  version (0 for a folder or a marker)
    39  u64  size in bytes (0 for a folder or a marker)
    47  f64  created (unix seconds; the manifest's for an object)
    55  u16  parent length, then the parent folder's normal form (``/t.com/videos``)
    ..  u8   child length, then the child component (empty for a marker)
    ..  u8   ETag length, then the object's ETag, ASCII (empty for a folder, a marker or
             a removal): its S3 ETag (32 hex, or 32 hex "-" parts) when its manifest's
             metadata has one, else its manifest record hash (64 hex)
    ..  32B  writer's Ed25519 public key
    ..  u16  delegation length, then its canonical JSON (0: the writer is the owner)
    ..  64B  signature over b"difs-child-v1\\x00" + every byte before it

The children of one folder are kept in a tree of **shards**, each at its own DHT key
(:func:`shard_key`); a shard holds at most :data:`SHARD_ENTRIES` entries, then a split
marker sends writers one level deeper along the child's path bits (:func:`path_bits`).
Pure.

This module is longer than most (about 680 lines): the entry's codec and the rules that
write and read it (placement in shards, what a reader checks, order and pages) change
together, with the record format in docs/PROTOCOL.md, so they stay side by side.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import math
import re
import struct
from collections.abc import Iterable, Sequence

from difs_p2p.classgen import valueclass
from difs_p2p.delegation import Delegation, parse_delegation
from difs_p2p.errors import BadNameError, IntegrityError, UsageError, WireError
from difs_p2p.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    fingerprint,
    verify_signature,
)
from difs_p2p.names import (
    KEY_NAMESPACE,
    MAX_COMPONENT_BYTES,
    MAX_COMPONENTS,
    MAX_NAME_BYTES,
    normalize_name,
)
from difs_p2p.records import CHILD_KIND, MAX_CREATED, canonical_json

CHILD_DOMAIN = b"difs-child-v1\x00"
SHARD_DOMAIN = b"difs-children-v1\x00"
# Entries a writer puts in one shard before it splits it: 128 entries of about 300 bytes
# are one or two find_entries pages, and 100,000 children need about 1,000 shards.
SHARD_ENTRIES = 128
# What a storing peer keeps per shard key: twice the split point, room for writers that
# raced past it (each saw fewer than SHARD_ENTRIES), never an unbounded set.
MAX_SHARD_ENTRIES = 2 * SHARD_ENTRIES
# Levels of splitting: 2**16 leaves of 128 entries, 8 million children per folder.
MAX_DEPTH = 16
# Clocks of honest writers may differ this much (as for holder entries).
CLOCK_SKEW = 600.0

OBJECT, FOLDER, REMOVED, SPLIT = 1, 2, 4, 8
_HEAD = struct.Struct("!BB16sBIQQQd")
FINGERPRINT_SIZE = 16
_U16 = struct.Struct("!H")
_MAX_DELEGATION = 4096
# What an object's entry may carry as its ETag: an S3 ETag (manifest.ObjectMeta.etag) or a
# manifest record hash (BLAKE3, 64 hex).
_ETAG = re.compile(r"[0-9a-f]{32}(?:-[1-9][0-9]{0,4})?|[0-9a-f]{64}")


@valueclass
class ChildEntry:
    """One decoded child entry (or split marker); see the module docstring."""

    flags: int
    owner: bytes  # fingerprint, 16 bytes
    level: int
    bits: int
    issued: int
    version: int
    size: int
    created: float
    parent: str
    child: str
    writer: bytes
    delegation: Delegation | None
    raw: bytes
    # ETag in listings
    etag: str = ""

    @property
    def marker(self) -> bool:
        return bool(self.flags & SPLIT)

    @property
    def folder(self) -> bool:
        return bool(self.flags & FOLDER)

    @property
    def removed(self) -> bool:
        return bool(self.flags & REMOVED)

    @property
    def full_name(self) -> str:
        """The child's name, a folder's with a trailing '/'; a marker's is its parent's."""
        if self.marker:
            return self.parent
        return f"{self.parent}/{self.child}" + ("/" if self.folder else "")

    @property
    def identity(self) -> tuple[bytes, str, str, bool]:
        """Entries with one identity replace each other (the fresher wins): (owner,
        parent, child, folder or not); every marker of a shard is one."""
        return (self.owner, self.parent, self.child, self.folder)

    @property
    def freshness(self) -> tuple[int, int, bool]:
        """What decides between entries of one identity: issued, then version, then a
        removal over a live entry."""
        return (self.issued, self.version, self.removed)

    @property
    def store_identity(self) -> bytes:
        """The identity under which a storing peer keeps it (level and bits included, as
        the name's own entry set holds entries of several shards)."""
        h = hashlib.sha256(CHILD_DOMAIN)
        for part in (self.owner, self.parent.encode(), self.child.encode()):
            h.update(_U16.pack(len(part)) + part)
        h.update(struct.pack("!BBI", self.flags & (FOLDER | SPLIT), self.level, self.bits))
        return b"c" + h.digest()[:24]

    @property
    def shard(self) -> bytes:
        return shard_key(self.owner, self.parent, self.level, self.bits)


def object_etag(meta_etag: str | None, manifest_hash: str) -> str:
    """An object's ETag, unquoted, as its child entry carries it and the S3 API shows it:
    the S3 ETag of its manifest's metadata when it has one, else its manifest record hash
    (what the gateway calls its ETag)."""
    return meta_etag or manifest_hash


def owner_fingerprint(public_key: bytes) -> bytes:
    """The 16-byte owner field for an owner's public key."""
    return bytes.fromhex(fingerprint(public_key))


def shard_key(owner: bytes, parent: str, level: int, bits: int) -> bytes:
    """The DHT key of one shard of ``parent``'s children under ``owner`` (fingerprint):
    SHA-256(b"difs-children-v1\\x00" + owner + UTF-8(parent) + b"\\x00" + level (u8) +
    bits (u32))[:20]."""
    h = hashlib.sha256(SHARD_DOMAIN + owner + parent.encode() + b"\x00")
    h.update(struct.pack("!BI", level, bits))
    return h.digest()[:20]


def path_bits(child: str, level: int) -> int:
    """The first ``level`` bits of SHA-256(b"difs-child-v1\\x00" + UTF-8(child))."""
    if level == 0:
        return 0
    top = int.from_bytes(hashlib.sha256(CHILD_DOMAIN + child.encode()).digest()[:4], "big")
    return top >> (32 - level)


def sub_shards(level: int, bits: int) -> list[tuple[int, int]]:
    """The two shards below (level, bits), or none at MAX_DEPTH."""
    if level >= MAX_DEPTH:
        return []
    return [(level + 1, bits << 1), (level + 1, (bits << 1) | 1)]


def listing_root(name: str) -> tuple[str, bytes] | None:
    """(the owned root folder, its owner's fingerprint) of a /key/<fp>/ name, else None."""
    parts = name.split("/")
    if len(parts) >= 3 and parts[1] == KEY_NAMESPACE:
        try:
            fp = bytes.fromhex(parts[2])
        except ValueError:
            return None
        if len(fp) == FINGERPRINT_SIZE and parts[2] == fp.hex():
            return f"/{KEY_NAMESPACE}/{parts[2]}", fp
    return None


def normalize_folder(prefix: str) -> str:
    """The normal form of a folder to list: ``/key/<fp>/videos/`` -> ``/key/<fp>/videos``
    (a root such as ``/key/<fp>`` is a folder, though not a name). UsageError if not."""
    if not isinstance(prefix, str) or not prefix.startswith("/"):
        raise UsageError(f"bad prefix {prefix!r}: must start with '/'")
    try:
        full = normalize_name(prefix.rstrip("/") + "/x")
    except BadNameError as exc:
        raise UsageError(f"bad prefix {prefix!r}: {exc}") from None
    folder = full[: -len("/x")]
    if not folder:
        raise UsageError("/ has no listing: list a prefix such as /key/<fingerprint>/")
    return folder


def check_parent(parent: str) -> None:
    """WireError unless ``parent`` is a folder in normal form (at most 2 below the limit of
    a name, so a child fits)."""
    if not _parent_ok(parent):
        raise WireError(f"bad parent folder {parent[:64]!r}", field="parent")


@functools.lru_cache(maxsize=1024)
def _parent_ok(parent: str) -> bool:
    """Whether ``parent`` is a folder in normal form (remembered: a listing's entries share
    a few parents)."""
    try:
        ok = normalize_folder(parent) == parent
    except UsageError:
        ok = False
    return ok and len(parent.encode()) <= MAX_NAME_BYTES - 2


def folder_ancestors(name: str, root: str) -> list[tuple[str, str, bool]]:
    """(parent, child, is folder) for each level of ``name`` below ``root``, deepest
    first: ``/r/a/b/c`` under ``/r`` -> (``/r/a/b``, c, object), (``/r/a``, b, folder),
    (``/r``, a, folder)."""
    norm = normalize_name(name)
    if not norm.startswith(root + "/"):
        raise UsageError(f"{norm} is not under {root}/")
    parts = norm[len(root) + 1 :].split("/")
    out = []
    for i in range(len(parts), 0, -1):
        parent = "/".join([root, *parts[: i - 1]])
        out.append((parent, parts[i - 1], i != len(parts)))
    return out


# -- encoding and checking ------------------------------------------------------------------


def _body(
    flags: int,
    owner: bytes,
    level: int,
    bits: int,
    issued: int,
    version: int,
    size: int,
    created: float,
    parent: str,
    child: str,
    writer: bytes,
    delegation: Delegation | None,
    etag: str = "",
) -> bytes:
    p, c, t = parent.encode(), child.encode(), etag.encode()
    d = canonical_json(delegation.as_json()) if delegation is not None else b""
    return b"".join(
        (
            _HEAD.pack(
                CHILD_KIND, flags, owner, level, bits, issued, version, size, float(created)
            ),
            _U16.pack(len(p)),
            p,
            bytes([len(c)]),
            c,
            bytes([len(t)]),
            t,
            writer,
            _U16.pack(len(d)),
            d,
        )
    )


def build_child(
    writer: Identity,
    *,
    owner: bytes,
    parent: str,
    child: str,
    flags: int,
    level: int,
    issued: int,
    version: int = 0,
    size: int = 0,
    created: float = 0.0,
    bits: int | None = None,
    delegation: Delegation | None = None,
    etag: str = "",
) -> ChildEntry:
    """Sign a child entry (``child`` empty and ``bits`` given for a split marker;
    ``etag`` for a live object only)."""
    if bits is None:
        bits = path_bits(child, level)
    body = _body(
        flags,
        owner,
        level,
        bits,
        issued,
        version,
        size,
        created,
        parent,
        child,
        writer.public_key,
        delegation,
        etag,
    )
    return decode_child(body + writer.sign(CHILD_DOMAIN + body))


def decode_child(raw: bytes) -> ChildEntry:
    """Decode a child entry and check its shape, **not** its signature (WireError)."""
    raw = bytes(raw)
    if len(raw) < _HEAD.size + 2:
        raise WireError("child entry too short", field="child", offset=len(raw))
    kind, flags, owner, level, bits, issued, version, size, created = _HEAD.unpack_from(raw)
    if kind != CHILD_KIND:
        raise WireError("not a child entry", field="kind", offset=0)
    kinds = flags & (OBJECT | FOLDER | SPLIT)
    if flags & ~(OBJECT | FOLDER | SPLIT | REMOVED) or kinds not in (OBJECT, FOLDER, SPLIT):
        raise WireError(f"bad child flags 0x{flags:02x}", field="flags", offset=1)
    if flags & REMOVED and kinds != OBJECT:
        raise WireError("only an object is removed", field="flags", offset=1)
    if level > MAX_DEPTH or bits >> level:
        raise WireError("bad shard level or bits", field="level", offset=18)
    if issued >= 1 << 62 or version >= 1 << 62 or size >= 1 << 62:
        raise WireError("issued, version or size out of range", field="issued", offset=23)
    if not (math.isfinite(created) and 0 <= created < MAX_CREATED):
        raise WireError("bad created time", field="created", offset=47)
    at = _HEAD.size
    parent_bytes, at = _take(raw, at, _U16.unpack_from(raw, at)[0], 2, "parent")
    if at >= len(raw):
        raise WireError("child entry truncated", field="child", offset=at)
    child_bytes, at = _take(raw, at, raw[at], 1, "child")
    if at >= len(raw):
        raise WireError("child entry truncated", field="etag", offset=at)
    etag_bytes, at = _take(raw, at, raw[at], 1, "etag")
    if len(raw) < at + PUBLIC_KEY_SIZE + 2:
        raise WireError("child entry truncated", field="writer", offset=at)
    writer = raw[at : at + PUBLIC_KEY_SIZE]
    at += PUBLIC_KEY_SIZE
    dlen = _U16.unpack_from(raw, at)[0]
    if dlen > _MAX_DELEGATION:
        raise WireError("delegation too long", field="delegation", offset=at)
    deleg_bytes, at = _take(raw, at, dlen, 2, "delegation")
    if len(raw) != at + SIGNATURE_SIZE:
        raise WireError("child entry length does not match", field="signature", offset=at)
    try:
        parent, child = parent_bytes.decode(), child_bytes.decode()
    except UnicodeDecodeError:
        raise WireError("parent or child is not UTF-8", field="parent", offset=55) from None
    etag = etag_bytes.decode("latin-1")
    if etag_bytes and (flags != OBJECT or not _ETAG.fullmatch(etag)):
        raise WireError("only a live object has an ETag, 32 or 64 hex", field="etag")
    check_parent(parent)
    root = listing_root(parent + "/x")
    if root is not None and root[1] != owner:
        raise WireError("a /key/ folder's owner is its key", field="owner", offset=2)
    if parent == f"/{KEY_NAMESPACE}":
        raise WireError("/key itself has no owner", field="parent", offset=55)
    if kinds == SPLIT:
        if child or version or size:
            raise WireError("a split marker names no child", field="child", offset=55)
    else:
        _check_child(parent, child, level, bits)
        if kinds == FOLDER and (version or size):
            raise WireError("a folder has no version or size", field="version", offset=31)
    delegation = None
    if deleg_bytes:
        try:
            obj = json.loads(deleg_bytes)
        except (ValueError, RecursionError):
            raise WireError("delegation is not JSON", field="delegation") from None
        try:
            delegation = parse_delegation(obj)
        except IntegrityError:
            raise WireError("delegation signature is bad", field="delegation") from None
        if canonical_json(delegation.as_json()) != deleg_bytes:
            raise WireError("delegation is not canonical JSON", field="delegation")
    return ChildEntry(
        flags,
        owner,
        level,
        bits,
        issued,
        version,
        size,
        created,
        parent,
        child,
        writer,
        delegation,
        raw,
        etag,
    )


def _take(raw: bytes, at: int, length: int, head: int, field: str) -> tuple[bytes, int]:
    start = at + head
    if len(raw) < start + length:
        raise WireError(f"child entry truncated in {field}", field=field, offset=at)
    return raw[start : start + length], start + length


def _check_child(parent: str, child: str, level: int, bits: int) -> None:
    size = len(child.encode())
    if not child or "/" in child or size > MAX_COMPONENT_BYTES:
        raise WireError(f"bad child component {child[:64]!r}", field="child")
    # the parent is a valid folder (check_parent): the child must be a valid component in
    # normal form, and the name they make within the limits of a name
    try:
        ok = normalize_name(f"/_/{child}") == f"/_/{child}"
    except BadNameError:
        ok = False
    fits = (
        len(parent.encode()) + 1 + size <= MAX_NAME_BYTES
        and parent.count("/") + 1 <= MAX_COMPONENTS
    )
    if not ok or not fits:
        raise WireError(f"bad child name {parent[:48]!r}/{child[:48]!r}", field="child")
    if bits != path_bits(child, level):
        raise WireError("path bits are not the child's", field="bits", offset=19)


def verify_child(entry: ChildEntry, now: float) -> None:
    """IntegrityError unless the entry is signed by its owner, or by a writer the owner
    delegated a prefix covering it to (not expired when it was issued), and was not issued
    more than CLOCK_SKEW in the future."""
    if entry.issued > now + CLOCK_SKEW:
        raise IntegrityError("child entry issued in the future")
    d = entry.delegation
    if d is None:
        if owner_fingerprint(entry.writer) != entry.owner:
            raise IntegrityError("child entry not signed by the folder's owner")
    else:
        covered = entry.parent if entry.marker else entry.full_name.rstrip("/")
        if (
            owner_fingerprint(d.owner) != entry.owner
            or d.writer != entry.writer
            or not d.covers(covered)
            or d.expires < entry.issued
        ):
            raise IntegrityError("the writer's delegation does not cover this child entry")
    size = len(entry.raw) - SIGNATURE_SIZE
    verify_signature(entry.writer, entry.raw[size:], CHILD_DOMAIN + entry.raw[:size])


def parse_child(raw: bytes, now: float) -> ChildEntry:
    """Decode and verify a child entry (WireError / IntegrityError)."""
    entry = decode_child(raw)
    verify_child(entry, now)
    return entry


def checked(entry: ChildEntry, now: float) -> bool:
    """Whether a decoded entry verifies (:func:`verify_child`)."""
    try:
        verify_child(entry, now)
    except IntegrityError:
        return False
    return True


def decoded_children(raws: Iterable[bytes], key: bytes) -> list[ChildEntry]:
    """The entries among ``raws`` that decode and belong at shard ``key``, signatures
    **not** checked: a reader checks those it uses (:class:`Listed`, :func:`split_below`)."""
    out = []
    for raw in raws:
        try:
            entry = decode_child(raw)
        except WireError:
            continue
        if entry.shard == key:
            out.append(entry)
    return out


def valid_children(raws: Iterable[bytes], key: bytes, now: float) -> list[ChildEntry]:
    """The entries among ``raws`` that verify and belong at shard ``key``."""
    out = []
    for raw in raws:
        try:
            entry = parse_child(raw, now)
        except (WireError, IntegrityError):
            continue
        if entry.shard == key:
            out.append(entry)
    return out


def entries_by_shard(raws: Iterable[bytes]) -> dict[bytes, list[bytes]]:
    """Child entries grouped by their shard key (decoded, not verified: for re-storing,
    where the storing peers verify); what does not decode is dropped."""
    out: dict[bytes, list[bytes]] = {}
    for raw in raws:
        try:
            entry = decode_child(raw)
        except WireError:
            continue
        out.setdefault(entry.shard, []).append(entry.raw)
    return out


# -- writing: where an entry goes ---------------------------------------------------------


def place_here(shard: Sequence[ChildEntry], entry: ChildEntry) -> bool:
    """Whether a writer stores ``entry`` in the shard whose valid entries are ``shard``:
    it holds the child already, or fewer than SHARD_ENTRIES children; or it is as deep
    as shards go. Else the writer marks the shard split and goes one level deeper."""
    if entry.level >= MAX_DEPTH:
        return True
    children = [e for e in shard if not e.marker]
    return any(e.identity == entry.identity for e in children) or len(children) < SHARD_ENTRIES


def is_split(shard: Sequence[ChildEntry]) -> bool:
    """Whether a reader descends below a shard of valid entries: it holds a split marker
    or is full."""
    return any(e.marker for e in shard) or sum(not e.marker for e in shard) >= SHARD_ENTRIES


def split_below(shard: Sequence[ChildEntry], now: float) -> bool:
    """:func:`is_split` over decoded entries, checking only what decides it: a marker
    that verifies, or SHARD_ENTRIES children that verify (checked only when there are
    that many), so forgeries served by a peer buy a reader no extra reads."""
    if any(e.marker and checked(e, now) for e in shard):
        return True
    children = [e for e in shard if not e.marker]
    return len(children) >= SHARD_ENTRIES and is_split([e for e in children if checked(e, now)])


def next_issued(shard: Sequence[ChildEntry], entry_identity: object, now: float) -> int:
    """The issued time for a new entry: now, or one past what the shard holds for that
    child, so a quick rm after a publish still replaces it."""
    issued = int(now)
    for e in shard:
        if e.identity == entry_identity:
            issued = max(issued, e.issued + 1)
    return issued


Layout = list[tuple[int, int, list[str], bool]]


def bulk_layout(children: Sequence[str], level: int = 0, bits: int = 0) -> Layout:
    """How a writer that knows every child of an empty folder lays it out at once:
    (level, bits, children stored there, split) per shard, as the one-by-one walk would
    leave them once it settled (each full shard split, none over SHARD_ENTRIES)."""
    if len(children) <= SHARD_ENTRIES or level >= MAX_DEPTH:
        return [(level, bits, list(children), False)]
    out: Layout = [(level, bits, [], True)]
    for sub_level, sub_bits in sub_shards(level, bits):
        mine = [c for c in children if path_bits(c, sub_level) == sub_bits]
        out.extend(bulk_layout(mine, sub_level, sub_bits))
    return out


# -- reading: merge, order, pages -------------------------------------------------------


@valueclass
class ListEntry:
    """One name in a listing: its full name (a folder's ends with '/'), whether it is a
    folder, the size, version and creation time of an object, who signed its entry, and
    the object's ETag."""

    name: str
    folder: bool
    size: int
    version: int
    created: float
    publisher: bytes
    # ETag in listings: the object's, unquoted, as its entry carries it (None: a folder,
    # or an entry written without one)
    etag: str | None = None


@valueclass
class ListPage:
    """One page of a listing, in UTF-8 byte order of the names; ``next`` continues it
    (None: this was the last page)."""

    entries: list[ListEntry]
    next: str | None


@valueclass(frozen=False)
class Listed:
    """One name of a folder as read: its entries (one identity), newest first, their
    signatures checked only when the name is used (:meth:`entry`)."""

    name: str
    candidates: list[ChildEntry]
    _picked: ListEntry | None = None
    _done: bool = False

    def entry(self, now: float | None) -> ListEntry | None:
        """The newest entry that verifies (``now`` None: all are verified already), or
        None if none does or that one is a removal. Checked once."""
        if not self._done:
            self._done = True
            for e in self.candidates:
                if now is None or checked(e, now):
                    if not e.removed:
                        self._picked = ListEntry(
                            e.full_name,
                            e.folder,
                            e.size,
                            e.version,
                            e.created,
                            e.writer,
                            e.etag or None,
                        )
                    break
        return self._picked


def group_children(entries: Iterable[ChildEntry]) -> list[Listed]:
    """The entries per identity, newest first (issued, version, removal), markers dropped,
    in byte order of the full names (Python orders str by code point, which is UTF-8
    byte order)."""
    groups: dict[tuple[bytes, str, str, bool], list[ChildEntry]] = {}
    for e in entries:
        if not e.marker:
            groups.setdefault(e.identity, []).append(e)
    out = [
        Listed(found[0].full_name, sorted(found, key=lambda e: e.freshness, reverse=True))
        for found in groups.values()
    ]
    out.sort(key=lambda listed: listed.name)
    return out


def merge_children(entries: Iterable[ChildEntry]) -> list[ListEntry]:
    """The newest of verified entries per identity, removed ones and markers dropped, in
    byte order of the full names."""
    picked = (listed.entry(None) for listed in group_children(entries))
    return [e for e in picked if e is not None]


def encode_token(name: str) -> str:
    """The continuation token after ``name``: urlsafe base64 of its UTF-8."""
    return base64.urlsafe_b64encode(name.encode()).decode()


def decode_token(token: str) -> str:
    """The name a continuation token continues after (UsageError if it is not one)."""
    try:
        name = base64.urlsafe_b64decode(token.encode("ascii")).decode()
    except (ValueError, binascii.Error, UnicodeError):
        raise UsageError(f"bad continuation token {token[:64]!r}") from None
    if not name.startswith("/") or len(name.encode()) > MAX_NAME_BYTES + 1:
        raise UsageError(f"bad continuation token {token[:64]!r}")
    return name


def paginate(entries: Sequence[ListEntry], after: str | None, limit: int) -> ListPage:
    """The first ``limit`` of the sorted ``entries`` after the name ``after``."""
    rest = [e for e in entries if after is None or e.name > after]
    page = rest[:limit]
    more = len(rest) > limit
    return ListPage(page, encode_token(page[-1].name) if more and page else None)


def descend(folder_name: str, after: str | None) -> bool:
    """Whether a recursive listing after ``after`` reads inside folder ``folder_name``
    (ending with '/'): it holds names past ``after``."""
    return after is None or folder_name > after or after.startswith(folder_name)
