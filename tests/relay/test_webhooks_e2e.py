"""Webhooks end to end: real `mailplane relay` processes (SQLite alone, a PostgreSQL pool),
mail sent over SMTP to the capture sink, events posted to a real HTTPS receiver that checks
their signatures (tests/helpers/webhook.py)."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import psycopg
import pytest
import trustme

from tests.helpers.pki import write_ca_file
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.helpers.webhook import Receiver

pytestmark = pytest.mark.slow

SECRET = "0123456789abcdef0123456789abcdef"


def webhooks(receiver: Receiver, ca_file: Path) -> dict[str, Any]:
    return {"endpoint": {"url": receiver.url, "secrets": [SECRET]}, "caFile": str(ca_file),
            "allowPrivateNetworks": ["127.0.0.0/8"], "timeout": "2s",
            "retryInitial": "200ms", "retryMax": "500ms", "pollInterval": "100ms"}


async def send(relay: RelayProcess, i: int) -> None:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = f"user{i}@dest.test"
    msg["Subject"] = f"secret subject {i}"
    msg["Message-ID"] = f"<hook-{i}@example.com>"
    msg.set_content(f"secret body {i}\n")
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True, timeout=15)
    await smtp.connect()
    try:
        await smtp.login("app", "app-password")
        await smtp.send_message(msg)
    finally:
        await smtp.quit()


def delivered_ids(receiver: Receiver) -> dict[str, set[str]]:
    """queue id -> the event ids its delivered events came with."""
    out: dict[str, set[str]] = defaultdict(set)
    for post in receiver.accepted:
        if post.event["type"] == "delivered":
            out[post.event["message"]["queueId"]].add(post.event["id"])
    return out


async def test_no_event_is_lost_when_the_relay_is_killed_mid_backlog(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    sink: Sink = await smtp_sink()
    hook: Receiver = await webhook_receiver([SECRET.encode()])
    hook.refuse_with = 503  # the endpoint is down: a backlog builds up
    relay = relay_factory(smarthost_port=sink.port,
                          extra={"webhooks": webhooks(hook, write_ca_file(tls_ca, tmp_path))})
    await asyncio.to_thread(relay.start)
    for i in range(8):
        await send(relay, i)
    await sink.wait_for_messages(8, timeout=30)
    # Every delivered event reached the outbox (each was tried and refused at least once)...
    await hook.wait_for(lambda: len({p.event["id"] for p in hook.attempts
                                     if p.event["type"] == "delivered"}) == 8,
                        "an attempt of every delivered event", timeout=30)
    # ...and one post hangs when the relay dies: its lease is left behind.
    hook.script = ["hang"]
    await hook.wait_for(lambda: not hook.script, "the hanging post")
    await asyncio.to_thread(relay.kill)
    hook.refuse_with = None
    await asyncio.to_thread(relay.start)
    # The lease of the post in flight runs out (timeout + margin) and it is posted again.
    await hook.wait_for(lambda: len(delivered_ids(hook)) == 8, "every delivered event after "
                        "the restart", timeout=60)
    assert not hook.rejected
    # Duplicates only ever carry the same id: one id per message.
    assert all(len(ids) == 1 for ids in delivered_ids(hook).values())
    for post in hook.attempts:
        text = str(post.event)
        assert "secret subject" not in text and "secret body" not in text
    assert relay.metric("mailplane_relay_webhook_deliveries_total", result="success") >= 1
    assert relay.stop() == 0


async def test_a_pool_posts_each_event_once(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path, pg_dsn: str,
) -> None:
    sink: Sink = await smtp_sink()
    hook: Receiver = await webhook_receiver([SECRET.encode()])
    dsn_file = tmp_path / "store-dsn"
    dsn_file.write_text(pg_dsn + "\n")
    ca_file = write_ca_file(tls_ca, tmp_path)
    relays = [relay_factory(smarthost_port=sink.port, workers=2, extra={
        "store": {"backend": "postgresql", "dsnFile": str(dsn_file)},
        "webhooks": webhooks(hook, ca_file)}) for _ in range(2)]
    for r in relays:
        await asyncio.to_thread(r.start)
    await asyncio.gather(*(send(relays[i % 2], i) for i in range(16)))
    await sink.wait_for_messages(16, timeout=30)
    await hook.wait_for(lambda: len(delivered_ids(hook)) == 16, "every delivered event",
                        timeout=30)

    def backlog() -> int:
        with psycopg.connect(pg_dsn) as conn:
            row = conn.execute("SELECT count(*) FROM webhook_outbox").fetchone()
        return int(row[0]) if row else -1

    deadline = time.monotonic() + 20
    while await asyncio.to_thread(backlog):
        assert time.monotonic() < deadline, "the outbox never emptied"
        await asyncio.sleep(0.1)
    # Four worker processes in two relays post from one outbox: each event exactly once.
    ids = [p.event["id"] for p in hook.accepted]
    assert len(ids) == len(set(ids)) == 16, ids
    for r in relays:
        assert r.stop() == 0
