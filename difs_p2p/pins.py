"""Client-side pinning of publisher keys per name, like SSH's known_hosts.

The first time a client resolves a name it records the publisher key it saw; afterwards a
manifest of that name (or of any name under a pinned prefix) signed by another key is
refused unless the user pins the new key explicitly (``--trust KEY``). This protects human
names such as ``/a.com/...``, whose binding to a key otherwise rests on the first publisher
at the name's key/value peers.

File format (``$DIFS_HOME/pins.json``, rewritten atomically)::

    {"version": 1, "pins": {"/a.com": "<64 hex public key>", "/a.com/izone.mp4": "..."}}
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from difs_p2p.errors import StorageError, UsageError
from difs_p2p.names import normalize_name

PINS_VERSION = 1


def parse_key(text: str) -> bytes:
    """A publisher public key given as 64 hex characters."""
    try:
        raw = bytes.fromhex(text.strip())
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise UsageError(f"not a public key: {text!r} (expected 64 hex characters)")
    return raw


class Pins:
    """Pinned publisher keys by name or name prefix (component-wise)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.pins: dict[str, bytes] = {}
        if path is not None and path.exists():
            self._load(path)

    def _load(self, path: Path) -> None:
        try:
            data = json.loads(path.read_text())
            if data.get("version") != PINS_VERSION:
                raise ValueError("unknown version")
            self.pins = {normalize_name(k): parse_key(v) for k, v in data["pins"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError, UsageError) as exc:
            raise StorageError(f"pin file {path} is damaged: {exc}") from None

    def pinned(self, name: str) -> tuple[str, bytes] | None:
        """The pin that applies to ``name``: its own, else the longest pinned prefix."""
        norm = normalize_name(name)
        parts = norm.split("/")
        for n in range(len(parts), 1, -1):
            prefix = "/".join(parts[:n])
            if prefix in self.pins:
                return prefix, self.pins[prefix]
        return None

    def pin(self, name: str, key: bytes) -> None:
        self.pins[normalize_name(name)] = key
        self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        data = {"version": PINS_VERSION, "pins": {k: v.hex() for k, v in sorted(self.pins.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text(json.dumps(data, indent=1))
            os.replace(tmp, self.path)
        except OSError as exc:
            raise StorageError(f"cannot write pin file {self.path}: {exc.strerror}") from None
