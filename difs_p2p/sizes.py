"""Sizes as operators write them (``10GiB``, ``500MB``, ``4096``) and as commands print
them (binary units). Pure.

Apart from config.py (which imports them back) so that a command that prints a size, such
as a small ``difs get``, does not build the configuration's classes.
"""

from __future__ import annotations

import re

from difs_p2p.errors import UsageError

__all__ = ["format_size", "parse_size"]

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "ki": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "mi": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "gi": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
    "ti": 1 << 40,
    "p": 1000**5,
    "pb": 1000**5,
    "pib": 1 << 50,
    "pi": 1 << 50,
}


def parse_size(text: str) -> int:
    """Parse a size such as ``10GiB``, ``500MB``, ``4096`` or ``1.5G`` into bytes.

    Decimal units (kB, MB, GB) are powers of 1000, binary units (KiB, MiB, GiB) powers of 1024.
    """
    match = _SIZE_RE.match(text)
    unit = (match.group(2) or "").lower() if match else ""
    if match is None or unit not in _UNITS:
        raise UsageError(f"not a size: {text!r} (examples: 4096, 500MB, 10GiB)")
    value = float(match.group(1)) * _UNITS[unit]
    if value != int(value) and unit in ("", "b"):
        raise UsageError(f"not a size: {text!r} (bytes must be a whole number)")
    return int(value)


def format_size(n: float) -> str:
    """Format a byte count for humans (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover - loop always returns
