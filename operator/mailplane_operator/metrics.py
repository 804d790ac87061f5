"""Operator metrics (Prometheus), registered on an injected registry.

Names and labels are fixed here; label values come from small sets (kind, result, state, check)
or from the resources themselves (a credential's namespace/name, a SendingDomain's domain), whose
number the platform team controls. Never an address, never a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

KINDS = ("SmtpRelay", "SendingDomain", "SmtpCredential", "RetentionPolicy")
CHILD_KINDS = ("StatefulSet", "Service", "PodDisruptionBudget", "ServiceMonitor",
               "NetworkPolicy", "Secret", "PersistentVolumeClaim", "other")
FINALIZER = "mailplane.io/finalizer"
CREDENTIAL_STATES = ("active", "suspended", "invalid")


@dataclass
class OperatorMetrics:
    registry: CollectorRegistry
    reconciles: Counter
    reconcile_duration: Histogram
    credentials: Gauge
    credential_last_rotation: Gauge
    credential_rotation_interval: Gauge
    dkim_key_created: Gauge
    dkim_rotation_interval: Gauge
    domain_verified: Gauge
    domain_disable_time: Gauge
    up: Gauge
    leader: Gauge
    child_write_failures: Counter
    stale_generation: Gauge
    finalizer_pending: Gauge
    _stale_since: dict[tuple[str, str], float] = field(default_factory=dict)
    _deleting_since: dict[tuple[str, str], float] = field(default_factory=dict)
    _credential_states: dict[str, str] = field(default_factory=dict)
    _dkim_selectors: dict[str, set[str]] = field(default_factory=dict)
    _domain_claims: dict[str, str] = field(default_factory=dict)
    _domain_checks: set[tuple[str, str]] = field(default_factory=set)
    """domain -> the SendingDomain (namespace/name) whose values its series show."""

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> OperatorMetrics:
        reg = registry if registry is not None else CollectorRegistry()
        metrics = cls(
            registry=reg,
            reconciles=Counter(
                "mailplane_operator_reconciles_total",
                "Reconciles by resource kind and result (ok, error, invalid).",
                ["kind", "result"], registry=reg),
            reconcile_duration=Histogram(
                "mailplane_operator_reconcile_duration_seconds",
                "Time spent in one reconcile, by resource kind.", ["kind"], registry=reg,
                buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)),
            credentials=Gauge(
                "mailplane_operator_credentials",
                "SmtpCredentials by state: active (rendered), suspended, invalid (Ready=False).",
                ["state"], registry=reg),
            credential_last_rotation=Gauge(
                "mailplane_operator_credential_last_rotation_timestamp_seconds",
                "When the credential's password was last rotated (Unix time).",
                ["namespace", "name"], registry=reg),
            credential_rotation_interval=Gauge(
                "mailplane_operator_credential_rotation_interval_seconds",
                "The credential's scheduled rotation interval (0: on demand only).",
                ["namespace", "name"], registry=reg),
            dkim_key_created=Gauge(
                "mailplane_operator_dkim_key_created_timestamp_seconds",
                "When each published DKIM key was generated (Unix time).",
                ["domain", "selector"], registry=reg),
            dkim_rotation_interval=Gauge(
                "mailplane_operator_dkim_rotation_interval_seconds",
                "The domain's DKIM rotation interval (0: no scheduled rotation).",
                ["domain"], registry=reg),
            domain_verified=Gauge(
                "mailplane_operator_domain_verified",
                "1 when DNS serves the record the domain needs (check: dkim, spf), else 0.",
                ["domain", "check"], registry=reg),
            domain_disable_time=Gauge(
                "mailplane_operator_domain_disable_timestamp_seconds",
                "When a verified domain whose DKIM record DNS says is gone will be disabled "
                "(Unix time; present only during that grace period).",
                ["domain"], registry=reg),
            up=Gauge("mailplane_operator_up", "1 while the operator runs.", registry=reg),
            leader=Gauge(
                "mailplane_operator_leader",
                "1 while this replica leads (holds the Lease, or runs without leader "
                "election); 0 while it waits.", registry=reg),
            child_write_failures=Counter(
                "mailplane_operator_child_write_failures_total",
                "Writes of a child object (StatefulSet, Service, Secret, ...) the API server "
                "refused or that failed, by the child's kind.", ["kind"], registry=reg),
            stale_generation=Gauge(
                "mailplane_operator_stale_generation_seconds",
                "Age of the oldest spec change the operator has not reconciled yet "
                "(status.observedGeneration behind metadata.generation), by kind; 0: none.",
                ["kind"], registry=reg),
            finalizer_pending=Gauge(
                "mailplane_operator_finalizer_pending_seconds",
                "Age of the oldest deletion still held by the operator's finalizer, by kind; "
                "0: none.", ["kind"], registry=reg),
        )
        for kind in KINDS:
            for result in ("ok", "error", "invalid"):
                metrics.reconciles.labels(kind, result)
            metrics.reconcile_duration.labels(kind)
        for state in CREDENTIAL_STATES:
            metrics.credentials.labels(state).set(0)
        for child in CHILD_KINDS:
            metrics.child_write_failures.labels(child)
        for kind in KINDS:
            metrics.stale_generation.labels(kind).set_function(
                partial(metrics._oldest, metrics._stale_since, kind, time.monotonic))
            metrics.finalizer_pending.labels(kind).set_function(
                partial(metrics._oldest, metrics._deleting_since, kind, time.time))
        metrics.up.set(1)
        return metrics

    @contextmanager
    def reconcile(self, kind: str) -> Iterator[None]:
        """Time one reconcile and count it as ok or error (the exception propagates)."""
        started = time.perf_counter()
        try:
            yield
        except BaseException:
            self.reconciles.labels(kind, "error").inc()
            raise
        else:
            self.reconciles.labels(kind, "ok").inc()
        finally:
            self.reconcile_duration.labels(kind).observe(time.perf_counter() - started)

    def child_write_failed(self, kind: str) -> None:
        self.child_write_failures.labels(kind if kind in CHILD_KINDS else "other").inc()

    def observe(self, kind: str, body: Mapping[str, Any], *, deleted: bool = False) -> None:
        """Track a resource seen in a watch event: whether its status lags its spec, and
        whether its deletion waits on our finalizer (forgotten once deleted)."""
        meta = body.get("metadata") or {}
        key = (kind, str(meta.get("uid")))
        if deleted:
            self._stale_since.pop(key, None)
            self._deleting_since.pop(key, None)
            return
        generation = meta.get("generation")
        observed = (body.get("status") or {}).get("observedGeneration")
        if isinstance(generation, int) and (not isinstance(observed, int)
                                            or observed < generation):
            self._stale_since.setdefault(key, time.monotonic())
        else:
            self._stale_since.pop(key, None)
        since = _timestamp(meta.get("deletionTimestamp"))
        if since is not None and FINALIZER in (meta.get("finalizers") or ()):
            self._deleting_since.setdefault(key, since)
        else:
            self._deleting_since.pop(key, None)

    @staticmethod
    def _oldest(since: dict[tuple[str, str], float], kind: str,
                clock: Callable[[], float]) -> float:
        times = [t for (k, _uid), t in since.items() if k == kind]
        return max(0.0, clock() - min(times)) if times else 0.0

    def invalid(self, kind: str) -> None:
        self.reconciles.labels(kind, "invalid").inc()

    def credential(self, namespace: str, name: str, *, state: str | None,
                   rotated_at: float | None = None, interval: float | None = None) -> None:
        """Record a credential's state; state None forgets the credential (deleted)."""
        key = f"{namespace}/{name}"
        if state is None:
            self._credential_states.pop(key, None)
            for gauge in (self.credential_last_rotation, self.credential_rotation_interval):
                with suppress(KeyError):
                    gauge.remove(namespace, name)
        else:
            self._credential_states[key] = state
            if rotated_at is not None:
                self.credential_last_rotation.labels(namespace, name).set(rotated_at)
            self.credential_rotation_interval.labels(namespace, name).set(interval or 0)
        for s in CREDENTIAL_STATES:
            self.credentials.labels(s).set(
                sum(1 for v in self._credential_states.values() if v == s))

    def domain(self, domain: str, *, keys: dict[str, float] | None,
               interval: float | None = None, dkim: bool | None = None,
               spf: bool | None = None, disable_at: float | None = None,
               claim: str | None = None, owner: bool = True) -> None:
        """Record a domain's keys (selector -> created), verification and the end of its DNS
        grace period (None: not in one); keys None forgets the domain. ``dkim``/``spf``: what
        DNS said (None: the lookup failed or was not made; the last answer stands).

        Several SendingDomains (``claim``: namespace/name) may name one domain; its series show
        one of them: the owner (``owner``) takes them over, another claim writes them only while
        no other claim holds them, and forgets them only if it holds them. So another tenant's
        claim cannot overwrite or remove the owner's series."""
        if claim is not None:
            holder = self._domain_claims.get(domain)
            if holder not in (None, claim) and not (owner and keys is not None):
                return
            if keys is None:
                self._domain_claims.pop(domain, None)
            else:
                self._domain_claims[domain] = claim
        for selector in self._dkim_selectors.pop(domain, set()) - set(keys or {}):
            with suppress(KeyError):
                self.dkim_key_created.remove(domain, selector)
        if keys is None:
            self._domain_checks -= {(domain, "dkim"), (domain, "spf")}
            for gauge, labels in ((self.dkim_rotation_interval, (domain,)),
                                  (self.domain_verified, (domain, "dkim")),
                                  (self.domain_verified, (domain, "spf")),
                                  (self.domain_disable_time, (domain,))):
                with suppress(KeyError):
                    gauge.remove(*labels)
            return
        self._dkim_selectors[domain] = set(keys)
        for selector, created in keys.items():
            self.dkim_key_created.labels(domain, selector).set(created)
        self.dkim_rotation_interval.labels(domain).set(interval or 0)
        for check, ok in (("dkim", dkim), ("spf", spf)):
            # None (the lookup failed): keep what the last definite answer said, so a DNS outage
            # does not read as records gone (0 when there was no answer yet).
            if ok is not None or (domain, check) not in self._domain_checks:
                self._domain_checks.add((domain, check))
                self.domain_verified.labels(domain, check).set(1 if ok else 0)
        if disable_at is None:
            with suppress(KeyError):
                self.domain_disable_time.remove(domain)
        else:
            self.domain_disable_time.labels(domain).set(disable_at)


def _timestamp(value: Any) -> float | None:
    if not isinstance(value, str) or not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None
