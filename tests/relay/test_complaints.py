"""Complaints recorded on the suppression list reach the complaint metric of the sender that
delivered to the address: the real relay process, the real CLI, a real sink.

Every address given a non-complaint entry did receive mail (from example.org), so removing the
reason filter would count them; they are added before the complaint that is waited for (about
mail from example.com), and entries are handed to the callback in the order they were added, so
once example.com's complaint is counted the earlier entries have been through the callback too."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Callable
from typing import Any

from tests.helpers.relayproc import RelayProcess, relay_command
from tests.helpers.sink import Sink
from tests.relay.test_app_lifecycle import client, eventually, message


async def test_only_complaints_are_counted_against_the_sender_that_delivered(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, domains=("example.com", "example.org"))
    await asyncio.to_thread(relay.start)
    smtp = await client(relay)
    await smtp.send_message(message(1, sender="app@example.com"))
    for i in (2, 3, 4):
        await smtp.send_message(message(i, sender="app@example.org"))
    await smtp.quit()
    await sink.wait_for_messages(4)
    await eventually(
        lambda: relay.metric("mailplane_relay_recipients_total", outcome="delivered",
                             sender_domain="example.org", credential="app") == 3
        and relay.metric("mailplane_relay_recipients_total", outcome="delivered",
                         sender_domain="example.com", credential="app") == 1,
        "the deliveries")

    def add(address: str, reason: str) -> None:
        subprocess.run(
            [*relay_command()[:-1], "suppression", "add", address, "--reason", reason,
             "--config", str(relay.config_dir)],
            capture_output=True, text=True, timeout=30, check=True)

    def complaints(domain: str) -> float | None:
        value: float | None = relay.metric("mailplane_relay_complaints_total",
                                           sender_domain=domain, credential="app")
        return value

    # Addresses that received mail from example.org, with reasons other than a complaint ...
    add("user2@dest.test", "manual")
    add("user3@dest.test", "bounce")
    add("user4@dest.test", "hard-bounce")
    # ... and a complaint about an address nobody delivered to.
    add("someone@dest.test", "complaint")
    # The complaint that is counted, after all of those.
    add("user1@dest.test", "complaint")
    await eventually(lambda: complaints("example.com") == 1,
                     "the complaint counted against example.com / app")
    assert not complaints("example.org"), "a non-complaint entry was counted as a complaint"
    series = [line for line in relay.metrics().splitlines()
              if line.startswith("mailplane_relay_complaints_total{")]
    assert len(series) == 1, series
    assert relay.metric("mailplane_relay_suppression_entries") == 5
