"""Per-address rules of the DHT (tokens, proven addresses, write limits), with a fake clock."""

from __future__ import annotations

import pytest

from difs_p2p.config import DhtConfig
from difs_p2p.dhtguard import AddressGuard

A = ("192.0.2.1", 4000)
B = ("192.0.2.2", 4000)


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def guard(clock: Clock, **config: object) -> AddressGuard:
    return AddressGuard(DhtConfig(**config), clock, secret=b"s" * 32)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("later", "addr", "proven"),
    [
        (0.0, A, True),  # the same period
        (300.0, A, True),  # the next period: the last period's token still counts
        (600.0, A, False),  # two periods later
        (0.0, B, False),  # a token of another address
        (0.0, ("192.0.2.1", 4001), False),  # another port
    ],
)
def test_tokens_prove_their_address_for_two_periods(
    later: float, addr: tuple[str, int], proven: bool
) -> None:
    """A token we gave an address proves that address in its period and the next."""
    clock = Clock(1200.0)
    g = guard(clock, token_period=300.0)
    token = g.token_for(A)
    clock.now += later
    assert g.address_proven(addr, token) is proven


@pytest.mark.parametrize("token", [None, b"", b"x" * 15, b"x" * 16, "t" * 16, 7])
def test_anything_but_our_token_proves_nothing(token: object) -> None:
    """No token, a malformed one or a made-up one does not prove an address."""
    assert not guard(Clock()).address_proven(A, token)


def test_answering_identify_proves_an_address_until_forgotten() -> None:
    """An address marked proven needs no token, until the proven set is forgotten."""
    g = guard(Clock())
    g.mark_proven(A)
    assert g.address_proven(A, None)
    assert not g.address_proven(B, None)
    g.forget_proven()
    assert not g.address_proven(A, None)


def test_tokens_from_other_peers_expire_after_one_period() -> None:
    """A token another peer gave us is sent back only while it is surely still valid."""
    clock = Clock()
    g = guard(clock, token_period=300.0)
    g.remember_token(A, b"t" * 16)
    assert g.token_from(A) == b"t" * 16
    assert g.token_from(B) is None
    clock.now += 299.0
    assert g.token_from(A) == b"t" * 16
    clock.now += 1.0
    assert g.token_from(A) is None


@pytest.mark.parametrize(
    ("ip", "limit_loopback", "limited"),
    [
        ("192.0.2.1", False, True),
        ("127.0.0.1", False, False),
        ("127.0.0.1", True, True),
        ("::1", False, False),
        ("::1", True, True),
        ("fd77::5", False, True),
        (None, True, False),
    ],
)
def test_which_addresses_are_limited(ip: str | None, limit_loopback: bool, limited: bool) -> None:
    """Limits apply to every address but loopback (unless asked) and an unknown one."""
    assert guard(Clock(), limit_loopback=limit_loopback).limited(ip) is limited


def test_write_bucket_allows_a_burst_then_the_rate() -> None:
    """A sender may write ``write_burst`` times at once, then ``write_rate`` per second."""
    g = guard(Clock(), write_rate=2.0, write_burst=3.0)
    ip = "192.0.2.9"
    assert [g.allow_write(ip, 10.0) for _ in range(4)] == [True, True, True, False]
    assert g.allow_write("192.0.2.10", 10.0)  # another sender has its own bucket
    assert g.allow_write(ip, 10.5)  # one token back after half a second
    assert not g.allow_write(ip, 10.5)
    assert g.allow_write("127.0.0.1", 10.5)  # loopback is exempt


def test_ipv6_senders_of_one_64_share_a_write_bucket() -> None:
    """An IPv6 host has a /64 of addresses: its writes draw from one bucket, another /64
    has its own, and ::1 is exempt like 127.0.0.1."""
    g = guard(Clock(), write_rate=2.0, write_burst=2.0)
    assert g.allow_write("fd77::1:1", 10.0) and g.allow_write("fd77::1:2", 10.0)
    assert not g.allow_write("fd77::9:9", 10.0)  # the same /64, bucket empty
    assert g.allow_write("fd77:0:0:1::1", 10.0)  # another /64
    assert all(g.allow_write("::1", 10.0) for _ in range(5))
