"""Sender reputation: pause a credential whose recent bounce rate crosses a threshold.

The acceptable-use promise (pausing senders whose bounce rates cross thresholds) is kept here,
in the data plane, because it is the relay that sees every outcome as it happens. Each
credential has a sliding window of per-minute buckets counting delivered and bounced
recipients. When, over the window, at least ``minRecipients`` outcomes were seen and the share
of bounces reaches ``bounceRate``, MAIL FROM for that credential is answered with a temporary
``451 4.7.1`` naming the rate, until the window slides past the bad minutes. Nothing here does
I/O; the clock is injected.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .config import AbuseSettings

_BUCKET_SECONDS = 60.0


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
                 clock: Callable[[], float] = time.time, max_tracked: int = 100_000) -> None:
        self._settings = settings
        self._clock = clock
        self._max_tracked = max_tracked
        self._windows: dict[str, _Window] = {}

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

    def paused(self, credential: str | None) -> Pause | None:
        """The pause in force for this credential, or None."""
        settings = self._settings()
        if credential is None or not settings.pause_senders:
            return None
        window = self._windows.get(credential)
        if window is None:
            return None
        self._expire(window, int(self._clock() // _BUCKET_SECONDS))
        total = window.delivered + window.bounced
        if total < settings.min_recipients or total == 0:
            return None
        rate = window.bounced / total
        if rate < settings.bounce_rate:
            return None
        return Pause(rate, total, settings.bounce_rate, settings.window)

    def paused_count(self) -> int:
        return sum(1 for name in list(self._windows) if self.paused(name) is not None)

    def _expire(self, window: _Window, minute: int) -> None:
        horizon = minute - int(self._settings().window // _BUCKET_SECONDS)
        while window.buckets and window.buckets[0][0] <= horizon:
            _, delivered, bounced = window.buckets.popleft()
            window.delivered -= delivered
            window.bounced -= bounced
