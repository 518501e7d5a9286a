"""The simulator's structure: a world that drives any mode (its layers and the absence of
import cycles are checked with the package's: tests/test_structure.py)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

import pytest

from difs_p2p.dht import Dht
from difs_p2p.identity import Identity
from difs_p2p.recordpolicy import RecordValidator
from sim.catalog import StoredObject
from sim.mode import Mode, Run
from sim.models import Address, NetworkModel
from sim.population import SimPeer
from sim.scenario import parse_scenario
from sim.vloop import run_virtual
from sim.world import World


@dataclass
class _CountingMode:
    """A mode whose peers are unstarted DHT nodes: it records what the world asks of it."""

    run: Run
    refuse: set[int] = field(default_factory=set)
    started: list[int] = field(default_factory=list)
    stopped: list[tuple[int, bool]] = field(default_factory=list)
    repair_passes: list[float] = field(default_factory=list)
    samples: int = 0
    collected: int = 0

    def clock(self) -> float:
        return self.run.now()

    def create_peer(self, index: int, key_seed: bytes) -> SimPeer:
        identity = Identity.from_seed(key_seed)
        node = Dht(identity.node_id, RecordValidator(), clock=self.clock)
        return SimPeer(index, identity, node, ("10.0.0.1", 4000 + index), joined=self.run.now())

    async def start(self, peer: SimPeer, seeds: list[Address]) -> bool:
        if peer.index in self.refuse:
            return False
        self.started.append(peer.index)
        return True

    async def bootstrap(self, peer: SimPeer, seeds: list[Address]) -> bool:
        return bool(seeds) or peer.index == 0

    async def stop(self, peer: SimPeer, *, crash: bool) -> None:
        self.stopped.append((peer.index, crash))

    async def publish(
        self, entry: SimPeer, user: int, name: str, size: int, previous: StoredObject | None
    ) -> StoredObject | None:
        raise AssertionError("no workload in this run")

    async def fetch(self, fetcher: SimPeer, name: str, expected: int) -> None:
        raise AssertionError("no workload in this run")

    def repair_pass(self) -> None:
        self.repair_passes.append(self.run.now())

    def holders_of(self, obj: StoredObject) -> list[SimPeer]:
        return []

    def live_copies(self, obj: StoredObject) -> list[int]:
        return []

    def before_sample(self) -> None:
        self.samples += 1

    def collect(self) -> None:
        self.collected += 1


CHURNING: dict[str, Any] = {
    "name": "membership",
    "peers": 30,
    "join_period": 10.0,
    "warmup": 10.0,
    "duration": 200.0,
    "sample_interval": 50.0,
    "churn": {"enabled": True, "median_session_hours": 0.01, "rejoin_delay": 5.0},
    "repair": {"enabled": True, "interval": 60.0},
}


@pytest.mark.parametrize("refused", [set(), {3, 8}])
def test_world_drives_a_mode_through_churn(refused: set[int]) -> None:
    """Under churn every started peer is stopped exactly once; refused starts count as failed."""
    scenario = parse_scenario(CHURNING)
    (spec,) = scenario.runs()

    async def main() -> tuple[dict[str, Any], _CountingMode]:
        model = NetworkModel(scenario.link, random.Random(1))
        run = Run.new(scenario, spec, 5, model)
        mode = _CountingMode(run, refuse=refused)
        world = World(run, _as_mode(mode))
        return await world.run(), mode

    metrics, mode = run_virtual(main())
    population = metrics["population"]
    stopped = [i for i, _ in mode.stopped]
    assert sorted(stopped) == sorted(set(stopped))  # never twice
    assert set(stopped) == set(mode.started)  # departures and the teardown stop them all
    assert population["joins"] == len(mode.started) > 30
    departures = population["crashes"] + population["graceful_leaves"]
    assert departures >= population["joins"] - population["live_at_end"]
    assert population["failed_joins"] >= len(refused)
    assert mode.repair_passes == [80.0, 140.0, 200.0]
    assert mode.samples == len(metrics["samples"]) == 5
    assert mode.collected == 1


def _as_mode(mode: _CountingMode) -> Mode:
    """The counting mode provides every operation of :class:`sim.mode.Mode` (checked by mypy)."""
    return mode
