"""An asyncio server run by its own thread and event loop, for tests whose own code is blocking
(or runs in another loop) and talks to it over the network.

``serve`` is an async context manager factory: entering it starts the server (bound to port 0)
and gives what the test needs (its URL, the object behind it); leaving it stops the server. The
thread runs it on a new loop::

    @contextlib.asynccontextmanager
    async def issuer() -> AsyncIterator[str]:
        ... await site.start() ...
        try:
            yield url
        finally:
            await runner.cleanup()

    with serving_in_thread(issuer, name="oidc-issuer") as served:
        served.value, served.loop   # the url; the loop, for run_coroutine_threadsafe

A server that fails to start raises here, with its exception as the cause; one that fails
while stopping raises when the block ends (unless the block is already raising).
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")

# Bound a hang only: starting waits for the server itself, however slow the machine is.
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0


@dataclass
class LoopThread(Generic[T]):
    value: T
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread


@contextlib.contextmanager
def serving_in_thread(serve: Callable[[], AbstractAsyncContextManager[T]], *,
                      name: str) -> Iterator[LoopThread[T]]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    stop = asyncio.Event()
    values: list[T] = []
    errors: list[BaseException] = []

    async def run() -> None:
        async with serve() as value:
            values.append(value)
            started.set()
            await stop.wait()

    def main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(run())
        except BaseException as exc:  # reported to the test's thread
            errors.append(exc)
        finally:
            started.set()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=main, name=name, daemon=True)
    thread.start()
    if not started.wait(START_TIMEOUT):
        raise RuntimeError(f"{name} did not start in {START_TIMEOUT:.0f}s")
    if not values:
        thread.join(STOP_TIMEOUT)
        raise RuntimeError(f"{name} did not start: {errors[0]!r}") from errors[0]
    try:
        yield LoopThread(values[0], loop, thread)
    finally:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the thread has ended
            loop.call_soon_threadsafe(stop.set)
        thread.join(STOP_TIMEOUT)
        if sys.exc_info()[1] is None:
            if thread.is_alive():
                raise RuntimeError(f"{name} did not stop in {STOP_TIMEOUT:.0f}s")
            if errors:
                raise RuntimeError(f"{name} failed: {errors[0]!r}") from errors[0]
