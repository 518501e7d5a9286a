"""Name rules, the normal form and the name key, as the specification of difs_p2p.names."""

from __future__ import annotations

import hashlib
import sys
import unicodedata

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p import names
from difs_p2p.errors import BadNameError, UsageError
from difs_p2p.names import (
    MAX_COMPONENT_BYTES,
    MAX_COMPONENTS,
    MAX_NAME_BYTES,
    key_namespace_owner,
    name_components,
    name_key,
    normalize_name,
)

# Four components of 255 bytes: exactly MAX_NAME_BYTES (1024) bytes.
_LONGEST = "/" + "/".join(["y" * 255] * 4)

GOOD = [
    ("/a.com/izone.mp4", "/a.com/izone.mp4"),
    ("/a.com/izone.mp4/", "/a.com/izone.mp4"),
    ("/x", "/x"),
    ("/x/", "/x"),
    ("/cafe\u0301", "/caf\u00e9"),
    ("/caf\u00e9/", "/caf\u00e9"),
    ("/日本/ファイル.mp4", "/日本/ファイル.mp4"),
    ("/a b/ c /tab-free", "/a b/ c /tab-free"),
    ("/.hidden/...", "/.hidden/..."),
    ("/a\\b", "/a\\b"),
    ("/" + "x" * MAX_COMPONENT_BYTES, "/" + "x" * MAX_COMPONENT_BYTES),
    ("/" + "日" * 85, "/" + "日" * 85),
    ("/x" * MAX_COMPONENTS, "/x" * MAX_COMPONENTS),
    (_LONGEST, _LONGEST),
    (_LONGEST + "/", _LONGEST),
]

# (name, the rule the message must name, the offending part the message must show)
BAD = [
    ("", "must start with '/'", None),
    ("a.com/x", "must start with '/'", None),
    (" /a", "must start with '/'", None),
    ("/", "needs at least one component", None),
    ("//", "needs at least one component", None),
    ("/a//b", "empty component at position 2", None),
    ("///", "empty component at position 1", None),
    ("/a/b//", "empty component at position 3", None),
    ("/./a", "component '.' at position 1 is not allowed", None),
    ("/a/..", "component '..' at position 2 is not allowed", None),
    ("/a/../b/", "component '..' at position 2 is not allowed", None),
    ("/a/\x00b", "control character '\\x00'", "'\\x00b'"),
    ("/a/b\nc", "control character '\\n'", "'b\\nc'"),
    ("/a/b\tc", "control character '\\t'", "'b\\tc'"),
    ("/a\x7f", "control character '\\x7f'", "'a\\x7f'"),
    ("/a\x85", "control character '\\x85'", "'a\\x85'"),
    ("/p/a\u2028b", "control character '\\u2028'", "'a\\u2028b'"),
    ("/p/a\u2029b", "control character '\\u2029'", "'a\\u2029b'"),
    ("/ok/a\ud800", "unencodable character '\\ud800'", "'a\\ud800'"),
    ("/ok/\udfff", "unencodable character '\\udfff'", "'\\udfff'"),
    ("/" + "x" * 256, "is over 255 bytes (256 bytes of UTF-8)", "'xxxxxxxx"),
    ("/a/" + "日" * 86, "at position 2 is over 255 bytes (258 bytes of UTF-8)", "'日日日"),
    ("/x" * 65, "more than 64 components (65)", None),
    ("/" + "/".join(["y" * 255] * 3 + ["y" * 254, "z"]), "over 1024 bytes (1025 bytes", None),
    ("/" + "x" * 5000, "over 1024 bytes", None),
    ("/a" + "\u0301" * 5000, "over 1024 bytes", None),
]


@pytest.mark.parametrize(("name", "normal"), GOOD)
def test_good_names_have_this_normal_form(name: str, normal: str) -> None:
    """Each good name normalizes to the expected normal form."""
    assert normalize_name(name) == normal
    assert normalize_name(normal) == normal


@pytest.mark.parametrize(("name", "rule", "part"), BAD)
def test_bad_names_say_which_rule(name: str, rule: str, part: str | None) -> None:
    """Each bad name is refused with a message naming the rule and the offending component."""
    with pytest.raises(BadNameError) as info:
        normalize_name(name)
    message = str(info.value)
    assert message.startswith("bad name ")
    assert rule in message
    if part is not None:
        assert f"component {part}" in message


def test_message_format() -> None:
    """A message quotes the name, then states the rule and where it is broken."""
    with pytest.raises(BadNameError) as info:
        normalize_name("/a//b")
    assert str(info.value) == "bad name '/a//b': empty component at position 2"


def test_long_names_are_cut_in_messages() -> None:
    """A huge name is shown cut short in the message, with its length."""
    with pytest.raises(BadNameError) as info:
        normalize_name("/" + "x" * 100_000)
    assert len(str(info.value)) < 200
    assert "(100001 characters)" in str(info.value)


@pytest.mark.parametrize("value", [None, b"/a", 42, ["/a"]])
def test_non_strings_are_bad_names(value: object) -> None:
    """Only str is a name; bytes and other objects are refused as BadNameError."""
    with pytest.raises(BadNameError, match="not a string"):
        normalize_name(value)  # type: ignore[arg-type]


def test_bad_name_is_a_usage_error() -> None:
    """A bad name is the caller's mistake in the exception tree."""
    with pytest.raises(UsageError):
        name_key("nope")


def test_components() -> None:
    """Components are those of the normal form."""
    assert name_components("/a.com/izone.mp4/") == ("a.com", "izone.mp4")
    assert name_components("/cafe\u0301") == ("caf\u00e9",)
    assert name_components("/日本/ファイル.mp4") == ("日本", "ファイル.mp4")


def test_non_ascii_names_and_their_keys() -> None:
    """Non-ASCII names are kept; NFC and NFD spellings share one key."""
    assert normalize_name("/日本/ファイル.mp4") == "/日本/ファイル.mp4"
    nfc, nfd = "/caf\u00e9", "/cafe\u0301"
    assert nfc != nfd
    assert name_key(nfc) == name_key(nfd) == name_key(nfd + "/")
    assert name_key("/日本/ファイル.mp4") != name_key("/日本/ファイル.MP4")


def test_golden_name_key() -> None:
    """The name key is SHA-256 over the domain tag and the UTF-8 normal form, cut to 20 bytes."""
    expected = hashlib.sha256(b"difs-name-v1\x00/a.com/izone.mp4").digest()[:20]
    assert name_key("/a.com/izone.mp4").hex() == expected.hex()
    assert name_key("/a.com/izone.mp4").hex() == "576060f8dbe28b620968ca4bef3749bc9b78a076"
    japanese = hashlib.sha256(b"difs-name-v1\x00" + "/日本/ファイル.mp4".encode()).digest()[:20]
    assert name_key("/日本/ファイル.mp4") == japanese


def test_key_namespace_names_need_a_fingerprint() -> None:
    """/key/<32 hex>/<name> is self-certifying; anything else under /key/ is refused."""
    fp = "0123456789abcdef" * 2
    assert key_namespace_owner(f"/key/{fp}/photo.jpg") == fp
    assert key_namespace_owner("/a.com/photo.jpg") is None
    for bad in ("/key/abc/x", f"/key/{fp}", f"/key/{fp.upper()}/x"):
        with pytest.raises(BadNameError, match="fingerprint"):
            normalize_name(bad)


def test_decomposition_bound_holds() -> None:
    """No character decomposes into more than 4, which bounds text worth normalizing."""
    longest = max(len(unicodedata.normalize("NFD", chr(c))) for c in range(sys.maxunicode + 1))
    assert longest <= names._MAX_DECOMPOSITION


def test_longest_decomposed_name_is_still_accepted() -> None:
    """A name written fully decomposed normalizes like its composed form."""
    # U+1F82 is alpha with psili, varia and ypogegrammeni: 4 characters decomposed.
    composed = "/" + "/".join(["\u1f82" * 80] * 4)
    decomposed = unicodedata.normalize("NFD", composed)
    assert len(decomposed) == 4 + 4 * 320
    assert normalize_name(decomposed) == composed


# Characters that exercise every rule: separators, dots, composition, controls, surrogates.
_ALPHABET = st.sampled_from(
    [
        *("/", "/", ".", "a", "é", "e", "\u0301", "\u0316", "日", " ", "\U0001f600"),
        *("\x00", "\x7f", "\u2028", "\ud800"),
        *("\u1100", "\u1161", "\u11a8", "\u00c5", "\u212b"),
    ]
)
_NAMEISH = st.lists(_ALPHABET, max_size=40).map(lambda cs: "/" + "".join(cs))
_ACCEPTED = st.lists(
    st.text(
        alphabet=st.characters(exclude_categories=["Cc", "Cs"], exclude_characters="/\u2028\u2029"),
        min_size=1,
        max_size=20,
    ).filter(lambda p: unicodedata.normalize("NFC", p) not in (".", "..")),
    min_size=1,
    max_size=8,
).map(lambda parts: "/" + "/".join(parts))


@given(st.one_of(st.text(), _NAMEISH, _ACCEPTED))
def test_any_text_normalizes_or_is_a_bad_name(text: str) -> None:
    """Any text either normalizes (idempotently) or raises BadNameError, nothing else."""
    try:
        norm = normalize_name(text)
    except BadNameError:
        return
    assert normalize_name(norm) == norm
    assert not norm.endswith("/")
    assert len(norm.encode("utf-8")) <= MAX_NAME_BYTES


@given(_ACCEPTED)
def test_names_built_by_the_rules_are_accepted(text: str) -> None:
    """Short components without controls, separators, '.' or '..' always make a good name."""
    assert normalize_name(text) == unicodedata.normalize("NFC", text)


@given(st.one_of(_ACCEPTED, _NAMEISH))
def test_equivalent_names_share_one_20_byte_key(text: str) -> None:
    """NFC, NFD and a trailing '/' spell one name: one 20-byte key."""
    try:
        key = name_key(text)
    except BadNameError:
        return
    assert len(key) == 20
    assert name_key(unicodedata.normalize("NFD", text)) == key
    assert name_key(unicodedata.normalize("NFC", text)) == key
    if not text.endswith("/"):
        assert name_key(text + "/") == key
