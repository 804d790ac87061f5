"""Relay abuse controls, from several loopback source addresses: AUTH throttling keyed per
(username, client address) and per client address, atomic under parallel sessions; the
per-address session cap; the deadline to authenticate; the maximum session lifetime; idle
sessions that NOOP; the refused-command limit; and no message-log rows for anonymous clients."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from pathlib import Path

from mailplane_relay.store import MessageLog, SqliteBackend
from mailplane_relay.store.sync import query_log
from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_submit import _swaks
from tests.relay.test_ingress_support import PASSWORD, RawSMTP, Relay, message, ready_session

relay = support.relay


# How long a test waits before it calls a behaviour missing: long enough that no load on the
# machine reaches it, shorter than the relay's default deadlines (30 s to authenticate) that
# would otherwise end the session for another reason.
HANG = 20.0
DEADLINE = 1.0


async def _eof(c: RawSMTP, timeout: float = 5.0) -> bytes:
    """Everything the relay still sends before it closes the connection."""
    return await asyncio.wait_for(c.reader.read(), timeout)


async def test_wrong_passwords_from_one_address_never_lock_out_the_owner(relay: Relay) -> None:
    attacker = await ready_session(relay, user=None, source="127.0.0.2")
    try:
        replies = [(await attacker.login("app1", f"guess-{i}"))[1] for i in range(6)]
        # authFailureLimit is 3 in the test configuration.
        assert [r[:3] for r in replies] == ["535"] * 3 + ["454"] * 3
        # Even the right password is refused from the address that guessed.
        assert (await attacker.login("app1", PASSWORD))[1].startswith("454 4.7.0")
    finally:
        await attacker.close()
    owner = await ready_session(relay, user=None, source="127.0.0.3")
    try:
        assert (await owner.login("app1", PASSWORD))[1].startswith("235 2.7.0")
    finally:
        await owner.close()
    # A real client from a third address, end to end.
    code, out = await _swaks("--port", str(relay.implicit_port), "--tls-on-connect",
                             "--tls-ca-path", str(relay.ca_file), "--local-interface",
                             "127.0.0.4", "--auth", "PLAIN", "--auth-user", "app1",
                             "--auth-password", PASSWORD, "--from", "app@example.com",
                             "--to", "x@example.net")
    assert code == 0, out
    assert relay.metric("mailplane_relay_auth_failures_total", reason="bad_credentials") == 3
    assert relay.metric("mailplane_relay_auth_failures_total", reason="throttled") == 4


async def test_an_address_guessing_many_usernames_is_throttled_for_all(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(authFailureLimitPerAddress=4))
    c = await ready_session(relay, user=None, source="127.0.0.2")
    try:
        for name in ("app1", "app2", "human", "quota"):
            assert (await c.login(name, "wrong"))[0] == 535
        # Refused before the credentials are even read.
        assert (await c.cmd("AUTH PLAIN"))[1].startswith("454 4.7.0")
        assert (await c.login("rotating", PASSWORD))[1].startswith("454 4.7.0")
    finally:
        await c.close()
    other = await ready_session(relay, user=None, source="127.0.0.3")
    try:
        assert (await other.login("app2", PASSWORD))[0] == 235
    finally:
        await other.close()
    relay.clock[0] += 301  # authFailureWindow (300 s) passes
    again = await ready_session(relay, user="app1", source="127.0.0.2")
    await again.close()


async def test_a_right_password_clears_its_own_attempt(relay: Relay) -> None:
    """Successful logins are not failures: an application that reconnects all day never
    throttles itself."""
    for _ in range(10):
        c = await ready_session(relay, user="app1", source="127.0.0.2")
        await c.close()
    assert relay.throttle.tracked_keys() == 0


async def test_parallel_guesses_cannot_exceed_the_limit(relay: Relay) -> None:
    """40 sessions from one address each send a wrong password for a scrypt credential (its
    check runs on a worker thread, so the sessions interleave): at most authFailureLimit (3)
    passwords are checked; the rest are throttled."""
    # Connected one by one (40 TLS handshakes at once are slow on a loaded machine); what
    # runs in parallel is the AUTH below.
    sessions = [await ready_session(relay, user=None, source="127.0.0.5") for _ in range(40)]
    try:
        token = base64.b64encode(b"\0human\0not-the-password").decode()
        for c in sessions:  # all 40 AUTH commands are on the wire before any is answered
            c.writer.write(f"AUTH PLAIN {token}\r\n".encode())
        await asyncio.gather(*(c.writer.drain() for c in sessions))
        codes = sorted([(await c.reply(10))[0] for c in sessions])
    finally:
        await asyncio.gather(*(c.close() for c in sessions))
    assert codes == [454] * 37 + [535] * 3
    assert relay.metric("mailplane_relay_auth_failures_total", reason="bad_credentials") == 3


async def test_sessions_per_address_are_capped(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxSessionsPerAddress=2))
    first = await ready_session(relay, source="127.0.0.2")
    second = await ready_session(relay, source="127.0.0.2")
    third = await RawSMTP.connect(relay.implicit_port, relay.client_tls(), "127.0.0.2")
    elsewhere = await ready_session(relay, source="127.0.0.3")
    try:
        assert (await third.reply())[1] == (
            "421 4.7.0 Too many connections from your address, try again later")
        assert await _eof(third) == b""
        assert (await elsewhere.cmd("NOOP"))[0] == 250
        await first.cmd("QUIT")
        again = await ready_session(relay, source="127.0.0.2")  # a slot was freed
        await again.close()
    finally:
        for c in (first, second, third, elsewhere):
            await c.close()
    assert relay.rejected("too_many_sessions_per_address") == 1


async def test_trusted_networks_are_not_capped_per_address(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxSessionsPerAddress=1))
    relay.reconfigure(lambda d: d.update(trustedNetworks=["127.0.0.2/32"]))
    sessions = [await ready_session(relay, user=None, source="127.0.0.2") for _ in range(3)]
    for c in sessions:
        await c.close()
    assert relay.rejected("too_many_sessions_per_address") == 0


async def test_unauthenticated_session_is_closed_at_the_auth_deadline(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(authDeadline=DEADLINE))
    # An authenticated session outlives the deadline. It must authenticate within the deadline
    # itself, which a loaded machine may not manage in time: then it is closed, and another
    # one tries.
    for _ in range(10):
        owner = await ready_session(relay, user="app1", source="127.0.0.3")
        authenticated = time.monotonic()
        code, _ = await owner.cmd("NOOP")
        if code == 250:
            break
        await owner.close()
    else:
        raise AssertionError("no session could authenticate within the deadline")
    # Plain TCP without TLS: nothing to set up before the deadline counts.
    started = time.monotonic()  # the deadline counts from the connection
    anonymous = await RawSMTP.connect(relay.starttls_port, source="127.0.0.2")
    try:
        closing = ""
        # The client keeps talking (a NOOP once the previous one is answered): it does not
        # matter. The bound only ends a hang; without the deadline nothing closes this session
        # before it.
        with contextlib.suppress(ConnectionError):
            assert (await anonymous.reply(HANG))[0] == 220
            while time.monotonic() - started < HANG:
                code, text = await anonymous.cmd("NOOP")
                if code != 250:
                    closing = text
                    break
                await asyncio.sleep(0.05)
        assert time.monotonic() - started < HANG, "the session outlived the deadline"
        assert time.monotonic() - started >= DEADLINE  # never before the deadline
        assert relay.rejected("auth_deadline") == 1
        # The reply, unless it was lost to a reset (a NOOP sent as the relay closed).
        assert closing in ("", "421 4.7.0 Authentication not completed in time, closing "
                           "connection"), closing
        # The owner, past the deadline too, still works.
        while time.monotonic() - authenticated < DEADLINE * 2:
            await asyncio.sleep(0.05)
        assert (await owner.cmd("MAIL FROM:<app@example.com>"))[0] == 250
    finally:
        await anonymous.close()
        await owner.close()
    assert relay.rejected("auth_deadline") == 1


async def _transfer_under_way(relay: Relay, lifetime: float,
                              source: str) -> tuple[RawSMTP, float]:
    """An authenticated session in the middle of DATA, set up well within ``lifetime`` of its
    connection (known from the client's clock, which started earlier than the relay's). A set-up
    slowed down by a loaded machine is closed, and another one tries."""
    for _ in range(10):
        started = time.monotonic()
        c = await ready_session(relay, source=source)
        with contextlib.suppress(ConnectionError):
            assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 250
            assert (await c.cmd("RCPT TO:<r@example.net>"))[0] == 250
            assert (await c.cmd("DATA"))[0] == 354
            await c.send(message()[:20])  # a transfer in progress when the lifetime ends
            if time.monotonic() - started < lifetime:
                return c, started
        await c.close()
    raise AssertionError(f"no transfer could be started within {lifetime}s")


async def test_session_lifetime_closes_idle_sessions_and_waits_for_a_transfer(
    relay: Relay,
) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxSessionLifetime=DEADLINE))
    idle = await ready_session(relay, source="127.0.0.2")
    busy, _ = await _transfer_under_way(relay, DEADLINE, "127.0.0.3")
    try:
        assert await _eof(idle, HANG) == (
            b"421 4.4.2 Maximum session duration reached, closing connection\r\n")
        await busy.send(message()[20:] + b".\r\n")
        assert (await busy.reply(HANG))[1].startswith("250 2.0.0 Ok: queued")
        assert (await busy.reply(HANG))[1].startswith("421 4.4.2")
    finally:
        await idle.close()
        await busy.close()
    assert len(relay.queue.submitted) == 1
    assert relay.rejected("session_lifetime") == 2


async def test_noop_and_rset_do_not_keep_a_session_alive(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(sessionTimeout=0.4))
    # Plain TCP: no TLS handshake or EHLO whose pauses could reach the timeout first.
    c = await RawSMTP.connect(relay.starttls_port, source="127.0.0.2")
    try:
        started = time.monotonic()
        with_eof = False
        # The bound only ends a hang: if NOOP or RSET kept the session alive, nothing would
        # close it before the deadline to authenticate (30 s by default).
        while time.monotonic() - started < HANG:
            try:
                c.writer.write(b"NOOP\r\nRSET\r\n")
                await c.writer.drain()
            except ConnectionError:
                with_eof = True
                break
            await asyncio.sleep(0.05)
            if c.reader.at_eof():
                with_eof = True
                break
        assert with_eof, "NOOP and RSET kept an idle session open"
    finally:
        await c.close()


async def test_session_is_closed_after_too_many_refused_commands(relay: Relay) -> None:
    relay.reconfigure(lambda d: d["limits"].update(maxRefusedCommands=5))
    c = await ready_session(relay, user=None, source="127.0.0.2")
    try:
        for _ in range(4):
            assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 530
        assert (await c.cmd("XYZZY"))[1] == "500 5.5.1 Command not recognized"
        assert await _eof(c) == b"421 4.7.0 Too many refused commands, closing connection\r\n"
    finally:
        await c.close()
    assert relay.rejected("too_many_refused") == 1
    assert relay.rejected("auth_required") == 4
    assert relay.rejected("unknown_command") == 1


async def test_anonymous_refusals_write_nothing_to_the_message_log(
    relay: Relay, tmp_path: Path
) -> None:
    """3,000 refused commands from an unauthenticated client: counted in metrics, no row in the
    (real, SQLite) message log, and the database does not grow."""
    path = str(tmp_path / "messagelog.sqlite3")
    store = SqliteBackend(path)
    await store.open()
    msglog = MessageLog(store, flush_interval=0.01, metrics=relay.metrics)
    await msglog.start()
    relay.server.log = msglog
    relay.reconfigure(lambda d: d["limits"].update(maxRefusedCommands=100_000))
    try:
        await msglog.flush()
        size_before = sum(os.path.getsize(p) for p in (path, path + "-wal")
                          if os.path.exists(p))
        c = await ready_session(relay, user=None, source="127.0.0.2")
        try:
            long_address = "x" * 900
            for i in range(1000):
                c.writer.write(f"MAIL FROM:<s{i}{long_address}@example.com>\r\n".encode()
                               + f"RCPT TO:<r{i}@example.net>\r\n".encode() + b"DATA\r\n")
            await c.writer.drain()
            for _ in range(3000):
                code, _ = await c.reply()
                assert code in (503, 530)
        finally:
            await c.close()
        await msglog.flush()
        size_after = sum(os.path.getsize(p) for p in (path, path + "-wal")
                         if os.path.exists(p))
    finally:
        await msglog.close()
        await store.close()
    assert query_log(path, limit=10) == []
    assert size_after == size_before
    assert relay.rejected("auth_required") == 1000


async def test_suppressed_recipients_and_delivered_mail_do_not_close_a_session(
    relay: Relay,
) -> None:
    """A list with many suppressed addresses is normal, and so is a client that hits a limit
    now and then between messages it delivers: only refusals in a row close the session."""
    relay.reconfigure(lambda d: d["limits"].update(maxRefusedCommands=3, maxRecipients=50))
    for i in range(10):
        relay.suppression.entries[f"gone{i}@example.net"] = ("hard_bounce", 0.0)
    c = await ready_session(relay, source="127.0.0.2")
    try:
        for _ in range(3):
            assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 250
            for i in range(10):
                assert (await c.cmd(f"RCPT TO:<gone{i}@example.net>"))[0] == 550
            assert (await c.cmd("RCPT TO:<ok@example.net>"))[0] == 250
            assert (await c.cmd("XYZZY"))[0] == 500
            assert (await c.cmd("XYZZY"))[0] == 500  # two refusals: one short of the cap
            assert (await c.cmd("DATA"))[0] == 354
            await c.send(message() + b".\r\n")
            assert (await c.reply())[0] == 250  # and the count starts again
    finally:
        await c.close()
    assert len(relay.queue.submitted) == 3
    assert relay.rejected("too_many_refused") == 0


def test_every_refusal_reason_is_from_the_closed_set() -> None:
    """Metric labels come from metrics.REJECT_REASONS only: every reason the ingress names."""
    import re

    from mailplane_relay import ingress
    from mailplane_relay.metrics import REJECT_REASONS

    source = "".join(p.read_text() for p in Path(ingress.__file__).parent.glob("*.py"))
    used = set(re.findall(r'(?:Refusal|count_refusal|_end_session)\(\s*"([a-z_]+)"', source))
    assert len(used) > 20
    assert used <= set(REJECT_REASONS), used - set(REJECT_REASONS)


async def test_a_trickled_transfer_does_not_outlive_the_session_lifetime(relay: Relay) -> None:
    # sessionTimeout only has to outlast the pauses between two lines of the trickle.
    relay.reconfigure(lambda d: d["limits"].update(maxSessionLifetime=DEADLINE,
                                                   sessionTimeout=2.0))
    c, started = await _transfer_under_way(relay, DEADLINE, "127.0.0.2")
    try:
        closed = False
        # The bound only ends a hang: without the lifetime, the trickle would keep the session
        # open for ever.
        while time.monotonic() - started < HANG:
            try:
                await c.send(b"a.\r\n")  # a line at a time: each pushes the idle deadline
            except ConnectionError:
                closed = True
                break
            await asyncio.sleep(0.1)
            if c.reader.at_eof():
                closed = True
                break
        assert closed, "a trickled transfer outlived the session lifetime"
    finally:
        await c.close()
    assert relay.queue.submitted == []
    assert relay.rejected("session_lifetime") == 1
