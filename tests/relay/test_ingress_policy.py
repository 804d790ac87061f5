"""Sender policy, limits and suppression, as a client sees them (replies) and as operators see
them (rejected events and metrics); nothing refused reaches the spool."""

from __future__ import annotations

import pytest

from tests.relay import test_ingress_support as support
from tests.relay.test_ingress_submit import _swaks
from tests.relay.test_ingress_support import PASSWORD, RawSMTP, Relay, message, ready_session

relay = support.relay


async def send(c: RawSMTP, sender: str, rcpts: list[str], data: bytes) -> tuple[int, str]:
    """One transaction; returns the first refusal or the final reply."""
    code, text = await c.cmd(f"MAIL FROM:<{sender}>")
    if code != 250:
        return code, text
    for r in rcpts:
        code, text = await c.cmd(f"RCPT TO:<{r}>")
        if code != 250:
            await c.cmd("RSET")
            return code, text
    code, text = await c.cmd("DATA")
    assert code == 354
    await c.send(data + b".\r\n")
    return await c.reply()


def _swaks_auth(relay: Relay, user: str, sender: str, header_from: str) -> list[str]:
    return ["--port", str(relay.implicit_port), "--tls-on-connect", "--tls-ca-path",
            str(relay.ca_file), "--auth", "PLAIN", "--auth-user", user, "--auth-password",
            PASSWORD, "--from", sender, "--to", "x@example.net",
            "--header", f"From: {header_from}"]


async def test_swaks_sender_domain_not_allowed_for_credential(relay: Relay) -> None:
    code, out = await _swaks(*_swaks_auth(relay, "app1", "a@other.org", "a@other.org"))
    assert code != 0
    assert "550 5.7.1 Credential app1 may not send from domain other.org" in out
    assert relay.rejected("sender_not_allowed") == 1
    assert relay.queue.submitted == []


async def test_sender_domain_not_enabled_on_relay(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        _, text = await c.cmd("MAIL FROM:<a@elsewhere.net>")
        assert text == "550 5.7.1 Sender domain elsewhere.net is not enabled on this relay"
    finally:
        await c.close()
    assert relay.rejected("domain_not_enabled") == 1


async def test_swaks_header_from_must_pass_the_same_policy(relay: Relay) -> None:
    code, out = await _swaks(*_swaks_auth(relay, "app1", "a@example.com", "ceo@other.org"))
    assert code != 0
    assert "550 5.7.1 Credential app1 may not send as header From: domain other.org" in out
    assert relay.queue.submitted == []
    assert list(relay.spool.directory.glob("*.msg")) == []


async def test_missing_header_from_is_refused(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        _, text = await send(c, "a@example.com", ["x@example.net"],
                                b"Subject: no from\r\n\r\nhi\r\n")
        assert text.startswith("550 5.7.1 Message has no From: header")
    finally:
        await c.close()


async def test_swaks_suspended_credential_says_why(relay: Relay) -> None:
    code, out = await _swaks(*_swaks_auth(relay, "banned", "a@example.com", "a@example.com"))
    assert code != 0
    assert "554 5.7.1 Credential banned is suspended: complaint rate above 0.3%" in out
    assert relay.rejected("suspended") == 1


async def test_suspension_by_hot_reload_applies_to_the_next_command(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        assert (await send(c, "a@example.com", ["x@example.net"], message("a@example.com")))[
            0] == 250

        def suspend(doc: dict[str, object]) -> None:
            creds = doc["credentials"]
            assert isinstance(creds, list)
            creds[0] = {**creds[0], "suspended": True, "suspendedReason": "paused by ops"}

        relay.reconfigure(suspend)
        _, text = await c.cmd("MAIL FROM:<a@example.com>")
        assert text == "554 5.7.1 Credential app1 is suspended: paused by ops"
        assert (await c.cmd("NOOP"))[0] == 250  # the session itself was not dropped
    finally:
        await c.close()


async def test_rate_limit_per_minute_451_then_refills(relay: Relay) -> None:
    c = await ready_session(relay, user="slow")  # ratePerMinute: 2
    try:
        for _ in range(2):
            assert (await send(c, "a@example.com", ["x@example.net"],
                               message("a@example.com")))[0] == 250
        _, text = await c.cmd("MAIL FROM:<a@example.com>")
        assert text == "451 4.7.1 Rate limit of 2 messages per minute exceeded for slow"
        relay.clock[0] += 30  # one token back
        assert (await send(c, "a@example.com", ["x@example.net"],
                           message("a@example.com")))[0] == 250
    finally:
        await c.close()
    assert relay.rejected("rate_limited") == 1


async def test_swaks_daily_quota_452_until_the_next_utc_day(relay: Relay) -> None:
    args = _swaks_auth(relay, "quota", "a@example.com", "a@example.com")
    assert (await _swaks(*args))[0] == 0
    code, out = await _swaks(*args)
    assert code != 0
    assert "452 4.7.1 Daily quota of 1 messages exceeded for quota" in out
    relay.clock[0] = (relay.clock[0] // 86400 + 1) * 86400 + 1
    assert (await _swaks(*args))[0] == 0
    assert relay.rejected("quota_exceeded") == 1


async def test_swaks_size_declared_too_big(relay: Relay) -> None:
    # maxMessageSize is 20,000 in the test config; swaks declares SIZE when it is advertised.
    code, out = await _swaks(*_swaks_auth(relay, "app1", "a@example.com", "a@example.com"),
                             "--body", "x" * 900 + "\n" + ("y" * 900 + "\n") * 30)
    assert code != 0
    assert "552 5.3.4" in out


async def test_size_enforced_without_size_parameter_and_session_continues(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        _, text = await c.cmd("MAIL FROM:<a@example.com> SIZE=20001")
        assert text.startswith("552 5.3.4")
        big = message("a@example.com") + (b"z" * 500 + b"\r\n") * 60
        _, text = await send(c, "a@example.com", ["x@example.net"], big)
        assert text == ("552 5.3.4 Message size exceeds fixed maximum message size of "
                        "20000 bytes")
        huge = message("a@example.com") + (b"z" * 900 + b"\r\n") * 100  # beyond what is kept
        assert (await send(c, "a@example.com", ["x@example.net"], huge))[0] == 552
        assert (await send(c, "a@example.com", ["x@example.net"],
                           message("a@example.com")))[0] == 250
    finally:
        await c.close()
    assert relay.rejected("size") == 3
    assert len(relay.queue.submitted) == 1


async def test_too_many_recipients_452(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
        for i in range(3):  # maxRecipients: 3
            assert (await c.cmd(f"RCPT TO:<r{i}@example.net>"))[0] == 250
        _, text = await c.cmd("RCPT TO:<r4@example.net>")
        assert text == "452 4.5.3 Too many recipients (at most 3 per message)"
    finally:
        await c.close()


async def test_swaks_suppressed_recipient_550(relay: Relay) -> None:
    relay.suppression.entries["x@example.net"] = ("hard bounce", 1.0)
    code, out = await _swaks(*_swaks_auth(relay, "app1", "a@example.com", "a@example.com"))
    assert code != 0
    assert "550 5.1.1 Recipient x@example.net is on the suppression list (hard bounce)" in out
    [event] = [e for e in relay.log.events if e.status == "rejected"]
    assert event.recipient == "x@example.net" and event.sender == "a@example.com"
    assert event.credential == "app1" and event.queue_id is None


@pytest.mark.parametrize("address", ["<no-at-sign>", "<@example.net>", "<a b@example.net>"])
async def test_bad_recipient_syntax(relay: Relay, address: str) -> None:
    c = await ready_session(relay)
    try:
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 250
        code, _ = await c.cmd(f"RCPT TO:{address}")
        assert code in (501, 553)
    finally:
        await c.close()


@pytest.mark.parametrize("path", [
    "<a.b+tag@example.com> SIZE=100 BODY=8BITMIME",  # the fast path
    '<"quoted local"@example.com>',  # the general parser
    "<a@EXAMPLE.com>",
])
async def test_sender_paths_parse_alike_on_both_parsers(relay: Relay, path: str) -> None:
    c = await ready_session(relay)
    try:
        code, text = await c.cmd(f"MAIL FROM:{path}")
        assert code == 250, text
        assert (await c.cmd("MAIL FROM:<a@example.com>"))[0] == 503  # the first one was taken
    finally:
        await c.close()


def test_header_fields_unfold_and_compare_names_loosely() -> None:
    from mailplane_relay.ingress.hygiene import header_fields

    content = (b"Subject: x\r\nFROM: Alice\r\n <alice@example.com>\r\nMessage-ID:\r\n\t<id@x>\r\n"
               b"From : evil@other.org\r\nX-Note: From: not@a.header\r\n\r\nFrom: body@x.y\r\n")
    values, mid = header_fields(content)
    assert values == ["Alice <alice@example.com>", "evil@other.org"]
    assert mid == "<id@x>"
    assert header_fields(b"\r\nFrom: body@x.y\r\n") == ([], None)
    assert header_fields(b"From: only@headers.example\r\n") == (["only@headers.example"], None)


async def test_obsolete_spaced_from_header_cannot_slip_past_the_policy(relay: Relay) -> None:
    c = await ready_session(relay)
    try:
        _, text = await send(c, "a@example.com", ["x@example.net"],
                             b"From: a@example.com\r\nFrom : ceo@other.org\r\n\r\nhi\r\n")
        assert text.startswith("550 5.7.1") and "other.org" in text
    finally:
        await c.close()


@pytest.mark.parametrize("value", [b"ceo@other.org\\@example.com", b"@example.com"])
async def test_a_from_address_without_a_local_part_is_refused(relay: Relay,
                                                              value: bytes) -> None:
    """``ceo@other.org\\@example.com`` parses here as ``@example.com`` (an enabled domain), while
    a reader or a receiver's DMARC check may take ``ceo@other.org`` from it: a From: address
    the relay cannot read as local-part@domain is refused, never checked for what it is not."""
    c = await ready_session(relay)
    try:
        _, text = await send(c, "a@example.com", ["x@example.net"],
                             b"From: " + value + b"\r\nSubject: s\r\n\r\nhi\r\n")
        assert text == ("550 5.7.1 Header From: has a malformed address; write it as "
                        "local-part@domain")
    finally:
        await c.close()
    assert relay.queue.submitted == []
