"""The relay configuration contract: defaults, durations, merging, round trip, clear errors."""

from __future__ import annotations

import re
import typing
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel, ValidationError

from mailplane_relay.config import (
    API_VERSION,
    ConfigError,
    Credential,
    RelaySettings,
    config_fingerprint,
    dump_settings,
    format_validation_error,
    hash_password,
    load_config,
    parse_documents,
    parse_duration,
    render_document,
    verify_password,
)

BASE = {"tls": {"certFile": "/tls/tls.crt", "keyFile": "/tls/tls.key"}}


def doc(kind: str, spec: dict[str, object]) -> tuple[str, str]:
    return (f"{kind}.yaml", render_document(kind, spec))


def cred(username: str = "app", **extra: object) -> dict[str, object]:
    return {
        "username": username,
        "passwordHash": hash_password("secret-" + username),
        "allowedSenders": ["example.com"],
        **extra,
    }


def test_defaults_are_the_documented_production_defaults() -> None:
    cfg = parse_documents([doc("RelayConfig", BASE)])
    s = cfg.settings
    assert [(lst.port, lst.tls) for lst in s.listeners] == [(587, "starttls"), (465, "implicit")]
    assert s.queue.max_lifetime == 5 * 86400
    assert s.retention.message_log == 90 * 86400
    assert s.tls is not None and s.tls.min_version == "1.2"
    assert s.trusted_networks == ()
    assert s.delivery.mode == "mx" and s.delivery.mx_port == 25
    assert s.spool.fsync is True


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("250ms", 0.25), ("90s", 90), ("15m", 900), ("6h", 21600), ("5d", 432000), (12, 12.0)],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["5x", "-1s", "", True, "1 d"])
def test_bad_durations_say_how_to_write_one(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


def test_round_trip_through_the_document_form() -> None:
    spec = {
        **BASE,
        "queue": {"retryInitial": "30s", "maxLifetime": "2d"},
        "domains": [{"name": "example.com"}],
        "credentials": [cred()],
    }
    first = parse_documents([doc("RelayConfig", spec)])
    again = parse_documents([doc("RelayConfig", dump_settings(first.settings))])
    assert again.settings == first.settings
    assert isinstance(again.settings, RelaySettings)


def test_directory_merges_chunks_and_skips_kubernetes_links(tmp_path: Path) -> None:
    (tmp_path / "00-relay.yaml").write_text(render_document("RelayConfig", BASE))
    (tmp_path / "credentials-000.yaml").write_text(
        render_document("RelayCredentials", {"credentials": [cred("a"), cred("b")]})
    )
    (tmp_path / "domains-000.yaml").write_text(
        render_document("RelayDomains", {"domains": [{"name": "Example.com."}]})
    )
    hidden = tmp_path / "..2026_11_27"  # what a mounted Secret looks like
    hidden.mkdir()
    (hidden / "00-relay.yaml").write_text(render_document("RelayConfig", BASE))
    (tmp_path / ".hidden.yaml").write_text("not: [valid")
    cfg = load_config(tmp_path)
    assert sorted(cfg.credentials) == ["a", "b"]
    assert list(cfg.domains) == ["example.com"]
    before = config_fingerprint(tmp_path)
    (tmp_path / "credentials-000.yaml").write_text(
        render_document("RelayCredentials", {"credentials": [cred("a")]})
    )
    assert config_fingerprint(tmp_path) != before
    assert load_config(tmp_path).source_hash != cfg.source_hash


@pytest.mark.parametrize(
    ("docs", "message"),
    [
        ([("x.yaml", "apiVersion: v1\nkind: RelayConfig\n")],
         "this relay reads 'mailplane.io/v1alpha1'"),
        ([("x.yaml", f"apiVersion: {API_VERSION}\nkind: Nope\n")], "kind 'Nope' is not one of"),
        ([doc("RelayCredentials", {"credentials": []})], "no RelayConfig document"),
        ([doc("RelayConfig", BASE), doc("RelayConfig", BASE)], "a second RelayConfig"),
        ([doc("RelayConfig", {})], "tls is missing"),
        ([doc("RelayConfig", {**BASE, "queue": {"retryInitial": "2h", "retryMax": "1h"}})],
         "retryMax"),
        ([doc("RelayConfig", {**BASE, "delivery": {"mode": "smarthost"}})],
         "delivery.smarthost is missing"),
        ([doc("RelayConfig", {**BASE, "trustedNetworks": ["everyone"]})], "'everyone'"),
        ([doc("RelayConfig", {**BASE, "listner": []})], "listner: Extra inputs"),
        ([doc("RelayConfig", {**BASE, "credentials": [cred(), cred()]})], "appears twice"),
        ([doc("RelayConfig", {**BASE, "credentials": [cred(passwordHash="plain")]})],
         "mailplane hash-password"),
        ([doc("RelayConfig", {**BASE, "domains": [{"name": "not a domain"}]})],
         "is not a domain name"),
        ([("x.yaml", "apiVersion: [")], "not valid YAML"),
        ([doc("RelayConfig", {**BASE, "retention": {"messageLog": "91d"}})],
         "retention.messageLog: 91 days is outside (0, 90d]"),
        ([doc("RelayConfig", {**BASE, "retention": {"suppression": "366d"}})],
         "retention.suppression: 366 days is outside (0, 365d]"),
        ([doc("RelayConfig", {**BASE, "store": {"backend": "postgresql"}})],
         "store.dsnFile is not set"),
        ([doc("RelayConfig", {**BASE, "listeners": [
            {"name": "http", "port": 2525, "tls": "starttls"}]})],
         "the listener name 'http' names the port http.port sets"),
        ([doc("RelayConfig", {**BASE, "listeners": [
            {"name": "admin", "port": 2525, "tls": "starttls"}]})],
         "the listener name 'admin' names the port admin.port sets"),
    ],
)
def test_bad_configuration_names_the_problem(docs: list[tuple[str, str]], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_documents(docs)


def test_missing_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such configuration"):
        load_config(tmp_path / "nope")


@pytest.mark.parametrize("scheme", ["sha256", "scrypt"])
def test_password_hashes(scheme: str) -> None:
    encoded = hash_password("correct horse", scheme=scheme)
    assert encoded.startswith(scheme + "$")
    assert "correct horse" not in encoded
    assert verify_password("correct horse", encoded)
    assert not verify_password("correct hors", encoded)
    assert not verify_password("x", "sha256$zz$00")


def test_rotation_overlap_accepts_the_previous_password_until_it_expires() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    c = Credential.model_validate(
        cred(
            passwordHash=hash_password("new"),
            previousPasswordHash=hash_password("old"),
            previousExpires=(now + timedelta(hours=1)).isoformat(),
        )
    )
    assert c.check_password("new", now) and c.check_password("old", now)
    later = now + timedelta(hours=2)
    assert c.check_password("new", later) and not c.check_password("old", later)
    assert "sha256$" not in repr(c)  # hashes stay out of reprs and so out of logs


def test_sender_scope_by_domain_and_address() -> None:
    c = Credential.model_validate(cred(allowedSenders=["example.com", "noreply@example.org"]))
    assert c.may_send_as("Anyone@Example.com")
    assert c.may_send_as("noreply@example.org")
    assert not c.may_send_as("other@example.org")
    assert not c.may_send_as("x@sub.example.com")


def test_trusted_networks() -> None:
    spec = {**BASE, "trustedNetworks": ["10.1.0.0/16", "::1/128"]}
    cfg = parse_documents([doc("RelayConfig", spec)])
    assert cfg.is_trusted("10.1.2.3") and cfg.is_trusted("::1")
    assert not cfg.is_trusted("10.2.0.1") and not cfg.is_trusted("garbage")


def _field_names(model: type[BaseModel]) -> set[str]:
    names: set[str] = set()
    for name, field in model.model_fields.items():
        names.add(field.alias or name)
        for arg in (*typing.get_args(field.annotation), field.annotation):
            inner = typing.get_args(arg) or (arg,)
            for candidate in inner:
                if isinstance(candidate, type) and issubclass(candidate, BaseModel):
                    names |= _field_names(candidate)
    return names


def test_every_field_is_documented() -> None:
    text = (Path(__file__).parents[2] / "docs" / "relay-config.md").read_text()
    missing = sorted(
        n for n in _field_names(RelaySettings) if not re.search(rf"[`.]{n}[`.\[]", text)
    )
    assert not missing, f"document these fields in docs/relay-config.md: {missing}"


def test_validation_errors_never_quote_the_value() -> None:
    """A bad private key or hash must not travel into Events, status or logs via the error."""
    spec = {**BASE, "domains": [{"name": "example.com",
                                 "dkim": {"selector": "s1", "privateKey": ["SECRET-MARKER"]}}]}
    with pytest.raises(ValidationError) as raw:
        RelaySettings.model_validate(spec)
    assert "SECRET-MARKER" in str(raw.value)  # pydantic's own text would leak it...
    text = format_validation_error("relay configuration", raw.value)
    assert "SECRET-MARKER" not in text  # ...ours names the field only
    assert "domains.0.dkim.privateKey" in text or "domains.0.dkim.private_key" in text
    with pytest.raises(ConfigError) as err:
        parse_documents([doc("RelayConfig", spec)])
    assert "SECRET-MARKER" not in str(err.value)


def test_a_yaml_error_gives_the_position_not_the_line() -> None:
    text = f"apiVersion: {API_VERSION}\nkind: RelayConfig\nspec:\n  x: privateKey: SECRET-MARKER\n"
    with pytest.raises(ConfigError, match=r"not valid YAML at line 4, column \d+") as err:
        parse_documents([("relay.yaml", text)])
    assert "SECRET-MARKER" not in str(err.value)


def test_additional_dkim_pairs_two_algorithms_under_two_selectors() -> None:
    from mailplane_relay.config import Domain

    key = {"selector": "s1", "algorithm": "rsa-sha256", "privateKey": "x"}
    ok = Domain.model_validate({"name": "example.com", "dkim": key, "additionalDkim": [
        {"selector": "s2", "algorithm": "ed25519-sha256", "privateKey": "y"}]})
    assert [k.selector for k in ok.dkim_keys] == ["s1", "s2"]
    with pytest.raises(ValueError, match="dual signing pairs two algorithms"):
        Domain.model_validate({"name": "example.com", "dkim": key, "additionalDkim": [
            {**key, "selector": "s2"}]})
    with pytest.raises(ValueError, match="each key needs its own selector"):
        Domain.model_validate({"name": "example.com", "dkim": key, "additionalDkim": [
            {**key, "algorithm": "ed25519-sha256"}]})
    with pytest.raises(ValueError, match="additionalDkim is set but dkim is not"):
        Domain.model_validate({"name": "example.com", "additionalDkim": [key]})
