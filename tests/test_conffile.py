"""The configuration file's rules (conffile.py) and the settings derived from the commands."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import pytest
import typer

from difs_p2p import conffile
from difs_p2p.cli_common import client_settings, settings_of
from difs_p2p.cli_peer import example_config, join_settings
from difs_p2p.conffile import Kind, Setting
from difs_p2p.config import parse_hostport, parse_size
from difs_p2p.errors import UsageError

SETTINGS = [
    Setting("bootstrap", "bootstrap", Kind.LIST, "peers", None, check=parse_hostport),
    Setting("port", "port", Kind.INT, "the port", 0),
    Setting("repair-interval", "repair_interval", Kind.FLOAT, "seconds", 60.0),
    Setting("limit-loopback", "limit_loopback", Kind.BOOL, "count loopback", True),
    Setting("capacity", "capacity", Kind.STR, "storage", "10GiB", check=parse_size),
    Setting("data", "data", Kind.PATH, "data directory", None),
    Setting("log-level", "log_level", Kind.CHOICE, "logging", "warning", ("info", "warning")),
]
TABLES = {"peer": SETTINGS, "client": []}


def values(text: str, base: Path | None = None) -> dict[str, Any]:
    """What ``text``'s [peer] table sets, checked as the CLI checks a file named f.toml."""
    doc = conffile.parse(text, "f.toml")
    conffile.check_tables(doc, TABLES, "f.toml", text)
    return conffile.table_values(doc, "peer", SETTINGS, source="f.toml", text=text, base=base)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("[peer]\n", {}),
        ("[peer]\nport = 4000\n", {"port": 4000}),
        ("[peer]\nrepair-interval = 5\n", {"repair_interval": 5}),
        ("[peer]\nrepair-interval = 0.5\n", {"repair_interval": 0.5}),
        ("[peer]\nlimit-loopback = false\n", {"limit_loopback": False}),
        ('[peer]\ncapacity = "5GiB"\n', {"capacity": "5GiB"}),
        ('[peer]\nlog-level = "info"\n', {"log_level": "info"}),
        (
            '[peer]\nbootstrap = ["1.2.3.4:5", "6.7.8.9:10"]\n',
            {"bootstrap": ["1.2.3.4:5", "6.7.8.9:10"]},
        ),
        ('[peer]\nbootstrap = "1.2.3.4:5"\n', {"bootstrap": ["1.2.3.4:5"]}),
        ('[peer]\ndata = "/srv/difs"\n', {"data": "/srv/difs"}),
        ('[client]\n[peer]\n"port" = 1\n', {"port": 1}),
    ],
)
def test_good_files_give_the_values_by_parameter_name(text: str, expected: dict[str, Any]) -> None:
    """Each key becomes its parameter's value, typed as TOML typed it."""
    assert values(text) == expected


def test_relative_paths_are_taken_from_the_files_directory() -> None:
    """A relative path in the file is relative to the file, an absolute one stays."""
    assert values('[peer]\ndata = "peer"\n', Path("/etc/difs")) == {"data": "/etc/difs/peer"}
    assert values('[peer]\ndata = "/srv/x"\n', Path("/etc/difs")) == {"data": "/srv/x"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[peer]\nport = \n", "f.toml, line 2: not valid TOML: "),
        ("[peer]\nport = 1\nport = 2\n", "f.toml, line 3: not valid TOML: "),
        ("[peer\n", "f.toml, line 1: not valid TOML: "),
        ("port = 1\n", "f.toml, line 1: key 'port' is outside a table: put it under [peer]"),
        ("colour = 1\n", "f.toml, line 1: key 'colour' is outside a table; settings belong in"),
        ("[peers]\n", "f.toml, line 1: unknown table [peers] (did you mean [peer]?)"),
        ("[zzz]\n", "f.toml, line 1: unknown table [zzz]; the tables are [client], [peer]"),
        ("[peer]\n\nprot = 1\n", "f.toml, line 3: [peer] has no key 'prot' (did you mean 'port'?)"),
        (
            "[peer]\nrepair_interval = 1\n",
            "no key 'repair_interval' (did you mean 'repair-interval'?)",
        ),
        ("[peer]\nxyzzy = 1\n", "f.toml, line 2: [peer] has no key 'xyzzy'"),
        ('[peer]\nport = "4000"\n', 'f.toml, line 2: [peer] port: expected an integer, got "4000"'),
        ("[peer]\nport = true\n", "[peer] port: expected an integer, got true"),
        ("[peer]\nport = 1.5\n", "[peer] port: expected an integer, got 1.5"),
        (
            "[peer]\nrepair-interval = false\n",
            "repair-interval: expected a number, got false",
        ),
        ("[peer]\nlimit-loopback = 1\n", "[peer] limit-loopback: expected true or false, got 1"),
        ("[peer]\ncapacity = 10\n", "[peer] capacity: expected a string, got 10"),
        ('[peer]\ncapacity = "lots"\n', "f.toml, line 2: [peer] capacity: not a size: 'lots'"),
        (
            '[peer]\nlog-level = "loud"\n',
            "log-level: 'loud' is not one of 'info', 'warning'",
        ),
        ("[peer]\nbootstrap = [1]\n", "[peer] bootstrap: expected a list of strings, got [1]"),
        ('[peer]\nbootstrap = ["nohost"]\n', "[peer] bootstrap: malformed address 'nohost'"),
        ('[peer]\ndata = ["' + "x" * 100 + '"]\n', 'expected a path (a string), got ["xxxxxxxxx'),
        ("[peer]\nport = {a = 1}\n", '[peer] port: expected an integer, got {"a": 1}'),
    ],
)
def test_each_mistake_is_one_line_naming_file_line_and_key(text: str, message: str) -> None:
    """Malformed TOML, unknown tables and keys, wrong types and bad values are UsageErrors
    of one line that name the file, the line and the key."""
    with pytest.raises(UsageError) as caught:
        values(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith("f.toml")
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("text", "table", "key", "line"),
    [
        ("a = 1\n[peer]\na = 2\n", "peer", "a", 3),
        ("a = 1\n[peer]\na = 2\n", None, "a", 1),
        ("[client]\nport = 1\n[peer]\n  port=2\n", "peer", "port", 4),
        ("[peer]\n'port' = 2\n", "peer", "port", 2),
        ("[ peer ]\n", "peer", "", 1),
        ("[peer]\n", "peer", "port", None),
    ],
)
def test_line_of_finds_a_key_in_its_table(
    text: str, table: str | None, key: str, line: int | None
) -> None:
    """line_of finds the key in the right table, or the table's header, or nothing."""
    assert conffile.line_of(text, table, key) == line


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({}, None),
        ({"DIFS_PEER_PORT": "4000", "DIFS_PEER_LIMIT_LOOPBACK": "off"}, None),
        ({"DIFS_PEER_BOOTSTRAP": "1.2.3.4:5 6.7.8.9:10", "DIFS_PEER_LOG_LEVEL": "info"}, None),
        ({"DIFS_PEER_PORT": ""}, None),  # empty is unset
        ({"DIFS_PEER_PORT": "x"}, "environment DIFS_PEER_PORT: expected an integer, got 'x'"),
        ({"DIFS_PEER_REPAIR_INTERVAL": "soon"}, "DIFS_PEER_REPAIR_INTERVAL: expected a number"),
        ({"DIFS_PEER_LIMIT_LOOPBACK": "maybe"}, "expected true or false, got 'maybe'"),
        ({"DIFS_PEER_LOG_LEVEL": "loud"}, "DIFS_PEER_LOG_LEVEL: 'loud' is not one of"),
        ({"DIFS_PEER_CAPACITY": "lots"}, "DIFS_PEER_CAPACITY: not a size: 'lots'"),
        ({"DIFS_PEER_BOOTSTRAP": "1.2.3.4:5 nohost"}, "malformed address 'nohost'"),
        ({"DIFS_PEER": "1.2.3.4:5", "DIFS_HOME": "/x"}, None),  # not settings of the table
        ({"DIFS_PEER_PROT": "1"}, "DIFS_PEER_PROT: no such setting .did you mean 'DIFS_PEER_PORT'"),
    ],
)
def test_environment_values_are_checked_with_the_variables_name(
    environ: dict[str, str], message: str | None
) -> None:
    """A bad DIFS_PEER_<OPTION> value is a UsageError naming the variable."""
    if message is None:
        conffile.check_env(environ, "DIFS_PEER", SETTINGS)
        return
    with pytest.raises(UsageError, match=message):
        conffile.check_env(environ, "DIFS_PEER", SETTINGS)


@pytest.mark.parametrize(
    ("value", "toml"),
    [
        (True, "true"),
        (3, "3"),
        (0.5, "0.5"),
        ('a"b', '"a\\"b"'),
        (["a", "b"], '["a", "b"]'),
        (Path("/x"), '"/x"'),
        (Kind.INT, '"an integer"'),
    ],
)
def test_toml_value_writes_toml(value: Any, toml: str) -> None:
    """toml_value writes values so that TOML reads them back."""
    assert conffile.toml_value(value) == toml
    assert tomllib.loads(f"v = {toml}")["v"] is not None


def test_the_example_names_every_setting_once_and_changes_nothing() -> None:
    """The example has every option of join and of the client once, commented out with
    its flag and variable; uncommented, its defaults read back as the same settings."""
    text = example_config()
    assert tomllib.loads(text) == {"peer": {}, "client": {}}
    for prefix, settings in (("DIFS_PEER", join_settings()), ("DIFS", client_settings())):
        for setting in settings:
            assert text.count(f"\n# {setting.key} = ") == 1, setting.key
            assert f"flag {setting.flag}, environment {conffile.env_name(prefix, setting)}" in text
    live = "\n".join(
        line.removeprefix("# ").split("  # no default")[0]
        for line in text.splitlines()
        if line.startswith("# ") and " = " in line and "no default" not in line
    )
    doc = tomllib.loads(live.replace("[peer]", "").replace("[client]", ""))
    by_key = {s.key: s for s in join_settings()}
    assert all(doc[key] == by_key[key].default for key in doc)


def test_join_settings_come_from_the_command() -> None:
    """Every option of join is a [peer] setting except --config; the kinds follow the
    annotations and the environment names the one rule."""
    settings = {s.key: s for s in join_settings()}
    assert "config" not in settings
    assert settings["bootstrap"].kind is Kind.LIST
    assert settings["port"].kind is Kind.INT
    assert settings["repair-interval"].kind is Kind.FLOAT
    assert settings["limit-loopback"].kind is Kind.BOOL
    assert settings["data"].kind is Kind.PATH
    assert settings["log-level"].choices == ("debug", "info", "warning", "error")
    assert settings["log-level"].default == "warning"
    assert conffile.env_name("DIFS_PEER", settings["repair-interval"]) == (
        "DIFS_PEER_REPAIR_INTERVAL"
    )
    assert [s.key for s in client_settings()] == ["peer", "token-file"]


def _sample(
    tcp_port: Annotated[int | None, typer.Option(help="TCP port if not --port")] = None,
    drain: Annotated[bool, typer.Option("--drain/--no-drain", help="hand over first")] = False,
    listen: Annotated[list[str] | None, typer.Option("--listen", "-l", help="addresses")] = None,
    ratio: Annotated[float, typer.Option(help="a ratio")] = 0.5,
    when: Annotated[complex, typer.Option(help="a type the file writes as a string")] = 1j,
    positional: str = "",
) -> None:
    """A command with the kinds of options others may add to join."""


def test_settings_of_derives_any_command_s_options() -> None:
    """settings_of reads names, flags, kinds, help and defaults from a command's
    signature: optional types, flag pairs, short aliases; other types are strings."""
    got = [(s.key, s.name, s.kind, s.help, s.default) for s in settings_of(_sample)]
    assert got == [
        ("tcp-port", "tcp_port", Kind.INT, "TCP port if not --port", None),
        ("drain", "drain", Kind.BOOL, "hand over first", False),
        ("listen", "listen", Kind.LIST, "addresses", None),
        ("ratio", "ratio", Kind.FLOAT, "a ratio", 0.5),
        ("when", "when", Kind.STR, "a type the file writes as a string", 1j),
    ]
