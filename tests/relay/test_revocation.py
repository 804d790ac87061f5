"""Pushed revocations (revocation.py): which credentials they hide, when they go, what is kept
on disk. The end-to-end path (operator -> HTTPS admin port -> 535) is
tests/operator/test_e2e_revocation.py."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from mailplane_relay.config import RelayConfig, RelaySettings, hash_password
from mailplane_relay.revocation import Revocations, fingerprint


def _config(**hashes: str) -> RelayConfig:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"},
           "credentials": [{"username": u, "passwordHash": h, "allowedSenders": ["example.com"]}
                           for u, h in hashes.items()]}
    return RelayConfig(settings=RelaySettings.model_validate(doc))


def test_a_revoked_password_stays_refused_until_the_mounted_configuration_drops_it(
        tmp_path: Path) -> None:
    old, new = hash_password("old"), hash_password("new")
    stale = _config(orders=old, billing=old)
    path = tmp_path / "revocations.json"
    revocations = Revocations(path)
    assert revocations.revoke("orders", stale) is True
    assert revocations.revoke("nobody", stale) is False  # nothing to refuse
    effective = revocations.apply(stale)
    assert "orders" not in effective.credentials and "billing" in effective.credentials
    assert effective.source_hash == stale.source_hash  # the render in force is unchanged
    # Kept on disk as fingerprints only: never the hash itself.
    text = path.read_text()
    assert fingerprint(old) in text and old not in text
    # A restart on the same stale render: still refused; a stale render again: kept.
    again = Revocations(path)
    again.prune(stale)
    assert "orders" not in again.apply(stale).credentials
    # The same username with another password (created again): not refused, entry dropped.
    recreated = _config(orders=new, billing=old)
    assert "orders" in again.apply(recreated).credentials
    again.prune(recreated)
    assert len(again) == 0 and "orders" not in path.read_text()


def test_an_unreadable_list_is_reported_and_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "revocations.json"
    path.write_text("[1, 2")
    with caplog.at_level(logging.ERROR):
        revocations = Revocations(path)
    assert len(revocations) == 0
    assert "unreadable" in caplog.text
