"""The SMTP ingress: listeners, TLS, AUTH, sender policy, limits, robust parsing, graceful drain.

Built on aiosmtpd's ``SMTP`` protocol, with the parts that are not production-ready replaced:

- the command loop (``_handle_client``): strict CRLF and no control characters in commands,
  enhanced status codes, STARTTLS required before anything but EHLO/HELO/NOOP/RSET/QUIT
  (``trustedNetworks`` excepted), one write per reply burst (EHLO, pipelined commands),
  an internal error answers ``451 4.3.0`` with a correlation id (never the exception text), and
  sessions stop cleanly when the server drains;
- ``DATA``: read in large chunks up to the one true end-of-data ``<CRLF>.<CRLF>``; a bare CR or
  LF anywhere in the message (which covers every SMTP-smuggling end-of-data variant such as
  ``<LF>.<LF>`` or ``<CR><LF>.<CR>``) rejects the whole message with ``554 5.6.0``;
- ``AUTH``: PLAIN and LOGIN only after TLS, per-IP and per-username failure throttling, a delay
  before each ``535`` that does not hold up other sessions.

Every step reads the configuration through the ``config`` callable, so a hot reload applies to
the next command of every open session.
"""

from __future__ import annotations

import asyncio
import binascii
import contextlib
import email.utils
import logging
import re
import secrets
import socket
import ssl
import time
from base64 import b64decode
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, TLSSetupException

from .config import Credential, Listener, RelayConfig, domain_of
from .events import LogEvent
from .ingress.throttle import AuthThrottle, client_key
from .metrics import RelayMetrics
from .ratelimit import Limiter
from .reputation import Reputation
from .spool import QueuedMessage, Spool, SpoolError
from .tlsctx import ReloadingTLS

log = logging.getLogger(__name__)

IDENT = "ESMTP Mailplane"
# Commands longer than this (with CRLF) are refused: RFC 5321 allows 512 plus what extensions
# add to MAIL/RCPT (SIZE, BODY, AUTH=); 1 KiB leaves room without inviting abuse.
COMMAND_LINE_LIMIT = 1024
# The stream reader's buffer limit: DATA is read in chunks of up to this size.
READ_LIMIT = 64 * 1024
# Addresses written to the message log are cut to this length (a valid path is at most 256
# octets, RFC 5321 §4.5.3.1.3): a client cannot make one record arbitrarily large.
MAX_LOGGED_ADDRESS = 256
# Commands that do not move a session forward: they do not push its idle deadline.
NO_PROGRESS = frozenset({"NOOP", "RSET", "HELP", "VRFY", "EXPN"})
# While draining, how long a session that just finished a transaction may take to send QUIT.
DRAIN_QUIT_GRACE = 1.0
ALLOWED_BEFORE_TLS = frozenset({"EHLO", "HELO", "NOOP", "QUIT", "STARTTLS", "RSET"})
AUTH_MECHANISMS = ("LOGIN", "PLAIN")

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_DOT_LINE = re.compile(rb"(?:^|[\r\n])\.(?:[\r\n]|$)")
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# The everyday "<dot-atom@host.name> [params]" form, parsed without the email package's
# general RFC 5322 parser (about 60 us per address).
_PLAIN_PATH = re.compile(rf"<({_ATOM}(?:\.{_ATOM})*@{_LABEL}(?:\.{_LABEL})*)>(\s.*)?\Z", re.S)
_HELO_SAFE = re.compile(r"^[A-Za-z0-9.:\[\]_-]{1,255}$")


# The reply table: every fixed reply the relay sends, in one place.
class R:
    GREETING = "220 {host} " + IDENT
    CLOSING = "221 2.0.0 Bye"
    AUTH_OK = "235 2.7.0 Authentication successful"
    OK = "250 2.0.0 Ok"
    MAIL_OK = "250 2.1.0 Ok"
    RCPT_OK = "250 2.1.5 Ok"
    QUEUED = "250 2.0.0 Ok: queued as {queue_id}"
    DATA_GO = "354 End data with <CR><LF>.<CR><LF>"
    TOO_MANY_SESSIONS = "421 4.3.2 Too many connections, try again later"
    SHUTTING_DOWN = "421 4.3.2 Service shutting down, try again later"
    TOO_MANY_FROM_ADDRESS = "421 4.7.0 Too many connections from your address, try again later"
    TOO_MANY_REFUSED = "421 4.7.0 Too many refused commands, closing connection"
    AUTH_DEADLINE = "421 4.7.0 Authentication not completed in time, closing connection"
    LIFETIME = "421 4.4.2 Maximum session duration reached, closing connection"
    INTERNAL = "451 4.3.0 Internal error, reference {ref}"
    RATE = "451 4.7.1 Rate limit of {limit} messages per minute exceeded for {user}"
    QUOTA = "452 4.7.1 Daily quota of {limit} messages exceeded for {user}"
    SPOOL = "452 4.3.1 Insufficient system storage, try again later"
    TOO_MANY_RCPTS = "452 4.5.3 Too many recipients (at most {limit} per message)"
    AUTH_THROTTLED = "454 4.7.0 Too many failed authentication attempts, try again later"
    LINE_TOO_LONG = "500 5.5.2 Line too long"
    BARE_LF_COMMAND = "500 5.5.2 Commands must end with CRLF"
    BAD_SYNTAX = "500 5.5.2 Syntax error"
    UNKNOWN = "500 5.5.1 Command not recognized"
    NON_ASCII = "500 5.5.2 Non-ASCII command (SMTPUTF8 is not offered)"
    CONTROL_CHARS = "501 5.5.2 Control characters are not allowed in commands"
    BAD_ADDRESS = "501 5.1.3 Bad address syntax: expected <local-part@domain>"
    AUTH_SYNTAX = "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
    AUTH_NOT_BASE64 = "501 5.5.2 Malformed authentication data: not valid base64"
    AUTH_PLAIN_FIELDS = ("501 5.5.2 Malformed AUTH PLAIN data: expected base64 of "
                         "authzid NUL username NUL password")
    AUTH_NOT_UTF8 = "501 5.5.2 Malformed authentication data: username and password must be UTF-8"
    AUTH_AUTHZID = "501 5.5.2 Authorization identity must be empty or equal to the username"
    DATA_SYNTAX = "501 5.5.4 Syntax: DATA"
    STARTTLS_SYNTAX = "501 5.5.4 Syntax: STARTTLS"
    QUIT_SYNTAX = "501 5.5.4 Syntax: QUIT"
    EHLO_FIRST = "503 5.5.1 Send EHLO first"
    EHLO_SYNTAX = "501 5.5.4 Syntax: EHLO hostname"
    ALREADY_AUTH = "503 5.5.1 Already authenticated"
    ALREADY_TLS = "503 5.5.1 TLS already active"
    NEED_RCPT = "503 5.5.1 Need RCPT command"
    AUTH_MECH = "504 5.5.4 Unrecognized authentication mechanism"
    AUTH_REQUIRED = "530 5.7.0 Authentication required"
    TLS_REQUIRED = "530 5.7.0 Must issue a STARTTLS command first"
    AUTH_INVALID = "535 5.7.8 Authentication credentials invalid"
    AUTH_NEEDS_TLS = "538 5.7.11 Encryption required for requested authentication mechanism"
    SENDER_DOMAIN = "550 5.7.1 Sender domain {domain} is not enabled on this relay"
    SENDER_NOT_ALLOWED = "550 5.7.1 Credential {user} may not send from domain {domain}"
    HEADER_FROM_DOMAIN = "550 5.7.1 Header From: domain {domain} is not enabled on this relay"
    HEADER_FROM_NOT_ALLOWED = (
        "550 5.7.1 Credential {user} may not send as header From: domain {domain}")
    HEADER_FROM_MISSING = "550 5.7.1 Message has no From: header address"
    SUPPRESSED = "550 5.1.1 Recipient {address} is on the suppression list ({reason})"
    TOO_BIG = "552 5.3.4 Message size exceeds fixed maximum message size of {limit} bytes"
    SUSPENDED = "554 5.7.1 Credential {user} is suspended: {reason}"
    CREDENTIAL_GONE = "554 5.7.1 Credential {user} is no longer valid"
    BARE_LF = "554 5.6.0 Message contains a bare CR or LF; lines must end with CRLF"
    SMUGGLING = "554 5.6.0 Malformed end-of-data sequence; message refused"
    DATA_LINE_TOO_LONG = "554 5.6.0 Message has a line longer than {limit} characters"


class QueueLike(Protocol):
    def submit(self, msg: QueuedMessage) -> None: ...


class MessageLogLike(Protocol):
    def record(self, event: LogEvent) -> None: ...


class SuppressionLike(Protocol):
    def is_suppressed(self, address: str) -> tuple[str, float] | None: ...


def _unquoted_space_in_path(arg: str) -> bool:
    arg = arg.lstrip()
    if not arg.startswith("<"):
        return False
    quoted = escaped = False
    for ch in arg:
        if escaped:
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return False
        elif ch in " \t" and not quoted:
            return True
    return False


def _valid_mailbox(address: str) -> bool:
    local, at, domain = address.rpartition("@")
    return bool(at and local and domain) and " " not in domain


class _Handler:
    """aiosmtpd's hook object; every hook delegates to the session (the protocol instance)."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[..., Any]] = {
            "MAIL": self.handle_MAIL, "RCPT": self.handle_RCPT}

    async def handle_MAIL(self, proto: RelaySMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        return await proto.on_mail(address, options)

    async def handle_RCPT(self, proto: RelaySMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        return await proto.on_rcpt(address, options)


class RelaySMTP(SMTP):
    """One SMTP session."""

    def __init__(self, server: SubmissionServer, listener: Listener) -> None:
        cfg = server.config().settings
        self._srv = server
        self.listener = listener
        self._starttls = listener.tls == "starttls"
        self._secure = not self._starttls  # implicit TLS: encrypted from the first byte
        self._username: str | None = None
        self._sender_domain = "other"
        self._idle = False
        self._closing = False
        self._registered = False
        self._held = bytearray()
        self._trust_cache: tuple[RelayConfig, bool] | None = None
        self._refused = 0
        self._started = 0.0
        self._limit_handle: asyncio.TimerHandle | None = None
        self._ending: tuple[str, str] | None = None
        self.address_key = ""
        self.tls_version: str | None = None
        self._init_protocol(server, cfg.hostname, cfg.limits.session_timeout)

    def _init_protocol(self, server: SubmissionServer, hostname: str, timeout: float) -> None:
        """What aiosmtpd's ``SMTP.__init__`` sets up, without its per-connection introspection
        (``inspect.getmembers`` of the protocol and the handler: ~90 us per connection, which
        shows at a thousand connections per second). Written against aiosmtpd 1.4.6 (pinned);
        the ingress tests exercise every attribute through real sessions."""
        loop = asyncio.get_running_loop()
        self.loop = loop
        asyncio.StreamReaderProtocol.__init__(
            self, asyncio.StreamReader(limit=READ_LIMIT, loop=loop),
            client_connected_cb=self._cb_client_connected, loop=loop)
        self.line_length_limit = READ_LIMIT
        self.__ident__ = IDENT
        self.event_handler = server.handler
        self.data_size_limit = None  # SIZE is advertised and enforced here, with 5.3.4 codes
        self.enable_SMTPUTF8 = False
        self._decode_data = False
        self.hostname = hostname
        self.tls_context = server.tls.context if self._starttls else None
        self.require_starttls = False  # enforced by our own command loop
        self._timeout_duration = timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = None
        self._auth_required = False
        self._auth_methods = {}  # AUTH is ours (smtp_AUTH below)
        self._handle_hooks = server.handler.hooks
        self._ehlo_hook_ver = None  # EHLO is ours (smtp_EHLO below)
        # Looked up per command in the class table (_SMTP_METHODS) rather than bound here for
        # every connection; aiosmtpd's HELP would read this, and HELP is not offered.
        self._smtp_methods = {}
        self._deadline = 0.0
        self._enforce_call_limit = False

    # ---------------------------------------------------------------- connection lifecycle

    @property
    def peer_ip(self) -> str:
        peer = self.session.peer if self.session is not None else None
        return str(peer[0]) if isinstance(peer, tuple) and peer else ""

    @property
    def idle(self) -> bool:
        """Waiting for a command outside a mail transaction: safe to close at shutdown."""
        return self._idle and self.envelope is not None and not self.envelope.mail_from

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._registered
        super().connection_made(transport)
        if first:
            self._registered = True
            self._srv.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._limit_handle is not None:
            self._limit_handle.cancel()
            self._limit_handle = None
        try:
            super().connection_lost(error)
        finally:
            if self._registered:
                self._registered = False
                self._srv.session_closed(self)

    async def push(self, status: str | bytes) -> None:
        """Send a reply. A plain 250 is held back while further pipelined commands are already
        buffered, so a pipelined MAIL/RCPT/DATA burst is answered in one write (a send costs
        about 0.1 ms here); any other reply flushes what is held."""
        data = status.encode("ascii") if isinstance(status, str) else status
        if data[:1] in (b"4", b"5"):
            self._refused += 1
        self._held.extend(data + b"\r\n")
        if data.startswith(b"250") and b"\n" in self._reader._buffer:  # type: ignore[attr-defined]
            return
        self._writer.write(bytes(self._held))
        self._held.clear()
        await self._writer.drain()

    def _reset_timeout(self, duration: float | None = None) -> None:
        """Push the session's idle deadline. One timer per session, re-armed only when it fires
        before the deadline: a command costs a clock read instead of aiosmtpd's timer cancel
        and re-create (seven or more per message)."""
        self._deadline = self.loop.time() + (duration or self._timeout_duration)
        handle = self._timeout_handle
        if handle is None or handle.cancelled() or handle.when() > self._deadline:
            if handle is not None:
                handle.cancel()
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _check_timeout(self) -> None:
        if self.transport is None:
            return
        if self.loop.time() >= self._deadline:
            # abort, not close: close waits for buffered replies to drain, which never happens
            # for a client that stopped reading; connection_lost ends the session.
            transport = self.transport
            if isinstance(transport, asyncio.WriteTransport):
                transport.abort()
            else:
                transport.close()
        else:
            self._timeout_handle = self.loop.call_at(self._deadline, self._check_timeout)

    def _arm_session_limits(self) -> None:
        """One timer for the deadline to authenticate and the maximum session lifetime; both
        are read from the configuration in force when it fires."""
        limits = self._srv.config().settings.limits
        due = self._started + limits.max_session_lifetime
        if not self._authenticated_or_trusted():
            due = min(due, self._started + limits.auth_deadline)
        if self._limit_handle is not None:
            self._limit_handle.cancel()
        self._limit_handle = self.loop.call_at(due, self._check_session_limits)

    def _check_session_limits(self) -> None:
        self._limit_handle = None
        if self.transport is None or self._closing:
            return
        limits = self._srv.config().settings.limits
        now = self.loop.time()
        if (not self._authenticated_or_trusted()
                and now >= self._started + limits.auth_deadline):
            # Nothing of value is in flight before AUTH: close at once.
            self._reject("auth_deadline")
            self.close_now(R.AUTH_DEADLINE)
        elif now >= self._started + limits.max_session_lifetime:
            self._end_session("session_lifetime", R.LIFETIME)
        else:
            self._arm_session_limits()

    def _end_session(self, reason: str, reply: str) -> None:
        """Close now if waiting for a command; otherwise once the command in progress (a DATA
        transfer, say) has been answered."""
        if self._idle:
            self._reject(reason)
            self.close_now(reply)
        else:
            self._ending = (reason, reply)

    def _authenticated_or_trusted(self) -> bool:
        return self._username is not None or self._trusted()

    def _flush_held(self) -> None:
        if self._held and self.transport is not None:
            with contextlib.suppress(Exception):
                self._writer.write(bytes(self._held))
            self._held.clear()

    def close_now(self, reply: str | None = None) -> None:
        """Send a last reply (best effort) and close, from outside the session's task."""
        if self.transport is None or self._closing:
            return
        self._closing = True
        if reply is not None:
            self._held.extend(reply.encode() + b"\r\n")
        self._flush_held()
        self.transport.close()

    def _close(self) -> None:
        self._closing = True
        if self.transport is not None:
            self._flush_held()
            self.transport.close()

    # ---------------------------------------------------------------- the command loop

    async def _handle_client(self) -> None:
        srv = self._srv
        refusal = srv.admission_refusal(self)
        if refusal is not None:
            reason, reply = refusal
            srv.metrics.rejected.labels(reason=reason).inc()
            await self.push(reply)
            self._close()
            return
        if not self._starttls:
            self._note_tls()
        self._started = self.loop.time()
        self._arm_session_limits()
        await self.push(R.GREETING.format(host=self.hostname))
        while self.transport is not None and not self._closing:
            try:
                if srv.draining and self.envelope is not None and not self.envelope.mail_from:
                    await self._leave_while_draining()
                    return
                if self._refused >= srv.config().settings.limits.max_refused_commands:
                    self._reject("too_many_refused")
                    await self.push(R.TOO_MANY_REFUSED)
                    self._close()
                    return
                if self._ending is not None:
                    reason, reply = self._ending
                    self._reject(reason)
                    await self.push(reply)
                    self._close()
                    return
                line = await self._read_command()
                if line is None:
                    continue
                command, arg = line
                method = _SMTP_METHODS.get(command)
                if method is None:
                    self._reject("unknown_command")
                    await self.push(R.UNKNOWN)
                    continue
                if self._starttls and not self._secure and command not in ALLOWED_BEFORE_TLS and (
                    # A trusted network (off by default) relays without AUTH, so it may also
                    # skip STARTTLS (the benchmark's smtp-source cannot do TLS); AUTH never.
                    command == "AUTH" or not self._trusted()
                ):
                    self._reject("tls_required")
                    await self.push(R.TLS_REQUIRED)
                    continue
                if command not in NO_PROGRESS:
                    self._reset_timeout()
                await method(self, arg)
            except asyncio.CancelledError:
                self._writer.close()
                raise
            except (ConnectionError, ssl.SSLError, asyncio.IncompleteReadError):
                # The peer went away or broke the TLS stream: nothing to answer.
                self._close()
                return
            except TLSSetupException:
                # Nothing read before or after a failed handshake may be acted upon.
                log.debug("session %s: TLS handshake failed", self.peer_ip)
                self._close()
                if self._original_transport is not None:
                    self._original_transport.close()
                # The TLS layer never reports a loss for a session whose handshake failed.
                if self._registered:
                    self.connection_lost(None)
                return
            except Exception:
                ref = secrets.token_hex(6)
                log.exception("session %s: internal error, reference %s", self.peer_ip, ref)
                self._reject("internal_error")
                self.envelope = self._create_envelope()
                try:
                    await self.push(R.INTERNAL.format(ref=ref))
                except ConnectionError:
                    self._close()
                    return

    async def _leave_while_draining(self) -> None:
        """A transaction finished while the server drains: a client about to QUIT gets its 221
        (a clean end for it); anything else, or silence, gets 421."""
        try:
            line = await asyncio.wait_for(self._read_command(), DRAIN_QUIT_GRACE)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            line = None
        with contextlib.suppress(ConnectionError):
            if line is not None and line[0] == "QUIT":
                await self.push(R.CLOSING)
            else:
                self._reject("shutting_down")
                await self.push(R.SHUTTING_DOWN)
        self._close()

    async def _read_command(self) -> tuple[str, str | None] | None:
        """The next command as (VERB, argument), or None when it was answered already."""
        self._idle = True
        try:
            raw = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._skip_line(exc.consumed)
            self._reject("line_too_long")
            await self.push(R.LINE_TOO_LONG)
            return None
        finally:
            self._idle = False
        if len(raw) > COMMAND_LINE_LIMIT:
            self._reject("line_too_long")
            await self.push(R.LINE_TOO_LONG)
            return None
        if not raw.endswith(b"\r\n"):
            self._reject("bad_syntax")
            await self.push(R.BARE_LF_COMMAND)
            return None
        body = raw[:-2]
        if _CONTROL.search(body):
            self._reject("bad_syntax")
            await self.push(R.CONTROL_CHARS)
            return None
        verb, _, rest = body.partition(b" ")
        try:
            command = verb.decode("ascii").upper()
            arg = rest.strip().decode("ascii") or None
        except UnicodeDecodeError:
            self._reject("bad_syntax")
            await self.push(R.NON_ASCII)
            return None
        if not command:
            self._reject("bad_syntax")
            await self.push(R.BAD_SYNTAX)
            return None
        return command, arg

    async def _skip_line(self, consumed: int) -> None:
        await self._reader.readexactly(consumed)
        while True:
            try:
                await self._reader.readuntil(b"\n")
                return
            except asyncio.LimitOverrunError as exc:
                await self._reader.readexactly(exc.consumed)

    # ---------------------------------------------------------------- EHLO, STARTTLS, QUIT

    async def smtp_QUIT(self, arg: str | None) -> None:
        if arg:
            await self.push(R.QUIT_SYNTAX)
            return
        await self.push(R.CLOSING)
        self._close()

    async def smtp_EHLO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push(R.EHLO_SYNTAX)
            return
        assert self.session is not None
        self.envelope = self._create_envelope()
        self.session.extended_smtp = True
        self.session.host_name = hostname
        # One write for the whole multi-line reply (aiosmtpd writes line by line).
        await self.push("\r\n".join(self.ehlo_responses()))

    def ehlo_responses(self) -> list[str]:
        limits = self._srv.config().settings.limits
        lines = [self.hostname, f"SIZE {limits.max_message_size}", "8BITMIME", "PIPELINING",
                 "ENHANCEDSTATUSCODES"]
        if self._starttls and not self._secure:
            lines.append("STARTTLS")
        if self._secure:
            lines.append("AUTH " + " ".join(AUTH_MECHANISMS))
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push(R.STARTTLS_SYNTAX)
            return
        if self._secure:
            await self.push(R.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)
        # aiosmtpd discarded any plaintext pipelined behind STARTTLS when the handshake
        # completed, and started a fresh session: the client must EHLO again.
        self._secure = True
        self._username = None
        self._note_tls()

    def _note_tls(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        version = ssl_object.version() if ssl_object is not None else None
        self.tls_version = version
        self._srv.metrics.tls_sessions.labels(
            listener=self.listener.name, version=version or "unknown").inc()

    # ---------------------------------------------------------------- AUTH

    async def smtp_AUTH(self, arg: str | None) -> None:
        srv = self._srv
        assert self.session is not None
        if not self.session.host_name or not self.session.extended_smtp:
            await self.push(R.EHLO_FIRST)
            return
        if not self._secure:
            self._reject("tls_required")
            await self.push(R.AUTH_NEEDS_TLS)
            return
        if self._username is not None:
            await self.push(R.ALREADY_AUTH)
            return
        parts = (arg or "").split()
        if not parts or len(parts) > 2:
            await self.push(R.AUTH_SYNTAX)
            return
        mechanism = parts[0].upper()
        if mechanism not in AUTH_MECHANISMS:
            await self.push(R.AUTH_MECH)
            return
        if srv.auth_throttle.blocked(self.peer_ip):
            srv.metrics.auth_failures.labels(reason="throttled").inc()
            await self.push(R.AUTH_THROTTLED)
            return
        initial = parts[1] if len(parts) == 2 else None
        if mechanism == "PLAIN":
            pair = await self._plain_credentials(initial)
        else:
            pair = await self._login_credentials(initial)
        if pair is None:
            srv.metrics.auth_failures.labels(reason="malformed").inc()
            return
        username, password = pair
        # Counted before the check, in the same step as the throttle test (no await between):
        # parallel sessions from one address cannot all pass the test first.
        attempt = srv.auth_throttle.begin(self.peer_ip, username)
        if attempt is None:
            srv.metrics.auth_failures.labels(reason="throttled").inc()
            await self.push(R.AUTH_THROTTLED)
            return
        cfg = srv.config()
        credential = cfg.credentials.get(username)
        ok = credential is not None and await _check_password(credential, password)
        if ok:
            srv.auth_throttle.succeeded(attempt)
        else:
            srv.metrics.auth_failures.labels(reason="bad_credentials").inc()
            shown = username if credential is not None else "(unknown user)"
            log.info("AUTH %s failed for %s from %s", mechanism, shown, self.peer_ip)
            await asyncio.sleep(cfg.settings.limits.auth_failure_delay)
            await self.push(R.AUTH_INVALID)
            return
        self._username = username
        self.session.authenticated = True
        self.session.auth_data = username  # type: ignore[assignment]
        self._arm_session_limits()  # the deadline to authenticate no longer applies
        srv.metrics.auth_success.labels(mechanism=mechanism).inc()
        await self.push(R.AUTH_OK)

    async def _decode_response(self, text: str | bytes) -> bytes | None:
        if text in ("=", b"="):
            return b""
        try:
            return b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            await self.push(R.AUTH_NOT_BASE64)
            return None

    async def _challenge(self, prompt: bytes) -> bytes | None:
        answer = await self.challenge_auth(prompt)  # answers 501 itself on '*' or bad base64
        return None if answer is MISSING else bytes(answer)

    async def _plain_credentials(self, initial: str | None) -> tuple[str, str] | None:
        blob = await (self._decode_response(initial) if initial is not None
                      else self._challenge(b""))
        if blob is None:
            return None
        fields = blob.split(b"\x00")
        if len(fields) != 3:
            await self.push(R.AUTH_PLAIN_FIELDS)
            return None
        authzid, authcid, password = fields
        try:
            username, secret = authcid.decode("utf-8"), password.decode("utf-8")
            authz = authzid.decode("utf-8")
        except UnicodeDecodeError:
            await self.push(R.AUTH_NOT_UTF8)
            return None
        if authz and authz != username:
            await self.push(R.AUTH_AUTHZID)
            return None
        return username, secret

    async def _login_credentials(self, initial: str | None) -> tuple[str, str] | None:
        user = await (self._decode_response(initial) if initial is not None
                      else self._challenge(b"Username:"))
        if user is None:
            return None
        password = await self._challenge(b"Password:")
        if password is None:
            return None
        try:
            return user.decode("utf-8"), password.decode("utf-8")
        except UnicodeDecodeError:
            await self.push(R.AUTH_NOT_UTF8)
            return None

    # ---------------------------------------------------------------- MAIL, RCPT

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        match = _PLAIN_PATH.match(arg.lstrip())
        if match is not None:
            return match.group(1), match.group(2) or ""
        if _unquoted_space_in_path(arg):
            # The email package's lenient parser would quote "a b@x" into '"a b"@x'.
            return None, None
        result: tuple[str | None, str | None] = super()._getaddr(arg)
        return result

    def _trusted(self) -> bool:
        """Is the peer in trustedNetworks? Cached per configuration object (hot reload swaps
        the object, which invalidates the cache)."""
        cfg = self._srv.config()
        if self._trust_cache is None or self._trust_cache[0] is not cfg:
            self._trust_cache = (cfg, cfg.is_trusted(self.peer_ip))
        return self._trust_cache[1]

    def _credential(self, cfg: RelayConfig) -> Credential | None:
        return cfg.credentials.get(self._username) if self._username is not None else None

    async def on_mail(self, address: str, options: list[str]) -> str:
        srv = self._srv
        cfg = srv.config()
        limits = cfg.settings.limits
        assert self.envelope is not None
        if not _valid_mailbox(address):
            return self._refuse("bad_syntax", R.BAD_ADDRESS, address)
        for option in options:
            if option.startswith("SIZE="):
                size = option[5:]
                if not size.isdigit():
                    return self._refuse("bad_syntax", R.BAD_SYNTAX, address)
                if int(size) > limits.max_message_size:
                    return self._refuse("size", R.TOO_BIG.format(limit=limits.max_message_size),
                                        address)
        domain = domain_of(address)
        if self._username is None:
            if not self._trusted():
                return self._refuse("auth_required", R.AUTH_REQUIRED, address)
            self._sender_domain = domain if domain in cfg.domains else "other"
        else:
            user = self._username
            credential = cfg.credentials.get(user)
            if credential is None:
                return self._refuse("suspended", R.CREDENTIAL_GONE.format(user=user), address)
            if credential.suspended:
                why = credential.suspended_reason or "no reason given"
                return self._refuse("suspended", R.SUSPENDED.format(user=user, reason=why),
                                    address)
            pause = srv.reputation.paused(user) if srv.reputation is not None else None
            if pause is not None:
                return self._refuse("paused", pause.reply(user), address)
            if domain not in cfg.domains:
                return self._refuse("domain_not_enabled", R.SENDER_DOMAIN.format(domain=domain),
                                    address)
            if not credential.may_send_as(address):
                return self._refuse("sender_not_allowed",
                                    R.SENDER_NOT_ALLOWED.format(user=user, domain=domain),
                                    address)
            over = srv.limiter.check_message(credential)
            if over is not None:
                return self._refuse_limit(over.kind, over.limit, user, address)
            self._sender_domain = domain
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(options)
        return R.MAIL_OK

    async def on_rcpt(self, address: str, options: list[str]) -> str:
        srv = self._srv
        assert self.envelope is not None
        limit = srv.config().settings.limits.max_recipients
        if len(self.envelope.rcpt_tos) >= limit:
            return self._refuse("too_many_recipients", R.TOO_MANY_RCPTS.format(limit=limit),
                                self.envelope.mail_from, address)
        if not _valid_mailbox(address):
            return self._refuse("bad_syntax", R.BAD_ADDRESS, self.envelope.mail_from, address)
        suppressed = srv.suppression.is_suppressed(address)
        if suppressed is not None:
            reply = R.SUPPRESSED.format(address=address, reason=suppressed[0])
            return self._refuse("suppressed", reply, self.envelope.mail_from, address)
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(options)
        return R.RCPT_OK

    def _refuse_limit(self, kind: str, limit: int, user: str, sender: str) -> str:
        if kind == "quota":
            return self._refuse("quota_exceeded", R.QUOTA.format(limit=limit, user=user), sender)
        return self._refuse("rate_limited", R.RATE.format(limit=limit, user=user), sender)

    def _reject(self, reason: str) -> None:
        self._srv.metrics.rejected.labels(reason=reason).inc()

    def _refuse(self, reason: str, reply: str, sender: str | None,
                recipient: str | None = None, size: int | None = None) -> str:
        """Count a refused transaction step, and record it in the message log when the client
        authenticated (or is trusted): an anonymous client's refusals are counted in metrics
        only, so it cannot fill the log. Returns the reply to send."""
        self._reject(reason)
        if self._authenticated_or_trusted():
            self._srv.log.record(LogEvent(
                ts=time.time(), status="rejected", queue_id=None, message_id=None,
                credential=self._username, sender=capped(sender or ""),
                recipient=None if recipient is None else capped(recipient),
                response=capped(reply, 512), size=size, remote=self.peer_ip))
        return reply

    # ---------------------------------------------------------------- DATA

    async def smtp_DATA(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push(R.NEED_RCPT)
            return
        if arg:
            await self.push(R.DATA_SYNTAX)
            return
        await self.push(R.DATA_GO)
        limits = self._srv.config().settings.limits
        raw, overflow = await self._read_data(limits.max_message_size)
        try:
            reply = await self._accept(raw, overflow)
        finally:
            self.envelope = self._create_envelope()
        await self.push(reply)

    async def _read_data(self, max_size: int) -> tuple[bytes, bool]:
        """Everything up to and including the first <CRLF>.<CRLF> (the DATA line's own CRLF
        counts as the first CRLF). Stops keeping data once it is certainly too large."""
        reader = self._reader
        # Dot-stuffing adds at most one byte per line of 2+ bytes: beyond this the content
        # exceeds max_size whatever it holds, and is no longer kept in memory.
        keep_limit = max_size + max_size // 2 + 5
        chunks: list[bytes] = []
        total = 0
        tail = b"\r\n"
        overflow = False
        while True:
            try:
                chunk = await reader.readuntil(b".\r\n")
            except asyncio.LimitOverrunError as exc:
                chunk = await reader.readexactly(exc.consumed)
            total += len(chunk)
            if not overflow:
                if total > keep_limit:
                    overflow = True
                    chunks.clear()
                else:
                    chunks.append(chunk)
            tail = (tail + chunk[-5:])[-5:]
            self._reset_timeout()
            if tail == b"\r\n.\r\n":
                break
        return b"".join(chunks), overflow

    async def _accept(self, raw: bytes, overflow: bool) -> str:
        srv = self._srv
        cfg = srv.config()
        limits = cfg.settings.limits
        env = self.envelope
        assert env is not None
        sender = env.mail_from or ""
        too_big = R.TOO_BIG.format(limit=limits.max_message_size)
        if overflow:
            return self._refuse("size", too_big, sender)
        body = raw[:-3]  # drop ".\r\n"; the last line keeps its CRLF
        crlf = body.count(b"\r\n")
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
            if _DOT_LINE.search(body):
                return self._refuse("smuggling", R.SMUGGLING, sender)
            return self._refuse("bare_lf", R.BARE_LF, sender)
        if body.startswith(b"."):
            body = body[1:]
        content = body.replace(b"\r\n.", b"\r\n")
        if len(content) > limits.max_line_length + 2 and (
            max(map(len, content.split(b"\r\n"))) > limits.max_line_length
        ):
            return self._refuse("line_too_long",
                                R.DATA_LINE_TOO_LONG.format(limit=limits.max_line_length), sender)
        if len(content) > limits.max_message_size:
            return self._refuse("size", too_big, sender, size=len(content))

        from_values, message_id = header_fields(content)
        credential = self._credential(cfg)
        if self._username is not None:
            if credential is None:
                return self._refuse("suspended", R.CREDENTIAL_GONE.format(user=self._username),
                                    sender)
            refusal = self._check_header_from(cfg, credential, from_values, sender)
            if refusal is not None:
                return refusal
            over = srv.limiter.check_message(credential)
            if over is not None:
                return self._refuse_limit(over.kind, over.limit, credential.username, sender)

        content = self._received_header() + content
        try:
            msg = await _commit_shielded(
                srv, mail_from=sender, recipients=list(env.rcpt_tos), data=content,
                message_id=message_id, credential=self._username,
                sender_domain=self._sender_domain, listener=self.listener.name)
        except SpoolError as exc:
            log.error("spool commit failed: %s", exc)
            return self._refuse("spool_error", R.SPOOL, sender, size=len(content))
        if credential is not None:
            srv.limiter.record_message(credential)
        reply = R.QUEUED.format(queue_id=msg.queue_id)
        now = time.time()
        for rcpt in msg.recipients:
            srv.log.record(LogEvent(
                ts=now, status="received", queue_id=msg.queue_id, message_id=message_id,
                credential=self._username, sender=capped(sender), recipient=capped(rcpt.address),
                response=reply, size=msg.size, remote=self.peer_ip))
        srv.received_counter(self.listener.name, self._sender_domain,
                             self._username or "none").inc()
        return reply

    def _check_header_from(self, cfg: RelayConfig, credential: Credential,
                           values: list[str], sender: str) -> str | None:
        addresses = [a for _, a in email.utils.getaddresses(values) if a]
        if not addresses:
            return self._refuse("sender_not_allowed", R.HEADER_FROM_MISSING, sender)
        for address in addresses:
            domain = domain_of(address)
            if domain not in cfg.domains:
                return self._refuse("domain_not_enabled",
                                    R.HEADER_FROM_DOMAIN.format(domain=domain), sender)
            if not credential.may_send_as(address):
                reply = R.HEADER_FROM_NOT_ALLOWED.format(user=credential.username,
                                                         domain=domain)
                return self._refuse("sender_not_allowed", reply, sender)
        return None

    def _received_header(self) -> bytes:
        assert self.session is not None
        helo = self.session.host_name or ""
        helo = helo if _HELO_SAFE.match(helo) else "unknown"
        proto = "ESMTP" + ("S" if self._secure else "") + ("A" if self._username else "")
        stamp = self._srv.date_stamp()
        return (f"Received: from {helo} ({self.peer_ip})\r\n\tby {self.hostname} with {proto};"
                f" {stamp}\r\n").encode("ascii")


_SMTP_COMMANDS = tuple(
    name[5:] for name in dir(RelaySMTP) if name.startswith("smtp_") and name[5:].isupper())
_SMTP_METHODS: dict[str, Callable[[RelaySMTP, str | None], Awaitable[None]]] = {
    name: getattr(RelaySMTP, "smtp_" + name) for name in _SMTP_COMMANDS}


def capped(text: str, limit: int = MAX_LOGGED_ADDRESS) -> str:
    """Peer-supplied text cut to a bounded length for logs and the message log."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def header_fields(content: bytes) -> tuple[list[str], str | None]:
    """The unfolded values of every ``From:`` header, and the first ``Message-ID:``.

    A small scanner instead of the email package's parser (about 0.1 ms a message). Stricter
    where it matters: a name is compared with whitespace around it removed, so an obsolete
    ``From :`` counts as a From header too (some readers show it as one)."""
    end = content.find(b"\r\n\r\n")
    head = content if end < 0 else content[: end + 2]
    if content.startswith(b"\r\n"):
        head = b""
    fields: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and fields:
            name, value = fields[-1]
            fields[-1] = (name, (value + b" " + line.strip()).strip())
        else:
            name, colon, value = line.partition(b":")
            if colon:
                fields.append((name.strip().lower(), value.strip()))
    from_values = [v.decode("utf-8", "replace") for n, v in fields if n == b"from"]
    message_id = next((v for n, v in fields if n == b"message-id"), None)
    mid = message_id.decode("utf-8", "replace")[:998] if message_id else None
    return from_values, mid or None


async def _check_password(credential: Credential, password: str) -> bool:
    if credential.password_hash.startswith("sha256$") and (
        credential.previous_password_hash is None
        or credential.previous_password_hash.startswith("sha256$")
    ):
        return credential.check_password(password)
    # scrypt costs tens of milliseconds: off the loop.
    return await asyncio.to_thread(credential.check_password, password)


async def _commit_shielded(srv: SubmissionServer, **kwargs: Any) -> QueuedMessage:
    """Commit; if the session is cancelled meanwhile (client gone), finish the commit anyway and
    queue the message: it is on disk, so it must be delivered (the client may send it again:
    at-least-once)."""
    task = asyncio.ensure_future(srv.spool.commit(**kwargs))
    try:
        msg = await asyncio.shield(task)
    except asyncio.CancelledError:
        task.add_done_callback(srv.submit_orphan)
        raise
    srv.queue.submit(msg)
    return msg


class SubmissionServer:
    def __init__(
        self,
        *,
        config: Callable[[], RelayConfig],
        tls: ReloadingTLS,
        spool: Spool,
        queue: QueueLike,
        log: MessageLogLike,
        suppression: SuppressionLike,
        limiter: Limiter,
        metrics: RelayMetrics,
        reputation: Reputation | None = None,
        auth_throttle: AuthThrottle | None = None,
    ) -> None:
        self.config = config
        self.auth_throttle = auth_throttle or AuthThrottle(lambda: config().settings.limits)
        self._per_address: dict[str, int] = {}
        self.reputation = reputation
        self.tls = tls
        self.spool = spool
        self.queue = queue
        self.log = log
        self.suppression = suppression
        self.limiter = limiter
        self.metrics = metrics
        self.handler = _Handler()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._ports: dict[str, int] = {}
        self._sessions: set[RelaySMTP] = set()
        self._listener_metrics: dict[str, tuple[Any, Any]] = {}
        self._date: tuple[int, str] = (0, "")
        self._received: dict[tuple[str, str, str], Any] = {}
        self._empty = asyncio.Event()
        self._empty.set()
        # aiosmtpd logs every envelope address at INFO on this logger.
        logging.getLogger("mail.log").setLevel(max(logging.WARNING,
                                                   logging.getLogger("mail.log").level))

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        settings = self.config().settings
        try:
            for listener in settings.listeners:
                server = await loop.create_server(
                    partial(RelaySMTP, self, listener),
                    host=listener.address,
                    port=listener.port,
                    ssl=self.tls.context if listener.tls == "implicit" else None,
                    reuse_address=True,
                    reuse_port=settings.workers > 1 or None,
                    backlog=1024,
                    ssl_handshake_timeout=30.0 if listener.tls == "implicit" else None,
                )
                self._servers.append(server)
                sock = server.sockets[0]
                self._ports[listener.name] = int(sock.getsockname()[1])
                for s in server.sockets:
                    with contextlib.suppress(OSError):
                        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except BaseException:
            await self.stop_accepting()
            raise

    @property
    def bound_ports(self) -> dict[str, int]:
        return dict(self._ports)

    @property
    def active_sessions(self) -> int:
        return len(self._sessions)

    async def stop_accepting(self) -> None:
        """Close the listeners; idle sessions get 421 now, busy ones after their transaction."""
        self.draining = True
        for server in self._servers:
            server.close()
        self._servers.clear()
        for session in list(self._sessions):
            if session.idle:
                self.metrics.rejected.labels(reason="shutting_down").inc()
                session.close_now(R.SHUTTING_DOWN)

    async def drain(self, deadline: float) -> None:
        """Wait (until ``deadline``, a ``time.monotonic()`` value) for open sessions to finish,
        then close the rest."""
        if not self.draining:
            await self.stop_accepting()
        remaining = deadline - time.monotonic()
        if self._sessions and remaining > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), remaining)
        if self._sessions:
            log.warning("closing %d sessions still open at the drain deadline",
                        len(self._sessions))
            for session in list(self._sessions):
                session.close_now(R.SHUTTING_DOWN)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._empty.wait(), 2.0)

    # ---------------------------------------------------------------- session bookkeeping

    def admission_refusal(self, session: RelaySMTP) -> tuple[str, str] | None:
        if self.draining:
            return "shutting_down", R.SHUTTING_DOWN
        limits = self.config().settings.limits
        if len(self._sessions) > limits.max_sessions:
            return "too_many_sessions", R.TOO_MANY_SESSIONS
        if (self._per_address.get(session.address_key, 0) > limits.max_sessions_per_address
                and not session._trusted()):
            return "too_many_sessions_per_address", R.TOO_MANY_FROM_ADDRESS
        return None

    def session_opened(self, session: RelaySMTP) -> None:
        self._sessions.add(session)
        session.address_key = key = client_key(session.peer_ip)
        self._per_address[key] = self._per_address.get(key, 0) + 1
        self._empty.clear()
        name = session.listener.name
        opened, active = self._session_metrics(name)
        opened.inc()
        active.inc()

    def session_closed(self, session: RelaySMTP) -> None:
        self._sessions.discard(session)
        key = session.address_key
        left = self._per_address.get(key, 0) - 1
        if left > 0:
            self._per_address[key] = left
        else:
            self._per_address.pop(key, None)
        self._session_metrics(session.listener.name)[1].dec()
        if not self._sessions:
            self._empty.set()

    def date_stamp(self) -> str:
        """The current date for Received: headers, formatted once per second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, email.utils.formatdate(now, usegmt=True))
        return self._date[1]

    def _session_metrics(self, listener: str) -> tuple[Any, Any]:
        pair = self._listener_metrics.get(listener)
        if pair is None:
            pair = self._listener_metrics[listener] = (
                self.metrics.sessions.labels(listener=listener),
                self.metrics.sessions_active.labels(listener=listener))
        return pair

    def received_counter(self, listener: str, sender_domain: str, credential: str) -> Any:
        """The labelled child, cached: labels() costs more than the increment. The key set is
        bounded by the configuration (listeners x domains x credentials)."""
        key = (listener, sender_domain, credential)
        child = self._received.get(key)
        if child is None:
            if len(self._received) > 100_000:
                self._received.clear()
            child = self._received[key] = self.metrics.messages_received.labels(
                listener=listener, sender_domain=sender_domain, credential=credential)
        return child

    def submit_orphan(self, task: asyncio.Future[QueuedMessage]) -> None:
        if task.cancelled() or task.exception() is not None:
            return
        msg = task.result()
        log.warning("message %s committed after its session ended; delivering it",
                    msg.queue_id)
        self.queue.submit(msg)
