"""Limiter rules with a fake clock: token bucket per minute, UTC-day quota, bounded memory."""

from __future__ import annotations

from typing import Any

from mailplane_relay.config import Credential, RelayConfig, RelaySettings, hash_password
from mailplane_relay.ratelimit import Limiter, LimitExceeded

DAY = 86400.0
T0 = 1_800_000_000.0 - (1_800_000_000.0 % DAY) + 3600  # 01:00 UTC on some day


def _config(**limits: Any) -> RelayConfig:
    h = hash_password("x")
    doc = {
        "tls": {"certFile": "/c", "keyFile": "/k"},
        "limits": {"authFailureLimit": 3, "authFailureWindow": 60, **limits},
        "credentials": [
            {"username": "plain", "passwordHash": h, "allowedSenders": ["example.com"]},
            {"username": "fast", "passwordHash": h, "allowedSenders": ["example.com"],
             "ratePerMinute": 3},
            {"username": "daily", "passwordHash": h, "allowedSenders": ["example.com"],
             "dailyQuota": 2},
        ],
    }
    return RelayConfig(settings=RelaySettings.model_validate(doc))


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def _limiter(**limits: Any) -> tuple[Limiter, Clock, RelayConfig]:
    cfg = _config(**limits)
    clock = Clock()
    return Limiter(lambda: cfg, clock=clock), clock, cfg


def _send(limiter: Limiter, cred: Credential) -> LimitExceeded | None:
    over = limiter.check_message(cred)
    if over is None:
        limiter.record_message(cred)
    return over


def test_unlimited_by_default_and_keeps_no_state() -> None:
    limiter, _, cfg = _limiter()
    for _ in range(1000):
        assert _send(limiter, cfg.credentials["plain"]) is None
    assert limiter.usage("plain") is None


def test_rate_allows_a_burst_of_n_then_refills_continuously() -> None:
    limiter, clock, cfg = _limiter()
    fast = cfg.credentials["fast"]
    assert [_send(limiter, fast) for _ in range(3)] == [None, None, None]
    assert _send(limiter, fast) == LimitExceeded("rate", 3)
    clock.now += 19.9  # 3/min = one token per 20 s
    assert _send(limiter, fast) == LimitExceeded("rate", 3)
    clock.now += 0.2
    assert _send(limiter, fast) is None
    assert _send(limiter, fast) == LimitExceeded("rate", 3)
    clock.now += 3600  # refill is capped at the per-minute figure
    assert [_send(limiter, fast) for _ in range(4)][-1] == LimitExceeded("rate", 3)


def test_defaults_apply_to_credentials_without_their_own_limits() -> None:
    limiter, _, cfg = _limiter(defaultRatePerMinute=1, defaultDailyQuota=5)
    plain = cfg.credentials["plain"]
    assert _send(limiter, plain) is None
    assert _send(limiter, plain) == LimitExceeded("rate", 1)
    assert limiter.limits_for(cfg.credentials["fast"]) == (3, 5)


def test_daily_quota_resets_at_utc_midnight() -> None:
    limiter, clock, cfg = _limiter()
    daily = cfg.credentials["daily"]
    assert _send(limiter, daily) is None and _send(limiter, daily) is None
    assert _send(limiter, daily) == LimitExceeded("quota", 2)
    clock.now = T0 - 3600 + DAY - 1  # 23:59:59 the same UTC day
    assert _send(limiter, daily) == LimitExceeded("quota", 2)
    clock.now += 1  # midnight
    assert _send(limiter, daily) is None


def test_check_does_not_consume() -> None:
    limiter, _, cfg = _limiter()
    fast = cfg.credentials["fast"]
    for _ in range(10):
        assert limiter.check_message(fast) is None


def test_usage_of_removed_credentials_is_pruned() -> None:
    cfg = _config()
    box = [cfg]
    limiter = Limiter(lambda: box[0], clock=Clock())
    fast = cfg.credentials["fast"]
    limiter.record_message(fast)
    assert limiter.usage("fast") is not None
    box[0] = RelayConfig(settings=cfg.settings.model_copy(update={"credentials": ()}))
    for i in range(20):
        limiter.record_message(fast.model_copy(update={"username": f"gone{i}"}))
    assert limiter.usage("fast") is None
