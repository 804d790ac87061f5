"""Successful submission through real clients: aiosmtplib, smtplib and swaks, over STARTTLS and
implicit TLS, checked on disk (the spool), in the queue, in the log and in the metrics."""

from __future__ import annotations

import asyncio
import smtplib
from email.message import EmailMessage

import aiosmtplib

from mailplane_relay.events import LogEvent
from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import PASSWORD, Relay, message

relay = support.relay


def _events(relay: Relay, status: str) -> list[LogEvent]:
    return [e for e in relay.log.events if e.status == status]


async def test_aiosmtplib_starttls_submission_is_spooled_queued_logged(relay: Relay) -> None:
    data = message(sender="app@example.com", to="a@example.net")
    async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.starttls_port, start_tls=True,
                               tls_context=relay.client_tls(),
                               timeout=10) as client:
        await client.login("app1", PASSWORD)
        errors, reply = await client.sendmail("app@example.com", ["a@example.net",
                                                                  "b@example.net"], data)
    assert errors == {}
    assert reply.startswith("2.0.0 Ok: queued as ")
    queue_id = reply.rsplit(" ", 1)[1]
    [msg] = relay.queue.submitted
    assert msg.queue_id == queue_id
    assert [r.address for r in msg.recipients] == ["a@example.net", "b@example.net"]
    assert msg.credential == "app1" and msg.sender_domain == "example.com"
    assert msg.listener == "submission"
    stored = relay.spool.read(queue_id)
    assert stored.endswith(data)
    # The queue is handed the very bytes the spool holds (its first attempt sends them).
    assert relay.queue.data == [stored]
    assert stored.startswith(b"Received: from ")
    assert b"with ESMTPSA" in stored.split(b"\r\n\r\n")[0]
    received = _events(relay, "received")
    assert [e.recipient for e in received] == ["a@example.net", "b@example.net"]
    assert all(e.queue_id == queue_id and e.credential == "app1" for e in received)
    assert received[0].message_id is not None and received[0].message_id.startswith("<")
    assert relay.metric("mailplane_relay_messages_received_total", listener="submission",
                        sender_domain="example.com", credential="app1") == 1
    assert relay.metric("mailplane_relay_auth_success_total", mechanism="PLAIN") == 1
    assert relay.metric("mailplane_relay_tls_sessions_total", listener="submission",
                        version="TLSv1.3") == 1


def _smtplib_send(port: int, relay: Relay) -> tuple[str, str]:
    msg = EmailMessage()
    msg["From"] = "App <noreply@other.org>"
    msg["To"] = "x@example.net"
    msg["Subject"] = "smtplib"
    msg.set_content("hello\n.\nnot the end\n")
    with smtplib.SMTP_SSL("127.0.0.1", port, context=relay.client_tls(), timeout=10) as s:
        s.ehlo("client.test")
        s.login("app2", PASSWORD)
        s.send_message(msg)
        code, _ = s.noop()
        last = s.docmd("RSET")
    return str(code), str(last)


async def test_smtplib_implicit_tls_login_mechanism_and_dot_transparency(relay: Relay) -> None:
    await asyncio.to_thread(_smtplib_send, relay.implicit_port, relay)
    [msg] = relay.queue.submitted
    assert msg.listener == "submissions" and msg.credential == "app2"
    body = relay.spool.read(msg.queue_id)
    assert b"\r\n.\r\nnot the end\r\n" in body  # the dot line survives stuffing
    assert relay.metric("mailplane_relay_tls_sessions_total", listener="submissions",
                        version="TLSv1.3") == 1


async def _swaks(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "swaks", "--server", "127.0.0.1", "--helo", "client.test", "--timeout", "10", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_swaks_starttls_auth_login(relay: Relay) -> None:
    code, out = await _swaks(
        "--port", str(relay.starttls_port), "--tls", "--tls-ca-path", str(relay.ca_file),
        "--auth", "LOGIN", "--auth-user", "app1", "--auth-password", PASSWORD,
        "--from", "news@example.com", "--to", "someone@example.net",
        "--header", "From: news@example.com")
    assert code == 0, out
    assert "250 2.0.0 Ok: queued as" in out
    assert len(relay.queue.submitted) == 1
    assert PASSWORD not in "".join(str(e) for e in relay.log.events)


async def test_swaks_tls_on_connect_auth_plain(relay: Relay) -> None:
    code, out = await _swaks(
        "--port", str(relay.implicit_port), "--tls-on-connect", "--tls-ca-path",
        str(relay.ca_file), "--auth", "PLAIN", "--auth-user", "app1", "--auth-password",
        PASSWORD, "--from", "news@example.com", "--to", "someone@example.net",
        "--header", "From: news@example.com")
    assert code == 0, out
    assert relay.queue.submitted[0].listener == "submissions"


async def test_swaks_pipelining(relay: Relay) -> None:
    code, out = await _swaks(
        "--port", str(relay.implicit_port), "--tls-on-connect", "--tls-ca-path",
        str(relay.ca_file), "--pipeline", "--auth", "PLAIN", "--auth-user", "app1",
        "--auth-password", PASSWORD, "--from", "news@example.com",
        "--to", "one@example.net,two@example.net", "--header", "From: news@example.com")
    assert code == 0, out
    [msg] = relay.queue.submitted
    assert [r.address for r in msg.recipients] == ["one@example.net", "two@example.net"]


async def test_smtp_source_concurrent_sessions_from_a_trusted_network(relay: Relay) -> None:
    relay.reconfigure(lambda d: d.update(trustedNetworks=["127.0.0.1/32"]))
    proc = await asyncio.create_subprocess_exec(
        "/usr/sbin/smtp-source", "-c", "-l", "2048", "-m", "200", "-s", "10",
        "-f", "load@example.com", "-t", "sink@example.net", f"127.0.0.1:{relay.starttls_port}",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0, out.decode()
    assert len(relay.queue.submitted) == 200
    assert len({m.queue_id for m in relay.queue.submitted}) == 200
    assert len(list(relay.spool.directory.glob("*.msg"))) == 200


async def test_the_received_header_names_the_client_address_only_when_configured(
    relay: Relay,
) -> None:
    """The submitting client's address is not sent to recipients unless the platform asks for
    it (traceClientAddress), docs/store.md."""

    async def send() -> bytes:
        async with aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.starttls_port,
                                   start_tls=True, tls_context=relay.client_tls(),
                                   timeout=10) as client:
            await client.login("app1", PASSWORD)
            _errors, reply = await client.sendmail(
                "app@example.com", ["a@example.net"],
                message(sender="app@example.com", to="a@example.net"))
        head = relay.spool.read(reply.rsplit(" ", 1)[1]).split(b"\r\n\r\n")[0]
        return head.split(b"\r\n\t")[0]

    first = await send()
    assert first.startswith(b"Received: from ") and b"127.0.0.1" not in first, first
    relay.reconfigure(lambda doc: doc.update(traceClientAddress=True))
    assert (await send()).endswith(b" (127.0.0.1)")
