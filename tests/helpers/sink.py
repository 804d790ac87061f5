"""A capture SMTP sink (aiosmtpd) on 127.0.0.1, port 0, with configurable faults.

The sink records every accepted transaction (envelope and raw bytes) and counts connections, and
can answer 4xx/5xx at MAIL, RCPT (per recipient) or DATA (per recipient in the transaction),
reply slowly, offer STARTTLS with a throwaway trustme CA, and require AUTH::

    async def test_x(smtp_sink):
        sink = await smtp_sink(rcpt_replies={"gone@example.net": "550 5.1.1 No such user"})
        ... deliver to ("127.0.0.1", sink.port) ...
        await sink.wait_for_messages(1)
        assert sink.messages[0].rcpt_tos == ["ok@example.net"]

Behaviour fields are plain attributes and may be changed while the sink runs (a test turns a
451 into an accept to exercise a retry). ``running_sink_in_thread`` runs one in its own event
loop for synchronous tests or subprocess peers.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import tempfile
import threading
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session


@dataclass(frozen=True)
class CapturedMessage:
    mail_from: str
    rcpt_tos: list[str]
    data: bytes
    connection: int  # sequence number of the connection that carried it
    tls: bool
    auth_user: str | None
    mail_options: tuple[str, ...] = ()
    rcpt_options: tuple[str, ...] = ()


@dataclass
class SinkBehaviour:
    # address (lower case) -> reply, e.g. "550 5.1.1 No such user" or "451 4.2.0 Try later"
    rcpt_replies: dict[str, str] = field(default_factory=dict)
    # reply at DATA when any recipient of the transaction is listed (first match wins)
    data_replies: dict[str, str] = field(default_factory=dict)
    data_reply: str | None = None  # reply at DATA for every transaction
    mail_reply: str | None = None  # reply at MAIL FROM for every transaction
    drop_at_mail: int = 0  # close the connection at the next N MAIL commands, without a reply
    data_delay: float = 0.0  # seconds before answering the end of DATA
    rcpt_delay: float = 0.0
    # when set, each RCPT is recorded in rcpt_attempts and then answered once the event is set
    rcpt_gate: asyncio.Event | None = None
    starttls: bool = False  # offer STARTTLS (certificate for 127.0.0.1/localhost)
    implicit_tls: bool = False  # TLS from the first byte (port 465 style)
    broken_tls: bool = False  # TLS handshakes fail (the sink demands a client certificate)
    require_starttls: bool = False
    auth: dict[str, str] | None = None  # username -> password; AUTH required when set
    pipelining: bool = False  # advertise PIPELINING (aiosmtpd reads pipelined commands)
    # advertise DSN (RFC 3461) and take RET, ENVID, NOTIFY and ORCPT (recorded, upper-cased
    # as aiosmtpd hands options over)
    dsn: bool = False
    smtputf8: bool = False  # advertise SMTPUTF8 (RFC 6531) and take UTF-8 addresses


class _CountingSMTP(SMTP):  # type: ignore[misc]
    def __init__(self, sink: Sink, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sink = sink
        self.connection_number = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # STARTTLS calls connection_made again on the same protocol: count TCP connections.
        if self.connection_number == 0:
            self._sink._sessions.add(self)
            self._sink.connections += 1
            self.connection_number = self._sink.connections
            self._sink._notify()
        super().connection_made(transport)

    def _getparams(self, params: list[str]) -> dict[str, Any] | None:
        found: dict[str, Any] | None = super()._getparams(params)
        if found is not None and self._sink.behaviour.dsn:
            for name in ("RET", "ENVID", "NOTIFY", "ORCPT"):  # taken (RFC 3461), not acted on
                found.pop(name, None)
        return found

    def connection_lost(self, exc: Exception | None) -> None:
        self._sink._sessions.discard(self)
        self._sink.disconnections += 1
        self._sink._notify()
        super().connection_lost(exc)


class _Handler:
    def __init__(self, sink: Sink) -> None:
        self.sink = sink

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope,
                          hostname: str, responses: list[str]) -> list[str]:
        session.host_name = hostname
        if self.sink.behaviour.pipelining:
            responses.insert(-1, "250-PIPELINING")
        if self.sink.behaviour.dsn:
            responses.insert(-1, "250-DSN")
        return responses

    async def handle_MAIL(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, mail_options: list[str]) -> str:
        b = self.sink.behaviour
        if b.drop_at_mail > 0:
            b.drop_at_mail -= 1
            server.transport.close()
            return "421 4.4.2 closing (never seen: the connection is already closed)"
        if b.mail_reply is not None:
            return b.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 2.1.0 Ok"

    async def handle_RCPT(self, server: SMTP, session: Session, envelope: Envelope,
                          address: str, rcpt_options: list[str]) -> str:
        b = self.sink.behaviour
        if b.rcpt_delay:
            await asyncio.sleep(b.rcpt_delay)
        self.sink.rcpt_attempts.append(address)
        self.sink._notify()
        if b.rcpt_gate is not None:
            await b.rcpt_gate.wait()
        reply = b.rcpt_replies.get(address.lower())
        if reply is not None:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        b = self.sink.behaviour
        if b.data_delay:
            await asyncio.sleep(b.data_delay)
        for rcpt in envelope.rcpt_tos:
            reply = b.data_replies.get(rcpt.lower())
            if reply is not None:
                return reply
        if b.data_reply is not None:
            return b.data_reply
        data = envelope.original_content or envelope.content or b""
        assert isinstance(data, bytes)
        self.sink._record(CapturedMessage(
            # aiosmtpd hands the null sender over as "<>"; record it as "" like every layer.
            mail_from="" if envelope.mail_from in (None, "<>") else envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            data=data,
            connection=getattr(server, "connection_number", 0),
            # session.ssl is set by STARTTLS only; implicit TLS shows on the transport.
            tls=(session.ssl is not None
                 or server.transport.get_extra_info("ssl_object") is not None),
            auth_user=(session.auth_data.login.decode()
                       if session.auth_data is not None and session.auth_data.login else None),
            mail_options=tuple(envelope.mail_options),
            rcpt_options=tuple(envelope.rcpt_options),
        ))
        return f"250 2.0.0 Ok: queued as S{len(self.sink.messages)}"


class Sink:
    """One sink server; ``start`` binds 127.0.0.1 port 0 in the running loop."""

    def __init__(self, behaviour: SinkBehaviour | None = None,
                 ca: trustme.CA | None = None, host: str = "127.0.0.1", port: int = 0) -> None:
        """``host`` may be any 127.0.0.0/8 address (several sinks on one port, as MX hosts
        of one ``mxPort``)."""
        self.host = host
        self.behaviour = behaviour or SinkBehaviour()
        self.ca = ca or trustme.CA()
        self.messages: list[CapturedMessage] = []
        self.rcpt_attempts: list[str] = []
        self.connections = 0
        self.disconnections = 0
        self._sessions: set[_CountingSMTP] = set()
        self.port = port
        self._server: asyncio.Server | None = None
        self._changed: asyncio.Event | None = None
        self._tmp = tempfile.TemporaryDirectory(prefix="sink-ca-")
        self.ca_file = str(Path(self._tmp.name) / "ca.pem")
        self.ca.cert_pem.write_to_path(self.ca_file)

    def _tls_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(self.host, "localhost", "sink.test").configure_cert(ctx)
        if self.behaviour.broken_tls:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.ca.configure_trust(ctx)
        return ctx

    def _authenticate(self, server: SMTP, session: Session, envelope: Envelope,
                      mechanism: str, auth_data: Any) -> AuthResult:
        users = self.behaviour.auth or {}
        login = auth_data.login.decode() if auth_data.login else ""
        password = auth_data.password.decode() if auth_data.password else ""
        ok = users.get(login) == password
        return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)

    def _protocol(self) -> SMTP:
        b = self.behaviour
        kwargs: dict[str, Any] = {"hostname": "sink.test", "timeout": 30,
                                  "enable_SMTPUTF8": b.smtputf8}
        if b.starttls or b.require_starttls:
            kwargs["tls_context"] = self._tls_context()
            kwargs["require_starttls"] = b.require_starttls
        if b.auth is not None:
            kwargs["auth_required"] = True
            kwargs["authenticator"] = self._authenticate
            kwargs["auth_require_tls"] = bool(b.starttls or b.require_starttls)
        with warnings.catch_warnings():
            # aiosmtpd warns about AUTH without TLS; a plain-text AUTH sink is a test fixture.
            warnings.simplefilter("ignore")
            return _CountingSMTP(self, _Handler(self), **kwargs)

    async def start(self) -> Sink:
        self._changed = asyncio.Event()
        loop = asyncio.get_running_loop()
        ssl_ctx = self._tls_context() if self.behaviour.implicit_tls else None
        self._server = await loop.create_server(self._protocol, self.host, self.port,
                                                ssl=ssl_ctx)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            # Connections a client pooled stay open; closing the listener is enough to make
            # the port refuse new ones, and the client side closes its own.
            # Close sessions a client left open (pooled connections, a test stopping mid-DATA)
            # and let their handler tasks end, so none outlives the test's loop.
            handlers = []
            for session in list(self._sessions):
                if session.transport is not None:
                    session.transport.close()
                if session._handler_coroutine is not None:
                    handlers.append(session._handler_coroutine)
            if handlers:
                await asyncio.wait(handlers, timeout=2.0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            self._server = None
        self._tmp.cleanup()

    def drop_connections(self) -> None:
        """Close every open session from the server side (an upstream idle timeout)."""
        for session in list(self._sessions):
            if session.transport is not None:
                session.transport.close()

    @property
    def address(self) -> tuple[str, int]:
        return self.host, self.port

    def _record(self, message: CapturedMessage) -> None:
        self.messages.append(message)
        self._notify()

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> None:
        """Wait until ``predicate()`` holds; it is re-checked whenever the sink records
        something (a connection, a RCPT, a message)."""
        assert self._changed is not None, "sink not started"
        async with asyncio.timeout(timeout):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    async def wait_for_messages(self, count: int, timeout: float = 10.0) -> list[CapturedMessage]:
        await self.wait_for(lambda: len(self.messages) >= count, timeout)
        return self.messages

    def delivered_to(self, address: str) -> list[CapturedMessage]:
        return [m for m in self.messages if address in m.rcpt_tos]


async def start_sink(ca: trustme.CA | None = None, host: str = "127.0.0.1", port: int = 0,
                     **behaviour: Any) -> Sink:
    return await Sink(SinkBehaviour(**behaviour), ca=ca, host=host, port=port).start()


@pytest.fixture
async def smtp_sink() -> AsyncIterator[Callable[..., Awaitable[Sink]]]:
    """Factory: ``await smtp_sink(ca=None, host="127.0.0.1", port=0, **SinkBehaviour
    fields)``; every sink stops after the test."""
    sinks: list[Sink] = []

    async def make(ca: trustme.CA | None = None, host: str = "127.0.0.1", port: int = 0,
                   **behaviour: Any) -> Sink:
        sink = await start_sink(ca=ca, host=host, port=port, **behaviour)
        sinks.append(sink)
        return sink

    yield make
    for sink in sinks:
        await sink.stop()


@contextlib.contextmanager
def running_sink_in_thread(ca: trustme.CA | None = None, **behaviour: Any) -> Iterator[Sink]:
    """A sink served by its own loop in a thread, for synchronous tests."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, Sink] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        holder["sink"] = loop.run_until_complete(start_sink(ca=ca, **behaviour))
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="smtp-sink", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("sink did not start")
    sink = holder["sink"]
    try:
        yield sink
    finally:
        asyncio.run_coroutine_threadsafe(sink.stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
