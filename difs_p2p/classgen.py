"""Value classes built in one step at import.

``@valueclass`` makes what ``dataclasses.dataclass(frozen=True, slots=True)`` makes:
``__init__`` with defaults and ``field(default_factory=...)``, ``__post_init__`` called,
``__repr__``, ``__eq__``, ``__hash__``, frozen ``__setattr__`` and ``__delattr__``,
``__slots__``, ``__match_args__``, pickling. ``@valueclass(kw_only=True)`` takes keyword
arguments only; ``@valueclass(frozen=False)`` makes a mutable one (no ``__hash__``).

Only ``__init__`` is compiled, once per class and only when the class is first
instantiated; the other methods are shared by every value class and read the class's
fields (``operator.attrgetter``). ``dataclasses`` (which
imports ``inspect``, ``ast`` and ``dis``, and compiles every method of every class apart)
is never imported: it took a third of what a command spent importing. Checkers such as
mypy see dataclasses (``typing.dataclass_transform``).

Fields are the class's own annotations in order, after those of a value base class;
``typing.ClassVar`` ones are not fields. :func:`replace` copies a value with some fields
changed. No I/O.
"""

from __future__ import annotations

from collections.abc import Callable
from operator import attrgetter
from typing import Any, TypeVar, cast, dataclass_transform, overload

__all__ = ["FrozenError", "asdict", "field", "replace", "valueclass"]

T = TypeVar("T")

# a default not given; a default made per instance
_MISSING: Any = object()


class FrozenError(AttributeError):
    """A field of a frozen value assigned or deleted."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A field whose default ``default_factory()`` makes for each new instance."""
    return _Factory(default_factory)  # type: ignore[return-value]


def replace(obj: T, /, **changes: Any) -> T:
    """A copy of the value ``obj`` with the fields ``changes`` names set anew."""
    for name in obj.__value_fields__:  # type: ignore[attr-defined]
        if name not in changes:
            changes[name] = getattr(obj, name)
    return obj.__class__(**changes)


def asdict(obj: object) -> dict[str, Any]:
    """The fields of the value ``obj`` by name (not copied: a field that is a value stays
    one)."""
    return {name: getattr(obj, name) for name in obj.__value_fields__}  # type: ignore[attr-defined]


@overload
def valueclass(cls: type[T], /) -> type[T]: ...


@overload
def valueclass(*, frozen: bool = True, kw_only: bool = False) -> Callable[[type[T]], type[T]]: ...


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def valueclass(
    cls: type[T] | None = None, /, *, frozen: bool = True, kw_only: bool = False
) -> type[T] | Callable[[type[T]], type[T]]:
    """Make ``cls`` a value class (see the module)."""

    def wrap(c: type[T]) -> type[T]:
        return _build(c, frozen, kw_only)

    return wrap if cls is None else wrap(cls)


def _is_classvar(annotation: object) -> bool:
    text = annotation if isinstance(annotation, str) else repr(annotation)
    return text.startswith(("ClassVar", "typing.ClassVar", "Final[ClassVar"))


def _fields(cls: type) -> list[tuple[str, Any]]:
    """``cls``'s fields in order, with their defaults (_MISSING, a value or a _Factory)."""
    found: dict[str, Any] = {}
    for base in reversed(cls.__mro__[1:]):
        found.update(base.__dict__.get("__value_defaults__", {}))
    # the class's own annotations as written (inspect.get_annotations would import inspect)
    own = cls.__dict__.get("__annotations__", {})  # noqa: RUF063
    for name, annotation in own.items():
        if not _is_classvar(annotation):
            found[name] = cls.__dict__.get(name, _MISSING)
    return list(found.items())


def _getter(names: list[str]) -> Callable[[Any], tuple[Any, ...]]:
    """A function giving an instance's fields as a tuple (operator.attrgetter, in C)."""
    if not names:
        return lambda obj: ()
    if len(names) == 1:
        one = attrgetter(names[0])
        return lambda obj: (one(obj),)
    return attrgetter(*names)


# The methods every value class shares: they read the class's fields from the class, so
# nothing is compiled for them (only __init__ is, once per class, at its first instance).


def _repr(self: Any) -> str:
    cls = self.__class__
    shown = ", ".join(f"{n}={getattr(self, n)!r}" for n in cls.__value_fields__)
    return f"{cls.__qualname__}({shown})"


def _eq(self: Any, other: Any) -> Any:
    if other.__class__ is self.__class__:
        get = self.__class__.__value_get__
        return get(self) == get(other)
    return NotImplemented


def _hash(self: Any) -> int:
    return hash(self.__class__.__value_get__(self))


def _setattr(self: Any, name: str, value: Any) -> None:
    cls = self.__class__
    if "__value_fields__" in cls.__dict__ or name in cls.__value_fields__:
        raise FrozenError(f"cannot assign to field {name!r}")
    object.__setattr__(self, name, value)


def _delattr(self: Any, name: str) -> None:
    cls = self.__class__
    if "__value_fields__" in cls.__dict__ or name in cls.__value_fields__:
        raise FrozenError(f"cannot delete field {name!r}")
    object.__delattr__(self, name)


def _getstate(self: Any) -> list[Any]:
    return list(self.__class__.__value_get__(self))


def _setstate(self: Any, state: list[Any]) -> None:
    for name, value in zip(self.__class__.__value_fields__, state, strict=True):
        object.__setattr__(self, name, value)


def _build(cls: type[T], frozen: bool, kw_only: bool) -> type[T]:
    fields = _fields(cls)
    names = [name for name, _ in fields]
    if not kw_only:
        seen_default = False
        for name, default in fields:
            if default is not _MISSING:
                seen_default = True
            elif seen_default:
                raise TypeError(f"non-default argument {name!r} follows default argument")
    if frozen:
        for name in ("__setattr__", "__delattr__"):
            if name in cls.__dict__:
                raise TypeError(f"cannot overwrite attribute {name} in class {cls.__name__}")
    # -- the class, with slots --------------------------------------------------------
    space = dict(cls.__dict__)
    for name in names:
        space.pop(name, None)
    space.pop("__dict__", None)
    space.pop("__weakref__", None)
    space["__slots__"] = tuple(n for n in names if not _slotted(cls, n))
    space["__value_fields__"] = tuple(names)
    space["__value_defaults__"] = dict(fields)
    space["__value_get__"] = staticmethod(_getter(names))
    space.setdefault("__match_args__", () if kw_only else tuple(names))
    shared: dict[str, Any] = {
        "__repr__": _repr,
        "__eq__": _eq,
        "__getstate__": _getstate,
        "__setstate__": _setstate,
    }
    if frozen:
        shared |= {"__hash__": _hash, "__setattr__": _setattr, "__delattr__": _delattr}
    for name, fn in shared.items():
        if name not in space or (name == "__hash__" and space[name] is None):
            space[name] = fn
    if not frozen and space.get("__hash__") is None:
        space["__hash__"] = None  # mutable and compared: unhashable
    new: type[T] = cast(Any, type(cls))(cls.__name__, cls.__bases__, space)
    new.__qualname__ = cls.__qualname__
    # -- its __init__, compiled when the class is first instantiated -------------------
    if "__init__" not in cls.__dict__:
        new.__init__ = _lazy_init(new, fields, frozen, kw_only)  # type: ignore[method-assign]
    return new


def _lazy_init(
    cls: type, fields: list[tuple[str, Any]], frozen: bool, kw_only: bool
) -> Callable[..., None]:
    """An ``__init__`` that compiles ``cls``'s own on its first call and puts it in its
    place: most classes a command imports are never instantiated by it."""

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        init = _compile_init(cls, fields, frozen, kw_only)
        if cls.__dict__.get("__init__") is __init__:
            type.__setattr__(cls, "__init__", init)
        init(self, *args, **kwargs)

    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    return __init__


def _compile_init(
    cls: type, fields: list[tuple[str, Any]], frozen: bool, kw_only: bool
) -> Callable[..., None]:
    """``cls``'s ``__init__``: each field set from its argument or default, in order."""
    env: dict[str, Any] = {"__M": _MISSING, "__object": object}
    params, body = [], []
    for i, (name, default) in enumerate(fields):
        if default is _MISSING:
            params.append(name)
            given = name
        elif isinstance(default, _Factory):
            env[f"__f{i}"] = default.make
            params.append(f"{name}=__M")
            given = f"__f{i}() if {name} is __M else {name}"
        else:
            env[f"__d{i}"] = default
            params.append(f"{name}=__d{i}")
            given = name
        if frozen:
            body.append(f" __object.__setattr__(self, {name!r}, {given})")
        else:
            body.append(f" self.{name} = {given}")
    if hasattr(cls, "__post_init__"):
        body.append(" self.__post_init__()")
    signature = ", ".join(["self", *(["*"] if kw_only and params else []), *params])
    source = "\n".join([f"def __init__({signature}):", *(body or [" pass"])])
    exec(source, env)
    init: Callable[..., None] = env["__init__"]
    init.__qualname__ = f"{cls.__qualname__}.__init__"
    return init


def _slotted(cls: type, name: str) -> bool:
    """Whether a base class of ``cls`` has a slot ``name`` already."""
    return any(name in getattr(base, "__slots__", ()) for base in cls.__mro__[1:])
