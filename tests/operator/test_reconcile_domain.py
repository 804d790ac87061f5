"""SendingDomain: DKIM keys, the DNS records to publish, verification conditions and the staged
key rotation, each step driven by an injected ``now`` and DNS answers."""

from __future__ import annotations

import base64
import json
from datetime import timedelta
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile import ownership
from mailplane_operator.reconcile.conditions import get_condition
from mailplane_operator.reconcile.models import owner_reference
from tests.operator.reconcile_builders import NOW, counting_random, domain, relay

RSA_PEM = dm.generate_dkim_key("rsa-2048")


def key_factory() -> dm.KeyFactory:
    """Ed25519 from a counting source (fast, distinct); RSA reuses one key generated once."""
    ed = dm.random_key_factory(counting_random())
    return lambda algorithm: RSA_PEM if algorithm == "rsa-2048" else ed(algorithm)


def reconcile(d: Any, secret: dict[str, Any] | None, observed: Any = None, *, now: Any = NOW,
              factory: dm.KeyFactory | None = None, r: Any = "default",
              labels: dict[str, str] | None = None) -> dm.DomainResult:
    return dm.reconcile_domain(d, relay=relay() if r == "default" else r,
                               namespace_labels=labels, existing_secret=secret,
                               observed=observed, now=now, key_factory=factory or key_factory())


def serving(result: dm.DomainResult, *, spf: str = "v=spf1 mx ~all",
            selectors: tuple[str, ...] | None = None) -> dict[str, list[str] | None]:
    """DNS answers that publish exactly what status.dnsRecords asks for."""
    out: dict[str, list[str] | None] = {}
    for rec in result.status["dnsRecords"]:
        if rec["purpose"] == "dkim" and (selectors is None or rec["selector"] in selectors):
            out[rec["name"]] = ["".join(rec["strings"])]
        elif rec["purpose"] == "dkim":
            out[rec["name"]] = []
    out["example.com"] = [spf, "google-site-verification=abc"]
    out["_dmarc.example.com"] = ["v=DMARC1; p=none"]
    return out


def cond(result: dm.DomainResult, type_: str) -> tuple[str, str]:
    c = get_condition(result.status["conditions"], type_)
    assert c is not None
    return c["status"], c["reason"]


def test_first_reconcile_generates_a_key_and_lists_the_records() -> None:
    d = domain(dkim={"selector": "mp", "algorithm": "ed25519"},
               dmarc={"policy": "quarantine", "rua": "mailto:d@example.com"},
               spf={"include": ["_spf.example.net"]})
    result = reconcile(d, None)
    secret = result.secret
    md = secret["metadata"]
    assert (md["name"], md["namespace"]) == ("example-com-dkim", "mail")
    assert md["ownerReferences"][0]["kind"] == "SendingDomain"
    assert set(secret["data"]) == {"mp.pem"}
    assert json.loads(md["annotations"][dm.ANN_DKIM_STATE])["phase"] == "Stable"
    assert [e.reason for e in result.events] == ["DKIMKeyGenerated"]
    records = {r["purpose"]: r for r in result.status["dnsRecords"]}
    assert records["dkim"]["name"] == "mp._domainkey.example.com"
    assert records["dkim"]["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert records["spf"]["value"] == "v=spf1 include:_spf.example.net ~all"
    assert records["dmarc"] == {
        "purpose": "dmarc", "type": "TXT", "name": "_dmarc.example.com",
        "value": "v=DMARC1; p=quarantine; rua=mailto:d@example.com",
        "strings": ["v=DMARC1; p=quarantine; rua=mailto:d@example.com"], "state": "suggested"}
    assert cond(result, "DKIMVerified") == ("Unknown", "NotChecked")
    assert cond(result, "Ready")[0] == "False" and not result.enabled
    assert result.status["dkim"]["activeSelector"] == "mp"
    assert dm.names_to_check(d, result.secret) == [
        "mp._domainkey.example.com", "example.com", "_dmarc.example.com"]


def test_rsa_records_are_split_into_255_character_strings() -> None:
    value = dm.dkim_txt_value(RSA_PEM)
    assert value.startswith("v=DKIM1; k=rsa; p=") and len(value) > 255
    strings = dm.split_txt(value)
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    assert "".join(strings) == value
    assert dm.split_txt("short") == ("short",)


@pytest.mark.parametrize("algorithm", ["rsa-2048", "ed25519"])
def test_the_published_record_verifies_signatures_made_with_the_key(algorithm: str) -> None:
    pem = key_factory()(algorithm)
    message = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nbody\r\n"
    key: bytes = pem.encode()
    if algorithm == "ed25519":  # dkimpy takes the raw seed, base64; the relay takes the PEM
        raw = serialization.load_pem_private_key(key, password=None).private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
            serialization.NoEncryption())
        key = base64.b64encode(raw)
    sig = dkim.sign(message, b"mp", b"example.com", key,
                    signature_algorithm=dm.RELAY_ALGORITHMS[algorithm].encode(),
                    include_headers=[b"from", b"to", b"subject"])
    txt = "".join(dm.split_txt(dm.dkim_txt_value(pem))).encode()
    assert dkim.verify(sig + message, dnsfunc=lambda name, timeout=5: txt)


def test_verified_dns_makes_the_domain_ready_and_enabled() -> None:
    d = domain()
    first = reconcile(d, None)
    checked = reconcile(d, first.secret, serving(first))
    assert cond(checked, "DKIMVerified") == ("True", "Verified")
    assert cond(checked, "SPFVerified") == ("True", "Verified")
    assert cond(checked, "Ready") == ("True", "Verified")
    assert checked.enabled
    assert all(r.get("verified") for r in checked.status["dnsRecords"])
    assert checked.status["lastCheckTime"] == "2026-11-27T12:00:00Z"
    assert checked.signing.selector == "mailplane"
    assert checked.signing.algorithm == "rsa-sha256"


def test_verification_failures_say_what_is_wrong() -> None:
    d = domain()
    first = reconcile(d, None)
    good = serving(first)
    name = "mailplane._domainkey.example.com"
    assert cond(reconcile(d, first.secret, {**good, name: []}), "DKIMVerified") == (
        "False", "RecordNotFound")
    other = dm.dkim_txt_value(key_factory()("ed25519"))
    assert cond(reconcile(d, first.secret, {**good, name: [other]}), "DKIMVerified") == (
        "False", "RecordMismatch")
    failed = reconcile(d, first.secret, {**good, name: None})
    assert cond(failed, "DKIMVerified") == ("Unknown", "DNSLookupFailed")
    assert cond(failed, "DNSVerified") == ("Unknown", "DNSLookupFailed")
    assert cond(failed, "Ready") == ("False", "DKIMNotVerified")
    # SPF findings are shown, never enforced: DKIM alone enables the domain.
    no_spf = reconcile(d, first.secret, {**good, "example.com": ["unrelated"]})
    assert cond(no_spf, "SPFVerified") == ("False", "RecordNotFound")
    assert cond(no_spf, "Ready") == ("True", "Verified")
    ready = get_condition(no_spf.status["conditions"], "Ready")
    assert ready is not None and "SPF (shown, not enforced): no SPF record" in ready["message"]
    two = reconcile(d, first.secret, {**good, "example.com": ["v=spf1 mx ~all", "v=spf1 -all"]})
    assert cond(two, "SPFVerified") == ("False", "RecordMismatch")


def test_spf_must_carry_every_mechanism_asked_for() -> None:
    d = domain(spf={"include": ["_spf.example.net"], "ip4": ["192.0.2.0/24"]})
    first = reconcile(d, None)
    partial = serving(first, spf="v=spf1 include:_spf.example.net ~all")
    result = reconcile(d, first.secret, partial)
    assert cond(result, "SPFVerified") == ("False", "RecordMismatch")
    assert "ip4:192.0.2.0/24" in get_condition(result.status["conditions"],
                                               "SPFVerified")["message"]  # type: ignore[index]
    full = serving(first, spf="v=spf1 ip4:192.0.2.0/24 include:_spf.example.net -all")
    assert cond(reconcile(d, first.secret, full), "SPFVerified")[0] == "True"
    exact = domain(spf={"record": "v=spf1 a -all"})
    first = reconcile(exact, None)
    assert cond(reconcile(exact, first.secret, serving(first, spf="v=spf1  a -all")),
                "SPFVerified")[0] == "True"


def test_events_only_when_a_verification_flips() -> None:
    d = domain()
    first = reconcile(d, None)
    checked = reconcile(d, first.secret, serving(first))
    assert sorted(e.reason for e in checked.events) == ["Verified", "Verified"]
    again = reconcile(domain(status=checked.status), checked.secret, serving(first),
                      now=NOW + timedelta(minutes=5))
    assert again.events == []
    ready = get_condition(again.status["conditions"], "Ready")
    assert ready is not None and ready["lastTransitionTime"] == "2026-11-27T12:00:00Z"


def test_skipped_verification_enables_without_dns() -> None:
    d = domain(verification={"skip": True})
    result = reconcile(d, None)
    assert result.enabled
    assert cond(result, "Ready") == ("True", "VerificationSkipped")
    assert ownership.claim_verified(domain(verification={"skip": True}), relay(), None)
    assert "verifiedTime" not in result.status, "a skip is no DNS verification to keep"


def test_relay_and_namespace_problems_block_readiness() -> None:
    d = domain(namespace="team", verification={"skip": True})
    assert cond(reconcile(d, None, r=None), "Ready") == ("False", "RelayNotFound")
    closed = reconcile(domain(namespace="team", relayRef={"name": "main", "namespace": "mail"},
                              verification={"skip": True}), None)
    assert cond(closed, "Ready") == ("False", "NamespaceNotAllowed")


def test_verification_is_read_back_from_the_last_status() -> None:
    d = domain()
    checked = reconcile(d, None)
    assert ownership.verified_since(domain(status=checked.status)) is None
    assert dm.unverified_reason(domain(status=checked.status)) == "DKIMNotVerified"
    first = reconcile(d, None)
    ok = reconcile(d, first.secret, serving(first))
    assert ownership.verified_since(domain(status=ok.status)) == NOW
    # Verified for example.com says nothing about another name put in spec.domain later.
    assert ownership.verified_since(domain("example.org", name="example-com",
                                           status=ok.status)) is None


def test_rotation_walks_through_every_stage_with_an_event_each() -> None:
    spec: dict[str, Any] = {"dkim": {"selector": "mp", "algorithm": "ed25519",
                                     "rotationInterval": "720h", "retireAfter": "168h"}}
    d = domain(**spec)
    factory = key_factory()
    t0 = NOW
    stable = reconcile(d, None, now=t0, factory=factory)
    assert stable.next_check == t0 + timedelta(days=30)
    old_pem = stable.secret["data"]["mp.pem"]
    assert reconcile(d, stable.secret, now=t0 + timedelta(days=29), factory=factory).events == []

    # 1. Interval passed: a new key under a new selector, published next to the active one.
    t1 = t0 + timedelta(days=30)
    started = reconcile(d, stable.secret, serving(stable), now=t1, factory=factory)
    assert [e.reason for e in started.events if e.reason.startswith("DKIM")] == [
        "DKIMRotationStarted"]
    assert started.status["dkim"]["phase"] == "NextKeyPublished"
    assert started.status["dkim"]["nextSelector"] == "mp-20261227"
    assert started.signing.selector == "mp"  # still signing with the old key
    states = {r["selector"]: r["state"] for r in started.status["dnsRecords"] if r.get("selector")}
    assert states == {"mp": "active", "mp-20261227": "next"}
    assert dm.names_to_check(d, started.secret)[:2] == [
        "mp._domainkey.example.com", "mp-20261227._domainkey.example.com"]

    # 2. DNS does not serve the new record yet: wait, quietly.
    waiting = reconcile(d, started.secret, serving(started, selectors=("mp",)),
                        now=t1 + timedelta(hours=1), factory=factory)
    assert waiting.status["dkim"]["phase"] == "NextKeyPublished"
    assert not [e for e in waiting.events if e.reason.startswith("DKIM")]

    # 3. DNS serves it: switch signing; the old record stays listed until retireAt.
    t3 = t1 + timedelta(hours=2)
    switched = reconcile(d, waiting.secret, serving(waiting), now=t3, factory=factory)
    assert [e.reason for e in switched.events if e.reason.startswith("DKIM")] == ["DKIMSwitched"]
    assert switched.signing.selector == "mp-20261227"
    assert switched.status["dkim"]["retiringSelector"] == "mp"
    assert switched.status["dkim"]["retireAt"] == "2027-01-03T14:00:00Z"
    assert switched.next_check == t3 + timedelta(days=7)
    states = {r["selector"]: r["state"] for r in switched.status["dnsRecords"]
              if r.get("selector")}
    assert states == {"mp-20261227": "active", "mp": "retiring"}
    assert switched.secret["data"]["mp.pem"] == old_pem

    # 4. Grace period over: the old key leaves the Secret and the record list.
    early = reconcile(d, switched.secret, now=t3 + timedelta(days=6), factory=factory)
    assert early.status["dkim"]["phase"] == "Switched"
    retired = reconcile(d, switched.secret, now=t3 + timedelta(days=7), factory=factory)
    assert [e.reason for e in retired.events] == ["DKIMKeyRetired"]
    assert set(retired.secret["data"]) == {"mp-20261227.pem"}
    assert [r["selector"] for r in retired.status["dnsRecords"] if r.get("selector")] == [
        "mp-20261227"]
    assert retired.status["dkim"]["phase"] == "Stable"
    # The next rotation is due an interval after the new key was made.
    assert retired.next_check == t1 + timedelta(days=30)


def test_on_demand_and_algorithm_change_start_a_rotation() -> None:
    d = domain(dkim={"algorithm": "ed25519"})
    stable = reconcile(d, None)
    asked = domain(dkim={"algorithm": "ed25519"}, annotations={dm.ANN_ROTATE: "now"})
    started = reconcile(asked, stable.secret, now=NOW + timedelta(minutes=1))
    assert started.status["dkim"]["phase"] == "NextKeyPublished"
    assert "requested" in started.events[0].message
    # Done once per token: after the whole cycle the same token does not start another.
    switched = reconcile(asked, started.secret, serving(started),
                         now=NOW + timedelta(minutes=2))
    retired = reconcile(asked, switched.secret, now=NOW + timedelta(days=8))
    assert retired.status["dkim"]["phase"] == "Stable"
    assert reconcile(asked, retired.secret, now=NOW + timedelta(days=9)).events == []

    to_rsa = domain(dkim={"algorithm": "rsa-2048"})
    changed = reconcile(to_rsa, stable.secret, now=NOW + timedelta(minutes=1))
    assert "algorithm changed from ed25519 to rsa-2048" in changed.events[0].message


def test_skipped_verification_switches_without_waiting_for_dns() -> None:
    d = domain(verification={"skip": True}, annotations={dm.ANN_ROTATE: "go"},
               dkim={"algorithm": "ed25519"})
    stable = reconcile(domain(verification={"skip": True}, dkim={"algorithm": "ed25519"}), None)
    started = reconcile(d, stable.secret)
    switched = reconcile(d, started.secret, now=NOW + timedelta(seconds=1))
    assert switched.status["dkim"]["phase"] == "Switched"


def test_private_keys_never_reach_status_or_events() -> None:
    d = domain()
    result = reconcile(d, None)
    exposed = json.dumps(result.status) + repr(result.events) + repr(result.state)
    exposed += repr(result.signing)
    assert "PRIVATE KEY" not in exposed
    assert RSA_PEM.splitlines()[1] not in exposed


def test_a_secret_without_our_state_means_a_new_key() -> None:
    assert dm.state_from_secret(None) is None
    d = domain()
    emptied = {"metadata": {"ownerReferences": [owner_reference("SendingDomain", d.meta)]},
               "data": {}}
    result = reconcile(d, emptied)
    assert [e.reason for e in result.events] == ["DKIMKeyGenerated"]
    # A Secret of that name made by someone else is never written (nor adopted).
    foreign = {"metadata": {"namespace": "mail", "name": "example-com-dkim"},
               "data": {"password": "aHVudGVyMg=="}}
    with pytest.raises(dm.DKIMSecretConflict, match="mail/example-com-dkim already exists"):
        reconcile(d, foreign)


def test_an_unreadable_secret_is_never_replaced() -> None:
    """Replacing it would silently break signing for selectors already published in DNS."""
    broken = {"metadata": {"namespace": "mail", "name": "example-com-dkim",
                           "labels": {dm.LABEL_DOMAIN: "example-com"},
                           "annotations": {dm.ANN_DKIM_STATE: "{"}}, "data": {}}
    with pytest.raises(dm.DKIMSecretUnreadable, match="restore the Secret from a backup"):
        dm.state_from_secret(broken)
    with pytest.raises(dm.DKIMSecretUnreadable, match="mail/example-com-dkim"):
        reconcile(domain(), broken)
    assert dm.signing_from_secret(broken) is None  # the relay render goes on without it


def test_a_tenant_key_outside_2048_to_4096_bits_is_not_usable() -> None:
    """The DKIM Secret is tenant-writable: a huge key would crowd other tenants out of the
    relay's configuration, and receivers need not verify keys over 4096 bits (RFC 8301)."""
    def pem(bits: int) -> str:
        key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
        return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()).decode()

    assert dm._usable_key(pem(4096), "rsa-2048")
    assert dm._usable_key(pem(2048), "rsa-2048")
    assert not dm._usable_key(pem(4104), "rsa-2048")
    assert not dm._usable_key(pem(1024), "rsa-2048")
