"""What counts as "already applied" (quantities the API server rewrites compare by value), and
the guarded apply that never writes an object someone else controls."""

from __future__ import annotations

import asyncio
from typing import Any

import kopf
import pytest

from mailplane_operator import kube as k
from mailplane_operator.kube import _contains
from tests.helpers.kube import KubeApi


def test_quantities_compare_by_value_where_the_server_rewrites_them() -> None:
    have = {"spec": {"resources": {"requests": {"storage": "1536Mi", "cpu": "500m"},
                                   "limits": {"memory": "1Gi"}}}}
    want = {"spec": {"resources": {"requests": {"storage": "1.5Gi", "cpu": "0.5"},
                                   "limits": {"memory": "1024Mi"}}}}
    assert _contains(have, want)


def test_different_quantities_and_other_fields_still_differ() -> None:
    have = {"spec": {"resources": {"requests": {"storage": "1Gi"}}, "replicas": "1k"}}
    assert not _contains(have, {"spec": {"resources": {"requests": {"storage": "2Gi"}}}})
    assert not _contains(have, {"spec": {"resources": {"requests": {"storage": "1Gi",
                                                                     "cpu": "1"}}}})
    assert not _contains(have, {"spec": {"replicas": "1000"}})  # not a quantity field
    assert _contains({"a": {"limits": {"x": "abc"}}}, {"a": {"limits": {"x": "abc"}}})


def test_a_guarded_apply_never_writes_an_object_it_does_not_control(kube_api: KubeApi) -> None:
    kube_api.create(k.NAMESPACES, {"apiVersion": "v1", "kind": "Namespace",
                                   "metadata": {"name": "ns"}})
    kube_api.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret",
                                "metadata": {"name": "s", "namespace": "ns"},
                                "data": {"a": "YQ=="}})
    mine = {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "s", "namespace": "ns", "ownerReferences": [
                {"apiVersion": "mailplane.io/v1alpha1", "kind": "SmtpCredential",
                 "name": "c", "uid": "u-1", "controller": True}]},
            "data": {"b": "Yg=="}}

    async def attempt() -> None:
        async with k.KubeClient(k.Credentials(kopf.ConnectionInfo(server=kube_api.url))) as client:
            with pytest.raises(k.NotOwnedError):
                await client.apply(mine, owner_uid="u-1")
            other = {**mine, "metadata": {**mine["metadata"], "name": "t"}}
            assert (await client.apply(other, owner_uid="u-1"))[0] == "created"
            changed = {**other, "data": {"c": "Yw=="}}
            assert (await client.apply(changed, owner_uid="u-1"))[0] == "patched"

    asyncio.run(attempt())
    secret = kube_api.get(k.SECRETS, "ns", "s")
    assert secret is not None and secret["data"] == {"a": "YQ=="}
    assert "ownerReferences" not in secret["metadata"]


def _run(api: KubeApi, steps: Any) -> Any:
    async def go() -> Any:
        async with k.KubeClient(k.Credentials(kopf.ConnectionInfo(server=api.url))) as client:
            return await steps(client)

    return asyncio.run(go())


def _sts(**template_extra: Any) -> dict[str, Any]:
    labels = {"app.kubernetes.io/instance": "main"}
    container: dict[str, Any] = {"name": "relay", "image": "relay:1",
                                 "resources": {"limits": {"memory": "1Gi"}}}
    container.update(template_extra.pop("container", {}))
    return {"apiVersion": "apps/v1", "kind": "StatefulSet",
            "metadata": {"name": "main", "namespace": "mail", "labels": labels,
                         "annotations": {"a": "1"}},
            "spec": {"replicas": 1, "serviceName": "main-headless",
                     "selector": {"matchLabels": labels},
                     "template": {"metadata": {"labels": labels, **template_extra},
                                  "spec": {"containers": [container]}}}}


def test_apply_removes_fields_dropped_from_the_manifest(kube_api: KubeApi) -> None:
    first = _sts(annotations={"checksum": "x"})
    first["spec"]["template"]["spec"]["nodeSelector"] = {"disk": "ssd"}
    later = _sts(container={"resources": {}})
    later["metadata"]["annotations"] = {}
    later["metadata"]["labels"] = {**later["metadata"]["labels"]}

    async def steps(client: k.KubeClient) -> list[str]:
        actions = [(await client.apply(first))[0]]
        actions.append((await client.apply(first))[0])
        actions.append((await client.apply(later))[0])
        actions.append((await client.apply(later))[0])
        return actions

    assert _run(kube_api, steps) == ["created", "unchanged", "patched", "unchanged"]
    sts = kube_api.get(k.STATEFULSETS, "mail", "main")
    assert sts is not None
    template = sts["spec"]["template"]
    assert "nodeSelector" not in template["spec"]
    assert "annotations" not in template["metadata"] or not template["metadata"]["annotations"]
    assert template["spec"]["containers"][0].get("resources", {}) == {}
    assert "a" not in sts["metadata"]["annotations"]
    # The record holds field names only, never a value.
    record = sts["metadata"]["annotations"][k.ANN_APPLIED]
    assert "relay:1" not in record and "ssd" not in record


def test_apply_corrects_drift_and_keeps_fields_set_by_others(kube_api: KubeApi) -> None:
    _run(kube_api, lambda client: client.apply(_sts()))
    kube_api.patch(k.STATEFULSETS, "mail", "main", {
        "metadata": {"annotations": {"other.example/note": "kept"}},
        "spec": {"template": {"spec": {
            "containers": [{"name": "relay", "image": "evil:1"}],
            "priorityClassName": "set-by-a-webhook"}}}})
    action, sts = _run(kube_api, lambda client: client.apply(_sts()))
    assert action == "patched"
    assert sts["spec"]["template"]["spec"]["containers"][0]["image"] == "relay:1"
    assert sts["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "limits": {"memory": "1Gi"}}
    assert sts["spec"]["template"]["spec"]["priorityClassName"] == "set-by-a-webhook"
    assert sts["metadata"]["annotations"]["other.example/note"] == "kept"


def test_secret_records_keep_no_values(kube_api: KubeApi) -> None:
    secret = {"apiVersion": "v1", "kind": "Secret",
              "metadata": {"name": "s", "namespace": "mail",
                           "annotations": {"mailplane.io/password-hash": "$argon2$abc"}},
              "stringData": {"password": "hunter2hunter2"}}
    _run(kube_api, lambda client: client.apply(secret))
    stored = kube_api.get(k.SECRETS, "mail", "s")
    assert stored is not None
    record = stored["metadata"]["annotations"][k.ANN_APPLIED]
    assert "argon2" not in record and "hunter2" not in record and "aHVudGVy" not in record
    assert "mailplane.io/password-hash" in record
