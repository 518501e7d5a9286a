"""What a run measures, and the metrics dictionary written to ``metrics.json``.

Only simulated quantities go in: no wall-clock time, no paths, so that the same scenario
and seed give byte-identical JSON (memory mode). Floats are rounded to 6 decimals.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from sim.models import NetStats, gini, percentile
from sim.scenario import RunSpec


def _r(x: float) -> float:
    return round(float(x), 6)


def _dist(values: list[float]) -> dict[str, float]:
    """Count, mean and percentiles of a sample."""
    return {
        "count": len(values),
        "mean": _r(sum(values) / len(values)) if values else 0.0,
        "p50": _r(percentile(values, 50)),
        "p95": _r(percentile(values, 95)),
        "p99": _r(percentile(values, 99)),
        "max": _r(max(values, default=0.0)),
    }


def _rate(ok: int, total: int) -> float:
    return _r(ok / total) if total else 0.0


@dataclass(slots=True)
class Sample:
    t: float
    peers: int
    ranges: int
    mean_replicas: float
    min_replicas: int
    lost_ranges: int
    names: int
    available: int
    mean_record_copies: float
    names_without_record: int

    def as_dict(self) -> dict[str, Any]:
        return {
            "t": _r(self.t),
            "peers": self.peers,
            "ranges": self.ranges,
            "mean_live_replicas": _r(self.mean_replicas),
            "min_live_replicas": self.min_replicas,
            "lost_ranges": self.lost_ranges,
            "names": self.names,
            "available_names": self.available,
            "mean_record_copies": _r(self.mean_record_copies),
            "names_without_record": self.names_without_record,
        }


@dataclass(slots=True)
class Recorder:
    """Counters and samples filled in during a run (by the world and the run's mode)."""

    joins: int = 0
    failed_joins: int = 0
    crashes: int = 0
    leaves: int = 0
    publishes: int = 0
    publish_ok: int = 0
    publish_latency: list[float] = field(default_factory=list)
    publish_failures: Counter[str] = field(default_factory=Counter)
    underreplicated: int = 0
    publish_bytes: int = 0
    fetches: int = 0
    fetch_ok: int = 0
    stale_fetches: int = 0
    resolve_time: list[float] = field(default_factory=list)
    ttfb: list[float] = field(default_factory=list)
    fetch_time: list[float] = field(default_factory=list)
    fetch_bytes: int = 0
    fetch_failures: Counter[str] = field(default_factory=Counter)
    hops: list[float] = field(default_factory=list)
    lookup_latency: list[float] = field(default_factory=list)
    lookup_exact: int = 0
    repair_bytes: int = 0
    repaired_ranges: int = 0
    samples: list[Sample] = field(default_factory=list)
    survival: list[bool] = field(default_factory=list)
    convergence: list[bool] = field(default_factory=list)
    events: list[tuple[float, str]] = field(default_factory=list)
    # per placement of a range (publish or repair): copies after it, and the distinct
    # addresses, networks and zones holding them
    spreads: list[tuple[int, int, int, int]] = field(default_factory=list)

    def event(self, t: float, what: str) -> None:
        self.events.append((t, what))

    def placed(self, spread: tuple[int, int, int], copies: int) -> None:
        """A range was placed: its ``copies`` are on ``spread`` (placement.spread)."""
        self.spreads.append((copies, *spread))

    def publish_failed(self, reason: str) -> None:
        self.publishes += 1
        self.publish_failures[reason] += 1

    def published(self, latency: float) -> None:
        self.publishes += 1
        self.publish_ok += 1
        self.publish_latency.append(latency)

    def fetch_failed(self, reason: str) -> None:
        self.fetches += 1
        self.fetch_failures[reason] += 1

    def fetched(self, resolve: float, ttfb: float, total: float, size: int, stale: bool) -> None:
        self.fetches += 1
        self.fetch_ok += 1
        self.stale_fetches += stale
        self.resolve_time.append(resolve)
        self.ttfb.append(ttfb)
        self.fetch_time.append(total)
        self.fetch_bytes += size

    def looked_up(self, hops: int, latency: float, exact: bool) -> None:
        self.hops.append(float(hops))
        self.lookup_latency.append(latency)
        self.lookup_exact += exact

    def sampled(
        self,
        *,
        t: float,
        peers: int,
        per_range: list[int],
        available: int,
        names: int,
        record_copies: list[int],
    ) -> None:
        self.samples.append(
            Sample(
                t=t,
                peers=peers,
                ranges=len(per_range),
                mean_replicas=sum(per_range) / len(per_range) if per_range else 0.0,
                min_replicas=min(per_range, default=0),
                lost_ranges=sum(1 for c in per_range if c == 0),
                names=names,
                available=available,
                mean_record_copies=(
                    sum(record_copies) / len(record_copies) if record_copies else 0.0
                ),
                names_without_record=sum(1 for c in record_copies if c == 0),
            )
        )

    def _spread(self) -> dict[str, Any]:
        """How placements (modelled modes) spread each range's copies over domains."""
        n = len(self.spreads)
        return {
            "placements": n,
            "mean_copies": _r(sum(s[0] for s in self.spreads) / n) if n else 0.0,
            "mean_addresses": _r(sum(s[1] for s in self.spreads) / n) if n else 0.0,
            "mean_zones": _r(sum(s[3] for s in self.spreads) / n) if n else 0.0,
            "shared_address": sum(1 for s in self.spreads if s[1] < s[0]),
        }

    def summary(
        self, spec: RunSpec, live_segments: Sequence[int], network: NetStats
    ) -> dict[str, Any]:
        """The metrics of a finished run, as a JSON-ready dictionary.

        ``live_segments``: the segments held by each peer live at the end; ``network``:
        what the network model carried.
        """
        held = [float(n) for n in live_segments]
        last = self.samples[-1] if self.samples else None
        net = network.as_dict()
        return {
            "label": spec.label,
            "peers": spec.peers,
            "population": {
                "joins": self.joins,
                "failed_joins": self.failed_joins,
                "crashes": self.crashes,
                "graceful_leaves": self.leaves,
                "live_at_end": len(held),
            },
            "lookups": {
                "hops": _dist(self.hops),
                "hops_histogram": {str(int(h)): n for h, n in sorted(Counter(self.hops).items())},
                "latency_quantiles_s": [
                    _r(percentile(self.lookup_latency, q)) for q in range(0, 101, 5)
                ],
                "latency_s": _dist(self.lookup_latency),
                "exact_closest": _rate(self.lookup_exact, len(self.hops)),
            },
            "publish": {
                "attempted": self.publishes,
                "succeeded": self.publish_ok,
                "success_rate": _rate(self.publish_ok, self.publishes),
                "latency_s": _dist(self.publish_latency),
                "underreplicated": self.underreplicated,
                "failures": dict(sorted(self.publish_failures.items())),
            },
            "fetch": {
                "attempted": self.fetches,
                "succeeded": self.fetch_ok,
                "success_rate": _rate(self.fetch_ok, self.fetches),
                "stale": self.stale_fetches,
                "resolve_s": _dist(self.resolve_time),
                "time_to_first_byte_s": _dist(self.ttfb),
                "transfer_s": _dist(self.fetch_time),
                "failures": dict(sorted(self.fetch_failures.items())),
            },
            "bytes": {
                "publish": self.publish_bytes,
                "fetch": self.fetch_bytes,
                "repair": self.repair_bytes,
                "dht": net["bytes"],
                "total": self.publish_bytes + self.fetch_bytes + self.repair_bytes + net["bytes"],
            },
            "network": net,
            "repair": {
                "enabled": spec.repair.enabled,
                "repaired_ranges": self.repaired_ranges,
                "bytes": self.repair_bytes,
            },
            "durability": {
                "names": last.names if last else 0,
                "available_names": last.available if last else 0,
                "availability": _rate(last.available, last.names) if last else 0.0,
                "lost_ranges": last.lost_ranges if last else 0,
                "ranges": last.ranges if last else 0,
                "mean_live_replicas": _r(last.mean_replicas) if last else 0.0,
                "record_survival": _rate(sum(self.survival), len(self.survival)),
                "records_checked": len(self.survival),
            },
            "convergence": {
                "checked": len(self.convergence),
                "resolved": sum(self.convergence),
                "rate": _rate(sum(self.convergence), len(self.convergence)),
            },
            "storage": {
                "peers": len(held),
                "segments": int(sum(held)),
                "min": int(min(held, default=0.0)),
                "median": _r(percentile(held, 50)),
                "max": int(max(held, default=0.0)),
                "gini": _r(gini(held)),
            },
            "spread": self._spread(),
            "samples": [s.as_dict() for s in self.samples],
            "events": [{"t": _r(t), "what": w} for t, w in self.events],
        }
