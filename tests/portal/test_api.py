"""The portal's API and pages over HTTP: login, sessions and cookies, CSRF, the log search and
a message's history, and tenant isolation (no other namespace, no row without one)."""

from __future__ import annotations

import csv
import io

import pytest
import requests

from .conftest import RunningPortal

pytestmark = pytest.mark.parametrize("backend", ["sqlite", "postgresql"])


def test_login_sets_one_strict_session_cookie_and_rotates_it(portal: RunningPortal) -> None:
    s = requests.Session()
    r = s.get(portal.url + "/", allow_redirects=False)
    assert r.status_code == 303 and r.headers["Location"] == "/login"
    assert "Set-Cookie" not in r.headers
    login = s.get(portal.url + "/login")
    assert "Set-Cookie" not in login.headers  # no cookie before login
    r = s.post(portal.url + "/login", data={"token": "alice-token"}, allow_redirects=False,
               headers={"Origin": portal.url})
    assert r.status_code == 303
    cookies = r.raw.headers.getlist("Set-Cookie")
    assert len(cookies) == 1
    cookie = cookies[0]
    assert cookie.startswith("mailplane_session=")
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/", "Max-Age="):
        assert flag in cookie, cookie
    first = s.cookies["mailplane_session"]
    # Logging in again gives a new session and ends the old one.
    r = requests.post(portal.url + "/login", data={"token": "alice-token"},
                      allow_redirects=False, headers={"Origin": portal.url},
                      cookies={"mailplane_session": first})
    second = r.cookies["mailplane_session"]
    assert second != first
    stale = requests.get(portal.url + "/api/v1/whoami", cookies={"mailplane_session": first})
    assert stale.status_code == 401
    assert requests.get(portal.url + "/api/v1/whoami", cookies={
        "mailplane_session": second}).json()["username"] == "alice"


def test_bad_token_is_refused(portal: RunningPortal) -> None:
    r = requests.post(portal.url + "/login", data={"token": "nobody"}, allow_redirects=False,
                      headers={"Origin": portal.url})
    assert r.status_code == 401 and "did not accept" in r.text
    assert "Set-Cookie" not in r.headers
    r = requests.get(portal.url + "/api/v1/whoami", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_security_headers(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    for path in ("/login", "/", "/ns/shop/logs", "/api/v1/namespaces"):
        r = s.get(portal.url + path)
        assert r.status_code == 200, path
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "unsafe-inline" not in csp
        assert "script-src 'none'" in csp
        assert r.headers["X-Frame-Options"] == "DENY"
        assert r.headers["Cache-Control"] == "no-store"
    page = s.get(portal.url + "/ns/shop/logs").text
    assert "<script" not in page and "style=" not in page
    # Redirects too: the login's answer carries the session cookie.
    login = requests.post(portal.url + "/login", data={"token": "alice-token"},
                          allow_redirects=False, headers={"Origin": portal.url})
    away = requests.get(portal.url + "/ns/shop/logs", allow_redirects=False)
    for r in (login, away):
        assert r.status_code == 303
        assert r.headers["Cache-Control"] == "no-store"
        assert r.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"]
    assert "mailplane_session" in login.headers["Set-Cookie"]


def test_logout_revokes_the_session_server_side(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    sid = s.cookies["mailplane_session"]
    r = s.post(portal.url + "/logout", data={"csrf": s.headers["X-CSRF-Token"]},
               allow_redirects=False)
    assert r.status_code == 303
    assert requests.get(portal.url + "/api/v1/whoami",
                        cookies={"mailplane_session": sid}).status_code == 401


def test_state_change_needs_csrf_token_and_same_origin(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    token = s.headers.pop("X-CSRF-Token")
    r = s.post(portal.url + "/logout", data={}, allow_redirects=False)
    assert r.status_code == 403 and "CSRF" in r.text
    r = s.post(portal.url + "/logout", data={"csrf": "wrong"}, allow_redirects=False)
    assert r.status_code == 403
    r = s.post(portal.url + "/logout", data={"csrf": token}, allow_redirects=False,
               headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-site" in r.text
    assert s.get(portal.url + "/api/v1/whoami").status_code == 200  # still logged in


def test_origin_is_scheme_host_and_port_and_one_of_origin_or_referer_is_needed(
        portal: RunningPortal) -> None:
    """A login form posted from another origin, or by a browser that names none, would log the
    victim in as the attacker (login CSRF): the token login form has only this check."""
    host = portal.url.split("://", 1)[1]
    port = host.rsplit(":", 1)[1]

    def login(headers: dict[str, str]) -> requests.Response:
        return requests.post(portal.url + "/login", data={"token": "alice-token"},
                             allow_redirects=False, headers=headers)

    for headers in ({"Origin": "ftp://" + host},
                    {"Origin": "http://127.0.0.2:" + port},
                    {"Origin": portal.url.rsplit(":", 1)[0] + ":1"},
                    {"Origin": "null", "Referer": "https://evil.example/"},
                    {"Referer": "http://" + host + ".evil.example/login"},
                    {"Origin": "http://evil.example", "Referer": portal.url + "/login"}):
        r = login(headers)
        assert r.status_code == 403 and "cross-site request refused" in r.text, headers
        assert "Set-Cookie" not in r.headers
    for headers in ({}, {"Origin": "null"}):  # a browser too old to say where it came from
        r = login(headers)
        assert r.status_code == 403 and "names no origin" in r.text, headers
        assert "Set-Cookie" not in r.headers
    for headers in ({"Origin": portal.url}, {"Origin": portal.url.upper()},
                    {"Origin": "null", "Referer": portal.url + "/login"},
                    {"Referer": portal.url + "/login?x=1"}):
        assert login(headers).status_code == 303, headers


def test_namespaces_are_those_the_user_may_read(portal: RunningPortal) -> None:
    assert portal.session("alice-token").get(
        portal.url + "/api/v1/namespaces").json() == {"namespaces": ["shop"]}
    assert requests.get(portal.url + "/api/v1/namespaces",
                        headers={"Authorization": "Bearer bob-token"}).json() == {
        "namespaces": ["blog"]}


def test_search_is_scoped_and_paged(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    seen: list[str] = []
    params: dict[str, str] = {"page_size": "50"}
    while True:
        body = s.get(portal.url + "/api/v1/namespaces/shop/logs", params=params).json()
        seen += [row["queue_id"] for row in body["items"]]
        if not body["next_cursor"]:
            break
        params["cursor"] = body["next_cursor"]
    assert len(seen) == 123 and len(set(seen) - {"SHOPHIST"}) == 120
    assert not any(q.startswith(("BLOG", "NOTENANT")) for q in seen)
    # filters
    body = s.get(portal.url + "/api/v1/namespaces/shop/logs",
                 params={"recipient": "customer1@mail.example"}).json()
    assert [r["queue_id"] for r in body["items"]] == ["SHOP0001"]  # not blog's BLOGSECRET2
    body = s.get(portal.url + "/api/v1/namespaces/shop/logs",
                 params={"status": "deferred"}).json()
    assert [r["queue_id"] for r in body["items"]] == ["SHOPHIST"]
    r = s.get(portal.url + "/api/v1/namespaces/shop/logs", params={"status": "lost"})
    assert r.status_code == 400 and "status" in r.json()["error"]
    r = s.get(portal.url + "/api/v1/namespaces/shop/logs", params={"since": "yesterday"})
    assert r.status_code == 400 and "since" in r.json()["error"]
    for bad in ("nan", "inf", "-1e300"):
        r = s.get(portal.url + "/api/v1/namespaces/shop/logs", params={"until": bad})
        assert r.status_code == 400 and "until" in r.json()["error"], bad


def test_message_history_lists_every_attempt(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    body = s.get(portal.url + "/api/v1/namespaces/shop/messages/SHOPHIST").json()
    assert [e["status"] for e in body["events"]] == ["received", "deferred", "delivered"]
    assert body["events"][1]["response"] == "451 4.7.1 try later"
    page = s.get(portal.url + "/ns/shop/messages/SHOPHIST")
    assert page.status_code == 200 and "mx.slow.example" in page.text


def test_csv_export_is_scoped_and_formula_safe(portal: RunningPortal) -> None:
    s = portal.session("alice-token")
    r = s.get(portal.url + "/ns/shop/logs.csv")
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0][:3] == ["time", "status", "queue_id"]
    assert len(rows) == 1 + 123
    assert "blog.example" not in r.text and "platform.example" not in r.text


def test_other_namespace_is_refused_everywhere(portal: RunningPortal) -> None:
    """IDOR: alice changes the namespace or the queue id in URLs and API calls."""
    alice = portal.session("alice-token")
    for path in ("/api/v1/namespaces/blog/logs", "/api/v1/namespaces/blog/messages/BLOGSECRET1",
                 "/ns/blog/logs", "/ns/blog/logs.csv", "/ns/blog/messages/BLOGSECRET1"):
        r = alice.get(portal.url + path)
        assert r.status_code == 403, path
        assert "secret.example" not in r.text and "news@blog.example" not in r.text, path
    # blog's queue id under alice's own namespace: not found, nothing of blog's
    r = alice.get(portal.url + "/api/v1/namespaces/shop/messages/BLOGSECRET1")
    assert r.status_code == 404 and "secret.example" not in r.text
    r = alice.get(portal.url + "/api/v1/namespaces/shop/logs",
                  params={"queue_id": "BLOGSECRET1"})
    assert r.json()["items"] == []
    # rows without a tenant: no namespace name reaches them
    for ns in ("", "-", "default", "%20"):
        r = alice.get(portal.url + f"/api/v1/namespaces/{ns}/logs")
        assert r.status_code in (400, 403, 404), ns
        assert "platform.example" not in r.text
    # a bearer token on the API is authorised the same way
    r = requests.get(portal.url + "/api/v1/namespaces/shop/logs",
                     headers={"Authorization": "Bearer bob-token"})
    assert r.status_code == 403
    # a cookie is not accepted for another user's namespace after a permission is taken away
    portal.api.emulator.revoke("group:shop-team", "get", "smtpcredentials", "shop")
    assert alice.get(portal.url + "/api/v1/namespaces/shop/logs").status_code == 403


def test_every_namespace_request_asks_the_api_server(portal: RunningPortal) -> None:
    s = portal.session("carol-token")
    before = len(portal.api.emulator.reviews)
    for _ in range(3):
        assert s.get(portal.url + "/api/v1/namespaces/shop/logs").status_code == 200
    reviews = portal.api.emulator.reviews[before:]
    assert len(reviews) == 3
    assert all(r["user"] == "carol" and r["resourceAttributes"] == {
        "namespace": "shop", "verb": "get", "group": "mailplane.io",
        "resource": "smtpcredentials"} for r in reviews)
