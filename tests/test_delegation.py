"""Delegations: a grant of a name prefix to another writer, its shape and its signature."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from difs_p2p.delegation import build_delegation, parse_delegation
from difs_p2p.errors import IntegrityError, WireError
from tests.signed import OWNER, STRANGER, V2, WRITER, make, setter


def test_a_delegate_publishes_for_the_owner_within_its_grant() -> None:
    """A writer with a valid delegation publishes as the owner; outside it, it is refused."""
    grant = build_delegation(OWNER, prefix="/a.com", writer=WRITER.public_key, expires=100.0)
    m = make(WRITER, version=3, parent=V2, delegation=grant, created=50.0)
    assert (m.owner, m.publisher, m.delegation) == (OWNER.public_key, WRITER.public_key, grant)
    assert grant.covers("/a.com") and grant.covers("/a.com/x") and not grant.covers("/a.company")
    with pytest.raises(IntegrityError, match="expired"):
        make(WRITER, version=3, parent=V2, delegation=grant, created=101.0)
    with pytest.raises(IntegrityError, match="does not cover"):
        make(WRITER, name="/b.com/x", delegation=grant)
    with pytest.raises(IntegrityError, match="another writer"):
        make(STRANGER, delegation=grant)


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (setter("t", "other"), WireError),
        (setter("owner", "00"), WireError),
        (setter("expires", "soon"), WireError),
        (setter("expires", -1), WireError),
        (setter("expires", True), WireError),
        (setter("prefix", 7), WireError),
        (setter("prefix", "a.com"), WireError),
        (setter("prefix", "/a.com/"), WireError),
        (setter("extra", 1), WireError),
        (setter("prefix", "/b.com"), IntegrityError),
        (setter("expires", 1e9), IntegrityError),
        (setter("writer", STRANGER.public_key.hex()), IntegrityError),
    ],
)
def test_malformed_or_tampered_delegations_are_refused(
    change: Callable[[dict[str, Any]], None], error: type[Exception]
) -> None:
    """A delegation must be well formed (WireError) and signed by its owner (IntegrityError)."""
    grant = build_delegation(OWNER, prefix="/a.com", writer=WRITER.public_key, expires=100.0)
    obj = grant.as_json()
    change(obj)
    with pytest.raises(error):
        parse_delegation(obj)
