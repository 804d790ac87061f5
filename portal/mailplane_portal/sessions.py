"""Server-side sessions: the one cookie the portal sets names an entry here, nothing more.

A session is short-lived (an idle timeout and an absolute lifetime), made new at every login
(the identifier is never reused, so a fixated identifier is worthless) and revocable: logging
out deletes it, and ``revoke_user`` ends every session of a user. The bearer token a user logs
in with is not kept: requests are authorised by the identity the API server returned for it.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from .kube import Identity

COOKIE = "mailplane_session"


@dataclass
class Session:
    sid: str
    csrf: str
    identity: Identity
    created: float
    seen: float


class SessionStore:
    """Sessions in the portal's memory (one replica; a restart logs everybody out)."""

    def __init__(self, *, idle: float = 15 * 60, lifetime: float = 8 * 3600,
                 clock: Callable[[], float] = time.time, limit: int = 10_000) -> None:
        self.idle = idle
        self.lifetime = lifetime
        self.clock = clock
        self.limit = limit
        self._sessions: dict[str, Session] = {}

    def create(self, identity: Identity) -> Session:
        now = self.clock()
        self._expire(now)
        if len(self._sessions) >= self.limit:  # bounded: the oldest go first
            for sid in sorted(self._sessions, key=lambda s: self._sessions[s].seen)[:100]:
                del self._sessions[sid]
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), identity,
                          now, now)
        self._sessions[session.sid] = session
        return session

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        session = self._sessions.get(sid)
        if session is None:
            return None
        now = self.clock()
        if now - session.seen > self.idle or now - session.created > self.lifetime:
            del self._sessions[sid]
            return None
        session.seen = now
        return session

    def revoke(self, sid: str) -> None:
        self._sessions.pop(sid, None)

    def revoke_user(self, username: str) -> int:
        gone = [s for s, v in self._sessions.items() if v.identity.username == username]
        for sid in gone:
            del self._sessions[sid]
        return len(gone)

    def _expire(self, now: float) -> None:
        for sid in [s for s, v in self._sessions.items()
                    if now - v.seen > self.idle or now - v.created > self.lifetime]:
            del self._sessions[sid]

    def __len__(self) -> int:
        return len(self._sessions)


def csrf_ok(session: Session, offered: str | None) -> bool:
    return bool(offered) and hmac.compare_digest(session.csrf.encode(), (offered or "").encode())
