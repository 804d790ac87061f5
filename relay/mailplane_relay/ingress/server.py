"""The SMTP ingress server: listeners, admission (session caps), session bookkeeping for a
graceful drain, and the shared parts every session uses (policy, throttle, metric children)."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import socket
import time
from collections.abc import Callable
from datetime import UTC, datetime
from functools import partial
from typing import Any, Protocol

from ..config import RelayConfig
from ..events import LogEvent
from ..metrics import RelayMetrics
from ..ratelimit import Limiter
from ..reputation import Reputation
from ..spool import QueuedMessage, Spool
from ..tlsctx import ReloadingTLS
from .policy import SenderPolicy
from .replies import R, Refusal
from .session import Handler, RelaySMTP
from .throttle import AuthThrottle, client_key

log = logging.getLogger(__name__)


class QueueLike(Protocol):
    def submit(self, msg: QueuedMessage, data: bytes | None = None) -> None: ...


class MessageLogLike(Protocol):
    def record(self, event: LogEvent) -> None: ...


class SuppressionLike(Protocol):
    def is_suppressed(self, address: str, namespace: str | None = None
                      ) -> tuple[str, float] | None: ...


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
        self.reputation = reputation
        self.tls = tls
        self.spool = spool
        self.queue = queue
        self.log = log
        self.suppression = suppression
        self.limiter = limiter
        self.policy = SenderPolicy(limiter, reputation)
        self.auth_throttle = auth_throttle or AuthThrottle(lambda: config().settings.limits)
        self.metrics = metrics
        self.handler = Handler()
        self.draining = False
        self._servers: list[asyncio.Server] = []
        self._ports: dict[str, int] = {}
        self._sessions: set[RelaySMTP] = set()
        self._per_address: dict[str, int] = {}
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
                    # Reopened after a drain was called off: the port it had (port 0 resolved).
                    port=self._ports.get(listener.name) or listener.port,
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

    def admission_refusal(self, session: RelaySMTP) -> Refusal | None:
        if self.draining:
            return Refusal("shutting_down", R.SHUTTING_DOWN)
        limits = self.config().settings.limits
        if len(self._sessions) > limits.max_sessions:
            return Refusal("too_many_sessions", R.TOO_MANY_SESSIONS)
        if (self._per_address.get(session.address_key, 0) > limits.max_sessions_per_address
                and not session.trusted()):
            return Refusal("too_many_sessions_per_address", R.TOO_MANY_FROM_ADDRESS)
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
        """The current date for Received: and Date: headers, formatted once per second."""
        now = int(time.time())
        if self._date[0] != now:
            # "+0000", not the obsolete "GMT" zone (RFC 5322 §4.3).
            self._date = (now, email.utils.format_datetime(datetime.fromtimestamp(now, UTC)))
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
