"""OIDC redirect login against a real (small, strict) issuer on loopback over TLS: the flow in
Chromium, and each way an answer can be wrong refused with a page saying why."""

from __future__ import annotations

import html
import re
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import trustme

from mailplane_portal.oidc import OidcClient, OidcSettings
from mailplane_portal.web import Portal
from tests.helpers.oidc import Issuer, running_issuer

from .conftest import RunningPortal
from .test_browser import CHROMIUM, browser  # noqa: F401 (a fixture)

COOKIE = "mailplane_session"
LOGIN_COOKIE = "mailplane_login"
ALICE = {"sub": "u-1001", "email": "alice@shop.example", "email_verified": True,
         "groups": ["shop-team"]}


@pytest.fixture
def issuer(tmp_path: Path) -> Iterator[Issuer]:
    with running_issuer(trustme.CA(), tmp_path / "issuer") as running:
        running.user = dict(ALICE)
        yield running


@pytest.fixture
def portal_setup(issuer: Issuer) -> Callable[[Portal, str], None]:
    def setup(p: Portal, url: str) -> None:
        issuer.client.redirect_uri = url + "/login/callback"
        p.oidc = OidcClient(OidcSettings(
            issuer=issuer.url, client_id=issuer.client.client_id,
            client_secret=issuer.client.secret, redirect_url=issuer.client.redirect_uri,
            username_claim="email", groups_claim="groups", groups_prefix="oidc:",
            ca_file=str(issuer.ca_file)))
    return setup


@pytest.fixture
def grants(portal: RunningPortal) -> RunningPortal:
    portal.api.emulator.grant("group:oidc:shop-team", "get", "smtpcredentials", "shop")
    return portal


def _start(portal: RunningPortal, issuer: Issuer) -> tuple[str, str]:
    """Begin a login: the started login's cookie and the issuer's authorize URL."""
    r = _press_button(portal.url)
    assert r.status_code == 303, r.text
    location = r.headers["Location"]
    assert location.startswith(issuer.url + "/authorize?")
    cookie = r.headers["Set-Cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=Lax", "Path=/"):
        assert flag in cookie, cookie
    return r.cookies[COOKIE], location


def _login_page(url: str) -> tuple[str, str]:
    """The pre-login cookie and the login CSRF token of the login page's OIDC button."""
    page = requests.get(url + "/login")
    assert page.status_code == 200, page.text
    cookie = page.headers["Set-Cookie"]
    for flag in ("HttpOnly", "Secure", "SameSite=Strict", "Path=/login", "Max-Age=1800"):
        assert flag in cookie, cookie
    found = re.search(r'action="/login/oidc"><input type="hidden" name="csrf" value="([^"]+)"',
                      page.text)
    assert found, page.text
    return page.cookies[LOGIN_COOKIE], html.unescape(found.group(1))


def _press_button(url: str, origin: str | None = None) -> requests.Response:
    value, token = _login_page(url)
    return requests.post(url + "/login/oidc", data={"csrf": token}, allow_redirects=False,
                         cookies={LOGIN_COOKIE: value}, headers={"Origin": origin or url})


def _at_issuer(issuer: Issuer, url: str) -> str:
    r = requests.get(url, verify=str(issuer.ca_file), allow_redirects=False)
    assert r.status_code == 302, r.text
    return str(r.headers["Location"])


def _callback(url: str, pid: str) -> requests.Response:
    return requests.get(url, cookies={COOKIE: pid}, allow_redirects=False)


def _login(portal: RunningPortal, issuer: Issuer) -> requests.Response:
    pid, authorize = _start(portal, issuer)
    return _callback(_at_issuer(issuer, authorize), pid)


def _whoami(portal: RunningPortal, sid: str) -> requests.Response:
    return requests.get(portal.url + "/api/v1/whoami", cookies={COOKIE: sid})


def test_the_flow_logs_in_with_the_claims_as_the_api_server_names_them(
        grants: RunningPortal, issuer: Issuer) -> None:
    portal = grants
    pid, authorize = _start(portal, issuer)
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(authorize).query)
    assert query["code_challenge_method"] == ["S256"] and query["response_type"] == ["code"]
    assert "openid" in query["scope"][0].split()
    r = _callback(_at_issuer(issuer, authorize), pid)
    assert r.status_code == 200, r.text
    assert 'http-equiv="refresh"' in r.text
    cookies = r.raw.headers.getlist("Set-Cookie")
    assert len(cookies) == 1 and "SameSite=Strict" in cookies[0], cookies
    sid = r.cookies[COOKIE]
    assert sid != pid
    me = _whoami(portal, sid).json()
    assert me["username"] == "alice@shop.example"
    assert set(me["groups"]) == {"oidc:shop-team", "system:authenticated"}
    # The SubjectAccessReview decides, with that user and those groups.
    assert requests.get(portal.url + "/api/v1/namespaces/shop/logs",
                        cookies={COOKIE: sid}).status_code == 200
    assert requests.get(portal.url + "/api/v1/namespaces/blog/logs",
                        cookies={COOKIE: sid}).status_code == 403
    # The started login is used once; it never was a session.
    assert _whoami(portal, pid).status_code == 401
    again = _callback(_at_issuer(issuer, authorize), pid)
    assert again.status_code == 400 and "no login under way" in again.text
    assert issuer.refusals == []


def test_es256_and_a_rotated_key_are_fetched_and_accepted(grants: RunningPortal,
                                                          issuer: Issuer) -> None:
    assert _login(grants, issuer).status_code == 200
    assert issuer.jwks_fetches == 1
    assert _login(grants, issuer).status_code == 200
    assert issuer.jwks_fetches == 1  # cached
    issuer.rotate()
    issuer.alg = "ES256"
    r = _login(grants, issuer)
    assert r.status_code == 200, r.text
    assert issuer.jwks_fetches == 2  # an unknown key id: fetched again


def test_a_withdrawn_key_is_trusted_ten_minutes_at_most(grants: RunningPortal,
                                                        issuer: Issuer) -> None:
    from mailplane_portal.oidc import KEYS_TTL

    assert _login(grants, issuer).status_code == 200
    issuer.withdrawn.add(issuer.rsa_kid)  # e.g. a leaked key, still used by an attacker
    assert _login(grants, issuer).status_code == 200  # the cached key set still has it
    oidc = grants.portal.oidc
    assert oidc is not None
    oidc._keys_fetched -= KEYS_TTL + 1  # ten minutes on
    r = _login(grants, issuer)
    assert r.status_code == 401 and "a key the issuer does not publish" in r.text


@pytest.mark.parametrize(("forge", "message"), [
    ({"nonce": "someone-elses-nonce"}, "nonce does not match"),
    ({"exp": -3600}, "has expired"),
    ({"iat": 4102444800}, "issued in the future"),
    ({"aud": "another-client"}, "not meant for this portal"),
    ({"aud": ["mailplane-portal", "another-client"], "azp": "another-client"},
     "authorized party"),
    ({"iss": "https://evil.example"}, "issued by 'https://evil.example'"),
    ({"bad_signature": True}, "signature is not valid"),
    ({"alg": "none"}, "signed with 'none'"),
    ({"alg": "HS256"}, "signed with 'HS256'"),
    ({"email_verified": False}, "not verified"),
])
def test_a_wrong_id_token_is_refused_with_the_reason(
        grants: RunningPortal, issuer: Issuer, forge: dict[str, Any], message: str) -> None:
    issuer.forge = forge
    pid, authorize = _start(grants, issuer)
    r = _callback(_at_issuer(issuer, authorize), pid)
    assert r.status_code == 401, r.text
    text = html.unescape(r.text)
    assert "login refused" in text and message in text, text
    assert "Max-Age=0" in r.headers["Set-Cookie"]  # the started login's cookie is cleared
    assert _whoami(grants, pid).status_code == 401


def test_a_wrong_state_or_a_foreign_browser_is_refused(grants: RunningPortal,
                                                       issuer: Issuer) -> None:
    pid, authorize = _start(grants, issuer)
    back = _at_issuer(issuer, authorize)
    parts = urllib.parse.urlsplit(back)
    query = dict(urllib.parse.parse_qsl(parts.query))
    forged = back.replace(urllib.parse.quote(query["state"]), "forged-state")
    r = _callback(forged, pid)
    assert r.status_code == 400 and "state mismatch" in r.text, r.text
    # An attacker's own code delivered to another browser (login CSRF): no login under way.
    _attackers, authorize2 = _start(grants, issuer)
    r = _callback(_at_issuer(issuer, authorize2), "not-this-browser")
    assert r.status_code == 400 and "no login under way" in r.text
    # The issuer's refusal is shown as it said it.
    pid3, authorize3 = _start(grants, issuer)
    state = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(authorize3).query))["state"]
    r = _callback(grants.url + "/login/callback?" + urllib.parse.urlencode(
        {"error": "access_denied", "error_description": "the user said no",
         "state": state}), pid3)
    assert r.status_code == 401 and "access_denied: the user said no" in r.text


def test_another_site_cannot_start_a_login(grants: RunningPortal, issuer: Issuer) -> None:
    """Starting a login replaces the browser's session cookie: a link or form of another site
    must not do it (a forced logout), whatever headers the browser sends or leaves out."""
    sid = str(_login(grants, issuer).cookies[COOKIE])
    assert _whoami(grants, sid).status_code == 200
    # A link (or an image) to the old address: back to the login page, nothing changed.
    r = requests.get(grants.url + "/login/oidc", allow_redirects=False, cookies={COOKIE: sid})
    assert r.status_code == 303 and r.headers["Location"] == "/login"
    assert "Set-Cookie" not in r.headers
    value, token = _login_page(grants.url)
    # Another site's form, from a browser that sends no Origin, Referer or Sec-Fetch-Site:
    # its SameSite=Strict pre-login cookie stays home, and the site cannot read the token.
    for cookies, data in (({COOKIE: sid}, {"csrf": token}),
                          ({COOKIE: sid, LOGIN_COOKIE: value}, {}),
                          ({COOKIE: sid, LOGIN_COOKIE: value}, {"csrf": "forged"}),
                          ({COOKIE: sid, LOGIN_COOKIE: "A" * 43}, {"csrf": token})):
        r = requests.post(grants.url + "/login/oidc", data=data, cookies=cookies,
                          allow_redirects=False, headers={"Referer": grants.url + "/login"})
        assert r.status_code == 403 and "login CSRF token" in r.text, (cookies, data, r.text)
        assert COOKIE + "=" not in r.headers.get("Set-Cookie", "")
    # The right token from another origin (scheme, host or port differing) is refused too.
    for origin in ("https://evil.example", grants.url.replace("http://", "https://"),
                   grants.url.rsplit(":", 1)[0] + ":1"):
        r = requests.post(grants.url + "/login/oidc", data={"csrf": token},
                          cookies={COOKIE: sid, LOGIN_COOKIE: value}, allow_redirects=False,
                          headers={"Origin": origin})
        assert r.status_code == 403 and "cross-site" in r.text, origin
    assert _whoami(grants, sid).status_code == 200  # still logged in
    assert issuer.url not in str(r.headers.get("Location"))
    # A link to the callback, from another site (no Strict cookie sent) or this one: refused,
    # and the browser keeps its session cookie.
    for cookies in ({}, {COOKIE: sid}):
        r = requests.get(grants.url + "/login/callback?state=x&code=y", cookies=cookies,
                         allow_redirects=False)
        assert r.status_code == 400 and "no login under way" in r.text
        assert COOKIE + "=" not in r.headers.get("Set-Cookie", ""), cookies
    assert _whoami(grants, sid).status_code == 200


def test_a_wrong_client_secret_is_shown_as_the_issuer_refusing(
        grants: RunningPortal, issuer: Issuer) -> None:
    issuer.client.secret = "rotated-at-the-issuer"
    r = _login(grants, issuer)
    assert r.status_code == 401
    assert "refused the token request: invalid_client" in r.text
    assert issuer.refusals == ["invalid_client: client authentication failed"]


def test_claims_map_like_the_api_servers_flags() -> None:
    base = {"issuer": "https://idp.example", "client_id": "c", "client_secret": "s",
            "redirect_url": "https://portal.example/login/callback"}
    claims = {"sub": "42", "email": "a@b.example", "groups": ["x", "y"]}
    name = OidcClient(OidcSettings(**base)).identity(claims)  # type: ignore[arg-type]
    assert name.username == "https://idp.example#42" and name.groups == ()
    name = OidcClient(OidcSettings(**base, username_prefix="-", groups_claim="groups",  # type: ignore[arg-type]
                                   groups_prefix="idp:")).identity(claims)
    assert name.username == "42" and name.groups == ("idp:x", "idp:y")
    name = OidcClient(OidcSettings(**base, username_claim="email",  # type: ignore[arg-type]
                                   username_prefix="oidc:")).identity(claims)
    assert name.username == "oidc:a@b.example"
    with pytest.raises(ValueError, match="https://"):
        OidcSettings(**{**base, "issuer": "http://idp.example"})  # type: ignore[arg-type]


def test_in_chromium(browser: Any, grants: RunningPortal, issuer: Issuer,  # noqa: F811
                     tmp_path: Path) -> None:
    assert Path(CHROMIUM).exists()
    # The issuer's certificate is from the test CA, which this browser does not know; the
    # portal itself checks it (ca_file) on every call it makes.
    context = browser.new_context(ignore_https_errors=True)
    page = context.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(grants.url + "/login")
    page.screenshot(path=str(tmp_path / "oidc-login.png"), full_page=True)
    page.click("#oidc-login")
    page.wait_for_url(grants.url + "/")
    assert page.locator("#namespaces li").all_inner_texts() == ["shop\nMessage log"]
    assert "alice@shop.example" in page.locator("nav .user").inner_text()
    cookies = context.cookies()
    assert [(c["name"], c["sameSite"], c["httpOnly"]) for c in cookies] == [
        (COOKIE, "Strict", True)]
    page.screenshot(path=str(tmp_path / "oidc-home.png"), full_page=True)
    page.click("#logout")
    page.wait_for_url(grants.url + "/login")

    issuer.forge = {"aud": "another-client"}
    page.click("#oidc-login")
    page.wait_for_selector(".error")
    assert "not meant for this portal" in page.locator(".error").inner_text()
    page.screenshot(path=str(tmp_path / "oidc-refused.png"), full_page=True)
    # Only the login page's own pre-login cookie is left (on /login, for the next try).
    assert [(c["name"], c["path"], c["sameSite"], c["httpOnly"])
            for c in context.cookies()] == [(LOGIN_COOKIE, "/login", "Strict", True)]
    # The one console error is the refusal's own status (401); nothing the CSP blocked.
    assert [e for e in errors if "status of 401" not in e] == [], errors
    context.close()


@pytest.mark.parametrize(("extra", "message"), [
    (["--oidc-issuer", "https://idp.example"], "needs all of --oidc-issuer, --oidc-client-id"),
    (["--oidc-issuer", "https://idp.example", "--oidc-client-id", "c",
      "--oidc-client-secret-file", "/nonexistent/secret", "--oidc-redirect-url",
      "https://p.example/login/callback"], "--oidc-client-secret-file /nonexistent/secret: "
                                           "cannot read it"),
    (["--trusted-proxies", "ten"], "--trusted-proxies 'ten'"),
    (["--public-url", "portal.example"], "--public-url 'portal.example': give the portal's"),
])
def test_the_command_line_names_a_bad_oidc_setting(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str],
        message: str) -> None:
    from mailplane_cli.main import build_parser

    args = build_parser().parse_args(["portal", "--db", str(tmp_path / "s.db"), "--kube-api",
                                      "http://127.0.0.1:9", *extra])
    assert args.func(args) == 2
    assert message in capsys.readouterr().err


def test_the_command_starts_with_oidc_login(tmp_path: Path, issuer: Issuer) -> None:
    """`mailplane portal` with the --oidc-* flags (as the chart passes them): the login page
    offers the issuer, and a login goes there with this client and redirect URL."""
    import re
    import subprocess
    import sys
    import time

    from tests.helpers.kube import running_emulator

    secret = tmp_path / "client-secret"
    secret.write_text(issuer.client.secret + "\n")
    with running_emulator() as api:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mailplane_cli.main", "portal", "--db",
             str(tmp_path / "store.db"), "--listen", "127.0.0.1:0", "--kube-api", api.url,
             "--oidc-issuer", issuer.url, "--oidc-client-id", issuer.client.client_id,
             "--oidc-client-secret-file", str(secret), "--oidc-redirect-url",
             "https://portal.example/login/callback", "--oidc-ca-file", str(issuer.ca_file),
             "--oidc-groups-claim", "groups"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            assert proc.stdout is not None
            deadline = time.monotonic() + 30
            url = None
            while url is None and time.monotonic() < deadline:
                line = proc.stdout.readline()
                assert line, "the portal exited before serving"
                found = re.search(r"serving on (http://[\d.]+:\d+)/", line)
                url = found.group(1) if found else None
            assert url is not None
            page = requests.get(url + "/login").text
            assert 'id="oidc-login"' in page and issuer.url in page
            # The portal's origin is its public one (here the redirect URL's), not the
            # address it listens on.
            assert _press_button(url).status_code == 403
            r = _press_button(url, origin="https://portal.example")
            assert r.status_code == 303, r.text
            query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(
                r.headers["Location"]).query))
            assert query["client_id"] == "mailplane-portal"
            assert query["redirect_uri"] == "https://portal.example/login/callback"
        finally:
            proc.terminate()
            proc.wait(15)


@pytest.mark.parametrize(("claims", "groups_prefix", "message"), [
    # An email claim is taken as it is (no prefix, as the API server does).
    ({"email": "system:kube-controller-manager"}, "oidc:", "a name Kubernetes reserves"),
    ({"groups": ["shop-team", "system:masters"]}, "", "the group 'system:masters'"),
])
def test_an_issuer_cannot_name_a_kubernetes_system_user_or_group(
        grants: RunningPortal, issuer: Issuer, claims: dict[str, Any], groups_prefix: str,
        message: str) -> None:
    """A SubjectAccessReview for ``system:masters`` is always allowed: a name the identity
    provider hands out (an email, a self-service group) must not become one."""
    import dataclasses

    oidc = grants.portal.oidc
    assert oidc is not None
    oidc.settings = dataclasses.replace(oidc.settings, groups_prefix=groups_prefix)
    grants.api.emulator.grant("group:system:masters", "get", "smtpcredentials", "blog")
    issuer.user.update(claims)
    pid, authorize = _start(grants, issuer)
    r = _callback(_at_issuer(issuer, authorize), pid)
    assert r.status_code == 401, r.text
    text = html.unescape(r.text)
    assert "login refused" in text and message in text, text
    assert "Set-Cookie" in r.headers and "Max-Age=0" in r.headers["Set-Cookie"]


def test_the_login_page_lets_the_button_go_to_the_issuer(grants: RunningPortal,
                                                         issuer: Issuer) -> None:
    """The button's form is redirected to the issuer: the login page's form-action names the
    authorization endpoint's origin (a browser would stop there otherwise), and an issuer that
    does not answer leaves the page usable, naming the issuer's own origin."""
    r = requests.get(grants.url + "/login")
    host = urllib.parse.urlsplit(issuer.url)
    assert f"form-action 'self' https://{host.hostname}:{host.port};" in (
        r.headers["Content-Security-Policy"])
    settings = grants.portal.oidc.settings  # type: ignore[union-attr]
    grants.portal.oidc = OidcClient(OidcSettings(**{**settings.__dict__,
                                                    "issuer": "https://127.0.0.1:1"}))
    r = requests.get(grants.url + "/login")
    assert r.status_code == 200 and 'id="oidc-login"' in r.text
    assert "form-action 'self' https://127.0.0.1:1;" in r.headers["Content-Security-Policy"]
    r = _press_button(grants.url)
    assert r.status_code == 503 and "did not answer" in html.unescape(r.text)
