"""The HTTP gateway's decisions, without I/O: what to answer a GET or HEAD of an object.

Pure functions of (method, request headers, the object's size, ETag and date), in the order
of RFC 9110 section 13.2.2:

1. ``If-Match`` (strong comparison; ``*`` matches any object) fails: 412;
2. else ``If-Unmodified-Since`` (a valid date) before the object's date: 412;
3. ``If-None-Match`` (weak comparison) matches: 304 for GET and HEAD (412 otherwise);
4. else, for GET and HEAD, ``If-Modified-Since`` (a valid date) not before the object's
   date: 304;
5. a GET with ``Range`` and ``If-Range``: the range counts only if ``If-Range`` is the
   object's current strong ETag (a date, a weak or a stale ETag: 200 with the whole body);
6. ``Range`` on a GET (ignored on HEAD, RFC 9110 14.2): one satisfiable range, 206 with
   ``Content-Range``; several, 206 ``multipart/byteranges`` (overlapping and adjacent
   ranges coalesced; more than ``MAX_PARTS`` parts: 200 with the whole body); none
   satisfiable, 416 with ``Content-Range: bytes */N``; a malformed header is ignored.

The ETag is the manifest's record hash (strong: one manifest, one content; never the S3
ETag a manifest's metadata may carry: a DIFS ETag names one version record); the date is
the manifest's ``created`` time. Besides: the response headers (type from the manifest's
metadata, else from the extension, ``nosniff``, ``Content-Disposition`` after RFC
6266/8187, cache headers), the multipart framing, the status of each error, and the
directory page (HTML or JSON).
"""

from __future__ import annotations

import email.utils
import html
import json
import math
import mimetypes
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol
from urllib.parse import quote

from difs_p2p.classgen import valueclass
from difs_p2p.errors import (
    BadNameError,
    BusyError,
    DeletedError,
    DifsTimeoutError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    PeerError,
    PermissionDeniedError,
    UsageError,
)

# Parts of a multipart/byteranges answer before the gateway sends the whole body instead
# (RFC 9110 14.2: a server may ignore a Range with many small or overlapping ranges).
MAX_PARTS = 16
# Range specs read from one header before it is ignored as abusive (a header of thousands
# of ranges costs parsing and sorting; no player asks for more than a few).
MAX_SPECS = 64
# The longest Range header read (bytes); longer ones are ignored.
MAX_RANGE_HEADER = 4096
# ?version=N names content that never changes: cached for a year, immutable (RFC 8246).
IMMUTABLE = "public, max-age=31536000, immutable"
# The newest version may change with the next publish: caches check again after 10 s.
LATEST = "public, max-age=10"
# Seconds a client is told to wait before retrying a 502/503/504.
RETRY_AFTER = 5

# Types the standard table lacks or gets wrong for video players and browsers; the rest
# comes from Python's built-in table (not the host's /etc/mime.types, so every host agrees).
_TYPES = {
    ".mp4": "video/mp4",
    ".m4v": "video/mp4",
    ".m4s": "video/iso.segment",
    ".m4a": "audio/mp4",
    ".mov": "video/quicktime",
    ".webm": "video/webm",
    ".mkv": "video/x-matroska",
    ".ts": "video/mp2t",
    ".m3u8": "application/vnd.apple.mpegurl",
    ".mpd": "application/dash+xml",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
    ".opus": "audio/ogg",
    ".flac": "audio/flac",
    ".wav": "audio/wav",
    ".webp": "image/webp",
    ".avif": "image/avif",
    ".svg": "image/svg+xml",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".json": "application/json",
    ".wasm": "application/wasm",
    ".md": "text/markdown",
    ".txt": "text/plain",
}
_MIME = mimetypes.MimeTypes(filenames=())
DEFAULT_TYPE = "application/octet-stream"

Span = tuple[int, int]  # inclusive first and last byte


@valueclass
class Unsatisfiable:
    """A Range whose ranges all start past the object: 416."""


UNSATISFIABLE = Unsatisfiable()


def parse_ranges(header: str | None, size: int) -> list[Span] | Unsatisfiable | None:
    """The spans a ``Range`` header asks of an object of ``size`` bytes, coalesced and in
    order; ``UNSATISFIABLE`` when none has a byte of the object; None when the header is
    absent, malformed, not in bytes or abusive (ignored: the whole object). Never raises."""
    if header is None or len(header) > MAX_RANGE_HEADER:
        return None
    unit, sep, rest = header.partition("=")
    if not sep or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip() for s in rest.split(",")]
    specs = [s for s in specs if s]
    if not specs or len(specs) > MAX_SPECS:
        return None
    spans: list[Span] = []
    for spec in specs:
        first, dash, last = spec.partition("-")
        first, last = first.strip(), last.strip()
        if not dash or not (first or last) or not all(_digits(p) for p in (first, last) if p):
            return None
        if not first:  # suffix: the last N bytes
            n = int(last)
            if n > 0 and size > 0:
                spans.append((max(0, size - n), size - 1))
            continue
        start = int(first)
        end = int(last) if last else None
        if end is not None and end < start:
            return None  # an invalid range-spec: the header is ignored
        if start < size:
            spans.append((start, size - 1 if end is None else min(end, size - 1)))
    if not spans:
        return UNSATISFIABLE
    return coalesce(spans)


def _digits(text: str) -> bool:
    return text.isascii() and text.isdigit() and len(text) <= 20


def coalesce(spans: Iterable[Span]) -> list[Span]:
    """Spans sorted, overlapping and adjacent ones merged."""
    out: list[Span] = []
    for first, last in sorted(spans):
        if out and first <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], last))
        else:
            out.append((first, last))
    return out


# -- validators ------------------------------------------------------------------------------

_TAG = re.compile(r'\s*(W/)?"([\x21\x23-\x7e\x80-\xff]*)"\s*(?:,|$)')


def etag_of(manifest_hash: str) -> str:
    """The strong ETag of a version: its manifest record's hash, quoted."""
    return f'"{manifest_hash}"'


def parse_etags(header: str) -> list[tuple[bool, str]] | None:
    """The entity tags of an ``If-Match``/``If-None-Match`` list as (weak, opaque) pairs;
    None for ``*``; an empty list when malformed (matches nothing)."""
    text = header.strip()
    if text == "*":
        return None
    tags: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(text):
        if text[pos] in ", \t":
            pos += 1
            continue
        m = _TAG.match(text, pos)
        if m is None:
            return []
        tags.append((m.group(1) is not None, m.group(2)))
        pos = m.end()
    return tags


def _opaque(etag: str) -> str:
    return etag.strip('"')


def strong_match(header: str, etag: str) -> bool:
    """Whether ``If-Match`` matches ``etag`` (strong comparison: weak tags never match)."""
    tags = parse_etags(header)
    return tags is None or any(not weak and tag == _opaque(etag) for weak, tag in tags)


def weak_match(header: str, etag: str) -> bool:
    """Whether ``If-None-Match`` matches ``etag`` (weak comparison: W/ is disregarded)."""
    tags = parse_etags(header)
    return tags is None or any(tag == _opaque(etag) for _, tag in tags)


def parse_date(text: str) -> int | None:
    """An HTTP date (IMF-fixdate, RFC 850, asctime) as whole seconds; None if invalid."""
    try:
        parsed = email.utils.parsedate_tz(text.strip())
        if parsed is None:
            return None
        return int(email.utils.mktime_tz(parsed))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


def http_date(seconds: float) -> str:
    """``seconds`` since the epoch as an IMF-fixdate (whole seconds)."""
    return email.utils.formatdate(math.floor(seconds), usegmt=True)


def if_range_holds(header: str, etag: str) -> bool:
    """Whether ``If-Range`` lets the range count: only the current strong ETag does."""
    text = header.strip()
    return not text.startswith("W/") and text == etag


# -- the answer --------------------------------------------------------------------------------


@valueclass
class Resource:
    """What the rules know of the version served."""

    name: str
    size: int
    etag: str
    # the manifest's created time (seconds since the epoch)
    modified: float
    # ?version=N: content that never changes
    pinned: bool = False
    # the media type the publisher signed into the manifest (meta.content_type), if any
    media_type: str | None = None


@valueclass
class Answer:
    """What to send: the status, the headers, the byte spans of the body in order (none
    for 304, 412, 416; a HEAD sends the headers of a GET without its spans), the body's
    length and, for a multipart answer, its boundary."""

    status: int
    headers: dict[str, str]
    spans: tuple[Span, ...] = ()
    boundary: str = ""
    length: int = 0
    # the Content-Type of each multipart part
    part_type: str = ""
    # what a 412/416 body says (short text)
    reason: str = ""


def representation_headers(res: Resource) -> dict[str, str]:
    """The headers of every answer about ``res`` (200, 206, 304, 412, 416)."""
    return {
        "ETag": res.etag,
        "Last-Modified": http_date(res.modified),
        "Cache-Control": IMMUTABLE if res.pinned else LATEST,
        "Accept-Ranges": "bytes",
    }


def content_headers(res: Resource) -> dict[str, str]:
    """The headers that describe the body (not sent on 304)."""
    return {
        "Content-Type": res.media_type or content_type(res.name),
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": content_disposition(res.name),
    }


def answer(method: str, headers: Mapping[str, str], res: Resource, boundary: str) -> Answer:
    """The answer to a GET or HEAD of ``res`` (RFC 9110 13.2.2 and 14); ``headers`` are
    the request's (case-insensitive mapping); ``boundary`` separates multipart parts."""
    rep = representation_headers(res)
    get_or_head = method in ("GET", "HEAD")
    date = math.floor(res.modified)
    if_match = headers.get("If-Match")
    if if_match is not None:
        if not strong_match(if_match, res.etag):
            return Answer(412, rep, reason="If-Match does not name the current version")
    else:
        since = headers.get("If-Unmodified-Since")
        limit = parse_date(since) if since is not None else None
        if limit is not None and date > limit:
            return Answer(412, rep, reason="modified since If-Unmodified-Since")
    if_none = headers.get("If-None-Match")
    if if_none is not None:
        if weak_match(if_none, res.etag):
            if get_or_head:
                return Answer(304, rep)
            return Answer(412, rep, reason="If-None-Match names the current version")
    elif get_or_head:
        since = headers.get("If-Modified-Since")
        limit = parse_date(since) if since is not None else None
        if limit is not None and date <= limit:
            return Answer(304, rep)
    whole = {**rep, **content_headers(res)}
    full = Answer(200, whole, ((0, res.size - 1),) if res.size else (), length=res.size)
    range_header = headers.get("Range")
    if method != "GET" or range_header is None:
        return full
    if_range = headers.get("If-Range")
    if if_range is not None and not if_range_holds(if_range, res.etag):
        return full
    spans = parse_ranges(range_header, res.size)
    if spans is None or (isinstance(spans, list) and len(spans) > MAX_PARTS):
        return full
    if isinstance(spans, Unsatisfiable):
        return Answer(
            416,
            {**rep, "Content-Range": f"bytes */{res.size}"},
            reason=f"no range is inside the object ({res.size} bytes)",
        )
    if len(spans) == 1:
        first, last = spans[0]
        return Answer(
            206,
            {**whole, "Content-Range": f"bytes {first}-{last}/{res.size}"},
            (spans[0],),
            length=last - first + 1,
        )
    part_type = whole["Content-Type"]
    length = multipart_length(boundary, part_type, spans, res.size)
    return Answer(
        206,
        {**whole, "Content-Type": f"multipart/byteranges; boundary={boundary}"},
        tuple(spans),
        boundary=boundary,
        length=length,
        part_type=part_type,
    )


# -- multipart/byteranges --------------------------------------------------------------------


def part_head(boundary: str, part_type: str, span: Span, size: int, first: bool) -> bytes:
    """What precedes the bytes of one part (RFC 9110 14.6)."""
    lead = "" if first else "\r\n"
    return (
        f"{lead}--{boundary}\r\nContent-Type: {part_type}\r\n"
        f"Content-Range: bytes {span[0]}-{span[1]}/{size}\r\n\r\n"
    ).encode()


def multipart_tail(boundary: str) -> bytes:
    """What follows the last part."""
    return f"\r\n--{boundary}--\r\n".encode()


def multipart_length(boundary: str, part_type: str, spans: Sequence[Span], size: int) -> int:
    """The Content-Length of the multipart body of ``spans``."""
    total = len(multipart_tail(boundary))
    for i, span in enumerate(spans):
        total += len(part_head(boundary, part_type, span, size, i == 0))
        total += span[1] - span[0] + 1
    return total


# -- representation ----------------------------------------------------------------------------


def content_type(name: str) -> str:
    """The media type of ``name`` from its extension; ``application/octet-stream`` if
    unknown."""
    base = name.rsplit("/", 1)[-1]
    dot = base.rfind(".")
    if dot <= 0:
        return DEFAULT_TYPE
    ext = base[dot:].lower()
    return _TYPES.get(ext) or _MIME.types_map[1].get(ext) or DEFAULT_TYPE


# RFC 8187 attr-char: what filename* may carry unescaped besides letters and digits
_ATTR_SAFE = "!#$&+-.^_`|~"


def content_disposition(name: str) -> str:
    """``inline`` with the name's last component as the file name: an ASCII fallback
    (quotes, backslashes, controls and non-ASCII replaced by ``_``) and the exact UTF-8
    name in ``filename*`` (RFC 6266, RFC 8187)."""
    base = name.rstrip("/").rsplit("/", 1)[-1] or "download"
    fallback = "".join(c if " " <= c <= "~" and c not in '"\\%' else "_" for c in base)
    encoded = quote(base, safe=_ATTR_SAFE)
    return f"inline; filename=\"{fallback}\"; filename*=UTF-8''{encoded}"


# -- errors --------------------------------------------------------------------------------------

# Error class -> status, first match wins (subclasses before their bases).
ERROR_STATUS: list[tuple[type[BaseException], int]] = [
    (BadNameError, 400),
    (UsageError, 400),
    (DeletedError, 410),
    (NotFoundError, 404),
    (PermissionDeniedError, 403),
    (BusyError, 503),
    (DifsTimeoutError, 504),
    (TimeoutError, 504),
    (IntegrityError, 502),
    (NetworkError, 502),
    (PeerError, 502),
    (OSError, 502),
]


def error_status(exc: BaseException) -> int:
    """The status that answers ``exc`` (500 for an unexpected one)."""
    for cls, status in ERROR_STATUS:
        if isinstance(exc, cls):
            return status
    return 500


def retry_after(status: int) -> bool:
    """Whether an error status tells the client to retry (502, 503, 504)."""
    return status in (502, 503, 504)


def health(state: str) -> tuple[int, str]:
    """``/healthz``: 200 ``ok`` while the peer's network state is ``ok``; 503 with the
    state (``thin``, ``isolated``) otherwise, so a load balancer skips a cut-off peer."""
    return (200 if state == "ok" else 503), f"{state}\n"


def wants_json(accept: str | None, fmt: str | None = None) -> bool:
    """Whether the client asks for JSON (``?format=json``, or ``Accept`` preferring
    application/json over text/html)."""
    if fmt is not None:
        return fmt.lower() == "json"
    if not accept:
        return False
    best: dict[str, float] = {}
    for item in accept.split(","):
        kind, *params = (p.strip() for p in item.split(";"))
        q = 1.0
        for p in params:
            key, _, value = p.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        best[kind.lower()] = max(best.get(kind.lower(), 0.0), q)
    js = best.get("application/json", 0.0)
    return js > 0 and js >= max(best.get("text/html", 0.0), best.get("*/*", 0.0))


def error_body(status: int, message: str, as_json: bool) -> tuple[bytes, str]:
    """The body and content type of an error answer: one line of text, or JSON."""
    if as_json:
        return (
            json.dumps({"status": status, "error": message}).encode(),
            "application/json",
        )
    return f"{status} {message}\n".encode(), "text/plain; charset=utf-8"


# -- directory pages -------------------------------------------------------------------------


class Entry(Protocol):
    """One child of a listed prefix (the client's ListEntry)."""

    @property
    def name(self) -> str: ...
    @property
    def folder(self) -> bool: ...
    @property
    def size(self) -> int: ...
    @property
    def version(self) -> int: ...
    @property
    def created(self) -> float: ...
    @property
    def publisher(self) -> bytes: ...


def _child(prefix: str, name: str, folder: bool) -> str:
    """The entry's name relative to the listed prefix (folders end with /)."""
    rel = name[len(prefix) :] if name.startswith(prefix) else name.rsplit("/", 1)[-1]
    rel = rel.strip("/")
    return rel + "/" if folder else rel


def _href(text: str) -> str:
    return quote(text, safe="/-._~!$&'()*+,;=:@")


def directory_json(prefix: str, entries: Sequence[Entry], after: str | None) -> dict[str, Any]:
    """The JSON directory page of ``prefix``."""
    return {
        "prefix": prefix,
        "entries": [
            {
                "name": _child(prefix, e.name, e.folder),
                "path": e.name,
                "folder": e.folder,
                "size": None if e.folder else e.size,
                "version": None if e.folder else e.version,
                "created": None if e.folder else e.created,
                "publisher": None if e.folder else e.publisher.hex(),
            }
            for e in entries
        ],
        "next": after,
    }


def directory_html(prefix: str, entries: Sequence[Entry], after: str | None) -> str:
    """The HTML directory page of ``prefix``: escaped links, sizes, dates, a next link."""
    esc = html.escape
    rows = []
    if prefix.strip("/"):
        rows.append('<tr><td><a href="../">../</a></td><td></td><td></td></tr>')
    for e in entries:
        child = _child(prefix, e.name, e.folder)
        size = "" if e.folder else str(e.size)
        date = "" if e.folder else http_date(e.created)
        rows.append(
            f'<tr><td><a href="{esc(_href(child))}">{esc(child)}</a></td>'
            f"<td>{size}</td><td>{esc(date)}</td></tr>"
        )
    more = f'<p><a href="?after={esc(quote(after, safe=""))}">next page</a></p>' if after else ""
    title = esc(prefix)
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>Index of {title}</title></head><body>\n<h1>Index of {title}</h1>\n"
        "<table><tr><th>name</th><th>size</th><th>modified</th></tr>\n"
        + "\n".join(rows)
        + f"\n</table>\n{more}</body></html>\n"
    )
