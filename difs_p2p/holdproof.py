"""Proofs of holding: a DHT peer lists a holder entry only while its signer can prove it.

A holder entry is a signer's claim that its address serves a range of one version of a
name. When a DHT peer admits entries from another peer, it challenges each new claim (a
signer key at an address, for a name key and version) once, in an owned background task:

1. it connects over TCP to the entry's address and sends ``prove`` with a fresh 32-byte
   nonce and one of the claimed ranges; the holder answers ``{"holds": true, "sig"}``,
   its node key's signature over :func:`prove_message` (domain, nonce, name key,
   version, range), or ``{"holds": false}``;
2. on a sampled share of the challenges (``segment_share``, 2/k by default: about two of
   the k listing peers of a key), it also reads the version's hash list and one random
   segment of the range from that address, and checks them against the integrity root
   and segment count of the owner's manifest in its own record store.

A claim that fails (no connection or answer within the deadline, another key, a bad
signature, "does not hold", a bad hash list or segment) loses its entries at this peer,
and the (signer, address) is refused for ``failed_ttl``; a proven claim is not asked
again for ``proven_ttl``. Unproven entries are served while their challenge runs (a
fetch that follows its publish at once must find them; readers route around false
holders anyway).

:class:`ProofBook` holds every decision, without I/O (bounded caches, what to challenge,
sampling, what a reply proves); :class:`HolderProver` is the thin asyncio shell.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from difs_p2p import segments, wire
from difs_p2p.config import ProofConfig
from difs_p2p.errors import DifsError, IntegrityError, WireError
from difs_p2p.holders import HolderEntry, decode_holder_entry
from difs_p2p.identity import verify_signature
from difs_p2p.manifest import Manifest, parse_manifest
from difs_p2p.names import NameKey
from difs_p2p.net import Connector
from difs_p2p.ops import ProveReply, ProveRequest, decode_reply, encode_reply
from difs_p2p.records import RecordKind, record_kind, split_entries
from difs_p2p.recordstore import RecordStore
from difs_p2p.segments import SegmentId
from difs_p2p.transfer import Connection

log = logging.getLogger(__name__)

PROVE_DOMAIN: Final = b"difs-hold-proof-v1\x00"
PROVE_NONCE_SIZE: Final = 32


def prove_message(nonce: bytes, key: bytes, version: int, start: int, end: int) -> bytes:
    """What a holder signs to prove a claim: domain || nonce || key || version, start, end."""
    return PROVE_DOMAIN + nonce + key + struct.pack("!QQQ", version, start, end)


@dataclass(frozen=True, slots=True)
class Claim:
    """Who claims what: a signer key at an address holds ranges of one version of a key."""

    signer: bytes
    host: str
    port: int
    key: NameKey
    version: int

    @classmethod
    def of(cls, entry: HolderEntry) -> Claim:
        return cls(entry.public_key, entry.host, entry.port, entry.key, entry.version)

    @property
    def holder(self) -> tuple[bytes, str, int]:
        """The (signer, address) a failure is remembered for."""
        return (self.signer, self.host, self.port)


@dataclass(frozen=True, slots=True)
class Challenge:
    """One challenge to send: the range asked about, the nonce, and the segment index to
    read and verify (None: identity and claim only)."""

    claim: Claim
    start: int
    end: int
    nonce: bytes
    segment: int | None


@dataclass
class ProofStats:
    challenges: int = 0
    proven: int = 0
    failed: int = 0
    segments: int = 0
    # bytes received for challenges: replies, hash lists, segments
    bytes_in: int = 0
    removed: int = 0
    # claims not challenged because too many were pending
    skipped: int = 0


def _put_bounded(cache: OrderedDict[Any, float], item: object, until: float, cap: int) -> None:
    cache[item] = until
    cache.move_to_end(item)
    while len(cache) > cap:
        cache.popitem(last=False)


@dataclass
class ProofBook:
    """Every decision of the challenger, without I/O: times are passed in."""

    config: ProofConfig = field(default_factory=ProofConfig)
    # claim -> until when it counts as proven
    proven: OrderedDict[Claim, float] = field(default_factory=OrderedDict)
    # (signer, host, port) -> until when its entries are refused
    failed: OrderedDict[tuple[bytes, str, int], float] = field(default_factory=OrderedDict)
    pending: set[Claim] = field(default_factory=set)

    def refused(self, entry: HolderEntry, now: float) -> bool:
        """Whether an entry is refused outright: its signer failed a challenge at its
        address within ``failed_ttl``."""
        until = self.failed.get((entry.public_key, entry.host, entry.port))
        if until is None:
            return False
        if until <= now:
            del self.failed[(entry.public_key, entry.host, entry.port)]
            return False
        return True

    def is_proven(self, claim: Claim, now: float) -> bool:
        until = self.proven.get(claim)
        return until is not None and until > now

    def want(self, claim: Claim, now: float) -> bool | None:
        """Whether to challenge ``claim`` now: True; False if it needs no challenge
        (proven recently, or already pending); None if it needs one but the bounds are
        reached (the claim is left unchallenged this time)."""
        if claim in self.pending or self.is_proven(claim, now):
            return False
        cfg = self.config
        if len(self.pending) >= cfg.max_pending:
            return None
        if sum(c.key == claim.key for c in self.pending) >= cfg.max_pending_per_key:
            return None
        if sum(c.signer == claim.signer for c in self.pending) >= cfg.max_pending_per_signer:
            return None
        return True

    def challenge(
        self, claim: Claim, ranges: Sequence[tuple[int, int]], rng: random.Random, nonce: bytes
    ) -> Challenge:
        """The challenge for ``claim``: one of its ranges at random, and with probability
        ``segment_share`` a random segment index of that range to read."""
        if not ranges:
            raise ValueError("a claim has at least one range")
        start, end = ranges[rng.randrange(len(ranges))]
        segment = rng.randint(start, end) if rng.random() < self.config.segment_share else None
        self.pending.add(claim)
        return Challenge(claim, start, end, nonce, segment)

    def settle(self, claim: Claim, ok: bool, now: float) -> None:
        """Record the outcome of a challenge of ``claim``."""
        self.pending.discard(claim)
        cfg = self.config
        if ok:
            _put_bounded(self.proven, claim, now + cfg.proven_ttl, cfg.remembered)
        else:
            self.proven.pop(claim, None)
            _put_bounded(self.failed, claim.holder, now + cfg.failed_ttl, cfg.remembered)

    def settle_not_held(self, claim: Claim) -> None:
        """The holder answered, truthfully, that it no longer holds the challenged range:
        neither proven nor failed (its other entries stay, it is not refused)."""
        self.pending.discard(claim)


# The one answer that is no failure: an honest holder that dropped one range (a stale entry
# of it was announced again) says so; only that range's entries go.
NOT_HELD = "the holder says it does not hold the range"


def check_prove_reply(challenge: Challenge, reply: ProveReply | object) -> str:
    """What a ``prove`` reply (typed, or its JSON body) proves: "" if the claim's signer
    holds the range (its key signed the challenge), else why not."""
    if not isinstance(reply, ProveReply):
        if not isinstance(reply, dict):
            return "malformed reply"
        try:
            reply = decode_reply("prove", reply)
        except WireError as exc:
            return f"malformed reply: {exc}"
    assert isinstance(reply, ProveReply)
    if not reply.holds:
        return NOT_HELD
    raw = reply.sig or b""
    c = challenge
    message = prove_message(c.nonce, c.claim.key, c.claim.version, c.start, c.end)
    try:
        verify_signature(c.claim.signer, raw, message)
    except IntegrityError:
        return "the signature is not the entry's key's"
    return ""


def check_segment(
    manifest: Manifest, hash_list: bytes, index: int, data: bytes | memoryview
) -> str:
    """Whether ``data`` is segment ``index`` of ``manifest``: "" if so, else why not
    (the hash list is checked against the manifest's integrity root first)."""
    try:
        ids = segments.verify_hash_list(hash_list, manifest.integrity, manifest.segment_count)
        if not 0 <= index < len(ids):
            return "segment index outside the object"
        segments.verify_segment(ids[index], data)
    except (WireError, IntegrityError) as exc:
        return f"bad hash list or segment: {exc}"
    return ""


def find_manifest(
    store: RecordStore, key: bytes, version: int, integrity: bytes, now: float
) -> Manifest | None:
    """The owner's manifest of ``version`` with ``integrity`` in the record store (the
    record, or a history entry), as entry admission found it."""
    candidates = [store.get(key, now), *split_entries(store.entries(key, now)).history]
    for raw in candidates:
        if raw is None:
            continue
        with contextlib.suppress(WireError, IntegrityError):
            m = parse_manifest(raw, key)
            if m.version == version and m.integrity == integrity:
                return m
    return None


class HolderProver:
    """Challenges the holder entries a DHT peer admits (the asyncio shell of ProofBook).

    Installed as the DHT's entry gate: :meth:`admit` refuses entries of a failed
    (signer, address); :meth:`admitted` schedules a challenge of a new claim, as a task
    started by ``spawn`` (owned by the peer, cancelled when it stops). At most
    ``concurrency`` challenges run at once.
    """

    def __init__(
        self,
        store: Callable[[], RecordStore],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
        *,
        config: ProofConfig,
        network: Connector,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        own_key: bytes = b"",
    ) -> None:
        """``own_key``: this peer's node key (its own entries, sent back by others, are
        not challenged)."""
        self.own_key = own_key
        self.book = ProofBook(config)
        self.stats = ProofStats()
        self._store = store
        self._spawn = spawn
        self._network = network
        self._clock = clock
        self._wall = wall_clock
        self._rng = rng or random.SystemRandom()
        self._slots = asyncio.Semaphore(config.concurrency)

    # -- the DHT's entry gate (called synchronously from the datagram handler) -------------

    def admit(self, key: bytes, raw: bytes) -> bool:
        """Whether the DHT may store this entry (False: its holder failed a challenge)."""
        try:
            if record_kind(raw) is RecordKind.MANIFEST:
                return True  # history: a signed manifest, nothing to prove
            entry = decode_holder_entry(raw)
        except WireError:
            return True  # the record store refuses it anyway
        return not self.book.refused(entry, self._clock())

    def admitted(self, key: bytes, raw: bytes) -> None:
        """An entry from another peer was stored: challenge its claim if it is new."""
        try:
            if record_kind(raw) is RecordKind.MANIFEST:
                return
            entry = decode_holder_entry(raw)
        except WireError:
            return
        if entry.public_key == self.own_key:
            return
        claim = Claim.of(entry)
        want = self.book.want(claim, self._clock())
        if want is None:
            self.stats.skipped += 1
            return
        if not want:
            return
        ranges = self._ranges(claim) or [(entry.start, entry.end)]
        challenge = self.book.challenge(claim, ranges, self._rng, os.urandom(PROVE_NONCE_SIZE))
        self._spawn(self._run(challenge, entry.integrity))

    def _entries_of(self, claim: Claim) -> list[HolderEntry]:
        found = []
        for raw in split_entries(self._store().entries(claim.key, self._wall())).holders:
            with contextlib.suppress(WireError):
                e = decode_holder_entry(raw)
                if Claim.of(e) == claim:
                    found.append(e)
        return found

    def _ranges(self, claim: Claim) -> list[tuple[int, int]]:
        return [(e.start, e.end) for e in self._entries_of(claim)]

    # -- the challenge -----------------------------------------------------------------------

    async def _run(self, challenge: Challenge, integrity: bytes) -> None:
        claim = challenge.claim
        ok, why = False, "cancelled"
        try:
            async with self._slots:
                self.stats.challenges += 1
                why = await self._ask(challenge, integrity)
            ok = not why
            if why:
                log.info(
                    "holder_proof_failed holder=%s:%d key=%s version=%d reason=%s",
                    claim.host,
                    claim.port,
                    claim.key.hex()[:12],
                    claim.version,
                    why,
                )
        finally:
            # "not held" for one of several ranges: a stale entry of a holder that still
            # holds others; "not held" for its only range is a failure like any other
            entries = self._entries_of(claim) if why == NOT_HELD else []
            stale = [e for e in entries if (e.start, e.end) == (challenge.start, challenge.end)]
            only_stale = why == NOT_HELD and len(stale) < len(entries)
            if only_stale:
                self.book.settle_not_held(claim)
            else:
                self.book.settle(claim, ok, self._clock())
        if ok:
            self.stats.proven += 1
            return
        if only_stale:
            entries = stale
        else:
            self.stats.failed += 1
            entries = self._entries_of(claim)
        store = self._store()
        gone = [e.identity for e in entries]
        if gone:
            store.remove_entries(claim.key, gone)
            self.stats.removed += len(gone)

    async def _ask(self, challenge: Challenge, integrity: bytes) -> str:
        """Run one challenge; "" if the claim is proven, else why not."""
        claim = challenge.claim
        timeout = self.book.config.timeout
        try:
            async with asyncio.timeout(timeout):
                conn = await Connection.open(
                    (claim.host, claim.port),
                    io_timeout=timeout,
                    connect_timeout=timeout,
                    network=self._network,
                )
                try:
                    c = challenge
                    request = ProveRequest(claim.key, claim.version, c.start, c.end, c.nonce)
                    reply = await conn.request(request)
                    self.stats.bytes_in += len(repr(encode_reply("prove", reply)))
                    why = check_prove_reply(challenge, reply)
                    if why or challenge.segment is None:
                        return why
                    return await self._check_segment(conn, challenge, integrity)
                finally:
                    conn.close()
        except TimeoutError:
            return f"no answer within {timeout} s"
        except (DifsError, OSError) as exc:
            return f"{type(exc).__name__}: {exc}"

    async def _check_segment(self, conn: Connection, challenge: Challenge, integrity: bytes) -> str:
        claim = challenge.claim
        manifest = find_manifest(self._store(), claim.key, claim.version, integrity, self._wall())
        if manifest is None or challenge.segment is None:
            return ""  # the record is gone here: nothing to check the segment against
        hash_list = await self._get(conn, integrity)
        if hash_list is None:
            return "no hash list"
        ids = segments.verify_hash_list(hash_list, manifest.integrity, manifest.segment_count)
        index = challenge.segment
        if not 0 <= index < len(ids):
            return "segment index outside the object"
        data = await self._get(conn, bytes(ids[index]))
        if data is None:
            return "no segment"
        self.stats.segments += 1
        return await asyncio.to_thread(check_segment, manifest, hash_list, index, data)

    async def _get(self, conn: Connection, seg_id: bytes) -> bytes | None:
        await conn.send(wire.GetSeg(request_id=0, seg_id=SegmentId(seg_id), offset=0, length=0))
        frame = await conn.read_frame()
        if not isinstance(frame, wire.Data):
            return None
        data = bytes(frame.data)
        self.stats.bytes_in += len(data)
        return data
