"""An MTA-STS policy web server (RFC 8461 section 3.3) on port 443 of an address of its own in
127.0.0.0/8, serving ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` with a certificate
from a test CA, and misbehaving on request (redirects, wrong type, oversized body, down, no
answer until ``hold`` is set)::

    server = await policy_server(ca, "example.net")
    dns.add_a("mta-sts.example.net", server.address)
    server.policy = "version: STSv1\\nmode: enforce\\nmx: sink.test\\nmax_age: 86400\\n"
"""

from __future__ import annotations

import asyncio
import random
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest
import trustme
from aiohttp import web


class PolicyServer:
    def __init__(self, ca: trustme.CA, domain: str, *, cert_name: str | None = None) -> None:
        self.ca = ca
        self.domain = domain
        self.cert_name = cert_name or f"mta-sts.{domain}"
        self.policy = ""
        self.status = 200
        self.content_type = "text/plain"
        self.location: str | None = None
        self.chunked = False  # no Content-Length: the client must cap what it reads
        self.hold: asyncio.Event | None = None  # set: requests wait for it before any answer
        self.requested = asyncio.Event()  # set at the first request
        self.requests: list[tuple[str, str]] = []  # (Host header, path)
        self.address = ""
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        self.requests.append((request.headers.get("Host", ""), request.path))
        self.requested.set()
        if self.hold is not None:
            await self.hold.wait()
        if request.path != "/.well-known/mta-sts.txt":
            return web.Response(status=404)
        headers = {"Location": self.location} if self.location else None
        if self.chunked:
            resp = web.StreamResponse(status=self.status, headers=headers)
            resp.content_type = self.content_type
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            body = self.policy.encode()
            for start in range(0, len(body), 4096):
                await resp.write(body[start:start + 4096])
            await resp.write_eof()
            return resp
        return web.Response(body=self.policy.encode(), status=self.status, headers=headers,
                            content_type=self.content_type)

    async def start(self) -> PolicyServer:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(self.cert_name).configure_cert(ctx)
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._serve)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        for _ in range(20):
            address = f"127.44.{random.randrange(1, 255)}.{random.randrange(1, 255)}"
            site = web.TCPSite(self._runner, address, 443, ssl_context=ctx)
            try:
                await site.start()
            except PermissionError:
                raise RuntimeError("binding port 443 needs root or CAP_NET_BIND_SERVICE (the "
                                   "relay fetches MTA-STS policies from the real port)") from None
            except OSError:
                continue
            self.address = address
            return self
        raise RuntimeError("no free 127.44.x.y address with port 443")

    async def stop(self) -> None:
        if self.hold is not None:
            self.hold.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def policy_server() -> AsyncIterator[Callable[..., Awaitable[PolicyServer]]]:
    """Factory: ``await policy_server(ca, domain, cert_name=None)``; stopped after the test."""
    servers: list[PolicyServer] = []

    async def make(ca: trustme.CA, domain: str, cert_name: str | None = None) -> PolicyServer:
        server = await PolicyServer(ca, domain, cert_name=cert_name).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        await server.stop()
