"""Dual DKIM signing (RFC 8463, ``dkim.algorithm: rsa-2048+ed25519``): two keys, two records to
publish, the second key signing only once DNS serves it, each key rotated in stages."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest

from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile import render
from mailplane_relay.config import Domain
from tests.operator.reconcile_builders import NOW, domain
from tests.operator.test_reconcile_domain import cond, key_factory, reconcile, serving

DUAL: dict[str, Any] = {"dkim": {"selector": "mp", "algorithm": "rsa-2048+ed25519",
                                 "rotationInterval": "720h", "retireAfter": "168h"}}


def selectors(result: dm.DomainResult) -> dict[str, str]:
    return {r["selector"]: r["state"] for r in result.status["dnsRecords"] if r.get("selector")}


def test_dual_signing_publishes_two_keys_and_signs_with_the_second_once_dns_serves_it() -> None:
    d = domain(**DUAL)
    factory = key_factory()
    first = reconcile(d, None, factory=factory)
    assert set(first.secret["data"]) == {"mp.pem", "mp-ed25519.pem"}
    assert [e.reason for e in first.events] == ["DKIMKeyGenerated", "DKIMKeyGenerated"]
    records = {r["selector"]: r["value"] for r in first.status["dnsRecords"]
               if r.get("selector")}
    assert records["mp"].startswith("v=DKIM1; k=rsa; p=")
    assert records["mp-ed25519"].startswith("v=DKIM1; k=ed25519; p=")
    assert dm.names_to_check(d, first.secret) == [
        "mp._domainkey.example.com", "mp-ed25519._domainkey.example.com", "example.com",
        "_dmarc.example.com"]
    assert first.status["dkim"]["algorithm"] == "rsa-2048"
    assert first.status["dkim"]["second"]["signing"] is False

    # DNS serves the RSA record only: the domain is enabled, signing with RSA alone.
    rsa_only = reconcile(d, first.secret, serving(first, selectors=("mp",)), factory=factory)
    assert rsa_only.enabled and cond(rsa_only, "DKIMVerified") == ("True", "Verified")
    assert rsa_only.signing.selector == "mp" and rsa_only.signing.also is None
    assert dm.signing_from_secret(rsa_only.secret).also is None  # type: ignore[union-attr]

    # Both served: Ed25519 signs too, from now on (the state is kept in the Secret).
    both = reconcile(d, rsa_only.secret, serving(rsa_only), factory=factory)
    assert [e.reason for e in both.events if e.reason.startswith("DKIM")] == [
        "DKIMSecondKeySigning"]
    assert both.status["dkim"]["second"]["signing"] is True
    signing = dm.signing_from_secret(both.secret)
    assert signing is not None and signing.also is not None
    assert (signing.algorithm, signing.also.algorithm) == ("rsa-sha256", "ed25519-sha256")
    assert signing.also.selector == "mp-ed25519"
    state = json.loads(both.secret["metadata"]["annotations"][dm.ANN_DKIM_SECOND_STATE])
    assert state["published"] is True
    # A later lookup failure does not take the signature away.
    later = reconcile(d, both.secret, {}, factory=factory)
    assert later.signing.also is not None

    # The relay's configuration entry carries both keys, and the relay accepts it.
    entry = render._domain_entry("example.com", signing)
    parsed = Domain.model_validate(entry)
    assert [(k.selector, k.algorithm) for k in parsed.dkim_keys] == [
        ("mp", "rsa-sha256"), ("mp-ed25519", "ed25519-sha256")]
    assert "PRIVATE KEY" not in repr(both.signing)


def test_each_key_of_a_dual_signing_domain_rotates_in_stages() -> None:
    d = domain(**DUAL)
    factory = key_factory()
    first = reconcile(d, None, factory=factory)
    stable = reconcile(d, first.secret, serving(first), factory=factory)
    assert stable.next_check == NOW + timedelta(days=30)

    t1 = NOW + timedelta(days=30)
    started = reconcile(d, stable.secret, serving(stable), now=t1, factory=factory)
    assert [e.reason for e in started.events if e.reason.startswith("DKIM")] == [
        "DKIMRotationStarted", "DKIMRotationStarted"]
    assert selectors(started) == {"mp": "active", "mp-20261227": "next",
                                  "mp-ed25519": "active", "mp-ed25519-20261227": "next"}
    assert "mp-ed25519-20261227._domainkey.example.com" in dm.names_to_check(d, started.secret)
    # Only the RSA successor is served: RSA switches, Ed25519 keeps its key and keeps signing.
    served = serving(started, selectors=("mp", "mp-20261227", "mp-ed25519"))
    half = reconcile(d, started.secret, served, now=t1 + timedelta(hours=1), factory=factory)
    assert half.signing.selector == "mp-20261227"
    assert half.signing.also is not None and half.signing.also.selector == "mp-ed25519"
    assert half.status["dkim"]["second"]["phase"] == "NextKeyPublished"
    done = reconcile(d, half.secret, serving(half), now=t1 + timedelta(hours=2),
                     factory=factory)
    assert done.signing.also is not None
    assert done.signing.also.selector == "mp-ed25519-20261227"
    assert selectors(done) == {"mp-20261227": "active", "mp": "retiring",
                               "mp-ed25519-20261227": "active", "mp-ed25519": "retiring"}
    # Retirement of both old keys after retireAfter.
    retired = reconcile(d, done.secret, serving(done), now=t1 + timedelta(days=8),
                        factory=factory)
    assert set(retired.secret["data"]) == {"mp-20261227.pem", "mp-ed25519-20261227.pem"}


def test_moving_from_ed25519_to_dual_and_back() -> None:
    factory = key_factory()
    single = domain(dkim={"selector": "mp", "algorithm": "ed25519"})
    first = reconcile(single, None, factory=factory)
    ok = reconcile(single, first.secret, serving(first), factory=factory)
    dual = domain(dkim={"selector": "mp", "algorithm": "rsa-2048+ed25519"})
    moved = reconcile(dual, ok.secret, serving(ok), factory=factory)
    # The first key rotates to RSA in stages; the Ed25519 key of its own appears beside it.
    assert moved.status["dkim"]["phase"] == "NextKeyPublished"
    assert moved.state.keys[moved.state.next or ""].algorithm == "rsa-2048"
    assert moved.second is not None and moved.second.active == "mp-ed25519"
    assert moved.signing.algorithm == "ed25519-sha256" and moved.signing.also is None
    # Back to RSA alone: the second key is dropped with an Event.
    back = reconcile(domain(dkim={"selector": "mp", "algorithm": "rsa-2048"}), moved.secret,
                     serving(moved), factory=factory)
    assert "DKIMKeyRetired" in [e.reason for e in back.events]
    assert dm.ANN_DKIM_SECOND_STATE not in back.secret["metadata"]["annotations"]
    assert not any(s.startswith("mp-ed25519") for s in back.secret["data"])
    assert back.second is None and back.signing.also is None


def test_a_second_key_state_naming_an_unknown_algorithm_makes_the_secret_unreadable() -> None:
    d = domain(**DUAL)
    first = reconcile(d, None, factory=key_factory())
    secret = json.loads(json.dumps(first.secret))
    ann = secret["metadata"]["annotations"]
    state = json.loads(ann[dm.ANN_DKIM_SECOND_STATE])
    state["keys"]["mp-ed25519"]["algorithm"] = "ed448"  # a tenant's hand edit
    ann[dm.ANN_DKIM_SECOND_STATE] = json.dumps(state)
    assert dm.signing_from_secret(secret) is None  # the render leaves the domain out
    with pytest.raises(dm.DKIMSecretUnreadable):
        dm.state_from_secret(secret, dm.ANN_DKIM_SECOND_STATE)
