"""SendingDomain: DKIM keys, the DNS records to publish, verification and staged key rotation.

The DKIM key Secret ``<domain-cr-name>-dkim`` (in the domain's namespace, owned by the
SendingDomain) holds one ``<selector>.pem`` per live key and, in the annotation
``mailplane.io/dkim-state`` (JSON), the rotation state, so that an operator restart in the middle
of a rotation resumes where it stopped.

Rotation, one step per reconcile, each step returning an Event::

    Stable ──(interval passed | mailplane.io/rotate token | algorithm changed)──▶ NextKeyPublished
        a new key under a new selector; its TXT record is listed in status.dnsRecords
    NextKeyPublished ──(DNS serves the new record, or verification.skip)──▶ Switched
        the relay signs with the new selector; the old record stays listed for retireAfter
    Switched ──(retireAfter passed)──▶ Stable
        the old key is removed from the Secret and its record from the list

The DNS lookups are the caller's: ``names_to_check`` says which TXT names to look up, and
``reconcile_domain`` gets the answers as ``observed`` (name -> TXT strings; None for a lookup that
failed, so the result is Unknown rather than False).
"""

from __future__ import annotations

import base64
import functools
import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from .conditions import READY, Event, format_time, get_condition, parse_time, set_condition
from .credential import namespace_allowed
from .credential_state import ANN_ROTATE, secret_value
from .models import SendingDomain, SmtpRelay, SpecError, TenancySpec, owner_reference
from .ownership import (
    REASON_DOMAIN_CONFLICT,
    REASON_SKIP_NOT_ALLOWED,
    claim_verified,
    conflict_message,
    elect_owners,
    skip_allowed,
    skip_refusal,
    verified_since,
)

Algorithm = Literal["rsa-2048", "ed25519"]
Phase = Literal["Stable", "NextKeyPublished", "Switched"]
RandomBytes = Callable[[int], bytes]
KeyFactory = Callable[[str], str]
"""algorithm ("rsa-2048" | "ed25519") -> private key PEM (PKCS#8)."""

ANN_DKIM_STATE = "mailplane.io/dkim-state"
# Dual signing (dkim.algorithm rsa-2048+ed25519): the second key's own rotation state.
ANN_DKIM_SECOND_STATE = "mailplane.io/dkim-second-state"
SECOND_SELECTOR_SUFFIX = "-ed25519"
LABEL_DOMAIN = "mailplane.io/sending-domain"

DKIM_VERIFIED = "DKIMVerified"
SPF_VERIFIED = "SPFVerified"
DNS_VERIFIED = "DNSVerified"

REASON_VERIFIED = "Verified"
REASON_SKIPPED = "VerificationSkipped"
REASON_NOT_FOUND = "RecordNotFound"
REASON_MISMATCH = "RecordMismatch"
REASON_LOOKUP_FAILED = "DNSLookupFailed"
REASON_NOT_CHECKED = "NotChecked"
REASON_RELAY_NOT_FOUND = "RelayNotFound"
REASON_NAMESPACE_NOT_ALLOWED = "NamespaceNotAllowed"
REASON_SECRET_CONFLICT = "SecretConflict"  # noqa: S105 - a condition reason

RELAY_ALGORITHMS: dict[str, str] = {"rsa-2048": "rsa-sha256", "ed25519": "ed25519-sha256"}


# --------------------------------------------------------------------------------------------
# Keys and records
# --------------------------------------------------------------------------------------------


def generate_dkim_key(algorithm: str, random: RandomBytes | None = None) -> str:
    """A new private key as unencrypted PKCS#8 PEM. Ed25519 takes its 32 bytes from ``random``
    when given (deterministic tests); RSA always uses OpenSSL's generator."""
    key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if algorithm == "ed25519":
        key = (ed25519.Ed25519PrivateKey.from_private_bytes(random(32)) if random
               else ed25519.Ed25519PrivateKey.generate())
    elif algorithm == "rsa-2048":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    else:
        raise ValueError(f"unknown DKIM algorithm {algorithm!r}: use rsa-2048 or ed25519")
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def dkim_txt_value(pem: str) -> str:
    """The DKIM TXT record value for a private key: ``v=DKIM1; k=rsa|ed25519; p=<base64>``."""
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        raw = key.public_key().public_bytes(serialization.Encoding.Raw,
                                            serialization.PublicFormat.Raw)
        return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"
    if isinstance(key, rsa.RSAPrivateKey):
        der = key.public_key().public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raise ValueError("a DKIM key must be RSA or Ed25519")


def split_txt(value: str, limit: int = 255) -> tuple[str, ...]:
    """A TXT value as character-strings of at most 255 bytes each (RFC 1035 3.3.14); resolvers
    and DKIM verifiers join them back without separators."""
    return tuple(value[i:i + limit] for i in range(0, len(value), limit)) or ("",)


@dataclass(frozen=True)
class DNSRecord:
    purpose: Literal["dkim", "spf", "dmarc"]
    name: str
    value: str
    selector: str | None = None
    state: Literal["active", "next", "retiring", "suggested"] = "suggested"
    type: str = "TXT"

    @property
    def strings(self) -> tuple[str, ...]:
        return split_txt(self.value)

    def to_status(self, verified: bool | None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "purpose": self.purpose, "type": self.type, "name": self.name,
            "value": self.value, "strings": list(self.strings), "state": self.state,
        }
        if self.selector:
            out["selector"] = self.selector
        if verified is not None:
            out["verified"] = verified
        return out


def dkim_record_name(selector: str, domain: str) -> str:
    return f"{selector}._domainkey.{domain}"


def spf_value(domain: SendingDomain) -> str:
    spf = domain.spec.spf
    if spf.record:
        return spf.record
    terms = [f"include:{i}" for i in spf.include]
    terms += [f"ip4:{i}" for i in spf.ip4] + [f"ip6:{i}" for i in spf.ip6]
    return " ".join(["v=spf1", *(terms or ["mx"]), "~all"])


def dmarc_value(domain: SendingDomain) -> str:
    value = f"v=DMARC1; p={domain.spec.dmarc.policy}"
    if domain.spec.dmarc.rua:
        value += f"; rua={domain.spec.dmarc.rua}"
    return value


# --------------------------------------------------------------------------------------------
# Rotation state
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DKIMKeyInfo:
    selector: str
    algorithm: str
    created_at: datetime
    pem: str = field(repr=False)


@dataclass(frozen=True)
class DKIMState:
    phase: Phase
    active: str
    keys: Mapping[str, DKIMKeyInfo]
    phase_since: datetime
    next: str | None = None
    retiring: str | None = None
    retire_at: datetime | None = None
    rotation_request: str | None = None
    published: bool = True
    """The second key of a dual-signing domain signs only once DNS served its record (or
    verification is skipped): a signature receivers cannot check is worse than none."""

    @property
    def active_key(self) -> DKIMKeyInfo:
        return self.keys[self.active]


class DKIMSecretUnreadable(SpecError):
    """The DKIM Secret exists but its state or keys cannot be read. Never replaced by new keys:
    that would silently break signing for selectors already published in DNS."""


def state_from_secret(secret: Mapping[str, Any] | None,
                      annotation: str = ANN_DKIM_STATE) -> DKIMState | None:
    """The rotation state and keys stored in the DKIM Secret (the second key's with
    ``annotation=ANN_DKIM_SECOND_STATE``); None if there is no Secret or it holds no such state
    yet. Raises DKIMSecretUnreadable when our state is there but cannot be used."""
    if not secret:
        return None
    meta = secret.get("metadata") or {}
    if annotation not in (meta.get("annotations") or {}):
        return None
    unreadable = DKIMSecretUnreadable(
        f"Secret {meta.get('namespace')}/{meta.get('name')}: the annotation {annotation} or "
        "a key it names cannot be read; restore the Secret from a backup, or delete it to "
        "generate new keys (then publish the new DKIM record listed in status.dnsRecords)")
    ann = meta.get("annotations") or {}
    try:
        raw = json.loads(ann.get(annotation) or "")
        keys: dict[str, DKIMKeyInfo] = {}
        for sel, info in raw["keys"].items():
            pem = secret_value(secret, f"{sel}.pem")
            if pem:
                keys[sel] = DKIMKeyInfo(sel, info["algorithm"],
                                        parse_time(info["createdAt"]) or _EPOCH, pem)
        state = DKIMState(
            phase=raw["phase"], active=raw["active"], keys=keys,
            phase_since=parse_time(raw.get("phaseSince")) or _EPOCH,
            next=raw.get("next"), retiring=raw.get("retiring"),
            retire_at=parse_time(raw.get("retireAt")),
            rotation_request=raw.get("rotationRequest"),
            published=raw.get("published", True) is True,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        raise unreadable from None
    if state.active not in keys or (state.next and state.next not in keys):
        raise unreadable
    if not all(k.algorithm in RELAY_ALGORITHMS for k in keys.values()):
        raise unreadable  # the annotation is tenant-writable: only the algorithms we sign with
    if not all(_usable_key(k.pem, k.algorithm) for k in keys.values()):
        raise unreadable
    return state


MAX_RSA_BITS = 4096


@functools.lru_cache(maxsize=4096)
def _usable_key(pem: str, algorithm: str) -> bool:
    """Whether a PEM from the (tenant-writable) DKIM Secret is a private key of its algorithm:
    a hand-edited key must exclude only its own domain, with a reason, not reach the relay."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError):
        return False
    want = rsa.RSAPrivateKey if algorithm == "rsa-2048" else ed25519.Ed25519PrivateKey
    # At most 4096 bits: receivers need not verify longer keys (RFC 8301), and a tenant's huge
    # keys would crowd everyone's entries out of the relay's configuration Secrets.
    return isinstance(key, want) and (not isinstance(key, rsa.RSAPrivateKey)
                                      or 2048 <= key.key_size <= MAX_RSA_BITS)


_EPOCH = datetime.fromtimestamp(0, UTC)


class DKIMSecretConflict(SpecError):
    """The DKIM Secret's name is taken by a Secret that was not made for this SendingDomain."""


def secret_conflict(domain: SendingDomain, secret: Mapping[str, Any] | None) -> str | None:
    """Why the existing Secret named ``<name>-dkim`` is not this domain's to write, or None.

    Ours: its controller is this SendingDomain (same uid); or it is a DKIM Secret the operator
    made for a SendingDomain of this name (label, state annotation, no controller or a
    SendingDomain as controller: restored from a backup, or the domain deleted and created
    again). Anything else (a Secret made by hand or by another controller) is left untouched:
    whoever may create a SendingDomain must not make the operator replace or delete it."""
    if not secret:
        return None
    meta = secret.get("metadata") or {}
    controller = next((r for r in meta.get("ownerReferences") or []
                       if isinstance(r, Mapping) and r.get("controller") is True), None)
    if controller is not None and domain.meta.uid and controller.get("uid") == domain.meta.uid:
        return None
    ours = ((meta.get("labels") or {}).get(LABEL_DOMAIN) == domain.meta.name
            and ANN_DKIM_STATE in (meta.get("annotations") or {})
            and (controller is None or controller.get("kind") == "SendingDomain"))
    if ours:
        return None
    return (f"Secret {domain.meta.namespace}/{secret_name(domain)} already exists and was not "
            "made for this SendingDomain; it is left untouched. Give the SendingDomain another "
            f"name (its DKIM keys go to the Secret <name>-dkim), or delete that Secret if it is "
            "not needed")


def secret_name(domain: SendingDomain) -> str:
    return f"{domain.meta.name}-dkim"


def _state_info(state: DKIMState) -> dict[str, Any]:
    return {
        "phase": state.phase, "active": state.active, "next": state.next,
        "retiring": state.retiring, "phaseSince": format_time(state.phase_since),
        "retireAt": format_time(state.retire_at) if state.retire_at else None,
        "rotationRequest": state.rotation_request,
        "keys": {s: {"algorithm": k.algorithm, "createdAt": format_time(k.created_at)}
                 for s, k in sorted(state.keys.items())},
    }


def secret_manifest(domain: SendingDomain, state: DKIMState,
                    second: DKIMState | None = None) -> dict[str, Any]:
    annotations = {ANN_DKIM_STATE: json.dumps(_state_info(state), sort_keys=True)}
    keys = dict(state.keys)
    if second is not None:
        annotations[ANN_DKIM_SECOND_STATE] = json.dumps(
            {**_state_info(second), "published": second.published}, sort_keys=True)
        keys.update(second.keys)
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "Opaque",
        "metadata": {
            "name": secret_name(domain),
            "namespace": domain.meta.namespace,
            "labels": {LABEL_DOMAIN: domain.meta.name,
                       "app.kubernetes.io/managed-by": "mailplane-operator"},
            "annotations": annotations,
            "ownerReferences": [owner_reference("SendingDomain", domain.meta)],
        },
        "data": {f"{s}.pem": base64.b64encode(k.pem.encode()).decode()
                 for s, k in sorted(keys.items())},
    }


def _next_selector(base_selector: str, state: DKIMState, now: datetime) -> str:
    base = f"{base_selector}-{now:%Y%m%d}"
    candidate, n = base, 2
    while candidate in state.keys or candidate == state.retiring:
        candidate, n = f"{base}-{n}", n + 1
    return candidate


def rotation_cause(domain: SendingDomain, state: DKIMState, now: datetime,
                   algorithm: str | None = None) -> str | None:
    """Why a rotation starts now, or None. Only a Stable state starts one. ``algorithm``: the
    one this key should have (default: the spec's first)."""
    if state.phase != "Stable":
        return None
    token = domain.meta.annotations.get(ANN_ROTATE)
    if token and token != state.rotation_request:
        return "requested by the mailplane.io/rotate annotation"
    want = algorithm or domain.spec.dkim.primary_algorithm
    if state.active_key.algorithm != want:
        return f"the algorithm changed from {state.active_key.algorithm} to {want}"
    interval = domain.spec.dkim.rotation_interval
    if interval is not None and now >= state.active_key.created_at + timedelta(seconds=interval):
        return "the rotation interval has passed"
    return None


def advance(
    domain: SendingDomain,
    state: DKIMState | None,
    *,
    next_served: bool,
    now: datetime,
    key_factory: KeyFactory,
    second: bool = False,
) -> tuple[DKIMState, list[Event]]:
    """One step of the key lifecycle (see the module docstring). ``next_served``: DNS serves the
    next selector's record (or verification is skipped). ``second``: the lifecycle of a
    dual-signing domain's second key (its algorithm, under ``<selector>-ed25519``)."""
    spec = domain.spec.dkim
    algorithm = (spec.second_algorithm if second else None) or spec.primary_algorithm
    base_selector = spec.selector + (SECOND_SELECTOR_SUFFIX if second else "")
    if state is None:
        pem = key_factory(algorithm)
        key = DKIMKeyInfo(base_selector, algorithm, now, pem)
        new = DKIMState("Stable", base_selector, {base_selector: key}, now,
                        rotation_request=domain.meta.annotations.get(ANN_ROTATE),
                        published=not second)
        return new, [Event("Normal", "DKIMKeyGenerated",
                           f"generated a {algorithm} DKIM key under selector "
                           f"{base_selector}; publish the TXT record listed in status.dnsRecords")]
    if state.phase == "Stable":
        cause = rotation_cause(domain, state, now, algorithm)
        if cause is None:
            return state, []
        selector = _next_selector(base_selector, state, now)
        key = DKIMKeyInfo(selector, algorithm, now, key_factory(algorithm))
        new = replace(state, phase="NextKeyPublished", next=selector, phase_since=now,
                      keys={**state.keys, selector: key},
                      rotation_request=domain.meta.annotations.get(ANN_ROTATE)
                      or state.rotation_request)
        return new, [Event("Normal", "DKIMRotationStarted",
                           f"DKIM key rotation started ({cause}): publish the TXT record of "
                           f"selector {selector} listed in status.dnsRecords")]
    if state.phase == "NextKeyPublished":
        if not next_served or state.next is None:
            return state, []
        retire_at = now + timedelta(seconds=spec.retire_after)
        new = replace(state, phase="Switched", active=state.next, next=None,
                      retiring=state.active, retire_at=retire_at, phase_since=now)
        return new, [Event("Normal", "DKIMSwitched",
                           f"signing with selector {state.next} now; selector {state.active} "
                           f"stays published until {format_time(retire_at)}")]
    # Switched
    if state.retire_at is not None and now < state.retire_at:
        return state, []
    retired = state.retiring
    keys = {s: k for s, k in state.keys.items() if s != retired}
    new = replace(state, phase="Stable", retiring=None, retire_at=None, phase_since=now,
                  keys=keys)
    return new, [Event("Normal", "DKIMKeyRetired",
                       f"retired DKIM selector {retired}; its TXT record can be removed")]


# --------------------------------------------------------------------------------------------
# DNS records and verification
# --------------------------------------------------------------------------------------------


def _key_records(name: str, state: DKIMState) -> list[DNSRecord]:
    records = [DNSRecord("dkim", dkim_record_name(state.active, name),
                         dkim_txt_value(state.active_key.pem), state.active, "active")]
    if state.next:
        records.append(DNSRecord("dkim", dkim_record_name(state.next, name),
                                 dkim_txt_value(state.keys[state.next].pem), state.next, "next"))
    if state.retiring and state.retiring in state.keys:
        records.append(DNSRecord("dkim", dkim_record_name(state.retiring, name),
                                 dkim_txt_value(state.keys[state.retiring].pem), state.retiring,
                                 "retiring"))
    return records


def dns_records(domain: SendingDomain, state: DKIMState,
                second: DKIMState | None = None) -> list[DNSRecord]:
    """What to publish: DKIM TXT records (active, next, retiring; then those of a dual-signing
    domain's second key), the SPF and DMARC suggestions."""
    name = domain.spec.domain
    records = _key_records(name, state)
    if second is not None:
        records += _key_records(name, second)
    records.append(DNSRecord("spf", name, spf_value(domain)))
    records.append(DNSRecord("dmarc", f"_dmarc.{name}", dmarc_value(domain)))
    return records


def names_to_check(domain: SendingDomain, existing_secret: Mapping[str, Any] | None) -> list[str]:
    """The TXT names the caller should look up before calling ``reconcile_domain``."""
    name = domain.spec.domain
    state = state_from_secret(existing_secret)
    selectors = [domain.spec.dkim.selector] if state is None else [state.active]
    if state is not None and state.next:
        selectors.append(state.next)
    second = state_from_secret(existing_secret, ANN_DKIM_SECOND_STATE)
    if domain.spec.dkim.second_algorithm is not None:
        selectors += ([domain.spec.dkim.selector + SECOND_SELECTOR_SUFFIX] if second is None
                      else [second.active, *([second.next] if second.next else [])])
    return [*(dkim_record_name(s, name) for s in selectors), name, f"_dmarc.{name}"]


Observed = Mapping[str, Sequence[str] | None]
"""TXT lookups: name -> each record's value (its strings joined); None: the lookup failed."""


def _tags(value: str) -> dict[str, str]:
    out = {}
    for part in value.split(";"):
        k, _, v = part.partition("=")
        if k.strip():
            out[k.strip().lower()] = "".join(v.split())
    return out


def dkim_served(record: DNSRecord, observed: Observed) -> bool | None:
    """Whether DNS serves this DKIM key (same ``p=``); None when the lookup failed."""
    answers = observed.get(record.name)
    if answers is None:
        return None
    want = _tags(record.value).get("p")
    return any(_tags(a).get("p") == want for a in answers)


def spf_ok(domain: SendingDomain, observed: Observed) -> tuple[bool | None, str, str]:
    """(verified, reason, message): one SPF record at the domain that has every mechanism of the
    suggested record (``include:``, ``ip4:``, ``ip6:``); a custom ``spf.record`` must be there
    verbatim (spaces normalised)."""
    answers = observed.get(domain.spec.domain)
    if answers is None:
        return None, REASON_LOOKUP_FAILED, f"the TXT lookup of {domain.spec.domain} failed"
    spf = [a for a in answers if a.lower().startswith("v=spf1")]
    if not spf:
        return False, REASON_NOT_FOUND, f"no SPF record (v=spf1) at {domain.spec.domain}"
    if len(spf) > 1:
        return False, REASON_MISMATCH, (f"{len(spf)} SPF records at {domain.spec.domain}; "
                                        "receivers treat that as an error (RFC 7208 4.5)")
    published = spf[0].lower().split()
    if domain.spec.spf.record:
        ok = published == domain.spec.spf.record.lower().split()
        missing = [] if ok else ["the exact record from spec.spf.record"]
    else:
        wanted = spf_value(domain).lower().split()[1:-1]
        missing = [m for m in wanted if m != "mx" and m not in published]
    if missing:
        return False, REASON_MISMATCH, ("the SPF record at " + domain.spec.domain + " lacks "
                                        + ", ".join(missing))
    return True, REASON_VERIFIED, f"SPF record at {domain.spec.domain} authorises the relay"


@dataclass(frozen=True)
class DomainSigning:
    """What the relay needs to sign for this domain. ``pem`` is secret: never log or show.
    ``also``: the second key of a dual-signing domain, once DNS served its record."""

    selector: str
    algorithm: str
    pem: str = field(repr=False)
    also: DomainSigning | None = None


def _signing(state: DKIMState, second: DKIMState | None) -> DomainSigning:
    key = state.active_key
    also = None
    if second is not None and second.published:
        extra = second.active_key
        also = DomainSigning(extra.selector, RELAY_ALGORITHMS[extra.algorithm], extra.pem)
    return DomainSigning(key.selector, RELAY_ALGORITHMS[key.algorithm], key.pem, also)


@dataclass(frozen=True)
class DomainResult:
    secret: dict[str, Any]
    """The desired DKIM key Secret."""
    state: DKIMState
    status: dict[str, Any]
    """The status patch: conditions, observedGeneration, dkim, dnsRecords, relay, and the
    verification times (verifiedTime, recordsMissingSince, disableTime)."""
    events: list[Event]
    enabled: bool
    """Whether the relay may send for this domain: verified (or verification skipped where the
    relay allows it) and the owner of the domain on its relay."""
    next_check: datetime | None
    """When the next reconcile is due for the rotation (interval end, retirement) or for the end
    of a DNS grace period; DNS re-checks with backoff are the caller's."""
    verified: bool = False
    """Verified by DNS (or skipped where allowed), whether or not this claim owns the domain."""
    disable_time: datetime | None = None
    """Set while DNS answers that the DKIM record is gone: when the domain will be disabled."""
    second: DKIMState | None = None
    """The second key's state of a dual-signing domain."""

    @property
    def signing(self) -> DomainSigning:
        return _signing(self.state, self.second)


@dataclass(frozen=True)
class _Verification:
    """The DNS verification of one claim after this reconcile."""

    verified_time: datetime | None
    missing_since: datetime | None
    disable_time: datetime | None
    condition: tuple[bool | str, str, str]
    events: list[Event]


def grace_period(relay: SmtpRelay | None) -> float:
    return (relay.spec.tenancy if relay is not None else TenancySpec()).dns_grace_period


def _verify(domain: SendingDomain, relay: SmtpRelay | None, dkim: tuple[bool | str, str, str],
            now: datetime) -> _Verification:
    """Verification with tolerance: a DKIM record served verifies; a failed lookup changes
    nothing (Unknown); a definite answer that the record is gone disables a verified domain
    only after the relay's ``spec.tenancy.dnsGracePeriod``."""
    prev_verified = verified_since(domain)
    prev_missing = (parse_time(domain.status.get("recordsMissingSince"))
                    if prev_verified is not None else None)
    served, reason, message = dkim
    name = domain.spec.domain
    if served is True:
        events = ([Event("Normal", "DNSRecordsRestored",
                         f"DNS serves the DKIM record of {name} again; the domain stays enabled")]
                  if prev_missing is not None else [])
        return _Verification(prev_verified or now, None, None,
                             (True, REASON_VERIFIED, message), events)
    if served == "Unknown":
        if prev_missing is not None:
            disable = prev_missing + timedelta(seconds=grace_period(relay))
            message += (f"; DNS last answered that the record is gone (since "
                        f"{format_time(prev_missing)}): disabled after {format_time(disable)} "
                        "once DNS answers so again")
            return _Verification(prev_verified, prev_missing, disable,
                                 ("Unknown", reason, message), [])
        if prev_verified is not None:
            message += "; the domain stays enabled until DNS answers that the record is gone"
        return _Verification(prev_verified, None, None, ("Unknown", reason, message), [])
    # A definite answer: the record is not there, or holds another key.
    if prev_verified is None:
        return _Verification(None, None, None, (False, reason, message), [])
    missing = prev_missing or now
    disable = missing + timedelta(seconds=grace_period(relay))
    if now >= disable:
        return _Verification(None, None, None, (False, reason, message), [Event(
            "Warning", "DomainDisabled",
            f"{name} disabled: {message} since {format_time(missing)}, longer than the grace "
            "period (spec.tenancy.dnsGracePeriod of the SmtpRelay); publish the DKIM record "
            "listed in status.dnsRecords to verify it again")])
    events = [] if prev_missing is not None else [Event(
        "Warning", "DNSRecordsMissing",
        f"{message}: {name} stays enabled until {format_time(disable)} and is disabled then "
        "unless DNS serves the record listed in status.dnsRecords again")]
    return _Verification(prev_verified, missing, disable,
                         (False, reason, f"{message}; disabled at {format_time(disable)} "
                          "unless it is published again"), events)


def eligible_claim(domain: SendingDomain, relay: SmtpRelay,
                   namespace_labels: Mapping[str, str] | None) -> bool:
    """Whether a SendingDomain takes part in the election of its domain's owner on ``relay``:
    it names the relay, is not being deleted, its namespace is allowed, and it is verified."""
    return (domain.spec.relay_ref.name == relay.meta.name
            and domain.relay_namespace == relay.meta.namespace
            and not domain.meta.deletion_timestamp
            and namespace_allowed(relay, domain.meta.namespace, namespace_labels)
            and claim_verified(domain, relay, namespace_labels))


def reconcile_domain(
    domain: SendingDomain,
    *,
    relay: SmtpRelay | None,
    namespace_labels: Mapping[str, str] | None,
    existing_secret: Mapping[str, Any] | None,
    observed: Observed | None,
    now: datetime,
    key_factory: KeyFactory = generate_dkim_key,
    lookup_errors: Mapping[str, str] | None = None,
    claims: Sequence[SendingDomain] = (),
    claim_labels: Mapping[str, Mapping[str, str]] | None = None,
) -> DomainResult:
    """Everything the operator does for one SendingDomain, minus the I/O.

    ``observed``: answers for ``names_to_check`` (None: DNS not consulted this time; the
    verification then keeps its last state, Unknown); ``lookup_errors``: name -> why its lookup
    failed (timeout, SERVFAIL, ...), for the conditions; ``claims``: the other SendingDomains
    naming the same relay (with their last status), and ``claim_labels`` the labels of their
    namespaces, to decide which claim owns the domain (``ownership``).
    """
    conflict = secret_conflict(domain, existing_secret)
    if conflict is not None:
        raise DKIMSecretConflict(conflict)
    skip_requested = domain.spec.verification.skip
    skip = skip_requested and skip_allowed(relay, domain.meta.namespace, namespace_labels)
    obs: Observed = observed or {}
    errors = lookup_errors or {}
    state = state_from_secret(existing_secret)
    events: list[Event] = []
    # At most one state change per reconcile: each one deserves its own Event and status.
    next_served = skip
    if state is not None and state.next:
        served = dkim_served(DNSRecord("dkim", dkim_record_name(state.next, domain.spec.domain),
                                       dkim_txt_value(state.keys[state.next].pem)), obs)
        next_served = skip or bool(served)
    state, events = advance(domain, state, next_served=next_served, now=now,
                            key_factory=key_factory)
    second, second_events = _advance_second(domain, existing_secret, obs=obs, skip=skip, now=now,
                                            key_factory=key_factory)
    events += second_events
    records = dns_records(domain, state, second)

    verified: dict[str, bool | None] = {}
    for rec in records:
        if rec.purpose == "dkim":
            verified[rec.name] = dkim_served(rec, obs) if observed is not None else None
    spf_verified, spf_reason, spf_message = (
        spf_ok(domain, obs) if observed is not None
        else (None, REASON_NOT_CHECKED, "DNS not checked yet"))
    if spf_reason == REASON_LOOKUP_FAILED and domain.spec.domain in errors:
        spf_message += f" ({errors[domain.spec.domain]})"
    if observed is not None:
        dmarc_answers = obs.get(f"_dmarc.{domain.spec.domain}")
        verified[f"_dmarc.{domain.spec.domain}"] = (
            None if dmarc_answers is None
            else any(a.lower().startswith("v=dmarc1") for a in dmarc_answers))
    verified[domain.spec.domain] = spf_verified

    active = records[0]
    dkim_ok = verified.get(active.name)
    dkim_cond: tuple[bool | str, str, str]
    if dkim_ok:
        dkim_cond = (True, REASON_VERIFIED, f"DNS serves the DKIM key of selector {state.active}")
    elif observed is None:
        dkim_cond = ("Unknown", REASON_NOT_CHECKED, "DNS not checked yet")
    elif dkim_ok is None:
        why = f" ({errors[active.name]})" if active.name in errors else ""
        dkim_cond = ("Unknown", REASON_LOOKUP_FAILED,
                     f"the TXT lookup of {active.name} failed{why}")
    elif obs.get(active.name):
        dkim_cond = (False, REASON_MISMATCH,
                     f"{active.name} serves a different key than the one in status.dnsRecords")
    else:
        dkim_cond = (False, REASON_NOT_FOUND, f"no DKIM record at {active.name}")
    spf_cond: tuple[bool | str, str, str] = (
        "Unknown" if spf_verified is None else spf_verified, spf_reason, spf_message)

    if skip:
        check = _Verification(None, None, None, (True, REASON_SKIPPED,
                              "DNS verification skipped (spec.verification.skip)"), [])
    else:
        check = _verify(domain, relay, dkim_cond, now)
        events += check.events
    is_verified = skip or check.verified_time is not None
    enabled, ready_reason, ready_message = _readiness(
        domain, relay, namespace_labels, is_verified, dkim_cond, spf_cond, check,
        claims, claim_labels or {})
    gen, conds = domain.meta.generation, domain.status.get("conditions")
    for cond_type, cond in ((DKIM_VERIFIED, dkim_cond), (SPF_VERIFIED, spf_cond),
                            (DNS_VERIFIED, check.condition)):
        conds = set_condition(conds, cond_type, cond[0], cond[1], cond[2], gen, now)
    conds = set_condition(conds, READY, enabled, ready_reason, ready_message, gen, now)
    if observed is not None and not skip:
        for cond_type, (ok, reason, message) in ((DKIM_VERIFIED, dkim_cond),
                                                 (SPF_VERIFIED, spf_cond)):
            before = get_condition(domain.status.get("conditions"), cond_type)
            was = before.get("status") if before is not None else None
            now_text = "True" if ok is True else "False" if ok is False else "Unknown"
            if now_text != was and (was is not None or ok is not False):
                events.append(Event("Normal" if ok is True else "Warning", reason, message))
    before_ready = get_condition(domain.status.get("conditions"), READY)
    if ready_reason in _REFUSALS and (before_ready is None
                                      or before_ready.get("reason") != ready_reason):
        events.append(Event("Warning", ready_reason, ready_message))

    status: dict[str, Any] = {
        "observedGeneration": gen,
        "conditions": conds,
        "domain": domain.spec.domain,
        "relay": f"{domain.relay_namespace}/{domain.spec.relay_ref.name}",
        "dkim": _dkim_status(state, second),
        "dnsRecords": [r.to_status(verified.get(r.name)) for r in records],
    }
    if check.verified_time is not None:
        status["verifiedTime"] = format_time(check.verified_time)
    if check.missing_since is not None:
        status["recordsMissingSince"] = format_time(check.missing_since)
    if check.disable_time is not None:
        status["disableTime"] = format_time(check.disable_time)
    if observed is not None:
        status["lastCheckTime"] = format_time(now)
    elif "lastCheckTime" in domain.status:
        status["lastCheckTime"] = domain.status["lastCheckTime"]
    nxt = _next_check(domain, state)
    if second is not None:
        nxt2 = _next_check(domain, second)
        nxt = nxt2 if nxt is None else nxt if nxt2 is None else min(nxt, nxt2)
    if check.disable_time is not None:
        nxt = min(nxt, check.disable_time) if nxt is not None else check.disable_time
    return DomainResult(secret_manifest(domain, state, second), state, status, events, enabled,
                        nxt, is_verified, check.disable_time, second)


def _advance_second(domain: SendingDomain, existing_secret: Mapping[str, Any] | None, *,
                    obs: Observed, skip: bool, now: datetime,
                    key_factory: KeyFactory) -> tuple[DKIMState | None, list[Event]]:
    """One step of a dual-signing domain's second key: generated (not signing yet), signing once
    DNS serves its record (or verification is skipped), then rotated like the first. A domain
    that stops dual signing drops it (its record is no longer listed)."""
    second = state_from_secret(existing_secret, ANN_DKIM_SECOND_STATE)
    if domain.spec.dkim.second_algorithm is None:
        if second is None:
            return None, []
        return None, [Event("Normal", "DKIMKeyRetired",
                            f"dual signing turned off: retired DKIM selector {second.active}; "
                            "its TXT record can be removed")]
    name = domain.spec.domain
    next_served = skip
    if second is not None and second.next:
        next_served = skip or bool(dkim_served(
            DNSRecord("dkim", dkim_record_name(second.next, name),
                      dkim_txt_value(second.keys[second.next].pem)), obs))
    second, events = advance(domain, second, next_served=next_served, now=now,
                             key_factory=key_factory, second=True)
    if not second.published and (skip or dkim_served(
            DNSRecord("dkim", dkim_record_name(second.active, name),
                      dkim_txt_value(second.active_key.pem)), obs)):
        second = replace(second, published=True)
        events.append(Event("Normal", "DKIMSecondKeySigning",
                            f"DNS serves the {second.active_key.algorithm} key of selector "
                            f"{second.active}: mail is signed with it too"))
    return second, events


_REFUSALS = frozenset({REASON_DOMAIN_CONFLICT, REASON_SKIP_NOT_ALLOWED,
                       REASON_NAMESPACE_NOT_ALLOWED, REASON_RELAY_NOT_FOUND})


def _readiness(  # noqa: PLR0917 - the inputs of one decision
    domain: SendingDomain, relay: SmtpRelay | None, namespace_labels: Mapping[str, str] | None,
    is_verified: bool, dkim: tuple[bool | str, str, str], spf: tuple[bool | str, str, str],
    check: _Verification, claims: Sequence[SendingDomain],
    claim_labels: Mapping[str, Mapping[str, str]],
) -> tuple[bool, str, str]:
    ref = f"{domain.relay_namespace}/{domain.spec.relay_ref.name}"
    if relay is None:
        return False, REASON_RELAY_NOT_FOUND, f"SmtpRelay {ref} does not exist"
    if not namespace_allowed(relay, domain.meta.namespace, namespace_labels):
        return (False, REASON_NAMESPACE_NOT_ALLOWED,
                f"SmtpRelay {ref} does not allow namespace {domain.meta.namespace!r} "
                "(see its spec.allowedNamespaces)")
    if domain.spec.verification.skip and not skip_allowed(relay, domain.meta.namespace,
                                                          namespace_labels):
        return False, REASON_SKIP_NOT_ALLOWED, skip_refusal(relay, domain)
    if not is_verified:
        return False, "DKIMNotVerified", dkim[2]
    others = [c for c in claims if c.meta.key != domain.meta.key
              and c.spec.domain == domain.spec.domain
              and eligible_claim(c, relay, claim_labels.get(c.meta.namespace))]
    owner = elect_owners(relay, [domain, *others], lambda _c: True)[domain.spec.domain]
    if owner is not domain:
        return False, REASON_DOMAIN_CONFLICT, conflict_message(domain, owner, relay)
    if domain.spec.verification.skip:
        return True, REASON_SKIPPED, "DNS verification skipped (spec.verification.skip)"
    message = f"DKIM verified; enabled on SmtpRelay {ref}"
    if check.disable_time is not None:
        message = (f"enabled on SmtpRelay {ref} until {format_time(check.disable_time)}: "
                   f"{check.condition[2]}")
    elif dkim[0] is not True:
        message += f" ({dkim[2]})"
    if spf[0] is not True:
        message += f"; SPF (shown, not enforced): {spf[2]}"
    return True, REASON_VERIFIED, message


def _dkim_status(state: DKIMState, second: DKIMState | None = None) -> dict[str, Any]:
    out = _key_status(state)
    if second is not None:
        out["second"] = {**_key_status(second), "signing": second.published}
    return out


def _key_status(state: DKIMState) -> dict[str, Any]:
    out: dict[str, Any] = {
        "phase": state.phase,
        "activeSelector": state.active,
        "algorithm": state.active_key.algorithm,
        "keyCreatedAt": format_time(state.active_key.created_at),
        "phaseSince": format_time(state.phase_since),
    }
    if state.next:
        out["nextSelector"] = state.next
    if state.retiring:
        out["retiringSelector"] = state.retiring
    if state.retire_at:
        out["retireAt"] = format_time(state.retire_at)
    return out


def _next_check(domain: SendingDomain, state: DKIMState) -> datetime | None:
    if state.phase == "Switched":
        return state.retire_at
    interval = domain.spec.dkim.rotation_interval
    if state.phase == "Stable" and interval is not None:
        return state.active_key.created_at + timedelta(seconds=interval)
    return None


def unverified_reason(domain: SendingDomain) -> str:
    """The reason a render gives for leaving out an unverified domain: its Ready reason."""
    ready = get_condition(domain.status.get("conditions"), READY)
    if ready is not None and ready.get("status") != "True" and ready.get("reason"):
        return str(ready["reason"])
    return "NotVerified"


def signing_from_secret(secret: Mapping[str, Any] | None) -> DomainSigning | None:
    """The active signing key from the DKIM Secret, for the relay render (None when there is no
    usable key; the domain's own reconcile reports an unreadable Secret)."""
    try:
        state = state_from_secret(secret)
        second = state_from_secret(secret, ANN_DKIM_SECOND_STATE)
    except DKIMSecretUnreadable:
        return None
    if state is None:
        return None
    return _signing(state, second)


def random_key_factory(random: RandomBytes = os.urandom) -> KeyFactory:
    """A KeyFactory whose Ed25519 keys come from ``random`` (RSA keys cannot)."""
    return lambda algorithm: generate_dkim_key(algorithm, random)
