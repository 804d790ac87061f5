"""The operator talks to relay pods' admin port over verified TLS only.

A real HTTPS server (trustme certificates) stands in for a pod's admin port, reached by IP as
pods are. The operator presents its token only to a server whose certificate chains to the
relay's CA and names ``<relay>.<namespace>.svc``; an impostor (another CA, or the right CA for
another name) learns nothing, and neither does a plain-HTTP URL.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
import trustme
from aiohttp import web

from mailplane_operator.handlers import scaledown

NAME = "main.mail.svc"


async def _server(ca: trustme.CA, names: tuple[str, ...],
                  seen: list[str]) -> tuple[web.AppRunner, int]:
    async def status(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization", ""))
        return web.json_response({"configHash": "h", "render": "r1"})

    app = web.Application()
    app.router.add_get(scaledown.STATUS_PATH, status)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*names).configure_cert(ctx)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    return runner, int(runner.addresses[0][1])


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def _client(ca: trustme.CA) -> scaledown.AdminClient:
    ctx = ssl.create_default_context(cadata=ca.cert_pem.bytes().decode())
    return scaledown.AdminClient("secret-token", ctx, NAME)


@pytest.mark.parametrize("names, issuer", [
    (("127.0.0.1", NAME), "pool"),         # the pod: answered
    (("127.0.0.1", "other.svc"), "pool"),  # the pool's CA, another name: refused
    (("127.0.0.1", NAME), "other"),        # the name, another CA: refused
])
async def test_the_token_goes_only_to_a_verified_pod(
        http: aiohttp.ClientSession, tls_ca: trustme.CA, names: tuple[str, ...],
        issuer: str) -> None:
    seen: list[str] = []
    runner, port = await _server(tls_ca if issuer == "pool" else trustme.CA(), names, seen)
    try:
        doc = await scaledown._call(http, "GET", f"https://127.0.0.1:{port}", _client(tls_ca),
                                    path=scaledown.STATUS_PATH)
    finally:
        await runner.cleanup()
    if names[1] == NAME and issuer == "pool":
        assert doc == {"configHash": "h", "render": "r1"}
        assert seen == ["Bearer secret-token"]
    else:
        assert doc is None and seen == []


async def test_no_call_without_a_ca_or_over_plain_http(
        http: aiohttp.ClientSession, tls_ca: trustme.CA) -> None:
    seen: list[str] = []
    runner, port = await _server(tls_ca, ("127.0.0.1", NAME), seen)
    try:
        unverifiable = scaledown.AdminClient("secret-token", None, NAME, "no ca.crt")
        assert await scaledown._call(http, "GET", f"https://127.0.0.1:{port}", unverifiable,
                                     path=scaledown.STATUS_PATH) is None
        assert await scaledown._call(http, "GET", f"http://127.0.0.1:{port}", _client(tls_ca),
                                     path=scaledown.STATUS_PATH) is None
    finally:
        await runner.cleanup()
    assert seen == []


def test_pods_are_reached_on_their_admin_port_over_https() -> None:
    pod = {"metadata": {"name": "main-0"}, "status": {"podIP": "10.0.0.7"},
           "spec": {"containers": [{"ports": [{"name": "http", "containerPort": 8080},
                                              {"name": "admin", "containerPort": 9443}]}]}}
    assert scaledown._url(pod) == "https://10.0.0.7:9443"
    del pod["spec"]
    assert scaledown._url(pod) == "https://10.0.0.7:8443"
