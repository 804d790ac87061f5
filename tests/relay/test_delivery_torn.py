"""A spooled message whose data fails its checksum at read (a write torn by a crash) is lost:
its undecided recipients get a final record in the message log, the sender a failure notice
(headers only as every notice, here none at all: they are gone too) as NOTIFY and the null
reverse-path allow, and the loss is counted. Real spool files torn on disk, a real sink."""

from __future__ import annotations

import email
import email.policy
from pathlib import Path
from typing import Any

from mailplane_relay.delivery.queue import LOST_REPLY
from mailplane_relay.spool import QueuedMessage
from tests.relay.test_delivery_flows import BODY, SinkFactory, make_config, smarthost

SECRET_SUBJECT = "Quarterly numbers (private)"


def long_message(to: str) -> bytes:
    return (f"From: App <app@example.com>\r\nTo: {to}\r\nSubject: {SECRET_SUBJECT}\r\n"
            "Message-ID: <torn@example.com>\r\n\r\n").encode() + BODY * 40


def tear(path: Path) -> None:
    """A torn write: the header and envelope are the message's, a later sector holds another
    message's bytes (same size)."""
    raw = path.read_bytes()
    assert raw.startswith(b"MPS2 ") and len(raw) > 2048
    torn = raw[:1024] + b"other-mail-body " * 32
    path.write_bytes(torn + raw[len(torn):])


async def commit_torn(r: Any, recipients: list[str], *, sender: str = "app@example.com",
                      dsn: list[tuple[tuple[str, ...] | None, str | None]] | None = None
                      ) -> QueuedMessage:
    msg: QueuedMessage = await r.spool.commit(
        mail_from=sender, recipients=recipients, data=long_message(recipients[0]),
        message_id="<torn@example.com>", credential="app1", sender_domain="example.com",
        listener="submission", dsn=dsn)
    tear(r.directory / "spool" / f"{msg.queue_id}.msg")
    r.queue.submit(msg)  # no data handed over: the attempt reads the spool
    return msg


def torn_count(r: Any) -> float:
    value = r.metrics.registry.get_sample_value("mailplane_relay_spool_torn_messages_total")
    return value or 0.0


async def test_a_torn_message_fails_its_recipients_and_tells_the_sender(
        relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    msg = await commit_torn(r, ["told@example.net", "quiet@example.net"],
                            dsn=[(None, None), (("NEVER",), None)])
    await r.done(msg)
    await sink.wait_for(lambda: len(sink.messages) == 1)
    await r.wait(lambda: r.queue.queued == 0)  # the notice was delivered

    # Nothing of the torn data went out; each recipient has its final record.
    [notice] = sink.messages
    assert notice.mail_from == "" and notice.rcpt_tos == ["app@example.com"]
    rows = await r.events(msg)
    for rcpt in ("told@example.net", "quiet@example.net"):
        assert r.statuses(rows, rcpt) == ["bounced"], rows
    assert {row["response"] for row in rows} == {LOST_REPLY}
    assert r.count("bounced") == 2 and r.count("deferred") == 0
    assert torn_count(r) == 1
    assert (r.directory / "spool" / "corrupt" / f"{msg.queue_id}.torn").exists()
    # The sender's reputation is not charged for the relay's loss.
    assert "app1" not in r.reputation._windows or r.reputation._windows["app1"].bounced == 0

    # The notice: failed, for the recipient whose NOTIFY allows it only, saying the message
    # is lost, with no header part and no byte of the message.
    assert BODY not in notice.data and b"other-mail" not in notice.data
    assert SECRET_SUBJECT.encode() not in notice.data
    parsed = email.message_from_bytes(notice.data, policy=email.policy.default)
    assert isinstance(parsed, email.message.EmailMessage)
    parts = list(parsed.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain",
                                                     "message/delivery-status"]
    text = parts[0].get_content()
    assert "lost this message" in text and "send it again" in text
    assert "<told@example.net>: not delivered: the relay lost the message" in text
    status = parts[1].as_string()
    assert "Final-Recipient: rfc822; told@example.net" in status
    assert "quiet@example.net" not in status
    assert "Action: failed" in status and "Status: 5.3.0" in status


async def test_a_torn_message_of_the_null_sender_is_logged_and_not_reported(
        relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    msg = await commit_torn(r, ["user@example.net"], sender="")
    await r.done(msg)
    rows = await r.events(msg)
    assert r.statuses(rows, "user@example.net") == ["bounced"]
    assert torn_count(r) == 1
    await r.wait(lambda: r.queue.queued == 0)
    assert sink.messages == [] and r.spooled() == []
