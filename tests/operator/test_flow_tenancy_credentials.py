"""The credential half of the two-tenant scenario on the emulator: tenant A (namespace
``tenant-a``) uses the relay as intended; tenant B (``tenant-b``) tries every attack a
namespace-scoped ``edit`` role allows, and each one is refused, capped or contained with a
reason in status or Events while tenant A keeps working."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from typing import Any

from mailplane_operator import kube as k
from mailplane_relay.config import Credential, hash_password, verify_password
from tests.helpers.kube import (
    KubeApi,
    RunningOperator,
    credential_body,
    domain_body,
    namespace_body,
    relay_body,
    rendered_credentials,
)

ACCESS = {"mailplane.io/smtp-access": "true"}


def _tenants(api: KubeApi, **relay_spec: Any) -> None:
    api.create(k.NAMESPACES, namespace_body("mail"))
    api.create(k.NAMESPACES, namespace_body("tenant-a", **ACCESS))
    api.create(k.NAMESPACES, namespace_body("tenant-b", **ACCESS))
    api.create(k.SMTP_RELAYS, relay_body(**relay_spec))
    api.create(k.SENDING_DOMAINS, domain_body("a-example", "a.example"))
    api.create(k.SENDING_DOMAINS, domain_body("b-example", "b.example"))
    api.create(k.SMTP_CREDENTIALS, credential_body("app", ["a.example"], namespace="tenant-a"))
    api.wait_until(lambda: rendered_credentials(api).get("tenant-a.app"),
                   what="tenant A's credential")


def _ready(obj: dict[str, Any] | None) -> dict[str, Any]:
    conds = (obj or {}).get("status", {}).get("conditions") or []
    return next((c for c in conds if c["type"] == "Ready"), {})


def test_a_secret_the_credential_did_not_create_stays_untouched(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _tenants(kube_api)
    kube_api.create(k.SECRETS, {
        "apiVersion": "v1", "kind": "Secret", "type": "Opaque",
        "metadata": {"name": "db-password", "namespace": "tenant-b", "labels": {"app": "db"}},
        "data": {"password": base64.b64encode(b"hunter2").decode()}})
    owned_by_a = kube_api.get(k.SECRETS, "tenant-a", "app-smtp")
    before = {("tenant-b", "db-password"): kube_api.get(k.SECRETS, "tenant-b", "db-password"),
              ("tenant-a", "app-smtp"): owned_by_a}
    # Tenant B names its own unrelated Secret; someone with edit in tenant A's namespace names
    # the Secret of A's credential, and with a sender the relay refuses anyway.
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "grab", ["b.example"], namespace="tenant-b", secretName="db-password"))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "grab", ["nowhere.example"], namespace="tenant-a", secretName="app-smtp"))
    for ns in ("tenant-b", "tenant-a"):
        cred = kube_api.wait_for(k.SMTP_CREDENTIALS, ns, "grab",
                                 lambda o: _ready(o).get("reason") == "SecretConflict")
        assert _ready(cred)["status"] == "False"
        assert f"Secret {ns}/" in _ready(cred)["message"]
    kube_api.wait_until(lambda: {("tenant-a", "SecretConflict"), ("tenant-b", "SecretConflict")}
                        <= {(e["metadata"]["namespace"], e["reason"])
                            for e in kube_api.events() if e["involvedObject"]["name"] == "grab"},
                        what="the SecretConflict events")
    assert set(rendered_credentials(kube_api)) == {"tenant-a.app"}

    for ns in ("tenant-b", "tenant-a"):
        kube_api.delete(k.SMTP_CREDENTIALS, ns, "grab")
        kube_api.wait_for(k.SMTP_CREDENTIALS, ns, "grab", lambda o: o is None)
    for (ns, name), old in before.items():
        now = kube_api.get(k.SECRETS, ns, name)
        assert now is not None and old is not None
        assert now["data"] == old["data"]
        assert now["metadata"].get("ownerReferences") == old["metadata"].get("ownerReferences")
        assert now["metadata"]["resourceVersion"] == old["metadata"]["resourceVersion"]
    writes = [(m, p) for _ua, m, p, _q in kube_api.emulator.audit
              if m in ("PATCH", "DELETE", "PUT")
              and p.endswith(("/secrets/db-password", "/secrets/app-smtp"))]
    assert writes == []
    assert "tenant-a.app" in rendered_credentials(kube_api)
    # A refused credential made the operator write nothing in the relay's namespace either.
    states = [s["metadata"]["annotations"]["mailplane.io/credential"] for s in kube_api.list(
        k.SECRETS, "mail", {"mailplane.io/component": "credential-state"})]
    assert states == ["tenant-a/app"]


def test_ceilings_cap_and_platform_suspensions_hold_whatever_the_tenant_writes(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _tenants(kube_api, limits={"maxRatePerMinute": 600, "maxDailyQuota": 20000,
                               "defaultRatePerMinute": 60})
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "app", ["b.example"], namespace="tenant-b", ratePerMinute=1_000_000_000))
    entry = kube_api.wait_until(lambda: rendered_credentials(kube_api).get("tenant-b.app"),
                                what="tenant B's credential")
    assert (entry["ratePerMinute"], entry["dailyQuota"]) == (600, 20000)
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-b", "app",
                             lambda o: (o or {}).get("status", {}).get("effectiveRatePerMinute"))
    assert (cred["status"]["effectiveRatePerMinute"], cred["status"]["effectiveDailyQuota"]) == (
        600, 20000)
    capped = next(c for c in cred["status"]["conditions"] if c["type"] == "LimitsCapped")
    assert (capped["status"], capped["reason"]) == ("True", "LimitCapped")
    kube_api.wait_until(lambda: any(e["reason"] == "LimitCapped" for e in
                                    kube_api.events("tenant-b")), what="the LimitCapped event")
    assert rendered_credentials(kube_api)["tenant-a.app"]["ratePerMinute"] == 60

    # The platform suspends tenant B's credential; B clears its own suspension flag: no effect.
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {"suspensions": [
        {"namespace": "tenant-b", "name": "app", "reason": "phishing reports"}]}}})
    entry = kube_api.wait_until(
        lambda: (rendered_credentials(kube_api).get("tenant-b.app") or {}).get("suspended")
        and rendered_credentials(kube_api)["tenant-b.app"], what="the platform suspension")
    assert entry["suspendedReason"] == "phishing reports"
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-b", "app", {"spec": {"suspended": False}})
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-b", "app",
                   {"spec": {"suspended": True, "suspendedReason": "ours"}})
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-b", "app",
                   {"spec": {"suspended": None, "suspendedReason": None}})
    cred = kube_api.wait_for(
        k.SMTP_CREDENTIALS, "tenant-b", "app",
        lambda o: _ready(o).get("reason") == "SuspendedByPlatform"
        and _ready(o).get("observedGeneration") == (o or {})["metadata"]["generation"])
    assert "phishing reports" in _ready(cred)["message"]
    assert cred["status"]["suspendedBy"] == "Platform"
    entry = rendered_credentials(kube_api)["tenant-b.app"]
    assert (entry["suspended"], entry["suspendedReason"]) == (True, "phishing reports")
    assert not rendered_credentials(kube_api)["tenant-a.app"].get("suspended")

    # Only the platform lifts it.
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"spec": {"tenancy": {"suspensions": []}}})
    kube_api.wait_until(
        lambda: not (rendered_credentials(kube_api).get("tenant-b.app") or {}).get("suspended"),
        what="the lifted suspension")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-b", "app",
                      lambda o: _ready(o).get("reason") == "CredentialReady"
                      and "suspendedBy" not in (o or {}).get("status", {}))


def _state(api: KubeApi, namespace: str, name: str) -> dict[str, str]:
    cred = api.get(k.SMTP_CREDENTIALS, namespace, name)
    assert cred is not None
    return api.secret_data("mail", f"mailplane-credential-{cred['metadata']['uid']}")


def test_forged_rotation_state_on_the_tenant_secret_has_no_effect(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _tenants(kube_api)
    kube_api.create(k.SMTP_CREDENTIALS, credential_body(
        "app", ["b.example"], namespace="tenant-b",
        rotation={"interval": "24h", "overlap": "1h"}))
    kube_api.wait_until(lambda: rendered_credentials(kube_api).get("tenant-b.app"),
                        what="tenant B's credential")
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-b", "app",
                             lambda o: (o or {}).get("status", {}).get("nextRotationTime"))
    schedule = cred["status"]["nextRotationTime"]
    real = kube_api.secret_data("tenant-b", "app-smtp")["password"]
    state = _state(kube_api, "tenant-b", "app")
    assert "password" not in state and verify_password(real, state["passwordHash"])

    # Tenant B writes annotations to keep a password of its choosing valid for decades and to
    # push the next rotation out.
    known = "chosen-by-the-tenant"
    forged_hash = hash_password(known)
    kube_api.patch(k.SECRETS, "tenant-b", "app-smtp", {"metadata": {"annotations": {
        "mailplane.io/password-hash": forged_hash,
        "mailplane.io/previous-password-hash": forged_hash,
        "mailplane.io/previous-expires": "2099-01-01T00:00:00Z",
        "mailplane.io/rotated-at": "2099-01-01T00:00:00Z"}}})
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-b", "app",
                   {"metadata": {"labels": {"touched": "yes"}}})
    kube_api.wait_until(lambda: "mailplane.io/rotated-at" not in (kube_api.get(
        k.SECRETS, "tenant-b", "app-smtp") or {})["metadata"].get("annotations", {}),
        what="the forged annotations removed")
    entry = Credential.model_validate(rendered_credentials(kube_api)["tenant-b.app"])
    assert entry.check_password(real) and not entry.check_password(known)
    assert entry.previous_password_hash is None
    assert _state(kube_api, "tenant-b", "app") == state
    assert kube_api.secret_data("tenant-b", "app-smtp")["password"] == real

    # The schedule holds: the rotation comes when it was due, not in 2099.
    operator_running.clock.advance(24 * 3600 + 1)
    kube_api.wait_until(lambda: kube_api.secret_data("tenant-b", "app-smtp")["password"] != real,
                        what="the scheduled rotation")
    cred = kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-b", "app", lambda o: (o or {}).get(
        "status", {}).get("nextRotationTime", "") > schedule)
    current = kube_api.secret_data("tenant-b", "app-smtp")["password"]

    # Tenant B sets a password of its choosing: never accepted; a new one is issued.
    kube_api.patch(k.SECRETS, "tenant-b", "app-smtp",
                   {"data": {"password": base64.b64encode(known.encode()).decode()}})
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-b", "app",
                   {"metadata": {"labels": {"touched": "again"}}})
    kube_api.wait_until(lambda: kube_api.secret_data("tenant-b", "app-smtp")["password"] not in (
        known, current), what="a new password issued")
    issued = kube_api.secret_data("tenant-b", "app-smtp")["password"]
    entry = Credential.model_validate(kube_api.wait_until(
        lambda: (rendered_credentials(kube_api)["tenant-b.app"]
                 if Credential.model_validate(rendered_credentials(kube_api)["tenant-b.app"])
                 .check_password(issued) else None), what="the new password rendered"))
    assert not entry.check_password(known)
    assert entry.check_password(current)  # pods that read it before keep working (overlap)
    kube_api.wait_until(lambda: any(e["reason"] == "PasswordReissued"
                                    for e in kube_api.events("tenant-b")),
                        what="the PasswordReissued event")

    # Deleting the credential deletes its state in the relay's namespace.
    uid = cred["metadata"]["uid"]
    kube_api.delete(k.SMTP_CREDENTIALS, "tenant-b", "app")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-b", "app", lambda o: o is None)
    kube_api.wait_for(k.SECRETS, "mail", f"mailplane-credential-{uid}", lambda o: o is None)


def test_one_tenants_malformed_annotation_stops_no_one_else(
        kube_api: KubeApi, operator_running: RunningOperator) -> None:
    _tenants(kube_api, tenancy={"verificationSkipNamespaces": {}})
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("old", ["a.example"],
                                                        namespace="tenant-a"))
    # Tenant B owns a domain in its own namespace and a credential sending from it.
    kube_api.create(k.SENDING_DOMAINS, domain_body(
        "own", "own-b.example", namespace="tenant-b", relayRef={"name": "main",
                                                                "namespace": "mail"}))
    kube_api.create(k.SMTP_CREDENTIALS, credential_body("app", ["own-b.example"],
                                                        namespace="tenant-b"))
    kube_api.wait_until(lambda: {"tenant-a.old", "tenant-b.app"} <= set(
        rendered_credentials(kube_api)), what="everyone rendered")

    # Tenant B writes a malformed value into the state annotation of its own DKIM Secret.
    kube_api.patch(k.SECRETS, "tenant-b", "own-dkim", {"metadata": {"annotations": {
        "mailplane.io/dkim-state": "{not json"}}})
    # Secrets are not watched: the domain's reconcile reads it again when the domain changes,
    # and the next render of the relay uses what it read.
    kube_api.patch(k.SENDING_DOMAINS, "tenant-b", "own", {"metadata": {"labels": {"x": "y"}}})
    runtime = operator_running.runtime[0]
    kube_api.wait_until(lambda: "{not json" in json.dumps(
        runtime.secrets.get(("tenant-b", "own-dkim")) or {}), poll=0.05,
        what="the domain's reconcile reading its Secret again")
    kube_api.patch(k.SMTP_RELAYS, "mail", "main", {"metadata": {"labels": {"render": "now"}}})
    relay = kube_api.wait_for(k.SMTP_RELAYS, "mail", "main", lambda o: any(
        e["name"] == "tenant-b/own" for e in (o or {}).get("status", {}).get("excluded", [])))
    left_out = next(e for e in relay["status"]["excluded"] if e["name"] == "tenant-b/own")
    assert left_out["reason"] in ("DKIMSecretUnreadable", "InvalidConfigEntry")
    assert "{not json" not in json.dumps(relay["status"])
    complete = next(c for c in relay["status"]["conditions"] if c["type"] == "ConfigComplete")
    assert complete["status"] == "False" and left_out["reason"] in complete["message"]
    kube_api.wait_until(lambda: "tenant-b.app" not in rendered_credentials(kube_api),
                        what="tenant B's credential left out with its domain")
    kube_api.wait_until(lambda: any(
        e["type"] == "Warning" and e["involvedObject"]["name"] == "own"
        for e in kube_api.events("tenant-b")), what="a Warning Event on tenant B's domain")

    # Tenant A's rotation and deletion still reach the relay.
    before = rendered_credentials(kube_api)["tenant-a.app"]["passwordHash"]
    kube_api.patch(k.SMTP_CREDENTIALS, "tenant-a", "app",
                   {"metadata": {"annotations": {"mailplane.io/rotate": "now"}}})
    kube_api.wait_until(lambda: rendered_credentials(kube_api)["tenant-a.app"][
        "passwordHash"] != before, what="tenant A's rotation")
    kube_api.delete(k.SMTP_CREDENTIALS, "tenant-a", "old")
    kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-a", "old", lambda o: o is None)
    assert "tenant-a.old" not in rendered_credentials(kube_api)
    assert "a.example" in kube_api.get(k.SMTP_RELAYS, "mail", "main")["status"]["domains"]


def test_an_application_secret_deleted_by_hand_is_written_again(
        kube_api: KubeApi, operator_factory: Callable[..., RunningOperator]) -> None:
    op = operator_factory(relay_resync_interval=0.5)
    _tenants(kube_api)
    kube_api.wait_for(k.SMTP_CREDENTIALS, "tenant-a", "app",
                      lambda o: _ready(o).get("reason") == "CredentialReady")
    # Settled: nothing is scheduled for this credential (no rotation interval).
    runtime = op.runtime[0]
    kube_api.wait_until(lambda: runtime.credential_next_check.get("tenant-a/app", 0) is None,
                        poll=0.05, what="the credential settled")
    first = kube_api.secret_data("tenant-a", "app-smtp")["password"]
    kube_api.delete(k.SECRETS, "tenant-a", "app-smtp")
    # Noticed at the relay's next resync (it re-reads every Secret), without any change to the
    # SmtpCredential; the password issued is gone with it, so a new one is issued.
    kube_api.wait_until(lambda: kube_api.get(k.SECRETS, "tenant-a", "app-smtp"),
                        what="the application Secret written again")
    again = kube_api.secret_data("tenant-a", "app-smtp")["password"]
    assert again != first
    kube_api.wait_until(lambda: Credential.model_validate(
        rendered_credentials(kube_api)["tenant-a.app"]).check_password(again),
        what="the new password rendered")
