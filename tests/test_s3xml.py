"""The S3 API's pure parts: key mapping, listing roll-up, XML out and request bodies in."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from difs_p2p import s3xml
from difs_p2p.names import normalize_name
from difs_p2p.s3errors import S3Error

NS = "{http://s3.amazonaws.com/doc/2006-03-01/}"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        ("izone.mp4", "/a.com/izone.mp4"),
        ("photos/2024/x.jpg", "/a.com/photos/2024/x.jpg"),
        ("a//b", "/a.com/a/%2F/b"),
        ("dir/", "/a.com/dir/%2F"),
        ("/lead", "/a.com/%2F/lead"),
        (".", "/a.com/%2E"),
        ("a/./../b", "/a.com/a/%2E/%2E%2E/b"),
        ("%", "/a.com/%25"),
        ("50%off", "/a.com/50%25off"),
        ("a%2Fb", "/a.com/a%252Fb"),
        ("%2F", "/a.com/%252F"),
        ("@claim", "/a.com/%40claim"),
        ("x/@claim/y", "/a.com/x/%40claim/y"),
        ("caf\u00e9 \u65e5\u672c", "/a.com/caf\u00e9 \u65e5\u672c"),
        ("...", "/a.com/..."),
    ],
)
def test_key_mapping_round_trips(key: str, name: str) -> None:
    """Every S3 key maps to a valid DIFS name and back to the same key."""
    assert s3xml.object_name("a.com", key) == name
    assert normalize_name(name) == name
    assert s3xml.key_of("a.com", name) == key


@pytest.mark.parametrize(
    ("key", "code"),
    [
        ("", "InvalidArgument"),
        ("cafe\u0301", "InvalidArgument"),  # not NFC
        ("a\x00b", "InvalidArgument"),
        ("a\nb", "InvalidArgument"),
        ("a\u2028b", "InvalidArgument"),
        ("x" * 1025, "KeyTooLongError"),
        (("x" * 200 + "/") * 5 + "x" * 15, "KeyTooLongError"),  # fits S3, not with "/a.com/"
        ("x" * 256, "KeyTooLongError"),  # one component over 255 bytes
        ("%" * 100, "KeyTooLongError"),  # 300 bytes once escaped
        ("/".join(["x"] * 64), "KeyTooLongError"),  # 65 components with the bucket
    ],
)
def test_keys_that_cannot_round_trip_are_refused(key: str, code: str) -> None:
    """Keys a listing could not return as written are refused with S3's code."""
    with pytest.raises(S3Error) as info:
        s3xml.object_name("a.com", key)
    assert info.value.code == code
    assert info.value.status == 400


@pytest.mark.parametrize(
    ("bucket", "ok"),
    [
        ("a.com", True),
        ("my-bucket-1", True),
        ("abc", True),
        ("ab", False),
        ("A.com", False),
        ("a_b", False),
        ("-abc", False),
        ("abc-", False),
        ("a..b", False),
        ("a.-b", False),
        ("192.168.1.1", False),
        ("key", False),
        ("x" * 63, True),
        ("x" * 64, False),
    ],
)
def test_bucket_names(bucket: str, ok: bool) -> None:
    """Bucket names follow S3's rules; 'key' is DIFS's self-certifying namespace."""
    assert (s3xml.bucket_problem(bucket) is None) is ok
    if not ok:
        with pytest.raises(S3Error) as info:
            s3xml.check_bucket(bucket)
        assert info.value.code == "InvalidBucketName"


@pytest.mark.parametrize(
    ("prefix", "folder"),
    [("", "/b.com"), ("pho", "/b.com"), ("photos/", "/b.com/photos"), ("a//b", "/b.com/a/%2F")],
)
def test_prefix_folder(prefix: str, folder: str) -> None:
    """A prefix is listed from the folder of its complete components."""
    assert s3xml.prefix_folder("b.com", prefix) == folder


def _feed(grouper: s3xml.Grouper, keys: list[str]) -> None:
    for k in keys:
        if not grouper.add(s3xml.Item(k, 1, 0.0), "/b/" + k):
            return


@pytest.mark.parametrize(
    ("prefix", "delimiter", "max_keys", "items", "prefixes", "truncated"),
    [
        ("", "", 10, ["a", "b/1", "b/2", "c"], [], False),
        ("", "/", 10, ["a", "c"], ["b/"], False),
        ("b/", "/", 10, ["b/1", "b/2"], [], False),
        ("", "/", 2, ["a"], ["b/"], True),
        ("", "", 2, ["a", "b/1"], [], True),
        ("", "-", 10, ["a", "b/1", "b/2", "c"], [], False),
        ("x", "/", 10, [], [], False),
        ("", "", 0, [], [], False),
        ("", "/", 0, [], [], False),
    ],
)
def test_grouper_rolls_up_and_stops(
    prefix: str,
    delimiter: str,
    max_keys: int,
    items: list[str],
    prefixes: list[str],
    truncated: bool,
) -> None:
    """Keys roll up into common prefixes, and the listing stops at max-keys."""
    g = s3xml.Grouper(prefix, delimiter, max_keys)
    _feed(g, ["a", "b/1", "b/2", "c"])
    assert [i.key for i in g.out.items] == items
    assert g.out.prefixes == prefixes
    assert g.out.truncated is truncated


def test_grouper_resumes_after_the_rolled_up_keys() -> None:
    """A truncated listing continues after the last key its last common prefix took."""
    g = s3xml.Grouper("", "/", 1)
    _feed(g, ["b/1", "b/2", "c"])
    assert g.out.prefixes == ["b/"]
    assert g.out.truncated
    assert g.out.resume == "/b/b/2"


def test_grouper_skips_a_marker_prefix() -> None:
    """A V1 marker that is a common prefix skips every key under it."""
    g = s3xml.Grouper("", "/", 10, skip="b/")
    _feed(g, ["b/1", "b/2", "c"])
    assert [i.key for i in g.out.items] == ["c"]


def test_list_v2_document() -> None:
    """ListObjectsV2 renders counts, tokens, contents and common prefixes."""
    q = s3xml.ListQuery("b.com", prefix="p/", delimiter="/", max_keys=2, token="T")
    found = s3xml.Listing([s3xml.Item("p/a&b", 3, 0.0, etag='"x"')], ["p/d/"], True)
    root = ET.fromstring(s3xml.list_v2(q, found, "N", None))
    assert root.tag == NS + "ListBucketResult"
    assert root.findtext(NS + "KeyCount") == "2"
    assert root.findtext(NS + "IsTruncated") == "true"
    assert root.findtext(NS + "NextContinuationToken") == "N"
    assert root.findtext(NS + "ContinuationToken") == "T"
    assert root.findtext(f"{NS}Contents/{NS}Key") == "p/a&b"
    assert root.findtext(f"{NS}Contents/{NS}LastModified") == "1970-01-01T00:00:00.000Z"
    assert root.findtext(f"{NS}CommonPrefixes/{NS}Prefix") == "p/d/"


def test_url_encoding_type() -> None:
    """With encoding-type=url, keys and prefixes are URL-encoded, '/' kept."""
    q = s3xml.ListQuery("b.com", prefix="p q/", url=True)
    found = s3xml.Listing([s3xml.Item("p q/\u00e9 +", 1, 0.0)], [])
    root = ET.fromstring(s3xml.list_v1(q, found, ("id", "me")))
    assert root.findtext(f"{NS}Contents/{NS}Key") == "p%20q/%C3%A9%20%2B"
    assert root.findtext(NS + "Prefix") == "p%20q/"
    assert root.findtext(NS + "EncodingType") == "url"


def test_error_document() -> None:
    """An Error document carries code, message, extra fields, resource and request id."""
    body = s3xml.error_xml("NoSuchKey", "gone <x>", "/b/k", "RID", {"Key": "k"})
    root = ET.fromstring(body)
    assert root.tag == "Error"
    assert [c.tag for c in root] == ["Code", "Message", "Key", "Resource", "RequestId"]
    assert root.findtext("Message") == "gone <x>"


def test_delete_result_quiet_lists_errors_only() -> None:
    """Quiet DeleteObjects answers only the keys that failed."""
    results = [s3xml.Deleted("a"), s3xml.Deleted("b", code="AccessDenied", message="no")]
    loud = ET.fromstring(s3xml.delete_result(results, quiet=False))
    quiet = ET.fromstring(s3xml.delete_result(results, quiet=True))
    assert len(loud.findall(NS + "Deleted")) == 1
    assert quiet.findall(NS + "Deleted") == []
    assert quiet.findtext(f"{NS}Error/{NS}Code") == "AccessDenied"


def test_parse_delete() -> None:
    """A DeleteObjects body gives its keys, versions and quiet flag."""
    body = (
        b'<?xml version="1.0"?><Delete xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
        b"<Quiet>true</Quiet><Object><Key>a&amp;b</Key></Object>"
        b"<Object><Key>c</Key><VersionId>2</VersionId></Object></Delete>"
    )
    assert s3xml.parse_delete(body) == (True, [("a&b", None), ("c", "2")])


def test_parse_complete() -> None:
    """A CompleteMultipartUpload body gives part numbers and ETags without quotes."""
    body = (
        b"<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>"
        b'<ETag>"abc"</ETag></Part><Part><ETag>def</ETag><PartNumber>2</PartNumber></Part>'
        b"</CompleteMultipartUpload>"
    )
    assert s3xml.parse_complete(body) == [(1, "abc"), (2, "def")]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"<Delete>",
        b"<Delete></Delete>",
        b"<Other><Object><Key>a</Key></Object></Other>",
        b"<Delete><Object></Object></Delete>",
        # entities: refused before anything is expanded
        b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaa">]>'
        b"<Delete><Object><Key>&a;</Key></Object></Delete>",
        b'<!DOCTYPE d SYSTEM "file:///etc/passwd"><Delete><Object><Key>a</Key></Object></Delete>',
        b"<Delete>" + b"<Object><Key>a</Key></Object>" * 1001 + b"</Delete>",
        b"<Delete>" + b"<x>" * 40 + b"</x>" * 40 + b"</Delete>",
        b"<Delete>" + b" " * (s3xml.MAX_BODY + 1) + b"</Delete>",
    ],
)
def test_bad_delete_bodies_are_malformed_xml(body: bytes) -> None:
    """Malformed, oversized, DTD or entity-bearing bodies are MalformedXML."""
    with pytest.raises(S3Error) as info:
        s3xml.parse_delete(body)
    assert info.value.code == "MalformedXML"


@pytest.mark.parametrize(
    "body",
    [
        b"<CompleteMultipartUpload></CompleteMultipartUpload>",
        b"<CompleteMultipartUpload><Part><PartNumber>x</PartNumber></Part>"
        b"</CompleteMultipartUpload>",
        b"<CompleteMultipartUpload><Part><PartNumber>123456</PartNumber></Part>"
        b"</CompleteMultipartUpload>",
    ],
)
def test_bad_complete_bodies_are_malformed_xml(body: bytes) -> None:
    """A CompleteMultipartUpload without valid part numbers is MalformedXML."""
    with pytest.raises(S3Error) as info:
        s3xml.parse_complete(body)
    assert info.value.code == "MalformedXML"


def test_small_documents() -> None:
    """Versioning, location, copy and multipart documents are well-formed S3 XML."""
    for body, tag in [
        (s3xml.versioning("Enabled"), "VersioningConfiguration"),
        (s3xml.location(""), "LocationConstraint"),
        (s3xml.copy_result("CopyObjectResult", '"e"', 0.0), "CopyObjectResult"),
        (s3xml.initiate_multipart("b", "k", "u"), "InitiateMultipartUploadResult"),
        (s3xml.complete_multipart("/b/k", "b", "k", '"e-2"'), "CompleteMultipartUploadResult"),
        (s3xml.list_buckets("id", "me", [("b.com", 0.0)]), "ListAllMyBucketsResult"),
        (
            s3xml.list_parts(
                "b", "k", "u", [s3xml.PartRow(1, '"e"', 5, 0.0)], 0, 1000, False, ("i", "n")
            ),
            "ListPartsResult",
        ),
        (
            s3xml.list_uploads("b", "", [s3xml.UploadRow("k", "u", 0.0)], 1000, ("i", "n")),
            "ListMultipartUploadsResult",
        ),
    ]:
        assert ET.fromstring(body).tag == NS + tag
