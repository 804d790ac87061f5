"""Message hygiene with real clients (smtplib, aiosmtplib, curl, swaks): Date/Message-ID added when
missing, singleton header fields, the null reverse-path, bare LF normalised (strict mode as an
option), SMTPUTF8 end to end on ingress, 8BITMIME recorded, and an enhanced status code on every
reply."""

from __future__ import annotations

import asyncio
import contextlib
import re
import smtplib
import ssl
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import pytest

from mailplane_relay.ingress.replies import R
from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_submit import _swaks
from tests.relay.test_ingress_support import PASSWORD, Relay, message, ready_session

relay = support.relay

ENHANCED = re.compile(r"^[2345]\d\d[ -][245]\.\d{1,3}\.\d{1,3} ")


def _smtps(relay: Relay) -> smtplib.SMTP_SSL:
    ctx = relay.client_tls()
    s = smtplib.SMTP_SSL("localhost", relay.implicit_port, context=ctx, timeout=10)
    s.login("app1", PASSWORD)
    return s


def _header(data: bytes, name: bytes) -> list[bytes]:
    head = data.split(b"\r\n\r\n", 1)[0]
    return [line.split(b":", 1)[1].strip() for line in head.split(b"\r\n")
            if line.lower().startswith(name.lower() + b":")]


# ------------------------------------------------------------------ (1) Date and Message-ID


async def test_date_and_message_id_are_added_when_missing(relay: Relay) -> None:
    msg = EmailMessage()  # send_message adds neither Date nor Message-ID
    msg["From"] = "app@example.com"
    msg["To"] = "rcpt@example.net"
    msg["Subject"] = "no date"
    msg.set_content("hello\n")

    def send() -> None:
        with _smtps(relay) as s:
            s.send_message(msg)

    await asyncio.to_thread(send)
    [queued] = relay.queue.submitted
    data = relay.spool.read(queued.queue_id)
    [date] = _header(data, b"Date")
    [message_id] = _header(data, b"Message-ID")
    assert re.fullmatch(rb"[A-Z][a-z]{2}, \d\d [A-Z][a-z]{2} \d{4} \d\d:\d\d:\d\d \+0000", date)
    assert re.fullmatch(rb"<[0-9a-f]{24}@relay\.test>", message_id)
    assert queued.message_id == message_id.decode()
    [received] = [e for e in relay.log.events if e.status == "received"]
    assert received.message_id == message_id.decode()


async def test_a_complete_header_is_left_byte_for_byte(relay: Relay) -> None:
    data = message(extra="Date: Mon, 07 Dec 2026 10:00:00 +0000\r\n")
    async with aiosmtplib.SMTP(hostname="localhost", port=relay.implicit_port, use_tls=True,
                               tls_context=relay.client_tls(), timeout=10) as client:
        await client.login("app1", PASSWORD)
        await client.sendmail("app@example.com", ["rcpt@example.net"], data)
    [queued] = relay.queue.submitted
    stored = relay.spool.read(queued.queue_id)
    assert stored.startswith(b"Received: ")
    assert stored.split(b"\r\n", 2)[2] == data  # the trace header (two lines), then as sent


# ------------------------------------------------------------------ (2) singleton fields


@pytest.mark.parametrize("name", ["From", "Date", "Subject", "Message-ID", "Sender", "To", "Cc",
                                  "Reply-To"])
async def test_a_second_singleton_header_is_refused_naming_it(relay: Relay, name: str) -> None:
    values = {"From": "app@example.com", "Date": "Mon, 07 Dec 2026 10:00:00 +0000",
              "Subject": "again", "Message-ID": "<x@example.com>", "Sender": "app@example.com",
              "To": "other@example.net", "Cc": "cc@example.net", "Reply-To": "r@example.net"}
    data = (f"From: app@example.com\r\nTo: rcpt@example.net\r\nSubject: s\r\n"
            f"Date: Mon, 07 Dec 2026 10:00:00 +0000\r\nMessage-ID: <m@example.com>\r\n"
            f"Sender: app@example.com\r\nCc: c@example.net\r\nReply-To: a@example.com\r\n"
            f"{name}: {values[name]}\r\n\r\nbody\r\n").encode()

    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("app@example.com", ["rcpt@example.net"], data)

    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(send)
    assert err.value.smtp_code == 554
    expected = f"5.6.0 Message has more than one {name}: header (RFC 5322 section 3.6 allows one)"
    assert err.value.smtp_error == expected.encode()
    assert relay.queue.submitted == []
    assert relay.rejected("duplicate_header") == 1


async def test_repeatable_fields_may_repeat(relay: Relay) -> None:
    data = message(extra="Received: from a\r\nReceived: from b\r\nComments: one\r\n"
                         "Comments: two\r\nKeywords: x\r\nKeywords: y\r\n")

    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("app@example.com", ["rcpt@example.net"], data)

    await asyncio.to_thread(send)
    assert len(relay.queue.submitted) == 1


# ------------------------------------------------------------------ (3) null reverse-path


async def test_null_reverse_path_is_accepted_for_a_credential(relay: Relay) -> None:
    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("", ["rcpt@example.net"], message(sender="noreply@example.com"))

    await asyncio.to_thread(send)
    [queued] = relay.queue.submitted
    assert queued.mail_from == ""
    assert queued.sender_domain == "example.com"  # from the header From:, for DKIM and metrics
    assert relay.metric("mailplane_relay_messages_received_total", listener="submissions",
                        sender_domain="example.com", credential="app1") == 1


async def test_null_reverse_path_still_needs_auth_and_a_permitted_header_from(
    relay: Relay,
) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.cmd("MAIL FROM:<>"))[1] == "530 5.7.0 Authentication required"
    finally:
        await c.close()
    code, out = await _swaks("--port", str(relay.implicit_port), "--tls-on-connect",
                             "--tls-ca-path", str(relay.ca_file), "--auth", "PLAIN",
                             "--auth-user", "app1", "--auth-password", PASSWORD,
                             "--from", "<>", "--to", "x@example.net",
                             "--header", "From: ceo@other.org")
    assert code != 0
    assert "MAIL FROM:<>" in out
    assert "550 5.7.1 Credential app1 may not send as header From: domain other.org" in out
    d = await ready_session(relay, user="banned")
    try:
        assert (await d.cmd("MAIL FROM:<>"))[1].startswith("554 5.7.1 Credential banned is "
                                                          "suspended")
    finally:
        await d.close()


# ------------------------------------------------------------------ (4) bare LF


async def test_smtplib_bytes_with_bare_lf_are_normalised(relay: Relay) -> None:
    raw = (b"From: app@example.com\nTo: rcpt@example.net\nSubject: lf\nMessage-ID: <lf@x>\n"
           b"Date: Mon, 07 Dec 2026 10:00:00 +0000\n\nline one\n.hidden dot line\nlast\n")

    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("app@example.com", ["rcpt@example.net"], raw)

    await asyncio.to_thread(send)
    [queued] = relay.queue.submitted
    stored = relay.spool.read(queued.queue_id).split(b"\r\n", 2)[2]
    # smtplib ends bytes that do not end in CRLF with an extra CRLF (an empty last line).
    assert stored == raw.replace(b"\n", b"\r\n") + b"\r\n"


async def test_curl_upload_file_with_lf_line_ends(relay: Relay, tmp_path: Path) -> None:
    mail = tmp_path / "mail.txt"
    mail.write_bytes(b"From: app@example.com\nTo: rcpt@example.net\nSubject: curl\n\n"
                     b"sent with curl --upload-file\n")
    proc = await asyncio.create_subprocess_exec(
        "curl", "--silent", "--show-error", "--ssl-reqd", "--cacert", str(relay.ca_file),
        f"smtps://localhost:{relay.implicit_port}", "--user", f"app1:{PASSWORD}",
        "--mail-from", "app@example.com", "--mail-rcpt", "rcpt@example.net",
        "--upload-file", str(mail), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out.decode()
    [queued] = relay.queue.submitted
    stored = relay.spool.read(queued.queue_id)
    assert b"\r\nSubject: curl\r\n" in stored
    # curl, like smtplib, ends content that does not end in CRLF with one more.
    assert stored.endswith(b"\r\n\r\nsent with curl --upload-file\r\n\r\n")
    assert b"\n" not in stored.replace(b"\r\n", b"")


async def test_a_bare_cr_is_refused_even_when_normalising(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
        assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        await c.send(b"From: a@example.com\r\n\r\none\rtwo\r\n.\r\n")
        assert (await c.reply())[1] == R.BARE_CR
    finally:
        await c.close()
    assert relay.queue.submitted == []


async def test_strict_mode_refuses_what_normalize_accepts(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(bareNewline="reject"))

    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("app@example.com", ["rcpt@example.net"],
                       b"From: app@example.com\n\nbody\n")

    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(send)
    assert err.value.smtp_code == 554
    assert b"bare CR or LF" in err.value.smtp_error


# ------------------------------------------------------------------ (5) SMTPUTF8


async def test_smtputf8_addresses_are_accepted_and_preserved(relay: Relay) -> None:
    data = ("From: Pelé <pelé@example.com>\r\nTo: José <josé@exämple.net>\r\n"
            "Subject: olá\r\nMessage-ID: <u@example.com>\r\n\r\nçà\r\n").encode()

    def send() -> None:
        with _smtps(relay) as s:
            assert s.has_extn("smtputf8")
            s.sendmail("pelé@example.com", ["josé@exämple.net"], data,
                       mail_options=["SMTPUTF8", "BODY=8BITMIME"])

    await asyncio.to_thread(send)
    [queued] = relay.queue.submitted
    assert queued.mail_from == "pelé@example.com"
    assert [r.address for r in queued.recipients] == ["josé@exämple.net"]
    assert queued.extra == {"smtputf8": True, "body": "8BITMIME", "eight_bit": True}
    stored = relay.spool.read(queued.queue_id)
    assert stored.endswith(data)  # byte for byte (a Date: was added in front)
    assert b" with UTF8SMTPSA;" in stored


async def test_non_ascii_address_without_smtputf8_is_553_5_6_7(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        assert (await c.cmd("MAIL FROM:<pelé@example.com>"))[1] == R.NON_ASCII_ADDRESS
        assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 250
        assert (await c.cmd("RCPT TO:<josé@example.net>"))[1] == R.NON_ASCII_ADDRESS
        assert (await c.cmd("EHLO clïent.test"))[1] == R.NON_ASCII
        code, text = await c.cmd(b"NOOP \xff\xfe")
        assert (code, text) == (500, R.NOT_UTF8)
    finally:
        await c.close()


async def test_parameters_after_helo_are_refused_555_naming_ehlo(relay: Relay) -> None:
    """RFC 1869/3461: MAIL and RCPT parameters are extensions, which a HELO session has not
    been offered. A real client (aiosmtplib sends the options it is given) greets with HELO from
    a trusted network, so the transaction itself would be accepted."""
    relay.reconfigure(lambda d: d.update(trustedNetworks=["127.0.0.0/8"]))
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.starttls_port,
                             start_tls=False, timeout=10)
    await client.connect()
    try:
        assert (await client.helo(hostname="client.test")).code == 250
        for options, name in ((["RET=HDRS"], "RET"), (["ENVID=x", "RET=FULL"], "ENVID"),
                              (["SIZE=100"], "SIZE")):
            with pytest.raises(aiosmtplib.SMTPSenderRefused) as sender_refused:
                await client.mail("app@example.com", options=options)
            assert (f"{sender_refused.value.code} {sender_refused.value.message}"
                    == R.PARAMETER_NEEDS_EHLO.format(command="MAIL FROM", name=name))
        assert (await client.mail("app@example.com")).code == 250
        with pytest.raises(aiosmtplib.SMTPRecipientRefused) as rcpt_refused:
            await client.rcpt("rcpt@example.net", options=["NOTIFY=NEVER"])
        assert f"{rcpt_refused.value.code} {rcpt_refused.value.message}" == (
            "555 5.5.4 RCPT TO parameter NOTIFY needs a session opened with EHLO, not HELO "
            "(RFC 1869); send EHLO, then the command again")
        assert (await client.rcpt("rcpt@example.net")).code == 250
        # The same parameters are accepted once the client greets with EHLO.
        assert (await client.ehlo(hostname="client.test")).code == 250
        assert (await client.mail("app@example.com", options=["RET=HDRS"])).code == 250
        assert (await client.rcpt("rcpt@example.net", options=["NOTIFY=NEVER"])).code == 250
        assert (await client.data(message())).code == 250
    finally:
        await client.quit()
    [queued] = relay.queue.submitted
    assert queued.extra.get("dsn_ret") == "HDRS"


# ------------------------------------------------------------------ (6) 8BITMIME


async def test_8bit_body_is_recorded_declared_or_not(relay: Relay) -> None:
    body8 = message() + "Grüße\r\n".encode()
    async with aiosmtplib.SMTP(hostname="localhost", port=relay.implicit_port, use_tls=True,
                               tls_context=relay.client_tls(), timeout=10) as client:
        await client.login("app1", PASSWORD)
        await client.sendmail("app@example.com", ["a@example.net"], body8,
                              mail_options=["BODY=8BITMIME"])
        await client.sendmail("app@example.com", ["b@example.net"], body8)  # undeclared
        await client.sendmail("app@example.com", ["c@example.net"], message())
    declared, undeclared, plain = relay.queue.submitted
    assert declared.extra == {"body": "8BITMIME", "eight_bit": True}
    assert undeclared.extra == {"eight_bit": True}
    assert plain.extra == {}


async def test_raw_utf8_header_without_smtputf8_is_refused(relay: Relay) -> None:
    data = "From: app@example.com\r\nSubject: Grüße\r\n\r\nbody\r\n".encode()

    def send() -> None:
        with _smtps(relay) as s:
            s.sendmail("app@example.com", ["rcpt@example.net"], data,
                       mail_options=["BODY=8BITMIME"])

    with pytest.raises(smtplib.SMTPDataError) as err:
        await asyncio.to_thread(send)
    assert err.value.smtp_code == 554
    assert err.value.smtp_error == R.NON_ASCII_HEADER[4:].encode()


# ------------------------------------------------------------------ (11) enhanced status codes


def test_every_reply_in_the_table_has_an_enhanced_status_code() -> None:
    replies = {name: value for name, value in vars(R).items() if name.isupper()}
    assert len(replies) > 60
    for name, text in replies.items():
        if name == "GREETING":  # RFC 2034 §4: the greeting carries none
            continue
        assert ENHANCED.match(text), name
        # The class of the enhanced code matches the reply's (2xx/3xx success, 4xx, 5xx).
        code, enhanced = text[0], text[4]
        assert enhanced == ("2" if code in "23" else code), name


async def test_every_reply_on_the_wire_has_an_enhanced_status_code(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxRefusedCommands=100))
    c = await ready_session(relay, user=None, implicit=False)
    lines: list[str] = []
    commands = ["HELP", "VRFY root", "EXPN staff", "NOOP", "RSET", "RSET now", "HELO", "DATA",
                "RCPT TO:<x@example.net>", "MAIL FROM:<a@example.com>", "AUTH", "AUTH X",
                "STARTTLS", "XYZZY", "MAIL FROM:<bad", "QUIT now"]
    try:
        for command in commands:
            lines.append((await c.cmd(command))[1])
        await c.login("app1", "wrong")
        assert (await c.login())[0] == 235
        for command in ["MAIL FROM:<a@example.com> SIZE=x", "MAIL FROM:<a@example.com> BODY=9",
                        "MAIL FROM:<a@example.com> FOO=1", "MAIL FROM:<a@example.com> SMTPUTF8=1",
                        "RCPT TO:<x@example.net>", "MAIL FROM:<a@example.com>",
                        "MAIL FROM:<a@example.com>", "RCPT TO:<x@example.net> NOTIFY=NEVER",
                        "RCPT TO:<x@example.net>", "DATA"]:
            lines.append((await c.cmd(command))[1])
        lines.append((await c.cmd(b"From: a@example.com\r\n\r\nhi\r\n."))[1])
        lines.append((await c.cmd("QUIT"))[1])
    finally:
        await c.close()
    for text in lines:
        for line in text.split("\n"):
            assert ENHANCED.match(line), line


async def test_starttls_reply_has_an_enhanced_status_code(relay: Relay) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.starttls_port)
    try:
        await reader.readline()
        writer.write(b"EHLO client.test\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(b"STARTTLS\r\n")
        assert await reader.readline() == b"220 2.0.0 Ready to start TLS\r\n"
        await writer.start_tls(relay.client_tls(), server_hostname="localhost")
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 2)


def test_the_hostname_must_be_an_ascii_dns_name() -> None:
    from pydantic import ValidationError

    from mailplane_relay.config import RelaySettings

    tls = {"certFile": "/c", "keyFile": "/k"}
    assert RelaySettings.model_validate({"hostname": "relay-0.mail.example.com", "tls": tls})
    for bad in ("rélay.example.com", "relay example", "relay\r\nX: y", ""):
        with pytest.raises(ValidationError, match="hostname"):
            RelaySettings.model_validate({"hostname": bad, "tls": tls})
