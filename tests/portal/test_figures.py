"""Delivery figures and the team's credentials and domains, scoped like everything else."""

from __future__ import annotations

import pytest

from mailplane_operator import kube as opkube
from tests.helpers.kube import domain_body

from .conftest import RunningPortal

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


def test_figures_count_the_namespace_per_credential_and_domain(portal: RunningPortal) -> None:
    alice = portal.session("alice-token")
    body = alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "24h"}).json()
    assert set(body["credential"]) == {"shop-orders"}
    assert set(body["domain"]) == {"shop.example"}
    buckets = body["domain"]["shop.example"]["buckets"]
    assert sum(b.get("delivered", 0) for b in buckets) == 121
    assert sum(b.get("deferred", 0) for b in buckets) == 1
    rates = body["credential"]["shop-orders"]["rates"]
    assert rates["bounced"] == 0 and 0.99 < rates["delivered"] < 1
    page = alice.get(portal.url + "/ns/shop/figures?range=7d")
    assert page.status_code == 200 and page.text.count("<svg") == 2
    assert "blog" not in page.text.replace("/ns/shop", "")
    bob = portal.session("bob-token")
    body = bob.get(portal.url + "/api/v1/namespaces/blog/figures").json()
    assert body["credential"]["blog-news"]["rates"]["bounced"] == 0.5
    assert alice.get(portal.url + "/api/v1/namespaces/blog/figures").status_code == 403
    assert alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "1y"}).status_code == 400


def test_resources_show_the_namespace_credentials_and_domains_by_permission(
        portal: RunningPortal) -> None:
    api = portal.api
    api.create(opkube.SENDING_DOMAINS, domain_body("shop", "shop.example", namespace="shop"))
    api.patch(opkube.SENDING_DOMAINS, "shop", "shop", {"status": {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Verified"}],
        "dnsRecords": [{"purpose": "dkim", "type": "TXT", "name": "mp._domainkey.shop.example.",
                        "value": "v=DKIM1; k=ed25519; p=abc", "strings": [
                            "v=DKIM1; k=ed25519; p=abc"], "state": "active",
                        "verified": True}]}}, status=True)
    api.create(opkube.SENDING_DOMAINS, domain_body("blog", "blog.example", namespace="blog"))
    alice = portal.session("alice-token")
    body = alice.get(portal.url + "/api/v1/namespaces/shop/resources").json()
    assert [c["name"] for c in body["credentials"]] == ["shop-orders"]
    assert body["domains"] is None  # alice may not get sendingdomains yet
    api.emulator.grant("group:shop-team", "get", "sendingdomains", "shop")
    body = alice.get(portal.url + "/api/v1/namespaces/shop/resources").json()
    assert [d["domain"] for d in body["domains"]] == ["shop.example"]
    assert body["domains"][0]["dns_records"][0]["name"] == "mp._domainkey.shop.example."
    page = alice.get(portal.url + "/ns/shop/resources").text
    assert "mp._domainkey.shop.example." in page and "blog.example" not in page
    assert alice.get(portal.url + "/api/v1/namespaces/blog/resources").status_code == 403


def test_complaint_rates_per_credential_and_only_the_namespaces_own(
        portal: RunningPortal) -> None:
    import asyncio
    import time

    async def complain() -> None:
        store = portal.new_store()
        await store.open()
        minute = int(time.time() // 60)
        await store.complaints_add({("shop-orders", minute - 30): 2, ("blog-news", minute): 1,
                                    ("somebody-else", minute): 9,
                                    ("shop-orders", minute - 3 * 24 * 60): 5})
        await store.close()
    asyncio.run(complain())
    alice = portal.session("alice-token")
    body = alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "24h"}).json()
    series = body["credential"]["shop-orders"]
    assert sum(b.get("complained", 0) for b in series["buckets"]) == 2  # 3 days ago: not in 24h
    assert series["rates"]["complained"] == 2 / 121  # of the delivered
    assert series["rates"]["total"] == 122  # log events; complaints are not among them
    # Counted per credential only: the domain chart has none of them.
    assert body["domain"]["shop.example"]["rates"]["complained"] == 0
    week = alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "7d"}).json()
    assert sum(b.get("complained", 0) for b in week["credential"]["shop-orders"]["buckets"]) == 7
    page = alice.get(portal.url + "/ns/shop/figures?range=24h").text
    assert "complained 1.65% of delivered" in page
    assert "somebody-else" not in page and "blog-news" not in page
    bob = portal.session("bob-token")
    blog = bob.get(portal.url + "/api/v1/namespaces/blog/figures").json()
    assert blog["credential"]["blog-news"]["rates"]["complained"] == 1.0  # 1 delivered


def test_complaint_rates_per_sender_domain_count_only_the_namespaces_own_mail(
        portal: RunningPortal) -> None:
    """The intake counts complaints per credential, sender domain and minute; a team sees its
    domains' rates from its own credentials' mail, never another team's complaints about the
    same domain."""
    import asyncio
    import time

    async def complain() -> None:
        store = portal.new_store()
        await store.open()
        minute = int(time.time() // 60)
        await store.domain_complaints_add({
            ("shop-orders", "shop.example", minute - 30): 2,
            ("shop-orders", "shop.example", minute - 29): 1,
            ("shop-orders", "shop.example", minute - 3 * 24 * 60): 5,  # in 7d, not in 24h
            # Another team's credential sending as shop.example, and another domain.
            ("blog-news", "shop.example", minute): 40,
            ("blog-news", "blog.example", minute): 1,
            ("somebody-else", "shop.example", minute): 9,
        })
        await store.domain_complaints_add({("shop-orders", "shop.example", minute - 30): 1})
        await store.close()
    asyncio.run(complain())
    alice = portal.session("alice-token")
    body = alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "24h"}).json()
    assert set(body["domain"]) == {"shop.example"}
    series = body["domain"]["shop.example"]
    assert sum(b.get("complained", 0) for b in series["buckets"]) == 4
    assert series["rates"]["complained"] == 4 / 121  # of the delivered
    assert series["rates"]["total"] == 122
    week = alice.get(portal.url + "/api/v1/namespaces/shop/figures",
                     params={"range": "7d"}).json()
    assert sum(b.get("complained", 0) for b in week["domain"]["shop.example"]["buckets"]) == 9
    page = alice.get(portal.url + "/ns/shop/figures?range=24h").text
    assert "Sender domain shop.example: 122 events" in page
    assert "complained 3.31% of delivered" in page
    bob = portal.session("bob-token")
    blog = bob.get(portal.url + "/api/v1/namespaces/blog/figures").json()
    # bob's own credential's complaints, under the domains it sent as.
    assert blog["domain"]["blog.example"]["rates"]["complained"] == 1.0  # 1 delivered
    assert sum(b.get("complained", 0) for b in blog["domain"]["shop.example"]["buckets"]) == 40
