"""Privacy promises of the store beyond the message log, on both real backends: the portal's
records follow the retention; an erasure that could not reach every worker says so."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailplane_portal.records import Records
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog, SqliteBackend, StoreBackend
from mailplane_relay.store.backend import PEER_MEMORY
from mailplane_relay.store.erasure import (
    PEER_HORIZON,
    UNREACHABLE,
    carry_out_requests,
    erase_across_pool,
)

DAY = 86400.0


@pytest.fixture(params=["sqlite", "postgresql"])
async def stores(request: pytest.FixtureRequest, tmp_path: Path
                 ) -> AsyncIterator[tuple[StoreBackend, Records]]:
    """The relay's backend and the portal's records on one database."""
    backend: StoreBackend
    if request.param == "sqlite":
        db = str(tmp_path / "store.sqlite3")
        backend, records = SqliteBackend(db), Records(sqlite_path=db)
    else:
        from mailplane_relay.store.postgres import PostgresBackend

        dsn = request.getfixturevalue("pg_dsn")
        backend, records = PostgresBackend(dsn), Records(dsn=dsn)
    await backend.open()
    await records.open()
    yield backend, records
    await records.close()
    await backend.close()


async def count(records: Records, table: str) -> int:
    rows = await records._all(f"SELECT count(*) AS n FROM {table}")
    return int(rows[0]["n"])


async def test_the_portals_audit_log_and_erasure_records_are_purged_with_the_log(
    stores: tuple[StoreBackend, Records],
) -> None:
    backend, records = stores
    now = time.time()
    clock: Callable[[], float]
    for age in (100 * DAY, 91 * DAY, 89 * DAY, 1.0):
        clock = lambda age=age: now - age  # noqa: E731
        await records.audit("team-a", "jane", "suppression.add", "x@dest.test", clock=clock)
        e = await records.erasure_create("team-a", "jane", f"y{age}@dest.test", "h")
        await records._do("UPDATE portal_erasures SET created = ? WHERE id = ?",
                          (now - age, e.id))
    metrics = RelayMetrics.create(CollectorRegistry())
    mlog = MessageLog(backend, flush_interval=3600, metrics=metrics)
    await mlog.purge(now=now, message_log_retention=90 * DAY, suppression_retention=365 * DAY,
                     changes_retention=DAY)
    assert await count(records, "portal_audit") == 2
    assert await count(records, "portal_erasures") == 2
    assert metrics.registry.get_sample_value(
        "mailplane_relay_purged_records_total", {"table": "portal_audit"}) == 2
    assert metrics.registry.get_sample_value(
        "mailplane_relay_purged_records_total", {"table": "portal_erasures"}) == 2


async def test_without_the_portals_tables_the_purge_does_nothing_to_them(tmp_path: Path) -> None:
    backend = SqliteBackend(str(tmp_path / "store.sqlite3"))
    await backend.open()
    try:
        assert await backend.purge_portal(time.time()) == {}
    finally:
        await backend.close()


async def test_an_erasure_that_skipped_a_down_worker_is_reported_incomplete(
    stores: tuple[StoreBackend, Records],
) -> None:
    backend, _records = stores
    now = time.time()

    async def spool_part(_address: str) -> dict[str, int]:
        return {"spool_messages_deleted": 0}

    async def worker() -> None:
        while not await carry_out_requests(backend, "live", spool_part):
            await asyncio.sleep(0.05)

    await backend.peers("live", now, PEER_HORIZON)
    # Every worker alive: complete.
    _done, (_rid, report, complete) = await asyncio.gather(
        worker(), erase_across_pool(backend, "a@dest.test", wait_for=20, poll=0.05))
    assert complete and UNREACHABLE not in report.counts
    # A worker last seen ten minutes ago (down) is not waited for, and not forgotten either.
    await backend.peers("down", now - 600, PEER_HORIZON)
    _done, (_rid, report, complete) = await asyncio.gather(
        worker(), erase_across_pool(backend, "b@dest.test", wait_for=20, poll=0.05))
    assert not complete and report.counts[UNREACHABLE] == 1
    # A worker not seen for over a day is gone for good (its row is purged): not counted.
    await backend.peers("down", now - PEER_MEMORY - 60, PEER_HORIZON)
    _done, (_rid, report, complete) = await asyncio.gather(
        worker(), erase_across_pool(backend, "c@dest.test", wait_for=20, poll=0.05))
    assert complete
