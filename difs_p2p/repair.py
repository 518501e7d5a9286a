"""Keeping data alive without the publisher: failure detection, repair, trimming, GC.

Every storage peer runs a :class:`Maintainer`. Each round (``RepairConfig.interval``) it
looks at every name version it holds:

* **views**: it reads a name's newest manifest, history and holder entries from the DHT
  (a resolve: one Kademlia lookup, about 40 datagrams) only on one round in
  ``resolve_every`` (10), and keeps what it read (a :class:`NameView`) for the rounds in
  between. It reads at once when it has no view (after a start; the first rereads are then
  spread over the period by key, :func:`first_rounds`), when it holds a version the view
  has no manifest for (a new holding), when republishing, and when the probes below find
  a range short of copies or a holder that turned suspect or dead (:func:`needs_fresh_view`):
  repair, and which holder leads it, are always decided on a fresh holder set;
* **GC** (on each read): if the name is deleted, or the held version is ``keep`` or more
  versions behind the newest, it frees the segments (so a holder that was offline during a
  delete frees them when it comes back: it starts without views). Superseded and deleted
  versions are thus collected within ``resolve_every`` rounds of the name;
* **failure detection**: it asks every other holder of its ranges whether it still holds
  them, **one request per holder and round** carrying every range the two share, over one
  connection (``holds_ranges``; range by range with ``holds`` for peers without it). A
  holder that does not answer becomes *suspect*; after ``dead_after`` failed rounds in a
  row it is *dead*; the failure detector counts one probe per holder and round, however
  many names and ranges it shares. A holder that answers late is slow, not dead; one that
  answers that it does not hold a range counts as gone for that range. A dead holder is
  tried again after 1, 2, 4... rounds, at least every ``dead_backoff`` (16) rounds, not
  every round: its entries stay in the DHT until they expire (48 h), and every co-holder
  would otherwise keep trying it; one that comes back counts again once it answers.
  Detection therefore
  takes at most ``dead_after x interval`` for a peer holding up to ``max_keys_per_round``
  names; one holding more looks after a share of them per round (:func:`keys_for_round`),
  which multiplies that bound by ``ceil(names / max_keys_per_round)`` and keeps its
  background traffic bounded;
* **repair**: for a range with fewer than r live copies, the live holder closest to the
  range key (the *leader*; every holder computes the same one) copies it to the closest live
  peers to the range key that do not hold it, which sign and announce their own holder
  entries. Repair traffic goes through a token bucket (``bandwidth``);
* **trim**: if two leaders repaired at once and a range has more than r live copies, the
  single-range holders farthest from the range key drop theirs, so extra copies do not stay
  (a holder that learns of the extra copy only at its next read trims then);
* **republish**: it re-announces its holder entries and re-stores the manifest and history
  (``republish_every`` after the holding began, or after the last time), so records
  outlive the peers that first stored them.

So an idle peer's round costs one TCP connection per co-holder and, per name, a resolve
one round in ``resolve_every``, instead of a resolve and a connection per range and name.

The decisions are pure functions (``resolve_due``, ``collect_due``, ``range_checks``,
``probe_batches``, ``range_health``, ``needs_fresh_view``, ``plan_range``, ``gc_due``,
``republish_due``, :class:`FailureDetector`, :class:`TokenBucket`); :class:`Maintainer` is
the thin asyncio shell around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import logging
import sqlite3
import threading
from collections.abc import Callable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from difs_p2p import segments
from difs_p2p.config import RepairConfig
from difs_p2p.errors import AlreadyExistsError, DifsError, StorageError
from difs_p2p.identity import distance
from difs_p2p.manifest import (
    HolderEntry,
    Lineage,
    Manifest,
    linked,
    parse_holder_entry,
    parse_manifest,
    supersedes,
)

if TYPE_CHECKING:
    from difs_p2p.peer import Peer

log = logging.getLogger(__name__)


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
    """Counts failed probes in a row per peer; ``dead_after`` of them make a peer dead.

    A dead peer is probed less and less often (:meth:`due`): on the 1st, 2nd, 4th... round
    after each failure, at least every ``dead_backoff`` rounds. Its holder entries stay in
    the DHT until they expire (48 h), and every co-holder would otherwise try it every
    round; one that comes back is counted again within ``dead_backoff`` rounds.
    """

    dead_after: int
    dead_backoff: int = 16
    failures: dict[bytes, int] = field(default_factory=dict)
    slow: dict[bytes, float] = field(default_factory=dict)
    skipped: dict[bytes, int] = field(default_factory=dict)

    def record(self, node_id: bytes, ok: bool, seconds: float = 0.0) -> Health:
        self.skipped.pop(node_id, None)
        if ok:
            self.failures.pop(node_id, None)
            self.slow[node_id] = seconds
            return Health.ALIVE
        self.failures[node_id] = self.failures.get(node_id, 0) + 1
        return self.health(node_id)

    def due(self, node_id: bytes) -> bool:
        """Whether to probe a peer this round; if not, the round is counted as skipped."""
        beyond = self.failures.get(node_id, 0) - self.dead_after
        if beyond < 0:
            return True
        gap = min(self.dead_backoff, 2 ** min(beyond, 30))
        skipped = self.skipped.get(node_id, 0)
        if skipped + 1 >= gap:
            return True
        self.skipped[node_id] = skipped + 1
        return False

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
    suspect: Sequence[bytes] = (),
) -> tuple[Action, int]:
    """What this holder should do for one range.

    ``alive`` are the holders that answered (``me`` included), ``suspect`` those that did
    not answer but are not yet dead; they count against repair (a slow peer is not replaced
    at once). The live holder closest to ``key`` repairs a shortfall.

    A holder never drops its copy because others say they hold the range: an answer to a
    probe is a claim, and keys nearer a range key cost an attacker little to grind, so
    "extra copies" could be claimed to make every honest holder drop its own. Copies that
    two racing repairs made stay (they cost disk, never data).
    """
    ordered = sorted(set(alive), key=lambda n: distance(n, key))
    maybe = sorted(set(alive) | set(suspect), key=lambda n: distance(n, key))
    if len(maybe) < replicas:
        return (Action.REPAIR, replicas - len(maybe)) if ordered[0] == me else (Action.NONE, 0)
    return Action.NONE, 0


def gc_due(held: Lineage | None, proof: Manifest | None, keep: int, now: float) -> bool:
    """Whether ``proof`` lets a held version be freed at time ``now``: it supersedes the
    holding (same owner or a delegate of it, same lineage, higher version:
    :func:`manifest.supersedes`) and is a tombstone or ``keep`` versions newer. A holding
    whose lineage is not known yet is never freed this way; nor by a stranger's manifest,
    whatever its version. A delegate's proof counts only while its delegation runs by this
    peer's clock: the ``created`` time it signed is the delegate's own word, and a writer
    whose delegation ran out could otherwise backdate a tombstone."""
    if held is None or proof is None or not supersedes(proof, held):
        return False
    if proof.delegation is not None and now > proof.delegation.expires:
        return False
    return proof.deleted or proof.version - held.version >= keep


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
    # The owner, lineage root and manifest of the held version, once a manifest of it was
    # seen (a range is held before its manifest is signed: place comes before publish).
    lineage: Lineage | None = None

    @property
    def owner(self) -> bytes:
        """The reference tag of this holding's segments in the segment store."""
        return holding_owner(self.key, self.version, self.start)


def holding_owner(key: bytes, version: int, start: int) -> bytes:
    return key + version.to_bytes(8, "big") + start.to_bytes(4, "big")


class Holdings:
    """The ranges this peer has signed holder entries for (sqlite, survives restarts),
    with the lineage of each once known (owner key, lineage root, manifest hash)."""

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
            # Databases from before lineages get the columns in place; their rows learn
            # their lineage from the next view of their name (bind).
            have = {row[1] for row in self._db.execute("PRAGMA table_info(holdings)")}
            for column, decl in (("owner_key", "BLOB"), ("root", "TEXT"), ("manifest", "TEXT")):
                if column not in have:
                    self._db.execute(f"ALTER TABLE holdings ADD COLUMN {column} {decl}")
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open {path}: {exc}") from None

    def add(self, h: Holding) -> None:
        """Record a holding; one already known keeps the lineage it has.

        A holding bound to its owner's lineage is never replaced by another object under
        the same name, version and range (someone placing other bytes under a version the
        owner published): AlreadyExistsError. An unbound one may be (its version's manifest was
        not seen yet, so the newcomer may be the owner's).
        """
        with self._lock:
            lin = h.lineage
            row = self._db.execute(
                "SELECT owner_key, root, manifest, integrity FROM holdings WHERE key=?"
                " AND version=? AND start=? AND owner_key IS NOT NULL",
                (h.key, h.version, h.start),
            ).fetchone()
            if row is not None and bytes(row[3]) != h.integrity:
                raise AlreadyExistsError(
                    f"version {h.version} of this name is held here as another object, "
                    "signed by its owner"
                )
            if lin is None and row is not None:
                lin = Lineage(bytes(row[0]), str(row[1]), h.version, str(row[2] or ""))
            self._db.execute(
                "INSERT OR REPLACE INTO holdings(key, version, integrity, count, start, end_,"
                " since, owner_key, root, manifest) VALUES(?,?,?,?,?,?,?,?,?,?)",
                (
                    h.key,
                    h.version,
                    h.integrity,
                    h.segment_count,
                    h.start,
                    h.end,
                    h.since,
                    lin.owner if lin else None,
                    lin.root if lin else None,
                    lin.manifest if lin else None,
                ),
            )

    def bind(self, key: bytes, version: int, integrity: bytes, lineage: Lineage) -> int:
        """Record the lineage of held ranges of (key, version, integrity) that have none
        yet; a lineage once bound never changes. How many rows were bound."""
        with self._lock:
            cur = self._db.execute(
                "UPDATE holdings SET owner_key=?, root=?, manifest=? WHERE key=? AND version=?"
                " AND integrity=? AND owner_key IS NULL",
                (lineage.owner, lineage.root, lineage.manifest, key, version, integrity),
            )
            return int(cur.rowcount)

    def remove(self, h: Holding) -> None:
        with self._lock:
            self._db.execute(
                "DELETE FROM holdings WHERE key=? AND version=? AND start=?",
                (h.key, h.version, h.start),
            )

    def all(self) -> list[Holding]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, version, integrity, count, start, end_, since, owner_key, root,"
                " manifest FROM holdings ORDER BY key, version, start"
            ).fetchall()
        return [_holding(r) for r in rows]

    def get(self, key: bytes, version: int, start: int) -> Holding | None:
        """The holding of a range starting at ``start`` of one version, if any."""
        with self._lock:
            r = self._db.execute(
                "SELECT * FROM holdings WHERE key=? AND version=? AND start=?",
                (key, version, start),
            ).fetchone()
        return (
            None if r is None else Holding(bytes(r[0]), r[1], bytes(r[2]), r[3], r[4], r[5], r[6])
        )

    def of_key(self, key: bytes) -> list[Holding]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, version, integrity, count, start, end_, since, owner_key, root,"
                " manifest FROM holdings WHERE key=? ORDER BY version, start",
                (key,),
            ).fetchall()
        return [_holding(r) for r in rows]

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


def _holding(r: Sequence[Any]) -> Holding:
    lineage = None
    if r[7] is not None and r[8] is not None:
        lineage = Lineage(bytes(r[7]), str(r[8]), int(r[1]), str(r[9] or ""))
    return Holding(bytes(r[0]), r[1], bytes(r[2]), r[3], r[4], r[5], r[6], lineage)


def bind_lineage(h: Holding, view: NameView) -> Lineage | None:
    """The lineage an unbound holding takes from a view: that of the manifest with its
    version and integrity in the history of the view's chosen record (the owner most of
    the k closest peers vouch for), or None. Pure."""
    newest = view.newest
    if h.lineage is not None or newest is None:
        return None
    integrity = h.integrity.hex()
    for m in (newest, *view.proofs):
        if m.version == h.version and m.integrity == integrity and linked(m, newest):
            return m.lineage
    return None


# -- the view of a name between resolves, and the probes of one round ----------------------

# What one range check asks a co-holder: (name key, version, first segment, last segment).
Query = tuple[bytes, int, int, int]


@dataclass(slots=True)
class NameView:
    """A name as its last DHT resolve found it, used until the next one.

    ``rounds`` counts the rounds that used it, the resolving one included.
    """

    newest: Manifest | None
    manifests: dict[int, Manifest]
    entries: list[HolderEntry]
    rounds: int = 1
    # every valid manifest read, whoever signed it: GC frees a holding only on one of
    # these that supersedes it in its own lineage (gc_due)
    proofs: list[Manifest] = field(default_factory=list)


def read_view(key: bytes, records: Sequence[bytes], raw_entries: Sequence[bytes]) -> NameView:
    """What a resolve of ``key`` says: the best record (``records`` come best first, as
    the DHT's policy ranks them), the manifests of its lineage by version, every valid
    manifest (``proofs``) and the valid holder entries. Invalid items are skipped."""
    proofs: list[Manifest] = []
    for raw in [*records, *(e for e in raw_entries if e[:1] == b"{")]:
        with contextlib.suppress(DifsError):
            proofs.append(parse_manifest(raw, key))
    newest: Manifest | None = None
    if records:
        with contextlib.suppress(DifsError):
            newest = parse_manifest(records[0], key)
    manifests: dict[int, Manifest] = {}
    for m in proofs:
        if newest is None or linked(m, newest):
            manifests.setdefault(m.version, m)
    entries: list[HolderEntry] = []
    for raw in raw_entries:
        if raw[:1] != b"{":
            with contextlib.suppress(DifsError):
                entries.append(parse_holder_entry(raw))
    return NameView(newest, manifests, entries, proofs=proofs)


def first_rounds(key: bytes, every: int) -> int:
    """Where a name's first view after a start begins its count towards the next resolve:
    spread over 1..every by the key, so that names read together at a start are read again
    on different rounds, not all on one."""
    return 1 + int.from_bytes(key[8:16], "big") % max(1, every)


def republish_due(last: float | None, held: Sequence[Holding], now: float, every: float) -> bool:
    """Whether to store a name's records and own entries again: ``every`` seconds after
    the last time, or (none yet in this run) after the oldest holding began; a new holding's
    entry and manifest were stored by its publish or repair moments ago."""
    if last is None:
        if not held:
            return False
        last = min(h.since for h in held)
    return now - last >= every


def resolve_due(
    view: NameView | None,
    held: Sequence[Holding],
    every: int,
    republish_due: bool,
) -> bool:
    """Whether a name must be read from the DHT before this round checks it.

    It must when nothing was read yet (a restart starts with no views), every ``every``
    rounds (to see new versions and deletes: GC), when republishing (which stores what it
    read), and when the peer holds a version the view has no matching manifest for (a new
    holding, or a publish that has not stored its manifest yet).
    """
    if view is None or republish_due or view.rounds >= every:
        return True
    for h in held:
        m = view.manifests.get(h.version)
        if m is None or m.integrity != h.integrity.hex():
            return True
    return False


def orphaned(
    h: Holding, view: NameView, now: float, grace: float, per_segment: float = 0.0
) -> bool:
    """Whether a holding belongs to a publish that never happened: the view has no manifest
    of its version with its integrity root, no newer version either (an old version whose
    manifest left the history is ``gc_due``'s to judge), no holder entry for it (a publish
    announces its holders with the manifest; ``place`` alone announces nothing), and
    ``grace`` seconds plus ``per_segment`` per segment of the object have passed since the
    holding began."""
    m = view.manifests.get(h.version)
    if m is not None and m.integrity == h.integrity.hex():
        return False
    if view.newest is not None and view.newest.version > h.version:
        return False
    if any(e.version == h.version and e.integrity == h.integrity for e in view.entries):
        return False
    return now - h.since > grace + per_segment * h.segment_count


def collect_due(
    held: Sequence[Holding],
    view: NameView,
    now: float,
    keep: int,
    orphan_after: float,
    per_segment: float = 0.0,
) -> list[Holding]:
    """The holdings a fresh view says to free: superseded in their own lineage by a
    tombstone or by a version ``keep`` newer (``gc_due``, against every manifest the view
    read), or orphaned (:func:`orphaned`: no manifest of the version ``orphan_after``
    seconds after the holding began, plus ``per_segment`` per segment). A holding bound to
    its owner's lineage is never orphaned: its manifest was seen, and only the owner's
    proof frees it."""
    proofs = [*view.proofs, *view.manifests.values()]
    if view.newest is not None:
        proofs.append(view.newest)
    return [
        h
        for h in held
        if any(gc_due(h.lineage, m, keep, now) for m in proofs)
        or (h.lineage is None and orphaned(h, view, now, orphan_after, per_segment))
    ]


@dataclass(frozen=True, slots=True)
class RangeCheck:
    """One range this peer holds, and the other holders of it that the view knows."""

    holding: Holding
    manifest: Manifest
    index: int
    start: int
    end: int
    others: tuple[HolderEntry, ...]

    @property
    def query(self) -> Query:
        return (self.holding.key, self.holding.version, self.start, self.end)

    @property
    def key(self) -> bytes:
        return range_key(self.holding.integrity, self.index)


def range_checks(held: Sequence[Holding], view: NameView, me: bytes) -> list[RangeCheck]:
    """Every range of ``held`` whose version the view has a matching manifest for, with the
    view's other holders covering it (one entry per holder)."""
    checks: list[RangeCheck] = []
    for h in held:
        manifest = view.manifests.get(h.version)
        if manifest is None or manifest.integrity != h.integrity.hex():
            continue
        ranges = segments.stripe_ranges(manifest.segment_count, manifest.stripes)
        for index, (start, end) in enumerate(ranges):
            if not (h.start <= start and end <= h.end):
                continue
            others: dict[bytes, HolderEntry] = {}
            for e in view.entries:
                if (
                    e.version == h.version
                    and e.integrity == h.integrity
                    and e.start <= start
                    and end <= e.end
                    and e.node_id != me
                ):
                    others[e.node_id] = e
            checks.append(RangeCheck(h, manifest, index, start, end, tuple(others.values())))
    return checks


@dataclass(slots=True)
class ProbeBatch:
    """Everything one round asks one co-holder, over one connection."""

    address: tuple[str, int]
    queries: list[Query]


def probe_batches(
    checks: Sequence[RangeCheck], answers: Mapping[bytes, Mapping[Query, bool] | None]
) -> dict[bytes, ProbeBatch]:
    """Group the queries of ``checks`` by co-holder, one batch each, leaving out what
    ``answers`` (this round's) already has and holders that did not answer this round."""
    batches: dict[bytes, ProbeBatch] = {}
    for check in checks:
        query = check.query
        for e in check.others:
            node = e.node_id
            if node in answers:
                known = answers[node]
                if known is None or query in known:
                    continue
            batch = batches.setdefault(node, ProbeBatch((e.host, e.port), []))
            if query not in batch.queries:
                batch.queries.append(query)
    return batches


def range_health(
    check: RangeCheck,
    answers: Mapping[bytes, Mapping[Query, bool] | None],
    health: Callable[[bytes], Health],
) -> tuple[list[bytes], list[bytes]]:
    """The other holders of a range that answered holding it (alive), and those that may
    still hold it (suspect): silent this round but not yet dead, or not asked yet.

    A holder that answered that it does not hold the range counts as gone for it, as does
    one ``dead_after`` rounds silent.
    """
    alive: list[bytes] = []
    suspect: list[bytes] = []
    for e in check.others:
        node = e.node_id
        known = answers.get(node)
        if node in answers and known is None:
            if health(node) is Health.SUSPECT:
                suspect.append(node)
        elif known is None or check.query not in known:
            suspect.append(node)
        elif known[check.query]:
            alive.append(node)
    return alive, suspect


def needs_fresh_view(
    check: RangeCheck, alive: Sequence[bytes], suspect: Sequence[bytes], turned: Set[bytes]
) -> bool:
    """Whether a range's check must be redone on a fresh resolve before acting: it looks
    short of copies (repair, and who leads it, need the current holder set: another
    holder may have repaired it already), or one of its holders turned suspect or dead
    this round."""
    short = len({*alive, *suspect}) + 1 < check.manifest.replicas
    return short or any(e.node_id in turned for e in check.others)


# -- the asyncio shell ----------------------------------------------------------------------


@dataclass(slots=True)
class RepairStats:
    rounds: int = 0
    repaired_ranges: int = 0
    repair_bytes: int = 0
    collected_versions: int = 0
    freed_bytes: int = 0
    healed_segments: int = 0
    dead_peers: int = 0
    # DHT resolves of names, and holders probed (one connection each)
    resolves: int = 0
    probes: int = 0
    last_round: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__slots__}


# Co-holders probed at once: a round's probes all run in parallel (a silent holder takes
# up to 2 x slow_after), but a peer sharing names with hundreds of others does not open
# hundreds of connections at once.
PROBES_IN_FLIGHT = 32


class Maintainer:
    """Runs the maintenance rounds of one peer (see the module docstring)."""

    def __init__(self, peer: Peer, config: RepairConfig) -> None:
        self.peer = peer
        self.config = config
        self.detector = FailureDetector(config.dead_after, config.dead_backoff)
        self.bucket = TokenBucket(config.bandwidth)
        self.stats = RepairStats()
        # when this run last republished each name
        self._last_republish: dict[bytes, float] = {}
        self._lock = asyncio.Lock()
        # what the last resolve of each held name found
        self._views: dict[bytes, NameView] = {}
        # this round's answers per co-holder (None: it did not answer), and the holders
        # whose health got worse this round
        self._answers: dict[bytes, dict[Query, bool] | None] = {}
        self._turned: set[bytes] = set()

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
        """One pass over the names this round looks after (see the module docstring)."""
        async with self._lock:
            holdings = self.peer.holdings_db().all()
            by_key: dict[bytes, list[Holding]] = {}
            for h in holdings:
                by_key.setdefault(h.key, []).append(h)
            self._views = {k: v for k, v in self._views.items() if k in by_key}
            self._answers = {}
            self._turned = set()
            chosen = keys_for_round(
                sorted(by_key), self.stats.rounds, self.config.max_keys_per_round
            )
            checks: dict[bytes, list[RangeCheck]] = {}
            fresh: set[bytes] = set()
            for key in chosen:
                view = self._views.get(key)
                try:
                    republish = republish_due(
                        self._last_republish.get(key),
                        by_key[key],
                        self.peer.clock(),
                        self.config.republish_every,
                    )
                    if resolve_due(view, by_key[key], self.config.resolve_every, republish):
                        view, by_key[key] = await self._resolve(key, by_key[key])
                        fresh.add(key)
                    else:
                        assert view is not None
                        view.rounds += 1
                    checks[key] = range_checks(by_key[key], view, self.peer.node_id)
                except DifsError as exc:
                    log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
                    if view is not None:  # the DHT failed us: probe whom we knew of
                        checks[key] = range_checks(by_key[key], view, self.peer.node_id)
            await self._probe(checks)
            stale = [
                key
                for key, cs in checks.items()
                if key not in fresh
                and any(needs_fresh_view(c, *self._health_of(c), self._turned) for c in cs)
            ]
            for key in stale:
                try:
                    view, by_key[key] = await self._resolve(key, by_key[key])
                    checks[key] = range_checks(by_key[key], view, self.peer.node_id)
                except DifsError as exc:
                    log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
            if stale:
                await self._probe({key: checks[key] for key in stale})
            for key, cs in checks.items():
                for check in cs:
                    try:
                        await self._act(check)
                    except DifsError as exc:
                        log.info("maintain_failed key=%s reason=%s", key.hex()[:12], exc)
            self.stats.rounds += 1
            self.stats.last_round = self.peer.clock()

    async def _resolve(self, key: bytes, held: list[Holding]) -> tuple[NameView, list[Holding]]:
        """Read a name from the DHT, free what it says to free, republish when due; the
        view and the holdings left."""
        now = self.peer.clock()
        records, raw_entries = await self.peer.dht_node().resolve(key)
        self.stats.resolves += 1
        view = read_view(key, records, raw_entries)
        if key not in self._views:
            view.rounds = first_rounds(key, self.config.resolve_every)
        self._views[key] = view
        held = await self._bind(held, view)
        collect = collect_due(
            held,
            view,
            now,
            self.config.keep,
            self.config.orphan_grace,
            self.config.orphan_per_segment,
        )
        for h in collect:
            await self._collect(h)
        left = [h for h in held if h not in collect]
        last = self._last_republish.get(key)
        if republish_due(last, left, now, self.config.republish_every):
            self._last_republish[key] = now
            await self._republish(key, records, raw_entries)
        return view, left

    async def bind_from_dht(self, key: bytes, held: list[Holding]) -> list[Holding]:
        """Read ``key`` from the DHT and record the lineage of ``held`` holdings that have
        none yet (a release can come before this peer's first maintenance read)."""
        records, raw_entries = await self.peer.dht_node().resolve(key)
        return await self._bind(held, read_view(key, records, raw_entries))

    async def _bind(self, held: list[Holding], view: NameView) -> list[Holding]:
        """Record the lineage of holdings that have none yet from ``view``."""
        out = []
        for h in held:
            lineage = bind_lineage(h, view)
            if lineage is not None:
                db = self.peer.holdings_db()
                await asyncio.to_thread(db.bind, h.key, h.version, h.integrity, lineage)
                h = dataclasses.replace(h, lineage=lineage)
            out.append(h)
        return out

    async def _republish(self, key: bytes, records: list[bytes], raw: list[bytes]) -> None:
        dht = self.peer.dht_node()
        if records:
            await dht.put(key, records[0])
        mine = [e.raw for e in self.peer.own_entries(key)]
        history = [e for e in raw if e[:1] == b"{"]
        if mine or history:
            # history first: peers admit a holder entry only once they have the manifest
            # of its version (the record, or a history manifest)
            await dht.add_entries(key, [*history, *mine])

    async def _collect(self, h: Holding) -> None:
        freed = await self.peer.free_holding(h)
        self.stats.collected_versions += 1
        self.stats.freed_bytes += freed
        log.info("gc key=%s version=%d freed=%d", h.key.hex()[:12], h.version, freed)

    def _health_of(self, check: RangeCheck) -> tuple[list[bytes], list[bytes]]:
        return range_health(check, self._answers, self.detector.health)

    async def _probe(self, checks: Mapping[bytes, Sequence[RangeCheck]]) -> None:
        """Ask every co-holder of ``checks`` about all its ranges at once, all holders in
        parallel, and feed the failure detector once per holder and round."""
        batches = probe_batches([c for cs in checks.values() for c in cs], self._answers)
        for node in list(batches):
            if node not in self._answers and not self.detector.due(node):
                self._answers[node] = None  # dead and not due: counts as silent
                del batches[node]
        nodes = list(batches)
        slots = asyncio.Semaphore(PROBES_IN_FLIGHT)

        async def probe(batch: ProbeBatch) -> tuple[list[bool], float] | None:
            async with slots:
                return await self._probe_holder(batch)

        replies = await asyncio.gather(*(probe(batches[n]) for n in nodes))
        for node, batch, reply in zip(nodes, batches.values(), replies, strict=True):
            self.stats.probes += 1
            if node in self._answers:
                # asked again after a fresh resolve: its health was recorded this round
                known = self._answers[node]
                if known is not None and reply is not None:
                    known.update(zip(batch.queries, reply[0], strict=True))
                continue
            before = self.detector.health(node)
            health = self.detector.record(node, reply is not None, reply[1] if reply else 0.0)
            self._answers[node] = (
                None if reply is None else dict(zip(batch.queries, reply[0], strict=True))
            )
            if health is not Health.ALIVE and health is not before:
                self._turned.add(node)
            if health is Health.DEAD and before is not Health.DEAD:
                self.stats.dead_peers += 1
                log.info("holder_dead peer=%s:%d", *batch.address)

    async def _probe_holder(self, batch: ProbeBatch) -> tuple[list[bool], float] | None:
        """One holder's answers to a batch and how long they took, or None if silent."""
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        answer = await self.peer.probe_ranges(
            batch.address, batch.queries, limit=2 * self.config.slow_after
        )
        return None if answer is None else (answer, loop.time() - t0)

    async def _act(self, check: RangeCheck) -> None:
        """Repair one range if ``plan_range`` says so, from this round's answers."""
        me = self.peer.node_id
        h = check.holding
        others, suspect = self._health_of(check)
        alive = [me, *others]
        rkey = check.key
        action, missing = plan_range(me, rkey, alive, check.manifest.replicas, suspect)
        log.debug(
            "range key=%s range=%d..%d alive=%d suspect=%d action=%s",
            h.key.hex()[:12],
            check.start,
            check.end,
            len(alive),
            len(suspect),
            action.value,
        )
        if action is Action.REPAIR:
            avoid = {e.node_id for e in check.others}
            await self._repair(check, rkey, missing, avoid)

    async def _repair(
        self, check: RangeCheck, rkey: bytes, missing: int, avoid: set[bytes]
    ) -> None:
        dht = self.peer.dht_node()
        h, manifest, start, end = check.holding, check.manifest, check.start, check.end
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
            view = self._views.get(h.key)
            if view is not None:
                # the next rounds probe the new holders without reading the name again
                view.entries.extend(placed)
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
