"""The decisions of one fetch, without I/O: which segment to ask next of which holder, when
a holder is late, which segments to ask of another holder meanwhile, and when to give up.

:class:`FetchPlan` is a state machine fed events with the time they happened (``now``, in
seconds on any monotonic clock) and asked for decisions; ``fetchrun.SegmentRun`` owns the
sockets and does what it says. Three decisions stand alone: :func:`first_holders` (which
holders a fetch starts with), :func:`hedge_delay` (when the hash list is asked of one more
holder) and :meth:`FetchPlan.answer_problem` (whether a frame header may answer a request).
Nothing here sleeps, reads a clock or touches a socket, so the table tests in
``tests/test_fetchplan.py`` replay exact timelines.

A segment is *queued*, *flying* (asked of one or more holders), *arrived* (a copy is being
verified) or *done*. Each holder answers its requests in order (docs/PROTOCOL.md), so its
oldest request is the one it owes now; that request is *active* since it was sent or since
the fetch started waiting for the holder's next frame, whichever is later (time the fetch
spent verifying and writing is not the holder's fault).

Deadlines, like TCP's retransmission timeout (RFC 6298): each holder keeps a smoothed
first-byte delay with its deviation and its throughput so far (bytes over the time spent
receiving them). A request of ``size`` bytes is *late* after::

    max(late_floor, srtt + 4 * rttvar + 2 * size / throughput)

taken from the holder's own figures once it delivered a segment, else from the whole
fetch's (a holder is judged against its peers until it has a record), else
``initial_deadline``. A late holder is demoted: it is asked for nothing new until it
delivers, and the segments it owes are *hedged*: asked of another holder of their range
that is not late. The first copy that arrives is kept; a later copy of the same segment
(the loser) is read off its connection and dropped, so the request/reply order of the
connection is kept. A delivering holder is promoted again with the new figures. A holder
that sent no byte for ``max(quiet_floor, 16 deadlines)``, or whose oldest request is older
than ``max(give_up_floor, 16 deadlines)``, is given up: what it owes goes back to the
queue, and it is never asked again in this fetch.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable

from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import UsageError

Holder = tuple[str, int]

# The hash list is asked of one more holder after this long without an answer (or 3 x the
# fastest connect of the fetch, if longer): a LAN answers in about 1 ms.
HASH_LIST_HEDGE = 0.05

# Segment states.
QUEUED, FLYING, ARRIVED, DONE = range(4)


@valueclass
class PlanConfig:
    """How eagerly a fetch hedges and when it gives up on a holder."""

    # Requests in flight per holder connection: enough to keep a loopback link busy
    # (measured: 8); fewer for large segments (``pipeline_bytes``, ``depth``).
    pipeline: int = 8
    # The least time a request may take before its holder counts as late: a loaded CI
    # machine (two cores, several test runs) stalls a process's event loop for tens of ms;
    # a late verdict only costs a duplicate request, and a holder that delivers is promoted
    # again, so a slow but live holder stays in use.
    late_floor: float = 0.1
    # The deadline before any segment of the fetch arrived: TCP's initial RTO (RFC 6298).
    initial_deadline: float = 1.0
    # A holder that sent nothing for this long (or 16 deadlines) is given up; only a
    # holder with no alternative is waited for that long.
    quiet_floor: float = 10.0
    # A holder whose oldest request is older than this (or 16 deadlines) is given up, even
    # if it trickles bytes: the former fixed 30 s frame deadline, now a last resort.
    give_up_floor: float = 30.0
    # Deadlines in a give-up time (16 as in TCP's backoff limit of about 2^4 RTOs).
    give_up_factor: float = 16.0
    # How long other holders wait for the lead holder's first segment before they start:
    # the first segment comes alone from the holder connected already (started together,
    # every holder's pipeline would compete with it). 50 ms: a LAN delivers a first segment
    # in a few ms, and a slow lead holder delays the others by little.
    lead_head_start: float = 0.05

    def __post_init__(self) -> None:
        if self.pipeline < 1:
            raise UsageError("pipeline must be at least 1")
        if not 0 < self.late_floor <= self.initial_deadline:
            raise UsageError("need 0 < late_floor <= initial_deadline")
        if self.quiet_floor <= 0 or self.give_up_floor <= 0 or self.give_up_factor < 1:
            raise UsageError("give-up times must be positive")
        if self.lead_head_start < 0:
            raise UsageError("lead_head_start must not be negative")
        if self.pipeline_bytes < 1:
            raise UsageError("pipeline_bytes must be at least 1")

    # Large segments: pipelines budgeted in bytes.
    # Bytes of segments asked of one holder and not received yet: the 8 requests of 1 MiB
    # measured to keep a loopback link busy; with 4 MiB segments, 2 requests.
    pipeline_bytes: int = 8 << 20

    def depth(self, segment_size: int) -> int:
        """Requests in flight per holder for segments of ``segment_size`` bytes:
        ``pipeline``, or fewer so that they hold at most ``pipeline_bytes``; at least 1."""
        return max(1, min(self.pipeline, self.pipeline_bytes // max(1, segment_size)))


class Estimate:
    """Smoothed first-byte delay (RFC 6298 SRTT and RTTVAR) and throughput so far."""

    __slots__ = ("busy", "received", "rttvar", "srtt")

    def __init__(self) -> None:
        self.srtt: float | None = None
        self.rttvar = 0.0
        self.received = 0
        self.busy = 0.0

    @property
    def ready(self) -> bool:
        return self.srtt is not None and self.received > 0

    def first_byte(self, sample: float) -> None:
        sample = max(sample, 0.0)
        if self.srtt is None:
            self.srtt, self.rttvar = sample, sample / 2
        else:
            self.rttvar += (abs(self.srtt - sample) - self.rttvar) / 4
            self.srtt += (sample - self.srtt) / 8

    def transfer(self, nbytes: int, seconds: float) -> None:
        # A frame already in the socket buffer is read in microseconds: count at least 10 us.
        self.received += nbytes
        self.busy += max(seconds, 1e-5)

    def deadline(self, size: int, config: PlanConfig) -> float:
        if self.srtt is None or not self.received:
            return config.initial_deadline
        expected = self.srtt + 4 * self.rttvar + 2 * size * self.busy / self.received
        return max(config.late_floor, expected)


class PushPace:
    """How long a peer receiving a push (placement, repair, a drain) may stay silent, with
    no acknowledgement, before the push gives it up: the rule a fetch applies to a quiet
    holder (``give_up_factor`` of its measured deadlines, at least ``quiet_floor``), fed
    with the push's acknowledgements: the first one's delay, then the time between them.
    A silent peer or link costs ~16 s before the first acknowledgement and ~10 s after on
    a fast link (not a fixed 30 s), more on a slow one, in proportion to its rate."""

    __slots__ = ("_since", "config", "estimate")

    def __init__(self, config: PlanConfig | None = None) -> None:
        self.config = config or PlanConfig()
        self.estimate = Estimate()
        self._since: float | None = None

    def sent(self, now: float) -> None:
        """A segment went out (the first one starts the clock)."""
        if self._since is None:
            self._since = now

    def acked(self, size: int, now: float) -> None:
        """The receiver acknowledged a segment of ``size`` bytes."""
        since = now if self._since is None else self._since
        if self.estimate.srtt is None:
            self.estimate.first_byte(now - since)
        else:
            self.estimate.transfer(size, now - since)
        self._since = now

    def limit(self, size: int) -> float:
        """Seconds to wait for the next acknowledgement of a ``size``-byte segment."""
        deadline = self.estimate.deadline(size, self.config)
        return max(self.config.quiet_floor, self.config.give_up_factor * deadline)


@valueclass(frozen=False)
class _Request:
    index: int
    size: int
    sent: float


@valueclass(frozen=False)
class _Holder:
    inflight: collections.deque[_Request] = field(default_factory=collections.deque)
    estimate: Estimate = field(default_factory=Estimate)
    # since when the fetch waits for this holder's next frame (None: it does not wait now,
    # e.g. it is verifying or writing what came, which is not the holder's fault)
    waiting: float | None = None
    # when the first byte of the frame being received came (None: not started)
    head_first_byte: float | None = None
    last_byte: float = float("-inf")
    late: bool = False
    dead: bool = False


@valueclass
class Tick:
    """What a look at the clock found: holders newly late, holders to give up."""

    late: list[Holder]
    give_up: list[Holder]


class FetchPlan:
    """Segment states, requests in flight per holder, and the holders' figures."""

    def __init__(
        self,
        wanted: Iterable[int],
        size_of: Callable[[int], int],
        config: PlanConfig | None = None,
        segment_size: int = 0,
    ) -> None:
        self.config = config or PlanConfig()
        self.size_of = size_of
        # requests in flight per holder: the config's depth for ``segment_size`` (its
        # ``pipeline`` when no size is given)
        self.depth = self.config.depth(segment_size) if segment_size else self.config.pipeline
        self.queue: collections.deque[int] = collections.deque(dict.fromkeys(wanted))
        self.state: dict[int, int] = dict.fromkeys(self.queue, QUEUED)
        self.remaining = len(self.queue)
        # segment -> holders it is asked of now
        self.flying: dict[int, list[Holder]] = {}
        # segment -> holders that failed it (error, corrupt copy, lost connection)
        self.failed: dict[int, set[Holder]] = collections.defaultdict(set)
        self.holders: dict[Holder, _Holder] = {}
        # holders late now, in the order they became late (usually none: asking for a
        # segment looks here first)
        self._late: dict[Holder, None] = {}
        self.overall = Estimate()
        # requests that failed, segments asked of a second holder, holders ever late
        self.retries = 0
        self.hedged = 0
        self.late_seen: list[Holder] = []
        # bumped when a failure may leave a segment without any holder (see ``stuck``)
        self.failures = 0

    # -- queries ---------------------------------------------------------------------------

    def holder(self, h: Holder) -> _Holder:
        state = self.holders.get(h)
        if state is None:
            state = self.holders[h] = _Holder()
        return state

    def is_dead(self, h: Holder) -> bool:
        state = self.holders.get(h)
        return state is not None and state.dead

    def is_late(self, h: Holder) -> bool:
        state = self.holders.get(h)
        return state is not None and state.late

    def owes(self, h: Holder) -> int:
        """Requests ``h`` has not answered yet."""
        state = self.holders.get(h)
        return len(state.inflight) if state is not None else 0

    def next_size(self, h: Holder) -> int | None:
        """The size of the segment ``h`` answers next (its oldest request), None if it owes
        none."""
        state = self.holders.get(h)
        return state.inflight[0].size if state is not None and state.inflight else None

    @property
    def dead(self) -> set[Holder]:
        return {h for h, s in self.holders.items() if s.dead}

    def deadline(self, h: Holder, size: int) -> float:
        """Seconds a request of ``size`` bytes to ``h`` may take before ``h`` is late."""
        own = self.holder(h).estimate
        return (own if own.ready else self.overall).deadline(size, self.config)

    def _hedgeable(self, index: int) -> bool:
        """Asked only of holders that are late (or given up): another may be asked too."""
        if self.state.get(index) != FLYING:
            return False
        return all(self.holders[x].late or self.holders[x].dead for x in self.flying[index])

    def unserved(
        self,
        running: Iterable[Holder],
        idle: Iterable[Holder],
        serves: Callable[[Holder, int], bool],
    ) -> list[int]:
        """Segments that need a holder without a worker yet: those a late holder owes that
        no running holder in good standing can take, and, once every such holder is
        ``idle`` (it looked and found nothing), the queued ones."""
        able = [h for h in running if not self.is_late(h) and not self.is_dead(h)]
        need = [
            i
            for i in self._hedge_candidates()
            if not any(h not in self.failed[i] and serves(h, i) for h in able)
        ]
        if set(able) <= set(idle):
            need.extend(i for i in self.queue if self.state[i] == QUEUED)
        return need

    def could_take(self, h: Holder, segments: Iterable[int], serves: Callable[[int], bool]) -> bool:
        """Whether ``h`` (not running yet) could be given one of ``segments``."""
        state = self.holder(h)
        if state.dead or state.late:
            return False
        return any(h not in self.failed[i] and serves(i) for i in segments)

    def _hedge_candidates(self) -> list[int]:
        if not self._late:
            return []
        found: list[int] = []
        for h in self._late:
            found.extend(r.index for r in self.holders[h].inflight if self._hedgeable(r.index))
        return list(dict.fromkeys(found))

    def answer_problem(self, h: Holder, frame: str, length: int) -> str | None:
        """Why the frame header ``h`` just sent (type name, payload length) is not an answer
        to its oldest request, or None: only DATA of exactly the segment's size, or ERROR,
        may answer a GET_SEG. Checked before a byte of the payload is read: a holder that
        announces 16 MiB and stalls must not make the fetch hold that much."""
        if frame == "DATA":
            size = self.next_size(h)
            if length != size:
                return f"{length} bytes of data for a segment of {size} bytes"
            return None
        if frame == "ERROR":
            return None
        return f"unexpected {frame} frame"

    def stuck(self, possible: Callable[[int, set[Holder]], bool]) -> int | None:
        """A queued segment no holder can serve any more, or None.

        ``possible(index, excluded)`` says whether some holder that is not in ``excluded``
        may have the segment (the caller knows the holder entries)."""
        dead = self.dead
        for index in self.queue:
            if self.state[index] == QUEUED and not possible(index, self.failed[index] | dead):
                return index
        return None

    # -- decisions -------------------------------------------------------------------------

    def next_for(
        self, h: Holder, now: float, serves: Callable[[int], bool], limit: int | None = None
    ) -> int | None:
        """The segment to ask ``h`` for next (recorded as sent at ``now``), or None.

        Segments a late holder owes come first (a hedge), then the queue; never beyond
        ``limit`` (a stream's window), never one ``h`` failed or does not ``serve``."""
        state = self.holder(h)
        if state.dead or state.late or len(state.inflight) >= self.depth:
            return None
        for index in self._hedge_candidates():
            if (
                (limit is None or index <= limit)
                and h not in self.flying[index]
                and h not in self.failed[index]
                and serves(index)
            ):
                self.hedged += 1
                self._send(h, state, index, now)
                return index
        # In queue order, the ones passed over keep their places (a segment another holder
        # failed stays at the front for the next holder).
        for position, index in enumerate(self.queue):
            if (limit is None or index <= limit) and h not in self.failed[index] and serves(index):
                del self.queue[position]
                self._send(h, state, index, now)
                return index
        return None

    def _send(self, h: Holder, state: _Holder, index: int, now: float) -> None:
        state.inflight.append(_Request(index, self.size_of(index), now))
        self.state[index] = FLYING
        self.flying.setdefault(index, []).append(h)

    def tick(self, now: float) -> Tick:
        """Holders that became late by ``now``, and holders to give up."""
        late: list[Holder] = []
        give_up: list[Holder] = []
        for h, state in self.holders.items():
            if state.dead or not state.inflight or state.waiting is None:
                continue
            head = state.inflight[0]
            active = max(head.sent, state.waiting)
            if now < active:
                continue
            deadline = self.deadline(h, head.size)
            if not state.late and now - active > deadline:
                state.late = True
                self._late[h] = None
                late.append(h)
                if h not in self.late_seen:
                    self.late_seen.append(h)
            quiet = now - max(active, state.last_byte)
            factor = self.config.give_up_factor * deadline
            if quiet > max(self.config.quiet_floor, factor) or now - active > max(
                self.config.give_up_floor, factor
            ):
                give_up.append(h)
        return Tick(late, give_up)

    # -- events ----------------------------------------------------------------------------

    def waiting(self, h: Holder, now: float) -> None:
        """The fetch starts waiting for ``h``'s next frame."""
        state = self.holder(h)
        if state.head_first_byte is None:
            state.waiting = now

    def received(self, h: Holder, nbytes: int, now: float) -> None:
        """``nbytes`` of ``h``'s current frame came in."""
        state = self.holder(h)
        if state.head_first_byte is None:
            state.head_first_byte = now
        state.last_byte = now

    def seed(self, h: Holder, first_byte: float, nbytes: int, seconds: float) -> None:
        """Figures measured before the plan ran (the hash list's exchange with ``h``)."""
        for estimate in (self.holder(h).estimate, self.overall):
            estimate.first_byte(first_byte)
            estimate.transfer(nbytes, seconds)

    def _answered(self, h: Holder, now: float, nbytes: int) -> int:
        """Pop ``h``'s oldest request (its frame is in), update its figures; the index."""
        state = self.holder(h)
        head = state.inflight.popleft()
        first = state.head_first_byte if state.head_first_byte is not None else now
        active = max(head.sent, state.waiting if state.waiting is not None else head.sent)
        for estimate in (state.estimate, self.overall):
            estimate.first_byte(first - active)
            estimate.transfer(nbytes, now - first)
        state.head_first_byte = None
        state.waiting = None
        state.late = False
        self._late.pop(h, None)
        flying = self.flying.get(head.index)
        if flying is not None and h in flying:
            flying.remove(h)
        return head.index

    def arrived(self, h: Holder, now: float, nbytes: int) -> tuple[int, bool]:
        """``h``'s oldest request was answered with data: (index, whether the copy is
        wanted). An unwanted copy (another holder's arrived first) is to be dropped."""
        index = self._answered(h, now, nbytes)
        if self.state.get(index) != FLYING:
            return index, False
        self.state[index] = ARRIVED
        return index, True

    def refused(self, h: Holder, now: float) -> int:
        """``h``'s oldest request was answered with an error: the segment goes elsewhere."""
        index = self._answered(h, now, 0)
        self._fail(h, index)
        return index

    def corrupt(self, h: Holder, index: int) -> None:
        """The copy ``h`` sent of ``index`` did not verify."""
        if self.state.get(index) == ARRIVED:
            self.state[index] = FLYING
        self._fail(h, index)

    def verified(self, index: int) -> None:
        """A copy of ``index`` verified and was written out."""
        if self.state.get(index) != DONE:
            self.state[index] = DONE
            self.remaining -= 1

    def lost(self, h: Holder) -> list[int]:
        """``h`` failed or was given up: what it owed goes elsewhere; the indexes."""
        state = self.holder(h)
        state.dead = True
        self._late.pop(h, None)
        owed = [r.index for r in state.inflight]
        state.inflight.clear()
        for index in reversed(owed):  # back to the front of the queue in their order
            flying = self.flying.get(index)
            if flying is not None and h in flying:
                flying.remove(h)
            self._fail(h, index)
        self.failures += 1
        return owed

    def _fail(self, h: Holder, index: int) -> None:
        self.failed[index].add(h)
        self.retries += 1
        self.failures += 1
        if self.state.get(index) == FLYING and not self.flying.get(index):
            self.state[index] = QUEUED
            self.queue.appendleft(index)


def first_holders(
    sources: list[Holder],
    connected: set[Holder],
    queued: list[int],
    may_cover: Callable[[int], list[Holder]],
    most: int,
) -> list[Holder]:
    """The holders a fetch starts workers on: the ones connected already first (the lead
    is the first); with fewer segments ``queued`` than holders, only as many holders as
    there are segments, among those that may cover one (a 4 KiB object needs one
    connection, not one per holder); never more than ``most``."""
    ordered = sorted(sources, key=lambda a: a not in connected)
    if len(queued) >= len(ordered):
        return ordered[:most]
    able = [a for a in ordered if any(a in may_cover(i) for i in queued)]
    return able[: len(queued)]


def hedge_delay(connects: list[float]) -> float:
    """How long a fetch waits for the hash list before it asks one more holder:
    ``max(HASH_LIST_HEDGE, 3 x the fastest connect seen)``."""
    return max(HASH_LIST_HEDGE, 3 * min(connects)) if connects else HASH_LIST_HEDGE
