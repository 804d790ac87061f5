"""Revocations pushed by the operator, in force before the mounted configuration catches up.

Kubelet updates a Secret volume 60-90 s after the Secret changes. When a credential is deleted
the operator also tells every pod at once (``POST /admin/revoke`` with ``{"username": X}``,
drain.py): the relay records the password hashes X has in the configuration it runs (current
and, during a rotation's overlap, previous), and from then on treats X as absent whenever its
configuration holds one of those hashes for X — AUTH answers 535, and a session already
authenticated as X is refused at its next MAIL like after a reload without X.

An entry stays until the configuration in force no longer holds any of its hashes for X (the
mounted render without X arrived); a mounted configuration that is older can never bring them
back meanwhile. The list is written to ``revocations.json`` next to the message log (atomic
replace) and read at start, so a pod that restarts on a stale mounted render still refuses the
revoked password. Only SHA-256 fingerprints of the hashes are kept, never the hashes.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable
from pathlib import Path

from .config import Credential, RelayConfig
from .files import replace_durably

log = logging.getLogger(__name__)

FILE_NAME = "revocations.json"


def fingerprint(password_hash: str) -> str:
    return hashlib.sha256(password_hash.encode()).hexdigest()


def _hashes(credential: Credential) -> set[str]:
    out = {fingerprint(credential.password_hash)}
    if credential.previous_password_hash:
        out.add(fingerprint(credential.previous_password_hash))
    return out


class Revocations:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._entries: dict[str, set[str]] = {}
        self._load()

    def _load(self) -> None:
        try:
            doc = json.loads(self._path.read_text())
            self._entries = {str(k): {str(f) for f in v} for k, v in doc.items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            # Unreadable: nothing to refuse beyond the mounted configuration; say so.
            log.error("revocations: %s unreadable (%s); starting with none", self._path,
                      type(exc).__name__)

    def _save(self) -> None:
        doc = {k: sorted(v) for k, v in sorted(self._entries.items())}
        replace_durably(self._path, json.dumps(doc).encode())

    def __len__(self) -> int:
        return len(self._entries)

    def revoke(self, username: str, config: RelayConfig, also: Iterable[str] = ()) -> bool:
        """Revoke what `username` has in `config` (the configuration as mounted) and the
        hashes `also` (pushed at a rotation, rotation.py: the mounted render that catches up
        holds them); False if it has nothing there (already revoked by the configuration
        itself)."""
        credential = config.credentials.get(username)
        if credential is None:
            return False
        self._entries.setdefault(username, set()).update(
            _hashes(credential) | {fingerprint(h) for h in also})
        self._save()
        log.info("revocations: %s refused from now on (pushed ahead of the configuration)",
                 username)
        return True

    def prune(self, config: RelayConfig) -> None:
        """Drop the entries the configuration in force no longer needs."""
        gone = [u for u, fps in self._entries.items()
                if (c := config.credentials.get(u)) is None or not (_hashes(c) & fps)]
        for username in gone:
            del self._entries[username]
            log.info("revocations: %s is out of the configuration itself; entry dropped",
                     username)
        if gone:
            self._save()

    def revoked(self, config: RelayConfig) -> set[str]:
        """The usernames of `config` that are revoked."""
        return {u for u, fps in self._entries.items()
                if (c := config.credentials.get(u)) is not None and _hashes(c) & fps}

    def apply(self, config: RelayConfig) -> RelayConfig:
        """`config` without its revoked credentials (the same object when there are none)."""
        revoked = self.revoked(config)
        return config.without_credentials(revoked) if revoked else config
