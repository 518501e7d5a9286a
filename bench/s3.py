"""S3 benchmark: boto3 against ``difs put`` / ``difs get``, and ListObjectsV2 of 10,000 keys.

Run with ``python -m bench.s3``. A network of ``DIFS_BENCH_S3_PEERS`` (default 3) peer
processes on 127.0.0.1, the first serving the S3 API (``--s3``), with one access key whose
publisher key is the one ``difs`` uses (``difs s3-key create --identity``), so both publish
under the same bucket (a claimed prefix).

- A file of ``DIFS_BENCH_S3_MIB`` MiB (default 256) is uploaded with boto3's
  ``upload_file`` (its default transfer: 8 MiB parts, 10 threads; then again as one
  PutObject, for comparison) and with ``difs put``,
  then read back with ``download_file`` and ``difs get``; whole-command wall times (the
  ``difs`` commands as processes, boto3 calls in this process), each once. The ratio is
  difs time / S3 time: 1.0 means S3 is as fast as the native commands; the target is 0.8.
  The seconds from boto3 sending CompleteMultipartUpload to its answer are printed apart
  (the publish of the stored parts: placement's copies pushed from the serving peer).
- ``DIFS_BENCH_S3_KEYS`` keys (default 10,000; 0 skips the listing) are laid out in the
  bucket as child entries signed here and stored through the DHT (as bench/listing.py
  does: an S3 PutObject per key would time the uploads, not the listing), then listed
  with ListObjectsV2 in pages of 1,000: seconds, and UDP datagrams sent and received by
  all peers during the listing.

Prints the figures and writes ``bench/results/s3.json``.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.listing import sign_layout, traffic
from bench.peers import parse_address, start_peer_process, stop_processes, token_of, write_results
from difs_p2p.client import Client
from difs_p2p.identity import load_or_create

MiB = 1 << 20
BIN = Path(sys.executable).parent
TARGET = 0.8


def difs(*args: str, env: dict[str, str]) -> float:
    """Run a ``difs`` command; its wall time in seconds (it must succeed)."""
    started = time.perf_counter()
    out = subprocess.run(
        [str(BIN / "difs"), *args], capture_output=True, text=True, env=env, check=False
    )
    took = time.perf_counter() - started
    if out.returncode != 0:
        raise SystemExit(f"difs {' '.join(args)} failed: {out.stderr}")
    return took


def timed(fn: Any, *args: Any, **kwargs: Any) -> float:
    started = time.perf_counter()
    fn(*args, **kwargs)
    return time.perf_counter() - started


def cpu_seconds(pids: list[int]) -> list[float]:
    """CPU seconds (user + system) used so far by each process of ``pids``, then by this
    process and its finished children (the ``difs`` commands) together."""
    tick = os.sysconf("SC_CLK_TCK")
    out = []
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out.append((int(fields[11]) + int(fields[12])) / tick)  # utime, stime
    t = os.times()
    return [*out, t.user + t.system + t.children_user + t.children_system]


class Cpu:
    """Wall and CPU seconds of one step: CPU per peer process and of the client side."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.cpu: dict[str, list[float]] = {}

    def measure(self, label: str, fn: Any, *args: Any, **kwargs: Any) -> float:
        before = cpu_seconds(self.pids)
        took = timed(fn, *args, **kwargs)
        after = cpu_seconds(self.pids)
        self.cpu[label] = [round(b - a, 2) for a, b in zip(before, after, strict=True)]
        return took

    def total(self, label: str) -> float:
        return sum(self.cpu[label])


def same_file(a: Path, b: Path) -> bool:
    with a.open("rb") as fa, b.open("rb") as fb:
        while True:
            x, y = fa.read(MiB), fb.read(MiB)
            if x != y:
                return False
            if not x:
                return True


async def store_keys(address: tuple[str, int], shards: list[tuple[bytes, list[bytes]]]) -> float:
    """Store the signed child entries through the S3 peer, 8 connections at once; seconds."""
    queue: asyncio.Queue[tuple[bytes, list[bytes]]] = asyncio.Queue()
    for shard in shards:
        queue.put_nowait(shard)
    writers = [Client(address, token=token_of(address)) for _ in range(8)]

    async def writer(client: Client) -> None:
        while not queue.empty():
            key, raws = queue.get_nowait()
            await client.add_children(key, raws)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(writer(c) for c in writers))
    finally:
        for c in writers:
            await c.close()
    return time.perf_counter() - started


def list_keys(
    s3: Any, bucket: str, owner: Any, addresses: list[tuple[str, int]], n_keys: int
) -> dict[str, Any]:
    """Lay out ``n_keys`` keys and list them with ListObjectsV2; the figures."""
    children = [f"key-{i:06d}.dat" for i in range(n_keys)]
    shards = sign_layout(owner, f"/{bucket}/keys", children)
    store_s = asyncio.run(store_keys(addresses[0], shards))
    print(f"{n_keys} keys stored as {len(shards)} shards of child entries in {store_s:.1f} s")
    sent0, received0 = asyncio.run(traffic(addresses))
    started = time.perf_counter()
    pages: list[dict[str, Any]] = []
    page_s: list[float] = []
    for page in s3.get_paginator("list_objects_v2").paginate(
        Bucket=bucket, Prefix="keys/", PaginationConfig={"PageSize": 1000}
    ):
        pages.append(page)
        page_s.append(time.perf_counter() - started - sum(page_s))
    list_s = time.perf_counter() - started
    sent1, received1 = asyncio.run(traffic(addresses))
    listed = [o["Key"] for p in pages for o in p.get("Contents", [])]
    complete = listed == [f"keys/{c}" for c in children]
    print(
        f"ListObjectsV2 of {len(listed)} keys in {len(pages)} pages: {list_s:.2f} s "
        f"({len(listed) / list_s:.0f} keys/s); complete and in order: {complete}; "
        f"datagrams sent {sent1 - sent0}, received {received1 - received0}; seconds per "
        f"page: {', '.join(f'{t:.2f}' for t in page_s)}"
    )
    return {
        "keys_store_s": round(store_s, 2),
        "list_pages": len(pages),
        "list_s": round(list_s, 3),
        "list_page_s": [round(t, 3) for t in page_s],
        "list_datagrams_sent": sent1 - sent0,
        "list_datagrams_received": received1 - received0,
        "list_complete_in_order": complete,
    }


def run(size_mib: int, peers: int, n_keys: int, tmp: Path) -> dict[str, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from botocore.config import Config

    env = dict(os.environ, DIFS_HOME=str(tmp / "home"))
    env["DIFS_TOKEN_FILE"] = str(tmp / "p0" / "control.token")
    extra = ("--capacity", "64GiB", "--repair-interval", "3600", "--http", "off")
    procs: list[subprocess.Popen[str]] = []
    try:
        first, seed = start_peer_process(tmp / "p0", None, "--s3", "127.0.0.1:0", *extra)
        procs.append(first)
        addresses = [parse_address(seed)]
        for i in range(1, peers):
            proc, address = start_peer_process(tmp / f"p{i}", seed, *extra)
            procs.append(proc)
            addresses.append(parse_address(address))
        url = (tmp / "p0" / "s3").read_text().strip()
        url = url if "://" in url else f"http://{url}"
        difs("key", "new", env=env)
        owner = load_or_create(tmp / "home" / "publisher.key")  # the key `difs key new` made
        keyfile = str(tmp / "home" / "publisher.key")
        made = subprocess.run(
            [str(BIN / "difs"), "s3-key", "create", "--data", str(tmp / "p0"), "--identity",
             keyfile, "--json"],
            capture_output=True, text=True, env=env, check=True,
        )  # fmt: skip
        key = json.loads(made.stdout)
        s3 = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id=key["access_key"],
            aws_secret_access_key=key.get("secret") or key["secret_key"],
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}),
        )
        bucket = "bench-s3"
        s3.create_bucket(Bucket=bucket)

        src = tmp / "object.bin"
        with src.open("wb") as f:
            for _ in range(size_mib):
                f.write(os.urandom(MiB))
        marks: dict[str, float] = {}
        s3.meta.events.register(
            "before-call.s3.CompleteMultipartUpload",
            lambda **_: marks.__setitem__("complete", time.perf_counter()),
        )
        cpu = Cpu([p.pid for p in procs])
        started = time.perf_counter()
        s3_put = cpu.measure("s3_put", s3.upload_file, str(src), bucket, "s3.bin")
        s3_complete = started + s3_put - marks.get("complete", started + s3_put)
        # the same as one PutObject (no multipart): tells staging the parts from the rest
        single = TransferConfig(multipart_threshold=size_mib * MiB + 1)
        s3_single = timed(s3.upload_file, str(src), bucket, "single.bin", Config=single)
        difs_put = cpu.measure(
            "difs_put", difs, "put", str(src), f"/{bucket}/difs.bin", "--peer", seed, env=env
        )
        s3_get = timed(s3.download_file, bucket, "s3.bin", str(tmp / "s3.out"))
        difs_get = difs("get", f"/{bucket}/difs.bin", "-o", str(tmp / "difs.out"), "--peer",
                        seed, env=env)  # fmt: skip
        intact = same_file(src, tmp / "s3.out") and same_file(src, tmp / "difs.out")
        for path in (src, tmp / "s3.out", tmp / "difs.out"):
            path.unlink()
        put_ratio, get_ratio = difs_put / s3_put, difs_get / s3_get
        print(
            f"{size_mib} MiB: upload boto3 {s3_put:.2f} s, difs put {difs_put:.2f} s "
            f"(ratio {put_ratio:.2f}, target >= {TARGET}; CompleteMultipartUpload "
            f"{s3_complete:.2f} s of it; as one PutObject {s3_single:.2f} s, "
            f"ratio {difs_put / s3_single:.2f}); download boto3 {s3_get:.2f} s, "
            f"difs get {difs_get:.2f} s (ratio {get_ratio:.2f}); bytes intact: {intact}"
        )
        cores = os.cpu_count() or 1
        floor = cpu.total("s3_put") / cores
        print(
            f"CPU seconds (peers, then the client side: boto3 or the difs command): "
            f"boto3 upload_file {cpu.total('s3_put'):.2f} {cpu.cpu['s3_put']}, "
            f"difs put {cpu.total('difs_put'):.2f} {cpu.cpu['difs_put']}; on {cores} cores "
            f"upload_file cannot take less than {floor:.2f} s, which bounds the ratio at "
            f"{difs_put / floor:.2f}"
        )

        listing: dict[str, Any] = {"keys": n_keys}
        if n_keys:
            listing.update(list_keys(s3, bucket, owner, addresses, n_keys))
    finally:
        stop_processes(procs)
    return {
        "size_mib": size_mib,
        "peers": peers,
        "upload_boto3_s": round(s3_put, 2),
        "upload_difs_s": round(difs_put, 2),
        "upload_ratio": round(put_ratio, 2),
        "upload_complete_s": round(s3_complete, 2),
        "upload_single_put_s": round(s3_single, 2),
        "upload_boto3_cpu_s": cpu.cpu["s3_put"],
        "upload_difs_cpu_s": cpu.cpu["difs_put"],
        "upload_single_put_ratio": round(difs_put / s3_single, 2),
        "download_boto3_s": round(s3_get, 2),
        "download_difs_s": round(difs_get, 2),
        "download_ratio": round(get_ratio, 2),
        "target_ratio": TARGET,
        "bytes_intact": intact,
        **listing,
    }


def main() -> None:
    size = int(os.environ.get("DIFS_BENCH_S3_MIB", "256"))
    peers = int(os.environ.get("DIFS_BENCH_S3_PEERS", "3"))
    keys = int(os.environ.get("DIFS_BENCH_S3_KEYS", "10000"))
    with tempfile.TemporaryDirectory(prefix="difs-bench-s3-") as tmp:
        result = run(size, peers, keys, Path(tmp))
    print(f"wrote {write_results('s3', result)}")
    if not (result["bytes_intact"] and result.get("list_complete_in_order", True)):
        sys.exit(1)


if __name__ == "__main__":
    main()
