"""AUTH: only after TLS, PLAIN and LOGIN, failure delay, throttling, rotation overlap, trusted
networks, and no unauthenticated relaying."""

from __future__ import annotations

import base64
import logging
import time

import pytest

from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_submit import _swaks
from tests.relay.test_ingress_support import (
    PASSWORD,
    PREVIOUS_PASSWORD,
    RawSMTP,
    Relay,
    ready_session,
)

relay = support.relay


async def test_auth_is_neither_offered_nor_accepted_before_starttls(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        await c.reply()
        code, text = await c.cmd("EHLO client.test")
        assert code == 250 and "STARTTLS" in text and "AUTH" not in text
        token = base64.b64encode(f"\0app1\0{PASSWORD}".encode()).decode()
        assert (await c.cmd(f"AUTH PLAIN {token}"))[1].startswith("530 5.7.0")
        assert (await c.cmd("MAIL FROM:<app@example.com>"))[1].startswith("530 5.7.0")
        await c.starttls(relay.client_tls())
        _, text = await c.cmd("EHLO client.test")
        assert "AUTH LOGIN PLAIN" in text and "STARTTLS" not in text
    finally:
        await c.close()
    assert relay.rejected("tls_required") == 2
    assert relay.metric("mailplane_relay_auth_success_total", mechanism="PLAIN") == 0


async def test_swaks_refuses_to_send_auth_in_clear_and_relay_demands_tls(relay: Relay) -> None:
    code, out = await _swaks("--port", str(relay.starttls_port), "--from", "app@example.com",
                             "--to", "x@example.net")
    assert code != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in out


async def test_mail_before_auth_is_530_over_tls(relay: Relay) -> None:
    code, out = await _swaks("--port", str(relay.implicit_port), "--tls-on-connect",
                             "--tls-ca-path", str(relay.ca_file), "--from", "app@example.com",
                             "--to", "x@example.net")
    assert code != 0
    assert "530 5.7.0 Authentication required" in out
    assert relay.rejected("auth_required") == 1
    assert relay.queue.submitted == []
    assert relay.log.events == []  # anonymous refusals are counted, never logged


async def test_bad_password_535_after_delay_without_blocking_others(
    relay: Relay, caplog: pytest.LogCaptureFixture
) -> None:
    # The delay is long enough that a loaded machine answers a NOOP well within it; a relay
    # that blocked while delaying would answer it only after the delay.
    delay = 2.0
    relay.reconfigure(lambda d: d["limits"].update(authFailureDelay=delay))
    caplog.set_level(logging.DEBUG)
    bad = await ready_session(relay, user=None)
    other = await ready_session(relay, user=None)
    try:
        token = base64.b64encode(b"\0app1\0wrong-password").decode()
        started = time.monotonic()
        await bad.send(f"AUTH PLAIN {token}\r\n".encode())
        # Another session is served while the failed one waits out its delay.
        assert (await other.cmd("NOOP"))[0] == 250
        assert time.monotonic() - started < delay
        code, text = await bad.reply()
        assert code == 535 and text.startswith("535 5.7.8")
        assert time.monotonic() - started >= delay
    finally:
        await bad.close()
        await other.close()
    assert relay.metric("mailplane_relay_auth_failures_total", reason="bad_credentials") == 1
    assert "wrong-password" not in caplog.text and PASSWORD not in caplog.text


async def test_swaks_bad_password(relay: Relay) -> None:
    code, out = await _swaks("--port", str(relay.implicit_port), "--tls-on-connect",
                             "--tls-ca-path", str(relay.ca_file), "--auth", "LOGIN",
                             "--auth-user", "app1", "--auth-password", "nope",
                             "--from", "app@example.com", "--to", "x@example.net")
    assert code != 0
    assert "535 5.7.8" in out


async def test_failures_from_one_ip_throttle_with_454(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        for _ in range(3):  # authFailureLimit is 3 in the test config
            assert (await c.login("app1", "wrong"))[0] == 535
        _, text = await c.login("app1", PASSWORD)  # even the right password now
        assert text.startswith("454 4.7.0")
        relay.clock[0] += 301  # authFailureWindow (300 s) passes
        assert (await c.login("app1", PASSWORD))[0] == 235
    finally:
        await c.close()
    assert relay.metric("mailplane_relay_auth_failures_total", reason="throttled") == 1


async def test_swaks_throttled(relay: Relay) -> None:
    for _ in range(3):  # three failures for app1 from this address
        assert relay.throttle.begin("127.0.0.1", "app1") is not None
    code, out = await _swaks("--port", str(relay.implicit_port), "--tls-on-connect",
                             "--tls-ca-path", str(relay.ca_file), "--auth", "PLAIN",
                             "--auth-user", "app1", "--auth-password", PASSWORD,
                             "--from", "app@example.com", "--to", "x@example.net")
    assert code != 0
    assert "454 4.7.0" in out


async def test_login_mechanism_challenges_and_malformed_input(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.cmd("AUTH CRAM-MD5"))[1].startswith("504 5.5.4")
        assert (await c.cmd("AUTH PLAIN !!!notbase64"))[1].startswith("501 5.5.2")
        _, text = await c.cmd("AUTH LOGIN")
        assert text == "334 " + base64.b64encode(b"Username:").decode()
        _, text = await c.cmd(base64.b64encode(b"app1").decode())
        assert text == "334 " + base64.b64encode(b"Password:").decode()
        _, text = await c.cmd(base64.b64encode(PASSWORD.encode()).decode())
        assert text.startswith("235 2.7.0")
        assert (await c.login())[1].startswith("503 5.5.1")
    finally:
        await c.close()
    assert relay.metric("mailplane_relay_auth_success_total", mechanism="LOGIN") == 1
    assert relay.metric("mailplane_relay_auth_failures_total", reason="malformed") == 1


async def test_scrypt_hashed_password_is_checked_off_the_loop(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.login("human", PASSWORD))[0] == 235
    finally:
        await c.close()


async def test_rotation_previous_password_works_only_until_it_expires(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    d = await ready_session(relay, user=None)
    try:
        assert (await c.login("rotating", PREVIOUS_PASSWORD))[0] == 235
        assert (await d.login("rotated", PREVIOUS_PASSWORD))[0] == 535
        assert (await d.login("rotated", PASSWORD))[0] == 235
    finally:
        await c.close()
        await d.close()


async def test_trusted_network_sends_without_auth_but_others_never_relay(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.cmd("MAIL FROM:<app@example.com>"))[0] == 530
        relay.reconfigure(lambda d: d.update(trustedNetworks=["127.0.0.0/8"]))
        assert (await c.cmd("MAIL FROM:<cron@unconfigured.net>"))[0] == 250
        assert (await c.cmd("RCPT TO:<ops@example.net>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        code, text = await c.cmd(b"Subject: cron\r\n\r\nok\r\n.")
        assert code == 250, text
    finally:
        await c.close()
    [msg] = relay.queue.submitted
    assert msg.credential is None and msg.sender_domain == "other"
    assert relay.metric("mailplane_relay_messages_received_total", listener="submissions",
                        sender_domain="other", credential="none") == 1


async def test_trusted_network_may_skip_starttls_but_auth_still_needs_tls(relay: Relay) -> None:
    relay.reconfigure(lambda d: d.update(trustedNetworks=["127.0.0.1/32"]))
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        await c.reply()
        _, text = await c.cmd("EHLO legacy.app")
        assert "AUTH" not in text
        assert (await c.login())[1].startswith("530 5.7.0 Must issue a STARTTLS")
        assert (await c.cmd("MAIL FROM:<cron@example.com>"))[0] == 250
        assert (await c.cmd("RCPT TO:<ops@example.net>"))[0] == 250
        assert (await c.cmd("DATA"))[0] == 354
        assert (await c.cmd(b"Subject: cron\r\n\r\nok\r\n."))[0] == 250
    finally:
        await c.close()
    [msg] = relay.queue.submitted
    assert msg.sender_domain == "example.com" and msg.listener == "submission"
    assert b"with ESMTP;" in relay.spool.read(msg.queue_id)
