"""What counts as "already applied": quantities the API server rewrites compare by value."""

from __future__ import annotations

from mailplane_operator.kube import _contains


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
