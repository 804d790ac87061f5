"""The PostgreSQL backend: one database shared by every pod and worker of a pool.

psycopg 3 with an asyncio connection pool. Log rows arrive in batches: each batch is copied
(COPY, the fastest way in) into a temporary staging table and moved into ``message_log`` with
``INSERT … ON CONFLICT (event_id) DO NOTHING``, so a batch replayed after a failure whose
outcome was unknown is stored once.

Every statement has a deadline (``statement_timeout``, the pool's checkout timeout, libpq's
``connect_timeout``); a database that does not answer raises ``StoreUnavailable`` quickly and the
callers fall back (disk buffer, cached suppression list, local share of the limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from psycopg import AsyncConnection
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from .backend import (
    LOG_COLUMNS,
    OUTBOX_CLAIMED,
    OUTBOX_COLUMNS,
    PEER_MEMORY,
    POOL_WIDE,
    PORTAL_AUDIT,
    PORTAL_RECORDS,
    EraseReport,
    ErasureMark,
    ErasureState,
    LogQuery,
    LogRow,
    OutboxRow,
    Scopes,
    StoreError,
    StoreUnavailable,
    SuppressionDelta,
    counted_at_write,
    like_pattern,
    mask_address,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
CONNECT_TIMEOUT = 5  # seconds, libpq's connect_timeout
STATEMENT_TIMEOUT_MS = 15_000
POOL_TIMEOUT = 5.0  # seconds to wait for a free (or new) connection
POOL_SIZE = 4
DELETE_CHUNK = 5_000
# A constant of this module: the advisory lock that orders suppression changes (below).
_SUPPRESSION_LOCK = 0x6D61696C  # "mail"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS mailplane_schema (version integer NOT NULL);
CREATE TABLE IF NOT EXISTS mailplane_meta (name text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS message_log (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    ts double precision NOT NULL,
    status text NOT NULL,
    queue_id text,
    message_id text,
    credential text,
    namespace text,
    sender text NOT NULL,
    recipient text,
    response text,
    size integer,
    attempt integer,
    remote text
);
CREATE UNIQUE INDEX IF NOT EXISTS message_log_event_id ON message_log (event_id);
CREATE INDEX IF NOT EXISTS message_log_ts ON message_log (ts);
CREATE INDEX IF NOT EXISTS message_log_queue_id ON message_log (queue_id);
CREATE INDEX IF NOT EXISTS message_log_sender ON message_log (lower(sender), ts);
CREATE INDEX IF NOT EXISTS message_log_recipient ON message_log (lower(recipient), ts);
CREATE INDEX IF NOT EXISTS message_log_sender_domain
    ON message_log (split_part(lower(sender), '@', 2), ts);
CREATE INDEX IF NOT EXISTS message_log_recipient_domain
    ON message_log (split_part(lower(recipient), '@', 2), ts);
CREATE INDEX IF NOT EXISTS message_log_status_ts ON message_log (status, ts);
CREATE INDEX IF NOT EXISTS message_log_namespace_ts ON message_log (namespace, ts);
CREATE INDEX IF NOT EXISTS message_log_credential_ts ON message_log (credential, ts);

CREATE TABLE IF NOT EXISTS suppression (
    address text NOT NULL,
    reason text NOT NULL,
    source text NOT NULL,
    created double precision NOT NULL,
    -- false: a complaint not yet counted in complaints_total (one written by the CLI); the
    -- first pod whose change feed sees it claims it (suppression_claim), so it counts once.
    counted boolean NOT NULL DEFAULT true,
    -- '': pool-wide; a namespace: that team's own entry (it stops only that team's mail)
    namespace text NOT NULL DEFAULT '',
    PRIMARY KEY (address, namespace)
);
-- Columns added by later versions, only when missing: ALTER TABLE locks the table (ACCESS
-- EXCLUSIVE) even when the column exists, so on every start it would queue behind any reader
-- (a backup's pg_dump holds its lock for the whole dump) and every suppression read behind it.
-- Entries made before scopes existed are pool-wide; the key becomes (address, namespace).
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'suppression'::regclass
                   AND attname = 'counted' AND NOT attisdropped) THEN
        ALTER TABLE suppression ADD COLUMN counted boolean NOT NULL DEFAULT true;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'suppression'::regclass
                   AND attname = 'namespace' AND NOT attisdropped) THEN
        ALTER TABLE suppression ADD COLUMN namespace text NOT NULL DEFAULT '';
    END IF;
END $$;
DO $$
DECLARE pkey record;
BEGIN
    SELECT conname, array_length(conkey, 1) AS n INTO pkey FROM pg_constraint
        WHERE conrelid = 'suppression'::regclass AND contype = 'p';
    IF pkey.n = 1 THEN
        EXECUTE format('ALTER TABLE suppression DROP CONSTRAINT %I', pkey.conname);
        ALTER TABLE suppression ADD PRIMARY KEY (address, namespace);
    END IF;
END $$;
CREATE INDEX IF NOT EXISTS suppression_created ON suppression (created);
-- The change feed every worker's cache polls. Writers take a transaction-scoped advisory
-- lock before numbering a change, so numbers are handed out in commit order: a reader that saw
-- change n has seen every change before n (a plain sequence can commit 10 before 9).
CREATE TABLE IF NOT EXISTS suppression_changes (
    seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address text NOT NULL,
    ts double precision NOT NULL DEFAULT extract(epoch FROM clock_timestamp())
);
CREATE INDEX IF NOT EXISTS suppression_changes_ts ON suppression_changes (ts);
CREATE OR REPLACE FUNCTION mailplane_suppression_changed() RETURNS trigger AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(_LOCK);
    IF TG_OP = 'DELETE' THEN
        INSERT INTO suppression_changes (address) VALUES (OLD.address);
    ELSE
        INSERT INTO suppression_changes (address) VALUES (NEW.address);
    END IF;
    RETURN NULL;
END $$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER suppression_changed AFTER INSERT OR UPDATE OR DELETE ON suppression
    FOR EACH ROW EXECUTE FUNCTION mailplane_suppression_changed();

-- Sending limits: messages granted (leased) per credential per window (a UTC day for the
-- quota, a minute for the rate), never more than the limit.
CREATE TABLE IF NOT EXISTS send_leases (
    kind text NOT NULL,
    credential text NOT NULL,
    window_start bigint NOT NULL,
    granted bigint NOT NULL,
    PRIMARY KEY (kind, credential, window_start)
);
-- Workers that took part recently: a worker cut off from the database takes 1/N of a limit.
CREATE TABLE IF NOT EXISTS store_peers (peer text PRIMARY KEY, seen double precision NOT NULL);
-- Erasure requests: the address is kept only until every live worker erased it from its spool;
-- then its keyed hash (address_hash), for the message log's retention, so that a write held back
-- since before the request (a disk buffer replayed later) does not bring the address back.
CREATE TABLE IF NOT EXISTS erasure_requests (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    address text,
    requested double precision NOT NULL,
    completed double precision,
    report text,
    address_hash text
);
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'erasure_requests'::regclass
                   AND attname = 'address_hash' AND NOT attisdropped) THEN
        ALTER TABLE erasure_requests ADD COLUMN address_hash text;
    END IF;
END $$;
CREATE TABLE IF NOT EXISTS erasure_progress (
    request_id bigint NOT NULL,
    peer text NOT NULL,
    done double precision NOT NULL,
    report text NOT NULL,
    PRIMARY KEY (request_id, peer)
);
-- Complaints (feedback-loop reports) per credential per minute, for the complaint-rate pause.
CREATE TABLE IF NOT EXISTS complaint_buckets (
    credential text NOT NULL,
    minute bigint NOT NULL,
    complaints bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, minute)
);
-- The same complaints per credential, sender domain and minute (the portal's figures).
CREATE TABLE IF NOT EXISTS complaint_domain_buckets (
    credential text NOT NULL,
    domain text NOT NULL,
    minute bigint NOT NULL,
    complaints bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, domain, minute)
);
-- Webhook events waiting for their endpoint (docs/webhooks.md), written in the same transaction
-- as the log rows they come from; leased with FOR UPDATE SKIP LOCKED so that exactly one worker
-- of the pool posts each; deleted once delivered or given up.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    event_id text NOT NULL,
    target text NOT NULL,
    type text NOT NULL,
    ts double precision NOT NULL,
    credential text,
    namespace text,
    sender text,
    recipient text,
    queue_id text,
    message_id text,
    response text,
    attempt integer,
    next_attempt double precision NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    lease_owner text,
    leased_until double precision,
    last_error text,
    UNIQUE (event_id, target)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_attempt);
CREATE INDEX IF NOT EXISTS webhook_outbox_ts ON webhook_outbox (ts);
-- No address indexes: the outbox holds only events not posted yet (usually few), so an erasure
-- scans it, and every insert stays cheaper.
-- Account closure: when each tenant namespace was last served (purge_closed_namespaces).
CREATE TABLE IF NOT EXISTS tenant_namespaces (
    namespace text PRIMARY KEY,
    seen double precision NOT NULL
);
-- Outcomes per credential per minute, summed over the pool for the bounce-rate pause.
CREATE TABLE IF NOT EXISTS reputation_buckets (
    credential text NOT NULL,
    minute bigint NOT NULL,
    delivered bigint NOT NULL DEFAULT 0,
    bounced bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, minute)
);
""".replace("_LOCK", str(_SUPPRESSION_LOCK))

# Tenant-first indexes for the portal's searches (one namespace, by status or by a sender's or
# recipient's domain): without them such a search walks the pool-wide index and filters on the
# namespace (docs/benchmarks.md). They are built CONCURRENTLY, outside the schema transaction
# and in the background: on an existing log of millions of rows a plain CREATE INDEX would
# block every relay's inserts for as long as the build takes.
SEARCH_INDEXES = {
    "message_log_ns_status_ts": "(namespace, status, ts)",
    "message_log_ns_recipient_domain": "(namespace, split_part(lower(recipient), '@', 2), ts)",
    "message_log_ns_sender_domain": "(namespace, split_part(lower(sender), '@', 2), ts)",
}
_INDEX_LOCK = _SUPPRESSION_LOCK + 2

# The schema's own indexes are created only when missing: CREATE INDEX IF NOT EXISTS locks its
# table (SHARE) even when the index exists, and on message_log that lock waits for a search
# index build, which in turn waits for the schema transaction's snapshot to end: a process
# starting during a build would deadlock with it, or find its store unusable for the build.
_INDEX_STATEMENT = re.compile(
    r"CREATE (?:UNIQUE )?INDEX IF NOT EXISTS (\w+)\s+ON [^;]+;\n?")
_SCHEMA_INDEXES = [(m.group(1), m.group(0)) for m in _INDEX_STATEMENT.finditer(_SCHEMA)]
_SCHEMA_TABLES = _INDEX_STATEMENT.sub("", _SCHEMA)

_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS message_log_in (event_id text, ts double precision, "
    "status text, queue_id text, message_id text, credential text, namespace text, sender "
    "text, recipient text, response text, size integer, attempt integer, remote text) "
    "ON COMMIT DELETE ROWS"
)
_COLS = ", ".join(LOG_COLUMNS)
_SELECT_COLUMNS = ", ".join(c for c in LOG_COLUMNS if c != "event_id")
_FORGOTTEN = ""
_OUTBOX_COLS = ", ".join(OUTBOX_COLUMNS)
_OUTBOX_STAGING = (
    "CREATE TEMP TABLE IF NOT EXISTS webhook_outbox_in (event_id text, target text, type text, "
    "ts double precision, credential text, namespace text, sender text, recipient text, "
    "queue_id text, message_id text, response text, attempt integer, "
    "next_attempt double precision) ON COMMIT DELETE ROWS"
)


async def _copy_outbox(conn: AsyncConnection[Any], outbox: list[OutboxRow]) -> None:
    """Webhook events in, as the log rows go (COPY into staging, then one INSERT); an event
    already there (a replayed batch) is skipped. Inside the caller's transaction."""
    await conn.execute(_OUTBOX_STAGING)
    async with conn.cursor().copy(f"COPY webhook_outbox_in ({_OUTBOX_COLS}) FROM STDIN") as copy:
        for row in outbox:
            await copy.write_row(row)
    await conn.execute(
        f"INSERT INTO webhook_outbox ({_OUTBOX_COLS}) SELECT {_OUTBOX_COLS} "  # noqa: S608
        "FROM webhook_outbox_in ON CONFLICT (event_id, target) DO NOTHING")


def _conninfo_description(dsn: str) -> str:
    """host/dbname of a connection string, for messages: never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "postgresql (unparsable connection string)"
    host = str(info.get("host") or "localhost")
    if host.startswith("/"):
        host = f"[{host}]"
    return f"postgresql://{host}/{info.get('dbname') or ''}"


def _where(q: LogQuery) -> tuple[str, list[Any]]:
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("sender", q.sender), ("recipient", q.recipient)):
        if value is None:
            continue
        if value.startswith("@"):
            where.append(f"split_part(lower({column}), '@', 2) = %s")
            args.append(value[1:].lower())
        else:
            where.append(f"lower({column}) = %s")
            args.append(value.lower())
    for column, value in (("status", q.status), ("queue_id", q.queue_id),
                          ("namespace", q.namespace), ("credential", q.credential)):
        if value is not None:
            where.append(f"{column} = %s")
            args.append(value)
    if q.since is not None:
        where.append("ts >= %s")
        args.append(q.since)
    if q.until is not None:
        where.append("ts < %s")
        args.append(q.until)
    return (" WHERE " + " AND ".join(where)) if where else "", args


class PostgresBackend:
    """The store in a PostgreSQL database, through a small connection pool."""

    shared = True

    def __init__(self, dsn: str, *, pool_size: int = POOL_SIZE) -> None:
        self._dsn = dsn
        self.description = _conninfo_description(dsn)
        self._pool_size = pool_size
        self.configured_keys: tuple[bytes, ...] = ()
        self._pool: AsyncConnectionPool[AsyncConnection[Any]] | None = None
        self._schema_ready = False
        self._index_task: asyncio.Task[None] | None = None

    # ---- connections ------------------------------------------------------------------

    async def open(self) -> None:
        async def configure(conn: AsyncConnection[Any]) -> None:
            await conn.set_autocommit(True)

        self._pool = AsyncConnectionPool(
            self._dsn, min_size=1, max_size=self._pool_size, open=False, timeout=POOL_TIMEOUT,
            kwargs={"connect_timeout": CONNECT_TIMEOUT,
                    "options": f"-c statement_timeout={STATEMENT_TIMEOUT_MS}",
                    "application_name": "mailplane"},
            configure=configure, check=AsyncConnectionPool.check_connection,
            reconnect_timeout=0, name="mailplane-store",
        )
        await self._pool.open(wait=False)
        try:
            await self._ensure_schema()
        except StoreUnavailable as exc:
            # Mail flow never waits on the database: the relay starts, buffers its log on disk
            # and uses its cached suppression list; the schema is made at the first success.
            log.error("store %s: not reachable at start (%s); continuing without it",
                      self.description, exc)

    async def close(self) -> None:
        task, self._index_task = self._index_task, None
        if task is not None and not task.done():
            task.cancel()  # an index left half-built is INVALID: the next start rebuilds it
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close(timeout=5.0)

    @asynccontextmanager
    async def _conn(self) -> AsyncIterator[AsyncConnection[Any]]:
        if self._pool is None:
            raise StoreError(f"store {self.description}: not open")
        try:
            async with self._pool.connection() as conn:
                yield conn
        except PoolTimeout as exc:
            raise StoreUnavailable(
                f"store {self.description}: no connection within {POOL_TIMEOUT:g}s") from exc
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"store {self.description}: {_first_line(exc)}") from exc

    async def _ready(self) -> None:
        if not self._schema_ready:
            await self._ensure_schema()

    async def _ensure_schema(self) -> None:
        async with self._conn() as conn, conn.transaction():
            # One process at a time creates or checks the schema (DDL races otherwise).
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SUPPRESSION_LOCK + 1,))
            await conn.execute(_SCHEMA_TABLES)
            present = {r[0] for r in await (await conn.execute(
                "SELECT relname FROM pg_class WHERE relkind = 'i' AND relnamespace = "
                "current_schema()::regnamespace")).fetchall()}
            for name, statement in _SCHEMA_INDEXES:
                if name not in present:
                    await conn.execute(statement)
            row = await (await conn.execute("SELECT version FROM mailplane_schema")).fetchone()
            if row is None:
                await conn.execute("INSERT INTO mailplane_schema (version) VALUES (%s)",
                                   (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise StoreError(
                    f"store {self.description}: schema version {row[0]} was written by a "
                    f"newer mailplane (this one reads {SCHEMA_VERSION}); upgrade mailplane")
        self._schema_ready = True
        if self._index_task is None:
            self._index_task = asyncio.create_task(self._search_indexes_in_background())

    async def _search_indexes_in_background(self) -> None:
        try:
            await self.ensure_search_indexes()
        except (StoreError, psycopg.Error) as exc:
            log.warning("store %s: search indexes not built (%s); the next start tries again",
                        self.description, _first_line(exc))

    async def search_indexes_settled(self) -> None:
        """Wait for the background build that the schema check started (tests, benchmarks)."""
        if self._index_task is not None:
            await asyncio.shield(self._index_task)

    async def ensure_search_indexes(self) -> list[str]:
        """Build the missing (or half-built, INVALID) SEARCH_INDEXES; the names built.

        One process at a time (a session advisory lock; the others leave it to that one).
        Inserts go on during a build (CREATE INDEX CONCURRENTLY)."""
        built: list[str] = []
        # A connection of its own (not the pool's): a build holds it for minutes, and closing
        # it ends the advisory lock whatever happened.
        try:
            conn = await psycopg.AsyncConnection.connect(
                self._dsn, autocommit=True, connect_timeout=CONNECT_TIMEOUT,
                application_name="mailplane-index")
        except psycopg.OperationalError as exc:
            raise StoreUnavailable(f"store {self.description}: {_first_line(exc)}") from exc
        async with conn:
            missing: list[tuple[str, bool]] = []  # (name, exists but INVALID)
            for name in SEARCH_INDEXES:
                row = await (await conn.execute(
                    "SELECT indisvalid FROM pg_index WHERE indexrelid = to_regclass(%s)",
                    (name,))).fetchone()
                if row is None or not row[0]:
                    missing.append((name, row is not None))
            if not missing:
                return built
            row = await (await conn.execute("SELECT pg_try_advisory_lock(%s)",
                                            (_INDEX_LOCK,))).fetchone()
            if not row or not row[0]:
                return built  # another process is building them
            for name, invalid in missing:
                t = time.monotonic()
                log.info("store %s: building index %s (inserts continue meanwhile)",
                         self.description, name)
                if invalid:
                    await conn.execute(f"DROP INDEX CONCURRENTLY IF EXISTS {name}")
                await conn.execute(f"CREATE INDEX CONCURRENTLY IF NOT EXISTS {name} "
                                   f"ON message_log {SEARCH_INDEXES[name]}")
                log.info("store %s: index %s built in %.1fs", self.description, name,
                         time.monotonic() - t)
                built.append(name)
        return built

    # ---- message log ------------------------------------------------------------------

    async def write_events(self, rows: list[LogRow],
                           outbox: list[OutboxRow] | None = None) -> None:
        if not rows:
            return
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            await conn.execute(_STAGING)
            async with conn.cursor().copy(
                f"COPY message_log_in ({_COLS}) FROM STDIN"
            ) as copy:
                for row in rows:
                    await copy.write_row(row)
            await conn.execute(
                f"INSERT INTO message_log ({_COLS}) SELECT {_COLS} FROM message_log_in "  # noqa: S608
                "ON CONFLICT (event_id) DO NOTHING")
            if outbox:
                await _copy_outbox(conn, outbox)

    async def query(self, q: LogQuery) -> list[dict[str, Any]]:
        await self._ready()
        where, args = _where(q)
        sql = (f"SELECT {_SELECT_COLUMNS} FROM message_log{where} "  # noqa: S608
               "ORDER BY ts DESC, id DESC LIMIT %s")
        args.append(max(0, q.limit))
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(sql, args)
            return list(await cur.fetchall())

    async def oldest_event(self) -> float | None:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute("SELECT min(ts) FROM message_log")).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    async def oldest_records(self) -> dict[str, float | None]:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute(
                "SELECT (SELECT min(ts) FROM message_log), "
                "(SELECT min(created) FROM suppression)")).fetchone()
        assert row is not None
        return {"message_log": None if row[0] is None else float(row[0]),
                "suppression": None if row[1] is None else float(row[1])}

    async def _delete_chunks(self, table: str, key: str, where: str,
                             args: tuple[Any, ...]) -> int:
        total = 0
        while True:
            async with self._conn() as conn:
                cur = await conn.execute(
                    f"DELETE FROM {table} WHERE {key} IN (SELECT {key} FROM {table} "  # noqa: S608
                    f"WHERE {where} LIMIT {DELETE_CHUNK})", args)
            total += cur.rowcount
            if cur.rowcount < DELETE_CHUNK:
                return total

    async def purge(self, *, log_before: float, suppression_before: float,
                    changes_before: float) -> tuple[int, int]:
        await self._ready()
        n_log = await self._delete_chunks("message_log", "id", "ts < %s", (log_before,))
        n_supp = await self._delete_chunks("suppression", "address", "created < %s",
                                           (suppression_before,))
        # A closed erasure's keyed hash is kept as long as a held-back log row could name it.
        async with self._conn() as conn:
            await conn.execute("UPDATE erasure_requests SET address_hash = NULL WHERE "
                               "address_hash IS NOT NULL AND requested < %s", (log_before,))
        await self._delete_chunks(
            "suppression_changes", "seq",
            "ts < %s AND seq < (SELECT max(seq) FROM suppression_changes)", (changes_before,))
        now = time.time()
        async with self._conn() as conn:
            await conn.execute("DELETE FROM send_leases WHERE (kind = 'rate' AND "
                               "window_start < %s) OR (kind = 'quota' AND window_start < %s)",
                               (int(now // 60) - 5, int(now // 86400) - 2))
            await conn.execute("DELETE FROM reputation_buckets WHERE minute < %s",
                               (int(now // 60) - 7 * 24 * 60,))
            await conn.execute("DELETE FROM complaint_buckets WHERE minute < %s",
                               (int(now // 60) - 7 * 24 * 60,))
            await conn.execute("DELETE FROM complaint_domain_buckets WHERE minute < %s",
                               (int(now // 60) - 7 * 24 * 60,))
            await conn.execute("DELETE FROM store_peers WHERE seen < %s", (now - PEER_MEMORY,))
        return n_log, n_supp

    async def purge_closed_namespaces(self, open_namespaces: Collection[str], *, now: float,
                                      closed_before: float) -> tuple[int, int]:
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            for ns in sorted(set(open_namespaces)):
                await conn.execute(
                    "INSERT INTO tenant_namespaces (namespace, seen) VALUES (%s, %s) "
                    "ON CONFLICT (namespace) DO UPDATE SET seen = "
                    "greatest(tenant_namespaces.seen, excluded.seen)", (ns, now))
            await conn.execute("INSERT INTO tenant_namespaces (namespace, seen) "
                               "SELECT DISTINCT namespace, %s FROM suppression "
                               "WHERE namespace <> '' ON CONFLICT (namespace) DO NOTHING",
                               (now,))
            closed = "SELECT namespace FROM tenant_namespaces WHERE seen < %s"
            n_supp = (await conn.execute(
                f"DELETE FROM suppression WHERE namespace <> '' AND namespace IN ({closed})",  # noqa: S608
                (closed_before,))).rowcount
            n_out = (await conn.execute(
                f"DELETE FROM webhook_outbox WHERE namespace IN ({closed})",  # noqa: S608
                (closed_before,))).rowcount
            await conn.execute("DELETE FROM tenant_namespaces WHERE seen < %s",
                               (closed_before,))
        return n_supp, n_out

    async def purge_portal(self, before: float) -> dict[str, int]:
        await self._ready()
        out = {}
        for table, column in PORTAL_RECORDS.items():
            async with self._conn() as conn:
                exists = await (await conn.execute("SELECT to_regclass(%s)",
                                                   (table,))).fetchone()
            if exists is not None and exists[0] is not None:
                key = "id"
                out[table] = await self._delete_chunks(table, key, f"{column} < %s", (before,))
        return out

    # ---- suppression ------------------------------------------------------------------

    async def suppression_upsert(self, address: str, reason: str, source: str,
                                 created: float, namespace: str = POOL_WIDE) -> None:
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO suppression (address, reason, source, created, counted, namespace) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (address, namespace) DO UPDATE SET "
                "reason = excluded.reason, source = excluded.source, created = excluded.created, "
                "counted = CASE WHEN suppression.reason = excluded.reason "
                "THEN suppression.counted OR excluded.counted ELSE excluded.counted END "
                # A complaint is never turned into something a team may lift (a bounce, manual).
                "WHERE suppression.reason <> 'complaint' OR excluded.reason = 'complaint'",
                (address, reason, source, created, counted_at_write(reason, source),
                 namespace))

    async def suppression_claim(self, address: str) -> bool:
        await self._ready()
        async with self._conn() as conn:
            cur = await conn.execute(
                "UPDATE suppression SET counted = true WHERE address = %s AND namespace = '' "
                "AND NOT counted",
                (address,))
        return cur.rowcount > 0

    async def suppression_delete(self, address: str, namespace: str | None = None) -> bool:
        await self._ready()
        async with self._conn() as conn:
            if namespace is None:
                cur = await conn.execute("DELETE FROM suppression WHERE address = %s",
                                         (address,))
            else:
                cur = await conn.execute(
                    "DELETE FROM suppression WHERE address = %s AND namespace = %s",
                    (address, namespace))
        return cur.rowcount > 0

    async def suppression_list(self) -> list[dict[str, Any]]:
        await self._ready()
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            await cur.execute(
                "SELECT address, reason, source, created, namespace FROM suppression "
                "ORDER BY address, namespace")
            return list(await cur.fetchall())

    async def suppression_changes(self, since: int, delta_limit: int
                                  ) -> SuppressionDelta | None:
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            row = await (await conn.execute(
                "SELECT coalesce(max(seq), 0), min(seq) FROM suppression_changes")).fetchone()
            assert row is not None
            last, oldest = int(row[0]), row[1]
            if last == since:
                return None
            missed = oldest is None or since < oldest - 1
            if since < 0 or missed or last - since > delta_limit:
                return SuppressionDelta(last, True, await _all_entries(conn))
            changed = [r[0] for r in await (await conn.execute(
                "SELECT DISTINCT address FROM suppression_changes WHERE seq > %s",
                (since,))).fetchall()]
            if _FORGOTTEN in changed:
                return SuppressionDelta(last, True, await _all_entries(conn))
            delta: dict[str, Scopes] = {address: {} for address in changed}
            for r in await (await conn.execute(
                "SELECT address, reason, created, namespace FROM suppression "
                "WHERE address = ANY(%s)", (changed,))).fetchall():
                delta[r[0]][r[3]] = (r[1], float(r[2]))
            return SuppressionDelta(last, False, delta)

    # ---- erasure ----------------------------------------------------------------------

    async def erasure_keys(self) -> list[bytes]:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute(
                "SELECT value FROM mailplane_meta WHERE name = 'erasure_key'")).fetchone()
        return [*self.configured_keys, *([bytes.fromhex(row[0])] if row else [])]

    async def erasure_key(self) -> bytes:
        if self.configured_keys:
            return self.configured_keys[0]
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO mailplane_meta (name, value) VALUES ('erasure_key', %s) "
                "ON CONFLICT (name) DO NOTHING", (secrets.token_hex(32),))
            row = await (await conn.execute(
                "SELECT value FROM mailplane_meta WHERE name = 'erasure_key'")).fetchone()
        assert row is not None
        return bytes.fromhex(row[0])

    async def erase(self, address: str, *, keep_hash: str | None) -> EraseReport:
        await self._ready()
        report = EraseReport()
        report.add("message_log", await self._delete_chunks(
            "message_log", "id", "lower(sender) = %s OR lower(recipient) = %s",
            (address, address)))
        # Webhook events not posted yet (counted when there were some, like the portal's).
        pending = await self._delete_chunks(
            "webhook_outbox", "id", "lower(sender) = %s OR lower(recipient) = %s",
            (address, address))
        if pending:
            report.add("webhook_outbox", pending)
        async with self._conn() as conn, conn.transaction():
            rows = await (await conn.execute(
                "DELETE FROM suppression WHERE address = %s "
                "RETURNING reason, source, created, namespace", (address,))).fetchall()
            if rows:
                report.add("suppression", len(rows))
                # A complaint is pool-wide; a team's own entries just go.
                row = min(rows, key=lambda r: r[3])
                if keep_hash is not None and row[0] == "complaint":
                    await conn.execute(
                        "INSERT INTO suppression (address, reason, source, created) "
                        "VALUES (%s, %s, %s, %s) ON CONFLICT (address, namespace) DO NOTHING",
                        (keep_hash, "complaint", row[1], row[2]))
                    report.add("suppression_kept_as_hash", 1)
            await conn.execute(
                "UPDATE suppression_changes SET address = %s WHERE address = %s",
                (_FORGOTTEN, address))
            exists = await (await conn.execute("SELECT to_regclass(%s)",
                                               (PORTAL_AUDIT,))).fetchone()
            if exists is not None and exists[0] is not None:
                cur = await conn.execute(
                    f"UPDATE {PORTAL_AUDIT} SET target = %s "  # noqa: S608
                    "WHERE lower(target) = %s", (mask_address(address), address))
                if cur.rowcount:
                    report.add(PORTAL_AUDIT, cur.rowcount)
                # A note or reason typed by a user may name it too.
                await conn.execute(
                    f"UPDATE {PORTAL_AUDIT} SET detail = replace(lower(detail), %s, %s) "  # noqa: S608
                    "WHERE lower(detail) LIKE %s ESCAPE '!'",
                    (address, mask_address(address), like_pattern(address)))
        return report

    # ---- webhook outbox ------------------------------------------------------------------

    async def webhook_enqueue(self, outbox: list[OutboxRow]) -> None:
        if not outbox:
            return
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            await _copy_outbox(conn, outbox)

    async def webhook_claim(self, owner: str, now: float, lease_until: float,
                            limit: int) -> list[dict[str, Any]]:
        await self._ready()
        async with self._conn() as conn:
            cur = conn.cursor(row_factory=dict_row)
            # SKIP LOCKED: workers claiming together each get other events, none waits.
            await cur.execute(
                "UPDATE webhook_outbox SET lease_owner = %s, leased_until = %s WHERE id IN "  # noqa: S608
                "(SELECT id FROM webhook_outbox WHERE next_attempt <= %s AND (leased_until IS "
                "NULL OR leased_until < %s) ORDER BY next_attempt LIMIT %s "
                f"FOR UPDATE SKIP LOCKED) RETURNING {', '.join(OUTBOX_CLAIMED)}",
                (owner, lease_until, now, now, limit))
            return list(await cur.fetchall())

    async def webhook_done(self, event_ids: list[int]) -> None:
        if not event_ids:
            return
        await self._ready()
        async with self._conn() as conn:
            await conn.execute("DELETE FROM webhook_outbox WHERE id = ANY(%s)", (event_ids,))

    async def webhook_retry(self, outbox_id: int, owner: str, next_attempt: float,
                            error: str) -> None:
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE webhook_outbox SET attempts = attempts + 1, next_attempt = %s, "
                "last_error = %s, lease_owner = NULL, leased_until = NULL "
                "WHERE id = %s AND lease_owner = %s", (next_attempt, error, outbox_id, owner))

    async def webhook_expire(self, before: float) -> int:
        await self._ready()
        return await self._delete_chunks("webhook_outbox", "id", "ts < %s", (before,))

    async def webhook_backlog(self) -> tuple[int, float | None]:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute(
                "SELECT count(*), min(ts) FROM webhook_outbox")).fetchone()
        assert row is not None
        return int(row[0]), None if row[1] is None else float(row[1])

    # ---- sending limits ----------------------------------------------------------------

    async def lease(self, kind: str, credential: str, window_start: int, want: int,
                    limit: int) -> int:
        """Grant up to ``want`` messages of ``limit`` in this window; 0 when exhausted."""
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO send_leases (kind, credential, window_start, granted) "
                "VALUES (%s, %s, %s, 0) ON CONFLICT DO NOTHING", (kind, credential, window_start))
            row = await (await conn.execute(
                "SELECT granted FROM send_leases WHERE kind = %s AND credential = %s AND "
                "window_start = %s FOR UPDATE", (kind, credential, window_start))).fetchone()
            assert row is not None
            grant = max(0, min(want, limit - int(row[0])))
            if grant:
                await conn.execute(
                    "UPDATE send_leases SET granted = granted + %s WHERE kind = %s AND "
                    "credential = %s AND window_start = %s",
                    (grant, kind, credential, window_start))
        return grant

    async def give_back(self, kind: str, credential: str, window_start: int, n: int) -> None:
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "UPDATE send_leases SET granted = greatest(granted - %s, 0) WHERE kind = %s "
                "AND credential = %s AND window_start = %s",
                (n, kind, credential, window_start))

    async def peers(self, peer: str, now: float, horizon: float) -> int:
        """Note ``peer`` as alive; return how many peers were seen within ``horizon``."""
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO store_peers (peer, seen) VALUES (%s, %s) "
                "ON CONFLICT (peer) DO UPDATE SET seen = excluded.seen", (peer, now))
            row = await (await conn.execute(
                "SELECT count(*) FROM store_peers WHERE seen >= %s", (now - horizon,))
            ).fetchone()
        return int(row[0]) if row else 1

    async def peer_gone(self, peer: str) -> None:
        await self._ready()
        async with self._conn() as conn:
            await conn.execute("DELETE FROM store_peers WHERE peer = %s", (peer,))

    # ---- erasure requests -------------------------------------------------------------

    async def erasure_request(self, address: str, now: float) -> int:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute(
                "INSERT INTO erasure_requests (address, requested) VALUES (%s, %s) "
                "RETURNING id", (address, now))).fetchone()
        assert row is not None
        return int(row[0])

    async def erasure_pending(self, peer: str) -> list[tuple[int, str]]:
        await self._ready()
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT id, address FROM erasure_requests r WHERE completed IS NULL AND NOT "
                "EXISTS (SELECT 1 FROM erasure_progress p WHERE p.request_id = r.id AND "
                "p.peer = %s) ORDER BY id", (peer,))).fetchall()
        return [(int(r[0]), str(r[1])) for r in rows]

    async def erasure_progress(self, request_id: int, peer: str, now: float,
                               counts: dict[str, int]) -> None:
        await self._ready()
        async with self._conn() as conn:
            await conn.execute(
                "INSERT INTO erasure_progress (request_id, peer, done, report) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (request_id, peer) DO UPDATE SET "
                "done = excluded.done, report = excluded.report",
                (request_id, peer, now, json.dumps(counts)))

    async def erasure_state(self, request_id: int, now: float,
                            horizon: float) -> ErasureState | None:
        await self._ready()
        async with self._conn() as conn:
            row = await (await conn.execute(
                "SELECT address, requested, completed, report FROM erasure_requests "
                "WHERE id = %s", (request_id,))).fetchone()
            if row is None:
                return None
            reports = [json.loads(r[0]) for r in await (await conn.execute(
                "SELECT report FROM erasure_progress WHERE request_id = %s",
                (request_id,))).fetchall()]
            waiting = await (await conn.execute(
                "SELECT count(*) FROM store_peers s WHERE s.seen >= %s AND NOT EXISTS (SELECT 1 "
                "FROM erasure_progress p WHERE p.request_id = %s AND p.peer = s.peer)",
                (now - horizon, request_id))).fetchone()
            unreachable = await (await conn.execute(
                "SELECT count(*) FROM store_peers s WHERE s.seen < %s AND s.seen >= %s AND NOT "
                "EXISTS (SELECT 1 FROM erasure_progress p WHERE p.request_id = %s AND "
                "p.peer = s.peer)", (now - horizon, now - PEER_MEMORY, request_id))).fetchone()
        return ErasureState(request_id, row[0], float(row[1]),
                            None if row[2] is None else float(row[2]),
                            json.loads(row[3]) if row[3] else None, reports,
                            int(waiting[0]) if waiting else 0,
                            int(unreachable[0]) if unreachable else 0)

    async def erasure_complete(self, request_id: int, now: float,
                               report: dict[str, int], address_hash: str | None = None) -> bool:
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            cur = await conn.execute(
                "UPDATE erasure_requests SET address = NULL, completed = %s, report = %s, "
                "address_hash = %s WHERE id = %s AND completed IS NULL",
                (now, json.dumps(report), address_hash, request_id))
            await conn.execute("DELETE FROM erasure_progress WHERE request_id = %s",
                               (request_id,))
        return cur.rowcount > 0

    async def erasures_since(self, since: float) -> list[ErasureMark]:
        await self._ready()
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT address, address_hash, requested FROM erasure_requests "
                "WHERE requested >= %s AND (address IS NOT NULL OR address_hash IS NOT NULL)",
                (since,))).fetchall()
        return [ErasureMark(r[0], r[1], float(r[2])) for r in rows]

    # ---- reputation ---------------------------------------------------------------------

    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
        if not buckets:
            return
        await self._ready()
        async with self._conn() as conn, conn.transaction():
            cur = conn.cursor()
            await cur.executemany(
                "INSERT INTO reputation_buckets AS b (credential, minute, delivered, bounced) "
                "VALUES (%s, %s, %s, %s) ON CONFLICT (credential, minute) DO UPDATE SET "
                "delivered = b.delivered + excluded.delivered, "
                "bounced = b.bounced + excluded.bounced",
                [(c, m, d, b) for (c, m), (d, b) in buckets.items()])

    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]:
        await self._ready()
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT credential, sum(delivered), sum(bounced) FROM reputation_buckets "
                "WHERE minute > %s GROUP BY credential", (since_minute,))).fetchall()
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
        await self._add_complaints("complaint_buckets", ("credential", "minute"), buckets)

    async def domain_complaints_add(self, buckets: dict[tuple[str, str, int], int]) -> None:
        await self._add_complaints("complaint_domain_buckets", ("credential", "domain", "minute"),
                                   buckets)

    async def _add_complaints(self, table: str, key: tuple[str, ...],
                              buckets: Mapping[tuple[Any, ...], int]) -> None:
        """Adds counts to per-minute complaint buckets keyed by `key` (sorted, so concurrent
        writers lock rows in one order)."""
        if not buckets:
            return
        await self._ready()
        columns = ", ".join(key)
        marks = ", ".join(["%s"] * (len(key) + 1))
        async with self._conn() as conn, conn.transaction():
            cur = conn.cursor()
            await cur.executemany(
                f"INSERT INTO {table} AS b ({columns}, complaints) VALUES ({marks}) "  # noqa: S608
                f"ON CONFLICT ({columns}) DO UPDATE SET "
                "complaints = b.complaints + excluded.complaints",
                [(*k, n) for k, n in sorted(buckets.items())])

    async def complaints_window(self, since_minute: int) -> dict[str, int]:
        await self._ready()
        async with self._conn() as conn:
            rows = await (await conn.execute(
                "SELECT credential, sum(complaints) FROM complaint_buckets "
                "WHERE minute > %s GROUP BY credential", (since_minute,))).fetchall()
        return {r[0]: int(r[1]) for r in rows}


async def _all_entries(conn: AsyncConnection[Any]) -> dict[str, Scopes]:
    entries: dict[str, Scopes] = {}
    for r in await (await conn.execute(
            "SELECT address, reason, created, namespace FROM suppression")).fetchall():
        entries.setdefault(r[0], {})[r[3]] = (r[1], float(r[2]))
    return entries


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
