"""Builders of custom resource bodies for the pure reconcile tests: bodies as kopf hands them
over (metadata with uid and generation), parsed by the operator's own parsers."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailplane_operator.reconcile import models

NOW = datetime(2026, 11, 27, 12, 0, 0, tzinfo=UTC)
_uids = itertools.count(1)


def body(kind: str, name: str, namespace: str, spec: dict[str, Any], *,
         generation: int = 1, labels: dict[str, str] | None = None,
         annotations: dict[str, str] | None = None,
         status: dict[str, Any] | None = None, uid: str | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "mailplane.io/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": namespace, "uid": uid or f"uid-{next(_uids)}",
                     "generation": generation, "labels": labels or {},
                     "annotations": annotations or {}},
        "spec": spec,
        "status": status or {},
    }


def relay(name: str = "main", namespace: str = "mail", **spec: Any) -> models.SmtpRelay:
    labels = spec.pop("labels", None)
    spec.setdefault("tls", {"secretName": f"{name}-tls"})
    return models.parse_smtp_relay(body("SmtpRelay", name, namespace, spec, labels=labels))


def domain(domain_name: str = "example.com", name: str | None = None, namespace: str = "mail",
           relay_name: str = "main", *, status: dict[str, Any] | None = None,
           annotations: dict[str, str] | None = None, **spec: Any) -> models.SendingDomain:
    spec = {"domain": domain_name, "relayRef": {"name": relay_name}, **spec}
    return models.parse_sending_domain(body(
        "SendingDomain", name or domain_name.replace(".", "-"), namespace, spec,
        status=status, annotations=annotations))


def credential(name: str = "app", namespace: str = "mail", relay_name: str = "main",
               relay_namespace: str | None = None, *, senders: tuple[str, ...] = ("example.com",),
               annotations: dict[str, str] | None = None, generation: int = 1,
               status: dict[str, Any] | None = None, uid: str | None = None,
               **spec: Any) -> models.SmtpCredential:
    """``uid``: the same object seen again (new annotations or spec), not a new one."""
    ref = {"name": relay_name}
    if relay_namespace:
        ref["namespace"] = relay_namespace
    spec = {"relayRef": ref, "allowedSenders": list(senders), **spec}
    return models.parse_smtp_credential(body("SmtpCredential", name, namespace, spec,
                                             annotations=annotations, generation=generation,
                                             status=status, uid=uid))


def counting_random() -> Callable[[int], bytes]:
    """Deterministic, distinct bytes on every call: reproducible passwords and salts."""
    counter = itertools.count(1)

    def random(n: int) -> bytes:
        seed = next(counter).to_bytes(4, "big")
        return (seed * (n // 4 + 1))[:n]

    return random
