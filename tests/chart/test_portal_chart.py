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
    assert spec["replicas"] == 2
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
    # State changes must come from the Ingress host's origin (scheme, host and port).
    assert args.public_url == "https://mail.example.com"
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


OIDC_VALUES = {"portal": {
    "enabled": True, "storeSecretRef": {"name": "mailplane-db-app"},
    "trustedProxies": ["10.0.0.0/8", "192.168.0.0/16"],
    "ingress": {"enabled": True, "host": "mail.example.com"},
    "oidc": {"enabled": True, "issuer": "https://dex.example.com", "clientId": "mailplane",
             "clientSecretRef": {"name": "portal-oidc"}, "groupsClaim": "groups",
             "groupsPrefix": "oidc:", "usernamePrefix": "-",
             "caConfigMapRef": {"name": "corp-ca"}},
    "networkPolicy": {"egress": {"apiServerCIDRs": ["172.20.0.1/32"],
                                 "storeCIDRs": ["10.3.0.0/16"]}}}}


def test_portal_runs_replicas_with_oidc_from_a_mounted_secret() -> None:
    rendered = render_install(OIDC_VALUES)
    spec = rendered.one("Deployment", NAME)["spec"]
    assert spec["replicas"] == 2 and spec["strategy"]["type"] == "RollingUpdate"
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    args = build_parser().parse_args(container["args"])  # the portal takes what the chart gives
    assert (args.oidc_issuer, args.oidc_client_id, args.oidc_redirect_url) == (
        "https://dex.example.com", "mailplane", "https://mail.example.com/login/callback")
    assert (args.oidc_groups_claim, args.oidc_groups_prefix, args.oidc_username_prefix,
            args.oidc_username_claim) == ("groups", "oidc:", "-", "sub")
    assert args.trusted_proxies == "10.0.0.0/8,192.168.0.0/16"
    assert (args.login_rate, args.login_rate_user) == (10, 5)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert args.oidc_client_secret_file.startswith("/etc/mailplane/oidc/")
    assert mounts["/etc/mailplane/oidc"] == "oidc"
    assert args.oidc_ca_file == "/etc/mailplane/oidc-ca/ca.crt"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["oidc"]["secret"] == {"secretName": "portal-oidc", "items": [
        {"key": "client-secret", "path": "client-secret"}]}
    assert volumes["oidc-ca"]["configMap"]["name"] == "corp-ca"
    assert "env" not in container  # the secret is a file, never an environment variable
    assert "portal-oidc" not in str(container["args"])


@pytest.mark.parametrize(("oidc", "message"), [
    ({"issuer": "http://dex.example.com"}, r"portal\.oidc\.issuer"),
    ({"clientId": ""}, r"portal\.oidc\.clientId"),
    ({"clientSecretRef": {"name": ""}}, r"portal\.oidc\.clientSecretRef\.name"),
])
def test_portal_oidc_values_are_checked(oidc: dict[str, object], message: str) -> None:
    values = {"portal": {**OIDC_VALUES["portal"],  # type: ignore[dict-item]
                         "oidc": {**OIDC_VALUES["portal"]["oidc"], **oidc}}}  # type: ignore[index]
    with pytest.raises(helm.HelmError, match=message):
        render_install(values)
    no_host = {"portal": {**OIDC_VALUES["portal"], "ingress": {"enabled": False}}}  # type: ignore[dict-item]
    with pytest.raises(helm.HelmError, match=r"portal\.oidc\.redirectUrl"):
        render_install(no_host)


def test_portal_network_policy_fences_both_ways() -> None:
    policy = render_install(OIDC_VALUES).one("NetworkPolicy", NAME)
    spec = policy["spec"]
    assert spec["podSelector"]["matchLabels"]["app.kubernetes.io/name"] == NAME
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{
        "from": [{"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": "ingress-nginx"}}}],
        "ports": [{"protocol": "TCP", "port": 8443}]}]
    dns, api, store, issuer = spec["egress"]
    assert dns["to"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "kube-system"}}}]
    assert {p["port"] for p in dns["ports"]} == {53}
    assert api == {"to": [{"ipBlock": {"cidr": "172.20.0.1/32"}}],
                   "ports": [{"protocol": "TCP", "port": 443},
                             {"protocol": "TCP", "port": 6443}]}
    assert store == {"to": [{"ipBlock": {"cidr": "10.3.0.0/16"}}],
                     "ports": [{"protocol": "TCP", "port": 5432}]}
    assert issuer == {"ports": [{"protocol": "TCP", "port": 443}]}  # any address, port 443


def test_portal_network_policy_without_oidc_has_no_issuer_rule_and_can_be_left_out() -> None:
    values = {"portal": {"enabled": True, "storeSecretRef": {"name": "db"},
                         "networkPolicy": {"ingressNamespaceSelector": {"matchLabels": {
                             "kubernetes.io/metadata.name": "traefik"}}}}}
    spec = render_install(values).one("NetworkPolicy", NAME)["spec"]
    assert len(spec["egress"]) == 3
    assert spec["egress"][2]["to"] == [{"namespaceSelector": {}}]  # the store: any namespace
    assert spec["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "traefik"}
    off = render_install({**values, "networkPolicy": {"enabled": False}})
    assert not [o for o in off.objects if o["kind"] == "NetworkPolicy"]


def test_portal_pods_take_connections_only_from_the_ingress_controller() -> None:
    from tests.helpers.netpol import Pod, ingress_allowed

    rendered = render_install(OIDC_VALUES)
    policies = [o for o in rendered.objects if o["kind"] == "NetworkPolicy"]
    labels = rendered.one("Deployment", NAME)["spec"]["template"]["metadata"]["labels"]
    portal = Pod("mailplane-system", labels, ports={"http": 8443})
    controller = Pod("ingress-nginx", {"app.kubernetes.io/name": "ingress-nginx"})
    tenant = Pod("shop", {"app": "web"})
    neighbour = Pod("mailplane-system", {"app.kubernetes.io/name": "mailplane-relay"})
    assert ingress_allowed(policies, controller, portal, 8443)
    assert not ingress_allowed(policies, controller, portal, 9090)
    assert not ingress_allowed(policies, tenant, portal, 8443)
    assert not ingress_allowed(policies, neighbour, portal, 8443)
