"""The result of running a scenario: every run's metrics, and what ``metrics.json`` holds."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sim.scenario import Scenario


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
