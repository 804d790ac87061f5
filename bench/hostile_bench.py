"""Hostile destinations: Mailplane (MX mode) against a stock Postfix, in the same topology and run.

A loopback DNS server publishes ``--domains`` recipient domains, each with its own MX host on
its own address in 127.0.0.0/8; one sink port serves all of them, with a behaviour per address:

- **slow** (``--slow-share`` of the domains): answers the final dot after ``--slow-delay``
  seconds (a scanning gateway);
- **throttling** (``--throttlers`` domains): answers ``421 4.7.0`` at the greeting and hangs up;
- **healthy**: answers at once.

Each relay gets ``--rate`` messages per second for ``--duration`` seconds, each to one recipient
at a random domain (the same sequence for both), stamped with its send time, then
``--drain`` seconds to finish. Postfix routes with transport maps to the same sink addresses
(``smtp:[127.x.y.z]:port``), all its other settings stock. Reported per relay: healthy-domain
latency p50/p99 (send to arrival at the sink) and delivered rate, healthy messages missing at the
end, duplicates (a message reaching the sink more than once), connections to the throttling
destinations, and messages the slow destinations received.

    sudo .venv/bin/python bench/hostile_bench.py                 # 40 domains, 200 msg/s, 30 s
    sudo .venv/bin/python bench/hostile_bench.py --duration 10   # quick

Needs root (Postfix) and the project venv with the test extras (the DNS server is the tests'
loopback DNS helper). Results go to ``bench/results/hostile-<time>.json`` (not committed).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import random
import socket
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH), str(BENCH.parent)]

from tests.helpers.dns import running_dns_server  # type: ignore[import-not-found]  # noqa: E402

from relaybench.mailplane import MailplaneRelay  # noqa: E402
from relaybench.postfix import PostfixRelay  # noqa: E402
from relaybench.smtpclient import Connection, build_message  # noqa: E402

SENDER = "app@plain.test"


# ------------------------------------------------------------------------------ the sinks


@dataclass
class Site:
    domain: str
    address: str
    behaviour: str  # healthy | slow | throttle
    connections: int = 0


@dataclass
class Record:
    arrivals: dict[int, list[float]] = field(default_factory=dict)  # seq -> arrival times
    sent: dict[int, tuple[float, str]] = field(default_factory=dict)  # seq -> (sent, domain)

    def arrived(self, seq: int, when: float) -> None:
        self.arrivals.setdefault(seq, []).append(when)


class SiteProtocol(asyncio.Protocol):
    def __init__(self, site: Site, sink: HostileSink) -> None:
        self.site = site
        self.sink = sink
        self.buf = bytearray()
        self.in_data = False
        self.waiting = False  # a slow reply is due: later commands wait for it, in order
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same API.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        self.site.connections += 1
        if self.site.behaviour == "throttle":
            transport.write(b"421 4.7.0 too many connections from your address, slow down\r\n")
            transport.close()
            return
        transport.write(b"220 sink ESMTP\r\n")

    def _reply(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _slow_reply(self) -> None:
        self.waiting = False
        self._reply(b"250 2.0.0 queued (slowly)\r\n")
        self.data_received(b"")  # commands pipelined after the final dot (QUIT, MAIL)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        buf = self.buf
        while buf and not self.waiting:
            if self.in_data:
                end = buf.find(b"\r\n.\r\n")
                if end < 0:
                    return
                message = bytes(buf[:end + 2])
                del buf[:end + 5]
                self.in_data = False
                self.sink.message(message)
                if self.site.behaviour == "slow":
                    self.waiting = True
                    asyncio.get_running_loop().call_later(self.sink.slow_delay,
                                                          self._slow_reply)
                else:
                    self._reply(b"250 2.0.0 queued\r\n")
                continue
            eol = buf.find(b"\r\n")
            if eol < 0:
                return
            verb = bytes(buf[:4]).upper()
            del buf[:eol + 2]
            if verb == b"EHLO":
                self._reply(b"250-sink\r\n250-PIPELINING\r\n250 SIZE 10485760\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                self._reply(b"250 2.0.0 ok\r\n")
            elif verb == b"DATA":
                self._reply(b"354 go\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                self._reply(b"221 2.0.0 bye\r\n")
                if self.transport is not None:
                    self.transport.close()
                return
            else:
                self._reply(b"502 5.5.2 no\r\n")


class HostileSink:
    def __init__(self, sites: list[Site], slow_delay: float) -> None:
        self.sites = sites
        self.slow_delay = slow_delay
        self.record = Record()
        self.servers: list[asyncio.Server] = []
        self.port = 0

    def message(self, data: bytes) -> None:
        now = time.time()
        i = data.find(b"X-Bench-Sent: ")
        if i >= 0:
            _kind, seq, _ns = data[i + 14:data.find(b"\r\n", i)].split()
            self.record.arrived(int(seq), now)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(20):  # one port free on every address
            probe = socket.socket()
            probe.bind((self.sites[0].address, 0))
            port = probe.getsockname()[1]
            probe.close()
            try:
                for site in self.sites:
                    self.servers.append(await loop.create_server(
                        functools.partial(SiteProtocol, site, self), site.address, port,
                        backlog=1024))
            except OSError:
                await self.stop()
                continue
            self.port = port
            return
        raise RuntimeError("no port free on every sink address")

    async def stop(self) -> None:
        for server in self.servers:
            server.close()
        self.servers = []

    def reset(self) -> None:
        self.record = Record()
        for site in self.sites:
            site.connections = 0


# ------------------------------------------------------------------------------ load


async def offer(port: int, plan: list[tuple[int, str]], rate: float, record: Record,
                clients: int) -> int:
    """Send the plan at ``rate`` messages/s over ``clients`` connections; returns failures."""
    queue: asyncio.Queue[tuple[int, str] | None] = asyncio.Queue()
    start = time.monotonic()
    failures = 0

    async def pace() -> None:
        for n, item in enumerate(plan):
            delay = start + n / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            queue.put_nowait(item)
        for _ in range(clients):
            queue.put_nowait(None)

    async def client() -> None:
        nonlocal failures
        conn = await Connection.open("127.0.0.1", port, 10)
        await conn.command("EHLO client.test", "EHLO")
        while (item := await queue.get()) is not None:
            seq, rcpt = item
            data = build_message(mail_from=SENDER, rcpt=rcpt, size=1024, kind="h", seq=seq)
            record.sent[seq] = (time.time(), rcpt.rpartition("@")[2])
            try:
                await conn.send(SENDER, rcpt, data)
            except (OSError, ConnectionError, ValueError) as exc:
                failures += 1
                print(f"  submission failed: {exc}", file=sys.stderr)
                conn = await Connection.open("127.0.0.1", port, 10)
                await conn.command("EHLO client.test", "EHLO")
        await conn.quit()

    await asyncio.gather(pace(), *(client() for _ in range(clients)))
    return failures


def summarise(sink: HostileSink, name: str, window: float) -> dict[str, Any]:
    behaviour = {s.domain: s.behaviour for s in sink.sites}
    record = sink.record
    healthy = [seq for seq, (_, d) in record.sent.items() if behaviour[d] == "healthy"]
    latencies = sorted(record.arrivals[s][0] - record.sent[s][0]
                       for s in healthy if s in record.arrivals)
    arrivals = [record.arrivals[s][0] for s in healthy if s in record.arrivals]
    first_sent = min(t for t, _ in record.sent.values())
    duration = (max(arrivals) - first_sent) if arrivals else window

    def pct(p: float) -> float | None:
        if not latencies:
            return None
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))]

    slow = [s for s, (_, d) in record.sent.items() if behaviour[d] == "slow"]
    return {
        "relay": name,
        "offered": len(record.sent),
        "healthy_offered": len(healthy),
        "healthy_delivered": len(latencies),
        "healthy_missing": len(healthy) - len(latencies),
        "healthy_p50_s": pct(0.50),
        "healthy_p99_s": pct(0.99),
        "healthy_max_s": latencies[-1] if latencies else None,
        "healthy_mean_s": statistics.fmean(latencies) if latencies else None,
        "healthy_rate_per_s": len(latencies) / duration if duration > 0 else None,
        "duplicates": sum(len(v) - 1 for v in record.arrivals.values()),
        "throttler_connections": sum(s.connections for s in sink.sites
                                     if s.behaviour == "throttle"),
        "slow_received": sum(1 for s in slow if s in record.arrivals),
        "slow_offered": len(slow),
    }


# ------------------------------------------------------------------------------ the run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_one(name: str, relay: Any, sink: HostileSink, plan: list[tuple[int, str]],
                  args: argparse.Namespace) -> dict[str, Any]:
    sink.reset()
    await asyncio.to_thread(relay.start)
    try:
        print(f"{name}: offering {len(plan)} messages at {args.rate}/s", file=sys.stderr)
        failures = await offer(relay.port, plan, args.rate, sink.record, args.clients)
        await asyncio.sleep(args.drain)
        result = summarise(sink, name, args.duration + args.drain)
        result["submission_failures"] = failures
        if hasattr(relay, "metrics_text"):
            # The relay's own view: spool commit and acceptance-to-delivery latency.
            result["relay_metrics"] = [
                line for line in relay.metrics_text().splitlines()
                if line.startswith(("mailplane_relay_spool_commit_seconds",
                                    "mailplane_relay_delivery_latency_seconds",
                                    "mailplane_relay_delivery_destination"))]
    finally:
        await asyncio.to_thread(relay.stop)
    print(json.dumps(result, indent=1), file=sys.stderr)
    return result


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    n = args.domains
    kinds = (["throttle"] * args.throttlers + ["slow"] * round(n * args.slow_share))
    kinds += ["healthy"] * (n - len(kinds))
    rng.shuffle(kinds)
    sites = [Site(f"d{i}.hostile.test", f"127.0.{1 + i // 250}.{2 + i % 250}", kinds[i])
             for i in range(n)]
    sink = HostileSink(sites, args.slow_delay)
    await sink.start()
    total = int(args.rate * args.duration)
    plan = [(seq, f"user{seq}@{rng.choice(sites).domain}") for seq in range(total)]
    tmp = Path(tempfile.mkdtemp(prefix="mailplane-hostile-"))
    results: list[dict[str, Any]] = []
    load_before = os.getloadavg()
    with running_dns_server() as dns:
        for site in sites:
            dns.add_mx(site.domain, f"mx.{site.domain}")
            dns.add_a(f"mx.{site.domain}", site.address)
        dns.add_mx("plain.test", "mx.plain.test")
        dns.add_a("mx.plain.test", "127.0.0.1")
        for name in args.only or ["mailplane", "postfix"]:
            if name == "mailplane":
                relay: Any = MailplaneRelay(
                    tmp / "mailplane", sink_port=sink.port, workers=args.workers,
                    delivery={"mode": "mx", "mxPort": sink.port,
                              "resolver": dns.resolver_settings(timeout=2.0)})
                relay.write_config()
            else:
                transport = tmp / "postfix-transport"
                transport.parent.mkdir(parents=True, exist_ok=True)
                transport.write_text("".join(
                    f"{s.domain} smtp:[{s.address}]:{sink.port}\n" for s in sites))
                relay = PostfixRelay(
                    tmp / "postfix", port=free_port(), sink_port=sink.port,
                    extra_main_cf=f"relayhost =\ntransport_maps = texthash:{transport}\n")
            results.append(await run_one(name, relay, sink, plan, args))
    await sink.stop()
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "settings": {k: v for k, v in vars(args).items() if k != "only"},
        "sites": {k: sum(1 for s in sites if s.behaviour == k)
                  for k in ("healthy", "slow", "throttle")},
        "results": results,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--domains", type=int, default=40)
    parser.add_argument("--slow-share", type=float, default=0.25)
    parser.add_argument("--slow-delay", type=float, default=60.0)
    parser.add_argument("--throttlers", type=int, default=4)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--duration", type=float, default=30.0)
    parser.add_argument("--drain", type=float, default=15.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--only", action="append", choices=["mailplane", "postfix"])
    args = parser.parse_args(argv)
    from relaybench.smtpclient import run_fast
    report = run_fast(main_async(args))
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    path = out / f"hostile-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"{'':24}" + "".join(f"{r['relay']:>14}" for r in report["results"]))
    for key in ("healthy_p50_s", "healthy_p99_s", "healthy_rate_per_s", "healthy_missing",
                "duplicates", "throttler_connections", "slow_received", "submission_failures"):
        cells = []
        for r in report["results"]:
            v = r.get(key)
            cells.append(f"{v:>14.3f}" if isinstance(v, float) else f"{v!s:>14}")
        print(f"{key:24}" + "".join(cells))
    print(f"load average before/after: {report['loadavg_before']} / {report['loadavg_after']}")
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
