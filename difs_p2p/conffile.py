"""The configuration file ``difs.toml``: its rules, checked without I/O.

A file has tables (``[peer]`` for ``difs-peer join``, ``[client]`` for the ``difs``
commands); each key of a table is the long option of its command without the dashes
(``repair-interval = 30`` is ``--repair-interval 30``). The settings a table accepts are
not listed here: the CLI derives them from its commands (``Setting``), so an option added
to a command is at once a key of the file, an environment variable (``env_name``) and a
line of the commented example (``example``).

Every mistake is a ``UsageError`` of one line naming the file, the line when it is known,
the table and the key: a file that is not TOML, an unknown table or key (with the closest
known one), a value of the wrong type, a value a rule refuses. Nothing here reads files:
the caller passes the text and where it came from.
"""

from __future__ import annotations

import difflib
import enum
import json
import re
import textwrap
import tomllib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError

# The largest configuration file read: a few KiB is plenty, anything near this is not one.
MAX_FILE_BYTES = 1 << 20
# The width the example's comments are wrapped to.
_WIDTH = 92


class Kind(enum.Enum):
    """The TOML type a setting takes."""

    INT = "an integer"
    FLOAT = "a number"
    BOOL = "true or false"
    STR = "a string"
    PATH = "a path (a string)"
    CHOICE = "one of the strings"
    LIST = "a list of strings"


@valueclass
class Setting:
    """One option of a command, as the file and the environment know it."""

    key: str  # the key in the file: the long option without "--" ("repair-interval")
    name: str  # the command's parameter name ("repair_interval")
    kind: Kind
    help: str
    default: Any  # None: none (the help says what applies then)
    choices: tuple[str, ...] = ()  # for Kind.CHOICE
    # a rule beyond the type (a size, an address): raises UsageError for a bad value
    check: Callable[[str], object] | None = None

    @property
    def flag(self) -> str:
        return f"--{self.key}"


def env_name(prefix: str, setting: Setting) -> str:
    """The environment variable of ``setting``: ``PREFIX_NAME`` (``DIFS_PEER_PORT``)."""
    return f"{prefix}_{setting.name.upper()}"


def _where(source: str, line: int | None) -> str:
    return f"{source}, line {line}" if line is not None else source


def line_of(text: str, table: str | None, key: str) -> int | None:
    """The line (from 1) of ``key`` in ``[table]`` of ``text`` (a table header when ``key``
    is empty; a top-level key when ``table`` is None); None if not found."""
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([^\]]+?)\s*\]")
    assignment = re.compile(r"""^\s*["']?([A-Za-z0-9_-]+)["']?\s*=""")
    for number, line in enumerate(text.splitlines(), 1):
        found = header.match(line)
        if found:
            current = found.group(1).strip("\"'")
            if not key and current == table:
                return number
            continue
        found = assignment.match(line)
        if key and found and found.group(1) == key and current == table:
            return number
    return None


def parse(text: str, source: str) -> dict[str, Any]:
    """The TOML document ``text`` (read from ``source``); UsageError if it is not TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        at = re.search(r"\(at line (\d+), column (\d+)\)$", message)
        if at is None:
            raise UsageError(f"{source}: not valid TOML: {message}") from None
        reason = message[: at.start()].rstrip()
        raise UsageError(
            f"{_where(source, int(at.group(1)))}: not valid TOML: {reason} (column {at.group(2)})"
        ) from None


def _suggest(word: str, known: Sequence[str], form: str = "{!r}") -> str:
    """`` (did you mean X?)`` for the known word closest to ``word``, if one is close."""
    close = difflib.get_close_matches(word, list(known), n=1, cutoff=0.6)
    return f" (did you mean {form.format(close[0])}?)" if close else ""


def check_tables(
    doc: Mapping[str, Any], tables: Mapping[str, Sequence[Setting]], source: str, text: str
) -> None:
    """UsageError unless every top-level entry of ``doc`` is one of ``tables``."""
    names = sorted(tables)
    listed = ", ".join(f"[{n}]" for n in names)
    for name, value in doc.items():
        if isinstance(value, dict):
            if name not in tables:
                where = _where(source, line_of(text, name, ""))
                hint = _suggest(name, names, "[{}]")
                raise UsageError(f"{where}: unknown table [{name}]{hint}; the tables are {listed}")
            continue
        owners = [t for t in names if any(s.key == name for s in tables[t])]
        hint = f": put it under [{owners[0]}]" if owners else f"; settings belong in {listed}"
        where = _where(source, line_of(text, None, name))
        raise UsageError(f"{where}: key {name!r} is outside a table{hint}")


def _typed(setting: Setting, value: Any) -> str | None:
    """Why ``value`` does not have the TOML type of ``setting`` (None if it does)."""
    kind = setting.kind
    ok = {
        Kind.INT: isinstance(value, int) and not isinstance(value, bool),
        Kind.FLOAT: isinstance(value, int | float) and not isinstance(value, bool),
        Kind.BOOL: isinstance(value, bool),
        Kind.LIST: isinstance(value, list) and all(isinstance(v, str) for v in value),
    }.get(kind, isinstance(value, str))
    if not ok:
        shown = json.dumps(value, default=str)
        if len(shown) > 40:
            shown = shown[:37] + "..."
        return f"expected {kind.value}, got {shown}"
    if kind is Kind.CHOICE and value not in setting.choices:
        return f"{value!r} is not one of {', '.join(map(repr, setting.choices))}"
    return None


def table_values(
    doc: Mapping[str, Any],
    table: str,
    settings: Sequence[Setting],
    *,
    source: str,
    text: str,
    base: Path | None = None,
) -> dict[str, Any]:
    """The values ``[table]`` of ``doc`` sets, by parameter name, each checked against its
    setting; relative paths are taken from ``base`` (the file's directory)."""
    by_key = {s.key: s for s in settings}
    values: dict[str, Any] = {}
    entries = doc.get(table, {})
    for key, value in entries.items():
        line = line_of(text, table, key)
        setting = by_key.get(key)
        if setting is None:
            known = sorted(by_key)
            raise UsageError(
                f"{_where(source, line)}: [{table}] has no key {key!r}{_suggest(key, known)}"
            )
        if setting.kind is Kind.LIST and isinstance(value, str):
            value = [value]  # one item may be written without the brackets
        problem = _typed(setting, value)
        if problem is None and setting.check is not None:
            try:
                for item in value if isinstance(value, list) else [value]:
                    setting.check(item)
            except UsageError as exc:
                problem = str(exc)
        if problem is not None:
            raise UsageError(f"{_where(source, line)}: [{table}] {key}: {problem}")
        if setting.kind is Kind.PATH and base is not None:
            value = str(base / value)
        values[setting.name] = value
    return values


_BOOL_WORDS = {"true", "false", "1", "0", "yes", "no", "on", "off"}


def check_env(environ: Mapping[str, str], prefix: str, settings: Sequence[Setting]) -> None:
    """UsageError naming the variable if a variable ``PREFIX_...`` names no setting (a
    typo would be ignored otherwise) or holds a value its setting refuses (the command
    then reads the variables itself)."""
    known = [env_name(prefix, s) for s in settings]
    for name in sorted(environ):
        if name.startswith(f"{prefix}_") and name not in known:
            raise UsageError(f"environment {name}: no such setting{_suggest(name, known)}")
    for setting in settings:
        name = env_name(prefix, setting)
        text = environ.get(name)
        if not text:
            continue
        items = text.split() if setting.kind is Kind.LIST else [text]
        problem = None
        try:
            for item in items:
                if setting.kind is Kind.INT:
                    int(item)
                elif setting.kind is Kind.FLOAT:
                    float(item)
                elif setting.kind is Kind.BOOL and item.lower() not in _BOOL_WORDS:
                    problem = f"expected true or false, got {item!r}"
                elif setting.kind is Kind.CHOICE and item not in setting.choices:
                    problem = f"{item!r} is not one of {', '.join(map(repr, setting.choices))}"
                elif setting.check is not None:
                    setting.check(item)
        except ValueError:
            problem = f"expected {setting.kind.value}, got {text!r}"
        except UsageError as exc:
            problem = str(exc)
        if problem is not None:
            raise UsageError(f"environment {name}: {problem}")


def toml_value(value: Any) -> str:
    """``value`` written as TOML (enums by their value, paths as strings)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        value = value.value
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return json.dumps(str(value))  # a TOML basic string


def _placeholder(setting: Setting) -> str:
    """An example value for a setting without a default (its help says what it takes)."""
    return {
        Kind.LIST: '["..."]',
        Kind.INT: "0",
        Kind.FLOAT: "0.0",
        Kind.BOOL: "false",
    }.get(setting.kind, '"..."')


def example(header: str, tables: Sequence[tuple[str, str, str, Sequence[Setting]]]) -> str:
    """A complete commented file: ``header``, then per (table, about, env prefix,
    settings) each setting once with its help, flag, environment variable and default,
    commented out (so that the file as written changes nothing)."""
    out = [f"# {line}".rstrip() for line in header.splitlines()]
    for table, about, prefix, settings in tables:
        out += ["", *textwrap.wrap(about, _WIDTH, initial_indent="# ", subsequent_indent="# ")]
        out.append(f"[{table}]")
        for setting in settings:
            out.append("")
            out += textwrap.wrap(setting.help, _WIDTH, initial_indent="# ", subsequent_indent="# ")
            extra = f"; one of {', '.join(setting.choices)}" if setting.choices else ""
            out.append(f"# flag {setting.flag}, environment {env_name(prefix, setting)}{extra}")
            if setting.default is None:
                out.append(f"# {setting.key} = {_placeholder(setting)}  # no default")
            else:
                out.append(f"# {setting.key} = {toml_value(setting.default)}")
    return "\n".join(out) + "\n"
