"""The DHT's policy for DIFS records: which manifests and entries a peer stores under a
name key, and which records a reader uses first (docs/PROTOCOL.md, "What the DHT stores
under a name key"). It implements the seam ``recordstore.RecordPolicy``, so the DHT and
its store know nothing of manifests; the peer and the simulator pass it in. Pure.
"""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Sequence

from difs_p2p.errors import IntegrityError, WireError
from difs_p2p.holders import decode_holder_entry, parse_holder_entry
from difs_p2p.identity import fingerprint
from difs_p2p.listing import MAX_SHARD_ENTRIES, decode_child, parse_child
from difs_p2p.manifest import Manifest, choose_records, linked, parse_manifest
from difs_p2p.records import CHILD_KIND, RecordKind, record_kind
from difs_p2p.recordstore import EntryFacts

# Clocks of honest peers may differ this much; entries issued further ahead are refused.
CLOCK_SKEW = 600.0


class RecordValidator:
    """The DHT policy for DIFS records (see recordstore.RecordPolicy).

    * a record under K must be a valid manifest whose name hashes to K;
    * it replaces the stored one only with a strictly greater version from the same
      owner (the first publisher owns the name); equal versions only with identical bytes;
    * readers rank the records of the k closest peers with :func:`choose_records` (the
      owner most peers vouch for, then its highest version), never by version alone;
    * entries under K are holder entries for K, or earlier manifests of K (history),
      admitted only in the lineage of the stored record (:meth:`entry_admission`);
    * child entries (listing.py) are admitted at their shard key, at most
      MAX_SHARD_ENTRIES per key, or in the entry set of a name they list (the name or a
      folder above it) when its owner signed them (:func:`child_admission`).
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
            if record_kind(entry) is RecordKind.CHILD:
                return child_identity(entry, now)
            if record_kind(entry) is RecordKind.MANIFEST:
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
        if entry[:1] == bytes([CHILD_KIND]):
            return child_admission(key, entry, record, history)
        if record is None:
            return "no record for this key: entries follow their manifest"
        try:
            current = parse_manifest(record, key)
            if record_kind(entry) is RecordKind.MANIFEST:
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
        if not any(
            m.version == h.version and m.integrity == h.integrity and linked(m, current)
            for m in versions
        ):
            return "no manifest of the owner for this version and integrity"
        return EntryFacts(h.public_key, h.version)


def child_identity(entry: bytes, now: float) -> tuple[bytes, int] | None:
    """(identity, freshness) of a child entry that verifies, else None."""
    try:
        child = parse_child(entry, now)
    except (WireError, IntegrityError):
        return None
    return child.store_identity, child.issued


def child_admission(
    key: bytes, entry: bytes, record: bytes | None, history: Sequence[bytes]
) -> EntryFacts | str:
    """Where a (verified) child entry may be stored.

    * at its own shard key (:attr:`listing.ChildEntry.shard`): always, as long as the key
      holds fewer than MAX_SHARD_ENTRIES child entries or one with its identity (child
      entries are kept as history there: they never give way to holder entries);
    * in the entry set of a name (the stored record's), for the holders to re-store it
      when they republish the name: if it lists that name or a folder above it, and the
      name's owner signed it (itself or through a delegate).
    """
    try:
        child = decode_child(entry)
    except WireError:
        return "invalid child entry"
    if child.shard == key:
        if len(history) >= MAX_SHARD_ENTRIES:
            ident = child.store_identity
            held = set()
            for raw in history:
                with contextlib.suppress(WireError):
                    held.add(decode_child(raw).store_identity)
            if ident not in held:
                return "this child shard is full"
        return EntryFacts(child.writer, 0, history=True)
    if record is None:
        return "a child entry belongs at its shard key or beside its name's record"
    try:
        m = parse_manifest(record, key)
    except (WireError, IntegrityError):
        return "invalid record"
    if child.marker:
        lists_it = m.name.startswith(child.parent + "/")
    else:
        full = child.full_name.rstrip("/")
        lists_it = m.name == full or m.name.startswith(full + "/")
    if not lists_it:
        return "a child entry beside a record lists that name or a folder above it"
    if bytes.fromhex(fingerprint(m.owner)) != child.owner:
        return "a child entry beside a record is signed for the record's owner"
    return EntryFacts(child.writer, 0)
