"""What the CLI prints: plurals, rates, times, the summary lines and the progress bars."""

from __future__ import annotations

import io
from typing import Any

import pytest
from rich.console import Console

from difs_p2p.cli_output import (
    Bars,
    check_lines,
    fetched_line,
    network_line,
    plural,
    print_status,
    published_line,
    rate,
    version_line,
    when,
)

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("n", "word", "text"),
    [(0, "peer", "0 peers"), (1, "peer", "1 peer"), (2, "range", "2 ranges")],
)
def test_plural(n: int, word: str, text: str) -> None:
    """Counts read as English: one without an s, every other count with one."""
    assert plural(n, word) == text


@pytest.mark.parametrize(
    ("nbytes", "seconds", "text"),
    [
        (MiB, 1.0, "1.0 MiB/s"),
        (3 * MiB, 2.0, "1.5 MiB/s"),
        (512, 1.0, "512 B/s"),
        (MiB, 0.0, "-"),  # nothing measured: no rate rather than a division by zero
        (MiB, -1.0, "-"),
    ],
)
def test_rate_in_binary_units(nbytes: int, seconds: float, text: str) -> None:
    """Rates use the bars' binary units, and a dash when no time was measured."""
    assert rate(nbytes, seconds) == text


def test_when_is_utc() -> None:
    """Dates print in UTC whatever the local time zone."""
    assert when(0) == "1970-01-01 00:00:00 UTC"
    assert when(86400 + 3661) == "1970-01-02 01:01:01 UTC"


def test_published_line_counts_distinct_holders() -> None:
    """difs put's summary: size, segments, ranges, distinct peers, upload and placing time."""
    ranges: list[dict[str, Any]] = [
        {"holders": ["a:1", "b:2"]},
        {"holders": ["b:2", "c:3"]},
    ]
    line = published_line("/a.com/x", 2, 4 * MiB, 4, ranges, seconds=3.0, upload_seconds=2.0)
    assert line == (
        "published /a.com/x version 2: 4.0 MiB in 4 segments, 2 ranges on 3 peers; "
        "uploaded in 2.00 s (2.0 MiB/s), placed and published in 1.00 s"
    )


def test_published_line_of_an_instant_upload() -> None:
    """An upload measured at zero seconds prints no rate."""
    line = published_line("/x", 1, 0, 1, [{"holders": ["a:1"]}], seconds=0.5, upload_seconds=0)
    assert line == (
        "published /x version 1: 0 B in 1 segment, 1 range on 1 peer; "
        "uploaded in 0.00 s (-), placed and published in 0.50 s"
    )


def test_fetched_line_rates_the_fetch_without_the_resolve() -> None:
    """difs get's summary reports the rate after the name was resolved."""
    line = fetched_line("/x", 3, 2 * MiB, 2, seconds=1.25, resolve=0.25)
    assert line == (
        "fetched /x version 3: 2.0 MiB from 2 peers in 1.25 s: "
        "250 ms to resolve the name, then 2.0 MiB/s"
    )


@pytest.mark.parametrize(
    ("deleted", "retrievable", "text"),
    [
        (False, True, "v1  1970-01-01 00:00:10 UTC       1.0 KiB  retrievable  0123456789abcdef"),
        (False, False, "v1  1970-01-01 00:00:10 UTC       1.0 KiB  collected    0123456789abcdef"),
        (True, True, "v1  1970-01-01 00:00:10 UTC       deleted  retrievable  0123456789abcdef"),
    ],
)
def test_version_line_columns(deleted: bool, retrievable: bool, text: str) -> None:
    """difs versions: aligned columns, a short manifest hash, deleted instead of a size."""
    row = {
        "version": 1,
        "created": 10.0,
        "size": 1024,
        "deleted": deleted,
        "retrievable": retrievable,
        "manifest": "0123456789abcdef" * 4,
    }
    assert version_line(row) == text


def test_check_lines_with_and_without_orphan_counts() -> None:
    """difs-peer check prints the orphan line only when the peer reports orphans."""
    report: dict[str, Any] = {
        "checked": 5,
        "ok": 3,
        "corrupt": ["s1"],
        "missing": [],
        "healed": 1,
    }
    first = "checked 5 segments: 3 ok, 1 corrupt, 0 missing, 1 healed"
    assert check_lines(report) == [first]
    report |= {
        "orphans": {"segments": 2, "bytes": 2 * MiB},
        "uploading": {"segments": 1, "bytes": 4096},
        "orphan_grace": 300.0,
    }
    assert check_lines(report) == [
        first,
        "2 orphaned segments (2.0 MiB) to be collected within 300.0 s; "
        "1 segments (4.0 KiB) of uploads in progress",
    ]


def bars_on(buffer: io.StringIO) -> Bars:
    return Bars(Console(file=buffer, force_terminal=True, width=120))


def test_bars_finish_a_phase_when_the_next_starts() -> None:
    """A transfer bar ends at the bytes it saw; a phase without bytes ends full."""
    bars = bars_on(io.StringIO())
    with bars:
        bars.phase("uploading", 10 * MiB)
        bars.advance(MiB)
        bars.advance(MiB)
        bars.phase("placing 3 replicas", None, transfer=False)
        bars.advance(5)  # a phase without bytes ends at 1 of 1, whatever it was advanced by
    upload, place = bars.progress.tasks
    assert (upload.total, upload.completed, upload.finished) == (2 * MiB, 2 * MiB, True)
    assert (place.total, place.completed, place.finished) == (1, 1, True)
    assert bars.task is None


def test_bars_settle_shows_the_summary_rate() -> None:
    """settle puts the client's measured rate on a bar; out-of-range or zero time is ignored."""
    out = io.StringIO()
    bars = bars_on(out)
    bars.phase("fetching", 4 * MiB)
    bars.advance(4 * MiB)
    bars.settle(0, 4 * MiB, 2.0)
    bars.settle(0, 4 * MiB, 0.0)  # no time measured: the rate stays
    bars.settle(3, 1, 1.0)  # no such bar: nothing
    (task,) = bars.progress.tasks
    assert task.fields["rate"] == 2 * MiB
    bars.progress.console.print(bars.progress.make_tasks_table(bars.progress.tasks))
    shown = out.getvalue()
    assert "fetching" in shown and "2.0 MiB/s" in shown and "4.0/4.0 MiB" in shown


def test_bars_are_silent_without_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    """When stderr is not a terminal the bars draw nothing and every call is a no-op."""
    with Bars() as bars:
        bars.phase("uploading", 100)
        bars.advance(50)
        bars.settle(0, 100, 1.0)
    assert bars.progress is None
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize(
    ("status", "line"),
    [
        ({"routing_table": 3}, ""),  # an older peer: no network fields
        (
            {"network": "ok", "routing_table": 12, "most_seen": 20},
            "network: ok   knows 12 peers (most seen 20)",
        ),
        (
            {
                "network": "isolated",
                "routing_table": 0,
                "most_seen": 4,
                "rejoin_attempts": 3,
                "last_rejoin": 98.0,
                "next_rejoin": 104.5,
            },
            "network: isolated   knows 0 peers (most seen 4)   cut off from the network: "
            "rejoining, attempt 3 2.0 s ago, next in 4.5 s",
        ),
        (
            {"network": "thin", "routing_table": 2, "most_seen": 20, "next_rejoin": 100.0},
            "network: thin   knows 2 peers (most seen 20)   cut off from the network: "
            "rejoining, next in 0.0 s",
        ),
    ],
)
def test_network_line(status: dict[str, Any], line: str) -> None:
    """The status line says whether the peer is cut off and when it tries again."""
    assert network_line(status, 100.0) == line


def _status(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "node_id": "ab" * 20,
        "address": "10.77.0.2:4000",
        "listen": "0.0.0.0:4000",
        "address_known": True,
        "network": "ok",
        "routing_table": 4,
        "records": 1,
        "entries": 2,
        "storage": {"used": 0, "capacity": 1 << 30, "segments": 0},
        "contacts": [{"id": "cd" * 20, "address": "10.77.0.3:4000", "zone": ""}],
    }
    return base | extra


@pytest.mark.parametrize(
    ("extra", "shown", "hidden"),
    [
        ({}, ["listening on 0.0.0.0:4000", "routing table: 4 contacts   "], ["beyond", "drain"]),
        ({"overflow": 3}, ["4 contacts (+3 beyond the per-address cap)"], ["drain"]),
        (
            {"drain": {"state": "draining", "done": 1, "ranges": 4, "bytes_moved": 2048}},
            ["drain draining: 1/4 ranges", "2.0 KiB moved"],
            ["beyond"],
        ),
        ({"drain": {"state": "idle"}}, [], ["drain"]),
        (
            {"contacts": [{"id": "cd" * 20, "address": "10.77.0.3:4000", "zone": "rack-2"}]},
            ["rack-2", "zone"],
            [],
        ),
    ],
)
def test_status_text_shows_the_overflow_the_drain_and_zones(
    capsys: pytest.CaptureFixture[str], extra: dict[str, Any], shown: list[str], hidden: list[str]
) -> None:
    """difs-peer status names peers beyond the cap, a drain under way and contact zones."""
    print_status(_status(**extra))
    out = capsys.readouterr().out
    for text in shown:
        assert text in out
    for text in hidden:
        assert text not in out
