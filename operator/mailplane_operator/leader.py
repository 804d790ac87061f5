"""Leader election with a coordination.k8s.io/v1 Lease, as Kubernetes controllers do it.

Several operator replicas may run; only the one holding the Lease runs kopf (watches, handlers,
writes). The others wait, and take over when the holder stops renewing: a holder that stops
cleanly hands the Lease over at once (it empties `holderIdentity`), one that dies is replaced
once `leaseDurationSeconds` has passed since the last renewal its rivals saw.

Expiry is judged on the local monotonic clock from the moment a candidate last saw the Lease
change (as client-go does), never by comparing `renewTime` with the local wall clock, so that
clock skew between nodes cannot make two replicas lead. Every write carries the
`resourceVersion` read just before: of two candidates racing for an expired Lease, one gets a
409 and goes back to waiting. A leader that cannot renew within `renew_deadline` stops leading
(its operator stops) before any rival can acquire (`renew_deadline < lease_duration`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from . import kube
from .kube import ApiError, KubeClient

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LeaseSettings:
    namespace: str
    name: str = "mailplane-operator"
    identity: str = ""
    """Who holds the Lease; default: $POD_NAME, else host name and process id."""
    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.lease_duration:
            raise ValueError("leader election needs 0 < retry period < renew deadline < "
                             f"lease duration (got {self.retry_period}, {self.renew_deadline}, "
                             f"{self.lease_duration})")


def default_identity() -> str:
    return os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"


def _micro_time(now: datetime | None = None) -> str:
    """A Kubernetes MicroTime (RFC 3339 with microseconds)."""
    return (now or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquire, renew and release one Lease."""

    def __init__(self, client: KubeClient, settings: LeaseSettings) -> None:
        self.client = client
        self.settings = settings
        self.identity = settings.identity or default_identity()
        self._seen: tuple[str, float] | None = None
        """(resourceVersion of the Lease last read, monotonic time it was first seen)."""
        self.transitions = 0

    @property
    def _duration(self) -> int:
        return max(1, round(self.settings.lease_duration))

    async def _get(self) -> dict[str, Any] | None:
        lease = await self.client.get(kube.LEASES, self.settings.namespace, self.settings.name)
        if lease is not None:
            version = str(lease["metadata"].get("resourceVersion"))
            if self._seen is None or self._seen[0] != version:
                self._seen = (version, time.monotonic())
        return lease

    def _expired(self, lease: dict[str, Any]) -> bool:
        spec = lease.get("spec") or {}
        if not spec.get("holderIdentity"):
            return True  # released
        duration = float(spec.get("leaseDurationSeconds") or self.settings.lease_duration)
        assert self._seen is not None
        return time.monotonic() - self._seen[1] > duration

    async def try_acquire_or_renew(self) -> bool:
        """One attempt; True when this replica holds the Lease afterwards."""
        now = _micro_time()
        lease = await self._get()
        if lease is None:
            body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                    "metadata": {"name": self.settings.name,
                                 "namespace": self.settings.namespace},
                    "spec": {"holderIdentity": self.identity,
                             "leaseDurationSeconds": self._duration,
                             "acquireTime": now, "renewTime": now, "leaseTransitions": 0}}
            try:
                await self.client.create(kube.LEASES, body)
            except ApiError as exc:
                if exc.status == 409:
                    return False  # a rival created it first
                raise
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity")
        if holder != self.identity and not self._expired(lease):
            return False
        new_spec: dict[str, Any] = {"holderIdentity": self.identity,
                                    "leaseDurationSeconds": self._duration, "renewTime": now}
        if holder != self.identity:
            new_spec["acquireTime"] = now
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + 1
        try:
            patched = await self.client.patch(kube.LEASES, self.settings.namespace,
                                              self.settings.name, {
                "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": new_spec})
        except ApiError as exc:
            if exc.status == 409:
                return False  # changed since we read it: someone else renewed or acquired
            raise
        if patched is not None:
            self._seen = (str(patched["metadata"].get("resourceVersion")), time.monotonic())
        if holder != self.identity:
            self.transitions = int(new_spec["leaseTransitions"])
        return patched is not None

    async def acquire(self, stopping: asyncio.Event) -> bool:
        """Wait until this replica holds the Lease (True) or `stopping` is set (False)."""
        announced = False
        while not stopping.is_set():
            try:
                if await self.try_acquire_or_renew():
                    logger.info("Leading as %s (Lease %s/%s)", self.identity,
                                self.settings.namespace, self.settings.name)
                    return True
            except (ApiError, OSError, TimeoutError) as exc:
                logger.warning("Leader election: %s", exc)
            if not announced:
                logger.info("Waiting for the Lease %s/%s (held by another replica) as %s",
                            self.settings.namespace, self.settings.name, self.identity)
                announced = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), self.settings.retry_period)
        return False

    async def keep(self, stopping: asyncio.Event) -> None:
        """Renew every retry period; return when leadership is lost (no renewal within the
        renew deadline, or another holder) or `stopping` is set."""
        last_renewal = time.monotonic()
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self.settings.retry_period)
                return
            except TimeoutError:
                pass
            try:
                if await self.try_acquire_or_renew():
                    last_renewal = time.monotonic()
                    continue
                lease = await self._get()
                if ((lease or {}).get("spec") or {}).get("holderIdentity") != self.identity:
                    logger.error("Lost the Lease %s/%s to another replica",
                                 self.settings.namespace, self.settings.name)
                    return
                # Still ours (the Lease changed in between, e.g. a label): renew next time.
            except (ApiError, OSError, TimeoutError) as exc:
                logger.warning("Renewing the Lease failed: %s", exc)
            if time.monotonic() - last_renewal > self.settings.renew_deadline:
                logger.error("Could not renew the Lease %s/%s for %.0fs: stepping down",
                             self.settings.namespace, self.settings.name,
                             self.settings.renew_deadline)
                return

    async def release(self) -> None:
        """Hand the Lease over at once (a clean stop): empty holder, if it is still ours."""
        try:
            lease = await self._get()
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            await self.client.patch(kube.LEASES, self.settings.namespace, self.settings.name, {
                "metadata": {"resourceVersion": lease["metadata"]["resourceVersion"]},
                "spec": {"holderIdentity": None, "leaseDurationSeconds": 1,
                         "renewTime": _micro_time()}})
            logger.info("Released the Lease %s/%s", self.settings.namespace, self.settings.name)
        except (ApiError, OSError, TimeoutError) as exc:
            logger.warning("Releasing the Lease failed (a rival takes over when it expires): "
                           "%s", exc)
