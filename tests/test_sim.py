"""The network simulator: virtual time, models, scenarios, and whole runs of real peers."""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sim.__main__ import app
from sim.memnet import MemoryNetwork
from sim.models import LinkConfig, NetworkModel, SessionConfig, gini, percentile
from sim.relay import RelayNetwork
from sim.runner import run_scenario
from sim.scenario import Scenario, ScenarioError, load_scenario, parse_scenario
from sim.vloop import Deadlock, VirtualEventLoop, run_virtual

# A small scenario with every feature on: churn with crashes, loss, updates, all checks.
TINY: dict[str, Any] = {
    "name": "tiny",
    "peers": 25,
    "join_period": 10.0,
    "warmup": 10.0,
    "duration": 70.0,
    "sample_interval": 30.0,
    "network": {"loss": 0.01},
    "churn": {"enabled": True, "median_session_hours": 0.05, "crash_fraction": 0.5},
    "workload": {
        "users": 3,
        "publishes": 6,
        "fetches": 8,
        "lookups": 10,
        "update_fraction": 0.3,
        "size_median": "2MiB",
        "size_max": "8MiB",
    },
    "repair": {"enabled": True, "interval": 30.0, "detection_delay": 30.0},
    "checks": {"convergence": "all", "convergence_peers": 5},
}


# The shipped partition scenario, smaller: 40 peers split in two for 2 minutes.
SPLIT: dict[str, Any] = {
    "name": "split",
    "peers": 40,
    "join_period": 10.0,
    "warmup": 10.0,
    "duration": 300.0,
    "partition": [{"start": 20.0, "heal": 140.0, "groups": [0.5, 0.5]}],
    "churn": {"enabled": False},
    "workload": {
        "users": 2,
        "publishes": 6,
        "lookups": 10,
        "size_median": "1MiB",
        "size_max": "4MiB",
        "publish_window": [0.1, 0.4],
    },
    "checks": {"convergence": "partition"},
}


def _tiny(**changes: Any) -> Scenario:
    return replace(parse_scenario(TINY), **changes)


# -- virtual time ------------------------------------------------------------------------------


def test_virtual_loop_skips_idle_time() -> None:
    """An hour of sleeping on the virtual loop takes no real time, and timers keep order."""
    fired: list[tuple[str, float]] = []

    async def main() -> float:
        loop = asyncio.get_running_loop()

        async def later(tag: str, delay: float) -> None:
            await asyncio.sleep(delay)
            fired.append((tag, loop.time()))

        await asyncio.gather(later("b", 3600.0), later("a", 1.5), later("c", 7200.0))
        return loop.time()

    started = time.monotonic()
    end = run_virtual(main())
    assert time.monotonic() - started < 1.0
    assert end == 7200.0
    assert [tag for tag, _ in fired] == ["a", "b", "c"]
    assert fired[0][1] == 1.5


def test_virtual_loop_reports_deadlock() -> None:
    """Waiting on something that can never happen raises Deadlock instead of hanging."""

    async def main() -> None:
        await asyncio.get_running_loop().create_future()

    with pytest.raises(Deadlock):
        run_virtual(main())


def test_virtual_timeouts_use_virtual_time() -> None:
    """asyncio.wait_for times out at the virtual deadline."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.sleep(1000.0), 2.0)
        return loop.time()

    assert run_virtual(main()) == pytest.approx(2.0)


# -- models ------------------------------------------------------------------------------------


def test_percentile_and_gini() -> None:
    """Percentiles interpolate; Gini is 0 for equal shares and near 1 when one holds all."""
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([], 95) == 0.0
    assert gini([5.0, 5.0, 5.0]) == 0.0
    assert gini([0.0] * 99 + [1.0]) == pytest.approx(0.99)


@pytest.mark.parametrize("distribution", ["weibull", "lognormal", "exponential"])
def test_session_lengths_have_the_configured_median(distribution: str) -> None:
    """Half of the sessions end within the median (2 h by default)."""
    sessions = SessionConfig(distribution=distribution)
    rng = random.Random(5)
    draws = [sessions.sample(rng) for _ in range(20_000)]
    assert sum(d < 7200.0 for d in draws) / len(draws) == pytest.approx(0.5, abs=0.02)


def test_latency_stays_above_the_minimum() -> None:
    """One-way delays are normal around the mean and never below the minimum."""
    model = NetworkModel(LinkConfig(latency_mean=0.002, latency_sd=0.002), random.Random(1))
    delays = [model.one_way() for _ in range(5000)]
    assert min(delays) >= 0.001
    assert 0.002 < sum(delays) / len(delays) < 0.004


def test_memory_network_delivers_late_and_respects_partitions() -> None:
    """A datagram arrives after its one-way delay, and never across a partition."""

    class Sink(asyncio.DatagramProtocol):
        def __init__(self) -> None:
            self.got: list[tuple[bytes, tuple[str, int], float]] = []

        def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
            self.got.append((data, addr, asyncio.get_running_loop().time()))

    async def main() -> tuple[Sink, NetworkModel]:
        model = NetworkModel(LinkConfig(), random.Random(2))
        net = MemoryNetwork(model)
        sink = Sink()
        a, a_addr = await net.open_datagram(
            "10.0.0.1", 4000, asyncio.DatagramProtocol(), recv_buffer=0
        )
        _, b_addr = await net.open_datagram("10.0.0.2", 4000, sink, recv_buffer=0)
        a.sendto(b"one", b_addr)
        await asyncio.sleep(1.0)
        model.split({a_addr: 0, b_addr: 1})
        a.sendto(b"two", b_addr)
        await asyncio.sleep(1.0)
        model.heal()
        a.close()
        a.sendto(b"three", b_addr)
        await asyncio.sleep(1.0)
        return sink, model

    sink, model = run_virtual(main())
    assert [(d, a) for d, a, _ in sink.got] == [(b"one", ("10.0.0.1", 4000))]
    assert 0.001 <= sink.got[0][2] < 1.0
    assert model.stats.partitioned == 1


# -- scenarios ---------------------------------------------------------------------------------


def test_shipped_scenarios_load() -> None:
    """Every shipped scenario parses; scale and churn expand into their runs."""
    for name in ("smoke", "scale", "churn", "partition", "sim_smoke_sockets"):
        assert load_scenario(name).name == name
    assert [r.peers for r in load_scenario("scale").runs()] == [100, 1000, 10000]
    assert [r.label for r in load_scenario("churn").runs()] == ["repair=off", "repair=on"]


def test_scenario_errors_name_the_key() -> None:
    """Unknown keys and bad values are refused with the key in the message."""
    with pytest.raises(ScenarioError, match=r"workload\.publishez"):
        parse_scenario({"workload": {"publishez": 3}})
    with pytest.raises(ScenarioError, match="mode"):
        parse_scenario({"mode": "carrier-pigeon"})
    with pytest.raises(ScenarioError, match="heal"):
        parse_scenario({"partition": [{"start": 10.0, "heal": 5.0}]})
    with pytest.raises(ScenarioError, match="follow"):
        parse_scenario({"partition": [{"start": 1.0, "heal": 50.0}, {"start": 9.0, "heal": 90.0}]})
    with pytest.raises(ScenarioError, match="no scenario"):
        load_scenario("no-such-scenario")


# -- whole runs --------------------------------------------------------------------------------


@pytest.mark.timeout(300)  # about 45 s alone on 2 cores; room for a loaded machine
def test_smoke_scenario_runs_and_is_sane(tmp_path: Path) -> None:
    """The CI smoke scenario (200 peers, churn) succeeds, prints its seed, writes its files."""
    result = CliRunner().invoke(app, ["smoke", "--seed", "3", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("seed 3\n")
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    (run,) = metrics["runs"]
    assert metrics["seed"] == 3
    assert run["publish"]["attempted"] >= 20 and run["fetch"]["attempted"] >= 20
    assert run["publish"]["success_rate"] > 0.9
    assert run["fetch"]["success_rate"] > 0.9
    assert run["lookups"]["hops"]["p50"] > 0
    assert run["lookups"]["latency_s"]["p50"] > 0
    assert run["population"]["crashes"] + run["population"]["graceful_leaves"] > 0
    assert run["durability"]["record_survival"] > 0.9
    assert run["storage"]["max"] > 0
    assert run["bytes"]["repair"] == 0
    assert (tmp_path / "summary.txt").read_text().startswith("scenario smoke")
    assert sorted(p.name for p in tmp_path.glob("*.png"))


def test_crash_event_crashes_holders_of_one_name() -> None:
    """``[[crash]]``: two of the three holders of the first name crash at once, nobody else."""
    scenario = parse_scenario(
        {
            "name": "crash",
            "peers": 20,
            "join_period": 5.0,
            "warmup": 5.0,
            "duration": 100.0,
            "sample_interval": 10.0,
            "workload": {
                "publishes": 1,
                "size_median": "1MiB",
                "size_max": "1MiB",
                "publish_window": [0.0, 0.1],
            },
            "crash": [{"at": 50.0, "name": 0, "holders": 2}, {"at": 60.0, "name": 5}],
        }
    )
    (run,) = run_scenario(scenario, 4).runs
    assert run["population"]["crashes"] == 2
    assert run["population"]["live_at_end"] == 18
    assert [e["what"] for e in run["events"]] == [
        "2 holders of /sim/u4/obj-1 crashed",
        "no name 5 to crash holders of",
    ]
    before = [s for s in run["samples"] if s["t"] < 60.0 and s["names"]]
    after = [s for s in run["samples"] if s["t"] > 60.0]
    assert before and before[0]["min_live_replicas"] == 3
    assert after and all(s["min_live_replicas"] == 1 for s in after)


def test_same_seed_gives_identical_metrics() -> None:
    """Two runs with one seed give byte-identical metrics JSON; another seed differs."""
    first = run_scenario(_tiny(), 11).metrics_json()
    second = run_scenario(_tiny(), 11).metrics_json()
    assert first == second
    other = run_scenario(_tiny(), 12).metrics_json()
    assert other != first
    (run,) = json.loads(first)["runs"]
    assert run["population"]["joins"] > 25
    assert run["convergence"]["checked"] > 0


def test_partition_heals_and_converges() -> None:
    """After a split heals, every name published on either side resolves from every peer."""
    (run,) = run_scenario(parse_scenario(SPLIT), 2).runs
    assert [e["what"] for e in run["events"]] == ["split into 2 groups", "healed"]
    assert run["network"]["partitioned"] > 0
    assert run["publish"]["succeeded"] >= 5
    assert run["convergence"]["checked"] >= run["publish"]["succeeded"] * 35
    assert run["convergence"]["rate"] == 1.0


def test_sockets_mode_runs_on_real_udp() -> None:
    """30 real peers on 127.0.0.1 behind the relay find each other, publish and fetch."""
    (run,) = run_scenario(load_scenario("sim_smoke_sockets")).runs
    assert run["population"]["live_at_end"] == 30
    assert run["lookups"]["hops"]["count"] >= 25
    assert run["lookups"]["hops"]["p50"] > 0
    assert run["lookups"]["latency_s"]["p50"] >= 0.02  # at least one relayed round trip
    assert run["publish"]["success_rate"] > 0.8
    assert run["fetch"]["success_rate"] > 0.8
    assert run["network"]["datagrams"] > 1000


@pytest.mark.timeout(300)  # about 45 s alone on 2 cores
def test_peers_mode_runs_full_peers_and_they_repair_crashed_holders() -> None:
    """Whole peers behind the relay: real publishes and fetches, bytes checked, copies restored.

    Two of the three holders of the first name crash, then one of the second's; the peers'
    own maintenance (holds probes over TCP through the relay) must bring every range back
    to three live copies, and every fetch must return the published bytes.
    """
    (run,) = run_scenario(load_scenario("peers_smoke")).runs
    assert run["publish"]["attempted"] == run["publish"]["succeeded"] == 8
    assert run["fetch"]["failures"] == {}
    assert run["fetch"]["succeeded"] == 16
    assert run["population"]["crashes"] == 3
    assert [e["what"].split(" holders")[0] for e in run["events"]] == ["2", "1"]
    assert run["repair"]["repaired_ranges"] >= 2
    assert run["bytes"]["repair"] > 0
    last = run["samples"][-1]
    assert last["names"] == 8 and last["lost_ranges"] == 0
    assert last["min_live_replicas"] >= 3
    assert run["network"]["tcp_connections"] > 0
    assert run["network"]["tcp_bytes"] >= run["bytes"]["fetch"]
    assert run["durability"]["record_survival"] == 1.0


def test_relay_carries_tcp_in_order_and_refuses_it_across_a_split() -> None:
    """A relayed TCP connection delivers every byte in order; a split refuses new ones."""

    async def main() -> None:
        model = NetworkModel(LinkConfig(latency_mean=0.002, latency_sd=0.001), random.Random(1))
        async with RelayNetwork(model) as relay:
            a, b = relay.peer_network(), relay.peer_network()
            a_tcp, a_udp = await a.listen("127.0.0.1", 0)
            b_tcp, b_udp = await b.listen("127.0.0.1", 0)
            proto = asyncio.DatagramProtocol()
            ta, a_face = await a_udp.open_datagram("127.0.0.1", 0, proto, recv_buffer=1 << 16)
            tb, b_face = await b_udp.open_datagram("127.0.0.1", 0, proto, recv_buffer=1 << 16)
            assert relay.is_face(b_face) and b_face != b.inner
            loop = asyncio.get_running_loop()
            b_tcp.setblocking(False)
            payload = random.Random(2).randbytes(3 << 20)

            sock = await a.connect(b_face)
            server, _ = await loop.sock_accept(b_tcp)
            server.setblocking(False)
            sender = loop.create_task(loop.sock_sendall(sock, payload))
            got = bytearray()
            while len(got) < len(payload):
                chunk = await loop.sock_recv(server, 1 << 16)
                assert chunk
                got += chunk
            await sender
            assert bytes(got) == payload
            assert model.stats.stream_bytes == len(payload)
            sock.close()
            server.close()

            model.split({a_face: 0, b_face: 1})
            sock = await a.connect(b_face)  # the relay accepts, then finds no way through
            assert await asyncio.wait_for(loop.sock_recv(sock, 1), 5.0) == b""
            sock.close()
            assert model.stats.partitioned == 1
            a_tcp.close()
            b_tcp.close()
            ta.close()
            tb.close()

    asyncio.run(main())


def test_virtual_loop_class_is_a_selector_loop() -> None:
    """The virtual loop is a stock SelectorEventLoop: only its clock and selector differ."""
    loop = VirtualEventLoop()
    try:
        assert isinstance(loop, asyncio.SelectorEventLoop)
        assert loop.time() == 0.0
    finally:
        loop.close()


def test_cli_has_help_and_refuses_bad_scenarios(tmp_path: Path) -> None:
    """--help shows an example; a missing or malformed scenario exits with code 2."""
    runner = CliRunner()
    shown = runner.invoke(app, ["--help"])
    assert shown.exit_code == 0 and "Example" in shown.output
    missing = runner.invoke(app, ["no-such-scenario"])
    assert missing.exit_code == 2
    bad = tmp_path / "bad.toml"
    bad.write_text('peers = 10\n[workload]\npublishes = "many"\n')
    malformed = runner.invoke(app, [str(bad)])
    assert malformed.exit_code == 2


def test_difs_p2p_never_imports_the_simulator() -> None:
    """Dependencies point from sim/ to difs_p2p/, never back."""
    package = Path(__file__).resolve().parent.parent / "difs_p2p"
    for source in sorted(package.glob("*.py")):
        for line in source.read_text(encoding="utf-8").splitlines():
            assert not line.startswith(("import sim", "from sim")), f"{source.name}: {line}"


def test_cli_peers_option_runs_only_that_population(tmp_path: Path) -> None:
    """--peers replaces the scenario's list of populations; below 2 it exits with code 2."""
    scenario = tmp_path / "few.toml"
    scenario.write_text(
        'name = "few"\npeers = [30, 40]\njoin_period = 5.0\nwarmup = 5.0\nduration = 10.0\n'
        "[churn]\nenabled = false\n[workload]\nlookups = 3\n"
    )
    out = tmp_path / "out"
    runner = CliRunner()
    done = runner.invoke(app, [str(scenario), "--peers", "6", "--out", str(out), "--no-plots"])
    assert done.exit_code == 0, done.output
    runs = json.loads((out / "metrics.json").read_text())["runs"]
    assert [(r["label"], r["peers"]) for r in runs] == [("N=6", 6)]
    refused = runner.invoke(app, [str(scenario), "--peers", "1"])
    assert refused.exit_code == 2


def test_placement_spreads_copies_over_zones() -> None:
    """With peers in 3 zones and r = 3, placements put a range's copies in 3 zones (the
    closest 3 peers alone would average about 2.1) and never two on one address."""
    (run,) = json.loads(run_scenario(_tiny(zones=3), 11).metrics_json())["runs"]
    spread = run["spread"]
    assert spread["placements"] > 0
    assert spread["shared_address"] == 0
    assert spread["mean_zones"] >= 2.9, spread
