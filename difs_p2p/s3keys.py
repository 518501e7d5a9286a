"""The S3 API's credentials and the buckets made through this peer, in sqlite.

An :class:`S3Key` is what an S3 client is configured with (an access key and its secret)
and whose publisher identity the peer signs with on its behalf: objects put through the
S3 API are published (and buckets claimed) under that Ed25519 key, so its owner can also
use it with ``difs`` (``difs s3-key create --identity ~/.difs/publisher.key`` reuses the
user's own key). The store is ``DATA/s3keys.sqlite3``, mode 0600 from its creation (the
secrets are kept in clear: SigV4 needs them to recompute signatures; SQLite gives its WAL
files the database file's mode). ``difs s3-key`` changes it while the peer runs: each
lookup reads the database, so a deleted key stops working at once.

Access keys are ``DIFS`` + 16 base32 characters (80 random bits), secrets 40 characters of
``A-Za-z0-9`` (238 random bits).
"""

from __future__ import annotations

import base64
import builtins
import os
import secrets
import string
import time
from pathlib import Path

from difs_p2p.classgen import valueclass
from difs_p2p.errors import StorageError, UsageError
from difs_p2p.identity import Identity
from difs_p2p.sqlitedb import Database

__all__ = ["KeyStore", "S3Key", "new_access_key", "new_secret"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS s3keys(
    access_key TEXT PRIMARY KEY, secret TEXT NOT NULL, identity TEXT NOT NULL,
    name TEXT NOT NULL, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS s3buckets(
    access_key TEXT NOT NULL, bucket TEXT NOT NULL, created REAL NOT NULL,
    PRIMARY KEY(access_key, bucket));
"""

_SECRET_ALPHABET = string.ascii_letters + string.digits
MAX_NAME = 200
"""The longest key name (a label for people: ``--name laptop-rclone``)."""


@valueclass
class S3Key:
    """An S3 credential: its access key and secret, the publisher identity the peer signs
    with for it, a name for people, and when it was made (seconds since the epoch)."""

    access_key: str
    secret: str
    identity: Identity
    name: str
    created: float

    def __repr__(self) -> str:  # never the secret nor the private key in logs
        return f"S3Key({self.access_key!r}, name={self.name!r}, publisher={self.publisher})"

    @property
    def publisher(self) -> str:
        """The publisher's public key, hex."""
        return self.identity.public_key.hex()


def new_access_key() -> str:
    """A fresh access key: ``DIFS`` and 16 base32 characters (80 random bits)."""
    return "DIFS" + base64.b32encode(secrets.token_bytes(10)).decode()


def new_secret() -> str:
    """A fresh secret: 40 characters of ``A-Za-z0-9``."""
    return "".join(secrets.choice(_SECRET_ALPHABET) for _ in range(40))


def _private_file(path: Path) -> None:
    """Create ``path`` with mode 0600 if it does not exist; make it 0600 if it does."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise StorageError(f"cannot create {path}: {exc.strerror or exc}") from None


class KeyStore:
    """The S3 credentials of a peer's data directory (``DATA/s3keys.sqlite3``)."""

    def __init__(self, path: Path) -> None:
        _private_file(path)
        self.path = path
        self._db = Database(path, "the S3 key store", _SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> KeyStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def create(
        self, name: str = "", identity: Identity | None = None, now: float | None = None
    ) -> S3Key:
        """A new key named ``name``, signing as ``identity`` (a new one when None)."""
        if len(name) > MAX_NAME or any(ch in name for ch in "\n\r\t\0"):
            raise UsageError(f"an S3 key name is one line of at most {MAX_NAME} characters")
        key = S3Key(
            access_key=new_access_key(),
            secret=new_secret(),
            identity=identity if identity is not None else Identity.generate(),
            name=name,
            created=time.time() if now is None else now,
        )
        seed = key.identity.private_key.private_bytes_raw().hex()
        with self._db.locked("adding an S3 key") as conn, self._db.transaction():
            conn.execute(
                "INSERT INTO s3keys(access_key, secret, identity, name, created)"
                " VALUES (?, ?, ?, ?, ?)",
                (key.access_key, key.secret, seed, key.name, key.created),
            )
        return key

    def get(self, access_key: str) -> S3Key | None:
        """The key ``access_key``, None if there is no such key."""
        with self._db.locked("reading an S3 key") as conn:
            row = conn.execute(
                "SELECT access_key, secret, identity, name, created FROM s3keys"
                " WHERE access_key = ?",
                (access_key,),
            ).fetchone()
        return _key(row) if row is not None else None

    def secret_of(self, access_key: str) -> str | None:
        """``access_key``'s secret (what ``s3auth.authenticate`` asks), None if unknown."""
        key = self.get(access_key)
        return key.secret if key is not None else None

    def list(self) -> list[S3Key]:
        """Every key, oldest first."""
        with self._db.locked("listing S3 keys") as conn:
            rows = conn.execute(
                "SELECT access_key, secret, identity, name, created FROM s3keys"
                " ORDER BY created, access_key"
            ).fetchall()
        return [_key(row) for row in rows]

    def delete(self, access_key: str) -> bool:
        """Forget ``access_key`` and its buckets' records; False if there was no such key.
        What was published with its identity stays published."""
        with self._db.locked("deleting an S3 key") as conn, self._db.transaction():
            gone = conn.execute("DELETE FROM s3keys WHERE access_key = ?", (access_key,))
            conn.execute("DELETE FROM s3buckets WHERE access_key = ?", (access_key,))
            return gone.rowcount > 0

    def add_bucket(self, access_key: str, bucket: str, now: float | None = None) -> bool:
        """Record that ``access_key`` made ``bucket`` through this peer; False if it was
        recorded already (its creation time stays)."""
        created = time.time() if now is None else now
        with self._db.locked("recording a bucket") as conn, self._db.transaction():
            known = conn.execute("SELECT 1 FROM s3keys WHERE access_key = ?", (access_key,))
            if known.fetchone() is None:
                raise UsageError(f"no S3 key {access_key}")
            cur = conn.execute(
                "INSERT OR IGNORE INTO s3buckets(access_key, bucket, created) VALUES (?, ?, ?)",
                (access_key, bucket, created),
            )
            return cur.rowcount > 0

    def remove_bucket(self, access_key: str, bucket: str) -> bool:
        """Forget that ``access_key`` made ``bucket``; False if it was not recorded."""
        with self._db.locked("forgetting a bucket") as conn, self._db.transaction():
            cur = conn.execute(
                "DELETE FROM s3buckets WHERE access_key = ? AND bucket = ?", (access_key, bucket)
            )
            return cur.rowcount > 0

    def buckets(self, access_key: str) -> builtins.list[str]:
        """The buckets ``access_key`` made through this peer, by name (what ListBuckets
        answers; their creation dates are their claims')."""
        with self._db.locked("listing buckets") as conn:
            rows = conn.execute(
                "SELECT bucket FROM s3buckets WHERE access_key = ? ORDER BY bucket",
                (access_key,),
            ).fetchall()
        return [str(bucket) for (bucket,) in rows]


def _key(row: tuple[str, str, str, str, float]) -> S3Key:
    access_key, secret, seed, name, created = row
    try:
        identity = Identity.from_seed(bytes.fromhex(seed))
    except ValueError:
        raise StorageError(f"the S3 key store has a damaged identity for {access_key}") from None
    return S3Key(access_key, secret, identity, name, float(created))
