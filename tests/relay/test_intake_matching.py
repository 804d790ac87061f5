"""What the intake does with a report once read: which reports are matched, which are dropped,
and what a match changes (suppression, counters, the reputation window). The stores are
in-memory stand-ins; the listener and real stores are exercised in test_intake.py."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from mailplane_relay import verp
from mailplane_relay.config import AbuseSettings, RelayConfig, RelaySettings
from mailplane_relay.events import LogEvent
from mailplane_relay.intake.listener import IntakeHandler
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.reputation import Reputation
from mailplane_relay.store import LogQuery
from tests.relay.test_intake_reports import fill

KEY = b"s" * 32
DOMAIN = "b.example.com"
QID = "0J8Z3K4M7QX2C9T4PB1R"


class Log:
    def __init__(self, rows: list[dict[str, object]]) -> None:
        self.rows = rows
        self.events: list[LogEvent] = []

    def record(self, event: LogEvent) -> None:
        self.events.append(event)

    async def query(self, q: LogQuery) -> list[dict[str, object]]:
        return [r for r in self.rows if r["queue_id"] == q.queue_id
                and (q.recipient is None
                     or q.recipient.lower() == str(r["recipient"]).lower())
                and q.status in (None, r["status"])][:q.limit]

    async def flush(self) -> None:
        pass


class Suppression:
    def __init__(self) -> None:
        self.added: list[tuple[str, str, str]] = []

    async def add(self, address: str, reason: str, *, source: str) -> None:
        self.added.append((address, reason, source))

    def is_suppressed(self, address: str, namespace: str | None = None
                      ) -> tuple[str, float] | None:
        reasons = [r for a, r, _s in self.added if a == address.lower()]
        return (reasons[-1], 0.0) if reasons else None


def delivered(recipient: str, credential: str = "app") -> dict[str, object]:
    return {"queue_id": QID, "recipient": recipient, "status": "delivered",
            "credential": credential, "sender": "app@example.com", "message_id": "<m@x>"}


def handler(rows: list[dict[str, object]], *,
            domain_complaints: Callable[[dict[tuple[str, str, int], int]], Awaitable[None]]
            | None = None, clock: Callable[[], float] = time.time,
            ) -> tuple[IntakeHandler, Log, Suppression, RelayMetrics, Reputation, list[str]]:
    cfg = RelayConfig(settings=RelaySettings.model_validate({
        "tls": {"certFile": "/c", "keyFile": "/k"}, "domains": [{"name": "example.com"}],
        "intake": {"domain": DOMAIN, "keyFile": "/unused"}}))
    log, supp, metrics = Log(rows), Suppression(), RelayMetrics.create()
    rep = Reputation(lambda: AbuseSettings.model_validate({"minRecipients": 1,
                                                           "minComplaints": 1}))
    hard: list[str] = []

    async def hard_bounce(address: str, response: str, now: float) -> None:
        hard.append(f"{address} {response}")

    h = IntakeHandler(config=lambda: cfg, key=lambda: KEY, log=log, suppression=supp,
                      metrics=metrics, reputation=rep, hard_bounce=hard_bounce,
                      domain_complaints=domain_complaints, clock=clock)
    return h, log, supp, metrics, rep, hard


def reports(metrics: RelayMetrics, kind: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "mailplane_relay_intake_reports_total", {"kind": kind, "result": result})
    return value or 0.0


def dsn(rp: str, recipient: str, status: str = "5.1.1") -> bytes:
    return fill("postfix-dsn.eml", RETURN_PATH=rp, RECIPIENT=recipient, LOCAL="x").replace(
        b"Status: 5.1.1", b"Status: " + status.encode())


async def test_a_message_token_acts_only_for_recipients_the_message_log_shows() -> None:
    h, log, _supp, metrics, rep, hard = handler([delivered("a@dest.test"),
                                                 delivered("b@dest.test")])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test", "b@dest.test"])
    assert (await h.handle(dsn(rp, "ceo@dest.test"), [rp])).startswith("250 2.0.0")
    assert reports(metrics, "dsn", "unmatched") == 1 and hard == [] and log.events == []
    await h.handle(dsn(rp, "B@dest.test"), [rp])
    assert reports(metrics, "dsn", "matched") == 1
    assert hard == ['b@dest.test 550 5.1.1 unknown user: "x"']
    [event] = log.events
    assert (event.status, event.queue_id, event.credential, event.recipient) == (
        "bounced", QID, "app", "b@dest.test")
    assert event.response is not None and event.response.startswith("DSN after delivery: 550 5.1.1")
    assert metrics.registry.get_sample_value(
        "mailplane_relay_async_bounces_total",
        {"sender_domain": "example.com", "credential": "app"}) == 1
    assert rep.paused("app") is not None  # 1 bounce of 1 outcome, minRecipients 1


async def test_a_recipient_token_takes_the_credential_from_the_acceptance_row() -> None:
    """A bounce may come back before the delivery is recorded: the row written when the
    message was accepted names the credential."""
    received = {**delivered("a@dest.test"), "status": "received"}
    h, log, _supp, metrics, _rep, _hard = handler([received])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    await h.handle(dsn(rp, "a@dest.test"), [rp])
    assert log.events[0].credential == "app"
    assert metrics.registry.get_sample_value(
        "mailplane_relay_async_bounces_total",
        {"sender_domain": "example.com", "credential": "app"}) == 1
    # A message token is not enough with the acceptance row alone.
    rp_m = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test", "b@dest.test"])
    await h.handle(dsn(rp_m, "a@dest.test"), [rp_m])
    assert reports(metrics, "dsn", "unmatched") == 1


async def test_a_recipient_token_acts_without_a_log_row_but_attributes_nothing() -> None:
    h, log, _supp, metrics, _rep, hard = handler([])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    await h.handle(dsn(rp, "a@dest.test"), [rp])
    assert reports(metrics, "dsn", "matched") == 1 and len(hard) == 1
    assert log.events[0].credential is None
    assert metrics.registry.get_sample_value(
        "mailplane_relay_async_bounces_total",
        {"sender_domain": "other", "credential": "none"}) == 1


async def test_a_full_mailbox_or_policy_bounce_counts_but_does_not_suppress() -> None:
    h, log, _supp, _metrics, _rep, hard = handler([delivered("a@dest.test")])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    for status in ("5.2.2", "5.7.1", "5.1.7"):
        await h.handle(dsn(rp, "a@dest.test", status), [rp])
    assert hard == [] and len(log.events) == 3
    # 5.1.2 (the domain) is a hard bounce that suppresses only when repeated: handed over.
    await h.handle(dsn(rp, "a@dest.test", "5.1.2"), [rp])
    assert len(hard) == 1


async def test_reports_naming_nothing_of_ours_are_counted_and_dropped() -> None:
    h, log, supp, metrics, _rep, hard = handler([delivered("a@dest.test")])
    await h.handle(dsn("someone@elsewhere.test", "a@dest.test"), [f"x@{DOMAIN}"])
    assert reports(metrics, "dsn", "unmatched") == 1
    await h.handle(b"Subject: out of office\r\n\r\nI am away\r\n", [f"x@{DOMAIN}"])
    assert reports(metrics, "other", "ignored") == 1
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    not_spam = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp,
                    RECIPIENT="a@dest.test").replace(b"Feedback-Type: abuse",
                                                     b"Feedback-Type: not-spam")
    await h.handle(not_spam, [f"fbl@{DOMAIN}"])
    assert reports(metrics, "arf", "ignored") == 1
    assert hard == [] and supp.added == [] and log.events == []


async def test_a_complaint_suppresses_as_complaint_and_fills_the_complaint_window() -> None:
    h, _log, supp, metrics, rep, _hard = handler([delivered("a@dest.test")])
    for _ in range(999):
        rep.record("app", "delivered")
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp, RECIPIENT="a@dest.test")
    await h.handle(arf, [f"fbl@{DOMAIN}"])
    assert supp.added == [("a@dest.test", "complaint", "feedback")]
    assert metrics.registry.get_sample_value(
        "mailplane_relay_complaints_total",
        {"sender_domain": "example.com", "credential": "app"}) == 1
    pause = rep.paused("app")
    assert pause is not None and pause.cause == "complaint"  # 1 in 999 delivered > 0.1 %
    # The same report about another recipient of ours, with a forged return path: dropped.
    forged = arf.replace(b"<a@dest.test>", b"<victim@dest.test>")
    await h.handle(forged, [f"fbl@{DOMAIN}"])
    assert reports(metrics, "arf", "forged") == 1 and len(supp.added) == 1


async def test_a_complaint_is_counted_per_credential_sender_domain_and_minute(
        tmp_path: Path) -> None:
    """Into the store, where the portal's figures read a sender domain's complaint rate."""
    from mailplane_relay.store import SqliteBackend

    store = SqliteBackend(str(tmp_path / "store.sqlite3"))
    await store.open()
    h, _log, _supp, _metrics, _rep, _hard = handler(
        [delivered("a@dest.test") | {"sender": "News@Example.COM"}],
        domain_complaints=store.domain_complaints_add, clock=lambda: 1_800_000_030.0)
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp, RECIPIENT="a@dest.test")
    await h.handle(arf, [f"fbl@{DOMAIN}"])
    await h.handle(arf, [f"fbl@{DOMAIN}"])  # the same report again: not counted again
    await store.close()
    with sqlite3.connect(tmp_path / "store.sqlite3") as conn:
        rows = conn.execute("SELECT credential, domain, minute, complaints "
                            "FROM complaint_domain_buckets").fetchall()
    assert rows == [("app", "example.com", 30_000_000, 1)]


async def test_a_complaint_with_the_recipient_redacted_is_matched_through_the_return_path(
) -> None:
    h, _log, supp, metrics, _rep, _hard = handler([delivered("a@dest.test"),
                                                   delivered("b@dest.test")])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["b@dest.test"])
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp, RECIPIENT="x")
    redacted = arf.replace(b"Original-Rcpt-To: <x>\r\n", b"").replace(b"To: <x>", b"To: <>")
    assert b"Original-Rcpt-To" not in redacted
    await h.handle(redacted, [f"fbl@{DOMAIN}"])
    assert supp.added == [("b@dest.test", "complaint", "feedback")]
    assert reports(metrics, "arf", "matched") == 1
    # Without a return path of ours there is nobody to attribute it to.
    await h.handle(redacted.replace(rp.encode(), b"someone@elsewhere.test"), [f"fbl@{DOMAIN}"])
    assert reports(metrics, "arf", "unmatched") == 1 and len(supp.added) == 1


async def test_a_replayed_report_counts_once_per_message_and_recipient() -> None:
    """Whoever received a message holds its return path and may send the same report again
    and again; one recipient must not push the sender's bounce or complaint rate alone."""
    h, log, supp, metrics, rep, _hard = handler([delivered("a@dest.test")])
    recorded = log.record

    def record(event: LogEvent) -> None:  # the store shows what was recorded
        recorded(event)
        log.rows.append({"queue_id": event.queue_id, "recipient": event.recipient,
                         "status": event.status, "credential": event.credential,
                         "sender": event.sender, "message_id": event.message_id})

    log.record = record  # type: ignore[method-assign]
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    for _ in range(3):
        await h.handle(dsn(rp, "a@dest.test", "5.2.2"), [rp])
    assert reports(metrics, "dsn", "matched") == 1 and reports(metrics, "dsn", "duplicate") == 2
    assert len(log.events) == 1
    assert metrics.registry.get_sample_value(
        "mailplane_relay_async_bounces_total",
        {"sender_domain": "example.com", "credential": "app"}) == 1

    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp, RECIPIENT="a@dest.test")
    for _ in range(3):
        await h.handle(arf, [f"fbl@{DOMAIN}"])
    assert reports(metrics, "arf", "matched") == 1 and reports(metrics, "arf", "duplicate") == 2
    assert len(supp.added) == 1
    assert metrics.registry.get_sample_value(
        "mailplane_relay_complaints_total",
        {"sender_domain": "example.com", "credential": "app"}) == 1
    for _ in range(2000):
        rep.record("app", "delivered")
    assert rep.paused("app") is None  # one complaint in 2000 deliveries: under 0.1 %


async def test_a_crafted_report_is_read_for_its_first_return_paths_and_recipients_only() -> None:
    """Thousands of return paths and recipients fit in the size limit; each pair costs a tag
    check and maybe a log query. A genuine report names one of each: ten are read."""
    h, _log, supp, metrics, _rep, hard = handler([delivered("a@dest.test")])
    rp = verp.return_path(KEY, "bounces", DOMAIN, QID, ["a@dest.test"])
    decoys = "".join(f"Final-Recipient: rfc822; v{i}@dest.test\r\nAction: failed\r\n"
                     f"Status: 5.1.1\r\n\r\n" for i in range(10))
    many = dsn(rp, "a@dest.test").replace(b"Final-Recipient", decoys.encode()
                                          + b"Final-Recipient", 1)
    await h.handle(many, [rp])
    assert hard == [] and reports(metrics, "dsn", "forged") == 10
    forged = "".join(f"Original-Mail-From: <bounces+{QID.lower()}r{i:010d}@{DOMAIN}>\r\n"
                     for i in range(10))
    arf = fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp, RECIPIENT="a@dest.test")
    arf = arf.replace(b"Original-Mail-From", forged.encode() + b"Original-Mail-From", 1)
    await h.handle(arf, [f"fbl@{DOMAIN}"])
    assert supp.added == [] and reports(metrics, "arf", "forged") == 1
    # The same reports with nothing ahead of ours are acted on.
    await h.handle(dsn(rp, "a@dest.test"), [rp])
    await h.handle(fill("arf-abuse.eml", TO=f"fbl@{DOMAIN}", RETURN_PATH=rp,
                        RECIPIENT="a@dest.test"), [f"fbl@{DOMAIN}"])
    assert len(hard) == 1 and supp.added == [("a@dest.test", "complaint", "feedback")]
