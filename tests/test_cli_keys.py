"""The key commands' rules: how long a delegation lasts."""

from __future__ import annotations

import pytest

from difs_p2p import errors
from difs_p2p.cli_keys import delegation_expiry


@pytest.mark.parametrize(
    ("days", "expires"),
    [(1.0, 1000.0 + 86400), (0.5, 1000.0 + 43200), (30.0, 1000.0 + 30 * 86400)],
)
def test_delegation_expiry(days: float, expires: float) -> None:
    """difs delegate --days counts whole or part days from now."""
    assert delegation_expiry(days, 1000.0) == expires


@pytest.mark.parametrize("days", [0.0, -1.0, float("inf"), float("-inf"), float("nan")])
def test_delegation_expiry_refuses_what_never_or_always_expires(days: float) -> None:
    """--days must be a finite number more than 0."""
    with pytest.raises(errors.UsageError, match="--days must be more than 0"):
        delegation_expiry(days, 1000.0)
