"""Start-up with a large backlog: a spool of N deferred messages, written directly in the
spool's on-disk format, then the real relay started on it, delivering to the counting sink.

Measures what issue #11 sets as targets for 1,000,000 deferred messages: the relay's resident
memory (max over the run, the process and its children), the time from start to accepting mail
(``/readyz`` 200 and an SMTP greeting), and the time until the backlog's first delivery, plus
the delivery rate over the following seconds::

    .venv/bin/python bench/spool_backlog.py --messages 100000
    .venv/bin/python bench/spool_backlog.py --messages 1000000 --watch 30

The spool is written without fsync (one ``sync`` at the end) under a temp directory, kept only
with ``--keep``; it stays in the page cache (a cold start after a reboot reads from the disk).
Every message is due (its next attempt is in the past), as after an outage.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mailplane_relay.spool import (
    QueuedMessage,
    Recipient,
    new_queue_id,
    queue_id_number,
)
from relaybench.mailplane import PLAIN_DOMAIN, MailplaneRelay
from relaybench.sinkproc import SinkProcess

BODY = b"x" * 70 + b"\r\n"


def write_spool(directory: Path, count: int) -> float:
    """``count`` deferred messages (one recipient, ~1.2 KB each); seconds taken."""
    directory.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    now = time.time()
    last = 0
    for i in range(count):
        qid = new_queue_id(after=last)
        last = queue_id_number(qid)
        data = (f"From: app@{PLAIN_DOMAIN}\r\nTo: user{i}@dest.test\r\n"
                f"Subject: backlog {i}\r\nMessage-ID: <b{i}@{PLAIN_DOMAIN}>\r\n\r\n").encode()
        data += BODY * 12
        msg = QueuedMessage(
            queue_id=qid, mail_from=f"app@{PLAIN_DOMAIN}",
            recipients=[Recipient(f"user{i}@dest.test", attempts=1,
                                  last_response="451 4.3.0 Try again later")],
            received_at=now - 3600, size=len(data), message_id=f"<b{i}@{PLAIN_DOMAIN}>",
            credential=None, sender_domain=PLAIN_DOMAIN, listener="submission",
            next_attempt=now - 60, attempts=1,
        )
        envelope = msg.to_json()
        with open(directory / f"{qid}.msg", "wb") as f:
            f.write(b"MPS1 %d\n%s%s" % (len(envelope), envelope, data))
    os.sync()
    return time.monotonic() - started


def group_rss(root: int) -> int:
    """Resident bytes of ``root`` and its descendants."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def smtp_greets(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            return s.recv(64).startswith(b"220")
    except OSError:
        return False


async def run(args: argparse.Namespace) -> dict[str, object]:
    base = Path(tempfile.mkdtemp(prefix="mailplane-backlog-", dir=args.dir))
    sink = await SinkProcess.start()
    relay = MailplaneRelay(base, sink_port=sink.port, workers=args.workers)
    result: dict[str, object] = {"messages": args.messages, "workers": args.workers}
    try:
        relay.write_config()
        spool = base / "spool"
        if args.workers > 1:
            per = [spool / f"w{i}" for i in range(args.workers)]
            shares = [args.messages // args.workers + (i < args.messages % args.workers)
                      for i in range(args.workers)]
            pairs = zip(per, shares, strict=True)
            result["generate_s"] = round(sum(write_spool(d, n) for d, n in pairs), 1)
        else:
            result["generate_s"] = round(write_spool(spool, args.messages), 1)
        print(f"spool of {args.messages} messages written in {result['generate_s']}s",
              flush=True)

        peak = [0]
        stop = threading.Event()
        started = time.monotonic()
        first_delivery: list[float] = []

        def sample() -> None:
            while not stop.is_set():
                if relay.proc is not None and relay.proc.poll() is None:
                    peak[0] = max(peak[0], group_rss(relay.proc.pid))
                stop.wait(0.2)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        await asyncio.to_thread(relay.start, args.start_timeout)
        ready = time.monotonic() - started
        greets = smtp_greets(relay.port)
        result["accepting_s"] = round(ready, 2)
        result["greeting_ok"] = greets
        print(f"accepting mail after {ready:.2f}s (greeting {'ok' if greets else 'FAILED'})",
              flush=True)
        deadline = time.monotonic() + args.watch
        counts: list[tuple[float, int]] = []
        while time.monotonic() < deadline:
            n = int((await sink.ask("count"))["messages"])
            t = time.monotonic() - started
            counts.append((t, n))
            if n and not first_delivery:
                first_delivery.append(t)
                print(f"first backlog delivery after {t:.2f}s", flush=True)
            await asyncio.sleep(0.5)
        stop.set()
        sampler.join()
        result["first_delivery_s"] = round(first_delivery[0], 2) if first_delivery else None
        delivered = counts[-1][1] if counts else 0
        result["delivered_in_watch"] = delivered
        if first_delivery and delivered:
            result["backlog_rate_per_s"] = round(
                delivered / max(0.001, counts[-1][0] - first_delivery[0]), 1)
        result["peak_rss_mb"] = round(peak[0] / 2**20, 1)
        result["load_1m"] = os.getloadavg()[0]
        return result
    finally:
        relay.stop()
        await sink.stop()
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--watch", type=float, default=30.0,
                        help="seconds to watch deliveries after the start")
    parser.add_argument("--start-timeout", type=float, default=900.0)
    parser.add_argument("--dir", default=None, help="where to make the temp directory")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    print(json.dumps(result))
    out = Path(__file__).resolve().parent / "results"
    out.mkdir(exist_ok=True)
    (out / f"spool-backlog-{int(time.time())}.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
