"""Whether NetworkPolicies let a connection into a pod, by the rules of networking.k8s.io/v1
(ingress only): a pod no Ingress policy selects accepts everything; a selected pod accepts a
connection when at least one rule of one selecting policy matches both the peer and the port.
A peer entry with only a podSelector means pods of the policy's own namespace; with only a
namespaceSelector, every pod of the selected namespaces; with both, selected pods of selected
namespaces. Ports are the destination pod's ports (numbers, or names looked up in the pod)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .scrape import selector_matches

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Pod:
    namespace: str
    labels: Mapping[str, str]
    namespace_labels: Mapping[str, str] = field(default_factory=dict)
    ports: Mapping[str, int] = field(default_factory=dict)  # named container ports

    def ns_labels(self) -> dict[str, str]:
        # The API server sets this label on every namespace (Kubernetes >= 1.21).
        return {**self.namespace_labels, "kubernetes.io/metadata.name": self.namespace}


def _peer_matches(peer: Obj, policy_ns: str, source: Pod) -> bool:
    if "ipBlock" in peer:
        return False  # tests speak of pods only
    ns_sel, pod_sel = peer.get("namespaceSelector"), peer.get("podSelector")
    if ns_sel is None:
        if source.namespace != policy_ns:
            return False
    elif not selector_matches(ns_sel, source.ns_labels()):
        return False
    return pod_sel is None or selector_matches(pod_sel, source.labels)


def _port_matches(rule_port: Obj, dest: Pod, port: int) -> bool:
    if rule_port.get("protocol", "TCP") != "TCP":
        return False
    want = rule_port.get("port")
    if want is None:
        return True
    if isinstance(want, str):
        want = dest.ports.get(want)
    end = rule_port.get("endPort", want)
    return want is not None and want <= port <= end


def ingress_allowed(policies: Iterable[Obj], source: Pod, dest: Pod, port: int) -> bool:
    selecting = [p for p in policies if p["kind"] == "NetworkPolicy"
                 and p["metadata"]["namespace"] == dest.namespace
                 and selector_matches(p["spec"]["podSelector"], dest.labels)
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])]
    if not selecting:
        return True
    for policy in selecting:
        for rule in policy["spec"].get("ingress") or []:
            peers = rule.get("from")
            ports = rule.get("ports")
            peer_ok = not peers or any(
                _peer_matches(p, policy["metadata"]["namespace"], source) for p in peers)
            port_ok = not ports or any(_port_matches(p, dest, port) for p in ports)
            if peer_ok and port_ok:
                return True
    return False
