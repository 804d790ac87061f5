"""Which pods a set of ServiceMonitors makes Prometheus scrape, worked out the way the Prometheus
Operator does it: a ServiceMonitor selects Services (label selector, in the namespaces of its
namespaceSelector, by default its own); each endpoint names a Service port; every pod the
Service selects becomes one target per selected (Service, endpoint). A pod listed twice is
scraped twice, and every `sum` over its series reads double."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

Obj = Mapping[str, Any]


def selector_matches(selector: Mapping[str, Any] | None, labels: Mapping[str, str]) -> bool:
    """A metav1.LabelSelector (matchLabels and matchExpressions); empty matches everything."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for req in selector.get("matchExpressions") or []:
        key, op, values = req["key"], req["operator"], req.get("values") or []
        present = key in labels
        if op == "In" and not (present and labels[key] in values):
            return False
        if op == "NotIn" and present and labels[key] in values:
            return False
        if op == "Exists" and not present:
            return False
        if op == "DoesNotExist" and present:
            return False
    return True


def pods_of(workloads: Iterable[Obj]) -> list[tuple[str, str, dict[str, str]]]:
    """(namespace, pod name, labels) for every pod a StatefulSet or Deployment runs."""
    pods = []
    for w in workloads:
        if w["kind"] not in ("StatefulSet", "Deployment"):
            continue
        md = w["metadata"]
        labels = dict(w["spec"]["template"]["metadata"]["labels"])
        for i in range(int(w["spec"].get("replicas", 1))):
            pods.append((md["namespace"], f"{md['name']}-{i}", labels))
    return pods


def scrape_targets(objects: Iterable[Obj]) -> Counter[tuple[str, str, str]]:
    """(namespace, pod, path) -> how many scrape targets point at it."""
    objects = list(objects)
    services = [o for o in objects if o["kind"] == "Service"]
    pods = pods_of(objects)
    targets: Counter[tuple[str, str, str]] = Counter()
    for sm in (o for o in objects if o["kind"] == "ServiceMonitor"):
        sm_ns = sm["metadata"]["namespace"]
        ns_sel = sm["spec"].get("namespaceSelector") or {}
        for svc in services:
            svc_ns = svc["metadata"]["namespace"]
            if ns_sel.get("any"):
                pass
            elif ns_sel.get("matchNames"):
                if svc_ns not in ns_sel["matchNames"]:
                    continue
            elif svc_ns != sm_ns:
                continue
            if not selector_matches(sm["spec"]["selector"], svc["metadata"].get("labels") or {}):
                continue
            port_names = {p.get("name") for p in svc["spec"].get("ports") or []}
            for endpoint in sm["spec"]["endpoints"]:
                if endpoint.get("port") not in port_names:
                    continue
                for pod_ns, pod, labels in pods:
                    if pod_ns == svc_ns and selector_matches(
                            {"matchLabels": svc["spec"]["selector"]}, labels):
                        targets[(pod_ns, pod, endpoint.get("path", "/metrics"))] += 1
    return targets
