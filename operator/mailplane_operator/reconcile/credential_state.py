"""The rotation state of an SmtpCredential, kept where its tenant cannot write it.

What decides which passwords the relay accepts and when the next rotation is due — the hash of
the current password, the previous hash with the end of its overlap window, when the password
was last rotated, the last on-demand rotation token handled — lives in one operator-owned
Secret per credential in the *relay's* namespace (the platform's): ``mailplane-credential-<uid>``,
labelled ``mailplane.io/component=credential-state`` and owned by the SmtpRelay. Tenants have no
access to that namespace, so they cannot forge it. It holds hashes only, never a password: the
one copy of the password is the application Secret in the tenant's namespace, which the operator
writes and reads back only to check it against the stored hash. A password there that does not
match (edited or deleted by hand) is never accepted: the operator issues a new one (keeping the
issued one valid for the overlap window, as in any rotation), so an edit breaks at worst that
tenant's own application. An operator restart finds everything in the state Secret.

Credentials created before this store existed kept their state in annotations on the
application Secret. Those are read once, when no state Secret exists yet and the application
Secret is the credential's own, and bounded so that a forged value gains nothing: the rotation
time is never later than now, and a previous hash is kept only for at most one overlap window
from now.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from mailplane_relay.config import hash_password, verify_password

from .conditions import format_time, parse_time
from .models import SmtpCredential, SmtpRelay, owner_reference

RandomBytes = Callable[[int], bytes]

LABEL_COMPONENT = "mailplane.io/component"
COMPONENT_STATE = "credential-state"
LABEL_CREDENTIAL_UID = "mailplane.io/credential-uid"
ANN_CREDENTIAL = "mailplane.io/credential"
"""On the state Secret: ``namespace/name`` of its SmtpCredential, for humans."""

# Keys of the state Secret's data.
KEY_HASH = "passwordHash"
KEY_PREVIOUS_HASH = "previousPasswordHash"
KEY_PREVIOUS_EXPIRES = "previousExpires"
KEY_ROTATED_AT = "rotatedAt"
KEY_ROTATION_REQUEST = "rotationRequest"
KEY_SERIAL = "passwordSerial"

# Annotations of the application Secret that held the state before (read once to migrate).
ANN_PASSWORD_HASH = "mailplane.io/password-hash"  # noqa: S105 - an annotation key
ANN_PREVIOUS_HASH = "mailplane.io/previous-password-hash"
ANN_PREVIOUS_EXPIRES = "mailplane.io/previous-expires"
ANN_ROTATED_AT = "mailplane.io/rotated-at"
ANN_ROTATION_REQUEST = "mailplane.io/rotation-request"
LEGACY_ANNOTATIONS = (ANN_PASSWORD_HASH, ANN_PREVIOUS_HASH, ANN_PREVIOUS_EXPIRES,
                      ANN_ROTATED_AT, ANN_ROTATION_REQUEST)

ANN_ROTATE = "mailplane.io/rotate"
"""Annotation on the SmtpCredential that asks for a rotation; its value is any new token."""
MAX_TOKEN = 256
"""Longer rotation tokens are kept as a digest (they are compared, never shown in full)."""

# Rotation causes (also the reason of the Event).
ROTATION_INITIAL = "PasswordGenerated"
ROTATION_SCHEDULED = "PasswordRotated"
ROTATION_REQUESTED = "PasswordRotationRequested"
ROTATION_REISSUED = "PasswordReissued"
"""The application Secret no longer holds the password issued (edited or deleted by hand)."""

_EPOCH = datetime.fromtimestamp(0, UTC)
_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def generate_password(random: RandomBytes = os.urandom) -> str:
    """32 random bytes (256 bits) as 43 letters and digits. Only alphanumerics: a password that
    starts with '-' is taken for an option by command-line clients (swaks, curl), and '_' or '/'
    need escaping in URLs."""
    number = int.from_bytes(random(32), "big")
    digits = []
    for _ in range(43):  # 62**43 > 2**256
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def hash_for_relay(password: str, random: RandomBytes = os.urandom) -> str:
    """The salted SHA-256 the relay verifies; fast on purpose, as the password is 256-bit random."""
    return hash_password(password, scheme="sha256", salt=random(16))


def well_formed_hash(value: str | None) -> bool:
    """A hash the relay's configuration accepts (``sha256$<hex salt>$<hex>``)."""
    if not value:
        return False
    parts = value.split("$")
    if parts[0] != "sha256" or len(parts) != 3:
        return False
    try:
        bytes.fromhex(parts[1])
        bytes.fromhex(parts[2])
    except ValueError:
        return False
    return len(parts[2]) == 64


@dataclass(frozen=True)
class CredentialState:
    """The rotation state of one credential: hashes and times, never a password."""

    password_hash: str
    rotated_at: datetime
    previous_hash: str | None = None
    previous_expires: datetime | None = None
    rotation_request: str | None = None
    serial: int = 0
    """The number of the rotation that issued ``password_hash`` (0: from before the count);
    orders the passwords pushed to the relay pods ahead of their configuration."""

    def __repr__(self) -> str:  # hashes stay out of logs too
        return (f"CredentialState(rotated_at={self.rotated_at!r}, "
                f"previous_expires={self.previous_expires!r}, serial={self.serial})")

    def issued(self, password: str | None) -> bool:
        """Whether ``password`` is the current one issued."""
        return bool(password) and verify_password(password or "", self.password_hash)

    def still_previous(self, password: str | None, now: datetime) -> bool:
        """Whether ``password`` is the previous one, within its overlap window."""
        return bool(password and self.previous_hash and self.previous_expires
                    and now < self.previous_expires
                    and verify_password(password, self.previous_hash))


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A Secret value from ``data`` (base64, as the API returns it) or ``stringData``."""
    data = secret.get("data") or {}
    if not isinstance(data, Mapping):
        return None
    if key in data:
        try:
            return base64.b64decode(str(data[key]), validate=True).decode()
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
    string_data = secret.get("stringData") or {}
    value = string_data.get(key) if isinstance(string_data, Mapping) else None
    return value if isinstance(value, str) else None


def _stable_hash(password: str, identity: str) -> str:
    """A hash of ``password`` salted from ``identity``: the same on every pass, so a render
    that has to recompute it does not rewrite the configuration each time."""
    salt = hashlib.sha256(b"mailplane-rehash\0" + identity.encode()).digest()
    return hash_for_relay(password, lambda n: salt[:n])


def _token(value: object) -> str | None:
    if not isinstance(value, str) or not value:
        return None
    if len(value) <= MAX_TOKEN:
        return value
    return "sha256:" + hashlib.sha256(value.encode()).hexdigest()


def state_secret_name(cred: SmtpCredential) -> str:
    """``mailplane-credential-<uid>``: one per SmtpCredential object, so a credential deleted
    and created again under the same name starts afresh."""
    return state_secret_name_of(
        cred.meta.uid or hashlib.sha256(cred.meta.key.encode()).hexdigest()[:32])


def state_secret_name_of(uid: str) -> str:
    return f"mailplane-credential-{uid}"


def state_from_store(secret: Mapping[str, Any] | None) -> CredentialState | None:
    """The state in the operator's state Secret; None when there is none or it holds no usable
    hash (the credential then gets a new password). Other damaged fields are dropped (a previous
    hash that is not a hash, a time that is not a time) rather than failing: the worst outcome
    is an earlier rotation."""
    if not secret:
        return None
    current = secret_value(secret, KEY_HASH) or ""
    if not well_formed_hash(current):
        return None
    previous = secret_value(secret, KEY_PREVIOUS_HASH)
    expires = parse_time(secret_value(secret, KEY_PREVIOUS_EXPIRES))
    keep = well_formed_hash(previous) and expires is not None
    return CredentialState(
        password_hash=current,
        rotated_at=parse_time(secret_value(secret, KEY_ROTATED_AT)) or _EPOCH,
        previous_hash=previous if keep else None,
        previous_expires=expires if keep else None,
        rotation_request=_token(secret_value(secret, KEY_ROTATION_REQUEST)),
        serial=_serial(secret_value(secret, KEY_SERIAL)),
    )


def _serial(value: str | None) -> int:
    try:
        return max(0, int(value or "0"))
    except ValueError:
        return 0


def state_from_legacy_secret(cred: SmtpCredential, secret: Mapping[str, Any] | None,
                             now: datetime) -> CredentialState | None:
    """The state an application Secret of an earlier version held in its annotations, bounded
    so that tenant-written values gain nothing: the rotation time is at most ``now`` (a later one
    would push the next rotation out) and a previous hash lasts at most one ``rotation.overlap``
    from ``now``. The caller checks that the Secret is the credential's own."""
    if not secret:
        return None
    password = secret_value(secret, "password")
    if not password:
        return None
    ann = (secret.get("metadata") or {}).get("annotations") or {}
    if not isinstance(ann, Mapping):
        ann = {}
    rotated_at = parse_time(ann.get(ANN_ROTATED_AT))
    rotated_at = min(rotated_at, now) if rotated_at is not None else now
    previous = ann.get(ANN_PREVIOUS_HASH)
    expires = parse_time(ann.get(ANN_PREVIOUS_EXPIRES))
    keep = (isinstance(previous, str) and well_formed_hash(previous) and expires is not None
            and now < expires)
    if keep and expires is not None:
        expires = min(expires, now + timedelta(seconds=cred.spec.rotation.overlap))
    return CredentialState(
        password_hash=_stable_hash(password, f"{cred.meta.uid}/{cred.secret_name}"),
        rotated_at=rotated_at,
        previous_hash=previous if keep and isinstance(previous, str) else None,
        previous_expires=expires if keep else None,
        rotation_request=_token(ann.get(ANN_ROTATION_REQUEST)),
    )


def state_manifest(cred: SmtpCredential, relay: SmtpRelay,
                   state: CredentialState) -> dict[str, Any]:
    """The operator-owned state Secret, in the relay's namespace: hashes and times only."""
    values = {KEY_HASH: state.password_hash, KEY_ROTATED_AT: format_time(state.rotated_at)}
    if state.previous_hash and state.previous_expires:
        values[KEY_PREVIOUS_HASH] = state.previous_hash
        values[KEY_PREVIOUS_EXPIRES] = format_time(state.previous_expires)
    if state.rotation_request:
        values[KEY_ROTATION_REQUEST] = state.rotation_request
    if state.serial:
        values[KEY_SERIAL] = str(state.serial)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": state_secret_name(cred),
            "namespace": relay.meta.namespace,
            "labels": {LABEL_COMPONENT: COMPONENT_STATE,
                       "app.kubernetes.io/managed-by": "mailplane-operator",
                       LABEL_CREDENTIAL_UID: cred.meta.uid[:63]},
            "annotations": {ANN_CREDENTIAL: cred.meta.key},
            "ownerReferences": [owner_reference("SmtpRelay", relay.meta)],
        },
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in values.items()},
    }


def rotation_due(cred: SmtpCredential, state: CredentialState | None,
                 now: datetime) -> str | None:
    """Why the password must change now (``ROTATION_*``), or None."""
    if state is None:
        return ROTATION_INITIAL
    token = _token(cred.meta.annotations.get(ANN_ROTATE))
    if token and token != state.rotation_request:
        return ROTATION_REQUESTED
    interval = cred.spec.rotation.interval
    if interval is not None and now >= state.rotated_at + timedelta(seconds=interval):
        return ROTATION_SCHEDULED
    return None


def rotate(cred: SmtpCredential, state: CredentialState | None, now: datetime,
           random: RandomBytes = os.urandom, *, in_use: str | None = None,
           ) -> tuple[CredentialState, str]:
    """A new password and the state that accepts it; the password the application may still be
    using stays accepted until the overlap ends. That is the current one, except when
    ``in_use`` (the application Secret's password) is still the previous one: an earlier
    rotation whose password never reached the application Secret."""
    password = generate_password(random)
    overlap = cred.spec.rotation.overlap
    previous_hash: str | None = None
    previous_expires: datetime | None = None
    if state is not None and state.still_previous(in_use, now):
        previous_hash, previous_expires = state.previous_hash, state.previous_expires
    elif state is not None and overlap > 0:
        previous_hash = state.password_hash
        previous_expires = now + timedelta(seconds=overlap)
    return CredentialState(
        password_hash=hash_for_relay(password, random),
        rotated_at=now,
        previous_hash=previous_hash,
        previous_expires=previous_expires,
        rotation_request=_token(cred.meta.annotations.get(ANN_ROTATE))
        or (state.rotation_request if state else None),
        serial=(state.serial if state else 0) + 1,
    ), password


def expire_previous(state: CredentialState, now: datetime) -> CredentialState:
    """The state without the previous hash once its overlap window has ended."""
    if state.previous_expires is not None and now >= state.previous_expires:
        return replace(state, previous_hash=None, previous_expires=None)
    return state
