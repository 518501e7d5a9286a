"""The peer's figures in the Prometheus text format (served on ``/metrics`` by the gateway).

Two halves:

- plain counters the I/O modules update where an event happens, each counted in exactly
  one place, each an int increment or a bucket increment (no locks: one event loop):
  :class:`Histogram` (cumulative buckets kept here, fixed bounds 1 ms .. 10 s),
  :class:`RpcStats` (the DHT's outgoing requests by name and outcome, and their
  durations; kept by ``dhtproto``) and :class:`GatewayMetrics` (the HTTP gateway's
  responses, requests in flight, time to first byte and body bytes sent);
- :func:`render`: a fresh ``prometheus_client.CollectorRegistry`` per scrape, with one
  collector that reads the peer's live figures at that moment (the store, the DHT, the
  maintenance counters, the service's served bytes, the gateway's counters) and the
  library's process collector, written out by ``generate_latest``. Nothing is kept in a
  global registry and no metric object is shared between peers, so many peers in one
  process (tests, the simulator) never mix their figures.

Names follow Prometheus' rules: the ``difs_`` prefix, base units (bytes, seconds),
``_total`` on counters. Labels take values from fixed sets only (RPC names, outcomes,
network states, status codes): never a content name, a key or a peer's address.

``prometheus_client`` is imported when a scrape renders (its import costs ~70 ms,
which every ``difs`` command would otherwise pay through ``dhtproto``).
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Final, Protocol

from difs_p2p.membership import ISOLATED, OK, THIN

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

# Upper bounds (seconds) of the histograms' buckets: 1 ms .. 10 s, about three per
# decade, as Prometheus' own defaults span (a DHT request on a LAN is ~1 ms, a request
# that times out takes seconds; a gateway's first byte comes after a name's lookup).
BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Outcomes of one outgoing DHT request: a reply; no reply in time; not sent (the address
# refused, the request too large, the socket closed); a reply that only gave a token (the
# peer answers nothing larger until our address is proven there).
RPC_OUTCOMES: Final = ("ok", "timeout", "error", "refused")
# An RPC name outside the set a RpcStats was made for is counted as this one.
OTHER_RPC: Final = "other"

# Gateway status codes counted by their exact value; any other as its class ("5xx").
GATEWAY_CODES: Final = frozenset(
    {200, 204, 206, 301, 304, 400, 403, 404, 405, 408, 410, 412, 416, 429, 500, 502, 503, 504}
)

NETWORK_STATES: Final = (OK, THIN, ISOLATED)


class Histogram:
    """Observations counted into fixed buckets, kept for Prometheus' cumulative form.

    ``counts[i]`` counts the values in ``(bounds[i-1], bounds[i]]``; the last one, those
    above every bound (+Inf). A negative or NaN value (a clock stepped back) counts as 0.
    """

    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = BUCKETS) -> None:
        bounds = tuple(float(b) for b in bounds)
        if not bounds or any(not math.isfinite(b) for b in bounds):
            raise ValueError("histogram bounds must be finite and not empty")
        if any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError("histogram bounds must increase")
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.count = 0
        self.sum = 0.0

    def observe(self, value: float) -> None:
        if not value >= 0.0:  # also NaN
            value = 0.0
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, int]]:
        """(upper bound as Prometheus writes it, observations <= it), ending at +Inf."""
        out: list[tuple[str, int]] = []
        running = 0
        for bound, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            running += n
            out.append((_bound_label(bound), running))
        return out


def _bound_label(bound: float) -> str:
    if math.isinf(bound):
        return "+Inf"
    return repr(bound)


class RpcStats:
    """Outgoing DHT requests: how many of each name ended in each outcome, and how long
    the answered ones took. Names outside ``names`` count as ``other``."""

    __slots__ = ("counts", "durations", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = (*sorted(set(names)), OTHER_RPC)
        self.counts = {(n, o): 0 for n in self.names for o in RPC_OUTCOMES}
        self.durations = {n: Histogram() for n in self.names}

    def record(self, name: str, outcome: str, seconds: float | None = None) -> None:
        """One request ``name`` ended in ``outcome``; ``seconds`` from send to reply."""
        if name not in self.durations:
            name = OTHER_RPC
        key = (name, outcome)
        if key not in self.counts:
            raise ValueError(f"unknown outcome {outcome!r}")
        self.counts[key] += 1
        if seconds is not None:
            self.durations[name].observe(seconds)


def status_label(status: int) -> str:
    """The ``code`` label of an HTTP status: itself if in ``GATEWAY_CODES``, else its
    class (``4xx``), else ``other`` (outside 100..599)."""
    if status in GATEWAY_CODES:
        return str(status)
    if 100 <= status <= 599:
        return f"{status // 100}xx"
    return "other"


class GatewayMetrics:
    """What the HTTP gateway counts; plain numbers, no I/O.

    ``observe`` once per response (status, seconds to the first body byte or None),
    ``inflight()`` around each request, ``sent(n)`` for body bytes written
    (``fetched_bytes``: the content the gateway's clients fetched through it), and
    ``received(n)`` for the verified segment bytes the gateway's own client fetched from
    holders (part of ``difs_segment_fetched_bytes_total``)."""

    def __init__(self) -> None:
        self.responses: dict[str, int] = {}
        self.in_flight = 0
        self.fetched_bytes = 0
        self.received_bytes = 0
        self.ttfb = Histogram()

    def observe(self, status: int, ttfb: float | None) -> None:
        code = status_label(status)
        self.responses[code] = self.responses.get(code, 0) + 1
        if ttfb is not None:
            self.ttfb.observe(ttfb)

    @contextlib.contextmanager
    def inflight(self) -> Iterator[None]:
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    def sent(self, n: int) -> None:
        self.fetched_bytes += n

    def received(self, n: int) -> None:
        self.received_bytes += n


# -- what render reads of a peer (structural: this module is below the peer's parts) ----


class _Store(Protocol):
    @property
    def used(self) -> int: ...
    @property
    def capacity(self) -> int: ...
    @property
    def count(self) -> int: ...


class _Membership(Protocol):
    @property
    def state(self) -> str: ...


class _DhtProtocol(Protocol):
    @property
    def rpcs(self) -> RpcStats: ...


class _Dht(Protocol):
    @property
    def protocol(self) -> _DhtProtocol | None: ...
    def contacts(self) -> Sequence[object]: ...
    def traffic(self) -> Mapping[str, int]: ...
    def network_state(self) -> _Membership: ...


class _RepairStats(Protocol):
    @property
    def repair_bytes(self) -> int: ...
    @property
    def under_replicated(self) -> int: ...


class _Replicator(Protocol):
    @property
    def fetched_bytes(self) -> int: ...
    @property
    def verification_failures(self) -> int: ...


class _Maintainer(Protocol):
    @property
    def stats(self) -> _RepairStats: ...
    @property
    def replicator(self) -> _Replicator: ...


class _Service(Protocol):
    @property
    def served_bytes(self) -> int: ...


class Scraped(Protocol):
    """What :func:`render` reads of a peer (``peer.Peer``); a part that is None (the
    peer not running) leaves its metrics out."""

    @property
    def store(self) -> _Store | None: ...
    @property
    def dht(self) -> _Dht | None: ...
    @property
    def maintainer(self) -> _Maintainer | None: ...
    @property
    def service(self) -> _Service | None: ...
    @property
    def gateway_metrics(self) -> GatewayMetrics: ...


def collect(peer: Scraped) -> list[Metric]:
    """The metric families of ``peer`` now (what a scrape returns, before the process
    collector's); a part of the peer that is not running leaves its own out."""
    from prometheus_client import core

    Counter, Gauge = core.CounterMetricFamily, core.GaugeMetricFamily
    Hist = core.HistogramMetricFamily

    out: list[Metric] = []
    store = peer.store
    if store is not None:
        out += [
            Gauge("difs_storage_used_bytes", "Bytes of segments stored.", value=store.used),
            Gauge(
                "difs_storage_offered_bytes",
                "Bytes this peer offers to store (its capacity).",
                value=store.capacity,
            ),
            Gauge("difs_storage_segments", "Segments stored.", value=store.count),
        ]
    dht = peer.dht
    proto = dht.protocol if dht is not None else None
    if dht is not None and proto is not None:
        out.append(
            Gauge(
                "difs_dht_routing_table_peers",
                "Contacts in the routing table.",
                value=len(dht.contacts()),
            )
        )
        state = dht.network_state().state
        states = Gauge(
            "difs_network_state",
            "Whether the peer is part of the network (1 for its current state).",
            labels=["state"],
        )
        for s in NETWORK_STATES:
            states.add_metric([s], 1.0 if s == state else 0.0)
        traffic = dht.traffic()
        datagrams = Counter(
            "difs_dht_datagrams", "DHT datagrams sent and received.", labels=["direction"]
        )
        datagrams.add_metric(["sent"], traffic["sent"])
        datagrams.add_metric(["received"], traffic["received"])
        calls = Counter(
            "difs_dht_rpcs",
            "DHT requests this peer sent, by name and outcome.",
            labels=["rpc", "outcome"],
        )
        durations = Hist(
            "difs_dht_rpc_duration_seconds",
            "Seconds from sending a DHT request to its reply.",
            labels=["rpc"],
        )
        for (name, outcome), n in proto.rpcs.counts.items():
            calls.add_metric([name, outcome], n)
        for name, hist in proto.rpcs.durations.items():
            durations.add_metric([name], hist.cumulative(), hist.sum)
        out += [
            states,
            datagrams,
            Counter(
                "difs_dht_bad_datagrams",
                "DHT datagrams dropped: malformed, replies nobody waits for (late or"
                " forged), requests the record store failed on.",
                value=traffic["dropped"],
            ),
            Counter("difs_dht_lookups", "Iterative DHT lookups run.", value=traffic["lookups"]),
            calls,
            durations,
        ]
    service = peer.service
    if service is not None:
        out.append(
            Counter(
                "difs_segment_served_bytes",
                "Segment bytes sent to fetchers.",
                value=service.served_bytes,
            )
        )
    maintainer = peer.maintainer
    if maintainer is not None:
        replicator, stats = maintainer.replicator, maintainer.stats
        out += [
            Counter(
                "difs_segment_fetched_bytes",
                "Verified segment bytes this peer's own fetches received (heals, the gateway's).",
                value=replicator.fetched_bytes + peer.gateway_metrics.received_bytes,
            ),
            Counter(
                "difs_verification_failures",
                "Segments this peer received that failed verification.",
                value=replicator.verification_failures,
            ),
            Counter(
                "difs_repair_bytes",
                "Bytes repair copied to other peers.",
                value=stats.repair_bytes,
            ),
            Gauge(
                "difs_under_replicated_ranges",
                "Ranges the last maintenance round found with fewer live copies than"
                " their replicas.",
                value=stats.under_replicated,
            ),
        ]
    gw = peer.gateway_metrics
    responses = Counter(
        "difs_gateway_responses", "HTTP responses of the gateway by status.", labels=["code"]
    )
    for code, n in sorted(gw.responses.items()):
        responses.add_metric([code], n)
    ttfb = Hist(
        "difs_gateway_time_to_first_byte_seconds",
        "Seconds from an HTTP request to the first body byte of its response.",
    )
    ttfb.add_metric([], gw.ttfb.cumulative(), gw.ttfb.sum)
    out += [
        responses,
        Gauge(
            "difs_gateway_requests_in_flight",
            "HTTP requests the gateway is answering.",
            value=gw.in_flight,
        ),
        ttfb,
        Counter("difs_gateway_sent_bytes", "Body bytes the gateway sent.", value=gw.fetched_bytes),
    ]
    return out


class PeerCollector:
    """A ``prometheus_client`` collector of one peer's figures, read at each scrape."""

    def __init__(self, peer: Scraped) -> None:
        self.peer = peer

    def collect(self) -> list[Metric]:
        return collect(self.peer)


def render(peer: Scraped) -> bytes:
    """The exposition text (Prometheus text format 0.0.4) of ``peer``'s figures now, with
    the process' (memory, CPU, open files: prometheus_client's process collector, Linux
    only), from a registry made for this scrape."""
    from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(PeerCollector(peer))
    ProcessCollector(namespace="difs", registry=registry)
    return generate_latest(registry)
