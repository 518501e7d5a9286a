"""Byte ranges as HTTP reads them: START-END, START-, -N, and what is wrong with bad ones."""

from __future__ import annotations

import pytest

from difs_p2p.errors import UsageError
from difs_p2p.ranges import parse_range


@pytest.mark.parametrize(
    ("text", "size", "span"),
    [
        ("0-9", 100, (0, 9)),
        ("10-19", 100, (10, 19)),
        ("90-200", 100, (90, 99)),
        ("99-99", 100, (99, 99)),
        ("50-", 100, (50, 99)),
        ("0-", 1, (0, 0)),
        ("-10", 100, (90, 99)),
        ("-1000", 100, (0, 99)),
        (" 5-6 ", 100, (5, 6)),
    ],
)
def test_ranges_resolve_like_http(text: str, size: int, span: tuple[int, int]) -> None:
    """START-END, START- and -N give RFC 9110's bytes, an END past the end trimmed."""
    assert parse_range(text).resolve(size) == span


@pytest.mark.parametrize(
    ("text", "size", "message"),
    [
        ("10-5", 100, "the end (5) is before the start (10)"),
        ("100-", 100, "past the end of the object (100 bytes"),
        ("100-200", 100, "starts at byte 100"),
        ("0-", 0, "the object is empty"),
        ("-5", 0, "the object is empty"),
        ("-0", 100, "at least 1 byte"),
        ("-", 100, "expected START-END"),
        ("", 100, "expected START-END"),
        ("5", 100, "expected START-END"),
        ("a-5", 100, "'a' is not a byte offset"),
        ("1-2-3", 100, "'2-3' is not a byte offset"),
        ("١-٢", 100, "is not a byte offset"),
    ],
)
def test_bad_ranges_say_what_is_wrong(text: str, size: int, message: str) -> None:
    """Every malformed or unsatisfiable range is a UsageError naming the problem."""
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_range(text).resolve(size)
