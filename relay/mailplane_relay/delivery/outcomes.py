"""Recording what an attempt achieved: message log, metrics, reputation, suppression, the
spool, and bounce notices (DSN). The rules (what counts as a hard bounce, when to retry) come
from :mod:`.policy`; this module applies them to a message and its stores."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from ..config import RelayConfig
from ..dsn import FailedRecipient, build_dsn
from ..events import LogEvent
from ..metrics import RelayMetrics
from ..reputation import Reputation
from ..spool import QueuedMessage, Recipient, Spool, SpoolError
from ..store import MessageLog, SuppressionList
from .policy import (
    REPEATED_HARD_BOUNCE_WINDOW,
    REPEATED_HARD_BOUNCES,
    Outcome,
    RecipientOutcome,
    next_retry_delay,
    suppress_at_once,
)

log = logging.getLogger("mailplane_relay.delivery")

# Addresses with an uncertain hard bounce remembered for the "repeated" rule.
_MAX_REMEMBERED_BOUNCES = 100_000
# Addresses of failed recipients already told to the sender (a DSN went out for them).
DSN_REPORTED = "dsn_reported"
# The message's delay warning went out (or none was wanted when it was due).
DELAY_WARNED = "delay_warned"
# The message's data was lost in the spool (torn): its notice can return no header (never
# stored: the message's files are gone).
DATA_LOST = "data_lost"


class Outcomes:
    def __init__(self, *, spool: Callable[[], Spool], log: MessageLog, suppression: SuppressionList,
                 metrics: RelayMetrics, reputation: Reputation | None,
                 clock: Callable[[], float], rng: random.Random,
                 read: Callable[[QueuedMessage], Awaitable[bytes]],
                 submit: Callable[[QueuedMessage], None],
                 reschedule: Callable[[QueuedMessage], None],
                 forget: Callable[[QueuedMessage], None]) -> None:
        self._spool_of = spool  # the queue's spool (looked up at each use)
        self._log = log
        self._suppression = suppression
        self._metrics = metrics
        # Labelled children of the per-recipient counter: labels() costs more than inc(). The
        # keys are bounded by the configuration (outcomes x domains x credentials).
        self._recipient_counters: dict[tuple[str, str, str], Any] = {}
        self._reputation = reputation
        self._clock = clock
        self._rng = rng
        self._read = read
        self._submit = submit
        self._reschedule = reschedule
        self._forget = forget
        # address -> times of hard bounces that did not suppress at once
        self._uncertain: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    async def apply(self, cfg: RelayConfig, msg: QueuedMessage,
                    outcomes: dict[str, RecipientOutcome]) -> None:
        now = self._clock()
        queue = cfg.settings.queue
        expire_at = msg.received_at + queue.max_lifetime
        msg.attempts += 1
        # Same label value as the ingress metrics use for trusted-network mail.
        credential = msg.credential or "none"
        remotes: dict[str, str] = msg.extra.setdefault("remotes", {})
        results: set[str] = set()
        not_before = 0.0
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
                # message until the DSN is spooled, across restarts). RFC 3461: a failure is
                # reported unless NOTIFY leaves FAILURE out; a delivery only when NOTIFY asks
                # for SUCCESS and the server that took it does not send the notice itself. A
                # null reverse-path is never sent one.
                r.dsn_owed = queue.dsn and bool(msg.mail_from) and (
                    r.wants("SUCCESS") and not outcome.dsn_passed if status == "delivered"
                    else r.wants("FAILURE"))
            elif outcome.not_before is not None:
                not_before = max(not_before, outcome.not_before)
            if outcome.remote:
                remotes[r.address] = outcome.remote
            results.add(status)
            self._log.record(LogEvent(
                ts=now, status=status, queue_id=msg.queue_id, message_id=msg.message_id,
                credential=msg.credential, sender=msg.mail_from, recipient=r.address,
                response=outcome.response, size=msg.size, attempt=msg.attempts,
                remote=_remote_label(outcome),
            ))
            key = (status, msg.sender_domain, credential)
            counter = self._recipient_counters.get(key)
            if counter is None:
                if len(self._recipient_counters) > 100_000:
                    self._recipient_counters.clear()
                counter = self._recipient_counters[key] = self._metrics.recipients.labels(*key)
            counter.inc()
            if self._reputation is not None and not outcome.administrative:
                self._reputation.record(msg.credential, status)
            if status == "delivered":
                self._metrics.delivery_latency.observe(max(0.0, now - msg.received_at))
            elif status == "bounced" and outcome.hard:
                await self.hard_bounce(r.address, outcome.response, now)
        if results:
            result = ("deferred" if "deferred" in results
                      else "delivered" if results == {"delivered"} else "bounced")
            self._metrics.delivery_attempts.labels(result).inc()
        if not msg.pending():
            await self.finish(cfg, msg)
            return
        # Recipients that failed for good are reported now, not when the whole message is
        # final (which may be days later). The DSN is in the spool (fsynced): the state that
        # says it went out must be durable too, or a crash before the next write sends it
        # again after the restart.
        owed = any(r.dsn_owed for r in msg.recipients)
        await self._report(cfg, msg)
        warned = await self._warn_delay(cfg, msg, now, expire_at)
        delay = next_retry_delay(msg.attempts, queue, self._rng)
        # The last try happens at the end of the lifetime, not a whole backoff after it; a
        # suspended destination is not tried before its suspension ends.
        msg.next_attempt = max(now, min(max(now + delay, not_before), expire_at))
        warn_at = msg.received_at + queue.delay_warning
        if (queue.delay_warning and queue.dsn and msg.mail_from and now < warn_at
                and DELAY_WARNED not in msg.extra
                and any(r.wants("DELAY") for r in msg.pending())):
            # An attempt when the warning is due, so that it goes out on time.
            msg.next_attempt = min(msg.next_attempt, warn_at)
        await self._save(msg, durable=warned or owed)
        self._reschedule(msg)

    async def _warn_delay(self, cfg: RelayConfig, msg: QueuedMessage, now: float,
                          expire_at: float) -> bool:
        """Send the message's one delay warning once it has been queued ``delayWarning``,
        for the pending recipients whose NOTIFY allows DELAY. True when it was sent (or none
        was wanted) now: the mark must then be saved durably, so a restart does not repeat
        it."""
        queue = cfg.settings.queue
        if (not queue.delay_warning or not queue.dsn or not msg.mail_from
                or DELAY_WARNED in msg.extra or now - msg.received_at < queue.delay_warning):
            return False
        waiting = [r for r in msg.pending() if r.wants("DELAY")]
        if waiting:
            try:
                await self._send_dsn(cfg, msg, waiting, retry_until=expire_at)
            except SpoolError as exc:
                log.error("delivery: delay warning for %s not queued (%s); retrying at the "
                          "next attempt", msg.queue_id, exc)
                return False
        msg.extra[DELAY_WARNED] = True
        return True

    async def hard_bounce(self, address: str, response: str, now: float) -> None:
        """Suppress an address when the bounce is certain (user unknown and kin), or when it
        is the second uncertain hard bounce (a bare 550, a 5.1.x about the domain) within the
        window. One answer about a domain never suppresses an address for a year."""
        if not suppress_at_once(response):
            seen = [t for t in self._uncertain.pop(address, [])
                    if t > now - REPEATED_HARD_BOUNCE_WINDOW]
            seen.append(now)
            if len(seen) < REPEATED_HARD_BOUNCES:
                self._uncertain[address] = seen
                while len(self._uncertain) > _MAX_REMEMBERED_BOUNCES:
                    self._uncertain.popitem(last=False)
                return
            response = f"{len(seen)} hard bounces, last: {response}"
        try:
            await self._suppression.add(address, f"hard bounce: {response}"[:200],
                                        source="bounce")
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("delivery: could not add a hard-bounced address to the suppression "
                          "list")

    async def _save(self, msg: QueuedMessage, *, durable: bool = False) -> None:
        try:
            await self._spool_of().save_state(msg, durable=durable)
        except SpoolError as exc:
            # The attempt is repeated after a restart at worst (at-least-once).
            log.error("delivery: state of %s not saved: %s", msg.queue_id, exc)

    async def _report(self, cfg: RelayConfig, msg: QueuedMessage) -> bool:
        """Send one DSN for the failed recipients owed one, and one for the delivered ones
        owed a success notice. False if one could not be spooled: the duty is then saved
        durably with the message and the DSN retried."""
        reported = set(msg.extra.get(DSN_REPORTED, ()))
        # A recipient suppressed after the message was accepted is reported too: the sender
        # was told 250 and must learn that this copy was not sent.
        failed = [r for r in msg.recipients
                  if r.status in ("bounced", "expired", "suppressed")
                  and (r.dsn_owed or (cfg.settings.queue.dsn and r.wants("FAILURE")
                                      and r.address not in reported))]
        relayed = [r for r in msg.recipients if r.status == "delivered" and r.dsn_owed]
        if not (failed or relayed) or not msg.mail_from:
            return True
        sent: list[Recipient] = []
        try:
            # One notice per kind: a failure report and a success report are read apart.
            for group in (failed, relayed):
                if group:
                    await self._send_dsn(cfg, msg, group)
                    sent += group
        except SpoolError as exc:
            log.error("delivery: DSN for %s not queued (%s); retrying", msg.queue_id, exc)
            sent_ids = {id(r) for r in sent}
            for r in failed + relayed:
                r.dsn_owed = id(r) not in sent_ids
            msg.extra[DSN_REPORTED] = sorted(reported | {r.address for r in failed
                                                         if id(r) in sent_ids})
            try:
                # Durable: the duty must survive a restart before the retry.
                await self._spool_of().save_state(msg, durable=True)
            except SpoolError as save_exc:
                log.error("delivery: state of %s not saved: %s", msg.queue_id, save_exc)
            return False
        for r in sent:
            r.dsn_owed = False
        msg.extra[DSN_REPORTED] = sorted(reported | {r.address for r in failed})
        return True

    async def finish(self, cfg: RelayConfig, msg: QueuedMessage) -> None:
        if not await self._report(cfg, msg):
            msg.next_attempt = self._clock() + cfg.settings.queue.retry_initial
            self._reschedule(msg)
            return
        try:
            await self._spool_of().remove(msg.queue_id)
        except SpoolError as exc:
            log.error("delivery: %s is final but could not be removed: %s", msg.queue_id, exc)
        self._forget(msg)

    async def _send_dsn(self, cfg: RelayConfig, msg: QueuedMessage,
                        failed: list[Recipient], retry_until: float | None = None) -> None:
        remotes: dict[str, str] = msg.extra.get("remotes", {})
        now = self._clock()
        lost = bool(msg.extra.get(DATA_LOST))
        try:
            original = b"" if lost else await self._read(msg)
        except SpoolError:
            original = b""
        hostname = cfg.settings.hostname
        body = build_dsn(
            reporting_mta=hostname, original_sender=msg.mail_from, original_data=original,
            original_queue_id=msg.queue_id, arrival=msg.received_at, now=now,
            recipients=[FailedRecipient(r.address, r.status, r.last_response,
                                        remotes.get(r.address), now, r.orcpt, retry_until)
                        for r in failed],
            envid=msg.extra.get("envid") if isinstance(msg.extra.get("envid"), str) else None,
            original_lost=lost,
        )
        dsn = await self._spool_of().commit(
            mail_from="", recipients=[msg.mail_from], data=body, message_id=None,
            credential=None, sender_domain="other", listener="dsn",
        )
        self._log.record(LogEvent(
            ts=now, status="received", queue_id=dsn.queue_id, message_id=None, credential=None,
            sender="", recipient=msg.mail_from,
            response=f"250 2.0.0 DSN for {msg.queue_id} queued", size=dsn.size,
        ))
        self._submit(dsn)


def _remote_label(outcome: RecipientOutcome) -> str | None:
    if outcome.remote is None:
        return None
    return outcome.remote + (" tls" if outcome.tls else "")
