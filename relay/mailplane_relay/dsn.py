"""Delivery status notifications (RFC 3464): ``multipart/report; report-type=delivery-status``.

A DSN carries the original message's header section only, never its body: the relay promises
that message content is processed solely for delivery, and a bounce is not a delivery.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

# Header sections larger than this are cut (RFC 3462 allows any subset of the headers).
MAX_ORIGINAL_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str
    status: str  # "bounced" | "expired" | "suppressed"
    response: str | None  # the last SMTP reply (or our own), e.g. "550 5.1.1 No such user"
    remote: str | None  # host:port that answered, if any
    last_attempt: float


def enhanced_status(response: str | None, status: str) -> str:
    """The RFC 3463 code for the Status field: from the reply when it has one."""
    if response:
        parts = response.split()
        if len(parts) > 1:
            code = parts[1]
            pieces = code.split(".")
            if len(pieces) == 3 and pieces[0] in ("2", "4", "5") and all(
                    p.isdigit() for p in pieces):
                # An expired recipient failed permanently, whatever its last 4xx said.
                return "5" + code[1:] if status == "expired" else code
        if parts and parts[0][:1] == "5":
            return "5.0.0"
    # Action: failed always carries a permanent (5.x.x) status.
    return "5.4.7" if status == "expired" else "5.0.0"


def original_headers(data: bytes) -> bytes:
    """The header section of a message (through the blank line), without any body byte."""
    end = data.find(b"\r\n\r\n")
    if end < 0:
        lf_end = data.find(b"\n\n")
        head = data if lf_end < 0 else data[:lf_end + 1]
    else:
        head = data[:end + 2]
    if len(head) > MAX_ORIGINAL_HEADERS:
        cut = head.rfind(b"\n", 0, MAX_ORIGINAL_HEADERS)
        head = head[:cut + 1] if cut > 0 else b""
    return head


_WHY = {
    "bounced": "rejected by the receiving server",
    "expired": "delivery attempts expired",
    "suppressed": "not sent: the address is on the suppression list (earlier hard bounce or "
                  "complaint)",
}


def _header_safe(value: str) -> str:
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _fold_field(name: str, value: str) -> str:
    return f"{name}: {_header_safe(value)}"


def build_dsn(*, reporting_mta: str, original_sender: str, original_data: bytes,
              original_queue_id: str, arrival: float, recipients: list[FailedRecipient],
              now: float) -> bytes:
    """The DSN message (CRLF line ends), to be sent from the null sender to
    ``original_sender``."""
    boundary = f"=_mailplane_{secrets.token_hex(12)}"
    expired_only = all(r.status == "expired" for r in recipients)
    subject = ("Delivery expired: message not delivered" if expired_only
               else "Undelivered Mail Returned to Sender")
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <{original_queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at {reporting_mta}.",
        "",
        "Your message could not be delivered to the following recipients.",
        "Only the message headers are returned below; the body is not kept.",
        "",
    ]
    for r in recipients:
        why = _WHY.get(r.status, "rejected")
        lines.append(f"<{r.address}>: {why}: {_header_safe(r.response or 'no response')}")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        _fold_field("Reporting-MTA", f"dns; {reporting_mta}"),
        _fold_field("X-Mailplane-Queue-ID", original_queue_id),
        _fold_field("Arrival-Date", format_datetime(datetime.fromtimestamp(arrival, UTC))),
    ]
    for r in recipients:
        lines += [
            "",
            _fold_field("Final-Recipient", f"rfc822; {r.address}"),
            "Action: failed",
            _fold_field("Status", enhanced_status(r.response, r.status)),
        ]
        if r.remote:
            lines.append(_fold_field("Remote-MTA", f"dns; {r.remote.rsplit(':', 1)[0]}"))
        if r.response:
            lines.append(_fold_field("Diagnostic-Code", f"smtp; {r.response}"))
        lines.append(_fold_field(
            "Last-Attempt-Date", format_datetime(datetime.fromtimestamp(r.last_attempt, UTC))))
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    text = "\r\n".join(lines).encode("utf-8") + b"\r\n"
    headers = original_headers(original_data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return text + headers + f"\r\n--{boundary}--\r\n".encode()
