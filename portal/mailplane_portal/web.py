"""The portal's HTTP server: HTML pages and a JSON API over the same handlers.

Every request that touches a namespace is authorised by a SubjectAccessReview for that
namespace, made with the identity the API server gave for the caller's token (``get
smtpcredentials`` to read, ``update smtpcredentials`` to change). Nothing is cached between
requests: a permission taken away in Kubernetes is gone at the next click.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import logging
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mailplane_relay.events import STATUSES
from mailplane_relay.store import StoreBackend, StoreError, complaint_hash

from . import charts, openapi
from . import html as h
from .devkube import DevKube
from .kube import Identity, KubeClient, KubeUnavailable
from .oidc import OidcClient, OidcError, OidcUnavailable
from .ratelimit import Limiter, Network, client_address, retry_after
from .records import COMPLAINT_DAYS, OTHER_TEAM, Records, figures, mask, own_source
from .search import (
    BadRequest,
    Search,
    check_namespace,
    csv_cell,
    export_csv,
    history,
    iso,
    page,
    public_row,
)
from .sessions import (
    COOKIE,
    LOGIN_COOKIE,
    LOGIN_COOKIE_AGE,
    Session,
    SessionStore,
    csrf_ok,
    login_csrf,
    login_csrf_ok,
    login_value,
)

log = logging.getLogger(__name__)

READ = "get"
WRITE = "update"
RESOURCE = "smtpcredentials"

CSP = ("default-src 'self'; script-src 'none'; object-src 'none'; base-uri 'none'; "
       "form-action 'self'; frame-ancestors 'none'; img-src 'self'; style-src 'self'")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Caller:
    identity: Identity
    session: Session | None  # None: a bearer token on the API (no cookie, no CSRF needed)


class Portal:
    def __init__(self, store: StoreBackend, kube: KubeClient | DevKube, records: Records, *,
                 sessions: SessionStore | None = None, secure_cookie: bool = True,
                 oidc: OidcClient | None = None, login_by_address: Limiter | None = None,
                 login_by_user: Limiter | None = None,
                 trusted_proxies: tuple[Network, ...] = (),
                 public_url: str | None = None) -> None:
        self.store = store
        self.kube = kube
        self.records = records
        self.tasks: set[asyncio.Task[None]] = set()
        self.sessions = sessions or SessionStore(records)
        self.secure_cookie = secure_cookie
        self.oidc = oidc
        self.login_by_address = login_by_address or Limiter(burst=10, per_minute=10)
        self.login_by_user = login_by_user or Limiter(burst=5, per_minute=5)
        self.trusted_proxies = trusted_proxies
        self.public_url = public_url

    @property
    def public_origin(self) -> tuple[str, str, int] | None:
        """The origin browsers show for the portal's own pages: the configured public URL's, or
        else the OIDC redirect URL's (None: the request's Host, see ``_same_origin``)."""
        url = self.public_url or (self.oidc.settings.redirect_url if self.oidc else None)
        return _origin(url) if url else None

    # ---- who is calling

    async def caller(self, request: web.Request) -> Caller | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and request.path.startswith("/api/"):
            identity = await self.kube.review_token(auth[7:].strip())
            return Caller(identity, None) if identity is not None else None
        session = await self.sessions.get(request.cookies.get(COOKIE))
        return Caller(session.identity, session) if session is not None else None

    async def authorise(self, caller: Caller, namespace: str, verb: str) -> None:
        check_namespace(namespace)
        if not await self.kube.allowed(caller.identity, verb, RESOURCE, namespace):
            action = "read" if verb == READ else "change"
            raise web.HTTPForbidden(text=(
                f"you may not {action} Mailplane data in namespace {namespace}: it needs "
                f"'{verb} {RESOURCE}' there in Kubernetes RBAC"))

    async def visible_namespaces(self, caller: Caller) -> list[str]:
        """Namespaces holding Mailplane credentials or domains that the caller may read."""
        names: set[str] = set()
        for plural in ("smtpcredentials", "sendingdomains"):
            for item in await self.kube.list(plural):
                ns = (item.get("metadata") or {}).get("namespace")
                if isinstance(ns, str) and ns:
                    names.add(ns)
        ordered = sorted(names)
        allowed = await asyncio.gather(*(
            self.kube.allowed(caller.identity, READ, RESOURCE, ns) for ns in ordered))
        return [ns for ns, ok in zip(ordered, allowed, strict=True) if ok]


PORTAL: web.AppKey[Portal] = web.AppKey("portal", Portal)
CALLER: web.RequestKey[Caller] = web.RequestKey("caller", Caller)


def _wants_json(request: web.Request) -> bool:
    return request.path.startswith("/api/")


def _problem(request: web.Request, status: int, message: str) -> web.Response:
    if _wants_json(request):
        return web.json_response({"error": message, "status": status}, status=status)
    body = h.error_box(message)
    if status == 401:
        body += '<p><a href="/login">Log in</a></p>'
    return web.Response(text=h.layout("Error", body), status=status,
                        content_type="text/html")


@web.middleware
async def security(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Security headers on every answer; errors as JSON on the API and HTML elsewhere."""
    try:
        response = await handler(request)
    except web.HTTPRedirection as exc:
        # A redirect may set the session cookie (login) or name a page: the same headers,
        # so no cache keeps it.
        _secure_headers(exc.headers)
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _problem(request, exc.status, exc.text or exc.reason)
        if "Retry-After" in exc.headers:
            response.headers["Retry-After"] = exc.headers["Retry-After"]
    except BadRequest as exc:
        response = _problem(request, 400, str(exc))
    except KubeUnavailable as exc:
        log.warning("Kubernetes API: %s", exc)
        response = _problem(request, 503, "the Kubernetes API did not answer; try again")
    except StoreError as exc:
        log.warning("store: %s", exc)
        response = _problem(request, 503, "the message store did not answer; try again")
    _secure_headers(response.headers)
    return response


def _secure_headers(headers: MutableMapping[str, str]) -> None:
    headers.setdefault("Content-Security-Policy", CSP)  # the login page widens form-action
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "same-origin"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")


PUBLIC = ("/login", "/static/", "/openapi.json", "/healthz", "/favicon.ico")


@web.middleware
async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Who the caller is; a state change from a browser session needs the same origin and the
    session's CSRF token."""
    portal = request.app[PORTAL]
    if request.path.startswith(PUBLIC) or request.path == "/login":
        if request.method not in ("GET", "HEAD"):
            _same_origin(request)
        return await handler(request)
    bearer = (_wants_json(request) and request.headers.get("Authorization", "").lower()
              .startswith("bearer "))
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"),
                             portal.trusted_proxies)
    if bearer and (wait := portal.login_by_address.held(address)):
        # Tokens guessed over the API are held back as on the login page (and the API
        # server is not asked on their behalf).
        raise web.HTTPTooManyRequests(
            text=f"too many refused tokens from your address: wait {retry_after(wait)} "
                 "seconds and try again", headers={"Retry-After": retry_after(wait)})
    caller = await portal.caller(request)
    if caller is None:
        if bearer:
            portal.login_by_address.take(address)
        if _wants_json(request):
            raise web.HTTPUnauthorized(text="log in: send 'Authorization: Bearer TOKEN' (a "
                                            "Kubernetes token) or a session cookie")
        raise web.HTTPSeeOther("/login")
    if request.method not in ("GET", "HEAD") and caller.session is not None:
        _same_origin(request)
        offered = request.headers.get("X-CSRF-Token")
        if offered is None and request.content_type in (
                "application/x-www-form-urlencoded", "multipart/form-data"):
            offered = str((await request.post()).get("csrf") or "")
        if not csrf_ok(caller.session, offered):
            raise web.HTTPForbidden(text="the form is out of date (CSRF token missing or "
                                         "wrong): reload the page and try again")
    request[CALLER] = caller
    return await handler(request)


def _origin(url: str) -> tuple[str, str, int] | None:
    """Scheme, host and port of ``url`` (the default port filled in), or None if it has none."""
    try:
        parts = urllib.parse.urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        return None
    return scheme, parts.hostname.lower(), port or (443 if scheme == "https" else 80)


def _same_origin(request: web.Request) -> None:
    """A state change must come from a page of the portal: its Origin (or, when a browser sends
    none or ``null``, its Referer) must have the portal's scheme, host and port. A request with
    neither is refused: a browser too old to send them is left without login CSRF protection
    otherwise."""
    portal = request.app[PORTAL]
    origin = request.headers.get("Origin")
    source = origin if origin not in (None, "null") else request.headers.get("Referer")
    if not source:
        raise web.HTTPForbidden(text=(
            "request refused: it names no origin (neither an Origin header, or only 'null', "
            "nor a Referer), so it cannot be told apart from one sent by another site; use a "
            "current browser (or send 'Origin: <the portal's URL>'), or call the API with "
            "'Authorization: Bearer TOKEN'"))
    theirs = _origin(source)
    ours = portal.public_origin
    if ours is None:
        # No public URL configured: the Host the request was sent to, over the scheme it
        # arrived by or HTTPS (a proxy in front may end TLS), on the port the Host names or
        # else that scheme's default port.
        try:
            sent_to = urllib.parse.urlsplit("//" + request.headers.get("Host", ""))
            named_port = sent_to.port
        except ValueError:
            sent_to, named_port = urllib.parse.urlsplit(""), None
        ok = (theirs is not None and theirs[1] == (sent_to.hostname or "").lower()
              and theirs[0] in {request.scheme, "https"}
              and theirs[2] == (named_port or (443 if theirs[0] == "https" else 80)))
    else:
        ok = theirs == ours
    if not ok:
        raise web.HTTPForbidden(text=(
            f"cross-site request refused: it comes from {source[:100]!r}, not from the "
            "portal's own pages (scheme, host and port must match)"))


def _caller(request: web.Request) -> Caller:
    return request[CALLER]


def _html(title: str, body: str, request: web.Request, namespace: str | None = None,
          status: int = 200) -> web.Response:
    caller = _caller(request)
    csrf = caller.session.csrf if caller.session else None
    return web.Response(text=h.layout(title, body, user=caller.identity.username, csrf=csrf,
                                      namespace=namespace),
                        content_type="text/html", status=status)


# ---- login and logout


async def login_form(request: web.Request, error: str | None = None,
                     status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    portal = request.app[PORTAL]
    # The pre-login cookie (kept if the browser has one) binds the login CSRF token below.
    value = login_value(request.cookies.get(LOGIN_COOKIE)) or secrets.token_urlsafe(32)
    oidc = ""
    if portal.oidc is not None:
        oidc = ('<div class="login"><form method="post" action="/login/oidc">'
                f'<input type="hidden" name="csrf" value="{h.e(login_csrf(value))}">'
                '<p><button type="submit" class="button" id="oidc-login">'
                "Log in with your organisation's account</button></p></form>"
                f'<p class="muted">Through {h.e(portal.oidc.settings.issuer)}, the identity '
                "provider the cluster trusts.</p></div><h2>Or with a token</h2>")
    body = (h.error_box(error) if error else "") + oidc + (
        '<div class="login"><form method="post" action="/login">'
        '<label>Kubernetes token<textarea name="token" id="token" required autocomplete="off" '
        'spellcheck="false"></textarea></label>'
        '<p class="muted">A bearer token the cluster accepts, e.g. from '
        '<code>kubectl create token NAME</code> or your OIDC login. It is checked with the '
        'API server and not kept.</p>'
        '<button type="submit" id="login">Log in</button></form></div>')
    response = web.Response(text=h.layout("Log in", body), content_type="text/html",
                            status=status, headers=headers)
    if portal.oidc is not None:  # only the OIDC button uses it
        # The button's form is answered by a redirect to the issuer, which the browser
        # follows only where form-action allows.
        endpoint = portal.oidc.settings.issuer
        # Read once and kept; an issuer not answering delays this page 2 s at most (pressing
        # the button shows why).
        with contextlib.suppress(OidcError, TimeoutError):
            endpoint = (await asyncio.wait_for(portal.oidc.discovery(), 2))[
                "authorization_endpoint"]
        found = _origin(endpoint)
        if found is not None:
            scheme, host, port = found
            bracketed = f"[{host}]" if ":" in host else host
            response.headers["Content-Security-Policy"] = CSP.replace(
                "form-action 'self'", f"form-action 'self' {scheme}://{bracketed}:{port}")
        response.set_cookie(LOGIN_COOKIE, value, path="/login", httponly=True,
                            secure=portal.secure_cookie, samesite="Strict",
                            max_age=LOGIN_COOKIE_AGE)
    return response


async def login_get(request: web.Request) -> web.Response:
    return await login_form(request)


def _too_many(request: web.Request, limiter: Limiter, key: str, who: str
              ) -> tuple[str, dict[str, str]] | None:
    wait = limiter.take(key)
    if not wait:
        return None
    after = retry_after(wait)
    log.warning("login refused: too many attempts %s", who)
    return (f"too many login attempts {who}: wait {after} seconds and try again",
            {"Retry-After": after})


def _address_limit(request: web.Request) -> tuple[str, dict[str, str]] | None:
    portal = request.app[PORTAL]
    address = client_address(request.remote, request.headers.get("X-Forwarded-For"),
                             portal.trusted_proxies)
    return _too_many(request, portal.login_by_address, address, "from your address")


async def _start_session(request: web.Request, identity: Identity) -> web.Response | Session:
    """A new session for ``identity`` (the one the browser held ends), or the answer refusing
    it when this user logs in too often."""
    portal = request.app[PORTAL]
    refused = _too_many(request, portal.login_by_user, identity.username, "for this user")
    if refused:
        return await login_form(request, refused[0], 429, refused[1])
    old = request.cookies.get(COOKIE)
    if old:
        await portal.sessions.revoke(old)
    session = await portal.sessions.create(identity)
    log.info("login: %s", identity.username)
    return session


def _set_session_cookie(portal: Portal, response: web.StreamResponse, session: Session) -> None:
    response.set_cookie(COOKIE, session.sid, path="/", httponly=True,
                        secure=portal.secure_cookie, samesite="Strict",
                        max_age=int(portal.sessions.lifetime))


async def login_post(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    refused = _address_limit(request)
    if refused:
        return await login_form(request, refused[0], 429, refused[1])
    form = await request.post()
    token = str(form.get("token") or "").strip()
    if not token or len(token) > 16384:
        return await login_form(request, "give a Kubernetes bearer token", 400)
    identity = await portal.kube.review_token(token)
    if identity is None:
        return await login_form(request, "the API server did not accept this token", 401)
    session = await _start_session(request, identity)
    if isinstance(session, web.Response):
        return session
    response = web.HTTPSeeOther("/")
    _set_session_cookie(portal, response, session)
    if LOGIN_COOKIE in request.cookies:
        response.del_cookie(LOGIN_COOKIE, path="/login")
    raise response


async def oidc_start_get(request: web.Request) -> web.StreamResponse:
    """A link here (from a bookmark, or from another site) starts nothing and ends nothing:
    a login starts with the button on the login page."""
    raise web.HTTPSeeOther("/login")


async def oidc_start(request: web.Request) -> web.StreamResponse:
    """Send the browser to the issuer; the started login is kept server-side and named by the
    session cookie, set SameSite=Lax for this one step: a Strict cookie would not come back
    with the issuer's cross-site redirect. It grants nothing.

    It replaces the session this browser held, so only the portal's own login page may start
    it: the form carries the login CSRF token bound to the pre-login cookie (SameSite=Strict,
    so another site's form arrives without it)."""
    portal = request.app[PORTAL]
    if portal.oidc is None:
        raise web.HTTPNotFound(text="OIDC login is not configured on this portal")
    offered = str((await request.post()).get("csrf") or "")
    if not login_csrf_ok(request.cookies.get(LOGIN_COOKIE), offered):
        log.warning("oidc login refused: login CSRF token missing or wrong")
        return await login_form(request, "the login page was out of date (login CSRF token "
                                "missing or wrong, or the page was open longer than 30 "
                                "minutes): press the button again", 403)
    refused = _address_limit(request)
    if refused:
        return await login_form(request, refused[0], 429, refused[1])
    try:
        url, start = await portal.oidc.begin()
    except OidcError as exc:
        log.warning("oidc: %s", exc)
        return await login_form(request, f"log in with your organisation's account: {exc}",
                                503 if isinstance(exc, OidcUnavailable) else 400)
    old = request.cookies.get(COOKIE)
    if old:  # rotated at login: the session this browser held ends here
        await portal.sessions.revoke(old)
    pid = await portal.sessions.begin_login(start)
    response = web.HTTPSeeOther(url)
    response.set_cookie(COOKIE, pid, path="/", httponly=True,
                        secure=portal.secure_cookie, samesite="Lax", max_age=600)
    response.del_cookie(LOGIN_COOKIE, path="/login")  # used: the callback does not need it
    raise response


async def oidc_callback(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    if portal.oidc is None:
        raise web.HTTPNotFound(text="OIDC login is not configured on this portal")
    start = await portal.sessions.take_login(request.cookies.get(COOKIE))
    # A refusal drops the started login's cookie; not a session's: a link here (from another
    # site, which sends no Strict cookie, or this one) must not log the browser out.
    clear = {"Set-Cookie": f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly"
                           + ("; Secure" if portal.secure_cookie else "") + "; SameSite=Strict"}
    held = request.cookies.get(COOKIE)
    if start is None and (not held or await portal.sessions.get(held) is not None):
        clear = {}

    async def refuse(message: str, status: int = 400) -> web.Response:
        message = "".join(c if c.isprintable() else " " for c in message)
        log.warning("oidc login refused: %s", message)
        return await login_form(request, f"login refused: {message}", status, clear)

    if start is None:
        return await refuse("this browser has no login under way (it took longer than ten "
                            "minutes, or was started in another browser or already finished): "
                            "start again")
    state = request.query.get("state", "")
    if not secrets.compare_digest(state.encode(), start.state.encode()):
        return await refuse("the answer does not belong to the login this browser started "
                            "(state mismatch): start again")
    if "error" in request.query:
        detail = request.query.get("error_description", "")[:200]
        return await refuse(f"the identity provider said {request.query['error'][:80]}"
                            + (f": {detail}" if detail else ""), 401)
    code = request.query.get("code", "")
    if not code or len(code) > 4096:
        return await refuse("the identity provider sent no authorization code")
    try:
        identity = await portal.oidc.finish(start, code)
    except OidcUnavailable as exc:
        return await refuse(str(exc), 503)
    except OidcError as exc:
        return await refuse(str(exc), 401)
    # As the API server's authenticator does for every authenticated user.
    if "system:authenticated" not in identity.groups:
        identity = Identity(identity.username, identity.uid,
                            (*identity.groups, "system:authenticated"), identity.extra)
    session = await _start_session(request, identity)
    if isinstance(session, web.Response):
        return session
    # The browser got here by the issuer's cross-site redirect, so it would not send a Strict
    # cookie with a redirect straight on; a page of the portal's own that moves on does.
    body = ('<p>You are logged in.</p><p><a class="button" id="continue" href="/">Continue</a>'
            "</p>")
    html = h.layout("Logged in", body).replace(
        "<title>", '<meta http-equiv="refresh" content="0;url=/"><title>', 1)
    response = web.Response(text=html, content_type="text/html")
    _set_session_cookie(portal, response, session)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    caller = _caller(request)
    if caller.session is not None:
        await portal.sessions.revoke(caller.session.sid)
    response = web.HTTPSeeOther("/login")
    response.del_cookie(COOKIE, path="/")
    raise response


# ---- pages


async def home(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    names = await portal.visible_namespaces(_caller(request))
    if names:
        items = "".join(
            f'<li><strong>{h.e(ns)}</strong><br>'
            f'<a href="{h.e(h.url(f"/ns/{ns}/logs"))}">Message log</a></li>' for ns in names)
        body = f'<ul class="cards" id="namespaces">{items}</ul>'
    else:
        body = ('<p class="notice">You may read Mailplane data in no namespace yet. Ask for '
                '<code>get smtpcredentials</code> in your team\'s namespace.</p>')
    return _html("Namespaces", body, request)


def _search_form(ns: str, s: Search) -> str:
    def field(name: str, label: str, value: str | None, kind: str = "text") -> str:
        return (f'<label>{h.e(label)}<input type="{kind}" name="{name}" id="f-{name}" '
                f'value="{h.e(value or "")}"></label>')

    options = '<option value="">any</option>' + "".join(
        f'<option{" selected" if s.status == st else ""}>{h.e(st)}</option>' for st in STATUSES)
    since = iso(s.since)[:16] if s.since is not None else ""
    until = iso(s.until)[:16] if s.until is not None else ""
    return (f'<form class="search" method="get" action="{h.e(h.url(f"/ns/{ns}/logs"))}">'
            + field("sender", "Sender (address or @domain)", s.sender)
            + field("recipient", "Recipient (address or @domain)", s.recipient)
            + f'<label>Status<select name="status" id="f-status">{options}</select></label>'
            + field("queue_id", "Queue id", s.queue_id)
            + field("since", "From (UTC)", since.replace(" ", "T"), "datetime-local")
            + field("until", "Before (UTC)", until.replace(" ", "T"), "datetime-local")
            + '<button type="submit" id="search">Search</button></form>')


def _log_rows(ns: str, rows: list[dict[str, Any]], *, link: bool = True) -> list[list[str]]:
    out = []
    for r in rows:
        qid = r.get("queue_id") or ""
        qcell = h.e(qid)
        if link and qid:
            qcell = (f'<a class="queue" href="{h.e(h.url(f"/ns/{ns}/messages/{qid}"))}">'
                     f"{h.e(qid)}</a>")
        out.append([
            f'<span class="nowrap">{h.when(r["ts"])}</span>',
            f'<span class="status status-{h.e(r["status"])}">{h.e(r["status"])}</span>',
            qcell, h.e(r.get("sender")), h.e(r.get("recipient")), h.e(r.get("credential")),
            h.e(r.get("response")),
        ])
    return out


async def logs_page(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    search = Search.parse(request.query)
    rows, cursor = await page(portal.store, ns, search)
    body = _search_form(ns, search)
    body += f'<p class="muted" id="count">{len(rows)} rows on this page</p>'
    body += h.table(("Time", "Status", "Queue id", "Sender", "Recipient", "Credential",
                     "Reply"), _log_rows(ns, rows), cls="log")
    links = []
    if search.cursor is not None:
        first = h.url(f"/ns/{ns}/logs", search.params())
        links.append(f'<a href="{h.e(first)}">First page</a>')
    if cursor:
        following = h.url(f"/ns/{ns}/logs", search.params(cursor=cursor))
        links.append(f'<a id="next" href="{h.e(following)}">Next page</a>')
    links.append(f'<a id="csv" class="button secondary" '
                 f'href="{h.e(h.url(f"/ns/{ns}/logs.csv", search.params()))}">Export CSV</a>')
    body += f'<div class="pager">{"".join(links)}</div>'
    return _html(f"Message log · {ns}", body, request, ns)


async def logs_csv(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    text = await export_csv(portal.store, ns, Search.parse(request.query))
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return web.Response(text=text, content_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="mailplane-{ns}-{stamp}.csv"'})


async def message_page(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns, qid = request.match_info["ns"], request.match_info["queue_id"]
    await portal.authorise(_caller(request), ns, READ)
    rows = await history(portal.store, ns, qid)
    if not rows:
        raise web.HTTPNotFound(text=f"no message with queue id {qid[:64]} in namespace {ns}")
    first = rows[0]
    facts = (f'<dl class="facts"><dt>Queue id</dt><dd id="qid">{h.e(qid)}</dd>'
             f'<dt>Message-ID</dt><dd>{h.e(first.get("message_id"))}</dd>'
             f'<dt>Sender</dt><dd>{h.e(first.get("sender"))}</dd>'
             f'<dt>Credential</dt><dd>{h.e(first.get("credential"))}</dd>'
             f'<dt>Size</dt><dd>{h.e(first.get("size"))} bytes</dd></dl>')
    table = h.table(("Time", "Status", "Recipient", "Attempt", "Remote", "Reply"), [
        [f'<span class="nowrap">{h.when(r["ts"])}</span>',
         f'<span class="status status-{h.e(r["status"])}">{h.e(r["status"])}</span>',
         h.e(r.get("recipient")), h.e(r.get("attempt")), h.e(r.get("remote")),
         h.e(r.get("response"))] for r in rows], cls="history")
    body = facts + "<h2>Every attempt</h2>" + table + (
        '<p class="muted">The portal shows metadata only; message bodies and subjects are '
        "never logged.</p>")
    return _html(f"Message {qid}", body, request, ns)


# ---- JSON API


async def api_whoami(request: web.Request) -> web.Response:
    caller = _caller(request)
    out: dict[str, Any] = {"username": caller.identity.username,
                           "groups": list(caller.identity.groups)}
    if caller.session is not None:
        out["csrf"] = caller.session.csrf
    return web.json_response(out)


async def api_namespaces(request: web.Request) -> web.Response:
    names = await request.app[PORTAL].visible_namespaces(_caller(request))
    return web.json_response({"namespaces": names})


async def api_logs(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    rows, cursor = await page(portal.store, ns, Search.parse(request.query))
    return web.json_response({"namespace": ns, "items": [public_row(r) for r in rows],
                              "next_cursor": cursor})


async def api_message(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns, qid = request.match_info["ns"], request.match_info["queue_id"]
    await portal.authorise(_caller(request), ns, READ)
    rows = await history(portal.store, ns, qid)
    if not rows:
        raise web.HTTPNotFound(text=f"no message with queue id {qid[:64]} in namespace {ns}")
    return web.json_response({"namespace": ns, "queue_id": qid,
                              "events": [public_row(r) for r in rows]})


async def static(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    if name != "portal.css":
        raise web.HTTPNotFound(text="no such file")
    css = importlib.resources.files(__package__).joinpath("static/portal.css").read_text()
    return web.Response(text=css, content_type="text/css",
                        headers={"Cache-Control": "public, max-age=300"})


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


async def openapi_json(request: web.Request) -> web.Response:
    return web.json_response(openapi.document())


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})


def build_app(portal: Portal) -> web.Application:
    app = web.Application(middlewares=[security, authenticate], client_max_size=256 * 1024)
    app[PORTAL] = portal
    r = app.router
    r.add_get("/login", login_get)
    r.add_post("/login", login_post)
    r.add_get("/login/oidc", oidc_start_get)
    r.add_post("/login/oidc", oidc_start)
    r.add_get("/login/callback", oidc_callback)
    r.add_post("/logout", logout)
    r.add_get("/", home)
    r.add_get("/ns/{ns}/logs", logs_page)
    r.add_get("/ns/{ns}/logs.csv", logs_csv)
    r.add_get("/ns/{ns}/messages/{queue_id}", message_page)
    r.add_get("/api/v1/whoami", api_whoami)
    r.add_get("/api/v1/namespaces", api_namespaces)
    r.add_get("/api/v1/namespaces/{ns}/logs", api_logs)
    r.add_get("/api/v1/namespaces/{ns}/messages/{queue_id}", api_message)
    r.add_get("/static/{name}", static)
    r.add_get("/healthz", healthz)
    r.add_get("/favicon.ico", favicon)
    r.add_get("/openapi.json", openapi_json)
    add_manage_routes(app)
    add_figure_routes(app)
    return app


# ---- changes: suppression, erasure, audit


ADDRESS_MAX = 320


def _address(value: Any, field: str = "address") -> str:
    text = str(value or "").strip().lower()
    local, at, domain = text.rpartition("@")
    if (not at or not local or "." not in domain or len(text) > ADDRESS_MAX
            or any(c.isspace() or ord(c) < 32 or c in "<>,;\"" for c in text)):
        raise BadRequest(f"{field}: give one email address such as jane@example.com")
    return text


def _note(value: Any, field: str, *, required: bool) -> str:
    text = " ".join(str(value or "").split())
    if required and not text:
        raise BadRequest(f"{field}: say why (it goes into the audit log)")
    if len(text) > 300:
        raise BadRequest(f"{field}: at most 300 characters")
    return text


async def _form(request: web.Request) -> dict[str, Any]:
    if request.content_type == "application/json":
        data = await request.json()
        if not isinstance(data, dict):
            raise BadRequest("the body must be a JSON object")
        return data
    return dict(await request.post())


def _csrf_field(request: web.Request) -> str:
    caller = _caller(request)
    token = caller.session.csrf if caller.session else ""
    return f'<input type="hidden" name="csrf" value="{h.e(token)}">'


SCOPES = {"team": "Your team", "pool": "Every team"}
"""How an entry's scope shows on the page."""


async def _team_entry(portal: Portal, ns: str, address: str) -> dict[str, Any] | None:
    """The team's own entry for the address if it has one, else the pool-wide one it sees."""
    found = None
    for entry in await portal.records.team_suppression(ns, address, limit=50):
        if entry["address"] == address and (found is None or entry["scope"] == "team"):
            found = entry
    return found


async def suppression_add(portal: Portal, caller: Caller, ns: str, data: dict[str, Any]
                          ) -> str:
    await portal.authorise(caller, ns, WRITE)
    address = _address(data.get("address"))
    note = _note(data.get("note"), "note", required=False)
    # The team's own entry: it stops only mail sent with this namespace's credentials (a
    # team must not stop another team's mail). An address already suppressed for this team
    # (pool-wide: a complaint, a bounce; or the team's own entry) keeps its entry: re-adding a
    # pool-wide one as the team's own would change nothing but its source.
    if await portal.records.suppression_entry(address, ns) is None:
        await portal.store.suppression_upsert(
            address, "manual", f"portal:{ns}:{caller.identity.username}"[:200], time.time(),
            namespace=ns)
    await portal.records.audit(ns, caller.identity.username, "suppression.add", address, note)
    return address


async def suppression_remove(portal: Portal, caller: Caller, ns: str, data: dict[str, Any]
                             ) -> str:
    await portal.authorise(caller, ns, WRITE)
    address = _address(data.get("address"))
    reason = _note(data.get("reason"), "reason", required=True)
    entry = await _team_entry(portal, ns, address)
    if entry is None:
        raise web.HTTPNotFound(text=f"{address} is not on your team's suppression list")
    if entry["reason"] == "complaint":
        raise web.HTTPConflict(text=f"{address} complained: a complaint is never lifted from "
                                    "the portal (ask the platform team)")
    if entry["source"] == OTHER_TEAM:
        raise web.HTTPConflict(text=f"{address} was added by another team: only that team or "
                                    "the platform team can remove it")
    await portal.store.suppression_delete(address, ns if entry["scope"] == "team" else "")
    await portal.records.audit(ns, caller.identity.username, "suppression.remove", address,
                               f"was {entry['reason']}: {reason}")
    return address


async def suppression_page(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    caller = _caller(request)
    notice = ""
    if request.method == "POST":
        data = await _form(request)
        if data.get("action") == "remove":
            address = await suppression_remove(portal, caller, ns, data)
            notice = f"{address} removed from the suppression list."
        else:
            address = await suppression_add(portal, caller, ns, data)
            notice = f"{address} added to the suppression list."
    else:
        await portal.authorise(caller, ns, READ)
    q = (request.query.get("q") or "").strip()[:320]
    entries = await portal.records.team_suppression(ns, q or None)
    csrf = _csrf_field(request)
    action = h.e(h.url(f"/ns/{ns}/suppression"))
    rows = [[h.e(e_["address"]), h.e(SCOPES[e_["scope"]]), h.e(e_["reason"]), h.e(e_["source"]),
             h.when(e_["created"]),
             (f'<form method="post" action="{action}" class="remove">{csrf}'
              f'<input type="hidden" name="action" value="remove">'
              f'<input type="hidden" name="address" value="{h.e(e_["address"])}">'
              f'<input name="reason" required placeholder="reason" aria-label="reason">'
              f'<button type="submit" class="secondary">Remove</button></form>'
              if e_["reason"] != "complaint" else '<span class="muted">complaint: kept</span>')]
            for e_ in entries]
    body = (f'<p class="notice" role="status">{h.e(notice)}</p>' if notice else "") + (
        '<p class="muted">Addresses the relay will not deliver your team\'s mail to. '
        "<b>Your team</b>: added here; they stop only mail sent with your namespace's "
        "credentials. <b>Every team</b>: hard bounces, complaints and the platform team's "
        "entries, for addresses your team has sent to; they stop every team's mail.</p>"
        f'<form class="search" method="get" action="{action}">'
        f'<label>Search<input name="q" id="f-q" value="{h.e(q)}"></label>'
        '<button type="submit">Search</button>'
        f'<a class="button secondary" href="{h.e(h.url(f"/ns/{ns}/suppression.csv"))}">'
        "Export CSV</a></form>"
        + h.table(("Address", "Scope", "Reason", "Source", "Since", ""), rows,
                  cls="suppression")
        + f'<h2>Add an address</h2><form class="search" method="post" action="{action}">{csrf}'
        '<label>Address<input name="address" id="f-add" required type="email"></label>'
        '<label>Note<input name="note"></label>'
        '<button type="submit" id="add">Add</button></form>')
    return _html(f"Suppression · {ns}", body, request, ns)


async def suppression_csv(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    import csv  # noqa: PLC0415
    import io  # noqa: PLC0415

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\r\n")
    writer.writerow(["address", "scope", "reason", "source", "created"])
    for entry in await portal.records.team_suppression(ns, None, limit=100_000):
        writer.writerow([csv_cell(entry["address"]), entry["scope"], csv_cell(entry["reason"]),
                         csv_cell(entry["source"]), iso(entry["created"])])
    return web.Response(text=buf.getvalue(), content_type="text/csv", headers={
        "Content-Disposition": f'attachment; filename="mailplane-{ns}-suppression.csv"'})


async def _run_erasure(portal: Portal, erasure_id: str, ns: str, address: str) -> None:
    try:
        await portal.records.erasure_update(erasure_id, "running", {})
        counts = await portal.records.namespace_knows(ns, address)
        team_entry = await _team_entry(portal, ns, address)
        # This namespace's records only: another team's log rows and suppression entries are
        # that team's (a tenant must not be able to wipe them by mailing the address once);
        # erasure across every team is the platform team's (``mailplane erase``).
        webhook_events = await portal.records.erase_in_namespace(ns, address)
        own = (team_entry is not None and team_entry["reason"] != "complaint"
               and own_source(ns, str(team_entry["source"])))
        if own:
            assert team_entry is not None
            await portal.store.suppression_delete(
                address, ns if team_entry["scope"] == "team" else "")
        await portal.records.mask_in_audit(ns, address)
        report = {"message_log_rows_as_sender": counts["as_sender"],
                  "message_log_rows_as_recipient": counts["as_recipient"],
                  "suppression_entries": 1 if own else 0,
                  "webhook_events_not_yet_sent": webhook_events}
        await portal.records.erasure_update(erasure_id, "done", report)
    except Exception as exc:  # the request shows it failed; the user can ask again
        log.warning("erasure %s failed: %s", erasure_id, type(exc).__name__)
        await portal.records.erasure_update(erasure_id, "failed", {},
                                            "the store did not answer; ask again")


async def erasure_create(portal: Portal, caller: Caller, ns: str, data: dict[str, Any]
                         ) -> str:
    await portal.authorise(caller, ns, WRITE)
    address = _address(data.get("address"))
    counts = await portal.records.namespace_knows(ns, address)
    if not any(counts.values()) and await _team_entry(portal, ns, address) is None:
        raise web.HTTPNotFound(text=f"{address} does not appear in namespace {ns}'s message "
                                    "log or suppression list: there is nothing to erase")
    key = await portal.store.erasure_key()
    erasure = await portal.records.erasure_create(ns, caller.identity.username, address,
                                                  complaint_hash(key, address))
    await portal.records.audit(ns, caller.identity.username, "erasure.request",
                               mask(address), erasure.id)
    task = asyncio.create_task(_run_erasure(portal, erasure.id, ns, address))
    portal.tasks.add(task)
    task.add_done_callback(portal.tasks.discard)
    return erasure.id


def _erasure_rows(ns: str, items: list[Any]) -> list[list[str]]:
    return [[f'<a href="{h.e(h.url(f"/ns/{ns}/erasures/{x.id}"))}">{h.e(x.address_hint)}</a>',
             f'<span class="status state-{h.e(x.state)}">{h.e(x.state)}</span>',
             h.e(x.actor), h.when(x.created), h.when(x.finished) if x.finished else ""]
            for x in items]


async def erasures_page(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    caller = _caller(request)
    if request.method == "POST":
        erasure_id = await erasure_create(portal, caller, ns, await _form(request))
        raise web.HTTPSeeOther(h.url(f"/ns/{ns}/erasures/{erasure_id}"))
    await portal.authorise(caller, ns, READ)
    items = await portal.records.erasures(ns)
    action = h.e(h.url(f"/ns/{ns}/erasures"))
    body = ('<p class="muted">Erasure deletes this namespace\'s message-log rows where the '
            "address is the sender or a recipient, its webhook events not yet sent, and its "
            "suppression entry when your team added it here (a bounce, a complaint or another "
            "team's entry stays). Other teams' records are theirs: erasure across the whole "
            "platform is the platform team's. "
            "The request keeps only a masked form of the address.</p>"
            f'<form class="search" method="post" action="{action}">{_csrf_field(request)}'
            '<label>Address to erase<input name="address" id="f-erase" required type="email">'
            '</label><button type="submit" id="erase">Request erasure</button></form>'
            + h.table(("Address", "State", "Requested by", "Requested", "Finished"),
                      _erasure_rows(ns, items), cls="erasures"))
    return _html(f"Erasure · {ns}", body, request, ns)


async def erasure_page(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns, erasure_id = request.match_info["ns"], request.match_info["id"]
    await portal.authorise(_caller(request), ns, READ)
    items = await portal.records.erasures(ns, erasure_id)
    if not items:
        raise web.HTTPNotFound(text=f"no erasure request {erasure_id[:40]} in namespace {ns}")
    x = items[0]
    report = "".join(f"<dt>{h.e(k.replace('_', ' '))}</dt><dd>{h.e(v)}</dd>"
                     for k, v in sorted(x.report.items()))
    body = (f'<dl class="facts"><dt>Address</dt><dd>{h.e(x.address_hint)}</dd>'
            f'<dt>State</dt><dd id="state">{h.e(x.state)}</dd>'
            f"<dt>Requested by</dt><dd>{h.e(x.actor)}</dd>"
            f"<dt>Requested</dt><dd>{h.when(x.created)}</dd>"
            + (f"<dt>Finished</dt><dd>{h.when(x.finished)}</dd>" if x.finished else "")
            + (f"<dt>Error</dt><dd>{h.e(x.error)}</dd>" if x.error else "")
            + "</dl>" + (f'<h2>Removed from your namespace</h2><dl class="facts" id="report">'
                         f"{report}</dl>" if x.state == "done" else
                         '<p class="muted">Reload to follow its progress.</p>'))
    return _html("Erasure request", body, request, ns)


async def audit_page(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    rows = [[h.when(r["ts"]), h.e(r["actor"]), h.e(r["action"]), h.e(r["target"]),
             h.e(r["detail"])] for r in await portal.records.audit_log(ns)]
    body = h.table(("Time", "Who", "Action", "Target", "Detail"), rows, cls="audit")
    return _html(f"Audit log · {ns}", body, request, ns)


# ---- the same as JSON


async def api_suppression(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    caller = _caller(request)
    if request.method == "POST":
        address = await suppression_add(portal, caller, ns, await _form(request))
        return web.json_response({"address": address, "reason": "manual"}, status=201)
    if request.method == "DELETE":
        data: dict[str, Any] = {"address": request.match_info.get("address"),
                                "reason": request.query.get("reason")}
        await suppression_remove(portal, caller, ns, data)
        return web.json_response({"removed": data["address"]})
    await portal.authorise(caller, ns, READ)
    q = (request.query.get("q") or "").strip()[:320]
    return web.json_response({"items": await portal.records.team_suppression(ns, q or None)})


async def api_erasures(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    caller = _caller(request)
    if request.method == "POST":
        created = await erasure_create(portal, caller, ns, await _form(request))
        items = await portal.records.erasures(ns, created)
        return web.json_response(items[0].to_json(), status=202)
    await portal.authorise(caller, ns, READ)
    erasure_id = request.match_info.get("id")
    items = await portal.records.erasures(ns, erasure_id)
    if erasure_id is not None:
        if not items:
            raise web.HTTPNotFound(text=f"no erasure request {erasure_id[:40]} in namespace "
                                        f"{ns}")
        return web.json_response(items[0].to_json())
    return web.json_response({"items": [x.to_json() for x in items]})


async def api_audit(request: web.Request) -> web.Response:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    return web.json_response({"items": await portal.records.audit_log(ns)})


def add_manage_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/ns/{ns}/suppression", suppression_page)
    r.add_post("/ns/{ns}/suppression", suppression_page)
    r.add_get("/ns/{ns}/suppression.csv", suppression_csv)
    r.add_get("/ns/{ns}/erasures", erasures_page)
    r.add_post("/ns/{ns}/erasures", erasures_page)
    r.add_get("/ns/{ns}/erasures/{id}", erasure_page)
    r.add_get("/ns/{ns}/audit", audit_page)
    r.add_get("/api/v1/namespaces/{ns}/suppression", api_suppression)
    r.add_post("/api/v1/namespaces/{ns}/suppression", api_suppression)
    r.add_delete("/api/v1/namespaces/{ns}/suppression/{address}", api_suppression)
    r.add_get("/api/v1/namespaces/{ns}/erasures", api_erasures)
    r.add_post("/api/v1/namespaces/{ns}/erasures", api_erasures)
    r.add_get("/api/v1/namespaces/{ns}/erasures/{id}", api_erasures)
    r.add_get("/api/v1/namespaces/{ns}/audit", api_audit)


# ---- delivery figures and the team's credentials and domains

RANGES = {"24h": (86400, 3600), "7d": (7 * 86400, 6 * 3600), "30d": (30 * 86400, 86400)}


async def _figures(request: web.Request) -> tuple[str, str, float, int, dict[str, Any]]:
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    await portal.authorise(_caller(request), ns, READ)
    span_name = request.query.get("range", "24h")
    if span_name not in RANGES:
        raise BadRequest(f"range {span_name[:10]!r}: give one of {', '.join(RANGES)}")
    span, bucket = RANGES[span_name]
    since = time.time() - span
    return ns, span_name, since, bucket, await figures(portal.records, ns, since, bucket)


async def figures_page(request: web.Request) -> web.Response:
    ns, span_name, since, bucket, data = await _figures(request)
    now = time.time()
    tabs = " ".join(
        f'<a href="{h.e(h.url(f"/ns/{ns}/figures", {"range": r}))}"'
        + (' class="current"' if r == span_name else "") + f">{r}</a>" for r in RANGES)
    body = f'<p class="pager">{tabs}</p>' + charts.legend() + (
        '<p class="muted">Complaints (feedback-loop reports about your mail) are counted per '
        "sender domain and per credential, as a share of the mail it delivered; the store "
        f"keeps them for {COMPLAINT_DAYS} days.</p>")
    for kind, label in (("domain", "Sender domain"), ("credential", "Credential")):
        body += f"<h2>Per {label.lower()}</h2>"
        if not data[kind]:
            body += '<p class="muted">No mail in this period.</p>'
            continue
        body += '<div class="charts">'
        for name, series in sorted(data[kind].items()):
            r = charts.rates(series, complaints=True)
            caption = (f"{label} {name}: {int(r['total'])} events, delivered "
                       f"{r['delivered']:.1%}, deferred {r['deferred']:.1%}, bounced "
                       f"{r['bounced']:.1%}"
                       + (f", complained {r['complained']:.2%} of delivered"
                          if "complained" in r else ""))
            body += (f'<figure class="figure-{kind}"><figcaption>{h.e(caption)}</figcaption>'
                     + charts.stacked_bars(f"{label} {name}", series, since, now, bucket)
                     + "</figure>")
        body += "</div>"
    return _html(f"Delivery figures · {ns}", body, request, ns)


async def api_figures(request: web.Request) -> web.Response:
    ns, span_name, since, bucket, data = await _figures(request)
    return web.json_response({
        "namespace": ns, "range": span_name, "bucket_seconds": bucket, "since": since,
        **{kind: {name: {"rates": charts.rates(series, complaints=True),
                         "buckets": [{"start": b, **counts} for b, counts in
                                     sorted(series.items())]}
                  for name, series in data[kind].items()}
           for kind in ("credential", "domain")}})


def _condition(obj: dict[str, Any], kind: str = "Ready") -> tuple[str, str]:
    for c in (obj.get("status") or {}).get("conditions") or ():
        if c.get("type") == kind:
            return str(c.get("status", "Unknown")), str(c.get("reason") or "")
    return "Unknown", "not reconciled yet"


async def _resources(request: web.Request) -> tuple[str, list[dict[str, Any]],
                                                    list[dict[str, Any]] | None]:
    """The namespace's credentials (``get smtpcredentials``) and, when the user may also
    ``get sendingdomains`` there, its domains (None otherwise). Read with the portal's own
    identity; never a Secret."""
    portal = request.app[PORTAL]
    ns = request.match_info["ns"]
    caller = _caller(request)
    await portal.authorise(caller, ns, READ)
    creds = [{
        "name": o["metadata"]["name"],
        "ready": _condition(o)[0], "reason": _condition(o)[1],
        "username": (o.get("status") or {}).get("username"),
        "secret": (o.get("status") or {}).get("secretName"),
        "relay": (o.get("status") or {}).get("relay"),
        "allowed_senders": (o.get("spec") or {}).get("allowedSenders") or [],
        "rate_per_minute": (o.get("status") or {}).get("effectiveRatePerMinute"),
        "daily_quota": (o.get("status") or {}).get("effectiveDailyQuota"),
        "suspended_by": (o.get("status") or {}).get("suspendedBy"),
    } for o in await portal.kube.list("smtpcredentials", ns)]
    domains: list[dict[str, Any]] | None = None
    if await portal.kube.allowed(caller.identity, READ, "sendingdomains", ns):
        domains = [{
            "name": o["metadata"]["name"],
            "domain": (o.get("spec") or {}).get("domain"),
            "ready": _condition(o)[0], "reason": _condition(o)[1],
            "dns_records": [{k: r.get(k) for k in ("purpose", "type", "name", "value",
                                                   "strings", "state", "verified")}
                            for r in (o.get("status") or {}).get("dnsRecords") or ()],
        } for o in await portal.kube.list("sendingdomains", ns)]
    return ns, creds, domains


async def resources_page(request: web.Request) -> web.Response:
    ns, creds, domains = await _resources(request)
    body = "<h2>SMTP credentials</h2>" + h.table(
        ("Name", "Ready", "Username", "Secret", "Senders", "Limits"),
        [[h.e(c["name"]), f'{h.e(c["ready"])} <span class="muted">{h.e(c["reason"])}</span>',
          h.e(c["username"]), h.e(c["secret"]), h.e(", ".join(c["allowed_senders"])),
          h.e(f"{c['rate_per_minute'] or '∞'}/min, {c['daily_quota'] or '∞'}/day"
              + (f", suspended by {c['suspended_by']}" if c["suspended_by"] else ""))]
         for c in creds], cls="credentials")
    body += "<h2>Sending domains</h2>"
    if domains is None:
        body += ('<p class="muted">You may not read SendingDomains in this namespace '
                 "(<code>get sendingdomains</code>).</p>")
    for d in domains or ():
        records = "\n".join(
            f"{r['name']}  {r['type']}  " + " ".join(f'"{s}"' for s in (r["strings"] or
                                                                         [r["value"]]))
            + f"   ; {r['purpose']}, {r['state']}"
            + ("" if r.get("verified") is None else
               (", verified" if r["verified"] else ", NOT found in DNS"))
            for r in d["dns_records"])
        body += (f'<h3>{h.e(d["domain"])} <span class="muted">({h.e(d["name"])}: '
                 f'Ready {h.e(d["ready"])} {h.e(d["reason"])})</span></h3>'
                 + (f'<pre class="records">{h.e(records)}</pre>' if records else
                    '<p class="muted">No DNS records yet.</p>'))
    return _html(f"Credentials and domains · {ns}", body, request, ns)


async def api_resources(request: web.Request) -> web.Response:
    ns, creds, domains = await _resources(request)
    return web.json_response({"namespace": ns, "credentials": creds, "domains": domains})


def add_figure_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/ns/{ns}/figures", figures_page)
    r.add_get("/ns/{ns}/resources", resources_page)
    r.add_get("/api/v1/namespaces/{ns}/figures", api_figures)
    r.add_get("/api/v1/namespaces/{ns}/resources", api_resources)
