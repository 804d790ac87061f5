"""A credential's own webhook against the emulator: its signing Secret is read in the
credential's namespace only, a missing or unlabelled Secret is named in the Webhook condition
and an Event (the credential sends meanwhile), and a change of the Secret reaches the relay's
configuration through the label-selected watch, long before the periodic resync."""

from __future__ import annotations

import base64
import json
from typing import Any

from mailplane_operator import kube as k
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

USER = "shop.orders"
LABEL = "mailplane.io/webhook-secret"
FIRST = "first-signing-secret-0123456789abcdef"
SECOND = "second-signing-secret-0123456789abcdef"
OTHER = "another-tenants-secret-0123456789abcdef"
URL = "https://hooks.shop.example/mail?token=receiver-t0ken"


def secret_body(namespace: str, value: str, *, labelled: bool = True) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hook", "namespace": namespace,
                         "labels": {LABEL: "true"} if labelled else {}},
            "data": {"secret": base64.b64encode(value.encode()).decode()}}


def webhook_condition(api: KubeApi) -> dict[str, Any] | None:
    cred = api.get(k.SMTP_CREDENTIALS, "shop", "orders") or {}
    return next((c for c in cred.get("status", {}).get("conditions", [])
                 if c["type"] == "Webhook"), None)


def rendered_webhook(api: KubeApi) -> dict[str, Any] | None:
    entry = rendered_credentials(api).get(USER)
    return None if entry is None else entry.get("webhook")


def test_a_credentials_webhook_follows_its_own_namespaces_secret(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    api = kube_api
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.NAMESPACES, namespace_body("other", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    # A Secret of the same name in other namespaces (the relay's, another tenant's): never read.
    api.create(k.SECRETS, secret_body("mail", OTHER))
    api.create(k.SECRETS, secret_body("other", OTHER))
    api.create(k.SMTP_CREDENTIALS, credential_body(
        "orders", ["orders@example.com"],
        webhook={"url": URL, "secretRef": {"name": "hook"}, "events": ["bounced", "delivered"]}))

    # No Secret in the credential's namespace: it sends, without a webhook, and says why.
    api.wait_until(lambda: rendered_credentials(api).get(USER), what="the first render")
    assert rendered_webhook(api) is None
    cond = api.wait_until(lambda: (c := webhook_condition(api)) and c["status"] == "False" and c,
                          what="the Webhook condition")
    assert cond["reason"] == "WebhookSecretMissing"
    assert "Secret shop/hook (spec.webhook.secretRef) does not exist" in cond["message"]
    assert f"label secret hook {LABEL}=true" in cond["message"]
    api.wait_until(lambda: any(e["reason"] == "WebhookSecretMissing"
                               for e in api.events("shop")), what="the Warning Event")

    # Created without the label: still not used, and the condition says which label.
    api.create(k.SECRETS, secret_body("shop", FIRST, labelled=False))
    api.patch(k.SMTP_CREDENTIALS, "shop", "orders", {"metadata": {"labels": {"poke": "1"}}})
    api.wait_until(lambda: "lacks the label" in (webhook_condition(api) or {}).get("message", ""),
                   what="the missing label named")
    assert rendered_webhook(api) is None

    # Labelled: the watch re-renders at once (the resync is minutes away).
    api.patch(k.SECRETS, "shop", "hook", {"metadata": {"labels": {LABEL: "true"}}})
    hook = api.wait_until(lambda: rendered_webhook(api), what="the webhook rendered")
    assert hook == {"url": URL, "secrets": [FIRST], "events": ["bounced", "delivered"]}
    api.wait_until(lambda: (webhook_condition(api) or {}).get("status") == "True",
                   what="the Webhook condition True")

    # A new signing secret reaches the configuration through the watch too.
    api.patch(k.SECRETS, "shop", "hook",
              {"data": {"secret": base64.b64encode(SECOND.encode()).decode()}})
    api.wait_until(lambda: (rendered_webhook(api) or {}).get("secrets") == [SECOND],
                   what="the rotated signing secret")

    # Another tenant's Secret never reached the configuration; no signing secret and no URL
    # token reached a status, an Event or the operator's log (the spec is the tenant's own).
    config = "".join(rendered_config(api).values())
    assert OTHER not in config
    visible = json.dumps([[o.get("status") for o in api.list(kind)]
                          for kind in (k.SMTP_CREDENTIALS, k.SMTP_RELAYS)]
                         + api.events())
    # kopf's own DEBUG lines dump whole bodies (the spec, with its URL): the token is checked
    # from INFO up, the level the operator runs at; signing secrets in every line.
    logs = operator_running.logs.text
    info_up = "\n".join(line for line in logs.splitlines() if " DEBUG " not in line)
    for value in (FIRST, SECOND, OTHER):
        assert value not in visible + logs
    assert "receiver-t0ken" not in visible + info_up
