"""SmtpCredential: the application Secret, hashes for the relay, rotation on schedule and on
demand with an overlap window, admission to the relay, and no secret in status or events."""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from mailplane_operator.reconcile import credential as cm
from mailplane_operator.reconcile import credential_state as cs
from mailplane_operator.reconcile.conditions import get_condition
from mailplane_operator.reconcile.models import LabelSelector
from mailplane_operator.reconcile.ownership import DomainOwner
from mailplane_relay.config import Credential, verify_password
from tests.operator.reconcile_builders import NOW, counting_random, credential, relay


def owners(*names: str, namespace: str = "mail",
           allowed: LabelSelector | None = None) -> dict[str, DomainOwner]:
    """Attached domains owned by SendingDomains in ``namespace`` granting ``allowed``."""
    return {n: DomainOwner(n, namespace, n.replace(".", "-"), allowed) for n in names}


# Granted to every namespace: these tests are about the relay's side of admission.
ATTACHED = owners("example.com", allowed=LabelSelector())
RELAY = relay()


def values(secret: dict[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def reconcile(cred: Any, before: cm.CredentialResult | None = None, *, now: Any = NOW,
              existing: dict[str, Any] | None = None, stored: dict[str, Any] | None = None,
              r: Any = "default", labels: dict[str, str] | None = None,
              attached: Mapping[str, DomainOwner] = ATTACHED) -> cm.CredentialResult:
    """One reconcile; ``before``: the previous one, whose Secrets are now in the cluster."""
    if before is not None:
        existing = existing if existing is not None else before.secret
        stored = stored if stored is not None else before.state_secret
    return cm.reconcile_credential(
        cred, relay=RELAY if r == "default" else r, namespace_labels=labels,
        attached_domains=attached, existing_secret=existing, stored_state=stored, now=now)


def assert_no_secret_leaks(result: cm.CredentialResult) -> None:
    assert result.secret is not None and result.state_secret is not None
    secret = values(result.secret)
    exposed = json.dumps(result.status) + repr(result.events) + repr(result.state)
    for value in (secret["password"], values(result.state_secret)["passwordHash"]):
        assert value not in exposed
    assert json.dumps(result.secret["metadata"]).find("sha256$") < 0


def test_first_reconcile_writes_a_ready_to_use_secret() -> None:
    cred = credential()
    result = reconcile(cred)
    assert result.rotated and result.admission.allowed
    secret = result.secret
    assert secret is not None
    v = values(secret)
    assert v["username"] == "mail.app"
    assert re.fullmatch(r"[A-Za-z0-9]{43}", v["password"])  # 256 bits; never starts with '-'
    assert len({cs.generate_password() for _ in range(200)}) == 200
    assert cs.generate_password(lambda n: b"\xff" * n) == cs.generate_password(
        lambda n: b"\xff" * n)
    assert v["host"] == "main.mail.svc.cluster.local"
    assert v["port"] == "587" and v["tls"] == "starttls"
    assert v["url"] == f"smtp://mail.app:{v['password']}@main.mail.svc.cluster.local:587"
    assert v["smtps-url"].startswith("smtps://mail.app:") and v["smtps-port"] == "465"
    md = secret["metadata"]
    assert (md["name"], md["namespace"]) == ("app-smtp", "mail")
    assert md["ownerReferences"][0]["kind"] == "SmtpCredential"
    assert md["ownerReferences"][0]["uid"] == cred.meta.uid
    assert md["annotations"] == {}  # no rotation state where the tenant can write
    # The state lives in the relay's namespace, owned by the SmtpRelay.
    state = result.state_secret
    assert state is not None
    smd = state["metadata"]
    assert (smd["name"], smd["namespace"]) == (f"mailplane-credential-{cred.meta.uid}", "mail")
    assert smd["ownerReferences"][0]["kind"] == "SmtpRelay"
    assert smd["labels"]["mailplane.io/component"] == "credential-state"
    sv = values(state)
    assert "password" not in sv  # hashes and times only: one copy of the password
    assert verify_password(v["password"], sv["passwordHash"])
    assert sv["passwordHash"].startswith("sha256$")
    assert sv["rotatedAt"] == "2026-11-27T12:00:00Z"
    assert [e.reason for e in result.events] == [cs.ROTATION_INITIAL]
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"
    assert result.status["secretName"] == "app-smtp"
    assert_no_secret_leaks(result)


def test_reconcile_is_idempotent() -> None:
    cred = credential()
    first = reconcile(cred)
    second = reconcile(cred, first, now=NOW + timedelta(hours=1))
    assert not second.rotated and second.events == []
    assert second.secret == first.secret and second.state_secret == first.state_secret


def test_scheduled_rotation_keeps_the_old_password_for_the_overlap() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "2h"})
    first = reconcile(cred)
    assert first.next_check == NOW + timedelta(hours=24)
    assert first.secret is not None
    old = values(first.secret)["password"]
    not_yet = reconcile(cred, first, now=NOW + timedelta(hours=23, minutes=59))
    assert not not_yet.rotated
    at = NOW + timedelta(hours=24)
    rotated = reconcile(cred, first, now=at)
    assert rotated.rotated and [e.reason for e in rotated.events] == [cs.ROTATION_SCHEDULED]
    assert rotated.secret is not None
    new = values(rotated.secret)["password"]
    assert new != old
    assert rotated.next_check == at + timedelta(hours=2)  # the end of the overlap
    assert rotated.state is not None
    entry = cm.credential_entry(cred, rotated.state, at, relay())
    relay_side = Credential.model_validate(entry)
    assert relay_side.check_password(new, at)
    assert relay_side.check_password(old, at + timedelta(hours=1, minutes=59))
    assert not relay_side.check_password(old, at + timedelta(hours=2))
    assert rotated.status["previousPasswordExpires"] == "2026-11-28T14:00:00Z"
    assert rotated.status["nextRotationTime"] == "2026-11-29T12:00:00Z"
    assert_no_secret_leaks(rotated)
    # After the overlap the previous hash disappears from the Secret and the relay entry.
    later = reconcile(cred, rotated, now=at + timedelta(hours=2))
    assert later.state_secret is not None and not later.rotated
    assert "previousPasswordHash" not in later.state_secret["data"]
    assert later.state is not None
    assert "previousPasswordHash" not in cm.credential_entry(cred, later.state, at, relay())


def test_on_demand_rotation_runs_once_per_token() -> None:
    cred = credential()
    first = reconcile(cred)
    asked = credential(annotations={cs.ANN_ROTATE: "2026-11-27T12:05"}, uid=cred.meta.uid)
    rotated = reconcile(asked, first, now=NOW + timedelta(minutes=5))
    assert rotated.rotated
    assert [e.reason for e in rotated.events] == [cs.ROTATION_REQUESTED]
    assert rotated.state_secret is not None
    assert values(rotated.state_secret)["rotationRequest"] == "2026-11-27T12:05"
    assert rotated.status["lastRotationRequest"] == "2026-11-27T12:05"
    # The token is remembered in the state Secret: the same token does nothing, even after a
    # restart of the operator that lost nothing but its memory (status empty).
    again = reconcile(asked, rotated, now=NOW + timedelta(minutes=6))
    assert not again.rotated
    renewed = credential(annotations={cs.ANN_ROTATE: "second"}, uid=cred.meta.uid)
    assert reconcile(renewed, rotated, now=NOW + timedelta(minutes=7)).rotated


def test_the_entry_and_a_pushed_rotation_name_the_credential_by_its_uid() -> None:
    """A credential deleted and created again under its name is another one to the relay: its
    entry and its pushed rotations carry the object's uid (the relay's rotation.py)."""
    cred = credential()
    first = reconcile(cred)
    asked = credential(annotations={cs.ANN_ROTATE: "t"}, uid=cred.meta.uid)
    rotated = reconcile(asked, first, now=NOW + timedelta(minutes=5))
    assert rotated.state is not None
    assert cm.credential_entry(asked, rotated.state, NOW, relay())["ownerUid"] == cred.meta.uid
    push = cm.pushed_password(asked, rotated, NOW, relay())
    assert push is not None
    assert (push["owner"], push["ownerUid"]) == ("mail/app", cred.meta.uid)


def test_a_first_reconcile_with_a_token_does_not_rotate_twice() -> None:
    asked = credential(annotations={cs.ANN_ROTATE: "t1"})
    first = reconcile(asked)
    assert [e.reason for e in first.events] == [cs.ROTATION_INITIAL]
    assert not reconcile(asked, first).rotated


def test_admission_reasons() -> None:
    cred = credential(namespace="shop", relay_namespace="mail")
    missing = reconcile(cred, r=None)
    assert missing.secret is None
    assert missing.admission.reason == cm.REASON_RELAY_NOT_FOUND
    assert missing.status["conditions"][0]["reason"] == "RelayNotFound"

    closed = reconcile(cred)  # the relay allows only its own namespace by default
    assert closed.admission.reason == cm.REASON_NAMESPACE_NOT_ALLOWED
    assert "does not allow namespace 'shop'" in closed.admission.message
    assert [e.type for e in closed.events] == ["Warning"]
    # No password: a namespace without access makes the operator write nothing anywhere.
    assert closed.secret is None and closed.state_secret is None

    by_label = relay(allowedNamespaces={"matchLabels": {"smtp": "yes"}})
    assert reconcile(cred, r=by_label, labels={"smtp": "yes"}).admission.allowed
    assert not reconcile(cred, r=by_label, labels={"smtp": "no"}).admission.allowed
    by_name = relay(allowedNamespaces={"matchExpressions": [{
        "key": "kubernetes.io/metadata.name", "operator": "In", "values": ["shop"]}]})
    assert reconcile(cred, r=by_name).admission.allowed
    assert reconcile(cred, r=relay(allowedNamespaces={})).admission.allowed

    other = credential(senders=("example.com", "billing@example.org"))
    refused = reconcile(other)
    assert refused.admission.reason == cm.REASON_SENDER_NOT_ATTACHED
    assert refused.admission.message.endswith(": example.org")
    assert reconcile(other, attached=owners("example.com", "example.org")).admission.allowed


def test_suspended_credentials_are_rendered_but_not_ready() -> None:
    cred = credential(suspended=True, suspendedReason="bounce rate above 5%")
    result = reconcile(cred)
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None
    assert (ready["status"], ready["reason"]) == ("False", "Suspended")
    assert result.admission.allowed and result.state is not None
    entry = cm.credential_entry(cred, result.state, NOW, relay())
    assert entry["suspended"] is True and entry["suspendedReason"] == "bounce rate above 5%"


def test_limits_reach_the_relay_entry() -> None:
    cred = credential(ratePerMinute=30, dailyQuota=1000)
    result = reconcile(cred)
    assert result.state is not None
    entry = cm.credential_entry(cred, result.state, NOW, relay())
    assert (entry["ratePerMinute"], entry["dailyQuota"]) == (30, 1000)
    assert entry["owner"] == "mail/app"
    assert "password" not in entry


def test_implicit_tls_only_relay_gets_an_smtps_url() -> None:
    r = relay(listeners={"submission": {"enabled": False}})
    result = reconcile(credential(), r=r)
    assert result.secret is not None
    v = values(result.secret)
    assert v["port"] == "465" and v["tls"] == "implicit" and v["url"].startswith("smtps://")


def test_long_names_give_a_username_the_relay_accepts() -> None:
    # The longest names the API accepts (namespace: DNS label; SmtpCredential: 63, CRD rule).
    cred = credential(name="a" * 63, namespace="n" * 63)
    name = cm.username_for(cred)
    assert len(name) <= 128
    assert Credential.model_validate({"username": name, "passwordHash": "sha256$00$00",
                                      "allowedSenders": ["example.com"]})


def test_passwords_and_salts_come_from_the_injected_random_source() -> None:
    cred, r = credential(), relay()

    def run() -> cm.CredentialResult:
        return cm.reconcile_credential(cred, relay=r, namespace_labels=None,
                                       attached_domains=ATTACHED, existing_secret=None, now=NOW,
                                       random=counting_random())

    assert run().secret == run().secret
    assert run().state_secret == run().state_secret


def foreign_secret(name: str = "app-smtp", namespace: str = "mail",
                   owner_refs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A Secret the credential did not create, with a password and forged-looking state."""
    return {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
            "metadata": {"name": name, "namespace": namespace, "uid": "theirs",
                         "annotations": {cs.ANN_PASSWORD_HASH: "sha256$00$00"},
                         "ownerReferences": owner_refs or []},
            "data": {"password": base64.b64encode(b"their-password").decode(),
                     "api-key": base64.b64encode(b"k").decode()}}


def test_a_secret_the_credential_did_not_create_is_neither_written_nor_read() -> None:
    cred = credential(secretName="shared")
    other_owner = {"apiVersion": "mailplane.io/v1alpha1", "kind": "SmtpCredential",
                   "name": "app", "uid": "someone-else", "controller": True}
    ours_not_controller = {**other_owner, "uid": cred.meta.uid, "controller": False}
    for refs in ([], [other_owner], [ours_not_controller]):
        result = reconcile(cred, existing=foreign_secret("shared", owner_refs=refs))
        assert result.secret is None and result.state_secret is None
        assert result.state is None and not result.rotated
        assert result.admission.reason == cm.REASON_SECRET_CONFLICT
        ready = get_condition(result.status["conditions"], "Ready")
        assert ready is not None and (ready["status"], ready["reason"]) == (
            "False", "SecretConflict")
        assert "Secret mail/shared already exists" in ready["message"]
        assert [(e.type, e.reason) for e in result.events] == [("Warning", "SecretConflict")]
        assert "their-password" not in json.dumps(result.status) + repr(result.events)
    # Refused for another reason too (no relay): still the conflict, still nothing written.
    missing = reconcile(cred, existing=foreign_secret("shared"), r=None)
    assert missing.secret is None and missing.admission.reason == cm.REASON_SECRET_CONFLICT
    # The Secret it created itself is its own.
    own = reconcile(cred)
    assert own.secret is not None
    assert cm.secret_is_ours(cred, own.secret)
    assert reconcile(cred, own).admission.allowed
    # The same name and namespace but a new object (new uid) does not inherit it.
    again = credential(secretName="shared")
    assert reconcile(again, own).admission.reason == cm.REASON_SECRET_CONFLICT


def test_the_relay_ceilings_cap_what_a_credential_asks_for() -> None:
    r = relay(limits={"maxRatePerMinute": 600, "maxDailyQuota": 10000,
                      "defaultRatePerMinute": 60})
    greedy = credential(ratePerMinute=1_000_000_000, dailyQuota=10**9)
    result = reconcile(greedy, r=r)
    assert result.state is not None and result.admission.allowed
    entry = cm.credential_entry(greedy, result.state, NOW, r)
    assert (entry["ratePerMinute"], entry["dailyQuota"]) == (600, 10000)
    assert (result.status["effectiveRatePerMinute"], result.status["effectiveDailyQuota"]) == (
        600, 10000)
    capped = get_condition(result.status["conditions"], cm.LIMITS_CAPPED)
    assert capped is not None and (capped["status"], capped["reason"]) == ("True", "LimitCapped")
    assert "spec.ratePerMinute 1000000000 is above the ceiling" in capped["message"]
    assert "maxDailyQuota 10000" in capped["message"]
    assert ("Warning", "LimitCapped") in [(e.type, e.reason) for e in result.events]
    ready = get_condition(result.status["conditions"], "Ready")
    assert ready is not None and ready["status"] == "True"  # capped, still sending
    # Seen again with that status: no second Event for the same cap.
    again = credential(ratePerMinute=1_000_000_000, dailyQuota=10**9, uid=greedy.meta.uid,
                       status=result.status)
    assert "LimitCapped" not in [e.reason for e in reconcile(again, result, r=r).events]

    modest = credential(ratePerMinute=30)
    result = reconcile(modest, r=r)
    assert result.state is not None
    entry = cm.credential_entry(modest, result.state, NOW, r)
    # Asking less is fine; asking nothing gets the default, and the ceiling when no default.
    assert (entry["ratePerMinute"], entry["dailyQuota"]) == (30, 10000)
    capped = get_condition(result.status["conditions"], cm.LIMITS_CAPPED)
    assert capped is not None and (capped["status"], capped["reason"]) == (
        "False", "WithinLimits")
    assert cm.effective_limits(credential(), r) == cm.EffectiveLimits(60, 10000)
    # No ceiling: what the credential asks for, and the relay's default otherwise.
    assert cm.effective_limits(greedy, relay()) == cm.EffectiveLimits(1_000_000_000, 10**9)
    assert cm.effective_limits(credential(), relay(limits={"defaultDailyQuota": 5})) == (
        cm.EffectiveLimits(None, 5))


def test_a_platform_suspension_cannot_be_lifted_by_the_tenant() -> None:
    r = relay(tenancy={"suspensions": [
        {"namespace": "mail", "name": "app", "reason": "complaint rate above 0.3%"},
        {"namespace": "shop", "reason": "unpaid invoice"}]})
    for spec in ({}, {"suspended": True, "suspendedReason": "my own pause"}):
        cred = credential(**spec)
        result = reconcile(cred, r=r)
        ready = get_condition(result.status["conditions"], "Ready")
        assert ready is not None
        assert (ready["status"], ready["reason"]) == ("False", "SuspendedByPlatform")
        assert "complaint rate above 0.3%" in ready["message"]
        assert result.status["suspendedBy"] == "Platform"
        assert result.state is not None
        entry = cm.credential_entry(cred, result.state, NOW, r)
        assert (entry["suspended"], entry["suspendedReason"]) == (
            True, "complaint rate above 0.3%")
        assert cm.rendered_ready_reason(cred, r) == "SuspendedByPlatform"
    # A whole namespace; another credential of "mail" and other namespaces are not affected.
    whole = credential("web", "shop", relay_namespace="mail")
    assert cm.platform_suspension(whole, r) == "unpaid invoice"
    assert cm.platform_suspension(credential("other"), r) is None
    assert cm.platform_suspension(credential("app", "elsewhere"), r) is None
    # The tenant's own suspension still works on its own.
    own = credential(suspended=True, suspendedReason="paused")
    result = reconcile(own)
    assert result.status["suspendedBy"] == "Tenant"
    assert cm.rendered_ready_reason(own, relay()) == "Suspended"


def forge(secret: dict[str, Any], annotations: dict[str, str],
          password: str | None = None) -> dict[str, Any]:
    """The application Secret after its tenant edited it."""
    forged = json.loads(json.dumps(secret))
    forged["metadata"]["annotations"] = {**forged["metadata"].get("annotations", {}),
                                         **annotations}
    if password is not None:
        forged["data"]["password"] = base64.b64encode(password.encode()).decode()
    return forged


KNOWN = "a-password-the-tenant-chose"
FORGERY = {
    cs.ANN_PASSWORD_HASH: cs.hash_for_relay(KNOWN),
    cs.ANN_PREVIOUS_HASH: cs.hash_for_relay(KNOWN),
    cs.ANN_PREVIOUS_EXPIRES: "2099-01-01T00:00:00Z",
    cs.ANN_ROTATED_AT: "2099-01-01T00:00:00Z",
    cs.ANN_ROTATION_REQUEST: "later",
}


def test_forged_rotation_annotations_on_the_application_secret_change_nothing() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "1h"},
                      annotations={cs.ANN_ROTATE: "later"})
    first = reconcile(cred)
    assert first.secret is not None and first.state is not None
    forged = forge(first.secret, FORGERY)
    seen = reconcile(cred, first, existing=forged, now=NOW + timedelta(hours=1))
    assert seen.state_secret == first.state_secret  # the store did not move
    assert seen.state is not None
    entry = Credential.model_validate(cm.credential_entry(cred, seen.state, NOW, RELAY))
    assert not entry.check_password(KNOWN, NOW)
    assert seen.status["nextRotationTime"] == "2026-11-28T12:00:00Z"
    # The forged annotations are removed from the copy; the schedule holds.
    assert seen.secret is not None
    assert seen.secret["metadata"]["annotations"] == dict.fromkeys(FORGERY)
    due = reconcile(cred, first, existing=forged, now=NOW + timedelta(hours=24))
    assert due.rotated and [e.reason for e in due.events] == [cs.ROTATION_SCHEDULED]


def test_a_hand_edited_or_deleted_password_is_never_accepted_and_is_reissued() -> None:
    cred = credential(rotation={"overlap": "1h"})
    first = reconcile(cred)
    assert first.secret is not None
    real = values(first.secret)["password"]
    edited = forge(first.secret, {}, password=KNOWN)
    for existing in (edited, None):
        again = cm.reconcile_credential(
            cred, relay=RELAY, namespace_labels=None, attached_domains=ATTACHED,
            existing_secret=existing, stored_state=first.state_secret,
            now=NOW + timedelta(minutes=1))
        assert again.rotated
        assert [e.reason for e in again.events] == [cs.ROTATION_REISSUED]
        assert "did not hold the password issued" in again.events[0].message
        assert again.secret is not None and again.state is not None
        new = values(again.secret)["password"]
        assert new not in (real, KNOWN)
        entry = Credential.model_validate(cm.credential_entry(cred, again.state, NOW, RELAY))
        at = NOW + timedelta(minutes=2)
        assert entry.check_password(new, at) and not entry.check_password(KNOWN, at)
        # Pods that read the Secret before the edit keep working for the overlap window.
        assert entry.check_password(real, at)
        assert not entry.check_password(real, NOW + timedelta(minutes=61))
    # The password issued, untouched: nothing happens.
    assert not reconcile(cred, first).rotated


def test_a_password_that_never_reached_the_application_secret_keeps_the_one_in_use() -> None:
    # The state was written, then the operator stopped before the application Secret was: the
    # application still holds the previous password, which must keep working.
    cred = credential(rotation={"interval": "24h", "overlap": "1h"})
    first = reconcile(cred)
    assert first.secret is not None
    old = values(first.secret)["password"]
    rotated = reconcile(cred, first, now=NOW + timedelta(hours=24))
    resumed = reconcile(cred, rotated, existing=first.secret,
                        now=NOW + timedelta(hours=24, minutes=1))
    assert [e.reason for e in resumed.events] == [cs.ROTATION_REISSUED]
    assert resumed.state is not None and rotated.state is not None
    assert resumed.state.previous_hash == rotated.state.previous_hash
    assert resumed.state.previous_expires == rotated.state.previous_expires
    assert resumed.state.still_previous(old, NOW + timedelta(hours=24, minutes=30))


def test_the_state_of_an_earlier_version_is_adopted_once_and_bounded() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "1h"})
    old = values(reconcile(cred).secret or {})["password"]
    legacy = forge(reconcile(cred).secret or {}, FORGERY, password=old)
    adopted = reconcile(cred, existing=legacy)
    assert not adopted.rotated, "an upgrade must not change every password"
    assert adopted.state is not None and adopted.state.issued(old)
    assert adopted.secret is not None and values(adopted.secret)["password"] == old
    assert adopted.state.rotated_at == NOW  # not 2099: the next rotation is not pushed out
    assert adopted.state.previous_expires == NOW + timedelta(hours=1)  # one overlap at most
    assert adopted.state_secret is not None  # written to the store from now on
    # Garbage in the annotations is dropped, not fatal; a Secret that is not its own, ignored.
    broken = forge(legacy, {cs.ANN_PREVIOUS_HASH: "sha256$zz$not-hex",
                            cs.ANN_ROTATED_AT: "yesterday"})
    state = cs.state_from_legacy_secret(cred, broken, NOW)
    assert state is not None and state.previous_hash is None and state.rotated_at == NOW
    other = credential(rotation={"interval": "24h", "overlap": "1h"})
    assert cm.current_state(other, None, legacy, NOW) is None
    # Once the store exists, the application Secret's annotations are never read again.
    again = reconcile(cred, adopted, existing=forge(legacy, {cs.ANN_ROTATED_AT: "2099-01-01"}))
    assert again.state == adopted.state and not again.rotated


def test_a_damaged_state_secret_is_read_safely() -> None:
    cred = credential(rotation={"interval": "24h", "overlap": "1h"})
    first = reconcile(cred)
    assert first.state_secret is not None
    damaged = json.loads(json.dumps(first.state_secret))
    damaged["data"].update({
        "previousPasswordHash": base64.b64encode(b"not a hash").decode(),
        "previousExpires": base64.b64encode(b"2026-11-28T00:00:00Z").decode(),
        "rotatedAt": "%%%not-base64"})
    state = cs.state_from_store(damaged)
    assert state is not None and state.previous_hash is None
    assert state.rotated_at.year == 1970  # unreadable: rotate now rather than never
    assert reconcile(cred, first, stored=damaged).rotated
    # No usable hash: a new password is issued.
    damaged["data"]["passwordHash"] = base64.b64encode(b"sha256$00$00").decode()
    assert cs.state_from_store(damaged) is None
    assert [e.reason for e in reconcile(cred, first, stored=damaged).events] == [
        cs.ROTATION_INITIAL]
    assert cs.state_from_store({"data": {}}) is None


def test_a_credential_the_render_left_out_says_why_and_keeps_its_password() -> None:
    cred = credential()
    first = reconcile(cred)
    left_out = cm.reconcile_credential(
        cred, relay=RELAY, namespace_labels=None, attached_domains=ATTACHED,
        existing_secret=first.secret, stored_state=first.state_secret, now=NOW,
        render_exclusion=("InvalidConfigEntry", "the relay would refuse this entry: ..."))
    ready = get_condition(left_out.status["conditions"], "Ready")
    assert ready is not None and (ready["status"], ready["reason"]) == (
        "False", "InvalidConfigEntry")
    assert ("Warning", "InvalidConfigEntry") in [(e.type, e.reason) for e in left_out.events]
    assert left_out.state_secret == first.state_secret and not left_out.rotated
