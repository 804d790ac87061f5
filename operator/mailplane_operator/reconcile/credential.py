"""SmtpCredential: the application's Secret, password rotation, and admission to the relay.

The application Secret (in the credential's namespace, owned by the SmtpCredential) is the
durable store of the rotation state: the current password in ``data``, and in annotations the
hash the relay gets, the previous hash with the end of its overlap window, when the password was
last rotated and the last on-demand rotation token handled. An operator restart in the middle of
a rotation therefore finds everything it needs in that Secret.

Rotation happens when there is no password yet, when ``spec.rotation.interval`` has passed since
the last rotation, or on demand when the annotation ``mailplane.io/rotate`` on the SmtpCredential
holds a token not handled yet (``kubectl annotate smtpcredential app mailplane.io/rotate=$(date
+%s) --overwrite``, as ``cmctl renew`` does for certificates).

Nothing here returns a password outside the Secret manifest: status, events and the relay
configuration entry hold hashes and times only.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

from mailplane_relay.config import hash_password, verify_password

from .conditions import READY, Event, format_time, get_condition, parse_time, set_condition
from .models import SmtpCredential, SmtpRelay, owner_reference
from .ownership import REASON_SENDER_NOT_GRANTED, DomainOwner, grant_refusal

ANN_PASSWORD_HASH = "mailplane.io/password-hash"  # noqa: S105 - an annotation key
ANN_PREVIOUS_HASH = "mailplane.io/previous-password-hash"
ANN_PREVIOUS_EXPIRES = "mailplane.io/previous-expires"
ANN_ROTATED_AT = "mailplane.io/rotated-at"
ANN_ROTATION_REQUEST = "mailplane.io/rotation-request"
ANN_ROTATE = "mailplane.io/rotate"
"""Annotation on the SmtpCredential that asks for a rotation; its value is any new token."""

LABEL_CREDENTIAL = "mailplane.io/credential"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "mailplane-operator"

RandomBytes = Callable[[int], bytes]

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

# Rotation causes (also the reason of the Event).
ROTATION_INITIAL = "PasswordGenerated"
ROTATION_SCHEDULED = "PasswordRotated"
ROTATION_REQUESTED = "PasswordRotationRequested"


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
    name = f"{cred.meta.namespace}.{cred.meta.name}"
    if len(name) <= 128:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    return f"{name[:111]}-{digest}"


_BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


def generate_password(random: RandomBytes = os.urandom) -> str:
    """32 random bytes (256 bits) as 43 letters and digits. Only alphanumerics: a password that
    starts with '-' is taken for an option by command-line clients (swaks, curl), and '_' or '/'
    need escaping in URLs."""
    number = int.from_bytes(random(32), "big")
    digits = []
    for _ in range(43):  # 62**43 > 2**256
        number, digit = divmod(number, 62)
        digits.append(_BASE62[digit])
    return "".join(reversed(digits))


def hash_for_relay(password: str, random: RandomBytes = os.urandom) -> str:
    """The salted SHA-256 the relay verifies; fast on purpose, as the password is 256-bit random."""
    return hash_password(password, scheme="sha256", salt=random(16))


@dataclass(frozen=True)
class CredentialState:
    """The rotation state, as stored in the application Secret."""

    password: str
    password_hash: str
    rotated_at: datetime
    previous_hash: str | None = None
    previous_expires: datetime | None = None
    rotation_request: str | None = None

    def __repr__(self) -> str:  # never print the password
        return (f"CredentialState(rotated_at={self.rotated_at!r}, "
                f"previous_expires={self.previous_expires!r})")


def secret_value(secret: Mapping[str, Any], key: str) -> str | None:
    """A Secret value from ``data`` (base64, as the API returns it) or ``stringData``."""
    data = secret.get("data") or {}
    if key in data:
        try:
            return base64.b64decode(data[key], validate=True).decode()
        except (binascii.Error, UnicodeDecodeError):
            return None
    string_data = secret.get("stringData") or {}
    value = string_data.get(key)
    return value if isinstance(value, str) else None


def state_from_secret(secret: Mapping[str, Any] | None) -> CredentialState | None:
    """The rotation state in an existing Secret, or None when it holds no usable password.

    A hash annotation that does not match the password (edited by hand) is recomputed, so the
    relay always gets the hash of the password the application reads. The salt of that
    recomputed hash comes from the Secret's identity, so every render gives the same hash and
    the config is not rewritten on each pass until the credential handler fixes the annotation.
    """
    if not secret:
        return None
    password = secret_value(secret, "password")
    if not password:
        return None
    ann = (secret.get("metadata") or {}).get("annotations") or {}
    current = ann.get(ANN_PASSWORD_HASH)
    if not current or not verify_password(password, current):
        meta = secret.get("metadata") or {}
        identity = meta.get("uid") or f"{meta.get('namespace')}/{meta.get('name')}"
        salt = hashlib.sha256(b"mailplane-rehash\0" + str(identity).encode()).digest()
        current = hash_for_relay(password, lambda n: salt[:n])
    rotated_at = parse_time(ann.get(ANN_ROTATED_AT))
    previous_expires = parse_time(ann.get(ANN_PREVIOUS_EXPIRES))
    previous = ann.get(ANN_PREVIOUS_HASH) or None
    return CredentialState(
        password=password,
        password_hash=current,
        rotated_at=rotated_at or datetime.fromtimestamp(0, UTC),
        previous_hash=previous if previous and previous_expires else None,
        previous_expires=previous_expires if previous else None,
        rotation_request=ann.get(ANN_ROTATION_REQUEST) or None,
    )


def rotation_due(cred: SmtpCredential, state: CredentialState | None,
                 now: datetime) -> str | None:
    """Why the password must change now (``ROTATION_*``), or None."""
    if state is None:
        return ROTATION_INITIAL
    token = cred.meta.annotations.get(ANN_ROTATE)
    if token and token != state.rotation_request:
        return ROTATION_REQUESTED
    interval = cred.spec.rotation.interval
    if interval is not None and now >= state.rotated_at + timedelta(seconds=interval):
        return ROTATION_SCHEDULED
    return None


def rotate(cred: SmtpCredential, state: CredentialState | None, now: datetime,
           random: RandomBytes = os.urandom) -> CredentialState:
    """A new password; the current one's hash stays accepted until the overlap ends."""
    password = generate_password(random)
    overlap = cred.spec.rotation.overlap
    keep_previous = state is not None and overlap > 0
    return CredentialState(
        password=password,
        password_hash=hash_for_relay(password, random),
        rotated_at=now,
        previous_hash=state.password_hash if keep_previous and state else None,
        previous_expires=now + timedelta(seconds=overlap) if keep_previous else None,
        rotation_request=cred.meta.annotations.get(ANN_ROTATE)
        or (state.rotation_request if state else None),
    )


def expire_previous(state: CredentialState, now: datetime) -> CredentialState:
    """The state without the previous hash once its overlap window has ended."""
    if state.previous_expires is not None and now >= state.previous_expires:
        return CredentialState(state.password, state.password_hash, state.rotated_at,
                               None, None, state.rotation_request)
    return state


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


def secret_manifest(cred: SmtpCredential, state: CredentialState, endpoint: Endpoint,
                    username: str | None = None) -> dict[str, Any]:
    """The application's Secret: username, password, host, port, url (+ smtps-port/smtps-url)."""
    user = username or username_for(cred)
    auth = f"{quote(user, safe='')}:{quote(state.password, safe='')}"
    values = {"username": user, "password": state.password, "host": endpoint.host}
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
    annotations = {
        ANN_PASSWORD_HASH: state.password_hash,
        ANN_ROTATED_AT: format_time(state.rotated_at),
    }
    if state.previous_hash and state.previous_expires:
        annotations[ANN_PREVIOUS_HASH] = state.previous_hash
        annotations[ANN_PREVIOUS_EXPIRES] = format_time(state.previous_expires)
    if state.rotation_request:
        annotations[ANN_ROTATION_REQUEST] = state.rotation_request
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


def credential_entry(cred: SmtpCredential, state: CredentialState, now: datetime,
                     relay: SmtpRelay) -> dict[str, Any]:
    """The relay configuration entry (a ``RelayCredentials`` item): hashes, never the password."""
    state = expire_previous(state, now)
    entry: dict[str, Any] = {
        "username": username_for(cred),
        "passwordHash": state.password_hash,
        "allowedSenders": list(cred.spec.allowed_senders),
        "owner": cred.meta.key,
    }
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
    return entry


@dataclass(frozen=True)
class CredentialResult:
    secret: dict[str, Any] | None
    """The desired application Secret (None when the relay does not exist: no host to name)."""
    state: CredentialState | None
    status: dict[str, Any]
    """The status patch: conditions, observedGeneration, username, secretName, relay, times."""
    events: list[Event]
    admission: Admission
    rotated: bool
    next_check: datetime | None
    """When to reconcile again (scheduled rotation, end of an overlap window); None: no need."""


def reconcile_credential(
    cred: SmtpCredential,
    *,
    relay: SmtpRelay | None,
    namespace_labels: Mapping[str, str] | None,
    attached_domains: Mapping[str, DomainOwner],
    existing_secret: Mapping[str, Any] | None,
    now: datetime,
    random: RandomBytes = os.urandom,
    endpoint: Endpoint | None = None,
) -> CredentialResult:
    """Everything the operator does for one SmtpCredential, minus the I/O.

    ``attached_domains``: the domains enabled on the relay and their owners (see
    ``render.attached_domains``);
    ``existing_secret``: the application Secret as read from the API, if any;
    ``endpoint``: override of the relay address written to the Secret (``mailplane dev``).
    """
    conflict = secret_conflict(cred, existing_secret)
    admission = conflict or check_credential(cred, relay, namespace_labels, attached_domains)
    events: list[Event] = []
    # A foreign Secret is never read for rotation state (nor written below).
    state = state_from_secret(existing_secret) if conflict is None else None
    secret: dict[str, Any] | None = None
    rotated = False
    if relay is not None and conflict is None:
        cause = rotation_due(cred, state, now)
        if cause is not None:
            state = rotate(cred, state, now, random)
            rotated = True
            events.append(Event("Normal", cause, _rotation_message(cause, cred, state)))
        assert state is not None
        state = expire_previous(state, now)
        secret = secret_manifest(cred, state, endpoint or relay_endpoint(relay))
    status = credential_status(cred, admission, state, now, relay)
    if not admission.allowed:
        events.append(Event("Warning", admission.reason, admission.message))
    capped = get_condition(status["conditions"], LIMITS_CAPPED)
    before = get_condition(cred.status.get("conditions"), LIMITS_CAPPED)
    if capped is not None and capped["status"] == "True" and (
            before is None or before.get("status") != "True"
            or before.get("message") != capped["message"]):
        events.append(Event("Warning", REASON_LIMIT_CAPPED, capped["message"]))
    return CredentialResult(secret, state, status, events, admission, rotated,
                            next_check(cred, state))


def _rotation_message(cause: str, cred: SmtpCredential, state: CredentialState) -> str:
    where = f"Secret {cred.secret_name}"
    if cause == ROTATION_INITIAL:
        return f"generated a password into {where}"
    overlap = (f"; the previous password works until {format_time(state.previous_expires)}"
               if state.previous_expires else "; the previous password no longer works")
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
