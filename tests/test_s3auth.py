"""S3 authentication, body framing and checksums, and the S3 errors, without sockets."""

from __future__ import annotations

import pytest

from difs_p2p import s3errors
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
