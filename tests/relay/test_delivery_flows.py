"""DeliveryQueue end to end: the real Spool, MessageLog and SuppressionList, delivering over
loopback to aiosmtpd sinks, resolving MX records through a real DNS server."""

from __future__ import annotations

import asyncio
import email
import email.policy
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import dkim
import pytest

from mailplane_relay.config import Credential, RelayConfig, RelaySettings, hash_password
from mailplane_relay.delivery import DeliveryQueue
from mailplane_relay.dkim import public_key_record
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.reputation import Reputation
from mailplane_relay.spool import QueuedMessage, Spool
from mailplane_relay.store import MessageLog, SqliteBackend, SuppressionList
from mailplane_relay.store.sync import query_log
from tests.helpers.dns import LoopbackDNS
from tests.helpers.ports import refusing_port
from tests.helpers.sink import Sink
from tests.relay.test_dkim_signer import ed25519_pem, rsa_pem

SinkFactory = Callable[..., Awaitable[Sink]]

FAST_RETRY = {"retryInitial": 0.05, "retryMax": 0.05, "retryJitter": 0, "maxLifetime": 60}
TIMEOUTS = {"connectTimeout": 2, "commandTimeout": 2, "messageDeadline": 10}
BODY = b"This body is confidential and must never reach a log or a DSN.\r\n"


def message(to: str = "user@example.net", sender: str = "app@example.com",
            subject: str = "Hello") -> bytes:
    return (f"From: App <{sender}>\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Date: Fri, 27 Nov 2026 14:00:00 +0000\r\n"
            f"Message-ID: <{time.time_ns()}@example.com>\r\n\r\n").encode() + BODY


def smarthost(sink: Sink, **extra: Any) -> dict[str, Any]:
    return {"mode": "smarthost", **TIMEOUTS,
            "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none", **extra}}


def mx_mode(dns: LoopbackDNS, port: int, **extra: Any) -> dict[str, Any]:
    return {"mode": "mx", "mxPort": port, "resolver": dns.resolver_settings(timeout=0.5),
            **TIMEOUTS, **extra}


def make_config(delivery: dict[str, Any], queue: dict[str, Any] | None = None,
                domains: list[dict[str, Any]] | None = None) -> RelayConfig:
    settings = RelaySettings.model_validate({
        "hostname": "relay.test",
        "tls": {"certFile": "/nonexistent/cert.pem", "keyFile": "/nonexistent/key.pem"},
        "delivery": delivery,
        "queue": {**FAST_RETRY, **(queue or {})},
        "domains": domains or [{"name": "example.com"}],
    })
    return RelayConfig(settings=settings)


class Relay:
    """The delivery side of a relay worker, wired as app.py wires it."""

    def __init__(self, directory: Path, config: RelayConfig) -> None:
        self.directory = directory
        self.config = config
        self.metrics = RelayMetrics.create()
        self.spool = Spool(str(directory / "spool"), fsync=False,
                           metrics=self.metrics)
        self.db = str(directory / "messagelog.sqlite3")
        self.store = SqliteBackend(self.db)
        self.log = MessageLog(self.store, flush_interval=0.05, metrics=self.metrics)
        self.suppression = SuppressionList(self.store, self.metrics)
        self.reputation = Reputation(lambda: self.config.settings.abuse)
        self.queue = DeliveryQueue(config=lambda: self.config, spool=self.spool, log=self.log,
                                   suppression=self.suppression, metrics=self.metrics,
                                   reputation=self.reputation)

    async def start(self) -> list[QueuedMessage]:
        recovered = await self.spool.start()
        await self.store.open()
        await self.log.start()
        await self.suppression.start()
        await self.queue.start(recovered)
        return recovered

    async def stop(self, grace: float = 2.0) -> None:
        await self.queue.stop(time.monotonic() + grace)
        await self.suppression.close()
        await self.log.close()
        await self.store.close()
        await self.spool.close()

    async def send(self, recipients: list[str], *, sender: str = "app@example.com",
                   data: bytes | None = None) -> QueuedMessage:
        msg = await self.spool.commit(
            mail_from=sender, recipients=recipients, data=data or message(recipients[0], sender),
            message_id=None, credential="app1", sender_domain="example.com",
            listener="submission")
        self.queue.submit(msg)
        return msg

    async def wait(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        async with asyncio.timeout(timeout):
            await self.queue.wait_until(predicate)

    async def done(self, msg: QueuedMessage, timeout: float = 10.0) -> None:
        await self.wait(lambda: self.queue.message(msg.queue_id) is None, timeout)

    async def events(self, msg: QueuedMessage) -> list[dict[str, Any]]:
        await self.log.flush()
        rows = query_log(self.db, queue_id=msg.queue_id)
        return sorted(rows, key=lambda r: (r["ts"], r.get("id", 0)))

    def statuses(self, rows: list[dict[str, Any]], recipient: str) -> list[str]:
        return [r["status"] for r in rows if r["recipient"] == recipient]

    def count(self, outcome: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "mailplane_relay_recipients_total",
            {"outcome": outcome, "sender_domain": "example.com", "credential": "app1"})
        return value or 0.0

    def spooled(self) -> list[str]:
        return sorted(p.name for p in (self.directory / "spool").glob("*.msg"))




@pytest.fixture(params=[False, True], ids=["one-by-one", "pipelined"])
def smtp_sink(smtp_sink: SinkFactory, request: pytest.FixtureRequest) -> SinkFactory:
    """Every flow runs against a sink without PIPELINING (one command per round trip) and one
    with it (MAIL, RCPT and DATA in one write): both transaction paths give the same outcomes."""

    async def make(*args: Any, **behaviour: Any) -> Sink:
        behaviour.setdefault("pipelining", request.param)
        return await smtp_sink(*args, **behaviour)

    return make


def dsns(sink: Sink) -> list[email.message.EmailMessage]:
    out = []
    for m in sink.messages:
        if m.mail_from == "":
            parsed = email.message_from_bytes(m.data, policy=email.policy.default)
            assert isinstance(parsed, email.message.EmailMessage)
            out.append(parsed)
    return out


# ------------------------------------------------------------------------------ smarthost


async def test_smarthost_plain_delivery_logs_and_counts(relay: Any, smtp_sink: SinkFactory
                                                        ) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["user@example.net", "other@example.org"])
    await r.done(msg)

    [got] = sink.messages
    assert got.mail_from == "app@example.com"
    assert got.rcpt_tos == ["user@example.net", "other@example.org"]
    assert got.data.endswith(BODY) and not got.tls
    rows = await r.events(msg)
    assert {(e["recipient"], e["status"]) for e in rows} == {
        ("user@example.net", "delivered"), ("other@example.org", "delivered")}
    for e in rows:
        assert e["remote"] == f"127.0.0.1:{sink.port}"
        assert e["response"].startswith("250 2.0.0")
        assert e["attempt"] == 1 and e["credential"] == "app1"
        assert "confidential" not in str(e)
    assert r.count("delivered") == 2
    latency = r.metrics.registry.get_sample_value(
        "mailplane_relay_delivery_latency_seconds_count")
    assert latency == 2
    assert r.spooled() == []
    assert r.metrics.registry.get_sample_value("mailplane_relay_queue_messages") == 0


async def test_smarthost_starttls_with_verified_certificate_and_auth(
        relay: Any, smtp_sink: SinkFactory, tmp_path: Path) -> None:
    sink = await smtp_sink(starttls=True, require_starttls=True, auth={"relay": "s3cret"})
    password_file = tmp_path / "smarthost-password"
    password_file.write_text("s3cret\n")
    r = await relay(make_config(smarthost(
        sink, tls="starttls", caFile=sink.ca_file, username="relay",
        passwordFile=str(password_file))))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    [got] = sink.messages
    assert got.tls and got.auth_user == "relay"
    [event] = await r.events(msg)
    assert event["status"] == "delivered" and event["remote"].endswith(" tls")


async def test_smarthost_implicit_tls(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(implicit_tls=True)
    r = await relay(make_config(smarthost(sink, tls="implicit", caFile=sink.ca_file)))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert sink.messages[0].tls


async def test_untrusted_smarthost_certificate_defers(relay: Any, smtp_sink: SinkFactory
                                                      ) -> None:
    sink = await smtp_sink(starttls=True)
    # No caFile: the system trust store does not know the sink's throwaway CA.
    r = await relay(make_config(smarthost(sink, tls="starttls"), queue={"retryInitial": 30,
                                                                        "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1, 10)
    [event] = await r.events(msg)
    assert event["status"] == "deferred" and event["response"].startswith("451 4.7.5")
    assert sink.messages == []


async def test_wrong_smarthost_password_defers(relay: Any, smtp_sink: SinkFactory,
                                               tmp_path: Path) -> None:
    sink = await smtp_sink(starttls=True, auth={"relay": "right"})
    password_file = tmp_path / "pw"
    password_file.write_text("wrong")
    r = await relay(make_config(smarthost(
        sink, tls="starttls", caFile=sink.ca_file, username="relay",
        passwordFile=str(password_file)), queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1, 10)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.0") and "AUTH" in event["response"]
    assert "wrong" not in event["response"]


# ------------------------------------------------------------------------------ outcomes


async def test_4xx_is_deferred_then_delivered_on_retry(relay: Any, smtp_sink: SinkFactory
                                                       ) -> None:
    sink = await smtp_sink(rcpt_replies={"user@example.net": "451 4.2.0 Try again later"})
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") >= 1, 10)
    sink.behaviour.rcpt_replies.clear()
    await r.done(msg)
    rows = await r.events(msg)
    statuses = r.statuses(rows, "user@example.net")
    assert statuses[0] == "deferred" and statuses[-1] == "delivered"
    assert rows[0]["response"] == "451 4.2.0 Try again later"
    assert rows[-1]["attempt"] == len(statuses)
    assert len(sink.messages) == 1


async def test_hard_bounce_sends_dsn_and_suppresses(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user here"})
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["gone@example.net"], data=message("gone@example.net",
                                                          subject="Private subject"))
    await r.done(msg)
    await sink.wait_for(lambda: len(dsns(sink)) == 1)

    [event] = await r.events(msg)
    assert event["status"] == "bounced"
    assert event["response"] == "550 5.1.1 No such user here"
    entry = r.suppression.is_suppressed("gone@example.net")
    assert entry is not None and "5.1.1" in entry[0]
    [dsn] = dsns(sink)
    [raw] = [m for m in sink.messages if m.mail_from == ""]
    assert raw.rcpt_tos == ["app@example.com"]
    assert BODY not in raw.data
    assert dsn.get_content_type() == "multipart/report"
    status = list(dsn.iter_parts())[1].as_string()
    assert "Final-Recipient: rfc822; gone@example.net" in status
    assert "Status: 5.1.1" in status
    assert r.count("bounced") == 1
    assert r.reputation._windows["app1"].bounced == 1  # feeds the sender's bounce rate


async def test_a_bounce_of_utf8_mail_gets_an_rfc6533_notice(relay: Any,
                                                             smtp_sink: SinkFactory) -> None:
    """A sender and a recipient with UTF-8 local parts (SMTPUTF8 end to end): the notice is
    internationalised (RFC 6533), delivered back under SMTPUTF8, and read by the email
    package."""
    sink = await smtp_sink(smtputf8=True,
                           rcpt_replies={"zoë@exämple.net": "550 5.1.1 No such user here"})
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["zoë@exämple.net"], sender="josé@example.com",
                       data=message("zoë@exämple.net", subject="Private subject"))
    await r.done(msg)
    await sink.wait_for(lambda: len([m for m in sink.messages if m.mail_from == ""]) == 1)
    [raw] = [m for m in sink.messages if m.mail_from == ""]
    assert raw.rcpt_tos == ["josé@example.com"] and "SMTPUTF8" in raw.mail_options
    assert BODY not in raw.data
    dsn = email.message_from_string(raw.data.decode(), policy=email.policy.default)
    assert dsn.get_param("report-type") == "global-delivery-status"
    parts = list(dsn.iter_parts())
    assert [p.get_content_type() for p in parts] == [
        "text/plain", "message/global-delivery-status", "message/global-headers"]
    [per_message] = parts[1].get_payload()
    per_recipient = email.message_from_string(per_message.get_payload().strip())
    assert per_recipient["Final-Recipient"] == "utf-8; zoë@exämple.net"
    assert per_recipient["Status"] == "5.1.1"
    [returned] = parts[2].get_payload()
    assert returned["Subject"] == "Private subject"


async def test_soft_5xx_bounces_without_suppression(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"full@example.net": "552 5.2.2 Mailbox full"})
    r = await relay(make_config(smarthost(sink), queue={"dsn": False}))
    msg = await r.send(["full@example.net"])
    await r.done(msg)
    [event] = await r.events(msg)
    assert event["status"] == "bounced"
    assert r.suppression.is_suppressed("full@example.net") is None
    assert sink.messages == []  # dsn: false


async def test_5xx_at_data_bounces_every_recipient(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_reply="554 5.7.1 Message rejected as spam")
    r = await relay(make_config(smarthost(sink), queue={"dsn": False}))
    msg = await r.send(["a@example.net", "b@example.net"])
    await r.done(msg)
    rows = await r.events(msg)
    assert {e["status"] for e in rows} == {"bounced"} and len(rows) == 2
    assert r.suppression.is_suppressed("a@example.net") is None


async def test_mixed_outcomes_in_one_message(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={
        "later@example.net": "450 4.2.1 Mailbox busy",
        "gone@example.net": "550 5.1.1 No such user",
    })
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["ok@example.net", "later@example.net", "gone@example.net"])
    await r.wait(lambda: r.count("deferred") >= 1, 10)
    # While one recipient is pending no DSN goes out yet.
    assert dsns(sink) == []
    sink.behaviour.rcpt_replies.pop("later@example.net")
    await r.done(msg)
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    rows = await r.events(msg)
    assert r.statuses(rows, "ok@example.net") == ["delivered"]
    assert r.statuses(rows, "gone@example.net") == ["bounced"]
    assert r.statuses(rows, "later@example.net")[-1] == "delivered"
    normal = [m for m in sink.messages if m.mail_from]
    # The retry carried only the recipient still pending.
    assert [m.rcpt_tos for m in normal] == [["ok@example.net"], ["later@example.net"]]
    status = list(dsns(sink)[0].iter_parts())[1].as_string()
    assert "gone@example.net" in status and "later@example.net" not in status


async def test_upstream_down_defers(relay: Any) -> None:
    with refusing_port() as port:  # nothing listens here, and nothing can start to
        await _upstream_down_defers(relay, port)


async def _upstream_down_defers(relay: Any, port: int) -> None:
    config = make_config({"mode": "smarthost", **TIMEOUTS,
                          "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"}},
                         queue={"retryInitial": 30, "retryMax": 30})
    r = await relay(config)
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1, 10)
    [event] = await r.events(msg)
    assert event["status"] == "deferred" and event["response"].startswith("451 4.4.1")
    queued = r.queue.message(msg.queue_id)
    assert queued is not None and queued.next_attempt > time.time() + 20
    assert r.spooled() == [f"{msg.queue_id}.msg"]
    attempts = r.metrics.registry.get_sample_value(
        "mailplane_relay_delivery_attempts_total", {"result": "deferred"})
    assert attempts == 1


async def test_slow_upstream_times_out_and_defers(relay: Any, smtp_sink: SinkFactory) -> None:
    # The reply to the final dot has its own timeout (RFC 5321: 10 minutes by default).
    sink = await smtp_sink(data_delay=3.0)
    delivery = smarthost(sink) | {"dataDoneTimeout": 0.3}
    r = await relay(make_config(delivery, queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1, 10)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.4.2")


async def test_message_deadline_bounds_a_whole_attempt(relay: Any, smtp_sink: SinkFactory
                                                       ) -> None:
    # Each RCPT is within the command timeout, but together they exceed the deadline.
    sink = await smtp_sink(rcpt_delay=0.15)
    delivery = smarthost(sink) | {"commandTimeout": 1, "messageDeadline": 0.4}
    r = await relay(make_config(delivery, queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send([f"u{i}@example.net" for i in range(6)])
    await r.wait(lambda: r.count("deferred") == 6, 10)
    rows = await r.events(msg)
    assert {e["response"] for e in rows} == {
        "451 4.4.7 Delivery attempt timed out (messageDeadline)"}
    assert sink.messages == []


async def test_expiry_after_max_lifetime_sends_dsn(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"stuck@example.net": "451 4.4.1 Try later"})
    r = await relay(make_config(smarthost(sink), queue={"maxLifetime": 0.3}))
    msg = await r.send(["stuck@example.net"])
    await r.done(msg)
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    statuses = r.statuses(await r.events(msg), "stuck@example.net")
    assert statuses[-1] == "expired" and set(statuses[:-1]) <= {"deferred"}
    assert len(statuses) >= 2
    assert r.count("expired") == 1
    assert r.suppression.is_suppressed("stuck@example.net") is None
    dsn = dsns(sink)[0]
    assert "expired" in str(dsn["Subject"]).lower()
    assert "Status: 5.4.1" in list(dsn.iter_parts())[1].as_string()


async def test_null_sender_never_gets_a_dsn(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user"})
    r = await relay(make_config(smarthost(sink)))
    msg = await r.send(["gone@example.net"], sender="")
    await r.done(msg)
    assert r.spooled() == []
    assert sink.messages == []
    assert r.queue.queued == 0


async def test_already_suppressed_recipient_is_not_sent(relay: Any, smtp_sink: SinkFactory
                                                        ) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    await r.suppression.add("blocked@example.net", "complaint", source="test")
    msg = await r.send(["blocked@example.net", "ok@example.net"])
    await r.done(msg)
    rows = await r.events(msg)
    assert r.statuses(rows, "blocked@example.net") == ["suppressed"]
    assert r.count("suppressed") == 1
    # The sender was told 250, so a DSN says this copy was not sent.
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    assert [m.rcpt_tos for m in sink.messages if m.mail_from] == [["ok@example.net"]]
    assert "suppression list" in dsns(sink)[0].as_string()


async def test_a_team_s_own_entry_stops_only_that_team_s_queued_mail(
        relay: Any, smtp_sink: SinkFactory) -> None:
    """Checked again at delivery (a message queued before the entry was added): an entry a
    team added stops the mail of that team's credentials only."""
    sink = await smtp_sink()
    cfg = make_config(smarthost(sink))
    settings = cfg.settings.model_copy(update={"credentials": (Credential.model_validate({
        "username": "app1", "passwordHash": hash_password("unused"),
        "allowedSenders": ["example.com"], "owner": "shop/app1"}),)})
    r = await relay(RelayConfig(settings=settings))
    await r.store.suppression_upsert("mine@example.net", "manual", "portal:shop:alice", 1.0,
                                     namespace="shop")
    await r.store.suppression_upsert("theirs@example.net", "manual", "portal:blog:bob", 1.0,
                                     namespace="blog")
    assert await r.suppression.refresh()
    msg = await r.send(["mine@example.net", "theirs@example.net"])
    await r.done(msg)
    rows = await r.events(msg)
    assert r.statuses(rows, "mine@example.net") == ["suppressed"]
    assert r.statuses(rows, "theirs@example.net") == ["delivered"]
    assert [m.rcpt_tos for m in sink.messages if m.mail_from] == [["theirs@example.net"]]


# ------------------------------------------------------------------------------ MX mode


async def sinks_on_one_port(smtp_sink: SinkFactory, first_host: str, second_host: str,
                            **first: Any) -> tuple[Sink, Sink]:
    """Two sinks on one port number (MX delivery uses one port, the relay's mxPort), on two
    loopback addresses; if that port is taken on the second address, both start again."""
    for _ in range(10):
        one = await smtp_sink(host=first_host, **first)
        try:
            return one, await smtp_sink(host=second_host, port=one.port)
        except OSError:
            continue
    raise RuntimeError(f"no port free on both {first_host} and {second_host}")


async def test_mx_preference_order_and_fallback_to_next_host(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    low, high = await sinks_on_one_port(smtp_sink, "127.0.0.1", "127.0.0.2")
    dns_server.add_mx("example.net", "mx-b.example.net", 20)
    dns_server.add_mx("example.net", "mx-a.example.net", 10)
    dns_server.add_a("mx-a.example.net", "127.0.0.2")
    dns_server.add_a("mx-b.example.net", "127.0.0.1")
    r = await relay(make_config(mx_mode(dns_server, low.port)))
    first = await r.send(["user@example.net"])
    await r.done(first)
    assert len(high.messages) == 1 and low.messages == []
    # The preferred host goes away: the next MX takes the mail in the same attempt.
    await high.stop()
    r.queue.reconfigure()  # drop the pooled connection to the stopped host
    second = await r.send(["user@example.net"])
    await r.done(second)
    assert len(low.messages) == 1
    [event] = await r.events(second)
    assert event["status"] == "delivered" and event["attempt"] == 1
    assert event["remote"].startswith(f"mx-b.example.net:{low.port}")


async def test_implicit_mx_uses_the_domain_address(relay: Any, smtp_sink: SinkFactory,
                                                   dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    dns_server.add_a("example.net", "127.0.0.1")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert sink.messages[0].rcpt_tos == ["user@example.net"]


async def test_implicit_mx_of_an_internationalised_domain_is_its_a_label_name(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    """The host name TLS verifies and MTA-STS matches is the one DNS has (A-labels), also when
    the domain has no MX and the address spells it in U-labels."""
    sink = await smtp_sink()
    dns_server.add_a("xn--bcher-kva.example", "127.0.0.1")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@b\u00fccher.example"],
                       data=message("user@xn--bcher-kva.example", "app@example.com"))
    await r.done(msg)
    [event] = await r.events(msg)
    assert event["status"] == "delivered", event["response"]
    assert event["remote"].startswith(f"xn--bcher-kva.example:{sink.port}"), event


async def test_opportunistic_starttls_to_mx_without_verification(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True)  # certificate from a CA the relay does not trust
    dns_server.add_mx("example.net", "mx.example.net")
    dns_server.add_a("mx.example.net")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert sink.messages[0].tls
    [event] = await r.events(msg)
    assert event["remote"] == f"mx.example.net:{sink.port} tls"


async def test_broken_starttls_at_mx_falls_back_to_clear_text(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True, broken_tls=True)
    dns_server.add_mx("example.net", "mx.example.net")
    dns_server.add_a("mx.example.net")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert not sink.messages[0].tls
    assert sink.connections == 2  # the failed TLS session, then the clear-text one
    [event] = await r.events(msg)
    assert event["status"] == "delivered" and event["remote"] == f"mx.example.net:{sink.port}"


async def test_broken_starttls_at_smarthost_defers(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(starttls=True, broken_tls=True)
    r = await relay(make_config(smarthost(sink, tls="starttls", caFile=sink.ca_file),
                                queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.5")
    assert sink.messages == []


async def test_null_mx_bounces_without_suppressing(relay: Any, smtp_sink: SinkFactory,
                                                  dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    dns_server.add_mx("example.com", "mx.example.com")  # where the DSN goes
    dns_server.add_a("mx.example.com")
    dns_server.add_mx("example.net", ".", 0)
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    [event] = await r.events(msg)
    assert event["status"] == "bounced" and event["response"].startswith("556 5.1.10")
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    assert sink.messages[0].rcpt_tos == ["app@example.com"]
    # The domain said so, not the mailbox: the address is not suppressed for a year.
    assert r.suppression.is_suppressed("user@example.net") is None


@pytest.mark.parametrize(("setup", "response"), [
    ("nxdomain", "451 4.1.2 Domain example.net does not exist"),
    ("no_address", "451 4.1.2 Host example.net has no address"),
])
async def test_unresolvable_domains_follow_the_retry_policy(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS, setup: str,
        response: str) -> None:
    """One DNS answer does not bounce nor suppress: the recipient is deferred like any
    temporary failure, and expires (with a DSN) at the end of the queue lifetime."""
    sink = await smtp_sink()
    dns_server.add_mx("example.com", "mx.example.com")  # where the DSN goes
    dns_server.add_a("mx.example.com")
    if setup == "no_address":
        dns_server.add_txt("example.net", "v=spf1 -all")  # the name exists, without MX or A
    r = await relay(make_config(mx_mode(dns_server, sink.port), queue={"maxLifetime": 0.5}))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    rows = await r.events(msg)
    statuses = r.statuses(rows, "user@example.net")
    assert statuses[0] == "deferred" and statuses[-1] == "expired"
    assert all(e["response"].startswith(response) for e in rows)
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    assert "Status: 5.1.2" in list(dsns(sink)[0].iter_parts())[1].as_string()
    assert r.suppression.is_suppressed("user@example.net") is None


async def test_mx_host_without_address_defers(relay: Any, smtp_sink: SinkFactory,
                                              dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    dns_server.add_mx("example.net", "ghost.example.net")  # the MX names a host that is gone
    r = await relay(make_config(mx_mode(dns_server, sink.port),
                                queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.4.3")
    assert r.suppression.is_suppressed("user@example.net") is None


async def test_servfail_defers_then_delivers(relay: Any, smtp_sink: SinkFactory,
                                             dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    dns_server.set_servfail("example.net")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") >= 1, 10)
    rows = await r.events(msg)
    assert rows[0]["status"] == "deferred" and rows[0]["response"].startswith("451 4.4.3")
    dns_server.set_servfail("example.net", on=False)
    dns_server.add_mx("example.net", "mx.example.net")
    dns_server.add_a("mx.example.net")
    await r.done(msg)
    assert len(sink.messages) == 1


async def test_dns_timeout_defers(relay: Any, smtp_sink: SinkFactory,
                                  dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    dns_server.set_drop("example.net")
    r = await relay(make_config(mx_mode(dns_server, sink.port) | {
        "resolver": dns_server.resolver_settings(timeout=0.2)},
        queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1, 10)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.4.3")


async def test_recipients_grouped_by_domain_one_transaction_each(
        relay: Any, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()
    for domain in ("example.net", "example.org"):
        dns_server.add_mx(domain, f"mx.{domain}")
        dns_server.add_a(f"mx.{domain}")
    r = await relay(make_config(mx_mode(dns_server, sink.port)))
    msg = await r.send(["a@example.net", "b@example.org", "c@example.net"])
    await r.done(msg)
    assert sorted(sorted(m.rcpt_tos) for m in sink.messages) == [
        ["a@example.net", "c@example.net"], ["b@example.org"]]


# ------------------------------------------------------------------------------ connections


async def test_connections_are_reused_up_to_the_limit(relay: Any, smtp_sink: SinkFactory
                                                      ) -> None:
    sink = await smtp_sink()
    delivery = smarthost(sink) | {"concurrencyPerDestination": 1,
                                  "maxMessagesPerConnection": 5}
    r = await relay(make_config(delivery))
    msgs = [await r.send([f"u{i}@example.net"]) for i in range(20)]
    await r.wait(lambda: r.queue.queued == 0, 20)
    assert len(sink.messages) == 20
    assert sink.connections == 4
    assert r.queue.connections_opened == 4
    assert all(r.queue.message(m.queue_id) is None for m in msgs)


async def test_concurrency_per_destination_bounds_connections(relay: Any,
                                                              smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_delay=0.05)
    delivery = smarthost(sink) | {"concurrencyPerDestination": 3}
    r = await relay(make_config(delivery))
    for i in range(30):
        await r.send([f"u{i}@example.net"])
    await r.wait(lambda: r.queue.queued == 0, 20)
    assert len(sink.messages) == 30
    assert sink.connections == 3


async def test_pooled_connection_closed_by_upstream_is_replaced(relay: Any,
                                                               smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    await r.done(await r.send(["a@example.net"]))
    sink.drop_connections()
    await sink.wait_for(lambda: sink.disconnections == 1)
    second = await r.send(["b@example.net"])
    await r.done(second)
    assert [m.connection for m in sink.messages] == [1, 2]
    [event] = await r.events(second)
    assert event["status"] == "delivered" and event["attempt"] == 1


async def test_pooled_connection_dying_at_mail_is_retried_on_a_fresh_one(
        relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    await r.done(await r.send(["a@example.net"]))
    sink.behaviour.drop_at_mail = 1  # the pooled connection dies at the next MAIL
    second = await r.send(["b@example.net"])
    await r.done(second)
    assert [m.connection for m in sink.messages] == [1, 2]
    [event] = await r.events(second)
    assert event["status"] == "delivered" and event["attempt"] == 1


async def test_reconfigure_moves_delivery_to_the_new_smarthost(relay: Any,
                                                               smtp_sink: SinkFactory) -> None:
    old, new = await smtp_sink(), await smtp_sink()
    r = await relay(make_config(smarthost(old)))
    await r.done(await r.send(["a@example.net"]))
    r.config = make_config(smarthost(new))
    r.queue.reconfigure()
    # The connection pooled for the old smarthost is closed, and mail goes to the new one.
    await old.wait_for(lambda: old.disconnections == 1)
    await r.done(await r.send(["b@example.net"]))
    assert [m.rcpt_tos for m in old.messages] == [["a@example.net"]]
    assert [m.rcpt_tos for m in new.messages] == [["b@example.net"]]


async def test_idle_connections_are_closed(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink) | {"idleConnectionTimeout": 0.1}))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert sink.connections == 1
    await sink.wait_for(lambda: sink.disconnections == 1, timeout=5)


# ------------------------------------------------------------------------------ DKIM


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
async def test_delivered_mail_is_dkim_signed(relay: Any, smtp_sink: SinkFactory,
                                             dns_server: LoopbackDNS, algorithm: str) -> None:
    pem = rsa_pem() if algorithm == "rsa-sha256" else ed25519_pem()
    dns_server.add_txt("mp1._domainkey.example.com", public_key_record(pem))
    sink = await smtp_sink()
    domains = [{"name": "example.com", "dkim": {"selector": "mp1", "algorithm": algorithm,
                                                "privateKey": pem.decode()}}]
    r = await relay(make_config(smarthost(sink), domains=domains))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    data = sink.messages[0].data
    assert data.startswith(b"DKIM-Signature:")
    assert dkim.verify(data, dnsfunc=dns_server.dkim_dnsfunc)
    signed = r.metrics.registry.get_sample_value(
        "mailplane_relay_dkim_signatures_total", {"algorithm": algorithm, "result": "ok"})
    assert signed == 1


async def test_large_8bit_message_is_signed_and_announced(relay: Any, smtp_sink: SinkFactory,
                                                         dns_server: LoopbackDNS) -> None:
    pem = rsa_pem()
    dns_server.add_txt("mp1._domainkey.example.com", public_key_record(pem))
    sink = await smtp_sink()
    domains = [{"name": "example.com", "dkim": {"selector": "mp1", "privateKey": pem.decode()}}]
    r = await relay(make_config(smarthost(sink), domains=domains))
    big = message() + "Grüße aus Köln\r\n".encode() * 20_000  # ~340 KB: read+signed in a thread
    msg = await r.send(["user@example.net"], data=big)
    await r.done(msg)
    got = sink.messages[0]
    assert "BODY=8BITMIME" in got.mail_options
    assert f"SIZE={len(got.data)}" in got.mail_options
    assert got.data.endswith(big)
    assert dkim.verify(got.data, dnsfunc=dns_server.dkim_dnsfunc)


async def test_rotated_key_signs_mail_already_queued(relay: Any, smtp_sink: SinkFactory,
                                                     dns_server: LoopbackDNS) -> None:
    old, new = rsa_pem(), rsa_pem()
    dns_server.add_txt("new._domainkey.example.com", public_key_record(new))
    sink = await smtp_sink(rcpt_replies={"user@example.net": "451 4.2.0 later"})
    domains = [{"name": "example.com", "dkim": {"selector": "old", "privateKey": old.decode()}}]
    r = await relay(make_config(smarthost(sink), domains=domains))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") >= 1, 10)
    r.config = make_config(smarthost(sink), domains=[
        {"name": "example.com", "dkim": {"selector": "new", "privateKey": new.decode()}}])
    r.queue.reconfigure()
    sink.behaviour.rcpt_replies.clear()
    await r.done(msg)
    data = sink.messages[0].data
    assert b"s=new;" in data
    assert dkim.verify(data, dnsfunc=dns_server.dkim_dnsfunc)


# ------------------------------------------------------------------------------ lifecycle


async def test_recovered_messages_are_delivered(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    config = make_config(smarthost(sink))
    first = Relay(tmp_path, config)
    await first.spool.start()
    committed = [
        await first.spool.commit(mail_from="app@example.com", recipients=[f"u{i}@example.net"],
                                 data=message(), message_id=None, credential="app1",
                                 sender_domain="example.com", listener="submission")
        for i in range(3)
    ]
    # A message that was half delivered before the crash: only its pending recipient goes out.
    half = await first.spool.commit(
        mail_from="app@example.com", recipients=["done@example.net", "todo@example.net"],
        data=message(), message_id=None, credential="app1", sender_domain="example.com",
        listener="submission")
    half.recipients[0].status = "delivered"
    await first.spool.save_state(half)
    await first.spool.close()

    second = Relay(tmp_path, config)
    recovered = await second.start()
    try:
        assert sorted(m.queue_id for m in recovered) == sorted(
            [m.queue_id for m in committed] + [half.queue_id])
        await second.wait(lambda: second.queue.queued == 0, 10)
        assert sorted(r for m in sink.messages for r in m.rcpt_tos) == [
            "todo@example.net", "u0@example.net", "u1@example.net", "u2@example.net"]
        assert second.spooled() == []
    finally:
        await second.stop()


async def test_stop_cancels_attempts_at_the_deadline_and_keeps_mail(
        tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_delay=30)
    config = make_config(smarthost(sink) | {"commandTimeout": 60, "messageDeadline": 60})
    first = Relay(tmp_path, config)
    await first.start()
    msg = await first.send(["user@example.net"])
    await sink.wait_for(lambda: len(sink.rcpt_attempts) == 1)
    started = time.monotonic()
    await first.stop(grace=0.2)
    assert time.monotonic() - started < 3
    assert first.spooled() == [f"{msg.queue_id}.msg"]
    # Nothing final was recorded for the interrupted attempt: it is retried after restart.
    assert first.count("deferred") == 0 and first.count("delivered") == 0
    sink.behaviour.data_delay = 0
    second = Relay(tmp_path, config)
    recovered = await second.start()
    try:
        assert [m.queue_id for m in recovered] == [msg.queue_id]
        await second.wait(lambda: second.queue.queued == 0, 10)
        assert len(sink.messages) == 1
    finally:
        await second.stop()


async def test_stop_lets_short_attempts_finish(tmp_path: Path, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_delay=0.3)
    r = Relay(tmp_path, make_config(smarthost(sink)))
    await r.start()
    msg = await r.send(["user@example.net"])
    await sink.wait_for(lambda: len(sink.rcpt_attempts) == 1)
    await r.stop(grace=5)
    assert len(sink.messages) == 1
    assert r.spooled() == []
    assert [e["status"] for e in query_log(r.db, queue_id=msg.queue_id)] == [
        "delivered"]


async def test_queue_gauges_track_the_backlog(relay: Any, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"user@example.net": "451 4.2.0 later"})
    r = await relay(make_config(smarthost(sink), queue={"retryInitial": 30, "retryMax": 30}))
    await r.send(["user@example.net"])
    await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 2, 10)
    assert r.metrics.registry.get_sample_value("mailplane_relay_queue_messages") == 2

    r.queue.update_gauges()  # what the housekeeping pass does every second
    age = r.metrics.registry.get_sample_value(
        "mailplane_relay_queue_oldest_message_age_seconds")
    assert age is not None and 0 < age < 10


# ------------------------------------------------------------------------------ pipelining


class _RawUpstream:
    """A hand-written SMTP server on a loopback port (``async with`` gives the port), for
    upstream behaviours the capture sink cannot produce."""

    server: asyncio.Server | None = None

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


class _GroupServer(_RawUpstream):
    """A raw SMTP server offering PIPELINING that answers MAIL, RCPT and DATA only once the
    whole group has arrived, one reply per write with a pause between them: an unpipelined
    client waits forever for its MAIL reply, and a pipelined one must read replies that arrive
    in separate segments."""

    def __init__(self, rcpt_reply: dict[str, bytes]) -> None:
        self.rcpt_reply = rcpt_reply
        self.messages: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 group.test ESMTP\r\n")
        while line := await reader.readline():
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-group.test\r\n250-PIPELINING\r\n250 SIZE 100000\r\n")
            elif verb == b"MAIL":
                group = [line]
                while group[-1] and not group[-1].upper().startswith(b"DATA"):
                    group.append(await reader.readline())
                if not group[-1]:
                    break  # the client gave up waiting for a reply to its MAIL alone
                replies = [b"250 2.1.0 ok\r\n"]
                replies += [self.rcpt_reply.get(g[9:-3].decode(), b"250 2.1.5 ok\r\n")
                            for g in group[1:-1]]
                accepted = any(r.startswith(b"250") for r in replies[1:])
                replies.append(b"354 go\r\n" if accepted else b"554 5.5.1 no recipients\r\n")
                for reply in replies:
                    writer.write(reply)
                    await writer.drain()
                    await asyncio.sleep(0.01)
                if accepted:
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.messages.append(data)
                    writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"RSET":
                writer.write(b"250 2.0.0 ok\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"500 5.5.1 unknown\r\n")
        writer.close()


async def test_pipelined_group_with_replies_in_separate_segments(relay: Any) -> None:
    refused = b"550 5.1.1 no such user\r\n"
    group = _GroupServer({"no@example.net": refused, "none@example.net": refused})
    async with group as port:
        delivery = {"mode": "smarthost", **TIMEOUTS,
                    "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"}}
        r = await relay(make_config(delivery, queue={"dsn": False}))  # only our messages
        first = await r.send(["a@example.net", "no@example.net", "b@example.net"])
        await r.done(first)
        nobody = await r.send(["none@example.net"])  # every RCPT refused: no content is sent
        await r.done(nobody)
        second = await r.send(["c@example.net"])  # the same connection, in step
        await r.done(second)
    assert len(group.messages) == 2
    assert all(m.endswith(BODY + b".\r\n") for m in group.messages)
    rows = await r.events(first)
    assert {(e["recipient"], e["status"]) for e in rows} == {
        ("a@example.net", "delivered"), ("b@example.net", "delivered"),
        ("no@example.net", "bounced")}
    assert [e["status"] for e in await r.events(nobody)] == ["bounced"]
    assert [e["status"] for e in await r.events(second)] == ["delivered"]
    assert r.queue.connections_opened == 1


async def test_dot_stuffing_and_line_ends_on_the_pipelined_path(relay: Any,
                                                                smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(pipelining=True)
    r = await relay(make_config(smarthost(sink)))
    body = b".leading dot\r\n..two dots\r\nmiddle\r\n.\r\nlast line without CRLF"
    msg = await r.send(["user@example.net"], data=message() + body)
    await r.done(msg)
    [got] = sink.messages
    assert got.data.endswith(BODY + body + b"\r\n")


# ------------------------------------------------------------------------------ reused connections


class _FaultyUpstream(_RawUpstream):
    """A raw SMTP server that fails chosen MAIL commands, keyed by (connection, MAIL number in
    it), in one of the ways a pooled connection dies: ``421`` (a 421 reply, then close, as
    Postfix does on overload, shutdown or its own idle limit), ``drop`` (close without a reply),
    ``reset`` (a TCP reset)."""

    def __init__(self, *, pipelining: bool, faults: dict[tuple[int, int], str]) -> None:
        self.pipelining = pipelining
        self.faults = faults
        self.connections = 0
        self.messages: list[tuple[int, bytes]] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        number, mails = self.connections, 0
        writer.write(b"220 faulty.test ESMTP\r\n")
        try:
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-faulty.test\r\n" + extra + b"250 SIZE 100000\r\n")
                elif verb == b"MAIL":
                    mails += 1
                    fault = self.faults.get((number, mails))
                    if fault is not None:
                        await self._fail(writer, fault)
                        return
                    writer.write(b"250 2.1.0 ok\r\n")
                elif verb == b"RCPT":
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    writer.write(b"354 go\r\n")
                    self.messages.append((number, await reader.readuntil(b"\r\n.\r\n")))
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"RSET":
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 2.0.0 bye\r\n")
                    return
                else:
                    writer.write(b"500 5.5.1 unknown\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    @staticmethod
    async def _fail(writer: asyncio.StreamWriter, fault: str) -> None:
        if fault == "421":
            writer.write(b"421 4.3.2 faulty.test closing connection\r\n")
            await writer.drain()
        elif fault == "reset":
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("fault", ["421", "drop", "reset"])
async def test_reused_connection_failing_at_mail_is_retried_on_a_fresh_one(
        relay: Any, fault: str, pipelining: bool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mailplane_relay.delivery")
    upstream = _FaultyUpstream(pipelining=pipelining, faults={(1, 2): fault})
    async with upstream as port:
        delivery = {"mode": "smarthost", **TIMEOUTS,
                    "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"}}
        r = await relay(make_config(delivery, queue={"retryInitial": 3600, "retryMax": 3600}))
        await r.done(await r.send(["a@example.net"]))
        second = await r.send(["b@example.net"])
        await r.done(second)
    assert [n for n, _ in upstream.messages] == [1, 2]
    [event] = await r.events(second)
    assert event["status"] == "delivered" and event["attempt"] == 1
    # The operator's only trace of the retry: why the pooled connection was given up.
    [retried] = [m for m in caplog.messages if "retrying on a fresh connection" in m]
    if fault == "421":
        assert "421 4.3.2 faulty.test closing connection" in retried


@pytest.mark.parametrize("pipelining", [False, True], ids=["one-by-one", "pipelined"])
@pytest.mark.parametrize("fault", ["421", "drop"])
async def test_fresh_connection_failing_at_mail_defers(relay: Any, fault: str,
                                                       pipelining: bool) -> None:
    # Connection 1 is reused for the second message and dies; so does the fresh connection 2
    # the relay retries on at once: the attempt defers (no third connection), the retry
    # delivers on connection 3.
    upstream = _FaultyUpstream(pipelining=pipelining, faults={(1, 2): fault, (2, 1): fault})
    async with upstream as port:
        delivery = {"mode": "smarthost", **TIMEOUTS,
                    "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"}}
        r = await relay(make_config(delivery))
        await r.done(await r.send(["a@example.net"]))
        second = await r.send(["b@example.net"])
        await r.done(second)
    assert [n for n, _ in upstream.messages] == [1, 3]
    first_try, retry = await r.events(second)
    assert (first_try["status"], first_try["attempt"]) == ("deferred", 1)
    if fault == "421":
        assert first_try["response"] == "421 4.3.2 faulty.test closing connection"
    else:
        assert first_try["response"].startswith("451 4.4.2 Connection to 127.0.0.1:")
    assert (retry["status"], retry["attempt"]) == ("delivered", 2)


async def test_a_bug_in_an_attempt_defers_then_expires_instead_of_looping(
        relay: Any, smtp_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: every attempt raises. The message is still deferred with backoff,
    counted, and expires at maxLifetime instead of being retried forever."""
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink), queue={**FAST_RETRY, "maxLifetime": 0.3}))

    async def broken(*_args: Any, **_kwargs: Any) -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(r.queue, "_deliver", broken)
    msg = await r.send(["someone@example.net"])
    await r.done(msg)
    statuses = r.statuses(await r.events(msg), "someone@example.net")
    assert statuses[-1] == "expired" and statuses.count("deferred") >= 1
    assert all(e["response"] == "451 4.3.0 Internal error during delivery"
               for e in await r.events(msg) if e["status"] != "received")


async def test_a_dead_background_task_is_reported_to_the_owner(
        relay: Any, smtp_sink: SinkFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the housekeeper dies. The owner (app.py stops the process, the queue
    stays on disk) is told, instead of the relay accepting mail it would never deliver."""
    sink = await smtp_sink()
    r = await relay(make_config(smarthost(sink)))
    failures: list[BaseException] = []
    r.queue._on_failure = failures.append

    def broken() -> None:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(r.queue, "update_gauges", broken)
    async with asyncio.timeout(5):
        while not failures:
            await asyncio.sleep(0.05)
    assert str(failures[0]) == "injected fault"
