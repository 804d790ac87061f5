"""`mailplane queue` hold, release and flush of many messages: the real control socket and the
real client (``request_all``, as the CLI calls it) against a delivery queue with thousands of
messages in a real spool (fsync on). A hold or release of a destination's backlog makes each
slice of state files durable with one group commit (one directory fsync per slice, not per
message; every state file on disk says held), the client is sent progress lines and the final
count, and a flush of everything runs in slices with the event loop free in between."""

from __future__ import annotations

import asyncio
import json
import math
import shutil
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mailplane_relay.control import ControlServer, request_all
from mailplane_relay.delivery import queue as queue_module
from mailplane_relay.delivery.queue import ADMIN_SLICE, DeliveryQueue
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.spool import QueuedMessage, Spool
from mailplane_relay.store import MessageLog, SqliteBackend, SuppressionList
from tests.relay.test_delivery_flows import make_config

pytestmark = pytest.mark.timeout(300)

N = 2000


class Bulk:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.metrics = RelayMetrics.create()
        self.spool = Spool(str(base / "spool"), fsync=True, metrics=self.metrics)
        self.store = SqliteBackend(str(base / "log.sqlite3"))
        self.log = MessageLog(self.store, flush_interval=0.05, metrics=self.metrics)
        self.suppression = SuppressionList(self.store, self.metrics)
        # Nothing listens on port 9: no attempt is started anyway (the scheduler is not run,
        # so the commands act on the schedule alone, as they do between attempts).
        config = make_config({"mode": "smarthost", "smarthost": {
            "host": "127.0.0.1", "port": 9, "tls": "none"}})
        self.queue = DeliveryQueue(config=lambda: config, spool=self.spool, log=self.log,
                                   suppression=self.suppression, metrics=self.metrics)
        self.control = ControlServer(base / "control" / "w0.sock", queue=self.queue,
                                     spool=self.spool)
        self.ids: list[str] = []

    async def fill(self, n: int) -> None:
        later = time.time() + 3600

        async def one(i: int) -> QueuedMessage:
            return await self.spool.commit(
                mail_from="app@example.com", recipients=[f"u{i}@bulk.test"],
                data=b"Subject: bulk\r\n\r\nbody\r\n", message_id=None, credential="app",
                sender_domain="example.com", listener="submission")

        for start in range(0, n, 500):
            for msg in await asyncio.gather(*(one(i) for i in range(start, min(n, start + 500)))):
                msg.next_attempt = later
                self.queue.submit(msg)
                self.ids.append(msg.queue_id)

    def ask(self, request: dict[str, object]) -> tuple[object, list[tuple[int, int]]]:
        seen: list[tuple[int, int]] = []
        answers, stale = request_all(self.base / "control", request,
                                     progress=lambda _w, done, total: seen.append((done, total)))
        assert stale == []
        [(worker, answer)] = answers
        assert worker == "w0" and answer["ok"] is True, answer
        return answer["result"], seen


@pytest.fixture
async def bulk() -> AsyncIterator[Bulk]:
    base = Path(tempfile.mkdtemp(prefix="qb-", dir="/tmp"))  # a short socket path
    b = Bulk(base)
    await b.spool.start()
    await b.store.open()
    await b.control.start()
    try:
        yield b
    finally:
        await b.control.close()
        await b.store.close()
        await b.spool.close()
        shutil.rmtree(base)


def held_on_disk(spool: Spool) -> int:
    held = 0
    for path in spool.directory.glob("*.state"):
        if json.loads(path.read_bytes())["extra"].get("held"):
            held += 1
    return held


async def test_holding_and_releasing_a_large_destination_is_group_committed(
        bulk: Bulk) -> None:
    await bulk.fill(N)
    dir_syncs, file_syncs = bulk.spool.dir_fsyncs, bulk.spool.file_fsyncs
    result, seen = await asyncio.to_thread(bulk.ask, {"op": "hold", "destination": "bulk.test"})
    assert isinstance(result, list) and sorted(result) == sorted(bulk.ids)
    assert seen and seen[-1] == (N, N)  # the client heard how far it got, and the end
    # Durable when answered: every state file says held. One fdatasync per state file, and one
    # directory fsync per slice of ADMIN_SLICE messages (not one per message).
    assert held_on_disk(bulk.spool) == N
    assert bulk.spool.file_fsyncs - file_syncs == N
    assert bulk.spool.dir_fsyncs - dir_syncs == math.ceil(N / ADMIN_SLICE)
    assert all(bulk.queue.state_by_id(q) == "held" for q in bulk.ids)
    # Holding again holds nothing more, and writes nothing.
    result, _ = await asyncio.to_thread(bulk.ask, {"op": "hold", "destination": "bulk.test"})
    assert result == []

    dir_syncs = bulk.spool.dir_fsyncs
    result, seen = await asyncio.to_thread(
        bulk.ask, {"op": "release", "destination": "bulk.test"})
    assert isinstance(result, list) and len(result) == N and seen[-1] == (N, N)
    assert held_on_disk(bulk.spool) == 0
    assert bulk.spool.dir_fsyncs - dir_syncs == math.ceil(N / ADMIN_SLICE)
    assert all(bulk.queue.state_by_id(q) == "scheduled" for q in bulk.ids)

    result, seen = await asyncio.to_thread(bulk.ask, {"op": "flush"})
    assert isinstance(result, dict) and len(result["messages"]) == N
    assert seen[-1] == (N, N)


async def test_flushing_everything_leaves_the_event_loop_free_between_slices(
        bulk: Bulk, monkeypatch: pytest.MonkeyPatch) -> None:
    await bulk.fill(1000)
    monkeypatch.setattr(queue_module, "FLUSH_SLICE", 100)
    ran = [False]
    interleaved: list[bool] = []

    async def other_work() -> None:
        while True:
            ran[0] = True
            await asyncio.sleep(0)

    def progress(done: int, total: int) -> None:
        interleaved.append(ran[0])
        ran[0] = False

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    try:
        flushed = await bulk.queue.flush_many(bulk.queue.queued_ids(), progress)
    finally:
        other.cancel()
    assert len(flushed) == 1000 and len(interleaved) == 10
    # Between two slices the loop ran the other task: no slice follows another at once.
    assert all(interleaved[1:]), interleaved
