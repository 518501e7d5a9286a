"""The simulator's recorder: a run's metrics from its counters alone (no world, no sockets)."""

from __future__ import annotations

import pytest

from sim.metrics import Recorder
from sim.models import NetStats
from sim.scenario import Repair, RunSpec

SPEC = RunSpec(label="N=4", peers=4, repair=Repair(enabled=True))


def test_summary_of_an_empty_run() -> None:
    """Nothing happened: every rate and count is zero, nothing divides by zero."""
    metrics = Recorder().summary(SPEC, [], NetStats())
    assert metrics["label"] == "N=4" and metrics["peers"] == 4
    assert metrics["population"]["live_at_end"] == 0
    assert metrics["publish"]["success_rate"] == metrics["fetch"]["success_rate"] == 0.0
    assert metrics["durability"]["availability"] == 0.0
    assert metrics["storage"] == {
        "peers": 0,
        "segments": 0,
        "min": 0,
        "median": 0.0,
        "max": 0,
        "gini": 0.0,
    }
    assert metrics["repair"]["enabled"] is True


@pytest.mark.parametrize(
    ("segments", "expected"),
    [
        ([3, 3, 3], {"peers": 3, "segments": 9, "min": 3, "median": 3.0, "max": 3, "gini": 0.0}),
        ([0, 0, 8], {"peers": 3, "segments": 8, "min": 0, "median": 0.0, "max": 8}),
    ],
)
def test_storage_balance_comes_from_the_live_peers_segments(
    segments: list[int], expected: dict[str, float]
) -> None:
    """Storage counts, median and Gini are over the segments of the peers live at the end."""
    metrics = Recorder().summary(SPEC, segments, NetStats())
    assert metrics["population"]["live_at_end"] == len(segments)
    assert expected.items() <= metrics["storage"].items()


def test_counters_samples_and_bytes_add_up() -> None:
    """Operations, the last sample and the network's bytes make the run's metrics."""
    rec = Recorder()
    rec.published(1.5)
    rec.publish_failed("entry peer left")
    rec.fetched(0.1, 0.2, 0.4, 100, stale=True)
    rec.fetch_failed("name not resolved")
    rec.fetch_failed("name not resolved")
    rec.publish_bytes, rec.repair_bytes = 300, 50
    rec.sampled(t=1.0, peers=4, per_range=[3, 0], available=0, names=1, record_copies=[2])
    rec.sampled(t=2.0, peers=4, per_range=[3, 2], available=1, names=1, record_copies=[0])
    metrics = rec.summary(SPEC, [1, 2], NetStats(sent=5, sent_bytes=1000))
    assert metrics["publish"]["success_rate"] == 0.5
    assert metrics["publish"]["failures"] == {"entry peer left": 1}
    assert metrics["fetch"]["failures"] == {"name not resolved": 2}
    assert metrics["fetch"]["stale"] == 1 and metrics["fetch"]["success_rate"] == 0.333333
    assert metrics["bytes"] == {
        "publish": 300,
        "fetch": 100,
        "repair": 50,
        "dht": 1000,
        "total": 1450,
    }
    durability = metrics["durability"]
    assert durability["availability"] == 1.0 and durability["lost_ranges"] == 0
    assert durability["mean_live_replicas"] == 2.5
    assert [s["names_without_record"] for s in metrics["samples"]] == [0, 1]
