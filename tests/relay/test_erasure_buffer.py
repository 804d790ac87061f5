"""Erasure meets the message log's disk buffer: rows that waited on disk while the pool's
PostgreSQL store was down must not be written back after the address was erased."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.app import _adopt_store_buffers
from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import LogQuery, MessageLog
from mailplane_relay.store.backend import LogRow, OutboxRow
from mailplane_relay.store.erasure import carry_out_requests, erase_across_pool
from mailplane_relay.store.postgres import PostgresBackend
from mailplane_relay.store.sync import query_log
from tests.helpers.ports import refusing_port
from tests.helpers.relayproc import RelayProcess


class Outage:
    """The real backend, with writes failing while ``down`` (the database is unreachable)."""

    def __init__(self, backend: PostgresBackend) -> None:
        self.backend = backend
        self.down = False
        self.description = backend.description

    async def write_events(self, rows: list[LogRow],
                           outbox: list[OutboxRow] | None = None) -> None:
        if self.down:
            raise OSError("connection refused")
        await self.backend.write_events(rows, outbox)

    def __getattr__(self, name: str) -> Any:
        # Reads (the erasures a replay checks against) go to the real backend.
        return getattr(self.backend, name)


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
            held = await mlog.drain()
            return {"message_log_held": held} if held else {}

        await carry_out_requests(backend, "pod-0/w0", worker_part)  # seen alive
        erase = asyncio.create_task(erase_across_pool(backend, "gone@dest.test",
                                                      wait_for=30, poll=0.05))
        while not erase.done():
            await carry_out_requests(backend, "pod-0/w0", worker_part)
            await asyncio.sleep(0.05)
        _, report, complete = await erase
        # The buffered rows naming the address were left out by the worker's drain (recorded
        # before the request), never written to the store.
        assert report.counts["message_log_held"] == 2
        assert report.counts["message_log"] == 0
        assert complete

        # The writer replays whatever is left afterwards: the erased rows never come back.
        await mlog.replay()
        rows = await backend.query(LogQuery(limit=100))
        assert [r["recipient"] for r in rows] == ["stay@dest.test"]
        assert b"gone@" not in b"".join(p.read_bytes() for p in buffer_dir.iterdir()).lower()
        assert mlog.pending == 0
    finally:
        await mlog.close()


def test_buffers_of_workers_no_longer_run_are_adopted_and_their_caches_deleted(
    tmp_path: Path,
) -> None:
    """Fewer workers than before: the rows a removed worker buffered are replayed by the worker
    that adopts them (not left on the volume for good), and its suppression cache, which may
    name addresses erased since, is deleted."""
    root = tmp_path / "store-buffer"
    for j in (0, 2, 3):
        (root / f"w{j}" / "log").mkdir(parents=True)
        (root / f"w{j}" / "suppression.json").write_text('{"entries": {"gone@dest.test": []}}')
    (root / "w2" / "log" / "00000000000000000001-7.jsonl").write_text('["e1"]\n')
    assert _adopt_store_buffers(root, 2, 0) == 1
    assert sorted(p.name for p in (root / "w0" / "log").iterdir()) == [
        "00000000000000000001-7.jsonl"]
    assert not (root / "w2").exists()  # rows moved, cache deleted
    assert (root / "w0" / "suppression.json").exists()  # its own stays
    assert (root / "w3" / "suppression.json").exists()  # worker 1's to adopt
    assert _adopt_store_buffers(root, 2, 1) == 0
    assert not (root / "w3").exists()


async def test_a_relay_replays_the_buffer_of_a_worker_it_no_longer_runs(
    relay_factory: Callable[..., RelayProcess], pg_dsn: str, tmp_path: Path,
) -> None:
    """A pod that ran two workers restarts with one: the rows the second worker buffered
    during an outage reach the store, and its stale suppression cache leaves the volume."""
    dsn_file = tmp_path / "store-dsn"
    dsn_file.write_text(pg_dsn + "\n")
    relay = relay_factory(smarthost_port=9,  # no mail is sent
                          extra={"store": {"backend": "postgresql", "dsnFile": str(dsn_file)}})
    stale = relay.state_dir / "store-buffer" / "w1"
    (stale / "log").mkdir(parents=True)
    # Recent: a row older than the retention (90 days) is purged as soon as it is replayed.
    row = ["stale-1", time.time() - 60, "received", "QSTALE", "<s@x>", "app", "", "app@x.test",
           "someone@dest.test", "250 2.0.0 Ok", 10, 0, None]
    (stale / "log" / "00000000000000000001-1.jsonl").write_text(json.dumps(row) + "\n")
    (stale / "suppression.json").write_text('{"key": null, "entries": {"gone@dest.test": '
                                            '["manual", 1.0]}}')
    await asyncio.to_thread(relay.start)
    # A bound that only ends a hang: on a loaded 2-core machine the first connection to the
    # store and the replay have taken over 20 s.
    deadline = time.monotonic() + 90
    while not await asyncio.to_thread(query_log, pg_dsn, queue_id="QSTALE"):
        assert time.monotonic() < deadline, "the stale worker's rows never reached the store"
        await asyncio.sleep(0.1)
    assert not stale.exists()


async def test_an_erasure_while_a_relay_restarts_waits_for_its_spool(
    relay_factory: Callable[..., RelayProcess], pg_dsn: str, backend: PostgresBackend,
    tmp_path: Path,
) -> None:
    """A relay stopped cleanly (a rolling restart) with a message for the address still in its
    spool: an erasure meanwhile must not be reported complete; the relay carries it out when
    it is back, and the message leaves its spool."""
    dsn_file = tmp_path / "store-dsn"
    dsn_file.write_text(pg_dsn + "\n")
    with refusing_port() as port:  # the next hop refuses: the message stays queued
        relay = relay_factory(smarthost_port=port, extra={
            "store": {"backend": "postgresql", "dsnFile": str(dsn_file)},
            "queue": {"retryInitial": "1h", "retryMax": "1h", "retryJitter": 0.0}})
        await asyncio.to_thread(relay.start)
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "app@example.com", "gone@dest.test", "hi"
        msg.set_content("body\n")
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                               tls_context=relay.client_tls(), start_tls=True, timeout=15)
        await smtp.connect()
        await smtp.login("app", "app-password")
        await smtp.send_message(msg)
        await smtp.quit()
        assert await asyncio.to_thread(relay.stop) == 0
        assert len(relay.spooled_files()) == 1  # kept for after the restart

        request_id, _report, complete = await erase_across_pool(
            backend, "gone@dest.test", wait_for=1.0, poll=0.2)
        assert not complete  # the stopped relay's spool still names the address

        await asyncio.to_thread(relay.start)
        deadline = time.monotonic() + 90
        while True:
            state = await backend.erasure_state(request_id, time.time(), 60.0)
            assert state is not None
            if state.completed is not None:
                break
            assert time.monotonic() < deadline, "the restarted relay never carried it out"
            await asyncio.sleep(0.2)
        assert state.report is not None and state.report.get("spool_messages_deleted") == 1
        assert "workers_unreachable" not in state.report
        assert relay.spooled_files() == []
        await asyncio.to_thread(relay.stop)
