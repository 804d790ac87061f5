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
from mailplane_relay.store import (
    MessageLog,
    SqliteBackend,
    StoreBackend,
    StoreError,
    SuppressionList,
    complaint_hash,
)
from mailplane_relay.store.backend import PEER_MEMORY
from mailplane_relay.store.erasure import (
    PEER_HORIZON,
    UNREACHABLE,
    carry_out_requests,
    erase_across_pool,
    erase_address,
)
from mailplane_relay.store.factory import read_erasure_key

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


async def complain(backend: StoreBackend, address: str) -> None:
    await backend.suppression_upsert(address, "complaint", "fbl", time.time())
    await erase_address(backend, address)


async def test_the_erasure_key_from_a_file_keeps_earlier_hashes_working(
    stores: tuple[StoreBackend, Records], tmp_path: Path,
) -> None:
    backend, _records = stores
    metrics = RelayMetrics.create(CollectorRegistry())
    # Before: the key kept in the store hashes an erased complaint.
    await complain(backend, "old@dest.test")
    stored_key = await backend.erasure_key()
    # The key moves to a file (a Secret): new hashes use it; the earlier hash still suppresses.
    key_file = tmp_path / "erasure-key"
    key_file.write_text("ab" * 32 + "\n")
    backend.configured_keys = (read_erasure_key(str(key_file)),)
    assert await backend.erasure_key() == bytes.fromhex("ab" * 32)
    await complain(backend, "new@dest.test")
    entries = {e["address"] for e in await backend.suppression_list()}
    assert complaint_hash(bytes.fromhex("ab" * 32), "new@dest.test") in entries
    assert complaint_hash(stored_key, "old@dest.test") in entries
    cache = SuppressionList(backend, metrics, refresh_interval=3600)
    await cache.refresh()
    assert cache.is_suppressed("Old@dest.test") and cache.is_suppressed("new@dest.test")
    assert not cache.is_suppressed("other@dest.test")


async def test_with_a_key_file_the_store_never_holds_a_key(
    stores: tuple[StoreBackend, Records], tmp_path: Path,
) -> None:
    backend, _records = stores
    backend.configured_keys = (b"k" * 32,)
    await complain(backend, "x@dest.test")
    cache = SuppressionList(backend, RelayMetrics.create(CollectorRegistry()),
                            refresh_interval=3600)
    await cache.refresh()
    assert cache.is_suppressed("x@dest.test")
    assert await backend.erasure_keys() == [b"k" * 32]  # none made in the store


@pytest.mark.parametrize(("content", "problem"), [
    ("abcd", "shorter than 32 bytes"),
    ("", "shorter than 32 bytes"),
])
def test_a_bad_erasure_key_file_is_refused_naming_it(tmp_path: Path, content: str,
                                                      problem: str) -> None:
    path = tmp_path / "key"
    path.write_text(content)
    with pytest.raises(StoreError, match=problem):
        read_erasure_key(str(path))
    with pytest.raises(StoreError, match="cannot read it"):
        read_erasure_key(str(tmp_path / "missing"))
