"""Message-log searches as the portal offers them: parsed from a query string, always scoped to
one namespace, paged with a cursor (the last row's time and how many rows of that time were
shown), never reaching rows that lack a namespace."""

from __future__ import annotations

import base64
import binascii
import csv
import datetime
import io
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mailplane_relay.events import STATUSES
from mailplane_relay.store import LogQuery, StoreBackend

NAMESPACE_RE = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
PAGE_DEFAULT = 50
PAGE_MAX = 500
CSV_MAX = 100_000
COLUMNS = ("ts", "status", "queue_id", "message_id", "credential", "sender", "recipient",
           "response", "size", "attempt", "remote")


class BadRequest(ValueError):
    """A parameter the user gave is wrong; the message names it and says what to give."""


def check_namespace(ns: str) -> str:
    if not NAMESPACE_RE.match(ns):
        raise BadRequest(f"namespace {ns[:80]!r}: not a Kubernetes namespace name "
                         "(lower-case letters, digits and '-', at most 63)")
    return ns


def parse_time(value: str, field: str) -> float:
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number) or abs(number) > 1e11:
            raise BadRequest(f"{field}: {value[:40]!r} is not a time; give ISO 8601 such as "
                             "2026-12-07T17:00 or seconds since the epoch")
        return number
    try:
        when = datetime.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(f"{field}: {value[:40]!r} is not a time; give ISO 8601 such as "
                         "2026-12-07T17:00 (UTC unless a zone is given) or seconds since "
                         "the epoch") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def iso(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[
        :-3] + "Z"


@dataclass(frozen=True)
class Search:
    """What a user asked for (the namespace comes from the authorised path, never from here)."""

    sender: str | None = None
    recipient: str | None = None
    status: str | None = None
    queue_id: str | None = None
    credential: str | None = None
    since: float | None = None
    until: float | None = None
    page_size: int = PAGE_DEFAULT
    cursor: tuple[float, int] | None = None

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Search:
        def text(name: str, limit: int = 320) -> str | None:
            value = (params.get(name) or "").strip()
            if len(value) > limit:
                raise BadRequest(f"{name}: at most {limit} characters")
            return value or None

        status = text("status", 20)
        if status is not None and status not in STATUSES:
            raise BadRequest(f"status {status!r}: give one of {', '.join(STATUSES)}")
        since = text("since", 40)
        until = text("until", 40)
        size_text = text("page_size", 6)
        page_size = PAGE_DEFAULT
        if size_text is not None:
            if not size_text.isdigit() or not 1 <= int(size_text) <= PAGE_MAX:
                raise BadRequest(f"page_size: a number from 1 to {PAGE_MAX}")
            page_size = int(size_text)
        return cls(
            sender=text("sender"), recipient=text("recipient"), status=status,
            queue_id=text("queue_id", 64), credential=text("credential", 253),
            since=parse_time(since, "since") if since else None,
            until=parse_time(until, "until") if until else None,
            page_size=page_size, cursor=decode_cursor(text("cursor", 100)),
        )

    def params(self, **overrides: Any) -> dict[str, str]:
        """The query string that repeats this search (for links, CSV export, next page)."""
        out: dict[str, str] = {}
        for name in ("sender", "recipient", "status", "queue_id", "credential"):
            value = getattr(self, name)
            if value:
                out[name] = value
        for name in ("since", "until"):
            value = getattr(self, name)
            if value is not None:
                out[name] = repr(value)
        if self.page_size != PAGE_DEFAULT:
            out["page_size"] = str(self.page_size)
        out.update({k: v for k, v in overrides.items() if v is not None})
        return out


def encode_cursor(ts: float, skip: int) -> str:
    return base64.urlsafe_b64encode(f"{ts!r}:{skip}".encode()).decode().rstrip("=")


def decode_cursor(value: str | None) -> tuple[float, int] | None:
    if not value:
        return None
    try:
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)).decode()
        ts_text, skip_text = raw.split(":")
        ts, skip = float(ts_text), int(skip_text)
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise BadRequest("cursor: not a cursor this server gave; start the search again "
                         "without it") from None
    if not math.isfinite(ts) or not 0 <= skip <= CSV_MAX:
        raise BadRequest("cursor: out of range; start the search again without it")
    return ts, skip


async def page(store: StoreBackend, namespace: str, search: Search
               ) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows of ``namespace``, newest first, and the cursor of the next page."""
    check_namespace(namespace)  # never "" : rows without a tenant are never shown
    until, skip = search.until, 0
    if search.cursor is not None:
        cursor_ts, skip = search.cursor
        bound = math.nextafter(cursor_ts, math.inf)
        until = bound if until is None else min(until, bound)
    rows = await store.query(LogQuery(
        sender=search.sender, recipient=search.recipient, status=search.status,
        since=search.since, until=until, queue_id=search.queue_id, namespace=namespace,
        credential=search.credential, limit=search.page_size + skip + 1))
    rows = [r for r in rows if r.get("namespace") == namespace]  # belt and braces
    if skip and search.cursor is not None:
        # The rows at exactly the cursor's time that the previous page showed come first.
        shown = [r for r in rows[:skip] if r["ts"] == search.cursor[0]]
        rows = rows[len(shown):]
    more = len(rows) > search.page_size
    rows = rows[:search.page_size]
    next_cursor = None
    if more and rows:
        last_ts = rows[-1]["ts"]
        same = sum(1 for r in rows if r["ts"] == last_ts)
        if search.cursor is not None and search.cursor[0] == last_ts:
            same += search.cursor[1]
        next_cursor = encode_cursor(last_ts, same)
    return rows, next_cursor


async def history(store: StoreBackend, namespace: str, queue_id: str) -> list[dict[str, Any]]:
    """Every log row of one message of ``namespace``, oldest first."""
    check_namespace(namespace)
    rows = await store.query(LogQuery(queue_id=queue_id, namespace=namespace, limit=10_000))
    return sorted((r for r in rows if r.get("namespace") == namespace),
                  key=lambda r: r["ts"])


def public_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the portal shows it (the columns of COLUMNS, time also as ISO 8601)."""
    out = {c: row.get(c) for c in COLUMNS}
    out["time"] = iso(float(row["ts"]))
    return out


def csv_cell(value: Any) -> str:
    text = "" if value is None else str(value)
    # A spreadsheet runs a cell that starts with one of these as a formula: an address or an
    # SMTP reply chosen by a stranger must stay text.
    if text[:1] in ("=", "+", "-", "@", "\t", "\r"):
        text = "'" + text
    return text


async def export_csv(store: StoreBackend, namespace: str, search: Search) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["time", *COLUMNS[1:]])
    search = replace(search, page_size=PAGE_MAX, cursor=None)
    written = 0
    while written < CSV_MAX:
        rows, cursor = await page(store, namespace, search)
        for row in rows:
            writer.writerow([iso(float(row["ts"]))] + [csv_cell(row.get(c)) for c in COLUMNS[1:]])
        written += len(rows)
        if cursor is None:
            break
        search = replace(search, cursor=decode_cursor(cursor))
    return buf.getvalue()
