"""Sending limits, rule by rule, in process and with a fake clock: giving a message back, the
local share when the pool does not answer, leases per window, the heartbeat and the give-back
at shutdown. The pool is the real SQLite backend; a pool that fails is a wrapper around it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.config import Credential, RelayConfig, RelaySettings, hash_password
from mailplane_relay.ratelimit import PEER_HORIZON, Limiter, LimitExceeded
from mailplane_relay.store import SqliteBackend

DAY = 86400.0
T0 = 1_800_000_000.0 - (1_800_000_000.0 % DAY) + 3600  # 01:00 UTC on some day
HASH = hash_password("x")


def config(limits: dict[str, Any] | None = None, **cred: Any) -> RelayConfig:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"}, "limits": limits or {},
           "credentials": [{"username": "app", "passwordHash": HASH,
                            "allowedSenders": ["ex.com"], **cred}]}
    return RelayConfig(settings=RelaySettings.model_validate(doc))


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Recording:
    """The real pool, with every call written down and failures switched on at will."""

    def __init__(self, store: SqliteBackend) -> None:
        self.store = store
        self.calls: list[tuple[Any, ...]] = []
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("store down")

    async def lease(self, kind: str, credential: str, window_start: int, want: int,
                    limit: int) -> int:
        self.calls.append(("lease", kind, credential, window_start, want, limit))
        self._check()
        return await self.store.lease(kind, credential, window_start, want, limit)

    async def give_back(self, kind: str, credential: str, window_start: int, n: int) -> None:
        self.calls.append(("give_back", kind, credential, window_start, n))
        self._check()
        await self.store.give_back(kind, credential, window_start, n)

    async def peers(self, peer: str, now: float, horizon: float) -> int:
        self.calls.append(("peers", peer, now, horizon))
        self._check()
        return await self.store.peers(peer, now, horizon)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    b = SqliteBackend(str(tmp_path / "s.sqlite3"))
    await b.open()
    yield b
    await b.close()


async def reserve_all(lim: Limiter, cred: Credential, n: int) -> list[LimitExceeded | None]:
    return [await lim.reserve_message(cred) for _ in range(n)]


# ------------------------------------------------------------------ alone (no pool)

async def test_alone_reserve_takes_and_release_gives_back_rate_and_quota() -> None:
    cfg = config(ratePerMinute=2, dailyQuota=3)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock)
    assert await reserve_all(lim, cred, 3) == [None, None, LimitExceeded("rate", 2)]
    assert lim.usage("app") == (0.0, 2)
    lim.release_message(cred)  # the second message was not accepted after all
    assert lim.usage("app") == (1.0, 1)
    assert await lim.reserve_message(cred) is None
    clock.now += 30  # one token back (2 per minute)
    assert await lim.reserve_message(cred) is None
    clock.now += 30
    assert await lim.reserve_message(cred) == LimitExceeded("quota", 3)
    lim.release_message(cred)
    assert await lim.reserve_message(cred) is None


async def test_release_never_goes_beyond_the_bucket_or_below_zero() -> None:
    cfg = config(ratePerMinute=2, dailyQuota=2)
    cred = cfg.credentials["app"]
    lim = Limiter(lambda: cfg, clock=Clock())
    lim.release_message(cred)  # nothing taken yet: nothing to give back, no state made
    assert lim.usage("app") is None
    assert lim.check_message(cred) is None
    assert lim.usage("app") == (2.0, 0)  # a fresh bucket is full
    lim.release_message(cred)
    lim.release_message(cred)
    assert lim.usage("app") == (2.0, 0)
    assert await reserve_all(lim, cred, 3) == [None, None, LimitExceeded("quota", 2)]


async def test_release_with_a_quota_only_leaves_no_tokens() -> None:
    cfg = config(dailyQuota=1)
    cred = cfg.credentials["app"]
    lim = Limiter(lambda: cfg, clock=Clock())
    assert await lim.reserve_message(cred) is None
    lim.release_message(cred)
    assert lim.usage("app") == (0.0, 0)
    assert await reserve_all(lim, cred, 2) == [None, LimitExceeded("quota", 1)]


def test_a_clock_that_steps_back_adds_no_tokens() -> None:
    cfg = config(ratePerMinute=60)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock)
    for _ in range(60):
        lim.record_message(cred)
    assert lim.check_message(cred) == LimitExceeded("rate", 60)
    clock.now -= 3600
    assert lim.check_message(cred) == LimitExceeded("rate", 60)
    clock.now += 1  # one second later than the step back: one token
    assert lim.check_message(cred) is None
    usage = lim.usage("app")
    assert usage is not None and usage[0] == pytest.approx(1.0) and usage[1] == 60


def test_refill_is_rate_over_sixty_per_second_and_capped() -> None:
    cfg = config(ratePerMinute=6)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock)
    for _ in range(6):
        lim.record_message(cred)
    clock.now += 5  # 6/min is one token per 10 s
    assert lim.check_message(cred) == LimitExceeded("rate", 6)
    usage = lim.usage("app")
    assert usage is not None and usage[0] == pytest.approx(0.5) and usage[1] == 6
    clock.now += 5
    assert lim.check_message(cred) is None
    clock.now += 3600
    lim.check_message(cred)
    assert lim.usage("app") == (6.0, 6)


def test_record_without_limits_keeps_nothing_and_quota_counts_the_day() -> None:
    cfg = config()
    lim = Limiter(lambda: cfg, clock=Clock())
    lim.record_message(cfg.credentials["app"])
    assert lim.usage("app") is None
    quota = config(dailyQuota=5)
    lim = Limiter(lambda: quota, clock=Clock())
    lim.record_message(quota.credentials["app"])
    lim.record_message(quota.credentials["app"])
    assert lim.usage("app") == (0.0, 2)


def test_default_limits_fill_in_only_what_the_credential_leaves_open() -> None:
    cfg = config({"defaultRatePerMinute": 7, "defaultDailyQuota": 70}, dailyQuota=9)
    lim = Limiter(lambda: cfg, clock=Clock())
    assert lim.limits_for(cfg.credentials["app"]) == (7, 9)
    assert Limiter(lambda: config(), clock=Clock()).limits_for(
        config().credentials["app"]) == (None, None)


def test_pruning_starts_at_sixteen_unknown_names_and_keeps_configured_ones() -> None:
    cfg = config(ratePerMinute=5)
    cred = cfg.credentials["app"]
    lim = Limiter(lambda: cfg, clock=Clock())
    lim.record_message(cred)
    for i in range(15):
        lim.record_message(cred.model_copy(update={"username": f"gone{i}"}))
    # 16 entries: one configured plus 15 unknown, under the bound of credentials + 16.
    assert lim.usage("gone0") is not None
    lim.record_message(cred.model_copy(update={"username": "gone15"}))
    assert lim.usage("gone0") is not None  # 16 < 1 + 16: still no pruning
    lim.record_message(cred.model_copy(update={"username": "late"}))
    assert lim.usage("gone0") is None and lim.usage("gone15") is None
    assert lim.usage("app") == (4.0, 1)
    assert lim.usage("late") == (4.0, 1)


# ------------------------------------------------------------------ with the pool

async def test_leases_ask_for_the_lease_size_in_the_current_window(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=100, dailyQuota=1000)
    cred = cfg.credentials["app"]
    clock = Clock(T0 + 90)  # 01:01:30
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=clock, pool=pool, lease_size=3, peer_id="w")
    assert await reserve_all(lim, cred, 3) == [None, None, None]
    day, minute = int(clock.now // DAY), int(clock.now // 60)
    assert pool.calls == [("lease", "quota", "app", day, 3, 1000),
                          ("lease", "rate", "app", minute, 3, 100)]
    assert await lim.reserve_message(cred) is None  # the fourth needs new leases of 3 each
    assert pool.calls[2:] == [("lease", "quota", "app", day, 3, 1000),
                              ("lease", "rate", "app", minute, 3, 100)]
    # The local counts follow the pool's so a fall back starts from them.
    assert lim.usage("app") == (96.0, 4)
    clock.now += 60  # a new minute: a new rate lease, the quota lease goes on
    assert await lim.reserve_message(cred) is None
    assert pool.calls[4:] == [("lease", "rate", "app", minute + 1, 3, 100)]


async def test_a_short_grant_marks_the_window_used_up_for_check(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=3)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock, pool=store, lease_size=2, peer_id="w")
    assert lim.check_message(cred) is None  # nothing leased yet: MAIL FROM passes
    assert await reserve_all(lim, cred, 2) == [None, None]
    assert lim.check_message(cred) is None  # a full grant: the window is not used up
    assert await lim.reserve_message(cred) is None  # granted 1 of 2: used up after this one
    assert lim.check_message(cred) == LimitExceeded("rate", 3)
    assert await lim.reserve_message(cred) == LimitExceeded("rate", 3)
    clock.now += 60
    assert lim.check_message(cred) is None  # a new minute
    assert await lim.reserve_message(cred) is None


async def test_check_names_the_quota_when_the_day_is_used_up(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=50, dailyQuota=2)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock, pool=store, lease_size=5, peer_id="w")
    assert await reserve_all(lim, cred, 3) == [None, None, LimitExceeded("quota", 2)]
    assert lim.check_message(cred) == LimitExceeded("quota", 2)
    clock.now += DAY
    assert lim.check_message(cred) is None
    assert await lim.reserve_message(cred) is None


async def test_concurrent_reserves_never_pass_the_pool_limit(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=5)
    cred = cfg.credentials["app"]
    lim = Limiter(lambda: cfg, clock=Clock(), pool=store, lease_size=1, peer_id="w")
    results = await asyncio.gather(*(lim.reserve_message(cred) for _ in range(8)))
    assert results.count(None) == 5
    assert set(results) == {None, LimitExceeded("quota", 5)}


async def test_release_gives_the_allowance_back_to_this_worker(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=2, dailyQuota=2)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=2, peer_id="w")
    assert await reserve_all(lim, cred, 2) == [None, None]
    lim.release_message(cred)
    leases = len(pool.calls)
    assert await lim.reserve_message(cred) is None  # from the given-back allowance
    assert len(pool.calls) == leases
    assert await lim.reserve_message(cred) == LimitExceeded("quota", 2)


async def test_pool_down_falls_back_to_the_share_and_recovers(
        store: SqliteBackend, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(ratePerMinute=1000, dailyQuota=7)
    cred = cfg.credentials["app"]
    clock = Clock()
    for peer in ("a", "b"):
        await store.peers(peer, T0, PEER_HORIZON)
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=clock, pool=pool, lease_size=10, peer_id="w")
    await lim.heartbeat()
    assert pool.calls == [("peers", "w", T0, PEER_HORIZON)]
    assert lim.peers == 3 and lim.pool_up
    pool.down = True
    with caplog.at_level(logging.INFO, logger="mailplane_relay.ratelimit"):
        results = await reserve_all(lim, cred, 4)
    assert results == [None, None, LimitExceeded("quota", 2), LimitExceeded("quota", 2)]
    assert not lim.pool_up
    failures = [r for r in caplog.records if "did not answer" in r.getMessage()]
    assert len(failures) == 1 and failures[0].levelno == logging.ERROR
    assert "(1/3)" in failures[0].getMessage()
    # While the pool is down, MAIL FROM is judged on the local share too.
    assert lim.check_message(cred) == LimitExceeded("quota", 2)
    pool.down = False
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mailplane_relay.ratelimit"):
        await lim.heartbeat()
    assert lim.pool_up
    assert any("answers again" in r.getMessage() for r in caplog.records)
    assert lim.check_message(cred) is None
    assert await lim.reserve_message(cred) is None  # pool-wide again: 7 for the day


async def test_a_reserve_that_reaches_the_pool_again_marks_it_up(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=100)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=1, peer_id="w")
    pool.down = True
    assert await lim.reserve_message(cred) is None
    assert not lim.pool_up
    pool.down = False
    assert await lim.reserve_message(cred) is None
    assert lim.pool_up


async def test_the_share_rounds_down_but_never_to_zero(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=5, dailyQuota=3)
    cred = cfg.credentials["app"]
    for peer in ("a", "b", "c"):
        await store.peers(peer, T0, PEER_HORIZON)
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    await lim.heartbeat()
    assert lim.peers == 4
    pool.down = True
    # rate 5 // 4 = 1, quota 3 // 4 = 0 -> 1: one message, then the quota share is used up.
    assert await reserve_all(lim, cred, 2) == [None, LimitExceeded("quota", 1)]


async def test_the_rate_share_holds_without_a_quota(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=7)
    cred = cfg.credentials["app"]
    for peer in ("a",):
        await store.peers(peer, T0, PEER_HORIZON)
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    await lim.heartbeat()
    assert lim.peers == 2
    pool.down = True
    assert await reserve_all(lim, cred, 4) == [None, None, None, LimitExceeded("rate", 3)]


async def test_a_lone_worker_without_the_pool_keeps_the_whole_limit(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=3)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    await lim.heartbeat()
    assert lim.peers == 1
    pool.down = True
    assert await reserve_all(lim, cred, 4) == [None, None, None, LimitExceeded("quota", 3)]


async def test_heartbeat_without_a_pool_does_nothing() -> None:
    cfg = config(dailyQuota=3)
    lim = Limiter(lambda: cfg, clock=Clock())
    await lim.heartbeat()
    await lim.give_back_unused()
    assert lim.peers == 1 and lim.pool_up


async def test_heartbeat_counts_at_least_this_worker(store: SqliteBackend) -> None:
    class NoneAlive(Recording):
        async def peers(self, peer: str, now: float, horizon: float) -> int:
            return 0

    cfg = config(dailyQuota=3)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=NoneAlive(store), peer_id="w")
    lim.peers = 5
    await lim.heartbeat()
    assert lim.peers == 1


async def test_give_back_returns_only_todays_unused_quota(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=100, dailyQuota=20)
    cred = cfg.credentials["app"]
    clock = Clock()
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=clock, pool=pool, lease_size=10, peer_id="w")
    assert await lim.reserve_message(cred) is None
    pool.calls.clear()
    await lim.give_back_unused()
    assert pool.calls == [("give_back", "quota", "app", int(T0 // DAY), 9)]
    await lim.give_back_unused()  # nothing left to give a second time
    assert len(pool.calls) == 1
    other = Limiter(lambda: cfg, clock=clock, pool=store, lease_size=100, peer_id="o")
    assert (await reserve_all(other, cred, 20)).count(None) == 19
    # Yesterday's allowance is not given back into today's counters.
    assert await lim.reserve_message(cred) == LimitExceeded("quota", 20)
    late = Limiter(lambda: cfg, clock=clock, pool=pool, lease_size=10, peer_id="l")
    clock.now += DAY
    assert await late.reserve_message(cred) is None
    clock.now += DAY
    pool.calls.clear()
    await late.give_back_unused()
    assert pool.calls == []


async def test_give_back_stops_at_the_first_failure_and_says_so(
        store: SqliteBackend, caplog: pytest.LogCaptureFixture) -> None:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"}, "credentials": [
        {"username": n, "passwordHash": HASH, "allowedSenders": ["ex.com"], "dailyQuota": 9}
        for n in ("a", "b")]}
    cfg = RelayConfig(settings=RelaySettings.model_validate(doc))
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=5, peer_id="w")
    for name in ("a", "b"):
        assert await lim.reserve_message(cfg.credentials[name]) is None
    pool.down = True
    pool.calls.clear()
    with caplog.at_level(logging.WARNING, logger="mailplane_relay.ratelimit"):
        await lim.give_back_unused()
    assert [c[0] for c in pool.calls] == ["give_back"]
    assert any("could not give back" in r.getMessage() for r in caplog.records)
    pool.down = False
    pool.calls.clear()
    await lim.give_back_unused()  # what failed is still there to give back
    assert sorted(c[2] for c in pool.calls) == ["a", "b"]


async def test_a_message_counts_in_the_minute_it_is_accepted_in(store: SqliteBackend) -> None:
    """The minute turns while the rate lease is in flight: the allowance leased for the old
    minute is not used in the new one; the message is taken from a lease of the new minute."""
    cfg = config(ratePerMinute=2, dailyQuota=100)
    cred = cfg.credentials["app"]
    clock = Clock(T0 + 59)

    class Slow(Recording):
        async def lease(self, kind: str, credential: str, window_start: int, want: int,
                        limit: int) -> int:
            granted = await super().lease(kind, credential, window_start, want, limit)
            if kind == "rate" and clock.now == T0 + 59:
                clock.now = T0 + 60  # the answer comes back in the next minute
            return granted

    pool = Slow(store)
    lim = Limiter(lambda: cfg, clock=clock, pool=pool, lease_size=2, peer_id="w")
    assert await lim.reserve_message(cred) is None
    minute = int((T0 + 60) // 60)
    assert [c[3] for c in pool.calls if c[1] == "rate"] == [minute - 1, minute]
    # This worker holds the new minute's whole allowance (2): another gets nothing more.
    other = Limiter(lambda: cfg, clock=clock, pool=store, lease_size=2, peer_id="o")
    assert await other.reserve_message(cred) == LimitExceeded("rate", 2)
    assert await lim.reserve_message(cred) is None
    assert await lim.reserve_message(cred) == LimitExceeded("rate", 2)


async def test_check_passes_while_the_last_grant_has_some_left(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=3)
    cred = cfg.credentials["app"]
    lim = Limiter(lambda: cfg, clock=Clock(), pool=store, lease_size=5, peer_id="w")
    assert await lim.reserve_message(cred) is None  # granted 3 of 5: the minute is used up
    assert await lim.reserve_message(cred) is None
    assert lim.check_message(cred) is None  # but one is left in this worker
    assert await lim.reserve_message(cred) is None
    assert lim.check_message(cred) == LimitExceeded("rate", 3)


async def test_a_single_unused_message_is_given_back(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=10)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=2, peer_id="w")
    assert await lim.reserve_message(cred) is None
    pool.calls.clear()
    await lim.give_back_unused()
    assert pool.calls == [("give_back", "quota", "app", int(T0 // DAY), 1)]


async def test_the_quota_share_holds_without_a_rate(store: SqliteBackend) -> None:
    cfg = config(dailyQuota=7)
    cred = cfg.credentials["app"]
    await store.peers("a", T0, PEER_HORIZON)
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    await lim.heartbeat()
    pool.down = True
    assert await reserve_all(lim, cred, 4) == [None, None, None, LimitExceeded("quota", 3)]


async def test_a_rate_share_under_one_is_one(store: SqliteBackend) -> None:
    cfg = config(ratePerMinute=3)
    cred = cfg.credentials["app"]
    for peer in ("a", "b", "c"):
        await store.peers(peer, T0, PEER_HORIZON)
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    await lim.heartbeat()
    pool.down = True
    assert await reserve_all(lim, cred, 2) == [None, LimitExceeded("rate", 1)]


def test_the_whole_quota_is_back_after_midnight() -> None:
    cfg = config(dailyQuota=2)
    cred = cfg.credentials["app"]
    clock = Clock()
    lim = Limiter(lambda: cfg, clock=clock)
    lim.record_message(cred)
    lim.record_message(cred)
    assert lim.check_message(cred) == LimitExceeded("quota", 2)
    clock.now += DAY
    assert lim.check_message(cred) is None
    assert lim.usage("app") == (0.0, 0)
    lim.record_message(cred)
    assert lim.check_message(cred) is None


async def test_the_pool_failure_messages_name_the_cause(
        store: SqliteBackend, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(dailyQuota=10)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=2, peer_id="w")
    assert await lim.reserve_message(cred) is None
    pool.down = True
    with caplog.at_level(logging.INFO, logger="mailplane_relay.ratelimit"):
        await lim.give_back_unused()  # one left in this worker, to give back
        assert await lim.reserve_message(cred) is None  # that one, still here
        assert await lim.reserve_message(cred) is None  # the share
        with pytest.raises(ConnectionError):
            await lim.heartbeat()
        pool.down = False
        await lim.heartbeat()
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "sending limits: could not give back unused quota (store down)"),
        ("ERROR", "sending limits: the store did not answer (store down); each worker "
                  "enforces its share (1/1) of every limit until it does"),
        ("INFO", "sending limits: the store answers again; limits are pool-wide")]


async def test_a_heartbeat_failure_names_the_cause(
        store: SqliteBackend, caplog: pytest.LogCaptureFixture) -> None:
    cfg = config(dailyQuota=10)
    pool = Recording(store)
    pool.down = True
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, peer_id="w")
    with caplog.at_level(logging.ERROR, logger="mailplane_relay.ratelimit"), \
            pytest.raises(ConnectionError):
        await lim.heartbeat()
    [record] = caplog.records
    assert "did not answer (store down)" in record.getMessage()
    assert not lim.pool_up


async def test_leases_of_removed_credentials_are_pruned_and_others_kept(
        store: SqliteBackend) -> None:
    cfg = config(dailyQuota=1000)
    cred = cfg.credentials["app"]
    pool = Recording(store)
    lim = Limiter(lambda: cfg, clock=Clock(), pool=pool, lease_size=5, peer_id="w")
    assert await lim.reserve_message(cred) is None
    for i in range(17):
        gone = cred.model_copy(update={"username": f"gone{i}"})
        assert await lim.reserve_message(gone) is None
    # Memory: only the configured credential keeps its leases and their locks.
    assert {k[1] for k in lim._allowances} == {"app"}
    assert {k[1] for k in lim._lease_locks} == {"app"}
    pool.calls.clear()
    assert await lim.reserve_message(cred) is None  # app's allowance was kept: no new lease
    assert pool.calls == []
