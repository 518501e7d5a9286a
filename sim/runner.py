"""Running a scenario: one event loop per run, then the metrics, plots and summary files.

Memory mode runs each :class:`~sim.world.World` on a fresh
:class:`~sim.vloop.VirtualEventLoop` over a :class:`~sim.memnet.MemoryNetwork`; sockets mode
on a standard event loop over a :class:`~sim.relay.RelayNetwork`; peers mode runs a
:class:`~sim.peerworld.PeerWorld` of full peers, each with a data directory in a temporary
directory removed after the run, over the same relay.
"""

from __future__ import annotations

import asyncio
import json
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sim.memnet import MemoryNetwork
from sim.models import Address, NetworkModel
from sim.peerworld import PeerWorld
from sim.relay import RelayNetwork
from sim.scenario import RunSpec, Scenario
from sim.vloop import VirtualEventLoop
from sim.world import World

# Every simulated peer listens on this port, at its own address in 10.0.0.0/8.
MEMORY_PORT = 4000


def memory_address(index: int) -> Address:
    """The address of peer ``index`` in memory mode: 10.0.0.1, 10.0.0.2, ..."""
    n = index + 1
    return (f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}", MEMORY_PORT)


def socket_address(index: int) -> Address:
    return ("127.0.0.1", 0)


@dataclass(slots=True)
class SimResult:
    """The metrics of every run of a scenario, and how long each took on the wall clock."""

    scenario: Scenario
    seed: int
    runs: list[dict[str, Any]] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)

    def metrics(self) -> dict[str, Any]:
        """Everything deterministic about the result (what ``metrics.json`` holds)."""
        return {
            "scenario": self.scenario.name,
            "description": self.scenario.description,
            "mode": self.scenario.mode,
            "seed": self.seed,
            "runs": self.runs,
        }

    def metrics_json(self) -> str:
        return json.dumps(self.metrics(), sort_keys=True, indent=1) + "\n"


Progress = Callable[[str], None] | None


def _memory_run(scenario: Scenario, spec: RunSpec, seed: int, progress: Progress) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        network = MemoryNetwork(model)
        world = World(scenario, spec, seed, network, model, memory_address, progress)
        return await world.run()

    with asyncio.Runner(loop_factory=VirtualEventLoop) as runner:
        return runner.run(main())


def _sockets_run(
    scenario: Scenario, spec: RunSpec, seed: int, progress: Progress
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        async with RelayNetwork(model) as network:
            world = World(scenario, spec, seed, network, model, socket_address, progress)
            return await world.run()

    with asyncio.Runner() as runner:
        return runner.run(main())


def _peers_run(scenario: Scenario, spec: RunSpec, seed: int, progress: Progress) -> dict[str, Any]:
    async def main(root: Path) -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        async with RelayNetwork(model) as network:
            world = PeerWorld(scenario, spec, seed, network, model, root, progress)
            return await world.run()

    with tempfile.TemporaryDirectory(prefix="difs-sim-") as root, asyncio.Runner() as runner:
        return runner.run(main(Path(root)))


RUNS = {"memory": _memory_run, "sockets": _sockets_run, "peers": _peers_run}


def run_scenario(
    scenario: Scenario,
    seed: int | None = None,
    *,
    progress: Progress = None,
) -> SimResult:
    """Run every run of ``scenario`` with ``seed`` (default: the scenario's)."""
    seed = scenario.seed if seed is None else seed
    result = SimResult(scenario, seed)
    run = RUNS[scenario.mode]
    for spec in scenario.runs():
        if progress is not None:
            progress(f"run {spec.label}: {spec.peers} peers, {scenario.mode} mode")
        started = time.monotonic()
        result.runs.append(run(scenario, spec, seed, progress))
        result.wall.append(time.monotonic() - started)
        if progress is not None:
            progress(f"run {spec.label}: done in {result.wall[-1]:.1f} s")
    return result


def write_outputs(result: SimResult, out: Path) -> list[Path]:
    """Write metrics.json, summary.txt and the plots into ``out``; return their paths."""
    from sim.report import plot_all, summary_text

    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    metrics.write_text(result.metrics_json(), encoding="utf-8")
    summary = out / "summary.txt"
    summary.write_text(summary_text(result), encoding="utf-8")
    return [metrics, summary, *plot_all(result, out)]
