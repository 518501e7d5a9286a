"""Network addresses: how operators write them, which ones a peer may name, and which
address a peer behind a wildcard bind adopts from what others observe. Pure.

Address text (docs/PROTOCOL.md, "Addresses"): ``HOST:PORT`` with an IPv4 address or a
host name, ``[IPv6]:PORT``, or a bare host (IPv4, IPv6 or name) where a default port
applies. Only the operator's input is ever a name (resolved by the CLI,
:mod:`difs_p2p.cli_common`); an address a peer sends must be an IP literal
(:func:`sendable_host`).

IPv4-mapped IPv6 addresses (``::ffff:10.0.0.1``, what a dual-stack socket reports for an
IPv4 sender) are normalised to the plain IPv4 string everywhere, so that one peer has one
address text whichever socket saw it.

:class:`AddressVotes` decides which address a peer bound to a wildcard (``0.0.0.0``,
``::``) advertises: the source address other peers observe (their ``stun`` answer), once
at least ``quorum`` observers at distinct IP addresses agree. One lying peer (or several
at one address) cannot move it; a loopback observation only counts for loopback use.
"""

from __future__ import annotations

import ipaddress
import re

from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import UsageError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_BROADCAST = ipaddress.IPv4Address("255.255.255.255")
# RFC 1123 host names: labels of letters, digits and hyphens, at most 253 characters.
_NAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
# Zone labels (--zone): short, printable, safe in logs and status output.
_ZONE_RE = re.compile(r"^[A-Za-z0-9._-]{0,32}$")
MAX_ZONE = 32


def ip_of(host: object) -> IPAddress | None:
    """The IP address ``host`` is the text of (IPv4-mapped IPv6 as IPv4), else None.

    No scope ids (``fe80::1%eth0``): an address a peer names must mean the same on
    every host.
    """
    if not isinstance(host, str) or not 0 < len(host) <= 45 or "%" in host:
        return None
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def normalize_host(host: str) -> str:
    """The one text of an IP address (mapped IPv4 as IPv4, IPv6 compressed); a string
    that is not an IP address comes back unchanged."""
    ip = ip_of(host)
    return host if ip is None else str(ip)


def sendable_host(host: object) -> bool:
    """Whether a datagram or connection may go to ``host``: an IPv4 or IPv6 literal
    that is not unspecified, multicast or the broadcast address. Names are refused
    (resolving one would block and let a peer steer our resolver), and so is any
    string the socket layer cannot encode."""
    ip = ip_of(host)
    return ip is not None and not (ip.is_unspecified or ip.is_multicast or ip == _BROADCAST)


def is_wildcard(host: str) -> bool:
    """Whether ``host`` is ``0.0.0.0`` or ``::`` (bind every address)."""
    ip = ip_of(host)
    return ip is not None and ip.is_unspecified


def is_loopback(host: str) -> bool:
    ip = ip_of(host)
    return ip is not None and ip.is_loopback


def address_group(ip: str | None) -> str | None:
    """What the per-IP cap counts ``ip`` as: an IPv4 address is itself, an IPv6 address
    its /64 (one host's usual share, and what one attacker's machine gets)."""
    if ip is None or ":" not in ip:
        return ip
    try:
        addr = ipaddress.IPv6Address(ip)
    except ValueError:
        return ip
    if addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))


def is_ipv6(host: str) -> bool:
    """Whether ``host`` is an IPv6 address (a mapped IPv4 address is IPv4)."""
    return isinstance(ip_of(host), ipaddress.IPv6Address)


def advertisable(host: str, *, loopback_ok: bool) -> bool:
    """Whether a peer may give ``host`` to others as where to reach it (holder entries,
    the address file): sendable, and loopback only when its peers are on this host."""
    return sendable_host(host) and (loopback_ok or not is_loopback(host))


def format_address(host: str, port: int) -> str:
    """``HOST:PORT``, with an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def split_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Split an operator's address into (host, port); the host is an IP address
    (normalised) or a host name, not yet resolved.

    Forms: ``1.2.3.4:P``, ``name:P``, ``[v6]:P``; with ``default_port`` also ``1.2.3.4``,
    ``name``, ``[v6]`` and a bare ``v6``.
    """
    raw = text.strip()
    host, port_text, has_port = raw, "", False
    if raw.startswith("["):
        end = raw.find("]")
        if end < 0:
            raise UsageError(f"malformed address {text!r}: missing ']'")
        host, rest = raw[1:end], raw[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise UsageError(f"malformed address {text!r}: expected [IPv6]:PORT")
            port_text, has_port = rest[1:], True
        if not is_ipv6(host) and ip_of(host) is None:
            raise UsageError(f"malformed address {text!r}: {host!r} is not an IPv6 address")
    elif raw.count(":") == 1:
        host, _, port_text = raw.partition(":")
        has_port = True
    elif raw.count(":") > 1 and ip_of(raw) is None:
        raise UsageError(
            f"malformed address {text!r}: write an IPv6 address with a port as [ADDR]:PORT"
        )
    if not has_port:
        if default_port is None:
            raise UsageError(
                f"malformed address {text!r}: expected HOST:PORT, e.g. 127.0.0.1:4000 or [::1]:4000"
            )
        port = default_port
    elif not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"malformed address {text!r}: port must be 1-65535")
    else:
        port = int(port_text)
    if ip_of(host) is not None:
        return normalize_host(host), port
    if not _NAME_RE.match(host) or host.replace(".", "").isdigit():
        raise UsageError(f"malformed address {text!r}: {host!r} is not an IP address or host name")
    return host.rstrip(".").lower(), port


def check_listen(host: str) -> str:
    """The address to bind (normalised): any IPv4 or IPv6 address, ``0.0.0.0``, ``::``,
    or ``localhost`` (127.0.0.1)."""
    if isinstance(host, str) and host.lower() == "localhost":
        return "127.0.0.1"
    ip = ip_of(host)
    if ip is None or ip.is_multicast or ip == _BROADCAST:
        raise UsageError(f"--listen must be an IPv4 or IPv6 address or localhost, not {host!r}")
    return str(ip)


def check_zone(zone: str) -> str:
    """A zone label (--zone): at most 32 characters of letters, digits, '.', '_', '-'."""
    if not isinstance(zone, str) or not _ZONE_RE.match(zone):
        raise UsageError(
            f"--zone must be at most {MAX_ZONE} characters of A-Z a-z 0-9 . _ -, not {zone!r}"
        )
    return zone


def family_matches(bound: str, host: str) -> bool:
    """Whether a socket bound to ``bound`` can send to ``host``: IPv4 to IPv4; IPv6 to
    IPv6, and ``::`` (dual-stack) to both."""
    if bound == "::":
        return True
    return is_ipv6(bound) == is_ipv6(host)


def socket_address(bound: str, host: str, port: int) -> tuple[str, int]:
    """The destination a socket bound to ``bound`` sends to: an IPv4 host mapped into
    IPv6 (``::ffff:a.b.c.d``) on a dual-stack socket, else as is."""
    if bound == "::" and not is_ipv6(host):
        return (f"::ffff:{host}", port)
    return (host, port)


# -- the learned address ---------------------------------------------------------------------


@valueclass(frozen=False)
class AddressVotes:
    """What other peers observe as our source address; the address adopted from it.

    Each observer votes once, by its IP address (its latest observation counts); an
    observer on loopback votes by IP and port (local peers share 127.0.0.1). An address
    wins when at least ``quorum`` observers agree on it and more agree on it than on any
    other; observations of a loopback address count only while no observer sees another
    address (a peer whose peers all run on this host may use loopback; one with a
    single remote observer adopts nothing until a second agrees). Observations older than
    ``max_age`` seconds are forgotten, so the address follows a changed network.
    """

    quorum: int = 2
    max_age: float = 3600.0
    # at most this many observers remembered (the oldest forgotten first)
    max_observers: int = 256
    _votes: dict[tuple[str, int], tuple[str, float]] = field(default_factory=dict)

    def observe(self, observer: tuple[str, int], observed: str, now: float) -> None:
        """``observer`` saw our datagrams come from ``observed`` (an IP literal)."""
        ip = ip_of(observed)
        if ip is None or not sendable_host(observed):
            return
        obs_host = normalize_host(observer[0])
        key = (obs_host, observer[1] if is_loopback(obs_host) else 0)
        self._votes.pop(key, None)
        self._votes[key] = (str(ip), now)
        while len(self._votes) > self.max_observers:
            del self._votes[next(iter(self._votes))]

    def winner(self, now: float) -> str | None:
        """The adopted address, or None while no address has a quorum."""
        counts: dict[str, int] = {}
        for voter, (host, at) in list(self._votes.items()):
            if now - at > self.max_age:
                del self._votes[voter]
                continue
            counts[host] = counts.get(host, 0) + 1
        # loopback is for loopback use only: it counts while no one observes us at
        # another address (else our entries would reach peers that cannot use it)
        others = {h: n for h, n in counts.items() if not is_loopback(h)}
        ranked = sorted(
            ((n, h) for h, n in (others or counts).items()), key=lambda item: (-item[0], item[1])
        )
        if not ranked or ranked[0][0] < self.quorum:
            return None
        if len(ranked) > 1 and ranked[1][0] == ranked[0][0]:
            return None  # a tie: no address is agreed
        return ranked[0][1]


def parse_hostport(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Parse an operator's ``HOST:PORT`` into a tuple: an IPv4 address, ``[IPv6]:PORT``
    or a host name (see ``addresses.split_hostport``; with ``default_port``, a bare
    host too). A name is returned as is, to be resolved without blocking
    (``net.resolve``); ``localhost`` is 127.0.0.1 at once.
    """
    host, port = split_hostport(text, default_port=default_port)
    if host == "localhost":
        host = "127.0.0.1"
    return host, port
