"""Limiter with shared counters: leases against the limit, give-back, and the local share when
the pool does not answer. The pool here is the real SQLite backend (the same leases the workers
of a pod share); PostgreSQL pools are covered with real relay processes in test_store_pool.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.config import RelayConfig, RelaySettings, hash_password
from mailplane_relay.ratelimit import Limiter, LimitExceeded
from mailplane_relay.store import SqliteBackend

T0 = 1_800_000_000.0 - (1_800_000_000.0 % 86400) + 3600


def config(**cred: Any) -> RelayConfig:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"}, "credentials": [
        {"username": "app", "passwordHash": hash_password("x"), "allowedSenders": ["ex.com"],
         **cred}]}
    return RelayConfig(settings=RelaySettings.model_validate(doc))


class Down:
    """A pool that does not answer."""

    async def lease(self, *a: Any) -> int:
        raise ConnectionError("store down")

    async def give_back(self, *a: Any) -> None:
        raise ConnectionError("store down")

    async def peers(self, *a: Any) -> int:
        raise ConnectionError("store down")


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    b = SqliteBackend(str(tmp_path / "s.sqlite3"))
    await b.open()
    yield b
    await b.close()


async def test_workers_share_a_quota_through_leases(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=25)
    cred = cfg.credentials["app"]
    workers = [Limiter(lambda: cfg, clock=lambda: T0, pool=store, lease_size=4,
                       peer_id=f"w{i}") for i in range(3)]
    results = [await workers[i % 3].reserve_message(cred) for i in range(40)]
    assert results.count(None) == 25
    assert set(results) == {None, LimitExceeded("quota", 25)}
    # Once the pool said "used up", MAIL FROM is refused at once.
    assert workers[0].check_message(cred) == LimitExceeded("quota", 25)


async def test_a_released_message_and_unused_quota_go_back(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=10)
    cred = cfg.credentials["app"]
    a = Limiter(lambda: cfg, clock=lambda: T0, pool=store, lease_size=10, peer_id="a")
    b = Limiter(lambda: cfg, clock=lambda: T0, pool=store, lease_size=10, peer_id="b")
    assert await a.reserve_message(cred) is None  # a leased all 10
    a.release_message(cred)  # the commit failed
    assert await b.reserve_message(cred) == LimitExceeded("quota", 10)
    await a.give_back_unused()  # a stops: its 10 unused go back
    b2 = Limiter(lambda: cfg, clock=lambda: T0, pool=store, lease_size=10, peer_id="b2")
    assert [await b2.reserve_message(cred) for _ in range(11)].count(None) == 10


async def test_without_the_pool_each_worker_takes_its_share(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=30, ratePerMinute=1000)
    cred = cfg.credentials["app"]
    for i in range(3):
        await store.peers(f"w{i}", T0, 600)
    lim = Limiter(lambda: cfg, clock=lambda: T0, pool=store, peer_id="w0")
    await lim.heartbeat()
    assert lim.peers == 3
    lim._pool = Down()  # the database goes away
    results = [await lim.reserve_message(cred) for _ in range(15)]
    assert results.count(None) == 10  # 30 / 3 workers
    assert not lim.pool_up
    with pytest.raises(ConnectionError):
        await lim.heartbeat()


async def test_rate_windows_are_minutes(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=5)
    cred = cfg.credentials["app"]
    now = [T0]
    lim = Limiter(lambda: cfg, clock=lambda: now[0], pool=store, lease_size=2, peer_id="x")
    assert [await lim.reserve_message(cred) for _ in range(7)].count(None) == 5
    now[0] += 60
    assert await lim.reserve_message(cred) is None


async def test_a_pause_is_the_stores_and_survives_a_new_process(store: SqliteBackend) -> None:
    from mailplane_relay.config import AbuseSettings
    from mailplane_relay.reputation import Reputation

    abuse = AbuseSettings.model_validate({"minRecipients": 4, "bounceRate": 0.5})
    one = Reputation(lambda: abuse, clock=lambda: T0, store=store)
    two = Reputation(lambda: abuse, clock=lambda: T0, store=store)
    await one.sync()
    await two.sync()
    for _ in range(2):
        one.record("app", "bounced")
        two.record("app", "bounced")
    assert one.paused("app") is None and two.paused("app") is None  # 2 each: not enough
    await one.sync()
    await two.sync()
    await one.sync()
    assert one.paused("app") is not None and two.paused("app") is not None  # 4 in the pool
    fresh = Reputation(lambda: abuse, clock=lambda: T0, store=store)  # a restarted worker
    assert fresh.paused("app") is None
    await fresh.sync()
    assert fresh.paused("app") is not None
    later = Reputation(lambda: abuse, clock=lambda: T0 + 3 * 3600, store=store)
    await later.sync()
    assert later.paused("app") is None  # the window slid past the bounces
