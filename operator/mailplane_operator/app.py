"""The operator's composition root: one `Runtime` per process, the handlers bound to it, kopf.

`run` builds the API client, the metrics and the DNS checker, hands them to every handler
module through `handlers.build_registry`, and runs kopf until stopped. Nothing is global: a test
runs several operators (one after another, or side by side) in one process.

With leader election (`OperatorConfig.leader_election`), `run` first waits for the Lease
(`leader.LeaderElector`); only the leader runs kopf. A leader that loses the Lease stops kopf
and `run` raises `LeadershipLost` (the process exits and is restarted as a candidate, so no
state of the lost term is carried over); a clean stop releases the Lease for a rival.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime
from typing import Any

import aiohttp.web
import kopf

from .dnscheck import DnsChecker
from .handlers import build_registry
from .kube import KubeClient
from .leader import LeaderElector
from .metrics import OperatorMetrics
from .runtime import OperatorConfig, Runtime, build_settings


class LeadershipLost(RuntimeError):
    """The Lease went to another replica (or could not be renewed): this one stopped."""


async def _wait_flag(flag: Any) -> None:
    """Wait for an asyncio.Event/Future or a threading.Event."""
    if isinstance(flag, asyncio.Event):
        await flag.wait()
    elif isinstance(flag, asyncio.Future):
        await flag
    else:  # a threading.Event, set from another thread: polled
        while not flag.is_set():  # noqa: ASYNC110 - no asyncio.Event to wait on here
            await asyncio.sleep(0.1)


async def run(config: OperatorConfig, *, metrics: OperatorMetrics | None = None,
              stop_flag: Any = None, ready_flag: Any = None,
              clock: Callable[[], datetime] | None = None,
              liveness_endpoint: str | None = None,
              on_runtime: Callable[[Runtime], Awaitable[None] | None] | None = None) -> None:
    """Run the operator until `stop_flag` is set (or forever)."""
    metrics = metrics if metrics is not None else OperatorMetrics.create()
    stopping = asyncio.Event()
    lost = asyncio.Event()
    helpers: list[asyncio.Task[Any]] = []
    if stop_flag is not None:
        helpers.append(asyncio.create_task(_stop_when(stop_flag, stopping)))
    async with KubeClient(config.credentials) as client:
        elector = None
        try:
            if config.leader_election is not None:
                elector = LeaderElector(client, config.leader_election)
                with _signals_stop(stopping):
                    async with standby_health(liveness_endpoint):
                        if not await elector.acquire(stopping):
                            return  # stopped while waiting
                helpers.append(asyncio.create_task(_lead(elector, stopping, lost)))
            metrics.leader.set(1)
            rt = Runtime(config=config, client=client, metrics=metrics,
                         dns=DnsChecker(config.dns_resolver))
            if clock is not None:
                rt.clock = clock
            if on_runtime is not None:
                maybe = on_runtime(rt)
                if maybe is not None:
                    await maybe
            await kopf.operator(
                registry=build_registry(rt),
                settings=build_settings(config),
                clusterwide=not config.namespaces,
                namespaces=list(config.namespaces),
                stop_flag=stopping,
                ready_flag=ready_flag,
                liveness_endpoint=liveness_endpoint,
            )
        finally:
            metrics.up.set(0)
            metrics.leader.set(0)
            for task in helpers:
                task.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if elector is not None and not lost.is_set():
                await elector.release()
    if lost.is_set():
        raise LeadershipLost("the Lease went to another replica or could not be renewed")


async def _stop_when(flag: Any, stopping: asyncio.Event) -> None:
    await _wait_flag(flag)
    stopping.set()


async def _lead(elector: LeaderElector, stopping: asyncio.Event, lost: asyncio.Event) -> None:
    await elector.keep(stopping)
    if not stopping.is_set():
        lost.set()
        stopping.set()


@contextlib.asynccontextmanager
async def standby_health(endpoint: str | None) -> AsyncIterator[int | None]:
    """While a replica waits for the Lease, kopf (which serves the liveness endpoint) is not
    running: answer the probes here, so that a healthy standby is neither restarted nor kept
    out of a rollout. The port is handed to kopf when this replica starts leading. Yields the
    port bound (None without an endpoint)."""
    if not endpoint:
        yield None
        return
    url = urllib.parse.urlsplit(endpoint)

    async def healthz(_request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"standby": True})

    app = aiohttp.web.Application()
    app.router.add_get(url.path or "/", healthz)
    runner = aiohttp.web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, url.hostname or "0.0.0.0", url.port or 80,
                               reuse_address=True)
    await site.start()
    server: Any = site._server  # aiohttp keeps the listening sockets there
    sockets = server.sockets if server is not None else ()
    try:
        yield int(sockets[0].getsockname()[1]) if sockets else url.port
    finally:
        await runner.cleanup()


@contextlib.contextmanager
def _signals_stop(stopping: asyncio.Event) -> Any:
    """While waiting for the Lease (kopf, which handles them later, is not running yet),
    SIGTERM/SIGINT stop the wait cleanly."""
    loop = asyncio.get_running_loop()
    installed = []
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stopping.set)
                installed.append(sig)
    try:
        yield
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
