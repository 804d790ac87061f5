"""The domain reconciler's small parts, exactly: the keys it generates, the reason a render
gives for an unverified domain, and the signing keys read back from the DKIM Secret."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile.conditions import format_time
from tests.operator.reconcile_builders import NOW, domain
from tests.operator.test_reconcile_ownership import _cond, _step, _verified_domain


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
