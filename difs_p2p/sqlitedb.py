"""One way to open and use a peer's sqlite databases.

The segment index, the record store and the holdings each keep one connection shared by
the event loop and worker threads, so each wraps it in a ``Database``: WAL journal,
``synchronous=NORMAL`` (a kill -9 loses no commit; a power loss may lose the last ones,
never corrupt the file), one lock, explicit transactions, and sqlite's errors translated
into the package's (``CapacityError`` for a full disk, ``StorageError`` otherwise) with
what was being done.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from difs_p2p.errors import CapacityError, StorageError

__all__ = ["Database"]


class Database:
    """A sqlite connection with its lock and error translation.

    ``path`` None opens an in-memory database. ``what`` names the database in errors
    ("the segment index"). ``schema`` is run on open (``CREATE ... IF NOT EXISTS``).
    """

    def __init__(self, path: Path | None, what: str, schema: str = "") -> None:
        self.what = what
        self.lock = threading.Lock()
        name = str(path) if path is not None else ":memory:"
        try:
            self.conn = sqlite3.connect(name, check_same_thread=False, isolation_level=None)
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {what} {name}: {exc}") from None
        try:
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")
            if schema:
                self.conn.executescript(schema)
        except sqlite3.Error as exc:
            self.conn.close()
            raise StorageError(f"cannot use {what} {name}: {exc}") from None

    def add_columns(self, table: str, columns: Mapping[str, str]) -> None:
        """Add the columns a table lacks (databases made by older versions, in place)."""
        with self.sql(f"upgrading table {table}"):
            have = {row[1] for row in self.conn.execute(f"PRAGMA table_info({table})")}
            for name, decl in columns.items():
                if name not in have:
                    self.conn.execute(f"ALTER TABLE {table} ADD COLUMN {name} {decl}")

    @contextlib.contextmanager
    def sql(self, doing: str) -> Iterator[sqlite3.Connection]:
        """Translate sqlite errors raised while ``doing`` something (no lock taken)."""
        try:
            yield self.conn
        except sqlite3.Error as exc:
            raise self.translate(exc, doing) from exc

    def locked(self, doing: str) -> _Locked:
        """Hold the lock and translate errors: ``with db.locked("adding refs") as c:``.

        A plain class, not a generator: every DHT request reads the record store through
        it, and two nested generator-based context managers cost about 15 us a call."""
        return _Locked(self, doing)

    def translate(self, exc: sqlite3.Error, doing: str) -> CapacityError | StorageError:
        """The package's error for a sqlite error raised while ``doing`` something."""
        if getattr(exc, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return CapacityError(f"no space left on the disk while {doing}")
        return StorageError(f"{self.what} failed while {doing}: {exc}")

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """``BEGIN IMMEDIATE`` ... ``COMMIT``, rolled back on any exception.

        The caller holds the lock (inside ``locked``).
        """
        self.conn.execute("BEGIN IMMEDIATE")
        try:
            yield self.conn
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
            raise

    def count(self, table: str) -> int:
        with self.locked(f"counting {table}") as conn:
            return int(conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])

    def close(self) -> None:
        with self.lock, contextlib.suppress(sqlite3.Error):
            self.conn.close()


class _Locked:
    """``Database.locked``: the lock held, sqlite errors translated on the way out."""

    __slots__ = ("db", "doing")

    def __init__(self, db: Database, doing: str) -> None:
        self.db = db
        self.doing = doing

    def __enter__(self) -> sqlite3.Connection:
        self.db.lock.acquire()
        return self.db.conn

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.db.lock.release()
        if isinstance(exc, sqlite3.Error):
            raise self.db.translate(exc, self.doing) from exc
