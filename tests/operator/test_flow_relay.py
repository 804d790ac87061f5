"""The real operator against the Kubernetes emulator: a relay pool, its children and config."""

from __future__ import annotations

import yaml

from mailplane_operator import kube as k
from mailplane_relay.config import parse_documents, verify_password
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_config,
    rendered_credentials,
)


def _setup(api: KubeApi) -> None:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))


def test_relay_renders_children_config_and_status(kube_api: KubeApi,
                                                  operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))

    creds = kube_api.wait_until(lambda: rendered_credentials(kube_api).get("shop.orders"),
                                what="the credential in the relay config")
    app = kube_api.secret_data("shop", "orders-smtp")
    assert verify_password(app["password"], creds["passwordHash"])
    assert app["username"] == "shop.orders"
    assert app["host"] == "main.mail.svc.cluster.local"
    assert app["port"] == "587"

    # The config the relay would read is valid and signs for the attached domain.
    config = parse_documents(sorted(rendered_config(kube_api).items()))
    assert "example.com" in config.domains
    assert config.credentials["shop.orders"].may_send_as("orders@example.com")

    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and o.get("status", {}).get("credentialCount") == 1)
    uid = relay["metadata"]["uid"]
    status = relay["status"]
    assert status["configHash"]
    assert status["domains"] == ["example.com"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReplicasNotReady"

    # Every child is owned by the relay, so that deleting it deletes them (GC is the cluster's).
    for resource, name in ((k.STATEFULSETS, "main"), (k.SERVICES, "main"),
                           (k.SERVICES, "main-headless"), (k.PDBS, "main"),
                           (k.SECRETS, "main-config-0")):
        child = kube_api.get(resource, "mail", name)
        assert child is not None, (resource.plural, name)
        owners = child["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [
            ("SmtpRelay", uid, True)]
    app_secret = kube_api.get(k.SECRETS, "shop", "orders-smtp")
    assert app_secret is not None
    assert app_secret["metadata"]["ownerReferences"][0]["kind"] == "SmtpCredential"

    # The pod template does not carry the config hash: credential changes never restart pods.
    sts = kube_api.get(k.STATEFULSETS, "mail", "main")
    assert sts is not None
    assert status["configHash"] not in yaml.safe_dump(sts["spec"]["template"])
