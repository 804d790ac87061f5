"""Pure delivery policy: retry schedule, bounce classification, DSN format."""

from __future__ import annotations

import email
import email.policy
import random

import pytest

from mailplane_relay.config import QueueSettings
from mailplane_relay.delivery import enhanced_code, format_reply, is_hard_bounce, next_retry_delay
from mailplane_relay.dsn import FailedRecipient, build_dsn, enhanced_status, original_headers


def test_default_schedule_doubles_from_a_minute_up_to_an_hour() -> None:
    settings = QueueSettings(retryJitter=0)
    rng = random.Random(1)
    delays = [next_retry_delay(n, settings, rng) for n in range(1, 10)]
    assert delays == [60, 120, 240, 480, 960, 1920, 3600, 3600, 3600]


def test_jitter_stays_within_its_band_and_varies() -> None:
    settings = QueueSettings(retryInitial=100, retryMax=100, retryJitter=0.2)
    rng = random.Random(7)
    delays = [next_retry_delay(3, settings, rng) for _ in range(500)]
    assert all(80 <= d <= 120 for d in delays)
    assert max(delays) - min(delays) > 30  # spread, not a constant


def test_huge_attempt_numbers_do_not_overflow() -> None:
    settings = QueueSettings(retryJitter=0, retryFactor=10)
    assert next_retry_delay(10_000, settings, random.Random(0)) == 3600


def test_attempt_zero_is_treated_as_the_first() -> None:
    settings = QueueSettings(retryInitial=5, retryJitter=0)
    assert next_retry_delay(0, settings, random.Random(0)) == 5


@pytest.mark.parametrize(("code", "text", "stage", "hard"), [
    (550, "5.1.1 No such user", "rcpt", True),
    (550, "5.1.10 null MX", "rcpt", True),
    (554, "5.2.1 Mailbox disabled", "rcpt", True),
    (550, "Requested action not taken: mailbox unavailable", "rcpt", True),
    (553, "sorry, that domain isn't in my list", "rcpt", False),
    (552, "5.2.2 Mailbox full", "rcpt", False),
    (550, "5.7.1 Rejected by policy", "rcpt", False),
    (550, "5.1.8 Bad sender address", "rcpt", False),
    (550, "5.1.1 No such user", "mail", False),
    (550, "5.1.1 No such user", "data", True),
    (451, "4.1.1 Try later", "rcpt", False),
    (550, "No such user", "data", False),
])
def test_hard_bounce_classification(code: int, text: str, stage: str, hard: bool) -> None:
    assert is_hard_bounce(code, text, stage) is hard  # type: ignore[arg-type]


def test_data_stage_reply_for_several_recipients_suppresses_nobody() -> None:
    assert not is_hard_bounce(550, "5.1.1 No such user", "data", recipients_in_transaction=2)


def test_enhanced_code_and_reply_format() -> None:
    assert enhanced_code("5.1.1 No such user") == "5.1.1"
    assert enhanced_code("No such user") is None
    assert enhanced_code("") is None
    line = format_reply(550, "5.1.1 first line\nsecond   line " + "x" * 400)
    assert line.startswith("550 5.1.1 first line second line ")
    assert "\n" not in line and len(line) == 300


def test_enhanced_status_for_dsn() -> None:
    assert enhanced_status("550 5.1.1 No such user", "bounced") == "5.1.1"
    assert enhanced_status("451 4.4.1 Connection refused", "expired") == "5.4.1"
    assert enhanced_status("451 try later", "expired") == "5.4.7"
    assert enhanced_status("550 nope", "bounced") == "5.0.0"
    assert enhanced_status(None, "bounced") == "5.0.0"


def test_dsn_is_rfc3464_with_original_headers_only() -> None:
    original = (b"From: a@example.com\r\nTo: b@example.net\r\nSubject: secret plans\r\n"
                b"Message-ID: <m1@example.com>\r\n\r\nTHE BODY MUST NOT LEAK\r\n")
    raw = build_dsn(
        reporting_mta="relay.example.com", original_sender="a@example.com",
        original_data=original, original_queue_id="Q1", arrival=1_790_000_000.0,
        now=1_790_000_100.0,
        recipients=[
            FailedRecipient("b@example.net", "bounced", "550 5.1.1 No such user",
                            "mx.example.net:25", 1_790_000_050.0),
            FailedRecipient("c@example.net", "expired", "451 4.4.1 Connection refused", None,
                            1_790_000_090.0),
        ],
    )
    assert b"THE BODY MUST NOT LEAK" not in raw
    assert b"\r\n" in raw and b"\n" not in raw.replace(b"\r\n", b"")
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "a@example.com"
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/delivery-status", "text/rfc822-headers"]
    status = parts[1].as_string()
    assert "Reporting-MTA: dns; relay.example.com" in status
    assert "Final-Recipient: rfc822; b@example.net" in status
    assert "Status: 5.1.1" in status and "Status: 5.4.1" in status
    assert "Remote-MTA: dns; mx.example.net" in status
    assert "Diagnostic-Code: smtp; 550 5.1.1 No such user" in status
    assert "Action: failed" in status
    assert "Subject: secret plans" in parts[2].get_content()


def test_original_headers_cut_at_blank_line_for_lf_and_crlf() -> None:
    assert original_headers(b"A: 1\r\nB: 2\r\n\r\nbody") == b"A: 1\r\nB: 2\r\n"
    assert original_headers(b"A: 1\nB: 2\n\nbody") == b"A: 1\nB: 2\n"
    assert original_headers(b"A: 1\r\n") == b"A: 1\r\n"


def test_a_reply_outside_ascii_is_logged_and_quoted_as_ascii() -> None:
    # aiosmtplib decodes a byte that is not UTF-8 as a lone surrogate; no UTF-8 encoder (the
    # message log, the DSN) takes one.
    line = format_reply(550, "5.1.1 caf\udcff \u00e9t\u00e9 \x1b[31m")
    assert line == "550 5.1.1 caf? ?t? ?[31m"
    line.encode("ascii")


def test_a_dsn_quotes_a_hostile_reply_in_ascii_and_keeps_the_field_order() -> None:
    raw = build_dsn(
        reporting_mta="relay.example.com", original_sender="a@example.com",
        original_data=b"Subject: x\r\n\r\nbody\r\n", original_queue_id="Q1",
        arrival=1_790_000_000.0, now=1_790_000_100.0,
        recipients=[FailedRecipient("b@example.net", "bounced", "550 5.1.1 caf\udcff \u00e9",
                                    "mx.example.net:25", 1_790_000_050.0)],
    )
    msg = email.message_from_bytes(raw, policy=email.policy.default)
    status = list(msg.iter_parts())[1]
    text = status.as_bytes()
    text.decode("ascii")  # RFC 3464: the status part is US-ASCII
    assert b"Diagnostic-Code: smtp; 550 5.1.1 caf? ?" in text
    # RFC 3464 section 2.2: extension fields come after Reporting-MTA and Arrival-Date.
    per_message = text.split(b"\r\n\r\n" if b"\r\n\r\n" in text else b"\n\n")[1]
    names = [line.split(b":")[0] for line in per_message.splitlines()]
    assert names == [b"Reporting-MTA", b"Arrival-Date", b"X-Mailplane-Queue-ID"]


def test_a_dsn_about_utf8_addresses_uses_the_global_forms_of_rfc6533() -> None:
    original = ("From: José <josé@example.com>\r\nTo: Zoë <zoë@exämple.net>\r\n"
                "Subject: olá\r\n\r\nTHE BODY MUST NOT LEAK\r\n").encode()
    raw = build_dsn(
        reporting_mta="relay.example.com", original_sender="josé@example.com",
        original_data=original, original_queue_id="Q1", arrival=1_790_000_000.0,
        now=1_790_000_100.0,
        recipients=[
            FailedRecipient("zoë@exämple.net", "bounced", "550 5.1.1 Boîte inconnue",
                            "mx.example.net:25", 1_790_000_050.0,
                            orcpt="utf-8;zo\\x{EB}@ex\\x{E4}mple.net"),
            FailedRecipient("plain@example.net", "bounced", "550 5.1.1 No such user",
                            "mx.example.net:25", 1_790_000_050.0),
        ],
    )
    assert b"THE BODY MUST NOT LEAK" not in raw
    # The notice is UTF-8 as a whole (RFC 6532 headers, 8bit parts): read as such.
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert msg["To"].addresses[0].addr_spec == "josé@example.com"
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "global-delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    # The status part: the per-message group, then one group per recipient (RFC 3464 §2.1),
    # UTF-8 throughout (RFC 6533 §6: the fields of message/global-delivery-status).
    assert parts[1]["Content-Transfer-Encoding"] == "8bit"
    # The email package reads a message/* part as an enclosed message: its header section is
    # the per-message group, its body the per-recipient groups.
    [per_message] = parts[1].get_payload()
    rest = per_message.get_payload()
    assert isinstance(rest, str)
    groups = [per_message] + [email.message_from_string(g, policy=email.policy.default)
                              for g in rest.replace("\r\n", "\n").strip().split("\n\n")]
    assert groups[0]["Reporting-MTA"] == "dns; relay.example.com"
    assert groups[1]["Final-Recipient"] == "utf-8; zoë@exämple.net"
    assert groups[1]["Original-Recipient"] == "utf-8; zoë@exämple.net"
    assert groups[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Boîte inconnue"
    assert groups[1]["Status"] == "5.1.1" and groups[1]["Action"] == "failed"
    # An ASCII address keeps its rfc822 type, even in a global notice.
    assert groups[2]["Final-Recipient"] == "rfc822; plain@example.net"
    [returned] = parts[2].get_payload()
    assert returned["Subject"] == "olá" and returned["To"].addresses[0].username == "zoë"


def test_a_dsn_with_only_a_utf8_header_section_is_global_too() -> None:
    raw = build_dsn(
        reporting_mta="relay.example.com", original_sender="a@example.com",
        original_data="Subject: olá\r\n\r\nbody\r\n".encode(), original_queue_id="Q1",
        arrival=1_790_000_000.0, now=1_790_000_100.0,
        recipients=[FailedRecipient("b@example.net", "bounced", "550 5.1.1 No such user",
                                    None, 1_790_000_050.0)],
    )
    msg = email.message_from_string(raw.decode("utf-8"), policy=email.policy.default)
    assert msg.get_param("report-type") == "global-delivery-status"
    assert [p.get_content_type() for p in msg.iter_parts()][1:] == [
        "message/global-delivery-status", "message/global-headers"]
