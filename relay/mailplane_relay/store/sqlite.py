"""The SQLite backend: one file per pod (WAL mode), the embedded default and `mailplane dev`.

Readers (the CLI, another worker) never block the writer, and several relay worker processes
of one pod may write the same file (``busy_timeout`` serialises their short transactions). All
statements run on one dedicated thread per backend object, so the event loop never waits on the
disk. Deletions run in short chunks, so writers are never stalled behind a long purge.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

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
    SuppressionDelta,
    counted_at_write,
    like_pattern,
    mask_address,
)

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's write transaction
# Rows deleted per transaction by purge/erase: each chunk holds the write lock for milliseconds.
DELETE_CHUNK = 2_000

T = TypeVar("T")

# Seconds since the epoch, in SQL (unixepoch('subsec') needs SQLite 3.42; Debian 12 has 3.40).
_NOW_SQL = "((julianday('now') - 2440587.5) * 86400.0)"

_SUPPRESSION_TABLE = """
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT NOT NULL,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    counted INTEGER NOT NULL DEFAULT 1,  -- 0: a complaint not yet counted (postgres.py)
    -- '': pool-wide; a namespace: that team's own entry (it stops only that team's mail)
    namespace TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (address, namespace)
);
"""
_SUPPRESSION_TRIGGERS = """
CREATE TRIGGER IF NOT EXISTS suppression_after_insert AFTER INSERT ON suppression BEGIN
    INSERT INTO suppression_changes (address, ts) VALUES (NEW.address, _NOW);
END;
CREATE TRIGGER IF NOT EXISTS suppression_after_update AFTER UPDATE ON suppression BEGIN
    INSERT INTO suppression_changes (address, ts) VALUES (NEW.address, _NOW);
END;
CREATE TRIGGER IF NOT EXISTS suppression_after_delete AFTER DELETE ON suppression BEGIN
    INSERT INTO suppression_changes (address, ts) VALUES (OLD.address, _NOW);
END;
""".replace("_NOW", _NOW_SQL)

_TABLES = """
CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS message_log (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    status TEXT NOT NULL,
    queue_id TEXT,
    message_id TEXT,
    credential TEXT,
    sender TEXT NOT NULL COLLATE NOCASE,
    recipient TEXT COLLATE NOCASE,
    response TEXT,
    size INTEGER,
    attempt INTEGER,
    remote TEXT,
    event_id TEXT,
    namespace TEXT
);
CREATE TABLE IF NOT EXISTS store_meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS send_leases (
    kind TEXT NOT NULL,
    credential TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    granted INTEGER NOT NULL,
    PRIMARY KEY (kind, credential, window_start)
);
CREATE TABLE IF NOT EXISTS store_peers (peer TEXT PRIMARY KEY, seen REAL NOT NULL);
-- Erasure requests: the address is kept only until every live worker erased it from its spool;
-- then its keyed hash (address_hash), for the message log's retention, so that a write held back
-- since before the request does not bring the address back.
CREATE TABLE IF NOT EXISTS erasure_requests (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT,
    requested REAL NOT NULL,
    completed REAL,
    report TEXT,
    address_hash TEXT
);
CREATE TABLE IF NOT EXISTS erasure_progress (
    request_id INTEGER NOT NULL,
    peer TEXT NOT NULL,
    done REAL NOT NULL,
    report TEXT NOT NULL,
    PRIMARY KEY (request_id, peer)
);
CREATE TABLE IF NOT EXISTS reputation_buckets (
    credential TEXT NOT NULL,
    minute INTEGER NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0,
    bounced INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, minute)
);
CREATE TABLE IF NOT EXISTS complaint_buckets (
    credential TEXT NOT NULL,
    minute INTEGER NOT NULL,
    complaints INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, minute)
);
-- The same complaints per credential, sender domain and minute (the portal's figures).
CREATE TABLE IF NOT EXISTS complaint_domain_buckets (
    credential TEXT NOT NULL,
    domain TEXT NOT NULL,
    minute INTEGER NOT NULL,
    complaints INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (credential, domain, minute)
);
-- Webhook events waiting for their endpoint (docs/webhooks.md): metadata of the log rows they
-- come from, written in the same transaction; deleted once delivered or given up.
CREATE TABLE IF NOT EXISTS webhook_outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    event_id TEXT NOT NULL,
    target TEXT NOT NULL,
    type TEXT NOT NULL,
    ts REAL NOT NULL,
    credential TEXT,
    namespace TEXT,
    sender TEXT COLLATE NOCASE,
    recipient TEXT COLLATE NOCASE,
    queue_id TEXT,
    message_id TEXT,
    response TEXT,
    attempt INTEGER,
    next_attempt REAL NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    lease_owner TEXT,
    leased_until REAL,
    last_error TEXT,
    UNIQUE (event_id, target)
);
CREATE INDEX IF NOT EXISTS webhook_outbox_due ON webhook_outbox (next_attempt);
CREATE INDEX IF NOT EXISTS webhook_outbox_ts ON webhook_outbox (ts);
-- Account closure: when each tenant namespace was last served (purge_closed_namespaces).
CREATE TABLE IF NOT EXISTS tenant_namespaces (namespace TEXT PRIMARY KEY, seen REAL NOT NULL);
""" + _SUPPRESSION_TABLE + """
-- Every change to the suppression list, numbered and timed, written by triggers: whoever writes
-- (relay workers, the CLI, the purge), each cache reads only the addresses changed since it
-- last looked. Changes are trimmed by age (the purge); a cache that fell further behind than
-- the oldest kept change reloads in full.
CREATE TABLE IF NOT EXISTS suppression_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL,
    ts REAL
);
""" + _SUPPRESSION_TRIGGERS

# Created after the migration (they name columns that version 1 files lack).
_INDEXES = """
CREATE INDEX IF NOT EXISTS message_log_ts ON message_log (ts);
CREATE INDEX IF NOT EXISTS message_log_queue_id ON message_log (queue_id);
CREATE INDEX IF NOT EXISTS message_log_sender ON message_log (sender, ts);
CREATE INDEX IF NOT EXISTS message_log_recipient ON message_log (recipient, ts);
CREATE INDEX IF NOT EXISTS message_log_status_ts ON message_log (status, ts);
CREATE INDEX IF NOT EXISTS message_log_namespace_ts ON message_log (namespace, ts);
CREATE INDEX IF NOT EXISTS message_log_ns_status_ts ON message_log (namespace, status, ts);
CREATE UNIQUE INDEX IF NOT EXISTS message_log_event_id ON message_log (event_id);
CREATE INDEX IF NOT EXISTS suppression_created ON suppression (created);
CREATE INDEX IF NOT EXISTS suppression_changes_ts ON suppression_changes (ts);
"""

# Fixed column names, no outside input.
_INSERT = (
    f"INSERT OR IGNORE INTO message_log ({', '.join(LOG_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in LOG_COLUMNS)})"
)
_SELECT_COLUMNS = tuple(c for c in LOG_COLUMNS if c != "event_id")
_OUTBOX_INSERT = (
    f"INSERT OR IGNORE INTO webhook_outbox ({', '.join(OUTBOX_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in OUTBOX_COLUMNS)})"
)

# What erasure leaves in the change log instead of the address (never a valid address).
_FORGOTTEN = ""


def _connect(path: str, *, readonly: bool = False,
             busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    if readonly:
        if not Path(path).exists():
            raise StoreError(
                f"{path}: no message log there; check --db/--config/--state-dir (the relay "
                "creates the file when it starts)"
            )
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=busy_timeout,
                               check_same_thread=False)
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so that a writer
        # takes the lock up front instead of failing to upgrade a read lock under contention.
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
    conn.row_factory = sqlite3.Row
    return conn


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _enable_wal(conn: sqlite3.Connection, busy_timeout: float) -> str:
    """Switch a new database to WAL (the mode is stored in the file, so this happens once).

    Switching needs a moment of exclusive access and SQLite does not run the busy handler for
    it: two processes creating the file together see "database is locked" at once, so retry."""
    deadline = time.monotonic() + busy_timeout
    while True:
        mode = str(conn.execute("PRAGMA journal_mode").fetchone()[0]).lower()
        if mode == "wal":
            return mode
        try:
            return str(conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]).lower()
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(0.01)


def _scope_suppression(conn: sqlite3.Connection) -> None:
    """Key the suppression list by (address, namespace); every existing entry is pool-wide.
    SQLite cannot change a primary key in place: copy into a new table (the rename keeps the
    change feed's triggers off the copy; they are made again for the new table)."""
    conn.execute("ALTER TABLE suppression RENAME TO suppression_unscoped")
    for trigger in ("insert", "update", "delete"):
        conn.execute(f"DROP TRIGGER IF EXISTS suppression_after_{trigger}")
    conn.execute("DROP INDEX IF EXISTS suppression_created")
    conn.execute(_SUPPRESSION_TABLE)
    # The same entries: no change for the caches to read.
    conn.execute("INSERT INTO suppression (address, reason, source, created, counted) "
                 "SELECT address, reason, source, created, counted FROM suppression_unscoped")
    conn.execute("DROP TABLE suppression_unscoped")
    for trigger in _SUPPRESSION_TRIGGERS.split("END;")[:-1]:
        conn.execute(trigger + "END;")


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    """Bring a file to SCHEMA_VERSION inside one write transaction (processes may race)."""
    with _transaction(conn):
        row = conn.execute("SELECT version FROM schema_version").fetchone()
        if row is None:
            conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            return
        version = int(row[0])
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path}: schema version {version} was written by a newer mailplane "
                f"(this one reads {SCHEMA_VERSION}); upgrade mailplane"
            )
        # Added within version 2 (default: counted, so older entries are not counted again).
        if "counted" not in {r[1] for r in conn.execute("PRAGMA table_info(suppression)")}:
            conn.execute("ALTER TABLE suppression ADD COLUMN counted INTEGER NOT NULL DEFAULT 1")
        if version < 2:
            have = {r[1] for r in conn.execute("PRAGMA table_info(message_log)")}
            for column in ("event_id", "namespace"):
                if column not in have:
                    conn.execute(f"ALTER TABLE message_log ADD COLUMN {column} TEXT")
            have = {r[1] for r in conn.execute("PRAGMA table_info(suppression_changes)")}
            if "ts" not in have:
                conn.execute("ALTER TABLE suppression_changes ADD COLUMN ts REAL")
                conn.execute(f"UPDATE suppression_changes SET ts = {_NOW_SQL}")  # noqa: S608
            # Version 1 stored the submitting client's IP address on ingress rows; the log
            # holds sender, recipient, status and timestamps, not client addresses
            # (docs/store.md).
            conn.execute("UPDATE message_log SET remote = NULL "
                         "WHERE status IN ('received', 'rejected')")
            conn.execute("UPDATE schema_version SET version = ?", (SCHEMA_VERSION,))
        # Added within version 2: closed erasures keep their address's keyed hash.
        if "address_hash" not in {r[1] for r in conn.execute(
                "PRAGMA table_info(erasure_requests)")}:
            conn.execute("ALTER TABLE erasure_requests ADD COLUMN address_hash TEXT")
        # Added within version 2: entries scoped to a namespace.
        if "namespace" not in {r[1] for r in conn.execute("PRAGMA table_info(suppression)")}:
            _scope_suppression(conn)


def open_database(path: str, *, busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    """Open for writing, creating, migrating or checking the schema."""
    conn = _connect(path, busy_timeout=busy_timeout)
    try:
        mode = _enable_wal(conn, busy_timeout)
        if mode != "wal":
            log.warning("message log %s: journal_mode is %s, not wal", path, mode)
        # Zero deleted content when it costs no extra I/O (the retention purge, erasure).
        conn.execute("PRAGMA secure_delete = FAST")
        # NORMAL in WAL mode: a process crash loses nothing; a power loss may lose the last
        # batches of metadata, never spooled mail (the spool fsyncs on its own).
        conn.execute("PRAGMA synchronous = NORMAL")
        # Every statement is idempotent (IF NOT EXISTS), so processes racing to create the
        # schema are harmless; executescript commits each statement on its own.
        conn.executescript(_TABLES)
        _migrate(conn, path)
        conn.executescript(_INDEXES)
    except BaseException:
        conn.close()
        raise
    return conn


def _delete_in_chunks(conn: sqlite3.Connection, table: str, where: str,
                      args: tuple[Any, ...]) -> int:
    total = 0
    while True:
        with _transaction(conn):
            cur = conn.execute(
                f"DELETE FROM {table} WHERE rowid IN "  # noqa: S608 - table/where are ours
                f"(SELECT rowid FROM {table} WHERE {where} LIMIT {DELETE_CHUNK})",
                args,
            )
        total += cur.rowcount
        if cur.rowcount < DELETE_CHUNK:
            return total


def _like_domain(value: str) -> str:
    return "%" + value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def build_where(q: LogQuery, mark: Callable[[], str], *, like: str,
                lower: bool) -> tuple[str, list[Any]]:
    """The WHERE clause of a log search, shared by both backends (``mark`` gives the
    placeholder; PostgreSQL compares lower-cased addresses, SQLite uses NOCASE columns)."""
    where: list[str] = []
    args: list[Any] = []
    for column, value in (("sender", q.sender), ("recipient", q.recipient)):
        if value is None:
            continue
        col = f"lower({column})" if lower else column
        if value.startswith("@"):
            where.append(f"{col} {like} {mark()} ESCAPE '\\'")
            args.append(_like_domain(value.lower() if lower else value))
        else:
            where.append(f"{col} = {mark()}")
            args.append(value.lower() if lower else value)
    for column, value in (("status", q.status), ("queue_id", q.queue_id),
                          ("namespace", q.namespace), ("credential", q.credential)):
        if value is not None:
            where.append(f"{column} = {mark()}")
            args.append(value)
    if q.since is not None:
        where.append(f"ts >= {mark()}")
        args.append(q.since)
    if q.until is not None:
        where.append(f"ts < {mark()}")
        args.append(q.until)
    return (" WHERE " + " AND ".join(where)) if where else "", args


def _last_change(conn: sqlite3.Connection) -> int:
    # sqlite_sequence holds the last number AUTOINCREMENT gave, even after old rows are pruned.
    row = conn.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'suppression_changes'").fetchone()
    return int(row[0]) if row else 0


def _read_all_suppression(conn: sqlite3.Connection) -> dict[str, Scopes]:
    entries: dict[str, Scopes] = {}
    for row in conn.execute("SELECT address, reason, created, namespace FROM suppression"):
        entries.setdefault(row[0], {})[row[3]] = (row[1], row[2])
    return entries


def _read_changes(conn: sqlite3.Connection, since: int,
                  delta_limit: int) -> SuppressionDelta | None:
    conn.execute("BEGIN")  # one snapshot: the change numbers match the rows read
    try:
        last = _last_change(conn)
        if last == since:
            return None
        oldest = conn.execute("SELECT MIN(seq) FROM suppression_changes").fetchone()[0]
        missed = oldest is None or since < oldest - 1
        if since < 0 or missed or last - since > delta_limit:
            return SuppressionDelta(last, True, _read_all_suppression(conn))
        changed = [row[0] for row in conn.execute(
            "SELECT DISTINCT address FROM suppression_changes WHERE seq > ?", (since,))]
        if _FORGOTTEN in changed:
            return SuppressionDelta(last, True, _read_all_suppression(conn))
        delta: dict[str, Scopes] = {address: {} for address in changed}
        for i in range(0, len(changed), 500):
            chunk = changed[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT address, reason, created, namespace FROM suppression "  # noqa: S608
                f"WHERE address IN ({marks})", chunk,
            ):
                delta[row[0]][row[3]] = (row[1], row[2])
        return SuppressionDelta(last, False, delta)
    finally:
        conn.execute("COMMIT")


def _upsert(conn: sqlite3.Connection, address: str, reason: str, source: str,
            created: float, *, namespace: str) -> None:
    with _transaction(conn):
        conn.execute(
            "INSERT INTO suppression (address, reason, source, created, counted, namespace) "
            "VALUES (?, ?, ?, ?, ?, ?) "
            "ON CONFLICT (address, namespace) DO UPDATE SET reason = excluded.reason, "
            "source = excluded.source, created = excluded.created, "
            "counted = CASE WHEN suppression.reason = excluded.reason "
            "THEN max(suppression.counted, excluded.counted) ELSE excluded.counted END "
            # A complaint is never turned into something a team may lift (a bounce, manual).
            "WHERE suppression.reason <> 'complaint' OR excluded.reason = 'complaint'",
            (address, reason, source, created, int(counted_at_write(reason, source)),
             namespace),
        )


def _claim(conn: sqlite3.Connection, address: str) -> bool:
    with _transaction(conn):
        cur = conn.execute(
            "UPDATE suppression SET counted = 1 WHERE address = ? AND namespace = '' "
            "AND counted = 0", (address,))
    return cur.rowcount > 0


def _erase(conn: sqlite3.Connection, address: str, keep_hash: str | None) -> EraseReport:
    report = EraseReport()
    # Deleted rows otherwise linger in free pages and in the WAL: overwrite them with zeros, then
    # move the WAL into the database and truncate it, so the address is gone from the files.
    conn.execute("PRAGMA secure_delete = ON")
    try:
        report.add("message_log", _delete_in_chunks(
            conn, "message_log", "sender = ? OR recipient = ?", (address, address)))
        # Webhook events not posted yet (counted when there were some, like the portal's).
        pending = _delete_in_chunks(conn, "webhook_outbox", "sender = ? OR recipient = ?",
                                    (address, address))
        if pending:
            report.add("webhook_outbox", pending)
        with _transaction(conn):
            rows = conn.execute("SELECT reason, source, created FROM suppression "
                                "WHERE address = ? ORDER BY namespace", (address,)).fetchall()
            if rows:
                conn.execute("DELETE FROM suppression WHERE address = ?", (address,))
                report.add("suppression", len(rows))
                # A complaint is pool-wide ('' sorts first); a team's own entries just go.
                row = rows[0]
                if keep_hash is not None and row["reason"] == "complaint":
                    conn.execute(
                        "INSERT OR REPLACE INTO suppression (address, reason, source, created) "
                        "VALUES (?, ?, ?, ?)", (keep_hash, "complaint", row["source"],
                                                row["created"]))
                    report.add("suppression_kept_as_hash", 1)
            # The change log must not keep the address either. Blanked entries tell every
            # cache to reload in full, which is how caches holding the address learn it is gone.
            conn.execute("UPDATE suppression_changes SET address = ? WHERE address = ?",
                         (_FORGOTTEN, address))
            if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                            (PORTAL_AUDIT,)).fetchone():
                n = conn.execute(f"UPDATE {PORTAL_AUDIT} SET target = ? "  # noqa: S608
                                 "WHERE lower(target) = ?",
                                 (mask_address(address), address)).rowcount
                # A note or reason typed by a user may name it too.
                conn.execute(f"UPDATE {PORTAL_AUDIT} SET detail = "  # noqa: S608
                             "replace(lower(detail), ?, ?) WHERE lower(detail) LIKE ? "
                             "ESCAPE '!'", (address, mask_address(address),
                                            like_pattern(address)))
                if n:
                    report.add(PORTAL_AUDIT, n)
    finally:
        conn.execute("PRAGMA secure_delete = FAST")
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    if busy:
        log.warning("erase: the WAL is in use and was not truncated; its old pages are "
                    "overwritten at the next checkpoint")
    return report


class SqliteBackend:
    """The store in one SQLite file, used from one dedicated thread."""

    shared = False

    def __init__(self, path: str, *, busy_timeout: float = BUSY_TIMEOUT,
                 readonly: bool = False) -> None:
        self.path = path
        self.description = f"sqlite:{path}"
        self.busy_timeout = busy_timeout
        self.readonly = readonly
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self.configured_keys: tuple[bytes, ...] = ()

    async def _raw(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise StoreError(f"{self.path}: database not open")
        return await self._raw(lambda: fn(conn))

    async def open(self) -> None:
        if self.readonly:
            self._conn = await self._raw(
                lambda: _connect(self.path, readonly=True, busy_timeout=self.busy_timeout))
        else:
            self._conn = await self._raw(
                lambda: open_database(self.path, busy_timeout=self.busy_timeout))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._raw(conn.close)
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    # ---- message log

    async def write_events(self, rows: list[LogRow],
                           outbox: list[OutboxRow] | None = None) -> None:
        def write(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(_INSERT, rows)
                if outbox:
                    conn.executemany(_OUTBOX_INSERT, outbox)
        await self._run(write)

    async def query(self, q: LogQuery) -> list[dict[str, Any]]:
        where, args = build_where(q, lambda: "?", like="LIKE", lower=False)
        sql = (f"SELECT {', '.join(_SELECT_COLUMNS)} FROM message_log{where} "  # noqa: S608
               "ORDER BY ts DESC, id DESC LIMIT ?")
        args.append(max(0, q.limit))
        return await self._run(lambda conn: [dict(r) for r in conn.execute(sql, args)])

    async def oldest_event(self) -> float | None:
        row = await self._run(lambda c: c.execute("SELECT MIN(ts) FROM message_log").fetchone())
        return None if row[0] is None else float(row[0])

    async def oldest_records(self) -> dict[str, float | None]:
        row = await self._run(lambda c: c.execute(
            "SELECT (SELECT MIN(ts) FROM message_log), "
            "(SELECT MIN(created) FROM suppression)").fetchone())
        return {"message_log": None if row[0] is None else float(row[0]),
                "suppression": None if row[1] is None else float(row[1])}

    async def purge(self, *, log_before: float, suppression_before: float,
                    changes_before: float) -> tuple[int, int]:
        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            counts = (
                _delete_in_chunks(conn, "message_log", "ts < ?", (log_before,)),
                _delete_in_chunks(conn, "suppression", "created < ?", (suppression_before,)),
            )
            # Keep the newest change so that the sequence (and every cache's position) holds.
            _delete_in_chunks(conn, "suppression_changes", "ts < ? AND seq < ?",
                              (changes_before, _last_change(conn)))
            now = time.time()
            with _transaction(conn):
                # A closed erasure's keyed hash: kept as long as a held-back row could name it.
                conn.execute("UPDATE erasure_requests SET address_hash = NULL WHERE "
                             "address_hash IS NOT NULL AND requested < ?", (log_before,))
                conn.execute("DELETE FROM send_leases WHERE (kind = 'rate' AND "
                             "window_start < ?) OR (kind = 'quota' AND window_start < ?)",
                             (int(now // 60) - 5, int(now // 86400) - 2))
                conn.execute("DELETE FROM reputation_buckets WHERE minute < ?",
                             (int(now // 60) - 7 * 24 * 60,))
                conn.execute("DELETE FROM complaint_buckets WHERE minute < ?",
                             (int(now // 60) - 7 * 24 * 60,))
                conn.execute("DELETE FROM complaint_domain_buckets WHERE minute < ?",
                             (int(now // 60) - 7 * 24 * 60,))
                conn.execute("DELETE FROM store_peers WHERE seen < ?", (now - PEER_MEMORY,))
            return counts
        return await self._run(run)

    async def purge_closed_namespaces(self, open_namespaces: Collection[str], *, now: float,
                                      closed_before: float) -> tuple[int, int]:
        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO tenant_namespaces (namespace, seen) VALUES (?, ?) "
                    "ON CONFLICT (namespace) DO UPDATE SET seen = excluded.seen",
                    [(ns, now) for ns in sorted(set(open_namespaces))])
                conn.execute("INSERT OR IGNORE INTO tenant_namespaces (namespace, seen) "
                             "SELECT DISTINCT namespace, ? FROM suppression "
                             "WHERE namespace <> ''", (now,))
                closed = "SELECT namespace FROM tenant_namespaces WHERE seen < ?"
                n_supp = conn.execute(f"DELETE FROM suppression WHERE namespace <> '' AND "  # noqa: S608
                                      f"namespace IN ({closed})", (closed_before,)).rowcount
                n_out = conn.execute(f"DELETE FROM webhook_outbox WHERE namespace IN ({closed})",  # noqa: S608
                                     (closed_before,)).rowcount
                conn.execute("DELETE FROM tenant_namespaces WHERE seen < ?", (closed_before,))
            return n_supp, n_out
        return await self._run(run)

    async def purge_portal(self, before: float) -> dict[str, int]:
        def run(conn: sqlite3.Connection) -> dict[str, int]:
            out = {}
            for table, column in PORTAL_RECORDS.items():
                if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                                (table,)).fetchone():
                    out[table] = _delete_in_chunks(conn, table, f"{column} < ?", (before,))
            return out
        return await self._run(run)

    # ---- suppression

    async def suppression_upsert(self, address: str, reason: str, source: str,
                                 created: float, namespace: str = POOL_WIDE) -> None:
        await self._run(lambda conn: _upsert(conn, address, reason, source, created,
                                                     namespace=namespace))

    async def suppression_claim(self, address: str) -> bool:
        return await self._run(lambda conn: _claim(conn, address))

    async def suppression_delete(self, address: str, namespace: str | None = None) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                if namespace is None:
                    cur = conn.execute("DELETE FROM suppression WHERE address = ?", (address,))
                else:
                    cur = conn.execute("DELETE FROM suppression WHERE address = ? "
                                       "AND namespace = ?", (address, namespace))
            return cur.rowcount > 0
        return await self._run(run)

    async def suppression_list(self) -> list[dict[str, Any]]:
        return await self._run(lambda conn: [dict(r) for r in conn.execute(
            "SELECT address, reason, source, created, namespace FROM suppression "
            "ORDER BY address, namespace")])

    async def suppression_changes(self, since: int, delta_limit: int
                                  ) -> SuppressionDelta | None:
        return await self._run(lambda conn: _read_changes(conn, since, delta_limit))

    # ---- erasure

    async def erasure_keys(self) -> list[bytes]:
        row = await self._run(lambda conn: conn.execute(
            "SELECT value FROM store_meta WHERE name = ?", ("erasure_key",)).fetchone())
        return [*self.configured_keys, *([bytes.fromhex(row[0])] if row else [])]

    async def erasure_key(self) -> bytes:
        if self.configured_keys:
            return self.configured_keys[0]

        def run(conn: sqlite3.Connection) -> bytes:
            with _transaction(conn):
                conn.execute("INSERT OR IGNORE INTO store_meta (name, value) VALUES (?, ?)",
                             ("erasure_key", secrets.token_hex(32)))
                row = conn.execute("SELECT value FROM store_meta WHERE name = ?",
                                   ("erasure_key",)).fetchone()
            return bytes.fromhex(row[0])
        return await self._run(run)

    async def erase(self, address: str, *, keep_hash: str | None) -> EraseReport:
        return await self._run(lambda conn: _erase(conn, address, keep_hash))

    # ---- webhook outbox

    async def webhook_enqueue(self, outbox: list[OutboxRow]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(_OUTBOX_INSERT, outbox)
        if outbox:
            await self._run(run)

    async def webhook_claim(self, owner: str, now: float, lease_until: float,
                            limit: int) -> list[dict[str, Any]]:
        sql = (f"UPDATE webhook_outbox SET lease_owner = ?, leased_until = ? WHERE id IN "  # noqa: S608
               "(SELECT id FROM webhook_outbox WHERE next_attempt <= ? AND (leased_until IS "
               "NULL OR leased_until < ?) ORDER BY next_attempt LIMIT ?) "
               f"RETURNING {', '.join(OUTBOX_CLAIMED)}")

        def run(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            # A read first: with nothing due no write lock is taken (the log writers of the
            # pod's workers share the file).
            if conn.execute("SELECT 1 FROM webhook_outbox WHERE next_attempt <= ? AND "
                            "(leased_until IS NULL OR leased_until < ?) LIMIT 1",
                            (now, now)).fetchone() is None:
                return []
            with _transaction(conn):
                return [dict(r) for r in conn.execute(
                    sql, (owner, lease_until, now, now, limit)).fetchall()]
        return await self._run(run)

    async def webhook_done(self, event_ids: list[int]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany("DELETE FROM webhook_outbox WHERE id = ?",
                                 [(i,) for i in event_ids])
        if event_ids:
            await self._run(run)

    async def webhook_retry(self, outbox_id: int, owner: str, next_attempt: float,
                            error: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("UPDATE webhook_outbox SET attempts = attempts + 1, "
                             "next_attempt = ?, last_error = ?, lease_owner = NULL, "
                             "leased_until = NULL WHERE id = ? AND lease_owner = ?",
                             (next_attempt, error, outbox_id, owner))
        await self._run(run)

    async def webhook_expire(self, before: float) -> int:
        return await self._run(lambda conn: _delete_in_chunks(
            conn, "webhook_outbox", "ts < ?", (before,)))

    async def webhook_backlog(self) -> tuple[int, float | None]:
        row = await self._run(lambda conn: conn.execute(
            "SELECT count(*), min(ts) FROM webhook_outbox").fetchone())
        return int(row[0]), None if row[1] is None else float(row[1])

    # ---- sending limits (shared by the worker processes of a pod)

    async def lease(self, kind: str, credential: str, window_start: int, want: int,
                    limit: int) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                row = conn.execute(
                    "SELECT granted FROM send_leases WHERE kind = ? AND credential = ? AND "
                    "window_start = ?", (kind, credential, window_start)).fetchone()
                granted = 0 if row is None else int(row[0])
                grant = max(0, min(want, limit - granted))
                conn.execute(
                    "INSERT INTO send_leases (kind, credential, window_start, granted) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (kind, credential, window_start) "
                    "DO UPDATE SET granted = granted + excluded.granted",
                    (kind, credential, window_start, grant))
            return grant
        return await self._run(run)

    async def give_back(self, kind: str, credential: str, window_start: int, n: int) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute(
                    "UPDATE send_leases SET granted = max(granted - ?, 0) WHERE kind = ? AND "
                    "credential = ? AND window_start = ?", (n, kind, credential, window_start))
        await self._run(run)

    async def peers(self, peer: str, now: float, horizon: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                conn.execute("INSERT INTO store_peers (peer, seen) VALUES (?, ?) "
                             "ON CONFLICT (peer) DO UPDATE SET seen = excluded.seen",
                             (peer, now))
                row = conn.execute("SELECT count(*) FROM store_peers WHERE seen >= ?",
                                   (now - horizon,)).fetchone()
            return int(row[0])
        return await self._run(run)

    async def peer_gone(self, peer: str) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("DELETE FROM store_peers WHERE peer = ?", (peer,))
        await self._run(run)

    # ---- reputation

    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
        if not buckets:
            return

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO reputation_buckets (credential, minute, delivered, bounced) "
                    "VALUES (?, ?, ?, ?) ON CONFLICT (credential, minute) DO UPDATE SET "
                    "delivered = delivered + excluded.delivered, "
                    "bounced = bounced + excluded.bounced",
                    [(c, m, d, b) for (c, m), (d, b) in buckets.items()])
        await self._run(run)

    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT credential, sum(delivered), sum(bounced) FROM reputation_buckets "
            "WHERE minute > ? GROUP BY credential", (since_minute,)).fetchall())
        return {r[0]: (int(r[1]), int(r[2])) for r in rows}

    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
        if not buckets:
            return

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO complaint_buckets (credential, minute, complaints) "
                    "VALUES (?, ?, ?) ON CONFLICT (credential, minute) DO UPDATE SET "
                    "complaints = complaints + excluded.complaints",
                    [(c, m, n) for (c, m), n in buckets.items()])
        await self._run(run)

    async def domain_complaints_add(self, buckets: dict[tuple[str, str, int], int]) -> None:
        if not buckets:
            return

        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.executemany(
                    "INSERT INTO complaint_domain_buckets (credential, domain, minute, "
                    "complaints) VALUES (?, ?, ?, ?) ON CONFLICT (credential, domain, minute) "
                    "DO UPDATE SET complaints = complaints + excluded.complaints",
                    [(c, d, m, n) for (c, d, m), n in buckets.items()])
        await self._run(run)

    async def complaints_window(self, since_minute: int) -> dict[str, int]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT credential, sum(complaints) FROM complaint_buckets "
            "WHERE minute > ? GROUP BY credential", (since_minute,)).fetchall())
        return {r[0]: int(r[1]) for r in rows}

    # ---- erasure requests (carried out by every worker of the pod)

    async def erasure_request(self, address: str, now: float) -> int:
        def run(conn: sqlite3.Connection) -> int:
            with _transaction(conn):
                cur = conn.execute("INSERT INTO erasure_requests (address, requested) "
                                   "VALUES (?, ?)", (address, now))
            return int(cur.lastrowid or 0)
        return await self._run(run)

    async def erasure_pending(self, peer: str) -> list[tuple[int, str]]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT id, address FROM erasure_requests r WHERE completed IS NULL AND NOT EXISTS "
            "(SELECT 1 FROM erasure_progress p WHERE p.request_id = r.id AND p.peer = ?) "
            "ORDER BY id", (peer,)).fetchall())
        return [(int(r[0]), str(r[1])) for r in rows]

    async def erasure_progress(self, request_id: int, peer: str, now: float,
                               counts: dict[str, int]) -> None:
        def run(conn: sqlite3.Connection) -> None:
            with _transaction(conn):
                conn.execute("INSERT OR REPLACE INTO erasure_progress (request_id, peer, done, "
                             "report) VALUES (?, ?, ?, ?)",
                             (request_id, peer, now, json.dumps(counts)))
        await self._run(run)

    async def erasure_state(self, request_id: int, now: float,
                            horizon: float) -> ErasureState | None:
        def run(conn: sqlite3.Connection) -> ErasureState | None:
            row = conn.execute("SELECT address, requested, completed, report FROM "
                               "erasure_requests WHERE id = ?", (request_id,)).fetchone()
            if row is None:
                return None
            reports = [json.loads(r[0]) for r in conn.execute(
                "SELECT report FROM erasure_progress WHERE request_id = ?", (request_id,))]
            waiting = conn.execute(
                "SELECT count(*) FROM store_peers s WHERE s.seen >= ? AND NOT EXISTS (SELECT 1 "
                "FROM erasure_progress p WHERE p.request_id = ? AND p.peer = s.peer)",
                (now - horizon, request_id)).fetchone()[0]
            unreachable = conn.execute(
                "SELECT count(*) FROM store_peers s WHERE s.seen < ? AND s.seen >= ? AND NOT "
                "EXISTS (SELECT 1 FROM erasure_progress p WHERE p.request_id = ? AND "
                "p.peer = s.peer)", (now - horizon, now - PEER_MEMORY, request_id)).fetchone()[0]
            return ErasureState(request_id, row[0], float(row[1]),
                                None if row[2] is None else float(row[2]),
                                json.loads(row[3]) if row[3] else None, reports, int(waiting),
                                int(unreachable))
        return await self._run(run)

    async def erasure_complete(self, request_id: int, now: float,
                               report: dict[str, int], address_hash: str | None = None) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _transaction(conn):
                cur = conn.execute(
                    "UPDATE erasure_requests SET address = NULL, completed = ?, report = ?, "
                    "address_hash = ? WHERE id = ? AND completed IS NULL",
                    (now, json.dumps(report), address_hash, request_id))
                conn.execute("DELETE FROM erasure_progress WHERE request_id = ?",
                             (request_id,))
            return cur.rowcount > 0
        return await self._run(run)

    async def erasures_since(self, since: float) -> list[ErasureMark]:
        rows = await self._run(lambda conn: conn.execute(
            "SELECT address, address_hash, requested FROM erasure_requests WHERE requested >= ? "
            "AND (address IS NOT NULL OR address_hash IS NOT NULL)", (since,)).fetchall())
        return [ErasureMark(r[0], r[1], float(r[2])) for r in rows]
