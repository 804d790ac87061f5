"""Destinations and their state: the ready queue of each, its pooled connections, how many
connections it may use (shaping and slow start), its delivery rate, and its suspension.

A destination is where connections go: the smarthost, or in MX mode a site (the set of MX
hosts of a domain; domains served by the same hosts share it). A shaping rule that matches a
domain or an MX host gives its destinations their own limits (and their own name, used as a
metric label: the names are the configuration's closed set).

**Slow start.** A destination that has not yet given the relay a working session since it was
created or suspended gets one connection; once a session works it gets ``INITIAL_WINDOW``
connections, one more per transaction it accepts (recipients accepted, data requested: it is
taking mail, however slowly), up to its ``maxConnections`` (Postfix's concurrency feedback,
simplified). A throttling or dead destination is thus met with a single
connection, not a burst.

**Suspension.** When no host of a destination would take a session (every connection refused or
timed out, a 421, a 4.7.x at the greeting or at MAIL), the destination is suspended: its queued
work is deferred without connecting, and new work for it too, until the suspension ends; then a
single probe connection decides (success resumes it, failure suspends it again for longer, on
the queue's retry schedule).
"""

from __future__ import annotations

import collections
import fnmatch
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from ..config import DeliverySettings
from .policy import SuspendReason
from .smtp import Connection

if TYPE_CHECKING:
    from .work import Work

# Connections a destination gets once a session worked (Postfix's initial concurrency is 5).
INITIAL_WINDOW = 5

State = Literal["active", "idle", "suspended", "probing"]
STATES: tuple[State, ...] = ("active", "idle", "suspended", "probing")


@dataclass(frozen=True, slots=True)
class Shape:
    name: str  # "default" or the shaping rule's name
    max_connections: int
    messages_per_connection: int
    per_minute: int | None = None
    per_hour: int | None = None


def _matches(patterns: tuple[str, ...], name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def shape_for(delivery: DeliverySettings, domain: str | None, mx_hosts: tuple[str, ...] = ()
              ) -> Shape:
    """The first shaping rule that names the recipient domain or one of its MX hosts, else the
    defaults (``concurrencyPerDestination``, ``maxMessagesPerConnection``, no rate limit)."""
    for rule in delivery.shaping:
        if (domain is not None and _matches(rule.domains, domain)) or any(
                _matches(rule.mx_hosts, h) for h in mx_hosts):
            return Shape(
                rule.name,
                rule.max_connections or delivery.concurrency_per_destination,
                rule.messages_per_connection or delivery.max_messages_per_connection,
                rule.per_minute, rule.per_hour)
    return Shape("default", delivery.concurrency_per_destination,
                 delivery.max_messages_per_connection)


class RateBucket:
    """A token bucket: ``limit`` deliveries per ``period`` seconds, with a burst of ``limit``."""

    def __init__(self, limit: int, period: float, now: float) -> None:
        self.limit = limit
        self.rate = limit / period
        self.tokens = float(limit)
        self.stamp = now

    def _refill(self, now: float) -> None:
        self.tokens = min(float(self.limit), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, now: float) -> float:
        """Seconds until one delivery may start (0: now)."""
        self._refill(now)
        return 0.0 if self.tokens >= 1.0 else (1.0 - self.tokens) / self.rate

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


@dataclass(eq=False)
class Destination:
    key: str
    shape: Shape
    ready: collections.deque[Work] = field(default_factory=collections.deque)
    idle: list[Connection] = field(default_factory=list)
    active: int = 0  # connections in use right now (each carrying one transaction)
    window: int = INITIAL_WINDOW
    proven: bool = False  # a session worked since the destination appeared or was suspended
    suspended_until: float = 0.0  # clock time
    failures: int = 0  # suspensions in a row (each failed probe adds one)
    reason: str = ""  # the reply that caused the last suspension
    reason_kind: SuspendReason | None = None
    in_ring: bool = False  # listed among the destinations the dispatcher serves in turn
    delivered: int = 0
    minute: RateBucket | None = None
    hour: RateBucket | None = None
    # What shaping rules are matched against: (recipient domain, MX hosts).
    match: tuple[str | None, tuple[str, ...]] = (None, ())
    last_used: float = 0.0  # time.monotonic() of the last work item

    def reshape(self, shape: Shape, now: float) -> None:
        if shape == self.shape and (self.minute is not None or shape.per_minute is None) and (
                self.hour is not None or shape.per_hour is None):
            return
        old = self.shape
        self.shape = shape
        if shape.per_minute != old.per_minute or self.minute is None:
            self.minute = RateBucket(shape.per_minute, 60.0, now) if shape.per_minute else None
        if shape.per_hour != old.per_hour or self.hour is None:
            self.hour = RateBucket(shape.per_hour, 3600.0, now) if shape.per_hour else None

    # ---------------------------------------------------------------- limits

    def limit(self) -> int:
        """Connections this destination may have in use now."""
        if not self.proven:
            return 1  # unknown or just suspended: one connection (the probe) decides
        return max(1, min(self.window, self.shape.max_connections))

    def suspended(self, now: float) -> bool:
        return now < self.suspended_until

    def rate_wait(self, now: float) -> float:
        return max((b.wait(now) for b in (self.minute, self.hour) if b is not None),
                   default=0.0)

    def take_rate(self, now: float) -> None:
        for bucket in (self.minute, self.hour):
            if bucket is not None:
                bucket.take(now)

    def state(self, now: float) -> State:
        if self.suspended(now):
            return "suspended"
        if self.failures and not self.proven:
            return "probing"
        return "active" if self.active or self.ready else "idle"

    # ---------------------------------------------------------------- feedback

    def session_worked(self) -> None:
        if not self.proven:
            self.proven = True
            self.failures = 0
            self.reason, self.reason_kind = "", None
            self.window = INITIAL_WINDOW

    def taking_mail(self) -> None:
        """A server of this destination accepted recipients and asked for the data: one more
        connection may be used (slow start), up to ``maxConnections``."""
        if self.proven and self.window < self.shape.max_connections:
            self.window += 1

    def suspend(self, now: float, delay: float, reason: str, kind: SuspendReason) -> None:
        self.failures += 1
        self.proven = False
        self.window = 1
        self.suspended_until = now + delay
        self.reason, self.reason_kind = reason, kind

    # ---------------------------------------------------------------- pooled connections

    def take_idle(self) -> Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.usable:
                return conn
        return None

    @property
    def open_connections(self) -> int:
        return self.active + len(self.idle)
