"""RFC 3461 at submission and RFC 3464 notices: NOTIFY, ORCPT, RET and ENVID given by a real
client (smtplib) to the real relay command, kept across a restart and honoured (no notice for
NOTIFY=NEVER, failure notices with Original-Envelope-Id and Original-Recipient, a relayed
notice for NOTIFY=SUCCESS toward a server without DSN, one delay warning, persisted, for
recipients whose NOTIFY allows DELAY, nothing for a null sender); the parameters passed on to a
next hop that offers DSN (which then owns the notices); syntax errors answered 501 5.5.4.
Notices are parsed with the email package."""

from __future__ import annotations

import asyncio
import email
import smtplib
import time
from collections.abc import Callable
from email.message import Message
from typing import Any

import pytest

from mailplane_relay.ingress.paths import parse_mail, parse_rcpt, xtext_decode
from mailplane_relay.ingress.replies import Refusal
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.relay.test_delivery_flows import BODY, SinkFactory, make_config, message, smarthost

MARKER = "DsnParamsBodyMarker"


# ---------------------------------------------------------------------------- syntax


def test_xtext_decoding() -> None:
    assert xtext_decode("order+2B42") == "order+42"
    assert xtext_decode("a+20b") == "a b"
    assert xtext_decode("plain@example.net") == "plain@example.net"
    for bad in ("a+2", "a+zz", "a+2b", "a=b", "a+0A", "caf\u00e9"):
        assert xtext_decode(bad) is None, bad


def test_dsn_parameters_parse() -> None:
    mail = parse_mail("FROM:<a@example.com> RET=hdrs ENVID=x+2By")
    assert not isinstance(mail, Refusal)
    assert (mail.ret, mail.envid) == ("HDRS", "x+y")
    rcpt = parse_rcpt("TO:<b@example.net> NOTIFY=delay,FAILURE ORCPT=rfc822;c+2Bd@example.net",
                      False)
    assert not isinstance(rcpt, Refusal)
    assert rcpt.notify == ("FAILURE", "DELAY")
    assert rcpt.orcpt == "rfc822;c+d@example.net"
    never = parse_rcpt("TO:<b@example.net> NOTIFY=NEVER", False)
    assert not isinstance(never, Refusal) and never.notify == ("NEVER",)
    for arg, word in (("FROM:<a@example.com> RET=BOTH", "RET"),
                      ("FROM:<a@example.com> RET=FULL RET=HDRS", "RET"),
                      ("FROM:<a@example.com> ENVID=" + "x" * 101, "ENVID"),
                      ("FROM:<a@example.com> ENVID=a+zz", "ENVID")):
        refused = parse_mail(arg)
        assert isinstance(refused, Refusal) and refused.reply.startswith("501 5.5.4 " + word)
    for arg, word in (("TO:<b@example.net> NOTIFY=NEVER,SUCCESS", "NOTIFY"),
                      ("TO:<b@example.net> NOTIFY=SOMETIMES", "NOTIFY"),
                      ("TO:<b@example.net> NOTIFY=SUCCESS,SUCCESS", "NOTIFY"),
                      ("TO:<b@example.net> ORCPT=c@example.net", "ORCPT"),
                      ("TO:<b@example.net> ORCPT=rfc822;", "ORCPT")):
        refused = parse_rcpt(arg, False)
        assert isinstance(refused, Refusal) and refused.reply.startswith("501 5.5.4 " + word)


# ---------------------------------------------------------------------------- end to end


def notices(sink: Sink) -> list[tuple[Message, list[Message]]]:
    """Every DSN the sink received: the message and the per-recipient field groups."""
    out = []
    for m in sink.messages:
        if m.mail_from != "":
            continue
        report = email.message_from_bytes(m.data)
        parts = report.get_payload()
        assert isinstance(parts, list)
        groups = parts[1].get_payload()
        assert isinstance(groups, list)
        out.append((report, groups))
    return out


def by_action(sink: Sink, action: str) -> list[tuple[Message, list[Message]]]:
    return [(r, g) for r, g in notices(sink) if g[1]["Action"] == action]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


def submit(relay: RelayProcess, sender: str, rcpts: list[tuple[str, list[str]]],
           mail_options: list[str]) -> None:
    with smtplib.SMTP_SSL("127.0.0.1", relay.ports["submissions"],
                          context=relay.client_tls(), timeout=10) as smtp:
        smtp.login("app", "app-password")
        smtp.ehlo()
        assert smtp.has_extn("dsn")
        code, reply = smtp.mail(sender, mail_options)
        assert code == 250, reply
        for address, options in rcpts:
            code, reply = smtp.rcpt(address, options)
            assert code == 250, reply
        data = (f"From: app@example.com\r\nSubject: {MARKER}\r\n\r\n{MARKER} body\r\n")
        code, reply = smtp.data(data.encode())
        assert code == 250, reply


async def test_dsn_parameters_are_kept_and_honoured(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
) -> None:
    # First the smarthost defers everything, so the message is still queued at the restart.
    sink: Sink = await smtp_sink(mail_reply="451 4.3.0 Not now")
    relay = relay_factory(smarthost_port=sink.port, extra={
        "queue": {"retryInitial": "1s", "retryMax": "1s", "retryJitter": 0.0,
                  "delayWarning": "4s"}})
    await asyncio.to_thread(relay.start)

    # Syntax errors are 501 5.5.4 naming the parameter, on the wire.
    with smtplib.SMTP_SSL("127.0.0.1", relay.ports["submissions"],
                          context=relay.client_tls(), timeout=10) as smtp:
        smtp.login("app", "app-password")
        code, reply = smtp.docmd("MAIL FROM:<app@example.com> RET=EVERYTHING")
        assert code == 501 and reply.startswith(b"5.5.4 RET must be")
        code, reply = smtp.docmd("MAIL FROM:<app@example.com> ENVID=a+zz")
        assert code == 501 and b"ENVID" in reply
        assert smtp.docmd("MAIL FROM:<app@example.com>")[0] == 250
        code, reply = smtp.docmd("RCPT TO:<x@b.test> NOTIFY=NEVER,FAILURE")
        assert code == 501 and b"NOTIFY=NEVER" in reply
        code, reply = smtp.docmd("RCPT TO:<x@b.test> ORCPT=x@b.test")
        assert code == 501 and b"ORCPT" in reply

    submit(relay, "app@example.com", [
        ("gone@b.test", ["NOTIFY=FAILURE", "ORCPT=rfc822;first+2Blast@example.net"]),
        ("never@b.test", ["NOTIFY=NEVER"]),
        ("ok@b.test", ["NOTIFY=SUCCESS"]),
        ("busy@b.test", ["NOTIFY=DELAY,FAILURE"]),
        ("quiet@b.test", ["NOTIFY=FAILURE"]),
        ("plain@b.test", []),
    ], ["RET=FULL", "ENVID=order+2B42"])
    # A null sender asks for everything and gets nothing.
    submit(relay, "", [("gone2@b.test", ["NOTIFY=SUCCESS,FAILURE,DELAY"])], [])
    await eventually(lambda: len(relay.spooled_files()) == 2
                     and all(p.with_suffix(".state").exists() for p in relay.spooled_files()),
                     "both messages deferred")
    state = next(p.with_suffix(".state") for p in relay.spooled_files()
                 if b"order+42" in p.with_suffix(".state").read_bytes())
    assert b'"notify":["NEVER"]' in state.read_bytes()
    assert await asyncio.to_thread(relay.stop) == 0

    # After the restart the parameters still hold.
    sink.behaviour.mail_reply = None
    sink.behaviour.rcpt_replies = {
        "gone@b.test": "550 5.1.1 No such user", "never@b.test": "550 5.1.1 No such user",
        "gone2@b.test": "550 5.1.1 No such user",
        "busy@b.test": "451 4.2.1 Mailbox busy", "quiet@b.test": "451 4.2.1 Mailbox busy",
        "plain@b.test": "451 4.2.1 Mailbox busy"}
    await asyncio.to_thread(relay.start)
    await eventually(lambda: len(by_action(sink, "failed")) == 1
                     and len(by_action(sink, "relayed")) == 1, "failure and success notices")
    await eventually(lambda: len(by_action(sink, "delayed")) == 1, "the delay warning")

    for report, groups in notices(sink):
        assert report["To"] == "<app@example.com>"
        assert groups[0]["Original-Envelope-Id"] == "order+42"
        assert MARKER + " body" not in report.as_string()  # RET=FULL: headers only
        assert MARKER in report.as_string()  # the Subject header is returned
    assert all(m.rcpt_tos == ["app@example.com"] for m in sink.messages if m.mail_from == "")

    [(_, failed)] = by_action(sink, "failed")
    assert [g["Final-Recipient"] for g in failed[1:]] == ["rfc822; gone@b.test"]
    assert failed[1]["Original-Recipient"] == "rfc822; first+last@example.net"
    assert failed[1]["Status"] == "5.1.1"

    [(report, relayed)] = by_action(sink, "relayed")
    assert [g["Final-Recipient"] for g in relayed[1:]] == ["rfc822; ok@b.test"]
    assert relayed[1]["Status"] == "2.0.0"
    assert report["Subject"] == "Successful Mail Relay Report"

    [(report, delayed)] = by_action(sink, "delayed")
    # busy asked for DELAY, plain gave no NOTIFY (failures and delays), quiet only FAILURE.
    assert sorted(g["Final-Recipient"] for g in delayed[1:]) == [
        "rfc822; busy@b.test", "rfc822; plain@b.test"]
    assert all(g["Status"] == "4.2.1" and g["Will-Retry-Until"] for g in delayed[1:])
    assert report["Subject"] == "Delayed Mail (still being retried)"

    # One warning per message, also across a restart (the mark is saved with the message).
    assert await asyncio.to_thread(relay.stop) == 0
    await asyncio.to_thread(relay.start)
    tries = sink.rcpt_attempts.count("busy@b.test")
    await eventually(lambda: sink.rcpt_attempts.count("busy@b.test") >= tries + 2,
                     "two more attempts")
    assert len(by_action(sink, "delayed")) == 1
    assert len(notices(sink)) == 3  # never@ and the null sender's gone2@ got nothing
    assert "gone2@b.test" in sink.rcpt_attempts
    assert await asyncio.to_thread(relay.stop) == 0


async def test_parameters_go_to_a_next_hop_that_offers_dsn(relay: Any, smtp_sink: SinkFactory
                                                           ) -> None:
    sink = await smtp_sink(dsn=True)
    r = await relay(make_config(smarthost(sink)))
    msg = await r.spool.commit(
        mail_from="app@example.com", recipients=["ok@example.net", "other@example.net"],
        data=message("ok@example.net"), message_id=None, credential="app1",
        sender_domain="example.com", listener="submission",
        extra={"dsn_ret": "HDRS", "envid": "id+1 x"},
        dsn=[(("SUCCESS", "FAILURE"), "rfc822;o=k@example.net"), (None, None)])
    r.queue.submit(msg)
    await r.done(msg)
    [delivered] = sink.messages
    assert "RET=HDRS" in delivered.mail_options
    assert "ENVID=ID+2B1+20X" in delivered.mail_options  # xtext (the sink upper-cases)
    assert delivered.rcpt_options == ("NOTIFY=SUCCESS,FAILURE", "ORCPT=RFC822;O+3DK@EXAMPLE.NET")
    # That server sends the success notice; the relay sends none (nothing left queued).
    await r.wait(lambda: r.queue.queued == 0)
    assert [m for m in sink.messages if m.mail_from == ""] == []
    assert BODY in delivered.data


async def test_no_dsn_parameters_toward_a_server_without_dsn(relay: Any, smtp_sink: SinkFactory
                                                             ) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    msg = await r.spool.commit(
        mail_from="app@example.com", recipients=["ok@example.net"],
        data=message("ok@example.net"), message_id=None, credential="app1",
        sender_domain="example.com", listener="submission",
        extra={"dsn_ret": "HDRS", "envid": "abc"}, dsn=[(("SUCCESS",), None)])
    r.queue.submit(msg)
    await r.done(msg)
    await sink.wait_for(lambda: len(sink.messages) == 2)
    original = next(m for m in sink.messages if m.mail_from)
    assert not any(o.startswith(("RET", "ENVID")) for o in original.mail_options)
    dsn = next(m for m in sink.messages if not m.mail_from)
    assert b"Action: relayed" in dsn.data and b"Original-Envelope-Id: abc" in dsn.data


@pytest.mark.parametrize("notify", [["NEVER"], ["SUCCESS", "DELAY"]])
async def test_a_failure_is_not_reported_unless_notify_allows_it(
        relay: Any, smtp_sink: SinkFactory, notify: list[str]) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user",
                                         "gone2@example.net": "550 5.1.1 No such user"})
    r = await relay(make_config(smarthost(sink)))
    quiet = await r.spool.commit(
        mail_from="app@example.com", recipients=["gone@example.net"],
        data=message("gone@example.net"), message_id=None, credential="app1",
        sender_domain="example.com", listener="submission", dsn=[(tuple(notify), None)])
    r.queue.submit(quiet)
    await r.done(quiet)
    loud = await r.send(["gone2@example.net"])  # no NOTIFY: reported
    await r.done(loud)
    await sink.wait_for(lambda: len(sink.messages) == 1)
    await r.wait(lambda: r.queue.queued == 0)  # every notice there is was delivered
    assert b"gone2@example.net" in sink.messages[0].data
    assert b"gone@example.net" not in sink.messages[0].data.replace(b"gone2@", b"")
    assert len(sink.messages) == 1


async def test_the_delay_warning_is_not_late_by_a_whole_backoff(relay: Any,
                                                              smtp_sink: SinkFactory) -> None:
    """The retry after a deferral would come a minute later; the warning is due after 1 s:
    an attempt is made when it is due, so the warning goes out then."""
    sink = await smtp_sink(rcpt_replies={"busy@example.net": "451 4.2.1 Mailbox busy"})
    r = await relay(make_config(smarthost(sink), queue={
        "retryInitial": 60, "retryMax": 60, "maxLifetime": 600, "delayWarning": 1}))
    msg = await r.send(["busy@example.net"])
    started = time.monotonic()
    await sink.wait_for(lambda: any(m.mail_from == "" for m in sink.messages), timeout=15)
    assert time.monotonic() - started < 15
    [dsn] = [m for m in sink.messages if m.mail_from == ""]
    assert b"Action: delayed" in dsn.data and b"Status: 4.2.1" in dsn.data
    assert sink.rcpt_attempts.count("busy@example.net") == 2  # the first try, the warning's
    assert r.queue.is_queued(msg.queue_id)


@pytest.mark.parametrize("setting", [0, None, "0s"])
async def test_delay_warnings_can_be_turned_off(relay: Any, smtp_sink: SinkFactory,
                                                setting: Any) -> None:
    sink = await smtp_sink(rcpt_replies={"busy@example.net": "451 4.2.1 Mailbox busy"})
    r = await relay(make_config(smarthost(sink), queue={
        "retryInitial": 0.2, "retryMax": 0.2, "maxLifetime": 1.5, "delayWarning": setting}))
    assert r.config.settings.queue.delay_warning == 0
    msg = await r.send(["busy@example.net"])
    await r.done(msg)
    await r.wait(lambda: r.queue.queued == 0)
    [dsn] = [m for m in sink.messages if m.mail_from == ""]  # the expiry notice only
    assert b"Action: failed" in dsn.data and b"Action: delayed" not in dsn.data
    assert sink.rcpt_attempts.count("busy@example.net") >= 3


async def test_a_reply_with_a_byte_outside_utf8_still_gets_its_notice(relay: Any) -> None:
    """A hostile or broken next hop answers RCPT with a byte that is not UTF-8: the recipient
    bounces, the sender's notice goes out (quoting the reply in ASCII) and the message leaves
    the queue, instead of the notice failing at every retry for ever."""
    received: list[tuple[str, bytes]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        sender = ""
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250 raw.test\r\n")
            elif verb == b"MAIL":
                sender = line.decode().split("<", 1)[1].split(">", 1)[0]
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT" and b"gone@" in line:
                writer.write(b"550 5.1.1 caf\xe9 \xff unknown\r\n")
            elif verb == b"DATA":
                writer.write(b"354 Go\r\n")
                await writer.drain()
                data = b""
                while (chunk := await reader.readline()) not in (b".\r\n", b""):
                    data += chunk
                received.append((sender, data))
                writer.write(b"250 2.0.0 Ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 Bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        r = await relay(make_config({"mode": "smarthost", "connectTimeout": 2,
                                     "commandTimeout": 2, "messageDeadline": 10,
                                     "smarthost": {"host": "127.0.0.1", "port": port,
                                                   "tls": "none"}}))
        msg = await r.send(["gone@example.net"])
        await r.done(msg)
        await r.wait(lambda: r.queue.queued == 0)
    finally:
        server.close()
    [(sender, data)] = received
    assert sender == ""
    report = email.message_from_bytes(data)
    status = report.get_payload()[1].as_bytes()  # type: ignore[index]
    assert b"Diagnostic-Code: smtp; 550 5.1.1 caf? ? unknown" in status
    assert [e["response"] for e in await r.events(msg) if e["status"] == "bounced"] == [
        "550 5.1.1 caf? ? unknown"]


async def test_the_state_saying_a_dsn_went_out_is_written_durably(
        relay: Any, smtp_sink: SinkFactory) -> None:
    """One recipient bounces, the other is deferred: the failure notice is spooled (fsynced)
    at once, and the message's state that says so must be written durably too; otherwise a
    crash before the next write makes the restarted relay send the notice a second time."""
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user",
                                         "busy@example.net": "451 4.2.1 Busy"})
    r = await relay(make_config(smarthost(sink), queue={"retryInitial": 60, "retryMax": 60}))
    saves: list[tuple[str, bool]] = []
    save_state = r.spool.save_state

    async def recording(m: Any, *, durable: bool = False) -> None:
        saves.append((m.queue_id, durable))
        await save_state(m, durable=durable)

    r.spool.save_state = recording
    msg = await r.send(["gone@example.net", "busy@example.net"])
    await sink.wait_for(lambda: any(m.mail_from == "" for m in sink.messages))
    # The notice delivered and gone; the message waits for its retry.
    await r.wait(lambda: r.queue.queued == 1
                 and r.queue.state_by_id(msg.queue_id) == "scheduled")
    assert (msg.queue_id, True) in saves, saves
