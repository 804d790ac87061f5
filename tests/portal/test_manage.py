"""Suppression, erasure and the audit log through the API: what a team may change, that it
reaches the store, and that nothing crosses into another namespace."""

from __future__ import annotations

import asyncio

import pytest
import requests

from .conftest import NOW, RunningPortal

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


def _store_suppression(portal: RunningPortal) -> dict[str, str]:
    """address: reason of the pool-wide entries and of the first team's own entry."""
    # Listed by address, then namespace: reversed, the pool-wide entry ('') is written last.
    return {a: e[0] for (a, _ns), e in reversed(_store_scopes(portal).items())}


def _store_scopes(portal: RunningPortal) -> dict[str, tuple[str, str]]:
    """(address, namespace): (reason, source) of every entry in the store."""
    async def read() -> dict[str, tuple[str, str]]:
        store = portal.new_store()
        await store.open()
        try:
            return {(e["address"], e["namespace"]): (e["reason"], e["source"])
                    for e in await store.suppression_list()}
        finally:
            await store.close()
    return asyncio.run(read())


def test_team_sees_only_addresses_it_sent_to(portal: RunningPortal) -> None:
    alice = portal.session("alice-token")
    items = alice.get(portal.url + "/api/v1/namespaces/shop/suppression").json()["items"]
    assert sorted(i["address"] for i in items) == ["customer7@mail.example",
                                                   "customer8@mail.example"]
    bob = portal.session("bob-token")
    items = bob.get(portal.url + "/api/v1/namespaces/blog/suppression").json()["items"]
    assert [i["address"] for i in items] == ["reader@secret.example"]
    csv_text = alice.get(portal.url + "/ns/shop/suppression.csv").text
    assert "customer7@mail.example" in csv_text and "secret.example" not in csv_text


def test_add_and_remove_with_reason_reach_the_store_and_the_audit_log(
        portal: RunningPortal) -> None:
    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop/suppression"
    r = alice.post(base, json={"address": "Customer3@Mail.Example", "note": "asked by phone"})
    assert r.status_code == 201, r.text
    assert _store_suppression(portal)["customer3@mail.example"] == "manual"
    r = alice.delete(base + "/customer3@mail.example")
    assert r.status_code == 400 and "reason" in r.json()["error"]
    r = alice.delete(base + "/customer3@mail.example", params={"reason": "typo"})
    assert r.status_code == 200
    assert "customer3@mail.example" not in _store_suppression(portal)
    # a complaint is never lifted from the portal
    r = alice.delete(base + "/customer8@mail.example", params={"reason": "please"})
    assert r.status_code == 409
    assert _store_suppression(portal)["customer8@mail.example"] == "complaint"
    audit = alice.get(portal.url + "/api/v1/namespaces/shop/audit").json()["items"]
    assert [(a["actor"], a["action"], a["target"]) for a in audit] == [
        ("alice", "suppression.remove", "customer3@mail.example"),
        ("alice", "suppression.add", "customer3@mail.example")]
    assert audit[0]["detail"] == "was manual: typo"
    # blog's audit log is blog's alone
    bob = portal.session("bob-token")
    assert bob.get(portal.url + "/api/v1/namespaces/blog/audit").json()["items"] == []


def test_changes_need_update_permission_and_stay_in_the_namespace(
        portal: RunningPortal) -> None:
    carol = portal.session("carol-token")  # may read shop, not change it
    r = carol.post(portal.url + "/api/v1/namespaces/shop/suppression",
                   json={"address": "x@mail.example"})
    assert r.status_code == 403 and "update smtpcredentials" in r.json()["error"]
    r = carol.post(portal.url + "/api/v1/namespaces/shop/erasures",
                   json={"address": "customer1@mail.example"})
    assert r.status_code == 403
    alice = portal.session("alice-token")
    # blog's suppression entry through alice's own namespace: not on her list
    r = alice.delete(portal.url + "/api/v1/namespaces/shop/suppression/reader@secret.example",
                     params={"reason": "x"})
    assert r.status_code == 404
    assert "reader@secret.example" in _store_suppression(portal)
    r = alice.delete(portal.url + "/api/v1/namespaces/blog/suppression/reader@secret.example",
                     params={"reason": "x"})
    assert r.status_code == 403
    # an address only blog has mailed cannot be erased through shop
    r = alice.post(portal.url + "/api/v1/namespaces/shop/erasures",
                   json={"address": "reader@secret.example"})
    assert r.status_code == 404
    # a bearer-token change needs no CSRF token; a cookie one does
    r = requests.post(portal.url + "/api/v1/namespaces/shop/suppression",
                      json={"address": "y@mail.example"},
                      headers={"Authorization": "Bearer alice-token"})
    assert r.status_code == 201
    alice.headers.pop("X-CSRF-Token")
    r = alice.post(portal.url + "/api/v1/namespaces/shop/suppression",
                   json={"address": "z@mail.example"})
    assert r.status_code == 403


def test_erasure_request_runs_and_reports_only_the_namespace(portal: RunningPortal) -> None:
    async def pending_webhooks() -> None:
        # Events naming the address still waiting for each team's endpoint.
        store = portal.new_store()
        await store.open()
        await store.webhook_enqueue([
            (f"ev-{ns}", f"https://hooks.{ns}.example/", "delivered", NOW, cred, ns,
             sender, "Customer1@mail.example", "Q1", "<q1@x>", "250 ok", 1, NOW + 3600)
            for ns, cred, sender in (("shop", "shop-orders", "orders@shop.example"),
                                     ("blog", "blog-news", "news@blog.example"))])
        await store.close()
    asyncio.run(pending_webhooks())
    alice = portal.session("alice-token")
    r = alice.post(portal.url + "/api/v1/namespaces/shop/erasures",
                   json={"address": "customer1@mail.example"})
    assert r.status_code == 202, r.text
    created = r.json()
    assert created["address"] == "c***@mail.example"
    done = portal.wait_erasure(alice, "shop", created["id"])
    assert done["state"] == "done"
    # shop's own rows: one; blog's row with the same address is blog's, and stays
    assert done["report"] == {"message_log_rows_as_sender": 0,
                              "message_log_rows_as_recipient": 1, "suppression_entries": 0,
                              "webhook_events_not_yet_sent": 1}
    assert portal.sql("SELECT namespace FROM message_log WHERE recipient = ?",
                      ("customer1@mail.example",)) == [("blog",)]
    assert portal.sql("SELECT namespace, recipient FROM webhook_outbox") == [
        ("blog", "Customer1@mail.example")]
    kept = [r[0] for r in portal.sql("SELECT address_hint || address_hash || report "
                                     "FROM portal_erasures")]
    assert not any("customer1" in k for k in kept)
    # bob cannot see or follow it
    bob = portal.session("bob-token")
    assert bob.get(portal.url + "/api/v1/namespaces/blog/erasures").json()["items"] == []
    r = bob.get(portal.url + f"/api/v1/namespaces/blog/erasures/{created['id']}")
    assert r.status_code == 404
    r = bob.get(portal.url + f"/api/v1/namespaces/shop/erasures/{created['id']}")
    assert r.status_code == 403


def test_erasure_removes_the_address_from_the_audit_log(portal: RunningPortal) -> None:
    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop"
    assert alice.delete(base + "/suppression/customer7@mail.example",
                        params={"reason": "Customer7@Mail.Example Fixed Her Mailbox"}
                        ).status_code == 200
    r = alice.post(base + "/erasures", json={"address": "customer7@mail.example"})
    portal.wait_erasure(alice, "shop", r.json()["id"])
    text = alice.get(base + "/audit").text
    assert "customer7@" not in text.lower() and "c***@mail.example" in text
    details = [a["detail"] for a in alice.get(base + "/audit").json()["items"]]
    assert "was bounce: c***@mail.example Fixed Her Mailbox" in details  # the rest as written


def test_a_team_cannot_undo_or_erase_another_teams_records(portal: RunningPortal) -> None:
    """Whoever mails an address once has it in its own log; that must not let it lift another
    team's suppression entry, learn who added it, or wipe the other team's log rows."""
    bob = portal.session("bob-token")  # blog has mailed customer1 too
    r = bob.post(portal.url + "/api/v1/namespaces/blog/suppression",
                 json={"address": "customer1@mail.example", "note": "asked to stop"})
    assert r.status_code == 201, r.text
    blogs = {("customer1@mail.example", "blog"): ("manual", "portal:blog:bob")}
    assert _store_scopes(portal).items() >= blogs.items()
    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop"
    # blog's own entry stops only blog's mail: shop does not see it at all.
    assert "customer1@mail.example" not in [
        i["address"] for i in alice.get(base + "/suppression").json()["items"]]
    assert "bob" not in alice.get(portal.url + "/ns/shop/suppression.csv").text
    r = alice.delete(base + "/suppression/customer1@mail.example", params={"reason": "x"})
    assert r.status_code == 404
    assert _store_scopes(portal).items() >= blogs.items()
    r = alice.post(base + "/erasures", json={"address": "customer1@mail.example"})
    done = portal.wait_erasure(alice, "shop", r.json()["id"])
    assert done["state"] == "done" and done["report"]["suppression_entries"] == 0
    assert _store_scopes(portal).items() >= blogs.items()
    assert portal.sql("SELECT namespace FROM message_log WHERE recipient = ?",
                      ("customer1@mail.example",)) == [("blog",)]
    audit = bob.get(portal.url + "/api/v1/namespaces/blog/audit").json()["items"]
    assert audit[0]["target"] == "customer1@mail.example"  # blog's audit log is blog's
    # The team's own entry goes with its own erasure.
    r = alice.post(base + "/suppression", json={"address": "customer2@mail.example"})
    assert r.status_code == 201
    r = alice.post(base + "/erasures", json={"address": "customer2@mail.example"})
    done = portal.wait_erasure(alice, "shop", r.json()["id"])
    assert done["report"]["suppression_entries"] == 1
    assert "customer2@mail.example" not in _store_suppression(portal)


def test_adding_an_entry_does_not_take_over_a_complaint_or_another_teams_entry(
        portal: RunningPortal) -> None:
    """Adding an address that is already suppressed keeps the entry as it is: otherwise a team
    re-adds a complaint (or another team's opt-out) as its own manual entry and then removes
    it, and the complainant gets mail again."""
    bob = portal.session("bob-token")  # blog has mailed customer1 too
    r = bob.post(portal.url + "/api/v1/namespaces/blog/suppression",
                 json={"address": "customer1@mail.example", "note": "asked to stop"})
    assert r.status_code == 201, r.text
    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop/suppression"
    before = _store_scopes(portal)
    r = alice.post(base, json={"address": "customer8@mail.example", "note": "mine now"})
    assert r.status_code in (200, 201), r.text
    assert _store_scopes(portal) == before
    r = alice.delete(f"{base}/customer8@mail.example", params={"reason": "lift it"})
    assert r.status_code == 409, r.text
    assert _store_scopes(portal) == before
    # Another team's entry is that team's: shop's own entry is a second one, and removing it
    # leaves blog's.
    r = alice.post(base, json={"address": "customer1@mail.example", "note": "mine too"})
    assert r.status_code == 201, r.text
    assert _store_scopes(portal) == {
        **before, ("customer1@mail.example", "shop"): ("manual", "portal:shop:alice")}
    [item] = [i for i in alice.get(base).json()["items"]
              if i["address"] == "customer1@mail.example"]
    assert (item["scope"], item["source"]) == ("team", "portal:shop:alice")
    r = alice.delete(f"{base}/customer1@mail.example", params={"reason": "lift it"})
    assert r.status_code == 200, r.text
    assert _store_scopes(portal) == before


def test_an_erasure_cut_by_a_restart_fails_and_says_to_ask_again(portal: RunningPortal) -> None:
    from mailplane_portal.records import Records

    async def run() -> tuple[int, list[str]]:
        records = (Records(dsn=portal.dsn) if portal.dsn
                   else Records(sqlite_path=str(portal.db)))
        await records.open()
        try:
            e = await records.erasure_create("shop", "alice", "x@mail.example", "hmac:1")
            n = await records.fail_interrupted()
            return n, [x.state + ":" + x.error for x in await records.erasures("shop", e.id)]
        finally:
            await records.close()

    n, states = asyncio.run(run())
    assert n == 1 and states == ["failed:the portal restarted before it finished; ask again"]


def test_old_audit_rows_keep_who_did_what_but_not_the_address(portal: RunningPortal) -> None:
    """The portal's hourly upkeep: an audit row past the message log's retention names the
    address only masked (its note too); newer rows are left; expired sessions go."""
    import time
    from types import SimpleNamespace

    from mailplane_portal.cli import _upkeep
    from mailplane_portal.kube import Identity
    from mailplane_portal.records import Records
    from mailplane_portal.sessions import SessionStore

    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop/suppression"
    for address in ("old.friend@mail.example", "new.friend@mail.example"):
        r = alice.post(base, json={"address": address, "note": f"asked by {address.title()}"})
        assert r.status_code == 201, r.text
    portal.sql("UPDATE portal_audit SET ts = ? WHERE target = ?",
               (time.time() - 91 * 86400, "old.friend@mail.example"))

    async def one_round() -> None:
        records = Records(dsn=portal.dsn) if portal.dsn else Records(
            sqlite_path=str(portal.db))
        await records.open()
        sessions = SessionStore(records, idle=60)
        stale = await sessions.create(Identity("mallory"))
        await records._do("UPDATE portal_sessions SET seen = seen - 3600 WHERE username = ?",
                          ("mallory",))
        task = asyncio.create_task(_upkeep(SimpleNamespace(sessions=sessions, records=records),
                                           90 * 86400))
        for _ in range(200):
            rows = await records._all("SELECT target FROM portal_audit WHERE target LIKE ?",
                                      ("o***@%",))
            if rows:
                break
            await asyncio.sleep(0.05)
        task.cancel()
        # Gone from the table (not only refused when shown again).
        assert await records._all("SELECT id_hash FROM portal_sessions WHERE username = ?",
                                  ("mallory",)) == []
        assert await sessions.get(stale.sid) is None
        await records.close()
    asyncio.run(one_round())
    rows = {r[0]: (r[1], r[2]) for r in portal.sql(
        "SELECT target, actor, detail FROM portal_audit WHERE action = 'suppression.add'")}
    assert rows["o***@mail.example"] == ("alice", "asked by O***@Mail.Example")
    assert rows["new.friend@mail.example"] == ("alice", "asked by New.Friend@Mail.Example")
    assert "old.friend" not in str(portal.sql("SELECT * FROM portal_audit")).lower()


def test_an_address_the_team_never_mailed_is_on_its_list_once_it_adds_it(
        portal: RunningPortal) -> None:
    """Else the team could neither see nor remove its own entry (and it suppresses the
    address for every team)."""
    alice = portal.session("alice-token")
    base = portal.url + "/api/v1/namespaces/shop/suppression"
    r = alice.post(base, json={"address": "opted.out@never.example", "note": "by letter"})
    assert r.status_code == 201, r.text
    items = {i["address"]: i for i in alice.get(base).json()["items"]}
    assert items["opted.out@never.example"]["reason"] == "manual"
    assert items["opted.out@never.example"]["source"] == "portal:shop:alice"
    bob = portal.session("bob-token")
    blog = bob.get(portal.url + "/api/v1/namespaces/blog/suppression").json()["items"]
    assert "opted.out@never.example" not in [i["address"] for i in blog]
    r = alice.delete(base + "/opted.out@never.example", params={"reason": "wrong address"})
    assert r.status_code == 200, r.text
    assert "opted.out@never.example" not in _store_suppression(portal)
