"""What a peer stores for the DHT: validated records and entry sets, in sqlite.

Two kinds of data live under a 20-byte key:

* one **record** (a signed manifest). A new record replaces the stored one only when the
  :class:`RecordPolicy` says so (version strictly greater, same owner...). Invalid records are
  refused, never stored.
* a bounded **set of entries** (signed holder entries). Each entry has an identity (who holds
  what) and a freshness; a fresher entry with the same identity replaces the older one. The
  policy admits an entry only in the context of what the key holds (the stored record and
  history: see :meth:`RecordPolicy.entry_admission`).

**Quotas** (attacks on the store's capacity): every write carries its *source* (the sender's
address, ``""`` for this peer's own writes, which are not metered). One source may hold at
most ``source_share`` of the record cap and of the overall entry cap, and at most three quarters
of a key's entry set; one signer (a holder key) at most ``max_entries_per_signer`` entries per
key. A stranger filling its share therefore leaves the rest for honest names. When a key's
entry set (or a source's share of it) is full, an entry for a newer version takes the place
of one of the oldest version there, so junk for an old version cannot keep a new version's
holders out.

Times are wall-clock seconds passed in by the caller, so that expiry survives restarts and
tests control the clock. All methods are synchronous and small; the DHT calls them from the
event loop.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

from difs_p2p.addresses import address_group, is_loopback
from difs_p2p.classgen import valueclass
from difs_p2p.sqlitedb import Database


class RecordPolicy(Protocol):
    """Decides what the DHT may store and which of several values is best."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        """The rank of a valid record under ``key`` (higher is newer), or None if invalid."""

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        """Whether a valid ``new`` record may replace the valid ``current`` one."""

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        """(identity, freshness) of a valid entry under ``key``, or None if invalid."""

    def entry_admission(
        self, key: bytes, entry: bytes, record: bytes | None, history: Sequence[bytes], now: float
    ) -> EntryFacts | str:
        """Whether a valid entry may join the set of ``key``, given the stored ``record``
        (None if none) and the history entries stored there: its facts, or why not."""

    def best_records(self, key: bytes, values: Sequence[bytes], now: float) -> list[bytes]:
        """The valid records among ``values`` (one per peer that answered, so repeated
        values count as several peers), best first: the one a reader uses first."""


@valueclass
class EntryFacts:
    """What quotas need to know of an admitted entry: who signed it (``b""``: not capped
    per signer), which version it is for (older versions give way when a set is full) and
    whether it is history (a manifest: it stays while the set is full, and is not evicted)."""

    signer: bytes
    version: int
    history: bool = False


# Entries per key one signer may hold: a holder holds at most 64 ranges (the stripe
# cap, segments.default_stripes) of a version, for at most 4 versions at once (the 3 kept
# by default, plus one being published).
MAX_ENTRIES_PER_SIGNER = 64 * 4
# The share of the record cap and of the overall entry cap one source may fill.
SOURCE_SHARE = 0.25
# Entries stored for the network in all, over every key (about 180 bytes each).
MAX_ENTRIES = 1_000_000


_SCHEMA = """
CREATE TABLE IF NOT EXISTS records(
    k BLOB PRIMARY KEY, v BLOB NOT NULL, stored REAL NOT NULL);
CREATE INDEX IF NOT EXISTS records_stored ON records(stored);
CREATE TABLE IF NOT EXISTS entries(
    k BLOB NOT NULL, ident BLOB NOT NULL, fresh INTEGER NOT NULL,
    e BLOB NOT NULL, stored REAL NOT NULL, PRIMARY KEY(k, ident));
CREATE INDEX IF NOT EXISTS entries_stored ON entries(stored);
"""
# Made once the columns of the quotas exist (added in place to older databases).
_QUOTA_INDEXES = """
CREATE INDEX IF NOT EXISTS records_src ON records(src);
CREATE INDEX IF NOT EXISTS entries_src ON entries(src, k);
CREATE INDEX IF NOT EXISTS entries_signer ON entries(k, signer);
"""


def write_source(host: str, port: int) -> str:
    """The source a write is counted against: the sender's IPv4 address or IPv6 /64, or
    address and port on loopback, where a local network runs all its peers on one address."""
    if is_loopback(host):
        return f"{host}:{port}"
    return address_group(host) or host


class AcceptAll:
    """A policy that accepts any bytes; highest bytes win. For tests of the DHT layer only."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        return tuple(value[:8])

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        return tuple(new[:8]) >= tuple(current[:8])

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        return (entry[:8], 0) if entry else None

    def entry_admission(
        self, key: bytes, entry: bytes, record: bytes | None, history: Sequence[bytes], now: float
    ) -> EntryFacts | str:
        return EntryFacts(b"", 0)

    def best_records(self, key: bytes, values: Sequence[bytes], now: float) -> list[bytes]:
        votes: dict[bytes, int] = {}
        for value in values:
            if self.record_rank(key, value, now) is not None:
                votes[value] = votes.get(value, 0) + 1
        # highest bytes first; between equal prefixes, more peers, then the smaller bytes
        return sorted(votes, key=lambda v: (tuple(v[:8]), votes[v], _neg(v)), reverse=True)


def _neg(value: bytes) -> tuple[int, ...]:
    """A sort key under which smaller bytes sort later (for reverse sorts)."""
    return (*(-b for b in value), -len(value))


@valueclass
class StoreResult:
    accepted: bool
    reason: str


class RecordStore:
    """Validated records and entry sets under 20-byte keys, persisted in sqlite."""

    def __init__(
        self,
        path: Path | None,
        policy: RecordPolicy,
        *,
        ttl: float,
        max_records: int,
        max_entries_per_key: int,
        max_entries: int = MAX_ENTRIES,
        max_entries_per_signer: int = MAX_ENTRIES_PER_SIGNER,
        source_share: float = SOURCE_SHARE,
    ) -> None:
        self.policy = policy
        self.ttl = ttl
        self.max_records = max_records
        self.max_entries_per_key = max_entries_per_key
        self.max_entries = max_entries
        self.max_entries_per_signer = max_entries_per_signer
        # what one source may fill: of the record cap, of the overall entry cap, of a key
        self.records_per_source = max(1, int(max_records * source_share))
        self.entries_per_source = max(1, int(max_entries * source_share))
        # three quarters of a key's set: an honest entry peer adds 1 + 64 x (r - 1) entries
        # for one version (257 for r = 5); two sources could fill a set with any share,
        # and a newer version displaces the oldest one's entries when it is full
        self.key_entries_per_source = max(1, max_entries_per_key * 3 // 4)
        # False while nothing was ever stored in this (in-memory) database: keys() then
        # needs no query. The DHT asks for every new contact, to hand records over.
        self._maybe_stored = path is not None
        self._database = Database(path, "the record database", _SCHEMA)
        # the connection, used only under the database's lock
        self._db = self._database.conn
        try:
            # Databases from before quotas get the new columns in place (old rows: this
            # peer's own, version 0, no signer).
            self._database.add_columns("records", {"src": "TEXT NOT NULL DEFAULT ''"})
            self._database.add_columns(
                "entries",
                {
                    "src": "TEXT NOT NULL DEFAULT ''",
                    "signer": "BLOB NOT NULL DEFAULT X''",
                    "ver": "INTEGER NOT NULL DEFAULT 0",
                    "hist": "INTEGER NOT NULL DEFAULT 0",
                },
            )
            with self._database.sql("indexing the record database"):
                self._db.executescript(_QUOTA_INDEXES)
            # Totals kept in memory (a COUNT(*) scans the table): quotas read them per write.
            self._records = self._database.count("records")
            self._entries = self._database.count("entries")
        except BaseException:
            self._database.close()
            raise

    # -- records ---------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> bytes | None:
        with self._database.locked("reading a record"):
            return self._get_locked(key, now)

    def _get_locked(self, key: bytes, now: float) -> bytes | None:
        row = self._db.execute(
            "SELECT v FROM records WHERE k=? AND stored>=?", (key, now - self.ttl)
        ).fetchone()
        return bytes(row[0]) if row else None

    def put(self, key: bytes, value: bytes, now: float, source: str = "") -> StoreResult:
        """Store ``value`` under ``key`` if it is valid and may replace what is there.

        ``source`` names the sender (its address; ``""`` for this peer's own writes): a
        new key from one source counts against that source's share of the record cap.
        """
        if len(key) != 20:
            return StoreResult(False, "key is not 20 bytes")
        if self.policy.record_rank(key, value, now) is None:
            return StoreResult(False, "invalid record")
        with self._database.locked("storing a record"):
            row = self._db.execute("SELECT v, stored FROM records WHERE k=?", (key,)).fetchone()
            if row is not None:
                current = bytes(row[0])
                expired = row[1] < now - self.ttl
                if current == value:
                    self._db.execute("UPDATE records SET stored=? WHERE k=?", (now, key))
                    return StoreResult(True, "refreshed")
                if not expired and not self.policy.may_replace(key, value, current, now):
                    return StoreResult(False, "stored record is newer or owned by another key")
            else:
                # a source can be over its share only once the store holds that many
                if (
                    source
                    and self._records >= self.records_per_source
                    and self._source_count("records", source) >= self.records_per_source
                ):
                    self._expire_locked(now)
                    if self._source_count("records", source) >= self.records_per_source:
                        return StoreResult(False, "this source's share of the records is full")
                if self._records >= self.max_records:
                    self._expire_locked(now)
                    if self._records >= self.max_records:
                        return StoreResult(False, "record store is full")
            self._maybe_stored = True
            # a replaced record keeps the source that first stored its key: an update by
            # its owner from elsewhere does not move the count
            if row is None:
                self._db.execute(
                    "INSERT INTO records(k, v, stored, src) VALUES(?,?,?,?)",
                    (key, value, now, source),
                )
                self._records += 1
            else:
                self._db.execute("UPDATE records SET v=?, stored=? WHERE k=?", (value, now, key))
        return StoreResult(True, "stored")

    def _source_count(self, table: str, source: str) -> int:
        (n,) = self._db.execute(f"SELECT COUNT(*) FROM {table} WHERE src=?", (source,)).fetchone()
        return int(n)

    def items(self, now: float) -> Iterator[tuple[bytes, bytes]]:
        """Every live record (a snapshot, safe to iterate while the store changes)."""
        with self._database.locked("listing records"):
            rows = self._db.execute(
                "SELECT k, v FROM records WHERE stored>=?", (now - self.ttl,)
            ).fetchall()
        for k, v in rows:
            yield bytes(k), bytes(v)

    def keys(self, now: float) -> list[bytes]:
        if not self._maybe_stored:
            return []
        with self._database.locked("listing keys"):
            rows = self._db.execute(
                "SELECT k FROM records WHERE stored>=? UNION SELECT DISTINCT k FROM entries "
                "WHERE stored>=?",
                (now - self.ttl, now - self.ttl),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    # -- entry sets ------------------------------------------------------------------------

    def add_entry(self, key: bytes, entry: bytes, now: float, source: str = "") -> StoreResult:
        """Add a valid entry the policy admits for ``key`` (see the module docstring for
        the quotas ``source`` counts against)."""
        if len(key) != 20:
            return StoreResult(False, "key is not 20 bytes")
        ident = self.policy.entry_identity(key, entry, now)
        if ident is None:
            return StoreResult(False, "invalid entry")
        identity, fresh = ident
        with self._database.locked("adding an entry"):
            record = self._get_locked(key, now)
            history = [
                bytes(r[0])
                for r in self._db.execute(
                    "SELECT e FROM entries WHERE k=? AND hist=1 AND stored>=?",
                    (key, now - self.ttl),
                )
            ]
            facts = self.policy.entry_admission(key, entry, record, history, now)
            if isinstance(facts, str):
                return StoreResult(False, facts)
            row = self._db.execute(
                "SELECT fresh FROM entries WHERE k=? AND ident=?", (key, identity)
            ).fetchone()
            if row is not None and row[0] > fresh:
                return StoreResult(False, "a fresher entry is stored")
            if row is None:
                refused = self._make_room(key, facts, source, now)
                if refused:
                    return StoreResult(False, refused)
                self._entries += 1
            self._maybe_stored = True
            self._db.execute(
                "INSERT OR REPLACE INTO entries(k, ident, fresh, e, stored, src, signer, ver, hist)"
                " VALUES(?,?,?,?,?,?,?,?,?)",
                (
                    key,
                    identity,
                    fresh,
                    entry,
                    now,
                    source,
                    facts.signer,
                    facts.version,
                    int(facts.history),
                ),
            )
        return StoreResult(True, "stored")

    def _make_room(self, key: bytes, facts: EntryFacts, source: str, now: float) -> str:
        """Check (and make) room for a new entry; "" if it fits, else why not."""
        db = self._db
        if facts.signer:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM entries WHERE k=? AND signer=?", (key, facts.signer)
            ).fetchone()
            if n >= self.max_entries_per_signer:
                return "this signer's share of the entry set is full"
        if source:
            (n,) = db.execute(
                "SELECT COUNT(*) FROM entries WHERE k=? AND src=?", (key, source)
            ).fetchone()
            if n >= self.key_entries_per_source and not self._evict_older(
                key, facts, "AND src=?", (source,)
            ):
                return "this source's share of the entry set is full"
            if (
                self._entries >= self.entries_per_source
                and self._source_count("entries", source) >= self.entries_per_source
            ):
                self._expire_locked(now)
                if self._source_count("entries", source) >= self.entries_per_source:
                    return "this source's share of the entries is full"
        (count,) = db.execute("SELECT COUNT(*) FROM entries WHERE k=?", (key,)).fetchone()
        if count >= self.max_entries_per_key:
            old = db.execute("DELETE FROM entries WHERE k=? AND stored<?", (key, now - self.ttl))
            self._entries -= int(old.rowcount)
            (count,) = db.execute("SELECT COUNT(*) FROM entries WHERE k=?", (key,)).fetchone()
            if count >= self.max_entries_per_key and not self._evict_older(key, facts, "", ()):
                return "entry set is full"
        if self._entries >= self.max_entries:
            self._expire_locked(now)
            if self._entries >= self.max_entries:
                return "entry store is full"
        return ""

    def _evict_older(
        self, key: bytes, facts: EntryFacts, where: str, args: tuple[str, ...]
    ) -> bool:
        """Make room for an entry of a newer version: drop the stalest holder entry of
        the oldest version below it (history stays). Whether one was dropped."""
        row = self._db.execute(
            f"SELECT ident FROM entries WHERE k=? AND hist=0 AND ver<? {where}"
            " ORDER BY ver, fresh LIMIT 1",
            (key, facts.version, *args),
        ).fetchone()
        if row is None:
            return False
        self._db.execute("DELETE FROM entries WHERE k=? AND ident=?", (key, row[0]))
        self._entries -= 1
        return True

    def entries(self, key: bytes, now: float) -> list[bytes]:
        with self._database.locked("reading an entry set"):
            rows = self._db.execute(
                "SELECT e FROM entries WHERE k=? AND stored>=? ORDER BY ident",
                (key, now - self.ttl),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def remove_entries(self, key: bytes, identities: list[bytes]) -> None:
        with self._database.locked("removing entries"):
            gone = self._db.executemany(
                "DELETE FROM entries WHERE k=? AND ident=?", [(key, i) for i in identities]
            )
            self._entries -= int(gone.rowcount)

    # -- housekeeping ----------------------------------------------------------------------

    def expire(self, now: float) -> int:
        with self._database.locked("expiring records and entries"):
            return self._expire_locked(now)

    def _expire_locked(self, now: float) -> int:
        cutoff = now - self.ttl
        a = int(self._db.execute("DELETE FROM records WHERE stored<?", (cutoff,)).rowcount)
        b = int(self._db.execute("DELETE FROM entries WHERE stored<?", (cutoff,)).rowcount)
        self._records -= a
        self._entries -= b
        return a + b

    def counts(self) -> tuple[int, int]:
        """(records, entries) stored, expired ones included."""
        with self._database.locked("counting records and entries") as db:
            (records,) = db.execute("SELECT COUNT(*) FROM records").fetchone()
            (entries,) = db.execute("SELECT COUNT(*) FROM entries").fetchone()
        return int(records), int(entries)

    def close(self) -> None:
        self._database.close()
