"""End to end: a deleted credential is reported revoked only once every relay pod runs a
configuration without it.

The operator runs against the Kubernetes emulator; a real `mailplane relay` stands in for the
StatefulSet's pod (a Pod object carries its IP and ops port). After the SmtpCredential is deleted
the operator renders a configuration without it at once, but the pod still runs the old one
(the test plays a kubelet that has not synced the Secret volume yet): the finalizer stays, and
the SmtpRelay's status shows the pod behind. Once the volume is synced and the relay reloads,
the finalizer goes. The figures printed are the operator's part of the revocation time.
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
def test_a_deleted_credential_is_released_only_when_the_pod_runs_a_configuration_without_it(
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
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential rendered")
    app = kube_api.secret_data("shop", "orders-smtp")
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

        started = time.monotonic()
        kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
        kube_api.wait_until(lambda: "shop.orders" not in rendered_credentials(kube_api),
                            what="a configuration without the credential")
        rendered = time.monotonic() - started
        # The pod still runs the old configuration: the deletion is not reported done.
        time.sleep(1.5)
        held = kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders")
        assert held is not None and held["metadata"].get("deletionTimestamp")
        kube_api.wait_until(lambda: [(p["name"], p["current"]) for p in _pods_status(
            kube_api)] == [("main-0", False)], what="the pod shown behind")

        volume.sync()  # the kubelet's sync: the relay reloads
        kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None)
        released = time.monotonic() - started
        with pytest.raises(smtplib.SMTPAuthenticationError):
            _login(volume, tls_ca, app["username"], app["password"])
        print(f"\nrevocation: configuration without it {rendered:.2f}s after the delete; "
              f"finalizer released {released:.2f}s after (1.5 s of it the simulated kubelet lag)")
    finally:
        assert relay.stop() == 0
