"""Delivery status notifications (RFC 3464): ``multipart/report; report-type=delivery-status``.

Three kinds, by the ``Action`` of each recipient: ``failed`` (bounced, expired, suppressed, or
returned by the administrator), ``delayed`` (a warning: still queued and retried) and
``relayed`` (a success notice the sender asked for with ``NOTIFY=SUCCESS``, sent when the next
hop does not take the DSN request over). The ENVID and ORCPT given at submission (RFC 3461) are
returned as ``Original-Envelope-Id`` and ``Original-Recipient``.

A notice about a message with UTF-8 addresses (the sender's, a recipient's or an ORCPT) or a
UTF-8 header section (RFC 6531/6532 mail) is internationalised as RFC 6533 asks:
``report-type=global-delivery-status``, a ``message/global-delivery-status`` part whose UTF-8
addresses are of type ``utf-8`` (``Final-Recipient: utf-8; josé@example.net``), and the
original header section as ``message/global-headers``. Other notices keep the ASCII forms of
RFC 3464 (``message/delivery-status``, ``text/rfc822-headers``).

A DSN carries the original message's header section only, never its body, whatever ``RET``
asked: the relay promises that message content is processed solely for delivery, and a notice
is not a delivery. ``RET=FULL`` is therefore honoured as headers only.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import format_datetime, formatdate

_NOT_ASCII = re.compile(r"[^ -~]")

# Header sections larger than this are cut (RFC 3462 allows any subset of the headers).
MAX_ORIGINAL_HEADERS = 64 * 1024


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    """One recipient reported in a DSN (failed, delayed or relayed, by ``status``)."""

    address: str
    # "bounced" | "expired" | "suppressed" (Action: failed), "pending" (delayed), "delivered"
    # (relayed)
    status: str
    response: str | None  # the last SMTP reply (or our own), e.g. "550 5.1.1 No such user"
    remote: str | None  # host:port that answered, if any
    last_attempt: float
    orcpt: str | None = None  # RFC 3461 ORCPT as given: "rfc822;<address>"
    retry_until: float | None = None  # delayed: when the relay gives up


def xtext_encode(value: str) -> str:
    """The xtext form of printable ASCII (RFC 3461 §4), to pass ENVID and ORCPT on."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}" for c in value)


def action_of(status: str) -> str:
    return {"delivered": "relayed", "pending": "delayed"}.get(status, "failed")


def enhanced_status(response: str | None, status: str) -> str:
    """The RFC 3463 code for the Status field: from the reply when it has one, in the class
    of the action (2 relayed, 4 delayed, 5 failed)."""
    want = {"relayed": "2", "delayed": "4"}.get(action_of(status), "5")
    if response:
        parts = response.split()
        if len(parts) > 1:
            code = parts[1]
            pieces = code.split(".")
            if len(pieces) == 3 and pieces[0] in ("2", "4", "5") and all(
                    p.isdigit() for p in pieces):
                # An expired recipient failed permanently, whatever its last 4xx said.
                return want + code[1:] if status == "expired" or want != "5" else code
        if want == "5" and parts and parts[0][:1] == "5":
            return "5.0.0"
    if want != "5":
        return f"{want}.0.0"
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
    "pending": "not delivered yet, still trying",
    "delivered": "relayed to the next server, which does not send delivery notices",
}

_LOST = ("The relay lost this message: its stored copy was damaged by a crash before it "
         "could be delivered, so neither its body nor its headers can be returned. It was not "
         "delivered to these recipients; please send it again.")
_LOST_WHY = "not delivered: the relay lost the message"

_INTRO = {
    "failed": "Your message could not be delivered to the following recipients.",
    "delayed": "Your message has not been delivered yet to the following recipients. This is "
               "a warning only: the relay keeps trying, you do not need to send it again.",
    "relayed": "Your message was relayed to the following recipients' servers, as you asked. "
               "They do not send delivery notices, so this is the last notice you get.",
}

_SUBJECT = {
    "failed": "Undelivered Mail Returned to Sender",
    "delayed": "Delayed Mail (still being retried)",
    "relayed": "Successful Mail Relay Report",
}


def _header_safe(value: str) -> str:
    return " ".join(value.replace("\r", " ").replace("\n", " ").split())


def _ascii(value: str) -> str:
    """A server's reply as the status part may carry it (RFC 3464: US-ASCII): one line, any
    other character ``?``."""
    return _NOT_ASCII.sub("?", _header_safe(value))


_EMBEDDED_UNICODE = re.compile(r"\\x\{([0-9A-Fa-f]{1,6})\}")


def _unicode_escapes(value: str) -> str:
    """``\\x{E9}`` -> ``é``: an ORCPT of type utf-8 arrives in utf-8-addr-xtext (RFC 6533
    §3), whose embedded-unicode escapes the global status part writes as the characters."""
    def char(m: re.Match[str]) -> str:
        code = int(m.group(1), 16)
        return chr(code) if 0x80 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF else "?"
    return _EMBEDDED_UNICODE.sub(char, value)


def is_global(original_sender: str, recipients: list[FailedRecipient], headers: bytes) -> bool:
    """Does the notice need the internationalised forms of RFC 6533? (UTF-8 in an address the
    status part names, in the sender's address, or in the returned header section.)"""
    return not (original_sender.isascii() and headers.isascii() and all(
        r.address.isascii() and (r.orcpt is None or (r.orcpt.isascii() and not (
            r.orcpt.lower().startswith("utf-8;"))))
        for r in recipients))


def _address_field(address: str, global_: bool) -> str:
    """The address-type and address of Final-Recipient: ``utf-8`` (RFC 6533) for a UTF-8
    address in a global notice, ``rfc822`` otherwise."""
    return f"utf-8; {address}" if global_ and not address.isascii() else f"rfc822; {address}"


def _fold_field(name: str, value: str) -> str:
    return f"{name}: {_header_safe(value)}"


def _date(ts: float) -> str:
    return format_datetime(datetime.fromtimestamp(ts, UTC))


def build_dsn(*, reporting_mta: str, original_sender: str, original_data: bytes,
              original_queue_id: str, arrival: float, recipients: list[FailedRecipient],
              now: float, envid: str | None = None, original_lost: bool = False) -> bytes:
    """The DSN message (CRLF line ends), to be sent from the null sender to
    ``original_sender``. Recipients of one DSN share one action (the caller groups them).
    ``original_lost``: the relay lost the message's data (its spooled copy was torn by a
    crash): the notice says so and has no header part."""
    boundary = f"=_mailplane_{secrets.token_hex(12)}"
    headers = original_headers(original_data).replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    global_ = is_global(original_sender, recipients, headers)
    report_type = "global-delivery-status" if global_ else "delivery-status"
    # A server's reply is ASCII in an RFC 3464 status part; the global one carries UTF-8.
    reply_text = _header_safe if global_ else _ascii
    actions = {action_of(r.status) for r in recipients}
    action = actions.pop() if len(actions) == 1 else "failed"
    expired_only = all(r.status == "expired" for r in recipients)
    subject = ("Delivery expired: message not delivered" if expired_only
               else _SUBJECT[action])
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{reporting_mta}>",
        f"To: <{original_sender}>",
        f"Subject: {subject}",
        f"Date: {formatdate(now, localtime=False)}",
        f"Message-ID: <{original_queue_id}.{secrets.token_hex(6)}.dsn@{reporting_mta}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type={report_type}; boundary="{boundary}"',
        "",
        "This is a MIME-encapsulated delivery status notification.",
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        f"This is the mail system at {reporting_mta}.",
        "",
        _INTRO[action],
        _LOST if original_lost else
        "Only the message headers are returned below; the body is not kept.",
        "",
    ]
    for r in recipients:
        why = _LOST_WHY if original_lost else _WHY.get(r.status, "rejected")
        lines.append(f"<{r.address}>: {why}: {_ascii(r.response or 'no response')}")
    lines += [
        "",
        f"--{boundary}",
        f"Content-Type: message/{report_type}",
    ]
    if global_:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    if envid is not None:
        lines.append(_fold_field("Original-Envelope-Id", envid))
    lines += [
        _fold_field("Reporting-MTA", f"dns; {reporting_mta}"),
        _fold_field("Arrival-Date", _date(arrival)),
        # An extension field: after the fields RFC 3464 section 2.2 names, in its order.
        _fold_field("X-Mailplane-Queue-ID", original_queue_id),
    ]
    for r in recipients:
        lines.append("")
        if r.orcpt:
            addr_type, _, address = r.orcpt.partition(";")
            if global_ and addr_type.lower() == "utf-8":
                address = _unicode_escapes(address)
            lines.append(_fold_field("Original-Recipient", f"{addr_type}; {address}"))
        lines += [
            _fold_field("Final-Recipient", _address_field(r.address, global_)),
            f"Action: {action_of(r.status)}",
            _fold_field("Status", enhanced_status(r.response, r.status)),
        ]
        if r.remote:
            lines.append(_fold_field("Remote-MTA", f"dns; {_ascii(r.remote.rsplit(':', 1)[0])}"))
        if r.response:
            lines.append(_fold_field("Diagnostic-Code", f"smtp; {reply_text(r.response)}"))
        lines.append(_fold_field("Last-Attempt-Date", _date(r.last_attempt)))
        if r.retry_until is not None:
            lines.append(_fold_field("Will-Retry-Until", _date(r.retry_until)))
    if original_lost:
        # No header part (RFC 3464 makes it optional): there is nothing left to return.
        lines += ["", f"--{boundary}--", ""]
        return "\r\n".join(lines).encode("utf-8", "replace")
    lines += [
        "",
        f"--{boundary}",
        "Content-Type: message/global-headers" if global_ else "Content-Type: text/rfc822-headers",
    ]
    if global_:
        lines.append("Content-Transfer-Encoding: 8bit")
    lines.append("")
    # "replace": a lone surrogate (an undecodable byte a peer sent) must not stop the notice.
    text = "\r\n".join(lines).encode("utf-8", "replace") + b"\r\n"
    return text + headers + f"\r\n--{boundary}--\r\n".encode()
