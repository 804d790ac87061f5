"""`mailplane queue` against a real relay with two worker processes and a throttling upstream:
list (both workers answer), destinations (the suspension and its reason), hold (by id and by
destination, surviving a restart), flush (ends the suspension, held mail stays), release,
show (envelope, never the content), delete and bounce (a DSN to the sender). The command is
the real CLI in a subprocess, talking to the relay's unix sockets."""

from __future__ import annotations

import asyncio
import email
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from email.message import Message
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest

from mailplane_relay.control import ADMIN_BOUNCE_REPLY, ControlServer, request_all
from tests.helpers.relayproc import RelayProcess
from tests.helpers.sink import Sink
from tests.relay.test_delivery_flows import make_config, smarthost

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

MARKER = "QueueAdminBodyMarker"


def queue(relay: RelayProcess, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "mailplane_cli.main", "queue", *args,
         "--config", str(relay.config_dir)],
        capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def listed(relay: RelayProcess, *args: str) -> list[dict[str, Any]]:
    out = queue(relay, "list", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


async def send(relay: RelayProcess, rcpt: str, n: int) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=relay.ports["submissions"],
                           use_tls=True, tls_context=relay.client_tls(), timeout=10)
    await smtp.connect()
    await smtp.login("app", "app-password")
    data = f"From: app@example.com\r\nSubject: {MARKER} {n}\r\n\r\n{MARKER} body\r\n"
    await smtp.sendmail("app@example.com", [rcpt], data.encode())
    await smtp.quit()


async def eventually(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def start(relay: RelayProcess) -> None:
    await asyncio.to_thread(relay.start)
    deadline = time.monotonic() + 30
    while relay.metric("mailplane_relay_ready") != 2:
        assert time.monotonic() < deadline, "both workers ready"
        await asyncio.sleep(0.1)


def delivered(sink: Sink) -> set[str]:
    return {r for m in sink.messages for r in m.rcpt_tos}


async def test_queue_administration_with_two_workers(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
) -> None:
    sink: Sink = await smtp_sink(mail_reply="451 4.7.0 Throttled, try again later")
    # A long backoff: nothing is retried unless the command says so, and no attempt runs
    # while the commands act (a hold is saved by the command, not by an attempt's outcome).
    relay = relay_factory(smarthost_port=sink.port, workers=2, extra={
        "queue": {"retryInitial": "1h", "retryMax": "1h", "retryJitter": 0.0}})
    await start(relay)
    control = relay.spool_dir / "control"
    assert stat.S_IMODE(control.stat().st_mode) == 0o700
    assert sorted(p.name for p in control.iterdir()) == ["w0.sock", "w1.sock"]
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in control.iterdir())

    # Mail to three domains; the kernel spreads connections over the workers: send until both
    # workers hold some.
    n = 0
    for domain in ("a.test", "b.test", "c.test"):
        for _ in range(3):
            await send(relay, f"u{n}@{domain}", n)
            n += 1
    while not all(any((relay.spool_dir / w).glob("*.msg")) for w in ("w0", "w1")):
        assert n < 60, "the kernel never gave worker 1 a connection"
        await send(relay, f"u{n}@a.test", n)
        n += 1
    await eventually(lambda: len([m for m in listed(relay) if m["attempts"] >= 1]) == n,
                     "every message deferred once")
    rows = listed(relay)
    assert {m["worker"] for m in rows} == {"w0", "w1"}
    assert all(m["state"] == "scheduled" and m["sender"] == "app@example.com" for m in rows)
    assert all(m["next_attempt"] > time.time() + 3000 for m in rows)
    assert {m["queue_id"] for m in listed(relay, "--destination", "b.test")} == {
        m["queue_id"] for m in rows if m["destinations"] == ["b.test"]}
    assert len(listed(relay, "--destination", "b.test")) == 3
    assert listed(relay, "--older-than", "1h") == []
    assert len(listed(relay, "--limit", "1")) == 2  # one per worker
    assert f"2 message(s) of {n} (raise --limit" in queue(relay, "list", "--limit", "1").stdout

    # The throttled smarthost is suspended, and the table says why.
    dests = [json.loads(line) for line in queue(relay, "destinations", "--json")
             .stdout.splitlines()]
    assert any(d["state"] == "suspended" and "4.7.0 Throttled" in d["reason"]
               for d in dests), dests
    assert "4.7.0 Throttled" in queue(relay, "destinations").stdout

    # show: envelope and state, never the content.
    c_ids = [m["queue_id"] for m in rows if m["destinations"] == ["c.test"]]
    shown = queue(relay, "show", c_ids[0]).stdout
    doc = json.loads(shown)
    assert doc["queue_id"] == c_ids[0] and doc["recipients"][0]["address"].endswith("@c.test")
    assert MARKER not in shown

    # Hold one a.test message by id and every b.test message by destination.
    held_one = next(m for m in rows if m["destinations"] == ["a.test"])
    assert held_one["queue_id"] in queue(relay, "hold", held_one["queue_id"]).stdout
    assert queue(relay, "hold", "b.test").stdout.startswith("held 3 message(s)")
    held = {held_one["queue_id"]} | {m["queue_id"] for m in rows
                                     if m["destinations"] == ["b.test"]}

    # A hold survives a restart.
    assert await asyncio.to_thread(relay.stop) == 0
    await start(relay)
    await eventually(lambda: {m["queue_id"] for m in listed(relay)
                              if m["state"] == "held"} == held, "holds after the restart")

    # The upstream recovers, except for the c.test mailboxes. flush retries at once and ends
    # the suspension; held mail stays.
    sink.behaviour.mail_reply = None
    sink.behaviour.rcpt_replies = {f"u{i}@c.test": "451 4.2.0 Mailbox busy" for i in range(n)}
    attempts_before = len(sink.rcpt_attempts)
    queue(relay, "flush")
    a_rcpts = {r["address"] for m in rows if m["destinations"] == ["a.test"]
               for r in m["recipients"] if m["queue_id"] != held_one["queue_id"]}
    await eventually(lambda: a_rcpts <= delivered(sink), "a.test delivered after flush")
    await eventually(lambda: any(r.endswith("@c.test")
                                 for r in sink.rcpt_attempts[attempts_before:]),
                     "c.test tried after flush")
    assert not any(r.endswith("@b.test") for r in sink.rcpt_attempts)
    assert held_one["recipients"][0]["address"] not in sink.rcpt_attempts

    # release: by destination and by id.
    assert queue(relay, "release", "b.test").stdout.startswith("released 3 message(s)")
    queue(relay, "release", held_one["queue_id"])
    await eventually(lambda: sum(1 for r in delivered(sink) if r.endswith("@b.test")) == 3
                     and held_one["recipients"][0]["address"] in delivered(sink),
                     "released mail delivered")

    # delete (no notice) and bounce (a DSN to the sender).
    proc = queue(relay, "delete", c_ids[0])
    assert c_ids[0] in proc.stdout
    await eventually(lambda: c_ids[1] in {m["queue_id"] for m in listed(relay)
                                          if m["state"] == "scheduled"}, "c.test scheduled")
    assert c_ids[1] in queue(relay, "bounce", c_ids[1]).stdout
    await eventually(lambda: any(m.mail_from == "" for m in sink.messages), "the DSN")
    dsn = next(m for m in sink.messages if m.mail_from == "")
    assert dsn.rcpt_tos == ["app@example.com"]
    report = email.message_from_bytes(dsn.data)
    assert report.get_content_type() == "multipart/report"
    parts = report.get_payload()
    assert isinstance(parts, list)
    status: list[Message] = parts[1].get_payload()
    assert status[1]["Action"] == "failed"
    assert status[1]["Status"] == "5.0.0"
    assert "administrator" in status[1]["Diagnostic-Code"]
    assert MARKER + " body" not in dsn.data.decode()
    remaining = {m["queue_id"] for m in listed(relay)}
    assert c_ids[0] not in remaining and c_ids[1] not in remaining

    # Unknown ids and bad input: a clear message and a non-zero status.
    proc = queue(relay, "show", c_ids[0], check=False)
    assert proc.returncode == 1 and "not in this relay process's queue" in proc.stderr
    proc = queue(relay, "hold", "not a thing", check=False)
    assert proc.returncode == 2 and "neither a queue id" in proc.stderr
    assert await asyncio.to_thread(relay.stop) == 0


PEER = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
try:
    s.connect(sys.argv[1])
except PermissionError:
    print("EACCES")
    sys.exit(0)
s.sendall(b'{"op":"destinations"}\\n')
print(s.recv(65536).decode())
"""


class _Queue:
    def destinations(self) -> list[dict[str, Any]]:
        return [{"destination": "smarthost:x:25"}]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a client as another user")
async def test_the_socket_refuses_other_users(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The 0700 directory keeps other users out; with modes loosened by mistake, the relay
    still refuses a peer of another user (SO_PEERCRED). Root and the relay's own user pass."""
    base = Path(tempfile.mkdtemp(prefix="qa-", dir="/tmp"))
    os.chmod(base, 0o755)
    try:
        path = base / "control" / "w0.sock"
        server = ControlServer(path, queue=cast(Any, _Queue()), spool=cast(Any, None))
        await server.start()

        def as_nobody() -> str:
            return subprocess.run(["/usr/bin/python3", "-c", PEER, str(path)], user=65534,
                                  capture_output=True, text=True, timeout=30,
                                  check=True).stdout

        assert (await asyncio.to_thread(as_nobody)).strip() == "EACCES"
        os.chmod(path.parent, 0o755)
        os.chmod(path, 0o666)
        answer = json.loads(await asyncio.to_thread(as_nobody))
        assert answer == {"ok": False, "error": "permission denied: run this as the relay's "
                                                "user (or root)"}
        ok, stale = await asyncio.to_thread(request_all, path.parent, {"op": "destinations"})
        assert ok == [("w0", {"ok": True, "result": [{"destination": "smarthost:x:25"}]})]
        assert stale == []
        await server.close()
        assert not path.exists()
    finally:
        shutil.rmtree(base)


async def test_requests_are_checked_before_anything_is_done_or_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    server = ControlServer(Path("/nonexistent/w0.sock"), queue=cast(Any, _Queue()),
                           spool=cast(Any, None))
    for request, error in (
            ({"op": "destinations", "queue_id": "0J8Z3K4M7QX2C9T4PB1R\nforged"}, "queue_id"),
            ({"op": "hold", "destination": "a.test\nlevel=error forged"}, "destination"),
            ({"op": "hold", "destination": 7}, "destination"),
            ({"op": "drop-tables"}, "unknown operation"),
            ({"op": "list", "limit": -1}, "limit")):
        answer = await server.call(request)
        assert answer["ok"] is False and error in answer["error"], request
        assert "forged" not in answer["error"]
    assert "forged" not in caplog.text
    assert (await server.call({"op": "destinations"}))["ok"] is True


async def test_a_slow_upstream_shows_the_attempt_and_bounce_waits_for_it(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
) -> None:
    sink: Sink = await smtp_sink(data_delay=4.0)
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    await start(relay)
    await send(relay, "slow@a.test", 0)
    await eventually(lambda: [m["state"] for m in listed(relay)] == ["active"],
                     "the attempt in progress")
    [row] = listed(relay)
    proc = queue(relay, "bounce", row["queue_id"], check=False)
    assert proc.returncode == 1 and "attempt in progress" in proc.stderr
    # A hold during the attempt lets it finish: the message is delivered and leaves.
    queue(relay, "hold", row["queue_id"])
    await eventually(lambda: listed(relay) == [], "delivered")
    assert delivered(sink) == {"slow@a.test"}
    assert [m for m in sink.messages if m.mail_from == ""] == []

    # Killed, the workers leave their sockets; one worker from now on: w1's goes at start.
    await asyncio.to_thread(relay.kill)
    control = relay.spool_dir / "control"
    assert sorted(p.name for p in control.iterdir()) == ["w0.sock", "w1.sock"]
    relay.workers = 1
    relay.write_config()
    await asyncio.to_thread(relay.start)
    await eventually(lambda: sorted(p.name for p in control.iterdir()) == ["w0.sock"],
                     "the stale socket removed")
    proc = queue(relay, "list")
    assert proc.stderr == "" and "0 message(s)" in proc.stdout
    assert await asyncio.to_thread(relay.stop) == 0


async def test_flushing_a_domain_probes_its_suspended_destination(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any],
) -> None:
    """The smarthost throttled and is suspended for an hour; it recovers. `flush a.test`
    delivers a.test's mail now (the flushed message is the probe), b.test's waits for its
    retry until flushed too."""
    sink: Sink = await smtp_sink(mail_reply="451 4.7.0 Throttled, try again later")
    relay = relay_factory(smarthost_port=sink.port, extra={
        "queue": {"retryInitial": "1h", "retryMax": "1h", "retryJitter": 0.0}})
    await asyncio.to_thread(relay.start)
    await send(relay, "x@a.test", 0)
    await send(relay, "y@b.test", 1)
    await eventually(lambda: [m["attempts"] for m in listed(relay)] == [1, 1], "deferred")
    [dest] = [json.loads(line) for line in queue(relay, "destinations", "--json")
              .stdout.splitlines()]
    assert dest["state"] == "suspended" and dest["suspendedFor"] > 3000
    sink.behaviour.mail_reply = None
    assert queue(relay, "flush", "a.test").stdout.startswith("flushed 1 message(s)")
    await eventually(lambda: delivered(sink) == {"x@a.test"}, "a.test delivered")
    assert [m["destinations"] for m in listed(relay)] == [["b.test"]]
    queue(relay, "flush")
    await eventually(lambda: delivered(sink) == {"x@a.test", "y@b.test"}, "b.test delivered")
    assert await asyncio.to_thread(relay.stop) == 0


async def test_a_hold_is_not_lost_to_an_attempt_beginning_while_it_is_written(
        relay: Any, smtp_sink: Callable[..., Any]) -> None:
    """`hold` writes its mark durably (fsync in a thread); the message may fall due meanwhile
    (its retry time, or a `flush` racing the hold). The attempt must then see the mark: the
    spool hands every holder the same envelope object. Were it a fresh copy, the attempt would
    contact the destination and save its state over the hold."""
    sink: Sink = await smtp_sink(rcpt_replies={"busy@a.test": "451 4.2.1 Mailbox busy"})
    r = await relay(make_config(smarthost(sink), queue={"retryInitial": 60, "retryMax": 60}))
    msg = await r.send(["busy@a.test"])
    await sink.wait_for(lambda: sink.rcpt_attempts.count("busy@a.test") == 1)
    await r.wait(lambda: r.queue.state_by_id(msg.queue_id) == "scheduled")

    save_state = r.spool.save_state

    async def slow_durable_save(m: Any, *, durable: bool = False) -> None:
        if durable:
            r.queue.flush(msg.queue_id)  # due now, while the mark is being written
            await asyncio.sleep(0.5)
        await save_state(m, durable=durable)

    r.spool.save_state = slow_durable_save
    assert await r.queue.hold(msg.queue_id) is True
    r.spool.save_state = save_state
    await r.wait(lambda: msg.queue_id not in r.queue._attempts)
    assert r.queue.state_by_id(msg.queue_id) == "held"
    assert sink.rcpt_attempts.count("busy@a.test") == 1  # no attempt while held
    loaded = r.spool.load(msg.queue_id)
    assert loaded is not None and loaded.extra.get("held") is True


async def test_an_administrative_bounce_does_not_pause_the_sender(
        relay: Any, smtp_sink: Callable[..., Any]) -> None:
    """The operator returns a tenant's stuck mail (its destination is down): the sender gets
    its notice, but the returned recipients are not the sender's bounces, so they must not
    push the credential's bounce rate over `abuse.bounceRate` and pause it."""
    sink: Sink = await smtp_sink(mail_reply="451 4.3.0 Down for maintenance")
    config = make_config(smarthost(sink), queue={"retryInitial": 60, "retryMax": 60})
    settings = config.settings.model_copy(update={
        "abuse": config.settings.abuse.model_copy(update={"min_recipients": 1})})
    r = await relay(type(config)(settings=settings))
    msgs = [await r.send([f"user{i}@a.test"]) for i in range(3)]
    await r.wait(lambda: all(r.queue.state_by_id(m.queue_id) == "scheduled" for m in msgs))
    sink.behaviour.mail_reply = None
    for m in msgs:
        await r.queue.bounce(m.queue_id, ADMIN_BOUNCE_REPLY)
    await sink.wait_for(lambda: len([m for m in sink.messages if m.mail_from == ""]) == 3)
    assert r.reputation.paused("app1") is None
    assert r.count("bounced") == 3  # still logged and counted as bounced


async def test_a_malformed_request_gets_an_answer_naming_the_problem() -> None:
    """Nesting deeper than the JSON parser goes, or a NaN age, is answered as a bad request
    (before, the nesting killed the handler: the client heard nothing and reported a relay that
    had stopped; the NaN listed every message)."""
    base = Path(tempfile.mkdtemp(prefix="qa-", dir="/tmp"))
    try:
        path = base / "control" / "w0.sock"
        server = ControlServer(path, queue=cast(Any, _Queue()), spool=cast(Any, None))
        await server.start()

        async def ask(raw: bytes) -> Any:
            reader, writer = await asyncio.open_unix_connection(str(path))
            writer.write(raw)
            answer = await reader.read()
            writer.close()
            return json.loads(answer)

        assert await ask(b"[" * 5000 + b"\n") == {
            "ok": False, "error": "bad request: send one JSON object on a line"}
        answer = await ask(b'{"op":"list","older_than":NaN}\n')
        assert answer == {"ok": False, "error": "older_than must be a number of seconds"}
        assert (await ask(b'{"op":"destinations"}\n'))["ok"] is True
        await server.close()
    finally:
        shutil.rmtree(base)


async def test_repeated_flushes_do_not_grow_the_schedule(
        relay: Any, smtp_sink: Callable[..., Any]) -> None:
    """`flush` from a script, over a queue whose messages are due already and wait for
    attempt slots, added one schedule entry per message each time (about 100 MB per flush of
    a million messages); a message already due keeps its entry."""
    sink: Sink = await smtp_sink(rcpt_replies={f"busy{i}@a.test": "451 4.2.1 Busy"
                                               for i in range(5)})
    r = await relay(make_config(smarthost(sink), queue={"retryInitial": 60, "retryMax": 60}))
    msgs = [await r.send([f"busy{i}@a.test"]) for i in range(5)]
    await r.wait(lambda: all(r.queue.state_by_id(m.queue_id) == "scheduled" for m in msgs))
    # No await between the calls: the scheduler cannot begin (and pop) anything meanwhile.
    assert all(r.queue.flush(m.queue_id) for m in msgs)
    size = len(r.queue._heap)
    for _ in range(10):
        assert all(r.queue.flush(m.queue_id) for m in msgs)
    assert len(r.queue._heap) == size
