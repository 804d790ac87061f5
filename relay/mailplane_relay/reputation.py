"""Sender reputation: pause a credential whose recent bounce or complaint rate crosses a
threshold.

The acceptable-use promise (pausing senders whose bounce rates cross thresholds) is kept here,
in the data plane, because it is the relay that sees every outcome as it happens. Each
credential has a sliding window of per-minute buckets counting delivered and bounced
recipients, and the complaints (feedback-loop reports the intake matched to the credential).
When, over the window, at least ``minRecipients`` outcomes were seen and the share of bounces
reaches ``bounceRate``, or complaints reach ``complaintRate`` of the delivered recipients, MAIL
FROM for that credential is answered with a temporary ``451 4.7.1`` naming the rate, until the
window slides past the bad minutes. The clock is injected.

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
    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None: ...
    async def complaints_window(self, since_minute: int) -> dict[str, int]: ...


@dataclass(slots=True)
class _Window:
    # (minute index, delivered, bounced, complained), oldest first
    buckets: deque[list[int]] = field(default_factory=deque)
    delivered: int = 0
    bounced: int = 0
    complained: int = 0


@dataclass(frozen=True, slots=True)
class Pause:
    bounce_rate: float
    recipients: int
    threshold: float
    window: float
    # "bounce": bounce_rate is the share of bounces; "complaint": the share of complaints
    cause: str = "bounce"

    def reply(self, user: str) -> str:
        if self.cause == "complaint":
            return (
                f"451 4.7.1 Sending paused for {user}: complaints about {_pct(self.bounce_rate)}"
                f" of the last {self.recipients} recipients within {_human(self.window)} "
                f"(limit {_pct(self.threshold)}); send only to recipients who asked for the "
                "mail, it resumes as the rate drops"
            )
        return (
            f"451 4.7.1 Sending paused for {user}: {self.bounce_rate:.0%} of the last "
            f"{self.recipients} recipients bounced within {_human(self.window)} "
            f"(limit {self.threshold:.0%}); clean the recipient list, it resumes as the rate "
            "drops"
        )


def _pct(rate: float) -> str:
    return f"{rate * 100:.2g}%"


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
        # Complaints not yet added to the store, and the pool's complaint sums.
        self._unsent_complaints: dict[tuple[str, int], int] = {}
        self._pool_complaints: dict[str, int] = {}

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
        complaints, self._unsent_complaints = self._unsent_complaints, {}
        try:
            await self._store.complaints_add(complaints)
        except BaseException:
            horizon = int(self._clock() // _BUCKET_SECONDS) - self._window_minutes()
            for key, n in complaints.items():
                if key[1] > horizon:
                    self._unsent_complaints[key] = self._unsent_complaints.get(key, 0) + n
            raise
        minute = int(self._clock() // _BUCKET_SECONDS)
        pool = await self._store.reputation_window(minute - self._window_minutes())
        self._pool_complaints = await self._store.complaints_window(
            minute - self._window_minutes())
        self._pool = pool

    def _window_minutes(self) -> int:
        return int(self._settings().window // _BUCKET_SECONDS)

    def record(self, credential: str | None, outcome: str) -> None:
        """Count a final per-recipient outcome ("delivered" or "bounced"), or a complaint
        ("complained"); others are ignored."""
        if credential is None or outcome not in ("delivered", "bounced", "complained"):
            return
        window = self._windows.get(credential)
        if window is None:
            if len(self._windows) >= self._max_tracked:
                self._windows.pop(next(iter(self._windows)))
            window = self._windows[credential] = _Window()
        minute = int(self._clock() // _BUCKET_SECONDS)
        self._expire(window, minute)
        if not window.buckets or window.buckets[-1][0] != minute:
            window.buckets.append([minute, 0, 0, 0])
        if outcome == "complained":
            window.buckets[-1][3] += 1
            window.complained += 1
            if self._store is not None:
                key = (credential, minute)
                self._unsent_complaints[key] = self._unsent_complaints.get(key, 0) + 1
            return
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
            complained = self._pool_complaints.get(credential, 0)
            horizon = minute - self._window_minutes()
            for (name, m), (d, b) in self._unsent.items():
                if name == credential and m > horizon:
                    delivered += d
                    bounced += b
            for (name, m), n in self._unsent_complaints.items():
                if name == credential and m > horizon:
                    complained += n
        else:
            window = self._windows.get(credential)
            if window is None:
                return None
            self._expire(window, minute)
            delivered, bounced = window.delivered, window.bounced
            complained = window.complained
        total = delivered + bounced
        if total < settings.min_recipients or total == 0:
            return None
        rate = bounced / total
        if rate >= settings.bounce_rate:
            return Pause(rate, total, settings.bounce_rate, settings.window)
        # SES measures complaints against the mail delivered.
        complaint_rate = complained / max(delivered, 1)
        if complained >= settings.min_complaints and complaint_rate >= settings.complaint_rate:
            return Pause(complaint_rate, total, settings.complaint_rate, settings.window,
                         cause="complaint")
        return None

    def paused_count(self, cause: str | None = None) -> int:
        """Credentials paused now (for one cause, "bounce" or "complaint", if given)."""
        names = set(self._windows) | set(self._pool or ())
        pauses = (self.paused(name) for name in names)
        return sum(1 for p in pauses if p is not None and (cause is None or p.cause == cause))

    def _expire(self, window: _Window, minute: int) -> None:
        horizon = minute - int(self._settings().window // _BUCKET_SECONDS)
        while window.buckets and window.buckets[0][0] <= horizon:
            _, delivered, bounced, complained = window.buckets.popleft()
            window.delivered -= delivered
            window.bounced -= bounced
            window.complained -= complained
