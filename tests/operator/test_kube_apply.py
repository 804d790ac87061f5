"""What counts as "already applied" (quantities the API server rewrites compare by value), and
the guarded apply that never writes an object someone else controls."""

from __future__ import annotations

import asyncio

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
        async with k.KubeClient(k.Connection(server=kube_api.url)) as client:
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
