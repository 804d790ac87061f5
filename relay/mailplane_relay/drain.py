"""Drain: before a relay pod goes away, its queue is handed to the other pods of its pool.

The operator (scaling an SmtpRelay down) tells each pod to be removed to drain, over the
administration port (HTTPS with the relay's serving certificate, ``admin.port``; the plain-HTTP
ops port serves only /metrics, /livez and /readyz), authenticated with a bearer token whose
SHA-256 is ``admin.tokenSHA256`` in the configuration: ``POST /admin/drain`` with
``{"peers": ["https://IP:PORT", ...], "token": "..."}`` (the admin ports of the pods that stay,
and the token to present to them). Peers are reached by IP, so a draining relay verifies each
one's certificate against ``admin.caFile`` and requires the name ``admin.serverName`` in it
(sent as SNI); a peer that is not HTTPS, not signed by that CA or not named so gets nothing.
A draining relay:

- is not ready (``/readyz`` answers 503 ``draining``), so the Service stops sending it
  connections, and closes its SMTP listeners (open sessions finish their transaction);
- hands every spooled message to a peer with ``POST /admin/handoff`` — the envelope as it is
  here (recipients and their states, attempts, reception time, credential) in the header
  ``X-Mailplane-Envelope`` (base64 JSON), the message data as the body. The peer answers 200
  only once the message is durable in its own spool; only then is it removed here. A message
  with a delivery attempt running is handed off when the attempt ends; a peer that refuses or
  does not answer is skipped, and the message tried again later (never lost);
- is answered 200 without a second copy when it hands over a message again that the peer
  already took (it crashed between the peer's answer and the removal here): the peer keeps the
  sender's queue id of each hand-off in its `HandoffLedger`, and a message is always offered
  first to the same peer (`first_peer`);
- keeps delivering what is due meanwhile (a message is either being delivered here or being
  handed off, never both: it is set aside, in memory only, while it is sent to a peer);
- keeps its drain order (the peers, never the token) in ``drain-order.json`` in the spool root,
  written and fsynced before the drain starts and removed when it is called off. A relay that
  starts with it stays drained — not ready, listeners closed, and no delivery at all (a message
  handed off just before a crash may be at a peer already) — and reports ``awaitingOrder`` until
  the operator sends the order again with the token, then goes on handing off. Each message is
  offered first to the peer `first_peer` picks among the peers of the order as first given
  (`handoff_order`), not among those a later order names (the ready ones at the time).

``GET /admin/drain`` (or ``/admin/status``) reports ``draining``, ``queued`` (messages still in
this spool), ``sessions`` (SMTP sessions still open) and ``configHash`` (the configuration in
force: the operator confirms a revocation by it); the operator lowers the
StatefulSet's replicas once every pod to remove reports ``queued`` and ``sessions`` 0.
``DELETE /admin/drain`` stops draining (a scale-down called off): the listeners open again and
the messages held for hand-off are released. A relay refuses hand-offs while it drains itself.

With several workers each one drains its own spool: worker 0 serves the admin port, passes
drain orders to the others over their control sockets (control.py) and answers their state
added up (`combined`); hand-offs from other pods go to its own spool. ``/admin/revoke``
and ``/admin/credential`` answer 501 there (a revocation or a rotated password pushed to one
worker would not hold in the others).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import hmac
import json
import logging
import os
import ssl
import threading
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Gauge

from .config import RelayConfig
from .control import ControlError, call_worker
from .files import replace_durably, sync_dir
from .rotation import PushRefused
from .spool import (
    HANDOFF_LEDGER,
    HELD,
    QueuedMessage,
    Spool,
    SpoolDataLost,
    SpoolError,
    valid_queue_id,
)

if TYPE_CHECKING:
    from .delivery import DeliveryQueue

log = logging.getLogger(__name__)

DRAIN_PATH = "/admin/drain"
STATUS_PATH = "/admin/status"
HANDOFF_PATH = "/admin/handoff"
REVOKE_PATH = "/admin/revoke"
CREDENTIAL_PATH = "/admin/credential"
ENVELOPE_HEADER = "X-Mailplane-Envelope"
# An authenticated hand-off carries one message (the relay's own size limit is 25 MiB).
MAX_HANDOFF_BODY = 256 * 1024 * 1024
HANDOFF_TIMEOUT = 60.0
RETRY_PAUSE = 1.0
LEDGER_NAME = HANDOFF_LEDGER
ORDER_NAME = "drain-order.json"
"""The drain order in force, in the spool root: written (and made durable) before a drain
starts, removed when it is called off. A relay that starts with it stays draining."""
LEDGER_KEEP = 7 * 86400.0
"""How long a relay remembers a hand-off it took (a sender retries within minutes of its
restart; a week covers a node that stays down over a weekend)."""
LEDGER_COMPACT_LINES = 1024
"""A running relay rewrites its ledger without the hand-offs older than `LEDGER_KEEP` after this
many lines appended, so it stays about a week long however long the relay runs."""


def token_sha256(token: str) -> str:
    """What ``admin.tokenSHA256`` holds for a token."""
    return hashlib.sha256(token.encode()).hexdigest()


class HandoffLedger:
    """The hand-offs this spool took, by the sending relay's queue id, in ``handoffs.log``
    beside the messages, so that a message handed over again (the sender crashed between our
    200 and removing its copy) is recognised and not stored twice.

    Each hand-off writes two lines, each made durable before the next step: ``P <sender id>
    <local id> <time>`` before the message is stored under the local id, ``T ...`` once it is.
    At start an intent without its ``T`` line counts as taken only when its message file is in
    the spool (the crash came after the store, before the ``T`` line); the others (the store
    never finished) are dropped. Entries older than `LEDGER_KEEP` are dropped at start, and
    every `LEDGER_COMPACT_LINES` lines appended while the relay runs (the file rewritten with
    the hand-offs kept and the intents still open). Queue ids and times only: nothing of the
    message is written here."""

    def __init__(self, directory: str | Path, *, fsync: bool = True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(directory) / LEDGER_NAME
        self.fsync = fsync
        self._clock = clock
        self._taken: dict[str, tuple[str, float]] = {}
        self._open_intents: dict[str, tuple[str, float]] = {}
        self._fd: int | None = None
        self._appended = 0
        # Hand-offs are written from threads (asyncio.to_thread), one per message at once.
        self._lock = threading.Lock()

    def open(self, spooled: Iterable[str]) -> None:
        """Read the ledger (blocking): `spooled` are the queue ids of the spool's message
        files, listed before any of them was delivered."""
        live = set(spooled)
        intents: dict[str, tuple[str, float]] = {}
        taken: dict[str, tuple[str, float]] = {}
        with contextlib.suppress(FileNotFoundError):
            for line in self.path.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) != 4 or parts[0] not in ("P", "T"):
                    continue  # a line cut by a crash
                try:
                    when = float(parts[3])
                except ValueError:
                    continue
                (taken if parts[0] == "T" else intents)[parts[1]] = (parts[2], when)
        for sender, (local, when) in intents.items():
            if sender not in taken and local in live:
                taken[sender] = (local, when)
        self._taken = taken
        with self._lock:
            self._rewrite()

    def _rewrite(self) -> None:
        """The file again with the hand-offs of the last `LEDGER_KEEP` and the open intents
        (the lock held)."""
        horizon = self._clock() - LEDGER_KEEP
        self._taken = {s: v for s, v in self._taken.items() if v[1] >= horizon}
        # An intent whose store failed stays open; it goes with the week like the rest.
        self._open_intents = {s: v for s, v in self._open_intents.items() if v[1] >= horizon}
        tmp = self.path.with_name(LEDGER_NAME + ".new")
        with tmp.open("w") as out:
            out.writelines(f"T {s} {local} {when:.0f}\n"
                           for s, (local, when) in sorted(self._taken.items()))
            out.writelines(f"P {s} {local} {when:.0f}\n"
                           for s, (local, when) in sorted(self._open_intents.items()))
            out.flush()
            if self.fsync:
                os.fsync(out.fileno())
        os.replace(tmp, self.path)
        self._sync_dir()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._appended = 0

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def taken(self, sender_id: str) -> str | None:
        """The local queue id of a hand-off already taken, None if it was not."""
        entry = self._taken.get(sender_id)
        if entry is None or entry[1] < self._clock() - LEDGER_KEEP:
            return None
        return entry[0]

    def intend(self, sender_id: str, local_id: str) -> None:
        with self._lock:
            now = self._append("P", sender_id, local_id)
            self._open_intents[sender_id] = (local_id, now)

    def record(self, sender_id: str, local_id: str) -> None:
        with self._lock:
            now = self._append("T", sender_id, local_id)
            self._open_intents.pop(sender_id, None)
            self._taken[sender_id] = (local_id, now)
            if self._appended >= LEDGER_COMPACT_LINES:
                try:
                    self._rewrite()
                except OSError as exc:
                    # The appended file is still whole: taken again at the next threshold.
                    log.warning("hand-off ledger: not rewritten (%s)", exc.strerror or exc)

    def _append(self, kind: str, sender_id: str, local_id: str) -> float:
        if self._fd is None:
            raise SpoolError("the hand-off ledger is not open")
        now = self._clock()
        line = f"{kind} {sender_id} {local_id} {now:.0f}\n".encode()
        try:
            os.write(self._fd, line)
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            raise SpoolError(f"hand-off ledger write failed: {exc.strerror or exc}") from exc
        self._appended += 1
        return now

    def _sync_dir(self) -> None:
        if self.fsync:
            sync_dir(self.path.parent)


def first_peer(queue_id: str, peers: int) -> int:
    """Where the hand-off of a message starts among `peers`: the same peer for the same
    message, so that a hand-off retried after a crash goes where the first one went (which
    recognises it) as long as the pool is the same."""
    return zlib.crc32(queue_id.encode()) % peers


def read_order(path: Path) -> list[str] | None:
    """The peers of the drain order kept at `path`, None when there is none (blocking). An
    unreadable order counts as one without peers: the relay stays draining (a message it may
    have handed off is not delivered here) until the operator sends the order again or calls
    it off."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.error("drain: the drain order %s is unreadable (%s): staying drained; "
                  "DELETE /admin/drain calls it off", path, exc)
        return []
    peers = doc.get("peers") if isinstance(doc, dict) else None
    if not (isinstance(peers, list) and all(isinstance(p, str) for p in peers)):
        log.error("drain: the drain order %s names no peers: staying drained", path)
        return []
    return list(peers)


def write_order(path: Path, peers: list[str], *, fsync: bool = True) -> None:
    """Keep a drain order durably (blocking): the peers only, never the token."""
    order = {"peers": peers, "since": round(time.time())}
    replace_durably(path, json.dumps(order).encode(), fsync=fsync)


def remove_order(path: Path, *, fsync: bool = True) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        return
    if fsync:
        sync_dir(path.parent)


def handoff_order(queue_id: str, recorded: list[str], current: list[str]) -> list[str]:
    """The peers to offer a message to, in order: first the one `first_peer` picks among the
    peers `recorded` in the drain order (the same for the same message however many peers are
    ready now, so a hand-off retried after a crash goes where the first one went), then the
    `current` ones from there on."""
    peers = list(current)
    start = first_peer(queue_id, len(peers)) if peers else 0
    out = peers[start:] + peers[:start]
    if recorded:
        preferred = recorded[first_peer(queue_id, len(recorded))]
        out = [preferred, *(p for p in out if p != preferred)]
    return out


class Listeners(Protocol):
    """The SMTP server, as far as draining needs it."""

    draining: bool

    @property
    def active_sessions(self) -> int: ...
    async def start(self) -> None: ...
    async def stop_accepting(self) -> None: ...


class DrainReadiness(Protocol):
    def set_draining(self, on: bool) -> None: ...


class Drainer:
    """The drain and hand-off logic of one relay process (each worker drains its own spool)."""

    def __init__(self, *, config: Callable[[], RelayConfig], spool: Spool, queue: DeliveryQueue,
                 listeners: Listeners, readiness: DrainReadiness,
                 registry: CollectorRegistry, ledger: HandoffLedger,
                 order_path: Path | None = None, fsync: bool = True) -> None:
        self._config = config
        self._order_path = order_path
        self._fsync = fsync
        self._recorded: list[str] = []
        """The peers of the drain order as first given (kept in `order_path`)."""
        self._restored = False
        """Started with a kept drain order and no token yet: drained, nothing handed off."""
        self._spool = spool
        self._ledger = ledger
        self._taking: dict[str, asyncio.Future[None]] = {}
        """Hand-offs being stored, by the sender's queue id (done when stored or failed)."""
        self._queue = queue
        self._listeners = listeners
        self._readiness = readiness
        self._peers: list[str] = []
        self._token = ""
        self._task: asyncio.Task[None] | None = None
        self._peer_ctx: ssl.SSLContext | None = None
        self._peer_name = ""
        self._held: set[str] = set()
        """Messages this drain held to hand them off (released if the drain is called off)."""
        self.draining_gauge = Gauge(
            "mailplane_relay_draining",
            "1 while this relay drains (hands its queue to the other pods of its pool).",
            registry=registry)
        self.handoffs = Counter(
            "mailplane_relay_handoffs",
            "Messages handed to another pod (sent) or taken from one (received), by result.",
            ["direction", "result"], registry=registry)

    @property
    def draining(self) -> bool:
        return self._task is not None

    @property
    def drained(self) -> bool:
        """Draining, or kept drained by a restored order."""
        return self._task is not None or self._restored

    # ---- authentication -----------------------------------------------------------------

    def authorized(self, header: str | None) -> bool:
        admin = self._config().settings.admin
        if admin is None or not header or not header.startswith("Bearer "):
            return False
        presented = token_sha256(header.removeprefix("Bearer ").strip())
        return hmac.compare_digest(presented, admin.token_sha256)

    # ---- drain --------------------------------------------------------------------------

    async def restore(self) -> bool:
        """At start (the delivery queue paused before it, see `read_order`): with a drain order
        kept from before a restart, stay drained — not ready, listeners closed, no delivery
        here — until the operator sends the order again (with the token, which is not kept)
        or calls it off. True when an order was kept."""
        if self._order_path is None:
            return False
        recorded = await asyncio.to_thread(read_order, self._order_path)
        if recorded is None:
            self._queue.resume()  # gone since the queue was paused for it
            return False
        self._recorded, self._restored = recorded, True
        log.warning("draining: a drain order was in force before this start; staying drained "
                    "(no delivery here) until it is sent again or called off")
        self._readiness.set_draining(True)
        self.draining_gauge.set(1)
        await self._listeners.stop_accepting()
        return True

    async def start(self, peers: list[str], token: str) -> None:
        """Drain toward `peers` (base URLs of their ops ports), presenting `token` to them.
        Again while draining: the peers and token are replaced (the peers first given stay
        the ones each message is offered to first). The order is kept durably before the
        drain starts."""
        if self._order_path is not None:
            recorded = await asyncio.to_thread(read_order, self._order_path)
            if recorded:
                self._recorded = recorded
            else:
                self._recorded = list(peers)
                await asyncio.to_thread(write_order, self._order_path, self._recorded,
                                        fsync=self._fsync)
        else:
            self._recorded = self._recorded or list(peers)
        self._peers, self._token = list(peers), token
        if self._task is not None:
            return
        log.info("draining: handing the queue to %d peer(s)", len(peers))
        self._readiness.set_draining(True)
        self.draining_gauge.set(1)
        if not self._restored:
            await self._listeners.stop_accepting()
        self._restored = False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="drain")

    async def stop(self) -> None:
        """Call the drain off: accept mail again, release what was held for hand-off."""
        task, self._task = self._task, None
        restored, self._restored = self._restored, False
        if task is None and not restored:
            return
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._order_path is not None:
            await asyncio.to_thread(remove_order, self._order_path, fsync=self._fsync)
        self._recorded = []
        self._queue.resume()
        for qid in sorted(self._held):
            self._queue.put_back(qid)
        self._held.clear()
        self._listeners.draining = False
        await self._listeners.start()
        self._readiness.set_draining(False)
        self.draining_gauge.set(0)
        log.info("drain called off: accepting mail again")

    async def stop_task(self) -> None:
        """The relay stops: end the hand-off loop (a message being handed off stays here;
        being set aside in memory only, it is scheduled again at the next start)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def status(self) -> dict[str, Any]:
        return {"draining": self.drained, "awaitingOrder": self._restored,
                "queued": len(self._spool.queue_ids()),
                "sessions": self._listeners.active_sessions,
                "configHash": self._config().source_hash,
                "render": self._config().render_id}

    def _peer_tls(self) -> tuple[ssl.SSLContext, str] | None:
        """The context verifying peers and the name their certificate must carry; None (with
        the reason logged) when the configuration gives no way to verify them."""
        admin = self._config().settings.admin
        if admin is None or admin.ca_file is None or admin.server_name is None:
            log.error("drain: nothing handed off: admin.caFile and admin.serverName are not "
                      "set, so no peer can be verified (message bodies only go over verified "
                      "TLS)")
            return None
        try:
            ctx = ssl.create_default_context(cafile=admin.ca_file)
        except (OSError, ssl.SSLError) as exc:
            log.error("drain: nothing handed off: admin.caFile %s cannot be loaded (%s)",
                      admin.ca_file, type(exc).__name__)
            return None
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        return ctx, admin.server_name

    async def _run(self) -> None:
        async with aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=HANDOFF_TIMEOUT)) as http:
            while True:
                moved = 0
                # Loaded each pass: a renewed CA bundle is used without a restart.
                peer_tls = await asyncio.to_thread(self._peer_tls)
                if peer_tls is None:
                    await asyncio.sleep(RETRY_PAUSE * 5)
                    continue
                self._peer_ctx, self._peer_name = peer_tls
                for qid in self._spool.queue_ids():
                    try:
                        moved += await self._hand_off(http, qid)
                    except (SpoolError, KeyError) as exc:
                        log.warning("drain: %s stays here for now: %s", qid, exc)
                await asyncio.sleep(0.05 if moved else RETRY_PAUSE)

    async def _hand_off(self, http: aiohttp.ClientSession, qid: str) -> int:
        if qid not in self._held:
            try:
                aside = self._queue.set_aside(qid)
            except KeyError:
                return 0  # not scheduled (yet): still being recovered, or already final
            if aside:
                self._held.add(qid)
            else:
                # An attempt runs (handed off when it ends), or an administrator holds it
                # (handed off held: the hold is in its envelope and stays so at the peer).
                current = self._queue.message(qid)
                if current is None or not current.extra.get(HELD) or (
                        self._queue.state_of(current) == "active"):
                    return 0
        msg = await asyncio.to_thread(self._spool.load, qid)
        if msg is None:
            self._held.discard(qid)
            return 0
        try:
            data = await asyncio.to_thread(self._spool.read, qid)
        except SpoolDataLost as exc:
            # Torn: its files are gone, nothing is handed off. Its recipients fail and its
            # sender is told, as when a delivery attempt finds it torn.
            log.error("drain: %s is lost, not handed off: %s", qid, exc)
            self._held.discard(qid)
            await self._queue.lost(msg)
            return 0
        envelope = base64.b64encode(msg.to_json()).decode()
        for peer in handoff_order(qid, self._recorded, self._peers):
            if await self._send(http, peer, envelope, data, qid):
                await self._queue.delete(qid)
                self._held.discard(qid)
                self.handoffs.labels("sent", "ok").inc()
                return 1
        self.handoffs.labels("sent", "failed").inc()
        return 0

    async def _send(self, http: aiohttp.ClientSession, peer: str, envelope: str, data: bytes,
                    qid: str) -> bool:
        if not peer.startswith("https://") or self._peer_ctx is None:
            log.error("drain: %s not handed to %s: a message goes only over verified TLS",
                      qid, peer)
            return False
        try:
            async with http.post(
                    peer.rstrip("/") + HANDOFF_PATH, data=data, ssl=self._peer_ctx,
                    server_hostname=self._peer_name,
                    headers={"Authorization": f"Bearer {self._token}",
                             ENVELOPE_HEADER: envelope,
                             "Content-Type": "application/octet-stream"}) as resp:
                text = await resp.text()
                if resp.status == 200:
                    log.info("drain: %s handed to %s as %s", qid, peer,
                             json.loads(text).get("queueId"))
                    return True
                log.warning("drain: %s refused %s: %d %s", peer, qid, resp.status, text[:200])
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            log.warning("drain: handing %s to %s failed: %s", qid, peer, exc)
        return False

    # ---- hand-off (receiving side) ------------------------------------------------------

    async def receive(self, envelope_b64: str, data: bytes) -> tuple[str, bool]:
        """Store a message another pod hands over; durable when this returns. Returns its queue
        id here, and whether it was taken before (handed over again after the sender crashed
        between our answer and its removal: not stored a second time). ValueError for a
        malformed envelope, RuntimeError when this relay drains itself."""
        if self.drained:
            raise RuntimeError("this relay is draining; hand the message to another pod")
        try:
            envelope = QueuedMessage.from_json(base64.b64decode(envelope_b64, validate=True))
        except (ValueError, TypeError, KeyError, binascii.Error) as exc:
            raise ValueError(f"the {ENVELOPE_HEADER} header is not a spool envelope: {exc}"
                             ) from None
        if not valid_queue_id(envelope.queue_id):
            raise ValueError(f"the {ENVELOPE_HEADER} header has no valid queue id")
        if not envelope.needs_work():
            raise ValueError("the envelope has no pending recipient and no DSN owed")
        sender = envelope.queue_id
        while (running := self._taking.get(sender)) is not None:
            # The same message handed over twice at once (a retry after a timeout): the
            # second answers like the first once that one is stored (or stores it if that
            # one failed).
            await asyncio.wait([running])
        local = self._ledger.taken(sender)
        if local is not None:
            self.handoffs.labels("received", "duplicate").inc()
            log.info("hand-off: %s was taken before as %s; not stored again", sender, local)
            return local, True
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._taking[sender] = done
        try:
            qid = self._spool.new_queue_id()
            await asyncio.to_thread(self._ledger.intend, sender, qid)
            msg = await self._spool.commit_handoff(envelope, data, queue_id=qid)
            await asyncio.to_thread(self._ledger.record, sender, qid)
        finally:
            del self._taking[sender]
            done.set_result(None)
        self._queue.submit(msg)
        self.handoffs.labels("received", "ok").inc()
        log.info("hand-off: took %s (was %s) with %d pending recipient(s)", msg.queue_id,
                 sender, len(msg.pending()))
        return msg.queue_id, False


class Siblings:
    """The other worker processes of this pod (``workers: N``), as the worker serving the
    admin port (worker 0) reaches them: over their queue administration sockets."""

    def __init__(self, spool_root: str, workers: int) -> None:
        self.spool_root = spool_root
        self.indexes = range(1, workers)

    async def call(self, request: dict[str, Any]) -> list[dict[str, Any]]:
        """Each one's drain state after `request`; ControlError if one does not answer."""
        return list(await asyncio.gather(
            *(call_worker(self.spool_root, i, request) for i in self.indexes)))


def combined(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The drain state of a pod from its workers' (the first is the one answering): draining
    when every worker drains, the messages and sessions of all; a configuration hash only when
    every worker runs the same configuration ("" while they differ, during a reload)."""
    first = states[0]
    out = dict(first)
    out["draining"] = all(bool(s.get("draining")) for s in states)
    out["awaitingOrder"] = any(bool(s.get("awaitingOrder")) for s in states)
    out["queued"] = sum(int(s.get("queued") or 0) for s in states)
    out["sessions"] = sum(int(s.get("sessions") or 0) for s in states)
    for key in ("configHash", "render"):
        if any(s.get(key) != first.get(key) for s in states):
            out[key] = ""
    out["workers"] = len(states)
    return out


class AdminEndpoints:
    """The ``/admin`` routes of the administration port (HTTPS), bound to a `Drainer` once the
    relay has one (before that they answer 503). With several workers the first one serves
    them: drain orders go to every worker (`siblings`) and the state answered is theirs
    together; hand-offs are stored in its own spool."""

    def __init__(self) -> None:
        self.drainer: Drainer | None = None
        self.siblings: Siblings | None = None
        self.revoke: Callable[[str], bool] | None = None
        """Refuse a username ahead of the mounted configuration (app.py, revocation.py)."""
        self.push_password: Callable[[object], tuple[str, int]] | None = None
        """Run a rotated password ahead of the mounted configuration (app.py, rotation.py)."""

    async def _all(self, drainer: Drainer, request: dict[str, Any] | None) -> dict[str, Any]:
        """This process's state and, with several workers, the others' after `request`."""
        own = drainer.status()
        if self.siblings is None:
            return own
        try:
            others = await self.siblings.call(request or {"op": "drain-status"})
        except ControlError as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}; ask again\n") from None
        return combined([own, *others])

    def routes(self) -> list[web.RouteDef]:
        return [web.get(DRAIN_PATH, self._status), web.get(STATUS_PATH, self._status),
                web.post(DRAIN_PATH, self._drain),
                web.delete(DRAIN_PATH, self._undrain), web.post(HANDOFF_PATH, self._handoff),
                web.post(REVOKE_PATH, self._revoke), web.post(CREDENTIAL_PATH, self._credential)]

    def _check(self, request: web.Request) -> Drainer:
        drainer = self.drainer
        if drainer is None:
            raise web.HTTPServiceUnavailable(text="starting\n")
        if not drainer.authorized(request.headers.get("Authorization")):
            # Also when the configuration has no admin token: nothing to authenticate with.
            raise web.HTTPUnauthorized(text="a valid bearer token is required (admin."
                                            "tokenSHA256 in the configuration)\n")
        return drainer

    async def _status(self, request: web.Request) -> web.Response:
        return web.json_response(await self._all(self._check(request), None))

    async def _drain(self, request: web.Request) -> web.Response:
        drainer = self._check(request)
        try:
            doc = await request.json()
            peers, token = doc["peers"], doc["token"]
            if not (isinstance(peers, list) and all(isinstance(p, str) and p.startswith(
                    "https://") for p in peers) and isinstance(token, str)):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='send {"peers": ["https://IP:PORT", ...], '
                                          '"token": "..."} (the peers\' admin ports: '
                                          'messages are handed off over verified TLS only)\n'
                                     ) from None
        await drainer.start(peers, token)
        state = await self._all(drainer, {"op": "drain", "peers": peers, "token": token})
        return web.json_response(state, status=202)

    async def _revoke(self, request: web.Request) -> web.Response:
        drainer = self._check(request)
        try:
            doc = await request.json()
            username = doc["username"]
            if not isinstance(username, str) or not username:
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise web.HTTPBadRequest(text='send {"username": "..."}\n') from None
        if self.siblings is not None:
            raise web.HTTPNotImplemented(
                text="a relay with several workers takes revocations from its mounted "
                     "configuration only (workers: 1 for pushed revocations)\n")
        if self.revoke is None:
            raise web.HTTPServiceUnavailable(text="starting\n")
        in_force = self.revoke(username)
        return web.json_response({"username": username, "revoked": in_force,
                                  **drainer.status()})

    async def _credential(self, request: web.Request) -> web.Response:
        drainer = self._check(request)
        if self.siblings is not None:
            raise web.HTTPNotImplemented(
                text="a relay with several workers takes rotated passwords from its mounted "
                     "configuration only (workers: 1 for pushed rotations)\n")
        if self.push_password is None:
            raise web.HTTPServiceUnavailable(text="starting\n")
        try:
            doc = await request.json()
        except ValueError:
            doc = None
        try:
            username, serial = self.push_password(doc)
        except PushRefused as exc:
            raise web.HTTPConflict(text=f"{exc}\n") from None
        except ValueError as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        return web.json_response({"username": username, "passwordSerial": serial,
                                  **drainer.status()})

    async def _undrain(self, request: web.Request) -> web.Response:
        drainer = self._check(request)
        await drainer.stop()
        return web.json_response(await self._all(drainer, {"op": "undrain"}))

    async def _handoff(self, request: web.Request) -> web.Response:
        drainer = self._check(request)
        envelope = request.headers.get(ENVELOPE_HEADER)
        if not envelope:
            raise web.HTTPBadRequest(text=f"the {ENVELOPE_HEADER} header is missing\n")
        data = await request.read()
        started = time.monotonic()
        try:
            queue_id, again = await drainer.receive(envelope, data)
        except ValueError as exc:
            drainer.handoffs.labels("received", "refused").inc()
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        except RuntimeError as exc:
            raise web.HTTPServiceUnavailable(text=f"{exc}\n") from None
        except SpoolError as exc:
            drainer.handoffs.labels("received", "failed").inc()
            raise web.HTTPInsufficientStorage(text=f"{exc}\n") from None
        return web.json_response({"queueId": queue_id, "duplicate": again,
                                  "seconds": round(time.monotonic() - started, 3)})
