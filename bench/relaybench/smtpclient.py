"""Our own SMTP clients: latency probes and the authenticated STARTTLS load.

smtp-source is the bulk load of the plain figure, but it cannot stamp times, speak TLS or AUTH.
These clients stamp every message with ``X-Bench-Sent: <kind> <seq> <time_ns>`` so the sink
can compute end-to-end latency. They are written on asyncio streams (uvloop when installed)
rather than aiosmtplib to keep the client's CPU small: it shares the 2 cores with the relay.

``python -m relaybench.smtpclient load ...`` runs the authenticated load as its own process
(so its CPU is measured apart) and prints one JSON line of results.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import ssl
import sys
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")


def run_fast(coro: Coroutine[Any, Any, T]) -> T:
    """asyncio.run on uvloop when it is installed (it is a relay dependency)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: T = uvloop.run(coro)
    return result


class SMTPReplyError(Exception):
    def __init__(self, step: str, code: int, text: str) -> None:
        super().__init__(f"{step}: {code} {text}")
        self.step = step
        self.code = code
        self.text = text


def build_message(*, mail_from: str, rcpt: str, size: int, kind: str, seq: int) -> bytes:
    """A message with a send-time stamp and a ``size``-byte body of 76-character lines."""
    now_ns = time.time_ns()
    headers = (
        f"From: <{mail_from}>\r\n"
        f"To: <{rcpt}>\r\n"
        f"Subject: bench {kind} {seq}\r\n"
        f"Date: {time.strftime('%a, %d %b %Y %H:%M:%S +0000', time.gmtime())}\r\n"
        f"Message-ID: <{kind}.{seq}.{now_ns}@{mail_from.rpartition('@')[2]}>\r\n"
        "MIME-Version: 1.0\r\n"
        "Content-Type: text/plain; charset=us-ascii\r\n"
        f"X-Bench-Sent: {kind} {seq} {now_ns}\r\n"
        "\r\n"
    ).encode()
    line = b"x" * 76 + b"\r\n"
    full, rest = divmod(size, len(line))
    body = line * full + (b"y" * max(0, rest - 2) + b"\r\n" if rest else b"")
    return headers + body


class Connection:
    """One SMTP client connection: no pipelining, like smtp-source."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
        conn = cls(reader, writer)
        await conn.expect("banner", 220)
        return conn

    async def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            line = await self.reader.readline()
            if not line:
                raise ConnectionError("connection closed by the server")
            lines.append(line[4:].strip().decode("utf-8", "replace"))
            if line[3:4] != b"-":
                return int(line[:3]), " ".join(lines)

    async def expect(self, step: str, code: int) -> str:
        got, text = await self.reply()
        if got != code:
            raise SMTPReplyError(step, got, text)
        return text

    async def command(self, line: str, step: str, code: int = 250) -> str:
        self.writer.write(line.encode() + b"\r\n")
        return await self.expect(step, code)

    async def starttls(self, context: ssl.SSLContext, server_hostname: str) -> None:
        await self.command("STARTTLS", "STARTTLS", 220)
        await self.writer.start_tls(context, server_hostname=server_hostname)

    async def auth_plain(self, username: str, password: str) -> None:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        await self.command(f"AUTH PLAIN {token}", "AUTH", 235)

    async def send(self, mail_from: str, rcpt: str, message: bytes) -> str:
        await self.command(f"MAIL FROM:<{mail_from}>", "MAIL")
        await self.command(f"RCPT TO:<{rcpt}>", "RCPT")
        await self.command("DATA", "DATA", 354)
        # Messages we build never have a line starting with '.', so no dot-stuffing needed.
        self.writer.write(message + b".\r\n")
        return await self.expect("end of DATA", 250)

    async def quit(self) -> None:
        try:
            self.writer.write(b"QUIT\r\n")
            await asyncio.wait_for(self.reply(), 2)
        except (OSError, ConnectionError, TimeoutError, ValueError):
            pass
        finally:
            self.writer.close()


@dataclass
class ProbeResults:
    sent: int = 0
    accepted: int = 0
    errors: dict[str, int] = field(default_factory=dict)


async def probe_loop(
    *,
    host: str,
    port: int,
    mail_from: str,
    rcpt: str,
    size: int,
    interval: float,
    stop: asyncio.Event,
    results: ProbeResults,
    timeout: float = 60.0,
) -> None:
    """One stamped message per connection every ``interval`` seconds until ``stop`` is set."""
    tasks: set[asyncio.Task[None]] = set()

    async def one(seq: int) -> None:
        message = build_message(mail_from=mail_from, rcpt=rcpt, size=size, kind="p", seq=seq)
        try:
            async with asyncio.timeout(timeout):
                conn = await Connection.open(host, port, timeout)
                try:
                    await conn.command("EHLO probe.bench.test", "EHLO")
                    await conn.send(mail_from, rcpt, message)
                    results.accepted += 1
                finally:
                    await conn.quit()
        except SMTPReplyError as exc:
            key = f"{exc.step} {exc.code}"
            results.errors[key] = results.errors.get(key, 0) + 1
        except (OSError, ConnectionError, TimeoutError, ValueError) as exc:
            key = type(exc).__name__
            results.errors[key] = results.errors.get(key, 0) + 1

    seq = 0
    next_at = time.monotonic()
    try:
        while not stop.is_set():
            seq += 1
            results.sent += 1
            task = asyncio.create_task(one(seq), name=f"probe-{seq}")
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            next_at += interval
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, next_at - time.monotonic()))
        if tasks:
            await asyncio.wait(tasks, timeout=timeout)
    finally:
        for task in tasks:
            task.cancel()


async def load(args: argparse.Namespace) -> dict[str, Any]:
    """``connections`` sessions share ``messages``; each session does STARTTLS and AUTH once
    (when asked) and then sends message after message on the same connection."""
    context: ssl.SSLContext | None = None
    if args.tls:
        context = ssl.create_default_context(cafile=args.cafile)
        context.check_hostname = False  # the bench certificate names 127.0.0.1 and localhost
    total: int = args.messages
    remaining = total
    accepted = 0
    errors: dict[str, int] = {}
    submit_times: list[float] = []

    def take() -> int | None:
        nonlocal remaining
        if remaining <= 0:
            return None
        remaining -= 1
        return total - remaining

    async def session(index: int) -> None:
        nonlocal accepted
        while remaining > 0:
            try:
                conn = await Connection.open(args.host, args.port, 30)
            except (OSError, ConnectionError, TimeoutError, SMTPReplyError) as exc:
                key = f"connect {type(exc).__name__}"
                errors[key] = errors.get(key, 0) + 1
                await asyncio.sleep(0.1)
                continue
            try:
                await conn.command(f"EHLO load{index}.bench.test", "EHLO")
                if context is not None:
                    await conn.starttls(context, "localhost")
                    await conn.command(f"EHLO load{index}.bench.test", "EHLO")
                if args.username:
                    await conn.auth_plain(args.username, os.environ["BENCH_PASSWORD"])
                while (seq := take()) is not None:
                    message = build_message(
                        mail_from=args.mail_from, rcpt=args.rcpt, size=args.size,
                        kind="l", seq=seq,
                    )
                    started = time.monotonic()
                    try:
                        await asyncio.wait_for(conn.send(args.mail_from, args.rcpt, message), 60)
                    except SMTPReplyError as exc:
                        key = f"{exc.step} {exc.code}"
                        errors[key] = errors.get(key, 0) + 1
                        await conn.command("RSET", "RSET")
                        continue
                    accepted += 1
                    submit_times.append(time.monotonic() - started)
                await conn.quit()
                return
            except (OSError, ConnectionError, TimeoutError, SMTPReplyError, ssl.SSLError) as exc:
                key = f"session {type(exc).__name__}: {exc}"[:120]
                errors[key] = errors.get(key, 0) + 1
                conn.writer.close()
                await asyncio.sleep(0.1)

    started = time.time()
    await asyncio.gather(*(session(i) for i in range(args.connections)))
    submit_times.sort()
    n = len(submit_times)
    return {
        "started": started,
        "finished": time.time(),
        "accepted": accepted,
        "errors": errors,
        "submit_median_s": submit_times[n // 2] if n else None,
        "submit_p99_s": submit_times[min(n - 1, int(n * 0.99))] if n else None,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("load", help="send many stamped messages over reused connections")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--messages", type=int, required=True)
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--size", type=int, default=2048)
    p.add_argument("--mail-from", required=True)
    p.add_argument("--rcpt", required=True)
    p.add_argument("--tls", action="store_true", help="STARTTLS before AUTH and MAIL")
    p.add_argument("--cafile", default=None)
    p.add_argument("--username", default=None, help="AUTH PLAIN; password in $BENCH_PASSWORD")
    args = parser.parse_args()
    result = run_fast(load(args))
    sys.stdout.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
