"""The configuration file and the environment with the real commands, as processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment without any DIFS_ variable of the caller, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFS_")}
    return {**env, "DIFS_HOME": str(tmp_path / "home"), **extra}


def _join(args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(BIN / "difs-peer"), "join", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_a_flag_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    """Three real peers read one file ($DIFS_HOME/difs.toml, $DIFS_CONFIG, --config):
    the data directory is the file's, then DIFS_PEER_DATA's, then --data's."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "difs.toml").write_text('[peer]\ndata = "from-file"\nlog-level = "info"\n')
    conf = tmp_path / "difs.toml"
    conf.write_text('[peer]\ndata = "from-file"\n')
    runs = {
        "file": ([], _env(tmp_path)),
        "env": ([], _env(tmp_path, DIFS_CONFIG=str(conf), DIFS_PEER_DATA=str(tmp_path / "env"))),
        "flag": (
            ["--config", str(conf), "--data", str(tmp_path / "flag")],
            _env(tmp_path, DIFS_PEER_DATA=str(tmp_path / "env2")),
        ),
    }
    procs = {name: _join(args, env) for name, (args, env) in runs.items()}
    try:
        for name, proc in procs.items():
            assert proc.stdout is not None and proc.stderr is not None
            line = proc.stdout.readline()
            assert line.startswith("peer ready"), (name, line, proc.stderr.read())
    finally:
        for proc in procs.values():
            proc.send_signal(signal.SIGTERM)
        outs = {name: proc.communicate(timeout=30) for name, proc in procs.items()}
    assert (home / "from-file" / "peer.key").exists()  # relative to the file's directory
    assert (tmp_path / "env" / "peer.key").exists()
    assert (tmp_path / "flag" / "peer.key").exists()
    assert not (tmp_path / "from-file").exists() and not (tmp_path / "env2").exists()
    # logged at INFO: the level the file set reached the peer
    assert f"configuration file={home / 'difs.toml'}" in outs["file"][1]
    assert " INFO " not in outs["flag"][1]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peer]\nprot = 4000\n", "line 2: [peer] has no key 'prot' (did you mean 'port'?)"),
        ('[peer]\nport = "4000"\n', 'line 2: [peer] port: expected an integer, got "4000"'),
        ('[peer]\ncapacity = "lots"\n', "line 2: [peer] capacity: not a size: 'lots'"),
        ("[peer]\nport = = 1\n", "line 2: not valid TOML"),
    ],
)
def test_a_bad_file_stops_join_before_anything_starts(
    tmp_path: Path, text: str, message: str
) -> None:
    """A bad file: one line naming the file, line and key; exit 2; no data directory."""
    conf = tmp_path / "difs.toml"
    conf.write_text(text)
    data = tmp_path / "data"
    out = subprocess.run(
        [str(BIN / "difs-peer"), "join", "--config", str(conf), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path),
        check=False,
    )
    assert out.returncode == 2, out.stderr
    assert out.stderr == f"error: {conf}, {message}" + out.stderr.split(message, 1)[1]
    assert out.stderr.count("\n") == 1
    assert not data.exists() and not (tmp_path / "home").exists()


def test_missing_files_and_bad_variables_are_usage_errors(tmp_path: Path) -> None:
    """--config or $DIFS_CONFIG naming no file, or a bad DIFS_PEER_<OPTION>: exit 2, one line."""
    for args, env, message in (
        (["--config", str(tmp_path / "none.toml")], {}, "none.toml: cannot read"),
        ([], {"DIFS_CONFIG": str(tmp_path)}, f"{tmp_path}: cannot read"),
        ([], {"DIFS_PEER_PORT": "x"}, "environment DIFS_PEER_PORT: expected an integer"),
    ):
        out = subprocess.run(
            [str(BIN / "difs-peer"), "join", "--data", str(tmp_path / "d"), *args],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(tmp_path, **env),
            check=False,
        )
        assert out.returncode == 2 and message in out.stderr, out.stderr
        assert out.stderr.count("\n") == 1 and not (tmp_path / "d").exists()


def test_config_shows_each_setting_and_where_it_comes_from(tmp_path: Path) -> None:
    """difs-peer config lists join's settings with their source: environment, file, default."""
    conf = tmp_path / "difs.toml"
    conf.write_text("[peer]\nport = 4100\nretries = 2\n")
    out = subprocess.run(
        [str(BIN / "difs-peer"), "config", "--config", str(conf)],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path, DIFS_PEER_PORT="4200"),
        check=True,
    )
    lines = out.stdout.splitlines()
    assert lines[0] == f"# configuration file: {conf}"
    assert "port = 4200  # environment DIFS_PEER_PORT" in lines
    assert "retries = 2  # file" in lines
    assert 'capacity = "10GiB"  # default' in lines


def test_the_client_table_names_the_peer_after_the_environment(tmp_path: Path) -> None:
    """[client] peer is used when neither --peer nor $DIFS_PEER is given."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "difs.toml").write_text('[client]\npeer = "127.0.0.1:9"\n')
    for extra, shown in (({}, "127.0.0.1:9"), ({"DIFS_PEER": "127.0.0.1:7"}, "127.0.0.1:7")):
        out = subprocess.run(
            [str(BIN / "difs"), "stat", "/a.com/x"],
            capture_output=True,
            text=True,
            timeout=30,
            env=_env(tmp_path, **extra),
            check=False,
        )
        assert out.returncode == 9 and shown in out.stderr, out.stderr
    (home / "difs.toml").write_text('[client]\npeer = "nohost"\n')
    out = subprocess.run(
        [str(BIN / "difs"), "stat", "/a.com/x"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(tmp_path),
        check=False,
    )
    assert out.returncode == 2 and "line 2: [client] peer: malformed address" in out.stderr
