"""The kopf side of the operator: thin handlers around the pure reconcile layer.

Each handler parses the custom resource (``reconcile.models``), reads what the pure function
needs (Secrets, the relay, namespace labels, DNS answers), calls it, writes its result through
``kube.KubeClient`` (skipping writes that change nothing), patches the status and posts the
Events it returns. Nothing here decides policy.

How a change reaches a relay's configuration
--------------------------------------------
kopf indexes keep every SmtpRelay, and every SendingDomain and SmtpCredential grouped by the relay
they reference. One worker per SmtpRelay (a kopf daemon) renders that relay's configuration
Secrets, children and status. Handlers *poke* the worker; pokes that arrive together are rendered
once. A deleted credential holds its finalizer until a render without it has been written, so it
loses access within the same reconcile. Rotation state lives in the application Secret
(``reconcile.credential``) and DKIM keys in the domain's Secret, so a restart loses nothing: the
indexes are complete before any handler runs, and the first render re-reads the Secrets.

`run` is the composition root: one `Runtime` (client, metrics, DNS, caches) built per process
and handed to the handlers explicitly.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, cast

import kopf

from . import kube
from .dnscheck import DnsChecker
from .kube import ApiError, KubeClient
from .metrics import OperatorMetrics
from .reconcile import credential as cred_mod
from .reconcile import domain as domain_mod
from .reconcile import relay as relay_mod
from .reconcile import retention as retention_mod
from .reconcile.conditions import READY, Event, get_condition, set_condition
from .reconcile.models import (
    GROUP,
    VERSION,
    RetentionPolicy,
    SendingDomain,
    SmtpCredential,
    SmtpRelay,
    SpecError,
    parse_retention_policy,
    parse_sending_domain,
    parse_smtp_credential,
    parse_smtp_relay,
)
from .reconcile.render import (
    REASON_DELETING,
    CredentialInput,
    DomainInput,
    RenderError,
    RenderResult,
    attached_domains,
    render_relay_config,
)

logger = logging.getLogger(__name__)

RelayKey = tuple[str, str]
Body = Mapping[str, Any]

FINALIZER = "mailplane.io/finalizer"
REASON_INVALID_SPEC = "InvalidSpec"
MANAGED_BY_LABELS = {"app.kubernetes.io/managed-by": "mailplane-operator"}


@dataclass(frozen=True)
class OperatorConfig:
    """Everything `mailplane operator` can be told; defaults are production values."""

    connection: kube.Connection
    namespaces: tuple[str, ...] = ()
    """Namespaces to watch (kopf patterns allowed); empty: the whole cluster."""
    dns_resolver: tuple[str, int] | None = None
    """Resolver for domain verification; None: the system resolver."""
    image: str = relay_mod.DEFAULT_IMAGE
    rotation_check_interval: float = 10.0
    """How often each credential's timer looks whether a rotation or an overlap end is due."""
    dns_check_initial: float = 30.0
    dns_check_max: float = 3600.0
    """DNS verification backoff: doubled from initial to max while a record is missing."""
    dns_recheck_interval: float = 3600.0
    """How often a verified domain is checked again."""
    relay_resync_interval: float = 300.0
    """Full re-render of every relay (re-reading Secrets), whatever happened."""
    render_debounce: float = 0.2
    """Pokes within this window after the first are rendered together."""
    namespace_cache_ttl: float = 30.0
    delete_timeout: float = 60.0
    cluster_domain: str = "cluster.local"
    """The DNS suffix of Services, for the host written into application Secrets."""
    fast: bool = False
    """Short kopf batching and backoffs, for tests against the emulator."""


def build_settings(config: OperatorConfig) -> kopf.OperatorSettings:
    settings = kopf.OperatorSettings()
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(
        prefix="operator.mailplane.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="operator.mailplane.io", key="last-handled-configuration")
    # One replica (the chart runs one): no peering objects to create or watch.
    settings.peering.standalone = True
    # Our own Events say what happened; kopf's "Handler succeeded" would drown them.
    settings.posting.level = logging.WARNING
    settings.posting.reporting_component = "mailplane-operator"
    if config.fast:
        settings.batching.batch_window = 0.01
        settings.batching.idle_timeout = 1.0
        settings.batching.exit_timeout = 2.0
        settings.watching.reconnect_backoff = 0.1
        settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1.0]
        settings.scanning.disabled = True
    return settings


def _first(values: Iterable[Any] | None) -> Any:
    for value in values or ():
        return value
    return None


def _key(body: Body) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def _ref_key(body: Body) -> RelayKey:
    meta = body.get("metadata") or {}
    ref = ((body.get("spec") or {}).get("relayRef") or {})
    return (str(ref.get("namespace") or meta.get("namespace")), str(ref.get("name")))


def merge_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON merge patch (RFC 7386) that turns `have` into `want`: keys `want` lacks are
    removed (None), nested objects are diffed, lists are replaced; empty when equal."""
    out: dict[str, Any] = {}
    for key, value in want.items():
        current = have.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            sub = merge_diff(current, value)
            if sub:
                out[key] = sub
        elif value is None:
            if key in have:
                out[key] = None
        elif current != value:
            out[key] = value
    for key in have:
        if key not in want:
            out[key] = None
    return out


def post_events(body: Body, events: Iterable[Event]) -> None:
    for event in events:
        kopf.event(cast("kopf.Body", body), type=event.type, reason=event.reason,
                   message=event.message)


class RelayWorker:
    """Coalesces render requests for one relay and lets requesters wait for "rendered since"."""

    def __init__(self) -> None:
        self.requested = 0
        self.rendered = 0
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.last: RenderResult | None = None
        self.renders = 0
        self.render_seconds = 0.0
        """Total time spent rendering (for the benchmark and debug logs)."""

    def poke(self) -> int:
        self.requested += 1
        self.wake.set()
        return self.requested

    async def wait(self, ticket: int, within: float) -> bool:
        async with self.changed:
            try:
                await asyncio.wait_for(
                    self.changed.wait_for(lambda: self.rendered >= ticket), within)
            except TimeoutError:
                return False
        return True

    async def done(self, ticket: int) -> None:
        async with self.changed:
            self.rendered = max(self.rendered, ticket)
            self.changed.notify_all()


@dataclass
class Runtime:
    """Per-process state shared by the handlers: built once by `run`, never global."""

    config: OperatorConfig
    client: KubeClient
    metrics: OperatorMetrics
    dns: DnsChecker
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    """Injected so that tests can move time past a rotation interval instead of waiting."""
    random: Callable[[int], bytes] = os.urandom
    key_factory: Callable[[str], str] = domain_mod.generate_dkim_key
    workers: dict[RelayKey, RelayWorker] = field(default_factory=dict)
    secrets: dict[tuple[str, str], dict[str, Any] | None] = field(default_factory=dict)
    namespace_labels_cache: dict[str, tuple[float, dict[str, str]]] = field(
        default_factory=dict)
    credential_next_check: dict[str, datetime | None] = field(default_factory=dict)
    """When each credential's timer must reconcile (None: nothing scheduled); a missing entry
    means "reconcile at the next tick"."""
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    domain_wakers: dict[str, asyncio.Event] = field(default_factory=dict)
    parsed: dict[tuple[str, str], tuple[str, Any]] = field(default_factory=dict)
    """(uid, parser) -> (resourceVersion, parsed model or None when invalid)."""

    # -- reads through small caches ------------------------------------------------------------

    async def secret(self, namespace: str, name: str, *,
                     fresh: bool = False) -> dict[str, Any] | None:
        key = (namespace, name)
        if fresh or key not in self.secrets:
            self.secrets[key] = await self.client.get(kube.SECRETS, namespace, name)
        return self.secrets[key]

    def remember_secret(self, namespace: str, name: str, body: dict[str, Any] | None) -> None:
        self.secrets[(namespace, name)] = body

    async def namespace_labels(self, namespace: str) -> dict[str, str]:
        cached = self.namespace_labels_cache.get(namespace)
        if cached and time.monotonic() - cached[0] < self.config.namespace_cache_ttl:
            return cached[1]
        try:
            ns = await self.client.get(kube.NAMESPACES, None, namespace)
        except ApiError as exc:
            if exc.temporary:
                raise
            ns = None  # e.g. forbidden: the pure code still knows kubernetes.io/metadata.name
        labels = dict(((ns or {}).get("metadata") or {}).get("labels") or {})
        self.namespace_labels_cache[namespace] = (time.monotonic(), labels)
        return labels

    async def labels_of(self, namespaces: Iterable[str]) -> dict[str, dict[str, str]]:
        names = sorted(set(namespaces))
        values = await asyncio.gather(*(self.namespace_labels(n) for n in names))
        return dict(zip(names, values, strict=True))

    def lock(self, key: str) -> asyncio.Lock:
        return self.locks.setdefault(key, asyncio.Lock())

    # -- relay render requests -----------------------------------------------------------------

    def poke(self, relay_key: RelayKey) -> int | None:
        worker = self.workers.get(relay_key)
        return worker.poke() if worker is not None else None

    async def render_now(self, relay_key: RelayKey, within: float) -> RenderResult | None:
        """Ask for a render and wait for it; None if the relay has no worker or it timed out."""
        worker = self.workers.get(relay_key)
        if worker is None:
            return None
        ticket = worker.poke()
        if not await worker.wait(ticket, within):
            return None
        return worker.last

    def wake_domain(self, key: str) -> None:
        waker = self.domain_wakers.get(key)
        if waker is not None:
            waker.set()


# --------------------------------------------------------------------------------------------
# Gathering inputs for the pure functions
# --------------------------------------------------------------------------------------------


def _parse_all(parse: Callable[[Body], Any], bodies: Iterable[Body],
               cache: dict[tuple[str, str], tuple[str, Any]] | None = None) -> list[Any]:
    """Parse bodies, skipping invalid ones (reported by their own handlers). With `cache`,
    a body whose uid and resourceVersion were parsed before is not parsed again: a relay with
    a thousand credentials is re-rendered often, its credentials rarely change."""
    out = []
    for body in bodies:
        meta = body.get("metadata") or {}
        key = (str(meta.get("uid")), parse.__name__)
        version = str(meta.get("resourceVersion"))
        hit = cache.get(key) if cache is not None else None
        if hit is not None and hit[0] == version:
            if hit[1] is not None:
                out.append(hit[1])
            continue
        try:
            parsed = parse(body)
        except SpecError:
            parsed = None
        if cache is not None and meta.get("resourceVersion"):
            cache[key] = (version, parsed)
        if parsed is not None:
            out.append(parsed)
    return out


async def domain_inputs(rt: Runtime, bodies: Iterable[Body]) -> list[DomainInput]:
    domains: list[SendingDomain] = _parse_all(parse_sending_domain, bodies, rt.parsed)
    secrets = await asyncio.gather(*(
        rt.secret(d.meta.namespace, domain_mod.secret_name(d)) for d in domains))
    return [DomainInput(d, s) for d, s in zip(domains, secrets, strict=True)]


async def credential_inputs(rt: Runtime, bodies: Iterable[Body]) -> list[CredentialInput]:
    creds: list[SmtpCredential] = _parse_all(parse_smtp_credential, bodies, rt.parsed)
    secrets = await asyncio.gather(*(
        rt.secret(c.meta.namespace, c.secret_name) for c in creds))
    return [CredentialInput(c, s) for c, s in zip(creds, secrets, strict=True)]


def _relay_of(relays_idx: kopf.Index[RelayKey, Body], key: RelayKey) -> SmtpRelay | None:
    body = _first(relays_idx.get(key))
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None  # a relay on its way out admits nothing new
    try:
        return parse_smtp_relay(body)
    except SpecError:
        return None


# --------------------------------------------------------------------------------------------
# The relay worker: config Secrets, children, status
# --------------------------------------------------------------------------------------------


def _with_conditions(body: Body | Mapping[str, Any],
                     conds: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole status with new conditions: _patch_status sends what is wanted, so a status
    of conditions alone would null the other fields (configHash, dnsRecords, ...)."""
    return {**(body.get("status") or {}), "conditions": conds}


def invalid_spec_conditions(rt: Runtime, kind: str, body: Body | Mapping[str, Any],
                            exc: SpecError) -> list[dict[str, Any]]:
    """Count an invalid spec and return the conditions saying so (Ready=False, InvalidSpec,
    with the message that names the field)."""
    rt.metrics.invalid(kind)
    return set_condition((body.get("status") or {}).get("conditions"), READY, False,
                         REASON_INVALID_SPEC, str(exc),
                         int(body["metadata"].get("generation") or 0), rt.clock())


async def render_relay(rt: Runtime, key: RelayKey, indexes: Mapping[str, Any],
                       log: logging.Logger | logging.LoggerAdapter[Any]) -> RenderResult | None:
    relays_idx = indexes["relays_idx"]
    body = _first(relays_idx.get(key))
    if body is None:
        return None
    namespace, name = key
    try:
        relay = parse_smtp_relay(body)
    except SpecError as exc:
        conds = invalid_spec_conditions(rt, "SmtpRelay", body, exc)
        await _patch_status(rt, kube.SMTP_RELAYS, body, _with_conditions(body, conds))
        return None
    with rt.metrics.reconcile("SmtpRelay"):
        now = rt.clock()
        domains = await domain_inputs(rt, indexes["domains_idx"].get(key, ()))
        creds = await credential_inputs(rt, indexes["credentials_idx"].get(key, ()))
        policies: list[RetentionPolicy] = _parse_all(
            parse_retention_policy, indexes["retention_idx"].get(namespace, ()))
        ns_labels = await rt.labels_of(
            [namespace, *(d.domain.meta.namespace for d in domains),
             *(c.credential.meta.namespace for c in creds)])
        previous_hash = (body.get("status") or {}).get("configHash")
        try:
            # CPU-bound (and slower with many RSA keys to validate): off the event loop, so
            # that kopf keeps handling events while a large relay renders.
            result = await asyncio.to_thread(
                render_relay_config, relay, domains=domains, credentials=creds,
                policies=policies, namespace_labels=ns_labels, now=now)
        except RenderError as exc:
            status = relay_mod.relay_status(
                relay, statefulset_status=None, config_hash=previous_hash or "",
                config_secrets=[], domains=[], credentials=0, excluded=0,
                retention_policies=[], now=now, error=str(exc))
            # Only the condition: the counts and config hash still describe the Secrets in
            # force, which stay as they were.
            await _patch_status(rt, kube.SMTP_RELAYS, body, {
                **(body.get("status") or {}), "conditions": status["conditions"]})
            post_events(body, [Event("Warning", "ConfigInvalid", str(exc))])
            raise
        changed = False
        for manifest in result.secrets:
            action, _obj = await rt.client.apply(manifest)
            changed |= action != "unchanged"
        existing = await rt.client.list(kube.SECRETS, namespace, labels={
            relay_mod.LABEL_RELAY: name, relay_mod.LABEL_COMPONENT: "config"})
        for secret in existing:
            if secret["metadata"]["name"] not in result.secret_names:
                await rt.client.delete(kube.SECRETS, namespace, secret["metadata"]["name"])
                changed = True
        monitor = await rt.client.has_api("monitoring.coreos.com/v1", "servicemonitors")
        for child in relay_mod.relay_children(relay, image=relay.spec.image or rt.config.image,
                                              service_monitor_available=monitor,
                                              config_hash=result.config_hash):
            await rt.client.apply(child)
        sts = await rt.client.get(kube.STATEFULSETS, namespace, name)
        status = relay_mod.relay_status(
            relay, statefulset_status=(sts or {}).get("status"), config_hash=result.config_hash,
            config_secrets=result.secret_names, domains=list(result.domains),
            credentials=len(result.credentials), excluded=len(result.excluded),
            retention_policies=list(result.retention.policies), now=now)
        await _patch_status(rt, kube.SMTP_RELAYS, body, status)
        if changed and result.config_hash != previous_hash:
            log.info("Rendered configuration %s: %d domains, %d credentials, %d Secrets",
                     result.config_hash, len(result.domains), len(result.credentials),
                     len(result.secrets))
            post_events(body, [Event(
                "Normal", "ConfigRendered",
                f"configuration {result.config_hash}: {len(result.domains)} domains, "
                f"{len(result.credentials)} credentials in {len(result.secrets)} Secret(s)")])
        await _retention_statuses(rt, namespace, indexes, now)
        _recheck_stale_credentials(rt, result, indexes["credentials_idx"].get(key, ()))
        return result


def _recheck_stale_credentials(rt: Runtime, result: RenderResult,
                               bodies: Iterable[Body]) -> None:
    """A credential whose Ready reason disagrees with this render (its relay or a domain
    appeared since, its Secret went missing) is reconciled again by its next timer tick."""
    rendered = set(result.credentials)
    for body in bodies:
        key = _key(body)
        if key in rendered:
            suspended = bool((body.get("spec") or {}).get("suspended"))
            expected = cred_mod.REASON_SUSPENDED if suspended else cred_mod.REASON_READY
        else:
            exclusion = result.exclusion("SmtpCredential", key)
            if exclusion is None or exclusion.reason == REASON_DELETING:
                continue  # not this relay's, invalid, or on its way out
            expected = exclusion.reason
        ready = get_condition((body.get("status") or {}).get("conditions"), READY)
        if ready is None or ready.get("reason") != expected:
            rt.credential_next_check.pop(key, None)


async def _retention_statuses(rt: Runtime, namespace: str, indexes: Mapping[str, Any],
                              now: datetime) -> None:
    relays: list[SmtpRelay] = _parse_all(
        parse_smtp_relay, [b for (ns, _n), store in indexes["relays_idx"].items()
                           if ns == namespace for b in store])
    for body in indexes["retention_idx"].get(namespace, ()):
        try:
            policy = parse_retention_policy(body)
        except SpecError:
            continue
        await _patch_status(rt, kube.RETENTION_POLICIES, body,
                            retention_mod.retention_status(policy, relays, now))


async def _patch_status(rt: Runtime, resource: kube.Resource, body: Body,
                        status: Mapping[str, Any]) -> None:
    diff = merge_diff(body.get("status") or {}, status)
    if not diff:
        return
    meta = body["metadata"]
    await rt.client.patch(resource, meta.get("namespace"), meta["name"], {"status": diff},
                          status=True)


async def _wait_for_wake(wake: asyncio.Event, stopped: Any, within: float) -> bool:
    """True when woken, False on timeout or when the daemon is being stopped."""
    wake_task = asyncio.ensure_future(wake.wait())
    stop_task = asyncio.ensure_future(_flag(stopped))
    try:
        done, _pending = await asyncio.wait({wake_task, stop_task}, timeout=within,
                                            return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (wake_task, stop_task):
            task.cancel()
        # The helpers' own cancellations are results here; a cancellation of this coroutine
        # still propagates.
        await asyncio.gather(wake_task, stop_task, return_exceptions=True)
    return wake_task in done and not stopped


async def _flag(stopped: Any) -> None:
    await stopped.wait()


# --------------------------------------------------------------------------------------------
# Credentials
# --------------------------------------------------------------------------------------------


def _credential_state(result: cred_mod.CredentialResult, cred: SmtpCredential) -> str:
    if not result.admission.allowed:
        return "invalid"
    return "suspended" if cred.spec.suspended else "active"


async def reconcile_credential(rt: Runtime, body: Body, patch: kopf.Patch,
                               indexes: Mapping[str, Any], *, poke: bool) -> None:
    key = _key(body)
    try:
        cred = parse_smtp_credential(body)
    except SpecError as exc:
        patch.setdefault("status", {})["conditions"] = invalid_spec_conditions(
            rt, "SmtpCredential", body, exc)
        post_events(body, [Event("Warning", REASON_INVALID_SPEC, str(exc))])
        return
    relay_key = (cred.relay_namespace, cred.spec.relay_ref.name)
    async with rt.lock(key):
        with rt.metrics.reconcile("SmtpCredential"):
            now = rt.clock()
            relay = _relay_of(indexes["relays_idx"], relay_key)
            attached: list[str] = []
            ns_labels = await rt.namespace_labels(cred.meta.namespace)
            worker = rt.workers.get(relay_key)
            if relay is not None and worker is not None and worker.last is not None:
                # The domains the relay actually signs for, as of its last render; a render
                # that changes them re-checks the credentials it disagrees with.
                attached = list(worker.last.domains)
            elif relay is not None:
                domains = await domain_inputs(rt, indexes["domains_idx"].get(relay_key, ()))
                labels = await rt.labels_of(d.domain.meta.namespace for d in domains)
                included, _excluded = attached_domains(relay, domains, labels)
                attached = list(included)
            existing = await rt.secret(cred.meta.namespace, cred.secret_name, fresh=True)
            endpoint = (cred_mod.relay_endpoint(relay, rt.config.cluster_domain)
                        if relay is not None else None)
            result = cred_mod.reconcile_credential(
                cred, relay=relay, namespace_labels=ns_labels, attached_domains=attached,
                existing_secret=existing, now=now, random=rt.random, endpoint=endpoint)
            written = False
            if result.secret is not None:
                action, obj = await rt.client.apply(result.secret)
                rt.remember_secret(cred.meta.namespace, cred.secret_name, obj)
                written = action != "unchanged"
            diff = merge_diff(body.get("status") or {}, result.status)
            if diff:
                patch.setdefault("status", {}).update(diff)
            post_events(body, result.events)
            rt.credential_next_check[key] = result.next_check
            rt.metrics.credential(
                cred.meta.namespace, cred.meta.name, state=_credential_state(result, cred),
                rotated_at=result.state.rotated_at.timestamp() if result.state else None,
                interval=cred.spec.rotation.interval)
    if written or poke:
        rt.poke(relay_key)


# --------------------------------------------------------------------------------------------
# Domains
# --------------------------------------------------------------------------------------------


async def reconcile_domain_once(rt: Runtime, body: Body, indexes: Mapping[str, Any],
                                log: Any) -> tuple[bool, datetime | None]:
    """One verification and rotation step. Returns (nothing to wait for in DNS, when the
    rotation needs the next step)."""
    dom = parse_sending_domain(body)
    relay_key = (dom.relay_namespace, dom.spec.relay_ref.name)
    with rt.metrics.reconcile("SendingDomain"):
        relay = _relay_of(indexes["relays_idx"], relay_key)
        ns_labels = await rt.namespace_labels(dom.meta.namespace)
        existing = await rt.secret(dom.meta.namespace, domain_mod.secret_name(dom), fresh=True)
        observed = None
        if not dom.spec.verification.skip:
            observed = await rt.dns.lookup(domain_mod.names_to_check(dom, existing))
        now = rt.clock()
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        result = await asyncio.to_thread(
            domain_mod.reconcile_domain, dom, relay=relay, namespace_labels=ns_labels,
            existing_secret=existing, observed=observed, now=now, key_factory=rt.key_factory)
        action, obj = await rt.client.apply(result.secret)
        rt.remember_secret(dom.meta.namespace, domain_mod.secret_name(dom), obj)
        await _patch_status(rt, kube.SENDING_DOMAINS, body, result.status)
        post_events(body, result.events)
        conds = result.status.get("conditions")
        dkim_ok = get_condition(conds, domain_mod.DKIM_VERIFIED)
        spf_ok = get_condition(conds, domain_mod.SPF_VERIFIED)
        rt.metrics.domain(
            dom.spec.domain,
            keys={s: k.created_at.timestamp() for s, k in result.state.keys.items()},
            interval=dom.spec.dkim.rotation_interval,
            dkim=bool(dkim_ok and dkim_ok.get("status") == "True"),
            spf=bool(spf_ok and spf_ok.get("status") == "True"))
        if action != "unchanged":
            log.debug("DKIM Secret %s %s", domain_mod.secret_name(dom), action)
            rt.poke(relay_key)
        # A published next key is waited for like an unverified record: with backoff.
        settled = (result.enabled or bool(dom.spec.verification.skip)) and (
            result.state.phase != "NextKeyPublished")
        return settled, result.next_check


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------


def _index_keys(**kwargs: Any) -> Any:
    body = kwargs["body"]
    return {_ref_key(body): dict(body)}


def build_registry(rt: Runtime) -> kopf.OperatorRegistry:
    """Every handler, bound to one Runtime."""
    registry = kopf.OperatorRegistry()
    config = rt.config
    relays = (GROUP, VERSION, "smtprelays")
    domains = (GROUP, VERSION, "sendingdomains")
    creds = (GROUP, VERSION, "smtpcredentials")
    policies = (GROUP, VERSION, "retentionpolicies")

    @kopf.on.login(registry=registry)
    def login(**_: Any) -> kopf.ConnectionInfo:
        conn = config.connection
        return kopf.ConnectionInfo(
            server=conn.server, ca_path=conn.ca_path, insecure=conn.insecure or None,
            token=conn.current_token(), certificate_path=conn.certificate_path,
            private_key_path=conn.private_key_path, default_namespace=conn.default_namespace,
            scheme="Bearer" if conn.current_token() else None)

    # -- indexes ---------------------------------------------------------------------------------

    @kopf.index(*relays, id="relays_idx", registry=registry)
    def relays_idx(**kwargs: Any) -> Any:
        body = kwargs["body"]
        return {(kwargs["namespace"], kwargs["name"]): dict(body)}

    kopf.index(*domains, id="domains_idx", registry=registry)(_index_keys)
    kopf.index(*creds, id="credentials_idx", registry=registry)(_index_keys)

    @kopf.index(*policies, id="retention_idx", registry=registry)
    def retention_idx(**kwargs: Any) -> Any:
        return {kwargs["namespace"]: dict(kwargs["body"])}

    # -- relays ----------------------------------------------------------------------------------

    @kopf.daemon(*relays, id="relay_worker", cancellation_timeout=5.0, registry=registry)
    async def relay_worker(**kwargs: Any) -> None:
        key: RelayKey = (kwargs["namespace"], kwargs["name"])
        stopped, logger = kwargs["stopped"], kwargs["logger"]
        worker = rt.workers.setdefault(key, RelayWorker())
        last_full = time.monotonic()
        failures = 0
        try:
            while not stopped:
                worker.wake.clear()
                ticket = worker.requested
                if time.monotonic() - last_full > config.relay_resync_interval:
                    # Re-read every Secret now and then: a hand edit must not be ignored forever.
                    rt.secrets.clear()
                    last_full = time.monotonic()
                delay = config.relay_resync_interval
                render_started = time.monotonic()
                try:
                    worker.last = await render_relay(rt, key, kwargs, logger)
                    worker.renders += 1
                    failures = 0
                except Exception as exc:
                    # Logged and retried with backoff; the worker must outlive any one failure
                    # or the relay's pokes would go nowhere.
                    failures += 1
                    delay = min(2.0 ** failures * (0.1 if config.fast else 1.0), 60.0)
                    if isinstance(exc, ApiError | RenderError | OSError):
                        logger.warning("Rendering failed (attempt %d), retrying in %.1fs: %s",
                                       failures, delay, exc)
                    else:
                        logger.exception("Rendering failed unexpectedly (attempt %d), retrying "
                                         "in %.1fs", failures, delay)
                await worker.done(ticket)
                took = time.monotonic() - render_started
                worker.render_seconds += took
                logger.debug("Render %d took %.3fs", worker.renders, took)
                if await _wait_for_wake(worker.wake, stopped, delay):
                    # A burst of pokes (many credentials created together) renders once; a
                    # render that took long waits as long again (up to a second), so that
                    # rendering a large relay does not take all of the operator's time.
                    await asyncio.sleep(max(config.render_debounce, min(took, 1.0)))
        finally:
            if rt.workers.get(key) is worker:
                del rt.workers[key]
            await worker.done(worker.requested)
            for body in kwargs["credentials_idx"].get(key, ()):
                rt.credential_next_check.pop(_key(body), None)

    @kopf.on.update(*relays, id="relay_changed", registry=registry)
    async def relay_changed(**kwargs: Any) -> None:
        key: RelayKey = (kwargs["namespace"], kwargs["name"])
        rt.poke(key)
        for body in kwargs["domains_idx"].get(key, ()):
            rt.wake_domain(_key(body))

    @kopf.on.event(*relays, id="relay_event", registry=registry)
    async def relay_event(**kwargs: Any) -> None:
        if kwargs["type"] == "DELETED":
            key: RelayKey = (kwargs["namespace"], kwargs["name"])
            for body in kwargs["credentials_idx"].get(key, ()):
                rt.credential_next_check.pop(_key(body), None)

    @kopf.on.event("apps", "v1", "statefulsets", labels=MANAGED_BY_LABELS,
                   id="relay_replicas", registry=registry)
    async def relay_replicas(**kwargs: Any) -> None:
        body, namespace = kwargs["body"], kwargs["namespace"]
        instance = ((body.get("metadata") or {}).get("labels") or {}).get(
            "app.kubernetes.io/instance")
        if instance:
            rt.poke((namespace, instance))

    # -- domains ---------------------------------------------------------------------------------

    @kopf.daemon(*domains, id="domain_worker", cancellation_timeout=5.0, registry=registry)
    async def domain_worker(**kwargs: Any) -> None:
        body, stopped, logger = kwargs["body"], kwargs["stopped"], kwargs["logger"]
        key = _key(body)
        waker = rt.domain_wakers.setdefault(key, asyncio.Event())
        backoff = config.dns_check_initial
        try:
            while not stopped:
                waker.clear()
                try:
                    verified, next_step = await reconcile_domain_once(rt, body, kwargs, logger)
                except SpecError as exc:
                    conds = invalid_spec_conditions(rt, "SendingDomain", body, exc)
                    await _patch_status(rt, kube.SENDING_DOMAINS, body,
                                        _with_conditions(body, conds))
                    verified, next_step = True, None  # nothing to retry until the spec changes
                    delay = config.dns_recheck_interval
                except ApiError as exc:
                    logger.warning("Reconcile failed, retrying in %.1fs: %s", backoff, exc)
                    verified, next_step = False, None
                except Exception:
                    logger.exception("Reconcile failed unexpectedly, retrying in %.1fs", backoff)
                    verified, next_step = False, None
                if verified:
                    backoff = config.dns_check_initial
                    delay = config.dns_recheck_interval
                else:
                    delay, backoff = backoff, min(backoff * 2, config.dns_check_max)
                if next_step is not None:
                    delay = max(0.0, min(delay, (next_step - rt.clock()).total_seconds()))
                if await _wait_for_wake(waker, stopped, delay):
                    backoff = config.dns_check_initial
        finally:
            if rt.domain_wakers.get(key) is waker:
                del rt.domain_wakers[key]

    @kopf.on.update(*domains, id="domain_changed", registry=registry)
    async def domain_changed(**kwargs: Any) -> None:
        rt.wake_domain(_key(kwargs["body"]))

    @kopf.on.event(*domains, id="domain_event", registry=registry)
    async def domain_event(**kwargs: Any) -> None:
        body = kwargs["body"]
        # Status (verification) decides whether the relay signs for the domain: every event,
        # including the status patches and the deletion, re-renders (a no-op when unchanged).
        rt.poke(_ref_key(body))

    @kopf.on.delete(*domains, id="domain_deleted", registry=registry)
    async def domain_deleted(**kwargs: Any) -> None:
        body = kwargs["body"]
        relay_key = _ref_key(body)
        result = await rt.render_now(relay_key, config.delete_timeout)
        if rt.workers.get(relay_key) is not None and result is None:
            raise kopf.TemporaryError("the relay configuration is not rendered yet", delay=1)
        rt.metrics.domain(str((body.get("spec") or {}).get("domain")), keys=None)

    # -- credentials -----------------------------------------------------------------------------

    @kopf.on.resume(*creds, id="credential", registry=registry)
    @kopf.on.create(*creds, id="credential", registry=registry)
    @kopf.on.update(*creds, id="credential", registry=registry)
    async def credential(**kwargs: Any) -> None:
        try:
            await reconcile_credential(rt, kwargs["body"], kwargs["patch"], kwargs, poke=True)
        except ApiError as exc:
            if exc.temporary:
                raise kopf.TemporaryError(str(exc), delay=1 if config.fast else 10) from None
            raise

    @kopf.timer(*creds, id="credential_rotation", interval=config.rotation_check_interval,
                initial_delay=config.rotation_check_interval, registry=registry)
    async def credential_rotation(**kwargs: Any) -> None:
        body, patch = kwargs["body"], kwargs["patch"]
        key = _key(body)
        if key in rt.credential_next_check:
            due = rt.credential_next_check[key]
            if due is None or rt.clock() < due:
                return  # nothing scheduled yet; a relay render drops the entry when stale
        await reconcile_credential(rt, body, patch, kwargs, poke=False)

    @kopf.on.delete(*creds, id="credential_deleted", registry=registry)
    async def credential_deleted(**kwargs: Any) -> None:
        body, namespace, name = kwargs["body"], kwargs["namespace"], kwargs["name"]
        relay_key = _ref_key(body)
        key = _key(body)
        if rt.workers.get(relay_key) is not None:
            result = await rt.render_now(relay_key, config.delete_timeout)
            if result is None or key in result.credentials:
                # The finalizer stays until the relay no longer accepts this credential.
                raise kopf.TemporaryError("the relay configuration still holds this credential",
                                          delay=1)
        rt.credential_next_check.pop(key, None)
        rt.locks.pop(key, None)
        rt.metrics.credential(namespace, name, state=None)

    # -- retention policies ----------------------------------------------------------------------

    @kopf.on.event(*policies, id="retention_event", registry=registry)
    async def retention_event(**kwargs: Any) -> None:
        namespace = kwargs["namespace"]
        for relay_ns, relay_name in list(rt.workers):
            if relay_ns == namespace:
                rt.poke((relay_ns, relay_name))

    @kopf.on.resume(*policies, id="retention", registry=registry)
    @kopf.on.create(*policies, id="retention", registry=registry)
    @kopf.on.update(*policies, id="retention", registry=registry)
    async def retention(**kwargs: Any) -> None:
        body, namespace, patch = kwargs["body"], kwargs["namespace"], kwargs["patch"]
        try:
            policy = parse_retention_policy(body)
        except SpecError as exc:
            patch.setdefault("status", {})["conditions"] = invalid_spec_conditions(
                rt, "RetentionPolicy", body, exc)
            return
        with rt.metrics.reconcile("RetentionPolicy"):
            relays_in_ns: list[SmtpRelay] = _parse_all(parse_smtp_relay, [
                b for (ns, _n), store in kwargs["relays_idx"].items() if ns == namespace
                for b in store])
            status = retention_mod.retention_status(policy, relays_in_ns, rt.clock())
            diff = merge_diff(body.get("status") or {}, status)
            if diff:
                patch.setdefault("status", {}).update(diff)

    return registry


async def run(config: OperatorConfig, *, metrics: OperatorMetrics | None = None,
              stop_flag: Any = None, ready_flag: Any = None,
              clock: Callable[[], datetime] | None = None,
              liveness_endpoint: str | None = None,
              on_runtime: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Run the operator until `stop_flag` is set (or forever): the composition root."""
    metrics = metrics if metrics is not None else OperatorMetrics.create()
    async with KubeClient(config.connection) as client:
        rt = Runtime(config=config, client=client, metrics=metrics,
                     dns=DnsChecker(config.dns_resolver))
        if clock is not None:
            rt.clock = clock
        if on_runtime is not None:
            maybe = on_runtime(rt)
            if maybe is not None:
                await maybe
        try:
            await kopf.operator(
                registry=build_registry(rt),
                settings=build_settings(config),
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                stop_flag=stop_flag,
                ready_flag=ready_flag,
                liveness_endpoint=liveness_endpoint,
            )
        finally:
            metrics.up.set(0)
