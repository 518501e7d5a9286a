"""Records and entry sets over the DHT: writes with read-back, reads with read-repair,
entry paging (:class:`Records`), and the pure parts: the entry-set digest, which further
pages to read (``page_plan``), how entries are cut into requests (``entry_batches``), the
union of disjoint paths, what a write achieved (``Stored``), and which resolves a client
may be answered from memory (``ResolveCache``).

:class:`Records` sends through its :class:`RecordsHost` (the ``Dht``): lookups, requests
to a contact, owned tasks. It never touches a socket or the routing table itself.

Longer than most: the write, read, paging and caching paths of records and entries share
one state (the closest peers of recent lookups, the resolve cache), and the pure rules
beside them are each small.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol

from difs_p2p import dhtwire
from difs_p2p.classgen import valueclass
from difs_p2p.config import DhtConfig
from difs_p2p.errors import WireError
from difs_p2p.identity import NodeId, distance
from difs_p2p.lookup import LookupResult, MorePages, RttEstimator
from difs_p2p.recordstore import RecordStore
from difs_p2p.routing import Contact

log = logging.getLogger(__name__)

# Keys whose k closest peers are remembered for closest_reuse seconds.
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


@valueclass
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
    # peers (this one included) that answered the store at all, took it or not: how many
    # of the key's peers the write reached (a partition, not a policy, keeps it low)
    reached: int = 0

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


def entry_batches(
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


# Keys whose last resolve a ResolveCache keeps, the bytes of records and entries it keeps
# (an answer above a sixteenth of them is not kept: a name with hundreds of entries is
# rarely a small hot one), and keys whose last write it remembers.
RESOLVE_CACHE_KEYS = 4096
RESOLVE_CACHE_BYTES = 16 << 20
_WRITES_REMEMBERED = 4096

Resolution = tuple[list[bytes], list[bytes]]


class ResolveCache:
    """Which resolves a client may be answered from memory: pure (the caller passes the
    time), no I/O.

    A resolve (records, entries) is kept for ``bound`` seconds from when it ended. A write
    through this peer to a key (``written``, called as the write starts and once it is
    done) drops the key's answer, and an answer from a resolve that began before the
    key's latest write is not kept (``keep`` with the ``begin`` token): the writer's next
    resolve here reads its write. Writes that reach this peer from elsewhere do not
    touch it: a reader here sees them after at most ``bound`` seconds. Only what a
    resolve returned is kept (records the policy ranked valid; entries as they came),
    never anything else.
    """

    def __init__(
        self, bound: float, size: int = RESOLVE_CACHE_KEYS, max_bytes: int = RESOLVE_CACHE_BYTES
    ) -> None:
        self.bound = bound
        self.size = size
        self.max_bytes = max_bytes
        self.bytes = 0  # of the records and entries kept
        self._answers: OrderedDict[bytes, tuple[float, Resolution]] = OrderedDict()
        self._epoch = 0  # counts writes
        self._writes: OrderedDict[bytes, int] = OrderedDict()  # key -> epoch of its last write
        self._floor = 0  # writes older than this one are forgotten: no answer older is kept

    def get(self, key: bytes, now: float) -> Resolution | None:
        """A copy of the answer for ``key`` if its resolve ended at most ``bound`` ago."""
        hit = self._answers.get(key)
        if hit is None:
            return None
        at, (records, entries) = hit
        if not 0 <= now - at <= self.bound:
            self._drop(key)
            return None
        return list(records), list(entries)

    def begin(self) -> int:
        """A token for a resolve that starts now (pass it to ``keep`` and ``current``)."""
        return self._epoch

    def current(self, key: bytes, token: int) -> bool:
        """Whether no write to ``key`` began since the resolve holding ``token`` did."""
        return token >= self._floor and self._writes.get(key, 0) <= token

    def keep(self, key: bytes, token: int, now: float, answer: Resolution) -> bool:
        """Keep ``answer`` for ``key`` unless a write to it began since ``token``."""
        weight = _weight(answer)
        if self.bound <= 0 or not self.current(key, token) or weight > self.max_bytes // 16:
            return False
        self._drop(key)
        self._answers[key] = (now, (list(answer[0]), list(answer[1])))
        self.bytes += weight
        while len(self._answers) > self.size or self.bytes > self.max_bytes:
            self._drop(next(iter(self._answers)))  # the oldest
        return True

    def _drop(self, key: bytes) -> None:
        gone = self._answers.pop(key, None)
        if gone is not None:
            self.bytes -= _weight(gone[1])

    def written(self, key: bytes) -> None:
        """A write through this peer to ``key`` begins or ended: drop its answer; resolves
        begun before now are not kept."""
        self._epoch += 1
        self._drop(key)
        self._writes.pop(key, None)
        self._writes[key] = self._epoch
        while len(self._writes) > _WRITES_REMEMBERED:
            _, epoch = self._writes.popitem(last=False)
            self._floor = max(self._floor, epoch)


def _weight(answer: Resolution) -> int:
    """The bytes of an answer's records and entries."""
    return sum(map(len, answer[0])) + sum(map(len, answer[1]))


def union(paths: Sequence[Sequence[Contact]], key: bytes) -> list[Contact]:
    """The contacts of all paths, each once, closest to ``key`` first."""
    seen: dict[NodeId, Contact] = {}
    for path in paths:
        for c in path:
            seen.setdefault(c.node_id, c)
    return sorted(seen.values(), key=lambda c: distance(c.node_id, key))


def _store_reply(ok: bool, reply: object) -> dhtwire.StoreReply | None:
    """The decoded reply to a store request, or None if there was none or it is not one."""
    if not ok:
        return None
    try:
        return dhtwire.decode_store(reply)
    except WireError:
        return None


class RecordsHost(Protocol):
    """What :class:`Records` asks of the node that owns it (:class:`difs_p2p.dht.Dht`)."""

    config: DhtConfig
    store: RecordStore
    clock: Callable[[], float]
    rtt: RttEstimator

    @property
    def node_id(self) -> bytes: ...

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None: ...
    def adopt(self, task: asyncio.Task[Any]) -> None: ...
    async def lookup_paths(
        self, key: bytes, rpc: str = "find_node", *, with_value: bool = False
    ) -> LookupResult: ...
    async def call_store(
        self, contact: Contact, key: bytes, value: bytes, entries: Sequence[bytes] = ()
    ) -> tuple[bool, Any]: ...
    async def call_find(
        self, contact: Contact, rpc: str, key: bytes, *extra: Any
    ) -> tuple[bool, Any]: ...


class Records:
    """Records and entries on the k closest peers, through ``host``."""

    def __init__(self, host: RecordsHost) -> None:
        self.host = host
        # key -> (loop time, k closest peers that answered a lookup of it), oldest first
        # (per disjoint path)
        self._recent_closest: dict[bytes, tuple[float, list[list[Contact]]]] = {}
        # answers to clients' resolves (resolve_cached), and the lookups under way for
        # them: key -> (ResolveCache token, task)
        self.cache = ResolveCache(host.config.resolve_cache)
        self._inflight: dict[bytes, tuple[int, asyncio.Task[Resolution]]] = {}

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
        self.cache.written(key)
        try:
            return await self._put_with_entries(key, value, entries)
        finally:
            self.cache.written(key)  # this writer's next resolve here reads its write

    async def _put_with_entries(self, key: bytes, value: bytes, entries: Sequence[bytes]) -> Stored:
        paths = await self._closest_for_write(key)
        peers = union(paths, key)
        accepted = refused = 0
        here = False
        mine = self._among_closest(key, peers)
        if mine:
            if self.host.store.put(key, value, self.host.clock()).accepted:
                accepted += 1
                here = True
            else:
                refused += 1
        entries_accepted = self._add_here(key, entries)
        # The first batch of entries rides with the record (one request per peer); the
        # rest go as add_entries. A peer that predates entries in `store` refuses the
        # request with a bare `false` and is asked again the old way.
        batches = entry_batches(entries, first=dhtwire.ENTRY_BATCH_BYTES - len(value))
        first, rest = batches[0], batches[1:]
        stores = self._store_at(peers, key, value, first)
        added = self._send_entries(key, rest, peers)
        replies, more = await asyncio.gather(stores, added)
        entries_accepted += more
        older: list[Contact] = []
        took: set[NodeId] = set()
        reached = int(mine) + sum(ok for ok, _ in replies)
        for contact, (ok, reply) in zip(peers, replies, strict=True):
            answer = _store_reply(ok, reply)
            if answer is not None and answer.entries is not None:
                if answer.stored:
                    took.add(contact.node_id)
                else:
                    refused += 1
                entries_accepted += answer.entries
            elif answer is not None and answer.stored:
                took.add(contact.node_id)  # without entries in the request
            elif answer is not None and first:
                older.append(contact)  # a bare false: it predates entries in store
            else:
                refused += 1
        if older:
            again = self._store_at(older, key, value)
            replies, more = await asyncio.gather(again, self._send_entries(key, [first], older))
            entries_accepted += more
            for contact, (ok, reply) in zip(older, replies, strict=True):
                if _store_reply(ok, reply) == dhtwire.StoreReply(True):
                    took.add(contact.node_id)
                else:
                    refused += 1
        accepted += len(took)
        used = [p for p in paths if p]
        served: set[NodeId] = set()
        readable = sum(
            await asyncio.gather(
                *(
                    self._read_back(key, value, [c for c in p if c.node_id in took], served)
                    for p in used
                )
            )
        )
        quorum = min(self.host.config.write_quorum_paths, len(used))
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
        return Stored(accepted, refused, entries_accepted, len(used), readable, quorum, reached)

    async def _read_back(
        self, key: bytes, value: bytes, peers: list[Contact], served: set[NodeId]
    ) -> bool:
        """Whether one of ``peers`` (one path's, closest first) serves ``value`` (or a
        better record) at ``key``: asked in waves of 1, 2, 4, ... peers until one does,
        so an honest path costs one request; adds the peers that served it to ``served``."""
        policy = self.host.store.policy
        mine = policy.record_rank(key, value, self.host.clock())
        start, wave = 0, 1
        while start < len(peers):
            batch = peers[start : start + wave]
            start, wave = start + wave, wave * 2
            replies = await self._answers(
                [self.host.call_find(c, "find_value", key) for c in batch]
            )
            found = False
            for contact, (ok, reply) in zip(batch, replies, strict=True):
                got = dhtwire.value_of(reply) if ok else None
                if not isinstance(got, bytes):
                    continue
                rank = None if got == value else policy.record_rank(key, got, self.host.clock())
                if got == value or (mine is not None and rank is not None and rank > mine):
                    served.add(contact.node_id)
                    found = True
            if found:
                return True
        return False

    def _among_closest(self, key: bytes, peers: list[Contact]) -> bool:
        """Whether this peer is among the k closest to ``key`` (``peers`` sorted)."""
        k = self.host.config.ksize
        return len(peers) < k or distance(self.host.node_id, key) < distance(
            peers[k - 1].node_id, key
        )

    def remember_closest(self, key: bytes, closest: list[list[Contact]]) -> None:
        if self.host.config.closest_reuse <= 0:
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
            if asyncio.get_running_loop().time() - at <= self.host.config.closest_reuse:
                return closest
        return (await self.host.lookup_paths(key, "find_node")).paths

    async def get(self, key: bytes) -> list[bytes]:
        """Every valid record the k closest peers (and this one) hold, best first.

        Peers among the k closest that answered with an older record or none get the best
        one (read-repair).
        """
        return self._best_records(key, await self.host.lookup_paths(key, "find_value"))

    async def resolve_cached(self, key: bytes) -> Resolution:
        """``resolve`` for a client: answered from this peer's last resolve of ``key`` if
        it ended at most ``resolve_cache`` seconds ago and no write through this peer
        touched ``key`` since it began (:class:`ResolveCache`); concurrent calls for one
        key share one lookup. Maintenance and draining call ``resolve`` (always a lookup).
        """
        if self.cache.bound <= 0:
            return await self.resolve(key)
        hit = self.cache.get(key, asyncio.get_running_loop().time())
        if hit is not None:
            return hit
        flight = self._inflight.get(key)
        if flight is None or not self.cache.current(key, flight[0]):
            task = asyncio.get_running_loop().create_task(self.resolve(key))
            self.host.adopt(task)
            flight = (self.cache.begin(), task)
            self._inflight[key] = flight

            def landed(_: object, key: bytes = key, flight: Any = flight) -> None:
                if self._inflight.get(key) is flight:
                    del self._inflight[key]

            task.add_done_callback(landed)
        records, entries = await asyncio.shield(flight[1])
        return list(records), list(entries)

    async def resolve(self, key: bytes) -> Resolution:
        """``get`` and ``get_entries`` in one lookup: (valid records best first, entries).

        Each of the k closest peers is asked once for its record and its entries
        (``find_entries`` with the value flag); a peer that answers without saying whether
        it holds a record (it predates the flag) is asked with ``find_value``. The answer
        is kept for ``resolve_cached`` (unless a write began meanwhile).
        """
        token = self.cache.begin()
        answer = await self._resolve(key)
        self.cache.keep(key, token, asyncio.get_running_loop().time(), answer)
        return answer

    async def _resolve(self, key: bytes) -> Resolution:
        found = await self.host.lookup_paths(key, "find_entries", with_value=True)
        if found.value_unknown:
            asked = found.value_unknown
            replies = await asyncio.gather(
                *(self.host.call_find(c, "find_value", key) for c in asked)
            )
            for contact, (ok, reply) in zip(asked, replies, strict=True):
                value = dhtwire.value_of(reply) if ok else None
                if isinstance(value, bytes):
                    found.values.append((contact, value))
                else:
                    found.without_value.append(contact)
        records = self._best_records(key, found)
        return records, await self.all_entries(key, found)

    def _best_records(self, key: bytes, found: LookupResult) -> list[bytes]:
        """Every valid record of a lookup and this peer, best first; read-repair the rest."""
        now = self.host.clock()
        candidates = [v for _, v in found.values]
        local = self.host.store.get(key, now)
        if local is not None:
            candidates.append(local)
        # The policy ranks them, counting how many peers returned each (for DIFS: the
        # owner most peers vouch for, then its highest version); every reader agrees.
        best = self.host.store.policy.best_records(key, candidates, now)
        if best:
            stale = [c for c, v in found.values if v != best[0]] + found.without_value
            if local is not None and local != best[0]:
                self.host.store.put(key, best[0], now)
            self.host.spawn(self._repair(key, best[0], stale))
        return best

    async def _repair(self, key: bytes, value: bytes, peers: list[Contact]) -> None:
        await asyncio.gather(*(self.host.call_store(c, key, value) for c in peers))

    async def add_entries(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Add signed entries under ``key`` on the k closest peers; returns acceptances."""
        self.cache.written(key)
        try:
            paths = await self._closest_for_write(key)
            return await self._add_entries_to(key, entries, union(paths, key))
        finally:
            self.cache.written(key)

    async def _add_entries_to(
        self, key: bytes, entries: Sequence[bytes], peers: list[Contact]
    ) -> int:
        if not entries:
            return 0
        accepted = self._add_here(key, entries)
        return accepted + await self._send_entries(key, entry_batches(entries), peers)

    def _add_here(self, key: bytes, entries: Sequence[bytes]) -> int:
        """Add ``entries`` to this peer's own store; the number accepted."""
        now = self.host.clock()
        return sum(self.host.store.add_entry(key, e, now).accepted for e in entries)

    async def _send_entries(
        self, key: bytes, batches: Sequence[Sequence[bytes]], peers: list[Contact]
    ) -> int:
        """``add_entries`` of each batch to each peer; the acceptances."""
        accepted = 0
        calls: list[Coroutine[Any, Any, tuple[bool, Any]]] = [
            self.host.call_find(c, "add_entries", key, list(batch))
            for c in peers
            for batch in batches
            if batch
        ]
        if not calls:
            return 0
        for ok, reply in await self._answers(calls):
            if ok:
                accepted += dhtwire.decode_count(reply)
        return accepted

    async def _store_at(
        self, peers: Sequence[Contact], key: bytes, value: bytes, entries: Sequence[bytes] = ()
    ) -> list[tuple[bool, Any]]:
        """``store`` at each of ``peers`` (``_answers``). The requests are made only once
        this runs: a write cancelled before (a drain stopped, say) leaves none unsent."""
        return await self._answers([self.host.call_store(c, key, value, entries) for c in peers])

    async def _answers(
        self, calls: Sequence[Coroutine[Any, Any, tuple[bool, Any]]]
    ) -> list[tuple[bool, Any]]:
        """The replies to requests sent at once, in order.

        A request still unanswered a stall time after the latest reply (adaptive, as in
        lookups) counts as unanswered, ``(False, None)``: a dead peer among the k closest
        costs a write the stall time, not ``rpc_timeout``. Until the first reply, each
        request has its whole ``rpc_timeout``: peers that are all slower than the stall
        time (a loaded machine, a slow link) are waited for, not all taken for dead. A
        request cut short runs on in the background: a late store still lands, and a
        timeout still counts towards evicting the contact.
        """
        tasks = [asyncio.create_task(c) for c in calls]
        stall = self.host.rtt.timeout(
            self.host.config.lookup_stall_min, self.host.config.lookup_stall
        )
        pending = set(tasks)
        answered = False
        try:
            while pending:
                done, pending = await asyncio.wait(
                    pending,
                    timeout=stall if answered else None,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    break
                answered = answered or any(t.result()[0] for t in done)
        except BaseException:
            for task in pending:
                task.cancel()
            raise
        for task in pending:
            self.host.adopt(task)
        return [t.result() if t.done() else (False, None) for t in tasks]

    async def get_entries(self, key: bytes) -> list[bytes]:
        """The union of the entries under ``key`` held by the k closest peers and here."""
        return await self.all_entries(key, await self.host.lookup_paths(key, "find_entries"))

    async def all_entries(self, key: bytes, found: LookupResult) -> list[bytes]:
        """The entries of a lookup, the further pages of the peers that had more, and ours.

        Peers that sent the digest of their entry set are grouped by it (``page_plan``):
        a set that equals ours is not read again, and of each other set the further
        pages of one peer are read, checked against the digest, and only if they do not
        match are the other peers of that group read. Peers without a digest are read
        whole. Each peer's pages come one after another; different peers are read at
        the same time.
        """
        local = self.host.store.entries(key, self.host.clock())

        async def rest(more: MorePages) -> list[bytes]:
            got, offset = list(more.first), more.next
            for _ in range(1000):
                ok, reply = await self.host.call_find(more.contact, "find_entries", key, offset)
                if not ok:
                    break
                try:
                    page, nxt = dhtwire.decode_page(reply)
                except WireError:
                    break
                got.extend(page)
                if nxt <= offset:
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
