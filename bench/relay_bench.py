"""Relay throughput and latency: Mailplane against a stock Postfix, same machine, same run.

    .venv/bin/python bench/relay_bench.py                       # full run, 20,000 messages
    .venv/bin/python bench/relay_bench.py --messages 2000       # quick run, under a minute
    .venv/bin/python bench/relay_bench.py --only mailplane --profile

Scenarios (docs/benchmarks.md explains the method):
- harness: smtp-source straight into the sink, and our own client straight into the sink, to
  show neither load tool nor sink is the bottleneck;
- plain: smtp-source (20 sessions, one message per connection, 2 KB) → relay → sink, for
  Postfix and for Mailplane, with stamped latency probes sent through the relay meanwhile;
- auth-tls-dkim (Mailplane only): our client, 20 connections each doing STARTTLS + AUTH once
  and then sending message after message, the sender's domain signing with RSA-2048 DKIM.

Prints a table and writes the full results as JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from statistics import median
from typing import Any, Protocol

from relaybench.procstat import (
    ProcCPU,
    machine_busy,
    read_proc,
    tree_cpu_delta,
    tree_kernel_delta,
    tree_snapshot,
)
from relaybench.sinkproc import SinkProcess, child_env, kill_group
from relaybench.smtpclient import ProbeResults, probe_loop, run_fast

SMTP_SOURCE = "/usr/sbin/smtp-source"
RESULTS_DIR = Path(__file__).resolve().parent / "results"
RCPT = "to@dest.test"
PROBE_RCPT = "probe@dest.test"
DKIM_SCENARIO = "auth+starttls+dkim-rsa2048"


class Relay(Protocol):
    name: str
    port: int

    def start(self) -> None: ...
    def stop(self) -> None: ...
    def root_pids(self) -> list[int]: ...
    def log_tail(self, lines: int = ...) -> str: ...


@dataclass
class RunResult:
    system: str
    scenario: str
    messages: int
    sessions: int
    size: int
    round: int = 1
    complete: bool = False
    delivered: int = 0
    delivered_per_s: float | None = None
    accepted_per_s: float | None = None
    latency_s: dict[str, float | None] = field(default_factory=dict)
    latency_samples: int = 0
    relay_cpu_s: float | None = None
    relay_cpu_split: dict[str, float] = field(default_factory=dict)
    relay_kernel_cpu_s: float | None = None  # the system-call part of relay_cpu_s
    relay_cpu_ms_per_msg: float | None = None
    sink_cpu_s: float | None = None
    load_cpu_s: float | None = None
    machine_busy_pct: float | None = None
    other_cpu_s: float | None = None  # CPU of everything else on the machine meanwhile
    drain_lag_s: float | None = None  # last delivery minus end of submission: queue backlog
    dkim_signed: int = 0
    dkim_verified: str | None = None
    probe_errors: dict[str, int] = field(default_factory=dict)
    load_errors: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    timeline_per_s: list[int] = field(default_factory=list)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p90": None, "p99": None, "max": None}
    v = sorted(values)

    def pick(q: float) -> float:
        return round(v[min(len(v) - 1, int(q * len(v)))], 4)

    return {"p50": pick(0.5), "p90": pick(0.9), "p99": pick(0.99), "max": round(v[-1], 4)}


def timeline(arrivals: list[float], t0: float) -> list[int]:
    """Deliveries per second since ``t0``: shows warm-up, stalls and tails."""
    if not arrivals:
        return []
    buckets = [0] * (int(max(arrivals) - t0) + 1)
    for a in arrivals:
        buckets[max(0, int(a - t0))] += 1
    return buckets


class CPUWatch:
    """CPU of the relay's process tree, the sink and the load generator over one window."""

    def __init__(self, relay_pids: list[int], sink_pid: int) -> None:
        self.relay_pids = relay_pids
        self.sink_pid = sink_pid
        self.before: dict[int, ProcCPU] = {}
        self.sink_before = 0.0
        self.machine_before = (0.0, 0.0)
        self.load_seen: dict[int, float] = {}

    def start(self) -> None:
        self.before = {}
        for pid in self.relay_pids:
            self.before.update(tree_snapshot(pid))
        sink = read_proc(self.sink_pid)
        self.sink_before = sink.own if sink else 0.0
        self.machine_before = machine_busy()

    def sample_load(self, pid: int) -> None:
        """The load generator is sampled while it runs: it is gone when we stop the clock."""
        info = read_proc(pid)
        if info is not None:
            self.load_seen[pid] = info.own

    def finish(self, result: RunResult) -> None:
        after: dict[int, ProcCPU] = {}
        for pid in self.relay_pids:
            after.update(tree_snapshot(pid))
        if self.relay_pids:
            split = tree_cpu_delta(self.before, after, root=self.relay_pids[0])
            result.relay_cpu_split = split
            result.relay_cpu_s = round(sum(split.values()), 2)
            result.relay_kernel_cpu_s = tree_kernel_delta(self.before, after)
            if result.delivered:
                result.relay_cpu_ms_per_msg = round(1000 * result.relay_cpu_s / result.delivered, 3)
        sink = read_proc(self.sink_pid)
        if sink:
            result.sink_cpu_s = round(sink.own - self.sink_before, 2)
        result.load_cpu_s = round(sum(self.load_seen.values()), 2)
        busy, total = machine_busy()
        busy -= self.machine_before[0]
        total -= self.machine_before[1]
        if total > 0:
            result.machine_busy_pct = round(100 * busy / total, 1)
            ours = (result.relay_cpu_s or 0) + (result.sink_cpu_s or 0) + result.load_cpu_s
            result.other_cpu_s = round(max(0.0, busy - ours), 1)


async def wait_for_sink(
    sink: SinkProcess, *, bulk: int, stamped: Callable[[], int], deadline: float, label: str,
    stall: float = 20.0,
) -> dict[str, Any]:
    """Poll the sink until it has ``bulk`` unstamped and ``stamped()`` stamped messages, the
    deadline passes, or nothing arrives for ``stall`` seconds (the rest will not come)."""
    last_report = last_progress = time.monotonic()
    seen = -1
    while True:
        count = await sink.ask("count")
        now = time.monotonic()
        if count["bulk"] >= bulk and count["stamped"] >= stamped():
            return count
        if count["messages"] != seen:
            seen, last_progress = count["messages"], now
        if now > deadline or now - last_progress > stall:
            return count
        if now - last_report > 5:
            last_report = now
            print(f"  [{label}] sink has {count['bulk']} bulk + {count['stamped']} stamped",
                  file=sys.stderr)
        await asyncio.sleep(0.1)


def note_duplicates(result: RunResult, dump: dict[str, Any]) -> None:
    """A stamped message that arrived twice was delivered twice (smtp-source's bulk messages
    carry no id, so only stamped ones can be checked)."""
    ids = [(kind, seq) for kind, seq, _sent, _arrived in dump["stamped_messages"]]
    extra = len(ids) - len(set(ids))
    if extra:
        result.notes.append(f"{extra} stamped messages arrived more than once")


async def run_source(
    *, result: RunResult, relay: Relay | None, port: int, sink: SinkProcess, mail_from: str,
    probe_interval: float, timeout: float,
) -> None:
    """smtp-source → (relay →) sink, with latency probes through the same path."""
    watch = CPUWatch(relay.root_pids() if relay else [], sink.pid)
    watch.start()
    stop_probes = asyncio.Event()
    probes = ProbeResults()
    probe_task: asyncio.Task[None] | None = None
    if probe_interval > 0:
        probe_task = asyncio.create_task(probe_loop(
            host="127.0.0.1", port=port, mail_from=mail_from, rcpt=PROBE_RCPT,
            size=result.size, interval=probe_interval, stop=stop_probes, results=probes,
        ), name="probes")
    t0 = time.time()
    deadline = time.monotonic() + timeout
    source = await asyncio.create_subprocess_exec(
        SMTP_SOURCE, "-s", str(result.sessions), "-l", str(result.size),
        "-m", str(result.messages), "-f", mail_from, "-t", RCPT,
        "-M", "source.bench.test", f"127.0.0.1:{port}",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        start_new_session=True,
    )
    try:
        while source.returncode is None and time.monotonic() < deadline:
            watch.sample_load(source.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(source.wait(), 0.2)
        t_sent = time.time()
        stop_probes.set()
        if probe_task is not None:
            await asyncio.wait_for(probe_task, 90)
        if source.returncode is None:
            result.notes.append(f"smtp-source still running after {timeout:.0f}s; killed")
        elif source.returncode != 0:
            assert source.stderr is not None
            err = (await source.stderr.read()).decode(errors="replace").strip()
            result.notes.append(f"smtp-source exit {source.returncode}: {err[-300:]}")
        else:
            result.accepted_per_s = round(result.messages / (t_sent - t0), 1)
    finally:
        await kill_group(source)
    count = await wait_for_sink(
        sink, bulk=result.messages, stamped=lambda: probes.accepted, deadline=deadline,
        label=f"{result.system} {result.scenario}",
    )
    dump = await sink.ask("dump")
    result.delivered = count["bulk"]
    result.complete = count["bulk"] >= result.messages
    arrivals = sorted(dump["bulk_arrivals"])
    if arrivals:
        t_end = arrivals[min(len(arrivals), result.messages) - 1]
        result.delivered_per_s = round(min(len(arrivals), result.messages) / (t_end - t0), 1)
        result.timeline_per_s = timeline(arrivals, t0)
        result.drain_lag_s = round(max(0.0, t_end - t_sent), 3)
    note_duplicates(result, dump)
    lat = [arrived - sent for kind, _seq, sent, arrived in dump["stamped_messages"] if kind == "p"]
    result.latency_s = percentiles(lat)
    result.latency_samples = len(lat)
    result.probe_errors = probes.errors
    if probes.accepted > len(lat):
        result.notes.append(f"{probes.accepted - len(lat)} accepted probes never arrived")
    watch.finish(result)


async def run_client(
    *, result: RunResult, relay: Relay | None, port: int, sink: SinkProcess, mail_from: str,
    tls_ca: Path | None, username: str | None, password: str | None, timeout: float,
) -> None:
    """Our client (connection reuse; optionally STARTTLS + AUTH) → (relay →) sink."""
    watch = CPUWatch(relay.root_pids() if relay else [], sink.pid)
    watch.start()
    args = [
        sys.executable, "-m", "relaybench.smtpclient", "load", "--port", str(port),
        "--messages", str(result.messages), "--connections", str(result.sessions),
        "--size", str(result.size), "--mail-from", mail_from, "--rcpt", RCPT,
    ]
    if tls_ca is not None:
        args += ["--tls", "--cafile", str(tls_ca)]
    env = child_env()
    if username is not None and password is not None:
        args += ["--username", username]
        env["BENCH_PASSWORD"] = password
    deadline = time.monotonic() + timeout
    t0 = time.time()
    client = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env=env, start_new_session=True,
    )
    report: dict[str, Any] = {}
    try:
        assert client.stdout is not None
        out_task = asyncio.create_task(client.stdout.read())
        while client.returncode is None and time.monotonic() < deadline:
            watch.sample_load(client.pid)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.wait(), 0.2)
        if client.returncode == 0:
            out = await out_task
            report = json.loads(out.decode().strip().splitlines()[-1])
        else:
            assert client.stderr is not None
            with contextlib.suppress(TimeoutError):
                err = await asyncio.wait_for(client.stderr.read(), 5)
                result.notes.append(f"client exit {client.returncode}: {err.decode()[-300:]}")
            out_task.cancel()
    finally:
        await kill_group(client)
    if report:
        t0 = report["started"]
        result.load_errors = report["errors"]
        if report["accepted"]:
            result.accepted_per_s = round(report["accepted"] / (report["finished"] - t0), 1)
    want = int(report.get("accepted", result.messages))
    count = await wait_for_sink(
        sink, bulk=0, stamped=lambda: want, deadline=deadline,
        label=f"{result.system} {result.scenario}",
    )
    dump = await sink.ask("dump")
    note_duplicates(result, dump)
    stamped = [
        (sent, arrived) for kind, _s, sent, arrived in dump["stamped_messages"] if kind == "l"
    ]
    result.delivered = len(stamped)
    result.complete = result.delivered >= result.messages
    result.dkim_signed = int(count["dkim_signed"])
    if stamped:
        arrivals = sorted(a for _s, a in stamped)
        result.delivered_per_s = round(len(arrivals) / (arrivals[-1] - t0), 1)
        result.timeline_per_s = timeline(arrivals, t0)
        if report:
            result.drain_lag_s = round(max(0.0, arrivals[-1] - report["finished"]), 3)
    result.latency_s = percentiles([a - s for s, a in stamped])
    result.latency_samples = len(stamped)
    watch.finish(result)


class Profiler:
    """py-spy attached to the relay for one scenario (raw collapsed stacks)."""

    def __init__(self, out: Path, *, gil: bool) -> None:
        self.out = out
        self.gil = gil  # only samples holding the GIL: Python CPU, not threads blocked in fsync
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, pid: int) -> None:
        pyspy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        if not Path(pyspy).exists():
            print("  py-spy not found: .venv/bin/pip install py-spy", file=sys.stderr)
            return
        self.proc = await asyncio.create_subprocess_exec(
            pyspy, "record", "--pid", str(pid), "--subprocesses", "--rate", "100",
            "--nonblocking", *(["--gil"] if self.gil else []),
            "--format", "raw", "--output", str(self.out),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,
        )

    async def stop(self) -> None:
        if self.proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.proc.wait(), 20)
        await kill_group(self.proc)


def _frame_key(frame: str) -> tuple[str, str]:
    """'func (path/file.py:123)' -> ('func (path/file.py)', 'package or area')."""
    func, _, where = frame.partition(" (")
    path = where.rstrip(")").rpartition(":")[0] or where.rstrip(")")
    top = path.split("/")[0]
    area = top.removesuffix(".py") if "/" in path else path.removesuffix(".py")
    if path.startswith("mailplane_relay/"):
        area = path.removesuffix(".py").replace("/", ".")
    return f"{func} ({path})", area


# The relay's stages, recognised by a frame anywhere in a sample's stack (first match wins).
_STAGES = (
    ("delivery (DeliveryQueue, aiosmtplib, DKIM)", ("DeliveryQueue.", "DKIMSigner.")),
    ("spool threads (write, fsync, rename, unlink)", ("Spool._write", "Spool._remove",
                                                      "Spool._fsync", "_unlink_quiet")),
    ("message log (SQLite)", ("MessageLog.", "messagelog.py")),
    ("ingress sessions (aiosmtpd, policy, spool commit)", ("RelaySMTP.", "SMTP.", "Spool.commit",
                                                          "SubmissionServer.")),
    ("metrics and HTTP", ("prometheus_client", "aiohttp")),
)


def _stage(frames: list[str]) -> str:
    for name, markers in _STAGES:
        if any(m in f for f in frames for m in markers):
            return name
    return "other (event loop, threads idle, start-up)"


def summarize_profile(path: Path, top: int = 60) -> dict[str, list[tuple[str, float]]]:
    """Top functions by own and inclusive samples, and own samples by module or package, in %
    of all samples (the event loop's own C code shows as ``Runner.run``)."""
    own: dict[str, int] = defaultdict(int)
    incl: dict[str, int] = defaultdict(int)
    areas: dict[str, int] = defaultdict(int)
    stages: dict[str, int] = defaultdict(int)
    total = 0
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return {}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [f for f in stack.split(";") if not f.startswith("process ")]
        if not frames:
            continue
        total += count
        key, area = _frame_key(frames[-1])
        own[key] += count
        areas[area] += count
        stages[_stage(frames)] += count
        for f in {_frame_key(f)[0] for f in frames}:
            incl[f] += count
    if not total:
        return {}

    def rank(d: dict[str, int]) -> list[tuple[str, float]]:
        ranked = sorted(d.items(), key=lambda kv: -kv[1])[:top]
        return [(k, round(100 * v / total, 1)) for k, v in ranked]

    return {"own": rank(own), "inclusive": rank(incl), "areas": rank(areas),
            "stages": rank(stages),
            "samples": [("total", float(total))]}


async def with_relay(
    relay: Relay, body: Callable[[], Awaitable[None]], result: RunResult,
) -> None:
    try:
        await asyncio.to_thread(relay.start)
    except (RuntimeError, OSError) as exc:
        result.notes.append(f"{relay.name} did not start: {exc}")
        print(f"  {relay.name} did not start: {exc}", file=sys.stderr)
        await asyncio.to_thread(relay.stop)
        return
    try:
        await body()
    finally:
        await asyncio.to_thread(relay.stop)
    if not result.complete:
        result.notes.append(f"log tail: {relay.log_tail(8)}")


def verify_samples(samples: Path, txt: bytes) -> str:
    """Verify the DKIM signatures of the kept sample messages against the bench public key."""
    import dkim

    def dnsfunc(name: bytes | str, timeout: int = 5) -> bytes:
        return txt

    files = sorted(samples.glob("*.eml"))
    if not files:
        return "no signed sample arrived"
    ok = sum(1 for f in files if dkim.verify(f.read_bytes(), dnsfunc=dnsfunc))
    return f"{ok}/{len(files)} sample signatures verify"


async def bench(
    args: argparse.Namespace, tmp: Path, profiles: dict[str, Any],
) -> list[RunResult]:
    results: list[RunResult] = []
    n, s, size = args.messages, args.sessions, args.size
    timeout = args.timeout
    workers = args.workers or os.cpu_count() or 1

    async def scenario(
        result: RunResult, run: Callable[[SinkProcess], Awaitable[None]],
        samples: Path | None = None,
    ) -> None:
        print(f"== {result.system} / {result.scenario}: {result.messages} messages",
              file=sys.stderr)
        sink = await SinkProcess.start(samples)
        try:
            await run(sink)
        finally:
            await sink.stop()
        results.append(result)
        lat = result.latency_s.get("p50")
        print(f"   delivered {result.delivered}/{result.messages} at "
              f"{result.delivered_per_s}/s, median latency {lat}s, relay CPU "
              f"{result.relay_cpu_s}s {result.notes or ''}", file=sys.stderr)

    if not args.skip_harness:
        r = RunResult("harness", "smtp-source→sink", n, s, size)
        await scenario(r, lambda sink: run_source(
            result=r, relay=None, port=sink.port, sink=sink, mail_from="from@plain.test",
            probe_interval=args.probe_interval, timeout=timeout))
        r2 = RunResult("harness", "client→sink", n, s, size)
        await scenario(r2, lambda sink: run_client(
            result=r2, relay=None, port=sink.port, sink=sink, mail_from="from@plain.test",
            tls_ca=None, username=None, password=None, timeout=timeout))

    from relaybench.mailplane import DKIM_DOMAIN, PLAIN_DOMAIN, USERNAME, MailplaneRelay
    from relaybench.postfix import PostfixRelay

    def new_relay(name: str, sink: SinkProcess) -> MailplaneRelay:
        store = ({"backend": "postgresql", "dsnFile": args.store_dsn_file}
                 if args.store_dsn_file else None)
        relay = MailplaneRelay(tmp / name, sink_port=sink.port, workers=workers, store=store)
        relay.write_config()
        return relay

    async def profiled(relay: MailplaneRelay, name: str,
                       body: Callable[[], Awaitable[None]]) -> None:
        if not args.profile:
            await body()
            return
        out = RESULTS_DIR / f"pyspy-{name}-{time.strftime('%Y%m%dT%H%M%S')}.txt"
        RESULTS_DIR.mkdir(exist_ok=True)
        prof = Profiler(out, gil=args.profile == "gil")
        await prof.start(relay.root_pids()[0])
        try:
            await body()
        finally:
            await prof.stop()
        profiles[name] = {"file": str(out), **summarize_profile(out)}

    async def postfix_plain(r: RunResult, sink: SinkProcess) -> None:
        relay = PostfixRelay(tmp / f"postfix-{r.round}", port=free_port(), sink_port=sink.port)
        await with_relay(relay, lambda: run_source(
            result=r, relay=relay, port=relay.port, sink=sink,
            mail_from="from@plain.test", probe_interval=args.probe_interval,
            timeout=timeout), r)

    async def mailplane_plain(r: RunResult, sink: SinkProcess) -> None:
        relay = new_relay(f"mailplane-plain-{r.round}", sink)
        await with_relay(relay, lambda: profiled(relay, "plain", lambda: run_source(
            result=r, relay=relay, port=relay.port, sink=sink,
            mail_from=f"from@{PLAIN_DOMAIN}", probe_interval=args.probe_interval,
            timeout=timeout)), r)

    async def mailplane_dkim(r: RunResult, sink: SinkProcess, samples: Path) -> None:
        relay = new_relay(f"mailplane-dkim-{r.round}", sink)
        await with_relay(relay, lambda: profiled(relay, "dkim", lambda: run_client(
            result=r, relay=relay, port=relay.port, sink=sink,
            mail_from=f"sender@{DKIM_DOMAIN}", tls_ca=relay.cafile,
            username=USERNAME, password=relay.password, timeout=timeout)), r)
        r.dkim_verified = verify_samples(samples, relay.dkim_txt())

    # Rounds alternate the systems, so that load from elsewhere on the machine falls on both.
    for round_no in range(1, args.rounds + 1):
        if args.only in (None, "postfix"):
            r = RunResult("postfix", "plain", n, s, size, round=round_no)
            await scenario(r, partial(postfix_plain, r))
        if args.only in (None, "mailplane"):
            r = RunResult("mailplane", "plain", n, s, size, round=round_no)
            if args.profile:
                r.notes.append("profiled with py-spy (figures are lower than unprofiled)")
            await scenario(r, partial(mailplane_plain, r))
            if not args.skip_dkim:
                r = RunResult("mailplane", DKIM_SCENARIO, n, s, size, round=round_no)
                samples = tmp / f"dkim-samples-{round_no}"
                await scenario(r, partial(mailplane_dkim, r, samples=samples), samples)
    return results


def fmt(v: float | None, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def print_table(results: list[RunResult], profiles: dict[str, Any]) -> None:
    head = (f"{'system':<10} {'scenario':<27} {'msgs':>6} {'sess':>4} {'size':>5} "
            f"{'deliv/s':>8} {'accept/s':>8} {'p50 s':>7} {'p90 s':>7} {'p99 s':>7} "
            f"{'relayCPU':>8} {'ms/msg':>6} {'sinkCPU':>7} {'loadCPU':>7} {'busy%':>5} "
            f"{'otherCPU':>8} {'lag s':>6}")
    print(head)
    print("-" * len(head))
    for r in results:
        lat = r.latency_s
        scenario = r.scenario if r.round == 1 else f"{r.scenario} #{r.round}"
        print(f"{r.system:<10} {scenario:<27} {r.delivered:>6} {r.sessions:>4} {r.size:>5} "
              f"{fmt(r.delivered_per_s):>8} {fmt(r.accepted_per_s):>8} "
              f"{fmt(lat.get('p50'), '.3f'):>7} {fmt(lat.get('p90'), '.3f'):>7} "
              f"{fmt(lat.get('p99'), '.3f'):>7} {fmt(r.relay_cpu_s, '.1f'):>8} "
              f"{fmt(r.relay_cpu_ms_per_msg, '.2f'):>6} {fmt(r.sink_cpu_s, '.1f'):>7} "
              f"{fmt(r.load_cpu_s, '.1f'):>7} {fmt(r.machine_busy_pct, '.0f'):>5} "
              f"{fmt(r.other_cpu_s, '.1f'):>8} {fmt(r.drain_lag_s, '.2f'):>6}"
              + ("" if r.complete else "  INCOMPLETE"))
    def med(system: str, scenario: str, get: Callable[[RunResult], float | None]
            ) -> float | None:
        values = [v for r in results if r.system == system and r.scenario == scenario
                  and r.complete and (v := get(r)) is not None]
        return median(values) if values else None

    def rate(r: RunResult) -> float | None:
        return r.delivered_per_s

    def p50(r: RunResult) -> float | None:
        return r.latency_s.get("p50")

    def projected(r: RunResult) -> float | None:
        """Messages/s if relay, sink and load had every core to themselves: an estimate for
        a busy machine, valid only while the run is CPU-bound (check busy%)."""
        if not r.delivered or r.relay_cpu_s is None:
            return None
        harness = (r.sink_cpu_s or 0) + (r.load_cpu_s or 0)
        return (os.cpu_count() or 1) * r.delivered / (r.relay_cpu_s + harness)

    rounds = max((r.round for r in results), default=1)
    which = f"medians of {rounds} rounds" if rounds > 1 else "one round"
    pf, mp = med("postfix", "plain", rate), med("mailplane", "plain", rate)
    dk = med("mailplane", DKIM_SCENARIO, rate)
    print(f"\nSummary ({which}, complete runs only):")
    if pf and mp:
        print(f"  Mailplane / Postfix delivered/s: {mp:.0f} / {pf:.0f} = {mp / pf:.2f}x "
              "(target >= 2x)")
        pl, ml = med("postfix", "plain", p50), med("mailplane", "plain", p50)
        if pl and ml:
            print(f"  median latency: Mailplane {ml:.3f}s vs Postfix {pl:.3f}s")

        def cpu(r: RunResult) -> float | None:
            return r.relay_cpu_ms_per_msg

        pc, mc = med("postfix", "plain", cpu), med("mailplane", "plain", cpu)
        if pc and mc:
            # CPU per message barely moves with other load on the machine, unlike rates.
            print(f"  relay CPU per message: Mailplane {mc:.2f} ms vs Postfix {pc:.2f} ms "
                  f"({pc / mc:.2f}x as efficient)")
            pp, mpj = med("postfix", "plain", projected), med("mailplane", "plain", projected)
            if pp and mpj:
                print(f"  CPU-bound ceiling on an idle machine (upper bound): Mailplane "
                      f"{mpj:.0f}/s vs Postfix {pp:.0f}/s = {mpj / pp:.2f}x")
    if mp and dk:
        print(f"  auth+STARTTLS+DKIM / plain: {dk:.0f} / {mp:.0f} = {100 * dk / mp:.0f}% "
              "(target >= 50%)")
    for r in results:
        tag = f"{r.system}/{r.scenario}" + (f" #{r.round}" if r.round > 1 else "")
        if r.relay_cpu_split:
            print(f"CPU split {tag}: {r.relay_cpu_split}, of which kernel "
                  f"{r.relay_kernel_cpu_s}s")
        if r.dkim_verified:
            print(f"DKIM {tag}: {r.dkim_signed} signed messages arrived; "
                  f"{r.dkim_verified}")
        for note in r.notes:
            print(f"note {tag}: {note}")
        if r.probe_errors or r.load_errors:
            print(f"errors {tag}: {r.probe_errors or ''} {r.load_errors or ''}")
    for name, prof in profiles.items():
        print(f"\npy-spy {name} ({prof.get('file')}), by stage:")
        for stage, pct in prof.get("stages", []):
            print(f"  {pct:5.1f}%  {stage}")
        print("  top own time:")
        for func, pct in prof.get("own", [])[:15]:
            print(f"  {pct:5.1f}%  {func}")
        print("  by module/package (own time):")
        for area, pct in prof.get("areas", [])[:12]:
            print(f"  {pct:5.1f}%  {area}")
        print("  relay code paths (inclusive time):")
        shown = 0
        for func, pct in prof.get("inclusive", []):
            if "mailplane_relay/" in func and not func.startswith(("<module>", "main ", "_cmd_",
                                                                   "run_relay ")):
                print(f"  {pct:5.1f}%  {func}")
                shown += 1
                if shown == 12:
                    break


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--sessions", type=int, default=20)
    p.add_argument("--size", type=int, default=2048, help="payload bytes per message")
    p.add_argument("--only", choices=("mailplane", "postfix"), default=None)
    p.add_argument("--workers", type=int, default=0, help="Mailplane workers (default: cores)")
    p.add_argument("--probe-interval", type=float, default=0.05,
                   help="seconds between latency probes (0: none)")
    p.add_argument("--timeout", type=float, default=0,
                   help="hard limit per scenario in seconds (default: 60 + messages/50)")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the relay scenarios, alternating systems; the summary takes "
                   "medians (use on a machine that is not quiet)")
    p.add_argument("--store-dsn-file", metavar="PATH", default=None,
                   help="run Mailplane with a PostgreSQL store: a file holding the connection "
                        "string (docs/store.md); default the SQLite file per relay")
    p.add_argument("--skip-harness", action="store_true")
    p.add_argument("--skip-dkim", action="store_true")
    p.add_argument("--profile", nargs="?", const="gil", choices=("gil", "wall"), default=None,
                   help="attach py-spy to the Mailplane relay (gil: samples holding the GIL, "
                   "i.e. Python CPU; wall: every active thread, fsync waits included); "
                   "stacks go to bench/results/")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (logs, spools)")
    args = p.parse_args(argv)
    if not args.timeout:
        args.timeout = 60 + args.messages / 50
    return args


async def interruptible(run: Awaitable[list[RunResult]]) -> list[RunResult]:
    """SIGTERM and SIGINT cancel the run, so that every finally stops what it started.
    (A background job starts with SIGINT ignored, so Ctrl-C handling alone is not enough.)"""
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        return await run
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)


def clean_stale_runs() -> None:
    """Stop the Postfix of an earlier run that was killed before its cleanup could run."""
    for owner in Path(tempfile.gettempdir()).glob("mailplane-bench-*/owner.pid"):
        try:
            os.kill(int(owner.read_text()), 0)
            continue  # that run is still going
        except (ProcessLookupError, ValueError):
            pass
        except PermissionError:
            continue
        etc = owner.parent / "postfix" / "etc"
        if (etc / "main.cf").exists():
            subprocess.run(["/usr/sbin/postfix", "-c", str(etc), "stop"], capture_output=True,
                           timeout=30, check=False)
        print(f"removed the leftovers of an interrupted run: {owner.parent}", file=sys.stderr)
        shutil.rmtree(owner.parent, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    clean_stale_runs()
    for tool in (SMTP_SOURCE,):
        if not Path(tool).exists():
            print(f"{tool} is missing: apt-get install postfix", file=sys.stderr)
            return 2
    tmp = Path(tempfile.mkdtemp(prefix="mailplane-bench-"))
    tmp.chmod(0o755)  # Postfix's unprivileged daemons must reach their queue inside it
    (tmp / "owner.pid").write_text(str(os.getpid()))
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    profiles: dict[str, Any] = {}
    try:
        results = run_fast(interruptible(bench(args, tmp, profiles)))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: every process of the run was stopped", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            (tmp / "owner.pid").unlink(missing_ok=True)  # kept on purpose, not a leftover
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print_table(results, profiles)
    RESULTS_DIR.mkdir(exist_ok=True)
    out = RESULTS_DIR / f"relay-bench-{started.replace(':', '')}.json"
    out.write_text(json.dumps({
        "started": started, "args": vars(args), "cpus": os.cpu_count(),
        "results": [asdict(r) for r in results], "profiles": profiles,
    }, indent=1))
    print(f"\nresults: {out}")
    return 0 if all(r.complete for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
