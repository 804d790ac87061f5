"""The chart's aggregated ClusterRoles, evaluated as the API server's RBAC authorizer would:
a team bound to the built-in `edit` in its own namespace manages its SmtpCredentials and
SendingDomains there, and cannot touch the SmtpRelay (ceilings, platform suspensions and
verification skipping live there), any status, RetentionPolicies, other namespaces, or the
Secrets of the relay's namespace."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from tests.helpers.rbac import Authorizer, Request

from .conftest import CHART_DIR, NAMESPACE, Rendered, render_install

TENANT = "alice"  # a developer of team-b
PLATFORM = "pat"  # the platform team
KINDS = ("smtprelays", "sendingdomains", "smtpcredentials", "retentionpolicies")
WRITES = ("create", "update", "patch", "delete", "deletecollection")


def _cluster_role(name: str, labels: dict[str, str] | None = None, *,
                  aggregate: str | None = None,
                  rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    role: dict[str, Any] = {"kind": "ClusterRole", "metadata": {"name": name,
                                                                 "labels": labels or {}},
                            "rules": rules or []}
    if aggregate:
        role["aggregationRule"] = {"clusterRoleSelectors": [{"matchLabels": {
            f"rbac.authorization.k8s.io/aggregate-to-{aggregate}": "true"}}]}
    return role


# Stand-ins for Kubernetes' bootstrap roles: view, edit and admin are filled by aggregation;
# what edit grants on its own (Secrets of its namespace among others) comes from
# system:aggregate-to-edit, as in a real cluster.
BUILTIN = [
    _cluster_role("view", aggregate="view"),
    _cluster_role("edit", aggregate="edit"),
    _cluster_role("admin", aggregate="admin"),
    _cluster_role("system:aggregate-to-edit", {
        "rbac.authorization.k8s.io/aggregate-to-edit": "true",
        "rbac.authorization.k8s.io/aggregate-to-admin": "true"}, rules=[
        {"apiGroups": [""], "resources": ["secrets", "configmaps", "pods"],
         "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]),
]


def _role_binding(namespace: str, role: str, user: str) -> dict[str, Any]:
    return {"kind": "RoleBinding",
            "metadata": {"name": f"{user}-{role}", "namespace": namespace},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": role},
            "subjects": [{"kind": "User", "name": user}]}


def authorizer(rendered: Rendered) -> Authorizer:
    return Authorizer([*rendered.objects, *BUILTIN,
                       _role_binding("team-b", "edit", TENANT),
                       _role_binding(NAMESPACE, "mailplane-platform", PLATFORM)])


@pytest.fixture(scope="module")
def authz() -> Authorizer:
    return authorizer(render_install())


def can(authz: Authorizer, user: str, verb: str, resource: str, namespace: str | None) -> bool:
    group = "" if resource.split("/")[0] in ("secrets", "pods", "configmaps") else "mailplane.io"
    return authz.allowed(user, Request(verb, group, resource, namespace))


def test_a_tenant_with_edit_manages_its_credentials_and_domains_in_its_namespace(
        authz: Authorizer) -> None:
    for resource in ("smtpcredentials", "sendingdomains"):
        for verb in ("get", "list", "watch", *WRITES):
            assert can(authz, TENANT, verb, resource, "team-b"), (verb, resource)
    # Reading a relay or a retention policy that happens to be in its namespace is fine.
    assert can(authz, TENANT, "get", "smtprelays", "team-b")


def test_a_tenant_with_edit_cannot_change_what_the_platform_decides(authz: Authorizer) -> None:
    # The SmtpRelay holds the ceilings, platform suspensions and verification-skip list: no
    # write in its namespace, in the relay's namespace, or cluster-wide.
    for ns in ("team-b", NAMESPACE, None):
        for verb in WRITES:
            assert not can(authz, TENANT, verb, "smtprelays", ns), (verb, ns)
            assert not can(authz, TENANT, verb, "retentionpolicies", ns), (verb, ns)
    # Status is the operator's: a tenant cannot mark its refused credential Ready or erase
    # a platform suspension from status.
    for kind in KINDS:
        for verb in ("update", "patch"):
            assert not can(authz, TENANT, verb, f"{kind}/status", "team-b"), kind
            assert not can(authz, TENANT, verb, f"{kind}/finalizers", "team-b"), kind


def test_a_tenants_edit_reaches_nothing_outside_its_namespace(authz: Authorizer) -> None:
    # Another tenant's namespace and the relay's namespace: no credentials, no domains.
    for ns in ("team-a", NAMESPACE):
        for verb in ("get", "list", *WRITES):
            assert not can(authz, TENANT, verb, "smtpcredentials", ns), (verb, ns)
            assert not can(authz, TENANT, verb, "sendingdomains", ns), (verb, ns)
    # The relay's config Secrets (every tenant's password hashes, DKIM keys) stay out of
    # reach, while the built-in edit does grant Secrets in the tenant's own namespace (the
    # evaluator is not simply saying no to everything).
    for verb in ("get", "list", "watch"):
        assert not can(authz, TENANT, verb, "secrets", NAMESPACE)
    assert can(authz, TENANT, "get", "secrets", "team-b")


def test_the_platform_role_writes_relays_but_never_status(authz: Authorizer) -> None:
    for kind in KINDS:
        for verb in WRITES:
            assert can(authz, PLATFORM, verb, kind, NAMESPACE), (verb, kind)
            assert not can(authz, PLATFORM, verb, kind, "team-b"), (verb, kind)
        assert not can(authz, PLATFORM, "patch", f"{kind}/status", NAMESPACE)


def test_view_reads_and_never_writes(authz: Authorizer) -> None:
    viewer = Authorizer([*render_install().objects, *BUILTIN,
                         _role_binding("team-b", "view", "victor")])
    for kind in KINDS:
        assert viewer.allowed("victor", Request("list", "mailplane.io", kind, "team-b"))
        for verb in WRITES:
            assert not viewer.allowed("victor", Request(verb, "mailplane.io", kind, "team-b"))


def test_the_aggregated_roles_carry_the_labels_and_no_wildcards() -> None:
    rendered = render_install()
    view = rendered.one("ClusterRole", "mailplane-view")
    edit = rendered.one("ClusterRole", "mailplane-edit")
    label = "rbac.authorization.k8s.io/aggregate-to-{}"
    assert {k: v for k, v in view["metadata"]["labels"].items() if k.startswith("rbac.")} == {
        label.format("view"): "true", label.format("edit"): "true",
        label.format("admin"): "true"}
    assert {k: v for k, v in edit["metadata"]["labels"].items() if k.startswith("rbac.")} == {
        label.format("edit"): "true", label.format("admin"): "true"}
    platform = rendered.one("ClusterRole", "mailplane-platform")
    assert not any(k.startswith("rbac.") for k in platform["metadata"]["labels"])
    for role in (view, edit, platform):
        for rule in role["rules"]:
            assert rule["apiGroups"] == ["mailplane.io"]
            assert not [r for r in rule["resources"] if "*" in r or "/" in r], rule
            assert "*" not in rule["verbs"]
    # Nobody is bound to them by the chart: the cluster's own bindings of view/edit/admin are.
    bound = {b["roleRef"]["name"] for b in rendered.of_kind("ClusterRoleBinding")
             + rendered.of_kind("RoleBinding")}
    assert not bound & {"mailplane-view", "mailplane-edit", "mailplane-platform"}


def test_the_roles_can_be_left_out_and_each_omission_is_explained() -> None:
    names = {r["metadata"]["name"] for r in render_install(
        {"rbac": {"aggregatedClusterRoles": False}}).of_kind("ClusterRole")}
    assert not names & {"mailplane-view", "mailplane-edit", "mailplane-platform"}
    head = (CHART_DIR / "templates" / "rbac-aggregated.yaml").read_text().split("-}}", 1)[0]
    for omission in ("SmtpRelay create/update/patch/delete", "RetentionPolicy writes",
                     "`<kind>/status`", "`<kind>/finalizers`", "Secrets",
                     "not aggregated into `admin`"):
        assert omission in head, omission
    # The docs a platform team reads say the same.
    tenancy = (CHART_DIR.parents[1] / "docs" / "tenancy.md").read_text()
    section = re.split(r"^## ", tenancy, flags=re.M)
    [rbac] = [s for s in section if s.startswith("RBAC")]
    for name in ("mailplane-view", "mailplane-edit", "mailplane-platform", "aggregate-to-*"):
        assert name in rbac, name


def test_docs_rbac_example_grants_what_it_says() -> None:
    """The RoleBinding example in docs/tenancy.md, evaluated: it gives team-b edit there."""
    tenancy = (CHART_DIR.parents[1] / "docs" / "tenancy.md").read_text()
    rbac = tenancy.split("\n## RBAC", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", rbac, re.S)
    docs = [d for b in blocks for d in yaml.safe_load_all(b) if d]
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert bindings
    authz = Authorizer([*render_install().objects, *BUILTIN, *docs])
    group = next(s["name"] for b in bindings for s in b["subjects"] if s["kind"] == "Group")
    assert authz.allowed("anyone", Request("create", "mailplane.io", "smtpcredentials", "team-b"),
                         groups=[group])
    assert not authz.allowed("anyone", Request("patch", "mailplane.io", "smtprelays", "mail"),
                             groups=[group])
