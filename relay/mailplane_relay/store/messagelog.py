"""The message-log writer: records are buffered in memory and written in batches.

``record()`` only appends to a buffer; a background task hands the buffer to the store every
``flushInterval`` (or at once when a burst fills it). Every record carries an ``event_id`` unique
to it, and backends skip ids they already hold, so a batch written twice (a replay after a
failure whose outcome was unknown) is stored once.

When the store does not take a batch (database down, disk locked) the batch is kept: in memory,
bounded, or, when a buffer directory is configured, appended to a file there and replayed once
the store answers again, oldest first. Mail flow never waits on the store.

The log holds what the privacy policy allows: sender, recipient, status, timestamps, SMTP
response, size and ids. ``LogEvent`` has no field for a body or a subject and this module adds
none.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from collections.abc import Callable, Collection
from contextlib import suppress
from pathlib import Path

from prometheus_client import Counter, Gauge

from ..aiotasks import cancel_and_wait
from ..events import LogEvent
from ..metrics import NS, RelayMetrics
from .backend import LOG_COLUMNS, LogQuery, LogRow, OutboxRow, StoreBackend
from .erased import erased_since
from .health import StoreHealth

log = logging.getLogger(__name__)

# Events kept in memory while the store does not take them and no buffer directory is set.
# At a few hundred bytes per event this is tens of MB at most; beyond it events are dropped
# and counted.
MAX_BUFFERED_EVENTS = 200_000
# A burst this large is written at once instead of waiting for the flush interval.
EARLY_FLUSH_EVENTS = 5_000
# Repeated failures (a stuck disk, a database down) are logged at most this often.
ERROR_LOG_INTERVAL = 10.0
# Buffered files replayed per writer pass, so a long backlog does not delay fresh batches.
REPLAY_FILES_PER_PASS = 20
_TS, _SENDER, _RECIPIENT = (LOG_COLUMNS.index(c) for c in ("ts", "sender", "recipient"))

TenantOf = Callable[[str | None], str | None]
# The webhook events (outbox rows) a batch of log rows makes, per the configuration in force.
OutboxOf = Callable[[list[LogRow]], list[OutboxRow]]


def _no_tenant(_credential: str | None) -> str | None:
    return None


def _no_outbox(_rows: list[LogRow]) -> list[OutboxRow]:
    return []


class MessageLog:
    """Append-only metadata log with a batched writer, a disk buffer and retention purge."""

    def __init__(
        self,
        backend: StoreBackend,
        *,
        flush_interval: float,
        metrics: RelayMetrics,
        max_buffered: int = MAX_BUFFERED_EVENTS,
        buffer_dir: str | None = None,
        tenant_of: TenantOf = _no_tenant,
        health: StoreHealth | None = None,
        outbox_of: OutboxOf = _no_outbox,
    ) -> None:
        self.backend = backend
        # Webhook events are made when a batch goes to the store (also a batch replayed from
        # the disk buffer) and written in its transaction: a row in the log has its events.
        self._outbox_of = outbox_of
        self._health = health
        self.flush_interval = flush_interval
        self._metrics = metrics
        self._max_buffered = max_buffered
        self._buffer_dir = Path(buffer_dir) if buffer_dir else None
        self._tenant_of = tenant_of
        self._buffer: list[LogRow] = []
        # Unique per process start: with the counter it names every event in the pool.
        self._id_prefix = secrets.token_hex(8) + "-"
        self._next_id = 0
        self._flush_lock = asyncio.Lock()
        # One replay at a time: the writer's and an erasure's drain must not both hold a file's
        # rows, or the writer's could reach the store after the erasure's final pass.
        self._replay_lock = asyncio.Lock()
        self._wakeup = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._dropped_since_warning = 0
        self._last_drop_warning = -ERROR_LOG_INTERVAL
        self._failures_since_log = 0
        self._last_failure_log = -ERROR_LOG_INTERVAL
        self.dropped = Counter(
            f"{NS}_messagelog_dropped_events",
            "Message-log events dropped because the store did not take them and no buffer "
            "was left.", registry=metrics.registry,
        )
        self.write_errors = Counter(
            f"{NS}_messagelog_write_errors",
            "Failed message-log batch writes (the batch is kept and retried).",
            registry=metrics.registry,
        )
        self.buffered = Gauge(
            f"{NS}_messagelog_disk_buffered_events",
            "Message-log events waiting on local disk for the store to come back.",
            multiprocess_mode="livesum", registry=metrics.registry,
        )
        self.replayed = Counter(
            f"{NS}_messagelog_replayed_events",
            "Message-log events written to the store from the local disk buffer.",
            registry=metrics.registry,
        )
        self.replay_erased = Counter(
            f"{NS}_messagelog_replay_erased_events",
            "Held-back message-log events (disk buffer, or memory after a failed write) not "
            "written because their address was erased after they were recorded.",
            registry=metrics.registry,
        )
        self._disk_events = 0
        # Set while a batch that failed is held in memory: it is checked against the erasures
        # made since before it is written (as the disk buffer is when replayed).
        self._held_since: float | None = None
        self._erased_total = 0

    @property
    def pending(self) -> int:
        """Events not yet in the store (memory and disk buffer)."""
        return len(self._buffer) + self._disk_events

    async def start(self) -> None:
        if self._buffer_dir is not None:
            await asyncio.to_thread(self._buffer_dir.mkdir, parents=True, exist_ok=True)
            self._disk_events = await asyncio.to_thread(self._count_disk_events)
            self.buffered.set(self._disk_events)
        self._task = asyncio.create_task(self._writer(), name="messagelog-writer")

    def record(self, event: LogEvent) -> None:
        try:
            if len(self._buffer) >= self._max_buffered:
                self._drop(1)
                return
            e = event
            self._next_id += 1
            namespace = e.namespace if e.namespace is not None else self._tenant_of(e.credential)
            # Built by hand: dataclasses.astuple deep-copies and costs ~10x more per event.
            self._buffer.append((f"{self._id_prefix}{self._next_id:x}", e.ts, e.status,
                                 e.queue_id, e.message_id, e.credential, namespace, e.sender,
                                 e.recipient, e.response, e.size, e.attempt, e.remote))
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
                "message log (%s) is not keeping up: %d events dropped since the last "
                "warning; see mailplane_relay_messagelog_dropped_events_total",
                self.backend.description, self._dropped_since_warning,
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
                await self.replay()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # flush() kept the batch; log the failure (not every 200 ms) and go on.
                self._failures_since_log += 1
                now = time.monotonic()
                if now - self._last_failure_log >= ERROR_LOG_INTERVAL:
                    log.error("message log (%s): %d batch writes failed (%s); %d events held, "
                              "retrying", self.backend.description, self._failures_since_log,
                              exc, self.pending)
                    self._failures_since_log = 0
                    self._last_failure_log = now

    async def flush(self) -> None:
        """Write everything recorded so far. On failure the events are kept (on disk when a
        buffer directory is set, else in memory) and it raises."""
        async with self._flush_lock:
            if not self._buffer:
                return
            batch, self._buffer = self._buffer, []
            try:
                if self._held_since is not None:
                    batch = await self._without_erased(batch)
                # Shielded: a write handed to the backend may complete even if this caller is
                # cancelled; ids make a second write of the same batch harmless anyway.
                await asyncio.shield(self.backend.write_events(batch, self._outbox(batch)))
            except Exception as exc:
                self.write_errors.inc()
                if self._health is not None:
                    self._health.failed("log_write", exc)
                if self._buffer_dir is not None:
                    try:
                        await asyncio.to_thread(self._spill, batch)
                    except OSError:
                        log.exception("message log: the disk buffer %s failed too",
                                      self._buffer_dir)
                    else:
                        raise
                # Put the batch back in front, in order, within the bound.
                self._held_since = time.time()
                merged = batch + self._buffer
                overflow = len(merged) - self._max_buffered
                if overflow > 0:
                    self._drop(overflow)
                    merged = merged[overflow:]
                self._buffer = merged
                raise
            self._held_since = None
            if self._health is not None:
                self._health.ok("log_write")

    async def _without_erased(self, rows: list[LogRow]) -> list[LogRow]:
        """``rows`` without those naming an address whose erasure was requested after they
        were recorded (they were held back meanwhile). Raises when the store cannot say."""
        if not rows:
            return rows
        erased = await erased_since(self.backend, min(float(r[_TS]) for r in rows))
        if not erased:
            return rows
        kept = [r for r in rows if not (erased.erased(r[_SENDER], float(r[_TS]))
                                        or erased.erased(r[_RECIPIENT], float(r[_TS])))]
        if len(kept) < len(rows):
            self._erased_total += len(rows) - len(kept)
            self.replay_erased.inc(len(rows) - len(kept))
            log.info("message log: %d held-back events not written: their address was erased "
                     "after they were recorded", len(rows) - len(kept))
        return kept

    def _outbox(self, rows: list[LogRow]) -> list[OutboxRow]:
        try:
            return self._outbox_of(rows)
        except Exception:  # a bug here must not hold the log back
            log.exception("message log: could not make the webhook events of a batch")
            return []

    # ---- the disk buffer --------------------------------------------------------------

    def _spill(self, batch: list[LogRow]) -> None:
        assert self._buffer_dir is not None
        name = f"{time.time_ns():020d}-{os.getpid()}.jsonl"
        tmp = self._buffer_dir / (name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in batch:
                f.write(json.dumps(row, separators=(",", ":")))
                f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._buffer_dir / name)
        self._disk_events += len(batch)
        self.buffered.set(self._disk_events)

    def _count_disk_events(self) -> int:
        assert self._buffer_dir is not None
        total = 0
        for path in self._buffer_dir.glob("*.jsonl"):
            with open(path, "rb") as f:
                total += sum(1 for _ in f)
        return total

    async def replay(self) -> int:
        """Write buffered files to the store, oldest first; each file is deleted once the
        store took it. Events naming an address erased after they were recorded are left out.
        Returns the number of events taken from the buffer."""
        async with self._replay_lock:
            return await self._replay()

    async def _replay(self) -> int:
        if self._buffer_dir is None or not self._disk_events:
            return 0
        files = sorted(await asyncio.to_thread(lambda: list(self._buffer_dir.glob("*.jsonl"))))  # type: ignore[union-attr]
        done = written = 0  # events taken from the buffer; of them, written to the store
        for path in files[:REPLAY_FILES_PER_PASS]:
            try:
                text = await asyncio.to_thread(path.read_text, encoding="utf-8")
            except FileNotFoundError:  # another worker of the pod replayed it
                continue
            held = [tuple(json.loads(line)) for line in text.splitlines() if line]
            try:
                rows = await self._without_erased(held)
                if rows:
                    await self.backend.write_events(rows, self._outbox(rows))
            except Exception as exc:
                if self._health is not None:
                    self._health.failed("log_write", exc)
                raise
            await asyncio.to_thread(path.unlink, missing_ok=True)
            done += len(held)
            written += len(rows)
            self._disk_events = max(0, self._disk_events - len(held))
            self.buffered.set(self._disk_events)
            self.replayed.inc(len(rows))
        if written:
            log.info("message log: replayed %d buffered events into %s", written,
                     self.backend.description)
        return done

    async def drain(self) -> int:
        """Write everything held, from memory and from the disk buffer (erasure needs every
        row of this process in the store before its final pass). Returns how many held rows
        were left out as naming an address erased after they were recorded."""
        before = self._erased_total
        await self.flush()
        while self._buffer_dir is not None and self._disk_events:
            if not await self.replay():
                break
        return self._erased_total - before

    # ---- retention and search ------------------------------------------------------------

    async def purge(self, *, now: float, message_log_retention: float,
                    suppression_retention: float, changes_retention: float,
                    open_namespaces: Collection[str] | None = None) -> int:
        """Delete log rows and suppression entries older than their retention. With
        ``open_namespaces`` (the tenant namespaces the relay serves now), account closure too:
        the team-scoped suppression entries and webhook outbox rows of a namespace no longer
        served for ``message_log_retention`` are deleted (docs/store.md)."""
        n_log, n_supp = await self.backend.purge(
            log_before=now - message_log_retention,
            suppression_before=now - suppression_retention,
            changes_before=now - changes_retention,
        )
        if open_namespaces is not None:
            n_closed, n_outbox = await self.backend.purge_closed_namespaces(
                open_namespaces, now=now, closed_before=now - message_log_retention)
            n_supp += n_closed
            self._metrics.purged_records.labels(table="webhook_outbox").inc(n_outbox)
            if n_closed or n_outbox:
                log.info("retention purge: removed %d suppression entries and %d webhook "
                         "events of tenant namespaces closed for the message log's retention",
                         n_closed, n_outbox)
        self._metrics.purged_records.labels(table="message_log").inc(n_log)
        self._metrics.purged_records.labels(table="suppression").inc(n_supp)
        # The portal's audit log and erasure records follow the message log's retention.
        for table, n in (await self.backend.purge_portal(now - message_log_retention)).items():
            self._metrics.purged_records.labels(table=table).inc(n)
            if n:
                log.info("retention purge: removed %d %s records", n, table)
        self._metrics.last_purge.set(now)
        if n_log or n_supp:
            log.info("retention purge: removed %d log records, %d suppression entries",
                     n_log, n_supp)
        return n_log + n_supp

    async def query(self, q: LogQuery) -> list[dict[str, object]]:
        return await self.backend.query(q)

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait(task)
        try:
            await self.flush()
        except Exception:
            if self._buffer:
                log.exception("message log: final flush failed; %d events lost",
                              len(self._buffer))
