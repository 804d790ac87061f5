"""Outbound TLS policy toward MX hosts (delivery.mxTls, like Postfix's smtp_tls_policy_maps):
``encrypt`` and ``verify`` never fall back to clear text, ``verify`` checks the certificate
against the MX host name, ``may`` keeps the opportunistic fallback. Real sinks on loopback,
MX records from a real DNS server on loopback."""

from __future__ import annotations

from typing import Any

import pytest

from mailplane_relay.config import DeliverySettings, SmarthostSettings
from tests.helpers.dns import LoopbackDNS
from tests.helpers.sink import Sink
from tests.relay.test_delivery_flows import make_config, mx_mode

SLOW_RETRY = {"retryInitial": 30, "retryMax": 30}




def policy(level: str, sink: Sink | None = None, **extra: Any) -> dict[str, Any]:
    rules = [{"domains": ["example.net", "*.example.net"], "level": level}]
    return {"mxTls": {"policies": rules, **({"caFile": sink.ca_file} if sink else {}), **extra}}


def mx(dns: LoopbackDNS, host: str) -> None:
    dns.add_mx("example.net", host)
    dns.add_a(host, "127.0.0.1")


@pytest.mark.parametrize("level", ["encrypt", "verify"])
async def test_a_required_tls_level_defers_an_mx_without_starttls(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS, level: str) -> None:
    sink = await smtp_sink()  # no STARTTLS offered
    mx(dns_server, "sink.test")
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy(level, sink)),
                                queue=SLOW_RETRY))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["status"] == "deferred"
    assert event["response"].startswith("451 4.7.4"), event
    assert f"TLS policy for this destination is {level}" in event["response"]
    assert sink.messages == []  # never in clear text
    # A domain without a rule keeps the opportunistic default: delivered in clear text.
    dns_server.add_mx("example.org", "sink.test")
    await r.done(await r.send(["user@example.org"]))
    assert [m.rcpt_tos for m in sink.messages] == [["user@example.org"]]


@pytest.mark.parametrize("level", ["encrypt", "verify"])
async def test_a_required_tls_level_never_falls_back_after_a_failed_handshake(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS, level: str) -> None:
    sink = await smtp_sink(starttls=True, broken_tls=True)
    mx(dns_server, "sink.test")
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy(level, sink)),
                                queue=SLOW_RETRY))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.5"), event
    assert sink.messages == [] and sink.connections == 1  # no second, clear-text session


async def test_verify_delivers_over_tls_valid_for_the_mx_name(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True)  # certificate for sink.test from the sink's CA
    mx(dns_server, "sink.test")
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy("verify", sink))))
    msg = await r.send(["user@example.net"])
    await r.done(msg)
    assert sink.messages[0].tls
    [event] = await r.events(msg)
    assert event["status"] == "delivered" and event["remote"] == f"sink.test:{sink.port} tls"


async def test_verify_defers_a_certificate_for_another_name_or_from_an_unknown_ca(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True)
    mx(dns_server, "mx.example.net")  # the certificate names sink.test, not this host
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy("verify", sink)),
                                queue=SLOW_RETRY))
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.5") and "CERTIFICATE_VERIFY_FAILED" in \
        event["response"], event
    assert sink.messages == []


async def test_encrypt_takes_any_certificate_but_only_over_tls(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True)
    mx(dns_server, "mx.example.net")  # a name the certificate does not hold, an unknown CA
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy("encrypt"))))
    await r.done(await r.send(["user@example.net"]))
    assert len(sink.messages) == 1 and sink.messages[0].tls


async def test_none_never_starts_tls(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink(starttls=True)
    mx(dns_server, "sink.test")
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy("none"))))
    await r.done(await r.send(["user@example.net"]))
    assert not sink.messages[0].tls


def test_levels_resolve_by_first_matching_rule_then_the_default() -> None:
    d = DeliverySettings.model_validate({"mxTls": {"level": "encrypt", "policies": [
        {"domains": ["bank.example"], "level": "verify"},
        {"domains": ["*.example"], "level": "none"}]}})
    assert d.tls_level("Bank.Example.") == "verify"
    assert d.tls_level("shop.example") == "none"
    assert d.tls_level("example.org") == "encrypt"
    assert DeliverySettings.model_validate({}).tls_level("x.org") == "may"
    assert DeliverySettings.model_validate({"opportunisticTls": False}).tls_level("x") == "none"
    with pytest.raises(ValueError, match="level"):
        DeliverySettings.model_validate({"mxTls": {"policies": [
            {"domains": ["a.example"], "level": "dane"}]}})


def test_smarthost_auth_without_tls_is_refused_unless_allowed() -> None:
    base = {"host": "smtp.example.net", "username": "u", "passwordFile": "/p", "tls": "none"}
    with pytest.raises(ValueError, match=r"delivery\.smarthost\.allowPlaintextAuth: true"):
        SmarthostSettings.model_validate(base)
    assert SmarthostSettings.model_validate({**base, "allowPlaintextAuth": True}).username == "u"
    assert SmarthostSettings.model_validate({**base, "tls": "starttls"}).tls == "starttls"
    assert SmarthostSettings.model_validate({"host": "h", "tls": "none"}).username is None


async def test_a_pooled_clear_text_connection_never_carries_mail_that_requires_tls(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    sink = await smtp_sink()  # no STARTTLS; example.org and example.net share this MX host
    mx(dns_server, "sink.test")
    dns_server.add_mx("example.org", "sink.test")
    r = await relay(make_config(mx_mode(dns_server, sink.port, **policy("encrypt")),
                                queue=SLOW_RETRY))
    await r.done(await r.send(["user@example.org"]))  # leaves an idle clear-text connection
    assert [m.tls for m in sink.messages] == [False]
    msg = await r.send(["user@example.net"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.4"), event
    assert [m.rcpt_tos for m in sink.messages] == [["user@example.org"]]


async def test_a_rule_holds_for_an_internationalised_domain_however_the_address_spells_it(
        relay: Any, smtp_sink: Any, dns_server: LoopbackDNS) -> None:
    """A rule names a domain as DNS has it (A-labels); ``user@bücher.example`` is the same
    destination and gets the rule's level, never the opportunistic default."""
    sink = await smtp_sink()  # no STARTTLS offered
    dns_server.add_mx("xn--bcher-kva.example", "sink.test")
    dns_server.add_a("sink.test", "127.0.0.1")
    rules = {"mxTls": {"policies": [{"domains": ["xn--bcher-kva.example"],
                                     "level": "encrypt"}]}}
    r = await relay(make_config(mx_mode(dns_server, sink.port, **rules), queue=SLOW_RETRY))
    msg = await r.send(["user@b\u00fccher.example"])
    await r.wait(lambda: r.count("deferred") == 1)
    [event] = await r.events(msg)
    assert event["response"].startswith("451 4.7.4"), event
    assert sink.messages == []  # never in clear text


def test_a_rule_with_a_non_ascii_domain_is_refused_with_the_a_label_to_write() -> None:
    with pytest.raises(ValueError, match=r"\*\.xn--bcher-kva\.example"):
        DeliverySettings.model_validate({"mxTls": {"policies": [
            {"domains": ["*.b\u00fccher.example"], "level": "verify"}]}})
