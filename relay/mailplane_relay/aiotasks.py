"""Small helpers for the background tasks every relay component owns."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task we own and wait for it to end. Its own CancelledError is absorbed; a
    cancellation of the caller still propagates (a bare ``suppress(CancelledError)`` would
    swallow that too)."""
    if task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
