"""The gateway's HTTP rules without sockets: ranges, conditional requests, headers, pages."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p import httprules
from difs_p2p.errors import (
    BadNameError,
    DeletedError,
    DifsTimeoutError,
    IntegrityError,
    NetworkError,
    NotFoundError,
    RemoteNotFoundError,
)
from difs_p2p.httprules import (
    UNSATISFIABLE,
    Resource,
    answer,
    content_disposition,
    content_type,
    parse_ranges,
)

SIZE = 1000
ETAG = '"abc123"'
# 2026-01-01 00:00:00 UTC and a fraction: Last-Modified keeps whole seconds
CREATED = 1767225600.75
DATE = "Thu, 01 Jan 2026 00:00:00 GMT"
BEFORE = "Wed, 31 Dec 2025 23:59:59 GMT"
AFTER = "Thu, 01 Jan 2026 00:00:01 GMT"
RES = Resource("/t.com/clip.mp4", SIZE, ETAG, CREATED)


@pytest.mark.parametrize(
    ("header", "size", "expected"),
    [
        (None, SIZE, None),
        ("bytes=0-0", SIZE, [(0, 0)]),
        ("bytes=100-", SIZE, [(100, 999)]),
        ("bytes=-100", SIZE, [(900, 999)]),
        ("bytes=-5000", SIZE, [(0, 999)]),
        ("bytes=990-5000", SIZE, [(990, 999)]),
        ("BYTES = 1-2", SIZE, [(1, 2)]),
        ("bytes=0-1, 5-6", SIZE, [(0, 1), (5, 6)]),
        ("bytes=5-6,0-1", SIZE, [(0, 1), (5, 6)]),
        ("bytes=0-10,5-20", SIZE, [(0, 20)]),  # overlapping: coalesced
        ("bytes=0-4,5-9", SIZE, [(0, 9)]),  # adjacent: coalesced
        ("bytes=0-1,,2-3", SIZE, [(0, 3)]),  # empty list elements are allowed
        ("bytes=0-1,2000-3000", SIZE, [(0, 1)]),  # one satisfiable: never 416
        ("bytes=5-2", SIZE, None),  # invalid range-spec: ignored
        ("bytes=junk", SIZE, None),
        ("bytes=1-2-3", SIZE, None),
        ("bytes=-", SIZE, None),
        ("bytes=", SIZE, None),
        ("items=0-1", SIZE, None),
        ("0-1", SIZE, None),
        ("bytes=+1-2", SIZE, None),
        ("bytes=١-٢", SIZE, None),  # non-ASCII digits
        ("bytes=" + ",".join(["0-0"] * 65), SIZE, None),  # too many specs
        ("bytes=1000-", SIZE, UNSATISFIABLE),
        ("bytes=1000-2000,3000-", SIZE, UNSATISFIABLE),
        ("bytes=-0", SIZE, UNSATISFIABLE),
        ("bytes=0-", 0, UNSATISFIABLE),
        ("bytes=-5", 0, UNSATISFIABLE),
    ],
)
def test_range_parsing(header: str | None, size: int, expected: object) -> None:
    """Range headers give coalesced spans, 416, or are ignored (RFC 9110 14.1-14.2)."""
    assert parse_ranges(header, size) == expected


@given(st.text(max_size=200), st.integers(min_value=0, max_value=10**12))
def test_range_parser_never_raises_and_stays_inside(header: str, size: int) -> None:
    """Any header: no exception, every span inside the object, sorted and disjoint."""
    got = parse_ranges("bytes=" + header, size)
    if isinstance(got, list):
        assert got
        for first, last in got:
            assert 0 <= first <= last < size
        for (_, a_last), (b_first, _) in itertools.pairwise(got):
            assert a_last + 1 < b_first


@given(
    st.lists(
        st.tuples(st.integers(0, 2000), st.one_of(st.none(), st.integers(0, 2000))),
        min_size=1,
        max_size=20,
    ),
    st.integers(1, 1500),
)
def test_range_parser_covers_exactly_what_was_asked(
    specs: list[tuple[int, int | None]], size: int
) -> None:
    """The coalesced spans cover exactly the bytes of the valid ranges inside the object."""
    specs = [(a, b) for a, b in specs if b is None or b >= a]
    if not specs:
        return
    header = "bytes=" + ",".join(f"{a}-{'' if b is None else b}" for a, b in specs)
    wanted = {
        i for a, b in specs for i in range(a, min(size - 1 if b is None else b, size - 1) + 1)
    }
    got = parse_ranges(header, size)
    if not wanted:
        assert got is UNSATISFIABLE
    else:
        assert isinstance(got, list)
        assert {i for a, b in got for i in range(a, b + 1)} == wanted


def _answer(method: str = "GET", res: Resource = RES, **headers: str) -> httprules.Answer:
    return answer(method, {k.replace("_", "-"): v for k, v in headers.items()}, res, "BOUND")


@pytest.mark.parametrize(
    ("method", "headers", "status"),
    [
        ("GET", {}, 200),
        ("HEAD", {}, 200),
        ("GET", {"Range": "bytes=0-0"}, 206),
        ("HEAD", {"Range": "bytes=0-0"}, 200),  # Range is defined for GET only
        ("GET", {"Range": "bytes=2000-"}, 416),
        ("GET", {"Range": "bytes=5-2"}, 200),
        ("GET", {"If-None-Match": ETAG}, 304),
        ("HEAD", {"If-None-Match": ETAG}, 304),
        ("GET", {"If-None-Match": f"W/{ETAG}"}, 304),  # weak comparison
        ("GET", {"If-None-Match": '"other", ' + ETAG}, 304),
        ("GET", {"If-None-Match": "*"}, 304),
        ("GET", {"If-None-Match": '"other"'}, 200),
        ("POST", {"If-None-Match": ETAG}, 412),
        ("GET", {"If-Match": ETAG}, 200),
        ("GET", {"If-Match": "*"}, 200),
        ("GET", {"If-Match": '"other"'}, 412),
        ("GET", {"If-Match": f"W/{ETAG}"}, 412),  # strong comparison
        ("GET", {"If-Match": "junk"}, 412),
        ("GET", {"If-Unmodified-Since": BEFORE}, 412),
        ("GET", {"If-Unmodified-Since": DATE}, 200),
        ("GET", {"If-Unmodified-Since": "not a date"}, 200),
        ("GET", {"If-Match": ETAG, "If-Unmodified-Since": BEFORE}, 200),  # If-Match first
        ("GET", {"If-Modified-Since": DATE}, 304),
        ("GET", {"If-Modified-Since": AFTER}, 304),
        ("GET", {"If-Modified-Since": BEFORE}, 200),
        ("GET", {"If-Modified-Since": "garbage"}, 200),
        ("GET", {"If-None-Match": '"other"', "If-Modified-Since": AFTER}, 200),
        ("GET", {"If-Match": '"other"', "If-None-Match": ETAG}, 412),  # 412 before 304
        ("GET", {"Range": "bytes=0-9", "If-Range": ETAG}, 206),
        ("GET", {"Range": "bytes=0-9", "If-Range": '"stale"'}, 200),
        ("GET", {"Range": "bytes=0-9", "If-Range": f"W/{ETAG}"}, 200),
        ("GET", {"Range": "bytes=0-9", "If-Range": DATE}, 200),
        ("GET", {"Range": "bytes=2000-", "If-Range": '"stale"'}, 200),
        ("GET", {"Range": "bytes=0-1,5-6"}, 206),
        ("GET", {"Range": "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(17))}, 200),
        ("GET", {"Range": "bytes=" + ",".join(f"{i * 10}-{i * 10}" for i in range(16))}, 206),
    ],
)
def test_status_follows_rfc_9110_order(method: str, headers: dict[str, str], status: int) -> None:
    """Preconditions in RFC 9110 13.2.2's order, then Range (If-Range strong only)."""
    assert answer(method, headers, RES, "B").status == status


def test_single_range_headers() -> None:
    """A 206 names its span in Content-Range and carries the representation headers."""
    got = _answer(Range="bytes=-100")
    assert got.spans == ((900, 999),)
    assert got.length == 100
    assert got.headers["Content-Range"] == "bytes 900-999/1000"
    assert got.headers["ETag"] == ETAG
    assert got.headers["Last-Modified"] == DATE
    assert got.headers["Accept-Ranges"] == "bytes"
    assert got.headers["Content-Type"] == "video/mp4"
    assert got.headers["X-Content-Type-Options"] == "nosniff"


def test_whole_and_empty_objects() -> None:
    """200 sends one span of the whole object; an empty object sends none."""
    assert _answer().spans == ((0, 999),)
    assert _answer().length == SIZE
    empty = Resource("/t.com/e", 0, ETAG, CREATED)
    assert _answer(res=empty).spans == ()
    assert _answer(res=empty).length == 0
    assert _answer(res=empty, Range="bytes=0-").status == 416


def test_unsatisfiable_and_not_modified_headers() -> None:
    """416 says bytes */N; 304 keeps the validators and cache headers, no body headers."""
    got = _answer(Range="bytes=5000-")
    assert got.headers["Content-Range"] == "bytes */1000"
    assert got.spans == ()
    not_modified = _answer(If_None_Match=ETAG)
    assert not_modified.headers["ETag"] == ETAG
    assert "Cache-Control" in not_modified.headers
    assert "Content-Type" not in not_modified.headers
    assert not_modified.spans == ()


def _split_multipart(body: bytes, boundary: str) -> list[tuple[dict[str, str], bytes]]:
    parts = []
    for chunk in body.split(b"--" + boundary.encode())[1:-1]:
        head, _, data = chunk.strip(b"\r\n").partition(b"\r\n\r\n")
        fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
        parts.append((fields, data))
    return parts


def test_multipart_framing() -> None:
    """Multi-range bodies frame each part with its type and range; the length is exact."""
    got = _answer(Range="bytes=10-19,500-509,0-4")
    assert got.status == 206
    assert got.headers["Content-Type"] == "multipart/byteranges; boundary=BOUND"
    assert got.spans == ((0, 4), (10, 19), (500, 509))
    content = bytes(i % 251 for i in range(SIZE))
    body = b""
    for i, (first, last) in enumerate(got.spans):
        body += httprules.part_head("BOUND", got.part_type, (first, last), SIZE, i == 0)
        body += content[first : last + 1]
    body += httprules.multipart_tail("BOUND")
    assert len(body) == got.length
    parts = _split_multipart(body, "BOUND")
    assert [p[0]["Content-Range"] for p in parts] == [
        "bytes 0-4/1000",
        "bytes 10-19/1000",
        "bytes 500-509/1000",
    ]
    assert all(p[0]["Content-Type"] == "video/mp4" for p in parts)
    assert [p[1] for p in parts] == [content[0:5], content[10:20], content[500:510]]
    assert body.endswith(b"--BOUND--\r\n")


def test_cache_headers_by_version() -> None:
    """?version=N is immutable for a year; the newest version is cached 10 s."""
    pinned = Resource("/t.com/a", 1, ETAG, CREATED, pinned=True)
    assert _answer(res=pinned).headers["Cache-Control"] == "public, max-age=31536000, immutable"
    assert _answer().headers["Cache-Control"] == "public, max-age=10"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/t.com/a.mp4", "video/mp4"),
        ("/t.com/A.MP4", "video/mp4"),
        ("/t.com/a.webm", "video/webm"),
        ("/t.com/a.m3u8", "application/vnd.apple.mpegurl"),
        ("/t.com/a.html", "text/html"),
        ("/t.com/a.png", "image/png"),
        ("/t.com/a.json", "application/json"),
        ("/t.com/a.unknownext", "application/octet-stream"),
        ("/t.com/noext", "application/octet-stream"),
        ("/t.com/.hidden", "application/octet-stream"),
        ("/t.com/dir.mp4/file", "application/octet-stream"),
    ],
)
def test_content_type_from_extension(name: str, expected: str) -> None:
    """The type comes from the last component's extension; unknown is octet-stream."""
    assert content_type(name) == expected


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("/t.com/a.mp4", "inline; filename=\"a.mp4\"; filename*=UTF-8''a.mp4"),
        (
            "/t.com/vidéo été.mp4",
            "inline; filename=\"vid_o _t_.mp4\"; filename*=UTF-8''vid%C3%A9o%20%C3%A9t%C3%A9.mp4",
        ),
        (
            '/t.com/say "hi".txt',
            "inline; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt",
        ),
        ("/t.com/a\\b", "inline; filename=\"a_b\"; filename*=UTF-8''a%5Cb"),
        ("/t.com/100%.txt", "inline; filename=\"100_.txt\"; filename*=UTF-8''100%25.txt"),
        ("/t.com/日本", "inline; filename=\"__\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC"),
    ],
)
def test_content_disposition_escapes(name: str, expected: str) -> None:
    """RFC 6266/8187: an ASCII fallback without quotes, and the exact name UTF-8 encoded."""
    assert content_disposition(name) == expected


@pytest.mark.parametrize(
    ("exc", "status", "retry"),
    [
        (BadNameError("bad"), 400, False),
        (DeletedError("gone"), 410, False),
        (NotFoundError("no"), 404, False),
        (RemoteNotFoundError(4, "no"), 404, False),
        (DifsTimeoutError("slow"), 504, True),
        (TimeoutError(), 504, True),
        (NetworkError("down"), 502, True),
        (IntegrityError("bad copy"), 502, True),
        (ValueError("bug"), 500, False),
    ],
)
def test_error_status(exc: BaseException, status: int, retry: bool) -> None:
    """Each error class maps to one status; 502/503/504 carry Retry-After."""
    assert httprules.error_status(exc) == status
    assert httprules.retry_after(status) is retry


@pytest.mark.parametrize(
    ("accept", "fmt", "expected"),
    [
        (None, None, False),
        ("text/html,application/xhtml+xml,*/*;q=0.8", None, False),
        ("application/json", None, True),
        ("application/json, text/html;q=0.5", None, True),
        ("text/html, application/json;q=0.5", None, False),
        ("*/*", None, False),
        ("application/json;q=0", None, False),
        ("application/json;q=junk", None, False),
        ("text/html", "json", True),
        ("application/json", "html", False),
    ],
)
def test_json_or_html(accept: str | None, fmt: str | None, expected: bool) -> None:
    """?format= decides; else Accept must prefer application/json to HTML."""
    assert httprules.wants_json(accept, fmt) is expected


def test_error_bodies() -> None:
    """Error bodies are one text line or a JSON object."""
    body, ctype = httprules.error_body(404, "/t.com/a is not published", False)
    assert body == b"404 /t.com/a is not published\n"
    assert ctype.startswith("text/plain")
    body, ctype = httprules.error_body(404, "x", True)
    assert json.loads(body) == {"status": 404, "error": "x"}
    assert ctype == "application/json"


@dataclass(frozen=True)
class _Entry:
    name: str
    folder: bool
    size: int = 0
    version: int = 0
    created: float = 0.0
    publisher: bytes = b""


ENTRIES = [
    _Entry("/t.com/<script>/", True),
    _Entry('/t.com/a "b".mp4', False, 1234, 2, CREATED, b"\x01\x02"),
]


def test_directory_html_escapes() -> None:
    """Names are escaped in text and links; sizes, dates and the next link are shown."""
    page = httprules.directory_html("/t.com/", ENTRIES, "tok/en")
    assert "<script>" not in page
    assert '<a href="%3Cscript%3E/">&lt;script&gt;/</a>' in page
    assert '<a href="a%20%22b%22.mp4">a &quot;b&quot;.mp4</a>' in page
    assert "<td>1234</td>" in page and DATE in page
    assert '<a href="?after=tok%2Fen">next page</a>' in page
    assert '<a href="../">' in page


def test_directory_json() -> None:
    """The JSON page lists children with sizes, versions and the next token."""
    page = httprules.directory_json("/t.com/", ENTRIES, None)
    assert page["next"] is None
    assert page["entries"][0] == {
        "name": "<script>/",
        "path": "/t.com/<script>/",
        "folder": True,
        "size": None,
        "version": None,
        "created": None,
        "publisher": None,
    }
    assert page["entries"][1]["size"] == 1234
    assert page["entries"][1]["publisher"] == "0102"
    json.dumps(page)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (DATE, 1767225600),
        ("Thursday, 01-Jan-26 00:00:00 GMT", 1767225600),
        ("Thu Jan  1 00:00:00 2026", 1767225600),
        ("", None),
        ("yesterday", None),
        ("Thu, 99 Foo 2026 99:99:99 GMT", None),
    ],
)
def test_http_dates(text: str, seconds: int | None) -> None:
    """The three HTTP date forms parse; anything else is no date (the header is ignored)."""
    assert httprules.parse_date(text) == seconds


@pytest.mark.parametrize(
    ("state", "status"), [("ok", 200), ("thin", 503), ("isolated", 503), ("", 503)]
)
def test_health(state: str, status: int) -> None:
    """/healthz is 200 only while the network state is ok; the body names the state."""
    assert httprules.health(state) == (status, f"{state}\n")
