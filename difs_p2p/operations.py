"""The control operations a peer answers (``status``, ``resolve``, ``place``, ``hold``,
``publish``, ``release``, ``holds``, ``holds_ranges``, ``prove``, ``check``, ``suspect``,
``abandon``), each with its row in the permission table (control.CONTROL_TABLE), which
service.py checks before a handler runs.

:class:`Operations` is built by the peer from its running parts; its handlers keep the
``args: dict[str, Any]`` style of the CALL frame. See docs/ARCHITECTURE.md, "Publish" and
"Fetch", for how a client uses them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from difs_p2p import control, segments
from difs_p2p.config import PeerConfig
from difs_p2p.control import CONTROL_TABLE
from difs_p2p.dht import Dht
from difs_p2p.errors import (
    DifsError,
    IntegrityError,
    PermissionDeniedError,
    UsageError,
    WireError,
)
from difs_p2p.holders import parse_holder_entry
from difs_p2p.holdings import Holding, Holdings, Query
from difs_p2p.holdproof import prove_message
from difs_p2p.identity import Identity
from difs_p2p.maintenance import gc_due
from difs_p2p.manifest import Manifest, parse_manifest
from difs_p2p.names import NameKey
from difs_p2p.net import PeerNetwork
from difs_p2p.ops import MAX_PROBE_RANGES, hex_arg, int_arg
from difs_p2p.records import record_hash, split_entries
from difs_p2p.repair import Maintainer
from difs_p2p.replicator import Replicator
from difs_p2p.service import ControlHandler
from difs_p2p.store import SegmentStore
from difs_p2p.transfer import Connection
from difs_p2p.uploads import Uploads

__all__ = ["OPERATIONS", "Operations"]

log = logging.getLogger(__name__)

# The control operations, as named in the permission table.
OPERATIONS = frozenset(op for op in CONTROL_TABLE if op.islower())


class Operations:
    """The control handlers of a running peer (see the module docstring)."""

    def __init__(
        self,
        config: PeerConfig,
        *,
        identity: Identity,
        store: SegmentStore,
        dht: Dht,
        holdings: Holdings,
        replicator: Replicator,
        maintainer: Maintainer,
        uploads: Uploads,
        network: PeerNetwork,
        status: Callable[[], dict[str, Any]],
        spawn: Callable[[Coroutine[Any, Any, Any]], object],
    ) -> None:
        self.config = config
        self.identity = identity
        self.store = store
        self.dht = dht
        self.holdings = holdings
        self.replicator = replicator
        self.maintainer = maintainer
        self.uploads = uploads
        self.network = network
        self.status = status
        self.spawn = spawn
        self.handlers: dict[str, ControlHandler] = {
            "status": self._op_status,
            "resolve": self._op_resolve,
            "place": self._op_place,
            "hold": self._op_hold,
            "publish": self._op_publish,
            "release": self._op_release,
            "holds": self._op_holds,
            "holds_ranges": self._op_holds_ranges,
            "prove": self._op_prove,
            "check": self._op_check,
            "suspect": self._op_suspect,
            "abandon": self._op_abandon,
        }
        # every control operation has its handler, and no handler is unlisted
        assert set(self.handlers) == OPERATIONS

    @property
    def address(self) -> tuple[str, int]:
        return self.replicator.address

    async def _op_status(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    async def _op_resolve(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The valid manifests under a name key (best first), its history and holders."""
        key = _key_arg(args)
        dht = self.dht
        records, entries = await dht.resolve(key)
        split = split_entries(entries)
        history = [e.decode() for e in split.history]
        holders = [e.hex() for e in split.holders]
        return {"manifests": [r.decode() for r in records], "history": history, "holders": holders}

    async def _op_place(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Place a just-uploaded object: r copies of each range, this peer included only
        where placement picks it.

        Range i goes to the closest live peers to BLAKE3(integrity || i) that accept it
        (a peer without space refuses and the next one is asked), r copies in all. This
        peer keeps the ranges it is among those peers for; the copies for the others are
        pushed from the uploaded segments, which are then dropped unless kept. The ranges
        kept are freed again unless ``publish`` on this connection stores the manifest.
        """
        key, version, integrity = (
            _key_arg(args),
            int_arg(args, "version"),
            hex_arg(args, "integrity", 32),
        )
        count, stripes = int_arg(args, "segment_count"), int_arg(args, "stripes")
        replicas = max(1, int_arg(args, "replicas"))
        session = self.uploads.session(conn)
        session.busy += 1
        mine: list[Holding] = []
        hashes: list[bytes] = []
        try:
            hashes = await self.replicator.hash_list(integrity, count)
            # an empty object is its hash list alone: one range of no segments
            ranges = segments.stripe_ranges(count, stripes) or [(0, 0)]
            placed = await self.replicator.place(
                key, version, integrity, count, hashes, ranges, replicas, mine
            )
        except BaseException:
            for h in mine:
                with contextlib.suppress(DifsError):
                    await self.replicator.free_holding(h)
            raise
        else:
            session.placed[(key, version, integrity)] = mine
        finally:
            session.busy -= 1
            session.active = asyncio.get_running_loop().time()
            # what placement did not give this peer is not needed here any more
            await asyncio.to_thread(self.store.end_session, session.id, [integrity, *hashes])
        return placed

    async def _op_hold(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Check that segments start..end are stored here and sign a holder entry."""
        key, version, integrity = (
            _key_arg(args),
            int_arg(args, "version"),
            hex_arg(args, "integrity", 32),
        )
        count = int_arg(args, "segment_count")
        start, end = int_arg(args, "start"), int_arg(args, "end")
        reason = args.get("reason")
        if conn.role == "peer" and isinstance(reason, dict) and reason.get("kind") == "repair":
            await self._check_co_holder(conn, key, version, start, end)
        _, entry = await self.replicator.hold(key, version, integrity, count, start, end)
        return {"entry": entry.raw.hex()}

    async def _check_co_holder(
        self, conn: Connection, key: bytes, version: int, start: int, end: int
    ) -> None:
        """A peer repairing a range must hold it: its own entry for that version, covering
        the range, is in the DHT (entries are signed, so it cannot borrow another's)."""
        for raw in split_entries(await self.dht.get_entries(key)).holders:
            with contextlib.suppress(DifsError):
                entry = parse_holder_entry(raw)
                if (
                    entry.node_id == conn.remote_id
                    and entry.version == version
                    and entry.start <= start
                    and end <= entry.end
                ):
                    return
        raise PermissionDeniedError("a repair comes from a holder of the range; this peer is not")

    async def _op_publish(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Store a signed manifest and its holder entries on the name's key/value peers.

        If every one of the k closest peers took the manifest, no other record can win
        there; otherwise (a racing publisher, a peer that did not answer) the name is read
        back to learn which record won. Peers admit entries only after the manifest they
        belong to (the record rides first in the same request); if some peer refused
        entries, they are sent again once the record is there.
        """
        raw = str(args.get("manifest", "")).encode()
        manifest = parse_manifest(raw)
        dht = self.dht
        entries = [bytes.fromhex(str(e)) for e in args.get("entries", []) if isinstance(e, str)]
        items = [raw, *entries]
        stored = await dht.put_with_entries(manifest.key, raw, items)
        accepted = stored.accepted
        if accepted and stored.entries_accepted < accepted * len(items):
            await dht.add_entries(manifest.key, items)
        if stored.readable and stored.refused == 0 and accepted > 0:
            winner: str | None = manifest.hash
        else:
            best = await dht.get(manifest.key)
            winner = record_hash(best[0]) if best else None
            if winner == manifest.hash and not stored.readable:
                # only this peer and peers off the read paths (Sybils near the key, say)
                # serve it: not published
                winner = None
        if winner == manifest.hash:
            self.uploads.published(conn, manifest.key, manifest.version, manifest.integrity)
        if winner == manifest.hash and not manifest.deleted:
            # this peer holds what it placed: it knows the lineage at once
            await asyncio.to_thread(
                self.holdings.bind,
                manifest.key,
                manifest.version,
                manifest.integrity,
                manifest.lineage,
            )
        if winner == manifest.hash and (
            manifest.deleted or manifest.version > self.config.repair.keep
        ):
            self.spawn(self._release_everywhere(manifest))
        return {
            "accepted": accepted,
            "winner": winner,
            "readable_paths": stored.readable_paths,
            "quorum": stored.quorum,
        }

    async def _release_everywhere(self, proof: Manifest) -> None:
        """Show every known holder of the name the owner's new manifest (a tombstone, or
        a version that may retire old ones), so each frees what it proves superseded."""
        dht = self.dht
        key = proof.key
        addresses = set()
        for raw in split_entries(await dht.get_entries(key)).holders:
            with contextlib.suppress(DifsError):
                entry = parse_holder_entry(raw)
                if entry.version < proof.version:
                    addresses.add((entry.host, entry.port))
        for address in addresses:
            if address == self.address:
                await self._release(key, proof)
                continue
            try:
                conn = await Connection.open(
                    address, io_timeout=self.config.io_timeout, network=self.network
                )
                try:
                    await conn.call("release", key=key.hex(), proof=proof.raw.decode())
                finally:
                    conn.close()
            except DifsError as exc:
                log.info("release_failed peer=%s reason=%s", address, exc)

    async def _op_release(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Free what an owner-signed manifest (``proof``) supersedes; open to anyone, as
        the proof alone decides."""
        key = _key_arg(args)
        proof = args.get("proof")
        if not isinstance(proof, str):
            raise UsageError(
                "release needs the owner's signed proof: a tombstone or newer manifest"
            )
        try:
            manifest = parse_manifest(proof.encode(), key)
        except WireError as exc:
            raise UsageError(f"malformed proof: {exc}") from None
        return {"freed": await self._release(key, manifest)}

    async def _release(self, key: NameKey, proof: Manifest) -> int:
        """Free the holdings of ``key`` that ``proof`` supersedes in their own lineage
        (``maintenance.gc_due``: same owner or delegate, same lineage root, a tombstone or
        ``keep`` versions newer). Holdings whose lineage is not known yet learn it first
        from the name's view, as maintenance does; the proof alone decides what goes."""
        held = self.holdings.of_key(key)
        unbound = [h for h in held if h.lineage is None and h.version < proof.version]
        if unbound:
            held = await self.maintainer.bind_from_dht(key, held)
        keep, now = self.config.repair.keep, time.time()
        freed = 0
        for h in held:
            if gc_due(h.lineage, proof, keep, now):
                freed += await self.replicator.free_holding(h)
        return freed

    async def _op_holds(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Whether this peer holds a range (asked by other holders for failure detection)."""
        key, version = _key_arg(args), int_arg(args, "version")
        start, end = int_arg(args, "start"), int_arg(args, "end")
        return {"holds": self.holdings.covers(key, version, start, end)}

    async def _op_holds_ranges(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Whether this peer holds each of up to ``MAX_PROBE_RANGES`` ranges, in order (one
        request per co-holder and maintenance round)."""
        queries = _ranges_arg(args)
        db = self.holdings

        def answer() -> list[bool]:
            return [db.covers(key, version, start, end) for key, version, start, end in queries]

        return {"holds": await asyncio.to_thread(answer)}

    async def _op_prove(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Prove to a DHT peer listing our entry that we hold a range: our node key's
        signature over its nonce and the range (holdproof.prove_message), if we hold it."""
        request = CONTROL_TABLE["prove"].check(args)
        assert isinstance(request, control.ProveRequest)
        key, version, start, end = request.key, request.version, request.start, request.end
        if not self.holdings.covers(NameKey(key), version, start, end):
            return {"holds": False}
        message = prove_message(request.nonce, key, version, start, end)
        return {"holds": True, "sig": self.identity.sign(message).hex()}

    async def _op_check(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """Verify every stored segment; with repair, quarantine damage and fetch good copies."""
        repair = args.get("repair") is True
        report = await asyncio.to_thread(self.store.check, repair)
        healed = 0
        if repair:
            for seg_id in [*report.corrupt, *report.missing]:
                healed += await self._heal(seg_id)
        orphans = await asyncio.to_thread(self.store.orphans)
        return {
            "checked": report.checked,
            "ok": report.ok,
            "corrupt": [c.hex() for c in report.corrupt],
            "missing": [m.hex() for m in report.missing],
            "healed": healed,
            # segments no holding keeps: sent by an upload in progress, or orphaned (left
            # by a failed one and collected within the grace time)
            "uploading": {"segments": orphans.pending, "bytes": orphans.pending_bytes},
            "orphans": {"segments": orphans.orphaned, "bytes": orphans.orphaned_bytes},
            "orphan_grace": self.config.repair.orphan_grace,
        }

    async def _op_suspect(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """A fetcher got a bad copy of a segment from us: verify it, heal it if damaged."""
        seg_id = hex_arg(args, "segment", 32)
        store = self.store
        if not store.has(seg_id):
            return {"damaged": False, "healed": 0}
        try:
            await asyncio.to_thread(store.read, seg_id)
            return {"damaged": False, "healed": 0}
        except IntegrityError:
            pass
        return {"damaged": True, "healed": await self._heal(seg_id)}

    async def _heal(self, seg_id: bytes) -> int:
        """Fetch a good copy of a damaged or missing segment from another holder."""
        healed = await self.replicator.heal(seg_id)
        self.maintainer.stats.healed_segments += healed
        return healed

    async def _op_abandon(self, conn: Connection, args: dict[str, Any]) -> dict[str, Any]:
        """The client gives up a publish: drop what this connection uploaded and placed
        but did not publish."""
        return {"freed": await self.uploads.abandon(conn)}


def _ranges_arg(args: dict[str, Any]) -> list[Query]:
    """The ``ranges`` argument of ``holds_ranges``: [[key hex, version, start, end], ...]."""
    items = args.get("ranges")
    if not isinstance(items, list) or len(items) > MAX_PROBE_RANGES:
        raise UsageError(f"ranges must be a list of at most {MAX_PROBE_RANGES} ranges")
    queries: list[Query] = []
    for item in items:
        if not isinstance(item, list) or len(item) != 4:
            raise UsageError("each range must be [key, version, start, end]")
        fields = dict(zip(("key", "version", "start", "end"), item, strict=True))
        queries.append(
            (
                _key_arg(fields),
                int_arg(fields, "version"),
                int_arg(fields, "start"),
                int_arg(fields, "end"),
            )
        )
    return queries


def _key_arg(args: dict[str, Any]) -> NameKey:
    return NameKey(hex_arg(args, "key", 20))
