"""DKIMSigner: signatures made through OpenSSL verify with dkimpy against a real DNS server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailplane_relay.config import RelayConfig, RelaySettings
from mailplane_relay.dkim import DKIMSigner, header_from_domain, public_key_record
from mailplane_relay.metrics import RelayMetrics

MESSAGE = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: Quarterly   report\r\n"
    b"Date: Fri, 27 Nov 2026 14:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"X-Not-Signed: yes\r\n"
    b"\r\n"
    b"Hello  Bob, \r\n"
    b"\r\n"
    b"see you.\r\n\r\n\r\n"
)


def rsa_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def ed25519_pem() -> bytes:
    return ed25519.Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())


def relay_config(domains: list[dict[str, Any]]) -> RelayConfig:
    settings = RelaySettings.model_validate({
        "tls": {"certFile": "/nonexistent/cert.pem", "keyFile": "/nonexistent/key.pem"},
        "domains": domains,
    })
    return RelayConfig(settings=settings)


def dkim_domain(name: str, selector: str, pem: bytes, algorithm: str = "rsa-sha256",
                **extra: Any) -> dict[str, Any]:
    return {"name": name, "dkim": {"selector": selector, "algorithm": algorithm,
                                   "privateKey": pem.decode(), **extra}}


def signatures(metrics: RelayMetrics, algorithm: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "mailplane_relay_dkim_signatures_total", {"algorithm": algorithm, "result": result})
    return value or 0.0


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_signature_verifies_with_dkimpy_through_dns(dns_server: Any, algorithm: str) -> None:
    pem = rsa_pem() if algorithm == "rsa-sha256" else ed25519_pem()
    dns_server.add_txt("s1._domainkey.example.com", public_key_record(pem))
    metrics = RelayMetrics.create()
    signer = DKIMSigner(metrics=metrics, clock=lambda: 1_790_000_000.0)
    config = relay_config([dkim_domain("example.com", "s1", pem, algorithm)])

    signed = signer.sign(config, MESSAGE, "example.com")

    assert signed.startswith(b"DKIM-Signature: ")
    assert signed.endswith(MESSAGE)
    assert dkim.verify(signed, dnsfunc=dns_server.dkim_dnsfunc)
    header = signed[: len(signed) - len(MESSAGE)].decode()
    assert f"a={algorithm}" in header and "c=relaxed/relaxed" in header
    assert "d=example.com" in header and "s=s1" in header and "t=1790000000" in header
    # Present configured headers signed, the standard set over-signed (listed once more than
    # present, once when absent, so none can be added), unlisted ones (x-not-signed) left out.
    h_tag = "".join(header.split("h=", 1)[1].split(";", 1)[0].split())
    assert h_tag == ("from:from:to:to:cc:subject:subject:date:date:message-id:message-id:"
                     "reply-to:mime-version:mime-version:content-type:content-type:"
                     "content-transfer-encoding:list-unsubscribe:list-unsubscribe-post")
    assert signatures(metrics, algorithm, "ok") == 1
    # The TXT record was fetched from the loopback server, not from anywhere else.
    assert ("s1._domainkey.example.com.", "TXT", "udp") in dns_server.queries()


def test_tampering_and_added_from_break_the_signature(dns_server: Any) -> None:
    pem = rsa_pem()
    dns_server.add_txt("s1._domainkey.example.com", public_key_record(pem))
    signer = DKIMSigner(metrics=RelayMetrics.create())
    signed = signer.sign(relay_config([dkim_domain("example.com", "s1", pem)]), MESSAGE,
                         "example.com")
    assert dkim.verify(signed, dnsfunc=dns_server.dkim_dnsfunc)
    assert not dkim.verify(signed.replace(b"see you.", b"see you!"),
                           dnsfunc=dns_server.dkim_dnsfunc)
    assert not dkim.verify(signed.replace(b"Quarterly", b"Annual"),
                           dnsfunc=dns_server.dkim_dnsfunc)
    assert not dkim.verify(b"From: mallory@evil.test\r\n" + signed,
                           dnsfunc=dns_server.dkim_dnsfunc)
    # Relaxed canonicalisation survives whitespace changes a relay might make.
    assert dkim.verify(signed.replace(b"Subject: Quarterly   report", b"Subject: Quarterly report"),
                       dnsfunc=dns_server.dkim_dnsfunc)


def test_domain_without_key_is_sent_unsigned() -> None:
    metrics = RelayMetrics.create()
    signer = DKIMSigner(metrics=metrics)
    config = relay_config([{"name": "example.com"}])
    assert signer.sign(config, MESSAGE, "example.com") is MESSAGE
    assert signatures(metrics, "rsa-sha256", "ok") == 0


def test_from_header_domain_and_parent_chosen_before_envelope_domain(dns_server: Any) -> None:
    parent, envelope = ed25519_pem(), ed25519_pem()
    dns_server.add_txt("p._domainkey.example.com", public_key_record(parent))
    signer = DKIMSigner(metrics=RelayMetrics.create())
    config = relay_config([
        dkim_domain("example.com", "p", parent, "ed25519-sha256"),
        dkim_domain("bounces.example.org", "e", envelope, "ed25519-sha256"),
    ])
    message = MESSAGE.replace(b"alice@example.com", b"alice@mail.example.com")
    assert header_from_domain(message) == "mail.example.com"
    signed = signer.sign(config, message, "bounces.example.org")
    assert b"d=example.com" in signed and b"s=p;" in signed
    assert dkim.verify(signed, dnsfunc=dns_server.dkim_dnsfunc)
    # A From domain with no key at all falls back to the envelope sender's domain.
    other = MESSAGE.replace(b"alice@example.com", b"alice@elsewhere.test")
    assert b"d=bounces.example.org" in signer.sign(config, other, "bounces.example.org")


def test_keys_parsed_once_per_material_and_rotation_applies(dns_server: Any,
                                                            tmp_path: Path) -> None:
    old, new = rsa_pem(), rsa_pem()
    key_file = tmp_path / "example.com.pem"
    key_file.write_bytes(old)
    dns_server.add_txt("old._domainkey.example.com", public_key_record(old))
    dns_server.add_txt("new._domainkey.example.com", public_key_record(new))
    signer = DKIMSigner(metrics=RelayMetrics.create())
    v1 = relay_config([{"name": "example.com",
                        "dkim": {"selector": "old", "privateKeyFile": str(key_file)}}])
    first = signer.sign(v1, MESSAGE, "example.com")
    held = signer.key_for(v1, MESSAGE, "example.com")
    # Another configuration version with the same key material reuses the parsed key.
    v1b = relay_config([{"name": "example.com",
                         "dkim": {"selector": "old", "privateKeyFile": str(key_file)}}])
    again = signer.key_for(v1b, MESSAGE, "example.com")
    assert held is not None and again is not None
    assert again.private_key is held.private_key
    # Rotation: the next configuration names a new selector and key; the next signature
    # (of mail that may have been queued before) uses it, and the old key is dropped.
    v2 = relay_config([dkim_domain("example.com", "new", new)])
    second = signer.sign(v2, MESSAGE, "example.com")
    assert b"s=old;" in first and b"s=new;" in second
    assert dkim.verify(first, dnsfunc=dns_server.dkim_dnsfunc)
    assert dkim.verify(second, dnsfunc=dns_server.dkim_dnsfunc)
    assert signer.parsed_keys == 1


def test_unusable_key_sends_unsigned_and_logs_without_key_material(
        caplog: pytest.LogCaptureFixture) -> None:
    signer = DKIMSigner(metrics=RelayMetrics.create())
    wrong_type = ed25519_pem()
    config = relay_config([dkim_domain("example.com", "s1", wrong_type, "rsa-sha256")])
    assert signer.sign(config, MESSAGE, "example.com") is MESSAGE
    assert "needs an RSA private key" in caplog.text
    assert "PRIVATE KEY" not in caplog.text
    garbage = relay_config([dkim_domain("example.com", "s1", b"-----BEGIN PRIVATE KEY-----\nx")])
    assert signer.sign(garbage, MESSAGE, "example.com") is MESSAGE
    assert "not a PEM private key" in caplog.text


def test_keys_load_lazily_and_a_broken_key_falls_back_to_the_envelope_domain(
        dns_server: Any) -> None:
    good = ed25519_pem()
    dns_server.add_txt("e._domainkey.bounces.example.org", public_key_record(good))
    signer = DKIMSigner(metrics=RelayMetrics.create())
    config = relay_config([
        dkim_domain("example.com", "s1", b"not a key"),
        dkim_domain("bounces.example.org", "e", good, "ed25519-sha256"),
        dkim_domain("unused.example", "u", rsa_pem()),
    ])
    signed = signer.sign(config, MESSAGE, "bounces.example.org")
    assert b"d=bounces.example.org" in signed
    assert dkim.verify(signed, dnsfunc=dns_server.dkim_dnsfunc)
    # Only the key that was needed was parsed; unused.example's waits for its first message.
    assert signer.parsed_keys == 1


@pytest.mark.parametrize(("from_field", "domain"), [
    (b"From: alice@Example.COM", "example.com"),
    (b"From: Alice Example <alice@mail.example.com>", "mail.example.com"),
    (b"FROM:\r\n <alice@example.org.>", "example.org"),  # folded
    (b'From: "Doe, Jane" <jane@quoted.example>', "quoted.example"),  # the full parser
    (b"From: bob@first.example (Bob), carol@second.example", "first.example"),
    (b"From: =?utf-8?q?J=C3=B6rg?= <joerg@encoded.example>", "encoded.example"),
    (b"From: undisclosed-recipients:;", None),
    (b"From: no address here", None),
])
def test_header_from_domain_forms(from_field: bytes, domain: str | None) -> None:
    message = (b"Subject: s\r\n" + from_field
               + b"\r\nTo: x@y.example\r\n\r\nFrom: body@body.example\r\n")
    assert header_from_domain(message) == domain


def test_header_from_domain_with_two_from_fields_uses_the_full_parser() -> None:
    message = b"From: a@one.example\r\nFrom: b@two.example\r\n\r\nbody\r\n"
    assert header_from_domain(message) == "one.example"
    assert header_from_domain(b"\r\nFrom: a@body.example\r\n") is None  # no header at all
