"""SmtpCredential flows against the emulator: the application Secret, rotation (on demand and on
schedule) with an overlap, admission reasons, deletion, and that no secret value leaks."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailplane_operator import kube as k
from mailplane_relay.config import Credential, verify_password
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


def _setup(api: KubeApi, **cred_spec: Any) -> dict[str, str]:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    api.create(k.SMTP_CREDENTIALS,
               credential_body("orders", ["orders@example.com"], **cred_spec))
    api.wait_until(lambda: rendered_credentials(api).get(USER), what="the first render")
    return api.secret_data("shop", "orders-smtp")


def _entry(api: KubeApi, check: Callable[[dict[str, Any]], bool], what: str) -> Credential:
    def probe() -> dict[str, Any] | None:
        entry = rendered_credentials(api).get(USER)
        return entry if entry is not None and check(entry) else None

    return Credential.model_validate(api.wait_until(probe, what=what))


def _condition(obj: dict[str, Any] | None, type_: str = "Ready") -> dict[str, Any]:
    assert obj is not None
    return next(c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_)


def test_on_demand_rotation_keeps_the_old_password_during_the_overlap(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    first = _setup(kube_api, rotation={"overlap": "1h"})["password"]
    kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
                   {"metadata": {"annotations": {"mailplane.io/rotate": "ticket-1"}}})

    entry = _entry(kube_api, lambda e: "previousPasswordHash" in e, "the rotated config")
    second = kube_api.secret_data("shop", "orders-smtp")["password"]
    assert second != first
    assert entry.check_password(second)
    assert entry.check_password(first), "the old password must work during the overlap"
    assert entry.previous_expires is not None
    assert 3500 < (entry.previous_expires - datetime.now(UTC)).total_seconds() <= 3600

    cred = kube_api.wait_for(
        k.SMTP_CREDENTIALS, "shop", "orders",
        lambda o: o and o.get("status", {}).get("lastRotationRequest") == "ticket-1")
    assert cred["status"]["previousPasswordExpires"]
    kube_api.wait_until(lambda: {"PasswordGenerated", "PasswordRotationRequested"} <= {
        e["reason"] for e in kube_api.events("shop") if e["involvedObject"]["name"] == "orders"},
        what="the rotation events")

    # The same token again is not a new request: nothing rotates.
    kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
                   {"metadata": {"labels": {"touched": "yes"}}})
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o and o["metadata"].get(
        "annotations", {}).get("operator.mailplane.io/last-handled-configuration", "").find(
        "touched") >= 0)
    assert kube_api.secret_data("shop", "orders-smtp")["password"] == second

    # Nothing secret in status, Events, the operator's logs or its metrics.
    everything = json.dumps([
        kube_api.list(k.SMTP_CREDENTIALS), kube_api.list(k.SMTP_RELAYS),
        kube_api.list(k.SENDING_DOMAINS), kube_api.events(),
    ]) + operator_running.logs.text + operator_running.metrics_text()
    for password in (first, second):
        assert password not in everything
    for text in rendered_config(kube_api).values():
        assert first not in text and second not in text


def test_scheduled_rotation_then_the_overlap_ends(kube_api: KubeApi,
                                                  operator_running: RunningOperator) -> None:
    first = _setup(kube_api, rotation={"interval": "720h", "overlap": "24h"})["password"]
    clock = operator_running.clock

    clock.advance(720 * 3600 + 1)
    entry = _entry(kube_api, lambda e: "previousPasswordHash" in e, "a scheduled rotation")
    second = kube_api.secret_data("shop", "orders-smtp")["password"]
    assert second != first
    assert entry.check_password(second, now=clock())
    assert entry.check_password(first, now=clock())
    # The rotation state is kept in the relay's namespace, not in the tenant's Secret.
    cred = kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders")
    assert cred is not None
    state = kube_api.secret_data("mail", f"mailplane-credential-{cred['metadata']['uid']}")
    assert verify_password(first, state["previousPasswordHash"])
    assert "password" not in state and verify_password(second, state["passwordHash"])
    secret = kube_api.get(k.SECRETS, "shop", "orders-smtp")
    assert secret is not None
    assert set(secret["metadata"].get("annotations", {})) <= {"mailplane.io/applied-fields"}

    clock.advance(24 * 3600 + 1)
    entry = _entry(kube_api, lambda e: "previousPasswordHash" not in e, "the overlap end")
    assert entry.check_password(second, now=clock())
    assert not entry.check_password(first, now=clock())
    kube_api.wait_until(lambda: "PasswordRotated" in [e["reason"] for e in kube_api.events("shop")],
                        what="the PasswordRotated event")
    text = operator_running.metrics_text()
    assert 'mailplane_operator_credentials{state="active"} 1.0' in text
    assert ('mailplane_operator_credential_rotation_interval_seconds{name="orders",'
            'namespace="shop"} 2.592e+06') in text


def test_a_deleted_credential_is_gone_from_the_config_when_its_object_is(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("billing", ["example.com"]))
    kube_api.wait_until(lambda: "shop.billing" in rendered_credentials(kube_api),
                        what="the second credential")

    kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None)
    # The finalizer is released only after a render without it: no second wait needed.
    assert set(rendered_credentials(kube_api)) == {"shop.billing"}
    relay = kube_api.get(k.SMTP_RELAYS, "mail", "main")
    assert relay is not None
    assert relay["status"]["credentialCount"] == 1


def test_credentials_the_relay_does_not_accept_say_why(kube_api: KubeApi,
                                                       operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.create(k.NAMESPACES, namespace_body("intruder"))
    kube_api.create(k.SMTP_CREDENTIALS,
                    credential_body("sneaky", ["example.com"], namespace="intruder"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("spoof", ["bank.example"]))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("lost", ["example.com"], relay="nope"))

    expected = {("intruder", "sneaky"): "NamespaceNotAllowed",
                ("shop", "spoof"): "SenderDomainNotAttached",
                ("shop", "lost"): "RelayNotFound"}
    for (ns, name), reason in expected.items():
        cred = kube_api.wait_for(k.SMTP_CREDENTIALS, ns, name,
                                 lambda o: o and o.get("status", {}).get("conditions"))
        ready = _condition(cred)
        assert (ready["status"], ready["reason"]) == ("False", reason), (name, ready)
        assert ready["observedGeneration"] == 1
    # Events are posted in the background: wait for them rather than read once.
    kube_api.wait_until(lambda: {("sneaky", "NamespaceNotAllowed"),
                                 ("spoof", "SenderDomainNotAttached")} <= {
        (e["involvedObject"]["name"], e["reason"]) for e in kube_api.events()
        if e["type"] == "Warning"}, what="the Warning events")
    assert set(rendered_credentials(kube_api)) == {USER}
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and o.get("status", {}).get("excludedCount") == 2)
    assert relay["status"]["credentialCount"] == 1
    # The admitted one was reconciled before its domain's key existed: its timer catches up.
    kube_api.wait_until(lambda: 'mailplane_operator_credentials{state="invalid"} 3.0' in
                        operator_running.metrics_text(), poll=0.1, what="the credential metrics")
    assert 'mailplane_operator_credentials{state="active"} 1.0' in operator_running.metrics_text()


def test_suspension_reaches_the_relay_and_the_condition(kube_api: KubeApi,
                                                        operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
                   {"spec": {"suspended": True, "suspendedReason": "bounce rate"}})
    entry = _entry(kube_api, lambda e: bool(e.get("suspended")), "the suspension")
    assert entry.suspended_reason == "bounce rate"
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders",
                             lambda o: o and _condition(o)["reason"] == "Suspended")
    assert _condition(cred)["status"] == "False"
    assert cred["status"]["observedGeneration"] == 2
