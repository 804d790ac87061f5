"""The chart's customer portal: off by default; on, a Deployment reading the store from a
Secret, a Service, an optional Ingress, and RBAC limited to reviews and reading the CRs."""

from __future__ import annotations

import helm_python as helm
import pytest

from mailplane_cli.main import build_parser

from .conftest import CHART_DIR, load_values, render_install

NAME = "mailplane-portal"


def test_portal_is_off_by_default() -> None:
    rendered = render_install()
    assert not [o for o in rendered.objects if o["metadata"]["name"] == NAME]


def test_portal_renders_with_least_privilege() -> None:
    rendered = render_install(load_values(CHART_DIR / "ci" / "portal-values.yaml"))
    deployment = rendered.one("Deployment", NAME)
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    assert container["args"][:3] == ["portal", "--store=@/etc/mailplane/store/dsn",
                                     "--listen=0.0.0.0:8443"]
    [store] = [v for v in pod["volumes"] if v["name"] == "store"]
    assert store["secret"] == {"secretName": "mailplane-db-app",
                               "items": [{"key": "uri", "path": "dsn"}]}
    assert pod["serviceAccountName"] == NAME
    args = build_parser().parse_args(container["args"])  # the portal takes what the chart gives
    assert (args.command, args.store, args.session_idle) == ("portal", "@/etc/mailplane/store/dsn",
                                                             900)
    role = rendered.one("ClusterRole", NAME)
    assert role["rules"] == [
        {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"],
         "verbs": ["create"]},
        {"apiGroups": ["mailplane.io"], "resources": ["smtpcredentials", "sendingdomains"],
         "verbs": ["get", "list"]},
    ]  # never Secrets
    binding = rendered.one("ClusterRoleBinding", NAME)
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME,
                                    "namespace": "mailplane-system"}]
    service = rendered.one("Service", NAME)
    assert service["spec"]["ports"][0]["port"] == 80
    ingress = rendered.one("Ingress", NAME)
    assert ingress["spec"]["tls"] == [{"hosts": ["mail.example.com"],
                                       "secretName": "portal-tls"}]
    assert ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"] == {
        "name": NAME, "port": {"name": "http"}}


def test_portal_needs_the_postgresql_store() -> None:
    with pytest.raises(helm.HelmError, match=r"portal\.storeSecretRef\.name"):
        render_install({"portal": {"enabled": True}})
    with pytest.raises(helm.HelmError, match=r"portal\.ingress\.host"):
        render_install({"portal": {"enabled": True, "storeSecretRef": {"name": "db"},
                                   "ingress": {"enabled": True}}})
