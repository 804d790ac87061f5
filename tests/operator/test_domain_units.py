"""The domain reconciler's small parts, exactly: the keys it generates, the reason a render
gives for an unverified domain, and the signing keys read back from the DKIM Secret."""

from __future__ import annotations

from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailplane_operator.reconcile import domain as dm
from tests.operator.reconcile_builders import domain


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
