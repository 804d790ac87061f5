"""SmtpCredential: admission to the relay, the application's Secret, platform ceilings and
suspensions, and the relay configuration entry.

The rotation state — the hashes the relay accepts, when the previous password expires, when the
next rotation is due — lives in an operator-owned Secret in the relay's namespace
(``credential_state``), where tenants cannot write. The password itself exists only in the
application Secret in the credential's namespace, written only when it is this credential's own
(its controller ownerReference has this object's uid) and read back only to check it against the
stored hash: a password there that is not the one issued is never accepted and a new one is
issued (``PasswordReissued``).

Rotation happens when there is no password yet, when ``spec.rotation.interval`` has passed since
the last rotation, or on demand when the annotation ``mailplane.io/rotate`` on the SmtpCredential
holds a token not handled yet (``kubectl annotate smtpcredential app mailplane.io/rotate=$(date
+%s) --overwrite``, as ``cmctl renew`` does for certificates).

Nothing here returns a password outside the two Secret manifests: status, events and the relay
configuration entry hold hashes and times only.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import quote

from .conditions import READY, Event, format_time, get_condition, set_condition
from .credential_state import (
    LEGACY_ANNOTATIONS,
    ROTATION_INITIAL,
    ROTATION_REISSUED,
    ROTATION_REQUESTED,
    CredentialState,
    RandomBytes,
    expire_previous,
    rotate,
    rotation_due,
    secret_value,
    state_from_legacy_secret,
    state_from_store,
    state_manifest,
)
from .models import SmtpCredential, SmtpRelay, owner_reference
from .ownership import REASON_SENDER_NOT_GRANTED, DomainOwner, grant_refusal

LABEL_CREDENTIAL = "mailplane.io/credential"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "mailplane-operator"

# Reasons of the Ready condition.
REASON_READY = "CredentialReady"
REASON_SUSPENDED = "Suspended"
REASON_RELAY_NOT_FOUND = "RelayNotFound"
REASON_NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
REASON_SENDER_NOT_ATTACHED = "SenderDomainNotAttached"
REASON_SECRET_CONFLICT = "SecretConflict"  # noqa: S105 - a condition reason
REASON_SUSPENDED_BY_PLATFORM = "SuspendedByPlatform"

# The LimitsCapped condition: True when the SmtpRelay's ceilings lowered what was asked for.
LIMITS_CAPPED = "LimitsCapped"
REASON_LIMIT_CAPPED = "LimitCapped"
REASON_WITHIN_LIMITS = "WithinLimits"

SUSPENDED_BY_PLATFORM = "Platform"
SUSPENDED_BY_TENANT = "Tenant"


@dataclass(frozen=True)
class Endpoint:
    """Where applications reach a relay; a port is None when that listener is disabled."""

    host: str
    starttls_port: int | None
    implicit_port: int | None


def relay_endpoint(relay: SmtpRelay, cluster_domain: str = "cluster.local") -> Endpoint:
    """The relay's submission Service as seen from any namespace of the cluster."""
    listeners = relay.spec.listeners
    return Endpoint(
        host=f"{relay.meta.name}.{relay.meta.namespace}.svc.{cluster_domain}",
        starttls_port=listeners.submission.port if listeners.submission.enabled else None,
        implicit_port=listeners.submissions.port if listeners.submissions.enabled else None,
    )


def username_for(cred: SmtpCredential) -> str:
    """``<namespace>.<name>``: unique per cluster (namespaces hold no dots), readable in logs.
    Names too long for the relay's 128-character limit are shortened with a digest."""
    return username_of(cred.meta.namespace, cred.meta.name)


def username_of(namespace: str, name: str) -> str:
    """`username_for` from the credential's namespace and name alone."""
    name = f"{namespace}.{name}"
    if len(name) <= 128:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:111]}-{digest}"


@dataclass(frozen=True)
class Admission:
    """Whether a relay accepts this credential; ``reason`` is a Ready condition reason."""

    allowed: bool
    reason: str
    message: str


def secret_is_ours(cred: SmtpCredential, secret: Mapping[str, Any]) -> bool:
    """Whether this Secret was created for this very SmtpCredential: its controller
    ownerReference is this object (same uid, so a credential deleted and created again under the
    same name does not inherit a Secret it did not create)."""
    refs = (secret.get("metadata") or {}).get("ownerReferences") or []
    return any(
        isinstance(ref, Mapping) and ref.get("controller") is True
        and ref.get("kind") == "SmtpCredential"
        and str(ref.get("apiVersion", "")).startswith("mailplane.io/")
        and cred.meta.uid and ref.get("uid") == cred.meta.uid
        for ref in refs)


def secret_conflict(cred: SmtpCredential, secret: Mapping[str, Any] | None) -> Admission | None:
    """The refusal when ``spec.secretName`` (or the default name) is an existing Secret that
    this credential does not own: the operator never writes, adopts or deletes it."""
    if secret is None or secret_is_ours(cred, secret):
        return None
    return Admission(
        False, REASON_SECRET_CONFLICT,
        f"Secret {cred.meta.namespace}/{cred.secret_name} already exists and is not owned by "
        f"this SmtpCredential; it is left untouched. Set spec.secretName to a name no other "
        f"Secret uses, or delete that Secret if it is not needed")


def sender_domain(sender: str) -> str:
    return sender.rpartition("@")[2]


def check_credential(
    cred: SmtpCredential,
    relay: SmtpRelay | None,
    namespace_labels: Mapping[str, str] | None,
    attached_domains: Mapping[str, DomainOwner],
) -> Admission:
    """Admission of a credential to its relay: the relay exists, allows the credential's
    namespace (``spec.allowedNamespaces``; absent: only the relay's own namespace), every
    allowed sender belongs to a domain attached (and enabled) on that relay, and the
    SendingDomain owning each of those domains grants the credential's namespace
    (``reconcile.ownership``)."""
    ref = f"{cred.relay_namespace}/{cred.spec.relay_ref.name}"
    if relay is None:
        return Admission(False, REASON_RELAY_NOT_FOUND, f"SmtpRelay {ref} does not exist")
    if not namespace_allowed(relay, cred.meta.namespace, namespace_labels):
        return Admission(
            False, REASON_NAMESPACE_NOT_ALLOWED,
            f"SmtpRelay {ref} does not allow namespace {cred.meta.namespace!r} "
            "(see its spec.allowedNamespaces)",
        )
    missing = sorted({sender_domain(s) for s in cred.spec.allowed_senders}
                     - set(attached_domains))
    if missing:
        return Admission(
            False, REASON_SENDER_NOT_ATTACHED,
            f"allowed senders use domains not attached to SmtpRelay {ref} or not verified yet: "
            + ", ".join(missing),
        )
    refusal = grant_refusal(attached_domains, cred.spec.allowed_senders, cred.meta.namespace,
                            namespace_labels)
    if refusal is not None:
        return Admission(False, REASON_SENDER_NOT_GRANTED, refusal)
    return Admission(True, REASON_READY, f"accepted by SmtpRelay {ref}")


def namespace_allowed(relay: SmtpRelay, namespace: str,
                      namespace_labels: Mapping[str, str] | None) -> bool:
    """The relay's own namespace always; others when ``spec.allowedNamespaces`` selects them
    (absent: none; ``{}``: every namespace)."""
    selector = relay.spec.allowed_namespaces
    if namespace == relay.meta.namespace:
        return True
    if selector is None:
        return False
    labels = dict(namespace_labels or {})
    # The API server sets this label on every namespace; set it here too so a selector on it
    # works even when the caller passes labels read from an older cluster.
    labels.setdefault("kubernetes.io/metadata.name", namespace)
    return selector.matches(labels)


@dataclass(frozen=True)
class EffectiveLimits:
    """What the relay enforces for one credential; None: no limit."""

    rate_per_minute: int | None
    daily_quota: int | None
    capped: tuple[str, ...] = ()
    """One sentence per value lowered to the relay's ceiling."""


def effective_limits(cred: SmtpCredential, relay: SmtpRelay) -> EffectiveLimits:
    """min(what the credential asks for, or the relay's default; the relay's ceiling)."""
    limits = relay.spec.limits
    capped: list[str] = []

    def one(field: str, requested: int | None, default: int | None, ceiling: int | None,
            ceiling_field: str) -> int | None:
        wanted = requested if requested is not None else default
        if ceiling is None or (wanted is not None and wanted <= ceiling):
            return wanted
        if requested is not None:
            capped.append(f"spec.{field} {requested} is above the ceiling of SmtpRelay "
                          f"{relay.meta.key} (spec.limits.{ceiling_field} {ceiling}): "
                          f"{ceiling} applies")
        return ceiling

    rate = one("ratePerMinute", cred.spec.rate_per_minute, limits.default_rate_per_minute,
               limits.max_rate_per_minute, "maxRatePerMinute")
    quota = one("dailyQuota", cred.spec.daily_quota, limits.default_daily_quota,
                limits.max_daily_quota, "maxDailyQuota")
    return EffectiveLimits(rate, quota, tuple(capped))


def platform_suspension(cred: SmtpCredential, relay: SmtpRelay) -> str | None:
    """The reason of the SmtpRelay's suspension of this credential (by name first, then of its
    whole namespace), or None."""
    matching = [s for s in relay.spec.tenancy.suspensions
                if s.applies_to(cred.meta.namespace, cred.meta.name)]
    matching.sort(key=lambda s: s.name is None)
    return matching[0].reason if matching else None


def suspension(cred: SmtpCredential, relay: SmtpRelay | None) -> tuple[str, str] | None:
    """(who, reason) when the credential is suspended: the platform's suspension wins over the
    tenant's own ``spec.suspended``, which can add a suspension but never lift one."""
    reason = platform_suspension(cred, relay) if relay is not None else None
    if reason is not None:
        return SUSPENDED_BY_PLATFORM, reason
    if cred.spec.suspended:
        return SUSPENDED_BY_TENANT, cred.spec.suspended_reason or "suspended by its owner"
    return None


def rendered_ready_reason(cred: SmtpCredential, relay: SmtpRelay | None) -> str:
    """The Ready reason of a credential the relay accepts."""
    who = suspension(cred, relay)
    if who is None:
        return REASON_READY
    return REASON_SUSPENDED_BY_PLATFORM if who[0] == SUSPENDED_BY_PLATFORM else REASON_SUSPENDED


def _b64(value: str) -> str:
    return base64.b64encode(value.encode()).decode()


def secret_manifest(cred: SmtpCredential, password: str, endpoint: Endpoint,
                    username: str | None = None,
                    existing: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The application's Secret: username, password, host, port, url (+ smtps-port/smtps-url)."""
    user = username or username_for(cred)
    auth = f"{quote(user, safe='')}:{quote(password, safe='')}"
    values = {"username": user, "password": password, "host": endpoint.host}
    if endpoint.starttls_port is not None:
        # smtp:// on the submission port: clients must upgrade with STARTTLS (the relay refuses
        # AUTH before it), which is what nodemailer, Django and most libraries do on 587.
        values["port"] = str(endpoint.starttls_port)
        values["tls"] = "starttls"
        values["url"] = f"smtp://{auth}@{endpoint.host}:{endpoint.starttls_port}"
    if endpoint.implicit_port is not None:
        values["smtps-port"] = str(endpoint.implicit_port)
        values["smtps-url"] = f"smtps://{auth}@{endpoint.host}:{endpoint.implicit_port}"
        if endpoint.starttls_port is None:
            values["port"] = str(endpoint.implicit_port)
            values["tls"] = "implicit"
            values["url"] = values["smtps-url"]
    # Nothing of the rotation state is kept here (the tenant can edit this Secret); the
    # annotations that held it in earlier versions are removed from ``existing``.
    held = ((existing or {}).get("metadata") or {}).get("annotations") or {}
    annotations: dict[str, str | None] = {k: None for k in LEGACY_ANNOTATIONS if k in held}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": cred.secret_name,
            "namespace": cred.meta.namespace,
            "labels": {LABEL_CREDENTIAL: cred.meta.name, LABEL_MANAGED_BY: MANAGED_BY},
            "annotations": annotations,
            "ownerReferences": [owner_reference("SmtpCredential", cred.meta)],
        },
        "data": {k: _b64(v) for k, v in values.items()},
    }


LABEL_WEBHOOK_SECRET = "mailplane.io/webhook-secret"  # noqa: S105 - a label, no secret
"""A Secret a credential's webhook signs with carries this label (value ``true``): the
operator watches only Secrets with it (a label selector the API server applies)."""
MIN_WEBHOOK_SECRET_BYTES = 16
MAX_WEBHOOK_SECRET_BYTES = 1024
"""A longer signing secret is refused: it is copied into the relay's configuration Secret."""
WEBHOOK = "Webhook"
"""Condition on a SmtpCredential with spec.webhook: whether its events are posted. Reasons:
``WebhookConfigured``, ``WebhookSecretMissing`` (the message names the fix)."""
REASON_WEBHOOK_CONFIGURED = "WebhookConfigured"
REASON_WEBHOOK_SECRET_MISSING = "WebhookSecretMissing"  # noqa: S105 - a reason


def webhook_secrets(cred: SmtpCredential, secret: Mapping[str, Any] | None
                    ) -> tuple[list[str], str | None]:
    """The signing secrets of the credential's webhook (newest first) read from the Secret its
    ``spec.webhook.secretRef`` names in the credential's own namespace, or why there are none
    (a message naming the Secret, the key and the fix; never a value)."""
    hook = cred.spec.webhook
    if hook is None:
        return [], None
    ns, ref = cred.meta.namespace, hook.secret_ref
    where = f"Secret {ns}/{ref.name}"
    create = (f"kubectl -n {ns} create secret generic {ref.name} "
              f"--from-literal={ref.key}=$(openssl rand -hex 32) && kubectl -n {ns} label "
              f"secret {ref.name} {LABEL_WEBHOOK_SECRET}=true")
    if secret is None:
        return [], f"{where} (spec.webhook.secretRef) does not exist; create it: {create}"
    labels = ((secret.get("metadata") or {}).get("labels") or {})
    if labels.get(LABEL_WEBHOOK_SECRET) != "true":
        return [], (f"{where} lacks the label {LABEL_WEBHOOK_SECRET}=true (the operator reads "
                    f"only webhook Secrets carrying it): kubectl -n {ns} label secret "
                    f"{ref.name} {LABEL_WEBHOOK_SECRET}=true")
    data = secret.get("data") or {}
    out: list[str] = []
    for key in (ref.key, ref.previous_key):
        if key is None:
            continue
        raw = data.get(key)
        if raw is None:
            return [], f"{where} has no key {key!r}; add it, or set spec.webhook.secretRef.key"
        try:
            value = base64.b64decode(str(raw), validate=True).decode().strip()
        except ValueError:
            return [], f"{where} key {key!r} is not UTF-8 text; use `openssl rand -hex 32`"
        if len(value.encode()) < MIN_WEBHOOK_SECRET_BYTES:
            return [], (f"{where} key {key!r} holds fewer than {MIN_WEBHOOK_SECRET_BYTES} "
                        "bytes; use at least 32 random bytes (`openssl rand -hex 32`)")
        if len(value.encode()) > MAX_WEBHOOK_SECRET_BYTES:
            # Copied into the relay's configuration Secret, shared by every tenant of the relay.
            return [], (f"{where} key {key!r} holds more than {MAX_WEBHOOK_SECRET_BYTES} "
                        "bytes; use 32 random bytes (`openssl rand -hex 32`)")
        out.append(value)
    return out, None


def webhook_entry(cred: SmtpCredential, secret: Mapping[str, Any] | None
                  ) -> dict[str, Any] | None:
    """The credential's ``webhook`` in the relay configuration, or None (no webhook asked for,
    or its Secret is not usable: the credential still sends, its events are not posted)."""
    hook = cred.spec.webhook
    secrets, problem = webhook_secrets(cred, secret)
    if hook is None or problem is not None:
        return None
    return {"url": hook.url, "secrets": secrets, "events": list(hook.events)}


def credential_entry(cred: SmtpCredential, state: CredentialState, now: datetime,
                     relay: SmtpRelay, webhook_secret: Mapping[str, Any] | None = None,
                     ) -> dict[str, Any]:
    """The relay configuration entry (a ``RelayCredentials`` item): hashes, never the password;
    the webhook's signing secrets inline (the entry lives in the relay's configuration
    Secret)."""
    state = expire_previous(state, now)
    entry: dict[str, Any] = {
        "username": username_for(cred),
        "passwordHash": state.password_hash,
        "allowedSenders": list(cred.spec.allowed_senders),
        "owner": cred.meta.key,
    }
    if cred.meta.uid:
        # A credential deleted and created again under its name is another one: passwords
        # pushed for the deleted one never apply to it (the relay's rotation.py).
        entry["ownerUid"] = cred.meta.uid
    if state.serial:
        entry["passwordSerial"] = state.serial
    if state.previous_hash and state.previous_expires:
        entry["previousPasswordHash"] = state.previous_hash
        entry["previousExpires"] = format_time(state.previous_expires)
    # The effective values: the relay's own default would apply to an absent one, but not
    # the ceiling, so a ceiling makes every value explicit.
    limits = effective_limits(cred, relay)
    ceilings = relay.spec.limits
    if cred.spec.rate_per_minute is not None or ceilings.max_rate_per_minute is not None:
        entry["ratePerMinute"] = limits.rate_per_minute
    if cred.spec.daily_quota is not None or ceilings.max_daily_quota is not None:
        entry["dailyQuota"] = limits.daily_quota
    suspended = suspension(cred, relay)
    if suspended is not None:
        entry["suspended"] = True
        entry["suspendedReason"] = suspended[1]
    webhook = webhook_entry(cred, webhook_secret)
    if webhook is not None:
        entry["webhook"] = webhook
    return entry


@dataclass(frozen=True)
class CredentialResult:
    secret: dict[str, Any] | None
    """The desired application Secret (None: nothing to write, see ``admission``)."""
    state_secret: dict[str, Any] | None
    """The desired state Secret in the relay's namespace, written before ``secret``."""
    state: CredentialState | None
    status: dict[str, Any]
    """The status patch: conditions, observedGeneration, username, secretName, relay, times."""
    events: list[Event]
    admission: Admission
    rotated: bool
    next_check: datetime | None
    """When to reconcile again (scheduled rotation, end of an overlap window); None: no need."""
    cause: str | None = None
    """Why the password changed (``ROTATION_*``), when ``rotated``."""


def current_state(cred: SmtpCredential, stored_state: Mapping[str, Any] | None,
                  app_secret: Mapping[str, Any] | None, now: datetime) -> CredentialState | None:
    """The state in the operator's store; before the first write there, the bounded state of
    an application Secret of an earlier version (only when it is the credential's own)."""
    state = state_from_store(stored_state)
    if state is None and stored_state is None and app_secret is not None and secret_is_ours(
            cred, app_secret):
        state = state_from_legacy_secret(cred, app_secret, now)
    return state


def reconcile_credential(
    cred: SmtpCredential,
    *,
    relay: SmtpRelay | None,
    namespace_labels: Mapping[str, str] | None,
    attached_domains: Mapping[str, DomainOwner],
    existing_secret: Mapping[str, Any] | None,
    now: datetime,
    stored_state: Mapping[str, Any] | None = None,
    random: RandomBytes = os.urandom,
    endpoint: Endpoint | None = None,
    render_exclusion: tuple[str, str] | None = None,
) -> CredentialResult:
    """Everything the operator does for one SmtpCredential, minus the I/O.

    ``attached_domains``: the domains enabled on the relay and their owners (see
    ``render.attached_domains``);
    ``existing_secret``: the application Secret as read from the API, if any;
    ``stored_state``: the state Secret (``credential_state.state_secret_name``) in the relay's
    namespace, if any; ``endpoint``: override of the relay address written to the Secret
    (``mailplane dev``); ``render_exclusion``: (reason, message) when the relay's last render
    left this credential out although it is admitted (its entry would break the configuration).

    Nothing is written for a credential whose Secret name is taken by a Secret it does not own,
    whose relay does not exist, or whose namespace the relay does not allow (a namespace
    without access cannot make the operator create Secrets in the relay's namespace).
    """
    conflict = secret_conflict(cred, existing_secret)
    admission = conflict or check_credential(cred, relay, namespace_labels, attached_domains)
    if admission.allowed and render_exclusion is not None:
        admission = Admission(False, *render_exclusion)
    events: list[Event] = []
    state: CredentialState | None = None
    secret: dict[str, Any] | None = None
    state_secret: dict[str, Any] | None = None
    rotated = False
    cause: str | None = None
    if relay is not None and conflict is None and (
            admission.reason != REASON_NAMESPACE_NOT_ALLOWED):
        state = current_state(cred, stored_state, existing_secret, now)
        # The one copy of the password is the application Secret; it is used only when it is
        # the password issued (its hash is the stored one), else a new one is issued.
        in_use = secret_value(existing_secret, "password") if existing_secret else None
        cause = rotation_due(cred, state, now)
        if cause is None and state is not None and not state.issued(in_use):
            cause = ROTATION_REISSUED
        if cause is not None:
            state, password = rotate(cred, state, now, random, in_use=in_use)
            rotated = True
            events.append(Event("Normal", cause, _rotation_message(cause, cred, state)))
        else:
            assert in_use is not None
            password = in_use
        assert state is not None
        state = expire_previous(state, now)
        state_secret = state_manifest(cred, relay, state)
        secret = secret_manifest(cred, password, endpoint or relay_endpoint(relay),
                                 existing=existing_secret)
    status = credential_status(cred, admission, state, now, relay)
    if not admission.allowed:
        events.append(Event("Warning", admission.reason, admission.message))
    capped = get_condition(status["conditions"], LIMITS_CAPPED)
    before = get_condition(cred.status.get("conditions"), LIMITS_CAPPED)
    if capped is not None and capped["status"] == "True" and (
            before is None or before.get("status") != "True"
            or before.get("message") != capped["message"]):
        events.append(Event("Warning", REASON_LIMIT_CAPPED, capped["message"]))
    return CredentialResult(secret, state_secret, state, status, events, admission, rotated,
                            next_check(cred, state), cause if rotated else None)


PUSHED_FIELDS = ("username", "owner", "ownerUid", "passwordSerial", "passwordHash",
                 "previousPasswordHash", "previousExpires")


def pushed_password(cred: SmtpCredential, result: CredentialResult, now: datetime,
                    relay: SmtpRelay | None, *, resume: bool = False) -> dict[str, Any] | None:
    """What the relay pods are told at a rotation, ahead of their configuration (``POST
    /admin/credential``): the password fields of the credential's entry and the rotation's
    serial (hashes, never the password). None when nothing is to be pushed: no rotation, the
    first password (the pods do not have the credential yet), or a credential the relay does
    not accept. ``resume``: the fields of the rotation in the state, rotated now or not (its
    confirmation was cut short, e.g. by an operator restart)."""
    if result.state is None or relay is None or not result.admission.allowed:
        return None
    if not resume and (not result.rotated or result.cause == ROTATION_INITIAL):
        return None
    if resume and result.state.serial < 1:
        return None
    entry = credential_entry(cred, result.state, now, relay)
    entry["passwordSerial"] = result.state.serial
    return {k: entry[k] for k in PUSHED_FIELDS if k in entry}


def _rotation_message(cause: str, cred: SmtpCredential, state: CredentialState) -> str:
    where = f"Secret {cred.secret_name}"
    if cause == ROTATION_INITIAL:
        return f"generated a password into {where}"
    overlap = (f"; the previous password works until {format_time(state.previous_expires)}"
               if state.previous_expires else "; the previous password no longer works")
    if cause == ROTATION_REISSUED:
        return (f"{where} did not hold the password issued (edited or deleted); a new one was "
                f"written{overlap}")
    why = "on request" if cause == ROTATION_REQUESTED else "on schedule"
    return f"rotated the password in {where} {why}{overlap}"


def next_check(cred: SmtpCredential, state: CredentialState | None) -> datetime | None:
    if state is None:
        return None
    times = []
    if cred.spec.rotation.interval is not None:
        times.append(state.rotated_at + timedelta(seconds=cred.spec.rotation.interval))
    if state.previous_expires is not None:
        times.append(state.previous_expires)
    return min(times) if times else None


def credential_status(cred: SmtpCredential, admission: Admission,
                      state: CredentialState | None, now: datetime,
                      relay: SmtpRelay | None = None) -> dict[str, Any]:
    """The status patch. Holds no secret value: times, names, limits and conditions only."""
    suspended = suspension(cred, relay)
    ready: tuple[bool, str, str] = (admission.allowed, admission.reason, admission.message)
    if admission.allowed and suspended is not None and suspended[0] == SUSPENDED_BY_PLATFORM:
        assert relay is not None
        ready = (False, REASON_SUSPENDED_BY_PLATFORM,
                 f"suspended by the platform (SmtpRelay {relay.meta.key} "
                 f"spec.tenancy.suspensions): {suspended[1]}")
    elif admission.allowed and suspended is not None:
        ready = (False, REASON_SUSPENDED, "suspended: " + suspended[1])
    generation = cred.meta.generation
    conditions = set_condition(cred.status.get("conditions"), READY, *ready, generation, now)
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": conditions,
        "username": username_for(cred),
        "secretName": cred.secret_name,
        "relay": f"{cred.relay_namespace}/{cred.spec.relay_ref.name}",
        "suspendedBy": suspended[0] if suspended else None,
    }
    if relay is not None:
        limits = effective_limits(cred, relay)
        status["effectiveRatePerMinute"] = limits.rate_per_minute
        status["effectiveDailyQuota"] = limits.daily_quota
        if limits.capped:
            capped = (True, REASON_LIMIT_CAPPED, "; ".join(limits.capped))
        else:
            capped = (False, REASON_WITHIN_LIMITS, "the limits asked for are within the "
                      f"ceilings of SmtpRelay {relay.meta.key}")
        status["conditions"] = set_condition(status["conditions"], LIMITS_CAPPED, *capped,
                                             generation, now)
    if state is not None:
        status["lastRotationTime"] = format_time(state.rotated_at)
        nxt = (state.rotated_at + timedelta(seconds=cred.spec.rotation.interval)
               if cred.spec.rotation.interval is not None else None)
        status["nextRotationTime"] = format_time(nxt) if nxt else None
        status["previousPasswordExpires"] = (format_time(state.previous_expires)
                                             if state.previous_expires else None)
        status["lastRotationRequest"] = state.rotation_request
    return status
