"""Passwords pushed by the operator at a rotation, in force before the mounted configuration
catches up.

Kubelet updates a Secret volume 60-90 s after the Secret changes. When a credential's password is
rotated the operator also tells every pod at once (``POST /admin/credential``, drain.py) with the
credential's new password fields as its next render has them — ``passwordHash``,
``previousPasswordHash`` and ``previousExpires`` (hashes, never a password) — and
``passwordSerial``, the number of that rotation. The relay then checks passwords of that username
against the pushed fields instead of the mounted ones: the new password works at once, and a
password the rotation dropped (the old one, when ``spec.rotation.overlap`` is 0) is refused at
once. The rest of the entry (senders, limits, suspension) stays the mounted one.

A push is refused (409) for a username the relay does not serve (absent from its configuration,
or revoked: a push never adds a credential) and for one whose ``owner`` (``namespace/name`` of
the SmtpCredential) differs from the mounted entry's, or whose ``ownerUid`` (its
``metadata.uid``) differs from the mounted entry's: a credential deleted and created again under
the same name is another credential, its rotations counted again from 1. Pushes are ordered by
serial: one at or
below the serial in force (the mounted entry's, or a push held already) changes nothing, so a
stale push arriving after a newer one cannot bring an older password back. The answer is the
serial in force, which the operator compares with the one it pushed.

A pushed entry stays until the mounted entry's serial reaches it (the render with the rotation
arrived), the mounted configuration no longer has the username, or the mounted entry is another
SmtpCredential (another ``ownerUid``: the one pushed for was deleted, and a pod that missed its
revocation must not run the deleted credential's password for the new one). The list is written to
``rotations.json`` next to the message log (atomic replace) and read at start, so a pod that
restarts on a stale mounted render still runs the rotated passwords. It holds the hashes the
mounted configuration will hold (salted SHA-256 of 256-bit random passwords), never a password.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .config import Credential, RelayConfig, _check_hash
from .files import replace_durably

log = logging.getLogger(__name__)

FILE_NAME = "rotations.json"


class PushRefused(Exception):
    """A push for a credential this relay would not serve (the message says why)."""


@dataclass(frozen=True)
class Pushed:
    """The password fields of one credential as pushed."""

    serial: int
    owner: str | None
    password_hash: str
    previous_password_hash: str | None = None
    previous_expires: datetime | None = None
    owner_uid: str | None = None

    def __repr__(self) -> str:  # hashes stay out of logs
        return f"Pushed(serial={self.serial}, owner={self.owner!r})"

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"passwordSerial": self.serial, "owner": self.owner,
                               "passwordHash": self.password_hash}
        if self.owner_uid:
            doc["ownerUid"] = self.owner_uid
        if self.previous_password_hash and self.previous_expires:
            doc["previousPasswordHash"] = self.previous_password_hash
            doc["previousExpires"] = self.previous_expires.isoformat()
        return doc

    def of(self, credential: Credential) -> bool:
        """Whether `credential` (a mounted entry of the same username) is the SmtpCredential
        this was pushed for: the same owner and, when both name one, the same uid."""
        return self.owner == credential.owner and (
            not self.owner_uid or not credential.owner_uid
            or self.owner_uid == credential.owner_uid)

    def hashes(self) -> list[str]:
        return [h for h in (self.password_hash, self.previous_password_hash) if h]

    def over(self, credential: Credential) -> Credential:
        """`credential` with these password fields."""
        return credential.model_copy(update={
            "password_hash": self.password_hash,
            "previous_password_hash": self.previous_password_hash,
            "previous_expires": self.previous_expires,
            "password_serial": self.serial})


USAGE = ('send {"username": "...", "owner": "namespace/name", "ownerUid": "the '
         'SmtpCredential\'s metadata.uid", "passwordSerial": N (1 or more), '
         '"passwordHash": "sha256$...", and optionally "previousPasswordHash" with '
         '"previousExpires" (RFC 3339 with a time zone)}')


def parse_push(doc: object) -> tuple[str, Pushed]:
    """The username and fields of a push; ValueError naming what is wrong (never a value)."""
    if not isinstance(doc, Mapping):
        raise ValueError(USAGE)
    username, owner, serial = doc.get("username"), doc.get("owner"), doc.get("passwordSerial")
    if not isinstance(username, str) or not username:
        raise ValueError(f"username is missing: {USAGE}")
    if owner is not None and not isinstance(owner, str):
        raise ValueError(f"owner must be a string: {USAGE}")
    uid = doc.get("ownerUid")
    if uid is not None and (not isinstance(uid, str) or not 1 <= len(uid) <= 128):
        raise ValueError(f"ownerUid must be a string of 1-128 characters: {USAGE}")
    if isinstance(serial, bool) or not isinstance(serial, int) or serial < 1:
        raise ValueError(f"passwordSerial must be an integer of 1 or more: {USAGE}")
    current, previous = doc.get("passwordHash"), doc.get("previousPasswordHash")
    expires_text = doc.get("previousExpires")
    try:
        if not isinstance(current, str):
            raise ValueError("passwordHash is missing")
        _check_hash(current)
        expires: datetime | None = None
        if previous is not None:
            if not isinstance(previous, str):
                raise ValueError("previousPasswordHash must be a string")
            _check_hash(previous)
            if not isinstance(expires_text, str):
                raise ValueError("previousPasswordHash needs previousExpires")
            expires = datetime.fromisoformat(expires_text.replace("Z", "+00:00"))
            if expires.tzinfo is None:
                raise ValueError("previousExpires needs a time zone")
        elif expires_text is not None:
            raise ValueError("previousExpires without previousPasswordHash")
    except ValueError as exc:
        # _check_hash's message names the expected form, never the value.
        raise ValueError(f"{exc}: {USAGE}") from None
    return username, Pushed(serial, owner, current, previous, expires, owner_uid=uid)


class Rotations:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._entries: dict[str, Pushed] = {}
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self._path.read_text())
            entries = {}
            for username, fields in doc.items():
                name, pushed = parse_push({**fields, "username": username})
                entries[name] = pushed
            self._entries = entries
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Unreadable: the mounted configuration's passwords apply until it catches up.
            log.error("rotations: %s unreadable (%s); starting with none", self._path,
                      type(exc).__name__)

    def _save(self) -> None:
        doc = {u: p.to_json() for u, p in sorted(self._entries.items())}
        replace_durably(self._path, json.dumps(doc).encode())

    def __len__(self) -> int:
        return len(self._entries)

    def held(self, username: str) -> Pushed | None:
        return self._entries.get(username)

    def push(self, username: str, pushed: Pushed, served: RelayConfig) -> int:
        """Hold `pushed` for `username` unless a serial at or above it is in force; `served`
        is the mounted configuration without its revoked credentials. The serial in force
        afterwards; PushRefused for a credential this relay does not serve."""
        credential = served.credentials.get(username)
        if credential is None:
            raise PushRefused(
                f"{username} is not a credential of this relay's configuration (or it was "
                "revoked): a push changes the password of a credential the relay has, it never "
                "adds one; the credential reaches the relay with its next render")
        if pushed.owner != credential.owner:
            raise PushRefused(
                f"{username} belongs to {credential.owner or 'no SmtpCredential'} in this "
                f"relay's configuration, not to {pushed.owner or 'no SmtpCredential'}")
        if not pushed.of(credential):
            raise PushRefused(
                f"{username} in this relay's configuration is another SmtpCredential "
                f"{credential.owner} (uid {credential.owner_uid}) than the one pushed for (uid "
                f"{pushed.owner_uid}): it was deleted and created again under its name; the "
                "new one's rotations are pushed with its own uid")
        held = self._entries.get(username)
        if held is not None and not held.of(credential):
            held = None  # pushed for a deleted credential of that name (prune drops it)
        in_force = max(credential.password_serial, held.serial if held else 0)
        if pushed.serial <= in_force:
            log.info("rotations: %s push of serial %d ignored: serial %d is in force", username,
                     pushed.serial, in_force)
            return in_force
        self._entries[username] = pushed
        self._save()
        log.info("rotations: %s runs the password of rotation %d (pushed ahead of the "
                 "configuration)", username, pushed.serial)
        return pushed.serial

    def forget(self, username: str) -> None:
        """Drop what was pushed for `username` (it is revoked)."""
        if self._entries.pop(username, None) is not None:
            self._save()

    def prune(self, mounted: RelayConfig) -> None:
        """Drop the entries the mounted configuration has caught up with (or no longer has)."""
        gone = [u for u, p in self._entries.items()
                if (c := mounted.credentials.get(u)) is None or c.password_serial >= p.serial
                or not p.of(c)]
        for username in gone:
            del self._entries[username]
            log.info("rotations: %s: the mounted configuration has caught up (or holds another "
                     "SmtpCredential of that name); entry dropped", username)
        if gone:
            self._save()

    def apply(self, config: RelayConfig) -> RelayConfig:
        """`config` with the pushed password fields (the same object when none applies)."""
        replaced = {u: p.over(c) for u, p in self._entries.items()
                    if (c := config.credentials.get(u)) is not None
                    and p.of(c) and c.password_serial < p.serial}
        return config.with_credentials(replaced) if replaced else config
