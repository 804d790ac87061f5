"""The real operator against the Kubernetes emulator: a relay pool, its children and config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import yaml

from mailplane_operator import kube as k
from mailplane_relay.config import parse_documents, verify_password
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_config,
    rendered_credentials,
    retention_body,
    serve_service_monitors,
)


def _setup(api: KubeApi) -> None:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    api.create(k.SMTP_RELAYS, relay_body())
    api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))


def test_relay_renders_children_config_and_status(kube_api: KubeApi,
                                                  operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))

    creds = kube_api.wait_until(lambda: rendered_credentials(kube_api).get("shop.orders"),
                                what="the credential in the relay config")
    app = kube_api.secret_data("shop", "orders-smtp")
    assert verify_password(app["password"], creds["passwordHash"])
    assert app["username"] == "shop.orders"
    assert app["host"] == "main.mail.svc.cluster.local"
    assert app["port"] == "587"

    # The config the relay would read is valid and signs for the attached domain.
    config = parse_documents(sorted(rendered_config(kube_api).items()))
    assert "example.com" in config.domains
    assert config.credentials["shop.orders"].may_send_as("orders@example.com")

    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and o.get("status", {}).get("credentialCount") == 1)
    uid = relay["metadata"]["uid"]
    status = relay["status"]
    assert status["configHash"]
    assert status["domains"] == ["example.com"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and ready["reason"] == "ReplicasNotReady"

    # Every child is owned by the relay, so that deleting it deletes them (GC is the cluster's).
    for resource, name in ((k.STATEFULSETS, "main"), (k.SERVICES, "main"),
                           (k.SERVICES, "main-headless"), (k.SERVICES, "main-metrics"),
                           (k.PDBS, "main"), (k.NETWORK_POLICIES, "main"),
                           (k.SECRETS, "main-config-0")):
        child = kube_api.get(resource, "mail", name)
        assert child is not None, (resource.plural, name)
        owners = child["metadata"]["ownerReferences"]
        assert [(o["kind"], o["uid"], o["controller"]) for o in owners] == [
            ("SmtpRelay", uid, True)]
    app_secret = kube_api.get(k.SECRETS, "shop", "orders-smtp")
    assert app_secret is not None
    assert app_secret["metadata"]["ownerReferences"][0]["kind"] == "SmtpCredential"

    # The pod template does not carry the config hash: credential changes never restart pods.
    sts = kube_api.get(k.STATEFULSETS, "mail", "main")
    assert sts is not None
    assert status["configHash"] not in yaml.safe_dump(sts["spec"]["template"])


def test_retention_policy_reaches_the_relays_it_selects(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body("main", labels={"tier": "production"}))
    kube_api.create(k.SMTP_RELAYS, relay_body("other"))
    kube_api.create(k.RETENTION_POLICIES, retention_body(
        "production", message_log="720h", selector={"tier": "production"}))

    def retention(relay: str) -> float | None:
        files = rendered_config(kube_api, relay)
        if not files:
            return None
        return parse_documents(sorted(files.items())).settings.retention.message_log

    kube_api.wait_until(lambda: retention("main") == 720 * 3600, what="the policy rendered")
    kube_api.wait_until(lambda: retention("other") == 90 * 86400, what="the default (90 days)")
    policy = kube_api.wait_for(k.RETENTION_POLICIES, "mail", "production",
                               lambda o: o and o.get("status", {}).get("relays") == ["main"])
    assert policy["status"]["conditions"][0]["status"] == "True"
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: o and o.get("status", {}).get(
        "retentionPolicies") == ["mail/production"])

    kube_api.delete(k.RETENTION_POLICIES, "mail", "production")
    kube_api.wait_until(lambda: retention("main") == 90 * 86400, what="back to the default")


def test_nothing_is_written_when_nothing_changed(kube_api: KubeApi,
                                                 operator_factory: Callable[..., Any]) -> None:
    operator = operator_factory(relay_resync_interval=0.3)
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api), what="render")
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: o and o.get("status", {}).get("credentialCount") == 1)
    # The credential can be reconciled before its domain is attached (Ready=False, fixed at its
    # next timer tick): wait for Ready=True, so that late fix-up is not counted as churn.
    kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o and any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in o.get("status", {}).get("conditions", [])), timeout=30)

    def renders() -> int:
        return int(operator.runtime[0].workers[("mail", "main")].renders)

    def quiet_after(count: int) -> bool:
        return renders() >= count

    # Let in-flight writes (Events, kopf's annotations) land, then count over two full resyncs.
    settled = renders() + 2
    kube_api.wait_until(lambda: quiet_after(settled), poll=0.05, what="two resyncs")
    before = kube_api.emulator.writes
    target = renders() + 2
    kube_api.wait_until(lambda: quiet_after(target), poll=0.05, what="two more resyncs")
    assert kube_api.emulator.writes == before


def test_deleting_the_relay_leaves_its_credentials_waiting(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api), what="render")

    kube_api.delete(k.SMTP_RELAYS, "mail", "main")
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: o is None)
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o and next(
        c for c in o["status"]["conditions"] if c["type"] == "Ready")["reason"] == "RelayNotFound")
    assert cred["status"]["conditions"][0]["status"] == "False"


def test_ready_follows_the_statefulset_and_bad_specs_say_where(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    kube_api.wait_for(k.STATEFULSETS, "mail", "main")
    # The kubelet's side, played by the test: one of one replicas becomes ready.
    kube_api.patch(k.STATEFULSETS, "mail", "main",
                   {"status": {"replicas": 1, "readyReplicas": 1}}, status=True)
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: o and any(
        c["type"] == "Ready" and c["status"] == "True"
        for c in o.get("status", {}).get("conditions", [])))
    assert relay["status"]["readyReplicas"] == 1

    # A spec change reaches the children (and flips Ready back until the new replicas are up).
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"replicas": 3}})
    kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                      lambda o: o and o["spec"]["replicas"] == 3)
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: o and any(
        c["type"] == "Ready" and c["reason"] == "ReplicasNotReady"
        for c in o.get("status", {}).get("conditions", [])))
    assert relay["status"]["observedGeneration"] == 2

    # The emulator does not validate against the CRD schema, as an old CRD would not: the
    # operator's own models reject the spec and say which field is wrong.
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "broken", ["not an address"], rotation={"interval": "2h", "overlap": "3h"}))
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "broken",
                             lambda o: o and o.get("status", {}).get("conditions"))
    ready = cred["status"]["conditions"][0]
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "allowedSenders" in ready["message"] and "overlap" in ready["message"]
    assert "shop.broken" not in rendered_credentials(kube_api)


def test_watching_listed_namespaces_only(kube_api: KubeApi,
                                        operator_factory: Callable[..., Any]) -> None:
    operator_factory(namespaces=("mail", "shop"))
    kube_api.create(k.NAMESPACES, namespace_body("elsewhere",
                                                 **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("ignored", ["example.com"],
                                                        namespace="elsewhere"))
    _setup(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api), what="render")
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: o and o.get("status", {}).get("credentialCount") == 1)
    ignored = kube_api.get(k.SMTP_CREDENTIALS, "elsewhere", "ignored")
    assert ignored is not None and "status" not in ignored
    assert kube_api.get(k.SECRETS, "elsewhere", "ignored-smtp") is None
    watched = {path for agent, _m, path, query in kube_api.emulator.audit
               if agent.startswith("kopf") and query.get("watch") == "true"}
    assert "/apis/mailplane.io/v1alpha1/namespaces/shop/smtpcredentials" in watched
    assert not any(p.startswith("/apis/mailplane.io/v1alpha1/smtp") for p in watched)


def test_an_invalid_spec_says_so_and_keeps_the_rest_of_the_status(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _setup(kube_api)
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: o and o.get("status", {}).get("configHash"))
    config_hash = relay["status"]["configHash"]
    # The emulator does not validate against the CRD (an old CRD would not either).
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"shutdownGrace": "nonsense"}})

    def invalid(o: Any) -> bool:
        return bool(o) and any(c["reason"] == "InvalidSpec"
                               for c in o.get("status", {}).get("conditions", []))

    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", invalid)
    assert relay["status"]["configHash"] == config_hash  # not wiped by the condition update
    ready = next(c for c in relay["status"]["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "False" and "shutdownGrace" in ready["message"]


def test_children_the_spec_turns_off_are_deleted_but_never_a_foreign_one(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator]) -> None:
    serve_service_monitors(kube_api.emulator)
    operator_factory()
    _setup(kube_api)
    kube_api.wait_for(k.NETWORK_POLICIES, "mail", "main")
    kube_api.wait_for(k.SERVICE_MONITORS, "mail", "main")
    # The platform fences the relay itself: the operator's policy goes.
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {
        "networkPolicy": {"enabled": False},
        "monitoring": {"serviceMonitor": {"enabled": False}}}})
    kube_api.wait_for(k.NETWORK_POLICIES, "mail", "main", lambda o: o is None)
    kube_api.wait_for(k.SERVICE_MONITORS, "mail", "main", lambda o: o is None)

    # A NetworkPolicy of the same name that the relay does not own is the platform's own:
    # left alone, whatever the relay's spec says.
    kube_api.create(k.NETWORK_POLICIES, {
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": "main", "namespace": "mail"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}})
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"replicas": 3}})
    kube_api.wait_for(k.STATEFULSETS, "mail", "main", lambda o: o and o["spec"]["replicas"] == 3)
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: o and o.get(
        "status", {}).get("observedGeneration") == 3)
    assert kube_api.get(k.NETWORK_POLICIES, "mail", "main") is not None


def test_relay_pods_get_the_operators_defaults_unless_their_spec_says_otherwise(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator]) -> None:
    from mailplane_operator.reconcile.models import parse_relay_defaults

    operator_factory(relay_defaults=parse_relay_defaults(
        '{"pod": {"imagePullSecrets": [{"name": "mirror"}], "priorityClassName": "mail"},'
        ' "service": {"type": "LoadBalancer"}}'))
    _setup(kube_api)
    kube_api.create(k.SMTP_RELAYS, relay_body("eu", pod={"imagePullSecrets": [{"name": "eu"}]},
                                              service={"type": "ClusterIP"}))
    main = kube_api.wait_for(k.STATEFULSETS, "mail", "main")["spec"]["template"]["spec"]
    assert main["imagePullSecrets"] == [{"name": "mirror"}]
    assert main["priorityClassName"] == "mail"
    assert kube_api.wait_for(k.SERVICES, "mail", "main")["spec"]["type"] == "LoadBalancer"
    eu = kube_api.wait_for(k.STATEFULSETS, "mail", "eu")["spec"]["template"]["spec"]
    assert eu["imagePullSecrets"] == [{"name": "eu"}]
    assert eu["priorityClassName"] == "mail"
    assert kube_api.wait_for(k.SERVICES, "mail", "eu")["spec"]["type"] == "ClusterIP"


def test_the_intake_gets_its_service_status_records_and_goes_when_removed(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    kube_api.create(k.SMTP_RELAYS, relay_body(intake={
        "domain": "bounces.example.com", "keySecretRef": {"name": "main-intake-key"},
        "service": {"type": "LoadBalancer"}}, hostname="mx.example.com"))
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                              lambda o: bool(o and o.get("status", {}).get("intake")))
    records = relay["status"]["intake"]["dnsRecords"]
    assert [(r["type"], r["name"], r["value"]) for r in records] == [
        ("MX", "bounces.example.com", "10 mx.example.com."),
        ("TXT", "bounces.example.com", "v=spf1 a:mx.example.com ~all")]
    svc = kube_api.get(k.SERVICES, "mail", "main-intake")
    assert svc is not None and svc["spec"]["ports"][0]["port"] == 25
    config = parse_documents(sorted(rendered_config(kube_api).items()))
    assert config.settings.intake is not None
    assert config.settings.intake.key_file == "/etc/mailplane/intake/key"

    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"intake": None}})
    kube_api.wait_for(k.SERVICES, "mail", "main-intake", lambda o: o is None)
    kube_api.wait_for(k.SMTP_RELAYS, "mail", "main",
                      lambda o: bool(o) and "intake" not in o.get("status", {}))
    assert parse_documents(sorted(rendered_config(kube_api).items())).settings.intake is None
