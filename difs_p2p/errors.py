"""One exception tree for the whole package.

::

    DifsError                         base of everything we raise on purpose
    +-- UsageError                    the caller's mistake (bad name, bad option, bad size)
    |   +-- BadNameError              a content name breaks a rule (the message names it)
    +-- PeerError                     a remote peer misbehaved or failed
    |   +-- WireError                 bytes from the wire do not decode (field + offset)
    |   +-- RemoteError               a peer answered with an error code
    +-- NotFoundError                 no such name / version / segment
    |   +-- DeletedError              the name exists but its newest version is a tombstone
    +-- IntegrityError                a hash or signature does not match
    +-- PermissionDeniedError         the name belongs to another publisher / exists already
    |   +-- AlreadyExistsError        publish without --update over an existing name
    +-- CapacityError                 not enough space (disk full, capacity reached)
    |   +-- BusyError                 a peer refused work for now (rate limit): try later
    +-- NetworkError                  cannot reach the network (bind failed, no peers)
    |   +-- DifsTimeoutError          an operation ran out of time (also a TimeoutError)
    +-- StorageError                  the local data directory cannot be used

Lower-layer exceptions (OSError, struct.error, cryptography's InvalidSignature...) are
translated at the module boundary that sees them; the CLI maps each class to one line
on stderr and its own exit code (see ``difs_p2p.cli_common.EXIT_CODES``).
"""

from __future__ import annotations


class DifsError(Exception):
    """Base class of every error this package raises on purpose."""


class UsageError(DifsError):
    """The caller passed something invalid (option, size, address)."""


class BadNameError(UsageError):
    """A content name breaks one of the naming rules."""


class PeerError(DifsError):
    """A remote peer misbehaved or failed."""


class WireError(PeerError):
    """Bytes received from the network do not decode.

    ``field`` names what was being decoded and ``offset`` where decoding stopped.
    """

    def __init__(self, message: str, *, field: str = "", offset: int = -1) -> None:
        detail = message
        if field:
            detail = f"{message} (field {field!r}"
            detail += f" at offset {offset})" if offset >= 0 else ")"
        super().__init__(detail)
        self.field = field
        self.offset = offset


class RemoteError(PeerError):
    """A peer answered a request with an error code."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"remote error {code}: {message}")
        self.code = code
        self.remote_message = message


class NotFoundError(DifsError):
    """No such name, version or segment."""


class DeletedError(NotFoundError):
    """The name's newest version is a tombstone."""


class IntegrityError(DifsError):
    """A hash or a signature does not match."""


class PermissionDeniedError(DifsError):
    """The operation is not allowed for this publisher key."""


class AlreadyExistsError(PermissionDeniedError):
    """Publishing over an existing name without ``update``."""


class CapacityError(DifsError):
    """Not enough space: the disk is full or the configured capacity is reached."""


class BusyError(CapacityError):
    """A peer refused a request for now (too many of its kind): try again later."""


class NetworkError(DifsError):
    """The network cannot be reached or used (bind failed, no peers answered)."""


class DifsTimeoutError(NetworkError, TimeoutError):
    """An operation ran out of time."""


class StorageError(DifsError):
    """The local data directory cannot be used."""
