"""One SMTP session to one host: opening it (TCP, greeting, EHLO, STARTTLS, AUTH) and running
transactions on it, with the timeouts of RFC 5321 section 4.5.3.2.

A transaction reports what each recipient got (``outcomes``), which undecided recipients may
move on to the next MX host, whether the server is throttling the relay, and whether the
connection may carry another message. It never decides retries or suppression: that is
:mod:`.policy`'s job.

Once the end of the data (the final dot) is sent, the transaction waits for the reply for
``dataDoneTimeout`` whatever else happens; if it is cancelled (the relay stops), the connection
is aborted (a TCP reset, no QUIT), so that a server cannot complete a transaction the relay no
longer tracks without the relay knowing.
"""

from __future__ import annotations

import asyncio
import collections
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiosmtplib
from aiosmtplib.protocol import SMTPProtocol

from ..config import DeliverySettings
from ..dsn import xtext_encode
from ..mx import ascii_domain
from ..spool import Recipient
from .downgrade import needs_smtputf8
from .policy import (
    RecipientOutcome,
    Stage,
    format_reply,
    moves_to_next_mx,
    reply_outcome,
    throttling,
)

QUIT_TIMEOUT = 2.0

TLSMode = Literal["starttls", "implicit", "none", "opportunistic", "encrypt", "verify"]
"""smarthost: starttls | implicit | none; MX hosts (delivery.mxTls levels): none,
opportunistic (may), encrypt, verify — the last two never fall back to clear text."""
_STARTTLS_MODES = ("starttls", "opportunistic", "encrypt", "verify")


@dataclass(frozen=True, slots=True)
class Timeouts:
    """RFC 5321 4.5.3.2 names the minimum a client should wait at each step."""

    connect: float  # TCP connect
    greeting: float  # the 220 banner (and an implicit TLS handshake)
    command: float  # EHLO, STARTTLS, AUTH, RSET
    mail: float  # reply to MAIL
    rcpt: float  # reply to each RCPT
    data: float  # reply to DATA (354)
    data_block: float  # the body write making no progress
    data_done: float  # reply to the final dot

    @classmethod
    def of(cls, d: DeliverySettings) -> Timeouts:
        return cls(d.connect_timeout, d.greeting_timeout, d.command_timeout, d.mail_timeout,
                   d.rcpt_timeout, d.data_timeout, d.data_block_timeout, d.data_done_timeout)


@dataclass(frozen=True, slots=True)
class Target:
    host: str  # name for SNI, certificate checks and logs
    address: str  # what to connect to (an IP from our resolver, or the smarthost name)
    port: int
    tls: TLSMode
    auth: tuple[str, str] | None = None  # (username, password file)
    # MTA-STS (RFC 8461) of the recipient domain: "enforce" (tls is then "verify", against
    # delivery.mtaSts.caFile), "testing" (tls as the level says; verification only reported),
    # or None (no policy). ``policy_domain`` is the domain whose policy applies.
    sts: Literal["enforce", "testing"] | None = None
    sts_mx_ok: bool = True  # testing: whether the policy names this host
    # MX targets: the recipient domain (TLS results are counted); None for the smarthost.
    policy_domain: str | None = None

    @property
    def remote(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(slots=True)
class Connection:
    client: aiosmtplib.SMTP
    remote: str
    tls: bool
    messages: int = 0
    idle_since: float = 0.0

    @property
    def usable(self) -> bool:
        return self.client.is_connected

    def abort(self) -> None:
        """Drop the connection at once: nothing still buffered is sent, the server sees a
        reset and discards an unfinished transaction."""
        transport = self.client.transport
        if isinstance(transport, asyncio.Transport):
            transport.abort()
        self.client.close()


class ConnectFailed(Exception):
    """No session: ``reply`` is what the log and a DSN say; ``code`` the server's reply code
    (None when there was no reply: refused, timeout, reset); ``stage`` where it failed."""

    def __init__(self, reply: str, *, code: int | None = None, stage: Stage = "connect",
                 text: str = "", tls_result: str | None = None) -> None:
        super().__init__(reply)
        self.reply = reply
        self.code = code
        self.stage = stage
        self.throttled = code is not None and throttling(code, text, stage)
        # The RFC 8460 result type of a failed TLS negotiation (None: not about TLS).
        self.tls_result = tls_result


class TLSFailed(ConnectFailed):
    """STARTTLS failed; opportunistic TLS retries in clear text, required TLS defers."""


class ReusedConnectionLost(Exception):
    """A pooled connection failed before the server accepted anything of the transaction
    (closed, reset, broken pipe, or 421 at MAIL): most often the upstream dropped it while it
    sat idle, so the attempt goes on at once on a fresh connection instead of deferring.
    Timeouts are not included: a silent server may be slow rather than gone."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def describe(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"[:200] if text else type(exc).__name__


# ------------------------------------------------------------------------------ opening


async def _tcp_connect(address: str, port: int, limit: float) -> socket.socket:
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(limit):
        infos = await loop.getaddrinfo(address, port, type=socket.SOCK_STREAM)
        error: OSError = OSError(f"no address for {address}")
        for family, kind, proto, _name, sockaddr in infos:
            sock = socket.socket(family, kind, proto)
            try:
                sock.setblocking(False)
                await loop.sock_connect(sock, sockaddr)
            except OSError as exc:
                sock.close()
                error = exc
                continue
            except BaseException:
                sock.close()
                raise
            return sock
        raise error


async def open_connection(target: Target, ctx: ssl.SSLContext, helo: str, t: Timeouts, *,
                          use_starttls: bool) -> Connection:
    """TCP connect (``connect`` timeout), greeting (``greeting``), EHLO and STARTTLS
    (``command``). Raises :class:`ConnectFailed` with the reason."""
    implicit = target.tls == "implicit"
    try:
        sock = await _tcp_connect(target.address, target.port, t.connect)
    except TimeoutError:
        raise ConnectFailed(f"451 4.4.1 Connection to {target.remote} failed: timed out "
                            f"after {t.connect:g}s") from None
    except OSError as exc:
        raise ConnectFailed(f"451 4.4.1 Connection to {target.remote} failed: "
                            f"{describe(exc)}") from None
    client = aiosmtplib.SMTP(
        hostname=target.host, local_hostname=helo, timeout=t.command, use_tls=implicit,
        start_tls=False, tls_context=ctx if implicit else None, sock=sock,
    )
    stage: Stage = "greeting"
    try:
        await client.connect(timeout=t.greeting)
        stage = "ehlo"
        await client.ehlo()
        if use_starttls and target.tls in _STARTTLS_MODES:
            if client.supports_extension("starttls"):
                await _starttls(client, target, ctx)
            elif target.tls != "opportunistic":
                why = ("delivery.smarthost.tls is starttls" if target.tls == "starttls"
                       else f"the MTA-STS policy of {target.policy_domain} is enforce"
                       if target.sts == "enforce"
                       else f"the TLS policy for this destination is {target.tls}")
                raise ConnectFailed(f"451 4.7.4 {target.remote} does not offer STARTTLS "
                                    f"({why}); not sent in clear text", stage="ehlo",
                                    tls_result="starttls-not-supported")
    except aiosmtplib.SMTPResponseException as exc:
        client.close()
        sock.close()
        raise ConnectFailed(
            f"451 4.4.1 {target.remote} refused the session: "
            f"{format_reply(exc.code, exc.message)}", code=exc.code, stage=stage,
            text=exc.message) from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        client.close()
        sock.close()
        raise ConnectFailed(
            f"451 4.4.1 Connection to {target.remote} failed: {describe(exc)}",
            stage=stage) from None
    except BaseException:
        client.close()
        sock.close()
        raise
    tls = client.get_transport_info("sslcontext") is not None
    return Connection(client, target.remote, tls)


async def _starttls(client: aiosmtplib.SMTP, target: Target, ctx: ssl.SSLContext) -> None:
    try:
        await client.starttls(server_hostname=target.host, tls_context=ctx)
        # With TLS 1.3 a server that rejects the handshake (e.g. it wants a client
        # certificate) only says so at the first read: the EHLO belongs to the TLS step.
        await client.ehlo()
    except (aiosmtplib.SMTPException, OSError) as exc:
        client.close()
        reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else None
        raise TLSFailed(f"451 4.7.5 TLS with {target.remote} failed: "
                        f"{reason or describe(exc)}", stage="ehlo",
                        tls_result=tls_result_type(exc)) from None


# OpenSSL's X509_V_ERR codes and the RFC 8460 result types they stand for.
_VERIFY_RESULTS = {
    62: "certificate-host-mismatch",  # X509_V_ERR_HOSTNAME_MISMATCH
    10: "certificate-expired",  # X509_V_ERR_CERT_HAS_EXPIRED
    18: "certificate-not-trusted",  # self-signed leaf
    19: "certificate-not-trusted",  # self-signed certificate in the chain
    20: "certificate-not-trusted",  # unable to get the local issuer certificate
    21: "certificate-not-trusted",  # unable to verify the leaf signature
}


def tls_result_type(exc: BaseException) -> str:
    """The RFC 8460 failure type of a failed TLS handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return _VERIFY_RESULTS.get(exc.verify_code, "validation-failure")
    return "validation-failure"


def _read_secret(path: str) -> str:
    return Path(path).read_text().rstrip("\r\n")


async def login(conn: Connection, target: Target) -> None:
    assert target.auth is not None
    username, password_file = target.auth
    try:
        # Read at every connection, so that a rotated password applies without a reload.
        password = await asyncio.to_thread(_read_secret, password_file)
    except OSError as exc:
        conn.client.close()
        raise ConnectFailed(f"451 4.7.0 Cannot read delivery.smarthost.passwordFile: "
                            f"{exc.strerror}", stage="ehlo") from None
    try:
        await conn.client.login(username, password)
    except aiosmtplib.SMTPResponseException as exc:
        conn.client.close()
        # Our own credentials were refused: the mail is fine, the relay's setup is not, so
        # defer (an operator can fix it within the queue lifetime) rather than bounce.
        raise ConnectFailed(f"451 4.7.0 {target.remote} refused the relay's AUTH: "
                            f"{format_reply(exc.code, exc.message)}", stage="ehlo") from None
    except (aiosmtplib.SMTPException, OSError) as exc:
        conn.client.close()
        raise ConnectFailed(f"451 4.7.0 AUTH with {target.remote} failed: "
                            f"{describe(exc)}", stage="ehlo") from None


async def quit_connection(client: aiosmtplib.SMTP) -> None:
    try:
        await client.quit(timeout=QUIT_TIMEOUT)
    except asyncio.CancelledError:
        client.close()
        raise
    except (aiosmtplib.SMTPException, OSError):
        pass
    finally:
        client.close()


# ------------------------------------------------------------------------------ transactions

_UNSAFE_IN_COMMAND = re.compile(rb"[\x00-\x1f\x7f]")
_BARE_LINE_END = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_LINE_START_DOT = re.compile(rb"(?m)^\.")


def wire_data(data: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dot-stuffed, then the end-of-data line.
    Spooled mail is CRLF-clean already (the ingress refuses bare CR/LF), so the scans usually
    find nothing to change."""
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:  # counting beats a regex scan
        data = _BARE_LINE_END.sub(b"\r\n", data)
    if not data.endswith(b"\r\n"):
        data += b"\r\n"
    if data.startswith(b".") or b"\n." in data:
        data = _LINE_START_DOT.sub(b"..", data)
    return data + b".\r\n"


class _Replies:
    """Collects the replies of the commands of a transaction for aiosmtplib's protocol (5.1.3,
    pinned), one at a time or a pipelined group (RFC 2920).

    The protocol keeps one response future, parses one reply per arrival and drops whatever
    arrives while that future is done and its reader has not yet resumed: fine for one command
    at a time, lossy for a pipelined group, whose replies may arrive in separate segments in
    that gap. This object stands in for the future while a transaction is in flight (the
    protocol calls only ``done``, ``set_result``, ``set_exception`` and ``exception`` on it): it
    is never done before an error, so no arrival is dropped, and it queues every reply.

    The reply timeouts share one timer per transaction: each wait sets a deadline, and the
    timer, when it fires before the deadline in force, is set again for it (an
    ``asyncio.timeout`` per reply cost about 6 us each, four per message). ``close`` stops it.
    """

    def __init__(self, proto: SMTPProtocol, loop: asyncio.AbstractEventLoop) -> None:
        self._proto = proto
        self._loop = loop
        self._replies: collections.deque[aiosmtplib.SMTPResponse] = collections.deque()
        self._error: BaseException | None = None
        self._wake: asyncio.Future[None] | None = None
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._expired = False

    def done(self) -> bool:
        return self._error is not None

    def set_result(self, response: aiosmtplib.SMTPResponse) -> None:
        self._replies.append(response)
        try:
            while (more := self._proto._read_response_from_buffer()) is not None:
                self._replies.append(more)
        except Exception as exc:  # a malformed reply: the session is unusable
            self.set_exception(exc)
            return
        self._notify()

    def set_exception(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        self._notify()

    def exception(self) -> BaseException | None:
        return self._error

    def _notify(self) -> None:
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)

    def write(self, data: bytes) -> None:
        self._proto.write(data)

    async def next(self, limit: float) -> aiosmtplib.SMTPResponse:
        while not self._replies:
            if self._error is not None:
                raise self._error
            if self._expired:
                raise aiosmtplib.SMTPReadTimeoutError(f"no reply within {limit:g}s")
            self._deadline = self._loop.time() + limit
            timer = self._timer
            if timer is None or timer.when() > self._deadline:
                if timer is not None:
                    timer.cancel()
                self._timer = self._loop.call_at(self._deadline, self._expire)
            self._wake = self._loop.create_future()
            await self._wake
        return self._replies.popleft()

    def _expire(self) -> None:
        self._timer = None
        if self._loop.time() < self._deadline:
            self._timer = self._loop.call_at(self._deadline, self._expire)
            return
        self._expired = True
        self._notify()

    def close(self) -> None:
        """Stop the reply timer (the transaction is over)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def drain(self, stall: float) -> None:
        """Wait until the kernel took the buffered body; fail only when ``stall`` seconds pass
        without any progress (the 3-minute data block timeout of RFC 5321)."""
        proto = self._proto
        if not proto._paused:
            await proto._drain_helper()  # raises when the connection is lost; no wait
            return
        last = _buffered(proto)
        while True:
            try:
                async with asyncio.timeout(stall):
                    await proto._drain_helper()
                return
            except TimeoutError:
                size = _buffered(proto)
                if proto.transport is None or size >= last:
                    raise aiosmtplib.SMTPTimeoutError(
                        f"writing the message stalled for {stall:g}s") from None
                last = size


def _buffered(proto: SMTPProtocol) -> int:
    transport = proto.transport
    return transport.get_write_buffer_size() if isinstance(transport, asyncio.Transport) else 0


@dataclass(slots=True)
class TransactionResult:
    reusable: bool  # the connection may carry another message
    # Undecided recipients that may try the next MX host, and what to say if none is left.
    moved: list[Recipient] = field(default_factory=list)
    moved_reply: str = ""
    throttled: bool = False  # the server refuses or rate-limits the relay as a whole
    ended: bool = False  # the final dot was answered (the server may have taken the message)


def _dsn_options(extra: dict[str, Any]) -> list[str]:
    """RFC 3461 MAIL parameters to pass on to a server that offers DSN."""
    options = []
    if isinstance(extra.get("dsn_ret"), str):
        options.append(f"RET={extra['dsn_ret']}")
    if isinstance(extra.get("envid"), str):
        options.append(f"ENVID={xtext_encode(extra['envid'])}")
    return options


def _rcpt_dsn_options(r: Recipient) -> bytes:
    out = b""
    if r.notify:
        out += b" NOTIFY=" + ",".join(r.notify).encode("ascii")
    if r.orcpt:
        addr_type, _, address = r.orcpt.partition(";")
        out += b" ORCPT=" + f"{addr_type};{xtext_encode(address)}".encode("ascii")
    return out


def _options(conn: Connection, data: bytes, mail_from: str, recipients: list[Recipient]
             ) -> tuple[list[str], str] | str:
    """The MAIL options and the command encoding, or the bounce reply when the message needs
    SMTPUTF8 and the server does not offer it (RFC 6531 §3.4, codes of RFC 6533)."""
    client = conn.client
    options: list[str] = []
    encoding = "ascii"
    if client.supports_extension("size"):
        # Lets a server refuse an oversized message at MAIL, before the data is sent.
        options.append(f"SIZE={len(data)}")
    if not data.isascii() and client.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")
    # An address whose only non-ASCII part is its domain goes with the domain in A-labels and
    # needs no SMTPUTF8 (RFC 6531 section 3.2): only a UTF-8 local part or header does.
    ascii_addresses = _seven_bit_address(mail_from).isascii() and all(
        _seven_bit_address(r.address).isascii() for r in recipients)
    if not ascii_addresses or needs_smtputf8(data):
        if not client.supports_extension("smtputf8"):
            if not ascii_addresses:
                return ("553 5.6.7 Destination does not support internationalised addresses "
                        "(SMTPUTF8)")
            return ("554 5.6.9 UTF-8 header message cannot be transferred: the destination "
                    "does not support SMTPUTF8")
        options.append("SMTPUTF8")
        encoding = "utf-8" if not ascii_addresses else "ascii"
    elif not data.isascii() and not client.supports_extension("8bitmime"):
        # RFC 6152 §3: never 8-bit data to a server without 8BITMIME; the queue hands over a
        # quoted-printable copy when the message can be converted (downgrade.py).
        return ("554 5.6.3 Conversion required but not supported: the destination does not "
                "support 8BITMIME and the message cannot be converted to 7 bits")
    return options, encoding


def _seven_bit_address(address: str) -> str:
    """``local@domain`` with an ASCII local part and the domain in A-labels (IDNA 2008, as DNS
    knows it); any other address unchanged."""
    local, at, domain = address.rpartition("@")
    if not at or domain.isascii() or not local.isascii():
        return address
    name = ascii_domain(domain)
    return f"{local}@{name}" if name is not None else address


# Outside a quoted local part these would end the path early or start a parameter.
_PATH_BREAKERS = re.compile(r'[\s<>"]')
_QUOTED_LOCAL_PART = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"')


def smtp_path(address: str) -> str:
    """``<address>`` for MAIL FROM or RCPT TO; ValueError for an address that could end the
    path early or add a parameter (whitespace, angle brackets, a quote outside a quoted local
    part). Spooled addresses were parsed as RFC 5321 paths when they were received, so they go
    out as they are: aiosmtplib's ``quote_address`` parses each with ``email.utils.parseaddr``
    first, which cost about 15 us per address, the most expensive step of a transaction."""
    if _PATH_BREAKERS.search(_QUOTED_LOCAL_PART.sub("", address, count=1)):
        raise ValueError("address cannot stand in an SMTP path")
    return f"<{address}>"


def _commands(mail_from: str, recipients: list[Recipient], options: list[str], encoding: str,
              dsn: bool = False) -> tuple[bytes, list[bytes]] | None:
    wire = _seven_bit_address if encoding == "ascii" else str
    try:
        mail = b"MAIL FROM:" + smtp_path(wire(mail_from)).encode(encoding)
        rcpts = [b"RCPT TO:" + smtp_path(wire(r.address)).encode(encoding)
                 + (_rcpt_dsn_options(r) if dsn else b"") for r in recipients]
    except (UnicodeError, ValueError):
        return None
    mail += b"".join(b" " + o.encode("ascii") for o in options)
    if any(_UNSAFE_IN_COMMAND.search(c) for c in (mail, *rcpts)):
        return None
    return mail, rcpts


async def transaction(conn: Connection, mail_from: str, recipients: list[Recipient],
                      data: bytes, *, outcomes: dict[str, RecipientOutcome], t: Timeouts,
                      reused: bool, deadline: float | None = None,
                      on_accepted: Callable[[], None] | None = None,
                      extra: dict[str, Any] | None = None,
                      live: Callable[[Recipient], bool] | None = None) -> TransactionResult:
    """One MAIL/RCPT/DATA transaction. Fills ``outcomes`` for the recipients it decided.
    ``deadline`` (a ``time.monotonic()`` value): when it has passed before the body is sent,
    the transaction is abandoned cleanly (the connection is dropped before the final dot, so
    the server discards it) and its recipients are deferred; once the body is on its way the
    transaction runs to its reply or its own timeout. ``on_accepted`` is called when the
    server took recipients and asked for the data (it is taking mail, however slowly).
    ``extra``: the envelope's extra; its RFC 3461 RET and ENVID, and the recipients' NOTIFY
    and ORCPT, go to a server that offers DSN (which then owns the notices: a recipient it
    accepts is marked ``dsn_passed``). None: no DSN parameter is passed on.
    ``live``: whether a recipient is still in the envelope (an erasure may remove it while
    the transaction waits for a reply): a recipient no longer live gets no RCPT command, and
    when one the server accepted is gone before the body, the connection is dropped (the
    server discards the transaction) and the others are deferred. Once the body is on its
    way the transaction runs to its end."""
    client, remote, tls = conn.client, conn.remote, conn.tls

    def all_get(outcome: RecipientOutcome) -> None:
        for r in recipients:
            outcomes[r.address] = outcome

    prepared = _options(conn, data, mail_from, recipients)
    if isinstance(prepared, str):
        all_get(RecipientOutcome("bounced", prepared, remote, tls=tls))
        return TransactionResult(reusable=True)
    options, encoding = prepared
    dsn = extra is not None and client.supports_extension("dsn")
    if dsn:
        options += _dsn_options(extra or {})
    commands = _commands(mail_from, recipients, options, encoding, dsn)
    if commands is None:
        all_get(RecipientOutcome("bounced", "553 5.1.3 Address cannot be sent on an SMTP "
                                 "command line", remote, tls=tls))
        return TransactionResult(reusable=True)
    mail_cmd, rcpt_cmds = commands
    pipelining = client.supports_extension("pipelining")
    proto = client.protocol
    lock = proto._command_lock if proto is not None else None
    loop = asyncio.get_running_loop()
    stage: Stage = "mail"
    got_reply = False
    dot_sent = False
    result = TransactionResult(reusable=True)
    try:
        if proto is None or lock is None:
            raise aiosmtplib.SMTPServerDisconnected("Server not connected")
        replies = _Replies(proto, loop)
        async with lock:
            proto._response_waiter = replies  # type: ignore[assignment]
            proto._response_pending = True
            try:
                if pipelining:
                    replies.write(b"\r\n".join([mail_cmd, *rcpt_cmds, b"DATA"]) + b"\r\n")
                else:
                    replies.write(mail_cmd + b"\r\n")
                mail = await replies.next(t.mail)
                if mail.code == 421:
                    # The server took nothing and is closing the session (overload, shutdown,
                    # its own idle limit): the rest of a pipelined group is moot.
                    if reused:
                        raise ReusedConnectionLost(format_reply(mail.code, mail.message))
                    conn.abort()
                    return TransactionResult(
                        reusable=False, moved=list(recipients),
                        moved_reply=format_reply(mail.code, mail.message), throttled=True)
                got_reply = True
                rcpt_replies: list[aiosmtplib.SMTPResponse] = []
                sent = list(recipients)  # the recipients named in an RCPT command
                go: aiosmtplib.SMTPResponse | None = None
                if pipelining:
                    stage = "rcpt"
                    rcpt_replies = [await replies.next(t.rcpt) for _ in rcpt_cmds]
                    stage = "data"
                    go = await replies.next(t.data)
                elif mail.code == 250:
                    stage = "rcpt"
                    sent = []
                    for rcpt, cmd in zip(recipients, rcpt_cmds, strict=True):
                        if live is not None and not live(rcpt):
                            continue  # erased while the transaction waited: never named
                        if deadline is not None and time.monotonic() >= deadline:
                            # Out of time before the data: drop the connection, so that
                            # the server discards the transaction; nobody got the message.
                            conn.abort()
                            for r in recipients:
                                outcomes[r.address] = RecipientOutcome(
                                    "deferred", "451 4.4.7 Delivery attempt timed out "
                                    "(messageDeadline)", remote, tls=tls)
                            return TransactionResult(reusable=False)
                        replies.write(cmd + b"\r\n")
                        sent.append(rcpt)
                        rcpt_replies.append(await replies.next(t.rcpt))
                    if any(r.code in (250, 251) for r in rcpt_replies):
                        stage = "data"
                        replies.write(b"DATA\r\n")
                        go = await replies.next(t.data)
                accepted: list[Recipient] = []
                if mail.code != 250:
                    if moves_to_next_mx(mail.code, "mail"):
                        result.moved = list(recipients)
                        result.moved_reply = format_reply(mail.code, mail.message)
                    else:
                        all_get(reply_outcome(mail.code, mail.message, "mail", remote, tls))
                    result.throttled = throttling(mail.code, mail.message, "mail")
                else:
                    for r, reply in zip(sent, rcpt_replies, strict=True):
                        if reply.code in (250, 251):
                            accepted.append(r)
                        else:
                            outcomes[r.address] = reply_outcome(reply.code, reply.message,
                                                                "rcpt", remote, tls)
                final: aiosmtplib.SMTPResponse | None = None
                if go is not None and go.code == 354:
                    if live is not None and not all(live(r) for r in accepted):
                        # An accepted recipient was erased before the body: drop the
                        # connection so the server discards the transaction; the others wait
                        # for their next attempt (nothing is recorded for the erased one).
                        conn.abort()
                        for r in accepted:
                            if live(r):
                                outcomes[r.address] = RecipientOutcome(
                                    "deferred", "451 4.3.0 Transaction abandoned: a recipient "
                                    "was erased", remote, tls=tls)
                        result.reusable = False
                        return result
                    if accepted and deadline is not None and time.monotonic() >= deadline:
                        # Abandon before the body: dropping the connection makes the server
                        # discard the transaction, so nothing is delivered behind our back.
                        conn.abort()
                        for r in accepted:
                            outcomes[r.address] = RecipientOutcome(
                                "deferred", "451 4.4.7 Delivery attempt timed out "
                                "(messageDeadline)", remote, tls=tls)
                        result.reusable = False
                        return result
                    if accepted and on_accepted is not None:
                        on_accepted()
                    # A server may say 354 even though it refused every recipient (or MAIL):
                    # end the (empty) content so the session stays in step, send nothing.
                    replies.write(wire_data(data) if accepted else b".\r\n")
                    if accepted:
                        await replies.drain(t.data_block)
                    dot_sent = True
                    final = await replies.next(t.data_done)
                    result.ended = bool(accepted)
            finally:
                replies.close()
                proto._response_pending = False
                if proto._response_waiter is replies:  # type: ignore[comparison-overlap]
                    proto._response_waiter = (
                        None if proto.transport is None else loop.create_future())
        replies_seen = [mail, *rcpt_replies, *(x for x in (go, final) if x is not None)]
        closing = any(r.code == 421 for r in replies_seen)
        if accepted:
            answer = final if final is not None else go
            assert answer is not None
            if answer.code == 250 and final is not None:
                for r in accepted:
                    outcome = reply_outcome(250, answer.message, "data", remote, tls)
                    outcome.dsn_passed = dsn
                    outcomes[r.address] = outcome
                if not closing:
                    return result  # RFC 5321 allows MAIL right after a completed transaction
            else:
                for r in accepted:
                    outcomes[r.address] = reply_outcome(
                        answer.code, answer.message, "data", remote, tls,
                        recipients_in_transaction=len(accepted))
        if closing:
            result.throttled = True
            client.close()
            result.reusable = False
            return result
        await client.rset()
        return result
    except ReusedConnectionLost:
        client.close()  # unread replies may follow: never reuse it
        raise
    except asyncio.CancelledError:
        conn.abort()  # never leave a half-done transaction for the server to complete
        raise
    except (aiosmtplib.SMTPException, OSError) as exc:
        # Closed, reset, broken pipe (SMTPServerDisconnected), timeouts, malformed replies: the
        # protocol may be out of step with the server now, never reuse it.
        conn.abort()
        result.reusable = False
        if isinstance(exc, ConnectionError) and reused and not got_reply:
            raise ReusedConnectionLost(describe(exc)) from None
        why = f"451 4.4.2 Connection to {remote} lost: {describe(exc)}"
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            why = f"451 4.4.2 {remote} answered {format_reply(exc.code, exc.message)}"
        undecided = [r for r in recipients if r.address not in outcomes]
        if not dot_sent and moves_to_next_mx(None, stage):
            result.moved, result.moved_reply = undecided, why
        else:
            for r in undecided:
                outcomes[r.address] = RecipientOutcome("deferred", why, remote, tls=tls)
        return result
