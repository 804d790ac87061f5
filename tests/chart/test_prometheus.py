"""A real Prometheus on loopback scrapes a running relay (`mailplane relay` as a subprocess) that
has delivered mail to a sink; the shipped recording rules and alerts are loaded and evaluated,
and queries return data."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
import yaml

from tests.helpers.ports import free_port
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink

from .conftest import ROOT

pytestmark = pytest.mark.slow

PROMETHEUS = "/usr/bin/prometheus"
PORT_RETRIES = 5
DEADLINE = 25.0  # first scrape takes ~5 s on these machines; everything else is quick


class Prometheus:
    def __init__(self, base: Path, relay_http_port: int) -> None:
        self.port = free_port()
        self.base = base
        # The shipped rules, evaluated every second instead of every minute so the test does
        # not wait for the first evaluation; the expressions are unchanged.
        groups = yaml.safe_load((ROOT / "monitoring" / "rules.yaml").read_text())["groups"]
        for group in groups:
            group["interval"] = "1s"
        (base / "rules.yaml").write_text(yaml.safe_dump({"groups": groups}))
        (base / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s",
                       "scrape_timeout": "1s"},
            "rule_files": [str(base / "rules.yaml")],
            "scrape_configs": [{
                # The job name the relay's ServiceMonitor produces (jobLabel).
                "job_name": "mailplane-relay",
                "static_configs": [{"targets": [f"127.0.0.1:{relay_http_port}"],
                                    "labels": {"namespace": "mail", "pod": "relay-0"}}],
            }],
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start and wait until it serves. Prometheus cannot bind port 0 and say which port it
        got, so the port is picked free first; if another process took it in between,
        Prometheus exits and starts again on another port."""
        self.log = (self.base / "prometheus.log").open("ab")
        for _ in range(PORT_RETRIES):
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={self.base / 'prometheus.yml'}",
                 f"--storage.tsdb.path={self.base / 'data'}",
                 f"--web.listen-address=127.0.0.1:{self.port}",
                 "--storage.tsdb.retention.time=1h", "--log.level=warn"],
                stdout=self.log, stderr=subprocess.STDOUT)
            deadline = time.monotonic() + DEADLINE
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._answers():
                    return
                time.sleep(0.1)
            if self.proc.poll() is None or "address already in use" not in self.output():
                raise AssertionError(f"prometheus did not start:\n{self.output()}")
            self.port = free_port()
        raise AssertionError(f"prometheus found no free port in {PORT_RETRIES} tries")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()

    def api(self, path: str, **params: str) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        with urllib.request.urlopen(url, timeout=2) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.api("query", query=expr)["result"]
        return result

    def ready(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.output()
        return self._answers()

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=1):
                return True
        except OSError:
            return False

    def output(self) -> str:
        self.log.flush()
        return (self.base / "prometheus.log").read_text(errors="replace")


@pytest.fixture
def prometheus_factory(tmp_path: Path) -> Iterator[Callable[[int], Prometheus]]:
    assert shutil.which(PROMETHEUS), "prometheus is not installed (apt-get install prometheus)"
    made: list[Prometheus] = []

    def make(relay_http_port: int) -> Prometheus:
        base = tmp_path / "prometheus"
        base.mkdir()
        prom = Prometheus(base, relay_http_port)
        made.append(prom)
        prom.start()
        return prom

    yield make
    for prom in made:
        prom.stop()


def dashboard_queries() -> list[tuple[str, str]]:
    """Each panel's queries as Grafana sends them with every variable at "All"."""
    dashboard = json.loads((ROOT / "monitoring" / "dashboard.json").read_text())
    return [(p["title"], t["expr"].replace("$__rate_interval", "1m")
             .replace("$sender_domain", ".*").replace("$credential", ".*"))
            for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def message(i: int) -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "app@example.com"
    msg["To"] = f"user{i}@dest.test"
    msg["Subject"] = "prometheus test"
    msg.set_content("hello\n")
    return msg


async def send(relay: RelayProcess, count: int, start: int = 0) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submission"],
                           tls_context=relay.client_tls(), start_tls=True, timeout=10)
    await smtp.connect()
    await smtp.login("app", "app-password")
    for i in range(start, start + count):
        await smtp.send_message(message(i))
    await smtp.quit()


async def until(prom: Prometheus, what: str, check: Callable[[], bool], deadline: float) -> None:
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{prom.output()}")
        await asyncio.sleep(0.25)


async def test_prometheus_scrapes_the_relay_and_evaluates_the_rules(
    relay_factory: Callable[..., RelayProcess],
    smtp_sink: Callable[..., Any],
    prometheus_factory: Callable[[int], Prometheus],
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)
    # One delivery before the first scrape, so the outcome series exist from the start.
    await send(relay, 1)
    await sink.wait_for_messages(1)

    prom = prometheus_factory(relay.http_port)
    deadline = time.monotonic() + DEADLINE
    await until(prom, "prometheus ready", prom.ready, deadline)
    await until(prom, "relay scraped", lambda: bool(prom.query(
        'up{job="mailplane-relay"} == 1 and on() mailplane_relay_ready == 1')), deadline)

    # More mail after the first scrape: the recorded rates become positive.
    await send(relay, 2, start=1)
    await sink.wait_for_messages(3)

    def delivered_rate() -> bool:
        rows = prom.query('sender_domain:mailplane_relay_recipients:rate5m{outcome="delivered"}')
        return bool(rows) and float(rows[0]["value"][1]) > 0

    await until(prom, "recorded delivery rate", delivered_rate, deadline)
    [row] = prom.query('sender_domain:mailplane_relay_recipients:rate5m{outcome="delivered"}')
    assert row["metric"] == {"__name__": "sender_domain:mailplane_relay_recipients:rate5m",
                             "sender_domain": "example.com", "outcome": "delivered"}
    [by_credential] = prom.query(
        'credential:mailplane_relay_recipients:rate5m{outcome="delivered"}')
    assert by_credential["metric"]["credential"] == "app"
    [ratio] = prom.query("sender_domain:mailplane_relay_bounce_ratio:rate1h")
    assert float(ratio["value"][1]) == 0.0  # three delivered, none bounced

    # Every shipped rule loaded and evaluated without error, and no alert fires for a healthy
    # relay.
    groups = prom.api("rules")["groups"]
    rules = [r for g in groups for r in g["rules"]]
    shipped = [r for g in yaml.safe_load((ROOT / "monitoring" / "rules.yaml").read_text())
               ["groups"] for r in g["rules"]]
    assert len(rules) == len(shipped)
    assert [(r["name"], r.get("lastError", "")) for r in rules if r["health"] != "ok"] == []
    firing = [r["name"] for r in rules if r["type"] == "alerting" and r["state"] == "firing"]
    assert firing == []

    # Every dashboard query runs against the live server, and the relay panels show data.
    with_data = set()
    for title, expr in dashboard_queries():
        if prom.query(expr):
            with_data.add(title)
    assert {"Messages accepted", "Recipient outcomes", "Queue depth", "TLS share",
            "Messages by credential", "Outcomes by sender domain", "Ready relays"} <= with_data
    assert relay.stop() == 0
