"""How the operator writes children on an API server with real rules: fields removed from the
spec disappear from the children, drift is corrected, an immutable StatefulSet field is changed
by replacing the StatefulSet (its pods and volumes stay), a refused write is visible (Event,
Reconciled condition, metrics) and never holds up a credential's deletion."""

from __future__ import annotations

from typing import Any

from mailplane_operator import kube as k
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
    serve_service_monitors,
)

SELECTOR = {"app.kubernetes.io/name": "mailplane-relay", "app.kubernetes.io/instance": "main"}
PODS = k.Resource("", "v1", "pods", "Pod")


def _condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for cond in ((obj or {}).get("status") or {}).get("conditions") or []:
        if cond["type"] == type_:
            return dict(cond)
    return {}


def _reasons(api: KubeApi, namespace: str, name: str) -> list[str]:
    return [e["reason"] for e in api.events(namespace)
            if e["involvedObject"]["name"] == name]


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


def test_a_spool_size_change_replaces_the_statefulset_and_keeps_pods_and_volumes(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(spool={"size": "1Gi"}))
    old = kube_api.wait_for(k.STATEFULSETS, "mail", "main")
    # What the StatefulSet controller would have made: a pod it controls, and its spool volume
    # (volumes from volumeClaimTemplates carry the selector labels and no owner).
    owner = {"apiVersion": "apps/v1", "kind": "StatefulSet", "name": "main",
             "uid": old["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
    kube_api.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": "main-0", "namespace": "mail", "labels": SELECTOR,
        "ownerReferences": [owner]}, "spec": {"containers": [{"name": "relay",
                                                               "image": "x"}]}})
    kube_api.create(k.PVCS, {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {
        "name": "spool-main-0", "namespace": "mail", "labels": SELECTOR}, "spec": {
        "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}})

    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"spool": {"size": "2Gi"}}})

    def claim_size(sts: dict[str, Any] | None) -> Any:
        if not sts:
            return None
        claim = sts["spec"]["volumeClaimTemplates"][0]
        return claim["spec"]["resources"]["requests"]["storage"]

    new = kube_api.wait_for(k.STATEFULSETS, "mail", "main", lambda o: claim_size(o) == "2Gi")
    assert new["metadata"]["uid"] != old["metadata"]["uid"]
    # The pod was orphaned, not deleted (the new StatefulSet adopts it), and its volume grew.
    pod = kube_api.get(PODS, "mail", "main-0")
    assert pod is not None and not pod["metadata"].get("ownerReferences")
    kube_api.wait_for(k.PVCS, "mail", "spool-main-0",
                      lambda o: o and o["spec"]["resources"]["requests"]["storage"] == "2Gi")
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and _condition(o, "Reconciled").get("status") == "True"
                              and o["status"].get("observedGeneration")
                              == o["metadata"]["generation"])
    assert _condition(relay, "Reconciled")["observedGeneration"] == 2
    reasons = _reasons(kube_api, "mail", "main")
    assert "StatefulSetReplaced" in reasons and "ChildWriteFailed" not in reasons


def test_a_refused_child_write_is_visible_and_never_holds_up_a_credential_deletion(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential in the relay config")
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: _condition(o, "Reconciled").get("status") == "True")

    # From now on every write of the StatefulSet is refused (as a policy webhook would), and
    # the relay's spec asks for a change of it.
    kube_api.emulator.refuse("statefulsets", "main")
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"image": "relay:2"}})
    relay = kube_api.wait_for(
        k.SMTP_RELAYS, "mail", "main",
        lambda o: _condition(o, "Reconciled").get("reason") == "ChildWriteFailed"
        and _condition(o, "Reconciled")["observedGeneration"] == 2)
    reconciled = _condition(relay, "Reconciled")
    assert reconciled["status"] == "False"
    assert "StatefulSet main: 400 BadRequest: admission webhook" in reconciled["message"]
    assert relay["status"]["observedGeneration"] == 1  # generation 2 is not reconciled
    kube_api.wait_until(lambda: "ChildWriteFailed" in _reasons(kube_api, "mail", "main"),
                        what="the ChildWriteFailed Event")
    operator_running_metrics = operator_running.metrics_text()
    assert 'mailplane_operator_child_write_failures_total{kind="StatefulSet"}' in (
        operator_running_metrics)
    assert _metric(operator_running, "mailplane_operator_child_write_failures_total",
                   'kind="StatefulSet"') >= 1
    kube_api.wait_until(lambda: _metric(operator_running, "mailplane_operator_stale_generation_"
                                        "seconds", 'kind="SmtpRelay"') > 0,
                        what="the stale generation gauge", poll=0.1)

    # The credential's deletion waits for the configuration only, not for the StatefulSet.
    kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None, timeout=10)
    assert "shop.orders" not in rendered_credentials(kube_api)

    # Once the write is allowed again, the relay converges and says so.
    kube_api.emulator.allow("statefulsets", "main")
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: _condition(o, "Reconciled").get("status") == "True"
                      and o["status"]["observedGeneration"] == 2, timeout=15)
    kube_api.wait_until(lambda: _metric(operator_running, "mailplane_operator_stale_generation_"
                                        "seconds", 'kind="SmtpRelay"') == 0,
                        what="the stale generation gauge back to 0", poll=0.1)


def test_a_held_finalizer_is_measured(kube_api: KubeApi,
                                      operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential in the relay config")
    # The configuration itself cannot be written: the deletion must wait (the relay would
    # still accept the password), and the wait shows.
    # (A webhook that quotes what it refused: a Secret's refusal is never echoed to an Event.)
    kube_api.emulator.refuse("secrets", "main-config-",
                             message="denied: the Secret holds hunter2hunter2")
    kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
    kube_api.wait_until(lambda: _metric(operator_running, "mailplane_operator_finalizer_pending_"
                                        "seconds", 'kind="SmtpCredential"') > 0.5,
                        what="the finalizer gauge", poll=0.2)
    assert kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders") is not None
    kube_api.wait_until(lambda: "ChildWriteFailed" in _reasons(kube_api, "mail", "main"),
                        what="the ChildWriteFailed Event")
    assert "hunter2" not in str(kube_api.events()) + str(
        kube_api.get(k.SMTP_RELAYS, "mail", "main"))
    kube_api.emulator.allow("secrets", "main-config-")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None, timeout=15)
    kube_api.wait_until(lambda: _metric(operator_running, "mailplane_operator_finalizer_pending_"
                                        "seconds", 'kind="SmtpCredential"') == 0,
                        what="the finalizer gauge back to 0", poll=0.1)


def _metric(operator: RunningOperator, name: str, labels: str) -> float:
    for line in operator.metrics_text().splitlines():
        if line.startswith(f"{name}{{{labels}}} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{{{labels}}} not exported")


def test_the_statefulset_watch_is_namespaced_and_label_filtered(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.wait_for(k.STATEFULSETS, "mail", "main")
    worker = operator_running.runtime[0].workers[("mail", "main")]
    kube_api.wait_until(lambda: any(
        m == "GET" and q.get("watch") == "true" and "statefulsets" in p
        for _a, m, p, q in kube_api.emulator.audit), what="the StatefulSet watch")

    watches = [(p, q) for agent, m, p, q in kube_api.emulator.audit
               if m == "GET" and q.get("watch") == "true" and p.endswith("/statefulsets")
               and not agent.startswith("Python-urllib")]
    assert watches
    for path, query in watches:
        assert path == "/apis/apps/v1/namespaces/mail/statefulsets"
        assert set(query["labelSelector"].split(",")) == {
            "app.kubernetes.io/instance=main", "app.kubernetes.io/managed-by=mailplane-operator"}

    # Someone else's StatefulSet in the same namespace is not selected (the watch above never
    # sees it); the relay's own StatefulSet is.
    requested = worker.requested
    other = {"apiVersion": "apps/v1", "kind": "StatefulSet",
             "metadata": {"name": "db", "namespace": "mail", "labels": {"app": "db"}},
             "spec": {"replicas": 1, "serviceName": "db", "selector": {"matchLabels": {
                 "app": "db"}}, "template": {"metadata": {"labels": {"app": "db"}}, "spec": {
                     "containers": [{"name": "db", "image": "db"}]}}}}
    kube_api.create(k.STATEFULSETS, other)
    kube_api.patch(k.STATEFULSETS, "mail", "db", {"spec": {"replicas": 2}})
    # Its own StatefulSet does: the status follows the pods.
    kube_api.patch(k.STATEFULSETS, "mail", "main", {"status": {"replicas": 1,
                                                               "readyReplicas": 1}},
                   status=True)
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: o and (o.get("status") or {}).get("readyReplicas") == 1)
    assert worker.requested > requested


def test_servicemonitors_appear_when_the_crd_is_installed_later(
        kube_api: KubeApi, operator_factory: Any) -> None:
    operator_factory(discovery_ttl=0.2, relay_resync_interval=0.5)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body())
    kube_api.wait_for(k.STATEFULSETS, "mail", "main")
    assert kube_api.get(k.SERVICE_MONITORS, "mail", "main") is None
    serve_service_monitors(kube_api.emulator)  # the Prometheus operator is installed
    kube_api.wait_until(lambda: kube_api.get(k.SERVICE_MONITORS, "mail", "main"),
                        what="the ServiceMonitor", poll=0.2, timeout=10)


def test_autoscaling_writes_an_hpa_on_the_smtprelay_and_removes_it_when_turned_off(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(autoscaling={
        "enabled": True, "minReplicas": 1, "maxReplicas": 3}))
    hpa = kube_api.wait_for(k.HPAS, "mail", "main")
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "mailplane.io/v1alpha1",
                                             "kind": "SmtpRelay", "name": "main"}
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and (o.get("status") or {}).get("selector"))
    assert relay["status"]["selector"] == (
        "app.kubernetes.io/instance=main,app.kubernetes.io/name=mailplane-relay")
    # What the HPA does through the scale subresource: spec.replicas, carried to the pods.
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"replicas": 3}})
    kube_api.wait_for(k.STATEFULSETS, "mail", "main", lambda o: o and o["spec"]["replicas"] == 3)

    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"autoscaling": {"enabled": False}}})
    kube_api.wait_for(k.HPAS, "mail", "main", lambda o: o is None)
