"""The simulator's models, as pure code: links, partitions, bandwidth, sessions, sizes.

Nothing here does I/O or reads a clock: callers pass ``now`` and a seeded
:class:`random.Random`, so the same seed gives the same draws.

* **Links**: every datagram gets a one-way delay drawn from a normal distribution
  (default mean 25 ms, s.d. 10 ms: a round trip of 50 +/- 20 ms), redrawn while below
  a minimum (default 1 ms), so delays stay continuous and two datagrams almost never
  arrive at the same instant. It is lost with a fixed probability.
* **Partitions**: peers are put in numbered groups; a datagram between two groups is
  dropped. Healing removes the groups.
* **Bandwidth**: each peer has one cap, in bytes per second, for upload and download.
  A segment transfer takes the bytes over the smaller of the sender's and the
  receiver's caps; a fetch from several holders shares the load among them (fluid model,
  no contention between concurrent transfers).
* **Sessions**: how long a peer stays, from a Weibull, lognormal or exponential
  distribution with a given median (default: Weibull, median 2 h, shape 0.6).
* **Sizes**: object sizes are lognormal around a median, clipped to a range.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

Address = tuple[str, int]


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """Latency and loss of every link, and the bandwidth of every peer."""

    # Half of the default 50 +/- 20 ms round trip: one-way 25 +/- 10 ms.
    latency_mean: float = 0.025
    latency_sd: float = 0.010
    # Nothing on the Internet is faster than this; draws below are redrawn.
    latency_min: float = 0.001
    loss: float = 0.0
    # 100 Mbit/s each way: a typical home fibre or office link.
    bandwidth: float = 100e6 / 8

    def __post_init__(self) -> None:
        if self.latency_mean <= 0 or self.latency_sd < 0 or self.latency_min <= 0:
            raise ValueError("latencies must be positive")
        if self.latency_min > self.latency_mean + 3 * self.latency_sd:
            raise ValueError("latency_min is far above the latency distribution")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError("loss must be in [0, 1)")
        if self.bandwidth <= 0:
            raise ValueError("bandwidth must be positive")


@dataclass(slots=True)
class NetStats:
    """What the network carried and dropped (datagrams and their bytes)."""

    sent: int = 0
    sent_bytes: int = 0
    lost: int = 0
    partitioned: int = 0
    unreachable: int = 0
    # TCP through the relay (full-peer mode): connections and bytes carried.
    streams: int = 0
    stream_bytes: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "datagrams": self.sent,
            "bytes": self.sent_bytes,
            "lost": self.lost,
            "partitioned": self.partitioned,
            "unreachable": self.unreachable,
            "tcp_connections": self.streams,
            "tcp_bytes": self.stream_bytes,
        }


@dataclass(slots=True)
class NetworkModel:
    """Decides the fate of each datagram: dropped, or delivered after a delay."""

    link: LinkConfig
    rng: random.Random
    groups: dict[Address, int] = field(default_factory=dict)
    stats: NetStats = field(default_factory=NetStats)

    def one_way(self) -> float:
        """A one-way delay in seconds."""
        link = self.link
        while True:
            delay = self.rng.gauss(link.latency_mean, link.latency_sd)
            if delay >= link.latency_min:
                return delay

    def round_trip(self) -> float:
        return self.one_way() + self.one_way()

    def fate(self, src: Address, dst: Address, size: int) -> float | None:
        """The delay before ``dst`` receives a datagram from ``src``, or None if it is lost."""
        stats = self.stats
        stats.sent += 1
        stats.sent_bytes += size
        if self.groups and self.groups.get(src, -1) != self.groups.get(dst, -2):
            stats.partitioned += 1
            return None
        if self.link.loss and self.rng.random() < self.link.loss:
            stats.lost += 1
            return None
        return self.one_way()

    def stream_delay(self, src: Address | None, dst: Address) -> float | None:
        """The one-way delay of a new TCP connection's bytes, or None if it cannot connect
        (``src`` None: from outside the simulated peers, never cut by a partition)."""
        self.stats.streams += 1
        if src is not None and not self.reachable(src, dst):
            self.stats.partitioned += 1
            return None
        return self.one_way()

    def reachable(self, src: Address, dst: Address) -> bool:
        return not self.groups or self.groups.get(src, -1) == self.groups.get(dst, -2)

    def split(self, assignment: dict[Address, int]) -> None:
        """Cut the network: from now on only peers of the same group reach each other."""
        self.groups = dict(assignment)

    def heal(self) -> None:
        self.groups = {}

    @property
    def partitioned(self) -> bool:
        return bool(self.groups)


def pick_group(fractions: Sequence[float], rng: random.Random) -> int:
    """A group index drawn with the given weights."""
    u = rng.random() * sum(fractions)
    for i, f in enumerate(fractions):
        u -= f
        if u < 0:
            return i
    return len(fractions) - 1


def transfer_time(nbytes: int, sender: float, receiver: float) -> float:
    """Seconds to move ``nbytes`` between two peers with these bandwidth caps."""
    return nbytes / min(sender, receiver) if nbytes else 0.0


def fetch_time(
    range_bytes: Sequence[int], holders: Sequence[Sequence[int]], up: Sequence[float], down: float
) -> float:
    """Seconds to fetch every range from its live holders (fluid model).

    Range i (``range_bytes[i]`` bytes) is split evenly among ``holders[i]``, the indexes
    into ``up`` (each holder's upload cap) of its live holders. The fetch lasts as long as
    the most loaded holder needs, and at least the total over the fetcher's ``down`` cap.
    """
    load: dict[int, float] = {}
    for nbytes, who in zip(range_bytes, holders, strict=True):
        for h in who:
            load[h] = load.get(h, 0.0) + nbytes / len(who)
    slowest = max((load[h] / up[h] for h in load), default=0.0)
    return max(slowest, sum(range_bytes) / down)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    """How long peers stay: a distribution with a median, as measured in the IPFS network."""

    # weibull, lognormal or exponential
    distribution: str = "weibull"
    # Half of the peers leave within 2 hours (IPFS measurements, Trautwein et al. 2022).
    median: float = 7200.0
    # Weibull shape k (below 1: many short sessions and a long tail), or lognormal sigma.
    # 0.6 is within the 0.3-0.7 range measured for Gnutella, Kad and BitTorrent sessions.
    shape: float = 0.6

    def __post_init__(self) -> None:
        if self.distribution not in ("weibull", "lognormal", "exponential"):
            raise ValueError("distribution must be weibull, lognormal or exponential")
        if self.median <= 0 or self.shape <= 0:
            raise ValueError("median and shape must be positive")

    def sample(self, rng: random.Random) -> float:
        """One session length in seconds."""
        if self.distribution == "weibull":
            scale = self.median / math.log(2) ** (1 / self.shape)
            return rng.weibullvariate(scale, self.shape)
        if self.distribution == "lognormal":
            return rng.lognormvariate(math.log(self.median), self.shape)
        return rng.expovariate(math.log(2) / self.median)


@dataclass(frozen=True, slots=True)
class SizeConfig:
    """Object sizes: lognormal with a median, clipped to [minimum, maximum] bytes."""

    median: int = 16 << 20
    sigma: float = 1.2
    minimum: int = 4096
    maximum: int = 256 << 20

    def __post_init__(self) -> None:
        if not 0 < self.minimum <= self.median <= self.maximum or self.sigma < 0:
            raise ValueError("sizes must satisfy 0 < minimum <= median <= maximum")

    def sample(self, rng: random.Random) -> int:
        size = int(rng.lognormvariate(math.log(self.median), self.sigma))
        return max(self.minimum, min(self.maximum, size))


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def gini(values: Sequence[float]) -> float:
    """The Gini coefficient of non-negative values: 0 = perfectly even, near 1 = one has all."""
    ordered = sorted(values)
    n, total = len(ordered), sum(ordered)
    if n == 0 or total == 0:
        return 0.0
    weighted = sum((i + 1) * v for i, v in enumerate(ordered))
    return (2 * weighted) / (n * total) - (n + 1) / n
