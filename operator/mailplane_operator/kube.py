"""A small asynchronous Kubernetes API client for the operator's own writes.

kopf talks to the API through its own client for watching and for patching the resources it
handles; everything else the operator writes (children, config Secrets, application Secrets,
status from background tasks) goes through `KubeClient`. Both are configured from one
`Connection`, built once by `load_connection` (in-cluster inside a pod, else the kubeconfig).

Writes are "apply by get, then create or merge-patch" with a three-way diff, as client-side
`kubectl apply` does: the shape of what was applied last (field names and list digests, never a
value) is kept in the object's ``mailplane.io/applied-fields`` annotation, so a field dropped from
the manifest is removed (merge-patch null) while fields set by others (another controller, a
mutating webhook) stay. A write is skipped when the object already holds what we want, so an
idempotent reconcile makes no API writes at all.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp

from .reconcile.models import GROUP, VERSION

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")


class Resource(NamedTuple):
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    def path(self, namespace: str | None = None, name: str | None = None,
             subresource: str | None = None) -> str:
        base = f"/apis/{self.group}/{self.version}" if self.group else f"/api/{self.version}"
        parts = [base]
        if self.namespaced and namespace:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name:
            parts.append(name)
        if subresource:
            parts.append(subresource)
        return "/".join(parts)


SMTP_RELAYS = Resource(GROUP, VERSION, "smtprelays", "SmtpRelay")
SENDING_DOMAINS = Resource(GROUP, VERSION, "sendingdomains", "SendingDomain")
SMTP_CREDENTIALS = Resource(GROUP, VERSION, "smtpcredentials", "SmtpCredential")
RETENTION_POLICIES = Resource(GROUP, VERSION, "retentionpolicies", "RetentionPolicy")
SECRETS = Resource("", "v1", "secrets", "Secret")
SERVICES = Resource("", "v1", "services", "Service")
EVENTS = Resource("", "v1", "events", "Event")
NAMESPACES = Resource("", "v1", "namespaces", "Namespace", namespaced=False)
STATEFULSETS = Resource("apps", "v1", "statefulsets", "StatefulSet")
PDBS = Resource("policy", "v1", "poddisruptionbudgets", "PodDisruptionBudget")
SERVICE_MONITORS = Resource("monitoring.coreos.com", "v1", "servicemonitors", "ServiceMonitor")
PVCS = Resource("", "v1", "persistentvolumeclaims", "PersistentVolumeClaim")
LEASES = Resource("coordination.k8s.io", "v1", "leases", "Lease")
HPAS = Resource("autoscaling", "v2", "horizontalpodautoscalers", "HorizontalPodAutoscaler")
NETWORK_POLICIES = Resource("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy")
PODS = Resource("", "v1", "pods", "Pod")
DNS_ENDPOINTS = Resource("externaldns.k8s.io", "v1alpha1", "dnsendpoints", "DNSEndpoint")

BY_KIND: dict[tuple[str, str], Resource] = {
    (r.api_version, r.kind): r
    for r in (SMTP_RELAYS, SENDING_DOMAINS, SMTP_CREDENTIALS, RETENTION_POLICIES, SECRETS,
              SERVICES, EVENTS, NAMESPACES, STATEFULSETS, PDBS, SERVICE_MONITORS, PVCS, LEASES,
              HPAS, NETWORK_POLICIES, DNS_ENDPOINTS, PODS)
}


def resource_of(manifest: Mapping[str, Any]) -> Resource:
    key = (str(manifest.get("apiVersion")), str(manifest.get("kind")))
    try:
        return BY_KIND[key]
    except KeyError:
        raise ValueError(f"the operator does not manage {key[1]} ({key[0]})") from None


def labels_match(obj: Mapping[str, Any], labels: Mapping[str, str] | None) -> bool:
    if not labels:
        return True
    have = (obj.get("metadata") or {}).get("labels") or {}
    return all(have.get(k) == v for k, v in labels.items())


class ApiError(Exception):
    """A failed API call. `status` is the HTTP status; the message is the API's, never a body
    we sent (those may hold Secret data)."""

    def __init__(self, status: int, reason: str, message: str, *, method: str, path: str) -> None:
        super().__init__(f"{method} {path}: {status} {reason}: {message}")
        self.status = status
        self.reason = reason

    @property
    def temporary(self) -> bool:
        return self.status in (409, 429) or self.status >= 500


class NotOwnedError(ApiError):
    """An object the operator was asked to write exists and is controlled by someone else."""

    @property
    def temporary(self) -> bool:
        return True  # the caller's next reconcile sees the owner and reports it


def controller_uid(obj: Mapping[str, Any]) -> str | None:
    """The uid of the object's controller ownerReference, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if isinstance(ref, Mapping) and ref.get("controller") is True:
            uid = ref.get("uid")
            return str(uid) if uid else None
    return None


@dataclass(frozen=True)
class Connection:
    """Where the API server is and how to authenticate; shared by kopf and `KubeClient`."""

    server: str
    ca_path: str | None = None
    insecure: bool = False
    token: str | None = field(default=None, repr=False)
    token_path: str | None = None  # re-read when it changes: projected tokens rotate
    certificate_path: str | None = None
    private_key_path: str | None = None
    default_namespace: str | None = None

    def current_token(self) -> str | None:
        if self.token_path:
            try:
                return Path(self.token_path).read_text().strip()
            except OSError:
                return self.token
        return self.token

    def ssl_context(self) -> ssl.SSLContext | bool:
        if not self.server.startswith("https"):
            return False
        if self.insecure:
            return False
        ctx = ssl.create_default_context(cafile=self.ca_path)
        if self.certificate_path and self.private_key_path:
            ctx.load_cert_chain(self.certificate_path, self.private_key_path)
        return ctx


def load_connection(kubeconfig: str | None = None, context: str | None = None) -> Connection:
    """In-cluster settings inside a pod (service account), else the current kubeconfig."""
    from kubernetes import client as k8s_client  # noqa: PLC0415 - only the CLI needs it
    from kubernetes import config as k8s_config  # noqa: PLC0415

    cfg = k8s_client.Configuration()
    token_path: str | None = None
    in_cluster = kubeconfig is None and bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and (
        SERVICE_ACCOUNT_DIR / "token").exists()
    if in_cluster:
        k8s_config.load_incluster_config(client_configuration=cfg)  # type: ignore[no-untyped-call]
        token_path = str(SERVICE_ACCOUNT_DIR / "token")
    else:
        k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
            config_file=kubeconfig, context=context, client_configuration=cfg)
    auth = (cfg.api_key or {}).get("authorization") or (cfg.api_key or {}).get("BearerToken")
    token = None
    if auth:
        token = auth.split(" ", 1)[1] if auth.lower().startswith("bearer ") else auth
    namespace = None
    ns_file = SERVICE_ACCOUNT_DIR / "namespace"
    if in_cluster and ns_file.exists():
        namespace = ns_file.read_text().strip()
    return Connection(
        server=str(cfg.host).rstrip("/"),
        ca_path=cfg.ssl_ca_cert or None,
        insecure=not cfg.verify_ssl,
        token=token,
        token_path=token_path,
        certificate_path=cfg.cert_file or None,
        private_key_path=cfg.key_file or None,
        default_namespace=namespace,
    )


@dataclass
class ApplyStats:
    """Counts of what `apply` did, for tests, the benchmark and debug logs."""

    created: int = 0
    patched: int = 0
    unchanged: int = 0
    deleted: int = 0


def _secret_to_data(manifest: dict[str, Any]) -> dict[str, Any]:
    """stringData is write-only in Kubernetes: store base64 `data` so a re-read compares."""
    if manifest.get("kind") != "Secret" or "stringData" not in manifest:
        return manifest
    out = dict(manifest)
    data = dict(out.get("data") or {})
    for key, value in (out.pop("stringData") or {}).items():
        data[key] = base64.b64encode(str(value).encode()).decode()
    out["data"] = data
    return out


_QUANTITY = re.compile(
    r"^([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?$")
_QUANTITY_UNITS: dict[str | None, Decimal] = {
    None: Decimal(1), "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": Decimal(10**3), "M": Decimal(10**6), "G": Decimal(10**9), "T": Decimal(10**12),
    "P": Decimal(10**15), "E": Decimal(10**18), "Ki": Decimal(2**10), "Mi": Decimal(2**20),
    "Gi": Decimal(2**30), "Ti": Decimal(2**40), "Pi": Decimal(2**50), "Ei": Decimal(2**60),
}
# Where the API server rewrites quantities into its canonical form (1.5Gi -> 1536Mi, 1 -> 1000m
# or back): compared by value there, or every render would patch the StatefulSet again.
_QUANTITY_KEYS = frozenset({"requests", "limits", "storage"})


def _quantity(value: Any) -> Decimal | None:
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    match = _QUANTITY.match(str(value))
    if match is None:
        return None
    try:
        return Decimal(match.group(1)) * _QUANTITY_UNITS[match.group(2)]
    except InvalidOperation:
        return None


def quantity_value(value: Any) -> Decimal | None:
    """A resource quantity ("10Gi", "1536Mi", "500m") as a number; None if it is not one."""
    return _quantity(value)


def _same_quantity(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and set(have) >= set(want) and all(
            _same_quantity(have.get(k), v) for k, v in want.items())
    a, b = _quantity(have), _quantity(want)
    return a is not None and a == b


def _contains(have: Any, want: Any) -> bool:
    """Whether `have` already holds everything `want` sets (dicts compared recursively;
    resource quantities by value)."""
    if isinstance(want, Mapping):
        if not isinstance(have, Mapping):
            return False
        return all(
            _contains(have.get(k), v)
            or (k in _QUANTITY_KEYS and _same_quantity(have.get(k), v))
            for k, v in want.items())
    if isinstance(want, list):
        # Element-wise, so that defaults the API server fills into list items do not count.
        return isinstance(have, list) and len(have) == len(want) and all(
            _contains(h, w) for h, w in zip(have, want, strict=True))
    return bool(have == want)


_MANAGED_TOP = ("spec", "data", "type", "immutable")

STATEFULSET_MUTABLE_SPEC = frozenset({
    "replicas", "ordinals", "template", "updateStrategy", "revisionHistoryLimit",
    "persistentVolumeClaimRetentionPolicy", "minReadySeconds",
})
"""The only StatefulSet spec fields the API server lets an update change."""

ANN_APPLIED = "mailplane.io/applied-fields"
"""The shape of what the operator last applied to an object (field names, and a digest per
list; never a value), so that the next apply removes what is no longer wanted."""


def _digest(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
    return "#" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _shape(value: Any) -> Any:
    """Field names of maps (recursively), a digest of each list, "" for each scalar."""
    if isinstance(value, Mapping):
        return {str(k): _shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return _digest(value)
    return ""


def applied_fields(desired: Mapping[str, Any]) -> dict[str, Any]:
    """The record kept in `ANN_APPLIED`: the shape of the managed parts of `desired` (a
    Secret's data is replaced as a whole and not recorded)."""
    meta = {k: v for k, v in (desired.get("metadata") or {}).items()
            if k not in ("name", "namespace", *_SERVER_META)}
    annotations = {k: v for k, v in (meta.get("annotations") or {}).items() if k != ANN_APPLIED}
    if annotations:
        meta["annotations"] = annotations
    else:
        meta.pop("annotations", None)
    record: dict[str, Any] = {"metadata": _shape(meta)}
    for key in _MANAGED_TOP:
        if key in desired and not (key == "data" and desired.get("kind") == "Secret"):
            record[key] = _shape(desired[key])
    return record


def _same(have: Any, want: Any, key: str | None, parent: str | None) -> bool:
    if _contains(have, want):
        return True
    quantity = key in _QUANTITY_KEYS or parent in _QUANTITY_KEYS
    return quantity and _same_quantity(have, want)


def merge_patch(have: Any, want: Mapping[str, Any], applied: Any,
                parent: str | None = None) -> dict[str, Any]:
    """The JSON merge patch that makes `have` hold `want`: fields that differ are set (drift
    is corrected), fields the last apply set (`applied`, a shape) that `want` no longer has are
    removed (null), fields set by others are left alone. A list is replaced as a whole when
    the object's differs from it or when it changed since the last apply."""
    have = have if isinstance(have, Mapping) else {}
    applied = applied if isinstance(applied, Mapping) else {}
    out: dict[str, Any] = {}
    for key, value in want.items():
        current = have.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            sub = merge_patch(current, value, applied.get(key), key)
            if sub:
                out[key] = sub
        elif isinstance(value, list):
            last = applied.get(key)
            if not _contains(current, value) or (isinstance(last, str) and last
                                                 and last != _digest(value)):
                out[key] = value
        elif key not in have or not _same(current, value, key, parent):
            out[key] = value
    for key in applied:
        if key not in want and key in have:
            out[key] = None
    return out
_SERVER_META = ("uid", "resourceVersion", "generation", "creationTimestamp", "managedFields",
                "deletionTimestamp", "deletionGracePeriodSeconds", "selfLink")


class KubeClient:
    """Get, list, create, merge-patch, delete and apply, with one connection pool."""

    def __init__(self, connection: Connection, *, timeout: float = 30.0,
                 concurrency: int = 32) -> None:
        self.connection = connection
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._limit = asyncio.Semaphore(concurrency)
        self.stats = ApplyStats()
        self._discovered: dict[str, tuple[float, bool]] = {}
        self.discovery_ttl = 300.0
        self._token_checked = 0.0
        self._token: str | None = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    def _headers(self, content_type: str | None) -> dict[str, str]:
        now = time.monotonic()
        if self._token is None or now - self._token_checked > 60:
            self._token = self.connection.current_token()
            self._token_checked = now
        headers = {"Accept": "application/json", "User-Agent": "mailplane-operator"}
        if self._token:
            headers["Authorization"] = f"Bearer {self._token}"
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _ensure_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=self.connection.ssl_context(), limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    def _ensure_watch_session(self) -> aiohttp.ClientSession:
        """Watches hold their connection for minutes: their own pool, so that they never take
        the connections requests need."""
        if self._watch_session is None:
            connector = aiohttp.TCPConnector(ssl=self.connection.ssl_context(), limit=0)
            self._watch_session = aiohttp.ClientSession(connector=connector)
        return self._watch_session

    async def _call(self, method: str, path: str, *, body: Any = None,
                    content_type: str | None = None,
                    params: Mapping[str, str] | None = None) -> Any:
        session = self._ensure_session()
        payload = None if body is None else json.dumps(body).encode()
        async with self._limit, session.request(
            method, self.connection.server + path, data=payload, params=params,
            headers=self._headers(content_type if body is not None else None),
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
                if resp.status == 401:
                    self._token = None  # re-read a rotated service account token next time
                try:
                    status = json.loads(text)
                    reason, message = status.get("reason", ""), status.get("message", "")
                except ValueError:
                    reason, message = resp.reason or "", text[:200]
                raise ApiError(resp.status, str(reason), str(message)[:500],
                               method=method, path=path)
            return json.loads(text) if text else None

    async def get(self, resource: Resource, namespace: str | None,
                  name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = await self._call("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def list(self, resource: Resource, namespace: str | None = None,
                   labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        params = {"labelSelector": ",".join(f"{k}={v}" for k, v in labels.items())} \
            if labels else None
        result = await self._call("GET", resource.path(namespace), params=params)
        # The selector is also applied here: the test emulator ignores it.
        return [i for i in (result or {}).get("items", []) if labels_match(i, labels)]

    async def create(self, resource: Resource, manifest: Mapping[str, Any]) -> dict[str, Any]:
        namespace = (manifest.get("metadata") or {}).get("namespace")
        result: dict[str, Any] = await self._call(
            "POST", resource.path(namespace), body=dict(manifest),
            content_type="application/json")
        return result

    async def patch(self, resource: Resource, namespace: str | None, name: str,
                    patch: Mapping[str, Any], *, status: bool = False) -> dict[str, Any] | None:
        """Merge-patch; None if the object is gone."""
        try:
            result: dict[str, Any] = await self._call(
                "PATCH", resource.path(namespace, name, "status" if status else None),
                body=dict(patch), content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    async def delete(self, resource: Resource, namespace: str | None, name: str, *,
                     propagation: str | None = None, uid: str | None = None) -> bool:
        """Delete; False if already gone. `propagation`: "Orphan" keeps the dependents (a
        StatefulSet's pods), "Background"/"Foreground" delete them. `uid`: only that object
        (409 if the name now belongs to another)."""
        options: dict[str, Any] = {}
        if propagation:
            options["propagationPolicy"] = propagation
        if uid:
            options["preconditions"] = {"uid": uid}
        try:
            await self._call("DELETE", resource.path(namespace, name),
                             body={"kind": "DeleteOptions", "apiVersion": "v1", **options}
                             if options else None, content_type="application/json")
        except ApiError as exc:
            if exc.status == 404:
                return False
            raise
        self.stats.deleted += 1
        return True

    async def apply(self, manifest: Mapping[str, Any], *,
                    owner_uid: str | None = None) -> tuple[str, dict[str, Any]]:
        """Make the object hold `manifest`: create it, merge-patch it, or leave it alone.

        Returns ("created" | "patched" | "unchanged" | "replaced" | "pending", the object).

        A StatefulSet whose wanted change touches a field the API server keeps immutable
        (`spec.volumeClaimTemplates`, `selector`, `serviceName`, `podManagementPolicy`, ...) is
        deleted with propagationPolicy Orphan, so that its pods and volumes stay, and the
        next apply creates it anew ("replaced"; the new StatefulSet adopts the pods). While a
        StatefulSet is being deleted nothing is written ("pending").

        Fields that differ from the
        manifest are set again (drift is corrected); fields an earlier apply set that the
        manifest no longer has are removed (the shape of each apply is kept in the object's
        `ANN_APPLIED` annotation); fields others set are left as they are. A Secret's `data` is
        replaced as a whole (it is ours entirely).

        `owner_uid`: an existing object is changed only when its controller ownerReference has
        this uid (else `NotOwnedError`, nothing written), and the patch carries the
        resourceVersion that was checked, so an object replaced in between gets a 409 instead
        of being overwritten.
        """
        desired = _secret_to_data(dict(manifest))
        meta = dict(desired.get("metadata") or {})
        meta["annotations"] = {**(meta.get("annotations") or {}), ANN_APPLIED: json.dumps(
            applied_fields(desired), sort_keys=True, separators=(",", ":"))}
        desired["metadata"] = meta
        resource = resource_of(desired)
        namespace, name = meta.get("namespace"), meta["name"]
        current = await self.get(resource, namespace, name)
        if current is None:
            try:
                created = await self.create(resource, desired)
            except ApiError as exc:
                if exc.status != 409:
                    raise
                current = await self.get(resource, namespace, name)
                if current is None:
                    raise
            else:
                self.stats.created += 1
                return "created", created
        if owner_uid is not None and controller_uid(current) != owner_uid:
            raise NotOwnedError(403, "NotOwned", "exists and is not ours; left untouched",
                                method="PATCH", path=resource.path(namespace, name))
        patch = self._diff(current, desired)
        if not patch:
            self.stats.unchanged += 1
            return "unchanged", current
        if resource == STATEFULSETS:
            current_meta = current.get("metadata") or {}
            if current_meta.get("deletionTimestamp"):
                return "pending", current
            if set(patch.get("spec") or {}) - STATEFULSET_MUTABLE_SPEC:
                await self.delete(resource, namespace, name, propagation="Orphan",
                                  uid=current_meta.get("uid"))
                return "replaced", current
        if owner_uid is not None:
            patch.setdefault("metadata", {})["resourceVersion"] = (
                (current.get("metadata") or {}).get("resourceVersion"))
        patched = await self.patch(resource, namespace, name, patch)
        if patched is None:  # deleted in between: the next reconcile creates it
            raise ApiError(404, "NotFound", "deleted while being updated",
                           method="PATCH", path=resource.path(namespace, name))
        self.stats.patched += 1
        return "patched", patched

    @staticmethod
    def _diff(current: Mapping[str, Any], desired: Mapping[str, Any]) -> dict[str, Any]:
        """The merge patch from `current` to `desired` (three-way, with the shape recorded by
        the last apply in `ANN_APPLIED`); empty when nothing needs writing."""
        try:
            applied = json.loads(((current.get("metadata") or {}).get("annotations") or {})
                                 .get(ANN_APPLIED) or "{}")
        except (ValueError, RecursionError):
            applied = {}  # a hand-edited record: nothing is removed, every field is re-set
        if not isinstance(applied, dict):
            applied = {}
        patch: dict[str, Any] = {}
        want_meta = {k: v for k, v in (desired.get("metadata") or {}).items()
                     if k not in ("name", "namespace", *_SERVER_META)}
        meta = merge_patch(current.get("metadata") or {}, want_meta, applied.get("metadata"))
        if meta:
            patch["metadata"] = meta
        for key in _MANAGED_TOP:
            if key not in desired:
                continue
            want = desired[key]
            have = current.get(key)
            if key == "data" and desired.get("kind") == "Secret":
                if (have or {}) != (want or {}):
                    gone = {k: None for k in (have or {}) if k not in (want or {})}
                    patch[key] = {**gone, **(want or {})}
            elif isinstance(want, Mapping) and isinstance(have, Mapping):
                sub = merge_patch(have, want, applied.get(key))
                if sub:
                    patch[key] = sub
            elif not _contains(have, want):
                patch[key] = want
        return patch

    async def has_api(self, group_version: str, plural: str) -> bool:
        """Whether the cluster serves a resource (e.g. ServiceMonitor when its CRD exists).
        Answers are kept `discovery_ttl` seconds: a CRD installed later is noticed."""
        key = f"{group_version}/{plural}"
        cached = self._discovered.get(key)
        if cached is None or time.monotonic() - cached[0] > self.discovery_ttl:
            try:
                doc = await self._call("GET", f"/apis/{group_version}")
            except ApiError as exc:
                if exc.status != 404:
                    raise
                doc = None
            names = {r.get("name") for r in (doc or {}).get("resources", [])}
            cached = (time.monotonic(), plural in names)
            self._discovered[key] = cached
        return cached[1]

    async def watch(self, resource: Resource, namespace: str | None,
                    labels: Mapping[str, str], *, window: int = 300,
                    backoff: float = 1.0) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        """Events of the objects with `labels` in `namespace`, forever: ("LISTED", None) after
        each (re)list, then ("ADDED" | "MODIFIED" | "DELETED", object) from the list's
        resourceVersion on; each stream lasts at most `window` seconds. The selector is sent
        to the API server, so only those objects are watched. Expired versions (410) and
        broken streams relist."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
        path = resource.path(namespace)
        while True:
            try:
                listed = await self._call("GET", path, params={"labelSelector": selector})
                version = str(((listed or {}).get("metadata") or {}).get("resourceVersion", ""))
                yield "LISTED", None
                async for kind, obj in self._stream(path, selector, version, window):
                    yield kind, obj
            except (ApiError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.debug("Watch of %s in %s ended (%s); listing again", resource.plural,
                             namespace or "all namespaces", exc)
                await asyncio.sleep(backoff)

    async def _stream(self, path: str, selector: str, version: str,
                      window: int) -> AsyncIterator[tuple[str, dict[str, Any] | None]]:
        session = self._ensure_watch_session()
        params = {"watch": "true", "labelSelector": selector, "resourceVersion": version,
                  "timeoutSeconds": str(window), "allowWatchBookmarks": "true"}
        async with session.get(
                self.connection.server + path, params=params, headers=self._headers(None),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=window + 30)) as resp:
            if resp.status >= 400:
                if resp.status == 401:
                    self._token = None  # re-read a rotated service account token
                raise ApiError(resp.status, resp.reason or "", "watch refused",
                               method="GET", path=path)
            async for line in resp.content:
                if not line.strip():
                    continue
                event = json.loads(line)
                kind, obj = str(event.get("type")), event.get("object")
                if kind == "ERROR":
                    raise ApiError(int((obj or {}).get("code") or 500), "WatchError",
                                   str((obj or {}).get("message") or ""), method="GET",
                                   path=path)
                if kind == "BOOKMARK":
                    continue
                yield kind, obj
