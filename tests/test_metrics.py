"""The peer's Prometheus metrics: the pure counters (histogram buckets, RPC outcomes, the
gateway's figures), and render() of real peers after a publish and a fetch, parsed back
with prometheus_client's parser and linted by the real ``promtool check metrics``."""

from __future__ import annotations

import asyncio
import io
import math
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from difs_p2p.errors import IntegrityError
from difs_p2p.identity import Identity
from difs_p2p.metrics import (
    BUCKETS,
    OTHER_RPC,
    RPC_OUTCOMES,
    GatewayMetrics,
    Histogram,
    RpcStats,
    render,
    status_label,
)
from difs_p2p.peer import Peer
from tests.helpers import client_for, start_peers, stop_all, wait_for

# -- Histogram ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        # (observations, cumulative counts at the bounds 0.1, 1, +Inf)
        ([], [0, 0, 0]),
        ([0.05], [1, 1, 1]),
        ([0.1], [1, 1, 1]),  # a bound is inclusive (le)
        ([0.1000001], [0, 1, 1]),
        ([1.0, 5.0], [0, 1, 2]),
        ([50.0], [0, 0, 1]),
        ([-3.0], [1, 1, 1]),  # a clock stepped back counts as 0
        ([math.nan], [1, 1, 1]),
        ([0.0, 0.2, 0.3, 7.0], [1, 3, 4]),
    ],
)
def test_histogram_counts_cumulative_buckets(values: list[float], expected: list[int]) -> None:
    """Each observation lands in the first bucket whose bound is >= it; output is cumulative."""
    h = Histogram((0.1, 1.0))
    for v in values:
        h.observe(v)
    assert h.cumulative() == list(zip(["0.1", "1.0", "+Inf"], expected, strict=True))
    assert h.count == len(values)


def test_histogram_sum_adds_observed_values() -> None:
    """The sum is of the values as counted (negative ones as 0)."""
    h = Histogram()
    for v in (0.002, 0.5, -1.0):
        h.observe(v)
    assert h.sum == pytest.approx(0.502)
    assert len(h.cumulative()) == len(BUCKETS) + 1


@pytest.mark.parametrize("bounds", [(), (1.0, 1.0), (2.0, 1.0), (1.0, math.inf), (math.nan,)])
def test_histogram_refuses_bad_bounds(bounds: tuple[float, ...]) -> None:
    """Bounds must be finite, non-empty and increasing (+Inf is implicit)."""
    with pytest.raises(ValueError):
        Histogram(bounds)


# -- RpcStats ----------------------------------------------------------------------------


def test_rpc_stats_counts_by_name_and_outcome() -> None:
    """Each request counts once under its name and outcome; only answered ones are timed."""
    stats = RpcStats({"ping", "store"})
    stats.record("ping", "ok", 0.003)
    stats.record("ping", "timeout")
    stats.record("store", "refused", 0.002)
    stats.record("store", "error")
    assert stats.counts[("ping", "ok")] == 1
    assert stats.counts[("ping", "timeout")] == 1
    assert stats.counts[("store", "refused")] == 1
    assert stats.counts[("store", "error")] == 1
    assert stats.durations["ping"].count == 1
    assert stats.durations["store"].count == 1


def test_rpc_stats_label_values_stay_in_a_fixed_set() -> None:
    """An unknown name counts as "other"; an unknown outcome is refused: labels stay bounded."""
    stats = RpcStats({"ping"})
    stats.record("x" * 100, "ok", 0.001)
    assert stats.counts[(OTHER_RPC, "ok")] == 1
    assert set(stats.counts) == {(n, o) for n in ("ping", OTHER_RPC) for o in RPC_OUTCOMES}
    with pytest.raises(ValueError):
        stats.record("ping", "weird")


# -- GatewayMetrics ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "label"),
    [
        (200, "200"),
        (206, "206"),
        (304, "304"),
        (404, "404"),
        (416, "416"),
        (418, "4xx"),
        (599, "5xx"),
        (102, "1xx"),
        (0, "other"),
        (1000, "other"),
    ],
)
def test_status_label_is_exact_code_or_class(status: int, label: str) -> None:
    """Known codes keep their value; others collapse to their class: a bounded label."""
    assert status_label(status) == label


def test_gateway_metrics_count_responses_bytes_and_requests_in_flight() -> None:
    """Responses by code, time to first byte, bytes and in-flight requests add up."""
    gw = GatewayMetrics()
    with gw.inflight():
        with gw.inflight():
            assert gw.in_flight == 2
        gw.observe(200, 0.01)
        gw.sent(1000)
    with pytest.raises(RuntimeError), gw.inflight():
        raise RuntimeError("handler failed")
    assert gw.in_flight == 0
    gw.observe(404, None)
    gw.observe(200, 0.2)
    gw.sent(24)
    gw.received(2048)
    assert gw.responses == {"200": 2, "404": 1}
    assert gw.ttfb.count == 2
    assert gw.fetched_bytes == 1024
    assert gw.received_bytes == 2048


def test_prometheus_client_is_imported_only_by_a_scrape() -> None:
    """The CLI's modules load without prometheus_client (its import costs ~70 ms)."""
    code = "import sys, difs_p2p.cli, difs_p2p.metrics;sys.exit('prometheus_client' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False, timeout=60).returncode == 0


# -- real peers --------------------------------------------------------------------------

NAME = "/zzsecretname-4711/film.bin"
DATA = random.Random(4711).randbytes(256 * 1024)  # 4 distinct segments of 64 KiB


def _samples(text: bytes) -> dict[str, list[Sample]]:
    families = text_string_to_metric_families(text.decode())
    return {f.name: f.samples for f in families}


def _value(samples: dict[str, list[Sample]], family: str, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples[family]
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


async def _publish_and_fetch(peers: list[Peer]) -> None:
    async with client_for(peers[0], publisher=Identity.generate()) as client:
        await client.put(io.BytesIO(DATA), NAME, replicas=3, segment_size=64 * 1024)
    out = io.BytesIO()
    async with client_for(peers[2]) as client:
        await client.get(NAME, out)
    assert out.getvalue() == DATA


async def test_render_reports_live_figures_of_running_peers(tmp_path: Path) -> None:
    """After a publish and a fetch, storage, DHT, served and fetched bytes have moved."""
    peers = await start_peers(tmp_path, 3)
    try:
        await wait_for(lambda: all(len(p.dht.contacts()) >= 2 for p in peers if p.dht), 10)
        await _publish_and_fetch(peers)
        # the peer's own fetch (heal): one segment from another holder
        me, other = peers[1], peers[2]
        assert me.holdings is not None
        held = me.holdings.all()[0]
        seg = (await me.replicator.hash_list(held.integrity, held.segment_count))[0]
        fetched = await me.replicator.fetch_segment(other.address, seg)

        texts = [render(p) for p in peers]
        parsed = [_samples(t) for t in texts]
        served = sum(
            _value(s, "difs_segment_served_bytes", "difs_segment_served_bytes_total")
            for s in parsed
        )
        assert served >= len(DATA)
        mine = parsed[1]
        assert _value(mine, "difs_segment_fetched_bytes", "difs_segment_fetched_bytes_total") == (
            len(fetched)
        )
        for s in parsed:
            assert _value(s, "difs_dht_routing_table_peers", "difs_dht_routing_table_peers") >= 2
            # three copies on three peers: each holds the whole object
            assert _value(s, "difs_storage_used_bytes", "difs_storage_used_bytes") >= len(DATA)
            assert _value(s, "difs_storage_offered_bytes", "difs_storage_offered_bytes") > 0
            assert _value(s, "difs_network_state", "difs_network_state", state="ok") == 1
            assert _value(s, "difs_network_state", "difs_network_state") == 1
            assert _value(s, "difs_dht_rpcs", "difs_dht_rpcs_total", outcome="ok") > 0
            assert (
                _value(s, "difs_dht_rpc_duration_seconds", "difs_dht_rpc_duration_seconds_count")
                > 0
            )
            assert "difs_process_resident_memory_bytes" in s
        # every peer stored the name's records; the DHT asked find_* and store
        asked = {
            x.labels["rpc"]
            for s in parsed
            for x in s["difs_dht_rpcs"]
            if x.name == "difs_dht_rpcs_total" and x.value > 0
        }
        assert {"store", "find_value"} <= asked or {"store", "find_entries"} <= asked
        for text in texts:
            assert b"zzsecretname" not in text
            assert b"127.0.0.1" not in text
    finally:
        await stop_all(peers)


async def test_verification_failure_of_a_fetched_segment_is_counted(tmp_path: Path) -> None:
    """A damaged copy fetched from a holder counts as a verification failure, not bytes."""
    peers = await start_peers(tmp_path, 3)
    try:
        await _publish_and_fetch(peers)
        me, other = peers[1], peers[2]
        assert me.holdings is not None and other.store is not None
        held = me.holdings.all()[0]
        seg = (await me.replicator.hash_list(held.integrity, held.segment_count))[0]
        path = other.store.path_of(seg)
        damaged = bytearray(path.read_bytes())
        damaged[-1] ^= 0xFF
        path.write_bytes(bytes(damaged))
        with pytest.raises(IntegrityError):
            await me.replicator.fetch_segment(other.address, seg)
        s = _samples(render(me))
        assert _value(s, "difs_verification_failures", "difs_verification_failures_total") == 1
        assert _value(s, "difs_segment_fetched_bytes", "difs_segment_fetched_bytes_total") == 0
    finally:
        await stop_all(peers)


async def _crash(peer: Peer) -> None:
    """Stop answering at once, without telling anyone (as kill -9 would)."""
    assert peer.server is not None and peer.dht is not None and peer.dht.transport is not None
    peer.dht.transport.close()
    await peer.server.stop()
    peer.server = None


async def test_repair_figures_follow_a_lost_copy(tmp_path: Path) -> None:
    """A crashed holder shows as under-replicated ranges, then as repair bytes, then 0."""
    peers = await start_peers(tmp_path, 5)
    try:
        async with client_for(peers[0], publisher=Identity.generate()) as client:
            result = await client.put(io.BytesIO(DATA), NAME, replicas=3, segment_size=64 * 1024)
        holders = {h for r in result.ranges for h in r["holders"]} - {peers[0].node_id.hex()}
        victim = next(p for p in peers if p.node_id.hex() in holders)
        await _crash(victim)
        live = [p for p in peers if p is not victim]

        def total(family: str, name: str) -> float:
            return sum(_value(_samples(render(p)), family, name) for p in live)

        short = "difs_under_replicated_ranges"
        assert total(short, short) == 0
        for p in live:
            assert p.maintainer is not None
            await p.maintainer.round()
        assert total(short, short) >= 1
        for _ in range(4):
            for p in live:
                assert p.maintainer is not None
                await p.maintainer.round()
        assert total("difs_repair_bytes", "difs_repair_bytes_total") >= 64 * 1024
        assert total(short, short) == 0
    finally:
        await stop_all(peers)


async def test_gateway_figures_are_rendered(tmp_path: Path) -> None:
    """What the gateway counted shows under difs_gateway_* with bounded code labels."""
    (peer,) = await start_peers(tmp_path, 1)
    try:
        gw = peer.gateway_metrics
        with gw.inflight():
            gw.observe(200, 0.004)
            gw.observe(777, None)
            gw.sent(5000)
            s = _samples(render(peer))
        assert _value(s, "difs_gateway_responses", "difs_gateway_responses_total", code="200") == 1
        assert (
            _value(s, "difs_gateway_responses", "difs_gateway_responses_total", code="other") == 1
        )
        assert _value(s, "difs_gateway_requests_in_flight", "difs_gateway_requests_in_flight") == 1
        assert _value(s, "difs_gateway_sent_bytes", "difs_gateway_sent_bytes_total") == 5000
        ttfb = "difs_gateway_time_to_first_byte_seconds"
        assert _value(s, ttfb, ttfb + "_bucket", le="0.005") == 1
        assert _value(s, ttfb, ttfb + "_bucket", le="0.0025") == 0
        assert _value(s, ttfb, ttfb + "_count") == 1
    finally:
        await stop_all([peer])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian: prometheus)")
async def test_promtool_accepts_the_output_without_warnings(tmp_path: Path) -> None:
    """The real ``promtool check metrics`` lints a running peer's output clean."""
    peers = await start_peers(tmp_path, 2)
    try:
        await wait_for(lambda: all(len(p.dht.contacts()) >= 1 for p in peers if p.dht), 10)
        peers[0].gateway_metrics.observe(206, 0.01)
        text = render(peers[0])
    finally:
        await stop_all(peers)
    promtool = shutil.which("promtool")
    assert promtool is not None
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    said, _ = await asyncio.wait_for(proc.communicate(text), 30)
    assert proc.returncode == 0, said.decode()
    assert said == b"", said.decode()
