"""`mailplane portal`: the customer portal's server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import sys
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
    p.add_argument("--insecure-cookie", action="store_true",
                   help="leave out the cookie's Secure flag (plain HTTP, not localhost; "
                        "development only)")
    p.add_argument("--session-idle", type=float, default=900, metavar="SECONDS",
                   help="a session ends after this long without a request (default 900)")
    p.add_argument("--session-lifetime", type=float, default=28800, metavar="SECONDS",
                   help="a session ends this long after login (default 28800)")
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


def _cmd_portal(args: argparse.Namespace) -> int:
    from aiohttp import web  # noqa: PLC0415

    from .kube import KubeClient, KubeUnavailable  # noqa: PLC0415
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
    store, records = _store(args)

    async def run() -> None:
        await store.open()
        await records.open()
        await records.fail_interrupted()
        portal = Portal(store, kube, records, secure_cookie=not args.insecure_cookie,
                        sessions=SessionStore(idle=args.session_idle,
                                              lifetime=args.session_lifetime))
        runner = web.AppRunner(build_app(portal), access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        for name in runner.addresses:
            print(f"mailplane portal: serving on http://{name[0]}:{name[1]}/", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()
            await kube.close()
            await records.close()
            await store.close()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0
