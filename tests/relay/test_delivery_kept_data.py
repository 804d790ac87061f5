"""A freshly committed message's first attempt sends the bytes handed over at the commit instead
of reading them back from the spool; that copy is bounded in size and leaves memory with the
attempt, or when the message is held or deleted first."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from mailplane_relay.delivery import queue as queue_module
from tests.relay.test_delivery_flows import BODY, SinkFactory, make_config, message, smarthost


async def test_the_first_attempt_sends_the_committed_bytes(relay: Any, smtp_sink: SinkFactory
                                                           ) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    data = message("user@example.net")
    msg = await r.spool.commit(
        mail_from="app@example.com", recipients=["user@example.net"], data=data,
        message_id=None, credential="app1", sender_domain="example.com", listener="submission")
    # The message file is out of the spool's reach before the queue sees the message (no
    # await in between): a read of it would fail and defer the recipient.
    path = r.directory / "spool" / f"{msg.queue_id}.msg"
    os.rename(path, r.directory / "moved-away")
    r.queue.submit(msg, data)
    await r.done(msg)
    [got] = sink.messages
    assert got.rcpt_tos == ["user@example.net"] and got.data.endswith(BODY)
    assert r.queue._kept_bytes == 0 and not r.queue._kept_data


async def test_kept_data_is_bounded_and_goes_with_a_hold_or_a_deletion(
        relay: Any, smtp_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "MAX_KEPT_BYTES", 2 * len(message("a@example.net")))
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    later = time.time() + 3600
    held = []
    for rcpt in ("a@example.net", "b@example.net", "c@example.net"):
        data = message(rcpt)
        msg = await r.spool.commit(
            mail_from="app@example.com", recipients=[rcpt], data=data, message_id=None,
            credential="app1", sender_domain="example.com", listener="submission")
        msg.next_attempt = later  # not due: kept until held or deleted
        r.queue.submit(msg, data)
        held.append(msg)
    # Two fit in the budget; the third's attempt will read the spool.
    assert len(r.queue._kept_data) == 2
    assert r.queue._kept_bytes == sum(len(message(a)) for a in ("a@example.net",
                                                                 "b@example.net"))
    assert await r.queue.hold(held[0].queue_id)
    assert list(r.queue._kept_data) == [held[1].queue_id]
    await r.queue.delete(held[1].queue_id)
    assert r.queue._kept_bytes == 0 and not r.queue._kept_data
    assert sink.messages == []
