"""Publishing a SendingDomain's records through external-dns, pure.

Where external-dns runs with its CRD source (``--source=crd``), a ``DNSEndpoint``
(``externaldns.k8s.io/v1alpha1``) is a list of records it writes into the DNS zones it manages.
A SendingDomain with ``spec.dnsEndpoint.enabled`` (or the operator's ``--dns-endpoints``
default) gets one, ``<name>-dns`` in its namespace, owned by it (deleted with it), listing the
records of ``status.dnsRecords`` that ``spec.dnsEndpoint.records`` selects: every DKIM key
record (active, next, retiring: a rotation goes on by itself), the SPF and DMARC suggestions.

Publishing is as strong as skipping verification — external-dns writes whatever name it is
given in the zones it manages, so whoever may publish can prove control of any domain there.
It therefore takes effect only in the relay's own namespace and in the namespaces the relay's
``spec.tenancy.dnsPublishNamespaces`` selects, and only for a claim the relay has not refused
(a claim in ``DomainConflict`` publishes nothing: another SendingDomain owns the domain).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .conditions import READY, get_condition
from .domain import LABEL_DOMAIN, split_txt
from .models import SendingDomain, SmtpRelay, owner_reference
from .ownership import REASON_DOMAIN_CONFLICT, REASON_SKIP_NOT_ALLOWED, selects

GROUP = "externaldns.k8s.io"
API_VERSION = f"{GROUP}/v1alpha1"
GROUP_VERSION = API_VERSION
PLURAL = "dnsendpoints"
KIND = "DNSEndpoint"

DNS_PUBLISHED = "DNSPublished"
REASON_PUBLISHED = "Published"
REASON_CRD_MISSING = "DNSEndpointCRDMissing"
REASON_NOT_ALLOWED = "PublishNotAllowed"
REASON_REFUSED = "ClaimRefused"

_REFUSED = frozenset({REASON_DOMAIN_CONFLICT, REASON_SKIP_NOT_ALLOWED, "NamespaceNotAllowed",
                      "RelayNotFound"})


def endpoint_name(domain: SendingDomain) -> str:
    return f"{domain.meta.name}-dns"


def requested(domain: SendingDomain, default: bool) -> bool:
    """Whether the SendingDomain asks for publication (its own setting, else the default)."""
    enabled = domain.spec.dns_endpoint.enabled
    return default if enabled is None else enabled


def publish_allowed(relay: SmtpRelay | None, namespace: str,
                    labels: Mapping[str, str] | None) -> bool:
    if relay is None:
        return False
    if namespace == relay.meta.namespace:
        return True
    return selects(relay.spec.tenancy.dns_publish_namespaces, namespace, labels)


@dataclass(frozen=True)
class Publication:
    """What to do: write `manifest` (None: have no DNSEndpoint), and the ``DNSPublished``
    condition (None: not requested, no condition)."""

    manifest: dict[str, Any] | None
    condition: tuple[bool, str, str] | None


def _target(value: str, split: bool) -> str:
    if not split or len(value) <= 255:
        return value
    return " ".join('"' + part.replace("\\", "\\\\").replace('"', '\\"') + '"'
                    for part in split_txt(value))


def manifest(domain: SendingDomain, records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The DNSEndpoint listing `records` (entries of ``status.dnsRecords``) that the spec
    selects; one endpoint per name and type."""
    spec = domain.spec.dns_endpoint
    endpoints: dict[tuple[str, str], dict[str, Any]] = {}
    for record in records:
        if record.get("purpose") not in spec.records:
            continue
        key = (str(record["name"]), str(record.get("type") or "TXT"))
        target = _target(str(record["value"]), spec.split_txt and key[1] == "TXT")
        entry = endpoints.setdefault(key, {"dnsName": key[0], "recordType": key[1],
                                           "targets": []})
        if target not in entry["targets"]:
            entry["targets"].append(target)
        if spec.ttl is not None:
            entry["recordTTL"] = spec.ttl
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": endpoint_name(domain),
            "namespace": domain.meta.namespace,
            "labels": {**spec.labels, LABEL_DOMAIN: domain.meta.name,
                       "app.kubernetes.io/managed-by": "mailplane-operator"},
            "ownerReferences": [owner_reference("SendingDomain", domain.meta)],
        },
        "spec": {"endpoints": [endpoints[k] for k in sorted(endpoints)]},
    }


def publication(domain: SendingDomain, *, relay: SmtpRelay | None,
                namespace_labels: Mapping[str, str] | None, status: Mapping[str, Any],
                default: bool, crd_served: bool) -> Publication:
    """The DNSEndpoint this SendingDomain should have after a reconcile whose status patch is
    `status` (its ``dnsRecords`` and ``Ready`` condition)."""
    if not requested(domain, default):
        return Publication(None, None)
    ready = get_condition(status.get("conditions"), READY) or {}
    if relay is None or ready.get("reason") in _REFUSED:
        return Publication(None, (False, REASON_REFUSED, (
            f"nothing published while the relay refuses this SendingDomain "
            f"({ready.get('reason') or 'RelayNotFound'}: see the Ready condition)")))
    if not publish_allowed(relay, domain.meta.namespace, namespace_labels):
        return Publication(None, (False, REASON_NOT_ALLOWED, (
            f"publishing DNS records is not allowed in namespace {domain.meta.namespace!r}: "
            f"publish the records listed in status.dnsRecords yourself, or ask the owners of "
            f"SmtpRelay {relay.meta.key} to select this namespace in "
            "spec.tenancy.dnsPublishNamespaces")))
    if not crd_served:
        return Publication(None, (False, REASON_CRD_MISSING, (
            f"the cluster does not serve {PLURAL}.{GROUP} (external-dns's "
            "CRD); install it (and run external-dns with --source=crd), or publish the "
            "records listed in status.dnsRecords yourself")))
    wanted = manifest(domain, list(status.get("dnsRecords") or []))
    count = len(wanted["spec"]["endpoints"])
    return Publication(wanted, (True, REASON_PUBLISHED, (
        f"DNSEndpoint {endpoint_name(domain)} lists {count} record(s) for external-dns")))
