"""Static checks of the RBAC the chart grants: least privilege, status verbs separate, relays
without API access, and (once the operator declares its needs) exactly what the operator uses."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from .conftest import CHART_DIR, ROOT, Rendered, load_values, render_install

OPERATOR_RBAC = ROOT / "operator" / "mailplane_operator" / "rbac.yaml"
ALLOWED_VERBS = {"get", "list", "watch", "create", "patch", "delete"}
WRITE_VERBS = {"create", "patch", "update", "delete", "deletecollection"}
# Reads of these would expose every Secret/token in scope: granted only with a reason.
SENSITIVE = {"secrets"}


def all_rules(rendered: Rendered) -> list[dict[str, Any]]:
    """The operator's rules (the roles for people are checked in test_tenant_rbac.py)."""
    rules: list[dict[str, Any]] = []
    for obj in rendered.of_kind("ClusterRole") + rendered.of_kind("Role"):
        if obj["metadata"]["name"].endswith(("-operator", "-operator-cluster",
                                             "-operator-leader-election")):
            rules.extend(obj["rules"])
    return rules


def test_every_role_is_the_operators_or_for_people(default_render: Rendered) -> None:
    names = {o["metadata"]["name"] for o in default_render.of_kind("ClusterRole")}
    assert names == {"mailplane-operator", "mailplane-operator-cluster", "mailplane-view",
                     "mailplane-edit", "mailplane-platform"}


CASES = [
    pytest.param({}, id="all-namespaces"),
    pytest.param(load_values(CHART_DIR / "ci" / "namespaced-values.yaml"), id="namespaced"),
]


@pytest.mark.parametrize("values", CASES)
def test_no_wildcards_and_only_known_verbs(values: dict[str, Any]) -> None:
    rules = all_rules(render_install(values))
    assert rules
    for rule in rules:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        if all(r.endswith("/finalizers") for r in rule["resources"]):
            assert rule["verbs"] == ["update"], rule  # OwnerReferencesPermissionEnforcement
        else:
            assert set(rule["verbs"]) <= ALLOWED_VERBS, rule
        assert "resourceNames" not in rule or rule["resourceNames"]
        assert "nonResourceURLs" not in rule


@pytest.mark.parametrize("values", CASES)
def test_status_subresources_have_their_own_rules(values: dict[str, Any]) -> None:
    for rule in all_rules(render_install(values)):
        status = [r for r in rule["resources"] if r.endswith("/status")]
        if status:
            assert status == rule["resources"], f"status mixed with resources: {rule}"
            assert set(rule["verbs"]) == {"get", "patch"}, rule


def test_custom_resources_are_never_deleted_or_updated_by_the_operator(
    default_render: Rendered,
) -> None:
    for rule in all_rules(default_render):
        if "mailplane.io" in rule["apiGroups"] and not rule["resources"][0].endswith(
                ("/status", "/finalizers")):
            assert set(rule["verbs"]) == {"get", "list", "watch", "patch"}


def test_cluster_scope_is_read_only(default_render: Rendered) -> None:
    cluster = default_render.one("ClusterRole", "mailplane-operator-cluster")
    for rule in cluster["rules"]:
        assert not set(rule["verbs"]) & WRITE_VERBS, rule
        assert not set(rule["resources"]) & SENSITIVE


def test_watching_namespaces_grants_nothing_namespaced_cluster_wide() -> None:
    rendered = render_install(load_values(CHART_DIR / "ci" / "namespaced-values.yaml"))
    operator_roles = [r["metadata"]["name"] for r in rendered.of_kind("ClusterRole")
                      if "-operator" in r["metadata"]["name"]]
    assert operator_roles == ["mailplane-operator-cluster"]
    for binding in rendered.of_kind("RoleBinding"):
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "mail-operator",
                                        "namespace": "mailplane-system"}]


def test_relay_service_account_has_no_access(default_render: Rendered) -> None:
    relay_sa = default_render.one("ServiceAccount", "mailplane-relay")
    assert relay_sa["automountServiceAccountToken"] is False
    bound = [s["name"] for b in default_render.of_kind("ClusterRoleBinding")
             + default_render.of_kind("RoleBinding") for s in b["subjects"]]
    assert "mailplane-relay" not in bound
    assert set(bound) == {"mailplane-operator"}


def test_every_omission_is_explained() -> None:
    template = (CHART_DIR / "templates" / "rbac.yaml").read_text()
    head = template.split("-}}", 1)[0]
    for omitted in ("`update`", "`delete` on the custom resources", "`delete` on Services",
                    "`watch` on children", "`list` on Services", "Pods", "peering", "Leases",
                    "events.k8s.io"):
        assert omitted in head


def test_rbac_can_be_left_to_the_user() -> None:
    rendered = render_install({"rbac": {"create": False}})
    for kind in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"):
        assert rendered.of_kind(kind) == []


def _grants(rules: list[dict[str, Any]]) -> set[tuple[str, str, str]]:
    return {(group, resource, verb) for rule in rules for group in rule["apiGroups"]
            for resource in rule["resources"] for verb in rule["verbs"]}


def test_chart_grants_what_the_operator_declares(default_render: Rendered) -> None:
    declared_docs = [d for d in yaml.safe_load_all(OPERATOR_RBAC.read_text()) if d]
    declared: list[dict[str, Any]] = []
    for doc in declared_docs:
        declared.extend(doc.get("rules", []))
    assert _grants(all_rules(default_render)) == _grants(declared)
