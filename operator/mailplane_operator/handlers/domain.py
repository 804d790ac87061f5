"""SendingDomain handlers: a worker per domain keeps its DKIM keys, checks DNS with backoff,
patches the status and pokes the relay; a deleted domain waits for a render without it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

import kopf

from .. import kube
from ..kube import ApiError
from ..reconcile import dnsendpoint, ownership
from ..reconcile import domain as domain_mod
from ..reconcile.conditions import READY, Event, get_condition, set_condition
from ..reconcile.models import SendingDomain, SmtpRelay, SpecError, parse_sending_domain
from ..runtime import Body, Runtime
from .common import (
    REASON_CHILD_WRITE_FAILED,
    child_write_failed,
    delete_if_owned,
    generation_of,
    invalid_spec_status,
    key_of,
    parse_all,
    patch_status,
    post_events,
    reconciled,
    ref_key,
    relay_of,
    wait_for_wake,
    with_conditions,
)


async def reconcile_domain_once(rt: Runtime, body: Body, indexes: Mapping[str, Any],
                                log: Any) -> tuple[bool, datetime | None]:
    """One verification and rotation step. Returns (nothing to wait for in DNS, when the
    rotation needs the next step)."""
    dom = parse_sending_domain(body)
    relay_key = (dom.relay_namespace, dom.spec.relay_ref.name)
    with rt.metrics.reconcile("SendingDomain"):
        relay = relay_of(indexes["relays_idx"], relay_key)
        ns_labels = await rt.namespace_labels(dom.meta.namespace)
        existing = await rt.secret(dom.meta.namespace, domain_mod.secret_name(dom), fresh=True)
        # The other claims on this relay (with their last status), to decide the owner.
        claims: list[SendingDomain] = [
            c for c in parse_all(parse_sending_domain, indexes["domains_idx"].get(relay_key, ()),
                                 rt.parsed)
            if c.spec.domain == dom.spec.domain and c.meta.key != dom.meta.key]
        claim_labels = await rt.labels_of(c.meta.namespace for c in claims)
        observed: dict[str, list[str] | None] | None = None
        errors: dict[str, str] = {}
        if not (dom.spec.verification.skip
                and ownership.skip_allowed(relay, dom.meta.namespace, ns_labels)):
            observed, errors = await rt.dns.lookup_with_errors(
                domain_mod.names_to_check(dom, existing))
        now = rt.clock()
        # RSA key generation takes tens of milliseconds: keep it off the event loop.
        result = await asyncio.to_thread(
            domain_mod.reconcile_domain, dom, relay=relay, namespace_labels=ns_labels,
            existing_secret=existing, observed=observed, now=now, key_factory=rt.key_factory,
            lookup_errors=errors, claims=claims, claim_labels=claim_labels)
        try:
            action, obj = await rt.client.apply(result.secret)
        except ApiError as exc:
            message = child_write_failed(rt, body, result.secret, exc)
            await patch_status(rt, kube.SENDING_DOMAINS, body, with_conditions(body, reconciled(
                rt, (body.get("status") or {}).get("conditions"), body, False,
                reason=REASON_CHILD_WRITE_FAILED, message=message)))
            raise
        rt.remember_secret(dom.meta.namespace, domain_mod.secret_name(dom), obj)
        conditions = await _publish(rt, body, dom, relay=relay, ns_labels=ns_labels,
                                    status=result.status)
        await patch_status(rt, kube.SENDING_DOMAINS, body, {
            **result.status, "conditions": reconciled(rt, conditions, body, True)})
        post_events(body, result.events)
        conds = result.status.get("conditions")
        dkim_ok = get_condition(conds, domain_mod.DKIM_VERIFIED)
        spf_ok = get_condition(conds, domain_mod.SPF_VERIFIED)
        # The series are per domain: a claim that does not own it must not overwrite the owner's.
        rt.metrics.domain(
            dom.spec.domain,
            keys={s: k.created_at.timestamp() for s, k in result.state.keys.items()},
            interval=dom.spec.dkim.rotation_interval,
            dkim=_answer(dkim_ok), spf=_answer(spf_ok),
            disable_at=(result.disable_time.timestamp() if result.disable_time else None),
            claim=dom.meta.key, owner=result.enabled)
        if action != "unchanged":
            log.debug("DKIM Secret %s %s", domain_mod.secret_name(dom), action)
            rt.poke(relay_key)
        # A published next key is waited for like an unverified record: with backoff.
        settled = result.verified and result.disable_time is None and (
            result.state.phase != "NextKeyPublished")
        next_check = result.next_check
        published = get_condition(conditions, dnsendpoint.DNS_PUBLISHED) or {}
        if published.get("reason") in (dnsendpoint.REASON_CRD_MISSING,
                                       REASON_CHILD_WRITE_FAILED):
            # Asked again at the next discovery refresh (external-dns may be installed later; a
            # refused write may be allowed by then), not at the next hourly DNS check.
            soon = now + timedelta(seconds=rt.config.discovery_ttl)
            next_check = soon if next_check is None else min(next_check, soon)
        return settled, next_check


async def _publish(rt: Runtime, body: Body, dom: SendingDomain, *, relay: SmtpRelay | None,
                   ns_labels: Mapping[str, str], status: Mapping[str, Any],
                   ) -> list[dict[str, Any]]:
    """Write (or delete) the domain's external-dns DNSEndpoint; return the status conditions
    with ``DNSPublished`` set (removed when publication is not requested). A failed write is
    reported on that condition (and as ChildWriteFailed) without stopping verification."""
    conditions = list(status.get("conditions") or [])
    served = False
    wanted = dnsendpoint.requested(dom, rt.config.dns_endpoints)
    had = get_condition((body.get("status") or {}).get("conditions"),
                        dnsendpoint.DNS_PUBLISHED) is not None
    if wanted or had:
        try:
            served = await rt.client.has_api(dnsendpoint.GROUP_VERSION, dnsendpoint.PLURAL)
        except (ApiError, OSError, TimeoutError) as exc:
            # Unknown: nothing written or deleted this time, the condition says why.
            return set_condition(conditions, dnsendpoint.DNS_PUBLISHED, "Unknown",
                                 REASON_CHILD_WRITE_FAILED,
                                 f"API discovery of {dnsendpoint.PLURAL} failed: {exc}",
                                 generation_of(body), rt.clock())
    plan = dnsendpoint.publication(dom, relay=relay, namespace_labels=ns_labels, status=status,
                                   default=rt.config.dns_endpoints, crd_served=served)
    try:
        if plan.manifest is not None:
            await rt.client.apply(plan.manifest, owner_uid=dom.meta.uid)
        elif served:
            await delete_if_owned(rt, kube.DNS_ENDPOINTS, dom.meta.namespace,
                                  dnsendpoint.endpoint_name(dom), dom.meta.uid)
    except (ApiError, OSError, TimeoutError) as exc:
        message = child_write_failed(rt, body, plan.manifest or {
            "kind": dnsendpoint.KIND,
            "metadata": {"name": dnsendpoint.endpoint_name(dom)}}, exc)
        return set_condition(conditions, dnsendpoint.DNS_PUBLISHED, False,
                             REASON_CHILD_WRITE_FAILED, message, generation_of(body),
                             rt.clock())
    if plan.condition is None:
        return [c for c in conditions if c.get("type") != dnsendpoint.DNS_PUBLISHED]
    ok, reason, message = plan.condition
    return set_condition(conditions, dnsendpoint.DNS_PUBLISHED, ok, reason, message,
                         generation_of(body), rt.clock())


async def _secret_conflict(rt: Runtime, body: Body, exc: SpecError) -> None:
    """Ready=False SecretConflict (an Event when it starts): nothing was written."""
    before = get_condition((body.get("status") or {}).get("conditions"), READY)
    conds = set_condition((body.get("status") or {}).get("conditions"), READY, False,
                          domain_mod.REASON_SECRET_CONFLICT, str(exc), generation_of(body),
                          rt.clock())
    conds = reconciled(rt, conds, body, False, reason=domain_mod.REASON_SECRET_CONFLICT,
                       message=str(exc))
    await patch_status(rt, kube.SENDING_DOMAINS, body, {
        **with_conditions(body, conds), "observedGeneration": generation_of(body)})
    if before is None or before.get("reason") != domain_mod.REASON_SECRET_CONFLICT:
        post_events(body, [Event("Warning", domain_mod.REASON_SECRET_CONFLICT, str(exc))])


def _answer(condition: Mapping[str, Any] | None) -> bool | None:
    """What DNS said according to a verification condition; None when it could not tell."""
    status = (condition or {}).get("status")
    return None if status in (None, "Unknown") else status == "True"


def register(registry: kopf.OperatorRegistry, rt: Runtime,
             resource: tuple[str, str, str]) -> None:
    """The domain worker, its wake-ups, the relay pokes, and the deletion handler."""
    config = rt.config

    @kopf.daemon(*resource, id="domain_worker", cancellation_timeout=5.0, registry=registry)
    async def domain_worker(**kwargs: Any) -> None:
        body, stopped, logger = kwargs["body"], kwargs["stopped"], kwargs["logger"]
        key = key_of(body)
        waker = rt.domain_wakers.setdefault(key, asyncio.Event())
        backoff = config.dns_check_initial
        try:
            while not stopped:
                waker.clear()
                try:
                    verified, next_step = await reconcile_domain_once(rt, body, kwargs, logger)
                except domain_mod.DKIMSecretConflict as exc:
                    await _secret_conflict(rt, body, exc)
                    verified, next_step = True, None  # nothing to retry until a change
                except SpecError as exc:
                    await patch_status(rt, kube.SENDING_DOMAINS, body,
                                       invalid_spec_status(rt, "SendingDomain", body, exc))
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
                if await wait_for_wake(waker, stopped, delay):
                    backoff = config.dns_check_initial
        finally:
            if rt.domain_wakers.get(key) is waker:
                del rt.domain_wakers[key]

    @kopf.on.update(*resource, id="domain_changed", registry=registry)
    async def domain_changed(**kwargs: Any) -> None:
        rt.wake_domain(key_of(kwargs["body"]))

    @kopf.on.event(*resource, id="domain_event", registry=registry)
    async def domain_event(**kwargs: Any) -> None:
        body = kwargs["body"]
        rt.metrics.observe("SendingDomain", body, deleted=kwargs["type"] == "DELETED")
        # Status (verification) decides whether the relay signs for the domain: every event,
        # including the status patches and the deletion, re-renders (a no-op when unchanged).
        rt.poke(ref_key(body))

    @kopf.on.delete(*resource, id="domain_deleted", registry=registry)
    async def domain_deleted(**kwargs: Any) -> None:
        body = kwargs["body"]
        relay_key = ref_key(body)
        result = await rt.render_now(relay_key, config.delete_timeout)
        if rt.workers.get(relay_key) is not None and result is None:
            raise kopf.TemporaryError("the relay configuration is not rendered yet", delay=1)
        rt.metrics.domain(str((body.get("spec") or {}).get("domain")), keys=None,
                          claim=key_of(body))
