"""The message log (metadata of every state change) and the suppression list, in one SQLite file.

SQLite in WAL mode: readers (the CLI, another worker) never block the writer, and several relay
worker processes may append to the same file (``busy_timeout`` serialises their short write
transactions). Writes are batched: ``record()`` only appends to an in-memory buffer, a background
task writes the buffer every ``flushInterval`` in one transaction, in a thread, so the event loop
never waits on the disk.

The log holds what the privacy policy allows: sender, recipient, status, timestamps, SMTP response,
size and ids. ``LogEvent`` has no field for a body or a subject and this module adds none.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter

from .aiotasks import cancel_and_wait
from .events import STATUSES, LogEvent
from .metrics import NS, RelayMetrics

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT = 10.0  # seconds a writer waits for another process's write transaction
# Rows deleted per transaction by purge/forget: each chunk holds the write lock for milliseconds,
# so relay workers appending to the log are never stalled behind a long purge.
DELETE_CHUNK = 2_000
# Events kept in memory while the disk does not take them (stuck or locked volume). At a few
# hundred bytes per event this is tens of MB at most; beyond it events are dropped and counted.
MAX_BUFFERED_EVENTS = 200_000
SUPPRESSION_REFRESH_INTERVAL = 1.0
SUPPRESSION_CHANGES_KEPT = 100_000
# More changes than this since the last look: one full reload is cheaper than the delta.
SUPPRESSION_DELTA_LIMIT = 20_000
# A burst this large is written at once instead of waiting for the flush interval, which keeps
# transactions (and the memory held) small under load.
EARLY_FLUSH_EVENTS = 5_000
# Repeated failures (a stuck disk) are logged at most this often.
ERROR_LOG_INTERVAL = 10.0

_COLUMNS = (
    "ts", "status", "queue_id", "message_id", "credential", "sender", "recipient", "response",
    "size", "attempt", "remote",
)

_SCHEMA = """
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
    remote TEXT
);
CREATE INDEX IF NOT EXISTS message_log_ts ON message_log (ts);
CREATE INDEX IF NOT EXISTS message_log_queue_id ON message_log (queue_id);
CREATE INDEX IF NOT EXISTS message_log_sender ON message_log (sender);
CREATE INDEX IF NOT EXISTS message_log_recipient ON message_log (recipient);
CREATE INDEX IF NOT EXISTS message_log_status_ts ON message_log (status, ts);
CREATE TABLE IF NOT EXISTS suppression (
    address TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS suppression_created ON suppression (created);
-- Every change to the suppression list, numbered, written by triggers: whoever writes (relay
-- workers, the CLI, the purge), each cache reads only the addresses changed since it last
-- looked, so a list of millions costs nothing to keep fresh. The last
-- SUPPRESSION_CHANGES_KEPT changes are kept; a cache that fell further behind reloads fully.
CREATE TABLE IF NOT EXISTS suppression_changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    address TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS suppression_after_insert AFTER INSERT ON suppression BEGIN
    INSERT INTO suppression_changes (address) VALUES (NEW.address);
END;
CREATE TRIGGER IF NOT EXISTS suppression_after_update AFTER UPDATE ON suppression BEGIN
    INSERT INTO suppression_changes (address) VALUES (NEW.address);
END;
CREATE TRIGGER IF NOT EXISTS suppression_after_delete AFTER DELETE ON suppression BEGIN
    INSERT INTO suppression_changes (address) VALUES (OLD.address);
END;
"""

# Fixed column names, no outside input.
_INSERT = (
    f"INSERT INTO message_log ({', '.join(_COLUMNS)}) "  # noqa: S608
    f"VALUES ({', '.join('?' for _ in _COLUMNS)})"
)

T = TypeVar("T")


class MessageLogError(Exception):
    """The message-log database cannot be used (missing, or written by a newer version)."""


def _connect(path: str, *, readonly: bool = False,
             busy_timeout: float = BUSY_TIMEOUT) -> sqlite3.Connection:
    if readonly:
        if not Path(path).exists():
            raise MessageLogError(
                f"{path}: no message log there; check --db/--config/--state-dir (the relay "
                "creates the file when it starts)"
            )
        conn = sqlite3.connect(
            f"file:{path}?mode=ro", uri=True, timeout=busy_timeout,
            check_same_thread=False,
        )
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE) so that a writer
        # takes the lock up front instead of failing to upgrade a read lock under contention.
        conn = sqlite3.connect(
            path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
        )
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


def open_database(path: str, *, busy_timeout: float = BUSY_TIMEOUT
                  ) -> sqlite3.Connection:
    """Open for writing, creating or checking the schema. Safe when several processes race."""
    conn = _connect(path, busy_timeout=busy_timeout)
    try:
        mode = _enable_wal(conn, busy_timeout)
        if mode != "wal":
            log.warning("message log %s: journal_mode is %s, not wal", path, mode)
        # Zero deleted content when it costs no extra I/O (the retention purge, forget).
        conn.execute("PRAGMA secure_delete = FAST")
        # NORMAL in WAL mode: a process crash loses nothing; a power loss may lose the last
        # batches of metadata, never spooled mail (the spool fsyncs on its own).
        conn.execute("PRAGMA synchronous = NORMAL")
        # Every statement is idempotent (IF NOT EXISTS / OR IGNORE), so processes racing to
        # create the schema are harmless; executescript commits each statement on its own.
        conn.executescript(_SCHEMA)
        with _transaction(conn):
            row = conn.execute("SELECT version FROM schema_version").fetchone()
            if row is None:
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (SCHEMA_VERSION,))
            elif row[0] > SCHEMA_VERSION:
                raise MessageLogError(
                    f"{path}: schema version {row[0]} was written by a newer mailplane "
                    f"(this one reads {SCHEMA_VERSION}); upgrade mailplane"
                )
    except BaseException:
        conn.close()
        raise
    return conn


class _Worker:
    """One SQLite connection used from one dedicated thread, so the loop never blocks on it."""

    def __init__(self, path: str, name: str, busy_timeout: float = BUSY_TIMEOUT
                 ) -> None:
        self.path = path
        self.busy_timeout = busy_timeout
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._conn: sqlite3.Connection | None = None

    async def open(self) -> None:
        self._conn = await self.run_raw(
            lambda: open_database(self.path, busy_timeout=self.busy_timeout))

    async def run_raw(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        conn = self._conn
        if conn is None:
            raise MessageLogError(f"{self.path}: database not open")
        return await self.run_raw(lambda: fn(conn))

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self.run_raw(conn.close)
        self._executor.shutdown(wait=True)


def _parse_address(address: str) -> str:
    return address.strip().lower()


def _delete_in_chunks(
    conn: sqlite3.Connection, table: str, where: str, args: tuple[Any, ...]
) -> int:
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


class MessageLog:
    """Append-only metadata log with a batched writer, retention purge and CLI queries."""

    def __init__(
        self,
        path: str,
        *,
        flush_interval: float,
        metrics: RelayMetrics,
        max_buffered: int = MAX_BUFFERED_EVENTS,
        busy_timeout: float = BUSY_TIMEOUT,
    ) -> None:
        self.path = path
        self.flush_interval = flush_interval
        self._metrics = metrics
        self._max_buffered = max_buffered
        self._buffer: list[tuple[Any, ...]] = []
        self._db = _Worker(path, "messagelog", busy_timeout)
        self._flush_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropped_since_warning = 0
        self._last_drop_warning = -ERROR_LOG_INTERVAL
        self._failures_since_log = 0
        self._last_failure_log = -ERROR_LOG_INTERVAL
        self.dropped = Counter(
            f"{NS}_messagelog_dropped_events",
            "Message-log events dropped because the database did not take them in time.",
            registry=metrics.registry,
        )
        self.write_errors = Counter(
            f"{NS}_messagelog_write_errors",
            "Failed message-log batch writes (the batch is kept and retried).",
            registry=metrics.registry,
        )

    @property
    def pending(self) -> int:
        return len(self._buffer)

    async def start(self) -> None:
        await self._db.open()
        self._task = asyncio.create_task(self._writer(), name="messagelog-writer")

    def record(self, event: LogEvent) -> None:
        try:
            if len(self._buffer) >= self._max_buffered:
                self._drop(1)
                return
            e = event
            # Built by hand: dataclasses.astuple deep-copies and costs ~10x more per event.
            self._buffer.append((e.ts, e.status, e.queue_id, e.message_id, e.credential,
                                 e.sender, e.recipient, e.response, e.size, e.attempt,
                                 e.remote))
            if len(self._buffer) == EARLY_FLUSH_EVENTS:
                self._wakeup.set()
        except Exception:  # the caller is on the accept/delivery path: never let it fail
            log.exception("message log: could not record an event")

    def _drop(self, count: int) -> None:
        self.dropped.inc(count)
        self._dropped_since_warning += count
        now = time.monotonic()
        if now - self._last_drop_warning >= ERROR_LOG_INTERVAL:
            log.warning(
                "message log %s is not keeping up (disk stuck or locked?): %d events dropped "
                "since the last warning; see mailplane_relay_messagelog_dropped_events_total",
                self.path, self._dropped_since_warning,
            )
            self._dropped_since_warning = 0
            self._last_drop_warning = now

    async def _writer(self) -> None:
        while True:
            with suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), self.flush_interval)
            self._wakeup.clear()
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # flush() kept the batch; log the failure (not every 200 ms) and go on.
                self._failures_since_log += 1
                now = time.monotonic()
                if now - self._last_failure_log >= ERROR_LOG_INTERVAL:
                    log.error("message log %s: %d batch writes failed (%s); %d events held, "
                              "retrying", self.path, self._failures_since_log, exc,
                              len(self._buffer))
                    self._failures_since_log = 0
                    self._last_failure_log = now

    async def flush(self) -> None:
        """Write everything recorded so far. On failure the events stay buffered and it raises."""
        async with self._flush_lock:
            if not self._buffer:
                return
            batch, self._buffer = self._buffer, []

            def write(conn: sqlite3.Connection) -> None:
                with _transaction(conn):
                    conn.executemany(_INSERT, batch)

            try:
                # Shielded: once handed to the thread the batch will be written even if this
                # caller is cancelled, so it must not be put back (that would duplicate it).
                await asyncio.shield(self._db.run(write))
            except Exception:
                self.write_errors.inc()
                # Put the batch back in front, in order, within the bound.
                merged = batch + self._buffer
                overflow = len(merged) - self._max_buffered
                if overflow > 0:
                    self._drop(overflow)
                    merged = merged[overflow:]
                self._buffer = merged
                raise

    async def purge(
        self, *, now: float, message_log_retention: float, suppression_retention: float,
        changes_kept: int = SUPPRESSION_CHANGES_KEPT,
    ) -> int:
        """Delete log rows and suppression entries older than their retention, in short chunks."""
        log_cutoff = now - message_log_retention
        supp_cutoff = now - suppression_retention

        def run(conn: sqlite3.Connection) -> tuple[int, int]:
            counts = (
                _delete_in_chunks(conn, "message_log", "ts < ?", (log_cutoff,)),
                _delete_in_chunks(conn, "suppression", "created < ?", (supp_cutoff,)),
            )
            _delete_in_chunks(conn, "suppression_changes", "seq <= ?",
                              (_last_change(conn) - changes_kept,))
            return counts

        n_log, n_supp = await self._db.run(run)
        self._metrics.purged_records.labels(table="message_log").inc(n_log)
        self._metrics.purged_records.labels(table="suppression").inc(n_supp)
        self._metrics.last_purge.set(now)
        if n_log or n_supp:
            log.info("retention purge: removed %d log records, %d suppression entries",
                     n_log, n_supp)
        return n_log + n_supp

    async def forget(self, address: str) -> dict[str, int]:
        """Delete every record about an address (data deletion on request)."""
        await self.flush()
        return await self._db.run(lambda conn: _forget(conn, address))

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        try:
            await self.flush()
        except Exception:
            log.exception("message log: final flush failed; %d events lost", len(self._buffer))
        await self._db.close()

    # ---- synchronous readers and maintenance for the CLI -------------------------------------

    @staticmethod
    def query(
        path: str,
        *,
        sender: str | None = None,
        recipient: str | None = None,
        status: str | None = None,
        since: float | None = None,
        until: float | None = None,
        queue_id: str | None = None,
        limit: int = 100,
    ) -> list[dict[str, Any]]:
        """Newest first. ``sender``/``recipient`` match an address (any case), or a domain when
        they start with ``@``."""
        where: list[str] = []
        args: list[Any] = []
        for column, value in (("sender", sender), ("recipient", recipient)):
            if value is None:
                continue
            if value.startswith("@"):
                where.append(f"{column} LIKE ? ESCAPE '\\'")
                args.append("%" + value.replace("\\", "\\\\").replace("%", "\\%")
                            .replace("_", "\\_"))
            else:
                where.append(f"{column} = ?")
                args.append(value)
        if status is not None:
            if status not in STATUSES:
                raise ValueError(f"unknown status {status!r}: use one of {', '.join(STATUSES)}")
            where.append("status = ?")
            args.append(status)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        if queue_id is not None:
            where.append("queue_id = ?")
            args.append(queue_id)
        sql = f"SELECT {', '.join(_COLUMNS)} FROM message_log"  # noqa: S608 - fixed columns
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY ts DESC, id DESC LIMIT ?"
        args.append(max(0, limit))
        conn = _connect(path, readonly=True)
        try:
            return [dict(row) for row in conn.execute(sql, args)]
        finally:
            conn.close()

    @staticmethod
    def forget_address(path: str, address: str) -> dict[str, int]:
        conn = open_database(path)
        try:
            return _forget(conn, address)
        finally:
            conn.close()


def _forget(conn: sqlite3.Connection, address: str) -> dict[str, int]:
    address = _parse_address(address)
    # Deleted rows otherwise linger in free pages and in the WAL: overwrite them with zeros, then
    # move the WAL into the database and truncate it, so the address is gone from the files.
    conn.execute("PRAGMA secure_delete = ON")
    counts = {
        "message_log": _delete_in_chunks(
            conn, "message_log", "sender = ? OR recipient = ?", (address, address)),
        "suppression": _delete_in_chunks(conn, "suppression", "address = ?", (address,)),
    }
    # The change log must not keep the address either. Blanked entries tell every cache to
    # reload in full, which is how caches that still hold the address learn it is gone.
    with _transaction(conn):
        conn.execute("UPDATE suppression_changes SET address = ? WHERE address = ?",
                     (_FORGOTTEN, address))
    conn.execute("PRAGMA secure_delete = FAST")
    busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    if busy:
        log.warning("forget %s: the WAL is in use and was not truncated; its old pages are "
                    "overwritten at the next checkpoint", "<address>")
    return counts


# -------------------------------------------------------------------------------------------
# Suppression list
# -------------------------------------------------------------------------------------------


Entry = tuple[str, float]  # (reason, created)
# What `forget` leaves in the change log instead of the address (never a valid address).
_FORGOTTEN = ""


def _last_change(conn: sqlite3.Connection) -> int:
    # sqlite_sequence holds the last number AUTOINCREMENT gave, even after old rows are pruned.
    row = conn.execute(
        "SELECT seq FROM sqlite_sequence WHERE name = 'suppression_changes'").fetchone()
    return int(row[0]) if row else 0


def _read_all_suppression(conn: sqlite3.Connection) -> dict[str, Entry | None]:
    return {row[0]: (row[1], row[2])
            for row in conn.execute("SELECT address, reason, created FROM suppression")}


def _read_suppression_changes(
    conn: sqlite3.Connection, since: int, delta_limit: int
) -> tuple[int, bool, dict[str, Entry | None]] | None:
    """What changed after change number ``since``: (last change, full reload?, entries), where
    an entry of None means the address left the list. None when nothing changed."""
    conn.execute("BEGIN")  # one snapshot: the change numbers match the rows read
    try:
        last = _last_change(conn)
        if last == since:
            return None
        oldest = conn.execute("SELECT MIN(seq) FROM suppression_changes").fetchone()[0]
        missed = oldest is None or since < oldest - 1
        if since < 0 or missed or last - since > delta_limit:
            return last, True, _read_all_suppression(conn)
        changed = [row[0] for row in conn.execute(
            "SELECT DISTINCT address FROM suppression_changes WHERE seq > ?", (since,))]
        if _FORGOTTEN in changed:
            return last, True, _read_all_suppression(conn)
        delta: dict[str, Entry | None] = dict.fromkeys(changed)
        for i in range(0, len(changed), 500):
            chunk = changed[i:i + 500]
            marks = ",".join("?" * len(chunk))
            for row in conn.execute(
                f"SELECT address, reason, created FROM suppression "  # noqa: S608
                f"WHERE address IN ({marks})", chunk,
            ):
                delta[row[0]] = (row[1], row[2])
        return last, False, delta
    finally:
        conn.execute("COMMIT")


def _upsert(
    conn: sqlite3.Connection, address: str, reason: str, source: str, created: float
) -> None:
    with _transaction(conn):
        conn.execute(
            "INSERT INTO suppression (address, reason, source, created) VALUES (?, ?, ?, ?) "
            "ON CONFLICT (address) DO UPDATE SET reason = excluded.reason, "
            "source = excluded.source, created = excluded.created",
            (address, reason, source, created),
        )


def _delete(conn: sqlite3.Connection, address: str) -> bool:
    with _transaction(conn):
        cur = conn.execute("DELETE FROM suppression WHERE address = ?", (address,))
    return cur.rowcount > 0


class SuppressionList:
    """Addresses that must not receive mail (hard bounces, complaints, manual entries).

    Lookups hit an in-memory dict. About every second a background task applies the changes
    made since its last look (``suppression_changes``), so entries added or removed by the CLI,
    another worker or the purge apply within about a second, at a cost that grows with the
    number of changes, not with the size of the list.
    """

    def __init__(
        self, path: str, metrics: RelayMetrics,
        *, refresh_interval: float = SUPPRESSION_REFRESH_INTERVAL, export_gauge: bool = True,
        delta_limit: int = SUPPRESSION_DELTA_LIMIT,
        on_added: Callable[[list[tuple[str, str]]], Awaitable[None]] | None = None,
    ) -> None:
        self.path = path
        # Told (address, reason) of entries that appeared since the last refresh, whoever
        # wrote them (the CLI, another worker); not for the entries present at start.
        self._on_added = on_added
        self._metrics = metrics
        # With several workers each holds the whole list; one of them reports its size, so
        # that summing the gauge over processes counts each address once.
        self._export_gauge = export_gauge
        self._refresh_interval = refresh_interval
        self._db = _Worker(path, "suppression")
        self._cache: dict[str, Entry] = {}
        self._version = -1  # number of the last change applied to the cache; -1: none yet
        self._delta_limit = delta_limit
        self.full_reloads = 0  # for tests: how often the whole table was read
        self._task: asyncio.Task[None] | None = None
        self._refreshed = asyncio.Condition()
        self._passes_started = 0
        self._passes_done = 0

    def __len__(self) -> int:
        return len(self._cache)

    def _set_gauge(self) -> None:
        if self._export_gauge:
            self._metrics.suppression_entries.set(len(self._cache))

    async def start(self) -> None:
        await self._db.open()
        await self.refresh()
        self._task = asyncio.create_task(self._refresher(), name="suppression-refresh")

    def is_suppressed(self, address: str) -> tuple[str, float] | None:
        return self._cache.get(_parse_address(address))

    async def add(self, address: str, reason: str, *, source: str) -> None:
        address = _parse_address(address)
        created = time.time()
        await self._db.run(lambda conn: _upsert(conn, address, reason, source, created))
        self._cache[address] = (reason, created)
        self._set_gauge()

    async def remove(self, address: str) -> bool:
        address = _parse_address(address)
        removed = await self._db.run(lambda conn: _delete(conn, address))
        self._cache.pop(address, None)
        self._set_gauge()
        return removed

    async def refresh(self) -> bool:
        """Apply the changes made since the last look (by anyone); True if there were any."""
        since = self._version
        changes = await self._db.run(
            lambda conn: _read_suppression_changes(conn, since, self._delta_limit))
        if changes is None:
            return False
        first_load = since < 0
        before = self._cache
        self._version, full, entries = changes
        added = [(a, e[0]) for a, e in entries.items()
                 if e is not None and (a not in before or before[a][0] != e[0])]
        if full:
            self._cache = {a: e for a, e in entries.items() if e is not None}
        else:
            for address, entry in entries.items():
                if entry is None:
                    self._cache.pop(address, None)
                else:
                    self._cache[address] = entry
        self.full_reloads += full
        self._set_gauge()
        if self._on_added is not None and added and not first_load:
            await self._on_added(added)
        return True

    async def wait_refreshed(self) -> None:
        """Wait for a background refresh pass that started after this call, so that it saw
        every write made before the call (by the CLI or another process)."""
        target = self._passes_started + 1
        async with self._refreshed:
            await self._refreshed.wait_for(lambda: self._passes_done >= target)

    async def _refresher(self) -> None:
        while True:
            await asyncio.sleep(self._refresh_interval)
            self._passes_started += 1
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("suppression list: refresh failed; keeping the cached entries")
            self._passes_done = self._passes_started
            async with self._refreshed:
                self._refreshed.notify_all()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        await self._db.close()

    # ---- synchronous helpers for the CLI -----------------------------------------------------

    @staticmethod
    def list_entries(path: str) -> list[dict[str, Any]]:
        conn = _connect(path, readonly=True)
        try:
            return [
                dict(row) for row in conn.execute(
                    "SELECT address, reason, source, created FROM suppression ORDER BY address")
            ]
        finally:
            conn.close()

    @staticmethod
    def add_entry(path: str, address: str, reason: str = "manual", *, source: str = "cli",
                  now: float | None = None) -> None:
        conn = open_database(path)
        try:
            _upsert(conn, _parse_address(address), reason, source,
                    time.time() if now is None else now)
        finally:
            conn.close()

    @staticmethod
    def remove_entry(path: str, address: str) -> bool:
        conn = open_database(path)
        try:
            return _delete(conn, _parse_address(address))
        finally:
            conn.close()
