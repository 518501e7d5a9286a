"""The CLI's pure parts, without processes: exit codes, option parsing, summaries, bars.

The commands themselves run as real processes in tests/test_cli.py; these tables pin the
logic they share so that a change to a rule shows here, case by case.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from difs_p2p import errors
from difs_p2p.cli_client import parse_byte_range, parse_segment_size, pins_for
from difs_p2p.cli_common import EXIT_CODES, EXIT_NAMES, exit_code, resolve_peer, resolve_token
from difs_p2p.cli_keys import delegation_expiry
from difs_p2p.cli_output import (
    Bars,
    check_lines,
    fetched_line,
    plural,
    published_line,
    rate,
    version_line,
    when,
)
from difs_p2p.cli_peer import missing_ancestor
from difs_p2p.ranges import ByteRange

MiB = 1024 * 1024


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.BadNameError("x"), 2),
        (errors.UsageError("x"), 2),
        (errors.DeletedError("x"), 4),
        (errors.NotFoundError("x"), 3),
        (errors.IntegrityError("x"), 5),
        (errors.AlreadyExistsError("x"), 7),
        (errors.PermissionDeniedError("x"), 6),
        (errors.CapacityError("x"), 8),
        (errors.BusyError("x"), 8),
        (errors.DifsTimeoutError("x"), 10),
        (errors.NetworkError("x"), 9),
        (errors.StorageError("x"), 11),
        (errors.WireError("x"), 12),
        (errors.PeerError("x"), 12),
        (errors.DifsError("x"), 1),
    ],
)
def test_each_error_class_has_its_exit_code(exc: errors.DifsError, code: int) -> None:
    """The most specific class in EXIT_CODES decides; anything else is 1 (unexpected)."""
    assert exit_code(exc) == code


def test_every_exit_code_has_a_json_name() -> None:
    """A --json error object names every code the CLI can exit with."""
    assert {code for _, code in EXIT_CODES} | {1, 130, 143} == set(EXIT_NAMES)


@pytest.mark.parametrize(
    ("text", "size"),
    [("4KiB", 4096), ("1MiB", MiB), ("16MiB", 16 * MiB), ("8192", 8192)],
)
def test_segment_size_accepts_multiples_of_4k(text: str, size: int) -> None:
    """--segment-size takes any size unit that lands on a valid segment size."""
    assert parse_segment_size(text) == size


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("1000KB", True),  # 1,000,000 bytes: decimal, almost surely meant KiB
        ("1MB", True),
        ("4000", True),
        ("32MiB", False),  # a multiple of 4096, only too large
        ("1KiB", False),
        ("4097", False),
    ],
)
def test_segment_size_refuses_with_a_hint_for_decimal_units(text: str, hint: bool) -> None:
    """A refused size says so; the KiB/MiB hint appears only when decimal units explain it."""
    with pytest.raises(errors.UsageError, match="segment size") as caught:
        parse_segment_size(text)
    assert ("did you mean KiB or MiB?" in str(caught.value)) is hint


def test_segment_size_refuses_what_is_not_a_size() -> None:
    """Text that is not a size at all fails as a usage error before any rule."""
    with pytest.raises(errors.UsageError, match="not a size"):
        parse_segment_size("big")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("0-1023", ByteRange(start=0, end=1023)),
        ("100-", ByteRange(start=100)),
        ("-4096", ByteRange(suffix=4096)),
    ],
)
def test_range_option_parses_http_forms(text: str | None, expected: ByteRange | None) -> None:
    """--range takes START-END, START- or -N; no option means the whole content."""
    assert parse_byte_range(text) == expected


@pytest.mark.parametrize("text", ["", "-", "abc", "1-x", "5"])
def test_range_option_refuses_other_forms(text: str) -> None:
    """Anything else is a usage error naming the range."""
    with pytest.raises(errors.UsageError, match="bad range"):
        parse_byte_range(text)


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


@pytest.mark.parametrize(
    ("days", "expires"),
    [(1.0, 1000.0 + 86400), (0.5, 1000.0 + 43200), (30.0, 1000.0 + 30 * 86400)],
)
def test_delegation_expiry(days: float, expires: float) -> None:
    """difs delegate --days counts whole or part days from now."""
    assert delegation_expiry(days, 1000.0) == expires


@pytest.mark.parametrize("days", [0.0, -1.0, float("inf"), float("-inf"), float("nan")])
def test_delegation_expiry_refuses_what_never_or_always_expires(days: float) -> None:
    """--days must be a finite number more than 0."""
    with pytest.raises(errors.UsageError, match="--days must be more than 0"):
        delegation_expiry(days, 1000.0)


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


def test_missing_ancestor(tmp_path: Path) -> None:
    """join removes on failure only the outermost directory it would have created."""
    assert missing_ancestor(tmp_path) is None
    assert missing_ancestor(tmp_path / "a" / "b") == tmp_path / "a"
    (tmp_path / "a").mkdir()
    assert missing_ancestor(tmp_path / "a" / "b") == tmp_path / "a" / "b"


def test_resolve_peer_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--peer, else $DIFS_PEER, else the local peer's address file, else a network error."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    monkeypatch.delenv("DIFS_PEER", raising=False)
    with pytest.raises(errors.NetworkError, match="no local peer"):
        resolve_peer(None)
    (tmp_path / "peer").mkdir()
    (tmp_path / "peer" / "address").write_text("127.0.0.1:4000\n")
    assert resolve_peer(None) == ("127.0.0.1", 4000)
    monkeypatch.setenv("DIFS_PEER", "127.0.0.1:5000")
    assert resolve_peer(None) == ("127.0.0.1", 5000)
    assert resolve_peer("localhost:6000") == ("127.0.0.1", 6000)
    with pytest.raises(errors.UsageError):
        resolve_peer("nonsense")


def test_resolve_token_uses_the_local_token_only_for_the_local_peer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The local peer's token is sent to the local peer only; another needs --token-file."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    monkeypatch.delenv("DIFS_PEER", raising=False)
    monkeypatch.delenv("DIFS_TOKEN_FILE", raising=False)
    local = tmp_path / "peer"
    local.mkdir()
    (local / "address").write_text("127.0.0.1:4000")
    (local / "control.token").write_text("11" * 32)
    other = tmp_path / "other.token"
    other.write_text("22" * 32)
    assert resolve_token(None, None, ("127.0.0.1", 4000)) == b"\x11" * 32
    assert resolve_token("127.0.0.1:4000", None, ("127.0.0.1", 4000)) == b"\x11" * 32
    with pytest.raises(errors.PermissionDeniedError, match="--token-file"):
        resolve_token("127.0.0.1:5000", None, ("127.0.0.1", 5000))
    assert resolve_token("127.0.0.1:5000", other, ("127.0.0.1", 5000)) == b"\x22" * 32
    monkeypatch.setenv("DIFS_TOKEN_FILE", str(other))
    assert resolve_token(None, None, ("127.0.0.1", 4000)) == b"\x22" * 32
    with pytest.raises(errors.PermissionDeniedError, match=r"nothing\.token not found"):
        resolve_token(None, tmp_path / "nothing.token", ("127.0.0.1", 4000))


def test_trust_pins_only_after_success(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """--trust uses the key for this command and saves the pin only when told it succeeded."""
    monkeypatch.setenv("DIFS_HOME", str(tmp_path))
    key = bytes(range(32))
    trial, pin_trusted = pins_for("/a.com/x", key.hex())
    assert trial.pinned("/a.com/x") == ("/a.com/x", key)
    assert not (tmp_path / "pins.json").exists()
    pin_trusted()
    saved, _ = pins_for("/a.com/x", None)
    assert saved.pinned("/a.com/x") == ("/a.com/x", key)
    with pytest.raises(errors.UsageError):
        pins_for("/a.com/x", "not hex")
