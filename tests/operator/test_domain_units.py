"""The domain reconciler's small parts, exactly: the keys it generates, the reason a render
gives for an unverified domain, and the signing keys read back from the DKIM Secret."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile import models
from mailplane_operator.reconcile.conditions import format_time
from mailplane_operator.reconcile.credential_state import ANN_ROTATE
from tests.operator.reconcile_builders import NOW, body, counting_random, domain, relay
from tests.operator.test_reconcile_domain import reconcile, serving
from tests.operator.test_reconcile_ownership import (
    GRANT_SHOP,
    LABELS,
    _cond,
    _step,
    _verified_domain,
    claim,
    verified_status,
)


def factory() -> dm.KeyFactory:
    return dm.random_key_factory(counting_random())


def test_rsa_keys_are_2048_bits_with_the_usual_exponent() -> None:
    key = serialization.load_pem_private_key(dm.generate_dkim_key("rsa-2048").encode(), None)
    assert isinstance(key, rsa.RSAPrivateKey)
    assert key.key_size == 2048
    assert key.private_numbers().public_numbers.e == 65537


def test_ed25519_keys_come_from_the_random_source_when_given() -> None:
    seed = bytes(range(32))
    pem = dm.generate_dkim_key("ed25519", lambda n: seed[:n])
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                             serialization.NoEncryption()) == seed
    assert dm.generate_dkim_key("ed25519") != dm.generate_dkim_key("ed25519")
    assert dm.random_key_factory(lambda n: seed[:n])("ed25519") == pem


def test_an_unknown_algorithm_is_named_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"^unknown DKIM algorithm 'RSA-2048': use rsa-2048 or "
                                         r"ed25519$"):
        dm.generate_dkim_key("RSA-2048")


def ready(status: str, reason: str | None) -> dict[str, Any]:
    condition: dict[str, Any] = {"type": "Ready", "status": status}
    if reason is not None:
        condition["reason"] = reason
    return {"conditions": [condition]}


@pytest.mark.parametrize(("status", "want"), [
    (None, "NotVerified"),
    (ready("False", "DKIMRecordMissing"), "DKIMRecordMissing"),
    (ready("Unknown", "LookupFailed"), "LookupFailed"),
    (ready("False", None), "NotVerified"),
    (ready("True", "Verified"), "NotVerified"),
])
def test_the_reason_for_an_unverified_domain_is_its_ready_reason(
        status: dict[str, Any] | None, want: str) -> None:
    assert dm.unverified_reason(domain(status=status)) == want


def test_no_secret_no_signing() -> None:
    assert dm.signing_from_secret(None) is None


def test_dns_verification_through_a_grace_period_exactly() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    t1 = NOW + timedelta(hours=1)
    missing = _step(d, ok, {**good, name: []}, t1)
    # The lookup fails while the record is missing: the base message stays, the end is named.
    failed = _step(d, missing, {**good, name: None}, t1 + timedelta(hours=1),
                   {name: "no nameserver answered (SERVFAIL or refused)"})
    status, _, message = _cond(failed, "DNSVerified")
    assert status == "Unknown" and "SERVFAIL" in message
    assert message.endswith(
        f"; DNS last answered that the record is gone (since {format_time(t1)}): disabled "
        f"after {format_time(t1 + timedelta(hours=72))} once DNS answers so again")
    back = _step(d, missing, good, t1 + timedelta(hours=2))
    assert [(e.type, e.reason) for e in back.events if e.reason == "DNSRecordsRestored"] == [
        ("Normal", "DNSRecordsRestored")]
    disabled = _step(d, missing, {**good, name: []}, t1 + timedelta(hours=72))
    assert _cond(disabled, "DNSVerified")[0] == "False"
    assert [(e.type, e.reason) for e in disabled.events if e.reason == "DomainDisabled"] == [
        ("Warning", "DomainDisabled")]


def test_the_grace_period_events_name_the_domain_and_the_dates() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    t1 = NOW + timedelta(hours=1)
    missing = _step(d, ok, {**good, name: []}, t1)
    assert [(e.type, e.reason, e.message) for e in missing.events
            if e.reason == "DNSRecordsMissing"] == [(
                "Warning", "DNSRecordsMissing",
                f"no DKIM record at {name}: example.com stays enabled until "
                f"{format_time(t1 + timedelta(hours=72))} and is disabled then unless DNS "
                "serves the record listed in status.dnsRecords again")]
    back = _step(d, missing, good, t1 + timedelta(hours=1))
    assert [e.message for e in back.events if e.reason == "DNSRecordsRestored"] == [
        "DNS serves the DKIM record of example.com again; the domain stays enabled"]
    disabled = _step(d, missing, {**good, name: []}, t1 + timedelta(hours=72))
    assert [e.message for e in disabled.events if e.reason == "DomainDisabled"] == [
        f"example.com disabled: no DKIM record at {name} since {format_time(t1)}, longer than "
        "the grace period (spec.tenancy.dnsGracePeriod of the SmtpRelay); publish the DKIM "
        "record listed in status.dnsRecords to verify it again"]


def test_a_renamed_domain_starts_without_the_old_names_missing_records() -> None:
    d, ok, good = _verified_domain()
    missing = _step(d, ok, {**good, "mp._domainkey.example.com": []}, NOW + timedelta(hours=1))
    assert "recordsMissingSince" in missing.status
    renamed = claim("mail", domain_name="example.org", status=missing.status,
                    dkim={"selector": "mp", "algorithm": "ed25519"})
    new_name = "mp._domainkey.example.org"
    failed = dm.reconcile_domain(renamed, relay=relay(), namespace_labels={},
                                 existing_secret=missing.secret, observed={new_name: None},
                                 now=NOW + timedelta(hours=2))
    assert _cond(failed, "DNSVerified") == (
        "Unknown", "DNSLookupFailed", f"the TXT lookup of {new_name} failed")
    assert "disableTime" not in failed.status and "recordsMissingSince" not in failed.status
    value = next(r["value"] for r in failed.status["dnsRecords"] if r["name"] == new_name)
    served = dm.reconcile_domain(renamed, relay=relay(), namespace_labels={},
                                 existing_secret=missing.secret, observed={new_name: [value]},
                                 now=NOW + timedelta(hours=2))
    assert served.enabled
    assert "DNSRecordsRestored" not in [e.reason for e in served.events]


# --------------------------------------------------------------------------------------------
# Which claims take part in the election of a domain's owner
# --------------------------------------------------------------------------------------------


def _ours(r: Any, others: list[Any], labels: dict[str, dict[str, str]]) -> tuple[str, str]:
    """Ready (status, reason) of a verified claim in the relay's namespace, created after
    ``others``, reconciled with them in view."""
    mine = claim("mail", name="ours", created="2026-11-20T00:00:00Z", status=verified_status())
    result = dm.reconcile_domain(mine, relay=r, namespace_labels={}, existing_secret=None,
                                 observed=None, now=NOW, key_factory=factory(),
                                 claims=others, claim_labels=labels)
    status, reason, _ = _cond(result, "Ready")
    return status, reason


def test_an_earlier_verified_claim_owns_the_domain_however_its_namespace_is_allowed() -> None:
    by_label = relay(allowedNamespaces=GRANT_SHOP,
                     tenancy={"verificationSkipNamespaces": GRANT_SHOP})
    # In the relay's own namespace (a relay without allowedNamespaces).
    home = claim("mail", status=verified_status())
    assert _ours(relay(), [home], {}) == ("False", "DomainConflict")
    # In a namespace the relay allows by its labels.
    shop = claim("shop", status=verified_status())
    assert _ours(by_label, [shop], LABELS) == ("False", "DomainConflict")
    assert _ours(by_label, [shop], {}) == ("True", "Verified")  # labels unknown: not allowed
    # Skipping verification where the relay allows it by the namespace's labels.
    skipping = claim("shop", verification={"skip": True})
    assert _ours(by_label, [skipping], LABELS) == ("False", "DomainConflict")


def test_claims_on_another_relay_deleted_or_unverified_do_not_own_the_domain() -> None:
    r = relay(allowedNamespaces={})  # every namespace
    other_relay = claim("shop", status=verified_status(), relayRef={"name": "other",
                                                                     "namespace": "mail"})
    elsewhere = claim("shop", status=verified_status(), relayRef={"name": "main",
                                                                  "namespace": "shop"})
    deleted_body = body("SendingDomain", "dom", "shop",
                        {"domain": "example.com", "relayRef": {"name": "main",
                                                               "namespace": "mail"}},
                        status=verified_status())
    deleted_body["metadata"]["creationTimestamp"] = "2026-11-01T00:00:00Z"
    deleted_body["metadata"]["deletionTimestamp"] = "2026-11-27T11:00:00Z"
    deleted = models.parse_sending_domain(deleted_body)
    unverified = claim("shop")
    for other in (other_relay, elsewhere, deleted, unverified):
        assert _ours(r, [other], LABELS) == ("True", "Verified"), other.spec
    # The same claims, not deleted and verified, on this relay: the earlier one owns.
    assert _ours(r, [claim("shop", status=verified_status())], LABELS) == (
        "False", "DomainConflict")


# --------------------------------------------------------------------------------------------
# What DNS must serve
# --------------------------------------------------------------------------------------------


def _spf(d: Any, *answers: str) -> tuple[str, str, str]:
    first = reconcile(d, None)
    observed = {**serving(first), "example.com": list(answers)}
    return _cond(reconcile(d, first.secret, observed), "SPFVerified")


def test_spf_names_what_the_published_record_lacks() -> None:
    exact = domain(spf={"record": "v=spf1 a -all"})
    assert _spf(exact, "v=spf1 mx -all") == (
        "False", "RecordMismatch",
        "the SPF record at example.com lacks the exact record from spec.spf.record")
    assert _spf(exact, "V=SPF1 A -ALL")[0] == "True"
    include = domain(spf={"include": ["_spf.example.net"], "ip6": ["2001:db8::/32"]})
    assert _spf(include, "v=spf1 ip6:2001:db8::/32 -all") == (
        "False", "RecordMismatch",
        "the SPF record at example.com lacks include:_spf.example.net")
    assert _spf(include, "v=spf1 -all")[2] == (
        "the SPF record at example.com lacks include:_spf.example.net, ip6:2001:db8::/32")
    assert _spf(include, "v=spf1 include:_spf.example.net ip6:2001:db8::/32 -all")[0] == "True"
    # Nothing asked for (the suggestion is "mx"): any one SPF record will do.
    assert _spf(domain(), "v=spf1 include:_spf.google.com ~all") == (
        "True", "Verified", "SPF record at example.com authorises the relay")
    assert _spf(domain(), "v=spf1 mx ~all", "v=spf1 -all") == (
        "False", "RecordMismatch",
        "2 SPF records at example.com; receivers treat that as an error (RFC 7208 4.5)")


def test_the_dkim_key_is_recognised_however_the_record_is_spaced() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    first = reconcile(d, None)
    name = "mp._domainkey.example.com"
    value = serving(first)[name][0]  # type: ignore[index]
    p = value.partition("p=")[2]
    assert p.endswith("=")  # base64 padding: the value holds a second "="
    for served in (f"v=DKIM1;k=ed25519;p={p}", f"v=DKIM1; k=ed25519; p={p[:20]} {p[20:]}",
                   f"v=DKIM1; k=ed25519; p = {p} ;"):
        result = reconcile(d, first.secret, {**serving(first), name: [served]})
        assert _cond(result, "DKIMVerified")[:2] == ("True", "Verified"), served
    # Another Ed25519 key (its value padded the same way) is a mismatch.
    other = dm.dkim_txt_value(dm.generate_dkim_key("ed25519", lambda n: b"\x07" * n))
    result = reconcile(d, first.secret, {**serving(first), name: [other]})
    assert _cond(result, "DKIMVerified")[:2] == ("False", "RecordMismatch")
    result = reconcile(d, first.secret, {**serving(first), name: ["v=DKIM1; k=ed25519"]})
    assert _cond(result, "DKIMVerified")[:2] == ("False", "RecordMismatch")


def test_the_names_to_look_up_follow_the_keys_in_the_secret() -> None:
    dual = domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519"})
    assert dm.names_to_check(dual, None) == [
        "mp._domainkey.example.com", "mp-ed25519._domainkey.example.com", "example.com",
        "_dmarc.example.com"]
    # The selector in the spec was edited after the key was made: the key's own selector.
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    renamed = domain(dkim={"selector": "new", "algorithm": "ed25519"})
    assert dm.names_to_check(renamed, reconcile(d, None).secret)[0] == (
        "mp._domainkey.example.com")


# --------------------------------------------------------------------------------------------
# Rotation
# --------------------------------------------------------------------------------------------


def test_a_rotation_says_why_it_started() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519", "rotationInterval": "720h"})
    stable = reconcile(d, None)
    due = reconcile(d, stable.secret, now=NOW + timedelta(days=30))
    assert [e.message for e in due.events] == [
        "DKIM key rotation started (the rotation interval has passed): publish the TXT record "
        "of selector mp-20261227 listed in status.dnsRecords"]
    asked = domain(dkim={"selector": "mp", "algorithm": "ed25519"},
                   annotations={ANN_ROTATE: "2026-11-27"})
    started = reconcile(asked, stable.secret, now=NOW + timedelta(minutes=1))
    assert [e.message for e in started.events] == [
        "DKIM key rotation started (requested by the mailplane.io/rotate annotation): publish "
        "the TXT record of selector mp-20261127 listed in status.dnsRecords"]


def test_a_rotation_never_reuses_a_selector_the_secret_holds() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"},
               annotations={ANN_ROTATE: "again"})
    pems = dm.random_key_factory(counting_random())

    def key(selector: str) -> dm.DKIMKeyInfo:
        return dm.DKIMKeyInfo(selector, "ed25519", NOW, pems("ed25519"))

    # Keys restored from a backup: today's selector and its "-2" are taken.
    held = {s: key(s) for s in ("mp", "mp-20261127", "mp-20261127-2")}
    state = dm.DKIMState("Stable", "mp", held, NOW - timedelta(days=1))
    new, _ = dm.advance(d, state, next_served=False, now=NOW, key_factory=pems)
    assert new.next == "mp-20261127-3"
    assert set(new.keys) == {*held, "mp-20261127-3"}
    one = {s: key(s) for s in ("mp", "mp-20261127")}
    new, _ = dm.advance(d, dm.DKIMState("Stable", "mp", one, NOW), next_served=False, now=NOW,
                        key_factory=pems)
    assert new.next == "mp-20261127-2"


def test_a_failed_lookup_neither_restarts_nor_ends_the_grace_period() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    short = relay(tenancy={"dnsGracePeriod": "10h"})

    def step(last: dm.DomainResult, observed: Any, now: Any) -> dm.DomainResult:
        current = models.SendingDomain(d.meta, d.spec, last.status)
        return dm.reconcile_domain(current, relay=short, namespace_labels={},
                                   existing_secret=last.secret, observed=observed, now=now)

    assert _cond(ok, "DNSVerified")[:2] == ("True", "Verified")
    failed = step(ok, {**good, name: None}, NOW)
    assert _cond(failed, "DNSVerified") == (
        "Unknown", "DNSLookupFailed", f"the TXT lookup of {name} failed; the domain stays "
        "enabled until DNS answers that the record is gone")
    t1 = NOW + timedelta(hours=1)
    missing = step(ok, {**good, name: []}, t1)
    end = t1 + timedelta(hours=10)
    failed = step(missing, {**good, name: None}, t1 + timedelta(hours=1))
    assert failed.enabled and failed.status["verifiedTime"] == format_time(NOW)
    assert failed.status["recordsMissingSince"] == format_time(t1)
    assert failed.status["disableTime"] == format_time(end) and failed.next_check == end
    assert f"disabled after {format_time(end)} once DNS answers so again" in _cond(
        failed, "DNSVerified")[2]
    # Gone again at the end of the period counted from the first answer: disabled.
    disabled = step(failed, {**good, name: []}, end)
    assert not disabled.enabled
    assert _cond(disabled, "Ready")[:2] == ("False", "DKIMNotVerified")


def test_a_record_never_served_is_no_verification() -> None:
    d = domain()
    first = reconcile(d, None)
    gone = reconcile(d, first.secret, {**serving(first), "mailplane._domainkey.example.com": []})
    assert _cond(gone, "DNSVerified")[:2] == ("False", "RecordNotFound")
    assert not gone.enabled and "recordsMissingSince" not in gone.status


def test_the_dns_verified_condition_while_records_are_missing_names_the_end() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    t1 = NOW + timedelta(hours=1)
    missing = _step(d, ok, {**good, name: []}, t1)
    assert _cond(missing, "DNSVerified") == (
        "False", "RecordNotFound", f"no DKIM record at {name}; disabled at "
        f"{format_time(t1 + timedelta(hours=72))} unless it is published again")


def test_the_returned_state_is_what_the_secret_gives_back() -> None:
    """What the operator keeps (the Secret) and what it acted on (the result) never differ:
    a restart in the middle of a rotation resumes where it stopped."""
    spec: dict[str, Any] = {"dkim": {"selector": "mp", "algorithm": "rsa-2048+ed25519",
                                     "rotationInterval": "720h", "retireAfter": "168h"}}
    d = domain(**spec, annotations={ANN_ROTATE: "at-creation"})
    first = reconcile(d, None)
    assert first.signing.selector == "mp"
    steps = [first]
    for now in (NOW + timedelta(minutes=1), NOW + timedelta(days=30),
                NOW + timedelta(days=30, hours=1), NOW + timedelta(days=38)):
        steps.append(reconcile(d, steps[-1].secret, serving(steps[-1]), now=now))
    assert [s.state.phase for s in steps] == [
        "Stable", "Stable", "NextKeyPublished", "Switched", "Stable"]
    # Retired: the old selector is no longer shown as retiring.
    assert steps[-1].status["dkim"] == {
        "phase": "Stable", "activeSelector": "mp-20261227", "algorithm": "rsa-2048",
        "keyCreatedAt": "2026-12-27T12:00:00Z", "phaseSince": "2027-01-04T12:00:00Z",
        "second": {"phase": "Stable", "activeSelector": "mp-ed25519-20261227",
                   "algorithm": "ed25519", "keyCreatedAt": "2026-12-27T12:00:00Z",
                   "phaseSince": "2027-01-04T12:00:00Z", "signing": True}}
    for result in steps:
        assert dm.state_from_secret(result.secret) == result.state
        assert dm.state_from_secret(result.secret, dm.ANN_DKIM_SECOND_STATE) == result.second
    # Every step tells what happened and what to do, once per key; the rotate token the
    # domain was created with is no request to rotate the new key.
    publish = "publish the TXT record"
    assert [[(e.type, e.message) for e in s.events if e.reason.startswith("DKIM")]
            for s in steps] == [
        [("Normal", f"generated a rsa-2048 DKIM key under selector mp; {publish} listed in "
                    "status.dnsRecords"),
         ("Normal", f"generated a ed25519 DKIM key under selector mp-ed25519; {publish} "
                    "listed in status.dnsRecords")],
        [("Normal", "DNS serves the ed25519 key of selector mp-ed25519: mail is signed with "
                    "it too")],
        [("Normal", "DKIM key rotation started (the rotation interval has passed): "
                    f"{publish} of selector {sel} listed in status.dnsRecords")
         for sel in ("mp-20261227", "mp-ed25519-20261227")],
        [("Normal", f"signing with selector {new} now; selector {old} stays published until "
                    "2027-01-03T13:00:00Z")
         for new, old in (("mp-20261227", "mp"), ("mp-ed25519-20261227", "mp-ed25519"))],
        [("Normal", f"retired DKIM selector {old}; its TXT record can be removed")
         for old in ("mp", "mp-ed25519")],
    ]
    single = domain(dkim={"selector": "mp", "algorithm": "rsa-2048"})
    off = reconcile(single, steps[-1].secret, serving(steps[-1]), now=NOW + timedelta(days=39))
    assert [(e.type, e.reason, e.message) for e in off.events if e.reason.startswith("DKIM")] == [
        ("Normal", "DKIMKeyRetired", "dual signing turned off: retired DKIM selector "
                                     "mp-ed25519-20261227; its TXT record can be removed")]


def test_the_spf_suggestion_without_mechanisms_is_mx() -> None:
    records = {r["purpose"]: r["value"] for r in reconcile(domain(), None).status["dnsRecords"]}
    assert records["spf"] == "v=spf1 mx ~all"
    assert records["dmarc"] == "v=DMARC1; p=none"


def _switched() -> tuple[Any, dm.DomainResult]:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519", "retireAfter": "168h"},
               annotations={ANN_ROTATE: "go"})
    stable = reconcile(domain(dkim={"selector": "mp", "algorithm": "ed25519"}), None)
    started = reconcile(d, stable.secret, now=NOW + timedelta(minutes=1))
    switched = reconcile(d, started.secret, serving(started), now=NOW + timedelta(minutes=2))
    assert switched.state.phase == "Switched"
    return d, switched


def test_the_retiring_record_stays_listed_and_checked_until_it_is_retired() -> None:
    d, switched = _switched()
    old = dm.dkim_txt_value(switched.state.keys["mp"].pem)
    checked = reconcile(d, switched.secret, serving(switched), now=NOW + timedelta(hours=1))
    assert [r for r in checked.status["dnsRecords"] if r.get("state") == "retiring"] == [{
        "purpose": "dkim", "type": "TXT", "name": "mp._domainkey.example.com", "value": old,
        "strings": [old], "state": "retiring", "selector": "mp", "verified": True}]
    assert dm.names_to_check(d, checked.secret) == [
        "mp-20261127._domainkey.example.com", "example.com", "_dmarc.example.com"]


def test_a_retiring_key_removed_from_the_secret_by_hand_is_no_longer_listed() -> None:
    d, switched = _switched()
    secret = {**switched.secret, "data": {k: v for k, v in switched.secret["data"].items()
                                          if k != "mp.pem"}}
    early = reconcile(d, secret, serving(switched), now=NOW + timedelta(hours=1))
    assert early.state.phase == "Switched" and early.state.retiring == "mp"
    assert [r["selector"] for r in early.status["dnsRecords"] if r.get("selector")] == [
        "mp-20261127"]
    assert early.signing.selector == "mp-20261127"
    retired = reconcile(d, secret, now=NOW + timedelta(days=8))
    assert retired.state.phase == "Stable" and set(retired.secret["data"]) == {
        "mp-20261127.pem"}


def _ready(d: Any, r: Any, labels: dict[str, str] | None, observed: Any = None) -> tuple[
        str, str, str]:
    first = dm.reconcile_domain(d, relay=r, namespace_labels=labels, existing_secret=None,
                                observed=None, now=NOW, key_factory=factory())
    result = dm.reconcile_domain(d, relay=r, namespace_labels=labels,
                                 existing_secret=first.secret,
                                 observed=observed and observed(first), now=NOW,
                                 key_factory=factory())
    return _cond(result, "Ready")


def test_the_ready_condition_says_why_and_where() -> None:
    shop = relay(allowedNamespaces=GRANT_SHOP, tenancy={"verificationSkipNamespaces": GRANT_SHOP})
    tenant = claim("shop", verification={"skip": True})
    assert _ready(tenant, None, LABELS["shop"]) == (
        "False", "RelayNotFound", "SmtpRelay mail/main does not exist")
    billing = claim("billing", verification={"skip": True})
    assert _ready(billing, shop, LABELS["billing"]) == (
        "False", "NamespaceNotAllowed",
        "SmtpRelay mail/main does not allow namespace 'billing' (see its "
        "spec.allowedNamespaces)")
    assert _ready(tenant, shop, LABELS["shop"]) == (
        "True", "VerificationSkipped", "DNS verification skipped (spec.verification.skip)")
    assert _ready(domain(), relay(), {}, serving) == (
        "True", "Verified", "DKIM verified; enabled on SmtpRelay mail/main")


# --------------------------------------------------------------------------------------------
# The DKIM Secret
# --------------------------------------------------------------------------------------------


def test_the_dkim_secret_is_an_opaque_secret_owned_by_the_domain() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    secret = reconcile(d, None).secret
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    md = secret["metadata"]
    assert md["labels"] == {"mailplane.io/sending-domain": "example-com",
                            "app.kubernetes.io/managed-by": "mailplane-operator"}
    assert set(md["annotations"]) == {"mailplane.io/dkim-state"}
    assert md["ownerReferences"] == [models.owner_reference("SendingDomain", d.meta)]
    assert md["ownerReferences"][0]["controller"] is True
    assert json.loads(md["annotations"]["mailplane.io/dkim-state"]) == {
        "phase": "Stable", "active": "mp", "next": None, "retiring": None,
        "phaseSince": "2026-11-27T12:00:00Z", "retireAt": None, "rotationRequest": None,
        "keys": {"mp": {"algorithm": "ed25519", "createdAt": "2026-11-27T12:00:00Z"}}}
    pem = base64.b64decode(secret["data"]["mp.pem"]).decode()
    assert pem.startswith("-----BEGIN PRIVATE KEY-----")


def test_a_dkim_secret_is_ours_by_its_controller_or_by_what_the_operator_wrote() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    made = reconcile(d, None).secret
    md = made["metadata"]

    def variant(**meta: Any) -> dict[str, Any]:
        return {**made, "metadata": {**md, **meta}}

    # Restored from a backup without its ownerReference, or made for a domain of this name
    # deleted and created again (another uid): ours.
    assert dm.secret_conflict(d, variant(ownerReferences=[])) is None
    again = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    assert dm.secret_conflict(again, made) is None
    # Ours by its controller's uid, whatever its labels say.
    assert dm.secret_conflict(d, variant(labels={}, annotations={})) is None
    # Not made for this SendingDomain: left alone, with the fix in the message.
    foreign_controller = [{"kind": "Deployment", "name": "x", "uid": "u", "controller": True}]
    for other in (variant(ownerReferences=foreign_controller),
                  variant(ownerReferences=[], labels={dm.LABEL_DOMAIN: "other"}),
                  variant(ownerReferences=[], annotations={})):
        message = dm.secret_conflict(again, other)
        assert message == (
            "Secret mail/example-com-dkim already exists and was not made for this "
            "SendingDomain; it is left untouched. Give the SendingDomain another name (its "
            "DKIM keys go to the Secret <name>-dkim), or delete that Secret if it is not "
            "needed"), other["metadata"]
    # A reference that is not the controller's does not make it someone else's.
    owner_only = [{"kind": "Deployment", "name": "x", "uid": "u", "controller": False}]
    assert dm.secret_conflict(again, variant(ownerReferences=owner_only)) is None


def test_the_ready_condition_of_a_verified_domain_tells_how_long_it_stays_enabled() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    assert _cond(ok, "Ready") == (
        "True", "Verified", "DKIM verified; enabled on SmtpRelay mail/main")
    failed = _step(d, ok, {**good, name: None}, NOW + timedelta(hours=1))
    assert _cond(failed, "Ready") == (
        "True", "Verified",
        f"DKIM verified; enabled on SmtpRelay mail/main (the TXT lookup of {name} failed)")
    t1 = NOW + timedelta(hours=2)
    end = format_time(t1 + timedelta(hours=72))
    missing = _step(d, ok, {**good, name: []}, t1)
    assert _cond(missing, "Ready") == (
        "True", "Verified", f"enabled on SmtpRelay mail/main until {end}: no DKIM record at "
        f"{name}; disabled at {end} unless it is published again")
    no_spf = _step(d, ok, {**good, "example.com": []}, t1)
    assert _cond(no_spf, "Ready") == (
        "True", "Verified", "DKIM verified; enabled on SmtpRelay mail/main; SPF (shown, not "
        "enforced): no SPF record (v=spf1) at example.com")


def test_the_dkim_status_shows_each_keys_stage_and_dates() -> None:
    _d, switched = _switched()
    t = NOW + timedelta(minutes=2)
    assert switched.status["dkim"] == {
        "phase": "Switched", "activeSelector": "mp-20261127", "algorithm": "ed25519",
        "keyCreatedAt": format_time(NOW + timedelta(minutes=1)), "phaseSince": format_time(t),
        "retiringSelector": "mp", "retireAt": format_time(t + timedelta(days=7))}
    dual = domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519"},
                  annotations={ANN_ROTATE: "go"})
    first = reconcile(domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519"}), None)
    started = reconcile(dual, first.secret, now=NOW + timedelta(minutes=1))
    assert started.status["dkim"] == {
        "phase": "NextKeyPublished", "activeSelector": "mp", "algorithm": "rsa-2048",
        "keyCreatedAt": format_time(NOW), "phaseSince": format_time(NOW + timedelta(minutes=1)),
        "nextSelector": "mp-20261127",
        "second": {"phase": "NextKeyPublished", "activeSelector": "mp-ed25519",
                   "algorithm": "ed25519", "keyCreatedAt": format_time(NOW),
                   "phaseSince": format_time(NOW + timedelta(minutes=1)),
                   "nextSelector": "mp-ed25519-20261127", "signing": False}}


def test_a_dual_signing_domain_that_skips_verification_signs_with_both_keys_at_once() -> None:
    spec: dict[str, Any] = {"dkim": {"selector": "mp", "algorithm": "rsa-2048+ed25519"},
                            "verification": {"skip": True}}
    first = reconcile(domain(**spec), None)
    assert first.enabled and first.status["dkim"]["second"]["signing"] is True
    assert first.signing.also is not None and first.signing.also.selector == "mp-ed25519"
    asked = domain(**spec, annotations={ANN_ROTATE: "go"})
    started = reconcile(asked, first.secret, now=NOW + timedelta(minutes=1))
    switched = reconcile(asked, started.secret, now=NOW + timedelta(minutes=2))
    assert (switched.state.phase, switched.second.phase) == (  # type: ignore[union-attr]
        "Switched", "Switched")
    assert switched.signing.also is not None
    assert switched.signing.also.selector == "mp-ed25519-20261127"


def test_conditions_before_dns_is_checked_and_when_a_lookup_fails() -> None:
    d = domain()
    first = reconcile(d, None)
    for kind in ("DKIMVerified", "SPFVerified"):
        assert _cond(first, kind) == ("Unknown", "NotChecked", "DNS not checked yet")
    assert _cond(first, "DNSVerified")[:2] == ("Unknown", "NotChecked")
    failed = dm.reconcile_domain(d, relay=relay(), namespace_labels={},
                                 existing_secret=first.secret,
                                 observed={**serving(first), "example.com": None}, now=NOW,
                                 lookup_errors={"example.com": "SERVFAIL from 192.0.2.53"})
    assert _cond(failed, "SPFVerified") == (
        "Unknown", "DNSLookupFailed", "the TXT lookup of example.com failed (SERVFAIL from "
        "192.0.2.53)")


def test_a_skipped_verification_is_shown_as_such_in_dns_verified() -> None:
    result = reconcile(domain(verification={"skip": True}), None)
    assert _cond(result, "DNSVerified") == (
        "True", "VerificationSkipped", "DNS verification skipped (spec.verification.skip)")
    assert _cond(result, "DKIMVerified")[:2] == ("Unknown", "NotChecked")


def test_every_condition_names_the_generation_it_was_computed_for() -> None:
    edited = models.parse_sending_domain(body(
        "SendingDomain", "example-com", "mail",
        {"domain": "example.com", "relayRef": {"name": "main"}}, generation=3))
    result = reconcile(edited, None)
    assert result.status["observedGeneration"] == 3
    assert {c["type"]: c["observedGeneration"] for c in result.status["conditions"]} == {
        "DKIMVerified": 3, "SPFVerified": 3, "DNSVerified": 3, "Ready": 3}


def test_dkim_and_spf_events_only_when_their_answer_changes() -> None:
    d = domain()
    name = "mailplane._domainkey.example.com"
    nothing = {name: [], "example.com": [], "_dmarc.example.com": []}
    # Checked at once, nothing published yet: the key's own Event says what to publish.
    first = reconcile(d, None, nothing)
    assert [(e.type, e.reason) for e in first.events] == [("Normal", "DKIMKeyGenerated")]
    steps: list[tuple[str, dict[str, Any]]] = [
        ("dkim served", {**serving(first), "example.com": []}),
        ("same again", {**serving(first), "example.com": []}),
        ("dkim lookup fails", {**serving(first), name: None, "example.com": []}),
        ("fails again", {**serving(first), name: None, "example.com": []}),
        ("dkim back, spf published", serving(first)),
        ("spf lookup fails", {**serving(first), "example.com": None}),
        ("spf gone", {**serving(first), "example.com": []}),
        ("spf still gone", {**serving(first), "example.com": []}),
    ]
    seen = {}
    last = first
    for i, (what, observed) in enumerate(steps):
        last = reconcile(models.SendingDomain(d.meta, d.spec, last.status), first.secret,
                         observed,
                         now=NOW + timedelta(hours=i + 1))
        seen[what] = [(e.type, e.reason) for e in last.events]
        if what == "dkim served":
            assert [e.message for e in last.events] == [
                "DNS serves the DKIM key of selector mailplane"]
    assert seen == {
        "dkim served": [("Normal", "Verified")],
        "same again": [],
        "dkim lookup fails": [("Warning", "DNSLookupFailed")],
        "fails again": [],
        "dkim back, spf published": [("Normal", "Verified")] * 2,
        "spf lookup fails": [("Warning", "DNSLookupFailed")],
        "spf gone": [("Warning", "RecordNotFound")],
        "spf still gone": [],
    }


def test_a_refusal_is_an_event_once_not_at_every_reconcile() -> None:
    owner = claim("shop", status=verified_status())
    later = claim("mail", name="later", created="2026-11-20T00:00:00Z",
                  status=verified_status())
    r = relay(allowedNamespaces={})

    def step(status: dict[str, Any], secret: Any = None) -> dm.DomainResult:
        return dm.reconcile_domain(models.SendingDomain(later.meta, later.spec, status),
                                   relay=r, namespace_labels={}, existing_secret=secret,
                                   observed=None, now=NOW, key_factory=factory(),
                                   claims=[owner], claim_labels=LABELS)

    first = step(later.status)
    _, reason, message = _cond(first, "Ready")
    assert [(e.type, e.reason, e.message) for e in first.events
            if e.reason == "DomainConflict"] == [("Warning", "DomainConflict", message)]
    assert reason == "DomainConflict" and "SendingDomain shop/dom" in message
    assert step(first.status, first.secret).events == []


def test_the_next_reconcile_is_due_at_the_earliest_step_of_either_key_or_the_grace_end() -> None:
    monthly = {"rotationInterval": "720h", "retireAfter": "168h"}
    rsa_only = domain(dkim={"selector": "mp", "algorithm": "rsa-2048", **monthly})
    first = reconcile(rsa_only, None)
    assert first.next_check == NOW + timedelta(days=30)
    assert reconcile(domain(), None).next_check is None  # no rotation interval
    dual = domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519", **monthly})
    later = reconcile(dual, first.secret, now=NOW + timedelta(days=10))
    assert later.second is not None and later.second.phase == "Stable"
    assert later.next_check == NOW + timedelta(days=30)  # the first key's, the earlier
    # The first key waits for DNS (no date of its own): the second key's date.
    ed = domain(dkim={"selector": "mp", "algorithm": "ed25519", **monthly})
    moved = reconcile(dual, reconcile(ed, None).secret, now=NOW + timedelta(days=10))
    assert moved.state.phase == "NextKeyPublished"
    assert moved.next_check == NOW + timedelta(days=40)
    # A verified domain whose record is gone: the end of the grace period, unless a rotation
    # step comes first.
    for interval, due in (("720h", timedelta(hours=73)), ("2h", timedelta(hours=2))):
        d = claim("mail", dkim={"selector": "mp", "algorithm": "ed25519",
                                "rotationInterval": interval, "retireAfter": "1h"})
        made = dm.reconcile_domain(d, relay=relay(), namespace_labels={}, existing_secret=None,
                                   observed=None, now=NOW, key_factory=factory())
        good: dict[str, Any] = {r["name"]: [r["value"]] for r in made.status["dnsRecords"]}
        ok = _step(d, made, good, NOW)
        gone = _step(d, ok, {**good, "mp._domainkey.example.com": []}, NOW + timedelta(hours=1))
        assert gone.next_check == NOW + due, interval


def test_the_status_names_the_relay_and_keeps_the_last_check_time() -> None:
    d = domain()
    first = reconcile(d, None)
    assert (first.status["domain"], first.status["relay"]) == ("example.com", "mail/main")
    assert "lastCheckTime" not in first.status
    checked = reconcile(d, first.secret, serving(first), now=NOW + timedelta(hours=1))
    assert checked.status["lastCheckTime"] == format_time(NOW + timedelta(hours=1))
    not_checked = reconcile(models.SendingDomain(d.meta, d.spec, checked.status),
                            checked.secret, None, now=NOW + timedelta(hours=2))
    assert not_checked.status["lastCheckTime"] == format_time(NOW + timedelta(hours=1))


def _edited(secret: dict[str, Any], annotation: str = dm.ANN_DKIM_STATE,
            **changes: Any) -> dict[str, Any]:
    """The Secret with its state annotation edited by hand (None removes a field)."""
    state = json.loads(secret["metadata"]["annotations"][annotation])
    for key, value in changes.items():
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    annotations = {**secret["metadata"]["annotations"], annotation: json.dumps(state)}
    return {**secret, "metadata": {**secret["metadata"], "annotations": annotations}}


def test_a_hand_edited_state_is_read_leniently_where_it_can_be_and_refused_where_not() -> None:
    _d, switched = _switched()
    secret = switched.secret
    assert dm.state_from_secret({}) is None
    assert dm.state_from_secret({"metadata": {"annotations": {"other": "x"}}}) is None
    # Dates that are gone count as long past; no published flag means published.
    old = dm.state_from_secret(_edited(secret, phaseSince=None, retireAt=None))
    assert old is not None and old.phase_since == datetime.fromtimestamp(0, UTC)
    assert old.retire_at is None and old.published is True
    undated = _edited(secret, keys={"mp": {"algorithm": "ed25519", "createdAt": ""},
                                    "mp-20261127": {"algorithm": "ed25519",
                                                    "createdAt": "not a date"}})
    state = dm.state_from_secret(undated)
    assert state is not None
    assert {k.created_at for k in state.keys.values()} == {datetime.fromtimestamp(0, UTC)}
    dual = reconcile(domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519"}), None)
    for flag, published in ((True, True), (False, False), ("yes", False)):
        second = dm.state_from_secret(
            _edited(dual.secret, dm.ANN_DKIM_SECOND_STATE, published=flag),
            dm.ANN_DKIM_SECOND_STATE)
        assert second is not None and second.published is published, flag
    # What cannot be used is refused, never replaced (with the way out in the message).
    unreadable = (
        _edited(secret, active="gone"), _edited(secret, next="gone"),
        _edited(secret, phase=None), _edited(secret, keys=None), _edited(secret, keys=[]),
        _edited(secret, keys={"mp-20261127": {"createdAt": "2026-11-27T12:00:00Z"}}),
        {**secret, "metadata": {**secret["metadata"], "annotations": {
            dm.ANN_DKIM_STATE: "[1, 2]"}}},
        {**secret, "data": {}},
    )
    for broken in unreadable:
        with pytest.raises(dm.DKIMSecretUnreadable) as caught:
            dm.state_from_secret(broken)
        assert str(caught.value) == (
            "Secret mail/example-com-dkim: the annotation mailplane.io/dkim-state or a key it "
            "names cannot be read; restore the Secret from a backup, or delete it to generate "
            "new keys (then publish the new DKIM record listed in status.dnsRecords)")


def test_a_key_of_another_kind_has_no_dkim_record() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    with pytest.raises(ValueError, match=r"^a DKIM key must be RSA or Ed25519$"):
        dm.dkim_txt_value(pem)
    assert not dm._usable_key(pem, "ed25519")


def test_an_empty_txt_value_is_one_empty_string() -> None:
    """A TXT record holds at least one character-string (RFC 1035 3.3.14)."""
    assert dm.split_txt("") == ("",)
    assert dm.split_txt("a" * 510) == ("a" * 255, "a" * 255)


def test_without_its_relay_a_domain_gets_the_default_grace_period() -> None:
    assert dm.grace_period(None) == 72 * 3600
    assert dm.grace_period(relay(tenancy={"dnsGracePeriod": "1h"})) == 3600
