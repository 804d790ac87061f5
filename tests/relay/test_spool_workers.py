"""Changing ``workers`` never strands mail: a relay restarted with another number of workers
adopts the spool directories of the old layout; one it cannot lock (a live process holds it)
is counted by ``mailplane_relay_spool_orphaned_messages`` and adopted at the next start.

Real relay processes, a real sink that first defers everything (so mail stays spooled across
the restarts) and finally accepts it."""

from __future__ import annotations

import asyncio
import fcntl
import os
import time
from collections.abc import Callable
from typing import Any

import aiosmtplib
import pytest

from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def layout(relay: RelayProcess) -> dict[str, int]:
    """Where the message files lie: '.' for the spool root, 'w<i>' for worker directories."""
    out: dict[str, int] = {}
    for path in relay.spooled_files():
        where = path.parent.relative_to(relay.spool_dir).as_posix()
        out[where] = out.get(where, 0) + 1
    return out


async def send(relay: RelayProcess, ids: range) -> None:
    async def one(i: int) -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submissions"],
                               use_tls=True, tls_context=relay.client_tls(), timeout=10)
        await smtp.connect()
        await smtp.login("app", "app-password")
        data = f"From: app@example.com\r\nSubject: workers {i}\r\n\r\nbody\r\n"
        await smtp.sendmail("app@example.com", [f"user{i}@dest.test"], data.encode())
        await smtp.quit()

    await asyncio.gather(*(one(i) for i in ids))


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def restart(relay: RelayProcess, workers: int) -> None:
    if relay.running:
        assert await asyncio.to_thread(relay.stop) == 0
    relay.workers = workers
    relay.write_config()
    await asyncio.to_thread(relay.start)
    # /readyz answers 200 once one worker is ready; wait for all (adoption runs before).
    await eventually(lambda: relay.metric("mailplane_relay_ready") == workers,
                     f"{workers} ready worker(s)")


async def test_changing_workers_adopts_the_old_spool_directories(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
) -> None:
    sink: Sink = await smtp_sink(mail_reply="451 4.3.0 Try again later")
    relay = relay_factory(smarthost_port=sink.port, workers=3)
    await restart(relay, 3)
    await send(relay, range(0, 24))
    assert await asyncio.to_thread(relay.stop) == 0
    assert sum(layout(relay).values()) == 24
    w2 = relay.spool_dir / "w2"
    if not layout(relay).get("w2"):  # the kernel gave w2 no connection: give it a message
        moved = next(p for p in relay.spooled_files() if p.parent != w2)
        for suffix in (".msg", ".state"):
            if moved.with_suffix(suffix).exists():
                os.rename(moved.with_suffix(suffix), w2 / moved.with_suffix(suffix).name)
    in_w2 = layout(relay)["w2"]

    # 3 -> 2 while a live process holds w2: it stays, counted as orphaned (not delivered twice).
    held = os.open(w2 / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        await restart(relay, 2)
        await eventually(lambda: relay.metric("mailplane_relay_spool_orphaned_messages")
                         == in_w2, "the orphaned-messages gauge")
        await eventually(lambda: relay.metric("mailplane_relay_queue_messages") == 24 - in_w2,
                         "the adoptable messages queued")
        assert f"cannot adopt {w2}" in relay.log_since_start()
        assert layout(relay)["w2"] == in_w2
    finally:
        os.close(held)

    # 3 -> 2 for real now: w2 is adopted by worker 0 (2 mod 2).
    await restart(relay, 2)
    await eventually(lambda: set(layout(relay)) <= {"w0", "w1"}, "w2 adopted")
    assert sum(layout(relay).values()) == 24
    assert not w2.exists()
    assert relay.metric("mailplane_relay_spool_orphaned_messages") == 0
    await eventually(lambda: relay.metric("mailplane_relay_queue_messages") == 24,
                     "24 queued messages across two workers")

    # 2 -> 1: the single process spools in the root and adopts w0 and w1.
    await restart(relay, 1)
    assert layout(relay) == {".": 24}
    assert not any((relay.spool_dir / f"w{i}").exists() for i in range(3))
    await eventually(lambda: relay.metric("mailplane_relay_queue_messages") == 24,
                     "24 queued messages (envelopes are read after the start)")
    await send(relay, range(24, 30))

    # 1 -> 2, and the upstream recovers: worker 0 adopts the root's mail, everything arrives.
    await restart(relay, 2)
    await eventually(lambda: set(layout(relay)) <= {"w0", "w1"}, "the root's mail adopted")
    assert sum(layout(relay).values()) == 30
    sink.behaviour.mail_reply = None
    await sink.wait_for(lambda: len({m.rcpt_tos[0] for m in sink.messages}) == 30, timeout=30)
    assert sorted(m.rcpt_tos[0] for m in sink.messages) == sorted(
        f"user{i}@dest.test" for i in range(30))  # each exactly once
    await eventually(lambda: relay.spooled_files() == [], "an empty spool")
    assert await asyncio.to_thread(relay.stop) == 0
