"""Child entries and the pure rules of a listing (listing.py), without sockets: the codec
and every refusal, shard keys and path bits, where writers store and where readers look,
merging, byte order, pages and tokens.

The golden child entries live in tests/data/listing/. After a deliberate change of the
format, rewrite them with ``DIFS_REGEN_GOLDEN=1 pytest tests/test_listing.py``."""

from __future__ import annotations

import contextlib
import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p.delegation import build_delegation
from difs_p2p.errors import IntegrityError, UsageError, WireError
from difs_p2p.identity import Identity
from difs_p2p.listing import (
    CHILD_DOMAIN,
    FOLDER,
    MAX_DEPTH,
    OBJECT,
    REMOVED,
    SHARD_ENTRIES,
    SPLIT,
    ChildEntry,
    ListEntry,
    _body,
    build_child,
    bulk_layout,
    decode_child,
    decode_token,
    descend,
    encode_token,
    folder_ancestors,
    group_children,
    is_split,
    merge_children,
    next_issued,
    normalize_folder,
    object_etag,
    owner_fingerprint,
    paginate,
    parse_child,
    path_bits,
    place_here,
    shard_key,
    split_below,
    sub_shards,
    valid_children,
)

OWNER = Identity.from_seed(b"\x01" * 32)
WRITER = Identity.from_seed(b"\x02" * 32)
FP = owner_fingerprint(OWNER.public_key)
ROOT = f"/key/{OWNER.fingerprint}"
NOW = 1_800_000_000


def child(name: str = "a", *, flags: int = OBJECT, level: int = 0, issued: int = NOW,
          version: int = 1, size: int = 5, parent: str = ROOT,
          etag: str = "") -> ChildEntry:  # fmt: skip
    return build_child(
        OWNER, owner=FP, parent=parent, child=name, flags=flags, level=level, issued=issued,
        version=0 if flags & FOLDER else version, size=0 if flags & FOLDER else size,
        created=1000.5, etag=etag,
    )  # fmt: skip


def signed(body: bytes, by: Identity = OWNER) -> bytes:
    """Sign any body as a child entry: to build what build_child refuses."""
    return body + by.sign(CHILD_DOMAIN + body)


def body(*, flags: int = OBJECT, owner: bytes = FP, level: int = 0, bits: int | None = None,
         parent: str = ROOT, name: str = "a", version: int = 1, size: int = 1,
         created: float = 1.0, writer: Identity = OWNER, etag: str = "") -> bytes:  # fmt: skip
    b = path_bits(name, level) if bits is None else bits
    return _body(flags, owner, level, b, NOW, version, size, created, parent, name,
                 writer.public_key, None, etag)  # fmt: skip


def test_a_child_entry_round_trips_and_verifies() -> None:
    """What build_child signs decodes to the same fields and verifies."""
    e = child("clip.mp4", level=3)
    again = parse_child(e.raw, NOW)
    assert again == e
    bits = path_bits("clip.mp4", 3)
    assert (again.parent, again.child, again.level, again.bits) == (ROOT, "clip.mp4", 3, bits)
    assert again.full_name == f"{ROOT}/clip.mp4"
    assert child("videos", flags=FOLDER).full_name == f"{ROOT}/videos/"
    assert e.raw[0] == 2  # record kind 2


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (signed(body(flags=0)), "flags"),
        (signed(body(flags=OBJECT | FOLDER)), "flags"),
        (signed(body(flags=FOLDER | REMOVED, version=0, size=0)), "flags"),
        (signed(body(flags=OBJECT | 16)), "flags"),
        (signed(body(level=MAX_DEPTH + 1, bits=0)), "level"),
        (signed(body(level=2, bits=4)), "level"),
        (signed(body(level=4, bits=path_bits("a", 4) ^ 1)), "bits"),
        (signed(body(name="b/c")), "child"),
        (signed(body(name="..")), "child"),
        (signed(body(name="x\x07")), "child"),
        (signed(body(name="")), "child"),
        (signed(body(name="e\u0301")), "child"),  # not NFC
        (signed(body(parent=ROOT + ("/" + "p" * 240) * 4, name="c" * 30)), "child"),  # too long
        (signed(body(parent="/a//b")), "parent"),
        (signed(body(parent="/key")), "parent"),
        (signed(body(parent="/key/zz")), "parent"),
        (signed(body(parent=ROOT + "/")), "parent"),
        (signed(body(owner=b"\x00" * 16)), "owner"),  # /key/<fp> folders are <fp>'s
        (signed(body(flags=SPLIT, name="a")), "child"),
        (signed(body(flags=FOLDER, version=3, size=0)), "version"),
        (signed(body(created=float("nan"))), "created"),
        (signed(body())[:-1], "signature"),
        (signed(body()) + b"\x00", "signature"),
        (b"\x01" + signed(body())[1:], "kind"),
        (signed(body(etag="0" * 31)), "etag"),
        (signed(body(etag="A" * 32)), "etag"),
        (signed(body(etag="0" * 32 + "-0")), "etag"),
        (signed(body(etag="0" * 32 + "-100000")), "etag"),
        (signed(body(etag="0" * 63)), "etag"),
        (signed(body(etag="0" * 32 + "\n")), "etag"),
        (signed(body(flags=FOLDER, version=0, size=0, etag="0" * 32)), "etag"),
        (signed(body(flags=OBJECT | REMOVED, etag="0" * 32)), "etag"),
    ],
)
def test_malformed_child_entries_are_wire_errors(raw: bytes, field: str) -> None:
    """Every shape rule refuses with a WireError naming its field."""
    with pytest.raises(WireError) as caught:
        decode_child(raw)
    assert caught.value.field == field


@pytest.mark.parametrize(
    "etag", ["", "0123456789abcdef" * 2, "0123456789abcdef" * 2 + "-10000", "ab" * 32]
)
def test_an_object_entry_carries_its_etag_signed(etag: str) -> None:
    """An object's entry carries its ETag (or none), signed, and the listing shows it."""
    e = child("clip.mp4", etag=etag)
    again = parse_child(e.raw, NOW)
    assert again.etag == etag
    (listed,) = merge_children([again])
    assert listed.etag == (etag or None)
    if etag:
        at = e.raw.index(etag.encode())
        forged = e.raw[:at] + (b"1" if e.raw[at : at + 1] != b"1" else b"2") + e.raw[at + 1 :]
        with pytest.raises(IntegrityError):
            parse_child(forged, NOW)


def test_object_etag_is_the_s3_etag_else_the_manifest_hash() -> None:
    """The ETag an entry carries is the metadata's S3 ETag when there is one."""
    assert object_etag("ab" * 16, "cd" * 32) == "ab" * 16
    assert object_etag(None, "cd" * 32) == "cd" * 32
    assert object_etag("", "cd" * 32) == "cd" * 32


GOLDEN_DIR = Path(__file__).parent / "data" / "listing"


@pytest.mark.parametrize(
    ("name", "make"),
    [
        (
            "object",
            lambda: child(
                "clip.mp4", level=2, issued=NOW, version=3, size=1234, etag="0f" * 16 + "-2"
            ),
        ),
        ("folder", lambda: child("videos", flags=FOLDER)),
        (
            "marker",
            lambda: build_child(
                OWNER, owner=FP, parent=ROOT, child="", flags=SPLIT, level=1, bits=1, issued=NOW
            ),
        ),
        ("delegated", lambda: _delegated(ROOT + "/v", NOW + 10)),
    ],
)
def test_golden_child_entries(name: str, make: object) -> None:
    """The bytes of each kind of entry are fixed (Ed25519 signatures are deterministic)."""
    assert callable(make)
    entry = make()
    path = GOLDEN_DIR / f"{name}.bin"
    if os.environ.get("DIFS_REGEN_GOLDEN") == "1":
        GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
        path.write_bytes(entry.raw)
    assert path.read_bytes() == entry.raw
    assert parse_child(path.read_bytes(), NOW) == entry


@given(st.binary(max_size=400))
def test_any_bytes_decode_or_are_a_wire_error(raw: bytes) -> None:
    """A peer's bytes are a child entry or a WireError, never another exception."""
    with contextlib.suppress(WireError):
        decode_child(b"\x02" + raw)


def test_every_truncation_is_a_wire_error() -> None:
    """Any prefix of an entry (a peer's truncated value) decodes to a WireError, never an
    IndexError or struct.error."""
    raw = child("some-name").raw
    for n in range(len(raw)):
        with pytest.raises(WireError):
            decode_child(raw[:n])


def _delegated(prefix: str, expires: float, owner: Identity = OWNER) -> ChildEntry:
    # a whole number of seconds is signed as 1.0, not 1 (as the CLI's delegations are)
    d = build_delegation(owner, prefix=prefix, writer=WRITER.public_key, expires=expires + 0.5)
    return build_child(
        WRITER, owner=FP, parent=ROOT + "/v", child="a", flags=OBJECT, level=0, issued=NOW,
        version=1, delegation=d,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: child(), None),
        (lambda: _delegated(ROOT + "/v", NOW + 10), None),
        (lambda: decode_child(signed(body(), by=WRITER)), "bad signature"),
        (lambda: decode_child(signed(body(writer=WRITER), by=WRITER)), "folder.s owner"),
        (lambda: _delegated(ROOT + "/v", NOW - 2), "delegation does not cover"),  # expired
        (lambda: _delegated(ROOT + "/w", NOW + 10), "delegation does not cover"),
        (
            lambda: _delegated(f"/key/{WRITER.fingerprint}/v", NOW + 10, owner=WRITER),
            "delegation does not cover",
        ),
        (lambda: child(issued=NOW + 601), "future"),
    ],
)
def test_only_the_owner_or_its_delegate_signs_a_child_entry(
    make: object, error: str | None
) -> None:
    """Signature, owner, delegation (covering, not expired at issued) and the clock."""
    assert callable(make)
    entry = make()
    if error is None:
        parse_child(entry.raw, NOW)
        return
    with pytest.raises(IntegrityError, match=error):
        parse_child(entry.raw, NOW)


def test_a_flipped_signature_bit_is_refused() -> None:
    """A signature that does not verify is an IntegrityError."""
    raw = bytearray(child().raw)
    raw[-1] ^= 1
    with pytest.raises(IntegrityError):
        parse_child(bytes(raw), NOW)


def test_shard_keys_follow_the_documented_formula() -> None:
    """SHA-256(domain + owner + parent + 0 + level + u32 bits)[:20], distinct per part."""
    want = hashlib.sha256(
        b"difs-children-v1\x00" + FP + ROOT.encode() + b"\x00" + struct.pack("!BI", 3, 5)
    ).digest()[:20]
    assert shard_key(FP, ROOT, 3, 5) == want
    keys = {shard_key(FP, ROOT, 0, 0), shard_key(FP, ROOT, 1, 0), shard_key(FP, ROOT, 1, 1),
            shard_key(FP, ROOT + "/a", 0, 0), shard_key(b"\x00" * 16, ROOT, 0, 0)}  # fmt: skip
    assert len(keys) == 5
    assert child("x", level=2).shard == shard_key(FP, ROOT, 2, path_bits("x", 2))


@pytest.mark.parametrize("name", ["a", "clip.mp4", "é", "x" * 255])
def test_path_bits_are_prefixes_of_one_hash(name: str) -> None:
    """Each level adds one bit of SHA-256(domain + child) to the last."""
    top = int.from_bytes(hashlib.sha256(CHILD_DOMAIN + name.encode()).digest()[:4], "big")
    assert path_bits(name, 0) == 0
    for level in range(1, MAX_DEPTH + 1):
        assert path_bits(name, level) == top >> (32 - level)
        assert path_bits(name, level) >> 1 == path_bits(name, level - 1)
    assert sub_shards(2, 3) == [(3, 6), (3, 7)]
    assert sub_shards(MAX_DEPTH, 0) == []


def test_valid_children_keep_what_verifies_at_its_own_shard() -> None:
    """A reader drops garbage, forgeries and entries replayed at another shard key."""
    good, other = child("a"), child("b", parent=ROOT + "/sub")
    forged = signed(body(writer=WRITER), by=WRITER)
    got = valid_children([good.raw, other.raw, forged, b"", b"\x02junk"], good.shard, NOW)
    assert got == [good]


@pytest.mark.parametrize(
    ("shard", "entry", "here"),
    [
        ([], child("a"), True),
        ([child(f"c{i}") for i in range(SHARD_ENTRIES - 1)], child("a"), True),
        ([child(f"c{i}") for i in range(SHARD_ENTRIES)], child("a"), False),
        ([child(f"c{i}") for i in range(SHARD_ENTRIES)], child("c7", issued=NOW + 5), True),
        ([child(f"c{i}") for i in range(SHARD_ENTRIES)], child("a", level=MAX_DEPTH), True),
    ],
)
def test_a_writer_stores_where_the_child_is_or_there_is_room(
    shard: list[ChildEntry], entry: ChildEntry, here: bool
) -> None:
    """place_here: the shard holds the child, or fewer than B children, or is deepest."""
    assert place_here(shard, entry) is here


def test_readers_descend_below_a_marker_or_a_full_shard() -> None:
    """is_split: a split marker or SHARD_ENTRIES children send the reader deeper."""
    marker = build_child(OWNER, owner=FP, parent=ROOT, child="", flags=SPLIT, level=0,
                         bits=0, issued=NOW)  # fmt: skip
    assert not is_split([child("a")])
    assert is_split([marker])
    assert is_split([child(f"c{i}") for i in range(SHARD_ENTRIES)])
    assert next_issued([child("a", issued=NOW + 3)], child("a").identity, NOW) == NOW + 4
    assert next_issued([child("b", issued=NOW + 3)], child("a").identity, NOW) == NOW


def test_a_bulk_layout_is_what_the_walk_settles_on() -> None:
    """Every child lands in exactly one shard on its own path, none over B; split shards
    hold nothing but their marker."""
    names = [f"n{i}" for i in range(1000)]
    layout = bulk_layout(names)
    placed = [c for *_, mine, _ in layout for c in mine]
    assert sorted(placed) == sorted(names)
    for level, bits, mine, split in layout:
        assert len(mine) <= SHARD_ENTRIES
        assert all(path_bits(c, level) == bits for c in mine)
        assert not (split and mine)


def test_merge_keeps_the_newest_drops_removed_and_orders_bytes() -> None:
    """Newest per identity (issued, then version, then removal), no markers, no removed
    names, byte order: "x-y" < "x/" < "x0"."""
    entries = [
        child("x0"),
        child("x", flags=FOLDER),
        child("x-y"),
        child("gone"),
        child("gone", flags=OBJECT | REMOVED, version=2, size=0),
        child("upd", version=1, size=1),
        child("upd", issued=NOW + 1, version=2, size=9, level=1),
        build_child(
            OWNER, owner=FP, parent=ROOT, child="", flags=SPLIT, level=0, bits=0, issued=NOW
        ),
    ]
    merged = merge_children(entries)
    assert [e.name for e in merged] == [f"{ROOT}/upd", f"{ROOT}/x-y", f"{ROOT}/x/", f"{ROOT}/x0"]
    assert (merged[0].size, merged[0].version, merged[2].folder) == (9, 2, True)


@pytest.mark.parametrize("name", [f"{ROOT}/a", f"{ROOT}/é/ü/", "/t.com/x y"])
def test_a_token_round_trips(name: str) -> None:
    """A continuation token is urlsafe base64 of the name, and decodes back."""
    token = encode_token(name)
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=")
    assert decode_token(token) == name


@pytest.mark.parametrize("token", ["!!", "AAAA", encode_token("relative"), "/w=="])
def test_a_bad_token_is_a_usage_error(token: str) -> None:
    """Tokens that are not base64 of a name are refused."""
    with pytest.raises(UsageError, match="continuation token"):
        decode_token(token)


def _entry(name: str) -> ListEntry:
    return ListEntry(name, name.endswith("/"), 0, 0, 0.0, b"")


@given(
    st.sets(st.text(alphabet="ab-/é0", min_size=1, max_size=6), max_size=40),
    st.integers(min_value=1, max_value=7),
)
def test_pages_joined_are_the_sorted_listing(names: set[str], limit: int) -> None:
    """Paginating by tokens yields every name once, in order."""
    entries = sorted((_entry("/r/" + n) for n in names), key=lambda e: e.name)
    got: list[str] = []
    after = None
    while True:
        page = paginate(entries, after, limit)
        got += [e.name for e in page.entries]
        if page.next is None:
            break
        after = decode_token(page.next)
    assert got == [e.name for e in entries]


@pytest.mark.parametrize(
    ("prefix", "folder"),
    [(ROOT + "/", ROOT), (ROOT, ROOT), (ROOT + "/a/b/", ROOT + "/a/b"), ("/t.com/", "/t.com")],
)
def test_a_prefix_is_a_folder_in_normal_form(prefix: str, folder: str) -> None:
    """Trailing slashes go; the owned root /key/<fp> is a folder though not a name."""
    assert normalize_folder(prefix) == folder


@pytest.mark.parametrize("prefix", ["", "a/", "/", "/a//b", "/key/"])
def test_a_bad_prefix_is_a_usage_error(prefix: str) -> None:
    """A prefix that is no folder is refused with its reason."""
    with pytest.raises(UsageError):
        normalize_folder(prefix)


def test_each_level_of_a_name_is_listed_in_its_folder() -> None:
    """An object in its folder, then each folder in the one above, up to the root."""
    assert folder_ancestors(f"{ROOT}/a/b/c", ROOT) == [
        (f"{ROOT}/a/b", "c", False),
        (f"{ROOT}/a", "b", True),
        (ROOT, "a", True),
    ]
    assert descend(f"{ROOT}/b/", None)
    assert descend(f"{ROOT}/b/", f"{ROOT}/a")
    assert descend(f"{ROOT}/b/", f"{ROOT}/b/x")
    assert not descend(f"{ROOT}/b/", f"{ROOT}/c")


def _policy_cases() -> list[tuple[str, bytes, ChildEntry, bytes | None, list[bytes], bool]]:
    from tests.signed import make

    a_b = make(name=f"{ROOT}/a/b")
    other = make(name=f"{ROOT}/c")
    strangers = make(WRITER, name=f"/key/{WRITER.fingerprint}/a/b")
    obj = child("b", parent=ROOT + "/a")
    folder = child("a", flags=FOLDER)
    full = [child(f"c{i}").raw for i in range(256)]
    return [
        ("at its shard", obj.shard, obj, None, [], True),
        ("at a full shard", folder.shard, folder, None, full, False),
        ("replacing in a full shard", folder.shard, child("c5"), None, full, True),
        ("at another shard", folder.shard, obj, None, [], False),
        ("beside its own name", a_b.key, obj, a_b.raw, [], True),
        ("beside a name below its folder", a_b.key, folder, a_b.raw, [], True),
        ("beside another name", other.key, obj, other.raw, [], False),
        ("beside no record", a_b.key, obj, None, [], False),
        ("beside another owner's name", strangers.key, obj, strangers.raw, [], False),
    ]


@pytest.mark.parametrize(
    ("case", "key", "entry", "record", "history", "admitted"),
    _policy_cases(),
    ids=[c[0] for c in _policy_cases()],
)
def test_storing_peers_admit_child_entries_at_their_shard_or_beside_their_name(
    case: str, key: bytes, entry: ChildEntry, record: bytes | None, history: list[bytes],
    admitted: bool,
) -> None:  # fmt: skip
    """recordpolicy: a child entry goes to its shard key (up to 2B there, replacing by
    identity) or into the entry set of a name it lists, signed for that name's owner."""
    from difs_p2p.recordpolicy import RecordValidator
    from difs_p2p.recordstore import EntryFacts

    policy = RecordValidator()
    assert policy.entry_identity(key, entry.raw, NOW) == (entry.store_identity, entry.issued)
    facts = policy.entry_admission(key, entry.raw, record, history, NOW)
    assert isinstance(facts, EntryFacts) is admitted, facts


def _forged(e: ChildEntry) -> ChildEntry:
    """``e`` with its last signature byte flipped: it still decodes."""
    return decode_child(e.raw[:-1] + bytes([e.raw[-1] ^ 1]))


def test_a_reader_checks_signatures_only_of_names_it_uses_and_falls_back() -> None:
    """A forged newer entry loses to the newest one that verifies; a verified removal
    hides the name; each name is checked once, when used."""
    old, new = child("a", issued=NOW, size=1), child("a", issued=NOW + 5, size=2)
    forged = _forged(child("a", issued=NOW + 9, size=666))
    gone = child("b", flags=OBJECT | REMOVED, issued=NOW + 1, version=2, size=0)
    groups = group_children([old, forged, new, child("b"), gone])
    assert [g.name for g in groups] == [f"{ROOT}/a", f"{ROOT}/b"]
    assert [e.size for e in groups[0].candidates] == [666, 2, 1]
    picked = groups[0].entry(NOW)
    assert picked is not None and picked.size == 2
    assert groups[1].entry(NOW) is None


def test_forgeries_never_send_a_reader_deeper() -> None:
    """split_below: a forged marker or SHARD_ENTRIES forged children do not split a shard;
    a valid marker or SHARD_ENTRIES valid children do."""
    marker = build_child(
        OWNER, owner=FP, parent=ROOT, child="", flags=SPLIT, level=0, bits=0, issued=NOW
    )
    full = [child(f"c{i}") for i in range(SHARD_ENTRIES)]
    assert split_below([marker], NOW)
    assert split_below(full, NOW)
    assert not split_below([_forged(marker)], NOW)
    assert not split_below([_forged(e) for e in full], NOW)
    assert not split_below([*full[:-1], _forged(full[-1])], NOW)
