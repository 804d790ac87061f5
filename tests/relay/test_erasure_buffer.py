"""Erasure meets the message log's disk buffer: rows that waited on disk while the pool's
PostgreSQL store was down must not be written back after the address was erased."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import LogQuery, MessageLog
from mailplane_relay.store.backend import LogRow
from mailplane_relay.store.erasure import carry_out_requests, erase_across_pool
from mailplane_relay.store.postgres import PostgresBackend


class Outage:
    """The real backend, with writes failing while ``down`` (the database is unreachable)."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend
        self.down = False
        self.description = backend.description

    async def write_events(self, rows: list[LogRow]) -> None:
        if self.down:
            raise OSError("connection refused")
        await self.backend.write_events(rows)


@pytest.fixture
async def backend(pg_dsn: str) -> AsyncIterator[PostgresBackend]:
    b = PostgresBackend(pg_dsn)
    await b.open()
    yield b
    await b.close()


def event(i: int, sender: str, recipient: str) -> LogEvent:
    return LogEvent(ts=1_700_000_000.0 + i, status="received", queue_id=f"Q{i}",
                    message_id=f"<m{i}@x>", credential="app", sender=sender,
                    recipient=recipient, response="250 2.0.0 Ok", size=100)


async def test_rows_buffered_on_disk_are_not_written_back_after_an_erasure(
    backend: PostgresBackend, tmp_path: Path,
) -> None:
    outage = Outage(backend)
    buffer_dir = tmp_path / "store-buffer" / "w0" / "log"
    mlog = MessageLog(outage, flush_interval=3600,  # type: ignore[arg-type]
                      metrics=RelayMetrics.create(CollectorRegistry()),
                      buffer_dir=str(buffer_dir))
    await mlog.start()
    try:
        # The database is down: the rows wait on disk.
        outage.down = True
        mlog.record(event(1, "app@example.com", "Gone@dest.test"))
        mlog.record(event(2, "app@example.com", "stay@dest.test"))
        mlog.record(event(3, "gone@dest.test", "friend@dest.test"))
        with pytest.raises(OSError):
            await mlog.drain()
        assert b"gone@dest.test" in b"".join(
            p.read_bytes() for p in buffer_dir.iterdir()).lower()
        outage.down = False

        # The database is back and someone erases the address before the replay ran (a long
        # backlog is replayed 20 files at a time). This worker carries out the request the
        # way a relay worker does: its spool part, then its message log.
        async def worker_part(address: str) -> dict[str, int]:
            await mlog.drain()
            return {}

        await carry_out_requests(backend, "pod-0/w0", worker_part)  # seen alive
        erase = asyncio.create_task(erase_across_pool(backend, "gone@dest.test",
                                                      wait_for=30, poll=0.05))
        while not erase.done():
            await carry_out_requests(backend, "pod-0/w0", worker_part)
            await asyncio.sleep(0.05)
        _, report, complete = await erase
        assert report.counts["message_log"] >= 2  # the buffered rows reached the final pass
        assert complete

        # The writer replays whatever is left afterwards: the erased rows never come back.
        await mlog.replay()
        rows = await backend.query(LogQuery(limit=100))
        assert [r["recipient"] for r in rows] == ["stay@dest.test"]
        assert b"gone@" not in b"".join(p.read_bytes() for p in buffer_dir.iterdir()).lower()
        assert mlog.pending == 0
    finally:
        await mlog.close()
