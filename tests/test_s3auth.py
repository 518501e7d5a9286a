"""S3 authentication, body framing and checksums, and the S3 errors, without sockets."""

from __future__ import annotations

import calendar
import hashlib
from collections.abc import Callable
from dataclasses import replace

import pytest

from difs_p2p import s3errors
from difs_p2p.s3auth import (
    EMPTY_SHA256,
    SignedRequest,
    authenticate,
    canonical_query,
    canonical_uri,
    split_target,
)
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
