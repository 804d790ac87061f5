"""One record of the message log: metadata of a state change, never a body or a subject."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Status = Literal[
    "received", "delivered", "deferred", "bounced", "expired", "suppressed", "rejected"
]
STATUSES: tuple[Status, ...] = (
    "received", "delivered", "deferred", "bounced", "expired", "suppressed", "rejected"
)


@dataclass(frozen=True, slots=True)
class LogEvent:
    ts: float
    status: Status
    queue_id: str | None
    message_id: str | None
    credential: str | None
    sender: str
    recipient: str | None
    response: str | None
    size: int | None
    attempt: int | None = None
    # The delivery peer (MX or smarthost) of a delivery attempt; never the submitting client.
    remote: str | None = None
    # The tenant: namespace of the credential's SmtpCredential; filled in by the message log
    # from the configuration when left None.
    namespace: str | None = None
