"""Owned background tasks: every task a peer, its DHT node or its TCP server starts is
held by one ``TaskSet`` and cancelled and awaited when its owner stops.

A task that fails is logged once with its owner's name (its exception is retrieved, so
asyncio never reports "exception was never retrieved"); a cancelled one silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

__all__ = ["TaskSet"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class TaskSet:
    """A set of running tasks owned by one object, cancelled together by ``close``."""

    def __init__(self, owner: str) -> None:
        self.owner = owner
        self._tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str | None = None) -> asyncio.Task[T]:
        """Run ``coro`` as an owned task."""
        return self.adopt(asyncio.get_running_loop().create_task(coro, name=name))

    def adopt(self, task: asyncio.Task[T]) -> asyncio.Task[T]:
        """Own an already running task."""
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.warning("%s task failed: %r", self.owner, exc)

    def __len__(self) -> int:
        return len(self._tasks)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._tasks))

    async def close(self) -> None:
        """Cancel every owned task and wait until all have finished.

        Tasks spawned while closing (a cancelled task's cleanup may start one) are
        cancelled too.
        """
        while self._tasks:
            tasks = list(self._tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self._tasks.difference_update(tasks)
