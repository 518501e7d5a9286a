"""Running a scenario: one event loop per run, then the metrics, plots and summary files.

Each run is a :class:`~sim.world.World` composed with the scenario's mode. Memory mode runs
it with a :class:`~sim.modelled.ModelledMode` on a fresh
:class:`~sim.vloop.VirtualEventLoop` over a :class:`~sim.memnet.MemoryNetwork`; sockets mode
with the same mode on a standard event loop over a :class:`~sim.relay.RelayNetwork`; peers
mode with a :class:`~sim.fullpeers.FullPeerMode` of full peers, each with a data directory
in a temporary directory removed after the run, over the same relay.
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sim.fullpeers import FullPeerMode
from sim.memnet import MemoryNetwork
from sim.mode import Run
from sim.modelled import ModelledMode
from sim.models import Address, NetworkModel
from sim.relay import RelayNetwork
from sim.report import plot_all, summary_text
from sim.result import SimResult
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


Progress = Callable[[str], None] | None


def _memory_run(scenario: Scenario, spec: RunSpec, seed: int, progress: Progress) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        network = MemoryNetwork(model)
        run = Run.new(scenario, spec, seed, model)
        return await World(run, ModelledMode(run, network, memory_address), progress).run()

    with asyncio.Runner(loop_factory=VirtualEventLoop) as runner:
        return runner.run(main())


def _sockets_run(
    scenario: Scenario, spec: RunSpec, seed: int, progress: Progress
) -> dict[str, Any]:
    async def main() -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        async with RelayNetwork(model) as network:
            run = Run.new(scenario, spec, seed, model)
            return await World(run, ModelledMode(run, network, socket_address), progress).run()

    with asyncio.Runner() as runner:
        return runner.run(main())


def _peers_run(scenario: Scenario, spec: RunSpec, seed: int, progress: Progress) -> dict[str, Any]:
    async def main(root: Path) -> dict[str, Any]:
        model = NetworkModel(scenario.link, random.Random(f"{seed}:net"))
        async with RelayNetwork(model) as network:
            run = Run.new(scenario, spec, seed, model)
            return await World(run, FullPeerMode(run, network, root), progress).run()

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
    out.mkdir(parents=True, exist_ok=True)
    metrics = out / "metrics.json"
    metrics.write_text(result.metrics_json(), encoding="utf-8")
    summary = out / "summary.txt"
    summary.write_text(summary_text(result), encoding="utf-8")
    return [metrics, summary, *plot_all(result, out)]
