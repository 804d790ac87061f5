"""The portal running against a real store (SQLite on disk) and the Kubernetes emulator (which
answers TokenReview and SubjectAccessReview), in its own thread and event loop.

Two tenants: ``shop`` (user alice, token ``alice-token``) and ``blog`` (user bob, token
``bob-token``), each with its own SmtpCredential and message-log rows; one row without a
namespace (mail from a trusted network) that no tenant may see.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from mailplane_operator import kube as opkube
from mailplane_portal.kube import KubeClient
from mailplane_portal.records import Records
from mailplane_portal.web import Portal, build_app
from mailplane_relay.store import SqliteBackend, StoreBackend
from mailplane_relay.store.backend import LOG_COLUMNS
from mailplane_relay.store.postgres import PostgresBackend
from tests.helpers.kube import KubeApi, credential_body, running_emulator
from tests.helpers.loopthread import serving_in_thread

NOW = time.time()


def log_row(event_id: str, ts: float, status: str, queue_id: str, namespace: str | None,
            sender: str, recipient: str, credential: str | None = None,
            response: str = "250 2.0.0 ok", attempt: int | None = None,
            remote: str | None = None) -> tuple[Any, ...]:
    row = {"event_id": event_id, "ts": ts, "status": status, "queue_id": queue_id,
           "message_id": f"<{queue_id}@example.test>", "credential": credential,
           "namespace": namespace, "sender": sender, "recipient": recipient,
           "response": response, "size": 1234, "attempt": attempt, "remote": remote}
    return tuple(row[c] for c in LOG_COLUMNS)


def seed_rows() -> list[tuple[Any, ...]]:
    rows = []
    # shop: 120 messages (paging), one with a full history
    for i in range(120):
        ts = NOW - 3600 + i * 10
        rows.append(log_row(f"s{i}", ts, "delivered", f"SHOP{i:04d}", "shop",
                            "orders@shop.example", f"customer{i}@mail.example",
                            credential="shop-orders", attempt=1, remote="mx.mail.example:25 tls"))
    rows += [
        log_row("h1", NOW - 600, "received", "SHOPHIST", "shop", "orders@shop.example",
                "late@slow.example", credential="shop-orders", response="250 2.0.0 queued"),
        log_row("h2", NOW - 500, "deferred", "SHOPHIST", "shop", "orders@shop.example",
                "late@slow.example", credential="shop-orders", attempt=1,
                response="451 4.7.1 try later", remote="mx.slow.example:25 tls"),
        log_row("h3", NOW - 400, "delivered", "SHOPHIST", "shop", "orders@shop.example",
                "late@slow.example", credential="shop-orders", attempt=2,
                remote="mx.slow.example:25 tls"),
        # blog: its own mail; the same address as a shop customer appears here too
        log_row("b1", NOW - 300, "bounced", "BLOGSECRET1", "blog", "news@blog.example",
                "reader@secret.example", credential="blog-news", attempt=1,
                response="550 5.1.1 no such user"),
        log_row("b2", NOW - 200, "delivered", "BLOGSECRET2", "blog", "news@blog.example",
                "customer1@mail.example", credential="blog-news", attempt=1),
        # no tenant: never shown in the portal
        log_row("n1", NOW - 100, "delivered", "NOTENANT1", None, "cron@platform.example",
                "ops@platform.example"),
        log_row("n2", NOW - 90, "delivered", "NOTENANT2", "", "cron@platform.example",
                "ops@platform.example"),
    ]
    return rows


@dataclass
class RunningPortal:
    url: str
    api: KubeApi
    portal: Portal
    db: Path
    loop: asyncio.AbstractEventLoop
    dsn: str | None = None  # the PostgreSQL store, when the test runs on one

    def new_store(self) -> StoreBackend:
        return PostgresBackend(self.dsn) if self.dsn else SqliteBackend(str(self.db))

    def sql(self, query: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """A query on the store's database (``?`` placeholders), outside the portal."""
        async def run() -> list[tuple[Any, ...]]:
            records = Records(dsn=self.dsn) if self.dsn else Records(sqlite_path=str(self.db))
            await records.open()
            try:
                return [tuple(r.values()) for r in await records._all(query, args)]
            finally:
                await records.close()
        return asyncio.run(run())

    def wait_erasure(self, s: requests.Session, ns: str, erasure_id: str) -> dict[str, Any]:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            body: dict[str, Any] = s.get(
                f"{self.url}/api/v1/namespaces/{ns}/erasures/{erasure_id}").json()
            if body["state"] in ("done", "failed"):
                return body
            time.sleep(0.05)
        raise AssertionError("the erasure did not finish")

    def session(self, token: str) -> requests.Session:
        """A browser-like session logged in with ``token`` (cookie + CSRF token)."""
        s = requests.Session()
        r = s.post(self.url + "/login", data={"token": token}, allow_redirects=False,
                   headers={"Origin": self.url})
        assert r.status_code == 303, r.text
        # The cookie is Secure; Python's cookie jar would keep it from plain-HTTP loopback
        # (a browser sends it to localhost): keep the value as a plain cookie.
        sid = s.cookies["mailplane_session"]
        s.cookies.clear()
        s.cookies.set("mailplane_session", sid)
        s.headers["X-CSRF-Token"] = s.get(self.url + "/api/v1/whoami").json()["csrf"]
        s.headers["Origin"] = self.url
        return s


def _setup_kube(api: KubeApi) -> None:
    emu = api.emulator
    for name, ns in (("shop-orders", "shop"), ("blog-news", "blog")):
        api.create(opkube.SMTP_CREDENTIALS,
                   credential_body(name, [f"*@{ns}.example"], namespace=ns))
    emu.add_user("alice-token", "alice", ("shop-team",))
    emu.add_user("bob-token", "bob")
    emu.add_user("carol-token", "carol")  # reads shop, changes nothing
    emu.grant("group:shop-team", "get", "smtpcredentials", "shop")
    emu.grant("group:shop-team", "update", "smtpcredentials", "shop")
    emu.grant("bob", "get", "smtpcredentials", "blog")
    emu.grant("bob", "update", "smtpcredentials", "blog")
    emu.grant("carol", "get", "smtpcredentials", "shop")


@pytest.fixture
def backend() -> str:
    """The store the portal runs on; a module parametrizes it to run on PostgreSQL too."""
    return "sqlite"


@pytest.fixture
def portal_setup() -> Callable[[Portal, str], None] | None:
    """Called in the portal's event loop with the portal and its URL once it serves (a module
    overrides it, e.g. to configure OIDC login, which needs the portal's URL)."""
    return None


@pytest.fixture
def portal(tmp_path: Path, backend: str, request: pytest.FixtureRequest,
           portal_setup: Callable[[Portal, str], None] | None) -> Iterator[RunningPortal]:
    db = tmp_path / "store.db"
    dsn: str | None = request.getfixturevalue("pg_dsn") if backend == "postgresql" else None
    with running_emulator() as api:
        _setup_kube(api)
        @contextlib.asynccontextmanager
        async def serve() -> AsyncIterator[tuple[Portal, str]]:
            store: StoreBackend = PostgresBackend(dsn) if dsn else SqliteBackend(str(db))
            await store.open()
            await store.write_events(seed_rows())
            await store.suppression_upsert("customer7@mail.example", "bounce", "delivery",
                                           NOW - 50)
            await store.suppression_upsert("customer8@mail.example", "complaint", "fbl",
                                           NOW - 40)
            await store.suppression_upsert("reader@secret.example", "bounce", "delivery",
                                           NOW - 30)
            records = Records(dsn=dsn) if dsn else Records(sqlite_path=str(db))
            await records.open()
            kube = KubeClient(api.url)
            p = Portal(store, kube, records)
            runner = web.AppRunner(build_app(p), access_log=None)
            await runner.setup()
            try:
                site = web.TCPSite(runner, "127.0.0.1", 0)
                await site.start()
                port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
                url = f"http://localhost:{port}"
                if portal_setup is not None:
                    portal_setup(p, url)
                yield p, url
            finally:
                await runner.cleanup()
                if p.oidc is not None:
                    await p.oidc.close()
                await kube.close()
                await records.close()
                await store.close()

        with serving_in_thread(serve, name="portal") as served:
            p, url = served.value
            yield RunningPortal(url, api, p, db, served.loop, dsn)
