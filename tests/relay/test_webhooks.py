"""Delivery event webhooks against a real HTTPS receiver on loopback (tests/helpers/webhook.py,
which checks signatures with its own code), on both real store backends."""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
from prometheus_client import CollectorRegistry

from mailplane_relay.config import RelayConfig, RelaySettings, hash_password
from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog, SqliteBackend, StoreBackend
from mailplane_relay.store.erasure import erase_address
from mailplane_relay.webhooks import BlockedAddress, OutboxMaker, WebhookDispatcher, check_address
from tests.helpers.pki import write_ca_file
from tests.helpers.webhook import Receiver

SECRET = b"0123456789abcdef0123456789abcdef"
OLD_SECRET = b"fedcba9876543210fedcba9876543210"
# Exactly the fields of an event: metadata of the log row, nothing of the message itself.
EVENT_KEYS = {"id", "type", "timestamp", "credential", "namespace", "message", "attempt",
              "response"}
MESSAGE_KEYS = {"queueId", "messageId", "sender", "recipient"}


def event(i: int, status: str = "delivered", credential: str = "alice",
          recipient: str | None = None) -> LogEvent:
    return LogEvent(ts=time.time(), status=status, queue_id=f"Q{i}",  # type: ignore[arg-type]
                    message_id=f"<m{i}@example.com>", credential=credential,
                    sender=f"app@{credential}.example", recipient=recipient or f"u{i}@dest.test",
                    response="250 2.0.0 Ok", size=100, attempt=1, remote="mx.dest.test")


class Cfg:
    """A configuration callable whose content a test changes (as a reload does)."""

    def __init__(self, **webhooks: Any) -> None:
        self.n = 0
        self.webhooks = webhooks
        self.creds: dict[str, Any] = {}
        self.retention: dict[str, Any] = {}
        self.cfg = self.build()

    def build(self) -> RelayConfig:
        self.n += 1
        settings = RelaySettings.model_validate({
            "tls": {"certFile": "unused.crt", "keyFile": "unused.key"},
            "webhooks": {"retryInitial": "100ms", "retryMax": "200ms", "timeout": "2s",
                         "pollInterval": "50ms", **self.webhooks},
            **({"retention": self.retention} if self.retention else {}),
            "credentials": [
                {"username": name, "passwordHash": _HASH,
                 "allowedSenders": [f"{name}.example"], "owner": f"team-{name}/{name}",
                 **({"webhook": hook} if hook else {})}
                for name, hook in self.creds.items()],
        })
        self.cfg = RelayConfig(settings=settings, source_hash=f"h{self.n}")
        return self.cfg

    def __call__(self) -> RelayConfig:
        return self.cfg


_HASH = hash_password("unused")


@pytest.fixture(params=["sqlite", "postgresql"])
def make_backend(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], StoreBackend]:
    if request.param == "sqlite":
        db = str(tmp_path / "store.sqlite3")
        return lambda: SqliteBackend(db)
    from mailplane_relay.store.postgres import PostgresBackend

    dsn = request.getfixturevalue("pg_dsn")
    return lambda: PostgresBackend(dsn)


@pytest.fixture
async def backend(make_backend: Callable[[], StoreBackend]) -> AsyncIterator[StoreBackend]:
    b = make_backend()
    await b.open()
    yield b
    await b.close()


async def log_events(backend: StoreBackend, cfg: Cfg, events: list[LogEvent]) -> None:
    """Record events and flush them as the relay's message log does (with their outbox)."""
    ml = MessageLog(backend, flush_interval=3600,
                    metrics=RelayMetrics.create(CollectorRegistry()),
                    tenant_of=lambda c: f"team-{c}" if c else None, outbox_of=OutboxMaker(cfg))
    await ml.start()
    for e in events:
        ml.record(e)
    await ml.close()


async def pump(dispatcher: WebhookDispatcher, until: Callable[[], bool],
               timeout: float = 20.0) -> None:
    """Run the dispatcher's passes until ``until()`` holds."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting on the dispatcher")
        if not await dispatcher.run_once():
            await asyncio.sleep(0.05)


def dispatcher(backend: StoreBackend, cfg: Cfg, owner: str = "w1") -> WebhookDispatcher:
    return WebhookDispatcher(backend, cfg, CollectorRegistry(), owner)


def sample(d: WebhookDispatcher, result: str) -> float:
    return float(d.metrics.deliveries.labels(result)._value.get())


async def test_events_are_signed_retried_and_each_tenant_gets_only_its_own(
    backend: StoreBackend, webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    platform: Receiver = await webhook_receiver([SECRET])
    alice: Receiver = await webhook_receiver([SECRET])
    bob: Receiver = await webhook_receiver([OLD_SECRET])
    # The first post to alice's endpoint fails (500): it is posted again, with the same id.
    alice.script = [500]
    secret_file = tmp_path / "platform-secret"
    secret_file.write_bytes(SECRET + b"\n")
    cfg = Cfg(endpoint={"url": platform.url, "secretFiles": [str(secret_file)]},
              caFile=str(write_ca_file(tls_ca, tmp_path)),
              allowPrivateNetworks=["127.0.0.0/8"], credentialPrivateNetworks=["127.0.0.0/8"])
    cfg.creds = {"alice": {"url": alice.url, "secrets": [SECRET.decode()],
                           "events": ["delivered", "bounced"]},
                 "bob": {"url": bob.url, "secrets": [OLD_SECRET.decode()]},
                 "carol": None}
    cfg.build()
    await log_events(backend, cfg, [
        event(1, "received", "alice"), event(2, "delivered", "alice"),
        event(3, "deferred", "alice"), event(4, "bounced", "alice"),
        event(5, "delivered", "bob"), event(6, "delivered", "carol"),
    ])
    d = dispatcher(backend, cfg)
    try:
        await pump(d, lambda: len(alice.accepted) == 2 and len(bob.accepted) == 1
                   and len(platform.accepted) == 5)
    finally:
        await d.close()
    assert not (platform.rejected or alice.rejected or bob.rejected)
    # alice: her delivered and bounced events only (her filter), none of bob's or carol's.
    assert sorted(p.event["message"]["queueId"] for p in alice.accepted) == ["Q2", "Q4"]
    assert {p.event["credential"] for p in alice.accepted} == {"alice"}
    assert [p.event["message"]["queueId"] for p in bob.accepted] == ["Q5"]
    # The platform's endpoint: every event type of every credential ("received" is none).
    assert sorted(p.event["message"]["queueId"] for p in platform.accepted) == [
        "Q2", "Q3", "Q4", "Q5", "Q6"]
    # The failed post and its retry carried the same event id.
    first, second = [p for p in alice.attempts if p.event["message"]["queueId"] == "Q2"]
    assert (first.status, second.status) == (500, 200)
    assert first.event["id"] == second.event["id"] == second.headers["Mailplane-Event-Id"]
    assert sample(d, "failure") == 1 and sample(d, "success") == 8
    for post in platform.accepted + alice.accepted + bob.accepted:
        assert set(post.event) == EVENT_KEYS and set(post.event["message"]) == MESSAGE_KEYS
        assert post.event["namespace"] == f"team-{post.event['credential']}"
    assert await backend.webhook_backlog() == (0, None)


async def test_an_endpoint_that_hangs_is_timed_out_and_retried(
    backend: StoreBackend, webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    hook: Receiver = await webhook_receiver([SECRET])
    hook.script = ["hang"]
    cfg = Cfg(endpoint={"url": hook.url, "secrets": [SECRET.decode()]}, timeout="500ms",
              caFile=str(write_ca_file(tls_ca, tmp_path)), allowPrivateNetworks=["127.0.0.1/32"])
    await log_events(backend, cfg, [event(1)])
    d = dispatcher(backend, cfg)
    started = time.monotonic()
    try:
        await pump(d, lambda: len(hook.accepted) == 1)
    finally:
        await d.close()
    assert [p.status for p in hook.attempts] == ["hang", 200]
    assert time.monotonic() - started < 10
    assert sample(d, "failure") == 1


async def test_a_private_address_is_refused_unless_its_network_is_allowed(
    backend: StoreBackend, webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    hook: Receiver = await webhook_receiver([SECRET])
    ca_file = str(write_ca_file(tls_ca, tmp_path))
    # By name (resolved: the check is on the address connected to) and by literal address.
    by_name = hook.url.replace("127.0.0.1", "localhost")
    cfg = Cfg(endpoint={"url": by_name, "secrets": [SECRET.decode()]}, caFile=ca_file,
              # The relay's opening does not extend to the tenants' endpoints.
              allowPrivateNetworks=["10.0.0.0/8"])
    cfg.creds = {"alice": {"url": hook.url, "secrets": [SECRET.decode()]}}
    cfg.build()
    await log_events(backend, cfg, [event(1)])
    d = dispatcher(backend, cfg)
    try:
        await pump(d, lambda: sample(d, "failure") >= 2)
        assert hook.attempts == []
        cfg.webhooks["allowPrivateNetworks"] = ["127.0.0.0/8"]
        cfg.build()
        await pump(d, lambda: len(hook.accepted) == 1)
        # The platform's endpoint (by name) is allowed now; alice's still is not.
        assert hook.accepted[0].headers["Host"].startswith("localhost")
    finally:
        await d.close()
    waiting, _ = await backend.webhook_backlog()
    assert waiting == 1  # alice's event, retried until maxAge


async def test_both_secrets_sign_during_a_rotation(
    backend: StoreBackend, webhook_receiver: Any, tls_ca: trustme.CA, tmp_path: Path,
) -> None:
    old_only: Receiver = await webhook_receiver([OLD_SECRET])
    new_only: Receiver = await webhook_receiver([SECRET])
    ca_file = str(write_ca_file(tls_ca, tmp_path))
    cfg = Cfg(endpoint={"url": old_only.url, "secrets": [SECRET.decode(), OLD_SECRET.decode()]},
              caFile=ca_file, allowPrivateNetworks=["127.0.0.0/8"],
              credentialPrivateNetworks=["127.0.0.0/8"])
    cfg.creds = {"alice": {"url": new_only.url,
                           "secrets": [SECRET.decode(), OLD_SECRET.decode()]}}
    cfg.build()
    await log_events(backend, cfg, [event(1)])
    d = dispatcher(backend, cfg)
    try:
        await pump(d, lambda: len(old_only.accepted) == 1 and len(new_only.accepted) == 1)
    finally:
        await d.close()
    header = new_only.accepted[0].headers["Mailplane-Signature"]
    assert header.count("v1=") == 2 and header.startswith("t=")


async def test_an_untrusted_certificate_is_refused(
    backend: StoreBackend, webhook_receiver: Any,
) -> None:
    hook: Receiver = await webhook_receiver([SECRET])
    cfg = Cfg(endpoint={"url": hook.url, "secrets": [SECRET.decode()]},
              allowPrivateNetworks=["127.0.0.0/8"])  # no caFile: the test CA is unknown
    await log_events(backend, cfg, [event(1)])
    d = dispatcher(backend, cfg)
    try:
        await pump(d, lambda: sample(d, "failure") >= 1)
    finally:
        await d.close()
    assert hook.attempts == []


async def test_outbox_leases_erasure_and_expiry(
    backend: StoreBackend, make_backend: Callable[[], StoreBackend],
) -> None:
    cfg = Cfg(endpoint={"url": "https://hooks.example.net/x", "secrets": [SECRET.decode()]})
    await log_events(backend, cfg, [event(i, recipient="jane@dest.test" if i < 3 else None)
                                    for i in range(10)])
    other = make_backend()
    await other.open()
    try:
        now = time.time()
        # Two workers claiming at once get disjoint events; a leased event is nobody else's.
        a, b = await asyncio.gather(backend.webhook_claim("a", now, now + 60, 6),
                                    other.webhook_claim("b", now, now + 60, 6))
        ids_a, ids_b = {e["id"] for e in a}, {e["id"] for e in b}
        assert not ids_a & ids_b and len(ids_a | ids_b) == 10
        assert await backend.webhook_claim("c", now, now + 60, 10) == []
        # A retry by a worker whose lease was lost changes nothing.
        victim = a[0]
        await other.webhook_retry(int(victim["id"]), "b", now, "not mine")
        assert await other.webhook_claim("c", now + 1, now + 60, 10) == []
        # A lease runs out: the event is claimable again, with its id unchanged.
        again = await other.webhook_claim("c", now + 61, now + 120, 20)
        assert {e["event_id"] for e in again} == {e["event_id"] for e in a + b}
        # Erasure removes the address's pending events and counts them.
        report = await erase_address(backend, "Jane@dest.test")
        assert report.counts["webhook_outbox"] == 3
        assert (await backend.webhook_backlog())[0] == 7
        kept = [e for e in again if e["recipient"] != "jane@dest.test"]
        await backend.webhook_done([int(e["id"]) for e in kept[:2]])
        # Expiry: every event older than the cut-off goes.
        assert await backend.webhook_expire(time.time() + 1) == 5
        assert await backend.webhook_backlog() == (0, None)
    finally:
        await other.close()


async def test_a_claim_skips_events_another_worker_is_claiming(pg_dsn: str) -> None:
    """PostgreSQL: rows locked by a claim in flight (another pod's transaction) are skipped at
    once, neither waited for nor handed out twice."""
    import psycopg

    from mailplane_relay.store.postgres import PostgresBackend

    backend = PostgresBackend(pg_dsn)
    await backend.open()
    cfg = Cfg(endpoint={"url": "https://hooks.example.net/x", "secrets": [SECRET.decode()]})
    try:
        await log_events(backend, cfg, [event(i) for i in range(10)])
        held = await psycopg.AsyncConnection.connect(pg_dsn)
        async with held, held.transaction():
            locked = {r[0] for r in await (await held.execute(
                "SELECT id FROM webhook_outbox ORDER BY id LIMIT 4 FOR UPDATE")).fetchall()}
            now = time.time()
            got = await asyncio.wait_for(backend.webhook_claim("b", now, now + 60, 10), 5)
            assert len(got) == 6 and not locked & {e["id"] for e in got}
    finally:
        await backend.close()


@pytest.mark.parametrize("address", [
    "64:ff9b::a9fe:a9fe",   # NAT64 of 169.254.169.254, the cloud metadata address
    "64:ff9b::a00:5",       # NAT64 of 10.0.0.5: an IPv6-only cluster's gateway translates it
    "64:ff9b:1::808:808",   # a network's own translator (RFC 8215)
    "2002:a00:5::1",        # 6to4 of 10.0.0.5
    "::a00:5",              # IPv4-compatible form of 10.0.0.5
    "::ffff:127.0.0.1", "::1", "fd00::1", "169.254.169.254", "100.64.0.1",
])
def test_an_address_that_reaches_a_private_one_is_refused(address: str) -> None:
    with pytest.raises(BlockedAddress, match="is not public"):
        check_address(address, ())


def test_a_public_address_or_an_allowed_network_passes() -> None:
    for address in ("8.8.8.8", "2606:4700::1111", "64:ff9b::808:808", "2002:808:808::1"):
        check_address(address, ())
    check_address("64:ff9b::a00:5", (ipaddress.ip_network("10.0.0.0/8"),))
    check_address("::1", (ipaddress.ip_network("::1/128"),))


async def test_an_event_never_outlives_the_message_logs_retention(backend: StoreBackend) -> None:
    cfg = Cfg(endpoint={"url": "https://hooks.example.net/x", "secrets": [SECRET.decode()]},
              maxAge="1d")
    now = time.time()
    old = dataclasses.replace(event(1), ts=now - 2 * 3600)  # two hours old, within maxAge
    await log_events(backend, cfg, [old, event(2)])
    d = dispatcher(backend, cfg)
    try:
        await d.maintain(now, cfg().settings.webhooks)
        assert (await backend.webhook_backlog())[0] == 2  # within both
        cfg.retention = {"messageLog": "1h"}
        cfg.build()
        await d.maintain(now, cfg().settings.webhooks)
        assert (await backend.webhook_backlog())[0] == 1  # the log keeps an hour: so do events
        assert sample(d, "expired") == 1
    finally:
        await d.close()
