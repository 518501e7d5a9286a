"""The DHT adapter: with :mod:`difs_p2p.routing`, the only module that imports ``kademlia``.

The rest of DIFS-P2P sees :class:`Dht`: start, bootstrap, put/get a validated record by
20-byte key, add/get signed entries under a key, the k closest live peers, stop.

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
  leaves through ``_Protocol.send``, which checks the address again: asyncio closes a
  datagram transport for good when ``sendto`` raises anything but ``OSError``;
* ``leave`` removes a contact only when it comes from that contact's address;
* identify proofs are bound to (id, ip, port) and to the node-ID work (``idwork``), and a
  contact named in a reply proves its ID before a lookup asks it anything;
* a source that has not proved it receives at its address gets no reply larger than its
  request (return-routability tokens, handed out by the padded identify exchange);
* ``get``, ``resolve`` and writes run over disjoint paths (``lookup_paths``), and a write
  is reported stored only if a quorum of paths serves the record back.

This module is the asyncio shell. The decisions are pure modules: the routing table and
address checks (:mod:`~difs_p2p.routing`), the datagram codec (:mod:`~difs_p2p.dhtwire`),
the lookup state machine (:mod:`~difs_p2p.lookup`). Datagrams are handled synchronously in
``datagram_received`` (no task per datagram), and every background task belongs to the
``Dht``'s :class:`~difs_p2p.tasks.TaskSet` and is cancelled by :meth:`Dht.stop`.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import logging
import os
import random
import socket
import time
from collections.abc import Callable, Coroutine, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from difs_p2p import dhtwire
from difs_p2p.config import DhtConfig
from difs_p2p.errors import DifsError, IntegrityError, NetworkError, WireError
from difs_p2p.identity import Identity, distance, node_id_for, verify_signature
from difs_p2p.idwork import has_work
from difs_p2p.lookup import Lookup, LookupResult, MorePages, RttEstimator, deal_paths, merge
from difs_p2p.net import DatagramNetwork, DatagramTransport, UdpNetwork
from difs_p2p.recordstore import RecordPolicy, RecordStore, write_source
from difs_p2p.routing import (
    KEY_SIZE,
    Contact,
    ExactRoutingTable,
    contact_of,
    is_id,
    valid_address,
)
from difs_p2p.tasks import TaskSet

# Contact is re-exported for peer.py until it imports it from difs_p2p.routing.
__all__ = ["Contact", "Dht", "EntryGate", "Stored", "entry_set_digest", "page_plan"]

log = logging.getLogger(__name__)

IDENTIFY_DOMAIN = b"difs-identify-v1\x00"
# Return-routability tokens: HMAC-SHA-256 of the source address and the period, cut.
_TOKEN_DOMAIN = b"difs-token-v1\x00"
_TOKENS_MAX = 10_000
# Keys whose k closest peers a Dht remembers for closest_reuse seconds.
_RECENT_CLOSEST_MAX = 1024
# The entry-set digest in a find_entries reply (128 bits: matching an honest set's
# digest with another set is a second preimage). A peer that lies about its digest
# gains nothing: the reader checks the pages it reads against it.
_ENTRY_DIGEST_DOMAIN = b"difs-entries-v1\x00"


def entry_set_digest(entries: Iterable[bytes]) -> bytes:
    """The digest of a set of entries, whatever order they come in: SHA-256 over the
    entries in byte order, each after its length (4 bytes), the first 16 bytes."""
    h = hashlib.sha256(_ENTRY_DIGEST_DOMAIN)
    for entry in sorted(set(entries)):
        h.update(len(entry).to_bytes(4, "big"))
        h.update(entry)
    return h.digest()[: dhtwire.ENTRY_DIGEST_SIZE]


@dataclass(frozen=True, slots=True)
class Stored:
    """What storing a record (and entries) on the k closest peers achieved."""

    accepted: int  # peers (this one included) that now hold the record
    refused: int  # peers that refused it or did not answer
    entries_accepted: int  # entry acceptances summed over peers
    # disjoint paths that found peers, how many of them served the record when read
    # back, and how many had to (write_quorum_paths, at most ``paths``). Below the
    # quorum, ``accepted`` counts only the peers that served it (this one included) and
    # ``refused`` the others: a write nobody can read is not reported as stored.
    paths: int = 0
    readable_paths: int = 0
    quorum: int = 0

    @property
    def readable(self) -> bool:
        """Whether a quorum of disjoint paths served the record back."""
        return self.readable_paths >= self.quorum


def page_plan(
    more_pages: Sequence[MorePages], local_digest: bytes
) -> tuple[list[MorePages], list[list[MorePages]]]:
    """Which further pages to read: (peers to read whole, groups of peers with one digest).

    Peers that sent no digest are read whole, as before digests existed. Peers whose
    digest equals ``local_digest`` (the reader's own set) are not read at all. The rest
    are grouped by digest, in the order they answered, so that one peer per group is read.
    """
    whole: list[MorePages] = []
    groups: dict[bytes, list[MorePages]] = {}
    for more in more_pages:
        if more.digest is None:
            whole.append(more)
        elif more.digest != local_digest:
            groups.setdefault(more.digest, []).append(more)
    return whole, list(groups.values())


def _entry_batches(
    entries: Sequence[bytes], first: int = dhtwire.ENTRY_BATCH_BYTES
) -> list[list[bytes]]:
    """``entries`` cut into request-sized batches, in order; the first batch holds at most
    ``first`` bytes (room left beside a record) and may be empty."""
    batches: list[list[bytes]] = [[]]
    size, budget = 0, first
    for e in entries:
        if size + len(e) > budget and (batches[-1] or budget < dhtwire.ENTRY_BATCH_BYTES):
            batches.append([])
            size, budget = 0, dhtwire.ENTRY_BATCH_BYTES
        batches[-1].append(e)
        size += len(e)
    return batches


def _union(paths: Sequence[Sequence[Contact]], key: bytes) -> list[Contact]:
    """The contacts of all paths, each once, closest to ``key`` first."""
    seen: dict[bytes, Contact] = {}
    for path in paths:
        for c in path:
            seen.setdefault(c.node_id, c)
    return sorted(seen.values(), key=lambda c: distance(c.node_id, key))


class EntryGate(Protocol):
    """What decides, beyond the record store's policy, on entries other peers send
    (holdproof.HolderProver: entries of holders that failed a proof are refused, new
    claims are challenged). Called synchronously from the datagram handler: it must
    only decide and schedule, never wait."""

    def admit(self, key: bytes, entry: bytes) -> bool:
        """Whether an entry another peer sent may be stored."""

    def admitted(self, key: bytes, entry: bytes) -> None:
        """An entry another peer sent was stored."""


class _Protocol(KademliaProtocol):  # type: ignore[misc]
    """rpcudp + kademlia protocol with checked requests and replies and owned tasks.

    Datagrams are decoded by :mod:`difs_p2p.dhtwire`; one that does not decode
    (``WireError``) is counted, logged once per address and dropped."""

    def __init__(self, dht: Dht) -> None:
        super().__init__(dht.node, dht.store, dht.config.ksize)
        self.dht = dht
        self.router = ExactRoutingTable(self, dht.config.ksize, dht.node)
        self._wait_timeout = dht.config.rpc_timeout
        self._expected: dict[bytes, tuple[str, int]] = {}
        self._failures: dict[bytes, int] = {}
        self.dropped = 0
        # datagrams sent and received (requests and replies), for status and benchmarks
        self.sent = 0
        self.received = 0
        # replies cut to a token because the source had not proved its address
        self.token_replies = 0

    # -- incoming --------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.received += 1
        try:
            message = dhtwire.decode_datagram(data, self.dht.config.max_datagram)
            if isinstance(message, dhtwire.Reply):
                self._handle_reply(message.msg_id, message.body, addr)
            else:
                self._handle_request(message, addr, len(data))
        except WireError as exc:  # a peer's garbage must never hurt us
            self.dropped += 1
            self.dht.peer_warning(addr, f"dropped datagram: {exc}")

    def error_received(self, exc: Exception) -> None:
        """An ICMP error for an earlier datagram (a peer gone): not fatal, not ours."""
        log.debug("datagram_error %s", exc)

    def _handle_request(self, request: dhtwire.Request, addr: tuple[str, int], size: int) -> None:
        """Answer one request. A source that has not proved it receives at ``addr``
        (no valid token in the request, never passed our identify challenge there) gets
        no reply larger than its request: a token if that fits, else nothing."""
        name, args = request.name, request.args
        proven = self.dht.address_proven(addr, request.token)
        if name == "stun":
            result: object = list(addr)
        elif name == "leave":
            # A peer that stops says so; no reply (stock peers ignore the unknown name).
            # Only the contact's own address may say it: a forged leave changes nothing.
            leave = dhtwire.decode_args(name, args)
            assert isinstance(leave, dhtwire.LeaveArgs)
            if leave.sender is not None:
                node = Node(leave.sender, addr[0], addr[1])
                if not self.router.is_new_node(node) and self._at_address(node):
                    self.router.remove_contact(node)
                    self._failures.pop(node.id, None)
            return
        else:
            if not args or not is_id(args[0]):
                raise WireError("sender id is not 20 bytes", field=f"{name}.sender")
            sender = Node(bytes(args[0]), addr[0], addr[1])
            result = self._dispatch(name, sender, args[1:])
            if proven:
                # an unproven source could be spoofed: do not send it identify challenges
                self.welcome_if_new(sender)
        reply = dhtwire.encode_reply(request.msg_id, result)
        if not proven and len(reply) > size:
            reply = dhtwire.encode_reply(request.msg_id, {"token": self.dht.token_for(addr)})
            if len(reply) > size:
                return
            self.token_replies += 1
        self.send(reply, addr)

    def _at_address(self, node: Node) -> bool:
        """Whether the routing table's contact with ``node``'s ID has ``node``'s address."""
        index = self.router.get_bucket_for(node)
        if index is None:
            return False
        current = self.router.buckets[index].nodes.get(node.id)
        return current is not None and (current.ip, current.port) == (node.ip, node.port)

    def _dispatch(self, name: str, sender: Node, args: list[Any]) -> object:
        """The reply to request ``name`` from ``sender`` (``args`` after the sender id),
        as msgpack will write it; ``WireError`` if the arguments do not decode."""
        request = dhtwire.decode_args(name, [bytes(sender.id), *args])
        now = self.dht.clock()
        store = self.dht.store
        if isinstance(request, dhtwire.PingArgs):
            return self.source_node.id
        if isinstance(request, dhtwire.IdentifyArgs):
            return self.dht.prove_identity(request, (sender.ip, sender.port))
        if name in dhtwire.WRITES and not self.dht.allow_write(sender.ip, now):
            return False if name == "store" else 0
        assert not isinstance(request, dhtwire.StunArgs | dhtwire.LeaveArgs)
        key = request.key
        neighbors = [contact_of(n) for n in self.router.find_neighbors(Node(key), exclude=sender)]
        if isinstance(request, dhtwire.FindArgs):
            if name == "find_value":
                value = store.get(key, now)
                if value is not None:
                    return {"value": value}
            return dhtwire.encode_contacts(neighbors)
        source = write_source(sender.ip, sender.port)
        if isinstance(request, dhtwire.StoreArgs):
            # optionally with entries to add (one request where two were needed): the
            # reply is then [record accepted, entries accepted]
            if request.value is None:
                return False
            value = request.value
            accepted = self._policy(lambda: store.put(key, value, now, source).accepted)
            added = None
            if request.entries is not None:
                added = self._add_entries(key, request.entries, now, source)
            return dhtwire.StoreReply(accepted is True, added).encode()
        if isinstance(request, dhtwire.AddEntriesArgs):
            return self._add_entries(key, request.entries, now, source)
        return self._entries_page(request, neighbors, now).encode()

    def _entries_page(
        self, request: dhtwire.FindEntriesArgs, neighbors: list[Contact], now: float
    ) -> dhtwire.EntriesReply:
        """find_entries: one page of entries starting at an offset, plus closer contacts;
        with the optional flag, also the record (so one lookup reads both)."""
        store, offset = self.dht.store, request.offset
        value = store.get(request.key, now) if request.with_value else None
        budget = dhtwire.ENTRY_BATCH_BYTES - (len(value) if value is not None else 0)
        all_entries = store.entries(request.key, now)
        page, size, nxt = [], 0, -1
        for i in range(max(offset, 0), len(all_entries)):
            if size + len(all_entries[i]) > budget:
                nxt = i
                break
            page.append(all_entries[i])
            size += len(all_entries[i])
        # the first page of several carries the digest: readers need the further pages
        # of only one peer per distinct entry set
        first_of_several = offset <= 0 and nxt >= 0
        return dhtwire.EntriesReply(
            entries=page,
            next=nxt,
            nodes=neighbors[: self.dht.config.ksize // 2],
            digest=entry_set_digest(all_entries) if first_of_several else None,
            has_value=request.with_value,
            value=value,
        )

    def _policy(self, call: Callable[[], object]) -> object:
        """Run a call into the record store, whose policy and gate are other modules'
        code fed a peer's bytes: one of our errors from there (a policy that raises
        instead of refusing, the database failing) refuses this request and is logged;
        it must not escape into the event loop."""
        try:
            return call()
        except DifsError as exc:
            log.warning("record_store_error %s: %s", type(exc).__name__, exc)
            return False

    def _add_entries(self, key: bytes, items: Sequence[bytes], now: float, source: str) -> int:
        store = self.dht.store
        gate = self.dht.entry_gate

        def add() -> int:
            accepted = 0
            for e in items:
                if gate is not None and not gate.admit(key, e):
                    continue
                if store.add_entry(key, e, now, source).accepted:
                    accepted += 1
                    if gate is not None:
                        gate.admitted(key, e)
            return accepted

        added = self._policy(add)
        return added if isinstance(added, int) and not isinstance(added, bool) else 0

    def _handle_reply(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        pending = self._outstanding.get(msg_id)
        if pending is None or self._expected.get(msg_id) != addr:
            self.dropped += 1
            return
        future, timer = pending
        timer.cancel()
        del self._outstanding[msg_id]
        del self._expected[msg_id]
        if not future.done():
            future.set_result((True, body))

    # -- outgoing --------------------------------------------------------------------------

    def send(self, data: bytes, address: tuple[str, int]) -> bool:
        """Send one datagram; False if it could not go (closed, or not an IPv4 address).

        The address is checked first: asyncio closes a datagram transport for good when
        ``sendto`` raises anything but ``OSError`` (``OSError`` goes to
        ``error_received``), so no peer-supplied address reaches it unchecked.
        """
        if self.transport is None or self.transport.is_closing():
            return False
        if not valid_address(address):
            self.dht.peer_warning(("?", 0), f"refused to send to {address!r}")
            return False
        try:
            self.transport.sendto(data, address)
        except OSError as exc:
            log.debug("send_failed addr=%s:%s %s", address[0], address[1], exc)
            return False
        self.sent += 1
        return True

    def call(self, address: tuple[str, int], name: str, *args: Any) -> asyncio.Future[Any]:
        """Send request ``name(*args)`` to ``address``; the future gives (ok, reply).

        The request carries the token ``address`` gave us, if we hold a fresh one.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        msg_id = os.urandom(dhtwire.MSG_ID_SIZE)
        try:
            data = dhtwire.encode_request(msg_id, name, list(args), self.dht.token_from(address))
        except ValueError:
            data = b""  # too large for one request
        if not data or not self.send(data, address):
            future.set_result((False, None))
            return future
        timer = loop.call_later(self._wait_timeout, self._on_timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self._expected[msg_id] = address
        return future

    async def request(self, address: tuple[str, int], name: str, *args: Any) -> tuple[bool, Any]:
        """``call``, once more with the token if the reply was one (our address was not
        yet proven there: one extra round trip, then never again for that period)."""
        ok, reply = await self.call(address, name, *args)
        token = dhtwire.token_reply(reply) if ok else None
        if token is not None:
            self.dht.remember_token(address, token)
            ok, reply = await self.call(address, name, *args)
            if ok and dhtwire.token_reply(reply) is not None:
                return False, None
        return ok, reply

    def _on_timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        self._expected.pop(msg_id, None)
        if pending is not None and not pending[0].done():
            pending[0].set_result((False, None))

    def notify(self, address: tuple[str, int], name: str, *args: Any) -> None:
        """Send a request that expects no reply."""
        msg_id = os.urandom(dhtwire.MSG_ID_SIZE)
        self.send(dhtwire.encode_request(msg_id, name, list(args), None), address)

    def cancel_outstanding(self) -> None:
        for future, timer in self._outstanding.values():
            timer.cancel()
            if not future.done():
                future.set_result((False, None))
        self._outstanding.clear()
        self._expected.clear()

    async def call_ping(self, node_to_ask: Node) -> tuple[bool, Any]:
        result = await self.request((node_to_ask.ip, node_to_ask.port), "ping", self.source_node.id)
        ok = result[0] and is_id(result[1]) and result[1] == node_to_ask.id
        return self.handle_call_response((ok, result[1]), node_to_ask)

    async def call_find(self, node: Node, name: str, key: bytes, *extra: Any) -> tuple[bool, Any]:
        result = await self.request((node.ip, node.port), name, self.source_node.id, key, *extra)
        return self.handle_call_response(result, node)

    async def call_store(
        self, node_to_ask: Node, key: bytes, value: bytes, entries: Sequence[bytes] = ()
    ) -> tuple[bool, Any]:
        """``store``, with ``entries`` to add in the same request when there are any."""
        extra: tuple[object, ...] = (list(entries),) if entries else ()
        result = await self.request(
            (node_to_ask.ip, node_to_ask.port), "store", self.source_node.id, key, value, *extra
        )
        return self.handle_call_response(result, node_to_ask)

    def handle_call_response(self, result: tuple[bool, Any], node: Node) -> tuple[bool, Any]:
        """Count a failure (evicting after several in a row) or welcome the node."""
        if not result[0]:
            failures = self._failures.get(node.id, 0) + 1
            self._failures[node.id] = failures
            if failures >= self.dht.config.evict_after_failures:
                self._failures.pop(node.id, None)
                self.router.remove_contact(node)
            return result
        self._failures.pop(node.id, None)
        self.welcome_if_new(node)
        return result

    def welcome_if_new(self, node: Node) -> None:
        """Add a new contact, once it proved its ID at its address (identify)."""
        if not self.router.is_new_node(node) or node.id == self.source_node.id:
            return
        if self.dht.identity is not None and not self.dht.is_verified(node):
            self.dht.verify_later(node)  # added once it proves its ID
            return
        if not self.dht.ip_allowed(node):
            return
        self.router.add_contact(node)
        self.dht.spawn(self.dht._hand_over(node))


class Dht:
    """A Kademlia node with validated records. See the module docstring."""

    def __init__(
        self,
        node_id: bytes,
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
        # addresses that answered our identify challenge: they receive at that address,
        # so they get full replies without a token
        self._proven: dict[tuple[str, int], None] = {}
        # address -> (token it gave us, when): sent with our requests to it
        self._tokens: dict[tuple[str, int], tuple[bytes, float]] = {}
        self._token_key = os.urandom(32)
        self._verifying: dict[tuple[bytes, str, int], asyncio.Task[Any]] = {}
        self._write_buckets: dict[str, tuple[float, float]] = {}
        self.config = config or DhtConfig()
        self.node = Node(node_id)
        self.clock = clock
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
        self.protocol: _Protocol | None = None
        self.transport: DatagramTransport | None = None
        self.seeds: list[tuple[str, int]] = []
        self._tasks = TaskSet("dht")
        self._warned: set[tuple[str, int]] = set()
        self.stats: dict[str, int] = {"lookups": 0, "rounds": 0, "rpcs": 0, "stalled": 0}
        # round trips of lookup replies, for the stall time
        self.rtt = RttEstimator()
        # key -> (loop time, k closest peers that answered a lookup of it), oldest first
        # (per disjoint path)
        self._recent_closest: dict[bytes, tuple[float, list[list[Contact]]]] = {}

    @property
    def node_id(self) -> bytes:
        return bytes(self.node.id)

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
        protocol = _Protocol(self)
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
        return bound

    async def stop(self) -> None:
        """Tell contacts we leave, cancel every task, fail outstanding RPCs, close the socket."""
        if self.protocol is not None:
            for contact in self.contacts():
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

    def _proto(self) -> _Protocol:
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
        return [contact_of(n) for n in self._proto().router.all_contacts()]

    def neighbors(self, key: bytes, count: int | None = None) -> list[Contact]:
        nodes = self._proto().router.find_neighbors(Node(key), count or self.config.ksize)
        return [contact_of(n) for n in nodes]

    @property
    def me(self) -> Contact:
        return contact_of(self.node)

    # -- node identity and per-sender limits -------------------------------------------------

    def prove_identity(self, request: dhtwire.IdentifyArgs, addr: tuple[str, int]) -> object:
        """Answer an identify challenge: our public key and a signature over the nonce,
        and, when the request is padded (newer peers), the token for its address."""
        if self.identity is None or request.nonce is None:
            return False
        message = IDENTIFY_DOMAIN + request.nonce + self.node_id
        token = self.token_for(addr) if request.padded else None
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
        ask = dhtwire.IdentifyArgs(self.node_id, nonce, padded=True)
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
        if not has_work(bytes(node.id), self.config.id_difficulty):
            self.peer_warning(address, "node ID lacks the node-ID work")
            return False
        try:
            verify_signature(public_key, signature, IDENTIFY_DOMAIN + nonce + bytes(node.id))
        except IntegrityError:
            return False
        if proof.token is not None:
            self.remember_token(address, proof.token)
        if len(self.verified) >= 10 * self.config.max_verified:
            self.verified.clear()
            self._proven.clear()
        self.verified[(bytes(node.id), node.ip, node.port)] = public_key
        self._proven[address] = None
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

    def _token(self, addr: tuple[str, int], period: int) -> bytes:
        message = b"%b%d\x00%b:%d" % (_TOKEN_DOMAIN, period, addr[0].encode(), addr[1])
        return hmac.digest(self._token_key, message, "sha256")[: dhtwire.TOKEN_SIZE]

    def token_for(self, addr: tuple[str, int]) -> bytes:
        """The token we give ``addr``: valid in this period and the next."""
        return self._token(addr, int(self.clock() // self.config.token_period))

    def address_proven(self, addr: tuple[str, int], token: object) -> bool:
        """Whether ``addr`` proved it receives there: it answered our identify challenge,
        or its request carries a token we gave that address (this period or the last)."""
        if addr in self._proven:
            return True
        if not (isinstance(token, bytes) and len(token) == dhtwire.TOKEN_SIZE):
            return False
        period = int(self.clock() // self.config.token_period)
        return hmac.compare_digest(token, self._token(addr, period)) or hmac.compare_digest(
            token, self._token(addr, period - 1)
        )

    def remember_token(self, addr: tuple[str, int], token: bytes) -> None:
        if len(self._tokens) >= _TOKENS_MAX:
            self._tokens.pop(next(iter(self._tokens)))  # the oldest
        self._tokens.pop(addr, None)
        self._tokens[addr] = (bytes(token), self.clock())

    def token_from(self, addr: tuple[str, int]) -> bytes | None:
        """The token ``addr`` gave us, while it is surely still valid there."""
        held = self._tokens.get(addr)
        if held is None:
            return None
        token, at = held
        if self.clock() - at >= self.config.token_period:
            del self._tokens[addr]
            return None
        return token

    async def settle(self) -> None:
        """Wait for pending identity checks (so the routing table reflects them)."""
        while self._verifying:
            await asyncio.gather(*list(self._verifying.values()), return_exceptions=True)

    def _limited(self, ip: str | None) -> bool:
        if ip is None:
            return False
        return self.config.limit_loopback or not ip.startswith("127.")

    def ip_allowed(self, node: Node) -> bool:
        """At most ``max_contacts_per_ip`` contacts per IPv4 address (loopback exempt)."""
        if not self._limited(node.ip):
            return True
        return self._proto().router.contacts_at(node.ip) < self.config.max_contacts_per_ip

    def allow_write(self, ip: str | None, now: float) -> bool:
        """Per-sender token bucket for store/add_entries requests."""
        if not self._limited(ip) or ip is None:
            return True
        rate, burst = self.config.write_rate, self.config.write_burst
        tokens, last = self._write_buckets.get(ip, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if len(self._write_buckets) > 10_000:
            self._write_buckets.clear()
        if tokens < 1:
            self._write_buckets[ip] = (tokens, now)
            return False
        self._write_buckets[ip] = (tokens - 1, now)
        return True

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

    async def _liveness_loop(self) -> None:
        """Ping contacts regularly so that crashed peers are noticed and evicted."""
        while True:
            await asyncio.sleep(self.config.liveness_interval)
            proto = self._proto()
            nodes = proto.router.all_contacts()
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
        claimed: set[bytes] | None = None,
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
            self._remember_closest(key, [result.closest])
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
        claimed: set[bytes] = set()
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
            self._remember_closest(key, merged.paths)
        return merged

    async def closest(self, key: bytes, count: int | None = None) -> list[Contact]:
        """The ``count`` closest live peers to ``key``, this peer included, closest first.

        A lookup keeps only the peers that answered within the stall time; on a loaded
        machine a live peer may be late. If fewer than ``count`` answered, the closest
        other known contacts follow them (the caller's transfer finds out which are up).
        """
        count = count or self.config.ksize
        found = (await self.lookup(key, "find_node", k=count)).closest
        everyone = [*found, self.me]
        everyone.sort(key=lambda c: distance(c.node_id, key))
        if len(everyone) < count:
            have = {c.node_id for c in everyone}
            known = self._proto().router.find_neighbors(Node(key), count)
            everyone += [contact_of(n) for n in known if n.id not in have][: count - len(everyone)]
        return everyone[:count]

    # -- records ---------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes) -> int:
        """Store a record on the k closest peers (and here, if we are among them).

        Returns how many peers accepted it; 0 means nobody did.
        """
        if len(value) > dhtwire.MAX_VALUE_SIZE:
            raise ValueError(f"record of {len(value)} bytes exceeds {dhtwire.MAX_VALUE_SIZE}")
        return (await self.put_with_entries(key, value, [])).accepted

    async def put_with_entries(self, key: bytes, value: bytes, entries: Sequence[bytes]) -> Stored:
        """Store a record and add ``entries`` on the k closest peers of each disjoint
        path, found by one lookup (or taken from a lookup of the same key in the last
        ``closest_reuse`` seconds), then read the record back from each path's peers.

        ``Stored.refused`` counts the peers that refused the record or did not answer: 0
        means every one of those peers now holds it (no other record can win there). If
        fewer than ``write_quorum_paths`` paths serve it back (peers that say they took
        it and then answer without it), only the peers that served it count as accepted.
        """
        if len(value) > dhtwire.MAX_VALUE_SIZE:
            raise ValueError(f"record of {len(value)} bytes exceeds {dhtwire.MAX_VALUE_SIZE}")
        proto = self._proto()
        paths = await self._closest_for_write(key)
        peers = _union(paths, key)
        accepted = refused = 0
        here = False
        if self._among_closest(key, peers):
            if self.store.put(key, value, self.clock()).accepted:
                accepted += 1
                here = True
            else:
                refused += 1
        entries_accepted = self._add_here(key, entries)
        # The first batch of entries rides with the record (one request per peer); the
        # rest go as add_entries. A peer that predates entries in `store` refuses the
        # request with a bare `false` and is asked again the old way.
        batches = _entry_batches(entries, first=dhtwire.ENTRY_BATCH_BYTES - len(value))
        first, rest = batches[0], batches[1:]
        stores = self._answers(
            [proto.call_store(Node(c.node_id, c.host, c.port), key, value, first) for c in peers]
        )
        added = self._send_entries(key, rest, peers)
        replies, more = await asyncio.gather(stores, added)
        entries_accepted += more
        older: list[Contact] = []
        took: set[bytes] = set()
        for contact, (ok, reply) in zip(peers, replies, strict=True):
            if ok and isinstance(reply, list) and len(reply) == 2:
                took_it, added_here = reply
                if took_it is True:
                    took.add(contact.node_id)
                else:
                    refused += 1
                entries_accepted += added_here if isinstance(added_here, int) else 0
            elif ok and reply is True:
                took.add(contact.node_id)  # without entries in the request
            elif ok and reply is False and first:
                older.append(contact)
            else:
                refused += 1
        if older:
            again = self._answers(
                [proto.call_store(Node(c.node_id, c.host, c.port), key, value) for c in older]
            )
            replies, more = await asyncio.gather(again, self._send_entries(key, [first], older))
            entries_accepted += more
            for contact, (ok, reply) in zip(older, replies, strict=True):
                if ok and reply is True:
                    took.add(contact.node_id)
                else:
                    refused += 1
        accepted += len(took)
        used = [p for p in paths if p]
        served: set[bytes] = set()
        readable = sum(
            await asyncio.gather(
                *(
                    self._read_back(key, value, [c for c in p if c.node_id in took], served)
                    for p in used
                )
            )
        )
        quorum = min(self.config.write_quorum_paths, len(used))
        if readable < quorum:
            log.warning(
                "write_unreadable key=%s paths=%d readable=%d took=%d served=%d",
                key.hex()[:12],
                len(used),
                readable,
                len(took),
                len(served),
            )
            accepted = len(served) + here
            refused += len(took) - len(served)
        return Stored(accepted, refused, entries_accepted, len(used), readable, quorum)

    async def _read_back(
        self, key: bytes, value: bytes, peers: list[Contact], served: set[bytes]
    ) -> bool:
        """Whether one of ``peers`` (one path's, closest first) serves ``value`` (or a
        better record) at ``key``: asked in waves of 1, 2, 4, ... peers until one does,
        so an honest path costs one request; adds the peers that served it to ``served``."""
        proto = self._proto()
        policy = self.store.policy
        mine = policy.record_rank(key, value, self.clock())
        start, wave = 0, 1
        while start < len(peers):
            batch = peers[start : start + wave]
            start, wave = start + wave, wave * 2
            replies = await self._answers(
                [proto.call_find(Node(c.node_id, c.host, c.port), "find_value", key) for c in batch]
            )
            found = False
            for contact, (ok, reply) in zip(batch, replies, strict=True):
                got = reply.get("value") if ok and isinstance(reply, dict) else None
                if not isinstance(got, bytes):
                    continue
                rank = None if got == value else policy.record_rank(key, got, self.clock())
                if got == value or (mine is not None and rank is not None and rank > mine):
                    served.add(contact.node_id)
                    found = True
            if found:
                return True
        return False

    def _among_closest(self, key: bytes, peers: list[Contact]) -> bool:
        """Whether this peer is among the k closest to ``key`` (``peers`` sorted)."""
        k = self.config.ksize
        return len(peers) < k or distance(self.node_id, key) < distance(peers[k - 1].node_id, key)

    def _remember_closest(self, key: bytes, closest: list[list[Contact]]) -> None:
        if self.config.closest_reuse <= 0:
            return
        if len(self._recent_closest) >= _RECENT_CLOSEST_MAX:
            self._recent_closest.pop(next(iter(self._recent_closest)))  # the oldest
        self._recent_closest.pop(key, None)
        self._recent_closest[key] = (asyncio.get_running_loop().time(), closest)

    async def _closest_for_write(self, key: bytes) -> list[list[Contact]]:
        """The k closest peers to ``key`` of each disjoint path: from a lookup moments
        ago, else a new one."""
        recent = self._recent_closest.get(key)
        if recent is not None:
            at, closest = recent
            if asyncio.get_running_loop().time() - at <= self.config.closest_reuse:
                return closest
        return (await self.lookup_paths(key, "find_node")).paths

    async def get(self, key: bytes) -> list[bytes]:
        """Every valid record the k closest peers (and this one) hold, best first.

        Peers among the k closest that answered with an older record or none get the best
        one (read-repair).
        """
        return self._best_records(key, await self.lookup_paths(key, "find_value"))

    async def resolve(self, key: bytes) -> tuple[list[bytes], list[bytes]]:
        """``get`` and ``get_entries`` in one lookup: (valid records best first, entries).

        Each of the k closest peers is asked once for its record and its entries
        (``find_entries`` with the value flag); a peer that answers without saying whether
        it holds a record (it predates the flag) is asked with ``find_value``.
        """
        proto = self._proto()
        found = await self.lookup_paths(key, "find_entries", with_value=True)
        if found.value_unknown:
            asked = found.value_unknown
            replies = await asyncio.gather(
                *(
                    proto.call_find(Node(c.node_id, c.host, c.port), "find_value", key)
                    for c in asked
                )
            )
            for contact, (ok, reply) in zip(asked, replies, strict=True):
                value = reply.get("value") if ok and isinstance(reply, dict) else None
                if isinstance(value, bytes):
                    found.values.append((contact, value))
                else:
                    found.without_value.append(contact)
        records = self._best_records(key, found)
        return records, await self._all_entries(key, found)

    def _best_records(self, key: bytes, found: LookupResult) -> list[bytes]:
        """Every valid record of a lookup and this peer, best first; read-repair the rest."""
        now = self.clock()
        candidates = [v for _, v in found.values]
        local = self.store.get(key, now)
        if local is not None:
            candidates.append(local)
        # The policy ranks them, counting how many peers returned each (for DIFS: the
        # owner most peers vouch for, then its highest version); every reader agrees.
        best = self.store.policy.best_records(key, candidates, now)
        if best:
            stale = [c for c, v in found.values if v != best[0]] + found.without_value
            if local is not None and local != best[0]:
                self.store.put(key, best[0], now)
            self.spawn(self._repair(key, best[0], stale))
        return best

    async def _repair(self, key: bytes, value: bytes, peers: list[Contact]) -> None:
        proto = self._proto()
        await asyncio.gather(
            *(proto.call_store(Node(c.node_id, c.host, c.port), key, value) for c in peers)
        )

    async def add_entries(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Add signed entries under ``key`` on the k closest peers; returns acceptances."""
        paths = await self._closest_for_write(key)
        return await self._add_entries_to(key, entries, _union(paths, key))

    async def _add_entries_to(
        self, key: bytes, entries: Sequence[bytes], peers: list[Contact]
    ) -> int:
        if not entries:
            return 0
        accepted = self._add_here(key, entries)
        return accepted + await self._send_entries(key, _entry_batches(entries), peers)

    def _add_here(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Add ``entries`` to this peer's own store; the number accepted."""
        now = self.clock()
        return sum(self.store.add_entry(key, e, now).accepted for e in entries)

    async def _send_entries(
        self, key: bytes, batches: Sequence[Sequence[bytes]], peers: list[Contact]
    ) -> int:
        """``add_entries`` of each batch to each peer; the acceptances."""
        proto = self._proto()
        accepted = 0
        calls: list[Coroutine[Any, Any, tuple[bool, Any]]] = [
            proto.call_find(Node(c.node_id, c.host, c.port), "add_entries", key, list(batch))
            for c in peers
            for batch in batches
            if batch
        ]
        if not calls:
            return 0
        for ok, reply in await self._answers(calls):
            if ok and isinstance(reply, int) and reply > 0:
                accepted += reply
        return accepted

    async def _answers(
        self, calls: Sequence[Coroutine[Any, Any, tuple[bool, Any]]]
    ) -> list[tuple[bool, Any]]:
        """The replies to requests sent at once, in order.

        A request still unanswered a stall time after the latest reply (adaptive, as in
        lookups) counts as unanswered, ``(False, None)``: a dead peer among the k closest
        costs a write the stall time, not ``rpc_timeout``. It runs on in the background:
        a late store still lands, and a timeout still counts towards evicting the contact.
        """
        tasks = [asyncio.create_task(c) for c in calls]
        stall = self.rtt.timeout(self.config.lookup_stall_min, self.config.lookup_stall)
        pending = set(tasks)
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending, timeout=stall, return_when=asyncio.FIRST_COMPLETED
                )
                if not done:
                    break
        except BaseException:
            for task in pending:
                task.cancel()
            raise
        for task in pending:
            self._tasks.adopt(task)
        return [t.result() if t.done() else (False, None) for t in tasks]

    async def get_entries(self, key: bytes) -> list[bytes]:
        """The union of the entries under ``key`` held by the k closest peers and here."""
        return await self._all_entries(key, await self.lookup_paths(key, "find_entries"))

    async def _all_entries(self, key: bytes, found: LookupResult) -> list[bytes]:
        """The entries of a lookup, the further pages of the peers that had more, and ours.

        Peers that sent the digest of their entry set are grouped by it (``page_plan``):
        a set that equals ours is not read again, and of each other set the further
        pages of one peer are read, checked against the digest, and only if they do not
        match are the other peers of that group read. Peers without a digest are read
        whole. Each peer's pages come one after another; different peers are read at
        the same time.
        """
        proto = self._proto()
        local = self.store.entries(key, self.clock())

        async def rest(more: MorePages) -> list[bytes]:
            node = Node(more.contact.node_id, more.contact.host, more.contact.port)
            got, offset = list(more.first), more.next
            for _ in range(1000):
                ok, reply = await proto.call_find(node, "find_entries", key, offset)
                if not ok or not isinstance(reply, dict):
                    break
                page = reply.get("entries")
                if isinstance(page, list):
                    got.extend(e for e in page if isinstance(e, bytes))
                nxt = reply.get("next")
                if not isinstance(nxt, int) or nxt <= offset:
                    break
                offset = nxt
            return got

        async def one_of(group: list[MorePages]) -> list[bytes]:
            digest = group[0].digest
            got = await rest(group[0])
            if entry_set_digest(got) == digest:
                return got
            # the peer did not send the set it announced: read the others of its group
            for more in await asyncio.gather(*(rest(m) for m in group[1:])):
                got.extend(more)
            return got

        whole, groups = page_plan(found.more_pages, entry_set_digest(local))
        pages = await asyncio.gather(*(rest(m) for m in whole), *(one_of(g) for g in groups))
        entries = list(found.entries)
        for got in pages:
            entries.extend(got)
        entries.extend(local)
        return list(dict.fromkeys(entries))

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
