"""Session tracking: graceful drain (idle sessions told 421 at once, a transaction in flight may
finish), the drain deadline, maxSessions, the idle timeout, session metrics, and group commit
under concurrent submissions."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import RawSMTP, Relay, message, ready_session

relay = support.relay


async def _eof(c: RawSMTP) -> bytes:
    return await asyncio.wait_for(c.reader.read(), 5)


async def test_drain_lets_the_transaction_in_flight_finish(relay: Relay) -> None:
    busy = await ready_session(relay)
    idle = await ready_session(relay)
    assert relay.server.active_sessions == 2
    assert relay.metric("mailplane_relay_sessions_active", listener="submissions") == 2
    assert (await busy.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    await relay.server.stop_accepting()
    # The idle session is told at once; nothing new is accepted.
    assert (await idle.reply())[1] == "421 4.3.2 Service shutting down, try again later"
    assert await _eof(idle) == b""
    with pytest.raises(OSError):
        await RawSMTP.connect(relay.implicit_port, relay.client_tls())
    drained = asyncio.create_task(relay.server.drain(time.monotonic() + 10))
    assert (await busy.cmd("RCPT TO:<x@example.net>"))[0] == 250
    assert (await busy.cmd("DATA"))[0] == 354
    code, text = await busy.cmd(message("a@example.com") + b".")
    assert code == 250, text
    # With its transaction done, the session may QUIT cleanly, nothing more.
    assert (await busy.cmd("QUIT"))[1] == "221 2.0.0 Bye"
    assert await _eof(busy) == b""
    await asyncio.wait_for(drained, 5)
    assert relay.server.active_sessions == 0
    assert relay.metric("mailplane_relay_sessions_active", listener="submissions") == 0
    assert len(relay.queue.submitted) == 1
    await busy.close()
    await idle.close()


async def test_draining_session_that_wants_more_gets_421(relay: Relay) -> None:
    c = await ready_session(relay)
    assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 250
    await relay.server.stop_accepting()
    assert (await c.cmd("DATA"))[0] == 354
    assert (await c.cmd(message("a@example.com") + b"."))[0] == 250
    assert (await c.cmd("MAIL FROM:<a@example.com>"))[1].startswith("421 4.3.2")
    assert await _eof(c) == b""
    await relay.server.drain(time.monotonic() + 5)
    await c.close()
    assert relay.rejected("shutting_down") == 1


async def test_drain_deadline_closes_what_is_left(relay: Relay) -> None:
    stuck = await ready_session(relay)
    assert (await stuck.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    await relay.server.stop_accepting()
    started = time.monotonic()
    await relay.server.drain(started + 0.3)
    assert 0.3 <= time.monotonic() - started < 3
    assert relay.server.active_sessions == 0
    data = await _eof(stuck)
    assert data in (b"", b"421 4.3.2 Service shutting down, try again later\r\n")
    await stuck.close()


async def test_max_sessions_421(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxSessions=2))
    first = await ready_session(relay, user=None)
    second = await ready_session(relay, user=None)
    third = await RawSMTP.connect(relay.implicit_port, relay.client_tls())
    try:
        assert (await third.reply())[1] == "421 4.3.2 Too many connections, try again later"
        assert await _eof(third) == b""
    finally:
        for c in (first, second, third):
            await c.close()
    assert relay.rejected("too_many_sessions") == 1
    assert relay.metric("mailplane_relay_sessions_total", listener="submissions") == 3


async def test_idle_session_times_out(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(sessionTimeout=0.2))
    c = await ready_session(relay)
    try:
        started = time.monotonic()
        assert await _eof(c) == b""
        assert time.monotonic() - started < 3
    finally:
        await c.close()
    assert relay.server.active_sessions == 0


async def test_session_timeout_counts_from_the_last_command(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(sessionTimeout=1.0))
    c = await ready_session(relay)
    try:
        # Active for three timeouts' worth: the deadline moves with every command that makes
        # progress (NOOP and RSET do not: see test_ingress_abuse). The pace leaves 0.75 s of
        # the timeout to each round trip, so a loaded machine's stalls (the relay runs in this
        # process and event loop) do not reach it; 0.1 s against 0.3 s did.
        for _ in range(12):
            await asyncio.sleep(0.25)  # the client's own pace, not a wait for the relay
            assert (await c.cmd("EHLO client.test"))[0] == 250
        started = time.monotonic()
        assert await _eof(c) == b""
        assert 0.8 <= time.monotonic() - started < 5
    finally:
        await c.close()


async def test_concurrent_submissions_share_directory_fsyncs(relay: Relay) -> None:
    sessions = [await ready_session(relay) for _ in range(20)]
    try:
        for i, c in enumerate(sessions):
            assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
            assert (await c.cmd(f"RCPT TO:<r{i}@example.net>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
        before_dir, before_file = relay.spool.dir_fsyncs, relay.spool.file_fsyncs
        # Every message ends at the same moment: twenty commits in flight together.
        await asyncio.gather(*(c.send(message("a@example.com") + b".\r\n") for c in sessions))
        replies = await asyncio.gather(*(c.reply() for c in sessions))
    finally:
        for c in sessions:
            await c.close()
    assert all(text.startswith("250 2.0.0 Ok: queued as") for _, text in replies)
    assert relay.spool.file_fsyncs - before_file == 20
    assert relay.spool.dir_fsyncs - before_dir <= 3  # one, unless the disk is very slow
    assert len({m.queue_id for m in relay.queue.submitted}) == 20


async def test_connection_accepted_while_draining_gets_421(relay: Relay) -> None:
    # The window between a listener's last accept and its close: the flag alone decides.
    relay.server.draining = True
    c = await RawSMTP.connect(relay.implicit_port, relay.client_tls())
    try:
        assert (await c.reply())[1] == "421 4.3.2 Service shutting down, try again later"
        assert await _eof(c) == b""
    finally:
        await c.close()
    assert relay.rejected("shutting_down") == 1


async def test_client_vanishing_mid_data_leaves_nothing_behind(relay: Relay) -> None:
    c = await ready_session(relay)
    assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
    assert (await c.cmd("RCPT TO:<x@example.net>"))[0] == 250
    assert (await c.cmd("DATA"))[0] == 354
    await c.send(b"From: a@example.com\r\n\r\nhalf a message\r\n")
    c.writer.transport.abort()
    deadline = time.monotonic() + 5
    while relay.server.active_sessions:
        assert time.monotonic() < deadline, "session leaked"
        await asyncio.sleep(0.01)
    assert relay.queue.submitted == []
    assert list(relay.spool.directory.glob("*.msg")) == []
    assert relay.metric("mailplane_relay_sessions_active", listener="submissions") == 0
