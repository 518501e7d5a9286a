"""Byte ranges as users write them, with HTTP Range semantics (RFC 9110, section 14.1.2).

Pure functions, no I/O. Three forms, offsets in bytes, ends inclusive:

* ``START-END``: bytes START to END; an END past the object is trimmed to its last byte;
* ``START-``: from START to the end of the object;
* ``-N``: the last N bytes (the whole object when it is shorter).

A range that starts at or past the end of the object cannot be served (HTTP's 416) and is
refused, as is an END before START.
"""

from __future__ import annotations

from difs_p2p.classgen import valueclass
from difs_p2p.errors import UsageError

_FORMS = "expected START-END, START- or -N (e.g. 0-1023, 1048576-, -4096)"


@valueclass
class ByteRange:
    """A range before the object's size is known: ``start``/``end``, or a ``suffix`` length."""

    start: int = 0
    # inclusive; None: to the end of the object
    end: int | None = None
    # the last ``suffix`` bytes (``start`` and ``end`` unused); None: not a suffix range
    suffix: int | None = None

    def __post_init__(self) -> None:
        if self.suffix is not None:
            if self.suffix < 1:
                raise UsageError(f"bad range -{self.suffix}: a suffix range needs at least 1 byte")
            return
        if self.start < 0:
            raise UsageError(f"bad range: the start ({self.start}) must not be negative")
        if self.end is not None and self.end < self.start:
            raise UsageError(
                f"bad range {self.start}-{self.end}: the end ({self.end}) is before the start "
                f"({self.start})"
            )

    def __str__(self) -> str:
        if self.suffix is not None:
            return f"-{self.suffix}"
        return f"{self.start}-{'' if self.end is None else self.end}"

    def resolve(self, size: int) -> tuple[int, int]:
        """The inclusive (first, last) bytes of an object of ``size`` bytes; UsageError when
        no byte of the object is in the range."""
        if self.suffix is not None:
            if size == 0:
                raise UsageError(f"range {self}: the object is empty")
            return max(0, size - self.suffix), size - 1
        if self.start >= size:
            raise UsageError(
                f"range {self} starts at byte {self.start}, past the end of the object "
                f"({size} bytes: the last byte is {size - 1})"
                if size
                else f"range {self}: the object is empty"
            )
        last = size - 1 if self.end is None else min(self.end, size - 1)
        return self.start, last


def parse_range(text: str) -> ByteRange:
    """A range written ``START-END``, ``START-`` or ``-N``; UsageError naming what is wrong."""
    spec = text.strip()
    first, sep, second = spec.partition("-")
    if not sep or (not first and not second):
        raise UsageError(f"bad range {text!r}: {_FORMS}")
    for part in (first, second):
        if part and not (part.isascii() and part.isdigit()):
            raise UsageError(f"bad range {text!r}: {part!r} is not a byte offset; {_FORMS}")
    if not first:
        return ByteRange(suffix=int(second))
    return ByteRange(start=int(first), end=int(second) if second else None)
