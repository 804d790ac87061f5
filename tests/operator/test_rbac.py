"""Every API call the real operator makes is allowed by the RBAC the chart installs, judged the
way the API server's authorizer judges it: per namespace (a RoleBinding grants nothing outside
its namespace), for the operator's own ServiceAccount, with no request left unchecked.

The operator runs with its production settings (CRD scanning on) against the emulator, through
the flows that use every permission: relays with a ServiceMonitor, domains verified and
deleted, credentials created and deleted, retention policies, a namespace relabelled. Both
install modes are checked: cluster-wide (a ClusterRole) and watching some namespaces only
(Roles in those namespaces, `ci/namespaced-values.yaml`). The chart packages the rules
declared in operator/mailplane_operator/rbac.yaml."""

from __future__ import annotations

import pathlib
import re
from collections.abc import Callable
from typing import Any

import pytest
import yaml

from mailplane_operator import kube as k
from tests.chart.conftest import CHART_DIR, Rendered, load_values, render_install
from tests.helpers.dns import LoopbackDNS
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
    retention_body,
    serve_dns_endpoints,
    serve_service_monitors,
)
from tests.helpers.rbac import Authorizer, Request

ROOT = pathlib.Path(__file__).resolve().parents[2]
RBAC = ROOT / "operator" / "mailplane_operator" / "rbac.yaml"

_RESOURCE = re.compile(
    r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
    r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?"
    r"(?:/(?P<sub>[^/]+))?$")
# Discovery and version endpoints: open to every authenticated client (system:discovery).
_DISCOVERY = re.compile(r"^/(?:api|apis|version|api/v1|apis/[^/]+|apis/[^/]+/[^/]+)/?$")
_VERBS = {"POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}


def to_request(method: str, path: str, query: dict[str, str]) -> Request | None:
    """The authorizer's view of one HTTP request; None for discovery. Anything else that
    cannot be read fails the test: an unparsed request is an unchecked one."""
    if method == "GET" and _DISCOVERY.match(path):
        return None
    parts = path.strip("/").split("/")
    if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
        group, plural, sub, ns = "", "namespaces", None, None
        name = parts[3] if len(parts) == 4 else None
    else:
        match = _RESOURCE.match(path)
        assert match is not None, f"an API call the test cannot read: {method} {path}"
        group, ns = match["group"] or "", match["ns"]
        plural, name, sub = match["plural"], match["name"], match["sub"]
    if method == "GET":
        verb = "get" if name else "watch" if query.get("watch") in ("true", "1") else "list"
    else:
        assert method in _VERBS, f"unexpected method {method} {path}"
        verb = _VERBS[method]
    return Request(verb=verb, group=group, resource=f"{plural}/{sub}" if sub else plural,
                   namespace=ns, name=name)


def operator_identity(rendered: Rendered) -> str:
    [deployment] = [d for d in rendered.of_kind("Deployment")
                    if d["metadata"]["name"].endswith("-operator")]
    account = deployment["spec"]["template"]["spec"]["serviceAccountName"]
    return f"system:serviceaccount:{deployment['metadata']['namespace']}:{account}"


def blocking_owner_requests(api: KubeApi) -> set[Request]:
    """OwnerReferencesPermissionEnforcement: an object whose ownerReference sets
    blockOwnerDeletion may be written only by someone allowed to update the owner's
    finalizers subresource (in the object's namespace, for that owner's name)."""
    plural = {r.kind: r.plural for r in k.BY_KIND.values()}
    out = set()
    for resource in (k.SECRETS, k.SERVICES, k.STATEFULSETS, k.PDBS, k.SERVICE_MONITORS,
                     k.NETWORK_POLICIES):
        for obj in api.list(resource):
            for ref in obj["metadata"].get("ownerReferences") or []:
                if ref.get("blockOwnerDeletion"):
                    out.add(Request(verb="update", group=ref["apiVersion"].split("/")[0],
                                    resource=f"{plural[ref['kind']]}/finalizers",
                                    namespace=obj["metadata"]["namespace"], name=ref["name"]))
    return out


def run_flows(api: KubeApi) -> set[Request]:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body(labels={"tier": "a"}))
    api.create(k.RETENTION_POLICIES, retention_body("p", selector={"tier": "a"}))
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com",
                                              dnsEndpoint={"enabled": True}))
    api.create(k.SENDING_DOMAINS, domain_body("other", "other.example", skip_verification=False))
    # A webhook signing Secret, watched (label selector) in the credential's namespace.
    api.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret", "metadata": {
        "name": "hook", "namespace": "shop", "labels": {"mailplane.io/webhook-secret": "true"}},
        "data": {"secret": "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="}})
    api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["example.com"], webhook={
        "url": "https://hooks.example/x", "secretRef": {"name": "hook"}}))
    api.wait_until(lambda: "webhook" in rendered_credentials(api).get("shop.orders", {}),
                   what="render")
    api.wait_for(k.DNS_ENDPOINTS, "mail", "example-com-dns")
    blocking = blocking_owner_requests(api)  # before the owners go
    # A spool size change: the StatefulSet is replaced (orphan delete) and the volumes grow.
    api.create(k.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
        "name": "spool-main-0", "namespace": "mail", "labels": {
            "app.kubernetes.io/name": "mailplane-relay", "app.kubernetes.io/instance": "main"}},
        "spec": {"resources": {"requests": {"storage": "10Gi"}}}})
    api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"spool": {"size": "20Gi"}}})
    api.wait_for(k.PVCS, "mail", "spool-main-0",
                 lambda o: o and o["spec"]["resources"]["requests"]["storage"] == "20Gi")
    api.patch(k.NAMESPACES, None, "shop", {"metadata": {"labels": {"team": "shop"}}})
    api.patch(k.SENDING_DOMAINS, "mail", "example-com",
              {"spec": {"dnsEndpoint": {"enabled": False}}})
    api.wait_for(k.DNS_ENDPOINTS, "mail", "example-com-dns", lambda o: o is None)
    api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
    api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None)
    api.delete(k.SENDING_DOMAINS, "mail", "other")
    api.wait_for(k.SENDING_DOMAINS, "mail", "other", lambda o: o is None)
    return blocking


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_every_operator_call_is_allowed_by_the_chart_rbac(
        kube_api: KubeApi, dns_server: LoopbackDNS,
        operator_factory: Callable[..., RunningOperator], mode: str) -> None:
    values: dict[str, Any] = {}
    namespaces: tuple[str, ...] = ()
    if mode == "namespaced":
        values = load_values(CHART_DIR / "ci" / "namespaced-values.yaml")
        namespaces = tuple(values["operator"]["watchNamespaces"])
    rendered = render_install(values)
    authorizer = Authorizer(rendered.objects)
    user = operator_identity(rendered)

    serve_service_monitors(kube_api.emulator)
    serve_dns_endpoints(kube_api.emulator)
    operator_factory(dns_resolver=(dns_server.address, dns_server.port), namespaces=namespaces)
    blocking = run_flows(kube_api)

    calls = [(m, p, q) for agent, m, p, q in kube_api.emulator.audit
             if not agent.startswith("Python-urllib")]  # the test itself, acting as kubectl
    checked = [(m, p, r) for m, p, q in calls if (r := to_request(m, p, q)) is not None]
    denied = sorted({f"{r.verb} {r.group or 'core'}/{r.resource} in {r.namespace or '(cluster)'}"
                     for _m, _p, r in checked if not authorizer.allowed(user, r)})
    assert denied == []
    # Every child the operator wrote with blockOwnerDeletion is one the admission plugin admits.
    assert {r.resource for r in blocking} == {
        "smtprelays/finalizers", "sendingdomains/finalizers", "smtpcredentials/finalizers"}
    assert sorted(f"{r.resource} {r.namespace}/{r.name}" for r in blocking
                  if not authorizer.allowed(user, r)) == []
    # The flows reached the permissions that matter (a run that made no calls proves nothing).
    made = {(r.verb, r.resource) for _m, _p, r in checked}
    assert {("create", "secrets"), ("patch", "smtprelays/status"), ("create", "servicemonitors"),
            ("watch", "namespaces"), ("watch", "customresourcedefinitions"), ("watch", "secrets"),
            ("create", "dnsendpoints"), ("delete", "dnsendpoints")} - made == set(), \
        sorted(made)


def test_a_call_outside_the_granted_namespaces_is_denied() -> None:
    """The judge itself: the namespaced install grants nothing in a third namespace."""
    values = load_values(CHART_DIR / "ci" / "namespaced-values.yaml")
    rendered = render_install(values)
    authorizer = Authorizer(rendered.objects)
    user = operator_identity(rendered)
    inside = to_request("POST", "/api/v1/namespaces/shop/secrets", {})
    outside = to_request("POST", "/api/v1/namespaces/elsewhere/secrets", {})
    assert inside is not None and outside is not None
    assert authorizer.allowed(user, inside)
    assert not authorizer.allowed(user, outside)
    assert not authorizer.allowed("system:serviceaccount:mailplane-system:someone-else", inside)


def _allowed(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_the_chart_grants_the_same_rules() -> None:
    chart = (ROOT / "charts" / "mailplane" / "templates" / "rbac.yaml").read_text()
    block = chart.split('{{- define "mailplane.rbac.namespacedRules" -}}', 1)[1]
    block = block.split("{{- end }}", 1)[0]
    docs = {d["metadata"]["name"]: d for d in yaml.safe_load_all(RBAC.read_text()) if d}
    assert _allowed(yaml.safe_load(block)) == _allowed(docs["mailplane-operator"]["rules"])
    cluster_rules = docs["mailplane-operator-cluster"]["rules"]
    for group, resource, verb in _allowed(cluster_rules):
        assert re.search(rf'resources: \["{resource}"\]\s+verbs: \[[^\]]*"{verb}"', chart), (
            group, resource, verb)
