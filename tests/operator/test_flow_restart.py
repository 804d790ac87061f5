"""An operator restart in the middle of rotations loses nothing and writes nothing it need not:
the rotation state lives in Secrets (the credential's in the relay's namespace), and kopf's
indexes are complete before handlers run."""

from __future__ import annotations

from collections.abc import Callable

from mailplane_operator import kube as k
from tests.helpers.dns import LoopbackDNS
from tests.helpers.kube import (
    FakeClock,
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_config,
    rendered_credentials,
)


def _rv(api: KubeApi, resource: k.Resource, ns: str, name: str) -> str:
    obj = api.get(resource, ns, name)
    assert obj is not None
    return str(obj["metadata"]["resourceVersion"])


def test_restart_mid_rotation(kube_api: KubeApi, dns_server: LoopbackDNS,
                              operator_factory: Callable[..., RunningOperator]) -> None:
    clock = FakeClock()
    resolver = (dns_server.address, dns_server.port)
    first = operator_factory(clock=clock, dns_resolver=resolver)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.create(k.SENDING_DOMAINS, domain_body(
        "example-com", "example.com", skip_verification=False, spf={"include": ["spf.example"]}))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "orders", ["example.com"], rotation={"interval": "720h", "overlap": "24h"}))
    domain = kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com",
                               lambda o: o and o.get("status", {}).get("dnsRecords"))
    for record in domain["status"]["dnsRecords"]:
        dns_server.add_txt(record["name"], record["value"])
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api), what="render")
    old_password = kube_api.secret_data("shop", "orders-smtp")["password"]

    # Mid-rotation: a password rotated with the old one in its overlap, a DKIM key waiting for
    # DNS to serve the next selector.
    kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
                   {"metadata": {"annotations": {"mailplane.io/rotate": "now"}}})
    kube_api.patch(k.SENDING_DOMAINS, "mail", "example-com",
                   {"metadata": {"annotations": {"mailplane.io/rotate": "now"}}})
    kube_api.wait_until(lambda: "previousPasswordHash" in rendered_credentials(kube_api).get(
        "shop.orders", {}), what="the password rotation")
    pending = kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com", lambda o: o and o[
        "status"]["dkim"]["phase"] == "NextKeyPublished")
    next_selector = pending["status"]["dkim"]["nextSelector"]
    new_password = kube_api.secret_data("shop", "orders-smtp")["password"]
    first.stop()

    files = rendered_config(kube_api)
    cred = kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders")
    assert cred is not None
    state = f"mailplane-credential-{cred['metadata']['uid']}"
    versions = {(r.plural, ns, n): _rv(kube_api, r, ns, n) for r, ns, n in (
        (k.SECRETS, "mail", "main-config-0"), (k.SECRETS, "shop", "orders-smtp"),
        (k.SECRETS, "mail", state), (k.SECRETS, "mail", "example-com-dkim"))}
    status = cred["status"]

    second = operator_factory(clock=clock, dns_resolver=resolver)
    kube_api.wait_until(lambda: second.runtime and second.runtime[0].workers.get(
        ("mail", "main")) and second.runtime[0].workers[("mail", "main")].renders >= 1,
        poll=0.05, what="the new operator's first render")
    assert rendered_config(kube_api) == files, "the restart changed the relay configuration"
    assert versions == {key: _rv(kube_api, k.Resource("", "v1", key[0], "Secret"), *key[1:])
                        for key in versions}
    entry = rendered_credentials(kube_api)["shop.orders"]
    assert "previousPasswordHash" in entry
    assert kube_api.secret_data("shop", "orders-smtp")["password"] == new_password
    after = kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders")
    assert after is not None
    for field in ("lastRotationTime", "nextRotationTime", "previousPasswordExpires",
                  "lastRotationRequest"):
        assert after["status"][field] == status[field], field

    # The new operator carries both rotations on.
    for record in pending["status"]["dnsRecords"]:
        if record["state"] == "next":
            dns_server.add_txt(record["name"], record["value"])
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "example-com", lambda o: o and o[
        "status"]["dkim"]["activeSelector"] == next_selector)
    clock.advance(25 * 3600)
    kube_api.wait_until(lambda: "previousPasswordHash" not in rendered_credentials(kube_api)[
        "shop.orders"], what="the overlap end")
    assert kube_api.secret_data("shop", "orders-smtp")["password"] == new_password != old_password
