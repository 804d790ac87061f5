"""SmtpRelay: the Kubernetes objects that run a relay pool, and the relay's status.

Children (all labelled ``app.kubernetes.io/name=mailplane-relay``,
``app.kubernetes.io/instance=<relay>``, ``app.kubernetes.io/managed-by=mailplane-operator`` and
owned by the SmtpRelay, so deleting the relay removes them):

- StatefulSet ``<relay>``: one spool PVC per pod (``spool`` at /var/lib/mailplane, which also
  holds the message log), non-root with a read-only root filesystem, probes on /livez and
  /readyz, a preStop pause so endpoints drop the pod before SIGTERM starts the drain, and a grace
  period longer than the preStop pause plus the relay's ``shutdownGrace``.
- Service ``<relay>``: what applications connect to, the SMTP ports only: submission 587 ->
  container 1587 (STARTTLS), submissions 465 -> 1465 (implicit TLS). The container listens on
  unprivileged ports so it needs no capability; clients only ever see the Service ports.
- Service ``<relay>-headless``: per-pod DNS for the StatefulSet, the SMTP ports only.
- Service ``<relay>-metrics``: the relay's http port (/metrics, /livez, /readyz), labelled
  ``mailplane.io/component=metrics``; the only Service the ServiceMonitor selects, so each pod
  is scraped exactly once and the metrics (which name every tenant's credentials and domains)
  are not on the Service tenants connect to.
- PodDisruptionBudget ``<relay>``: at most one pod drained at a time.
- ServiceMonitor ``<relay>`` when the caller says the cluster has that CRD.
- NetworkPolicy ``<relay>`` (unless ``spec.networkPolicy.enabled`` is false): ingress to the
  relay pods only on the SMTP container ports from the relay's namespace and the namespaces
  ``spec.allowedNamespaces`` selects, on the http port from the monitoring namespaces, and (with
  the intake) on the intake port from ``spec.intake.fromCIDRs`` (the Internet by default).
- Service ``<relay>-intake`` when ``spec.intake`` is set: port 25 -> container 1025, the
  bounce and complaint intake; the bounce domain's MX points at it. The VERP key Secret
  (``spec.intake.keySecretRef``) is mounted at /etc/mailplane/intake.

The pod template depends on the SmtpRelay spec only. The configuration is a projected volume of
``CONFIG_SECRET_SLOTS`` optional Secrets ``<relay>-config-0..N``: a credential or domain change
rewrites Secrets (the relay hot-reloads the directory) but never the pod template, so no pod
restarts. The config hash is shown in the SmtpRelay status and as an annotation on the
StatefulSet object (not its template).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from .conditions import READY, set_condition
from .models import (
    API_VERSION,
    IntakeSpec,
    LabelSelector,
    RelayDefaults,
    SmtpRelay,
    owner_reference,
)

DEFAULT_IMAGE = "ghcr.io/mailplane/mailplane:0.1.0"
CONFIG_SECRET_SLOTS = 16
"""How many config Secrets a relay can spread its configuration over (16 x 900 KiB)."""

CONFIG_DIR = "/etc/mailplane/config"
TLS_DIR = "/etc/mailplane/tls"
SMARTHOST_DIR = "/etc/mailplane/smarthost"
STORE_DIR = "/etc/mailplane/store"
INTAKE_DIR = "/etc/mailplane/intake"
WEBHOOK_DIR = "/etc/mailplane/webhook"
ERASURE_KEY_DIR = "/etc/mailplane/erasure-key"
WEBHOOK_CA_DIR = "/etc/mailplane/webhook-ca"
TLS_CA_DIR = "/etc/mailplane/tls-ca"
DATA_DIR = "/var/lib/mailplane"
SUBMISSION_CONTAINER_PORT = 1587
SUBMISSIONS_CONTAINER_PORT = 1465
INTAKE_CONTAINER_PORT = 1025
HTTP_PORT = 8080
ADMIN_PORT = 8443
PRESTOP_SECONDS = 5
RUN_AS_USER = 65532  # the image's "nonroot" user (Dockerfile)

ANN_CONFIG_HASH = "mailplane.io/config-hash"
LABEL_RELAY = "mailplane.io/relay"
LABEL_COMPONENT = "mailplane.io/component"
COMPONENT_SUBMISSION = "submission"
COMPONENT_HEADLESS = "headless"
COMPONENT_METRICS = "metrics"
COMPONENT_INTAKE = "intake"
METRICS_PORT_NAME = "metrics"


def selector_labels(relay: SmtpRelay) -> dict[str, str]:
    return {"app.kubernetes.io/name": "mailplane-relay",
            "app.kubernetes.io/instance": relay.meta.name}


def child_labels(relay: SmtpRelay) -> dict[str, str]:
    return {**selector_labels(relay), "app.kubernetes.io/managed-by": "mailplane-operator",
            LABEL_RELAY: relay.meta.name}


def config_secret_name(relay_name: str, index: int) -> str:
    return f"{relay_name}-config-{index}"


def _metadata(relay: SmtpRelay, name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": relay.meta.namespace, "labels": child_labels(relay),
            "ownerReferences": [owner_reference("SmtpRelay", relay.meta)], **extra}


def termination_grace_seconds(relay: SmtpRelay) -> int:
    """preStop pause + the relay's drain deadline + a margin for the last fsyncs and exit."""
    return PRESTOP_SECONDS + int(relay.spec.shutdown_grace + 0.999) + 10


_T = TypeVar("_T")
NO_DEFAULTS = RelayDefaults()


def _pick(own: _T | None, default: _T | None) -> _T | None:
    return own if own is not None else default


def _merged(own: dict[str, str] | None, default: dict[str, str] | None) -> dict[str, str]:
    return {**(default or {}), **(own or {})}


def _pod_shape(relay: SmtpRelay, defaults: RelayDefaults) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
    """(pod metadata, pod spec fields) from spec.pod over the operator's defaults: labels and
    annotations merge (the relay's win per key; the operator's own labels win over both),
    every other field is the relay's when set, else the default."""
    own, dflt = relay.spec.pod, defaults.pod
    meta: dict[str, Any] = {"labels": {**_merged(own.labels, dflt.labels),
                                       **child_labels(relay)}}
    annotations = _merged(own.annotations, dflt.annotations)
    if annotations:
        meta["annotations"] = annotations
    fields: dict[str, Any] = {}
    pull = _pick(own.image_pull_secrets, dflt.image_pull_secrets)
    if pull:
        fields["imagePullSecrets"] = [{"name": s.name} for s in pull]
    node_selector = _pick(own.node_selector, dflt.node_selector)
    if node_selector:
        fields["nodeSelector"] = dict(node_selector)
    tolerations = _pick(own.tolerations, dflt.tolerations)
    if tolerations:
        fields["tolerations"] = [t.model_dump(by_alias=True, exclude_none=True)
                                 for t in tolerations]
    affinity = _pick(own.affinity, dflt.affinity)
    if affinity:
        fields["affinity"] = affinity
    spread = _pick(own.topology_spread_constraints, dflt.topology_spread_constraints)
    if spread:
        # A constraint without a labelSelector counts no pods at all; spread this relay's.
        fields["topologySpreadConstraints"] = [
            {**c, "labelSelector": c.get("labelSelector")
             or {"matchLabels": selector_labels(relay)}} for c in spread]
    priority = _pick(own.priority_class_name, dflt.priority_class_name)
    if priority:
        fields["priorityClassName"] = priority
    return meta, fields


def pod_template(relay: SmtpRelay, image: str,
                 defaults: RelayDefaults = NO_DEFAULTS) -> dict[str, Any]:
    spec = relay.spec
    volumes: list[dict[str, Any]] = [
        {"name": "config", "projected": {"sources": [
            {"secret": {"name": config_secret_name(relay.meta.name, i), "optional": True}}
            for i in range(CONFIG_SECRET_SLOTS)
        ]}},
        {"name": "tls", "secret": {"secretName": spec.tls.secret_name,
                                   "items": [{"key": "tls.crt", "path": "tls.crt"},
                                             {"key": "tls.key", "path": "tls.key"}]}},
        # The CA that signed the pool's certificates (cert-manager writes ca.crt): a draining
        # pod verifies the peers it hands messages to. Optional: without it nothing is handed
        # off, and the relay says so.
        {"name": "tls-ca", "secret": {"secretName": spec.tls.secret_name, "optional": True,
                                      "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
        {"name": "tmp", "emptyDir": {"medium": "Memory", "sizeLimit": "64Mi"}},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tls", "mountPath": TLS_DIR, "readOnly": True},
        {"name": "tls-ca", "mountPath": TLS_CA_DIR, "readOnly": True},
        {"name": "spool", "mountPath": DATA_DIR},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    smarthost = spec.delivery.smarthost
    if smarthost is not None and smarthost.password_secret_ref is not None:
        ref = smarthost.password_secret_ref
        volumes.append({"name": "smarthost", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "password"}]}})
        mounts.append({"name": "smarthost", "mountPath": SMARTHOST_DIR, "readOnly": True})
    if spec.store.secret_ref is not None and spec.store.backend == "postgresql":
        ref = spec.store.secret_ref
        volumes.append({"name": "store", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "dsn"}]}})
        mounts.append({"name": "store", "mountPath": STORE_DIR, "readOnly": True})
    intake = intake_of(relay)
    if intake is not None:
        ref = intake.key_secret_ref
        volumes.append({"name": "intake", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "key"}]}})
        mounts.append({"name": "intake", "mountPath": INTAKE_DIR, "readOnly": True})
    erasure_ref = spec.store.erasure_key_secret_ref
    if erasure_ref is not None:
        # The key stays in its Secret, mounted as files (never rendered, never in the store).
        items = [{"key": erasure_ref.key, "path": "key"}]
        if erasure_ref.previous_key:
            items.append({"key": erasure_ref.previous_key, "path": "previous"})
        volumes.append({"name": "erasure-key", "secret": {"secretName": erasure_ref.name,
                                                          "items": items}})
        mounts.append({"name": "erasure-key", "mountPath": ERASURE_KEY_DIR, "readOnly": True})
    hooks = spec.webhooks
    if hooks is not None and hooks.secret_ref is not None:
        # The signing secret(s) stay in their Secret, mounted as files (never rendered).
        ref = hooks.secret_ref
        items = [{"key": ref.key, "path": "secret"}]
        if ref.previous_key:
            items.append({"key": ref.previous_key, "path": "previous"})
        volumes.append({"name": "webhook", "secret": {"secretName": ref.name, "items": items}})
        mounts.append({"name": "webhook", "mountPath": WEBHOOK_DIR, "readOnly": True})
    if hooks is not None and hooks.ca_secret_ref is not None:
        ref = hooks.ca_secret_ref
        volumes.append({"name": "webhook-ca", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "ca.crt"}]}})
        mounts.append({"name": "webhook-ca", "mountPath": WEBHOOK_CA_DIR, "readOnly": True})
    ports = [{"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
             {"name": "admin", "containerPort": ADMIN_PORT, "protocol": "TCP"}]
    if intake is not None:
        ports.append({"name": "intake", "containerPort": INTAKE_CONTAINER_PORT,
                      "protocol": "TCP"})
    if spec.listeners.submission.enabled:
        ports.append({"name": "submission", "containerPort": SUBMISSION_CONTAINER_PORT,
                      "protocol": "TCP"})
    if spec.listeners.submissions.enabled:
        ports.append({"name": "submissions", "containerPort": SUBMISSIONS_CONTAINER_PORT,
                      "protocol": "TCP"})
    container: dict[str, Any] = {
        "name": "relay",
        "image": spec.image or image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["mailplane", "relay", "--config", CONFIG_DIR],
        "ports": ports,
        "volumeMounts": mounts,
        "livenessProbe": {"httpGet": {"path": "/livez", "port": "http"},
                          "periodSeconds": 10, "timeoutSeconds": 3, "failureThreshold": 3},
        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "http"},
                           "periodSeconds": 5, "timeoutSeconds": 3, "failureThreshold": 2},
        "startupProbe": {"httpGet": {"path": "/livez", "port": "http"},
                         "periodSeconds": 2, "failureThreshold": 60},
        # The pause lets endpoint controllers drop the pod from the Service before SIGTERM makes
        # the relay stop accepting; the relay's own drain then runs within shutdownGrace.
        "lifecycle": {"preStop": {"exec": {"command": ["sleep", str(PRESTOP_SECONDS)]}}},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        },
    }
    if spec.resources:
        container["resources"] = dict(spec.resources)
    pod_meta, pod_fields = _pod_shape(relay, defaults)
    return {
        "metadata": pod_meta,
        "spec": {
            **pod_fields,
            "serviceAccountName": spec.service_account_name,
            "automountServiceAccountToken": False,
            "terminationGracePeriodSeconds": termination_grace_seconds(relay),
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": RUN_AS_USER,
                "runAsGroup": RUN_AS_USER,
                "fsGroup": RUN_AS_USER,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [container],
            "volumes": volumes,
        },
    }


def statefulset(relay: SmtpRelay, *, image: str = DEFAULT_IMAGE,
                config_hash: str | None = None,
                defaults: RelayDefaults = NO_DEFAULTS,
                replicas: int | None = None) -> dict[str, Any]:
    """``replicas``: what the StatefulSet runs while a scale-down drains the pods to be removed
    (default ``spec.replicas``)."""
    spool = relay.spec.spool
    pvc_spec: dict[str, Any] = {"accessModes": ["ReadWriteOnce"],
                                "resources": {"requests": {"storage": spool.size}}}
    if spool.storage_class_name:
        pvc_spec["storageClassName"] = spool.storage_class_name
    annotations = {ANN_CONFIG_HASH: config_hash} if config_hash else {}
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": _metadata(relay, relay.meta.name, annotations=annotations),
        "spec": {
            "replicas": relay.spec.replicas if replicas is None else replicas,
            "serviceName": headless_service_name(relay.meta.name),
            # Pods are independent relays with their own spools: no ordering needed.
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": selector_labels(relay)},
            "updateStrategy": {"type": "RollingUpdate"},
            # Deleted with the SmtpRelay: the pool and its queue go together. Kept on a scale
            # down: the operator drains a pod's queue to the remaining pods first, then deletes
            # the emptied volume itself (Delete here would drop the volume of a pod removed by a
            # hand edit of the StatefulSet, queue and all).
            "persistentVolumeClaimRetentionPolicy": {"whenDeleted": "Delete",
                                                     "whenScaled": "Retain"},
            "template": pod_template(relay, image, defaults),
            "volumeClaimTemplates": [{"metadata": {"name": "spool"}, "spec": pvc_spec}],
        },
    }


def _smtp_ports(relay: SmtpRelay) -> list[dict[str, Any]]:
    listeners = relay.spec.listeners
    ports = []
    if listeners.submission.enabled:
        ports.append({"name": "submission", "port": listeners.submission.port,
                      "targetPort": "submission", "protocol": "TCP"})
    if listeners.submissions.enabled:
        ports.append({"name": "submissions", "port": listeners.submissions.port,
                      "targetPort": "submissions", "protocol": "TCP"})
    return ports


def _component_metadata(relay: SmtpRelay, name: str, component: str) -> dict[str, Any]:
    meta = _metadata(relay, name)
    meta["labels"] = {**meta["labels"], LABEL_COMPONENT: component}
    return meta


def metrics_service_name(relay_name: str) -> str:
    return f"{relay_name}-metrics"


def headless_service_name(relay_name: str) -> str:
    return f"{relay_name}-headless"


def service(relay: SmtpRelay, defaults: RelayDefaults = NO_DEFAULTS) -> dict[str, Any]:
    """The Service applications connect to: SMTP only (never the metrics port). Its type and
    annotations come from spec.service over the operator's defaults (e.g. a LoadBalancer
    with the cloud's annotations); the headless and metrics Services stay internal."""
    own, dflt = relay.spec.service, defaults.service
    meta = _component_metadata(relay, relay.meta.name, COMPONENT_SUBMISSION)
    annotations = _merged(own.annotations, dflt.annotations)
    if annotations:
        meta["annotations"] = annotations
    spec: dict[str, Any] = {"type": service_type(relay, defaults),
                            "selector": selector_labels(relay), "ports": _smtp_ports(relay)}
    if spec["type"] != "ClusterIP":
        # Keep the client's address: the relay's per-address AUTH throttle and session cap, and
        # the NetworkPolicy's smtpFromCIDRs, would otherwise see a node's address for everyone.
        spec["externalTrafficPolicy"] = "Local"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def service_type(relay: SmtpRelay, defaults: RelayDefaults = NO_DEFAULTS) -> str:
    return _pick(relay.spec.service.type, defaults.service.type) or "ClusterIP"


def intake_of(relay: SmtpRelay) -> IntakeSpec | None:
    """The relay's intake settings when the intake is on."""
    intake = relay.spec.intake
    return intake if intake is not None and intake.enabled else None


def intake_service_name(relay_name: str) -> str:
    return f"{relay_name}-intake"


def intake_service(relay: SmtpRelay, intake: IntakeSpec) -> dict[str, Any]:
    """``<relay>-intake``: where the bounce domain's MX points (port 25 -> the intake container
    port). Mail servers on the Internet reach it, so it is usually a LoadBalancer."""
    meta = _component_metadata(relay, intake_service_name(relay.meta.name), COMPONENT_INTAKE)
    if intake.service.annotations:
        meta["annotations"] = dict(intake.service.annotations)
    spec: dict[str, Any] = {
        "type": intake.service.type or "ClusterIP", "selector": selector_labels(relay),
        "ports": [{"name": "smtp", "port": intake.port, "targetPort": "intake",
                   "protocol": "TCP"}]}
    if spec["type"] != "ClusterIP":
        # The intake's per-address session cap needs the client's address.
        spec["externalTrafficPolicy"] = "Local"
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": spec}


def intake_dns_records(relay: SmtpRelay, intake: IntakeSpec) -> list[dict[str, str]]:
    """What to publish for the bounce domain: its MX (to the intake Service) and an SPF record
    (the return path's domain is the one SPF checks). Without a public name to go by
    (``intake.mxHost``, ``spec.hostname``) the value says what to fill in."""
    hostname = relay.spec.hostname
    mx_host = intake.mx_host or hostname
    mx = (f"10 {mx_host.rstrip('.')}." if mx_host else
          f"10 <the external DNS name of Service {intake_service_name(relay.meta.name)}>.")
    spf = intake.spf_record or (f"v=spf1 a:{hostname} ~all" if hostname
                                else "v=spf1 ip4:<the relay's egress addresses> ~all")
    return [
        {"purpose": "intake-mx", "type": "MX", "name": intake.domain, "value": mx},
        {"purpose": "intake-spf", "type": "TXT", "name": intake.domain, "value": spf},
    ]


def headless_service(relay: SmtpRelay) -> dict[str, Any]:
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _component_metadata(relay, headless_service_name(relay.meta.name),
                                        COMPONENT_HEADLESS),
        "spec": {"clusterIP": "None", "selector": selector_labels(relay),
                 "publishNotReadyAddresses": True, "ports": _smtp_ports(relay)},
    }


def metrics_service(relay: SmtpRelay) -> dict[str, Any]:
    """The one Service the ServiceMonitor selects: one endpoint per pod, the http port only."""
    return {
        "apiVersion": "v1", "kind": "Service",
        "metadata": _component_metadata(relay, metrics_service_name(relay.meta.name),
                                        COMPONENT_METRICS),
        "spec": {"type": "ClusterIP", "selector": selector_labels(relay),
                 "ports": [{"name": METRICS_PORT_NAME, "port": HTTP_PORT, "targetPort": "http",
                            "protocol": "TCP"}]},
    }


def pod_disruption_budget(relay: SmtpRelay) -> dict[str, Any]:
    return {
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": _metadata(relay, relay.meta.name),
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector_labels(relay)}},
    }


AUTOSCALING_METRICS = {
    "queueMessages": "mailplane_relay_queue_messages",
    "oldestMessageAge": "mailplane_relay_queue_oldest_message_age_seconds",
}
"""spec.autoscaling.metric -> the relay's Prometheus series, as the Prometheus adapter serves it
to the HPA under the same name (custom.metrics.k8s.io, per pod)."""


def horizontal_pod_autoscaler(relay: SmtpRelay) -> dict[str, Any]:
    """The HPA scales the SmtpRelay itself (its scale subresource), so spec.replicas stays the
    one source of the StatefulSet's replicas and the operator never fights the autoscaler."""
    auto = relay.spec.autoscaling
    scale_down: dict[str, Any] = {"stabilizationWindowSeconds": 600,
                                  "policies": [{"type": "Pods", "value": 1,
                                                "periodSeconds": 300}]}
    if not auto.scale_down:
        scale_down = {"selectPolicy": "Disabled"}
    return {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": _metadata(relay, relay.meta.name),
        "spec": {
            "scaleTargetRef": {"apiVersion": API_VERSION, "kind": "SmtpRelay",
                               "name": relay.meta.name},
            "minReplicas": auto.min_replicas,
            "maxReplicas": auto.max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": AUTOSCALING_METRICS[auto.metric]},
                "target": {"type": "AverageValue", "averageValue": str(auto.target)}}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 60,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                "scaleDown": scale_down,
            },
        },
    }


def selector_string(relay: SmtpRelay) -> str:
    """The pods' label selector as a string: status.selector, which the scale subresource
    hands to an HPA (labelSelectorPath) to find the pods whose metrics it averages."""
    return ",".join(f"{k}={v}" for k, v in sorted(selector_labels(relay).items()))


def service_monitor(relay: SmtpRelay) -> dict[str, Any]:
    sm = relay.spec.monitoring.service_monitor
    meta = _metadata(relay, relay.meta.name)
    meta["labels"] = {**meta["labels"], **sm.labels}
    return {
        "apiVersion": "monitoring.coreos.com/v1", "kind": "ServiceMonitor",
        "metadata": meta,
        # job="mailplane-relay" for every pool: the shipped alerts (monitoring/rules.yaml)
        # select it. The selector names the metrics Service alone (the submission and headless
        # Services share the pod selector labels but not the component): one target per pod.
        "spec": {"jobLabel": "app.kubernetes.io/name",
                 "namespaceSelector": {"matchNames": [relay.meta.namespace]},
                 "selector": {"matchLabels": {**selector_labels(relay),
                                              LABEL_COMPONENT: COMPONENT_METRICS}},
                 "endpoints": [{"port": METRICS_PORT_NAME, "path": "/metrics",
                                "interval": sm.interval}]},
    }


def _selector_dict(selector: LabelSelector) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if selector.match_labels:
        out["matchLabels"] = dict(selector.match_labels)
    if selector.match_expressions:
        out["matchExpressions"] = [
            {"key": r.key, "operator": r.operator,
             **({"values": list(r.values)} if r.values else {})}
            for r in selector.match_expressions]
    return out


def admin_server_name(relay: SmtpRelay) -> str:
    """The name a relay pod's certificate must carry for the admin port's clients (the
    operator, the pool's other pods): pods are reached by IP, and this is checked instead."""
    return f"{relay.meta.name}.{relay.meta.namespace}.svc"


def network_policy(relay: SmtpRelay, operator_namespace: str | None = None) -> dict[str, Any]:
    """Who may open a connection to a relay pod. Tenants (the namespaces allowed to attach
    credentials) reach the SMTP listeners only; the metrics port, whose series name every
    tenant's usernames and domains, is for the monitoring namespaces; nothing else gets in.
    Ports are the pods' container ports (a NetworkPolicy applies after the Service's
    translation). Kubelet probes come from the node and are not subject to the policy in the
    common CNI plugins."""
    spec = relay.spec
    smtp_clients: list[dict[str, Any]] = [{"podSelector": {}}]  # the relay's own namespace
    if spec.allowed_namespaces is not None:
        smtp_clients.append({"namespaceSelector": _selector_dict(spec.allowed_namespaces)})
    # Clients outside the cluster, for a LoadBalancer or NodePort Service.
    smtp_clients += [{"ipBlock": {"cidr": c}} for c in spec.network_policy.smtp_from_cidrs]
    smtp_ports = []
    if spec.listeners.submission.enabled:
        smtp_ports.append({"protocol": "TCP", "port": SUBMISSION_CONTAINER_PORT})
    if spec.listeners.submissions.enabled:
        smtp_ports.append({"protocol": "TCP", "port": SUBMISSIONS_CONTAINER_PORT})
    scrapers = _selector_dict(spec.network_policy.metrics_namespace_selector)
    ingress: list[dict[str, Any]] = [
        {"from": smtp_clients, "ports": smtp_ports},
        {"from": [{"namespaceSelector": scrapers}],
         "ports": [{"protocol": "TCP", "port": HTTP_PORT}]},
    ]
    # The authenticated /admin endpoints (HTTPS, their own port): the operator tells a pod to
    # drain and asks what it runs; a draining pod hands its messages to the others of its pool.
    admins: list[dict[str, Any]] = [{"podSelector": {"matchLabels": selector_labels(relay)}}]
    if operator_namespace:
        admins.append({"namespaceSelector": {"matchLabels": {
            "kubernetes.io/metadata.name": operator_namespace}}})
    ingress.append({"from": admins, "ports": [{"protocol": "TCP", "port": ADMIN_PORT}]})
    intake = intake_of(relay)
    if intake is not None:
        # Reports come from mail servers anywhere: the intake port only, from intake.fromCIDRs.
        ingress.append({"from": [{"ipBlock": {"cidr": c}} for c in intake.from_cidrs],
                        "ports": [{"protocol": "TCP", "port": INTAKE_CONTAINER_PORT}]})
    return {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": _metadata(relay, relay.meta.name),
        "spec": {
            "podSelector": {"matchLabels": selector_labels(relay)},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }


def unwanted_children(relay: SmtpRelay, *,
                      service_monitor_available: bool = False) -> list[tuple[str, str, str]]:
    """(apiVersion, kind, name) of optional children the spec does not ask for: the caller
    deletes each one it finds with this relay as its controller owner."""
    out = []
    if not relay.spec.network_policy.enabled:
        out.append(("networking.k8s.io/v1", "NetworkPolicy", relay.meta.name))
    if service_monitor_available and not relay.spec.monitoring.service_monitor.enabled:
        out.append(("monitoring.coreos.com/v1", "ServiceMonitor", relay.meta.name))
    if not relay.spec.autoscaling.enabled:
        out.append(("autoscaling/v2", "HorizontalPodAutoscaler", relay.meta.name))
    if intake_of(relay) is None:
        out.append(("v1", "Service", intake_service_name(relay.meta.name)))
    return out


def relay_children(relay: SmtpRelay, *, image: str = DEFAULT_IMAGE,
                   service_monitor_available: bool = False,
                   config_hash: str | None = None,
                   defaults: RelayDefaults = NO_DEFAULTS,
                   replicas: int | None = None,
                   operator_namespace: str | None = None) -> list[dict[str, Any]]:
    """The desired children, in apply order. ``service_monitor_available``: the cluster serves
    monitoring.coreos.com/v1 ServiceMonitor (the caller checks discovery); ``replicas``: the
    StatefulSet's while a scale-down drains; ``operator_namespace``: where the operator runs
    (the NetworkPolicy lets it reach the pods' ops port)."""
    # The policy first: no pod runs unfenced while the rest is created.
    out = [network_policy(relay, operator_namespace)] if relay.spec.network_policy.enabled \
        else []
    out += [service(relay, defaults), headless_service(relay), metrics_service(relay),
            pod_disruption_budget(relay),
            statefulset(relay, image=image, config_hash=config_hash, defaults=defaults,
                        replicas=replicas)]
    intake = intake_of(relay)
    if intake is not None:
        out.append(intake_service(relay, intake))
    if service_monitor_available and relay.spec.monitoring.service_monitor.enabled:
        out.append(service_monitor(relay))
    if relay.spec.autoscaling.enabled:
        out.append(horizontal_pod_autoscaler(relay))
    return out


def relay_status(
    relay: SmtpRelay,
    *,
    statefulset_status: Mapping[str, Any] | None,
    config_hash: str,
    config_secrets: list[str],
    domains: list[str],
    credentials: int,
    excluded: int,
    retention_policies: list[str],
    now: datetime,
    error: str | None = None,
    excluded_entries: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    """The SmtpRelay status patch. Ready: configuration rendered and every replica ready.
    ``error``: a render failure message (Ready=False, reason ConfigInvalid).
    ``excluded_entries``: ``{kind, name, reason, message}`` of each resource referencing the
    relay but left out of its configuration, most important first; the status lists the first
    ``MAX_LISTED_EXCLUSIONS`` (messages name fields and resources, never a secret value) and
    the condition ``ConfigComplete`` summarises them by reason."""
    sts = statefulset_status or {}
    ready_replicas = int(sts.get("readyReplicas") or 0)
    want = relay.spec.replicas
    if error:
        ready = (False, "ConfigInvalid", error)
    elif ready_replicas < want:
        ready = (False, "ReplicasNotReady", f"{ready_replicas}/{want} replicas ready")
    else:
        ready = (True, "RelayReady", f"{ready_replicas}/{want} replicas ready; "
                 f"{len(domains)} domains, {credentials} credentials")
    conditions = set_condition(relay.status.get("conditions"), READY, *ready,
                               relay.meta.generation, now)
    if not error:
        conditions = set_condition(conditions, CONFIG_COMPLETE,
                                   *_completeness(excluded_entries), relay.meta.generation, now)
    return {
        "observedGeneration": relay.meta.generation,
        "conditions": conditions,
        "replicas": int(sts.get("replicas") or 0),
        "selector": selector_string(relay),
        "readyReplicas": ready_replicas,
        "configHash": config_hash,
        "configSecrets": config_secrets,
        "domains": domains,
        "domainCount": len(domains),
        "credentialCount": credentials,
        "excludedCount": excluded,
        "excluded": [
            {"kind": str(e.get("kind")), "name": str(e.get("name")),
             "reason": str(e.get("reason")),
             "message": str(e.get("message"))[:MAX_EXCLUSION_MESSAGE]}
            for e in list(excluded_entries)[:MAX_LISTED_EXCLUSIONS]],
        "retentionPolicies": retention_policies,
        **_intake_status(relay),
    }


def _intake_status(relay: SmtpRelay) -> dict[str, Any]:
    intake = intake_of(relay)
    if intake is None:
        # A merge patch: null removes what an earlier intake left in the status.
        return {"intake": None} if relay.status.get("intake") else {}
    return {"intake": {
        "domain": intake.domain,
        "service": intake_service_name(relay.meta.name),
        "returnPath": f"{intake.local_part}+<token>@{intake.domain}",
        "dnsRecords": intake_dns_records(relay, intake),
    }}


CONFIG_COMPLETE = "ConfigComplete"
MAX_LISTED_EXCLUSIONS = 50
MAX_EXCLUSION_MESSAGE = 300


def _completeness(entries: Sequence[Mapping[str, str]]) -> tuple[bool, str, str]:
    if not entries:
        return True, "AllEntriesRendered", "every domain and credential referencing this relay " \
            "is in its configuration"
    counts: dict[str, int] = {}
    for e in entries:
        reason = str(e.get("reason"))
        counts[reason] = counts.get(reason, 0) + 1
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    return False, "EntriesExcluded", (
        f"{len(entries)} left out of the configuration ({summary}); the others are rendered. "
        "See status.excluded and each resource's Ready condition")
