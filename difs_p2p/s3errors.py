"""The errors of the S3 API: an S3 error code, its message and its HTTP status.

Pure: no I/O. :class:`S3Error` is what every S3 decision raises (authentication, body
framing, checksums, bucket and object operations); the S3 server renders it as S3's XML
error document (``<Error><Code>…</Code><Message>…</Message>…</Error>``) with ``status``
and the ``extra`` fields (``StringToSign``, ``ExpectedDigest``, ``BucketName``...)
as further elements. The codes and statuses are those of Amazon S3's error table, so that
SDKs (boto3, the aws CLI, rclone, minio, s3cmd) recognise and retry them as they would
against S3: ``SlowDown``/``ServiceUnavailable``/``InternalError`` are retried,
``SignatureDoesNotMatch`` and ``AccessDenied`` are not.

Each code has a constructor with S3's default message, for example
``raise no_such_key(key)`` or ``raise S3Error.of(SIGNATURE_DOES_NOT_MATCH)``; ``STATUS``
is the table code -> status.
"""

from __future__ import annotations

from collections.abc import Mapping

# code -> (HTTP status, S3's default message)
_TABLE: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "Access Denied"),
    "SignatureDoesNotMatch": (
        403,
        "The request signature we calculated does not match the signature you provided. "
        "Check your key and signing method.",
    ),
    "InvalidAccessKeyId": (
        403,
        "The AWS Access Key Id you provided does not exist in our records.",
    ),
    "RequestTimeTooSkewed": (
        403,
        "The difference between the request time and the current time is too large.",
    ),
    "AuthorizationQueryParametersError": (
        400,
        "Error parsing the X-Amz-Credential parameter; the query parameters are malformed.",
    ),
    "AuthorizationHeaderMalformed": (400, "The authorization header is malformed."),
    "ExpiredToken": (403, "The provided token has expired."),
    "MissingSecurityHeader": (400, "Your request is missing a required header."),
    "InvalidDigest": (400, "The Content-MD5 you specified is not valid."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "XAmzContentSHA256Mismatch": (
        400,
        "The provided 'x-amz-content-sha256' header does not match what was computed.",
    ),
    "IncompleteBody": (
        400,
        "You did not provide the number of bytes specified by the Content-Length HTTP header.",
    ),
    "InvalidRequest": (400, "Invalid Request"),
    "InvalidArgument": (400, "Invalid Argument"),
    "NoSuchBucket": (404, "The specified bucket does not exist"),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (
        404,
        "The specified upload does not exist. The upload ID may be invalid, or the upload "
        "may have been aborted or completed.",
    ),
    "NoSuchVersion": (
        404,
        "The specified version does not exist.",
    ),
    "BucketAlreadyExists": (
        409,
        "The requested bucket name is not available. The bucket namespace is shared by all "
        "users of the system. Please select a different name and try again.",
    ),
    "BucketAlreadyOwnedByYou": (
        409,
        "Your previous request to create the named bucket succeeded and you already own it.",
    ),
    "BucketNotEmpty": (409, "The bucket you tried to delete is not empty"),
    "InvalidBucketName": (400, "The specified bucket is not valid."),
    "KeyTooLongError": (400, "Your key is too long"),
    "InvalidRange": (416, "The requested range is not satisfiable"),
    "PreconditionFailed": (
        412,
        "At least one of the preconditions you specified did not hold",
    ),
    "NotImplemented": (
        501,
        "A header you provided implies functionality that is not implemented",
    ),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "EntityTooSmall": (
        400,
        "Your proposed upload is smaller than the minimum allowed object size.",
    ),
    "EntityTooLarge": (
        400,
        "Your proposed upload exceeds the maximum allowed object size.",
    ),
    "InvalidPart": (
        400,
        "One or more of the specified parts could not be found. The part may not have been "
        "uploaded, or the specified entity tag may not match the part's entity tag.",
    ),
    "InvalidPartOrder": (
        400,
        "The list of parts was not in ascending order. The parts list must be specified in "
        "order by part number.",
    ),
    "MalformedXML": (
        400,
        "The XML you provided was not well-formed or did not validate against our "
        "published schema.",
    ),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "SlowDown": (503, "Please reduce your request rate."),
    "ServiceUnavailable": (503, "Service is unable to handle request."),
}

ACCESS_DENIED = "AccessDenied"
SIGNATURE_DOES_NOT_MATCH = "SignatureDoesNotMatch"
INVALID_ACCESS_KEY_ID = "InvalidAccessKeyId"
REQUEST_TIME_TOO_SKEWED = "RequestTimeTooSkewed"
AUTHORIZATION_QUERY_PARAMETERS_ERROR = "AuthorizationQueryParametersError"
AUTHORIZATION_HEADER_MALFORMED = "AuthorizationHeaderMalformed"
EXPIRED_TOKEN = "ExpiredToken"
MISSING_SECURITY_HEADER = "MissingSecurityHeader"
INVALID_DIGEST = "InvalidDigest"
BAD_DIGEST = "BadDigest"
X_AMZ_CONTENT_SHA256_MISMATCH = "XAmzContentSHA256Mismatch"
INCOMPLETE_BODY = "IncompleteBody"
INVALID_REQUEST = "InvalidRequest"
INVALID_ARGUMENT = "InvalidArgument"
NO_SUCH_BUCKET = "NoSuchBucket"
NO_SUCH_KEY = "NoSuchKey"
NO_SUCH_UPLOAD = "NoSuchUpload"
NO_SUCH_VERSION = "NoSuchVersion"
BUCKET_ALREADY_EXISTS = "BucketAlreadyExists"
BUCKET_ALREADY_OWNED_BY_YOU = "BucketAlreadyOwnedByYou"
BUCKET_NOT_EMPTY = "BucketNotEmpty"
INVALID_BUCKET_NAME = "InvalidBucketName"
KEY_TOO_LONG = "KeyTooLongError"
INVALID_RANGE = "InvalidRange"
PRECONDITION_FAILED = "PreconditionFailed"
NOT_IMPLEMENTED = "NotImplemented"
METHOD_NOT_ALLOWED = "MethodNotAllowed"
ENTITY_TOO_SMALL = "EntityTooSmall"
ENTITY_TOO_LARGE = "EntityTooLarge"
INVALID_PART = "InvalidPart"
INVALID_PART_ORDER = "InvalidPartOrder"
MALFORMED_XML = "MalformedXML"
INTERNAL_ERROR = "InternalError"
SLOW_DOWN = "SlowDown"
SERVICE_UNAVAILABLE = "ServiceUnavailable"

STATUS: Mapping[str, int] = {code: status for code, (status, _) in _TABLE.items()}
"""Each known code's HTTP status."""

REQUEST_EXPIRED = "Request has expired"
"""The message of the AccessDenied S3 answers to a presigned URL past its expiry."""


class S3Error(Exception):
    """An S3 error: ``code`` (S3's error code), ``message``, HTTP ``status`` and the
    ``extra`` elements of the error document (field name -> text)."""

    def __init__(
        self,
        code: str,
        message: str = "",
        status: int = 0,
        extra: Mapping[str, str] | None = None,
    ) -> None:
        default_status, default_message = _TABLE.get(code, (500, code))
        self.code = code
        self.message = message or default_message
        self.status = status or default_status
        self.extra: dict[str, str] = dict(extra or {})
        super().__init__(f"{code}: {self.message}")

    @classmethod
    def of(cls, code: str, message: str = "", **extra: str) -> S3Error:
        """The error ``code`` with S3's status, ``message`` (S3's default if empty) and
        ``extra`` elements."""
        return cls(code, message, extra=extra)

    def __repr__(self) -> str:
        return f"S3Error({self.code!r}, {self.message!r}, {self.status}, {self.extra!r})"


def access_denied(message: str = "") -> S3Error:
    """403 AccessDenied (anonymous request, a key without the right, or ``message``)."""
    return S3Error(ACCESS_DENIED, message)


def request_expired(expires: str = "", now: str = "") -> S3Error:
    """403 AccessDenied "Request has expired": a presigned URL past its expiry."""
    extra = {}
    if expires:
        extra["Expires"] = expires
    if now:
        extra["ServerTime"] = now
    return S3Error(ACCESS_DENIED, REQUEST_EXPIRED, extra=extra)


def signature_does_not_match(
    access_key: str = "", string_to_sign: str = "", canonical_request: str = ""
) -> S3Error:
    """403 SignatureDoesNotMatch, with the string to sign (and the canonical request for
    SigV4) as S3 returns them, so that a client can see what the server signed."""
    extra = {}
    if access_key:
        extra["AWSAccessKeyId"] = access_key
    if string_to_sign:
        extra["StringToSign"] = string_to_sign
    if canonical_request:
        extra["CanonicalRequest"] = canonical_request
    return S3Error(SIGNATURE_DOES_NOT_MATCH, extra=extra)


def invalid_access_key_id(access_key: str) -> S3Error:
    """403 InvalidAccessKeyId: no such access key."""
    return S3Error(INVALID_ACCESS_KEY_ID, extra={"AWSAccessKeyId": access_key})


def request_time_too_skewed(request_time: str, server_time: str, max_skew_ms: int) -> S3Error:
    """403 RequestTimeTooSkewed: the request's date is too far from the server's clock."""
    return S3Error(
        REQUEST_TIME_TOO_SKEWED,
        extra={
            "RequestTime": request_time,
            "ServerTime": server_time,
            "MaxAllowedSkewMilliseconds": str(max_skew_ms),
        },
    )


def authorization_query_error(message: str) -> S3Error:
    """400 AuthorizationQueryParametersError: a presigned URL's parameters are malformed."""
    return S3Error(AUTHORIZATION_QUERY_PARAMETERS_ERROR, message)


def authorization_header_malformed(message: str = "") -> S3Error:
    """400 AuthorizationHeaderMalformed: the Authorization header does not parse."""
    return S3Error(AUTHORIZATION_HEADER_MALFORMED, message)


def missing_security_header(header: str) -> S3Error:
    """400 MissingSecurityHeader: a required header (``x-amz-content-sha256``...) is absent."""
    return S3Error(MISSING_SECURITY_HEADER, extra={"MissingHeaderName": header})


def invalid_digest(content_md5: str = "") -> S3Error:
    """400 InvalidDigest: a Content-MD5 (or checksum header) that is not valid base64 of the
    right length."""
    return S3Error(INVALID_DIGEST, extra={"Content-MD5": content_md5} if content_md5 else {})


def bad_digest(expected: str = "", calculated: str = "", message: str = "") -> S3Error:
    """400 BadDigest: the body does not match its Content-MD5 or x-amz-checksum-*."""
    extra = {}
    if expected:
        extra["ExpectedDigest"] = expected
    if calculated:
        extra["CalculatedDigest"] = calculated
    return S3Error(BAD_DIGEST, message, extra=extra)


def content_sha256_mismatch(claimed: str, computed: str) -> S3Error:
    """400 XAmzContentSHA256Mismatch: the body's SHA-256 is not x-amz-content-sha256."""
    return S3Error(
        X_AMZ_CONTENT_SHA256_MISMATCH,
        extra={"ClientComputedContentSHA256": claimed, "S3ComputedContentSHA256": computed},
    )


def incomplete_body(message: str = "") -> S3Error:
    """400 IncompleteBody: fewer bytes than announced, or a chunked body cut short."""
    return S3Error(INCOMPLETE_BODY, message)


def invalid_request(message: str) -> S3Error:
    """400 InvalidRequest with ``message``."""
    return S3Error(INVALID_REQUEST, message)


def invalid_argument(message: str, name: str = "", value: str = "") -> S3Error:
    """400 InvalidArgument: ``name`` (a header or parameter) has a bad ``value``."""
    extra = {}
    if name:
        extra["ArgumentName"] = name
        extra["ArgumentValue"] = value
    return S3Error(INVALID_ARGUMENT, message, extra=extra)


def no_such_bucket(bucket: str) -> S3Error:
    """404 NoSuchBucket."""
    return S3Error(NO_SUCH_BUCKET, extra={"BucketName": bucket})


def no_such_key(key: str) -> S3Error:
    """404 NoSuchKey."""
    return S3Error(NO_SUCH_KEY, extra={"Key": key})


def no_such_upload(upload_id: str) -> S3Error:
    """404 NoSuchUpload."""
    return S3Error(NO_SUCH_UPLOAD, extra={"UploadId": upload_id})


def no_such_version(key: str, version_id: str) -> S3Error:
    """404 NoSuchVersion."""
    return S3Error(NO_SUCH_VERSION, extra={"Key": key, "VersionId": version_id})


def bucket_already_exists(bucket: str) -> S3Error:
    """409 BucketAlreadyExists: someone else owns the bucket."""
    return S3Error(BUCKET_ALREADY_EXISTS, extra={"BucketName": bucket})


def bucket_already_owned_by_you(bucket: str) -> S3Error:
    """409 BucketAlreadyOwnedByYou."""
    return S3Error(BUCKET_ALREADY_OWNED_BY_YOU, extra={"BucketName": bucket})


def bucket_not_empty(bucket: str) -> S3Error:
    """409 BucketNotEmpty."""
    return S3Error(BUCKET_NOT_EMPTY, extra={"BucketName": bucket})


def invalid_bucket_name(bucket: str, message: str = "") -> S3Error:
    """400 InvalidBucketName."""
    return S3Error(INVALID_BUCKET_NAME, message, extra={"BucketName": bucket})


def key_too_long(size: int, max_size: int) -> S3Error:
    """400 KeyTooLongError."""
    return S3Error(KEY_TOO_LONG, extra={"Size": str(size), "MaxSizeAllowed": str(max_size)})


def invalid_range(size: int, requested: str = "") -> S3Error:
    """416 InvalidRange: no satisfiable range in an object of ``size`` bytes."""
    extra = {"ActualObjectSize": str(size)}
    if requested:
        extra["RangeRequested"] = requested
    return S3Error(INVALID_RANGE, extra=extra)


def precondition_failed(condition: str = "") -> S3Error:
    """412 PreconditionFailed (``condition``: If-Match, If-Unmodified-Since...)."""
    return S3Error(PRECONDITION_FAILED, extra={"Condition": condition} if condition else {})


def not_implemented(message: str = "") -> S3Error:
    """501 NotImplemented: an operation or header this server does not support."""
    return S3Error(NOT_IMPLEMENTED, message)


def method_not_allowed(method: str, resource: str = "") -> S3Error:
    """405 MethodNotAllowed."""
    extra = {"Method": method}
    if resource:
        extra["ResourceType"] = resource
    return S3Error(METHOD_NOT_ALLOWED, extra=extra)


def entity_too_small(size: int, min_size: int) -> S3Error:
    """400 EntityTooSmall: a multipart part (not the last) below the minimum."""
    return S3Error(
        ENTITY_TOO_SMALL, extra={"ProposedSize": str(size), "MinSizeAllowed": str(min_size)}
    )


def entity_too_large(size: int, max_size: int) -> S3Error:
    """400 EntityTooLarge."""
    return S3Error(
        ENTITY_TOO_LARGE, extra={"ProposedSize": str(size), "MaxSizeAllowed": str(max_size)}
    )


def invalid_part(part_number: int = 0, etag: str = "") -> S3Error:
    """400 InvalidPart: a part of a complete request not uploaded, or with another ETag."""
    extra = {}
    if part_number:
        extra["PartNumber"] = str(part_number)
    if etag:
        extra["ETag"] = etag
    return S3Error(INVALID_PART, extra=extra)


def invalid_part_order() -> S3Error:
    """400 InvalidPartOrder: a complete request's parts not in ascending order."""
    return S3Error(INVALID_PART_ORDER)


def malformed_xml(message: str = "") -> S3Error:
    """400 MalformedXML."""
    return S3Error(MALFORMED_XML, message)


def internal_error(message: str = "") -> S3Error:
    """500 InternalError (clients retry it)."""
    return S3Error(INTERNAL_ERROR, message)


def slow_down(message: str = "") -> S3Error:
    """503 SlowDown: the peer is busy (clients back off and retry)."""
    return S3Error(SLOW_DOWN, message)


def service_unavailable(message: str = "") -> S3Error:
    """503 ServiceUnavailable: the network cannot serve the request now (clients retry)."""
    return S3Error(SERVICE_UNAVAILABLE, message)
