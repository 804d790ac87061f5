"""AUTH failure throttling that an attacker cannot turn against the owner of a credential.

Failures are counted per (username, client address) and per client address, never per username
alone: whoever guesses passwords for a username from one address locks out only that address
(for that username after ``authFailureLimit`` failures, for every username after
``authFailureLimitPerAddress``). A correct password from an address with no recent failures
always works, however many failures other addresses have for the same username.

IPv6 clients are counted per /64 (one subscriber's whole allocation), IPv4 clients per address.

An attempt is counted *before* its password is checked (:meth:`AuthThrottle.begin`, one step with
no ``await`` inside, so parallel sessions cannot all pass the check before any of them records),
and forgiven when the password proves right (:meth:`AuthThrottle.succeeded`). So at most the
limit of attempts from one address are ever evaluated within the window, however many sessions
it opens at once.

Pure bookkeeping with an injected clock. Memory is bounded: at most ``max_tracked`` keys (the
least recently failed evicted first), each holding at most the limit of timestamps, and keys whose
window has passed are dropped when looked at.
"""

from __future__ import annotations

import functools
import ipaddress
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

from ..config import LimitSettings

_Key = tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Attempt:
    """An AUTH attempt counted in advance; forgiven by :meth:`AuthThrottle.succeeded`."""

    keys: tuple[_Key, ...]
    at: float


@functools.lru_cache(maxsize=4096)  # a pure function of the address; parsing costs ~6 us
def client_key(address: str) -> str:
    """The throttling (and session-cap) key of a client address: the address itself for IPv4,
    its /64 for IPv6 (an IPv4-mapped IPv6 address counts as the IPv4 address)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(ip) >> 64 << 64, 64)))
    return str(ip)


class AuthThrottle:
    def __init__(
        self,
        limits: Callable[[], LimitSettings],
        *,
        clock: Callable[[], float] = time.time,
        max_tracked: int = 100_000,
    ) -> None:
        self._limits = limits
        self._clock = clock
        self._max_tracked = max_tracked
        self._failures: OrderedDict[_Key, deque[float]] = OrderedDict()

    def blocked(self, address: str) -> bool:
        """True while the client address has used up its failures (any username)."""
        limits = self._limits()
        return self._count(("addr", client_key(address)), self._clock(),
                           limits.auth_failure_window) >= limits.auth_failure_limit_per_address

    def begin(self, address: str, username: str) -> Attempt | None:
        """Count an attempt by this address for this username, or None when throttled.

        Check and record are one step: call it right before checking the password, and
        :meth:`succeeded` when the password was right."""
        limits = self._limits()
        now = self._clock()
        window = limits.auth_failure_window
        addr = ("addr", client_key(address))
        pair = ("user", username.lower(), addr[1])
        if (self._count(addr, now, window) >= limits.auth_failure_limit_per_address
                or self._count(pair, now, window) >= limits.auth_failure_limit):
            return None
        self._sweep(now - window)
        self._add(addr, now, limits.auth_failure_limit_per_address)
        self._add(pair, now, limits.auth_failure_limit)
        return Attempt((addr, pair), now)

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: the attempt was no failure."""
        for key in attempt.keys:
            failures = self._failures.get(key)
            if failures is not None and attempt.at in failures:
                failures.remove(attempt.at)
                if not failures:
                    del self._failures[key]

    def tracked_keys(self) -> int:
        return len(self._failures)

    def _count(self, key: _Key, now: float, window: float) -> int:
        failures = self._failures.get(key)
        if failures is None:
            return 0
        horizon = now - window
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[key]
            return 0
        return len(failures)

    def _sweep(self, horizon: float) -> None:
        """Drop keys whose newest failure left the window, oldest first (keys are kept in the
        order of their last failure, so the sweep stops at the first live one)."""
        while self._failures:
            key, failures = next(iter(self._failures.items()))
            if failures and failures[-1] > horizon:
                return
            del self._failures[key]

    def _add(self, key: _Key, now: float, limit: int) -> None:
        failures = self._failures.get(key)
        if failures is None or failures.maxlen != limit:
            failures = deque(failures or (), maxlen=limit)
        self._failures[key] = failures
        self._failures.move_to_end(key)
        failures.append(now)
        while len(self._failures) > self._max_tracked:
            self._failures.popitem(last=False)
