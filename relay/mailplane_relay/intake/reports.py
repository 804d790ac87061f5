"""Reading delivery status notifications (RFC 3464) and abuse feedback reports (RFC 5965).

Pure: bytes in, facts out. The report's original-message part is read in memory for its header
fields only; nothing of it is returned but the return paths it names.
"""

from __future__ import annotations

import email
import email.policy
from dataclasses import dataclass, field
from email.message import Message
from typing import Literal

ReportKind = Literal["dsn", "arf", "other"]


@dataclass(frozen=True, slots=True)
class FailedRecipient:
    address: str  # Final-Recipient (or Original-Recipient when that is all there is)
    status: str  # the RFC 3463 code, e.g. "5.1.1"
    diagnostic: str  # Diagnostic-Code without its type, "" when absent


@dataclass(slots=True)
class Report:
    kind: ReportKind
    # DSN: recipients whose Action is "failed" with a permanent (5.x.x) status.
    failed: list[FailedRecipient] = field(default_factory=list)
    # DSN: how many per-recipient blocks were not permanent failures (delayed, delivered...).
    other_actions: int = 0
    # ARF: the feedback type ("abuse", "fraud", ...), lower case.
    feedback_type: str = ""
    # ARF: Original-Rcpt-To fields (the complaining recipients).
    complainants: list[str] = field(default_factory=list)
    # Return paths the report names for the original message: ARF Original-Mail-From, the
    # Return-Path field of the returned headers.
    return_paths: list[str] = field(default_factory=list)
    # The original message's Message-ID, when returned.
    message_id: str | None = None


def _typed_address(value: str) -> str:
    """``rfc822; user@example.com`` -> ``user@example.com``; other address types -> ''."""
    kind, sep, rest = value.partition(";")
    if not sep:
        rest, kind = kind, "rfc822"
    if kind.strip().lower() not in ("rfc822", "utf-8"):
        return ""
    return _bare(rest)


def _bare(value: str) -> str:
    value = " ".join(value.split())
    if "<" in value and ">" in value:
        value = value[value.index("<") + 1:value.rindex(">")]
    value = value.strip()
    return value if "@" in value and " " not in value and len(value) <= 320 else ""


def _fields(text: str) -> list[list[tuple[str, str]]]:
    """Groups of ``Name: value`` fields separated by blank lines, unfolded (the body of a
    message/delivery-status or message/feedback-report part)."""
    groups: list[list[tuple[str, str]]] = []
    current: list[tuple[str, str]] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            if current:
                groups.append(current)
                current = []
            continue
        if line[:1] in (" ", "\t") and current:
            name, value = current[-1]
            current[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if sep and name.strip() and " " not in name.strip():
            current.append((name.strip().lower(), value.strip()))
    if current:
        groups.append(current)
    return groups


def _raw_text(part: Message) -> str:
    """The undecoded body of a part as text (message/* parts are not parsed further)."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # message/* parts the email package parsed: back to text.
        return "\n\n".join(p.as_string() for p in payload if isinstance(p, Message))
    if isinstance(payload, str):
        raw = part.get_payload(decode=True)
        if isinstance(raw, bytes):
            return raw.decode("utf-8", "replace")
        return payload
    return ""


def _original_headers(part: Message) -> Message | None:
    """The header fields of a returned original (message/rfc822 or text/rfc822-headers)."""
    ctype = part.get_content_type()
    if ctype in ("message/rfc822", "message/global"):
        payload = part.get_payload()
        if isinstance(payload, list) and payload and isinstance(payload[0], Message):
            return payload[0]
        return None
    if ctype in ("text/rfc822-headers", "message/global-headers"):
        text = _raw_text(part)
        return email.message_from_string(text.split("\n\n", 1)[0] + "\n\n",
                                         policy=email.policy.compat32)
    return None


def parse(data: bytes) -> Report:
    """What a report says. Anything that is not a multipart/report of a known type is
    ``other``."""
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    if msg.get_content_type() != "multipart/report":
        return Report("other")
    report_type = (msg.get_param("report-type") or "")
    report_type = report_type.lower() if isinstance(report_type, str) else ""
    parts = msg.get_payload()
    if not isinstance(parts, list):
        return Report("other")
    if report_type == "delivery-status":
        report = Report("dsn")
    elif report_type == "feedback-report":
        report = Report("arf")
    else:
        return Report("other")
    for part in parts:
        if not isinstance(part, Message):
            continue
        ctype = part.get_content_type()
        if report.kind == "dsn" and ctype in ("message/delivery-status",
                                              "message/global-delivery-status"):
            _read_dsn(_raw_text(part), report)
        elif report.kind == "arf" and ctype == "message/feedback-report":
            _read_arf(_raw_text(part), report)
        else:
            original = _original_headers(part)
            if original is not None:
                for rp in original.get_all("Return-Path", []):
                    address = _bare(str(rp))
                    if address:
                        report.return_paths.append(address)
                mid = original.get("Message-ID")
                if mid:
                    report.message_id = " ".join(str(mid).split())[:250]
    return report


def _read_dsn(text: str, report: Report) -> None:
    groups = _fields(text)
    # The first group is about the message; the others, one per recipient (RFC 3464 §2.1).
    for group in groups[1:]:
        values: dict[str, str] = {}
        for name, value in group:
            values.setdefault(name, value)
        address = _typed_address(values.get("final-recipient", "")) or _typed_address(
            values.get("original-recipient", ""))
        action = values.get("action", "").split("(")[0].strip().lower()
        status = values.get("status", "").split()[0] if values.get("status") else ""
        if not address:
            continue
        if action == "failed" and status.startswith("5."):
            diagnostic = values.get("diagnostic-code", "")
            _, _, diagnostic = diagnostic.partition(";")
            report.failed.append(FailedRecipient(address, status, diagnostic.strip()[:200]))
        else:
            report.other_actions += 1


def _read_arf(text: str, report: Report) -> None:
    for group in _fields(text):
        for name, value in group:
            if name == "feedback-type" and not report.feedback_type:
                report.feedback_type = value.split()[0].lower() if value.split() else ""
            elif name == "original-rcpt-to":
                address = _bare(value)
                if address:
                    report.complainants.append(address)
            elif name == "original-mail-from":
                address = _bare(value)
                if address:
                    report.return_paths.append(address)
