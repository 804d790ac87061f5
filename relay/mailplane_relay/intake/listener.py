"""The intake listener: an SMTP server (port 25 in the pod, its own Service) that takes reports
addressed to the intake domain and nothing else. No AUTH, never relays, size-capped, with
session and report-rate limits; STARTTLS with the relay's certificate.

Each report is read in memory (never written anywhere), matched to the message and credential
through the VERP return path it names, and acted on:

- a DSN's permanent failures about the mailbox (the rules of ``delivery.policy``) suppress the
  address as a synchronous hard bounce does; every permanent failure counts as a bounce of the
  credential (``async_bounces_total``, the bounce-rate window, a ``bounced`` log row);
- an ARF ``abuse`` report suppresses the complainant with reason ``complaint``, counts in
  ``complaints_total`` and in the credential's complaint-rate window, and in the store per
  credential, sender domain and minute (``complaint_domain_buckets``, the portal's figures).

A report whose return path does not verify, or that names no message or recipient of ours, is
counted and dropped. Logs hold metadata only (kind, queue id, result), never addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

from aiosmtpd.smtp import SMTP, Envelope, Session

from .. import verp
from ..config import IntakeSettings, RelayConfig, domain_of
from ..delivery.policy import is_hard_bounce
from ..events import LogEvent
from ..metrics import RelayMetrics
from ..reputation import Reputation
from ..store import LogQuery
from ..store.backend import INTAKE_SOURCE
from ..tlsctx import ReloadingTLS
from . import reports
from .reports import Report

log = logging.getLogger(__name__)

COMPLAINT_REASON = "complaint"
# Message-log rows read to find which recipient a redacted complaint is about.
MAX_RECIPIENTS_SEARCHED = 1000
# Return paths of ours, and recipients, taken from one report: a genuine report names one of
# each (a return path per recipient); the cap keeps a crafted one (thousands of fields within
# the size limit) from costing tokens x recipients tag checks and log queries.
MAX_TOKENS = 10
MAX_RECIPIENTS = 10


class MessageLogLike(Protocol):
    def record(self, event: LogEvent) -> None: ...
    async def query(self, q: LogQuery) -> list[dict[str, object]]: ...
    async def flush(self) -> None: ...


class SuppressionLike(Protocol):
    async def add(self, address: str, reason: str, *, source: str) -> None: ...
    def is_suppressed(self, address: str, namespace: str | None = None
                      ) -> tuple[str, float] | None: ...


@dataclass(frozen=True, slots=True)
class Match:
    queue_id: str
    recipient: str
    credential: str | None
    sender: str
    message_id: str | None


class IntakeHandler:
    """Matches and acts on reports. Separate from the SMTP plumbing so tests can feed it."""

    def __init__(self, *, config: Callable[[], RelayConfig], key: Callable[[], bytes],
                 log: MessageLogLike, suppression: SuppressionLike, metrics: RelayMetrics,
                 reputation: Reputation | None,
                 hard_bounce: Callable[[str, str, float], Awaitable[None]],
                 domain_complaints: Callable[[dict[tuple[str, str, int], int]],
                                             Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._key = key
        self._log = log
        self._suppression = suppression
        self._metrics = metrics
        self._reputation = reputation
        self._hard_bounce = hard_bounce
        self._domain_complaints = domain_complaints
        self._clock = clock

    def _count(self, kind: str, result: str, n: int = 1) -> None:
        self._metrics.intake_reports.labels(kind=kind, result=result).inc(n)

    async def handle(self, data: bytes, rcpt_tos: list[str]) -> str:
        """Act on one report; the SMTP reply. A report is accepted (250) whatever it says, so
        that a sender cannot probe which tokens or addresses are known."""
        try:
            report = reports.parse(data)
        except Exception:  # the email package is lenient; anything it still throws is noise
            self._count("other", "malformed")
            return "250 2.0.0 Ok: report received"
        if report.kind == "dsn":
            await self._dsn(report, rcpt_tos)
        elif report.kind == "arf":
            await self._arf(report, rcpt_tos)
        else:
            self._count("other", "ignored")
        return "250 2.0.0 Ok: report received"

    def _tokens(self, candidates: list[str]) -> list[verp.Token]:
        intake = self._config().settings.intake
        if intake is None:
            return []
        found = []
        for address in candidates:
            token = verp.parse(address, intake.local_part, intake.domain)
            if token is not None and token not in found:
                found.append(token)
                if len(found) >= MAX_TOKENS:
                    break
        return found

    async def _match(self, tokens: list[verp.Token], recipient: str) -> Match | str | None:
        """The delivery a report about ``recipient`` refers to; "forged" when a token is
        present but none verifies; None when nothing of ours is named."""
        if not tokens:
            return None
        key = self._key()
        for token in tokens:
            if not verp.verify(key, token, recipient):
                continue
            # An "r" tag proves the delivery to this recipient: any row of the message names
            # the credential and sender (the "received" row is written at acceptance; a fast
            # bounce may arrive before the delivery is recorded). An "m" tag needs the delivery.
            query = LogQuery(queue_id=token.queue_id, recipient=recipient,
                             status="delivered" if token.kind == "m" else None, limit=1)
            rows = await self._log.query(query)
            if not rows:
                await self._log.flush()  # rows still in the writer's batch
                rows = await self._log.query(query)
            if rows:
                row = rows[0]
                cred = row.get("credential")
                mid = row.get("message_id")
                return Match(token.queue_id, recipient.lower(),
                             str(cred) if cred else None, str(row.get("sender") or ""),
                             str(mid) if mid else None)
            if token.kind == "r":
                # The tag names this recipient: authentic even when this pod's message log
                # has no row (another pod delivered it, or the row was purged).
                return Match(token.queue_id, recipient.lower(), None, "", None)
            return None
        return "forged"

    async def _dsn(self, report: Report, rcpt_tos: list[str]) -> None:
        if not report.failed:
            self._count("dsn", "ignored")
            return
        # A DSN goes to the return path itself; a returned header section may name it too.
        tokens = self._tokens([*rcpt_tos, *report.return_paths])
        now = self._clock()
        for failed in report.failed[:MAX_RECIPIENTS]:
            match = await self._match(tokens, failed.address)
            if not isinstance(match, Match):
                self._count("dsn", match or "unmatched")
                log.info("intake: DSN %s: %s", match or "unmatched",
                         tokens[0].queue_id if tokens else "no return path of ours")
                continue
            if await self._bounced_before(match):
                # A replayed report (whoever holds the return path may send it again) counts
                # once: one bounce per message and recipient.
                self._count("dsn", "duplicate")
                continue
            self._count("dsn", "matched")
            response = f"550 {failed.status} {failed.diagnostic}".strip()[:250]
            await self._bounced(match, response, now)

    async def _bounced_before(self, match: Match) -> bool:
        query = LogQuery(queue_id=match.queue_id, recipient=match.recipient, status="bounced",
                         limit=1)
        if await self._log.query(query):
            return True
        await self._log.flush()  # a report matched moments ago is still in the writer's batch
        return bool(await self._log.query(query))

    async def _bounced(self, match: Match, response: str, now: float) -> None:
        cfg = self._config()
        credential = match.credential or "none"
        domain = domain_of(match.sender)
        self._metrics.async_bounces.labels(
            domain if domain in cfg.domains else "other", credential).inc()
        if self._reputation is not None:
            self._reputation.record(match.credential, "bounced")
        self._log.record(LogEvent(
            ts=now, status="bounced", queue_id=match.queue_id, message_id=match.message_id,
            credential=match.credential, sender=match.sender, recipient=match.recipient,
            response=f"DSN after delivery: {response}"[:300], size=None))
        text = response.split(" ", 1)[1] if " " in response else response
        if is_hard_bounce(550, text, "rcpt"):
            await self._hard_bounce(match.recipient, response, now)
        log.info("intake: DSN matched %s (%s)", match.queue_id, response.split()[1])

    async def _arf(self, report: Report, rcpt_tos: list[str]) -> None:
        if report.feedback_type != "abuse":
            self._count("arf", "ignored")
            return
        tokens = self._tokens([*report.return_paths, *rcpt_tos])
        complainants = list(dict.fromkeys(a.lower() for a in report.complainants))
        if not complainants:
            # Many feedback loops redact the recipient. The return path still names it: the
            # recipient of that message (as the message log knows them) whose tag verifies.
            complainants = await self._recipient_of(tokens)
        if not complainants:
            self._count("arf", "unmatched")
            log.info("intake: ARF report names no recipient of ours")
            return
        for address in complainants[:MAX_RECIPIENTS]:
            match = await self._match(tokens, address)
            if not isinstance(match, Match):
                self._count("arf", match or "unmatched")
                log.info("intake: ARF %s: %s", match or "unmatched",
                         tokens[0].queue_id if tokens else "no return path of ours")
                continue
            entry = self._suppression.is_suppressed(match.recipient)
            if entry is not None and entry[0] == COMPLAINT_REASON:
                # Complained already (a replayed report, or a second one about the same
                # address): counting it again would let one recipient push the sender's
                # complaint rate over the limit alone.
                self._count("arf", "duplicate")
                continue
            self._count("arf", "matched")
            await self._complained(match)

    async def _recipient_of(self, tokens: list[verp.Token]) -> list[str]:
        key = self._key()
        for token in tokens:
            if token.kind != "r":
                continue
            rows = await self._log.query(LogQuery(queue_id=token.queue_id,
                                                  limit=MAX_RECIPIENTS_SEARCHED))
            for address in dict.fromkeys(str(r.get("recipient") or "").lower() for r in rows):
                if address and verp.verify(key, token, address):
                    return [address]
        return []

    async def _complained(self, match: Match) -> None:
        cfg = self._config()
        domain = domain_of(match.sender)
        self._metrics.complaints.labels(domain if domain in cfg.domains else "other",
                                        match.credential or "none").inc()
        if self._reputation is not None:
            self._reputation.record(match.credential, "complained")
        try:
            await self._suppression.add(match.recipient, COMPLAINT_REASON, source=INTAKE_SOURCE)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("intake: could not add a complainant to the suppression list")
        # Per sender domain too, for the team's figures; a match through the recipient tag
        # alone (no log row) names no sender or credential and is not counted there.
        if self._domain_complaints is not None and match.credential and domain:
            minute = int(self._clock() // 60)
            try:
                await self._domain_complaints({(match.credential, domain, minute): 1})
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("intake: could not count a complaint per sender domain: %s",
                            type(exc).__name__)
        log.info("intake: complaint matched %s", match.queue_id)


class _Window:
    """Reports per minute, one process (a fixed window)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._minute = -1
        self._count = 0

    def take(self, limit: int) -> bool:
        minute = int(self._clock() // 60)
        if minute != self._minute:
            self._minute, self._count = minute, 0
        if self._count >= limit:
            return False
        self._count += 1
        return True


class IntakeSMTP(SMTP):
    """aiosmtpd's session, without AUTH, with replies that carry enhanced status codes."""

    def __init__(self, server: IntakeServer, settings: IntakeSettings, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self.intake_server = server
        self.intake_settings = settings
        self._peer_key = ""
        self._refused = False
        self._plain_replies = False  # HELO/EHLO replies carry no enhanced codes (RFC 2034)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = self.transport is None
        super().connection_made(transport)
        if first:
            peer = transport.get_extra_info("peername")
            self._peer_key = str(peer[0]) if isinstance(peer, tuple) and peer else "?"
            self._refused = not self.intake_server.opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        self.intake_server.closed(self)
        super().connection_lost(error)

    async def _handle_client(self) -> None:
        if self._refused:
            await self.push("421 4.7.0 Too many connections; try again later")
            assert self.transport is not None
            self.transport.close()
            return
        await super()._handle_client()

    async def smtp_AUTH(self, arg: str) -> None:
        await self.push("502 5.5.1 AUTH is not available on this port: it takes reports for "
                        "the bounce domain only")

    async def smtp_HELO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_HELO(hostname)
        finally:
            self._plain_replies = False

    async def smtp_EHLO(self, hostname: str) -> None:
        self._plain_replies = True
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self._plain_replies = False

    async def push(self, status: Any) -> None:
        if isinstance(status, str) and status.startswith("552 Error"):
            status = (f"552 5.3.4 Report too big: at most "
                      f"{self.intake_settings.max_message_size} bytes")
        elif isinstance(status, str) and not self._plain_replies:
            status = with_enhanced_code(status, self.hostname)
        await super().push(status)


# The enhanced code (RFC 3463) given to a reply of aiosmtpd's own that has none, by reply code.
_ENHANCED_DEFAULTS = {
    "220": "2.0.0", "221": "2.0.0", "250": "2.0.0", "252": "2.5.0", "354": "2.0.0",
    "421": "4.3.0", "451": "4.3.0", "454": "4.7.0", "500": "5.5.2", "501": "5.5.4",
    "502": "5.5.1", "503": "5.5.1", "504": "5.5.4", "530": "5.7.0", "554": "5.7.0",
}
_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")


def with_enhanced_code(reply: str, hostname: str) -> str:
    """``500 Error: bad syntax`` -> ``500 5.5.2 Error: bad syntax``; replies that have a code,
    the greeting, and continuation lines are left as they are."""
    code = reply[:3]
    if (len(reply) < 4 or reply[3] != " " or _HAS_ENHANCED.match(reply)
            or code not in _ENHANCED_DEFAULTS or reply.startswith(f"220 {hostname} ")):
        return reply
    if code == "500" and "not recognized" in reply:
        return f"500 5.5.1 {reply[4:]}"
    return f"{code} {_ENHANCED_DEFAULTS[code]} {reply[4:]}"


class IntakeServer:
    """The listener and its handler hooks (aiosmtpd calls ``handle_*`` on this object)."""

    def __init__(self, *, config: Callable[[], RelayConfig], tls: ReloadingTLS | None,
                 handler: IntakeHandler, metrics: RelayMetrics,
                 clock: Callable[[], float] = time.time) -> None:
        self._config = config
        self._tls = tls
        self._handler = handler
        self._metrics = metrics
        self._server: asyncio.Server | None = None
        self._sessions: set[IntakeSMTP] = set()
        self._per_address: dict[str, int] = {}
        self._window = _Window(clock)
        self._last: IntakeSettings | None = None
        self.port = 0

    def _settings(self) -> IntakeSettings:
        # The settings in force; those of the start when a reload removed the intake (the
        # listener stays bound until the restart, as other listeners do).
        intake = self._config().settings.intake
        if intake is not None:
            self._last = intake
        assert self._last is not None, "the intake listener needs intake settings"
        return self._last

    async def start(self, *, reuse_port: bool = False, port: int | None = None) -> None:
        settings = self._settings()
        loop = asyncio.get_running_loop()
        hostname = self._config().settings.hostname
        # The context object stays the same when the certificate is reloaded.
        tls_context = self._tls.context if self._tls is not None else None
        factory = partial(
            IntakeSMTP, self, settings, hostname=hostname, ident="Mailplane intake",
            data_size_limit=settings.max_message_size, enable_SMTPUTF8=False,
            tls_context=tls_context, require_starttls=False, auth_required=False,
            timeout=settings.session_timeout)
        self._server = await loop.create_server(
            factory, host=settings.address, port=settings.port if port is None else port,
            reuse_address=True, reuse_port=reuse_port or None, backlog=128)
        self.port = int(self._server.sockets[0].getsockname()[1])
        # aiosmtpd logs every envelope address at INFO on this logger.
        logging.getLogger("mail.log").setLevel(max(logging.WARNING,
                                                   logging.getLogger("mail.log").level))

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()
        if server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 5.0)

    # ---------------------------------------------------------------- admission

    def opened(self, session: IntakeSMTP) -> bool:
        settings = self._settings()
        key = session._peer_key
        if (len(self._sessions) >= settings.max_sessions
                or self._per_address.get(key, 0) >= settings.max_sessions_per_address):
            self._metrics.rejected.labels(reason="too_many_sessions").inc()
            return False
        self._sessions.add(session)
        self._per_address[key] = self._per_address.get(key, 0) + 1
        return True

    def closed(self, session: IntakeSMTP) -> None:
        if session not in self._sessions:
            return
        self._sessions.discard(session)
        key = session._peer_key
        left = self._per_address.get(key, 0) - 1
        if left > 0:
            self._per_address[key] = left
        else:
            self._per_address.pop(key, None)

    # ---------------------------------------------------------------- aiosmtpd hooks

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        return [r for r in responses if not r.startswith("250-AUTH")]

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        settings = self._settings()
        if domain_of(address).rstrip(".") != settings.domain:
            self._metrics.rejected.labels(reason="domain_not_enabled").inc()
            return (f"550 5.1.1 <{address[:100]}>: this server takes reports for "
                    f"{settings.domain} only; relaying denied")
        if len(envelope.rcpt_tos) >= 10:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        if not self._window.take(self._settings().reports_per_minute):
            self._metrics.rejected.labels(reason="rate_limited").inc()
            return "451 4.7.1 Too many reports this minute; try again later"
        data = envelope.original_content or b""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogateescape")
        return await self._handler.handle(data, list(envelope.rcpt_tos))

    async def handle_exception(self, error: Exception) -> str:
        log.error("intake: error in a session: %s", type(error).__name__)
        return "421 4.3.0 Internal error; try again later"
