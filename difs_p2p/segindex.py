"""The index of a segment store: which segments are stored, who needs them, what is pending.

``ROOT/index.sqlite3`` holds three tables::

    segments(id, size, stored_at)   one row per stored segment (its file is complete)
    refs(id, owner)                 who needs a segment (an opaque owner tag)
    pending(id, session, since)     upload sessions that stored a segment, not placed yet

A segment is *kept* while it has a ref or a pending row; one with neither is *unneeded*
(an orphan). :class:`SegmentIndex` is the SQL and nothing else: the store holds the
database's lock (``index.db.locked(...)``) around every call and opens the transactions,
and decides what the answers mean.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from pathlib import Path

from difs_p2p.diskcost import DiskCost
from difs_p2p.sqlitedb import Database

_SCHEMA = """
CREATE TABLE IF NOT EXISTS segments(
    id BLOB PRIMARY KEY, size INTEGER NOT NULL, stored_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS refs(
    id BLOB NOT NULL, owner BLOB NOT NULL, PRIMARY KEY(id, owner));
CREATE INDEX IF NOT EXISTS refs_owner ON refs(owner);
CREATE TABLE IF NOT EXISTS pending(
    id BLOB NOT NULL, session BLOB NOT NULL, since REAL NOT NULL, PRIMARY KEY(id, session));
CREATE INDEX IF NOT EXISTS pending_session ON pending(session);
"""
# A segment nothing keeps: no ref and no pending upload.
_NO_REF = "NOT EXISTS (SELECT 1 FROM refs r WHERE r.id = segments.id)"
_UNNEEDED = f"{_NO_REF} AND NOT EXISTS (SELECT 1 FROM pending p WHERE p.id = segments.id)"


class SegmentIndex:
    """The sqlite index at ``path``. Every method runs in the caller's lock hold."""

    def __init__(self, path: Path) -> None:
        # synchronous=NORMAL (Database) can lose the last commits on power loss, never
        # corrupt the index. A lost row is recovered by rehashing its file on open, and a
        # lost ref change only keeps a segment longer than needed.
        self.db = Database(path, "the segment index", _SCHEMA)
        self._conn = self.db.conn

    def close(self) -> None:
        self.db.close()

    # -- segments ---------------------------------------------------------------------------

    def sizes(self) -> dict[bytes, int]:
        """Every stored segment's size."""
        return {bytes(i): int(s) for i, s in self._conn.execute("SELECT id, size FROM segments")}

    def ids(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._conn.execute("SELECT id FROM segments")]

    def size(self, seg_id: bytes) -> int | None:
        row = self._conn.execute("SELECT size FROM segments WHERE id=?", (seg_id,)).fetchone()
        return None if row is None else int(row[0])

    def stored_at(self, seg_id: bytes) -> float | None:
        row = self._conn.execute("SELECT stored_at FROM segments WHERE id=?", (seg_id,)).fetchone()
        return None if row is None else float(row[0])

    def totals(self, cost: DiskCost) -> tuple[int, int]:
        """(bytes charged, count) of the stored segments."""
        charged, params = cost.sql_sum()
        used, count = self._conn.execute(
            f"SELECT {charged}, COUNT(*) FROM segments", params
        ).fetchone()
        return int(used), int(count)

    def insert(self, rows: Iterable[tuple[bytes, int, float]]) -> None:
        """Index segments: ``(id, size, stored_at)`` rows."""
        self._conn.executemany("INSERT INTO segments VALUES(?,?,?)", rows)

    def delete(self, ids: Iterable[bytes]) -> None:
        """Drop segments' rows (not their refs or pending rows)."""
        self._conn.executemany("DELETE FROM segments WHERE id=?", [(i,) for i in ids])

    def forget(self, seg_id: bytes) -> None:
        """Drop a segment's refs and pending rows."""
        self._conn.execute("DELETE FROM refs WHERE id=?", (seg_id,))
        self._conn.execute("DELETE FROM pending WHERE id=?", (seg_id,))

    # -- keepers: refs and pending rows ------------------------------------------------------

    def keep(
        self, ids: Sequence[bytes], owner: bytes | None, session: bytes | None, now: float
    ) -> None:
        """Add ``owner``'s refs and ``session``'s pending rows for ``ids``."""
        if owner is not None:
            self._conn.executemany(
                "INSERT OR IGNORE INTO refs VALUES(?,?)", [(i, owner) for i in ids]
            )
        if session is not None:
            self._conn.executemany(
                "INSERT OR IGNORE INTO pending VALUES(?,?,?)", [(i, session, now) for i in ids]
            )

    def drop_refs(self, owner: bytes) -> list[bytes]:
        """Delete ``owner``'s refs; the ids they named."""
        ids = [
            bytes(r[0]) for r in self._conn.execute("SELECT id FROM refs WHERE owner=?", (owner,))
        ]
        self._conn.execute("DELETE FROM refs WHERE owner=?", (owner,))
        return ids

    def referenced(self, seg_id: bytes) -> bool:
        return self._conn.execute("SELECT 1 FROM refs WHERE id=?", (seg_id,)).fetchone() is not None

    def end_session(self, session: bytes, ids: Sequence[bytes] | None) -> list[bytes]:
        """Delete ``session``'s pending rows (only for ``ids``, when given); the ids."""
        if ids is not None:
            self._conn.executemany(
                "DELETE FROM pending WHERE id=? AND session=?", [(i, session) for i in ids]
            )
            return list(ids)
        found = [
            bytes(r[0])
            for r in self._conn.execute("SELECT id FROM pending WHERE session=?", (session,))
        ]
        self._conn.execute("DELETE FROM pending WHERE session=?", (session,))
        return found

    def end_sessions_before(self, before: float, live: Collection[bytes]) -> list[bytes]:
        """Delete the pending rows from before ``before`` of sessions not in ``live``; the
        ids they named."""
        marks = ",".join("?" * len(live))
        where = f"since < ? AND session NOT IN ({marks})"
        found = [
            bytes(r[0])
            for r in self._conn.execute(f"SELECT id FROM pending WHERE {where}", (before, *live))
        ]
        self._conn.execute(f"DELETE FROM pending WHERE {where}", (before, *live))
        return found

    def end_all_sessions(self) -> int:
        """Delete every pending row; how many there were."""
        return int(self._conn.execute("DELETE FROM pending").rowcount)

    # -- what nothing keeps -------------------------------------------------------------------

    def unneeded(self) -> dict[bytes, float]:
        """The stored segments nothing keeps, with the time each was stored."""
        return {
            bytes(i): float(t)
            for i, t in self._conn.execute(f"SELECT id, stored_at FROM segments WHERE {_UNNEEDED}")
        }

    def is_unneeded(self, seg_id: bytes) -> bool:
        """Whether a segment is stored and nothing keeps it."""
        row = self._conn.execute(
            f"SELECT 1 FROM segments WHERE id=? AND {_UNNEEDED}", (seg_id,)
        ).fetchone()
        return row is not None

    def orphan_counts(self, cost: DiskCost) -> tuple[int, int, int, int]:
        """(count, bytes charged) of the unreferenced segments still pending in a session,
        then of those nothing keeps."""
        charged, params = cost.sql_sum()
        in_pending = "EXISTS (SELECT 1 FROM pending p WHERE p.id = segments.id)"
        pending = self._conn.execute(
            f"SELECT COUNT(*), {charged} FROM segments WHERE {_NO_REF} AND {in_pending}",
            params,
        ).fetchone()
        orphaned = self._conn.execute(
            f"SELECT COUNT(*), {charged} FROM segments WHERE {_UNNEEDED}", params
        ).fetchone()
        return int(pending[0]), int(pending[1]), int(orphaned[0]), int(orphaned[1])
