"""What this peer holds: the ranges it signed holder entries for, in sqlite.

A :class:`Holding` is one range of one name version kept here; its segments carry the
holding's owner tag (:func:`holding_owner`) in the segment store, so freeing the holding
frees exactly what nothing else here needs. The lineage of a holding (owner key, lineage
root, manifest hash) is recorded once a manifest of its version is seen (a range is held
before its manifest is signed: ``place`` comes before ``publish``) and never changes after.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from difs_p2p.classgen import valueclass
from difs_p2p.errors import AlreadyExistsError
from difs_p2p.manifest import Lineage
from difs_p2p.names import NameKey
from difs_p2p.segments import IntegrityRoot, SegmentId
from difs_p2p.sqlitedb import Database

__all__ = ["Holding", "Holdings", "Query", "holding_owner"]

# A range asked about (a co-holder's probe, ``holds_ranges``): (name key, version, first
# segment, last segment).
Query = tuple[NameKey, int, int, int]

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS holdings(key BLOB, version INTEGER, integrity BLOB,"
    " count INTEGER, start INTEGER, end_ INTEGER, since REAL,"
    " PRIMARY KEY(key, version, start))"
)

_COLUMNS = "key, version, integrity, count, start, end_, since, owner_key, root, manifest"


@valueclass
class Holding:
    """One range of one name version kept here (segments ``start..end`` of ``integrity``),
    held since ``since`` (wall-clock seconds)."""

    key: NameKey
    version: int
    integrity: IntegrityRoot
    segment_count: int
    start: int
    end: int
    since: float
    # The owner, lineage root and manifest of the held version, once a manifest of it was
    # seen (a range is held before its manifest is signed: place comes before publish).
    lineage: Lineage | None = None

    @property
    def owner(self) -> bytes:
        """The reference tag of this holding's segments in the segment store."""
        return holding_owner(self.key, self.version, self.start)


def holding_owner(key: NameKey, version: int, start: int) -> bytes:
    return key + version.to_bytes(8, "big") + start.to_bytes(4, "big")


class Holdings:
    """The ranges this peer has signed holder entries for (sqlite, survives restarts),
    with the lineage of each once known (owner key, lineage root, manifest hash).

    As the segment index (sqlitedb.Database): a kill -9 loses no commit; a power loss may
    lose the last ones, after which the other holders' repair restores the copies.
    """

    def __init__(self, path: Path) -> None:
        self._db = Database(path, "the holdings index", _SCHEMA)
        # Databases from before lineages get the columns in place; their rows learn
        # their lineage from the next view of their name (bind).
        self._db.add_columns("holdings", {"owner_key": "BLOB", "root": "TEXT", "manifest": "TEXT"})

    def add(self, h: Holding) -> None:
        """Record a holding; one already known keeps the lineage it has.

        A holding bound to its owner's lineage is never replaced by another object under
        the same name, version and range (someone placing other bytes under a version the
        owner published): AlreadyExistsError. An unbound one may be (its version's manifest was
        not seen yet, so the newcomer may be the owner's).
        """
        with self._db.locked("recording a holding") as db:
            lin = h.lineage
            row = db.execute(
                "SELECT owner_key, root, manifest, integrity FROM holdings WHERE key=?"
                " AND version=? AND start=? AND owner_key IS NOT NULL",
                (h.key, h.version, h.start),
            ).fetchone()
            if row is not None and bytes(row[3]) != h.integrity:
                raise AlreadyExistsError(
                    f"version {h.version} of this name is held here as another object, "
                    "signed by its owner"
                )
            if lin is None and row is not None:
                lin = Lineage(bytes(row[0]), str(row[1]), h.version, str(row[2] or ""))
            db.execute(
                f"INSERT OR REPLACE INTO holdings({_COLUMNS}) VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    h.key,
                    h.version,
                    h.integrity,
                    h.segment_count,
                    h.start,
                    h.end,
                    h.since,
                    lin.owner if lin else None,
                    lin.root if lin else None,
                    lin.manifest if lin else None,
                ),
            )

    def bind(self, key: NameKey, version: int, integrity: IntegrityRoot, lineage: Lineage) -> int:
        """Record the lineage of held ranges of (key, version, integrity) that have none
        yet; a lineage once bound never changes. How many rows were bound."""
        with self._db.locked("binding a lineage") as db:
            cur = db.execute(
                "UPDATE holdings SET owner_key=?, root=?, manifest=? WHERE key=? AND version=?"
                " AND integrity=? AND owner_key IS NULL",
                (lineage.owner, lineage.root, lineage.manifest, key, version, integrity),
            )
            return int(cur.rowcount)

    def remove(self, h: Holding) -> None:
        with self._db.locked("removing a holding") as db:
            db.execute(
                "DELETE FROM holdings WHERE key=? AND version=? AND start=?",
                (h.key, h.version, h.start),
            )

    def all(self) -> list[Holding]:
        with self._db.locked("listing holdings") as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM holdings ORDER BY key, version, start"
            ).fetchall()
        return [_holding(r) for r in rows]

    def get(self, key: NameKey, version: int, start: int) -> Holding | None:
        """The holding of a range starting at ``start`` of one version, if any (without
        its lineage)."""
        with self._db.locked("reading a holding") as db:
            r = db.execute(
                "SELECT * FROM holdings WHERE key=? AND version=? AND start=?",
                (key, version, start),
            ).fetchone()
        return (
            None
            if r is None
            else Holding(_key(r[0]), r[1], _integrity(r[2]), r[3], r[4], r[5], r[6])
        )

    def of_key(self, key: NameKey) -> list[Holding]:
        with self._db.locked("listing holdings") as db:
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM holdings WHERE key=? ORDER BY version, start",
                (key,),
            ).fetchall()
        return [_holding(r) for r in rows]

    def covers(self, key: NameKey, version: int, start: int, end: int) -> bool:
        """Whether one holding of (key, version) covers segments start..end."""
        with self._db.locked("looking up a holding") as db:
            row = db.execute(
                "SELECT 1 FROM holdings WHERE key=? AND version=? AND start<=? AND end_>=?",
                (key, version, start, end),
            ).fetchone()
        return row is not None

    def close(self) -> None:
        self._db.close()


def _holding(r: Sequence[Any]) -> Holding:
    lineage = None
    if r[7] is not None and r[8] is not None:
        lineage = Lineage(bytes(r[7]), str(r[8]), int(r[1]), str(r[9] or ""))
    return Holding(_key(r[0]), r[1], _integrity(r[2]), r[3], r[4], r[5], r[6], lineage)


def _key(blob: bytes) -> NameKey:
    return NameKey(bytes(blob))


def _integrity(blob: bytes) -> IntegrityRoot:
    return IntegrityRoot(SegmentId(bytes(blob)))
