"""End to end: scaling a relay pool 3 -> 1 hands the removed pods' queues to the pod that stays.

The operator runs against the Kubernetes emulator; three real `mailplane relay` processes stand
in for the StatefulSet's pods (each with the configuration the operator rendered, projected as a
Secret volume would be, and a Pod object carrying its IP and ops port). The upstream defers every
message, so mail stays queued on all three. With one removed pod not answering, the StatefulSet
keeps its three replicas and the relay says what it waits for; once that pod is back, both
removed pods hand their queues to pod 0, and only then does the StatefulSet shrink and the
removed pods' volumes go. When the upstream recovers, every message arrives, once.
"""

from __future__ import annotations

import contextlib
import email
import json
import smtplib
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailplane_operator import kube as k
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)
from tests.helpers.pki import client_context
from tests.helpers.sink import Sink, running_sink_in_thread
from tests.operator.test_e2e import Relay, SecretVolume, create_tls_secret

# For waits on relay processes and the operator's drain steps: a loaded 2-core machine runs
# several of these at once, so generous (a wait ends as soon as its condition holds).
SLOW = 120.0
SELECTOR = {"app.kubernetes.io/name": "mailplane-relay", "app.kubernetes.io/instance": "main"}


def _pod(ordinal: int, volume: SecretVolume) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"main-{ordinal}", "namespace": "mail", "labels": SELECTOR},
            "spec": {"containers": [{"name": "relay", "image": "mailplane", "ports": [
                {"name": "http", "containerPort": volume.http_port},
                {"name": "admin", "containerPort": volume.admin_port}]}]},
            "status": {"podIP": "127.0.0.1",
                       "conditions": [{"type": "Ready", "status": "True"}]}}


def _pvc(ordinal: int) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
            "metadata": {"name": f"spool-main-{ordinal}", "namespace": "mail",
                         "labels": SELECTOR},
            "spec": {"accessModes": ["ReadWriteOnce"],
                     "resources": {"requests": {"storage": "1Gi"}}}}


def _send(volume: SecretVolume, ca: trustme.CA, user: str, password: str,
          ids: list[str]) -> None:
    with smtplib.SMTP("127.0.0.1", volume.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.login(user, password)
        for mid in ids:
            msg = EmailMessage()
            msg["From"] = "orders@example.com"
            msg["To"] = "customer@example.net"
            msg["Subject"] = "your order"
            msg["Message-ID"] = mid
            msg.set_content("queued while the upstream defers\n")
            smtp.send_message(msg)


def _spooled(volume: SecretVolume) -> int:
    return len(list((volume.state / "spool").rglob("*.msg")))


def _draining(api: KubeApi) -> str | None:
    relay = api.get(k.SMTP_RELAYS, "mail", "main") or {}
    for cond in (relay.get("status") or {}).get("conditions") or []:
        if cond["type"] == "Draining":
            return str(cond["message"])
    return None


@contextlib.contextmanager
def _pods(volumes: list[SecretVolume], logs: Path) -> Iterator[dict[int, Relay]]:
    relays: dict[int, Relay] = {}
    try:
        for i, volume in enumerate(volumes):
            relays[i] = Relay.start(volume, logs / f"relay{i}.log")
        yield relays
    finally:
        for relay in relays.values():
            if relay.proc.poll() is None:
                relay.stop()


@pytest.mark.slow
def test_scaling_3_to_1_hands_every_queued_message_to_the_remaining_pod(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, tmp_path: Path) -> None:
    with running_sink_in_thread(data_reply="451 4.3.0 upstream busy") as sink:
        _run(kube_api, operator_factory, tls_ca, tmp_path, sink)


def _run(kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
         tls_ca: trustme.CA, tmp_path: Path, sink: Sink) -> None:
    operator_factory(drain_poll=0.3)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    create_tls_secret(kube_api, tls_ca)
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(
        replicas=3,
        delivery={"mode": "smarthost",
                  "smarthost": {"host": "127.0.0.1", "port": sink.address[1], "tls": "none"}},
        queue={"retryInitial": "1s", "retryMax": "2s"}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("orders", ["orders@example.com"]))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential rendered")
    kube_api.wait_for(k.STATEFULSETS, "mail", "main", lambda o: o and o["spec"]["replicas"] == 3)
    app = kube_api.secret_data("shop", "orders-smtp")

    volumes = []
    for i in range(3):
        volume = SecretVolume(kube_api, tmp_path / f"pod{i}", tls_ca)
        volume.sync()
        volumes.append(volume)
    with _pods(volumes, tmp_path) as relays:
        for i in range(3):
            pod = _pod(i, volumes[i])
            kube_api.create(k.PODS, pod)
            kube_api.patch(k.PODS, "mail", f"main-{i}", {"status": pod["status"]}, status=True)
            kube_api.create(k.PVCS, _pvc(i))
        ids = {i: [f"<o{i}-{n}@example.com>" for n in range(4 if i else 2)] for i in range(3)}
        for i in range(3):
            _send(volumes[i], tls_ca, app["username"], app["password"], ids[i])
        assert [_spooled(v) for v in volumes] == [2, 4, 4]

        # Pod 2 stops answering (a crash): nothing shrinks while its volume holds mail.
        relays[2].stop()
        kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"replicas": 1}})
        message = kube_api.wait_until(lambda: (m := _draining(kube_api)) and "main-2" in m
                                      and "main-1" not in m and m, what="pod 1 drained",
                                      timeout=SLOW)
        assert "not answering" in message
        assert _spooled(volumes[1]) == 0 and _spooled(volumes[0]) == 6
        sts = kube_api.get(k.STATEFULSETS, "mail", "main")
        assert sts is not None and sts["spec"]["replicas"] == 3
        assert kube_api.get(k.PVCS, "mail", "spool-main-1") is not None

        # The StatefulSet restarts pod 2 (same volume): its queue follows, then the pool shrinks.
        # It had died while draining (its kept drain order, peers only, on its volume): it
        # comes back drained, waiting for the order again, which the operator sends.
        order = volumes[2].state / "spool" / "drain-order.json"
        order.write_text(json.dumps(
            {"peers": [f"https://127.0.0.1:{volumes[0].admin_port}"], "since": 0}))
        relays[2] = Relay(volumes[2], tmp_path / "relay2-again.log")
        relays[2].wait(lambda: "listening:" in (tmp_path / "relay2-again.log").read_text(),
                       "listening")
        assert relays[2]._get("/readyz")[0] == 503
        kube_api.patch(k.PODS, "mail", "main-2", {"spec": {"containers": [
            {"name": "relay", "image": "mailplane", "ports": [
                {"name": "http", "containerPort": volumes[2].http_port},
                {"name": "admin", "containerPort": volumes[2].admin_port}]}]}})
        kube_api.wait_for(k.STATEFULSETS, "mail", "main",
                          lambda o: o and o["spec"]["replicas"] == 1, timeout=SLOW)
        assert [_spooled(v) for v in volumes] == [10, 0, 0]
        for i in (1, 2):  # deleted right after the StatefulSet shrank
            kube_api.wait_for(k.PVCS, "mail", f"spool-main-{i}", lambda o: o is None,
                              timeout=SLOW)
        assert kube_api.get(k.PVCS, "mail", "spool-main-0") is not None
        kube_api.wait_until(lambda: _draining(kube_api) is None, what="Draining cleared",
                            timeout=SLOW)
        reasons = [e["reason"] for e in kube_api.events("mail")]
        assert "ScaledDown" in reasons

        # The StatefulSet controller removes pods 1 and 2; the upstream recovers.
        for i in (1, 2):
            assert relays[i].stop() == 0
            kube_api.delete(k.PODS, "mail", f"main-{i}")
        sink.behaviour.data_reply = None
        # The sink records a message before the relay reads its 250 and removes its copy:
        # done when the spool is empty, not when the sink has ten.
        relays[0].wait(lambda: len(sink.messages) >= 10 and _spooled(volumes[0]) == 0,
                       "every message delivered and removed", timeout=SLOW)
        got = sorted(str(email.message_from_bytes(m.data)["Message-ID"]) for m in sink.messages)
        assert got == sorted(mid for group in ids.values() for mid in group)
