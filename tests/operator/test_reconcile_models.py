"""The models: the operator's trust boundary for CR bodies."""

from __future__ import annotations

import pytest

from mailplane_operator.reconcile import models
from mailplane_operator.reconcile.models import SpecError
from tests.operator.reconcile_builders import body, credential, relay


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("2160h", 90 * 86400), ("1h30m", 5400), ("250ms", 0.25),
    ("1.5h", 5400),
])
def test_go_durations(text: str, seconds: float) -> None:
    assert models.parse_go_duration(text) == seconds


@pytest.mark.parametrize("text", ["5d", "15 m", "", "-1h", "1y"])
def test_bad_durations_say_how_to_write_one(text: str) -> None:
    with pytest.raises(ValueError, match="2160h"):
        models.parse_go_duration(text)


@pytest.mark.parametrize(("seconds", "text"), [(90 * 86400, "2160h"), (5400, "1h30m"),
                                               (90, "1m30s"), (0, "0s"), (0.25, "250ms")])
def test_format_duration(seconds: float, text: str) -> None:
    assert models.format_duration(seconds) == text
    assert models.parse_go_duration(text) == seconds


def test_errors_name_the_object_and_the_field() -> None:
    doc = body("SmtpCredential", "app", "shop", {
        "relayRef": {"name": "main"}, "allowedSenders": ["example.com"],
        "rotation": {"interval": "2d"}})
    with pytest.raises(models.SpecError) as info:
        models.parse_smtp_credential(doc)
    assert str(info.value).startswith("SmtpCredential shop/app: spec.rotation.interval: ")
    assert "'2d' is not a duration" in str(info.value)


def test_a_body_without_spec_is_refused() -> None:
    with pytest.raises(models.SpecError, match="spec is missing"):
        models.parse_smtp_relay({"metadata": {"name": "r", "namespace": "n"}})


def test_label_selector_semantics() -> None:
    sel = models.LabelSelector.model_validate({
        "matchLabels": {"team": "shop"},
        "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod", "stage"]},
                             {"key": "legacy", "operator": "DoesNotExist"}]})
    assert sel.matches({"team": "shop", "env": "prod"})
    assert not sel.matches({"team": "shop", "env": "dev"})
    assert not sel.matches({"team": "shop", "env": "prod", "legacy": "1"})
    assert not sel.matches({"env": "prod"})
    assert models.LabelSelector().matches({})
    notin = models.LabelSelector.model_validate(
        {"matchExpressions": [{"key": "env", "operator": "NotIn", "values": ["dev"]},
                              {"key": "team", "operator": "Exists"}]})
    assert notin.matches({"team": "x"}) and not notin.matches({"team": "x", "env": "dev"})


def test_secret_name_and_relay_namespace_defaults() -> None:
    cred = models.parse_smtp_credential(body("SmtpCredential", "app", "shop", {
        "relayRef": {"name": "main"}, "allowedSenders": ["Orders@Example.com"]}))
    assert cred.secret_name == "app-smtp"
    assert cred.relay_namespace == "shop"
    assert cred.spec.allowed_senders == ("orders@example.com",)


def test_ceilings_and_platform_suspensions_are_validated() -> None:
    with pytest.raises(SpecError, match=r"defaultRatePerMinute must not exceed "
                                        r"limits\.maxRatePerMinute"):
        relay(limits={"defaultRatePerMinute": 100, "maxRatePerMinute": 10})
    with pytest.raises(SpecError, match=r"spec.tenancy.suspensions.0.reason"):
        relay(tenancy={"suspensions": [{"namespace": "shop", "reason": "a\r\n250 OK"}]})
    with pytest.raises(SpecError, match=r"spec.suspendedReason"):
        credential(suspended=True, suspendedReason="x\n250 fine")
    r = relay(tenancy={"suspensions": [{"namespace": "shop", "reason": "spam"}]})
    assert r.spec.tenancy.suspensions[0].applies_to("shop", "anything")


def test_a_retention_policy_keeps_logs_at_most_90_days() -> None:
    body = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"messageLog": "2161h"}}
    with pytest.raises(SpecError, match="messageLog"):
        models.parse_retention_policy(body)
    body["spec"] = {"messageLog": "2160h"}
    assert models.parse_retention_policy(body).spec.message_log == 90 * 86400


def test_a_retention_policy_keeps_suppression_entries_at_most_365_days() -> None:
    body = {"metadata": {"name": "p", "namespace": "ns"}, "spec": {"suppression": "8761h"}}
    with pytest.raises(SpecError, match="suppression"):
        models.parse_retention_policy(body)
    body["spec"] = {"suppression": "8760h"}
    assert models.parse_retention_policy(body).spec.suppression == 365 * 86400
