"""What the CLI prints: JSON, summaries, tables and progress bars.

Sizes and rates are in binary units (KiB, MiB) everywhere, bars and summaries alike. The
summary lines are pure functions of the numbers they show (tested in
tests/test_cli_output.py); rich is imported only by what draws tables and bars, so that a
command that prints neither starts without it, and typer not at all: ``echo`` writes a line
as ``typer.echo`` does, so that the fast commands of ``cli_fast`` print the same bytes.
"""

from __future__ import annotations

import json
import sys
import time
from typing import TYPE_CHECKING, Any

from difs_p2p.sizes import format_size

if TYPE_CHECKING:
    from pathlib import Path

    from rich.console import Console

    from difs_p2p.identity import Identity


# ANSI escape sequences, which ``echo`` strips from what goes to a file or a pipe (as click
# does: an error message may carry text a peer sent).
_ANSI = r"\033\[[;?0-9]*[a-zA-Z]"


def echo(message: str, err: bool = False) -> None:
    """One line on stdout (stderr with ``err``), flushed, as ``typer.echo`` writes it:
    ANSI escape sequences stripped unless the stream is a terminal."""
    stream = sys.stderr if err else sys.stdout
    if "\033" in message and not stream.isatty():
        import re

        message = re.sub(_ANSI, "", message)
    stream.write(message + "\n")
    stream.flush()


def print_json(obj: Any) -> None:
    echo(json.dumps(obj, indent=2, sort_keys=True))


def plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def rate(nbytes: float, seconds: float) -> str:
    """A transfer rate in the bars' binary units."""
    return f"{format_size(nbytes / seconds)}/s" if seconds > 0 else "-"


def when(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(created))


# -- summaries -----------------------------------------------------------------------------


def published_line(
    name: str,
    version: int,
    size: int,
    segments: int,
    ranges: list[dict[str, Any]],
    seconds: float,
    upload_seconds: float,
) -> str:
    """What ``difs put`` prints once the name is published."""
    holders = {h for r in ranges for h in r["holders"]}
    return (
        f"published {name} version {version}: {format_size(size)} in "
        f"{plural(segments, 'segment')}, {plural(len(ranges), 'range')} on "
        f"{plural(len(holders), 'peer')}; uploaded in {upload_seconds:.2f} s "
        f"({rate(size, upload_seconds)}), placed and published in "
        f"{seconds - upload_seconds:.2f} s"
    )


def fetched_line(
    name: str, version: int, nbytes: int, sources: int, seconds: float, resolve: float
) -> str:
    """What ``difs get`` prints (on stderr) once every byte is verified."""
    return (
        f"fetched {name} version {version}: "
        f"{format_size(nbytes)} from {plural(sources, 'peer')} in "
        f"{seconds:.2f} s: {resolve * 1000:.0f} ms to resolve the name, then "
        f"{rate(nbytes, seconds - resolve)}"
    )


def version_line(row: dict[str, Any]) -> str:
    """One version in ``difs versions``: number, date, size, whether it is still kept."""
    state = "deleted" if row["deleted"] else format_size(row["size"])
    kept = "retrievable" if row["retrievable"] else "collected"
    return (
        f"v{row['version']}  {when(row['created'])}  {state:>12}  {kept:<11}  "
        f"{row['manifest'][:16]}"
    )


def check_lines(result: dict[str, Any]) -> list[str]:
    """What ``difs-peer check`` prints of a peer's check report."""
    lines = [
        f"checked {result['checked']} segments: {result['ok']} ok, "
        f"{len(result['corrupt'])} corrupt, {len(result['missing'])} missing, "
        f"{result['healed']} healed"
    ]
    orphans, uploading = result.get("orphans"), result.get("uploading")
    if isinstance(orphans, dict) and isinstance(uploading, dict):
        lines.append(
            f"{orphans['segments']} orphaned segments ({format_size(orphans['bytes'])}) to be "
            f"collected within {result.get('orphan_grace', '?')} s; "
            f"{uploading['segments']} segments ({format_size(uploading['bytes'])}) of uploads "
            "in progress"
        )
    return lines


def drain_line(report: dict[str, Any]) -> str:
    """One progress line of ``difs-peer leave``: ranges done of total, bytes moved."""
    return (
        f"{report.get('state', '?')}: {report.get('done', 0)}/{report.get('ranges', 0)} ranges, "
        f"{report.get('handed_over', 0)} handed over, {report.get('already_safe', 0)} already "
        f"safe, {len(report.get('failed', []))} failed, "
        f"{format_size(report.get('bytes_moved', 0))} moved, {report.get('seconds', 0.0):.1f} s"
    )


def drain_summary(report: dict[str, Any]) -> list[str]:
    """What ``difs-peer leave`` prints when the drain has ended."""
    lines = [drain_line(report)]
    lines += [f"  not handed over: {line}" for line in report.get("failed", [])]
    if report.get("unpublished"):
        lines.append(
            f"  {report['unpublished']} ranges of never published uploads left as they are"
        )
    lines.append(f"{report.get('records', 0)} DHT records handed over")
    return lines


def key_info(me: Identity, path: Path) -> dict[str, str]:
    return {
        "key_file": str(path),
        "public_key": me.public_key.hex(),
        "fingerprint": me.fingerprint,
        "namespace": f"/key/{me.fingerprint}/",
    }


def print_key_info(info: dict[str, str], as_json: bool) -> None:
    if as_json:
        print_json(info)
        return
    for k, v in info.items():
        echo(f"{k}: {v}")


# -- tables --------------------------------------------------------------------------------


def network_line(status: dict[str, Any], now: float) -> str:
    """The ``network:`` line of ``status``: ok, thin or isolated, and while cut off the
    rejoin attempts (an older peer without these fields: an empty string)."""
    state = status.get("network")
    if not isinstance(state, str):
        return ""
    line = f"network: {state}   knows {status.get('routing_table', 0)} peers"
    line += f" (most seen {status.get('most_seen', 0)})"
    if state == "ok":
        return line
    line += "   cut off from the network: rejoining"
    attempts, last, nxt = (status.get(k) for k in ("rejoin_attempts", "last_rejoin", "next_rejoin"))
    if isinstance(last, (int, float)):
        line += f", attempt {attempts} {max(0.0, now - last):.1f} s ago"
    if isinstance(nxt, (int, float)):
        line += f", next in {max(0.0, nxt - now):.1f} s"
    return line


def print_status(status: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    storage = status["storage"]
    console.print(f"[bold]peer[/] {status['node_id']}  {status['address']}")
    if status.get("listen") and status["listen"] != status["address"]:
        console.print(f"listening on {status['listen']}")
    if status.get("address_known") is False:
        console.print(
            "[yellow]address others reach this peer at: not known yet[/] (no --advertise;"
            " learned once two peers agree): it signs no holder entries meanwhile"
        )
    if status.get("http"):
        console.print(f"HTTP gateway: {status['http']}", markup=False)
    if line := network_line(status, time.time()):
        console.print(line, markup=False)
    beyond = (
        f" (+{status['overflow']} beyond the per-address cap)" if status.get("overflow") else ""
    )
    console.print(
        f"routing table: {status['routing_table']} contacts{beyond}   records:"
        f" {status['records']}   holder entries: {status['entries']}"
    )
    drain = status.get("drain") or {}
    if drain.get("state", "idle") != "idle":
        console.print(f"drain {drain_line(drain)}", markup=False, soft_wrap=True)
    console.print(
        f"storage: {format_size(storage['used'])} used of {format_size(storage['capacity'])}"
        f" ({storage['segments']} segments)"
    )
    zones = any(c.get("zone") for c in status["contacts"])
    table = Table("contact id", "address", *(["zone"] if zones else []), title="closest contacts")
    for c in status["contacts"]:
        table.add_row(c["id"], c["address"], *([c.get("zone", "")] if zones else []))
    console.print(table)
    m = status.get("maintenance") or {}
    if m:
        console.print(
            f"holdings: {status.get('holdings', 0)}   maintenance rounds: {m['rounds']}   "
            f"repaired ranges: {m['repaired_ranges']} ({format_size(m['repair_bytes'])})   "
            f"collected versions: {m['collected_versions']} "
            f"({format_size(m['freed_bytes'])})   healed segments: {m['healed_segments']}   "
            f"dead peers seen: {m['dead_peers']}"
        )


def print_stat(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    info = result["info"]
    state = "deleted" if info.get("deleted") else format_size(info["size"])
    console.print(f"[bold]{info['name']}[/] version {info['version']}  {state}")
    console.print(f"created:   {when(info['created'])}")
    console.print(
        f"segments:  {info['segment_count']} of {format_size(info['segment_size'])}, "
        f"{plural(info['stripes'], 'range')}, {plural(info['replicas'], 'replica')} asked"
    )
    console.print(f"owner:     {info['owner']}")
    if info["publisher"] != info["owner"]:
        console.print(f"publisher: {info['publisher']} (delegate)")
    console.print(f"manifest:  {info['hash_of_manifest']}")
    meta = info.get("meta") or {}
    if meta.get("content_type"):
        console.print(f"type:      {meta['content_type']}", markup=False)
    if meta.get("etag"):
        console.print(f"s3 etag:   {meta['etag']}", markup=False)
    for key, value in (meta.get("user") or {}).items():
        console.print(f"meta:      {key}={value}", markup=False)
    console.print(f"versions:  {', '.join(str(v) for v in result['versions'])}")
    ranges = Table("segments", "holders", "answering", "addresses", title="ranges")
    for r in result["ranges"]:
        ranges.add_row(
            f"{r['start']}-{r['end']}", str(r["holders"]), str(r["live"]), str(r["addresses"])
        )
    console.print(ranges)
    holders = Table("storage", "address", "segments", "answers", title="holders")
    for h in result["storages"]:
        seg = h["segment"]
        holders.add_row(
            h["storage"][:16],
            h["address"],
            f"{seg['start']}-{seg['end']}",
            "yes" if h["live"] else "no",
        )
    console.print(holders)


# -- progress bars -------------------------------------------------------------------------


class Bars:
    """Progress bars on stderr when it is a terminal (else nothing): one task per phase,
    sizes and rates in binary units (KiB, MiB), as the summaries.

    ``console`` draws the bars there instead (whether or not stderr is a terminal).
    """

    def __init__(self, console: Console | None = None) -> None:
        self.progress: Any = None
        self.task: Any = None
        if console is None and not sys.stderr.isatty():
            return
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            ProgressColumn,
            Task,
            TimeRemainingColumn,
        )
        from rich.text import Text

        class Amount(ProgressColumn):
            """Bytes done of the total for a transfer; the time taken for other phases."""

            sizes = DownloadColumn(binary_units=True)

            def render(self, task: Task) -> Text:
                if task.fields.get("transfer"):
                    return self.sizes.render(task)
                elapsed = task.finished_time if task.finished else task.elapsed
                return Text(f"{elapsed or 0:.1f} s", style="progress.elapsed")

        class Speed(ProgressColumn):
            """The recent rate while running; once the command is done, the rate its
            summary reports (``settle``)."""

            def render(self, task: Task) -> Text:
                speed = task.fields.get("rate") or task.speed
                shown = f"{format_size(speed)}/s" if speed and task.fields.get("transfer") else ""
                return Text(shown, style="progress.data.speed")

        class Remaining(TimeRemainingColumn):
            def render(self, task: Task) -> Text:
                return super().render(task) if task.fields.get("transfer") else Text("")

        self.progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            Amount(),
            Speed(),
            Remaining(),
            console=console or Console(stderr=True),
        )

    def __enter__(self) -> Bars:
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self._finish()
            self.progress.stop()

    def phase(self, label: str, total: int | None, transfer: bool = True) -> None:
        """Finish the current bar and start one for ``label``: a transfer of ``total``
        bytes (None: unknown), or a phase without bytes (``transfer`` false)."""
        if self.progress is None:
            return
        self._finish()
        self.task = self.progress.add_task(label, total=total, transfer=transfer)

    def _finish(self) -> None:
        if self.task is not None:
            task = self.progress.tasks[-1]
            done = task.completed if task.fields.get("transfer") else 1
            self.progress.update(self.task, total=done, completed=done)
            self.progress.stop_task(self.task)
            self.task = None

    def settle(self, index: int, nbytes: int, seconds: float) -> None:
        """Show on the ``index``-th bar the rate the summary reports: ``nbytes`` in
        ``seconds`` as the client measured them."""
        if self.progress is not None and seconds > 0 and index < len(self.progress.tasks):
            self.progress.update(self.progress.task_ids[index], rate=nbytes / seconds)

    def advance(self, n: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.advance(self.task, n)
