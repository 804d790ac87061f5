"""The RBAC rules in operator/mailplane_operator/rbac.yaml allow every API call the operator
made while it ran the flows below, and the chart packages the same rules."""

from __future__ import annotations

import pathlib
import re
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
    rendered_credentials,
    retention_body,
    serve_service_monitors,
)

ROOT = pathlib.Path(__file__).resolve().parents[2]
RBAC = ROOT / "operator" / "mailplane_operator" / "rbac.yaml"
_PATH = re.compile(r"^/(?:api/(?P<core>v1)|apis/(?P<group>[^/]+)/(?P<version>[^/]+))"
                   r"(?:/namespaces/(?P<ns>[^/]+))?/(?P<plural>[^/]+)(?:/(?P<name>[^/]+))?"
                   r"(?:/(?P<sub>[^/]+))?$")


def _allowed(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def _needed(api: KubeApi) -> set[tuple[str, str, str]]:
    needed = set()
    for agent, method, path, query in api.emulator.audit:
        if agent.startswith("Python-urllib"):
            continue  # the test itself, acting as kubectl
        parts = path.strip("/").split("/")
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            group, plural, sub = "", "namespaces", None
            name = parts[3] if len(parts) == 4 else None
        else:
            match = _PATH.match(path)
            if match is None:
                continue  # discovery (/api, /apis/<group>/<version>): open to every client
            group = match["group"] or ""
            plural, name, sub = match["plural"], match["name"], match["sub"]
        verb = {"GET": "watch" if query.get("watch") == "true" else "get" if name else "list",
                "POST": "create", "PATCH": "patch", "DELETE": "delete", "PUT": "update"}[method]
        needed.add((group, f"{plural}/{sub}" if sub else plural, verb))
    return needed


def test_the_rbac_rules_cover_every_call(kube_api: KubeApi, dns_server: LoopbackDNS,
                                         operator_factory: Callable[..., RunningOperator]) -> None:
    serve_service_monitors(kube_api.emulator)
    operator_factory(dns_resolver=(dns_server.address, dns_server.port))
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(labels={"tier": "a"}))
    kube_api.create(k.RETENTION_POLICIES, retention_body("p", selector={"tier": "a"}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SENDING_DOMAINS, domain_body("other", "other.example",
                                                   skip_verification=False))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api), what="render")
    kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None)
    kube_api.delete(k.SENDING_DOMAINS, "mail", "other")
    kube_api.wait_for(k.SENDING_DOMAINS, "mail", "other", lambda o: o is None)

    docs = [d for d in yaml.safe_load_all(RBAC.read_text()) if d]
    allowed = _allowed([rule for doc in docs for rule in doc["rules"]])
    needed = _needed(kube_api)
    assert {("", "secrets", "create"), ("mailplane.io", "smtprelays/status", "patch"),
            ("monitoring.coreos.com", "servicemonitors", "create")} <= needed
    assert needed - allowed == set()


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
