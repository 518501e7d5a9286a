"""The client commands' option parsing: segment sizes, byte ranges, and pins under --trust."""

from __future__ import annotations

from pathlib import Path

import pytest

from difs_p2p import errors
from difs_p2p.cli_client import parse_byte_range, parse_segment_size, pins_for
from difs_p2p.ranges import ByteRange

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("text", "size"),
    [("4KiB", 4096), ("1MiB", MiB), ("16MiB", 16 * MiB), ("8192", 8192)],
)
def test_segment_size_accepts_multiples_of_4k(text: str, size: int) -> None:
    """--segment-size takes any size unit that lands on a valid segment size."""
    assert parse_segment_size(text) == size


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("1000KB", True),  # 1,000,000 bytes: decimal, almost surely meant KiB
        ("1MB", True),
        ("4000", True),
        ("32MiB", False),  # a multiple of 4096, only too large
        ("1KiB", False),
        ("4097", False),
    ],
)
def test_segment_size_refuses_with_a_hint_for_decimal_units(text: str, hint: bool) -> None:
    """A refused size says so; the KiB/MiB hint appears only when decimal units explain it."""
    with pytest.raises(errors.UsageError, match="segment size") as caught:
        parse_segment_size(text)
    assert ("did you mean KiB or MiB?" in str(caught.value)) is hint


def test_segment_size_refuses_what_is_not_a_size() -> None:
    """Text that is not a size at all fails as a usage error before any rule."""
    with pytest.raises(errors.UsageError, match="not a size"):
        parse_segment_size("big")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("0-1023", ByteRange(start=0, end=1023)),
        ("100-", ByteRange(start=100)),
        ("-4096", ByteRange(suffix=4096)),
    ],
)
def test_range_option_parses_http_forms(text: str | None, expected: ByteRange | None) -> None:
    """--range takes START-END, START- or -N; no option means the whole content."""
    assert parse_byte_range(text) == expected


@pytest.mark.parametrize("text", ["", "-", "abc", "1-x", "5"])
def test_range_option_refuses_other_forms(text: str) -> None:
    """Anything else is a usage error naming the range."""
    with pytest.raises(errors.UsageError, match="bad range"):
        parse_byte_range(text)


def test_trust_pins_only_after_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--trust uses the key for this command and saves the pin only when told it succeeded."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    key = bytes(range(32))
    trial, pin_trusted = pins_for("/a.com/x", key.hex())
    assert trial.pinned("/a.com/x") == ("/a.com/x", key)
    assert not (tmp_path / "pins.json").exists()
    pin_trusted()
    saved, _ = pins_for("/a.com/x", None)
    assert saved.pinned("/a.com/x") == ("/a.com/x", key)
    with pytest.raises(errors.UsageError):
        pins_for("/a.com/x", "not hex")
