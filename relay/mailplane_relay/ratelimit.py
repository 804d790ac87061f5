"""Per-credential sending limits (AUTH failure throttling is ``ingress/throttle.py``).

Pure bookkeeping with an injected clock: no I/O, no sleeps, so every rule is unit-tested with a
fake clock.

- Rate: a token bucket per credential holding ``ratePerMinute`` tokens, refilled continuously at
  ``ratePerMinute / 60`` per second: bursts up to the per-minute figure, never more on average.
- Daily quota: messages counted per credential per UTC day.

Memory is bounded: per-credential entries exist only for configured credentials (and are pruned
when they leave the configuration). Each worker process
keeps its own counts: with ``workers: N`` a credential can send up to N times its rate.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .config import Credential, RelayConfig


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    kind: Literal["rate", "quota"]
    limit: int


@dataclass(slots=True)
class _Usage:
    tokens: float
    refilled_at: float
    day: int
    sent_today: int


class Limiter:
    def __init__(
        self,
        config: Callable[[], RelayConfig],
        *,
        clock: Callable[[], float] = time.time,
        max_tracked: int = 100_000,
    ) -> None:
        self._config = config
        self._clock = clock
        self._max_tracked = max_tracked
        self._usage: dict[str, _Usage] = {}

    # ---------------------------------------------------------------- sending limits

    def limits_for(self, credential: Credential) -> tuple[int | None, int | None]:
        defaults = self._config().settings.limits
        rate = credential.rate_per_minute or defaults.default_rate_per_minute
        quota = credential.daily_quota or defaults.default_daily_quota
        return rate, quota

    def check_message(self, credential: Credential) -> LimitExceeded | None:
        """Would one more message from this credential be within its limits?"""
        rate, quota = self.limits_for(credential)
        if rate is None and quota is None:
            return None
        usage = self._refresh(credential.username, rate)
        if quota is not None and usage.sent_today >= quota:
            return LimitExceeded("quota", quota)
        if rate is not None and usage.tokens < 1.0:
            return LimitExceeded("rate", rate)
        return None

    def record_message(self, credential: Credential) -> None:
        """Count a message accepted for this credential."""
        rate, quota = self.limits_for(credential)
        if rate is None and quota is None:
            return
        usage = self._refresh(credential.username, rate)
        usage.sent_today += 1
        if rate is not None:
            usage.tokens = max(usage.tokens - 1.0, 0.0)

    def usage(self, username: str) -> tuple[float, int] | None:
        """(tokens left, messages today), for tests and diagnostics."""
        u = self._usage.get(username)
        return None if u is None else (u.tokens, u.sent_today)

    def _refresh(self, username: str, rate: int | None) -> _Usage:
        now = self._clock()
        day = int(now // 86400)
        usage = self._usage.get(username)
        if usage is None:
            if len(self._usage) >= len(self._config().credentials) + 16:
                self._prune_credentials()
            usage = self._usage[username] = _Usage(float(rate or 0), now, day, 0)
        if usage.day != day:
            usage.day, usage.sent_today = day, 0
        if rate is not None:
            elapsed = max(now - usage.refilled_at, 0.0)
            usage.tokens = min(float(rate), usage.tokens + elapsed * rate / 60.0)
        usage.refilled_at = now
        return usage

    def _prune_credentials(self) -> None:
        known = self._config().credentials
        for name in [n for n in self._usage if n not in known]:
            del self._usage[name]
