"""S3 request authentication (SigV4, presigned URLs, SigV2), without I/O.

Pure: no sockets, no clock (``now`` is passed in), no files. The S3 server turns each HTTP
request into a :class:`SignedRequest` (the method, the path and query exactly as sent, the
headers) and calls :func:`authenticate` with a lookup of secrets by access key; it gets an
:class:`Auth` or an :class:`~difs_p2p.s3errors.S3Error` to answer. Four schemes, as
clients send them:

- SigV4 in the ``Authorization`` header (``AWS4-HMAC-SHA256 Credential=AK/DATE/REGION/s3/
  aws4_request, SignedHeaders=..., Signature=...``): the canonical request of AWS's
  Signature Version 4 for S3 (the path as sent, not normalized: each segment decoded and
  encoded again in AWS's one canonical form; the query sorted; the signed headers with
  their values trimmed; ``x-amz-content-sha256`` as the payload hash); the request's
  ``x-amz-date`` within 15 minutes of ``now``.
- SigV4 in the query (presigned URLs: ``X-Amz-Algorithm``, ``X-Amz-Credential``,
  ``X-Amz-Date``, ``X-Amz-Expires`` up to 7 days, ``X-Amz-SignedHeaders``,
  ``X-Amz-Signature``); past its expiry, AccessDenied "Request has expired".
- SigV2 in the query (``AWSAccessKeyId``, ``Expires``, ``Signature``) and in the header
  (``Authorization: AWS AK:SIG``): HMAC-SHA1 over the method, Content-MD5, Content-Type,
  the date (the ``Expires`` time for a URL), the ``x-amz-*`` headers and the resource with
  its sub-resources (``?uploadId=``, ``?versionId=``...).

Every signature is compared in constant time (``hmac.compare_digest``). Any ``x-amz-*``
header the signature does not cover (except those that only describe the body, which
:class:`BodyChecks` verifies anyway) is refused: a presigned PUT must not become a copy
because someone added ``x-amz-copy-source``. Anonymous requests are AccessDenied.

Bodies are ``s3body``'s: :func:`body_decoder` gives the request's ``ChunkedDecoder``
when its body is aws-chunked (the chunk signatures chained from this request's);
``ChunkSigner``, ``ChunkedDecoder`` and ``BodyChecks`` are importable from here too.
"""

from __future__ import annotations

import base64
import calendar
import contextlib
import datetime
import email.utils
import functools
import hashlib
import hmac
import re
import time
from collections.abc import Callable, Iterable, Mapping
from urllib.parse import quote, unquote_to_bytes

from difs_p2p import s3errors
from difs_p2p.classgen import valueclass
from difs_p2p.s3body import (
    EMPTY_SHA256,
    STREAMING_PAYLOADS,
    STREAMING_SIGNED,
    STREAMING_SIGNED_TRAILER,
    STREAMING_UNSIGNED_TRAILER,
    UNSIGNED_PAYLOAD,
    BodyChecks,
    ChunkedDecoder,
    ChunkSigner,
    trailer_names,
)
from difs_p2p.s3errors import S3Error

__all__ = [
    "EMPTY_SHA256",
    "MAX_PRESIGN_EXPIRES",
    "MAX_SKEW",
    "STREAMING_PAYLOADS",
    "STREAMING_SIGNED",
    "STREAMING_SIGNED_TRAILER",
    "STREAMING_UNSIGNED_TRAILER",
    "UNSIGNED_PAYLOAD",
    "Auth",
    "BodyChecks",
    "ChunkSigner",
    "ChunkedDecoder",
    "SignedRequest",
    "authenticate",
    "body_decoder",
    "canonical_query",
    "canonical_request",
    "canonical_uri",
    "signing_key",
    "split_target",
    "v4_string_to_sign",
]

MAX_SKEW = 15 * 60.0
"""Seconds a header-signed request's date may differ from the server's clock (S3's)."""
MAX_PRESIGN_EXPIRES = 7 * 24 * 3600
"""The longest validity of a SigV4 presigned URL (S3's: 7 days)."""
_ALGORITHM = "AWS4-HMAC-SHA256"
_SPACE = " \t"  # what may surround the parts of an Authorization header
_HEX64 = re.compile(r"[0-9a-f]{64}")
_AMZ_DATE = re.compile(r"\d{8}T\d{6}Z")
# x-amz-* headers that may go unsigned: they describe the body, which BodyChecks and the
# chunk signatures verify on their own (and botocore adds some after signing).
_UNSIGNED_OK = re.compile(
    r"x-amz-(content-sha256|date|decoded-content-length|trailer|sdk-checksum-algorithm"
    r"|checksum-[a-z0-9]+|user-agent)"
)
# SigV2: the query parameters that are part of the signed resource (S3's list, as botocore)
_V2_SUBRESOURCE_NAMES = (
    "accelerate acl analytics cors defaultObjectAcl delete inventory lifecycle location "
    "logging metrics notification object-lock partNumber policy replication requestPayment "
    "response-cache-control response-content-disposition response-content-encoding "
    "response-content-language response-content-type response-expires restore select "
    "select-type storageClass tagging torrent uploadId uploads versionId versioning "
    "versions website"
)
_V2_SUBRESOURCES = frozenset(_V2_SUBRESOURCE_NAMES.split())


@valueclass
class SignedRequest:
    """What authentication sees of an HTTP request."""

    method: str
    raw_path: str
    """The path exactly as sent (percent-encoded, not normalized), without the query."""
    query: list[tuple[str, str]]
    """The raw (percent-encoded) query pairs in order (``split_target``)."""
    headers: Mapping[str, str]
    """Lower-case names -> values (repeated headers joined with ",")."""


@valueclass
class Auth:
    """An authenticated request: whose key signed it and how its body is to be read."""

    access_key: str
    payload: str
    """``UNSIGNED-PAYLOAD``, a SHA-256 hex digest, or one of ``STREAMING_PAYLOADS``."""
    presigned: bool
    chunk_signer: ChunkSigner | None
    """For the signed streaming payloads."""


def split_target(target: str) -> tuple[str, list[tuple[str, str]]]:
    """The raw path and the raw query pairs of a request target (``/b/k?x=1&y``) as sent."""
    path, _, query = target.partition("?")
    pairs = []
    for piece in query.split("&") if query else ():
        if piece:
            name, _, value = piece.partition("=")
            pairs.append((name, value))
    return path, pairs


def _utf8(text: str) -> bytes:
    """``text`` as the bytes that came in (aiohttp keeps undecodable header and path bytes
    as surrogates: they are given back, never an exception)."""
    return text.encode("utf-8", "surrogateescape")


def _decode(text: str, plus_is_space: bool) -> bytes:
    if plus_is_space:
        text = text.replace("+", " ")
    return unquote_to_bytes(_utf8(text))


def _encode(raw: bytes) -> str:
    """AWS's URI encoding: every byte but ``A-Za-z0-9-_.~`` as ``%XX``."""
    return quote(raw, safe="-_.~")


def canonical_uri(raw_path: str) -> str:
    """SigV4's canonical URI for S3: the path's segments as sent, each decoded and encoded
    again in AWS's form (``%2f`` -> ``%2F``, ``$`` -> ``%24``); no dot-segment removal, no
    merging of slashes (S3 keys may contain both)."""
    if not raw_path:
        return "/"
    return "/".join(_encode(_decode(part, False)) for part in raw_path.split("/"))


def canonical_query(query: Iterable[tuple[str, str]]) -> str:
    """SigV4's canonical query string: names and values decoded (``+`` is a space, as the
    server reads it) and encoded in AWS's form, sorted by name then value."""
    pairs = sorted((_encode(_decode(k, True)), _encode(_decode(v, True))) for k, v in query)
    return "&".join(f"{k}={v}" for k, v in pairs)


def _header_value(value: str) -> str:
    return " ".join(value.split())


@functools.lru_cache(maxsize=256)
def signing_key(secret: str, day: str, region: str, service: str = "s3") -> bytes:
    """SigV4's signing key of ``secret`` for a day (``YYYYMMDD``), region and service."""
    key = _utf8("AWS4" + secret)
    for part in (day, region, service, "aws4_request"):
        key = hmac.new(key, _utf8(part), hashlib.sha256).digest()
    return key


def _amz_time(text: str) -> float:
    """Seconds since the epoch of an ISO 8601 basic UTC time (``20130524T000000Z``)."""
    if not _AMZ_DATE.fullmatch(text):
        raise ValueError(text)
    return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))


def _http_time(text: str) -> float | None:
    """Seconds since the epoch of an HTTP date (``Tue, 27 Mar 2007 19:36:42 +0000``; no
    zone is UTC) or an ISO 8601 basic one; None if it is neither."""
    with contextlib.suppress(ValueError):
        return _amz_time(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
        if when.tzinfo is None:
            when = when.replace(tzinfo=datetime.UTC)
        return when.timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _iso(t: float) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(t))


def _same(a: str, b: str) -> bool:
    return hmac.compare_digest(_utf8(a), _utf8(b))


def authenticate(req: SignedRequest, secret_of: Callable[[str], str | None], now: float) -> Auth:
    """Who signed ``req``, or the S3Error to answer (``secret_of`` gives an access key's
    secret, None when there is no such key; ``now`` is the server's time)."""
    header = req.headers.get("authorization", "")
    names = {name for name, _ in req.query}
    v4_query = "X-Amz-Algorithm" in names or "X-Amz-Signature" in names
    v2_query = "AWSAccessKeyId" in names or "Signature" in names
    if header and (v4_query or v2_query):
        raise s3errors.invalid_argument("Only one auth mechanism allowed")
    if header.startswith(_ALGORITHM + " "):
        return _v4_header(req, header, secret_of, now)
    if header.startswith("AWS "):
        return _v2_header(req, header, secret_of, now)
    if header:
        raise s3errors.invalid_argument(
            "Unsupported Authorization Type", "Authorization", header.split(" ", 1)[0]
        )
    if v4_query:
        return _v4_query(req, secret_of, now)
    if v2_query:
        return _v2_query(req, secret_of, now)
    raise s3errors.access_denied()


# -- SigV4 ---------------------------------------------------------------------------------


@valueclass
class _V4:
    access_key: str
    day: str
    region: str
    signed_headers: list[str]
    signature: str


def _parse_credential(credential: str, bad: Callable[[str], S3Error]) -> tuple[str, str, str]:
    parts = credential.split("/")
    if len(parts) != 5 or not parts[0]:
        raise bad(f"Error parsing the X-Amz-Credential parameter: {credential!r}")
    access_key, day, region, service, terminator = parts
    if not re.fullmatch(r"\d{8}", day) or not region:
        raise bad(f"malformed credential scope {credential!r}")
    if service != "s3":
        raise bad(f"incorrect service {service!r}: this is 's3'")
    if terminator != "aws4_request":
        raise bad(f"incorrect terminal {terminator!r}: this is 'aws4_request'")
    return access_key, day, region


def _parse_signed_headers(text: str, bad: Callable[[str], S3Error]) -> list[str]:
    names = text.split(";")
    if not text or any(not n or n != n.lower() or n.strip() != n for n in names):
        raise bad(f"malformed SignedHeaders {text!r}")
    if "host" not in names:
        raise bad("SignedHeaders must include host")
    return names


def _v4_header(
    req: SignedRequest, header: str, secret_of: Callable[[str], str | None], now: float
) -> Auth:
    bad = s3errors.authorization_header_malformed
    fields: dict[str, str] = {}
    for item in header[len(_ALGORITHM) + 1 :].split(","):
        name, eq, value = item.strip(_SPACE).partition("=")
        if not eq or name in fields:
            raise bad(f"malformed Authorization component {item.strip(_SPACE)!r}")
        fields[name] = value
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise bad("the Authorization header needs Credential, SignedHeaders and Signature")
    access_key, day, region = _parse_credential(fields["Credential"], bad)
    signed = _parse_signed_headers(fields["SignedHeaders"], bad)
    if not _HEX64.fullmatch(fields["Signature"]):
        raise bad("the Signature is not 64 lower-case hex digits")
    date = req.headers.get("x-amz-date", "")
    try:
        request_time = _amz_time(date)
    except ValueError:
        raise s3errors.access_denied(
            "AWS authentication requires a valid Date or x-amz-date header"
        ) from None
    if date[:8] != day:
        raise bad(f"the credential date {day} is not the request's date {date[:8]}")
    payload = req.headers.get("x-amz-content-sha256")
    if payload is None:
        raise s3errors.missing_security_header("x-amz-content-sha256")
    known = payload in STREAMING_PAYLOADS or payload == UNSIGNED_PAYLOAD
    if not known and not re.fullmatch(r"[0-9a-fA-F]{64}", payload):
        raise s3errors.invalid_argument(
            "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, STREAMING-... or a SHA-256 hex digest",
            "x-amz-content-sha256",
            payload,
        )
    secret = secret_of(access_key)
    if secret is None:
        raise s3errors.invalid_access_key_id(access_key)
    if abs(now - request_time) > MAX_SKEW:
        raise s3errors.request_time_too_skewed(date, _iso(now), int(MAX_SKEW * 1000))
    v4 = _V4(access_key, day, region, signed, fields["Signature"])
    key = _verify_v4(req, v4, date, secret, payload, req.query)
    signer = None
    if payload in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER):
        signer = ChunkSigner(v4.signature, key, f"{day}/{region}/s3/aws4_request", date)
    return Auth(access_key, payload, False, signer)


def _v4_query(req: SignedRequest, secret_of: Callable[[str], str | None], now: float) -> Auth:
    bad = s3errors.authorization_query_error
    params: dict[str, str] = {}
    for name, value in req.query:
        if name.startswith("X-Amz-"):
            if name in params:
                raise bad(f"{name} appears twice")
            params[name] = _decode(value, True).decode("utf-8", "replace")
    need = ["X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires"]
    need += ["X-Amz-SignedHeaders", "X-Amz-Signature"]
    missing = [name for name in need if name not in params]
    if missing:
        raise bad(f"Query-string authentication requires {', '.join(missing)}")
    if params["X-Amz-Algorithm"] != _ALGORITHM:
        raise bad(f"X-Amz-Algorithm only supports {_ALGORITHM}")
    access_key, day, region = _parse_credential(params["X-Amz-Credential"], bad)
    signed = _parse_signed_headers(params["X-Amz-SignedHeaders"], bad)
    date = params["X-Amz-Date"]
    try:
        request_time = _amz_time(date)
    except ValueError:
        raise bad(
            "X-Amz-Date must be in the ISO8601 Long Format \"yyyyMMdd'T'HHmmss'Z'\""
        ) from None
    if date[:8] != day:
        raise bad(f"the credential date {day} is not X-Amz-Date's {date[:8]}")
    expires_text = params["X-Amz-Expires"]
    if not re.fullmatch(r"\d{1,7}", expires_text):
        raise bad("X-Amz-Expires should be a number")
    expires = int(expires_text)
    if expires > MAX_PRESIGN_EXPIRES:
        raise bad("X-Amz-Expires must be less than a week (in seconds) that is 604800")
    if not _HEX64.fullmatch(params["X-Amz-Signature"]):
        raise bad("X-Amz-Signature is not 64 lower-case hex digits")
    secret = secret_of(access_key)
    if secret is None:
        raise s3errors.invalid_access_key_id(access_key)
    if request_time - now > MAX_SKEW:
        raise s3errors.access_denied("Request is not valid yet")
    if now > request_time + expires:
        raise s3errors.request_expired(_iso(request_time + expires), _iso(now))
    payload = params.get("X-Amz-Content-Sha256", UNSIGNED_PAYLOAD)
    v4 = _V4(access_key, day, region, signed, params["X-Amz-Signature"])
    query = [(k, v) for k, v in req.query if k != "X-Amz-Signature"]
    _verify_v4(req, v4, date, secret, payload, query)
    return Auth(access_key, UNSIGNED_PAYLOAD, True, None)


def _unsigned_amz_headers(headers: Mapping[str, str], signed: Iterable[str]) -> list[str]:
    covered = set(signed)
    return sorted(
        name
        for name in headers
        if name.startswith("x-amz-") and name not in covered and not _UNSIGNED_OK.fullmatch(name)
    )


def canonical_request(
    req: SignedRequest,
    signed_headers: Iterable[str],
    payload: str,
    query: Iterable[tuple[str, str]] | None = None,
) -> str:
    """SigV4's canonical request of ``req`` (``query``: its query, less what is not signed)."""
    names = list(signed_headers)
    headers = "".join(f"{name}:{_header_value(req.headers.get(name, ''))}\n" for name in names)
    return "\n".join(
        [
            req.method.upper(),
            canonical_uri(req.raw_path),
            canonical_query(req.query if query is None else query),
            headers,
            ";".join(names),
            payload,
        ]
    )


def v4_string_to_sign(date: str, scope: str, canonical: str) -> str:
    """SigV4's string to sign: the algorithm, the request's time, the credential scope
    (``DAY/REGION/SERVICE/aws4_request``) and the canonical request's SHA-256."""
    return "\n".join([_ALGORITHM, date, scope, hashlib.sha256(_utf8(canonical)).hexdigest()])


def _verify_v4(
    req: SignedRequest,
    v4: _V4,
    date: str,
    secret: str,
    payload: str,
    query: Iterable[tuple[str, str]],
) -> bytes:
    """Check the signature; the signing key."""
    unsigned = _unsigned_amz_headers(req.headers, v4.signed_headers)
    if unsigned:
        raise S3Error.of(
            s3errors.ACCESS_DENIED,
            "There were headers present in the request which were not signed",
            HeadersNotSigned=", ".join(unsigned),
        )
    canonical = canonical_request(req, v4.signed_headers, payload, query)
    string_to_sign = v4_string_to_sign(date, f"{v4.day}/{v4.region}/s3/aws4_request", canonical)
    key = signing_key(secret, v4.day, v4.region)
    expected = hmac.new(key, _utf8(string_to_sign), hashlib.sha256).hexdigest()
    if not _same(expected, v4.signature):
        raise s3errors.signature_does_not_match(v4.access_key, string_to_sign, canonical)
    return key


# -- SigV2 ---------------------------------------------------------------------------------


def _v2_string_to_sign(req: SignedRequest, date: str, query_headers: Mapping[str, str]) -> str:
    headers = req.headers
    amz: dict[str, str] = {}
    for name, value in [*headers.items(), *query_headers.items()]:
        if name.startswith("x-amz-"):
            amz[name] = value.strip()
    lines = [req.method.upper(), headers.get("content-md5", "").strip()]
    lines += [headers.get("content-type", "").strip(), date]
    lines += [f"{name}:{amz[name]}" for name in sorted(amz)]
    resource = req.raw_path or "/"
    if resource.count("/") == 1 and resource != "/":
        resource += "/"  # a bucket's resource is "/bucket/" (S3's SigV2 rule)
    sub = sorted(
        (name, _decode(value, True).decode("utf-8", "replace"))
        for name, value in req.query
        if name in _V2_SUBRESOURCES
    )
    if sub:
        resource += "?" + "&".join(f"{n}={v}" if v else n for n, v in sub)
    return "\n".join([*lines, resource])


def _verify_v2(
    req: SignedRequest,
    access_key: str,
    signature: str,
    secret: str,
    date: str,
    query_headers: Mapping[str, str],
) -> None:
    string_to_sign = _v2_string_to_sign(req, date, query_headers)
    digest = hmac.new(_utf8(secret), _utf8(string_to_sign), hashlib.sha1).digest()
    expected = base64.b64encode(digest).decode()
    if not _same(expected, signature):
        raise s3errors.signature_does_not_match(access_key, string_to_sign)


def _v2_header(
    req: SignedRequest, header: str, secret_of: Callable[[str], str | None], now: float
) -> Auth:
    access_key, colon, signature = header[4:].strip(_SPACE).rpartition(":")
    if not colon or not access_key or not signature:
        raise s3errors.authorization_header_malformed("expected 'AWS AccessKeyId:Signature'")
    secret = secret_of(access_key)
    if secret is None:
        raise s3errors.invalid_access_key_id(access_key)
    stamp = req.headers.get("x-amz-date") or req.headers.get("date", "")
    request_time = _http_time(stamp)
    if request_time is None:
        raise s3errors.access_denied(
            "AWS authentication requires a valid Date or x-amz-date header"
        )
    if abs(now - request_time) > MAX_SKEW:
        raise s3errors.request_time_too_skewed(stamp, _iso(now), int(MAX_SKEW * 1000))
    _verify_v2(req, access_key, signature, secret, req.headers.get("date", "").strip(), {})
    return Auth(access_key, UNSIGNED_PAYLOAD, False, None)


def _v2_query(req: SignedRequest, secret_of: Callable[[str], str | None], now: float) -> Auth:
    params: dict[str, str] = {}
    amz: dict[str, str] = {}
    for name, value in req.query:
        text = _decode(value, True).decode("utf-8", "replace")
        if name in ("AWSAccessKeyId", "Expires", "Signature"):
            if name in params:
                raise s3errors.invalid_argument(f"{name} appears twice", name, text)
            params[name] = text
        elif name.lower().startswith("x-amz-"):
            amz[name.lower()] = text
    missing = [n for n in ("AWSAccessKeyId", "Expires", "Signature") if n not in params]
    if missing:
        raise s3errors.access_denied(
            f"Query-string authentication requires the {', '.join(missing)} parameters"
        )
    if not re.fullmatch(r"\d{1,12}", params["Expires"]):
        raise s3errors.invalid_argument("Expires is not a number", "Expires", params["Expires"])
    access_key = params["AWSAccessKeyId"]
    secret = secret_of(access_key)
    if secret is None:
        raise s3errors.invalid_access_key_id(access_key)
    expires = int(params["Expires"])
    if now > expires:
        raise s3errors.request_expired(_iso(expires), _iso(now))
    _verify_v2(req, access_key, params["Signature"], secret, params["Expires"], amz)
    return Auth(access_key, UNSIGNED_PAYLOAD, True, None)


def body_decoder(auth: Auth, headers: Mapping[str, str]) -> ChunkedDecoder | None:
    """The decoder of a request's aws-chunked body, None when its body is plain."""
    if auth.payload not in STREAMING_PAYLOADS:
        return None
    length_text = headers.get("x-amz-decoded-content-length")
    length = None
    if length_text is not None:
        if not re.fullmatch(r"\d{1,18}", length_text.strip()):
            raise s3errors.invalid_argument(
                "x-amz-decoded-content-length is not a number",
                "x-amz-decoded-content-length",
                length_text,
            )
        length = int(length_text)
    return ChunkedDecoder(auth.payload, auth.chunk_signer, length, trailer_names(headers))
