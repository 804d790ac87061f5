"""The delivery queue: from the spool to a smarthost or the recipients' MX hosts.

Every spooled message with pending recipients sits in an in-memory schedule (a heap ordered by
``next_attempt``). A dispatcher starts attempts as they fall due, within a global bound
(``delivery.maxConcurrency``); each attempt splits the pending recipients by destination (the
smarthost, or per recipient domain its MX host set) and runs one SMTP transaction per domain,
within a per-destination bound (``delivery.concurrencyPerDestination``), over pooled connections
that carry up to ``maxMessagesPerConnection`` messages.

Each recipient ends an attempt delivered (2xx), deferred (4xx, timeouts, connection and DNS
failures), bounced (5xx) or expired (deferred past ``queue.maxLifetime``). Hard bounces add the
address to the suppression list. When no recipient is pending the relay sends a DSN for the
failed ones (when configured and the sender is not null) and removes the message from the spool.

Semantics are at-least-once: state reaches the spool after each attempt, and a crash between a
delivery and that write repeats the delivery. See docs/relay-delivery.md.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import heapq
import itertools
import logging
import math
import random
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from .aiotasks import cancel_and_wait
from .config import QueueSettings, RelayConfig, ResolverSettings, domain_of
from .dkim import DKIMSigner
from .dsn import FailedRecipient, build_dsn
from .events import LogEvent
from .messagelog import MessageLog, SuppressionList
from .metrics import RelayMetrics
from .mx import MXResolver, MXRoute, PermanentDNSFailure, TemporaryDNSFailure
from .reputation import Reputation
from .spool import QueuedMessage, Recipient, Spool, SpoolError

log = logging.getLogger(__name__)

MAX_RESPONSE_CHARS = 300
# Tried in order for one domain per attempt (Postfix's smtp_mx_address_limit is 5 too).
MAX_MX_ADDRESSES = 5
# Messages larger than this are read and signed in a thread, so one big message does not stall
# the loop.
SIGN_IN_THREAD_BYTES = 256 * 1024
QUIT_TIMEOUT = 2.0
HOUSEKEEPING_INTERVAL = 1.0

Outcome = Literal["delivered", "deferred", "bounced", "suppressed"]
Stage = Literal["connect", "mail", "rcpt", "data"]


# ------------------------------------------------------------------------------------------
# Pure policy: retry schedule and reply classification
# ------------------------------------------------------------------------------------------


def next_retry_delay(attempt: int, settings: QueueSettings, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first):
    ``min(retryInitial * retryFactor**(attempt-1), retryMax)``, times a random factor in
    ``[1 - retryJitter, 1 + retryJitter]`` so that messages deferred together spread out."""
    exponent = max(attempt, 1) - 1
    try:
        base = settings.retry_initial * settings.retry_factor ** exponent
    except OverflowError:
        base = math.inf
    base = min(base, settings.retry_max)
    jitter = settings.retry_jitter
    return base * rng.uniform(1.0 - jitter, 1.0 + jitter)


def enhanced_code(text: str) -> str | None:
    """``5.1.1`` from ``5.1.1 No such user``, or None."""
    first = text.split(None, 1)[0] if text.strip() else ""
    parts = first.split(".")
    if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() for p in parts):
        return first
    return None


# 5.1.7 and 5.1.8 are about the sender's address, not the recipient's.
_SENDER_CODES = ("5.1.7", "5.1.8")


def is_hard_bounce(code: int, text: str, stage: Stage, *, recipients_in_transaction: int = 1
                   ) -> bool:
    """Whether a 5xx proves the recipient address itself is bad (so it is suppressed):
    5.1.x (bad mailbox, domain, null MX) except the sender codes, 5.2.1 (mailbox disabled), and
    a bare 550 at RCPT. Policy (5.7.x), full mailbox (5.2.2), size (5.3.4) and other 5xx bounce
    the message without suppressing the address. Replies at MAIL never suppress (they are about
    the sender); replies at DATA only when the transaction had a single recipient."""
    if code < 500 or stage in ("mail", "connect"):
        return False
    if stage == "data" and recipients_in_transaction != 1:
        return False
    enhanced = enhanced_code(text)
    if enhanced is None:
        return stage == "rcpt" and code == 550
    if enhanced in _SENDER_CODES:
        return False
    return enhanced.startswith("5.1.") or enhanced == "5.2.1"


def format_reply(code: int, text: str) -> str:
    """One line, truncated: the message log stores replies, never anything longer."""
    line = " ".join(f"{code} {text}".split())
    return line[:MAX_RESPONSE_CHARS]


@dataclass(slots=True)
class RecipientOutcome:
    status: Outcome
    response: str
    remote: str | None = None
    hard: bool = False
    tls: bool = False


def _reply_outcome(code: int, text: str, stage: Stage, remote: str, tls: bool, *,
                   recipients_in_transaction: int = 1) -> RecipientOutcome:
    response = format_reply(code, text)
    if 200 <= code < 300:
        return RecipientOutcome("delivered", response, remote, tls=tls)
    if code >= 500:
        hard = is_hard_bounce(code, text, stage,
                              recipients_in_transaction=recipients_in_transaction)
        return RecipientOutcome("bounced", response, remote, hard=hard, tls=tls)
    return RecipientOutcome("deferred", response, remote, tls=tls)


# ------------------------------------------------------------------------------------------
# Connections
# ------------------------------------------------------------------------------------------


TLSMode = Literal["starttls", "implicit", "none", "opportunistic"]


@dataclass(frozen=True, slots=True)
class _Target:
    host: str  # name for SNI, certificate checks and logs
    address: str  # what to connect to (an IP from our resolver, or the smarthost name)
    port: int
    tls: TLSMode
    auth: tuple[str, str] | None = None  # (username, password file)

    @property
    def remote(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class _Connection:
    client: aiosmtplib.SMTP
    remote: str
    tls: bool
    messages: int = 0
    idle_since: float = 0.0


@dataclass
class _Destination:
    key: str
    slots: asyncio.Semaphore
    idle: list[_Connection] = field(default_factory=list)
    active: int = 0

    def take_idle(self) -> _Connection | None:
        while self.idle:
            conn = self.idle.pop()
            if conn.client.is_connected:
                return conn
        return None


@dataclass(slots=True)
class _Job:
    """One attempt of one message: what every step of it needs."""

    cfg: RelayConfig
    msg: QueuedMessage
    data: bytes
    outcomes: dict[str, RecipientOutcome]


class _ConnectFailed(Exception):
    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class _TLSFailed(_ConnectFailed):
    """STARTTLS failed; opportunistic TLS retries in clear text, required TLS defers."""


class _ReusedConnectionLost(Exception):
    """A pooled connection failed before the server accepted anything of the transaction
    (closed, reset, broken pipe, or 421 at MAIL): most often the upstream dropped it while it
    sat idle, so the attempt goes on at once on a fresh connection instead of deferring.
    Timeouts are not included: a silent server may be slow rather than gone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------
# Pipelined transactions (RFC 2920)
# ------------------------------------------------------------------------------------------

_UNSAFE_IN_COMMAND = re.compile(rb"[\x00-\x1f\x7f]")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_LINE_START_DOT = re.compile(rb"(?m)^\.")


def _wire_data(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dot-stuffed, then the end-of-data line.
    Spooled mail is CRLF-clean already (the ingress refuses bare CR/LF), so the scans usually
    find nothing to change."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:  # counting beats a regex scan
        data = _BARE_LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LINE_START_DOT.sub(b"..", data)
    return data + b".\r\n"


class _ReplyCollector:
    """Collects the replies of a pipelined group for aiosmtplib's protocol (5.1.3, pinned).

    The protocol keeps one response future, parses one reply per arrival and drops whatever
    arrives while that future is done and its reader has not yet resumed: fine for one command
    at a time, lossy for a pipelined group, whose replies may arrive in separate segments in
    that gap. This object stands in for the future while a group is in flight (the protocol
    calls only ``done``, ``set_result``, ``set_exception`` and ``exception`` on it): it is never
    done before an error, so no arrival is dropped, and it queues every reply in order."""

    def __init__(self, proto: SMTPProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._proto = proto
        self._loop = loop
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None

    def done(self) -> bool:
        return self._error is not None

    def set_result(self, response: aiosmtplib.SMTPResponse) -> None:
        self._replies.append(response)
        try:
            while (more := self._proto._read_response_from_buffer()) is not None:
                self._replies.append(more)
        except Exception as exc:  # a malformed reply: the session is unusable
            self.set_exception(exc)
            return
        self._notify()

    def set_exception(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def exception(self) -> BaseException | None:
        return self._error

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    async def next(self, limit: float | None) -> aiosmtplib.SMTPResponse:
        while not self._replies:
            if self._error is not None:
                raise self._error
            self._wake = self._loop.create_future()
            try:
                async with asyncio.timeout(limit):
                    await self._wake
            except TimeoutError:
                raise aiosmtplib.SMTPReadTimeoutError(
                    "Timed out waiting for server response") from None
        return self._replies.popleft()


# ------------------------------------------------------------------------------------------
# The queue
# ------------------------------------------------------------------------------------------


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
    ) -> None:
        self._config = config
        # Told when the dispatcher or the housekeeper dies: the composition root stops the
        # process (the queue stays on disk) rather than accept mail it would never deliver.
        self._on_failure = on_failure
        self._reputation = reputation
        self._spool = spool
        self._log = log
        self._suppression = suppression
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        self._signer = signer or DKIMSigner(metrics=metrics, clock=clock)
        self._messages: dict[str, QueuedMessage] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._scheduled: dict[str, int] = {}  # queue id -> sequence of its live heap entry
        self._seq = itertools.count()
        self._inflight: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(config().settings.delivery.max_concurrency)
        self._slots_size = config().settings.delivery.max_concurrency
        self._destinations: dict[str, _Destination] = {}
        self._resolver: MXResolver | None = None
        self._tls_contexts: dict[tuple[bool, str | None], ssl.SSLContext] = {}
        self._closers: set[asyncio.Task[None]] = set()
        self._dispatcher: asyncio.Task[None] | None = None
        self._housekeeper: asyncio.Task[None] | None = None
        self._stopping = False
        self._changed = asyncio.Event()
        self.connections_opened = 0  # for tests and benchmarks

    # -------------------------------------------------------------- public interface

    async def start(self, recovered: list[QueuedMessage]) -> None:
        for msg in recovered:
            self.submit(msg)
        self._dispatcher = asyncio.create_task(self._dispatch(), name="delivery-dispatcher")
        self._dispatcher.add_done_callback(self._background_done)
        self._housekeeper = asyncio.create_task(self._housekeeping(),
                                                name="delivery-housekeeping")
        self._housekeeper.add_done_callback(self._background_done)
        self.update_gauges()

    def submit(self, msg: QueuedMessage) -> None:
        if msg.queue_id in self._messages:
            return
        self._messages[msg.queue_id] = msg
        self._schedule(msg)
        self._metrics.queue_messages.set(len(self._messages))
        self._changed.set()

    def reconfigure(self) -> None:
        """Apply a new configuration: limits, resolver, TLS settings. DKIM keys follow by
        themselves (the signer re-reads the configuration object it is handed)."""
        cfg = self._config()
        delivery = cfg.settings.delivery
        if delivery.max_concurrency != self._slots_size:
            # Attempts in flight release the semaphore they took; new ones use the new bound.
            self._slots = asyncio.Semaphore(delivery.max_concurrency)
            self._slots_size = delivery.max_concurrency
        if self._resolver is not None and self._resolver.settings != delivery.resolver:
            self._resolver = None
        self._tls_contexts.clear()
        # Pooled connections were opened under the old settings (smarthost, TLS, AUTH).
        old, self._destinations = self._destinations, {}
        for dest in old.values():
            self._close_idle(dest, keep=lambda _c: False)
        self._wake.set()

    async def stop(self, deadline: float) -> None:
        """Stop starting attempts; let attempts in flight finish until ``deadline`` (a
        ``time.monotonic()`` value), then cancel them. Nothing that is not final leaves the
        spool: an interrupted attempt is repeated after a restart."""
        self._stopping = True
        self._wake.set()
        for task in (self._dispatcher, self._housekeeper):
            if task is not None:
                await cancel_and_wait(task)
        inflight = list(self._inflight.values())
        if inflight:
            remaining = max(0.0, deadline - time.monotonic())
            _done, pending = await asyncio.wait(inflight, timeout=remaining)
            if pending:
                log.warning("delivery: %d attempt(s) still running at the stop deadline; "
                            "cancelling them (they are retried after restart)", len(pending))
                for task in pending:
                    task.cancel()
                _, stuck = await asyncio.wait(pending, timeout=QUIT_TIMEOUT)
                if stuck:
                    log.error("delivery: %d attempt(s) did not end after cancellation",
                              len(stuck))
        for dest in list(self._destinations.values()):
            self._close_idle(dest, keep=lambda _c: False)
        self._destinations.clear()
        if self._closers:
            await asyncio.wait(list(self._closers), timeout=QUIT_TIMEOUT + 0.5)

    # -------------------------------------------------------------- introspection

    @property
    def queued(self) -> int:
        return len(self._messages)

    def message(self, queue_id: str) -> QueuedMessage | None:
        return self._messages.get(queue_id)

    def forget(self, queue_id: str) -> None:
        """The spool deleted this message (erasure): drop it from the schedule. An attempt in
        flight finds it without recipients and ends without sending, logging or bouncing."""
        self._messages.pop(queue_id, None)
        self._scheduled.pop(queue_id, None)
        self.update_gauges()
        self._changed.set()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds; re-checked after every recorded outcome, submitted
        message and removal (for tests, benchmarks and drain logic). Bound it with
        ``asyncio.timeout``."""
        while not predicate():
            self._changed.clear()
            await self._changed.wait()

    # -------------------------------------------------------------- scheduling

    def _schedule(self, msg: QueuedMessage) -> None:
        seq = next(self._seq)
        self._scheduled[msg.queue_id] = seq
        heapq.heappush(self._heap, (msg.next_attempt, seq, msg.queue_id))
        self._wake.set()

    async def _next_due(self) -> str | None:
        while not self._stopping:
            while self._heap and self._scheduled.get(self._heap[0][2]) != self._heap[0][1]:
                heapq.heappop(self._heap)  # superseded entry
            now = self._clock()
            if self._heap and self._heap[0][0] <= now:
                _, _, queue_id = heapq.heappop(self._heap)
                del self._scheduled[queue_id]
                return queue_id
            wait = self._heap[0][0] - now if self._heap else None
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()
        return None

    async def _dispatch(self) -> None:
        while not self._stopping:
            slots = self._slots
            await slots.acquire()
            try:
                queue_id = await self._next_due()
            except BaseException:
                slots.release()
                raise
            msg = self._messages.get(queue_id) if queue_id is not None else None
            if msg is None:
                slots.release()
                continue
            task = asyncio.create_task(self._run_attempt(msg, slots),
                                       name=f"delivery-attempt-{msg.queue_id}")
            self._inflight[msg.queue_id] = task
            task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        queue_id = task.get_name().removeprefix("delivery-attempt-")
        if self._inflight.get(queue_id) is task:
            del self._inflight[queue_id]
        if not task.cancelled() and task.exception() is not None:
            log.error("delivery attempt task for %s failed", queue_id,
                      exc_info=task.exception())

    def _background_done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("delivery background task %s died; deliveries stop until restart",
                         task.get_name(), exc_info=exc)
            if self._on_failure is not None:
                self._on_failure(exc)

    async def _run_attempt(self, msg: QueuedMessage, slots: asyncio.Semaphore) -> None:
        try:
            await self._attempt(msg)
        except asyncio.CancelledError:
            raise
        except Exception:
            # Never lose a message to a bug: log it and treat the attempt as a temporary
            # failure, so that the backoff, the attempt count and the expiry still apply (a
            # message that always hits the bug expires and bounces instead of looping forever).
            log.exception("delivery attempt for %s failed unexpectedly; retrying later",
                          msg.queue_id)
            if msg.queue_id in self._messages:
                await self._after_internal_error(msg)
        finally:
            slots.release()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            self.update_gauges()
            idle_timeout = self._config().settings.delivery.idle_connection_timeout
            cutoff = time.monotonic() - idle_timeout

            def fresh(conn: _Connection, cutoff: float = cutoff) -> bool:
                return conn.idle_since > cutoff

            for key, dest in list(self._destinations.items()):
                self._close_idle(dest, keep=fresh)
                if not dest.idle and dest.active == 0:
                    del self._destinations[key]

    def update_gauges(self) -> None:
        self._metrics.queue_messages.set(len(self._messages))
        if self._messages:
            oldest = min(m.received_at for m in self._messages.values())
            self._metrics.queue_oldest_age.set(max(0.0, self._clock() - oldest))
        else:
            self._metrics.queue_oldest_age.set(0)

    # -------------------------------------------------------------- one attempt

    async def _attempt(self, msg: QueuedMessage) -> None:
        cfg = self._config()
        pending = msg.pending()
        if not pending:
            await self._finish(cfg, msg)
            return
        outcomes: dict[str, RecipientOutcome] = {}
        for r in pending:
            if self._suppression.is_suppressed(r.address) is not None:
                outcomes[r.address] = RecipientOutcome(
                    "suppressed", "550 5.1.1 Recipient is on the suppression list (not sent)")
        to_send = [r for r in pending if r.address not in outcomes]
        if to_send:
            await self._send(cfg, msg, to_send, outcomes)
        await self._apply(cfg, msg, outcomes)

    async def _send(self, cfg: RelayConfig, msg: QueuedMessage, recipients: list[Recipient],
                    outcomes: dict[str, RecipientOutcome]) -> None:
        try:
            data = await self._read(msg)
        except SpoolError as exc:
            log.error("delivery: cannot read %s from the spool: %s", msg.queue_id, exc)
            for r in recipients:
                outcomes[r.address] = RecipientOutcome("deferred", "451 4.3.0 Spool read failed")
            return
        if len(data) > SIGN_IN_THREAD_BYTES:
            data = await asyncio.to_thread(self._signer.sign, cfg, data, msg.sender_domain)
        else:
            data = self._signer.sign(cfg, data, msg.sender_domain)
        delivery = cfg.settings.delivery
        job = _Job(cfg, msg, data, outcomes)
        try:
            async with asyncio.timeout(delivery.message_deadline):
                if delivery.mode == "smarthost":
                    await self._deliver_smarthost(job, recipients)
                else:
                    by_domain: dict[str, list[Recipient]] = {}
                    for r in recipients:
                        by_domain.setdefault(domain_of(r.address), []).append(r)
                    if len(by_domain) == 1:
                        [(domain, rcpts)] = by_domain.items()
                        await self._deliver_domain(job, domain, rcpts)
                    else:
                        async with asyncio.TaskGroup() as group:
                            for domain, rcpts in by_domain.items():
                                group.create_task(
                                    self._deliver_domain(job, domain, rcpts),
                                    name=f"delivery-{msg.queue_id}-domain")
        except TimeoutError:
            pass  # recipients without an answer yet are deferred just below
        for r in recipients:
            outcomes.setdefault(r.address, RecipientOutcome(
                "deferred", "451 4.4.7 Delivery attempt timed out (messageDeadline)"))

    async def _read(self, msg: QueuedMessage) -> bytes:
        if msg.size > SIGN_IN_THREAD_BYTES:
            return await asyncio.to_thread(self._spool.read, msg.queue_id)
        return self._spool.read(msg.queue_id)  # a small read costs less than a thread hop

    def _destination(self, key: str, limit: int) -> _Destination:
        dest = self._destinations.get(key)
        if dest is None:
            dest = self._destinations[key] = _Destination(key, asyncio.Semaphore(limit))
        return dest

    async def _deliver_smarthost(self, job: _Job, recipients: list[Recipient]) -> None:
        delivery = job.cfg.settings.delivery
        smarthost = delivery.smarthost
        assert smarthost is not None  # guaranteed by the config validator
        auth = None
        if smarthost.username is not None and smarthost.password_file is not None:
            auth = (smarthost.username, smarthost.password_file)
        target = _Target(smarthost.host, smarthost.host, smarthost.port, smarthost.tls, auth)
        dest = self._destination(f"smarthost:{smarthost.host}:{smarthost.port}",
                                 delivery.concurrency_per_destination)
        await self._deliver_via(job, dest, [target], recipients)

    async def _deliver_domain(self, job: _Job, domain: str, recipients: list[Recipient]
                              ) -> None:
        cfg, outcomes = job.cfg, job.outcomes
        resolver = self._mx_resolver(cfg.settings.delivery.resolver)
        try:
            route = await resolver.route(domain)
        except PermanentDNSFailure as exc:
            self._all(recipients, outcomes, _dns_outcome(exc.reply, permanent=True))
            return
        except TemporaryDNSFailure as exc:
            self._all(recipients, outcomes, RecipientOutcome("deferred", exc.reply))
            return
        targets, error = await self._mx_targets(cfg, resolver, route)
        if not targets:
            permanent = isinstance(error, PermanentDNSFailure)
            self._all(recipients, outcomes, _dns_outcome(error.reply, permanent=permanent))
            return
        dest = self._destination(route.destination,
                                 cfg.settings.delivery.concurrency_per_destination)
        await self._deliver_via(job, dest, targets, recipients)

    async def _mx_targets(self, cfg: RelayConfig, resolver: MXResolver, route: MXRoute
                          ) -> tuple[list[_Target], PermanentDNSFailure | TemporaryDNSFailure]:
        """Addresses to try, in order; when there are none, the failure that explains why."""
        delivery = cfg.settings.delivery
        mode: TLSMode = "opportunistic" if delivery.opportunistic_tls else "none"
        targets: list[_Target] = []
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
            targets.extend(_Target(host, a, delivery.mx_port, mode) for a in addresses)
            if len(targets) >= MAX_MX_ADDRESSES:
                break
        if temporary is not None:
            return targets[:MAX_MX_ADDRESSES], temporary
        if permanent is not None and not route.implicit:
            # MX records that name dead hosts: a misconfiguration often fixed within the queue
            # lifetime, so defer. A domain with neither MX nor address bounces (RFC 5321 5.1).
            return targets[:MAX_MX_ADDRESSES], TemporaryDNSFailure(
                "451 4.4.3 " + permanent.reply.split(" ", 2)[-1])
        return targets[:MAX_MX_ADDRESSES], permanent or PermanentDNSFailure(
            f"550 5.1.2 No address for {route.domain}")

    def _mx_resolver(self, settings: ResolverSettings) -> MXResolver:
        if self._resolver is None or self._resolver.settings != settings:
            self._resolver = MXResolver(settings, self._rng)
        return self._resolver

    @staticmethod
    def _all(recipients: list[Recipient], outcomes: dict[str, RecipientOutcome],
             outcome: RecipientOutcome) -> None:
        for r in recipients:
            outcomes[r.address] = outcome

    async def _deliver_via(self, job: _Job, dest: _Destination, targets: list[_Target],
                           recipients: list[Recipient]) -> None:
        # Counted before waiting for a slot, so that housekeeping never drops a destination
        # (and with it the concurrency bound) that someone is queueing for.
        dest.active += 1
        try:
            async with dest.slots:
                conn = dest.take_idle()
                if conn is not None:
                    try:
                        reusable = await self._transaction(conn, job, recipients, reused=True)
                    except _ReusedConnectionLost as exc:
                        log.info("delivery: pooled connection to %s failed before the "
                                 "transaction (%s); retrying on a fresh connection",
                                 conn.remote, exc.reason)
                        self._discard(conn)
                    else:
                        self._release(job.cfg, dest, conn, reusable)
                        return
                last_error = "451 4.4.1 No destination host could be reached"
                for target in targets:
                    try:
                        conn = await self._connect(job.cfg, target)
                    except _ConnectFailed as exc:
                        last_error = exc.reply
                        log.info("delivery: %s: %s", target.remote, exc.reply)
                        continue
                    reusable = await self._transaction(conn, job, recipients, reused=False)
                    self._release(job.cfg, dest, conn, reusable)
                    return
                self._all(recipients, job.outcomes, RecipientOutcome("deferred", last_error))
        finally:
            dest.active -= 1

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

    async def _connect(self, cfg: RelayConfig, target: _Target) -> _Connection:
        delivery = cfg.settings.delivery
        if target.tls == "opportunistic":
            ctx = self._tls_context(False, None)
        else:
            smarthost = delivery.smarthost
            verify = smarthost.verify_tls if smarthost is not None else True
            ca_file = smarthost.ca_file if smarthost is not None else None
            ctx = self._tls_context(verify, ca_file)
        helo = delivery.helo_name or cfg.settings.hostname
        try:
            conn = await self._open(target, ctx, helo, delivery.connect_timeout,
                                    delivery.command_timeout, use_starttls=target.tls != "none")
        except _TLSFailed as exc:
            if target.tls != "opportunistic":
                raise
            # A broken STARTTLS at an MX host: deliver in clear text, as MTAs do.
            log.info("delivery: %s; retrying without TLS", exc.reply)
            conn = await self._open(target, ctx, helo, delivery.connect_timeout,
                                    delivery.command_timeout, use_starttls=False)
        if target.auth is not None:
            await self._login(conn, target)
        self.connections_opened += 1
        return conn

    async def _open(self, target: _Target, ctx: ssl.SSLContext, helo: str,
                    connect_timeout: float, command_timeout: float, *, use_starttls: bool
                    ) -> _Connection:
        implicit = target.tls == "implicit"
        client = aiosmtplib.SMTP(
            hostname=target.address, port=target.port, local_hostname=helo,
            timeout=command_timeout, use_tls=implicit, start_tls=False,
            tls_context=ctx if implicit else None,
        )
        try:
            await client.connect(timeout=connect_timeout)
            await client.ehlo()
            if use_starttls and target.tls in ("starttls", "opportunistic"):
                if client.supports_extension("starttls"):
                    await self._starttls(client, target, ctx)
                elif target.tls == "starttls":
                    raise _ConnectFailed(f"451 4.7.4 {target.remote} does not offer STARTTLS "
                                         "(delivery.smarthost.tls is starttls)")
        except aiosmtplib.SMTPResponseException as exc:
            client.close()
            raise _ConnectFailed(
                f"451 4.4.1 {target.remote} refused the session: "
                f"{format_reply(exc.code, exc.message)}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            raise _ConnectFailed(
                f"451 4.4.1 Connection to {target.remote} failed: {_describe(exc)}") from None
        except BaseException:
            client.close()
            raise
        tls = client.get_transport_info("sslcontext") is not None
        return _Connection(client, target.remote, tls)

    @staticmethod
    async def _starttls(client: aiosmtplib.SMTP, target: _Target, ctx: ssl.SSLContext) -> None:
        try:
            await client.starttls(server_hostname=target.host, tls_context=ctx)
            # With TLS 1.3 a server that rejects the handshake (e.g. it wants a client
            # certificate) only says so at the first read: the EHLO belongs to the TLS step.
            await client.ehlo()
        except (aiosmtplib.SMTPException, OSError) as exc:
            client.close()
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else None
            raise _TLSFailed(f"451 4.7.5 TLS with {target.remote} failed: "
                             f"{reason or _describe(exc)}") from None

    async def _login(self, conn: _Connection, target: _Target) -> None:
        assert target.auth is not None
        username, password_file = target.auth
        try:
            # Read at every connection, so that a rotated password applies without a reload.
            password = await asyncio.to_thread(_read_secret, password_file)
        except OSError as exc:
            conn.client.close()
            raise _ConnectFailed(f"451 4.7.0 Cannot read delivery.smarthost.passwordFile: "
                                 f"{exc.strerror}") from None
        try:
            await conn.client.login(username, password)
        except aiosmtplib.SMTPResponseException as exc:
            conn.client.close()
            # Our own credentials were refused: the mail is fine, the relay's setup is not, so
            # defer (an operator can fix it within the queue lifetime) rather than bounce.
            raise _ConnectFailed(f"451 4.7.0 {target.remote} refused the relay's AUTH: "
                                 f"{format_reply(exc.code, exc.message)}") from None
        except (aiosmtplib.SMTPException, OSError) as exc:
            conn.client.close()
            raise _ConnectFailed(f"451 4.7.0 AUTH with {target.remote} failed: "
                                 f"{_describe(exc)}") from None

    async def _transaction(self, conn: _Connection, job: _Job, recipients: list[Recipient], *,
                           reused: bool) -> bool:
        """One MAIL/RCPT/DATA transaction; fills ``job.outcomes``. Returns whether the
        connection may carry another message."""
        client, msg, data, outcomes = conn.client, job.msg, job.data, job.outcomes
        options: list[str] = []
        encoding = "ascii"
        if client.supports_extension("size"):
            # Lets a server refuse an oversized message at MAIL, before the data is sent.
            options.append(f"SIZE={len(data)}")
        if not data.isascii() and client.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if not (msg.mail_from.isascii() and all(r.address.isascii() for r in recipients)):
            if client.supports_extension("smtputf8"):
                options.append("SMTPUTF8")
                encoding = "utf-8"
            else:
                self._all(recipients, outcomes, RecipientOutcome(
                    "bounced", "553 5.6.7 Destination does not support internationalised "
                    "addresses (SMTPUTF8)", conn.remote, tls=conn.tls))
                return True
        remote, tls = conn.remote, conn.tls
        if client.supports_extension("pipelining") and client.protocol is not None:
            commands = self._pipelined_commands(msg.mail_from, recipients, options, encoding)
            if commands is not None:
                return await self._pipelined(conn, job, recipients, commands, reused=reused)
        try:
            try:
                await client.mail(msg.mail_from, options=options, encoding=encoding)
            except aiosmtplib.SMTPSenderRefused as exc:
                if exc.code == 421:
                    client.close()  # the server is closing the session
                    if reused:
                        raise _ReusedConnectionLost(format_reply(exc.code, exc.message)) \
                            from None
                self._all(recipients, outcomes,
                          _reply_outcome(exc.code, exc.message, "mail", remote, tls))
                if exc.code == 421:
                    return False
                await client.rset()
                return True
            except ConnectionError as exc:  # closed, reset, broken pipe (SMTPServerDisconnected)
                if reused:
                    client.close()
                    raise _ReusedConnectionLost(_describe(exc)) from None
                raise
            accepted: list[Recipient] = []
            for r in recipients:
                try:
                    await client.rcpt(r.address, encoding=encoding)
                except aiosmtplib.SMTPRecipientRefused as exc:
                    outcomes[r.address] = _reply_outcome(exc.code, exc.message, "rcpt", remote,
                                                         tls)
                else:
                    accepted.append(r)
            if not accepted:
                await client.rset()
                return True
            try:
                response = await client.data(data)
            except aiosmtplib.SMTPDataError as exc:
                for r in accepted:
                    outcomes[r.address] = _reply_outcome(
                        exc.code, exc.message, "data", remote, tls,
                        recipients_in_transaction=len(accepted))
                await client.rset()
                return True
            for r in accepted:
                outcomes[r.address] = _reply_outcome(response.code, response.message, "data",
                                                     remote, tls)
            return True
        except _ReusedConnectionLost:
            raise
        except (aiosmtplib.SMTPException, OSError) as exc:
            self._undecided(recipients, outcomes, remote, tls, exc)
            return False

    @staticmethod
    def _pipelined_commands(mail_from: str, recipients: list[Recipient], options: list[str],
                            encoding: str) -> list[bytes] | None:
        """MAIL, one RCPT per recipient, DATA; None if an address cannot go on a command line
        as is (then the unpipelined path applies its own checks and errors)."""
        try:
            mail = b"MAIL FROM:" + quote_address(mail_from).encode(encoding)
            rcpts = [b"RCPT TO:" + quote_address(r.address).encode(encoding) for r in recipients]
        except (UnicodeError, ValueError):
            return None
        mail += b"".join(b" " + o.encode("ascii") for o in options)
        commands = [mail, *rcpts]
        if any(_UNSAFE_IN_COMMAND.search(c) for c in commands):
            return None
        return [*commands, b"DATA"]

    async def _pipelined(self, conn: _Connection, job: _Job, recipients: list[Recipient],
                         commands: list[bytes], *, reused: bool) -> bool:
        """The transaction in two round trips instead of 2 + recipients: MAIL, every RCPT and
        DATA in one write, their replies read in order, then the content. Same outcomes as the
        unpipelined path."""
        client, outcomes = conn.client, job.outcomes
        remote, tls = conn.remote, conn.tls
        proto = client.protocol
        assert proto is not None
        lock = proto._command_lock
        timeout = client.timeout
        got_reply = False
        loop = asyncio.get_running_loop()
        replies = _ReplyCollector(proto, loop)
        try:
            if lock is None:
                raise aiosmtplib.SMTPServerDisconnected("Server not connected")
            async with lock:
                try:
                    proto._response_waiter = replies  # type: ignore[assignment]
                    proto._response_pending = True
                    proto.write(b"\r\n".join(commands) + b"\r\n")
                    mail = await replies.next(timeout)
                    if mail.code == 421:
                        # The server took nothing and is closing the session (overload,
                        # shutdown, its own idle limit): the rest of the group is moot.
                        if reused:
                            raise _ReusedConnectionLost(format_reply(mail.code, mail.message))
                        self._all(recipients, outcomes,
                                  _reply_outcome(mail.code, mail.message, "mail", remote, tls))
                        client.close()
                        return False
                    got_reply = True
                    rcpt_replies = [await replies.next(timeout) for _ in recipients]
                    go = await replies.next(timeout)
                    accepted: list[Recipient] = []
                    if mail.code != 250:
                        self._all(recipients, outcomes,
                                  _reply_outcome(mail.code, mail.message, "mail", remote, tls))
                    else:
                        for r, reply in zip(recipients, rcpt_replies, strict=True):
                            if reply.code in (250, 251):
                                accepted.append(r)
                            else:
                                outcomes[r.address] = _reply_outcome(reply.code, reply.message,
                                                                     "rcpt", remote, tls)
                    final: aiosmtplib.SMTPResponse | None = None
                    if go.code == 354:
                        # A server may say 354 even though it refused every recipient: end
                        # the (empty) content so the session stays in step, send nothing.
                        proto.write(_wire_data(job.data) if accepted else b".\r\n")
                        final = await replies.next(timeout)
                finally:
                    proto._response_pending = False
                    if proto._response_waiter is replies:  # type: ignore[comparison-overlap]
                        proto._response_waiter = (
                            None if proto.transport is None else loop.create_future())
            closing = any(r.code == 421 for r in (mail, go, *rcpt_replies)) or (
                final is not None and final.code == 421)
            if accepted:
                reply = final if final is not None else go
                if reply.code == 250 and final is not None:
                    for r in accepted:
                        outcomes[r.address] = _reply_outcome(reply.code, reply.message, "data",
                                                             remote, tls)
                    if not closing:
                        return True
                else:
                    for r in accepted:
                        outcomes[r.address] = _reply_outcome(
                            reply.code, reply.message, "data", remote, tls,
                            recipients_in_transaction=len(accepted))
            if closing:
                client.close()
                return False
            await client.rset()
            return True
        except _ReusedConnectionLost:
            client.close()  # unread replies of the group may follow: never reuse it
            raise
        except ConnectionError as exc:  # closed, reset, broken pipe (SMTPServerDisconnected)
            # The protocol may be out of step with the server now: never reuse it.
            client.close()
            if reused and not got_reply:
                raise _ReusedConnectionLost(_describe(exc)) from None
            self._undecided(recipients, outcomes, remote, tls, exc)
            return False
        except (aiosmtplib.SMTPException, OSError) as exc:  # timeouts, malformed replies
            client.close()
            self._undecided(recipients, outcomes, remote, tls, exc)
            return False

    @staticmethod
    def _undecided(recipients: list[Recipient], outcomes: dict[str, RecipientOutcome],
                   remote: str, tls: bool, exc: BaseException) -> None:
        reply = f"451 4.4.2 Connection to {remote} lost: {_describe(exc)}"
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            reply = f"451 4.4.2 {remote} answered {format_reply(exc.code, exc.message)}"
        for r in recipients:
            if r.address not in outcomes:
                outcomes[r.address] = RecipientOutcome("deferred", reply, remote, tls=tls)

    def _release(self, cfg: RelayConfig, dest: _Destination, conn: _Connection,
                 reusable: bool) -> None:
        conn.messages += 1
        delivery = cfg.settings.delivery
        if (reusable and conn.client.is_connected and not self._stopping
                and conn.messages < delivery.max_messages_per_connection
                and self._destinations.get(dest.key) is dest):
            conn.idle_since = time.monotonic()
            dest.idle.append(conn)
        else:
            self._discard(conn)

    def _close_idle(self, dest: _Destination, keep: Callable[[_Connection], bool]) -> None:
        kept = []
        for conn in dest.idle:
            if keep(conn) and conn.client.is_connected:
                kept.append(conn)
            else:
                self._discard(conn)
        dest.idle = kept

    def _discard(self, conn: _Connection) -> None:
        if not conn.client.is_connected:
            conn.client.close()
            return
        task = asyncio.create_task(_quit(conn.client), name=f"delivery-quit-{conn.remote}")
        self._closers.add(task)
        task.add_done_callback(self._closers.discard)

    # -------------------------------------------------------------- outcomes

    async def _after_internal_error(self, msg: QueuedMessage) -> None:
        reply = RecipientOutcome("deferred", "451 4.3.0 Internal error during delivery")
        try:
            await self._apply(self._config(), msg, {r.address: reply for r in msg.pending()})
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("recording the failed attempt of %s failed too; retrying later",
                          msg.queue_id)
            msg.next_attempt = self._clock() + self._config().settings.queue.retry_initial
            self._schedule(msg)

    async def _apply(self, cfg: RelayConfig, msg: QueuedMessage,
                     outcomes: dict[str, RecipientOutcome]) -> None:
        now = self._clock()
        queue = cfg.settings.queue
        expire_at = msg.received_at + queue.max_lifetime
        msg.attempts += 1
        # Same label value as the ingress metrics use for trusted-network mail.
        credential = msg.credential or "none"
        remotes: dict[str, str] = msg.extra.setdefault("remotes", {})
        results: set[str] = set()
        for r in msg.pending():
            outcome = outcomes.get(r.address)
            if outcome is None:
                continue
            r.attempts += 1
            r.last_response = outcome.response
            status: Outcome | Literal["expired"] = outcome.status
            if status == "deferred" and now >= expire_at:
                status = "expired"
            if status != "deferred":
                r.status = status
                # The duty to report it is stored with the message (the spool keeps the
                # message until the DSN is spooled, across restarts).
                r.dsn_owed = queue.dsn and bool(msg.mail_from)
            if outcome.remote:
                remotes[r.address] = outcome.remote
            results.add(status)
            self._log.record(LogEvent(
                ts=now, status=status, queue_id=msg.queue_id, message_id=msg.message_id,
                credential=msg.credential, sender=msg.mail_from, recipient=r.address,
                response=outcome.response, size=msg.size, attempt=msg.attempts,
                remote=_remote_label(outcome),
            ))
            self._metrics.recipients.labels(status, msg.sender_domain, credential).inc()
            if self._reputation is not None:
                self._reputation.record(msg.credential, status)
            if status == "delivered":
                self._metrics.delivery_latency.observe(max(0.0, now - msg.received_at))
            elif status == "bounced" and outcome.hard:
                await self._suppress(r.address, outcome.response)
        if results:
            result = ("deferred" if "deferred" in results
                      else "delivered" if results == {"delivered"} else "bounced")
            self._metrics.delivery_attempts.labels(result).inc()
        self._changed.set()
        if msg.pending():
            delay = next_retry_delay(msg.attempts, queue, self._rng)
            # The last try happens at the end of the lifetime, not a whole backoff after it.
            msg.next_attempt = max(now, min(now + delay, expire_at))
            await self._save(msg)
            if msg.queue_id in self._messages:
                self._schedule(msg)
        else:
            await self._finish(cfg, msg)

    async def _suppress(self, address: str, response: str) -> None:
        try:
            await self._suppression.add(address, f"hard bounce: {response}"[:200],
                                        source="bounce")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery: could not add a hard-bounced address to the suppression "
                          "list")

    async def _save(self, msg: QueuedMessage) -> None:
        try:
            await self._spool.save_state(msg)
        except SpoolError as exc:
            # The attempt is repeated after a restart at worst (at-least-once).
            log.error("delivery: state of %s not saved: %s", msg.queue_id, exc)

    async def _finish(self, cfg: RelayConfig, msg: QueuedMessage) -> None:
        # A recipient suppressed after the message was accepted is reported too: the sender
        # was told 250 and must learn that this copy was not sent.
        failed = [r for r in msg.recipients if r.status in ("bounced", "expired", "suppressed")]
        if failed and msg.mail_from and (cfg.settings.queue.dsn
                                         or any(r.dsn_owed for r in failed)):
            try:
                await self._send_dsn(cfg, msg, failed)
            except SpoolError as exc:
                log.error("delivery: DSN for %s not queued (%s); retrying", msg.queue_id, exc)
                msg.next_attempt = self._clock() + cfg.settings.queue.retry_initial
                for r in failed:
                    r.dsn_owed = True
                try:
                    # Durable: the duty must survive a restart before the retry.
                    await self._spool.save_state(msg, durable=True)
                except SpoolError as save_exc:
                    log.error("delivery: state of %s not saved: %s", msg.queue_id, save_exc)
                self._schedule(msg)
                return
            for r in failed:
                r.dsn_owed = False
        try:
            await self._spool.remove(msg.queue_id)
        except SpoolError as exc:
            log.error("delivery: %s is final but could not be removed: %s", msg.queue_id, exc)
        self._messages.pop(msg.queue_id, None)
        self._scheduled.pop(msg.queue_id, None)
        self._metrics.queue_messages.set(len(self._messages))
        self._changed.set()

    async def _send_dsn(self, cfg: RelayConfig, msg: QueuedMessage,
                        failed: list[Recipient]) -> None:
        remotes: dict[str, str] = msg.extra.get("remotes", {})
        now = self._clock()
        try:
            original = await self._read(msg)
        except SpoolError:
            original = b""
        hostname = cfg.settings.hostname
        body = build_dsn(
            reporting_mta=hostname, original_sender=msg.mail_from, original_data=original,
            original_queue_id=msg.queue_id, arrival=msg.received_at, now=now,
            recipients=[FailedRecipient(r.address, r.status, r.last_response,
                                        remotes.get(r.address), now) for r in failed],
        )
        dsn = await self._spool.commit(
            mail_from="", recipients=[msg.mail_from], data=body, message_id=None,
            credential=None, sender_domain="other", listener="dsn",
        )
        self._log.record(LogEvent(
            ts=now, status="received", queue_id=dsn.queue_id, message_id=None, credential=None,
            sender="", recipient=msg.mail_from,
            response=f"250 2.0.0 DSN for {msg.queue_id} queued", size=dsn.size,
        ))
        self.submit(dsn)


def _dns_outcome(reply: str, *, permanent: bool) -> RecipientOutcome:
    if not permanent:
        return RecipientOutcome("deferred", reply)
    code = int(reply[:3])
    text = reply[4:]
    return RecipientOutcome("bounced", reply, hard=is_hard_bounce(code, text, "rcpt"))


def _remote_label(outcome: RecipientOutcome) -> str | None:
    if outcome.remote is None:
        return None
    return outcome.remote + (" tls" if outcome.tls else "")


def _read_secret(path: str) -> str:
    return Path(path).read_text().rstrip("\r\n")


def _describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


async def _quit(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit(timeout=QUIT_TIMEOUT)
    except asyncio.CancelledError:
        client.close()
        raise
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        client.close()
