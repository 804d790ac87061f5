"""A Kubernetes API emulator on loopback (kmock) and the real operator running against it.

kmock 0.8 stores bodies exactly as sent. `MailplaneKubeEmulator` adds what kopf and our own
client rely on from a real API server: metadata (uid, creationTimestamp, resourceVersion bumped on
every write, generation bumped on spec changes, generateName), 409 on a stale resourceVersion,
422 on a failed JSON-patch test, the status subresource split (status only through ``/status``),
no-op patches that write nothing, lists that carry a resourceVersion and watches that resume from
it (no stale replays), and Namespaces (which kmock 0.8 cannot route). It also answers object
requests without kmock's per-request filter matching and finds objects by key, which makes it
~100x faster.

The API server's own rules (``tests/helpers/kube_rules.py``) answer 422 as a real server does:
object names (DNS-1035 labels for Services, DNS-1123 labels for Namespaces, DNS-1123 subdomains
otherwise), label keys and values and annotation keys (on objects, pod templates and selectors),
a StatefulSet's immutable spec (everything but replicas, template, updateStrategy, ordinals,
revisionHistoryLimit, persistentVolumeClaimRetentionPolicy, minReadySeconds) and selector/template
agreement, a Service's clusterIP, immutable Secrets. Merge-patch ``null`` removes a field. Lists
and watches honour ``labelSelector`` (an object leaving a watch's selection is DELETED for it).
Deleting an owner garbage-collects its dependents (ownerReferences), or with
``propagationPolicy: Orphan`` keeps them and drops the reference. Still not emulated (test them at
the level of our code): field selectors, PUT and server-side apply, OpenAPI schema validation,
watches on Namespaces, controllers (no pods come from a StatefulSet).

The emulator and the operator each run in their own thread with their own event loop, so tests
are plain synchronous functions and pytest's loop is never involved::

    def test_x(kube_api, operator_running):
        kube_api.create(SMTP_RELAYS, {...})
        kube_api.wait_for(SECRETS, "mail", "relay-config-0", lambda obj: obj is not None)

Waits are driven by the emulator's writes (a condition notified on each one), not by sleeps;
``poll=`` adds a periodic re-check for conditions on the operator's own state. Every request is
recorded in ``emulator.audit`` (user agent, method, path, query) for RBAC checks.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import datetime
import gzip
import importlib.resources
import itertools
import json
import logging
import pathlib
import secrets
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import kopf
import prometheus_client
import pytest
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal.k8s import KubernetesError, KubernetesObjectNotFoundError

from mailplane_operator import kube as opkube
from mailplane_operator.metrics import OperatorMetrics

from . import kube_rules
from .loopthread import serving_in_thread

CRD_DIR = pathlib.Path(__file__).resolve().parents[2] / "crds"

# Used when crds/ is not there yet: the same names the CRDs declare.
_FALLBACK_CRDS = {
    "smtprelays": ("SmtpRelay", "smtprelay", {"smr"}),
    "sendingdomains": ("SendingDomain", "sendingdomain", {"sd"}),
    "smtpcredentials": ("SmtpCredential", "smtpcredential", {"smc"}),
    "retentionpolicies": ("RetentionPolicy", "retentionpolicy", {"rp"}),
}
_REVIEW_PATHS = ("/apis/authentication.k8s.io/v1/tokenreviews",
                 "/apis/authorization.k8s.io/v1/subjectaccessreviews")
_CR_VERBS = {"get", "list", "watch", "create", "update", "patch", "delete", "deletecollection"}


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _check(resource: kmock.resource, obj: Mapping[str, Any], errors: list[str]) -> None:
    """Answer 422 Invalid, as the API server does, when `errors` is not empty."""
    if errors:
        name = str((obj.get("metadata") or {}).get("name"))
        kind = obj.get("kind") or resource.plural
        raise KubernetesError(422, "Invalid", str(kube_rules.Invalid(str(kind), name, errors)))


def _propagation(request: kmock.Request) -> str | None:
    """DeleteOptions.propagationPolicy, from the query or the request body."""
    body = request.data if isinstance(request.data, Mapping) else {}
    return request.params.get("propagationPolicy") or body.get("propagationPolicy")


def _selector(request: kmock.Request) -> list[tuple[str, str, frozenset[str]]] | None:
    text = request.params.get("labelSelector")
    if not text:
        return None
    try:
        return kube_rules.parse_selector(text)
    except ValueError as exc:
        raise KubernetesError(400, "BadRequest", f"labelSelector: {exc}") from None


_SERVE_BY_ACTION = {
    kmock.action.LIST: "_serve_list", kmock.action.WATCH: "_serve_watch",
    kmock.action.FETCH: "_serve_fetch", kmock.action.CREATE: "_serve_create",
    kmock.action.UPDATE: "_serve_update", kmock.action.DELETE: "_serve_delete",
}


# How long a wait on the operator gives up: it returns as soon as the condition holds, so this
# only bounds a hang, and must outlast a reconcile on a loaded 2-core machine.
WAIT = 30.0

class _FastDispatch(kmock.RawHandler):  # type: ignore[misc]
    """Serves object requests straight from the emulator's handlers.

    kmock matches every request against each registered reaction's filters, which costs
    ~70 ms per request here; with no custom reactions the answer is always the emulator's own
    handler for the action. It sits between kmock's emulator and RawHandler in the MRO, so the
    emulator's state changes still run first.
    """

    __slots__ = ()

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        serve = _SERVE_BY_ACTION.get(request.action) if request.action else None
        if serve is None or request.resource is None or request.resource.plural is None:
            return await super()._handle(request)
        response: aiohttp.web.StreamResponse = await kmock.Response(
            payload=getattr(self, serve))(request)
        return response


@attrs.define(kw_only=True)
class MailplaneKubeEmulator(kmock.KubernetesEmulator, _FastDispatch):
    """kmock's emulator with the metadata semantics of a real API server (see module doc)."""

    _write_lock: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)
    _versions: Iterator[int] = attrs.field(factory=lambda: itertools.count(1000), init=False)
    _last_version: int = attrs.field(default=999, init=False)
    on_write: list[Callable[[], None]] = attrs.field(factory=list, init=False)
    writes: int = attrs.field(default=0, init=False)
    refusals: dict[tuple[str, str], tuple[int, str]] = attrs.field(factory=dict, init=False)
    """(plural, name prefix) -> (status, message): writes an admission webhook would refuse.
    Set through `refuse`."""

    namespaces: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    namespace_events: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    _namespace_changed: asyncio.Event = attrs.field(factory=asyncio.Event, init=False)
    audit: list[tuple[str, str, str, dict[str, str]]] = attrs.field(factory=list, init=False)
    """(User-Agent, method, path, query) of every request, for RBAC checks."""

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        self.audit.append((raw_request.headers.get("User-Agent", ""), raw_request.method,
                           raw_request.path, dict(raw_request.query)))
        # kmock 0.8 cannot parse /api/v1/namespaces[/name] (it takes "namespaces" for a
        # namespace prefix): serve Namespaces from a plain dict, with list and watch.
        parts = raw_request.path.strip("/").split("/")
        if raw_request.path in _REVIEW_PATHS:
            return await self._serve_review(raw_request)
        if parts[:3] == ["api", "v1", "namespaces"] and len(parts) <= 4:
            return await self._serve_namespace(raw_request, parts[3] if len(parts) == 4 else None)
        return await super().__call__(raw_request)

    async def _serve_namespace(self, raw_request: aiohttp.web.BaseRequest,
                               name: str | None) -> aiohttp.web.StreamResponse:
        def not_found() -> aiohttp.web.StreamResponse:
            return aiohttp.web.json_response(
                {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 404,
                 "reason": "NotFound", "message": f"namespaces {name!r} not found"}, status=404)

        if raw_request.method == "GET" and name is None and \
                raw_request.query.get("watch") in ("true", "1"):
            return await self._watch_namespaces(raw_request)
        if raw_request.method == "GET" and name is None:
            return aiohttp.web.json_response({
                "kind": "NamespaceList", "apiVersion": "v1",
                "metadata": {"resourceVersion": self._next_version()},
                "items": list(self.namespaces.values())})
        if raw_request.method == "GET":
            return aiohttp.web.json_response(self.namespaces[name]) \
                if name in self.namespaces else not_found()
        if raw_request.method == "POST" and name is None:
            body = await raw_request.json()
            meta = body.setdefault("metadata", {})
            errors = kube_rules.object_errors("namespaces", body)
            if errors:
                invalid = kube_rules.Invalid("Namespace", str(meta.get("name")), errors)
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
                     "reason": "Invalid", "message": str(invalid)}, status=422)
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=_now(),
                        resourceVersion=self._next_version())
            self.namespaces[meta["name"]] = body
            self._namespace_event("ADDED", body)
            self.writes += 1
            for callback in self.on_write:
                callback()
            return aiohttp.web.json_response(body, status=201)
        if raw_request.method == "PATCH" and name in self.namespaces:
            patched = dict(kmock_dicts.merge_patch_dict(self.namespaces[name],
                                                        await raw_request.json()))
            patched["metadata"]["resourceVersion"] = self._next_version()
            self.namespaces[name] = patched
            self._namespace_event("MODIFIED", patched)
            for callback in self.on_write:
                callback()
            return aiohttp.web.json_response(patched)
        return not_found()

    # ---- TokenReview and SubjectAccessReview (the portal's login and authorisation) -------
    # Users are tokens mapped to a name and groups; permissions are (user or "group:NAME",
    # verb, resource, namespace) tuples, namespace "*" for every namespace. Nothing else of RBAC.
    users: dict[str, dict[str, Any]] = attrs.field(factory=dict, init=False)
    permissions: set[tuple[str, str, str, str]] = attrs.field(factory=set, init=False)
    reviews: list[dict[str, Any]] = attrs.field(factory=list, init=False)
    """The spec of every SubjectAccessReview asked, in order."""

    def add_user(self, token: str, username: str, groups: tuple[str, ...] = ()) -> None:
        self.users[token] = {"username": username, "uid": f"uid-{username}",
                             "groups": [*groups, "system:authenticated"]}

    def grant(self, who: str, verb: str, resource: str, namespace: str) -> None:
        self.permissions.add((who, verb, resource, namespace))

    def revoke(self, who: str, verb: str, resource: str, namespace: str) -> None:
        self.permissions.discard((who, verb, resource, namespace))

    async def _serve_review(self, raw_request: aiohttp.web.BaseRequest,
                            ) -> aiohttp.web.StreamResponse:
        if raw_request.method != "POST":
            return aiohttp.web.json_response({"kind": "Status", "code": 405}, status=405)
        body = await raw_request.json()
        spec = body.get("spec") or {}
        if raw_request.path == _REVIEW_PATHS[0]:
            user = self.users.get(str(spec.get("token") or ""))
            status: dict[str, Any] = {"authenticated": user is not None}
            if user is not None:
                status["user"] = user
        else:
            self.reviews.append(copy.deepcopy(spec))
            attrs_ = spec.get("resourceAttributes") or {}
            if (not spec.get("user") and not spec.get("groups")) or not attrs_:
                return aiohttp.web.json_response(
                    {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": 422,
                     "reason": "Invalid", "message": "at least one of user or group must be "
                     "specified; resourceAttributes or nonResourceAttributes required"},
                    status=422)
            whos = [spec.get("user") or ""] + [f"group:{g}" for g in spec.get("groups") or ()]
            allowed = any(
                (who, attrs_.get("verb"), attrs_.get("resource"), ns) in self.permissions
                for who in whos for ns in (attrs_.get("namespace"), "*"))
            status = {"allowed": allowed}
        return aiohttp.web.json_response({**body, "status": status}, status=201)

    # ---- end of TokenReview and SubjectAccessReview ----------------------------------------

    def _namespace_event(self, kind: str, body: dict[str, Any]) -> None:
        self.namespace_events.append({"type": kind, "object": copy.deepcopy(body)})
        self._namespace_changed.set()
        self._namespace_changed = asyncio.Event()

    async def _watch_namespaces(self, raw_request: aiohttp.web.BaseRequest,
                                ) -> aiohttp.web.StreamResponse:
        """A watch stream of Namespace events after the given resourceVersion, as the API
        server sends it (one JSON event per line) until timeoutSeconds."""
        since = raw_request.query.get("resourceVersion", "")
        floor = int(since) if since.isdigit() else 0
        timeout = float(raw_request.query.get("timeoutSeconds") or 60)
        deadline = time.monotonic() + timeout
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        sent = 0
        while True:
            for event in self.namespace_events[sent:]:
                version = int(event["object"]["metadata"]["resourceVersion"])
                if version > floor:
                    await response.write(json.dumps(event).encode() + b"\n")
            sent = len(self.namespace_events)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._namespace_changed.wait(), remaining)
        await response.write_eof()
        return response

    def _has_status(self, resource: kmock.resource) -> bool:
        return resource in self.resources and "status" in self.resources[resource].subresources

    def _next_version(self) -> str:
        self._last_version = next(self._versions)
        return str(self._last_version)

    # kmock finds an object by scanning all of them on every request (O(n)); a benchmark with
    # thousands of objects spends its time there. These look the key up instead.
    def _lookup(self, request: kmock.Request, namespace: str | None,
                name: str | None) -> Any:
        key = (request.resource, namespace, name)
        return self._objects._objects.get(key)  # type: ignore[attr-defined]

    async def _serve_fetch(self, request: kmock.Request) -> Any:
        async with self._lock:
            obj = self._lookup(request, request.namespace, request.name)
        if obj is None or obj.deleted:
            raise KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: kmock.Request) -> Any:
        meta = (request.data or {}).get("metadata", {})
        async with self._lock:
            obj = self._lookup(request, request.namespace or meta.get("namespace"),
                               request.name or meta.get("name"))
        return obj.raw

    async def _serve_update(self, request: kmock.Request) -> Any:
        async with self._lock:
            obj = self._lookup(request, request.namespace, request.name)
        return obj.last.raw

    async def _serve_delete(self, request: kmock.Request) -> Any:
        async with self._lock:
            obj = self._lookup(request, request.namespace, request.name)
        return obj.last.raw

    async def _serve_list(self, request: kmock.Request) -> Any:
        # A list carries the resourceVersion it reflects, so that a watch from there (below)
        # does not replay what the list already returned: kopf would process stale bodies.
        selector = _selector(request)
        async with self._write_lock:
            version = self._last_version
            result = await super()._serve_list(request)
        result["metadata"]["resourceVersion"] = str(version)
        if selector is not None:
            result["items"] = [i for i in result["items"]
                               if kube_rules.selector_matches(selector, i)]
        return result

    async def _serve_watch(self, request: kmock.Request) -> Any:
        since = request.params.get("resourceVersion", "")
        floor = int(since) if since.isdigit() else None
        selector = _selector(request)
        seen: set[tuple[str | None, str | None]] = set()
        async for item in super()._serve_watch(request):
            if floor is not None and isinstance(item, dict) and item.get("type") == "ADDED":
                version = str(item["object"].get("metadata", {}).get("resourceVersion", ""))
                if version.isdigit() and int(version) <= floor:
                    continue
            if selector is not None and isinstance(item, dict) and "object" in item:
                # As the API server's watch cache does: an object that leaves the selection
                # is DELETED for this watch, one that enters it is ADDED.
                meta = item["object"].get("metadata") or {}
                key = (meta.get("namespace"), meta.get("name"))
                matches = kube_rules.selector_matches(selector, item["object"])
                if item.get("type") == "DELETED" or not matches:
                    if key not in seen:
                        continue
                    seen.discard(key)
                    item = {**item, "type": "DELETED"}
                else:
                    item = {**item, "type": "MODIFIED" if key in seen else "ADDED"}
                    seen.add(key)
            yield item

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        action = request.action
        if request.resource is None or action not in (
            kmock.action.CREATE, kmock.action.UPDATE, kmock.action.DELETE,
        ):
            return await super()._handle(request)
        try:
            async with self._write_lock:
                self._refuse_if_asked(request)
                before = self._existing(request) if request.name else None
                if action == kmock.action.CREATE:
                    self._prepare_create(request)
                elif action == kmock.action.UPDATE:
                    unchanged = self._prepare_update(request)
                    if unchanged is not None:
                        return aiohttp.web.json_response(unchanged)
                else:
                    await self._prepare_delete(request)
                response = await super()._handle(request)
                self.writes += 1
                if before is not None and self._existing(request) is None:
                    await self._collect_garbage(before, orphan=_propagation(request) == "Orphan")
                return response
        except KubernetesError as exc:
            return await self._render_error(exc)
        finally:
            for callback in self.on_write:
                callback()

    def refuse(self, plural: str, name_prefix: str, status: int = 400,
               message: str = "admission webhook \"policy.example\" denied the request") -> None:
        """Refuse every create, patch and delete of `plural` objects whose name starts with
        `name_prefix`, as an admission webhook or a quota would (until `allow`)."""
        self.refusals[(plural, name_prefix)] = (status, message)

    def allow(self, plural: str, name_prefix: str) -> None:
        self.refusals.pop((plural, name_prefix), None)

    def _refuse_if_asked(self, request: kmock.Request) -> None:
        if not self.refusals or request.resource is None:
            return
        data = request.data if isinstance(request.data, Mapping) else {}
        name = request.name or str((data.get("metadata") or {}).get("name") or "")
        for (plural, prefix), (status, message) in list(self.refusals.items()):
            if request.resource.plural == plural and name.startswith(prefix):
                raise KubernetesError(status, "BadRequest" if status == 400 else "Forbidden",
                                      message)

    def _existing(self, request: kmock.Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:  # type: ignore[index]
            return None
        return copy.deepcopy(self.objects[key].raw)  # type: ignore[index]

    def _prepare_create(self, request: kmock.Request) -> None:
        data = request.data
        if not isinstance(data, dict):
            raise KubernetesError(400, "BadRequest", "the body must be a JSON object")
        meta = data.setdefault("metadata", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise KubernetesError(422, "Invalid", "metadata.name or generateName is required")
            meta["name"] = prefix + secrets.token_hex(3)[:5]
        if request.namespace:
            meta["namespace"] = request.namespace
        assert request.resource is not None
        _check(request.resource, data, kube_rules.object_errors(request.resource.plural, data))
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = _now()
        meta["resourceVersion"] = self._next_version()
        meta["generation"] = 1
        meta.pop("deletionTimestamp", None)
        if self._has_status(request.resource):
            data.pop("status", None)

    def _prepare_update(self, request: kmock.Request) -> dict[str, Any] | None:
        """Validate a PATCH and stamp the new version into it; the current body if a no-op."""
        current = self._existing(request)
        if current is None:
            return None  # kmock answers 404
        assert request.resource is not None
        meta = current.get("metadata", {})
        data = request.data
        if isinstance(data, list):
            try:
                result = jsonpatch.apply_patch(current, data, in_place=False)
            except jsonpatch.JsonPatchTestFailed as exc:
                raise KubernetesError(422, "Invalid", f"JSON patch test failed: {exc}") from None
            except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as exc:
                raise KubernetesError(422, "Invalid", f"the JSON patch failed: {exc}") from None
        elif isinstance(data, dict):
            sent_version = (data.get("metadata") or {}).get("resourceVersion")
            if sent_version is not None and sent_version != meta.get("resourceVersion"):
                raise KubernetesError(
                    409, "Conflict",
                    "the object has been modified; please apply your changes to the latest version",
                )
            if self._has_status(request.resource):
                if request.subresource == "status":
                    for key in list(data):
                        if key != "status":
                            del data[key]
                else:
                    data.pop("status", None)
            try:
                result = dict(kmock_dicts.merge_patch_dict(current, data))
            except ValueError as exc:
                raise KubernetesError(422, "Invalid", str(exc)) from None
        else:
            raise KubernetesError(400, "BadRequest", "a patch is a JSON object or a JSON patch")
        if result == current:
            return current
        plural = request.resource.plural
        _check(request.resource, result, kube_rules.update_errors(plural, current, result)
               + kube_rules.object_errors(plural, result))
        version = self._next_version()
        generation = int(meta.get("generation", 1))
        if result.get("spec") != current.get("spec"):
            generation += 1
        if isinstance(data, list):
            data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            data.append({"op": "add", "path": "/metadata/generation", "value": generation})
        else:
            stamp = data.setdefault("metadata", {})
            if stamp is None:
                raise KubernetesError(422, "Invalid", "metadata cannot be removed")
            stamp["resourceVersion"] = version
            stamp["generation"] = generation
        return None

    async def _collect_garbage(self, owner: Mapping[str, Any], *, orphan: bool) -> None:
        """What Kubernetes' garbage collector does once an owner is gone: delete its dependents
        (background propagation), or with propagationPolicy=Orphan drop their owner reference
        and keep them."""
        uid = (owner.get("metadata") or {}).get("uid")
        if not uid:
            return
        objects = self._objects._objects  # type: ignore[attr-defined]
        for key, obj in list(objects.items()):
            if obj.deleted:
                continue
            refs = (obj.raw.get("metadata") or {}).get("ownerReferences") or []
            if not any(r.get("uid") == uid for r in refs):
                continue
            resource = key[0]
            if orphan:
                kept = [r for r in refs if r.get("uid") != uid]
                obj.patch({"metadata": {"ownerReferences": kept or None,
                                        "resourceVersion": self._next_version()}})
                await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                continue
            meta = obj.raw.get("metadata") or {}
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    obj.patch({"metadata": {"deletionTimestamp": _now(),
                                            "resourceVersion": self._next_version()}})
                    await self._buses[resource].put({"type": "MODIFIED", "object": obj.raw})
                continue
            raw = obj.raw
            obj.delete()
            self.writes += 1
            await self._buses[resource].put({"type": "DELETED", "object": raw})
            await self._collect_garbage(raw, orphan=False)

    async def _prepare_delete(self, request: kmock.Request) -> None:
        current = self._existing(request)
        if current is None:
            return
        meta = current.get("metadata", {})
        options = request.data if isinstance(request.data, Mapping) else {}
        wanted_uid = (options.get("preconditions") or {}).get("uid")
        if wanted_uid and wanted_uid != meta.get("uid"):
            raise KubernetesError(
                409, "Conflict", f"Precondition failed: UID in precondition: {wanted_uid}, "
                f"UID in object meta: {meta.get('uid')}")
        if meta.get("finalizers") and not meta.get("deletionTimestamp"):
            # Mark for deletion here (kmock would do it without a new resourceVersion).
            key = (request.resource, request.namespace, request.name)
            obj = self.objects[key]  # type: ignore[index]
            obj.patch({"metadata": {
                "deletionTimestamp": _now(), "resourceVersion": self._next_version(),
            }})
            assert request.resource is not None
            await self._buses[request.resource].put({"type": "MODIFIED", "object": obj.raw})


def _load_resources(emulator: MailplaneKubeEmulator, *, service_monitors: bool) -> None:
    bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz")
    emulator.resources.load_data(gzip.decompress(bundled.read_bytes()))
    declared = False
    for path in sorted(CRD_DIR.glob("*.yaml")) if CRD_DIR.is_dir() else []:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            names = spec["names"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                emulator.resources[f"{spec['group']}/{version['name']}/{names['plural']}"] = (
                    kmock.ResourceInfo(
                        kind=names["kind"],
                        singular=names.get("singular"),
                        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
                        verbs=_CR_VERBS,
                        shortnames=set(names.get("shortNames", [])),
                        categories=set(names.get("categories", [])),
                        subresources=set((version.get("subresources") or {}).keys()),
                    )
                )
                declared = True
    if not declared:
        for plural, (kind, singular, short) in _FALLBACK_CRDS.items():
            emulator.resources[f"mailplane.io/v1alpha1/{plural}"] = kmock.ResourceInfo(
                kind=kind, singular=singular, namespaced=True, verbs=_CR_VERBS,
                shortnames=short, categories={"mailplane"}, subresources={"status"},
            )
    if service_monitors:
        serve_service_monitors(emulator)


def serve_service_monitors(emulator: MailplaneKubeEmulator) -> None:
    """Make the emulator serve the Prometheus operator's ServiceMonitor, as if its CRD existed."""
    emulator.resources["monitoring.coreos.com/v1/servicemonitors"] = kmock.ResourceInfo(
        kind="ServiceMonitor", singular="servicemonitor", namespaced=True, verbs=_CR_VERBS,
    )


def serve_dns_endpoints(emulator: MailplaneKubeEmulator) -> None:
    """Make the emulator serve external-dns's DNSEndpoint, as if its CRD existed."""
    emulator.resources["externaldns.k8s.io/v1alpha1/dnsendpoints"] = kmock.ResourceInfo(
        kind="DNSEndpoint", singular="dnsendpoint", namespaced=True, verbs=_CR_VERBS,
    )


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


@dataclass
class KubeApi:
    """The emulator seen from a test: HTTP calls to its real endpoints, waits on its writes."""

    url: str
    emulator: MailplaneKubeEmulator
    loop: asyncio.AbstractEventLoop
    _changed: threading.Condition = field(default_factory=threading.Condition)
    _generation: int = 0

    def notify(self) -> None:
        with self._changed:
            self._generation += 1
            self._changed.notify_all()

    def request(self, method: str, path: str, body: Any = None,
                content_type: str = "application/json") -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": content_type})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as exc:
            raise ApiError(exc.code, exc.read().decode(errors="replace")) from None

    # Objects through the API, as kubectl would do it.
    def create(self, resource: opkube.Resource, body: Mapping[str, Any]) -> dict[str, Any]:
        namespace = body.get("metadata", {}).get("namespace")
        result: dict[str, Any] = self.request("POST", resource.path(namespace), dict(body))
        return result

    def patch(self, resource: opkube.Resource, namespace: str | None, name: str,
              patch: Mapping[str, Any], *, status: bool = False) -> dict[str, Any]:
        path = resource.path(namespace, name, "status" if status else None)
        result: dict[str, Any] = self.request(
            "PATCH", path, dict(patch), "application/merge-patch+json")
        return result

    def delete(self, resource: opkube.Resource, namespace: str | None, name: str) -> None:
        self.request("DELETE", resource.path(namespace, name))

    def get(self, resource: opkube.Resource, namespace: str | None,
            name: str) -> dict[str, Any] | None:
        try:
            result: dict[str, Any] = self.request("GET", resource.path(namespace, name))
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise
        return result

    def list(self, resource: opkube.Resource, namespace: str | None = None,
             labels: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.request("GET", resource.path(namespace))["items"]
        return [i for i in items if opkube.labels_match(i, labels)]

    def secret_data(self, namespace: str, name: str) -> dict[str, str]:
        secret = self.get(opkube.SECRETS, namespace, name)
        assert secret is not None, f"Secret {namespace}/{name} does not exist"
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def events(self, namespace: str | None = None) -> list[dict[str, Any]]:
        return self.list(opkube.EVENTS, namespace)

    def wait_until(self, check: Callable[[], Any], timeout: float = WAIT,
                   what: str = "the condition", poll: float | None = None) -> Any:
        """Re-check after every write to the emulator until `check()` is truthy. `poll` also
        re-checks that often, for conditions on the operator's own state (no API write)."""
        deadline = time.monotonic() + timeout
        while True:
            with self._changed:
                seen = self._generation
            # Checked outside the lock: the emulator's thread takes it to notify.
            result = check()
            if result:
                return result
            with self._changed:
                while self._generation == seen:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise AssertionError(f"timed out after {timeout}s waiting for {what}")
                    if not self._changed.wait(min(remaining, poll or remaining)) and poll:
                        break

    def wait_for(self, resource: opkube.Resource, namespace: str | None, name: str,
                 predicate: Callable[[dict[str, Any] | None], Any] = lambda o: o is not None,
                 timeout: float = WAIT) -> Any:
        def check() -> Any:
            obj = self.get(resource, namespace, name)
            if not predicate(obj):
                return None
            return obj if obj is not None else True

        return self.wait_until(check, timeout, f"{resource.plural} {namespace}/{name}")


@contextlib.contextmanager
def running_emulator(*, service_monitors: bool = False) -> Iterator[KubeApi]:
    """The emulator on a free loopback port, served by its own thread and event loop."""
    @contextlib.asynccontextmanager
    async def serve() -> AsyncIterator[tuple[MailplaneKubeEmulator, str]]:
        emulator = MailplaneKubeEmulator()
        _load_resources(emulator, service_monitors=service_monitors)
        async with emulator, kmock.Server(emulator) as server:
            yield emulator, str(server.url).rstrip("/")

    with serving_in_thread(serve, name="kube-emulator") as served:
        emulator, url = served.value
        api = KubeApi(url=url, emulator=emulator, loop=served.loop)
        api.emulator.on_write.append(api.notify)
        yield api


@pytest.fixture
def kube_api() -> Iterator[KubeApi]:
    with running_emulator() as api:
        yield api


# --------------------------------------------------------------------------------------------
# The operator in its own thread
# --------------------------------------------------------------------------------------------


class LogCapture(logging.Handler):
    """Every record the operator (and kopf) log, formatted, for leak checks."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self._lock_lines = threading.Lock()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = record.getMessage()
        except Exception:  # a broken format string must not break the operator under test
            line = str(record.msg)
        line = f"{record.created:.3f} {record.name} {record.levelname} {line}"
        if record.exc_info:
            line += "\n" + logging.Formatter().formatException(record.exc_info)
        with self._lock_lines:
            self.lines.append(line)

    @property
    def text(self) -> str:
        with self._lock_lines:
            return "\n".join(self.lines)


class FakeClock:
    """Wall-clock time plus an offset the test moves forward (rotation intervals are hours)."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> datetime.datetime:
        return datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=self.offset)

    def advance(self, seconds: float) -> None:
        self.offset += seconds


@dataclass
class RunningOperator:
    """A started operator; `stop()` stops it and re-raises whatever killed it."""

    config: Any
    thread: threading.Thread
    stop_flag: threading.Event
    ready_flag: threading.Event
    logs: LogCapture
    failure: list[BaseException]
    metrics: OperatorMetrics
    clock: FakeClock
    runtime: list[Any] = field(default_factory=list)

    def metrics_text(self) -> str:
        return prometheus_client.generate_latest(self.metrics.registry).decode()

    def stop(self, timeout: float = 15.0) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError("the operator did not stop in time")
        if self.failure:
            raise self.failure[0]


def start_operator(api: KubeApi, *, clock: FakeClock | None = None, debug_logs: bool = True,
                   wait_ready: bool = True, **overrides: Any) -> RunningOperator:
    """Run the real operator (kopf + our handlers) against the emulator, short timers.
    `wait_ready=False`: return at once (a replica that waits for the Lease is not ready)."""
    from mailplane_operator import app, runtime

    options: dict[str, Any] = {
        "credentials": opkube.Credentials(kopf.ConnectionInfo(server=api.url)),
        "rotation_check_interval": 0.3,
        "dns_check_initial": 0.2,
        "dns_check_max": 1.0,
        "dns_recheck_interval": 5.0,
        "render_debounce": 0.02,
        "fast": True,
    }
    options.update(overrides)
    config = runtime.OperatorConfig(**options)
    clock = clock or FakeClock()
    metrics = OperatorMetrics.create()
    runtime: list[Any] = []
    stop_flag = threading.Event()
    ready_flag = threading.Event()
    capture = LogCapture()
    failure: list[BaseException] = []
    for name in ("kopf", "mailplane_operator"):
        logging.getLogger(name).addHandler(capture)
        # Debug logs cost much CPU at scale (the benchmark turns them off).
        logging.getLogger(name).setLevel(logging.DEBUG if debug_logs else logging.WARNING)

    def main() -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(
                app.run(config, stop_flag=stop_flag, ready_flag=ready_flag,
                             metrics=metrics, clock=clock, on_runtime=runtime.append)
            )
        except BaseException as exc:
            failure.append(exc)
            ready_flag.set()
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    thread = threading.Thread(target=main, name="kopf-operator", daemon=True)
    thread.start()
    if not wait_ready:
        return RunningOperator(config, thread, stop_flag, ready_flag, capture, failure, metrics,
                               clock, runtime)
    if not ready_flag.wait(15) or failure:
        stop_flag.set()
        thread.join(5)
        raise RuntimeError(f"the operator did not start: {failure[:1]!r}")
    return RunningOperator(config, thread, stop_flag, ready_flag, capture, failure, metrics,
                           clock, runtime)


def _detach_capture(capture: LogCapture) -> None:
    for name in ("kopf", "mailplane_operator"):
        logging.getLogger(name).removeHandler(capture)


@pytest.fixture
def operator_factory(kube_api: KubeApi) -> Iterator[Callable[..., RunningOperator]]:
    """Start operators against `kube_api` (several in turn, e.g. for a restart test)."""
    started: list[RunningOperator] = []

    def factory(**overrides: Any) -> RunningOperator:
        op = start_operator(kube_api, **overrides)
        started.append(op)
        return op

    yield factory
    errors = []
    for op in started:
        try:
            if not op.stop_flag.is_set() or op.thread.is_alive():
                op.stop()
        except BaseException as exc:
            errors.append(exc)
        finally:
            _detach_capture(op.logs)
    if errors:
        raise errors[0]


@pytest.fixture
def operator_running(operator_factory: Callable[..., RunningOperator]) -> RunningOperator:
    return operator_factory()


# --------------------------------------------------------------------------------------------
# Resource builders (the YAML a platform team applies, as dicts)
# --------------------------------------------------------------------------------------------


def namespace_body(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "labels": dict(labels)}}


def relay_body(name: str = "main", namespace: str = "mail", *,
               labels: Mapping[str, str] | None = None, **spec: Any) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "replicas": 1,
        "tls": {"secretName": f"{name}-tls"},
        "allowedNamespaces": {"matchLabels": {"mailplane.io/smtp-access": "true"}},
    }
    body_spec.update(spec)
    return {"apiVersion": "mailplane.io/v1alpha1", "kind": "SmtpRelay",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(labels or {})},
            "spec": body_spec}


def domain_body(name: str, domain: str, *, namespace: str = "mail", relay: str = "main",
                skip_verification: bool = True, **spec: Any) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "domain": domain, "relayRef": {"name": relay},
        # Granted to the namespaces relay_body's relay admits, as in examples/domains.yaml.
        "allowedNamespaces": {"matchLabels": {"mailplane.io/smtp-access": "true"}},
        "dkim": {"selector": "mp", "algorithm": "ed25519"},
        "verification": {"skip": skip_verification},
    }
    body_spec.update(spec)
    return {"apiVersion": "mailplane.io/v1alpha1", "kind": "SendingDomain",
            "metadata": {"name": name, "namespace": namespace}, "spec": body_spec}


def credential_body(name: str, senders: list[str], *, namespace: str = "shop",
                    relay: str = "main", relay_namespace: str = "mail",
                    **spec: Any) -> dict[str, Any]:
    body_spec: dict[str, Any] = {
        "relayRef": {"name": relay, "namespace": relay_namespace},
        "allowedSenders": senders,
    }
    body_spec.update(spec)
    return {"apiVersion": "mailplane.io/v1alpha1", "kind": "SmtpCredential",
            "metadata": {"name": name, "namespace": namespace}, "spec": body_spec}


def retention_body(name: str, *, namespace: str = "mail", message_log: str = "720h",
                   selector: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "mailplane.io/v1alpha1", "kind": "RetentionPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"relaySelector": {"matchLabels": dict(selector or {})},
                     "messageLog": message_log}}


def rendered_config(api: KubeApi, relay: str = "main", namespace: str = "mail") -> dict[str, str]:
    """Every file of the relay's config Secrets, as the relay would see its config directory."""
    files: dict[str, str] = {}
    for secret in api.list(opkube.SECRETS, namespace, {"mailplane.io/relay": relay,
                                                         "mailplane.io/component": "config"}):
        for key, value in (secret.get("data") or {}).items():
            files[key] = base64.b64decode(value).decode()
    return files


def rendered_credentials(api: KubeApi, relay: str = "main",
                         namespace: str = "mail") -> dict[str, dict[str, Any]]:
    """username -> credential entry of the rendered relay configuration."""
    out: dict[str, dict[str, Any]] = {}
    for text in rendered_config(api, relay, namespace).values():
        for doc in yaml.safe_load_all(text):
            if doc and doc.get("kind") == "RelayCredentials":
                for entry in doc["spec"]["credentials"]:
                    out[entry["username"]] = entry
    return out
