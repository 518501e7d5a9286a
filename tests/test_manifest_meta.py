"""Object metadata in signed manifests: encoding, limits, refusals and the bytes of
manifests without it (golden vectors in tests/data/manifest/, made before the field)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from difs_p2p import httprules
from difs_p2p.cli_client import parse_metadata
from difs_p2p.delegation import build_delegation
from difs_p2p.errors import IntegrityError, UsageError, WireError
from difs_p2p.identity import Identity
from difs_p2p.manifest import (
    MANIFEST_DOMAIN,
    MAX_CONTENT_TYPE,
    MAX_MANIFEST_SIZE,
    MAX_META_BYTES,
    Manifest,
    ObjectMeta,
    build_manifest,
    owned_key,
    parse_manifest,
)
from difs_p2p.names import MAX_COMPONENT_BYTES, MAX_NAME_BYTES
from difs_p2p.publish import build_tombstone
from difs_p2p.records import canonical_json
from difs_p2p.segments import IntegrityRoot, SegmentId
from tests.helpers import BIN, client_for, start_peer_process, start_peers, stop_all
from tests.signed import OWNER, WRITER, make

GOLDEN = Path(__file__).parent / "data" / "manifest"
ETAG = "9e107d9d372bb6826bd81d3542a419d6"
META = ObjectMeta("video/mp4", ETAG, {"mtime": "1764064800", "colour": "blue"})


def golden() -> list[tuple[str, Manifest]]:
    """The golden manifests rebuilt by today's code, each with its file name."""
    v1 = make(name="/a.com/izone.mp4", size=268435456, created=1764064800.0)
    v2 = make(name="/a.com/izone.mp4", version=2, parent=v1, size=5, created=1764064801.5)
    d = build_delegation(OWNER, prefix="/a.com/w", writer=WRITER.public_key, expires=1900000000.0)
    dv = make(WRITER, name="/a.com/w/x", delegation=d, created=1764064802.25)
    return [("plain.json", v1), ("version2.json", v2), ("delegated.json", dv)]


def with_meta(m: Manifest, meta: ObjectMeta | None) -> Manifest:
    """``m`` signed again by OWNER with ``meta``."""
    return build_manifest(
        OWNER,
        name=m.name,
        version=m.version,
        parent=m.parent,
        root=m.root,
        size=m.size,
        segment_size=m.segment_size,
        segment_count=m.segment_count,
        stripes=m.stripes,
        replicas=m.replicas,
        integrity=m.integrity,
        deleted=m.deleted,
        created=m.created,
        meta=meta,
    )


def signed_raw(obj: dict[str, Any], signer: Any = OWNER) -> bytes:
    """The canonical bytes of ``obj`` signed by ``signer`` (whatever its fields)."""
    body = {k: v for k, v in obj.items() if k != "sig"}
    body["sig"] = signer.sign(MANIFEST_DOMAIN + canonical_json(body)).hex()
    return canonical_json(body)


def test_manifests_without_meta_are_unchanged() -> None:
    """A manifest without metadata is byte for byte what the code before the field made."""
    for file_name, m in golden():
        assert m.raw == (GOLDEN / file_name).read_bytes(), file_name
        assert m.meta is None
        again = parse_manifest((GOLDEN / file_name).read_bytes())
        assert again.meta is None and again.raw == m.raw
    plain = golden()[0][1]
    assert with_meta(plain, None).raw == plain.raw
    assert with_meta(plain, ObjectMeta()).raw == plain.raw  # empty metadata is none


@pytest.mark.parametrize(
    "meta",
    [
        META,
        ObjectMeta(content_type="text/plain; charset=utf-8"),
        ObjectMeta(etag=ETAG + "-3"),
        ObjectMeta(etag=ETAG + "-10000"),
        ObjectMeta(user={"a": ""}),
        ObjectMeta(user={"x!#$%&'*+.^_`|~-9": 'quote " and \\ back'}),
        ObjectMeta("a" * MAX_CONTENT_TYPE),
    ],
)
def test_meta_round_trips(meta: ObjectMeta) -> None:
    """Metadata is signed into the manifest and parsed back equal, in the one encoding."""
    m = with_meta(golden()[0][1], meta)
    assert m.meta == meta
    parsed = parse_manifest(m.raw)
    assert parsed.meta == meta and hash(parsed.meta) == hash(meta)
    obj = json.loads(m.raw)
    assert obj["meta"] == meta.as_json()
    assert set(obj["meta"]) == {
        k for k, v in (("content_type", meta.content_type), ("etag", meta.etag)) if v
    } | ({"user"} if meta.user else set())


def test_meta_encoding_is_fixed() -> None:
    """A manifest with metadata has the bytes of its golden vector (the encoding is fixed)."""
    m = with_meta(golden()[0][1], META)
    assert m.raw == (GOLDEN / "meta.json").read_bytes()
    assert b',"meta":{"content_type":"video/mp4","etag":"' in m.raw
    assert parse_manifest(m.raw).meta == META


def test_meta_is_read_only_and_sorted() -> None:
    """The user pairs are a sorted read-only copy: the caller's dict cannot change them."""
    pairs = {"b": "2", "a": "1"}
    meta = ObjectMeta(user=pairs)
    pairs["c"] = "3"
    assert list(meta.user) == ["a", "b"]
    with pytest.raises(TypeError):
        meta.user["d"] = "4"  # type: ignore[index]
    assert meta == ObjectMeta(user={"a": "1", "b": "2"})


BAD_META: list[tuple[str, dict[str, Any]]] = [
    ("empty type", {"content_type": ""}),
    ("long type", {"content_type": "a" * (MAX_CONTENT_TYPE + 1)}),
    ("newline type", {"content_type": "text/plain\r\nX-Evil: 1"}),
    ("non-ascii type", {"content_type": "téxt/plain"}),
    ("type not text", {"content_type": 5}),
    ("uppercase etag", {"etag": ETAG.upper()}),
    ("short etag", {"etag": ETAG[:31]}),
    ("quoted etag", {"etag": f'"{ETAG}"'}),
    ("zero parts", {"etag": ETAG + "-0"}),
    ("leading zero parts", {"etag": ETAG + "-01"}),
    ("too many parts", {"etag": ETAG + "-10001"}),
    ("etag not text", {"etag": 7}),
    ("uppercase name", {"user": {"Colour": "x"}}),
    ("empty name", {"user": {"": "x"}}),
    ("space in name", {"user": {"a b": "x"}}),
    ("colon in name", {"user": {"a:b": "x"}}),
    ("non-ascii name", {"user": {"é": "x"}}),
    ("newline value", {"user": {"a": "x\ny"}}),
    ("non-ascii value", {"user": {"a": "é"}}),
    ("value not text", {"user": {"a": 1}}),
    ("user not a mapping", {"user": ["a"]}),
    ("too big", {"user": {f"k{i}": "v" * 60 for i in range(MAX_META_BYTES // 64)}}),
]


@pytest.mark.parametrize(("case", "fields"), BAD_META, ids=[c for c, _ in BAD_META])
def test_bad_meta_is_refused(case: str, fields: dict[str, Any]) -> None:
    """Malformed metadata: UsageError when built, WireError when a signed manifest has it."""
    with pytest.raises(UsageError):
        ObjectMeta(**fields)
    obj = json.loads(golden()[0][1].raw)
    obj["meta"] = fields
    with pytest.raises(WireError) as caught:
        parse_manifest(signed_raw(obj))
    assert "meta" in str(caught.value) or "metadata" in str(caught.value), case


@pytest.mark.parametrize(
    "meta",
    [{}, None, [], "video/mp4", {"content_type": None}, {"user": {}}, {"md5": ETAG}],
    ids=["empty", "null", "list", "text", "null field", "empty user", "unknown field"],
)
def test_other_encodings_of_meta_are_refused(meta: object) -> None:
    """No meta is no field: an empty or null meta, a null field or an empty user is refused,
    so that one manifest has one encoding; unknown fields in meta too."""
    obj = json.loads(golden()[0][1].raw)
    obj["meta"] = meta
    with pytest.raises(WireError):
        parse_manifest(signed_raw(obj))


def test_meta_is_signed() -> None:
    """Metadata changed after signing breaks the signature."""
    obj = json.loads(with_meta(golden()[0][1], META).raw)
    obj["meta"]["content_type"] = "text/html"
    with pytest.raises(IntegrityError):
        parse_manifest(canonical_json(obj))


def test_tombstones_carry_no_meta() -> None:
    """A tombstone has no metadata: building one with it, or parsing one that has it, fails;
    rm's tombstone of a version with metadata has none."""
    m = with_meta(golden()[0][1], META)
    tomb = build_tombstone(OWNER, m, m.version, 1764064900.0)
    assert tomb.deleted and tomb.meta is None and b'"meta"' not in tomb.raw
    with pytest.raises(UsageError):
        with_meta(tomb, META)
    obj = json.loads(tomb.raw)
    obj["meta"] = META.as_json()
    with pytest.raises(WireError):
        parse_manifest(signed_raw(obj))


def _longest_name() -> str:
    """A name of exactly MAX_NAME_BYTES bytes of plain ASCII."""
    parts, total = [], 0
    while total < MAX_NAME_BYTES:
        n = min(MAX_COMPONENT_BYTES, MAX_NAME_BYTES - total - 1)
        parts.append("n" * n)
        total += n + 1
    name = "/" + "/".join(parts)
    assert len(name.encode()) == MAX_NAME_BYTES
    return name


def _largest_meta() -> ObjectMeta:
    """Metadata of (nearly) MAX_META_BYTES bytes encoded, every field at its longest."""
    user: dict[str, str] = {}
    fill = 0
    while True:
        trial = {**user, f"k{fill:03d}": "\\" * 40}
        try:
            ObjectMeta("t" * MAX_CONTENT_TYPE, ETAG + "-10000", trial)
        except UsageError:
            break
        user, fill = trial, fill + 1
    meta = ObjectMeta("t" * MAX_CONTENT_TYPE, ETAG + "-10000", user)
    assert MAX_META_BYTES - 100 < len(canonical_json(meta.as_json())) <= MAX_META_BYTES
    return meta


def test_largest_meta_fits_the_longest_delegated_manifest() -> None:
    """The longest name, a delegation of it, every number at its largest and the largest
    metadata still make a manifest within MAX_MANIFEST_SIZE."""
    name = _longest_name()
    most = (1 << 63) - 1
    delegation = build_delegation(
        OWNER, prefix=name, writer=WRITER.public_key, expires=999999999999.999
    )
    m = build_manifest(
        WRITER,
        name=name,
        version=most,
        parent="a" * 64,
        root="b" * 64,
        size=most,
        segment_size=1,
        segment_count=most,
        stripes=most,
        replicas=most,
        integrity=IntegrityRoot(SegmentId(b"\x11" * 32)),
        created=999999999999.999,
        delegation=delegation,
        key=owned_key(name, OWNER.public_key),
        meta=_largest_meta(),
    )
    assert len(m.raw) <= MAX_MANIFEST_SIZE
    assert parse_manifest(m.raw).meta == m.meta


@pytest.mark.parametrize(
    ("media_type", "name", "expected"),
    [
        (None, "/t.com/a.mp4", "video/mp4"),
        (None, "/t.com/a", "application/octet-stream"),
        ("text/x-custom", "/t.com/a.mp4", "text/x-custom"),
        ("text/plain; charset=utf-8", "/t.com/a", "text/plain; charset=utf-8"),
    ],
)
def test_gateway_type_from_meta_else_extension(
    media_type: str | None, name: str, expected: str
) -> None:
    """The gateway's Content-Type is the signed one when set, else the extension's."""
    res = httprules.Resource(name, 10, '"etag"', 1764064800.0, media_type=media_type)
    assert httprules.content_headers(res)["Content-Type"] == expected
    whole = httprules.answer("GET", {"Range": "bytes=0-0,5-5"}, res, "b")
    assert whole.part_type == expected


@pytest.mark.parametrize(
    ("content_type", "pairs", "expected"),
    [
        (None, None, None),
        (None, [], None),
        ("text/plain", None, ObjectMeta("text/plain")),
        (
            None,
            ["Colour=blue", "mtime=5", "empty="],
            ObjectMeta(user={"colour": "blue", "mtime": "5", "empty": ""}),
        ),
        (None, ["a=b=c"], ObjectMeta(user={"a": "b=c"})),
    ],
)
def test_cli_metadata_options(
    content_type: str | None, pairs: list[str] | None, expected: ObjectMeta | None
) -> None:
    """--content-type and --meta NAME=VALUE make the metadata; names are lower-cased."""
    assert parse_metadata(content_type, pairs) == expected


@pytest.mark.parametrize(
    ("content_type", "pairs", "message"),
    [
        (None, ["novalue"], "NAME=VALUE"),
        (None, ["a=1", "A=2"], "twice"),
        (None, ["a b=1"], "metadata name"),
        ("", None, "content type"),
        ("text/plain\n", None, "content type"),
    ],
)
def test_cli_metadata_options_refused(
    content_type: str | None, pairs: list[str] | None, message: str
) -> None:
    """Bad --meta or --content-type values are usage errors naming the problem."""
    with pytest.raises(UsageError, match=message):
        parse_metadata(content_type, pairs)


async def test_metadata_through_real_peers_and_the_gateway(tmp_path: Path) -> None:
    """Client.put signs metadata into its version only: resolve returns it, the gateway
    serves its type; an update without metadata has none; metadata_after gives what is
    known once the body is read (its MD5), and its error publishes nothing; rm's
    tombstone has none."""
    peers = await start_peers(tmp_path, 2, http=("127.0.0.1", 0))
    client = client_for(peers[0], publisher=Identity.generate())
    src = tmp_path / "src"
    src.write_bytes(b"x" * 5000)
    name = "/t.com/doc.bin"
    try:
        with pytest.raises(UsageError):
            await client.put(src, name, metadata="text/plain")  # type: ignore[arg-type]
        v1 = await client.put(src, name, replicas=1, metadata=META)
        assert v1.manifest.meta == META
        assert (await client.resolve(name)).manifest.meta == META
        v2 = await client.put(src, name, replicas=1, update=True)
        resolved = await client.resolve(name)
        assert v2.manifest.meta is None and resolved.manifest.meta is None
        assert [m.meta for m in resolved.history] == [META, None]
        gateway = peers[1].gateway
        assert gateway is not None
        async with aiohttp.ClientSession() as http:
            for query, ctype, etag in (
                ("", "application/octet-stream", v2.manifest.hash),
                ("?version=1", "video/mp4", v1.manifest.hash),
            ):
                for method in ("GET", "HEAD"):
                    async with http.request(method, f"{gateway.url}t.com/doc.bin{query}") as r:
                        assert r.status == 200, await r.text()
                        assert r.headers["Content-Type"] == ctype
                        assert r.headers["ETag"] == f'"{etag}"'  # the version's, not the MD5
        content = b"y" * 7000
        md5 = hashlib.md5(usedforsecurity=False)

        class Hashing(io.BytesIO):
            def read(self, size: int | None = -1) -> bytes:
                data = super().read(size)
                md5.update(data)
                return data

        def refuse() -> ObjectMeta:
            raise UsageError("the body's checksum does not match")

        with pytest.raises(UsageError, match="checksum"):
            await client.put(Hashing(content), name, replicas=1, update=True, metadata_after=refuse)
        assert (await client.resolve(name)).manifest.version == 2  # nothing published
        md5 = hashlib.md5(usedforsecurity=False)
        v3 = await client.put(
            Hashing(content),
            name,
            replicas=1,
            update=True,
            metadata_after=lambda: ObjectMeta(etag=md5.hexdigest()),
        )
        assert v3.manifest.meta == ObjectMeta(etag=hashlib.md5(content).hexdigest())
        tomb = await client.rm(name)
        assert tomb.meta is None and b"meta" not in tomb.raw
    finally:
        await client.close()
        await stop_all(peers)


def test_cli_put_signs_metadata_and_stat_shows_it(tmp_path: Path) -> None:
    """difs put --content-type --meta publishes metadata that difs stat prints and --json
    returns; a malformed --meta fails with exit 2 before anything is sent."""
    proc, address = start_peer_process(tmp_path / "p")
    env = dict(os.environ, DIFS_HOME=str(tmp_path / "home"))
    env["DIFS_TOKEN_FILE"] = str(tmp_path / "p" / "control.token")
    env.pop("DIFS_PEER", None)

    def difs(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "difs"), *args, "--peer", address],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )

    src = tmp_path / "in.txt"
    src.write_bytes(b"hello\n")
    try:
        bad = difs("put", str(src), "/cli/a.txt", "--meta", "novalue")
        assert bad.returncode == 2 and "NAME=VALUE" in bad.stderr
        put = difs(
            "put", str(src), "/cli/a.txt", "--replicas", "1", "--json",
            "--content-type", "text/markdown", "--meta", "Colour=blue", "--meta", "mtime=5",
        )  # fmt: skip
        assert put.returncode == 0, put.stderr
        expected = {"content_type": "text/markdown", "user": {"colour": "blue", "mtime": "5"}}
        assert json.loads(put.stdout)["meta"] == expected
        stat = difs("stat", "/cli/a.txt", "--json")
        assert stat.returncode == 0, stat.stderr
        assert json.loads(stat.stdout)["info"]["meta"] == expected
        text = difs("stat", "/cli/a.txt")
        assert text.returncode == 0, text.stderr
        assert "type:      text/markdown" in text.stdout
        assert "meta:      colour=blue" in text.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=15)
