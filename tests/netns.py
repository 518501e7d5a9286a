"""Multi-host tests in Linux network namespaces: hosts h1..hN on one bridge.

``Net`` builds a bridge and N namespaces, each with a veth pair to the bridge, IPv4
10.77.0.i/24 and IPv6 fd77::i/64 (``nodad``: usable at once), loopback up. Every name
starts with ``dnt<pid in hex>-<n>``, so that parallel runs (other processes, other tests)
never collide, and a later run removes what a killed one left (``sweep_stale``: the
names whose pid no longer runs). ``Net.close`` kills and reaps every process started in
a namespace, then deletes every namespace, veth and bridge it created, whatever happened
to the test. Helpers run real ``difs-peer join`` and ``difs`` processes inside a host,
cut and restore a host's link, add addresses, and put a host behind a NAT router
(nftables DNAT + SNAT in a router namespace).

Needs root and ``ip netns`` (iproute2); NAT needs ``nft`` (nftables). ``netns_missing``
says why a test cannot run here, for ``pytest.skip``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

# The console scripts of the Python running the tests (difs, difs-peer).
BIN = Path(sys.executable).parent
PREFIX = "dnt"
_NAME_RE = re.compile(rf"^{PREFIX}([0-9a-f]+)-")
_counter = 0

SUBNET4 = "10.77.0"
SUBNET6 = "fd77::"
# Behind a NAT router: the private side (router .1, hosts .2 up).
PRIVATE4 = "10.78.0"
# How long a peer process may take to print ``peer ready`` (node-ID work, bootstrap).
READY_TIMEOUT = 30.0


def sh(*args: str, check: bool = True, input: str | None = None) -> str:
    """Run one command (no shell); its stdout. Failing commands raise with their stderr."""
    proc = subprocess.run(args, capture_output=True, text=True, input=input, timeout=30)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def netns_missing() -> str | None:
    """Why namespace tests cannot run here (None if they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "no `ip` command (install iproute2)"
    try:
        sh("ip", "netns", "list")
    except (RuntimeError, OSError) as exc:
        return f"`ip netns` does not work here: {exc}"
    return None


def nft_missing() -> str | None:
    """Why NAT emulation cannot run here (None if it can)."""
    return None if shutil.which("nft") else "no `nft` command (install nftables)"


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner(name: str) -> int | None:
    match = _NAME_RE.match(name)
    return int(match.group(1), 16) if match else None


def _kill_in_namespace(ns: str) -> None:
    """SIGKILL every process still inside namespace ``ns`` (and reap our children)."""
    for text in sh("ip", "netns", "pids", ns, check=False).split():
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(text), signal.SIGKILL)
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0] > 0:
            pass


def sweep_stale() -> list[str]:
    """Delete the namespaces and links of runs whose process is gone; their names."""
    removed = []
    for line in sh("ip", "netns", "list", check=False).splitlines():
        ns = line.split()[0] if line.strip() else ""
        pid = _owner(ns)
        if pid is not None and not _pid_alive(pid):
            _kill_in_namespace(ns)
            sh("ip", "netns", "del", ns, check=False)
            removed.append(ns)
    for line in sh("ip", "-o", "link", "show", check=False).splitlines():
        parts = line.split(":", 2)
        if len(parts) < 2:
            continue
        link = parts[1].strip().split("@", 1)[0]
        pid = _owner(link)
        if pid is not None and not _pid_alive(pid):
            sh("ip", "link", "del", link, check=False)
            removed.append(link)
    return removed


@dataclass
class PeerProc:
    """A ``difs-peer join`` process in a host: its address as it printed it."""

    host: Host
    proc: subprocess.Popen[str]
    home: Path
    address: str = ""
    node_id: str = ""
    # where a client in the same host reaches it, if not at its printed address (NAT)
    local: str = ""

    @property
    def data(self) -> Path:
        return self.home / "peer"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def kill(self) -> None:
        """kill -9, reaped."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait (kill -9 after ``timeout``); the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.wait()

    def difs(
        self, *args: str, check: bool = True, timeout: float = 60.0, at: str | None = None
    ) -> str:
        """A ``difs`` command through this peer (at its printed address, or ``at``), run
        inside its host as its operator; its stdout."""
        return self.host.difs(
            *args,
            "--peer",
            at or self.local or self.address,
            home=self.home,
            check=check,
            timeout=timeout,
        )

    def status(self) -> dict[str, Any]:
        """``difs-peer status --json`` of this peer, asked inside its host."""
        out = self.host.run(
            str(BIN / "difs-peer"),
            "status",
            "--json",
            "--peer",
            self.local or self.address,
            "--token-file",
            str(self.data / "control.token"),
            env=self.host.env(self.home),
        ).stdout
        result: dict[str, Any] = json.loads(out)
        return result


@dataclass
class Host:
    """One namespace: ``ns`` its name, ``veth`` the bridge side of its link."""

    net: Net
    index: int
    ns: str
    veth: str
    ipv4: str
    ipv6: str
    extra: list[str] = field(default_factory=list)

    def exec_args(self, *args: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *args]

    def run(
        self,
        *args: str,
        check: bool = True,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside this host."""
        proc = subprocess.run(
            self.exec_args(*args), capture_output=True, text=True, timeout=timeout, env=env
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"in {self.name}: {' '.join(args)}: exit {proc.returncode}\n"
                f"stdout: {proc.stdout}\nstderr: {proc.stderr}"
            )
        return proc

    def popen(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        stderr: int | IO[str] | None = None,
        text: bool = True,
    ) -> subprocess.Popen[Any]:
        """Start a command inside this host, stdout piped; killed and reaped at teardown."""
        proc = subprocess.Popen(
            self.exec_args(*args), text=text, env=env, stdout=subprocess.PIPE, stderr=stderr
        )
        self.net.procs.append(proc)
        return proc

    @property
    def name(self) -> str:
        return f"h{self.index}"

    def env(self, home: Path) -> dict[str, str]:
        """The environment of a command here: DIFS_HOME ``home``, and the control token of
        the peer kept there, if any (``difs`` commands act as that peer's operator)."""
        env = {**os.environ, "DIFS_HOME": str(home)}
        token = home / "peer" / "control.token"
        if token.exists():
            env["DIFS_TOKEN_FILE"] = str(token)
        return env

    def difs(
        self, *args: str, home: Path | None = None, check: bool = True, timeout: float = 60.0
    ) -> str:
        """``difs ARGS`` inside this host (DIFS_HOME ``home``, default the host's own)."""
        home = home or self.net.root / self.name
        return self.run(
            str(BIN / "difs"), *args, check=check, timeout=timeout, env=self.env(home)
        ).stdout

    def start_peer(self, *args: str, home: Path | None = None) -> PeerProc:
        """Start ``difs-peer join ARGS`` here (data in HOME/peer, HOME by default a new
        directory per peer); then wait for it with ``ready``."""
        if home is None:
            home = self.net.root / f"{self.name}-{sum(p.host is self for p in self.net.peers)}"
        home.mkdir(parents=True, exist_ok=True)
        with (home / "peer.log").open("a") as log:
            proc = self.popen(
                str(BIN / "difs-peer"),
                "join",
                "--data",
                str(home / "peer"),
                *args,
                env=self.env(home),
                stderr=log,
            )
        peer = PeerProc(self, proc, home)
        self.net.peers.append(peer)
        return peer

    def cut(self, drop: bool = False) -> None:
        """Cut this host off: its link goes down on the bridge side (the host sees no
        carrier), or with ``drop`` an nftables rule in the host drops every packet on its
        link while the link stays up (a partition further away). Either way every packet
        to or from it is lost."""
        if drop:
            rules = f"""
table inet {PREFIX}cut {{
    chain input {{ type filter hook input priority 0; iifname "eth0" drop; }}
    chain output {{ type filter hook output priority 0; oifname "eth0" drop; }}
}}
"""
            sh(*self.exec_args("nft", "-f", "-"), input=rules)
        else:
            sh("ip", "link", "set", self.veth, "down")

    def restore(self) -> None:
        """Undo ``cut``: the link up, the drop rule (if any) gone."""
        sh("ip", "link", "set", self.veth, "up")
        sh(*self.exec_args("nft", "delete", "table", "inet", f"{PREFIX}cut"), check=False)

    def reaches(self, address: str, port: int = 9, timeout: float = 1.0) -> bool:
        """Whether a TCP connection from here to ``address`` gets an answer (a refusal
        counts: nothing listens on ``port``) within ``timeout`` seconds."""
        family = "AF_INET6" if ":" in address else "AF_INET"
        code = (
            "import errno, socket\n"
            f"s = socket.socket(socket.{family})\n"
            f"s.settimeout({timeout})\n"
            f"e = s.connect_ex(({address!r}, {port}))\n"
            "raise SystemExit(0 if e in (0, errno.ECONNREFUSED) else 1)\n"
        )
        return self.run(sys.executable, "-c", code, check=False).returncode == 0

    def add_address(self, index: int) -> tuple[str, str]:
        """Give this host a second address pair, 10.77.0.INDEX and fd77::INDEX."""
        v4, v6 = f"{SUBNET4}.{index}", f"{SUBNET6}{index:x}"
        sh(*self.exec_args("ip", "addr", "add", f"{v4}/24", "dev", "eth0"))
        sh(*self.exec_args("ip", "-6", "addr", "add", f"{v6}/64", "dev", "eth0", "nodad"))
        self.extra += [v4, v6]
        return v4, v6


def ready(peer: PeerProc, timeout: float = READY_TIMEOUT) -> PeerProc:
    """Wait until ``peer`` printed ``peer ready``; fill in its address and ID."""
    stdout = peer.proc.stdout
    assert stdout is not None
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([stdout], [], [], left)[0]:
            peer.kill()
            raise AssertionError(f"{peer.host.name}: no `peer ready` within {timeout} s")
        line = stdout.readline()
        if not line or line.startswith("peer ready"):
            break
    if not line:
        peer.kill()
        err = (peer.home / "peer.log").read_text()
        raise AssertionError(f"{peer.host.name}: peer exited before ready: {err}")
    fields = dict(part.split("=", 1) for part in line.split()[2:])
    peer.address, peer.node_id = fields["address"], fields["id"]
    return peer


class Net:
    """A bridge and hosts h1..hN; use as a context manager (``close`` at the end)."""

    def __init__(self, root: Path, hosts: int = 5) -> None:
        global _counter
        _counter += 1
        self.root = root
        self.tag = f"{PREFIX}{os.getpid():x}-{_counter}"
        self.bridge = f"{self.tag}br"
        self.hosts: list[Host] = []
        self.namespaces: list[str] = []
        self.links: list[str] = []
        self.procs: list[subprocess.Popen[Any]] = []
        self.peers: list[PeerProc] = []
        # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so that close() still runs
        self._sigterm: Any = None
        if threading.current_thread() is threading.main_thread():
            self._sigterm = signal.signal(signal.SIGTERM, _interrupt)
        sweep_stale()
        try:
            sh(
                "ip",
                "link",
                "add",
                self.bridge,
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            )
            self.links.append(self.bridge)
            sh("ip", "link", "set", self.bridge, "up")
            for i in range(1, hosts + 1):
                self.hosts.append(self._host(i))
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> Net:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __getitem__(self, name: str) -> Host:
        """``net["h3"]``: host 3."""
        return self.hosts[int(name.removeprefix("h")) - 1]

    def _namespace(self, name: str) -> str:
        ns = f"{self.tag}{name}"
        sh("ip", "netns", "add", ns)
        self.namespaces.append(ns)
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        return ns

    def _plug(self, ns: str, veth: str, inside: str = "eth0") -> None:
        """A veth pair: ``veth`` on the bridge, ``inside`` in namespace ``ns``, both up."""
        sh("ip", "link", "add", veth, "type", "veth", "peer", "name", inside, "netns", ns)
        self.links.append(veth)
        sh("ip", "link", "set", veth, "master", self.bridge)
        sh("ip", "link", "set", veth, "up")
        sh("ip", "netns", "exec", ns, "ip", "link", "set", inside, "up")

    def _host(self, i: int) -> Host:
        ns = self._namespace(f"h{i}")
        veth = f"{self.tag}v{i}"
        self._plug(ns, veth)
        host = Host(self, i, ns, veth, f"{SUBNET4}.{i}", f"{SUBNET6}{i:x}")
        sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{host.ipv4}/24", "dev", "eth0")
        sh(
            "ip",
            "netns",
            "exec",
            ns,
            "ip",
            "-6",
            "addr",
            "add",
            f"{host.ipv6}/64",
            "dev",
            "eth0",
            "nodad",
        )
        return host

    def start_peers(self, *specs: tuple[Host, list[str]]) -> list[PeerProc]:
        """Start several peers at once (each ``(host, join options)``), wait for all."""
        started = [host.start_peer(*args) for host, args in specs]
        return [ready(p) for p in started]

    def nat_host(self, public_index: int = 100, port: int = 4000) -> tuple[Host, Host]:
        """A host behind a NAT router: (router, host). The router has 10.77.0.PUBLIC on the
        bridge and forwards UDP+TCP ``port`` to the host (DNAT); what the host sends out
        leaves with the router's address (SNAT). The host has 10.78.0.2, default route via
        the router's 10.78.0.1."""
        router_ns = self._namespace("r")
        self._plug(router_ns, f"{self.tag}vr")
        public = f"{SUBNET4}.{public_index}"
        router = Host(self, public_index, router_ns, f"{self.tag}vr", public, "")
        inner_ns = self._namespace("n")
        sh(
            "ip",
            "link",
            "add",
            f"{self.tag}vn",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            inner_ns,
        )
        self.links.append(f"{self.tag}vn")
        sh("ip", "link", "set", f"{self.tag}vn", "netns", router_ns)
        r = router.exec_args
        sh(*r("ip", "link", "set", f"{self.tag}vn", "name", "lan0"))
        sh(*r("ip", "addr", "add", f"{public}/24", "dev", "eth0"))
        sh(*r("ip", "addr", "add", f"{PRIVATE4}.1/24", "dev", "lan0"))
        sh(*r("ip", "link", "set", "lan0", "up"))
        sh(*r("sysctl", "-q", "-w", "net.ipv4.ip_forward=1"))
        inner = Host(self, 200, inner_ns, "", f"{PRIVATE4}.2", "")
        sh(*inner.exec_args("ip", "link", "set", "eth0", "up"))
        sh(*inner.exec_args("ip", "addr", "add", f"{PRIVATE4}.2/24", "dev", "eth0"))
        sh(*inner.exec_args("ip", "route", "add", "default", "via", f"{PRIVATE4}.1"))
        rules = f"""
table ip nat {{
    chain prerouting {{
        type nat hook prerouting priority dstnat;
        iifname "eth0" ip daddr {public} udp dport {port} dnat to {PRIVATE4}.2:{port}
        iifname "eth0" ip daddr {public} tcp dport {port} dnat to {PRIVATE4}.2:{port}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat;
        oifname "eth0" ip saddr {PRIVATE4}.0/24 masquerade
    }}
}}
"""
        sh(*r("nft", "-f", "-"), input=rules)
        return router, inner

    def close(self) -> None:
        """Kill and reap every process, delete every namespace and link created here."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
        for proc in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
            for stream in (proc.stdout, proc.stderr):
                if stream is not None:
                    stream.close()
        for ns in reversed(self.namespaces):
            _kill_in_namespace(ns)
            sh("ip", "netns", "del", ns, check=False)
        for link in reversed(self.links):
            # a veth goes with its namespace; what is left (bridge, moved ends) goes here
            sh("ip", "link", "del", link, check=False)
        self.namespaces.clear()
        self.links.clear()
        if self._sigterm is not None:
            signal.signal(signal.SIGTERM, self._sigterm)
            self._sigterm = None


@contextlib.contextmanager
def network(root: Path, hosts: int = 5) -> Iterator[Net]:
    """``Net`` as a context manager."""
    net = Net(root, hosts)
    try:
        yield net
    finally:
        net.close()
