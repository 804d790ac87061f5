"""AuthThrottle rules with a fake clock: per (username, address) and per address, never per
username alone; check-and-record in one step; success forgiven; IPv6 by /64; bounded memory."""

from __future__ import annotations

from typing import Any

from mailplane_relay.config import LimitSettings
from mailplane_relay.ingress.throttle import AuthThrottle, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _throttle(**limits: Any) -> tuple[AuthThrottle, Clock]:
    settings = LimitSettings.model_validate(
        {"authFailureLimit": 3, "authFailureLimitPerAddress": 5, "authFailureWindow": 60,
         **limits})
    clock = Clock()
    return AuthThrottle(lambda: settings, clock=clock), clock


def test_failures_for_a_username_from_one_address_do_not_block_other_addresses() -> None:
    throttle, _ = _throttle()
    for _ in range(3):
        assert throttle.begin("192.0.2.1", "Victim") is not None
    assert throttle.begin("192.0.2.1", "victim") is None  # usernames compare case-blind
    assert throttle.begin("198.51.100.7", "victim") is not None
    assert throttle.begin("192.0.2.1", "someone-else") is not None
    assert not throttle.blocked("192.0.2.1")


def test_many_addresses_guessing_one_username_never_block_a_fresh_address() -> None:
    throttle, _ = _throttle()
    for i in range(200):
        throttle.begin(f"10.0.{i // 256}.{i % 256}", "victim")
    assert throttle.begin("203.0.113.9", "victim") is not None


def test_an_address_is_blocked_for_every_username_after_its_own_limit() -> None:
    throttle, clock = _throttle()
    for i in range(5):
        assert not throttle.blocked("192.0.2.1")
        assert throttle.begin("192.0.2.1", f"user{i}") is not None
    assert throttle.blocked("192.0.2.1")
    assert throttle.begin("192.0.2.1", "fresh") is None
    assert not throttle.blocked("192.0.2.2")
    clock.now += 61  # the window passes
    assert not throttle.blocked("192.0.2.1")
    assert throttle.begin("192.0.2.1", "user0") is not None
    assert throttle.tracked_keys() == 2  # expired entries are dropped when looked at


def test_begin_counts_at_once_and_success_forgives() -> None:
    throttle, _ = _throttle()
    pending = [throttle.begin("192.0.2.1", "app") for _ in range(5)]
    # Three attempts are in flight (none has finished): a fourth is refused already.
    assert [p is not None for p in pending] == [True, True, True, False, False]
    for attempt in pending[:3]:
        assert attempt is not None
        throttle.succeeded(attempt)
    assert throttle.tracked_keys() == 0
    assert throttle.begin("192.0.2.1", "app") is not None


def test_ipv6_clients_count_per_slash_64() -> None:
    assert client_key("2001:db8:1:2:aaaa::1") == "2001:db8:1:2::/64"
    assert client_key("::ffff:192.0.2.7") == "192.0.2.7"
    assert client_key("192.0.2.7") == "192.0.2.7"
    throttle, _ = _throttle()
    for i in range(5):
        throttle.begin(f"2001:db8:1:2::{i + 1:x}", f"user{i}")
    assert throttle.blocked("2001:db8:1:2:ffff::9")
    assert not throttle.blocked("2001:db8:1:3::1")


def test_memory_is_bounded() -> None:
    settings = LimitSettings()
    throttle = AuthThrottle(lambda: settings, clock=Clock(), max_tracked=100)
    for i in range(10_000):
        throttle.begin(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}", f"guess{i}")
    assert throttle.tracked_keys() <= 100


def test_a_lowered_limit_applies_to_existing_entries() -> None:
    holder = [LimitSettings.model_validate({"authFailureLimit": 5})]
    throttle = AuthThrottle(lambda: holder[0], clock=Clock())
    for _ in range(3):
        assert throttle.begin("192.0.2.1", "app") is not None
    holder[0] = LimitSettings.model_validate({"authFailureLimit": 2})
    assert throttle.begin("192.0.2.1", "app") is None
