"""The one-screen text summary and the PNG plots of a scenario's result."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from difs_p2p.config import format_size
from sim.result import SimResult


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.0f} ms"


def _pct(rate: float) -> str:
    return f"{rate * 100:.1f}%"


def summary_text(result: SimResult) -> str:
    """A compact, human-readable account of every run (about one screen)."""
    sc = result.scenario
    lines = [
        f"scenario {sc.name} ({sc.mode} mode), seed {result.seed}",
        f"  {sc.description}" if sc.description else "",
    ]
    for run, wall in zip(result.runs, result.wall, strict=True):
        pop, lk, pub, fe = run["population"], run["lookups"], run["publish"], run["fetch"]
        dur, st, by, conv = run["durability"], run["storage"], run["bytes"], run["convergence"]
        lines.append(f"[{run['label']}] {run['peers']} peers, {wall:.1f} s wall clock")
        lines.append(
            f"  population  joins {pop['joins']} (failed {pop['failed_joins']}), "
            f"crashes {pop['crashes']}, leaves {pop['graceful_leaves']}, "
            f"live at end {pop['live_at_end']}"
        )
        if lk["hops"]["count"]:
            h, lat = lk["hops"], lk["latency_s"]
            lines.append(
                f"  lookups     {h['count']}: hops p50 {h['p50']:.1f} p95 {h['p95']:.1f} "
                f"p99 {h['p99']:.1f}; latency p50 {_ms(lat['p50'])} p95 {_ms(lat['p95'])} "
                f"p99 {_ms(lat['p99'])}; exact {_pct(lk['exact_closest'])}"
            )
        if pub["attempted"]:
            lines.append(
                f"  publish     {pub['succeeded']}/{pub['attempted']} "
                f"({_pct(pub['success_rate'])}), p50 {pub['latency_s']['p50']:.2f} s, "
                f"under-replicated {pub['underreplicated']}"
            )
        if fe["attempted"]:
            t = fe["time_to_first_byte_s"]
            lines.append(
                f"  fetch       {fe['succeeded']}/{fe['attempted']} "
                f"({_pct(fe['success_rate'])}), time to first byte p50 {_ms(t['p50'])} "
                f"p95 {_ms(t['p95'])}, stale {fe['stale']}"
            )
        if dur["names"]:
            lines.append(
                f"  durability  {dur['available_names']}/{dur['names']} names available, "
                f"{dur['lost_ranges']}/{dur['ranges']} ranges lost, live replicas "
                f"{dur['mean_live_replicas']:.2f}, records resolvable "
                f"{_pct(dur['record_survival'])}"
            )
            lines.append(
                f"  storage     segments per peer min {st['min']} median {st['median']:.0f} "
                f"max {st['max']}, Gini {st['gini']:.2f}"
            )
        sp = run.get("spread") or {}
        if sp.get("placements"):
            lines.append(
                f"  spread      {sp['placements']} placements: {sp['mean_copies']:.2f} copies on "
                f"{sp['mean_addresses']:.2f} addresses, {sp['mean_zones']:.2f} zones; "
                f"{sp['shared_address']} with two copies on one address"
            )
        if conv["checked"]:
            lines.append(
                f"  convergence {conv['resolved']}/{conv['checked']} (peer, name) pairs "
                f"resolved ({_pct(conv['rate'])})"
            )
        lines.append(
            f"  bytes       publish {format_size(by['publish'])}, fetch "
            f"{format_size(by['fetch'])}, repair {format_size(by['repair'])}, DHT "
            f"{format_size(by['dht'])} in {run['network']['datagrams']} datagrams"
        )
    return "\n".join(line for line in lines if line) + "\n"


def plot_all(result: SimResult, out: Path) -> list[Path]:
    """Write the PNG plots (matplotlib, Agg backend); return their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    runs = result.runs
    name = result.scenario.name
    written: list[Path] = []

    def save(fig: Any, filename: str) -> None:
        path = out / filename
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    if any(r["lookups"].get("hops_histogram") for r in runs):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        shown = [r for r in runs if r["lookups"].get("hops_histogram")]
        width = 0.8 / len(shown)
        for j, r in enumerate(shown):
            lk = r["lookups"]
            hist = {int(h): n for h, n in lk["hops_histogram"].items()}
            total = sum(hist.values())
            hops = sorted(hist)
            ax1.bar(
                [h + (j - (len(shown) - 1) / 2) * width for h in hops],
                [hist[h] / total for h in hops],
                width=width,
                label=r["label"],
            )
            quantiles = lk["latency_quantiles_s"]
            ax2.plot(
                [q * 1e3 for q in quantiles],
                [i / (len(quantiles) - 1) for i in range(len(quantiles))],
                label=r["label"],
            )
        ax1.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax1.set_title("lookup hops (to the closest peer)")
        ax1.set_xlabel("hops")
        ax1.set_ylabel("share of lookups")
        ax2.set_title("lookup latency (CDF)")
        ax2.set_xlabel("ms")
        ax2.set_ylim(0, 1.0)
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(name)
        save(fig, f"{name}_lookups.png")

    if len(runs) > 1 and len({r["peers"] for r in runs}) > 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ns = [r["peers"] for r in runs]
        ax.semilogx(ns, [r["lookups"]["hops"]["mean"] for r in runs], marker="o", label="hops")
        ax.semilogx(ns, [r["lookups"]["hops"]["p95"] for r in runs], marker="s", label="hops p95")
        ax2 = ax.twinx()
        ax2.semilogx(
            ns,
            [r["lookups"]["latency_s"]["p50"] * 1e3 for r in runs],
            marker="^",
            color="tab:red",
            label="latency p50 (ms)",
        )
        ax.set_xlabel("peers (N)")
        ax.set_ylabel("hops")
        ax2.set_ylabel("latency p50 (ms)")
        ax.grid(alpha=0.3)
        fig.legend(loc="upper left")
        ax.set_title(f"{name}: lookups against N")
        save(fig, f"{name}_hops_vs_n.png")

    if any(s["ranges"] for r in runs for s in r["samples"]):
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        longest = max(s["t"] for r in runs for s in r["samples"])
        unit, scale = ("hours", 3600.0) if longest > 7200 else ("minutes", 60.0)
        for r in runs:
            samples = [s for s in r["samples"] if s["ranges"]]
            t = [s["t"] / scale for s in samples]
            ax1.plot(t, [s["mean_live_replicas"] for s in samples], label=r["label"])
            ax2.plot(t, [s["available_names"] / s["names"] for s in samples], label=r["label"])
        ax1.set_title("mean live replicas per range")
        ax1.set_ylim(bottom=0)
        ax2.set_title("names with every range available")
        ax2.set_ylim(0, 1.05)
        for ax in (ax1, ax2):
            ax.set_xlabel(f"time ({unit})")
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(name)
        save(fig, f"{name}_replicas.png")

    if any(r["storage"]["segments"] for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = [r["label"] for r in runs]
        st = [r["storage"] for r in runs]
        slots = range(len(runs))
        ax.bar([i - 0.2 for i in slots], [s["median"] for s in st], width=0.4, label="median")
        ax.bar([i + 0.2 for i in slots], [s["max"] for s in st], width=0.4, label="max")
        ax.set_xticks(list(slots), labels)
        ax.set_ylabel("segments held per live peer")
        ginis = ", ".join(f"{s['gini']:.2f}" for s in st)
        ax.set_title(f"{name}: storage balance (Gini {ginis})")
        ax.legend()
        save(fig, f"{name}_storage.png")

    if any(r["fetch"]["succeeded"] for r in runs):
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in runs:
            t = r["fetch"]["time_to_first_byte_s"]
            x = ["p50", "p95", "p99"]
            ax.plot(x, [t[q] * 1e3 for q in x], marker="o", label=r["label"])
        ax.set_ylabel("ms")
        ax.set_title(f"{name}: time to first byte")
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, f"{name}_ttfb.png")
    return written
