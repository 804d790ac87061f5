"""Every reply of the intake listener carries an enhanced status code (RFC 3463), aiosmtpd's
built-in ones included, except the greeting and the HELO/EHLO replies (RFC 2034). A real
client (smtplib) talks to the real listener."""

from __future__ import annotations

import asyncio
import re
import smtplib

from mailplane_relay.config import RelayConfig, RelaySettings
from mailplane_relay.intake.listener import IntakeHandler, IntakeServer
from mailplane_relay.metrics import RelayMetrics
from tests.relay.test_intake_matching import DOMAIN, KEY, Log, Suppression

ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3} ")


def session(port: int) -> list[tuple[str, int, str]]:
    replies: list[tuple[str, int, str]] = []
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as smtp:
        for command in ("NOOP", "RSET", "MAIL FROM:<>", "BOGUS", "RCPT TO:<x@y>", "DATA",
                        "VRFY someone", "HELP", "MAIL FROM:", "STARTTLS now", "AUTH PLAIN"):
            if command == "MAIL FROM:<>":
                code, text = smtp.ehlo("mx.receiver.test")
                # The EHLO reply names the host and the extensions, with no codes.
                assert code == 250 and not re.search(rb"[245]\.\d\.\d", text), text
            code, text = smtp.docmd(command)
            replies.append((command, code, text.decode()))
        smtp.docmd("RSET")
        code, text = smtp.docmd("MAIL FROM:<>")
        replies.append(("MAIL", code, text.decode()))
        code, text = smtp.docmd("MAIL FROM:<>")
        replies.append(("MAIL again", code, text.decode()))
        code, text = smtp.docmd("QUIT")
        replies.append(("QUIT", code, text.decode()))
    return replies


async def test_every_reply_after_the_greeting_has_an_enhanced_status_code() -> None:
    cfg = RelayConfig(settings=RelaySettings.model_validate({
        "tls": {"certFile": "/c", "keyFile": "/k"}, "domains": [{"name": "example.com"}],
        "intake": {"domain": DOMAIN, "keyFile": "/unused", "address": "127.0.0.1"}}))
    metrics = RelayMetrics.create()

    async def hard_bounce(address: str, response: str, now: float) -> None:
        pass

    handler = IntakeHandler(config=lambda: cfg, key=lambda: KEY, log=Log([]),
                            suppression=Suppression(), metrics=metrics, reputation=None,
                            hard_bounce=hard_bounce)
    server = IntakeServer(config=lambda: cfg, tls=None, handler=handler, metrics=metrics)
    await server.start(port=0)
    try:
        replies = await asyncio.to_thread(session, server.port)
    finally:
        await server.stop()
    missing = [r for r in replies if not ENHANCED.match(r[2])]
    assert not missing, missing
    codes = {command: code for command, code, _ in replies}
    assert codes["BOGUS"] == 500 and codes["RCPT TO:<x@y>"] == 550 and codes["DATA"] == 503
    assert codes["MAIL again"] == 503 and codes["QUIT"] == 221
