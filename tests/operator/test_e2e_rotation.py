"""End to end: a rotated password works and the old one is refused by every relay pod within
seconds, long before the pods' mounted configuration catches up.

As in test_e2e_revocation.py, the operator runs against the Kubernetes emulator and a real
`mailplane relay` stands in for the StatefulSet's pod; the test plays a kubelet that has not
synced the Secret volume, so the pod's files keep the render from before the rotation the whole
time. The credential rotates with ``overlap: 0`` (the old password must stop at once); the
operator pushes the new password's hash to the pod over its HTTPS admin port, and the pod
answers 235 to the new password and 535 to the old one. The figures printed are rotation
request -> new password 235 and old password 535, end to end.
"""

from __future__ import annotations

import json
import smtplib
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trustme
import yaml

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
from tests.helpers.ports import refusing_port
from tests.operator.test_e2e import Relay, SecretVolume, create_tls_secret
from tests.operator.test_e2e_scaledown import _pod

BOUND = 15.0


class _Volume(SecretVolume):
    """The pod's files; the test polls AUTH with refused passwords many times from one address,
    which the relay's failure throttle (454) would cut short: its limits are raised."""

    def _localize(self, text: str) -> str:
        doc = yaml.safe_load(super()._localize(text))
        doc["spec"]["limits"].update(authFailureLimit=100_000,
                                     authFailureLimitPerAddress=100_000)
        return yaml.safe_dump(doc, sort_keys=False)


def _auth(volume: SecretVolume, ca: trustme.CA, user: str, password: str) -> int:
    """The reply code to AUTH with this password (235 or 535)."""
    with smtplib.SMTP("127.0.0.1", volume.ports["submission"], timeout=10) as smtp:
        smtp.starttls(context=client_context(ca))
        try:
            code, _msg = smtp.login(user, password)
        except smtplib.SMTPAuthenticationError as exc:
            return exc.smtp_code
        return code


def _until(check: Callable[[], bool], what: str, started: float) -> float:
    """Seconds from `started` until `check()` holds; fails past the bound."""
    while not check():
        assert time.monotonic() - started < BOUND, f"{what}: not within {BOUND:.0f} s"
        time.sleep(0.05)
    return time.monotonic() - started


def _rotation(api: KubeApi) -> dict[str, Any]:
    cred = api.get(k.SMTP_CREDENTIALS, "shop", "orders") or {}
    return dict((cred.get("status") or {}).get("rotation") or {})


def _mounted_entry(volume: SecretVolume, username: str) -> dict[str, Any]:
    """The credential's entry in the pod's mounted files (credentials come in chunks)."""
    for f in sorted(volume.dir.iterdir()):
        if f.name.startswith(".") or f.is_dir():
            continue
        for doc in yaml.safe_load_all(f.read_text()):
            for entry in ((doc or {}).get("spec") or {}).get("credentials") or []:
                if entry["username"] == username:
                    return dict(entry)
    raise AssertionError(f"{username} is not in the mounted files")


def _mounted_serial(volume: SecretVolume) -> int:
    return int(_mounted_entry(volume, "shop.orders").get("passwordSerial", 0))


def _push(volume: SecretVolume, ca: trustme.CA, token: str, doc: dict[str, Any]
          ) -> tuple[int, dict[str, Any] | str]:
    """POST /admin/credential as a client holding the admin token would."""
    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    request = urllib.request.Request(
        f"https://127.0.0.1:{volume.admin_port}/admin/credential", method="POST",
        data=json.dumps(doc).encode(), headers={"Authorization": f"Bearer {token}",
                                                "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, context=ctx, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _rotate(api: KubeApi, token: str) -> None:
    api.patch(k.SMTP_CREDENTIALS, "shop", "orders",
              {"metadata": {"annotations": {"mailplane.io/rotate": token}}})


def _new_password(api: KubeApi, old: str) -> str:
    api.wait_until(lambda: api.secret_data("shop", "orders-smtp")["password"] != old,
                   what="the application Secret rotated")
    return api.secret_data("shop", "orders-smtp")["password"]


@pytest.mark.slow
def test_a_rotated_password_works_and_the_old_one_is_refused_within_seconds_on_a_stale_render(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, tmp_path: Path) -> None:
    operator_factory(drain_poll=0.2)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    create_tls_secret(kube_api, tls_ca)
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(
        delivery={"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": 9,
                                                     "tls": "none"}}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "orders", ["orders@example.com"], rotation={"overlap": "0s"}))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("billing", ["orders@example.com"]))
    kube_api.wait_until(lambda: {"shop.orders", "shop.billing"} <= set(
        rendered_credentials(kube_api)), what="the credentials rendered")
    user, first = (kube_api.secret_data("shop", "orders-smtp")[f]
                   for f in ("username", "password"))
    other = kube_api.secret_data("shop", "billing-smtp")
    token = kube_api.secret_data("mail", "main-admin")["token"]
    volume = _Volume(kube_api, tmp_path / "pod0", tls_ca)
    volume.sync()
    mounted = _mounted_serial(volume)
    relay = Relay.start(volume, tmp_path / "relay.log")
    try:
        pod = _pod(0, volume)
        kube_api.create(k.PODS, pod)
        kube_api.patch(k.PODS, "mail", "main-0", {"status": pod["status"]}, status=True)
        assert _auth(volume, tls_ca, user, first) == 235

        # A rotation on request; the pod's files keep the render of the first password.
        started = time.monotonic()
        _rotate(kube_api, "1")
        second = _new_password(kube_api, first)
        works = _until(lambda: _auth(volume, tls_ca, user, second) == 235,
                       "the new password accepted", started)
        refused = _until(lambda: _auth(volume, tls_ca, user, first) == 535,
                         "the old password refused", started)
        kube_api.wait_until(lambda: _rotation(kube_api).get("confirmed") is True,
                            what="status.rotation confirmed")
        status = _rotation(kube_api)
        confirmed = time.monotonic() - started
        assert status["reason"] == "RotationConfirmed" and status["confirmedPods"] == ["main-0"]
        assert _auth(volume, tls_ca, other["username"], other["password"]) == 235
        assert _mounted_serial(volume) == mounted  # all of it on the stale files

        # A stale push (an earlier serial, the old hash) arriving late changes nothing.
        old_hash = _mounted_entry(volume, user)["passwordHash"]
        code, answer = _push(volume, tls_ca, token, {
            "username": user, "owner": "shop/orders", "passwordSerial": status["serial"] - 1,
            "passwordHash": old_hash})
        assert code == 200 and isinstance(answer, dict)
        assert answer["passwordSerial"] == status["serial"]
        assert _auth(volume, tls_ca, user, first) == 535
        # A push for a credential of another tenant's name is refused, not applied.
        code, answer = _push(volume, tls_ca, token, {
            "username": other["username"], "owner": "shop/orders", "passwordSerial": 99,
            "passwordHash": old_hash})
        assert code == 409 and "belongs to shop/billing" in str(answer)

        # A restart on the same stale render runs the rotated password (kept on the volume).
        assert relay.stop() == 0
        relay = Relay.start(volume, tmp_path / "relay-again.log")
        assert _auth(volume, tls_ca, user, second) == 235
        assert _auth(volume, tls_ca, user, first) == 535

        # The pod is down while the next rotation happens, and comes back on the stale render:
        # the operator pushes again until it confirms.
        assert relay.stop() == 0
        _rotate(kube_api, "2")
        third = _new_password(kube_api, second)
        kube_api.wait_until(lambda: _rotation(kube_api).get("serial") == status["serial"] + 1,
                            what="the next rotation pushed")
        relay = Relay.start(volume, tmp_path / "relay-third.log")
        back = time.monotonic()
        _until(lambda: _auth(volume, tls_ca, user, third) == 235, "the third password", back)
        assert _auth(volume, tls_ca, user, second) == 535
        assert _auth(volume, tls_ca, user, first) == 535
        kube_api.wait_until(lambda: _rotation(kube_api).get("confirmed") is True,
                            what="the third rotation confirmed")

        volume.sync()  # the kubelet's sync at last: the pushed entry is no longer needed
        rotations = volume.state / "rotations.json"
        relay.wait(lambda: user not in rotations.read_text(), "the entry dropped")
        assert _mounted_serial(volume) == status["serial"] + 1
        assert _auth(volume, tls_ca, user, third) == 235
        assert _auth(volume, tls_ca, user, second) == 535
        print(f"\nrotation: new password 235 {works:.2f}s, old password 535 {refused:.2f}s after "
              f"the request, confirmed in the status {confirmed:.2f}s after (the pod's mounted "
              f"render still held the old password)")
    finally:
        assert relay.stop() == 0


@pytest.mark.slow
def test_racing_rotations_end_on_the_last_password_and_an_unreachable_pod_is_reported(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, tmp_path: Path) -> None:
    # The bound on confirmations (5 minutes in production) cut short for the test.
    operator_factory(drain_poll=0.2, revocation_timeout=3.0)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    create_tls_secret(kube_api, tls_ca)
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(
        delivery={"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": 9,
                                                     "tls": "none"}}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "orders", ["orders@example.com"], rotation={"overlap": "0s"}))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential rendered")
    user, first = (kube_api.secret_data("shop", "orders-smtp")[f]
                   for f in ("username", "password"))
    uid = (kube_api.get(k.SMTP_CREDENTIALS, "shop", "orders") or {})["metadata"]["uid"]
    volume = _Volume(kube_api, tmp_path / "pod0", tls_ca)
    volume.sync()
    relay = Relay.start(volume, tmp_path / "relay.log")
    # A second pod whose admin port refuses connections for the whole test.
    with refusing_port() as closed:
        try:
            pod = _pod(0, volume)
            kube_api.create(k.PODS, pod)
            kube_api.patch(k.PODS, "mail", "main-0", {"status": pod["status"]}, status=True)
            gone = _pod(1, volume)
            gone["spec"]["containers"][0]["ports"][1]["containerPort"] = closed
            kube_api.create(k.PODS, gone)
            kube_api.patch(k.PODS, "mail", "main-1", {"status": gone["status"]}, status=True)

            # The tenant asks for rotations as fast as it can.
            seen = {first}
            for n in range(1, 6):
                _rotate(kube_api, f"race-{n}")
                seen.add(kube_api.secret_data("shop", "orders-smtp")["password"])

            def settled() -> bool:
                state = kube_api.secret_data("mail", f"mailplane-credential-{uid}")
                rotation = _rotation(kube_api)
                return (state.get("rotationRequest") == "race-5"
                        and rotation.get("serial") == int(state["passwordSerial"])
                        and rotation.get("reason") == "RotationUnconfirmed")

            kube_api.wait_until(settled, what="the last rotation reported", poll=0.2)
            status = _rotation(kube_api)
            last = kube_api.secret_data("shop", "orders-smtp")["password"]
            assert status["confirmed"] is False
            assert status["confirmedPods"] == ["main-0"] and status["pendingPods"] == ["main-1"]
            warnings = [e for e in kube_api.events("shop")
                        if e.get("reason") == "RotationUnconfirmed"]
            assert warnings and "main-1" in warnings[-1]["message"]
            assert warnings[-1]["type"] == "Warning"
            # The pod that answers runs the last password only, whatever order pushes came in.
            assert _auth(volume, tls_ca, user, last) == 235
            for password in seen - {last}:
                assert _auth(volume, tls_ca, user, password) == 535
            held = json.loads((volume.state / "rotations.json").read_text())
            assert held[user]["passwordSerial"] == status["serial"]
            assert held[user]["ownerUid"] == uid  # the pushed fields name this very object
        finally:
            assert relay.stop() == 0


@pytest.mark.slow
def test_a_confirmation_cut_short_by_an_operator_restart_is_taken_up_by_the_next_operator(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator],
        tls_ca: trustme.CA, tmp_path: Path) -> None:
    first_operator = operator_factory(drain_poll=0.2)
    kube_api.create(k.NAMESPACES, namespace_body("mail"))
    create_tls_secret(kube_api, tls_ca)
    kube_api.create(k.NAMESPACES, namespace_body("shop", **{"mailplane.io/smtp-access": "true"}))
    kube_api.create(k.SMTP_RELAYS, relay_body(
        delivery={"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": 9,
                                                     "tls": "none"}}))
    kube_api.create(k.SENDING_DOMAINS, domain_body("example-com", "example.com"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "orders", ["orders@example.com"], rotation={"overlap": "0s"}))
    kube_api.wait_until(lambda: "shop.orders" in rendered_credentials(kube_api),
                        what="the credential rendered")
    user, first = (kube_api.secret_data("shop", "orders-smtp")[f]
                   for f in ("username", "password"))
    volume = _Volume(kube_api, tmp_path / "pod0", tls_ca)
    volume.sync()
    # The pod is down while the password rotates (its admin port refuses), and the operator
    # stops before it comes back.
    pod = _pod(0, volume)
    kube_api.create(k.PODS, pod)
    kube_api.patch(k.PODS, "mail", "main-0", {"status": pod["status"]}, status=True)
    _rotate(kube_api, "1")
    second = _new_password(kube_api, first)
    kube_api.wait_until(lambda: _rotation(kube_api).get("reason") == "RotationPending",
                        what="the rotation pending")
    first_operator.stop()
    relay = Relay.start(volume, tmp_path / "relay.log")
    try:
        # Nobody pushes: the pod runs its stale render.
        assert _auth(volume, tls_ca, user, first) == 235
        assert _auth(volume, tls_ca, user, second) == 535
        started = time.monotonic()
        operator_factory(drain_poll=0.2)
        _until(lambda: _auth(volume, tls_ca, user, second) == 235, "the new password", started)
        assert _auth(volume, tls_ca, user, first) == 535
        kube_api.wait_until(lambda: _rotation(kube_api).get("confirmed") is True,
                            what="the rotation confirmed by the next operator")
        assert _rotation(kube_api)["confirmedPods"] == ["main-0"]
    finally:
        assert relay.stop() == 0
