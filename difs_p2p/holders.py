"""Holder entries: a peer's signed claim to hold a range of one version's segments
(docs/PROTOCOL.md, "Holder entry"). 179 bytes, binary::

    0   u8   kind = 1 (records.HOLDER_KIND)
    1   20B  name key
    21  u64  manifest version
    29  32B  integrity root of that version
    61  u32  first segment (inclusive)
    65  u32  last segment (inclusive)
    69  4B   IPv4 address
    73  u16  TCP port
    75  u64  issued at (unix seconds)
    83  32B  holder's Ed25519 public key (its node ID derives from it)
    115 64B  signature over b"difs-holder-v1\\x00" + bytes 0..114

A holder reached over IPv6 signs the same fields with a 16-byte address (191 bytes: the
fields from ``TCP port`` on move 12 bytes further, the signature covers bytes 0..126).
The length tells the two forms apart. The address must be one others can reach: never
unspecified (``0.0.0.0``, ``::``), multicast or broadcast, and an IPv4 address is always
the 4-byte form (never IPv4-mapped IPv6), so that one holder has one address text.

Entries live in the DHT's entry set under the name key, beside the manifest; so do earlier
manifests (the version history). Holders renew entries; whoever holds a range may announce
it, without the publisher. Pure.
"""

from __future__ import annotations

import ipaddress
import struct

from difs_p2p.addresses import ip_of, sendable_host
from difs_p2p.classgen import valueclass
from difs_p2p.errors import WireError
from difs_p2p.identity import SIGNATURE_SIZE, Identity, NodeId, node_id_for, verify_signature
from difs_p2p.names import NameKey
from difs_p2p.records import HOLDER_KIND
from difs_p2p.segments import IntegrityRoot, SegmentId

HOLDER_DOMAIN = b"difs-holder-v1\x00"
_HOLDER = struct.Struct("!B20sQ32sII4sHQ32s")
HOLDER_SIZE = _HOLDER.size + SIGNATURE_SIZE
# the same fields with an IPv6 address
_HOLDER6 = struct.Struct("!B20sQ32sII16sHQ32s")
HOLDER6_SIZE = _HOLDER6.size + SIGNATURE_SIZE
_FORMATS = {HOLDER_SIZE: _HOLDER, HOLDER6_SIZE: _HOLDER6}


@valueclass
class HolderEntry:
    """A peer's signed claim to hold segments ``start..end`` of one version of a name."""

    key: NameKey
    version: int
    integrity: IntegrityRoot
    start: int
    end: int
    host: str
    port: int
    issued: int
    public_key: bytes
    raw: bytes

    @property
    def node_id(self) -> NodeId:
        return node_id_for(self.public_key)

    @property
    def identity(self) -> bytes:
        """Entries with one identity replace each other (the fresher one wins)."""
        return b"h" + self.node_id + struct.pack("!QI", self.version, self.start)


def build_holder_entry(
    identity: Identity,
    *,
    key: NameKey,
    version: int,
    integrity: IntegrityRoot,
    start: int,
    end: int,
    host: str,
    port: int,
    issued: int,
) -> HolderEntry:
    """Sign a holder entry; ``host`` must be an address others can reach (ValueError)."""
    ip = ip_of(host)
    if ip is None or not sendable_host(host):
        raise ValueError(f"a holder entry cannot carry the address {host!r}")
    body = (_HOLDER if ip.version == 4 else _HOLDER6).pack(
        HOLDER_KIND,
        key,
        version,
        integrity,
        start,
        end,
        ip.packed,
        port,
        issued,
        identity.public_key,
    )
    return parse_holder_entry(body + identity.sign(HOLDER_DOMAIN + body))


def parse_holder_entry(raw: bytes) -> HolderEntry:
    """Decode and verify a holder entry (WireError / IntegrityError)."""
    entry = decode_holder_entry(raw)
    verify_holder_entry(entry)
    return entry


def decode_holder_entry(raw: bytes) -> HolderEntry:
    """Decode a holder entry **without** checking its signature (WireError).

    For a reader that receives many entries and uses few of them at first (a fetch):
    it must call :func:`verify_holder_entry` on an entry before using it.
    """
    fmt = _FORMATS.get(len(raw))
    if fmt is None:
        raise WireError(
            f"holder entry of {len(raw)} bytes, expected {HOLDER_SIZE} or {HOLDER6_SIZE}"
        )
    kind, key, version, integrity, start, end, ip, port, issued, pub = fmt.unpack_from(raw)
    if kind != HOLDER_KIND:
        raise WireError("not a holder entry", field="kind", offset=0)
    if end < start or port == 0 or version == 0:
        raise WireError("bad range, port or version", field="range", offset=61)
    address = ipaddress.ip_address(bytes(ip))
    host = str(address)
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    if mapped or not sendable_host(host):
        raise WireError(f"holder address {host} is not reachable", field="address", offset=69)
    return HolderEntry(
        key=NameKey(key),
        version=version,
        integrity=IntegrityRoot(SegmentId(integrity)),
        start=start,
        end=end,
        host=host,
        port=port,
        issued=issued,
        public_key=pub,
        raw=bytes(raw),
    )


def verify_holder_entry(entry: HolderEntry) -> None:
    """Raise IntegrityError unless the entry's signature is its holder's over its fields."""
    size = _FORMATS[len(entry.raw)].size
    verify_signature(entry.public_key, entry.raw[size:], HOLDER_DOMAIN + entry.raw[:size])
