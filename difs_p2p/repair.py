"""Keeping data alive without the publisher: failure detection, repair, trimming, GC.

Every storage peer runs a :class:`Maintainer`. Each round (``RepairConfig.interval``) it
looks at every name version it holds:

* it reads the name's newest manifest and holder entries from the DHT;
* **GC**: if the name is deleted, or the held version is ``keep`` or more versions behind
  the newest, it frees the segments (so a holder that was offline during a delete frees
  them when it comes back);
* **failure detection**: it asks every other holder of its ranges whether it still holds
  them (``holds``). A holder that does not answer becomes *suspect*; after
  ``dead_after`` failed rounds in a row it is *dead* (a holder is probed until it fails
  once per round, however many ranges it shares). A holder that answers late is slow,
  not dead. Detection therefore takes at most ``dead_after x interval`` for a peer
  holding up to ``max_keys_per_round`` names; one holding more looks after a share of
  them per round (:func:`keys_for_round`), which multiplies that bound by
  ``ceil(names / max_keys_per_round)`` and keeps its background traffic bounded;
* **repair**: for a range with fewer than r live copies, the live holder closest to the
  range key (the *leader*; every holder computes the same one) copies it to the closest live
  peers to the range key that do not hold it, which sign and announce their own holder
  entries. Repair traffic goes through a token bucket (``bandwidth``);
* **trim**: if two leaders repaired at once and a range has more than r live copies, the
  single-range holders farthest from the range key drop theirs, so extra copies do not stay;
* **republish**: it re-announces its holder entries and re-stores the manifest and history
  (``republish_every``), so records outlive the peers that first stored them.

The decisions are pure functions (``plan_range``, ``gc_due``, :class:`FailureDetector`,
:class:`TokenBucket`); :class:`Maintainer` is the thin asyncio shell around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import sqlite3
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difs_p2p import segments
from difs_p2p.errors import DifsError, StorageError
from difs_p2p.manifest import HolderEntry, Manifest, parse_holder_entry, parse_manifest

if TYPE_CHECKING:
    from difs_p2p.peer import Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RepairConfig:
    """How a peer looks after what it holds."""

    # Seconds between maintenance rounds.
    interval: float = 60.0
    # Failed rounds in a row before a holder is dead: detection within 3 minutes by default.
    dead_after: int = 3
    # A holder answering a probe slower than this is slow (still alive); probes time out at
    # 2x this.
    slow_after: float = 2.0
    # Repair traffic per peer, bytes per second (50 MB/s leaves most of a link to users).
    bandwidth: float = 50e6
    # Superseded versions kept: the newest `keep` versions stay, older ones are collected.
    keep: int = 3
    # Re-announce holder entries and re-store manifests this often (records expire in 48 h).
    republish_every: float = 3600.0
    # A holding without any manifest in the DHT after this long belongs to a failed publish.
    orphan_after: float = 3600.0
    # Names looked after per round at most: each costs two DHT lookups and a probe per
    # co-holder, so a peer holding many names spreads them over several rounds (a name
    # comes up every ceil(names / max_keys_per_round) rounds) and its background traffic
    # stays bounded however much it holds.
    max_keys_per_round: int = 64


# -- pure decisions --------------------------------------------------------------------------


def keys_for_round(keys: Sequence[bytes], round_no: int, per_round: int) -> list[bytes]:
    """The names one round looks after: all of them, or a share when there are many.

    Keys are split into ``ceil(len / per_round)`` phases by their first bytes (uniform:
    they are hashes), and round n takes phase n mod phases, so every key comes up once per
    that many rounds and a round takes about ``per_round`` keys.
    """
    phases = max(1, -(-len(keys) // max(1, per_round)))
    phase = round_no % phases
    return [k for k in keys if int.from_bytes(k[:8], "big") % phases == phase]


class Health(enum.Enum):
    ALIVE = "alive"
    SUSPECT = "suspect"
    DEAD = "dead"


@dataclass(slots=True)
class FailureDetector:
    """Counts failed probes in a row per peer; ``dead_after`` of them make a peer dead."""

    dead_after: int
    failures: dict[bytes, int] = field(default_factory=dict)
    slow: dict[bytes, float] = field(default_factory=dict)

    def record(self, node_id: bytes, ok: bool, seconds: float = 0.0) -> Health:
        if ok:
            self.failures.pop(node_id, None)
            self.slow[node_id] = seconds
            return Health.ALIVE
        self.failures[node_id] = self.failures.get(node_id, 0) + 1
        return self.health(node_id)

    def health(self, node_id: bytes) -> Health:
        n = self.failures.get(node_id, 0)
        if n == 0:
            return Health.ALIVE
        return Health.DEAD if n >= self.dead_after else Health.SUSPECT


@dataclass(slots=True)
class TokenBucket:
    """Bytes per second with a burst of one second's worth."""

    rate: float
    tokens: float = 0.0
    last: float = 0.0

    def delay(self, n: int, now: float) -> float:
        """Seconds to wait before sending ``n`` bytes (and take them)."""
        self.tokens = min(self.rate, self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class Action(enum.Enum):
    NONE = "none"
    REPAIR = "repair"
    TRIM = "trim"


def _distance(a: bytes, b: bytes) -> int:
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def round_phase(node_id: bytes) -> float:
    """Where in the interval a peer's maintenance rounds fall, in [0, 1): spread evenly
    over peers, the same for one peer across restarts."""
    return int.from_bytes(node_id[:4], "big") / 2**32


def range_key(integrity: bytes, index: int) -> bytes:
    """Where range ``index`` of an object lives: the peers closest to this key."""
    return bytes(segments.segment_hash(integrity + index.to_bytes(4, "big")))[:20]


def plan_range(
    me: bytes,
    key: bytes,
    alive: Sequence[bytes],
    replicas: int,
    i_can_trim: bool,
    suspect: Sequence[bytes] = (),
) -> tuple[Action, int]:
    """What this holder should do for one range.

    ``alive`` are the holders that answered (``me`` included), ``suspect`` those that did
    not answer but are not yet dead. Suspects count against repair (a slow peer is not
    replaced at once) but not against trimming (a copy is only dropped when enough others
    answered). The live holder closest to ``key`` repairs a shortfall; a holder that may trim
    (it holds just this range) drops its copy when it is not among the ``replicas`` closest.
    """
    ordered = sorted(set(alive), key=lambda n: _distance(n, key))
    maybe = sorted(set(alive) | set(suspect), key=lambda n: _distance(n, key))
    if len(maybe) < replicas:
        return (Action.REPAIR, replicas - len(maybe)) if ordered[0] == me else (Action.NONE, 0)
    if len(ordered) > replicas and i_can_trim and me not in ordered[:replicas]:
        return Action.TRIM, 0
    return Action.NONE, 0


def gc_due(held_version: int, newest: Manifest | None, keep: int) -> bool:
    """Whether a held version may be freed: the name is deleted or ``keep`` versions newer."""
    if newest is None:
        return False
    return newest.deleted or newest.version - held_version >= keep


# -- what this peer holds ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Holding:
    key: bytes
    version: int
    integrity: bytes
    segment_count: int
    start: int
    end: int
    since: float

    @property
    def owner(self) -> bytes:
        """The reference tag of this holding's segments in the segment store."""
        return holding_owner(self.key, self.version, self.start)


def holding_owner(key: bytes, version: int, start: int) -> bytes:
    return key + version.to_bytes(8, "big") + start.to_bytes(4, "big")


class Holdings:
    """The ranges this peer has signed holder entries for (sqlite, survives restarts)."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            # As the segment index: a kill -9 loses no commit; a power loss may lose the
            # last ones, after which the other holders' repair restores the copies. The
            # default (rollback journal, full sync) cost ~20 ms per publish on this disk.
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.execute(
                "CREATE TABLE IF NOT EXISTS holdings(key BLOB, version INTEGER, integrity BLOB,"
                " count INTEGER, start INTEGER, end_ INTEGER, since REAL,"
                " PRIMARY KEY(key, version, start))"
            )
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {path}: {exc}") from None

    def add(self, h: Holding) -> None:
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO holdings VALUES(?,?,?,?,?,?,?)",
                (h.key, h.version, h.integrity, h.segment_count, h.start, h.end, h.since),
            )

    def remove(self, h: Holding) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM holdings WHERE key=? AND version=? AND start=?",
                (h.key, h.version, h.start),
            )

    def all(self) -> list[Holding]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM holdings ORDER BY key, version, start")
            return [Holding(bytes(r[0]), r[1], bytes(r[2]), r[3], r[4], r[5], r[6]) for r in rows]

    def of_key(self, key: bytes) -> list[Holding]:
        return [h for h in self.all() if h.key == key]

    def covers(self, key: bytes, version: int, start: int, end: int) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM holdings WHERE key=? AND version=? AND start<=? AND end_>=?",
                (key, version, start, end),
            ).fetchone()
        return row is not None

    def covers_integrity(self, integrity: bytes, start: int, end: int) -> bool:
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM holdings WHERE integrity=? AND start<=? AND end_>=?",
                (integrity, start, end),
            ).fetchone()
        return row is not None

    def close(self) -> None:
        with self._lock:
            self._db.close()


# What one range check asks a co-holder: (name key, version, first segment, last segment).
Query = tuple[bytes, int, int, int]


# -- the asyncio shell ----------------------------------------------------------------------


@dataclass(slots=True)
class RepairStats:
    rounds: int = 0
    repaired_ranges: int = 0
    repair_bytes: int = 0
    trimmed_ranges: int = 0
    collected_versions: int = 0
    freed_bytes: int = 0
    healed_segments: int = 0
    dead_peers: int = 0
    last_round: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


Probe = Callable[[tuple[str, int], dict[str, Any]], Awaitable[bool]]


class Maintainer:
    """Runs the maintenance rounds of one peer (see the module docstring)."""

    def __init__(self, peer: Peer, config: RepairConfig) -> None:
        self.peer = peer
        self.config = config
        self.detector = FailureDetector(config.dead_after)
        self.bucket = TokenBucket(config.bandwidth)
        self.stats = RepairStats()
        self._last_republish: dict[bytes, float] = {}
        self._lock = asyncio.Lock()
        # holders that did not answer a probe this round: not probed (or counted) again
        self._silent: set[bytes] = set()

    async def run(self) -> None:
        # Peers started together would all run their rounds at once (with 20 peers and
        # 600 objects, ~3,000 datagrams/s for 25 s of every minute); each peer's rounds
        # start at its own phase of the interval, taken from its node ID.
        await asyncio.sleep(self.config.interval * round_phase(self.peer.node_id))
        while True:
            try:
                await self.round()
            except DifsError as exc:
                log.warning("maintenance_round_failed reason=%s", exc)
            await asyncio.sleep(self.config.interval)

    async def round(self) -> None:
        """One pass over everything this peer holds."""
        async with self._lock:
            holdings = self.peer.holdings_db().all()
            by_key: dict[bytes, list[Holding]] = {}
            for h in holdings:
                by_key.setdefault(h.key, []).append(h)
            self._silent = set()
            chosen = keys_for_round(
                sorted(by_key), self.stats.rounds, self.config.max_keys_per_round
            )
            for key in chosen:
                held = by_key[key]
                try:
                    await self._maintain_key(key, held)
                except DifsError as exc:
                    log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
            self.stats.rounds += 1
            self.stats.last_round = self.peer.clock()

    async def _maintain_key(self, key: bytes, held: list[Holding]) -> None:
        dht = self.peer.dht_node()
        now = self.peer.clock()
        records, raw_entries = await dht.resolve(key)
        manifests: dict[int, Manifest] = {}
        for raw in [*records, *(e for e in raw_entries if e[:1] == b"{")]:
            with contextlib.suppress(DifsError):
                m = parse_manifest(raw, key)
                manifests.setdefault(m.version, m)
        newest = parse_manifest(records[0], key) if records else None
        entries: list[HolderEntry] = []
        for raw in raw_entries:
            if raw[:1] != b"{":
                with contextlib.suppress(DifsError):
                    entries.append(parse_holder_entry(raw))
        for h in held:
            manifest = manifests.get(h.version)
            if gc_due(h.version, newest, self.config.keep) or (
                newest is None and now - h.since > self.config.orphan_after
            ):
                await self._collect(h)
                continue
            if manifest is None or manifest.integrity != h.integrity.hex():
                continue
            await self._check_ranges(h, manifest, entries)
        if now - self._last_republish.get(key, 0.0) >= self.config.republish_every:
            self._last_republish[key] = now
            await self._republish(key, records, raw_entries)

    async def _republish(self, key: bytes, records: list[bytes], raw: list[bytes]) -> None:
        dht = self.peer.dht_node()
        if records:
            await dht.put(key, records[0])
        mine = [e.raw for e in self.peer.own_entries(key)]
        history = [e for e in raw if e[:1] == b"{"]
        if mine or history:
            await dht.add_entries(key, [*mine, *history])

    async def _collect(self, h: Holding) -> None:
        freed = await self.peer.free_holding(h)
        self.stats.collected_versions += 1
        self.stats.freed_bytes += freed
        log.info("gc key=%s version=%d freed=%d", h.key.hex()[:12], h.version, freed)

    async def _check_ranges(
        self, h: Holding, manifest: Manifest, entries: list[HolderEntry]
    ) -> None:
        me = self.peer.node_id
        ranges = segments.stripe_ranges(manifest.segment_count, manifest.stripes)
        for index, (start, end) in enumerate(ranges):
            if not (h.start <= start and end <= h.end):
                continue
            rkey = range_key(h.integrity, index)
            others: dict[bytes, HolderEntry] = {}
            for e in entries:
                if (
                    e.version == h.version
                    and e.integrity == h.integrity
                    and e.start <= start
                    and end <= e.end
                    and e.node_id != me
                ):
                    others[e.node_id] = e
            answers = await asyncio.gather(*(self._probe(e, start, end) for e in others.values()))
            alive = [me] + [n for n, a in zip(others, answers, strict=True) if a is Health.ALIVE]
            suspect = [n for n, a in zip(others, answers, strict=True) if a is Health.SUSPECT]
            can_trim = h.start == start and h.end == end
            action, missing = plan_range(me, rkey, alive, manifest.replicas, can_trim, suspect)
            log.debug(
                "range key=%s range=%d..%d alive=%d suspect=%d action=%s",
                h.key.hex()[:12],
                start,
                end,
                len(alive),
                len(suspect),
                action.value,
            )
            if action is Action.REPAIR:
                avoid = set(others)
                await self._repair(h, manifest, index, start, end, rkey, missing, avoid)
            elif action is Action.TRIM:
                await self.peer.free_holding(h)
                self.stats.trimmed_ranges += 1

    async def _probe(self, entry: HolderEntry, start: int, end: int) -> Health:
        """Ask a holder whether it still holds a range; feed the failure detector.

        ALIVE: it answered that it holds the range; SUSPECT: no answer yet, not dead;
        DEAD: no answer for ``dead_after`` rounds in a row, or it no longer holds the range.
        """
        if entry.node_id in self._silent:
            return self.detector.health(entry.node_id)  # one failure per peer and round
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await self.peer.probe_holder(
            (entry.host, entry.port),
            {"key": entry.key.hex(), "version": entry.version, "start": start, "end": end},
            limit=2 * self.config.slow_after,
        )
        before = self.detector.health(entry.node_id)
        health = self.detector.record(entry.node_id, answer is not None, loop.time() - t0)
        if answer is None:
            self._silent.add(entry.node_id)
        if health is Health.DEAD and before is not Health.DEAD:
            self.stats.dead_peers += 1
            log.info("holder_dead peer=%s:%d", entry.host, entry.port)
        if answer is False:
            return Health.DEAD
        return health

    async def _repair(
        self,
        h: Holding,
        manifest: Manifest,
        index: int,
        start: int,
        end: int,
        rkey: bytes,
        missing: int,
        avoid: set[bytes],
    ) -> None:
        dht = self.peer.dht_node()
        candidates = [
            c
            for c in await dht.closest(rkey, manifest.replicas + 8)
            if c.node_id != self.peer.node_id
            and c.node_id not in avoid
            and self.detector.health(c.node_id) is not Health.DEAD
        ]
        placed: list[HolderEntry] = []
        for contact in candidates:
            if len(placed) >= missing:
                break
            try:
                entry = await self.peer.push_range(
                    contact.address, h.key, h.version, h.integrity, start, end, self._pace
                )
            except DifsError as exc:
                log.info("repair_skip peer=%s reason=%s", contact.address, exc)
                continue
            placed.append(entry)
        if placed:
            await dht.add_entries(h.key, [e.raw for e in placed])
            self.stats.repaired_ranges += 1
            log.info(
                "repaired key=%s version=%d range=%d..%d copies=%d",
                h.key.hex()[:12],
                h.version,
                start,
                end,
                len(placed),
            )

    async def _pace(self, n: int) -> None:
        """Wait until ``n`` more bytes of repair traffic fit the bandwidth bound."""
        self.stats.repair_bytes += n
        delay = self.bucket.delay(n, asyncio.get_running_loop().time())
        if delay > 0:
            await asyncio.sleep(delay)
