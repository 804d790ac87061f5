"""The portal's HTTP server: HTML pages and a JSON API over the same handlers.

Every request that touches a namespace is authorised by a SubjectAccessReview for that
namespace, made with the identity the API server gave for the caller's token (``get
smtpcredentials`` to read, ``update smtpcredentials`` to change). Nothing is cached between
requests: a permission taken away in Kubernetes is gone at the next click.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from mailplane_relay.events import STATUSES
from mailplane_relay.store import StoreBackend, StoreError

from . import html as h
from .kube import Identity, KubeClient, KubeUnavailable
from .search import BadRequest, Search, check_namespace, export_csv, history, page, public_row
from .sessions import COOKIE, Session, SessionStore, csrf_ok

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
    def __init__(self, store: StoreBackend, kube: KubeClient, *, sessions: SessionStore |
                 None = None, secure_cookie: bool = True) -> None:
        self.store = store
        self.kube = kube
        self.sessions = sessions or SessionStore()
        self.secure_cookie = secure_cookie

    # ---- who is calling

    async def caller(self, request: web.Request) -> Caller | None:
        auth = request.headers.get("Authorization", "")
        if auth.lower().startswith("bearer ") and request.path.startswith("/api/"):
            identity = await self.kube.review_token(auth[7:].strip())
            return Caller(identity, None) if identity is not None else None
        session = self.sessions.get(request.cookies.get(COOKIE))
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
    except web.HTTPRedirection:
        raise
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _problem(request, exc.status, exc.text or exc.reason)
    except BadRequest as exc:
        response = _problem(request, 400, str(exc))
    except KubeUnavailable as exc:
        log.warning("Kubernetes API: %s", exc)
        response = _problem(request, 503, "the Kubernetes API did not answer; try again")
    except StoreError as exc:
        log.warning("store: %s", exc)
        response = _problem(request, 503, "the message store did not answer; try again")
    headers = response.headers
    headers["Content-Security-Policy"] = CSP
    headers["X-Content-Type-Options"] = "nosniff"
    headers["Referrer-Policy"] = "no-referrer"
    headers["X-Frame-Options"] = "DENY"
    headers["Cross-Origin-Opener-Policy"] = "same-origin"
    headers["Cross-Origin-Resource-Policy"] = "same-origin"
    headers.setdefault("Cache-Control", "no-store")
    return response


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
    caller = await portal.caller(request)
    if caller is None:
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


def _same_origin(request: web.Request) -> None:
    origin = request.headers.get("Origin")
    if origin is None or origin == "null":
        if request.headers.get("Sec-Fetch-Site") in (None, "same-origin", "none"):
            return  # not a browser, or a browser that says it is the same site
        raise web.HTTPForbidden(text="cross-site request refused")
    host = request.headers.get("Host", "")
    if origin.split("://", 1)[-1] != host:
        raise web.HTTPForbidden(text="cross-site request refused")


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
                     status: int = 200) -> web.Response:
    body = (h.error_box(error) if error else "") + (
        '<div class="login"><form method="post" action="/login">'
        '<label>Kubernetes token<textarea name="token" id="token" required autocomplete="off" '
        'spellcheck="false"></textarea></label>'
        '<p class="muted">A bearer token the cluster accepts, e.g. from '
        '<code>kubectl create token NAME</code> or your OIDC login. It is checked with the '
        'API server and not kept.</p>'
        '<button type="submit" id="login">Log in</button></form></div>')
    return web.Response(text=h.layout("Log in", body), content_type="text/html",
                        status=status)


async def login_get(request: web.Request) -> web.Response:
    return await login_form(request)


async def login_post(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    form = await request.post()
    token = str(form.get("token") or "").strip()
    if not token or len(token) > 16384:
        return await login_form(request, "give a Kubernetes bearer token", 400)
    identity = await portal.kube.review_token(token)
    if identity is None:
        return await login_form(request, "the API server did not accept this token", 401)
    # A new session at every login; an old one this browser held is ended.
    old = request.cookies.get(COOKIE)
    if old:
        portal.sessions.revoke(old)
    session = portal.sessions.create(identity)
    log.info("login: %s", identity.username)
    response = web.HTTPSeeOther("/")
    response.set_cookie(COOKIE, session.sid, path="/", httponly=True,
                        secure=portal.secure_cookie, samesite="Strict",
                        max_age=int(portal.sessions.lifetime))
    raise response


async def logout(request: web.Request) -> web.StreamResponse:
    portal = request.app[PORTAL]
    caller = _caller(request)
    if caller.session is not None:
        portal.sessions.revoke(caller.session.sid)
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
    since = h.iso(s.since)[:16] if s.since is not None else ""  # type: ignore[attr-defined]
    until = h.iso(s.until)[:16] if s.until is not None else ""  # type: ignore[attr-defined]
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


async def favicon(request: web.Request) -> web.Response:
    return web.Response(status=204, headers={"Cache-Control": "public, max-age=86400"})


def build_app(portal: Portal) -> web.Application:
    app = web.Application(middlewares=[security, authenticate], client_max_size=256 * 1024)
    app[PORTAL] = portal
    r = app.router
    r.add_get("/login", login_get)
    r.add_post("/login", login_post)
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
    return app
