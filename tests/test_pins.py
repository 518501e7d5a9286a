"""Pinned publisher keys: parsing, longest-prefix lookup and the pin file on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from difs_p2p.errors import BadNameError, StorageError, UsageError
from difs_p2p.pins import PINS_VERSION, Pins, parse_key

KEY_A = bytes(range(32))
KEY_B = bytes(range(32, 64))


@pytest.mark.parametrize("text", [KEY_A.hex(), KEY_A.hex().upper(), f"  {KEY_A.hex()}\n"])
def test_parse_key(text: str) -> None:
    """A key is 64 hex digits, either case, surrounding spaces ignored."""
    assert parse_key(text) == KEY_A


@pytest.mark.parametrize("text", ["", "00" * 31, "00" * 33, "zz" * 32, "0" * 63])
def test_parse_key_refuses(text: str) -> None:
    """Anything but 32 bytes of hex is a UsageError."""
    with pytest.raises(UsageError, match="not a public key"):
        parse_key(text)


@pytest.mark.parametrize(
    ("name", "pin"),
    [
        ("/a.com", ("/a.com", KEY_A)),
        ("/a.com/", ("/a.com", KEY_A)),
        ("/a.com/x", ("/a.com", KEY_A)),
        ("/a.com/x/y", ("/a.com", KEY_A)),
        ("/a.com/izone.mp4", ("/a.com/izone.mp4", KEY_B)),
        ("/a.com/izone.mp4/part", ("/a.com/izone.mp4", KEY_B)),
        ("/a.company", None),
        ("/b.com/a.com", None),
        ("/other", None),
    ],
)
def test_longest_pinned_prefix_applies(name: str, pin: tuple[str, bytes] | None) -> None:
    """A name's own pin wins, else its longest pinned prefix, compared by components."""
    pins = Pins(None)
    pins.pin("/a.com", KEY_A)
    pins.pin("/a.com/izone.mp4/", KEY_B)
    assert pins.pinned(name) == pin


def test_pins_survive_a_reload(tmp_path: Path) -> None:
    """Pins are written to the file (normal form, sorted) and read back by a new Pins."""
    path = tmp_path / "home" / "pins.json"
    pins = Pins(path)
    assert pins.pinned("/a.com") is None and not path.exists()
    pins.pin("/b.com/", KEY_B)
    pins.pin("/a.com", KEY_A)
    assert json.loads(path.read_text()) == {
        "version": PINS_VERSION,
        "pins": {"/a.com": KEY_A.hex(), "/b.com": KEY_B.hex()},
    }
    assert not path.with_name("pins.json.tmp").exists()
    again = Pins(path)
    assert again.pinned("/b.com/x") == ("/b.com", KEY_B)
    again.pin("/a.com", KEY_B)  # re-pinning replaces
    assert Pins(path).pinned("/a.com") == ("/a.com", KEY_B)


def test_in_memory_pins_write_nothing(tmp_path: Path) -> None:
    """Pins without a path work in memory only."""
    pins = Pins(None)
    pins.pin("/a.com", KEY_A)
    assert pins.pinned("/a.com/x") == ("/a.com", KEY_A)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"pins": {}}',
        '{"version": 2, "pins": {}}',
        '{"version": 1}',
        '{"version": 1, "pins": []}',
        '{"version": 1, "pins": {"/a.com": "abc"}}',
        '{"version": 1, "pins": {"/a.com": 5}}',
        '{"version": 1, "pins": {"no-slash": "' + "00" * 32 + '"}}',
    ],
)
def test_damaged_pin_file_is_a_storage_error(tmp_path: Path, content: str) -> None:
    """A pin file that is not what Pins writes is refused as damaged, naming the file."""
    path = tmp_path / "pins.json"
    path.write_text(content)
    with pytest.raises(StorageError, match=r"pin file .* is damaged"):
        Pins(path)


def test_unwritable_pin_file_is_a_storage_error(tmp_path: Path) -> None:
    """A pin that cannot be saved is a StorageError."""
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    pins = Pins(blocker / "pins.json")
    with pytest.raises(StorageError, match="cannot write pin file"):
        pins.pin("/a.com", KEY_A)


def test_bad_names_are_refused() -> None:
    """Pinning or looking up a bad name raises BadNameError."""
    pins = Pins(None)
    with pytest.raises(BadNameError):
        pins.pin("a.com", KEY_A)
    with pytest.raises(BadNameError):
        pins.pinned("/a//b")
