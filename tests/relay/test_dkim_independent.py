"""The relay's DKIM signatures verify with the verifiers receivers run, not only with dkimpy.

libopendkim (opendkim-testmsg), Perl's Mail::DKIM and Node's mailauth each canonicalise and
check signatures with their own code; the keys come from a real DNS server on loopback. A
message altered after signing must fail in every one of them, so a verifier that passes
everything would be caught. Ed25519 is also checked against the RFC 8463 example: the key and
message of its appendix A, and the signature it publishes.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from mailplane_relay.dkim import DKIMSigner, public_key_record
from mailplane_relay.metrics import RelayMetrics
from tests.helpers import dkimverify
from tests.helpers.dns import LoopbackDNS, running_dns_server
from tests.relay.test_dkim_signer import dkim_domain, ed25519_pem, relay_config, rsa_pem

HEADERS = (
    b"From: Alice Example <alice@example.com>\r\n"
    b"To: bob@example.net,\r\n\t carol@example.net\r\n"
    b"subject:   Quarterly\t report \r\n"
    b"Date: Fri, 27 Nov 2026 14:00:00 +0000\r\n"
    b"Message-ID: <m1@example.com>\r\n"
    b"MIME-Version: 1.0\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Transfer-Encoding: 8bit\r\n"
    b"List-Unsubscribe: <https://example.com/u/1>\r\n"
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
    b"X-Not-Signed: yes\r\n"
    b"\r\n"
)

BODIES = {
    "plain": b"Hello  Bob, \r\n\r\nsee you.\r\n\r\n\r\n",
    "8bit": "Grüße aus Köln, à bientôt\r\n".encode() * 50,
    "empty": b"",
    "large": b"".join(b"line %06d with some text to canonicalise  \t\r\n" % i
                      for i in range(3000)),
}


@pytest.fixture(scope="module")
def port53_dns() -> Iterator[LoopbackDNS]:
    with running_dns_server(standard_port=True) as server:
        yield server


def sign(dns: LoopbackDNS, algorithm: str, selector: str, message: bytes) -> bytes:
    pem = rsa_pem() if algorithm == "rsa-sha256" else ed25519_pem()
    dns.add_txt(f"{selector}._domainkey.example.com", public_key_record(pem))
    signer = DKIMSigner(metrics=RelayMetrics.create())
    config = relay_config([dkim_domain("example.com", selector, pem, algorithm)])
    signed = signer.sign(config, message, "example.com")
    assert signed.startswith(b"DKIM-Signature: ")
    return signed


def tamper(signed: bytes) -> bytes:
    # One changed body byte: the body hash no longer matches.
    assert b"\r\n\r\n" in signed
    head, _, body = signed.partition(b"\r\n\r\n")
    return head + b"\r\n\r\n" + b"Tampered. " + body


@pytest.mark.parametrize("body", sorted(BODIES))
def test_rsa_signatures_verify_with_opendkim_mail_dkim_and_mailauth(
        port53_dns: LoopbackDNS, body: str) -> None:
    signed = sign(port53_dns, "rsa-sha256", f"rsa-{body}", HEADERS + BODIES[body])

    verdict = dkimverify.opendkim(signed, port53_dns)
    assert verdict.ok, verdict.detail
    verdict = dkimverify.mail_dkim(signed, port53_dns)
    assert verdict.ok, verdict.detail
    [result] = dkimverify.mailauth(signed, port53_dns)
    assert result["status"] == "pass", result
    assert result["algo"] == "rsa-sha256" and result["domain"] == "example.com"


@pytest.mark.parametrize("body", sorted(BODIES))
def test_ed25519_signatures_verify_with_mailauth(port53_dns: LoopbackDNS, body: str) -> None:
    signed = sign(port53_dns, "ed25519-sha256", f"ed-{body}", HEADERS + BODIES[body])
    [result] = dkimverify.mailauth(signed, port53_dns)
    assert result["status"] == "pass", result
    assert result["algo"] == "ed25519-sha256"


@pytest.mark.parametrize("algorithm", ["rsa-sha256", "ed25519-sha256"])
def test_every_verifier_fails_a_message_altered_after_signing(
        port53_dns: LoopbackDNS, algorithm: str) -> None:
    signed = tamper(sign(port53_dns, algorithm, f"tamper-{algorithm[:3]}",
                         HEADERS + BODIES["plain"]))
    [result] = dkimverify.mailauth(signed, port53_dns)
    assert result["status"] != "pass" and "did not verify" in result["comment"], result
    if algorithm == "rsa-sha256":
        assert not dkimverify.opendkim(signed, port53_dns).ok
        verdict = dkimverify.mail_dkim(signed, port53_dns)
        assert not verdict.ok and "signature rsa-sha256 fail" in verdict.detail, verdict.detail


def test_a_prepended_signed_header_breaks_the_signature(port53_dns: LoopbackDNS) -> None:
    """A second From (or any oversigned header) added in transit must not verify."""
    signed = sign(port53_dns, "rsa-sha256", "prepend", HEADERS + BODIES["plain"])
    forged = b"From: Mallory <ceo@example.com>\r\n" + signed
    [result] = dkimverify.mailauth(forged, port53_dns)
    assert result["status"] != "pass", result
    assert not dkimverify.mail_dkim(forged, port53_dns).ok


# RFC 8463 appendix A: the Ed25519 key, the message and its published signature.
RFC8463_SEED = base64.b64decode("nWGxne/9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A=")
RFC8463_PUBLIC = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo="
RFC8463_MESSAGE = (
    b"From: Joe SixPack <joe@football.example.com>\r\n"
    b"To: Suzie Q <suzie@shopping.example.net>\r\n"
    b"Subject: Is dinner ready?\r\n"
    b"Date: Fri, 11 Jul 2003 21:00:37 -0700 (PDT)\r\n"
    b"Message-ID: <20030712040037.46341.5F8J@football.example.com>\r\n"
    b"\r\n"
    b"Hi.\r\n"
    b"\r\n"
    b"We lost the game.  Are you hungry yet?\r\n"
    b"\r\n"
    b"Joe.\r\n"
)
RFC8463_SIGNATURE = (
    b"DKIM-Signature: v=1; a=ed25519-sha256; c=relaxed/relaxed;\r\n"
    b" d=football.example.com; i=@football.example.com;\r\n"
    b" q=dns/txt; s=brisbane; t=1528637909; h=from : to :\r\n"
    b" subject : date : message-id : from : subject : date;\r\n"
    b" bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=;\r\n"
    b" b=/gCrinpcQOoIfuHNQIbq4pgh9kyIK3AQUdt9OdqQehSwhEIug4D11Bus\r\n"
    b" Fa3bT3FY5OsU7ZbnKELq+eXdp1Q1Dw==\r\n"
)


def test_ed25519_against_the_rfc8463_example(port53_dns: LoopbackDNS) -> None:
    key = ed25519.Ed25519PrivateKey.from_private_bytes(RFC8463_SEED)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    # The key record the relay publishes for the RFC's key is the RFC's record.
    assert public_key_record(pem) == f"v=DKIM1; k=ed25519; p={RFC8463_PUBLIC}"
    port53_dns.add_txt("brisbane._domainkey.football.example.com",
                       f"v=DKIM1; k=ed25519; p={RFC8463_PUBLIC}")
    # The verifier accepts the RFC's own signed message (so it is a sound judge) ...
    [published] = dkimverify.mailauth(RFC8463_SIGNATURE + RFC8463_MESSAGE, port53_dns)
    assert published["status"] == "pass", published
    # ... and the relay's signature of the same message with the same key, whose body hash
    # must equal the RFC's.
    signer = DKIMSigner(metrics=RelayMetrics.create(), clock=lambda: 1528637909.0)
    config = relay_config([dkim_domain("football.example.com", "brisbane", pem,
                                       "ed25519-sha256")])
    ours = signer.sign(config, RFC8463_MESSAGE, "football.example.com")
    assert b"bh=2jUSOH9NhtVGCQWNr9BrIAPreKQjO6Sn7XIkfJVOzv8=" in ours.replace(b"\r\n ", b"")
    [result] = dkimverify.mailauth(ours, port53_dns)
    assert result["status"] == "pass", result


@pytest.mark.parametrize("added", [
    b"Subject: Your account is locked\r\n",  # a replayed message given a new subject
    b"To: victim@example.org\r\n",
    b"Reply-To: mallory@example.org\r\n",  # absent when signed: its absence is signed too
    b"Cc: victim@example.org\r\n",
    b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n",
])
def test_oversigned_headers_cannot_be_prepended(port53_dns: LoopbackDNS, added: bytes) -> None:
    message = HEADERS.replace(b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n", b"")
    selector = "over-" + added.split(b":")[0].lower().decode()  # a key of its own
    signed = sign(port53_dns, "rsa-sha256", selector, message + BODIES["plain"])
    assert dkimverify.mail_dkim(signed, port53_dns).ok
    forged = added + signed
    assert not dkimverify.opendkim(forged, port53_dns).ok
    assert not dkimverify.mail_dkim(forged, port53_dns).ok
    [result] = dkimverify.mailauth(forged, port53_dns)
    assert result["status"] != "pass", result


def test_one_click_unsubscribe_headers_are_signed_and_verify(port53_dns: LoopbackDNS) -> None:
    """RFC 8058: List-Unsubscribe and List-Unsubscribe-Post must both be covered."""
    signed = sign(port53_dns, "rsa-sha256", "oneclick", HEADERS + BODIES["plain"])
    dkim_header = signed.split(b"\r\n\r\n", 1)[0].split(b"\r\nFrom:", 1)[0]
    h_tag = dkim_header.replace(b"\r\n", b"").split(b" h=", 1)[1].split(b";", 1)[0]
    names = [n.strip() for n in h_tag.split(b":")]
    assert names.count(b"list-unsubscribe") == 2 and names.count(b"list-unsubscribe-post") == 2
    assert names.count(b"subject") == 2 and names.count(b"reply-to") == 1
    assert dkimverify.opendkim(signed, port53_dns).ok
    assert dkimverify.mail_dkim(signed, port53_dns).ok
    [result] = dkimverify.mailauth(signed, port53_dns)
    assert result["status"] == "pass", result


def dual_sign(dns: LoopbackDNS, tag: str, message: bytes) -> tuple[bytes, RelayMetrics]:
    rsa_key, ed_key = rsa_pem(), ed25519_pem()
    dns.add_txt(f"{tag}-rsa._domainkey.example.com", public_key_record(rsa_key))
    dns.add_txt(f"{tag}-ed._domainkey.example.com", public_key_record(ed_key))
    metrics = RelayMetrics.create()
    signer = DKIMSigner(metrics=metrics)
    domain = dkim_domain("example.com", f"{tag}-rsa", rsa_key, "rsa-sha256")
    domain["additionalDkim"] = [{"selector": f"{tag}-ed", "algorithm": "ed25519-sha256",
                                 "privateKey": ed_key.decode()}]
    signed = signer.sign(relay_config([domain]), message, "example.com")
    return signed, metrics


@pytest.mark.parametrize("body", ["plain", "8bit"])
def test_a_dual_signed_message_verifies_with_every_verifier(
        port53_dns: LoopbackDNS, body: str) -> None:
    """RFC 8463 dual signing: Mail::DKIM (no Ed25519 in Debian 12) passes the RSA signature,
    mailauth passes both, libopendkim passes."""
    message = HEADERS + BODIES[body]
    signed, metrics = dual_sign(port53_dns, f"dual-{body}", message)
    assert signed.count(b"DKIM-Signature: ") == 2 and signed.endswith(message)
    for algorithm in ("rsa-sha256", "ed25519-sha256"):
        assert metrics.registry.get_sample_value(
            "mailplane_relay_dkim_signatures_total",
            {"algorithm": algorithm, "result": "ok"}) == 1
    results = dkimverify.mailauth(signed, port53_dns)
    assert sorted((r["algo"], r["status"]) for r in results) == [
        ("ed25519-sha256", "pass"), ("rsa-sha256", "pass")], results
    lines = dkimverify.mail_dkim(signed, port53_dns).detail.splitlines()
    assert lines == ["signature ed25519-sha256 invalid (unsupported algorithm ed25519-sha256)",
                     "signature rsa-sha256 pass", "overall pass"], lines
    verdict = dkimverify.opendkim(signed, port53_dns)
    assert verdict.ok, verdict.detail


def test_a_dual_signed_message_altered_after_signing_fails_both(port53_dns: LoopbackDNS) -> None:
    signed, _ = dual_sign(port53_dns, "dual-tamper", HEADERS + BODIES["plain"])
    results = dkimverify.mailauth(tamper(signed), port53_dns)
    assert len(results) == 2 and all(r["status"] != "pass" for r in results), results
    assert "overall pass" not in dkimverify.mail_dkim(tamper(signed), port53_dns).detail
    assert not dkimverify.opendkim(tamper(signed), port53_dns).ok
