"""Bad input gets a reply that names the problem and the fix (real server, real TLS)."""

from __future__ import annotations

import base64

import pytest

from tests.relay import test_ingress_support as support

relay = support.relay


def b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode()


@pytest.mark.parametrize(
    ("command", "expected"),
    [
        ("AUTH PLAIN ***", "501 5.5.2 Malformed authentication data: not valid base64"),
        ("AUTH PLAIN " + b64(b"app1-only"),
         "501 5.5.2 Malformed AUTH PLAIN data: expected base64 of authzid NUL username NUL "
         "password"),
        ("AUTH PLAIN " + b64(b"\0app1\0\xff\xfe"),
         "501 5.5.2 Malformed authentication data: username and password must be UTF-8"),
        ("AUTH PLAIN " + b64(b"someone-else\0app1\0pw"),
         "501 5.5.2 Authorization identity must be empty or equal to the username"),
    ],
)
async def test_malformed_auth_says_what_is_wrong(relay: support.Relay, command: str,
                                                 expected: str) -> None:
    c = await support.ready_session(relay, user=None)
    try:
        assert await c.cmd(command) == (501, expected)
    finally:
        await c.close()


async def test_a_bad_address_says_what_is_expected(relay: support.Relay) -> None:
    c = await support.ready_session(relay)
    try:
        code, text = await c.cmd("MAIL FROM:<no-domain>")
        assert (code, text) == (501, "501 5.1.3 Bad address syntax: expected <local-part@domain>")
    finally:
        await c.close()
