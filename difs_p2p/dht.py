"""The DHT adapter: with the modules split out of it, the only code that imports ``kademlia``.

The rest of DIFS-P2P sees :class:`Dht`: start, bootstrap, put/get a validated record by
20-byte key, add/get signed entries under a key, the k closest live peers, stop. A key is
plain ``bytes``: a name key, a range key or a node ID may each be one (see
:mod:`~difs_p2p.routing`); a peer's ID is a :data:`~difs_p2p.identity.NodeId`.

From the library we keep the wire format (rpcudp's msgpack datagrams, so stock peers can
still talk to us), the routing table's k-buckets and the ``Node`` type. We replace what
loses lookups or lets peers hurt us (each has a test that fails on the stock behaviour):

* ``find_neighbors`` stops after two empty buckets and returns ``[]`` while contacts exist:
  we sort every contact by XOR distance.
* ``bootstrap`` only looks up its own ID: we also refresh the far buckets, seeding those
  lookups with the bootstrap contacts only, as the Kademlia paper asks.
* one lost reply evicts a contact: we evict after ``evict_after_failures`` in a row.
* ``set`` reports success when every STORE failed: :meth:`Dht.put` returns how many peers
  accepted.
* malformed datagrams raise inside handler tasks, and malformed replies raise on the
  honest caller: every request and reply is shape-checked; bad ones are dropped.
* the 5 s RPC timeout and the 208 KiB default socket buffer: both come from
  :class:`~difs_p2p.config.DhtConfig`.
* ``welcome_if_new`` hashes keys twice and hands newcomers the wrong records: we hand over
  the records the newcomer is now among the k closest to, in an owned background task.
* ``get`` trusts a local copy or the first answer: :meth:`Dht.get` asks the k closest peers
  and returns every valid record, best first, and repairs peers that had older ones.

Every datagram field is the sender's choice, so (docs/PROTOCOL.md, "DHT datagrams"):

* contacts must be IPv4 addresses with valid ports (``valid_address``), and every datagram
  leaves through ``DhtProtocol.send``, which checks the address again: asyncio closes a
  datagram transport for good when ``sendto`` raises anything but ``OSError``;
* ``leave`` removes a contact only when it comes from that contact's address;
* identify proofs are bound to (id, ip, port) and to the node-ID work (``idwork``), and a
  contact named in a reply proves its ID before a lookup asks it anything; the info
  block (TCP port, zone) a contact sends is under that proof's signature;
* a source that has not proved it receives at its address gets no reply larger than its
  request (return-routability tokens, handed out by the padded identify exchange);
* ``get``, ``resolve`` and writes run over disjoint paths (``lookup_paths``), and a write
  is reported stored only if a quorum of paths serves the record back.

This module is the asyncio shell. The decisions are pure modules: the routing table and
address checks (:mod:`~difs_p2p.routing`), the datagram codec (:mod:`~difs_p2p.dhtwire`),
the lookup state machine (:mod:`~difs_p2p.lookup`); requests are answered by
:mod:`~difs_p2p.dhtproto`, and records and entries handled by :mod:`~difs_p2p.dhtrecords`
through this ``Dht``. Datagrams are handled synchronously in
``datagram_received`` (no task per datagram), and every background task belongs to the
``Dht``'s :class:`~difs_p2p.tasks.TaskSet` and is cancelled by :meth:`Dht.stop`.

A peer cut off from the network rejoins (the rejoin loop, on :mod:`~difs_p2p.membership`'s
decisions: when it is thin or isolated, when to retry, whom to ask).

The module is longer than most (about 800 lines): it is the one place where the library's
node, protocol and routing table meet our loops (refresh, liveness, rejoin), and the
identify exchange (proofs of node IDs and the signed info block that tells a contact's
TCP port and zone, ``describe``) belongs with the contacts it admits; its decisions are
already in the pure modules (lookup, membership, dhtguard, routing, addresses).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any

from kademlia.node import Node

from difs_p2p import dhtwire
from difs_p2p.addresses import normalize_host
from difs_p2p.config import DhtConfig
from difs_p2p.dhtguard import AddressGuard
from difs_p2p.dhtproto import DhtProtocol, EntryGate
from difs_p2p.dhtrecords import Records, Stored
from difs_p2p.errors import IntegrityError, NetworkError, WireError
from difs_p2p.identity import Identity, NodeId, distance, node_id_for, verify_signature
from difs_p2p.idwork import has_work
from difs_p2p.lookup import Lookup, LookupResult, RttEstimator, deal_paths, merge
from difs_p2p.membership import ISOLATED, OK, Membership, Transition
from difs_p2p.net import DatagramNetwork, DatagramTransport, UdpNetwork
from difs_p2p.recordstore import RecordPolicy, RecordStore
from difs_p2p.routing import KEY_SIZE, Contact, contact_of, is_id, valid_address
from difs_p2p.tasks import TaskSet

# Contact is re-exported for peer.py until it imports it from difs_p2p.routing.
__all__ = ["IDENTIFY_DOMAIN", "IDENTIFY_INFO_DOMAIN", "Dht"]

log = logging.getLogger(__name__)

IDENTIFY_DOMAIN = b"difs-identify-v1\x00"
# A proof with the info block signs this domain + nonce + node id + the block's bytes.
IDENTIFY_INFO_DOMAIN = b"difs-identify-v2\x00"
# describe(): identify checks at once, and how long it waits for them in all.
DESCRIBE_CONCURRENCY = 8


class Dht:
    """A Kademlia node with validated records. See the module docstring."""

    def __init__(
        self,
        node_id: NodeId,
        policy: RecordPolicy,
        config: DhtConfig | None = None,
        *,
        db_path: Path | None = None,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        identity: Identity | None = None,
    ) -> None:
        """``identity``: this peer's key; with it, contacts must prove their IDs (identify)."""
        if not is_id(node_id):
            raise ValueError("node id must be 20 bytes")
        if identity is not None and identity.node_id != node_id:
            raise ValueError("node id does not derive from the identity's key")
        self.identity = identity
        # (node id, ip, port) -> public key of contacts that proved their ID at that
        # address (bounded): a proof holds for the address it was made at, nowhere else
        self.verified: dict[tuple[bytes, str, int], bytes] = {}
        # what verified contacts said about themselves (TCP port, zone), same keys
        self.peer_info: dict[tuple[bytes, str, int], dhtwire.PeerInfo] = {}
        # what this peer says about itself in identify replies (set by its owner;
        # None: no info block, as older peers)
        self.info: dhtwire.PeerInfo | None = None
        self._verifying: dict[tuple[bytes, str, int], asyncio.Task[Any]] = {}
        self.config = config or DhtConfig()
        self.node = Node(node_id)
        self.clock = clock
        # tokens, proven addresses and write limits
        self.guard = AddressGuard(self.config, clock)
        self.rng = rng or random.Random()
        self.store = RecordStore(
            db_path,
            policy,
            ttl=self.config.record_ttl,
            max_records=self.config.max_records,
            max_entries_per_key=self.config.max_entries_per_key,
        )
        # checks on entries other peers send, beyond the policy (None: the policy alone)
        self.entry_gate: EntryGate | None = None
        self.protocol: DhtProtocol | None = None
        self.transport: DatagramTransport | None = None
        self.seeds: list[tuple[str, int]] = []
        self._tasks = TaskSet("dht")
        self._warned: set[tuple[str, int]] = set()
        self.stats: dict[str, int] = {"lookups": 0, "rounds": 0, "rpcs": 0, "stalled": 0}
        # round trips of lookup replies, for the stall time
        self.rtt = RttEstimator()
        self.records = Records(self)
        # whether this peer is cut off, when and whom it asks to rejoin (membership.py)
        self.membership = Membership(
            self.config.ksize,
            thin_share=self.config.thin_share,
            backoff_min=self.config.rejoin_min,
            backoff_max=self.config.rejoin_max,
            remembered=self.config.lost_remembered,
            rng=self.rng,
        )
        # the saved contacts (contacts.json) a rejoin also asks; the peer sets this
        self.saved_contacts: Callable[[], list[tuple[str, int]]] = list

    @property
    def node_id(self) -> NodeId:
        return NodeId(bytes(self.node.id))

    # -- lifecycle -------------------------------------------------------------------------

    async def start(
        self,
        host: str,
        port: int,
        *,
        sock: socket.socket | None = None,
        network: DatagramNetwork | None = None,
    ) -> int:
        """Listen on ``host:port`` (a ready UDP socket, or another network); return the port."""
        protocol = DhtProtocol(self)
        net = network or UdpNetwork(sock)
        transport, (ip, bound) = await net.open_datagram(
            host, port, protocol, recv_buffer=self.config.recv_buffer
        )
        protocol.transport = transport
        self.transport = transport
        self.protocol = protocol
        self.node.ip, self.node.port = ip, bound
        self.spawn(self._refresh_loop())
        self.spawn(self._liveness_loop())
        self.spawn(self._rejoin_loop())
        return bound

    async def stop(self) -> None:
        """Tell contacts we leave, cancel every task, fail outstanding RPCs, close the socket."""
        if self.protocol is not None:
            for contact in [*self.contacts(), *self.overflow()]:
                self.protocol.notify(contact.address, "leave", self.node_id)
        await self._tasks.close()
        if self.protocol is not None:
            self.protocol.cancel_outstanding()
        if self.transport is not None:
            self.transport.close()
            await asyncio.sleep(0)  # let the transport release the port
        self.store.close()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run ``coro`` as a task owned by this node (cancelled by stop)."""
        self._tasks.spawn(coro)

    def _timed_reply(
        self, loop: asyncio.AbstractEventLoop, sent: float, task: asyncio.Task[tuple[bool, Any]]
    ) -> None:
        """Feed the round trip of an answered lookup request, stalled ones included (so
        that a loaded peer's slow replies raise the stall time instead of being cut)."""
        if not task.cancelled() and task.exception() is None and task.result()[0]:
            self.rtt.observe(loop.time() - sent)

    def peer_warning(self, addr: tuple[str, int], message: str) -> None:
        """Log a peer-caused problem once per address at WARNING, then at DEBUG."""
        level = logging.DEBUG if addr in self._warned else logging.WARNING
        if len(self._warned) < 10_000:
            self._warned.add(addr)
        log.log(level, "peer_error addr=%s:%s %s", addr[0], addr[1], message)

    def _proto(self) -> DhtProtocol:
        if self.protocol is None:
            raise NetworkError("the DHT is not started")
        return self.protocol

    def traffic(self) -> dict[str, int]:
        """Datagrams sent, received and dropped so far, and the lookup counters."""
        proto = self._proto()
        return {
            "sent": proto.sent,
            "received": proto.received,
            "dropped": proto.dropped,
            **self.stats,
        }

    # -- routing table ---------------------------------------------------------------------

    def contacts(self) -> list[Contact]:
        return [self._described(contact_of(n)) for n in self._proto().router.all_contacts()]

    def neighbors(self, key: bytes, count: int | None = None) -> list[Contact]:
        nodes = self._proto().router.find_neighbors(Node(key), count or self.config.ksize)
        return [self._described(contact_of(n)) for n in nodes]

    @property
    def me(self) -> Contact:
        me = contact_of(self.node)
        if self.info is None:
            return me
        return Contact(me.node_id, me.host, me.port, self.info.tcp_port, self.info.zone)

    def _described(self, contact: Contact) -> Contact:
        """``contact`` with the TCP port and zone it proved in its identify reply."""
        info = self.peer_info.get((contact.node_id, contact.host, contact.port))
        if info is None or contact.node_id == self.node_id:
            return contact
        return Contact(contact.node_id, contact.host, contact.port, info.tcp_port, info.zone)

    async def describe(self, contacts: Sequence[Contact]) -> list[Contact]:
        """``contacts`` with their TCP port and zone filled from their signed identify
        info, verifying those not verified yet (at most ``DESCRIBE_CONCURRENCY`` at once,
        each within the RPC timeout). A contact that does not answer, or an older peer
        that sends no info, is kept as it is (TCP port 0: the UDP port's number, zone
        ""): the caller's connection finds out whether it is up, as before."""
        limit = asyncio.Semaphore(DESCRIBE_CONCURRENCY)

        async def one(contact: Contact) -> Contact:
            if contact.node_id == self.node_id:
                return self.me
            if self.identity is not None and not self.is_verified(
                Node(contact.node_id, contact.host, contact.port)
            ):
                async with limit:
                    await self.verify(Node(contact.node_id, contact.host, contact.port))
            return self._described(contact)

        return list(await asyncio.gather(*(one(c) for c in contacts)))

    # -- node identity and per-sender limits -------------------------------------------------

    def prove_identity(self, request: dhtwire.IdentifyArgs, addr: tuple[str, int]) -> object:
        """Answer an identify challenge: our public key and a signature over the nonce,
        and, when the request is padded (newer peers), the token for its address."""
        if self.identity is None or request.nonce is None:
            return False
        token = self.guard.token_for(addr) if request.padded else None
        if request.info and self.info is not None:
            info = self.info.encode()
            message = IDENTIFY_INFO_DOMAIN + request.nonce + self.node_id + info
            return dhtwire.IdentifyReply(
                self.identity.public_key, self.identity.sign(message), token, info
            ).encode()
        message = IDENTIFY_DOMAIN + request.nonce + self.node_id
        return dhtwire.IdentifyReply(
            self.identity.public_key, self.identity.sign(message), token
        ).encode()

    def is_verified(self, node: Node) -> bool:
        """Whether ``node`` proved its ID at its address (identify)."""
        return (bytes(node.id), node.ip, node.port) in self.verified

    async def verify(self, node: Node) -> bool:
        """Challenge ``node`` to prove, at its address, that its ID derives from a key it
        holds and (``id_difficulty``) carries the node-ID work. The answer also proves
        that the address receives what we send it, and brings its token for ours."""
        if self.is_verified(node):
            return True
        nonce = os.urandom(dhtwire.NONCE_SIZE)
        address = (node.ip, node.port)
        ask = dhtwire.IdentifyArgs(self.node_id, nonce, padded=True, info=True)
        ok, reply = await self._proto().call(address, "identify", *dhtwire.encode_args(ask))
        if not ok:
            return False
        try:
            proof = dhtwire.decode_identify(reply)
        except WireError:
            return False
        public_key, signature = proof.public_key, proof.signature
        if node_id_for(public_key) != node.id:
            return False
        if not has_work(NodeId(bytes(node.id)), self.config.id_difficulty):
            self.peer_warning(address, "node ID lacks the node-ID work")
            return False
        # the info block, when sent, is under the signature (another domain: a proof
        # without it cannot be passed off as one with it, nor the other way round)
        message = IDENTIFY_DOMAIN + nonce + bytes(node.id)
        if proof.info is not None:
            message = IDENTIFY_INFO_DOMAIN + nonce + bytes(node.id) + proof.info
        try:
            verify_signature(public_key, signature, message)
            info = None if proof.info is None else dhtwire.decode_info(proof.info)
        except (IntegrityError, WireError):
            return False
        if proof.token is not None:
            self.guard.remember_token(address, proof.token)
        if len(self.verified) >= 10 * self.config.max_verified:
            self.verified.clear()
            self.peer_info.clear()
            self.guard.forget_proven()
        self.verified[(bytes(node.id), node.ip, node.port)] = public_key
        if info is not None:
            self.peer_info[(bytes(node.id), node.ip, node.port)] = info
        self.guard.mark_proven(address)
        return True

    def verify_later(self, node: Node) -> None:
        """Verify a new contact in the background and add it to the table if it passes."""
        claim = (bytes(node.id), node.ip, node.port)
        if claim in self._verifying or len(self._verifying) >= 64:
            return

        async def run() -> None:
            try:
                if await self.verify(node):
                    self._proto().welcome_if_new(node)
            finally:
                self._verifying.pop(claim, None)

        self._verifying[claim] = self._tasks.spawn(run())

    # -- return-routability tokens ------------------------------------------------------------

    async def settle(self) -> None:
        """Wait for pending identity checks (so the routing table reflects them)."""
        while self._verifying:
            await asyncio.gather(*list(self._verifying.values()), return_exceptions=True)

    def ip_allowed(self, node: Node) -> bool:
        """At most ``max_contacts_per_ip`` contacts per IPv4 address or IPv6 /64 in the
        routing table (loopback exempt unless ``limit_loopback``)."""
        limit = self.per_ip_limit(node.ip)
        return limit is None or self._proto().router.contacts_at(node.ip) < limit

    def per_ip_limit(self, ip: str | None) -> int | None:
        """How many contacts of one address a routing table, and a reply, holds at most
        (None: no limit, loopback unless ``limit_loopback``)."""
        return self.config.max_contacts_per_ip if self.guard.limited(ip) else None

    def overflow(self) -> list[Contact]:
        """Verified peers kept out of the routing table only by the per-IP cap."""
        return [contact_of(n) for n in self._proto().router.overflow.values()]

    async def observed_address(self, contact: Contact) -> str | None:
        """The source IP address ``contact`` sees our datagrams come from (its ``stun``
        answer), or None if it does not answer with an IP literal and valid port."""
        ok, reply = await self._proto().request(contact.address, "stun")
        if not ok or not (isinstance(reply, list) and len(reply) == 2):
            return None
        host, port = reply
        if not valid_address((host, port)):
            return None
        return normalize_host(str(host))

    async def ping(self, address: tuple[str, int]) -> bytes | None:
        """Ping an address; on success the peer joins the routing table and its ID returns."""
        proto = self._proto()
        ok, reply = await proto.call(address, "ping", self.node_id)
        if not ok or not is_id(reply):
            return None
        node = Node(reply, address[0], address[1])
        if self.identity is not None and not await self.verify(node):
            self.peer_warning(address, "contact failed to prove its node ID")
            return None
        proto.handle_call_response((True, reply), node)
        return bytes(reply)

    async def bootstrap(self, seeds: Sequence[tuple[str, int]]) -> int:
        """Join through ``seeds``: look up our own ID, then refresh the far buckets.

        Returns the number of contacts in the routing table afterwards.
        """
        self.seeds = list(dict.fromkeys(list(seeds) + self.seeds))
        pinged = await asyncio.gather(*(self.ping(a) for a in seeds))
        seed_nodes = [Node(i, a[0], a[1]) for i, a in zip(pinged, seeds, strict=True) if i]
        if not seed_nodes:
            return len(self.contacts())
        await self.lookup(self.node_id, "find_node", start=seed_nodes)
        await self._refresh_far(seed_nodes)
        await self.settle()
        return len(self.contacts())

    async def _refresh_far(self, start: list[Node]) -> None:
        """Look up a random ID under each of the 8 farthest prefixes, one at a time."""
        me = int.from_bytes(self.node_id, "big")
        for bit in range(8):
            flip = 1 << (159 - bit)
            low = self.rng.getrandbits(159 - bit)
            target = ((me ^ flip) >> (159 - bit) << (159 - bit)) | low
            await self.lookup(target.to_bytes(KEY_SIZE, "big"), "find_node", start=start)

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.refresh_interval)
            self.store.expire(self.clock())
            known = self._proto().router.find_neighbors(self.node, self.config.alpha)
            if known:
                await self._refresh_far(known)
            elif self.seeds:
                await self.bootstrap(self.seeds)

    def network_state(self) -> Membership:
        """The membership decisions, brought up to date with the routing table now."""
        self._observe()
        return self.membership

    def _observe(self) -> None:
        change = self.membership.observe(len(self.contacts()), self.clock())
        if change is not None:
            self._log_transition(change)

    def _log_transition(self, change: Transition) -> None:
        if change.new == OK:
            log.warning(
                "network_rejoined was=%s contacts=%d most_seen=%d",
                change.old,
                change.size,
                change.most_seen,
            )
        else:
            log.warning(
                "network_%s contacts=%d most_seen=%d: cut off from the network, rejoining",
                "isolated" if change.new == ISOLATED else "thin",
                change.size,
                change.most_seen,
            )

    async def _rejoin_loop(self) -> None:
        """Every ``rejoin_check`` seconds, look at the routing table; while it is thin or
        isolated, ask the lost contacts, --bootstrap peers and saved contacts again
        (``Membership`` says when and whom). Never gives up while the peer runs."""
        while True:
            await asyncio.sleep(self.config.rejoin_check)
            self._observe()
            now = self.clock()
            if not self.membership.due(now):
                continue
            await self.rejoin(now)

    async def rejoin(self, now: float) -> int:
        """One rejoin attempt: ping the candidates, then look up our own ID and refresh
        the far buckets through those that answered; the routing table's size after."""
        membership = self.membership
        known = [c.address for c in self.contacts()]
        try:
            saved = self.saved_contacts()
        except Exception as exc:  # a damaged file must not end the loop
            log.debug("rejoin_saved_failed error=%s", exc)
            saved = []
        candidates = membership.candidates(self.seeds, saved, known=known, me=self.me.address)
        if not candidates and not known:
            membership.nothing_to_ask(now)  # a one-peer network: nobody to ask
            return 0
        delay = membership.attempted(now)
        pinged = await asyncio.gather(*(self.ping(a) for a in candidates))
        answered = [
            Node(i, a[0], a[1]) for i, a in zip(pinged, candidates, strict=True) if i is not None
        ]
        for node in answered:
            membership.back((node.ip, node.port))
        start = answered or self._proto().router.find_neighbors(self.node, self.config.alpha)
        if start:
            await self.lookup(self.node_id, "find_node", start=start)
            await self._refresh_far(start)
            await self.settle()
        size = len(self.contacts())
        log.info(
            "rejoin_attempt n=%d asked=%d answered=%d contacts=%d next_in=%.1f",
            membership.attempts,
            len(candidates),
            len(answered),
            size,
            delay,
        )
        self._observe()
        return size

    async def _liveness_loop(self) -> None:
        """Ping contacts regularly so that crashed peers are noticed and evicted."""
        while True:
            await asyncio.sleep(self.config.liveness_interval)
            proto = self._proto()
            # the overflow too: a live one stays (and takes a slot its address freed), a
            # dead one goes after evict_after_failures pings as a contact does
            nodes = [*proto.router.all_contacts(), *proto.router.overflow.values()]
            await asyncio.gather(*(proto.call_ping(n) for n in nodes))

    # -- lookups ---------------------------------------------------------------------------

    async def lookup(
        self,
        key: bytes,
        rpc: str = "find_node",
        *,
        start: Iterable[Node] | None = None,
        k: int | None = None,
        with_value: bool = False,
        claimed: set[NodeId] | None = None,
        remember: bool = True,
    ) -> LookupResult:
        """Iterative Kademlia lookup with ``alpha`` requests in flight (the rules are
        :class:`~difs_p2p.lookup.Lookup`'s; this sends what it says and feeds it back).

        ``claimed``, shared by the paths of a disjoint lookup (``lookup_paths``), holds
        the peers some path asked: this lookup neither asks nor counts them. A contact
        named in a reply is asked only once it proved its ID at its address (identify).

        ``find_node`` finds the k closest live peers (``k`` defaults to ``ksize``; a
        placement that needs fewer asks fewer); ``find_value`` and ``find_entries`` also
        collect what every one of those k peers holds (they never stop at the first
        answer); ``find_entries`` ``with_value`` collects records and entries at once.
        The stall time adapts to the round trips of lookup replies (``RttEstimator``).
        """
        proto = self._proto()
        k = min(k or self.config.ksize, self.config.ksize)
        if start is None:
            start = proto.router.find_neighbors(Node(key), k)
        machine = Lookup(
            key,
            rpc,
            [contact_of(n) for n in start],
            k=k,
            alpha=self.config.alpha,
            stall=self.rtt.timeout(self.config.lookup_stall_min, self.config.lookup_stall),
            me=self.node_id,
            claimed=claimed,
            with_value=with_value,
        )
        extra: tuple[object, ...] = ()
        if rpc == "find_entries":
            extra = (0, True) if with_value else (0,)
        in_flight: dict[asyncio.Task[tuple[bool, Any]], Contact] = {}
        loop = asyncio.get_running_loop()
        if claimed is None:
            self.stats["lookups"] += 1  # a disjoint lookup counts once (lookup_paths)
        finished = False
        try:
            while True:
                now = loop.time()
                for contact in machine.ask(now):
                    node = Node(contact.node_id, contact.host, contact.port)
                    task = asyncio.ensure_future(self._ask(node, rpc, key, *extra))
                    in_flight[task] = contact
                    task.add_done_callback(functools.partial(self._timed_reply, loop, now))
                if machine.done:
                    break
                wake = machine.wake_at()
                # positive: every active request stalls strictly after now
                timeout = None if wake is None else wake - now
                done, _ = await asyncio.wait(
                    in_flight, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                for task in done:
                    contact = in_flight.pop(task)
                    ok, reply = task.result()
                    if ok:
                        machine.reply(contact, reply, loop.time())
                    else:
                        machine.timeout(contact)
            finished = True
        finally:
            for task in in_flight:
                if finished:
                    # a stalled request runs to its answer or timeout, which counts
                    # towards evicting a dead contact
                    self._tasks.adopt(task)
                else:
                    task.cancel()
        result = machine.result()
        self.stats["rounds"] += result.rounds
        self.stats["rpcs"] += result.queried
        self.stats["stalled"] += result.stalled
        if remember and k == self.config.ksize and result.closest:
            self.records.remember_closest(key, [result.closest])
        return result

    async def _ask(self, node: Node, rpc: str, key: bytes, *extra: Any) -> tuple[bool, Any]:
        """A lookup request to ``node``, once it proved its ID at its address: a contact
        named in a reply is only a claim until then (and the identify answer brings the
        token that gets us full replies from it)."""
        if self.identity is not None and not self.is_verified(node) and not await self.verify(node):
            return False, None
        result: tuple[bool, Any] = await self._proto().call_find(node, rpc, key, *extra)
        return result

    async def lookup_paths(
        self, key: bytes, rpc: str = "find_node", *, with_value: bool = False
    ) -> LookupResult:
        """A lookup over ``disjoint_paths`` disjoint paths (S/Kademlia), merged.

        The ``paths x k`` closest known contacts are dealt round-robin to the paths;
        each path is an iterative lookup that never asks a peer another path asked, and
        ends at its own k closest. Values and entries of every path are collected, so a
        cluster of IDs near the key that answers "nothing" hides a record only if it is
        every path's whole answer. ``closest`` is the union of the paths' k closest,
        closest first; ``paths`` each path's.
        """
        d = self.config.disjoint_paths
        if d <= 1:
            found = await self.lookup(key, rpc, with_value=with_value)
            found.paths = [found.closest]
            return found
        k = self.config.ksize
        known = [contact_of(n) for n in self._proto().router.find_neighbors(Node(key), d * k)]
        claimed: set[NodeId] = set()
        self.stats["lookups"] += 1
        results = await asyncio.gather(
            *(
                self.lookup(
                    key,
                    rpc,
                    start=[Node(c.node_id, c.host, c.port) for c in s],
                    with_value=with_value,
                    claimed=claimed,
                    remember=False,
                )
                for s in deal_paths(known, d)
            )
        )
        merged = merge(results, key)
        if merged.closest:
            self.records.remember_closest(key, merged.paths)
        return merged

    async def closest(self, key: bytes, count: int | None = None) -> list[Contact]:
        """The ``count`` closest live peers to ``key``, this peer included, closest first.

        A lookup keeps only the peers that answered within the stall time; on a loaded
        machine a live peer may be late. If fewer than ``count`` answered, the closest
        other known contacts follow them (the caller's transfer finds out which are up).
        """
        count = count or self.config.ksize
        # peers over the per-IP cap (overflow) are asked and returned like contacts:
        # placement keeps one address from taking many copies
        router = self._proto().router
        start = router.closest_known(Node(key), min(count, self.config.ksize))
        found = [
            self._described(c)
            for c in (await self.lookup(key, "find_node", start=start, k=count)).closest
        ]
        everyone = [*found, self.me]
        everyone.sort(key=lambda c: distance(c.node_id, key))
        if len(everyone) < count:
            have = {c.node_id for c in everyone}
            known = router.closest_known(Node(key), count)
            everyone += [self._described(contact_of(n)) for n in known if n.id not in have][
                : count - len(everyone)
            ]
        return everyone[:count]

    # -- records (difs_p2p.dhtrecords.Records) --------------------------------------------

    async def put(self, key: bytes, value: bytes) -> int:
        """Store a record on the k closest peers (and here, if we are among them).

        Returns how many peers accepted it; 0 means nobody did.
        """
        return await self.records.put(key, value)

    async def put_with_entries(self, key: bytes, value: bytes, entries: Sequence[bytes]) -> Stored:
        """Store a record and add entries on the k closest peers (``Records``)."""
        return await self.records.put_with_entries(key, value, entries)

    async def get(self, key: bytes) -> list[bytes]:
        """Every valid record the k closest peers (and this one) hold, best first."""
        return await self.records.get(key)

    async def resolve(self, key: bytes) -> tuple[list[bytes], list[bytes]]:
        """``get`` and ``get_entries`` in one lookup: (valid records best first, entries)."""
        return await self.records.resolve(key)

    async def resolve_cached(self, key: bytes) -> tuple[list[bytes], list[bytes]]:
        """``resolve`` for a client, answered from a resolve of the last ``resolve_cache``
        seconds when no write through this peer touched the key since (``Records``)."""
        return await self.records.resolve_cached(key)

    async def add_entries(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Add signed entries under ``key`` on the k closest peers; returns acceptances."""
        return await self.records.add_entries(key, entries)

    async def get_entries(self, key: bytes) -> list[bytes]:
        """The union of the entries under ``key`` held by the k closest peers and here."""
        return await self.records.get_entries(key)

    async def _all_entries(self, key: bytes, found: LookupResult) -> list[bytes]:
        return await self.records.all_entries(key, found)

    async def call_store(
        self, contact: Contact, key: bytes, value: bytes, entries: Sequence[bytes] = ()
    ) -> tuple[bool, Any]:
        """A ``store`` request to ``contact`` (the protocol's, by contact)."""
        node = Node(contact.node_id, contact.host, contact.port)
        return await self._proto().call_store(node, key, value, entries)

    async def call_find(
        self, contact: Contact, rpc: str, key: bytes, *extra: Any
    ) -> tuple[bool, Any]:
        """A ``find_*`` or ``add_entries`` request to ``contact``."""
        node = Node(contact.node_id, contact.host, contact.port)
        result: tuple[bool, Any] = await self._proto().call_find(node, rpc, key, *extra)
        return result

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Own an already running task (cancelled by stop)."""
        self._tasks.adopt(task)

    # -- handing records to newcomers ------------------------------------------------------

    async def _hand_over(self, node: Node) -> None:
        """Send a newly seen peer the records it is now among the k closest to.

        Only what this peer would store itself today: records that still validate under
        the policy, with at most 32 of their entries that validate too (entries under a
        key without a valid record, as a flood of junk keys leaves, are not spread), and
        at most ``handover_max_records`` records per newcomer.
        """
        proto = self._proto()
        now = self.clock()
        k = self.config.ksize
        policy = self.store.policy
        sent = 0
        for i, key in enumerate(self.store.keys(now)):
            if sent >= self.config.handover_max_records:
                break
            if i % 64 == 63:
                await asyncio.sleep(0)  # keep the loop responsive with many keys
            keynode = Node(key)
            neighbors = [n for n in proto.router.find_neighbors(keynode, k + 1) if n.id != node.id]
            neighbors = neighbors[:k]
            new_close = len(neighbors) < k or node.distance_to(keynode) < neighbors[-1].distance_to(
                keynode
            )
            me_closest = not neighbors or self.node.distance_to(keynode) < neighbors[0].distance_to(
                keynode
            )
            if not (new_close and me_closest):
                continue
            value = self.store.get(key, now)
            if value is None or policy.record_rank(key, value, now) is None:
                continue
            await proto.call_store(node, key, value)
            sent += 1
            entries = [
                e
                for e in self.store.entries(key, now)
                if policy.entry_identity(key, e, now) is not None
            ]
            if entries:
                await proto.call_find(node, "add_entries", key, entries[:32])
        if sent:
            log.debug("handover peer=%s records=%d", node.id.hex()[:8], sent)
