"""Revocation paths the happy flows do not walk, against the emulator with the real operator:
a namespace that loses the relay's access label loses its credentials, and configuration
Secrets the render no longer needs are deleted rather than left mounted in the relay."""

from __future__ import annotations

from mailplane_operator import kube as k
from mailplane_operator.reconcile import relay as relay_mod
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)

USER = "shop.orders"
ACCESS = {"mailplane.io/smtp-access": "true"}


def _setup(api: KubeApi) -> None:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **ACCESS))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    api.wait_until(lambda: USER in rendered_credentials(api), what="the first render")


def test_a_namespace_losing_its_access_label_loses_its_credentials(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.patch(k.NAMESPACES, None, "shop",
                   {"metadata": {"labels": {"mailplane.io/smtp-access": None}}})

    kube_api.wait_until(lambda: USER not in rendered_credentials(kube_api),
                        what="the credential leaving the relay configuration")

    def refused() -> bool:
        cred = kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders") or {}
        ready = [c for c in cred.get("status", {}).get("conditions", [])
                 if c["type"] == "Ready"]
        return bool(ready) and ready[0]["status"] == "False"

    kube_api.wait_until(refused, what="the credential reported not Ready")
    # The application Secret stays (the tenant keeps its manifest); only the relay forgets it.
    assert kube_api.get(k.SECRETS, "shop", "orders-smtp") is not None

    # Labelled again, it comes back with the same password.
    kube_api.patch(k.NAMESPACES, None, "shop", {"metadata": {"labels": ACCESS}})
    kube_api.wait_until(lambda: USER in rendered_credentials(kube_api),
                        what="the credential back in the relay configuration")


def test_configuration_secrets_no_longer_rendered_are_deleted(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    # A Secret left by an earlier, larger render (the configuration shrank since).
    leftover = {
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "main-config-5", "namespace": "mail", "labels": {
            relay_mod.LABEL_RELAY: "main", relay_mod.LABEL_COMPONENT: "config"}},
        "data": {},
    }
    kube_api.create(k.SECRETS, leftover)
    # A Secret of the same namespace that is not the relay's configuration stays.
    kube_api.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "main-config-other", "namespace": "mail"},
                                "data": {}})
    # Any change makes the relay render again.
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("billing", ["billing@example.com"]))
    kube_api.wait_until(lambda: "shop.billing" in rendered_credentials(kube_api),
                        what="the second render")
    kube_api.wait_until(lambda: kube_api.get(k.SECRETS, "mail", "main-config-5") is None,
                        what="the leftover configuration Secret deleted")
    assert kube_api.get(k.SECRETS, "mail", "main-config-other") is not None
    assert kube_api.get(k.SECRETS, "mail", "main-config-0") is not None
