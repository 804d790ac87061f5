"""Every name the CRDs accept yields children the API server accepts; names that would not are
refused at admission (the CRD's CEL rule) and by the operator's models, with a message naming
metadata.name and the fix. `mail.v2` used to make an invalid Service name, and a credential
name over 63 characters an invalid label value, on every render."""

from __future__ import annotations

from typing import Any

import pytest

from mailplane_operator import kube as k
from mailplane_operator.reconcile import models, render
from mailplane_operator.reconcile import relay as relay_mod
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
)
from tests.helpers.kube_rules import dns1123_label_errors, label_value_errors, object_errors
from tests.operator.reconcile_builders import NOW, relay
from tests.operator.test_crds import admission_errors

ACCEPTED_RELAY_NAMES = ["a", "mail-v2", "m" * 52, "x" + "-" * 50 + "9"]
REFUSED_RELAY_NAMES = ["mail.v2", "Mail", "1mail", "mail-", "m" * 53, "mail_v2"]


def _doc(kind: str, name: str) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "SmtpRelay": {"tls": {"secretName": "t"}},
        "SmtpCredential": {"relayRef": {"name": "r"}, "allowedSenders": ["example.com"]},
        "SendingDomain": {"domain": "example.com", "relayRef": {"name": "r"}},
    }[kind]
    return {"apiVersion": "mailplane.io/v1alpha1", "kind": kind,
            "metadata": {"name": name, "namespace": "mail"}, "spec": spec}


@pytest.mark.parametrize("name", ACCEPTED_RELAY_NAMES)
def test_every_accepted_relay_name_yields_valid_children(name: str) -> None:
    assert admission_errors(_doc("SmtpRelay", name)) == []
    r = relay(name, replicas=100)
    children = relay_mod.relay_children(r, service_monitor_available=True, config_hash="h")
    rendered = render.render_relay_config(r, domains=[], credentials=[], policies=[],
                                          namespace_labels={}, now=NOW)
    plural = {"Service": "services", "StatefulSet": "statefulsets", "Secret": "secrets",
              "PodDisruptionBudget": "poddisruptionbudgets", "NetworkPolicy": "networkpolicies",
              "ServiceMonitor": "servicemonitors"}
    for child in [*children, *rendered.secrets]:
        assert object_errors(plural[child["kind"]], child) == [], child["metadata"]["name"]
    # What the StatefulSet controller derives: pod names (DNS labels, up to the last ordinal;
    # their hostnames too) and the controller-revision-hash label <name>-<10 characters>.
    assert dns1123_label_errors(f"{name}-99") == []
    assert label_value_errors(f"{name}-{'7' * 10}") == []
    for i in range(relay_mod.CONFIG_SECRET_SLOTS):
        assert object_errors("secrets", {"metadata": {
            "name": relay_mod.config_secret_name(name, i)}}) == []


@pytest.mark.parametrize("name", REFUSED_RELAY_NAMES)
def test_a_relay_name_that_would_break_its_children_is_refused(name: str) -> None:
    errors = admission_errors(_doc("SmtpRelay", name))
    assert any("metadata.name" in e and "mail-v2, not mail.v2" in e for e in errors), errors
    with pytest.raises(models.SpecError, match=r"metadata\.name: an SmtpRelay's name"):
        relay(name)


@pytest.mark.parametrize("name", ["main-headless", "main-metrics"])
def test_a_relay_cannot_take_the_name_of_another_relays_service(name: str) -> None:
    """Relay "main" has Services main-headless and main-metrics: a relay named like one of
    them would have its submission Service collide with it."""
    errors = admission_errors(_doc("SmtpRelay", name))
    assert any("may not end in -headless or -metrics" in e for e in errors), errors
    with pytest.raises(models.SpecError, match="may not end in -headless or -metrics"):
        relay(name)
    services = {c["metadata"]["name"] for c in relay_mod.relay_children(relay("main"))
                if c["kind"] == "Service"}
    assert name in services


@pytest.mark.parametrize("kind", ["SmtpCredential", "SendingDomain"])
def test_credential_and_domain_names_fit_a_label_value(kind: str) -> None:
    longest, too_long = "c" * 63, "c" * 64
    assert admission_errors(_doc(kind, longest)) == []
    models.PARSERS[kind](_doc(kind, longest))
    errors = admission_errors(_doc(kind, too_long))
    assert any("metadata.name" in e and "at most 63 characters" in e for e in errors), errors
    with pytest.raises(models.SpecError, match="at most 63 characters"):
        models.PARSERS[kind](_doc(kind, too_long))
    # Dotted names (DNS subdomains) stay accepted: they are valid label values.
    assert admission_errors(_doc(kind, "orders.v2")) == []


def test_on_the_emulator_the_longest_names_work_and_bad_ones_say_why(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    """The emulator answers 422 for invalid names and label values as the API server does."""
    relay_name, cred_name, domain_name = "r" * 52, "c" * 63, "d" * 63
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(relay_name))
    kube_api.create(k.SENDING_DOMAINS, domain_body(domain_name, "example.com",
                                                   relay=relay_name))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(cred_name, ["example.com"],
                                                        relay=relay_name))
    for resource, name in ((k.SERVICES, relay_name), (k.SERVICES, f"{relay_name}-headless"),
                           (k.SERVICES, f"{relay_name}-metrics"), (k.STATEFULSETS, relay_name),
                           (k.NETWORK_POLICIES, relay_name)):
        kube_api.wait_for(resource, "mail", name)
    kube_api.wait_for(k.SECRETS, "shop", f"{cred_name}-smtp")

    # A name the CRD would refuse, created against an out-of-date CRD: the operator's models
    # refuse it too and say why, instead of failing every render on a 422.
    kube_api.create(k.SMTP_RELAYS, relay_body("mail.v2"))
    bad = kube_api.wait_for(k.SMTP_RELAYS, "mail", "mail.v2",
                            lambda o: o and o.get("status", {}).get("conditions"))
    [ready] = [c for c in bad["status"]["conditions"] if c["type"] == "Ready"]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "metadata.name" in ready["message"] and "mail-v2" in ready["message"]
    assert kube_api.get(k.SERVICES, "mail", "mail.v2") is None
