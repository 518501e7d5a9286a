"""Signed manifests and the lineage rules over them (docs/PROTOCOL.md, "Manifest").

**Manifest** (one per name and version, signed by the publisher, about 700 bytes for any
object size). Canonical JSON (sorted keys, no spaces, UTF-8; records.canonical_json)::

    {"info": {"name", "key", "version", "parent", "root", "size", "segment_size",
              "segment_count", "stripes", "replicas", "integrity", "hash", "deleted",
              "created"},
     "publisher": hex Ed25519 public key, "sig": hex signature, "t": "difs-manifest",
     "v": 1}

The signature covers ``b"difs-manifest-v1\\x00"`` + the canonical JSON of the object
without ``sig``. Optional top-level fields: ``delegation`` (below) and ``meta``, the
object's S3-style metadata (:class:`ObjectMeta`: content type, S3 ETag, ``x-amz-meta-*``
pairs), signed like the rest; a manifest without them is byte for byte what versions
before them made. ``parent`` is the record hash (BLAKE3 of the signed record bytes) of the
previous version, ``root`` that of version 1 (both null in version 1). ``integrity`` is the
BLAKE3 root of the hash list (see segments.py). A tombstone is a manifest with
``deleted: true`` and no content. A writer the owner delegated to adds its certificate
(delegation.py).

**Key**: ``key`` is the name key of ``name`` (names.name_key), or, for a name under a
claimed prefix, its owned key for the manifest's owner (:func:`owned_key`: the publisher,
or the owner that delegated to it). A claim object (``/t.com/@claim``) and a
``/key/<fp>/`` name always take the plain name key; a claim object carries no delegation,
and ``@claim`` anywhere else in a name is refused (names.reserved_problem).

**Lineage**: a name's versions signed by one owner and linked to one version 1 form its
history. :func:`supersedes`, :func:`linked` and :func:`choose_records` are the rules that
holders, the DHT's policy (recordpolicy.py) and readers apply to it. Pure.

Holder entries are in holders.py; how a value is told to be a manifest or a holder entry,
in records.py.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping, Sequence
from types import MappingProxyType
from typing import Any

from difs_p2p.classgen import field, valueclass
from difs_p2p.delegation import Delegation, parse_delegation
from difs_p2p.errors import IntegrityError, UsageError, WireError
from difs_p2p.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    fingerprint,
    verify_signature,
)
from difs_p2p.names import (
    NameKey,
    is_claim,
    key_namespace_owner,
    name_key,
    normalize_name,
    owned_name_key,
    reserved_problem,
)
from difs_p2p.records import canonical_json, is_hex, is_time, is_uint, record_hash
from difs_p2p.segments import IntegrityRoot, SegmentId

MANIFEST_DOMAIN = b"difs-manifest-v1\x00"
MANIFEST_FORMAT = 1
# A manifest must fit one DHT value (8,000 bytes); real ones are about 700 bytes.
MAX_MANIFEST_SIZE = 4096


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# -- object metadata ------------------------------------------------------------------------

# The canonical JSON of a manifest's "meta" object, at most: the longest name (1,024 bytes)
# with a delegation of that very name and every number at its largest makes a manifest of
# 3,182 bytes, and 4,096 - 3,182 - len(',"meta":') leaves 906; rounded down. So any name
# takes any valid metadata, unless JSON escapes it ('"' and '\' cost a byte more each:
# such a name with such a delegation may not fit even without metadata). S3 allows
# 2 KiB of x-amz-meta-*; here, beside a usual content type and ETag, about 800 bytes of
# names and values.
MAX_META_BYTES = 896
# S3 and HTTP: a media type of at most 255 characters.
MAX_CONTENT_TYPE = 255
# S3 ETag text: the MD5 of the body, or for a multipart upload the MD5 of the parts' MD5s
# with "-N", N parts (1 to 10,000, S3's most).
_ETAG = re.compile(r"[0-9a-f]{32}(?:-([1-9][0-9]{0,4}))?")
MAX_PARTS = 10_000
# RFC 9110 token characters (a header field name), lower-case letters only.
_TOKEN = re.compile(r"[0-9a-z!#$%&'*+.^_`|~-]+")


def _printable(text: str) -> bool:
    """Printable ASCII (space to tilde): what an HTTP header value carries unencoded."""
    return all(" " <= ch <= "~" for ch in text)


def meta_problem(content_type: object, etag: object, user: object) -> tuple[str, str] | None:
    """What is wrong with these metadata values, as (field, message); None if they are
    valid. Pure: the one rule :class:`ObjectMeta` and :func:`parse_manifest` apply."""
    if content_type is not None:
        if not isinstance(content_type, str) or not content_type:
            return "meta.content_type", "the content type is not a non-empty string"
        if len(content_type) > MAX_CONTENT_TYPE or not _printable(content_type):
            return (
                "meta.content_type",
                f"the content type must be at most {MAX_CONTENT_TYPE} printable ASCII characters",
            )
    if etag is not None:
        match = _ETAG.fullmatch(etag) if isinstance(etag, str) else None
        if match is None or int(match.group(1) or 1) > MAX_PARTS:
            return "meta.etag", f"bad ETag {etag!r}: 32 lowercase hex, or 32 hex and -N parts"
    if not isinstance(user, Mapping):
        return "meta.user", "the user metadata is not a mapping"
    for key, value in user.items():
        if not isinstance(key, str) or not _TOKEN.fullmatch(key):
            return "meta.user", f"bad metadata name {key!r}: a lower-case HTTP token"
        if not isinstance(value, str) or not _printable(value):
            return "meta.user", f"bad value of metadata {key!r}: printable ASCII text"
    encoded = _meta_json(content_type, etag, user)
    if len(canonical_json(encoded)) > MAX_META_BYTES:
        return "meta", f"the metadata takes more than {MAX_META_BYTES} bytes encoded"
    return None


def _meta_json(content_type: Any, etag: Any, user: Mapping[str, str]) -> dict[str, Any]:
    """The "meta" object: only the fields that are set (``user`` only when not empty)."""
    out: dict[str, Any] = {}
    if content_type is not None:
        out["content_type"] = content_type
    if etag is not None:
        out["etag"] = etag
    if user:
        out["user"] = dict(user)
    return out


@valueclass
class ObjectMeta:
    """An object's metadata, signed into its manifest (the optional ``meta`` field).

    ``content_type``: the media type the gateway and the S3 API serve (else one from the
    name's extension). ``etag``: the S3 ETag text without quotes: the body's MD5 in
    lowercase hex, or ``md5(part MD5s)-N`` for a multipart upload. ``user``: the
    ``x-amz-meta-*`` pairs, names lower-case without the prefix. Validated on
    construction (:func:`meta_problem`): UsageError. Metadata with nothing set is no
    metadata (the manifest then has no ``meta``).
    """

    content_type: str | None = None
    etag: str | None = None
    user: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problem = meta_problem(self.content_type, self.etag, self.user)
        if problem is not None:
            raise UsageError(problem[1])
        # a read-only copy: the signed manifest cannot change under the caller's dict
        object.__setattr__(self, "user", MappingProxyType(dict(sorted(self.user.items()))))

    def __hash__(self) -> int:
        return hash((self.content_type, self.etag, tuple(self.user.items())))

    @property
    def empty(self) -> bool:
        return self.content_type is None and self.etag is None and not self.user

    def as_json(self) -> dict[str, Any]:
        """The manifest's ``meta`` object."""
        return _meta_json(self.content_type, self.etag, self.user)


def parse_meta(obj: object) -> ObjectMeta:
    """Decode a manifest's ``meta`` object (WireError naming the field). One encoding: no
    other keys, no null or empty ``user``, not empty."""
    if not isinstance(obj, dict) or not obj:
        raise WireError("meta is not a non-empty object", field="meta")
    if not set(obj) <= {"content_type", "etag", "user"}:
        raise WireError("unexpected fields in meta", field="meta")
    if any(v is None for v in obj.values()) or obj.get("user", True) == {}:
        raise WireError("meta has a null or empty field (leave it out)", field="meta")
    content_type, etag, user = obj.get("content_type"), obj.get("etag"), obj.get("user", {})
    problem = meta_problem(content_type, etag, user)
    if problem is not None:
        raise WireError(problem[1], field=problem[0])
    return ObjectMeta(content_type, etag, user)


@valueclass
class Manifest:
    """A verified manifest; ``raw`` holds the exact signed bytes."""

    name: str
    key: NameKey
    version: int
    parent: str | None
    root: str | None
    size: int
    segment_size: int
    segment_count: int
    stripes: int
    replicas: int
    integrity: IntegrityRoot  # the hash list's BLAKE3 root (hex in the JSON)
    deleted: bool
    created: float
    publisher: bytes
    raw: bytes
    # The key the name belongs to: the publisher, or the owner that delegated to it.
    owner: bytes = b""
    delegation: Delegation | None = None
    # -- object metadata --
    meta: ObjectMeta | None = None

    @property
    def hash(self) -> str:
        return record_hash(self.raw)

    @property
    def lineage_root(self) -> str:
        """The hash of version 1 of this name's history."""
        return self.root if self.root is not None else self.hash

    @property
    def lineage(self) -> Lineage:
        """Who owns this version, which history it belongs to, and where in it."""
        return Lineage(self.owner, self.lineage_root, self.version, self.hash)

    def info(self) -> dict[str, Any]:
        return json.loads(self.raw)["info"]  # type: ignore[no-any-return]


@valueclass
class Lineage:
    """What a holder remembers of the version it holds: the name's owner key, the hash of
    version 1 (the lineage root), the version and its manifest hash."""

    owner: bytes
    root: str
    version: int
    manifest: str = ""


def supersedes(new: Manifest, held: Lineage) -> bool:
    """Whether ``new`` proves that the held version is superseded (newer or deleted).

    Only a manifest of the same owner (signed by the owner, or by a writer the owner
    delegated to: ``parse_manifest`` checked the certificate), in the same lineage (same
    version-1 hash), with a strictly higher version. A stranger's manifest, one of another
    history of the name, or a replay of an older version never is. Pure; ``new`` is a
    verified manifest.
    """
    return new.owner == held.owner and new.lineage_root == held.root and new.version > held.version


def linked(m: Manifest, to: Manifest) -> bool:
    """Whether ``m`` belongs to the history of ``to``: same owner and lineage, not newer,
    and the very same record when it has the same version."""
    if m.owner != to.owner or m.lineage_root != to.lineage_root or m.version > to.version:
        return False
    return m.version < to.version or m.raw == to.raw


def choose_records(
    found: Sequence[tuple[Manifest, int]], pinned: bytes | None = None
) -> list[Manifest]:
    """A reader's order of the valid records the k closest peers returned, best first.

    ``found`` holds each distinct record with the number of peers that returned it. The
    records are grouped by owner key; the owners are ranked:

    1. the ``pinned`` owner (the reader pinned a key for the name), if it has a record;
    2. then the owner whose records **more peers** returned (a stranger's record planted
       at one peer, or carried by a peer it runs, loses to the owner's record that the
       other k-1 peers hold);
    3. ties (two first publishers racing, each at as many peers): the owner with the
       smaller public key bytes, an arbitrary rule that every reader applies alike.

    Within an owner: the highest version first; equal versions (a fork the owner signed)
    by more peers, then the smaller bytes. The first record is the one to use; the rest
    follow owner by owner. Pure.
    """
    votes: dict[bytes, int] = {}
    by_raw: dict[bytes, Manifest] = {}
    for m, n in found:
        by_raw[m.raw] = m
        votes[m.raw] = votes.get(m.raw, 0) + n
    per_owner: dict[bytes, int] = {}
    for raw, m in by_raw.items():
        per_owner[m.owner] = per_owner.get(m.owner, 0) + votes[raw]

    def owner_rank(owner: bytes) -> tuple[int, int, bytes]:
        return (0 if owner == pinned else 1, -per_owner[owner], owner)

    def record_rank(m: Manifest) -> tuple[tuple[int, int, bytes], int, int, bytes]:
        return (owner_rank(m.owner), -m.version, -votes[m.raw], m.raw)

    return sorted(by_raw.values(), key=record_rank)


def owned_key(name: str, owner: bytes) -> NameKey:
    """The owned key of ``name`` for the owner public key ``owner`` (names.owned_name_key
    over the key's fingerprint)."""
    return owned_name_key(name, bytes.fromhex(fingerprint(owner)))


def build_manifest(
    identity: Identity,
    *,
    name: str,
    version: int,
    parent: str | None,
    root: str | None,
    size: int,
    segment_size: int,
    segment_count: int,
    stripes: int,
    replicas: int,
    integrity: IntegrityRoot,
    deleted: bool = False,
    created: float,
    delegation: Delegation | None = None,
    key: NameKey | None = None,
    meta: ObjectMeta | None = None,
) -> Manifest:
    """Sign a manifest with the publisher's key (a delegate passes its delegation).

    ``key``: the DHT key it is stored under, the name key by default; under a claimed
    prefix the name's :func:`owned_key` (any other key is refused like a parsed one).
    ``meta``: the object's metadata (none on a tombstone: UsageError); empty metadata is
    left out, so the manifest is then exactly what it is without."""
    if meta is not None and not meta.empty and deleted:
        raise UsageError("a tombstone carries no metadata")
    norm = normalize_name(name)
    body = {
        "t": "difs-manifest",
        "v": MANIFEST_FORMAT,
        "info": {
            "name": norm,
            "key": (name_key(norm) if key is None else key).hex(),
            "version": version,
            "parent": parent,
            "root": root,
            "size": size,
            "segment_size": segment_size,
            "segment_count": segment_count,
            "stripes": stripes,
            "replicas": replicas,
            "integrity": integrity.hex(),
            "hash": "blake3",
            "deleted": deleted,
            "created": round(created, 3),
        },
        "publisher": identity.public_key.hex(),
    }
    if delegation is not None:
        body["delegation"] = delegation.as_json()
    if meta is not None and not meta.empty:
        body["meta"] = meta.as_json()
    body["sig"] = identity.sign(MANIFEST_DOMAIN + canonical_json(body)).hex()
    return parse_manifest(canonical_json(body))


def parse_manifest(raw: bytes, key: bytes | None = None) -> Manifest:
    """Decode and verify a signed manifest (shape, limits, signature, name key).

    ``key``, when given, is the DHT key the record was found under (plain ``bytes``, as the
    DHT's keys are). Raises WireError for malformed bytes and IntegrityError for a bad
    signature or a record stored under the wrong key. A pure function of its arguments, so the last
    ``_PARSED_CACHE`` results are remembered (a peer parses the same manifest as a record,
    as a history entry, on every resolve and maintenance round); errors are not.
    """
    return _parse_manifest(bytes(raw), key)


# Manifests remembered by parse_manifest: at most 4 KiB each, about 1 KiB in practice.
_PARSED_CACHE = 2048


@functools.lru_cache(maxsize=_PARSED_CACHE)
def _parse_manifest(raw: bytes, key: bytes | None) -> Manifest:
    if len(raw) > MAX_MANIFEST_SIZE:
        raise WireError(f"manifest of {len(raw)} bytes exceeds {MAX_MANIFEST_SIZE}")
    try:
        obj = json.loads(raw, parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise WireError("manifest is not JSON") from None
    if not isinstance(obj, dict) or obj.get("t") != "difs-manifest":
        raise WireError("not a manifest", field="t")
    if obj.get("v") != MANIFEST_FORMAT:
        raise WireError(f"unsupported manifest format {obj.get('v')!r}", field="v")
    info, pub, sig = obj.get("info"), obj.get("publisher"), obj.get("sig")
    if not isinstance(info, dict):
        raise WireError("info is not an object", field="info")
    if not is_hex(pub, 2 * PUBLIC_KEY_SIZE) or not is_hex(sig, 2 * SIGNATURE_SIZE):
        raise WireError("publisher key or signature malformed", field="publisher")
    expected = {
        "name",
        "key",
        "version",
        "parent",
        "root",
        "size",
        "segment_size",
        "segment_count",
        "stripes",
        "replicas",
        "integrity",
        "hash",
        "deleted",
        "created",
    }
    top = {"t", "v", "info", "publisher", "sig"}
    if set(info) != expected or set(obj) - {"delegation", "meta"} != top:
        raise WireError("unexpected or missing fields", field="info")
    name = info["name"]
    if not isinstance(name, str):
        raise WireError("name is not a string", field="info.name")
    try:
        norm = normalize_name(name)
    except Exception as exc:
        raise WireError(f"bad name: {exc}", field="info.name") from None
    if norm != name:
        raise IntegrityError("manifest name and key do not match")
    reserved = reserved_problem(norm)
    if reserved is not None:
        raise WireError(f"reserved name {norm}: {reserved}", field="info.name")
    for field_name in ("version", "size", "segment_size", "segment_count", "stripes", "replicas"):
        if not is_uint(info[field_name]):
            raise WireError("not a non-negative integer", field=f"info.{field_name}")
    if info["version"] < 1 or info["hash"] != "blake3" or not isinstance(info["deleted"], bool):
        raise WireError("bad version, hash or deleted flag", field="info")
    for link in ("parent", "root"):
        if info[link] is not None and not is_hex(info[link], 64):
            raise WireError("bad link", field=f"info.{link}")
    if (info["version"] == 1) != (info["parent"] is None) or (info["version"] == 1) != (
        info["root"] is None
    ):
        raise WireError("version 1 has no parent/root, later versions have both", field="info")
    if not is_hex(info["integrity"], 64):
        raise WireError("bad integrity root", field="info.integrity")
    created = info["created"]
    if not is_time(created):
        raise WireError("bad created time", field="info.created")
    size, seg, count = info["size"], info["segment_size"], info["segment_count"]
    stripes_ok = (1 if count else 0) <= info["stripes"] <= max(count, 1)
    if seg <= 0 or count != -(-size // seg) or not stripes_ok:
        raise WireError("size, segment size and segment count disagree", field="info")
    if info["deleted"] and size != 0:
        raise WireError("a tombstone has no content", field="info.deleted")
    publisher = bytes.fromhex(str(pub))
    delegation = None
    owner = publisher
    if "delegation" in obj:
        if is_claim(name):
            raise IntegrityError(f"the claim {name} must be signed by its owner's own key")
        delegation = parse_delegation(obj["delegation"])
        if delegation.writer != publisher:
            raise IntegrityError("the delegation is for another writer key")
        if not delegation.covers(name):
            raise IntegrityError(f"the delegation for {delegation.prefix} does not cover {name}")
        if created > delegation.expires:
            raise IntegrityError("the delegation had expired when this version was made")
        owner = delegation.owner
    meta = parse_meta(obj["meta"]) if "meta" in obj else None
    if meta is not None and info["deleted"]:
        raise WireError("a tombstone carries no metadata", field="meta")
    namespace = key_namespace_owner(name)
    if namespace is not None and namespace != fingerprint(owner):
        raise IntegrityError(f"{name} belongs to key {namespace}, not to the signer")
    if info["key"] != name_key(norm).hex() and (
        namespace is not None or is_claim(name) or info["key"] != owned_key(norm, owner).hex()
    ):
        raise IntegrityError("manifest name and key do not match")
    if key is not None and bytes.fromhex(info["key"]) != key:
        raise IntegrityError("manifest stored under the wrong key")
    if canonical_json(obj) != raw:
        # One manifest, one encoding: its record hash (parent/root links) is then unique.
        raise WireError("manifest is not in canonical JSON form")
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    verify_signature(
        bytes.fromhex(str(pub)), bytes.fromhex(str(sig)), MANIFEST_DOMAIN + canonical_json(unsigned)
    )
    return Manifest(
        name=name,
        key=NameKey(bytes.fromhex(info["key"])),
        version=info["version"],
        parent=info["parent"],
        root=info["root"],
        size=size,
        segment_size=seg,
        segment_count=count,
        stripes=info["stripes"],
        replicas=info["replicas"],
        integrity=IntegrityRoot(SegmentId(bytes.fromhex(info["integrity"]))),
        deleted=info["deleted"],
        created=float(created),
        publisher=publisher,
        raw=raw,
        owner=owner,
        delegation=delegation,
        meta=meta,
    )


__all__ = [
    "MANIFEST_DOMAIN",
    "MANIFEST_FORMAT",
    "MAX_CONTENT_TYPE",
    "MAX_MANIFEST_SIZE",
    "MAX_META_BYTES",
    "Lineage",
    "Manifest",
    "ObjectMeta",
    "build_manifest",
    "choose_records",
    "linked",
    "meta_problem",
    "owned_key",
    "parse_manifest",
    "parse_meta",
    "supersedes",
]
