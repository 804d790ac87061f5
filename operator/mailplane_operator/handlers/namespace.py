"""Namespace labels: who may use a relay (``SmtpRelay.spec.allowedNamespaces``) and which
namespaces a SendingDomain's grant reaches are decided by them. A label change updates the
cached labels and re-renders every relay at once, so taking a label away revokes access within
a render instead of waiting for the periodic resync."""

from __future__ import annotations

import time
from typing import Any

import kopf

from ..runtime import Runtime

NAMESPACES = ("", "v1", "namespaces")


def register(registry: kopf.OperatorRegistry, rt: Runtime) -> None:
    @kopf.on.event(*NAMESPACES, id="namespace_labels", registry=registry)
    async def namespace_labels(**kwargs: Any) -> None:
        name, body, event = kwargs["name"], kwargs["body"], kwargs["event"]
        deleted = event.get("type") == "DELETED"
        labels = {} if deleted else dict((body.get("metadata") or {}).get("labels") or {})
        cached = rt.namespace_labels_cache.get(name)
        if deleted:
            rt.namespace_labels_cache.pop(name, None)  # a deleted namespace is not kept
        else:
            rt.namespace_labels_cache[name] = (time.monotonic(), labels)
        if cached is not None and cached[1] == labels:
            return
        if cached is None and event.get("type") in (None, "ADDED"):
            # First sight (the initial listing, or a new namespace): no render used it yet.
            return
        for key in list(rt.workers):
            rt.poke(key)
