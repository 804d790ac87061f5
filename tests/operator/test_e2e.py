"""End to end: custom resources -> operator -> config Secrets -> a real relay -> a real sink.

The operator runs against the Kubernetes emulator. The test plays the kubelet: it projects the
relay's config Secrets into a directory the way a Secret volume is updated (files are symlinks
into a ``..data`` directory that is swapped atomically), changing only what differs on loopback
(listen addresses and ports, the TLS files from a throwaway CA, spool and message log in the
test's tmp dir). A real `mailplane relay` process serves that directory and hot-reloads it. An
application sends with the username and password from the Secret the operator wrote; mail
arrives at the capture sink, DKIM-signed with the key the operator generated (verified against
the record the domain's status lists, served by a DNS server on loopback); across a rotation
both passwords work during the overlap; a suspension by the platform is answered with 554 and its
reason; after the credential is deleted, AUTH fails.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import smtplib
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import dkim
import pytest
import trustme
import yaml

from mailplane_operator import kube as k
from tests.helpers.dns import LoopbackDNS
from tests.helpers.kube import (
    FakeClock,
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_config,
    rendered_credentials,
)
from tests.helpers.pki import client_context, write_server_pair
from tests.helpers.ports import free_port
from tests.helpers.relayproc import relay_command
from tests.helpers.sink import Sink, start_sink


@contextlib.contextmanager
def _sink() -> Iterator[tuple[Sink, asyncio.AbstractEventLoop]]:
    loop = asyncio.new_event_loop()
    started = threading.Event()
    box: dict[str, Sink] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        box["sink"] = loop.run_until_complete(start_sink())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="e2e-sink", daemon=True)
    thread.start()
    assert started.wait(10), "the sink did not start"
    try:
        yield box["sink"], loop
    finally:
        asyncio.run_coroutine_threadsafe(box["sink"].stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def create_tls_secret(api: KubeApi, ca: trustme.CA, namespace: str = "mail",
                      name: str = "main-tls") -> None:
    """The relay's TLS Secret as cert-manager writes it; the operator reads only its ca.crt
    (to verify the pods' admin port). The pods' own pairs are files (SecretVolume)."""
    api.create(k.SECRETS, {"apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
                           "metadata": {"name": name, "namespace": namespace},
                           "data": {"ca.crt": base64.b64encode(ca.cert_pem.bytes()).decode()}})


class SecretVolume:
    """The relay's config directory, kept in step with the config Secrets like a kubelet does."""

    def __init__(self, api: KubeApi, base: Path, ca: trustme.CA) -> None:
        self.api = api
        self.dir = base / "config"
        self.dir.mkdir(parents=True)
        self.state = base / "state"
        self.state.mkdir()
        # The name the admin port's clients check (the relay Service's, <relay>.<namespace>.svc).
        self.pair = write_server_pair(ca, base / "tls",
                                      names=("127.0.0.1", "localhost", "main.mail.svc"))
        self.ca_file = base / "tls" / "ca.crt"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.ports = {"submission": free_port(), "submissions": free_port()}
        self.http_port = free_port()
        self.admin_port = free_port()
        self.generation = 0

    def _localize(self, text: str) -> str:
        """The pod's paths and ports -> this machine's loopback and tmp dir."""
        doc = yaml.safe_load(text)
        spec = doc["spec"]
        for listener in spec["listeners"]:
            listener.update(address="127.0.0.1", port=self.ports[listener["name"]])
        spec["tls"].update(certFile=str(self.pair.cert_file), keyFile=str(self.pair.key_file))
        spec["http"] = {"address": "127.0.0.1", "port": self.http_port}
        if "admin" in spec:
            spec["admin"].update(address="127.0.0.1", port=self.admin_port,
                                 caFile=str(self.ca_file))
        spec["spool"] = {**spec.get("spool", {}), "directory": str(self.state / "spool")}
        spec["messageLog"] = {"path": str(self.state / "messagelog.sqlite3"),
                              "flushInterval": "50ms"}
        spec["limits"] = {**spec.get("limits", {}), "authFailureDelay": 0}
        return yaml.safe_dump(doc, sort_keys=False)

    def sync(self) -> None:
        files = rendered_config(self.api)
        assert "relay.yaml" in files, sorted(files)
        files["relay.yaml"] = self._localize(files["relay.yaml"])
        self.generation += 1
        version = self.dir / f"..v{self.generation}"
        version.mkdir()
        for name, text in files.items():
            (version / name).write_text(text)
        tmp_link = self.dir / "..data_tmp"
        os.symlink(version.name, tmp_link)
        os.replace(tmp_link, self.dir / "..data")
        for name in files:
            link = self.dir / name
            if not link.is_symlink():
                os.symlink(f"..data/{name}", link)
        for entry in self.dir.iterdir():
            if not entry.name.startswith(".") and entry.name not in files:
                entry.unlink()


class Relay:
    def __init__(self, volume: SecretVolume, log: Path) -> None:
        self.volume = volume
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [*relay_command(), "--config", str(volume.dir), "--log-level", "info"],
                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)

    def _get(self, path: str) -> tuple[int, str]:
        url = f"http://127.0.0.1:{self.volume.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""
        except OSError:
            return 0, ""

    def wait(self, check: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
        # Another process: nothing to await but its HTTP endpoint, polled briefly.
        deadline = time.monotonic() + timeout
        while not check():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"relay: {what} did not happen:\n{self.log.read_text()}")
            time.sleep(0.05)

    def reloads(self) -> float:
        _status, text = self._get("/metrics")
        for line in text.splitlines():
            if line.startswith('mailplane_relay_config_reloads_total{result="success"}'):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def wait_ready(self) -> None:
        self.wait(lambda: self._get("/readyz")[0] == 200, "readiness")

    @classmethod
    def start(cls, volume: SecretVolume, log: Path) -> Relay:
        """Start and wait until ready. The ports were free when picked, but another process
        may take one before the relay binds it: then the relay starts again on new ports."""
        for _ in range(5):
            relay = cls(volume, log)
            try:
                relay.wait_ready()
                return relay
            except AssertionError:
                relay.stop()
                if "address already in use" not in log.read_text().lower():
                    raise
            volume.ports = {name: free_port() for name in volume.ports}
            volume.http_port = free_port()
            volume.admin_port = free_port()
            volume.sync()
        raise AssertionError("the relay found no free ports in 5 tries")

    def stop(self) -> int:
        self.proc.terminate()
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


def _send(relay: Relay, ca: trustme.CA, user: str, password: str, n: int) -> None:
    msg = EmailMessage()
    msg["From"] = "orders@example.com"
    msg["To"] = "customer@example.net"
    msg["Subject"] = f"order {n}"
    msg["Message-ID"] = f"<order-{n}@example.com>"
    msg.set_content("your order has shipped\n")
    with smtplib.SMTP("127.0.0.1", relay.volume.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=client_context(ca))
        smtp.login(user, password)
        smtp.send_message(msg)


@pytest.mark.slow
def test_an_application_sends_with_the_operator_s_secret(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, dns_server: LoopbackDNS, tmp_path: Path) -> None:
    with _sink() as (sink, sink_loop):
        def delivered(count: int) -> list[Any]:
            return asyncio.run_coroutine_threadsafe(
                sink.wait_for_messages(count, timeout=20), sink_loop).result(25)

        operator_factory(clock=FakeClock())
        kube_api.create(k.NAMESPACES, namespace_body("mail"))
        kube_api.create(k.NAMESPACES, namespace_body("shop", **{
            "mailplane.io/smtp-access": "true"}))
        # Short retries: a delivery attempt that meets a closing pooled connection on a busy
        # machine is retried in a second, not in the default minute.
        kube_api.create(k.SMTP_RELAYS, relay_body(
            delivery={"mode": "smarthost",
                      "smarthost": {"host": "127.0.0.1", "port": sink.port, "tls": "none"}},
            queue={"retryInitial": "1s", "retryMax": "2s"}))
        kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
        kube_api.create(k.SMTP_CREDENTIALS, credential_body(
            "orders", ["orders@example.com"], rotation={"interval": "720h", "overlap": "1h"}))
        kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                            what="the credential rendered")

        volume = SecretVolume(kube_api, tmp_path / "pod", tls_ca)
        volume.sync()
        relay = Relay.start(volume, tmp_path / "relay.log")
        try:
            app = kube_api.secret_data("shop", "orders-smtp")
            assert app["port"] == "587" and app["url"].startswith("smtp://shop.orders:")
            _send(relay, tls_ca, app["username"], app["password"], 1)
            first = delivered(1)[0]
            assert first.mail_from == "orders@example.com"
            assert first.rcpt_tos == ["customer@example.net"]
            # Signed with the key the operator generated: publish the record the domain's
            # status asks for and verify the delivered message against it.
            domain = kube_api.get(k.SENDING_DOMAINS, "mail", "example-com")
            assert domain is not None
            record = next(r for r in domain["status"]["dnsRecords"] if r["purpose"] == "dkim")
            dns_server.add_txt(record["name"], record["value"])
            assert dkim.verify(first.data, dnsfunc=dns_server.dkim_dnsfunc)

            # On-demand rotation: the new password works at once, the old one until the
            # overlap ends.
            reloads = relay.reloads()
            kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
                           {"metadata": {"annotations": {"mailplane.io/rotate": "e2e"}}})
            kube_api.wait_until(lambda: "previousPasswordHash" in rendered_credentials(
                kube_api)["shop.orders"], what="the rotated configuration")
            volume.sync()
            relay.wait(lambda: relay.reloads() > reloads, "the reload after the rotation")
            rotated = kube_api.secret_data("shop", "orders-smtp")
            assert rotated["password"] != app["password"]
            _send(relay, tls_ca, rotated["username"], rotated["password"], 2)
            _send(relay, tls_ca, app["username"], app["password"], 3)
            assert len(delivered(3)) == 3

            # The platform suspends it on the SmtpRelay; the tenant clearing its own flag
            # changes nothing: the relay answers 554 with the platform's reason.
            reloads = relay.reloads()
            kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {"suspensions": [
                {"namespace": "shop", "name": "orders", "reason": "phishing reports"}]}}})
            kube_api.patch(k.SMTP_CREDENTIALS, "shop", "orders", {"spec": {"suspended": False}})
            kube_api.wait_until(lambda: rendered_credentials(kube_api)["shop.orders"].get(
                "suspended"), what="the platform's suspension rendered")
            volume.sync()
            relay.wait(lambda: relay.reloads() > reloads, "the reload after the suspension")
            with pytest.raises(smtplib.SMTPResponseException) as suspended:
                _send(relay, tls_ca, rotated["username"], rotated["password"], 4)
            assert suspended.value.smtp_code == 554
            assert b"phishing reports" in suspended.value.smtp_error

            # Deleting the credential takes its access away.
            reloads = relay.reloads()
            kube_api.delete(k.SMTP_CREDENTIALS, "shop", "orders")
            kube_api.wait_for(k.SMTP_CREDENTIALS, "shop", "orders", lambda o: o is None)
            volume.sync()
            relay.wait(lambda: relay.reloads() > reloads, "the reload after the deletion")
            for password in (rotated["password"], app["password"]):
                with pytest.raises(smtplib.SMTPAuthenticationError) as refused:
                    _send(relay, tls_ca, rotated["username"], password, 4)
                assert refused.value.smtp_code == 535
            assert len(sink.messages) == 3
        finally:
            assert relay.stop() == 0, relay.log.read_text()[-3000:]
        log = relay.log.read_text()
        for password in (app["password"], rotated["password"]):
            assert password not in log
