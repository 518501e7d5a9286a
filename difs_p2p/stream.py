"""An object read as an async iterator of verified chunks (``Client.open_stream``).

:class:`ObjectStream` runs one :class:`~difs_p2p.fetch.Fetch` in a task it owns, into
:class:`~difs_p2p.fetchrun.Chunks`: the bounded buffer between the fetch and the reader.
Each chunk is yielded once it and every byte before it were verified against the hash
list (itself checked against the signed integrity root), the first one as soon as it is.
The fetch runs at most :func:`window_for` segments ahead of what the reader has taken
(backpressure: a reader that stops reading stops the requests to holders), and
:meth:`ObjectStream.aclose` (or leaving ``async with``) cancels it at once: its holder
connections are closed and its buffers dropped before ``aclose`` returns.

Example::

    async with await client.open_stream("/a.com/izone.mp4", span=(0, 1023)) as stream:
        async for chunk in stream:
            sink.write(chunk)
"""

from __future__ import annotations

import asyncio
import contextlib
from types import TracebackType

from difs_p2p.classgen import field, valueclass
from difs_p2p.errors import UsageError
from difs_p2p.fetch import Fetch, FetchResult, fetch_into
from difs_p2p.fetchrun import STREAM_WINDOW, Chunks
from difs_p2p.manifest import Manifest
from difs_p2p.tasks import TaskSet

__all__ = ["STREAM_BUFFER", "ObjectStream", "window_for"]

# Most bytes of segments a stream's fetch holds ahead of its reader (in flight, received
# or waiting to be read): a reader that does not read costs at most this much memory.
STREAM_BUFFER = 16 << 20


def window_for(segment_size: int, buffer: int = STREAM_BUFFER) -> int:
    """Segments a stream's fetch may run ahead of its reader: ``STREAM_WINDOW``, or fewer
    so that they hold at most ``buffer`` bytes; at least one."""
    return max(1, min(STREAM_WINDOW, buffer // max(1, segment_size)))


@valueclass(frozen=False)
class _Outcome:
    """How a stream's fetch ended (kept apart from the stream, so that the fetch's task
    does not keep a stream its reader dropped alive)."""

    # set once the hash list is verified or the fetch ended
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    done: bool = False
    error: Exception | None = None
    result: FetchResult | None = None


async def _pump(fetch: Fetch, chunks: Chunks, outcome: _Outcome, started: float) -> None:
    """Run ``fetch`` into ``chunks``; keep its error for the reader."""
    fetch.on_listed = outcome.ready.set
    try:
        outcome.result = await fetch_into(fetch, chunks, started, False)
    except Exception as exc:
        outcome.error = exc
    finally:
        outcome.done = True
        outcome.ready.set()
        chunks.changed.set()


class ObjectStream:
    """Verified chunks of one object (or of the inclusive span ``first``..``last`` of it),
    in order; an async iterator and an async context manager.

    ``__anext__`` raises the fetch's error (``NotFoundError``, ``NetworkError``,
    ``IntegrityError``...) once the chunks verified before it have been yielded; a chunk
    is never yielded unverified. A chunk is a read-only ``memoryview`` that belongs to
    the reader (the fetch never reuses its buffer). Figures: ``received`` (bytes
    received from holders for segments so far), ``first_byte`` (seconds from the call
    to the first verified chunk, 0.0 before it), ``resolve`` (seconds of it resolving
    the name), ``result`` (the fetch's ``FetchResult`` once every chunk was read).
    Made by :meth:`open` (``Client.open_stream``), which starts the fetch.
    """

    def __init__(
        self, fetch: Fetch, *, started: float, resolve: float = 0.0, buffer: int = STREAM_BUFFER
    ) -> None:
        self.manifest: Manifest = fetch.manifest
        # inclusive; an empty object is first=0, last=-1
        self.first: int = fetch.first
        self.last: int = fetch.last
        self.length: int = max(0, self.last - self.first + 1)
        self.resolve = resolve
        self._fetch = fetch
        self._started = started
        self._chunks = Chunks(window_for(fetch.manifest.segment_size, buffer))
        self._outcome = _Outcome()
        self._tasks = TaskSet(f"stream {fetch.manifest.name}")
        self._closed = False

    @property
    def received(self) -> int:
        """Bytes received from holders for segments so far (frame headers included)."""
        return self._chunks.received

    @property
    def window(self) -> int:
        """Segments the fetch may run ahead of the reader."""
        return self._chunks.window

    @property
    def first_byte(self) -> float:
        """Seconds from the call to the first verified chunk (0.0 before it)."""
        first = self._chunks.first_at
        return first - self._started if first else 0.0

    @property
    def result(self) -> FetchResult | None:
        """The fetch's figures (sources, retries, hedged, late, gave_up) once the last
        chunk was read; None before, and for a stream closed or failed."""
        return self._outcome.result

    @property
    def closed(self) -> bool:
        return self._closed

    @classmethod
    async def open(
        cls, fetch: Fetch, *, started: float, resolve: float = 0.0, buffer: int = STREAM_BUFFER
    ) -> ObjectStream:
        """Start ``fetch``; return once a holder answered with the verified hash list. An
        error until then (every holder unreachable, none with the object) is raised here.
        ``buffer``: the most bytes of segments the fetch runs ahead of the reader."""
        stream = cls(fetch, started=started, resolve=resolve, buffer=buffer)
        outcome = stream._outcome
        stream._tasks.spawn(_pump(fetch, stream._chunks, outcome, started), name="stream")
        try:
            await outcome.ready.wait()
        except BaseException:
            await stream.aclose()
            raise
        if outcome.error is not None and not stream._chunks.pieces:
            await stream.aclose()
            raise outcome.error
        return stream

    def __aiter__(self) -> ObjectStream:
        return self

    async def __anext__(self) -> memoryview:
        chunks, outcome = self._chunks, self._outcome
        while True:
            if self._closed:
                raise UsageError(f"the stream of {self.manifest.name} is closed")
            piece = chunks.take()
            if piece is not None:
                return piece
            if outcome.done:
                await self._tasks.close()
                if outcome.error is not None:
                    raise outcome.error
                raise StopAsyncIteration
            chunks.changed.clear()
            await chunks.changed.wait()

    async def aclose(self) -> None:
        """Stop the fetch now: its task cancelled and awaited, its holder connections
        closed, the chunks not read dropped. Idempotent."""
        self._closed = True
        self._chunks.pieces.clear()
        self._chunks.changed.set()  # a reader waiting in another task sees the close
        await self._tasks.close()

    async def __aenter__(self) -> ObjectStream:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        # dropped without aclose: its fetch must not wait for a reader that is gone
        for task in getattr(self, "_tasks", ()):
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                task.cancel()
