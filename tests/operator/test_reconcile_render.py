"""The relay configuration rendered from resources: what is included, what is left out and why,
Secrets under the size limit, documents the relay parses, and no password anywhere in it."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any

import pytest

from mailplane_operator.reconcile import credential as cm
from mailplane_operator.reconcile import credential_state as cs
from mailplane_operator.reconcile import domain as dm
from mailplane_operator.reconcile import models, ownership, render
from mailplane_operator.reconcile import relay as relay_mod
from mailplane_operator.reconcile.models import Meta, RetentionPolicy, RetentionPolicySpec
from mailplane_relay.config import (
    KIND_CREDENTIALS,
    ConfigError,
    Domain,
    hash_password,
    load_config,
    parse_documents,
    render_document,
)
from tests.operator.reconcile_builders import NOW, credential, domain, relay

ED_PEM = dm.generate_dkim_key("ed25519")
RSA_PEM = dm.generate_dkim_key("rsa-2048")


def dkim_secret(d: Any, pem: str = ED_PEM, algorithm: str = "ed25519") -> dict[str, Any]:
    key = dm.DKIMKeyInfo("mailplane", algorithm, NOW, pem)
    return dm.secret_manifest(d, dm.DKIMState("Stable", "mailplane", {"mailplane": key}, NOW))


def verified(domain_name: str, namespace: str = "mail", pem: str = ED_PEM,
             **kw: Any) -> render.DomainInput:
    d = domain(domain_name, namespace=namespace, verification={"skip": True}, **kw)
    return render.DomainInput(d, dkim_secret(d, pem, "ed25519" if pem == ED_PEM else "rsa-2048"))


def app_secret(c: Any, password: str = "p" * 43) -> dict[str, Any]:
    return cm.secret_manifest(c, password, cm.Endpoint("h", 587, 465))


def state_secret(c: Any, password: str = "p" * 43, **state: Any) -> dict[str, Any]:
    st = cs.CredentialState(hash_password(password), NOW, **state)
    return cs.state_manifest(c, relay(), st)


def with_secret(c: Any, password: str = "p" * 43, **state: Any) -> render.CredentialInput:
    """A credential as the operator leaves it: its application Secret and its state Secret."""
    return render.CredentialInput(c, app_secret(c, password), state_secret(c, password, **state))


def run(r: Any, domains: list[render.DomainInput], creds: list[render.CredentialInput],
        **kw: Any) -> render.RenderResult:
    kw.setdefault("policies", [])
    kw.setdefault("namespace_labels", {})
    return render.render_relay_config(r, domains=domains, credentials=creds, now=NOW, **kw)


def test_a_typical_relay_renders_to_documents_the_relay_accepts() -> None:
    r = relay(allowedNamespaces={"matchLabels": {"smtp": "yes"}})
    creds = [with_secret(credential("orders", "shop", relay_namespace="mail",
                                    senders=("orders@example.com",), ratePerMinute=60),
                         "orders-password-" + "x" * 27),
             with_secret(credential("news", "mail", senders=("news.example.org",)),
                         "news-password-" + "y" * 29)]
    grant = {"allowedNamespaces": {"matchLabels": {"smtp": "yes"}}}
    result = run(r, [verified("example.com", **grant), verified("news.example.org")], creds,
                 namespace_labels={"shop": {"smtp": "yes"}}, validate="documents")
    assert result.excluded == ()
    assert result.domains == ("example.com", "news.example.org")
    assert result.credentials == ("mail/news", "shop/orders")
    config = parse_documents(sorted(result.files.items()))
    assert set(config.credentials) == {"shop.orders", "mail.news"}
    orders = config.credentials["shop.orders"]
    assert orders.check_password("orders-password-" + "x" * 27, NOW)
    assert orders.may_send_as("orders@example.com") and not orders.may_send_as("x@example.com")
    assert orders.rate_per_minute == 60
    assert config.domains["example.com"].dkim is not None
    assert config.domains["example.com"].dkim.selector == "mailplane"
    assert config.domains["example.com"].dkim.algorithm == "ed25519-sha256"
    settings = config.settings
    assert [(lst.name, lst.port, lst.tls) for lst in settings.listeners] == [
        ("submission", 1587, "starttls"), ("submissions", 1465, "implicit")]
    assert settings.tls is not None and settings.tls.cert_file == "/etc/mailplane/tls/tls.crt"
    assert settings.spool.directory == "/var/lib/mailplane/spool"
    assert settings.message_log.path == "/var/lib/mailplane/messagelog.sqlite3"
    assert settings.retention.message_log == 90 * 86400  # the privacy policy's default
    assert settings.shutdown_grace == 25
    # The fast check and the relay's parser agree.
    fast = run(r, [verified("example.com", **grant), verified("news.example.org")], creds,
               namespace_labels={"shop": {"smtp": "yes"}})
    assert fast.config.settings == config.settings
    assert fast.config_hash == result.config_hash
    # The relay reports the same hash for these files (its config_info metric).
    assert config.source_hash == result.config_hash == fast.config.source_hash


def test_config_secrets_are_named_labelled_and_owned() -> None:
    r = relay()
    result = run(r, [verified("example.com")], [with_secret(credential())])
    [secret] = result.secrets
    md = secret["metadata"]
    assert md["name"] == "main-config-0" and md["namespace"] == "mail"
    assert md["labels"][relay_mod.LABEL_RELAY] == "main"
    assert md["labels"][relay_mod.LABEL_COMPONENT] == "config"
    assert md["ownerReferences"][0]["uid"] == r.meta.uid
    decoded = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert decoded == result.files
    assert sorted(decoded) == ["credentials-00.yaml", "domains-00.yaml", "relay.yaml"]


def test_no_password_reaches_the_relay_configuration() -> None:
    password = "S3cret-" + "z" * 36
    result = run(relay(), [verified("example.com")],
                 [with_secret(credential(), password)])
    everything = json.dumps(result.files) + json.dumps(result.secrets)
    assert password not in everything
    assert base64.b64encode(password.encode()).decode() not in everything


def test_left_out_resources_carry_the_reason() -> None:
    r = relay()
    unverified = domain("example.net")  # no status yet: not verified
    pending_key = domain("example.info", verification={"skip": True})
    other_ns = domain("example.biz", namespace="team", relayRef={"name": "main",
                                                                 "namespace": "mail"},
                      verification={"skip": True})
    other_relay = domain("example.xyz", relay_name="other", verification={"skip": True})
    duplicate = domain("example.com", name="second", verification={"skip": True})
    domains = [verified("example.com"), render.DomainInput(unverified, dkim_secret(unverified)),
               render.DomainInput(pending_key, None), render.DomainInput(
                   other_ns, dkim_secret(other_ns)), render.DomainInput(
                   other_relay, dkim_secret(other_relay)), render.DomainInput(
                   duplicate, dkim_secret(duplicate))]
    deleting = credential("gone")
    deleting = type(deleting)(Meta(**{**deleting.meta.__dict__,
                                      "deletion_timestamp": "2026-11-27T11:00:00Z"}),
                              deleting.spec)
    creds = [
        with_secret(credential("ok")),
        with_secret(credential("foreign", "shop", relay_namespace="mail")),
        with_secret(credential("wrong-sender", senders=("example.net",))),
        render.CredentialInput(credential("new"), None),
        with_secret(deleting),
        with_secret(credential("elsewhere", relay_name="other")),
    ]
    result = run(r, domains, creds)
    reasons = {(e.kind, e.key): e.reason for e in result.excluded}
    assert reasons == {
        ("SendingDomain", "mail/example-net"): "NotVerified",
        ("SendingDomain", "mail/example-info"): render.REASON_DKIM_KEY_PENDING,
        ("SendingDomain", "team/example-biz"): "NamespaceNotAllowed",
        ("SendingDomain", "mail/second"): ownership.REASON_DOMAIN_CONFLICT,
        ("SmtpCredential", "shop/foreign"): "NamespaceNotAllowed",
        ("SmtpCredential", "mail/wrong-sender"): "SenderDomainNotAttached",
        ("SmtpCredential", "mail/new"): render.REASON_SECRET_PENDING,
        ("SmtpCredential", "mail/gone"): render.REASON_DELETING,
    }
    assert result.domains == ("example.com",)
    assert result.credentials == ("mail/ok",)
    assert set(result.config.credentials) == {"mail.ok"}
    excluded = result.exclusion("SmtpCredential", "mail/wrong-sender")
    assert excluded is not None and "example.net" in excluded.message


def test_a_deleted_credential_loses_access_in_the_same_render() -> None:
    r = relay()
    both = run(r, [verified("example.com")], [with_secret(credential("a")),
                                              with_secret(credential("b"))])
    one = run(r, [verified("example.com")], [with_secret(credential("a"))])
    assert set(both.config.credentials) == {"mail.a", "mail.b"}
    assert set(one.config.credentials) == {"mail.a"}
    assert one.config_hash != both.config_hash


def test_rotation_overlap_reaches_the_relay_until_it_ends() -> None:
    c = credential()
    item = with_secret(c, "new-" + "n" * 39, previous_hash=hash_password("old-" + "o" * 39),
                       previous_expires=NOW + timedelta(hours=1))
    during = run(relay(), [verified("example.com")], [item], validate="documents")
    entry = during.config.credentials["mail.app"]
    assert entry.check_password("old-" + "o" * 39, NOW + timedelta(minutes=59))
    after = render.render_relay_config(
        relay(), domains=[verified("example.com")], credentials=[item],
        policies=[], namespace_labels={}, now=NOW + timedelta(hours=1))
    assert after.config.credentials["mail.app"].previous_password_hash is None


def test_rendering_is_deterministic_and_the_pod_template_ignores_it() -> None:
    r = relay()
    inputs = ([verified("example.com")], [with_secret(credential("a"))])
    first, second = run(r, *inputs), run(r, *inputs)
    assert first.files == second.files and first.config_hash == second.config_hash
    more = run(r, inputs[0], [*inputs[1], with_secret(credential("b"))])
    assert more.config_hash != first.config_hash
    assert more.secret_names == first.secret_names == ["main-config-0"]
    sts_a = relay_mod.statefulset(r, config_hash=first.config_hash)
    sts_b = relay_mod.statefulset(r, config_hash=more.config_hash)
    assert sts_a["spec"] == sts_b["spec"]
    assert sts_a["metadata"]["annotations"] != sts_b["metadata"]["annotations"]


def test_retention_policies_are_rendered() -> None:
    r = relay(labels={"tier": "prod"})
    policy = RetentionPolicy(
        Meta("short", "mail", "u", 1),
        RetentionPolicySpec.model_validate({"relaySelector": {"matchLabels": {"tier": "prod"}},
                                            "messageLog": "720h", "purgeInterval": "10m"}))
    result = run(r, [], [], policies=[policy])
    assert result.config.settings.retention.message_log == 30 * 86400
    assert result.config.settings.retention.purge_interval == 600
    assert result.retention.policies == ("mail/short",)


def test_dev_paths_and_smarthost_delivery() -> None:
    r = relay(delivery={"mode": "smarthost", "smarthost": {"host": "127.0.0.1", "port": 2525,
                                                           "tls": "none"}})
    paths = render.RuntimePaths(tls_cert="/s/tls/server.crt", tls_key="/s/tls/server.key",
                                spool="/s/spool", message_log="/s/log.sqlite3",
                                listen_address="127.0.0.1", submission_port=2587,
                                submissions_port=2465, http_address="127.0.0.1",
                                http_port=8081, hostname="localhost",
                                extra_settings={"spool": {"fsync": False}})
    result = run(r, [], [], paths=paths, validate="documents")
    s = result.config.settings
    assert [(lst.address, lst.port) for lst in s.listeners] == [("127.0.0.1", 2587),
                                                                ("127.0.0.1", 2465)]
    assert s.spool.directory == "/s/spool" and s.spool.fsync is False
    assert s.delivery.mode == "smarthost" and s.delivery.smarthost is not None
    assert (s.delivery.smarthost.host, s.delivery.smarthost.port) == ("127.0.0.1", 2525)
    assert s.hostname == "localhost" and s.http.port == 8081


def test_documents_are_what_the_contract_renders() -> None:
    spec = {"credentials": [{"username": "a", "passwordHash": "sha256$00$11",
                             "allowedSenders": ["example.com"]}],
            "x": {"pem": RSA_PEM}}
    assert render._document(KIND_CREDENTIALS, spec) == render_document(KIND_CREDENTIALS, spec)
    assert render._document("RelayConfig", spec, name="n") == render_document(
        "RelayConfig", spec, "n")


def test_an_impossible_size_is_an_error_not_a_broken_secret() -> None:
    with pytest.raises(render.RenderError, match="over the 3000-byte Secret limit"):
        run(relay(), [verified("example.com", pem=RSA_PEM)], [], max_secret_bytes=3000)
    many = [with_secret(credential(f"app{i}")) for i in range(400)]
    result = run(relay(), [verified("example.com")], many, max_secret_bytes=9000)
    assert len(result.secrets) == relay_mod.CONFIG_SECRET_SLOTS
    assert 0 < len(result.credentials) < 400  # credentials over the room are left out
    assert {e.reason for e in result.excluded} == {render.REASON_CONFIG_FULL}
    domains = [verified(f"d{i}.example.com", pem=RSA_PEM) for i in range(60)]
    with pytest.raises(render.RenderError, match="more than the 16 the relay pods mount"):
        run(relay(), domains, [], max_secret_bytes=9000)


@pytest.mark.slow
def test_5000_credentials_and_500_domains_fit_in_secrets_under_1_mib() -> None:
    r = relay(allowedNamespaces={})
    domains = []
    for i in range(500):
        d = domain(f"d{i}.example.com", verification={"skip": True}, allowedNamespaces={})
        domains.append(render.DomainInput(d, dkim_secret(d, RSA_PEM, "rsa-2048")))
    creds = []
    for i in range(5000):
        c = credential(f"app-{i}", f"team-{i % 50}", relay_namespace="mail",
                       senders=(f"app{i}@d{i % 500}.example.com",), ratePerMinute=100,
                       dailyQuota=50000)
        creds.append(with_secret(c, f"{i:043d}"))
    started = time.perf_counter()
    result = run(r, domains, creds)
    elapsed = time.perf_counter() - started
    sizes = [len(json.dumps(s, separators=(",", ":"))) for s in result.secrets]
    print(f"\n5,000 credentials + 500 RSA domains: {len(sizes)} Secrets {sizes} bytes, "
          f"rendered in {elapsed:.2f}s")
    assert len(result.secrets) >= 3
    assert all(size < render.MAX_SECRET_BYTES < 1024 * 1024 for size in sizes)
    assert sum(sizes) > 2 * 1024 * 1024  # realistic content, not an empty render
    assert len(result.credentials) == 5000 and len(result.domains) == 500
    # The relay reads exactly these files: parse them the way it does.
    config = parse_documents(sorted(result.files.items()))
    assert len(config.credentials) == 5000 and len(config.domains) == 500
    assert config.credentials["team-7.app-7"].check_password(f"{7:043d}", NOW)


def test_a_credential_naming_a_foreign_secret_is_not_rendered() -> None:
    c = credential("app", senders=("example.com",), secretName="shared")
    foreign = app_secret(credential("owner", senders=("example.com",)))
    foreign["metadata"]["name"] = "shared"
    result = run(relay(), [verified("example.com")], [render.CredentialInput(c, foreign)])
    assert result.credentials == ()
    exclusion = result.exclusion("SmtpCredential", "mail/app")
    assert exclusion is not None and exclusion.reason == cm.REASON_SECRET_CONFLICT


def test_one_bad_entry_is_left_out_alone_and_everything_else_renders() -> None:
    r = relay(allowedNamespaces={}, tenancy={"verificationSkipNamespaces": {}})
    # Tenant B damages the state annotation of its own DKIM Secret and the key itself; a
    # credential entry the relay would refuse (a model that drifted from the relay's).
    ref = {"relayRef": {"name": "main", "namespace": "mail"}}
    broken = verified("b.example", namespace="tenant-b", **ref)
    dkim = json.loads(json.dumps(broken.dkim_secret))
    state = json.loads(dkim["metadata"]["annotations"][dm.ANN_DKIM_STATE])
    for info in state["keys"].values():
        info["algorithm"] = "rot13"
    dkim["metadata"]["annotations"][dm.ANN_DKIM_STATE] = json.dumps(state)
    huge = verified("huge.example", namespace="tenant-b", **ref)
    big = dkim_secret(huge.domain, "-----BEGIN PRIVATE KEY-----\n" + "A" * 200_000)
    drifted = credential("drift", "tenant-a", relay_namespace="mail", senders=("a.example",))
    bad_spec = drifted.spec.model_copy(update={"rate_per_minute": 0})
    drifted = type(drifted)(drifted.meta, bad_spec)
    on_b = credential("uses-b", "tenant-b", relay_namespace="mail", senders=("b.example",))
    good = credential("app", "tenant-a", relay_namespace="mail", senders=("a.example",))
    result = run(r, [verified("a.example", namespace="tenant-a", **ref),
                     render.DomainInput(broken.domain, dkim),
                     render.DomainInput(huge.domain, big)],
                 [with_secret(good), with_secret(drifted), with_secret(on_b)],
                 validate="documents")
    assert result.domains == ("a.example",)
    assert result.credentials == ("tenant-a/app",)
    reasons = {(e.kind, e.key): e.reason for e in result.excluded}
    assert reasons == {
        ("SendingDomain", "tenant-b/b-example"): "DKIMSecretUnreadable",
        ("SendingDomain", "tenant-b/huge-example"): "DKIMSecretUnreadable",
        ("SmtpCredential", "tenant-a/drift"): "InvalidConfigEntry",
        ("SmtpCredential", "tenant-b/uses-b"): "SenderDomainNotAttached",
    }
    messages = {e.key: e.message for e in result.excluded}
    assert "b-example-dkim" in messages["tenant-b/b-example"]
    # An entry too large for its share of the configuration is refused on its own.
    oversize = {"name": "x.example", "dkim": {"selector": "s", "algorithm": "rsa-sha256",
                                              "privateKey": "A" * 70_000}}
    problem = render.entry_problem(Domain, oversize)
    assert problem is not None and "over the 65536-byte limit" in problem
    assert render.entry_problem(Domain, {**oversize, "dkim": {**oversize["dkim"],
                                                              "privateKey": "A"}}) is None
    assert "ratePerMinute" in messages["tenant-a/drift"]
    assert "AAAA" not in json.dumps(messages) and "sha256$" not in json.dumps(messages)


def test_two_credentials_with_one_username_keep_the_first() -> None:
    first = credential("app", "team", relay_namespace="mail")
    second = credential("app", "team", relay_namespace="mail")
    second = type(second)(second.meta, second.spec.model_copy(
        update={"secret_name": "other"}))
    result = run(relay(allowedNamespaces={}), [verified("example.com", allowedNamespaces={})],
                 [with_secret(first), with_secret(second)])
    assert result.credentials == ("team/app",)
    [dup] = result.excluded
    assert dup.reason == "DuplicateUsername" and "already used" in dup.message


def test_the_relay_status_lists_what_is_left_out_bounded() -> None:
    r = relay()
    entries = [{"kind": "SmtpCredential", "name": f"ns/c{i}", "reason": "SecretPending",
                "message": "x" * 1000} for i in range(80)]
    status = relay_mod.relay_status(
        r, statefulset_status=None, config_hash="h", config_secrets=[], domains=[],
        credentials=0, excluded=80, retention_policies=[], now=NOW, excluded_entries=entries)
    assert len(status["excluded"]) == 50 and len(status["excluded"][0]["message"]) == 300
    complete = next(c for c in status["conditions"] if c["type"] == "ConfigComplete")
    assert (complete["status"], complete["reason"]) == ("False", "EntriesExcluded")
    assert "80 left out of the configuration (80 SecretPending)" in complete["message"]
    clean = relay_mod.relay_status(
        r, statefulset_status=None, config_hash="h", config_secrets=[], domains=[],
        credentials=0, excluded=0, retention_policies=[], now=NOW)
    assert clean["excluded"] == []
    assert next(c for c in clean["conditions"] if c["type"] == "ConfigComplete")[
        "status"] == "True"


def test_ingress_abuse_settings_reach_the_relay_only_when_set() -> None:
    plain = parse_documents(sorted(run(relay(), [], []).files.items())).settings.limits
    assert (plain.max_sessions_per_address, plain.bare_newline) == (50, "normalize")
    r = relay(limits={"maxSessionsPerAddress": 500, "bareNewline": "reject"})
    limits = parse_documents(sorted(run(r, [], [], validate="documents").files.items())
                             ).settings.limits
    assert (limits.max_sessions_per_address, limits.bare_newline) == (500, "reject")


def test_one_namespace_filling_the_config_slots_loses_only_its_own_entries() -> None:
    """A tenant with ``edit`` creates as many large credentials as it likes (100 long senders
    each): the configuration outgrows the Secrets the relay mounts. That must leave out the
    entries of the namespace taking the room, not stop the render of every tenant (their
    rotations, revocations and suspensions would never reach the relay)."""
    r = relay(allowedNamespaces={}, tenancy={"verificationSkipNamespaces": {}})
    grant = {"allowedNamespaces": {}}
    long_domain = ".".join(["a" * 60] * 3) + ".example"
    honest = [with_secret(credential(f"app{i}", f"team-a{i}", relay_namespace="mail",
                                     senders=(f"app{i}@example.com",))) for i in range(5)]
    platform = with_secret(credential("alerts", "mail", senders=("example.com",)))
    senders = tuple(f"{i:02d}{'x' * 62}@{long_domain}" for i in range(100))
    flood = [with_secret(credential(f"c{i:03d}", "a-flood", relay_namespace="mail",
                                    senders=senders)) for i in range(80)]
    domains = [verified("example.com", **grant), verified(long_domain, "a-flood", name="long",
                                    relayRef={"name": "main", "namespace": "mail"}, **grant)]
    # The flooding namespace sorts first by name: leaving out by name would hit the others.
    result = run(r, domains, [*honest, platform, *flood], max_secret_bytes=120_000)
    assert len(result.secrets) <= relay_mod.CONFIG_SECRET_SLOTS
    assert "mail/alerts" in result.credentials
    assert all(f"team-a{i}/app{i}" in result.credentials for i in range(5))
    full = [e for e in result.excluded if e.reason == render.REASON_CONFIG_FULL]
    assert full and all(e.key.startswith("a-flood/") for e in full)
    assert render.REASON_CONFIG_FULL in render.RENDER_REASONS
    assert "a-flood" in full[0].message and "spec.allowedSenders" in full[0].message
    # Some of a-flood's credentials still fit; what is rendered is what the relay reads.
    assert any(k.startswith("a-flood/") for k in result.credentials)
    config = parse_documents(sorted(result.files.items()))
    assert set(config.credentials) == {k.replace("/", ".") for k in result.credentials}


def test_the_mx_tls_policy_and_plaintext_auth_consent_reach_the_relay() -> None:
    r = relay(delivery={"mxTls": {"level": "encrypt", "policies": [
        {"domains": ["*.bank.example"], "level": "verify"}]}})
    delivery = run(r, [], []).config.settings.delivery
    assert delivery.tls_level("www.bank.example") == "verify"
    assert delivery.tls_level("example.org") == "encrypt"
    assert run(relay(), [], []).config.settings.delivery.tls_level("example.org") == "may"
    assert run(relay(), [], []).config.settings.delivery.mta_sts.enabled
    off = relay(delivery={"mtaSts": {"enabled": False}})
    assert not run(off, [], []).config.settings.delivery.mta_sts.enabled
    sh = relay(delivery={"mode": "smarthost", "smarthost": {
        "host": "10.0.0.5", "tls": "none", "username": "u", "passwordSecretRef": {"name": "s"},
        "allowPlaintextAuth": True}})
    smarthost = run(sh, [], []).config.settings.delivery.smarthost
    assert smarthost is not None and smarthost.allow_plaintext_auth


def test_the_delay_warning_reaches_the_relay() -> None:
    assert run(relay(), [], []).config.settings.queue.delay_warning == 4 * 3600
    off = relay(queue={"delayWarning": "0s"})
    assert run(off, [], []).config.settings.queue.delay_warning == 0
    later = relay(queue={"delayWarning": "12h"})
    assert run(later, [], []).config.settings.queue.delay_warning == 12 * 3600


def test_the_intake_and_abuse_settings_reach_the_relay_and_the_key_stays_in_its_secret() -> None:
    r = relay(intake={"domain": "bounces.example.com", "localPart": "rp",
                      "keySecretRef": {"name": "main-intake-key"}, "maxMessageSize": 65536},
              abuse={"complaintRate": 0.002, "bounceRate": 0.08, "window": "30m",
                     "minRecipients": 200, "minComplaints": 5})
    result = run(r, [verified("example.com")], [], validate="documents")
    settings = parse_documents(sorted(result.files.items())).settings
    assert settings.intake is not None
    assert (settings.intake.domain, settings.intake.local_part, settings.intake.key_file,
            settings.intake.port, settings.intake.max_message_size) == (
        "bounces.example.com", "rp", "/etc/mailplane/intake/key", 1025, 65536)
    assert (settings.abuse.complaint_rate, settings.abuse.bounce_rate, settings.abuse.window,
            settings.abuse.min_recipients, settings.abuse.pause_senders,
            settings.abuse.min_complaints) == (0.002, 0.08, 1800, 200, True, 5)
    # Defaults: SES-style rates; no intake unless asked for.
    plain = parse_documents(sorted(run(relay(), [], [], validate="documents")
                                   .files.items())).settings
    assert plain.intake is None
    assert (plain.abuse.bounce_rate, plain.abuse.complaint_rate) == (0.05, 0.001)
    off = relay(intake={"domain": "bounces.example.com", "enabled": False,
                        "keySecretRef": {"name": "k"}})
    assert run(off, [], []).config.settings.intake is None


def test_the_webhook_settings_reach_the_relay_and_the_secret_stays_in_its_secret() -> None:
    r = relay(webhooks={"url": "https://hooks.platform.example/mail",
                        "secretRef": {"name": "main-webhook", "previousKey": "old"},
                        "events": ["bounced", "complained"],
                        "caSecretRef": {"name": "private-ca"},
                        "allowPrivateNetworks": ["10.96.0.0/12"], "timeout": "5s",
                        "concurrency": 4, "maxAge": "12h"})
    result = run(r, [verified("example.com")], [], validate="documents")
    settings = parse_documents(sorted(result.files.items())).settings.webhooks
    assert settings.endpoint is not None
    assert settings.endpoint.url == "https://hooks.platform.example/mail"
    assert settings.endpoint.secret_files == ("/etc/mailplane/webhook/secret",
                                              "/etc/mailplane/webhook/previous")
    assert settings.endpoint.secrets is None  # never rendered into the configuration
    assert settings.endpoint.events == ("bounced", "complained")
    assert (settings.ca_file, settings.allow_private_networks,
            settings.credential_private_networks, settings.timeout, settings.concurrency,
            settings.max_age) == ("/etc/mailplane/webhook-ca/ca.crt", ("10.96.0.0/12",), (),
                                  5.0, 4, 43200.0)
    # Rules without a platform endpoint (for the credentials' endpoints); none by default.
    rules = run(relay(webhooks={"credentialPrivateNetworks": ["10.0.0.0/8"]}), [], [])
    assert rules.config.settings.webhooks.endpoint is None
    assert rules.config.settings.webhooks.credential_private_networks == ("10.0.0.0/8",)
    assert run(relay(), [], []).config.settings.webhooks.endpoint is None


def test_a_configuration_in_several_secrets_is_used_only_with_every_part_of_one_render(
        tmp_path: Any) -> None:
    """What a projected volume may hold while kubelet syncs its Secrets one by one: parts of two
    renders. The relay refuses that mix (and keeps what it runs) until all parts match."""
    def render_with(n: int) -> dict[str, str]:
        creds = [with_secret(credential(f"app{i}")) for i in range(n)]
        result = run(relay(), [verified("example.com")], creds, max_secret_bytes=9000)
        assert len(result.secrets) > 2 and len(result.credentials) == n
        return result.files

    def write(files: dict[str, str]) -> None:
        for old in tmp_path.glob("*.yaml"):
            old.unlink()
        for name, text in files.items():
            (tmp_path / name).write_text(text)

    before, after = render_with(40), render_with(39)  # one credential revoked
    write(before)
    assert len(load_config(tmp_path).credentials) == 40
    for name in sorted(set(before) | set(after)):  # one Secret's files synced, not the others
        mixed = dict(before)
        if name in after:
            mixed[name] = after[name]
        else:
            del mixed[name]
        if mixed == before:
            continue
        write(mixed)
        with pytest.raises(ConfigError, match="not all of one version"):
            load_config(tmp_path)
    write(after)
    assert len(load_config(tmp_path).credentials) == 39


def test_the_erasure_key_is_mounted_and_named_never_rendered() -> None:
    r = relay(store={"erasureKeySecretRef": {"name": "erasure", "previousKey": "old"}})
    settings = run(r, [], [], validate="documents").config.settings.store
    assert settings.erasure_key_files == ("/etc/mailplane/erasure-key/key",
                                          "/etc/mailplane/erasure-key/previous")
    pod = relay_mod.statefulset(r, config_hash="h")["spec"]["template"]["spec"]
    assert {"name": "erasure-key", "secret": {"secretName": "erasure", "items": [
        {"key": "key", "path": "key"}, {"key": "old", "path": "previous"}]}} in pod["volumes"]
    assert {"name": "erasure-key", "mountPath": "/etc/mailplane/erasure-key",
            "readOnly": True} in pod["containers"][0]["volumeMounts"]
    assert run(relay(), [], []).config.settings.store.erasure_key_files == ()


def test_the_client_address_reaches_received_headers_only_when_the_relay_asks() -> None:
    assert run(relay(), [], []).config.settings.trace_client_address is False
    assert run(relay(traceClientAddress=True), [], []).config.settings.trace_client_address


HOOK_SECRET = "0123456789abcdef0123456789abcdef"


def hook_secret(namespace: str, name: str = "hook", *, labelled: bool = True,
                **data: str) -> dict[str, Any]:
    labels = {cm.LABEL_WEBHOOK_SECRET: "true"} if labelled else {}
    return {"metadata": {"name": name, "namespace": namespace, "labels": labels},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}}


def test_a_credentials_webhook_is_rendered_from_its_own_namespaces_secret() -> None:
    hook = {"url": "https://hooks.shop.example/mail?token=t0k3n",
            "secretRef": {"name": "hook", "previousKey": "old"}, "events": ["bounced"]}
    c = credential("orders", "mail", webhook=hook)
    item = with_secret(c)
    ok = render.CredentialInput(c, item.secret, item.state, hook_secret(
        "mail", secret=HOOK_SECRET, old=HOOK_SECRET[::-1]))
    result = run(relay(), [verified("example.com")], [ok], validate="documents")
    [entry] = parse_documents(sorted(result.files.items())).settings.credentials
    assert entry.webhook is not None
    assert entry.webhook.url == hook["url"]
    assert entry.webhook.secrets == (HOOK_SECRET, HOOK_SECRET[::-1])
    assert entry.webhook.events == ("bounced",)

    # A Secret that is missing, unlabelled, short or without the key: the credential still
    # sends, without a webhook, and the problem names the fix (never the value).
    for secret, problem in [
        (None, "Secret mail/hook (spec.webhook.secretRef) does not exist; create it"),
        (hook_secret("mail", secret=HOOK_SECRET, old=HOOK_SECRET, labelled=False),
         f"lacks the label {cm.LABEL_WEBHOOK_SECRET}=true"),
        (hook_secret("mail", secret="short", old=HOOK_SECRET), "fewer than 16 bytes"),
        (hook_secret("mail", secret=HOOK_SECRET), "has no key 'old'"),
    ]:
        assert cm.webhook_secrets(c, secret)[1] is not None
        assert problem in str(cm.webhook_secrets(c, secret)[1])
        assert HOOK_SECRET not in str(cm.webhook_secrets(c, secret)[1])
        result = run(relay(), [verified("example.com")],
                     [render.CredentialInput(c, item.secret, item.state, secret)])
        assert result.credentials == ("mail/orders",)
        [entry] = parse_documents(sorted(result.files.items())).settings.credentials
        assert entry.webhook is None


def test_a_credential_webhook_url_must_be_https_without_credentials_or_fragment() -> None:
    for url in ("http://hooks.example/x", "https://user:pw@hooks.example/x",
                "https://hooks.example/x#frag", "https://hooks.example?token=x"):
        with pytest.raises(models.SpecError, match=r"spec\.webhook\.url"):
            credential("orders", "shop", webhook={"url": url, "secretRef": {"name": "hook"}})
    # A reference names no namespace: the Secret is always the credential's own.
    with pytest.raises(models.SpecError, match="namespace"):
        credential("orders", "shop", webhook={"url": "https://hooks.example/x",
                                              "secretRef": {"name": "h", "namespace": "mail"}})


def test_a_webhook_secret_too_large_for_the_relay_configuration_is_refused_by_name() -> None:
    # A tenant's signing Secret is copied into the relay's configuration Secret: a large value
    # must not take the tenant's share of it, nor leave the Webhook condition saying the events
    # are signed while the render drops the webhook (its entry over MAX_ENTRY_BYTES).
    hook = {"url": "https://hooks.shop.example/mail", "secretRef": {"name": "hook"}}
    c = credential("orders", "mail", webhook=hook)
    big = "a" * (cm.MAX_WEBHOOK_SECRET_BYTES + 1)
    secrets, problem = cm.webhook_secrets(c, hook_secret("mail", secret=big))
    assert secrets == []
    assert problem is not None
    assert f"more than {cm.MAX_WEBHOOK_SECRET_BYTES} bytes" in problem
    assert "openssl rand -hex 32" in problem
    assert big not in problem
    fits = "a" * cm.MAX_WEBHOOK_SECRET_BYTES
    assert cm.webhook_secrets(c, hook_secret("mail", secret=fits)) == ([fits], None)
    # The largest webhook a credential can carry (two secrets at the limit, the longest URL)
    # leaves its entry far under the relay configuration's per-entry limit.
    longest = "https://h.example/" + "p" * (2048 - len("https://h.example/"))
    c2 = credential("orders", "mail", webhook={
        "url": longest, "secretRef": {"name": "hook", "previousKey": "old"}})
    item = with_secret(c2)
    result = run(relay(), [verified("example.com")], [render.CredentialInput(
        c2, item.secret, item.state, hook_secret("mail", secret=fits, old=fits))])
    [entry] = parse_documents(sorted(result.files.items())).settings.credentials
    assert entry.webhook is not None
    assert entry.webhook.secrets == (fits, fits)
