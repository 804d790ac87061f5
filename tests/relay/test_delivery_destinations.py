"""Delivery against slow, throttling and broken destinations: RFC 5321 timeouts and the final
dot, destination suspension, MX fallback inside one attempt, fair dispatch, shaping, reloads,
suppression and prompt DSN. Real peers on loopback: raw SMTP servers written here for the
behaviours the capture sink cannot produce, aiosmtpd sinks, and a real DNS server."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.config import RelayConfig
from tests.helpers.dns import LoopbackDNS
from tests.helpers.sink import Sink
from tests.relay.test_delivery_flows import (
    TIMEOUTS,
    Relay,
    dsns,
    make_config,
    mx_mode,
    sinks_on_one_port,
    smarthost,
)

SinkFactory = Callable[..., Awaitable[Sink]]
RelayFactory = Callable[[RelayConfig], Awaitable[Relay]]




class Upstream:
    """A raw SMTP server on a loopback address. ``greeting``: the banner line; ``mail_reply``:
    the reply to every MAIL (None: 250); ``dot_delay``: seconds before answering the final dot.
    Records connections, transactions that reached the final dot, and messages it accepted."""

    def __init__(self, *, greeting: bytes = b"220 up.test ESMTP",
                 mail_reply: bytes | None = None, dot_delay: float = 0.0,
                 pipelining: bool = True) -> None:
        self.greeting = greeting
        self.mail_reply = mail_reply
        self.dot_delay = dot_delay
        self.pipelining = pipelining
        self.connections = 0
        self.open = 0
        self.dots = 0  # final dots received
        self.accepted: list[bytes] = []
        self.resets = 0  # connections that ended without QUIT
        self.server: asyncio.Server | None = None

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> int:
        self.server = await asyncio.start_server(self.handle, host, port)
        return int(self.server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        quit_seen = in_transaction = False
        try:
            writer.write(self.greeting + b"\r\n")
            if self.greeting.startswith(b"421"):
                await writer.drain()
                return
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb == b"EHLO":
                    extra = b"250-PIPELINING\r\n" if self.pipelining else b""
                    writer.write(b"250-up.test\r\n" + extra + b"250 SIZE 1000000\r\n")
                elif verb == b"MAIL":
                    if self.mail_reply is not None:
                        writer.write(self.mail_reply + b"\r\n")
                        if self.mail_reply.startswith(b"421"):
                            await writer.drain()
                            return
                    else:
                        in_transaction = True
                        writer.write(b"250 2.1.0 ok\r\n")
                elif verb in (b"RCPT", b"DATA") and not in_transaction:
                    writer.write(b"503 5.5.1 MAIL first\r\n")
                elif verb == b"RCPT":
                    writer.write(b"250 2.1.5 ok\r\n")
                elif verb == b"DATA":
                    in_transaction = False
                    writer.write(b"354 go\r\n")
                    await writer.drain()
                    data = await reader.readuntil(b"\r\n.\r\n")
                    self.dots += 1
                    if self.dot_delay:
                        # Slow to answer, but notices a client that hangs up meanwhile.
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(self.dot_delay):
                                if not await reader.read(1):
                                    return
                    self.accepted.append(data)
                    writer.write(b"250 2.0.0 queued\r\n")
                elif verb == b"RSET":
                    in_transaction = False
                    writer.write(b"250 2.0.0 ok\r\n")
                elif verb == b"QUIT":
                    quit_seen = True
                    writer.write(b"221 2.0.0 bye\r\n")
                    await writer.drain()
                    return
                else:
                    writer.write(b"500 5.5.1 unknown\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.open -= 1
            if not quit_seen:
                self.resets += 1
            writer.close()


def smarthost_at(port: int, **extra: Any) -> dict[str, Any]:
    return {"mode": "smarthost", **TIMEOUTS,
            "smarthost": {"host": "127.0.0.1", "port": port, "tls": "none"}, **extra}


async def two_hosts(first: Upstream | None = None) -> tuple[Upstream, Upstream, int]:
    """Two upstreams on one port, on 127.0.0.2 (preferred MX) and 127.0.0.1 (backup)."""
    for _ in range(10):
        primary = first or Upstream()
        backup = Upstream()
        port = await backup.start("127.0.0.1")
        try:
            await primary.start("127.0.0.2", port)
        except OSError:
            await backup.stop()
            continue
        return primary, backup, port
    raise RuntimeError("no port free on both loopback addresses")


# ------------------------------------------------------------------------------ final dot


async def test_a_late_answer_to_the_final_dot_is_waited_for_exactly_one_copy(
        relay: RelayFactory) -> None:
    """The upstream answers the final dot after 1.5 s, longer than messageDeadline and the
    command timeout: the relay waits (dataDoneTimeout), records one delivery, sends once."""
    up = Upstream(dot_delay=1.5)
    port = await up.start()
    try:
        config = make_config(smarthost_at(port, commandTimeout=0.3, messageDeadline=0.5))
        r = await relay(config)
        msg = await r.send(["user@example.net"])
        await r.done(msg, 10)
        assert up.dots == 1 and len(up.accepted) == 1
        [event] = await r.events(msg)
        assert (event["status"], event["attempt"]) == ("delivered", 1)
    finally:
        await up.stop()


async def test_no_reply_to_the_final_dot_within_its_timeout_defers_and_closes(
        relay: RelayFactory) -> None:
    up = Upstream(dot_delay=30)
    port = await up.start()
    try:
        config = make_config(smarthost_at(port, dataDoneTimeout=0.4),
                             queue={"retryInitial": 60, "retryMax": 60})
        r = await relay(config)
        msg = await r.send(["user@example.net"])
        await r.wait(lambda: r.count("deferred") == 1)
        [event] = await r.events(msg)
        assert event["response"].startswith("451 4.4.2")
        # The connection is dropped, not left open for the upstream to finish later.
        async with asyncio.timeout(5):
            while up.open:
                await asyncio.sleep(0.02)
    finally:
        await up.stop()


async def test_message_deadline_drops_a_transaction_before_its_data_not_after(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    # Each RCPT takes 0.15 s: the deadline (0.4 s) passes before the data is sent, so the
    # connection is dropped before the final dot and nothing is delivered.
    sink = await smtp_sink(rcpt_delay=0.15)
    r = await relay(make_config(smarthost(sink) | {"messageDeadline": 0.4},
                                queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send([f"u{i}@example.net" for i in range(6)])
    await r.wait(lambda: r.count("deferred") == 6)
    assert {e["response"] for e in await r.events(msg)} == {
        "451 4.4.7 Delivery attempt timed out (messageDeadline)"}
    await asyncio.sleep(0.3)
    assert sink.messages == []
    # One command at a time: no RCPT is sent once the deadline has passed.
    assert len(sink.rcpt_attempts) < 6


async def test_time_waiting_for_a_connection_does_not_count_against_the_deadline(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    # One connection, each delivery takes 0.5 s: the fifth message waits two seconds for its
    # turn, more than messageDeadline, and is still delivered at its first attempt. The
    # deadline leaves a second to each delivery beyond the sink's delay, for a loaded machine.
    sink = await smtp_sink(data_delay=0.5)
    delivery = smarthost(sink) | {"concurrencyPerDestination": 1, "messageDeadline": 1.5}
    r = await relay(make_config(delivery))
    msgs = [await r.send([f"u{i}@example.net"]) for i in range(5)]
    await r.wait(lambda: r.queue.queued == 0, 20)
    for msg in msgs:
        [event] = await r.events(msg)
        assert (event["status"], event["attempt"]) == ("delivered", 1)


async def test_stopping_aborts_a_transaction_in_flight(tmp_path: Path) -> None:
    """A stop at its deadline aborts the connection (no QUIT, nothing more sent) and keeps the
    message; the upstream never completes an abandoned transaction."""
    up = Upstream(dot_delay=30)
    port = await up.start()
    try:
        r = Relay(tmp_path, make_config(smarthost_at(port)))
        await r.start()
        msg = await r.send(["user@example.net"])
        async with asyncio.timeout(5):
            while up.dots == 0:
                await asyncio.sleep(0.02)
        await r.stop(grace=0.2)
        async with asyncio.timeout(5):
            while up.open:
                await asyncio.sleep(0.02)
        assert up.resets == 1  # reset, no QUIT
        assert r.spooled() == [f"{msg.queue_id}.msg"]
    finally:
        await up.stop()


# ------------------------------------------------------------------------------ suspension


async def test_a_receiver_answering_421_at_the_greeting_gets_few_connections(
        relay: RelayFactory) -> None:
    up = Upstream(greeting=b"421 4.7.0 up.test too many connections, slow down")
    port = await up.start()
    try:
        config = make_config(smarthost_at(port),
                             queue={"retryInitial": 1, "retryMax": 1, "retryJitter": 0})
        r = await relay(config)
        msgs = [await r.send([f"u{i}@example.net"]) for i in range(30)]
        await r.wait(lambda: r.count("deferred") >= 30)
        assert up.connections == 1  # one connection decided for all 30 messages
        [view] = r.queue.destinations()
        assert view["state"] == "suspended" and view["reason"].startswith("451 4.4.1")
        assert "421 4.7.0" in view["reason"]
        rows = await r.events(msgs[-1])
        assert rows[0]["response"].endswith("(destination suspended; not tried)")
        assert r.metrics.registry.get_sample_value(
            "mailplane_relay_delivery_destination_suspensions_total",
            {"reason": "throttled"}) == 1
        r.queue.update_gauges()
        assert r.metrics.registry.get_sample_value(
            "mailplane_relay_delivery_destinations", {"state": "suspended"}) == 1
        # Over the next 2.5 s every message falls due again; one probe per suspension period.
        await asyncio.sleep(2.5)
        assert up.connections <= 3
        # The receiver recovers: the next probe works and the backlog is delivered.
        up.greeting = b"220 up.test ESMTP"
        await r.wait(lambda: r.queue.queued == 0, 15)
        assert len(up.accepted) == 30
    finally:
        await up.stop()


async def test_a_suspension_the_spool_root_cannot_record_keeps_no_quoted_address(
        relay: RelayFactory) -> None:
    """The shared file cannot be written (here its lock is a directory): the suspension still
    holds in this worker, and the reply it keeps (the queue view, the other messages' log rows,
    the warning) names no address the server quoted."""
    up = Upstream(mail_reply=b"421 4.7.0 <alice.private@example.org> rate limited, slow down")
    port = await up.start()
    try:
        config = make_config(smarthost_at(port), queue={"retryInitial": 30, "retryMax": 30})
        r = await relay(config)
        (Path(r.spool.directory) / ".destination-suspensions.json.lock").mkdir(parents=True)
        msgs = [await r.send([f"u{i}@example.net"]) for i in range(5)]
        await r.wait(lambda: r.count("deferred") >= 5)
        [view] = r.queue.destinations()
        assert view["state"] == "suspended" and "rate limited" in view["reason"]
        assert "alice" not in view["reason"] and "<address>" in view["reason"]
        rows = await r.events(msgs[-1])
        assert rows[0]["response"].endswith("(destination suspended; not tried)")
        assert "alice" not in rows[0]["response"]
    finally:
        await up.stop()


async def test_a_refused_connection_suspends_the_destination(relay: RelayFactory) -> None:
    up = Upstream()
    port = await up.start()
    await up.stop()  # nothing listens any more
    config = make_config(smarthost_at(port), queue={"retryInitial": 30, "retryMax": 30})
    r = await relay(config)
    for i in range(10):
        await r.send([f"u{i}@example.net"])
    await r.wait(lambda: r.count("deferred") >= 10)
    assert r.queue.connections_opened == 0
    [view] = r.queue.destinations()
    assert view["state"] == "suspended" and view["suspendedFor"] > 20
    assert r.metrics.registry.get_sample_value(
        "mailplane_relay_delivery_destination_suspensions_total", {"reason": "connect"}) == 1
    # Deferred mail is not retried before the suspension ends.
    queued = [r.queue.message(q) for q in r.queue.queued_ids()]
    assert len(queued) == 10
    assert all(m is not None and m.next_attempt >= time.time() + 20 for m in queued)


# ------------------------------------------------------------------------------ MX fallback


@pytest.mark.parametrize("fault", ["greeting-421", "mail-451", "mail-421", "refused"])
async def test_the_backup_mx_takes_the_mail_in_the_same_attempt(
        relay: RelayFactory, dns_server: LoopbackDNS, fault: str) -> None:
    primary = Upstream(
        greeting=b"421 4.3.2 busy" if fault == "greeting-421" else b"220 up.test ESMTP",
        mail_reply={"mail-451": b"451 4.3.0 try later", "mail-421": b"421 4.3.2 closing"}.get(
            fault))
    primary, backup, port = await two_hosts(primary)
    try:
        if fault == "refused":
            await primary.stop()
        dns_server.add_mx("example.net", "mx1.example.net", 10)
        dns_server.add_mx("example.net", "mx2.example.net", 20)
        dns_server.add_a("mx1.example.net", "127.0.0.2")
        dns_server.add_a("mx2.example.net", "127.0.0.1")
        r = await relay(make_config(mx_mode(dns_server, port)))
        msg = await r.send(["a@example.net", "b@example.net"])
        await r.done(msg)
        assert len(backup.accepted) == 1 and primary.accepted == []
        if fault != "refused":
            assert primary.connections == 1
        rows = await r.events(msg)
        assert {(e["status"], e["attempt"]) for e in rows} == {("delivered", 1)}
        assert all(e["remote"].startswith("mx2.example.net:") for e in rows)
    finally:
        await primary.stop()
        await backup.stop()


async def test_a_rcpt_deferral_does_not_move_to_the_backup(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    primary, backup = await sinks_on_one_port(
        smtp_sink, "127.0.0.2", "127.0.0.1",
        rcpt_replies={"a@example.net": "450 4.2.0 greylisted"})
    dns_server.add_mx("example.net", "mx1.example.net", 10)
    dns_server.add_mx("example.net", "mx2.example.net", 20)
    dns_server.add_a("mx1.example.net", "127.0.0.2")
    dns_server.add_a("mx2.example.net", "127.0.0.1")
    r = await relay(make_config(mx_mode(dns_server, primary.port),
                                queue={"retryInitial": 30, "retryMax": 30}))
    msg = await r.send(["a@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"] == "450 4.2.0 greylisted"
    assert backup.connections == 0


# ------------------------------------------------------------------------------ fairness


async def test_a_slow_destination_does_not_hold_up_the_others(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS) -> None:
    """Many messages for a destination that answers the final dot after 3 s, then mail for a
    healthy one: with a small global bound, the healthy mail is delivered at once."""
    # Both destinations on one port number (MX delivery uses one port), on two addresses; if
    # another process holds that port on 127.0.0.1, both start again on another.
    for _ in range(5):
        slow = Upstream(dot_delay=3)
        port = await slow.start("127.0.0.2")
        try:
            fast = await smtp_sink(host="127.0.0.1", port=port)
            break
        except OSError:
            await slow.stop()
    else:
        raise AssertionError("no port free on both 127.0.0.1 and 127.0.0.2 in 5 tries")
    try:
        dns_server.add_mx("slow.example", "mx.slow.example")
        dns_server.add_a("mx.slow.example", "127.0.0.2")
        dns_server.add_mx("fast.example", "mx.fast.example")
        dns_server.add_a("mx.fast.example", "127.0.0.1")
        r = await relay(make_config(mx_mode(dns_server, port) | {
            "maxConcurrency": 4, "concurrencyPerDestination": 4}))
        for i in range(40):
            await r.send([f"u{i}@slow.example"])
        await asyncio.sleep(0.3)
        started = time.monotonic()
        healthy = [await r.send([f"u{i}@fast.example"]) for i in range(10)]
        await r.wait(lambda: all(r.queue.message(m.queue_id) is None for m in healthy), 10)
        assert time.monotonic() - started < 2.0
        assert len(fast.messages) == 10
        assert slow.open <= 4  # the slow destination never had more than the global bound
    finally:
        await slow.stop()


# ------------------------------------------------------------------------------ shaping


async def test_shaping_limits_connections_and_rate_per_destination(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(data_delay=0.05)
    delivery = smarthost(sink) | {"shaping": [
        {"name": "slow-isp", "domains": ["slow-isp.example"], "maxConnections": 1,
         "perMinute": 3},
    ]}
    r = await relay(make_config(delivery))
    shaped = [await r.send([f"u{i}@slow-isp.example"]) for i in range(5)]
    other = [await r.send([f"u{i}@example.net"]) for i in range(10)]
    await r.wait(lambda: all(r.queue.message(m.queue_id) is None for m in other), 10)
    await asyncio.sleep(0.3)
    # Three shaped messages went (the burst of the per-minute bucket), the rest wait in the
    # ready queue: not deferred, not attempted.
    assert sum(1 for m in shaped if r.queue.message(m.queue_id) is None) == 3
    assert r.count("deferred") == 0
    views = {v["shaping"]: v for v in r.queue.destinations()}
    assert views["slow-isp"]["ready"] == 2 and views["slow-isp"]["connectionLimit"] == 1
    assert views["default"]["connectionLimit"] > 1


def test_shaping_rules_are_validated() -> None:
    with pytest.raises(ValueError, match="matches nothing"):
        make_config({"mode": "mx", "shaping": [{"name": "x", "maxConnections": 2}]})
    with pytest.raises(ValueError, match="used twice"):
        make_config({"mode": "mx", "shaping": [{"name": "x", "domains": ["a.example"]},
                                               {"name": "x", "domains": ["b.example"]}]})


# ------------------------------------------------------------------------------ reload


async def test_reload_keeps_pooled_connections_and_suspensions(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink()
    config = make_config(smarthost(sink))
    r = await relay(config)
    await r.done(await r.send(["a@example.net"]))
    r.config = make_config(smarthost(sink) | {"maxConcurrency": 50})  # unrelated change
    r.queue.reconfigure()
    await r.done(await r.send(["b@example.net"]))
    assert sink.connections == 1  # the pooled connection survived the reload
    [view] = r.queue.destinations()
    assert view["delivered"] == 2


async def test_reload_keeps_a_suspension(relay: RelayFactory) -> None:
    up = Upstream(greeting=b"421 4.7.0 go away")
    port = await up.start()
    try:
        config = make_config(smarthost_at(port), queue={"retryInitial": 30, "retryMax": 30})
        r = await relay(config)
        await r.send(["a@example.net"])
        await r.wait(lambda: r.count("deferred") == 1)
        r.config = make_config(smarthost_at(port, maxConcurrency=50),
                               queue={"retryInitial": 30, "retryMax": 30})
        r.queue.reconfigure()
        [view] = r.queue.destinations()
        assert view["state"] == "suspended"
    finally:
        await up.stop()


# ------------------------------------------------------------------------------ bounces


async def test_user_unknown_suppresses_at_once_a_bare_550_only_when_repeated(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user",
                                         "vague@example.net": "550 Mailbox unavailable"})
    r = await relay(make_config(smarthost(sink), queue={"dsn": False}))
    await r.done(await r.send(["gone@example.net", "vague@example.net"]))
    assert r.suppression.is_suppressed("gone@example.net") is not None
    assert r.suppression.is_suppressed("vague@example.net") is None
    await r.done(await r.send(["vague@example.net"]))
    assert r.suppression.is_suppressed("vague@example.net") is not None


async def test_a_bounced_recipient_gets_its_dsn_while_others_are_retried(
        relay: RelayFactory, smtp_sink: SinkFactory) -> None:
    sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user",
                                         "later@example.net": "451 4.2.0 try later"})
    r = await relay(make_config(smarthost(sink), queue={"retryInitial": 60, "retryMax": 60}))
    msg = await r.send(["gone@example.net", "later@example.net", "ok@example.net"])
    await sink.wait_for(lambda: len(dsns(sink)) == 1)
    assert r.queue.message(msg.queue_id) is not None  # still queued for later@
    # Nothing is owed any more: the bounce was reported, the delivery never owed a DSN.
    assert [(x.status, x.dsn_owed) for x in msg.recipients] == [
        ("bounced", False), ("pending", False), ("delivered", False)]
    report = dsns(sink)[0].as_string()
    assert "Final-Recipient: rfc822; gone@example.net" in report
    assert "Final-Recipient: rfc822; later@example.net" not in report
    # When the message ends, the recipient already reported is not reported again.
    sink.behaviour.rcpt_replies = {"later@example.net": "550 5.1.1 No such user"}
    queued = r.queue.message(msg.queue_id)
    assert queued is not None
    queued.next_attempt = 0
    r.queue._schedule(queued)
    await r.done(msg)
    await sink.wait_for(lambda: len(dsns(sink)) == 2)
    second = dsns(sink)[1].as_string()
    assert "Final-Recipient: rfc822; later@example.net" in second
    assert "Final-Recipient: rfc822; gone@example.net" not in second


async def test_a_bug_while_signing_fails_every_part_of_the_attempt_without_sticking(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection: the signer raises. Both domains' work items of the attempt end as
    internal errors (none waits forever for the other's data), and the message expires."""
    sink = await smtp_sink()
    for domain in ("one.example", "two.example"):
        dns_server.add_mx(domain, f"mx.{domain}")
        dns_server.add_a(f"mx.{domain}")
    r = await relay(make_config(mx_mode(dns_server, sink.port), queue={"maxLifetime": 0.5}))

    def broken(*_args: Any, **_kwargs: Any) -> bytes:
        raise RuntimeError("injected fault")

    monkeypatch.setattr(r.queue._signer, "sign", broken)
    msg = await r.send(["a@one.example", "b@two.example"])
    await r.done(msg)
    rows = [e for e in await r.events(msg) if e["status"] != "received"]
    assert {e["status"] for e in rows} <= {"deferred", "expired"}
    assert {e["recipient"] for e in rows if e["status"] == "expired"} == {
        "a@one.example", "b@two.example"}
    assert all(e["response"] == "451 4.3.0 Internal error during delivery" for e in rows)
    assert sink.messages == [] or all(m.mail_from == "" for m in sink.messages)
