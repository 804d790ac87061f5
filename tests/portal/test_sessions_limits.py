"""Sessions kept in the store (every replica sees them, a restart keeps them, only a hash of the
cookie is stored) and the login rate limits (per client address, per user; 429 with
Retry-After)."""

from __future__ import annotations

import hashlib
import html
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import requests

from mailplane_portal.kube import Identity
from mailplane_portal.ratelimit import Limiter, client_address, parse_networks
from mailplane_portal.records import Records
from mailplane_portal.sessions import SessionStore

from .conftest import RunningPortal

ALICE = Identity("alice", "uid-alice", ("shop-team", "system:authenticated"))


@pytest.fixture(params=["sqlite", "postgresql"])
async def replicas(request: pytest.FixtureRequest, tmp_path: Path
                   ) -> AsyncIterator[Callable[[], Records]]:
    """Records connections to one database, as two portal replicas (or a restart) have."""
    if request.param == "postgresql":
        dsn = request.getfixturevalue("pg_dsn")
        make: Callable[[], Records] = lambda: Records(dsn=dsn)  # noqa: E731
    else:
        make = lambda: Records(sqlite_path=str(tmp_path / "store.db"))  # noqa: E731
    opened: list[Records] = []

    def factory() -> Records:
        opened.append(make())
        return opened[-1]
    yield factory
    for r in opened:
        await r.close()


async def test_a_session_is_seen_by_another_replica_and_stored_only_as_a_hash(
        replicas: Callable[[], Records]) -> None:
    one, two = replicas(), replicas()
    await one.open()
    await two.open()
    now = [1000.0]
    a = SessionStore(one, idle=600, lifetime=3600, clock=lambda: now[0])
    b = SessionStore(two, idle=600, lifetime=3600, clock=lambda: now[0])
    session = await a.create(ALICE)
    seen = await b.get(session.sid)
    assert seen is not None and seen.identity == ALICE and seen.csrf == session.csrf
    rows = await one._all("SELECT id_hash, kind, username, data FROM portal_sessions")
    assert rows == [{"id_hash": hashlib.sha256(session.sid.encode()).hexdigest(),
                     "kind": "session", "username": "alice", "data": rows[0]["data"]}]
    assert session.sid not in repr(rows) and session.csrf not in repr(rows)
    # Revoked on one replica: gone on the other.
    await b.revoke(session.sid)
    assert await a.get(session.sid) is None
    # Idle too long, or past its lifetime: gone (and deleted).
    s2 = await a.create(ALICE)
    now[0] += 601
    assert await b.get(s2.sid) is None
    s3 = await a.create(ALICE)
    for _ in range(7):
        now[0] += 500
        assert await b.get(s3.sid) is not None  # kept alive by use ...
    now[0] += 200
    assert await b.get(s3.sid) is None  # ... but never past the lifetime
    assert await a.count() == 0
    s4, s5 = await a.create(ALICE), await a.create(ALICE)
    assert await b.revoke_user("alice") == 2
    assert await a.get(s4.sid) is None and await a.get(s5.sid) is None


async def test_a_started_login_is_taken_once_and_is_no_session(
        replicas: Callable[[], Records]) -> None:
    from mailplane_portal.oidc import LoginStart

    records = replicas()
    await records.open()
    store = SessionStore(records)
    start = LoginStart("st", "no", "ve", store.clock())
    pid = await store.begin_login(start)
    assert await store.get(pid) is None
    assert await store.take_login(pid) == start
    assert await store.take_login(pid) is None


def _post_login(portal: RunningPortal, token: str, **headers: str) -> requests.Response:
    return requests.post(portal.url + "/login", data={"token": token}, allow_redirects=False,
                         headers={"Origin": portal.url, **headers})


def test_too_many_attempts_from_one_address_get_429(portal: RunningPortal) -> None:
    portal.portal.login_by_address = Limiter(burst=3, per_minute=3)
    for _ in range(3):
        assert _post_login(portal, "wrong-token").status_code == 401
    r = _post_login(portal, "alice-token")  # even a good token waits now
    assert r.status_code == 429
    assert 1 <= int(r.headers["Retry-After"]) <= 20
    assert "too many login attempts from your address: wait" in html.unescape(r.text)
    assert "Set-Cookie" not in r.headers


def test_tokens_guessed_over_the_api_are_held_back_like_logins(portal: RunningPortal) -> None:
    portal.portal.login_by_address = Limiter(burst=3, per_minute=3)
    url = portal.url + "/api/v1/namespaces/shop/logs"
    for _ in range(5):  # a good token is never charged
        assert requests.get(url, headers={"Authorization": "Bearer alice-token"}
                            ).status_code == 200
    for _ in range(3):
        assert requests.get(url, headers={"Authorization": "Bearer guess"}).status_code == 401
    r = requests.get(url, headers={"Authorization": "Bearer guess-again"})
    assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 20
    assert "too many refused tokens from your address" in r.json()["error"]
    # held for the address: the login page too
    assert _post_login(portal, "alice-token").status_code == 429


def test_too_many_logins_of_one_user_get_429(portal: RunningPortal) -> None:
    portal.portal.login_by_user = Limiter(burst=2, per_minute=2)
    assert _post_login(portal, "alice-token").status_code == 303
    assert _post_login(portal, "alice-token").status_code == 303
    r = _post_login(portal, "alice-token")
    assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
    assert "too many login attempts for this user" in r.text
    assert _post_login(portal, "bob-token").status_code == 303  # another user is not held up


def test_behind_a_trusted_proxy_each_client_has_its_own_count(portal: RunningPortal) -> None:
    portal.portal.login_by_address = Limiter(burst=1, per_minute=1)
    portal.portal.trusted_proxies = parse_networks("127.0.0.0/8")
    assert _post_login(portal, "x", **{"X-Forwarded-For": "198.51.100.7"}).status_code == 401
    assert _post_login(portal, "x", **{"X-Forwarded-For": "198.51.100.7"}).status_code == 429
    # Another client behind the same proxy; a made-up first hop does not change who it is.
    assert _post_login(portal, "x", **{"X-Forwarded-For": "203.0.113.9"}).status_code == 401
    assert _post_login(portal, "x", **{
        "X-Forwarded-For": "192.0.2.1, 203.0.113.9"}).status_code == 429


def test_client_address() -> None:
    proxies = parse_networks("10.0.0.0/8, 127.0.0.1")
    assert client_address("10.1.1.1", "1.2.3.4, 5.6.7.8, 10.2.2.2", proxies) == "5.6.7.8"
    assert client_address("192.0.2.9", "1.2.3.4", proxies) == "192.0.2.9"  # not a proxy
    assert client_address("10.1.1.1", "not-an-address", proxies) == "10.1.1.1"
    assert client_address("10.1.1.1", None, ()) == "10.1.1.1"
    with pytest.raises(ValueError, match="--trusted-proxies 'ten'"):
        parse_networks("ten")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_two_replicas_share_sessions_over_http(portal: RunningPortal) -> None:
    """A second portal process on the same store: a cookie from one works on the other, and
    logging out on the second ends it on the first (a rollout or a restart logs nobody out)."""
    import asyncio

    from aiohttp import web

    from mailplane_portal.kube import KubeClient
    from mailplane_portal.web import Portal, build_app

    async def start() -> tuple[web.AppRunner, Records, KubeClient, str]:
        records = Records(dsn=portal.dsn) if portal.dsn else Records(
            sqlite_path=str(portal.db))
        await records.open()
        kube = KubeClient(portal.api.url)
        runner = web.AppRunner(build_app(Portal(portal.portal.store, kube, records)),
                               access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        return runner, records, kube, f"http://localhost:{runner.addresses[0][1]}"

    runner, records, kube, second = asyncio.run_coroutine_threadsafe(
        start(), portal.loop).result(15)
    try:
        s = portal.session("alice-token")
        sid = s.cookies["mailplane_session"]
        me = requests.get(second + "/api/v1/whoami", cookies={"mailplane_session": sid})
        assert me.status_code == 200 and me.json()["username"] == "alice"
        assert me.json()["csrf"] == s.headers["X-CSRF-Token"]
        r = requests.post(second + "/logout", data={"csrf": s.headers["X-CSRF-Token"]},
                          cookies={"mailplane_session": sid}, allow_redirects=False,
                          headers={"Origin": second})
        assert r.status_code == 303
        assert requests.get(portal.url + "/api/v1/whoami",
                            cookies={"mailplane_session": sid}).status_code == 401
    finally:
        async def stop() -> None:
            await runner.cleanup()
            await kube.close()
            await records.close()
        asyncio.run_coroutine_threadsafe(stop(), portal.loop).result(15)


async def test_replicas_starting_together_create_the_tables_once(pg_dsn: str) -> None:
    import asyncio

    many = [Records(dsn=pg_dsn) for _ in range(6)]
    await asyncio.gather(*(r.open() for r in many))
    try:
        assert await SessionStore(many[0]).count() == 0
    finally:
        for r in many:
            await r.close()
