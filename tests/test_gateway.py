"""The HTTP gateway against real peers, read with the real curl binary."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest
import pytest_asyncio

from difs_p2p.client import Client
from difs_p2p.identity import Identity
from difs_p2p.listing import encode_token
from difs_p2p.peer import Peer
from tests.helpers import BIN, client_for, peer_config, start_peers, stop_all, wait_for

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.skipif(shutil.which("curl") is None, reason="needs the curl binary"),
]

CURL = shutil.which("curl") or "curl"
SEG = 64 * 1024
SIZE = 300_000
CONTENT = os.urandom(SIZE)
V2 = os.urandom(1000)
BIG = 15 * (4 << 20)


@dataclass
class Reply:
    code: int
    headers: dict[str, str]
    body: bytes


async def curl(*args: str) -> Reply:
    """Run curl with ``-i`` (status line and headers, then the body); the last reply."""
    proc = await asyncio.create_subprocess_exec(
        CURL, "-s", "-i", *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (args, proc.returncode, err)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


def multipart(reply: Reply) -> list[tuple[dict[str, str], bytes]]:
    """The parts of a multipart/byteranges body: (headers, bytes) each."""
    ctype = reply.headers["content-type"]
    assert ctype.startswith("multipart/byteranges; boundary="), ctype
    boundary = ctype.split("boundary=", 1)[1].encode()
    chunks = reply.body.split(b"--" + boundary)
    assert chunks[0] == b"" and chunks[-1] == b"--\r\n", reply.body[-60:]
    parts = []
    for chunk in chunks[1:-1]:
        assert chunk.startswith(b"\r\n") and chunk.endswith(b"\r\n")
        head, _, data = chunk[2:-2].partition(b"\r\n\r\n")
        fields = {}
        for line in head.decode().split("\r\n"):
            key, _, value = line.partition(": ")
            fields[key.lower()] = value
        parts.append((fields, data))
    return parts


@dataclass
class Net:
    peers: list[Peer]
    gateway: Peer
    url: str
    client: Client
    etag: str
    v1_etag: str
    # /key/<fp>/videos: "a <b>.mp4" and "sub/c.txt" in it
    folder: str


async def _gateway_peer(root: Path, seed: Peer) -> Peer:
    """A peer offering no storage, with a gateway on a free port: its holders are others."""
    peer = Peer(
        peer_config(root / "gw", bootstrap=(seed.address,), capacity=0, http=("127.0.0.1", 0))
    )
    await peer.start()
    return peer


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    root = tmp_path_factory.mktemp("gw")
    peers = await start_peers(root, 3)
    gw = await _gateway_peer(root, peers[0])
    src = root / "src"
    src.write_bytes(CONTENT)
    me = Identity.generate()
    client = client_for(peers[0], publisher=me)
    try:
        await client.put(src, "/t.com/clip.mp4", segment_size=SEG, replicas=2)
        folder = f"/key/{me.fingerprint}/videos"
        await client.put(src, f"{folder}/a <b>.mp4", segment_size=SEG, replicas=2)
        await client.put(src, f"{folder}/sub/c.txt", segment_size=SEG, replicas=2)
        await client.put(src, "/t.com/vidéo été.mp4", segment_size=SEG, replicas=2)
        await client.put(src, "/t.com/gone.txt", segment_size=SEG, replicas=2)
        await client.rm("/t.com/gone.txt")
        v1 = await client.put(src, "/t.com/versions.bin", segment_size=SEG, replicas=2)
        src.write_bytes(V2)
        await client.put(src, "/t.com/versions.bin", segment_size=SEG, replicas=2, update=True)
        etag = '"' + (await client.resolve("/t.com/clip.mp4")).manifest.hash + '"'
        assert gw.gateway is not None
        yield Net(peers, gw, gw.gateway.url, client, etag, f'"{v1.manifest.hash}"', folder)
    finally:
        await client.close()
        await stop_all([gw, *peers])


async def test_get_head_and_single_ranges(net: Net) -> None:
    """GET, HEAD and single ranges: bytes, lengths, Content-Range, and ignored bad headers."""
    url = net.url + "t.com/clip.mp4"
    whole = await curl(url)
    assert whole.code == 200 and whole.body == CONTENT
    assert whole.headers["content-length"] == str(SIZE)
    assert whole.headers["accept-ranges"] == "bytes"
    assert whole.headers["etag"] == net.etag
    head = await curl("-I", url)
    assert head.code == 200 and head.body == b""
    assert head.headers["content-length"] == str(SIZE)
    assert head.headers["etag"] == net.etag
    cases = [
        ("0-0", (0, 0)),
        ("100-", (100, SIZE - 1)),
        ("-100", (SIZE - 100, SIZE - 1)),
        ("70000-140000", (70000, 140000)),  # across segments
        ("299990-999999", (299990, SIZE - 1)),
    ]
    for spec, (first, last) in cases:
        got = await curl("-H", f"Range: bytes={spec}", url)
        assert got.code == 206, spec
        assert got.body == CONTENT[first : last + 1], spec
        assert got.headers["content-range"] == f"bytes {first}-{last}/{SIZE}", spec
        assert got.headers["content-length"] == str(last - first + 1), spec
    for junk in ("bytes=5-2", "bytes=junk", "items=0-1"):
        got = await curl("-H", f"Range: {junk}", url)
        assert got.code == 200 and got.body == CONTENT, junk
    past = await curl("-H", f"Range: bytes={SIZE}-", url)
    assert past.code == 416
    assert past.headers["content-range"] == f"bytes */{SIZE}"


async def test_multi_range(net: Net) -> None:
    """Several ranges: multipart/byteranges, each part framed; overlapping ones merged."""
    url = net.url + "t.com/clip.mp4"
    got = await curl("-H", "Range: bytes=0-9,200000-200009,-5", url)
    assert got.code == 206
    assert int(got.headers["content-length"]) == len(got.body)
    parts = multipart(got)
    assert [p[0]["content-range"] for p in parts] == [
        f"bytes 0-9/{SIZE}",
        f"bytes 200000-200009/{SIZE}",
        f"bytes {SIZE - 5}-{SIZE - 1}/{SIZE}",
    ]
    assert [p[1] for p in parts] == [CONTENT[0:10], CONTENT[200000:200010], CONTENT[-5:]]
    assert all(p[0]["content-type"] == "video/mp4" for p in parts)
    merged = await curl("-H", "Range: bytes=0-99,50-149", url)
    assert merged.code == 206
    assert merged.headers["content-range"] == f"bytes 0-149/{SIZE}"
    assert merged.body == CONTENT[:150]
    many = await curl(
        "-H", "Range: bytes=" + ",".join(f"{i * 100}-{i * 100}" for i in range(17)), url
    )
    assert many.code == 200 and many.body == CONTENT


async def test_conditional_requests(net: Net) -> None:
    """If-None-Match, If-Match, If-Range and the dates, as RFC 9110 orders them."""
    url = net.url + "t.com/clip.mp4"
    whole = await curl(url)
    modified = whole.headers["last-modified"]
    assert email.utils.parsedate_to_datetime(modified).tzname() == "UTC"
    assert (await curl("-H", f"If-None-Match: {net.etag}", url)).code == 304
    assert (await curl("-H", f"If-None-Match: W/{net.etag}", url)).code == 304
    assert (await curl("-H", 'If-None-Match: "other"', url)).code == 200
    assert (await curl("-H", 'If-Match: "other"', url)).code == 412
    assert (await curl("-H", f"If-Match: {net.etag}", url)).code == 200
    assert (await curl("-H", f"If-Modified-Since: {modified}", url)).code == 304
    assert (await curl("-H", "If-Unmodified-Since: Sat, 01 Jan 2000 00:00:00 GMT", url)).code == 412
    current = await curl("-H", "Range: bytes=0-9", "-H", f"If-Range: {net.etag}", url)
    assert current.code == 206 and current.body == CONTENT[:10]
    stale = await curl("-H", "Range: bytes=0-9", "-H", 'If-Range: "stale"', url)
    assert stale.code == 200 and stale.body == CONTENT
    dated = await curl("-H", "Range: bytes=0-9", "-H", f"If-Range: {modified}", url)
    assert dated.code == 200 and dated.body == CONTENT
    not_modified = await curl("-H", f"If-None-Match: {net.etag}", url)
    assert not_modified.body == b"" and not_modified.headers["etag"] == net.etag


async def test_representation_headers_and_versions(net: Net) -> None:
    """Type, nosniff, Content-Disposition of a non-ASCII name, cache headers by version."""
    got = await curl(net.url + "t.com/clip.mp4")
    assert got.headers["content-type"] == "video/mp4"
    assert got.headers["x-content-type-options"] == "nosniff"
    assert got.headers["cache-control"] == "public, max-age=10"
    odd = await curl(net.url + "t.com/vid%C3%A9o%20%C3%A9t%C3%A9.mp4")
    assert odd.code == 200 and odd.body == CONTENT
    assert odd.headers["content-disposition"] == (
        "inline; filename=\"vid_o _t_.mp4\"; filename*=UTF-8''vid%C3%A9o%20%C3%A9t%C3%A9.mp4"
    )
    latest = await curl(net.url + "t.com/versions.bin")
    assert latest.body == V2 and latest.headers["cache-control"] == "public, max-age=10"
    first = await curl(net.url + "t.com/versions.bin?version=1")
    assert first.code == 200 and first.body == CONTENT
    assert first.headers["cache-control"] == "public, max-age=31536000, immutable"
    assert first.headers["etag"] == net.v1_etag
    assert (await curl(net.url + "t.com/versions.bin?version=9")).code == 404
    assert (await curl(net.url + "t.com/versions.bin?version=x")).code == 400


async def test_errors_cors_and_health(net: Net) -> None:
    """400, 404, 410, 405, error bodies by Accept, the CORS preflight and /healthz."""
    bad = await curl(net.url + "t.com/a%01b")
    assert bad.code == 400 and b"control character" in bad.body
    missing = await curl(net.url + "t.com/nothing")
    assert missing.code == 404 and missing.body == b"404 /t.com/nothing is not published\n"
    as_json = await curl("-H", "Accept: application/json", net.url + "t.com/nothing")
    assert as_json.headers["content-type"] == "application/json"
    assert b'"status": 404' in as_json.body
    gone = await curl(net.url + "t.com/gone.txt")
    assert gone.code == 410
    post = await curl("-X", "POST", net.url + "t.com/clip.mp4")
    assert post.code == 405 and post.headers["allow"] == "GET, HEAD, OPTIONS"
    pre = await curl(
        "-X",
        "OPTIONS",
        "-H",
        "Origin: http://example.org",
        "-H",
        "Access-Control-Request-Method: GET",
        "-H",
        "Access-Control-Request-Headers: Range",
        net.url + "t.com/clip.mp4",
    )
    assert pre.code == 204
    assert pre.headers["access-control-allow-origin"] == "*"
    assert "GET" in pre.headers["access-control-allow-methods"]
    assert "Range" in pre.headers["access-control-allow-headers"]
    got = await curl("-H", "Origin: http://example.org", net.url + "t.com/clip.mp4")
    assert got.headers["access-control-allow-origin"] == "*"
    exposed = got.headers["access-control-expose-headers"]
    for name in ("Content-Range", "Content-Length", "ETag", "Accept-Ranges", "Last-Modified"):
        assert name in exposed
    health = await curl(net.url + "healthz")
    state = net.gateway.status()["network"]
    assert (health.code, health.body) == (200 if state == "ok" else 503, f"{state}\n".encode())
    assert net.gateway.status()["http"] == net.url
    assert (net.gateway.data_dir / "http").read_text() == net.url + "\n"


async def _holder(client: Client, name: str) -> tuple[str, int]:
    stat = await client.stat(name)
    (address,) = {s["address"] for s in stat["storages"]}
    host, port = address.rsplit(":", 1)
    return host, int(port)


async def test_failed_holder_gives_502_and_aborts_a_started_body(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that leaves ends its request; over the stream limit a request is 503;
    with the only holder stopped after the headers went out, the connection is dropped
    and curl fails (never exits 0); then a request is 502 with Retry-After."""
    peers = await start_peers(tmp_path, 3)
    gw = await _gateway_peer(tmp_path, peers[0])
    client = client_for(peers[0], publisher=Identity.generate())
    stopped: list[Peer] = []
    try:
        assert gw.gateway is not None
        big = tmp_path / "big"
        big.write_bytes(os.urandom(BIG))
        # 15 segments of 4 MiB: one range, on one holder; a stream reads 16 MiB ahead
        await client.put(big, "/t.com/big", segment_size=4 << 20, replicas=1)
        address = await _holder(client, "/t.com/big")
        holder = next(p for p in peers if p.address == address)
        # a client that goes away mid-body: its request ends, the stream is closed
        quitter = await asyncio.create_subprocess_exec(
            CURL, "-s", "--limit-rate", "1M", "-o", os.devnull, gw.gateway.url + "t.com/big"
        )
        metrics = gw.gateway_metrics
        await wait_for(lambda: metrics.fetched_bytes > 0, timeout=20)
        assert metrics.in_flight == 1
        gw.gateway.max_streams = 1
        busy = await curl(gw.gateway.url + "t.com/big")
        assert busy.code == 503 and busy.headers["retry-after"].isdigit()
        gw.gateway.max_streams = 16
        quitter.kill()
        await quitter.wait()
        await wait_for(lambda: metrics.in_flight == 0, timeout=10)
        out = tmp_path / "out"
        proc = await asyncio.create_subprocess_exec(
            CURL,
            "-s",
            "--limit-rate",
            "8M",
            "-D",
            str(tmp_path / "head"),
            "-o",
            str(out),
            gw.gateway.url + "t.com/big",
        )
        await wait_for(lambda: b"200 OK" in _read(tmp_path / "head"), timeout=20)
        await holder.stop()
        stopped.append(holder)
        code = await asyncio.wait_for(proc.wait(), 30)
        assert code != 0
        assert out.stat().st_size < BIG
        assert any("gateway_body_failed" in r.getMessage() for r in caplog.records)
        failed = await curl(gw.gateway.url + "t.com/big")
        assert failed.code == 502
        assert failed.headers["retry-after"].isdigit()
    finally:
        await client.close()
        await stop_all([p for p in [gw, *peers] if p not in stopped])


async def test_stopping_the_peer_ends_requests_under_way(tmp_path: Path) -> None:
    """The peer stops its gateway first: a body under way is cut (curl fails), the
    stop completes and DATA/http is gone."""
    (peer,) = await start_peers(tmp_path, 1)
    gw = await _gateway_peer(tmp_path, peer)
    client = client_for(peer, publisher=Identity.generate())
    try:
        assert gw.gateway is not None
        src = tmp_path / "src"
        # more than a stream's window and the sockets' buffers hold (loopback's take MBs)
        src.write_bytes(os.urandom(48 << 20))
        await client.put(src, "/t.com/slow", segment_size=4 << 20, replicas=1)
        head = tmp_path / "head"
        proc = await asyncio.create_subprocess_exec(
            CURL,
            "-s",
            "--limit-rate",
            "8M",
            "-D",
            str(head),
            "-o",
            os.devnull,
            gw.gateway.url + "t.com/slow",
        )
        await wait_for(lambda: b"200 OK" in _read(head), timeout=20)
        await asyncio.wait_for(gw.stop(), 30)
        assert await asyncio.wait_for(proc.wait(), 30) != 0
        assert gw.gateway is None and not (gw.data_dir / "http").exists()
    finally:
        await client.close()
        await stop_all([gw, peer])


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


async def test_http_off_busy_and_explicit_addresses(tmp_path: Path) -> None:
    """--http off has no gateway; an address taken: the start fails with a clear error
    (exit 9); a malformed one is a usage error (exit 2)."""
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        off = await asyncio.create_subprocess_exec(
            str(BIN / "difs-peer"),
            "join",
            "--data",
            str(tmp_path / "off"),
            "--http",
            "off",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert off.stdout is not None
        line = (await off.stdout.readline()).decode()
        assert line.startswith("peer ready") and "http=" not in line
        assert not (tmp_path / "off" / "http").exists()
        off.terminate()
        await off.wait()
        taken = await asyncio.create_subprocess_exec(
            str(BIN / "difs-peer"),
            "join",
            "--data",
            str(tmp_path / "taken"),
            "--http",
            f"127.0.0.1:{port}",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = await taken.communicate()
        assert taken.returncode == 9
        assert f"cannot serve HTTP on 127.0.0.1:{port}" in err.decode()
        junk = await asyncio.create_subprocess_exec(
            str(BIN / "difs-peer"),
            "join",
            "--data",
            str(tmp_path / "junk"),
            "--http",
            "junk",
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        _, err = await junk.communicate()
        assert junk.returncode == 2 and "--http must be HOST:PORT" in err.decode()
        assert not (tmp_path / "junk").exists()
    finally:
        busy.close()


async def test_default_address_busy_leaves_the_peer_running(tmp_path: Path) -> None:
    """The CLI's default address taken: the peer warns and runs without a gateway."""
    busy = socket.socket()
    busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)

    def take() -> bool:
        try:
            busy.bind(("127.0.0.1", 8080))
        except OSError:
            return False  # a peer of another test holds it for now
        busy.listen()
        return True

    # Hold the port ourselves: another test's peer may hold it now and free it any time.
    # Taken by a long-lived process instead, the port is just as busy.
    with contextlib.suppress(AssertionError):
        await wait_for(take, timeout=20, step=0.1)
    try:
        proc = await asyncio.create_subprocess_exec(
            str(BIN / "difs-peer"),
            "join",
            "--data",
            str(tmp_path / "p"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        line = (await proc.stdout.readline()).decode()
        assert line.startswith("peer ready") and "http=" not in line
        proc.terminate()
        _, err = await proc.communicate()
        assert "gateway_off" in err.decode() and "127.0.0.1:8080" in err.decode()
    finally:
        busy.close()


async def test_cli_peer_serves_its_ready_line_url(tmp_path: Path) -> None:
    """difs-peer join --http 127.0.0.1:0: the ready line, DATA/http and status name a
    URL curl fetches content from; the file is removed at exit."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "difs-peer"),
        "join",
        "--data",
        str(tmp_path / "p"),
        "--http",
        "127.0.0.1:0",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await proc.stdout.readline()).decode()
        fields = dict(part.split("=", 1) for part in line.split()[2:])
        url = fields["http"]
        assert (tmp_path / "p" / "http").read_text() == url + "\n"
        health = await curl(url + "healthz")
        assert health.code == 200 and health.body == b"ok\n"
        missing = await curl(url + "t.com/none")
        assert missing.code == 404
        host, port = fields["address"].rsplit(":", 1)
        token = bytes.fromhex((tmp_path / "p" / "control.token").read_text().strip())
        src = tmp_path / "src"
        src.write_bytes(CONTENT)
        async with Client((host, int(port)), token=token, publisher=Identity.generate()) as c:
            await c.put(src, "/t.com/served.mp4", replicas=1)
        served = await curl(url + "t.com/served.mp4")
        assert served.code == 200 and served.body == CONTENT
        status = await asyncio.create_subprocess_exec(
            str(BIN / "difs-peer"),
            "status",
            "--json",
            "--peer",
            fields["address"],
            "--token-file",
            str(tmp_path / "p" / "control.token"),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, _ = await status.communicate()
        assert json.loads(out)["http"] == url
    finally:
        proc.terminate()
        await proc.wait()
    assert not (tmp_path / "p" / "http").exists()


async def test_metrics_count_the_gateway(net: Net) -> None:
    """/metrics serves the peer's figures; responses, bytes sent and time to first byte
    of the gateway's own requests are counted."""
    before = net.gateway.gateway_metrics.fetched_bytes
    assert (await curl("-H", "Range: bytes=0-999", net.url + "t.com/clip.mp4")).code == 206
    assert (await curl(net.url + "t.com/nothing")).code == 404
    got = await curl(net.url + "metrics")
    assert got.code == 200
    assert got.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = got.body.decode()
    lines = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and line[0] != "#")
    assert float(lines['difs_gateway_responses_total{code="206"}']) >= 1
    assert float(lines['difs_gateway_responses_total{code="404"}']) >= 1
    assert float(lines["difs_gateway_time_to_first_byte_seconds_count"]) >= 2
    # this scrape is in flight while it is rendered
    assert float(lines["difs_gateway_requests_in_flight"]) == 1
    assert net.gateway.gateway_metrics.fetched_bytes == before + 1000
    assert float(lines["difs_gateway_sent_bytes_total"]) == before + 1000


async def test_directory_pages(net: Net) -> None:
    """A folder: 301 to its slash form, an HTML page of escaped links with sizes and
    dates, JSON by Accept or ?format=json, and ?after= continuing after a name."""
    url = net.url + net.folder.lstrip("/")
    moved = await curl(url)
    assert moved.code == 301
    assert moved.headers["location"] == net.folder + "/"
    page = await curl(url + "/")
    assert page.code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    html = page.body.decode()
    assert '<a href="a%20%3Cb%3E.mp4">a &lt;b&gt;.mp4</a>' in html
    assert '<a href="sub/">sub/</a>' in html
    assert f"<td>{SIZE}</td>" in html
    head = await curl("-I", url + "/")
    assert head.code == 200 and head.body == b""
    assert int(head.headers["content-length"]) == len(page.body)
    listed = await curl("-H", "Accept: application/json", url + "/")
    assert listed.headers["content-type"] == "application/json; charset=utf-8"
    body = json.loads(listed.body)
    assert [e["name"] for e in body["entries"]] == ["a <b>.mp4", "sub/"]
    assert body["entries"][0]["size"] == SIZE and body["next"] is None
    token = encode_token(body["entries"][0]["path"])
    rest = json.loads((await curl(f"{url}/?format=json&after={quote(token)}")).body)
    assert [e["name"] for e in rest["entries"]] == ["sub/"]
    linked = await curl(url + "/a%20%3Cb%3E.mp4")
    assert linked.code == 200 and linked.body == CONTENT
    assert (await curl(net.url + "t.com/")).code == 400  # no owner: no listing
