"""deploy/: the checked-in difs.toml is the generated one, the systemd unit verifies, the
Dockerfile copies what exists and starts a console script on the documented port."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from difs_p2p.cli_peer import join_settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
BIN = Path(sys.executable).parent
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def test_the_checked_in_difs_toml_is_the_generated_example() -> None:
    """deploy/difs.toml is exactly `difs-peer config --example` (regenerate it with that
    command when an option changes)."""
    out = subprocess.run(
        [str(BIN / "difs-peer"), "config", "--example"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.stdout == (DEPLOY / "difs.toml").read_text(), (
        "deploy/difs.toml is stale: difs-peer config --example > deploy/difs.toml"
    )


def _unit() -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, delimiters=("=",))
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(DEPLOY / "difs-peer.service")
    return parser


def _installed_unit(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this environment's difs-peer."""
    text = (DEPLOY / "difs-peer.service").read_text()
    unit = tmp_path / "difs-peer.service"
    unit.write_text(text.replace("/opt/difs/bin/difs-peer", str(BIN / "difs-peer")))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    """systemd-analyze verify accepts the unit: no unknown key, no bad value, the binary
    exists (ExecStart pointed at the installed difs-peer)."""
    out = subprocess.run(
        ["systemd-analyze", "verify", str(_installed_unit(tmp_path))],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0 and out.stderr == "", out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_systemd_unit_is_sandboxed(tmp_path: Path) -> None:
    """systemd-analyze security rates the unit's exposure at most 2.0 of 10 ("OK"; its
    --threshold counts in tenths)."""
    out = subprocess.run(
        [
            "systemd-analyze",
            "security",
            "--offline=yes",
            "--threshold=20",
            str(_installed_unit(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr


def test_the_unit_runs_join_and_leaves_settings_to_the_file() -> None:
    """The unit starts `difs-peer join` with DIFS_HOME in its state directory, stops it
    with SIGTERM and time for a drain, restarts on failure but not on exit 2, and sets no
    DIFS_PEER_ variable (which would override the file)."""
    service = _unit()["Service"]
    command = shlex.split(service["ExecStart"])
    assert Path(command[0]).name in SCRIPTS and command[1:] == ["join"]
    text = (DEPLOY / "difs-peer.service").read_text()
    environment = re.findall(r"^Environment=(\S+)$", text, re.MULTILINE)
    assert "DIFS_HOME=%S/difs" in environment
    assert "DIFS_CONFIG=%E/difs/difs.toml" in environment
    assert not [e for e in environment if e.startswith("DIFS_PEER_")]
    assert service["StateDirectory"] == "difs" and service["DynamicUser"] == "yes"
    assert service["KillSignal"] == "SIGTERM"
    assert re.fullmatch(r"\d+min", service["TimeoutStopSec"])
    assert int(service["TimeoutStopSec"].removesuffix("min")) >= 10
    assert service["Restart"] == "on-failure" and service["RestartPreventExitStatus"] == "2"
    assert service["RestrictAddressFamilies"] == "AF_INET AF_INET6 AF_UNIX"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert service[key] == "yes", key
    assert service["ProtectSystem"] == "strict"


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of deploy/Dockerfile, continuation lines joined."""
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def _dockerignore_allows(path: str) -> bool:
    """Whether .dockerignore (an allow-list after "*") lets ``path`` into the context."""
    allowed = False
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line == "*":
            allowed = False
        elif line.startswith("!") and path.split("/")[0] == line[1:].rstrip("/"):
            allowed = True
    return allowed


def test_the_dockerfile_copies_what_exists_and_starts_join() -> None:
    """Every COPY source exists and is in the build context; the entry point is the
    difs-peer console script's join; the image runs as a non-root user with /data."""
    steps = _dockerfile()
    copies = [args.split() for op, args in steps if op == "COPY" and "--from" not in args]
    assert copies
    for *sources, _dest in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert _dockerignore_allows(source), f".dockerignore leaves out {source}"
    (entrypoint,) = [args for op, args in steps if op == "ENTRYPOINT"]
    command = json.loads(entrypoint)  # a JSON array, the exec form
    assert command[0] in SCRIPTS and command[1:] == ["join"]
    (healthcheck,) = [args for op, args in steps if op == "HEALTHCHECK"]
    health = json.loads(healthcheck.split("CMD", 1)[1])
    assert health[0] in SCRIPTS and health[1] == "status"
    users = [args for op, args in steps if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("VOLUME", "/data") in steps
    assert any(op == "ENV" and "DIFS_HOME=/data" in args for op, args in steps)


def test_the_image_exposes_the_documented_port() -> None:
    """EXPOSE names UDP and TCP of the port the image sets and the README publishes."""
    steps = _dockerfile()
    (env,) = [args for op, args in steps if op == "ENV" and "DIFS_PEER_PORT" in args]
    port = re.search(r"DIFS_PEER_PORT=(\d+)", env)
    assert port is not None
    exposed = {p for op, args in steps if op == "EXPOSE" for p in args.split()}
    assert exposed == {f"{port.group(1)}/udp", f"{port.group(1)}/tcp"}
    deploy = (ROOT / "README.md").read_text().split("\n## Deploy\n", 1)[1]
    published = re.findall(r"-p (\d+):(\d+)/(udp|tcp)", deploy)
    assert published and {inner for _, inner, _ in published} == {port.group(1)}


def test_the_images_variables_name_options_of_join() -> None:
    """Each DIFS_PEER_ variable the image sets is an option of join (a renamed option
    would leave the image setting nothing)."""
    names = {f"DIFS_PEER_{s.name.upper()}" for s in join_settings()}
    steps = _dockerfile()
    used = {m for op, args in steps if op == "ENV" for m in re.findall(r"(DIFS_PEER_\w+)=", args)}
    assert used and used <= names, used - names
