"""Who owns a sending domain on a relay, and who may send as it: the tenancy decisions, pure.

- **Ownership.** Several SendingDomains (claims) may name the same domain on one relay; exactly
  one owns it: the earliest *verified* claim (``metadata.creationTimestamp``; on a tie the relay's
  own namespace first, then ``namespace/name``). Only the owner's DKIM key is rendered; the others
  are refused with ``DomainConflict`` naming the owner. A claim that is not verified owns nothing,
  so an unverified claim can never displace a verified one, and a claim created later never
  displaces an earlier one, whatever its namespace is called. When the owner is deleted or stops
  being verified, the next claim in that order owns the domain at the next render.
- **Grants.** Credentials in the owner's namespace may send as the domain; credentials in any other
  namespace only when the owner's ``spec.allowedNamespaces`` selects their namespace (absent:
  none). The relay's own namespace is granted nothing implicitly either.
- **Skipping verification** takes effect only in the relay's own namespace and in the namespaces
  the SmtpRelay's ``spec.tenancy.verificationSkipNamespaces`` selects.
- **Verified** means: DNS served the claim's DKIM key (``status.verifiedTime`` on the
  SendingDomain, written only by the operator), or verification is skipped where allowed.

Nothing here does I/O; the callers pass namespace labels read from the API.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

from .conditions import READY, get_condition, parse_time
from .models import LabelSelector, SendingDomain, SmtpRelay

REASON_DOMAIN_CONFLICT = "DomainConflict"
REASON_SENDER_NOT_GRANTED = "SenderNotGranted"
REASON_SKIP_NOT_ALLOWED = "VerificationSkipNotAllowed"

NAME_LABEL = "kubernetes.io/metadata.name"
_LATEST = datetime.max.replace(tzinfo=UTC)


@dataclass(frozen=True)
class DomainOwner:
    """The SendingDomain that owns a domain on a relay, as far as grants need it."""

    domain: str
    namespace: str
    name: str
    allowed_namespaces: LabelSelector | None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @classmethod
    def of(cls, claim: SendingDomain) -> DomainOwner:
        return cls(claim.spec.domain, claim.meta.namespace, claim.meta.name,
                   claim.spec.allowed_namespaces)


def selects(selector: LabelSelector | None, namespace: str,
            labels: Mapping[str, str] | None) -> bool:
    """Whether a namespace selector (absent: nothing) selects this namespace. The API server sets
    ``kubernetes.io/metadata.name`` on every namespace; it is set here too, so that a selector on
    the name works whatever the caller read."""
    if selector is None:
        return False
    full = dict(labels or {})
    full.setdefault(NAME_LABEL, namespace)
    return selector.matches(full)


def skip_allowed(relay: SmtpRelay | None, namespace: str,
                 labels: Mapping[str, str] | None) -> bool:
    """Whether ``verification.skip`` takes effect for a SendingDomain in ``namespace``."""
    if relay is None:
        return False
    if namespace == relay.meta.namespace:
        return True
    return selects(relay.spec.tenancy.verification_skip_namespaces, namespace, labels)


def skip_refusal(relay: SmtpRelay, domain: SendingDomain) -> str:
    return (f"spec.verification.skip is not allowed in namespace {domain.meta.namespace!r}: "
            f"skipping DNS verification is the platform's decision; remove "
            f"spec.verification.skip and publish the records listed in status.dnsRecords, or "
            f"ask the owners of namespace {relay.meta.namespace!r} to select this namespace in "
            f"spec.tenancy.verificationSkipNamespaces of SmtpRelay {relay.meta.key}")


def verified_since(domain: SendingDomain) -> datetime | None:
    """When DNS verification of this claim succeeded (and still holds), from its status. A
    status written before ``verifiedTime`` existed counts by its Ready condition."""
    status = domain.status or {}
    if status.get("domain") != domain.spec.domain:
        return None  # verified for another domain name: spec.domain was edited since
    if "verifiedTime" in status:
        return parse_time(status.get("verifiedTime"))
    ready = get_condition(status.get("conditions"), READY)
    if ready is not None and ready.get("status") == "True" and ready.get("reason") == "Verified":
        return parse_time(ready.get("lastTransitionTime")) or datetime.fromtimestamp(0, UTC)
    return None


def claim_verified(domain: SendingDomain, relay: SmtpRelay,
                   labels: Mapping[str, str] | None) -> bool:
    """Whether this claim may own its domain: verified in DNS, or skipping where allowed."""
    if domain.spec.verification.skip:
        return skip_allowed(relay, domain.meta.namespace, labels)
    return verified_since(domain) is not None


def claim_order(domain: SendingDomain, relay: SmtpRelay) -> tuple[datetime, int, str, str]:
    """Earlier sorts first: creation time, the relay's namespace on a tie, then namespace/name.
    A claim without a creation time (never from a real API server) sorts last."""
    return (domain.meta.creation_timestamp or _LATEST,
            0 if domain.meta.namespace == relay.meta.namespace else 1,
            domain.meta.namespace, domain.meta.name)


def elect_owners(relay: SmtpRelay, claims: Iterable[SendingDomain],
                 verified: Callable[[SendingDomain], bool]) -> dict[str, SendingDomain]:
    """domain name -> the claim that owns it, among ``claims`` (already filtered to this relay,
    allowed namespaces and not being deleted) for which ``verified`` holds."""
    owners: dict[str, SendingDomain] = {}
    for claim in sorted(claims, key=lambda c: claim_order(c, relay)):
        if claim.spec.domain not in owners and verified(claim):
            owners[claim.spec.domain] = claim
    return owners


def conflict_message(claim: SendingDomain, owner: SendingDomain, relay: SmtpRelay) -> str:
    if owner.meta.namespace == claim.meta.namespace:
        return (f"{claim.spec.domain} on SmtpRelay {relay.meta.key} belongs to SendingDomain "
                f"{owner.meta.key}, the earliest verified claim; this claim is not used (its key "
                "is not rendered): delete it")
    return (f"{claim.spec.domain} on SmtpRelay {relay.meta.key} belongs to SendingDomain "
            f"{owner.meta.key}, the earliest verified claim; this claim is not used (its key is "
            f"not rendered). To send as {claim.spec.domain} from namespace "
            f"{claim.meta.namespace!r}, delete this SendingDomain and ask the owners of "
            f"namespace {owner.meta.namespace!r} to select it in spec.allowedNamespaces of "
            f"SendingDomain {owner.meta.key}")


def may_use(owner: DomainOwner, namespace: str, labels: Mapping[str, str] | None) -> bool:
    """Whether credentials in ``namespace`` may send as the owner's domain."""
    return namespace == owner.namespace or selects(owner.allowed_namespaces, namespace, labels)


def grant_refusal(owners: Mapping[str, DomainOwner], senders: Iterable[str], namespace: str,
                  labels: Mapping[str, str] | None) -> str | None:
    """Why a credential in ``namespace`` may not use these senders (domains or addresses whose
    domains are all attached, i.e. in ``owners``), or None when every one is granted."""
    refused: dict[str, DomainOwner] = {}
    for sender in senders:
        domain = sender.rpartition("@")[2]
        owner = owners.get(domain)
        if owner is not None and not may_use(owner, namespace, labels):
            refused[domain] = owner
    if not refused:
        return None
    parts = [f"{d} belongs to SendingDomain {o.key}, which does not grant namespace "
             f"{namespace!r} (ask the owners of namespace {o.namespace!r} to select it in "
             f"spec.allowedNamespaces of SendingDomain {o.key})"
             for d, o in sorted(refused.items())]
    return "; ".join(parts)
