"""A fast counting SMTP sink: the destination of every benchmark run.

Run as its own process (``python -m relaybench.sink --port 0``) so its CPU is measured apart
and it competes with the relay only for the CPU it really uses. It speaks just enough SMTP for
a relay's delivery client (EHLO/HELO, MAIL, RCPT, DATA, RSET, NOOP, QUIT; PIPELINING), never
stores a message, and for each one records its arrival time and, when the message carries an
``X-Bench-Sent: <kind> <seq> <ns>`` header stamped by our own clients, the stamp: arrival
minus stamp is the end-to-end latency. Messages without a stamp are the smtp-source bulk load.

Control is line-based over stdin/stdout: the first stdout line is ``PORT <n>``; then ``count``
answers a small JSON object, ``dump`` the full statistics, ``quit`` stops. Written on raw
asyncio protocols (uvloop when installed) because aiosmtpd costs several times more CPU per
message, and that CPU would be taken from the relay under test on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import threading
import time
from array import array
from pathlib import Path
from typing import Any, cast

from relaybench.smtpclient import run_fast

STAMP = b"X-Bench-Sent: "
_EHLO = (
    b"250-bench-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SIZE 104857600\r\n"
    b"250 ENHANCEDSTATUSCODES\r\n"
)


class Counters:
    def __init__(self, samples_dir: Path | None, keep_samples: int) -> None:
        self.bulk_arrivals = array("d")
        self.stamped: list[tuple[str, int, float, float]] = []  # kind, seq, sent, arrived
        self.dkim_signed = 0
        self.messages = 0
        self.connections = 0
        self.samples_dir = samples_dir
        self.keep_samples = keep_samples
        self.samples_kept = 0
        self.started = time.time()

    def message(self, data: bytes) -> None:
        now = time.time()
        self.messages += 1
        end = data.find(b"\r\n\r\n")
        header = data if end < 0 else data[: end + 2]
        if b"DKIM-Signature:" in header or b"dkim-signature:" in header:
            self.dkim_signed += 1
            if self.samples_dir is not None and self.samples_kept < self.keep_samples:
                self.samples_kept += 1
                (self.samples_dir / f"sample-{self.samples_kept}.eml").write_bytes(data)
        i = header.find(STAMP)
        if i < 0:
            self.bulk_arrivals.append(now)
            return
        line_end = header.find(b"\r\n", i)
        try:
            kind, seq, sent_ns = header[i + len(STAMP) : line_end].split()
            self.stamped.append((kind.decode(), int(seq), int(sent_ns) / 1e9, now))
        except ValueError:
            self.bulk_arrivals.append(now)

    def count(self) -> dict[str, Any]:
        last = self.bulk_arrivals[-1] if self.bulk_arrivals else None
        return {
            "messages": self.messages,
            "bulk": len(self.bulk_arrivals),
            "stamped": len(self.stamped),
            "dkim_signed": self.dkim_signed,
            "connections": self.connections,
            "last_bulk_arrival": last,
        }

    def dump(self) -> dict[str, Any]:
        out = self.count()
        out["bulk_arrivals"] = list(self.bulk_arrivals)
        out["stamped_messages"] = self.stamped
        return out


class SinkProtocol(asyncio.Protocol):
    def __init__(self, counters: Counters) -> None:
        self.counters = counters
        self.buf = bytearray()
        self.in_data = False
        self.scan_from = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, but have the same API.
        self.transport = cast(asyncio.Transport, transport)
        self.counters.connections += 1
        self.transport.write(b"220 bench-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        out: list[bytes] = []
        close = False
        while buf:
            if self.in_data:
                # A lone "." right after DATA is an empty message (end -2 cuts nothing).
                end = -2 if buf.startswith(b".\r\n") else buf.find(b"\r\n.\r\n", self.scan_from)
                if end == -1:
                    self.scan_from = max(0, len(buf) - 4)
                    break
                self.counters.message(bytes(buf[: end + 2]))
                del buf[: end + 5]
                self.in_data = False
                self.scan_from = 0
                out.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            eol = buf.find(b"\r\n")
            if eol == -1:
                if len(buf) > 4096:
                    out.append(b"500 5.5.2 Line too long\r\n")
                    close = True
                break
            verb = bytes(buf[:4]).upper()
            del buf[: eol + 2]
            if verb == b"EHLO":
                out.append(_EHLO)
            elif verb in (b"MAIL", b"RCPT", b"RSET", b"NOOP", b"HELO"):
                out.append(b"250 2.0.0 Ok\r\n")
            elif verb == b"DATA":
                out.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                self.in_data = True
            elif verb == b"QUIT":
                out.append(b"221 2.0.0 Bye\r\n")
                close = True
                break
            else:
                out.append(b"502 5.5.2 Command not implemented\r\n")
        if self.transport is not None:
            if out:
                self.transport.write(b"".join(out))
            if close:
                self.transport.close()


def _control(loop: asyncio.AbstractEventLoop, counters: Counters, done: asyncio.Event) -> None:
    """Answer control commands from stdin; runs in a thread, reads counters via the loop."""

    def ask(what: str) -> dict[str, Any]:
        return asyncio.run_coroutine_threadsafe(_snapshot(counters, what), loop).result(30)

    for line in sys.stdin:
        cmd = line.strip()
        if cmd in ("count", "dump"):
            sys.stdout.write(json.dumps(ask(cmd)) + "\n")
            sys.stdout.flush()
        elif cmd == "quit":
            break
    loop.call_soon_threadsafe(done.set)


async def _snapshot(counters: Counters, what: str) -> dict[str, Any]:
    return counters.count() if what == "count" else counters.dump()


async def serve(port: int, samples_dir: Path | None, keep_samples: int) -> None:
    loop = asyncio.get_running_loop()
    counters = Counters(samples_dir, keep_samples)
    server = await loop.create_server(
        lambda: SinkProtocol(counters), "127.0.0.1", port, backlog=1024, reuse_address=True
    )
    bound = server.sockets[0].getsockname()[1]
    for sock in server.sockets:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sys.stdout.write(f"PORT {bound}\n")
    sys.stdout.flush()
    done = asyncio.Event()
    threading.Thread(target=_control, args=(loop, counters, done), daemon=True).start()
    try:
        await done.wait()
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--samples-dir", type=Path, default=None)
    parser.add_argument("--keep-samples", type=int, default=3)
    args = parser.parse_args()
    run_fast(serve(args.port, args.samples_dir, args.keep_samples))


if __name__ == "__main__":
    main()
