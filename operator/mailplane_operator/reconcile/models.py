"""Typed models of the four custom resources: the operator's trust boundary.

A CR body (the dict kopf hands over) is parsed once with ``parse_smtp_relay``,
``parse_sending_domain``, ``parse_smtp_credential`` or ``parse_retention_policy``; a body that
does not fit raises ``SpecError`` whose message names the field (``spec.delivery.smarthost: ...``)
and the fix. The CRD schema (crds/) rejects most of this at admission already; these models repeat
the rules that matter, including the CEL rules, because the operator must not trust that the CRD
installed in a cluster is the current one.

Durations in the custom resources use the Kubernetes/Go form (``90s``, ``15m``, ``2160h``,
``1h30m``), as cert-manager does, so that CEL's ``duration()`` can compare them; the models turn
them into seconds (floats).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .conditions import parse_time

GROUP = "mailplane.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

DOMAIN_PATTERN = (
    r"^(?=.{1,253}$)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))+$"
)
# The same rule without look-arounds, for the CRD (Kubernetes patterns are RE2: no look-arounds).
DOMAIN_PATTERN_RE2 = r"^([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
SENDER_PATTERN_RE2 = (
    r"^([A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]{1,64}@)?"
    r"([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"
)
SELECTOR_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,30}[a-z0-9])?$"
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
GO_DURATION_PATTERN = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"

_DOMAIN_RE = re.compile(DOMAIN_PATTERN)
_SENDER_RE = re.compile(SENDER_PATTERN_RE2)
_GO_DURATION_RE = re.compile(GO_DURATION_PATTERN)
_GO_DURATION_PART = re.compile(r"([0-9]+(?:\.[0-9]+)?)(ms|s|m|h)")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


class SpecError(ValueError):
    """A custom resource that cannot be reconciled; the message names the field and the fix."""


def parse_go_duration(value: str) -> float:
    """Seconds from a Kubernetes/Go duration string (``90s``, ``15m``, ``2160h``, ``1h30m``)."""
    text = value.strip()
    if not _GO_DURATION_RE.match(text):
        raise ValueError(
            f"{value!r} is not a duration: use a number with a unit ms, s, m or h, "
            "e.g. '90s', '15m', '2160h' (90 days), '1h30m'"
        )
    return sum(float(n) * _UNITS[u] for n, u in _GO_DURATION_PART.findall(text))


def format_duration(seconds: float) -> str:
    """A duration in the Go form, the shortest exact one (``2160h``, ``90s``, ``1h30m``)."""
    whole = round(seconds)
    if abs(seconds - whole) > 1e-9:
        return f"{round(seconds * 1000)}ms"
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    out = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    out += f"{secs}s" if secs or not out else ""
    return out


def _as_seconds(_cls: type, value: object) -> object:
    if isinstance(value, str):
        return parse_go_duration(value)
    return value


def _durations(*names: str) -> Any:
    """A validator that reads Go duration strings in these fields as seconds."""
    return field_validator(*names, mode="before")(classmethod(_as_seconds))


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


_S = TypeVar("_S", bound=_Spec)


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


class LabelSelectorRequirement(_Spec):
    key: str = Field(min_length=1)
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _values_fit_operator(self) -> LabelSelectorRequirement:
        if self.operator in ("In", "NotIn") and not self.values:
            raise ValueError(f"operator {self.operator} needs at least one value")
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise ValueError(f"operator {self.operator} takes no values")
        return self


class LabelSelector(_Spec):
    """The Kubernetes label selector. An empty selector matches everything."""

    match_labels: dict[str, str] = Field(default_factory=dict, alias="matchLabels")
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field((), alias="matchExpressions")

    def matches(self, labels: Mapping[str, str]) -> bool:
        if any(labels.get(k) != v for k, v in self.match_labels.items()):
            return False
        for req in self.match_expressions:
            present = req.key in labels
            if req.operator == "In" and not (present and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and present and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not present:
                return False
            if req.operator == "DoesNotExist" and present:
                return False
        return True


class ObjectRef(_Spec):
    """A reference to a namespaced object; an omitted namespace means the referrer's own."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    namespace: str | None = Field(None, pattern=DNS_LABEL_PATTERN, max_length=63)


class SecretKeyRef(_Spec):
    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    key: str = Field("password", pattern=r"^[-._a-zA-Z0-9]+$")


# --------------------------------------------------------------------------------------------
# SmtpRelay
# --------------------------------------------------------------------------------------------


class ListenerSpec(_Spec):
    enabled: bool = True
    port: int = Field(587, ge=1, le=65535)


class ImplicitTLSListenerSpec(ListenerSpec):
    port: int = Field(465, ge=1, le=65535)


class ListenersSpec(_Spec):
    """Service ports. ``submission``: STARTTLS (587); ``submissions``: implicit TLS (465)."""

    submission: ListenerSpec = ListenerSpec()
    submissions: ImplicitTLSListenerSpec = ImplicitTLSListenerSpec()

    @model_validator(mode="after")
    def _one_enabled(self) -> ListenersSpec:
        if not (self.submission.enabled or self.submissions.enabled):
            raise ValueError("enable at least one of listeners.submission and "
                             "listeners.submissions")
        if self.submission.enabled and self.submissions.enabled and (
            self.submission.port == self.submissions.port
        ):
            raise ValueError("listeners.submission.port and listeners.submissions.port "
                             "must differ")
        return self


class RelayTLSSpec(_Spec):
    """The Secret holding ``tls.crt`` and ``tls.key`` (a cert-manager Certificate's Secret)."""

    secret_name: str = Field(alias="secretName", pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    min_version: Literal["1.2", "1.3"] = Field("1.2", alias="minVersion")


class SmarthostSpec(_Spec):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(587, ge=1, le=65535)
    tls: Literal["starttls", "implicit", "none"] = "starttls"
    username: str | None = Field(None, min_length=1, max_length=256)
    password_secret_ref: SecretKeyRef | None = Field(None, alias="passwordSecretRef")
    allow_plaintext_auth: bool = Field(False, alias="allowPlaintextAuth")

    @model_validator(mode="after")
    def _auth_pair(self) -> SmarthostSpec:
        if (self.username is None) != (self.password_secret_ref is None):
            raise ValueError("username and passwordSecretRef go together: set both for AUTH "
                             "to the smarthost, or neither")
        if self.username is not None and self.tls == "none" and not self.allow_plaintext_auth:
            raise ValueError("smarthost.tls is none but smarthost.username is set, so the "
                             "password would cross the network in clear text; use tls "
                             "starttls or implicit, or set smarthost.allowPlaintextAuth true")
        return self


class MXTLSPolicySpec(_Spec):
    domains: tuple[str, ...] = Field(min_length=1, max_length=100)
    level: Literal["none", "may", "encrypt", "verify"]


class MXTLSSpec(_Spec):
    level: Literal["none", "may", "encrypt", "verify"] | None = None
    policies: tuple[MXTLSPolicySpec, ...] = Field((), max_length=200)


class MTASTSSpec(_Spec):
    enabled: bool = True


class DeliverySpec(_Spec):
    mode: Literal["mx", "smarthost"] = "mx"
    smarthost: SmarthostSpec | None = None
    helo_name: str | None = Field(None, alias="heloName", max_length=253)
    mx_tls: MXTLSSpec = Field(MXTLSSpec(), alias="mxTls")
    mta_sts: MTASTSSpec = Field(MTASTSSpec(), alias="mtaSts")

    @model_validator(mode="after")
    def _smarthost_needed(self) -> DeliverySpec:
        if self.mode == "smarthost" and self.smarthost is None:
            raise ValueError("mode is 'smarthost' but smarthost is missing: add "
                             "smarthost.host (and port), or use mode 'mx'")
        if self.mode == "mx" and self.smarthost is not None:
            raise ValueError("smarthost is set but mode is 'mx': set mode 'smarthost' or "
                             "remove smarthost")
        return self


class QueueSpec(_Spec):
    retry_initial: float = Field(60.0, alias="retryInitial", ge=1)
    retry_max: float = Field(3600.0, alias="retryMax", ge=1)
    max_lifetime: float = Field(5 * 86400.0, alias="maxLifetime", ge=60)
    delay_warning: float = Field(4 * 3600.0, alias="delayWarning", ge=0)

    _d = _durations("retry_initial", "retry_max", "max_lifetime", "delay_warning")

    @model_validator(mode="after")
    def _order(self) -> QueueSpec:
        if self.retry_max < self.retry_initial:
            raise ValueError("retryMax must not be shorter than retryInitial")
        if self.max_lifetime < self.retry_initial:
            raise ValueError("maxLifetime must not be shorter than retryInitial")
        return self


class SpoolSpec(_Spec):
    size: str = Field("10Gi", pattern=QUANTITY_PATTERN)
    storage_class_name: str | None = Field(None, alias="storageClassName")


class LimitsSpec(_Spec):
    max_message_size: int = Field(25 * 1024 * 1024, alias="maxMessageSize", ge=1024)
    max_recipients: int = Field(100, alias="maxRecipients", ge=1, le=10000)
    default_rate_per_minute: int | None = Field(None, alias="defaultRatePerMinute", ge=1)
    default_daily_quota: int | None = Field(None, alias="defaultDailyQuota", ge=1)
    max_rate_per_minute: int | None = Field(None, alias="maxRatePerMinute", ge=1)
    """Ceiling of any one credential's rate: a credential may ask for less, never more."""
    max_daily_quota: int | None = Field(None, alias="maxDailyQuota", ge=1)
    """Ceiling of any one credential's daily quota."""
    max_sessions_per_address: int | None = Field(None, alias="maxSessionsPerAddress", ge=1,
                                                 le=100000)
    """Concurrent SMTP sessions from one client address (the relay's default when unset)."""
    bare_newline: Literal["normalize", "reject"] | None = Field(None, alias="bareNewline")
    """A bare LF in message data: a line end (normalize) or a refusal (reject)."""

    @model_validator(mode="after")
    def _defaults_under_ceilings(self) -> LimitsSpec:
        for default, ceiling, names in (
            (self.default_rate_per_minute, self.max_rate_per_minute,
             ("defaultRatePerMinute", "maxRatePerMinute")),
            (self.default_daily_quota, self.max_daily_quota,
             ("defaultDailyQuota", "maxDailyQuota")),
        ):
            if default is not None and ceiling is not None and default > ceiling:
                raise ValueError(f"limits.{names[0]} must not exceed limits.{names[1]}")
        return self


class ServiceMonitorSpec(_Spec):
    enabled: bool = True
    interval: str = Field("30s", pattern=GO_DURATION_PATTERN)
    labels: dict[str, str] = Field(default_factory=dict)


class MonitoringSpec(_Spec):
    service_monitor: ServiceMonitorSpec = Field(ServiceMonitorSpec(), alias="serviceMonitor")


NO_CONTROL_PATTERN = r"^[^\x00-\x1f\x7f]+$"
"""One line of text: a reason shown in an SMTP reply must not hold CR, LF or other controls."""


class PlatformSuspension(_Spec):
    """A suspension decided by the platform: one credential, or every credential of a
    namespace when ``name`` is absent. Tenants cannot write the SmtpRelay, so cannot lift it."""

    namespace: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63)
    name: str | None = Field(None, pattern=DNS_SUBDOMAIN_PATTERN, max_length=253)
    reason: str = Field(min_length=1, max_length=200, pattern=NO_CONTROL_PATTERN)

    def applies_to(self, namespace: str, name: str) -> bool:
        return self.namespace == namespace and self.name in (None, name)


class TenancySpec(_Spec):
    """What the platform (the relay's namespace) decides for the tenants of this relay."""

    suspensions: tuple[PlatformSuspension, ...] = Field((), max_length=1000)
    verification_skip_namespaces: LabelSelector | None = Field(
        None, alias="verificationSkipNamespaces")
    """Namespaces whose SendingDomains may use ``verification.skip`` (the relay's own namespace
    always may; absent: no other)."""
    dns_publish_namespaces: LabelSelector | None = Field(None, alias="dnsPublishNamespaces")
    """Namespaces whose SendingDomains may have the operator publish their records through an
    external-dns DNSEndpoint (the relay's own namespace always may; absent: no other). As
    strong as skipping verification: external-dns writes whatever name it is given in the
    zones it manages."""
    dns_grace_period: float = Field(72 * 3600.0, alias="dnsGracePeriod", ge=0)
    """How long a verified domain stays enabled after DNS answers that its DKIM record is gone,
    before it is disabled."""

    _d = _durations("dns_grace_period")


_QUALIFIED_NAME_RE = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)$")
_LABEL_VALUE_RE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$")
RESERVED_POD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance",
                       "app.kubernetes.io/managed-by", "mailplane.io/relay")
"""Labels the operator sets on relay pods (the StatefulSet's selector among them)."""


def _check_keys(what: str, mapping: Mapping[str, str] | None) -> None:
    for key in mapping or {}:
        if len(key) > 316 or not _QUALIFIED_NAME_RE.match(key):
            raise ValueError(f"{what} key {key!r} is not a valid label/annotation key "
                             "([prefix/]name, name at most 63 characters)")


def _check_label_values(what: str, labels: Mapping[str, str] | None) -> None:
    for key, value in (labels or {}).items():
        if len(value) > 63 or not _LABEL_VALUE_RE.match(value):
            raise ValueError(f"{what}[{key}] is not a valid label value (at most 63 letters, "
                             "digits, '-', '_' or '.', starting and ending alphanumeric)")


class ImagePullSecret(_Spec):
    name: str = Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)


class Toleration(_Spec):
    key: str | None = Field(None, max_length=316)
    operator: Literal["Exists", "Equal"] | None = None
    value: str | None = Field(None, max_length=63)
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(None, alias="tolerationSeconds")


class RelayPodSpec(_Spec):
    """Scheduling and metadata of the relay pods. ``None``: not set here (the operator's
    defaults, from the chart, apply)."""

    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None
    image_pull_secrets: tuple[ImagePullSecret, ...] | None = Field(
        None, alias="imagePullSecrets")
    node_selector: dict[str, str] | None = Field(None, alias="nodeSelector")
    tolerations: tuple[Toleration, ...] | None = None
    affinity: dict[str, Any] | None = None
    topology_spread_constraints: tuple[dict[str, Any], ...] | None = Field(
        None, alias="topologySpreadConstraints")
    priority_class_name: str | None = Field(
        None, alias="priorityClassName", max_length=253, pattern=DNS_SUBDOMAIN_PATTERN)

    @model_validator(mode="after")
    def _valid_metadata(self) -> RelayPodSpec:
        _check_keys("pod.labels", self.labels)
        _check_label_values("pod.labels", self.labels)
        _check_keys("pod.annotations", self.annotations)
        _check_keys("pod.nodeSelector", self.node_selector)
        _check_label_values("pod.nodeSelector", self.node_selector)
        reserved = sorted(set(self.labels or {}) & set(RESERVED_POD_LABELS))
        if reserved:
            raise ValueError(f"pod.labels may not set {', '.join(reserved)}: the operator sets "
                             "them (the StatefulSet selects its pods by them)")
        return self


class RelayServiceSpec(_Spec):
    """The Service applications connect to (``<relay>``). ``None``: the operator's default."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] | None = None
    annotations: dict[str, str] | None = None

    @model_validator(mode="after")
    def _valid_annotations(self) -> RelayServiceSpec:
        _check_keys("service.annotations", self.annotations)
        return self


class RelayDefaults(_Spec):
    """What relays get where their SmtpRelay spec sets nothing: the operator's
    ``--relay-defaults`` (the chart's ``relay.pod`` and ``relay.service`` values)."""

    pod: RelayPodSpec = RelayPodSpec()
    service: RelayServiceSpec = RelayServiceSpec()


def parse_relay_defaults(text: str) -> RelayDefaults:
    """``--relay-defaults`` JSON; SpecError naming the field on bad input."""
    try:
        return RelayDefaults.model_validate_json(text)
    except ValidationError as exc:
        problems = []
        for e in exc.errors():
            loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
            msg = e["msg"].removeprefix("Value error, ")
            problems.append(f"{loc}: {msg}" if loc else msg)
        raise SpecError("--relay-defaults: " + "; ".join(problems)) from None


def _monitoring_namespace() -> LabelSelector:
    return LabelSelector(match_labels={"kubernetes.io/metadata.name": "monitoring"})


class AutoscalingSpec(_Spec):
    """Opt-in HorizontalPodAutoscaler on a relay queue metric (served to the HPA through the
    Prometheus adapter). Scale-down (on unless `scaleDown: false`) is safe: the operator drains
    a removed pod's queue to the remaining pods before the StatefulSet shrinks."""

    enabled: bool = False
    min_replicas: int = Field(1, alias="minReplicas", ge=1, le=100)
    max_replicas: int = Field(4, alias="maxReplicas", ge=1, le=100)
    metric: Literal["queueMessages", "oldestMessageAge"] = "queueMessages"
    target: int = Field(100, ge=1, le=10_000_000)
    """Average per pod: messages queued, or seconds the oldest message has waited."""
    scale_down: bool = Field(True, alias="scaleDown")

    @model_validator(mode="after")
    def _bounds(self) -> AutoscalingSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not exceed maxReplicas")
        return self



def _network_policy_cidrs(v: tuple[str, ...]) -> tuple[str, ...]:
    """CIDRs for a NetworkPolicy ``ipBlock``: the API server wants a prefix length."""
    for cidr in v:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not a CIDR such as 203.0.113.0/24 or "
                             "2001:db8::/32") from None
        if "/" not in cidr:
            raise ValueError(f"{cidr!r} needs a prefix length, e.g. {cidr}/32")
    return v

class NetworkPolicySpec(_Spec):
    """The relay's ingress NetworkPolicy: SMTP from the relay's own and the allowed namespaces,
    the metrics port from the monitoring namespaces, nothing else."""

    enabled: bool = True
    metrics_namespace_selector: LabelSelector = Field(
        default_factory=_monitoring_namespace, alias="metricsNamespaceSelector")
    smtp_from_cidrs: tuple[str, ...] = Field((), alias="smtpFromCIDRs", max_length=64)

    @field_validator("smtp_from_cidrs")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _network_policy_cidrs(v)


class StoreSecretRef(SecretKeyRef):
    key: str = Field("uri", pattern=r"^[-._a-zA-Z0-9]+$")  # CloudNativePG's app Secret


class ErasureKeyRef(SecretKeyRef):
    """The key erased complaint addresses are hashed with: ``key``, and during a rotation
    ``previousKey`` too."""

    key: str = Field("key", pattern=r"^[-._a-zA-Z0-9]+$")
    previous_key: str | None = Field(None, alias="previousKey", pattern=r"^[-._a-zA-Z0-9]+$")


class StoreSpec(_Spec):
    """The relay pool's store (docs/store.md): a SQLite file per pod, or one PostgreSQL
    database for the pool, reached with the connection string in ``secretRef``."""

    backend: Literal["sqlite", "postgresql"] = "sqlite"
    secret_ref: StoreSecretRef | None = Field(None, alias="secretRef")
    erasure_key_secret_ref: ErasureKeyRef | None = Field(None, alias="erasureKeySecretRef")

    @model_validator(mode="after")
    def _secret_needed(self) -> StoreSpec:
        if self.backend == "postgresql" and self.secret_ref is None:
            raise ValueError("store.secretRef is required when store.backend is postgresql: "
                             "name the Secret holding the connection string")
        return self


class AbuseSpec(_Spec):
    """Pausing credentials whose bounce or complaint rate crosses a threshold (the relay's
    ``abuse`` settings; SES-style defaults)."""

    pause_senders: bool = Field(True, alias="pauseSenders")
    bounce_rate: float = Field(0.05, alias="bounceRate", ge=0.0001, le=1.0)
    complaint_rate: float = Field(0.001, alias="complaintRate", ge=0.0001, le=1.0)
    min_recipients: int = Field(50, alias="minRecipients", ge=1, le=10_000_000)
    min_complaints: int = Field(2, alias="minComplaints", ge=1, le=10_000_000)
    window: float = Field(3600.0, ge=60, le=7 * 86400)

    _d = _durations("window")


class IntakeKeyRef(SecretKeyRef):
    key: str = Field("key", pattern=r"^[-._a-zA-Z0-9]+$")


class IntakeSpec(_Spec):
    """The bounce and complaint intake: VERP return paths on ``domain`` and an SMTP listener
    (Service ``<relay>-intake``, port 25) for the DSNs and ARF reports sent back to them."""

    enabled: bool = True
    domain: str = Field(max_length=253, pattern=DOMAIN_PATTERN_RE2)
    local_part: str = Field("bounces", alias="localPart", pattern=r"^[a-z0-9][a-z0-9.-]{0,19}$")
    key_secret_ref: IntakeKeyRef = Field(alias="keySecretRef")
    port: int = Field(25, ge=1, le=65535)
    max_message_size: int = Field(256 * 1024, alias="maxMessageSize", ge=4096,
                                  le=10 * 1024 * 1024)
    service: RelayServiceSpec = RelayServiceSpec()
    mx_host: str | None = Field(None, alias="mxHost", max_length=253,
                                pattern=DOMAIN_PATTERN_RE2)
    """The name the bounce domain's MX points to (the intake Service's external name); shown
    in the suggested DNS records. Default: the relay's hostname."""
    spf_record: str | None = Field(None, alias="spfRecord", max_length=450,
                                   pattern=r"^v=spf1( [!-~]+)*$")
    """The SPF record suggested for the bounce domain (the return path's domain is the one
    SPF checks). Default: ``v=spf1 a:<relay hostname> ~all``."""
    from_cidrs: tuple[str, ...] = Field(("0.0.0.0/0", "::/0"), alias="fromCIDRs",
                                        max_length=64)
    """Who may reach the intake port through the NetworkPolicy: the Internet by default
    (reports come from any mail server)."""

    @field_validator("from_cidrs")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _network_policy_cidrs(v)


class WebhookSecretRef(SecretKeyRef):
    """The signing secret: ``key``, and during a rotation ``previousKey`` too (both sign)."""

    key: str = Field("secret", pattern=r"^[-._a-zA-Z0-9]+$")
    previous_key: str | None = Field(None, alias="previousKey", pattern=r"^[-._a-zA-Z0-9]+$")


class CASecretRef(SecretKeyRef):
    key: str = Field("ca.crt", pattern=r"^[-._a-zA-Z0-9]+$")


def _check_cidrs(v: tuple[str, ...]) -> tuple[str, ...]:
    for cidr in v:
        try:
            ipaddress.ip_network(cidr, strict=False)
        except ValueError:
            raise ValueError(f"{cidr!r} is not a CIDR such as 10.96.0.0/12 or "
                             "fd00::/8") from None
    return v


WebhookEvent = Literal["delivered", "deferred", "bounced", "expired", "suppressed",
                       "complained"]
WEBHOOK_EVENTS: tuple[WebhookEvent, ...] = (
    "delivered", "deferred", "bounced", "expired", "suppressed", "complained")


class RelayWebhooksSpec(_Spec):
    """Delivery event webhooks (docs/webhooks.md): the platform's endpoint for every event of
    the relay, and the rules for every endpoint (the relay's and the credentials')."""

    url: str | None = Field(None, max_length=2048, pattern=r"^https://[^\s/@]+(/\S*)?$")
    secret_ref: WebhookSecretRef | None = Field(None, alias="secretRef")
    events: tuple[WebhookEvent, ...] = Field(WEBHOOK_EVENTS, min_length=1)
    ca_secret_ref: CASecretRef | None = Field(None, alias="caSecretRef")
    allow_private_networks: tuple[str, ...] = Field((), alias="allowPrivateNetworks",
                                                    max_length=64)
    credential_private_networks: tuple[str, ...] = Field(
        (), alias="credentialPrivateNetworks", max_length=64)
    timeout: float = Field(10.0, ge=0.1, le=60)
    concurrency: int = Field(8, ge=1, le=256)
    max_age: float = Field(86400.0, alias="maxAge", ge=60, le=7 * 86400)

    _d = _durations("timeout", "max_age")

    @field_validator("allow_private_networks", "credential_private_networks")
    @classmethod
    def _cidrs(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _check_cidrs(v)

    @model_validator(mode="after")
    def _secret_with_url(self) -> RelayWebhooksSpec:
        if (self.url is None) != (self.secret_ref is None):
            raise ValueError("webhooks.url and webhooks.secretRef go together: the endpoint "
                             "and the Secret holding its signing secret")
        return self


class SmtpRelaySpec(_Spec):
    replicas: int = Field(2, ge=0, le=100)
    image: str | None = None
    hostname: str | None = Field(None, max_length=253)
    listeners: ListenersSpec = ListenersSpec()
    tls: RelayTLSSpec
    delivery: DeliverySpec = DeliverySpec()
    queue: QueueSpec = QueueSpec()
    spool: SpoolSpec = SpoolSpec()
    store: StoreSpec = StoreSpec()
    limits: LimitsSpec = LimitsSpec()
    abuse: AbuseSpec = AbuseSpec()
    intake: IntakeSpec | None = None
    webhooks: RelayWebhooksSpec | None = None
    trace_client_address: bool = Field(False, alias="traceClientAddress")
    allowed_namespaces: LabelSelector | None = Field(None, alias="allowedNamespaces")
    shutdown_grace: float = Field(25.0, alias="shutdownGrace", ge=1, le=3600)
    service_account_name: str = Field(
        "default", alias="serviceAccountName", max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
    resources: dict[str, Any] | None = None
    monitoring: MonitoringSpec = MonitoringSpec()
    tenancy: TenancySpec = TenancySpec()
    network_policy: NetworkPolicySpec = Field(NetworkPolicySpec(), alias="networkPolicy")
    autoscaling: AutoscalingSpec = AutoscalingSpec()
    pod: RelayPodSpec = RelayPodSpec()
    service: RelayServiceSpec = RelayServiceSpec()

    _d = _durations("shutdown_grace")


# --------------------------------------------------------------------------------------------
# SendingDomain
# --------------------------------------------------------------------------------------------


class DKIMSpec(_Spec):
    selector: str = Field("mailplane", pattern=SELECTOR_PATTERN)
    # "rsa-2048+ed25519": dual signing (RFC 8463), an RSA and an Ed25519 signature on each
    # message, each key with its own selector and staged rotation.
    algorithm: Literal["rsa-2048", "ed25519", "rsa-2048+ed25519"] = "rsa-2048"
    rotation_interval: float | None = Field(None, alias="rotationInterval", ge=3600)
    retire_after: float = Field(7 * 86400.0, alias="retireAfter", ge=0)

    _d = _durations("rotation_interval", "retire_after")

    @property
    def primary_algorithm(self) -> str:
        """The algorithm of the key under ``selector`` (RSA for dual signing)."""
        return self.algorithm.split("+")[0]

    @property
    def second_algorithm(self) -> str | None:
        """The algorithm of the second key (under ``<selector>-ed25519``), or None."""
        parts = self.algorithm.split("+")
        return parts[1] if len(parts) > 1 else None

    @model_validator(mode="after")
    def _retire_before_next_rotation(self) -> DKIMSpec:
        if self.rotation_interval is not None and self.retire_after >= self.rotation_interval:
            raise ValueError("dkim.retireAfter must be shorter than dkim.rotationInterval")
        return self


class SPFSpec(_Spec):
    """What the suggested SPF record authorises; ``record`` replaces the suggestion."""

    include: tuple[str, ...] = ()
    ip4: tuple[str, ...] = ()
    ip6: tuple[str, ...] = ()
    record: str | None = Field(None, pattern=r"^v=spf1( .*)?$", max_length=2048)

    @model_validator(mode="after")
    def _record_alone(self) -> SPFSpec:
        if self.record is not None and (self.include or self.ip4 or self.ip6):
            raise ValueError("spf.record replaces the suggestion; do not combine it with "
                             "spf.include, spf.ip4 or spf.ip6")
        return self


class DMARCSpec(_Spec):
    policy: Literal["none", "quarantine", "reject"] = "none"
    rua: str | None = Field(None, pattern=r"^mailto:[^ ;,]+@[^ ;,]+$")


class VerificationSpec(_Spec):
    """``skip``: enable the domain without DNS checks (a lab, or DNS managed elsewhere)."""

    skip: bool = False


DNSRecordPurpose = Literal["dkim", "spf", "dmarc"]
DNS_RECORD_PURPOSES: tuple[DNSRecordPurpose, ...] = ("dkim", "spf", "dmarc")


class DNSEndpointSpec(_Spec):
    """Publishing the domain's records through an external-dns ``DNSEndpoint``.

    ``enabled`` absent: the operator's default (``--dns-endpoints``, the chart's
    ``operator.dnsEndpoints``). Takes effect only where the relay allows it
    (``spec.tenancy.dnsPublishNamespaces``; the relay's own namespace always may)."""

    enabled: bool | None = None
    records: tuple[DNSRecordPurpose, ...] = Field(
        DNS_RECORD_PURPOSES, min_length=1, max_length=3)
    """Which of the records listed in ``status.dnsRecords`` to publish."""
    ttl: int | None = Field(None, alias="recordTTL", ge=1, le=86400)
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels on the DNSEndpoint (for external-dns ``--label-filter``)."""
    split_txt: bool = Field(False, alias="splitTXT")
    """Write a TXT value longer than 255 characters as quoted 255-character strings
    (``"..." "..."``), the form providers such as Route 53 need for RSA keys."""

    @model_validator(mode="after")
    def _labels(self) -> DNSEndpointSpec:
        _check_keys("dnsEndpoint.labels", self.labels)
        _check_label_values("dnsEndpoint.labels", self.labels)
        if len(set(self.records)) != len(self.records):
            raise ValueError("dnsEndpoint.records lists a record kind twice")
        return self


class SendingDomainSpec(_Spec):
    domain: str
    relay_ref: ObjectRef = Field(alias="relayRef")
    allowed_namespaces: LabelSelector | None = Field(None, alias="allowedNamespaces")
    """Other namespaces whose SmtpCredentials may send as this domain (absent: none; ``{}``:
    every namespace the relay allows). Credentials in the domain's own namespace always may."""
    dkim: DKIMSpec = DKIMSpec()
    spf: SPFSpec = SPFSpec()
    dmarc: DMARCSpec = DMARCSpec()
    verification: VerificationSpec = VerificationSpec()
    dns_endpoint: DNSEndpointSpec = Field(DNSEndpointSpec(), alias="dnsEndpoint")

    @field_validator("domain", mode="before")
    @classmethod
    def _domain(cls, v: object) -> object:
        if isinstance(v, str) and not _DOMAIN_RE.match(v):
            raise ValueError(f"{v!r} is not a domain name in lower case such as 'example.com'")
        return v


# --------------------------------------------------------------------------------------------
# SmtpCredential
# --------------------------------------------------------------------------------------------


class RotationSpec(_Spec):
    """Scheduled rotation every ``interval`` (none: only on demand); the previous password keeps
    working for ``overlap`` after each rotation."""

    interval: float | None = Field(None, ge=3600)
    overlap: float = Field(3600.0, ge=0)

    _d = _durations("interval", "overlap")

    @model_validator(mode="after")
    def _overlap_shorter(self) -> RotationSpec:
        if self.interval is not None and self.overlap >= self.interval:
            raise ValueError("overlap must be shorter than interval, or the previous password "
                             "would never expire before the next rotation")
        return self


class CredentialWebhookSpec(_Spec):
    """Delivery events of this credential's mail only (docs/webhooks.md). The signing Secret
    is read in the credential's own namespace: a reference names no namespace."""

    # https only, no user:password@ (posts are authenticated by their signature).
    url: str = Field(max_length=2048, pattern=r"^https://[^\s/@?#]+(/[^\s#]*)?$")
    secret_ref: WebhookSecretRef = Field(alias="secretRef")
    events: tuple[WebhookEvent, ...] = Field(WEBHOOK_EVENTS, min_length=1)


class SmtpCredentialSpec(_Spec):
    relay_ref: ObjectRef = Field(alias="relayRef")
    allowed_senders: tuple[str, ...] = Field(alias="allowedSenders", min_length=1, max_length=100)
    rate_per_minute: int | None = Field(None, alias="ratePerMinute", ge=1)
    daily_quota: int | None = Field(None, alias="dailyQuota", ge=1)
    suspended: bool = False
    suspended_reason: str | None = Field(None, alias="suspendedReason", max_length=200,
                                         pattern=NO_CONTROL_PATTERN)
    secret_name: str | None = Field(None, alias="secretName", pattern=DNS_SUBDOMAIN_PATTERN,
                                    max_length=253)
    rotation: RotationSpec = RotationSpec()
    webhook: CredentialWebhookSpec | None = None

    @field_validator("allowed_senders")
    @classmethod
    def _senders(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        out = []
        for item in v:
            s = item.strip().lower()
            if not _SENDER_RE.match(s):
                raise ValueError(f"{item!r} is neither a domain ('example.com') nor an address "
                                 "('noreply@example.com')")
            out.append(s)
        return tuple(out)

    @model_validator(mode="after")
    def _reason_needs_suspension(self) -> SmtpCredentialSpec:
        if self.suspended_reason is not None and not self.suspended:
            raise ValueError("suspendedReason is set but suspended is false")
        return self


# --------------------------------------------------------------------------------------------
# RetentionPolicy
# --------------------------------------------------------------------------------------------


class RetentionPolicySpec(_Spec):
    relay_selector: LabelSelector = Field(LabelSelector(), alias="relaySelector")
    # At most 90 days: the privacy policy's promise, and what the relay configuration accepts.
    message_log: float = Field(90 * 86400.0, alias="messageLog", ge=3600, le=90 * 86400.0)
    # At most 365 days: the ceiling docs/store.md promises, and what the relay accepts.
    suppression: float = Field(365 * 86400.0, ge=3600, le=365 * 86400.0)
    purge_interval: float = Field(3600.0, alias="purgeInterval", ge=60, le=86400)

    _d = _durations("message_log", "suppression", "purge_interval")

    @model_validator(mode="after")
    def _purge_often_enough(self) -> RetentionPolicySpec:
        if self.purge_interval > self.message_log:
            raise ValueError("purgeInterval must not be longer than messageLog")
        return self


# --------------------------------------------------------------------------------------------
# Parsed resources
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Meta:
    name: str
    namespace: str
    uid: str
    generation: int
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    deletion_timestamp: str | None = None
    creation_timestamp: datetime | None = None
    """Set by the API server; decides which of two claims on one domain came first."""

    @property
    def key(self) -> str:
        """``namespace/name``, for humans and for status lists."""
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True)
class SmtpRelay:
    meta: Meta
    spec: SmtpRelaySpec
    status: Mapping[str, Any] = field(default_factory=dict)
    kind = "SmtpRelay"


@dataclass(frozen=True)
class SendingDomain:
    meta: Meta
    spec: SendingDomainSpec
    status: Mapping[str, Any] = field(default_factory=dict)
    kind = "SendingDomain"

    @property
    def relay_namespace(self) -> str:
        return self.spec.relay_ref.namespace or self.meta.namespace


@dataclass(frozen=True)
class SmtpCredential:
    meta: Meta
    spec: SmtpCredentialSpec
    status: Mapping[str, Any] = field(default_factory=dict)
    kind = "SmtpCredential"

    @property
    def relay_namespace(self) -> str:
        return self.spec.relay_ref.namespace or self.meta.namespace

    @property
    def secret_name(self) -> str:
        return self.spec.secret_name or f"{self.meta.name}-smtp"


@dataclass(frozen=True)
class RetentionPolicy:
    meta: Meta
    spec: RetentionPolicySpec
    status: Mapping[str, Any] = field(default_factory=dict)
    kind = "RetentionPolicy"


def _format_errors(kind: str, name: str, err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith("function-"))
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"spec.{loc}: {msg}" if loc else f"spec: {msg}")
    return f"{kind} {name}: " + "; ".join(lines)


def parse_meta(body: Mapping[str, Any]) -> Meta:
    md = body.get("metadata") or {}
    name = md.get("name")
    if not name:
        raise SpecError("metadata.name is missing")
    return Meta(
        name=str(name),
        namespace=str(md.get("namespace") or "default"),
        uid=str(md.get("uid") or ""),
        generation=int(md.get("generation") or 0),
        labels=dict(md.get("labels") or {}),
        annotations=dict(md.get("annotations") or {}),
        deletion_timestamp=md.get("deletionTimestamp") or None,
        creation_timestamp=parse_time(md.get("creationTimestamp")),
    )


RELAY_NAME_MAX = 52
"""A relay's name is the name of its Services (``<name>-headless``, ``<name>-metrics``), its
StatefulSet and pods; the StatefulSet controller labels each pod with ``<name>-<10-char hash>``
(controller-revision-hash), which must stay a valid label value (63)."""
_RELAY_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE_MAX = 63


def check_name(kind: str, meta: Meta) -> None:
    """Refuse a name that would make an invalid child, with the message the CRD's CEL rule
    gives (the operator does not trust the installed CRD to be current)."""
    name = meta.name
    if kind == "SmtpRelay":
        if len(name) > RELAY_NAME_MAX or not _RELAY_NAME_RE.match(name):
            raise SpecError(
                f"{kind} {meta.key}: metadata.name: an SmtpRelay's name is the name of its "
                f"Services and pods, so it must be a DNS label of at most {RELAY_NAME_MAX} "
                "characters: lowercase letters, digits and '-', starting with a letter and "
                "ending with a letter or digit (mail-v2, not mail.v2)")
        if name.endswith(("-headless", "-metrics")):
            raise SpecError(
                f"{kind} {meta.key}: metadata.name: an SmtpRelay's name may not end in "
                "-headless or -metrics: relay <name> already has Services <name>-headless and "
                "<name>-metrics, which the two relays would fight over")
    elif kind in ("SmtpCredential", "SendingDomain") and len(name) > LABEL_VALUE_MAX:
        raise SpecError(
            f"{kind} {meta.key}: metadata.name: a {kind}'s name is a label value on the "
            f"objects the operator makes for it: at most {LABEL_VALUE_MAX} characters")


def _parse_spec(model: type[_S], kind: str, body: Mapping[str, Any]) -> tuple[Meta, _S]:
    meta = parse_meta(body)
    check_name(kind, meta)
    spec = body.get("spec")
    if not isinstance(spec, Mapping):
        raise SpecError(f"{kind} {meta.key}: spec is missing or not a mapping")
    try:
        return meta, model.model_validate(dict(spec))
    except ValidationError as exc:
        raise SpecError(_format_errors(kind, meta.key, exc)) from None


def parse_smtp_relay(body: Mapping[str, Any]) -> SmtpRelay:
    meta, spec = _parse_spec(SmtpRelaySpec, "SmtpRelay", body)
    return SmtpRelay(meta, spec, dict(body.get("status") or {}))


def parse_sending_domain(body: Mapping[str, Any]) -> SendingDomain:
    meta, spec = _parse_spec(SendingDomainSpec, "SendingDomain", body)
    return SendingDomain(meta, spec, dict(body.get("status") or {}))


def parse_smtp_credential(body: Mapping[str, Any]) -> SmtpCredential:
    meta, spec = _parse_spec(SmtpCredentialSpec, "SmtpCredential", body)
    return SmtpCredential(meta, spec, dict(body.get("status") or {}))


def parse_retention_policy(body: Mapping[str, Any]) -> RetentionPolicy:
    meta, spec = _parse_spec(RetentionPolicySpec, "RetentionPolicy", body)
    return RetentionPolicy(meta, spec, dict(body.get("status") or {}))


PARSERS = {
    "SmtpRelay": parse_smtp_relay,
    "SendingDomain": parse_sending_domain,
    "SmtpCredential": parse_smtp_credential,
    "RetentionPolicy": parse_retention_policy,
}


def owner_reference(kind: str, meta: Meta) -> dict[str, Any]:
    """The ownerReference that makes a child go away with its custom resource."""
    return {
        "apiVersion": API_VERSION,
        "kind": kind,
        "name": meta.name,
        "uid": meta.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }
