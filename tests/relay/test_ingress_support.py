"""Fixtures and clients for the ingress tests: a real SubmissionServer with a real Spool and real
TLS on loopback, and in-test stand-ins (recording lists) for the delivery queue, the message log
and the suppression list, which other modules own."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import os
import ssl
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import trustme

from mailplane_relay.config import RelayConfig, RelaySettings, hash_password
from mailplane_relay.events import LogEvent
from mailplane_relay.ingress import SubmissionServer
from mailplane_relay.ingress.throttle import AuthThrottle
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.ratelimit import Limiter
from mailplane_relay.reputation import Reputation
from mailplane_relay.spool import QueuedMessage, Spool
from mailplane_relay.tlsctx import ReloadingTLS
from tests.helpers.pki import ServerPair, client_context, write_ca_file, write_server_pair

PASSWORD = "s3cret-" + base64.b32encode(hashlib.sha256(b"mailplane-tests").digest()).decode()[:20]
PREVIOUS_PASSWORD = "previous-" + PASSWORD


class ConfigBox:
    """The `config` callable, with the configuration swappable like a hot reload."""

    def __init__(self, cfg: RelayConfig) -> None:
        self.cfg = cfg

    def __call__(self) -> RelayConfig:
        return self.cfg


class RecordingQueue:
    def __init__(self) -> None:
        self.submitted: list[QueuedMessage] = []
        self.data: list[bytes | None] = []

    def submit(self, msg: QueuedMessage, data: bytes | None = None) -> None:
        self.submitted.append(msg)
        self.data.append(data)


class RecordingLog:
    def __init__(self) -> None:
        self.events: list[LogEvent] = []

    def record(self, event: LogEvent) -> None:
        self.events.append(event)


class StaticSuppression:
    def __init__(self) -> None:
        self.entries: dict[str, tuple[str, float]] = {}
        self.fail_with: Exception | None = None

    def is_suppressed(self, address: str, namespace: str | None = None
                      ) -> tuple[str, float] | None:
        if self.fail_with is not None:
            raise self.fail_with
        return self.entries.get(address.lower())


def settings_doc(pair: ServerPair, spool_dir: Path, **limits: Any) -> dict[str, Any]:
    now = datetime.now(UTC)
    h = hash_password
    return {
        "hostname": "relay.test",
        "listeners": [
            {"name": "submission", "address": "127.0.0.1", "port": 0, "tls": "starttls"},
            {"name": "submissions", "address": "127.0.0.1", "port": 0, "tls": "implicit"},
        ],
        "tls": {"certFile": str(pair.cert_file), "keyFile": str(pair.key_file),
                "reloadInterval": 0.05},
        "spool": {"directory": str(spool_dir)},
        "limits": {"authFailureDelay": 0.05, "authFailureLimit": 3, "maxRecipients": 3,
                   "maxMessageSize": 20_000, "maxLineLength": 998, **limits},
        "domains": [{"name": "example.com"}, {"name": "other.org"}],
        "trustedNetworks": [],
        "credentials": [
            {"username": "app1", "passwordHash": h(PASSWORD), "allowedSenders": ["example.com"]},
            {"username": "app2", "passwordHash": h(PASSWORD), "allowedSenders": ["other.org"]},
            {"username": "human", "passwordHash": h(PASSWORD, scheme="scrypt"),
             "allowedSenders": ["example.com"]},
            {"username": "banned", "passwordHash": h(PASSWORD), "allowedSenders": ["example.com"],
             "suspended": True, "suspendedReason": "complaint rate above 0.3%"},
            {"username": "slow", "passwordHash": h(PASSWORD), "allowedSenders": ["example.com"],
             "ratePerMinute": 2},
            {"username": "quota", "passwordHash": h(PASSWORD), "allowedSenders": ["example.com"],
             "dailyQuota": 1},
            {"username": "rotating", "passwordHash": h(PASSWORD),
             "previousPasswordHash": h(PREVIOUS_PASSWORD),
             "previousExpires": (now + timedelta(hours=1)).isoformat(),
             "allowedSenders": ["example.com"]},
            {"username": "rotated", "passwordHash": h(PASSWORD),
             "previousPasswordHash": h(PREVIOUS_PASSWORD),
             "previousExpires": (now - timedelta(seconds=1)).isoformat(),
             "allowedSenders": ["example.com"]},
        ],
    }


def build_config(doc: dict[str, Any]) -> RelayConfig:
    return RelayConfig(settings=RelaySettings.model_validate(doc))


@dataclass
class Relay:
    box: ConfigBox
    doc: dict[str, Any]
    server: SubmissionServer
    spool: Spool
    tls: ReloadingTLS
    queue: RecordingQueue
    log: RecordingLog
    suppression: StaticSuppression
    limiter: Limiter
    metrics: RelayMetrics
    reputation: Reputation
    ca: trustme.CA
    pair: ServerPair
    ca_file: Path
    clock: list[float] = field(default_factory=lambda: [0.0])
    throttle: AuthThrottle = field(
        default_factory=lambda: AuthThrottle(lambda: RelaySettings().limits))

    @property
    def starttls_port(self) -> int:
        return self.server.bound_ports["submission"]

    @property
    def implicit_port(self) -> int:
        return self.server.bound_ports["submissions"]

    def client_tls(self) -> ssl.SSLContext:
        return client_context(self.ca)

    def reconfigure(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        mutate(self.doc)
        self.box.cfg = build_config(self.doc)

    def metric(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def rejected(self, reason: str) -> float:
        return self.metric("mailplane_relay_rejected_total", reason=reason)


@pytest.fixture
async def relay(tls_ca: trustme.CA, tmp_path: Path) -> AsyncIterator[Relay]:
    pair = write_server_pair(tls_ca, tmp_path / "tls")
    doc = settings_doc(pair, tmp_path / "spool")
    box = ConfigBox(build_config(doc))
    metrics = RelayMetrics.create()
    spool = Spool(str(tmp_path / "spool"), fsync=True,
                  metrics=metrics)
    await spool.start()
    tls = ReloadingTLS(box)
    await tls.start()
    clock = [1_800_000_000.0]
    limiter = Limiter(box, clock=lambda: clock[0])
    throttle = AuthThrottle(lambda: box().settings.limits, clock=lambda: clock[0])
    reputation = Reputation(lambda: box().settings.abuse, clock=lambda: clock[0])
    queue, log, suppression = RecordingQueue(), RecordingLog(), StaticSuppression()
    server = SubmissionServer(config=box, tls=tls, spool=spool, queue=queue, log=log,
                              suppression=suppression, limiter=limiter, metrics=metrics,
                              reputation=reputation, auth_throttle=throttle)
    await server.start()
    r = Relay(box, doc, server, spool, tls, queue, log, suppression, limiter, metrics,
              reputation, tls_ca,
              pair, write_ca_file(tls_ca, tmp_path), clock, throttle)
    try:
        yield r
    finally:
        await server.stop_accepting()
        await server.drain(time.monotonic() + 2)
        await tls.close()
        await spool.close()


def message(sender: str = "app@example.com", to: str = "rcpt@example.net",
            subject: str = "hello", extra: str = "") -> bytes:
    return (f"From: {sender}\r\nTo: {to}\r\nSubject: {subject}\r\n"
            f"Message-ID: <{os.urandom(6).hex()}@example.com>\r\n{extra}\r\nbody line\r\n"
            ).encode()


class RawSMTP:
    """A byte-exact SMTP client over asyncio streams, for what real clients refuse to send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, tls: ssl.SSLContext | None = None,
                      source: str = "127.0.0.1") -> RawSMTP:
        """Connect to the relay on loopback, from the loopback address ``source``."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=tls, local_addr=(source, 0),
                                    server_hostname="localhost" if tls else None), 5)
        return cls(reader, writer)

    async def reply(self, timeout: float = 5.0) -> tuple[int, str]:
        lines = []
        while True:
            line = await asyncio.wait_for(self.reader.readline(), timeout)
            if not line:
                raise ConnectionError("server closed the connection")
            lines.append(line.decode().rstrip("\r\n"))
            if line[3:4] != b"-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        await self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return await self.reply()

    async def starttls(self, ctx: ssl.SSLContext) -> None:
        code, _ = await self.cmd("STARTTLS")
        assert code == 220
        await self.writer.start_tls(ctx, server_hostname="localhost")

    async def login(self, user: str = "app1", password: str = PASSWORD) -> tuple[int, str]:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        return await self.cmd(f"AUTH PLAIN {token}")

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError, TimeoutError):
            await asyncio.wait_for(self.writer.wait_closed(), 2)


async def ready_session(relay: Relay, *, user: str | None = "app1",
                        implicit: bool = True, source: str = "127.0.0.1") -> RawSMTP:
    """Connected (from the loopback address ``source``), TLS, EHLO done, authenticated (unless
    user is None)."""
    if implicit:
        c = await RawSMTP.connect(relay.implicit_port, relay.client_tls(), source)
        assert (await c.reply())[0] == 220
    else:
        c = await RawSMTP.connect(relay.starttls_port, source=source)
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO client.test"))[0] == 250
        await c.starttls(relay.client_tls())
    assert (await c.cmd("EHLO client.test"))[0] == 250
    if user is not None:
        code, text = await c.login(user)
        assert code == 235, text
    return c
