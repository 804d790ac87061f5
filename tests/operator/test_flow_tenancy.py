"""Two tenants on one relay, on the API emulator with the real operator and a DNS server on
loopback: tenant A owns and verifies example.com; tenant B tries to use it without a grant, to
claim it from an alphabetically earlier namespace, to skip verification, and A's DNS fails
during a re-check. Every refusal names its reason in status and in an Event."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import yaml

from mailplane_operator import kube as k
from tests.helpers.dns import LoopbackDNS
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

ACCESS = {"mailplane.io/smtp-access": "true"}


def _signing(api: KubeApi) -> dict[str, Any]:
    out = {}
    for text in rendered_config(api).values():
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "RelayDomains":
                out.update({d["name"]: d["dkim"] for d in doc["spec"]["domains"]})
    return out


def _ready(obj: dict[str, Any] | None) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or ():
        if cond["type"] == "Ready":
            return dict(cond)
    return {}


def _cond(obj: dict[str, Any], type_: str) -> tuple[str, str]:
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == type_)
    return cond["status"], cond["reason"]


def _wait_reason(api: KubeApi, resource: k.Resource, namespace: str, name: str,
                 reason: str) -> dict[str, Any]:
    obj: dict[str, Any] = api.wait_for(resource, namespace, name,
                                       lambda o: _ready(o).get("reason") == reason)
    return obj


def _event(api: KubeApi, namespace: str, name: str, reason: str) -> dict[str, Any]:
    def find() -> dict[str, Any] | None:
        return next((e for e in api.events(namespace)
                     if e["involvedObject"]["name"] == name and e["reason"] == reason), None)

    found: dict[str, Any] = api.wait_until(find, what=f"Event {reason} on {namespace}/{name}")
    return found


def _publish_dkim(dns: LoopbackDNS, obj: dict[str, Any]) -> None:
    for record in obj["status"]["dnsRecords"]:
        dns.add_txt(record["name"], record["value"])


def _next_second(created: str) -> None:
    """creationTimestamp has one-second resolution: make the next object clearly later."""
    while time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()) <= created:
        time.sleep(0.05)


def test_two_tenants_share_a_relay_and_b_cannot_take_what_is_a_s(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    operator = operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    api = kube_api
    api.create(k.NAMESPACES, namespace_body("mail"))
    for ns in ("tenant-a", "tenant-b", "aaa-b"):
        api.create(k.NAMESPACES, namespace_body(ns, **ACCESS))
    api.create(k.SMTP_RELAYS, relay_body())

    # Tenant A owns example.com and verifies it in DNS.
    a_domain = domain_body("example-com", "example.com", namespace="tenant-a",
                           relay="main", skip_verification=False,
                           relayRef={"name": "main", "namespace": "mail"})
    del a_domain["spec"]["allowedNamespaces"]  # no grant to anybody yet
    api.create(k.SENDING_DOMAINS, a_domain)
    pending = api.wait_for(k.SENDING_DOMAINS, "tenant-a", "example-com",
                           lambda o: o and (o.get("status") or {}).get("dnsRecords"))
    _publish_dkim(dns_server, pending)
    owned = _wait_reason(api, k.SENDING_DOMAINS, "tenant-a", "example-com", "Verified")
    api.wait_until(lambda: "example.com" in _signing(api), what="A's key rendered")
    a_signing = _signing(api)["example.com"]
    assert a_signing["selector"] == "mp"
    api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"],
                                                   namespace="tenant-a"))
    api.wait_until(lambda: "tenant-a.orders" in rendered_credentials(api), what="A's login")

    # 1. B names A's domain without a grant: refused, reason named, nothing rendered.
    api.create(k.SMTP_CREDENTIALS, credential_body("spoof", ["ceo@example.com"],
                                                   namespace="tenant-b"))
    refused = _wait_reason(api, k.SMTP_CREDENTIALS, "tenant-b", "spoof", "SenderNotGranted")
    message = _ready(refused)["message"]
    assert "example.com belongs to SendingDomain tenant-a/example-com" in message
    assert "ask the owners of namespace 'tenant-a'" in message
    assert _ready(refused)["status"] == "False"
    _event(api, "tenant-b", "spoof", "SenderNotGranted")
    assert "tenant-b.spoof" not in rendered_credentials(api)

    # ... and once A grants tenant-b, it works.
    api.patch(k.SENDING_DOMAINS, "tenant-a", "example-com", {"spec": {"allowedNamespaces": {
        "matchExpressions": [{"key": "kubernetes.io/metadata.name", "operator": "In",
                              "values": ["tenant-b"]}]}}})
    api.wait_until(lambda: "tenant-b.spoof" in rendered_credentials(api),
                   what="B's login after the grant")
    _wait_reason(api, k.SMTP_CREDENTIALS, "tenant-b", "spoof", "CredentialReady")

    # 2. B claims example.com from a namespace that sorts first, and even gets it verified.
    _next_second(owned["metadata"]["creationTimestamp"])
    b_claim = domain_body("grab", "example.com", namespace="aaa-b", skip_verification=False,
                          relayRef={"name": "main", "namespace": "mail"},
                          dkim={"selector": "grab", "algorithm": "ed25519"})
    api.create(k.SENDING_DOMAINS, b_claim)
    b_pending = api.wait_for(k.SENDING_DOMAINS, "aaa-b", "grab",
                             lambda o: o and (o.get("status") or {}).get("dnsRecords"))
    _publish_dkim(dns_server, b_pending)
    conflict = _wait_reason(api, k.SENDING_DOMAINS, "aaa-b", "grab", "DomainConflict")
    assert "belongs to SendingDomain tenant-a/example-com" in _ready(conflict)["message"]
    assert conflict["status"].get("verifiedTime"), "verified, and still not the owner"
    _event(api, "aaa-b", "grab", "DomainConflict")
    assert _signing(api)["example.com"] == a_signing, "A's key, selector and signing unchanged"
    assert _ready(api.get(k.SENDING_DOMAINS, "tenant-a", "example-com"))["reason"] == "Verified"
    # Nor the domain's metrics (the claim has its own selector, "grab").
    metrics = operator.metrics_text()
    assert 'mailplane_operator_domain_verified{check="dkim",domain="example.com"} 1.0' in metrics
    assert 'selector="grab"' not in metrics

    # 3. B skips verification in its own namespace: the platform has not allowed it.
    api.create(k.SENDING_DOMAINS, domain_body(
        "b-example", "b.example", namespace="tenant-b", skip_verification=True,
        relayRef={"name": "main", "namespace": "mail"}))
    skipped = _wait_reason(api, k.SENDING_DOMAINS, "tenant-b", "b-example",
                           "VerificationSkipNotAllowed")
    assert "spec.tenancy.verificationSkipNamespaces of SmtpRelay mail/main" in _ready(
        skipped)["message"]
    _event(api, "tenant-b", "b-example", "VerificationSkipNotAllowed")
    assert "b.example" not in _signing(api)
    # The platform allows it (on the SmtpRelay, which tenants cannot write): it takes effect.
    api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {
        "verificationSkipNamespaces": {"matchLabels": {"kubernetes.io/metadata.name":
                                                       "tenant-b"}}}}})
    _wait_reason(api, k.SENDING_DOMAINS, "tenant-b", "b-example", "VerificationSkipped")
    api.wait_until(lambda: "b.example" in _signing(api), what="b.example signed")

    # 4. DNS fails (SERVFAIL) during A's re-check: A stays enabled, DNSVerified=Unknown.
    for record in owned["status"]["dnsRecords"]:
        dns_server.set_servfail(record["name"])
    api.patch(k.SENDING_DOMAINS, "tenant-a", "example-com",
              {"metadata": {"annotations": {"example.test/recheck": "1"}}})
    unknown = api.wait_for(k.SENDING_DOMAINS, "tenant-a", "example-com",
                           lambda o: _cond(o, "DNSVerified")[0] == "Unknown")
    assert _cond(unknown, "DNSVerified") == ("Unknown", "DNSLookupFailed")
    dns_message = next(c["message"] for c in unknown["status"]["conditions"]
                       if c["type"] == "DNSVerified")
    assert "SERVFAIL" in dns_message
    assert _ready(unknown)["status"] == "True"
    assert "disableTime" not in unknown["status"]
    assert _signing(api)["example.com"] == a_signing
    assert {"tenant-a.orders", "tenant-b.spoof"} <= set(rendered_credentials(api))
    # A DNS outage is not "records gone" for the alerts either.
    assert 'mailplane_operator_domain_verified{check="dkim",domain="example.com"} 1.0' in (
        operator.metrics_text())

    # The grant is withdrawn: B's credential is revoked at the next render.
    api.patch(k.SENDING_DOMAINS, "tenant-a", "example-com",
              {"spec": {"allowedNamespaces": None}})
    api.wait_until(lambda: "tenant-b.spoof" not in rendered_credentials(api),
                   what="B revoked")
    _wait_reason(api, k.SMTP_CREDENTIALS, "tenant-b", "spoof", "SenderNotGranted")

    # A deletes its domain: B's verified claim takes over (the documented rule).
    api.delete(k.SENDING_DOMAINS, "tenant-a", "example-com")
    api.wait_until(lambda: _signing(api).get("example.com", {}).get("selector") == "grab",
                   what="the next claim owns the domain")
    _wait_reason(api, k.SENDING_DOMAINS, "aaa-b", "grab", "Verified")


def test_a_grant_by_namespace_label_follows_the_label(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    """The relay admits shop (its access label); example.com is granted to namespaces labelled
    team=orders. Taking that label away revokes the credential at once; giving it back
    re-admits it. Only a cluster admin can change a Namespace's labels."""
    api = kube_api
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", team="orders", **ACCESS))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body(
        "example-com", "example.com", allowedNamespaces={"matchLabels": {"team": "orders"}}))
    api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    api.wait_until(lambda: "shop.orders" in rendered_credentials(api), what="granted")

    api.patch(k.NAMESPACES, None, "shop", {"metadata": {"labels": {"team": None}}})
    api.wait_until(lambda: "shop.orders" not in rendered_credentials(api), what="revoked")
    refused = _wait_reason(api, k.SMTP_CREDENTIALS, "shop", "orders", "SenderNotGranted")
    assert "SendingDomain mail/example-com" in _ready(refused)["message"]

    api.patch(k.NAMESPACES, None, "shop", {"metadata": {"labels": {"team": "orders"}}})
    api.wait_until(lambda: "shop.orders" in rendered_credentials(api), what="granted again")
    _wait_reason(api, k.SMTP_CREDENTIALS, "shop", "orders", "CredentialReady")
