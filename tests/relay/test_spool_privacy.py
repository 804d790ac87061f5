"""Privacy of the spool, end to end: once a message is final, nothing under the spool directory
holds its body, its subject or its recipients (privacy policy: content is kept only until
delivery). A real relay process delivers to a real sink; one recipient is refused, so a DSN is
made, spooled, sent and must be gone too."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink

pytestmark = pytest.mark.timeout(60)


def tree_bytes(directory: Path) -> bytes:
    """Names and contents of every file under ``directory`` (temp files and subdirectories
    included)."""
    out = []
    for p in sorted(directory.rglob("*")):
        out.append(str(p.relative_to(directory)).encode())
        if p.is_file():
            out.append(p.read_bytes())
    return b"\n".join(out)


@pytest.mark.parametrize("workers", [1, 2])
async def test_nothing_of_a_final_message_stays_in_the_spool(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any], workers: int,
) -> None:
    marker = uuid.uuid4().hex
    delivered_to = f"ok-{marker[:8]}@dest.test"
    refused = f"gone-{marker[8:16]}@dest.test"
    sink: Sink = await smtp_sink(rcpt_replies={refused: "550 5.1.1 No such user"})
    relay = relay_factory(smarthost_port=sink.port, workers=workers)
    await asyncio.to_thread(relay.start)
    deadline = time.monotonic() + 20  # /readyz is 200 once one worker is; wait for all
    while relay.metric("mailplane_relay_ready") < workers and time.monotonic() < deadline:
        await asyncio.sleep(0.05)

    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = f"{delivered_to}, {refused}"
    msg["Subject"] = f"subject {marker}"
    msg.set_content(f"body {marker}\n" + "filler line\n" * 200)
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submissions"],
                           use_tls=True, tls_context=relay.client_tls(), timeout=10)
    await smtp.connect()
    await smtp.login("app", "app-password")
    await smtp.send_message(msg, recipients=[delivered_to, refused])
    await smtp.quit()

    # The message reaches the delivered recipient, and a DSN (headers only) reaches the sender.
    await sink.wait_for(lambda: bool(sink.delivered_to(delivered_to))
                        and bool(sink.delivered_to("app@example.com")), timeout=20)
    assert marker.encode() in sink.delivered_to(delivered_to)[0].data
    [dsn] = sink.delivered_to("app@example.com")
    assert f"subject {marker}".encode() in dsn.data  # the DSN quotes the headers...
    assert f"body {marker}".encode() not in dsn.data  # ...never the body

    deadline = time.monotonic() + 20
    while ((relay.spooled_files() or relay.metric("mailplane_relay_queue_messages"))
           and time.monotonic() < deadline):
        await asyncio.sleep(0.05)
    assert relay.spooled_files() == []
    assert relay.metric("mailplane_relay_queue_messages") == 0

    content = tree_bytes(relay.spool_dir)
    assert marker.encode() not in content, "the subject or body is still on disk"
    for address in (delivered_to, refused):
        assert address.encode() not in content, "a recipient is still on disk"

    # And after a restart (recovery, temp-file cleanup) nothing comes back.
    assert await asyncio.to_thread(relay.stop) == 0
    await asyncio.to_thread(relay.start)
    assert relay.spooled_files() == []
    assert marker[:8].encode() not in tree_bytes(relay.spool_dir)
    await asyncio.to_thread(relay.kill)
