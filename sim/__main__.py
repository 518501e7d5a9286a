"""``python -m sim SCENARIO [--seed N] [--peers N] [--out DIR]``: run a scenario, write results.

Prints the seed first, progress on stderr, and the one-screen summary at the end. Exit
codes: 0 done, 2 a bad scenario or option.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from sim.runner import run_scenario, write_outputs
from sim.scenario import ScenarioError, load_scenario

app = typer.Typer(add_completion=False)


@app.command()
def simulate(
    scenario: Annotated[
        str, typer.Argument(help="A scenario file, or the name of one in sim/scenarios/.")
    ],
    seed: Annotated[
        int | None, typer.Option(help="Seed of every random choice (default: the scenario's).")
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(help="Directory for metrics.json, summary.txt and the plots."),
    ] = None,
    peers: Annotated[
        list[int] | None,
        typer.Option(
            help="Run only this population (repeat for several) instead of the scenario's list."
        ),
    ] = None,
    plots: Annotated[bool, typer.Option(help="Write PNG plots.")] = True,
) -> None:
    """Run a DIFS-P2P network simulation.

    Example: python -m sim smoke --seed 7 --out /tmp/smoke

    Example: python -m sim scale --peers 10000 --out /tmp/scale10k
    """
    logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s %(message)s")
    try:
        sc = load_scenario(scenario)
    except ScenarioError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if peers:
        if min(peers) < 2:
            typer.echo("error: --peers must be at least 2", err=True)
            raise typer.Exit(2)
        sc = replace(sc, peers=tuple(peers))
    seed = sc.seed if seed is None else seed
    typer.echo(f"seed {seed}")
    result = run_scenario(sc, seed, progress=lambda line: typer.echo(line, err=True))
    target = out if out is not None else Path("sim-out") / f"{sc.name}-seed{seed}"
    if plots:
        written = write_outputs(result, target)
    else:
        from sim.report import summary_text

        target.mkdir(parents=True, exist_ok=True)
        (target / "metrics.json").write_text(result.metrics_json(), encoding="utf-8")
        (target / "summary.txt").write_text(summary_text(result), encoding="utf-8")
        written = [target / "metrics.json", target / "summary.txt"]
    typer.echo((target / "summary.txt").read_text(encoding="utf-8"), nl=False)
    typer.echo("wrote " + ", ".join(str(p) for p in written))


def main() -> None:
    """Entry point of the ``difs-sim`` console script."""
    app()


if __name__ == "__main__":
    main()
