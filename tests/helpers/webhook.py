"""A real HTTPS webhook receiver on loopback (aiohttp + a trustme certificate).

It checks every post as a receiver following docs/webhooks.md would, with its own code (not
the relay's): the ``Mailplane-Signature`` header's ``t=`` within the replay window and a
``v1=`` matching HMAC-SHA256 over ``<t>.<body>`` by one of its secrets. Posts with a bad
signature are answered 400 and kept in ``rejected``. ``script`` holds what to do with the next
posts (an HTTP status, or ``"hang"`` to never answer); when it is empty every post gets
``refuse_with`` if set, else 200.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web

from tests.helpers.pki import write_server_pair

REPLAY_WINDOW = 300


@dataclass
class Post:
    event: dict[str, Any]
    headers: dict[str, str]
    status: int | str


@dataclass
class Receiver:
    secrets: list[bytes]
    host: str = "127.0.0.1"
    script: list[int | str] = field(default_factory=list)
    # While set, every post (after the script) gets this status: an endpoint that is down.
    refuse_with: int | None = None
    accepted: list[Post] = field(default_factory=list)
    rejected: list[Post] = field(default_factory=list)
    attempts: list[Post] = field(default_factory=list)
    port: int = 0
    _runner: web.AppRunner | None = None
    # Set when the receiver stops: a hanging post then ends (its client is long gone).
    _released: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"https://{self.host}:{self.port}/hooks/mail"

    def verified(self, header: str, body: bytes) -> bool:
        items = [p.split("=", 1) for p in header.split(",") if "=" in p]
        stamps = [v for k, v in items if k == "t"]
        if len(stamps) != 1 or not stamps[0].isdigit():
            return False
        if abs(time.time() - int(stamps[0])) > REPLAY_WINDOW:
            return False
        signed = stamps[0].encode() + b"." + body
        wanted = {hmac.new(s, signed, hashlib.sha256).hexdigest() for s in self.secrets}
        return any(k == "v1" and v in wanted for k, v in items)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = dict(request.headers)
        post = Post(json.loads(body), headers, 200)
        self.attempts.append(post)
        if not self.verified(request.headers.get("Mailplane-Signature", ""), body):
            post.status = 400
            self.rejected.append(post)
            return web.Response(status=400, text="bad signature")
        action: int | str = (self.script.pop(0) if self.script
                             else self.refuse_with or 200)
        post.status = action
        if action == "hang":
            await self._released.wait()
            return web.Response(status=503, text="stopped")
        assert isinstance(action, int)
        if 200 <= action < 300:
            self.accepted.append(post)
        return web.Response(status=action, text="ok")

    async def start(self, directory: Path, ca: trustme.CA) -> Receiver:
        pair = write_server_pair(ca, directory, names=(self.host, "localhost"), stem="hook")
        import ssl

        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ctx.load_cert_chain(pair.cert_file, pair.key_file)
        app = web.Application()
        app.router.add_post("/hooks/mail", self._handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=ctx)
        await site.start()
        server = site._server
        assert server is not None and server.sockets  # type: ignore[attr-defined]
        self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        return self

    async def stop(self) -> None:
        self._released.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def ids(self) -> list[str]:
        return [p.event["id"] for p in self.accepted]

    async def wait_for(self, predicate: Callable[[], bool], what: str,
                       timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; accepted "
                                     f"{len(self.accepted)}, attempts {len(self.attempts)}")
            await asyncio.sleep(0.05)


@pytest.fixture
async def webhook_receiver(tls_ca: trustme.CA, tmp_path: Path
                           ) -> AsyncIterator[Callable[..., Awaitable[Receiver]]]:
    """Factory: ``await webhook_receiver([secret, ...], host="127.0.0.1")``; stopped after."""
    receivers: list[Receiver] = []

    async def make(secrets: list[bytes], host: str = "127.0.0.1", port: int = 0) -> Receiver:
        r = Receiver(secrets=secrets, host=host, port=port)
        await r.start(tmp_path / f"hook{len(receivers)}", tls_ca)
        receivers.append(r)
        return r

    yield make
    for r in receivers:
        await r.stop()
