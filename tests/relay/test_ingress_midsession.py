"""What happens to a session while things change under it, against the real relay process:
a credential removed by hot reload stops working in sessions already authenticated with it,
and a message whose commit finishes after its client left is still delivered, once."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.relay.test_app_lifecycle import client, eventually, message


async def test_a_credential_removed_by_reload_stops_working_in_open_sessions(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port,
                          credentials={"app": "app-password", "other": "other-password"})
    await asyncio.to_thread(relay.start)
    smtp = await client(relay)  # authenticated as "app" before the reload
    await smtp.send_message(message(1))

    spec = relay.spec()
    spec["credentials"] = [c for c in spec["credentials"] if c["username"] != "app"]
    reloads = relay.metric("mailplane_relay_config_reloads_total", result="success")
    relay.write_config(spec)
    await eventually(
        lambda: relay.metric("mailplane_relay_config_reloads_total", result="success")
        > reloads, "the reload")

    with pytest.raises(aiosmtplib.SMTPResponseException) as refused:
        await smtp.send_message(message(2))
    assert refused.value.code in (530, 535, 554), refused.value
    assert refused.value.message.startswith("5.7."), refused.value
    await smtp.quit()
    # A fresh login with the removed password fails too.
    with pytest.raises(aiosmtplib.SMTPAuthenticationError):
        await client(relay)
    await sink.wait_for_messages(1)
    assert [m.rcpt_tos for m in sink.messages] == [["user1@dest.test"]]


async def test_a_message_whose_client_left_before_the_reply_is_delivered_once(
        relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)

    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.ports["submissions"], ssl=relay.client_tls(),
        server_hostname="127.0.0.1")

    async def reply() -> bytes:
        line = await asyncio.wait_for(reader.readline(), 10)
        while line[3:4] == b"-":
            line = await asyncio.wait_for(reader.readline(), 10)
        return line

    assert (await reply()).startswith(b"220")
    auth = base64.b64encode(b"\0app\0app-password").decode()
    for command, code in ((b"EHLO client.test", b"250"), (f"AUTH PLAIN {auth}".encode(), b"235"),
                          (b"MAIL FROM:<app@example.com>", b"250"),
                          (b"RCPT TO:<left@dest.test>", b"250"), (b"DATA", b"354")):
        writer.write(command + b"\r\n")
        assert (await reply()).startswith(code), command
    body = message(7).as_bytes().replace(b"\n", b"\r\n")
    # The whole message and the final dot, then the client goes away without the reply.
    writer.write(body + b".\r\n")
    await writer.drain()
    writer.transport.abort()

    await sink.wait_for_messages(1)
    assert sink.messages[0].rcpt_tos == ["left@dest.test"]
    await eventually(lambda: relay.metric("mailplane_relay_recipients_total",
                                          outcome="delivered") == 1, "the delivery counted")
    # The message is final (nothing left in the spool to retry), delivered once, and the
    # relay is healthy.
    await eventually(lambda: not relay.spooled_files(), "the spool emptied")
    assert len(sink.messages) == 1
    assert relay.readyz()[0] == 200
    assert "Traceback" not in relay.log_since_start()


