"""A destination's suspension is the relay's, not a worker's: a real relay with two worker
processes, both holding mail for a loopback peer that answers every connection ``421 4.7.0``
(throttling). Each backoff step gets one probe connection from the whole relay, not one per
worker; a restart keeps the step reached and the end of the suspension in force (no connection
before it, and the next failure is the next step); ``mailplane queue destinations`` and the
metrics of every worker show the suspension. Connections are counted by the peer, the steps read
from the shared file in the spool root."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mailplane_relay.delivery.suspensions import FILE_NAME
from tests.helpers.relayproc import RelayProcess
from tests.relay.test_queue_admin import queue, send
from tests.relay.test_spool_workers import eventually, restart

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

KEY_PREFIX = "smarthost:127.0.0.1:"


class Throttler:
    """Answers every connection ``421 4.7.0`` and closes it; records when each came."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        return int(self.server.sockets[0].getsockname()[1])

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.times.append(time.time())
        try:
            writer.write(b"421 4.7.0 throttled: too many connections, slow down\r\n")
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


def entry(relay: RelayProcess) -> dict[str, Any] | None:
    """The destination's record in the shared file (None: not suspended)."""
    try:
        doc = json.loads((relay.spool_dir / FILE_NAME).read_text())
    except (FileNotFoundError, ValueError):
        return None
    found = [v for k, v in doc["destinations"].items() if k.startswith(KEY_PREFIX)]
    return found[0] if found else None


def step(relay: RelayProcess) -> int:
    e = entry(relay)
    return 0 if e is None else int(e["failures"])


async def test_one_probe_per_backoff_step_per_relay_and_a_restart_keeps_the_backoff(
    relay_factory: Callable[..., RelayProcess], tmp_path: Path,
) -> None:
    peer = Throttler()
    port = await peer.start()
    relay = relay_factory(smarthost_port=port, workers=2, extra={
        "queue": {"retryInitial": "1s", "retryMax": "60s", "retryJitter": 0.0}})
    try:
        await restart(relay, 2)
        n = 0
        while n < 4 or not all(any((relay.spool_dir / w).glob("*.msg")) for w in ("w0", "w1")):
            assert n < 60, "the kernel never gave worker 1 a connection"
            await send(relay, f"u{n}@dest.test", n)
            n += 1
        # Steps of 1, 2, 4, 8 and 16 seconds: wait for the fifth (16 s ahead, for the restart).
        await eventually(lambda: step(relay) >= 5, "five suspensions in a row", timeout=60)
        reached = step(relay)
        # Both workers may meet the peer once before the first suspension is recorded; from
        # then on, one probe per step for the relay (two workers probing apart would double it).
        assert len(peer.times) <= reached + 1, (len(peer.times), reached)

        # Both workers show the suspension: the table, and the destinations gauge.
        dests = [json.loads(line) for line in
                 queue(relay, "destinations", "--json").stdout.splitlines()]
        suspended = [d for d in dests if d["destination"].startswith(KEY_PREFIX)
                     and d["state"] == "suspended"]
        assert {d["worker"] for d in suspended} == {"w0", "w1"}, dests
        assert all("421 4.7.0 throttled" in d["reason"] and d["failures"] == reached
                   for d in suspended), [(d["reason"], d["failures"], reached)
                                         for d in suspended]
        # One destination suspended for the relay: counted once, not once per worker.
        assert relay.metric("mailplane_relay_delivery_destinations", state="suspended") == 1

        # A restart while the suspension runs: it keeps its end and its step.
        assert await asyncio.to_thread(relay.stop) == 0
        kept = entry(relay)
        assert kept is not None and kept["failures"] == reached
        before = len(peer.times)
        await restart(relay, 2)
        until = float(kept["until"])
        assert time.time() < until, "the restart outlasted the suspension: nothing to check"
        await eventually(lambda: step(relay) >= reached + 1, "the next step after the restart",
                         timeout=60)
        after = peer.times[before:]
        assert after and all(t >= until for t in after), (after, until)
        assert step(relay) == reached + 1  # the schedule went on, not back to its start
        assert len(after) == 1, after  # one probe for the relay
    finally:
        await peer.stop()
