"""Authentication: ``AUTH PLAIN`` and ``AUTH LOGIN``, only over TLS.

The client's credentials are decoded strictly (base64, three NUL-separated PLAIN fields, UTF-8),
the attempt is counted by the :class:`~.throttle.AuthThrottle` before the password is checked,
and a wrong password is answered ``535`` after ``limits.authFailureDelay``, which holds only this
session. Passwords never reach a log line; a failed AUTH is logged with the username only when it
is a configured one.
"""

from __future__ import annotations

import asyncio
import binascii
import logging
from base64 import b64decode
from typing import TYPE_CHECKING

from aiosmtpd.smtp import MISSING

from ..config import Credential
from .replies import R

if TYPE_CHECKING:
    from .session import RelaySMTP

log = logging.getLogger(__name__)

MECHANISMS = ("LOGIN", "PLAIN")


async def smtp_auth(session: RelaySMTP, arg: str | None) -> None:
    srv = session.server
    assert session.session is not None
    if not session.session.host_name or not session.session.extended_smtp:
        await session.push(R.EHLO_FIRST)
        return
    if not session.secure:
        session.count_refusal("tls_required")
        await session.push(R.AUTH_NEEDS_TLS)
        return
    if session.username is not None:
        await session.push(R.ALREADY_AUTH)
        return
    parts = (arg or "").split()
    if not parts or len(parts) > 2:
        await session.push(R.AUTH_SYNTAX)
        return
    mechanism = parts[0].upper()
    if mechanism not in MECHANISMS:
        await session.push(R.AUTH_MECH)
        return
    if srv.auth_throttle.blocked(session.peer_ip):
        srv.metrics.auth_failures.labels(reason="throttled").inc()
        await session.push(R.AUTH_THROTTLED)
        return
    initial = parts[1] if len(parts) == 2 else None
    if mechanism == "PLAIN":
        pair = await _plain_credentials(session, initial)
    else:
        pair = await _login_credentials(session, initial)
    if pair is None:
        srv.metrics.auth_failures.labels(reason="malformed").inc()
        return
    username, password = pair
    # Counted before the check, in the same step as the throttle test (no await between):
    # parallel sessions from one address cannot all pass the test first.
    attempt = srv.auth_throttle.begin(session.peer_ip, username)
    if attempt is None:
        srv.metrics.auth_failures.labels(reason="throttled").inc()
        await session.push(R.AUTH_THROTTLED)
        return
    cfg = srv.config()
    credential = cfg.credentials.get(username)
    ok = credential is not None and await check_password(credential, password)
    if ok:
        srv.auth_throttle.succeeded(attempt)
    else:
        srv.metrics.auth_failures.labels(reason="bad_credentials").inc()
        shown = username if credential is not None else "(unknown user)"
        log.info("AUTH %s failed for %s from %s", mechanism, shown, session.peer_ip)
        await asyncio.sleep(cfg.settings.limits.auth_failure_delay)
        await session.push(R.AUTH_INVALID)
        return
    session.authenticated_as(username)
    srv.metrics.auth_success.labels(mechanism=mechanism).inc()
    await session.push(R.AUTH_OK)


async def check_password(credential: Credential, password: str) -> bool:
    if credential.password_hash.startswith("sha256$") and (
        credential.previous_password_hash is None
        or credential.previous_password_hash.startswith("sha256$")
    ):
        return credential.check_password(password)
    # scrypt costs tens of milliseconds: off the loop.
    return await asyncio.to_thread(credential.check_password, password)


async def _decode_response(session: RelaySMTP, text: str) -> bytes | None:
    if text == "=":
        return b""
    try:
        return b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        await session.push(R.AUTH_NOT_BASE64)
        return None


async def _challenge(session: RelaySMTP, prompt: bytes) -> bytes | None:
    answer = await session.challenge_auth(prompt)  # answers 501 itself on '*' or bad base64
    return None if answer is MISSING else bytes(answer)


async def _plain_credentials(session: RelaySMTP, initial: str | None) -> tuple[str, str] | None:
    blob = await (_decode_response(session, initial) if initial is not None
                  else _challenge(session, b""))
    if blob is None:
        return None
    fields = blob.split(b"\x00")
    if len(fields) != 3:
        await session.push(R.AUTH_PLAIN_FIELDS)
        return None
    authzid, authcid, password = fields
    try:
        username, secret = authcid.decode("utf-8"), password.decode("utf-8")
        authz = authzid.decode("utf-8")
    except UnicodeDecodeError:
        await session.push(R.AUTH_NOT_UTF8)
        return None
    if authz and authz != username:
        await session.push(R.AUTH_AUTHZID)
        return None
    return username, secret


async def _login_credentials(session: RelaySMTP, initial: str | None) -> tuple[str, str] | None:
    user = await (_decode_response(session, initial) if initial is not None
                  else _challenge(session, b"Username:"))
    if user is None:
        return None
    password = await _challenge(session, b"Password:")
    if password is None:
        return None
    try:
        return user.decode("utf-8"), password.decode("utf-8")
    except UnicodeDecodeError:
        await session.push(R.AUTH_NOT_UTF8)
        return None
