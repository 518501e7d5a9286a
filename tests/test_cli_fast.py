"""The fast entry points (cli_fast): the same output and exit codes as the typer apps.

Help comes from cli_help, generated from the typer apps: it must be what typer renders.
``difs get`` and ``difs put`` in their plain forms run without typer: each case runs as a
real process through both entry points against a real peer, and their outputs compare
equal once timings are masked.
"""

from __future__ import annotations

import inspect
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from difs_p2p import cli, cli_content, cli_fast, cli_help
from tests.helpers import start_peer_process

BIN = Path(sys.executable).parent
# the typer apps of cli.py, run as the programs they are (argv[0] names the program)
TYPER = "import sys; sys.argv[0] = {prog!r}; from difs_p2p.cli import {main}; {main}()"


def run(
    argv: list[str], *, typer: bool, prog: str = "difs", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``prog argv`` as a real process, through cli_fast (the installed script) or the
    typer app directly."""
    main = "client_main" if prog == "difs" else "peer_main"
    cmd = [sys.executable, "-c", TYPER.format(prog=prog, main=main)] if typer else [str(BIN / prog)]
    return subprocess.run(
        [*cmd, *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env if env is not None else dict(os.environ, COLUMNS="80"),
        check=False,
    )


# -- help ----------------------------------------------------------------------------------


def test_help_module_is_what_typer_renders() -> None:
    """cli_help holds the help typer renders for every command: regenerate it with
    ``python -m difs_p2p.cli`` after changing a command."""
    assert cli.help_texts() == cli_help.HELP


@pytest.mark.parametrize(
    ("prog", "argv", "columns"),
    [
        ("difs", ["--help"], "80"),
        ("difs", ["get", "-h"], "120"),
        ("difs", ["s3-key", "create", "--help"], "80"),
        ("difs-peer", ["join", "--help"], "80"),
        ("difs", ["get", "--help"], "60"),  # narrower: typer renders it
        ("difs", ["--version"], "80"),
        ("difs-peer", ["--version"], "80"),
    ],
)
def test_help_is_typer_output(prog: str, argv: list[str], columns: str) -> None:
    """--help and --version through cli_fast print the same bytes, with the same exit
    code, as typer."""
    env = dict(os.environ, COLUMNS=columns)
    fast = run(argv, typer=False, prog=prog, env=env)
    slow = run(argv, typer=True, prog=prog, env=env)
    assert (fast.returncode, fast.stdout, fast.stderr) == (slow.returncode, slow.stdout, "")
    assert fast.returncode == 0 and fast.stdout.startswith(("Usage: ", "difs-p2p "))


def test_terminal_columns_follow_shutil() -> None:
    """The width cli_fast checks is the one click renders help for."""
    import shutil

    assert cli_fast.terminal_columns() == shutil.get_terminal_size().columns


# -- the parse of get and put ------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["get", "/a/b"], ("get", {"name": "/a/b"})),
        (
            ["get", "-o", "-", "/a/b", "--json", "--sync"],
            ("get", {"output": "-", "name": "/a/b", "as_json": True, "sync": True}),
        ),
        (
            ["get", "/a/b", "--output=x", "--version", "2", "--range", "0-9", "--peer", "h:1"],
            (
                "get",
                {"name": "/a/b", "output": "x", "version": 2, "byte_range": "0-9", "peer": "h:1"},
            ),
        ),
        (["get", "/a/b", "--trust", "ab" * 32], ("get", {"name": "/a/b", "trust": "ab" * 32})),
        (
            ["put", "-", "/a/b", "--replicas", "16", "--update", "--key", "k"],
            (
                "put",
                {"file": "-", "name": "/a/b", "replicas": 16, "update": True, "key": Path("k")},
            ),
        ),
        (
            [
                "put",
                "f",
                "/a/b",
                "--segment-size=4MiB",
                "--token-file",
                "t",
                "--content-type",
                "y",
            ],
            (
                "put",
                {
                    "file": "f",
                    "name": "/a/b",
                    "segment_size": "4MiB",
                    "token_file": Path("t"),
                    "content_type": "y",
                },
            ),
        ),
        # typer's: it parses these itself or reports the usage error
        ([], None),
        (["stat", "/a/b"], None),
        (["get"], None),
        (["get", "/a/b", "/c"], None),
        (["get", "/a/b", "--help"], None),
        (["get", "-h", "/a/b"], None),
        (["get", "/a/b", "--", "-x"], None),
        (["get", "/a/b", "-o"], None),
        (["get", "/a/b", "-o", "--json"], None),
        (["get", "/a/b", "-ox"], None),
        (["get", "/a/b", "--json", "--json"], None),
        (["get", "/a/b", "-o", "x", "--output", "y"], None),
        (["get", "/a/b", "--version", "0"], None),
        (["get", "/a/b", "--version", "-1"], None),
        (["get", "/a/b", "--version", "x"], None),
        (["get", "/a/b", "--version", "²"], None),
        (["get", "/a/b", "--json=1"], None),
        (["get", "/a/b", "--unknown"], None),
        (["get", "/a/b", "--out", "x"], None),
        (["put", "f", "/a/b", "--replicas", "17"], None),
        (["put", "f", "/a/b", "--meta", "a=b"], None),
        (["put", "f"], None),
    ],
)
def test_fast_command(argv: list[str], expected: tuple[str, dict[str, Any]] | None) -> None:
    """The plain forms of get and put parse to cli_content's arguments; the rest is typer's."""
    assert cli_fast.fast_command(argv) == expected


@pytest.mark.parametrize("command", sorted(cli_fast.SPECS))
def test_fast_options_are_the_typer_commands(command: str) -> None:
    """Every option and argument cli_fast takes is the typer command's, with the same
    parameter name; its integer bounds are the command's."""
    import typer

    group: Any = typer.main.get_command(cli.client_app)
    params = {p.name: p for p in group.commands[command].params}
    spec = cli_fast.SPECS[command]
    for flag, name in {**spec.values, **spec.flags}.items():
        assert flag in params[name].opts, (flag, name)
    for name, is_flag in [
        *((n, False) for n in spec.values.values()),
        *((n, True) for n in spec.flags.values()),
    ]:
        assert params[name].is_flag == is_flag, name
    assert [p.name for p in params.values() if p.param_type_name == "argument"] == list(
        spec.positional
    )
    for name, (low, high) in spec.ints.items():
        assert (params[name].min, params[name].max) == (low, high)
    for name in {*spec.values.values()}:
        annotation = params[name].type_descriptor.annotation
        assert (annotation is Path) == (name in cli_fast.PATHS), name
    # and no option reads the environment, whose values cli_fast would not see
    assert all(p.envvar is None for p in params.values())
    # cli_content's defaults are the command's
    content = cli_content.get_content if command == "get" else cli_content.put_content
    # (its keyword-only parameters are not options: get's ``quick`` is for tests)
    signature = {
        n: p
        for n, p in inspect.signature(content).parameters.items()
        if p.kind is not p.KEYWORD_ONLY
    }
    assert list(signature) == list(params)
    for name, p in params.items():
        if p.param_type_name == "option":
            assert signature[name].default == p.default, name


# -- get and put: the same through both entry points ---------------------------------------


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """One peer process; the environment of difs commands that use it as its operator."""
    root = tmp_path_factory.mktemp("fast")
    proc, address = start_peer_process(root / "p0", "--http", "off")
    try:
        yield dict(
            os.environ,
            DIFS_HOME=str(root / "home"),
            DIFS_PEER=address,
            DIFS_TOKEN_FILE=str(root / "p0" / "control.token"),
            COLUMNS="80",
        )
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)


def masked(text: str) -> str:
    """``text`` with its hashes, numbers and units masked (timings and rates differ from
    run to run, and each name has its own manifest)."""
    numbers = re.sub(r"\d+(\.\d+)?", "N", re.sub(r"[0-9a-f]{16,}", "H", text))
    return re.sub(r"N (?:[KMGT]i)?B\b", "N U", numbers)


def test_get_and_put_agree_with_typer(peer: dict[str, str], tmp_path: Path) -> None:
    """Each form of get and put prints the same and exits the same through cli_fast as
    through the typer app (numbers masked), and writes the same files."""
    src = tmp_path / "small.txt"
    src.write_bytes(b"hello\n")
    env = dict(peer)
    outputs: dict[bool, list[tuple[Any, ...]]] = {}
    for typer in (False, True):
        label = "typer" if typer else "fast"
        where = tmp_path / f"dir-{label}"
        where.mkdir()
        name = f"/agree/obj-{label}.txt"
        cases = [
            ["put", str(src), name, "--replicas", "1"],
            ["put", str(src), name],  # exists: 7
            ["put", str(src), name, "--update", "--replicas", "1", "--json"],
            ["get", name, "-o", str(where / "out.txt")],
            ["get", name, "-o", "-", "--range", "1-3"],
            ["get", name, "--output", str(where / "v1.txt"), "--version", "1", "--json"],
            ["get", "/agree/missing.txt", "--json"],  # 3
            ["get", name, "--range", "9-", "-o", "-"],  # past the end: 2
            ["get", name, "--version", "0"],  # typer's usage error either way
        ]
        results = []
        for argv in cases:
            done = run(argv, typer=typer, env=env)
            shown = [text.replace(f"-{label}", "-X") for text in (done.stdout, done.stderr)]
            results.append((done.returncode, *map(masked, shown)))
        outputs[typer] = results
        assert (where / "out.txt").read_bytes() == (where / "v1.txt").read_bytes() == b"hello\n"
    assert outputs[False] == outputs[True]
    assert [code for code, _, _ in outputs[False]] == [0, 7, 0, 0, 0, 0, 3, 2, 2]


def test_get_imports_no_typer(peer: dict[str, str], tmp_path: Path) -> None:
    """A plain ``difs get`` of a small object imports neither typer, click, rich,
    pydantic, asyncio nor the asyncio client: it takes the quick path."""
    src = tmp_path / "x.txt"
    src.write_bytes(b"x")
    assert (
        run(
            ["put", str(src), "/fast/imports.txt", "--replicas", "1"], typer=False, env=peer
        ).returncode
        == 0
    )
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(BIN / "difs"),
            "get",
            "/fast/imports.txt",
            "-o",
            "-",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=peer,
        check=False,
    )
    assert done.returncode == 0 and done.stdout == "x"
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert "difs_p2p.quickget" in imported and "difs_p2p.client" not in imported
    assert not {m.split(".")[0] for m in imported} & {
        "typer",
        "click",
        "rich",
        "pydantic",
        "asyncio",
    }


def test_reader_gone_exits_as_typer(peer: dict[str, str], tmp_path: Path) -> None:
    """A get to stdout whose reader closes the pipe early exits as the typer app does."""
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(1 << 20))  # more than a pipe holds
    put = run(["put", str(src), "/fast/big.bin", "--replicas", "1"], typer=False, env=peer)
    assert put.returncode == 0, put.stderr
    codes = []
    for typer in (False, True):
        cmd = [sys.executable, "-c", TYPER.format(prog="difs", main="client_main")]
        argv = [*(cmd if typer else [str(BIN / "difs")]), "get", "/fast/big.bin", "-o", "-"]
        proc = subprocess.Popen(argv, env=peer, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert proc.stdout.read(1)
        proc.stdout.close()
        codes.append((proc.wait(timeout=60), proc.stderr.read()))
    assert codes[0] == codes[1]


def test_help_imports_only_its_text() -> None:
    """``difs --help`` loads nothing of difs_p2p but cli_fast and cli_help, and no typer."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", str(BIN / "difs"), "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=dict(os.environ, COLUMNS="80"),
        check=False,
    )
    assert done.returncode == 0 and done.stdout == cli_help.HELP["difs"][()]
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if "|" in line}
    assert {m for m in imported if m.startswith("difs_p2p.")} == {
        "difs_p2p.cli_fast",
        "difs_p2p.cli_help",
    }
    assert not {m.split(".")[0] for m in imported} & {"typer", "click", "rich", "asyncio"}
