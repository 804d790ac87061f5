"""SmtpRelay handlers: one worker per relay renders its config Secrets, children and status.

Handlers of other resources *poke* a relay's worker (`Runtime.poke`); pokes that arrive
together are rendered once. Each worker also watches its own StatefulSet (label selector, in the
relay's namespace): an event (its pods became ready, a hand edit) pokes the worker, so the
status follows the pods and drift is undone at once.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import kopf

from .. import kube
from ..kube import ApiError
from ..reconcile import credential as cred_mod
from ..reconcile import relay as relay_mod
from ..reconcile.conditions import READY, Event, get_condition, set_condition
from ..reconcile.models import (
    RetentionPolicy,
    SmtpCredential,
    SmtpRelay,
    SpecError,
    parse_retention_policy,
    parse_smtp_credential,
    parse_smtp_relay,
)
from ..reconcile.ownership import REASON_DOMAIN_CONFLICT
from ..reconcile.render import (
    REASON_DELETING,
    REASON_DKIM_SECRET_UNREADABLE,
    RENDER_REASONS,
    RenderError,
    RenderResult,
    RuntimePaths,
    render_relay_config,
)
from ..runtime import MANAGED_BY_LABELS, Body, RelayKey, RelayWorker, Runtime
from . import retention, scaledown
from .common import (
    REASON_CHILD_WRITE_FAILED,
    child_write_failed,
    credential_inputs,
    delete_if_owned,
    domain_inputs,
    first,
    invalid_spec_status,
    key_of,
    parse_all,
    patch_status,
    post_events,
    reconciled,
    wait_for_wake,
)

logger = logging.getLogger(__name__)
DRAINING = "Draining"

@dataclass
class Rendered:
    """What one render of a relay achieved: the configuration in force (None when there is
    none: no relay, an invalid spec, a configuration that failed validation) and the children
    whose writes failed (their messages)."""

    result: RenderResult | None
    failed: list[str] = field(default_factory=list)
    again: float | None = None
    """Render again this soon (a scale-down drains), whatever else happens."""


async def render_relay(rt: Runtime, key: RelayKey, indexes: Mapping[str, Any],
                       log: logging.Logger | logging.LoggerAdapter[Any]) -> Rendered:
    """Render the relay's configuration, write its config Secrets, then its children, then its
    status. The config Secrets come first and a failed child write does not undo them: a
    credential's deletion waits for the configuration, never for an unrelated child."""
    relays_idx = indexes["relays_idx"]
    body = first(relays_idx.get(key))
    if body is None:
        return Rendered(None)
    namespace, name = key
    try:
        relay = parse_smtp_relay(body)
    except SpecError as exc:
        await patch_status(rt, kube.SMTP_RELAYS, body,
                           invalid_spec_status(rt, "SmtpRelay", body, exc))
        return Rendered(None)
    with rt.metrics.reconcile("SmtpRelay"):
        now = rt.clock()
        domains = await domain_inputs(rt, indexes["domains_idx"].get(key, ()))
        creds = await credential_inputs(rt, indexes["credentials_idx"].get(key, ()))
        policies: list[RetentionPolicy] = parse_all(
            parse_retention_policy, indexes["retention_idx"].get(namespace, ()))
        ns_labels = await rt.labels_of(
            [namespace, *(d.domain.meta.namespace for d in domains),
             *(c.credential.meta.namespace for c in creds)])
        previous_hash = (body.get("status") or {}).get("configHash")
        token = await scaledown.admin_token(rt, relay)
        paths = RuntimePaths(admin_token_sha256=scaledown.token_sha256(token))
        try:
            # CPU-bound (and slower with many RSA keys to validate): off the event loop, so
            # that kopf keeps handling events while a large relay renders.
            result = await asyncio.to_thread(
                render_relay_config, relay, domains=domains, credentials=creds,
                policies=policies, namespace_labels=ns_labels, now=now, paths=paths)
        except RenderError as exc:
            status = relay_mod.relay_status(
                relay, statefulset_status=None, config_hash=previous_hash or "",
                config_secrets=[], domains=[], credentials=0, excluded=0,
                retention_policies=[], now=now, error=str(exc))
            # Only the conditions: the counts and config hash still describe the Secrets in
            # force, which stay as they were.
            await patch_status(rt, kube.SMTP_RELAYS, body, {
                **(body.get("status") or {}), "conditions": reconciled(
                    rt, status["conditions"], body, False, reason="ConfigInvalid",
                    message=str(exc))})
            post_events(body, [Event("Warning", "ConfigInvalid", str(exc))])
            raise
        changed = False
        for manifest in result.secrets:
            try:
                action, _obj = await rt.client.apply(manifest)
            except (ApiError, OSError, TimeoutError) as exc:
                # The configuration is not in force: reported, and the whole render retried
                # (deletions waiting for it keep waiting: the relay still has the old one).
                message = child_write_failed(rt, body, manifest, exc)
                await patch_status(rt, kube.SMTP_RELAYS, body, {
                    **(body.get("status") or {}), "conditions": reconciled(
                        rt, (body.get("status") or {}).get("conditions"), body, False,
                        reason=REASON_CHILD_WRITE_FAILED, message=message)})
                raise
            changed |= action != "unchanged"
        existing = await rt.client.list(kube.SECRETS, namespace, labels={
            relay_mod.LABEL_RELAY: name, relay_mod.LABEL_COMPONENT: "config"})
        for secret in existing:
            if secret["metadata"]["name"] not in result.secret_names:
                await rt.client.delete(kube.SECRETS, namespace, secret["metadata"]["name"])
                changed = True
        # The configuration is in force from here on; each child is written on its own, and
        # a failed write is reported (Event, metric, Reconciled=False) without stopping the
        # others.
        failed: list[str] = []
        monitor = await rt.client.has_api("monitoring.coreos.com/v1", "servicemonitors")
        sts = await rt.client.get(kube.STATEFULSETS, namespace, name)
        admin: scaledown.AdminClient | None = None
        try:
            admin = await scaledown.admin_client(rt, relay)
            scale = await scaledown.step(rt, relay, sts, admin)
        except (ApiError, OSError, TimeoutError) as exc:
            # Whatever the StatefulSet runs stays as it is until the next render.
            current = ((sts or {}).get("spec") or {}).get("replicas")
            scale = scaledown.ScaleStep(current if isinstance(current, int) else None,
                                        progress=f"scale-down step failed: {exc}")
        sts_written = True
        for child in relay_mod.relay_children(relay, image=relay.spec.image or rt.config.image,
                                              service_monitor_available=monitor,
                                              config_hash=result.config_hash,
                                              defaults=rt.config.relay_defaults,
                                              replicas=scale.replicas,
                                              operator_namespace=rt.config.operator_namespace):
            try:
                await _write_child(rt, body, relay, child, log)
            except (ApiError, OSError, TimeoutError) as exc:
                failed.append(child_write_failed(rt, body, child, exc))
                sts_written &= child.get("kind") != "StatefulSet"
        if scale.removed and sts_written:
            log.info("Scaled down to %d: the queues of ordinals %s were handed to the pool",
                     relay.spec.replicas, scale.removed)
            post_events(body, [Event("Normal", "ScaledDown", (
                f"{len(scale.removed)} pod(s) removed after their queues were handed to the "
                f"remaining {relay.spec.replicas}; their spool volumes are deleted"))])
            await scaledown.delete_volumes(rt, body, relay, scale.removed)
        for api_version, kind, child_name in relay_mod.unwanted_children(
                relay, service_monitor_available=monitor):
            try:
                await delete_if_owned(rt, kube.BY_KIND[(api_version, kind)], namespace,
                                       child_name, relay.meta.uid)
            except (ApiError, OSError, TimeoutError) as exc:
                failed.append(child_write_failed(rt, body, {
                    "kind": kind, "metadata": {"name": child_name}}, exc))
        sts = await rt.client.get(kube.STATEFULSETS, namespace, name)
        status = relay_mod.relay_status(
            relay, statefulset_status=(sts or {}).get("status"), config_hash=result.config_hash,
            config_secrets=result.secret_names, domains=list(result.domains),
            credentials=len(result.credentials), excluded=len(result.excluded),
            retention_policies=list(result.retention.policies), now=now,
            excluded_entries=[
                {"kind": e.kind, "name": e.key, "reason": e.reason, "message": e.message}
                for e in sorted(result.excluded, key=lambda e: (
                    e.reason not in RENDER_REASONS, e.kind, e.key))])
        status["conditions"] = _draining_condition(rt, status["conditions"], relay,
                                                   scale.progress)
        try:
            running = await scaledown.pod_configs(
                rt, relay, admin or await scaledown.admin_client(rt, relay))
        except (ApiError, OSError, TimeoutError) as exc:
            log.warning("Listing the relay's pods failed: %s", exc)
            running = {}
        status["pods"] = [{"name": n, "configHash": c.config_hash, "render": c.render,
                           "current": c.render == result.render_id}
                          for n, c in sorted(running.items())]
        behind = any(c.render != result.render_id for c in running.values())
        if failed:
            status["conditions"] = reconciled(rt, status["conditions"], body, False,
                                              reason=REASON_CHILD_WRITE_FAILED,
                                              message="; ".join(failed))
            # This generation is not reconciled yet: observedGeneration stays where it was.
            status["observedGeneration"] = (body.get("status") or {}).get("observedGeneration")
        else:
            status["conditions"] = reconciled(rt, status["conditions"], body, True)
        await patch_status(rt, kube.SMTP_RELAYS, body, status)
        if changed and result.config_hash != previous_hash:
            log.info("Rendered configuration %s: %d domains, %d credentials, %d Secrets",
                     result.config_hash, len(result.domains), len(result.credentials),
                     len(result.secrets))
            post_events(body, [Event(
                "Normal", "ConfigRendered",
                f"configuration {result.config_hash}: {len(result.domains)} domains, "
                f"{len(result.credentials)} credentials in {len(result.secrets)} Secret(s)")])
        _announce_render_exclusions(rt, key, result, indexes)
        await retention.refresh_statuses(rt, namespace, indexes, now)
        _recheck_stale_credentials(rt, relay, result, indexes["credentials_idx"].get(key, ()))
        _recheck_stale_domains(rt, result, indexes["domains_idx"].get(key, ()))
        again = rt.config.drain_poll if scale.progress is not None else (
            # Pods reload within a kubelet sync: the status follows them meanwhile.
            rt.config.drain_poll * 5 if behind else None)
        return Rendered(result, failed, again=again)


def _draining_condition(rt: Runtime, conditions: list[dict[str, Any]], relay: SmtpRelay,
                        progress: str | None) -> list[dict[str, Any]]:
    """``Draining`` while a scale-down hands the removed pods' queues to the pool (the
    message says how far it is); no such condition otherwise."""
    if progress is None:
        return [c for c in conditions if c.get("type") != DRAINING]
    return set_condition(conditions, DRAINING, True, DRAINING, progress,
                         relay.meta.generation, rt.clock())


async def _write_child(rt: Runtime, body: Body, relay: SmtpRelay, child: Mapping[str, Any],
                       log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    action, _current = await rt.client.apply(child)
    if action != "replaced":
        return
    # A field the API server keeps immutable changed (spec.spool.size or storageClassName:
    # the volumeClaimTemplates): the StatefulSet was deleted with propagationPolicy=Orphan, so
    # its pods and volumes stay; the new one adopts the pods. Until the old one is gone the
    # apply answers "pending", and its DELETED event pokes this worker again.
    log.info("StatefulSet %s replaced: a field the API server keeps immutable changed",
             relay.meta.name)
    post_events(body, [Event(
        "Normal", "StatefulSetReplaced",
        f"StatefulSet {relay.meta.name}: spec.spool changed a field the API server keeps "
        "immutable; the StatefulSet was deleted with propagationPolicy=Orphan (pods and volumes "
        "stay) and is created again")])
    await rt.client.apply(child)
    await _expand_volumes(rt, body, relay, log)


async def _expand_volumes(rt: Runtime, body: Body, relay: SmtpRelay,
                          log: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """Grow the existing spool volumes to spec.spool.size (volumes never shrink; a smaller size
    applies to new ordinals only). Needs a StorageClass with allowVolumeExpansion; a refusal is
    reported as an Event."""
    want = kube.quantity_value(relay.spec.spool.size)
    if want is None:
        return
    claims = await rt.client.list(kube.PVCS, relay.meta.namespace,
                                  labels=relay_mod.selector_labels(relay))
    pattern = re.compile(rf"^spool-{re.escape(relay.meta.name)}-[0-9]+$")
    for claim in claims:
        name = str((claim.get("metadata") or {}).get("name"))
        size = kube.quantity_value(((claim.get("spec") or {}).get("resources") or {})
                                   .get("requests", {}).get("storage"))
        if not pattern.match(name) or size is None or size >= want:
            continue
        try:
            await rt.client.patch(kube.PVCS, relay.meta.namespace, name, {"spec": {
                "resources": {"requests": {"storage": relay.spec.spool.size}}}})
        except ApiError as exc:
            child_write_failed(rt, body, claim, exc)
        else:
            log.info("Spool volume %s expanded to %s", name, relay.spec.spool.size)


def _recheck_stale_domains(rt: Runtime, result: RenderResult, bodies: Iterable[Body]) -> None:
    """A SendingDomain whose Ready condition disagrees with this render (another claim owns the
    domain now, or this one took it over; a namespace label allows or forbids its skip since) is
    woken to reconcile now rather than at its next DNS check."""
    rendered = {owner.key for owner in result.owners.values()}
    for body in bodies:
        key = key_of(body)
        ready = get_condition((body.get("status") or {}).get("conditions"), READY) or {}
        if key in rendered:
            stale = ready.get("status") != "True"
        else:
            exclusion = result.exclusion("SendingDomain", key)
            if exclusion is None or exclusion.reason == REASON_DELETING:
                continue  # not this relay's, invalid, or on its way out
            stale = ready.get("status") == "True" or (
                REASON_DOMAIN_CONFLICT in (exclusion.reason, ready.get("reason"))
                and exclusion.reason != ready.get("reason"))
        if stale:
            rt.wake_domain(key)


def _announce_render_exclusions(rt: Runtime, key: RelayKey, result: RenderResult,
                                indexes: Mapping[str, Any]) -> None:
    """A Warning Event on each SendingDomain the render newly leaves out because its entry would
    break the configuration or its DKIM Secret cannot be read (credentials get theirs from their
    own reconcile, which this render triggers through their Ready condition)."""
    worker = rt.workers.get(key)
    before = worker.last if worker is not None else None
    bodies = {key_of(b): b for b in indexes["domains_idx"].get(key, ())}
    for e in result.excluded:
        if e.kind != "SendingDomain" or e.reason not in (
                *RENDER_REASONS, REASON_DKIM_SECRET_UNREADABLE):
            continue
        previous = before.exclusion(e.kind, e.key) if before is not None else None
        if previous is not None and previous.reason == e.reason:
            continue
        if e.key in bodies:
            post_events(bodies[e.key], [Event("Warning", e.reason, e.message)])


def _recheck_stale_credentials(rt: Runtime, relay: SmtpRelay, result: RenderResult,
                               bodies: Iterable[Body]) -> None:
    """A credential whose Ready reason disagrees with this render (its relay or a domain
    appeared since) or whose application Secret no longer holds the password issued (deleted
    or edited by hand) is reconciled again by its next timer tick."""
    rendered = set(result.credentials)
    rewrite = set(result.copies_to_rewrite)
    for body in bodies:
        key = key_of(body)
        if key in rewrite:
            rt.credential_next_check.pop(key, None)
            continue
        if key in rendered:
            creds: list[SmtpCredential] = parse_all(parse_smtp_credential, [body], rt.parsed)
            if not creds:
                continue
            expected = cred_mod.rendered_ready_reason(creds[0], relay)
        else:
            exclusion = result.exclusion("SmtpCredential", key)
            if exclusion is None or exclusion.reason == REASON_DELETING:
                continue  # not this relay's, invalid, or on its way out
            expected = exclusion.reason
        ready = get_condition((body.get("status") or {}).get("conditions"), READY)
        if ready is None or ready.get("reason") != expected:
            rt.credential_next_check.pop(key, None)


async def _watch_statefulset(rt: Runtime, key: RelayKey, worker: RelayWorker) -> None:
    """Poke the worker on every event of this relay's StatefulSet (ready replicas reach the
    status; a hand edit or a deletion is undone at once). One watch per relay, in its
    namespace, with a label selector the API server applies: no cluster-wide StatefulSet
    watch, and no other StatefulSet is ever seen."""
    namespace, name = key
    labels = {**MANAGED_BY_LABELS, "app.kubernetes.io/instance": name}
    backoff = 0.2 if rt.config.fast else 2.0
    while True:
        try:
            async for kind, _obj in rt.client.watch(kube.STATEFULSETS, namespace, labels,
                                                    backoff=backoff):
                if kind != "LISTED":
                    worker.poke()
        except Exception:
            # The periodic resync still renders; the watch must come back, never die silently.
            logger.exception("Watching StatefulSet %s/%s failed; watching again", namespace,
                             name)
            await asyncio.sleep(backoff)


def _webhook_refs(bodies: Any) -> dict[tuple[str, str], list[str]]:
    """(namespace, Secret name) -> keys of the credentials whose spec.webhook signs with it."""
    out: dict[tuple[str, str], list[str]] = {}
    for body in bodies:
        meta = body.get("metadata") or {}
        ref = (((body.get("spec") or {}).get("webhook") or {}).get("secretRef") or {})
        if ref.get("name"):
            out.setdefault((str(meta.get("namespace")), str(ref["name"])), []).append(
                key_of(body))
    return out


async def _watch_webhook_secrets(rt: Runtime, key: RelayKey, worker: RelayWorker,
                                 credentials_idx: Any) -> None:
    """Re-render when a Secret a credential's webhook signs with changes, and let those
    credentials' timers reconcile their Webhook condition at the next tick. One watch per
    namespace where a credential of this relay names a webhook Secret (started and stopped as
    credentials come and go), each with the label selector mailplane.io/webhook-secret=true
    that the API server applies: never a cluster-wide Secret watch, never a tenant's other
    Secrets."""
    tasks: dict[str, asyncio.Task[None]] = {}
    every = 0.2 if rt.config.fast else 5.0
    try:
        while True:
            wanted = {ns for ns, _name in _webhook_refs(credentials_idx.get(key, ()))}
            for ns in set(tasks) - wanted:
                tasks.pop(ns).cancel()
            for ns in wanted - set(tasks):
                tasks[ns] = asyncio.create_task(
                    _watch_webhook_secrets_in(rt, key, worker, credentials_idx, ns),
                    name=f"webhook secrets {ns} for {key[0]}/{key[1]}")
            await asyncio.sleep(every)
    finally:
        for task in tasks.values():
            task.cancel()
        await asyncio.gather(*tasks.values(), return_exceptions=True)


async def _watch_webhook_secrets_in(rt: Runtime, key: RelayKey, worker: RelayWorker,
                                    credentials_idx: Any, namespace: str) -> None:
    labels = {cred_mod.LABEL_WEBHOOK_SECRET: "true"}
    backoff = 0.2 if rt.config.fast else 2.0
    while True:
        try:
            async for kind, obj in rt.client.watch(kube.SECRETS, namespace, labels,
                                                    backoff=backoff):
                if kind == "LISTED":
                    continue
                meta = (obj or {}).get("metadata") or {}
                where = (namespace, str(meta.get("name")))
                refs = _webhook_refs(credentials_idx.get(key, ()))
                if where not in refs:
                    continue  # a webhook Secret of no credential of this relay
                rt.remember_secret(*where, None if kind == "DELETED" else obj)
                for cred_key in refs[where]:
                    rt.credential_next_check.pop(cred_key, None)
                worker.poke()
        except Exception:
            # The periodic resync still re-reads every Secret; the watch must come back.
            logger.exception("Watching webhook Secrets in %s for relay %s/%s failed; watching "
                             "again", namespace, *key)
            await asyncio.sleep(backoff)


def register(registry: kopf.OperatorRegistry, rt: Runtime,
             resource: tuple[str, str, str]) -> None:
    """The relay worker and what pokes it: relay updates and deletions, StatefulSet events."""
    config = rt.config

    @kopf.daemon(*resource, id="relay_worker", cancellation_timeout=5.0, registry=registry)
    async def relay_worker(**kwargs: Any) -> None:
        key: RelayKey = (kwargs["namespace"], kwargs["name"])
        stopped, logger = kwargs["stopped"], kwargs["logger"]
        worker = rt.workers.setdefault(key, RelayWorker())
        last_full = time.monotonic()
        failures = 0
        watcher = asyncio.create_task(_watch_statefulset(rt, key, worker))
        hooks = asyncio.create_task(_watch_webhook_secrets(rt, key, worker,
                                                           kwargs["credentials_idx"]))
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
                    rendered = await render_relay(rt, key, kwargs, logger)
                    worker.last = rendered.result
                    if rendered.result is not None:
                        worker.rendered_hash(rendered.result.render_id)
                    worker.renders += 1
                    if rendered.failed:
                        # The configuration is written (requesters waiting for it are done);
                        # the failed children are retried with backoff.
                        failures += 1
                        delay = min(2.0 ** failures * (0.1 if config.fast else 1.0), 60.0)
                        logger.warning("Writing children failed (attempt %d), retrying in "
                                       "%.1fs: %s", failures, delay, "; ".join(rendered.failed))
                    else:
                        failures = 0
                    if rendered.again is not None:
                        delay = min(delay, rendered.again)
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
                if await wait_for_wake(worker.wake, stopped, delay):
                    # A burst of pokes (many credentials created together) renders once; a
                    # render that took long waits as long again (up to a second), so that
                    # rendering a large relay does not take all of the operator's time.
                    await asyncio.sleep(max(config.render_debounce, min(took, 1.0)))
        finally:
            watcher.cancel()
            hooks.cancel()
            await asyncio.gather(watcher, hooks, return_exceptions=True)
            if rt.workers.get(key) is worker:
                del rt.workers[key]
            await worker.done(worker.requested)
            for body in kwargs["credentials_idx"].get(key, ()):
                rt.credential_next_check.pop(key_of(body), None)

    @kopf.on.update(*resource, id="relay_changed", registry=registry)
    async def relay_changed(**kwargs: Any) -> None:
        key: RelayKey = (kwargs["namespace"], kwargs["name"])
        rt.poke(key)
        for body in kwargs["domains_idx"].get(key, ()):
            rt.wake_domain(key_of(body))
        # Ceilings and platform suspensions show in each credential's status: their timers
        # reconcile them at the next tick.
        for body in kwargs["credentials_idx"].get(key, ()):
            rt.credential_next_check.pop(key_of(body), None)

    @kopf.on.event(*resource, id="relay_event", registry=registry)
    async def relay_event(**kwargs: Any) -> None:
        rt.metrics.observe("SmtpRelay", kwargs["body"], deleted=kwargs["type"] == "DELETED")
        if kwargs["type"] == "DELETED":
            key: RelayKey = (kwargs["namespace"], kwargs["name"])
            for body in kwargs["credentials_idx"].get(key, ()):
                rt.credential_next_check.pop(key_of(body), None)

