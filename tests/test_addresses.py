"""Addresses: the operator's forms, what a peer may name or advertise, dual-stack
destinations, and the learned address agreed by several observers (pure)."""

from __future__ import annotations

import pytest

from difs_p2p.addresses import (
    AddressVotes,
    advertisable,
    check_listen,
    check_zone,
    family_matches,
    format_address,
    is_wildcard,
    normalize_host,
    sendable_host,
    socket_address,
    split_hostport,
)
from difs_p2p.errors import UsageError


@pytest.mark.parametrize(
    ("text", "default", "expected"),
    [
        ("0.0.0.0:4100", None, ("0.0.0.0", 4100)),
        ("fd77::1", 4000, ("fd77::1", 4000)),
        ("::", 4000, ("::", 4000)),
        ("localhost:4000", None, ("localhost", 4000)),
        ("[fd77::1]:4000", None, ("fd77::1", 4000)),
        ("seed.example.org:4000", None, ("seed.example.org", 4000)),
        ("[::ffff:192.0.2.1]:1", None, ("192.0.2.1", 1)),
        ("10.77.0.3", 4000, ("10.77.0.3", 4000)),
    ],
)
def test_every_form_of_the_first_paragraph_parses(
    text: str, default: int | None, expected: tuple[str, int]
) -> None:
    """--listen, --bootstrap and --peer forms: IPv4, IPv6 bare or bracketed, names."""
    assert split_hostport(text, default_port=default) == expected


@pytest.mark.parametrize(
    ("host", "port", "text"),
    [("10.0.0.1", 4000, "10.0.0.1:4000"), ("fd77::1", 4000, "[fd77::1]:4000")],
)
def test_format_address_brackets_ipv6(host: str, port: int, text: str) -> None:
    """IPv6 hosts are written in brackets, and the text parses back."""
    assert format_address(host, port) == text
    assert split_hostport(text) == (host, port)


@pytest.mark.parametrize(
    ("host", "normal"),
    [
        ("::ffff:10.0.0.1", "10.0.0.1"),
        ("FD77:0:0::1", "fd77::1"),
        ("10.0.0.1", "10.0.0.1"),
        ("name.example", "name.example"),
    ],
)
def test_normalize_host(host: str, normal: str) -> None:
    """Mapped IPv4 becomes IPv4 text; IPv6 its compressed lower-case text."""
    assert normalize_host(host) == normal


@pytest.mark.parametrize(
    ("host", "sendable", "for_others", "for_loopback"),
    [
        ("10.77.0.1", True, True, True),
        ("fd77::1", True, True, True),
        ("127.0.0.1", True, False, True),
        ("::1", True, False, True),
        ("0.0.0.0", False, False, False),
        ("::", False, False, False),
        ("224.0.0.1", False, False, False),
        ("ff02::1", False, False, False),
        ("255.255.255.255", False, False, False),
        ("seed.example.org", False, False, False),
        ("10.0.0.1\x00", False, False, False),
    ],
)
def test_what_may_be_named_and_advertised(
    host: str, sendable: bool, for_others: bool, for_loopback: bool
) -> None:
    """Wildcards, multicast and names are never sent; loopback only for loopback use."""
    assert sendable_host(host) is sendable
    assert advertisable(host, loopback_ok=False) is for_others
    assert advertisable(host, loopback_ok=True) is for_loopback


@pytest.mark.parametrize(
    ("bound", "host", "ok", "dest"),
    [
        ("::", "10.0.0.1", True, ("::ffff:10.0.0.1", 5)),
        ("::", "fd77::2", True, ("fd77::2", 5)),
        ("fd77::1", "fd77::2", True, ("fd77::2", 5)),
        ("fd77::1", "10.0.0.1", False, ("10.0.0.1", 5)),
        ("0.0.0.0", "fd77::2", False, ("fd77::2", 5)),
        ("10.0.0.1", "10.0.0.2", True, ("10.0.0.2", 5)),
    ],
)
def test_dual_stack_destinations(bound: str, host: str, ok: bool, dest: tuple[str, int]) -> None:
    """A dual-stack socket reaches both families (IPv4 mapped); others their own."""
    assert family_matches(bound, host) is ok
    assert socket_address(bound, host, 5) == dest


def test_listen_and_zone_checks() -> None:
    """--listen takes IP literals and wildcards; --zone short safe labels."""
    assert check_listen("::") == "::"
    assert check_listen("0.0.0.0") == "0.0.0.0"
    assert check_listen("localhost") == "127.0.0.1"
    assert check_listen("FD77::1") == "fd77::1"
    assert is_wildcard("::") and is_wildcard("0.0.0.0") and not is_wildcard("::1")
    for bad in ("example.com", "ff02::1", "", "1.2.3"):
        with pytest.raises(UsageError):
            check_listen(bad)
    assert check_zone("eu-west.rack_3") == "eu-west.rack_3"
    for bad in ("a" * 33, "rack 3", "zone/1", "é"):
        with pytest.raises(UsageError):
            check_zone(bad)


def _votes(observations: list[tuple[tuple[str, int], str]]) -> str | None:
    votes = AddressVotes()
    for observer, seen in observations:
        votes.observe(observer, seen, 0.0)
    return votes.winner(0.0)


@pytest.mark.parametrize(
    ("observations", "winner"),
    [
        # one observer is never enough
        ([(("10.0.0.2", 4000), "203.0.113.7")], None),
        # two observers at distinct IPs agree
        ([(("10.0.0.2", 4000), "203.0.113.7"), (("10.0.0.3", 4000), "203.0.113.7")], "203.0.113.7"),
        # a liar at one IP, many ports, counts once: no quorum for its address
        (
            [(("10.0.0.9", p), "198.51.100.1") for p in range(1, 50)]
            + [(("10.0.0.2", 4000), "203.0.113.7"), (("10.0.0.3", 4000), "203.0.113.7")],
            "203.0.113.7",
        ),
        # one liar against two honest observers loses
        (
            [
                (("10.0.0.2", 4000), "203.0.113.7"),
                (("10.0.0.9", 4000), "198.51.100.1"),
                (("10.0.0.3", 4000), "203.0.113.7"),
            ],
            "203.0.113.7",
        ),
        # two against two: no agreement
        (
            [
                (("10.0.0.2", 1), "203.0.113.7"),
                (("10.0.0.3", 1), "203.0.113.7"),
                (("10.0.0.8", 1), "198.51.100.1"),
                (("10.0.0.9", 1), "198.51.100.1"),
            ],
            None,
        ),
        # loopback peers (one IP, distinct ports) may agree on loopback
        ([(("127.0.0.1", 4001), "127.0.0.1"), (("127.0.0.1", 4002), "127.0.0.1")], "127.0.0.1"),
        # but a non-loopback agreement wins over it
        (
            [
                (("127.0.0.1", 4001), "127.0.0.1"),
                (("127.0.0.1", 4002), "127.0.0.1"),
                (("127.0.0.1", 4003), "127.0.0.1"),
                (("fd77::2", 4000), "fd77::1"),
                (("::ffff:10.0.0.3", 4000), "fd77::1"),
            ],
            "fd77::1",
        ),
        # one remote observer is no quorum, and loopback no longer counts
        (
            [
                (("127.0.0.1", 4001), "127.0.0.1"),
                (("127.0.0.1", 4002), "127.0.0.1"),
                (("10.0.0.3", 4000), "10.0.0.1"),
            ],
            None,
        ),
        # observed wildcards, multicast and names are not votes
        ([(("10.0.0.2", 1), "0.0.0.0"), (("10.0.0.3", 1), "0.0.0.0")], None),
        ([(("10.0.0.2", 1), "evil.example"), (("10.0.0.3", 1), "evil.example")], None),
        # a mapped observation is the IPv4 address
        (
            [(("10.0.0.2", 1), "::ffff:203.0.113.7"), (("10.0.0.3", 1), "203.0.113.7")],
            "203.0.113.7",
        ),
    ],
)
def test_the_learned_address_needs_agreement(
    observations: list[tuple[tuple[str, int], str]], winner: str | None
) -> None:
    """An address is adopted only when 2 observers at distinct IPs agree, and more of
    them than on any other; a lying peer cannot move it."""
    assert _votes(observations) == winner


def test_an_observer_votes_once_and_old_votes_expire() -> None:
    """An observer's latest observation replaces its earlier one; old ones expire."""
    votes = AddressVotes(max_age=100.0)
    votes.observe(("10.0.0.2", 1), "203.0.113.7", 0.0)
    votes.observe(("10.0.0.3", 1), "203.0.113.7", 0.0)
    assert votes.winner(0.0) == "203.0.113.7"
    votes.observe(("10.0.0.3", 1), "203.0.113.8", 1.0)
    assert votes.winner(1.0) is None
    votes.observe(("10.0.0.4", 1), "203.0.113.8", 50.0)
    assert votes.winner(50.0) == "203.0.113.8"
    assert votes.winner(300.0) is None
