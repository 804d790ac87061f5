"""8BITMIME and SMTPUTF8 toward an upstream that offers neither: Postfix's smtp-sink run with
``-8`` (no 8BITMIME; it never offers SMTPUTF8). An 8-bit body is converted to quoted-printable
before DKIM signing, so the upstream gets 7-bit data whose signature verifies; a message that
needs SMTPUTF8 bounces with 554 5.6.9 (RFC 6531 §3.4, RFC 6533); one that cannot be converted
bounces with 554 5.6.3."""

from __future__ import annotations

import email
import email.policy
import os
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailplane_relay.config import RelayConfig
from mailplane_relay.dkim import public_key_record
from tests.helpers.ports import free_port
from tests.relay.test_delivery_flows import TIMEOUTS, Relay, make_config
from tests.relay.test_dkim_signer import rsa_pem

SMTP_SINK = "/usr/sbin/smtp-sink"
PEM = rsa_pem()
DOMAIN = {"name": "example.com", "dkim": {"selector": "s1", "algorithm": "rsa-sha256",
                                          "privateKey": PEM.decode()}}


class PostfixSink:
    def __init__(self) -> None:
        # smtp-sink writes as nobody: a directory it can reach (pytest's tmp_path is 0700).
        self._tmp = tempfile.TemporaryDirectory(prefix="postfix-sink-")
        self.directory = Path(self._tmp.name)
        self.directory.chmod(0o777)
        user = ["-u", "nobody"] if os.geteuid() == 0 else []
        # smtp-sink cannot bind port 0: its port is picked free and, when another process took
        # it meanwhile (smtp-sink exits: "Address already in use"), picked again.
        for _ in range(5):
            self.port = free_port()
            self.proc = subprocess.Popen(
                [SMTP_SINK, *user, "-8", "-d", f"{self.directory}/%H%M%S.",
                 f"127.0.0.1:{self.port}", "10"], stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE)
            error = self._wait_listening()
            if error is None:
                return
            assert "Address already in use" in error, f"smtp-sink exited: {error}"
        raise AssertionError("smtp-sink found no free port in 5 tries")

    def _wait_listening(self) -> str | None:
        """None once smtp-sink listens; its error output if it exited."""
        deadline = time.monotonic() + 20  # bounds a hang only
        while True:
            if self.proc.poll() is not None:
                return self.proc.stderr.read().decode(errors="replace") if self.proc.stderr \
                    else "smtp-sink exited"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return None
            except OSError:
                assert time.monotonic() < deadline, "smtp-sink did not listen"
                time.sleep(0.05)

    def dumps(self) -> list[bytes]:
        """Each message smtp-sink took, DSNs to the sender (MAIL FROM:<>) aside; a session
        without a transaction leaves an empty file."""
        return [d for p in sorted(self.directory.iterdir())
                if (d := p.read_bytes()) and b"\nX-Mail-Args: <>\n" not in d]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)
        if self.proc.stderr is not None:
            self.proc.stderr.close()
        self._tmp.cleanup()


@pytest.fixture
def postfix_sink() -> Iterator[PostfixSink]:
    assert Path(SMTP_SINK).exists(), "postfix is missing: scripts/bootstrap installs it"
    sink = PostfixSink()
    yield sink
    sink.stop()




def config(sink: PostfixSink) -> RelayConfig:
    return make_config({"mode": "smarthost", **TIMEOUTS, "smarthost": {
        "host": "127.0.0.1", "port": sink.port, "tls": "none"}},
        queue={"retryInitial": 0.2, "retryMax": 0.2}, domains=[DOMAIN])


HEAD = (b"From: App <app@example.com>\r\nTo: user@example.net\r\nSubject: Caf\xc3\xa9\r\n"
        b"Date: Fri, 27 Nov 2026 14:00:00 +0000\r\nMessage-ID: <m1@example.com>\r\n")


async def deliver(relay: Any, sink: PostfixSink, data: bytes) -> tuple[Relay, Any]:
    r = await relay(config(sink))
    msg = await r.send(["user@example.net"], data=data)
    await r.done(msg, timeout=20)
    return r, msg


async def test_an_8bit_body_is_sent_as_quoted_printable_and_its_signature_verifies(
        relay: Any, postfix_sink: PostfixSink) -> None:
    body = "Grüße aus Köln — à bientôt\r\n".encode() * 3 + b"=literal equals\r\n"
    data = (HEAD.replace(b"Caf\xc3\xa9", b"Cafe") + b"MIME-Version: 1.0\r\n"
            b"Content-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: 8bit\r\n"
            b"\r\n" + body)
    r, msg = await deliver(relay, postfix_sink, data)
    [event] = await r.events(msg)
    assert event["status"] == "delivered", event
    [dump] = postfix_sink.dumps()
    assert dump.isascii()
    assert b"X-Mail-Args: <app@example.com>\n" in dump  # no BODY=8BITMIME
    wire = dump.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert b"Content-Transfer-Encoding: quoted-printable\r\n" in wire
    assert b"Content-Transfer-Encoding: 8bit" not in wire
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    content = parsed.get_content().replace("\r\n", "\n")
    assert content.rstrip("\n") == body.decode().replace("\r\n", "\n").rstrip("\n")
    txt = public_key_record(PEM).encode()
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: txt)


async def test_a_multipart_message_has_only_its_8bit_parts_converted(
        relay: Any, postfix_sink: PostfixSink) -> None:
    data = (HEAD.replace(b"Caf\xc3\xa9", b"Cafe") + b"MIME-Version: 1.0\r\n"
            b'Content-Type: multipart/mixed; boundary="b1"\r\n\r\n'
            b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: 8bit\r\n\r\nna\xc3\xafve\r\n"
            b"--b1\r\nContent-Type: application/octet-stream\r\n"
            b"Content-Transfer-Encoding: base64\r\n\r\nAAEC\r\n--b1--\r\n")
    r, msg = await deliver(relay, postfix_sink, data)
    assert [e["status"] for e in await r.events(msg)] == ["delivered"]
    [dump] = postfix_sink.dumps()
    wire = dump.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    assert dump.isascii() and b"na=C3=AFve" in wire and b"AAEC" in wire
    parsed = email.message_from_bytes(wire, policy=email.policy.default)
    texts = [p.get_content() for p in parsed.iter_parts()]
    assert texts[0].strip() == "naïve" and texts[1] == b"\x00\x01\x02"
    txt = public_key_record(PEM).encode()
    assert dkim.verify(wire, dnsfunc=lambda name, timeout=5: txt)


async def test_utf8_headers_toward_an_upstream_without_smtputf8_bounce_with_5_6_9(
        relay: Any, postfix_sink: PostfixSink) -> None:
    r, msg = await deliver(relay, postfix_sink, HEAD + b"\r\nplain body\r\n")
    [event] = await r.events(msg)
    assert event["status"] == "bounced"
    assert event["response"].startswith("554 5.6.9 UTF-8 header message cannot be transferred")
    assert postfix_sink.dumps() == []


async def test_an_8bit_message_that_cannot_be_converted_bounces_with_5_6_3(
        relay: Any, postfix_sink: PostfixSink) -> None:
    attached = b"Subject: inner\r\nX-Note: r\xc3\xa9sum\xc3\xa9\r\n\r\ninner body\r\n"
    data = (HEAD.replace(b"Caf\xc3\xa9", b"Cafe") + b"MIME-Version: 1.0\r\n"
            b"Content-Type: message/rfc822\r\nContent-Transfer-Encoding: 8bit\r\n\r\n"
            + attached)
    r, msg = await deliver(relay, postfix_sink, data)
    [event] = await r.events(msg)
    assert event["status"] == "bounced"
    assert event["response"].startswith("554 5.6.3 Conversion required but not supported")
    assert postfix_sink.dumps() == []


async def test_an_address_with_only_its_domain_internationalised_goes_in_a_labels(
        relay: Any, postfix_sink: PostfixSink) -> None:
    """``user@bücher.example`` needs no SMTPUTF8 (RFC 6531 section 3.2): the domain goes in
    A-labels to an upstream without SMTPUTF8. A UTF-8 local part still bounces with 5.6.7."""
    r = await relay(config(postfix_sink))
    data = HEAD.replace(b"Caf\xc3\xa9", b"Cafe") + b"\r\nplain body\r\n"
    msg = await r.send(["user@b\u00fccher.example"], data=data)
    await r.done(msg, timeout=20)
    assert [e["status"] for e in await r.events(msg)] == ["delivered"]
    [dump] = postfix_sink.dumps()
    assert b"X-Rcpt-Args: <user@xn--bcher-kva.example>" in dump
    msg = await r.send(["p\u00e9l\u00e9@b\u00fccher.example"], data=data)
    await r.done(msg, timeout=20)
    [event] = await r.events(msg)
    assert event["response"].startswith("553 5.6.7 Destination does not support")
