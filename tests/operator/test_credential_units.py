"""The credential reconciler's words and bookkeeping, exactly: the events of each rotation,
each admission's reason and message (a SendingDomain that does not grant the namespace
included), and the status fields a user and kubectl read."""

from __future__ import annotations

import base64
from datetime import timedelta

from mailplane_operator.reconcile import credential as cm
from mailplane_operator.reconcile import credential_state as cs
from mailplane_operator.reconcile.conditions import get_condition
from mailplane_operator.reconcile.models import LabelSelector
from mailplane_operator.reconcile.ownership import REASON_SENDER_NOT_GRANTED
from tests.operator.reconcile_builders import NOW, credential, relay
from tests.operator.test_reconcile_credential import owners, reconcile


def test_rotation_events_say_what_happened_to_which_secret() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "2h"})
    first = reconcile(cred)
    assert [(e.type, e.reason, e.message) for e in first.events] == [
        ("Normal", cs.ROTATION_INITIAL, "generated a password into Secret app-smtp")]
    scheduled = reconcile(cred, first, now=NOW + timedelta(hours=24))
    assert [e.message for e in scheduled.events] == [
        "rotated the password in Secret app-smtp on schedule; the previous password works "
        "until 2026-11-28T14:00:00Z"]
    asked = credential(annotations={cs.ANN_ROTATE: "now"}, uid=cred.meta.uid,
                       rotation={"interval": "24h", "overlap": "0s"})
    requested = reconcile(asked, first, now=NOW + timedelta(hours=1))
    assert [(e.reason, e.message) for e in requested.events] == [
        (cs.ROTATION_REQUESTED, "rotated the password in Secret app-smtp on request; the "
                                "previous password no longer works")]


def test_a_reissued_password_says_why() -> None:
    cred = credential(rotation={"overlap": "1h"})
    first = reconcile(cred)
    assert first.secret is not None
    edited = {**first.secret, "data": {**first.secret["data"], "password": "ZWRpdGVk"}}
    again = reconcile(cred, first, existing=edited, now=NOW + timedelta(minutes=1))
    assert [(e.reason, e.message) for e in again.events] == [
        (cs.ROTATION_REISSUED, "Secret app-smtp did not hold the password issued (edited or "
                               "deleted); a new one was written; the previous password works "
                               "until 2026-11-27T13:01:00Z")]


def test_admission_messages() -> None:
    cred = credential(namespace="shop", relay_namespace="mail")
    missing = reconcile(cred, r=None).admission
    assert (missing.allowed, missing.message) == (False, "SmtpRelay mail/main does not exist")
    closed = reconcile(cred).admission
    assert closed.message == ("SmtpRelay mail/main does not allow namespace 'shop' (see its "
                              "spec.allowedNamespaces)")
    open_relay = relay(allowedNamespaces={})
    ready = reconcile(cred, r=open_relay).admission
    assert (ready.allowed, ready.reason, ready.message) == (
        True, cm.REASON_READY, "accepted by SmtpRelay mail/main")
    two = credential(senders=("example.com", "a@example.org", "example.net"))
    refused = reconcile(two).admission
    assert (refused.allowed, refused.reason, refused.message) == (
        False, cm.REASON_SENDER_NOT_ATTACHED,
        "allowed senders use domains not attached to SmtpRelay mail/main or not verified yet: "
        "example.net, example.org")


def test_a_domain_owner_that_does_not_grant_the_namespace_refuses_the_credential() -> None:
    cred = credential(namespace="shop", relay_namespace="mail")
    open_relay = relay(allowedNamespaces={})
    billing = LabelSelector.model_validate({"matchLabels": {"team": "billing"}})
    only_billing = owners("example.com", namespace="mail", allowed=billing)
    refused = reconcile(cred, r=open_relay, attached=only_billing, labels={"team": "shop"})
    assert (refused.admission.allowed, refused.admission.reason) == (
        False, REASON_SENDER_NOT_GRANTED)
    assert refused.admission.message.startswith(
        "example.com belongs to SendingDomain mail/example-com, which does not grant namespace "
        "'shop'")
    assert [(e.type, e.reason) for e in refused.events][-1] == (
        "Warning", REASON_SENDER_NOT_GRANTED)
    ready = get_condition(refused.status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "False"
    granted = reconcile(cred, r=open_relay, attached=only_billing, labels={"team": "billing"})
    assert granted.admission.allowed


def test_status_fields() -> None:
    cred = credential(generation=7, suspended=True, suspendedReason="paused by us")
    status = reconcile(cred).status
    assert status["observedGeneration"] == 7
    assert status["username"] == "mail.app"
    assert status["relay"] == "mail/main"
    assert status["secretName"] == "app-smtp"
    ready = get_condition(status["conditions"], "Ready")
    assert ready is not None
    assert (ready["reason"], ready["message"], ready["observedGeneration"]) == (
        cm.REASON_SUSPENDED, "suspended: paused by us", 7)


def test_an_unchanged_condition_keeps_its_transition_time() -> None:
    cred = credential()
    first = reconcile(cred)
    seen = credential(status=first.status, uid=cred.meta.uid)
    later = reconcile(seen, first, now=NOW + timedelta(hours=3))
    before = get_condition(first.status["conditions"], "Ready")
    after = get_condition(later.status["conditions"], "Ready")
    assert before is not None and after is not None
    assert after["lastTransitionTime"] == before["lastTransitionTime"] == "2026-11-27T12:00:00Z"


def test_every_capped_limit_is_named() -> None:
    capped_relay = relay(limits={"maxRatePerMinute": 10, "maxDailyQuota": 100})
    cred = credential(ratePerMinute=50, dailyQuota=500)
    result = reconcile(cred, r=capped_relay)
    condition = get_condition(result.status["conditions"], cm.LIMITS_CAPPED)
    assert condition is not None
    assert condition["message"] == (
        "spec.ratePerMinute 50 is above the ceiling of SmtpRelay mail/main "
        "(spec.limits.maxRatePerMinute 10): 10 applies; spec.dailyQuota 500 is above the "
        "ceiling of SmtpRelay mail/main (spec.limits.maxDailyQuota 100): 100 applies")


def test_status_names_the_last_rotation_and_the_limits_within_ceilings() -> None:
    cred = credential(generation=3)
    status = reconcile(cred, r=relay(limits={"maxRatePerMinute": 10})).status
    assert status["lastRotationTime"] == "2026-11-27T12:00:00Z"
    capped = get_condition(status["conditions"], cm.LIMITS_CAPPED)
    assert capped is not None
    assert (capped["status"], capped["message"], capped["observedGeneration"]) == (
        "False", "the limits asked for are within the ceilings of SmtpRelay mail/main", 3)


def test_the_relay_entry_carries_limits_only_when_asked_or_capped() -> None:
    cred = credential()
    result = reconcile(cred)
    assert result.state is not None
    entry = cm.credential_entry(cred, result.state, NOW, relay())
    assert "ratePerMinute" not in entry and "dailyQuota" not in entry
    assert "previousPasswordHash" not in entry and "previousExpires" not in entry
    capped = cm.credential_entry(cred, result.state, NOW, relay(limits={"maxDailyQuota": 5}))
    assert capped["dailyQuota"] == 5 and "ratePerMinute" not in capped


def test_the_application_secret_is_an_opaque_secret_with_our_labels() -> None:
    result = reconcile(credential())
    assert result.secret is not None
    assert (result.secret["apiVersion"], result.secret["kind"], result.secret["type"]) == (
        "v1", "Secret", "Opaque")
    assert result.secret["metadata"]["labels"] == {
        cm.LABEL_CREDENTIAL: "app", cm.LABEL_MANAGED_BY: cm.MANAGED_BY}
    assert result.rotated is True
    assert reconcile(credential(), result).rotated is False


def test_urls_quote_every_reserved_character_of_the_username_and_password() -> None:
    endpoint = cm.Endpoint("relay.test", 587, 465)
    secret = cm.secret_manifest(credential(), "p/a:s@s", endpoint, username="u/x")
    url = base64.b64decode(secret["data"]["url"]).decode()
    assert url == "smtp://u%2Fx:p%2Fa%3As%40s@relay.test:587"


def test_a_suspension_by_name_wins_over_one_of_the_whole_namespace() -> None:
    r = relay(tenancy={"suspensions": [
        {"namespace": "mail", "reason": "the whole namespace"},
        {"namespace": "mail", "name": "app", "reason": "this credential"}]})
    assert cm.platform_suspension(credential(), r) == "this credential"


def test_a_limit_at_the_ceiling_is_not_capped() -> None:
    result = reconcile(credential(ratePerMinute=10), r=relay(limits={"maxRatePerMinute": 10}))
    condition = get_condition(result.status["conditions"], cm.LIMITS_CAPPED)
    assert condition is not None and condition["status"] == "False"
    assert result.status["effectiveRatePerMinute"] == 10


def test_without_the_implicit_tls_listener_there_is_no_smtps_url() -> None:
    result = reconcile(credential(), r=relay(listeners={"submissions": {"enabled": False}}))
    assert result.secret is not None
    assert "smtps-url" not in result.secret["data"] and "smtps-port" not in result.secret["data"]


def test_warnings_carry_their_message_and_a_changed_cap_warns_again() -> None:
    cred = credential(namespace="shop", relay_namespace="mail")
    closed = reconcile(cred)
    assert [(e.type, e.message) for e in closed.events] == [
        ("Warning", "SmtpRelay mail/main does not allow namespace 'shop' (see its "
                    "spec.allowedNamespaces)")]
    capped = credential(ratePerMinute=50)
    first = reconcile(capped, r=relay(limits={"maxRatePerMinute": 10}))
    [warning] = [e for e in first.events if e.reason == cm.REASON_LIMIT_CAPPED]
    assert warning.message.startswith("spec.ratePerMinute 50 is above the ceiling")
    seen = credential(ratePerMinute=50, status=first.status, uid=capped.meta.uid)
    same = reconcile(seen, first, r=relay(limits={"maxRatePerMinute": 10}))
    assert [e for e in same.events if e.reason == cm.REASON_LIMIT_CAPPED] == []
    lower = reconcile(seen, first, r=relay(limits={"maxRatePerMinute": 5}))
    assert [e.message for e in lower.events if e.reason == cm.REASON_LIMIT_CAPPED] == [
        "spec.ratePerMinute 50 is above the ceiling of SmtpRelay mail/main "
        "(spec.limits.maxRatePerMinute 5): 5 applies"]


def test_the_longest_names_give_a_username_within_the_relays_128_characters() -> None:
    # A namespace and a credential name are at most 63 characters each (the models refuse
    # longer ones), so <namespace>.<name> fits the relay's limit whole: no digest needed.
    longest = cm.username_for(credential(name="a" * 63, namespace="n" * 63))
    assert longest == "n" * 63 + "." + "a" * 63 and len(longest) == 127


def test_a_tenants_own_suspension_without_a_reason_says_so() -> None:
    cred = credential(suspended=True)
    assert cm.suspension(cred, relay()) == (cm.SUSPENDED_BY_TENANT, "suspended by its owner")
    result = reconcile(cred)
    assert result.state is not None
    entry = cm.credential_entry(cred, result.state, NOW, relay())
    assert (entry["suspended"], entry["suspendedReason"]) == (True, "suspended by its owner")
    given = credential(suspended=True, suspendedReason="leaked key")
    assert cm.suspension(given, None) == (cm.SUSPENDED_BY_TENANT, "leaked key")


def test_the_relay_entry_keeps_the_previous_password_for_the_overlap_only() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "2h"})
    first = reconcile(cred)
    rotated = reconcile(cred, first, now=NOW + timedelta(hours=24))
    assert first.state is not None and rotated.state is not None
    during = cm.credential_entry(cred, rotated.state, NOW + timedelta(hours=25), relay())
    assert during["passwordHash"] == rotated.state.password_hash
    assert during["previousPasswordHash"] == first.state.password_hash
    assert during["previousExpires"] == "2026-11-28T14:00:00Z"
    after = cm.credential_entry(cred, rotated.state, NOW + timedelta(hours=26), relay())
    assert "previousPasswordHash" not in after and "previousExpires" not in after
