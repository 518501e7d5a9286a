"""Configuration at the edge: sizes, addresses and every validation rule of the configs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from difs_p2p.classgen import FrozenError
from difs_p2p.config import (
    DhtConfig,
    PeerConfig,
    ProofConfig,
    RepairConfig,
    format_size,
    parse_hostport,
    parse_http,
    parse_size,
)
from difs_p2p.errors import UsageError


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("4096", 4096),
        (" 4096 ", 4096),
        ("12b", 12),
        ("1k", 1000),
        ("1kB", 1000),
        ("1KiB", 1024),
        ("1ki", 1024),
        ("500MB", 500_000_000),
        ("2MiB", 2 << 20),
        ("1.5G", 1_500_000_000),
        ("10GiB", 10 << 30),
        ("10 gib", 10 << 30),
        ("1T", 10**12),
        ("1TiB", 1 << 40),
        ("1P", 10**15),
        ("1PiB", 1 << 50),
        ("0.5KiB", 512),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    """Decimal units are powers of 1000, binary ones of 1024, either case, spaces allowed."""
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "not a size"),
        ("abc", "not a size"),
        ("-1", "not a size"),
        ("1 XB", "not a size"),
        ("1e3", "not a size"),
        ("1.5", "whole number"),
        ("1.5B", "whole number"),
        ("10 MB MB", "not a size"),
    ],
)
def test_parse_size_refuses(text: str, why: str) -> None:
    """Anything else is a UsageError that shows examples or says why."""
    with pytest.raises(UsageError, match=why):
        parse_size(text)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 << 20, "5.0 MiB"),
        (3 << 30, "3.0 GiB"),
        (2 << 40, "2.0 TiB"),
        (5 << 50, "5120.0 TiB"),
    ],
)
def test_format_size(n: int, text: str) -> None:
    """Byte counts are shown in binary units, TiB the largest."""
    assert format_size(n) == text


@pytest.mark.parametrize(
    ("text", "default_port", "address"),
    [
        ("127.0.0.1:4000", None, ("127.0.0.1", 4000)),
        (" 10.0.0.7:1 ", None, ("10.0.0.7", 1)),
        ("localhost:65535", None, ("127.0.0.1", 65535)),
        ("192.168.1.2", 4000, ("192.168.1.2", 4000)),
        ("localhost", 80, ("127.0.0.1", 80)),
        ("1.2.3.4:5", 4000, ("1.2.3.4", 5)),
        ("[::1]:4000", None, ("::1", 4000)),
        ("[fd77::1]:4000", None, ("fd77::1", 4000)),
        ("[FD77:0::1]", 9, ("fd77::1", 9)),
        ("fd77::1", 4000, ("fd77::1", 4000)),
        ("::", 4000, ("::", 4000)),
        ("[::ffff:10.0.0.1]:7", None, ("10.0.0.1", 7)),
        ("seed.example.org:4000", None, ("seed.example.org", 4000)),
        ("Seed.Example.ORG.", 4000, ("seed.example.org", 4000)),
    ],
)
def test_parse_hostport(text: str, default_port: int | None, address: tuple[str, int]) -> None:
    """HOST:PORT with an IPv4 address, [IPv6] or a name (not resolved yet); the port
    may have a default; IPv6 and mapped IPv4 come back in their one text."""
    assert parse_hostport(text, default_port=default_port) == address


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("127.0.0.1", "expected HOST:PORT"),
        ("::1:4000", "expected HOST:PORT"),
        ("fd77::1::2:4000", "write an IPv6 address with a port as"),
        ("[::1:4000", "missing"),
        ("[::1]4000", "expected \\[IPv6\\]:PORT"),
        ("[example.com]:4000", "is not an IPv6 address"),
        ("exa mple.com:4000", "is not an IP address or host name"),
        ("host\x00:4000", "is not an IP address or host name"),
        ("256.0.0.1:4000", "is not an IP address or host name"),
        ("127.0.0.1:0", "port must be 1-65535"),
        ("127.0.0.1:65536", "port must be 1-65535"),
        ("127.0.0.1:-1", "port must be 1-65535"),
        ("127.0.0.1:http", "port must be 1-65535"),
        ("127.0.0.1:", "port must be 1-65535"),
    ],
)
def test_parse_hostport_refuses(text: str, why: str) -> None:
    """Malformed addresses are a UsageError naming what is wrong."""
    with pytest.raises(UsageError, match=why):
        parse_hostport(text)


def test_defaults_are_valid_and_frozen(tmp_path: Path) -> None:
    """Every config builds with its defaults and cannot be changed afterwards."""
    config = PeerConfig(tmp_path)
    assert (config.dht, config.repair, config.proof) == (
        DhtConfig(),
        RepairConfig(),
        ProofConfig(),
    )
    with pytest.raises(FrozenError):
        config.port = 1  # type: ignore[misc]


REPAIR_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"resolve_every": 0}, "resolve_every and dead_backoff"),
    ({"dead_backoff": 0}, "resolve_every and dead_backoff"),
    ({"keep": 0}, "--keep-versions"),
    ({"orphan_grace": -1.0}, "orphan_grace and orphan_per_segment"),
    ({"orphan_per_segment": -0.01}, "orphan_grace and orphan_per_segment"),
]

DHT_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"ksize": 0}, "ksize and alpha"),
    ({"alpha": 0}, "ksize and alpha"),
    ({"rpc_timeout": 0.0}, "rpc_timeout"),
    ({"lookup_stall_min": 0.0}, "lookup_stall_min <= lookup_stall"),
    ({"lookup_stall_min": 0.6, "lookup_stall": 0.5}, "lookup_stall_min <= lookup_stall"),
    ({"closest_reuse": -1.0}, "closest_reuse"),
    ({"id_difficulty": -1}, "id_difficulty"),
    ({"id_difficulty": 33}, "id_difficulty"),
    ({"disjoint_paths": 0}, "disjoint_paths and write_quorum_paths"),
    ({"write_quorum_paths": 0}, "disjoint_paths and write_quorum_paths"),
    ({"token_period": 0.0}, "token_period"),
    ({"handover_max_records": -1}, "handover_max_records"),
    ({"max_contacts_per_ip": 0}, "--max-contacts-per-ip"),
    ({"overflow_contacts": -1}, "overflow_contacts"),
    ({"thin_share": 0.0}, "thin_share"),
    ({"thin_share": 1.5}, "thin_share"),
    ({"rejoin_min": 0.0}, "rejoin_min <= rejoin_max"),
    ({"rejoin_min": 61.0}, "rejoin_min <= rejoin_max"),
    ({"rejoin_check": 0.0}, "rejoin_check"),
    ({"lost_remembered": -1}, "lost_remembered"),
]

PROOF_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"segment_share": -0.1}, "segment_share"),
    ({"segment_share": 1.1}, "segment_share"),
    ({"timeout": 0.0}, "proof timeout"),
    ({"proven_ttl": -1.0}, "proof timeout"),
    ({"failed_ttl": -1.0}, "proof timeout"),
    ({"remembered": 0}, "concurrency must be >= 1"),
    ({"max_pending": 0}, "concurrency must be >= 1"),
    ({"concurrency": 0}, "concurrency must be >= 1"),
    ({"max_pending_per_key": 0}, "per key and per signer"),
    ({"max_pending_per_signer": 0}, "per key and per signer"),
]

PEER_ERRORS: list[tuple[dict[str, Any], str]] = [
    ({"host": "example.com"}, "--listen must be an IPv4 or IPv6 address"),
    ({"host": "ff02::1"}, "--listen must be an IPv4 or IPv6 address"),
    ({"host": "fe80::1%eth0"}, "--listen must be an IPv4 or IPv6 address"),
    ({"advertise": ("0.0.0.0", 4000)}, "--advertise must be a reachable"),
    ({"advertise": ("::", 4000)}, "--advertise must be a reachable"),
    ({"advertise": ("10.0.0.1", 65536)}, "--advertise must be a reachable"),
    ({"tcp_port": 65536}, "--tcp-port must be 0-65535"),
    ({"zone": "x" * 33}, "--zone must be at most 32"),
    ({"zone": "rack 1"}, "--zone must be at most 32"),
    ({"port": -1}, "--port must be 0-65535"),
    ({"port": 65536}, "--port must be 0-65535"),
    ({"capacity": -1}, "--capacity must not be negative"),
    ({"max_connections": 0}, "max_connections and max_connections_per_address"),
    ({"max_connections_per_address": 0}, "max_connections and max_connections_per_address"),
    ({"idle_timeout": 0.0}, "idle_timeout"),
    ({"upload_budget": 16 << 20}, "upload_budget"),
    ({"upload_window": 0}, "upload_window"),
    ({"upload_window": (256 << 20) + 1}, "upload_window"),
    ({"s3_upload_expiry": 0.0}, "s3-upload-expiry"),
    ({"s3_keepalive": 0.0}, "s3-keepalive"),
    ({"s3_keepalive": -1.0}, "s3-keepalive"),
]


@pytest.mark.parametrize(("changes", "why"), REPAIR_ERRORS)
def test_repair_config_refuses(changes: dict[str, Any], why: str) -> None:
    """Each RepairConfig rule refuses its bad values with a UsageError naming the field."""
    with pytest.raises(UsageError, match=why):
        RepairConfig(**changes)


@pytest.mark.parametrize(("changes", "why"), DHT_ERRORS)
def test_dht_config_refuses(changes: dict[str, Any], why: str) -> None:
    """Each DhtConfig rule refuses its bad values with a UsageError naming the field."""
    with pytest.raises(UsageError, match=why):
        DhtConfig(**changes)


@pytest.mark.parametrize(("changes", "why"), PROOF_ERRORS)
def test_proof_config_refuses(changes: dict[str, Any], why: str) -> None:
    """Each ProofConfig rule refuses its bad values with a UsageError naming the field."""
    with pytest.raises(UsageError, match=why):
        ProofConfig(**changes)


@pytest.mark.parametrize(("changes", "why"), PEER_ERRORS)
def test_peer_config_refuses(tmp_path: Path, changes: dict[str, Any], why: str) -> None:
    """Each PeerConfig rule refuses its bad values with a UsageError naming the option."""
    with pytest.raises(UsageError, match=why):
        PeerConfig(tmp_path, **changes)


@pytest.mark.parametrize(
    "config",
    [
        lambda: RepairConfig(resolve_every=1, dead_backoff=1, keep=1, orphan_grace=0.0),
        lambda: DhtConfig(lookup_stall_min=0.5, lookup_stall=0.5, id_difficulty=32),
        lambda: DhtConfig(id_difficulty=0, closest_reuse=0.0, handover_max_records=0),
        lambda: ProofConfig(segment_share=0.0, proven_ttl=0.0, failed_ttl=0.0),
        lambda: ProofConfig(segment_share=1.0),
    ],
)
def test_values_on_the_edges_are_accepted(config: Any) -> None:
    """The limits themselves are valid values."""
    config()


def test_peer_config_edges_are_accepted(tmp_path: Path) -> None:
    """Port 0 and 65535, capacity 0 and the smallest upload budget are valid."""
    PeerConfig(tmp_path, port=0, capacity=0)
    PeerConfig(tmp_path, port=65535, upload_budget=(16 << 20) + 64)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("off", None),
        (" OFF ", None),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:0", ("127.0.0.1", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("[::]:80", ("::", 80)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_http_addresses(text: str, expected: tuple[str, int] | None) -> None:
    """--http takes an IP address and port (0: any free port), or off."""
    assert parse_http(text) == expected


@pytest.mark.parametrize(
    "text", ["", "8080", "127.0.0.1", "example.org:80", "127.0.0.1:65536", "[::1]", "on", ":80"]
)
def test_bad_http_addresses(text: str) -> None:
    """Anything else is refused with the forms --http takes."""
    with pytest.raises(UsageError, match="--http must be HOST:PORT"):
        parse_http(text)


def test_http_config_checks_its_port(tmp_path: Path) -> None:
    """PeerConfig.http: off by default; a bad port or host is refused."""
    assert PeerConfig(tmp_path).http is None
    assert PeerConfig(tmp_path, http=("localhost", 0)).http == ("127.0.0.1", 0)
    with pytest.raises(UsageError):
        PeerConfig(tmp_path, http=("127.0.0.1", 70000))
    with pytest.raises(UsageError):
        PeerConfig(tmp_path, http=("example.org", 80))
