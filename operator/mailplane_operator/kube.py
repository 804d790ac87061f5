"""A small asynchronous Kubernetes API client for the operator's own writes.

kopf talks to the API through its own client for watching and for patching the resources it
handles; everything else the operator writes (children, config Secrets, application Secrets,
status from background tasks) goes through `KubeClient`. Both authenticate with one
`kopf.ConnectionInfo` held by `Credentials` (`load_credentials`: kopf's own
``login_via_client``, in-cluster inside a pod, else the kubeconfig); TLS and the Authorization
header come from kopf's ``as_ssl_context`` and ``as_http_headers``. What stays hand-written here
is what no library does for us: the three-way apply below, and the few calls it needs
(docs/operator.md, "The Kubernetes client").

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
import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any, NamedTuple

import aiohttp
import kopf
from kubernetes.utils.quantity import parse_quantity

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


REFRESH = 60.0
"""How old the credentials `KubeClient` uses may get before it logs in again (a projected
service account token is rewritten by the kubelet long before it expires)."""

_SETTINGS = kopf.OperatorSettings()


class Credentials:
    """Where the API server is and how to authenticate: one `kopf.ConnectionInfo`, for kopf
    (its login handler returns `login()`) and for `KubeClient` alike, so the server, CA,
    client certificate and token come from one place.

    `login` is the function that logs in (`load_credentials`: kopf's own ``login_via_client``
    unless a kubeconfig file or context is named); it runs again when kopf's API calls get a
    401 (kopf calls its login handler), when ours do (`KubeClient` retries once with fresh
    credentials), and every `REFRESH` seconds for `KubeClient` (a rotated token is picked up
    before the old one expires). A fixed `kopf.ConnectionInfo` (tests) never changes."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo] | kopf.ConnectionInfo) -> None:
        if isinstance(login, kopf.ConnectionInfo):
            fixed = login
            self._login: Callable[[], kopf.ConnectionInfo] = lambda: fixed
            self._info: kopf.ConnectionInfo | None = fixed
        else:
            self._login = login
            self._info = None
        self._at = time.monotonic()

    def login(self) -> kopf.ConnectionInfo:
        """Log in again (blocking: reads files, may run a kubeconfig's exec plugin)."""
        info = self._login()
        self._info, self._at = info, time.monotonic()
        return info

    def info(self) -> kopf.ConnectionInfo:
        """The credentials in force (logging in first if there are none yet)."""
        return self._info if self._info is not None else self.login()

    def stale(self) -> bool:
        return self._info is None or time.monotonic() - self._at > REFRESH

    @property
    def server(self) -> str:
        return str(self.info().server).rstrip("/")

    @property
    def default_namespace(self) -> str | None:
        return self.info().default_namespace


def _in_cluster_namespace() -> str | None:
    ns_file = SERVICE_ACCOUNT_DIR / "namespace"
    if os.environ.get("KUBERNETES_SERVICE_HOST") and ns_file.exists():
        return ns_file.read_text().strip() or None
    return None


def _kubeconfig_login(kubeconfig: str | None, context: str | None) -> kopf.ConnectionInfo:
    """A named kubeconfig file or context (kopf's login functions read only the default file
    and its current context): loaded by the `kubernetes` client library, as kopf's
    ``login_via_client`` does, and read out the same way."""
    from kubernetes import client as k8s_client  # noqa: PLC0415 - only the CLI needs it
    from kubernetes import config as k8s_config  # noqa: PLC0415

    cfg = k8s_client.Configuration()
    k8s_config.load_kube_config(  # type: ignore[no-untyped-call]
        config_file=kubeconfig, context=context, client_configuration=cfg)
    header = (cfg.get_api_key_with_prefix("BearerToken")
              or cfg.get_api_key_with_prefix("authorization"))
    scheme, _, token = str(header or "").rpartition(" ")
    return kopf.ConnectionInfo(
        server=str(cfg.host), ca_path=cfg.ssl_ca_cert or None, insecure=not cfg.verify_ssl,
        username=cfg.username or None, password=cfg.password or None,
        scheme=scheme or None, token=token or None,
        certificate_path=cfg.cert_file or None, private_key_path=cfg.key_file or None)


def load_credentials(kubeconfig: str | None = None, context: str | None = None) -> Credentials:
    """In-cluster settings inside a pod (service account), else the current kubeconfig: what
    kopf's ``login_via_client`` finds; a named kubeconfig file or context is read by
    `_kubeconfig_login`. Inside a pod the service account's namespace is the default one (the
    Lease's and the operator's own). Logs in once here, so that a cluster that cannot be found
    is reported at start."""

    def login() -> kopf.ConnectionInfo:
        if kubeconfig is not None or context is not None:
            return _kubeconfig_login(kubeconfig, context)
        info = kopf.login_via_client(logger=logger, settings=_SETTINGS)
        if info is None:
            raise kopf.LoginError("the kubernetes client library is not installed")
        namespace = _in_cluster_namespace()
        return dataclasses.replace(info, default_namespace=namespace) if namespace else info

    credentials = Credentials(login)
    credentials.login()
    return credentials


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


# Where the API server rewrites quantities into its canonical form (1.5Gi -> 1536Mi, 1 -> 1000m
# or back): compared by value there, or every render would patch the StatefulSet again.
_QUANTITY_KEYS = frozenset({"requests", "limits", "storage"})


def quantity_value(value: Any) -> Decimal | None:
    """A resource quantity ("10Gi", "1536Mi", "500m") as a number; None if it is not one."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        return None
    try:
        return Decimal(parse_quantity(value))  # type: ignore[no-untyped-call]
    except (ValueError, ArithmeticError):
        return None


def _same_quantity(have: Any, want: Any) -> bool:
    if isinstance(want, Mapping):
        return isinstance(have, Mapping) and set(have) >= set(want) and all(
            _same_quantity(have.get(k), v) for k, v in want.items())
    a, b = quantity_value(have), quantity_value(want)
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

    def __init__(self, credentials: Credentials, *, timeout: float = 30.0,
                 concurrency: int = 32) -> None:
        self.credentials = credentials
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._watch_session: aiohttp.ClientSession | None = None
        self._transport: tuple[Any, ...] | None = None
        """What the sessions were made for (server, CA, client certificate)."""
        self._limit = asyncio.Semaphore(concurrency)
        self._login_lock = asyncio.Lock()
        self.stats = ApplyStats()
        self._discovered: dict[str, tuple[float, bool]] = {}
        self.discovery_ttl = 300.0

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for session in (self._session, self._watch_session):
            if session is not None:
                await session.close()
        self._session = self._watch_session = None

    async def _current(self, *, rejected: kopf.ConnectionInfo | None = None
                       ) -> kopf.ConnectionInfo:
        """The credentials to call with: logged in again when older than `REFRESH`, or when
        they are still `rejected` (the API answered 401 to them); sessions made anew when the
        server, CA or client certificate changed."""
        creds = self.credentials
        if creds.stale() or (rejected is not None and creds.info() is rejected):
            async with self._login_lock:
                if creds.stale() or (rejected is not None and creds.info() is rejected):
                    await asyncio.to_thread(creds.login)
        info = creds.info()
        transport = (info.server, info.ca_path, info.ca_data, info.insecure,
                     info.certificate_path, info.certificate_data, info.private_key_path,
                     info.private_key_data)
        if transport != self._transport:
            await self.close()
            self._transport = transport
        return info

    @staticmethod
    def _headers(info: kopf.ConnectionInfo, content_type: str | None) -> dict[str, str]:
        headers = {"Accept": "application/json", "User-Agent": "mailplane-operator",
                   **info.as_http_headers()}
        if content_type:
            headers["Content-Type"] = content_type
        return headers

    def _ensure_session(self, info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=64)
            self._session = aiohttp.ClientSession(connector=connector, timeout=self._timeout)
        return self._session

    def _ensure_watch_session(self, info: kopf.ConnectionInfo) -> aiohttp.ClientSession:
        """Watches hold their connection for minutes: their own pool, so that they never take
        the connections requests need."""
        if self._watch_session is None:
            connector = aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=0)
            self._watch_session = aiohttp.ClientSession(connector=connector)
        return self._watch_session

    async def _call(self, method: str, path: str, *, body: Any = None,
                    content_type: str | None = None,
                    params: Mapping[str, str] | None = None) -> Any:
        info = await self._current()
        try:
            return await self._request(info, method, path, body=body,
                                       content_type=content_type, params=params)
        except ApiError as exc:
            if exc.status != 401:
                raise
        # Credentials refused (a rotated or expired token): log in again and retry once (the
        # API server did nothing with the refused request).
        info = await self._current(rejected=info)
        return await self._request(info, method, path, body=body, content_type=content_type,
                                   params=params)

    async def _request(self, info: kopf.ConnectionInfo, method: str, path: str, *, body: Any,
                       content_type: str | None, params: Mapping[str, str] | None) -> Any:
        session = self._ensure_session(info)
        payload = None if body is None else json.dumps(body).encode()
        async with self._limit, session.request(
            method, str(info.server).rstrip("/") + path, data=payload, params=params,
            headers=self._headers(info, content_type if body is not None else None),
        ) as resp:
            text = await resp.text()
            if resp.status >= 400:
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
        info = await self._current()
        session = self._ensure_watch_session(info)
        params = {"watch": "true", "labelSelector": selector, "resourceVersion": version,
                  "timeoutSeconds": str(window), "allowWatchBookmarks": "true"}
        async with session.get(
                str(info.server).rstrip("/") + path, params=params,
                headers=self._headers(info, None),
                timeout=aiohttp.ClientTimeout(total=None, sock_read=window + 30)) as resp:
            if resp.status >= 400:
                if resp.status == 401:
                    await self._current(rejected=info)  # the relist logs in again
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
