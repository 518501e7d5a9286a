"""The S3 API against real peers, driven by boto3 (and hand-signed raw requests)."""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import functools
import hashlib
import io
import json
import os
import signal
import subprocess
import time
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar, cast

import aiohttp
import boto3
import pytest
import pytest_asyncio
from botocore import UNSIGNED
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials
from botocore.exceptions import ClientError

from difs_p2p.client import Client
from difs_p2p.identity import Identity
from difs_p2p.peer import Peer
from difs_p2p.s3api import (
    STREAMED_PUTS,
    BodyAborted,
    BodyPipe,
    KeepingClient,
    StoredClient,
    meta_headers,
    object_meta,
    parse_copy_source,
    parse_target,
    version_id,
)
from difs_p2p.s3auth import signing_key
from difs_p2p.s3body import ChunkSigner
from difs_p2p.s3errors import S3Error
from difs_p2p.s3keys import S3Key
from difs_p2p.s3multipart import StoredObject
from difs_p2p.segments import SegmentId, encode_hash_list, hash_list_root, segment_hash
from tests.helpers import BIN, peer_config, start_peers, stop_all, wait_for

pytestmark = pytest.mark.asyncio(loop_scope="module")

T = TypeVar("T")
CONFIG = Config(
    s3={"addressing_style": "path"},
    signature_version="s3v4",
    retries={"max_attempts": 1},
    region_name="us-east-1",
)
MiB = 1 << 20


@dataclass
class Net:
    peers: list[Peer]
    url: str
    alice: Any  # boto3 S3 clients
    bob: Any
    alice_key: S3Key
    make: Callable[..., Any]


def _client(url: str, access: str | None, secret: str | None, **kw: Any) -> Any:
    config = CONFIG.merge(Config(signature_version=UNSIGNED)) if access is None else CONFIG
    return boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id=access or "x",
        aws_secret_access_key=secret or "x",
        config=config,
        **kw,
    )


# boto3's threads: the loop's default executor stays the peers' (a boto3 call waiting for
# its answer there would hold a thread the server needs)
BOTO = concurrent.futures.ThreadPoolExecutor(32)


async def run(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """A blocking boto3 call, off the loop the peers run on."""
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(BOTO, functools.partial(fn, *args, **kwargs))


async def code_of(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> str:
    """The S3 error code a boto3 call fails with."""
    with pytest.raises(ClientError) as info:
        await run(fn, *args, **kwargs)
    return str(info.value.response["Error"]["Code"])


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def net(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Net]:
    root: Path = tmp_path_factory.mktemp("s3")
    peers = await start_peers(root, 2)
    s3peer = Peer(peer_config(root / "s3", bootstrap=(peers[0].address,), s3=("127.0.0.1", 0)))
    await s3peer.start()
    assert s3peer.s3 is not None
    url = s3peer.s3.url.rstrip("/")
    alice_key = s3peer.s3.keys.create("alice")
    bob_key = s3peer.s3.keys.create("bob")

    def make(access: str | None, secret: str | None) -> Any:
        return _client(url, access, secret)

    alice = make(alice_key.access_key, alice_key.secret)
    bob = make(bob_key.access_key, bob_key.secret)
    try:
        await run(alice.create_bucket, Bucket="alice.com")
        yield Net([*peers, s3peer], url, alice, bob, alice_key, make)
    finally:
        await stop_all([s3peer, *peers])


async def test_ready_file_and_status(net: Net) -> None:
    """The S3 URL is in DATA/s3 and in the peer's status while it runs."""
    s3peer = net.peers[-1]
    assert (s3peer.data_dir / "s3").read_text().strip() == net.url + "/"
    assert s3peer.status()["s3"] == net.url + "/"


async def test_buckets(net: Net) -> None:
    """Create, re-create, someone else's, list, head, location, versioning."""
    s3 = net.alice
    assert await code_of(s3.create_bucket, Bucket="alice.com") == "BucketAlreadyOwnedByYou"
    assert await code_of(net.bob.create_bucket, Bucket="alice.com") == "BucketAlreadyExists"
    await run(s3.create_bucket, Bucket="alice-two")
    empty = await run(s3.list_objects_v2, Bucket="alice-two", Delimiter="/")
    assert empty["KeyCount"] == 0 and not empty["IsTruncated"]
    assert (await run(s3.list_objects, Bucket="alice-two"))["IsTruncated"] is False
    assert (await run(s3.list_object_versions, Bucket="alice-two")).get("Versions") is None
    assert await code_of(s3.list_objects_v2, Bucket="nobody-here") == "NoSuchBucket"
    names = [b["Name"] for b in (await run(s3.list_buckets))["Buckets"]]
    assert {"alice-two", "alice.com"} <= set(names) and names == sorted(names)
    assert (await run(net.bob.list_buckets))["Buckets"] == []
    await run(s3.head_bucket, Bucket="alice.com")
    assert await code_of(s3.head_bucket, Bucket="nobody-here") == "404"
    loc = await run(s3.get_bucket_location, Bucket="alice.com")
    assert loc["LocationConstraint"] is None
    ver = await run(s3.get_bucket_versioning, Bucket="alice.com")
    assert ver["Status"] == "Enabled"
    assert await code_of(s3.create_bucket, Bucket="ab") == "InvalidBucketName"
    assert await code_of(s3.get_bucket_acl, Bucket="alice.com") == "NotImplemented"


async def test_put_get_head(net: Net) -> None:
    """An object round-trips with its MD5 ETag, content type, metadata and ranges."""
    s3 = net.alice
    body = os.urandom(300_000)
    md5 = hashlib.md5(body).hexdigest()
    put = await run(
        s3.put_object,
        Bucket="alice.com",
        Key="docs/report.bin",
        Body=body,
        ContentType="application/x-report",
        Metadata={"Colour": "blue"},
    )
    assert put["ETag"] == f'"{md5}"'
    got = await run(s3.get_object, Bucket="alice.com", Key="docs/report.bin")
    assert await run(got["Body"].read) == body
    assert got["ETag"] == f'"{md5}"'
    assert got["ContentType"] == "application/x-report"
    assert got["Metadata"] == {"colour": "blue"}
    assert got["ContentLength"] == len(body)
    head = await run(s3.head_object, Bucket="alice.com", Key="docs/report.bin")
    assert head["ContentLength"] == len(body)
    assert head["ETag"] == f'"{md5}"'
    part = await run(s3.get_object, Bucket="alice.com", Key="docs/report.bin", Range="bytes=10-19")
    assert await run(part["Body"].read) == body[10:20]
    assert part["ContentRange"] == f"bytes 10-19/{len(body)}"
    renamed = await run(
        s3.head_object,
        Bucket="alice.com",
        Key="docs/report.bin",
        ResponseContentType="text/plain",
        ResponseContentDisposition="attachment",
    )
    assert renamed["ContentType"] == "text/plain"
    assert renamed["ContentDisposition"] == "attachment"
    assert renamed["ResponseMetadata"]["RequestId"]
    code = await code_of(
        s3.get_object, Bucket="alice.com", Key="docs/report.bin", IfNoneMatch=f'"{md5}"'
    )
    assert code == "304"
    code = await code_of(s3.get_object, Bucket="alice.com", Key="docs/report.bin", IfMatch='"x"')
    assert code == "PreconditionFailed"
    code = await code_of(
        s3.get_object, Bucket="alice.com", Key="docs/report.bin", Range="bytes=400000-"
    )
    assert code == "InvalidRange"
    assert await code_of(s3.get_object, Bucket="alice.com", Key="nope") == "NoSuchKey"
    assert await code_of(s3.get_object, Bucket="nobody-here", Key="x") == "NoSuchBucket"
    assert await code_of(s3.head_object, Bucket="alice.com", Key="nope") == "404"
    empty = await run(s3.put_object, Bucket="alice.com", Key="empty", Body=b"")
    assert empty["ETag"] == '"d41d8cd98f00b204e9800998ecf8427e"'
    got = await run(s3.get_object, Bucket="alice.com", Key="empty")
    assert await run(got["Body"].read) == b""


async def test_writes_need_the_bucket_owner(net: Net) -> None:
    """Another key reads a bucket but cannot write or delete in it."""
    await run(net.alice.put_object, Bucket="alice.com", Key="shared.txt", Body=b"hi")
    got = await run(net.bob.get_object, Bucket="alice.com", Key="shared.txt")
    assert await run(got["Body"].read) == b"hi"
    code = await code_of(net.bob.put_object, Bucket="alice.com", Key="x", Body=b"no")
    assert code == "AccessDenied"
    assert await code_of(net.bob.delete_object, Bucket="alice.com", Key="shared.txt") == (
        "AccessDenied"
    )


async def test_list_v2_pages_with_delimiter(net: Net) -> None:
    """ListObjectsV2 pages through keys and common prefixes with continuation tokens."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="pages")
    keys = [f"k{i:02d}" for i in range(20)] + [f"dir{i}/x" for i in range(5)] + ["dir0/y"]
    await asyncio.gather(
        *(run(s3.put_object, Bucket="pages", Key=k, Body=k.encode()) for k in keys)
    )
    seen: list[str] = []
    prefixes: list[str] = []
    token = None
    pages = 0
    while True:
        kw: dict[str, Any] = {"Bucket": "pages", "Delimiter": "/", "MaxKeys": 7}
        if token:
            kw["ContinuationToken"] = token
        page = await run(s3.list_objects_v2, **kw)
        pages += 1
        seen += [c["Key"] for c in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
        assert page["KeyCount"] <= 7
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert pages == 4
    assert seen == sorted(k for k in keys if "/" not in k)
    assert prefixes == [f"dir{i}/" for i in range(5)]
    flat = await run(s3.list_objects_v2, Bucket="pages", Prefix="dir0/")
    assert [c["Key"] for c in flat["Contents"]] == ["dir0/x", "dir0/y"]
    assert flat["Contents"][0]["Size"] == len(b"dir0/x")
    everything = await run(s3.list_objects_v2, Bucket="pages", StartAfter="k18")
    assert [c["Key"] for c in everything["Contents"]] == ["k19"]
    partial = await run(s3.list_objects_v2, Bucket="pages", Prefix="dir", Delimiter="/")
    assert [p["Prefix"] for p in partial["CommonPrefixes"]] == [f"dir{i}/" for i in range(5)]
    other = await run(s3.list_objects_v2, Bucket="pages", Prefix="dir0", Delimiter="x")
    assert [p["Prefix"] for p in other["CommonPrefixes"]] == ["dir0/x"]
    assert [c["Key"] for c in other["Contents"]] == ["dir0/y"]


async def test_list_v1_markers(net: Net) -> None:
    """ListObjects (V1) pages with NextMarker over common prefixes, and url encoding."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="v1list")
    keys = ["a", "b/1", "b/2", "c d", "e"]
    for k in keys:
        await run(s3.put_object, Bucket="v1list", Key=k, Body=b"x")
    page = await run(s3.list_objects, Bucket="v1list", Delimiter="/", MaxKeys=2)
    assert [c["Key"] for c in page["Contents"]] == ["a"]
    assert [p["Prefix"] for p in page["CommonPrefixes"]] == ["b/"]
    assert page["IsTruncated"] and page["NextMarker"] == "b/"
    rest = await run(s3.list_objects, Bucket="v1list", Delimiter="/", Marker="b/")
    assert [c["Key"] for c in rest["Contents"]] == ["c d", "e"]
    assert not rest["IsTruncated"]
    paginator = s3.get_paginator("list_objects")
    listed = await run(
        lambda: [
            c["Key"]
            for p in paginator.paginate(Bucket="v1list", PaginationConfig={"PageSize": 2})
            for c in p.get("Contents", [])
        ]
    )
    assert listed == keys


async def test_odd_keys_list_as_written(net: Net) -> None:
    """Keys that are not DIFS names (escaped) list exactly as written; others are refused."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="odd")
    keys = ["a//b", "dir/", "50%off", "@claim", "./x", "caf\u00e9"]
    for k in keys:
        await run(s3.put_object, Bucket="odd", Key=k, Body=k.encode())
    listed = await run(s3.list_objects_v2, Bucket="odd")
    assert sorted(c["Key"] for c in listed["Contents"]) == sorted(keys)
    for k in keys:
        got = await run(s3.get_object, Bucket="odd", Key=k)
        assert await run(got["Body"].read) == k.encode()
    code = await code_of(s3.put_object, Bucket="odd", Key="cafe\u0301", Body=b"x")
    assert code == "InvalidArgument"
    assert await code_of(s3.put_object, Bucket="odd", Key="x" * 1020, Body=b"x") == (
        "KeyTooLongError"
    )


async def test_delete_versions_and_delete_objects(net: Net) -> None:
    """Versions, versionId reads, deletes as delete markers, quiet DeleteObjects."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="vers")
    v1 = await run(s3.put_object, Bucket="vers", Key="f", Body=b"one")
    v2 = await run(s3.put_object, Bucket="vers", Key="f", Body=b"two")
    assert (v1["VersionId"], v2["VersionId"]) == ("1", "2")
    old = await run(s3.get_object, Bucket="vers", Key="f", VersionId="1")
    assert await run(old["Body"].read) == b"one"
    assert await code_of(s3.get_object, Bucket="vers", Key="f", VersionId="9") == "NoSuchVersion"
    listed = await run(s3.list_object_versions, Bucket="vers")
    assert [(v["VersionId"], v["IsLatest"]) for v in listed["Versions"]] == [
        ("2", True),
        ("1", False),
    ]
    gone = await run(s3.delete_object, Bucket="vers", Key="f")
    assert gone["DeleteMarker"] is True and gone["VersionId"] == "3"
    assert await code_of(s3.get_object, Bucket="vers", Key="f") == "NoSuchKey"
    again = await run(s3.delete_object, Bucket="vers", Key="f")
    assert again["ResponseMetadata"]["HTTPStatusCode"] == 204
    await run(s3.delete_object, Bucket="vers", Key="never-was")
    await run(s3.put_object, Bucket="vers", Key="g", Body=b"1")
    await run(s3.delete_object, Bucket="vers", Key="g")
    await run(s3.put_object, Bucket="vers", Key="g", Body=b"3")
    listed = await run(s3.list_object_versions, Bucket="vers", Prefix="g")
    assert [v["VersionId"] for v in listed["Versions"]] == ["3", "1"]
    assert [(m["VersionId"], m["IsLatest"]) for m in listed["DeleteMarkers"]] == [("2", False)]
    code = await code_of(s3.get_object, Bucket="vers", Key="g", VersionId="2")
    assert code == "MethodNotAllowed"
    await run(s3.delete_object, Bucket="vers", Key="g")
    for k in ("a", "b"):
        await run(s3.put_object, Bucket="vers", Key=k, Body=b"x")
    out = await run(
        s3.delete_objects,
        Bucket="vers",
        Delete={"Objects": [{"Key": "a"}, {"Key": "b"}, {"Key": "none"}], "Quiet": True},
    )
    assert "Deleted" not in out and "Errors" not in out
    loud = await run(s3.delete_objects, Bucket="vers", Delete={"Objects": [{"Key": "x" * 1030}]})
    assert loud["Errors"][0]["Code"] == "KeyTooLongError"
    assert (await run(s3.list_objects_v2, Bucket="vers"))["KeyCount"] == 0
    await run(s3.create_bucket, Bucket="not-empty")
    await run(s3.put_object, Bucket="not-empty", Key="x", Body=b"x")
    assert await code_of(s3.delete_bucket, Bucket="not-empty") == "BucketNotEmpty"
    await run(s3.delete_bucket, Bucket="vers")
    names = [b["Name"] for b in (await run(s3.list_buckets))["Buckets"]]
    assert "vers" not in names


async def test_copy_object(net: Net) -> None:
    """CopyObject copies bytes and metadata (COPY), or takes new metadata (REPLACE)."""
    s3 = net.alice
    body = b"copy me" * 1000
    await run(s3.put_object, Bucket="alice.com", Key="src", Body=body, Metadata={"a": "1"})
    out = await run(
        s3.copy_object,
        Bucket="alice.com",
        Key="dst",
        CopySource={"Bucket": "alice.com", "Key": "src"},
    )
    assert out["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(body).hexdigest()}"'
    got = await run(s3.get_object, Bucket="alice.com", Key="dst")
    assert await run(got["Body"].read) == body
    assert got["Metadata"] == {"a": "1"}
    await run(
        s3.copy_object,
        Bucket="alice.com",
        Key="dst2",
        CopySource="alice.com/src",
        MetadataDirective="REPLACE",
        Metadata={"b": "2"},
    )
    head = await run(s3.head_object, Bucket="alice.com", Key="dst2")
    assert head["Metadata"] == {"b": "2"}
    code = await code_of(
        s3.copy_object,
        Bucket="alice.com",
        Key="dst3",
        CopySource="alice.com/src",
        CopySourceIfMatch='"nope"',
    )
    assert code == "PreconditionFailed"
    code = await code_of(
        s3.copy_object, Bucket="alice.com", Key="dst3", CopySource="alice.com/missing"
    )
    assert code == "NoSuchKey"


async def test_bad_content_md5_publishes_nothing(net: Net) -> None:
    """A body that does not match its Content-MD5 is refused and nothing is published,
    small (in memory) or large (published while it arrives: abandoned at the end)."""
    s3 = net.alice
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    code = await code_of(
        s3.put_object, Bucket="alice.com", Key="bad-md5", Body=b"body", ContentMD5=wrong
    )
    assert code == "BadDigest"
    assert await code_of(s3.head_object, Bucket="alice.com", Key="bad-md5") == "404"
    big = os.urandom(3 * MiB)  # over SMALL_BODY: streamed to the publish
    code = await code_of(
        s3.put_object, Bucket="alice.com", Key="bad-big", Body=big, ContentMD5=wrong
    )
    assert code == "BadDigest"
    assert await code_of(s3.head_object, Bucket="alice.com", Key="bad-big") == "404"
    right = base64.b64encode(hashlib.md5(big).digest()).decode()
    await run(s3.put_object, Bucket="alice.com", Key="big", Body=big, ContentMD5=right)
    got = await run(s3.get_object, Bucket="alice.com", Key="big")
    assert await run(got["Body"].read) == big
    assert list((net.peers[-1].data_dir / "s3-spool").iterdir()) == []


async def test_busy_streams_spool_the_body(net: Net) -> None:
    """With every streamed PutObject slot taken, a large body is spooled first: a bad
    Content-MD5 publishes nothing and leaves no spool file, a good one is published."""
    s3 = net.alice
    server = net.peers[-1].s3
    assert server is not None
    big = os.urandom(3 * MiB)
    wrong = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    right = base64.b64encode(hashlib.md5(big).digest()).decode()
    server.max_streamed_puts = 0
    try:
        code = await code_of(
            s3.put_object, Bucket="alice.com", Key="spooled", Body=big, ContentMD5=wrong
        )
        assert code == "BadDigest"
        assert await code_of(s3.head_object, Bucket="alice.com", Key="spooled") == "404"
        await run(s3.put_object, Bucket="alice.com", Key="spooled", Body=big, ContentMD5=right)
    finally:
        server.max_streamed_puts = STREAMED_PUTS
    got = await run(s3.get_object, Bucket="alice.com", Key="spooled")
    assert await run(got["Body"].read) == big
    assert list((net.peers[-1].data_dir / "s3-spool").iterdir()) == []


async def test_body_pipe_reads_and_failures() -> None:
    """A BodyPipe hands its chunks out in the sizes asked, ends only when closed, waits
    for room past its limit, and raises on every read once failed."""
    pipe = BodyPipe(limit=8)
    await pipe.put(b"abcde")
    await pipe.put(b"fgh")
    waiting = asyncio.ensure_future(pipe.put(b"ijk"))  # past the limit: waits for a read
    await asyncio.sleep(0)
    assert not waiting.done()
    assert await asyncio.to_thread(pipe.read, 3) == b"abc"
    await waiting
    assert await asyncio.to_thread(pipe.read, 100) == b"defghijk"
    pipe.close()
    assert await asyncio.to_thread(pipe.read, 100) == b""
    failed = BodyPipe()
    reader = asyncio.ensure_future(asyncio.to_thread(failed.read, 10))  # waits for data
    failed.fail()
    with pytest.raises(BodyAborted):
        await reader
    with pytest.raises(BodyAborted):
        await failed.put(b"late")


class _UnsignedSigV4(S3SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 over an unsigned payload."""

    def payload(self, request: AWSRequest) -> str:
        return "UNSIGNED-PAYLOAD"


async def test_disconnect_mid_body_publishes_nothing(net: Net) -> None:
    """A client that hangs up halfway through a streamed PutObject body publishes
    nothing, and the key can be written afterwards."""
    server = net.peers[-1].s3
    assert server is not None
    url = f"{net.url}/alice.com/hung-up.bin"
    size = 4 * MiB
    req = AWSRequest(method="PUT", url=url, data=b"", headers={"Content-Length": str(size)})
    key = net.alice_key
    _UnsignedSigV4(Credentials(key.access_key, key.secret), "s3", "us-east-1").add_auth(req)
    host, port = server.bound
    _, writer = await asyncio.open_connection(host, port)
    head = f"PUT /alice.com/hung-up.bin HTTP/1.1\r\nHost: {host}:{port}\r\n"
    for name, value in req.headers.items():
        head += f"{name}: {value}\r\n"
    writer.write(head.encode() + b"\r\n" + os.urandom(size // 2))
    await writer.drain()
    await wait_for(lambda: server.streamed_puts == 1)
    writer.close()
    await writer.wait_closed()
    await wait_for(lambda: server.streamed_puts == 0)
    assert await code_of(net.alice.head_object, Bucket="alice.com", Key="hung-up.bin") == "404"
    data = os.urandom(2 * MiB)
    await run(net.alice.put_object, Bucket="alice.com", Key="hung-up.bin", Body=data)
    got = await run(net.alice.get_object, Bucket="alice.com", Key="hung-up.bin")
    assert got["VersionId"] == "1"
    assert await run(got["Body"].read) == data


async def test_a_version_published_during_a_streamed_put(net: Net) -> None:
    """A PutObject of the same key published while a large one streams does not stop it:
    the streamed one, finishing last, becomes the next version."""
    server = net.peers[-1].s3
    assert server is not None
    url = f"{net.url}/alice.com/raced.bin"
    size = 4 * MiB
    big = os.urandom(size)
    req = AWSRequest(method="PUT", url=url, data=b"", headers={"Content-Length": str(size)})
    key = net.alice_key
    _UnsignedSigV4(Credentials(key.access_key, key.secret), "s3", "us-east-1").add_auth(req)
    host, port = server.bound
    reader, writer = await asyncio.open_connection(host, port)
    head = f"PUT /alice.com/raced.bin HTTP/1.1\r\nHost: {host}:{port}\r\n"
    for name, value in req.headers.items():
        head += f"{name}: {value}\r\n"
    writer.write(head.encode() + b"\r\n" + big[: size // 2])
    await writer.drain()
    await wait_for(lambda: server.streamed_puts == 1)
    await run(net.alice.put_object, Bucket="alice.com", Key="raced.bin", Body=b"small")
    writer.write(big[size // 2 :])
    await writer.drain()
    answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    await writer.wait_closed()
    assert answer.startswith(b"HTTP/1.1 200"), answer
    assert b"x-amz-version-id: 2" in answer.lower()
    got = await run(net.alice.get_object, Bucket="alice.com", Key="raced.bin")
    assert await run(got["Body"].read) == big


async def test_authentication_errors(net: Net) -> None:
    """Wrong secret, unknown key and anonymous requests are refused as S3 does."""
    wrong = net.make(net.alice_key.access_key, "not-the-secret")
    assert await code_of(wrong.list_buckets) == "SignatureDoesNotMatch"
    unknown = net.make("DIFSUNKNOWNKEY000000", "x" * 40)
    assert await code_of(unknown.list_buckets) == "InvalidAccessKeyId"
    anonymous = net.make(None, None)
    assert await code_of(anonymous.list_objects_v2, Bucket="alice.com") == "AccessDenied"


async def test_multipart_upload(net: Net) -> None:
    """Parts, listings, complete with the multipart ETag, too-small parts, abort."""
    s3 = net.alice
    first = os.urandom(5 * MiB)
    last = os.urandom(1000)
    up = await run(
        s3.create_multipart_upload, Bucket="alice.com", Key="big.bin", ContentType="video/mp4"
    )
    uid = up["UploadId"]
    p1 = await run(
        s3.upload_part, Bucket="alice.com", Key="big.bin", UploadId=uid, PartNumber=1, Body=first
    )
    p2 = await run(
        s3.upload_part, Bucket="alice.com", Key="big.bin", UploadId=uid, PartNumber=2, Body=last
    )
    parts = await run(s3.list_parts, Bucket="alice.com", Key="big.bin", UploadId=uid)
    assert [(p["PartNumber"], p["Size"]) for p in parts["Parts"]] == [(1, 5 * MiB), (2, 1000)]
    uploads = await run(s3.list_multipart_uploads, Bucket="alice.com")
    assert [u["UploadId"] for u in uploads["Uploads"]] == [uid]
    done = await run(
        s3.complete_multipart_upload,
        Bucket="alice.com",
        Key="big.bin",
        UploadId=uid,
        MultipartUpload={
            "Parts": [
                {"PartNumber": 1, "ETag": p1["ETag"]},
                {"PartNumber": 2, "ETag": p2["ETag"]},
            ]
        },
    )
    digests = hashlib.md5(hashlib.md5(first).digest() + hashlib.md5(last).digest()).hexdigest()
    assert done["ETag"] == f'"{digests}-2"'
    got = await run(s3.get_object, Bucket="alice.com", Key="big.bin")
    assert got["ETag"] == f'"{digests}-2"' and got["ContentType"] == "video/mp4"
    assert await run(got["Body"].read) == first + last
    assert await code_of(s3.list_parts, Bucket="alice.com", Key="big.bin", UploadId=uid) == (
        "NoSuchUpload"
    )
    small = await run(s3.create_multipart_upload, Bucket="alice.com", Key="small.bin")
    sid = small["UploadId"]
    etags = []
    for n in (1, 2):
        r = await run(
            s3.upload_part,
            Bucket="alice.com",
            Key="small.bin",
            UploadId=sid,
            PartNumber=n,
            Body=b"x",
        )
        etags.append({"PartNumber": n, "ETag": r["ETag"]})
    code = await code_of(
        s3.complete_multipart_upload,
        Bucket="alice.com",
        Key="small.bin",
        UploadId=sid,
        MultipartUpload={"Parts": etags},
    )
    assert code == "EntityTooSmall"
    code = await code_of(
        s3.complete_multipart_upload,
        Bucket="alice.com",
        Key="small.bin",
        UploadId=sid,
        MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": '"00000000000000000000000000000000"'}]
        },
    )
    assert code == "InvalidPart"
    await run(s3.abort_multipart_upload, Bucket="alice.com", Key="small.bin", UploadId=sid)
    assert await code_of(s3.list_parts, Bucket="alice.com", Key="small.bin", UploadId=sid) == (
        "NoSuchUpload"
    )
    assert await code_of(s3.head_object, Bucket="alice.com", Key="small.bin") == "404"


def _segment_ids(data: bytes) -> list[bytes]:
    """The ids of ``data``'s 1 MiB segments (as a multipart part is stored)."""
    return [segment_hash(data[i : i + MiB]) for i in range(0, len(data), MiB)]


async def _complete(s3: Any, key: str, uid: str, etags: dict[int, str]) -> Any:
    parts = [{"PartNumber": n, "ETag": etags[n]} for n in sorted(etags)]
    return await run(
        s3.complete_multipart_upload,
        Bucket="alice.com",
        Key=key,
        UploadId=uid,
        MultipartUpload={"Parts": parts},
    )


async def test_multipart_parts_out_of_order_and_uploaded_again(net: Net) -> None:
    """Parts sent at once, out of order, one of them uploaded again: the object is the
    last upload of each part, and the replaced part's segments are freed at once."""
    s3, store = net.alice, net.peers[-1].store
    assert store is not None
    data = {1: os.urandom(5 * MiB), 2: os.urandom(6 * MiB), 3: os.urandom(777)}
    wrong = os.urandom(5 * MiB)
    uid = (await run(s3.create_multipart_upload, Bucket="alice.com", Key="ooo.bin"))["UploadId"]

    async def put(number: int, body: bytes) -> str:
        r = await run(
            s3.upload_part,
            Bucket="alice.com",
            Key="ooo.bin",
            UploadId=uid,
            PartNumber=number,
            Body=body,
        )
        return str(r["ETag"])

    await put(1, wrong)
    assert all(store.has(i) for i in _segment_ids(wrong))
    e3, e2, e1 = await asyncio.gather(put(3, data[3]), put(2, data[2]), put(1, data[1]))
    assert not any(store.has(i) for i in _segment_ids(wrong))
    await _complete(s3, "ooo.bin", uid, {1: e1, 2: e2, 3: e3})
    got = await run(s3.get_object, Bucket="alice.com", Key="ooo.bin")
    assert await run(got["Body"].read) == data[1] + data[2] + data[3]


async def test_multipart_unaligned_parts_fall_back(net: Net) -> None:
    """A part whose size is not a multiple of the segment size (not the last) is read
    back and published the slow way: the object is still right."""
    s3 = net.alice
    first, last = os.urandom(5 * MiB + 4099), os.urandom(1000)
    uid = (await run(s3.create_multipart_upload, Bucket="alice.com", Key="odd.bin"))["UploadId"]
    etags = {}
    for n, body in ((1, first), (2, last)):
        r = await run(
            s3.upload_part, Bucket="alice.com", Key="odd.bin", UploadId=uid, PartNumber=n, Body=body
        )
        etags[n] = r["ETag"]
    await _complete(s3, "odd.bin", uid, etags)
    got = await run(s3.get_object, Bucket="alice.com", Key="odd.bin")
    assert await run(got["Body"].read) == first + last


async def test_multipart_abort_and_bad_part_free_the_segments(net: Net) -> None:
    """Abort frees a part's segments from the peer's store; a part whose Content-MD5 is
    wrong is refused and stores nothing."""
    s3, store = net.alice, net.peers[-1].store
    assert store is not None
    body, bad = os.urandom(3 * MiB), os.urandom(2 * MiB)
    uid = (await run(s3.create_multipart_upload, Bucket="alice.com", Key="ab.bin"))["UploadId"]
    await run(
        s3.upload_part, Bucket="alice.com", Key="ab.bin", UploadId=uid, PartNumber=1, Body=body
    )
    assert all(store.has(i) for i in _segment_ids(body))
    md5 = base64.b64encode(hashlib.md5(b"other").digest()).decode()
    code = await code_of(
        s3.upload_part,
        Bucket="alice.com",
        Key="ab.bin",
        UploadId=uid,
        PartNumber=2,
        Body=bad,
        ContentMD5=md5,
    )
    assert code == "BadDigest"
    assert not any(store.has(i) for i in _segment_ids(bad))
    await run(s3.abort_multipart_upload, Bucket="alice.com", Key="ab.bin", UploadId=uid)
    await wait_for(lambda: not any(store.has(i) for i in _segment_ids(body)))


async def test_upload_part_copy(net: Net) -> None:
    """UploadPartCopy takes a byte range of an existing object."""
    s3 = net.alice
    body = os.urandom(100_000)
    await run(s3.put_object, Bucket="alice.com", Key="copy-src", Body=body)
    up = await run(s3.create_multipart_upload, Bucket="alice.com", Key="copy-dst")
    uid = up["UploadId"]
    part = await run(
        s3.upload_part_copy,
        Bucket="alice.com",
        Key="copy-dst",
        UploadId=uid,
        PartNumber=1,
        CopySource="alice.com/copy-src",
        CopySourceRange="bytes=100-199",
    )
    etag = part["CopyPartResult"]["ETag"]
    assert etag == f'"{hashlib.md5(body[100:200]).hexdigest()}"'
    await run(
        s3.complete_multipart_upload,
        Bucket="alice.com",
        Key="copy-dst",
        UploadId=uid,
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": etag}]},
    )
    got = await run(s3.get_object, Bucket="alice.com", Key="copy-dst")
    assert await run(got["Body"].read) == body[100:200]


async def test_aws_chunked_with_trailer(net: Net) -> None:
    """A hand-signed aws-chunked body with a CRC32 trailer is stored without its framing."""
    data = os.urandom(70_000)
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    framed = (
        f"{len(data):x}\r\n".encode()
        + data
        + b"\r\n0\r\n"
        + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode()
    )
    url = f"{net.url}/alice.com/chunked.bin"
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
        "x-amz-trailer": "x-amz-checksum-crc32",
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
    }
    req = AWSRequest(method="PUT", url=url, data=framed, headers=headers)
    req.context["checksum"] = {"request_algorithm": {"in": "trailer"}}
    creds = Credentials(net.alice_key.access_key, net.alice_key.secret)
    S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
    async with aiohttp.ClientSession() as session:
        async with session.put(url, data=framed, headers=dict(req.headers.items())) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["x-amz-request-id"]
        bad = framed.replace(crc.encode(), base64.b64encode(b"\0\0\0\0"))
        req = AWSRequest(method="PUT", url=url + "2", data=bad, headers=headers)
        req.context["checksum"] = {"request_algorithm": {"in": "trailer"}}
        S3SigV4Auth(creds, "s3", "us-east-1").add_auth(req)
        async with session.put(url + "2", data=bad, headers=dict(req.headers.items())) as resp:
            assert resp.status == 400
            assert b"<Code>BadDigest</Code>" in await resp.read()
    got = await run(net.alice.get_object, Bucket="alice.com", Key="chunked.bin")
    assert await run(got["Body"].read) == data
    assert await code_of(net.alice.head_object, Bucket="alice.com", Key="chunked.bin2") == "404"


async def test_unsupported_and_errors_are_s3_xml(net: Net) -> None:
    """Unsupported operations answer 501 NotImplemented in S3 XML with a request id."""
    s3 = net.alice
    assert await code_of(s3.get_bucket_policy, Bucket="alice.com") == "NotImplemented"
    assert await code_of(s3.get_object_tagging, Bucket="alice.com", Key="x") == "NotImplemented"
    with pytest.raises(ClientError) as info:
        await run(s3.get_object, Bucket="alice.com", Key="missing")
    meta = info.value.response["ResponseMetadata"]
    assert meta["HTTPStatusCode"] == 404 and meta["RequestId"]


async def test_difs_peer_join_serves_s3(tmp_path: Path) -> None:
    """A difs-peer process with --s3 prints its URL; a key from difs s3-key works there."""
    await run(_join_with_s3, tmp_path)


def _join_with_s3(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    proc, url = _start_s3_peer(data)
    try:
        assert (data / "s3").read_text().strip().rstrip("/") == url
        s3 = _client(url, **_new_key(data))
        s3.create_bucket(Bucket="cli-bucket")
        assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["cli-bucket"]
    finally:
        _stop(proc)
    assert not (data / "s3").exists()


def _new_key(data: Path) -> dict[str, str]:
    """An access key made by `difs s3-key create` for the peer in ``data``."""
    made = subprocess.run(
        [str(BIN / "difs"), "s3-key", "create", "--data", str(data), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    key = json.loads(made.stdout)
    return {"access": key["access_key"], "secret": key["secret"]}


@pytest.mark.parametrize(
    ("raw", "bucket", "key"),
    [
        ("/", "", ""),
        ("/b.com", "b.com", ""),
        ("/b.com/", "b.com", ""),
        ("/b.com/a/b.txt?versionId=2", "b.com", "a/b.txt"),
        ("/b.com/a%2Fb%20c%2B", "b.com", "a/b c+"),
        ("/b.com/caf%C3%A9", "b.com", "caf\u00e9"),
        ("/b.com/a//b/", "b.com", "a//b/"),
    ],
)
async def test_parse_target(raw: str, bucket: str, key: str) -> None:
    """A path-style request path as sent gives its bucket and key, percent-decoded."""
    target = parse_target(raw)
    assert (target.bucket, target.key) == (bucket, key)


@pytest.mark.parametrize(
    ("header", "bucket", "key", "version"),
    [
        ("b.com/a", "b.com", "a", None),
        ("/b.com/a/b.txt", "b.com", "a/b.txt", None),
        ("b.com/%20", "b.com", " ", None),
        ("b.com/_", "b.com", "_", None),
        ("b.com/%3FversionId", "b.com", "?versionId", None),
        ("b.com/%3FversionId?versionId=3", "b.com", "?versionId", "3"),
        ("b.com/a%3FversionId%3D7", "b.com", "a?versionId=7", None),
        ("b.com/a?versionId=null", "b.com", "a", "null"),
        ("b.com/a?b", "b.com", "a?b", None),
        ("b.com/caf%C3%A9+x", "b.com", "caf\u00e9+x", None),
    ],
)
async def test_parse_copy_source(header: str, bucket: str, key: str, version: str | None) -> None:
    """x-amz-copy-source: split at a literal ?versionId= only, then URL-decoded."""
    assert parse_copy_source(header) == (bucket, key, version)


@pytest.mark.parametrize("header", ["b.com", "b.com/", "/b.com", "%2Fa", "b.com/%FF"])
async def test_bad_copy_sources_are_invalid_argument(header: str) -> None:
    """A copy source without a bucket and a key, or not UTF-8, is InvalidArgument."""
    with pytest.raises(S3Error) as info:
        parse_copy_source(header)
    assert info.value.code == "InvalidArgument"


@pytest.mark.parametrize("raw", ["/b.com/%FF", "relative"])
async def test_bad_targets_are_invalid_uri(raw: str) -> None:
    """A path that is not UTF-8 once decoded, or not absolute, is InvalidURI."""
    with pytest.raises(S3Error) as info:
        parse_target(raw)
    assert info.value.code == "InvalidURI"


@pytest.mark.parametrize(("text", "version"), [(None, None), ("null", None), ("1", 1), ("42", 42)])
async def test_version_ids(text: str | None, version: int | None) -> None:
    """versionId is a DIFS version number; null or none is the newest."""
    assert version_id(text) == version


@pytest.mark.parametrize("text", ["0", "-1", "abc", "1" * 13, "\u0661"])
async def test_bad_version_ids(text: str) -> None:
    """Anything but a positive number (or null) is InvalidArgument."""
    with pytest.raises(S3Error) as info:
        version_id(text)
    assert info.value.code == "InvalidArgument"


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"content-type": "text/plain", "x-amz-meta-a": "1"}, None),
        ({"x-amz-meta-a": "\u00e9"}, "InvalidArgument"),
        ({"x-amz-meta-big": "v" * 2000}, "MetadataTooLarge"),
    ],
)
async def test_object_meta_from_headers(headers: dict[str, str], code: str | None) -> None:
    """Metadata headers become signed metadata, or S3's error when DIFS cannot sign them."""
    stored = meta_headers({**{k.title(): v for k, v in headers.items()}, "Host": "x"})
    assert stored == headers
    if code is None:
        meta = object_meta(stored, "0" * 32)
        assert meta.content_type == headers.get("content-type")
        assert dict(meta.user) == {"a": "1"}
        return
    with pytest.raises(S3Error) as info:
        object_meta(stored, "0" * 32)
    assert info.value.code == code


class _StreamingSigV4(S3SigV4Auth):  # type: ignore[misc]
    """botocore's SigV4 with the signed aws-chunked payload announced."""

    def payload(self, request: AWSRequest) -> str:
        return "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"


def _signed_chunked(
    key: S3Key, url: str, data: bytes, sizes: list[int]
) -> tuple[bytes, dict[str, str]]:
    """A PUT of ``data`` as signed aws-chunked chunks of ``sizes``: (body, headers)."""
    headers = {
        "Content-Encoding": "aws-chunked",
        "x-amz-decoded-content-length": str(len(data)),
    }
    req = AWSRequest(method="PUT", url=url, data=b"", headers=headers)
    _StreamingSigV4(Credentials(key.access_key, key.secret), "s3", "us-east-1").add_auth(req)
    signed = dict(req.headers.items())
    seed = signed["Authorization"].rsplit("Signature=", 1)[1]
    date = signed["X-Amz-Date"]
    day = date[:8]
    signer = ChunkSigner(
        seed, signing_key(key.secret, day, "us-east-1"), f"{day}/us-east-1/s3/aws4_request", date
    )
    body = b""
    previous = seed
    at = 0
    for size in [*sizes, 0]:
        chunk = data[at : at + size]
        at += size
        previous = signer.chunk_signature(previous, hashlib.sha256(chunk).hexdigest())
        body += f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + chunk + b"\r\n"
    return body, signed


async def test_signed_aws_chunked(net: Net) -> None:
    """A signed aws-chunked body is stored without its framing; a changed byte in a chunk
    fails its chunk signature and publishes nothing."""
    data = os.urandom(100_000)
    url = f"{net.url}/alice.com/signed-chunks.bin"
    sizes = [65536, len(data) - 65536]
    body, headers = _signed_chunked(net.alice_key, url, data, sizes)
    bad_body, bad_headers = _signed_chunked(net.alice_key, url + "-bad", data, sizes)
    tampered = bad_body[:70_000] + bytes([bad_body[70_000] ^ 1]) + bad_body[70_001:]
    async with aiohttp.ClientSession() as session:
        async with session.put(url + "-bad", data=tampered, headers=bad_headers) as resp:
            assert resp.status == 403, await resp.text()
            assert b"<Code>SignatureDoesNotMatch</Code>" in await resp.read()
        async with session.put(url, data=body, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
    got = await run(net.alice.get_object, Bucket="alice.com", Key="signed-chunks.bin")
    assert await run(got["Body"].read) == data
    code = await code_of(net.alice.head_object, Bucket="alice.com", Key="signed-chunks.bin-bad")
    assert code == "404"


async def test_listings_carry_the_etag_head_object_gives(net: Net) -> None:
    """ListObjects V1/V2 and ListObjectVersions show the ETag HeadObject gives (MD5, multipart)."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="etags")
    await run(s3.put_object, Bucket="etags", Key="d/plain", Body=b"plain body")
    up = await run(s3.create_multipart_upload, Bucket="etags", Key="d/multi")
    part = await run(
        s3.upload_part, Bucket="etags", Key="d/multi", UploadId=up["UploadId"], PartNumber=1,
        Body=b"part",
    )  # fmt: skip
    await run(
        s3.complete_multipart_upload, Bucket="etags", Key="d/multi", UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["ETag"]}]},
    )  # fmt: skip
    heads = {
        k: (await run(s3.head_object, Bucket="etags", Key=k))["ETag"]
        for k in ("d/plain", "d/multi")
    }
    assert heads["d/plain"] == f'"{hashlib.md5(b"plain body").hexdigest()}"'
    assert heads["d/multi"].endswith('-1"')
    v2 = await run(s3.list_objects_v2, Bucket="etags")
    v1 = await run(s3.list_objects, Bucket="etags", Prefix="d/")
    versions = await run(s3.list_object_versions, Bucket="etags")
    for listed in (v2["Contents"], v1["Contents"], versions["Versions"]):
        assert {c["Key"]: c["ETag"] for c in listed} == heads


async def test_max_keys_zero_lists_nothing_untruncated(net: Net) -> None:
    """max-keys=0 answers no keys and IsTruncated false, V1 and V2, as S3 does."""
    s3 = net.alice
    await run(s3.put_object, Bucket="alice.com", Key="mk0", Body=b"x")
    v2 = await run(s3.list_objects_v2, Bucket="alice.com", MaxKeys=0)
    assert (v2["KeyCount"], v2["IsTruncated"], v2.get("Contents")) == (0, False, None)
    v1 = await run(s3.list_objects, Bucket="alice.com", MaxKeys=0)
    assert (v1["IsTruncated"], v1.get("Contents")) == (False, None)


async def test_an_empty_continuation_token_is_refused_as_s3_does(net: Net) -> None:
    """An empty continuation-token is InvalidArgument, as S3 and moto answer it."""
    code = await code_of(net.alice.list_objects_v2, Bucket="alice.com", ContinuationToken="")
    assert code == "InvalidArgument"


async def test_delete_bucket_aborts_its_unfinished_uploads(net: Net) -> None:
    """DeleteBucket succeeds over an unfinished multipart upload (as S3) and aborts it."""
    s3 = net.alice
    await run(s3.create_bucket, Bucket="mpu-gone")
    up = await run(s3.create_multipart_upload, Bucket="mpu-gone", Key="big")
    await run(
        s3.upload_part, Bucket="mpu-gone", Key="big", UploadId=up["UploadId"], PartNumber=1,
        Body=b"staged",
    )  # fmt: skip
    await run(s3.delete_bucket, Bucket="mpu-gone")
    s3peer = net.peers[-1]
    assert s3peer.s3 is not None
    assert s3peer.s3.uploads.get(up["UploadId"]) is None
    assert s3peer.s3.uploads.uploads("mpu-gone") == []


@pytest.mark.parametrize("key", [" ", "_", "__", "?versionId", "a?versionId=7", "%41 b+c"])
async def test_copy_source_keys_are_url_decoded(net: Net, key: str) -> None:
    """CopyObject and UploadPartCopy find source keys with ' ', '?versionId', '%', '+'."""
    s3 = net.alice
    body = b"source " + key.encode()
    await run(s3.put_object, Bucket="alice.com", Key=key, Body=body)
    source = {"Bucket": "alice.com", "Key": key}
    await run(s3.copy_object, Bucket="alice.com", Key="copied", CopySource=source)
    got = await run(s3.get_object, Bucket="alice.com", Key="copied")
    assert await run(got["Body"].read) == body
    up = await run(s3.create_multipart_upload, Bucket="alice.com", Key="part-copied")
    part = await run(
        s3.upload_part_copy, Bucket="alice.com", Key="part-copied", UploadId=up["UploadId"],
        PartNumber=1, CopySource=source,
    )  # fmt: skip
    await run(
        s3.complete_multipart_upload, Bucket="alice.com", Key="part-copied",
        UploadId=up["UploadId"],
        MultipartUpload={"Parts": [{"PartNumber": 1, "ETag": part["CopyPartResult"]["ETag"]}]},
    )  # fmt: skip
    got = await run(s3.get_object, Bucket="alice.com", Key="part-copied")
    assert await run(got["Body"].read) == body


async def test_stored_object_keeps_the_serving_peers_copy(tmp_path: Path) -> None:
    """An object published from the serving peer's segment store (as a completed
    multipart upload is) has r copies of every range, one of them on that peer."""
    peers = await start_peers(tmp_path, 6)
    try:
        entry = peers[0]
        assert entry.store is not None
        seg = 64 << 10
        data = os.urandom(64 * seg)
        pieces = [data[i : i + seg] for i in range(0, len(data), seg)]
        hashes = [bytes(segment_hash(p)) for p in pieces]
        hash_list = encode_hash_list([SegmentId(h) for h in hashes])
        integrity = bytes(hash_list_root(hash_list))
        owner = b"s3-test-upload"
        entry.store.put_many([*zip(hashes, pieces, strict=True), (integrity, hash_list)], owner)
        for replicas in (1, 2):
            async with StoredClient(
                entry.address,
                StoredObject(hashes, len(data), seg),
                integrity,
                publisher=Identity.generate(),
                token=entry.control_token,
            ) as client:
                result = await client.put(
                    cast(IO[bytes], io.BytesIO()),
                    f"/kept-{replicas}",
                    segment_size=seg,
                    replicas=replicas,
                )
            assert len(result.ranges) == 8
            for placed in result.ranges:
                assert entry.node_id.hex() in placed["holders"]
                assert len(set(placed["holders"])) == replicas
            async with Client(peers[5].address) as reader:
                out = io.BytesIO()
                await reader.get(f"/kept-{replicas}", out)
            assert out.getvalue() == data
    finally:
        await stop_all(peers)


async def test_a_streamed_put_keeps_the_serving_peers_copy(tmp_path: Path) -> None:
    """A stream the S3 server publishes (a PutObject body) has r copies of every range,
    one of them on the serving peer, which stored it whole as it arrived."""
    peers = await start_peers(tmp_path, 6)
    try:
        entry, seg = peers[0], 64 << 10
        data = os.urandom(64 * seg)
        async with KeepingClient(
            entry.address, publisher=Identity.generate(), token=entry.control_token
        ) as client:
            result = await client.put(io.BytesIO(data), "/kept", segment_size=seg, replicas=2)
        assert len(result.ranges) == 8
        for placed in result.ranges:
            assert entry.node_id.hex() in placed["holders"]
            assert len(set(placed["holders"])) == 2
        async with Client(peers[5].address) as reader:
            out = io.BytesIO()
            await reader.get("/kept", out)
        assert out.getvalue() == data
    finally:
        await stop_all(peers)


async def test_s3_upload_expiry_option_frees_unfinished_uploads(tmp_path: Path) -> None:
    """An unfinished multipart upload outlives a restart with the default expiry (a day)
    and is aborted at the start of a peer run with --s3-upload-expiry shorter than its age."""
    await run(_expiry_across_restarts, tmp_path)


def _start_s3_peer(data: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            *(str(BIN / "difs-peer"), "join", "--data", str(data), "--http", "off"),
            *("--s3", "127.0.0.1:0", *extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line.startswith("peer ready"), line
    return proc, dict(part.split("=", 1) for part in line.split()[2:])["s3"].rstrip("/")


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=15)


def _expiry_across_restarts(tmp_path: Path) -> None:
    data = tmp_path / "peer"
    proc, url = _start_s3_peer(data)
    try:
        key = _new_key(data)
        s3 = _client(url, **key)
        s3.create_bucket(Bucket="exp.com")
        uid = s3.create_multipart_upload(Bucket="exp.com", Key="big.bin")["UploadId"]
        s3.upload_part(
            Bucket="exp.com", Key="big.bin", UploadId=uid, PartNumber=1, Body=b"x" * 1000
        )
        written = time.monotonic()
    finally:
        _stop(proc)

    def uploads(*extra: str, until_empty: bool = False) -> list[str]:
        """The unfinished uploads a peer started with ``extra`` lists; ``until_empty``:
        asked again (for up to 15 s) while its expiry pass, run at its start, is under way."""
        proc, url = _start_s3_peer(data, *extra)
        try:
            s3 = _client(url, **key)
            deadline = time.monotonic() + 15
            while True:
                listed = s3.list_multipart_uploads(Bucket="exp.com").get("Uploads", [])
                if not (until_empty and listed and time.monotonic() < deadline):
                    return [u["UploadId"] for u in listed]
                time.sleep(0.05)
        finally:
            _stop(proc)

    assert uploads() == [uid]
    # the upload's age must pass the expiry given below before the peer that expires it starts
    time.sleep(max(0.0, 1.5 - (time.monotonic() - written)))
    assert uploads("--s3-upload-expiry", "1", until_empty=True) == []
