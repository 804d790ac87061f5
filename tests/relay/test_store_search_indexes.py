"""The PostgreSQL store's tenant-first search indexes: made on a new store, added to an existing
one (built concurrently, in the background), a half-built one rebuilt, one builder at a time."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from mailplane_relay.store.postgres import _INDEX_LOCK, SEARCH_INDEXES, PostgresBackend

pytestmark = pytest.mark.usefixtures("pg_server")


async def _indexes(dsn: str) -> dict[str, bool]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        rows = await (await conn.execute(
            "SELECT c.relname, i.indisvalid FROM pg_index i "
            "JOIN pg_class c ON c.oid = i.indexrelid "
            "WHERE i.indrelid = 'message_log'::regclass")).fetchall()
    return {str(name): bool(valid) for name, valid in rows}


async def _plan(dsn: str, sql: str) -> str:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute("SET enable_seqscan = off")
        rows = await (await conn.execute("EXPLAIN " + sql)).fetchall()
    return "\n".join(str(r[0]) for r in rows)


async def test_a_new_store_has_the_search_indexes_and_a_tenant_search_uses_them(
        pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn)
    await backend.open()
    await backend.search_indexes_settled()
    await backend.close()
    indexes = await _indexes(pg_dsn)
    for name in SEARCH_INDEXES:
        assert indexes.get(name) is True, (name, indexes)
    plan = await _plan(pg_dsn, "SELECT id FROM message_log WHERE namespace = 'a' "
                               "AND status = 'bounced' ORDER BY ts DESC LIMIT 50")
    assert "message_log_ns_status_ts" in plan, plan
    plan = await _plan(pg_dsn, "SELECT id FROM message_log WHERE namespace = 'a' AND "
                               "split_part(lower(recipient), '@', 2) = 'x.example' "
                               "ORDER BY ts DESC LIMIT 50")
    assert "message_log_ns_recipient_domain" in plan, plan


async def test_an_existing_store_gets_them_and_a_half_built_one_is_rebuilt(
        pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn)
    await backend.open()
    await backend.search_indexes_settled()
    await backend.close()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as conn:
        # A store of the previous release (no tenant indexes) with rows in it, and one index
        # left INVALID the way an interrupted CREATE INDEX CONCURRENTLY leaves it.
        await conn.execute("DROP INDEX message_log_ns_status_ts")
        await conn.execute("DROP INDEX message_log_ns_sender_domain")
        await conn.execute(
            "INSERT INTO message_log (event_id, ts, status, namespace, sender, recipient) "
            "SELECT 'e' || g, g, 'delivered', 'team' || (g % 3), 's@a.example', 'r@b.example' "
            "FROM generate_series(1, 2000) g")
        await conn.execute("UPDATE pg_index SET indisvalid = false WHERE indexrelid = "
                           "'message_log_ns_recipient_domain'::regclass")
    assert (await _indexes(pg_dsn))["message_log_ns_recipient_domain"] is False

    upgraded = PostgresBackend(pg_dsn)
    await upgraded.open()
    await upgraded.search_indexes_settled()
    assert await upgraded.ensure_search_indexes() == []  # nothing left to do
    await upgraded.close()
    indexes = await _indexes(pg_dsn)
    for name in SEARCH_INDEXES:
        assert indexes.get(name) is True, (name, indexes)


async def test_one_builder_at_a_time(pg_dsn: str) -> None:
    backend = PostgresBackend(pg_dsn)
    await backend.open()
    await backend.search_indexes_settled()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as other:
        await other.execute("DROP INDEX message_log_ns_status_ts")
        await other.execute("SELECT pg_advisory_lock(%s)", (_INDEX_LOCK,))
        assert await backend.ensure_search_indexes() == []  # the other process builds it
        assert "message_log_ns_status_ts" not in await _indexes(pg_dsn)
        await other.execute("SELECT pg_advisory_unlock(%s)", (_INDEX_LOCK,))
    assert await backend.ensure_search_indexes() == ["message_log_ns_status_ts"]
    await backend.close()


async def test_a_process_starting_during_a_build_neither_waits_for_it_nor_deadlocks(
        pg_dsn: str) -> None:
    # A build (CREATE INDEX CONCURRENTLY) holds its table lock until every transaction with an
    # older snapshot has ended. A relay or portal starting meanwhile checks the schema in a
    # transaction: had that check asked for a lock on message_log (a plain CREATE INDEX IF NOT
    # EXISTS does, even for an index that exists), it would wait for the build while the build
    # waits for it, a deadlock (or, on a large log, a store unusable for the whole build).
    builder = PostgresBackend(pg_dsn)
    await builder.open()
    await builder.search_indexes_settled()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as reader:
        await reader.execute("DROP INDEX message_log_ns_status_ts")
        # A long reader (a portal search, a backup): the build stalls behind its snapshot.
        await reader.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await reader.execute("SELECT count(*) FROM message_log")
        build = asyncio.create_task(builder.ensure_search_indexes())
        async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as watch:
            for _ in range(500):
                row = await (await watch.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = "
                    "'mailplane-index' AND wait_event = 'virtualxid'")).fetchone()
                if row and row[0]:
                    break
                await asyncio.sleep(0.02)
            else:
                raise AssertionError("the build never reached its wait for older snapshots")
        starting = PostgresBackend(pg_dsn)
        try:
            await asyncio.wait_for(starting.open(), 10)
            assert starting._schema_ready  # the schema check went through, not around
            await asyncio.wait_for(starting.suppression_upsert(
                "a@dest.test", "manual", "cli", 1.0), 10)
        finally:
            await reader.execute("COMMIT")
            await starting.close()
            try:
                built = await asyncio.wait_for(build, 30)
            finally:
                await builder.close()
    assert built == ["message_log_ns_status_ts"]
    assert (await _indexes(pg_dsn))["message_log_ns_status_ts"] is True


async def test_a_process_starting_during_a_backup_is_not_held_up_by_it(pg_dsn: str) -> None:
    # A backup (pg_dump) reads every table in one long transaction. A schema check that asked
    # for an exclusive lock on an existing table (ALTER TABLE ... ADD COLUMN IF NOT EXISTS does,
    # even for a column that exists) would wait for the whole dump, and every suppression
    # lookup of the pool would queue behind it.
    first = PostgresBackend(pg_dsn)
    await first.open()
    await first.search_indexes_settled()
    await first.close()
    async with await psycopg.AsyncConnection.connect(pg_dsn, autocommit=True) as dump:
        await dump.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        for table in ("message_log", "suppression", "suppression_changes", "webhook_outbox"):
            await dump.execute(f"SELECT count(*) FROM {table}")
        starting = PostgresBackend(pg_dsn)
        try:
            await asyncio.wait_for(starting.open(), 10)
            assert starting._schema_ready
            await asyncio.wait_for(starting.suppression_upsert(
                "a@dest.test", "manual", "cli", 1.0), 10)
        finally:
            await dump.execute("COMMIT")
            await starting.close()
