"""What the per-resource handler modules share: keys, diffs, status patches, Events, inputs
for the pure functions, and the wait of the long-running workers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Mapping
from typing import Any, cast

import kopf

from .. import kube
from ..reconcile import domain as domain_mod
from ..reconcile.conditions import READY, Event, set_condition
from ..reconcile.credential_state import state_secret_name
from ..reconcile.models import (
    SendingDomain,
    SmtpCredential,
    SmtpRelay,
    SpecError,
    parse_sending_domain,
    parse_smtp_credential,
    parse_smtp_relay,
)
from ..reconcile.render import CredentialInput, DomainInput
from ..runtime import Body, RelayKey, Runtime

REASON_INVALID_SPEC = "InvalidSpec"

RECONCILED = "Reconciled"
"""Condition on every resource: whether the operator wrote everything the current generation
asks for. Reasons: `Reconciled`, `InvalidSpec`, `ChildWriteFailed` (the message names the child
and the API server's answer), `ConfigInvalid` (relays)."""
REASON_RECONCILED = "Reconciled"
REASON_CHILD_WRITE_FAILED = "ChildWriteFailed"


def first(values: Iterable[Any] | None) -> Any:
    for value in values or ():
        return value
    return None


def key_of(body: Body) -> str:
    meta = body.get("metadata") or {}
    return f"{meta.get('namespace')}/{meta.get('name')}"


def ref_key(body: Body) -> RelayKey:
    """The relay a SendingDomain or SmtpCredential body refers to."""
    meta = body.get("metadata") or {}
    ref = ((body.get("spec") or {}).get("relayRef") or {})
    return (str(ref.get("namespace") or meta.get("namespace")), str(ref.get("name")))


def index_by_relay(**kwargs: Any) -> Any:
    """kopf index function: a domain or credential body under the relay it refers to."""
    body = kwargs["body"]
    return {ref_key(body): dict(body)}


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


def parse_all(parse: Callable[[Body], Any], bodies: Iterable[Body],
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
    domains: list[SendingDomain] = parse_all(parse_sending_domain, bodies, rt.parsed)
    secrets = await asyncio.gather(*(
        rt.secret(d.meta.namespace, domain_mod.secret_name(d)) for d in domains))
    return [DomainInput(d, s) for d, s in zip(domains, secrets, strict=True)]


async def credential_inputs(rt: Runtime, bodies: Iterable[Body]) -> list[CredentialInput]:
    creds: list[SmtpCredential] = parse_all(parse_smtp_credential, bodies, rt.parsed)
    secrets = await asyncio.gather(*(
        rt.secret(c.meta.namespace, c.secret_name) for c in creds))
    states = await asyncio.gather(*(
        rt.secret(c.relay_namespace, state_secret_name(c)) for c in creds))
    # Always the credential's own namespace: a reference names no other.
    hooks = await asyncio.gather(*(
        rt.secret(c.meta.namespace, c.spec.webhook.secret_ref.name) if c.spec.webhook
        else _none() for c in creds))
    return [CredentialInput(c, s, st, h)
            for c, s, st, h in zip(creds, secrets, states, hooks, strict=True)]


async def _none() -> None:
    return None


def relay_of(relays_idx: kopf.Index[RelayKey, Body], key: RelayKey) -> SmtpRelay | None:
    body = first(relays_idx.get(key))
    if body is None or (body.get("metadata") or {}).get("deletionTimestamp"):
        return None  # a relay on its way out admits nothing new
    try:
        return parse_smtp_relay(body)
    except SpecError:
        return None


def generation_of(body: Body | Mapping[str, Any]) -> int:
    return int((body.get("metadata") or {}).get("generation") or 0)


def with_conditions(body: Body | Mapping[str, Any],
                    conds: list[dict[str, Any]]) -> dict[str, Any]:
    """The whole status with new conditions: patch_status sends what is wanted, so a status
    of conditions alone would null the other fields (configHash, dnsRecords, ...)."""
    return {**(body.get("status") or {}), "conditions": conds}


def invalid_spec_conditions(rt: Runtime, kind: str, body: Body | Mapping[str, Any],
                            exc: SpecError) -> list[dict[str, Any]]:
    """Count an invalid spec and return the conditions saying so (Ready=False and
    Reconciled=False, InvalidSpec, with the message that names the field)."""
    rt.metrics.invalid(kind)
    conds = set_condition((body.get("status") or {}).get("conditions"), READY, False,
                          REASON_INVALID_SPEC, str(exc), generation_of(body), rt.clock())
    return reconciled(rt, conds, body, False, reason=REASON_INVALID_SPEC, message=str(exc))


def invalid_spec_status(rt: Runtime, kind: str, body: Body | Mapping[str, Any],
                        exc: SpecError) -> dict[str, Any]:
    """The whole status for an invalid spec: the generation was seen (observedGeneration
    follows it, so no stale-generation alert fires for what the conditions already say)."""
    return {**with_conditions(body, invalid_spec_conditions(rt, kind, body, exc)),
            "observedGeneration": generation_of(body)}


def reconciled(rt: Runtime, conditions: list[dict[str, Any]] | None,
               body: Body | Mapping[str, Any], ok: bool, *, reason: str = REASON_RECONCILED,
               message: str = "every object the spec asks for is written",
               ) -> list[dict[str, Any]]:
    """`conditions` with the Reconciled condition set for the body's current generation."""
    return set_condition(conditions, RECONCILED, ok, reason, message, generation_of(body),
                         rt.clock())


def child_write_failed(rt: Runtime, body: Body, manifest: Mapping[str, Any],
                       exc: Exception) -> str:
    """Count a failed write of a child, post a Warning Event on its owner, and return the
    message (the child and the API server's answer; never what was sent)."""
    kind = str(manifest.get("kind"))
    name = (manifest.get("metadata") or {}).get("name")
    rt.metrics.child_write_failed(kind)
    reason = f"{exc.status} {exc.reason}" if isinstance(exc, kube.ApiError) else type(
        exc).__name__
    detail = str(exc).split(": ", 2)[-1] if isinstance(exc, kube.ApiError) else str(exc)
    if kind == "Secret":
        # An admission webhook may quote what it refused: a Secret's answer stays in the
        # operator's log, never in an Event or status field a tenant reads.
        detail = "the API server's message is in the operator log"
    message = f"{kind} {name}: {reason}: {detail}"[:1000]
    post_events(body, [Event("Warning", REASON_CHILD_WRITE_FAILED, message)])
    return message


async def delete_if_owned(rt: Runtime, resource: kube.Resource, namespace: str, name: str,
                          owner_uid: str) -> None:
    """Delete a child the spec no longer asks for, only if `owner_uid` controls it (a user's
    own object of the same name is left alone)."""
    obj = await rt.client.get(resource, namespace, name)
    if obj is None:
        return
    owners = (obj.get("metadata") or {}).get("ownerReferences") or []
    if any(o.get("uid") == owner_uid and o.get("controller") for o in owners):
        await rt.client.delete(resource, namespace, name)


async def patch_status(rt: Runtime, resource: kube.Resource, body: Body,
                       status: Mapping[str, Any]) -> None:
    diff = merge_diff(body.get("status") or {}, status)
    if not diff:
        return
    meta = body["metadata"]
    await rt.client.patch(resource, meta.get("namespace"), meta["name"], {"status": diff},
                          status=True)


async def wait_for_wake(wake: asyncio.Event, stopped: Any, within: float) -> bool:
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
