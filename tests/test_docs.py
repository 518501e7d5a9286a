"""The documentation is checked against the code: its examples run, its tables match.

As sqlite-utils tests its docs: every fenced ``python`` block of README.md and docs/*.md
runs as a script against a real local network; every ``difs``/``difs-peer`` command and
option that a shell block or a table names exists in that command's ``--help``; the exit
code table matches ``cli_common.EXIT_CODES``; the limits table matches the constants;
the layers docs/ARCHITECTURE.md shows are pyproject.toml's import-linter contract, and its
module table names every module of difs_p2p once, in layer order.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from difs_p2p import cli_common, cli_peer, client, names, segments

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[tuple[str, str]]:
    """(where, code) of every fenced block in ``language`` in the docs."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for match in _FENCE.finditer(text):
            if match.group(1) == language:
                line = text.count("\n", 0, match.start()) + 1
                found.append((f"{path.relative_to(ROOT)}:{line}", match.group(2)))
    return found


@cache
def help_text(*command: str) -> str:
    """The --help output of ``difs``/``difs-peer`` [subcommand...]."""
    out = subprocess.run(
        [str(BIN / command[0]), *command[1:], "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert out.returncode == 0, (command, out.stderr)
    return out.stdout


def subcommands(*command: str) -> set[str]:
    """The commands listed in ``command --help``."""
    text = help_text(*command)
    listed = text.split("Commands:", 1)[1] if "Commands:" in text else ""
    return {line.split()[0] for line in listed.splitlines() if line.strip()}


def check_command(words: list[str], where: str) -> None:
    """``words`` (a difs or difs-peer command line) uses only commands and options that
    its --help lists."""
    binary = Path(words[0]).name
    rest = words[1:]
    command = [binary]
    while rest and not rest[0].startswith("-") and rest[0] in subcommands(*command):
        command.append(rest.pop(0))
    if len(command) == 1 and binary == "difs" and rest and not rest[0].startswith("-"):
        pytest.fail(f"{where}: {binary} has no command {rest[0]!r}")
    shown = help_text(*command)
    for word in rest:
        if re.match(r"--?[A-Za-z]", word):
            option = word.split("=", 1)[0]
            assert re.search(rf"(^|[\s,]){re.escape(option)}([\s,]|$)", shown, re.MULTILINE), (
                f"{where}: {' '.join(command)} has no option {option}"
            )


def shell_commands(code: str) -> Iterator[list[str]]:
    """The difs/difs-peer commands in a shell block (each stage of a pipeline)."""
    for line in code.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        for stage in line.split("|"):
            words = shlex.split(stage)
            if words and Path(words[0]).name in ("difs", "difs-peer"):
                yield words


@pytest.fixture(scope="module")
def network(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """Two difs-peer processes; the address of the first and its control token file."""
    root = tmp_path_factory.mktemp("docs-net")
    procs: list[subprocess.Popen[str]] = []
    try:
        seed = ""
        for name in ("a", "b"):
            cmd = [str(BIN / "difs-peer"), "join", "--data", str(root / name)]
            proc = subprocess.Popen(
                [*cmd, *(["--bootstrap", seed] if seed else [])],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline()
            assert line.startswith("peer ready"), line
            seed = seed or dict(p.split("=", 1) for p in line.split()[2:])["address"]
        yield seed, root / "a" / "control.token"
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=15)


@pytest.mark.parametrize(("where", "code"), blocks("python"), ids=lambda v: str(v)[:40])
def test_python_examples_run_as_written(
    network: tuple[str, Path], tmp_path: Path, where: str, code: str
) -> None:
    """Each python block of the docs runs as a script against a local network."""
    (tmp_path / "izone.mp4").write_bytes(os.urandom(300_000))
    script = tmp_path / "example.py"
    script.write_text(code)
    address, token_file = network
    env = dict(
        os.environ,
        DIFS_PEER=address,
        DIFS_HOME=str(tmp_path / "home"),
        DIFS_TOKEN_FILE=str(token_file),
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=False,
    )
    assert out.returncode == 0, f"{where}:\n{out.stderr}"


def test_the_readme_has_a_python_example() -> None:
    """The README shows the Python API (and so it is run above)."""
    assert any(where.startswith("README.md") for where, _ in blocks("python"))


@pytest.mark.parametrize(("where", "code"), blocks("sh"), ids=lambda v: str(v)[:40])
def test_shell_examples_use_existing_commands_and_options(where: str, code: str) -> None:
    """Every difs/difs-peer command and option in a shell block is in its --help."""
    for words in shell_commands(code):
        check_command(words, where)


def test_json_examples_parse() -> None:
    """Every json block of the docs is JSON."""
    for where, code in blocks("json"):
        try:
            json.loads(code)
        except ValueError as exc:
            pytest.fail(f"{where}: {exc}")


def _table(title: str) -> list[list[str]]:
    """The rows (cells) of the first table after the heading ``title`` in README.md."""
    text = (ROOT / "README.md").read_text()
    section = text.split(title, 1)[1]
    rows = []
    started = False
    for line in section.splitlines():
        if line.startswith("|"):
            started = True
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not set("".join(cells)) <= set("-: "):
                rows.append(cells)
        elif started:
            break
    return rows[1:]  # without the header


def test_command_table_options_exist() -> None:
    """Each option the README's command table names is in that command's --help."""
    for command, options in _table("| command | options |"):
        # the command's words, without its arguments (FILE, [PATH]): `difs s3-key create`
        words = [w for w in command.strip("`").split() if not w.isupper()]
        for option in re.findall(r"`(-[-\w]+)", options):
            check_command([*words, option], f"README table row {command}")


def test_join_table_matches_the_help() -> None:
    """The README's difs-peer join table and join --help list the same options."""
    documented = {re.findall(r"--[\w-]+", row[0])[0] for row in _table("### `difs-peer join`")}
    shown = set(re.findall(r"^\s+(?:-\w, )?(--[\w-]+)", help_text("difs-peer", "join"), re.M))
    assert documented == shown - {"--help"}


def test_exit_code_table_matches_the_code() -> None:
    """The README's exit-code table lists exactly the codes the CLI uses."""
    table = {int(code): meaning for code, meaning in _table("## Exit codes")}
    used = {code for _, code in cli_common.EXIT_CODES} | {0, 1, 130, 143}
    used.add(cli_peer.EXIT_DRAIN_INCOMPLETE)  # difs-peer leave: a range not handed over
    assert set(table) == used
    assert set(cli_common.EXIT_NAMES) == used - {0}
    # each error class's code is described by the words of its class
    for cls, code in cli_common.EXIT_CODES:
        word = {
            "BadNameError": "name",
            "UsageError": "usage",
            "DeletedError": "deleted",
            "NotFoundError": "not found",
            "IntegrityError": "integrity",
            "AlreadyExistsError": "already exists",
            "PermissionDeniedError": "permission",
            "CapacityError": "space",
            "DifsTimeoutError": "timeout",
            "NetworkError": "network",
            "StorageError": "storage",
            "PeerError": "peer",
        }[cls.__name__]
        assert word in table[code], (cls.__name__, code, table[code])


def test_limits_table_matches_the_code() -> None:
    """The README's limits are the ones the code enforces."""
    limits = {row[0]: row[1] for row in _table("### Limits")}
    seg = limits["segment size (`--segment-size`)"]
    assert segments.MIN_SEGMENT_SIZE == 4096 and "4 KiB" in seg
    assert segments.MAX_SEGMENT_SIZE == 16 << 20 and "16 MiB" in seg
    assert limits["replicas (`--replicas`)"] == f"1 to {client.MAX_REPLICAS}"
    assert "max=16" not in help_text("difs", "put")  # the help shows the same range
    assert f"1<=x<={client.MAX_REPLICAS}" in help_text("difs", "put")
    name = limits["a name"]
    assert f"{names.MAX_NAME_BYTES:,} bytes" in name
    assert f"{names.MAX_COMPONENTS} components" in name


def test_pyproject_has_no_deprecated_setuptools_settings() -> None:
    """project.license is an SPDX string; package data belongs to listed packages."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert isinstance(project["project"]["license"], str)
    tool = project["tool"]["setuptools"]
    assert set(tool["package-data"]) <= set(tool["packages"])
    for package in tool["packages"]:
        assert (ROOT / package.replace(".", "/")).is_dir(), package


def _architecture_section(title: str) -> str:
    """The text of ARCHITECTURE.md's section ``## title``, up to the next ``## `` heading."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    section = text.split(f"\n## {title}\n", 1)[1]
    return section.split("\n## ", 1)[0]


def _documented_layers(container: str) -> list[str]:
    """The layers ARCHITECTURE.md shows for ``container``: the indented lines of the
    block after its ``<!-- layers of CONTAINER`` marker, pure marks (``*``) dropped."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    after = text.split(f"<!-- layers of {container}:", 1)[1]
    match = _FENCE.search(after)
    assert match is not None, f"no layer block after the {container} marker"
    return [
        " | ".join(part.strip() for part in line.replace("*", "").split("|"))
        for line in match.group(2).splitlines()
        if line.startswith("    ")
    ]


def _contract_layers(container: str) -> list[str]:
    """The layers of pyproject.toml's import-linter contract for ``container``."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contracts = [
        c
        for c in project["tool"]["importlinter"]["contracts"]
        if c["type"] == "layers" and c.get("containers") == [container]
    ]
    assert len(contracts) == 1, container
    return [" | ".join(p.strip() for p in layer.split("|")) for layer in contracts[0]["layers"]]


@pytest.mark.parametrize("container", ["difs_p2p", "sim"])
def test_documented_layers_are_the_checked_contract(container: str) -> None:
    """ARCHITECTURE.md shows the same layers, in the same order, as the import-linter contract."""
    assert _documented_layers(container) == _contract_layers(container)


def test_module_table_names_every_module_once_in_layer_order() -> None:
    """The module table has one row per module of difs_p2p, none extra, in layer order."""
    section = _architecture_section("Modules and who calls whom")
    rows = re.findall(r"^\| `(\w+)\.py` \|", section, re.MULTILINE)
    files = {p.stem for p in (ROOT / "difs_p2p").glob("*.py")} - {"__init__"}
    assert sorted(rows) == sorted(set(rows)), "a module has two rows"
    assert set(rows) - files == set(), "rows for modules that do not exist"
    assert files - set(rows) == set(), "modules without a row"
    layer_of = {
        name.strip(): depth
        for depth, layer in enumerate(_contract_layers("difs_p2p"))
        for name in layer.split("|")
    }
    depths = [layer_of[row] for row in rows]
    assert depths == sorted(depths), "rows out of layer order"


def test_pure_marks_match_the_io_column() -> None:
    """A module is marked pure in the layer list exactly when its table row says it does no I/O."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = _FENCE.search(text.split("<!-- layers of difs_p2p:", 1)[1])
    assert block is not None
    marked = set(re.findall(r"(\w+)\*", block.group(2)))
    section = _architecture_section("Modules and who calls whom")
    rows = re.findall(r"^\| `(\w+)\.py` \|.*\| ([^|]+) \|$", section, re.MULTILINE)
    assert len(rows) == len(re.findall(r"^\| `\w+\.py` \|", section, re.MULTILINE))
    assert marked == {module for module, io in rows if io.strip() == "no"}
