"""Scenarios: a TOML file read once into frozen, validated dataclasses.

A scenario describes a population of peers, its network, churn and workload, and what to
check at the end. Times are seconds of simulated time; ``start``/``heal`` of partitions,
``at`` of crashes (``[[crash]]``: some holders of one published name crash at once) and the
workload windows count from the end of the warm-up (when churn and workload begin).
Two settings may be lists, and then every combination runs as its own *run* with the same
seed: ``peers`` (``[100, 1000, 10000]``) and ``repair.enabled`` (``[false, true]``).
Unknown keys are refused, so that a typo does not silently fall back to a default.

An annotated example is ``sim/scenarios/smoke.toml``.
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from difs_p2p.config import DhtConfig, parse_size
from difs_p2p.errors import UsageError
from sim.models import LinkConfig, SessionConfig, SizeConfig

SCENARIO_DIR = Path(__file__).resolve().parent / "scenarios"
MODES = ("memory", "sockets", "peers")


class ScenarioError(UsageError):
    """A scenario file is missing, malformed, or has a value out of range."""


@dataclass(frozen=True, slots=True)
class Partition:
    """A split of the network into groups from ``start`` until ``heal``."""

    start: float
    heal: float
    # Share of the peers in each group (normalized); at least two groups.
    groups: tuple[float, ...] = (0.5, 0.5)


@dataclass(frozen=True, slots=True)
class Crash:
    """At ``at``, ``holders`` of the peers holding the ``name``-th published name crash."""

    at: float
    # Index of the name in publish order (0: the first name published).
    name: int = 0
    holders: int = 1


@dataclass(frozen=True, slots=True)
class Churn:
    enabled: bool = False
    sessions: SessionConfig = field(default_factory=SessionConfig)
    # Share of departures that are crashes (no goodbye); the rest stop gracefully.
    crash_fraction: float = 0.5
    # A replacement joins after an exponential delay with this mean (seconds).
    rejoin_delay: float = 30.0


@dataclass(frozen=True, slots=True)
class Workload:
    # Publisher keys (users); each publish is signed by one, through a random live peer.
    users: int = 10
    publishes: int = 0
    fetches: int = 0
    lookups: int = 0
    # Share of publishes that update a name the same user published before (version n+1).
    update_fraction: float = 0.0
    replicas: int = 3
    segment_size: int = 1 << 20
    sizes: SizeConfig = field(default_factory=SizeConfig)
    # Each kind of operation happens at uniform random times within this share of the
    # duration: (from, to), with 0 = end of warm-up and 1 = end of the run.
    publish_window: tuple[float, float] = (0.0, 0.5)
    fetch_window: tuple[float, float] = (0.1, 1.0)
    lookup_window: tuple[float, float] = (0.0, 1.0)


@dataclass(frozen=True, slots=True)
class Repair:
    """The simulator's repair policy (see ``sim.modelled``), per run."""

    enabled: bool = False
    # Seconds between two passes over every range.
    interval: float = 60.0
    # A departed holder counts as a suspect (not yet replaced) this long: the peer's own
    # detector declares a holder dead after dead_after (3) rounds of 60 s.
    detection_delay: float = 180.0


@dataclass(frozen=True, slots=True)
class Checks:
    # At the end, resolve every published name from a random live peer (record survival).
    survival: bool = True
    # Resolve names from many peers at the end: "none", "all" names, or the names
    # published while the network was split ("partition").
    convergence: str = "none"
    # How many live peers resolve each name for the convergence check (0: every peer).
    convergence_peers: int = 0
    # Seconds between the end of the workload and the checks.
    settle: float = 0.0


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    description: str = ""
    mode: str = "memory"
    seed: int = 1
    peers: tuple[int, ...] = (100,)
    # The initial peers join at uniform random times within this period.
    join_period: float = 60.0
    # Time between the end of the join period and the start of churn and workload.
    warmup: float = 60.0
    duration: float = 600.0
    # Replica counts and population are sampled this often.
    sample_interval: float = 60.0
    # At most this many workload operations run at once (others wait).
    max_concurrent: int = 64
    # Peers prove their node IDs (the identify challenge) before entering routing tables,
    # as in production. Off, contacts enter unproven: about half the run time and a third
    # fewer datagrams, with the same lookups (peers mode always runs it).
    identify: bool = True
    dht: DhtConfig = field(default_factory=lambda: DhtConfig(rpc_timeout=2.0, id_difficulty=0))
    link: LinkConfig = field(default_factory=LinkConfig)
    partitions: tuple[Partition, ...] = ()
    crashes: tuple[Crash, ...] = ()
    churn: Churn = field(default_factory=Churn)
    workload: Workload = field(default_factory=Workload)
    repair_arms: tuple[bool, ...] = (False,)
    repair: Repair = field(default_factory=Repair)
    checks: Checks = field(default_factory=Checks)
    # Failure domains: peer i is in zone "z{i % zones}" (as `difs-peer join --zone`), which
    # placement spreads copies over; 0 labels no zones.
    zones: int = 0

    def runs(self) -> Iterator[RunSpec]:
        """Every combination of the list-valued settings, in file order."""
        for n, repair in itertools.product(self.peers, self.repair_arms):
            parts = []
            if len(self.peers) > 1:
                parts.append(f"N={n}")
            if len(self.repair_arms) > 1:
                parts.append("repair=on" if repair else "repair=off")
            yield RunSpec(
                label=" ".join(parts) or f"N={n}",
                peers=n,
                repair=replace(self.repair, enabled=repair),
            )

    @property
    def end(self) -> float:
        """When the workload stops, in seconds from the start of the run."""
        return self.join_period + self.warmup + self.duration


@dataclass(frozen=True, slots=True)
class RunSpec:
    label: str
    peers: int
    repair: Repair


# -- reading TOML ----------------------------------------------------------------------------


class _Table:
    """A TOML table being read: typed getters, and a check that no key was left unread."""

    def __init__(self, data: Mapping[str, Any], where: str) -> None:
        if not isinstance(data, Mapping):
            raise ScenarioError(f"{where or 'scenario'} must be a table")
        self.data = data
        self.where = where
        self.seen: set[str] = set()

    def _get(self, key: str) -> Any:
        self.seen.add(key)
        return self.data.get(key)

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def has(self, key: str) -> bool:
        return key in self.data

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ScenarioError(f"{self._name(key)} must be a number, not {value!r}")
        if value < minimum:
            raise ScenarioError(f"{self._name(key)} must be at least {minimum}, not {value}")
        return float(value)

    def integer(self, key: str, default: int, *, minimum: int = 0) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise ScenarioError(f"{self._name(key)} must be an integer, not {value!r}")
        if value < minimum:
            raise ScenarioError(f"{self._name(key)} must be at least {minimum}, not {value}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise ScenarioError(f"{self._name(key)} must be true or false, not {value!r}")
        return value

    def string(self, key: str, default: str, choices: tuple[str, ...] = ()) -> str:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, str) or (choices and value not in choices):
            allowed = f"one of {', '.join(choices)}" if choices else "a string"
            raise ScenarioError(f"{self._name(key)} must be {allowed}, not {value!r}")
        return value

    def size(self, key: str, default: int) -> int:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str):
            try:
                return parse_size(value)
            except UsageError as exc:
                raise ScenarioError(f"{self._name(key)}: {exc}") from None
        raise ScenarioError(f"{self._name(key)} must be a size such as 4MiB, not {value!r}")

    def window(self, key: str, default: tuple[float, float]) -> tuple[float, float]:
        value = self._get(key)
        if value is None:
            return default
        if (
            not isinstance(value, list)
            or len(value) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
            or not 0.0 <= value[0] <= value[1] <= 1.0
        ):
            raise ScenarioError(f"{self._name(key)} must be [from, to] with 0 <= from <= to <= 1")
        return float(value[0]), float(value[1])

    def table(self, key: str) -> _Table:
        value = self._get(key)
        return _Table(value if value is not None else {}, self._name(key))

    def tables(self, key: str) -> list[_Table]:
        value = self._get(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise ScenarioError(f"{self._name(key)} must be an array of tables ([[{key}]])")
        return [_Table(v, f"{self._name(key)}[{i}]") for i, v in enumerate(value)]

    def raw(self, key: str) -> Any:
        return self._get(key)

    def done(self) -> None:
        unknown = sorted(set(self.data) - self.seen)
        if unknown:
            raise ScenarioError(f"unknown key {self._name(unknown[0])!r} in the scenario")


def _dht_config(t: _Table) -> DhtConfig:
    defaults = DhtConfig(rpc_timeout=2.0)
    try:
        config = DhtConfig(
            # simulated peers use seeded keys without node-ID work
            id_difficulty=0,
            ksize=t.integer("ksize", defaults.ksize, minimum=1),
            alpha=t.integer("alpha", defaults.alpha, minimum=1),
            rpc_timeout=t.number("rpc_timeout", defaults.rpc_timeout),
            evict_after_failures=t.integer(
                "evict_after_failures", defaults.evict_after_failures, minimum=1
            ),
            refresh_interval=t.number("refresh_interval", defaults.refresh_interval, minimum=1),
            liveness_interval=t.number("liveness_interval", defaults.liveness_interval, minimum=1),
            record_ttl=t.number("record_ttl", defaults.record_ttl, minimum=1),
        )
    except UsageError as exc:
        raise ScenarioError(f"dht: {exc}") from None
    t.done()
    return config


def _link(t: _Table) -> LinkConfig:
    d = LinkConfig()
    try:
        link = LinkConfig(
            latency_mean=t.number("latency_ms", d.latency_mean * 1e3) / 1e3,
            latency_sd=t.number("latency_sd_ms", d.latency_sd * 1e3) / 1e3,
            latency_min=t.number("latency_min_ms", d.latency_min * 1e3) / 1e3,
            loss=t.number("loss", d.loss),
            bandwidth=t.number("bandwidth_mbit", d.bandwidth * 8 / 1e6) * 1e6 / 8,
        )
    except ValueError as exc:
        raise ScenarioError(f"network: {exc}") from None
    t.done()
    return link


def _partition(t: _Table) -> Partition:
    start = t.number("start", 0.0)
    heal = t.number("heal", 0.0)
    groups_raw = t.raw("groups")
    groups: tuple[float, ...] = (0.5, 0.5)
    if groups_raw is not None:
        if (
            not isinstance(groups_raw, list)
            or len(groups_raw) < 2
            or not all(isinstance(g, int | float) and g > 0 for g in groups_raw)
        ):
            raise ScenarioError(f"{t.where}.groups must list two or more positive shares")
        groups = tuple(float(g) for g in groups_raw)
    if heal <= start:
        raise ScenarioError(f"{t.where}: heal must come after start")
    t.done()
    return Partition(start=start, heal=heal, groups=groups)


def _crash(t: _Table) -> Crash:
    crash = Crash(
        at=t.number("at", 0.0),
        name=t.integer("name", 0),
        holders=t.integer("holders", 1, minimum=1),
    )
    t.done()
    return crash


def _churn(t: _Table) -> Churn:
    d = Churn()
    try:
        sessions = SessionConfig(
            distribution=t.string(
                "distribution", d.sessions.distribution, ("weibull", "lognormal", "exponential")
            ),
            median=t.number("median_session_hours", d.sessions.median / 3600) * 3600,
            shape=t.number("shape", d.sessions.shape),
        )
    except ValueError as exc:
        raise ScenarioError(f"churn: {exc}") from None
    churn = Churn(
        enabled=t.boolean("enabled", d.enabled),
        sessions=sessions,
        crash_fraction=t.number("crash_fraction", d.crash_fraction),
        rejoin_delay=t.number("rejoin_delay", d.rejoin_delay),
    )
    if churn.crash_fraction > 1:
        raise ScenarioError("churn.crash_fraction must be between 0 and 1")
    t.done()
    return churn


def _workload(t: _Table) -> Workload:
    d = Workload()
    sd = d.sizes
    try:
        sizes = SizeConfig(
            median=t.size("size_median", sd.median),
            sigma=t.number("size_sigma", sd.sigma),
            minimum=t.size("size_min", sd.minimum),
            maximum=t.size("size_max", sd.maximum),
        )
    except ValueError as exc:
        raise ScenarioError(f"workload: {exc}") from None
    w = Workload(
        users=t.integer("users", d.users, minimum=1),
        publishes=t.integer("publishes", d.publishes),
        fetches=t.integer("fetches", d.fetches),
        lookups=t.integer("lookups", d.lookups),
        update_fraction=t.number("update_fraction", d.update_fraction),
        replicas=t.integer("replicas", d.replicas, minimum=1),
        segment_size=t.size("segment_size", d.segment_size),
        sizes=sizes,
        publish_window=t.window("publish_window", d.publish_window),
        fetch_window=t.window("fetch_window", d.fetch_window),
        lookup_window=t.window("lookup_window", d.lookup_window),
    )
    if w.update_fraction > 1:
        raise ScenarioError("workload.update_fraction must be between 0 and 1")
    if w.segment_size % 4096 or w.segment_size > 16 << 20:
        raise ScenarioError("workload.segment_size must be a multiple of 4 KiB up to 16 MiB")
    t.done()
    return w


def _repair(t: _Table) -> tuple[tuple[bool, ...], Repair]:
    enabled = t.raw("enabled")
    if enabled is None:
        arms: tuple[bool, ...] = (False,)
    elif isinstance(enabled, bool):
        arms = (enabled,)
    elif isinstance(enabled, list) and enabled and all(isinstance(e, bool) for e in enabled):
        arms = tuple(enabled)
    else:
        raise ScenarioError("repair.enabled must be true, false or a list of them")
    d = Repair()
    repair = Repair(
        interval=t.number("interval", d.interval, minimum=1),
        detection_delay=t.number("detection_delay", d.detection_delay),
    )
    t.done()
    return arms, repair


def _checks(t: _Table) -> Checks:
    d = Checks()
    checks = Checks(
        survival=t.boolean("survival", d.survival),
        convergence=t.string("convergence", d.convergence, ("none", "all", "partition")),
        convergence_peers=t.integer("convergence_peers", d.convergence_peers),
        settle=t.number("settle", d.settle),
    )
    t.done()
    return checks


def _peers(t: _Table) -> tuple[int, ...]:
    value = t.raw("peers")
    if value is None:
        return (100,)
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(n, int) and not isinstance(n, bool) for n in items):
        raise ScenarioError("peers must be an integer or a list of integers")
    if min(items) < 2:
        raise ScenarioError("peers must be at least 2")
    return tuple(items)


def parse_scenario(data: Mapping[str, Any], name: str = "scenario") -> Scenario:
    """Build a :class:`Scenario` from parsed TOML (ScenarioError on any problem)."""
    t = _Table(data, "")
    arms, repair = _repair(t.table("repair"))
    partitions = tuple(_partition(p) for p in t.tables("partition"))
    crashes = tuple(_crash(c) for c in t.tables("crash"))
    scenario = Scenario(
        name=t.string("name", name),
        description=t.string("description", ""),
        mode=t.string("mode", "memory", MODES),
        seed=t.integer("seed", 1),
        peers=_peers(t),
        join_period=t.number("join_period", 60.0),
        warmup=t.number("warmup", 60.0),
        duration=t.number("duration", 600.0, minimum=1.0),
        sample_interval=t.number("sample_interval", 60.0, minimum=1.0),
        max_concurrent=t.integer("max_concurrent", 64, minimum=1),
        identify=t.boolean("identify", True),
        dht=_dht_config(t.table("dht")),
        link=_link(t.table("network")),
        partitions=partitions,
        crashes=crashes,
        churn=_churn(t.table("churn")),
        workload=_workload(t.table("workload")),
        repair_arms=arms,
        repair=repair,
        checks=_checks(t.table("checks")),
        zones=t.integer("zones", 0),
    )
    t.done()
    for p in scenario.partitions:
        if p.heal > scenario.duration:
            raise ScenarioError("a partition must heal within the duration")
    for before, after in itertools.pairwise(scenario.partitions):
        if after.start < before.heal:
            raise ScenarioError("partitions must follow each other: one heals before the next")
    return scenario


def find_scenario(spec: str) -> Path:
    """A scenario file: a path, or the name of one shipped in ``sim/scenarios/``."""
    path = Path(spec)
    if path.is_file():
        return path
    shipped = SCENARIO_DIR / f"{spec}.toml"
    if shipped.is_file():
        return shipped
    names = ", ".join(sorted(p.stem for p in SCENARIO_DIR.glob("*.toml")))
    raise ScenarioError(f"no scenario file {spec!r} (shipped scenarios: {names})")


def load_scenario(spec: str | Path) -> Scenario:
    """Read and validate a scenario file (a path or a shipped scenario's name)."""
    path = find_scenario(str(spec))
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path} is not valid TOML: {exc}") from None
    return parse_scenario(data, path.stem)
