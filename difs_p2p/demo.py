"""``make demo``: a local network of real peer processes, used through the real CLI.

Starts 5 ``difs-peer join`` processes on 127.0.0.1 (the first starts the network, the
others join through it), shows each peer's view of the network, publishes a file through
one peer (after claiming its prefix, so that its names are the demo key's) and fetches it
by name through another, then stops every peer with SIGTERM.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

PEERS = 5
DEMO_PREFIX = "/demo.local/"
DEMO_NAME = DEMO_PREFIX + "hello.bin"
DEMO_SIZE = 64 << 20


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def _start_peer(
    data: Path, bootstrap: str | None, http: str | None
) -> tuple[subprocess.Popen[str], dict[str, str]]:
    """Start one peer (its log in DATA.log); the fields of its ready line."""
    cmd = [_bin("difs-peer"), "join", "--data", str(data), "--capacity", "1GiB"]
    if bootstrap:
        cmd += ["--bootstrap", bootstrap]
    if http is not None:
        cmd += ["--http", http]
    with data.with_suffix(".log").open("w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("peer ready"):
        proc.kill()
        proc.wait()
        log_text = data.with_suffix(".log").read_text()
        raise SystemExit(f"peer failed to start: {line}{log_text}")
    return proc, dict(part.split("=", 1) for part in line.split()[2:])


def _run(args: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, text=True, capture_output=True, check=False, **kwargs)  # type: ignore[call-overload, no-any-return]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="difs-demo-"))
    procs: list[subprocess.Popen[str]] = []
    try:
        print(f"starting {PEERS} peers on 127.0.0.1 (data under {root})")
        # the first peer serves HTTP on 127.0.0.1:8080 (a peer's default), or when that
        # port is taken, the second peer on a free port
        first, ready = _start_peer(root / "peer0", None, None)
        procs.append(first)
        seed = ready["address"]
        gateway = ready.get("http")
        addresses = [seed]
        print(f"  peer0 started a new network at {seed}")
        for i in range(1, PEERS):
            http = "127.0.0.1:0" if i == 1 and gateway is None else "off"
            proc, ready = _start_peer(root / f"peer{i}", seed, http)
            procs.append(proc)
            addresses.append(ready["address"])
            gateway = gateway or ready.get("http")
            print(f"  peer{i} joined through {seed}, listening at {ready['address']}")
        print("\neach peer's view of the network:")
        for i, address in enumerate(addresses):
            token = str(root / f"peer{i}" / "control.token")  # status is for its operator
            out = _run([_bin("difs"), "peers", "--peer", address, "--token-file", token, "--json"])
            if out.returncode != 0:
                print(out.stderr)
                return 1
            status = json.loads(out.stdout)
            print(
                f"  peer{i} {status['node_id'][:16]}... knows {status['routing_table']} "
                f"contacts: " + ", ".join(c["address"] for c in status["contacts"])
            )
        if _publish_and_fetch(root, addresses) != 0:
            return 1
        if gateway is not None and _through_the_gateway(root, gateway) != 0:
            return 1
        return 0
    finally:
        print("\nstopping peers with SIGTERM")
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                code = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait()
            print(f"  peer pid {proc.pid} exited with {code}")
        shutil.rmtree(root, ignore_errors=True)


def _publish_and_fetch(root: Path, addresses: list[str]) -> int:
    """Publish a file through the first peer and fetch it by name through the last."""
    difs = _bin("difs")
    if not _has_command(difs, "put"):
        return 0
    src = root / "hello.bin"
    with src.open("wb") as fh:
        fh.write(os.urandom(DEMO_SIZE))
    env = dict(os.environ, DIFS_HOME=str(root / "publisher"))
    env["DIFS_TOKEN_FILE"] = str(root / "peer0" / "control.token")  # the entry peer's operator
    claim = _run([difs, "claim", DEMO_PREFIX, "--peer", addresses[0]], env=env)
    if claim.returncode != 0:
        print(claim.stderr)
        return 1
    print(f"\n{claim.stdout.strip()}")
    print(f"publishing {src.name} ({DEMO_SIZE >> 20} MiB) as {DEMO_NAME} via {addresses[0]}")
    t0 = time.perf_counter()
    put = _run([difs, "put", str(src), DEMO_NAME, "--peer", addresses[0], "--json"], env=env)
    put_s = time.perf_counter() - t0
    if put.returncode != 0:
        print(put.stderr)
        return 1
    print(f"  published in {put_s:.2f} s ({DEMO_SIZE / put_s / (1 << 20):.0f} MiB/s)")
    stat = _run([difs, "stat", DEMO_NAME, "--peer", addresses[-1], "--json"], env=env)
    if stat.returncode != 0:
        print(stat.stderr)
        return 1
    manifest = json.loads(stat.stdout)
    info = manifest["info"]
    print(
        f"  manifest: version {info['version']}, {info['segment_count']} segments of "
        f"{info['segment_size'] >> 10} KiB in {info['stripes']} ranges, "
        f"integrity root {info['integrity'][:16]}..."
    )
    for r in manifest["ranges"]:
        holders = [
            s["address"]
            for s in manifest["storages"]
            if s["segment"]["start"] <= r["start"] and r["end"] <= s["segment"]["end"]
        ]
        print(
            f"  segments {r['start']:>3}..{r['end']:<3} live on {r['live']}: {', '.join(holders)}"
        )
    out = root / "fetched.bin"
    t0 = time.perf_counter()
    get = _run([difs, "get", DEMO_NAME, "-o", str(out), "--peer", addresses[-1]], env=env)
    get_s = time.perf_counter() - t0
    if get.returncode != 0:
        print(get.stderr)
        return 1
    same = hashlib.sha256(src.read_bytes()).digest() == hashlib.sha256(out.read_bytes()).digest()
    print(
        f"fetched {DEMO_NAME} by name via {addresses[-1]} in {get_s:.2f} s "
        f"({DEMO_SIZE / get_s / (1 << 20):.0f} MiB/s), byte-identical: {same}"
    )
    return 0 if same else 1


def _through_the_gateway(root: Path, gateway: str) -> int:
    """Read the folder and the object back over HTTP, as a browser or curl would; from a
    terminal, leave the network up until Enter so that the addresses can be opened."""
    gateway = gateway.rstrip("/")
    folder = f"{gateway}{DEMO_PREFIX}"
    with urllib.request.urlopen(folder + "?format=json", timeout=30) as reply:
        names = [entry["name"] for entry in json.load(reply)["entries"]]
    request = urllib.request.Request(gateway + DEMO_NAME, headers={"Range": "bytes=0-1023"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        status, body = reply.status, reply.read()
    same = body == (root / "hello.bin").read_bytes()[:1024]
    print(
        f"\nthrough the HTTP gateway {gateway}: the folder {DEMO_PREFIX} lists "
        f"{', '.join(names)}; a range request for the first KiB: {status}, verified: {same}"
    )
    if not same:
        return 1
    if sys.stdin.isatty():
        print(f"\nOpen it in a browser: {folder} (the folder) or {gateway}{DEMO_NAME}")
        print(f"or: curl -r 0-99 {gateway}{DEMO_NAME} | xxd | head")
        try:
            input("The network stays up until you press Enter (or Ctrl-C). ")
        except (EOFError, KeyboardInterrupt):
            print()
    return 0


def _has_command(binary: str, command: str) -> bool:
    return _run([binary, command, "--help"]).returncode == 0


if __name__ == "__main__":
    sys.exit(main())
