"""One exception tree for the whole package.

::

    DifsError                         base of everything we raise on purpose
    +-- UsageError                    the caller's mistake (bad name, bad option, bad size)
    |   +-- BadNameError              a content name breaks a rule (the message names it)
    |   +-- UnsupportedError          a request names an operation this side does not know
    +-- PeerError                     a remote peer misbehaved or failed
    |   +-- WireError                 bytes from the wire do not decode (field + offset)
    |   +-- RemoteError               a peer answered with an error code (and which peer)
    |       +-- RemoteRejectedError       the peer rejected our request (BAD_REQUEST)
    |       |   +-- RemoteUnsupportedError   ... it does not know the operation (UNSUPPORTED)
    |       +-- Remote*Error              codes with a meaning the user needs: also a
    |                                     NotFoundError, BusyError... (see below)
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

An ERROR frame from a peer becomes a :class:`RemoteError` naming the peer and the code
(``transfer.remote_error``), never a local class alone: a peer's refusal of our request is
not our misuse of the API. Codes that carry a meaning the user needs map to a subclass that
is also the local class of that meaning (``RemoteNotFoundError`` is a ``NotFoundError``,
``RemoteBusyError`` a ``BusyError``...), so callers and the CLI's exit codes treat them
alike, while ``isinstance(exc, RemoteError)`` tells where they came from.

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


class ClosedBeforeReplyError(PeerError):
    """The peer closed the connection before it answered a request (no reply frame)."""


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


class UnsupportedError(UsageError):
    """A request names an operation this side does not know (sent as UNSUPPORTED)."""


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


# -- errors a peer answered with ----------------------------------------------------------


class RemoteError(PeerError):
    """A peer answered a request with an error code.

    ``code`` is the wire code (an int), ``remote_message`` the peer's own words and
    ``peer`` who answered ("host:port", or "" when unknown). The message reads
    "<summary> peer <host:port> (<CODE>): <the peer's message>".
    """

    summary = "error from"

    def __init__(self, code: int, message: str, *, peer: str = "", code_name: str = "") -> None:
        who = f"peer {peer}" if peer else "the peer"
        super().__init__(f"{self.summary} {who} ({code_name or code}): {message}")
        self.code = code
        self.remote_message = message
        self.peer = peer


class RemoteRejectedError(RemoteError):
    """The peer rejected our request as malformed (BAD_REQUEST): the peer's verdict, not a
    misuse of this API, which raises UsageError before anything is sent."""

    summary = "request rejected by"


class RemoteUnsupportedError(RemoteRejectedError):
    """The peer does not know the operation (UNSUPPORTED; an older peer)."""

    summary = "operation not supported by"


class RemoteNotFoundError(RemoteError, NotFoundError):
    """The peer has no such name, version or segment (NOT_FOUND)."""


class RemoteDeletedError(RemoteError, DeletedError):
    """The peer says the name was deleted (DELETED)."""


class RemoteIntegrityError(RemoteError, IntegrityError):
    """The peer found a hash or signature that does not match (INTEGRITY)."""


class RemotePermissionDeniedError(RemoteError, PermissionDeniedError):
    """The peer refused the request to this connection (FORBIDDEN)."""

    summary = "permission denied by"


class RemoteAlreadyExistsError(RemoteError, AlreadyExistsError):
    """The peer holds the name already (EXISTS)."""


class RemoteCapacityError(RemoteError, CapacityError):
    """The peer has no space (NO_SPACE)."""


class RemoteBusyError(RemoteError, BusyError):
    """The peer refused work for now (BUSY): try again later."""


class RemoteTimeoutError(RemoteError, DifsTimeoutError):
    """The peer ran out of time doing what was asked (TIMEOUT)."""
