"""TaskSet: owned tasks are cancelled and awaited on close; failures are logged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from difs_p2p.tasks import TaskSet


async def test_close_cancels_and_awaits_every_task() -> None:
    tasks = TaskSet("test")
    cleaned: list[str] = []

    async def forever(tag: str) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(tag)

    a = tasks.spawn(forever("a"))
    b = tasks.spawn(forever("b"))
    await asyncio.sleep(0)
    assert len(tasks) == 2
    await tasks.close()
    assert a.cancelled() and b.cancelled()
    assert sorted(cleaned) == ["a", "b"]
    assert len(tasks) == 0


async def test_finished_tasks_leave_the_set() -> None:
    tasks = TaskSet("test")
    task = tasks.spawn(asyncio.sleep(0, result=7))
    assert await task == 7
    await asyncio.sleep(0)
    assert len(tasks) == 0


async def test_failure_is_logged_with_the_owner(caplog: pytest.LogCaptureFixture) -> None:
    tasks = TaskSet("owner-x")

    async def boom() -> None:
        raise RuntimeError("bad")

    with caplog.at_level(logging.WARNING, logger="difs_p2p.tasks"):
        task = tasks.spawn(boom())
        await asyncio.gather(task, return_exceptions=True)
        await asyncio.sleep(0)
    assert "owner-x task failed" in caplog.text and "bad" in caplog.text


async def test_tasks_spawned_during_close_are_cancelled_too() -> None:
    tasks = TaskSet("test")
    late: list[asyncio.Task[None]] = []

    async def spawner() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            late.append(tasks.spawn(asyncio.Event().wait()))  # type: ignore[arg-type]

    tasks.spawn(spawner())
    await asyncio.sleep(0)
    await tasks.close()
    assert late and late[0].cancelled()
    assert len(tasks) == 0
