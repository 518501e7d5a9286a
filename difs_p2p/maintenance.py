"""The pure decisions of maintenance: what a round looks after, when to read a name again,
what a view of a name says, which holders to probe, who is alive, what to repair, what to
free. No I/O: the round that feeds them events is ``repair.Maintainer`` (see repair.py for
how a round goes).
"""

from __future__ import annotations

import contextlib
import enum
from collections.abc import Callable, Mapping, Sequence, Set
from typing import TypeVar

from difs_p2p import segments
from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import DifsError
from difs_p2p.holders import HolderEntry, parse_holder_entry
from difs_p2p.holdings import Holding, Query
from difs_p2p.identity import NodeId, distance
from difs_p2p.manifest import Lineage, Manifest, linked, parse_manifest, supersedes
from difs_p2p.placement import RangeKey, range_key
from difs_p2p.records import split_entries

# -- pure decisions --------------------------------------------------------------------------


K = TypeVar("K", bound=bytes)


def keys_for_round(keys: Sequence[K], round_no: int, per_round: int) -> list[K]:
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


@valueclass(frozen=False)
class FailureDetector:
    """Counts failed probes in a row per peer; ``dead_after`` of them make a peer dead.

    A dead peer is probed less and less often (:meth:`due`): on the 1st, 2nd, 4th... round
    after each failure, at least every ``dead_backoff`` rounds. Its holder entries stay in
    the DHT until they expire (48 h), and every co-holder would otherwise try it every
    round; one that comes back is counted again within ``dead_backoff`` rounds.
    """

    dead_after: int
    dead_backoff: int = 16
    failures: dict[NodeId, int] = field(default_factory=dict)
    slow: dict[NodeId, float] = field(default_factory=dict)
    skipped: dict[NodeId, int] = field(default_factory=dict)

    def record(self, node_id: NodeId, ok: bool, seconds: float = 0.0) -> Health:
        self.skipped.pop(node_id, None)
        if ok:
            self.failures.pop(node_id, None)
            self.slow[node_id] = seconds
            return Health.ALIVE
        self.failures[node_id] = self.failures.get(node_id, 0) + 1
        return self.health(node_id)

    def due(self, node_id: NodeId) -> bool:
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

    def health(self, node_id: NodeId) -> Health:
        n = self.failures.get(node_id, 0)
        if n == 0:
            return Health.ALIVE
        return Health.DEAD if n >= self.dead_after else Health.SUSPECT


@valueclass(frozen=False)
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


def round_phase(node_id: NodeId) -> float:
    """Where in the interval a peer's maintenance rounds fall, in [0, 1): spread evenly
    over peers, the same for one peer across restarts."""
    return int.from_bytes(node_id[:4], "big") / 2**32


def plan_range(
    me: NodeId,
    key: RangeKey,
    alive: Sequence[NodeId],
    replicas: int,
    suspect: Sequence[NodeId] = (),
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


def bind_lineage(h: Holding, view: NameView) -> Lineage | None:
    """The lineage an unbound holding takes from a view: that of the manifest with its
    version and integrity in the history of the view's chosen record (the owner most of
    the k closest peers vouch for), or None. Pure."""
    newest = view.newest
    if h.lineage is not None or newest is None:
        return None
    for m in (newest, *view.proofs):
        if m.version == h.version and m.integrity == h.integrity and linked(m, newest):
            return m.lineage
    return None


# -- the view of a name between resolves, and the probes of one round ----------------------

# What one range check asks a co-holder: (name key, version, first segment, last segment).


@valueclass(frozen=False)
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
    for raw in [*records, *split_entries(raw_entries).history]:
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
    for raw in split_entries(raw_entries).holders:
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
        if m is None or m.integrity != h.integrity:
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
    if m is not None and m.integrity == h.integrity:
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


@valueclass
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
    def key(self) -> RangeKey:
        return range_key(self.holding.integrity, self.index)


def range_checks(held: Sequence[Holding], view: NameView, me: NodeId) -> list[RangeCheck]:
    """Every range of ``held`` whose version the view has a matching manifest for, with the
    view's other holders covering it (one entry per holder)."""
    checks: list[RangeCheck] = []
    for h in held:
        manifest = view.manifests.get(h.version)
        if manifest is None or manifest.integrity != h.integrity:
            continue
        ranges = segments.stripe_ranges(manifest.segment_count, manifest.stripes)
        for index, (start, end) in enumerate(ranges):
            if not (h.start <= start and end <= h.end):
                continue
            others: dict[NodeId, HolderEntry] = {}
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


@valueclass(frozen=False)
class ProbeBatch:
    """Everything one round asks one co-holder, over one connection."""

    address: tuple[str, int]
    queries: list[Query]


def probe_batches(
    checks: Sequence[RangeCheck], answers: Mapping[NodeId, Mapping[Query, bool] | None]
) -> dict[NodeId, ProbeBatch]:
    """Group the queries of ``checks`` by co-holder, one batch each, leaving out what
    ``answers`` (this round's) already has and holders that did not answer this round."""
    batches: dict[NodeId, ProbeBatch] = {}
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
    answers: Mapping[NodeId, Mapping[Query, bool] | None],
    health: Callable[[NodeId], Health],
) -> tuple[list[NodeId], list[NodeId]]:
    """The other holders of a range that answered holding it (alive), and those that may
    still hold it (suspect): silent this round but not yet dead, or not asked yet.

    A holder that answered that it does not hold the range counts as gone for it, as does
    one ``dead_after`` rounds silent.
    """
    alive: list[NodeId] = []
    suspect: list[NodeId] = []
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
    check: RangeCheck, alive: Sequence[NodeId], suspect: Sequence[NodeId], turned: Set[NodeId]
) -> bool:
    """Whether a range's check must be redone on a fresh resolve before acting: it looks
    short of copies (repair, and who leads it, need the current holder set: another
    holder may have repaired it already), or one of its holders turned suspect or dead
    this round."""
    short = len({*alive, *suspect}) + 1 < check.manifest.replicas
    return short or any(e.node_id in turned for e in check.others)
