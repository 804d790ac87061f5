"""Tenancy of sending domains, decided by pure code: grants to other namespaces, one owner per
domain per relay, who may skip verification, and verification that survives DNS failures."""

from __future__ import annotations

import base64
from datetime import timedelta
from typing import Any

import pytest
import yaml

from mailplane_operator.reconcile import credential as cm
from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile import models, ownership, render
from mailplane_operator.reconcile.conditions import format_time, get_condition
from tests.operator.reconcile_builders import NOW, body, counting_random, credential, relay
from tests.operator.test_reconcile_render import app_secret

OPEN_RELAY = {"allowedNamespaces": {}}
GRANT_SHOP = {"matchLabels": {"team": "shop"}}
LABELS: dict[str, dict[str, str]] = {"shop": {"team": "shop"}, "billing": {"team": "billing"},
                                     "aaa": {}, "mail": {}}


def claim(namespace: str, *, created: str | None = "2026-11-01T00:00:00Z", name: str = "dom",
          domain_name: str = "example.com", status: dict[str, Any] | None = None,
          **spec: Any) -> models.SendingDomain:
    b = body("SendingDomain", name, namespace,
             {"domain": domain_name, "relayRef": {"name": "main", "namespace": "mail"}, **spec},
             status=status)
    if created:
        b["metadata"]["creationTimestamp"] = created
    return models.parse_sending_domain(b)


def verified_status(domain_name: str = "example.com") -> dict[str, Any]:
    return {"domain": domain_name, "verifiedTime": "2026-11-02T00:00:00Z"}


def ed_secret(d: models.SendingDomain, seed: int) -> dict[str, Any]:
    pem = dm.generate_dkim_key("ed25519", lambda n: bytes([seed]) * n)
    key = dm.DKIMKeyInfo("mp", "ed25519", NOW, pem)
    return dm.secret_manifest(d, dm.DKIMState("Stable", "mp", {"mp": key}, NOW))


def rendered_dkim(result: render.RenderResult) -> dict[str, Any]:
    out = {}
    for text in result.files.values():
        for doc in yaml.safe_load_all(text):
            if doc and doc["kind"] == "RelayDomains":
                out.update({d["name"]: d["dkim"] for d in doc["spec"]["domains"]})
    return out


def run(r: models.SmtpRelay, domains: list[render.DomainInput],
        creds: list[models.SmtpCredential]) -> render.RenderResult:
    return render.render_relay_config(
        r, domains=domains, credentials=[render.CredentialInput(c, app_secret(c))
                                         for c in creds],
        policies=[], namespace_labels=LABELS, now=NOW)


# --------------------------------------------------------------------------------------------
# Grants
# --------------------------------------------------------------------------------------------


def test_a_domain_is_usable_from_its_own_namespace_and_granted_ones_only() -> None:
    r = relay(**OPEN_RELAY)
    owned = claim("billing", status=verified_status(), allowedNamespaces=GRANT_SHOP)
    doms = [render.DomainInput(owned, ed_secret(owned, 1))]
    own = credential("invoices", "billing", relay_namespace="mail", senders=("example.com",))
    granted = credential("orders", "shop", relay_namespace="mail",
                         senders=("orders@example.com",))
    stranger = credential("spam", "aaa", relay_namespace="mail",
                          senders=("ceo@example.com",))
    result = run(r, doms, [own, granted, stranger])
    assert result.credentials == ("billing/invoices", "shop/orders")
    refused = result.exclusion("SmtpCredential", "aaa/spam")
    assert refused is not None and refused.reason == "SenderNotGranted"
    assert refused.message == (
        "example.com belongs to SendingDomain billing/dom, which does not grant namespace "
        "'aaa' (ask the owners of namespace 'billing' to select it in spec.allowedNamespaces "
        "of SendingDomain billing/dom)")
    # Nothing is rendered for the refused credential: it cannot authenticate.
    assert "aaa.spam" not in str(result.files)

    # A grant removed later revokes at the next render.
    revoked = claim("billing", status=verified_status())
    again = run(r, [render.DomainInput(revoked, ed_secret(revoked, 1))], [own, granted])
    assert again.credentials == ("billing/invoices",)
    assert "shop.orders" not in str(again.files)


def test_the_platforms_domains_are_granted_like_any_other() -> None:
    r = relay(**OPEN_RELAY)
    platform = claim("mail", status=verified_status())
    doms = [render.DomainInput(platform, ed_secret(platform, 1))]
    tenant = credential("orders", "shop", relay_namespace="mail", senders=("example.com",))
    result = run(r, doms, [tenant])
    exclusion = result.exclusion("SmtpCredential", "shop/orders")
    assert exclusion is not None and exclusion.reason == ownership.REASON_SENDER_NOT_GRANTED
    by_name = claim("mail", status=verified_status(), allowedNamespaces={"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}]})
    assert run(r, [render.DomainInput(by_name, ed_secret(by_name, 1))],
               [tenant]).credentials == ("shop/orders",)


def test_the_credentials_status_says_which_domain_and_whom_to_ask() -> None:
    owners = {"example.com": ownership.DomainOwner("example.com", "billing", "dom", None)}
    cred = credential("orders", "shop", relay_namespace="mail",
                      senders=("orders@example.com",))
    result = cm.reconcile_credential(
        cred, relay=relay(**OPEN_RELAY), namespace_labels=LABELS["shop"],
        attached_domains=owners, existing_secret=None, now=NOW, random=counting_random())
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "False"
    assert ready["reason"] == "SenderNotGranted"
    assert "SendingDomain billing/dom" in ready["message"]
    assert "namespace 'billing'" in ready["message"]
    assert ("Warning", "SenderNotGranted") in [(e.type, e.reason) for e in result.events]


# --------------------------------------------------------------------------------------------
# One owner per domain per relay
# --------------------------------------------------------------------------------------------


def test_the_earliest_verified_claim_owns_the_domain() -> None:
    r = relay(**OPEN_RELAY)
    owner = claim("shop", status=verified_status(), allowedNamespaces=GRANT_SHOP)
    # Later, in a namespace that sorts first, with its own key, also verified.
    squatter = claim("aaa", created="2026-11-05T00:00:00Z", status=verified_status())
    doms = [render.DomainInput(owner, ed_secret(owner, 1)),
            render.DomainInput(squatter, ed_secret(squatter, 2))]
    alone = run(r, doms[:1], [])
    result = run(r, doms, [credential("spam", "aaa", relay_namespace="mail",
                                      senders=("example.com",))])
    assert rendered_dkim(result)["example.com"] == rendered_dkim(alone)["example.com"]
    conflict = result.exclusion("SendingDomain", "aaa/dom")
    assert conflict is not None and conflict.reason == "DomainConflict"
    assert "belongs to SendingDomain shop/dom" in conflict.message
    # The squatter's namespace does not get the domain through its own claim either.
    refused = result.exclusion("SmtpCredential", "aaa/spam")
    assert refused is not None and refused.reason == "SenderNotGranted"

    # The owner gone, the next claim takes over.
    after = run(r, doms[1:], [])
    assert rendered_dkim(after)["example.com"] == rendered_dkim(run(r, doms[1:], []))[
        "example.com"] != rendered_dkim(alone)["example.com"]


def test_an_unverified_earlier_claim_owns_nothing() -> None:
    r = relay(**OPEN_RELAY)
    early = claim("aaa", created="2026-10-01T00:00:00Z")  # never verified
    later = claim("shop", status=verified_status())
    result = run(r, [render.DomainInput(early, ed_secret(early, 1)),
                     render.DomainInput(later, ed_secret(later, 2))], [])
    assert result.owners["example.com"].key == "shop/dom"


def test_ties_go_to_the_relays_namespace_then_by_name() -> None:
    r = relay(**OPEN_RELAY)
    same = "2026-11-01T00:00:00Z"
    claims = [claim("aaa", created=same, status=verified_status()),
              claim("mail", created=same, name="zzz", status=verified_status()),
              claim("mail", created=same, name="yyy", status=verified_status())]
    owners = ownership.elect_owners(r, claims, lambda _c: True)
    assert owners["example.com"].meta.key == "mail/yyy"
    assert ownership.conflict_message(claims[1], owners["example.com"], r).endswith(
        "(its key is not rendered): delete it")
    assert ownership.elect_owners(r, claims[:1] + claims[:1], lambda _c: True)[
        "example.com"].meta.key == "aaa/dom"


def test_the_domain_status_names_the_owner() -> None:
    r = relay(**OPEN_RELAY)
    owner = claim("shop", status=verified_status())
    later = claim("aaa", created="2026-11-05T00:00:00Z", verification={"skip": True})
    result = dm.reconcile_domain(
        later, relay=relay(**OPEN_RELAY, tenancy={"verificationSkipNamespaces": {}}),
        namespace_labels={}, existing_secret=None, observed=None, now=NOW,
        key_factory=dm.random_key_factory(counting_random()), claims=[owner],
        claim_labels=LABELS)
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == ("False", "DomainConflict")
    assert "SendingDomain shop/dom" in ready["message"] and not result.enabled
    assert ("Warning", "DomainConflict") in [(e.type, e.reason) for e in result.events]
    # The owner, reconciled with the later claim in view, stays the owner.
    mine = dm.reconcile_domain(
        owner, relay=r, namespace_labels=LABELS["shop"], existing_secret=None, observed=None,
        now=NOW, key_factory=dm.random_key_factory(counting_random()), claims=[later],
        claim_labels=LABELS)
    assert mine.enabled


# --------------------------------------------------------------------------------------------
# Skipping verification is the platform's decision
# --------------------------------------------------------------------------------------------


def test_skip_works_only_where_the_relay_allows_it() -> None:
    r = relay(**OPEN_RELAY)
    tenant = claim("shop", verification={"skip": True})
    result = dm.reconcile_domain(tenant, relay=r, namespace_labels=LABELS["shop"],
                                 existing_secret=None, observed={}, now=NOW,
                                 key_factory=dm.random_key_factory(counting_random()))
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None and ready["reason"] == "VerificationSkipNotAllowed"
    assert "spec.tenancy.verificationSkipNamespaces of SmtpRelay mail/main" in ready["message"]
    assert not result.enabled
    excluded = run(r, [render.DomainInput(tenant, ed_secret(tenant, 1))], [])
    assert excluded.domains == ()
    assert excluded.excluded[0].reason == "VerificationSkipNotAllowed"

    assert ownership.skip_allowed(r, "mail", {})
    allowing = relay(**OPEN_RELAY, tenancy={"verificationSkipNamespaces": GRANT_SHOP})
    assert ownership.skip_allowed(allowing, "shop", LABELS["shop"])
    assert not ownership.skip_allowed(allowing, "billing", LABELS["billing"])
    assert run(allowing, [render.DomainInput(tenant, ed_secret(tenant, 1))], []).domains == (
        "example.com",)


# --------------------------------------------------------------------------------------------
# DNS tolerance
# --------------------------------------------------------------------------------------------


def _cond(result: dm.DomainResult, type_: str) -> tuple[str, str, str]:
    c = get_condition(result.status["conditions"], type_)
    assert c is not None
    return c["status"], c["reason"], c["message"]


def _verified_domain() -> tuple[models.SendingDomain, dm.DomainResult, dict[str, Any]]:
    d = claim("mail", dkim={"selector": "mp", "algorithm": "ed25519"})
    first = dm.reconcile_domain(d, relay=relay(), namespace_labels={}, existing_secret=None,
                                observed=None, now=NOW,
                                key_factory=dm.random_key_factory(counting_random()))
    good: dict[str, Any] = {r["name"]: [r["value"]] for r in first.status["dnsRecords"]}
    good["example.com"] = ["v=spf1 mx ~all"]
    ok = _step(d, first, good, NOW)
    assert ok.enabled and ok.status["verifiedTime"] == format_time(NOW)
    return d, ok, good


def _step(d: models.SendingDomain, last: dm.DomainResult, observed: Any, now: Any,
          errors: dict[str, str] | None = None) -> dm.DomainResult:
    current = models.SendingDomain(d.meta, d.spec, last.status)
    return dm.reconcile_domain(current, relay=relay(), namespace_labels={},
                               existing_secret=last.secret, observed=observed, now=now,
                               lookup_errors=errors)


def test_a_failed_lookup_leaves_a_verified_domain_enabled() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    failed = _step(d, ok, {**good, name: None, "example.com": None}, NOW + timedelta(hours=1),
                   {name: "no nameserver answered (SERVFAIL or refused)"})
    assert failed.enabled
    status, reason, message = _cond(failed, "DNSVerified")
    assert (status, reason) == ("Unknown", "DNSLookupFailed")
    assert "SERVFAIL" in message and "stays enabled" in message
    assert _cond(failed, "Ready")[0] == "True"
    assert "disableTime" not in failed.status
    # Even for longer than the grace period.
    still = _step(d, failed, {**good, name: None}, NOW + timedelta(days=30))
    assert still.enabled


def test_records_gone_disable_only_after_the_grace_period() -> None:
    d, ok, good = _verified_domain()
    name = "mp._domainkey.example.com"
    gone = {**good, name: []}
    t1 = NOW + timedelta(hours=1)
    missing = _step(d, ok, gone, t1)
    assert missing.enabled
    assert missing.status["recordsMissingSince"] == format_time(t1)
    assert missing.status["disableTime"] == format_time(t1 + timedelta(hours=72))
    assert missing.disable_time == t1 + timedelta(hours=72)
    assert missing.next_check == t1 + timedelta(hours=72)
    assert "DNSRecordsMissing" in [e.reason for e in missing.events if e.type == "Warning"]
    assert _cond(missing, "DNSVerified")[:2] == ("False", "RecordNotFound")
    later = _step(d, missing, gone, t1 + timedelta(hours=71))
    assert later.enabled and "DNSRecordsMissing" not in [e.reason for e in later.events]
    assert later.status["disableTime"] == missing.status["disableTime"]
    disabled = _step(d, later, gone, t1 + timedelta(hours=72))
    assert not disabled.enabled
    assert "DomainDisabled" in [e.reason for e in disabled.events]
    assert "verifiedTime" not in disabled.status and "disableTime" not in disabled.status


def test_records_back_within_the_grace_period_end_it() -> None:
    d, ok, good = _verified_domain()
    missing = _step(d, ok, {**good, "mp._domainkey.example.com": []}, NOW + timedelta(hours=1))
    back = _step(d, missing, good, NOW + timedelta(hours=2))
    assert back.enabled and "disableTime" not in back.status
    assert "DNSRecordsRestored" in [e.reason for e in back.events]
    assert back.status["verifiedTime"] == format_time(NOW)


def test_the_grace_period_is_the_platforms_setting() -> None:
    d, ok, good = _verified_domain()
    short = relay(tenancy={"dnsGracePeriod": "1h"})
    current = models.SendingDomain(d.meta, d.spec, ok.status)
    missing = dm.reconcile_domain(current, relay=short, namespace_labels={},
                                  existing_secret=ok.secret,
                                  observed={**good, "mp._domainkey.example.com": []},
                                  now=NOW)
    assert missing.status["disableTime"] == format_time(NOW + timedelta(hours=1))


def test_spf_and_dmarc_changes_never_disable() -> None:
    d, ok, good = _verified_domain()
    edited = {**good, "example.com": ["v=spf1 -all", "v=spf1 mx ~all"],
              "_dmarc.example.com": []}
    result = _step(d, ok, edited, NOW + timedelta(days=10))
    result = _step(d, result, edited, NOW + timedelta(days=20))
    assert result.enabled and "disableTime" not in result.status
    assert _cond(result, "SPFVerified")[:2] == ("False", "RecordMismatch")
    assert "SPF (shown, not enforced)" in _cond(result, "Ready")[2]


def test_editing_the_domain_name_drops_the_verification() -> None:
    _d, ok, _good = _verified_domain()
    renamed = claim("mail", domain_name="example.org", status=ok.status,
                    dkim={"selector": "mp", "algorithm": "ed25519"})
    result = dm.reconcile_domain(renamed, relay=relay(), namespace_labels={},
                                 existing_secret=ok.secret, observed=None, now=NOW)
    assert not result.enabled and "verifiedTime" not in result.status


def test_a_hand_edited_dkim_key_excludes_only_its_own_domain() -> None:
    """The DKIM Secret is in the tenant's namespace: whatever it holds must not reach the relay
    unless it is a key of the domain's algorithm, and must not stop the render of the others."""
    r = relay(**OPEN_RELAY)
    broken = claim("shop", status=verified_status())
    secret = ed_secret(broken, 1)
    secret["data"]["mp.pem"] = base64.b64encode(
        dm.generate_dkim_key("rsa-2048").encode()).decode()  # not the ed25519 it claims
    other = claim("billing", domain_name="example.org", status=verified_status("example.org"))
    result = run(r, [render.DomainInput(broken, secret),
                     render.DomainInput(other, ed_secret(other, 2))], [])
    assert result.domains == ("example.org",)
    excluded = result.exclusion("SendingDomain", "shop/dom")
    assert excluded is not None and excluded.reason == "DKIMSecretUnreadable"
    assert "Secret shop/dom-dkim" in excluded.message
    with pytest.raises(dm.DKIMSecretUnreadable, match="restore the Secret"):
        dm.reconcile_domain(broken, relay=r, namespace_labels={}, existing_secret=secret,
                            observed=None, now=NOW)


def test_a_domain_verified_by_an_earlier_version_stays_verified() -> None:
    """Statuses written before verifiedTime existed: Ready=True, Verified counts, so an upgrade
    does not disable every domain until its next DNS check, even when that check fails."""
    old_status = {"domain": "example.com", "conditions": [{
        "type": "Ready", "status": "True", "reason": "Verified", "message": "",
        "observedGeneration": 1, "lastTransitionTime": "2026-10-01T00:00:00Z"}]}
    legacy = claim("mail", status=old_status, dkim={"selector": "mp", "algorithm": "ed25519"})
    assert ownership.claim_verified(legacy, relay(), {})
    secret = ed_secret(legacy, 3)
    failed = dm.reconcile_domain(legacy, relay=relay(), namespace_labels={},
                                 existing_secret=secret,
                                 observed={"mp._domainkey.example.com": None}, now=NOW)
    assert failed.enabled and failed.status["verifiedTime"] == "2026-10-01T00:00:00Z"
    skipped = claim("mail", status={**old_status, "conditions": [
        {**old_status["conditions"][0], "reason": "VerificationSkipped"}]})
    assert not ownership.claim_verified(skipped, relay(), {}), "a skip is no verification"
