"""A virtual-time asyncio event loop: timers fire in order, and no real time passes.

The loop is a stock :class:`asyncio.SelectorEventLoop` whose selector never waits: when the
loop has nothing ready, it asks the selector to wait ``timeout`` seconds for I/O, and the
selector instead moves the virtual clock forward by ``timeout`` (that is, to the next timer)
and reports no I/O. ``loop.time()`` reads the virtual clock, so ``asyncio.sleep``,
``call_later`` and every timeout run on virtual time. Hours of simulated time then cost only
the CPU time of the callbacks that run in them.

The loop has no real I/O: sockets registered with it are never reported ready. The in-memory
network (:mod:`sim.memnet`) delivers datagrams with ``call_at`` instead. If nothing is ready
and no timer is pending, the program can never make progress, and :class:`Deadlock` is raised
instead of waiting forever.
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from _typeshed import FileDescriptorLike


class Deadlock(RuntimeError):
    """The virtual loop has nothing ready and no timer pending: nothing can ever happen."""


class VirtualClock:
    """Seconds of simulated time since the loop started; only the selector advances it."""

    __slots__ = ("now",)

    def __init__(self, start: float = 0.0) -> None:
        self.now = start

    def advance(self, seconds: float) -> None:
        if seconds > 0:
            self.now += seconds


class _VirtualSelector(selectors.BaseSelector):
    """Keeps registrations (the loop's self-pipe) but never waits and reports no events."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._keys: dict[FileDescriptorLike, selectors.SelectorKey] = {}

    def register(
        self, fileobj: FileDescriptorLike, events: int, data: Any = None
    ) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        if fd in self._keys:
            raise KeyError(f"{fileobj!r} is already registered")
        key = selectors.SelectorKey(fileobj, fd, events, data)
        self._keys[fd] = key
        return key

    def unregister(self, fileobj: FileDescriptorLike) -> selectors.SelectorKey:
        fd = fileobj if isinstance(fileobj, int) else fileobj.fileno()
        return self._keys.pop(fd)

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        if timeout is None:
            raise Deadlock("virtual loop: no callback ready and no timer pending")
        self._clock.advance(timeout)
        return []

    def get_map(self) -> Mapping[FileDescriptorLike, selectors.SelectorKey]:
        return self._keys

    def close(self) -> None:
        self._keys.clear()


class VirtualEventLoop(asyncio.SelectorEventLoop):
    """An event loop on virtual time (see the module docstring). Single-threaded use only."""

    def __init__(self, start: float = 0.0) -> None:
        self.clock = VirtualClock(start)
        super().__init__(_VirtualSelector(self.clock))

    def time(self) -> float:
        return self.clock.now


def run_virtual(main: Any) -> Any:
    """Run the coroutine ``main`` to completion on a fresh :class:`VirtualEventLoop`."""
    with asyncio.Runner(loop_factory=VirtualEventLoop) as runner:
        return runner.run(main)
