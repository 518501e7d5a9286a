"""The S3 credential store (KeyStore) and ``difs s3-key create|list|delete``."""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import time
from pathlib import Path

import pytest

from difs_p2p import errors
from difs_p2p.identity import Identity, load_or_create
from difs_p2p.s3auth import SignedRequest, authenticate
from difs_p2p.s3errors import S3Error
from difs_p2p.s3keys import KeyStore, new_access_key, new_secret
from tests.helpers import BIN, start_peer_process


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_create_get_list_delete(tmp_path: Path) -> None:
    """A created key is found by its access key and listed; deleted, it is gone."""
    with KeyStore(tmp_path / "s3keys.sqlite3") as store:
        first = store.create("laptop", now=100.0)
        second = store.create(now=200.0)
        assert re.fullmatch(r"DIFS[A-Z2-7]{16}", first.access_key)
        assert re.fullmatch(r"[A-Za-z0-9]{40}", first.secret)
        got = store.get(first.access_key)
        assert got is not None
        assert (got.secret, got.name, got.created) == (first.secret, "laptop", 100.0)
        assert got.identity.public_key == first.identity.public_key
        assert first.identity.public_key != second.identity.public_key
        assert [k.access_key for k in store.list()] == [first.access_key, second.access_key]
        assert store.secret_of(first.access_key) == first.secret
        assert store.delete(first.access_key) is True
        assert store.delete(first.access_key) is False
        assert store.get(first.access_key) is None
        assert store.secret_of(first.access_key) is None
        assert [k.access_key for k in store.list()] == [second.access_key]


def test_keys_survive_reopening_and_keep_a_given_identity(tmp_path: Path) -> None:
    """Keys are on disk: a new KeyStore on the file has them, with the identity given."""
    me = Identity.generate()
    with KeyStore(tmp_path / "k.sqlite3") as store:
        key = store.create("mine", me)
    with KeyStore(tmp_path / "k.sqlite3") as again:
        got = again.get(key.access_key)
    assert got is not None
    assert got.identity.public_key == me.public_key
    assert got.identity.sign(b"m") == me.sign(b"m")


def test_store_file_is_private(tmp_path: Path) -> None:
    """The store is created with mode 0600, and made 0600 again if it was opened up."""
    path = tmp_path / "data" / "s3keys.sqlite3"
    with KeyStore(path) as store:
        store.create()
    assert mode(path) == 0o600
    for wal in path.parent.glob("s3keys.sqlite3-*"):
        assert mode(wal) == 0o600, wal
    path.chmod(0o644)
    KeyStore(path).close()
    assert mode(path) == 0o600


def test_buckets_per_key(tmp_path: Path) -> None:
    """Buckets are recorded per key, once, listed by name, removed, and go with their key."""
    with KeyStore(tmp_path / "k.sqlite3") as store:
        a = store.create()
        b = store.create()
        assert store.add_bucket(a.access_key, "z.com", now=5.0) is True
        assert store.add_bucket(a.access_key, "a.com", now=6.0) is True
        assert store.add_bucket(a.access_key, "a.com", now=7.0) is False
        assert store.add_bucket(b.access_key, "b.com", now=8.0) is True
        assert store.buckets(a.access_key) == ["a.com", "z.com"]
        assert store.buckets(b.access_key) == ["b.com"]
        assert store.remove_bucket(a.access_key, "z.com") is True
        assert store.remove_bucket(a.access_key, "z.com") is False
        assert store.buckets(a.access_key) == ["a.com"]
        with pytest.raises(errors.UsageError, match="no S3 key"):
            store.add_bucket("DIFSNOSUCHKEYAAAAAAA", "x.com")
        store.delete(a.access_key)
        assert store.buckets(a.access_key) == []


@pytest.mark.parametrize("name", ["a\nb", "x" * 201, "nul\0"])
def test_bad_names_are_refused(tmp_path: Path, name: str) -> None:
    """A key name is one line of at most 200 characters."""
    with KeyStore(tmp_path / "k.sqlite3") as store, pytest.raises(errors.UsageError):
        store.create(name)


def test_access_keys_and_secrets_are_fresh() -> None:
    """Access keys and secrets do not repeat."""
    assert len({new_access_key() for _ in range(200)}) == 200
    assert len({new_secret() for _ in range(200)}) == 200


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    """A key's repr (what logs would show) has neither the secret nor the private key."""
    with KeyStore(tmp_path / "k.sqlite3") as store:
        key = store.create("n")
    seed = key.identity.private_key.private_bytes_raw().hex()
    assert key.secret not in repr(key)
    assert seed not in repr(key)
    assert key.access_key in repr(key)


def test_a_deleted_key_stops_authenticating_at_once(tmp_path: Path) -> None:
    """The store's secret_of is what authentication asks: a key deleted meanwhile (by
    another connection, as difs s3-key delete) is an InvalidAccessKeyId right away."""
    path = tmp_path / "k.sqlite3"
    with KeyStore(path) as peer_side, KeyStore(path) as cli_side:
        key = cli_side.create()
        assert peer_side.secret_of(key.access_key) == key.secret
        cli_side.delete(key.access_key)
        req = SignedRequest("GET", "/", [], {"authorization": f"AWS {key.access_key}:c2lnbmF0dXJl"})
        with pytest.raises(S3Error, match="InvalidAccessKeyId"):
            authenticate(req, peer_side.secret_of, time.time())


# -- difs s3-key: real processes ------------------------------------------------------------


def difs(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "difs"), *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, DIFS_HOME=str(home)),
        check=False,
    )


def test_cli_create_list_delete(tmp_path: Path) -> None:
    """difs s3-key create prints the secret once; list never shows it; delete removes the
    key (a second delete is exit 3); the default store is $DIFS_HOME/peer's."""
    made = difs(tmp_path, "s3-key", "create", "--name", "rclone", "--json")
    assert made.returncode == 0, made.stderr
    key = json.loads(made.stdout)
    assert set(key) == {"access_key", "secret", "name", "publisher", "created"}
    assert key["name"] == "rclone"
    store = tmp_path / "peer" / "s3keys.sqlite3"
    assert mode(store) == 0o600
    with KeyStore(store) as opened:
        assert opened.secret_of(key["access_key"]) == key["secret"]
    text = difs(tmp_path, "s3-key", "create")
    assert text.returncode == 0, text.stderr
    assert re.search(r"access key: DIFS[A-Z2-7]{16}\nsecret: +[A-Za-z0-9]{40}\n", text.stdout)
    listed = difs(tmp_path, "s3-key", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)
    assert rows[0]["access_key"] == key["access_key"]
    assert len(rows) == 2
    plain = difs(tmp_path, "s3-key", "list")
    assert key["secret"] not in listed.stdout + plain.stdout
    assert key["access_key"] in plain.stdout
    gone = difs(tmp_path, "s3-key", "delete", key["access_key"])
    assert gone.returncode == 0, gone.stderr
    again = difs(tmp_path, "s3-key", "delete", key["access_key"])
    assert again.returncode == 3
    assert "no S3 key" in again.stderr


def test_cli_identity_and_data_options(tmp_path: Path) -> None:
    """--identity signs as an existing publisher key file; --data picks the store; a
    missing key file is a usage error (exit 2)."""
    key_file = tmp_path / "publisher.key"
    me = load_or_create(key_file)
    data = tmp_path / "elsewhere"
    made = difs(
        tmp_path, "s3-key", "create", "--identity", str(key_file), "--data", str(data), "--json"
    )
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["publisher"] == me.public_key.hex()
    assert (data / "s3keys.sqlite3").exists()
    assert not (tmp_path / "peer").exists()
    missing = difs(tmp_path, "s3-key", "create", "--identity", str(tmp_path / "nope.key"))
    assert missing.returncode == 2
    assert "does not exist" in missing.stderr


def test_cli_works_while_the_peer_runs(tmp_path: Path) -> None:
    """difs s3-key changes the store of a peer that is running on the data directory."""
    data = tmp_path / "peer"
    proc, _ = start_peer_process(data, "--port", "0", "--listen", "127.0.0.1")
    try:
        made = difs(tmp_path, "s3-key", "create", "--json")
        assert made.returncode == 0, made.stderr
        listed = json.loads(difs(tmp_path, "s3-key", "list", "--json").stdout)
        assert [row["access_key"] for row in listed] == [json.loads(made.stdout)["access_key"]]
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_s3_key_commands_have_help(tmp_path: Path) -> None:
    """Each difs s3-key command answers --help with a description and an example."""
    for command in ("create", "list", "delete"):
        out = difs(tmp_path, "s3-key", command, "--help")
        assert out.returncode == 0 and "Example" in out.stdout, command
