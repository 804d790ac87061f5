"""RetentionPolicy handlers: a policy change re-renders the relays of its namespace; its status
lists the relays it selects (refreshed by those relays' renders too)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

import kopf

from .. import kube
from ..reconcile import retention as retention_mod
from ..reconcile.models import SmtpRelay, SpecError, parse_retention_policy, parse_smtp_relay
from ..runtime import Runtime
from .common import invalid_spec_status, merge_diff, parse_all, patch_status, reconciled


def _relays_in(namespace: str, relays_idx: kopf.Index[Any, Any]) -> list[SmtpRelay]:
    return parse_all(parse_smtp_relay, [
        b for (ns, _n), store in relays_idx.items() if ns == namespace for b in store])


async def refresh_statuses(rt: Runtime, namespace: str, indexes: Mapping[str, Any],
                           now: datetime) -> None:
    """Patch the status of every policy in `namespace` (called by the relay worker)."""
    relays = _relays_in(namespace, indexes["relays_idx"])
    for body in indexes["retention_idx"].get(namespace, ()):
        try:
            policy = parse_retention_policy(body)
        except SpecError:
            continue
        status = retention_mod.retention_status(policy, relays, now)
        await patch_status(rt, kube.RETENTION_POLICIES, body, {
            **status, "conditions": reconciled(rt, status.get("conditions"), body, True)})


def register(registry: kopf.OperatorRegistry, rt: Runtime,
             resource: tuple[str, str, str]) -> None:
    """Relay pokes on every policy event, and the policy's own status."""

    @kopf.on.event(*resource, id="retention_event", registry=registry)
    async def retention_event(**kwargs: Any) -> None:
        rt.metrics.observe("RetentionPolicy", kwargs["body"],
                           deleted=kwargs["type"] == "DELETED")
        namespace = kwargs["namespace"]
        for relay_ns, relay_name in list(rt.workers):
            if relay_ns == namespace:
                rt.poke((relay_ns, relay_name))

    @kopf.on.resume(*resource, id="retention", registry=registry)
    @kopf.on.create(*resource, id="retention", registry=registry)
    @kopf.on.update(*resource, id="retention", registry=registry)
    async def retention(**kwargs: Any) -> None:
        body, namespace, patch = kwargs["body"], kwargs["namespace"], kwargs["patch"]
        try:
            policy = parse_retention_policy(body)
        except SpecError as exc:
            patch.setdefault("status", {}).update(
                invalid_spec_status(rt, "RetentionPolicy", body, exc))
            return
        with rt.metrics.reconcile("RetentionPolicy"):
            status = retention_mod.retention_status(
                policy, _relays_in(namespace, kwargs["relays_idx"]), rt.clock())
            status["conditions"] = reconciled(rt, status.get("conditions"), body, True)
            diff = merge_diff(body.get("status") or {}, status)
            if diff:
                patch.setdefault("status", {}).update(diff)
