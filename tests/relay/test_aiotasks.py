"""cancel_and_wait absorbs the owned task's cancellation, never the caller's."""

from __future__ import annotations

import asyncio

import pytest

from mailplane_relay.aiotasks import cancel_and_wait


async def test_the_owned_task_is_cancelled_and_awaited() -> None:
    task = asyncio.create_task(asyncio.sleep(60))
    await cancel_and_wait(task)
    assert task.cancelled()
    await cancel_and_wait(task)  # already done: nothing to do


async def test_a_cancellation_of_the_caller_still_propagates() -> None:
    started = asyncio.Event()

    async def stubborn() -> None:
        started.set()
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            await asyncio.sleep(60)  # slow to stop: the caller is cancelled meanwhile
            raise

    owned = asyncio.create_task(stubborn())
    await started.wait()
    closer = asyncio.create_task(cancel_and_wait(owned))
    await asyncio.sleep(0.01)
    closer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await closer
    owned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await owned
