"""SmtpRelay children: what a platform team gets in its cluster, checked field by field, and
validated against the Kubernetes OpenAPI schemas."""

from __future__ import annotations

import json
import warnings
from typing import Any

import kubernetes_validate
import pytest

from mailplane_operator.reconcile import models, render
from mailplane_operator.reconcile import relay as relay_mod
from mailplane_operator.reconcile.conditions import get_condition
from tests.helpers.netpol import Pod, ingress_allowed
from tests.helpers.scrape import scrape_targets
from tests.operator.reconcile_builders import NOW, credential, relay


def by_kind(objs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for o in objs:
        suffix = next((s for s in ("headless", "metrics")
                       if o["metadata"]["name"].endswith(f"-{s}")), None)
        out[o["kind"] + (f"/{suffix}" if suffix else "")] = o
    return out


def test_every_child_is_owned_labelled_and_valid_kubernetes() -> None:
    r = relay(replicas=3)
    children = relay_mod.relay_children(r, service_monitor_available=True, config_hash="abc")
    kinds = sorted(by_kind(children))
    assert kinds == ["NetworkPolicy", "PodDisruptionBudget", "Service", "Service/headless",
                     "Service/metrics", "ServiceMonitor", "StatefulSet"]
    assert children[0]["kind"] == "NetworkPolicy"  # applied before any pod can run
    for child in children:
        md = child["metadata"]
        assert md["namespace"] == "mail"
        assert md["ownerReferences"] == [{
            "apiVersion": "mailplane.io/v1alpha1", "kind": "SmtpRelay", "name": "main",
            "uid": r.meta.uid, "controller": True, "blockOwnerDeletion": True}]
        assert md["labels"]["app.kubernetes.io/name"] == "mailplane-relay"
        assert md["labels"]["app.kubernetes.io/instance"] == "main"
        assert md["labels"]["app.kubernetes.io/managed-by"] == "mailplane-operator"
        if child["kind"] != "ServiceMonitor":  # not a built-in kind: no schema offline
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                kubernetes_validate.validate(child, kubernetes_validate.latest_version(),
                                             strict=True)


def test_the_service_monitor_needs_the_crd_and_can_be_disabled() -> None:
    assert "ServiceMonitor" not in by_kind(relay_mod.relay_children(relay()))
    off = relay(monitoring={"serviceMonitor": {"enabled": False}})
    assert "ServiceMonitor" not in by_kind(
        relay_mod.relay_children(off, service_monitor_available=True))
    sm = by_kind(relay_mod.relay_children(
        relay(monitoring={"serviceMonitor": {"labels": {"release": "prom"}}}),
        service_monitor_available=True))["ServiceMonitor"]
    assert sm["metadata"]["labels"]["release"] == "prom"
    assert sm["spec"]["endpoints"] == [{"port": "metrics", "path": "/metrics",
                                        "interval": "30s"}]


def _service_ports(children: dict[str, dict[str, Any]]) -> dict[str, list[tuple[str, int]]]:
    return {k: [(p["name"], p["port"]) for p in o["spec"]["ports"]]
            for k, o in children.items() if k.startswith("Service/") or k == "Service"}


@pytest.mark.parametrize("replicas", [1, 3])
def test_each_pod_is_scraped_exactly_once_and_only_through_the_metrics_service(
        replicas: int) -> None:
    children = relay_mod.relay_children(relay(replicas=replicas), service_monitor_available=True)
    # The Service tenants connect to, and the per-pod DNS Service, carry SMTP only; the metrics
    # port is on the metrics Service alone.
    assert _service_ports(by_kind(children)) == {
        "Service": [("submission", 587), ("submissions", 465)],
        "Service/headless": [("submission", 587), ("submissions", 465)],
        "Service/metrics": [("metrics", 8080)],
    }
    targets = scrape_targets(children)
    assert targets == {("mail", f"main-{i}", "/metrics"): 1 for i in range(replicas)}


def test_two_relays_in_one_namespace_do_not_scrape_each_other() -> None:
    """Selectors include the instance: relay "main" does not pick up "main-eu"'s Service, even
    though one name is a prefix of the other."""
    children = [*relay_mod.relay_children(relay("main", replicas=2),
                                          service_monitor_available=True),
                *relay_mod.relay_children(relay("main-eu", replicas=1),
                                          service_monitor_available=True)]
    assert scrape_targets(children) == {("mail", "main-0", "/metrics"): 1,
                                        ("mail", "main-1", "/metrics"): 1,
                                        ("mail", "main-eu-0", "/metrics"): 1}


def test_pod_is_locked_down_probed_and_drains_within_its_grace_period() -> None:
    r = relay(shutdownGrace="40s")
    sts = by_kind(relay_mod.relay_children(r))["StatefulSet"]
    pod = sts["spec"]["template"]["spec"]
    [c] = pod["containers"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False  # the relay never talks to the API
    assert pod["serviceAccountName"] == "default"  # spec.serviceAccountName's default
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert c["command"] == ["mailplane", "relay", "--config", "/etc/mailplane/config"]
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > int(pre_stop[1]) + 40
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/mailplane/config"]["readOnly"] is True
    assert mounts["/etc/mailplane/tls"]["readOnly"] is True
    assert mounts["/var/lib/mailplane"]["name"] == "spool"
    assert "/tmp" in mounts  # writable scratch on a read-only root
    [pvc] = sts["spec"]["volumeClaimTemplates"]
    assert pvc["metadata"]["name"] == "spool"
    assert pvc["spec"]["resources"]["requests"]["storage"] == "10Gi"


def test_config_secrets_are_projected_from_fixed_optional_slots() -> None:
    pod = relay_mod.pod_template(relay(), relay_mod.DEFAULT_IMAGE)["spec"]
    config = next(v for v in pod["volumes"] if v["name"] == "config")
    sources = config["projected"]["sources"]
    assert [s["secret"]["name"] for s in sources] == [
        f"main-config-{i}" for i in range(relay_mod.CONFIG_SECRET_SLOTS)]
    assert all(s["secret"]["optional"] for s in sources)


def test_services_map_the_standard_ports_to_unprivileged_container_ports() -> None:
    children = by_kind(relay_mod.relay_children(relay()))
    ports = {p["name"]: p for p in children["Service"]["spec"]["ports"]}
    assert ports["submission"]["port"] == 587 and ports["submission"]["targetPort"] == "submission"
    assert ports["submissions"]["port"] == 465
    container = children["StatefulSet"]["spec"]["template"]["spec"]["containers"][0]
    cports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert cports == {"http": 8080, "admin": 8443, "submission": 1587, "submissions": 1465}
    headless = children["Service/headless"]
    assert headless["spec"]["clusterIP"] == "None"
    assert children["StatefulSet"]["spec"]["serviceName"] == "main-headless"
    only_465 = by_kind(relay_mod.relay_children(relay(listeners={"submission": {
        "enabled": False}})))["Service"]
    assert [p["name"] for p in only_465["spec"]["ports"]] == ["submissions"]


def test_pdb_lets_one_pod_go_at_a_time() -> None:
    pdb = by_kind(relay_mod.relay_children(relay()))["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == relay_mod.selector_labels(relay())


def test_smarthost_password_is_mounted_from_its_secret() -> None:
    r = relay(delivery={"mode": "smarthost", "smarthost": {
        "host": "smtp.upstream.example", "username": "u",
        "passwordSecretRef": {"name": "upstream", "key": "pw"}}})
    pod = relay_mod.pod_template(r, relay_mod.DEFAULT_IMAGE)["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "smarthost")
    assert vol["secret"] == {"secretName": "upstream", "items": [{"key": "pw",
                                                                  "path": "password"}]}
    result = render.render_relay_config(r, domains=[], credentials=[], policies=[],
                                        namespace_labels={}, now=NOW)
    smarthost = result.config.settings.delivery.smarthost
    assert smarthost is not None
    assert smarthost.password_file == "/etc/mailplane/smarthost/password"


def test_a_postgresql_store_is_a_mounted_secret_never_a_rendered_password() -> None:
    r = relay(store={"backend": "postgresql", "secretRef": {"name": "pool-db-app"}})
    pod = relay_mod.pod_template(r, relay_mod.DEFAULT_IMAGE)["spec"]
    vol = next(v for v in pod["volumes"] if v["name"] == "store")
    assert vol["secret"] == {"secretName": "pool-db-app", "items": [{"key": "uri",
                                                                     "path": "dsn"}]}
    [container] = pod["containers"]
    assert {"name": "store", "mountPath": "/etc/mailplane/store", "readOnly": True} in (
        container["volumeMounts"])
    result = render.render_relay_config(r, domains=[], credentials=[], policies=[],
                                        namespace_labels={}, now=NOW)
    store = result.config.settings.store
    assert (store.backend, store.dsn_file) == ("postgresql", "/etc/mailplane/store/dsn")
    # The default stays a SQLite file per pod, with no Secret mounted.
    plain = relay_mod.pod_template(relay(), relay_mod.DEFAULT_IMAGE)["spec"]
    assert "store" not in {v["name"] for v in plain["volumes"]}
    with pytest.raises(models.SpecError, match=r"store\.secretRef is required"):
        relay(store={"backend": "postgresql"})


def test_the_pod_template_does_not_change_when_credentials_do() -> None:
    r = relay()
    before = render.render_relay_config(r, domains=[], credentials=[], policies=[],
                                        namespace_labels={}, now=NOW)
    cred = credential(senders=("example.com",))
    after = render.render_relay_config(
        r, domains=[], credentials=[render.CredentialInput(cred, None)], policies=[],
        namespace_labels={}, now=NOW)
    sts_before = relay_mod.statefulset(r, config_hash=before.config_hash)
    sts_after = relay_mod.statefulset(r, config_hash=after.config_hash)
    assert sts_before["spec"] == sts_after["spec"]
    # Only a spec change of the relay itself reaches the template.
    bigger = relay(shutdownGrace="60s")
    assert relay_mod.statefulset(bigger)["spec"]["template"] != sts_before["spec"]["template"]


@pytest.mark.parametrize(("ready_replicas", "error", "status", "reason"), [
    (2, None, "True", "RelayReady"),
    (1, None, "False", "ReplicasNotReady"),
    (2, "bad config", "False", "ConfigInvalid"),
])
def test_relay_status(ready_replicas: int, error: str | None, status: str, reason: str) -> None:
    r = relay()
    patch = relay_mod.relay_status(
        r, statefulset_status={"replicas": 2, "readyReplicas": ready_replicas},
        config_hash="h", config_secrets=["main-config-0"], domains=["example.com"],
        credentials=3, excluded=1, retention_policies=[], now=NOW, error=error)
    ready = get_condition(patch["conditions"], "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == (status, reason)
    assert patch["observedGeneration"] == 1
    assert patch["configHash"] == "h" and patch["credentialCount"] == 3


def test_relay_pods_run_under_the_named_service_account_without_a_token() -> None:
    sts = by_kind(relay_mod.relay_children(relay(serviceAccountName="mailplane-relay")))
    pod = sts["StatefulSet"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "mailplane-relay"
    assert pod["automountServiceAccountToken"] is False


def _relay_pod(children: list[dict[str, Any]]) -> Pod:
    sts = by_kind(children)["StatefulSet"]
    template = sts["spec"]["template"]
    ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
    return Pod(sts["metadata"]["namespace"], template["metadata"]["labels"], ports=ports)


def _reachable(children: list[dict[str, Any]], source: Pod) -> set[int]:
    dest = _relay_pod(children)
    return {port for port in (1587, 1465, 8080, 8443, 9999)
            if ingress_allowed(children, source, dest, port)}


TENANT = Pod("team-a", {"app": "shop"}, {"mailplane.io/smtp-access": "true"})
OTHER = Pod("team-b", {"app": "shop"})
PROMETHEUS = Pod("monitoring", {"app.kubernetes.io/name": "prometheus"})
PLATFORM_APP = Pod("mail", {"app": "newsletter"})


def test_network_policy_lets_tenants_reach_smtp_and_monitoring_reach_metrics_only() -> None:
    children = relay_mod.relay_children(relay(allowedNamespaces={
        "matchLabels": {"mailplane.io/smtp-access": "true"}}))
    # A namespace the relay admits credentials from: the SMTP listeners, never /metrics.
    assert _reachable(children, TENANT) == {1587, 1465}
    # The relay's own namespace is always admitted.
    assert _reachable(children, PLATFORM_APP) == {1587, 1465}
    # Not admitted: nothing.
    assert _reachable(children, OTHER) == set()
    # The monitoring namespace: the metrics port only.
    assert _reachable(children, PROMETHEUS) == {8080}
    # Without the policy every pod in the cluster could reach every port.
    unfenced = [c for c in children if c["kind"] != "NetworkPolicy"]
    assert _reachable(unfenced, OTHER) == {1587, 1465, 8080, 8443, 9999}


def test_the_admin_port_is_reachable_from_the_pool_and_the_operator_only() -> None:
    children = relay_mod.relay_children(relay(), operator_namespace="mailplane-system")
    pool_pod = Pod("mail", dict(relay_mod.selector_labels(relay())))
    operator = Pod("mailplane-system", {"app": "operator"})
    # The pool's own pods hand messages to each other; the operator drains and asks status.
    assert 8443 in _reachable(children, pool_pod)
    assert _reachable(children, operator) == {8443}
    # Anyone else in the relay's namespace, a tenant, the monitoring: never the admin port.
    for other in (PLATFORM_APP, TENANT, PROMETHEUS):
        assert 8443 not in _reachable(children, other)
    # The admin routes left the plain-HTTP port: the operator has no business there.
    assert 8080 not in _reachable(children, operator)
    sts = by_kind(children)["StatefulSet"]["spec"]["template"]["spec"]
    ca = next(v for v in sts["volumes"] if v["name"] == "tls-ca")
    assert ca["secret"] == {"secretName": "main-tls", "optional": True,
                            "items": [{"key": "ca.crt", "path": "ca.crt"}]}


def test_network_policy_follows_the_relay_spec() -> None:
    # No allowedNamespaces: the relay's namespace only. Only the enabled listener's port.
    own_only = relay_mod.relay_children(relay(listeners={"submission": {"enabled": False}}))
    assert _reachable(own_only, TENANT) == set()
    assert _reachable(own_only, PLATFORM_APP) == {1465}
    # {} admits every namespace; matchExpressions carry over; another monitoring namespace.
    every = relay_mod.relay_children(relay(allowedNamespaces={}))
    assert _reachable(every, OTHER) == {1587, 1465}
    expressions = relay_mod.relay_children(relay(
        allowedNamespaces={"matchExpressions": [
            {"key": "team", "operator": "In", "values": ["b"]}]},
        networkPolicy={"metricsNamespaceSelector": {"matchLabels": {"obs": "yes"}}}))
    assert _reachable(expressions, Pod("team-b", {}, {"team": "b"})) == {1587, 1465}
    assert _reachable(expressions, OTHER) == set()
    assert _reachable(expressions, PROMETHEUS) == set()
    assert _reachable(expressions, Pod("obs", {}, {"obs": "yes"})) == {8080}


def test_network_policy_can_be_turned_off_and_is_then_deleted() -> None:
    off = relay(networkPolicy={"enabled": False})
    assert "NetworkPolicy" not in by_kind(relay_mod.relay_children(off))
    hpa = ("autoscaling/v2", "HorizontalPodAutoscaler", "main")  # autoscaling is off
    intake = ("v1", "Service", "main-intake")  # the intake is off
    assert relay_mod.unwanted_children(off) == [
        ("networking.k8s.io/v1", "NetworkPolicy", "main"), hpa, intake]
    assert relay_mod.unwanted_children(relay()) == [hpa, intake]
    # A disabled ServiceMonitor goes too, where the cluster has the CRD.
    no_sm = relay(monitoring={"serviceMonitor": {"enabled": False}})
    assert relay_mod.unwanted_children(no_sm, service_monitor_available=True) == [
        ("monitoring.coreos.com/v1", "ServiceMonitor", "main"), hpa, intake]
    assert relay_mod.unwanted_children(no_sm) == [hpa, intake]


POD_DEFAULTS = models.parse_relay_defaults(json.dumps({
    "pod": {"labels": {"team": "platform", "cost-center": "mail"},
            "annotations": {"example.com/owner": "platform"},
            "imagePullSecrets": [{"name": "mirror"}],
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "mail",
                             "effect": "NoSchedule"}],
            "priorityClassName": "mail-critical"},
    "service": {"type": "LoadBalancer",
                "annotations": {"service.beta.kubernetes.io/aws-load-balancer-internal": "true"}},
}))


def _shape(r: Any, defaults: Any = POD_DEFAULTS) -> tuple[dict[str, Any], dict[str, Any]]:
    children = by_kind(relay_mod.relay_children(r, defaults=defaults))
    return children["StatefulSet"]["spec"]["template"], children["Service"]


def test_pods_and_service_take_the_operators_defaults() -> None:
    template, svc = _shape(relay())
    pod = template["spec"]
    assert pod["imagePullSecrets"] == [{"name": "mirror"}]
    assert pod["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Equal", "value": "mail",
                                   "effect": "NoSchedule"}]
    assert pod["priorityClassName"] == "mail-critical"
    assert template["metadata"]["labels"]["team"] == "platform"
    assert template["metadata"]["annotations"] == {"example.com/owner": "platform"}
    assert svc["spec"]["type"] == "LoadBalancer"
    # Client addresses reach the relay unchanged (per-address throttling, smtpFromCIDRs).
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-internal": "true"}
    # Without defaults nothing extra is rendered.
    bare, bare_svc = _shape(relay(), models.RelayDefaults())
    assert not {"imagePullSecrets", "nodeSelector", "tolerations", "affinity",
                "topologySpreadConstraints", "priorityClassName"} & set(bare["spec"])
    assert "annotations" not in bare["metadata"] and "annotations" not in bare_svc["metadata"]
    assert bare_svc["spec"]["type"] == "ClusterIP"
    assert "externalTrafficPolicy" not in bare_svc["spec"]


def test_the_relay_spec_wins_over_the_defaults() -> None:
    r = relay(pod={
        "labels": {"team": "mail", "tier": "smtp"},
        "annotations": {"example.com/scrape": "no"},
        "imagePullSecrets": [{"name": "own-mirror"}],
        "nodeSelector": {"pool": "mail"},
        "tolerations": [],
        "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
            {"weight": 100, "podAffinityTerm": {"topologyKey": "kubernetes.io/hostname",
                                                "labelSelector": {"matchLabels": {
                                                    "app.kubernetes.io/instance": "main"}}}}]}},
        "topologySpreadConstraints": [{"maxSkew": 1, "topologyKey": "topology.kubernetes.io/zone",
                                       "whenUnsatisfiable": "ScheduleAnyway"}],
        "priorityClassName": "mail-high"},
        service={"type": "ClusterIP", "annotations": {"example.com/x": "y"}})
    template, svc = _shape(r)
    pod, meta = template["spec"], template["metadata"]
    # Labels and annotations merge (the relay wins per key); the operator's own labels win over
    # everything, so the StatefulSet still selects its pods.
    assert meta["labels"]["team"] == "mail" and meta["labels"]["cost-center"] == "mail"
    assert meta["labels"]["tier"] == "smtp"
    assert relay_mod.selector_labels(r).items() <= meta["labels"].items()
    assert meta["annotations"] == {"example.com/owner": "platform", "example.com/scrape": "no"}
    # Everything else is replaced; an empty list clears the default.
    assert pod["imagePullSecrets"] == [{"name": "own-mirror"}]
    assert pod["nodeSelector"] == {"pool": "mail"}
    assert "tolerations" not in pod
    assert pod["priorityClassName"] == "mail-high"
    assert pod["affinity"]["podAntiAffinity"]
    # A spread constraint without a selector spreads this relay's pods.
    [spread] = pod["topologySpreadConstraints"]
    assert spread["labelSelector"] == {"matchLabels": relay_mod.selector_labels(r)}
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["metadata"]["annotations"] == {
        "service.beta.kubernetes.io/aws-load-balancer-internal": "true", "example.com/x": "y"}
    # Valid Kubernetes objects with every field set.
    for child in relay_mod.relay_children(r, defaults=POD_DEFAULTS):
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kubernetes_validate.validate(child, kubernetes_validate.latest_version(),
                                         strict=True)


def test_the_operators_labels_cannot_be_taken_over() -> None:
    with pytest.raises(models.SpecError, match=r"pod\.labels may not set app\.kubernetes\.io/name"):
        relay(pod={"labels": {"app.kubernetes.io/name": "other"}})
    with pytest.raises(models.SpecError, match="not a valid label value"):
        relay(pod={"labels": {"team": "has spaces"}})
    with pytest.raises(models.SpecError, match=r"--relay-defaults: service\.type"):
        models.parse_relay_defaults('{"service": {"type": "ExternalName"}}')


def test_external_clients_of_a_load_balancer_are_admitted_by_range() -> None:
    r = relay(service={"type": "LoadBalancer"},
              networkPolicy={"smtpFromCIDRs": ["203.0.113.0/24", "2001:db8::/32"]})
    policy = by_kind(relay_mod.relay_children(r))["NetworkPolicy"]
    smtp = policy["spec"]["ingress"][0]
    assert {"ipBlock": {"cidr": "203.0.113.0/24"}} in smtp["from"]
    assert {"ipBlock": {"cidr": "2001:db8::/32"}} in smtp["from"]
    assert policy["spec"]["ingress"][1]["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "monitoring"}}}]
    with pytest.raises(models.SpecError, match="not a CIDR"):
        relay(networkPolicy={"smtpFromCIDRs": ["mail.example.com"]})


def test_autoscaling_is_opt_in_scales_the_smtprelay_and_scales_down_unless_told_not_to() -> None:
    off = relay()
    assert "HorizontalPodAutoscaler" not in by_kind(relay_mod.relay_children(off))
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "main") in (
        relay_mod.unwanted_children(off))

    on = relay(autoscaling={"enabled": True, "minReplicas": 2, "maxReplicas": 6,
                            "metric": "oldestMessageAge", "target": 300})
    hpa = by_kind(relay_mod.relay_children(on))["HorizontalPodAutoscaler"]
    assert ("autoscaling/v2", "HorizontalPodAutoscaler", "main") not in (
        relay_mod.unwanted_children(on))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kubernetes_validate.validate(hpa, kubernetes_validate.latest_version(), strict=True)
    spec = hpa["spec"]
    # The HPA scales the SmtpRelay (its scale subresource), never the StatefulSet directly.
    assert spec["scaleTargetRef"] == {"apiVersion": "mailplane.io/v1alpha1",
                                      "kind": "SmtpRelay", "name": "main"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 6)
    assert spec["metrics"] == [{"type": "Pods", "pods": {
        "metric": {"name": "mailplane_relay_queue_oldest_message_age_seconds"},
        "target": {"type": "AverageValue", "averageValue": "300"}}}]
    # Scale-down is on by default (the operator drains a removed pod's queue first).
    assert spec["behavior"]["scaleDown"]["policies"] == [
        {"type": "Pods", "value": 1, "periodSeconds": 300}]
    held = relay(autoscaling={"enabled": True, "scaleDown": False})
    assert by_kind(relay_mod.relay_children(held))["HorizontalPodAutoscaler"]["spec"][
        "behavior"]["scaleDown"] == {"selectPolicy": "Disabled"}
    down = relay(autoscaling={"enabled": True, "scaleDown": True})
    scale_down = by_kind(relay_mod.relay_children(down))["HorizontalPodAutoscaler"]["spec"][
        "behavior"]["scaleDown"]
    assert scale_down["policies"] == [{"type": "Pods", "value": 1, "periodSeconds": 300}]
    # status.selector finds the pods the HPA averages over (the scale subresource's
    # labelSelectorPath).
    status = relay_mod.relay_status(
        on, statefulset_status=None, config_hash="h", config_secrets=[], domains=[],
        credentials=0, excluded=0, retention_policies=[], now=NOW)
    assert status["selector"] == ("app.kubernetes.io/instance=main,"
                                  "app.kubernetes.io/name=mailplane-relay")


def test_autoscaling_bounds_are_checked() -> None:
    with pytest.raises(models.SpecError, match="minReplicas must not exceed maxReplicas"):
        relay(autoscaling={"enabled": True, "minReplicas": 5, "maxReplicas": 2})


INTAKE = {"domain": "bounces.example.com", "keySecretRef": {"name": "main-intake-key"}}


def test_the_intake_gets_a_service_a_port_the_key_and_a_hole_in_the_network_policy() -> None:
    r = relay(intake={**INTAKE, "service": {"type": "LoadBalancer"}}, hostname="mx.example.com")
    children = relay_mod.relay_children(r)
    svc = next(c for c in children if c["metadata"]["name"] == "main-intake")
    assert svc["kind"] == "Service"
    assert svc["metadata"]["labels"]["mailplane.io/component"] == "intake"
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["externalTrafficPolicy"] == "Local"
    assert svc["spec"]["ports"] == [{"name": "smtp", "port": 25, "targetPort": "intake",
                                     "protocol": "TCP"}]
    for child in children:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kubernetes_validate.validate(child, kubernetes_validate.latest_version(),
                                         strict=True)
    pod = by_kind(children)["StatefulSet"]["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert {"name": "intake", "containerPort": 1025, "protocol": "TCP"} in container["ports"]
    assert {"name": "intake", "mountPath": "/etc/mailplane/intake",
            "readOnly": True} in container["volumeMounts"]
    assert {"name": "intake", "secret": {"secretName": "main-intake-key", "items": [
        {"key": "key", "path": "key"}]}} in pod["volumes"]
    policy = by_kind(children)["NetworkPolicy"]["spec"]["ingress"]
    assert {"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
            "ports": [{"protocol": "TCP", "port": 1025}]} in policy
    # Only the intake port is open to the Internet: the SMTP submission rule is unchanged.
    assert all(rule["ports"] == [{"protocol": "TCP", "port": 1025}] for rule in policy
               if any("ipBlock" in p for p in rule["from"]))
    assert ("v1", "Service", "main-intake") not in relay_mod.unwanted_children(r)
    # Turned off: the Service goes, the port and key too.
    off = relay(intake={**INTAKE, "enabled": False})
    assert "main-intake" not in {c["metadata"]["name"] for c in relay_mod.relay_children(off)}
    assert ("v1", "Service", "main-intake") in relay_mod.unwanted_children(off)


def test_the_status_shows_the_bounce_domain_records_and_clears_them_when_turned_off() -> None:
    r = relay(intake={**INTAKE, "mxHost": "intake.example.com"}, hostname="mx.example.com")
    patch = relay_mod.relay_status(
        r, statefulset_status={"replicas": 2, "readyReplicas": 2}, config_hash="h",
        config_secrets=[], domains=[], credentials=0, excluded=0, retention_policies=[],
        now=NOW)
    assert patch["intake"] == {
        "domain": "bounces.example.com", "service": "main-intake",
        "returnPath": "bounces+<token>@bounces.example.com",
        "dnsRecords": [
            {"purpose": "intake-mx", "type": "MX", "name": "bounces.example.com",
             "value": "10 intake.example.com."},
            {"purpose": "intake-spf", "type": "TXT", "name": "bounces.example.com",
             "value": "v=spf1 a:mx.example.com ~all"}]}
    # Without a public name, the records say what to fill in rather than guess.
    unnamed = relay(intake=INTAKE)
    assert [r["value"] for r in relay_mod.intake_dns_records(unnamed, unnamed.spec.intake)] == [
        "10 <the external DNS name of Service main-intake>.",
        "v=spf1 ip4:<the relay's egress addresses> ~all"]
    off = relay(intake={**INTAKE, "enabled": False})
    off.status["intake"] = patch["intake"]
    cleared = relay_mod.relay_status(
        off, statefulset_status={}, config_hash="h", config_secrets=[], domains=[],
        credentials=0, excluded=0, retention_policies=[], now=NOW)
    assert cleared["intake"] is None
    assert "intake" not in relay_mod.relay_status(
        relay(), statefulset_status={}, config_hash="h", config_secrets=[], domains=[],
        credentials=0, excluded=0, retention_policies=[], now=NOW)


@pytest.mark.parametrize(("intake", "problem"), [
    ({"domain": "bounces.example.com"}, "keySecretRef"),
    ({**INTAKE, "domain": "Not A Domain"}, "domain"),
    ({**INTAKE, "localPart": "Bounces+x"}, "localPart"),
    ({**INTAKE, "fromCIDRs": ["everyone"]}, "fromCIDRs"),
    # A NetworkPolicy ipBlock needs a prefix length; the API server refuses a bare address.
    ({**INTAKE, "fromCIDRs": ["203.0.113.7"]}, "needs a prefix length"),
    ({**INTAKE, "maxMessageSize": 100}, "maxMessageSize"),
])
def test_a_bad_intake_is_refused_naming_the_field(intake: dict[str, Any], problem: str) -> None:
    with pytest.raises(models.SpecError, match=problem):
        relay(intake=intake)


def test_the_webhook_signing_secret_and_ca_are_mounted_never_rendered() -> None:
    r = relay(webhooks={"url": "https://hooks.platform.example/mail",
                        "secretRef": {"name": "main-webhook", "previousKey": "old"},
                        "caSecretRef": {"name": "private-ca", "key": "bundle.pem"}})
    children = relay_mod.relay_children(r)
    pod = by_kind(children)["StatefulSet"]["spec"]["template"]["spec"]
    mounts = pod["containers"][0]["volumeMounts"]
    assert {"name": "webhook", "mountPath": "/etc/mailplane/webhook", "readOnly": True} in mounts
    assert {"name": "webhook-ca", "mountPath": "/etc/mailplane/webhook-ca",
            "readOnly": True} in mounts
    assert {"name": "webhook", "secret": {"secretName": "main-webhook", "items": [
        {"key": "secret", "path": "secret"}, {"key": "old", "path": "previous"}]}} in pod["volumes"]
    assert {"name": "webhook-ca", "secret": {"secretName": "private-ca", "items": [
        {"key": "bundle.pem", "path": "ca.crt"}]}} in pod["volumes"]
    for child in children:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            kubernetes_validate.validate(child, kubernetes_validate.latest_version(),
                                         strict=True)


@pytest.mark.parametrize(("webhooks", "problem"), [
    ({"url": "https://hooks.example/x"}, "url and webhooks.secretRef go together"),
    ({"secretRef": {"name": "s"}}, "url and webhooks.secretRef go together"),
    ({"url": "http://hooks.example/x", "secretRef": {"name": "s"}}, "url"),
    ({"url": "https://u:p@hooks.example/x", "secretRef": {"name": "s"}}, "url"),
    ({"allowPrivateNetworks": ["cluster"]}, "not a CIDR"),
    ({"timeout": "2m"}, "timeout"),
])
def test_a_bad_webhook_spec_is_refused_naming_the_field(webhooks: dict[str, Any],
                                                        problem: str) -> None:
    with pytest.raises(models.SpecError, match=problem):
        relay(webhooks=webhooks)
