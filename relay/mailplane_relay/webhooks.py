"""Delivery event webhooks: events made from the message log, posted signed to HTTPS endpoints.

Events are made when a batch of log rows goes to the store and are written in the same
transaction (the ``webhook_outbox`` table), so a row in the log has its events and a restart
loses none. Every relay worker runs a ``WebhookDispatcher``: it leases due events from the store
(``FOR UPDATE SKIP LOCKED`` on PostgreSQL, one write transaction on SQLite: no other worker of
the pool gets them while the lease holds), posts each, deletes it on a 2xx answer and
otherwise schedules it again with exponential backoff, until it is older than ``maxAge``. A
worker that dies mid-post leaves its lease to run out; the event is then posted again, with the
same id (at least once; receivers deduplicate on ``id``).

An event holds metadata only: the message-log fields (ids, sender, recipient, status, the SMTP
response, the attempt) and never a body, a subject or any other header. A credential's endpoint
only ever gets the events of mail sent with that credential; the relay's endpoint (the
platform's) gets every event of the relay.

Endpoints must be ``https://`` (``http://`` only to a loopback address, for a local receiver),
their certificate is verified, redirects are not followed, and every address the name resolves
to must be public unless a private network is opened explicitly (``allowPrivateNetworks`` for
the relay's endpoint, ``credentialPrivateNetworks`` for the tenants'): a tenant cannot point
the relay at a service inside the cluster or at the cloud's metadata address. docs/webhooks.md
describes the payload, the signature and how to verify it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import aiohttp
from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver
from prometheus_client import CollectorRegistry, Counter, Gauge

from .config import RelayConfig, WebhookEndpoint, WebhookSettings, redact_url
from .metrics import NS
from .store.backend import LOG_COLUMNS, LogRow, OutboxRow, StoreBackend
from .store.health import StoreHealth

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "Mailplane-Signature"
EVENT_ID_HEADER = "Mailplane-Event-Id"
# Receivers should refuse a signature whose t= is further than this from their clock.
REPLAY_WINDOW = 300
# Log statuses that are webhook event types of the same name ("complained" comes from the
# suppression list, not from a log row).
_STATUS_TYPES = frozenset({"delivered", "deferred", "bounced", "expired", "suppressed"})
# The SMTP response is cut to this many characters in an event.
MAX_RESPONSE_CHARS = 1000
# A lease outlives the attempt's timeout by this much before another worker may take it.
LEASE_MARGIN = 10.0
# How often the expiry and the backlog gauges run.
MAINTENANCE_INTERVAL = 5.0
# At most this much of an endpoint's answer is read (and thrown away).
MAX_ANSWER_BYTES = 64 * 1024
TARGET_RELAY = "relay"
TARGET_CREDENTIAL = "credential:"
RESULTS = ("success", "failure", "expired", "dropped")

_COL = {name: i for i, name in enumerate(LOG_COLUMNS)}


# ---- making events ------------------------------------------------------------------------


def _endpoints(cfg: RelayConfig) -> tuple[WebhookEndpoint | None, dict[str, WebhookEndpoint]]:
    return cfg.settings.webhooks.endpoint, {
        c.username: c.webhook for c in cfg.settings.credentials if c.webhook is not None}


class OutboxMaker:
    """Makes the outbox rows of log rows, per the configuration in force (cached per hash)."""

    def __init__(self, config: Callable[[], RelayConfig]) -> None:
        self._config = config
        self._cached: tuple[str, WebhookEndpoint | None, dict[str, WebhookEndpoint]] = (
            "", None, {})

    def _current(self) -> tuple[WebhookEndpoint | None, dict[str, WebhookEndpoint]]:
        cfg = self._config()
        if self._cached[0] != cfg.source_hash or not cfg.source_hash:
            relay, creds = _endpoints(cfg)
            self._cached = (cfg.source_hash, relay, creds)
        return self._cached[1], self._cached[2]

    def targets(self, event_type: str, credential: str | None) -> list[str]:
        relay, creds = self._current()
        out = []
        if relay is not None and event_type in relay.events:
            out.append(TARGET_RELAY)
        own = creds.get(credential) if credential else None
        if own is not None and event_type in own.events:
            out.append(TARGET_CREDENTIAL + str(credential))
        return out

    def __call__(self, rows: list[LogRow]) -> list[OutboxRow]:
        relay, creds = self._current()
        if relay is None and not creds:
            return []
        now = time.time()
        out: list[OutboxRow] = []
        for r in rows:
            status = r[_COL["status"]]
            if status not in _STATUS_TYPES:
                continue
            response = r[_COL["response"]]
            for target in self.targets(status, r[_COL["credential"]]):
                out.append((r[_COL["event_id"]], target, status, r[_COL["ts"]],
                            r[_COL["credential"]], r[_COL["namespace"]], r[_COL["sender"]],
                            r[_COL["recipient"]], r[_COL["queue_id"]], r[_COL["message_id"]],
                            response[:MAX_RESPONSE_CHARS] if response else response,
                            r[_COL["attempt"]], now))
        return out

    def complaint(self, address: str, delivered: dict[str, Any]) -> list[OutboxRow]:
        """Events of a complaint, attributed to the delivery ``delivered`` (a log row). The id
        is the same in every pod that notices the complaint, so the pool posts it once."""
        credential = delivered.get("credential")
        seed = f"{address}\0{delivered.get('queue_id')}\0{delivered.get('ts')}"
        event_id = "complaint-" + hashlib.sha256(seed.encode()).hexdigest()[:32]
        now = time.time()
        return [(event_id, target, "complained", now, credential, delivered.get("namespace"),
                 delivered.get("sender"), address, delivered.get("queue_id"),
                 delivered.get("message_id"), None, None, now)
                for target in self.targets("complained", credential)]


def payload(event: dict[str, Any]) -> dict[str, Any]:
    """The JSON body of one event: metadata only."""
    return {
        "id": event["event_id"],
        "type": event["type"],
        "timestamp": datetime.fromtimestamp(float(event["ts"]), UTC).isoformat(
            timespec="milliseconds").replace("+00:00", "Z"),
        "credential": event["credential"],
        "namespace": event["namespace"],
        "message": {
            "queueId": event["queue_id"],
            "messageId": event["message_id"],
            "sender": event["sender"],
            "recipient": event["recipient"],
        },
        "attempt": event["attempt"],
        "response": event["response"],
    }


def sign(body: bytes, secrets: list[bytes], timestamp: int) -> str:
    """``t=<unix time>,v1=<hex>[,v1=<hex>]``: HMAC-SHA256 of ``<t>.<body>`` by each secret."""
    signed = str(timestamp).encode() + b"." + body
    parts = [f"t={timestamp}"]
    parts += [f"v1={hmac.new(s, signed, hashlib.sha256).hexdigest()}" for s in secrets]
    return ",".join(parts)


# ---- where an endpoint may be ---------------------------------------------------------------


class BlockedAddress(OSError):
    """An endpoint resolved to an address it may not be posted to."""


Networks = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]


_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")


def check_address(address: str, allowed: Networks) -> None:
    """Raise BlockedAddress unless ``address`` is public or in an explicitly allowed network."""
    given = ipaddress.ip_address(address.split("%", 1)[0])
    ip: ipaddress.IPv4Address | ipaddress.IPv6Address = given
    inside = False
    if isinstance(given, ipaddress.IPv6Address):
        # An IPv6 address that carries an IPv4 one reaches that IPv4 address: mapped, NAT64
        # (an IPv6-only cluster's gateway translates 64:ff9b::a00:5 to 10.0.0.5), 6to4 and the
        # old IPv4-compatible form. The IPv4 address is what is checked.
        embedded = given.ipv4_mapped or given.sixtofour
        if embedded is None and (given in _NAT64 or given in _IPV4_COMPATIBLE):
            embedded = ipaddress.IPv4Address(int(given) & 0xFFFFFFFF)
        ip = embedded or given
        # A network's own translator (RFC 8215) reaches inside by definition.
        inside = given in _NAT64_LOCAL
    if any(given in net or ip in net for net in allowed):
        return
    if inside or not ip.is_global or ip.is_multicast:
        raise BlockedAddress(
            f"address {ip} is not public (private, loopback, link-local or reserved); an "
            "endpoint inside the cluster needs its network in webhooks.allowPrivateNetworks "
            "(the relay's endpoint) or webhooks.credentialPrivateNetworks (credentials')")


class GuardedResolver(AbstractResolver):
    """The system resolver, keeping only the addresses an endpoint may be posted to (public,
    or in an allowed network); a name with none left is refused."""

    def __init__(self, allowed: Networks) -> None:
        self._allowed = allowed
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0,
                      family: socket.AddressFamily = socket.AF_INET) -> list[ResolveResult]:
        results = await self._inner.resolve(host, port, family)
        allowed: list[ResolveResult] = []
        refused: BlockedAddress | None = None
        for result in results:
            try:
                check_address(result["host"], self._allowed)
            except BlockedAddress as exc:
                refused = exc
            else:
                allowed.append(result)
        if not allowed and refused is not None:
            raise refused
        # Only the addresses that passed are connected to (no second lookup to rebind).
        return allowed

    async def close(self) -> None:
        await self._inner.close()


def _networks(names: tuple[str, ...]) -> Networks:
    return tuple(ipaddress.ip_network(n, strict=False) for n in names)


# ---- posting --------------------------------------------------------------------------------


class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.deliveries = Counter(
            f"{NS}_webhook_deliveries",
            "Webhook posts by result: success (2xx), failure (retried), expired (given up after "
            "maxAge), dropped (the endpoint was removed from the configuration).",
            ["result"], registry=registry)
        self.backlog = Gauge(
            f"{NS}_webhook_backlog_events",
            "Webhook events waiting in the store's outbox (the whole store).",
            multiprocess_mode="livemax", registry=registry)
        self.oldest_age = Gauge(
            f"{NS}_webhook_oldest_pending_age_seconds",
            "Age of the oldest webhook event waiting in the outbox; 0 when none waits.",
            multiprocess_mode="livemax", registry=registry)
        for result in RESULTS:
            self.deliveries.labels(result)


class WebhookDispatcher:
    """Posts this worker's share of the pool's outbox (module docstring)."""

    def __init__(self, backend: StoreBackend, config: Callable[[], RelayConfig],
                 registry: CollectorRegistry, owner: str,
                 health: StoreHealth | None = None) -> None:
        self.backend = backend
        self._config = config
        self.metrics = WebhookMetrics(registry)
        self._owner = owner
        self._health = health
        self._sessions: dict[str, tuple[tuple[Any, ...], aiohttp.ClientSession]] = {}
        self._last_maintenance = -MAINTENANCE_INTERVAL
        self._backlog = -1  # at the last maintenance; -1: not known yet
        self._configured: tuple[str, bool] = ("", True)
        self._wakeup = asyncio.Event()
        self._retired: list[aiohttp.ClientSession] = []

    def _settings(self) -> WebhookSettings:
        return self._config().settings.webhooks

    def wake(self) -> None:
        """New events may be due (tests, the message log after a write)."""
        self._wakeup.set()

    async def run(self) -> None:
        while True:
            try:
                claimed = await self.run_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                claimed = 0
                if self._health is not None:
                    self._health.failed("webhooks", exc)
                else:
                    log.error("webhooks: a pass failed: %s", exc)
            else:
                if self._health is not None:
                    self._health.ok("webhooks")
            if not claimed:
                self._wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), self._settings().poll_interval)

    async def run_once(self) -> int:
        """Expire, claim and post one batch; the number of events claimed."""
        settings = self._settings()
        now = time.time()
        if now - self._last_maintenance >= MAINTENANCE_INTERVAL:
            self._last_maintenance = now
            await self.maintain(now, settings)
        if self._backlog == 0 and not self._any_endpoint():
            return 0  # no webhooks here: no claims against the store every second
        events = await self.backend.webhook_claim(
            self._owner, now, now + settings.timeout + LEASE_MARGIN, settings.concurrency)
        if not events:
            return 0
        outcomes = await asyncio.gather(*(self._post(e, settings) for e in events))
        done = [int(e["id"]) for e, ok in zip(events, outcomes, strict=True) if ok]
        await self.backend.webhook_done(done)
        # Sessions replaced by a configuration change, idle now that this batch is done.
        retired, self._retired = self._retired, []
        for session in retired:
            await session.close()
        return len(events)

    async def maintain(self, now: float, settings: WebhookSettings) -> None:
        # An event is a copy of a log row: it never outlives the message log's retention
        # either, when that is the shorter.
        max_age = min(settings.max_age, self._config().settings.retention.message_log)
        expired = await self.backend.webhook_expire(now - max_age)
        if expired:
            self.metrics.deliveries.labels("expired").inc(expired)
            log.warning("webhooks: gave up %d events older than %gs (webhooks.maxAge, or the "
                        "message log's retention when shorter)", expired, max_age)
        waiting, oldest = await self.backend.webhook_backlog()
        self._backlog = waiting
        self.metrics.backlog.set(waiting)
        self.metrics.oldest_age.set(0 if oldest is None else max(0.0, now - oldest))

    def _any_endpoint(self) -> bool:
        cfg = self._config()
        if self._configured[0] != cfg.source_hash or not cfg.source_hash:
            relay, creds = _endpoints(cfg)
            self._configured = (cfg.source_hash, relay is not None or bool(creds))
        return self._configured[1]

    def _endpoint(self, target: str) -> tuple[WebhookEndpoint | None, str]:
        cfg = self._config()
        if target == TARGET_RELAY:
            return cfg.settings.webhooks.endpoint, "relay"
        if target.startswith(TARGET_CREDENTIAL):
            credential = cfg.credentials.get(target[len(TARGET_CREDENTIAL):])
            return (credential.webhook if credential else None), "credentials"
        return None, "credentials"

    def _session(self, kind: str, settings: WebhookSettings) -> aiohttp.ClientSession:
        allowed = (settings.allow_private_networks if kind == "relay"
                   else settings.credential_private_networks)
        key = (settings.ca_file, allowed, settings.concurrency)
        held = self._sessions.get(kind)
        if held is not None and held[0] == key and not held[1].closed:
            return held[1]
        if held is not None:
            # Requests in flight on the old one finish on their own; close it afterwards.
            self._retired.append(held[1])
        context = ssl.create_default_context()
        if settings.ca_file:
            context.load_verify_locations(cafile=settings.ca_file)
        connector = aiohttp.TCPConnector(
            resolver=GuardedResolver(_networks(allowed)), ssl=context,
            limit=settings.concurrency)
        session = aiohttp.ClientSession(connector=connector, trust_env=False,
                                        headers={"User-Agent": "mailplane-webhooks/1"})
        self._sessions[kind] = (key, session)
        return session

    async def _post(self, event: dict[str, Any], settings: WebhookSettings) -> bool:
        """Post one event; True when it is done with (delivered or dropped)."""
        endpoint, kind = self._endpoint(str(event["target"]))
        if endpoint is None or event["type"] not in endpoint.events:
            # The endpoint was removed (or no longer takes this type): nobody to tell.
            self.metrics.deliveries.labels("dropped").inc()
            return True
        host = urlsplit(endpoint.url).hostname or "?"
        try:
            await self._attempt(event, endpoint, kind, settings)
        except Exception as exc:  # every failure is retried; the reason is logged
            error = _describe(exc, endpoint.url)
            self.metrics.deliveries.labels("failure").inc()
            attempts = int(event["attempts"]) + 1
            delay = min(settings.retry_max, settings.retry_initial * 2 ** (attempts - 1))
            delay *= random.uniform(0.8, 1.0)
            log.warning("webhook %s to %s (%s endpoint) failed (attempt %d): %s; next in %.0fs",
                        event["event_id"], host, kind, attempts, error, delay)
            await self.backend.webhook_retry(int(event["id"]), self._owner,
                                             time.time() + delay, error[:500])
            return False
        self.metrics.deliveries.labels("success").inc()
        return True

    async def _attempt(self, event: dict[str, Any], endpoint: WebhookEndpoint, kind: str,
                       settings: WebhookSettings) -> None:
        body = json.dumps(payload(event), separators=(",", ":")).encode()
        secrets = await asyncio.to_thread(endpoint.load_secrets)
        host = urlsplit(endpoint.url).hostname or ""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            pass  # a name: the resolver checks what it resolves to
        else:
            allowed = (settings.allow_private_networks if kind == "relay"
                       else settings.credential_private_networks)
            check_address(str(literal), _networks(allowed))
        headers = {
            "Content-Type": "application/json",
            EVENT_ID_HEADER: str(event["event_id"]),
            SIGNATURE_HEADER: sign(body, secrets, int(time.time())),
        }
        session = self._session(kind, settings)
        async with session.post(endpoint.url, data=body, headers=headers,
                                allow_redirects=False,
                                timeout=aiohttp.ClientTimeout(total=settings.timeout)) as resp:
            await resp.content.read(MAX_ANSWER_BYTES)
            if not 200 <= resp.status < 300:
                raise _HTTPStatus(resp.status)

    async def close(self) -> None:
        sessions, self._sessions = self._sessions, {}
        for session in [s for _key, s in sessions.values()] + self._retired:
            await session.close()
        self._retired.clear()


class _HTTPStatus(Exception):
    def __init__(self, status: int) -> None:
        super().__init__(f"answered HTTP {status} (a 2xx is success; redirects are not "
                         "followed)")


def _describe(exc: BaseException, url: str) -> str:
    """Why a post failed, for the log and the outbox's last error: never the whole URL (an
    aiohttp error may quote it, with a token in its query or user:password@)."""
    text = _describe_raw(exc).replace(url, redact_url(url))
    parts = urlsplit(url)
    hidden = [f"?{parts.query}" if parts.query else "",
              f"#{parts.fragment}" if parts.fragment else "",
              parts.netloc.rpartition("@")[0] + "@" if "@" in parts.netloc else ""]
    for part in sorted(filter(None, hidden), key=len, reverse=True):
        text = text.replace(part, "")
    return text


def _describe_raw(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "no answer within webhooks.timeout"
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        return f"certificate not trusted ({exc.certificate_error}); set webhooks.caFile for a " \
               "private CA"
    if isinstance(exc, aiohttp.ClientConnectorError) and isinstance(exc.os_error,
                                                                    BlockedAddress):
        return str(exc.os_error)
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
