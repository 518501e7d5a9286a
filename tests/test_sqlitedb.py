"""Database: pragmas, transactions, column upgrades and error translation."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from difs_p2p.errors import CapacityError, StorageError
from difs_p2p.sqlitedb import Database


def test_wal_and_schema(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.sqlite3", "the test db", "CREATE TABLE IF NOT EXISTS t(a);")
    with db.locked("reading") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        conn.execute("INSERT INTO t VALUES (1)")
    assert db.count("t") == 1
    db.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    db = Database(tmp_path / "x.sqlite3", "the test db", "CREATE TABLE IF NOT EXISTS t(a);")
    with pytest.raises(RuntimeError), db.locked("writing"), db.transaction() as conn:
        conn.execute("INSERT INTO t VALUES (1)")
        raise RuntimeError("stop")
    assert db.count("t") == 0


def test_add_columns_is_idempotent() -> None:
    db = Database(None, "the test db", "CREATE TABLE t(a);")
    db.add_columns("t", {"b": "INTEGER NOT NULL DEFAULT 0"})
    db.add_columns("t", {"b": "INTEGER NOT NULL DEFAULT 0"})
    with db.locked("reading") as conn:
        assert [r[1] for r in conn.execute("PRAGMA table_info(t)")] == ["a", "b"]


def test_errors_are_translated() -> None:
    db = Database(None, "the test db")
    failing = pytest.raises(StorageError, match="the test db failed while selecting")
    with failing, db.locked("selecting") as conn:
        conn.execute("SELECT * FROM missing")
    full = sqlite3.OperationalError("disk full")
    full.sqlite_errorcode = sqlite3.SQLITE_FULL
    with pytest.raises(CapacityError, match="no space left"), db.sql("writing"):
        raise full


def test_unopenable_path_is_a_storage_error(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="cannot open"):
        Database(tmp_path / "missing-dir" / "x.sqlite3", "the test db")


def test_the_lock_is_released_after_an_error() -> None:
    """A failed statement inside ``locked`` leaves the lock free for the next caller."""
    db = Database(None, "the test db", "CREATE TABLE t(a);")
    with pytest.raises(StorageError), db.locked("selecting") as conn:
        conn.execute("SELECT * FROM missing")
    assert not db.lock.locked()
    with pytest.raises(RuntimeError), db.locked("working"):
        raise RuntimeError("not sqlite")  # other errors pass through untranslated
    assert not db.lock.locked()
    with db.locked("inserting") as conn:
        conn.execute("INSERT INTO t VALUES (1)")
    assert db.count("t") == 1
