"""The helper that runs a test server in its own thread and event loop."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest

from tests.helpers.loopthread import serving_in_thread


def test_the_server_serves_on_its_loop_until_the_block_ends() -> None:
    stopped: list[bool] = []

    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[int]:
        async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(await reader.readline())
            await writer.drain()
            writer.close()

        server = await asyncio.start_server(echo, "127.0.0.1", 0)
        try:
            yield int(server.sockets[0].getsockname()[1])
        finally:
            server.close()
            await server.wait_closed()
            stopped.append(True)

    with serving_in_thread(serve, name="echo") as served:
        with socket.create_connection(("127.0.0.1", served.value), timeout=30) as conn:
            conn.sendall(b"hello\n")
            assert conn.makefile("rb").readline() == b"hello\n"
        running = asyncio.run_coroutine_threadsafe(asyncio.sleep(0, "on its loop"), served.loop)
        assert running.result(30) == "on its loop"
        assert not stopped
    assert stopped == [True]
    assert not served.thread.is_alive()


def test_a_server_that_cannot_start_raises_with_its_error_as_the_cause() -> None:
    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        raise OSError(98, "Address already in use")
        yield

    with (pytest.raises(RuntimeError, match="broken did not start") as info,
          serving_in_thread(serve, name="broken")):
        raise AssertionError("the block must not run")
    assert isinstance(info.value.__cause__, OSError)


def test_a_failure_while_stopping_is_raised_when_the_block_ends() -> None:
    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[None]:
        yield
        raise ValueError("cleanup failed")

    with (pytest.raises(RuntimeError, match="failing failed") as info,
          serving_in_thread(serve, name="failing")):
        pass
    assert isinstance(info.value.__cause__, ValueError)
