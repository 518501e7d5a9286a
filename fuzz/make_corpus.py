"""Write the seed corpus: a few valid inputs per target, under ``fuzz/corpus/<target>/``.

Run ``python -m fuzz.make_corpus`` after a change of a wire format or of a record layout.
The output is deterministic (Ed25519 signatures are), so the files only change when the
formats do; ``tests/test_fuzz_targets.py`` checks that the checked-in files are current.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import zlib
from pathlib import Path

import umsgpack

from difs_p2p import wire
from difs_p2p.names import name_key
from difs_p2p.segments import SegmentId
from fuzz.structure import samples
from fuzz.targets import S3_SIGNER

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
_SEG_ID = SegmentId(bytes(range(32)))
_SENDER = bytes(range(1, 21))
_MSG_ID = bytes(range(100, 120))


def _wire_seeds() -> dict[str, bytes]:
    frames: dict[str, wire.Frame] = {
        "hello": wire.Hello(request_id=1, peer="00112233445566778899aabbccddeeff01234567"),
        "hello_client": wire.Hello(request_id=1, peer=None),
        "call": wire.Call(
            request_id=2, op="find_value", args={"key": "ab" * 16, "tags": ["α", None, 1.5]}
        ),
        "reply": wire.Reply(request_id=2, body={"ok": True, "nested": {"list": [1, [2, [3]]]}}),
        "error": wire.Error(request_id=3, code=wire.ErrorCode.NOT_FOUND, message="no such name"),
        "put_seg": wire.PutSeg(request_id=4, seg_id=_SEG_ID, data=b"segment bytes"),
        "get_seg": wire.GetSeg(request_id=5, seg_id=_SEG_ID, offset=4096, length=100),
        "data": wire.Data(request_id=5, data=b"x" * 100),
        "ack": wire.Ack(request_id=4, seg_id=_SEG_ID, stored=True),
    }
    seeds = {name: wire.encode_bytes(frame) for name, frame in frames.items()}
    seeds["call_then_reply"] = seeds["call"] + seeds["reply"]
    seeds["truncated_call"] = seeds["call"][:20]
    return seeds


def _request(name: str, *args: object) -> bytes:
    packed: bytes = umsgpack.packb([name, list(args)])
    return b"\x00" + _MSG_ID + packed


def _dht_seeds() -> dict[str, bytes]:
    sample = samples()
    return {
        "ping": _request("ping", _SENDER),
        "stun": _request("stun"),
        "find_node": _request("find_node", _SENDER, bytes(20)),
        "find_value": _request("find_value", _SENDER, sample.manifest_key),
        "store": _request("store", _SENDER, sample.manifest_key, sample.manifests[1]),
        "add_entries": _request("add_entries", _SENDER, sample.holder_key, [sample.holder]),
        "find_entries": _request("find_entries", _SENDER, sample.holder_key, 0),
        "leave": _request("leave", _SENDER),
        "reply": b"\x01" + _MSG_ID + umsgpack.packb(True),
        "structured_request": b"\x81" + bytes(range(1, 64)),
        "structured_operation": b"\x80" + bytes(64),
    }


def _codec_seeds() -> dict[str, bytes]:
    """One datagram of each kind the codec decodes, and two structured inputs."""
    seeds = {name: data for name, data in _dht_seeds().items() if not name.startswith("structured")}
    seeds["identify"] = _request("identify", _SENDER, bytes(16), bytes(80))
    seeds["store_entries"] = _request("store", _SENDER, bytes(20), b"\x01v", [b"e"])
    seeds["entries_reply"] = (
        b"\x01"
        + _MSG_ID
        + umsgpack.packb({"entries": [b"e"], "next": -1, "nodes": [[_SENDER, "192.0.2.1", 1]]})
    )
    seeds["structured_request"] = b"\x80\x00" + bytes(range(1, 64))
    seeds["structured_reply"] = b"\x80\x01" + bytes(range(1, 64))
    return seeds


def _manifest_seeds() -> dict[str, bytes]:
    sample = samples()
    seeds = {
        name: raw
        for name, raw in zip(("v1", "v2", "tombstone", "owned"), sample.manifests, strict=True)
    }
    seeds["structured_field"] = b"\x80" + bytes(range(0, 40))
    seeds["structured_resign"] = b"\x80\x00\x05" + bytes(range(13, 50))
    return seeds


def _holder_seeds() -> dict[str, bytes]:
    return {
        "entry": samples().holder,
        "structured_field": b"\x80\x00\x01" + bytes(range(1, 40)),
        "structured_resign": b"\x80\x01\x00\x07\x04" + bytes(range(1, 20)),
    }


def _name_seeds() -> dict[str, bytes]:
    sample = samples()
    names = {
        "simple": "/a/b",
        "dotted": "/a.com/izone.mp4",
        "trailing_slash": "/a/b/",
        "decomposed": "/cafe\u0301/x",
        "owned": f"/key/{sample.identity.fingerprint}/c",
        "unicode": "/名前/ファイル",
    }
    seeds = {name: text.encode() for name, text in names.items()}
    seeds["lone_surrogate"] = b"/a/\xed\xa0\x80"
    seeds["invalid_utf8"] = b"/a/\xff\xfe"
    return seeds


def _hash_list_seeds() -> dict[str, bytes]:
    hashes = bytes(range(64))
    return {
        "two": b"\x02" + hashes,
        "empty": b"\x02",
        "counted": b"\x80" + (2).to_bytes(4, "big") + hashes,
        "key": b"\x02" + name_key("/a/b") + bytes(12),
    }


def _crc32(data: bytes) -> bytes:
    return base64.b64encode(zlib.crc32(data).to_bytes(4, "big"))


def _aws_chunked_seeds() -> dict[str, bytes]:
    """Bodies as boto3 frames them (unsigned, a CRC32 trailer) and signed with trailers
    (the target's signer), fed whole and in small pieces; and cut ones."""
    data = b"first chunk" + bytes(range(256))
    unsigned = b"%x\r\n%s\r\n0\r\nx-amz-checksum-crc32:%s\r\n\r\n" % (
        len(data),
        data,
        _crc32(data),
    )
    signed = bytearray()
    previous = S3_SIGNER.seed_signature
    for chunk in (data, b""):
        previous = S3_SIGNER.chunk_signature(previous, hashlib.sha256(chunk).hexdigest())
        signed += b"%x;chunk-signature=%s\r\n%s" % (len(chunk), previous.encode(), chunk)
        signed += b"\r\n" if chunk else b""
    trailer = b"x-amz-checksum-crc32:" + _crc32(data) + b"\n"
    signed += trailer.replace(b"\n", b"\r\n")
    signature = S3_SIGNER.trailer_signature(previous, trailer)
    signed += b"x-amz-trailer-signature:" + signature.encode() + b"\r\n\r\n"
    return {
        "unsigned": b"\xfe" + unsigned,
        "unsigned_bytewise": b"\x00" + unsigned,
        "unsigned_cut": b"\x0e" + unsigned[:-9],
        "signed": b"\xff" + bytes(signed),
        "signed_pieces": b"\x07" + bytes(signed),
    }


def _s3_request_seeds() -> dict[str, bytes]:
    """AWS's documented requests: SigV4 header (GET object), a presigned URL, SigV2
    (header and query)."""
    sha = hashlib.sha256(b"").hexdigest()
    return {
        "sigv4_header": (
            "GET /test.txt\nhost: examplebucket.s3.amazonaws.com\nrange: bytes=0-9\n"
            f"x-amz-content-sha256: {sha}\nx-amz-date: 20130524T000000Z\n"
            "authorization: AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/"
            "us-east-1/s3/aws4_request, SignedHeaders=host;range;x-amz-content-sha256;"
            "x-amz-date, Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"
        ).encode(),
        "sigv4_presigned": (
            b"GET /test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE"
            b"%2F20130524%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20130524T000000Z"
            b"&X-Amz-Expires=86400&X-Amz-SignedHeaders=host&X-Amz-Signature="
            b"aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404\n"
            b"host: examplebucket.s3.amazonaws.com"
        ),
        "sigv2_header": (
            b"GET /johnsmith/photos/puppy.jpg\nhost: s3.amazonaws.com\n"
            b"date: Tue, 27 Mar 2007 19:36:42 +0000\n"
            b"authorization: AWS AKIAIOSFODNN7EXAMPLE:bWq2s1WEIj+Ydj0vQ697zp+IXMU="
        ),
        "sigv2_query": (
            b"GET /johnsmith/photos/puppy.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE"
            b"&Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D&Expires=1175139620\n"
            b"host: s3.amazonaws.com"
        ),
    }


def seed_inputs() -> dict[str, dict[str, bytes]]:
    """Every target's seeds, by file name."""
    return {
        "wire_frames": _wire_seeds(),
        "dht_datagram": _dht_seeds(),
        "dht_codec": _codec_seeds(),
        "manifest_record": _manifest_seeds(),
        "holder_entry": _holder_seeds(),
        "names": _name_seeds(),
        "hash_list": _hash_list_seeds(),
        "aws_chunked": _aws_chunked_seeds(),
        "s3_request": _s3_request_seeds(),
    }


def write_corpus(root: Path) -> None:
    """Replace ``root/<target>/`` with the seeds of each target."""
    for target, seeds in seed_inputs().items():
        folder = root / target
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for name, data in seeds.items():
            (folder / f"{name}.bin").write_bytes(data)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m fuzz.make_corpus", description=__doc__)
    parser.add_argument("--out", type=Path, default=CORPUS_DIR, help="default: fuzz/corpus")
    args = parser.parse_args()
    write_corpus(args.out)
    print(f"seed corpus written to {args.out}")


if __name__ == "__main__":
    main()
