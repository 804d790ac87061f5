"""End to end: a team's suppression entry, added through the portal's API, stops that team's
mail and nobody else's. The real relay (a subprocess) and the portal share one store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiosmtplib
import pytest

from mailplane_relay.config import hash_password
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.portal.conftest import RunningPortal

ADDRESS = "x@dest.example"
SENDERS = {"shop-orders": ("shop", "orders@shop.example"),
           "blog-news": ("blog", "news@blog.example")}


async def _submit(relay: RelayProcess, username: str) -> None:
    """Send one message to ADDRESS with the credential; raises SMTPRecipientsRefused when the
    relay refuses the recipient."""
    _ns, sender = SENDERS[username]
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submissions"],
                           use_tls=True, tls_context=relay.client_tls(), timeout=10)
    await smtp.connect()
    try:
        await smtp.login(username, f"{username}-pw")
        await smtp.sendmail(sender, [ADDRESS],
                            f"From: {sender}\r\nSubject: hi\r\n\r\nhello\r\n".encode())
    finally:
        await smtp.quit()


async def test_a_teams_portal_entry_stops_only_its_own_mail(
    portal: RunningPortal, relay_factory: Callable[..., RelayProcess],
    smtp_sink: Callable[..., Awaitable[Sink]],
) -> None:
    sink = await smtp_sink()
    relay = relay_factory(
        smarthost_port=sink.port, domains=("shop.example", "blog.example"),
        extra={
            "messageLog": {"path": str(portal.db), "flushInterval": "50ms"},
            "credentials": [
                {"username": name, "passwordHash": hash_password(f"{name}-pw"),
                 "allowedSenders": [sender.partition("@")[2]], "owner": f"{ns}/{name}"}
                for name, (ns, sender) in SENDERS.items()],
        })
    await asyncio.to_thread(relay.start)

    # shop's user suppresses the address through the API: shop's own entry.
    alice = await asyncio.to_thread(portal.session, "alice-token")
    r = await asyncio.to_thread(alice.post,
                                portal.url + "/api/v1/namespaces/shop/suppression",
                                json={"address": ADDRESS, "note": "asked to stop"})
    assert r.status_code == 201, r.text

    # Within about a second every relay's cache has it: shop's mail to it is refused...
    deadline = time.monotonic() + 20
    while True:
        try:
            await _submit(relay, "shop-orders")
        except aiosmtplib.SMTPRecipientsRefused as exc:
            [refused] = exc.recipients
            assert refused.code == 550 and "suppression list" in refused.message, refused
            break
        assert time.monotonic() < deadline, "shop's entry never reached the relay"
        await asyncio.sleep(0.2)
    shop_sent = len(sink.messages)
    # ... and blog's mail to the same address is delivered.
    await _submit(relay, "blog-news")
    await sink.wait_for(lambda: any(m.mail_from == "news@blog.example"
                                    for m in sink.messages[shop_sent:]))
    delivered: list[Any] = [m for m in sink.messages[shop_sent:]
                            if m.mail_from == "news@blog.example"]
    assert [m.rcpt_tos for m in delivered] == [[ADDRESS]]
    # shop's mail still is not.
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await _submit(relay, "shop-orders")
    assert await asyncio.to_thread(relay.stop) == 0
