"""A storage peer: identity, DHT node, segment store and TCP service in one process.

One port number serves both UDP (the DHT) and TCP (segments and control calls). The data
directory holds everything the peer must keep across restarts::

    DATA/peer.key         Ed25519 private key (hex, mode 0600); the node ID derives from it
    DATA/control.token    the operator's credential: 32 random bytes as hex, mode 0600,
                          created once (see control.py; the CLI reads it)
    DATA/contacts.json    known contacts, rewritten atomically (not while the peer is cut
                          off), used to rejoin after a restart or a partition
    DATA/records.sqlite3  DHT records and holder entries this peer stores for the network
    DATA/holdings.sqlite3 the ranges this peer holds (holdings.py)
    DATA/store/           segments (see store.py)
    DATA/address          HOST:PORT while the peer runs (how the CLI finds its local peer):
                          the advertised address, else (a wildcard bind not yet knowing
                          it) the loopback address of the bound family
    DATA/http             the HTTP gateway's URL while it runs (--http; gateway.py)
    DATA/s3               the S3 API's URL while it runs (--s3; s3api.py)
    DATA/s3keys.sqlite3   the S3 access keys and their buckets (s3keys.py)
    DATA/s3-uploads/      multipart uploads being staged (--s3; s3multipart.py)
    DATA/s3-spool/        S3 bodies being received, published once whole and checked
    DATA/lock             held (flock) while a peer uses the directory

The peer composes its parts at start: the DHT (dht.py) with the holder-entry prover
(holdproof.py), the segment store, its holdings (holdings.py), the replicator that copies
ranges between peers (replicator.py), the maintenance loop (repair.py), upload sessions
and the orphan sweep (uploads.py), the control operations (operations.py) and the TCP
service that answers connections (service.py). It owns every task it starts (a
``TaskSet``); :meth:`Peer.stop` cancels them, closes the sockets, saves the contacts and
removes the address file. With ``PeerConfig.http`` the peer also runs the HTTP gateway
(gateway.py), started once the peer is up and stopped first; with ``PeerConfig.s3``
the S3 API (s3api.py) likewise.

A peer that leaves for good drains first (leaving.py: ``difs-peer leave``, or a signal
with ``--drain``): it takes no new copies, hands its ranges and records to the next
closest peers, and then sets :attr:`Peer.left`, which ends ``difs-peer join``.

The module is longer than most (about 670 lines): it composes every part of a peer, and
starting, stopping and reporting each (the HTTP gateway and the S3 API among them) is a
few lines that belong with the lifecycle they are ordered in.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import IO, Any

from difs_p2p import classgen, control
from difs_p2p.addresses import AddressVotes, format_address, is_ipv6, is_wildcard, sendable_host
from difs_p2p.config import PeerConfig
from difs_p2p.dht import Dht
from difs_p2p.dhtwire import PeerInfo
from difs_p2p.diskcost import DiskCost
from difs_p2p.errors import NetworkError, StorageError, UsageError
from difs_p2p.gateway import Gateway, bind_gateway, loopback_of
from difs_p2p.holdings import Holdings
from difs_p2p.holdproof import HolderProver
from difs_p2p.identity import Identity, NodeId
from difs_p2p.idwork import load_or_create_with_work
from difs_p2p.leaving import Drainer
from difs_p2p.membership import OK
from difs_p2p.metrics import GatewayMetrics, render
from difs_p2p.net import HOST_NETWORK, PeerNetwork, resolve
from difs_p2p.operations import OPERATIONS, Operations
from difs_p2p.recordpolicy import RecordValidator
from difs_p2p.repair import Maintainer
from difs_p2p.replicator import Replicator
from difs_p2p.routing import Contact
from difs_p2p.s3api import S3Server
from difs_p2p.s3keys import KeyStore
from difs_p2p.s3multipart import MultipartStore
from difs_p2p.service import ControlHandler, RateBucket, Service
from difs_p2p.store import SegmentStore
from difs_p2p.tasks import TaskSet
from difs_p2p.transfer import ByteBudget, Connection, Server
from difs_p2p.uploads import Uploads

log = logging.getLogger(__name__)

CONTACTS_VERSION = 1
# How often the contact list is saved while running (it is also saved on stop).
CONTACTS_SAVE_INTERVAL = 60.0
# Contacts kept in contacts.json: enough to rejoin even if most of them are gone.
CONTACTS_SAVED = 64
# The learned address (a wildcard bind without --advertise): contacts asked per check, and
# how often it is checked (every 10 s while unknown, then every 5 min: a changed network
# is followed within minutes, and a check is 8 small datagrams).
LEARN_ASK = 8
LEARN_RETRY = 10.0
LEARN_INTERVAL = 300.0


def _atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def load_contacts(path: Path) -> list[tuple[str, int]]:
    """Saved contacts as addresses; a missing or damaged file gives an empty list."""
    try:
        data = json.loads(path.read_text())
        items = data["contacts"] if data.get("version") == CONTACTS_VERSION else []
        return [(str(c["host"]), int(c["port"])) for c in items][:CONTACTS_SAVED]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return []


class Peer:
    """A storage peer. ``await peer.start()``, then ``await peer.stop()``."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        clock: Callable[[], float] = time.time,
        network: PeerNetwork = HOST_NETWORK,
    ) -> None:
        self.config = config
        self.clock = clock
        # The host's sockets; the simulator passes its relay network.
        self.network = network
        # The address other peers reach us at (set when the DHT socket is open): the
        # advertised host; the bound one (maybe a wildcard) while none is known.
        self.host = config.host
        # The address the sockets are bound to (a wildcard for --listen 0.0.0.0 / ::).
        self.bound: tuple[str, int] = (config.host, 0)
        # Whether the advertised address is known (a wildcard bind without --advertise
        # learns it from what other peers observe).
        self.advertised = False
        # a wildcard bind without --advertise: what other peers observe (AddressVotes)
        self._learning = False
        self._votes = AddressVotes()
        self.data_dir = config.data_dir
        self.identity: Identity | None = None
        self.dht: Dht | None = None
        self.store: SegmentStore | None = None
        self.server: Server | None = None
        self.port = 0
        # the segment service's port (--tcp-port, else the UDP port's number)
        self.tcp_port = 0
        self.started_at = 0.0
        self._lock_file: IO[bytes] | None = None
        self.holdings: Holdings | None = None
        self.maintainer: Maintainer | None = None
        # challenges the holder entries other peers send (holdproof.py)
        self.prover: HolderProver | None = None
        self._replicator: Replicator | None = None
        self._operations: Operations | None = None
        self._drainer: Drainer | None = None
        # the HTTP gateway (--http), while it runs; its socket, bound first thing at start
        self.gateway: Gateway | None = None
        self._http_socket: socket.socket | None = None
        # the S3 API (--s3), while it runs; its socket, bound first thing at start
        self.s3: S3Server | None = None
        self._s3_socket: socket.socket | None = None
        self._tasks = TaskSet("peer")
        self._token: bytes | None = None
        self._uploads = ByteBudget(config.upload_budget)
        self._open_work = RateBucket(
            config.open_work_rate, config.open_work_burst, config.open_work_burst, 0.0
        )
        # The control operations by name (the service consults this table per request);
        # each runs on the operations of the running peer.
        self._controls: dict[str, ControlHandler[Any, Any]] = {
            op: functools.partial(self._control, op) for op in sorted(OPERATIONS)
        }
        # metrics: what the HTTP gateway counts (metrics.py renders it with the figures
        # of the parts), and the running TCP service (its served bytes)
        self.gateway_metrics = GatewayMetrics()
        self.service: Service | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def _prepare_data_dir(self) -> None:
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise StorageError(
                f"data directory {self.data_dir} is not writable: {exc.strerror or exc}"
            ) from None
        lock = (self.data_dir / "lock").open("wb")
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise StorageError(
                f"data directory {self.data_dir} is in use by another peer"
            ) from None
        self._lock_file = lock

    async def start(self) -> None:
        """Open the data directory, bind the port, start serving and join the network."""
        cfg = self.config
        self._prepare_data_dir()
        try:
            # the gateway's address first: a taken --http fails before the peer joins
            self._http_socket = bind_gateway(cfg.http, optional=cfg.http_optional)
            self._s3_socket = bind_gateway(cfg.s3, optional=False)
            # the node-ID puzzle costs ~0.2 s of CPU at the first start: off the loop
            self.identity = await asyncio.to_thread(
                load_or_create_with_work, self.data_dir / "peer.key", cfg.dht.id_difficulty
            )
            self._token = control.load_or_create_token(self.data_dir / "control.token")
            cost = await asyncio.to_thread(DiskCost.of_filesystem, self.data_dir)
            self.store = await asyncio.to_thread(
                functools.partial(SegmentStore, self.data_dir / "store", cfg.capacity, cost=cost)
            )
            tcp, datagrams = await self.network.listen(cfg.host, cfg.port, cfg.tcp_port)
            self.dht = Dht(
                self.identity.node_id,
                RecordValidator(),
                cfg.dht,
                db_path=self.data_dir / "records.sqlite3",
                clock=self.clock,
                identity=self.identity,
            )
            self.prover = HolderProver(
                lambda: self._dht().store,
                self.spawn,
                config=cfg.proof,
                network=self.network,
                wall_clock=self.clock,
                own_key=self.identity.public_key,
            )
            self.dht.entry_gate = self.prover
            contacts_file = self.data_dir / "contacts.json"
            self.dht.saved_contacts = lambda: load_contacts(contacts_file)
            self.port = await self.dht.start(cfg.host, cfg.port, network=datagrams)
            self.tcp_port = cfg.tcp_port or self.port
            self.bound = (self.dht.me.host, self.port)
            await self._advertise()
            # told to contacts in the signed identify info block (dht.py)
            self.dht.info = PeerInfo(self.tcp_port, cfg.zone)
            self.holdings = Holdings(self.data_dir / "holdings.sqlite3")
            service = self._compose(self.identity, self._token, self.store, self.dht, self.holdings)
            self.service = service
            self.server = Server(
                tcp,
                service.serve,
                max_connections=cfg.max_connections,
                io_timeout=cfg.io_timeout,
                max_per_address=cfg.max_connections_per_address,
                limit_loopback=cfg.tcp_limit_loopback,
            )
            self.server.start()
            self.started_at = self.clock()
            await self._join()
            if self._learning:
                await self.learn_address()
                self.spawn(self._learn_loop())
            self._write_address()
            self.spawn(self._save_contacts_loop())
            self.spawn(self._maintainer().run())
            self.spawn(service.uploads.sweep())
            await self._start_gateway()
            await self._start_s3()
        except BaseException:
            await self.stop()
            raise

    async def _advertise(self) -> None:
        """Decide the advertised address: --advertise (a name resolved now), else the
        bound address unless it is a wildcard (then learned later, see AddressVotes)."""
        cfg = self.config
        if cfg.advertise is not None:
            host = (await resolve(*cfg.advertise))[0][0]
            if not sendable_host(host):
                raise UsageError(f"--advertise names {host!r}, which others cannot reach")
            self.host, self.advertised = host, True
            self.tcp_port = cfg.advertise[1] or self.tcp_port
        elif not is_wildcard(self.bound[0]):
            self.host, self.advertised = self.bound[0], True
        else:
            self.host, self._learning = self.bound[0], True
            log.warning(
                "address_unknown listen=%s: no --advertise; the address others reach this"
                " peer at is learned once two peers agree on it (status says when)",
                format_address(*self.bound),
            )
        if self.advertised:
            self._dht().node.ip = self.host

    async def learn_address(self) -> None:
        """Ask up to ``LEARN_ASK`` contacts which address they see us at (``stun``) and
        adopt the one ``AddressVotes`` agrees on (a wildcard bind without --advertise)."""
        dht = self._dht()
        asked = dht.contacts()[:LEARN_ASK]
        seen = await asyncio.gather(*(dht.observed_address(c) for c in asked))
        now = self.clock()
        for contact, host in zip(asked, seen, strict=True):
            if host is not None:
                self._votes.observe(contact.address, host, now)
        winner = self._votes.winner(now)
        if winner is None or (self.advertised and winner == self.host):
            return
        log.warning(
            "address_learned address=%s listen=%s",
            format_address(winner, self.tcp_port),
            format_address(*self.bound),
        )
        self.host, self.advertised = winner, True
        dht.node.ip = winner
        if self._replicator is not None:
            self._replicator.address = self.address
        if self.started_at:
            self._write_address()

    async def _learn_loop(self) -> None:
        """Re-check the learned address: soon while unknown, then every LEARN_INTERVAL."""
        while True:
            await asyncio.sleep(LEARN_INTERVAL if self.advertised else LEARN_RETRY)
            await self.learn_address()

    async def _start_gateway(self) -> None:
        """Serve HTTP on the bound socket through this peer's own TCP service."""
        cfg = self.config
        sock, self._http_socket = self._http_socket, None
        if sock is None:
            return
        gateway = Gateway(
            (loopback_of(self.bound[0]), self.tcp_port or self.port),
            state=lambda: self._dht().network_state().state,
            metrics=self.gateway_metrics,
            render=lambda: render(self),
            io_timeout=cfg.io_timeout,
        )
        await gateway.start(sock)
        self.gateway = gateway
        _atomic_write(self.data_dir / "http", f"{gateway.url}\n".encode())

    async def _start_s3(self) -> None:
        """Serve the S3 API on the bound socket through this peer's own TCP service, as
        its operator (the access keys publish with the control token)."""
        sock, self._s3_socket = self._s3_socket, None
        if sock is None:
            return
        assert self._token is not None
        try:
            keys = await asyncio.to_thread(KeyStore, self.data_dir / "s3keys.sqlite3")
            try:
                uploads = await asyncio.to_thread(
                    MultipartStore,
                    self.data_dir / "s3-uploads",
                    segments=self.store,
                    expire_after=self.config.s3_upload_expiry,
                )
            except BaseException:
                keys.close()
                raise
        except BaseException:
            sock.close()
            raise
        server = S3Server(
            (loopback_of(self.bound[0]), self.tcp_port or self.port),
            token=self._token,
            keys=keys,
            uploads=uploads,
            spool=self.data_dir / "s3-spool",
            io_timeout=self.config.io_timeout,
            keepalive=self.config.s3_keepalive,
        )
        await server.start(sock)
        self.s3 = server
        _atomic_write(self.data_dir / "s3", f"{server.url}\n".encode())

    def _write_address(self) -> None:
        """DATA/address: where a local client reaches this peer (see the module doc)."""
        text = format_address(*self.reach_address)
        _atomic_write(self.data_dir / "address", f"{text}\n".encode())

    @property
    def reach_address(self) -> tuple[str, int]:
        """The advertised address; while it is unknown (a wildcard bind), the loopback
        address of the bound family, where a client on this host reaches the peer."""
        if self.advertised:
            return self.address
        return ("::1" if is_ipv6(self.bound[0]) else "127.0.0.1", self.tcp_port or self.port)

    def _compose(
        self, identity: Identity, token: bytes, store: SegmentStore, dht: Dht, holdings: Holdings
    ) -> Service:
        """Build the parts over the running store, DHT and holdings: the replicator, the
        maintenance loop, upload sessions, the control operations, and the TCP service
        that answers connections with them."""
        cfg = self.config
        replicator = Replicator(
            identity=identity,
            store=store,
            holdings=holdings,
            dht=dht,
            config=cfg,
            address=self.address,
            clock=self.clock,
            network=self.network,
        )
        self._replicator = replicator
        self.maintainer = Maintainer(
            cfg.repair, replicator=replicator, holdings=holdings, dht=dht, clock=self.clock
        )
        uploads = Uploads(store, replicator, cfg.repair.orphan_grace)
        drainer = Drainer(
            cfg,
            replicator=replicator,
            holdings=holdings,
            dht=dht,
            clock=self.clock,
            spawn=self.spawn,
        )
        self._drainer = drainer
        self._operations = Operations(
            cfg,
            identity=identity,
            store=store,
            dht=dht,
            holdings=holdings,
            replicator=replicator,
            maintainer=self.maintainer,
            uploads=uploads,
            network=self.network,
            status=self.status,
            spawn=self.spawn,
            drainer=drainer,
        )
        return Service(
            cfg,
            identity=identity,
            token=token,
            store=store,
            uploads=uploads,
            controls=self._controls,
            budget=self._uploads,
            open_work=self._open_work,
            leaving=lambda: drainer.leaving,
        )

    async def _control(self, op: str, conn: Connection, request: Any) -> Any:
        """Run control operation ``op`` (its typed request) on the running peer's operations."""
        if self._operations is None:
            raise NetworkError("the peer is not running")
        return await self._operations.handlers[op](conn, request)

    async def _join(self) -> None:
        """Bootstrap from --bootstrap addresses (retrying), else from saved contacts."""
        cfg = self.config
        dht = self._dht()
        if cfg.bootstrap:
            # the operator's names resolve here (every address of each), never a peer's
            seeds: list[tuple[str, int]] = []
            for host, port in cfg.bootstrap:
                seeds += await resolve(host, port)
            seeds = list(dict.fromkeys(seeds))
            delay = cfg.bootstrap_backoff
            for attempt in range(1, cfg.bootstrap_attempts + 1):
                if await dht.bootstrap(seeds) > 0:
                    return
                if attempt < cfg.bootstrap_attempts:
                    log.info("bootstrap_retry attempt=%d delay=%.1f", attempt, delay)
                    await asyncio.sleep(delay)
                    delay *= 2
            tried = ", ".join(format_address(h, p) for h, p in cfg.bootstrap)
            raise NetworkError(
                f"bootstrap failed: no answer from {tried} after {cfg.bootstrap_attempts} attempts"
            )
        saved = load_contacts(self.data_dir / "contacts.json")
        if saved:
            found = await dht.bootstrap(saved)
            log.info("rejoin saved=%d contacts=%d", len(saved), found)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task owned by the peer (cancelled by stop)."""
        return self._tasks.spawn(coro)

    async def _save_contacts_loop(self) -> None:
        while True:
            await asyncio.sleep(CONTACTS_SAVE_INTERVAL)
            self.save_contacts()

    def save_contacts(self) -> None:
        if self.dht is None or self.dht.protocol is None:
            return
        contacts = self.dht.neighbors(self.dht.node_id, CONTACTS_SAVED)
        if not contacts or self.dht.network_state().state != OK:
            # a cut-off peer keeps the list it had: it rejoins through it (and restarts)
            return
        data = {
            "version": CONTACTS_VERSION,
            "contacts": [{"id": c.node_id.hex(), "host": c.host, "port": c.port} for c in contacts],
        }
        try:
            _atomic_write(self.data_dir / "contacts.json", json.dumps(data, indent=1).encode())
        except OSError as exc:
            log.warning("contacts_save_failed error=%s", exc)

    async def stop(self) -> None:
        """Stop serving, cancel every task, save contacts and release the data directory."""
        if self.s3 is not None:
            s3, self.s3 = self.s3, None
            await s3.stop()
        if self._s3_socket is not None:
            self._s3_socket.close()
            self._s3_socket = None
        with contextlib.suppress(OSError):
            (self.data_dir / "s3").unlink()
        if self.gateway is not None:
            gateway, self.gateway = self.gateway, None
            await gateway.stop()
        if self._http_socket is not None:
            self._http_socket.close()
            self._http_socket = None
        with contextlib.suppress(OSError):
            (self.data_dir / "http").unlink()
        await self._tasks.close()
        if self.prover is not None:
            self.prover.close()
        if self.server is not None:
            await self.server.stop()
            self.server = None
        self.save_contacts()
        if self.dht is not None:
            await self.dht.stop()
            self.dht = None
        if self.store is not None:
            self.store.close()
            self.store = None
        if self.holdings is not None:
            self.holdings.close()
            self.holdings = None
        self._replicator = None
        self.service = None
        self._operations = None
        self._drainer = None
        with contextlib.suppress(OSError):
            (self.data_dir / "address").unlink()
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- accessors -------------------------------------------------------------------------

    def _dht(self) -> Dht:
        if self.dht is None:
            raise NetworkError("the peer is not running")
        return self.dht

    def _store(self) -> SegmentStore:
        if self.store is None:
            raise NetworkError("the peer is not running")
        return self.store

    @property
    def node_id(self) -> NodeId:
        if self.identity is None:
            raise NetworkError("the peer is not started")
        return self.identity.node_id

    @property
    def control_token(self) -> bytes:
        """The operator's credential (DATA/control.token), for in-process callers."""
        if self._token is None:
            raise NetworkError("the peer is not started")
        return self._token

    @property
    def address(self) -> tuple[str, int]:
        """Where other peers reach the segment service (TCP): the advertised address."""
        return (self.host, self.tcp_port or self.port)

    @property
    def dht_address(self) -> tuple[str, int]:
        """Where other peers reach the DHT (UDP): what --bootstrap takes."""
        return (self.host, self.port)

    @property
    def contact(self) -> Contact:
        return Contact(self.node_id, self.host, self.port, self.tcp_port, self.config.zone)

    def status(self) -> dict[str, Any]:
        """A view of this peer and of the network as it sees it."""
        dht = self._dht()
        store = self._store()
        contacts = dht.contacts()
        records, entries = dht.store.counts()
        return {
            "node_id": self.node_id.hex(),
            "address": format_address(*self.reach_address),
            # real networks: the bound address, and whether the advertised one is known
            "listen": format_address(*self.bound),
            "address_known": self.advertised,
            # the HTTP gateway's URL (--http), None without one
            "http": self.gateway.url if self.gateway is not None else None,
            # the S3 API's URL (--s3), None without one
            "s3": self.s3.url if self.s3 is not None else None,
            "uptime": round(self.clock() - self.started_at, 3),
            "routing_table": len(contacts),
            # verified peers beyond the per-address cap: no routing, still holders (placement)
            "overflow": len(dht.overflow()),
            # ok | thin | isolated, the most contacts held, the rejoin attempts (rejoin)
            **dht.network_state().as_dict(),
            "contacts": [
                {
                    "id": c.node_id.hex(),
                    "address": format_address(c.host, c.port),
                    "tcp_port": c.tcp_port or c.port,
                    "zone": c.zone,
                }
                for c in dht.neighbors(self.node_id, 10)
            ],
            "records": records,
            "entries": entries,
            "storage": {
                "used": store.used,
                "capacity": store.capacity,
                "segments": store.count,
            },
            "connections": self.server.connections if self.server else 0,
            # refused at accept (per-address or total limit), closed to make room
            "connections_refused": self.server.refused if self.server else 0,
            "connections_evicted": self.server.evicted if self.server else 0,
            "holdings": len(self.replicator.holdings.all()),
            "maintenance": self.maintainer.stats.as_dict() if self.maintainer else {},
            "dht": dht.traffic(),
            "drain": self._drainer.report() if self._drainer else {"state": "idle"},
            # proofs of holding this peer asked for (holdproof.py)
            "proofs": classgen.asdict(self.prover.stats) if self.prover else {},
        }

    @property
    def replicator(self) -> Replicator:
        """The running peer's replication operations (push, probe, hold, free)."""
        if self._replicator is None:
            raise NetworkError("the peer is not running")
        return self._replicator

    @property
    def drainer(self) -> Drainer:
        """The running peer's drain (leaving the network)."""
        if self._drainer is None:
            raise NetworkError("the peer is not running")
        return self._drainer

    @property
    def left(self) -> asyncio.Event:
        """Set once a drain has handed everything over and the peer may stop."""
        return self.drainer.exit

    async def drain(self, force: bool = False) -> dict[str, Any]:
        """Leave the network: hand every range and record over (leaving.py) and wait for
        the drain to end; its report. ``left`` is set if the peer may now stop."""
        drainer = self.drainer
        drainer.start(force, watched=False)
        await drainer.wait()
        return drainer.report()

    def _maintainer(self) -> Maintainer:
        if self.maintainer is None:
            raise NetworkError("the peer is not running")
        return self.maintainer
