"""The delivery queue: scheduled messages, ready queues per destination, fair dispatch.

Two stages, after KumoMTA's scheduled and ready queues:

1. **Scheduled.** Every spooled message with pending recipients waits in a heap ordered by its
   next attempt, as its queue id and due time only: a deferred message's envelope stays on
   disk and is read again (:meth:`Spool.load`) when it falls due, and dropped after the
   attempt (a freshly committed message keeps the envelope it was committed with until its
   first attempt). At most ``MAX_ATTEMPTS`` attempts are in progress (envelopes in memory) at
   once; more due messages wait in the heap. When one falls due, suppressed recipients are set
   aside and the rest are
   routed: to the smarthost, or per recipient domain to the domain's MX site (DNS answers that
   decide the recipient, such as a null MX, are recorded at once). Each piece becomes a work
   item in its destination's ready queue. Nothing is held while routing or waiting.
2. **Ready.** The dispatcher serves the destinations that have work in turn (round robin),
   starting one transaction at a time per destination, as long as the destination is below its
   connection limit (slow start, shaping), its delivery rate allows, and fewer than
   ``delivery.maxConcurrency`` connections are in use overall (the last tenth of them kept for
   destinations that have no connection yet). Only connections carrying a transaction count;
   a work item waiting in a ready queue holds nothing, so a slow destination cannot hold up
   the others.

The attempt on one connection (pooled first, then the destination's hosts in order, moving
to the next MX on failures that allow it) is :meth:`DeliveryQueue._deliver`; the SMTP itself is
:mod:`.smtp`; destination state is :mod:`.destinations`; the rules are :mod:`.policy`;
recording outcomes and DSN is :mod:`.outcomes`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import os
import random
import ssl
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from .. import verp
from ..aiotasks import cancel_and_wait
from ..config import DeliverySettings, RelayConfig, ResolverSettings, domain_of
from ..dkim import DKIMSigner
from ..metrics import RelayMetrics
from ..mx import MXResolver, MXRoute, PermanentDNSFailure, TemporaryDNSFailure, ascii_domain
from ..reputation import Reputation
from ..spool import (
    HELD,
    Due,
    QueuedMessage,
    Recipient,
    Spool,
    SpoolDataLost,
    SpoolError,
    queue_id_number,
)
from ..store import MessageLog, SuppressionList
from .destinations import STATES, Destination, shape_for
from .downgrade import needs_smtputf8, to_seven_bit
from .mtasts import MTASTS, Policy
from .outcomes import DATA_LOST, Outcomes
from .policy import RecipientOutcome, SuspendReason, dns_outcome, next_retry_delay
from .smtp import (
    ConnectFailed,
    Connection,
    ReusedConnectionLost,
    Target,
    Timeouts,
    TLSFailed,
    TLSMode,
    login,
    open_connection,
    quit_connection,
    transaction,
)
from .suspensions import FILE_NAME as SUSPENSIONS_FILE
from .suspensions import PROBE_POLL, SharedSuspensions, Suspension, without_addresses
from .work import Attempt, Work

log = logging.getLogger("mailplane_relay.delivery")

# Administration of many messages (`mailplane queue hold/release/flush`): messages per slice,
# between which the event loop runs other work; a hold or release slice is one group commit.
ADMIN_SLICE = 500
FLUSH_SLICE = 5000

# Messages larger than this are read and signed in a thread, so one big message does not stall
# the loop.
SIGN_IN_THREAD_BYTES = 256 * 1024
HOUSEKEEPING_INTERVAL = 1.0
# A destination with nothing queued, no connection and no suspension is forgotten after this.
DESTINATION_IDLE_FORGET = 600.0
# DNS lookups of due messages running at once.
ROUTING_CONCURRENCY = 64
# Where MTA-STS policies persist when delivery.mtaSts.cacheFile is not set: the spool root
# (shared by the workers of a relay).
MTA_STS_CACHE_NAME = "mta-sts-policies.json"
# Attempts in progress at once (each holds its message's envelope in memory, ~2 KB); due
# messages beyond this wait in the schedule, which holds only queue ids and due times.
MAX_ATTEMPTS = 20_000
# The scheduler lets the loop run after starting this many attempts in a row.
BEGIN_BATCH = 200
# Envelopes of freshly committed messages kept in memory for their first attempt; beyond this
# (a backlog being worked off while mail keeps coming) they are read again when due.
MAX_KEPT = 10_000
# The data of kept messages too (the bytes the spool would read back for the first attempt),
# up to this many bytes in all; beyond it, and for every later attempt, the spool is read.
MAX_KEPT_BYTES = 32 * 1024 * 1024
_IN_ATTEMPT = math.inf  # the due time recorded for a message while an attempt runs
_ON_HOLD = -math.inf  # the due time recorded for a message on hold (never due)
# The final reply of every undecided recipient of a message whose spooled data is torn.
LOST_REPLY = ("554 5.3.0 Message lost by the relay: its spooled copy was damaged by a crash "
              "(a torn write); not delivered, please send it again")


class DeliveryQueue:
    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        spool: Spool,
        log: MessageLog,
        suppression: SuppressionList,
        metrics: RelayMetrics,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        signer: DKIMSigner | None = None,
        reputation: Reputation | None = None,
        on_failure: Callable[[BaseException], None] | None = None,
        shared_dir: str | None = None,
        reports_shared: bool = True,
    ) -> None:
        self._config = config
        # Whether this queue counts the shared suspensions in the destinations gauge: one
        # worker of a relay does (the gauge is summed over the workers, and every worker sees
        # the same file), the others count only their own suspensions missing from it.
        self._reports_shared = reports_shared
        # Told when a background task dies: the composition root stops the process (the queue
        # stays on disk) rather than accept mail it would never deliver.
        self._on_failure = on_failure
        self._spool = spool
        self._suppression = suppression
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._signer = signer or DKIMSigner(metrics=metrics, clock=clock)
        self._verp_key = verp.KeyFile()
        self._outcomes = Outcomes(
            spool=lambda: self._spool, log=log, suppression=suppression, metrics=metrics,
            reputation=reputation, clock=clock, rng=self._rng, read=self._read,
            submit=self.submit, reschedule=self._schedule, forget=self._forget)
        # Scheduled stage: every queued message's id and due time (_IN_ATTEMPT while an
        # attempt runs); the heap holds (due, queue id) entries, an entry being live while it
        # matches _due. Envelopes in memory: those of attempts and _kept (committed and not
        # tried yet, or whose state could not be recorded).
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._kept: dict[str, QueuedMessage] = {}
        self._kept_data: dict[str, bytes] = {}
        self._kept_bytes = 0
        self._flushed: set[str] = set()  # flushed by an administrator, attempt not begun
        # Queue ids by age (a heap; ids sort by commit time): the oldest-message gauge pops
        # the ids no longer queued, instead of scanning every queued id.
        self._by_age: list[str] = []
        self._seq = itertools.count()
        self._attempts: dict[str, Attempt] = {}  # messages with an attempt in progress
        self._schedule_wake = asyncio.Event()
        self._routing = asyncio.Semaphore(ROUTING_CONCURRENCY)
        # Ready stage
        self._destinations: dict[str, Destination] = {}
        self._ring: collections.deque[Destination] = collections.deque()
        self._timers: list[tuple[float, int, Destination]] = []  # rate-limited destinations
        self._in_use = 0  # connections carrying a transaction
        self._dispatch_wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()  # routing and transaction tasks
        self._closers: set[asyncio.Task[None]] = set()
        self._resolver: MXResolver | None = None
        self._tls_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._sts: MTASTS | None = None
        # Suspensions shared by the relay's workers and kept across restarts (suspensions.py),
        # in the spool root (``shared_dir``; default: this queue's spool directory).
        self._shared = SharedSuspensions(
            Path(shared_dir or spool.directory) / SUSPENSIONS_FILE, clock=clock)
        self._probe_wait: dict[str, float] = {}  # destinations waiting for another's probe
        self._report_domains: set[str] = set()  # policy domains with a metric label
        self._connection_settings = _connection_settings(config().settings.delivery)
        self._background: list[asyncio.Task[None]] = []
        self._stopping = False
        self._paused = False
        self._changed = asyncio.Event()
        self.connections_opened = 0  # for tests and benchmarks

    # ------------------------------------------------------------------ public interface

    async def start(self, recovered: list[QueuedMessage]) -> None:
        for msg in recovered:
            self.submit(msg)
        for name, coro in (("delivery-scheduler", self._scheduler()),
                           ("delivery-dispatcher", self._dispatcher()),
                           ("delivery-housekeeping", self._housekeeping())):
            task = asyncio.create_task(coro, name=name)
            task.add_done_callback(self._background_done)
            self._background.append(task)
        self.update_gauges()

    def submit(self, msg: QueuedMessage, data: bytes | None = None) -> None:
        """A message just committed (or recovered by a full start): its envelope is kept
        until its first attempt, and ``data`` (the message as committed) while the kept data
        stays within ``MAX_KEPT_BYTES``: the first attempt then does not read the spool."""
        if msg.queue_id in self._due:
            return
        held = bool(msg.extra.get(HELD))
        if not held and len(self._kept) < MAX_KEPT:
            self._kept[msg.queue_id] = msg
            if data is not None and self._kept_bytes + len(data) <= MAX_KEPT_BYTES:
                self._kept_data[msg.queue_id] = data
                self._kept_bytes += len(data)
        self._add(msg.queue_id, msg.next_attempt, held)

    def schedule(self, due: list[Due]) -> None:
        """Messages recovered from the spool, by queue id and next attempt: their envelopes
        are read when they fall due."""
        for queue_id, next_attempt, held in due:
            if queue_id not in self._due:
                self._add(queue_id, next_attempt, held)

    def _add(self, queue_id: str, due: float, held: bool) -> None:
        if held:
            self._due[queue_id] = _ON_HOLD
            self._changed.set()
        else:
            self._push(queue_id, due)
        heapq.heappush(self._by_age, queue_id)
        self._metrics.queue_messages.set(len(self._due))

    def reconfigure(self) -> None:
        """Apply a new configuration. Destinations keep their state (connections in use,
        slow-start window, suspension); pooled connections are kept unless the settings they
        were opened with changed (smarthost, TLS, HELO name, MX port). Limits apply to the
        next dispatch. DKIM keys follow by themselves (the signer re-reads the
        configuration)."""
        cfg = self._config()
        delivery = cfg.settings.delivery
        if self._resolver is not None and self._resolver.settings != delivery.resolver:
            self._resolver = None
        settings = _connection_settings(delivery)
        if settings != self._connection_settings:
            self._connection_settings = settings
            self._tls_contexts.clear()
            if self._sts is not None:
                self._sts.reset_contexts()  # a changed mtaSts.caFile applies at once
            for dest in self._destinations.values():
                self._close_idle(dest, keep=lambda _c: False)
        now = self._clock()
        for dest in self._destinations.values():
            domain, hosts = dest.match
            dest.reshape(shape_for(delivery, domain, hosts), now)
        self._dispatch_wake.set()

    async def stop(self, deadline: float) -> None:
        """Stop starting transactions; let those in flight finish until ``deadline`` (a
        ``time.monotonic()`` value), then cancel them (their connections are aborted).
        Nothing that is not final leaves the spool: an interrupted attempt is repeated after a
        restart."""
        self._stopping = True
        for task in self._background:
            await cancel_and_wait(task)
        inflight = list(self._tasks)
        if inflight:
            remaining = max(0.0, deadline - time.monotonic())
            _done, pending = await asyncio.wait(inflight, timeout=remaining)
            if pending:
                log.warning("delivery: %d attempt(s) still running at the stop deadline; "
                            "cancelling them (they are retried after restart)", len(pending))
                for task in pending:
                    task.cancel()
                _, stuck = await asyncio.wait(pending, timeout=2.0)
                if stuck:
                    log.error("delivery: %d attempt(s) did not end after cancellation",
                              len(stuck))
        for dest in list(self._destinations.values()):
            self._close_idle(dest, keep=lambda _c: False)
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=2.5)
        if self._sts is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5.0):
                    await self._sts.flush()  # the policies a restart must honour

    # ------------------------------------------------------------------ introspection

    @property
    def queued(self) -> int:
        return len(self._due)

    def queued_ids(self) -> list[str]:
        return list(self._due)

    def message(self, queue_id: str) -> QueuedMessage | None:
        """A queued message's envelope (read from the spool when it is not in memory)."""
        if queue_id not in self._due:
            return None
        attempt = self._attempts.get(queue_id)
        if attempt is not None:
            return attempt.msg
        return self._kept.get(queue_id) or self._spool.load(queue_id)

    def destinations(self) -> list[dict[str, Any]]:
        """The queue view of destinations: state, reason, limits, backlog."""
        now = self._clock()
        for dest in self._destinations.values():
            self._sync_shared(dest)
        return [{
            "destination": d.key, "shaping": d.shape.name, "state": d.state(now),
            "ready": len(d.ready), "connectionsInUse": d.active, "idleConnections": len(d.idle),
            "connectionLimit": d.limit(), "suspendedFor": max(0.0, d.suspended_until - now),
            "reason": d.reason, "failures": d.failures, "delivered": d.delivered,
        } for d in sorted(self._destinations.values(), key=lambda d: d.key)] + [{
            # Suspended by another worker of the relay (or before a restart), not used here.
            "destination": key, "shaping": "", "state": "suspended", "ready": 0,
            "connectionsInUse": 0, "idleConnections": 0, "connectionLimit": 1,
            "suspendedFor": s.until - now, "reason": s.reason, "failures": s.failures,
            "delivered": 0,
        } for key, s in sorted(self._shared_view().items())
            if key not in self._destinations and s.until > now]

    def _shared_view(self) -> dict[str, Suspension]:
        return self._shared.view()

    def _sync_shared(self, dest: Destination) -> None:
        """Take over a suspension that another worker of the relay recorded (or this relay
        before a restart) and that outlasts this worker's own."""
        entry = self._shared.view().get(dest.key)
        if entry is not None and entry.until > dest.suspended_until:
            dest.suspended_until = entry.until
            dest.failures = entry.failures
            dest.reason = entry.reason
            dest.proven = False
            dest.window = 1

    # ------------------------------------------------------------------ administration

    def state_of(self, msg: QueuedMessage) -> str:
        """``active`` (an attempt runs), ``held``, or ``scheduled`` (waits for its next
        attempt)."""
        if msg.queue_id in self._attempts:
            return "active"
        return "held" if msg.extra.get(HELD) else "scheduled"

    def state_by_id(self, queue_id: str) -> str | None:
        """:meth:`state_of` from the schedule alone (no envelope read): also ``held`` while a
        drain has set the message aside; None when the queue does not hold it."""
        due = self._due.get(queue_id)
        if due is None:
            return None
        if queue_id in self._attempts or due == _IN_ATTEMPT:
            return "active"
        return "held" if due == _ON_HOLD else "scheduled"

    async def hold(self, queue_id: str) -> bool:
        """Take a message out of the schedule until :meth:`release`; durable (the hold is in
        its state file and survives restarts). An attempt already running finishes. False when
        it was held already; KeyError when the queue does not hold it."""
        msg = self._admin_message(queue_id)
        if msg.extra.get(HELD):
            return False
        msg.extra[HELD] = True
        try:
            await self._spool.save_state(msg, durable=True)
        except SpoolError:
            del msg.extra[HELD]
            raise
        if queue_id not in self._attempts:
            self._due[queue_id] = _ON_HOLD  # its heap entry is superseded
            self._kept.pop(queue_id, None)  # its state is on disk
            self._take_data(queue_id)
        self._changed.set()
        return True

    def set_aside(self, queue_id: str) -> bool:
        """Take a message out of the schedule in memory only, for a drain's hand-off
        (drain.py): nothing is written to its state file, so a relay that stops meanwhile
        schedules it again at its next start. False when an attempt runs or it is on hold;
        undone by :meth:`put_back`; KeyError when the queue does not hold it."""
        due = self._due.get(queue_id)
        if due is None:
            raise KeyError(queue_id)
        if due in (_IN_ATTEMPT, _ON_HOLD):
            return False
        self._due[queue_id] = _ON_HOLD  # its heap entry is superseded
        self._changed.set()
        return True

    def pause(self) -> None:
        """Begin no attempt until :meth:`resume` (a relay restarted while draining: a message
        it may already have handed to a peer is not delivered here too, drain.py)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._schedule_wake.set()

    def put_back(self, queue_id: str) -> None:
        """Undo :meth:`set_aside`: the message is due at once."""
        if self._due.get(queue_id) == _ON_HOLD:
            self._push(queue_id, self._clock())

    async def release(self, queue_id: str) -> bool:
        """Put a held message back on the schedule, due at once. False when it was not
        held."""
        msg = self._admin_message(queue_id)
        if not msg.extra.get(HELD):
            return False
        del msg.extra[HELD]
        try:
            await self._spool.save_state(msg, durable=True)
        except SpoolError:
            msg.extra[HELD] = True
            raise
        if queue_id not in self._attempts:
            msg.next_attempt = min(msg.next_attempt, self._clock())
            self._schedule(msg)
        return True

    async def hold_many(self, queue_ids: list[str],
                        progress: Callable[[int, int], None] | None = None) -> list[str]:
        """:meth:`hold` for many messages, ``ADMIN_SLICE`` at a time: each slice's state files
        are made durable together (one group commit), and the loop runs other work between
        slices. The ids held (those held already, or gone, are left out). ``progress(done,
        total)`` after each slice."""
        return await self._hold_or_release(queue_ids, True, progress)

    async def release_many(self, queue_ids: list[str],
                           progress: Callable[[int, int], None] | None = None) -> list[str]:
        """:meth:`release` for many messages, as :meth:`hold_many` does it."""
        return await self._hold_or_release(queue_ids, False, progress)

    async def _hold_or_release(self, queue_ids: list[str], hold: bool,
                               progress: Callable[[int, int], None] | None) -> list[str]:
        done: list[str] = []
        for start in range(0, len(queue_ids), ADMIN_SLICE):
            batch: list[QueuedMessage] = []
            for qid in queue_ids[start:start + ADMIN_SLICE]:
                try:
                    msg = self._admin_message(qid)
                except KeyError:
                    continue  # delivered or deleted meanwhile
                if bool(msg.extra.get(HELD)) == hold:
                    continue
                if hold:
                    msg.extra[HELD] = True
                else:
                    del msg.extra[HELD]
                batch.append(msg)
            try:
                await self._spool.save_states(batch)
            except SpoolError:
                for msg in batch:  # none of this slice is recorded: undone in memory too
                    if hold:
                        msg.extra.pop(HELD, None)
                    else:
                        msg.extra[HELD] = True
                raise
            now = self._clock()
            for msg in batch:
                qid = msg.queue_id
                if qid in self._attempts or qid not in self._due:
                    done.append(qid)
                    continue
                if hold:
                    self._due[qid] = _ON_HOLD  # its heap entry is superseded
                    self._kept.pop(qid, None)  # its state is on disk
                else:
                    msg.next_attempt = min(msg.next_attempt, now)
                    self._schedule(msg)
                done.append(qid)
            self._changed.set()
            if progress is not None:
                progress(min(start + ADMIN_SLICE, len(queue_ids)), len(queue_ids))
        return done

    async def flush_many(self, queue_ids: list[str],
                         progress: Callable[[int, int], None] | None = None) -> list[str]:
        """:meth:`flush` for many messages, ``FLUSH_SLICE`` at a time with the loop free in
        between (a million ids take about a second): the ids made due."""
        flushed: list[str] = []
        for start in range(0, len(queue_ids), FLUSH_SLICE):
            for qid in queue_ids[start:start + FLUSH_SLICE]:
                with contextlib.suppress(KeyError):
                    if self.flush(qid):
                        flushed.append(qid)
            if progress is not None:
                progress(min(start + FLUSH_SLICE, len(queue_ids)), len(queue_ids))
            await asyncio.sleep(0)
        return flushed

    def flush(self, queue_id: str) -> bool:
        """Make a scheduled message due now. False when it is held or an attempt runs.
        (Its envelope is not read: the schedule knows which messages are on hold.)"""
        due = self._due.get(queue_id)
        if due is None:
            raise KeyError(queue_id)
        if due in (_IN_ATTEMPT, _ON_HOLD):
            return False
        self._flushed.add(queue_id)
        now = self._clock()
        if due > now:
            # One heap entry per flush of a message not yet due: a flush storm over a queue
            # waiting for attempt slots must not add an entry per message each time.
            self._push(queue_id, now)
        return True

    def resume_destinations(self, name: str | None) -> list[str]:
        """End the suspension of the destinations whose key or recipient domain is ``name``
        (every destination when None): the next work item for each is the probe. Their
        keys."""
        now = self._clock()
        resumed = []
        for dest in self._destinations.values():
            if not dest.suspended(now):
                continue
            if name is not None and name not in (dest.key, dest.match[0]):
                continue
            dest.suspended_until = now
            resumed.append(dest.key)
        shared = self._shared
        ended = sorted(set(resumed) | {k for k, s in shared.view().items()
                                       if s.until > now and name in (None, k)})
        try:
            shared.end_now(ended)
        except OSError as exc:
            log.error("delivery: cannot record the end of suspensions in %s: %s",
                      shared.path, exc)
        self._dispatch_wake.set()
        return ended

    async def delete(self, queue_id: str) -> None:
        """Delete a message from the spool and the schedule, without a DSN. An attempt in
        flight ends without recording anything (as after an erasure)."""
        if queue_id not in self._due:
            raise KeyError(queue_id)
        await self._spool.remove(queue_id)
        self.forget(queue_id)

    async def bounce(self, queue_id: str, reply: str) -> None:
        """Fail every pending recipient with ``reply``: logged as bounced, and a DSN goes to
        the sender as for any failure (never for a null sender). Refused (ValueError) while an
        attempt runs: its outcome would race this one."""
        msg = self._admin_message(queue_id)
        if queue_id in self._attempts:
            raise ValueError(f"{queue_id} has a delivery attempt in progress; hold it, wait "
                             "for the attempt to end, then bounce it")
        outcomes = {r.address: RecipientOutcome("bounced", reply, administrative=True)
                    for r in msg.pending()}
        self._due[queue_id] = _IN_ATTEMPT  # its heap entry is superseded
        await self._outcomes.apply(self._config(), msg, outcomes)

    async def lost(self, msg: QueuedMessage) -> None:
        """The spool found the data of ``msg`` torn (:class:`SpoolDataLost`) outside a delivery
        attempt (a drain's hand-off read it; the spool already removed its files): every
        undecided recipient fails with the lost reply, logged as bounced, and the sender gets
        a failure DSN, as when an attempt finds it torn. KeyError when the queue does not hold
        it; refused (ValueError) while an attempt runs (that attempt records the loss)."""
        queue_id = msg.queue_id
        if queue_id not in self._due:
            raise KeyError(queue_id)
        if queue_id in self._attempts:
            raise ValueError(f"{queue_id} has a delivery attempt in progress")
        msg.extra[DATA_LOST] = True
        outcomes = {r.address: RecipientOutcome("bounced", LOST_REPLY, administrative=True)
                    for r in msg.pending()}
        self._due[queue_id] = _IN_ATTEMPT  # its heap entry is superseded
        await self._outcomes.apply(self._config(), msg, outcomes)
        self._changed.set()

    def is_queued(self, queue_id: str) -> bool:
        return queue_id in self._due

    def _admin_message(self, queue_id: str) -> QueuedMessage:
        msg = self.message(queue_id)
        if msg is None:
            raise KeyError(queue_id)
        return msg

    def forget(self, queue_id: str) -> None:
        """The spool deleted this message (erasure): drop it from the schedule. An attempt in
        flight finds it without recipients and ends without sending, logging or bouncing."""
        self._forget_id(queue_id)
        self.update_gauges()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every recorded outcome, submitted
        message and removal (for tests, benchmarks and drain logic). Bound it with
        ``asyncio.timeout``."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    def update_gauges(self) -> None:
        self._metrics.queue_messages.set(len(self._due))
        if len(self._by_age) > 2 * len(self._due) + 1000:
            # Ids of messages no longer queued pile up behind an old one: rebuild (a sorted
            # list is a heap).
            self._by_age = sorted(self._due)
        if self._due:
            while self._by_age[0] not in self._due:
                heapq.heappop(self._by_age)
            # A queue id starts with its commit time in milliseconds.
            oldest = (queue_id_number(self._by_age[0]) >> 50) / 1000
            self._metrics.queue_oldest_age.set(max(0.0, self._clock() - oldest))
        else:
            self._metrics.queue_oldest_age.set(0)
        now = self._clock()
        counts = dict.fromkeys(STATES, 0)
        shared = {key for key, s in self._shared_view().items() if s.until > now}
        for dest in self._destinations.values():
            self._sync_shared(dest)
            state = dest.state(now)
            if state == "suspended" and dest.key in shared:
                continue  # a shared suspension: counted once for the relay, below
            counts[state] += 1
        if self._reports_shared:
            counts["suspended"] += len(shared)
        for state, count in counts.items():
            self._metrics.destinations.labels(state).set(count)
        self._metrics.connections_in_use.set(self._in_use)

    # ------------------------------------------------------------------ scheduled stage

    def _push(self, queue_id: str, due: float) -> None:
        self._due[queue_id] = due
        heapq.heappush(self._heap, (due, queue_id))
        self._schedule_wake.set()
        self._changed.set()

    def _schedule(self, msg: QueuedMessage) -> None:
        """Schedule the next attempt of a queued message (its state is in the spool, or held
        there if it could not be written): only its id and due time stay here."""
        if msg.queue_id not in self._due:
            return
        if msg.extra.get(HELD):
            self._due[msg.queue_id] = _ON_HOLD  # out of the schedule until released
            self._changed.set()
        else:
            self._push(msg.queue_id, msg.next_attempt)

    def _forget(self, msg: QueuedMessage) -> None:
        self._forget_id(msg.queue_id)

    def _forget_id(self, queue_id: str) -> None:
        if self._due.pop(queue_id, None) is None:
            return
        self._kept.pop(queue_id, None)
        self._take_data(queue_id)
        self._flushed.discard(queue_id)
        self._metrics.queue_messages.set(len(self._due))
        self._changed.set()

    async def _scheduler(self) -> None:
        begun = 0
        while not self._stopping:
            while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
                heapq.heappop(self._heap)  # superseded entry
            now = self._clock()
            if (self._heap and self._heap[0][0] <= now and len(self._attempts) < MAX_ATTEMPTS
                    and begun < BEGIN_BATCH and not self._paused):
                _, queue_id = heapq.heappop(self._heap)
                if queue_id in self._attempts:  # its last attempt is still being recorded
                    self._push(queue_id, now + 1.0)
                    continue
                if self._begin_due(queue_id):
                    begun += 1
                continue
            if begun >= BEGIN_BATCH:
                begun = 0
                await asyncio.sleep(0)  # let sessions and attempts run
                continue
            begun = 0
            wait = None
            if self._heap and len(self._attempts) < MAX_ATTEMPTS and not self._paused:
                wait = self._heap[0][0] - now
            self._schedule_wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._schedule_wake.wait()

    def _begin_due(self, queue_id: str) -> bool:
        """Start the attempt of a message that fell due, its envelope read from the spool
        unless kept (no reference stays here: it leaves memory with its attempt)."""
        self._due[queue_id] = _IN_ATTEMPT
        try:
            msg = self._kept.pop(queue_id, None) or self._spool.load(queue_id)
        except SpoolError as exc:
            # The disk or the process is short of something (EMFILE, EIO): try again later.
            retry = self._config().settings.queue.retry_initial
            log.error("delivery: %s: %s; retrying in %.0fs", queue_id, exc, retry)
            self._push(queue_id, self._clock() + retry)
            return False
        if msg is None:
            log.error("delivery: %s is no longer readable from the spool; dropped from the "
                      "queue", queue_id)
            self._forget_id(queue_id)
            return False
        data = self._take_data(queue_id)
        if msg.extra.get(HELD):
            self._due[queue_id] = _ON_HOLD  # held while its due time passed
            return False
        self._begin(msg, data)
        return True

    def _take_data(self, queue_id: str) -> bytes | None:
        data = self._kept_data.pop(queue_id, None)
        if data is not None:
            self._kept_bytes -= len(data)
        return data

    def _begin(self, msg: QueuedMessage, data: bytes | None = None) -> None:
        """Start an attempt: set suppressed recipients aside, route the others."""
        cfg = self._config()
        attempt = Attempt(msg, cfg, committed=data)
        if msg.queue_id in self._flushed:
            self._flushed.discard(msg.queue_id)
            attempt.flushed = True
        self._attempts[msg.queue_id] = attempt
        to_send: list[Recipient] = []
        credential = (cfg.credentials.get(msg.credential)
                      if msg.credential is not None else None)
        namespace = credential.namespace if credential is not None else None
        for r in msg.pending():
            if self._suppression.is_suppressed(r.address, namespace) is not None:
                attempt.outcomes[r.address] = RecipientOutcome(
                    "suppressed", "550 5.1.1 Recipient is on the suppression list (not sent)")
            else:
                to_send.append(r)
        delivery = cfg.settings.delivery
        if not to_send:
            self._spawn(self._complete(attempt), f"delivery-complete-{msg.queue_id}")
        elif delivery.mode == "smarthost":
            smarthost = delivery.smarthost
            assert smarthost is not None  # guaranteed by the config validator
            auth = None
            if smarthost.username is not None and smarthost.password_file is not None:
                auth = (smarthost.username, smarthost.password_file)
            target = Target(smarthost.host, smarthost.host, smarthost.port, smarthost.tls, auth)
            # Shaping rules split the smarthost's mail into destinations of their own.
            by_shape: dict[str, list[Recipient]] = {}
            for r in to_send:
                by_shape.setdefault(shape_for(delivery, domain_of(r.address)).name,
                                    []).append(r)
            groups = [(name, part) for name, rcpts in by_shape.items()
                      for part in _transactions(cfg, msg, rcpts)]
            attempt.outstanding = len(groups)
            for name, rcpts in groups:
                key = f"smarthost:{smarthost.host}:{smarthost.port}"
                domain = None
                if name != "default":
                    key += f"/{name}"
                    domain = domain_of(rcpts[0].address)
                dest = self._destination(key, delivery, domain, ())
                self._enqueue(dest, Work(attempt, rcpts, [target], None))
        else:
            by_domain: dict[str, list[Recipient]] = {}
            for r in to_send:
                by_domain.setdefault(domain_of(r.address), []).append(r)
            attempt.outstanding = len(by_domain)
            for domain, rcpts in by_domain.items():
                self._spawn(self._route(attempt, domain, rcpts), f"delivery-route-{domain}")

    async def _route(self, attempt: Attempt, domain: str, recipients: list[Recipient]) -> None:
        cfg = attempt.cfg
        delivery = cfg.settings.delivery
        resolver = self._mx_resolver(delivery.resolver)
        try:
            async with self._routing:
                route = await resolver.route(domain)
            # Not in a routing slot: a slow policy web server holds up its own domain only.
            policy = await self._sts_policy(cfg, resolver, domain)
            sts_route = route
            if policy is not None and policy.mode == "enforce":
                # Only the MX hosts the policy names (RFC 8461 section 4.1).
                sts_route = MXRoute(route.domain, tuple(
                    h for h in route.hosts if policy.matches(h)), route.implicit)
            async with self._routing:
                targets, error = await self._mx_targets(delivery, resolver, sts_route,
                                                        domain, policy)
        except PermanentDNSFailure as exc:
            targets, error = [], exc
        except TemporaryDNSFailure as exc:
            targets, error = [], exc
        if not targets:
            outcome = dns_outcome(error.reply, permanent=isinstance(error, PermanentDNSFailure))
            for r in recipients:
                attempt.outcomes[r.address] = outcome
            await self._work_done(attempt)
            return
        shape = shape_for(delivery, domain, route.hosts)
        site = sts_route.destination
        key = site if shape.name == "default" else f"{site}/{shape.name}"
        if targets[0].sts == "enforce":
            # Connections verified against delivery.mtaSts.caFile, to the hosts the policy
            # names only: pooled apart from every other level.
            key += "+sts"
        elif targets[0].tls in ("encrypt", "verify"):
            # Pooled connections of a stricter level stay apart: a clear-text connection
            # opened for another domain of these MX hosts must never carry this mail.
            key += f"+tls={targets[0].tls}"
        dest = self._destination(key, delivery, domain, route.hosts)
        parts = _transactions(cfg, attempt.msg, recipients)
        # This domain's work counted once already; more items are added before any can end.
        attempt.outstanding += len(parts) - 1
        for part in parts:
            self._enqueue(dest, Work(attempt, part, targets, domain))

    async def _mx_targets(self, delivery: DeliverySettings, resolver: MXResolver, route: MXRoute,
                          domain: str, policy: Policy | None = None
                          ) -> tuple[list[Target], PermanentDNSFailure | TemporaryDNSFailure]:
        """Addresses to try, in order; when there are none, the failure that explains why.
        Under an MTA-STS ``enforce`` policy ``route`` holds only the hosts it names, and TLS
        must verify."""
        mode: TLSMode = _TLS_MODES[delivery.tls_level(ascii_domain(domain) or domain)]
        sts = None if policy is None or policy.mode == "none" else policy.mode
        if sts == "enforce":
            mode = "verify"
            if not route.hosts:
                assert policy is not None
                self._tls_report("sts", "enforce", policy.domain, "validation-failure")
                return [], TemporaryDNSFailure(
                    f"451 4.7.5 No MX host of {domain} matches its MTA-STS policy "
                    f"(mx: {', '.join(policy.mx)})"[:300])
        limit = delivery.max_mx_addresses
        targets: list[Target] = []
        temporary: TemporaryDNSFailure | None = None
        permanent: PermanentDNSFailure | None = None
        for host in route.hosts:
            try:
                addresses = await resolver.addresses(host)
            except PermanentDNSFailure as exc:
                permanent = exc
                continue
            except TemporaryDNSFailure as exc:
                temporary = exc
                continue
            mx_ok = policy is None or policy.matches(host)
            targets.extend(Target(host, a, delivery.mx_port, mode, sts=sts, sts_mx_ok=mx_ok,
                                  policy_domain=policy.domain if policy else domain)
                           for a in addresses)
            if len(targets) >= limit:
                break
        if temporary is not None:
            return targets[:limit], temporary
        if permanent is not None and not route.implicit:
            # MX records that name dead hosts: a misconfiguration often fixed within the queue
            # lifetime, so defer.
            return targets[:limit], TemporaryDNSFailure(
                "451 4.4.3 " + permanent.reply.split(" ", 2)[-1])
        return targets[:limit], permanent or PermanentDNSFailure(
            f"550 5.1.2 No address for {route.domain}")

    async def _sts_policy(self, cfg: RelayConfig, resolver: MXResolver, domain: str
                          ) -> Policy | None:
        """The MTA-STS policy in force for a recipient domain (None: none, mode none, MTA-STS
        disabled, or a delivery.mxTls.policies rule names the domain: that rule wins)."""
        delivery = cfg.settings.delivery
        settings = delivery.mta_sts
        # One policy, cache entry and metric label per domain, however the address spells it;
        # mxTls rules name internationalised domains in A-labels too.
        domain = ascii_domain(domain) or domain
        if not settings.enabled or delivery.tls_rule(domain) is not None:
            return None
        path = Path(settings.cache_file or os.path.join(cfg.settings.spool.directory,
                                                        MTA_STS_CACHE_NAME))
        if self._sts is None or self._sts.cache_file != path:
            self._sts = MTASTS(path, clock=self._clock)
        sts = self._sts
        try:
            lookup = await sts.lookup(domain, resolver, settings, dns_slots=self._routing)
        except Exception:
            # A bug must not lift an enforce policy: the cached policy stays in force.
            log.exception("mta-sts: policy lookup for %s failed", domain)
            return sts.cached(domain)
        if lookup.defer is not None:
            # Whether the domain publishes enforce is not known: defer, never send in clear.
            raise TemporaryDNSFailure(lookup.defer)
        policy = lookup.policy
        if lookup.failure is not None:
            self._tls_report("sts", policy.mode if policy else "none", domain, lookup.failure)
        return policy if policy is not None and policy.mode != "none" else None

    def _tls_report(self, policy_type: str, mode: str, domain: str, result: str) -> None:
        """Count a TLS result (RFC 8460 result types) for a policy domain, with the mode of
        the policy in force (enforce, testing; none). Domains get a label of their own only
        with a policy, and only the first delivery.mtaSts.reportDomains of them; later ones
        count as "other"."""
        label = ""
        if policy_type == "sts":
            cap = self._config().settings.delivery.mta_sts.report_domains
            if domain not in self._report_domains and len(self._report_domains) < cap:
                self._report_domains.add(domain)
            label = domain if domain in self._report_domains else "other"
        self._metrics.delivery_tls_sessions.labels(policy_type, label, mode, result).inc()

    def _mx_resolver(self, settings: ResolverSettings) -> MXResolver:
        if self._resolver is None or self._resolver.settings != settings:
            self._resolver = MXResolver(settings, self._rng)
        return self._resolver

    # ------------------------------------------------------------------ ready stage

    def _destination(self, key: str, delivery: DeliverySettings, domain: str | None,
                     hosts: tuple[str, ...]) -> Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = Destination(key, shape_for(delivery, domain, hosts))
            dest.match = (domain, hosts)
            dest.reshape(dest.shape, self._clock())
            self._destinations[key] = dest
        dest.last_used = time.monotonic()
        return dest

    def _enqueue(self, dest: Destination, work: Work) -> None:
        now = self._clock()
        self._sync_shared(dest)
        if dest.suspended(now):
            if not work.attempt.flushed:
                self._spawn(self._defer_suspended(dest, work), "delivery-suspended")
                return
            # An administrator's flush: this work is the destination's probe now.
            dest.suspended_until = now
            with contextlib.suppress(OSError):
                self._shared.end_now([dest.key])
            log.info("delivery: suspension of %s ended by a flush", dest.key)
        dest.ready.append(work)
        self._ring_add(dest)

    def _ring_add(self, dest: Destination) -> None:
        if not dest.in_ring and dest.ready:
            dest.in_ring = True
            self._ring.append(dest)
            self._dispatch_wake.set()

    async def _dispatcher(self) -> None:
        while not self._stopping:
            self._dispatch_wake.clear()
            self._dispatch_pass()
            wait = None
            if self._timers:
                wait = max(0.0, self._timers[0][0] - self._clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._dispatch_wake.wait()

    def _dispatch_pass(self) -> None:
        now = self._clock()
        while self._timers and self._timers[0][0] <= now:
            _, _, dest = heapq.heappop(self._timers)
            self._ring_add(dest)
        cap = self._config().settings.delivery.max_concurrency
        # Visit each destination in the ring at most once per round; start one transaction
        # per visit, so that ready destinations take turns.
        while self._ring and self._in_use < cap:
            started = False
            for _ in range(len(self._ring)):
                if self._in_use >= cap:
                    break
                dest = self._ring.popleft()
                if self._start_one(dest, now, cap):
                    started = True
                if dest.ready and dest.in_ring:
                    self._ring.append(dest)
                else:
                    dest.in_ring = False
            if not started:
                break

    def _start_one(self, dest: Destination, now: float, cap: int) -> bool:
        """Start a transaction for ``dest`` if it may have one now; otherwise take it out of
        the ring (it comes back when one of its transactions ends, or its rate allows)."""
        if not dest.ready:
            dest.in_ring = False
            return False
        cfg = self._config()
        self._sync_shared(dest)
        if dest.suspended(now):
            dest.in_ring = False
            self._spawn(self._defer_all(dest), "delivery-suspended")
            return False
        # A destination that already has a connection never takes the last tenth of the
        # global bound: that stays for destinations with none, so slow destinations cannot
        # collect every slot and hold up the others.
        reserve = cap // 10 if cap >= 10 else min(1, cap - 1)
        if dest.active >= dest.limit() or (dest.active and cap - self._in_use <= reserve):
            dest.in_ring = False
            return False
        wait = dest.rate_wait(now)
        if wait > 0:
            dest.in_ring = False
            heapq.heappush(self._timers, (now + wait, next(self._seq), dest))
            return False
        if dest.failures and not dest.proven:
            if self._probe_wait.get(dest.key, 0.0) > now:
                dest.in_ring = False  # its timer is set: another worker's probe is awaited
                return False
            verdict = self._may_probe(dest, cfg, now)
            if verdict != "probe":
                dest.in_ring = False
                if verdict == "suspended":
                    self._spawn(self._defer_all(dest), "delivery-suspended")
                else:  # another worker probes: the work waits here for its outcome
                    self._probe_wait[dest.key] = now + PROBE_POLL
                    heapq.heappush(self._timers, (now + PROBE_POLL, next(self._seq), dest))
                return False
        work = dest.ready.popleft()
        dest.take_rate(now)
        dest.active += 1
        self._in_use += 1
        self._spawn(self._run(dest, work), f"delivery-{work.attempt.msg.queue_id}")
        return True

    def _may_probe(self, dest: Destination, cfg: RelayConfig, now: float
                   ) -> Literal["probe", "suspended", "wait"]:
        """The suspension of ``dest`` ended: may this worker send the probe? One worker of the
        relay claims it (``probe``); the others keep their work ready and look again every
        ``PROBE_POLL`` seconds (``wait``) until its outcome is recorded: lifted, they go on;
        ``suspended`` again (the probe failed), their work is deferred."""
        try:
            blocked = self._shared.claim_probe(
                dest.key, lease=cfg.settings.delivery.message_deadline)
        except OSError as exc:
            log.error("delivery: cannot claim the probe of %s (%s); probing anyway", dest.key,
                      exc)
            return "probe"
        self._probe_wait.pop(dest.key, None)
        if blocked is None:
            return "probe"
        if blocked.until > now:
            dest.suspended_until = blocked.until
            dest.failures, dest.reason = blocked.failures, blocked.reason
            return "suspended"
        return "wait"

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery task %s failed", task.get_name(), exc_info=task.exception())

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("delivery background task %s died; deliveries stop until restart",
                         task.get_name(), exc_info=exc)
            if self._on_failure is not None:
                self._on_failure(exc)

    async def _run(self, dest: Destination, work: Work) -> None:
        try:
            await self._deliver(dest, work)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never lose a message to a bug: log it and treat the attempt as a temporary
            # failure, so that the backoff, the attempt count and the expiry still apply (a
            # message that always hits the bug expires and bounces instead of looping forever).
            log.exception("delivery attempt for %s failed unexpectedly; retrying later",
                          work.attempt.msg.queue_id)
            for r in work.recipients:
                work.attempt.outcomes[r.address] = RecipientOutcome(
                    "deferred", "451 4.3.0 Internal error during delivery")
        finally:
            dest.active -= 1
            self._in_use -= 1
            dest.last_used = time.monotonic()
            self._ring_add(dest)
            self._dispatch_wake.set()
        await self._work_done(work.attempt)

    async def _defer_suspended(self, dest: Destination, work: Work) -> None:
        reply = (f"{dest.reason} (destination suspended; not tried)")[:300]
        for r in work.recipients:
            work.attempt.outcomes[r.address] = RecipientOutcome(
                "deferred", reply, not_before=dest.suspended_until)
        await self._work_done(work.attempt)

    async def _defer_all(self, dest: Destination) -> None:
        works = list(dest.ready)
        dest.ready.clear()
        for work in works:
            await self._defer_suspended(dest, work)

    async def _work_done(self, attempt: Attempt) -> None:
        attempt.outstanding -= 1
        if attempt.outstanding <= 0:
            await self._complete(attempt)

    async def _complete(self, attempt: Attempt) -> None:
        msg = attempt.msg
        if msg.queue_id not in self._due:
            # Erased while the attempt ran (the spool deleted it): nothing to record.
            self._end_attempt(msg.queue_id)
            return
        if attempt.lost:
            # Nothing is left to deliver: every undecided recipient fails now (logged, counted
            # and reported to the sender), not deferred to an attempt that finds no message.
            msg.extra[DATA_LOST] = True
            for r in msg.pending():
                attempt.outcomes[r.address] = RecipientOutcome(
                    "bounced", LOST_REPLY, administrative=True)
        try:
            await self._outcomes.apply(attempt.cfg, msg, attempt.outcomes)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recording the attempt of %s failed; retrying later", msg.queue_id)
            msg.next_attempt = self._clock() + attempt.cfg.settings.queue.retry_initial
            if msg.queue_id in self._due:
                self._kept[msg.queue_id] = msg  # its state may not be in the spool
                self._schedule(msg)
        finally:
            self._end_attempt(msg.queue_id)

    def _end_attempt(self, queue_id: str) -> None:
        self._attempts.pop(queue_id, None)
        if len(self._attempts) == MAX_ATTEMPTS - 1:
            self._schedule_wake.set()  # the scheduler may start another
        self._changed.set()

    # ------------------------------------------------------------------ one work item

    async def _data(self, attempt: Attempt) -> bytes | None:
        """The message, DKIM-signed, read once per attempt (None: the spool cannot read it)."""
        if attempt.data is None:
            future = attempt.data = asyncio.get_running_loop().create_future()
            try:
                data: bytes | None = await self._signed(attempt)
            except asyncio.CancelledError:
                future.cancel()  # the relay stops: so do the others
                attempt.data = None
                raise
            except Exception as exc:  # a bug: an internal error for every work item
                future.set_exception(exc)
                future.exception()  # retrieved: the caller below reports it
                raise
            future.set_result(data)
        if attempt.data.done():
            return attempt.data.result()
        return await asyncio.shield(attempt.data)

    async def _signed(self, attempt: Attempt) -> bytes | None:
        msg, cfg = attempt.msg, attempt.cfg
        data, attempt.committed = attempt.committed, None
        try:
            if data is None:
                data = await self._read(msg)
        except SpoolDataLost as exc:
            log.error("delivery: %s is lost: %s", msg.queue_id, exc)
            attempt.lost = True
            return None
        except SpoolError as exc:
            log.error("delivery: cannot read %s from the spool: %s", msg.queue_id, exc)
            return None
        if len(data) > SIGN_IN_THREAD_BYTES:
            return await asyncio.to_thread(self._signer.sign, cfg, data, msg.sender_domain)
        return self._signer.sign(cfg, data, msg.sender_domain)

    async def _read(self, msg: QueuedMessage) -> bytes:
        if msg.size > SIGN_IN_THREAD_BYTES:
            return await asyncio.to_thread(self._spool.read, msg.queue_id)
        return self._spool.read(msg.queue_id)  # a small read costs less than a thread hop

    async def _deliver(self, dest: Destination, work: Work) -> None:
        """One work item on one connection at a time: a pooled connection first, then the
        destination's hosts in order; undecided recipients move on to the next host after a
        failure that allows it (``policy.moves_to_next_mx``), up to ``maxMxAddresses`` hosts.
        ``messageDeadline`` counts from here (time spent waiting in the ready queue does not)
        and stops new connections and transactions, never one whose data is on its way."""
        attempt = work.attempt
        cfg, msg, outcomes = attempt.cfg, attempt.msg, attempt.outcomes
        delivery = cfg.settings.delivery
        timeouts = Timeouts.of(delivery)
        data = await self._data(attempt)
        if data is None:
            for r in work.recipients:
                # A lost message's recipients all fail when the attempt ends (_complete).
                outcomes[r.address] = (
                    RecipientOutcome("bounced", LOST_REPLY, administrative=True)
                    if attempt.lost else
                    RecipientOutcome("deferred", "451 4.3.0 Spool read failed"))
            return
        deadline = time.monotonic() + delivery.message_deadline
        # A recipient erased from the message while the work waited is not sent to.
        pending = _live(msg, work.recipients)
        last_reply = "451 4.4.1 No destination host could be reached"
        session = False  # some host gave us a session
        failure: SuspendReason | None = None
        conn = dest.take_idle()
        if conn is not None:
            try:
                wire = await self._wire_data(attempt, conn, data)
                # Erased while the data was prepared: no transaction names the address.
                pending = _live(msg, pending)
                if not pending:
                    self._release(dest, conn, True)
                    return
                return_path = self._return_path(cfg, msg, pending)
                result = await transaction(conn, return_path, pending, wire,
                                           outcomes=outcomes, t=timeouts, reused=True,
                                           deadline=deadline, on_accepted=dest.taking_mail,
                                           extra=_dsn_extra(msg, return_path),
                                           live=_Live(msg))
            except ReusedConnectionLost as exc:
                log.info("delivery: pooled connection to %s failed before the transaction "
                         "(%s); retrying on a fresh connection", conn.remote, exc.reason)
                self._discard(conn)
            else:
                session = True
                self._release(dest, conn, result.reusable)
                if result.ended:
                    dest.delivered += 1
                if result.throttled:
                    failure = "throttled"
                pending, last_reply = result.moved, result.moved_reply or last_reply
        tried = 0
        for target in work.targets:
            if not pending:
                break
            if tried >= delivery.max_mx_addresses:
                break
            if time.monotonic() >= deadline:
                last_reply = "451 4.4.7 Delivery attempt timed out (messageDeadline)"
                break
            tried += 1
            try:
                conn = await self._connect(cfg, target, timeouts)
            except ConnectFailed as exc:
                last_reply = exc.reply
                log.info("delivery: %s: %s", target.remote, exc.reply)
                if failure is None or exc.throttled:
                    failure = "throttled" if exc.throttled else "connect"
                continue
            session = True
            if dest.failures and not dest.proven:
                try:  # the probe worked: the suspension ends for every worker
                    self._shared.lift(dest.key)
                except OSError as exc:
                    log.error("delivery: cannot record the end of the suspension of %s: %s",
                              dest.key, exc)
            dest.session_worked()
            wire = await self._wire_data(attempt, conn, data)
            # Erased while this connection was opened (or the data prepared): the erasure
            # has reported done, so no transaction may name the address from now on.
            pending = _live(msg, pending)
            if not pending:
                self._release(dest, conn, True)
                break
            return_path = self._return_path(cfg, msg, pending)
            result = await transaction(conn, return_path, pending, wire, outcomes=outcomes,
                                       t=timeouts, reused=False, deadline=deadline,
                                       on_accepted=dest.taking_mail,
                                       extra=_dsn_extra(msg, return_path),
                                       live=_Live(msg))
            self._release(dest, conn, result.reusable)
            if result.ended:
                dest.delivered += 1
            if result.throttled:
                failure = "throttled"
            pending = result.moved
            if result.moved_reply:
                last_reply = result.moved_reply
        for r in pending:
            outcomes[r.address] = RecipientOutcome("deferred", last_reply)
        # No host would take a session, or the last one that did throttled us and the mail
        # found nowhere else to go: suspend the destination instead of hammering it.
        if pending and failure is not None and (not session or failure == "throttled"):
            self._suspend(dest, cfg, last_reply, failure)

    def _return_path(self, cfg: RelayConfig, msg: QueuedMessage, recipients: list[Recipient]
                     ) -> str:
        """The MAIL FROM of a transaction: a VERP address on the intake domain when the relay
        has one (bounces and complaints come back to the relay), else the sender's. The null
        sender of a DSN stays null (RFC 5321 §4.5.5)."""
        intake = cfg.settings.intake
        if intake is None or not msg.mail_from:
            return msg.mail_from
        try:
            key = self._verp_key.get(intake.key_file)
        except verp.VERPKeyError as exc:
            log.error("delivery: no VERP return path for %s, the sender's is used: %s",
                      msg.queue_id, exc)
            return msg.mail_from
        return verp.return_path(key, intake.local_part, intake.domain, msg.queue_id,
                                [r.address for r in recipients])

    async def hard_bounce(self, address: str, response: str, now: float) -> None:
        """A hard bounce learned after delivery (a DSN): the same suppression rules as a
        bounce during the transaction."""
        await self._outcomes.hard_bounce(address, response, now)

    async def _wire_data(self, attempt: Attempt, conn: Connection, data: bytes) -> bytes:
        """What goes to this server: the signed message, or — for an 8-bit body toward a
        server without 8BITMIME (RFC 6152) — the spooled message converted to quoted-printable
        and then signed (once per attempt). A message that needs SMTPUTF8 is left as is (the
        transaction bounces it where SMTPUTF8 is missing); one that cannot be converted is
        returned as is too and bounced by the transaction with 554 5.6.3."""
        if (data.isascii() or conn.client.supports_extension("8bitmime")
                or needs_smtputf8(data)):
            return data
        if attempt.seven_bit is None:
            msg, cfg = attempt.msg, attempt.cfg
            try:
                original = await self._read(msg)
            except SpoolError:
                return data
            converted = await asyncio.to_thread(to_seven_bit, original)
            attempt.seven_bit = (b"" if converted is None
                                 else self._signer.sign(cfg, converted, msg.sender_domain))
        return attempt.seven_bit or data

    def _suspend(self, dest: Destination, cfg: RelayConfig, reason: str,
                 kind: SuspendReason) -> None:
        now = self._clock()
        if dest.suspended(now):
            return
        # The reply is kept (queue view, other messages' log rows) without the addresses it
        # quotes, as in the shared file, also when that file cannot be written.
        reason = without_addresses(reason)
        try:
            # Recorded for the relay's other workers and its next start; a suspension another
            # worker recorded meanwhile is adopted as it is.
            entry, new = self._shared.suspend(
                dest.key, failures=dest.failures, reason=reason, kind=kind,
                delay=lambda step: next_retry_delay(step, cfg.settings.queue, self._rng))
            delay, failures, reason = entry.until - now, entry.failures, entry.reason
        except OSError as exc:
            log.error("delivery: cannot record the suspension of %s in the spool root: %s",
                      dest.key, exc)
            delay = next_retry_delay(dest.failures + 1, cfg.settings.queue, self._rng)
            failures, new = dest.failures + 1, True
        dest.suspend(now, delay, reason, kind)
        dest.failures = failures
        if new:
            self._metrics.destination_suspensions.labels(kind).inc()
            log.warning("delivery: destination %s suspended for %.0fs (%s): %s", dest.key,
                        delay, kind, reason)
        self._close_idle(dest, keep=lambda _c: False)
        if dest.ready:
            self._spawn(self._defer_all(dest), "delivery-suspended")

    # ------------------------------------------------------------------ connections

    def _tls_context(self, verify: bool, ca_file: str | None) -> ssl.SSLContext:
        key = (verify, ca_file)
        ctx = self._tls_contexts.get(key)
        if ctx is None:
            if verify:
                ctx = ssl.create_default_context(cafile=ca_file)
            else:
                # Opportunistic TLS to MX hosts (and an explicitly unverified smarthost):
                # encryption against passive observers, as MTAs do (RFC 7435).
                ctx = ssl.create_default_context()
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls_contexts[key] = ctx
        return ctx

    async def _connect(self, cfg: RelayConfig, target: Target, timeouts: Timeouts
                       ) -> Connection:
        delivery = cfg.settings.delivery
        sts_ctx = (self._mta_sts_context(cfg) if target.sts is not None else None)
        if target.tls in ("opportunistic", "encrypt"):
            ctx = self._tls_context(False, None)
        elif target.tls == "verify" and sts_ctx is not None and target.sts == "enforce":
            # MTA-STS enforce: valid for the MX host name (Target.host), which the policy names.
            ctx = sts_ctx
        elif target.tls == "verify":
            # The certificate must be valid for the MX host name (Target.host).
            ctx = self._tls_context(True, delivery.mx_tls.ca_file)
        else:
            smarthost = delivery.smarthost
            verify = smarthost.verify_tls if smarthost is not None else True
            ca_file = smarthost.ca_file if smarthost is not None else None
            ctx = self._tls_context(verify, ca_file)
        helo = delivery.helo_name or cfg.settings.hostname
        reported = False
        if target.sts == "testing" and sts_ctx is not None and target.tls != "none":
            conn = await self._sts_test(target, sts_ctx, helo, timeouts)
            if conn is not None:
                return await self._opened(conn, target)
            reported = True
        try:
            conn = await open_connection(target, ctx, helo, timeouts,
                                         use_starttls=target.tls != "none")
        except TLSFailed as exc:
            if not reported:
                self._report_mx(target, exc.tls_result)
            if target.tls != "opportunistic":
                raise
            # A broken STARTTLS at an MX host: deliver in clear text, as MTAs do.
            log.info("delivery: %s; retrying without TLS", exc.reply)
            conn = await open_connection(target, ctx, helo, timeouts, use_starttls=False)
        except ConnectFailed as exc:
            if exc.tls_result is not None and not reported:
                self._report_mx(target, exc.tls_result)
            raise
        else:
            if not reported and target.tls != "none":
                self._report_mx(target, "success" if conn.tls else "starttls-not-supported")
        return await self._opened(conn, target)

    async def _opened(self, conn: Connection, target: Target) -> Connection:
        if target.auth is not None:
            await login(conn, target)
        self.connections_opened += 1
        return conn

    async def _sts_test(self, target: Target, ctx: ssl.SSLContext, helo: str,
                        timeouts: Timeouts) -> Connection | None:
        """MTA-STS testing mode: try the session as enforce would (verified TLS to a host the
        policy names) and count the result; a session that passes carries the mail, one that
        fails is reported and the mail goes as the TLS level says (None)."""
        if not target.sts_mx_ok:
            self._report_mx(target, "validation-failure")
            return None
        strict = Target(target.host, target.address, target.port, "verify")
        try:
            conn = await open_connection(strict, ctx, helo, timeouts, use_starttls=True)
        except ConnectFailed as exc:
            if exc.tls_result is None:
                raise  # refused, timed out, no session: not about TLS
            self._report_mx(target, exc.tls_result)
            log.info("delivery: %s (MTA-STS testing for %s: delivering anyway)", exc.reply,
                     target.policy_domain)
            return None
        self._report_mx(target, "success")
        return conn

    def _report_mx(self, target: Target, result: str | None) -> None:
        if target.policy_domain is not None and result is not None:
            self._tls_report("sts" if target.sts else "no-policy-found", target.sts or "none",
                             target.policy_domain, result)

    def _mta_sts_context(self, cfg: RelayConfig) -> ssl.SSLContext:
        ca_file = cfg.settings.delivery.mta_sts.ca_file
        if self._sts is not None:
            return self._sts.context(ca_file)
        return self._tls_context(True, ca_file)

    def _release(self, dest: Destination, conn: Connection, reusable: bool) -> None:
        conn.messages += 1
        if (reusable and conn.usable and not self._stopping
                and conn.messages < dest.shape.messages_per_connection
                and self._destinations.get(dest.key) is dest
                and len(dest.idle) < dest.shape.max_connections):
            conn.idle_since = time.monotonic()
            dest.idle.append(conn)
        else:
            self._discard(conn)

    def _close_idle(self, dest: Destination, keep: Callable[[Connection], bool]) -> None:
        kept = []
        for conn in dest.idle:
            if keep(conn) and conn.usable:
                kept.append(conn)
            else:
                self._discard(conn)
        dest.idle = kept

    def _discard(self, conn: Connection) -> None:
        if not conn.usable:
            conn.client.close()
            return
        task = asyncio.create_task(quit_connection(conn.client),
                                   name=f"delivery-quit-{conn.remote}")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # ------------------------------------------------------------------ housekeeping

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.update_gauges()
            idle_timeout = self._config().settings.delivery.idle_connection_timeout
            cutoff = time.monotonic() - idle_timeout
            forget_before = time.monotonic() - DESTINATION_IDLE_FORGET
            now = self._clock()

            def fresh(conn: Connection, cutoff: float = cutoff) -> bool:
                return conn.idle_since > cutoff

            for key, dest in list(self._destinations.items()):
                self._close_idle(dest, keep=fresh)
                if (not dest.idle and not dest.active and not dest.ready
                        and not dest.suspended(now) and dest.last_used < forget_before):
                    del self._destinations[key]


class _Live:
    """Whether a recipient is still in the message's envelope, for a transaction that waits
    on replies while an erasure may edit the envelope (which only ever shortens it)."""

    def __init__(self, msg: QueuedMessage) -> None:
        self._msg = msg
        self._count = -1
        self._ids: set[int] = set()

    def __call__(self, recipient: Recipient) -> bool:
        if len(self._msg.recipients) != self._count:
            self._count = len(self._msg.recipients)
            self._ids = {id(r) for r in self._msg.recipients}
        return id(recipient) in self._ids


def _live(msg: QueuedMessage, recipients: list[Recipient]) -> list[Recipient]:
    """The recipients still in the message's envelope: an erasure removes the address's
    recipients from the envelope object in place (and empties the envelope of a message it
    deletes), so a work item checks right before each transaction, after every wait."""
    live = {id(r) for r in msg.recipients}
    return [r for r in recipients if id(r) in live]


def _dsn_extra(msg: QueuedMessage, return_path: str) -> dict[str, Any] | None:
    """The envelope whose RFC 3461 parameters may go to a next hop that offers DSN: only when
    its notices would reach the sender. With a VERP return path they would come back to the
    relay's intake instead, so the relay keeps the duty (and sends ``relayed`` notices)."""
    return msg.extra if return_path == msg.mail_from else None


def _transactions(cfg: RelayConfig, msg: QueuedMessage, recipients: list[Recipient]
                  ) -> list[list[Recipient]]:
    """How recipients of one destination share transactions: all in one; with the intake
    (VERP), one each, so that every return path names its recipient (a report about one
    recipient cannot be made with another's return path). The relay's own DSNs (null sender)
    carry no return path and stay together."""
    if cfg.settings.intake is None or not msg.mail_from or len(recipients) < 2:
        return [recipients]
    return [[r] for r in recipients]


def _connection_settings(delivery: DeliverySettings) -> tuple[object, ...]:
    """What pooled connections were opened with: when it changes they are closed."""
    return (delivery.smarthost, delivery.mode, delivery.mx_port, delivery.opportunistic_tls,
            delivery.mx_tls, delivery.mta_sts, delivery.helo_name)


_TLS_MODES: dict[str, TLSMode] = {"none": "none", "may": "opportunistic", "encrypt": "encrypt",
                                  "verify": "verify"}
