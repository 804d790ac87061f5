"""One SMTP session: the connection, its timers, the command loop and the commands.

Built on aiosmtpd's ``SMTP`` protocol, with the parts that are not production-ready replaced:

- the command loop (``_handle_client``): strict CRLF and no control characters in commands,
  enhanced status codes, STARTTLS required before anything but EHLO/HELO/NOOP/RSET/QUIT
  (``trustedNetworks`` excepted), one write per reply burst (EHLO, pipelined commands),
  an internal error answers ``451 4.3.0`` with a correlation id (never the exception text), and
  sessions stop cleanly when the server drains;
- the session's limits: an idle deadline that only progress pushes back (not NOOP/RSET), a
  deadline to authenticate, a maximum lifetime, and a cap on refused commands;
- ``DATA``: read in large chunks up to the one true end-of-data ``<CRLF>.<CRLF>``, then handed
  to :mod:`.hygiene`; the sender checks are :mod:`.policy`'s and AUTH is :mod:`.auth`'s.

Every step reads the configuration through the server's ``config`` callable, so a hot reload
applies to the next command of every open session.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import SMTP, TLSSetupException

from ..config import Listener, RelayConfig
from ..events import LogEvent
from ..spool import QueuedMessage, SpoolError
from . import auth, hygiene, paths
from .policy import header_from_domain, limit_refusal
from .replies import IDENT, R, Refusal

if TYPE_CHECKING:
    from .server import SubmissionServer

log = logging.getLogger(__name__)

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

_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_C1_CONTROL = re.compile("[\x80-\x9f]")
# aiosmtpd's own STARTTLS reply, given an enhanced status code on its way out.
_LIBRARY_REPLIES = {b"220 Ready to start TLS": b"220 2.0.0 Ready to start TLS"}


def capped(text: str, limit: int = MAX_LOGGED_ADDRESS) -> str:
    """Peer-supplied text cut to a bounded length for logs and the message log."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Handler:
    """aiosmtpd's hook object. Every command the relay offers is its own, so there are no
    hooks."""

    def __init__(self) -> None:
        self.hooks: dict[str, Callable[..., Any]] = {}


class RelaySMTP(SMTP):
    """One SMTP session."""

    def __init__(self, server: SubmissionServer, listener: Listener) -> None:
        cfg = server.config().settings
        self.server = server
        self.listener = listener
        self._starttls = listener.tls == "starttls"
        self.secure = not self._starttls  # implicit TLS: encrypted from the first byte
        self.username: str | None = None
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
        # RFC 3461 parameters of the current transaction: of MAIL (envelope ``extra``
        # entries), and of each accepted RCPT in order (NOTIFY, ORCPT).
        self._dsn_mail: dict[str, str] = {}
        self._dsn_rcpts: list[tuple[tuple[str, ...] | None, str | None]] = []
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
        return self._idle and not self.in_transaction

    @property
    def in_transaction(self) -> bool:
        """MAIL was accepted (the null reverse-path "" included) and DATA not yet done."""
        return self.envelope is not None and self.envelope.mail_from is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        first = not self._registered
        super().connection_made(transport)
        if first:
            self._registered = True
            self.server.session_opened(self)

    def connection_lost(self, error: Exception | None) -> None:
        if self._limit_handle is not None:
            self._limit_handle.cancel()
            self._limit_handle = None
        try:
            super().connection_lost(error)
        finally:
            if self._registered:
                self._registered = False
                self.server.session_closed(self)

    async def push(self, status: str | bytes) -> None:
        """Send a reply. A plain 250 is held back while further pipelined commands are already
        buffered, so a pipelined MAIL/RCPT/DATA burst is answered in one write (a send costs
        about 0.1 ms here); any other reply flushes what is held. Every 4xx/5xx reply counts
        towards ``limits.maxRefusedCommands``."""
        # ASCII on the wire: an address or domain echoed in a reply is escaped, not sent raw
        # to a client that may not speak SMTPUTF8.
        data = status.encode("ascii", "backslashreplace") if isinstance(status, str) else status
        data = _LIBRARY_REPLIES.get(data, data)
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
        limits = self.server.config().settings.limits
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
        limits = self.server.config().settings.limits
        now = self.loop.time()
        if (not self._authenticated_or_trusted()
                and now >= self._started + limits.auth_deadline):
            # Nothing of value is in flight before AUTH: close at once.
            self.count_refusal("auth_deadline")
            self.close_now(R.AUTH_DEADLINE)
        elif now >= self._started + limits.max_session_lifetime:
            self._end_session("session_lifetime", R.LIFETIME)
        else:
            self._arm_session_limits()

    def _end_session(self, reason: str, reply: str) -> None:
        """Close now if waiting for a command; otherwise once the command in progress (a DATA
        transfer, say) has been answered, and at the latest one ``sessionTimeout`` later (a
        transfer trickled in byte by byte does not keep the session forever)."""
        if self._idle:
            self.count_refusal(reason)
            self.close_now(reply)
            return
        self._ending = (reason, reply)
        grace = self.server.config().settings.limits.session_timeout

        def overdue() -> None:
            self.count_refusal(reason)
            self.close_now(reply)

        self._limit_handle = self.loop.call_later(grace, overdue)

    def _authenticated_or_trusted(self) -> bool:
        return self.username is not None or self.trusted()

    def authenticated_as(self, username: str) -> None:
        assert self.session is not None
        self.username = username
        self.session.authenticated = True
        self.session.auth_data = username  # type: ignore[assignment]
        self._arm_session_limits()  # the deadline to authenticate no longer applies

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
        srv = self.server
        refusal = srv.admission_refusal(self)
        if refusal is not None:
            self.count_refusal(refusal.reason)
            await self.push(refusal.reply)
            self._close()
            return
        if not self._starttls:
            self._note_tls()
        self._started = self.loop.time()
        self._arm_session_limits()
        await self.push(R.GREETING.format(host=self.hostname))
        while self.transport is not None and not self._closing:
            try:
                if srv.draining and not self.in_transaction:
                    await self._leave_while_draining()
                    return
                if self._refused >= srv.config().settings.limits.max_refused_commands:
                    self.count_refusal("too_many_refused")
                    await self.push(R.TOO_MANY_REFUSED)
                    self._close()
                    return
                if self._ending is not None:
                    reason, reply = self._ending
                    self.count_refusal(reason)
                    await self.push(reply)
                    self._close()
                    return
                line = await self._read_command()
                if line is None:
                    continue
                command, arg = line
                method = _SMTP_METHODS.get(command)
                if method is None:
                    self.count_refusal("unknown_command")
                    await self.push(R.UNKNOWN)
                    continue
                if self._starttls and not self.secure and command not in ALLOWED_BEFORE_TLS and (
                    # A trusted network (off by default) relays without AUTH, so it may also
                    # skip STARTTLS (the benchmark's smtp-source cannot do TLS); AUTH never.
                    command == "AUTH" or not self.trusted()
                ):
                    self.count_refusal("tls_required")
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
                self.count_refusal("internal_error")
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
                self.count_refusal("shutting_down")
                await self.push(R.SHUTTING_DOWN)
        self._close()

    async def _read_command(self) -> tuple[str, str | None] | None:
        """The next command as (VERB, argument), or None when it was answered already."""
        self._idle = True
        try:
            raw = await self._reader.readuntil(b"\n")
        except asyncio.LimitOverrunError as exc:
            await self._skip_line(exc.consumed)
            self.count_refusal("line_too_long")
            await self.push(R.LINE_TOO_LONG)
            return None
        finally:
            self._idle = False
        if len(raw) > COMMAND_LINE_LIMIT:
            self.count_refusal("line_too_long")
            await self.push(R.LINE_TOO_LONG)
            return None
        if not raw.endswith(b"\r\n"):
            self.count_refusal("bad_syntax")
            await self.push(R.BARE_LF_COMMAND)
            return None
        body = raw[:-2]
        if _CONTROL.search(body):
            self.count_refusal("bad_syntax")
            await self.push(R.CONTROL_CHARS)
            return None
        verb, _, rest = body.partition(b" ")
        try:
            command = verb.decode("ascii").upper()
            arg = rest.strip().decode("utf-8") or None
        except UnicodeDecodeError:
            self.count_refusal("bad_syntax")
            await self.push(R.NOT_UTF8)
            return None
        if arg is not None and not arg.isascii():
            # UTF-8 only in addresses (RFC 6531); the path parser decides whether SMTPUTF8
            # covers it. C1 controls are control characters too.
            if command not in ("MAIL", "RCPT"):
                self.count_refusal("bad_syntax")
                await self.push(R.NON_ASCII)
                return None
            if _C1_CONTROL.search(arg):
                self.count_refusal("bad_syntax")
                await self.push(R.CONTROL_CHARS)
                return None
        if not command:
            self.count_refusal("bad_syntax")
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

    # ---------------------------------------------------------------- EHLO, STARTTLS, AUTH, QUIT

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

    async def smtp_HELO(self, hostname: str | None) -> None:
        if not hostname:
            await self.push(R.HELO_SYNTAX)
            return
        assert self.session is not None
        self.envelope = self._create_envelope()
        self.session.extended_smtp = False
        self.session.host_name = hostname
        await self.push(f"250 {self.hostname}")

    async def check_helo_needed(self, helo: str = "EHLO") -> bool:
        assert self.session is not None
        if not self.session.host_name:
            await self.push(R.EHLO_FIRST)
            return True
        return False

    async def smtp_NOOP(self, arg: str | None) -> None:
        await self.push(R.OK)

    async def smtp_RSET(self, arg: str | None) -> None:
        if arg:
            await self.push(R.RSET_SYNTAX)
            return
        self.envelope = self._create_envelope()
        await self.push(R.OK)

    async def smtp_HELP(self, arg: str | None) -> None:
        await self.push(R.HELP)

    async def smtp_VRFY(self, arg: str | None) -> None:
        await self.push(R.VRFY)

    async def smtp_EXPN(self, arg: str | None) -> None:
        await self.push(R.EXPN)

    def ehlo_responses(self) -> list[str]:
        limits = self.server.config().settings.limits
        lines = [self.hostname, f"SIZE {limits.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "PIPELINING", "ENHANCEDSTATUSCODES", "DSN"]
        if self._starttls and not self.secure:
            lines.append("STARTTLS")
        if self.secure:
            lines.append("AUTH " + " ".join(auth.MECHANISMS))
        return [f"250-{x}" for x in lines[:-1]] + [f"250 {lines[-1]}"]

    async def smtp_STARTTLS(self, arg: str | None) -> None:
        if arg:
            await self.push(R.STARTTLS_SYNTAX)
            return
        if self.secure:
            await self.push(R.ALREADY_TLS)
            return
        await super().smtp_STARTTLS(arg)
        # aiosmtpd discarded any plaintext pipelined behind STARTTLS when the handshake
        # completed, and started a fresh session: the client must EHLO again.
        self.secure = True
        self.username = None
        self._note_tls()

    def _note_tls(self) -> None:
        ssl_object = self.transport.get_extra_info("ssl_object") if self.transport else None
        version = ssl_object.version() if ssl_object is not None else None
        self.tls_version = version
        self.server.metrics.tls_sessions.labels(
            listener=self.listener.name, version=version or "unknown").inc()

    async def smtp_AUTH(self, arg: str | None) -> None:
        await auth.smtp_auth(self, arg)

    # ---------------------------------------------------------------- MAIL, RCPT

    def trusted(self) -> bool:
        """Is the peer in trustedNetworks? Cached per configuration object (hot reload swaps
        the object, which invalidates the cache)."""
        cfg = self.server.config()
        if self._trust_cache is None or self._trust_cache[0] is not cfg:
            self._trust_cache = (cfg, cfg.is_trusted(self.peer_ip))
        return self._trust_cache[1]

    async def smtp_MAIL(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if self.in_transaction:
            await self.push(R.NESTED_MAIL)
            return
        await self.push(self._mail(arg))

    def _mail(self, arg: str | None) -> str:
        cfg = self.server.config()
        limits = cfg.settings.limits
        assert self.envelope is not None
        assert self.session is not None
        mail = paths.parse_mail(arg, self.session.extended_smtp)
        if isinstance(mail, Refusal):
            return self._refuse(mail, None)
        address = mail.address
        if mail.size is not None and mail.size > limits.max_message_size:
            return self._refuse(hygiene.too_big(limits), address)
        # The null reverse-path (RFC 5321 §4.5.5) passes the credential's checks; its header
        # From: is checked at the end of DATA like any other.
        verdict = self.server.policy.mail_from(cfg, self.username, self.trusted(), address)
        if isinstance(verdict, Refusal):
            return self._refuse(verdict, address)
        self._sender_domain = verdict
        self.envelope.mail_from = address
        self.envelope.mail_options.extend(mail.options)
        self.envelope.smtp_utf8 = mail.smtputf8
        # RFC 3461: what the sender asked of delivery status notifications, for this
        # transaction (a new MAIL starts a new one, so the lists start empty).
        self._dsn_mail = {k: v for k, v in (("dsn_ret", mail.ret), ("envid", mail.envid))
                          if v is not None}
        self._dsn_rcpts = []
        return R.MAIL_OK

    async def smtp_RCPT(self, arg: str | None) -> None:
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.in_transaction:
            await self.push(R.NEED_MAIL)
            return
        reply = self._rcpt(arg)
        await self.push(reply)
        if reply.startswith(("550 5.1.1", "452 4.5.3")):
            # A suppressed recipient or one past maxRecipients says nothing about the client's
            # behaviour (a list with 30 suppressed addresses is normal): not a refused command.
            self._refused -= 1

    def _rcpt(self, arg: str | None) -> str:
        srv = self.server
        assert self.envelope is not None
        sender = self.envelope.mail_from
        limit = srv.config().settings.limits.max_recipients
        if len(self.envelope.rcpt_tos) >= limit:
            return self._refuse(Refusal("too_many_recipients",
                                        R.TOO_MANY_RCPTS.format(limit=limit)), sender)
        assert self.session is not None
        rcpt = paths.parse_rcpt(arg, self.envelope.smtp_utf8, self.session.extended_smtp)
        if isinstance(rcpt, Refusal):
            return self._refuse(rcpt, sender)
        address = rcpt.address
        credential = (srv.config().credentials.get(self.username)
                      if self.username is not None else None)
        # Pool-wide entries, and those the sending credential's own team added.
        suppressed = srv.suppression.is_suppressed(
            address, credential.namespace if credential is not None else None)
        if suppressed is not None:
            reply = R.SUPPRESSED.format(address=address, reason=suppressed[0])
            return self._refuse(Refusal("suppressed", reply), sender, address)
        self.envelope.rcpt_tos.append(address)
        self.envelope.rcpt_options.extend(rcpt.options)
        self._dsn_rcpts.append((rcpt.notify, rcpt.orcpt))
        return R.RCPT_OK

    def count_refusal(self, reason: str) -> None:
        self.server.metrics.rejected.labels(reason=reason).inc()

    def _refuse(self, refusal: Refusal, sender: str | None,
                recipient: str | None = None, size: int | None = None) -> str:
        """Count a refused transaction step, and record it in the message log when the client
        authenticated (or is trusted): an anonymous client's refusals are counted in metrics
        only, so it cannot fill the log. Returns the reply to send."""
        self.count_refusal(refusal.reason)
        if self._authenticated_or_trusted():
            self.server.log.record(LogEvent(
                ts=time.time(), status="rejected", queue_id=None, message_id=None,
                credential=self.username, sender=capped(sender or ""),
                recipient=None if recipient is None else capped(recipient),
                response=capped(refusal.reply, 512), size=size))
        return refusal.reply

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
        limits = self.server.config().settings.limits
        raw, overflow = await self._read_data(limits.max_message_size)
        try:
            reply = await self._accept(raw, overflow)
        finally:
            self.envelope = self._create_envelope()
        await self.push(reply)
        if reply.startswith("250"):
            self._refused = 0  # a client that delivers mail is not the one the cap is for

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
        srv = self.server
        cfg = srv.config()
        limits = cfg.settings.limits
        env = self.envelope
        assert env is not None
        sender = env.mail_from or ""
        if overflow:
            return self._refuse(hygiene.too_big(limits), sender)
        content = hygiene.normalise(raw, limits)
        if isinstance(content, Refusal):
            return self._refuse(content, sender)
        # The sender policy first: a foreign header From: is refused as such, even when a
        # second From: would also be a hygiene fault.
        refusal = srv.policy.message(cfg, self.username, content.from_values)
        if refusal is None:
            refusal = hygiene.check_header(content, smtputf8=env.smtp_utf8)
        if refusal is not None:
            return self._refuse(refusal, sender)
        if not sender:
            # Null reverse-path: the message is labelled (and DKIM-signed) by its From: domain.
            self._sender_domain = header_from_domain(cfg, content.from_values)
        content = hygiene.complete_header(content, hostname=self.hostname,
                                          date=srv.date_stamp())
        data = self._received_header() + content.data
        message_id = content.message_id
        # What delivery must honour toward the next hop (RFC 6531, RFC 6152).
        extra: dict[str, Any] = {}
        if env.smtp_utf8:
            extra["smtputf8"] = True
        if "BODY=8BITMIME" in env.mail_options:
            extra["body"] = "8BITMIME"
        if content.eight_bit:
            extra["eight_bit"] = True
        extra.update(self._dsn_mail)
        # Take the message from the credential's limits (pool-wide with a shared store) before
        # committing; give it back if the commit fails.
        credential = cfg.credentials.get(self.username) if self.username is not None else None
        if credential is not None:
            over = await srv.limiter.reserve_message(credential)
            if over is not None:
                return self._refuse(limit_refusal(over, credential.username), sender)
        try:
            msg = await _commit_shielded(
                srv, mail_from=sender, recipients=list(env.rcpt_tos), data=data,
                message_id=message_id, credential=self.username,
                sender_domain=self._sender_domain, listener=self.listener.name, extra=extra,
                dsn=list(self._dsn_rcpts))
        except SpoolError as exc:
            log.error("spool commit failed: %s", exc)
            if credential is not None:
                srv.limiter.release_message(credential)
            return self._refuse(Refusal("spool_error", R.SPOOL), sender, size=len(data))
        reply = R.QUEUED.format(queue_id=msg.queue_id)
        now = time.time()
        for rcpt in msg.recipients:
            srv.log.record(LogEvent(
                ts=now, status="received", queue_id=msg.queue_id, message_id=message_id,
                credential=self.username, sender=capped(sender),
                recipient=capped(rcpt.address), response=reply, size=msg.size))
        srv.received_counter(self.listener.name, self._sender_domain,
                             self.username or "none").inc()
        return reply

    def _received_header(self) -> bytes:
        assert self.session is not None
        assert self.envelope is not None
        proto = (("UTF8SMTP" if self.envelope.smtp_utf8 else "ESMTP")
                 + ("S" if self.secure else "") + ("A" if self.username else ""))
        return hygiene.received_header(
            helo=self.session.host_name or "",
            peer_ip=self.peer_ip if self.server.config().settings.trace_client_address else None,
            hostname=self.hostname,
            protocol=proto, stamp=self.server.date_stamp())


_SMTP_COMMANDS = tuple(
    name[5:] for name in dir(RelaySMTP) if name.startswith("smtp_") and name[5:].isupper())
_SMTP_METHODS: dict[str, Callable[[RelaySMTP, str | None], Awaitable[None]]] = {
    name: getattr(RelaySMTP, "smtp_" + name) for name in _SMTP_COMMANDS}


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
    srv.queue.submit(msg, kwargs["data"])
    return msg
