"""AUTH failure throttling, rule by rule, with a fake clock: the window's edge, which limit
applies to which key, what success forgives, the order memory is given up in, and the key of a
client address."""

from __future__ import annotations

from typing import Any

from mailplane_relay.config import LimitSettings
from mailplane_relay.ingress.throttle import AuthThrottle, client_key

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> float:
        return self.now


def make(max_tracked: int = 100_000, **limits: Any) -> tuple[AuthThrottle, Clock]:
    settings = LimitSettings.model_validate(
        {"authFailureLimit": 2, "authFailureLimitPerAddress": 4, "authFailureWindow": 60,
         **limits})
    clock = Clock()
    return AuthThrottle(lambda: settings, clock=clock, max_tracked=max_tracked), clock


def test_a_failure_leaves_the_window_exactly_window_seconds_later() -> None:
    throttle, clock = make()
    assert throttle.begin("192.0.2.1", "app") is not None
    clock.now += 1
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is None
    clock.now = T0 + 59.999
    assert throttle.begin("192.0.2.1", "app") is None
    clock.now = T0 + 60  # the first failure is out; the second is still in
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is None


def test_blocked_uses_the_per_address_limit_and_its_edge() -> None:
    throttle, clock = make()
    for i in range(3):
        assert throttle.begin("192.0.2.1", f"u{i}") is not None
    assert not throttle.blocked("192.0.2.1")  # 3 of 4
    assert throttle.begin("192.0.2.1", "u3") is not None
    assert throttle.blocked("192.0.2.1")
    assert throttle.begin("192.0.2.1", "u4") is None  # refused: not counted again
    clock.now = T0 + 60
    assert not throttle.blocked("192.0.2.1")


def test_a_refused_attempt_is_not_counted() -> None:
    throttle, clock = make(authFailureLimit=1)
    assert throttle.begin("192.0.2.1", "app") is not None
    for _ in range(10):
        assert throttle.begin("192.0.2.1", "app") is None
    assert not throttle.blocked("192.0.2.1")  # 1 of 4: refusals do not add up
    clock.now += 60
    assert throttle.begin("192.0.2.1", "app") is not None


def test_success_forgives_only_its_own_attempt() -> None:
    throttle, clock = make()
    wrong = throttle.begin("192.0.2.1", "app")
    clock.now += 1
    right = throttle.begin("192.0.2.1", "app")
    assert wrong is not None and right is not None
    throttle.succeeded(right)
    assert throttle.begin("192.0.2.1", "app") is not None  # the wrong one still counts: 2
    assert throttle.begin("192.0.2.1", "app") is None
    assert throttle.tracked_keys() == 2


def test_success_after_the_window_passed_is_harmless() -> None:
    throttle, clock = make()
    attempt = throttle.begin("192.0.2.1", "app")
    assert attempt is not None
    clock.now += 61
    other = throttle.begin("192.0.2.9", "app")  # looking sweeps the expired keys
    assert other is not None
    assert throttle.tracked_keys() == 2
    throttle.succeeded(attempt)
    assert throttle.tracked_keys() == 2
    throttle.succeeded(other)
    assert throttle.tracked_keys() == 0


def test_sweeping_drops_every_expired_key_and_stops_at_the_first_live_one() -> None:
    throttle, clock = make()
    throttle.begin("192.0.2.1", "a")
    clock.now += 30
    throttle.begin("192.0.2.2", "b")
    assert throttle.tracked_keys() == 4
    clock.now = T0 + 60  # the first address's failure is out, the second's is in
    throttle.begin("192.0.2.3", "c")
    assert throttle.tracked_keys() == 4  # 2 dropped, 2 kept, 2 added
    clock.now = T0 + 30 + 60
    throttle.begin("192.0.2.3", "c")
    assert throttle.tracked_keys() == 2


def test_the_least_recently_failed_key_is_given_up_first() -> None:
    throttle, clock = make(max_tracked=4)
    throttle.begin("192.0.2.1", "a")  # keys: addr .1, (a, .1)
    clock.now += 1
    throttle.begin("192.0.2.2", "b")  # keys: addr .2, (b, .2)
    clock.now += 1
    throttle.begin("192.0.2.1", "a")  # .1 failed again: now the most recent
    clock.now += 1
    throttle.begin("192.0.2.3", "c")  # two more keys: .2's are given up
    assert throttle.tracked_keys() == 4
    assert throttle.begin("192.0.2.1", "a") is None  # .1 kept both failures
    assert throttle.begin("192.0.2.3", "c") is not None  # .3 kept its first failure:
    assert throttle.begin("192.0.2.3", "c") is None  # the second reaches the limit
    assert throttle.tracked_keys() == 4


def test_a_raised_limit_lets_existing_entries_grow() -> None:
    holder = [LimitSettings.model_validate({"authFailureLimit": 2,
                                            "authFailureLimitPerAddress": 3})]
    throttle = AuthThrottle(lambda: holder[0], clock=Clock())
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is None
    holder[0] = LimitSettings.model_validate({"authFailureLimit": 4,
                                              "authFailureLimitPerAddress": 10})
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is not None
    assert throttle.begin("192.0.2.1", "app") is None  # 4 kept, not 2


def test_usernames_compare_case_blind_but_addresses_do_not_share() -> None:
    throttle, _ = make()
    assert throttle.begin("192.0.2.1", "App") is not None
    assert throttle.begin("192.0.2.1", "APP") is not None
    assert throttle.begin("192.0.2.1", "app") is None
    assert throttle.begin("192.0.2.2", "app") is not None


def test_client_keys() -> None:
    assert client_key("2001:db8::1") == "2001:db8::/64"
    assert client_key("2001:db8:0:0:ffff:ffff:ffff:ffff") == "2001:db8::/64"
    assert client_key("2001:db8:0:1::") == "2001:db8:0:1::/64"
    assert client_key("::ffff:10.1.2.3") == "10.1.2.3"
    assert client_key("10.1.2.3") == "10.1.2.3"
    assert client_key("unix-socket") == "unix-socket"
    assert client_key("x" * 100) == "x" * 64
