"""The composition root: builds every relay component, runs it, reloads it, stops it.

One process (``workers: 1``) runs everything on one event loop. With ``workers: N`` a supervisor
process starts N worker processes that share the SMTP ports (SO_REUSEPORT: the kernel spreads
connections), each with its own spool subdirectory (``<spool>/w<i>``) so that no two processes
ever touch the same message, all appending to the same message log. Workers write their metrics
through prometheus_client's multiprocess mode; the supervisor serves ``/metrics``, ``/livez``
and ``/readyz`` for the pod, forwards SIGTERM and restarts a worker that dies.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, multiprocess

from . import verp
from .config import (
    ConfigError,
    IntakeSettings,
    RelayConfig,
    RelaySettings,
    config_fingerprint,
    domain_of,
    load_config,
)
from .control import ControlError, ControlServer, control_dir, remove_stale_sockets, socket_path
from .delivery import DeliveryQueue
from .drain import (
    MAX_HANDOFF_BODY,
    ORDER_NAME,
    AdminEndpoints,
    Drainer,
    HandoffLedger,
    Siblings,
)
from .http import AdminServer, OpsServer, Readiness
from .ingress import SubmissionServer
from .ingress.throttle import AuthThrottle
from .intake.listener import IntakeHandler, IntakeServer
from .metrics import RelayMetrics, WorkerFilesCollector
from .ratelimit import Limiter
from .reputation import Reputation
from .revocation import FILE_NAME as REVOCATIONS_FILE
from .revocation import Revocations
from .rotation import FILE_NAME as ROTATIONS_FILE
from .rotation import Rotations, parse_push
from .spool import Spool, SpoolErasure, SpoolError, adopt
from .spool import count_messages as spool_count_messages
from .store import LogQuery, MessageLog, StoreBackend, SuppressionList
from .store.erasure import POLL_INTERVAL as ERASURE_POLL_INTERVAL
from .store.erasure import carry_out_requests
from .store.factory import backend_for, buffer_directory
from .store.health import StoreHealth
from .tlsctx import ReloadingTLS
from .webhooks import OutboxMaker, WebhookDispatcher

log = logging.getLogger(__name__)

RELOAD_POLL_INTERVAL = 1.0
MIN_PURGE_INTERVAL = 1.0
# After SIGTERM the delivery queue gets what is left of shutdownGrace, and at least this much,
# to finish attempts in flight (an unfinished attempt is simply retried after a restart).
MIN_QUEUE_STOP = 2.0
WORKER_RESTART_BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0)
# A worker that lived this long before dying is restarted without the crash-loop backoff.
WORKER_HEALTHY_AFTER = 60.0
_READY_FILE = "ready-w{index}"
# Settings read once at start: a change needs a restart, and the reload log says so.
_RESTART_ONLY = ("listeners", "http", "spool", "message_log", "store", "workers")
# Suppression changes are kept this long for the caches to catch up; a cache further behind
# reloads the whole list. Trimmed by age: an address leaves the change log within a day.
SUPPRESSION_CHANGES_RETENTION = 86400.0
SHARED_STATE_SYNC_INTERVAL = 5.0


@dataclass(frozen=True)
class WorkerSpec:
    """What the supervisor tells one worker process (passed as JSON on its command line)."""

    index: int
    listener_ports: dict[str, int] = field(default_factory=dict)
    state_dir: str = ""
    purge: bool = False
    supervisor_pid: int = 0

    def to_json(self) -> str:
        return json.dumps({"index": self.index, "listener_ports": self.listener_ports,
                           "state_dir": self.state_dir, "purge": self.purge,
                           "supervisor_pid": self.supervisor_pid})

    @classmethod
    def from_json(cls, raw: str) -> WorkerSpec:
        doc = json.loads(raw)
        return cls(index=int(doc["index"]), listener_ports=dict(doc["listener_ports"]),
                   state_dir=str(doc["state_dir"]), purge=bool(doc["purge"]),
                   supervisor_pid=int(doc.get("supervisor_pid", 0)))


class SpoolInUseError(Exception):
    """Another live process holds the spool directory."""


def _lock_spool(directory: str) -> int:
    """Hold an exclusive lock on the spool directory for the life of the process.

    Two processes recovering the same spool would deliver every message twice; the kernel drops
    the lock when the holder dies, even by SIGKILL, so a restart never waits on a stale one."""
    Path(directory).mkdir(parents=True, exist_ok=True)
    fd = os.open(os.path.join(directory, ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise SpoolInUseError(
            f"spool directory {directory} is in use by another relay process (pid {holder}); "
            "each relay needs its own spool.directory"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    return fd


async def _feed_recovered(spool: Spool, queue: DeliveryQueue, spool_dir: str) -> None:
    """Hand the spooled messages to the delivery queue batch by batch, oldest first (queue
    ids and due times: envelopes are read again when their messages fall due)."""
    started = time.monotonic()
    count = 0
    async for batch in spool.recover():
        queue.schedule(batch)
        count += len(batch)
    if count:
        log.info("spool %s: recovered %d messages in %.1fs", spool_dir, count,
                 time.monotonic() - started)


def _orphan_dirs(root: Path, workers: int, index: int | None) -> list[Path]:
    """Spool directories that no worker of this layout owns and that ``index`` adopts.

    ``workers: 1`` spools in ``root`` itself and adopts every ``root/w<j>``. With ``workers:
    N`` worker ``i`` spools in ``root/w<i>`` and adopts ``root/w<j>`` for ``j >= N`` with
    ``j mod N == i``; worker 0 also adopts the messages in ``root`` (from ``workers: 1``)."""
    found: list[tuple[int, Path]] = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in os.scandir(root):
            name = entry.name
            if name[:1] == "w" and name[1:].isdigit() and entry.is_dir(follow_symlinks=False):
                found.append((int(name[1:]), Path(entry.path)))
    found.sort()
    if index is None:
        return [path for _, path in found]
    mine = [path for j, path in found if j >= workers and j % workers == index]
    return [root, *mine] if index == 0 else mine


def _adopt_orphans(root: Path, workers: int, index: int | None, fsync: bool) -> int:
    """Move the mail of orphaned spool directories into this process's own (locked, not yet
    recovered) spool; returns how many messages stay orphaned (their directory is locked by
    a live process, which delivers them)."""
    own = root if index is None else root / f"w{index}"
    stranded = 0
    for source in _orphan_dirs(root, workers, index):
        try:
            fd = _lock_spool(str(source))
        except SpoolInUseError as exc:
            log.warning("spool: cannot adopt %s yet: %s", source, exc)
            stranded += spool_count_messages(source)
            continue
        try:
            adopt(source, own, fsync=fsync, remove_source=source != root)
        finally:
            os.close(fd)
    return stranded


def _adopt_store_buffers(root: Path, workers: int, index: int) -> int:
    """Store buffers of worker indexes this layout no longer runs (fewer workers than before),
    by the rule of ``_orphan_dirs``: their log rows move into this worker's buffer and are
    replayed with its own, and their suppression cache is deleted (a stale copy would keep
    addresses erased or purged since, on the volume, for good). Returns the files moved."""
    own = root / f"w{index}" / "log"
    moved = 0
    for source in _orphan_dirs(root, workers, index):
        if source == root:
            continue
        logs = source / "log"
        with contextlib.suppress(FileNotFoundError):
            for name in sorted(os.listdir(logs)):
                if name.endswith(".jsonl"):
                    own.mkdir(parents=True, exist_ok=True)
                    os.replace(logs / name, own / name)
                    moved += 1
                else:
                    (logs / name).unlink(missing_ok=True)
            logs.rmdir()
        for name in ("suppression.json", "suppression.tmp"):
            (source / name).unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            source.rmdir()
    return moved


_STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})


def _die_with_parent() -> None:
    """Ask Linux to send SIGTERM to this worker when the supervisor dies, so an orphaned worker
    drains and exits instead of holding the ports and its spool for a new supervisor."""
    pr_set_pdeathsig = 1
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)


def _with_listener_ports(cfg: RelayConfig, ports: dict[str, int]) -> RelayConfig:
    if not ports:
        return cfg
    listeners = tuple(
        lst.model_copy(update={"port": ports.get(lst.name, lst.port)})
        for lst in cfg.settings.listeners
    )
    settings = cfg.settings.model_copy(update={"listeners": listeners})
    return RelayConfig(settings=settings, source_hash=cfg.source_hash)


COMPLAINT_REASON = "complaint"


async def _export_paused(reputation: Reputation, metrics: RelayMetrics) -> None:
    """Keep the paused-credentials gauge current (pauses lift by themselves as time passes,
    so this is polled rather than set on events)."""
    while True:
        metrics.credentials_paused.set(reputation.paused_count())
        metrics.credentials_paused_complaints.set(reputation.paused_count("complaint"))
        await asyncio.sleep(10.0)


async def _try(step: Awaitable[None], health: StoreHealth, operation: str) -> None:
    """A store step at start: a store that does not answer is noted, never fatal."""
    try:
        await step
    except Exception as exc:
        health.failed(operation, exc)
    else:
        health.ok(operation)


async def _sync_shared_state(limiter: Limiter, reputation: Reputation,
                             health: StoreHealth) -> None:
    """Every few seconds: note this worker alive (the limits' local share) and exchange the
    bounce-rate counts with the store."""
    while True:
        await asyncio.sleep(SHARED_STATE_SYNC_INTERVAL)
        await _try(limiter.heartbeat(), health, "limits")
        await _try(reputation.sync(), health, "reputation")


async def _close_fd(fd: int) -> None:
    os.close(fd)


class _Tasks:
    """Named background tasks owned by the app: a task that fails is logged and stops the app."""

    def __init__(self, on_failure: Callable[[BaseException], None]) -> None:
        self._tasks: list[asyncio.Task[None]] = []
        self._on_failure = on_failure

    def spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._done)
        self._tasks.append(task)

    def _done(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.error("background task %s failed", task.get_name(), exc_info=exc)
            self._on_failure(exc)

    async def cancel_all(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()


class RelayApp:
    """One relay process: config, metrics, message log, suppression, spool, delivery, SMTP."""

    def __init__(self, config_path: str, *, worker: WorkerSpec | None = None,
                 initial_config: RelayConfig | None = None) -> None:
        self.config_path = config_path
        self.worker = worker
        self._initial = initial_config
        self._config: RelayConfig | None = None
        self._fingerprint = config_fingerprint(config_path)
        self._stop = asyncio.Event()
        self._failure: BaseException | None = None
        # One registry per process, made here and handed to every component.
        self.registry = CollectorRegistry()
        self.metrics = RelayMetrics.create(self.registry)
        self.readiness = Readiness(on_change=self._readiness_changed)
        self.http: OpsServer | None = None
        self.admin_http: AdminServer | None = None
        self.revocations: Revocations | None = None
        self.rotations: Rotations | None = None
        self._mounted: RelayConfig | None = None
        self.admin = AdminEndpoints()
        self.drainer: Drainer | None = None
        self.server: SubmissionServer | None = None
        self.intake: IntakeServer | None = None
        self.queue: DeliveryQueue | None = None
        self.spool: Spool | None = None
        self.tls: ReloadingTLS | None = None
        self.message_log: MessageLog | None = None
        self.store: StoreBackend | None = None
        self.store_health: StoreHealth | None = None
        self._tenants: tuple[str, dict[str, str]] = ("", {})
        self._queue_deadline: float | None = None
        self.webhooks: WebhookDispatcher | None = None
        self._outbox = OutboxMaker(self.config)

    # ---- the config callable every component reads --------------------------------------

    def config(self) -> RelayConfig:
        assert self._config is not None, "config() called before the app loaded it"
        return self._config

    def revoke(self, username: str) -> bool:
        """Refuse `username` from now on (AUTH and open sessions), ahead of the mounted
        configuration (revocation.py). True once it is refused here."""
        assert self.revocations is not None and self.rotations is not None
        assert self._mounted is not None
        held = self.rotations.held(username)
        self.revocations.revoke(username, self._mounted, held.hashes() if held else ())
        self.rotations.forget(username)
        self._config = self._effective(self._mounted)
        return username not in self._config.credentials

    def push_password(self, doc: object) -> tuple[str, int]:
        """Run a rotated password ahead of the mounted configuration (rotation.py): the
        username and the serial in force for it. ValueError for a malformed push, PushRefused
        for a credential this relay does not serve."""
        assert self.revocations is not None and self.rotations is not None
        assert self._mounted is not None
        username, pushed = parse_push(doc)
        serial = self.rotations.push(username, pushed, self.revocations.apply(self._mounted))
        self._config = self._effective(self._mounted)
        return username, serial

    def _effective(self, mounted: RelayConfig) -> RelayConfig:
        """The mounted configuration without what was revoked, with what was rotated, both
        pushed ahead of it."""
        if self.revocations is None or self.rotations is None:
            return mounted
        return self.rotations.apply(self.revocations.apply(mounted))

    def request_stop(self) -> None:
        self._stop.set()

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc
        self._stop.set()

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Start, serve until SIGTERM/SIGINT (or ``request_stop``), stop in stages."""
        loop = asyncio.get_running_loop()
        if self.worker is not None:
            _die_with_parent()
            if self.worker.supervisor_pid and os.getppid() != self.worker.supervisor_pid:
                log.error("worker %d: the supervisor is gone; not starting", self.worker.index)
                return
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        if self.worker is not None:
            # The supervisor starts workers with these signals blocked, so one that arrives
            # during start-up waits for the handlers above instead of killing the worker.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
        stages: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        tasks = _Tasks(self._fail)
        try:
            await self._start(stages, tasks)
            if not self._stop.is_set():
                log.info("relay ready (config hash %s, event loop %s)",
                         self.config().source_hash, type(loop).__module__.split(".")[0])
            await self._stop.wait()
        finally:
            log.info("relay stopping")
            self.readiness.shutting_down()
            await tasks.cancel_all()
            first = await self._run_stages(stages)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        failure = self._failure or first
        if failure is not None:
            raise failure
        log.info("relay stopped")

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self._stop.is_set():
            log.info("received %s: draining", sig.name)
        self._stop.set()

    async def _run_stages(
        self, stages: list[tuple[str, Callable[[], Awaitable[None]]]]
    ) -> BaseException | None:
        first: BaseException | None = None
        for name, stop in reversed(stages):
            try:
                await stop()
            except Exception as exc:
                log.error("stopping %s failed", name, exc_info=exc)
                first = first or exc
        return first

    async def _start(
        self, stages: list[tuple[str, Callable[[], Awaitable[None]]]], tasks: _Tasks
    ) -> None:
        worker = self.worker
        cfg = self._initial
        if cfg is None:
            cfg = await asyncio.to_thread(load_config, self.config_path)
        self._config = _with_listener_ports(cfg, worker.listener_ports if worker else {})
        self._mounted = self._config
        settings = self._config.settings
        if worker is None and settings.admin is not None:
            # Revocations the operator pushed ahead of the mounted configuration (kept across a
            # restart: the mounted render may still be the stale one).
            self.revocations = Revocations(
                Path(settings.message_log.path).parent / REVOCATIONS_FILE)
            self.revocations.prune(self._mounted)
            self.rotations = Rotations(
                Path(settings.message_log.path).parent / ROTATIONS_FILE)
            self.rotations.prune(self._mounted)
            self._config = self._effective(self._mounted)
            self.admin.revoke = self.revoke
            self.admin.push_password = self.push_password
        metrics = self.metrics
        metrics.ready.set(0)
        self._count_config_load(None)
        self.readiness.mark("config loaded")

        if worker is None:
            self.http = OpsServer(address=settings.http.address, port=settings.http.port,
                                  readiness=self.readiness, registry=self.registry)
            await self.http.start()
            stages.append(("ops http", self.http.stop))

        backend = backend_for(settings)
        await backend.open()
        stages.append(("store", backend.close))
        self.store = backend
        health = StoreHealth.create(self.registry, backend.description)
        self.store_health = health
        local_dir = buffer_directory(settings) / (f"w{worker.index}" if worker else "w0")
        if backend.shared:
            await asyncio.to_thread(_adopt_store_buffers, buffer_directory(settings),
                                    settings.workers, worker.index if worker else 0)
        msglog = MessageLog(backend, flush_interval=settings.message_log.flush_interval,
                            metrics=metrics, tenant_of=self._tenant_of, health=health,
                            outbox_of=self._outbox,
                            buffer_dir=str(local_dir / "log") if backend.shared else None)
        await msglog.start()
        stages.append(("message log", msglog.close))
        self.message_log = msglog

        counts_for_pool = worker is None or worker.index == 0
        suppression = SuppressionList(
            backend, metrics, export_gauge=counts_for_pool, health=health,
            on_added=self._count_complaints if counts_for_pool else None,
            cache_file=str(local_dir / "suppression.json") if backend.shared else None)
        await suppression.start()
        stages.append(("suppression list", suppression.close))

        spool_dir = settings.spool.directory
        if worker is not None:
            spool_dir = str(Path(spool_dir) / f"w{worker.index}")
        lock_fd = await asyncio.to_thread(_lock_spool, spool_dir)
        stages.append(("spool lock", lambda: _close_fd(lock_fd)))
        orphaned = await asyncio.to_thread(
            _adopt_orphans, Path(settings.spool.directory), settings.workers,
            worker.index if worker is not None else None, settings.spool.fsync)
        metrics.spool_orphaned_messages.set(orphaned)
        spool = Spool(spool_dir, fsync=settings.spool.fsync, metrics=metrics,
                      corrupt_retention=settings.spool.corrupt_retention)
        # The spool is listed only; envelopes are read in the background (below), so a large
        # queue does not hold back accepting mail.
        await spool.start(lazy=True)
        stages.append(("spool", spool.close))
        self.spool = spool
        # Read before any recovered message is delivered: a hand-off whose ledger line was cut
        # by a crash counts as taken when its message file is listed.
        ledger = HandoffLedger(spool_dir, fsync=settings.spool.fsync)
        await asyncio.to_thread(ledger.open, spool.queue_ids())
        stages.append(("hand-off ledger", lambda: asyncio.to_thread(ledger.close)))
        self.readiness.mark("spool recovered")

        # Pauses and limits are the store's (shared by the pod's workers, or by the pool), so
        # they hold across processes and survive a restart.
        reputation = Reputation(lambda: self.config().settings.abuse, store=backend)
        await _try(reputation.sync(), health, "reputation")
        # Stopped after the delivery queue: its last outcomes reach the store.
        stages.append(("reputation", lambda: _try(reputation.sync(), health, "reputation")))
        queue = DeliveryQueue(config=self.config, spool=spool, log=msglog,
                              suppression=suppression, metrics=metrics, reputation=reputation,
                              on_failure=self._fail, shared_dir=settings.spool.directory,
                              reports_shared=worker is None or worker.index == 0)
        order_path = Path(settings.spool.directory) / ORDER_NAME
        if await asyncio.to_thread(order_path.exists):
            # Restarted while draining: a message may be at a peer already (handed off, the
            # relay stopped before removing its copy); nothing is delivered here (drain.py).
            queue.pause()
        await queue.start([])
        self.queue = queue
        stages.append(("delivery queue", self._stop_queue))
        tasks.spawn("spool-recovery", _feed_recovered(spool, queue, spool_dir))
        control = ControlServer(
            socket_path(settings.spool.directory, worker.index if worker is not None else 0),
            queue=queue, spool=spool)
        try:
            await control.start()
        except (ControlError, OSError) as exc:
            # Mail flows without it; only `mailplane queue` cannot reach this process.
            log.error("queue administration socket not available: %s", exc)
        else:
            stages.append(("queue administration socket", control.close))
            if worker is None or worker.index == 0:
                # Sockets of workers the layout no longer has (after `workers` was lowered).
                await asyncio.to_thread(remove_stale_sockets,
                                        control_dir(settings.spool.directory), settings.workers)

        tls = ReloadingTLS(self.config)
        await tls.start()
        stages.append(("tls", tls.close))
        self.tls = tls

        shared_limits = backend.shared or settings.workers > 1
        # One id per spool, the same after a restart (the pod's name and its spool directory):
        # a worker that crashed and came back is not taken for a second worker that is down.
        peer_id = f"{socket.gethostname()}:{spool_dir}"
        limiter = Limiter(self.config, pool=backend if shared_limits else None,
                          lease_size=settings.store.lease_size, peer_id=peer_id)
        await _try(limiter.heartbeat(), health, "limits")
        stages.append(("unused limits", limiter.give_back_unused))
        # Stopping with an empty spool: not waited for by erasure requests, not counted in the
        # limits' share. A spool still holding messages (a restart, not a drained scale-down)
        # keeps the worker listed: an erasure meanwhile waits for it (it carries the request
        # out when back) or is reported incomplete, never complete while its spool names the
        # address.
        async def leave_pool() -> None:
            if await asyncio.to_thread(spool_count_messages, spool_dir) == 0:
                await _try(backend.peer_gone(peer_id), health, "limits")

        stages.append(("store peer", leave_pool))
        server = SubmissionServer(config=self.config, tls=tls, spool=spool, queue=queue,
                                  log=msglog, suppression=suppression, limiter=limiter,
                                  metrics=metrics, reputation=reputation,
                                  auth_throttle=AuthThrottle(lambda: self.config().settings.limits))
        self.server = server
        await server.start()
        stages.append(("smtp server", self._drain_server))
        # Every process drains its own spool; the first one serves the admin port and passes
        # drain orders to the others over their control sockets.
        self.drainer = Drainer(config=self.config, spool=spool, queue=queue,
                               listeners=server, readiness=self.readiness,
                               registry=self.registry, ledger=ledger,
                               order_path=order_path, fsync=settings.spool.fsync)
        await self.drainer.restore()
        control.drainer = self.drainer
        stages.append(("drain", self.drainer.stop_task))
        if worker is None or worker.index == 0:
            self.admin.drainer = self.drainer
            if worker is not None and settings.workers > 1:
                self.admin.siblings = Siblings(settings.spool.directory, settings.workers)
            if settings.admin is not None:
                # HTTPS with the listeners' live context: the token, the drain orders and the
                # handed-off messages never cross the network in clear text.
                # With workers, the port the supervisor resolved and holds (SO_REUSEPORT).
                admin_port = (worker.listener_ports.get("admin", settings.admin.port)
                              if worker is not None else settings.admin.port)
                self.admin_http = AdminServer(
                    address=settings.admin.address, port=admin_port,
                    routes=self.admin.routes(), context=tls.context, max_body=MAX_HANDOFF_BODY,
                    reuse_port=worker is not None)
                await self.admin_http.start()
                stages.append(("admin https", self.admin_http.stop))
        bound = server.bound_ports
        # The intake listener runs in one process per pod (reports are few): the first worker.
        if settings.intake is not None and (worker is None or worker.index == 0):
            intake = await self._start_intake(settings.intake, suppression=suppression,
                                              reputation=reputation, queue=queue,
                                              msglog=msglog, tls=tls)
            stages.append(("intake listener", intake.stop))
            bound["intake"] = intake.port
        if self.http is not None:
            bound["http"] = self.http.port
        if self.admin_http is not None:
            bound["admin"] = self.admin_http.port
        # Every port this process bound (port 0 resolved): what a harness starting the relay
        # on port 0 reads.
        log.info("listening: %s", " ".join(f"{k}={v}" for k, v in sorted(bound.items())))
        self.readiness.mark("listeners bound")

        tasks.spawn("config-reload", self._watch_config())
        tasks.spawn("reputation-gauge", _export_paused(reputation, metrics))
        tasks.spawn("store-sync", _sync_shared_state(limiter, reputation, health))
        tasks.spawn("erasure", self._erasure_loop(backend, health, peer_id))
        webhooks = WebhookDispatcher(backend, self.config, self.registry, peer_id, health)
        self.webhooks = webhooks
        stages.append(("webhooks", webhooks.close))
        tasks.spawn("webhooks", webhooks.run())
        if worker is None or worker.purge:
            tasks.spawn("retention-purge", self._purge_loop(msglog))

    async def _start_intake(self, settings: IntakeSettings, *, suppression: SuppressionList,
                            reputation: Reputation, queue: DeliveryQueue, msglog: MessageLog,
                            tls: ReloadingTLS) -> IntakeServer:
        keys = verp.KeyFile()
        try:
            keys.get(settings.key_file)
        except verp.VERPKeyError as exc:
            raise ConfigError(str(exc)) from None

        def key() -> bytes:
            intake = self.config().settings.intake
            return keys.get(intake.key_file if intake is not None else settings.key_file)

        handler = IntakeHandler(config=self.config, key=key, log=msglog,
                                suppression=suppression, metrics=self.metrics,
                                reputation=reputation, hard_bounce=queue.hard_bounce,
                                domain_complaints=msglog.backend.domain_complaints_add)
        intake = IntakeServer(config=self.config, tls=tls, handler=handler,
                              metrics=self.metrics)
        port = self.worker.listener_ports.get("intake") if self.worker else None
        # With workers the supervisor holds the port (SO_REUSEPORT) across worker restarts.
        await intake.start(port=port, reuse_port=self.worker is not None)
        self.intake = intake
        return intake

    def _readiness_changed(self, ready: bool) -> None:
        self.metrics.ready.set(1 if ready else 0)
        if self.worker is not None and self.worker.state_dir:
            marker = Path(self.worker.state_dir) / _READY_FILE.format(index=self.worker.index)
            if ready:
                marker.touch()
            else:
                marker.unlink(missing_ok=True)

    async def _drain_server(self) -> None:
        assert self.server is not None
        deadline = time.monotonic() + self.config().settings.shutdown_grace
        await self.server.stop_accepting()
        active = self.server.active_sessions
        if active:
            log.info("waiting up to %.0fs for %d open sessions",
                     deadline - time.monotonic(), active)
        await self.server.drain(deadline)
        self._queue_deadline = max(deadline, time.monotonic() + MIN_QUEUE_STOP)

    async def erase_from_spool(self, address: str) -> SpoolErasure:
        """Erase ``address`` from this process's spool (pending messages it sent are deleted,
        it is removed from the recipients of the others) and from the delivery schedule;
        durable when this returns. Each worker process runs it for its own spool."""
        if self.spool is None or self.queue is None:
            raise SpoolError("the relay is not running")
        result = await self.spool.erase_address(address)
        for queue_id in result.deleted_ids:
            self.queue.forget(queue_id)
        return result

    async def _erasure_loop(self, backend: StoreBackend, health: StoreHealth,
                            peer_id: str) -> None:
        """Carry out the pool's erasure requests on this process's spool (store/erasure.py)."""

        async def erase_spool(address: str) -> dict[str, int]:
            result = await self.erase_from_spool(address)
            held = 0
            if self.message_log is not None:
                # Rows held here reach the final erase, or are left out now when they name
                # the address (recorded before the request).
                held = await self.message_log.drain()
            counts = {"spool_recipients_removed": result.recipients_removed,
                      "spool_messages_deleted": result.messages_deleted}
            if held:
                counts["message_log_held"] = held
            return counts

        while True:
            try:
                done = await carry_out_requests(backend, peer_id, erase_spool)
            except Exception as exc:
                health.erasures.labels("failure").inc()
                health.failed("erasure", exc)
            else:
                if done:
                    health.erasures.labels("success").inc(done)
                health.ok("erasure")
            await asyncio.sleep(ERASURE_POLL_INTERVAL)

    async def _stop_queue(self) -> None:
        assert self.queue is not None
        deadline = self._queue_deadline or time.monotonic() + MIN_QUEUE_STOP
        await self.queue.stop(deadline)

    # ---- hot reload ---------------------------------------------------------------------

    def _count_config_load(self, old: RelayConfig | None) -> None:
        new = self.config()
        if old is not None:
            # Zero first: in multiprocess mode remove() forgets the child but its last value
            # stays in the worker's metrics file, and the old hash would still read 1.
            self.metrics.config_info.labels(hash=old.source_hash).set(0)
            with contextlib.suppress(KeyError):
                self.metrics.config_info.remove(old.source_hash)
        self.metrics.config_info.labels(hash=new.source_hash).set(1)
        self.metrics.config_reloads.labels(result="success").inc()
        self.metrics.config_last_reload_success.set(time.time())

    def _tenant_of(self, credential: str | None) -> str | None:
        """The namespace of a credential's SmtpCredential (owner "namespace/name")."""
        if credential is None:
            return None
        cfg = self.config()
        if self._tenants[0] != cfg.source_hash:
            self._tenants = (cfg.source_hash, {
                c.username: c.owner.partition("/")[0]
                for c in cfg.settings.credentials if c.owner and "/" in c.owner})
        return self._tenants[1].get(credential)

    async def _count_complaints(self, added: list[tuple[str, str]]) -> None:
        """Count complaints recorded on the suppression list (`mailplane suppression add ADDRESS
        --reason complaint`, by hand or from a feedback-loop processor) against the sender that
        last delivered to that address, as the message log knows it."""
        complained = [address for address, reason in added if reason == COMPLAINT_REASON]
        if not complained:
            return
        cfg = self.config()
        assert self.message_log is not None
        for address in complained:
            # Every pod's feed sees the entry; the one that claims it counts it, once per pool.
            # Complaints the intake received were counted there and are never claimable.
            if not await self.message_log.backend.suppression_claim(address):
                continue
            rows = await self.message_log.query(
                LogQuery(recipient=address, status="delivered", limit=1))
            if not rows:
                log.info("complaint for an address with no delivery on record; not attributed")
                continue
            events = self._outbox.complaint(address, rows[0])
            if events:
                try:
                    await self.message_log.backend.webhook_enqueue(events)
                except Exception:
                    log.exception("complaint: could not queue its webhook events")
            domain = domain_of(str(rows[0]["sender"]))
            self.metrics.complaints.labels(
                domain if domain in cfg.domains else "other",
                rows[0]["credential"] or "none").inc()

    async def _watch_config(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL_INTERVAL)
            current = config_fingerprint(self.config_path)
            if current == self._fingerprint:
                continue
            self._fingerprint = current
            try:
                await self.reload()
            except Exception:
                # A bug in applying a valid config must not take down a relay that works.
                self.metrics.config_reloads.labels(result="failure").inc()
                log.exception("configuration reload failed while applying it")

    async def reload(self) -> bool:
        """Load the configuration again; apply it if valid, else keep the one in force."""
        old = self.config()
        try:
            new = await asyncio.to_thread(load_config, self.config_path)
        except ConfigError as exc:
            self.metrics.config_reloads.labels(result="failure").inc()
            problem = str(exc).replace("\n", "; ")
            log.error("configuration reload rejected, keeping hash %s: %s",
                      old.source_hash, problem)
            return False
        if self.worker is not None:
            new = _with_listener_ports(new, self.worker.listener_ports)
        if new.source_hash == old.source_hash:
            return True
        self._mounted = new
        if self.revocations is not None and self.rotations is not None:
            self.revocations.prune(new)
            self.rotations.prune(new)
            new = self._effective(new)
        self._config = new
        self._count_config_load(old)
        for name in _RESTART_ONLY:
            if getattr(new.settings, name) != getattr(old.settings, name):
                log.warning("configuration: a change of %s takes effect at the next restart",
                            name)
        if self.queue is not None:
            self.queue.reconfigure()
        if self.tls is not None and old.settings.tls != new.settings.tls:
            await self.tls.reload()
        log.info("configuration reloaded (hash %s)", new.source_hash)
        return True

    # ---- retention ----------------------------------------------------------------------

    async def _purge_loop(self, msglog: MessageLog) -> None:
        while True:
            retention = self.config().settings.retention
            health = self.store_health
            assert health is not None
            health.retention.labels("message_log").set(retention.message_log)
            health.retention.labels("suppression").set(retention.suppression)
            health.purge_interval.set(retention.purge_interval)
            try:
                now = time.time()
                # Account closure: the tenants are the namespaces of the credentials served (a
                # configuration of credentials from no namespace has none, and closes none).
                tenants = {c.namespace for c in self.config().settings.credentials
                           if c.namespace is not None}
                await msglog.purge(now=now,
                                   message_log_retention=retention.message_log,
                                   suppression_retention=retention.suppression,
                                   changes_retention=SUPPRESSION_CHANGES_RETENTION,
                                   open_namespaces=tenants or None)
                # The proof of the retention promise: the oldest row left, right after a purge.
                oldest = await msglog.backend.oldest_event()
                health.oldest_record_age.set(0 if oldest is None else max(0.0, now - oldest))
                for table, ts in (await msglog.backend.oldest_records()).items():
                    health.oldest_by_table.labels(table).set(
                        0 if ts is None else max(0.0, now - ts))
            except Exception as exc:
                health.purge_runs.labels("failure").inc()
                health.failed("purge", exc)
                log.exception("retention purge failed; it runs again at the next interval")
            else:
                health.purge_runs.labels("success").inc()
                health.ok("purge")
            await asyncio.sleep(max(retention.purge_interval, MIN_PURGE_INTERVAL))


# -------------------------------------------------------------------------------------------
# Several worker processes
# -------------------------------------------------------------------------------------------


def _reserve_port(address: str) -> socket.socket:
    """A free port, held by a socket bound with SO_REUSEPORT and never listening: the workers
    bind it too (with SO_REUSEPORT, as they do), no other program can take it between the
    pick and their bind or while a worker restarts, and the kernel hands connections only to
    the workers' listening sockets. The supervisor closes it when it stops. Not SO_REUSEADDR:
    with it, any server setting SO_REUSEADDR (most do) could bind the port while it is not
    listening."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((address if address != "0.0.0.0" else "", 0))
    except BaseException:
        sock.close()
        raise
    return sock


def _resolve_ports(wanted: dict[str, tuple[str, int]],
                   reserved: list[socket.socket]) -> dict[str, int]:
    """Listener name -> port, port 0 replaced by a port reserved in `reserved`."""
    ports: dict[str, int] = {}
    for name, (address, port) in wanted.items():
        if port:
            ports[name] = port
            continue
        sock = _reserve_port(address)
        reserved.append(sock)
        ports[name] = int(sock.getsockname()[1])
    return ports


def _forget_worker_metrics(pid: int, directory: str) -> None:
    """Drop a dead worker's gauges; its counters and histograms stay, so totals never go back.

    prometheus_client's ``mark_process_dead`` only removes the ``live*`` gauge modes; the relay's
    gauges use the default mode, which would otherwise report a dead worker's last values."""
    multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    for path in Path(directory).glob(f"gauge_*_{pid}.db"):
        path.unlink(missing_ok=True)


class _WorkersReadiness:
    def __init__(self, state_dir: Path, workers: int) -> None:
        self._state_dir = state_dir
        self._workers = workers
        self.stopping = False

    @property
    def ready_workers(self) -> int:
        return sum(
            (self._state_dir / _READY_FILE.format(index=i)).exists() for i in range(self._workers)
        )

    @property
    def ready(self) -> bool:
        # One ready worker accepts mail: the kernel only hands connections to bound listeners.
        return not self.stopping and self.ready_workers > 0

    @property
    def reason(self) -> str:
        if self.stopping:
            return "shutting down"
        n = self.ready_workers
        return "ok" if n else f"no worker ready (0/{self._workers})"


class Supervisor:
    """Parent of N relay worker processes (``workers`` > 1)."""

    def __init__(self, config_path: str, config: RelayConfig, *, log_level: str) -> None:
        self.config_path = config_path
        self.config = config
        self.log_level = log_level
        self.workers = config.settings.workers
        self._stopping = False
        self._procs: dict[int, asyncio.subprocess.Process] = {}
        self._exit_codes: dict[int, int] = {}
        self._spawning = asyncio.Lock()

    async def run(self) -> int:
        settings = self.config.settings
        state_dir = Path(tempfile.mkdtemp(prefix="mailplane-workers-"))
        try:
            return await self._run(settings, state_dir)
        finally:
            shutil.rmtree(state_dir, ignore_errors=True)

    async def _run(self, settings: RelaySettings, state_dir: Path) -> int:
        registry = CollectorRegistry()
        WorkerFilesCollector(registry, path=str(state_dir))  # type: ignore[no-untyped-call]
        readiness = _WorkersReadiness(state_dir, self.workers)
        # The /admin endpoints (drain, hand-off) are served by worker 0 on its own port.
        http = OpsServer(address=settings.http.address, port=settings.http.port,
                         readiness=readiness, registry=registry)
        await http.start()
        # Resolve port 0 once so that every worker (and every restart) binds the same port.
        wanted = {lst.name: (lst.address, lst.port) for lst in settings.listeners}
        if settings.intake is not None:
            wanted["intake"] = (settings.intake.address, settings.intake.port)
        if settings.admin is not None:
            wanted["admin"] = (settings.admin.address, settings.admin.port)
        reserved: list[socket.socket] = []
        try:
            ports = _resolve_ports(wanted, reserved)
        except BaseException:
            for sock in reserved:
                sock.close()
            await http.stop()
            raise
        log.info("supervisor: %d workers, listening: %s", self.workers,
                 " ".join(f"{k}={v}" for k, v in sorted({**ports, "http": http.port}.items())))

        loop = asyncio.get_running_loop()
        stop = asyncio.Event()

        def on_signal(sig: signal.Signals) -> None:
            log.info("received %s: stopping workers", sig.name)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig)
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(state_dir))
        keepers = [
            asyncio.create_task(
                self._keep_worker(WorkerSpec(index=i, listener_ports=ports,
                                             state_dir=str(state_dir), purge=i == 0,
                                             supervisor_pid=os.getpid()),
                                  env, stop),
                name=f"worker-{i}")
            for i in range(self.workers)
        ]
        try:
            await stop.wait()
        finally:
            self._stopping = True
            readiness.stopping = True
            for proc in self._procs.values():
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            # Workers drain within shutdownGrace and then stop delivery; past that, kill.
            limit = settings.shutdown_grace + MIN_QUEUE_STOP + 15.0
            _done, pending = await asyncio.wait(keepers, timeout=limit)
            for proc in self._procs.values():
                if proc.returncode is None:
                    log.error("worker pid %d did not stop in %.0fs: killing it", proc.pid, limit)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=10)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            for sock in reserved:
                sock.close()
            await http.stop()
        failed = {i: rc for i, rc in self._exit_codes.items() if rc != 0}
        if failed or len(self._exit_codes) < self.workers:
            log.error("workers exited with codes %s", self._exit_codes)
            return 1
        log.info("all %d workers stopped", self.workers)
        return 0

    async def _keep_worker(self, spec: WorkerSpec, env: dict[str, str],
                           stop: asyncio.Event) -> None:
        crashes = 0
        while not self._stopping:
            started = time.monotonic()
            # A SIGTERM that reaches a worker before it has installed its handlers must not
            # kill it: the worker inherits these signals blocked and unblocks them once its
            # handlers are in place (a pending one is then delivered and the worker drains).
            # One start at a time, so that each puts back the mask it found (two interleaved
            # would leave the supervisor deaf to SIGTERM).
            async with self._spawning:
                mask = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
                try:
                    proc = await asyncio.create_subprocess_exec(
                        sys.executable, "-m", "mailplane_relay.cli", "relay",
                        "--config", self.config_path, "--log-level", self.log_level,
                        "--worker-spec", spec.to_json(), env=env,
                    )
                finally:
                    signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            self._procs[spec.index] = proc
            if self._stopping:
                # Shutdown began while this worker was being started: it missed the SIGTERM
                # sent to the others.
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
            rc = await proc.wait()
            _forget_worker_metrics(proc.pid, spec.state_dir)
            (Path(spec.state_dir) / _READY_FILE.format(index=spec.index)).unlink(missing_ok=True)
            if self._stopping:
                self._exit_codes[spec.index] = rc
                return
            if rc == 2:
                # The configuration on disk is unusable; restarting would loop on the same error.
                log.error("worker %d: configuration rejected at start; stopping", spec.index)
                self._exit_codes[spec.index] = rc
                stop.set()
                return
            crashes = 1 if time.monotonic() - started > WORKER_HEALTHY_AFTER else crashes + 1
            delay = WORKER_RESTART_BACKOFF[min(crashes, len(WORKER_RESTART_BACKOFF)) - 1]
            log.error("worker %d (pid %d) exited unexpectedly with code %d: restarting in %.0fs",
                      spec.index, proc.pid, rc, delay)
            # Kept if shutdown comes before the restart: the supervisor then exits non-zero.
            self._exit_codes[spec.index] = rc
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        # Stopped before this worker was ever started: nothing failed.
        self._exit_codes.setdefault(spec.index, 0)


# -------------------------------------------------------------------------------------------
# Entry points for the CLI
# -------------------------------------------------------------------------------------------


def _runner() -> asyncio.Runner:
    try:
        import uvloop  # noqa: PLC0415 - optional
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def run_relay(config_path: str, *, log_level: str = "info",
              worker: WorkerSpec | None = None) -> int:
    """Run until signalled. Raises ConfigError if the configuration cannot be used at start."""
    cfg = load_config(config_path)
    supervise = worker is None and cfg.settings.workers > 1
    # The supervisor carries no traffic and stays on the standard event loop: its children
    # inherit the signal mask it starts them with (libuv's spawn would clear it).
    with asyncio.Runner() if supervise else _runner() as runner:
        try:
            if supervise:
                return runner.run(Supervisor(config_path, cfg, log_level=log_level).run())
            runner.run(RelayApp(config_path, worker=worker, initial_config=cfg).run())
        except Exception:
            log.exception("relay failed")
            return 1
    return 0
