"""Real S3 clients against peer processes serving the S3 API (``difs-peer join --s3``):
boto3, the aws CLI, s3fs, the MinIO SDK, rclone and s3cmd, unchanged. Each compares the
bytes and the listings it gets back exactly."""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.config import Config

from difs_p2p.identity import Identity, load_or_create
from tests.s3net import BIN, S3Network, start_s3_network

# DIFS_S3_CLIENTS_URL=http://HOST:PORT runs these tests against another S3 server instead
# (moto_server, say: any access key works there), to tell a client's quirk from ours.
OTHER = os.environ.get("DIFS_S3_CLIENTS_URL")

MiB = 1 << 20
REGION = "us-east-1"


@dataclass
class Server:
    url: str
    access_key: str
    secret: str
    root: Path
    net: S3Network | None = None  # None: another S3 server
    owner: Identity | None = None  # the key's publisher identity

    def boto(self, **config: Any) -> Any:
        """A boto3 S3 client of this server (path-style, SigV4, no retries)."""
        return boto3.client(
            "s3",
            endpoint_url=self.url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret,
            region_name=REGION,
            config=Config(
                s3={"addressing_style": "path"},
                signature_version="s3v4",
                **({"retries": {"max_attempts": 1}} | config),
            ),
        )

    def env(self) -> dict[str, str]:
        """Environment of a CLI client: these credentials and nothing of the user's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        home = self.root / "home"
        home.mkdir(exist_ok=True)
        return env | {
            "HOME": str(home),
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_CONFIG_FILE": str(home / "aws-config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(home / "aws-credentials"),
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def bucket(self, stem: str) -> str:
        """A new bucket of this test's key, named after ``stem``."""
        name = f"{stem}-{secrets.token_hex(4)}"
        self.boto().create_bucket(Bucket=name)
        return name


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Three peer processes, the first serving S3; one access key."""
    root = tmp_path_factory.mktemp("s3clients")
    if OTHER:
        yield Server(OTHER, "other-key", "other-secret", root)
        return
    net = start_s3_network(root / "net")
    try:
        owner = load_or_create(root / "publisher.key")
        key, secret = net.create_key("clients", root / "publisher.key")
        yield Server(net.url, key, secret, root, net, owner)
    finally:
        net.stop()


def run(*cmd: str, env: dict[str, str], timeout: float = 120) -> str:
    """Run a client command; its stdout (it must succeed)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, check=False)
    assert out.returncode == 0, (cmd, out.stdout[-2000:], out.stderr[-2000:])
    return out.stdout


def keys_of(client: Any, bucket: str, prefix: str = "") -> list[str]:
    """Every key under ``prefix`` (ListObjectsV2, all pages)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return [o["Key"] for page in pages for o in page.get("Contents", [])]


def tree(folder: Path) -> dict[str, bytes]:
    """The files under ``folder``: relative path -> bytes."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()
    }


def make_tree(folder: Path, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)


def test_boto3_multipart_upload_and_ranged_download(server: Server, tmp_path: Path) -> None:
    """upload_file of 20 MiB in 5 MiB parts (a 4-part ETag) and download_file back in
    ranged GETs give the same bytes."""
    bucket = server.bucket("boto-big")
    src = tmp_path / "big.bin"
    data = os.urandom(20 * MiB)
    src.write_bytes(data)
    config = TransferConfig(
        multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4
    )
    client = server.boto()
    client.upload_file(str(src), bucket, "media/big.bin", Config=config)
    head = client.head_object(Bucket=bucket, Key="media/big.bin")
    assert head["ContentLength"] == len(data)
    assert head["ETag"].strip('"').endswith("-4")
    dst = tmp_path / "back.bin"
    client.download_file(bucket, "media/big.bin", str(dst), Config=config)
    assert hashlib.sha256(dst.read_bytes()).digest() == hashlib.sha256(data).digest()
    part = client.get_object(Bucket=bucket, Key="media/big.bin", Range="bytes=7340032-7340041")
    assert part["Body"].read() == data[7340032:7340042]


def stalled_complete(net: S3Network, root: Path, **config: Any) -> tuple[Any, float, bytes]:
    """A 2-part upload completed by a boto3 client made with ``config`` while a holder of
    the copies is stopped (SIGSTOP) for 3 s: the client, the seconds Complete took, the
    bytes (the object is ``big.bin`` in the client's bucket ``slow-...``)."""
    key, secret = net.create_key("slow")
    server = Server(net.url, key, secret, root, net)
    bucket = server.bucket("slow")
    client = server.boto(**config)
    client.bucket = bucket
    data = os.urandom(10 * MiB)
    upload = client.create_multipart_upload(Bucket=bucket, Key="big.bin")["UploadId"]
    parts = []
    for number in (1, 2):
        piece = data[(number - 1) * 5 * MiB : number * 5 * MiB]
        etag = client.upload_part(
            Bucket=bucket, Key="big.bin", UploadId=upload, PartNumber=number, Body=piece
        )["ETag"]
        parts.append({"PartNumber": number, "ETag": etag})
    holder = net.procs[1]  # with 3 peers and 3 copies, every range needs it
    holder.send_signal(signal.SIGSTOP)
    resume = threading.Timer(3.0, holder.send_signal, (signal.SIGCONT,))
    resume.start()
    try:
        started = time.monotonic()
        done = client.complete_multipart_upload(
            Bucket=bucket, Key="big.bin", UploadId=upload, MultipartUpload={"Parts": parts}
        )
        waited = time.monotonic() - started
    finally:
        resume.cancel()
        holder.send_signal(signal.SIGCONT)
    assert waited > 1.0, "Complete did not outlast the read timeout: nothing shown"
    assert done["ETag"].strip('"').endswith("-2")
    return client, waited, data


def test_boto3_complete_outlasting_its_read_timeout(tmp_path: Path) -> None:
    """A CompleteMultipartUpload that takes longer than boto3's read timeout (1 s here;
    60 s by default, which a large object's copies can outlast) succeeds at its one
    attempt: the S3 API answers 200 and a space every 0.2 s (``--s3-keepalive``) until the
    result. The object is then whole."""
    net = start_s3_network(tmp_path / "net", 3, "--s3-keepalive", "0.2")
    try:
        client, _, data = stalled_complete(
            net, tmp_path, read_timeout=1, retries={"total_max_attempts": 1}
        )
        assert client.get_object(Bucket=client.bucket, Key="big.bin")["Body"].read() == data
    finally:
        net.stop()


def test_boto3_complete_sent_again_waits_for_the_same_publish(tmp_path: Path) -> None:
    """Without keepalive spaces in time (--s3-keepalive 60), boto3 times out after 1 s and
    sends the same Complete again, several times: each one waits for the publish the
    first started, the last gets its answer, and one version is published."""
    net = start_s3_network(tmp_path / "net", 3, "--s3-keepalive", "60")
    try:
        client, _, data = stalled_complete(
            net, tmp_path, read_timeout=1, retries={"total_max_attempts": 10}
        )
        assert client.get_object(Bucket=client.bucket, Key="big.bin")["Body"].read() == data
        versions = client.list_object_versions(Bucket=client.bucket)["Versions"]
        assert [v["Key"] for v in versions] == ["big.bin"]
    finally:
        net.stop()


def test_boto3_lists_2500_keys_in_pages_with_delimiter(server: Server) -> None:
    """2,500 keys come back exactly, in order, over pages of 1,000 and as folders and keys
    with delimiter '/': 100 put by 16 threads at once, and (PutObject runs at ~20 a second
    here) 2,400 in four folders listed by child entries the bucket's owner signs."""
    bucket = server.bucket("boto-many")
    client = server.boto(max_pool_connections=16)
    tops = [f"top{i:03d}" for i in range(100)]
    nested = [f"dir{i % 4}/k{i:04d}" for i in range(2400)]
    keys = sorted(tops + nested)

    def put(key: str) -> None:
        client.put_object(Bucket=bucket, Key=key, Body=key.encode())

    if server.net is not None and server.owner is not None:
        server.net.lay_out(server.owner, bucket, {k: len(k) for k in nested})
    else:
        tops = keys
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, tops))
    pages = list(
        client.get_paginator("list_objects_v2").paginate(
            Bucket=bucket, PaginationConfig={"PageSize": 1000}
        )
    )
    assert [len(p.get("Contents", [])) for p in pages] == [1000, 1000, 500]
    assert [o["Key"] for p in pages for o in p["Contents"]] == keys
    assert all(o["Size"] == len(o["Key"]) for p in pages for o in p["Contents"])
    top = client.list_objects_v2(Bucket=bucket, Delimiter="/")
    assert [c["Prefix"] for c in top["CommonPrefixes"]] == ["dir0/", "dir1/", "dir2/", "dir3/"]
    assert [o["Key"] for o in top["Contents"]] == [f"top{i:03d}" for i in range(100)]
    assert top["KeyCount"] == 104 and top["IsTruncated"] is False
    inner = client.list_objects_v2(Bucket=bucket, Prefix="dir2/", Delimiter="/", MaxKeys=250)
    assert inner["IsTruncated"] is True and inner["KeyCount"] == 250
    assert keys_of(client, bucket, "dir2/") == [k for k in keys if k.startswith("dir2/")]
    assert client.get_object(Bucket=bucket, Key="top042")["Body"].read() == b"top042"


def test_boto3_copy_and_delete_objects(server: Server) -> None:
    """copy_object copies bytes across buckets; delete_objects removes several keys at once."""
    src, dst = server.bucket("boto-src"), server.bucket("boto-dst")
    client = server.boto()
    body = os.urandom(100_000)
    client.put_object(Bucket=src, Key="a/one.bin", Body=body)
    client.copy_object(Bucket=dst, Key="b/two.bin", CopySource={"Bucket": src, "Key": "a/one.bin"})
    assert client.get_object(Bucket=dst, Key="b/two.bin")["Body"].read() == body
    for i in range(3):
        client.put_object(Bucket=dst, Key=f"x{i}", Body=b"x")
    deleted = client.delete_objects(
        Bucket=dst, Delete={"Objects": [{"Key": "x0"}, {"Key": "x2"}, {"Key": "b/two.bin"}]}
    )
    assert sorted(d["Key"] for d in deleted["Deleted"]) == ["b/two.bin", "x0", "x2"]
    assert keys_of(client, dst) == ["x1"]
    assert keys_of(client, src) == ["a/one.bin"]


def test_boto3_presigned_urls_with_curl(server: Server, tmp_path: Path) -> None:
    """curl uploads with a presigned PUT URL and fetches with a presigned GET URL."""
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("needs the curl binary")
    bucket = server.bucket("presign")
    client = server.boto()
    body = os.urandom(70_000)
    src = tmp_path / "up.bin"
    src.write_bytes(body)
    put_url = client.generate_presigned_url(
        "put_object", Params={"Bucket": bucket, "Key": "p/up.bin"}, ExpiresIn=300
    )
    run(curl, "-sSf", "-X", "PUT", "-T", str(src), put_url, env=server.env())
    assert client.get_object(Bucket=bucket, Key="p/up.bin")["Body"].read() == body
    get_url = client.generate_presigned_url(
        "get_object", Params={"Bucket": bucket, "Key": "p/up.bin"}, ExpiresIn=300
    )
    dst = tmp_path / "down.bin"
    run(curl, "-sSf", "-o", str(dst), get_url, env=server.env())
    assert dst.read_bytes() == body


def test_aws_cli(server: Server, tmp_path: Path) -> None:
    """aws s3 cp/sync/ls/rm and s3api list-object-versions and a multipart upload by hand."""
    env = server.env()
    bucket = server.bucket("awscli")
    aws = [str(BIN / "aws"), "--endpoint-url", server.url]
    local = tmp_path / "local"
    files = {"a.txt": b"alpha\n", "sub/b.bin": os.urandom(50_000), "sub/deep/c": b""}
    make_tree(local, files)
    run(*aws, "s3", "cp", str(local / "a.txt"), f"s3://{bucket}/one/a.txt", env=env)
    run(*aws, "s3", "sync", str(local), f"s3://{bucket}/tree", env=env)
    listed = run(*aws, "s3", "ls", "--recursive", f"s3://{bucket}/", env=env)
    assert [line.split()[-1] for line in listed.splitlines()] == [
        "one/a.txt", "tree/a.txt", "tree/sub/b.bin", "tree/sub/deep/c",
    ]  # fmt: skip
    top = run(*aws, "s3", "ls", f"s3://{bucket}/tree/", env=env)
    assert [line.split()[-1] for line in top.splitlines()] == ["sub/", "a.txt"]
    back = tmp_path / "back"
    run(*aws, "s3", "sync", f"s3://{bucket}/tree", str(back), env=env)
    assert tree(back) == files
    run(*aws, "s3", "cp", str(local / "sub/b.bin"), f"s3://{bucket}/one/a.txt", env=env)
    versions = run(
        *aws, "s3api", "list-object-versions", "--bucket", bucket, "--prefix", "one/",
        "--query", "Versions[].[Key,IsLatest,Size]", "--output", "text", env=env,
    )  # fmt: skip
    rows = sorted(line.split() for line in versions.splitlines())
    assert rows == [["one/a.txt", "False", "6"], ["one/a.txt", "True", "50000"]]
    run(*aws, "s3", "rm", f"s3://{bucket}/one/a.txt", env=env)
    run(*aws, "s3", "rm", "--recursive", f"s3://{bucket}/tree/sub", env=env)
    listed = run(*aws, "s3", "ls", "--recursive", f"s3://{bucket}/", env=env)
    assert [line.split()[-1] for line in listed.splitlines()] == ["tree/a.txt"]

    part1, part2 = os.urandom(5 * MiB), os.urandom(1000)
    (tmp_path / "p1").write_bytes(part1)
    (tmp_path / "p2").write_bytes(part2)
    s3api = [*aws, "s3api", "--output", "text"]
    upload_id = run(
        *s3api, "create-multipart-upload", "--bucket", bucket, "--key", "mp/obj",
        "--query", "UploadId", env=env,
    ).strip()  # fmt: skip
    etags = [
        run(
            *s3api, "upload-part", "--bucket", bucket, "--key", "mp/obj", "--upload-id",
            upload_id, "--part-number", str(n), "--body", str(tmp_path / f"p{n}"),
            "--query", "ETag", env=env,
        ).strip()
        for n in (1, 2)
    ]  # fmt: skip
    parts = ",".join(
        f'{{"PartNumber":{n},"ETag":{etag}}}' for n, etag in zip((1, 2), etags, strict=True)
    )
    run(
        *s3api, "complete-multipart-upload", "--bucket", bucket, "--key", "mp/obj",
        "--upload-id", upload_id, "--multipart-upload", f'{{"Parts":[{parts}]}}', env=env,
    )  # fmt: skip
    run(*aws, "s3", "cp", f"s3://{bucket}/mp/obj", str(tmp_path / "mp.out"), env=env)
    assert (tmp_path / "mp.out").read_bytes() == part1 + part2


def test_s3fs(server: Server, tmp_path: Path) -> None:
    """s3fs/fsspec: put a folder, ls, cat, rm."""
    import s3fs

    bucket = server.bucket("s3fs")
    fs = s3fs.S3FileSystem(
        key=server.access_key,
        secret=server.secret,
        endpoint_url=server.url,
        client_kwargs={"region_name": REGION},
        config_kwargs={"s3": {"addressing_style": "path"}},
        use_listings_cache=False,
        skip_instance_cache=True,
    )
    files = {"one.txt": b"one", "sub/two.bin": os.urandom(30_000)}
    make_tree(tmp_path / "up", files)
    fs.put(str(tmp_path / "up") + "/", f"{bucket}/data", recursive=True)
    assert sorted(fs.ls(f"{bucket}/data", detail=False)) == [
        f"{bucket}/data/one.txt", f"{bucket}/data/sub",
    ]  # fmt: skip
    assert fs.cat(f"{bucket}/data/sub/two.bin") == files["sub/two.bin"]
    assert fs.cat(f"{bucket}/data/one.txt") == b"one"
    fs.rm(f"{bucket}/data/one.txt")
    assert fs.find(f"{bucket}/data") == [f"{bucket}/data/sub/two.bin"]


def test_minio_client(server: Server, tmp_path: Path) -> None:
    """The MinIO SDK: fput_object, list_objects(recursive=True), get_object."""
    from minio import Minio

    bucket = server.bucket("minio")
    netloc = urlsplit(server.url).netloc
    mc = Minio(netloc, access_key=server.access_key, secret_key=server.secret, secure=False,
               region=REGION)  # fmt: skip
    bodies = {"m/a.bin": os.urandom(12_345), "m/b/c.txt": b"minio\n", "z": b""}
    for key, body in bodies.items():
        path = tmp_path / key.replace("/", "_")
        path.write_bytes(body)
        mc.fput_object(bucket, key, str(path))
    listed = [(o.object_name, o.size) for o in mc.list_objects(bucket, recursive=True)]
    assert listed == [(k, len(b)) for k, b in sorted(bodies.items())]
    top = [o.object_name for o in mc.list_objects(bucket, prefix="m/")]
    assert top == ["m/a.bin", "m/b/"]
    for key, body in bodies.items():
        response = mc.get_object(bucket, key)
        try:
            assert response.read() == body
        finally:
            response.close()
            response.release_conn()


def rclone_env(server: Server, tmp_path: Path) -> dict[str, str]:
    conf = tmp_path / "rclone.conf"
    conf.write_text(
        "[difs]\ntype = s3\nprovider = Other\nenv_auth = false\n"
        f"access_key_id = {server.access_key}\nsecret_access_key = {server.secret}\n"
        f"endpoint = {server.url}\nregion = {REGION}\nforce_path_style = true\n"
    )
    env = server.env()
    env.pop("AWS_CA_BUNDLE", None)
    return env | {"RCLONE_CONFIG": str(conf)}


def test_rclone(server: Server, tmp_path: Path) -> None:
    """rclone copy, sync (deletes too), check and lsf."""
    rclone = shutil.which("rclone")
    if rclone is None:
        pytest.skip("needs rclone (.ci/sysdeps installs it)")
    env = rclone_env(server, tmp_path)
    bucket = server.bucket("rclone")
    local = tmp_path / "local"
    files = {"a.txt": b"a" * 10, "d/b.bin": os.urandom(200_000), "d/e/c.txt": b"c"}
    make_tree(local, files)
    run(rclone, "copy", str(local), f"difs:{bucket}/r", env=env)
    run(rclone, "check", str(local), f"difs:{bucket}/r", env=env)
    assert run(rclone, "lsf", "-R", "--files-only", f"difs:{bucket}/r", env=env).split() == [
        "a.txt", "d/b.bin", "d/e/c.txt",
    ]  # fmt: skip
    (local / "a.txt").unlink()
    (local / "new.txt").write_bytes(b"new")
    run(rclone, "sync", str(local), f"difs:{bucket}/r", env=env)
    run(rclone, "check", str(local), f"difs:{bucket}/r", env=env)
    assert run(rclone, "lsf", f"difs:{bucket}/r", env=env).split() == ["d/", "new.txt"]
    back = tmp_path / "back"
    run(rclone, "copy", f"difs:{bucket}/r", str(back), env=env)
    assert tree(back) == tree(local)


def test_s3cmd(server: Server, tmp_path: Path) -> None:
    """s3cmd put, ls, get (path-style: --host-bucket is the endpoint itself)."""
    s3cmd = shutil.which("s3cmd")
    if s3cmd is None:
        pytest.skip("needs s3cmd (.ci/sysdeps installs it)")
    env = server.env()
    bucket = server.bucket("s3cmd")
    host = urlsplit(server.url).netloc
    conf = tmp_path / "s3cfg"
    conf.write_text(
        f"[default]\naccess_key = {server.access_key}\nsecret_key = {server.secret}\n"
        f"bucket_location = {REGION}\n"
    )
    cmd = [s3cmd, "-c", str(conf), "--host", host, "--host-bucket", host, "--no-ssl"]
    body = os.urandom(40_000)
    (tmp_path / "f.bin").write_bytes(body)
    (tmp_path / "g.txt").write_bytes(b"gee")
    run(*cmd, "put", str(tmp_path / "f.bin"), f"s3://{bucket}/s/f.bin", env=env)
    run(*cmd, "put", str(tmp_path / "g.txt"), f"s3://{bucket}/g.txt", env=env)
    listed = run(*cmd, "ls", "--recursive", f"s3://{bucket}", env=env)
    assert [line.split()[-1] for line in listed.splitlines()] == [
        f"s3://{bucket}/g.txt", f"s3://{bucket}/s/f.bin",
    ]  # fmt: skip
    top = run(*cmd, "ls", f"s3://{bucket}/", env=env)
    assert [line.split()[-1] for line in top.splitlines()] == [
        f"s3://{bucket}/s/", f"s3://{bucket}/g.txt",
    ]  # fmt: skip
    run(*cmd, "get", f"s3://{bucket}/s/f.bin", str(tmp_path / "back.bin"), env=env)
    assert (tmp_path / "back.bin").read_bytes() == body
