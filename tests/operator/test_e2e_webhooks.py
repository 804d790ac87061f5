"""End to end: a team's SmtpCredential webhook -> operator -> config Secret -> a real relay ->
a real HTTPS receiver on loopback that checks every signature with its own code.

The signing secret lives in the team's namespace (a labelled Secret); the operator renders it
into the relay's configuration; a real `mailplane relay` process (tests/operator/test_e2e.py's
kubelet-like volume) delivers mail to a sink and posts the events. Another team's mail through
the same relay never reaches this endpoint; a new signing secret reaches the relay through the
label-selected Secret watch, and the receiver accepts posts signed with it only.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

from mailplane_operator import kube as k
from tests.helpers.kube import (
    FakeClock,
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)
from tests.helpers.webhook import Receiver
from tests.operator.test_e2e import Relay, SecretVolume, _sink, create_tls_secret

FIRST = b"first-signing-secret-0123456789abcdef"
SECOND = b"second-signing-secret-0123456789abcdef"
LABEL = "mailplane.io/webhook-secret"


class _Loop:
    """An event loop in its own thread, for the receiver (the test itself is synchronous)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="e2e-hooks",
                                       daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def receiver(tls_ca: trustme.CA, tmp_path: Path) -> Iterator[tuple[Receiver, _Loop]]:
    loop = _Loop()
    hook = loop.run(Receiver(secrets=[FIRST]).start(tmp_path / "receiver", tls_ca))
    try:
        yield hook, loop
    finally:
        loop.run(hook.stop())
        loop.close()


class HookVolume(SecretVolume):
    """The relay's volume, with the webhook CA Secret's mount as a local file too."""

    def _localize(self, text: str) -> str:
        doc = yaml.safe_load(super()._localize(text))
        hooks = doc["spec"].get("webhooks") or {}
        if "caFile" in hooks:
            hooks["caFile"] = str(self.ca_file)
        return yaml.safe_dump(doc, sort_keys=False)


def _secret(value: bytes) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": "hook", "namespace": "shop", "labels": {LABEL: "true"}},
            "data": {"secret": base64.b64encode(value).decode()}}


def _send(relay: Relay, ca: trustme.CA, app: dict[str, str], sender: str, n: int) -> None:
    import smtplib
    from email.message import EmailMessage

    from tests.helpers.pki import client_context

    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"customer{n}@example.net"
    msg["Subject"] = f"order {n}"
    msg["Message-ID"] = f"<webhook-{n}@example.com>"
    msg.set_content("your order has shipped\n")
    with smtplib.SMTP("127.0.0.1", relay.volume.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.login(app["username"], app["password"])
        smtp.send_message(msg)


@pytest.mark.slow
def test_a_teams_webhook_gets_its_own_events_signed_with_its_own_secret(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, receiver: tuple[Receiver, _Loop], tmp_path: Path) -> None:
    hook, loop = receiver
    api = kube_api
    with _sink() as (sink, sink_loop):
        operator_factory(clock=FakeClock())
        api.create(k.NAMESPACES, namespace_body("mail"))
        for team in ("shop", "other"):
            api.create(k.NAMESPACES, namespace_body(team, **{"mailplane.io/smtp-access": "true"}))
        create_tls_secret(api, tls_ca)
        create_tls_secret(api, tls_ca, name="hook-ca")
        api.create(k.SMTP_RELAYS, relay_body(
            delivery={"mode": "smarthost",
                      "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none"}},
            queue={"retryInitial": "1s", "retryMax": "2s"},
            # The receiver is on loopback: opened to the tenants' endpoints for this test.
            webhooks={"credentialPrivateNetworks": ["127.0.0.0/8"],
                      "caSecretRef": {"name": "hook-ca"}}))
        api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
        api.create(k.SECRETS, _secret(FIRST))
        api.create(k.SMTP_CREDENTIALS, credential_body(
            "orders", ["orders@example.com"],
            webhook={"url": hook.url, "secretRef": {"name": "hook"}, "events": ["delivered"]}))
        api.create(k.SMTP_CREDENTIALS, credential_body(
            "billing", ["billing@example.com"], namespace="other"))
        api.wait_until(lambda: "webhook" in rendered_credentials(api).get("shop.orders", {})
                       and "other.billing" in rendered_credentials(api),
                       what="both credentials rendered, one with its webhook")

        volume = HookVolume(api, tmp_path / "pod", tls_ca)
        volume.sync()
        relay = Relay.start(volume, tmp_path / "relay.log")
        try:
            shop = api.secret_data("shop", "orders-smtp")
            other = api.secret_data("other", "billing-smtp")
            _send(relay, tls_ca, other, "billing@example.com", 1)
            _send(relay, tls_ca, shop, "orders@example.com", 2)
            asyncio.run_coroutine_threadsafe(sink.wait_for_messages(2, timeout=30),
                                             sink_loop).result(35)
            loop.run(hook.wait_for(lambda: len(hook.accepted) >= 1, "the first event"))
            [post] = hook.accepted
            assert post.event["type"] == "delivered"
            assert post.event["credential"] == "shop.orders"
            assert post.event["namespace"] == "shop"
            assert post.event["message"]["recipient"] == "customer2@example.net"
            assert hook.rejected == []

            # A new signing secret: the watch re-renders, the relay reloads, and the receiver
            # (which now knows only the new one) accepts the next event.
            reloads = relay.reloads()
            hook.secrets = [SECOND]
            api.patch(k.SECRETS, "shop", "hook",
                      {"data": {"secret": base64.b64encode(SECOND).decode()}})
            api.wait_until(lambda: rendered_credentials(api)["shop.orders"]["webhook"][
                "secrets"] == [SECOND.decode()], what="the new signing secret rendered")
            volume.sync()
            relay.wait(lambda: relay.reloads() > reloads, "the reload after the new secret")
            _send(relay, tls_ca, shop, "orders@example.com", 3)
            loop.run(hook.wait_for(lambda: len(hook.accepted) >= 2, "the second event"))
            assert hook.accepted[1].event["message"]["recipient"] == "customer3@example.net"
            assert hook.rejected == []
            # The other team's mail made no post here.
            assert all(p.event["namespace"] == "shop" for p in hook.attempts)
        finally:
            assert relay.stop() == 0, relay.log.read_text()[-3000:]
        log = relay.log.read_text()
        for secret in (FIRST, SECOND):
            assert secret.decode() not in log
