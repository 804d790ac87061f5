"""The operations HTTP server: ``/metrics``, ``/livez``, ``/readyz``, unauthenticated and
plain HTTP (probes and scrapers); and the administration server: the authenticated ``/admin``
routes of drain.py, HTTPS only, on a port of their own, with the relay's serving certificate.

Readiness is a set of named conditions the composition root sets as it starts (listeners bound,
configuration loaded, spool recovered) and clears when it stops; ``/readyz`` answers 503 naming
the first condition that is not met, so ``kubectl describe`` shows why a pod is not ready.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger(__name__)

READINESS_CONDITIONS = ("config loaded", "spool recovered", "listeners bound")


class ReadinessProbe(Protocol):
    @property
    def ready(self) -> bool: ...
    @property
    def reason(self) -> str: ...


class Readiness:
    """What stands between the relay and accepting mail; empty means ready."""

    def __init__(self, on_change: Callable[[bool], None] | None = None) -> None:
        self._missing: list[str] = list(READINESS_CONDITIONS)
        self._shutting_down = False
        self._draining = False
        self._on_change = on_change

    def mark(self, condition: str) -> None:
        if condition in self._missing:
            self._missing.remove(condition)
            self._changed()

    def shutting_down(self) -> None:
        self._shutting_down = True
        self._changed()

    def set_draining(self, on: bool) -> None:
        """While the relay hands its queue to other pods (drain.py): not ready."""
        self._draining = on
        self._changed()

    @property
    def ready(self) -> bool:
        return not self._missing and not self._shutting_down and not self._draining

    @property
    def reason(self) -> str:
        if self._shutting_down:
            return "shutting down"
        if self._draining:
            return "draining"
        if self._missing:
            return "waiting for: " + ", ".join(self._missing)
        return "ok"

    def _changed(self) -> None:
        if self._on_change is not None:
            self._on_change(self.ready)


async def _serve(app: web.Application, address: str, port: int,
                 **site: Any) -> tuple[web.AppRunner, int]:
    """Starts `app` on ``address:port`` (``TCPSite`` keywords in `site`); returns the runner
    and the bound port. A failed bind cleans the runner up."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, address, port, **site).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, int(runner.addresses[0][1])


async def _stop(server: OpsServer | AdminServer) -> None:
    runner, server._runner = server._runner, None
    if runner is not None:
        await runner.cleanup()


class OpsServer:
    """aiohttp on ``address:port`` (port 0 picks a free port, see ``port`` after ``start``)."""

    def __init__(
        self,
        *,
        address: str,
        port: int,
        readiness: ReadinessProbe,
        registry: CollectorRegistry,
        reuse_port: bool = False,
    ) -> None:
        self._address = address
        self._port = port
        self._readiness = readiness
        self._registry = registry
        self._reuse_port = reuse_port
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/livez", self._livez)
        app.router.add_get("/readyz", self._readyz)
        self._runner, self.port = await _serve(app, self._address, self._port,
                                               reuse_port=self._reuse_port or None)
        log.info("ops http listening on %s:%d", self._address, self.port)

    async def stop(self) -> None:
        await _stop(self)

    async def _metrics(self, _request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _livez(self, _request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, _request: web.Request) -> web.Response:
        if self._readiness.ready:
            return web.Response(text="ok\n")
        return web.Response(status=503, text=self._readiness.reason + "\n")


class AdminServer:
    """The ``/admin`` routes over HTTPS on ``address:port`` (port 0 picks a free port, see
    ``port`` after ``start``). `context` is the relay's live server context (tlsctx.py): a
    renewed certificate is presented at the next handshake, as on the SMTP listeners. A client
    speaking plain HTTP to this port fails the handshake: nothing is read from it."""

    def __init__(self, *, address: str, port: int, routes: list[web.RouteDef],
                 context: ssl.SSLContext, max_body: int, reuse_port: bool = False) -> None:
        self._reuse_port = reuse_port
        self._address = address
        self._port = port
        self._routes = list(routes)
        self._context = context
        self._max_body = max_body
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application(client_max_size=self._max_body)
        app.add_routes(self._routes)
        self._runner, self.port = await _serve(app, self._address, self._port,
                                               ssl_context=self._context,
                                               reuse_port=self._reuse_port or None)
        log.info("admin https listening on %s:%d", self._address, self.port)

    async def stop(self) -> None:
        await _stop(self)
