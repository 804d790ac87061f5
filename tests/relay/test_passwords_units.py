"""Password hashes of the relay configuration, checked against independently computed values:
the exact format of each scheme, which encodings verify, the message for a malformed hash, and
the rotation overlap's end."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from mailplane_relay.config import Credential, hash_password, verify_password

SALT = bytes(range(16))
EXPIRES = datetime(2030, 1, 1, tzinfo=UTC)


def sha256_hash(password: str, salt: bytes = SALT) -> str:
    return f"sha256${salt.hex()}${hashlib.sha256(salt + password.encode()).hexdigest()}"


def credential(**fields: Any) -> Credential:
    return Credential.model_validate(
        {"username": "app", "passwordHash": sha256_hash("current"),
         "allowedSenders": ["example.com"], **fields})


def test_sha256_hashes_are_salt_then_password() -> None:
    assert hash_password("pw", salt=SALT) == sha256_hash("pw")
    one, two = hash_password("pw"), hash_password("pw")
    assert one != two  # a fresh salt each time
    assert len(one.split("$")[1]) == 32  # 16 random bytes
    assert verify_password("pw", one) and verify_password("pw", two)


def test_scrypt_hashes_name_their_parameters() -> None:
    encoded = hash_password("pw", scheme="scrypt", salt=SALT)
    expected = hashlib.scrypt(b"pw", salt=SALT, n=2**14, r=8, p=1).hex()
    assert encoded == f"scrypt$16384$8$1${SALT.hex()}${expected}"
    assert verify_password("pw", encoded)
    assert not verify_password("pW", encoded)


def test_an_unknown_scheme_is_named() -> None:
    with pytest.raises(ValueError, match=r"^unknown password hash scheme 'md5': use 'sha256' "
                                         r"or 'scrypt'$"):
        hash_password("pw", scheme="md5")


@pytest.mark.parametrize("encoded", [
    "bogus", "", "sha256$00", f"md5${SALT.hex()}${hashlib.sha256(SALT + b'pw').hexdigest()}",
    f"sha256${SALT.hex()}${hashlib.sha256(SALT + b'pw').hexdigest()}$extra",
    "hash$16384$8$1$" + SALT.hex() + "$" + hashlib.scrypt(b"pw", salt=SALT, n=2**14, r=8,
                                                          p=1).hex(),
    "sha256$not-hex$00", "scrypt$x$8$1$00$00",
])
def test_only_well_formed_known_encodings_verify(encoded: str) -> None:
    assert verify_password("pw", encoded) is False


@pytest.mark.parametrize("bad", ["scrypt$00$11", "sha256$00$11$22", "scrypt$1", "md5$1$2$3$4$5",
                                 "plain", "sha256$00"])
def test_a_malformed_hash_is_refused_with_the_fix(bad: str) -> None:
    with pytest.raises(ValidationError) as err:
        credential(passwordHash=bad)
    assert ("a password hash looks like 'sha256$<salt>$<hex>' or "
            "'scrypt$<n>$<r>$<p>$<salt>$<hex>'; make one with `mailplane hash-password`"
            ) in str(err.value)


def test_well_formed_hashes_of_both_schemes_are_accepted() -> None:
    credential(passwordHash=hash_password("x", scheme="scrypt"))
    credential(passwordHash=hash_password("x"))


def test_the_previous_password_works_until_strictly_before_it_expires() -> None:
    cred = credential(previousPasswordHash=sha256_hash("old"), previousExpires=EXPIRES)
    assert cred.check_password("current", EXPIRES + timedelta(days=1))
    assert cred.check_password("old", EXPIRES - timedelta(microseconds=1))
    assert not cred.check_password("old", EXPIRES)
    assert not cred.check_password("wrong", EXPIRES - timedelta(days=1))


def test_an_expiry_without_a_previous_hash_lets_no_other_password_in() -> None:
    cred = credential(previousExpires=EXPIRES)
    assert not cred.check_password("wrong", EXPIRES - timedelta(days=1))
    assert cred.check_password("current", EXPIRES - timedelta(days=1))
