"""Complaints recorded on the suppression list reach the complaint metric of the sender that
delivered to the address: the real relay process, the real CLI, a real sink."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

from tests.helpers.relayproc import RelayProcess, relay_command
from tests.helpers.sink import Sink
from tests.relay.test_app_lifecycle import client, eventually, message


async def test_a_complaint_is_counted_against_the_sender_that_delivered(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)
    smtp = await client(relay)
    await smtp.send_message(message(1))
    await smtp.quit()
    await sink.wait_for_messages(1)
    await eventually(
        lambda: relay.metric("mailplane_relay_recipients_total", outcome="delivered",
                             sender_domain="example.com", credential="app") == 1,
        "the delivery")

    def add(address: str, reason: str) -> None:
        subprocess.run(
            [*relay_command()[:-1], "suppression", "add", address, "--reason", reason,
             "--config", str(relay.config_dir)],
            capture_output=True, text=True, timeout=30, check=True)

    add("user1@dest.test", "complaint")
    await eventually(
        lambda: relay.metric("mailplane_relay_complaints_total", sender_domain="example.com",
                             credential="app") == 1,
        "the complaint counted against example.com / app")
    # Other reasons, and complaints about addresses nobody delivered to, count nothing.
    add("someone@dest.test", "complaint")
    add("user2@dest.test", "manual")
    await eventually(
        lambda: relay.metric("mailplane_relay_suppression_entries") == 3, "all three entries")
    assert relay.metric("mailplane_relay_complaints_total", sender_domain="example.com",
                        credential="app") == 1
    series = [line for line in relay.metrics().splitlines()
              if line.startswith("mailplane_relay_complaints_total{")]
    assert len(series) == 1, series
