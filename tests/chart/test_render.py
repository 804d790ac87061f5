"""The chart as Helm renders it: strict lint, every values file, every object valid for every
supported Kubernetes version, custom resources valid against their CRDs, yamllint clean."""

from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any

import helm_python as helm
import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml
from yamllint import linter  # type: ignore[import-untyped]
from yamllint.config import YamlLintConfig  # type: ignore[import-untyped]

from tests.helpers.netpol import Pod, ingress_allowed
from tests.helpers.scrape import scrape_targets

from .conftest import (
    CHART_DIR,
    CI_VALUES,
    KUBE_VERSIONS,
    NAMESPACE,
    ROOT,
    Rendered,
    load_values,
    render_install,
    render_upgrade,
)

VALUES_CASES = [pytest.param({}, id="defaults")] + [
    pytest.param(load_values(p), id=p.stem) for p in CI_VALUES
]
RESOURCES_VALUES = Path(__file__).parent / "values" / "resources.yaml"

# Kinds kubernetes-validate has no schema for; each is checked against its own definition below.
CUSTOM_KINDS = {"ServiceMonitor", "PrometheusRule", "SmtpRelay", "SendingDomain",
                "RetentionPolicy", "SmtpCredential"}

# Rendered output embeds CRD descriptions and the dashboard JSON on single lines, so line length
# is not a property of the templates; `toYaml` writes sequences unindented while the templates
# indent them. Everything else is yamllint's default.
YAMLLINT = YamlLintConfig("""
extends: default
rules:
  line-length: disable
  indentation: {spaces: 2, indent-sequences: whatever}
  document-start: {present: true}
  truthy: {allowed-values: ["true", "false"], check-keys: false}
""")


def crd_schemas() -> dict[str, dict[str, Any]]:
    out = {}
    for path in sorted((ROOT / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        [version] = [v for v in crd["spec"]["versions"] if v["served"]]
        out[crd["spec"]["names"]["kind"]] = version["schema"]["openAPIV3Schema"]
    return out


# kubernetes-validate re-reads and parses its ~1 MB definitions file on every call; the files
# never change, so remember them. Most objects also render identically under several values
# files: each is validated once per Kubernetes version.
kubernetes_validate.utils.schema_contents = functools.lru_cache(maxsize=None)(
    kubernetes_validate.utils.schema_contents)
_validated: dict[tuple[str, str], str | None] = {}


def _validate_once(obj: dict[str, Any], version: str) -> str | None:
    key = (json.dumps(obj, sort_keys=True), version)
    if key not in _validated:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
            _validated[key] = None
        except (kubernetes_validate.ValidationError,
                # The CLI prints this one as a warning; here it is a failure like any other.
                kubernetes_validate.SchemaNotFoundError) as e:
            _validated[key] = str(e)
    return _validated[key]


def validate_kubernetes(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for obj in objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in KUBE_VERSIONS:
            error = _validate_once(obj, version)
            if error is not None:
                problems.append(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {error}")
    return problems


@pytest.mark.parametrize("values", VALUES_CASES)
def test_strict_lint_is_clean(values: dict[str, Any]) -> None:
    for kube in ("v1.27.0", "v1.37.0"):
        report = helm.lint(CHART_DIR, values, strict=True, namespace=NAMESPACE, kube_version=kube)
        assert report["errors"] == []
        # The one finding allowed: the project has no logo to point `icon` at yet.
        findings = [m for m in report["messages"] if m["error"] != "icon is recommended"]
        assert findings == []


@pytest.mark.parametrize("values", VALUES_CASES)
def test_every_object_validates_for_every_supported_kubernetes(values: dict[str, Any]) -> None:
    rendered = render_install(values)
    assert rendered.objects
    assert validate_kubernetes(rendered.objects) == []
    assert {o["metadata"].get("namespace", NAMESPACE) for o in rendered.objects
            if o["kind"] not in ("ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                                 "Role", "RoleBinding", "ConfigMap")} == {NAMESPACE}


def test_kube_version_range_is_the_tested_one() -> None:
    chart = yaml.safe_load((CHART_DIR / "Chart.yaml").read_text())
    assert chart["kubeVersion"] == f">={KUBE_VERSIONS[0]}-0"
    # The validator must know every version the tests claim.
    for version in KUBE_VERSIONS:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "Namespace",
                                      "metadata": {"name": "x"}}, version, strict=True)


def test_validation_catches_a_broken_object(default_render: Rendered) -> None:
    """The validator is strict enough to notice a typo in a Deployment."""
    deployment = copy.deepcopy(default_render.of_kind("Deployment")[0])
    deployment["spec"]["template"]["spec"]["containers"][0]["imagePullPolice"] = "Always"
    assert validate_kubernetes([deployment])


@pytest.mark.parametrize("values", VALUES_CASES)
def test_rendered_yaml_passes_yamllint(values: dict[str, Any]) -> None:
    rendered = render_install(values)
    # Helm ends the joined manifest with an extra newline of its own; not a template's doing.
    text = rendered.manifest.rstrip("\n") + "\n"
    problems = [f"{p.line}:{p.column} {p.rule} {p.message}" for p in linter.run(text, YAMLLINT)]
    assert problems == []


def test_crds_are_the_repository_crds_with_keep_policy(default_render: Rendered) -> None:
    schemas = crd_schemas()
    crds = default_render.of_kind("CustomResourceDefinition")
    assert {c["spec"]["names"]["kind"] for c in crds} == set(schemas) == {
        "SmtpRelay", "SendingDomain", "SmtpCredential", "RetentionPolicy"}
    for crd in crds:
        plural = crd["spec"]["names"]["plural"]
        source = yaml.safe_load((ROOT / "crds" / f"mailplane.io_{plural}.yaml").read_text())
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["labels"]["app.kubernetes.io/part-of"] == "mailplane"
        stripped = copy.deepcopy(crd)
        for key in ("annotations", "labels"):
            extra = set(stripped["metadata"].pop(key, {})) - set(source["metadata"].get(key, {}))
            assert key == "labels" or extra == {"helm.sh/resource-policy"}
            stripped["metadata"][key] = source["metadata"].get(key)
            if stripped["metadata"][key] is None:
                del stripped["metadata"][key]
        assert stripped == source


def test_crds_can_be_disabled_or_not_kept() -> None:
    assert render_install({"crds": {"enabled": False}}).of_kind("CustomResourceDefinition") == []
    crds = render_install({"crds": {"keep": False}}).of_kind("CustomResourceDefinition")
    assert len(crds) == 4
    assert all("helm.sh/resource-policy" not in c["metadata"].get("annotations", {})
               for c in crds)


def test_operator_deployment_is_hardened(default_render: Rendered) -> None:
    [deployment] = default_render.of_kind("Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    # Leader election is on: a rollout starts the new pod, which takes over the Lease.
    assert spec["strategy"] == {"type": "RollingUpdate",
                                "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
    pod = spec["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    [container] = pod["containers"]
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False, "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]}}
    assert container["image"] == "ghcr.io/mailplane/mailplane:0.1.0"
    assert container["args"][:2] == ["operator", "--all-namespaces"]
    assert container["resources"]["limits"]["memory"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] in ports
    assert pod["serviceAccountName"] == "mailplane-operator"
    # The Service the ServiceMonitor scrapes selects this pod.
    service = default_render.one("Service", "mailplane-operator-metrics")
    labels = spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert spec["selector"]["matchLabels"].items() <= labels.items()


def test_namespaced_values_render_their_settings() -> None:
    rendered = render_install(load_values(CHART_DIR / "ci" / "namespaced-values.yaml"))
    [deployment] = rendered.of_kind("Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["image"] == ("registry.example.com/mirror/mailplane@sha256:"
                                  "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef")
    assert container["args"] == ["operator", "--namespace=mail", "--namespace=shop",
                                 "--metrics-port=9090", "--liveness-port=8081",
                                 "--cluster-domain=corp.internal",
                                 container["args"][6], "--dns-resolver=10.0.0.10:53",
                                 "--verbose", "--leader-election",
                                 "--leader-election-namespace=" + NAMESPACE,
                                 "--lease-duration=15", "--renew-deadline=10",
                                 "--retry-period=2", "--log-format=json"]
    assert container["args"][6].startswith("--relay-defaults={")
    assert pod["serviceAccountName"] == "mail-operator"
    assert pod["tolerations"][0]["key"] == "dedicated"
    assert rendered.of_kind("CustomResourceDefinition") == []
    assert rendered.of_kind("ConfigMap") == []
    # One Role per watched namespace, and the Lease's Role in the release namespace.
    assert {(r["metadata"]["namespace"], r["metadata"]["name"])
            for r in rendered.of_kind("Role")} == {
        ("mail", "mailplane-operator"), ("shop", "mailplane-operator"),
        (NAMESPACE, "mailplane-operator-leader-election")}


def test_monitoring_objects(render: Any) -> None:
    rendered = render(load_values(CHART_DIR / "ci" / "monitoring-values.yaml"))
    [monitor] = rendered.of_kind("ServiceMonitor")
    service = rendered.one("Service", "mailplane-operator-metrics")
    service_labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service_labels.items()
    assert monitor["spec"]["endpoints"][0]["port"] in {p["name"] for p in service["spec"]["ports"]}
    # jobLabel makes job="mailplane-operator", which the operator alerts select.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "mailplane-operator"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"

    [rule] = rendered.of_kind("PrometheusRule")
    source = yaml.safe_load((ROOT / "monitoring" / "rules.yaml").read_text())
    assert rule["spec"] == source

    [dashboard] = rendered.of_kind("ConfigMap")
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Mail"}
    assert json.loads(dashboard["data"]["mailplane.json"]) == json.loads(
        (ROOT / "monitoring" / "dashboard.json").read_text())

    [policy] = rendered.of_kind("NetworkPolicy")
    assert policy["metadata"]["name"] == "mailplane-operator"
    [metrics] = policy["spec"]["ingress"]
    assert [p["port"] for p in metrics["ports"]] == [8080]
    assert metrics["from"] == [{"namespaceSelector": {"matchExpressions": [
        {"key": "kubernetes.io/metadata.name", "operator": "In",
         "values": ["monitoring", "observability"]}]}}]


def test_monitoring_is_opt_in_and_network_policies_are_on(default_render: Rendered) -> None:
    assert default_render.of_kind("ServiceMonitor") == []
    assert default_render.of_kind("PrometheusRule") == []
    [policy] = default_render.of_kind("NetworkPolicy")
    assert policy["spec"]["ingress"][0]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    assert render_install({"networkPolicy": {"enabled": False}}).of_kind("NetworkPolicy") == []


def test_default_resources_render_valid_against_their_crds() -> None:
    rendered = render_upgrade(load_values(RESOURCES_VALUES))
    schemas = crd_schemas()
    custom = [o for o in rendered.objects if o["apiVersion"] == "mailplane.io/v1alpha1"]
    assert sorted((o["kind"], o["metadata"]["name"]) for o in custom) == [
        ("RetentionPolicy", "production"), ("SendingDomain", "example-com"),
        ("SendingDomain", "news-example-org"), ("SmtpRelay", "main")]
    for obj in custom:
        assert obj["metadata"]["namespace"] == NAMESPACE
        jsonschema.validate(obj, schemas[obj["kind"]])
    # The default pool runs under the chart's relay ServiceAccount (no RBAC, no token).
    [relay] = [o for o in custom if o["kind"] == "SmtpRelay"]
    assert relay["spec"]["serviceAccountName"] == "mailplane-relay"
    # The same check rejects a spec the CRD does not allow.
    [policy] = [o for o in custom if o["kind"] == "RetentionPolicy"]
    bad = copy.deepcopy(policy)
    bad["spec"]["messageLog"] = 5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schemas[bad["kind"]])


def test_default_resources_on_a_fresh_install_stop_with_instructions() -> None:
    with pytest.raises(helm.HelmError, match="need the Mailplane CRDs in the cluster first"):
        render_install(load_values(RESOURCES_VALUES))


def test_notes_tell_the_next_steps(default_render: Rendered) -> None:
    notes = default_render.notes
    for step in ("SendingDomain", "status.dnsRecords", "SmtpCredential", "cert-manager",
                 "mailplane-system", "mailplane-edit", "mailplane-platform", "spec.networkPolicy"):
        assert step in notes


def default_pool_children(rendered: Rendered) -> list[dict[str, Any]]:
    """What the operator makes for the chart's default pool (the SmtpRelay the chart renders)."""
    from mailplane_operator.reconcile import relay as relay_mod
    from mailplane_operator.reconcile.models import parse_smtp_relay

    [body] = rendered.of_kind("SmtpRelay")
    body = {**body, "metadata": {**body["metadata"], "uid": "uid-main", "generation": 1}}
    return relay_mod.relay_children(parse_smtp_relay(body), service_monitor_available=True)


def test_every_pod_of_the_release_is_scraped_exactly_once() -> None:
    """The chart's operator and its default relay pool, monitoring on: each pod is one target
    (the double scrape of the submission and headless Services made every `sum` read double)."""
    values = {**load_values(CHART_DIR / "ci" / "monitoring-values.yaml"),
              **load_values(RESOURCES_VALUES)}
    rendered = render_upgrade(values)
    children = default_pool_children(rendered)
    assert validate_kubernetes(children) == []
    targets = scrape_targets([*rendered.objects, *children])
    assert targets == {(NAMESPACE, "mailplane-operator-0", "/metrics"): 1,
                       (NAMESPACE, "main-0", "/metrics"): 1,
                       (NAMESPACE, "main-1", "/metrics"): 1}
    # Applications reach the relay through a Service without the metrics port.
    submission = next(c for c in children if c["kind"] == "Service"
                      and c["metadata"]["name"] == "main")
    assert [p["port"] for p in submission["spec"]["ports"]] == [587, 465]


def _reachable(policies: list[dict[str, Any]], source: Pod, dest: Pod) -> set[int]:
    return {port for port in (1587, 1465, 8080, 8081, 9999)
            if ingress_allowed(policies, source, dest, port)}


def _pod(workload: dict[str, Any]) -> Pod:
    template = workload["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    return Pod(workload["metadata"]["namespace"], template["metadata"]["labels"], ports=ports)


def test_the_release_is_fenced_by_default() -> None:
    """Chart defaults plus the default pool: tenants reach SMTP only, the monitoring namespace
    reaches the metrics ports only, anybody else nothing."""
    rendered = render_upgrade(load_values(RESOURCES_VALUES))
    children = default_pool_children(rendered)
    objects = [*rendered.objects, *children]
    relay = _pod(next(c for c in children if c["kind"] == "StatefulSet"))
    operator = _pod(rendered.of_kind("Deployment")[0])
    tenant = Pod("shop", {"app": "orders"}, {"mailplane.io/smtp-access": "true"})
    stranger = Pod("team-b", {"app": "orders"})
    prometheus = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert _reachable(objects, tenant, relay) == {1587, 1465}
    assert _reachable(objects, stranger, relay) == set()
    assert _reachable(objects, prometheus, relay) == {8080}
    assert _reachable(objects, prometheus, operator) == {8080}
    assert _reachable(objects, tenant, operator) == set()


def test_network_policy_values_reach_the_default_pool() -> None:
    values = load_values(RESOURCES_VALUES)
    off = render_upgrade({**values, "networkPolicy": {"enabled": False}})
    assert off.of_kind("NetworkPolicy") == []
    [relay] = off.of_kind("SmtpRelay")
    assert relay["spec"]["networkPolicy"]["enabled"] is False
    assert not [c for c in default_pool_children(off) if c["kind"] == "NetworkPolicy"]
    # The pool's own spec wins over the chart's values.
    values["defaultRelay"]["spec"]["networkPolicy"] = {
        "metricsNamespaceSelector": {"matchLabels": {"obs": "yes"}}}
    [relay] = render_upgrade(values).of_kind("SmtpRelay")
    assert relay["spec"]["networkPolicy"] == {
        "enabled": True, "metricsNamespaceSelector": {"matchLabels": {"obs": "yes"}}}


def test_the_default_pool_takes_its_store_from_the_values() -> None:
    values = load_values(RESOURCES_VALUES)
    [relay] = render_upgrade(values).of_kind("SmtpRelay")
    assert "store" not in relay["spec"]  # SQLite per pod unless asked
    values["defaultRelay"]["store"] = {"backend": "postgresql",
                                       "secretRef": {"name": "mailplane-db-app", "key": "uri"}}
    rendered = render_upgrade(values)
    [relay] = rendered.of_kind("SmtpRelay")
    assert relay["spec"]["store"] == values["defaultRelay"]["store"]
    # What the operator makes of it: the Secret mounted as a file, no password anywhere else.
    pod = next(c for c in default_pool_children(rendered)
               if c["kind"] == "StatefulSet")["spec"]["template"]["spec"]
    assert {"name": "store", "secret": {"secretName": "mailplane-db-app",
                                        "items": [{"key": "uri", "path": "dsn"}]}} in pod["volumes"]


def test_operator_pdb_selects_the_operator_and_never_blocks_a_drain(
        default_render: Rendered) -> None:
    [deployment] = default_render.of_kind("Deployment")
    [pdb] = default_render.of_kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # A single replica may still be evicted (a drain proceeds); with more, one keeps running.
    assert pdb["spec"] == {"maxUnavailable": 1, "selector": pdb["spec"]["selector"]}
    assert deployment["spec"]["replicas"] == 1
    off = render_install({"operator": {"podDisruptionBudget": {"enabled": False}}})
    assert off.of_kind("PodDisruptionBudget") == []


def test_operator_replicas_elect_a_leader() -> None:
    rendered = render_install({"operator": {"replicas": 2}})
    [deployment] = rendered.of_kind("Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--leader-election" in container["args"]
    assert f"--leader-election-namespace={NAMESPACE}" in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    roles = [r for r in rendered.of_kind("Role") if r["metadata"]["name"].endswith(
        "-leader-election")]
    assert [r["metadata"]["namespace"] for r in roles] == [NAMESPACE]
    assert roles[0]["rules"] == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                                  "verbs": ["get", "create", "patch"]}]
    # Without leader election, one replica only, stopped before the next starts.
    with pytest.raises(helm.HelmError, match="leaderElection"):
        render_install({"operator": {"replicas": 2, "leaderElection": {"enabled": False}}})
    single = render_install({"operator": {"leaderElection": {"enabled": False}}})
    [deployment] = single.of_kind("Deployment")
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    assert "--leader-election" not in container["args"]


def test_the_default_pool_takes_abuse_limits_and_the_intake_from_the_values() -> None:
    values = load_values(RESOURCES_VALUES)
    [relay] = render_upgrade(values).of_kind("SmtpRelay")
    assert relay["spec"]["abuse"]["bounceRate"] == 0.05
    assert relay["spec"]["abuse"]["complaintRate"] == 0.001
    assert "intake" not in relay["spec"]  # off unless asked
    values["defaultRelay"]["intake"] = {
        "domain": "bounces.example.com", "keySecretRef": {"name": "mailplane-intake-key"},
        "service": {"type": "LoadBalancer"}}
    values["defaultRelay"]["abuse"] = {**values["defaultRelay"].get("abuse", {}),
                                       "complaintRate": 0.003}
    rendered = render_upgrade(values)
    [relay] = rendered.of_kind("SmtpRelay")
    assert relay["spec"]["intake"]["domain"] == "bounces.example.com"
    assert relay["spec"]["abuse"]["complaintRate"] == 0.003
    children = default_pool_children(rendered)
    intake = [c for c in children if c["kind"] == "Service"
              and c["metadata"]["name"].endswith("-intake")]
    assert len(intake) == 1 and intake[0]["spec"]["type"] == "LoadBalancer"
    # The pool's own spec wins.
    values["defaultRelay"]["spec"]["abuse"] = {"bounceRate": 0.2}
    [relay] = render_upgrade(values).of_kind("SmtpRelay")
    assert relay["spec"]["abuse"] == {"bounceRate": 0.2}
    # An intake without its key is refused by the values schema.
    values["defaultRelay"]["intake"] = {"domain": "bounces.example.com"}
    with pytest.raises(helm.HelmError, match="keySecretRef"):
        render_upgrade(values)
