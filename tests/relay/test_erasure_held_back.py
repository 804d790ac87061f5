"""Writes held back while the database was down do not undo an erasure made before they reach
it (docs/store.md, "When the database is down"): a real PostgreSQL is stopped while a worker
records log rows and suppression entries, started again, the addresses are erased from
elsewhere, and only then does the worker write what it held."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog
from mailplane_relay.store.backend import LogQuery, complaint_hash
from mailplane_relay.store.erasure import erase_across_pool
from mailplane_relay.store.postgres import PostgresBackend
from mailplane_relay.store.suppression import SuppressionList
from tests.helpers.postgres import PostgresServer

pytestmark = pytest.mark.slow

GONE, ANGRY, OPEN, STAY = ("gone@dest.test", "angry@dest.test", "open@dest.test",
                           "stay@dest.test")


def event(i: int, *, sender: str = "app@example.com", recipient: str) -> LogEvent:
    return LogEvent(ts=time.time(), status="delivered", queue_id=f"Q{i}",
                    message_id=f"<m{i}@example.com>", credential="app", sender=sender,
                    recipient=recipient, response="250 2.0.0 Ok", size=100, attempt=1,
                    remote="mx.dest.test")


async def queue_ids(backend: PostgresBackend, **filters: str) -> list[str]:
    return sorted(str(r["queue_id"]) for r in await backend.query(LogQuery(**filters)))


async def test_held_back_log_rows_and_suppression_entries_respect_a_later_erasure(
    pg_server: PostgresServer, tmp_path: Path,
) -> None:
    dsn = pg_server.dsn(pg_server.create_database())
    worker, cli = PostgresBackend(dsn), PostgresBackend(dsn)
    await worker.open()
    await cli.open()
    metrics = RelayMetrics.create(CollectorRegistry())
    # One log with a disk buffer (the relay's default with PostgreSQL), one holding in memory.
    on_disk = MessageLog(worker, flush_interval=3600, metrics=metrics,
                         buffer_dir=str(tmp_path / "buffer"))
    in_memory = MessageLog(worker, flush_interval=3600,
                           metrics=RelayMetrics.create(CollectorRegistry()))
    supp = SuppressionList(worker, metrics, refresh_interval=3600,
                           cache_file=str(tmp_path / "suppression.json"))
    for part in (on_disk, in_memory, supp):
        await part.start()
    try:
        await asyncio.to_thread(pg_server.stop, "fast")
        try:
            on_disk.record(event(1, recipient=GONE))
            on_disk.record(event(2, sender=GONE.upper(), recipient=STAY))
            on_disk.record(event(3, recipient=STAY))
            on_disk.record(event(4, recipient=OPEN))
            in_memory.record(event(5, recipient=GONE))
            in_memory.record(event(6, recipient=STAY))
            for log in (on_disk, in_memory):
                with pytest.raises(Exception):  # noqa: B017 - whatever the driver raises
                    await log.flush()
            assert on_disk.pending == 4 and in_memory.pending == 2
            for address, reason in ((GONE, "hard_bounce"), (ANGRY, "complaint"),
                                    (OPEN, "hard_bounce"), (STAY, "hard_bounce")):
                with pytest.raises(Exception):  # noqa: B017
                    await supp.add(address, reason, source="bounce")
            assert supp.is_suppressed(GONE) is not None  # held by this worker meanwhile
        finally:
            await asyncio.to_thread(pg_server.start)

        # The database is back; erasures are made elsewhere before this worker writes: two
        # closed (their addresses dropped, only keyed hashes kept) and one still open.
        for address in (GONE, ANGRY):
            _id, _report, complete = await erase_across_pool(cli, address, wait_for=10)
            assert complete
        await cli.erasure_request(OPEN, time.time())
        # Mail to an erased address after its erasure is new data, and is logged.
        on_disk.record(event(7, recipient=GONE))

        assert await on_disk.replay() == 4
        await on_disk.flush()
        await in_memory.flush()
        await supp.send_unsent()
    finally:
        for part in (on_disk, in_memory, supp):
            await part.close()

    assert await queue_ids(cli, recipient=GONE) == ["Q7"]
    assert await queue_ids(cli, sender=GONE) == []
    assert await queue_ids(cli, recipient=OPEN) == []
    assert await queue_ids(cli, recipient=STAY) == ["Q3", "Q6"]
    assert on_disk.pending == in_memory.pending == 0
    assert on_disk.replay_erased._value.get() == 3  # type: ignore[attr-defined]
    assert in_memory.replay_erased._value.get() == 1  # type: ignore[attr-defined]

    key = await cli.erasure_key()
    entries = {e["address"]: e["reason"] for e in await cli.suppression_list()}
    # The complaint stays, as the erasure leaves a complaint: its keyed hash only.
    assert entries == {STAY: "hard_bounce", complaint_hash(key, ANGRY): "complaint"}
    assert supp.is_suppressed(GONE) is None
    assert supp.is_suppressed(STAY) is not None
    await worker.close()
    await cli.close()
