"""Sender policy, check by check, called directly: which refusal (metrics reason and reply)
each case gets at MAIL FROM and at the end of DATA, in the order the checks run."""

from __future__ import annotations

from typing import Any

from mailplane_relay.config import AbuseSettings, RelayConfig, RelaySettings, hash_password
from mailplane_relay.ingress.policy import SenderPolicy, header_from_domain
from mailplane_relay.ingress.replies import Refusal
from mailplane_relay.ratelimit import Limiter
from mailplane_relay.reputation import Reputation

HASH = hash_password("x")
T0 = 1_800_000_000.0


def config(**cred: Any) -> RelayConfig:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"},
           "domains": [{"name": "example.com"}, {"name": "example.org"}],
           "credentials": [
               {"username": "app", "passwordHash": HASH,
                "allowedSenders": ["example.com", "noreply@example.org"], **cred}]}
    return RelayConfig(settings=RelaySettings.model_validate(doc))


def policy(cfg: RelayConfig, reputation: Reputation | None = None) -> SenderPolicy:
    return SenderPolicy(Limiter(lambda: cfg, clock=lambda: T0), reputation)


def paused_reputation() -> Reputation:
    abuse = AbuseSettings.model_validate({"minRecipients": 1, "bounceRate": 0.5})
    rep = Reputation(lambda: abuse, clock=lambda: T0)
    rep.record("app", "bounced")
    return rep


def test_mail_from_without_auth() -> None:
    cfg = config()
    p = policy(cfg)
    assert p.mail_from(cfg, None, False, "a@example.com") == Refusal(
        "auth_required", "530 5.7.0 Authentication required")
    assert p.mail_from(cfg, None, True, "a@example.com") == "example.com"
    assert p.mail_from(cfg, None, True, "a@elsewhere.net") == "other"
    assert p.mail_from(cfg, None, True, "") == "other"


def test_mail_from_of_a_credential() -> None:
    cfg = config()
    p = policy(cfg)
    assert p.mail_from(cfg, "app", False, "a@example.com") == "example.com"
    assert p.mail_from(cfg, "app", False, "noreply@example.org") == "example.org"
    assert p.mail_from(cfg, "app", False, "") == "other"  # the null reverse-path
    assert p.mail_from(cfg, "app", False, "a@elsewhere.net") == Refusal(
        "domain_not_enabled", "550 5.7.1 Sender domain elsewhere.net is not enabled on this relay")
    assert p.mail_from(cfg, "app", False, "other@example.org") == Refusal(
        "sender_not_allowed", "550 5.7.1 Credential app may not send from domain example.org")
    assert p.mail_from(cfg, "gone", False, "a@example.com") == Refusal(
        "suspended", "554 5.7.1 Credential gone is no longer valid")


def test_suspension_comes_before_the_pause_and_the_sender() -> None:
    cfg = config(suspended=True, suspendedReason="abuse report 42")
    p = policy(cfg, paused_reputation())
    assert p.mail_from(cfg, "app", False, "a@elsewhere.net") == Refusal(
        "suspended", "554 5.7.1 Credential app is suspended: abuse report 42")
    cfg = config(suspended=True)
    assert policy(cfg).mail_from(cfg, "app", False, "a@example.com") == Refusal(
        "suspended", "554 5.7.1 Credential app is suspended: no reason given")


def test_a_pause_comes_before_the_sender_checks_and_the_null_path_is_paused_too() -> None:
    cfg = config()
    rep = paused_reputation()
    p = policy(cfg, rep)
    pause = rep.paused("app")
    assert pause is not None
    for sender in ("a@elsewhere.net", "a@example.com", ""):
        assert p.mail_from(cfg, "app", False, sender) == Refusal("paused", pause.reply("app"))
    assert p.mail_from(cfg, None, True, "a@example.com") == "example.com"  # no credential


def test_limits_are_checked_last_and_named() -> None:
    cfg = config(ratePerMinute=1)
    p = policy(cfg)
    p.limiter.record_message(cfg.credentials["app"])
    assert p.mail_from(cfg, "app", False, "a@elsewhere.net").reason == (  # type: ignore[union-attr]
        "domain_not_enabled")
    assert p.mail_from(cfg, "app", False, "a@example.com") == Refusal(
        "rate_limited", "451 4.7.1 Rate limit of 1 messages per minute exceeded for app")
    assert p.mail_from(cfg, "app", False, "") == Refusal(
        "rate_limited", "451 4.7.1 Rate limit of 1 messages per minute exceeded for app")
    cfg = config(dailyQuota=1)
    p = policy(cfg)
    p.limiter.record_message(cfg.credentials["app"])
    assert p.mail_from(cfg, "app", False, "a@example.com") == Refusal(
        "quota_exceeded", "452 4.7.1 Daily quota of 1 messages exceeded for app")
    assert p.message(cfg, "app", ["a@example.com"]) == Refusal(
        "quota_exceeded", "452 4.7.1 Daily quota of 1 messages exceeded for app")


def test_message_holds_the_header_from_to_the_same_rules() -> None:
    cfg = config()
    p = policy(cfg)
    assert p.message(cfg, None, []) is None  # trusted network: no credential rules
    assert p.message(cfg, "app", ["App <a@example.com>"]) is None
    assert p.message(cfg, "app", ["a@example.com, noreply@example.org"]) is None
    assert p.message(cfg, "gone", ["a@example.com"]) == Refusal(
        "suspended", "554 5.7.1 Credential gone is no longer valid")
    assert p.message(cfg, "app", []) == Refusal(
        "sender_not_allowed", "550 5.7.1 Message has no From: header address")
    assert p.message(cfg, "app", ["undisclosed-recipients:;"]) == Refusal(
        "sender_not_allowed", "550 5.7.1 Message has no From: header address")
    refusal = p.message(cfg, "app", ["a@example.com, b@elsewhere.net"])
    assert refusal is not None and refusal.reason == "domain_not_enabled"
    assert "elsewhere.net" in refusal.reply
    refusal = p.message(cfg, "app", ["a@example.com", "x@example.org"])
    assert refusal is not None and refusal.reason == "sender_not_allowed"
    assert "app" in refusal.reply and "example.org" in refusal.reply


def test_message_checks_limits_after_the_header() -> None:
    cfg = config(ratePerMinute=1)
    p = policy(cfg)
    assert p.message(cfg, "app", ["a@example.com"]) is None
    p.limiter.record_message(cfg.credentials["app"])
    assert p.message(cfg, "app", ["b@elsewhere.net"]).reason == (  # type: ignore[union-attr]
        "domain_not_enabled")
    assert p.message(cfg, "app", ["a@example.com"]) == Refusal(
        "rate_limited", "451 4.7.1 Rate limit of 1 messages per minute exceeded for app")


def test_header_from_domain_is_the_first_address() -> None:
    cfg = config()
    assert header_from_domain(cfg, ["Shop <a@Example.COM>, b@example.org"]) == "example.com"
    assert header_from_domain(cfg, ["b@example.org"]) == "example.org"
    assert header_from_domain(cfg, ["a@elsewhere.net, b@example.org"]) == "other"
    assert header_from_domain(cfg, ["undisclosed-recipients:;", "b@example.org"]) == (
        "example.org")
    assert header_from_domain(cfg, []) == "other"
