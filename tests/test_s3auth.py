"""S3 authentication, body framing and checksums, and the S3 errors, without sockets."""

from __future__ import annotations

import base64
import calendar
import contextlib
import hashlib
import hmac
import itertools
import re
import time
import zlib
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import urlsplit

import boto3
import google_crc32c
import pytest
from botocore.awsrequest import AWSResponse
from botocore.config import Config
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p import s3errors
from difs_p2p.classgen import replace
from difs_p2p.s3auth import (
    EMPTY_SHA256,
    BodyChecks,
    ChunkedDecoder,
    ChunkSigner,
    SignedRequest,
    authenticate,
    body_decoder,
    canonical_query,
    canonical_request,
    canonical_uri,
    signing_key,
    split_target,
    v4_string_to_sign,
)
from difs_p2p.s3body import UNSIGNED_PAYLOAD
from difs_p2p.s3errors import S3Error

# (code, status) as in Amazon S3's error table
S3_STATUSES = [
    ("AccessDenied", 403),
    ("SignatureDoesNotMatch", 403),
    ("InvalidAccessKeyId", 403),
    ("RequestTimeTooSkewed", 403),
    ("AuthorizationQueryParametersError", 400),
    ("ExpiredToken", 403),
    ("MissingSecurityHeader", 400),
    ("InvalidDigest", 400),
    ("BadDigest", 400),
    ("XAmzContentSHA256Mismatch", 400),
    ("IncompleteBody", 400),
    ("InvalidRequest", 400),
    ("InvalidArgument", 400),
    ("NoSuchBucket", 404),
    ("NoSuchKey", 404),
    ("NoSuchUpload", 404),
    ("NoSuchVersion", 404),
    ("BucketAlreadyExists", 409),
    ("BucketAlreadyOwnedByYou", 409),
    ("BucketNotEmpty", 409),
    ("InvalidBucketName", 400),
    ("KeyTooLongError", 400),
    ("InvalidRange", 416),
    ("PreconditionFailed", 412),
    ("NotImplemented", 501),
    ("MethodNotAllowed", 405),
    ("EntityTooSmall", 400),
    ("InvalidPart", 400),
    ("InvalidPartOrder", 400),
    ("MalformedXML", 400),
    ("InternalError", 500),
    ("SlowDown", 503),
    ("ServiceUnavailable", 503),
]


@pytest.mark.parametrize(("code", "status"), S3_STATUSES)
def test_s3_error_has_s3s_status_and_a_message(code: str, status: int) -> None:
    """Each S3 error code gets S3's HTTP status and a non-empty default message."""
    error = S3Error(code)
    assert (error.code, error.status, s3errors.STATUS[code]) == (code, status, status)
    assert error.message
    assert error.extra == {}


def test_s3_error_keeps_message_status_and_extra() -> None:
    """An explicit message, status and extra fields override the defaults."""
    error = S3Error.of(s3errors.INVALID_ARGUMENT, "bad part number", ArgumentName="partNumber")
    assert (error.status, error.message) == (400, "bad part number")
    assert error.extra == {"ArgumentName": "partNumber"}
    assert S3Error("Custom", "m", 418).status == 418
    assert S3Error("Unknown").status == 500


def test_constructors_fill_the_fields_s3_returns() -> None:
    """The constructors give the code, status and extra elements S3's documents carry."""
    assert s3errors.request_expired().message == "Request has expired"
    assert s3errors.request_expired().code == "AccessDenied"
    mismatch = s3errors.signature_does_not_match("AK", "AWS4-HMAC-SHA256\n...", "GET\n/")
    assert mismatch.extra == {
        "AWSAccessKeyId": "AK",
        "StringToSign": "AWS4-HMAC-SHA256\n...",
        "CanonicalRequest": "GET\n/",
    }
    assert s3errors.no_such_key("a/b").extra == {"Key": "a/b"}
    assert s3errors.invalid_range(10, "bytes=20-").status == 416
    skew = s3errors.request_time_too_skewed("20261206T000000Z", "20261206T010000Z", 900000)
    assert skew.extra["MaxAllowedSkewMilliseconds"] == "900000"


# -- authentication: AWS's documented examples ----------------------------------------------

AK = "AKIAIOSFODNN7EXAMPLE"
SK = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
EXAMPLE_NOW = float(calendar.timegm((2013, 5, 24, 0, 0, 0)))
EXAMPLE_HOST = "examplebucket.s3.amazonaws.com"
SCOPE = f"{AK}/20130524/us-east-1/s3/aws4_request"


def secret_of(access_key: str) -> str | None:
    """The example key's secret; no other key exists."""
    return SK if access_key == AK else None


def v4_request(
    method: str,
    target: str,
    headers: dict[str, str],
    signed: str,
    signature: str,
) -> SignedRequest:
    """A request signed in the Authorization header with the example key."""
    path, query = split_target(target)
    authorization = (
        f"AWS4-HMAC-SHA256 Credential={SCOPE}, SignedHeaders={signed}, Signature={signature}"
    )
    return SignedRequest(method, path, query, {**headers, "authorization": authorization})


def example_headers(**more: str) -> dict[str, str]:
    return {
        "host": EXAMPLE_HOST,
        "x-amz-date": "20130524T000000Z",
        "x-amz-content-sha256": EMPTY_SHA256,
        **more,
    }


# The examples of AWS's "Signature Calculations for the Authorization Header" (S3 API
# reference): request, signed headers, the signature AWS documents.
AWS_EXAMPLES = [
    pytest.param(
        "GET",
        "/test.txt",
        example_headers(range="bytes=0-9"),
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
        id="get-object",
    ),
    pytest.param(
        "PUT",
        "/test%24file.text",
        {
            **example_headers(),
            "date": "Fri, 24 May 2013 00:00:00 GMT",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": hashlib.sha256(b"Welcome to Amazon S3.").hexdigest(),
        },
        "date;host;x-amz-content-sha256;x-amz-date;x-amz-storage-class",
        "98ad721746da40c64f1a55b78f14c238d841ea1380cd77a1b5971af0ece108bd",
        id="put-object",
    ),
    pytest.param(
        "GET",
        "/?lifecycle",
        example_headers(),
        "host;x-amz-content-sha256;x-amz-date",
        "fea454ca298b7da1c68078a5d1bdbfbbe0d65c699e0f91ac7a200a0136783543",
        id="get-bucket-lifecycle",
    ),
    pytest.param(
        "GET",
        "/?prefix=J&max-keys=2",
        example_headers(),
        "host;x-amz-content-sha256;x-amz-date",
        "34b48302e7b5fa45bde8084f4b7868a86f0a534bc59db6670ed5711ef69dc6f7",
        id="list-objects-query-order",
    ),
]


@pytest.mark.parametrize(("method", "target", "headers", "signed", "signature"), AWS_EXAMPLES)
def test_aws_documented_header_signatures_verify(
    method: str, target: str, headers: dict[str, str], signed: str, signature: str
) -> None:
    """AWS's documented SigV4 examples verify, and so does none with one hex digit changed."""
    req = v4_request(method, target, headers, signed, signature)
    auth = authenticate(req, secret_of, EXAMPLE_NOW)
    assert (auth.access_key, auth.presigned, auth.chunk_signer) == (AK, False, None)
    assert auth.payload == headers["x-amz-content-sha256"]
    flipped = signature[:-1] + ("0" if signature[-1] != "0" else "1")
    with pytest.raises(S3Error) as caught:
        authenticate(v4_request(method, target, headers, signed, flipped), secret_of, EXAMPLE_NOW)
    assert caught.value.code == "SignatureDoesNotMatch"
    assert caught.value.status == 403
    assert caught.value.extra["StringToSign"].startswith("AWS4-HMAC-SHA256\n20130524T000000Z\n")


PRESIGNED_EXAMPLE = (
    "/test.txt?X-Amz-Algorithm=AWS4-HMAC-SHA256"
    "&X-Amz-Credential=AKIAIOSFODNN7EXAMPLE%2F20130524%2Fus-east-1%2Fs3%2Faws4_request"
    "&X-Amz-Date=20130524T000000Z&X-Amz-Expires=86400&X-Amz-SignedHeaders=host"
    "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
)


def presigned(target: str = PRESIGNED_EXAMPLE) -> SignedRequest:
    path, query = split_target(target)
    return SignedRequest("GET", path, query, {"host": EXAMPLE_HOST})


def test_aws_documented_presigned_url_verifies_until_it_expires() -> None:
    """AWS's documented presigned URL verifies within its 86,400 s, then has expired."""
    auth = authenticate(presigned(), secret_of, EXAMPLE_NOW + 86400)
    assert (auth.access_key, auth.payload, auth.presigned) == (AK, "UNSIGNED-PAYLOAD", True)
    with pytest.raises(S3Error) as caught:
        authenticate(presigned(), secret_of, EXAMPLE_NOW + 86401)
    assert (caught.value.code, caught.value.message) == ("AccessDenied", "Request has expired")
    with pytest.raises(S3Error) as caught:
        authenticate(presigned(), secret_of, EXAMPLE_NOW - 3600)
    assert caught.value.code == "AccessDenied"


QUERY_ERROR = "AuthorizationQueryParametersError"
MALFORMED = "AuthorizationHeaderMalformed"
MISMATCH = "SignatureDoesNotMatch"
SHA = "x-amz-content-sha256"
DATE = "x-amz-date"


@pytest.mark.parametrize(
    ("old", "new", "code"),
    [
        ("X-Amz-Expires=86400", "X-Amz-Expires=86401", MISMATCH),
        ("X-Amz-Expires=86400", "X-Amz-Expires=604801", QUERY_ERROR),
        ("X-Amz-Expires=86400", "X-Amz-Expires=lots", QUERY_ERROR),
        ("/test.txt", "/test.txt2", MISMATCH),
        ("X-Amz-Date=20130524T000000Z", "X-Amz-Date=20130524T000001Z", MISMATCH),
        (
            "X-Amz-Date=20130524T000000Z",
            "X-Amz-Date=2013-05-24",
            QUERY_ERROR,
        ),
        ("AKIAIOSFODNN7EXAMPLE", "AKIAIOSFODNN7EXAMPLF", "InvalidAccessKeyId"),
        ("us-east-1", "eu-west-1", MISMATCH),
        ("%2Fs3%2F", "%2Fs4%2F", QUERY_ERROR),
        (
            "X-Amz-SignedHeaders=host",
            "X-Amz-SignedHeaders=range",
            QUERY_ERROR,
        ),
        (
            "X-Amz-Algorithm=AWS4-HMAC-SHA256",
            "X-Amz-Algorithm=AWS4-HMAC-SHA1",
            QUERY_ERROR,
        ),
        ("&X-Amz-Signature=aeee", "&X-Amz-Signature=AEEE", QUERY_ERROR),
        ("&X-Amz-Signature=aeee", "&X-Amz-Signature=beee", MISMATCH),
        ("&X-Amz-Signature=", "&versionId=3&X-Amz-Signature=", MISMATCH),
        ("&X-Amz-Date=20130524T000000Z", "", QUERY_ERROR),
    ],
)
def test_tampered_presigned_url_is_refused(old: str, new: str, code: str) -> None:
    """Changing any part of a presigned URL makes it fail with S3's error for that part."""
    assert old in PRESIGNED_EXAMPLE
    with pytest.raises(S3Error) as caught:
        authenticate(presigned(PRESIGNED_EXAMPLE.replace(old, new)), secret_of, EXAMPLE_NOW)
    assert caught.value.code == code


def get_example() -> SignedRequest:
    """AWS's documented GET object example, signed."""
    return v4_request(
        "GET",
        "/test.txt",
        example_headers(range="bytes=0-9"),
        "host;range;x-amz-content-sha256;x-amz-date",
        "f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41",
    )


@pytest.mark.parametrize(
    ("change", "code"),
    [
        (lambda r: replace(r, method="HEAD"), MISMATCH),
        (lambda r: replace(r, raw_path="/test.txt/"), MISMATCH),
        (lambda r: replace(r, raw_path="/./test.txt"), MISMATCH),
        (lambda r: replace(r, query=[("acl", "")]), MISMATCH),
        (lambda r: headers(r, range="bytes=0-10"), MISMATCH),
        (lambda r: headers(r, host="other.example"), MISMATCH),
        (
            lambda r: headers(r, **{SHA: "UNSIGNED-PAYLOAD"}),
            MISMATCH,
        ),
        (lambda r: headers(r, **{SHA: "abc"}), "InvalidArgument"),
        (lambda r: headers(r, **{DATE: "20130524T000001Z"}), MISMATCH),
        (
            lambda r: headers(r, **{DATE: "20130525T000000Z"}),
            MALFORMED,
        ),
        (lambda r: headers(r, **{DATE: "yesterday"}), "AccessDenied"),
        (lambda r: headers(r, **{"x-amz-copy-source": "/b/secret"}), "AccessDenied"),
        (lambda r: without(r, "x-amz-content-sha256"), "MissingSecurityHeader"),
        (lambda r: without(r, "authorization"), "AccessDenied"),
        (lambda r: auth_header(r, AK, "AKIAIOSFODNN7EXAMPLX"), "InvalidAccessKeyId"),
        (lambda r: auth_header(r, "/s3/", "/sqs/"), MALFORMED),
        (
            lambda r: auth_header(r, "SignedHeaders=host;", "SignedHeaders="),
            MALFORMED,
        ),
        (lambda r: auth_header(r, "Signature=", "Signature=x"), MALFORMED),
        (
            lambda r: auth_header(r, ", Signature", ", Signature=a, Signature"),
            MALFORMED,
        ),
        (lambda r: auth_header(r, "AWS4-HMAC-SHA256", "AWS5-HMAC-SHA256"), "InvalidArgument"),
        (lambda r: replace(r, query=[("X-Amz-Signature", "00")]), "InvalidArgument"),
    ],
)
def test_tampered_header_signed_request_is_refused(
    change: Callable[[SignedRequest], SignedRequest], code: str
) -> None:
    """Changing any signed part of AWS's GET example, or its credential, is refused."""
    req = get_example()
    with pytest.raises(S3Error) as caught:
        authenticate(change(req), secret_of, EXAMPLE_NOW)
    assert caught.value.code == code


def headers(req: SignedRequest, **changed: str) -> SignedRequest:
    return replace(req, headers={**req.headers, **changed})


def without(req: SignedRequest, name: str) -> SignedRequest:
    return replace(req, headers={k: v for k, v in req.headers.items() if k != name})


def auth_header(req: SignedRequest, old: str, new: str) -> SignedRequest:
    return headers(req, authorization=req.headers["authorization"].replace(old, new, 1))


def test_clock_skew_over_15_minutes_is_refused() -> None:
    """A header-signed request 15 minutes off verifies; one second more is too skewed."""
    req = get_example()
    for now in (EXAMPLE_NOW - 900, EXAMPLE_NOW + 900):
        assert authenticate(req, secret_of, now).access_key == AK
    for now in (EXAMPLE_NOW - 901, EXAMPLE_NOW + 901):
        with pytest.raises(S3Error) as caught:
            authenticate(req, secret_of, now)
        assert caught.value.code == "RequestTimeTooSkewed"
        assert caught.value.extra["RequestTime"] == "20130524T000000Z"


@pytest.mark.parametrize(
    ("raw", "canonical"),
    [
        ("", "/"),
        ("/", "/"),
        ("/b/test%24file.text", "/b/test%24file.text"),
        ("/b/a$b", "/b/a%24b"),
        ("/b/a%2fb", "/b/a%2Fb"),
        ("/b/a+b", "/b/a%2Bb"),
        ("/b/a%20b", "/b/a%20b"),
        ("/b//x/./y/../z", "/b//x/./y/../z"),
        ("/b/%C3%BC~-_.", "/b/%C3%BC~-_."),
        ("/b/%zz", "/b/%25zz"),
    ],
)
def test_canonical_uri_keeps_the_path_as_sent(raw: str, canonical: str) -> None:
    """The canonical URI re-encodes each segment in AWS's form, never normalizing the path."""
    assert canonical_uri(raw) == canonical


def test_canonical_query_sorts_and_encodes() -> None:
    """Query names and values are re-encoded in AWS's form and sorted by name, then value."""
    _, query = split_target("/?prefix=a+b&max-keys=2&uploads&a=%7e&a=%2F&&x=%e2%82%ac")
    assert canonical_query(query) == "a=%2F&a=~&max-keys=2&prefix=a%20b&uploads=&x=%E2%82%AC"


def test_anonymous_and_mixed_requests_are_refused() -> None:
    """No credentials at all is AccessDenied; a header and a query signature together,
    InvalidArgument; an unknown scheme, InvalidArgument."""
    with pytest.raises(S3Error) as caught:
        authenticate(SignedRequest("GET", "/b/k", [], {"host": "h"}), secret_of, EXAMPLE_NOW)
    assert (caught.value.code, caught.value.status) == ("AccessDenied", 403)
    mixed = replace(get_example(), query=presigned().query)
    with pytest.raises(S3Error) as caught:
        authenticate(mixed, secret_of, EXAMPLE_NOW)
    assert caught.value.code == "InvalidArgument"
    with pytest.raises(S3Error) as caught:
        authenticate(
            SignedRequest("GET", "/", [], {"authorization": "Bearer x"}), secret_of, EXAMPLE_NOW
        )
    assert caught.value.code == "InvalidArgument"


# -- SigV2: AWS's documented examples -------------------------------------------------------


def test_aws_documented_sigv2_header_and_query_verify() -> None:
    """AWS's SigV2 examples (GET /photos/puppy.jpg, header and query) verify; tampered, not."""
    date = "Tue, 27 Mar 2007 19:36:42 +0000"
    now = float(calendar.timegm((2007, 3, 27, 19, 36, 42)))
    req = SignedRequest(
        "GET",
        "/johnsmith/photos/puppy.jpg",
        [],
        {
            "host": "s3.amazonaws.com",
            "date": date,
            "authorization": f"AWS {AK}:bWq2s1WEIj+Ydj0vQ697zp+IXMU=",
        },
    )
    auth = authenticate(req, secret_of, now)
    assert (auth.access_key, auth.payload, auth.presigned) == (AK, "UNSIGNED-PAYLOAD", False)
    for tampered in (
        replace(req, method="PUT"),
        replace(req, raw_path="/johnsmith/x.jpg"),
        headers(req, **{"x-amz-meta-a": "1"}),
        replace(req, query=[("acl", "")]),
    ):
        with pytest.raises(S3Error) as caught:
            authenticate(tampered, secret_of, now)
        assert caught.value.code == "SignatureDoesNotMatch"
    with pytest.raises(S3Error) as caught:
        authenticate(req, secret_of, now + 901)
    assert caught.value.code == "RequestTimeTooSkewed"
    path, query = split_target(
        "/johnsmith/photos/puppy.jpg?AWSAccessKeyId=AKIAIOSFODNN7EXAMPLE"
        "&Signature=NpgCjnDzrM%2BWFzoENXmpNDUsSn8%3D&Expires=1175139620"
    )
    url = SignedRequest("GET", path, query, {"host": "s3.amazonaws.com"})
    auth = authenticate(url, secret_of, 1175139620.0)
    assert (auth.access_key, auth.presigned) == (AK, True)
    with pytest.raises(S3Error) as caught:
        authenticate(url, secret_of, 1175139621.0)
    assert (caught.value.code, caught.value.message) == ("AccessDenied", "Request has expired")
    forged = replace(url, query=[(k, "1175139999" if k == "Expires" else v) for k, v in query])
    with pytest.raises(S3Error) as caught:
        authenticate(forged, secret_of, 1175139620.0)
    assert caught.value.code == "SignatureDoesNotMatch"


# -- requests signed by botocore ------------------------------------------------------------

BOTO_KEY = "DIFSAAAAAAAAAAAAAAAA"
BOTO_SECRET = "s3cr3t/with+odd=chars0123456789abcdefghi"
KEYS = [
    "izone.mp4",
    "dir/sub/a b+c$d&e=f.txt",
    "unicode/ü€😀.bin",
    "odd/(x)!*'@:;,~.-_",
    "slashes//double/./dot/../x",
    "percent/%2F%41",
]


def boto_secret(access_key: str) -> str | None:
    return BOTO_SECRET if access_key == BOTO_KEY else None


def boto_client(endpoint: str = "http://127.0.0.1:9000", **config: Any) -> Any:
    """A boto3 S3 client (path-style) whose requests are captured instead of sent."""
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id=BOTO_KEY,
        aws_secret_access_key=BOTO_SECRET,
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}, **config),
    )
    return client


class _Raw:
    def stream(self, **_: Any) -> Iterator[bytes]:
        yield b""


def captured(client: Any, call: Callable[[Any], object]) -> tuple[SignedRequest, bytes]:
    """The request (as the server would see it) and the body that ``call`` made boto3 send."""
    seen: list[tuple[SignedRequest, bytes]] = []

    def before_send(request: Any, **_: Any) -> AWSResponse:
        url = urlsplit(request.url)
        body = request.body
        if hasattr(body, "read"):
            body.seek(0)
            body = body.read()
        heads = {"host": url.netloc}
        for name, value in request.headers.items():
            text = value.decode() if isinstance(value, bytes) else str(value)
            heads[name.lower()] = text
        target = url.path + ("?" + url.query if url.query else "")
        path, query = split_target(target)
        seen.append((SignedRequest(request.method, path, query, heads), body or b""))
        return AWSResponse(request.url, 200, {}, _Raw())

    client.meta.events.register("before-send.s3.*", before_send)
    try:
        call(client)
    finally:
        client.meta.events.unregister("before-send.s3.*", before_send)
    assert len(seen) == 1
    return seen[0]


@pytest.mark.parametrize("key", KEYS)
def test_botocore_header_signatures_verify(key: str) -> None:
    """PutObject, GetObject with a range, ListObjectsV2 and a multipart upload part, as boto3
    signs them (any key characters), verify; the body's checksums hold."""
    client = boto_client()
    calls: list[Callable[[Any], object]] = [
        lambda c: c.put_object(Bucket="a.com", Key=key, Body=b"hello"),
        lambda c: c.get_object(Bucket="a.com", Key=key, Range="bytes=0-1"),
        lambda c: c.list_objects_v2(Bucket="a.com", Prefix=key, Delimiter="/"),
        lambda c: c.upload_part(Bucket="a.com", Key=key, UploadId="u+1/=", PartNumber=2, Body=b"x"),
    ]
    for call in calls:
        req, body = captured(client, call)
        auth = authenticate(req, boto_secret, time.time())
        assert (auth.access_key, auth.presigned) == (BOTO_KEY, False)
        checks = BodyChecks(req.headers, auth.payload)
        checks.update(body)
        checks.verify()
        assert checks.md5_hex == hashlib.md5(body).hexdigest()
        tampered = replace(req, raw_path=req.raw_path + "x")
        with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
            authenticate(tampered, boto_secret, time.time())


@pytest.mark.parametrize("key", KEYS)
def test_botocore_presigned_urls_verify(key: str) -> None:
    """Presigned URLs as boto3 makes them, SigV4 (s3v4) and SigV2 (its default here), verify
    until they expire."""
    now = time.time()
    for version in ("s3v4", "s3"):
        client = boto_client(signature_version=version)
        for method, params in (
            ("get_object", {"Bucket": "a.com", "Key": key, "VersionId": "3"}),
            ("put_object", {"Bucket": "a.com", "Key": key}),
        ):
            url = urlsplit(client.generate_presigned_url(method, Params=params, ExpiresIn=60))
            path, query = split_target(url.path + "?" + url.query)
            http = "GET" if method == "get_object" else "PUT"
            req = SignedRequest(http, path, query, {"host": url.netloc})
            auth = authenticate(req, boto_secret, now)
            assert (auth.access_key, auth.presigned, auth.payload) == (
                BOTO_KEY,
                True,
                "UNSIGNED-PAYLOAD",
            )
            with pytest.raises(S3Error, match="Request has expired"):
                authenticate(req, boto_secret, now + 62)
            other = "PUT" if http == "GET" else "GET"
            with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
                authenticate(replace(req, method=other), boto_secret, now)
            smuggled = {"host": url.netloc, "x-amz-copy-source": "/a.com/secret"}
            with pytest.raises(S3Error, match=r"not signed|SignatureDoesNotMatch"):
                authenticate(replace(req, headers=smuggled), boto_secret, now)


def test_botocore_sigv2_header_signatures_verify() -> None:
    """Requests boto3 signs with SigV2 (signature_version "s3", as s3cmd may) verify."""
    client = boto_client(signature_version="s3")
    for call in (
        lambda c: c.put_object(Bucket="a.com", Key="k/x y", Body=b"data", ContentType="a/b"),
        lambda c: c.get_object(Bucket="a.com", Key="k", VersionId="7"),
        lambda c: c.list_objects(Bucket="a.com", Prefix="k/"),
    ):
        req, _ = captured(client, call)
        assert req.headers["authorization"].startswith("AWS ")
        auth = authenticate(req, boto_secret, time.time())
        assert auth.access_key == BOTO_KEY
        with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
            authenticate(replace(req, method="DELETE"), boto_secret, time.time())


def test_boto3_aws_chunked_upload_decodes_to_the_original() -> None:
    """boto3's PutObject over https (aws-chunked, STREAMING-UNSIGNED-PAYLOAD-TRAILER with a
    CRC32 trailer) decodes to exactly the bytes put, and the trailer checksum verifies."""
    data = bytes(range(256)) * 9000  # 2.2 MiB: three of botocore's 1 MiB chunks
    client = boto_client("https://127.0.0.1:9000")
    req, body = captured(client, lambda c: c.put_object(Bucket="a.com", Key="f", Body=data))
    assert req.headers["x-amz-content-sha256"] == "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
    assert body != data
    auth = authenticate(req, boto_secret, time.time())
    decoder = body_decoder(auth, req.headers)
    assert decoder is not None
    checks = BodyChecks(req.headers, auth.payload)
    out = bytearray()
    for start in range(0, len(body), 65536):
        for piece in decoder.feed(body[start : start + 65536]):
            checks.update(piece)
            out += piece
    trailers = decoder.finish()
    assert bytes(out) == data
    assert checks.verify(trailers) == {
        "x-amz-checksum-crc32": base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    }
    assert checks.md5_hex == hashlib.md5(data).hexdigest()


# -- aws-chunked bodies ---------------------------------------------------------------------


def example_signer() -> ChunkSigner:
    """The chunk signer of AWS's documented chunked upload (seed signature 4f232c...)."""
    req = v4_request(
        "PUT",
        "/examplebucket/chunkObject.txt",
        {
            "host": "s3.amazonaws.com",
            "x-amz-date": "20130524T000000Z",
            "x-amz-storage-class": "REDUCED_REDUNDANCY",
            "x-amz-content-sha256": "STREAMING-AWS4-HMAC-SHA256-PAYLOAD",
            "content-encoding": "aws-chunked",
            "x-amz-decoded-content-length": "66560",
            "content-length": "66824",
        },
        "content-encoding;content-length;host;x-amz-content-sha256;x-amz-date;"
        "x-amz-decoded-content-length;x-amz-storage-class",
        "4f232c4386841ef735655705268965c44a0e4690baa4adea153f7db9fa80a0a9",
    )
    auth = authenticate(req, secret_of, EXAMPLE_NOW)
    assert auth.payload == "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
    assert auth.chunk_signer is not None
    return auth.chunk_signer


# AWS's documented chunk signatures: 64 KiB of "a", 1 KiB of "a", the final empty chunk
EXAMPLE_CHUNKS = [
    (65536, "ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648"),
    (1024, "0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497"),
    (0, "b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9"),
]
EXAMPLE_BODY = b"".join(
    f"{size:x};chunk-signature={sig}\r\n".encode() + b"a" * size + b"\r\n"
    for size, sig in EXAMPLE_CHUNKS
)
assert len(EXAMPLE_BODY) == 66824
SIGNER = example_signer()


def decode(decoder: ChunkedDecoder, *pieces: bytes) -> tuple[bytes, dict[str, str]]:
    out = bytearray()
    for piece in pieces:
        for chunk in decoder.feed(piece):
            out += chunk
    return bytes(out), decoder.finish()


def test_aws_documented_chunked_upload_decodes_with_its_signatures() -> None:
    """AWS's documented chunked upload (3 chunks, their documented signatures) decodes to
    66,560 bytes of "a"; any changed byte of data or signature is refused."""
    signer = example_signer()
    payload, trailers = decode(
        ChunkedDecoder("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", signer, 66560), EXAMPLE_BODY
    )
    assert (payload, trailers) == (b"a" * 66560, {})
    for at in (40, 100, 65700, len(EXAMPLE_BODY) - 40):
        bad = bytearray(EXAMPLE_BODY)
        bad[at] = ord("b") if bad[at] != ord("b") else ord("c")
        with pytest.raises(S3Error) as caught:
            decode(ChunkedDecoder("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", signer), bytes(bad))
        assert caught.value.code in ("SignatureDoesNotMatch", "InvalidRequest")


def signed_body(signer: ChunkSigner, chunks: list[bytes], trailers: dict[str, str]) -> bytes:
    """A signed aws-chunked body (with signed trailers when ``trailers``)."""
    out = bytearray()
    previous = signer.seed_signature
    for chunk in [*chunks, b""]:
        previous = signer.chunk_signature(previous, hashlib.sha256(chunk).hexdigest())
        out += f"{len(chunk):x};chunk-signature={previous}\r\n".encode() + chunk
        out += b"\r\n" if chunk else b""
    if trailers:
        canonical = "".join(f"{k}:{v}\n" for k, v in trailers.items()).encode()
        out += canonical.replace(b"\n", b"\r\n")
        signature = signer.trailer_signature(previous, canonical)
        out += f"x-amz-trailer-signature:{signature}\r\n".encode()
    return bytes(out + b"\r\n")


def test_signed_trailer_body_decodes_and_its_trailer_signature_is_checked() -> None:
    """A STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER body decodes with its trailers; a changed
    trailer value or signature is SignatureDoesNotMatch."""
    signer = example_signer()
    data = [b"x" * 9000, b"y" * 100]
    crc = base64.b64encode(zlib.crc32(b"".join(data)).to_bytes(4, "big")).decode()
    body = signed_body(signer, data, {"x-amz-checksum-crc32": crc})
    mode = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
    names = ["x-amz-checksum-crc32"]
    payload, trailers = decode(ChunkedDecoder(mode, signer, 9100, names), body)
    assert (payload, trailers) == (b"".join(data), {"x-amz-checksum-crc32": crc})
    forged = body.replace(crc.encode(), b"AAAAAA==")
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        decode(ChunkedDecoder(mode, signer, 9100, names), forged)
    unsigned = body[: body.index(b"x-amz-trailer-signature")] + b"\r\n"
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        decode(ChunkedDecoder(mode, signer, 9100, names), unsigned)


UNSIGNED = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"5\r\nhello\r\n", "IncompleteBody"),
        (b"5\r\nhel", "IncompleteBody"),
        (b"", "IncompleteBody"),
        (b"5\r\nhelloXX0\r\n\r\n", "InvalidRequest"),
        (b"zz\r\n", "InvalidRequest"),
        (b"0x5\r\nhello\r\n0\r\n\r\n", "InvalidRequest"),
        (b" 5\r\nhello\r\n0\r\n\r\n", "InvalidRequest"),
        (b"5\nhello\r\n0\r\n\r\n", "InvalidRequest"),
        (b"1000001\r\n", "InvalidRequest"),
        (b"5" * 5000, "InvalidRequest"),
        (b"5;chunk-signature=" + b"0" * 64 + b"\r\nhello\r\n0\r\n\r\n", "InvalidRequest"),
        (b"0\r\nx-amz-checksum-sha1:AAAA\r\n\r\n", "InvalidRequest"),
        (b"0\r\nbad line\r\n\r\n", "InvalidRequest"),
        (b"0\r\n\r\nextra", "InvalidRequest"),
        (b"4\r\nhello\r\n0\r\n\r\n", "InvalidRequest"),
        (b"6\r\nhello!\r\n0\r\n\r\n", "InvalidRequest"),
    ],
)
def test_malformed_unsigned_bodies_are_refused(body: bytes, code: str) -> None:
    """Truncated, malformed, oversized or over-long aws-chunked bodies fail with S3Error."""
    with pytest.raises(S3Error) as caught:
        decode(ChunkedDecoder(UNSIGNED, None, 5), body)
    assert caught.value.code == code


def test_decoded_length_and_announced_trailers_are_checked() -> None:
    """Fewer bytes than x-amz-decoded-content-length, or an announced trailer that never
    came, is IncompleteBody."""
    with pytest.raises(S3Error, match="IncompleteBody"):
        decode(ChunkedDecoder(UNSIGNED, None, 6), b"5\r\nhello\r\n0\r\n\r\n")
    with pytest.raises(S3Error, match="IncompleteBody"):
        decode(ChunkedDecoder(UNSIGNED, None, 5, ["x-amz-checksum-crc32"]), b"0\r\n\r\n")
    assert decode(ChunkedDecoder(UNSIGNED), b"5\r\nhello\r\n0\r\n\r\n") == (b"hello", {})


BOTO_STYLE = (
    b"9\r\nfirst one\r\n3\r\n\xff\x00\r\r\n0\r\nx-amz-checksum-crc32:"
    + base64.b64encode(zlib.crc32(b"first one\xff\x00\r").to_bytes(4, "big"))
    + b"\r\n\r\n"
)


@given(st.lists(st.integers(0, len(BOTO_STYLE)), max_size=8))
def test_chunk_boundaries_anywhere_give_the_same_payload(cuts: list[int]) -> None:
    """The body split at any points decodes to the same payload and trailers."""
    points = [0, *sorted(cuts), len(BOTO_STYLE)]
    pieces = [BOTO_STYLE[a:b] for a, b in itertools.pairwise(points)]
    decoder = ChunkedDecoder(UNSIGNED, None, 12, ["x-amz-checksum-crc32"])
    payload, trailers = decode(decoder, *pieces)
    assert payload == b"first one\xff\x00\r"
    assert list(trailers) == ["x-amz-checksum-crc32"]


@given(st.binary(max_size=300), st.booleans(), st.integers(1, 50))
def test_any_bytes_decode_or_raise_s3error(data: bytes, signed: bool, step: int) -> None:
    """Arbitrary bytes, fed in any steps, in either mode, never raise anything but S3Error."""
    signer = ChunkSigner("0" * 64, b"k" * 32, "20130524/us-east-1/s3/aws4_request", "x")
    mode = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER" if signed else UNSIGNED
    decoder = ChunkedDecoder(mode, signer if signed else None, None, ["x-amz-checksum-crc32"])
    with contextlib.suppress(S3Error):
        decode(decoder, *(data[i : i + step] for i in range(0, len(data), step)))


@given(st.binary(max_size=200))
def test_any_bytes_after_a_valid_prefix_decode_or_raise_s3error(tail: bytes) -> None:
    """A valid start followed by arbitrary bytes decodes or raises S3Error, nothing else."""
    decoder = ChunkedDecoder(UNSIGNED, None, None, ["x-amz-checksum-crc32"])
    with contextlib.suppress(S3Error):
        decode(decoder, b"3\r\nabc\r\n", tail)


# -- body checks ----------------------------------------------------------------------------

DATA = b"The quick brown fox"


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


RIGHT = {
    "content-md5": b64(hashlib.md5(DATA).digest()),
    "x-amz-checksum-crc32": b64(zlib.crc32(DATA).to_bytes(4, "big")),
    "x-amz-checksum-crc32c": b64(google_crc32c.value(DATA).to_bytes(4, "big")),
    "x-amz-checksum-sha1": b64(hashlib.sha1(DATA).digest()),
    "x-amz-checksum-sha256": b64(hashlib.sha256(DATA).digest()),
}


@pytest.mark.parametrize("name", sorted(RIGHT))
def test_right_digests_verify_and_wrong_ones_are_bad_digest(name: str) -> None:
    """Each digest header verifies over the right body and is BadDigest over another."""
    checks = BodyChecks({name: RIGHT[name]})
    checks.update(DATA[:5])
    checks.update(memoryview(DATA)[5:])
    verified = checks.verify()
    assert verified == ({} if name == "content-md5" else {name: RIGHT[name]})
    wrong = BodyChecks({name: RIGHT[name]})
    wrong.update(DATA + b".")
    with pytest.raises(S3Error) as caught:
        wrong.verify()
    assert (caught.value.code, caught.value.status) == ("BadDigest", 400)


PAYLOAD_SHA = hashlib.sha256(DATA).hexdigest()


@pytest.mark.parametrize(
    ("headers", "payload", "lanes"),
    [
        ({}, UNSIGNED_PAYLOAD, [0]),
        ({"content-md5": RIGHT["content-md5"]}, UNSIGNED_PAYLOAD, [0]),
        ({}, PAYLOAD_SHA, [0, 1]),
        ({"x-amz-checksum-crc32": RIGHT["x-amz-checksum-crc32"]}, UNSIGNED_PAYLOAD, [0, 1]),
        ({"x-amz-checksum-sha256": RIGHT["x-amz-checksum-sha256"]}, PAYLOAD_SHA, [0, 1]),
    ],
)
def test_lanes_run_apart_verify_as_update_does(
    headers: dict[str, str], payload: str, lanes: list[int]
) -> None:
    """Each lane fed the whole payload on its own (lane 1 first) verifies as ``update``
    does; a lane fed other bytes fails the check it carries."""
    checks = BodyChecks(headers, payload)
    assert checks.lanes == lanes
    for lane in reversed(lanes):
        checks.update_lane(lane, DATA[:7])
        checks.update_lane(lane, memoryview(DATA)[7:])
    whole = BodyChecks(headers, payload)
    whole.update(DATA)
    assert (checks.verify(), checks.size, checks.md5_hex) == (
        whole.verify(),
        len(DATA),
        hashlib.md5(DATA).hexdigest(),
    )
    if lanes == [0, 1]:
        skewed = BodyChecks(headers, payload)
        skewed.update_lane(0, DATA)
        skewed.update_lane(1, DATA + b".")
        with pytest.raises(S3Error):
            skewed.verify()


@pytest.mark.parametrize(
    ("headers", "code"),
    [
        ({"content-md5": "not base64!"}, "InvalidDigest"),
        ({"content-md5": b64(b"short")}, "InvalidDigest"),
        ({"x-amz-checksum-crc32": "AAAAAAAA"}, "InvalidRequest"),
        ({"x-amz-checksum-sha256": "%%%"}, "InvalidRequest"),
        ({"x-amz-checksum-crc64nvme": "AAAAAAAAAAA="}, "NotImplemented"),
        (
            {"x-amz-checksum-crc32": RIGHT["x-amz-checksum-crc32"], "x-amz-checksum-sha1": "x"},
            "InvalidRequest",
        ),
    ],
)
def test_malformed_digest_headers_are_refused(headers: dict[str, str], code: str) -> None:
    """A digest header that is not base64 of the right size is refused before any byte."""
    with pytest.raises(S3Error) as caught:
        BodyChecks(headers)
    assert caught.value.code == code


def test_signed_payload_hash_is_checked_and_trailer_checksums_come_at_the_end() -> None:
    """A hex x-amz-content-sha256 must match the body; a checksum announced in x-amz-trailer
    is checked against the trailer's value."""
    good = BodyChecks({}, hashlib.sha256(DATA).hexdigest())
    good.update(DATA)
    assert good.verify() == {}
    bad = BodyChecks({}, hashlib.sha256(b"other").hexdigest())
    bad.update(DATA)
    with pytest.raises(S3Error) as caught:
        bad.verify()
    assert caught.value.code == "XAmzContentSHA256Mismatch"
    name = "x-amz-checksum-crc32c"
    trailed = BodyChecks({"x-amz-trailer": name}, UNSIGNED)
    trailed.update(DATA)
    assert trailed.verify({name: RIGHT[name]}) == {name: RIGHT[name]}
    with pytest.raises(S3Error, match="BadDigest"):
        trailed.verify({name: RIGHT["x-amz-checksum-crc32"]})
    with pytest.raises(S3Error, match="InvalidRequest"):
        trailed.verify({})
    assert trailed.md5_hex == hashlib.md5(DATA).hexdigest()


# -- any request: an Auth or an S3Error -----------------------------------------------------

ODD = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["", "\udcff", "é", "AWS4-HMAC-SHA256", "20130524T000000Z", "%zz", "+", "/"]),
)
QUERY_NAMES = [
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-Content-Sha256",
    "AWSAccessKeyId",
    "Expires",
    "Signature",
    "uploadId",
    "acl",
    "x-amz-meta-q",
]
HEADER_NAMES = ["authorization", "x-amz-date", "x-amz-content-sha256", "date", "host", "range"]


def spliced(base: str) -> st.SearchStrategy[str]:
    """``base`` with a random slice replaced by odd text."""
    return st.tuples(st.integers(0, len(base)), st.integers(0, 12), ODD).map(
        lambda t: base[: t[0]] + t[2] + base[t[0] + t[1] :]
    )


GOOD_AUTH = get_example().headers["authorization"]


@given(
    st.sampled_from(["GET", "PUT", "é"]),
    st.one_of(ODD, spliced("/test.txt")),
    st.lists(st.tuples(st.sampled_from(QUERY_NAMES), ODD), max_size=8),
    st.dictionaries(st.sampled_from(HEADER_NAMES), ODD, max_size=6),
    st.one_of(spliced(GOOD_AUTH), st.builds(lambda t: "AWS " + t, ODD), ODD),
    st.floats(0, 2e9),
)
def test_any_request_authenticates_or_raises_s3error(
    method: str,
    path: str,
    query: list[tuple[str, str]],
    heads: dict[str, str],
    authorization: str,
    now: float,
) -> None:
    """Whatever a client sends (mangled signatures, odd bytes, any time), authentication
    answers an Auth or raises S3Error, never anything else."""
    if "authorization" in heads:
        heads["authorization"] = authorization
    req = SignedRequest(method, path, query, heads)
    with contextlib.suppress(S3Error):
        authenticate(req, lambda _: SK, now)


@given(st.integers(0, len(get_example().headers["authorization"])), ODD)
def test_mangled_example_authorization_never_verifies(at: int, text: str) -> None:
    """AWS's example with any text inserted into its Authorization header never verifies
    unless the header is unchanged in meaning (spaces or tabs around its parts)."""
    req = get_example()
    mangled = GOOD_AUTH[:at] + text + GOOD_AUTH[at:]
    try:
        auth = authenticate(headers(req, authorization=mangled), secret_of, EXAMPLE_NOW)
    except S3Error:
        return
    assert auth.access_key == AK
    assert re.sub("[ \t]", "", mangled) == GOOD_AUTH.replace(" ", "")


@given(st.lists(st.integers(0, len(EXAMPLE_BODY)), max_size=6))
def test_signed_chunk_boundaries_anywhere_give_the_same_payload(cuts: list[int]) -> None:
    """AWS's signed chunked example split at any points decodes to the same payload."""
    points = [0, *sorted(cuts), len(EXAMPLE_BODY)]
    pieces = [EXAMPLE_BODY[a:b] for a, b in itertools.pairwise(points)]
    decoder = ChunkedDecoder("STREAMING-AWS4-HMAC-SHA256-PAYLOAD", SIGNER, 66560)
    assert decode(decoder, *pieces) == (b"a" * 66560, {})


@pytest.mark.parametrize(
    "stamp",
    ["Tue, 27 Mar 2007 19:36:42 +0000", "Tue, 27 Mar 2007 19:36:42 -0000", "20070327T193642Z"],
)
def test_sigv2_header_with_x_amz_date_as_s3cmd_signs(stamp: str) -> None:
    """SigV2 with x-amz-date and no Date header (s3cmd's way): the date line is empty, the
    x-amz-date is among the signed amz headers and decides the skew (a date without a zone
    is UTC)."""
    now = float(calendar.timegm((2007, 3, 27, 19, 36, 42)))
    text = f"PUT\n\ntext/plain\n\nx-amz-date:{stamp}\nx-amz-meta-a:1, 2\n/b/\u00fc%20k?acl"
    signature = b64(hmac.new(SK.encode(), text.encode(), hashlib.sha1).digest())
    req = SignedRequest(
        "PUT",
        "/b/\u00fc%20k",
        [("acl", ""), ("ignored", "x")],
        {
            "content-type": "text/plain",
            "x-amz-date": stamp,
            "x-amz-meta-a": "1, 2",
            "authorization": f"AWS {AK}:{signature}",
        },
    )
    assert authenticate(req, secret_of, now + 900).access_key == AK
    with pytest.raises(S3Error, match="RequestTimeTooSkewed"):
        authenticate(req, secret_of, now + 901)
    with pytest.raises(S3Error, match="SignatureDoesNotMatch"):
        authenticate(headers(req, **{"content-type": "text/html"}), secret_of, now)


# AWS's SigV4 test suite (aws-sig-v4-test-suite; service "service", 20150830T123600Z, key
# AKIDEXAMPLE): the cases whose paths need no normalization, which S3 never does.
SUITE_SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
SUITE_HEADERS = {"host": "example.amazonaws.com", "x-amz-date": "20150830T123600Z"}


@pytest.mark.parametrize(
    ("method", "target", "more", "body", "signature"),
    [
        ("GET", "/", {}, b"", "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"),
        (
            "GET",
            "/?Param1=value1",
            {},
            b"",
            "a67d582fa61cc504c4bae71f336f98b97f1ea3c7a6bfe1b6e45aec72011b9aeb",
        ),
        (
            "GET",
            "/?Param2=value2&Param1=value1",
            {},
            b"",
            "b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500",
        ),
        (
            "POST",
            "/",
            {"content-type": "application/x-www-form-urlencoded"},
            b"Param1=value1",
            "ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a",
        ),
    ],
    ids=[
        "get-vanilla",
        "get-vanilla-query",
        "get-vanilla-query-order",
        "post-x-www-form-urlencoded",
    ],
)
def test_aws_sigv4_test_suite(
    method: str, target: str, more: dict[str, str], body: bytes, signature: str
) -> None:
    """The canonical request, string to sign and signing key give the suite's signatures."""
    path, query = split_target(target)
    heads = {**SUITE_HEADERS, **more}
    req = SignedRequest(method, path, query, heads)
    canonical = canonical_request(req, sorted(heads), hashlib.sha256(body).hexdigest())
    text = v4_string_to_sign(
        "20150830T123600Z", "20150830/us-east-1/service/aws4_request", canonical
    )
    key = signing_key(SUITE_SECRET, "20150830", "us-east-1", "service")
    assert hmac.new(key, text.encode(), hashlib.sha256).hexdigest() == signature
