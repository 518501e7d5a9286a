"""The DHT's datagram protocol: rpcudp's request/reply matching over ``dhtwire``, the
request handlers, and the checked send path. Only this module, :mod:`difs_p2p.routing` and
:mod:`difs_p2p.dht` import ``kademlia``.

The handlers decide nothing about contacts, tokens or limits themselves: they ask the
:class:`DhtHost` (the ``Dht``) that owns them.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Protocol

from kademlia.node import Node
from kademlia.protocol import KademliaProtocol

from difs_p2p import dhtwire
from difs_p2p.config import DhtConfig
from difs_p2p.dhtguard import AddressGuard
from difs_p2p.dhtrecords import entry_set_digest
from difs_p2p.errors import DifsError, WireError
from difs_p2p.identity import Identity
from difs_p2p.membership import Membership
from difs_p2p.metrics import RpcStats
from difs_p2p.recordstore import RecordStore, write_source
from difs_p2p.routing import Contact, ExactRoutingTable, contact_of, is_id, valid_address

log = logging.getLogger(__name__)


class DhtHost(Protocol):
    """What the protocol asks of the node that owns it (:class:`difs_p2p.dht.Dht`)."""

    node: Node
    config: DhtConfig
    store: RecordStore
    identity: Identity | None
    entry_gate: EntryGate | None
    clock: Callable[[], float]
    guard: AddressGuard
    # told of contacts evicted for not answering and of contacts that leave
    membership: Membership

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def peer_warning(self, addr: tuple[str, int], message: str) -> None: ...
    def prove_identity(self, request: dhtwire.IdentifyArgs, addr: tuple[str, int]) -> object: ...
    def is_verified(self, node: Node) -> bool: ...
    def verify_later(self, node: Node) -> None: ...
    def ip_allowed(self, node: Node) -> bool: ...
    def per_ip_limit(self, ip: str | None) -> int | None: ...
    def _hand_over(self, node: Node) -> Coroutine[Any, Any, None]: ...


class EntryGate(Protocol):
    """What decides, beyond the record store's policy, on entries other peers send
    (holdproof.HolderProver: entries of holders that failed a proof are refused, new
    claims are challenged). Called synchronously from the datagram handler: it must
    only decide and schedule, never wait."""

    def admit(self, key: bytes, entry: bytes) -> bool:
        """Whether an entry another peer sent may be stored."""

    def admitted(self, key: bytes, entry: bytes) -> None:
        """An entry another peer sent was stored."""


class DhtProtocol(KademliaProtocol):  # type: ignore[misc]
    """rpcudp + kademlia protocol with checked requests and replies and owned tasks.

    Datagrams are decoded by :mod:`difs_p2p.dhtwire`; one that does not decode
    (``WireError``) is counted, logged once per address and dropped."""

    def __init__(self, dht: DhtHost) -> None:
        super().__init__(dht.node, dht.store, dht.config.ksize)
        self.dht = dht
        self.router = ExactRoutingTable(self, dht.config.ksize, dht.node)
        self.router.overflow_max = dht.config.overflow_contacts
        self._wait_timeout = dht.config.rpc_timeout
        # msg id -> (address asked, request name, loop time sent)
        self._expected: dict[bytes, tuple[tuple[str, int], str, float]] = {}
        self._failures: dict[bytes, int] = {}
        self.dropped = 0
        # datagrams sent and received (requests and replies), for status and benchmarks
        self.sent = 0
        self.received = 0
        # replies cut to a token because the source had not proved its address
        self.token_replies = 0
        # outgoing requests by name and outcome, and their durations (metrics.py); leave
        # is sent without waiting for a reply, so it has neither
        self.rpcs = RpcStats(dhtwire.RPCS - {"leave"})

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
        proven = self.dht.guard.address_proven(addr, request.token)
        if name == "stun":
            result: object = list(addr)
        elif name == "leave":
            # A peer that stops says so; no reply (stock peers ignore the unknown name).
            # Only the contact's own address may say it: a forged leave changes nothing.
            leave = dhtwire.decode_args(name, args)
            if isinstance(leave, dhtwire.LeaveArgs) and leave.sender is not None:
                node = Node(leave.sender, addr[0], addr[1])
                if not self.router.is_new_node(node) and self._at_address(node):
                    self.router.remove_contact(node)
                    self._failures.pop(node.id, None)
                    self.dht.membership.left(len(self.router.all_contacts()))
                elif node.id in self.router.overflow:
                    self.router.remove_contact(node)  # only at its own address
            return
        else:
            if not args or not is_id(args[0]):
                raise WireError("sender id is not 20 bytes", field=f"{name}.sender")
            sender = Node(bytes(args[0]), addr[0], addr[1])
            try:
                result = self._dispatch(name, sender, args[1:])
            except WireError:
                raise
            except DifsError as exc:
                # The handlers call into the record store, whose policy and entry gate
                # are other modules' code fed a peer's bytes, and whose database may
                # fail: one of our errors from there drops this request (logged), as a
                # malformed one is; it must not escape into the event loop.
                self.dropped += 1
                log.warning("record_store_error %s: %s", type(exc).__name__, exc)
                return
            if proven:
                # an unproven source could be spoofed: do not send it identify challenges
                self.welcome_if_new(sender)
        reply = dhtwire.encode_reply(request.msg_id, result)
        if not proven and len(reply) > size:
            reply = dhtwire.encode_reply(request.msg_id, {"token": self.dht.guard.token_for(addr)})
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
        if name in dhtwire.WRITES and not self.dht.guard.allow_write(sender.ip, now):
            return False if name == "store" else 0
        if isinstance(request, dhtwire.StunArgs | dhtwire.LeaveArgs):
            raise WireError(f"{name} is answered before dispatch", field="name")
        key = request.key
        # the closest contacts and peers over the per-IP cap (overflow), no more of one
        # address than the cap lets a routing table hold
        found = self.router.closest_known(
            Node(key), exclude=sender, per_group=self.dht.per_ip_limit
        )
        neighbors = [contact_of(n) for n in found]
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
            accepted = store.put(key, request.value, now, source).accepted
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

    def _add_entries(self, key: bytes, items: Sequence[bytes], now: float, source: str) -> int:
        store = self.dht.store
        gate = self.dht.entry_gate
        accepted = 0
        for e in items:
            if gate is not None and not gate.admit(key, e):
                continue
            if store.add_entry(key, e, now, source).accepted:
                accepted += 1
                if gate is not None:
                    gate.admitted(key, e)
        return accepted

    def _handle_reply(self, msg_id: bytes, body: object, addr: tuple[str, int]) -> None:
        pending = self._outstanding.get(msg_id)
        expected = self._expected.get(msg_id)
        if pending is None or expected is None or expected[0] != addr:
            self.dropped += 1
            return
        future, timer = pending
        timer.cancel()
        del self._outstanding[msg_id]
        del self._expected[msg_id]
        _, name, sent = expected
        outcome = "refused" if dhtwire.token_reply(body) is not None else "ok"
        self.rpcs.record(name, outcome, asyncio.get_running_loop().time() - sent)
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
            data = dhtwire.encode_request(
                msg_id, name, list(args), self.dht.guard.token_from(address)
            )
        except ValueError:
            data = b""  # too large for one request
        if not data or not self.send(data, address):
            self.rpcs.record(name, "error")
            future.set_result((False, None))
            return future
        now = loop.time()
        timer = loop.call_at(now + self._wait_timeout, self._on_timeout, msg_id)
        self._outstanding[msg_id] = (future, timer)
        self._expected[msg_id] = (address, name, now)
        return future

    async def request(self, address: tuple[str, int], name: str, *args: Any) -> tuple[bool, Any]:
        """``call``, once more with the token if the reply was one (our address was not
        yet proven there: one extra round trip, then never again for that period)."""
        ok, reply = await self.call(address, name, *args)
        token = dhtwire.token_reply(reply) if ok else None
        if token is not None:
            self.dht.guard.remember_token(address, token)
            ok, reply = await self.call(address, name, *args)
            if ok and dhtwire.token_reply(reply) is not None:
                return False, None
        return ok, reply

    def _on_timeout(self, msg_id: bytes) -> None:
        pending = self._outstanding.pop(msg_id, None)
        expected = self._expected.pop(msg_id, None)
        if expected is not None:
            self.rpcs.record(expected[1], "timeout")
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
                self.dht.membership.evicted((node.ip, node.port))
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
            # over the per-IP cap: not in a bucket, but usable as a holder (overflow)
            self.router.add_overflow(node)
            return
        self.router.add_contact(node)
        self.dht.spawn(self.dht._hand_over(node))
