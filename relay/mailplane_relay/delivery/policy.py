"""The rules that decide an outcome, in one place: what a reply or a failure means for a
recipient (delivered, deferred, bounced), whether a bounce proves the address is bad (so it is
suppressed), whether a failure says the destination as a whole is refusing or throttling us
(so it is suspended), whether a failure lets the recipients move on to the next MX host, and
when to try again. Everything here is pure: no I/O, no clock, no state."""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass
from typing import Literal

from ..config import QueueSettings

MAX_RESPONSE_CHARS = 300
_NOT_PRINTABLE = re.compile(r"[^ -~]")

Outcome = Literal["delivered", "deferred", "bounced", "suppressed"]
Stage = Literal["connect", "greeting", "ehlo", "mail", "rcpt", "data"]
# Why a destination is suspended (a metric label: a closed set).
SuspendReason = Literal["connect", "throttled"]


@dataclass(slots=True)
class RecipientOutcome:
    status: Outcome
    response: str
    remote: str | None = None
    hard: bool = False  # a bounce that proves the address does not exist (suppress it)
    tls: bool = False
    # A deferral caused by a suspended destination: no retry before this time (epoch seconds).
    not_before: float | None = None
    # Delivered to a server that offers DSN (RFC 3461), with the sender's DSN request passed
    # on: that server sends any success notice, not the relay.
    dsn_passed: bool = False
    # Returned by the relay administrator (`mailplane queue bounce`), not refused by a
    # receiver: it says nothing of the sender's list, so it does not count toward the
    # credential's bounce rate (which pauses senders).
    administrative: bool = False


# ------------------------------------------------------------------------------ retry schedule


def next_retry_delay(attempt: int, settings: QueueSettings, rng: random.Random) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1 for the first):
    ``min(retryInitial * retryFactor**(attempt-1), retryMax)``, times a random factor in
    ``[1 - retryJitter, 1 + retryJitter]`` so that messages deferred together spread out.
    The same schedule spaces the probes of a suspended destination (``attempt`` is then the
    number of failed probes in a row)."""
    exponent = max(attempt, 1) - 1
    try:
        base = settings.retry_initial * settings.retry_factor ** exponent
    except OverflowError:
        base = math.inf
    base = min(base, settings.retry_max)
    jitter = settings.retry_jitter
    return base * rng.uniform(1.0 - jitter, 1.0 + jitter)


# ------------------------------------------------------------------------------ replies


def enhanced_code(text: str) -> str | None:
    """``5.1.1`` from ``5.1.1 No such user``, or None."""
    first = text.split(None, 1)[0] if text.strip() else ""
    parts = first.split(".")
    if len(parts) == 3 and parts[0] in ("2", "4", "5") and all(p.isdigit() for p in parts):
        return first
    return None


def format_reply(code: int, text: str) -> str:
    """One line of printable ASCII, truncated: the message log stores replies, never anything
    longer, and a DSN quotes them in its ASCII-only status part (RFC 3464). A byte a server
    sent outside ASCII (its client decodes it as a lone surrogate, which no UTF-8 encoder
    takes) becomes ``?``."""
    line = " ".join(f"{code} {text}".split())[:MAX_RESPONSE_CHARS]
    return line if line.isascii() and line.isprintable() else _NOT_PRINTABLE.sub("?", line)


# 5.1.7 and 5.1.8 are about the sender's address, not the recipient's.
_SENDER_CODES = ("5.1.7", "5.1.8")
# Codes that say the mailbox itself does not exist or is gone: one such answer is certain.
# 5.1.0 (other address status), 5.1.1 (no such mailbox), 5.1.3 (bad mailbox syntax),
# 5.1.6 (mailbox moved, no forwarding), 5.2.1 (mailbox disabled). 5.1.2 and 5.1.10 speak of
# the domain (a DNS answer that may change), never of the mailbox.
_USER_UNKNOWN = ("5.1.0", "5.1.1", "5.1.3", "5.1.6", "5.2.1")


def is_hard_bounce(code: int, text: str, stage: Stage, *, recipients_in_transaction: int = 1
                   ) -> bool:
    """Whether a 5xx is about the recipient's mailbox (a "hard bounce"): 5.1.x except the
    sender codes, 5.2.1, and a bare 550 at RCPT. Policy (5.7.x), full mailbox (5.2.2), size
    (5.3.4) and other 5xx bounce the message only. Replies before RCPT are about the session or
    the sender; replies at DATA count only when the transaction had a single recipient."""
    if code < 500 or stage in ("connect", "greeting", "ehlo", "mail"):
        return False
    if stage == "data" and recipients_in_transaction != 1:
        return False
    enhanced = enhanced_code(text)
    if enhanced is None:
        return stage == "rcpt" and code == 550
    if enhanced in _SENDER_CODES:
        return False
    return enhanced.startswith("5.1.") or enhanced == "5.2.1"


def suppress_at_once(response: str) -> bool:
    """Whether one hard bounce is enough to suppress the address: the reply's enhanced code
    says the mailbox does not exist (user unknown and kin). Other hard bounces (a bare 550,
    5.1.2, 5.1.10, ...) suppress only when repeated (see :data:`REPEATED_HARD_BOUNCES`)."""
    parts = response.split(None, 2)
    return len(parts) > 1 and parts[1] in _USER_UNKNOWN


# Hard bounces without a user-unknown code that suppress an address, within the window below.
REPEATED_HARD_BOUNCES = 2
REPEATED_HARD_BOUNCE_WINDOW = 30 * 86400.0


def reply_outcome(code: int, text: str, stage: Stage, remote: str, tls: bool, *,
                  recipients_in_transaction: int = 1) -> RecipientOutcome:
    response = format_reply(code, text)
    if 200 <= code < 300:
        return RecipientOutcome("delivered", response, remote, tls=tls)
    if code >= 500:
        hard = is_hard_bounce(code, text, stage,
                              recipients_in_transaction=recipients_in_transaction)
        return RecipientOutcome("bounced", response, remote, hard=hard, tls=tls)
    return RecipientOutcome("deferred", response, remote, tls=tls)


def throttling(code: int, text: str, stage: Stage) -> bool:
    """Whether a reply says the destination is refusing or rate-limiting this relay as a whole
    (so the destination is suspended rather than hammered): 421 at any step (the server is
    closing the session), or a 4.7.x deferral before any recipient was named. A 4.7.x at RCPT
    (greylisting) concerns one recipient and does not count."""
    if code == 421:
        return True
    return (400 <= code < 500 and stage in ("greeting", "ehlo", "mail")
            and (enhanced_code(text) or "").startswith("4.7."))


def moves_to_next_mx(code: int | None, stage: Stage) -> bool:
    """Whether undecided recipients try the next MX host in the same attempt (as Postfix
    does): after a connection failure or a dropped connection (``code`` None) before the end
    of data, or a 4xx at the greeting, EHLO or MAIL. A 4xx at RCPT or after the data is that
    server's answer about the recipient or the message, and stands."""
    if code is None:
        return stage != "data"
    return 400 <= code < 500 and stage in ("connect", "greeting", "ehlo", "mail")


def dns_outcome(reply: str, *, permanent: bool) -> RecipientOutcome:
    """A DNS answer about a recipient domain. Only a null MX (RFC 7505, the domain says it takes
    no mail) bounces at once; a domain that does not resolve (NXDOMAIN, no address) follows the
    retry policy like any temporary failure, because one DNS answer is often wrong (a lapsed
    registration, a broken zone) and is fixed within the queue lifetime. Neither suppresses the
    address."""
    if permanent and reply.startswith("556"):
        return RecipientOutcome("bounced", reply)
    if permanent:
        return RecipientOutcome("deferred", "451 4" + reply[5:] if reply[:5] in (
            "550 5", "554 5") else reply)
    return RecipientOutcome("deferred", reply)
