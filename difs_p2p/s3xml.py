"""The S3 API's pure parts: XML documents out, request bodies in, and the key mapping.

Nothing here does I/O; ``s3api`` (the aiohttp server) calls these and moves the bytes.

**Key mapping.** A path-style S3 address ``/<bucket>/<key>`` is the DIFS name
``/<bucket>/<escaped key>``: the bucket is the name's first component, the key the rest.
S3 keys are any UTF-8 up to 1,024 bytes; DIFS names have no empty, ``.`` or ``..``
component and no reserved ``@claim``. So each ``/``-separated component of the key is
escaped, reversibly (:func:`escape_component`)::

    "%"      -> "%25"   (every percent sign: so that "%" in a name always starts an escape)
    ""       -> "%2F"   (an empty component: "a//b", a trailing "/" folder marker "dir/")
    "."      -> "%2E"
    ".."     -> "%2E%2E"
    "@claim" -> "%40claim"

and every other component is kept as is, so a name with no such component reads the same
in DIFS and in S3 and keeps its UTF-8 byte order in listings. Keys that cannot round-trip
are refused: not NFC (DIFS normalizes names, so the listing would return another key),
control characters or U+2028/U+2029 (InvalidArgument), over 1,024 bytes of name with the
bucket, a component over 255 bytes or more than 63 components after escaping
(KeyTooLongError). Bucket names follow S3's rules (3-63 characters of lower-case letters,
digits, dots and hyphens, starting and ending with a letter or digit, not an IP address);
``key`` is refused too: ``/key/<fp>/`` names belong to their key.

**XML parsing** uses expat directly with no DTD allowed: a document type declaration
(hence any entity) is refused before anything is expanded, and bodies are bounded by the
caller (:data:`MAX_BODY`).

The module is longer than most (about 730 lines): S3 has a dozen result documents, each a
short function here, and they share one small writer and the key mapping their keys pass
through; splitting them would only spread one vocabulary over several files.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from urllib.parse import quote
from xml.parsers import expat
from xml.sax.saxutils import escape

from difs_p2p.classgen import field, valueclass
from difs_p2p.names import (
    CLAIM,
    KEY_NAMESPACE,
    MAX_COMPONENT_BYTES,
    MAX_COMPONENTS,
    MAX_NAME_BYTES,
)
from difs_p2p.s3errors import S3Error

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
# Request bodies parsed here (Delete of 1,000 keys of 1,024 bytes, CompleteMultipartUpload
# of 10,000 parts) stay well under this.
MAX_BODY = 2 * 1024 * 1024
# Keys one DeleteObjects request may name (S3's limit).
MAX_DELETE = 1000
# Parts of one multipart upload (S3's limit).
MAX_PARTS = 10000
# S3's longest key, in UTF-8 bytes.
MAX_KEY_BYTES = 1024

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_ESCAPES = {"": "%2F", ".": "%2E", "..": "%2E%2E", CLAIM: "%40claim"}
_UNESCAPES = {v: k for k, v in _ESCAPES.items()}
_SEPARATORS = frozenset("\u2028\u2029")


# -- key mapping ---------------------------------------------------------------------------


def bucket_problem(bucket: str) -> str | None:
    """Why ``bucket`` is not a valid bucket name, or None."""
    if not _BUCKET.fullmatch(bucket):
        return (
            "bucket names are 3-63 characters of lower-case letters, digits, dots and "
            "hyphens, starting and ending with a letter or digit"
        )
    if ".." in bucket or ".-" in bucket or "-." in bucket:
        return "bucket names have no '..', '.-' or '-.'"
    if _IPV4.fullmatch(bucket):
        return "bucket names are not IP addresses"
    if bucket == KEY_NAMESPACE:
        return f"{KEY_NAMESPACE!r} is reserved for names owned by their key"
    return None


def check_bucket(bucket: str) -> str:
    """``bucket``, or S3Error InvalidBucketName."""
    problem = bucket_problem(bucket)
    if problem is not None:
        raise S3Error(
            "InvalidBucketName", f"{bucket[:80]!r}: {problem}", 400, {"BucketName": bucket[:255]}
        )
    return bucket


def escape_component(part: str) -> str:
    """One key component as a DIFS name component (see the module docstring)."""
    special = _ESCAPES.get(part)
    if special is not None:
        return special
    return part.replace("%", "%25")


def unescape_component(part: str) -> str:
    """The key component a DIFS name component stands for (inverse of escape_component)."""
    special = _UNESCAPES.get(part)
    if special is not None:
        return special
    return part.replace("%25", "%")


def key_problem(key: str) -> S3Error | None:
    """Why ``key`` cannot be stored as a DIFS name (before escaping), or None."""
    if not key:
        return S3Error("InvalidArgument", "the key is empty", 400, {})
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_BYTES:
        return S3Error("KeyTooLongError", "Your key is too long", 400, {})
    for ch in key:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Cs") or ch in _SEPARATORS:
            return S3Error(
                "InvalidArgument", f"the key has a control character {ch!r}: not stored", 400, {}
            )
    if unicodedata.normalize("NFC", key) != key:
        return S3Error(
            "InvalidArgument",
            "the key is not in Unicode normal form C (NFC): DIFS names are, so it would "
            "not be listed as written",
            400,
            {},
        )
    return None


def object_name(bucket: str, key: str) -> str:
    """The DIFS name of ``key`` in ``bucket``; S3Error when it cannot be one."""
    check_bucket(bucket)
    problem = key_problem(key)
    if problem is not None:
        raise problem
    parts = [escape_component(p) for p in key.split("/")]
    name = f"/{bucket}/" + "/".join(parts)
    too_long = (
        len(name.encode()) > MAX_NAME_BYTES
        or len(parts) + 1 > MAX_COMPONENTS
        or any(len(p.encode()) > MAX_COMPONENT_BYTES for p in parts)
    )
    if too_long:
        raise S3Error(
            "KeyTooLongError",
            f"Your key is too long: DIFS names hold {MAX_NAME_BYTES} bytes with the bucket "
            f"and escapes, {MAX_COMPONENT_BYTES} bytes per '/'-separated part and "
            f"{MAX_COMPONENTS - 1} parts",
            400,
            {},
        )
    return name


def key_of(bucket: str, name: str) -> str:
    """The S3 key of the DIFS name ``name`` in ``bucket`` (a folder's, ending with '/',
    gives a common prefix ending with '/'). ValueError if it is not under the bucket."""
    head = f"/{bucket}/"
    if not name.startswith(head):
        raise ValueError(f"{name!r} is not in bucket {bucket!r}")
    rest = name[len(head) :]
    folder = rest.endswith("/")
    parts = rest[:-1].split("/") if folder else rest.split("/")
    key = "/".join(unescape_component(p) for p in parts)
    return key + "/" if folder else key


def prefix_folder(bucket: str, prefix: str) -> str:
    """The deepest DIFS folder holding every key that starts with ``prefix``: its
    complete components (``a/b/c`` -> ``/bucket/a/b``)."""
    complete = prefix.split("/")[:-1]
    if not complete:
        return f"/{bucket}"
    return f"/{bucket}/" + "/".join(escape_component(p) for p in complete)


# -- listing -------------------------------------------------------------------------------


@valueclass
class Item:
    """One object in a listing or a version listing."""

    key: str
    size: int
    modified: float
    etag: str | None = None
    version_id: str | None = None
    latest: bool = True
    delete_marker: bool = False


@valueclass(frozen=False)
class Listing:
    """What a ListObjects request found: objects, common prefixes, and where it stopped."""

    items: list[Item] = field(default_factory=list)
    prefixes: list[str] = field(default_factory=list)
    truncated: bool = False
    # the last key or common prefix taken (V1's NextMarker)
    last: str | None = None
    # the DIFS name to continue after (V2's continuation token)
    resume: str | None = None


class Grouper:
    """Rolls keys up into common prefixes and stops at ``max_keys`` (the pure part of
    ListObjects): feed keys in order with :meth:`add` until it returns False."""

    def __init__(self, prefix: str, delimiter: str, max_keys: int, skip: str | None = None) -> None:
        self.prefix = prefix
        self.delimiter = delimiter
        self.max_keys = max_keys
        # keys under this common prefix are left out (V1 marker at a common prefix)
        self.skip = skip
        self.out = Listing()

    def _group(self, key: str) -> str | None:
        if not self.delimiter:
            return None
        at = key.find(self.delimiter, len(self.prefix))
        return key[: at + len(self.delimiter)] if at >= 0 else None

    def add(self, item: Item, name: str) -> bool:
        """Take ``item`` (its DIFS name ``name``); False when the listing is full and
        ``item`` is not taken (the listing is then truncated; with ``max_keys`` 0 it is
        empty and not truncated, as in S3)."""
        out = self.out
        if self.max_keys == 0:
            return False  # S3: no keys and not truncated
        if not item.key.startswith(self.prefix):
            return True
        if self.skip is not None and item.key.startswith(self.skip):
            out.resume = name
            return True
        group = self._group(item.key)
        if group is not None and out.prefixes and out.prefixes[-1] == group:
            out.resume = name  # rolled up into the prefix already taken
            return True
        if len(out.items) + len(out.prefixes) >= self.max_keys:
            out.truncated = True
            return False
        if group is not None:
            out.prefixes.append(group)
            out.last = group
        else:
            out.items.append(item)
            out.last = item.key
        out.resume = name
        return True


# -- rendering -----------------------------------------------------------------------------


# What every document starts with; a slow answer sends it first, then spaces (XML allows
# white space between the declaration and the root element), then the rest.
XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>\n'


def after_declaration(document: bytes) -> bytes:
    """``document`` without its leading :data:`XML_DECLARATION` (sent already)."""
    return document.removeprefix(XML_DECLARATION)


class _Doc:
    """A tiny XML writer: elements with escaped text, in order."""

    def __init__(self) -> None:
        self.parts: list[str] = [XML_DECLARATION.decode()]

    def open(self, tag: str, ns: bool = False) -> None:
        self.parts.append(f'<{tag} xmlns="{NS}">' if ns else f"<{tag}>")

    def close(self, tag: str) -> None:
        self.parts.append(f"</{tag}>")

    def leaf(self, tag: str, text: object) -> None:
        if isinstance(text, bool):
            text = "true" if text else "false"
        self.parts.append(f"<{tag}>{escape(str(text))}</{tag}>")

    def leaves(self, pairs: Iterable[tuple[str, object]]) -> None:
        for tag, text in pairs:
            if text is not None:
                self.leaf(tag, text)

    def bytes(self) -> bytes:
        return "".join(self.parts).encode("utf-8")


def timestamp(t: float) -> str:
    """ISO 8601 in UTC with milliseconds, as S3 writes them: 2026-12-06T08:00:00.000Z."""
    return (
        datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.")
        + f"{int(t * 1000) % 1000:03d}Z"
    )


def http_date(t: float) -> str:
    """An HTTP date (Last-Modified): Sun, 06 Dec 2026 08:00:00 GMT."""
    return datetime.fromtimestamp(t, UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")


def _enc(text: str, url: bool) -> str:
    """``text`` as listed: URL-encoded with ``encoding-type=url`` (S3 keeps '/')."""
    return quote(text, safe="/") if url else text


def _owner(doc: _Doc, owner_id: str, name: str, tag: str = "Owner") -> None:
    """An ``Owner`` (or ``Initiator``) element: ID and DisplayName."""
    doc.open(tag)
    doc.leaf("ID", owner_id)
    doc.leaf("DisplayName", name)
    doc.close(tag)


def error_xml(
    code: str, message: str, resource: str, request_id: str, extra: dict[str, str]
) -> bytes:
    """An S3 ``Error`` document."""
    doc = _Doc()
    doc.open("Error")
    doc.leaf("Code", code)
    doc.leaf("Message", message)
    for tag, text in extra.items():
        doc.leaf(tag, text)
    doc.leaf("Resource", resource)
    doc.leaf("RequestId", request_id)
    doc.close("Error")
    return doc.bytes()


def list_buckets(owner_id: str, owner_name: str, buckets: Sequence[tuple[str, float]]) -> bytes:
    """ListAllMyBucketsResult: ``buckets`` as (name, creation time)."""
    doc = _Doc()
    doc.open("ListAllMyBucketsResult", ns=True)
    _owner(doc, owner_id, owner_name)
    doc.open("Buckets")
    for name, created in buckets:
        doc.open("Bucket")
        doc.leaf("Name", name)
        doc.leaf("CreationDate", timestamp(created))
        doc.close("Bucket")
    doc.close("Buckets")
    doc.close("ListAllMyBucketsResult")
    return doc.bytes()


def _contents(doc: _Doc, items: Iterable[Item], url: bool, owner: tuple[str, str] | None) -> None:
    for item in items:
        doc.open("Contents")
        doc.leaf("Key", _enc(item.key, url))
        doc.leaf("LastModified", timestamp(item.modified))
        if item.etag is not None:
            doc.leaf("ETag", item.etag)
        doc.leaf("Size", item.size)
        if owner is not None:
            _owner(doc, *owner)
        doc.leaf("StorageClass", "STANDARD")
        doc.close("Contents")


def _prefixes(doc: _Doc, prefixes: Iterable[str], url: bool) -> None:
    for p in prefixes:
        doc.open("CommonPrefixes")
        doc.leaf("Prefix", _enc(p, url))
        doc.close("CommonPrefixes")


@valueclass
class ListQuery:
    """A ListObjects request's parameters, as the client sent them."""

    bucket: str
    prefix: str = ""
    delimiter: str = ""
    max_keys: int = 1000
    url: bool = False
    marker: str = ""  # V1 marker / V2 start-after
    token: str | None = None  # V2 continuation token


def list_v1(q: ListQuery, found: Listing, owner: tuple[str, str]) -> bytes:
    """ListBucketResult (ListObjects version 1)."""
    doc = _Doc()
    doc.open("ListBucketResult", ns=True)
    doc.leaf("Name", q.bucket)
    doc.leaf("Prefix", _enc(q.prefix, q.url))
    doc.leaf("Marker", _enc(q.marker, q.url))
    doc.leaf("MaxKeys", q.max_keys)
    if q.delimiter:
        doc.leaf("Delimiter", _enc(q.delimiter, q.url))
    if q.url:
        doc.leaf("EncodingType", "url")
    doc.leaf("IsTruncated", found.truncated)
    if found.truncated and q.delimiter and found.last is not None:
        doc.leaf("NextMarker", _enc(found.last, q.url))
    _contents(doc, found.items, q.url, owner)
    _prefixes(doc, found.prefixes, q.url)
    doc.close("ListBucketResult")
    return doc.bytes()


def list_v2(
    q: ListQuery, found: Listing, next_token: str | None, owner: tuple[str, str] | None
) -> bytes:
    """ListBucketResult (ListObjectsV2)."""
    doc = _Doc()
    doc.open("ListBucketResult", ns=True)
    doc.leaf("Name", q.bucket)
    doc.leaf("Prefix", _enc(q.prefix, q.url))
    doc.leaf("KeyCount", len(found.items) + len(found.prefixes))
    doc.leaf("MaxKeys", q.max_keys)
    if q.delimiter:
        doc.leaf("Delimiter", _enc(q.delimiter, q.url))
    if q.url:
        doc.leaf("EncodingType", "url")
    doc.leaf("IsTruncated", found.truncated)
    if q.token is not None:
        doc.leaf("ContinuationToken", q.token)
    if next_token is not None:
        doc.leaf("NextContinuationToken", next_token)
    if q.marker:
        doc.leaf("StartAfter", _enc(q.marker, q.url))
    _contents(doc, found.items, q.url, owner)
    _prefixes(doc, found.prefixes, q.url)
    doc.close("ListBucketResult")
    return doc.bytes()


def list_versions(
    q: ListQuery,
    found: Listing,
    next_key: str | None,
    next_version: str | None,
    version_marker: str,
    owner: tuple[str, str],
) -> bytes:
    """ListVersionsResult: objects' versions, newest first per key, and delete markers."""
    doc = _Doc()
    doc.open("ListVersionsResult", ns=True)
    doc.leaf("Name", q.bucket)
    doc.leaf("Prefix", _enc(q.prefix, q.url))
    doc.leaf("KeyMarker", _enc(q.marker, q.url))
    doc.leaf("VersionIdMarker", version_marker)
    doc.leaf("MaxKeys", q.max_keys)
    if q.delimiter:
        doc.leaf("Delimiter", _enc(q.delimiter, q.url))
    if q.url:
        doc.leaf("EncodingType", "url")
    doc.leaf("IsTruncated", found.truncated)
    if next_key is not None:
        doc.leaf("NextKeyMarker", _enc(next_key, q.url))
    if next_version is not None:
        doc.leaf("NextVersionIdMarker", next_version)
    for item in found.items:
        tag = "DeleteMarker" if item.delete_marker else "Version"
        doc.open(tag)
        doc.leaf("Key", _enc(item.key, q.url))
        doc.leaf("VersionId", item.version_id or "null")
        doc.leaf("IsLatest", item.latest)
        doc.leaf("LastModified", timestamp(item.modified))
        if not item.delete_marker:
            if item.etag is not None:
                doc.leaf("ETag", item.etag)
            doc.leaf("Size", item.size)
            doc.leaf("StorageClass", "STANDARD")
        _owner(doc, *owner)
        doc.close(tag)
    _prefixes(doc, found.prefixes, q.url)
    doc.close("ListVersionsResult")
    return doc.bytes()


def copy_result(tag: str, etag: str, modified: float) -> bytes:
    """CopyObjectResult (``tag``) or CopyPartResult: the new object's ETag and time."""
    doc = _Doc()
    doc.open(tag, ns=True)
    doc.leaf("LastModified", timestamp(modified))
    doc.leaf("ETag", etag)
    doc.close(tag)
    return doc.bytes()


@valueclass
class Deleted:
    """One key of a DeleteObjects answer: deleted, or its error."""

    key: str
    version_id: str | None = None
    code: str | None = None
    message: str = ""
    delete_marker: bool = False


def delete_result(results: Sequence[Deleted], quiet: bool) -> bytes:
    """DeleteResult: quiet mode lists only the errors."""
    doc = _Doc()
    doc.open("DeleteResult", ns=True)
    for r in results:
        if r.code is None:
            if quiet:
                continue
            doc.open("Deleted")
            doc.leaf("Key", r.key)
            doc.leaves([("VersionId", r.version_id)])
            if r.delete_marker:
                doc.leaf("DeleteMarker", True)
            doc.close("Deleted")
        else:
            doc.open("Error")
            doc.leaf("Key", r.key)
            doc.leaves([("VersionId", r.version_id)])
            doc.leaf("Code", r.code)
            doc.leaf("Message", r.message)
            doc.close("Error")
    doc.close("DeleteResult")
    return doc.bytes()


def initiate_multipart(bucket: str, key: str, upload_id: str) -> bytes:
    """InitiateMultipartUploadResult."""
    doc = _Doc()
    doc.open("InitiateMultipartUploadResult", ns=True)
    doc.leaves([("Bucket", bucket), ("Key", key), ("UploadId", upload_id)])
    doc.close("InitiateMultipartUploadResult")
    return doc.bytes()


def complete_multipart(location: str, bucket: str, key: str, etag: str) -> bytes:
    """CompleteMultipartUploadResult."""
    doc = _Doc()
    doc.open("CompleteMultipartUploadResult", ns=True)
    doc.leaves([("Location", location), ("Bucket", bucket), ("Key", key), ("ETag", etag)])
    doc.close("CompleteMultipartUploadResult")
    return doc.bytes()


@valueclass
class PartRow:
    """One uploaded part as ListParts shows it."""

    number: int
    etag: str
    size: int
    modified: float


def list_parts(
    bucket: str,
    key: str,
    upload_id: str,
    parts: Sequence[PartRow],
    marker: int,
    max_parts: int,
    truncated: bool,
    owner: tuple[str, str],
) -> bytes:
    """ListPartsResult."""
    doc = _Doc()
    doc.open("ListPartsResult", ns=True)
    doc.leaves([("Bucket", bucket), ("Key", key), ("UploadId", upload_id)])
    _owner(doc, *owner, tag="Initiator")
    _owner(doc, *owner)
    doc.leaf("StorageClass", "STANDARD")
    doc.leaf("PartNumberMarker", marker)
    if parts:
        doc.leaf("NextPartNumberMarker", parts[-1].number)
    doc.leaf("MaxParts", max_parts)
    doc.leaf("IsTruncated", truncated)
    for p in parts:
        doc.open("Part")
        doc.leaf("PartNumber", p.number)
        doc.leaf("LastModified", timestamp(p.modified))
        doc.leaf("ETag", p.etag)
        doc.leaf("Size", p.size)
        doc.close("Part")
    doc.close("ListPartsResult")
    return doc.bytes()


@valueclass
class UploadRow:
    """One multipart upload under way as ListMultipartUploads shows it."""

    key: str
    upload_id: str
    initiated: float


def list_uploads(
    bucket: str, prefix: str, uploads: Sequence[UploadRow], max_uploads: int, owner: tuple[str, str]
) -> bytes:
    """ListMultipartUploadsResult (never truncated: at most ``max_uploads`` are given)."""
    doc = _Doc()
    doc.open("ListMultipartUploadsResult", ns=True)
    doc.leaves([("Bucket", bucket), ("KeyMarker", ""), ("UploadIdMarker", "")])
    doc.leaf("Prefix", prefix)
    doc.leaf("MaxUploads", max_uploads)
    doc.leaf("IsTruncated", False)
    for u in uploads:
        doc.open("Upload")
        doc.leaves([("Key", u.key), ("UploadId", u.upload_id)])
        _owner(doc, *owner, tag="Initiator")
        _owner(doc, *owner)
        doc.leaf("StorageClass", "STANDARD")
        doc.leaf("Initiated", timestamp(u.initiated))
        doc.close("Upload")
    doc.close("ListMultipartUploadsResult")
    return doc.bytes()


def versioning(status: str) -> bytes:
    """VersioningConfiguration with ``status`` (Enabled: DIFS keeps every version)."""
    doc = _Doc()
    doc.open("VersioningConfiguration", ns=True)
    doc.leaf("Status", status)
    doc.close("VersioningConfiguration")
    return doc.bytes()


def location(region: str) -> bytes:
    """LocationConstraint (empty for us-east-1, as S3 answers)."""
    doc = _Doc()
    doc.parts.append(f'<LocationConstraint xmlns="{NS}">{escape(region)}</LocationConstraint>')
    return doc.bytes()


# -- parsing -------------------------------------------------------------------------------


@valueclass(frozen=False)
class Node:
    """A parsed element: its local tag (namespace dropped), text and children."""

    tag: str
    text: str = ""
    children: list[Node] = field(default_factory=list)

    def find(self, tag: str) -> Node | None:
        return next((c for c in self.children if c.tag == tag), None)

    def all(self, tag: str) -> list[Node]:
        return [c for c in self.children if c.tag == tag]

    def value(self, tag: str) -> str | None:
        child = self.find(tag)
        return None if child is None else child.text


def _malformed(message: str) -> S3Error:
    return S3Error("MalformedXML", f"The XML you provided was not well-formed: {message}", 400, {})


def parse(body: bytes) -> Node:
    """The element tree of ``body``; MalformedXML if it is not well-formed XML, has a
    document type declaration (and so entities) or is over :data:`MAX_BODY`."""
    if len(body) > MAX_BODY:
        raise _malformed(f"over {MAX_BODY} bytes")
    parser = expat.ParserCreate(namespace_separator="}")
    stack: list[Node] = []
    root: list[Node] = []

    def doctype(*_: object) -> None:
        raise _malformed("document type declarations are not accepted")

    def start(tag: str, _attrs: dict[str, str]) -> None:
        node = Node(tag.rpartition("}")[2])
        if stack:
            stack[-1].children.append(node)
        elif root:
            raise _malformed("more than one root element")
        else:
            root.append(node)
        if len(stack) > 16:
            raise _malformed("nested too deep")
        stack.append(node)

    def end(_tag: str) -> None:
        stack.pop()

    def chars(text: str) -> None:
        if stack:
            stack[-1].text += text

    parser.StartDoctypeDeclHandler = doctype
    parser.EntityDeclHandler = doctype
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise _malformed(str(exc)) from None
    if not root:
        raise _malformed("no root element")
    return root[0]


def parse_delete(body: bytes) -> tuple[bool, list[tuple[str, str | None]]]:
    """A DeleteObjects body: (quiet, [(key, version id or None)])."""
    root = parse(body)
    if root.tag != "Delete":
        raise _malformed("the root element is not Delete")
    quiet = (root.value("Quiet") or "").strip().lower() == "true"
    out: list[tuple[str, str | None]] = []
    for obj in root.all("Object"):
        key = obj.value("Key")
        if key is None:
            raise _malformed("an Object has no Key")
        version = obj.value("VersionId")
        out.append((key, version.strip() if version is not None else None))
    if not out or len(out) > MAX_DELETE:
        raise _malformed(f"Delete names 1 to {MAX_DELETE} objects, not {len(out)}")
    return quiet, out


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """A CompleteMultipartUpload body: [(part number, ETag without quotes)] as given."""
    root = parse(body)
    if root.tag != "CompleteMultipartUpload":
        raise _malformed("the root element is not CompleteMultipartUpload")
    out: list[tuple[int, str]] = []
    for part in root.all("Part"):
        number = (part.value("PartNumber") or "").strip()
        etag = (part.value("ETag") or "").strip().strip('"')
        if not (number.isascii() and number.isdigit()) or len(number) > 5:
            raise _malformed(f"bad PartNumber {number[:16]!r}")
        out.append((int(number), etag))
    if not out or len(out) > MAX_PARTS:
        raise _malformed(f"CompleteMultipartUpload names 1 to {MAX_PARTS} parts, not {len(out)}")
    return out
