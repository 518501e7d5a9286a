"""classgen.value: what dataclasses.dataclass(frozen=True, slots=True) makes, built in one
step; compared with dataclasses itself where both apply."""

from __future__ import annotations

import copy
import dataclasses
import pickle
from typing import ClassVar, Generic, TypeVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from difs_p2p.classgen import FrozenError, field, replace, valueclass

R = TypeVar("R")


@valueclass
class Point:
    """A point."""

    x: int
    y: int = 0
    tags: tuple[str, ...] = ()
    LIMIT: ClassVar[int] = 10


@dataclasses.dataclass(frozen=True, slots=True)
class DataPoint:
    x: int
    y: int = 0
    tags: tuple[str, ...] = ()


@valueclass(kw_only=True)
class Frame:
    kind: str
    body: bytes = b""


@valueclass
class Meta:
    user: dict[str, str] = field(default_factory=dict)
    checked: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "checked", True)


@valueclass(frozen=False)
class Votes:
    seen: list[int] = field(default_factory=list)
    count: int = 0


class Op(Generic[R]):
    __slots__ = ()


@valueclass
class Ask(Op[int]):
    key: bytes


@valueclass
class Labelled(Point):
    label: str = ""


def test_init_defaults_repr_and_docstring() -> None:
    p = Point(1)
    assert (p.x, p.y, p.tags) == (1, 0, ())
    assert repr(Point(1, 2, ("a",))) == "Point(x=1, y=2, tags=('a',))"
    assert Point.__doc__ == "A point."
    assert Point.__match_args__ == ("x", "y", "tags")
    assert Point.LIMIT == 10
    assert "LIMIT" not in Point.__value_fields__  # type: ignore[attr-defined]


def test_frozen_slots_and_hash() -> None:
    p = Point(1, 2)
    with pytest.raises(FrozenError):
        p.x = 3  # type: ignore[misc]
    with pytest.raises(AttributeError):
        del p.y
    with pytest.raises(AttributeError):
        p.other = 1  # type: ignore[attr-defined]
    assert not hasattr(p, "__dict__")
    assert hash(p) == hash(Point(1, 2)) and p == Point(1, 2) and p != Point(2, 1)
    assert {p, Point(1, 2)} == {p}
    assert p != DataPoint(1, 2)  # type: ignore[comparison-overlap]  # another class


def test_keyword_only_and_factories() -> None:
    with pytest.raises(TypeError):
        Frame("data")  # type: ignore[call-arg]
    assert Frame(kind="data").body == b""
    a, b = Meta(), Meta()
    assert a.user == {} and a.user is not b.user  # one dict per instance
    assert a.checked  # __post_init__ ran
    v = Votes()
    v.count += 1
    v.seen.append(1)
    assert v == Votes([1], 1)
    with pytest.raises(TypeError):
        hash(v)


def test_bases_replace_pickle_and_copy() -> None:
    ask = Ask(b"k")
    assert isinstance(ask, Op) and ask.key == b"k"
    lab = Labelled(1, 2, label="a")
    assert lab.__value_fields__ == ("x", "y", "tags", "label")  # type: ignore[attr-defined]
    assert replace(lab, y=5) == Labelled(1, 5, label="a")
    for made in (pickle.loads(pickle.dumps(lab)), copy.copy(lab), copy.deepcopy(lab)):
        assert made == lab and type(made) is Labelled
    assert replace(Frame(kind="a", body=b"x"), kind="b") == Frame(kind="b", body=b"x")


def test_a_field_without_default_after_one_with_is_refused() -> None:
    with pytest.raises(TypeError, match="follows default"):

        @valueclass
        class Bad:
            a: int = 0
            b: int  # type: ignore[misc]


@given(st.integers(), st.integers(), st.lists(st.text(max_size=3), max_size=3))
def test_same_behaviour_as_a_dataclass(x: int, y: int, tags: list[str]) -> None:
    ours, theirs = Point(x, y, tuple(tags)), DataPoint(x, y, tuple(tags))
    assert repr(ours).removeprefix("Point") == repr(theirs).removeprefix("DataPoint")
    assert hash(ours) == hash(theirs)  # both hash the tuple of fields
    assert (ours == Point(x, y, tuple(tags))) == (theirs == DataPoint(x, y, tuple(tags)))


def test_init_is_compiled_at_the_first_instance_and_checks_its_arguments() -> None:
    @valueclass
    class Late:
        a: int
        b: str = "x"

    lazy = Late.__dict__["__init__"]
    with pytest.raises(TypeError):
        Late()  # type: ignore[call-arg]  # the compiled __init__ refuses, as a dataclass's
    assert Late.__dict__["__init__"] is not lazy  # compiled once, in its place from now on
    assert Late(1) == Late(1, "x") and Late(a=2, b="y").b == "y"
    with pytest.raises(TypeError):
        Late(1, "x", 3)  # type: ignore[call-arg]

    class Sub(Late):  # a plain subclass inherits the compiled __init__
        pass

    assert Sub(5).a == 5
