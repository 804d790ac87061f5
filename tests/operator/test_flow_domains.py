"""SendingDomain flows: DNS verification against a DNS server on loopback (with backoff), the
domain reaching the relay only once verified, and staged DKIM rotation with an Event per step."""

from __future__ import annotations

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


def _signing(api: KubeApi) -> dict[str, Any]:
    """domain -> its DKIM entry in the rendered relay configuration."""
    out = {}
    for text in rendered_config(api).values():
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "RelayDomains":
                out.update({d["name"]: d["dkim"] for d in doc["spec"]["domains"]})
    return out


def _domain(api: KubeApi, check: Callable[[dict[str, Any]], Any], what: str) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = api.get(k.SENDING_DOMAINS, "mail", "example-com")
        return obj if obj is not None and obj.get("status") and check(obj) else None

    result: dict[str, Any] = api.wait_until(probe, what=what)
    return result


def _cond(obj: dict[str, Any], type_: str) -> tuple[str, str]:
    cond = next(c for c in obj["status"]["conditions"] if c["type"] == type_)
    return cond["status"], cond["reason"]


def _publish(dns: LoopbackDNS, obj: dict[str, Any], state: str | None = None) -> None:
    for record in obj["status"]["dnsRecords"]:
        if state is None or record.get("state") == state:
            dns.add_txt(record["name"], record["value"])


def _events(api: KubeApi) -> list[str]:
    return [e["reason"] for e in api.events("mail")
            if e["involvedObject"]["name"] == "example-com"]


def _setup(api: KubeApi, **domain_spec: Any) -> None:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body(
        "example-com", "example.com", skip_verification=False,
        spf={"include": ["_spf.example.com"]}, **domain_spec))


def test_a_domain_is_enabled_once_dns_serves_its_records(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    operator = operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))

    pending = _domain(kube_api, lambda o: o["status"].get("lastCheckTime"), "a first DNS check")
    assert _cond(pending, "DKIMVerified") == ("False", "RecordNotFound")
    assert _cond(pending, "SPFVerified") == ("False", "RecordNotFound")
    assert _cond(pending, "Ready")[0] == "False"
    records = {r["purpose"]: r for r in pending["status"]["dnsRecords"]}
    assert records["dkim"]["name"] == "mp._domainkey.example.com"
    assert records["dkim"]["value"].startswith("v=DKIM1; k=ed25519; p=")
    assert records["spf"]["value"] == "v=spf1 include:_spf.example.com ~all"
    assert records["dmarc"]["name"] == "_dmarc.example.com"
    assert "example.com" not in _signing(kube_api)
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders",
                             lambda o: o and o.get("status", {}).get("conditions"))
    assert cred["status"]["conditions"][0]["reason"] == "SenderDomainNotAttached"

    _publish(dns_server, pending)
    verified = _domain(kube_api, lambda o: _cond(o, "Ready")[0] == "True", "verification")
    assert _cond(verified, "DKIMVerified") == ("True", "Verified")
    assert _cond(verified, "SPFVerified") == ("True", "Verified")
    kube_api.wait_until(lambda: _signing(kube_api).get("example.com"), what="signing")
    assert _signing(kube_api)["example.com"]["selector"] == "mp"
    # The credential waiting for the domain is admitted without being touched.
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential admitted")
    looked_up = {name for name, qtype, _proto in dns_server.queries() if qtype == "TXT"}
    assert {"mp._domainkey.example.com.", "example.com.", "_dmarc.example.com."} <= looked_up
    kube_api.wait_until(lambda: "Verified" in _events(kube_api), what="the Verified event")
    text = operator.metrics_text()
    assert 'mailplane_operator_domain_verified{check="dkim",domain="example.com"} 1.0' in text


def test_dkim_rotation_publishes_switches_and_retires(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    _setup(kube_api, dkim={"selector": "mp", "algorithm": "ed25519", "retireAfter": "1s"})
    first = _domain(kube_api, lambda o: o["status"].get("dnsRecords"), "the records")
    _publish(dns_server, first)
    _domain(kube_api, lambda o: _cond(o, "Ready")[0] == "True", "verification")
    kube_api.wait_until(lambda: _signing(kube_api).get("example.com"), what="signing")

    kube_api.patch(k.SENDING_DOMAINS, "mail", "example-com",
                   {"metadata": {"annotations": {"mailplane.io/rotate": "r1"}}})
    started = _domain(kube_api, lambda o: o["status"]["dkim"]["phase"] == "NextKeyPublished",
                      "the next key")
    nxt = started["status"]["dkim"]["nextSelector"]
    assert [r["state"] for r in started["status"]["dnsRecords"] if r["purpose"] == "dkim"] == [
        "active", "next"]
    assert _signing(kube_api)["example.com"]["selector"] == "mp", "not before DNS serves it"

    _publish(dns_server, started, state="next")
    switched = _domain(kube_api, lambda o: o["status"]["dkim"]["phase"] in ("Switched", "Stable"),
                       "the switch")
    assert switched["status"]["dkim"]["activeSelector"] == nxt
    kube_api.wait_until(lambda: _signing(kube_api)["example.com"]["selector"] == nxt,
                        what="signing with the next key")

    _domain(kube_api, lambda o: o["status"]["dkim"]["phase"] == "Stable"
            and "retiringSelector" not in o["status"]["dkim"], "the retirement")
    secret = kube_api.get(k.SECRETS, "mail", "example-com-dkim")
    assert secret is not None
    assert sorted(secret["data"]) == [f"{nxt}.pem"]
    kube_api.wait_until(
        lambda: {"DKIMKeyGenerated", "DKIMRotationStarted", "DKIMSwitched",
                 "DKIMKeyRetired"} <= set(_events(kube_api)), what="one Event per step")
    assert "PRIVATE KEY" not in str(kube_api.list(k.SENDING_DOMAINS)) + str(kube_api.events())


def test_records_gone_from_dns_disable_the_domain_only_after_the_grace_period(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator]) -> None:
    operator = operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    _setup(kube_api)
    first = _domain(kube_api, lambda o: o["status"].get("dnsRecords"), "the records")
    _publish(dns_server, first)
    _domain(kube_api, lambda o: _cond(o, "Ready")[0] == "True", "verification")
    kube_api.wait_until(lambda: _signing(kube_api).get("example.com"), what="signing")

    def recheck(token: str) -> None:
        kube_api.patch(k.SENDING_DOMAINS, "mail", "example-com",
                       {"metadata": {"annotations": {"example.test/recheck": token}}})

    dns_server.clear()  # a zone edit removed every record: NXDOMAIN, a definite answer
    recheck("1")
    missing = _domain(kube_api, lambda o: o["status"].get("disableTime"), "the grace period")
    assert _cond(missing, "DNSVerified") == ("False", "RecordNotFound")
    assert _cond(missing, "Ready") == ("True", "Verified")
    kube_api.wait_until(lambda: "DNSRecordsMissing" in _events(kube_api), what="the Event")
    assert "example.com" in _signing(kube_api), "still enabled during the grace period"
    assert "mailplane_operator_domain_disable_timestamp_seconds{domain=\"example.com\"}" in (
        operator.metrics_text())

    operator.clock.advance(72 * 3600 + 60)
    recheck("2")
    disabled = _domain(kube_api, lambda o: _cond(o, "Ready")[0] == "False", "the disable")
    assert "disableTime" not in disabled["status"] and "verifiedTime" not in disabled["status"]
    kube_api.wait_until(lambda: "example.com" not in _signing(kube_api), what="unsigned")
    kube_api.wait_until(lambda: "DomainDisabled" in _events(kube_api), what="the Event")
    assert "domain_disable_timestamp_seconds{" not in operator.metrics_text()


def test_a_domain_never_takes_over_a_secret_it_did_not_create(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator]) -> None:
    """Whoever may create a SendingDomain (``mailplane-edit`` grants no Secrets) names it so that
    its DKIM Secret ``<name>-dkim`` is a Secret that exists already, made by hand or by another
    controller: the operator neither replaces its data nor rewrites its owner (which would have
    it deleted with the domain). The domain says so: Ready=False, SecretConflict, an Event."""
    operator_factory()
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    keeper = [{"apiVersion": "v1", "kind": "ConfigMap", "name": "keeper", "uid": "keeper-uid",
               "controller": True}]
    kube_api.create(k.SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "example-com-dkim", "namespace": "mail",
                     "ownerReferences": keeper},
        "data": {"password": "aHVudGVyMg=="}})
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    refused = _domain(kube_api, lambda o: _cond(o, "Ready")[1] == "SecretConflict",
                      "the conflict")
    ready = next(c for c in refused["status"]["conditions"] if c["type"] == "Ready")
    assert "mail/example-com-dkim" in ready["message"] and ready["status"] == "False"
    kube_api.wait_until(lambda: "SecretConflict" in _events(kube_api), what="the Event")
    secret = kube_api.get(k.SECRETS, "mail", "example-com-dkim")
    assert secret is not None
    assert secret["data"] == {"password": "aHVudGVyMg=="}
    assert secret["metadata"]["ownerReferences"] == keeper
    assert "example.com" not in _signing(kube_api)
    # Once the name is free, the domain gets its own Secret.
    kube_api.delete(k.SECRETS, "mail", "example-com-dkim")
    kube_api.patch(k.SENDING_DOMAINS, "mail", "example-com",
                   {"metadata": {"annotations": {"retry": "1"}}})
    _domain(kube_api, lambda o: _cond(o, "Ready")[0] == "True", "the domain enabled")
    mine = kube_api.get(k.SECRETS, "mail", "example-com-dkim")
    assert mine is not None and mine["metadata"]["ownerReferences"][0]["kind"] == "SendingDomain"
