"""What the portal itself keeps in the store, and the store reads the backend interface does
not offer (a team's view of the pool-wide suppression list).

Tables (created when missing, in the same SQLite file or PostgreSQL database as the rest of the
store):

- ``portal_audit``: who changed what, per namespace (time, namespace, user, action, target,
  detail). An erased address is replaced in it by its masked form.
- ``portal_erasures``: erasure requests (id, namespace, user, masked address, keyed hash of the
  address, state, times, the namespace's own counts). Never the address itself.
- ``portal_sessions``: login sessions (sessions.py): a SHA-256 hash of the cookie's value, the
  user's name and groups, times. Never the cookie's value or a token.
"""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS portal_audit (
        id {serial} PRIMARY KEY, ts {real} NOT NULL, namespace TEXT NOT NULL,
        actor TEXT NOT NULL, action TEXT NOT NULL, target TEXT NOT NULL, detail TEXT NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS portal_audit_ns_ts ON portal_audit (namespace, ts)",
    """CREATE TABLE IF NOT EXISTS portal_erasures (
        id TEXT PRIMARY KEY, namespace TEXT NOT NULL, actor TEXT NOT NULL,
        address_hint TEXT NOT NULL, address_hash TEXT NOT NULL, state TEXT NOT NULL,
        created {real} NOT NULL, finished {real}, report TEXT NOT NULL DEFAULT '{{}}',
        error TEXT NOT NULL DEFAULT '')""",
    "CREATE INDEX IF NOT EXISTS portal_erasures_ns ON portal_erasures (namespace, created)",
    """CREATE TABLE IF NOT EXISTS portal_sessions (
        id_hash TEXT PRIMARY KEY, kind TEXT NOT NULL, username TEXT NOT NULL,
        data TEXT NOT NULL, created {real} NOT NULL, seen {real} NOT NULL,
        expires {real} NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS portal_sessions_expires ON portal_sessions (expires)",
    "CREATE INDEX IF NOT EXISTS portal_sessions_user ON portal_sessions (username)",
)


_SCHEMA_LOCK = 0x6D70706F  # "mppo": the portal's tables


_ADDRESS_RE = re.compile(r"[^\s@<>,;\"'()*]+@[^\s@<>,;\"'()]+")
"""An address in an audit row's text (what is already masked, ``j***@...``, is left)."""


def mask(address: str) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com``: enough to tell requests apart."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


@dataclass
class Erasure:
    id: str
    namespace: str
    actor: str
    address_hint: str
    state: str
    created: float
    finished: float | None
    report: dict[str, int]
    error: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "namespace": self.namespace, "requested_by": self.actor,
                "address": self.address_hint, "state": self.state, "created": self.created,
                "finished": self.finished, "report": self.report, "error": self.error}


OTHER_TEAM = "portal (another team)"
"""How the source of a suppression entry another team added is shown."""


def own_source(namespace: str, source: str) -> bool:
    """Whether a suppression entry was added through the portal by this namespace's users."""
    return source.startswith(f"portal:{namespace}:")


class Records:
    """SQL on the store's database with the portal's own connection (SQLite file or DSN)."""

    def __init__(self, *, sqlite_path: str | None = None, dsn: str | None = None) -> None:
        if (sqlite_path is None) == (dsn is None):
            raise ValueError("give exactly one of sqlite_path and dsn")
        self.sqlite_path = sqlite_path
        self.dsn = dsn
        self.mark = "?" if sqlite_path else "%s"
        self._lock = asyncio.Lock()
        self._conn: sqlite3.Connection | None = None
        self._pool: Any = None

    async def open(self) -> None:
        if self.sqlite_path:
            def connect() -> sqlite3.Connection:
                conn = sqlite3.connect(self.sqlite_path or "", timeout=10,
                                       check_same_thread=False, isolation_level=None)
                conn.row_factory = sqlite3.Row
                for stmt in _SCHEMA:
                    conn.execute(stmt.format(serial="INTEGER", real="REAL"))
                return conn
            self._conn = await asyncio.to_thread(connect)
        else:
            from psycopg.rows import dict_row  # noqa: PLC0415
            from psycopg_pool import AsyncConnectionPool  # noqa: PLC0415

            self._pool = AsyncConnectionPool(self.dsn or "", min_size=1, max_size=4, open=False,
                                             timeout=5, kwargs={"row_factory": dict_row,
                                                                "autocommit": True})
            await self._pool.open()
            async with self._pool.connection() as conn, conn.transaction():
                # Replicas start together: one at a time creates the tables (concurrent
                # CREATE TABLE IF NOT EXISTS can fail on PostgreSQL's catalog).
                await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
                for stmt in _SCHEMA:
                    await conn.execute(stmt.format(serial="BIGSERIAL",
                                                   real="DOUBLE PRECISION"))

    async def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _all(self, sql: str, args: Sequence[Any] = ()) -> list[dict[str, Any]]:
        sql = sql.replace("?", self.mark)
        if self._conn is not None:
            conn = self._conn

            def run() -> list[dict[str, Any]]:
                return [dict(r) for r in conn.execute(sql, tuple(args))]
            async with self._lock:
                return await asyncio.to_thread(run)
        async with self._pool.connection() as pg:
            cur = await pg.execute(sql, tuple(args))
            return list(await cur.fetchall()) if cur.description else []

    async def _do(self, sql: str, args: Sequence[Any] = ()) -> None:
        await self._all(sql, args)

    # ---- audit log

    async def audit(self, namespace: str, actor: str, action: str, target: str,
                    detail: str = "", *, clock: Callable[[], float] = time.time) -> None:
        await self._do("INSERT INTO portal_audit (ts, namespace, actor, action, target, detail) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (clock(), namespace, actor, action, target, detail[:500]))

    async def audit_log(self, namespace: str, limit: int = 200) -> list[dict[str, Any]]:
        return await self._all("SELECT ts, actor, action, target, detail FROM portal_audit "
                               "WHERE namespace = ? ORDER BY ts DESC, id DESC LIMIT ?",
                               (namespace, limit))

    async def mask_in_audit(self, namespace: str, address: str) -> None:
        """An erased address leaves the namespace's audit log too (its masked form stays)."""
        await self._do("UPDATE portal_audit SET target = ? WHERE namespace = ? AND "
                       "lower(target) = ?", (mask(address), namespace, address))
        # A note or reason may name it too (as typed: any case); the rest of it stays as
        # written.
        pattern = "%" + address.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"
        typed = re.compile(re.escape(address), re.IGNORECASE)
        for row in await self._all("SELECT id, detail FROM portal_audit WHERE namespace = ? "
                                   "AND lower(detail) LIKE ? ESCAPE '!'", (namespace, pattern)):
            await self._do("UPDATE portal_audit SET detail = ? WHERE id = ?",
                           (typed.sub(mask(address), str(row["detail"])), row["id"]))

    async def mask_old_audit(self, before: float) -> int:
        """Audit rows older than ``before`` keep who did what and when, with every address in
        them masked: the addresses stay no longer than the message log's rows about them."""
        rows = await self._all(
            "SELECT id, target, detail FROM portal_audit WHERE ts < ? AND "
            "(target LIKE ? OR detail LIKE ?)", (before, "%@%", "%@%"))
        changed = 0
        for row in rows:
            target = _ADDRESS_RE.sub(lambda m: mask(m.group(0)), str(row["target"]))
            detail = _ADDRESS_RE.sub(lambda m: mask(m.group(0)), str(row["detail"]))
            if (target, detail) != (row["target"], row["detail"]):
                await self._do("UPDATE portal_audit SET target = ?, detail = ? WHERE id = ?",
                               (target, detail, row["id"]))
                changed += 1
        return changed

    # ---- the team's view of the suppression list

    async def team_suppression(self, namespace: str, contains: str | None = None,
                               limit: int = 1000) -> list[dict[str, Any]]:
        """The team's own entries (added through the portal; they stop only its mail, scope
        ``team``), and the pool-wide ones (scope ``pool``) for addresses it has sent mail to
        (they are in its own log) or added itself before entries had scopes. Another team's
        own entries are not shown: they do not stop this team's mail. A pool-wide entry another
        team added through the portal (before scopes) shows as ``OTHER_TEAM``: its source names
        that team's namespace and user."""
        sql = ("SELECT s.address, s.reason, s.source, s.created, "  # noqa: S608
               "CASE WHEN s.namespace = '' THEN 'pool' ELSE 'team' END AS scope "
               "FROM suppression s WHERE (s.namespace = ? OR (s.namespace = '' AND ("
               "EXISTS (SELECT 1 FROM message_log m WHERE m.namespace = ? AND "
               + ("m.recipient = s.address" if self.sqlite_path
                  else "lower(m.recipient) = s.address") + ") "
               "OR substr(s.source, 1, ?) = ?)))")
        own = f"portal:{namespace}:"
        args: list[Any] = [namespace, namespace, len(own), own]
        if contains:
            sql += " AND s.address LIKE ? ESCAPE '!'"
            args.append("%" + contains.lower().replace("!", "!!").replace("%", "!%")
                        .replace("_", "!_") + "%")
        sql += " ORDER BY s.address, s.namespace LIMIT ?"
        args.append(limit)
        rows = await self._all(sql, args)
        for row in rows:
            source = str(row["source"] or "")
            if source.startswith("portal:") and not own_source(namespace, source):
                row["source"] = OTHER_TEAM
        return rows

    async def suppression_entry(self, address: str, namespace: str) -> dict[str, Any] | None:
        """The entry that stops this namespace's mail to an address (pool-wide, whoever added
        it, or the namespace's own), or None."""
        rows = await self._all("SELECT reason, source FROM suppression WHERE address = ? "
                               "AND namespace IN ('', ?)", (address, namespace))
        return rows[0] if rows else None

    async def erase_in_namespace(self, namespace: str, address: str) -> int:
        """Delete this namespace's message-log rows where the address is the sender or a
        recipient, and its webhook events not yet delivered that name it; other namespaces'
        rows are theirs (erasure across every team is the platform team's: ``mailplane
        erase``). Returns how many webhook events went."""
        col = "{0}" if self.sqlite_path else "lower({0})"
        if self.sqlite_path:
            await self._do("PRAGMA secure_delete = ON")
        where = (f"namespace = ? AND ({col.format('sender')} = ? "
                 f"OR {col.format('recipient')} = ?)")
        await self._do(f"DELETE FROM message_log WHERE {where}",  # noqa: S608
                       (namespace, address, address))
        events = await self._all(f"DELETE FROM webhook_outbox WHERE {where} "  # noqa: S608
                                 "RETURNING id", (namespace, address, address))
        return len(events)

    async def namespace_knows(self, namespace: str, address: str) -> dict[str, int]:
        """Rows of this namespace's log where the address is the sender or a recipient."""
        col = "{0}" if self.sqlite_path else "lower({0})"
        rows = await self._all(
            f"SELECT (SELECT COUNT(*) FROM message_log WHERE namespace = ? AND "  # noqa: S608
            f"{col.format('sender')} = ?) AS sent, (SELECT COUNT(*) FROM message_log WHERE "
            f"namespace = ? AND {col.format('recipient')} = ?) AS received",
            (namespace, address, namespace, address))
        return {"as_sender": int(rows[0]["sent"]), "as_recipient": int(rows[0]["received"])}

    # ---- erasure requests

    async def erasure_create(self, namespace: str, actor: str, address: str,
                             address_hash: str) -> Erasure:
        e = Erasure(uuid.uuid4().hex, namespace, actor, mask(address), "pending", time.time(),
                    None, {}, "")
        await self._do("INSERT INTO portal_erasures (id, namespace, actor, address_hint, "
                       "address_hash, state, created) VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (e.id, namespace, actor, e.address_hint, address_hash, e.state,
                        e.created))
        return e

    async def fail_interrupted(self) -> int:
        """At the portal's start: requests a previous run left pending or running cannot be
        finished (the address is not kept); they fail, saying to ask again."""
        rows = await self._all("SELECT id FROM portal_erasures WHERE state IN "
                               "('pending', 'running')")
        await self._do("UPDATE portal_erasures SET state = 'failed', finished = ?, error = ? "
                       "WHERE state IN ('pending', 'running')",
                       (time.time(), "the portal restarted before it finished; ask again"))
        return len(rows)

    async def erasure_update(self, erasure_id: str, state: str, report: dict[str, int],
                             error: str = "") -> None:
        await self._do("UPDATE portal_erasures SET state = ?, report = ?, error = ?, "
                       "finished = ? WHERE id = ?",
                       (state, json.dumps(report), error[:300],
                        time.time() if state in ("done", "failed") else None, erasure_id))

    async def erasures(self, namespace: str, erasure_id: str | None = None
                       ) -> list[Erasure]:
        sql = ("SELECT id, namespace, actor, address_hint, state, created, finished, report, "
               "error FROM portal_erasures WHERE namespace = ?")
        args: list[Any] = [namespace]
        if erasure_id is not None:
            sql += " AND id = ?"
            args.append(erasure_id)
        sql += " ORDER BY created DESC LIMIT 200"
        return [Erasure(r["id"], r["namespace"], r["actor"], r["address_hint"], r["state"],
                        r["created"], r["finished"], json.loads(r["report"] or "{}"),
                        r["error"]) for r in await self._all(sql, args)]


FIGURE_STATUSES = ("delivered", "deferred", "bounced", "expired", "suppressed", "rejected")


async def _figures(records: Records, namespace: str, since: float, bucket: int
                   ) -> list[dict[str, Any]]:
    domain = ("lower(substr(sender, instr(sender, '@') + 1))" if records.sqlite_path
              else "split_part(lower(sender), '@', 2)")
    bucket_sql = (f"CAST(ts / {int(bucket)} AS INTEGER)" if records.sqlite_path
                  else f"floor(ts / {int(bucket)})::bigint")
    statuses = ", ".join(f"'{s}'" for s in FIGURE_STATUSES)
    return await records._all(
        f"SELECT {bucket_sql} AS bucket, COALESCE(credential, '') AS credential, "  # noqa: S608
        f"{domain} AS domain, status, COUNT(*) AS n FROM message_log "
        f"WHERE namespace = ? AND ts >= ? AND status IN ({statuses}) "
        "GROUP BY 1, 2, 3, 4", (namespace, since))


COMPLAINT_DAYS = 7
"""How far back the store keeps complaint counts (``complaint_buckets`` per credential and
``complaint_domain_buckets`` per credential and sender domain, per minute)."""


async def _complaints(records: Records, credentials: list[str], since: float
                      ) -> list[dict[str, Any]]:
    """Complaints (feedback-loop reports the relays' intake matched) per credential per minute:
    the store keeps them per credential only, for the pool's complaint-rate pause."""
    if not credentials:
        return []
    marks = ", ".join("?" for _ in credentials)
    return await records._all(
        "SELECT credential, minute, complaints FROM complaint_buckets "  # noqa: S608
        f"WHERE minute >= ? AND credential IN ({marks})",
        (int(since // 60), *credentials))


async def _domain_complaints(records: Records, credentials: list[str], since: float
                             ) -> list[dict[str, Any]]:
    """Complaints per sender domain per minute, of these credentials' mail only: a domain's
    complaints about mail another team sent (with its own credential) are that team's."""
    if not credentials:
        return []
    marks = ", ".join("?" for _ in credentials)
    return await records._all(
        "SELECT domain, minute, sum(complaints) AS complaints "  # noqa: S608
        f"FROM complaint_domain_buckets WHERE minute >= ? AND credential IN ({marks}) "
        "GROUP BY domain, minute", (int(since // 60), *credentials))


async def figures(records: Records, namespace: str, since: float, bucket: int
                  ) -> dict[str, dict[str, dict[int, dict[str, int]]]]:
    """Counts per status, per time bucket, per credential and per sender domain:
    ``{"credential": {name: {bucket_start: {status: n}}}, "domain": {...}}``. Both also count
    ``complained``: the complaints the relays' intake matched to this namespace's mail."""
    out: dict[str, dict[str, dict[int, dict[str, int]]]] = {"credential": {}, "domain": {}}
    for row in await _figures(records, namespace, since, bucket):
        start = int(row["bucket"]) * bucket
        for kind in ("credential", "domain"):
            series = out[kind].setdefault(str(row[kind] or "(none)"), {})
            counts = series.setdefault(start, {})
            counts[row["status"]] = counts.get(row["status"], 0) + int(row["n"])
    # Only credentials this namespace's own mail went out with (a credential's username is
    # unique in the pool); a complaint always follows mail it sent, so it is in the window.
    own = [c for c in out["credential"] if c != "(none)"]
    for row in await _complaints(records, own, since):
        start = int(row["minute"]) * 60 // bucket * bucket
        counts = out["credential"][str(row["credential"])].setdefault(start, {})
        counts["complained"] = counts.get("complained", 0) + int(row["complaints"])
    for row in await _domain_complaints(records, own, since):
        start = int(row["minute"]) * 60 // bucket * bucket
        series = out["domain"].setdefault(str(row["domain"]), {})
        counts = series.setdefault(start, {})
        counts["complained"] = counts.get("complained", 0) + int(row["complaints"])
    return out
