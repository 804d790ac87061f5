"""Whether the store answers, and the store's own metrics (labels from closed sets only)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge

from ..metrics import NS

log = logging.getLogger(__name__)

OPERATIONS = ("log_write", "suppression", "limits", "reputation", "purge", "erasure",
              "webhooks")


@dataclass
class StoreHealth:
    """``up`` is 0 from a failed store operation until the next success (any operation)."""

    up: Gauge
    errors: Counter
    oldest_record_age: Gauge
    oldest_by_table: Gauge
    purge_runs: Counter
    erasures: Counter
    retention: Gauge
    purge_interval: Gauge
    description: str = ""
    _failing: set[str] = field(default_factory=set)

    @classmethod
    def create(cls, registry: CollectorRegistry, description: str = "") -> StoreHealth:
        health = cls(
            up=Gauge(f"{NS}_store_up",
                     "1 while the store (message log, suppression, shared limits) answers; "
                     "0 since an operation failed.", multiprocess_mode="livemin",
                     registry=registry),
            errors=Counter(f"{NS}_store_errors", "Store operations that failed, by operation.",
                           ["operation"], registry=registry),
            oldest_record_age=Gauge(
                f"{NS}_messagelog_oldest_record_age_seconds",
                "Age of the oldest message-log record in the store (at the last purge run).",
                multiprocess_mode="livemax", registry=registry),
            oldest_by_table=Gauge(
                f"{NS}_store_oldest_record_age_seconds",
                "Age of the oldest record, by table holding addresses under a retention "
                "(message_log, suppression), at the last purge run.",
                ["table"], multiprocess_mode="livemax", registry=registry),
            purge_runs=Counter(f"{NS}_purge_runs", "Retention purge runs by result.",
                               ["result"], registry=registry),
            erasures=Counter(f"{NS}_erasure_requests",
                             "Erasure requests this process carried out, by result.",
                             ["result"], registry=registry),
            retention=Gauge(
                f"{NS}_retention_seconds",
                "Configured retention, by table (the promise the oldest record is held to).",
                ["table"], multiprocess_mode="livemax", registry=registry),
            purge_interval=Gauge(
                f"{NS}_purge_interval_seconds", "Configured interval between purge runs.",
                multiprocess_mode="livemax", registry=registry),
            description=description,
        )
        for op in OPERATIONS:
            health.errors.labels(op)
        for result in ("success", "failure"):
            health.purge_runs.labels(result)
            health.erasures.labels(result)
        health.up.set(1)
        return health

    def ok(self, operation: str) -> None:
        if operation in self._failing:
            self._failing.discard(operation)
            log.info("store %s: %s works again", self.description, operation)
        if not self._failing:
            self.up.set(1)

    def failed(self, operation: str, exc: BaseException) -> None:
        self.errors.labels(operation).inc()
        if operation not in self._failing:
            log.error("store %s: %s failed: %s", self.description, operation, exc)
        self._failing.add(operation)
        self.up.set(0)
