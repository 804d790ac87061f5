"""External-dns publication: a SendingDomain's records as a DNSEndpoint (owned by it), published
by a stand-in for external-dns into a DNS server on loopback until the domain verifies; only
where the relay allows it, only when the CRD is served (asked again later), removed when turned
off."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import pytest

from mailplane_operator import kube as k
from mailplane_operator.reconcile import dnsendpoint
from mailplane_operator.reconcile.models import parse_sending_domain
from tests.helpers.dns import LoopbackDNS
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    domain_body,
    namespace_body,
    relay_body,
    serve_dns_endpoints,
)


def _cond(obj: dict[str, Any] | None, type_: str) -> tuple[str, str] | None:
    for c in ((obj or {}).get("status") or {}).get("conditions") or []:
        if c["type"] == type_:
            return c["status"], c["reason"]
    return None


def _external_dns(api: KubeApi, dns: LoopbackDNS, namespace: str, name: str) -> int:
    """What external-dns does with a DNSEndpoint: each target of a TXT endpoint is one record
    (a target written as quoted strings is one record of those strings, joined back)."""
    obj = api.get(k.DNS_ENDPOINTS, namespace, name)
    assert obj is not None
    for endpoint in obj["spec"]["endpoints"]:
        assert endpoint["recordType"] == "TXT"
        for target in endpoint["targets"]:
            parts = re.findall(r'"((?:[^"\\]|\\.)*)"', target)
            dns.add_txt(endpoint["dnsName"], "".join(parts) if parts else target)
    return len(obj["spec"]["endpoints"])


def test_records_are_published_through_a_dnsendpoint_until_the_domain_verifies(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    serve_dns_endpoints(kube_api.emulator)
    operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.create(k.SENDING_DOMAINS, domain_body(
        "example-com", "example.com", skip_verification=False,
        dnsEndpoint={"enabled": True, "recordTTL": 300, "labels": {"dns": "public"}}))

    ep = kube_api.wait_for(k.DNS_ENDPOINTS, "mail", "example-com-dns")
    domain = kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                               lambda o: _cond(o, "DNSPublished") == ("True", "Published"))
    owner = ep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "SendingDomain", domain["metadata"]["uid"], True)
    assert ep["metadata"]["labels"]["dns"] == "public"
    wanted = {(r["name"], r["value"]) for r in domain["status"]["dnsRecords"]}
    listed = {(e["dnsName"], t) for e in ep["spec"]["endpoints"] for t in e["targets"]}
    assert listed == wanted
    assert {e["recordTTL"] for e in ep["spec"]["endpoints"]} == {300}
    assert _cond(domain, "DKIMVerified") != ("True", "Verified")

    # external-dns publishes what the DNSEndpoint lists: that alone verifies the domain.
    assert _external_dns(kube_api, dns_server, "mail", "example-com-dns") == 3
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                      lambda o: _cond(o, "Ready") == ("True", "Verified"))

    # Turned off: the DNSEndpoint goes (external-dns then removes the records), the condition
    # too.
    kube_api.patch(k.SENDING_DOMAINS, "mail", "example-com",
                   {"spec": {"dnsEndpoint": {"enabled": False}}})
    kube_api.wait_for(k.DNS_ENDPOINTS, "mail", "example-com-dns", lambda o: o is None)
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                      lambda o: o and _cond(o, "DNSPublished") is None)


def test_a_tenant_publishes_only_where_the_relay_allows_it_and_never_over_another_object(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    serve_dns_endpoints(kube_api.emulator)
    # The operator's default publishes for every SendingDomain that leaves it unset.
    operator_factory(dns_resolver=(dns_server.address, dns_server.port), dns_endpoints=True)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.create(k.SENDING_DOMAINS, domain_body(
        "shop-example", "shop.example", namespace="shop", skip_verification=False,
        relayRef={"name": "main", "namespace": "mail"}))
    kube_api.wait_for(k.SENDING_DOMAINS, "shop", "shop-example",
                      lambda o: _cond(o, "DNSPublished") == ("False", "PublishNotAllowed"))
    assert kube_api.get(k.DNS_ENDPOINTS, "shop", "shop-example-dns") is None

    # A DNSEndpoint of that name the tenant made itself is never taken over.
    kube_api.create(k.DNS_ENDPOINTS, {
        "apiVersion": "externaldns.k8s.io/v1alpha1", "kind": "DNSEndpoint",
        "metadata": {"name": "shop-example-dns", "namespace": "shop"},
        "spec": {"endpoints": [{"dnsName": "www.shop.example", "recordType": "A",
                                "targets": ["192.0.2.1"]}]}})
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {
        "dnsPublishNamespaces": {"matchLabels": {"mailplane.io/smtp-access": "true"}}}}})
    kube_api.wait_for(k.SENDING_DOMAINS, "shop", "shop-example",
                      lambda o: _cond(o, "DNSPublished") == ("False", "ChildWriteFailed"))
    theirs = kube_api.get(k.DNS_ENDPOINTS, "shop", "shop-example-dns")
    assert theirs is not None
    assert theirs["spec"]["endpoints"][0]["dnsName"] == "www.shop.example"

    kube_api.delete(k.DNS_ENDPOINTS, "shop", "shop-example-dns")
    ours = kube_api.wait_for(k.DNS_ENDPOINTS, "shop", "shop-example-dns",
                             lambda o: o and o["metadata"].get("ownerReferences"))
    assert "mp._domainkey.shop.example" in {e["dnsName"] for e in ours["spec"]["endpoints"]}

    # The platform takes the grant back: the DNSEndpoint goes.
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {
        "dnsPublishNamespaces": None}}})
    kube_api.wait_for(k.DNS_ENDPOINTS, "shop", "shop-example-dns", lambda o: o is None)
    kube_api.wait_for(k.SENDING_DOMAINS, "shop", "shop-example",
                      lambda o: _cond(o, "DNSPublished") == ("False", "PublishNotAllowed"))


def test_the_dnsendpoint_appears_once_external_dns_is_installed(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    operator_factory(dns_resolver=(dns_server.address, dns_server.port), discovery_ttl=0.3,
                     dns_recheck_interval=120.0)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    # Verified (skipped) domains are checked again only hourly: the missing CRD must not wait
    # for that.
    kube_api.create(k.SENDING_DOMAINS, domain_body(
        "example-com", "example.com", dnsEndpoint={"enabled": True}))
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                      lambda o: _cond(o, "DNSPublished") == ("False", "DNSEndpointCRDMissing"))
    serve_dns_endpoints(kube_api.emulator)
    kube_api.wait_for(k.DNS_ENDPOINTS, "mail", "example-com-dns", timeout=15)
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                      lambda o: _cond(o, "DNSPublished") == ("True", "Published"))


def _parsed(**dns_endpoint: Any) -> Any:
    body = domain_body("example-com", "example.com", dnsEndpoint=dns_endpoint)
    body["metadata"]["uid"] = "u1"
    return parse_sending_domain(body)


RSA_VALUE = "v=DKIM1; k=rsa; p=" + "A" * 392


@pytest.mark.parametrize("split", [False, True])
def test_manifest_lists_the_selected_records_and_splits_long_txt_values_on_request(
        split: bool) -> None:
    records = [
        {"purpose": "dkim", "type": "TXT", "name": "mp._domainkey.example.com",
         "value": RSA_VALUE},
        {"purpose": "dkim", "type": "TXT", "name": "mp2._domainkey.example.com",
         "value": "v=DKIM1; k=ed25519; p=abc"},
        {"purpose": "spf", "type": "TXT", "name": "example.com", "value": "v=spf1 mx ~all"},
        {"purpose": "dmarc", "type": "TXT", "name": "_dmarc.example.com",
         "value": "v=DMARC1; p=none"},
    ]
    out = dnsendpoint.manifest(_parsed(records=["dkim", "dmarc"], splitTXT=split), records)
    by_name = {e["dnsName"]: e["targets"] for e in out["spec"]["endpoints"]}
    assert set(by_name) == {"mp._domainkey.example.com", "mp2._domainkey.example.com",
                            "_dmarc.example.com"}
    assert by_name["mp2._domainkey.example.com"] == ["v=DKIM1; k=ed25519; p=abc"]
    if split:
        assert by_name["mp._domainkey.example.com"] == [
            f'"{RSA_VALUE[:255]}" "{RSA_VALUE[255:]}"']
    else:
        assert by_name["mp._domainkey.example.com"] == [RSA_VALUE]


def test_a_quote_in_a_long_spf_record_is_escaped_when_split() -> None:
    value = 'v=spf1 exp=x"y ' + "include:a.example " * 20 + "~all"
    out = dnsendpoint.manifest(_parsed(splitTXT=True), [
        {"purpose": "spf", "type": "TXT", "name": "example.com", "value": value}])
    target = out["spec"]["endpoints"][0]["targets"][0]
    parts = re.findall(r'"((?:[^"\\]|\\.)*)"', target)
    assert "".join(p.replace('\\"', '"') for p in parts) == value
