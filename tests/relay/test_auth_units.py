"""AUTH PLAIN and LOGIN, exchange by exchange, against the in-process relay: initial responses
and challenges, the empty response ``=``, a cancelled exchange, strict base64 and UTF-8, each
answered with its exact reply."""

from __future__ import annotations

from base64 import b64encode

from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_support import PASSWORD, Relay, ready_session

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
