"""MessageLog and SuppressionList against a real SQLite file (WAL), several processes included."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.events import LogEvent
from mailplane_relay.messagelog import (
    DELETE_CHUNK,
    EARLY_FLUSH_EVENTS,
    MessageLog,
    MessageLogError,
    SuppressionList,
)
from mailplane_relay.metrics import RelayMetrics


def event(i: int = 0, **kw: object) -> LogEvent:
    base: dict[str, object] = dict(
        ts=1_700_000_000.0 + i, status="received", queue_id=f"Q{i}", message_id=f"<m{i}@x>",
        credential="app", sender="noreply@example.com", recipient=f"user{i}@dest.test",
        response="250 2.0.0 Ok", size=1234,
    )
    base.update(kw)
    return LogEvent(**base)  # type: ignore[arg-type]


@pytest.fixture
def metrics() -> RelayMetrics:
    return RelayMetrics.create(CollectorRegistry())


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "log" / "messagelog.sqlite3")


@pytest.fixture
async def mlog(db: str, metrics: RelayMetrics) -> AsyncIterator[MessageLog]:
    ml = MessageLog(db, flush_interval=3600, metrics=metrics)
    await ml.start()
    yield ml
    await ml.close()


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_events_are_buffered_until_flush(mlog: MessageLog, db: str) -> None:
    for i in range(5):
        mlog.record(event(i))
    assert MessageLog.query(db) == []
    assert mlog.pending == 5
    await mlog.flush()
    rows = MessageLog.query(db)
    assert [r["queue_id"] for r in rows] == ["Q4", "Q3", "Q2", "Q1", "Q0"]  # newest first
    assert rows[0] == {
        "ts": 1_700_000_004.0, "status": "received", "queue_id": "Q4", "message_id": "<m4@x>",
        "credential": "app", "sender": "noreply@example.com", "recipient": "user4@dest.test",
        "response": "250 2.0.0 Ok", "size": 1234, "attempt": None, "remote": None,
    }


async def test_background_writer_flushes_on_its_interval(db: str, metrics: RelayMetrics) -> None:
    ml = MessageLog(db, flush_interval=0.05, metrics=metrics)
    await ml.start()
    try:
        ml.record(event(1))
        deadline = time.monotonic() + 5
        while not MessageLog.query(db):
            assert time.monotonic() < deadline, "the writer task never flushed"
            await asyncio.sleep(0.02)
        assert ml.pending == 0
    finally:
        await ml.close()


async def test_a_burst_is_written_before_the_interval(db: str, metrics: RelayMetrics) -> None:
    ml = MessageLog(db, flush_interval=3600, metrics=metrics)
    await ml.start()
    try:
        for i in range(EARLY_FLUSH_EVENTS):
            ml.record(event(i))
        deadline = time.monotonic() + 5
        while len(MessageLog.query(db, limit=EARLY_FLUSH_EVENTS)) < EARLY_FLUSH_EVENTS:
            assert time.monotonic() < deadline, "a full buffer waited for the interval"
            await asyncio.sleep(0.02)
    finally:
        await ml.close()


async def test_close_flushes_what_is_left(db: str, metrics: RelayMetrics) -> None:
    ml = MessageLog(db, flush_interval=3600, metrics=metrics)
    await ml.start()
    ml.record(event(7))
    await ml.close()
    assert [r["queue_id"] for r in MessageLog.query(db)] == ["Q7"]


async def test_overflow_is_bounded_and_counted(db: str, metrics: RelayMetrics) -> None:
    ml = MessageLog(db, flush_interval=3600, metrics=metrics, max_buffered=10)
    for i in range(15):
        ml.record(event(i))
    assert ml.pending == 10
    assert sample(metrics, "mailplane_relay_messagelog_dropped_events_total") == 5


async def test_query_filters(mlog: MessageLog, db: str) -> None:
    mlog.record(event(1, sender="a@one.test", recipient="x@dest.test"))
    mlog.record(event(2, sender="B@two.test", recipient="y@dest.test", status="delivered"))
    mlog.record(event(3, sender="b@two.test", recipient="z@other.test", status="bounced"))
    mlog.record(event(4, sender="", recipient="a@one.test", status="delivered", queue_id="QQ"))
    await mlog.flush()

    def ids(**kw: object) -> list[str | None]:
        return [r["queue_id"] for r in MessageLog.query(db, **kw)]  # type: ignore[arg-type]

    assert ids(sender="b@two.test") == ["Q3", "Q2"]  # any case
    assert ids(sender="@two.test") == ["Q3", "Q2"]
    assert ids(recipient="@dest.test") == ["Q2", "Q1"]
    assert ids(recipient="A@ONE.TEST") == ["QQ"]
    assert ids(status="delivered") == ["QQ", "Q2"]
    assert ids(since=1_700_000_002.0, until=1_700_000_004.0) == ["Q3", "Q2"]
    assert ids(queue_id="QQ") == ["QQ"]
    assert ids(limit=1) == ["QQ"]
    assert ids(sender="@two.test", status="bounced") == ["Q3"]
    assert ids(sender="_@two.test") == []  # LIKE wildcards are literal
    with pytest.raises(ValueError, match=r"unknown status 'sent'.*delivered"):
        MessageLog.query(db, status="sent")


def test_query_of_a_missing_database_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(MessageLogError, match="no message log there"):
        MessageLog.query(str(tmp_path / "nope.sqlite3"))


async def test_purge_by_retention(mlog: MessageLog, db: str, metrics: RelayMetrics) -> None:
    now = 1_800_000_000.0
    day = 86400.0
    old = [event(i, ts=now - 91 * day + i) for i in range(DELETE_CHUNK * 2 + 10)]
    for e in old:
        mlog.record(e)
    mlog.record(event(1, ts=now - 89 * day, queue_id="KEEP"))
    await mlog.flush()
    SuppressionList.add_entry(db, "old@dest.test", "hard_bounce", now=now - 400 * day)
    SuppressionList.add_entry(db, "new@dest.test", "hard_bounce", now=now - 10 * day)

    removed = await mlog.purge(now=now, message_log_retention=90 * day,
                               suppression_retention=365 * day)

    assert removed == len(old) + 1
    assert [r["queue_id"] for r in MessageLog.query(db, limit=10_000)] == ["KEEP"]
    assert [e["address"] for e in SuppressionList.list_entries(db)] == ["new@dest.test"]
    assert sample(metrics, "mailplane_relay_purged_records_total", table="message_log") == len(old)
    assert sample(metrics, "mailplane_relay_purged_records_total", table="suppression") == 1
    assert sample(metrics, "mailplane_relay_last_purge_timestamp_seconds") == now


async def test_forget_deletes_every_record_of_an_address(mlog: MessageLog, db: str) -> None:
    mlog.record(event(1, sender="Gone@example.com", recipient="x@dest.test"))
    mlog.record(event(2, sender="other@example.com", recipient="gone@example.com"))
    mlog.record(event(3, sender="other@example.com", recipient="stay@dest.test"))
    await mlog.flush()
    SuppressionList.add_entry(db, "gone@example.com", "complaint")
    mlog.record(event(4, sender="gone@example.com"))  # still buffered: forget flushes first

    counts = await mlog.forget("GONE@example.com")

    assert counts == {"message_log": 3, "suppression": 1}
    assert [r["queue_id"] for r in MessageLog.query(db)] == ["Q3"]
    assert SuppressionList.list_entries(db) == []
    conn = sqlite3.connect(db)
    leftovers = [row for table in ("message_log", "suppression", "suppression_changes")
                 for row in conn.execute(f"SELECT * FROM {table}")
                 if any("gone@" in str(v).lower() for v in row)]
    conn.close()
    assert leftovers == [], "the address must not survive anywhere in the file"
    raw = b"".join(Path(p).read_bytes() for p in (db, db + "-wal") if Path(p).exists())
    assert b"gone@example.com" not in raw.lower(), "deleted bytes linger in the files"
    assert b"other@example.com" in raw  # the check can see addresses at all
    assert MessageLog.forget_address(db, "gone@example.com") == {"message_log": 0,
                                                                   "suppression": 0}


def test_schema_stores_no_body_or_subject(tmp_path: Path) -> None:
    db = str(tmp_path / "m.sqlite3")
    SuppressionList.add_entry(db, "a@b.test")  # creates the schema
    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(message_log)")}
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert columns == {"id"} | {f.name for f in dataclasses.fields(LogEvent)}
    assert not {"body", "subject", "data", "content"} & columns
    assert mode == "wal"


_WRITER = textwrap.dedent("""
    import asyncio, sys
    from prometheus_client import CollectorRegistry
    from mailplane_relay.events import LogEvent
    from mailplane_relay.messagelog import MessageLog
    from mailplane_relay.metrics import RelayMetrics

    async def main(path, tag, n):
        ml = MessageLog(path, flush_interval=0.01, metrics=RelayMetrics.create(CollectorRegistry()))
        await ml.start()
        for i in range(n):
            ml.record(LogEvent(ts=float(i), status="received", queue_id=f"{tag}-{i}",
                               message_id=None, credential=None, sender="s@x.test",
                               recipient="r@y.test", response=None, size=1))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await ml.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


def test_two_processes_write_the_same_file(db: str) -> None:
    n = 3000
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, db, tag, str(n)])
        for tag in ("w0", "w1")
    ]
    for p in procs:
        assert p.wait(timeout=60) == 0
    rows = MessageLog.query(db, limit=10 * n)
    ids = {r["queue_id"] for r in rows}
    assert len(rows) == 2 * n
    assert ids == {f"{t}-{i}" for t in ("w0", "w1") for i in range(n)}


async def test_suppression_cache_picks_up_entries_written_elsewhere(
    db: str, metrics: RelayMetrics
) -> None:
    supp = SuppressionList(db, metrics, refresh_interval=0.05)
    await supp.start()
    try:
        assert supp.is_suppressed("x@dest.test") is None
        SuppressionList.add_entry(db, "X@Dest.test", "complaint", now=123.0)  # as the CLI does
        await supp.wait_refreshed()
        assert supp.is_suppressed("x@DEST.test") == ("complaint", 123.0)
        assert sample(metrics, "mailplane_relay_suppression_entries") == 1

        assert SuppressionList.remove_entry(db, "x@dest.test")
        await supp.wait_refreshed()
        assert supp.is_suppressed("x@dest.test") is None
        assert sample(metrics, "mailplane_relay_suppression_entries") == 0
        assert not SuppressionList.remove_entry(db, "x@dest.test")
    finally:
        await supp.close()


async def test_suppression_add_applies_at_once_and_persists(
    db: str, metrics: RelayMetrics
) -> None:
    supp = SuppressionList(db, metrics, refresh_interval=3600)
    await supp.start()
    await supp.add("Bounced@Dest.test", "hard_bounce", source="delivery")
    assert supp.is_suppressed("bounced@dest.test") is not None
    await supp.close()
    [entry] = SuppressionList.list_entries(db)
    assert entry["address"] == "bounced@dest.test"
    assert (entry["reason"], entry["source"]) == ("hard_bounce", "delivery")

    again = SuppressionList(db, metrics, refresh_interval=3600)
    await again.start()
    try:
        assert again.is_suppressed("BOUNCED@dest.test") is not None
        assert len(again) == 1
        assert await again.refresh() is False  # nothing changed: no reload
    finally:
        await again.close()


async def test_a_locked_database_keeps_the_batch_and_retries(
    db: str, metrics: RelayMetrics
) -> None:
    ml = MessageLog(db, flush_interval=3600, metrics=metrics, busy_timeout=0.05)
    await ml.start()
    try:
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process stuck inside a write
        ml.record(event(1))
        ml.record(event(2))
        with pytest.raises(sqlite3.OperationalError, match="locked"):
            await ml.flush()
        ml.record(event(3))
        assert ml.pending == 3
        assert sample(metrics, "mailplane_relay_messagelog_write_errors_total") == 1
        blocker.execute("ROLLBACK")
        blocker.close()

        await ml.flush()
        assert [r["queue_id"] for r in MessageLog.query(db)] == ["Q3", "Q2", "Q1"]
        assert sample(metrics, "mailplane_relay_messagelog_dropped_events_total") == 0
    finally:
        await ml.close()


async def test_a_forgotten_address_leaves_every_cache(
    mlog: MessageLog, db: str, metrics: RelayMetrics
) -> None:
    SuppressionList.add_entry(db, "gone@dest.test", "complaint")
    SuppressionList.add_entry(db, "stays@dest.test", "complaint")
    supp = SuppressionList(db, metrics, refresh_interval=3600)
    await supp.start()
    try:
        assert supp.is_suppressed("gone@dest.test") is not None
        MessageLog.forget_address(db, "gone@dest.test")  # as `mailplane logs forget` does
        assert await supp.refresh()
        assert supp.is_suppressed("gone@dest.test") is None
        assert supp.is_suppressed("stays@dest.test") is not None
        assert supp.full_reloads == 2
    finally:
        await supp.close()


async def test_suppression_cache_reads_only_changes_and_reloads_after_a_gap(
    mlog: MessageLog, db: str, metrics: RelayMetrics
) -> None:
    for i in range(50):
        SuppressionList.add_entry(db, f"old{i}@dest.test", "hard_bounce")
    supp = SuppressionList(db, metrics, refresh_interval=3600)
    await supp.start()
    try:
        assert (len(supp), supp.full_reloads) == (50, 1)

        SuppressionList.add_entry(db, "new@dest.test", "complaint")
        SuppressionList.add_entry(db, "old0@dest.test", "manual")  # an update
        assert SuppressionList.remove_entry(db, "old1@dest.test")
        assert await supp.refresh()
        assert supp.full_reloads == 1  # the delta was enough
        assert supp.is_suppressed("new@dest.test") is not None
        assert supp.is_suppressed("old0@dest.test")[0] == "manual"  # type: ignore[index]
        assert supp.is_suppressed("old1@dest.test") is None
        assert len(supp) == 50

        # Changes this cache never saw are pruned: it must notice the gap and reload fully.
        for i in range(5):
            SuppressionList.add_entry(db, f"later{i}@dest.test", "hard_bounce")
        assert SuppressionList.remove_entry(db, "old2@dest.test")
        await mlog.purge(now=time.time(), message_log_retention=1e9, suppression_retention=1e9,
                         changes_kept=2)
        assert await supp.refresh()
        assert supp.full_reloads == 2
        assert len(supp) == 54
        assert supp.is_suppressed("later0@dest.test") is not None
        assert supp.is_suppressed("old2@dest.test") is None
    finally:
        await supp.close()
