"""The CLI's shared rules: exit codes and their JSON names, and which peer and which
control token a command uses."""

from __future__ import annotations

from pathlib import Path

import pytest

from difs_p2p import errors
from difs_p2p.cli_common import EXIT_CODES, EXIT_NAMES, exit_code, resolve_peer, resolve_token


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.BadNameError("x"), 2),
        (errors.UsageError("x"), 2),
        (errors.DeletedError("x"), 4),
        (errors.NotFoundError("x"), 3),
        (errors.IntegrityError("x"), 5),
        (errors.AlreadyExistsError("x"), 7),
        (errors.PermissionDeniedError("x"), 6),
        (errors.CapacityError("x"), 8),
        (errors.BusyError("x"), 8),
        (errors.DifsTimeoutError("x"), 10),
        (errors.NetworkError("x"), 9),
        (errors.StorageError("x"), 11),
        (errors.WireError("x"), 12),
        (errors.PeerError("x"), 12),
        (errors.DifsError("x"), 1),
    ],
)
def test_each_error_class_has_its_exit_code(exc: errors.DifsError, code: int) -> None:
    """The most specific class in EXIT_CODES decides; anything else is 1 (unexpected)."""
    assert exit_code(exc) == code


def test_every_exit_code_has_a_json_name() -> None:
    """A --json error object names every code the CLI can exit with."""
    # 13 is no error class: leave exits 13 when its drain could not hand everything over
    assert {code for _, code in EXIT_CODES} | {1, 13, 130, 143} == set(EXIT_NAMES)


def test_resolve_peer_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--peer, else $DIFS_PEER, else the local peer's address file, else a network error."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    monkeypatch.delenv("DIFS_PEER", raising=False)
    with pytest.raises(errors.NetworkError, match="no local peer"):
        resolve_peer(None)
    (tmp_path / "peer").mkdir()
    (tmp_path / "peer" / "address").write_text("127.0.0.1:4000\n")
    assert resolve_peer(None) == ("127.0.0.1", 4000)
    monkeypatch.setenv("DIFS_PEER", "127.0.0.1:5000")
    assert resolve_peer(None) == ("127.0.0.1", 5000)
    assert resolve_peer("localhost:6000") == ("127.0.0.1", 6000)
    with pytest.raises(errors.UsageError):
        resolve_peer("nonsense")


def test_resolve_token_uses_the_local_token_only_for_the_local_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local peer's token is sent to the local peer only; another needs --token-file."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    monkeypatch.delenv("DIFS_PEER", raising=False)
    monkeypatch.delenv("DIFS_TOKEN_FILE", raising=False)
    local = tmp_path / "peer"
    local.mkdir()
    (local / "address").write_text("127.0.0.1:4000")
    (local / "control.token").write_text("11" * 32)
    other = tmp_path / "other.token"
    other.write_text("22" * 32)
    assert resolve_token(None, None, ("127.0.0.1", 4000)) == b"\x11" * 32
    assert resolve_token("127.0.0.1:4000", None, ("127.0.0.1", 4000)) == b"\x11" * 32
    with pytest.raises(errors.PermissionDeniedError, match="--token-file"):
        resolve_token("127.0.0.1:5000", None, ("127.0.0.1", 5000))
    assert resolve_token("127.0.0.1:5000", other, ("127.0.0.1", 5000)) == b"\x22" * 32
    monkeypatch.setenv("DIFS_TOKEN_FILE", str(other))
    assert resolve_token(None, None, ("127.0.0.1", 4000)) == b"\x22" * 32
    with pytest.raises(errors.PermissionDeniedError, match=r"nothing\.token not found"):
        resolve_token(None, tmp_path / "nothing.token", ("127.0.0.1", 4000))
