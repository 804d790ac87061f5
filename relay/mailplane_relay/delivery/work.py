"""What moves through the queues: an :class:`Attempt` is one try of one message (every pending
recipient); it is split into :class:`Work` items, one per destination (in MX mode, per recipient
domain), each waiting in its destination's ready queue for a connection. When the last work
item of an attempt is done, the attempt's outcomes are recorded together."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from ..config import RelayConfig
from ..spool import QueuedMessage, Recipient
from .policy import RecipientOutcome
from .smtp import Target


@dataclass(eq=False)
class Attempt:
    msg: QueuedMessage
    cfg: RelayConfig
    outcomes: dict[str, RecipientOutcome] = field(default_factory=dict)
    outstanding: int = 0  # work items not done yet
    # The message as committed, when the queue kept it from the commit (a first attempt):
    # taken instead of reading the spool.
    committed: bytes | None = None
    # The message as it goes on the wire (read from the spool and DKIM-signed once, by the
    # first work item that gets a connection slot).
    data: asyncio.Future[bytes | None] | None = None
    # The message converted to 7 bits and signed, for servers without 8BITMIME; b"" when it
    # cannot be converted.
    seven_bit: bytes | None = None
    # Flushed by an administrator (`mailplane queue flush`): a suspended destination takes it
    # as its probe instead of deferring it.
    flushed: bool = False
    # The spool found the message's data torn (SpoolDataLost): every undecided recipient
    # fails at the end of the attempt.
    lost: bool = False


@dataclass(eq=False)
class Work:
    attempt: Attempt
    recipients: list[Recipient]
    targets: list[Target]
    domain: str | None  # the recipient domain (MX mode), None for the smarthost
