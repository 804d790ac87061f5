"""Sender reputation: pause a credential whose recent bounce rate crosses a threshold.

The acceptable-use promise (pausing senders whose bounce rates cross thresholds) is kept here,
in the data plane, because it is the relay that sees every outcome as it happens. Each
credential has a sliding window of per-minute buckets counting delivered and bounced
recipients. When, over the window, at least ``minRecipients`` outcomes were seen and the share
of bounces reaches ``bounceRate``, MAIL FROM for that credential is answered with a temporary
``451 4.7.1`` naming the rate, until the window slides past the bad minutes. The clock is
injected.

With a ``store`` the counts are the pool's: ``sync()`` (run every few seconds) adds this
process's new outcomes to the store's per-minute buckets and reads the sums over the window for
every credential, so a pause holds on every pod and worker and survives a restart. Between syncs,
and while the store does not answer, outcomes not yet written count on top of the last sums.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from .config import AbuseSettings

_BUCKET_SECONDS = 60.0


class ReputationStore(Protocol):
    """The pool's outcome counts (``store.StoreBackend`` provides these)."""

    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None: ...
    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]: ...


@dataclass(slots=True)
class _Window:
    # (minute index, delivered, bounced), oldest first
    buckets: deque[list[int]] = field(default_factory=deque)
    delivered: int = 0
    bounced: int = 0


@dataclass(frozen=True, slots=True)
class Pause:
    bounce_rate: float
    recipients: int
    threshold: float
    window: float

    def reply(self, user: str) -> str:
        return (
            f"451 4.7.1 Sending paused for {user}: {self.bounce_rate:.0%} of the last "
            f"{self.recipients} recipients bounced within {_human(self.window)} "
            f"(limit {self.threshold:.0%}); clean the recipient list, it resumes as the rate "
            "drops"
        )


def _human(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    return f"{seconds:g}s"


class Reputation:
    """Per-credential outcome windows. Bounded: at most ``max_tracked`` credentials."""

    def __init__(self, settings: Callable[[], AbuseSettings], *,
                 clock: Callable[[], float] = time.time, max_tracked: int = 100_000,
                 store: ReputationStore | None = None) -> None:
        self._settings = settings
        self._clock = clock
        self._max_tracked = max_tracked
        self._windows: dict[str, _Window] = {}
        self._store = store
        # Outcomes not yet added to the store, per (credential, minute): [delivered, bounced].
        self._unsent: dict[tuple[str, int], list[int]] = {}
        # The pool's sums over the window at the last sync; None before the first one.
        self._pool: dict[str, tuple[int, int]] | None = None

    async def sync(self) -> None:
        """Add this process's new outcomes to the store, then read the pool's sums. Raises if
        the store does not answer (the outcomes stay for the next try)."""
        if self._store is None:
            return
        batch, self._unsent = self._unsent, {}
        try:
            await self._store.reputation_add(
                {key: (d, b) for key, (d, b) in batch.items()})
        except BaseException:
            # Put back, merged with what came meanwhile; minutes past the window no longer
            # count, so a long outage holds at most one window of buckets.
            horizon = int(self._clock() // _BUCKET_SECONDS) - self._window_minutes()
            for key, (d, b) in batch.items():
                if key[1] <= horizon:
                    continue
                cur = self._unsent.setdefault(key, [0, 0])
                cur[0] += d
                cur[1] += b
            raise
        minute = int(self._clock() // _BUCKET_SECONDS)
        self._pool = await self._store.reputation_window(minute - self._window_minutes())

    def _window_minutes(self) -> int:
        return int(self._settings().window // _BUCKET_SECONDS)

    def record(self, credential: str | None, outcome: str) -> None:
        """Count a final per-recipient outcome ("delivered" or "bounced"; others ignored)."""
        if credential is None or outcome not in ("delivered", "bounced"):
            return
        window = self._windows.get(credential)
        if window is None:
            if len(self._windows) >= self._max_tracked:
                self._windows.pop(next(iter(self._windows)))
            window = self._windows[credential] = _Window()
        minute = int(self._clock() // _BUCKET_SECONDS)
        self._expire(window, minute)
        if not window.buckets or window.buckets[-1][0] != minute:
            window.buckets.append([minute, 0, 0])
        if outcome == "delivered":
            window.buckets[-1][1] += 1
            window.delivered += 1
        else:
            window.buckets[-1][2] += 1
            window.bounced += 1
        if self._store is not None:
            unsent = self._unsent.setdefault((credential, minute), [0, 0])
            unsent[0 if outcome == "delivered" else 1] += 1

    def paused(self, credential: str | None) -> Pause | None:
        """The pause in force for this credential, or None."""
        settings = self._settings()
        if credential is None or not settings.pause_senders:
            return None
        minute = int(self._clock() // _BUCKET_SECONDS)
        if self._pool is not None:
            delivered, bounced = self._pool.get(credential, (0, 0))
            horizon = minute - self._window_minutes()
            for (name, m), (d, b) in self._unsent.items():
                if name == credential and m > horizon:
                    delivered += d
                    bounced += b
        else:
            window = self._windows.get(credential)
            if window is None:
                return None
            self._expire(window, minute)
            delivered, bounced = window.delivered, window.bounced
        total = delivered + bounced
        if total < settings.min_recipients or total == 0:
            return None
        rate = bounced / total
        if rate < settings.bounce_rate:
            return None
        return Pause(rate, total, settings.bounce_rate, settings.window)

    def paused_count(self) -> int:
        names = set(self._windows) | set(self._pool or ())
        return sum(1 for name in names if self.paused(name) is not None)

    def _expire(self, window: _Window, minute: int) -> None:
        horizon = minute - int(self._settings().window // _BUCKET_SECONDS)
        while window.buckets and window.buckets[0][0] <= horizon:
            _, delivered, bounced = window.buckets.popleft()
            window.delivered -= delivered
            window.bounced -= bounced
