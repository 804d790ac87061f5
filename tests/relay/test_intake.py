"""The bounce and complaint intake, end to end: the real relay process delivers to a sink with
a VERP return path; swaks sends a DSN and an ARF report back to the intake listener; the
address is suppressed and the credential's counters move. Forged, misaddressed and oversized
reports are refused or dropped."""

from __future__ import annotations

import asyncio
import re
import shutil
import socket
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.helpers.pki import write_ca_file
from tests.helpers.relayproc import RelayProcess, relay_command
from tests.helpers.sink import Sink
from tests.relay.test_app_lifecycle import client, eventually, message
from tests.relay.test_intake_reports import fill


@pytest.fixture(autouse=True)
def _swaks_installed() -> None:
    # A missing tool is a failure, not a skip: a skip would hide the intake's tests.
    assert shutil.which("swaks"), "swaks is not installed: run scripts/bootstrap"

DOMAIN = "bounces.example.com"
VERP = re.compile(r"^bounces\+[0-9a-z]{20}[rm][0-9a-z]{10}@bounces\.example\.com$")


def intake_relay(factory: Callable[..., RelayProcess], sink: Sink, tmp_path: Path,
                 intake: dict[str, Any] | None = None, **abuse: Any) -> RelayProcess:
    key = tmp_path / "verp-key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    extra: dict[str, Any] = {"intake": {"domain": DOMAIN, "keyFile": str(key),
                                        "address": "127.0.0.1", "port": 0,
                                        "maxMessageSize": 8192, **(intake or {})}}
    if abuse:
        extra["abuse"] = abuse
    relay = factory(smarthost_port=sink.port, extra=extra)
    return relay


def swaks(relay: RelayProcess, to: str, data: bytes | None = None, *, tls: bool = False,
          sender: str = "<>") -> subprocess.CompletedProcess[str]:
    port = relay.intake_port
    args = ["swaks", "--server", "127.0.0.1", "--port", str(port), "--to", to,
            "--from", sender, "--helo", "mx.receiver.test", "--timeout", "10"]
    if data is not None:
        args += ["--data", "-"]
    if tls:
        ca = write_ca_file(relay.ca, relay.tls_dir)
        args += ["--tls", "--tls-verify", "--tls-ca-path", str(ca),
                 "--tls-sni", "relay.test", "--quit-after", "EHLO"]
    return subprocess.run(args, input=(data or b"").decode(), capture_output=True, text=True,
                          timeout=30)


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def suppression(relay: RelayProcess) -> str:
    r = subprocess.run([*relay_command()[:-1], "suppression", "list", "--config",
                        str(relay.config_dir)], capture_output=True, text=True, timeout=30)
    return r.stdout


async def deliver(relay: RelayProcess, sink: Sink, n: int) -> list[str]:
    smtp = await client(relay)
    for i in range(1, n + 1):
        await smtp.send_message(message(i))
    await smtp.quit()
    got = await sink.wait_for_messages(n)
    await eventually(lambda: relay.metric("mailplane_relay_recipients_total",
                                          outcome="delivered") == n, "the deliveries")
    return [m.mail_from for m in got]


async def test_a_dsn_for_a_delivered_message_suppresses_the_address_and_counts_a_bounce(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    sink: Sink = await smtp_sink()
    relay = intake_relay(relay_factory, sink, tmp_path)
    await asyncio.to_thread(relay.start)
    (return_path,) = await deliver(relay, sink, 1)
    assert VERP.match(return_path), return_path
    delivered = sink.messages[0].data
    assert b"Return-Path" not in delivered.split(b"\r\n\r\n")[0]

    # A forged tag: counted and dropped.
    tag = return_path.split("@")[0][-10:]
    forged = return_path.replace(tag, "".join("0" if c != "0" else "1" for c in tag))
    dsn = fill("postfix-dsn.eml", RETURN_PATH=forged, RECIPIENT="user1@dest.test",
               LOCAL="user1")
    r = await asyncio.to_thread(swaks, relay, forged, dsn)
    assert "250 2.0.0" in r.stdout, r.stdout
    await eventually(lambda: relay.metric("mailplane_relay_intake_reports_total",
                                          kind="dsn", result="forged") == 1, "forged counted")
    # The right token for another address: forged too.
    other = fill("postfix-dsn.eml", RETURN_PATH=return_path, RECIPIENT="ceo@dest.test",
                 LOCAL="ceo")
    await asyncio.to_thread(swaks, relay, return_path, other)
    await eventually(lambda: relay.metric("mailplane_relay_intake_reports_total",
                                          kind="dsn", result="forged") == 2, "forged counted")
    assert "dest.test" not in await asyncio.to_thread(suppression, relay)

    # The real one, to the return path (the address case changed on the way, as some
    # receivers do).
    dsn = fill("postfix-dsn.eml", RETURN_PATH=return_path, RECIPIENT="user1@dest.test",
               LOCAL="user1")
    r = await asyncio.to_thread(swaks, relay, return_path.upper(), dsn)
    assert "250 2.0.0" in r.stdout, r.stdout
    await eventually(lambda: relay.metric("mailplane_relay_async_bounces_total",
                                          sender_domain="example.com", credential="app") == 1,
                     "the bounce counted against example.com / app")
    assert relay.metric("mailplane_relay_intake_reports_total", kind="dsn",
                        result="matched") == 1
    listed = await asyncio.to_thread(suppression, relay)
    assert "user1@dest.test" in listed and "5.1.1" in listed
    assert "ceo@dest.test" not in listed
    # The next message to the address is not sent.
    smtp = await client(relay)
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused, match="on the suppression list"):
        await smtp.sendmail("app@example.com", ["user1@dest.test"], b"Subject: x\r\n\r\nx")
    await smtp.quit()
    # Bodies never reach the log or the process output.
    assert "body number" not in relay.log()


async def test_each_recipient_gets_its_own_transaction_and_return_path(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    """A recipient of a message must not hold a return path that reports about another: with
    the intake, recipients that would share a transaction get one each."""
    sink: Sink = await smtp_sink()
    relay = intake_relay(relay_factory, sink, tmp_path)
    await asyncio.to_thread(relay.start)
    smtp = await client(relay)
    msg = message(1)
    del msg["To"]
    msg["To"] = "victim@dest.test, attacker@dest.test"
    await smtp.send_message(msg)
    await smtp.quit()
    got = await sink.wait_for_messages(2)
    assert sorted(len(m.rcpt_tos) for m in got) == [1, 1]
    paths = {m.rcpt_tos[0]: m.mail_from for m in got}
    assert all(VERP.match(p) and p.split("@")[0][-11] == "r" for p in paths.values())
    assert paths["victim@dest.test"] != paths["attacker@dest.test"]
    # The attacker's return path does not carry a report about the victim.
    forged = fill("postfix-dsn.eml", RETURN_PATH=paths["attacker@dest.test"],
                  RECIPIENT="victim@dest.test", LOCAL="victim")
    await asyncio.to_thread(swaks, relay, paths["attacker@dest.test"], forged)
    await eventually(lambda: relay.metric("mailplane_relay_intake_reports_total",
                                          kind="dsn", result="forged") == 1, "forged counted")
    assert "victim@dest.test" not in await asyncio.to_thread(suppression, relay)


async def test_an_arf_complaint_suppresses_counts_and_pauses_the_credential(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    sink: Sink = await smtp_sink()
    relay = intake_relay(relay_factory, sink, tmp_path, minRecipients=3, complaintRate=0.4)
    await asyncio.to_thread(relay.start)
    paths = await deliver(relay, sink, 3)
    sent = {m.rcpt_tos[0]: m.mail_from for m in sink.messages}
    assert set(sent) == {"user1@dest.test", "user2@dest.test", "user3@dest.test"}
    assert all(VERP.match(p) for p in paths)

    # Sent to the feedback address, not the return path: matched through the report's
    # Original-Mail-From and the original's Return-Path.
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=sent["user2@dest.test"],
               RECIPIENT="user2@dest.test")
    r = await asyncio.to_thread(swaks, relay, f"fbl@{DOMAIN}", arf,
                                sender="abusedesk@receiver.test")
    assert "250 2.0.0" in r.stdout, r.stdout
    await eventually(lambda: relay.metric("mailplane_relay_complaints_total",
                                          sender_domain="example.com", credential="app") == 1,
                     "the complaint counted")
    listed = await asyncio.to_thread(suppression, relay)
    assert "user2@dest.test" in listed and "complaint" in listed
    # In the store per credential and sender domain too (the portal's figures).
    with sqlite3.connect(relay.message_log) as conn:
        counted = conn.execute("SELECT credential, domain, sum(complaints) FROM "
                               "complaint_domain_buckets GROUP BY 1, 2").fetchall()
    assert counted == [("app", "example.com", 1)]
    # 1 complaint in 3 delivered: below 40 %, still sending.
    smtp = await client(relay)
    await smtp.send_message(message(4))
    # A second complaint crosses the rate: the credential is paused.
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=sent["user3@dest.test"],
               RECIPIENT="user3@dest.test")
    await asyncio.to_thread(swaks, relay, f"fbl@{DOMAIN}", arf,
                            sender="abusedesk@receiver.test")
    await eventually(lambda: relay.metric("mailplane_relay_complaints_total") == 2,
                     "the second complaint counted")
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as refused:
        await smtp.mail("app@example.com")
    await smtp.quit()
    assert refused.value.code == 451 and "complaints about 50% of the last 4" in str(
        refused.value), refused.value
    await eventually(lambda: relay.metric("mailplane_relay_credentials_paused_complaints") == 1,
                     "the complaint pause gauge", timeout=20)


async def test_the_listener_takes_its_domain_only_caps_size_and_offers_starttls_not_auth(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    sink: Sink = await smtp_sink()
    relay = intake_relay(relay_factory, sink, tmp_path)
    await asyncio.to_thread(relay.start)
    r = await asyncio.to_thread(swaks, relay, "someone@dest.test", b"Subject: relay me\r\n\r\nx")
    assert re.search(r"<\*\*\s+550 5\.1\.1 .*takes reports for bounces\.example\.com only",
                     r.stdout), r.stdout
    big = b"Subject: big\r\n\r\n" + b"x" * 70 + (b"\r\n" + b"x" * 70) * 200
    r = await asyncio.to_thread(swaks, relay, f"x@{DOMAIN}", big)
    assert "552 5.3.4 Report too big" in r.stdout, r.stdout
    r = await asyncio.to_thread(swaks, relay, f"x@{DOMAIN}", tls=True)
    assert "STARTTLS" in r.stdout and "TLS started" in r.stdout, r.stdout + r.stderr
    assert "AUTH" not in r.stdout.split("TLS started")[1]
    await asyncio.sleep(0)
    assert sink.messages == []


async def test_sessions_per_address_and_reports_per_minute_are_capped(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    sink: Sink = await smtp_sink()
    relay = intake_relay(relay_factory, sink, tmp_path,
                         intake={"maxSessionsPerAddress": 1, "reportsPerMinute": 1})
    await asyncio.to_thread(relay.start)
    port = relay.intake_port
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await reader.readline()).startswith(b"220 ")
    # A second session from the same address while the first is open: refused.
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    assert (await r2.readline()).startswith(b"421 4.7.0 Too many connections")
    w2.close()
    writer.write(b"QUIT\r\n")
    await writer.drain()
    await reader.read()
    writer.close()
    # One report a minute: the first is taken, the second deferred (the sender retries).
    first = await asyncio.to_thread(swaks, relay, f"x@{DOMAIN}", b"Subject: a\r\n\r\nx")
    assert "250 2.0.0" in first.stdout, first.stdout
    second = await asyncio.to_thread(swaks, relay, f"x@{DOMAIN}", b"Subject: b\r\n\r\nx")
    assert "451 4.7.1 Too many reports" in second.stdout, second.stdout


async def test_with_two_workers_one_intake_listener_takes_the_reports(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
        tmp_path: Path) -> None:
    sink: Sink = await smtp_sink()
    key = tmp_path / "verp-key"
    key.write_text("0123456789abcdef0123456789abcdef\n")
    relay = relay_factory(smarthost_port=sink.port, workers=2, extra={"intake": {
        "domain": DOMAIN, "keyFile": str(key), "address": "127.0.0.1", "port": 0}})
    await asyncio.to_thread(relay.start)
    (return_path,) = await deliver(relay, sink, 1)
    # The pool is ready when one worker is; the intake is the first worker's.
    await eventually(lambda: port_open(relay.intake_port),
                     "the first worker's intake listener")
    dsn = fill("postfix-dsn.eml", RETURN_PATH=return_path, RECIPIENT="user1@dest.test",
               LOCAL="user1")
    r = await asyncio.to_thread(swaks, relay, return_path, dsn)
    assert "250 2.0.0" in r.stdout, r.stdout
    await eventually(lambda: relay.metric("mailplane_relay_intake_reports_total", kind="dsn",
                                          result="matched") == 1, "the DSN matched")
    assert "user1@dest.test" in await asyncio.to_thread(suppression, relay)
