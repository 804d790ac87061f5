"""RetentionPolicy: which relays it selects, the shortest promise winning, the 90-day default."""

from __future__ import annotations

from typing import Any

from mailplane_operator.reconcile import models
from mailplane_operator.reconcile.conditions import get_condition
from mailplane_operator.reconcile.retention import retention_for_relay, retention_status
from tests.operator.reconcile_builders import NOW, body, relay


def policy(name: str, namespace: str = "mail", **spec: Any) -> models.RetentionPolicy:
    return models.parse_retention_policy(body("RetentionPolicy", name, namespace, spec))


def test_without_a_policy_the_product_default_applies() -> None:
    r = retention_for_relay(relay(), [])
    assert r.message_log == 90 * 86400 and r.suppression == 365 * 86400
    assert r.purge_interval == 3600 and r.policies == ()
    assert r.to_config() == {"messageLog": 90 * 86400.0, "suppression": 365 * 86400.0,
                             "purgeInterval": 3600.0}


def test_policies_select_relays_of_their_namespace_by_label() -> None:
    prod = relay("prod", labels={"tier": "prod"})
    test = relay("test", labels={"tier": "test"})
    short = policy("short", relaySelector={"matchLabels": {"tier": "prod"}}, messageLog="720h")
    elsewhere = policy("elsewhere", namespace="other", messageLog="24h")
    assert retention_for_relay(prod, [short, elsewhere]).message_log == 30 * 86400
    assert retention_for_relay(test, [short, elsewhere]).policies == ()


def test_the_shortest_promise_wins_setting_by_setting() -> None:
    a = policy("a", messageLog="720h", suppression="8760h")
    b = policy("b", messageLog="1440h", suppression="4380h", purgeInterval="15m")
    r = retention_for_relay(relay(), [b, a])
    assert (r.message_log, r.suppression, r.purge_interval) == (30 * 86400, 4380 * 3600, 900)
    assert r.policies == ("mail/a", "mail/b")


def test_status_lists_the_relays_it_applies_to() -> None:
    p = policy("all")
    status = retention_status(p, [relay("b"), relay("a"), relay("x", namespace="other")], NOW)
    assert status["relays"] == ["a", "b"]
    ready = get_condition(status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True" and ready["reason"] == "Applied"
    none = retention_status(policy("none", relaySelector={"matchLabels": {"x": "y"}}),
                            [relay()], NOW)
    ready = get_condition(none["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "NoRelaySelected"
