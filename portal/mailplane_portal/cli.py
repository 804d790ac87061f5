"""`mailplane portal`: the customer portal's server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
import time
import urllib.parse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]


def register(subparsers: SubParsers) -> None:
    p = subparsers.add_parser(
        "portal", help="run the customer portal (web pages and JSON API)",
        description="The customer portal: each team sees and manages its own mail. Reads the "
                    "relay's store and asks the Kubernetes API who the caller is and what they "
                    "may do (docs/portal.md).")
    store = p.add_mutually_exclusive_group(required=True)
    store.add_argument("--config", metavar="PATH", help="a relay configuration: use its store")
    store.add_argument("--store", metavar="URL", help="a PostgreSQL store: postgresql://... "
                       "or @FILE holding the connection string")
    store.add_argument("--db", metavar="PATH", help="the store's SQLite file")
    p.add_argument("--listen", default="0.0.0.0:8443", metavar="HOST:PORT",
                   help="address to serve on (default 0.0.0.0:8443)")
    p.add_argument("--kube-api", metavar="URL",
                   help="API server URL (default: in-cluster service account)")
    p.add_argument("--kube-token-file", metavar="PATH", help="the portal's own token")
    p.add_argument("--kube-ca", metavar="PATH", help="CA bundle of the API server")
    p.add_argument("--public-url", metavar="URL",
                   help="the portal's URL as browsers see it (https://portal.example); a "
                        "state change must come from this origin (default: the origin of "
                        "--oidc-redirect-url, else the Host each request was sent to)")
    p.add_argument("--insecure-cookie", action="store_true",
                   help="leave out the cookie's Secure flag (plain HTTP, not localhost; "
                        "development only)")
    p.add_argument("--session-idle", type=float, default=900, metavar="SECONDS",
                   help="a session ends after this long without a request (default 900)")
    p.add_argument("--session-lifetime", type=float, default=28800, metavar="SECONDS",
                   help="a session ends this long after login (default 28800)")
    p.add_argument("--audit-address-days", type=float, default=90, metavar="DAYS",
                   help="audit log rows older than this keep who did what, with the addresses "
                        "in them masked (default 90, the message log's retention)")
    oidc = p.add_argument_group(
        "OIDC login", "a redirect login at the issuer the cluster trusts (authorization code "
        "with PKCE); the claims map to a user and groups as the API server's --oidc-* flags do")
    oidc.add_argument("--oidc-issuer", metavar="URL",
                      help="the issuer URL (as in the ID tokens' iss), e.g. https://dex.example")
    oidc.add_argument("--oidc-client-id", metavar="ID", help="the portal's client id there")
    oidc.add_argument("--oidc-client-secret-file", metavar="PATH",
                      help="a file holding the client secret (a mounted Secret)")
    oidc.add_argument("--oidc-redirect-url", metavar="URL",
                      help="https://PORTAL/login/callback, as registered at the issuer")
    oidc.add_argument("--oidc-username-claim", default="sub", metavar="CLAIM",
                      help="the claim naming the user (default sub)")
    oidc.add_argument("--oidc-username-prefix", metavar="PREFIX",
                      help="put before the user name; default ISSUER# unless the claim is "
                           "email; '-' for none (as the API server)")
    oidc.add_argument("--oidc-groups-claim", metavar="CLAIM",
                      help="the claim listing the user's groups (default: no groups)")
    oidc.add_argument("--oidc-groups-prefix", default="", metavar="PREFIX",
                      help="put before each group name")
    oidc.add_argument("--oidc-scopes", default="openid email profile", metavar="SCOPES",
                      help="scopes to ask for, space-separated (default 'openid email "
                           "profile')")
    oidc.add_argument("--oidc-ca-file", metavar="PATH",
                      help="CA bundle for the issuer's TLS (default: the system's)")
    p.add_argument("--login-rate", type=int, default=10, metavar="N",
                   help="login attempts per minute from one client address (default 10)")
    p.add_argument("--login-rate-user", type=int, default=5, metavar="N",
                   help="logins per minute of one user (default 5)")
    p.add_argument("--trusted-proxies", default="", metavar="CIDRS",
                   help="comma-separated proxies (the ingress controller) whose "
                        "X-Forwarded-For names the client; default: none")
    p.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    p.set_defaults(func=_cmd_portal)


def _listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise SystemExit(f"mailplane portal: --listen {value!r}: give HOST:PORT, e.g. "
                         "0.0.0.0:8443")
    return host.strip("[]") or "0.0.0.0", int(port)


def store_for(settings: Any) -> tuple[Any, Any]:
    """The store a relay configuration names, and the portal's records in the same database."""
    from mailplane_relay.store import SqliteBackend  # noqa: PLC0415
    from mailplane_relay.store.factory import read_dsn  # noqa: PLC0415

    from .records import Records  # noqa: PLC0415

    if settings.store.backend == "postgresql":
        from mailplane_relay.store.postgres import PostgresBackend  # noqa: PLC0415

        dsn = read_dsn(settings.store.dsn_file)
        return PostgresBackend(dsn), Records(dsn=dsn)
    return SqliteBackend(settings.message_log.path), Records(
        sqlite_path=settings.message_log.path)


async def start_site(portal: Any, host: str, port: int) -> tuple[Any, int]:
    """Serve ``portal``; the runner (to clean up) and the port bound (``port`` may be 0)."""
    from aiohttp import web  # noqa: PLC0415

    from .web import build_app  # noqa: PLC0415

    runner = web.AppRunner(build_app(portal), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, int(runner.addresses[0][1])


def _store(args: argparse.Namespace) -> tuple[Any, Any]:
    """The store's backend and the portal's own records in the same database."""
    from mailplane_relay.config import load_config  # noqa: PLC0415
    from mailplane_relay.store import SqliteBackend  # noqa: PLC0415
    from mailplane_relay.store.factory import read_dsn  # noqa: PLC0415

    from .records import Records  # noqa: PLC0415

    path: str | None = None
    dsn: str | None = None
    if args.config:
        settings = load_config(args.config).settings
        if settings.store.backend == "postgresql":
            assert settings.store.dsn_file is not None  # the config validator says so
            dsn = read_dsn(settings.store.dsn_file)
        else:
            path = settings.message_log.path
    elif args.db:
        path = str(Path(args.db))
    else:
        dsn = read_dsn(args.store[1:]) if args.store.startswith("@") else args.store
        if not dsn.startswith(("postgresql://", "postgres://")):
            raise SystemExit(f"mailplane portal: --store {args.store!r}: give a postgresql:// "
                             "URL (or @FILE holding one); for a SQLite file use --db PATH")
    if path is not None:
        return SqliteBackend(path), Records(sqlite_path=path)
    from mailplane_relay.store.postgres import PostgresBackend  # noqa: PLC0415

    return PostgresBackend(dsn or ""), Records(dsn=dsn)


log = logging.getLogger(__name__)
UPKEEP_EVERY = 3600.0  # seconds between two rounds of the portal's own retention


async def _upkeep(portal: Any, address_retention: float) -> None:
    """Hourly: expired sessions go (not only when someone logs in), and old audit rows lose
    the addresses in them."""
    while True:
        try:
            await portal.sessions.purge()
            masked = await portal.records.mask_old_audit(time.time() - address_retention)
            if masked:
                log.info("audit log: addresses masked in %d rows past retention", masked)
        except Exception as exc:  # the store not answering: next round
            log.warning("portal upkeep: %s", type(exc).__name__)
        await asyncio.sleep(UPKEEP_EVERY)


def _cmd_portal(args: argparse.Namespace) -> int:
    from aiohttp import web  # noqa: PLC0415

    from .kube import KubeClient, KubeUnavailable  # noqa: PLC0415
    from .oidc import OidcClient, OidcSettings  # noqa: PLC0415
    from .ratelimit import Limiter, parse_networks  # noqa: PLC0415
    from .sessions import SessionStore  # noqa: PLC0415
    from .web import Portal, build_app  # noqa: PLC0415

    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    host, port = _listen(args.listen)
    try:
        kube = (KubeClient(args.kube_api, token_file=args.kube_token_file, ca_file=args.kube_ca)
                if args.kube_api else KubeClient.in_cluster())
    except KubeUnavailable as exc:
        print(f"mailplane portal: {exc}", file=sys.stderr)
        return 2
    oidc_args = (args.oidc_issuer, args.oidc_client_id, args.oidc_client_secret_file,
                 args.oidc_redirect_url)
    settings = None
    try:
        if any(oidc_args):
            if not all(oidc_args):
                raise ValueError("OIDC login needs all of --oidc-issuer, --oidc-client-id, "
                                 "--oidc-client-secret-file and --oidc-redirect-url")
            settings = OidcSettings.from_args(
                issuer=args.oidc_issuer, client_id=args.oidc_client_id,
                client_secret_file=args.oidc_client_secret_file,
                redirect_url=args.oidc_redirect_url, username_claim=args.oidc_username_claim,
                username_prefix=args.oidc_username_prefix, groups_claim=args.oidc_groups_claim,
                groups_prefix=args.oidc_groups_prefix, scopes=args.oidc_scopes,
                ca_file=args.oidc_ca_file)
        if args.public_url is not None:
            parsed = urllib.parse.urlsplit(args.public_url)
            if parsed.scheme not in ("https", "http") or not parsed.hostname:
                raise ValueError(f"--public-url {args.public_url!r}: give the portal's URL "
                                 "as browsers see it, e.g. https://portal.example")
        trusted = parse_networks(args.trusted_proxies)
        by_address = Limiter(burst=args.login_rate, per_minute=args.login_rate)
        by_user = Limiter(burst=args.login_rate_user, per_minute=args.login_rate_user)
    except ValueError as exc:
        print(f"mailplane portal: {exc}", file=sys.stderr)
        return 2
    store, records = _store(args)

    async def run() -> None:
        await store.open()
        await records.open()
        await records.fail_interrupted()
        oidc = OidcClient(settings) if settings is not None else None
        portal = Portal(store, kube, records, secure_cookie=not args.insecure_cookie,
                        sessions=SessionStore(records, idle=args.session_idle,
                                              lifetime=args.session_lifetime),
                        oidc=oidc, login_by_address=by_address, login_by_user=by_user,
                        trusted_proxies=trusted, public_url=args.public_url)
        upkeep = asyncio.create_task(_upkeep(portal, args.audit_address_days * 86400))
        runner = web.AppRunner(build_app(portal), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        for name in runner.addresses:
            print(f"mailplane portal: serving on http://{name[0]}:{name[1]}/", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            upkeep.cancel()
            await runner.cleanup()
            if oidc is not None:
                await oidc.close()
            await kube.close()
            await records.close()
            await store.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
