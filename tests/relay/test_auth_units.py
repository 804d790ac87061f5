"""AUTH PLAIN and LOGIN, exchange by exchange, against the in-process relay: initial responses
and challenges, the empty response ``=``, a cancelled exchange, strict base64 and UTF-8, each
answered with its exact reply."""

from __future__ import annotations

import logging
import threading
from base64 import b64encode
from datetime import datetime

import pytest

from mailplane_relay.config import Credential, hash_password
from mailplane_relay.ingress.auth import check_password
from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import PASSWORD, RawSMTP, Relay, ready_session

relay = support.relay

NOT_BASE64 = "501 5.5.2 Malformed authentication data: not valid base64"
PLAIN_FIELDS = ("501 5.5.2 Malformed AUTH PLAIN data: expected base64 of authzid NUL username "
                "NUL password")
NOT_UTF8 = "501 5.5.2 Malformed authentication data: username and password must be UTF-8"


def b64(data: bytes) -> str:
    return b64encode(data).decode()


async def test_plain_through_the_challenge(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert await c.cmd("AUTH PLAIN") == (334, "334 ")
        _, text = await c.cmd(b64(b"\0app1\0" + PASSWORD.encode()))
        assert text == "235 2.7.0 Authentication successful"
    finally:
        await c.close()


async def test_plain_with_an_authorization_identity_equal_to_the_username(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        _, text = await c.cmd("AUTH PLAIN " + b64(b"app1\0app1\0" + PASSWORD.encode()))
        assert text == "235 2.7.0 Authentication successful"
    finally:
        await c.close()


async def test_login_with_the_username_as_initial_response(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        _, text = await c.cmd("AUTH LOGIN " + b64(b"app1"))
        assert text == "334 " + b64(b"Password:")
        _, text = await c.cmd(b64(PASSWORD.encode()))
        assert text == "235 2.7.0 Authentication successful"
    finally:
        await c.close()


async def test_base64_is_strict(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        # Valid base64 of a whole PLAIN response, with one character outside the alphabet:
        # a lenient decoder would drop it and check the password.
        _, text = await c.cmd("AUTH PLAIN " + b64(b"\0app1\0" + PASSWORD.encode()) + "!")
        assert text == NOT_BASE64
        _, text = await c.cmd("AUTH LOGIN " + b64(b"app1") + "*")
        assert text == NOT_BASE64
        assert (await c.cmd("NOOP"))[0] == 250
    finally:
        await c.close()
    assert relay.metric("mailplane_relay_auth_failures_total", reason="malformed") == 2


async def test_an_empty_initial_response_is_an_empty_plain_blob(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        _, text = await c.cmd("AUTH PLAIN =")
        assert text == PLAIN_FIELDS
    finally:
        await c.close()


async def test_a_cancelled_exchange_ends_quietly_and_the_session_goes_on(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.cmd("AUTH PLAIN"))[0] == 334
        code, _ = await c.cmd("*")
        assert code == 501
        assert (await c.cmd("AUTH LOGIN"))[0] == 334
        assert (await c.cmd(b64(b"app1")))[0] == 334
        assert (await c.cmd("*"))[0] == 501
        assert (await c.cmd("NOOP"))[0] == 250
        assert (await c.login())[0] == 235
    finally:
        await c.close()
    assert relay.metric("mailplane_relay_auth_failures_total", reason="malformed") == 2


async def test_login_names_must_be_utf8(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        assert (await c.cmd("AUTH LOGIN " + b64(b"app\xff")))[0] == 334
        _, text = await c.cmd(b64(PASSWORD.encode()))
        assert text == NOT_UTF8
        _, text = await c.cmd("AUTH PLAIN " + b64(b"\0app1\0\xfe"))
        assert text == NOT_UTF8
        assert (await c.login())[0] == 235
    finally:
        await c.close()


async def test_an_authorization_identity_of_someone_else_is_refused(relay: Relay) -> None:
    c = await ready_session(relay, user=None)
    try:
        _, text = await c.cmd("AUTH PLAIN " + b64(b"app2\0app1\0" + PASSWORD.encode()))
        assert text == ("501 5.5.2 Authorization identity must be empty or equal to the "
                        "username")
        assert (await c.login())[0] == 235
    finally:
        await c.close()


async def test_auth_needs_ehlo_and_tls_first(relay: Relay) -> None:
    c = await RawSMTP.connect(relay.implicit_port, relay.client_tls())
    try:
        assert (await c.reply())[0] == 220
        assert (await c.cmd("HELO client.test"))[0] == 250
        _, text = await c.cmd("AUTH PLAIN " + b64(b"\0app1\0" + PASSWORD.encode()))
        assert text == "503 5.5.1 Send EHLO first"
    finally:
        await c.close()
    c = await RawSMTP.connect(relay.starttls_port)
    try:
        assert (await c.reply())[0] == 220
        assert (await c.cmd("EHLO client.test"))[0] == 250
        _, text = await c.cmd("AUTH PLAIN " + b64(b"\0app1\0" + PASSWORD.encode()))
        assert text == "530 5.7.0 Must issue a STARTTLS command first"
    finally:
        await c.close()
    assert relay.rejected("tls_required") == 1


@pytest.mark.parametrize("line", ["AUTH", "AUTH PLAIN a b"])
async def test_auth_syntax(relay: Relay, line: str) -> None:
    c = await ready_session(relay, user=None)
    try:
        _, text = await c.cmd(line)
        assert text == "501 5.5.4 Syntax: AUTH mechanism [initial-response]"
        assert (await c.login())[0] == 235
    finally:
        await c.close()


async def test_a_blocked_address_is_answered_before_any_exchange(relay: Relay) -> None:
    for i in range(20):  # authFailureLimitPerAddress (default 20)
        assert relay.throttle.begin("127.0.0.2", f"user{i}") is not None
    c = await ready_session(relay, user=None, source="127.0.0.2")
    try:
        _, text = await c.cmd("AUTH LOGIN")  # no challenge: refused at once
        assert text == "454 4.7.0 Too many failed authentication attempts, try again later"
    finally:
        await c.close()
    assert relay.metric("mailplane_relay_auth_failures_total", reason="throttled") == 1


async def test_a_failure_is_logged_with_a_configured_username_only(
        relay: Relay, caplog: pytest.LogCaptureFixture) -> None:
    c = await ready_session(relay, user=None)
    try:
        with caplog.at_level(logging.INFO, logger="mailplane_relay.ingress.auth"):
            assert (await c.login("app1", "wrong"))[0] == 535
            # A username that is no credential may be a password typed in the wrong field.
            assert (await c.login("S3cret-typed-here", "wrong"))[0] == 535
    finally:
        await c.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "mailplane_relay.ingress.auth"]
    assert lines == ["AUTH PLAIN failed for app1 from 127.0.0.1",
                     "AUTH PLAIN failed for (unknown user) from 127.0.0.1"]


async def test_scrypt_is_checked_off_the_event_loop() -> None:
    seen: list[threading.Thread] = []

    class Recording(Credential):
        def check_password(self, password: str, now: datetime | None = None) -> bool:
            seen.append(threading.current_thread())
            return super().check_password(password, now)

    fields = {"username": "app", "allowedSenders": ["example.com"]}
    slow = Recording.model_validate({**fields, "passwordHash": hash_password(
        "pw", scheme="scrypt")})
    assert await check_password(slow, "pw")
    rotating = Recording.model_validate({
        **fields, "passwordHash": hash_password("pw"),
        "previousPasswordHash": hash_password("old", scheme="scrypt"),
        "previousExpires": "2999-01-01T00:00:00Z"})
    assert await check_password(rotating, "old")
    assert seen[0] is not threading.current_thread()
    assert seen[1] is not threading.current_thread()
