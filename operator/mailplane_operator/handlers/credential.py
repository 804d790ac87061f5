"""SmtpCredential handlers: admission, the application Secret, rotation on a timer, and a
finalizer held until the relay's configuration no longer accepts a deleted credential."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import kopf

from .. import kube
from ..kube import ApiError
from ..reconcile import credential as cred_mod
from ..reconcile.conditions import Event, format_time, get_condition, parse_time, set_condition
from ..reconcile.credential_state import (
    COMPONENT_STATE,
    LABEL_COMPONENT,
    LABEL_CREDENTIAL_UID,
    state_secret_name,
    state_secret_name_of,
)
from ..reconcile.models import SmtpCredential, SmtpRelay, SpecError, parse_smtp_credential
from ..reconcile.ownership import DomainOwner
from ..reconcile.render import RENDER_REASONS, attached_domains, owners_of
from ..runtime import Body, RelayKey, Runtime
from . import scaledown
from .common import (
    REASON_CHILD_WRITE_FAILED,
    REASON_INVALID_SPEC,
    child_write_failed,
    domain_inputs,
    generation_of,
    invalid_spec_status,
    key_of,
    merge_diff,
    patch_status,
    post_events,
    reconciled,
    ref_key,
    relay_of,
    with_conditions,
)

logger = logging.getLogger(__name__)

# Reasons of status.rotation (a rotated password pushed to the relay pods).
REASON_ROTATION_PENDING = "RotationPending"
REASON_ROTATION_CONFIRMED = "RotationConfirmed"
REASON_ROTATION_UNCONFIRMED = "RotationUnconfirmed"
PUSH_RETRY = 1.0
"""Seconds between two pushes of a rotated password to the pods that have not confirmed it."""


def _credential_state(result: cred_mod.CredentialResult) -> str:
    if not result.admission.allowed:
        return "invalid"
    return "suspended" if result.status.get("suspendedBy") else "active"


async def reconcile_credential(rt: Runtime, body: Body, patch: kopf.Patch,
                               indexes: Mapping[str, Any], *, poke: bool) -> None:
    key = key_of(body)
    try:
        cred = parse_smtp_credential(body)
    except SpecError as exc:
        patch.setdefault("status", {}).update(
            invalid_spec_status(rt, "SmtpCredential", body, exc))
        post_events(body, [Event("Warning", REASON_INVALID_SPEC, str(exc))])
        return
    relay_key = (cred.relay_namespace, cred.spec.relay_ref.name)
    async with rt.lock(key):
        with rt.metrics.reconcile("SmtpCredential"):
            now = rt.clock()
            relay = relay_of(indexes["relays_idx"], relay_key)
            attached: Mapping[str, DomainOwner] = {}
            ns_labels = await rt.namespace_labels(cred.meta.namespace)
            worker = rt.workers.get(relay_key)
            render_exclusion: tuple[str, str] | None = None
            if relay is not None and worker is not None and worker.last is not None:
                # The domains the relay actually signs for, as of its last render; a render
                # that changes them re-checks the credentials it disagrees with.
                attached = worker.last.owners
                left_out = worker.last.exclusion("SmtpCredential", key)
                if left_out is not None and left_out.reason in RENDER_REASONS:
                    render_exclusion = (left_out.reason, left_out.message)
            elif relay is not None:
                domains = await domain_inputs(rt, indexes["domains_idx"].get(relay_key, ()))
                labels = await rt.labels_of(d.domain.meta.namespace for d in domains)
                included, _excluded = attached_domains(relay, domains, labels)
                attached = owners_of(included)
            existing = await rt.secret(cred.meta.namespace, cred.secret_name, fresh=True)
            state_name = state_secret_name(cred)
            stored = (await rt.secret(cred.relay_namespace, state_name, fresh=True)
                      if relay is not None else None)
            endpoint = (cred_mod.relay_endpoint(relay, rt.config.cluster_domain)
                        if relay is not None else None)
            result = cred_mod.reconcile_credential(
                cred, relay=relay, namespace_labels=ns_labels, attached_domains=attached,
                existing_secret=existing, stored_state=stored, now=now, random=rt.random,
                endpoint=endpoint, render_exclusion=render_exclusion)
            written = False
            if result.state_secret is not None:
                # The state first: a new password's hash reaches the relay no later than the
                # application gets the password, and a crash in between loses nothing.
                action, obj = await _write(rt, body, result.state_secret)
                rt.remember_secret(cred.relay_namespace, state_name, obj)
                written = action != "unchanged"
            push = cred_mod.pushed_password(cred, result, now, relay)
            if push is None and _confirmation_cut_short(rt, key, body, result):
                # Pending in the status but confirmed by no one here (the operator restarted
                # meanwhile): the same rotation is pushed again.
                push = cred_mod.pushed_password(cred, result, now, relay, resume=True)
            first: _Round | None = None
            if push is not None and relay is not None:
                # Then the relay pods, ahead of their mounted configuration: the pods that
                # answer run the new password before the application can read it.
                _cancel_push(rt, key)
                first = await _push_round(rt, relay, push)
            if result.secret is not None:
                # Guarded: a Secret someone else created in between is never overwritten.
                action, obj = await _write(rt, body, result.secret, owner_uid=cred.meta.uid)
                rt.remember_secret(cred.meta.namespace, cred.secret_name, obj)
                written |= action != "unchanged"
            conditions, hook_events = await _webhook_condition(
                rt, cred, body, reconciled(rt, result.status.get("conditions"), body, True))
            status = {**result.status, "conditions": conditions,
                      # Written by the confirmation of a pushed rotation only (left as it is).
                      "rotation": (body.get("status") or {}).get("rotation")}
            diff = merge_diff(body.get("status") or {}, status)
            if diff:
                patch.setdefault("status", {}).update(diff)
            post_events(body, [*result.events, *hook_events])
            rt.credential_next_check[key] = result.next_check
            rt.metrics.credential(
                cred.meta.namespace, cred.meta.name, state=_credential_state(result),
                rotated_at=result.state.rotated_at.timestamp() if result.state else None,
                interval=cred.spec.rotation.interval)
    if push is not None and first is not None:
        rt.rotation_pushes[key] = asyncio.create_task(
            _confirm_rotation(rt, body, indexes["relays_idx"], relay_key, push=push,
                              first=first),
            name=f"rotation push {key}")
    if written or poke:
        rt.poke(relay_key)


async def _webhook_condition(rt: Runtime, cred: SmtpCredential, body: Body,
                             conditions: list[dict[str, Any]],
                             ) -> tuple[list[dict[str, Any]], list[Event]]:
    """The Webhook condition (only with spec.webhook), and a Warning Event when it turns
    False: the Secret is missing, unlabelled, or lacks a usable key (the message says how to
    fix it; the credential sends meanwhile, its events are not posted)."""
    if cred.spec.webhook is None:
        return [c for c in conditions if c.get("type") != cred_mod.WEBHOOK], []
    ref = cred.spec.webhook.secret_ref
    secret = await rt.secret(cred.meta.namespace, ref.name, fresh=True)
    _secrets, problem = cred_mod.webhook_secrets(cred, secret)
    before = get_condition(conditions, cred_mod.WEBHOOK)
    if problem is None:
        return set_condition(conditions, cred_mod.WEBHOOK, True,
                             cred_mod.REASON_WEBHOOK_CONFIGURED,
                             f"events are signed with Secret {cred.meta.namespace}/{ref.name}",
                             generation_of(body), rt.clock()), []
    events = [] if before is not None and before.get("status") == "False" and (
        before.get("message") == problem) else [
        Event("Warning", cred_mod.REASON_WEBHOOK_SECRET_MISSING, problem)]
    return set_condition(conditions, cred_mod.WEBHOOK, False,
                         cred_mod.REASON_WEBHOOK_SECRET_MISSING, problem, generation_of(body),
                         rt.clock()), events


def _confirmation_cut_short(rt: Runtime, key: str, body: Body,
                            result: cred_mod.CredentialResult) -> bool:
    rotation = (body.get("status") or {}).get("rotation") or {}
    task = rt.rotation_pushes.get(key)
    return (result.state is not None and rotation.get("reason") == REASON_ROTATION_PENDING
            and rotation.get("serial") == result.state.serial
            and (task is None or task.done()))


@dataclass(frozen=True)
class _Round:
    """One push of a rotated password: the running pods asked, those that confirmed, and why
    none could be asked (empty: they could)."""

    asked: list[str]
    confirmed: set[str]
    problem: str = ""


async def _push_round(rt: Runtime, relay: SmtpRelay, push: dict[str, Any]) -> _Round:
    admin = await scaledown.admin_client(rt, relay)
    if admin.context is None:
        return _Round([], set(), admin.problem)
    asked, confirmed = await scaledown.push_password(rt, relay, admin, push)
    return _Round(asked, confirmed)


def _cancel_push(rt: Runtime, key: str) -> None:
    """A newer rotation (or the deletion) supersedes the confirmation of an earlier one."""
    task = rt.rotation_pushes.pop(key, None)
    if task is not None:
        task.cancel()


async def _confirm_rotation(rt: Runtime, body: Body, relays_idx: Any, relay_key: RelayKey, *,
                            push: dict[str, Any], first: _Round) -> None:
    """Push the rotated password again (every second, re-listing the pods: one restarted or
    replaced meanwhile is asked too) until every running pod has confirmed it, at most
    ``revocation_timeout``; then say so in ``status.rotation`` (and a Warning Event naming the
    pods when some never confirmed)."""
    started = time.monotonic()
    serial = int(push["passwordSerial"])
    meta = body.get("metadata") or {}
    namespace, name = str(meta.get("namespace")), str(meta.get("name"))
    confirmed = set(first.confirmed)
    this_round = first
    where = (namespace, name, serial)
    await _rotation_status(rt, where, False, REASON_ROTATION_PENDING, (
        f"pushing the password of rotation {serial} to the relay pods"), last=this_round,
        confirmed=confirmed)
    while True:
        pending = sorted(set(this_round.asked) - confirmed)
        if not this_round.problem and not pending:
            await _rotation_status(rt, where, True, REASON_ROTATION_CONFIRMED, (
                f"every running relay pod ({len(this_round.asked)}) runs the password of "
                f"rotation {serial}; the previous password works only as "
                "status.previousPasswordExpires says" if this_round.asked else
                "no relay pod is running; pods that start read the rotated password from "
                "their configuration"), last=this_round, confirmed=confirmed,
                seconds=time.monotonic() - started)
            return
        if time.monotonic() - started >= rt.config.revocation_timeout:
            why = this_round.problem or (
                f"relay pods {', '.join(pending)} did not confirm the password of rotation "
                f"{serial} within {rt.config.revocation_timeout:.0f}s (not answering or "
                "refusing it); they run it once their configuration volume catches up")
            post_events(body, [Event("Warning", REASON_ROTATION_UNCONFIRMED, why)])
            await _rotation_status(rt, where, False, REASON_ROTATION_UNCONFIRMED, why,
                                   last=this_round, confirmed=confirmed)
            return
        await asyncio.sleep(PUSH_RETRY)
        relay = relay_of(relays_idx, relay_key)
        if relay is None:
            return
        this_round = await _push_round(rt, relay, push)
        confirmed |= this_round.confirmed


async def _rotation_status(rt: Runtime, where: tuple[str, str, int], done: bool, reason: str,
                           message: str, *, last: _Round, confirmed: set[str],
                           seconds: float | None = None) -> None:
    """``status.rotation``: whether every running relay pod runs the rotated password."""
    namespace, name, serial = where
    status = {"serial": serial, "confirmed": done, "reason": reason, "message": message,
              "confirmedPods": sorted(confirmed & set(last.asked)),
              "pendingPods": sorted(set(last.asked) - confirmed),
              "time": format_time(rt.clock()),
              "confirmedAfterSeconds": round(seconds, 3) if seconds is not None else None}
    try:
        await rt.client.patch(kube.SMTP_CREDENTIALS, namespace, name,
                              {"status": {"rotation": status}}, status=True)
    except ApiError as exc:
        # Deleted meanwhile, or the API server away: the next rotation writes it again.
        logger.warning("SmtpCredential %s/%s: status.rotation not written: %s", namespace,
                       name, exc)


async def _write(rt: Runtime, body: Body, manifest: Mapping[str, Any],
                 owner_uid: str | None = None) -> tuple[str, dict[str, Any]]:
    """Apply one of the credential's Secrets; a failure is reported (Event, metric,
    Reconciled=False) before it propagates to kopf's retry."""
    try:
        return await rt.client.apply(manifest, owner_uid=owner_uid)
    except ApiError as exc:
        message = child_write_failed(rt, body, manifest, exc)
        await patch_status(rt, kube.SMTP_CREDENTIALS, body, with_conditions(body, reconciled(
            rt, (body.get("status") or {}).get("conditions"), body, False,
            reason=REASON_CHILD_WRITE_FAILED, message=message)))
        raise


async def _confirm_revocation(rt: Runtime, body: Body, relays_idx: Any, relay_key: RelayKey,
                              render_id: str) -> None:
    """Hold the finalizer until every running relay pod reports a configuration at or after
    the render without this credential (``GET /admin/status``); after
    ``revocation_timeout`` it is released anyway with a Warning Event naming the pods."""
    relay = relay_of(relays_idx, relay_key)
    worker = rt.workers.get(relay_key)
    if relay is None or worker is None:
        return
    admin = await scaledown.admin_client(rt, relay)
    accepted = worker.since(render_id) or {render_id}
    running = await scaledown.pod_configs(rt, relay, admin)
    behind = sorted(n for n, c in running.items() if c.render not in accepted)
    if not behind:
        return
    # Kubelet brings the new render to the pods' volume 60-90 s later: the pods behind are
    # told now, and one that confirms it refuses the credential is done.
    meta = body.get("metadata") or {}
    refused = await scaledown.push_revocation(
        rt, relay, admin, cred_mod.username_of(str(meta.get("namespace")), str(meta.get("name"))))
    behind = [n for n in behind if n not in refused]
    if not behind:
        return
    deleted = parse_time((body.get("metadata") or {}).get("deletionTimestamp"))
    waited = (rt.clock() - deleted).total_seconds() if deleted else 0.0
    if waited < rt.config.revocation_timeout:
        raise kopf.TemporaryError(
            f"waiting for relay pods {', '.join(behind)} to run a configuration without this "
            "credential", delay=1)
    post_events(body, [Event("Warning", "RevocationUnconfirmed", (
        f"relay pods {', '.join(behind)} did not report a configuration without this credential "
        f"within {rt.config.revocation_timeout:.0f}s; released anyway (the relay pods' "
        "configuration volume will catch up)"))])


def register(registry: kopf.OperatorRegistry, rt: Runtime,
             resource: tuple[str, str, str]) -> None:
    """Create/update/resume, the rotation timer, and the deletion handler."""
    config = rt.config

    @kopf.on.resume(*resource, id="credential", registry=registry)
    @kopf.on.create(*resource, id="credential", registry=registry)
    @kopf.on.update(*resource, id="credential", registry=registry)
    async def credential(**kwargs: Any) -> None:
        try:
            await reconcile_credential(rt, kwargs["body"], kwargs["patch"], kwargs, poke=True)
        except ApiError as exc:
            if exc.temporary:
                raise kopf.TemporaryError(str(exc), delay=1 if config.fast else 10) from None
            raise

    @kopf.timer(*resource, id="credential_rotation", interval=config.rotation_check_interval,
                initial_delay=config.rotation_check_interval, registry=registry)
    async def credential_rotation(**kwargs: Any) -> None:
        body, patch = kwargs["body"], kwargs["patch"]
        key = key_of(body)
        if key in rt.credential_next_check:
            due = rt.credential_next_check[key]
            if due is None or rt.clock() < due:
                return  # nothing scheduled yet; a relay render drops the entry when stale
        await reconcile_credential(rt, body, patch, kwargs, poke=False)

    @kopf.on.event(*resource, id="credential_event", registry=registry)
    async def credential_event(**kwargs: Any) -> None:
        rt.metrics.observe("SmtpCredential", kwargs["body"],
                           deleted=kwargs["type"] == "DELETED")

    @kopf.on.delete(*resource, id="credential_deleted", registry=registry)
    async def credential_deleted(**kwargs: Any) -> None:
        body, namespace, name = kwargs["body"], kwargs["namespace"], kwargs["name"]
        relay_key = ref_key(body)
        key = key_of(body)
        if rt.workers.get(relay_key) is not None:
            result = await rt.render_now(relay_key, config.delete_timeout)
            if result is None or key in result.credentials:
                # The finalizer stays until the relay no longer accepts this credential.
                raise kopf.TemporaryError("the relay configuration still holds this credential",
                                          delay=1)
            await _confirm_revocation(rt, body, kwargs["relays_idx"], relay_key,
                                      result.render_id)
        # The relay no longer accepts it: its rotation state goes too (a namespaced owner
        # reference cannot reach across namespaces, so nothing else would delete it).
        state_ns = ((body.get("spec") or {}).get("relayRef") or {}).get("namespace") or namespace
        uid = str((body.get("metadata") or {}).get("uid") or "")
        state = (await rt.client.get(kube.SECRETS, state_ns, state_secret_name_of(uid))
                 if uid else None)
        labels = ((state or {}).get("metadata") or {}).get("labels") or {}
        # Only the state Secret the operator made for this very object: the relayRef namespace
        # is the tenant's to write, the name and labels carry the uid the API server assigned.
        if state is not None and labels.get(LABEL_CREDENTIAL_UID) == uid[:63] and labels.get(
                LABEL_COMPONENT) == COMPONENT_STATE:
            await rt.client.delete(kube.SECRETS, state_ns, state_secret_name_of(uid))
            rt.remember_secret(state_ns, state_secret_name_of(uid), None)
        rt.credential_next_check.pop(key, None)
        _cancel_push(rt, key)
        rt.locks.pop(key, None)
        rt.metrics.credential(namespace, name, state=None)
