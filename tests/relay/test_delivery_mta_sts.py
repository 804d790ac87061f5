"""MTA-STS (RFC 8461) and its TLS-RPT (RFC 8460) counters, end to end: the policy is served
over real HTTPS on port 443 of a loopback address with a certificate from a test CA, the
``_mta-sts`` TXT record, the policy host and the MX hosts come from a real DNS server on
loopback, and the MX hosts are aiosmtpd sinks with and without STARTTLS and with certificates
for other names."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailplane_relay.config import MTASTSSettings, ResolverSettings
from mailplane_relay.delivery import mtasts
from mailplane_relay.delivery.mtasts import (
    MTASTS,
    Policy,
    PolicyError,
    parse_policy,
    parse_txt,
)
from mailplane_relay.mx import MXResolver
from tests.helpers.dns import LoopbackDNS
from tests.helpers.mtasts import PolicyServer
from tests.helpers.sink import Sink
from tests.relay.test_delivery_flows import Relay, make_config, message, mx_mode

SLOW_RETRY = {"retryInitial": 30, "retryMax": 30}
DOMAIN = "example.net"
ENFORCE = "version: STSv1\r\nmode: enforce\r\nmx: sink.test\r\nmax_age: 86400\r\n"

ServerFactory = Callable[..., Awaitable[PolicyServer]]
SinkFactory = Callable[..., Awaitable[Sink]]
RelayFactory = Callable[..., Awaitable[Relay]]


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx),
             f"max_age: {max_age}"]
    return "\n".join(lines) + "\n"


async def published(policy_server: ServerFactory, dns: LoopbackDNS, ca: trustme.CA,
                    policy: str, *, policy_id: str = "20261207a", mx_host: str = "sink.test",
                    cert_name: str | None = None) -> PolicyServer:
    """A domain that publishes ``policy``; its MX is ``mx_host`` on 127.0.0.1."""
    server = await policy_server(ca, DOMAIN, cert_name=cert_name)
    server.policy = policy
    dns.add_txt(f"_mta-sts.{DOMAIN}", f"v=STSv1; id={policy_id};")
    dns.add_a(f"mta-sts.{DOMAIN}", server.address)
    dns.add_mx(DOMAIN, mx_host)
    dns.add_a(mx_host, "127.0.0.1")
    return server


def config(dns: LoopbackDNS, sink: Sink, ca_file: str, cache: Path, **extra: Any) -> Any:
    mta_sts = {"caFile": ca_file, "cacheFile": str(cache), "fetchTimeout": 3,
               **extra.pop("mtaSts", {})}
    return make_config(mx_mode(dns, sink.port, mtaSts=mta_sts, **extra), queue=SLOW_RETRY)


def tls_count(r: Relay, result: str, policy_type: str = "sts", domain: str = DOMAIN) -> float:
    """Summed over the mode label (see tls_modes)."""
    total = 0.0
    for mode in ("enforce", "testing", "none"):
        total += r.metrics.registry.get_sample_value(
            "mailplane_relay_delivery_tls_sessions_total",
            {"policy_type": policy_type, "policy_domain": domain if policy_type == "sts"
             else "", "mode": mode, "result": result}) or 0.0
    return total


def tls_modes(r: Relay) -> set[tuple[str, str, str]]:
    """(policy_type, mode, result) of every counted TLS result."""
    return {(s.labels["policy_type"], s.labels["mode"], s.labels["result"])
            for family in r.metrics.registry.collect()
            if family.name == "mailplane_relay_delivery_tls_sessions"
            for s in family.samples if s.name.endswith("_total")}


async def deferred_reply(r: Relay) -> str:
    await r.wait(lambda: r.count("deferred") == 1)
    msg = r.queue.message(r.queue.queued_ids()[0])
    assert msg is not None
    [event] = await r.events(msg)
    assert event["status"] == "deferred"
    return str(event["response"])


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def ca_file(ca: trustme.CA, tmp_path: Path) -> str:
    path = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


# ------------------------------------------------------------------------------ enforce


async def test_enforce_delivers_over_tls_verified_for_the_mx_the_policy_names(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    server = await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    msg = await r.send([f"user@{DOMAIN}"])
    await r.done(msg)
    assert sink.messages[0].tls
    assert server.requests == [(f"mta-sts.{DOMAIN}", "/.well-known/mta-sts.txt")]
    assert tls_modes(r) == {("sts", "enforce", "success")}


async def test_concurrent_deliveries_share_one_policy_fetch(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    server = await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    msgs = [await r.send([f"user{i}@{DOMAIN}"]) for i in range(5)]
    for msg in msgs:
        await r.done(msg)
    assert len(sink.messages) == 5 and all(m.tls for m in sink.messages)
    assert len(server.requests) == 1


async def test_enforce_defers_an_mx_without_starttls_instead_of_sending_in_clear(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)  # no STARTTLS
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.send([f"user@{DOMAIN}"])
    reply = await deferred_reply(r)
    assert reply.startswith("451 4.7.4"), reply
    assert "the MTA-STS policy of example.net is enforce" in reply, reply
    assert sink.messages == []
    assert tls_count(r, "starttls-not-supported") == 1


async def test_enforce_defers_a_certificate_for_another_name(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    # The policy names mx.example.net; its certificate (trusted CA) is for sink.test.
    await published(policy_server, dns_server, ca, policy_text("enforce", "mx.example.net"),
                    mx_host="mx.example.net")
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.send([f"user@{DOMAIN}"])
    reply = await deferred_reply(r)
    assert reply.startswith("451 4.7.5") and "CERTIFICATE_VERIFY_FAILED" in reply, reply
    assert sink.messages == [] and sink.connections == 1  # no clear-text second try
    assert tls_count(r, "certificate-host-mismatch") == 1


async def test_enforce_never_connects_to_an_mx_the_policy_does_not_name(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, policy_text("enforce", "*.mail.example.net"))
    sink = await smtp_sink(ca=ca, starttls=True)  # would verify: the name is what is wrong
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.send([f"user@{DOMAIN}"])
    reply = await deferred_reply(r)
    assert reply.startswith("451 4.7.5 No MX host of example.net matches its MTA-STS"), reply
    assert sink.connections == 0
    assert tls_count(r, "validation-failure") == 1


async def test_enforce_picks_the_mx_the_policy_names_among_others(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    """The preferred MX (rogue.example.org, clear text) is not in the policy: skipped."""
    await published(policy_server, dns_server, ca, policy_text("enforce", "*.example.net"),
                    mx_host="mx1.example.net")
    dns_server.add_mx(DOMAIN, "rogue.example.org", preference=1)
    dns_server.add_a("rogue.example.org", "127.0.0.1")
    dns_server.add_a("mx1.example.net", "127.0.0.1")
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.send([f"user@{DOMAIN}"])
    reply = await deferred_reply(r)
    # Only mx1.example.net was tried (and its certificate names sink.test, not mx1).
    assert "mx1.example.net" in reply and "rogue" not in reply, reply
    assert sink.connections == 1 and sink.messages == []


# ------------------------------------------------------------------------------ testing


async def test_testing_mode_delivers_as_usual_and_counts_the_failures(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, policy_text("testing", "mx.example.net"),
                    mx_host="mx.example.net")
    sink = await smtp_sink(ca=ca, starttls=True)  # certificate for sink.test
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert sink.messages[0].tls  # opportunistic TLS, unverified, as without a policy
    assert tls_count(r, "certificate-host-mismatch") == 1
    assert tls_modes(r) == {("sts", "testing", "certificate-host-mismatch")}


async def test_testing_mode_without_starttls_delivers_in_clear_and_counts(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, policy_text("testing", "sink.test"))
    sink = await smtp_sink(ca=ca)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert not sink.messages[0].tls
    assert tls_count(r, "starttls-not-supported") == 1


async def test_testing_mode_delivers_to_an_mx_the_policy_does_not_name_and_counts_it(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, policy_text("testing", "*.other.example"))
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert len(sink.messages) == 1 and sink.connections == 1
    assert tls_modes(r) == {("sts", "testing", "validation-failure")}


async def test_testing_mode_that_verifies_counts_success(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    await published(policy_server, dns_server, ca, policy_text("testing", "sink.test"))
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert sink.messages[0].tls and sink.connections == 1  # the verified session carried it
    assert tls_count(r, "success") == 1


# ------------------------------------------------------------------------------ the cache


async def test_a_restart_honours_the_cached_enforce_policy_while_the_policy_host_is_down(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    cache = tmp_path / "sts.json"
    server = await published(policy_server, dns_server, ca, ENFORCE)
    good = await smtp_sink(ca=ca, starttls=True)
    first = await relay(config(dns_server, good, ca_file, cache))
    await first.done(await first.send([f"user@{DOMAIN}"]))
    await first.stop()
    # Persisted at the stop: nothing but the policy.
    saved = json.loads(cache.read_text())["policies"]
    assert list(saved) == [DOMAIN]
    assert saved[DOMAIN]["mode"] == "enforce" and saved[DOMAIN]["mx"] == ["sink.test"]
    assert saved[DOMAIN]["id"] == "20261207a"
    # The policy host goes down, the id changes (a refresh is due), and an attacker who
    # strips STARTTLS now answers for the MX.
    await server.stop()
    dns_server.clear()
    dns_server.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20261208b;")
    dns_server.add_a(f"mta-sts.{DOMAIN}", server.address)
    dns_server.add_mx(DOMAIN, "sink.test")
    dns_server.add_a("sink.test", "127.0.0.1")
    stripped = await smtp_sink(ca=ca)
    second = await relay(config(dns_server, stripped, ca_file, cache))
    await second.send([f"user@{DOMAIN}"])
    reply = await deferred_reply(second)
    assert reply.startswith("451 4.7.4"), reply
    assert stripped.messages == []
    assert tls_count(second, "sts-policy-fetch-error") == 1
    # Without the cache, the same relay would have had no policy: delivered in clear text.
    third = await relay(config(dns_server, stripped, ca_file, tmp_path / "empty.json"))
    await third.done(await third.send([f"user@{DOMAIN}"]))
    assert [m.tls for m in stripped.messages] == [False]


async def test_every_delivery_after_a_restart_waits_for_the_cache_to_load(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    """Deliveries that start together after a restart all see the cached enforce policy: none
    of them finds the cache still empty, fails to fetch (the policy host is down) and sends in
    clear text."""
    cache = tmp_path / "sts.json"
    server = await published(policy_server, dns_server, ca, ENFORCE)
    good = await smtp_sink(ca=ca, starttls=True)
    first = await relay(config(dns_server, good, ca_file, cache))
    await first.done(await first.send([f"user@{DOMAIN}"]))
    await first.stop()
    await server.stop()
    # A large cache (other domains' policies) takes a while to load.
    saved = json.loads(cache.read_text())
    mine = saved["policies"][DOMAIN]
    saved["policies"].update({f"d{i}.example": mine for i in range(30000)})
    cache.write_text(json.dumps(saved))
    stripped = await smtp_sink(ca=ca)
    # Eight messages on the spool when the queue starts: their routes run together.
    second = Relay(tmp_path / "second", config(dns_server, stripped, ca_file, cache))
    await second.spool.start()
    await second.store.open()
    await second.log.start()
    await second.suppression.start()
    spooled = [await second.spool.commit(
        mail_from="app@example.com", recipients=[f"user{i}@{DOMAIN}"],
        data=message(f"user{i}@{DOMAIN}"), message_id=None, credential="app1",
        sender_domain="example.com", listener="submission") for i in range(8)]
    try:
        await second.queue.start(spooled)
        await second.wait(lambda: second.count("deferred") + second.count("delivered") == 8)
    finally:
        await second.stop()
    assert stripped.messages == [] and second.count("deferred") == 8


async def test_workers_sharing_the_cache_file_keep_each_others_policies(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    cache = tmp_path / "sts.json"
    await published(policy_server, dns_server, ca, ENFORCE)
    other = await policy_server(ca, "example.org")
    other.policy = policy_text("testing", "sink.test")
    dns_server.add_txt("_mta-sts.example.org", "v=STSv1; id=org1;")
    dns_server.add_a("mta-sts.example.org", other.address)
    dns_server.add_mx("example.org", "sink.test")
    sink = await smtp_sink(ca=ca, starttls=True)
    dns_server.add_mx("plain.example", "sink.test")
    one = await relay(config(dns_server, sink, ca_file, cache))
    two = await relay(config(dns_server, sink, ca_file, cache))
    # Both read the (still missing) file before either fetched a policy.
    await one.done(await one.send(["user@plain.example"]))
    await two.done(await two.send(["user@plain.example"]))
    await one.done(await one.send([f"user@{DOMAIN}"]))
    await two.done(await two.send(["user@example.org"]))
    await one.stop()
    await two.stop()
    saved = json.loads(cache.read_text())["policies"]
    assert {d: p["mode"] for d, p in saved.items()} == {DOMAIN: "enforce",
                                                       "example.org": "testing"}


def test_workers_writing_the_cache_file_at_once_lose_no_policy(tmp_path: Path) -> None:
    """Each write reads the file, merges and replaces it: without a lock, a worker's write
    based on what it read before another's write drops the other's policies."""
    cache = tmp_path / "sts.json"
    now = time.time()
    workers = [MTASTS(cache) for _ in range(4)]
    start = threading.Barrier(len(workers))

    def write(i: int) -> None:
        mine: dict[str, Policy] = {}
        start.wait()
        for n in range(30):
            domain = f"w{i}-{n}.example"
            mine[domain] = Policy(domain, "id1", "enforce", ("sink.test",), 86400, now,
                                  now + 86400)
            workers[i]._merge_and_write(dict(mine))

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(workers))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(json.loads(cache.read_text())["policies"]) == 120


@pytest.mark.parametrize("txt", ["servfail", "removed"])
async def test_a_cached_policy_holds_when_the_txt_record_fails_or_disappears(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path,
        txt: str) -> None:
    cache = tmp_path / "sts.json"
    await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)  # no STARTTLS
    first = await relay(config(dns_server, sink, ca_file, cache))
    await first.send([f"user@{DOMAIN}"])
    await deferred_reply(first)
    await first.stop()
    dns_server.clear()
    dns_server.add_mx(DOMAIN, "sink.test")
    dns_server.add_a("sink.test", "127.0.0.1")
    if txt == "servfail":
        dns_server.set_servfail(f"_mta-sts.{DOMAIN}")
    second = await relay(config(dns_server, sink, ca_file, cache))
    await second.send([f"user@{DOMAIN}"])
    assert (await deferred_reply(second)).startswith("451 4.7.4")
    assert sink.messages == []


async def test_a_changed_id_refetches_and_mode_none_lifts_the_policy(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    cache = tmp_path / "sts.json"
    server = await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)  # no STARTTLS
    first = await relay(config(dns_server, sink, ca_file, cache))
    await first.send([f"user@{DOMAIN}"])
    await deferred_reply(first)
    await first.stop()
    # Same id after a restart: the cached policy is used, not fetched again.
    again = await relay(config(dns_server, sink, ca_file, cache))
    await again.send([f"user@{DOMAIN}"])
    await deferred_reply(again)
    assert len(server.requests) == 1
    await again.stop()
    dns_server.clear()
    dns_server.add_txt(f"_mta-sts.{DOMAIN}", "v=STSv1; id=20261208b;")
    dns_server.add_a(f"mta-sts.{DOMAIN}", server.address)
    dns_server.add_mx(DOMAIN, "sink.test")
    dns_server.add_a("sink.test", "127.0.0.1")
    server.policy = "version: STSv1\nmode: none\nmax_age: 86400\n"
    last = await relay(config(dns_server, sink, ca_file, cache))
    await last.done(await last.send([f"user@{DOMAIN}"]))
    assert len(server.requests) == 2 and len(sink.messages) == 1
    assert tls_count(last, "starttls-not-supported", "no-policy-found") == 1


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def sts_parts(dns: LoopbackDNS, ca_file: str, tmp_path: Path, clock: Clock
              ) -> tuple[MTASTS, MXResolver, MTASTSSettings]:
    settings = MTASTSSettings.model_validate({"caFile": ca_file, "fetchTimeout": 2})
    resolver = MXResolver(ResolverSettings.model_validate(dns.resolver_settings(timeout=0.5)))
    return MTASTS(tmp_path / "sts.json", clock=clock), resolver, settings


@pytest.mark.parametrize("txt", ["servfail", "removed"])
async def test_a_cached_policy_is_refreshed_over_https_while_its_txt_record_is_blocked(
        dns_server: LoopbackDNS, policy_server: ServerFactory, ca: trustme.CA, ca_file: str,
        tmp_path: Path, txt: str) -> None:
    """RFC 8461 section 5.1: an attacker who blocks the TXT lookup for longer than max_age
    does not make an enforce policy lapse; the policy is fetched over HTTPS once half its
    lifetime has passed, and extended."""
    server = await published(policy_server, dns_server, ca,
                             policy_text("enforce", "sink.test", max_age=1000))
    clock = Clock()
    sts, resolver, settings = sts_parts(dns_server, ca_file, tmp_path, clock)
    slots = asyncio.Semaphore(4)
    first = (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy
    assert first is not None and first.mode == "enforce"
    assert first.expires_at == clock.now + 1000
    if txt == "servfail":
        dns_server.set_servfail(f"_mta-sts.{DOMAIN}")
    else:
        dns_server.clear()
        dns_server.add_a(f"mta-sts.{DOMAIN}", server.address)
    # A fresh resolver: no TXT answer cached from before.
    resolver = MXResolver(resolver.settings)
    clock.now += 400  # not due yet: the cached policy, no fetch
    assert (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy == first
    assert len(server.requests) == 1
    clock.now += 200  # past half the lifetime: fetched over HTTPS without a TXT answer
    second = (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy
    assert len(server.requests) == 2
    assert second is not None and second.mode == "enforce"
    assert second.expires_at == clock.now + 1000 and second.policy_id == first.policy_id
    clock.now = first.expires_at + 1  # past the first policy's max_age: still enforce
    assert (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy == second
    # The policy host down too: the cached policy holds until it expires, and no longer.
    await server.stop()
    clock.now = second.expires_at - 1
    assert (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy == second
    clock.now = second.expires_at
    assert (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy is None
    await sts.flush()


async def slow_domain(policy_server: ServerFactory, dns: LoopbackDNS, ca: trustme.CA,
                      domain: str) -> tuple[asyncio.Event, list[PolicyServer]]:
    """A domain whose two policy web servers take every request and never answer (until the
    event is set): its fetch holds a slot for twice fetchTimeout."""
    hold = asyncio.Event()
    servers = []
    dns.add_txt(f"_mta-sts.{domain}", "v=STSv1; id=slow1;")
    dns.add_mx(domain, "sink.test")
    for _ in range(2):
        server = await policy_server(ca, domain)
        server.hold = hold
        servers.append(server)
        dns.add_a(f"mta-sts.{domain}", server.address)
    return hold, servers


async def test_a_delivery_waits_for_a_fetch_slot_no_longer_than_fetch_timeout(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Slow policy web servers hold every fetch slot (one here): a domain without a cached
    policy is deferred with a reply naming the policy fetch, never sent as without a policy
    (it might publish enforce)."""
    monkeypatch.setattr(mtasts, "FETCH_CONCURRENCY", 1)
    hold, slow = await slow_domain(policy_server, dns_server, ca, "slow.example")
    await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)  # no STARTTLS: sent in clear without the policy
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json",
                           mtaSts={"fetchTimeout": 1}))
    await r.send(["user@slow.example"])
    async with asyncio.timeout(10):  # its fetch holds the slot
        await slow[0].requested.wait()
    await r.send([f"user@{DOMAIN}"])
    await r.wait(lambda: r.count("deferred") >= 1)
    events = [e for q in r.queue.queued_ids() if (m := r.queue.message(q)) is not None
              for e in await r.events(m)]
    replies = [str(e["response"]) for e in events if e["status"] == "deferred"]
    assert any(reply.startswith(
        "451 4.4.3 MTA-STS policy of example.net not fetched: all 1 policy fetches busy "
        "for 1s") for reply in replies), replies
    assert sink.messages == []
    hold.set()


async def test_a_cached_policy_is_used_when_no_fetch_slot_is_free_in_time(
        dns_server: LoopbackDNS, policy_server: ServerFactory, ca: trustme.CA, ca_file: str,
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(mtasts, "FETCH_CONCURRENCY", 1)
    server = await published(policy_server, dns_server, ca,
                             policy_text("enforce", "sink.test", max_age=1000))
    hold, slow_servers = await slow_domain(policy_server, dns_server, ca, "slow.example")
    clock = Clock()
    sts, resolver, settings = sts_parts(dns_server, ca_file, tmp_path, clock)
    slots = asyncio.Semaphore(4)
    first = (await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)).policy
    assert first is not None
    clock.now += 600  # a refresh is due
    slow = asyncio.ensure_future(sts.lookup("slow.example", resolver, settings,
                                            dns_slots=slots))
    try:
        async with asyncio.timeout(10):  # the slow domain's fetch holds the only slot
            await slow_servers[0].requested.wait()
        loop = asyncio.get_running_loop()
        started = loop.time()
        lookup = await sts.lookup(DOMAIN, resolver, settings, dns_slots=slots)
        assert lookup.policy == first and lookup.defer is None
        assert loop.time() - started >= 1.5  # waited fetchTimeout (2s) for a slot
        assert len(server.requests) == 1
    finally:
        hold.set()
        await slow
        await sts.flush()


# ------------------------------------------------------------------------------ fetching


@pytest.mark.parametrize(("fault", "result"), [
    ("redirect", "sts-policy-fetch-error"),
    ("not-found", "sts-policy-fetch-error"),
    ("html", "sts-policy-invalid"),
    ("too-large", "sts-policy-invalid"),
    ("too-large-chunked", "sts-policy-invalid"),
    ("bad-policy", "sts-policy-invalid"),
    ("wrong-certificate", "sts-policy-fetch-error"),
])
async def test_a_policy_not_served_as_rfc_8461_requires_is_not_used(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path,
        fault: str, result: str) -> None:
    server = await published(policy_server, dns_server, ca, ENFORCE,
                             cert_name="www.example.net" if fault == "wrong-certificate"
                             else None)
    if fault == "redirect":
        server.status, server.location = 301, f"https://{server.address}/policy"
    elif fault == "not-found":
        server.status = 404
    elif fault == "html":
        server.content_type = "text/html"
    elif fault.startswith("too-large"):
        server.chunked = fault.endswith("chunked")
        server.policy = ENFORCE + "x-pad: " + "a" * 70000 + "\n"
    elif fault == "bad-policy":
        server.policy = ENFORCE.replace("mode: enforce", "mode: strict")
    sink = await smtp_sink(ca=ca)  # no STARTTLS: delivered only because there is no policy
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert len(sink.messages) == 1
    assert tls_modes(r) == {("sts", "none", result),
                            ("no-policy-found", "none", "starttls-not-supported")}
    assert len(server.requests) <= 1  # a redirect is not followed


async def test_an_mxtls_rule_for_the_domain_wins_over_its_mta_sts_policy(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    server = await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)
    rules = {"policies": [{"domains": [DOMAIN], "level": "may"}]}
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json", mxTls=rules))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert len(sink.messages) == 1 and server.requests == []


async def test_mta_sts_can_be_turned_off(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    server = await published(policy_server, dns_server, ca, ENFORCE)
    sink = await smtp_sink(ca=ca)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json",
                           mtaSts={"enabled": False}))
    await r.done(await r.send([f"user@{DOMAIN}"]))
    assert len(sink.messages) == 1 and server.requests == []
    assert tls_count(r, "starttls-not-supported", "no-policy-found") == 1


# ------------------------------------------------------------------------------ parsing


def test_txt_record_needs_exactly_one_v_stsv1_record_with_a_valid_id() -> None:
    assert parse_txt(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert parse_txt(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert parse_txt([]) is None
    assert parse_txt(["v=STSv1; id=a;", "v=STSv1; id=b;"]) is None
    assert parse_txt(["v=STSv1; id=has-dash;"]) is None
    assert parse_txt(["v=STSv1; id=" + "a" * 33]) is None
    assert parse_txt(["v=STSv1;"]) is None
    # Only records that begin with "v=STSv1;" count (section 3.1): another version is
    # discarded, not taken for a second record.
    assert parse_txt(["v=STSv10; id=b;", "v=STSv1 ; id=a"]) == "a"
    assert parse_txt(["v=STSv1x; id=b;"]) is None


def test_policy_parsing_and_mx_patterns() -> None:
    p = parse_policy("version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\n"
                     "mx: *.Example.NET.\r\nmax_age: 9999999999\r\nfuture: x\r\n",
                     domain="example.com", policy_id="a", now=1000.0, max_age_cap=86400)
    assert p.mode == "enforce" and p.mx == ("mail.example.com", "*.example.net")
    assert p.max_age == 31557600 and p.expires_at == 1000.0 + 86400
    assert p.matches("MAIL.example.com.") and p.matches("mx1.example.net")
    assert not p.matches("a.b.example.net") and not p.matches("example.net")
    assert not p.matches("xmail.example.com")
    assert Policy.from_json("example.com", p.to_json()) == p
    for bad, why in [("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1", "version"),
                     ("version: STSv1\nmode: on\nmx: a\nmax_age: 1", "mode"),
                     ("version: STSv1\nmode: enforce\nmax_age: 1", "no mx"),
                     ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1", "max_age"),
                     ("version: STSv1\nmode: enforce\nmx: a.*.b\nmax_age: 1", "mx"),
                     ("<html>", "not 'key: value'")]:
        with pytest.raises(PolicyError, match=why):
            parse_policy(bad, domain="d", policy_id="a", now=0, max_age_cap=1e9)
    assert parse_policy("version: STSv1\nmode: none\nmax_age: 0\n", domain="d",
                        policy_id="a", now=0, max_age_cap=1e9).mx == ()


# ------------------------------------------------------------------------------ IDNA

UDOMAIN = "bücher.example"
ADOMAIN = "xn--bcher-kva.example"


async def test_an_idna_recipient_domain_has_its_policy_fetched_under_its_a_label_name(
        relay: RelayFactory, smtp_sink: SinkFactory, dns_server: LoopbackDNS,
        policy_server: ServerFactory, ca: trustme.CA, ca_file: str, tmp_path: Path) -> None:
    """A recipient domain in U-labels (an SMTPUTF8 address) has its policy fetched with the
    A-label host name a web server knows (HTTP Host is ASCII), and both spellings of the
    domain share one cached policy."""
    server = await policy_server(ca, ADOMAIN)
    server.policy = policy_text("enforce", "sink.test")
    dns_server.add_txt(f"_mta-sts.{ADOMAIN}", "v=STSv1; id=idna1;")
    dns_server.add_a(f"mta-sts.{ADOMAIN}", server.address)
    dns_server.add_mx(ADOMAIN, "sink.test")
    dns_server.add_a("sink.test", "127.0.0.1")
    sink = await smtp_sink(ca=ca, starttls=True)
    r = await relay(config(dns_server, sink, ca_file, tmp_path / "sts.json"))
    for address in (f"user@{UDOMAIN}", f"user@{ADOMAIN}"):
        msg = await r.send([address])
        await r.done(msg)
        [event] = await r.events(msg)
        assert str(event["remote"]).endswith(" tls")  # the sink's answer, over verified TLS
    assert server.requests == [(f"mta-sts.{ADOMAIN}", "/.well-known/mta-sts.txt")]
    assert {m for _, m, _ in tls_modes(r)} == {"enforce"}
