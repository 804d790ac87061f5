"""The ops HTTP server in process: readiness transitions and a /metrics that promtool accepts."""

from __future__ import annotations

import shutil
import subprocess

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.http import READINESS_CONDITIONS, OpsServer, Readiness
from mailplane_relay.metrics import RelayMetrics


async def get(port: int, path: str) -> tuple[int, str, str]:
    async with aiohttp.ClientSession() as session, session.get(
        f"http://127.0.0.1:{port}{path}", timeout=aiohttp.ClientTimeout(total=5)
    ) as resp:
        return resp.status, await resp.text(), resp.headers.get("Content-Type", "")


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed (apt-get install prometheus)"
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr


async def test_readiness_follows_conditions_and_shutdown() -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry)
    readiness = Readiness(on_change=lambda ready: metrics.ready.set(1 if ready else 0))
    server = OpsServer(address="127.0.0.1", port=0, readiness=readiness, registry=registry)
    await server.start()
    try:
        assert server.port > 0
        assert (await get(server.port, "/livez"))[:2] == (200, "ok\n")
        status, text, _ = await get(server.port, "/readyz")
        assert (status, text) == (503, "waiting for: config loaded, spool recovered, "
                                       "listeners bound\n")
        for condition in READINESS_CONDITIONS[:-1]:
            readiness.mark(condition)
        assert (await get(server.port, "/readyz"))[:2] == (503, "waiting for: listeners bound\n")
        readiness.mark("listeners bound")
        assert (await get(server.port, "/readyz"))[:2] == (200, "ok\n")
        assert registry.get_sample_value("mailplane_relay_ready") == 1
        readiness.shutting_down()
        assert (await get(server.port, "/readyz"))[:2] == (503, "shutting down\n")
        assert registry.get_sample_value("mailplane_relay_ready") == 0
        assert (await get(server.port, "/livez"))[0] == 200
    finally:
        await server.stop()


async def test_metrics_exposition_passes_promtool() -> None:
    registry = CollectorRegistry()
    metrics = RelayMetrics.create(registry)
    metrics.messages_received.labels(listener="submission", sender_domain="example.com",
                                     credential="app").inc()
    metrics.recipients.labels(outcome="delivered", sender_domain="example.com",
                              credential="app").inc(3)
    metrics.delivery_latency.observe(0.3)
    metrics.config_info.labels(hash="abc123").set(1)
    metrics.purged_records.labels(table="message_log").inc(10)
    server = OpsServer(address="127.0.0.1", port=0, readiness=Readiness(), registry=registry)
    await server.start()
    try:
        status, text, content_type = await get(server.port, "/metrics")
    finally:
        await server.stop()
    assert status == 200
    assert content_type.startswith("text/plain")
    assert 'mailplane_relay_recipients_total{credential="app",outcome="delivered"' in text
    promtool_check(text)


async def test_port_in_use_is_an_error_not_a_silent_success() -> None:
    first = OpsServer(address="127.0.0.1", port=0, readiness=Readiness(),
                      registry=CollectorRegistry())
    await first.start()
    try:
        second = OpsServer(address="127.0.0.1", port=first.port, readiness=Readiness(),
                           registry=CollectorRegistry())
        with pytest.raises(OSError):
            await second.start()
    finally:
        await first.stop()
