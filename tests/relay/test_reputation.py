"""Sender reputation: pausing on bounce rate, with an injected clock."""

from __future__ import annotations

from mailplane_relay.config import AbuseSettings
from mailplane_relay.reputation import Reputation
from tests.relay import test_ingress_support as support

relay = support.relay


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make(**settings: object) -> tuple[Reputation, Clock]:
    clock = Clock()
    abuse = AbuseSettings.model_validate(
        {"bounceRate": 0.1, "minRecipients": 20, "window": "10m", **settings}
    )
    return Reputation(lambda: abuse, clock=clock), clock


def feed(rep: Reputation, user: str, delivered: int, bounced: int) -> None:
    for _ in range(delivered):
        rep.record(user, "delivered")
    for _ in range(bounced):
        rep.record(user, "bounced")


def test_pauses_when_the_bounce_rate_crosses_the_threshold() -> None:
    rep, _ = make()
    feed(rep, "app", 17, 2)
    assert rep.paused("app") is None  # 19 outcomes: below minRecipients
    feed(rep, "app", 0, 1)
    pause = rep.paused("app")
    assert pause is not None and pause.recipients == 20 and pause.bounce_rate == 0.15
    reply = pause.reply("app")
    assert reply.startswith("451 4.7.1 Sending paused for app: 15% of the last 20")
    assert "limit 10%" in reply and "10m" in reply
    assert rep.paused("other") is None and rep.paused_count() == 1


def test_below_the_threshold_and_unrelated_outcomes_do_not_pause() -> None:
    rep, _ = make()
    feed(rep, "app", 91, 9)
    for outcome in ("deferred", "expired", "suppressed"):
        rep.record("app", outcome)
    rep.record(None, "bounced")
    assert rep.paused("app") is None


def test_resumes_once_the_window_slides_past_the_bounces() -> None:
    rep, clock = make()
    feed(rep, "app", 10, 10)
    assert rep.paused("app") is not None
    clock.now += 5 * 60
    feed(rep, "app", 5, 0)
    assert rep.paused("app") is not None  # the bad minute is still inside the 10 min window
    clock.now += 6 * 60
    assert rep.paused("app") is None  # only the 5 good outcomes remain: below minRecipients
    feed(rep, "app", 30, 0)
    assert rep.paused("app") is None


def test_pausing_can_be_turned_off() -> None:
    rep, _ = make(pauseSenders=False)
    feed(rep, "app", 0, 100)
    assert rep.paused("app") is None


def test_memory_is_bounded() -> None:
    abuse = AbuseSettings()
    rep = Reputation(lambda: abuse, max_tracked=3)
    for i in range(10):
        rep.record(f"user{i}", "bounced")
    assert len(rep._windows) == 3


async def test_a_paused_credential_gets_451_at_mail_from_and_others_do_not(
        relay: support.Relay) -> None:
    """Through the real SMTP server over TLS: bounces recorded for app1 pause it."""
    for _ in range(40):
        relay.reputation.record("app1", "delivered")
    for _ in range(10):
        relay.reputation.record("app1", "bounced")
    c = await support.ready_session(relay)
    try:
        code, text = await c.cmd("MAIL FROM:<a@example.com>")
        assert code == 451
        assert text.startswith("451 4.7.1 Sending paused for app1: 20% of the last 50")
        assert relay.rejected("paused") == 1
        assert (await c.cmd("NOOP"))[0] == 250  # the session stays usable
        relay.clock[0] += 3600 + 60  # the window slides past the bounces
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    finally:
        await c.close()
    assert [e.status for e in relay.log.events].count("rejected") == 1


def test_pauses_when_complaints_cross_the_complaint_rate_of_delivered_mail() -> None:
    rep, _ = make(complaintRate=0.05)
    feed(rep, "app", 40, 0)
    rep.record("app", "complained")
    assert rep.paused("app") is None  # 1 of 40 delivered: 2.5 %
    rep.record("app", "complained")
    pause = rep.paused("app")
    assert pause is not None and pause.cause == "complaint" and pause.bounce_rate == 0.05
    reply = pause.reply("app")
    assert reply.startswith("451 4.7.1 Sending paused for app: complaints about 5% of the "
                            "last 40 recipients within 10m (limit 5%)")
    assert rep.paused_count("complaint") == 1 and rep.paused_count("bounce") == 0


def test_complaints_need_the_minimum_volume_and_slide_out_of_the_window() -> None:
    rep, clock = make(complaintRate=0.001, minRecipients=20, minComplaints=1)
    feed(rep, "app", 10, 0)
    rep.record("app", "complained")
    assert rep.paused("app") is None  # 10 recipients: below minRecipients
    feed(rep, "app", 10, 0)
    assert rep.paused("app") is not None
    clock.now += 11 * 60
    assert rep.paused("app") is None


def test_the_ses_defaults() -> None:
    abuse = AbuseSettings()
    assert abuse.complaint_rate == 0.001


class MemoryStore:
    def __init__(self) -> None:
        self.outcomes: dict[tuple[str, int], list[int]] = {}
        self.complaints: dict[tuple[str, int], int] = {}

    async def reputation_add(self, buckets: dict[tuple[str, int], tuple[int, int]]) -> None:
        for key, (d, b) in buckets.items():
            cur = self.outcomes.setdefault(key, [0, 0])
            cur[0] += d
            cur[1] += b

    async def reputation_window(self, since_minute: int) -> dict[str, tuple[int, int]]:
        out: dict[str, tuple[int, int]] = {}
        for (c, m), (d, b) in self.outcomes.items():
            if m > since_minute:
                d0, b0 = out.get(c, (0, 0))
                out[c] = (d0 + d, b0 + b)
        return out

    async def complaints_add(self, buckets: dict[tuple[str, int], int]) -> None:
        for key, n in buckets.items():
            self.complaints[key] = self.complaints.get(key, 0) + n

    async def complaints_window(self, since_minute: int) -> dict[str, int]:
        out: dict[str, int] = {}
        for (c, m), n in self.complaints.items():
            if m > since_minute:
                out[c] = out.get(c, 0) + n
        return out


async def test_complaints_recorded_by_one_process_pause_the_credential_in_another() -> None:
    store = MemoryStore()
    abuse = AbuseSettings.model_validate({"complaintRate": 0.05, "minRecipients": 20,
                                          "minComplaints": 1, "window": "10m"})
    clock = Clock()
    sender = Reputation(lambda: abuse, clock=clock, store=store)
    intake = Reputation(lambda: abuse, clock=clock, store=store)
    feed(sender, "app", 20, 0)
    intake.record("app", "complained")
    await sender.sync()
    await intake.sync()
    assert sender.paused("app") is None  # the intake's complaint is not in the store yet
    await sender.sync()
    pause = sender.paused("app")
    assert pause is not None and pause.cause == "complaint"
