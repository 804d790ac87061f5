"""Server-side sessions, kept in the store (``portal_sessions``): the one cookie the portal sets
names an entry there, nothing more. Every replica sees every session, and a restart logs nobody
out.

A session is short-lived (an idle timeout and an absolute lifetime), made new at every login
(the identifier is never reused, so a fixated identifier is worthless) and revocable: logging
out deletes it, and ``revoke_user`` ends every session of a user. Only a SHA-256 hash of the
identifier is stored: a copy of the table does not let anyone take over a session. The CSRF
token is derived from the identifier (an HMAC), so it is not stored either. The bearer token a
user logs in with is not kept: requests are authorised by the identity the API server (or the
OIDC issuer) gave.

A started OIDC login is an entry of its own kind (``login``: the state, nonce and PKCE verifier,
for at most ten minutes), named by the same cookie until the issuer sends the browser back; it
is used once and grants nothing.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kube import Identity
from .oidc import LOGIN_TTL, LoginStart

if TYPE_CHECKING:
    from .records import Records

COOKIE = "mailplane_session"
# Before login: a random value naming nothing, kept on /login only, to bind the login forms'
# CSRF token to this browser (a separate name, so that setting it never ends a session).
LOGIN_COOKIE = "mailplane_login"
LOGIN_COOKIE_AGE = 30 * 60  # seconds: a login page left open longer is reloaded
TOUCH_EVERY = 30.0  # seconds: how stale ``seen`` may get before a request writes it


def _hash(sid: str) -> str:
    return hashlib.sha256(sid.encode()).hexdigest()


@dataclass
class Session:
    sid: str  # the cookie's value: in memory for this request only, never stored
    identity: Identity
    created: float
    seen: float

    @property
    def csrf(self) -> str:
        mac = hmac.new(self.sid.encode(), b"mailplane-csrf", hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


class SessionStore:
    """Sessions in the store's database (the portal's ``Records`` connection)."""

    def __init__(self, records: Records, *, idle: float = 15 * 60,
                 lifetime: float = 8 * 3600, clock: Callable[[], float] = time.time) -> None:
        self.records = records
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock

    async def create(self, identity: Identity) -> Session:
        now = self.clock()
        await self.purge(now)
        session = Session(secrets.token_urlsafe(32), identity, now, now)
        await self.records._do(
            "INSERT INTO portal_sessions (id_hash, kind, username, data, created, seen, "
            "expires) VALUES (?, 'session', ?, ?, ?, ?, ?)",
            (_hash(session.sid), identity.username, json.dumps(identity.to_json()), now, now,
             now + self.lifetime))
        return session

    async def get(self, sid: str | None) -> Session | None:
        if not sid or len(sid) > 200:
            return None
        key = _hash(sid)
        rows = await self.records._all(
            "SELECT data, created, seen FROM portal_sessions WHERE id_hash = ? AND "
            "kind = 'session'", (key,))
        if not rows:
            return None
        row = rows[0]
        now = self.clock()
        created, seen = float(row["created"]), float(row["seen"])
        if now - seen > self.idle or now - created > self.lifetime:
            await self.records._do("DELETE FROM portal_sessions WHERE id_hash = ?", (key,))
            return None
        if now - seen > TOUCH_EVERY:  # not a write per request
            await self.records._do("UPDATE portal_sessions SET seen = ? WHERE id_hash = ?",
                                   (now, key))
            seen = now
        return Session(sid, Identity.from_json(json.loads(row["data"])), created, seen)

    async def revoke(self, sid: str) -> None:
        await self.records._do("DELETE FROM portal_sessions WHERE id_hash = ?", (_hash(sid),))

    async def revoke_user(self, username: str) -> int:
        rows = await self.records._all(
            "DELETE FROM portal_sessions WHERE kind = 'session' AND username = ? "
            "RETURNING id_hash", (username,))
        return len(rows)

    async def begin_login(self, start: LoginStart) -> str:
        """Keep a started OIDC login; the identifier goes into the cookie."""
        now = self.clock()
        await self.purge(now)
        pid = secrets.token_urlsafe(32)
        await self.records._do(
            "INSERT INTO portal_sessions (id_hash, kind, username, data, created, seen, "
            "expires) VALUES (?, 'login', '', ?, ?, ?, ?)",
            (_hash(pid), json.dumps(start.to_json()), now, now, now + LOGIN_TTL))
        return pid

    async def take_login(self, pid: str | None) -> LoginStart | None:
        """The started login the cookie names, removed (a callback is answered once)."""
        if not pid or len(pid) > 200:
            return None
        rows = await self.records._all(
            "DELETE FROM portal_sessions WHERE id_hash = ? AND kind = 'login' "
            "RETURNING data, expires", (_hash(pid),))
        if not rows or float(rows[0]["expires"]) < self.clock():
            return None
        return LoginStart.from_json(json.loads(rows[0]["data"]))

    async def purge(self, now: float | None = None) -> None:
        """Delete what has expired (at its absolute end, or idle for longer than allowed)."""
        now = self.clock() if now is None else now
        await self.records._do(
            "DELETE FROM portal_sessions WHERE expires < ? OR (kind = 'session' AND seen < ?)",
            (now, now - self.idle))

    async def count(self) -> int:
        rows = await self.records._all(
            "SELECT count(*) AS n FROM portal_sessions WHERE kind = 'session'")
        return int(rows[0]["n"])


def login_csrf(value: str) -> str:
    """The login forms' CSRF token for the pre-login cookie ``value``."""
    mac = hmac.new(value.encode(), b"mailplane-login-csrf", hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


def login_value(value: str | None) -> str | None:
    """``value`` if it can be a pre-login cookie the portal set, else None."""
    if value and 32 <= len(value) <= 64 and all(c.isalnum() or c in "-_" for c in value):
        return value
    return None


def login_csrf_ok(cookie: str | None, offered: str | None) -> bool:
    value = login_value(cookie)
    return (value is not None and bool(offered)
            and hmac.compare_digest(login_csrf(value).encode(), (offered or "").encode()))


def csrf_ok(session: Session, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(session.csrf.encode(), (offered or "").encode())
