"""The relay configuration of one SmtpRelay, rendered from its resources.

``render_relay_config`` turns an SmtpRelay, the SendingDomains and SmtpCredentials that reference
it (with their Secrets) and the RetentionPolicies of its namespace into the documents of the
contract in ``mailplane_relay.config``: one ``RelayConfig`` (settings) and as many
``RelayDomains``/``RelayCredentials`` chunks as needed, packed into Secrets
``<relay>-config-<n>`` whose serialized manifests each stay under ``MAX_SECRET_BYTES`` (well
under the 1 MiB limit of a Secret). The result is checked with the relay's own models (or, with
``validate="documents"``, parsed from the YAML files by ``mailplane_relay.config.parse_documents``
exactly as the relay will) before it is returned: a render the relay would reject raises
``RenderError`` instead of reaching the cluster.

A domain is included when it references this relay, its namespace is allowed, it is verified
(or ``spec.verification.skip`` where the relay allows skipping), it owns its domain on this relay
(``ownership``: the earliest verified claim) and its DKIM key exists. A credential is included
when it references this relay, its namespace is allowed, its Secret name is its own, every
allowed sender's domain is included and granted to the credential's namespace by its owner, and
the operator's state Secret holds its password's hash. Everything left out is listed in
``RenderResult.excluded`` with the reason (the same reasons as the resources' Ready
conditions). Output is deterministic: same inputs, same files, same hash.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

import yaml
from pydantic import ValidationError

from mailplane_relay.config import (
    API_VERSION,
    KIND_CONFIG,
    KIND_CREDENTIALS,
    KIND_DOMAINS,
    ConfigError,
    Credential,
    Domain,
    RelayConfig,
    RelaySettings,
    format_validation_error,
    parse_documents,
    part_digest,
    render_document,
)

from . import credential as cred_mod
from . import credential_state as cs_mod
from . import domain as domain_mod
from . import ownership
from . import relay as relay_mod
from .models import (
    RetentionPolicy,
    SendingDomain,
    SmtpCredential,
    SmtpRelay,
    owner_reference,
)
from .retention import Retention, retention_for_relay

MAX_SECRET_BYTES = 900 * 1024
"""Upper bound of one config Secret's JSON manifest (base64 data included)."""
_SECRET_OVERHEAD = 4096

REASON_DKIM_KEY_PENDING = "DKIMKeyPending"
REASON_DKIM_SECRET_UNREADABLE = "DKIMSecretUnreadable"  # noqa: S105 - a condition reason
REASON_SECRET_PENDING = "SecretPending"  # noqa: S105 - a condition reason
REASON_DELETING = "Deleting"
REASON_INVALID_ENTRY = "InvalidConfigEntry"
REASON_DUPLICATE_USERNAME = "DuplicateUsername"
REASON_CONFIG_FULL = "RelayConfigFull"
RENDER_REASONS = frozenset({REASON_INVALID_ENTRY, REASON_DUPLICATE_USERNAME, REASON_CONFIG_FULL})
"""Exclusions decided by the render itself (the entry would break the relay's configuration),
not by the resource's own reconcile: the render reports them (Events, the relay's status)."""
MAX_ENTRY_BYTES = 64 * 1024
"""Largest configuration entry of one domain or credential (a DKIM key is a few KiB): one
resource must not be able to fill the relay's configuration Secrets."""
REASON_OTHER_RELAY = "OtherRelay"


class RenderError(Exception):
    """The rendered configuration is not valid or does not fit; the message says why."""


class _TooManySecrets(RenderError):
    """The configuration needs more Secrets than the relay pods mount."""


@dataclass(frozen=True)
class RuntimePaths:
    """Where the relay finds things. The defaults are the pod's layout (see ``relay.py``);
    ``mailplane dev`` passes local paths and ports."""

    tls_cert: str = f"{relay_mod.TLS_DIR}/tls.crt"
    tls_key: str = f"{relay_mod.TLS_DIR}/tls.key"
    tls_ca: str = f"{relay_mod.TLS_CA_DIR}/ca.crt"
    spool: str = f"{relay_mod.DATA_DIR}/spool"
    message_log: str = f"{relay_mod.DATA_DIR}/messagelog.sqlite3"
    smarthost_password: str = f"{relay_mod.SMARTHOST_DIR}/password"
    store_dsn: str = f"{relay_mod.STORE_DIR}/dsn"
    intake_key: str = f"{relay_mod.INTAKE_DIR}/key"
    webhook_dir: str = relay_mod.WEBHOOK_DIR
    erasure_key_dir: str = relay_mod.ERASURE_KEY_DIR
    webhook_ca: str = f"{relay_mod.WEBHOOK_CA_DIR}/ca.crt"
    intake_port: int = relay_mod.INTAKE_CONTAINER_PORT
    listen_address: str = "0.0.0.0"
    submission_port: int = relay_mod.SUBMISSION_CONTAINER_PORT
    submissions_port: int = relay_mod.SUBMISSIONS_CONTAINER_PORT
    http_address: str = "0.0.0.0"
    http_port: int = relay_mod.HTTP_PORT
    admin_port: int = relay_mod.ADMIN_PORT
    hostname: str | None = None
    admin_token_sha256: str | None = None
    """SHA-256 of the token the operator presents to the pods' /admin endpoints (drain)."""
    extra_settings: Mapping[str, Any] = field(default_factory=dict)
    """Merged over the rendered settings (top-level keys), e.g. ``{"spool": {"fsync": False}}``."""


@dataclass(frozen=True)
class DomainInput:
    domain: SendingDomain
    dkim_secret: Mapping[str, Any] | None


@dataclass(frozen=True)
class CredentialInput:
    credential: SmtpCredential
    secret: Mapping[str, Any] | None
    """The application Secret: only its ownership is looked at (and, before the state Secret
    exists, the bounded state an earlier version kept in its annotations)."""
    state: Mapping[str, Any] | None = None
    """The operator's state Secret in the relay's namespace (``credential_state``)."""
    webhook_secret: Mapping[str, Any] | None = None
    """The Secret ``spec.webhook.secretRef`` names, in the credential's own namespace."""


@dataclass(frozen=True)
class Exclusion:
    kind: str
    key: str
    """``namespace/name`` of the resource left out."""
    reason: str
    message: str


@dataclass(frozen=True)
class RenderResult:
    secrets: list[dict[str, Any]]
    """Config Secret manifests ``<relay>-config-0..n-1``, in order. The caller deletes other
    Secrets labelled ``mailplane.io/relay=<relay>, mailplane.io/component=config``."""
    files: dict[str, str]
    """File name -> YAML text: exactly what the relay reads from its config directory."""
    config_hash: str
    render_id: str
    """Identifies the render (``metadata.render`` of relay.yaml; reported by the pods)."""
    domains: tuple[str, ...]
    owners: Mapping[str, ownership.DomainOwner]
    """Each rendered domain's owning SendingDomain and its grants (for credential admission)."""
    credentials: tuple[str, ...]
    """``namespace/name`` of each rendered SmtpCredential."""
    excluded: tuple[Exclusion, ...]
    retention: Retention
    config: RelayConfig = field(repr=False)
    copies_to_rewrite: tuple[str, ...] = ()
    """``namespace/name`` of rendered SmtpCredentials whose application Secret is missing or no
    longer holds the password issued: their own reconcile writes it again."""

    @property
    def secret_names(self) -> list[str]:
        return [s["metadata"]["name"] for s in self.secrets]

    def exclusion(self, kind: str, key: str) -> Exclusion | None:
        return next((e for e in self.excluded if e.kind == kind and e.key == key), None)


def refers_to(obj: SendingDomain | SmtpCredential, relay: SmtpRelay) -> bool:
    """Whether a domain or credential names this relay in its relayRef."""
    return (obj.spec.relay_ref.name == relay.meta.name
            and obj.relay_namespace == relay.meta.namespace)


def attached_domains(
    relay: SmtpRelay,
    domains: Sequence[DomainInput],
    namespace_labels: Mapping[str, Mapping[str, str]],
) -> tuple[dict[str, tuple[SendingDomain, domain_mod.DomainSigning]], list[Exclusion]]:
    """Domains the relay sends for (name -> (owning claim, signing key)) and those left out.

    Of several claims on one domain only the owner (``ownership.elect_owners``: the earliest
    verified claim) is considered; the others are left out with ``DomainConflict``, whatever
    state the owner's key is in, so that a later claim never replaces the owner's key.
    """
    included: dict[str, tuple[SendingDomain, domain_mod.DomainSigning]] = {}
    excluded: list[Exclusion] = []
    candidates: list[DomainInput] = []
    for item in sorted(domains, key=lambda d: d.domain.meta.key):
        dom = item.domain

        def out(reason: str, message: str, dom: SendingDomain = dom) -> None:
            excluded.append(Exclusion("SendingDomain", dom.meta.key, reason, message))

        if not refers_to(dom, relay):
            continue
        if dom.meta.deletion_timestamp:
            out(REASON_DELETING, "being deleted")
            continue
        labels = namespace_labels.get(dom.meta.namespace)
        if not cred_mod.namespace_allowed(relay, dom.meta.namespace, labels):
            out(domain_mod.REASON_NAMESPACE_NOT_ALLOWED,
                f"SmtpRelay {relay.meta.key} does not allow namespace {dom.meta.namespace!r}")
            continue
        if dom.spec.verification.skip and not ownership.skip_allowed(
                relay, dom.meta.namespace, labels):
            out(ownership.REASON_SKIP_NOT_ALLOWED, ownership.skip_refusal(relay, dom))
            continue
        if not ownership.claim_verified(dom, relay, labels):
            out(domain_mod.unverified_reason(dom), f"domain {dom.spec.domain} is not verified")
            continue
        candidates.append(item)
    owners = ownership.elect_owners(relay, (c.domain for c in candidates), lambda _c: True)
    for item in candidates:
        dom = item.domain
        owner = owners[dom.spec.domain]
        if owner is not dom:
            excluded.append(Exclusion("SendingDomain", dom.meta.key,
                                      ownership.REASON_DOMAIN_CONFLICT,
                                      ownership.conflict_message(dom, owner, relay)))
            continue
        try:
            domain_mod.state_from_secret(item.dkim_secret)
        except domain_mod.DKIMSecretUnreadable as exc:
            # The Secret is in the domain's namespace, writable by its tenant: only this
            # domain is left out, with the reason its own status shows too.
            excluded.append(Exclusion("SendingDomain", dom.meta.key,
                                      REASON_DKIM_SECRET_UNREADABLE, str(exc)))
            continue
        try:
            signing = domain_mod.signing_from_secret(item.dkim_secret)
        except Exception as exc:  # tenant-written data: isolate it, never fail every entry
            excluded.append(Exclusion(
                "SendingDomain", dom.meta.key, REASON_INVALID_ENTRY,
                f"the DKIM Secret {domain_mod.secret_name(dom)} cannot be read "
                f"({type(exc).__name__}); restore it or delete it to generate a new key"))
            continue
        if signing is None:
            excluded.append(Exclusion("SendingDomain", dom.meta.key, REASON_DKIM_KEY_PENDING,
                                      f"no DKIM key for {dom.spec.domain} yet"))
            continue
        included[dom.spec.domain] = (dom, signing)
    return included, excluded


def owners_of(
    included: Mapping[str, tuple[SendingDomain, domain_mod.DomainSigning]],
) -> dict[str, ownership.DomainOwner]:
    """What credential admission needs of ``attached_domains``' result: each owner's grants."""
    return {name: ownership.DomainOwner.of(dom) for name, (dom, _s) in included.items()}


def settings_spec(relay: SmtpRelay, retention: Retention, paths: RuntimePaths) -> dict[str, Any]:
    """The ``RelayConfig`` spec: settings only (domains and credentials go in chunks)."""
    spec = relay.spec
    listeners = []
    if spec.listeners.submission.enabled:
        listeners.append({"name": "submission", "address": paths.listen_address,
                          "port": paths.submission_port, "tls": "starttls"})
    if spec.listeners.submissions.enabled:
        listeners.append({"name": "submissions", "address": paths.listen_address,
                          "port": paths.submissions_port, "tls": "implicit"})
    delivery: dict[str, Any] = {"mode": spec.delivery.mode}
    if spec.delivery.smarthost is not None:
        sh = spec.delivery.smarthost
        delivery["smarthost"] = {"host": sh.host, "port": sh.port, "tls": sh.tls}
        if sh.username is not None:
            delivery["smarthost"].update(username=sh.username,
                                         passwordFile=paths.smarthost_password)
        if sh.allow_plaintext_auth:
            delivery["smarthost"]["allowPlaintextAuth"] = True
    mx_tls = spec.delivery.mx_tls
    if mx_tls.level is not None or mx_tls.policies:
        delivery["mxTls"] = {"policies": [{"domains": list(p.domains), "level": p.level}
                                          for p in mx_tls.policies]}
        if mx_tls.level is not None:
            delivery["mxTls"]["level"] = mx_tls.level
    if not spec.delivery.mta_sts.enabled:
        delivery["mtaSts"] = {"enabled": False}
    if spec.delivery.helo_name:
        delivery["heloName"] = spec.delivery.helo_name
    limits: dict[str, Any] = {"maxMessageSize": spec.limits.max_message_size,
                              "maxRecipients": spec.limits.max_recipients}
    if spec.limits.default_rate_per_minute is not None:
        limits["defaultRatePerMinute"] = spec.limits.default_rate_per_minute
    if spec.limits.default_daily_quota is not None:
        limits["defaultDailyQuota"] = spec.limits.default_daily_quota
    if spec.limits.max_sessions_per_address is not None:
        limits["maxSessionsPerAddress"] = spec.limits.max_sessions_per_address
    if spec.limits.bare_newline is not None:
        limits["bareNewline"] = spec.limits.bare_newline
    settings: dict[str, Any] = {
        "hostname": paths.hostname or spec.hostname
        or f"{relay.meta.name}.{relay.meta.namespace}.svc",
        "listeners": listeners,
        "tls": {"certFile": paths.tls_cert, "keyFile": paths.tls_key,
                "minVersion": spec.tls.min_version},
        "http": {"address": paths.http_address, "port": paths.http_port},
        "spool": {"directory": paths.spool},
        "delivery": delivery,
        "queue": {"retryInitial": spec.queue.retry_initial, "retryMax": spec.queue.retry_max,
                  "maxLifetime": spec.queue.max_lifetime,
                  "delayWarning": spec.queue.delay_warning},
        "limits": limits,
        "retention": retention.to_config(),
        "messageLog": {"path": paths.message_log},
        "shutdownGrace": spec.shutdown_grace,
    }
    abuse = spec.abuse
    settings["abuse"] = {"pauseSenders": abuse.pause_senders, "bounceRate": abuse.bounce_rate,
                         "complaintRate": abuse.complaint_rate,
                         "minRecipients": abuse.min_recipients,
                         "minComplaints": abuse.min_complaints, "window": abuse.window}
    intake = spec.intake
    if intake is not None and intake.enabled:
        # The key stays in its Secret, mounted as a file (relay.py).
        settings["intake"] = {"domain": intake.domain, "localPart": intake.local_part,
                              "keyFile": paths.intake_key, "address": paths.listen_address,
                              "port": paths.intake_port,
                              "maxMessageSize": intake.max_message_size}
    if spec.store.backend == "postgresql":
        # The connection string stays in its Secret, mounted as a file (relay.py): it is never
        # part of the rendered configuration, a log line or a status.
        settings["store"] = {"backend": "postgresql", "dsnFile": paths.store_dsn}
    erasure_ref = spec.store.erasure_key_secret_ref
    if erasure_ref is not None:
        files = [f"{paths.erasure_key_dir}/key"]
        if erasure_ref.previous_key:
            files.append(f"{paths.erasure_key_dir}/previous")
        settings.setdefault("store", {})["erasureKeyFiles"] = files
    if spec.trace_client_address:
        settings["traceClientAddress"] = True
    hooks = spec.webhooks
    if hooks is not None:
        webhooks: dict[str, Any] = {
            "allowPrivateNetworks": list(hooks.allow_private_networks),
            "credentialPrivateNetworks": list(hooks.credential_private_networks),
            "timeout": hooks.timeout, "concurrency": hooks.concurrency,
            "maxAge": hooks.max_age}
        if hooks.url is not None and hooks.secret_ref is not None:
            # The signing secrets stay in their Secret, mounted as files (relay.py).
            files = [f"{paths.webhook_dir}/secret"]
            if hooks.secret_ref.previous_key:
                files.append(f"{paths.webhook_dir}/previous")
            webhooks["endpoint"] = {"url": hooks.url, "secretFiles": files,
                                    "events": list(hooks.events)}
        if hooks.ca_secret_ref is not None:
            webhooks["caFile"] = paths.webhook_ca
        settings["webhooks"] = webhooks
    if paths.admin_token_sha256:
        settings["admin"] = {"tokenSHA256": paths.admin_token_sha256, "port": paths.admin_port,
                             "caFile": paths.tls_ca,
                             "serverName": relay_mod.admin_server_name(relay)}
    for key, value in paths.extra_settings.items():
        if isinstance(value, Mapping) and isinstance(settings.get(key), dict):
            settings[key] = {**settings[key], **value}
        else:
            settings[key] = value
    return settings


def _domain_entry(name: str, signing: domain_mod.DomainSigning) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "dkim": {"selector": signing.selector,
                                                    "algorithm": signing.algorithm,
                                                    "privateKey": signing.pem}}
    if signing.also is not None:
        entry["additionalDkim"] = [{"selector": signing.also.selector,
                                    "algorithm": signing.also.algorithm,
                                    "privateKey": signing.also.pem}]
    return entry


def _pack(entries: list[tuple[str, dict[str, Any]]], first_used: int,
          budget: int) -> list[list[tuple[str, dict[str, Any]]]]:
    """Greedy packing of (kind, entry) into Secrets of about ``budget`` raw bytes (estimated
    from the JSON size; ``_fit`` corrects the rare overshoot); the first Secret already holds
    ``first_used`` bytes (the settings document)."""
    bins: list[list[tuple[str, dict[str, Any]]]] = [[]]
    used = first_used
    for kind, entry in entries:
        size = _entry_size(entry)
        if used + size > budget and bins[-1]:
            bins.append([])
            used = 0
        bins[-1].append((kind, entry))
        used += size
    return bins


def _entry_size(entry: Mapping[str, Any]) -> int:
    """The estimated YAML size of one entry. YAML folds a long quoted PEM over indented lines: a
    few bytes more per line than JSON."""
    text = json.dumps(entry)
    return len(text) + 16 + 8 * text.count("\\n")


def _fair_share(relay: SmtpRelay, credentials: Sequence[tuple[str, Mapping[str, Any]]],
                room: int) -> tuple[set[str], dict[str, int]]:
    """The keys of the credentials (``namespace/name``, entry) that fit in ``room`` bytes, and
    each namespace's bytes. The relay's own namespace first; then each namespace's credentials
    in turn by the room its namespace has taken so far, so a namespace that takes more than its
    share loses its own entries and nobody else's."""
    used: dict[str, int] = {}
    ranked: list[tuple[int, int, str, int]] = []
    for key, entry in credentials:
        namespace = key.partition("/")[0]
        size = _entry_size(entry)
        used[namespace] = used.get(namespace, 0) + size
        ranked.append((0 if namespace == relay.meta.namespace else 1, used[namespace], key,
                       size))
    kept: set[str] = set()
    total = 0
    for _platform, _used, key, size in sorted(ranked):
        if total + size > room:
            break
        kept.add(key)
        total += size
    return kept, used


_Dumper: Any = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _document(kind: str, spec: Mapping[str, Any], name: str | None = None,
              parts: Mapping[str, str] | None = None, render: str | None = None) -> str:
    """``mailplane_relay.config.render_document``, byte for byte, through libyaml's emitter when
    present (6x faster on thousands of credentials; a test checks both agree)."""
    if _Dumper is yaml.SafeDumper:
        return render_document(kind, spec, name, parts, render)
    doc: dict[str, Any] = {"apiVersion": API_VERSION, "kind": kind}
    if name or parts or render:
        doc["metadata"] = {**({"name": name} if name else {}),
                           **({"render": render} if render else {}),
                           **({"parts": dict(sorted(parts.items()))} if parts else {})}
    doc["spec"] = json.loads(json.dumps(spec, default=str))
    text: str = yaml.dump(doc, Dumper=_Dumper, sort_keys=False)
    return text


def _secret_json_size(manifest: Mapping[str, Any]) -> int:
    return len(json.dumps(manifest, separators=(",", ":")))


def config_secret(relay: SmtpRelay, index: int, files: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": relay_mod.config_secret_name(relay.meta.name, index),
            "namespace": relay.meta.namespace,
            "labels": {**relay_mod.child_labels(relay), relay_mod.LABEL_COMPONENT: "config"},
            "ownerReferences": [owner_reference("SmtpRelay", relay.meta)],
        },
        "data": {name: base64.b64encode(text.encode()).decode()
                 for name, text in sorted(files.items())},
    }


def _files(items: list[tuple[str, dict[str, Any]]], index: int,
           settings_text: str) -> dict[str, str]:
    files: dict[str, str] = {"relay.yaml": settings_text} if index == 0 else {}
    for kind, list_key in ((KIND_DOMAINS, "domains"), (KIND_CREDENTIALS, "credentials")):
        chunk = [e for k, e in items if k == kind]
        if chunk:
            files[f"{list_key}-{index:02d}.yaml"] = _document(kind, {list_key: chunk})
    return files


def _fit(relay: SmtpRelay, bins: list[list[tuple[str, dict[str, Any]]]], settings_text: str,
         max_secret_bytes: int) -> list[dict[str, str]]:
    """Render each bin; a Secret over the limit is split in two, in place, until all fit."""
    out: list[dict[str, str]] = []
    pending = list(bins)
    while pending:
        items = pending.pop(0)
        files = _files(items, len(out), settings_text)
        size = _secret_json_size(config_secret(relay, len(out), files))
        if size > max_secret_bytes:
            if len(items) <= 1:
                raise RenderError(
                    f"SmtpRelay {relay.meta.key}: one configuration entry needs {size} bytes, "
                    f"over the {max_secret_bytes}-byte Secret limit")
            half = len(items) // 2
            pending[:0] = [items[:half], items[half:]]
            continue
        out.append(files)
    if len(out) > relay_mod.CONFIG_SECRET_SLOTS:
        raise _TooManySecrets(
            f"SmtpRelay {relay.meta.key}: the configuration needs {len(out)} Secrets, more "
            f"than the {relay_mod.CONFIG_SECRET_SLOTS} the relay pods mount; split the "
            "credentials over more relays")
    return out


def _validate_models(settings: Mapping[str, Any], domains: list[tuple[str, dict[str, Any]]],
                     credentials: list[tuple[str, dict[str, Any]]],
                     config_hash: str) -> RelayConfig:
    """What ``parse_documents`` checks once the YAML is loaded, without loading YAML: the
    relay's own models on the same data, and unique names."""
    doc = json.loads(json.dumps({**settings, "domains": [e for _k, e in domains],
                                 "credentials": [e for _k, e in credentials]}, default=str))
    try:
        parsed = RelaySettings.model_validate(doc)
    except ValidationError as exc:
        # Never str(exc): pydantic quotes the input value, and these documents hold private keys
        # and password hashes; this message reaches Events, status and the log.
        raise ConfigError(format_validation_error("relay configuration", exc)) from None
    names = [c.username for c in parsed.credentials]
    if len(set(names)) != len(names):
        raise ConfigError("two credentials render to the same username")
    return RelayConfig(settings=parsed, source_hash=config_hash)


def entry_problem(model: type[Domain] | type[Credential], entry: Mapping[str, Any]) -> str | None:
    """Why the relay would refuse this one entry (naming fields, never values), or None."""
    size = len(json.dumps(entry, default=str))
    if size > MAX_ENTRY_BYTES:
        return f"its configuration entry needs {size} bytes, over the {MAX_ENTRY_BYTES}-byte limit"
    try:
        model.model_validate(json.loads(json.dumps(entry, default=str)))
    except ValidationError as exc:
        return format_validation_error("the relay would refuse this entry", exc).replace(
            "\n", "; ")
    return None


def _credential_outcome(relay: SmtpRelay, item: CredentialInput,
                        owners: Mapping[str, ownership.DomainOwner],
                        namespace_labels: Mapping[str, Mapping[str, str]],
                        now: datetime) -> dict[str, Any] | Exclusion:
    """One credential's configuration entry, or why it is left out."""
    cred = item.credential
    key = cred.meta.key
    if cred.meta.deletion_timestamp:
        return Exclusion("SmtpCredential", key, REASON_DELETING, "being deleted")
    admission = cred_mod.secret_conflict(cred, item.secret) or cred_mod.check_credential(
        cred, relay, namespace_labels.get(cred.meta.namespace), owners)
    if not admission.allowed:
        return Exclusion("SmtpCredential", key, admission.reason, admission.message)
    state = cred_mod.current_state(cred, item.state, item.secret, now)
    if state is None:
        return Exclusion("SmtpCredential", key, REASON_SECRET_PENDING,
                         "no password generated yet")
    entry = cred_mod.credential_entry(cred, state, now, relay, item.webhook_secret)
    problem = entry_problem(Credential, entry)
    if problem is not None and "webhook" in entry:
        # A webhook the relay would refuse must not take the credential's mail with it.
        entry.pop("webhook")
        problem = entry_problem(Credential, entry)
    if problem is not None:
        return Exclusion("SmtpCredential", key, REASON_INVALID_ENTRY, problem)
    return entry


def render_relay_config(
    relay: SmtpRelay,
    *,
    domains: Sequence[DomainInput],
    credentials: Sequence[CredentialInput],
    policies: Sequence[RetentionPolicy],
    namespace_labels: Mapping[str, Mapping[str, str]],
    now: datetime,
    paths: RuntimePaths | None = None,
    max_secret_bytes: int = MAX_SECRET_BYTES,
    validate: Literal["models", "documents"] = "models",
) -> RenderResult:
    """Render and validate the relay configuration; see the module docstring.

    ``namespace_labels``: namespace name -> its labels, for every namespace that holds a
    referencing domain or credential (for ``spec.allowedNamespaces``). Raises ``RenderError``.

    ``validate``: ``"models"`` checks the rendered data with the relay's own models (fast);
    ``"documents"`` parses the YAML files with ``parse_documents`` exactly as the relay will
    (thorough, but pure-Python YAML: about 1 s per 1,000 credentials on these machines).
    """
    paths = paths or RuntimePaths()
    retention = retention_for_relay(relay, policies)
    included, excluded = attached_domains(relay, domains, namespace_labels)
    # Each entry is checked on its own with the relay's models: one that the relay would refuse
    # is left out alone, and the rest of the configuration still reaches the relay.
    entries: list[tuple[str, dict[str, Any]]] = []
    for name, (dom, signing) in sorted(included.items()):
        domain_entry = _domain_entry(name, signing)
        problem = entry_problem(Domain, domain_entry)
        if problem is not None:
            del included[name]
            excluded.append(Exclusion("SendingDomain", dom.meta.key, REASON_INVALID_ENTRY,
                                      problem))
            continue
        entries.append((KIND_DOMAINS, domain_entry))
    owners = owners_of(included)
    cred_entries: list[tuple[str, dict[str, Any]]] = []
    rendered_creds: list[str] = []
    usernames: dict[str, str] = {}
    copies_to_rewrite: list[str] = []
    for item in sorted(credentials, key=lambda c: c.credential.meta.key):
        cred = item.credential
        if not refers_to(cred, relay):
            continue
        try:
            outcome = _credential_outcome(relay, item, owners, namespace_labels, now)
        except Exception as exc:  # tenant-written data: isolate it, never fail every entry
            outcome = Exclusion("SmtpCredential", cred.meta.key, REASON_INVALID_ENTRY,
                                f"cannot be rendered ({type(exc).__name__})")
        if isinstance(outcome, Exclusion):
            excluded.append(outcome)
            continue
        username = str(outcome["username"])
        if username in usernames:
            excluded.append(Exclusion(
                "SmtpCredential", cred.meta.key, REASON_DUPLICATE_USERNAME,
                f"username {username} is already used by SmtpCredential {usernames[username]}"))
            continue
        usernames[username] = cred.meta.key
        cred_entries.append((KIND_CREDENTIALS, outcome))
        rendered_creds.append(cred.meta.key)
        state = cred_mod.current_state(cred, item.state, item.secret, now)
        copy = cs_mod.secret_value(item.secret, "password") if item.secret else None
        if state is not None and not state.issued(copy):
            copies_to_rewrite.append(cred.meta.key)

    settings = settings_spec(relay, retention, paths)
    settings_text = _document(KIND_CONFIG, settings, name=relay.meta.name)
    budget = (max_secret_bytes - _SECRET_OVERHEAD) * 3 // 4
    # Tenants create as many credentials as they like: when they outgrow the Secrets the relay
    # mounts, the credentials of the namespaces taking the most room are left out, never the
    # whole render (which would stop every tenant's rotations and revocations).
    room = (relay_mod.CONFIG_SECRET_SLOTS * budget - len(settings_text)
            - sum(_entry_size(e) for _k, e in entries))
    candidates = list(zip(rendered_creds, cred_entries, strict=True))
    while True:
        try:
            per_secret = _fit(relay, _pack(entries + cred_entries, len(settings_text), budget),
                              settings_text, max_secret_bytes)
            break
        except _TooManySecrets:
            if not cred_entries or room <= 0:
                raise
            kept, used = _fair_share(relay, [(k, e) for k, (_kind, e) in candidates], room)
            room = room * 19 // 20  # the size is an estimate: less, if it still does not fit
            cred_entries = [ce for k, ce in candidates if k in kept]
            rendered_creds = [k for k, _ce in candidates if k in kept]
            excluded = [e for e in excluded if e.reason != REASON_CONFIG_FULL]
            for key, _ce in candidates:
                if key not in kept:
                    namespace = key.partition("/")[0]
                    excluded.append(Exclusion(
                        "SmtpCredential", key, REASON_CONFIG_FULL,
                        f"the configuration of SmtpRelay {relay.meta.key} is full (the "
                        f"{relay_mod.CONFIG_SECRET_SLOTS} Secrets its pods mount); the "
                        f"namespaces taking the most room lose entries first, and the "
                        f"credentials of namespace {namespace!r} take {used[namespace]} bytes: "
                        "fewer credentials there, or fewer or shorter spec.allowedSenders, "
                        "make room"))
    # The settings document names every other file with its digest: a relay whose volume holds
    # parts of two renders (each Secret of a projected volume is synced on its own) keeps the
    # configuration it runs until all parts are of one render.
    parts = {n: part_digest(t) for files in per_secret for n, t in files.items()
             if n != "relay.yaml"}
    # The render's id: what every pod running this render reports, whatever it changed locally.
    render_id = hashlib.sha256(json.dumps([settings, parts], sort_keys=True, default=str)
                               .encode()).hexdigest()[:16]
    per_secret[0]["relay.yaml"] = _document(KIND_CONFIG, settings, name=relay.meta.name,
                                            parts=parts or None, render=render_id)
    secrets = [config_secret(relay, i, f) for i, f in enumerate(per_secret)]
    all_files = {name: text for files in per_secret for name, text in files.items()}
    # The same digest the relay computes over its config directory (``source_hash``), so the
    # hash in the SmtpRelay status can be compared with the relay's config_info metric.
    digest = hashlib.sha256()
    for name, text in sorted(all_files.items()):
        digest.update(name.encode() + b"\0" + text.encode() + b"\0")
    config_hash = digest.hexdigest()[:16]
    try:
        if validate == "documents":
            config = parse_documents(sorted(all_files.items()))
        else:
            config = _validate_models(settings, entries, cred_entries, config_hash)
    except ConfigError as exc:
        raise RenderError(f"SmtpRelay {relay.meta.key}: rendered configuration is invalid: "
                          f"{exc}") from None
    return RenderResult(
        secrets=secrets,
        files=all_files,
        config_hash=config_hash,
        render_id=render_id,
        domains=tuple(sorted(included)),
        owners=owners,
        credentials=tuple(rendered_creds),
        excluded=tuple(excluded),
        retention=retention,
        config=config,
        copies_to_rewrite=tuple(copies_to_rewrite),
    )
