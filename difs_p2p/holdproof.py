"""Proofs of holding: a DHT peer lists a holder entry only while its signer can prove it.

A holder entry is a signer's claim that its address serves a range of one version of a
name. When a DHT peer admits entries from another peer, it challenges each new claim (a
signer key at an address, for a name key and version) once, in an owned background task:

1. the claims pending for one holder (signer key and address) are gathered for
   ``gather`` seconds (``batch`` at most in one) and sent as one ``prove_many``
   with a fresh 32-byte nonce and one of each claim's ranges; the holder answers, per
   item, whether it holds the range, and its node key's signature over
   :func:`prove_many_message` (domain, nonce, every item and every answer). A holder
   that does not know ``prove_many`` (it answers "unknown operation") is asked the old
   way, one ``prove`` per claim on the same connection (signature over
   :func:`prove_message`: domain, nonce, name key, version, range), and remembered as
   such for ``proven_ttl``;
2. on a sampled share of the challenges (``segment_share``, 2/k by default: about two of
   the k listing peers of a key), it also reads the version's hash list and one random
   segment of the range from that address, and checks them against the integrity root
   and segment count of the owner's manifest in its own record store.

The connection to a holder is kept (at most ``pool`` idle ones, each for ``pool_idle``
seconds) for its next batch; a kept connection that fails before its answer (the holder
restarted, or closed it idle) is replaced by a new one once, so only a fresh connection's
failure counts. New connections are opened at most ``connects_per_s`` a second.

A claim that fails (no connection or answer within the deadline, another key, a bad
signature, "does not hold", a bad hash list or segment) loses its entries at this peer,
and the (signer, address) is refused for ``failed_ttl``; a proven claim is not asked
again for ``proven_ttl``. Unproven entries are served while their challenge runs (a
fetch that follows its publish at once must find them; readers route around false
holders anyway).

:class:`ProofBook` holds every decision, without I/O (bounded caches, what to challenge,
sampling, what a reply proves); :class:`HolderProver` is the thin asyncio shell. The
module is longer than most: the rules, the two wire forms of a challenge and the shell
that batches claims and keeps connections are read together when a proof is reviewed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import struct
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Final

from difs_p2p import segments, wire
from difs_p2p.classgen import field, valueclass
from difs_p2p.config import ProofConfig
from difs_p2p.errors import DifsError, IntegrityError, RemoteUnsupportedError, WireError
from difs_p2p.holders import HolderEntry, decode_holder_entry
from difs_p2p.identity import verify_signature
from difs_p2p.manifest import Manifest, parse_manifest
from difs_p2p.names import NameKey
from difs_p2p.net import Connector
from difs_p2p.ops import (
    ProveManyReply,
    ProveManyRequest,
    ProveReply,
    ProveRequest,
    RangeRequest,
    decode_reply,
    encode_reply,
)
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


PROVE_MANY_DOMAIN: Final = b"difs-hold-proof-many-v1\x00"


def prove_many_message(nonce: bytes, items: Sequence[RangeRequest], holds: Sequence[bool]) -> bytes:
    """What a holder signs to answer a ``prove_many``: domain || nonce || count, then per
    item key || version, start, end || held (one byte)."""
    if len(items) != len(holds):
        raise ValueError("one answer per item")
    parts = [PROVE_MANY_DOMAIN, nonce, struct.pack("!I", len(items))]
    for r, held in zip(items, holds, strict=True):
        parts.append(bytes(r.key) + struct.pack("!QQQ?", r.version, r.start, r.end, held))
    return b"".join(parts)


@valueclass
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


@valueclass
class Challenge:
    """One challenge to send: the range asked about, the nonce, and the segment index to
    read and verify (None: identity and claim only)."""

    claim: Claim
    start: int
    end: int
    nonce: bytes
    segment: int | None


@valueclass(frozen=False)
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
    # prove_many requests sent, connections opened, kept connections reused
    batches: int = 0
    connections: int = 0
    reused: int = 0


def _put_bounded(cache: OrderedDict[Any, float], item: object, until: float, cap: int) -> None:
    cache[item] = until
    cache.move_to_end(item)
    while len(cache) > cap:
        cache.popitem(last=False)


@valueclass(frozen=False)
class ProofBook:
    """Every decision of the challenger, without I/O: times are passed in."""

    config: ProofConfig = field(default_factory=ProofConfig)
    # claim -> until when it counts as proven
    proven: OrderedDict[Claim, float] = field(default_factory=OrderedDict)
    # (signer, host, port) -> until when its entries are refused
    failed: OrderedDict[tuple[bytes, str, int], float] = field(default_factory=OrderedDict)
    pending: set[Claim] = field(default_factory=set)
    # pending claims per name key and per signer (the bounds of want)
    per_key: Counter[bytes] = field(default_factory=Counter)
    per_signer: Counter[bytes] = field(default_factory=Counter)
    # (host, port) -> until when it is asked the old way (it did not know prove_many)
    old_style: OrderedDict[tuple[str, int], float] = field(default_factory=OrderedDict)

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
        if self.per_key[claim.key] >= cfg.max_pending_per_key:
            return None
        if self.per_signer[claim.signer] >= cfg.max_pending_per_signer:
            return None
        return True

    def _add_pending(self, claim: Claim) -> None:
        if claim not in self.pending:
            self.pending.add(claim)
            self.per_key[claim.key] += 1
            self.per_signer[claim.signer] += 1

    def drop(self, claim: Claim) -> None:
        """``claim`` is no longer pending (settled, or its challenge was cancelled)."""
        if claim in self.pending:
            self.pending.discard(claim)
            for counter, item in ((self.per_key, claim.key), (self.per_signer, claim.signer)):
                counter[item] -= 1
                if counter[item] <= 0:
                    del counter[item]

    def is_old_style(self, address: tuple[str, int], now: float) -> bool:
        """Whether ``address`` answered "unknown operation" to prove_many lately."""
        until = self.old_style.get(address)
        return until is not None and until > now

    def mark_old_style(self, address: tuple[str, int], now: float) -> None:
        cfg = self.config
        _put_bounded(self.old_style, address, now + cfg.proven_ttl, cfg.remembered)

    def challenge(
        self, claim: Claim, ranges: Sequence[tuple[int, int]], rng: random.Random, nonce: bytes
    ) -> Challenge:
        """The challenge for ``claim``: one of its ranges at random, and with probability
        ``segment_share`` a random segment index of that range to read."""
        if not ranges:
            raise ValueError("a claim has at least one range")
        start, end = ranges[rng.randrange(len(ranges))]
        segment = rng.randint(start, end) if rng.random() < self.config.segment_share else None
        self._add_pending(claim)
        return Challenge(claim, start, end, nonce, segment)

    def settle(self, claim: Claim, ok: bool, now: float) -> None:
        """Record the outcome of a challenge of ``claim``."""
        self.drop(claim)
        cfg = self.config
        if ok:
            _put_bounded(self.proven, claim, now + cfg.proven_ttl, cfg.remembered)
        else:
            self.proven.pop(claim, None)
            _put_bounded(self.failed, claim.holder, now + cfg.failed_ttl, cfg.remembered)

    def settle_not_held(self, claim: Claim) -> None:
        """The holder answered, truthfully, that it no longer holds the challenged range:
        neither proven nor failed (its other entries stay, it is not refused)."""
        self.drop(claim)


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


def check_prove_many_reply(
    signer: bytes, nonce: bytes, items: Sequence[RangeRequest], reply: ProveManyReply
) -> list[str]:
    """What a ``prove_many`` reply proves, per item: "" if the signer holds its range,
    :data:`NOT_HELD` if it says it does not, else why not (every item fails when the
    answers are not one per item or the signature is not the signer's)."""
    if len(reply.holds) != len(items):
        return ["the reply does not answer every item"] * len(items)
    if any(reply.holds):
        message = prove_many_message(nonce, items, reply.holds)
        try:
            verify_signature(signer, reply.sig or b"", message)
        except IntegrityError:
            return ["the signature is not the entry's key's"] * len(items)
    return ["" if held else NOT_HELD for held in reply.holds]


@valueclass(frozen=False)
class ConnectBudget:
    """New connections per second with a burst of one second's worth."""

    rate: float
    tokens: float = 0.0
    last: float | None = None

    def delay(self, now: float) -> float:
        """Seconds to wait before opening one more connection (and take it)."""
        if self.last is None:
            self.tokens = self.rate
        else:
            self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= 1.0
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


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
        # claims waiting per holder (signer, host, port), holders whose batches run, and
        # idle kept connections: (host, port) -> (connection, since when idle)
        self._waiting: dict[tuple[bytes, str, int], list[tuple[Challenge, bytes]]] = {}
        self._running: set[tuple[bytes, str, int]] = set()
        self._pool: OrderedDict[tuple[str, int], tuple[Connection, float]] = OrderedDict()
        self._budget = ConnectBudget(config.connects_per_s)

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
        self._queue(challenge, entry.integrity)

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

    # -- the challenge ---------------------------------------------------------------------

    def close(self) -> None:
        """Close the kept connections (the peer stops; its tasks are cancelled first)."""
        for conn, _ in self._pool.values():
            conn.close()
        self._pool.clear()

    def _queue(self, challenge: Challenge, integrity: bytes) -> None:
        holder = challenge.claim.holder
        waiting = self._waiting.setdefault(holder, [])
        waiting.append((challenge, integrity))
        if len(waiting) == 1 and holder not in self._running:
            self._running.add(holder)
            self._spawn(self._drain(holder))

    async def _drain(self, holder: tuple[bytes, str, int]) -> None:
        """Challenge the claims waiting for ``holder`` in batches until none wait."""
        cfg = self.book.config
        try:
            while self._waiting.get(holder):
                if len(self._waiting[holder]) < cfg.batch and cfg.gather > 0:
                    await asyncio.sleep(cfg.gather)
                waiting = self._waiting[holder]
                batch, self._waiting[holder] = waiting[: cfg.batch], waiting[cfg.batch :]
                try:
                    async with self._slots:
                        self.stats.challenges += len(batch)
                        whys = await self._ask_batch(holder, batch)
                except BaseException:
                    for c, _ in batch:
                        self.book.drop(c.claim)
                    raise
                for (c, _), why in zip(batch, whys, strict=True):
                    self._settle(c, why)
        finally:
            self._running.discard(holder)
            for c, _ in self._waiting.pop(holder, []):
                self.book.drop(c.claim)

    def _settle(self, challenge: Challenge, why: str) -> None:
        claim = challenge.claim
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
        gone = [e.identity for e in entries]
        if gone:
            self._store().remove_entries(claim.key, gone)
            self.stats.removed += len(gone)

    async def _ask_batch(
        self, holder: tuple[bytes, str, int], batch: list[tuple[Challenge, bytes]]
    ) -> list[str]:
        """Run one batch of challenges (and the integrity roots of their claims) to one
        holder; per challenge, "" if proven, else why not."""
        address = (holder[1], holder[2])
        challenges = [c for c, _ in batch]
        timeout = self.book.config.timeout
        try:
            async with asyncio.timeout(timeout):
                conn, reused = await self._connect(address)
                try:
                    try:
                        whys = await self._prove(conn, address, challenges)
                    except (DifsError, OSError):
                        if not reused:
                            raise
                        # a kept connection the holder closed (idle, or it restarted)
                        conn.close()
                        conn, _ = await self._connect(address, fresh=True)
                        whys = await self._prove(conn, address, challenges)
                    for i, (c, integrity) in enumerate(batch):
                        if not whys[i] and c.segment is not None:
                            whys[i] = await self._check_segment(conn, c, integrity)
                except BaseException:
                    conn.close()
                    raise
                self._keep(address, conn)
                return whys
        except TimeoutError:
            return [f"no answer within {timeout} s"] * len(challenges)
        except (DifsError, OSError) as exc:
            return [f"{type(exc).__name__}: {exc}"] * len(challenges)

    async def _prove(
        self, conn: Connection, address: tuple[str, int], challenges: list[Challenge]
    ) -> list[str]:
        """Ask ``prove_many`` (or ``prove`` per claim, of an old holder)."""
        signer = challenges[0].claim.signer
        if not self.book.is_old_style(address, self._clock()):
            items = tuple(
                RangeRequest(c.claim.key, c.claim.version, c.start, c.end) for c in challenges
            )
            nonce = os.urandom(PROVE_NONCE_SIZE)
            try:
                reply = await conn.request(ProveManyRequest(items, nonce))
            except RemoteUnsupportedError:
                self.book.mark_old_style(address, self._clock())
            else:
                self.stats.batches += 1
                self.stats.bytes_in += len(repr(encode_reply("prove_many", reply)))
                return check_prove_many_reply(signer, nonce, items, reply)
        whys = []
        for c in challenges:
            request = ProveRequest(c.claim.key, c.claim.version, c.start, c.end, c.nonce)
            one = await conn.request(request)
            self.stats.bytes_in += len(repr(encode_reply("prove", one)))
            whys.append(check_prove_reply(c, one))
        return whys

    async def _connect(
        self, address: tuple[str, int], *, fresh: bool = False
    ) -> tuple[Connection, bool]:
        """A kept connection to ``address`` (True), or a new one (False)."""
        now = self._clock()
        kept = self._pool.pop(address, None)
        if kept is not None:
            conn, since = kept
            if not fresh and since + self.book.config.pool_idle > now:
                self.stats.reused += 1
                return conn, True
            conn.close()
        wait = self._budget.delay(now)
        if wait > 0:
            await asyncio.sleep(wait)
        timeout = self.book.config.timeout
        conn = await Connection.open(
            address, io_timeout=timeout, connect_timeout=timeout, network=self._network
        )
        self.stats.connections += 1
        return conn, False

    def _keep(self, address: tuple[str, int], conn: Connection) -> None:
        """Keep ``conn`` for the next batch (closing the oldest or expired beyond the pool)."""
        cfg = self.book.config
        now = self._clock()
        old = self._pool.pop(address, None)
        if old is not None:
            old[0].close()
        if cfg.pool == 0:
            conn.close()
            return
        self._pool[address] = (conn, now)
        while self._pool:
            first, (oldest, since) = next(iter(self._pool.items()))
            if len(self._pool) <= cfg.pool and since + cfg.pool_idle > now:
                break
            del self._pool[first]
            oldest.close()

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
