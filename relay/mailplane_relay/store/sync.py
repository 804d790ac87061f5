"""Blocking helpers over the store, for scripts and tests that are not coroutines.

``target`` is a SQLite file path or a PostgreSQL connection string (``postgresql://…`` or
``host=… dbname=…``). Each call opens the store, runs, and closes it, on its own event loop in
a separate thread, so it works whether or not the caller is inside an event loop.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from .backend import EraseReport, LogQuery, StoreBackend
from .sqlite import SqliteBackend
from .suppression import normalise

T = TypeVar("T")


def is_postgres(target: str) -> bool:
    return target.startswith(("postgresql://", "postgres://")) or "dbname=" in target


def backend_at(target: str, *, readonly: bool = False) -> StoreBackend:
    if is_postgres(target):
        from .postgres import PostgresBackend  # noqa: PLC0415 - psycopg only when used

        return PostgresBackend(target, pool_size=1)
    return SqliteBackend(target, readonly=readonly)


def with_store(target: str, fn: Callable[[StoreBackend], Awaitable[T]], *,
               readonly: bool = False) -> T:
    async def run() -> T:
        backend = backend_at(target, readonly=readonly)
        await backend.open()
        try:
            return await fn(backend)
        finally:
            await backend.close()

    result: list[T] = []
    error: list[BaseException] = []

    def thread() -> None:
        try:
            result.append(asyncio.run(run()))
        except BaseException as exc:  # handed to the caller's thread
            error.append(exc)

    t = threading.Thread(target=thread, name="store-sync")
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def query_log(target: str, **filters: Any) -> list[dict[str, Any]]:
    q = LogQuery(**filters)
    return with_store(target, lambda b: b.query(q), readonly=True)


def list_suppression(target: str) -> list[dict[str, Any]]:
    return with_store(target, lambda b: b.suppression_list(), readonly=True)


def add_suppression(target: str, address: str, reason: str = "manual", *,
                    source: str = "cli", now: float | None = None) -> None:
    created = time.time() if now is None else now
    with_store(target, lambda b: b.suppression_upsert(normalise(address), reason, source,
                                                      created))


def remove_suppression(target: str, address: str) -> bool:
    return with_store(target, lambda b: b.suppression_delete(normalise(address)))


def erase(target: str, address: str) -> EraseReport:
    from .erasure import erase_address  # noqa: PLC0415

    return with_store(target, lambda b: erase_address(b, address))
