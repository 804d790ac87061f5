"""Pushed rotations (rotation.py): which password a username runs, ordering by serial, what is
refused, what is kept on disk and when it goes. The end-to-end path (operator -> HTTPS admin
port -> 235/535) is tests/operator/test_e2e_rotation.py."""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.config import RelayConfig, RelaySettings, hash_password
from mailplane_relay.revocation import Revocations
from mailplane_relay.rotation import PushRefused, Rotations, parse_push

OWNER = "shop/orders"


def _config(serial: int = 0, uid: str | None = None, **hashes: str) -> RelayConfig:
    doc = {"tls": {"certFile": "/c", "keyFile": "/k"},
           "credentials": [{"username": u, "passwordHash": h, "allowedSenders": ["example.com"],
                            "owner": f"shop/{u}", "passwordSerial": serial,
                            **({"ownerUid": uid} if uid else {})}
                           for u, h in hashes.items()]}
    return RelayConfig(settings=RelaySettings.model_validate(doc))


def _push(serial: int, password_hash: str, username: str = "orders", owner: str = OWNER,
          **more: Any) -> dict[str, Any]:
    return {"username": username, "owner": owner, "passwordSerial": serial,
            "passwordHash": password_hash, **more}


def _accepts(config: RelayConfig, username: str, password: str) -> bool:
    credential = config.credentials.get(username)
    return credential is not None and credential.check_password(password)


def test_a_pushed_password_replaces_the_mounted_one_until_the_mounted_render_catches_up(
        tmp_path: Path) -> None:
    old, new = hash_password("old"), hash_password("new")
    stale = _config(orders=old, billing=old)
    path = tmp_path / "rotations.json"
    rotations = Rotations(path)
    assert rotations.push(*parse_push(_push(1, new)), stale) == 1
    effective = rotations.apply(stale)
    assert _accepts(effective, "orders", "new") and not _accepts(effective, "orders", "old")
    assert _accepts(effective, "billing", "old")  # other credentials: as mounted
    assert effective.credentials["orders"].allowed_senders == ("example.com",)
    assert effective.source_hash == stale.source_hash
    # A restart on the same stale render: the pushed password is still the one in force.
    again = Rotations(path)
    again.prune(stale)
    assert _accepts(again.apply(stale), "orders", "new")
    assert not _accepts(again.apply(stale), "orders", "old")
    # The render with rotation 1 arrives: the entry is no longer needed.
    caught_up = _config(1, orders=new, billing=old)
    again.prune(caught_up)
    assert len(again) == 0 and "orders" not in path.read_text()


def test_the_overlap_of_a_rotation_is_pushed_too(tmp_path: Path) -> None:
    old, new = hash_password("old"), hash_password("new")
    rotations = Rotations(tmp_path / "rotations.json")
    stale = _config(orders=old)
    expires = datetime.now(UTC) + timedelta(hours=1)
    rotations.push(*parse_push(_push(1, new, previousPasswordHash=old,
                                     previousExpires=expires.isoformat())), stale)
    effective = rotations.apply(stale)
    assert _accepts(effective, "orders", "new") and _accepts(effective, "orders", "old")
    # Past the overlap the previous password is refused, as in a mounted entry.
    credential = effective.credentials["orders"]
    assert not credential.check_password("old", now=expires + timedelta(seconds=1))


def test_a_stale_push_after_a_newer_one_changes_nothing(tmp_path: Path) -> None:
    h1, h2, h3 = (hash_password(p) for p in ("one", "two", "three"))
    rotations = Rotations(tmp_path / "rotations.json")
    stale = _config(orders=hash_password("zero"))
    assert rotations.push(*parse_push(_push(2, h2)), stale) == 2
    assert rotations.push(*parse_push(_push(1, h1)), stale) == 2  # arrived late
    assert _accepts(rotations.apply(stale), "orders", "two")
    assert not _accepts(rotations.apply(stale), "orders", "one")
    # The mounted render of rotation 1 (behind the push) keeps the push in force...
    middle = _config(1, orders=h1)
    rotations.prune(middle)
    assert _accepts(rotations.apply(middle), "orders", "two")
    assert not _accepts(rotations.apply(middle), "orders", "one")
    # ...and one ahead of it (rotation 3, whose push never came) wins over it.
    ahead = _config(3, orders=h3)
    assert _accepts(rotations.apply(ahead), "orders", "three")
    assert rotations.push(*parse_push(_push(2, h2)), ahead) == 3
    rotations.prune(ahead)
    assert len(rotations) == 0


def test_a_push_for_a_credential_not_served_here_is_refused(tmp_path: Path) -> None:
    old, new = hash_password("old"), hash_password("new")
    stale = _config(orders=old)
    rotations = Rotations(tmp_path / "rotations.json")
    with pytest.raises(PushRefused, match="never adds one"):
        rotations.push(*parse_push(_push(1, new, username="stranger")), stale)
    with pytest.raises(PushRefused, match="belongs to shop/orders"):
        rotations.push(*parse_push(_push(1, new, owner="other/orders")), stale)
    # Revoked (deleted): the served configuration no longer has it.
    revocations = Revocations(tmp_path / "revocations.json")
    revocations.revoke("orders", stale)
    with pytest.raises(PushRefused, match="revoked"):
        rotations.push(*parse_push(_push(1, new)), revocations.apply(stale))
    assert len(rotations) == 0


def test_a_deleted_credentials_push_never_applies_to_one_created_again_under_its_name(
        tmp_path: Path) -> None:
    """SmtpCredential shop/orders (uid A) was rotated to serial 5 and pushed; this pod missed
    the revocation at its deletion (down or unreachable until the finalizer gave up) and, when
    it reads its configuration again, shop/orders was created anew (uid B, a new state from
    serial 1): same username, same owner, a lower serial."""
    deleted, leaked, fresh, next_one = (hash_password(p) for p in ("a4", "a5", "b1", "b2"))
    path = tmp_path / "rotations.json"
    rotations = Rotations(path)
    assert rotations.push(*parse_push(_push(5, leaked, ownerUid="uid-a")),
                          _config(4, "uid-a", orders=deleted)) == 5
    recreated = _config(1, "uid-b", orders=fresh)
    again = Rotations(path)  # the pod restarts on the render with the new credential
    again.prune(recreated)
    effective = again.apply(recreated)
    assert not _accepts(effective, "orders", "a5")  # the deleted credential's password
    assert _accepts(effective, "orders", "b1")
    assert len(again) == 0 and "orders" not in path.read_text()
    # The new credential's first rotation (serial 2, below the deleted one's 5) is taken, and
    # a late push of the deleted one is refused.
    assert again.push(*parse_push(_push(2, next_one, ownerUid="uid-b")), recreated) == 2
    assert _accepts(again.apply(recreated), "orders", "b2")
    with pytest.raises(PushRefused, match="another SmtpCredential"):
        again.push(*parse_push(_push(6, leaked, ownerUid="uid-a")), recreated)
    # Without a restart too: a held push of uid A is not applied over uid B's entry.
    held = Rotations(tmp_path / "held.json")
    held.push(*parse_push(_push(5, leaked, ownerUid="uid-a")), _config(4, "uid-a", orders=deleted))
    assert not _accepts(held.apply(recreated), "orders", "a5")


@pytest.mark.parametrize(("doc", "problem"), [
    ([], "send"),
    ({"owner": OWNER, "passwordSerial": 1, "passwordHash": "x"}, "username is missing"),
    (_push(0, hash_password("p")), "passwordSerial must be an integer of 1 or more"),
    (_push(True, hash_password("p")), "passwordSerial must be an integer"),  # type: ignore[arg-type]
    (_push(1, "plain"), "sha256"),
    (_push(1, hash_password("p"), previousPasswordHash=hash_password("q")),
     "needs previousExpires"),
    (_push(1, hash_password("p"), previousPasswordHash=hash_password("q"),
           previousExpires="2030-01-01T00:00:00"), "time zone"),
])
def test_a_malformed_push_names_the_problem_and_the_form(doc: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem) as err:
        parse_push(doc)
    assert "passwordSerial" in str(err.value)  # the form to send


def test_an_unreadable_list_is_reported_and_starts_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "rotations.json"
    path.write_text('{"orders": {"passwordSerial": "x"}}')
    with caplog.at_level(logging.ERROR):
        rotations = Rotations(path)
    assert len(rotations) == 0
    assert "unreadable" in caplog.text


def test_a_revocation_after_a_pushed_rotation_covers_the_pushed_password(tmp_path: Path) -> None:
    old, new = hash_password("old"), hash_password("new")
    stale = _config(orders=old)
    rotations = Rotations(tmp_path / "rotations.json")
    rotations.push(*parse_push(_push(1, new)), stale)
    held = rotations.held("orders")
    assert held is not None
    revocations = Revocations(tmp_path / "revocations.json")
    revocations.revoke("orders", stale, held.hashes())
    rotations.forget("orders")
    # The render of the rotation arrives before the one without the credential: still refused.
    caught_up = _config(1, orders=new)
    revocations.prune(caught_up)
    rotations.prune(caught_up)
    assert "orders" not in rotations.apply(revocations.apply(caught_up)).credentials


def test_the_pushed_hashes_are_readable_by_the_relays_user_only(tmp_path: Path) -> None:
    """rotations.json holds password hashes (revocations.json their fingerprints): like the
    spool's message files, only the relay's own user reads them, whatever the umask."""
    old, new = hash_password("old"), hash_password("new")
    stale = _config(orders=old)
    rotations = Rotations(tmp_path / "rotations.json")
    rotations.push(*parse_push(_push(1, new)), stale)
    revocations = Revocations(tmp_path / "revocations.json")
    revocations.revoke("orders", stale)
    for name in ("rotations.json", "revocations.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o600, name
