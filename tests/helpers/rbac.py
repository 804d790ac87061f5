"""What a subject may do, worked out from Role, ClusterRole, RoleBinding and ClusterRoleBinding
objects the way the API server's RBAC authorizer does:

- a ClusterRole with an ``aggregationRule`` holds the rules of every ClusterRole whose labels
  match one of its selectors (the controller-manager fills them in; here they are computed);
- a RoleBinding grants its role's rules in the binding's namespace only (even when it refers to
  a ClusterRole); a ClusterRoleBinding grants them in every namespace and cluster-wide;
- a rule matches when apiGroups, resources (``plural`` or ``plural/subresource``; ``*`` and
  ``*/status``-style wildcards) and verbs match, and resourceNames (if any) hold the name.

Only allow rules exist in RBAC, so a request is allowed iff some bound rule matches.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .scrape import selector_matches

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Request:
    verb: str
    group: str
    resource: str  # "smtpcredentials" or "smtpcredentials/status"
    namespace: str | None  # None: a cluster-scoped request (or across all namespaces)
    name: str | None = None


def _resource_matches(pattern: str, resource: str) -> bool:
    if pattern in ("*", resource):
        return True
    if "/" in pattern and "/" in resource:
        p_res, p_sub = pattern.split("/", 1)
        r_res, r_sub = resource.split("/", 1)
        return (p_res == "*" and p_sub == r_sub) or (p_sub == "*" and p_res == r_res)
    return False


def rule_matches(rule: Obj, req: Request) -> bool:
    groups, verbs = rule.get("apiGroups") or [], rule.get("verbs") or []
    if not ("*" in groups or req.group in groups):
        return False
    if not ("*" in verbs or req.verb in verbs):
        return False
    if not any(_resource_matches(p, req.resource) for p in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames")
    return not names or req.name in names


class Authorizer:
    def __init__(self, objects: Iterable[Obj]) -> None:
        objs = list(objects)
        self.cluster_roles = {o["metadata"]["name"]: o for o in objs
                              if o["kind"] == "ClusterRole"}
        self.roles = {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs
                      if o["kind"] == "Role"}
        self.bindings = [o for o in objs if o["kind"] in ("RoleBinding", "ClusterRoleBinding")]

    def cluster_role_rules(self, name: str) -> list[Obj]:
        role = self.cluster_roles.get(name)
        if role is None:
            return []
        rules = list(role.get("rules") or [])
        aggregation = role.get("aggregationRule")
        if aggregation:
            for other in self.cluster_roles.values():
                if other is role:
                    continue
                labels = other["metadata"].get("labels") or {}
                if any(selector_matches(sel, labels)
                       for sel in aggregation.get("clusterRoleSelectors") or []):
                    rules += other.get("rules") or []
        return rules

    def _role_rules(self, ref: Obj, namespace: str | None) -> list[Obj]:
        if ref["kind"] == "ClusterRole":
            return self.cluster_role_rules(ref["name"])
        role = self.roles.get((namespace or "", ref["name"]))
        return list(role.get("rules") or []) if role else []

    @staticmethod
    def _subject_matches(subject: Obj, user: str, groups: Iterable[str]) -> bool:
        kind, name = subject["kind"], subject["name"]
        if kind == "User":
            return name == user
        if kind == "Group":
            return name in set(groups)
        if kind == "ServiceAccount":
            return user == f"system:serviceaccount:{subject.get('namespace')}:{name}"
        return False

    def allowed(self, user: str, req: Request, groups: Iterable[str] = ()) -> bool:
        groups = list(groups)
        for binding in self.bindings:
            if not any(self._subject_matches(s, user, groups)
                       for s in binding.get("subjects") or []):
                continue
            if binding["kind"] == "RoleBinding":
                ns = binding["metadata"]["namespace"]
                if req.namespace != ns:
                    continue  # a RoleBinding grants nothing outside its namespace
                rules = self._role_rules(binding["roleRef"], ns)
            else:
                rules = self._role_rules(binding["roleRef"], None)
            if any(rule_matches(r, req) for r in rules):
                return True
        return False
