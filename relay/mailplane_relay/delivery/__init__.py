"""Delivery: from the spool to a smarthost or the recipients' MX hosts.

Read it one part at a time:

- :mod:`.queue` — the :class:`DeliveryQueue` the relay uses (``submit``, ``start``, ``stop``,
  ``reconfigure``): the scheduled stage (messages by next attempt), routing, the ready queues
  per destination and the fair dispatcher that serves them;
- :mod:`.destinations` — one destination's state: ready queue, pooled connections, shaping
  limits, slow start, delivery rate, suspension and probing;
- :mod:`.smtp` — one SMTP session: opening it and running a transaction, with the RFC 5321
  timeouts;
- :mod:`.policy` — the rules that decide an outcome: reply classification, hard bounces and
  suppression, throttling, MX fallback, DNS answers, the retry schedule;
- :mod:`.outcomes` — recording an attempt: message log, metrics, suppression, spool, DSN.

Semantics are at-least-once: state reaches the spool after each attempt, and a crash between a
delivery and that write repeats the delivery. See docs/relay-delivery.md.
"""

from .policy import (
    RecipientOutcome,
    enhanced_code,
    format_reply,
    is_hard_bounce,
    next_retry_delay,
    suppress_at_once,
)
from .queue import DeliveryQueue

__all__ = [
    "DeliveryQueue",
    "RecipientOutcome",
    "enhanced_code",
    "format_reply",
    "is_hard_bounce",
    "next_retry_delay",
    "suppress_at_once",
]
