"""A real relay process, a rotation pushed over its admin port (HTTPS, bearer token), and a
restart on a render where the SmtpCredential was deleted and created again under its name
(same username and owner, another uid, rotations counted from 1 again): the deleted
credential's pushed password is not run for the new one (rotation.py, ``ownerUid``)."""

from __future__ import annotations

import smtplib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import trustme

from mailplane_relay.config import hash_password
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import running_sink_in_thread
from tests.relay.test_drain import _admin, _admin_settings

OWNER = "shop/orders"


def _entry(password: str, serial: int, uid: str) -> dict[str, Any]:
    return {"username": "orders", "passwordHash": hash_password(password),
            "allowedSenders": ["example.com"], "owner": OWNER, "ownerUid": uid,
            "passwordSerial": serial}


def _auth(relay: RelayProcess, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", relay.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=relay.client_tls())
        try:
            return smtp.login("orders", password)[0]
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code


def _push(relay: RelayProcess, password: str, serial: int, uid: str) -> tuple[int, Any]:
    return _admin(relay, "POST", "/admin/credential", {
        "username": "orders", "owner": OWNER, "ownerUid": uid, "passwordSerial": serial,
        "passwordHash": hash_password(password)})


def test_a_restart_on_a_recreated_credential_drops_the_deleted_ones_pushed_password(
        relay_factory: Callable[..., RelayProcess], tls_ca: trustme.CA, tmp_path: Path) -> None:
    with running_sink_in_thread() as sink:
        relay = relay_factory(smarthost_port=sink.address[1],
                              extra=_admin_settings(tls_ca, tmp_path))
        spec = relay.spec()
        relay.write_config({**spec, "credentials": [_entry("a4", 4, "uid-a")]})
        relay.spawn()
        relay.wait_ready()
        status, answer = _push(relay, "a5", 5, "uid-a")
        assert status == 200 and answer["passwordSerial"] == 5
        assert _auth(relay, "a5") == 235 and _auth(relay, "a4") == 535
        assert relay.stop() == 0

        # Deleted (this pod missed the revocation) and created again while it was down.
        relay.write_config({**spec, "credentials": [_entry("b1", 1, "uid-b")]})
        relay.spawn()
        relay.wait_ready()
        assert _auth(relay, "a5") == 535  # the deleted credential's password
        assert _auth(relay, "b1") == 235
        assert "orders" not in (relay.message_log.parent / "rotations.json").read_text()
        # The new credential's first rotation is taken; a late push for the deleted one is not.
        status, answer = _push(relay, "b2", 2, "uid-b")
        assert status == 200 and answer["passwordSerial"] == 2
        assert _auth(relay, "b2") == 235
        status, text = _push(relay, "a6", 6, "uid-a")
        assert status == 409 and "another SmtpCredential" in text
        assert relay.stop() == 0
