"""What a peer stores for the DHT: validated records and entry sets, in sqlite.

Two kinds of data live under a 20-byte key:

* one **record** (a signed manifest). A new record replaces the stored one only when the
  :class:`RecordPolicy` says so (version strictly greater, same owner...). Invalid records are
  refused, never stored.
* a bounded **set of entries** (signed holder entries). Each entry has an identity (who holds
  what) and a freshness; a fresher entry with the same identity replaces the older one.

Times are wall-clock seconds passed in by the caller, so that expiry survives restarts and
tests control the clock. All methods are synchronous and small; the DHT calls them from the
event loop.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from difs_p2p.errors import StorageError


class RecordPolicy(Protocol):
    """Decides what the DHT may store and which of several values is best."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        """The rank of a valid record under ``key`` (higher is newer), or None if invalid."""

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        """Whether a valid ``new`` record may replace the valid ``current`` one."""

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        """(identity, freshness) of a valid entry under ``key``, or None if invalid."""


class AcceptAll:
    """A policy that accepts any bytes; highest bytes win. For tests of the DHT layer only."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        return tuple(value[:8])

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        return tuple(new[:8]) >= tuple(current[:8])

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        return (entry[:8], 0) if entry else None


@dataclass(frozen=True, slots=True)
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
    ) -> None:
        self.policy = policy
        self.ttl = ttl
        self.max_records = max_records
        self.max_entries_per_key = max_entries_per_key
        self._lock = threading.Lock()
        # False while nothing was ever stored in this (in-memory) database: keys() then
        # needs no query. The DHT asks for every new contact, to hand records over.
        self._maybe_stored = path is not None
        try:
            self._db = sqlite3.connect(
                str(path) if path is not None else ":memory:",
                check_same_thread=False,
                isolation_level=None,
            )
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(
                """
                CREATE TABLE IF NOT EXISTS records(
                    k BLOB PRIMARY KEY, v BLOB NOT NULL, stored REAL NOT NULL);
                CREATE INDEX IF NOT EXISTS records_stored ON records(stored);
                CREATE TABLE IF NOT EXISTS entries(
                    k BLOB NOT NULL, ident BLOB NOT NULL, fresh INTEGER NOT NULL,
                    e BLOB NOT NULL, stored REAL NOT NULL, PRIMARY KEY(k, ident));
                CREATE INDEX IF NOT EXISTS entries_stored ON entries(stored);
                """
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the record database {path}: {exc}") from None

    # -- records ---------------------------------------------------------------------------

    def get(self, key: bytes, now: float) -> bytes | None:
        with self._lock:
            row = self._db.execute(
                "SELECT v FROM records WHERE k=? AND stored>=?", (key, now - self.ttl)
            ).fetchone()
        return bytes(row[0]) if row else None

    def put(self, key: bytes, value: bytes, now: float) -> StoreResult:
        """Store ``value`` under ``key`` if it is valid and may replace what is there."""
        if len(key) != 20:
            return StoreResult(False, "key is not 20 bytes")
        if self.policy.record_rank(key, value, now) is None:
            return StoreResult(False, "invalid record")
        with self._lock:
            row = self._db.execute("SELECT v, stored FROM records WHERE k=?", (key,)).fetchone()
            if row is not None:
                current = bytes(row[0])
                expired = row[1] < now - self.ttl
                if current == value:
                    self._db.execute("UPDATE records SET stored=? WHERE k=?", (now, key))
                    return StoreResult(True, "refreshed")
                if not expired and not self.policy.may_replace(key, value, current, now):
                    return StoreResult(False, "stored record is newer or owned by another key")
            elif self._count("records") >= self.max_records:
                self._expire_locked(now)
                if self._count("records") >= self.max_records:
                    return StoreResult(False, "record store is full")
            self._maybe_stored = True
            self._db.execute(
                "INSERT OR REPLACE INTO records(k, v, stored) VALUES(?,?,?)", (key, value, now)
            )
        return StoreResult(True, "stored")

    def items(self, now: float) -> Iterator[tuple[bytes, bytes]]:
        """Every live record (a snapshot, safe to iterate while the store changes)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT k, v FROM records WHERE stored>=?", (now - self.ttl,)
            ).fetchall()
        for k, v in rows:
            yield bytes(k), bytes(v)

    def keys(self, now: float) -> list[bytes]:
        if not self._maybe_stored:
            return []
        with self._lock:
            rows = self._db.execute(
                "SELECT k FROM records WHERE stored>=? UNION SELECT DISTINCT k FROM entries "
                "WHERE stored>=?",
                (now - self.ttl, now - self.ttl),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    # -- entry sets ------------------------------------------------------------------------

    def add_entry(self, key: bytes, entry: bytes, now: float) -> StoreResult:
        if len(key) != 20:
            return StoreResult(False, "key is not 20 bytes")
        ident = self.policy.entry_identity(key, entry, now)
        if ident is None:
            return StoreResult(False, "invalid entry")
        identity, fresh = ident
        with self._lock:
            row = self._db.execute(
                "SELECT fresh FROM entries WHERE k=? AND ident=?", (key, identity)
            ).fetchone()
            if row is not None and row[0] > fresh:
                return StoreResult(False, "a fresher entry is stored")
            if row is None:
                (count,) = self._db.execute(
                    "SELECT COUNT(*) FROM entries WHERE k=?", (key,)
                ).fetchone()
                if count >= self.max_entries_per_key:
                    self._db.execute(
                        "DELETE FROM entries WHERE k=? AND stored<?", (key, now - self.ttl)
                    )
                    (count,) = self._db.execute(
                        "SELECT COUNT(*) FROM entries WHERE k=?", (key,)
                    ).fetchone()
                    if count >= self.max_entries_per_key:
                        return StoreResult(False, "entry set is full")
            self._maybe_stored = True
            self._db.execute(
                "INSERT OR REPLACE INTO entries(k, ident, fresh, e, stored) VALUES(?,?,?,?,?)",
                (key, identity, fresh, entry, now),
            )
        return StoreResult(True, "stored")

    def entries(self, key: bytes, now: float) -> list[bytes]:
        with self._lock:
            rows = self._db.execute(
                "SELECT e FROM entries WHERE k=? AND stored>=? ORDER BY ident",
                (key, now - self.ttl),
            ).fetchall()
        return [bytes(r[0]) for r in rows]

    def remove_entries(self, key: bytes, identities: list[bytes]) -> None:
        with self._lock:
            self._db.executemany(
                "DELETE FROM entries WHERE k=? AND ident=?", [(key, i) for i in identities]
            )

    # -- housekeeping ----------------------------------------------------------------------

    def expire(self, now: float) -> int:
        with self._lock:
            return self._expire_locked(now)

    def _expire_locked(self, now: float) -> int:
        cutoff = now - self.ttl
        a = self._db.execute("DELETE FROM records WHERE stored<?", (cutoff,)).rowcount
        b = self._db.execute("DELETE FROM entries WHERE stored<?", (cutoff,)).rowcount
        return int(a) + int(b)

    def _count(self, table: str) -> int:
        (n,) = self._db.execute(f"SELECT COUNT(*) FROM {table}").fetchone()
        return int(n)

    def counts(self) -> tuple[int, int]:
        with self._lock:
            return self._count("records"), self._count("entries")

    def close(self) -> None:
        with self._lock:
            self._db.close()
