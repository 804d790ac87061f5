"""The store behind its interface, against both real backends: a SQLite file (WAL) and a
PostgreSQL server the session starts (tests/helpers/postgres.py). Each test that takes
``backend`` runs once per backend; ``other`` is a second, independent connection to the same
store (what the CLI, another worker or another pod holds)."""

from __future__ import annotations

import asyncio
import dataclasses
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import (
    LogQuery,
    MessageLog,
    SqliteBackend,
    StoreBackend,
    StoreError,
    SuppressionList,
    complaint_hash,
)
from mailplane_relay.store.backend import LOG_COLUMNS
from mailplane_relay.store.erased import erased_since
from mailplane_relay.store.erasure import complete_if_done, erase_address
from mailplane_relay.store.messagelog import EARLY_FLUSH_EVENTS
from mailplane_relay.store.sqlite import DELETE_CHUNK


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


@pytest.fixture(params=["sqlite", "postgresql"])
def make_backend(request: pytest.FixtureRequest, db: str) -> Callable[[], StoreBackend]:
    if request.param == "sqlite":
        return lambda: SqliteBackend(db)
    from mailplane_relay.store.postgres import PostgresBackend

    dsn = request.getfixturevalue("pg_dsn")
    return lambda: PostgresBackend(dsn)


@pytest.fixture
async def backend(make_backend: Callable[[], StoreBackend]) -> AsyncIterator[StoreBackend]:
    b = make_backend()
    await b.open()
    yield b
    await b.close()


@pytest.fixture
async def other(make_backend: Callable[[], StoreBackend],
                backend: StoreBackend) -> AsyncIterator[StoreBackend]:
    b = make_backend()
    await b.open()
    yield b
    await b.close()


@pytest.fixture
async def mlog(backend: StoreBackend, metrics: RelayMetrics) -> AsyncIterator[MessageLog]:
    ml = MessageLog(backend, flush_interval=3600, metrics=metrics)
    await ml.start()
    yield ml
    await ml.close()


async def query(b: StoreBackend, **kw: object) -> list[dict[str, object]]:
    return await b.query(LogQuery(**kw))  # type: ignore[arg-type]


def sample(metrics: RelayMetrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_events_are_buffered_until_flush(mlog: MessageLog, other: StoreBackend) -> None:
    for i in range(5):
        mlog.record(event(i, namespace="team-a" if i else None))
    assert await query(other) == []
    assert mlog.pending == 5
    await mlog.flush()
    rows = await query(other)
    assert [r["queue_id"] for r in rows] == ["Q4", "Q3", "Q2", "Q1", "Q0"]  # newest first
    assert rows[0] == {
        "ts": 1_700_000_004.0, "status": "received", "queue_id": "Q4", "message_id": "<m4@x>",
        "credential": "app", "namespace": "team-a", "sender": "noreply@example.com",
        "recipient": "user4@dest.test", "response": "250 2.0.0 Ok", "size": 1234,
        "attempt": None, "remote": None,
    }


async def test_the_tenant_comes_from_the_credential(
    backend: StoreBackend, metrics: RelayMetrics
) -> None:
    owners = {"app": "team-a", "billing": "team-b"}
    ml = MessageLog(backend, flush_interval=3600, metrics=metrics, tenant_of=owners.get)  # type: ignore[arg-type]
    await ml.start()
    ml.record(event(1, credential="app"))
    ml.record(event(2, credential="billing"))
    ml.record(event(3, credential=None))
    await ml.close()
    assert [r["queue_id"] for r in await query(backend, namespace="team-a")] == ["Q1"]
    assert [r["queue_id"] for r in await query(backend, namespace="team-b")] == ["Q2"]
    assert [r["namespace"] for r in await query(backend, queue_id="Q3")] == [None]
    assert [r["queue_id"] for r in await query(backend, credential="billing")] == ["Q2"]


async def test_a_replayed_batch_is_stored_once(mlog: MessageLog, backend: StoreBackend) -> None:
    mlog.record(event(1))
    mlog.record(event(2))
    batch = list(mlog._buffer)
    await mlog.flush()
    await backend.write_events(batch)  # the same events again (outcome of a write unknown)
    await backend.write_events(batch[1:])
    assert [r["queue_id"] for r in await query(backend)] == ["Q2", "Q1"]


async def test_background_writer_flushes_on_its_interval(
    backend: StoreBackend, metrics: RelayMetrics
) -> None:
    ml = MessageLog(backend, flush_interval=0.05, metrics=metrics)
    await ml.start()
    try:
        ml.record(event(1))
        deadline = time.monotonic() + 5
        while not await query(backend):
            assert time.monotonic() < deadline, "the writer task never flushed"
            await asyncio.sleep(0.02)
        assert ml.pending == 0
    finally:
        await ml.close()


async def test_a_burst_is_written_before_the_interval(
    backend: StoreBackend, metrics: RelayMetrics
) -> None:
    ml = MessageLog(backend, flush_interval=3600, metrics=metrics)
    await ml.start()
    try:
        for i in range(EARLY_FLUSH_EVENTS):
            ml.record(event(i))
        deadline = time.monotonic() + 10
        while len(await query(backend, limit=EARLY_FLUSH_EVENTS)) < EARLY_FLUSH_EVENTS:
            assert time.monotonic() < deadline, "a full buffer waited for the interval"
            await asyncio.sleep(0.05)
    finally:
        await ml.close()


async def test_close_flushes_what_is_left(backend: StoreBackend, metrics: RelayMetrics) -> None:
    ml = MessageLog(backend, flush_interval=3600, metrics=metrics)
    await ml.start()
    ml.record(event(7))
    await ml.close()
    assert [r["queue_id"] for r in await query(backend)] == ["Q7"]


async def test_overflow_is_bounded_and_counted(db: str, metrics: RelayMetrics) -> None:
    ml = MessageLog(SqliteBackend(db), flush_interval=3600, metrics=metrics, max_buffered=10)
    for i in range(15):
        ml.record(event(i))
    assert ml.pending == 10
    assert sample(metrics, "mailplane_relay_messagelog_dropped_events_total") == 5


async def test_query_filters(mlog: MessageLog, backend: StoreBackend) -> None:
    mlog.record(event(1, sender="a@one.test", recipient="x@dest.test"))
    mlog.record(event(2, sender="B@two.test", recipient="y@dest.test", status="delivered"))
    mlog.record(event(3, sender="b@two.test", recipient="z@other.test", status="bounced"))
    mlog.record(event(4, sender="", recipient="a@one.test", status="delivered", queue_id="QQ"))
    mlog.record(event(5, sender="c@xtwo.test", recipient="q@dest.test", queue_id="Q5"))
    await mlog.flush()

    async def ids(**kw: object) -> list[object]:
        return [r["queue_id"] for r in await query(backend, **kw)]

    assert await ids(sender="b@two.test") == ["Q3", "Q2"]  # any case
    assert await ids(sender="@two.test") == ["Q3", "Q2"]  # a domain, not a suffix
    assert await ids(sender="@TWO.test") == ["Q3", "Q2"]
    assert await ids(recipient="@dest.test") == ["Q5", "Q2", "Q1"]
    assert await ids(recipient="A@ONE.TEST") == ["QQ"]
    assert await ids(status="delivered") == ["QQ", "Q2"]
    assert await ids(since=1_700_000_002.0, until=1_700_000_004.0) == ["Q3", "Q2"]
    assert await ids(queue_id="QQ") == ["QQ"]
    assert await ids(limit=1) == ["Q5"]
    assert await ids(sender="@two.test", status="bounced") == ["Q3"]
    assert await ids(sender="_@two.test") == []  # LIKE wildcards are literal
    with pytest.raises(ValueError, match=r"unknown status 'sent'.*delivered"):
        LogQuery(status="sent")


async def test_a_missing_sqlite_file_names_the_fix(tmp_path: Path) -> None:
    b = SqliteBackend(str(tmp_path / "nope.sqlite3"), readonly=True)
    with pytest.raises(StoreError, match="no message log there"):
        await b.open()
    await b.close()


async def test_purge_by_retention(mlog: MessageLog, backend: StoreBackend,
                                  metrics: RelayMetrics) -> None:
    now = 1_800_000_000.0
    day = 86400.0
    old = [event(i, ts=now - 91 * day + i) for i in range(DELETE_CHUNK * 2 + 10)]
    for e in old:
        mlog.record(e)
    mlog.record(event(1, ts=now - 89 * day, queue_id="KEEP"))
    await mlog.flush()
    await backend.suppression_upsert("old@dest.test", "hard_bounce", "bounce", now - 400 * day)
    await backend.suppression_upsert("new@dest.test", "hard_bounce", "bounce", now - 10 * day)
    assert await backend.oldest_records() == {"message_log": now - 91 * day,
                                              "suppression": now - 400 * day}

    removed = await mlog.purge(now=now, message_log_retention=90 * day,
                               suppression_retention=365 * day, changes_retention=day)

    assert removed == len(old) + 1
    assert [r["queue_id"] for r in await query(backend, limit=10_000)] == ["KEEP"]
    assert [e["address"] for e in await backend.suppression_list()] == ["new@dest.test"]
    assert await backend.oldest_event() == now - 89 * day
    # The proof per table: what is left is within each table's retention.
    assert await backend.oldest_records() == {"message_log": now - 89 * day,
                                              "suppression": now - 10 * day}
    assert sample(metrics, "mailplane_relay_purged_records_total", table="message_log") == len(old)
    assert sample(metrics, "mailplane_relay_purged_records_total", table="suppression") == 1
    assert sample(metrics, "mailplane_relay_last_purge_timestamp_seconds") == now


async def test_an_erased_complaints_hash_leaves_at_the_suppression_retention_of_the_complaint(
    mlog: MessageLog, backend: StoreBackend, metrics: RelayMetrics
) -> None:
    # A complaint kept as a keyed hash after an erasure is purged a year after the complaint,
    # like any suppression entry (not 90 days after it, the message log's cap, nor a year
    # after the erasure).
    now = 1_800_000_000.0
    day = 86400.0
    await backend.suppression_upsert("old@dest.test", "complaint", "fbl", now - 366 * day)
    await backend.suppression_upsert("kept@dest.test", "complaint", "fbl", now - 100 * day)
    await erase_address(backend, "old@dest.test")
    await erase_address(backend, "kept@dest.test")
    key = await backend.erasure_key()
    assert await backend.oldest_records() == {"message_log": None,
                                              "suppression": now - 366 * day}

    await mlog.purge(now=now, message_log_retention=90 * day,
                     suppression_retention=365 * day, changes_retention=day)

    assert [(e["address"], e["created"]) for e in await backend.suppression_list()] == [
        (complaint_hash(key, "kept@dest.test"), now - 100 * day)]
    assert await backend.oldest_records() == {"message_log": None,
                                              "suppression": now - 100 * day}
    assert sample(metrics, "mailplane_relay_purged_records_total", table="suppression") == 1


async def test_a_closed_erasure_is_remembered_by_keyed_hash_for_the_logs_retention(
    mlog: MessageLog, backend: StoreBackend
) -> None:
    # What a held-back write checks (store/erased.py): an open request by its address, a
    # closed one by its keyed hash only, until the message log's retention has passed.
    now = time.time()
    closed = await backend.erasure_request("Closed@dest.test", now - 10)
    await backend.erasure_request("open@dest.test", now - 5)
    state = await complete_if_done(backend, closed, now=now)
    assert state is not None and state.completed is not None and state.address is None
    marks = await backend.erasures_since(now - 100)
    assert sorted((m.address is None, m.address_hash is None) for m in marks) == [
        (False, True), (True, False)]  # the open one by address, the closed one by hash only
    assert all("closed@" not in str(m) for m in marks)

    erased = await erased_since(backend, now - 100)
    assert erased.erased("CLOSED@dest.test", now - 11)  # recorded before the request
    assert not erased.erased("closed@dest.test", now - 9)  # recorded after it: new mail
    assert erased.erased("open@dest.test", now - 6)
    assert not erased.erased("other@dest.test", now - 100)
    assert not (await erased_since(backend, now)).erased("open@dest.test", now - 6)

    # Past the message log's retention no held-back row can name it: the hash goes.
    await mlog.purge(now=now + 91 * 86400, message_log_retention=90 * 86400,
                     suppression_retention=365 * 86400, changes_retention=86400)
    assert [m.address for m in await backend.erasures_since(now - 100)] == ["open@dest.test"]


async def test_erase_deletes_every_record_of_an_address(
    mlog: MessageLog, backend: StoreBackend
) -> None:
    mlog.record(event(1, sender="Gone@example.com", recipient="x@dest.test"))
    mlog.record(event(2, sender="other@example.com", recipient="gone@example.com"))
    mlog.record(event(3, sender="other@example.com", recipient="stay@dest.test"))
    await mlog.flush()
    await backend.suppression_upsert("gone@example.com", "hard_bounce", "bounce", 1.0)

    report = await erase_address(backend, "GONE@example.com")

    assert report.counts == {"message_log": 2, "suppression": 1}
    assert [r["queue_id"] for r in await query(backend)] == ["Q3"]
    assert await backend.suppression_list() == []
    assert (await erase_address(backend, "gone@example.com")).counts == {"message_log": 0}


async def test_an_erased_complaint_stays_suppressed_as_a_keyed_hash(
    backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    await backend.suppression_upsert("angry@dest.test", "complaint", "fbl", 5.0)
    key = await backend.erasure_key()
    assert await other.erasure_key() == key  # one key for the whole store
    supp = SuppressionList(backend, metrics, refresh_interval=3600)
    await supp.start()
    try:
        report = await erase_address(other, "Angry@dest.test")
        assert report.counts == {"message_log": 0, "suppression": 1,
                                 "suppression_kept_as_hash": 1}
        [entry] = await backend.suppression_list()
        assert entry["address"] == complaint_hash(key, "angry@dest.test")
        assert "angry" not in entry["address"] and entry["address"].startswith("hmac-sha256:")
        assert await supp.refresh()
        assert supp.is_suppressed("ANGRY@dest.test") == ("complaint", 5.0)
        assert supp.is_suppressed("calm@dest.test") is None
    finally:
        await supp.close()


async def test_a_complaint_is_not_overwritten_by_a_later_bounce_or_manual_entry(
    backend: StoreBackend,
) -> None:
    await backend.suppression_upsert("angry@dest.test", "complaint", "fbl", 5.0)
    await backend.suppression_upsert("angry@dest.test", "hard bounce: 550 5.1.1", "bounce", 6.0)
    await backend.suppression_upsert("angry@dest.test", "manual", "portal:shop:alice", 7.0)
    [entry] = await backend.suppression_list()
    assert (entry["reason"], entry["source"]) == ("complaint", "fbl")
    await backend.suppression_upsert("bounced@dest.test", "hard bounce: 550", "bounce", 5.0)
    await backend.suppression_upsert("bounced@dest.test", "complaint", "fbl", 6.0)
    assert {e["address"]: e["reason"] for e in await backend.suppression_list()} == {
        "angry@dest.test": "complaint", "bounced@dest.test": "complaint"}


async def test_suppression_cache_picks_up_entries_written_elsewhere(
    backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    supp = SuppressionList(backend, metrics, refresh_interval=0.05)
    await supp.start()
    try:
        assert supp.is_suppressed("x@dest.test") is None
        await other.suppression_upsert("x@dest.test", "complaint", "cli", 123.0)
        await supp.wait_refreshed()
        assert supp.is_suppressed("X@DEST.test") == ("complaint", 123.0)
        assert sample(metrics, "mailplane_relay_suppression_entries") == 1

        assert await other.suppression_delete("x@dest.test")
        await supp.wait_refreshed()
        assert supp.is_suppressed("x@dest.test") is None
        assert sample(metrics, "mailplane_relay_suppression_entries") == 0
        assert not await other.suppression_delete("x@dest.test")
    finally:
        await supp.close()


async def test_suppression_add_applies_at_once_and_persists(
    backend: StoreBackend, metrics: RelayMetrics
) -> None:
    supp = SuppressionList(backend, metrics, refresh_interval=3600)
    await supp.start()
    await supp.add("Bounced@Dest.test", "hard_bounce", source="delivery")
    assert supp.is_suppressed("bounced@dest.test") is not None
    await supp.close()
    [entry] = await backend.suppression_list()
    assert entry["address"] == "bounced@dest.test"
    assert (entry["reason"], entry["source"]) == ("hard_bounce", "delivery")

    again = SuppressionList(backend, metrics, refresh_interval=3600)
    await again.start()
    try:
        assert again.is_suppressed("BOUNCED@dest.test") is not None
        assert len(again) == 1
        assert await again.refresh() is False  # nothing changed: no reload
    finally:
        await again.close()


async def test_an_erased_address_leaves_every_cache(
    backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    await other.suppression_upsert("gone@dest.test", "hard_bounce", "bounce", 1.0)
    await other.suppression_upsert("stays@dest.test", "hard_bounce", "bounce", 1.0)
    supp = SuppressionList(backend, metrics, refresh_interval=3600)
    await supp.start()
    try:
        assert supp.is_suppressed("gone@dest.test") is not None
        await erase_address(other, "gone@dest.test")
        assert await supp.refresh()
        assert supp.is_suppressed("gone@dest.test") is None
        assert supp.is_suppressed("stays@dest.test") is not None
        assert supp.full_reloads == 2
    finally:
        await supp.close()


async def test_suppression_cache_reads_only_changes_and_reloads_after_a_gap(
    mlog: MessageLog, backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    for i in range(50):
        await other.suppression_upsert(f"old{i}@dest.test", "hard_bounce", "bounce", 1.0)
    supp = SuppressionList(backend, metrics, refresh_interval=3600)
    await supp.start()
    try:
        assert (len(supp), supp.full_reloads) == (50, 1)

        await other.suppression_upsert("new@dest.test", "complaint", "cli", 2.0)
        await other.suppression_upsert("old0@dest.test", "manual", "cli", 2.0)  # an update
        assert await other.suppression_delete("old1@dest.test")
        assert await supp.refresh()
        assert supp.full_reloads == 1  # the delta was enough
        assert supp.is_suppressed("new@dest.test") is not None
        assert supp.is_suppressed("old0@dest.test")[0] == "manual"  # type: ignore[index]
        assert supp.is_suppressed("old1@dest.test") is None
        assert len(supp) == 50

        # Changes this cache never saw are trimmed by age: it must notice and reload fully.
        for i in range(5):
            await other.suppression_upsert(f"later{i}@dest.test", "hard_bounce", "bounce", 1.0)
        assert await other.suppression_delete("old2@dest.test")
        await mlog.purge(now=time.time() + 10, message_log_retention=1e12,
                         suppression_retention=1e12, changes_retention=1)
        assert await supp.refresh()
        assert supp.full_reloads == 2
        assert len(supp) == 54
        assert supp.is_suppressed("later0@dest.test") is not None
        assert supp.is_suppressed("old2@dest.test") is None
    finally:
        await supp.close()


async def test_suppression_changes_are_trimmed_by_age_not_count(
    backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    mlog = MessageLog(backend, flush_interval=3600, metrics=metrics)
    for i in range(3):
        await other.suppression_upsert(f"a{i}@dest.test", "hard_bounce", "bounce", 1.0)
    await mlog.purge(now=time.time(), message_log_retention=1e12, suppression_retention=1e12,
                     changes_retention=3600)
    supp = SuppressionList(backend, metrics, refresh_interval=3600)
    await supp.start()
    try:
        first = supp._version
        await other.suppression_upsert("b@dest.test", "hard_bounce", "bounce", 1.0)
        # Recent changes are kept however many there are: the delta still works.
        assert await supp.refresh() and supp.full_reloads == 1
        assert supp._version > first
    finally:
        await supp.close()


async def test_leases_never_grant_more_than_the_limit(
    backend: StoreBackend, other: StoreBackend
) -> None:
    async def take(b: StoreBackend) -> int:
        total = 0
        while (n := await b.lease("quota", "app", 20_000, 7, 100)):
            total += n
        return total

    got = await asyncio.gather(take(backend), take(other), take(backend))
    assert sum(got) == 100
    await other.give_back("quota", "app", 20_000, 5)
    assert await backend.lease("quota", "app", 20_000, 10, 100) == 5
    assert await backend.lease("rate", "app", 20_000, 10, 100) == 10  # its own counter


async def test_reputation_counts_add_up_across_writers(
    backend: StoreBackend, other: StoreBackend
) -> None:
    await backend.reputation_add({("app", 100): (5, 1), ("app", 101): (1, 0)})
    await other.reputation_add({("app", 101): (2, 3), ("web", 101): (1, 0)})
    assert await backend.reputation_window(99) == {"app": (8, 4), "web": (1, 0)}
    assert await other.reputation_window(100) == {"app": (3, 3), "web": (1, 0)}
    await backend.complaints_add({("app", 100): 1, ("app", 101): 1})
    await other.complaints_add({("app", 101): 2, ("web", 101): 1})
    assert await backend.complaints_window(99) == {"app": 4, "web": 1}
    assert await other.complaints_window(100) == {"app": 3, "web": 1}


async def test_complaints_per_sender_domain_add_up_and_leave_after_a_week(
    backend: StoreBackend, other: StoreBackend, mlog: MessageLog, request: pytest.FixtureRequest
) -> None:
    """The intake's count per (credential, sender domain, minute), read by the portal's
    figures; kept as long as the per-credential complaint counts (7 days)."""
    minute = int(time.time() // 60)
    week = 7 * 24 * 60
    await backend.domain_complaints_add({("app", "example.com", minute): 1,
                                         ("app", "example.com", minute - week - 5): 3})
    await other.domain_complaints_add({("app", "example.com", minute): 2,
                                       ("app", "example.org", minute): 1,
                                       ("web", "example.com", minute): 1})

    async def counts() -> dict[tuple[str, str, int], int]:
        sql = "SELECT credential, domain, minute, complaints FROM complaint_domain_buckets"
        if isinstance(backend, SqliteBackend):
            with sqlite3.connect(backend.path) as conn:
                found = conn.execute(sql).fetchall()
        else:
            import psycopg

            async with await psycopg.AsyncConnection.connect(
                    request.getfixturevalue("pg_dsn")) as conn:
                found = await (await conn.execute(sql)).fetchall()
        return {(c, d, int(m)): int(n) for c, d, m, n in found}

    assert await counts() == {("app", "example.com", minute): 3,
                              ("app", "example.com", minute - week - 5): 3,
                              ("app", "example.org", minute): 1,
                              ("web", "example.com", minute): 1}
    await mlog.purge(now=time.time(), message_log_retention=90 * 86400.0,
                     suppression_retention=365 * 86400.0, changes_retention=86400.0)
    assert ("app", "example.com", minute - week - 5) not in await counts()
    assert len(await counts()) == 3


# ---- SQLite specifics ---------------------------------------------------------------------


async def test_sqlite_schema_stores_no_body_subject_or_client_address(db: str) -> None:
    b = SqliteBackend(db)
    await b.open()
    await b.close()
    conn = sqlite3.connect(db)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(message_log)")}
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    conn.close()
    assert columns == {"id", "event_id"} | {f.name for f in dataclasses.fields(LogEvent)}
    assert not {"body", "subject", "data", "content", "client", "peer"} & columns
    assert mode == "wal"


async def test_sqlite_erase_leaves_no_bytes_of_the_address(mlog: MessageLog, db: str,
                                                          backend: StoreBackend) -> None:
    if not isinstance(backend, SqliteBackend):
        pytest.skip("file contents are a SQLite matter")
    mlog.record(event(1, sender="gone@example.com", recipient="x@dest.test"))
    mlog.record(event(2, sender="other@example.com", recipient="gone@example.com"))
    mlog.record(event(3, sender="other@example.com", recipient="stay@dest.test"))
    await mlog.flush()
    await backend.suppression_upsert("gone@example.com", "hard_bounce", "bounce", 1.0)
    await erase_address(backend, "gone@example.com")
    conn = sqlite3.connect(db)
    leftovers = [row for table in ("message_log", "suppression", "suppression_changes")
                 for row in conn.execute(f"SELECT * FROM {table}")
                 if any("gone@" in str(v).lower() for v in row)]
    conn.close()
    assert leftovers == [], "the address must not survive anywhere in the file"
    raw = b"".join(Path(p).read_bytes() for p in (db, db + "-wal") if Path(p).exists())
    assert b"gone@example.com" not in raw.lower(), "deleted bytes linger in the files"
    assert b"other@example.com" in raw  # the check can see addresses at all


def test_sqlite_version_1_files_are_migrated_and_lose_client_addresses(db: str) -> None:
    Path(db).parent.mkdir(parents=True)
    conn = sqlite3.connect(db)
    conn.executescript("""
        CREATE TABLE schema_version (version INTEGER NOT NULL);
        INSERT INTO schema_version VALUES (1);
        CREATE TABLE message_log (id INTEGER PRIMARY KEY, ts REAL NOT NULL, status TEXT NOT NULL,
            queue_id TEXT, message_id TEXT, credential TEXT, sender TEXT NOT NULL COLLATE NOCASE,
            recipient TEXT COLLATE NOCASE, response TEXT, size INTEGER, attempt INTEGER,
            remote TEXT);
        INSERT INTO message_log (ts, status, queue_id, sender, recipient, remote)
            VALUES (1, 'received', 'A', 's@x.test', 'r@y.test', '192.0.2.7'),
                   (2, 'delivered', 'A', 's@x.test', 'r@y.test', 'mx.y.test tls');
        CREATE TABLE suppression (address TEXT PRIMARY KEY, reason TEXT NOT NULL,
            source TEXT NOT NULL, created REAL NOT NULL);
        INSERT INTO suppression VALUES ('old@y.test', 'complaint', 'cli', 1);
        CREATE TABLE suppression_changes (seq INTEGER PRIMARY KEY AUTOINCREMENT,
            address TEXT NOT NULL);
    """)
    conn.close()

    async def read() -> list[dict[str, object]]:
        b = SqliteBackend(db)
        await b.open()
        try:
            # A complaint from before the counted column was counted then: not claimable.
            assert await b.suppression_claim("old@y.test") is False
            await b.suppression_upsert("new@y.test", "complaint", "cli", 2.0)
            assert await b.suppression_claim("new@y.test") is True
            return await query(b)
        finally:
            await b.close()

    rows = asyncio.run(read())
    assert [(r["status"], r["remote"]) for r in rows] == [
        ("delivered", "mx.y.test tls"), ("received", None)]
    assert sqlite3.connect(db).execute("SELECT version FROM schema_version").fetchone() == (2,)


_WRITER = textwrap.dedent("""
    import asyncio, sys
    from prometheus_client import CollectorRegistry
    from mailplane_relay.events import LogEvent
    from mailplane_relay.metrics import RelayMetrics
    from mailplane_relay.store import MessageLog, SqliteBackend

    async def main(path, tag, n):
        backend = SqliteBackend(path)
        await backend.open()
        ml = MessageLog(backend, flush_interval=0.01,
                        metrics=RelayMetrics.create(CollectorRegistry()))
        await ml.start()
        for i in range(n):
            ml.record(LogEvent(ts=float(i), status="received", queue_id=f"{tag}-{i}",
                               message_id=None, credential=None, sender="s@x.test",
                               recipient="r@y.test", response=None, size=1))
            if i % 50 == 0:
                await asyncio.sleep(0)
        await ml.close()
        await backend.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
""")


async def test_two_processes_write_the_same_sqlite_file(db: str) -> None:
    n = 3000
    procs = [
        subprocess.Popen([sys.executable, "-c", _WRITER, db, tag, str(n)])
        for tag in ("w0", "w1")
    ]
    for p in procs:
        assert await asyncio.to_thread(p.wait, 60) == 0
    b = SqliteBackend(db, readonly=True)
    await b.open()
    rows = await query(b, limit=10 * n)
    await b.close()
    assert len(rows) == 2 * n
    assert {r["queue_id"] for r in rows} == {f"{t}-{i}" for t in ("w0", "w1") for i in range(n)}


async def test_a_locked_sqlite_database_keeps_the_batch_and_retries(
    db: str, metrics: RelayMetrics
) -> None:
    backend = SqliteBackend(db, busy_timeout=0.05)
    await backend.open()
    ml = MessageLog(backend, flush_interval=3600, metrics=metrics)
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
        assert [r["queue_id"] for r in await query(backend)] == ["Q3", "Q2", "Q1"]
        assert sample(metrics, "mailplane_relay_messagelog_dropped_events_total") == 0
    finally:
        await ml.close()
        await backend.close()


async def test_an_erasure_request_waits_for_live_workers_only(
    backend: StoreBackend, other: StoreBackend, mlog: MessageLog
) -> None:
    from mailplane_relay.store.erasure import carry_out_requests, erase_across_pool

    now = time.time()
    await backend.peers("w1", now, 60)
    await backend.peers("w2", now, 60)
    await backend.peers("old", now - 3600, 60)  # not seen for an hour: not waited for
    mlog.record(event(1, recipient="gone@dest.test"))
    await mlog.flush()
    request_id, report, complete = await erase_across_pool(other, "Gone@dest.test", wait=False)
    assert not complete and report.counts == {"message_log": 1}
    [(rid, address)] = await backend.erasure_pending("w1")
    assert (rid, address) == (request_id, "gone@dest.test")

    async def spool_part(addr: str) -> dict[str, int]:
        assert addr == "gone@dest.test"
        return {"spool_messages_deleted": 1}

    assert await carry_out_requests(backend, "w1", spool_part) == 1
    state = await backend.erasure_state(request_id, time.time(), 60)
    assert state is not None and state.waiting == 1 and state.address == "gone@dest.test"
    await backend.peer_gone("w2")  # w2 stops: the request completes without it
    assert await carry_out_requests(backend, "w1", spool_part) == 0
    state = await backend.erasure_state(request_id, time.time(), 60)
    assert state is not None and state.waiting == 0
    from mailplane_relay.store.erasure import complete_if_done

    state = await complete_if_done(other, request_id)
    assert state is not None and state.completed is not None
    assert state.address is None  # the address is dropped, the counts kept
    # "old" (seen an hour ago, down) was not waited for: its spool was not erased, and the
    # report says so instead of claiming the erasure complete.
    assert state.report == {"message_log": 0, "spool_messages_deleted": 1, "workers": 1,
                            "workers_unreachable": 1}
    from mailplane_relay.store.erasure import is_complete

    assert not is_complete(state.report)


async def test_a_complaint_is_claimed_for_counting_once_and_never_one_the_intake_counted(
    backend: StoreBackend, other: StoreBackend
) -> None:
    # Written by hand (the CLI): the first claimer, of two connections, counts it.
    await backend.suppression_upsert("hand@dest.test", "complaint", "cli", 1.0)
    assert [await backend.suppression_claim("hand@dest.test"),
            await other.suppression_claim("hand@dest.test")] == [True, False]
    # Received by the intake, which counted it then: nobody claims it.
    await backend.suppression_upsert("fbl@dest.test", "complaint", "feedback", 1.0)
    assert await other.suppression_claim("fbl@dest.test") is False
    # Not complaints: nothing to count.
    await backend.suppression_upsert("gone@dest.test", "hard_bounce", "delivery", 1.0)
    assert await backend.suppression_claim("gone@dest.test") is False
    # A bounce turned into a complaint by hand is a new complaint; the same complaint written
    # again is not (and the intake's receipt of one written by hand leaves it counted).
    await backend.suppression_upsert("gone@dest.test", "complaint", "cli", 2.0)
    assert await other.suppression_claim("gone@dest.test") is True
    await backend.suppression_upsert("gone@dest.test", "complaint", "cli", 3.0)
    assert await other.suppression_claim("gone@dest.test") is False
    await backend.suppression_upsert("late@dest.test", "complaint", "cli", 1.0)
    await backend.suppression_upsert("late@dest.test", "complaint", "feedback", 2.0)
    assert await other.suppression_claim("late@dest.test") is False


async def test_a_team_s_own_entry_stops_only_that_team_s_mail(
    backend: StoreBackend, other: StoreBackend, metrics: RelayMetrics
) -> None:
    supp = SuppressionList(backend, metrics, refresh_interval=0.05)
    await supp.start()
    try:
        # Team A suppresses x through the portal: its own entry, written by another process.
        await other.suppression_upsert("x@dest.test", "manual", "portal:team-a:alice", 1.0,
                                       namespace="team-a")
        await supp.wait_refreshed()
        assert supp.is_suppressed("X@dest.test", "team-a") == ("manual", 1.0)
        assert supp.is_suppressed("x@dest.test", "team-b") is None
        assert supp.is_suppressed("x@dest.test") is None  # a client of no namespace
        # Team B's own entry for the same address is a second entry, not a takeover.
        await other.suppression_upsert("x@dest.test", "manual", "portal:team-b:bob", 2.0,
                                       namespace="team-b")
        # A delivery fact is pool-wide and stops everybody's mail.
        await other.suppression_upsert("x@dest.test", "hard bounce: 550", "delivery", 3.0)
        await supp.wait_refreshed()
        assert {(e["namespace"], e["source"]) for e in await backend.suppression_list()} == {
            ("", "delivery"), ("team-a", "portal:team-a:alice"), ("team-b", "portal:team-b:bob")}
        assert supp.is_suppressed("x@dest.test", "team-c") == ("hard bounce: 550", 3.0)
        assert supp.is_suppressed("x@dest.test") == ("hard bounce: 550", 3.0)

        # Removing one scope leaves the others.
        assert await other.suppression_delete("x@dest.test", "")
        assert await other.suppression_delete("x@dest.test", "team-b")
        assert not await other.suppression_delete("x@dest.test", "team-c")
        await supp.wait_refreshed()
        assert supp.is_suppressed("x@dest.test", "team-c") is None
        assert supp.is_suppressed("x@dest.test", "team-b") is None
        assert supp.is_suppressed("x@dest.test", "team-a") == ("manual", 1.0)

        # A cache that loads in full (a new pod) sees the same scopes.
        fresh = SuppressionList(other, metrics, refresh_interval=3600, export_gauge=False)
        await fresh.start()
        try:
            assert fresh.is_suppressed("x@dest.test", "team-a") == ("manual", 1.0)
            assert fresh.is_suppressed("x@dest.test", "team-b") is None
        finally:
            await fresh.close()

        # The platform's remove (no namespace) takes every entry of the address.
        assert await other.suppression_delete("x@dest.test")
        await supp.wait_refreshed()
        assert supp.is_suppressed("x@dest.test", "team-a") is None
        assert await backend.suppression_list() == []
    finally:
        await supp.close()


async def test_an_erasure_takes_every_scope_and_keeps_only_the_complaint_as_a_hash(
    backend: StoreBackend,
) -> None:
    await backend.suppression_upsert("gone@dest.test", "complaint", "fbl", 1.0)
    await backend.suppression_upsert("gone@dest.test", "manual", "portal:team-a:alice", 2.0,
                                     namespace="team-a")
    report = await backend.erase("gone@dest.test", keep_hash="h" * 64)
    assert report.counts["suppression"] == 2
    assert [(e["address"], e["reason"], e["namespace"])
            for e in await backend.suppression_list()] == [("h" * 64, "complaint", "")]


def test_sqlite_entries_from_before_scopes_become_pool_wide(db: str,
                                                            metrics: RelayMetrics) -> None:
    Path(db).parent.mkdir(parents=True)
    first = SqliteBackend(db)

    async def make() -> None:
        await first.open()
        await first.close()
    asyncio.run(make())
    # The table as it was before scopes (address alone the key).
    conn = sqlite3.connect(db)
    conn.executescript("""
        DROP TABLE suppression;
        CREATE TABLE suppression (address TEXT PRIMARY KEY, reason TEXT NOT NULL,
            source TEXT NOT NULL, created REAL NOT NULL, counted INTEGER NOT NULL DEFAULT 1);
        INSERT INTO suppression VALUES ('old@dest.test', 'manual', 'portal:team-a:alice', 1, 1);
    """)
    conn.close()

    async def check() -> None:
        b = SqliteBackend(db)
        await b.open()
        supp = SuppressionList(b, metrics, refresh_interval=3600)
        try:
            await supp.start()
            assert supp.is_suppressed("old@dest.test", "team-b") == ("manual", 1.0)
            await b.suppression_upsert("old@dest.test", "manual", "portal:team-b:bob", 2.0,
                                       namespace="team-b")
            assert [e["namespace"] for e in await b.suppression_list()] == ["", "team-b"]
            assert await supp.refresh()  # the change feed's triggers are back on the new table
        finally:
            await supp.close()
            await b.close()
    asyncio.run(check())


async def test_postgresql_entries_from_before_scopes_become_pool_wide(
        pg_dsn: str, metrics: RelayMetrics) -> None:
    import psycopg

    from mailplane_relay.store.postgres import PostgresBackend

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE suppression (address text PRIMARY KEY, reason text NOT NULL, "
                     "source text NOT NULL, created double precision NOT NULL)")
        conn.execute("INSERT INTO suppression VALUES "
                     "('old@dest.test', 'manual', 'portal:team-a:alice', 1)")
    b = PostgresBackend(pg_dsn)
    await b.open()
    try:
        await b.suppression_upsert("old@dest.test", "manual", "portal:team-b:bob", 2.0,
                                   namespace="team-b")
        assert [(e["namespace"], e["source"]) for e in await b.suppression_list()] == [
            ("", "portal:team-a:alice"), ("team-b", "portal:team-b:bob")]
    finally:
        await b.close()


async def test_a_closed_tenants_own_suppression_entries_and_webhook_events_leave_after_the_window(
    mlog: MessageLog, backend: StoreBackend, metrics: RelayMetrics
) -> None:
    # Account closure (privacy policy §5: account data up to 90 days after closure): a team
    # whose namespace the relay no longer serves (deleted, or no longer a tenant: none of its
    # credentials rendered) loses its own suppression entries and its waiting webhook events
    # once it has been gone for the message log's retention; pool-wide entries stay, and so
    # does everything of a namespace still served or gone for less.
    now = 1_800_000_000.0
    day = 86400.0
    for ns in ("shop", "gone", "late"):
        await backend.suppression_upsert(f"x@{ns}.test", "manual", "portal", now - 10 * day,
                                         namespace=ns)
    await backend.suppression_upsert("x@gone.test", "hard_bounce", "bounce", now - 10 * day)
    hooks = [(f"e-{ns}", f"credential:{ns}-app", "bounced", now - day, f"{ns}-app", ns,
              "a@b.test", "x@dest.test", "Q1", "<m@x>", "550", 1, now) for ns in ("shop", "gone")]
    delivery = {"event_id": "r1", "ts": now - day, "status": "bounced", "queue_id": "Q1",
                "credential": "shop-app", "namespace": "shop", "sender": "a@b.test",
                "recipient": "x@dest.test", "response": "550", "attempt": 1, "size": 100}
    await backend.write_events([tuple(delivery.get(c) for c in LOG_COLUMNS)], hooks)
    retention = {"message_log_retention": 90 * day, "suppression_retention": 365 * day,
                 "changes_retention": day}

    # All three served; "gone" is not served after the first purge, "late" after the second.
    await mlog.purge(now=now, open_namespaces={"shop", "gone", "late"}, **retention)
    await mlog.purge(now=now + 50 * day, open_namespaces={"shop", "late"}, **retention)
    await mlog.purge(now=now + 89 * day, open_namespaces={"shop"}, **retention)
    assert len(await backend.suppression_list()) == 4
    assert (await backend.webhook_backlog())[0] == 2

    # "gone" was last served 91 days before this purge: its own entry and event go.
    await mlog.purge(now=now + 91 * day, open_namespaces={"shop"}, **retention)
    left = sorted((e["address"], e["namespace"]) for e in await backend.suppression_list())
    assert left == [("x@gone.test", ""), ("x@late.test", "late"), ("x@shop.test", "shop")]
    assert (await backend.webhook_backlog())[0] == 1
    assert sample(metrics, "mailplane_relay_purged_records_total", table="webhook_outbox") == 1

    # A namespace with entries never seen served starts its clock at the first purge that
    # sees its entries; a purge without the tenants (a relay without namespaces) closes none.
    await backend.suppression_upsert("y@new.test", "manual", "portal", now + 100 * day,
                                     namespace="new")
    await mlog.purge(now=now + 100 * day, open_namespaces={"shop"}, **retention)
    await mlog.purge(now=now + 150 * day, **retention)
    assert len(await backend.suppression_list()) == 4
    await mlog.purge(now=now + 191 * day, open_namespaces={"shop"}, **retention)
    left = sorted((e["address"], e["namespace"]) for e in await backend.suppression_list())
    assert left == [("x@gone.test", ""), ("x@shop.test", "shop")]
