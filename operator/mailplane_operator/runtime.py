"""The operator's per-process state: its configuration, the relay workers and small caches.

One `Runtime` is built by the composition root (`app.run`) and handed to every handler module
(`handlers/`) explicitly; nothing here is global. It knows kopf only for its settings.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

import kopf

from . import kube
from .dnscheck import DnsChecker
from .kube import ApiError, KubeClient
from .leader import LeaseSettings
from .metrics import OperatorMetrics
from .reconcile import domain as domain_mod
from .reconcile import relay as relay_mod
from .reconcile.models import RelayDefaults
from .reconcile.render import RenderResult

RelayKey = tuple[str, str]
Body = Mapping[str, Any]

FINALIZER = "mailplane.io/finalizer"
CACHE_SIZE = 20_000
K = TypeVar("K")
V = TypeVar("V")
MANAGED_BY_LABELS = {"app.kubernetes.io/managed-by": "mailplane-operator"}


@dataclass(frozen=True)
class OperatorConfig:
    """Everything `mailplane operator` can be told; defaults are production values."""

    credentials: kube.Credentials
    """The API server and how to log in to it (kopf's and `KubeClient`'s)."""
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
    operator_namespace: str | None = None
    """The operator's own namespace (in a pod): relays' NetworkPolicies let it reach the pods'
    ops port, where it tells pods to drain on a scale-down."""
    drain_poll: float = 2.0
    revocation_timeout: float = 300.0
    """How long a deleted credential's finalizer waits for every relay pod to run a
    configuration without it before it is released anyway (Event RevocationUnconfirmed), and
    how long a rotated password is pushed again to pods that have not confirmed it (Event
    RotationUnconfirmed)."""
    """How often a relay whose scale-down drains is rendered again."""
    dns_endpoints: bool = False
    """Publish the records of SendingDomains that leave spec.dnsEndpoint.enabled unset through
    external-dns DNSEndpoints (--dns-endpoints)."""
    relay_defaults: RelayDefaults = field(default_factory=RelayDefaults)
    """Pod and Service shape of relays whose SmtpRelay does not set it (--relay-defaults)."""
    """The DNS suffix of Services, for the host written into application Secrets."""
    cache_size: int = CACHE_SIZE
    """Entries per cache (parsed resources, Secrets read): least recently used dropped."""
    discovery_ttl: float = 300.0
    """How long an API discovery answer (is ServiceMonitor served?) is kept."""
    leader_election: LeaseSettings | None = None
    """Run only while holding this Lease (several replicas); None: always run."""
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
    # A deleted object keeps its finalizer until its timers (the credential's rotation check)
    # have stopped. kopf asks a timer that is mid-run to stop and looks again only after
    # cancellation_polling, 60 s by default: a credential deleted while its rotation check ran
    # held its finalizer, and its namespace's deletion, a minute after the relay had refused it.
    settings.background.cancellation_polling = 1.0
    if config.fast:
        settings.batching.batch_window = 0.01
        settings.batching.idle_timeout = 1.0
        settings.batching.exit_timeout = 2.0
        settings.watching.reconnect_backoff = 0.1
        settings.networking.error_backoffs = [0.1, 0.2, 0.5, 1.0]
    return settings


class BoundedCache(OrderedDict[K, V]):
    """A dict that keeps at most `maxsize` entries, dropping the least recently used."""

    def __init__(self, maxsize: int) -> None:
        super().__init__()
        self.maxsize = maxsize

    def __getitem__(self, key: K) -> V:
        value = super().__getitem__(key)
        self.move_to_end(key)
        return value

    def get(self, key: K, default: Any = None) -> Any:
        if key not in self:
            return default
        return self[key]  # counts as a use

    def __setitem__(self, key: K, value: V) -> None:
        super().__setitem__(key, value)
        self.move_to_end(key)
        while len(self) > self.maxsize:
            self.popitem(last=False)


class RelayWorker:
    """Coalesces render requests for one relay and lets requesters wait for "rendered since"."""

    def __init__(self) -> None:
        self.requested = 0
        self.rendered = 0
        self.wake = asyncio.Event()
        self.changed = asyncio.Condition()
        self.last: RenderResult | None = None
        self.history: list[str] = []
        """The render ids, oldest first (the last 64): a pod running one at or after a given
        render runs everything that render removed."""
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

    def rendered_hash(self, render_id: str) -> None:
        if not self.history or self.history[-1] != render_id:
            self.history = [*self.history[-63:], render_id]

    def since(self, render_id: str) -> set[str]:
        """The renders at or after `render_id` (empty when it is not remembered)."""
        if render_id not in self.history:
            return set()
        return set(self.history[len(self.history) - 1 - self.history[::-1].index(render_id):])

    async def done(self, ticket: int) -> None:
        async with self.changed:
            self.rendered = max(self.rendered, ticket)
            self.changed.notify_all()


@dataclass
class Runtime:
    """Per-process state shared by the handlers: built once by `app.run`, never global."""

    config: OperatorConfig
    client: KubeClient
    metrics: OperatorMetrics
    dns: DnsChecker
    clock: Callable[[], datetime] = field(default=lambda: datetime.now(UTC))
    """Injected so that tests can move time past a rotation interval instead of waiting."""
    random: Callable[[int], bytes] = os.urandom
    key_factory: Callable[[str], str] = domain_mod.generate_dkim_key
    workers: dict[RelayKey, RelayWorker] = field(default_factory=dict)
    secrets: BoundedCache[tuple[str, str], dict[str, Any] | None] = field(
        default_factory=lambda: BoundedCache(CACHE_SIZE))
    """Secrets read by name, until the next full resync (bounded: least recently used out)."""
    namespace_labels_cache: dict[str, tuple[float, dict[str, str]]] = field(
        default_factory=dict)
    credential_next_check: dict[str, datetime | None] = field(default_factory=dict)
    """When each credential's timer must reconcile (None: nothing scheduled); a missing entry
    means "reconcile at the next tick"."""
    locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    rotation_pushes: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    """Per credential: the confirmation of its last rotation pushed to the relay pods."""
    domain_wakers: dict[str, asyncio.Event] = field(default_factory=dict)
    parsed: BoundedCache[tuple[str, str], tuple[str, Any]] = field(
        default_factory=lambda: BoundedCache(CACHE_SIZE))
    """(uid, parser) -> (resourceVersion, parsed model or None when invalid); bounded, and
    entries of deleted objects age out."""

    def __post_init__(self) -> None:
        self.secrets.maxsize = self.parsed.maxsize = self.config.cache_size
        self.client.discovery_ttl = self.config.discovery_ttl

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
