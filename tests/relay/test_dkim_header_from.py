"""The header From domain (which key signs, and the alignment receivers check), key loading and
signing failures: the edge cases a hostile or sloppy message brings, and what an operator reads
when a key or a message cannot be signed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from mailplane_relay.dkim import (
    DKIMKeyError,
    DKIMSigner,
    header_from_domain,
    parse_private_key,
    public_key_record,
)
from mailplane_relay.metrics import RelayMetrics
from tests.relay.test_dkim_signer import (
    MESSAGE,
    dkim_domain,
    ed25519_pem,
    relay_config,
    rsa_pem,
)


def test_a_from_line_in_the_body_is_never_the_header_from() -> None:
    # The header has no From; the body holds one between two blank lines.
    message = b"Subject: s\r\n\r\nFrom: evil@evil.example\r\n\r\nrest\r\n"
    assert header_from_domain(message) is None


def test_from_as_the_last_header_line_is_read_whole() -> None:
    assert header_from_domain(b"Subject: s\r\nFrom: a@last.example\r\n\r\nbody\r\n") == \
        "last.example"


def test_a_message_of_headers_only_is_read() -> None:
    assert header_from_domain(b"Subject: s\r\nFrom: a@only.example\r\n") == "only.example"


@pytest.mark.parametrize("from_field", [
    b"From: J\xf6rg <joerg@latin1.example>",  # not UTF-8: the simple scan
    b'From: "J\xf6rg, Dept." <joerg@latin1.example>',  # not UTF-8: the full parser
])
def test_from_fields_that_are_not_utf8_still_give_the_domain(from_field: bytes) -> None:
    assert header_from_domain(b"Subject: s\r\n" + from_field + b"\r\n\r\nbody\r\n") == \
        "latin1.example"


@pytest.mark.parametrize(("from_field", "domain"), [
    (b'From: "Doe, Jane" <jane@trailing.example.>', "trailing.example"),
    (b'From: "Doe, Jane" <"a@b"@quoted-local.example>', "quoted-local.example"),
])
def test_full_parser_edge_cases(from_field: bytes, domain: str) -> None:
    assert header_from_domain(b"Subject: s\r\n" + from_field + b"\r\n\r\nbody\r\n") == domain


def _pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def test_key_errors_name_the_problem() -> None:
    with pytest.raises(DKIMKeyError, match=r"^algorithm rsa-sha256 needs an RSA private key$"):
        parse_private_key(ed25519_pem(), "rsa-sha256")
    with pytest.raises(DKIMKeyError,
                       match=r"^algorithm ed25519-sha256 needs an Ed25519 private key$"):
        parse_private_key(rsa_pem(), "ed25519-sha256")
    with pytest.raises(DKIMKeyError, match=r"^unknown DKIM algorithm 'rsa-sha1'$"):
        parse_private_key(rsa_pem(), "rsa-sha1")
    with pytest.raises(DKIMKeyError,
                       match=r"^not a PEM private key without passphrase \(ValueError\)$"):
        parse_private_key(b"-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----\n",
                          "rsa-sha256")


def test_a_1024_bit_rsa_key_is_the_shortest_accepted() -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    assert parse_private_key(_pem(key), "rsa-sha256").key_size == 1024


def test_a_short_rsa_key_is_refused_with_its_size() -> None:
    # cryptography will not make a key this short; OpenSSL still will (as an old key would be).
    pem = subprocess.run(["openssl", "genrsa", "512"], capture_output=True, check=True).stdout
    with pytest.raises(DKIMKeyError, match=r"^RSA key of 512 bits is too short \(min 1024\)$"):
        parse_private_key(pem, "rsa-sha256")


def test_a_signing_failure_sends_unsigned_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    metrics = RelayMetrics.create()
    signer = DKIMSigner(metrics=metrics)
    config = relay_config([dkim_domain("example.com", "s1", rsa_pem())])
    broken = b"this line is no header\r\nFrom: a@example.com\r\n\r\nbody\r\n"
    assert signer.sign(config, broken, "example.com") is broken
    assert metrics.registry.get_sample_value(
        "mailplane_relay_dkim_signatures_total",
        {"algorithm": "rsa-sha256", "result": "error"}) == 1
    [record] = [r for r in caplog.records if r.name == "mailplane_relay.dkim"]
    assert record.levelname == "WARNING"
    assert record.getMessage() == (
        "DKIM signing for example.com (rsa-sha256) failed, sending without this signature: "
        "MessageFormatError")


def test_an_unusable_key_is_reported_once_per_configuration(
        caplog: pytest.LogCaptureFixture) -> None:
    signer = DKIMSigner(metrics=RelayMetrics.create())
    config = relay_config([dkim_domain("example.com", "s1", ed25519_pem(), "rsa-sha256")])
    for _ in range(3):
        assert signer.sign(config, MESSAGE, "example.com") is MESSAGE
    [record] = [r for r in caplog.records if r.name == "mailplane_relay.dkim"]
    assert record.getMessage() == (
        "DKIM key for example.com (selector s1) unusable, its mail goes out without this "
        "signature: "
        "algorithm rsa-sha256 needs an RSA private key")


def test_a_key_file_is_read_relative_to_the_key_directory(tmp_path: Path) -> None:
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "example.pem").write_bytes(rsa_pem())
    signer = DKIMSigner(metrics=RelayMetrics.create(), key_base=tmp_path / "keys")
    config = relay_config([{"name": "example.com",
                            "dkim": {"selector": "s1", "privateKeyFile": "example.pem"}}])
    assert signer.sign(config, MESSAGE, "example.com").startswith(b"DKIM-Signature: ")


def test_domains_sharing_key_material_parse_it_once() -> None:
    pem = rsa_pem()
    signer = DKIMSigner(metrics=RelayMetrics.create())
    config = relay_config([dkim_domain("example.com", "s1", pem),
                           dkim_domain("example.org", "s1", pem)])
    assert b"d=example.com" in signer.sign(config, MESSAGE, "example.com")
    other = MESSAGE.replace(b"alice@example.com", b"alice@example.org")
    assert b"d=example.org" in signer.sign(config, other, "example.org")
    assert signer.parsed_keys == 1


def test_only_rsa_and_ed25519_keys_can_be_published() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    with pytest.raises(DKIMKeyError,
                       match=r"^only RSA and Ed25519 keys can be published for DKIM$"):
        public_key_record(pem)


def test_an_rsa_key_over_4096_bits_is_refused_and_4096_accepted() -> None:
    longest = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    assert parse_private_key(_pem(longest), "rsa-sha256").key_size == 4096
    too_long = rsa.generate_private_key(public_exponent=65537, key_size=4104)
    with pytest.raises(DKIMKeyError, match=r"^RSA key of 4104 bits is too long \(max 4096"):
        parse_private_key(_pem(too_long), "rsa-sha256")
