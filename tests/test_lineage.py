"""The owner's lineage decides: supersession, the reader's choice, entry admission, quotas."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from difs_p2p.delegation import build_delegation
from difs_p2p.holders import build_holder_entry
from difs_p2p.holdings import Holding, Holdings
from difs_p2p.identity import Identity
from difs_p2p.maintenance import NameView, bind_lineage, collect_due, gc_due
from difs_p2p.manifest import Lineage, Manifest, build_manifest, choose_records, linked, supersedes
from difs_p2p.names import name_key
from difs_p2p.recordpolicy import RecordValidator
from difs_p2p.recordstore import RecordStore, write_source
from difs_p2p.segments import IntegrityRoot, SegmentId

NAME = "/a.com/x"
KEY = name_key(NAME)
ROOT_11 = IntegrityRoot(SegmentId(b"\x11" * 32))
ROOT_99 = IntegrityRoot(SegmentId(b"\x99" * 32))
OWNER, STRANGER, WRITER = Identity.generate(), Identity.generate(), Identity.generate()


def version_of(
    signer: Identity,
    version: int,
    parent: Manifest | None,
    *,
    deleted: bool = False,
    integrity: str = "11" * 32,
    delegate_of: Identity | None = None,
    created: float = 1.0,
) -> Manifest:
    delegation = None
    if delegate_of is not None:
        delegation = build_delegation(
            delegate_of, prefix="/a.com", writer=signer.public_key, expires=1e9
        )
    return build_manifest(
        signer,
        name=NAME,
        version=version,
        parent=parent.hash if parent else None,
        root=parent.lineage_root if parent else None,
        size=0 if deleted else 4096,
        segment_size=4096,
        segment_count=0 if deleted else 1,
        stripes=0 if deleted else 1,
        replicas=3,
        integrity=IntegrityRoot(SegmentId(bytes.fromhex(integrity))),
        deleted=deleted,
        created=created,
        delegation=delegation,
    )


V1 = version_of(OWNER, 1, None)
V2 = version_of(OWNER, 2, V1, integrity="22" * 32)
V3_DELEGATE = version_of(WRITER, 3, V2, integrity="33" * 32, delegate_of=OWNER)
TOMB = version_of(OWNER, 4, V2, deleted=True)
# another lineage of the same owner (a fresh version 1 signed again) and a stranger's
OTHER_V1 = version_of(OWNER, 1, None, created=2.0)
OTHER_V9 = version_of(OWNER, 9, OTHER_V1, deleted=True)
EVIL_V1 = version_of(STRANGER, 1, None)
EVIL_TOMB = version_of(STRANGER, 1000, EVIL_V1, deleted=True)
# the stranger's copy of the owner's link fields: same root hash, but its own key
EVIL_FORGED_LINK = build_manifest(
    STRANGER,
    name=NAME,
    version=1000,
    parent=V2.hash,
    root=V1.hash,
    size=0,
    segment_size=4096,
    segment_count=0,
    stripes=0,
    replicas=0,
    integrity=IntegrityRoot(SegmentId(bytes(32))),
    deleted=True,
    created=1.0,
)


@pytest.mark.parametrize(
    ("new", "held", "expected"),
    [
        (V2, V1.lineage, True),  # the owner's next version
        (TOMB, V1.lineage, True),  # the owner's tombstone
        (TOMB, V2.lineage, True),
        (V3_DELEGATE, V2.lineage, True),  # a delegate of the owner
        (V1, V2.lineage, False),  # an older version (replay)
        (V2, V2.lineage, False),  # the same version
        (EVIL_TOMB, V1.lineage, False),  # a stranger's tombstone, whatever its version
        (EVIL_FORGED_LINK, V1.lineage, False),  # copying the owner's links is not enough
        (OTHER_V9, V1.lineage, False),  # the owner's other lineage
    ],
)
def test_supersedes_needs_the_same_owner_and_lineage_and_a_higher_version(
    new: Manifest, held: Lineage, expected: bool
) -> None:
    """Only the owner (or its delegate), in the held lineage, with a higher version."""
    assert supersedes(new, held) is expected


@pytest.mark.parametrize(
    ("found", "pinned", "first"),
    [
        ([(V2, 5), (EVIL_TOMB, 1)], None, V2),  # more peers beat a higher version
        ([(V2, 1), (EVIL_TOMB, 5)], OWNER.public_key, V2),  # the pin beats peers
        ([(V1, 2), (V2, 3), (EVIL_TOMB, 4)], None, V2),  # votes summed per owner: 5 to 4
        ([(V1, 4), (V2, 1)], None, V2),  # within an owner, the highest version
        ([(EVIL_TOMB, 1)], OWNER.public_key, EVIL_TOMB),  # no record of the pinned owner
    ],
    ids=["peers", "pin", "summed", "version", "no-pinned"],  # the keys are random
)
def test_readers_choose_the_owner_most_peers_vouch_for(
    found: list[tuple[Manifest, int]], pinned: bytes | None, first: Manifest
) -> None:
    """Records are ranked by owner (pin, then peers), then version: never version alone."""
    assert choose_records(found, pinned)[0] == first


def test_ties_between_owners_go_to_the_smaller_key_for_every_reader() -> None:
    """Two owners at as many peers: the smaller public key wins, in any input order."""
    a, b = V1, EVIL_V1
    smaller = a if a.owner < b.owner else b
    assert choose_records([(a, 2), (b, 2)])[0] == smaller
    assert choose_records([(b, 2), (a, 2)])[0] == smaller


def test_linked_means_same_owner_same_lineage_not_newer() -> None:
    """History belongs to a record only in its own lineage, and never above it."""
    assert linked(V1, V2) and linked(V2, V2) and linked(V1, TOMB)
    assert not linked(V2, V1)
    assert not linked(EVIL_V1, V2) and not linked(OTHER_V1, V2)
    assert not linked(version_of(OWNER, 2, V1, integrity="99" * 32), V2)  # a fork


def holder(version: int, integrity: str, signer: Identity | None = None) -> bytes:
    return build_holder_entry(
        signer or Identity.generate(),
        key=KEY,
        version=version,
        integrity=IntegrityRoot(SegmentId(bytes.fromhex(integrity))),
        start=0,
        end=0,
        host="127.0.0.1",
        port=4000,
        issued=1,
    ).raw


@pytest.mark.parametrize(
    ("record", "history", "entry", "admitted"),
    [
        (V2, [], holder(2, "22" * 32), True),  # the record's own version
        (V2, [V1], holder(1, "11" * 32), True),  # a version in the stored history
        (V2, [], holder(1, "11" * 32), False),  # no manifest of version 1 stored
        (V2, [], holder(2, "99" * 32), False),  # wrong integrity
        (V2, [], holder(1000, "00" * 32), False),  # a version the owner never signed
        (V2, [EVIL_V1], holder(1, "11" * 32), False),  # a stranger's history vouches nothing
        (None, [], holder(2, "22" * 32), False),  # before the record: refused
        (V2, [], V1.raw, True),  # history of the same owner and lineage
        (V2, [], V2.raw, True),  # the record itself as history
        (V2, [], EVIL_V1.raw, False),  # a stranger's history
        (V2, [], OTHER_V1.raw, False),  # another lineage
        (V1, [], V2.raw, False),  # history newer than the record
        (None, [], V1.raw, False),
    ],
)
def test_entries_are_admitted_only_for_versions_the_owner_signed(
    record: Manifest | None, history: list[Manifest], entry: bytes, admitted: bool
) -> None:
    """Holder entries and history need the stored record's owner and lineage."""
    policy = RecordValidator()
    facts = policy.entry_admission(
        KEY, entry, record.raw if record else None, [m.raw for m in history], 0.0
    )
    assert (not isinstance(facts, str)) is admitted


def test_gc_frees_only_on_the_owners_proof() -> None:
    """A holding is collected on its owner's tombstone or keep-newer version, never on a
    stranger's deleted v1000, and never before its lineage is known."""
    h = Holding(KEY, 1, ROOT_11, 1, 0, 0, 0.0, V1.lineage)
    assert gc_due(h.lineage, TOMB, keep=3, now=0.0)
    assert not gc_due(h.lineage, V2, keep=3, now=0.0)
    assert gc_due(h.lineage, V2, keep=1, now=0.0)
    assert not gc_due(h.lineage, EVIL_TOMB, keep=1, now=0.0)
    assert not gc_due(None, TOMB, keep=1, now=0.0)
    evil_view = NameView(EVIL_TOMB, {}, [], proofs=[EVIL_TOMB, EVIL_FORGED_LINK])
    assert collect_due([h], evil_view, 0.0, keep=1, orphan_after=3600.0) == []
    own_view = NameView(TOMB, {}, [], proofs=[TOMB, EVIL_TOMB])
    assert collect_due([h], own_view, 0.0, keep=3, orphan_after=3600.0) == [h]


def test_a_holding_learns_its_lineage_from_the_chosen_record_only() -> None:
    """An unbound holding binds to the manifest of its version and integrity linked to
    the view's chosen record; a stranger's copy of that version binds nothing."""
    h = Holding(KEY, 1, ROOT_11, 1, 0, 0, 0.0)
    assert bind_lineage(h, NameView(V2, {}, [], proofs=[V2, V1])) == V1.lineage
    evil_copy = version_of(STRANGER, 1, None)  # same version and integrity, other key
    assert bind_lineage(h, NameView(V2, {}, [], proofs=[evil_copy, V2])) is None
    bound = Holding(KEY, 1, h.integrity, 1, 0, 0, 0.0, V1.lineage)
    assert bind_lineage(bound, NameView(V2, {}, [], proofs=[V2, V1])) is None


def test_holdings_databases_gain_lineage_columns_in_place(tmp_path: Path) -> None:
    """A holdings database from before lineages opens, keeps its rows, and binds once."""
    path = tmp_path / "holdings.sqlite3"
    db = sqlite3.connect(path)
    db.execute(
        "CREATE TABLE holdings(key BLOB, version INTEGER, integrity BLOB, count INTEGER,"
        " start INTEGER, end_ INTEGER, since REAL, PRIMARY KEY(key, version, start))"
    )
    db.execute(
        "INSERT INTO holdings VALUES(?,?,?,?,?,?,?)",
        (KEY, 1, ROOT_11, 1, 0, 0, 5.0),
    )
    db.commit()
    db.close()
    holdings = Holdings(path)
    (old,) = holdings.all()
    assert old.lineage is None and old.since == 5.0
    assert holdings.bind(KEY, 1, ROOT_11, V1.lineage) == 1
    assert holdings.bind(KEY, 1, ROOT_11, EVIL_V1.lineage) == 0  # bound once
    holdings.add(Holding(KEY, 1, ROOT_11, 1, 0, 0, 9.0))  # a re-hold keeps it
    assert holdings.of_key(KEY)[0].lineage == V1.lineage
    holdings.close()


def store(**kwargs: int) -> RecordStore:
    return RecordStore(
        None,
        RecordValidator(),
        ttl=3600.0,
        max_records=kwargs.get("max_records", 100),
        max_entries_per_key=kwargs.get("max_entries_per_key", 512),
        max_entries_per_signer=kwargs.get("per_signer", 256),
    )


def test_one_signer_holds_a_bounded_share_of_a_name() -> None:
    """A holder key may hold at most max_entries_per_signer entries per key."""
    s = store(per_signer=2)
    assert s.put(KEY, V2.raw, 0.0).accepted
    one = Identity.generate()
    raws = [
        build_holder_entry(
            one,
            key=KEY,
            version=2,
            integrity=IntegrityRoot(SegmentId(bytes.fromhex("22" * 32))),
            start=i,
            end=i,
            host="127.0.0.1",
            port=4000,
            issued=1,
        ).raw
        for i in range(3)
    ]
    assert [s.add_entry(KEY, r, 0.0, "10.0.0.1").accepted for r in raws] == [True, True, False]
    assert s.add_entry(KEY, holder(2, "22" * 32), 0.0, "10.0.0.1").accepted  # another key


def test_one_source_fills_only_its_share_of_records_and_of_a_name() -> None:
    """A source may take a quarter of the record cap and 3/4 of a key's entry set; other
    sources' names and entries still fit."""
    s = store(max_records=8, max_entries_per_key=8)
    names = [f"/spam/{i}" for i in range(4)]
    spam = [version_of_name(STRANGER, n) for n in names]
    took = [s.put(name_key(m.name), m.raw, 0.0, "10.0.0.66").accepted for m in spam]
    assert took == [True, True, False, False]
    assert s.put(KEY, V2.raw, 0.0, "10.0.0.1").accepted  # an honest name from elsewhere
    junk = [s.add_entry(KEY, holder(2, "22" * 32), 0.0, "10.0.0.66").accepted for _ in range(8)]
    assert junk == [True] * 6 + [False] * 2
    assert all(s.add_entry(KEY, holder(2, "22" * 32), 0.0, "10.0.0.1").accepted for _ in range(2))
    assert s.add_entry(KEY, holder(2, "22" * 32), 0.0, "").accepted is False  # set full


def test_a_newer_version_displaces_old_entries_when_the_set_is_full() -> None:
    """Junk filling a name's set for an old version gives way to the next version."""
    s = store(max_entries_per_key=4)
    s.put(KEY, V1.raw, 0.0)
    for _ in range(4):
        assert s.add_entry(KEY, holder(1, "11" * 32), 0.0).accepted
    s.put(KEY, V2.raw, 0.0)
    assert s.add_entry(KEY, holder(2, "22" * 32), 0.0).accepted
    assert not s.add_entry(KEY, holder(1, "11" * 32), 0.0).accepted


def version_of_name(signer: Identity, name: str) -> Manifest:
    return build_manifest(
        signer,
        name=name,
        version=1,
        parent=None,
        root=None,
        size=0,
        segment_size=4096,
        segment_count=0,
        stripes=1,
        replicas=1,
        integrity=IntegrityRoot(SegmentId(bytes(32))),
        created=1.0,
    )


def test_sources_are_addresses_or_loopback_ports() -> None:
    """Writes count per IPv4 address or IPv6 /64; on loopback (127.0.0.0/8, ::1), where
    local peers share one address, per port."""
    assert write_source("10.1.2.3", 4000) == write_source("10.1.2.3", 4001) == "10.1.2.3"
    assert write_source("127.0.0.1", 4000) != write_source("127.0.0.1", 4001)
    assert write_source("::1", 4000) != write_source("::1", 4001)
    assert write_source("fd77::1", 4000) == write_source("fd77::ffff:2", 4001) == "fd77::/64"
    assert write_source("fd77:0:0:1::1", 4000) != write_source("fd77::1", 4000)
    assert write_source("::ffff:10.1.2.3", 4000) == "10.1.2.3"


# -- with real peers ------------------------------------------------------------------------

SEG = 64 << 10


async def test_revoking_a_delegate_leaves_the_owner_in_charge(tmp_path: Path) -> None:
    """After the owner revokes a writer that published version 2, readers fall back to
    version 1, and the owner's get, get --version 1, versions, put --update and rm work."""
    import os
    import time

    from difs_p2p.client import Client
    from difs_p2p.errors import DeletedError, PermissionDeniedError
    from tests.helpers import client_for, start_peers, stop_all

    peers = await start_peers(tmp_path / "net", 4)
    try:
        alice, bob = Identity.generate(), Identity.generate()
        name = "/t.com/page"
        v1, v2, v3 = (os.urandom(n * SEG // 2) for n in (3, 4, 5))
        files = []
        for i, data in enumerate((v1, v2, v3)):
            files.append(tmp_path / f"v{i + 1}")
            files[-1].write_bytes(data)
        cert = build_delegation(
            alice, prefix="/t.com", writer=bob.public_key, expires=time.time() + 3600
        )
        async with client_for(peers[0], publisher=alice) as client:
            await client.claim("/t.com/")  # a delegation counts only under a claimed prefix
            await client.put(files[0], name, segment_size=SEG)
        async with client_for(peers[1], publisher=bob) as client:
            await client.put(files[1], name, segment_size=SEG, update=True, delegation=cert)
        async with client_for(peers[2], publisher=alice) as client:
            assert (await client.resolve(name)).manifest.version == 2  # before the revocation
            await client.revoke("/t.com", bob.public_key)
            out = tmp_path / "out"
            await client.get(name, out)
            assert out.read_bytes() == v1
            await client.get(name, out, version=1)
            assert out.read_bytes() == v1
            with pytest.raises(Exception, match="no version 2"):
                await client.get(name, out, version=2)
            assert [m.version for m in await client.versions(name)] == [1]
            result = await client.put(files[2], name, segment_size=SEG, update=True)
            assert result.manifest.version == 3  # above the revoked version 2
            assert result.manifest.parent == (await client.versions(name))[0].hash
        async with Client(peers[3].address) as reader:
            await reader.get(name, out)
            assert out.read_bytes() == v3
            assert [m.version for m in await reader.versions(name)] == [1, 3]
        async with client_for(peers[0], publisher=alice) as client:
            tomb = await client.rm(name)
            assert tomb.version == 4
        async with Client(peers[3].address) as reader:
            with pytest.raises(DeletedError):
                await reader.get(name, out)
        async with client_for(peers[1], publisher=bob) as client:
            # storage peers still take a revoked writer's new name (a known limit), but
            # readers refuse every version of it
            files[1].write_bytes(os.urandom(SEG))
            await client.put(files[1], "/t.com/other", segment_size=SEG, delegation=cert)
            with pytest.raises(PermissionDeniedError, match="revoked"):
                await client.resolve("/t.com/other")
    finally:
        await stop_all(peers)


async def test_versions_tell_which_are_still_retrievable(tmp_path: Path) -> None:
    """With --keep-versions 1, a superseded version is collected and `versions` says so;
    the current one is retrievable."""
    import os

    from difs_p2p.config import RepairConfig
    from tests.helpers import client_for, start_peers, stop_all, wait_for

    peers = await start_peers(tmp_path / "net", 4, repair=RepairConfig(keep=1))
    try:
        owner = Identity.generate()
        src = tmp_path / "src"
        async with client_for(peers[0], publisher=owner) as client:
            src.write_bytes(os.urandom(3 * SEG))
            await client.put(src, "/r.net/a", segment_size=SEG)
            assert [ok for _, ok in await client.version_status("/r.net/a")] == [True]
            src.write_bytes(os.urandom(3 * SEG))
            await client.put(src, "/r.net/a", segment_size=SEG, update=True)

            async def first_collected() -> bool:
                status = await client.version_status("/r.net/a")
                return [(m.version, ok) for m, ok in status] == [(1, False), (2, True)]

            await wait_for(first_collected)
            out = tmp_path / "out"
            await client.get("/r.net/a", out)
            assert out.read_bytes() == src.read_bytes()
    finally:
        await stop_all(peers)


def test_retention_is_a_validated_peer_option() -> None:
    """keep-versions is a RepairConfig field of at least 1, 3 by default."""
    from difs_p2p.config import RepairConfig
    from difs_p2p.errors import UsageError

    assert RepairConfig().keep == 3
    assert RepairConfig(keep=1).keep == 1
    with pytest.raises(UsageError):
        RepairConfig(keep=0)


def test_keep_versions_is_a_peer_command_line_option(tmp_path: Path) -> None:
    """`difs-peer join --keep-versions N` sets retention; 0 is refused with exit 2."""
    import subprocess
    import sys

    peer = Path(sys.executable).with_name("difs-peer")
    bad = subprocess.run(
        [str(peer), "join", "--keep-versions", "0", "--data", str(tmp_path / "p")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2
    assert "--keep-versions must be at least 1" in bad.stderr
    shown = subprocess.run(
        [str(peer), "join", "--help"], capture_output=True, text=True, timeout=60
    )
    assert "--keep-versions" in shown.stdout


def test_quota_totals_follow_every_insert_eviction_and_expiry(tmp_path: Path) -> None:
    """The in-memory totals the quotas read agree with the database, across a reopen."""
    path = tmp_path / "records.sqlite3"
    s = RecordStore(path, RecordValidator(), ttl=10.0, max_records=8, max_entries_per_key=4)
    s.put(KEY, V1.raw, 0.0, "10.0.0.1")
    for i in range(4):
        assert s.add_entry(KEY, holder(1, "11" * 32), 0.0, f"10.0.0.{i + 2}").accepted
    s.put(KEY, V2.raw, 1.0, "10.0.0.1")
    assert s.add_entry(KEY, holder(2, "22" * 32), 1.0, "10.0.0.9").accepted  # evicts a v1
    assert s.counts() == (s._records, s._entries) == (1, 4)
    s.expire(100.0)
    assert s.counts() == (s._records, s._entries) == (0, 0)
    s.put(KEY, V2.raw, 100.0)
    s.add_entry(KEY, holder(2, "22" * 32), 100.0)
    s.close()
    again = RecordStore(path, RecordValidator(), ttl=10.0, max_records=8, max_entries_per_key=4)
    assert again.counts() == (again._records, again._entries) == (1, 1)
    again.close()


def test_a_bound_holding_is_not_replaced_by_other_bytes_under_its_version(
    tmp_path: Path,
) -> None:
    """Placing other bytes under a version the owner published does not evict the
    owner's holding; before the lineage is known, the later placement is recorded."""
    from difs_p2p.errors import AlreadyExistsError

    holdings = Holdings(tmp_path / "h.sqlite3")
    mine = Holding(KEY, 1, ROOT_11, 1, 0, 0, 1.0)
    other = Holding(KEY, 1, ROOT_99, 1, 0, 0, 2.0)
    holdings.add(other)
    holdings.add(mine)  # unbound: the owner's placement replaces it
    holdings.bind(KEY, 1, ROOT_11, V1.lineage)
    with pytest.raises(AlreadyExistsError):
        holdings.add(other)
    (kept,) = holdings.all()
    assert kept.integrity == ROOT_11 and kept.lineage == V1.lineage
    holdings.close()


def test_one_source_fills_only_its_share_of_all_entries() -> None:
    """Entries under many names from one source stop at its share of the overall cap."""
    s = RecordStore(
        None, RecordValidator(), ttl=3600.0, max_records=100, max_entries_per_key=512, max_entries=8
    )
    names = [version_of_name(OWNER, f"/many/{i}") for i in range(4)]
    for m in names:
        assert s.put(m.key, m.raw, 0.0).accepted

    def entry(m: Manifest) -> bytes:
        return build_holder_entry(
            Identity.generate(),
            key=m.key,
            version=1,
            integrity=IntegrityRoot(SegmentId(bytes(32))),
            start=0,
            end=0,
            host="127.0.0.1",
            port=4000,
            issued=1,
        ).raw

    spam = [s.add_entry(m.key, entry(m), 0.0, "10.0.0.66").accepted for m in names]
    assert spam == [True, True, False, False]
    assert all(s.add_entry(m.key, entry(m), 0.0, "10.0.0.1").accepted for m in names[:2])
