"""A pool: several real `mailplane relay` processes sharing one real PostgreSQL store.

Each relay has its own spool and ports, as the pods of a StatefulSet do; they share the database
the session started (tests/helpers/postgres.py). Real clients (aiosmtplib over TLS, AUTH) send
to all of them; the capture sink is the smarthost.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import subprocess
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from mailplane_relay.store.sync import query_log
from tests.helpers.postgres import PostgresServer
from tests.helpers.relayproc import RelayProcess, relay_command
from tests.helpers.sink import Sink

pytestmark = pytest.mark.slow


def message(i: int, to: str | None = None) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = to or f"user{i}@dest.test"
    msg["Subject"] = f"pool {i}"
    msg["Message-ID"] = f"<pool-{i}@example.com>"
    msg.set_content(f"body {i}\n")
    return msg


async def send(relay: RelayProcess, msg: EmailMessage,
               recipients: list[str] | None = None) -> int:
    """Send one message in its own session; the reply code to DATA (or to the refused step)."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True, timeout=15)
    await smtp.connect()
    try:
        await smtp.login("app", "app-password")
        await smtp.send_message(msg, recipients=recipients)
        return 250
    except aiosmtplib.SMTPRecipientsRefused as exc:
        return exc.recipients[0].code
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        with _suppress():
            await smtp.quit()


async def envelope_code(relay: RelayProcess, rcpt: str | None = None) -> int:
    """MAIL FROM (and RCPT TO when given) without sending anything: the first refusal's code,
    or 250. Probing this way adds no delivery outcome to the counts under test."""
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True, timeout=15)
    await smtp.connect()
    try:
        await smtp.login("app", "app-password")
        code, _ = await smtp.mail("app@example.com")
        if code == 250 and rcpt is not None:
            code, _ = await smtp.rcpt(rcpt)
        return code
    except aiosmtplib.SMTPResponseException as exc:
        return exc.code
    finally:
        with _suppress():
            await smtp.quit()


class _suppress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return exc[0] is not None and issubclass(exc[0], Exception)  # type: ignore[arg-type]


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
def pool_store(pg_server: PostgresServer, tmp_path: Path) -> tuple[str, Path]:
    """A fresh database and the file holding its connection string (a Secret's volume)."""
    dsn = pg_server.dsn(pg_server.create_database())
    dsn_file = tmp_path / "store-dsn"
    dsn_file.write_text(dsn + "\n")
    return dsn, dsn_file


def pool(relay_factory: Callable[..., RelayProcess], sink: Sink, dsn_file: Path, n: int,
         **extra: Any) -> list[RelayProcess]:
    relays = [
        relay_factory(smarthost_port=sink.port, extra={
            "store": {"backend": "postgresql", "dsnFile": str(dsn_file), "leaseSize": 3},
            **extra})
        for _ in range(n)
    ]
    for r in relays:
        r.start()
    return relays


async def test_a_daily_quota_holds_across_the_pool(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    dsn, dsn_file = pool_store
    sink: Sink = await smtp_sink()
    relays = await asyncio.to_thread(
        pool, relay_factory, sink, dsn_file, 3, limits={"authFailureDelay": 0,
                                                        "defaultDailyQuota": 20})
    # 45 attempts, spread over the three relays, 9 at a time.
    sem = asyncio.Semaphore(9)

    async def one(i: int) -> int:
        async with sem:
            return await send(relays[i % 3], message(i))

    codes = await asyncio.gather(*(one(i) for i in range(45)))
    # A relay may still hold up to leaseSize - 1 leased messages: a few more tries each use them.
    codes += [await send(r, message(100 + i)) for i, r in enumerate(relays * 3)]
    assert codes.count(250) == 20, codes  # exactly the quota: no overshoot, nothing left unused
    assert set(codes) == {250, 452}
    accepted = {r.http_port: r.metric("mailplane_relay_messages_received_total")
                for r in relays}
    assert sum(accepted.values()) == 20 and all(v > 0 for v in accepted.values()), accepted
    # `mailplane logs` reads the whole pool: every accepted message, whichever pod took it.
    out = subprocess.run([*relay_command()[:-1], "logs", "--store", pg_url(dsn), "--status",
                          "received", "--limit", "1000", "--json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    rows = [json.loads(line) for line in out.splitlines()]
    assert len({r["queue_id"] for r in rows}) == 20
    assert {r["namespace"] for r in rows} == {"team-app"}


def pg_url(dsn: str) -> str:
    parts = dict(p.split("=", 1) for p in dsn.split())
    from urllib.parse import quote

    return f"postgresql://{parts['user']}@/{parts['dbname']}?host={quote(parts['host'], safe='')}"


async def test_a_rate_holds_across_the_pool_within_a_minute(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    _dsn, dsn_file = pool_store
    sink: Sink = await smtp_sink()
    relays = await asyncio.to_thread(
        pool, relay_factory, sink, dsn_file, 2, limits={"authFailureDelay": 0,
                                                        "defaultRatePerMinute": 12})
    # The bound is the per-minute limit itself only for sends inside one UTC minute. Sending
    # across a minute boundary (a slow machine) proves nothing: sending starts again at the
    # beginning of the next minute untouched by it.
    for attempt in itertools.count(1):
        if time.time() % 60 > 40:
            await asyncio.sleep(61 - time.time() % 60)
        minute = time.time() // 60
        codes = [await send(relays[i % 2], message(i)) for i in range(30)]
        if time.time() // 60 == minute:
            break
        assert attempt < 3, "30 sends never fitted in one minute"
        await asyncio.sleep(61 - time.time() % 60)
    assert codes.count(250) == 12, codes
    assert set(codes) == {250, 451}


async def test_a_hard_bounce_suppresses_on_every_pod_and_a_pause_survives_a_restart(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    dsn, dsn_file = pool_store
    bad = [f"gone{i}@dest.test" for i in range(4)]
    sink: Sink = await smtp_sink(rcpt_replies=dict.fromkeys(bad, "550 5.1.1 No such user"))
    a, b = await asyncio.to_thread(
        pool, relay_factory, sink, dsn_file, 2,
        abuse={"minRecipients": 4, "bounceRate": 0.5, "window": "1h"})

    # One pod sees the hard bounce ...
    assert await send(a, message(0, to=bad[0])) == 250
    await eventually(lambda: any(r["address"] == bad[0] for r in _suppression(dsn)),
                     "the bounce on the shared suppression list")
    # ... and the other refuses the address at RCPT within about a second.
    await eventually(lambda: asyncio.run(envelope_code(b, bad[0])) == 550,
                     "the other pod refusing the suppressed address", timeout=10)

    # Bounces seen by both pods add up to one pool-wide bounce rate: the credential pauses.
    for i, addr in enumerate(bad[1:], start=2):
        assert await send(b if i % 2 else a, message(i, to=addr)) == 250
    await eventually(lambda: asyncio.run(envelope_code(a)) == 451
                     and asyncio.run(envelope_code(b)) == 451,
                     "the credential paused on both pods", timeout=30)
    # A restart keeps the pause: it is the store's, not the process's.
    assert await asyncio.to_thread(a.stop) == 0
    await asyncio.to_thread(a.start)
    assert await envelope_code(a) == 451


def _suppression(dsn: str) -> list[dict[str, Any]]:
    from mailplane_relay.store.sync import list_suppression

    return list_suppression(dsn)


async def test_the_log_of_every_pod_is_searchable_by_queue_id(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    dsn, dsn_file = pool_store
    sink: Sink = await smtp_sink()
    relays = await asyncio.to_thread(pool, relay_factory, sink, dsn_file, 2)
    for i in range(6):
        assert await send(relays[i % 2], message(i)) == 250
    await sink.wait_for_messages(6)
    await eventually(lambda: len(query_log(dsn, status="delivered", limit=100)) == 6,
                     "every delivery in the shared log")
    received = query_log(dsn, status="received", limit=100)
    for row in received:
        assert {r["status"] for r in query_log(dsn, queue_id=row["queue_id"])} == {
            "received", "delivered"}


async def test_the_database_going_down_under_load_loses_no_mail_and_no_log_row(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pg_server: PostgresServer, pool_store: tuple[str, Path],
) -> None:
    """PostgreSQL stopped (pg_ctl stop -m fast) while two relays take mail, started again: every
    message is delivered, every log row reaches the database once, and the metrics showed it."""
    dsn, dsn_file = pool_store
    sink: Sink = await smtp_sink()
    relays = await asyncio.to_thread(pool, relay_factory, sink, dsn_file, 2)
    n = 60
    sent: list[int] = []
    down_seen: dict[str, float] = {}

    async def load() -> None:
        for i in range(n):
            sent.append(await send(relays[i % 2], message(i)))
            await asyncio.sleep(0.05)

    sender = asyncio.create_task(load())
    while len(sent) < n // 3:
        await asyncio.sleep(0.05)
    await asyncio.to_thread(pg_server.stop, "fast")
    try:
        # While it is down: mail is still accepted, the store reads down, rows wait on disk.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and (len(sent) < 2 * n // 3 or len(down_seen) < 2):
            for r in relays:
                if r.metric("mailplane_relay_store_up") == 0:
                    down_seen["up0"] = 1
                buffered = r.metric("mailplane_relay_messagelog_disk_buffered_events")
                if buffered > 0:
                    down_seen["buffered"] = buffered
            await asyncio.sleep(0.2)
        assert down_seen.keys() == {"up0", "buffered"}, down_seen
    finally:
        await asyncio.to_thread(pg_server.start)
    await sender
    assert sent == [250] * n  # nothing refused while the database was down
    await sink.wait_for_messages(n, timeout=60)

    def all_rows_in() -> bool:
        rows = query_log(dsn, limit=10_000)
        received = [r["queue_id"] for r in rows if r["status"] == "received"]
        delivered = [r["queue_id"] for r in rows if r["status"] == "delivered"]
        return len(received) == n and len(delivered) == n

    await eventually(all_rows_in, "every log row replayed into the database", timeout=60)
    rows = query_log(dsn, limit=10_000)
    received = [r["queue_id"] for r in rows if r["status"] == "received"]
    assert len(set(received)) == n == len(received)  # each exactly once: replay is idempotent
    await eventually(lambda: all(r.metric("mailplane_relay_store_up") == 1 for r in relays),
                     "the store reading up again")
    assert sum(r.metric("mailplane_relay_messagelog_replayed_events_total") for r in relays) > 0
    assert all(r.metric("mailplane_relay_messagelog_disk_buffered_events") == 0 for r in relays)
    assert sum(r.metric("mailplane_relay_messagelog_dropped_events_total") for r in relays) == 0


async def test_an_erasure_reaches_every_pod_within_a_minute(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    """`mailplane erase ADDRESS` against the pool's store: the log rows go at once, and every
    relay drops the address from the messages still waiting in its spool (deleting those left
    with no recipient), reports what it removed, and nothing about it is written afterwards."""
    dsn, dsn_file = pool_store
    gone, stay = "gone@dest.test", "stay@dest.test"
    # Both recipients are deferred, so their messages wait in the spools and are retried.
    sink: Sink = await smtp_sink(rcpt_replies={gone: "451 4.2.0 Try later",
                                               stay: "451 4.2.0 Try later"})
    a, b = await asyncio.to_thread(pool, relay_factory, sink, dsn_file, 2)
    assert await send(a, message(1, to=stay), recipients=[gone, stay]) == 250
    assert await send(b, message(2, to=stay), recipients=[gone]) == 250
    await eventually(lambda: len(query_log(dsn, recipient=gone, status="deferred")) >= 2,
                     "both messages deferred for the address")

    started = time.monotonic()
    r = await asyncio.to_thread(subprocess.run, [
        *relay_command()[:-1], "erase", gone.upper(), "--store", pg_url(dsn), "--json"],
        capture_output=True, text=True, timeout=90)
    elapsed = time.monotonic() - started
    assert r.returncode == 0, r.stdout + r.stderr
    out = json.loads(r.stdout)
    assert out["complete"] is True and elapsed < 60, (out, elapsed)
    removed = out["removed"]
    assert removed["workers"] == 2  # each relay process carried it out and reported
    assert removed["spool_recipients_removed"] == 2  # from both messages
    assert removed["spool_messages_deleted"] == 1  # b's message, left with no recipient
    assert removed["message_log"] >= 4

    # Retries go on for stay@ only; nothing names the address any more, anywhere.
    before = len(query_log(dsn, recipient=stay))
    await eventually(lambda: len(query_log(dsn, recipient=stay)) > before + 1,
                     "the other recipient still retried")
    assert query_log(dsn, recipient=gone) == []
    for relay in (a, b):
        content = b"".join(p.read_bytes() for p in relay.spool_dir.rglob("*") if p.is_file())
        assert gone.encode() not in content
    assert all(r.metric("mailplane_relay_erasure_requests_total", result="success") == 1
               for r in (a, b))


async def test_a_complaint_added_by_hand_counts_once_in_the_pool(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
    pool_store: tuple[str, Path],
) -> None:
    """Every pod's change feed sees the complaint the CLI writes; only the pod that claims it
    in the store counts it (and queues its webhook events), so the pool counts it once."""
    _dsn, dsn_file = pool_store
    sink: Sink = await smtp_sink()
    a, b = await asyncio.to_thread(pool, relay_factory, sink, dsn_file, 2)
    assert await send(a, message(1)) == 250
    await sink.wait_for_messages(1)
    await eventually(lambda: a.metric("mailplane_relay_recipients_total",
                                      outcome="delivered") == 1, "the delivery")

    def add(address: str, reason: str) -> None:
        subprocess.run(
            [*relay_command()[:-1], "suppression", "add", address, "--reason", reason,
             "--config", str(b.config_dir)],
            capture_output=True, text=True, timeout=30, check=True)

    def entries(n: int) -> bool:
        return all(r.metric("mailplane_relay_suppression_entries") == n for r in (a, b))

    def complaints() -> float:
        return sum(r.metric("mailplane_relay_complaints_total") for r in (a, b))

    await asyncio.to_thread(add, "user1@dest.test", "complaint")
    await eventually(lambda: entries(1), "both pods seeing the complaint")
    # A pod hands the entries of one pass to the counting step before its next pass; an entry
    # added after both saw the complaint, once seen by both, means both finished counting.
    await asyncio.to_thread(add, "later@dest.test", "manual")
    await eventually(lambda: entries(2), "both pods seeing the later entry")
    assert complaints() == 1
