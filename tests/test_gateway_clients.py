"""The HTTP gateway read by real clients nobody here wrote: ffprobe and ffmpeg, headless
Chromium playing a video (driven by playwright), curl, and a raw socket that hangs up.

The binaries come from Debian (`.ci/sysdeps`, run by ``make test``); a test whose binary is
missing is skipped and says which one.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import pytest_asyncio

from difs_p2p.client import Client
from difs_p2p.control import read_token_file
from difs_p2p.gateway import BODY_BUFFER
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from tests.helpers import BIN, client_for, peer_config, start_peers, stop_all, wait_for

if TYPE_CHECKING:
    from playwright.async_api import Browser, Page

pytestmark = pytest.mark.asyncio(loop_scope="module")

MiB = 1 << 20
FFMPEG = shutil.which("ffmpeg")
FFPROBE = shutil.which("ffprobe")
CHROMIUM = shutil.which("chromium")
CURL = shutil.which("curl")
needs_ffmpeg = pytest.mark.skipif(
    FFMPEG is None or FFPROBE is None,
    reason="needs ffmpeg and ffprobe (Debian package ffmpeg; .ci/sysdeps installs it)",
)
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None or FFMPEG is None,
    reason="needs chromium and ffmpeg (Debian packages; .ci/sysdeps installs them)",
)
needs_curl = pytest.mark.skipif(
    CURL is None, reason="needs curl (Debian package curl; .ci/sysdeps installs it)"
)
# Debian's Chromium, not a browser playwright downloads (`playwright install` is not needed).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
# Segments of the videos: a few MB each, so every seek crosses segments.
VIDEO_SEGMENT = 256 * 1024
# The object a client hangs up on, and the one a slow client reads: 64 segments of 1 MiB.
BIG = 64 * MiB
# What the serving peer process may hold while a slow client reads a 64 MiB object.
RSS_LIMIT_MB = 200
PLAYER = b"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>player</title></head>
<body><video id="v" src="end.mp4" muted preload="auto"></video></body></html>
"""


@dataclass
class Net:
    peers: list[Peer]
    gateway: Peer
    url: str
    client: Client
    root: Path


async def run(*args: str) -> bytes:
    """Run a command; its stdout (it must exit 0)."""
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, (args, proc.returncode, err.decode(errors="replace")[-2000:])
    return out


async def probe(source: str | Path) -> dict[str, object]:
    """ffprobe's view of a file or URL: the container's duration and the streams' types."""
    assert FFPROBE is not None
    out = await run(
        FFPROBE,
        "-v",
        "error",
        "-show_entries",
        "format=duration:stream=codec_type,codec_name",
        "-of",
        "json",
        str(source),
    )
    return dict(json.loads(out))


def duration(info: dict[str, object]) -> float:
    fmt = info["format"]
    assert isinstance(fmt, dict)
    return float(fmt["duration"])


def stream_types(info: dict[str, object]) -> list[str]:
    streams = info["streams"]
    assert isinstance(streams, list)
    return sorted(s["codec_type"] for s in streams)


async def make_videos(root: Path) -> tuple[Path, Path]:
    """A 30 s H.264/AAC MP4 with its index (moov) at the end, as ffmpeg writes it, and the
    same with ``+faststart`` (index first)."""
    assert FFMPEG is not None
    end, fast = root / "end.mp4", root / "fast.mp4"
    await run(
        FFMPEG,
        "-hide_banner",
        "-loglevel",
        "error",
        "-f",
        "lavfi",
        "-i",
        "testsrc=duration=30:size=320x240:rate=25",
        "-f",
        "lavfi",
        "-i",
        "sine=frequency=440:duration=30",
        "-c:v",
        "libx264",
        "-preset",
        "ultrafast",
        "-pix_fmt",
        "yuv420p",  # what browsers decode (testsrc is RGB)
        "-b:v",
        "600k",
        "-g",
        "25",  # a key frame a second: ffmpeg's -c copy cuts land near the asked time
        "-c:a",
        "aac",
        "-b:a",
        "64k",
        "-shortest",
        str(end),
    )
    faststart = ["-c", "copy", "-movflags", "+faststart"]
    await run(FFMPEG, "-loglevel", "error", "-i", str(end), *faststart, str(fast))
    for path, index_last in ((end, True), (fast, False)):
        data = path.read_bytes()
        assert (data.find(b"moov") > data.find(b"mdat")) is index_last, path
    return end, fast


def write_random(path: Path, size: int) -> None:
    with path.open("wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    """Two storage peers and a gateway peer offering no storage (its content comes from
    the others over TCP), on 127.0.0.1 with free ports."""
    root = tmp_path_factory.mktemp("clients")
    peers = await start_peers(root, 2)
    gw = Peer(
        peer_config(root / "gw", bootstrap=(peers[0].address,), capacity=0, http=("127.0.0.1", 0))
    )
    await gw.start()
    client = client_for(peers[0], publisher=Identity.generate())
    try:
        assert gw.gateway is not None
        yield Net(peers, gw, gw.gateway.url, client, root)
    finally:
        await client.close()
        await stop_all([gw, *peers])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def videos(net: Net) -> Net:
    """/t.com/end.mp4 (index at the end), /t.com/fast.mp4 (index first) and a page that
    plays the former, published."""
    end, fast = await make_videos(net.root)
    page = net.root / "player.html"
    page.write_bytes(PLAYER)
    for path, name in ((end, "end.mp4"), (fast, "fast.mp4"), (page, "player.html")):
        await net.client.put(path, f"/t.com/{name}", segment_size=VIDEO_SEGMENT, replicas=1)
    return net


def responses(peer: Peer, code: int) -> int:
    """How many responses with status ``code`` the peer's gateway gave so far."""
    return peer.gateway_metrics.responses.get(str(code), 0)


@needs_ffmpeg
async def test_ffprobe_and_ffmpeg_read_by_ranges(videos: Net) -> None:
    """ffprobe reads both layouts' duration and streams by URL (the index at the end only
    through range requests); ffmpeg cuts 2 s from the middle of each with -c copy."""
    assert FFMPEG is not None
    net = videos
    for name in ("end.mp4", "fast.mp4"):
        before = responses(net.gateway, 206)
        info = await probe(net.url + "t.com/" + name)
        assert abs(duration(info) - 30.0) < 0.2, (name, info)
        assert stream_types(info) == ["audio", "video"], (name, info)
        if name == "end.mp4":
            # the first request reads from byte 0; the index at the end takes more ranges
            assert responses(net.gateway, 206) - before >= 2, net.gateway.gateway_metrics.responses
        out = net.root / f"cut-{name}"
        await run(
            FFMPEG,
            "-loglevel",
            "error",
            "-ss",
            "15",
            "-i",
            net.url + "t.com/" + name,
            "-t",
            "2",
            "-c",
            "copy",
            str(out),
        )
        cut = await probe(out)
        assert abs(duration(cut) - 2.0) < 0.3, (name, cut)
        assert stream_types(cut) == ["audio", "video"], (name, cut)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Browser]:
    """Debian's Chromium, headless, driven by playwright."""
    api = pytest.importorskip("playwright.async_api", reason="needs playwright (dev extra)")
    async with api.async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield chromium
        finally:
            await chromium.close()


async def page_promise(page: Page, script: str, arg: object = None) -> Any:
    """The value of a script returning a promise, failing after 20 s."""
    return await asyncio.wait_for(page.evaluate(script, arg), 20)


@needs_chromium
async def test_chromium_plays_and_seeks(videos: Net, browser: Browser) -> None:
    """Headless Chromium loads a page from the gateway whose <video> plays the MP4 with its
    index at the end: it seeks to 25 s, gets ``seeked`` there, and playback moves on."""
    net = videos
    before = responses(net.gateway, 206)
    page = await browser.new_page()
    try:
        # (the browser aborts its own requests when it seeks: only statuses are checked)
        statuses: list[int] = []
        page.on("response", lambda r: statuses.append(r.status))
        loaded = await page.goto(net.url + "t.com/player.html")
        assert loaded is not None and loaded.status == 200
        await page.wait_for_function(
            "() => { const v = document.getElementById('v');"
            " return v.readyState >= 1 || v.error !== null; }",
            timeout=20_000,
        )
        state = await page.evaluate(
            "() => { const v = document.getElementById('v');"
            " return [v.error && v.error.message, v.duration]; }"
        )
        assert state[0] is None, state
        assert abs(state[1] - 30.0) < 0.2, state
        seeked = await page_promise(
            page,
            """() => new Promise((resolve, reject) => {
                const v = document.getElementById('v');
                v.addEventListener('seeked', () => resolve(v.currentTime), {once: true});
                v.addEventListener('error', () => reject(v.error.message), {once: true});
                v.currentTime = 25;
            })""",
        )
        assert seeked >= 25
        # playback advances: a timeupdate past the seek target
        played = await page_promise(
            page,
            """() => new Promise((resolve, reject) => {
                const v = document.getElementById('v');
                v.addEventListener('timeupdate', () => {
                    if (v.currentTime > 25.2) resolve(v.currentTime);
                });
                v.addEventListener('error', () => reject(v.error.message));
                v.play().catch(reject);
            })""",
        )
        assert played > 25.2
        assert statuses and set(statuses) <= {200, 206}, statuses
    finally:
        await page.close()
    # the browser reads media by ranges (from "bytes=0-"; whether a seek takes another
    # request depends on what it buffered already)
    assert responses(net.gateway, 206) > before


@needs_chromium
async def test_chromium_reads_across_origins(videos: Net, browser: Browser) -> None:
    """A page of another origin (localhost, not 127.0.0.1) reads the gateway as the
    browser enforces CORS: a fetch with Range and If-None-Match (preflighted) sees 206,
    Content-Range and ETag; a <video crossorigin> loads; a PUT is never sent."""
    net = videos
    other = net.url.replace("127.0.0.1", "localhost")
    assert other != net.url
    page = await browser.new_page()
    try:
        loaded = await page.goto(other + "t.com/player.html")
        assert loaded is not None and loaded.status == 200
        etag = '"' + (await net.client.resolve("/t.com/fast.mp4")).manifest.hash + '"'
        preflights = responses(net.gateway, 204)
        got = await page_promise(
            page,
            """async (url) => {
                const r = await fetch(url, {headers: {
                    'Range': 'bytes=100-199', 'If-None-Match': '"other"'}});
                const body = await r.arrayBuffer();
                return [r.status, r.headers.get('Content-Range'), r.headers.get('ETag'),
                        body.byteLength];
            }""",
            net.url + "t.com/fast.mp4",
        )
        size = (net.root / "fast.mp4").stat().st_size
        assert got == [206, f"bytes 100-199/{size}", etag, 100]
        duration = await page_promise(
            page,
            """(url) => new Promise((resolve, reject) => {
                const v = document.createElement('video');
                v.crossOrigin = 'anonymous';
                v.muted = true;
                v.addEventListener('loadedmetadata', () => resolve(v.duration), {once: true});
                v.addEventListener('error', () => reject(v.error.message), {once: true});
                v.src = url;
                document.body.appendChild(v);
            })""",
            net.url + "t.com/fast.mp4",
        )
        assert abs(duration - 30.0) < 0.2
        # If-None-Match is no simple header: the browser asked first (OPTIONS, 204)
        assert responses(net.gateway, 204) > preflights
        refused = await page_promise(
            page,
            """async (url) => {
                try { await fetch(url, {method: 'PUT', body: 'x'}); return 'sent'; }
                catch (e) { return e.name; }
            }""",
            net.url + "t.com/fast.mp4",
        )
        # the preflight allows GET, HEAD and OPTIONS only: the browser never sends the PUT
        assert refused == "TypeError"
    finally:
        await page.close()


async def hang_up_after(url: str, path: str, limit: int) -> int:
    """GET ``path`` on a raw socket, read ``limit`` body bytes (or a few more), then reset
    the connection; how many body bytes were read."""
    host, port = url.removeprefix("http://").rstrip("/").rsplit(":", 1)
    sock = socket.socket()
    # a small receive buffer: what the kernel takes for the client beyond what it read
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    got = 0
    while got < limit:
        chunk = await reader.read(64 * 1024)
        assert chunk, f"connection closed after {got} bytes"
        got += len(chunk)
    # linger 0: close() sends a reset, as a client that goes away does
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
    return got


async def test_client_gone_stops_the_fetch(net: Net) -> None:
    """A client that hangs up after 1 MiB of a 64 MiB object: once the gateway has no
    request in flight, its fetch took from holders no more than its stream window and
    what the sockets held, far from the whole object."""
    src = net.root / "big.bin"
    write_random(src, BIG)
    await net.client.put(src, "/t.com/big.bin", segment_size=MiB, replicas=1)
    src.unlink()
    gw = net.gateway.gateway_metrics
    holders = [p.service for p in net.peers if p.service is not None]
    received, served = gw.received_bytes, sum(s.served_bytes for s in holders)
    got = await hang_up_after(net.url, "/t.com/big.bin", MiB)
    assert got >= MiB
    await wait_for(lambda: gw.in_flight == 0, timeout=20)
    # the stream's window, and what the server's and client's socket buffers took
    bound = BODY_BUFFER + 8 * MiB
    assert gw.received_bytes - received <= bound, (gw.received_bytes - received, bound)
    assert sum(s.served_bytes for s in holders) - served <= bound
    assert bound < BIG // 2


@dataclass
class Reply:
    code: int
    headers: dict[str, str]
    body: bytes


async def curl(*args: str) -> Reply:
    """curl ``-s -i``: the status, headers (lower-case names) and body of the reply."""
    assert CURL is not None
    out = await run(CURL, "-s", "-i", *args)
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


@needs_curl
async def test_if_range_of_a_replaced_version_gets_the_new_whole_body(net: Net) -> None:
    """A new version published between two requests: a range asked with the old ETag in
    If-Range is answered 200 with the whole new body; with the new ETag, 206."""
    src = net.root / "news.bin"
    old, new = os.urandom(100_000), os.urandom(120_000)
    src.write_bytes(old)
    await net.client.put(src, "/t.com/news.bin", segment_size=VIDEO_SEGMENT, replicas=1)
    url = net.url + "t.com/news.bin"
    first = await curl(url)
    assert first.code == 200 and first.body == old
    etag = first.headers["etag"]
    src.write_bytes(new)
    await net.client.put(
        src, "/t.com/news.bin", segment_size=VIDEO_SEGMENT, replicas=1, update=True
    )
    stale = await curl("-H", "Range: bytes=1000-1999", "-H", f"If-Range: {etag}", url)
    assert stale.code == 200 and stale.body == new
    assert stale.headers["content-length"] == str(len(new))
    assert stale.headers["etag"] != etag
    fresh = await curl(
        "-H", "Range: bytes=1000-1999", "-H", f"If-Range: {stale.headers['etag']}", url
    )
    assert fresh.code == 206 and fresh.body == new[1000:2000]


async def start_peer(data: Path, *extra: str) -> tuple[asyncio.subprocess.Process, dict[str, str]]:
    """A ``difs-peer join`` process; once it printed its ready line, that line's fields."""
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "difs-peer"),
        "join",
        "--data",
        str(data),
        *extra,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    line = (await proc.stdout.readline()).decode()
    if not line.startswith("peer ready"):
        proc.kill()
        await proc.wait()
        raise AssertionError(f"peer did not start: {line!r}")
    return proc, dict(part.split("=", 1) for part in line.split()[2:])


def rss_mb(pid: int, field: str = "VmRSS") -> float:
    """A field of /proc/PID/status in MB (VmRSS: resident now; VmHWM: its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} for pid {pid}")


@needs_curl
async def test_slow_curl_keeps_the_serving_peer_small(tmp_path: Path) -> None:
    """curl --limit-rate 1M reading a 64 MiB object from a difs-peer process's gateway
    (its holder another process): the serving peer's resident memory stays bounded."""
    assert CURL is not None
    holder, seed = await start_peer(tmp_path / "holder", "--http", "off")
    procs = [holder]
    slow: asyncio.subprocess.Process | None = None
    try:
        gateway, fields = await start_peer(
            tmp_path / "gw",
            "--bootstrap",
            seed["address"],
            "--capacity",
            "0",
            "--http",
            "127.0.0.1:0",
        )
        procs.append(gateway)
        host, port = seed["address"].rsplit(":", 1)
        src = tmp_path / "slow.bin"
        write_random(src, BIG)
        token = read_token_file(tmp_path / "holder" / "control.token")
        async with Client((host, int(port)), token=token, publisher=Identity.generate()) as c:
            await c.put(src, "/t.com/slow.bin", segment_size=MiB, replicas=1)
        out = tmp_path / "out"
        slow = await asyncio.create_subprocess_exec(
            CURL, "-s", "--limit-rate", "1M", "-o", str(out), fields["http"] + "t.com/slow.bin"
        )
        samples: list[float] = []

        def served_a_while() -> bool:
            samples.append(rss_mb(gateway.pid))
            # 3 MiB at 1 MB/s: long after the fetch filled its window and waits on curl
            return out.exists() and out.stat().st_size >= 3 * MiB

        await wait_for(served_a_while, timeout=30, step=0.1)
        assert slow.returncode is None  # still reading: the peer was serving throughout
        peak = rss_mb(gateway.pid, "VmHWM")
        assert max(samples) < RSS_LIMIT_MB, samples
        assert peak < RSS_LIMIT_MB, peak
    finally:
        if slow is not None and slow.returncode is None:
            slow.kill()
            await slow.wait()
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()
