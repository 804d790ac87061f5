"""How the operator writes children on an API server with real rules: fields removed from the
spec disappear from the children, drift is corrected."""

from __future__ import annotations

from typing import Any

from mailplane_operator import kube as k
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    namespace_body,
    relay_body,
    serve_service_monitors,
)


def _container(sts: dict[str, Any] | None) -> dict[str, Any]:
    assert sts is not None
    containers: list[dict[str, Any]] = sts["spec"]["template"]["spec"]["containers"]
    return containers[0]


def test_a_field_removed_from_the_spec_leaves_the_statefulset(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(resources={"limits": {"memory": "512Mi"}}))
    kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                      lambda o: o and _container(o).get("resources") == {
                          "limits": {"memory": "512Mi"}})

    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"resources": None}})
    kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                      lambda o: o and "resources" not in _container(o))


def test_a_label_removed_from_the_spec_leaves_the_service_monitor(
        kube_api: KubeApi, operator_factory: Any) -> None:
    serve_service_monitors(kube_api.emulator)
    operator_factory()
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(monitoring={"serviceMonitor": {
        "labels": {"release": "prom", "team": "mail"}}}))
    kube_api.wait_for(k.SERVICE_MONITORS, "mail", "main",
                      lambda o: o and o["metadata"]["labels"].get("team") == "mail")

    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"monitoring": {"serviceMonitor": {
        "labels": {"team": None}}}}})
    sm = kube_api.wait_for(k.SERVICE_MONITORS, "mail", "main",
                           lambda o: o and "team" not in o["metadata"]["labels"])
    assert sm["metadata"]["labels"]["release"] == "prom"


def test_drift_on_a_child_is_corrected(kube_api: KubeApi,
                                       operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(image="relay:1"))
    kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                      lambda o: o and _container(o)["image"] == "relay:1")
    kube_api.patch(k.STATEFULSETS, "mail", "main", {"spec": {"template": {"spec": {
        "containers": [{"name": "relay", "image": "somebody-else:2"}]}}}})
    # The StatefulSet's own event pokes the relay's worker, which writes it back.
    kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                      lambda o: o and _container(o)["image"] == "relay:1"
                      and "securityContext" in _container(o))
