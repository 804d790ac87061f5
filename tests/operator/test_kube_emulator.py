"""The emulator answers as a real API server does for the rules the operator must live with:
immutable StatefulSet fields, field removal by merge-patch null, name and label validation,
label selectors on lists and watches, garbage collection with and without orphaning."""

from __future__ import annotations

import json
import threading
import urllib.parse
import urllib.request
from typing import Any

import pytest

from mailplane_operator import kube as k
from tests.helpers.kube import ApiError, KubeApi, namespace_body


def _statefulset(name: str = "main", **spec: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": name}
    body_spec: dict[str, Any] = {
        "replicas": 1, "serviceName": f"{name}-headless", "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": labels},
        "template": {"metadata": {"labels": labels},
                     "spec": {"containers": [{"name": "relay", "image": "x"}]}},
        "volumeClaimTemplates": [{"metadata": {"name": "spool"}, "spec": {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}}}}],
    }
    body_spec.update(spec)
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": name, "namespace": "mail", "labels": labels},
            "spec": body_spec}


def _secret(name: str, **meta: Any) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": "mail", **meta}, "data": {}}


def _status(call: Any) -> int:
    with pytest.raises(ApiError) as info:
        call()
    return info.value.status


@pytest.mark.parametrize("change", [
    {"volumeClaimTemplates": [{"metadata": {"name": "spool"}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}}]},
    {"selector": {"matchLabels": {"app.kubernetes.io/instance": "main", "x": "y"}}},
    {"serviceName": "other"},
    {"podManagementPolicy": "OrderedReady"},
])
def test_immutable_statefulset_fields_answer_422(kube_api: KubeApi,
                                                 change: dict[str, Any]) -> None:
    kube_api.create(k.STATEFULSETS, _statefulset())
    with pytest.raises(ApiError) as info:
        kube_api.patch(k.STATEFULSETS, "mail", "main", {"spec": change})
    assert info.value.status == 422
    assert "updates to statefulset spec for fields other than" in str(info.value)
    sts = kube_api.get(k.STATEFULSETS, "mail", "main")
    assert sts is not None and sts["metadata"]["generation"] == 1  # nothing was written


def test_mutable_statefulset_fields_are_patched(kube_api: KubeApi) -> None:
    kube_api.create(k.STATEFULSETS, _statefulset())
    sts = kube_api.patch(k.STATEFULSETS, "mail", "main", {"spec": {
        "replicas": 3, "updateStrategy": {"type": "OnDelete"},
        "template": {"spec": {"containers": [{"name": "relay", "image": "y"}]}}}})
    assert sts["spec"]["replicas"] == 3
    assert sts["metadata"]["generation"] == 2


def test_merge_patch_null_removes_a_field(kube_api: KubeApi) -> None:
    kube_api.create(k.SECRETS, _secret("s", labels={"a": "1", "b": "2"},
                                       annotations={"keep": "x", "drop": "y"}))
    out = kube_api.patch(k.SECRETS, "mail", "s", {
        "metadata": {"labels": {"b": None}, "annotations": {"drop": None}}})
    assert out["metadata"]["labels"] == {"a": "1"}
    assert out["metadata"]["annotations"] == {"keep": "x"}
    stored = kube_api.get(k.SECRETS, "mail", "s")
    assert stored is not None and "b" not in stored["metadata"]["labels"]


@pytest.mark.parametrize(("resource", "name", "ok"), [
    (k.SERVICES, "mail.v2", False),          # a Service name is a DNS-1035 label
    (k.SERVICES, "2mail", False),
    (k.SERVICES, "mail-v2", True),
    (k.SERVICES, "m" * 64, False),
    (k.SECRETS, "mail.v2", True),            # most names are DNS-1123 subdomains
    (k.SECRETS, "Mail", False),
    (k.SECRETS, "a" * 254, False),
    (k.SECRETS, "-a", False),
    (k.STATEFULSETS, "mail_v2", False),
])
def test_object_names_are_validated(kube_api: KubeApi, resource: k.Resource, name: str,
                                    ok: bool) -> None:
    body: dict[str, Any] = (_secret(name) if resource == k.SECRETS else
                            {"apiVersion": resource.api_version, "kind": resource.kind,
                             "metadata": {"name": name, "namespace": "mail"}, "spec": {}})
    if resource == k.STATEFULSETS:
        body = _statefulset()
        body["metadata"]["name"] = name
    if ok:
        kube_api.create(resource, body)
        assert kube_api.get(resource, "mail", name) is not None
    else:
        assert _status(lambda: kube_api.create(resource, body)) == 422
        assert kube_api.get(resource, "mail", name) is None


def test_namespace_names_are_dns_labels(kube_api: KubeApi) -> None:
    assert _status(lambda: kube_api.create(k.NAMESPACES, namespace_body("a.b"))) == 422
    kube_api.create(k.NAMESPACES, namespace_body("a-b"))


@pytest.mark.parametrize("labels", [
    {"mailplane.io/credential": "c" * 64},   # a value over 63 characters
    {"x": "a b"},
    {"x": "-a"},
    {"bad key!": "v"},
    {"a" * 254 + "/x": "v"},
])
def test_label_keys_and_values_are_validated(kube_api: KubeApi,
                                             labels: dict[str, str]) -> None:
    assert _status(lambda: kube_api.create(k.SECRETS, _secret("s", labels=labels))) == 422
    kube_api.create(k.SECRETS, _secret("s"))
    assert _status(lambda: kube_api.patch(k.SECRETS, "mail", "s",
                                          {"metadata": {"labels": labels}})) == 422
    # In a pod template too.
    sts = _statefulset()
    sts["spec"]["template"]["metadata"]["labels"].update(labels)
    assert _status(lambda: kube_api.create(k.STATEFULSETS, sts)) == 422


def test_statefulset_selector_must_match_the_template(kube_api: KubeApi) -> None:
    sts = _statefulset()
    sts["spec"]["selector"] = {"matchLabels": {"app.kubernetes.io/instance": "other"}}
    assert _status(lambda: kube_api.create(k.STATEFULSETS, sts)) == 422


def test_immutable_secret(kube_api: KubeApi) -> None:
    body = _secret("s")
    body.update(immutable=True, data={"a": "eA=="})
    kube_api.create(k.SECRETS, body)
    assert _status(lambda: kube_api.patch(k.SECRETS, "mail", "s",
                                          {"data": {"a": "eQ=="}})) == 422
    kube_api.patch(k.SECRETS, "mail", "s", {"metadata": {"labels": {"a": "b"}}})


def test_label_selectors_filter_lists_and_watches(kube_api: KubeApi) -> None:
    kube_api.create(k.SECRETS, _secret("a", labels={"app": "x", "tier": "1"}))
    kube_api.create(k.SECRETS, _secret("b", labels={"app": "y"}))
    kube_api.create(k.SECRETS, _secret("c"))

    def names(selector: str) -> list[str]:
        query = urllib.parse.urlencode({"labelSelector": selector})
        items = kube_api.request("GET", f"/api/v1/namespaces/mail/secrets?{query}")["items"]
        return sorted(i["metadata"]["name"] for i in items)

    assert names("app=x") == ["a"]
    assert names("app!=x") == ["b", "c"]
    assert names("app in (x,y)") == ["a", "b"]
    assert names("app notin (x)") == ["b", "c"]
    assert names("app") == ["a", "b"]
    assert names("!app") == ["c"]
    assert names("app=x,tier=1") == ["a"]
    assert names("app=x,tier=2") == []

    # A watch with a selector sees only the matching objects; one that stops matching is
    # DELETED for it, as the API server's watch cache reports.
    events: list[tuple[str, str]] = []
    started = threading.Event()

    def watch() -> None:
        query = urllib.parse.urlencode({"labelSelector": "app=x", "watch": "true",
                                        "timeoutSeconds": "3"})
        with urllib.request.urlopen(
                f"{kube_api.url}/api/v1/namespaces/mail/secrets?{query}", timeout=5) as resp:
            started.set()
            for line in resp:
                if line.strip():
                    event = json.loads(line)
                    events.append((event["type"], event["object"]["metadata"]["name"]))
                    if len(events) == 3:
                        return

    thread = threading.Thread(target=watch)
    thread.start()
    assert started.wait(5)
    kube_api.patch(k.SECRETS, "mail", "b", {"metadata": {"labels": {"tier": "2"}}})
    kube_api.patch(k.SECRETS, "mail", "c", {"metadata": {"labels": {"app": "x"}}})
    kube_api.patch(k.SECRETS, "mail", "a", {"metadata": {"labels": {"app": "z"}}})
    thread.join(6)
    assert events == [("ADDED", "a"), ("ADDED", "c"), ("DELETED", "a")]


def test_garbage_collection_deletes_or_orphans_dependents(kube_api: KubeApi) -> None:
    owner = kube_api.create(k.STATEFULSETS, _statefulset("one"))
    ref = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "one",
           "uid": owner["metadata"]["uid"], "controller": True}
    kube_api.create(k.SECRETS, _secret("dep-1", ownerReferences=[ref]))
    kube_api.delete(k.STATEFULSETS, "mail", "one")
    assert kube_api.get(k.SECRETS, "mail", "dep-1") is None

    owner = kube_api.create(k.STATEFULSETS, _statefulset("two"))
    ref = {**ref, "name": "two", "uid": owner["metadata"]["uid"]}
    kube_api.create(k.SECRETS, _secret("dep-2", ownerReferences=[ref]))
    kube_api.request("DELETE", k.STATEFULSETS.path("mail", "two"),
                     {"kind": "DeleteOptions", "apiVersion": "v1",
                      "propagationPolicy": "Orphan"})
    assert kube_api.get(k.STATEFULSETS, "mail", "two") is None
    kept = kube_api.get(k.SECRETS, "mail", "dep-2")
    assert kept is not None and not kept["metadata"].get("ownerReferences")
