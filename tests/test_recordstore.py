"""The DHT's record store: records, entry sets, quotas per source and signer, expiry,
persistence and what the policy refuses, with a small policy whose bytes spell its facts."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path

import pytest

from difs_p2p.errors import StorageError
from difs_p2p.recordstore import EntryFacts, RecordStore, StoreResult

KEY = b"k" * 20
OTHER_KEY = b"o" * 20
TTL = 100.0


def record(version: int, owner: bytes = b"A", body: bytes = b"") -> bytes:
    """A record: a version byte, an owner byte and any body (version 0 is invalid)."""
    return bytes([version]) + owner + body


def entry(
    ident: int, *, signer: int = 0, version: int = 1, fresh: int = 0, history: bool = False
) -> bytes:
    """An entry: b"E", its identity, signer (0: none), version, freshness, history flag."""
    return b"E" + bytes([ident, signer, version, fresh, int(history)])


class SpelledPolicy:
    """Records of one owner supersede by version; an entry needs a record unless it is
    history, and is refused outright when its identity is 255."""

    def record_rank(self, key: bytes, value: bytes, now: float) -> tuple[int, ...] | None:
        return (value[0],) if len(value) >= 2 and value[0] > 0 else None

    def may_replace(self, key: bytes, new: bytes, current: bytes, now: float) -> bool:
        return new[1] == current[1] and new[0] > current[0]

    def entry_identity(self, key: bytes, entry: bytes, now: float) -> tuple[bytes, int] | None:
        return (entry[1:2], entry[4]) if len(entry) == 6 and entry[0:1] == b"E" else None

    def entry_admission(
        self, key: bytes, entry: bytes, record: bytes | None, history: Sequence[bytes], now: float
    ) -> EntryFacts | str:
        if entry[1] == 255:
            return "refused by the policy"
        if record is None and not entry[5]:
            return "no record under this key"
        return EntryFacts(bytes([entry[2]]) if entry[2] else b"", entry[3], bool(entry[5]))

    def best_records(self, key: bytes, values: Sequence[bytes], now: float) -> list[bytes]:
        return sorted(values, reverse=True)


def open_store(path: Path | None = None, **caps: float) -> RecordStore:
    return RecordStore(
        path,
        SpelledPolicy(),
        ttl=TTL,
        max_records=int(caps.get("max_records", 100)),
        max_entries_per_key=int(caps.get("max_entries_per_key", 100)),
        max_entries=int(caps.get("max_entries", 1000)),
        max_entries_per_signer=int(caps.get("max_entries_per_signer", 100)),
        source_share=caps.get("source_share", 0.25),
    )


# -- records -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "stored", "new", "now", "result", "after"),
    [
        (b"short", None, record(1), 0.0, StoreResult(False, "key is not 20 bytes"), None),
        (KEY, None, record(0), 0.0, StoreResult(False, "invalid record"), None),
        (KEY, None, record(1), 0.0, StoreResult(True, "stored"), record(1)),
        (KEY, record(1), record(1), 50.0, StoreResult(True, "refreshed"), record(1)),
        (KEY, record(1), record(2), 50.0, StoreResult(True, "stored"), record(2)),
        (
            KEY,
            record(2),
            record(1),
            50.0,
            StoreResult(False, "stored record is newer or owned by another key"),
            record(2),
        ),
        (
            KEY,
            record(1),
            record(5, b"B"),
            50.0,
            StoreResult(False, "stored record is newer or owned by another key"),
            record(1),
        ),
        # an expired record no longer counts: anything valid takes its place
        (KEY, record(2), record(1, b"B"), 150.0, StoreResult(True, "stored"), record(1, b"B")),
    ],
)
def test_what_replaces_a_record(
    key: bytes,
    stored: bytes | None,
    new: bytes,
    now: float,
    result: StoreResult,
    after: bytes | None,
) -> None:
    """A record is stored if valid, and replaces a live one only as the policy allows."""
    s = open_store()
    if stored is not None:
        assert s.put(key, stored, 0.0).accepted
    assert s.put(key, new, now) == result
    assert s.get(KEY, now) == after
    s.close()


def test_a_refresh_restarts_the_ttl() -> None:
    """Storing the same record again keeps it alive a TTL from then."""
    s = open_store()
    s.put(KEY, record(1), 0.0)
    s.put(KEY, record(1), 90.0)
    assert s.get(KEY, 150.0) == record(1)
    assert s.get(KEY, 191.0) is None
    s.close()


def test_the_record_cap_counts_live_records() -> None:
    """A full store refuses a new key until records expire; updates always fit."""
    s = open_store(max_records=2)
    assert s.put(KEY, record(1), 0.0).accepted
    assert s.put(OTHER_KEY, record(1), 50.0).accepted
    third = b"t" * 20
    assert s.put(third, record(1), 60.0) == StoreResult(False, "record store is full")
    assert s.put(KEY, record(2), 60.0).accepted
    assert s.put(third, record(1), 155.0).accepted  # OTHER_KEY expired at 150
    assert s.counts() == (2, 0)
    assert s.get(OTHER_KEY, 155.0) is None and s.get(KEY, 155.0) == record(2)
    s.close()


def test_a_source_fills_only_its_share_of_the_records() -> None:
    """A source takes at most its share of new keys; this peer's own writes are not metered,
    and an update from elsewhere leaves the key counted against its first source."""
    s = open_store(max_records=8)  # a source may take 2
    keys = [bytes([i]) * 20 for i in range(6)]
    assert [s.put(k, record(1), 0.0, "10.0.0.1").accepted for k in keys[:3]] == [
        True,
        True,
        False,
    ]
    assert s.put(keys[2], record(1), 0.0, "10.0.0.1").reason == (
        "this source's share of the records is full"
    )
    assert s.put(keys[0], record(2), 1.0, "10.0.0.2").accepted
    assert s.put(keys[3], record(1), 1.0, "10.0.0.2").accepted
    assert s.put(keys[4], record(1), 1.0, "10.0.0.2").accepted  # 2 is still only at 2 new keys
    assert s.put(keys[5], record(1), 1.0, "10.0.0.2").accepted is False
    assert all(s.put(bytes([40 + i]) * 20, record(1), 1.0).accepted for i in range(3))
    assert s.put(keys[2], record(1), 150.0, "10.0.0.1").accepted  # its keys expired
    s.close()


def test_items_and_keys_list_only_live_records() -> None:
    """items() is a snapshot of the live records; keys() also names keys with entries."""
    s = open_store()
    assert s.keys(0.0) == []
    s.put(KEY, record(1), 0.0)
    s.put(OTHER_KEY, record(3), 60.0)
    s.add_entry(b"h" * 20, entry(1, history=True), 60.0)
    assert dict(s.items(120.0)) == {OTHER_KEY: record(3)}
    live = s.items(50.0)
    first = next(live)
    s.put(b"n" * 20, record(1), 50.0)  # does not disturb an iteration in progress
    assert dict([first, *live]) == {KEY: record(1), OTHER_KEY: record(3)}
    assert sorted(s.keys(120.0)) == sorted([OTHER_KEY, b"h" * 20, b"n" * 20])
    s.close()


# -- entry sets --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "raw", "reason"),
    [
        (b"short", entry(1), "key is not 20 bytes"),
        (KEY, b"junk", "invalid entry"),
        (KEY, entry(255), "refused by the policy"),
        (OTHER_KEY, entry(1), "no record under this key"),
    ],
)
def test_entries_the_policy_does_not_admit_are_refused(key: bytes, raw: bytes, reason: str) -> None:
    """An invalid entry or one the policy refuses is not stored, and the reason is given."""
    s = open_store()
    s.put(KEY, record(1), 0.0)
    assert s.add_entry(key, raw, 0.0) == StoreResult(False, reason)
    assert s.entries(key, 0.0) == [] and s.counts() == (1, 0)
    s.close()


def test_a_fresher_entry_replaces_the_one_with_its_identity() -> None:
    """One entry per identity: a fresher (or as fresh) one replaces it, a staler one is refused."""
    s = open_store()
    s.put(KEY, record(1), 0.0)
    assert s.add_entry(KEY, entry(1, fresh=5), 0.0).accepted
    assert s.add_entry(KEY, entry(1, fresh=4), 0.0) == StoreResult(
        False, "a fresher entry is stored"
    )
    assert s.add_entry(KEY, entry(1, fresh=5, signer=9), 0.0).accepted
    assert s.add_entry(KEY, entry(1, fresh=7), 0.0).accepted
    assert s.add_entry(KEY, entry(2), 0.0).accepted
    assert s.entries(KEY, 0.0) == [entry(1, fresh=7), entry(2)]  # by identity
    assert s.counts() == (1, 2)
    s.close()


def test_one_signer_holds_at_most_its_cap_per_key() -> None:
    """A signer's entries stop at max_entries_per_signer per key; unsigned ones are not capped."""
    s = open_store(max_entries_per_signer=2)
    s.put(KEY, record(1), 0.0)
    s.put(OTHER_KEY, record(1), 0.0)
    took = [s.add_entry(KEY, entry(i, signer=7), 0.0).accepted for i in range(3)]
    assert took == [True, True, False]
    assert s.add_entry(KEY, entry(2, signer=7), 0.0).reason == (
        "this signer's share of the entry set is full"
    )
    assert s.add_entry(OTHER_KEY, entry(0, signer=7), 0.0).accepted  # per key
    assert all(s.add_entry(KEY, entry(10 + i), 0.0).accepted for i in range(3))
    s.close()


def test_a_source_fills_three_quarters_of_a_key() -> None:
    """One source takes at most 3/4 of a key's set, unless its entry is for a newer version
    than one of its own, which then gives way."""
    s = open_store(max_entries_per_key=4)
    s.put(KEY, record(2), 0.0)
    took = [s.add_entry(KEY, entry(i, version=1), 0.0, "10.0.0.1").accepted for i in range(4)]
    assert took == [True, True, True, False]
    assert s.add_entry(KEY, entry(9, version=1), 0.0, "10.0.0.1").reason == (
        "this source's share of the entry set is full"
    )
    assert s.add_entry(KEY, entry(5, version=2), 0.0, "10.0.0.1").accepted
    assert len(s.entries(KEY, 0.0)) == 3
    assert s.add_entry(KEY, entry(6, version=1), 0.0, "10.0.0.2").accepted
    s.close()


def test_a_full_set_makes_room_for_newer_versions_only() -> None:
    """A full set drops expired entries first, then the stalest entry of the oldest version
    below a newer one's; history stays, and an entry of the oldest version waits."""
    s = open_store(max_entries_per_key=3)
    s.put(KEY, record(3), 0.0)
    assert s.add_entry(KEY, entry(1, version=1, history=True), 0.0).accepted
    assert s.add_entry(KEY, entry(2, version=1, fresh=9), 0.0).accepted
    assert s.add_entry(KEY, entry(3, version=1, fresh=2), 10.0).accepted
    assert s.add_entry(KEY, entry(4, version=1), 10.0) == StoreResult(False, "entry set is full")
    assert s.add_entry(KEY, entry(5, version=2), 10.0).accepted  # displaces ident 3 (staler)
    assert s.entries(KEY, 10.0) == [
        entry(1, version=1, history=True),
        entry(2, version=1, fresh=9),
        entry(5, version=2),
    ]
    assert s.add_entry(KEY, entry(6, version=2), 10.0).accepted  # displaces ident 2
    assert not s.add_entry(KEY, entry(7, version=2), 10.0).accepted  # only history is older
    # ident 1 expires at 100: its place is free again
    assert s.put(KEY, record(3), 105.0).reason == "refreshed"
    assert s.add_entry(KEY, entry(7, version=2), 105.0).accepted
    assert s.counts() == (1, 3)
    s.close()


def test_the_overall_entry_cap_holds_across_keys() -> None:
    """max_entries bounds the entries of every key together, until some expire."""
    s = open_store(max_entries=2)
    s.put(KEY, record(1), 0.0)
    s.put(OTHER_KEY, record(1), 50.0)
    assert s.add_entry(KEY, entry(1), 0.0).accepted
    assert s.add_entry(OTHER_KEY, entry(1), 50.0).accepted
    assert s.add_entry(OTHER_KEY, entry(2), 50.0) == StoreResult(False, "entry store is full")
    assert s.add_entry(OTHER_KEY, entry(2), 120.0).accepted  # KEY's entry expired at 100
    assert s.counts() == (1, 2)
    s.close()


def test_removed_and_expired_entries_are_gone_and_uncounted() -> None:
    """remove_entries drops entries by identity; expire drops what the TTL outlived."""
    s = open_store()
    s.put(KEY, record(1), 0.0)
    for i in range(4):
        s.add_entry(KEY, entry(i), 10.0 * i)
    s.remove_entries(KEY, [bytes([1]), bytes([3]), bytes([99])])
    assert s.entries(KEY, 10.0) == [entry(0), entry(2)]
    assert s.entries(KEY, 105.0) == [entry(2)]  # entry 0 is past its TTL, not yet expired
    assert s.counts() == (1, 2)
    assert s.expire(105.0) == 2
    assert s.counts() == (0, 1)
    s.close()


# -- on disk -----------------------------------------------------------------------------------


def test_records_entries_and_quotas_survive_a_reopen(tmp_path: Path) -> None:
    """What was stored is there after a reopen, and still counts against its source."""
    path = tmp_path / "records.sqlite3"
    s = open_store(path, max_records=8)
    s.put(KEY, record(1), 0.0, "10.0.0.1")
    s.put(OTHER_KEY, record(1), 0.0, "10.0.0.1")
    s.add_entry(KEY, entry(1, signer=3), 0.0, "10.0.0.1")
    s.close()
    again = open_store(path, max_records=8)
    assert again.get(KEY, 1.0) == record(1)
    assert again.entries(KEY, 1.0) == [entry(1, signer=3)]
    assert again.counts() == (2, 1)
    assert sorted(again.keys(1.0)) == sorted([KEY, OTHER_KEY])
    assert again.put(b"t" * 20, record(1), 1.0, "10.0.0.1").reason == (
        "this source's share of the records is full"
    )
    again.close()


def test_a_database_from_before_quotas_opens_in_place(tmp_path: Path) -> None:
    """Tables without the quota columns gain them; old rows count as this peer's own."""
    path = tmp_path / "records.sqlite3"
    old = sqlite3.connect(path)
    old.executescript(
        """
        CREATE TABLE records(k BLOB PRIMARY KEY, v BLOB NOT NULL, stored REAL NOT NULL);
        CREATE TABLE entries(
            k BLOB NOT NULL, ident BLOB NOT NULL, fresh INTEGER NOT NULL,
            e BLOB NOT NULL, stored REAL NOT NULL, PRIMARY KEY(k, ident));
        """
    )
    old.execute("INSERT INTO records VALUES(?,?,?)", (KEY, record(1), 0.0))
    old.execute("INSERT INTO entries VALUES(?,?,?,?,?)", (KEY, b"\x01", 0, entry(1), 0.0))
    old.commit()
    old.close()
    s = open_store(path, max_records=4)  # a source may take 1 new key
    assert s.get(KEY, 0.0) == record(1) and s.entries(KEY, 0.0) == [entry(1)]
    assert s.counts() == (1, 1)
    assert s.put(OTHER_KEY, record(1), 0.0, "10.0.0.1").accepted  # the old row is not its
    s.close()
    columns = {
        table: {row[1] for row in sqlite3.connect(path).execute(f"PRAGMA table_info({table})")}
        for table in ("records", "entries")
    }
    assert {"src"} <= columns["records"]
    assert {"src", "signer", "ver", "hist"} <= columns["entries"]


def test_a_path_that_is_not_a_database_is_a_storage_error(tmp_path: Path) -> None:
    """A directory or a file that is not sqlite is refused with a StorageError."""
    with pytest.raises(StorageError, match="record database"):
        open_store(tmp_path)
    junk = tmp_path / "junk.sqlite3"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(StorageError, match="record database"):
        open_store(junk)
