"""Scaling a relay pool down without stranding mail.

When ``spec.replicas`` drops below the StatefulSet's replicas, the StatefulSet keeps its pods
until their queues are elsewhere: each render of the relay

1. lists the relay's pods (label selector) and tells every pod to be removed (ordinals
   ``spec.replicas`` and up) to drain toward the pods that stay — ``POST /admin/drain`` on its
   admin port with the bearer token of the Secret ``<relay>-admin`` (relay drain.py);
2. asks each of them how far it is (``GET /admin/drain``);
3. once every one of them reports an empty spool and no open session, lowers the StatefulSet's
   replicas and deletes the removed ordinals' spool volumes (``spool-<relay>-<n>``), which
   hold nothing any more.

Until then the StatefulSet keeps its size, the relay's ``Draining`` condition says how many
messages are left where, and the relay is rendered again every few seconds. A scale-down
called off (replicas raised again) stops the drains. A pod to be removed that is not running
holds its volume back: the scale-down waits for the StatefulSet to restart it.

Every /admin call is HTTPS (the pods' admin port, container port ``admin``) and verifies the
pod: its certificate must chain to the ``ca.crt`` of the relay's TLS Secret
(``spec.tls.secretName``, as cert-manager writes it) and name ``<relay>.<namespace>.svc`` (pods
are reached by IP; that name is sent as SNI and checked). Without a ``ca.crt`` no pod is asked
anything: the token is never presented to a server that was not verified.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from .. import kube
from ..kube import ApiError
from ..reconcile import relay as relay_mod
from ..reconcile.models import SmtpRelay, owner_reference
from ..runtime import Body, Runtime
from .common import child_write_failed

logger = logging.getLogger(__name__)

ADMIN_KEY = "token"
DRAIN_PATH = "/admin/drain"
STATUS_PATH = "/admin/status"
REVOKE_PATH = "/admin/revoke"
CREDENTIAL_PATH = "/admin/credential"
HTTP_TIMEOUT = 3.0


def admin_secret_name(relay: SmtpRelay) -> str:
    return f"{relay.meta.name}-admin"


async def admin_token(rt: Runtime, relay: SmtpRelay) -> str:
    """The bearer token of the relay pods' /admin endpoints, from the Secret ``<relay>-admin``
    in the relay's namespace (made once, owned by the SmtpRelay; only its SHA-256 goes into the
    configuration)."""
    name = admin_secret_name(relay)
    secret = await rt.secret(relay.meta.namespace, name)
    token = _token_of(secret)
    if token is None:
        secret = await rt.secret(relay.meta.namespace, name, fresh=True)
        token = _token_of(secret)
    if token is None:
        token = base64.urlsafe_b64encode(rt.random(32)).decode().rstrip("=")
        manifest = {
            "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": relay.meta.namespace,
                         "labels": {**relay_mod.child_labels(relay),
                                    relay_mod.LABEL_COMPONENT: "admin"},
                         "ownerReferences": [owner_reference("SmtpRelay", relay.meta)]},
            "stringData": {ADMIN_KEY: token},
        }
        _action, obj = await rt.client.apply(manifest, owner_uid=relay.meta.uid)
        rt.remember_secret(relay.meta.namespace, name, obj)
    return token


def _token_of(secret: dict[str, Any] | None) -> str | None:
    raw = ((secret or {}).get("data") or {}).get(ADMIN_KEY)
    try:
        token = base64.b64decode(raw).decode() if raw else ""
    except (ValueError, UnicodeDecodeError):
        return None
    return token if len(token) >= 32 else None


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class ScaleStep:
    """What this render does about the pool's size."""

    replicas: int | None
    """The StatefulSet's replicas to write (None: spec.replicas)."""
    removed: list[int] = field(default_factory=list)
    """Ordinals whose queues are drained: their volumes go once the StatefulSet shrank."""
    progress: str | None = None
    """While a scale-down drains: how far it is (the Draining condition)."""


_ORDINAL = re.compile(r"-([0-9]+)$")


def _ordinal(pod: dict[str, Any], relay: SmtpRelay) -> int | None:
    name = str((pod.get("metadata") or {}).get("name") or "")
    match = _ORDINAL.search(name)
    if not name.startswith(relay.meta.name + "-") or match is None:
        return None
    return int(match.group(1))


def _url(pod: dict[str, Any]) -> str | None:
    """https://IP:PORT of the pod's admin port (its container port named "admin")."""
    ip = (pod.get("status") or {}).get("podIP")
    if not ip or (pod.get("metadata") or {}).get("deletionTimestamp"):
        return None
    port = relay_mod.ADMIN_PORT
    for container in (pod.get("spec") or {}).get("containers") or []:
        for p in container.get("ports") or []:
            if p.get("name") == "admin" and p.get("containerPort"):
                port = int(p["containerPort"])
    host = f"[{ip}]" if ":" in ip else ip
    return f"https://{host}:{port}"


@dataclass(frozen=True)
class AdminClient:
    """How the operator reaches a relay's pods: the token, and how their servers are verified."""

    token: str
    context: ssl.SSLContext | None
    """None: the relay's TLS Secret has no usable ``ca.crt`` (``problem`` says why)."""
    server_name: str
    problem: str = ""


async def admin_client(rt: Runtime, relay: SmtpRelay) -> AdminClient:
    """The token of ``<relay>-admin`` and a context trusting the ``ca.crt`` of the relay's TLS
    Secret only (re-read when it is missing or unusable: cert-manager may write it later)."""
    token = await admin_token(rt, relay)
    name = relay_mod.admin_server_name(relay)
    secret_name = relay.spec.tls.secret_name
    problem = ""
    for fresh in (False, True):
        secret = await rt.secret(relay.meta.namespace, secret_name, fresh=fresh)
        raw = ((secret or {}).get("data") or {}).get("ca.crt")
        if not raw:
            problem = (f"the relay pods cannot be verified: the Secret {secret_name} "
                       "(spec.tls.secretName) has no ca.crt (the CA that signed the pods' "
                       "certificate; cert-manager writes it for a CA or self-signed issuer)")
            continue
        try:
            ctx = ssl.create_default_context(cadata=base64.b64decode(raw).decode())
        except (ValueError, ssl.SSLError) as exc:
            problem = (f"the relay pods cannot be verified: ca.crt of the Secret {secret_name} "
                       f"is not a PEM CA bundle ({type(exc).__name__})")
            continue
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return AdminClient(token, ctx, name)
    logger.warning("SmtpRelay %s: %s", relay.meta.key, problem)
    return AdminClient(token, None, name, problem)


def _ready(pod: dict[str, Any]) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


async def _call(http: aiohttp.ClientSession, method: str, url: str, admin: AdminClient,
                body: dict[str, Any] | None = None, *,
                path: str = DRAIN_PATH) -> dict[str, Any] | None:
    """One /admin call over verified TLS; None when the pod cannot be asked (not answering,
    refusing, not verified)."""
    if admin.context is None or not url.startswith("https://"):
        return None
    try:
        async with http.request(method, url + path, json=body, ssl=admin.context,
                                server_hostname=admin.server_name,
                                headers={"Authorization": f"Bearer {admin.token}"}) as resp:
            if resp.status >= 300:
                logger.warning("%s %s%s: %d %s", method, url, path, resp.status,
                               (await resp.text())[:200])
                return None
            doc = await resp.json()
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        logger.warning("%s %s%s failed: %s", method, url, path, exc)
        return None
    return doc if isinstance(doc, dict) else None


async def step(rt: Runtime, relay: SmtpRelay, sts: dict[str, Any] | None,
               admin: AdminClient) -> ScaleStep:
    """One step of a scale-down (see the module docstring)."""
    desired = relay.spec.replicas
    current = ((sts or {}).get("spec") or {}).get("replicas")
    if not isinstance(current, int) or current <= desired:
        status = (sts or {}).get("status") or {}
        if int(status.get("readyReplicas") or 0) < int(status.get("replicas") or 0):
            await _call_off(rt, relay, admin, desired)
        return ScaleStep(None)
    if desired == 0:
        # No pod stays to take the queues: the pool stops, every volume is kept with its
        # queue (whenScaled: Retain), delivered when the pool runs again.
        return ScaleStep(None)
    pods = await rt.client.list(kube.PODS, relay.meta.namespace,
                                labels=relay_mod.selector_labels(relay))
    by_ordinal = {o: p for p in pods if (o := _ordinal(p, relay)) is not None}
    peers = [u for o, p in sorted(by_ordinal.items())
             if o < desired and _ready(p) and (u := _url(p)) is not None]
    removing = list(range(desired, current))
    if not peers:
        return ScaleStep(current, progress=(
            f"scaling {current} -> {desired}: waiting for a ready pod among ordinals "
            f"{_span(list(range(desired)))} to take the queues of ordinals {_span(removing)}"))
    if admin.context is None:
        return ScaleStep(current, progress=f"scaling {current} -> {desired}: {admin.problem}")
    left: dict[int, str] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http:
        for ordinal in removing:
            pod = by_ordinal.get(ordinal)
            url = _url(pod) if pod is not None else None
            if url is None:
                left[ordinal] = "pod not running (its volume holds its queue)"
                continue
            state = await _call(http, "GET", url, admin)
            # A pod restarted while draining stays drained but waits for the order again
            # (it keeps the peers, never the token).
            if state is not None and (not state.get("draining") or state.get("awaitingOrder")):
                state = await _call(http, "POST", url, admin,
                                    {"peers": peers, "token": admin.token})
            if state is None:
                left[ordinal] = "not answering"
                continue
            queued, sessions = int(state.get("queued") or 0), int(state.get("sessions") or 0)
            if queued or sessions or not state.get("draining"):
                left[ordinal] = f"{queued} message(s), {sessions} session(s)"
    if left:
        return ScaleStep(current, progress=f"scaling {current} -> {desired}: draining " + "; ".join(
            f"{relay.meta.name}-{o}: {why}" for o, why in sorted(left.items())))
    return ScaleStep(desired, removed=removing)


async def _call_off(rt: Runtime, relay: SmtpRelay, admin: AdminClient, desired: int) -> None:
    """No scale-down pending: a pod still draining from one called off accepts mail again.
    Only pods that are not ready are asked (a draining pod never is)."""
    pods = await rt.client.list(kube.PODS, relay.meta.namespace,
                                labels=relay_mod.selector_labels(relay))
    waiting = [(o, u) for p in pods if not _ready(p)
               and (o := _ordinal(p, relay)) is not None and o < desired
               and (u := _url(p)) is not None]
    if not waiting:
        return
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http:
        for ordinal, url in waiting:
            state = await _call(http, "GET", url, admin)
            if state is not None and state.get("draining"):
                logger.info("Scale-down of %s called off: %s-%d accepts mail again",
                            relay.meta.key, relay.meta.name, ordinal)
                await _call(http, "DELETE", url, admin)


async def delete_volumes(rt: Runtime, body: Body, relay: SmtpRelay, ordinals: list[int]) -> None:
    """Delete the spool volumes of drained ordinals (Kubernetes keeps a volume until its pod is
    gone). A refusal is reported (Event, metric); the volume holds no mail."""
    for ordinal in ordinals:
        name = f"spool-{relay.meta.name}-{ordinal}"
        try:
            if await rt.client.delete(kube.PVCS, relay.meta.namespace, name):
                logger.info("Spool volume %s deleted: its queue was handed to the pool", name)
        except ApiError as exc:
            child_write_failed(rt, body, {"kind": "PersistentVolumeClaim",
                                          "metadata": {"name": name}}, exc)


@dataclass(frozen=True)
class PodConfig:
    """What a running relay pod reports it runs (empty strings: it did not answer)."""

    config_hash: str = ""
    render: str = ""


async def pod_configs(rt: Runtime, relay: SmtpRelay,
                      admin: AdminClient) -> dict[str, PodConfig]:
    """Pod name -> the configuration it runs (``GET /admin/status``: the relay's own hash of
    its files, and the operator's render id), for every running pod of the relay."""
    pods = await rt.client.list(kube.PODS, relay.meta.namespace,
                                labels=relay_mod.selector_labels(relay))
    targets = sorted((str(p["metadata"]["name"]), u) for p in pods
                     if _ordinal(p, relay) is not None and (u := _url(p)) is not None)
    if not targets:
        return {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http:
        answers = await asyncio.gather(*(_call(http, "GET", u, admin, path=STATUS_PATH)
                                         for _n, u in targets))
    return {name: PodConfig(str((a or {}).get("configHash") or ""),
                            str((a or {}).get("render") or ""))
            for (name, _u), a in zip(targets, answers, strict=True)}


def _span(ordinals: list[int]) -> str:
    return f"{ordinals[0]}-{ordinals[-1]}" if len(ordinals) > 1 else str(ordinals[0])


async def push_revocation(rt: Runtime, relay: SmtpRelay, admin: AdminClient,
                          username: str) -> set[str]:
    """Tell every running pod of the relay to refuse `username` now (``POST /admin/revoke``),
    ahead of its mounted configuration; the names of the pods that confirm it is refused."""
    pods = await rt.client.list(kube.PODS, relay.meta.namespace,
                                labels=relay_mod.selector_labels(relay))
    targets = sorted((str(p["metadata"]["name"]), u) for p in pods
                     if _ordinal(p, relay) is not None and (u := _url(p)) is not None)
    if not targets:
        return set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http:
        answers = await asyncio.gather(*(
            _call(http, "POST", u, admin, {"username": username}, path=REVOKE_PATH)
            for _n, u in targets))
    return {name for (name, _u), a in zip(targets, answers, strict=True)
            if a is not None and a.get("revoked") is True}


async def push_password(rt: Runtime, relay: SmtpRelay, admin: AdminClient,
                        fields: dict[str, Any]) -> tuple[list[str], set[str]]:
    """Tell every running pod of the relay to run a rotated password now (``POST
    /admin/credential`` with the credential's password fields: hashes and ``passwordSerial``),
    ahead of its mounted configuration: the running pods asked, and the names of those that
    answer a serial at or after the one pushed."""
    pods = await rt.client.list(kube.PODS, relay.meta.namespace,
                                labels=relay_mod.selector_labels(relay))
    targets = sorted((str(p["metadata"]["name"]), u) for p in pods
                     if _ordinal(p, relay) is not None and (u := _url(p)) is not None)
    if not targets:
        return [], set()
    serial = int(fields["passwordSerial"])
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=HTTP_TIMEOUT)) as http:
        answers = await asyncio.gather(*(
            _call(http, "POST", u, admin, fields, path=CREDENTIAL_PATH) for _n, u in targets))
    return [n for n, _u in targets], {
        name for (name, _u), a in zip(targets, answers, strict=True)
        if a is not None and isinstance(a.get("passwordSerial"), int)
        and a["passwordSerial"] >= serial}
