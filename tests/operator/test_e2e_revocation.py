"""End to end: a deleted credential is refused by every relay pod within seconds, long before
the pods' mounted configuration catches up.

The operator runs against the Kubernetes emulator; a real `mailplane relay` stands in for the
StatefulSet's pod (a Pod object carries its IP and admin port). The test plays a kubelet that
has not synced the Secret volume: the pod keeps the old render, which still holds the
credential, for as long as the test runs (kubelet's 60-90 s). The operator renders a
configuration without the credential and pushes the revocation to the pod over its HTTPS admin
port; the pod refuses the password at once (535), the finalizer goes once the pod confirms, and
the refusal survives a restart on the stale render. Once the volume is synced, the pushed entry
is dropped. The figure printed is delete -> 535, end to end.
"""

from __future__ import annotations

import smtplib
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path

import pytest
import trustme

from mailplane_operator import kube as k
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)
from tests.helpers.pki import client_context
from tests.operator.test_e2e import Relay, SecretVolume, create_tls_secret
from tests.operator.test_e2e_scaledown import _pod


def _login(volume: SecretVolume, ca: trustme.CA, user: str, password: str) -> None:
    with smtplib.SMTP("127.0.0.1", volume.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.login(user, password)
        msg = EmailMessage()
        msg["From"], msg["To"], msg["Subject"] = "orders@example.com", "c@example.net", "x"
        msg.set_content("x\n")
        smtp.send_message(msg)


def _pods_status(api: KubeApi) -> list[dict[str, str]]:
    relay = api.get(k.SMTP_RELAYS, "mail", "main") or {}
    return list((relay.get("status") or {}).get("pods") or [])


@pytest.mark.slow
def test_a_deleted_credential_is_refused_within_seconds_while_the_pod_runs_a_stale_render(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, tmp_path: Path) -> None:
    operator_factory(drain_poll=0.2)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    create_tls_secret(kube_api, tls_ca)
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(
        delivery={"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": 9,
                                                     "tls": "none"}}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("billing", ["orders@example.com"]))
    kube_api.wait_until(lambda: {"shop.orders", "shop.billing"} <= set(
        rendered_credentials(kube_api)), what="the credentials rendered")
    app = kube_api.secret_data("shop", "orders-smtp")
    other = kube_api.secret_data("shop", "billing-smtp")
    volume = SecretVolume(kube_api, tmp_path / "pod0", tls_ca)
    volume.sync()
    relay = Relay.start(volume, tmp_path / "relay.log")
    try:
        pod = _pod(0, volume)
        kube_api.create(k.PODS, pod)
        kube_api.patch(k.PODS, "mail", "main-0", {"status": pod["status"]}, status=True)
        # The status follows the pod (re-rendered while a pod is behind; poked here).
        kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"metadata": {"annotations": {"x": "1"}}})
        kube_api.wait_until(lambda: [(p["name"], p["current"]) for p in _pods_status(
            kube_api)] == [("main-0", True)], what="the pod current in the status")
        _login(volume, tls_ca, app["username"], app["password"])
        # A session authenticated before the deletion, still open.
        session = smtplib.SMTP("127.0.0.1", volume.ports["submission"], timeout=10)
        session.starttls(context=client_context(tls_ca))
        session.login(app["username"], app["password"])

        started = time.monotonic()
        kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
        # No volume sync from here on: the pod's files keep the render with the credential.
        deadline = started + 15
        while True:
            try:
                _login(volume, tls_ca, app["username"], app["password"])
            except smtplib.SMTPAuthenticationError as exc:
                assert exc.smtp_code == 535
                break
            except smtplib.SMTPSenderRefused as exc:
                # Revoked between this attempt's AUTH and its MAIL: the next AUTH gets 535.
                assert exc.smtp_code == 554
            assert time.monotonic() < deadline, "still accepted 15 s after the delete"
            time.sleep(0.05)
        refused = time.monotonic() - started
        kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None, timeout=15)
        released = time.monotonic() - started
        assert released < 15
        # The open session is refused at its next transaction; other credentials still work.
        code, _msg = session.mail("orders@example.com")
        assert code >= 500
        session.close()
        _login(volume, tls_ca, other["username"], other["password"])
        # All of it while the mounted files still hold the credential.
        assert any("shop.orders" in f.read_text() for f in volume.dir.iterdir()
                   if not f.name.startswith("."))

        # A restart on the same stale render still refuses it (the list is on the volume).
        assert relay.stop() == 0
        relay = Relay.start(volume, tmp_path / "relay-again.log")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            _login(volume, tls_ca, app["username"], app["password"])
        _login(volume, tls_ca, other["username"], other["password"])
        revocations = volume.state / "revocations.json"
        assert "shop.orders" in revocations.read_text()

        volume.sync()  # the kubelet's sync at last: the pushed entry is no longer needed
        relay.wait(lambda: "shop.orders" not in revocations.read_text(), "the entry dropped")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            _login(volume, tls_ca, app["username"], app["password"])
        print(f"\nrevocation: 535 {refused:.2f}s after the delete, finalizer released "
              f"{released:.2f}s after (the pod's mounted render still held the credential)")
    finally:
        assert relay.stop() == 0
