"""Sender reputation, rule by rule, with a fake clock: the window's edges, the threshold, the
bound on memory, the pause's reply, and the pool's sums (the real SQLite backend) with the
outcomes not yet written, including a store that fails."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.config import AbuseSettings
from mailplane_relay.reputation import Pause, Reputation
from mailplane_relay.store import SqliteBackend

T0 = 1_800_000_000.0 - (1_800_000_000.0 % 3600)  # the start of an hour (and of a minute)
MINUTE = int(T0 // 60)


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def abuse(**settings: object) -> AbuseSettings:
    return AbuseSettings.model_validate(
        {"bounceRate": 0.25, "complaintRate": 0.5, "minRecipients": 4, "window": "10m",
         "minComplaints": 1, **settings})


def make(store: Any = None, clock: Clock | None = None, **settings: object
         ) -> tuple[Reputation, Clock]:
    clock = clock or Clock()
    s = abuse(**settings)
    return Reputation(lambda: s, clock=clock, store=store), clock


def feed(rep: Reputation, user: str, delivered: int, bounced: int) -> None:
    for _ in range(delivered):
        rep.record(user, "delivered")
    for _ in range(bounced):
        rep.record(user, "bounced")


class Flaky:
    """The real store, with writes that fail while ``down`` is set."""

    def __init__(self, store: SqliteBackend) -> None:
        self.store = store
        self.down = False
        self.added: list[dict[tuple[str, int], tuple[int, int]]] = []
        self.complaints: list[dict[tuple[str, int], int]] = []

    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.added.append(dict(buckets))
        await self.store.reputation_add(buckets)

    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]:
        return await self.store.reputation_window(since_minute)

    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
        if self.down:
            raise ConnectionError("store down")
        self.complaints.append(dict(buckets))
        await self.store.complaints_add(buckets)

    async def complaints_window(self, since_minute: int) -> dict[str, int]:
        return await self.store.complaints_window(since_minute)


@pytest.fixture
async def store(tmp_path: Path) -> Any:
    b = SqliteBackend(str(tmp_path / "s.sqlite3"))
    await b.open()
    yield b
    await b.close()


# ------------------------------------------------------------------ one process

def test_the_threshold_itself_pauses_and_just_under_does_not() -> None:
    rep, _ = make()
    feed(rep, "app", 3, 1)  # 25 % of 4: at the threshold
    pause = rep.paused("app")
    assert pause == Pause(0.25, 4, 0.25, 600.0)
    rep, _ = make()
    feed(rep, "app", 4, 1)  # 20 %
    assert rep.paused("app") is None


def test_min_recipients_counts_delivered_and_bounced_together() -> None:
    rep, _ = make(minRecipients=5)
    feed(rep, "app", 0, 4)
    assert rep.paused("app") is None
    feed(rep, "app", 1, 0)
    pause = rep.paused("app")
    assert pause is not None and pause.recipients == 5 and pause.bounce_rate == 0.8


def test_only_delivered_counts_as_delivered() -> None:
    rep, _ = make()
    feed(rep, "app", 0, 1)
    for other in ("deferred", "expired", "suppressed", "Delivered", ""):
        rep.record("app", other)
    assert rep.paused("app") is None  # 1 outcome
    feed(rep, "app", 3, 0)
    assert rep.paused("app") == Pause(0.25, 4, 0.25, 600.0)
    assert rep.paused(None) is None


def test_a_minute_leaves_the_window_exactly_window_later() -> None:
    rep, clock = make()
    feed(rep, "app", 0, 4)
    clock.now += 9 * 60 + 59  # the last second of the window
    assert rep.paused("app") is not None
    clock.now += 1
    assert rep.paused("app") is None
    feed(rep, "app", 0, 3)
    assert rep.paused("app") is None  # the old 4 stay gone: 3 < minRecipients


def test_buckets_are_minutes_and_expire_one_by_one() -> None:
    rep, clock = make()
    feed(rep, "app", 0, 2)
    clock.now += 59  # the same minute
    feed(rep, "app", 0, 1)
    clock.now += 1  # the next minute
    feed(rep, "app", 2, 0)
    assert rep.paused("app") == Pause(0.6, 5, 0.25, 600.0)
    clock.now = T0 + 600  # the first minute is out, the second is in
    assert rep.paused("app") is None  # 2 delivered only
    rep.record("app", "bounced")
    rep.record("app", "bounced")
    assert rep.paused("app") == Pause(0.5, 4, 0.25, 600.0)


def test_recording_expires_old_minutes_too() -> None:
    rep, clock = make()
    feed(rep, "app", 0, 4)
    clock.now += 600
    feed(rep, "app", 0, 1)  # recording slides the window before counting
    clock.now += 1
    feed(rep, "app", 3, 0)
    assert rep.paused("app") == Pause(0.25, 4, 0.25, 600.0)


def test_the_oldest_credential_is_forgotten_first() -> None:
    s = abuse()
    rep = Reputation(lambda: s, clock=Clock(), max_tracked=2)
    feed(rep, "first", 0, 4)
    feed(rep, "second", 0, 4)
    feed(rep, "second", 0, 1)  # already tracked: nothing is forgotten
    assert rep.paused("first") is not None
    feed(rep, "third", 0, 4)
    assert rep.paused("first") is None
    assert rep.paused("second") is not None and rep.paused("third") is not None
    assert rep.paused_count() == 2


def test_paused_count_counts_only_paused_credentials() -> None:
    rep, _ = make()
    feed(rep, "bad", 0, 4)
    feed(rep, "good", 4, 0)
    feed(rep, "few", 0, 1)
    assert rep.paused_count() == 1


@pytest.mark.parametrize(("window", "text"), [
    (60.0, "within 1m "), (600.0, "within 10m "), (3600.0, "within 1h "), (7200.0, "within 2h "),
    (5400.0, "within 90m "), (90.0, "within 90s "), (30.5, "within 30.5s "),
])
def test_the_reply_names_the_window_in_its_largest_whole_unit(window: float, text: str) -> None:
    reply = Pause(0.5, 40, 0.1, window).reply("app")
    assert text in reply
    assert reply == (f"451 4.7.1 Sending paused for app: 50% of the last 40 recipients bounced "
                     f"{text}(limit 10%); clean the recipient list, it resumes as the rate drops")


# ------------------------------------------------------------------ with the store

async def test_without_a_store_sync_does_nothing() -> None:
    rep, _ = make()
    feed(rep, "app", 0, 4)
    await rep.sync()
    assert rep.paused("app") is not None


async def test_sync_writes_each_minutes_counts_once(store: SqliteBackend) -> None:
    pool = Flaky(store)
    rep, clock = make(pool)
    feed(rep, "app", 2, 1)
    clock.now += 60
    feed(rep, "app", 0, 3)
    rep.record("web", "delivered")
    await rep.sync()
    assert pool.added == [{("app", MINUTE): (2, 1), ("app", MINUTE + 1): (0, 3),
                           ("web", MINUTE + 1): (1, 0)}]
    await rep.sync()
    assert pool.added[1] == {}  # nothing new: nothing written twice
    assert await store.reputation_window(MINUTE - 1) == {"app": (2, 4), "web": (1, 0)}
    assert rep.paused("app") == Pause(4 / 6, 6, 0.25, 600.0)
    assert rep.paused("web") is None
    assert rep.paused_count() == 1


async def test_the_pools_sums_count_with_outcomes_not_yet_written(store: SqliteBackend) -> None:
    other, _ = make(store)
    feed(other, "app", 3, 0)
    await other.sync()
    rep, _ = make(store)
    await rep.sync()
    assert rep.paused("app") is None  # 3 delivered in the pool
    rep.record("app", "bounced")  # not written yet, counted on top
    assert rep.paused("app") == Pause(0.25, 4, 0.25, 600.0)
    rep.record("web", "bounced")  # another credential's outcomes do not count for app
    assert rep.paused("app") == Pause(0.25, 4, 0.25, 600.0)


async def test_unwritten_outcomes_leave_the_window_too(store: SqliteBackend) -> None:
    rep, clock = make(store)
    await rep.sync()
    feed(rep, "app", 0, 4)
    assert rep.paused("app") is not None
    clock.now += 600
    assert rep.paused("app") is None


async def test_the_pool_decides_once_synced_even_for_unknown_names(store: SqliteBackend) -> None:
    other, _ = make(store)
    feed(other, "remote", 0, 4)
    await other.sync()
    rep, _ = make(store)
    assert rep.paused("remote") is None and rep.paused_count() == 0
    await rep.sync()
    assert rep.paused("remote") is not None and rep.paused_count() == 1


async def test_the_pools_window_is_the_configured_one(store: SqliteBackend) -> None:
    writer, clock = make(store)
    feed(writer, "app", 0, 4)
    await writer.sync()
    clock.now += 599
    reader, _ = make(store, clock)
    await reader.sync()
    assert reader.paused("app") is not None
    clock.now += 1
    await reader.sync()
    assert reader.paused("app") is None
    wide, _ = make(store, clock, window="20m")
    await wide.sync()
    assert wide.paused("app") is not None


async def test_a_failed_write_keeps_the_outcomes_for_the_next_try(store: SqliteBackend) -> None:
    pool = Flaky(store)
    rep, _ = make(pool)
    await rep.sync()
    feed(rep, "app", 1, 1)
    pool.down = True
    with pytest.raises(ConnectionError):
        await rep.sync()
    assert rep.paused("app") is None  # 2 outcomes, still counted locally
    feed(rep, "app", 0, 2)  # more meanwhile, in the same minute: merged
    assert rep.paused("app") == Pause(0.75, 4, 0.25, 600.0)
    pool.down = False
    await rep.sync()
    assert pool.added[-1] == {("app", MINUTE): (1, 3)}
    assert rep.paused("app") == Pause(0.75, 4, 0.25, 600.0)


async def test_a_long_outage_drops_minutes_past_the_window(store: SqliteBackend) -> None:
    pool = Flaky(store)
    rep, clock = make(pool)
    await rep.sync()
    feed(rep, "app", 0, 2)  # minute 0
    clock.now += 60
    feed(rep, "app", 0, 1)  # minute 1
    pool.down = True
    clock.now = T0 + 600  # minute 10: minute 0 is past the window, minute 1 is not
    with pytest.raises(ConnectionError):
        await rep.sync()
    pool.down = False
    await rep.sync()
    assert pool.added[-1] == {("app", MINUTE + 1): (0, 1)}


async def test_a_failed_write_raises_whatever_the_store_raised(store: SqliteBackend) -> None:
    class Broken(Flaky):
        async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
            raise RuntimeError("disk full")

    rep, _ = make(Broken(store))
    rep.record("app", "bounced")
    with pytest.raises(RuntimeError, match="disk full"):
        await rep.sync()


def test_a_single_bounce_pauses_when_one_recipient_is_enough() -> None:
    rep, _ = make(minRecipients=1)
    rep.record("app", "bounced")
    assert rep.paused("app") == Pause(1.0, 1, 0.25, 600.0)


def test_expired_deliveries_stop_counting_exactly() -> None:
    rep, clock = make()
    feed(rep, "app", 6, 0)
    clock.now += 60
    feed(rep, "app", 1, 1)
    clock.now = T0 + 600  # the six deliveries leave the window
    feed(rep, "app", 0, 2)
    assert rep.paused("app") == Pause(0.75, 4, 0.25, 600.0)


def test_one_bucket_per_minute_however_many_outcomes() -> None:
    rep, clock = make()
    feed(rep, "app", 500, 500)
    clock.now += 60
    feed(rep, "app", 1, 0)
    assert len(rep._windows["app"].buckets) == 2  # memory grows with minutes, not outcomes


async def test_the_pools_bounces_and_unwritten_bounces_add_up(store: SqliteBackend) -> None:
    other, _ = make(store)
    feed(other, "app", 1, 2)
    await other.sync()
    rep, _ = make(store)
    await rep.sync()
    assert rep.paused("app") is None  # 3 in the pool
    rep.record("app", "bounced")
    assert rep.paused("app") == Pause(0.75, 4, 0.25, 600.0)


async def test_outcomes_recorded_during_a_failed_write_are_merged(store: SqliteBackend) -> None:
    holder: list[Reputation] = []

    class FailsMidway(Flaky):
        async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
            if self.down:
                feed(holder[0], "app", 1, 1)  # recorded while the write is in flight
                raise ConnectionError("store down")
            await super().reputation_add(buckets)

    pool = FailsMidway(store)
    rep, _ = make(pool)
    holder.append(rep)
    await rep.sync()
    feed(rep, "app", 2, 3)
    pool.down = True
    with pytest.raises(ConnectionError):
        await rep.sync()
    pool.down = False
    await rep.sync()
    assert pool.added[-1] == {("app", MINUTE): (3, 4)}


# ------------------------------------------------------------------ complaints

def complain(rep: Reputation, user: str, n: int) -> None:
    for _ in range(n):
        rep.record(user, "complained")


def test_complaints_pause_against_the_mail_delivered() -> None:
    rep, _ = make()
    feed(rep, "app", 4, 0)
    complain(rep, "app", 1)
    assert rep.paused("app") is None  # 1 of 4 delivered: 25 %, under 50 %
    complain(rep, "app", 1)
    pause = rep.paused("app")
    assert pause == Pause(0.5, 4, 0.5, 600.0, cause="complaint")
    assert pause is not None and pause.reply("app") == (
        "451 4.7.1 Sending paused for app: complaints about 50% of the last 4 recipients "
        "within 10m (limit 50%); send only to recipients who asked for the mail, it resumes "
        "as the rate drops")
    assert rep.paused_count() == 1
    assert rep.paused_count("complaint") == 1 and rep.paused_count("bounce") == 0


def test_bounces_are_judged_before_complaints() -> None:
    rep, _ = make()
    feed(rep, "app", 3, 1)
    complain(rep, "app", 3)
    assert rep.paused("app") == Pause(0.25, 4, 0.25, 600.0)
    assert rep.paused_count("bounce") == 1 and rep.paused_count("complaint") == 0


def test_complaints_need_min_recipients_and_leave_with_the_window() -> None:
    rep, clock = make()
    complain(rep, "app", 5)
    assert rep.paused("app") is None  # no recipients at all
    feed(rep, "app", 3, 0)
    assert rep.paused("app") is None  # 3 < minRecipients
    clock.now += 60
    feed(rep, "app", 1, 0)
    assert rep.paused("app") is not None
    clock.now = T0 + 600  # the complaints and 3 deliveries leave the window
    feed(rep, "app", 3, 0)
    assert rep.paused("app") is None


def test_the_complaint_rate_is_shown_to_two_figures() -> None:
    pause = Pause(0.00125, 800, 0.001, 3600.0, cause="complaint")
    assert "complaints about 0.12% of the last 800 recipients within 1h (limit 0.1%)" in (
        pause.reply("app"))


async def test_complaints_go_through_the_pool(store: SqliteBackend) -> None:
    pool = Flaky(store)
    writer, clock = make(pool)
    feed(writer, "app", 4, 0)
    complain(writer, "app", 1)
    await writer.sync()
    assert pool.complaints == [{("app", MINUTE): 1}]
    reader, _ = make(store, clock)
    await reader.sync()
    assert reader.paused("app") is None  # 1 of 4
    reader.record("app", "complained")  # not written yet: counts on top
    assert reader.paused("app") == Pause(0.5, 4, 0.5, 600.0, cause="complaint")
    reader.record("web", "complained")
    assert reader.paused("app") == Pause(0.5, 4, 0.5, 600.0, cause="complaint")
    clock.now = T0 + 600
    assert reader.paused("app") is None


async def test_complaints_a_failed_write_kept_are_written_later(store: SqliteBackend) -> None:
    class ComplaintsDown(Flaky):
        async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
            await self.store.reputation_add(buckets)  # only the complaints' write fails

        async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
            if self.down:
                complain(holder[0], "app", 1)  # recorded while the write is in flight
                raise ConnectionError("store down")
            await super().complaints_add(buckets)

    holder: list[Reputation] = []
    pool = ComplaintsDown(store)
    rep, clock = make(pool)
    holder.append(rep)
    complain(rep, "app", 2)
    clock.now += 60
    complain(rep, "app", 1)
    clock.now = T0 + 600  # the first minute is past the window: dropped
    complain(rep, "app", 1)
    pool.down = True
    with pytest.raises(ConnectionError):
        await rep.sync()
    pool.down = False
    await rep.sync()
    # The complaint recorded meanwhile, in the same minute, is added to the one kept.
    assert pool.complaints[-1] == {("app", MINUTE + 1): 1, ("app", MINUTE + 10): 2}


def test_one_delivery_is_the_whole_base_of_the_complaint_rate() -> None:
    rep, _ = make(minRecipients=1, complaintRate=0.6)
    rep.record("app", "delivered")
    complain(rep, "app", 1)
    assert rep.paused("app") == Pause(1.0, 1, 0.6, 600.0, cause="complaint")


def test_expired_complaints_stop_counting_exactly() -> None:
    rep, clock = make()
    feed(rep, "app", 4, 0)
    complain(rep, "app", 1)
    clock.now = T0 + 600  # the first minute, with its complaint, leaves the window
    feed(rep, "app", 4, 0)
    complain(rep, "app", 2)
    assert rep.paused("app") == Pause(0.5, 4, 0.5, 600.0, cause="complaint")


async def test_complaints_of_one_minute_are_written_as_one_count(store: SqliteBackend) -> None:
    pool = Flaky(store)
    rep, _ = make(pool)
    complain(rep, "app", 3)
    await rep.sync()
    assert pool.complaints == [{("app", MINUTE): 3}]


def test_one_complaint_does_not_pause_a_small_sender_however_high_its_rate() -> None:
    """A recipient's complaint counts once: with ``minComplaints`` (2) one recipient cannot
    pause a sender alone, even at 1 complaint in 4 deliveries."""
    assert AbuseSettings.model_validate({}).min_complaints == 2
    rep, _ = make(complaintRate=0.001, minComplaints=2)
    feed(rep, "app", 4, 0)
    complain(rep, "app", 1)
    assert rep.paused("app") is None
    complain(rep, "app", 1)
    pause = rep.paused("app")
    assert pause is not None and pause.cause == "complaint"
    strict, _ = make(complaintRate=0.001, minComplaints=1)
    feed(strict, "app", 4, 0)
    complain(strict, "app", 1)
    assert strict.paused("app") is not None
