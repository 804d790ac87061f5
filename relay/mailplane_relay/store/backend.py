"""The store interface: what every backend (SQLite, PostgreSQL) offers the relay and the CLI.

Every method is a coroutine. The SQLite backend runs its statements on one dedicated thread;
the PostgreSQL backend uses psycopg's asyncio connections. The CLI drives the same coroutines
with ``asyncio.run``, so there is one implementation per backend, not a sync and an async one.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

from ..events import STATUSES

# One row of the message log as the writer hands it to a backend, in this column order.
LOG_COLUMNS: tuple[str, ...] = (
    "event_id", "ts", "status", "queue_id", "message_id", "credential", "namespace", "sender",
    "recipient", "response", "size", "attempt", "remote",
)
LogRow = tuple[Any, ...]

# One webhook event waiting in the outbox (docs/webhooks.md), in this column order. Written in
# the same transaction as the log rows it comes from; ``target`` is ``relay`` (the platform's
# endpoint) or ``credential:<username>`` (that credential's endpoint, its own events only).
OUTBOX_COLUMNS: tuple[str, ...] = (
    "event_id", "target", "type", "ts", "credential", "namespace", "sender", "recipient",
    "queue_id", "message_id", "response", "attempt", "next_attempt",
)
OutboxRow = tuple[Any, ...]
# What a claim returns per event: the columns above plus these.
OUTBOX_CLAIMED: tuple[str, ...] = ("id", *OUTBOX_COLUMNS[:-1], "attempts")

# (reason, created) of a suppression entry.
Entry = tuple[str, float]
# The entries of one address by scope: "" is pool-wide (delivery facts, the platform's CLI);
# a namespace is an entry that namespace's team added (the portal), stopping only its own mail.
Scopes = dict[str, Entry]
POOL_WIDE = ""


# The source the intake writes its complaints with: the receiving worker counted the complaint
# already (complaints_total, the rate window), so no change feed counts it again.
INTAKE_SOURCE = "feedback"


def counted_at_write(reason: str, source: str) -> bool:
    """Whether a suppression entry needs no counting by a change feed: anything but a complaint,
    and a complaint the intake counted on receipt. A complaint written any other way (the CLI,
    a feedback-loop processor) is counted once per pool, by the pod that claims it
    (``suppression_claim``)."""
    return reason != "complaint" or source == INTAKE_SOURCE


def complaint_hash(key: bytes, address: str) -> str:
    """What an erased complaint address is kept as: a keyed hash, never the address."""
    digest = hmac.new(key, address.strip().lower().encode(), hashlib.sha256).hexdigest()
    return f"hmac-sha256:{digest}"


def mask_address(address: str) -> str:
    """``jane.doe@example.com`` -> ``j***@example.com``: what stays of an erased address where
    a record must remain readable (the portal's audit log)."""
    local, _, domain = address.partition("@")
    return f"{local[:1]}***@{domain}" if domain else "***"


def like_pattern(text: str) -> str:
    """A LIKE pattern (``ESCAPE '!'``) matching any value that contains ``text``."""
    return "%" + text.replace("!", "!!").replace("%", "!%").replace("_", "!_") + "%"


# The portal keeps an audit log in the same database (portal/mailplane_portal/records.py); an
# erasure masks the address there too when the table exists.
PORTAL_AUDIT = "portal_audit"
# A worker not seen for this long is forgotten (the purge deletes its row): it no longer counts
# as unreachable in an erasure report.
PEER_MEMORY = 86400.0
# The portal's records purged with the message log's retention: table -> its time column.
PORTAL_RECORDS: dict[str, str] = {PORTAL_AUDIT: "ts", "portal_erasures": "created"}


class StoreError(Exception):
    """The store cannot be used (missing, unreachable, or written by a newer version)."""


class StoreUnavailable(StoreError):
    """The store did not answer (database down, network, timeout): a temporary condition."""


@dataclass(frozen=True, slots=True)
class LogQuery:
    """A search of the message log, newest first. ``sender``/``recipient`` match an address
    (any case), or a whole domain when they start with ``@``."""

    sender: str | None = None
    recipient: str | None = None
    status: str | None = None
    since: float | None = None
    until: float | None = None
    queue_id: str | None = None
    namespace: str | None = None
    credential: str | None = None
    limit: int = 100

    def __post_init__(self) -> None:
        if self.status is not None and self.status not in STATUSES:
            raise ValueError(
                f"unknown status {self.status!r}: use one of {', '.join(STATUSES)}")


@dataclass(frozen=True, slots=True)
class SuppressionDelta:
    """Changes to the suppression list after a cache's last change number.

    ``full``: ``entries`` is the whole list (the cache replaces its content); otherwise it holds
    the changed addresses only, each with every entry it has now (none: it left the list)."""

    last: int
    full: bool
    entries: dict[str, Scopes]


@dataclass(slots=True)
class EraseReport:
    """What an erasure removed, per place. Counts only, never the address."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, place: str, n: int) -> None:
        self.counts[place] = self.counts.get(place, 0) + n


class ErasureMark(NamedTuple):
    """An erasure request as a held-back write checks it: the address while the request is
    open, its keyed hash (``complaint_hash``) once closed, and when it was requested."""

    address: str | None
    address_hash: str | None
    requested: float


@dataclass(frozen=True, slots=True)
class ErasureState:
    """An erasure request: ``address`` until it completes (then None), the reports of the
    workers that carried it out, how many live workers have not yet, and how many workers
    seen within the last day but not within the liveness horizon (down, not waited for) have
    not either: their spools were not erased."""

    id: int
    address: str | None
    requested: float
    completed: float | None
    report: dict[str, int] | None
    worker_reports: list[dict[str, int]]
    waiting: int
    unreachable: int = 0


class StoreBackend(Protocol):
    """One store: the message log, the suppression list and the shared sending state."""

    #: where it is, for messages ("sqlite:/path", "postgresql://host/db"); never a password
    description: str
    #: True when several pods share it (PostgreSQL); False for a file of one pod (SQLite)
    shared: bool

    async def open(self) -> None: ...
    async def close(self) -> None: ...

    # ---- message log
    async def write_events(self, rows: list[LogRow],
                           outbox: list[OutboxRow] | None = None) -> None:
        """Append rows, and the webhook events made from them, in one transaction; a row (an
        event) whose ``event_id`` (and target) is already stored is skipped (replay)."""
    async def query(self, q: LogQuery) -> list[dict[str, Any]]: ...
    async def oldest_event(self) -> float | None:
        """Timestamp of the oldest message-log row, or None when the log is empty."""
    async def oldest_records(self) -> dict[str, float | None]:
        """Per table that holds addresses under a retention (``message_log``,
        ``suppression``): the timestamp of its oldest record, None when it is empty."""
    async def purge(self, *, log_before: float, suppression_before: float,
                    changes_before: float) -> tuple[int, int]:
        """Delete log rows and suppression entries older than the cut-offs; suppression
        changes older than ``changes_before``. Returns (log rows, suppression entries)."""

    async def purge_closed_namespaces(self, open_namespaces: Collection[str], *, now: float,
                                      closed_before: float) -> tuple[int, int]:
        """Account closure: mark ``open_namespaces`` (the tenants the relay serves) seen at
        ``now`` (a namespace with team-scoped suppression entries never marked starts at
        ``now``), then delete the team-scoped suppression entries and the webhook outbox rows
        of every namespace last seen before ``closed_before``, and forget it. Returns
        (suppression entries, outbox rows)."""

    async def purge_portal(self, before: float) -> dict[str, int]:
        """Delete the portal's audit entries and erasure records older than ``before`` (when
        the portal keeps them in this store); rows deleted per table."""

    # ---- suppression list
    async def suppression_upsert(self, address: str, reason: str, source: str,
                                 created: float, namespace: str = POOL_WIDE) -> None: ...
    async def suppression_claim(self, address: str) -> bool:
        """Mark a complaint not yet counted as counted; True for the one caller (in the pool)
        that did, which then counts it."""
    async def suppression_delete(self, address: str, namespace: str | None = None) -> bool:
        """Delete the address's entry of that scope (``POOL_WIDE`` or a namespace), or every
        entry of the address (None: the platform's CLI)."""
    async def suppression_list(self) -> list[dict[str, Any]]: ...
    async def suppression_changes(self, since: int, delta_limit: int
                                  ) -> SuppressionDelta | None:
        """What changed after change number ``since`` (-1: everything); None if nothing."""

    # ---- erasure
    #: keys for erased complaint addresses from files (``store.erasureKeyFiles``), newest
    #: first; empty: the key kept in the store itself (made once)
    configured_keys: tuple[bytes, ...]

    async def erasure_key(self) -> bytes:
        """The key new hashes of erased complaint addresses are made with: the first configured
        key, else the store's own (made once, then kept)."""
    async def erasure_keys(self) -> list[bytes]:
        """Every key a hash may have been made with: the configured keys and the store's own
        key if it has one (hashes made before the keys moved to files). Never creates one."""
    async def erase(self, address: str, *, keep_hash: str | None) -> EraseReport:
        """Delete every log row and suppression entry of ``address``. A complaint entry is
        replaced by ``keep_hash`` (a keyed hash of the address) when one is given."""

    # ---- webhook outbox (docs/webhooks.md)
    async def webhook_enqueue(self, outbox: list[OutboxRow]) -> None:
        """Add events not made from log rows (complaints); known (event, target) skipped."""
    async def webhook_claim(self, owner: str, now: float, lease_until: float,
                            limit: int) -> list[dict[str, Any]]:
        """Lease up to ``limit`` events due at ``now`` and not leased by anyone, to ``owner``
        until ``lease_until``: no other worker of the pool gets them meanwhile."""
    async def webhook_done(self, event_ids: list[int]) -> None:
        """Delete delivered (or dropped) events, by outbox id."""
    async def webhook_retry(self, outbox_id: int, owner: str, next_attempt: float,
                            error: str) -> None:
        """A failed attempt: due again at ``next_attempt``; ignored if the lease was lost."""
    async def webhook_expire(self, before: float) -> int:
        """Delete events older than ``before`` (given up); returns how many."""
    async def webhook_backlog(self) -> tuple[int, float | None]:
        """(events waiting, timestamp of the oldest)."""

    # ---- shared sending state
    async def lease(self, kind: str, credential: str, window_start: int, want: int,
                    limit: int) -> int:
        """Grant up to ``want`` messages of ``limit`` for (kind, credential, window) and
        count them as granted; 0 when the window's limit is exhausted. Atomic."""
    async def give_back(self, kind: str, credential: str, window_start: int, n: int) -> None:
        """Return unused messages of a lease (a worker stopping)."""
    async def peers(self, peer: str, now: float, horizon: float) -> int:
        """Note a worker as alive; the number of workers seen within ``horizon``."""
    async def peer_gone(self, peer: str) -> None:
        """A worker stopping: nobody waits for it any more (erasure, the limits' share)."""
    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
        """Add (delivered, bounced) counts per (credential, minute)."""
    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]:
        """(delivered, bounced) per credential summed over minutes after ``since_minute``."""
    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
        """Add complaint counts per (credential, minute) (reports taken by the intake)."""
    async def complaints_window(self, since_minute: int) -> dict[str, int]:
        """Complaints per credential summed over minutes after ``since_minute``."""
    async def domain_complaints_add(self, buckets: dict[tuple[str, str, int], int]) -> None:
        """Add complaint counts per (credential, sender domain, minute), for the figures."""

    # ---- erasure requests (docs/store.md, "Erasure across the pool")
    async def erasure_request(self, address: str, now: float) -> int:
        """Record a request; every worker erases the address from its spool."""
    async def erasure_pending(self, peer: str) -> list[tuple[int, str]]:
        """(id, address) of open requests this worker has not carried out yet."""
    async def erasure_progress(self, request_id: int, peer: str, now: float,
                               counts: dict[str, int]) -> None: ...
    async def erasure_state(self, request_id: int, now: float,
                            horizon: float) -> ErasureState | None: ...
    async def erasure_complete(self, request_id: int, now: float,
                               report: dict[str, int], address_hash: str | None = None) -> bool:
        """Close the request: the address is dropped (``address_hash``, its keyed hash, kept
        in its place), the report kept. False if it was already closed (by another worker or
        the CLI)."""
    async def erasures_since(self, since: float) -> list[ErasureMark]:
        """The erasure requests made at or after ``since`` (open: by address; closed: by keyed
        hash): a write held back since ``since`` (a disk buffer, an unsent suppression entry)
        must not bring such an address back."""
