"""Signed records: the publisher's manifest and the holders' entries (docs/PROTOCOL.md).

**Manifest** (one per name and version, signed by the publisher, about 700 bytes for any
object size). Canonical JSON (sorted keys, no spaces, UTF-8)::

    {"info": {"name", "key", "version", "parent", "root", "size", "segment_size",
              "segment_count", "stripes", "replicas", "integrity", "hash", "deleted",
              "created"},
     "publisher": hex Ed25519 public key, "sig": hex signature, "t": "difs-manifest",
     "v": 1}

The signature covers ``b"difs-manifest-v1\\x00"`` + the canonical JSON of the object
without ``sig``. ``parent`` is the record hash (BLAKE3 of the signed record bytes) of the
previous version, ``root`` that of version 1 (both null in version 1). ``integrity`` is the
BLAKE3 root of the hash list (see segments.py). A tombstone is a manifest with
``deleted: true`` and no content.

**Holder entry** (signed by the peer that holds a segment range; 179 bytes, binary)::

    0   u8   kind = 1
    1   20B  name key
    21  u64  manifest version
    29  32B  integrity root of that version
    61  u32  first segment (inclusive)
    65  u32  last segment (inclusive)
    69  4B   IPv4 address
    73  u16  TCP port
    75  u64  issued at (unix seconds)
    83  32B  holder's Ed25519 public key (its node ID derives from it)
    115 64B  signature over b"difs-holder-v1\\x00" + bytes 0..114

Entries live in the DHT's entry set under the name key, beside the manifest; so do earlier
manifests (the version history). Holders renew entries; whoever holds a range may announce
it, without the publisher.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import blake3

from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.identity import (
    PUBLIC_KEY_SIZE,
    SIGNATURE_SIZE,
    Identity,
    fingerprint,
    node_id_for,
    verify_signature,
)
from difs_p2p.names import key_namespace_owner, name_key, normalize_name
from difs_p2p.recordstore import EntryFacts

MANIFEST_DOMAIN = b"difs-manifest-v1\x00"
HOLDER_DOMAIN = b"difs-holder-v1\x00"
MANIFEST_FORMAT = 1
# A manifest must fit one DHT value (8,000 bytes); real ones are about 700 bytes.
MAX_MANIFEST_SIZE = 4096
HOLDER_KIND = 1
_HOLDER = struct.Struct("!B20sQ32sII4sHQ32s")
HOLDER_SIZE = _HOLDER.size + SIGNATURE_SIZE
# Clocks of honest peers may differ this much; entries issued further ahead are refused.
CLOCK_SKEW = 600.0
_HEX64 = frozenset("0123456789abcdef")


# Creation times are unix seconds; anything beyond the year 33658 is malformed.
MAX_CREATED = 1e12


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def record_hash(record: bytes) -> str:
    """The hash that names a signed record (parent/root links): BLAKE3, hex."""
    return blake3.blake3(record).hexdigest()


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode()


def _is_hex(value: object, length: int) -> bool:
    return isinstance(value, str) and len(value) == length and set(value) <= _HEX64


def _is_uint(value: object, limit: int = 1 << 63) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < limit


@dataclass(frozen=True, slots=True)
class Manifest:
    """A verified manifest; ``raw`` holds the exact signed bytes."""

    name: str
    key: bytes
    version: int
    parent: str | None
    root: str | None
    size: int
    segment_size: int
    segment_count: int
    stripes: int
    replicas: int
    integrity: str
    deleted: bool
    created: float
    publisher: bytes
    raw: bytes
    # The key the name belongs to: the publisher, or the owner that delegated to it.
    owner: bytes = b""
    delegation: Delegation | None = None

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


@dataclass(frozen=True, slots=True)
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
    integrity: str,
    deleted: bool = False,
    created: float,
    delegation: Delegation | None = None,
) -> Manifest:
    """Sign a manifest with the publisher's key (a delegate passes its delegation)."""
    norm = normalize_name(name)
    body = {
        "t": "difs-manifest",
        "v": MANIFEST_FORMAT,
        "info": {
            "name": norm,
            "key": name_key(norm).hex(),
            "version": version,
            "parent": parent,
            "root": root,
            "size": size,
            "segment_size": segment_size,
            "segment_count": segment_count,
            "stripes": stripes,
            "replicas": replicas,
            "integrity": integrity,
            "hash": "blake3",
            "deleted": deleted,
            "created": round(created, 3),
        },
        "publisher": identity.public_key.hex(),
    }
    if delegation is not None:
        body["delegation"] = delegation.as_json()
    body["sig"] = identity.sign(MANIFEST_DOMAIN + canonical_json(body)).hex()
    return parse_manifest(canonical_json(body))


def parse_manifest(raw: bytes, key: bytes | None = None) -> Manifest:
    """Decode and verify a signed manifest (shape, limits, signature, name key).

    Raises WireError for malformed bytes and IntegrityError for a bad signature or a
    record stored under the wrong key. A pure function of its arguments, so the last
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
    if not _is_hex(pub, 2 * PUBLIC_KEY_SIZE) or not _is_hex(sig, 2 * SIGNATURE_SIZE):
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
    if set(info) != expected or set(obj) - {"delegation"} != top:
        raise WireError("unexpected or missing fields", field="info")
    name = info["name"]
    if not isinstance(name, str):
        raise WireError("name is not a string", field="info.name")
    try:
        norm = normalize_name(name)
    except Exception as exc:
        raise WireError(f"bad name: {exc}", field="info.name") from None
    if norm != name or info["key"] != name_key(norm).hex():
        raise IntegrityError("manifest name and key do not match")
    for field_name in ("version", "size", "segment_size", "segment_count", "stripes", "replicas"):
        if not _is_uint(info[field_name]):
            raise WireError("not a non-negative integer", field=f"info.{field_name}")
    if info["version"] < 1 or info["hash"] != "blake3" or not isinstance(info["deleted"], bool):
        raise WireError("bad version, hash or deleted flag", field="info")
    for link in ("parent", "root"):
        if info[link] is not None and not _is_hex(info[link], 64):
            raise WireError("bad link", field=f"info.{link}")
    if (info["version"] == 1) != (info["parent"] is None) or (info["version"] == 1) != (
        info["root"] is None
    ):
        raise WireError("version 1 has no parent/root, later versions have both", field="info")
    if not _is_hex(info["integrity"], 64):
        raise WireError("bad integrity root", field="info.integrity")
    created = info["created"]
    if (
        not isinstance(created, int | float)
        or isinstance(created, bool)
        or not 0 <= created < MAX_CREATED
    ):
        raise WireError("bad created time", field="info.created")
    size, seg, count = info["size"], info["segment_size"], info["segment_count"]
    stripes_ok = (1 if count else 0) <= info["stripes"] <= max(count, 1)
    if seg <= 0 or count != -(-size // seg) or not stripes_ok:
        raise WireError("size, segment size and segment count disagree", field="info")
    if info["deleted"] and size != 0:
        raise WireError("a tombstone has no content", field="info.deleted")
    if key is not None and bytes.fromhex(info["key"]) != key:
        raise IntegrityError("manifest stored under the wrong key")
    publisher = bytes.fromhex(str(pub))
    delegation = None
    owner = publisher
    if "delegation" in obj:
        delegation = parse_delegation(obj["delegation"])
        if delegation.writer != publisher:
            raise IntegrityError("the delegation is for another writer key")
        if not delegation.covers(name):
            raise IntegrityError(f"the delegation for {delegation.prefix} does not cover {name}")
        if created > delegation.expires:
            raise IntegrityError("the delegation had expired when this version was made")
        owner = delegation.owner
    namespace = key_namespace_owner(name)
    if namespace is not None and namespace != fingerprint(owner):
        raise IntegrityError(f"{name} belongs to key {namespace}, not to the signer")
    if canonical_json(obj) != raw:
        # One manifest, one encoding: its record hash (parent/root links) is then unique.
        raise WireError("manifest is not in canonical JSON form")
    unsigned = {k: v for k, v in obj.items() if k != "sig"}
    verify_signature(
        bytes.fromhex(str(pub)), bytes.fromhex(str(sig)), MANIFEST_DOMAIN + canonical_json(unsigned)
    )
    return Manifest(
        name=name,
        key=bytes.fromhex(info["key"]),
        version=info["version"],
        parent=info["parent"],
        root=info["root"],
        size=size,
        segment_size=seg,
        segment_count=count,
        stripes=info["stripes"],
        replicas=info["replicas"],
        integrity=info["integrity"],
        deleted=info["deleted"],
        created=float(created),
        publisher=publisher,
        raw=raw,
        owner=owner,
        delegation=delegation,
    )


@dataclass(frozen=True, slots=True)
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


DELEGATION_DOMAIN = b"difs-delegation-v1\x00"
# Reserved last component of the object listing revoked writer keys under a prefix.
REVOCATIONS = "@revoked"


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
    if not (_is_hex(owner, 64) and _is_hex(writer, 64) and _is_hex(sig, 128)):
        raise WireError("malformed delegation keys", field="delegation")
    if not isinstance(expires, int | float) or isinstance(expires, bool):
        raise WireError("malformed delegation expiry", field="delegation.expires")
    if not 0 <= expires < MAX_CREATED:
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


@dataclass(frozen=True, slots=True)
class HolderEntry:
    """A peer's signed claim to hold segments ``start..end`` of one version of a name."""

    key: bytes
    version: int
    integrity: bytes
    start: int
    end: int
    host: str
    port: int
    issued: int
    public_key: bytes
    raw: bytes

    @property
    def node_id(self) -> bytes:
        return bytes(node_id_for(self.public_key))

    @property
    def identity(self) -> bytes:
        """Entries with one identity replace each other (the fresher one wins)."""
        return b"h" + self.node_id + struct.pack("!QI", self.version, self.start)


def build_holder_entry(
    identity: Identity,
    *,
    key: bytes,
    version: int,
    integrity: bytes,
    start: int,
    end: int,
    host: str,
    port: int,
    issued: int,
) -> HolderEntry:
    body = _HOLDER.pack(
        HOLDER_KIND,
        key,
        version,
        integrity,
        start,
        end,
        ipaddress.IPv4Address(host).packed,
        port,
        issued,
        identity.public_key,
    )
    return parse_holder_entry(body + identity.sign(HOLDER_DOMAIN + body))


def parse_holder_entry(raw: bytes) -> HolderEntry:
    """Decode and verify a holder entry (WireError / IntegrityError)."""
    entry = decode_holder_entry(raw)
    verify_holder_entry(entry)
    return entry


def decode_holder_entry(raw: bytes) -> HolderEntry:
    """Decode a holder entry **without** checking its signature (WireError).

    For a reader that receives many entries and uses few of them at first (a fetch):
    it must call :func:`verify_holder_entry` on an entry before using it.
    """
    if len(raw) != HOLDER_SIZE:
        raise WireError(f"holder entry of {len(raw)} bytes, expected {HOLDER_SIZE}")
    kind, key, version, integrity, start, end, ip, port, issued, pub = _HOLDER.unpack_from(raw)
    if kind != HOLDER_KIND:
        raise WireError("not a holder entry", field="kind", offset=0)
    if end < start or port == 0 or version == 0:
        raise WireError("bad range, port or version", field="range", offset=61)
    return HolderEntry(
        key=key,
        version=version,
        integrity=integrity,
        start=start,
        end=end,
        host=socket.inet_ntoa(ip),
        port=port,
        issued=issued,
        public_key=pub,
        raw=bytes(raw),
    )


def verify_holder_entry(entry: HolderEntry) -> None:
    """Raise IntegrityError unless the entry's signature is its holder's over its fields."""
    body = entry.raw[: _HOLDER.size]
    verify_signature(entry.public_key, entry.raw[_HOLDER.size :], HOLDER_DOMAIN + body)


class RecordValidator:
    """The DHT policy for DIFS records (see recordstore.RecordPolicy).

    * a record under K must be a valid manifest whose name hashes to K;
    * it replaces the stored one only with a strictly greater version from the same
      owner (the first publisher owns the name); equal versions only with identical bytes;
    * readers rank the records of the k closest peers with :func:`choose_records` (the
      owner most peers vouch for, then its highest version), never by version alone;
    * entries under K are holder entries for K, or earlier manifests of K (history),
      admitted only in the lineage of the stored record (:meth:`entry_admission`).
    """

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        try:
            m = parse_manifest(value, key)
        except (WireError, IntegrityError):
            return None
        return (m.version,)

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        try:
            m_new, m_cur = parse_manifest(new, key), parse_manifest(current, key)
        except (WireError, IntegrityError):
            return True  # a damaged stored record may be replaced by a valid one
        return m_new.owner == m_cur.owner and m_new.version > m_cur.version

    def best_records(self, key: bytes, values: Sequence[bytes], now: float) -> list[bytes]:
        counted: dict[bytes, int] = {}
        for value in values:
            counted[value] = counted.get(value, 0) + 1
        found: list[tuple[Manifest, int]] = []
        for value, n in counted.items():
            try:
                found.append((parse_manifest(value, key), n))
            except (WireError, IntegrityError):
                continue
        return [m.raw for m in choose_records(found)]

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        try:
            if entry[:1] == b"{":
                m = parse_manifest(entry, key)
                return b"m" + struct.pack("!Q", m.version) + m.owner, 0
            h = parse_holder_entry(entry)
        except (WireError, IntegrityError):
            return None
        if h.key != key or h.issued > now + CLOCK_SKEW:
            return None
        return h.identity, h.issued

    def entry_admission(
        self, key: bytes, entry: bytes, record: bytes | None, history: Sequence[bytes], now: float
    ) -> EntryFacts | str:
        """Entries only for versions the owner of the stored record signed.

        A history manifest is admitted only if it is linked to the stored record (same
        owner and lineage, an earlier version, or the record itself); a holder entry only
        if the record or an admitted history manifest has its version and integrity root
        in that lineage. With no record stored yet nothing is admitted: a publish stores
        the record first in the same request, and the publisher re-sends what was refused.
        """
        if record is None:
            return "no record for this key: entries follow their manifest"
        try:
            current = parse_manifest(record, key)
            if entry[:1] == b"{":
                m = parse_manifest(entry, key)
                if not linked(m, current):
                    return "history from another owner or lineage than the record's"
                return EntryFacts(b"", m.version, history=True)
            h = decode_holder_entry(entry)
        except (WireError, IntegrityError):
            return "invalid entry"
        versions = [current]
        for raw in history:
            with contextlib.suppress(WireError, IntegrityError):
                versions.append(parse_manifest(raw, key))
        integrity = h.integrity.hex()
        if not any(
            m.version == h.version and m.integrity == integrity and linked(m, current)
            for m in versions
        ):
            return "no manifest of the owner for this version and integrity"
        return EntryFacts(h.public_key, h.version)
