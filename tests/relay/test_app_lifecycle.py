"""The relay as a real process: start, readiness, metrics, hot reload, SIGTERM drain, restart.

A real client (aiosmtplib over TLS, AUTH) talks to `mailplane relay` on loopback, which delivers
to the capture sink; the test checks what arrived, /readyz, /metrics and the log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest
from prometheus_client import CollectorRegistry

from mailplane_relay.events import LogEvent
from mailplane_relay.metrics import RelayMetrics
from mailplane_relay.store import MessageLog, SqliteBackend
from mailplane_relay.store.sync import add_suppression, list_suppression, query_log
from tests.helpers.pki import peer_serial, write_server_pair
from tests.helpers.relayproc import RelayProcess, relay_command
from tests.helpers.sink import Sink

pytestmark = pytest.mark.slow


def message(i: int, sender: str = "app@example.com") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = f"user{i}@dest.test"
    msg["Subject"] = f"secret subject {i}"
    msg["Message-ID"] = f"<test-{i}@example.com>"
    msg.set_content(f"body number {i}\n")
    return msg


async def client(relay: RelayProcess, user: str = "app", password: str = "app-password",
                 *, implicit: bool = False) -> aiosmtplib.SMTP:
    smtp = aiosmtplib.SMTP(
        hostname="127.0.0.1",
        port=relay.ports["submissions" if implicit else "submission"],
        tls_context=relay.client_tls(), use_tls=implicit, start_tls=not implicit,
        timeout=10,
    )
    await smtp.connect()
    await smtp.login(user, password)
    return smtp


async def eventually(predicate: Callable[[], Any], what: str, timeout: float = 10.0) -> None:
    """For state only observable by polling another process (its /metrics, its files)."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(predicate):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def promtool_check(text: str) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is not installed"
    r = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr


async def test_relay_starts_delivers_and_reports(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    # Records past the default retention (90 days logs, 365 days suppression) from a previous
    # life of this relay: the purge at start removes them.
    store = SqliteBackend(str(relay.message_log))
    await store.open()
    old = MessageLog(store, flush_interval=3600,
                     metrics=RelayMetrics.create(CollectorRegistry()))
    await old.start()
    for i in range(3):
        old.record(LogEvent(ts=time.time() - 100 * 86400, status="delivered", queue_id=f"OLD{i}",
                            message_id=None, credential="app", sender="app@example.com",
                            recipient="x@dest.test", response="250 ok", size=1))
    await old.close()
    # Account closure: a team's own entries, of a namespace last served 100 days ago ("gone")
    # and of the relay's own tenant ("team-app", served again by this configuration).
    ago = time.time() - 100 * 86400
    await store.purge_closed_namespaces(["gone", "team-app"], now=ago, closed_before=0.0)
    for ns in ("gone", "team-app"):
        await store.suppression_upsert(f"own@{ns}.test", "manual", "portal", ago, namespace=ns)
    await store.close()
    add_suppression(str(relay.message_log), "stale@dest.test", "hard_bounce",
                              now=time.time() - 400 * 86400)
    await asyncio.to_thread(relay.start)

    assert relay.http_get("/livez") == (200, "ok\n")
    assert relay.readyz() == (200, "ok\n")
    smtp = await client(relay)
    await smtp.send_message(message(1))
    await smtp.quit()
    [got] = await sink.wait_for_messages(1)
    assert got.rcpt_tos == ["user1@dest.test"]
    assert b"body number 1" in got.data

    await eventually(
        lambda: {r["status"] for r in query_log(str(relay.message_log))}
        >= {"received", "delivered"}, "received and delivered in the message log")
    await eventually(lambda: relay.metric("mailplane_relay_last_purge_timestamp_seconds") > 0,
                     "the retention purge at start")
    assert relay.metric("mailplane_relay_purged_records_total", table="message_log") == 3
    assert relay.metric("mailplane_relay_purged_records_total", table="suppression") == 2
    assert [(e["address"], e["namespace"]) for e in list_suppression(str(relay.message_log))
            ] == [("own@team-app.test", "team-app")]
    logs = subprocess.run(
        [*relay_command()[:-1], "logs", "--config", str(relay.config_dir), "--json"],
        capture_output=True, text=True, timeout=30, check=True).stdout
    rows = [json.loads(line) for line in logs.splitlines()]
    statuses = [row["status"] for row in rows]
    assert statuses[0] == "received" and "delivered" in statuses
    # The tenant is the credential's namespace; the submitting client's address is not kept.
    assert {row["namespace"] for row in rows} == {"team-app"}
    assert rows[0]["remote"] is None
    assert next(r for r in rows if r["status"] == "delivered")["remote"].startswith("127.0.0.1:")
    metrics = relay.metrics()
    promtool_check(metrics)
    assert relay.metric("mailplane_relay_ready") == 1
    assert relay.metric("mailplane_relay_config_reloads_total", result="success") == 1
    assert relay.metric("mailplane_relay_messages_received_total") == 1
    assert "mailplane_relay_config_info{hash=" in metrics

    assert await asyncio.to_thread(relay.stop) == 0
    log = relay.log()
    assert "relay ready" in log and "relay stopped" in log
    assert "secret subject" not in log and "body number" not in log
    assert "app-password" not in log


async def test_hot_reload_applies_a_new_credential_without_dropping_sessions(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)
    open_session = await client(relay)

    relay.credentials["newapp"] = "new-password"
    relay.write_config()
    await eventually(
        lambda: relay.metric("mailplane_relay_config_reloads_total", result="success") == 2,
        "the reload")
    assert "configuration reloaded (hash" in relay.log()

    fresh = await client(relay, "newapp", "new-password")
    await fresh.send_message(message(2))
    await fresh.quit()
    await open_session.send_message(message(3))  # the session opened before the reload
    await open_session.quit()
    await sink.wait_for(lambda: {m.rcpt_tos[0] for m in sink.messages}
                        == {"user2@dest.test", "user3@dest.test"})
    assert await asyncio.to_thread(relay.stop) == 0


async def test_invalid_reload_is_rejected_and_the_old_config_stays(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)
    hash_before = [line for line in relay.metrics().splitlines()
                   if line.startswith("mailplane_relay_config_info{")]

    spec = relay.spec()
    spec["credentials"].append({"username": "broken", "passwordHash": "plaintext!",
                                "allowedSenders": ["example.com"]})
    relay.write_config(spec)
    await eventually(
        lambda: relay.metric("mailplane_relay_config_reloads_total", result="failure") == 1,
        "the rejected reload")

    rejected = [line for line in relay.log().splitlines()
                if "configuration reload rejected" in line]
    assert len(rejected) == 1
    assert "passwordHash" in rejected[0] and "hash-password" in rejected[0]
    assert [line for line in relay.metrics().splitlines()
            if line.startswith("mailplane_relay_config_info{")] == hash_before
    assert relay.readyz()[0] == 200
    smtp = await client(relay)  # the credential of the last good config still works
    await smtp.send_message(message(4))
    await smtp.quit()
    await sink.wait_for_messages(1)
    assert await asyncio.to_thread(relay.stop) == 0


async def test_sigterm_drains_an_open_session_and_keeps_the_queue(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink(data_reply="451 4.3.0 try again later")
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)

    smtp = await client(relay)
    await smtp.mail("app@example.com")
    await smtp.rcpt("late@dest.test")
    relay.terminate()
    await eventually(lambda: relay.readyz()[0] == 503, "readiness to drop", timeout=5)
    assert relay.readyz() == (503, "shutting down\n")
    assert relay.running

    code, reply = await smtp.data(message(5).as_bytes())  # the session still finishes
    assert code == 250, reply
    # Draining, the relay ends the session after its transaction (421) instead of waiting for
    # the client's next command.
    with contextlib.suppress(aiosmtplib.SMTPServerDisconnected):
        await smtp.quit()
    smtp.close()
    assert await asyncio.to_thread(relay.wait, 30) == 0
    assert len(relay.spooled_files()) == 1, "the deferred message must stay in the spool"
    assert sink.messages == []

    sink.behaviour.data_reply = None
    await asyncio.to_thread(relay.start)
    [got] = await sink.wait_for_messages(1, timeout=20)
    assert got.rcpt_tos == ["late@dest.test"]
    await eventually(lambda: relay.spooled_files() == [], "the spool to empty")
    assert await asyncio.to_thread(relay.stop) == 0


async def test_config_error_at_start_exits_2_with_the_problem(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    relay.write_config(raw="apiVersion: mailplane.io/v1alpha1\nkind: RelayConfig\nspec: {}\n")
    with pytest.raises(AssertionError, match="relay exited with 2 before ready"):
        await asyncio.to_thread(relay.start)
    assert "configuration rejected" in relay.log()
    assert "tls is missing" in relay.log()


async def test_two_workers_share_the_ports_and_one_metrics_endpoint(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    await asyncio.to_thread(relay.start)
    await eventually(lambda: all((relay.spool_dir / f"w{i}").is_dir() for i in range(2)),
                     "both worker spools")

    async def send(i: int) -> None:
        smtp = await client(relay, implicit=i % 2 == 0)
        await smtp.send_message(message(i))
        await smtp.quit()

    await asyncio.gather(*(send(i) for i in range(20)))
    await sink.wait_for_messages(20, timeout=20)
    assert relay.metric("mailplane_relay_messages_received_total") == 20

    relay.credentials["other"] = "other-password"
    relay.write_config()  # each worker reloads by itself
    await eventually(
        lambda: relay.metric("mailplane_relay_config_reloads_total", result="success") == 4,
        "both workers to reload")
    in_force = {line.split('"')[1] for line in relay.metrics().splitlines()
                if line.startswith("mailplane_relay_config_info{") and line.endswith(" 1.0")}
    assert len(in_force) == 1, in_force

    # The CLI writes the shared file; every worker's cache picks the entry up within ~1 s.
    subprocess.run([*relay_command()[:-1], "suppression", "add", "blocked@dest.test",
                    "--reason", "complaint", "--config", str(relay.config_dir)],
                   check=True, capture_output=True, timeout=30)
    await eventually(lambda: relay.metric("mailplane_relay_suppression_entries") == 1,
                     "the suppression gauge (counted once over workers)")
    # The other worker exports no gauge: watch its behaviour instead, until six connections in
    # a row (spread over both workers by the kernel) refuse the address.
    refusals, deadline = 0, time.monotonic() + 10
    while refusals < 6:
        assert time.monotonic() < deadline, "a worker still accepts the suppressed address"
        smtp = await client(relay, implicit=refusals % 2 == 0)
        try:
            await smtp.sendmail("app@example.com", ["blocked@dest.test"],
                                b"From: app@example.com\r\nSubject: x\r\n\r\nx\r\n")
            refusals = 0
        except aiosmtplib.SMTPRecipientsRefused as exc:
            err = exc.recipients[0]
            assert err.code == 550 and "suppression list (complaint)" in err.message
            refusals += 1
        await smtp.quit()
    promtool_check(relay.metrics())
    assert await asyncio.to_thread(relay.stop) == 0
    assert "all 2 workers stopped" in relay.log()



def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def worker_pids(relay: RelayProcess) -> list[int]:
    assert relay.proc is not None
    pid = relay.proc.pid
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        text = (task / "children").read_text().split()
        children += [int(p) for p in text]
    return sorted(children)


async def test_a_dead_worker_is_restarted_and_its_spool_recovered(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink(data_reply="451 4.3.0 not yet")
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    await asyncio.to_thread(relay.start)
    await eventually(lambda: len(worker_pids(relay)) == 2, "two workers")
    for i in range(6):
        smtp = await client(relay)
        await smtp.send_message(message(i))
        await smtp.quit()
    before = worker_pids(relay)
    os.kill(before[0], signal.SIGKILL)
    await eventually(lambda: len(set(worker_pids(relay)) - set(before)) == 1,
                     "a replacement worker", timeout=15)
    assert "exited unexpectedly with code -9: restarting" in relay.log()
    await eventually(lambda: relay.readyz()[0] == 200, "readiness after the restart")

    sink.behaviour.data_reply = None  # the deferred messages of both spools now go through
    await sink.wait_for(lambda: len({m.rcpt_tos[0] for m in sink.messages}) == 6, timeout=20)
    assert await asyncio.to_thread(relay.stop) == 0


async def test_a_second_relay_on_the_same_spool_refuses_to_start(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    first = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(first.start)
    second = relay_factory(smarthost_port=sink.port,
                           extra={"spool": {"directory": str(first.spool_dir)}})
    with pytest.raises(AssertionError, match="relay exited with 1 before ready"):
        await asyncio.to_thread(second.start)
    assert f"is in use by another relay process (pid {first.proc.pid})" in second.log()  # type: ignore[union-attr]
    assert first.readyz()[0] == 200
    assert await asyncio.to_thread(first.stop) == 0


async def test_workers_stop_when_the_supervisor_is_killed(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    await asyncio.to_thread(relay.start)
    await eventually(lambda: len(worker_pids(relay)) == 2, "two workers")
    workers = worker_pids(relay)
    assert relay.proc is not None
    relay.proc.kill()  # the supervisor alone, not its process group
    relay.proc.wait(10)
    await eventually(lambda: not any(alive(pid) for pid in workers),
                     "orphaned workers to exit", timeout=20)


async def test_reload_to_other_certificate_files_presents_the_new_certificate(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port)
    await asyncio.to_thread(relay.start)

    async def served_serial() -> int:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", relay.ports["submissions"], ssl=relay.client_tls(),
            server_hostname="localhost")
        try:
            await reader.readline()  # the greeting
            return peer_serial(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()

    assert await served_serial() == relay.tls_pair.serial
    renewed = write_server_pair(relay.ca, relay.base / "tls-renewed", stem="renewed")
    spec = relay.spec()
    spec["tls"] = {"certFile": str(renewed.cert_file), "keyFile": str(renewed.key_file)}
    relay.write_config(spec)
    await eventually(
        lambda: relay.metric("mailplane_relay_config_reloads_total", result="success") == 2,
        "the reload")
    assert await served_serial() == renewed.serial
    assert await asyncio.to_thread(relay.stop) == 0


async def test_sigterm_closes_a_session_still_open_at_the_grace_deadline(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, extra={"shutdownGrace": "1s"})
    await asyncio.to_thread(relay.start)
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", relay.ports["submissions"], ssl=relay.client_tls(),
        server_hostname="localhost")

    async def command(line: bytes) -> bytes:
        writer.write(line + b"\r\n")
        reply = b""
        while reply[3:4] != b" ":
            reply = await asyncio.wait_for(reader.readline(), 10)
            assert reply, "the relay closed the connection"
        return reply

    await reader.readline()
    assert (await command(b"EHLO client.test")).startswith(b"250")
    token = base64.b64encode(b"\0app\0app-password")
    assert (await command(b"AUTH PLAIN " + token)).startswith(b"235")
    assert (await command(b"MAIL FROM:<app@example.com>")).startswith(b"250")
    assert (await command(b"RCPT TO:<stuck@dest.test>")).startswith(b"250")
    assert (await command(b"DATA")).startswith(b"354")
    writer.write(b"From: app@example.com\r\nSubject: never finished\r\n\r\nhalf a bo")
    await writer.drain()

    started = time.monotonic()
    relay.terminate()
    assert await asyncio.to_thread(relay.wait, 30) == 0
    assert time.monotonic() - started < 1 + 2 + 5  # grace, queue stop, process exit
    tail = await reader.read()
    assert tail == b"" or tail.startswith(b"421"), tail
    assert relay.spooled_files() == []  # no 250 was given, nothing was kept
    assert "closing 1 sessions still open at the drain deadline" in relay.log()
    writer.close()


def catches_sigterm(pid: int) -> bool:
    """Whether the process has a handler for SIGTERM yet (bit 15 of SigCgt in /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=10).close()
    except ConnectionRefusedError:
        return True
    return False


async def test_with_workers_a_port_picked_for_port_0_stays_the_relays_while_no_worker_listens(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    """The supervisor picks the port of a listener configured with port 0 once and holds it:
    while both workers are dead no other server takes it (servers set SO_REUSEADDR, as
    asyncio's do), and the replacements listen on it again."""
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    await asyncio.to_thread(relay.start)
    port = relay.ports["submission"]
    await eventually(lambda: len(worker_pids(relay)) == 2, "two workers")
    before = worker_pids(relay)
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    # The first restart waits a second (WORKER_RESTART_BACKOFF): nothing listens meanwhile.
    await eventually(lambda: _refused(port), "the port with no worker listening")
    with socket.socket() as stranger:
        stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(OSError) as info:
            stranger.bind(("127.0.0.1", port))
        assert info.value.errno == errno.EADDRINUSE
    await eventually(lambda: not set(worker_pids(relay)) & set(before)
                     and len(worker_pids(relay)) == 2, "two replacement workers", timeout=30)
    await eventually(lambda: relay.readyz()[0] == 200, "readiness after the restarts")
    smtp = await client(relay)
    assert relay.ports["submission"] == port
    await smtp.send_message(message(1))
    await smtp.quit()
    await sink.wait_for(lambda: len(sink.messages) == 1, timeout=20)
    assert await asyncio.to_thread(relay.stop) == 0


async def test_sigterm_while_workers_start_stops_them_cleanly(
    relay_factory: Callable[..., RelayProcess], smtp_sink: Callable[..., Any]
) -> None:
    """A SIGTERM that reaches the workers before they have installed their handlers (Kubernetes
    deleting a pod that just started) drains them: the supervisor exits 0, no worker dies of
    the signal."""
    sink: Sink = await smtp_sink()
    relay = relay_factory(smarthost_port=sink.port, workers=2)
    relay.spawn()
    assert relay.proc is not None

    def both_workers_exist() -> bool:
        deadline = time.monotonic() + 60  # bounds a hang only
        while time.monotonic() < deadline:
            if len(worker_pids(relay)) == 2:
                return True
            time.sleep(0.002)
        return False

    assert await asyncio.to_thread(both_workers_exist), f"no two workers:\n{relay.log()}"
    starting = [pid for pid in worker_pids(relay) if not catches_sigterm(pid)]
    relay.terminate()
    assert starting, "both workers had their handlers already: the start-up window was missed"
    try:
        rc = await asyncio.to_thread(relay.wait, 60)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the relay did not stop:\n{relay.log()}") from None
    assert rc == 0, relay.log()
    assert "exited unexpectedly" not in relay.log()
    assert "all 2 workers stopped" in relay.log()
