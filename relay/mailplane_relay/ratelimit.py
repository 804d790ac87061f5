"""Per-credential sending limits (AUTH failure throttling is ``ingress/throttle.py``).

Bookkeeping with an injected clock, so every rule is unit-tested with a fake clock.

- Rate: a token bucket per credential holding ``ratePerMinute`` tokens, refilled continuously at
  ``ratePerMinute / 60`` per second: bursts up to the per-minute figure, never more on average.
- Daily quota: messages counted per credential per UTC day.

Alone (``pool=None``) the counts are this process's own. With a ``pool`` (the store, shared by
the workers of a pod on SQLite and by every pod on PostgreSQL) a message is accepted only
against an allowance leased from the pool's counters, ``lease_size`` messages at a time, never
beyond the limit: the daily quota holds pool-wide with no overshoot, the rate per UTC minute
(docs/store.md states the bounds). When the pool does not answer, the process falls back to its
local share: the limit divided by the number of workers last seen alive.

Memory is bounded: per-credential entries exist only for configured credentials (and are pruned
when they leave the configuration).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Protocol

from .config import Credential, RelayConfig

log = logging.getLogger(__name__)

Kind = Literal["rate", "quota"]
# Seconds within which a worker counts as alive for the local share.
PEER_HORIZON = 600.0


class LeasePool(Protocol):
    """The shared counters (``store.StoreBackend`` provides these)."""

    async def lease(self, kind: str, credential: str, window_start: int, want: int,
                    limit: int) -> int: ...
    async def give_back(self, kind: str, credential: str, window_start: int, n: int) -> None: ...
    async def peers(self, peer: str, now: float, horizon: float) -> int: ...


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    kind: Kind
    limit: int


@dataclass(slots=True)
class _Usage:
    tokens: float
    refilled_at: float
    day: int
    sent_today: int


@dataclass(slots=True)
class _Allowance:
    window: int  # the UTC minute (rate) or day (quota) it was leased for
    left: int
    exhausted: bool = False  # the pool granted nothing more in this window


class Limiter:
    def __init__(
        self,
        config: Callable[[], RelayConfig],
        *,
        clock: Callable[[], float] = time.time,
        max_tracked: int = 100_000,
        pool: LeasePool | None = None,
        lease_size: int = 10,
        peer_id: str = "",
    ) -> None:
        self._config = config
        self._clock = clock
        self._max_tracked = max_tracked
        self._usage: dict[str, _Usage] = {}
        self._pool = pool
        self._lease_size = lease_size
        self._peer_id = peer_id
        self._allowances: dict[tuple[Kind, str], _Allowance] = {}
        self._lease_locks: dict[tuple[Kind, str], asyncio.Lock] = {}
        # Workers seen alive at the last contact with the pool: the local share's divisor.
        self.peers = 1
        self.pool_up = True

    # ---------------------------------------------------------------- sending limits

    def limits_for(self, credential: Credential) -> tuple[int | None, int | None]:
        defaults = self._config().settings.limits
        rate = credential.rate_per_minute or defaults.default_rate_per_minute
        quota = credential.daily_quota or defaults.default_daily_quota
        return rate, quota

    def check_message(self, credential: Credential) -> LimitExceeded | None:
        """Would one more message from this credential be within its limits? A quick look
        (``MAIL FROM``): with a pool, refused only once the pool said the window is used up;
        ``reserve_message`` decides."""
        rate, quota = self.limits_for(credential)
        if rate is None and quota is None:
            return None
        if self._pool is not None and self.pool_up:
            checks: tuple[tuple[Kind, int | None], ...] = (("quota", quota), ("rate", rate))
            for kind, limit in checks:
                if limit is None:
                    continue
                a = self._allowances.get((kind, credential.username))
                if (a is not None and a.window == self._window(kind)
                        and a.exhausted and a.left < 1):
                    return LimitExceeded(kind, limit)
            return None
        return self._check_local(credential.username, *self._local_limits(rate, quota))

    def _local_limits(self, rate: int | None, quota: int | None) -> tuple[int | None, int | None]:
        """The limits this process enforces by itself: all of them alone, its share of them
        when the pool does not answer."""
        if self._pool is None or self.peers <= 1:
            return rate, quota
        return (None if rate is None else max(1, rate // self.peers),
                None if quota is None else max(1, quota // self.peers))

    def _check_local(self, username: str, rate: int | None,
                     quota: int | None) -> LimitExceeded | None:
        if rate is None and quota is None:
            return None
        usage = self._refresh(username, rate)
        if quota is not None and usage.sent_today >= quota:
            return LimitExceeded("quota", quota)
        if rate is not None and usage.tokens < 1.0:
            return LimitExceeded("rate", rate)
        return None

    def _window(self, kind: Kind) -> int:
        return int(self._clock() // (86400 if kind == "quota" else 60))

    async def reserve_message(self, credential: Credential) -> LimitExceeded | None:
        """Take one message of this credential's limits, or say which limit is reached.

        Check and take are one step for the process (no await between the last check and the
        take), so concurrent sessions cannot both pass on the last message. Give it back with
        ``release_message`` if the message is not accepted after all."""
        rate, quota = self.limits_for(credential)
        if rate is None and quota is None:
            return None
        name = credential.username
        if self._pool is not None:
            wanted: list[tuple[Kind, int]] = []
            if quota is not None:
                wanted.append(("quota", quota))
            if rate is not None:
                wanted.append(("rate", rate))
            try:
                for kind, limit in wanted:
                    if not await self._ensure_allowance(kind, name, limit):
                        return LimitExceeded(kind, limit)
            except Exception as exc:  # the pool did not answer: this process's share
                self._pool_failed(exc)
            else:
                if all(self._has_allowance(kind, name) for kind, _ in wanted):
                    for kind, _ in wanted:
                        self._allowances[(kind, name)].left -= 1
                    self._record_local(name, rate)
                    self.pool_up = True
                    return None
                return await self.reserve_message(credential)  # taken meanwhile: lease again
        over = self._check_local(name, *self._local_limits(rate, quota))
        if over is None:
            self._record_local(name, rate)
        return over

    def _has_allowance(self, kind: Kind, name: str) -> bool:
        a = self._allowances.get((kind, name))
        return a is not None and a.window == self._window(kind) and a.left >= 1

    async def _ensure_allowance(self, kind: Kind, name: str, limit: int) -> bool:
        assert self._pool is not None
        key = (kind, name)
        lock = self._lease_locks.setdefault(key, asyncio.Lock())
        async with lock:
            window = self._window(kind)
            a = self._allowances.get(key)
            if a is None or a.window != window:
                a = self._allowances[key] = _Allowance(window, 0)
            if a.left >= 1:
                return True
            if a.exhausted:
                return False
            granted = await self._pool.lease(kind, name, window, self._lease_size, limit)
            a.left += granted
            a.exhausted = granted < self._lease_size
            return a.left >= 1

    def _pool_failed(self, exc: BaseException) -> None:
        if self.pool_up:
            log.error("sending limits: the store did not answer (%s); each worker enforces "
                      "its share (1/%d) of every limit until it does", exc, self.peers)
        self.pool_up = False

    def release_message(self, credential: Credential) -> None:
        """Give back a message taken by ``reserve_message`` that was not accepted."""
        rate, _ = self.limits_for(credential)
        name = credential.username
        kinds: tuple[Kind, ...] = ("quota", "rate")
        for kind in kinds:
            a = self._allowances.get((kind, name))
            if a is not None and a.window == self._window(kind):
                a.left += 1
        usage = self._usage.get(name)
        if usage is not None:
            usage.sent_today = max(0, usage.sent_today - 1)
            if rate is not None:
                usage.tokens = min(float(rate), usage.tokens + 1.0)

    async def heartbeat(self) -> None:
        """Tell the pool this worker is alive and learn how many are (the local share)."""
        if self._pool is None:
            return
        try:
            self.peers = max(1, await self._pool.peers(self._peer_id, self._clock(),
                                                       PEER_HORIZON))
        except Exception as exc:
            self._pool_failed(exc)
            raise
        if not self.pool_up:
            log.info("sending limits: the store answers again; limits are pool-wide")
        self.pool_up = True

    async def give_back_unused(self) -> None:
        """At shutdown: return this worker's unused quota allowance of the day to the pool."""
        if self._pool is None:
            return
        day = self._window("quota")
        for (kind, name), a in list(self._allowances.items()):
            if kind == "quota" and a.window == day and a.left > 0:
                try:
                    await self._pool.give_back(kind, name, day, a.left)
                except Exception as exc:
                    log.warning("sending limits: could not give back unused quota (%s)", exc)
                    return
                a.left = 0

    def record_message(self, credential: Credential) -> None:
        """Count a message accepted for this credential (this process's counts only)."""
        rate, quota = self.limits_for(credential)
        if rate is None and quota is None:
            return
        self._record_local(credential.username, rate)

    def _record_local(self, username: str, rate: int | None) -> None:
        usage = self._refresh(username, rate)
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
        for key in [k for k in self._allowances if k[1] not in known]:
            del self._allowances[key]
            self._lease_locks.pop(key, None)
